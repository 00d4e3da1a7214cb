
/*
 * Copyright (C) llmlimit developers
 */


/*
 * Usage accounting: llmlimit_usage_zone, llmlimit_usage and the recording
 * of every request in the log phase.
 *
 * A usage zone holds groups, the strings of one (workspace, project, user,
 * api_key) interned once, and buckets, the counters of a group in one hour
 * (or bucket=).  Recording a request evaluates the group's variables,
 * hashes them, and under the zone's lock finds the group in an rbtree and
 * bumps the counters of its latest bucket: nothing is formatted or
 * allocated unless the group or its bucket is new.  A request counts in
 * the bucket of the time it is logged, so that only the buckets of the
 * current hour ever change.
 *
 * When the zone is full the oldest buckets go first (a group goes with its
 * last bucket), with a warning at most once a minute; buckets older than
 * retention= go as new ones are made.
 */


#include "ngx_http_llmlimit_usage.h"


#define NGX_HTTP_LLMLIMIT_USAGE_WARN     60
#define NGX_HTTP_LLMLIMIT_USAGE_EVICT    64
#define NGX_HTTP_LLMLIMIT_USAGE_EXPIRE   4


typedef struct {
    ngx_array_t                      zones;    /* usage_zone_t * */
} ngx_http_llmlimit_usage_main_conf_t;


/* the group of a request: its values and their hash, on the stack */
typedef struct {
    ngx_str_t                        fields[NGX_HTTP_LLMLIMIT_USAGE_NFIELDS];
    uint64_t                         hash[2];
} ngx_http_llmlimit_usage_key_t;


/*
 * A request's context, only for tokens charged before it is recorded;
 * once recorded, it is ngx_http_llmlimit_usage_recorded.
 */
typedef struct {
    uint64_t                         tokens;
} ngx_http_llmlimit_usage_ctx_t;


static ngx_int_t ngx_http_llmlimit_usage_log_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llmlimit_usage_fields(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_loc_conf_t *ulcf,
    ngx_http_llmlimit_usage_key_t *key);
static void ngx_http_llmlimit_usage_record(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_key_t *key, time_t now, ngx_uint_t requests,
    ngx_uint_t rejected, uint64_t tokens);
static ngx_http_llmlimit_usage_group_t *ngx_http_llmlimit_usage_group(
    ngx_http_llmlimit_usage_zone_t *uz, uint64_t hash[2], ngx_str_t *fields,
    ngx_uint_t *evicted);
static ngx_http_llmlimit_usage_bucket_t *ngx_http_llmlimit_usage_bucket(
    ngx_http_llmlimit_usage_zone_t *uz, ngx_http_llmlimit_usage_group_t *g,
    time_t start, time_t now, ngx_uint_t *evicted);
static void *ngx_http_llmlimit_usage_alloc(ngx_http_llmlimit_usage_zone_t *uz,
    size_t size, ngx_http_llmlimit_usage_group_t *keep, ngx_uint_t *evicted);
static void ngx_http_llmlimit_usage_free(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_bucket_t *b, ngx_http_llmlimit_usage_group_t *keep);
static void ngx_http_llmlimit_usage_tree(ngx_http_llmlimit_usage_sh_t *sh,
    ngx_rbtree_t *tree);
static void ngx_http_llmlimit_usage_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
static ngx_int_t ngx_http_llmlimit_usage_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);

static void *ngx_http_llmlimit_usage_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_llmlimit_usage_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llmlimit_usage_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_http_llmlimit_usage_zone_t *ngx_http_llmlimit_usage_get_zone(
    ngx_conf_t *cf, ngx_str_t *name);
