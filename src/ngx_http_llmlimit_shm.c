
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The shared-memory store: counters in an rbtree keyed by a hash of
 * (budget, identity, limit), with an LRU queue.  Nodes have one fixed
 * size, so they are carved from whole slab pages and recycled through a
 * free list: 80 bytes a counter rather than the 128 of a slab chunk.
 *
 * The rbtree is split by the hash's low bits into a power-of-two array of
 * trees, about one for every eight counters the zone can hold: a lookup
 * then reads one root and a node or two (up to four levels in a full
 * zone) instead of walking some twenty cold nodes of one tree of the
 * whole zone.  Fewer, deeper trees would keep the roots in cache but
 * walk more nodes; more trees would make the roots themselves miss.
 * Each tree stays balanced, so identities crafted to share a tree cost a
 * logarithmic walk, no more.
 * Only the roots live in shared memory: the ngx_rbtree_t, with its insert
 * function pointer, is made up on the stack for every change.
 */


#include "ngx_http_llmlimit.h"


#define NGX_HTTP_LLMLIMIT_EXPIRE_SCAN   16
#define NGX_HTTP_LLMLIMIT_WARN_PERIOD   60


typedef struct {
    u_char                          color;
    u_char                          dummy;
    u_short                         unused;
    uint32_t                        expires;     /* seconds */
    ngx_queue_t                     queue;
    uint64_t                        key2;
    ngx_http_llmlimit_state_t       state;
} ngx_http_llmlimit_node_t;


#define ngx_http_llmlimit_node(n)                                            \
    ((ngx_http_llmlimit_node_t *) &(n)->color)

#define ngx_http_llmlimit_rbnode(ln)                                         \
    ((ngx_rbtree_node_t *)                                                   \
         ((u_char *) (ln) - offsetof(ngx_rbtree_node_t, color)))

#define NGX_HTTP_LLMLIMIT_NODE_SIZE                                          \
    ngx_align(offsetof(ngx_rbtree_node_t, color)                             \
              + sizeof(ngx_http_llmlimit_node_t), sizeof(uint64_t))


#define NGX_HTTP_LLMLIMIT_SHM_CHECK     0
#define NGX_HTTP_LLMLIMIT_SHM_SHADOW    1
#define NGX_HTTP_LLMLIMIT_SHM_TOKENS    2


static ngx_int_t ngx_http_llmlimit_shm_update(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t mode, ngx_uint_t tokens);
static ngx_int_t ngx_http_llmlimit_shm_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone);
static ngx_int_t ngx_http_llmlimit_shm_store_check(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static void ngx_http_llmlimit_shm_store_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static void ngx_http_llmlimit_shm_store_charge(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t tokens);
static void ngx_http_llmlimit_shm_key(ngx_http_llmlimit_counter_t *c,
    uint64_t k[2]);
static ngx_rbtree_node_t *ngx_http_llmlimit_shm_lookup(
    ngx_http_llmlimit_zone_t *zone, ngx_rbtree_key_t key, uint64_t key2);
static void ngx_http_llmlimit_shm_tree(ngx_http_llmlimit_zone_t *zone,
    uint64_t key2, ngx_rbtree_t *tree);
static ngx_rbtree_node_t *ngx_http_llmlimit_shm_alloc(
    ngx_http_llmlimit_zone_t *zone, ngx_rbtree_node_t **keep, ngx_uint_t n,
    time_t now, ngx_uint_t *evicted);
static void ngx_http_llmlimit_shm_free(ngx_http_llmlimit_zone_t *zone,
    ngx_rbtree_node_t *node);
static ngx_uint_t ngx_http_llmlimit_shm_expire(ngx_http_llmlimit_zone_t *zone,
    ngx_rbtree_node_t **keep, ngx_uint_t n, time_t now, ngx_uint_t scan);
static ngx_int_t ngx_http_llmlimit_shm_init(ngx_shm_zone_t *shm_zone,
    ngx_http_llmlimit_zone_t *zone);
static void ngx_http_llmlimit_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);


/* the store of a zone that no other store takes: registered last */

ngx_http_llmlimit_store_t  ngx_http_llmlimit_shm_store = {
    "shm",
    NGX_HTTP_LLMLIMIT_ALL_ALGORITHMS,
    NULL,
    ngx_http_llmlimit_shm_conf_done,
    ngx_http_llmlimit_shm_init_zone,
    NULL,
    NULL,
    ngx_http_llmlimit_shm_store_check,
    ngx_http_llmlimit_shm_store_refund,
    ngx_http_llmlimit_shm_store_charge,
    NULL,
    NULL
};