static char *ngx_http_llmlimit_usage_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_usage(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_usage_api(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_usage_field(ngx_conf_t *cf,
    ngx_http_llmlimit_usage_field_t *field, ngx_str_t *value);
static ngx_int_t ngx_http_llmlimit_usage_postconf(ngx_conf_t *cf);
static ngx_int_t ngx_http_llmlimit_usage_init_process(ngx_cycle_t *cycle);
static void ngx_http_llmlimit_usage_exit_process(ngx_cycle_t *cycle);


static ngx_command_t  ngx_http_llmlimit_usage_commands[] = {

    { ngx_string("llmlimit_usage_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_llmlimit_usage_zone,
      0,
      0,
      NULL },

    { ngx_string("llmlimit_usage"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_llmlimit_usage,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("llmlimit_usage_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmlimit_usage_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llmlimit_usage_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_llmlimit_usage_postconf,          /* postconfiguration */

    ngx_http_llmlimit_usage_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_llmlimit_usage_create_loc_conf, /* create location configuration */
    ngx_http_llmlimit_usage_merge_loc_conf  /* merge location configuration */
};


ngx_module_t  ngx_http_llmlimit_usage_module = {
    NGX_MODULE_V1,
    &ngx_http_llmlimit_usage_module_ctx,   /* module context */
    ngx_http_llmlimit_usage_commands,      /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_llmlimit_usage_init_process,  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_llmlimit_usage_exit_process,  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * the key directory's variables, in the order of its fields
 * (ngx_http_llmlimit_keys_request_fields())
 */
static ngx_str_t  ngx_http_llmlimit_usage_keys[] = {
    ngx_string("$llmlimit_key_plan"),
    ngx_string("$llmlimit_key_org"),
    ngx_string("$llmlimit_key_workspace"),
    ngx_string("$llmlimit_key_workspace_name"),
    ngx_string("$llmlimit_key_project"),
    ngx_string("$llmlimit_key_project_name"),
    ngx_string("$llmlimit_key_user"),
    ngx_string("$llmlimit_key_user_email"),
    ngx_string("$llmlimit_key_short")
};


/* the context of a request that is recorded */
static ngx_http_llmlimit_usage_ctx_t  ngx_http_llmlimit_usage_recorded;


/* the defaults of llmlimit_usage's fields: the key directory's */
static ngx_str_t  ngx_http_llmlimit_usage_names[] = {
    ngx_string("workspace="),
    ngx_string("workspace_name="),
    ngx_string("project="),
    ngx_string("project_name="),
    ngx_string("user="),
    ngx_string("user_email="),
    ngx_string("api_key=")
};


static ngx_str_t  ngx_http_llmlimit_usage_defaults[] = {
    ngx_string("$llmlimit_key_workspace"),
    ngx_string("$llmlimit_key_workspace_name"),
    ngx_string("$llmlimit_key_project"),
    ngx_string("$llmlimit_key_project_name"),
    ngx_string("$llmlimit_key_user"),
    ngx_string("$llmlimit_key_user_email"),
    ngx_string("$llmlimit_key_short")
};


/*
 * The outcome is the limiter's: REJECTED counts in "rejected", and so does
 * ERROR when the limiter answered the request itself (503 of
 * redis_failure=closed, 500); everything else was served and counts in
 * "requests": PASSED, REJECTED_DRY_RUN (dry run lets it through),
 * BYPASSED and no llmlimit at all, ERROR of redis_failure=open.
 */

static ngx_int_t
ngx_http_llmlimit_usage_log_handler(ngx_http_request_t *r)
{
    int64_t                              now;
    uint64_t                             tokens;
    ngx_uint_t                           rejected;
    ngx_http_llmlimit_ctx_t             *lctx;
    ngx_http_llmlimit_usage_key_t        key;
    ngx_http_llmlimit_usage_ctx_t       *ctx;
    ngx_http_llmlimit_usage_loc_conf_t  *ulcf;

    ulcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_usage_module);

    if (ulcf->zone == NULL || r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmlimit_usage_module);

    if (ctx == &ngx_http_llmlimit_usage_recorded) {
        return NGX_OK;
    }

    tokens = ctx ? ctx->tokens : 0;

    ngx_http_set_ctx(r, &ngx_http_llmlimit_usage_recorded,
                     ngx_http_llmlimit_usage_module);

    if (ngx_http_llmlimit_usage_fields(r, ulcf, &key) != NGX_OK) {
        return NGX_ERROR;
    }

    rejected = 0;
    lctx = ngx_http_get_module_ctx(r, ngx_http_llmlimit_module);

    if (lctx) {
        switch (lctx->status) {

        case NGX_HTTP_LLMLIMIT_REJECTED:
            rejected = 1;
            break;

        case NGX_HTTP_LLMLIMIT_ERROR:
            rejected = (r->headers_out.status
                            == NGX_HTTP_SERVICE_UNAVAILABLE
                        || r->headers_out.status
                            == NGX_HTTP_INTERNAL_SERVER_ERROR);
            break;

        default:
            break;
        }
    }

    /*
     * in the bucket of the time the limits were checked at (the windows
     * they counted in), else of now; never the worker's cached time,
     * which timer_resolution leaves up to its value behind
     */

    now = (lctx && lctx->checked) ? lctx->checked : ngx_http_llmlimit_now();

    ngx_http_llmlimit_usage_record(ulcf->zone, &key, (time_t) (now / 1000),
                                   !rejected, rejected, tokens);

    return NGX_OK;
}


/*
 * Tokens a request used, for the token budgets: before the log phase they
 * wait in the request's context, after it they go to the current bucket of
 * the request's group.
 */

ngx_int_t
ngx_http_llmlimit_usage_add_tokens(ngx_http_request_t *r, uint64_t tokens)
{
    ngx_http_llmlimit_usage_key_t        key;
    ngx_http_llmlimit_usage_ctx_t       *ctx;
    ngx_http_llmlimit_usage_loc_conf_t  *ulcf;

    r = r->main;

    ulcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_usage_module);

    if (ulcf->zone == NULL || tokens == 0) {
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmlimit_usage_module);

    if (ctx == &ngx_http_llmlimit_usage_recorded) {
        if (ngx_http_llmlimit_usage_fields(r, ulcf, &key) != NGX_OK) {
            return NGX_ERROR;
        }

        ngx_http_llmlimit_usage_record(ulcf->zone, &key,
                                       (time_t) (ngx_http_llmlimit_now()
                                                 / 1000),
                                       0, 0, tokens);
        return NGX_OK;
    }

    if (ctx == NULL) {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_llmlimit_usage_ctx_t));
        if (ctx == NULL) {
            return NGX_ERROR;
        }

        ngx_http_set_ctx(r, ctx, ngx_http_llmlimit_usage_module);
    }

    ctx->tokens += tokens;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_usage_fields(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_loc_conf_t *ulcf,
    ngx_http_llmlimit_usage_key_t *key)
{
    uint64_t                          seed[2];
    ngx_str_t                        *s, *kf;
    ngx_uint_t                        i;
    ngx_http_variable_value_t        *vv;
    ngx_http_llmlimit_usage_field_t  *f;

    seed[0] = 0x75736167655f6731ULL;  /* "usage_g1" */
    seed[1] = 0;
    kf = NULL;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; i++) {
        f = &ulcf->fields[i];
        s = &key->fields[i];

        if (f->key != NGX_ERROR) {

            /* the directory's fields, one lookup for all */

            if (kf == NULL) {
                kf = ngx_http_llmlimit_keys_request_fields(r);
                if (kf == NULL) {
                    return NGX_ERROR;
                }
            }

            *s = kf[f->key];

        } else if (f->index != NGX_ERROR) {
            vv = ngx_http_get_indexed_variable(r, f->index);

            if (vv == NULL || vv->not_found) {
                ngx_str_null(s);

            } else {
                s->len = vv->len;
                s->data = vv->data;
            }

        } else if (ngx_http_complex_value(r, f->cv, s) != NGX_OK) {
            return NGX_ERROR;
        }

        if (s->len > NGX_HTTP_LLMLIMIT_USAGE_FIELD_MAX) {
            s->len = NGX_HTTP_LLMLIMIT_USAGE_FIELD_MAX;

        } else if (s->len == 0) {
            s->data = (u_char *) "";
        }

        ngx_http_llmlimit_hash(seed, s->data, s->len, key->hash);

        seed[0] = key->hash[0];
        seed[1] = key->hash[1];
    }

    return NGX_OK;
}


static void
ngx_http_llmlimit_usage_record(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_key_t *key, time_t now, ngx_uint_t requests,
    ngx_uint_t rejected, uint64_t tokens)
{
    time_t                             start, since;
    ngx_uint_t                         evicted, warn, nbuckets, ngroups;
    ngx_http_llmlimit_usage_group_t   *g;
    ngx_http_llmlimit_usage_bucket_t  *b, *b0;

    start = now - now % uz->bucket;
    evicted = 0;
    warn = 0;
    b = NULL;
    nbuckets = 0;
    ngroups = 0;
    since = now;

    ngx_shmtx_lock(&uz->shpool->mutex);

    g = ngx_http_llmlimit_usage_group(uz, key->hash, key->fields, &evicted);

    if (g) {
        b = g->cur;

        if (b == NULL || b->start != (uint32_t) start) {
            b = ngx_http_llmlimit_usage_bucket(uz, g, start, now, &evicted);
        }

        if (b) {
            b->requests += requests;
            b->rejected += rejected;
            b->tokens += tokens;
            b->d_requests += requests;
            b->d_rejected += rejected;
            b->d_tokens += tokens;
        }
    }

    if ((evicted || b == NULL)
        && now - uz->sh->warn_time >= NGX_HTTP_LLMLIMIT_USAGE_WARN)
    {
        uz->sh->warn_time = now;
        warn = 1;
        nbuckets = uz->sh->nbuckets;
        ngroups = uz->sh->ngroups;

        if (!ngx_queue_empty(&uz->sh->buckets)) {
            b0 = ngx_queue_data(ngx_queue_head(&uz->sh->buckets),
                                ngx_http_llmlimit_usage_bucket_t, queue);
            since = b0->start;
        }
    }

    ngx_shmtx_unlock(&uz->shpool->mutex);

    if (!warn) {
        return;
    }

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                  "llmlimit usage zone \"%V\" is full, %s; "
                  "%ui buckets of %ui groups held, the oldest %T s old",
                  &uz->name,
                  b ? "the oldest buckets are evicted"
                    : "a request was not recorded",
                  nbuckets, ngroups, now - since);
}


static ngx_http_llmlimit_usage_group_t *
ngx_http_llmlimit_usage_group(ngx_http_llmlimit_usage_zone_t *uz,
    uint64_t hash[2], ngx_str_t *fields, ngx_uint_t *evicted)
{
    u_char                           *p;
    size_t                            len;
    ngx_uint_t                        i;
    ngx_rbtree_t                      tree;
    ngx_rbtree_key_t                  key;
    ngx_rbtree_node_t                *node, *sentinel;
    ngx_http_llmlimit_usage_group_t  *g;

    key = (ngx_rbtree_key_t) hash[0];
    node = uz->sh->root;
    sentinel = &uz->sh->sentinel;

    while (node != sentinel) {

        if (key != node->key) {
            node = (key < node->key) ? node->left : node->right;
            continue;
        }

        g = (ngx_http_llmlimit_usage_group_t *) node;

        if (hash[1] == g->hash2) {
            return g;
        }

        node = (hash[1] < g->hash2) ? node->left : node->right;
    }

    len = 0;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; i++) {
        len += fields[i].len;
    }

    g = ngx_http_llmlimit_usage_alloc(uz,
                          offsetof(ngx_http_llmlimit_usage_group_t, data) + len,
                          NULL, evicted);
    if (g == NULL) {
        return NULL;
    }

    g->node.key = key;
    g->hash2 = hash[1];
    g->cur = NULL;
    g->nbuckets = 0;

    p = g->data;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; i++) {
        g->len[i] = (uint16_t) fields[i].len;

        if (i % 2 == 0) {
            g->fhash[i / 2] = ngx_http_llmlimit_usage_hash(fields[i].data,
                                                           fields[i].len);
        }

        p = ngx_cpymem(p, fields[i].data, fields[i].len);
    }

    ngx_http_llmlimit_usage_tree(uz->sh, &tree);
    ngx_rbtree_insert(&tree, &g->node);
    uz->sh->root = tree.root;
    uz->sh->ngroups++;

    return g;
}


static ngx_http_llmlimit_usage_bucket_t *
ngx_http_llmlimit_usage_bucket(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_group_t *g, time_t start, time_t now,
    ngx_uint_t *evicted)
{
    ngx_uint_t                         i;
    ngx_queue_t                       *q;
    ngx_http_llmlimit_usage_bucket_t  *b, *ob;

    /* what retention= no longer keeps goes first */

    for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_EXPIRE; i++) {

        if (ngx_queue_empty(&uz->sh->buckets)) {
            break;
        }

        q = ngx_queue_head(&uz->sh->buckets);
        b = ngx_queue_data(q, ngx_http_llmlimit_usage_bucket_t, queue);

        if ((time_t) b->start + uz->bucket > now - uz->retention) {
            break;
        }

        ngx_http_llmlimit_usage_free(uz, b, g);
    }

    b = ngx_http_llmlimit_usage_alloc(uz,
                                      sizeof(ngx_http_llmlimit_usage_bucket_t),
                                      g, evicted);
    if (b == NULL) {
        return NULL;
    }

    ngx_memzero(b, sizeof(ngx_http_llmlimit_usage_bucket_t));

    b->group = g;
    b->start = (uint32_t) start;

    /*
     * in the order of start: at the end but for a worker whose time lags
     * at a boundary, or deltas given back
     */

    for (q = ngx_queue_last(&uz->sh->buckets);
         q != ngx_queue_sentinel(&uz->sh->buckets);
         q = ngx_queue_prev(q))
    {
        ob = ngx_queue_data(q, ngx_http_llmlimit_usage_bucket_t, queue);

        if (ob->start <= b->start) {
            break;
        }
    }

    ngx_queue_insert_after(q, &b->queue);
    uz->sh->nbuckets++;
    g->nbuckets++;

    if (g->cur == NULL || g->cur->start < b->start) {
        g->cur = b;
    }

    return b;
}