/*
 * CHECK: checks the counters of a batch and counts them all or none;
 * SHADOW: counts them unchecked and leaves their results alone; TOKENS:
 * charges the token budgets of the batch "tokens", less what they counted
 * on admission (at b->local_time), and leaves the other counters alone.
 */

static ngx_int_t
ngx_http_llmlimit_shm_update(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t mode, ngx_uint_t tokens)
{
    time_t                        sec;
    int64_t                       now, expires;
    uint64_t                      k[2];
    ngx_int_t                     rc;
    ngx_uint_t                    i, evicted, warn;
    ngx_rbtree_t                  tree;
    ngx_rbtree_node_t            *nodes[NGX_HTTP_LLMLIMIT_MAX_COUNTERS];
    ngx_http_llmlimit_zone_t     *zone;
    ngx_http_llmlimit_node_t     *ln;
    ngx_http_llmlimit_state_t     fresh[NGX_HTTP_LLMLIMIT_MAX_COUNTERS];
    ngx_http_llmlimit_state_t    *st[NGX_HTTP_LLMLIMIT_MAX_COUNTERS];
    ngx_http_llmlimit_counter_t  *c, copy;

    zone = b->zone;
    now = ngx_http_llmlimit_now();
    sec = (time_t) (now / 1000);

    if (mode == NGX_HTTP_LLMLIMIT_SHM_CHECK) {
        b->checked = now;
    }
    rc = NGX_OK;
    evicted = 0;
    warn = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    for (i = 0; i < b->n; i++) {
        c = &b->counters[i];

        if (mode == NGX_HTTP_LLMLIMIT_SHM_TOKENS && !c->tokens) {
            /* not looked up: only the token budgets change */
            nodes[i] = NULL;
            st[i] = NULL;
            continue;
        }

        ngx_http_llmlimit_shm_key(c, k);

        nodes[i] = ngx_http_llmlimit_shm_lookup(zone, (ngx_rbtree_key_t) k[0],
                                                k[1]);

        if (nodes[i] == NULL) {
            nodes[i] = ngx_http_llmlimit_shm_alloc(zone, nodes, i, sec,
                                                   &evicted);
            if (nodes[i] != NULL) {
                ln = ngx_http_llmlimit_node(nodes[i]);
                nodes[i]->key = (ngx_rbtree_key_t) k[0];
                ln->key2 = k[1];
                ln->expires = 0;
                ngx_memzero(&ln->state, sizeof(ngx_http_llmlimit_state_t));

                ngx_http_llmlimit_shm_tree(zone, k[1], &tree);
                ngx_rbtree_insert(&tree, nodes[i]);
                zone->sh->roots[k[1] & zone->sh->mask] = tree.root;

                ngx_queue_insert_head(&zone->sh->lru, &ln->queue);
            }
        }

        if (nodes[i] == NULL) {
            /* the zone cannot hold even this request's counters */
            ngx_memzero(&fresh[i], sizeof(ngx_http_llmlimit_state_t));
            st[i] = &fresh[i];

        } else {
            ln = ngx_http_llmlimit_node(nodes[i]);
            ngx_queue_remove(&ln->queue);
            ngx_queue_insert_head(&zone->sh->lru, &ln->queue);
            st[i] = &ln->state;
        }

        if (mode == NGX_HTTP_LLMLIMIT_SHM_CHECK
            && ngx_http_llmlimit_algo_check(st[i], c, now) != NGX_OK)
        {
            rc = NGX_BUSY;
        }
    }

    if (rc == NGX_BUSY) {
        /* what the counters that fit would report */

        for (i = 0; i < b->n; i++) {
            if (!b->counters[i].rejected) {
                ngx_http_llmlimit_algo_peek(st[i], &b->counters[i], now);
            }
        }
    }

    if (rc == NGX_OK) {
        if (mode != NGX_HTTP_LLMLIMIT_SHM_TOKENS) {
            b->local_time = now;
        }

        for (i = 0; i < b->n; i++) {
            c = &b->counters[i];

            if (st[i] == NULL) {
                continue;
            }

            if (mode != NGX_HTTP_LLMLIMIT_SHM_CHECK) {
                /* the results are another store's: count on a copy */
                copy = *c;
                c = &copy;
            }

            if (mode == NGX_HTTP_LLMLIMIT_SHM_TOKENS) {
                ngx_http_llmlimit_algo_charge(st[i], c, now,
                                              (int64_t) tokens,
                                              b->local_time);

            } else {
                ngx_http_llmlimit_algo_count(st[i], c, now);
            }

            if (mode == NGX_HTTP_LLMLIMIT_SHM_CHECK && zone->store->count) {
                ngx_http_llmlimit_shm_key(c, k);
                zone->store->count(zone, c, k, now,
                                   c->tokens ? (ngx_int_t) c->cost : 1);
            }

            if (nodes[i]) {
                expires = ngx_http_llmlimit_algo_expires(st[i], c);
                ln = ngx_http_llmlimit_node(nodes[i]);
                ln->expires = (uint32_t) ((expires + 999) / 1000);
            }
        }
    }

    if (evicted) {
        zone->sh->evicted += evicted;
        zone->sh->evictions += evicted;

        if (sec - zone->sh->warn_time >= NGX_HTTP_LLMLIMIT_WARN_PERIOD) {
            zone->sh->warn_time = sec;
            warn = zone->sh->evicted;
            zone->sh->evicted = 0;
        }
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (warn) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "llmlimit zone \"%V\" is full, evicted %ui least "
                      "recently used counters", &zone->name, warn);
    }

    for (i = 0; i < b->n; i++) {
        if (nodes[i] == NULL && st[i] != NULL) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "llmlimit zone \"%V\" could not allocate a counter",
                          &zone->name);
            break;
        }
    }

    return rc;
}