/* allocates in the zone, evicting the oldest buckets to make room */

static void *
ngx_http_llmlimit_usage_alloc(ngx_http_llmlimit_usage_zone_t *uz, size_t size,
    ngx_http_llmlimit_usage_group_t *keep, ngx_uint_t *evicted)
{
    void                              *p;
    ngx_uint_t                         i;
    ngx_queue_t                       *q;
    ngx_http_llmlimit_usage_bucket_t  *b;

    for (i = 0; /* void */ ; i++) {

        p = ngx_slab_alloc_locked(uz->shpool, size);

        if (p || i == NGX_HTTP_LLMLIMIT_USAGE_EVICT
            || ngx_queue_empty(&uz->sh->buckets))
        {
            return p;
        }

        q = ngx_queue_head(&uz->sh->buckets);
        b = ngx_queue_data(q, ngx_http_llmlimit_usage_bucket_t, queue);

        ngx_http_llmlimit_usage_free(uz, b, keep);

        uz->sh->evicted++;
        (*evicted)++;
    }
}


static void
ngx_http_llmlimit_usage_free(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_bucket_t *b, ngx_http_llmlimit_usage_group_t *keep)
{
    ngx_rbtree_t                      tree;
    ngx_http_llmlimit_usage_group_t  *g;

    g = b->group;

    if (b->d_requests || b->d_rejected || b->d_tokens) {
        uz->sh->lost++;
    }

    ngx_queue_remove(&b->queue);
    uz->sh->nbuckets--;

    if (g->cur == b) {
        g->cur = NULL;
    }

    ngx_slab_free_locked(uz->shpool, b);

    if (--g->nbuckets || g == keep) {
        return;
    }

    ngx_http_llmlimit_usage_tree(uz->sh, &tree);
    ngx_rbtree_delete(&tree, &g->node);
    uz->sh->root = tree.root;
    uz->sh->ngroups--;

    ngx_slab_free_locked(uz->shpool, g);
}


/*
 * Only the root lives in shared memory: the tree, with its insert function
 * whose address a reload may change, is made up for every change.
 */

static void
ngx_http_llmlimit_usage_tree(ngx_http_llmlimit_usage_sh_t *sh,
    ngx_rbtree_t *tree)
{
    tree->root = sh->root;
    tree->sentinel = &sh->sentinel;
    tree->insert = ngx_http_llmlimit_usage_insert;
}


static void
ngx_http_llmlimit_usage_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t               **p;
    ngx_http_llmlimit_usage_group_t  *g, *t;

    g = (ngx_http_llmlimit_usage_group_t *) node;

    for ( ;; ) {
        t = (ngx_http_llmlimit_usage_group_t *) temp;

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            p = (g->hash2 < t->hash2) ? &temp->left : &temp->right;
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


/*
 * Takes what the buckets have not flushed to Redis, up to "max" buckets,
 * into "deltas" (strings copied to its pool).  Only the buckets of the
 * current time change, so the walk goes from the newest back to a bucket
 * before the time all older ones were taken ("flushed"), which moves on
 * when everything was taken.  NGX_AGAIN: more is left.
 */

ngx_int_t
ngx_http_llmlimit_usage_take(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_array_t *deltas, ngx_uint_t max)
{
    u_char                            *p, *d;
    size_t                             len;
    time_t                             now;
    ngx_int_t                          rc;
    ngx_uint_t                         i;
    ngx_queue_t                       *q;
    ngx_http_llmlimit_usage_delta_t   *dl;
    ngx_http_llmlimit_usage_group_t   *g;
    ngx_http_llmlimit_usage_bucket_t  *b;

    now = ngx_time();
    rc = NGX_OK;

    ngx_shmtx_lock(&uz->shpool->mutex);

    for (q = ngx_queue_last(&uz->sh->buckets);
         q != ngx_queue_sentinel(&uz->sh->buckets);
         q = ngx_queue_prev(q))
    {
        b = ngx_queue_data(q, ngx_http_llmlimit_usage_bucket_t, queue);

        if ((time_t) b->start < uz->sh->flushed - 2 * uz->bucket) {
            break;
        }

        if (b->d_requests == 0 && b->d_rejected == 0 && b->d_tokens == 0) {
            continue;
        }

        if (deltas->nelts == max) {
            rc = NGX_AGAIN;
            break;
        }

        dl = ngx_array_push(deltas);
        if (dl == NULL) {
            rc = NGX_ERROR;
            break;
        }

        g = b->group;

        dl->hash[0] = (uint64_t) g->node.key;
        dl->hash[1] = g->hash2;
        dl->start = b->start;
        dl->requests = b->d_requests;
        dl->rejected = b->d_rejected;
        dl->tokens = b->d_tokens;
        dl->first = !b->taken;

        len = 0;

        for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; i++) {
            len += g->len[i];
        }

        d = ngx_pnalloc(deltas->pool, len + 1);
        if (d == NULL) {
            rc = NGX_ERROR;
            break;
        }

        p = g->data;

        for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; i++) {
            dl->fields[i].data = d;
            dl->fields[i].len = g->len[i];
            d = ngx_cpymem(d, p, g->len[i]);
            p += g->len[i];
        }

        b->d_requests = 0;
        b->d_rejected = 0;
        b->d_tokens = 0;
        b->taken = 1;
    }

    if (rc == NGX_OK) {
        uz->sh->flushed = now - now % uz->bucket - uz->bucket;
    }

    ngx_shmtx_unlock(&uz->shpool->mutex);

    return rc;
}


/* deltas that will not reach Redis from here: back to the zone */

void
ngx_http_llmlimit_usage_give_back(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_array_t *deltas)
{
    time_t                             now;
    ngx_uint_t                         i, evicted;
    ngx_http_llmlimit_usage_delta_t   *dl;
    ngx_http_llmlimit_usage_group_t   *g;
    ngx_http_llmlimit_usage_bucket_t  *b;

    now = ngx_time();
    dl = deltas->elts;
    evicted = 0;

    ngx_shmtx_lock(&uz->shpool->mutex);

    for (i = 0; i < deltas->nelts; i++) {
        g = ngx_http_llmlimit_usage_group(uz, dl[i].hash, dl[i].fields,
                                          &evicted);
        if (g == NULL) {
            continue;
        }

        b = g->cur;

        if (b == NULL || b->start != (uint32_t) dl[i].start) {
            b = ngx_http_llmlimit_usage_bucket(uz, g, dl[i].start, now,
                                               &evicted);
            if (b == NULL) {
                continue;
            }
        }

        b->d_requests += dl[i].requests;
        b->d_rejected += dl[i].rejected;
        b->d_tokens += dl[i].tokens;

        if (uz->sh->flushed > dl[i].start) {
            uz->sh->flushed = dl[i].start;
        }
    }

    ngx_shmtx_unlock(&uz->shpool->mutex);
}