void
ngx_http_llmlimit_shm_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    uint64_t                      k[2];
    ngx_uint_t                    i;
    ngx_rbtree_node_t            *node;
    ngx_http_llmlimit_zone_t     *zone;
    ngx_http_llmlimit_counter_t  *c;

    zone = b->zone;

    ngx_shmtx_lock(&zone->shpool->mutex);

    for (i = 0; i < b->n; i++) {
        c = &b->counters[i];

        ngx_http_llmlimit_shm_key(c, k);

        node = ngx_http_llmlimit_shm_lookup(zone, (ngx_rbtree_key_t) k[0],
                                            k[1]);
        if (node != NULL) {
            ngx_http_llmlimit_algo_refund(&ngx_http_llmlimit_node(node)->state,
                                          c, b->local_time);
        }

        if (zone->store->count) {
            zone->store->count(zone, c, k, b->local_time,
                               c->tokens ? -(ngx_int_t) c->cost : -1);
        }
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


/*
 * Counts a request that another store admitted, without checking: the
 * shadow of a Redis zone, from which the local fallback goes on when Redis
 * is lost.  The counters' results, Redis', are left as they are.
 */

void
ngx_http_llmlimit_shm_charge(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    (void) ngx_http_llmlimit_shm_update(r, b, NGX_HTTP_LLMLIMIT_SHM_SHADOW, 0);
}


/*
 * Charges the token budgets of a batch counted here (a shared-memory zone,
 * the local fallback, or a Redis zone's shadow counters).
 */

void
ngx_http_llmlimit_shm_tokens(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t tokens)
{
    (void) ngx_http_llmlimit_shm_update(r, b, NGX_HTTP_LLMLIMIT_SHM_TOKENS,
                                        tokens);
}


/* the store interface: what was counted here is known to be taken back */

static ngx_int_t
ngx_http_llmlimit_shm_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone)
{
    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_shm_store_check(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    ngx_int_t  rc;

    rc = ngx_http_llmlimit_shm_update(r, b, NGX_HTTP_LLMLIMIT_SHM_CHECK, 0);

    if (rc == NGX_OK) {
        b->local = 1;
    }

    return rc;
}


static void
ngx_http_llmlimit_shm_store_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    if (b->local) {
        ngx_http_llmlimit_shm_refund(r, b);
        b->local = 0;
    }
}


static void
ngx_http_llmlimit_shm_store_charge(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t tokens)
{
    if (b->local) {
        ngx_http_llmlimit_shm_tokens(r, b, tokens);
    }
}


/* the state of a counter by its key, NULL if none; under the zone's lock */

ngx_http_llmlimit_state_t *
ngx_http_llmlimit_shm_state_locked(ngx_http_llmlimit_zone_t *zone,
    uint64_t k[2])
{
    ngx_rbtree_node_t  *node;

    node = ngx_http_llmlimit_shm_lookup(zone, (ngx_rbtree_key_t) k[0], k[1]);
    if (node == NULL) {
        return NULL;
    }

    return &ngx_http_llmlimit_node(node)->state;
}


/* one node per (budget, identity, period, algorithm, requests or tokens) */