/*
 * Adds the zone's buckets of the query's range to its rows: the totals, or
 * with "deltas" what is not flushed to Redis yet.  The queue is in the
 * order of the buckets' start give or take a bucket, so the walk goes
 * from the newest and stops two buckets before the range.
 */

ngx_int_t
ngx_http_llmlimit_usage_collect(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_query_t *q, ngx_uint_t deltas)
{
    u_char                            *p;
    time_t                             lo;
    uint32_t                           wh;
    uint64_t                           req, rej, tok;
    ngx_int_t                          rc;
    ngx_str_t                          ws, id, name;
    ngx_uint_t                         i, f;
    ngx_queue_t                       *qu;
    ngx_http_llmlimit_usage_group_t   *g;
    ngx_http_llmlimit_usage_bucket_t  *b;

    lo = (time_t) (q->start / 1000);

    if (lo < q->kept) {
        lo = q->kept;
    }

    lo -= 2 * uz->bucket;
    f = 2 * q->group_by;
    rc = NGX_OK;

    ngx_shmtx_lock(&uz->shpool->mutex);

    for (qu = ngx_queue_last(&uz->sh->buckets);
         qu != ngx_queue_sentinel(&uz->sh->buckets);
         qu = ngx_queue_prev(qu))
    {
        b = ngx_queue_data(qu, ngx_http_llmlimit_usage_bucket_t, queue);

        if ((time_t) b->start < lo) {
            break;
        }

        if ((time_t) b->start < q->kept
            || (int64_t) b->start * 1000 >= q->end
            || ((int64_t) b->start + uz->bucket) * 1000 <= q->start)
        {
            continue;
        }

        if (deltas) {
            req = b->d_requests;
            rej = b->d_rejected;
            tok = b->d_tokens;

        } else {
            req = b->requests;
            rej = b->rejected;
            tok = b->tokens;
        }

        if (req == 0 && rej == 0 && tok == 0) {
            continue;
        }

        g = b->group;
        p = g->data;

        ws.len = g->len[NGX_HTTP_LLMLIMIT_USAGE_WORKSPACE];
        ws.data = p;

        for (i = 0; i < f; i++) {
            p += g->len[i];
        }

        id.len = g->len[f];
        id.data = p;

        if (f + 1 < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS) {
            name.len = g->len[f + 1];
            name.data = p + id.len;

        } else {
            ngx_str_null(&name);
        }

        wh = g->fhash[NGX_HTTP_LLMLIMIT_USAGE_BY_WORKSPACE];

        rc = ngx_http_llmlimit_usage_add(q, (time_t) b->start, &ws, wh, &id,
                                         g->fhash[q->group_by], &name,
                                         req, rej, tok);
        if (rc != NGX_OK) {
            break;
        }
    }

    ngx_shmtx_unlock(&uz->shpool->mutex);

    return rc;
}


static ngx_int_t
ngx_http_llmlimit_usage_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_llmlimit_usage_zone_t  *ouz = data;

    size_t                           len;
    ngx_http_llmlimit_usage_sh_t    *sh;
    ngx_http_llmlimit_usage_zone_t  *uz;

    uz = shm_zone->data;
    uz->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (ouz) {
        uz->sh = ouz->sh;
        return NGX_OK;
    }

    if (shm_zone->shm.exists) {
        uz->sh = uz->shpool->data;
        return NGX_OK;
    }

    sh = ngx_slab_calloc(uz->shpool, sizeof(ngx_http_llmlimit_usage_sh_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    uz->sh = sh;
    uz->shpool->data = sh;

    ngx_rbtree_sentinel_init(&sh->sentinel);
    sh->root = &sh->sentinel;
    ngx_queue_init(&sh->buckets);

    len = sizeof(" in llmlimit usage zone \"\"") + shm_zone->shm.name.len;

    uz->shpool->log_ctx = ngx_slab_alloc(uz->shpool, len);
    if (uz->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(uz->shpool->log_ctx, " in llmlimit usage zone \"%V\"%Z",
                &shm_zone->shm.name);

    /* a full zone evicts, and says so itself */
    uz->shpool->log_nomem = 0;

    return NGX_OK;
}


static void *
ngx_http_llmlimit_usage_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_usage_main_conf_t  *umcf;

    umcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_usage_main_conf_t));
    if (umcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&umcf->zones, cf->pool, 4,
                       sizeof(ngx_http_llmlimit_usage_zone_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return umcf;
}


static void *
ngx_http_llmlimit_usage_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_usage_loc_conf_t  *ulcf;

    ulcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_usage_loc_conf_t));
    if (ulcf == NULL) {
        return NULL;
    }

    ulcf->zone = NGX_CONF_UNSET_PTR;
    ulcf->api = NGX_CONF_UNSET_PTR;

    return ulcf;
}


static char *
ngx_http_llmlimit_usage_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_llmlimit_usage_loc_conf_t  *prev = parent;
    ngx_http_llmlimit_usage_loc_conf_t  *conf = child;

    if (conf->zone == NGX_CONF_UNSET_PTR) {
        conf->zone = (prev->zone == NGX_CONF_UNSET_PTR) ? NULL : prev->zone;
        ngx_memcpy(conf->fields, prev->fields, sizeof(conf->fields));
    }

    ngx_conf_merge_ptr_value(conf->api, prev->api, NULL);

    return NGX_CONF_OK;
}


static ngx_http_llmlimit_usage_zone_t *
ngx_http_llmlimit_usage_get_zone(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_uint_t                             i;
    ngx_http_llmlimit_usage_zone_t       **zones, *uz;
    ngx_http_llmlimit_usage_main_conf_t   *umcf;

    umcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_llmlimit_usage_module);

    zones = umcf->zones.elts;

    for (i = 0; i < umcf->zones.nelts; i++) {
        if (zones[i]->name.len == name->len
            && ngx_strncmp(zones[i]->name.data, name->data, name->len) == 0)
        {
            return zones[i];
        }
    }

    uz = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_usage_zone_t));
    if (uz == NULL) {
        return NULL;
    }

    uz->name = *name;
    uz->file = cf->conf_file->file.name;
    uz->line = cf->conf_file->line;

    zones = ngx_array_push(&umcf->zones);
    if (zones == NULL) {
        return NULL;
    }

    *zones = uz;

    return uz;
}