static void
ngx_http_llmlimit_shm_key(ngx_http_llmlimit_counter_t *c, uint64_t k[2])
{
    uint64_t  mix;

    ngx_memcpy(k, c->hash, 2 * sizeof(uint64_t));

    mix = ((uint64_t) c->period << 3 | c->tokens << 2 | c->algorithm)
          * 0x9e3779b97f4a7c15ULL;

    k[0] ^= mix;
    k[1] ^= mix >> 17 | mix << 47;
}


static ngx_rbtree_node_t *
ngx_http_llmlimit_shm_lookup(ngx_http_llmlimit_zone_t *zone,
    ngx_rbtree_key_t key, uint64_t key2)
{
    ngx_rbtree_node_t         *node, *sentinel;
    ngx_http_llmlimit_node_t  *ln;

    node = zone->sh->roots[key2 & zone->sh->mask];
    sentinel = &zone->sh->sentinel;

    while (node != sentinel) {

        if (key < node->key) {
            node = node->left;
            continue;
        }

        if (key > node->key) {
            node = node->right;
            continue;
        }

        /* key == node->key */

        ln = ngx_http_llmlimit_node(node);

        if (key2 == ln->key2) {
            return node;
        }

        node = (key2 < ln->key2) ? node->left : node->right;
    }

    return NULL;
}


/* the tree that holds key2, as an ngx_rbtree_t to change it */

static void
ngx_http_llmlimit_shm_tree(ngx_http_llmlimit_zone_t *zone, uint64_t key2,
    ngx_rbtree_t *tree)
{
    tree->root = zone->sh->roots[key2 & zone->sh->mask];
    tree->sentinel = &zone->sh->sentinel;
    tree->insert = ngx_http_llmlimit_rbtree_insert_value;
}


/*
 * A node from the free list; else one of the first expired nodes at the
 * LRU tail; else a new slab page of nodes; else more expired nodes; else
 * the least recently used node.  The n nodes in keep[] belong to the
 * request at hand and are spared.
 *
 * Expired nodes are reclaimed here only, when a counter is created, not
 * on every request: the LRU tail is the coldest memory of the zone, and
 * reading it on every hit cost a cache miss each (see bench/README.md).
 */

static ngx_rbtree_node_t *
ngx_http_llmlimit_shm_alloc(ngx_http_llmlimit_zone_t *zone,
    ngx_rbtree_node_t **keep, ngx_uint_t n, time_t now, ngx_uint_t *evicted)
{
    u_char                    *p, *last;
    ngx_uint_t                 i, tries;
    ngx_queue_t               *q;
    ngx_rbtree_node_t         *node;
    ngx_http_llmlimit_node_t  *ln;

    for (tries = 0; /* void */ ; tries++) {

        if (!ngx_queue_empty(&zone->sh->free)) {
            q = ngx_queue_head(&zone->sh->free);
            ngx_queue_remove(q);
            zone->sh->nodes++;

            ln = ngx_queue_data(q, ngx_http_llmlimit_node_t, queue);
            return ngx_http_llmlimit_rbnode(ln);
        }

        switch (tries) {

        case 0:
            (void) ngx_http_llmlimit_shm_expire(zone, keep, n, now, 2);
            break;

        case 1:
            p = ngx_slab_alloc_locked(zone->shpool, ngx_pagesize);
            if (p == NULL) {
                break;
            }

            last = p + ngx_pagesize - NGX_HTTP_LLMLIMIT_NODE_SIZE;

            for ( /* void */ ; p <= last; p += NGX_HTTP_LLMLIMIT_NODE_SIZE) {
                node = (ngx_rbtree_node_t *) p;
                ln = ngx_http_llmlimit_node(node);
                ngx_queue_insert_tail(&zone->sh->free, &ln->queue);
            }

            break;

        case 2:
            (void) ngx_http_llmlimit_shm_expire(zone, keep, n, now,
                                                NGX_HTTP_LLMLIMIT_EXPIRE_SCAN);
            break;

        case 3:

            /* evict the least recently used node not of this request */

            for (q = ngx_queue_last(&zone->sh->lru);
                 q != ngx_queue_sentinel(&zone->sh->lru);
                 q = ngx_queue_prev(q))
            {
                ln = ngx_queue_data(q, ngx_http_llmlimit_node_t, queue);
                node = ngx_http_llmlimit_rbnode(ln);

                for (i = 0; i < n; i++) {
                    if (keep[i] == node) {
                        break;
                    }
                }

                if (i == n) {
                    ngx_http_llmlimit_shm_free(zone, node);
                    (*evicted)++;
                    break;
                }
            }

            break;

        default:
            return NULL;
        }
    }

    return NULL;
}