static char *
ngx_http_llmlimit_usage_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ssize_t                          size;
    ngx_str_t                       *value, s;
    ngx_int_t                        n;
    ngx_uint_t                       i;
    ngx_http_llmlimit_usage_zone_t  *uz;

    value = cf->args->elts;

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    uz = ngx_http_llmlimit_usage_get_zone(cf, &value[1]);
    if (uz == NULL) {
        return NGX_CONF_ERROR;
    }

    if (uz->defined) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate llmlimit_usage_zone \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    uz->defined = 1;
    uz->retention = 400 * 86400;
    uz->bucket = 3600;

    s = value[2];
    size = ngx_parse_size(&s);

    if (size == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone size \"%V\"", &value[2]);
        return NGX_CONF_ERROR;
    }

    if (size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is too small", &value[1]);
        return NGX_CONF_ERROR;
    }

    for (i = 3; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "retention=", 10) == 0) {
            s.data = value[i].data + 10;
            s.len = value[i].len - 10;

            n = ngx_parse_time(&s, 1);

            if (n == NGX_ERROR || n == 0 || n > 100 * 366 * 86400LL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid retention \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            uz->retention = (time_t) n;
            continue;
        }

        /* the bucket length, an hour; shorter ones are for tests */

        if (ngx_strncmp(value[i].data, "bucket=", 7) == 0) {
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;

            n = ngx_parse_time(&s, 1);

            if (n == NGX_ERROR || n == 0 || 86400 % n != 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid bucket \"%V\", must divide a day",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            uz->bucket = (time_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

            uz->redis = ngx_http_llmlimit_zone_ref(cf, &s);
            if (uz->redis == NULL) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    uz->shm_zone = ngx_shared_memory_add(cf, &value[1], size,
                                         &ngx_http_llmlimit_usage_module);
    if (uz->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (uz->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    uz->shm_zone->init = ngx_http_llmlimit_usage_init_zone;
    uz->shm_zone->data = uz;

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_usage(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_usage_loc_conf_t *ulcf = conf;

    ngx_str_t                  *value, *name, s;
    ngx_uint_t                  i, j, set;

    if (ulcf->zone != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0 && cf->args->nelts == 2) {
        ulcf->zone = NULL;
        return NGX_CONF_OK;
    }

    ulcf->zone = ngx_http_llmlimit_usage_get_zone(cf, &value[1]);
    if (ulcf->zone == NULL) {
        return NGX_CONF_ERROR;
    }

    set = 0;

    for (i = 2; i < cf->args->nelts; i++) {
        name = ngx_http_llmlimit_usage_names;

        for (j = 0; j < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; j++) {
            if (value[i].len >= name[j].len
                && ngx_strncmp(value[i].data, name[j].data, name[j].len) == 0)
            {
                break;
            }
        }

        if (j == NGX_HTTP_LLMLIMIT_USAGE_NFIELDS) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        if (set & (1 << j)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        set |= 1 << j;

        s.data = value[i].data + name[j].len;
        s.len = value[i].len - name[j].len;

        if (ngx_http_llmlimit_usage_field(cf, &ulcf->fields[j], &s)
            != NGX_CONF_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    for (j = 0; j < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; j++) {
        if (!(set & (1 << j))
            && ngx_http_llmlimit_usage_field(cf, &ulcf->fields[j],
                                          &ngx_http_llmlimit_usage_defaults[j])
               != NGX_CONF_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_usage_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_usage_loc_conf_t *ulcf = conf;

    ngx_str_t                 *value;
    ngx_http_core_loc_conf_t  *clcf;

    if (ulcf->api != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    ulcf->api = ngx_http_llmlimit_usage_get_zone(cf, &value[1]);
    if (ulcf->api == NULL) {
        return NGX_CONF_ERROR;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llmlimit_usage_api_handler;

    return NGX_CONF_OK;
}


/*
 * A key directory's variable is read from its lookup, "$name" alone as it
 * is, without a copy; anything else is compiled.
 */

static char *
ngx_http_llmlimit_usage_field(ngx_conf_t *cf,
    ngx_http_llmlimit_usage_field_t *field, ngx_str_t *value)
{
    ngx_str_t                          name;
    ngx_uint_t                         i;
    ngx_http_compile_complex_value_t   ccv;

    field->key = NGX_ERROR;
    field->index = NGX_ERROR;

    for (i = 0; i < sizeof(ngx_http_llmlimit_usage_keys)
                    / sizeof(ngx_str_t); i++)
    {
        if (value->len == ngx_http_llmlimit_usage_keys[i].len
            && ngx_strncmp(value->data, ngx_http_llmlimit_usage_keys[i].data,
                           value->len)
               == 0)
        {
            field->key = i;
            return NGX_CONF_OK;
        }
    }

    if (value->len > 1 && value->data[0] == '$') {
        name.data = value->data + 1;
        name.len = value->len - 1;

        for (i = 0; i < name.len; i++) {
            if (!((name.data[i] >= 'a' && name.data[i] <= 'z')
                  || (name.data[i] >= 'A' && name.data[i] <= 'Z')
                  || (name.data[i] >= '0' && name.data[i] <= '9')
                  || name.data[i] == '_'))
            {
                break;
            }
        }

        if (i == name.len) {
            field->index = ngx_http_get_variable_index(cf, &name);
            if (field->index == NGX_ERROR) {
                return NGX_CONF_ERROR;
            }

            return NGX_CONF_OK;
        }
    }

    field->cv = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
    if (field->cv == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = value;
    ccv.complex_value = field->cv;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_llmlimit_usage_postconf(ngx_conf_t *cf)
{
    ngx_uint_t                             i;
    ngx_http_handler_pt                   *h;
    ngx_http_core_main_conf_t             *cmcf;
    ngx_http_llmlimit_usage_zone_t       **zones;
    ngx_http_llmlimit_usage_main_conf_t   *umcf;

    umcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_llmlimit_usage_module);

    zones = umcf->zones.elts;

    for (i = 0; i < umcf->zones.nelts; i++) {
        if (!zones[i]->defined) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown llmlimit_usage_zone \"%V\" in %V:%ui",
                          &zones[i]->name, &zones[i]->file, zones[i]->line);
            return NGX_ERROR;
        }

        if (zones[i]->redis && zones[i]->redis->redis == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "llmlimit_zone \"%V\" of llmlimit_usage_zone "
                          "\"%V\" has no redis= in %V:%ui",
                          &zones[i]->redis->name, &zones[i]->name,
                          &zones[i]->file, zones[i]->line);
            return NGX_ERROR;
        }
    }

    if (umcf->zones.nelts == 0) {
        return NGX_OK;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_llmlimit_usage_log_handler;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_usage_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                             i;
    ngx_http_llmlimit_usage_zone_t       **zones;
    ngx_http_llmlimit_usage_main_conf_t   *umcf;

    umcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_llmlimit_usage_module);
    if (umcf == NULL) {
        return NGX_OK;
    }

    zones = umcf->zones.elts;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    for (i = 0; i < umcf->zones.nelts; i++) {
        if (zones[i]->redis
            && ngx_http_llmlimit_usage_init_flush(cycle, zones[i]) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_llmlimit_usage_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                             i;
    ngx_http_llmlimit_usage_zone_t       **zones;
    ngx_http_llmlimit_usage_main_conf_t   *umcf;

    umcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_llmlimit_usage_module);
    if (umcf == NULL) {
        return;
    }

    zones = umcf->zones.elts;

    for (i = 0; i < umcf->zones.nelts; i++) {
        if (zones[i]->flush) {
            ngx_http_llmlimit_usage_exit_flush(zones[i]);
        }
    }
}