static void
ngx_http_llmlimit_shm_free(ngx_http_llmlimit_zone_t *zone,
    ngx_rbtree_node_t *node)
{
    ngx_rbtree_t               tree;
    ngx_http_llmlimit_node_t  *ln;

    ln = ngx_http_llmlimit_node(node);

    ngx_queue_remove(&ln->queue);

    ngx_http_llmlimit_shm_tree(zone, ln->key2, &tree);
    ngx_rbtree_delete(&tree, node);
    zone->sh->roots[ln->key2 & zone->sh->mask] = tree.root;
    ngx_queue_insert_head(&zone->sh->free, &ln->queue);
    zone->sh->nodes--;
}


/*
 * Frees up to "scan" expired nodes from the LRU tail, stopping at one of
 * the n nodes in keep[].
 */

static ngx_uint_t
ngx_http_llmlimit_shm_expire(ngx_http_llmlimit_zone_t *zone,
    ngx_rbtree_node_t **keep, ngx_uint_t n, time_t now, ngx_uint_t scan)
{
    ngx_uint_t                 i, freed;
    ngx_queue_t               *q;
    ngx_rbtree_node_t         *node;
    ngx_http_llmlimit_node_t  *ln;

    freed = 0;

    while (scan-- && !ngx_queue_empty(&zone->sh->lru)) {
        q = ngx_queue_last(&zone->sh->lru);
        ln = ngx_queue_data(q, ngx_http_llmlimit_node_t, queue);

        if ((time_t) ln->expires > now) {
            break;
        }

        node = ngx_http_llmlimit_rbnode(ln);

        for (i = 0; i < n; i++) {
            if (keep[i] == node) {
                return freed;
            }
        }

        ngx_http_llmlimit_shm_free(zone, node);
        freed++;
    }

    return freed;
}


static void
ngx_http_llmlimit_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t         **p;
    ngx_http_llmlimit_node_t   *ln, *lnt;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else { /* node->key == temp->key */

            ln = ngx_http_llmlimit_node(node);
            lnt = ngx_http_llmlimit_node(temp);

            p = (ln->key2 < lnt->key2) ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


ngx_int_t
ngx_http_llmlimit_shm_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_llmlimit_zone_t  *ozone = data;

    ngx_http_llmlimit_zone_t  *zone;

    zone = shm_zone->data;
    zone->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (ozone) {
        zone->sh = ozone->sh;
        return NGX_OK;
    }

    if (shm_zone->shm.exists) {
        zone->sh = zone->shpool->data;
        return NGX_OK;
    }

    return ngx_http_llmlimit_shm_init(shm_zone, zone);
}


static ngx_int_t
ngx_http_llmlimit_shm_init(ngx_shm_zone_t *shm_zone,
    ngx_http_llmlimit_zone_t *zone)
{
    size_t                      len;
    ngx_uint_t                  i, n;
    ngx_http_llmlimit_shctx_t  *sh;

    sh = ngx_slab_alloc(zone->shpool, sizeof(ngx_http_llmlimit_shctx_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    zone->sh = sh;
    zone->shpool->data = sh;

    /* a tree for about every eight counters the zone can hold */

    len = shm_zone->shm.size / NGX_HTTP_LLMLIMIT_NODE_SIZE / 8;

    for (n = 1; n * 2 <= len; n *= 2) { /* void */ }

    sh->roots = ngx_slab_alloc(zone->shpool, n * sizeof(ngx_rbtree_node_t *));
    if (sh->roots == NULL) {
        return NGX_ERROR;
    }

    ngx_rbtree_sentinel_init(&sh->sentinel);

    for (i = 0; i < n; i++) {
        sh->roots[i] = &sh->sentinel;
    }

    sh->mask = n - 1;

    ngx_queue_init(&sh->lru);
    ngx_queue_init(&sh->free);
    sh->nodes = 0;
    sh->evicted = 0;
    sh->evictions = 0;
    sh->warn_time = 0;
    sh->store = NULL;

    len = sizeof(" in llmlimit zone \"\"") + shm_zone->shm.name.len;

    zone->shpool->log_ctx = ngx_slab_alloc(zone->shpool, len);
    if (zone->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(zone->shpool->log_ctx, " in llmlimit zone \"%V\"%Z",
                &shm_zone->shm.name);

    zone->shpool->log_nomem = 0;

    return NGX_OK;
}
