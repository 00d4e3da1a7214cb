
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The sync store (redis_sync=TIME): approximate cluster-wide counting at
 * shared-memory speed.  Requests are decided by the shared-memory store,
 * on counter states that hold the cluster's totals as last read from
 * Redis plus what this host admitted since.
 *
 * Every count and take-back in the zone is also added, under the zone's
 * lock, to a table of deltas in the zone's shared memory: per counter,
 * what this host admitted in the current window and in the one before,
 * not yet pushed.  One push per host at a time: every worker has a timer
 * of TIME, and the first whose timer fires at least 3/4 TIME after the
 * last push takes the table (and empties it) and sends one EVAL that adds
 * the deltas to Redis and returns the cluster's totals, written back into
 * the local states (never lowering them).  The counts of a window are a
 * hash, the key PREFIX "s:" period ":" window-start, with a field per
 * counter (its key in hex), expiring when the window stops mattering: one
 * HINCRBY per counter and one PEXPIRE per window and push.  The windows
 * are the local clock's aligned windows, floor(now / P) * P, the same on
 * every host whose clock is synchronised.
 *
 * Pushes are idempotent.  Each carries this host's id (drawn when the zone
 * is created, kept over reloads) and a sequence number; the script applies
 * the deltas only if the number is above the last one applied for the
 * host (the key PREFIX "sync:" host, expiring after a day), and answers
 * the totals either way.  A push whose reply does not come (the connection
 * lost, perhaps after Redis applied it) is sent again as it was, same
 * number, same deltas, before anything else: applied once whatever
 * happened to the first one.  Meanwhile the host's new deltas wait in the
 * table and requests are decided locally.
 *
 * The table holds the counters changed since the last push; it is bounded,
 * and a counter that finds it full is counted locally only (a warning per
 * minute).  Connection changes are logged once by the Redis connection
 * (src/ngx_http_llmlimit_redis.c), whose code this store uses through
 * ngx_http_llmlimit_redis_command().
 *
 * Only fixed and sliding: their counts per window add up across hosts;
 * GCRA's theoretical arrival time does not, and is refused at
 * configuration.
 */


#include "ngx_http_llmlimit.h"

#include <hiredis/hiredis.h>


/* a pusher silent for this long is taken as gone, ms */
#define NGX_HTTP_LLMLIMIT_SYNC_STALE     5000
#define NGX_HTTP_LLMLIMIT_SYNC_WARN      60000

/* a push answered an error is sent again this many times, at most */
#define NGX_HTTP_LLMLIMIT_SYNC_TRIES     10

/* how long Redis remembers a host's last push, ms */
#define NGX_HTTP_LLMLIMIT_SYNC_SEQ_TTL   "86400000"

/* slots in the table: one for every this many counters of a zone */
#define NGX_HTTP_LLMLIMIT_SYNC_RATIO     4
#define NGX_HTTP_LLMLIMIT_SYNC_MIN       64
#define NGX_HTTP_LLMLIMIT_SYNC_MAX       65536

/* a window's key, its time to live and count; a counter and its delta */
#define NGX_HTTP_LLMLIMIT_SYNC_GROUP_LEN                                     \
    (sizeof("s::") - 1 + 3 * NGX_INT64_LEN + NGX_INT32_LEN)
#define NGX_HTTP_LLMLIMIT_SYNC_ENTRY_LEN  (32 + NGX_INT32_LEN)


/* what this host counted of a counter since the last push */
typedef struct {
    uint64_t                        k[2];        /* the shm counter's key */
    int64_t                         t;           /* window of "cur" */
    uint32_t                        period;      /* 0: a free slot */
    int32_t                         cur;         /* not pushed, in t */
    int32_t                         prev;        /* ... in t - period */
    uint32_t                        sliding;     /* else fixed */
} ngx_http_llmlimit_delta_t;


typedef struct {
    ngx_uint_t                      mask;
    ngx_uint_t                      n;
    ngx_uint_t                      dropped;
    int64_t                         warn_time;
    int64_t                         last;        /* push sent, ms */
    ngx_pid_t                       pusher;      /* 0: none owed a reply */
    uint64_t                        host;        /* id in Redis */
    uint64_t                        seq;         /* of the last push */
    uint32_t                       *used;        /* slots, in use order */
    ngx_http_llmlimit_delta_t      *deltas;
} ngx_http_llmlimit_sync_sh_t;


/* one window of one counter in a push */
typedef struct {
    int64_t                         w;
    uint32_t                        period;
    int32_t                         delta;
    ngx_uint_t                      index;       /* 2 * delta's + prev */
} ngx_http_llmlimit_sync_entry_t;


typedef struct ngx_http_llmlimit_sync_push_s  ngx_http_llmlimit_sync_push_t;

typedef struct {
    ngx_msec_t                      interval;    /* 0: off */
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_sh_t    *sh;

    /* per worker */
    ngx_event_t                     timer;
    ngx_log_t                      *log;
    ngx_http_llmlimit_sync_push_t  *push;        /* sent or to send again */
    unsigned                        failed:1;
} ngx_http_llmlimit_sync_t;


struct ngx_http_llmlimit_sync_push_s {
    ngx_http_llmlimit_redis_cmd_t   cmd;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_pool_t                     *pool;
    ngx_uint_t                      n;
    ngx_http_llmlimit_delta_t      *deltas;
    ngx_uint_t                      nentries;
    ngx_http_llmlimit_sync_entry_t *entries;     /* by window */
    int64_t                        *totals;      /* 2 per delta; -1: none */
    int                             argc;
    const char                    **argv;
    size_t                         *argvlen;
    ngx_uint_t                      tries;
    unsigned                        sent:1;      /* a reply is owed */
};


static ngx_int_t ngx_http_llmlimit_sync_option(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone, ngx_str_t *value);
static ngx_int_t ngx_http_llmlimit_sync_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone);
static ngx_int_t ngx_http_llmlimit_sync_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_llmlimit_sync_init_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);
static ngx_int_t ngx_http_llmlimit_sync_check(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static void ngx_http_llmlimit_sync_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static void ngx_http_llmlimit_sync_count(ngx_http_llmlimit_zone_t *zone,
    ngx_http_llmlimit_counter_t *c, uint64_t k[2], int64_t time,
    ngx_int_t n);
static void ngx_http_llmlimit_sync_exit_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);
static ngx_http_llmlimit_delta_t *ngx_http_llmlimit_sync_slot(
    ngx_http_llmlimit_sync_sh_t *sh, uint64_t k[2], ngx_uint_t create);
static void ngx_http_llmlimit_sync_roll(ngx_http_llmlimit_delta_t *d,
    int64_t w);
static void ngx_http_llmlimit_sync_timer(ngx_event_t *ev);
static ngx_int_t ngx_http_llmlimit_sync_args(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push, uint64_t seq, int64_t now);
static int ngx_libc_cdecl ngx_http_llmlimit_sync_cmp(const void *one,
    const void *two);
static u_char *ngx_http_llmlimit_sync_arg(u_char *p, u_char *last,
    ngx_http_llmlimit_sync_push_t *push, const char *fmt, ...);
static void ngx_http_llmlimit_sync_send(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push);
static void ngx_http_llmlimit_sync_reply(ngx_http_llmlimit_redis_cmd_t *cmd,
    void *reply);
static ngx_int_t ngx_http_llmlimit_sync_totals(
    ngx_http_llmlimit_sync_push_t *push, u_char *p, size_t len);
static void ngx_http_llmlimit_sync_update(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_delta_t *d, int64_t cur, int64_t prev);
static void ngx_http_llmlimit_sync_done(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push);


ngx_http_llmlimit_store_t  ngx_http_llmlimit_sync_store = {
    "redis_sync",
    1 << NGX_HTTP_LLMLIMIT_SLIDING | 1 << NGX_HTTP_LLMLIMIT_FIXED,
    ngx_http_llmlimit_sync_option,
    ngx_http_llmlimit_sync_conf_done,
    ngx_http_llmlimit_sync_init_zone,
    NULL,
    ngx_http_llmlimit_sync_init_process,
    ngx_http_llmlimit_sync_check,
    ngx_http_llmlimit_sync_refund,
    NULL,                               /* token budgets: not yet */
    ngx_http_llmlimit_sync_count,
    ngx_http_llmlimit_sync_exit_process
};


/*
 * KEYS: none (the keys are made by the caller).  ARGV: the key of this
 * host's last push number, this push's number, then groups: a window's
 * key (a hash: a field per counter), its time to live, the number m of
 * counters, then m pairs of counter and delta.  The deltas are added only
 * if the push is new.  Returns each counter's total in its window, in
 * one string, separated by spaces: one reply object for the worker to
 * read, not one per counter.
 */

static char  ngx_http_llmlimit_sync_lua[] =
    "local sk, seq = ARGV[1], tonumber(ARGV[2])\n"
    "local new = seq > (tonumber(redis.call('GET', sk)) or 0)\n"
    "if new then\n"
    "  redis.call('SET', sk, seq, 'PX', "
           NGX_HTTP_LLMLIMIT_SYNC_SEQ_TTL ")\n"
    "end\n"
    "local r, n, i = {}, 0, 3\n"
    "while i <= #ARGV do\n"
    "  local k, ttl, m = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])\n"
    "  i = i + 3\n"
    "  for j = i, i + 2 * m - 1, 2 do\n"
    "    local d, v = tonumber(ARGV[j + 1])\n"
    "    if new and d ~= 0 then\n"
    "      v = redis.call('HINCRBY', k, ARGV[j], d)\n"
    "    else\n"
    "      v = tonumber(redis.call('HGET', k, ARGV[j])) or 0\n"
    "    end\n"
    "    n = n + 1\n"
    "    r[n] = v\n"
    "  end\n"
    "  if new then\n"
    "    redis.call('PEXPIRE', k, ttl)\n"
    "  end\n"
    "  i = i + 2 * m\n"
    "end\n"
    "return table.concat(r, ' ')\n";


/* the request path: the shared-memory store's, deltas kept by count() */

static ngx_int_t
ngx_http_llmlimit_sync_check(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    return ngx_http_llmlimit_shm_store.check(r, b);
}


static void
ngx_http_llmlimit_sync_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    ngx_http_llmlimit_shm_store.refund(r, b);
}


static void
ngx_http_llmlimit_sync_count(ngx_http_llmlimit_zone_t *zone,
    ngx_http_llmlimit_counter_t *c, uint64_t k[2], int64_t time,
    ngx_int_t n)
{
    int64_t                       w;
    ngx_http_llmlimit_sync_t     *sync;
    ngx_http_llmlimit_delta_t    *d;
    ngx_http_llmlimit_sync_sh_t  *sh;

    sync = zone->data;
    sh = sync->sh;

    w = time - time % (int64_t) c->period;

    d = ngx_http_llmlimit_sync_slot(sh, k, n > 0);

    if (d == NULL) {
        if (n > 0) {
            sh->dropped++;
        }

        return;
    }

    if (d->period == 0) {
        d->period = (uint32_t) c->period;
        d->t = w;
        d->sliding = (c->algorithm == NGX_HTTP_LLMLIMIT_SLIDING);
    }

    ngx_http_llmlimit_sync_roll(d, w);

    if (w == d->t) {
        d->cur += (int32_t) n;

    } else if (w == d->t - d->period) {
        d->prev += (int32_t) n;
    }
}


/* the slot of a counter; with "create", a free one if none */

static ngx_http_llmlimit_delta_t *
ngx_http_llmlimit_sync_slot(ngx_http_llmlimit_sync_sh_t *sh, uint64_t k[2],
    ngx_uint_t create)
{
    ngx_uint_t                  i;
    ngx_http_llmlimit_delta_t  *d;

    for (i = (ngx_uint_t) k[1] & sh->mask;
         /* void */ ;
         i = (i + 1) & sh->mask)
    {
        d = &sh->deltas[i];

        if (d->period == 0) {
            break;
        }

        if (d->k[0] == k[0] && d->k[1] == k[1]) {
            return d;
        }
    }

    /* at most 3/4 full: a free slot is always found */

    if (!create || sh->n >= (sh->mask + 1) / 4 * 3) {
        return NULL;
    }

    sh->used[sh->n++] = (uint32_t) i;
    d->k[0] = k[0];
    d->k[1] = k[1];
    d->cur = 0;
    d->prev = 0;

    /* d->period == 0: the caller sets it */

    return d;
}


/* what is kept of the windows that still matter, at window w */

static void
ngx_http_llmlimit_sync_roll(ngx_http_llmlimit_delta_t *d, int64_t w)
{
    if (w <= d->t) {
        return;
    }

    d->prev = (w - d->t == d->period) ? d->cur : 0;
    d->cur = 0;
    d->t = w;
}


/* the push */

static void
ngx_http_llmlimit_sync_timer(ngx_event_t *ev)
{
    int64_t                         now;
    uint64_t                        seq;
    ngx_uint_t                      i, n, dropped;
    ngx_pool_t                     *pool;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_http_llmlimit_delta_t      *d;
    ngx_http_llmlimit_sync_sh_t    *sh;
    ngx_http_llmlimit_sync_push_t  *push;

    sync = ev->data;
    zone = sync->zone;
    sh = sync->sh;

    if (!ngx_exiting) {
        ngx_add_timer(&sync->timer, sync->interval);
    }

    now = ngx_http_llmlimit_now();

    if (sync->push) {

        if (sync->push->sent) {
            /* still owed a reply */
            return;
        }

        /* the push again, as it was: nothing else before it is answered */

        ngx_shmtx_lock(&zone->shpool->mutex);
        sh->last = now;
        ngx_shmtx_unlock(&zone->shpool->mutex);

        ngx_http_llmlimit_sync_send(sync, sync->push);
        return;
    }

    ngx_shmtx_lock(&zone->shpool->mutex);

    if ((sh->pusher && now - sh->last < NGX_HTTP_LLMLIMIT_SYNC_STALE)
        || now - sh->last < (int64_t) (sync->interval / 4 * 3)
        || sh->n == 0)
    {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    n = sh->n;

    ngx_shmtx_unlock(&zone->shpool->mutex);

    pool = ngx_create_pool(4096, sync->log);
    if (pool == NULL) {
        return;
    }

    push = ngx_pcalloc(pool, sizeof(ngx_http_llmlimit_sync_push_t));
    if (push == NULL) {
        ngx_destroy_pool(pool);
        return;
    }

    push->sync = sync;
    push->pool = pool;
    push->cmd.handler = ngx_http_llmlimit_sync_reply;

    /* room for what the table holds now, and for what comes meanwhile */

    n = n + n / 4 + 16;

    push->deltas = ngx_palloc(pool, n * sizeof(ngx_http_llmlimit_delta_t));
    if (push->deltas == NULL) {
        ngx_destroy_pool(pool);
        return;
    }

    dropped = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    if ((sh->pusher && now - sh->last < NGX_HTTP_LLMLIMIT_SYNC_STALE)
        || now - sh->last < (int64_t) (sync->interval / 4 * 3)
        || sh->n == 0 || sh->n > n)
    {
        /* another worker was first, or the table grew beyond the room */
        ngx_shmtx_unlock(&zone->shpool->mutex);
        ngx_destroy_pool(pool);
        return;
    }

    sh->last = now;

    if (sh->dropped
        && now - sh->warn_time >= NGX_HTTP_LLMLIMIT_SYNC_WARN)
    {
        dropped = sh->dropped;
        sh->dropped = 0;
        sh->warn_time = now;
    }

    /* take the table's deltas and empty it */

    for (i = 0; i < sh->n; i++) {
        d = &sh->deltas[sh->used[i]];

        if (d->cur || d->prev) {
            push->deltas[push->n++] = *d;
        }

        d->period = 0;
    }

    sh->n = 0;

    seq = ++sh->seq;
    sh->pusher = push->n ? ngx_pid : 0;

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (dropped) {
        ngx_log_error(NGX_LOG_WARN, sync->log, 0,
                      "llmlimit zone \"%V\": no room for the deltas of "
                      "%ui requests, counted on this host only",
                      &zone->name, dropped);
    }

    if (push->n == 0) {
        ngx_destroy_pool(pool);
        return;
    }

    if (ngx_http_llmlimit_sync_args(sync, push, seq, now) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, sync->log, 0,
                      "llmlimit zone \"%V\": no memory for a push, "
                      "%ui counters not pushed", &zone->name, push->n);
        ngx_http_llmlimit_sync_done(sync, push);
        return;
    }

    sync->push = push;

    ngx_http_llmlimit_sync_send(sync, push);
}


/*
 * EVAL script 0 seq-key seq, then per window: its key, time to live and
 * number of counters, and a counter and its delta for each
 */

static ngx_int_t
ngx_http_llmlimit_sync_args(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push, uint64_t seq, int64_t now)
{
    u_char                          *p, *last;
    size_t                           size;
    int64_t                          ttl;
    ngx_str_t                       *prefix;
    ngx_uint_t                       i, j, n, groups;
    ngx_http_llmlimit_delta_t       *d;
    ngx_http_llmlimit_sync_entry_t  *e;

    size = 2 * push->n * sizeof(ngx_http_llmlimit_sync_entry_t);

    push->entries = ngx_palloc(push->pool, size);
    push->totals = ngx_palloc(push->pool, 2 * push->n * sizeof(int64_t));

    if (push->entries == NULL || push->totals == NULL) {
        return NGX_ERROR;
    }

    /* the window of each delta, and the window before where it has one */

    n = 0;

    for (i = 0; i < push->n; i++) {
        d = &push->deltas[i];

        e = &push->entries[n++];
        e->w = d->t;
        e->period = d->period;
        e->delta = d->cur;
        e->index = 2 * i;

        push->totals[2 * i + 1] = -1;

        if (d->prev) {
            e = &push->entries[n++];
            e->w = d->t - (int64_t) d->period;
            e->period = d->period;
            e->delta = d->prev;
            e->index = 2 * i + 1;
        }
    }

    push->nentries = n;

    ngx_qsort(push->entries, n, sizeof(ngx_http_llmlimit_sync_entry_t),
              ngx_http_llmlimit_sync_cmp);

    groups = 0;

    for (i = 0; i < n; i++) {
        if (i == 0 || ngx_http_llmlimit_sync_cmp(&push->entries[i - 1],
                                                 &push->entries[i]))
        {
            groups++;
        }
    }

    prefix = ngx_http_llmlimit_redis_prefix(sync->zone->redis);

    push->argc = (int) (5 + 3 * groups + 2 * n);

    push->argv = ngx_palloc(push->pool, push->argc * sizeof(char *));
    push->argvlen = ngx_palloc(push->pool, push->argc * sizeof(size_t));

    size = groups * (prefix->len + NGX_HTTP_LLMLIMIT_SYNC_GROUP_LEN)
           + n * NGX_HTTP_LLMLIMIT_SYNC_ENTRY_LEN
           + prefix->len + sizeof("sync:") + 16 + NGX_INT64_LEN;

    p = ngx_pnalloc(push->pool, size);

    if (push->argv == NULL || push->argvlen == NULL || p == NULL) {
        return NGX_ERROR;
    }

    last = p + size;

    push->argv[0] = "EVAL";
    push->argvlen[0] = 4;
    push->argv[1] = ngx_http_llmlimit_sync_lua;
    push->argvlen[1] = sizeof(ngx_http_llmlimit_sync_lua) - 1;
    push->argv[2] = "0";
    push->argvlen[2] = 1;
    push->argc = 3;

    p = ngx_http_llmlimit_sync_arg(p, last, push, "%Vsync:%016uxL", prefix,
                                   sync->sh->host);
    p = ngx_http_llmlimit_sync_arg(p, last, push, "%uL", seq);

    for (i = 0; i < n; i = j) {
        e = &push->entries[i];

        for (j = i + 1;
             j < n && ngx_http_llmlimit_sync_cmp(e, &push->entries[j]) == 0;
             j++)
        { /* void */ }

        /* the window's key lives until the window stops mattering */

        ttl = e->w + 2 * (int64_t) e->period - now + 1000;

        p = ngx_http_llmlimit_sync_arg(p, last, push, "%Vs:%uD:%L", prefix,
                                       e->period, e->w);
        p = ngx_http_llmlimit_sync_arg(p, last, push, "%L",
                                       ngx_max(ttl, 1000));
        p = ngx_http_llmlimit_sync_arg(p, last, push, "%ui", j - i);

        for ( /* void */ ; e < &push->entries[j]; e++) {
            d = &push->deltas[e->index / 2];

            p = ngx_http_llmlimit_sync_arg(p, last, push, "%016uxL%016uxL",
                                           d->k[0], d->k[1]);
            p = ngx_http_llmlimit_sync_arg(p, last, push, "%D", e->delta);
        }
    }

    return NGX_OK;
}


static int ngx_libc_cdecl
ngx_http_llmlimit_sync_cmp(const void *one, const void *two)
{
    const ngx_http_llmlimit_sync_entry_t  *a = one, *b = two;

    if (a->period != b->period) {
        return a->period < b->period ? -1 : 1;
    }

    if (a->w != b->w) {
        return a->w < b->w ? -1 : 1;
    }

    return 0;
}


/* one argument of the EVAL, printed into the push's buffer */

static u_char *
ngx_http_llmlimit_sync_arg(u_char *p, u_char *last,
    ngx_http_llmlimit_sync_push_t *push, const char *fmt, ...)
{
    u_char   *start;
    va_list   args;

    start = p;

    va_start(args, fmt);
    p = ngx_vslprintf(p, last, fmt, args);
    va_end(args);

    push->argv[push->argc] = (const char *) start;
    push->argvlen[push->argc] = p - start;
    push->argc++;

    return p;
}


static void
ngx_http_llmlimit_sync_send(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push)
{
    if (ngx_http_llmlimit_redis_command(sync->zone->redis, push->argc,
                                        push->argv, push->argvlen,
                                        &push->cmd)
        == NGX_OK)
    {
        push->sent = 1;
    }

    /* else Redis is not there: the same push at the next tick */
}


/* the totals of both windows of every counter pushed */

static void
ngx_http_llmlimit_sync_reply(ngx_http_llmlimit_redis_cmd_t *cmd, void *reply)
{
    ngx_uint_t                      i, ok;
    redisReply                     *rep;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_http_llmlimit_sync_push_t  *push;

    push = (ngx_http_llmlimit_sync_push_t *) cmd;
    sync = push->sync;
    zone = sync->zone;
    rep = reply;

    push->sent = 0;

    if (rep == NULL) {
        /*
         * the connection was lost: the push may or may not have been
         * applied; it is sent again as it is with the next tick
         */

        if (ngx_exiting || ngx_terminate || ngx_quit) {
            ngx_http_llmlimit_sync_done(sync, push);
        }

        return;
    }

    ok = (rep->type == REDIS_REPLY_STRING
          && ngx_http_llmlimit_sync_totals(push, (u_char *) rep->str,
                                           rep->len)
             == NGX_OK);

    if (!ok) {
        if (!sync->failed) {
            ngx_log_error(NGX_LOG_ERR, sync->log, 0,
                          "llmlimit zone \"%V\": redis_sync push failed: %*s",
                          &zone->name,
                          rep->type == REDIS_REPLY_ERROR ? (size_t) rep->len
                                                         : sizeof("bad reply")
                                                           - 1,
                          rep->type == REDIS_REPLY_ERROR ? rep->str
                                                         : "bad reply");
            sync->failed = 1;
        }

        /* sent again a few times (LOADING, BUSY); not applied twice */

        if (++push->tries >= NGX_HTTP_LLMLIMIT_SYNC_TRIES) {
            ngx_log_error(NGX_LOG_ERR, sync->log, 0,
                          "llmlimit zone \"%V\": redis_sync gave up a push "
                          "of %ui counters", &zone->name, push->n);
            ngx_http_llmlimit_sync_done(sync, push);
        }

        return;
    }

    if (sync->failed) {
        ngx_log_error(NGX_LOG_NOTICE, sync->log, 0,
                      "llmlimit zone \"%V\": redis_sync pushes again",
                      &zone->name);
        sync->failed = 0;
    }

    ngx_shmtx_lock(&zone->shpool->mutex);

    for (i = 0; i < push->n; i++) {
        ngx_http_llmlimit_sync_update(sync, &push->deltas[i],
                                      push->totals[2 * i],
                                      push->totals[2 * i + 1]);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    ngx_http_llmlimit_sync_done(sync, push);
}


/* the totals, "N N ...", one per entry; below 0 (take-backs) counts as 0 */

static ngx_int_t
ngx_http_llmlimit_sync_totals(ngx_http_llmlimit_sync_push_t *push,
    u_char *p, size_t len)
{
    u_char      *last;
    int64_t      v;
    ngx_uint_t   i, neg, digits;

    last = p + len;

    for (i = 0; i < push->nentries; i++) {

        if (i > 0) {
            if (p == last || *p++ != ' ') {
                return NGX_ERROR;
            }
        }

        neg = (p < last && *p == '-');
        p += neg;

        v = 0;

        for (digits = 0; p < last && *p >= '0' && *p <= '9'; digits++) {
            if (digits == 15) {
                return NGX_ERROR;
            }

            v = v * 10 + (*p++ - '0');
        }

        if (digits == 0) {
            return NGX_ERROR;
        }

        push->totals[push->entries[i].index] = neg ? 0 : v;
    }

    return (p == last) ? NGX_OK : NGX_ERROR;
}


/*
 * Under the zone's lock: a counter's local state takes the cluster's
 * totals of the windows pushed, plus what was counted here since the push
 * was taken, unless it already holds more (a Redis that lost its data).
 * A total of -1 was not read.
 */

static void
ngx_http_llmlimit_sync_update(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_delta_t *d, int64_t cur, int64_t prev)
{
    int64_t                      P, uc, up;
    ngx_http_llmlimit_state_t   *st;
    ngx_http_llmlimit_delta_t   *now;

    st = ngx_http_llmlimit_shm_state_locked(sync->zone, d->k);
    if (st == NULL) {
        return;
    }

    P = d->period;

    /* counted here since the push was taken */

    now = ngx_http_llmlimit_sync_slot(sync->sh, d->k, 0);
    uc = 0;
    up = 0;

    if (now && now->t == d->t) {
        uc = now->cur;
        up = now->prev;

    } else if (now && now->t == d->t + P) {
        up = now->prev;
    }

    if (st->t == d->t) {
        cur += uc;

        if (cur > (int64_t) st->cur) {
            st->cur = (uint32_t) ngx_min(cur, NGX_MAX_UINT32_VALUE);
        }

        if (prev >= 0) {
            prev += up;
        }

        if (d->sliding && prev > (int64_t) st->prev) {
            st->prev = (uint32_t) ngx_min(prev, NGX_MAX_UINT32_VALUE);
        }

    } else if (st->t == d->t + P && d->sliding) {
        cur += up;

        if (cur > (int64_t) st->prev) {
            st->prev = (uint32_t) ngx_min(cur, NGX_MAX_UINT32_VALUE);
        }
    }
}


/* the end of a push: answered, given up, or its worker exiting */

static void
ngx_http_llmlimit_sync_done(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push)
{
    ngx_http_llmlimit_zone_t  *zone;

    zone = sync->zone;

    ngx_shmtx_lock(&zone->shpool->mutex);

    if (sync->sh->pusher == ngx_pid) {
        sync->sh->pusher = 0;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (sync->push == push) {
        sync->push = NULL;
    }

    ngx_destroy_pool(push->pool);
}


/* configuration */

static ngx_int_t
ngx_http_llmlimit_sync_option(ngx_conf_t *cf, ngx_http_llmlimit_zone_t *zone,
    ngx_str_t *value)
{
    ngx_str_t                  s;
    ngx_msec_t                 interval;
    ngx_http_llmlimit_sync_t  *sync;

    if (ngx_strncmp(value->data, "redis_sync=", 11) != 0) {
        return NGX_DECLINED;
    }

    if (zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate parameter \"%V\"", value);
        return NGX_ERROR;
    }

    s.data = value->data + 11;
    s.len = value->len - 11;

    if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
        interval = 0;

    } else {
        interval = ngx_parse_time(&s, 0);

        if (interval == (ngx_msec_t) NGX_ERROR || interval < 10
            || interval > 60000)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid value \"%V\", "
                               "must be \"off\" or from 10ms to 60s", value);
            return NGX_ERROR;
        }
    }

    sync = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_sync_t));
    if (sync == NULL) {
        return NGX_ERROR;
    }

    sync->interval = interval;
    sync->zone = zone;

    zone->data = sync;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_sync_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone)
{
    ngx_http_llmlimit_sync_t  *sync;

    sync = zone->data;

    if (sync == NULL || sync->interval == 0) {
        zone->data = NULL;
        return NGX_DECLINED;
    }

    if (zone->redis == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_sync\" of zone \"%V\" requires \"redis=\"",
                           &zone->name);
        return NGX_ERROR;
    }

    /* the connection's own parameters and defaults */

    return ngx_http_llmlimit_redis_conf_done(cf, zone);
}


static ngx_int_t
ngx_http_llmlimit_sync_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    size_t                         n, size;
    uint64_t                       seed[2], id[2];
    ngx_http_llmlimit_zone_t      *zone;
    ngx_http_llmlimit_sync_t      *sync;
    ngx_http_llmlimit_sync_sh_t   *sh;

    if (ngx_http_llmlimit_shm_init_zone(shm_zone, data) != NGX_OK) {
        return NGX_ERROR;
    }

    zone = shm_zone->data;
    sync = zone->data;

    if (zone->sh->store) {
        /* a reload, or a sync zone before it */
        sync->sh = zone->sh->store;
        return NGX_OK;
    }

    /* a slot for about every fourth counter that fits, a power of two */

    size = shm_zone->shm.size / (80 * NGX_HTTP_LLMLIMIT_SYNC_RATIO);

    for (n = NGX_HTTP_LLMLIMIT_SYNC_MIN;
         n * 2 <= size && n * 2 <= NGX_HTTP_LLMLIMIT_SYNC_MAX;
         n *= 2)
    { /* void */ }

    sh = ngx_slab_alloc(zone->shpool, sizeof(ngx_http_llmlimit_sync_sh_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    sh->deltas = ngx_slab_calloc(zone->shpool,
                                 n * sizeof(ngx_http_llmlimit_delta_t));
    sh->used = ngx_slab_alloc(zone->shpool, n * sizeof(uint32_t));

    if (sh->deltas == NULL || sh->used == NULL) {
        return NGX_ERROR;
    }

    sh->mask = n - 1;
    sh->n = 0;
    sh->dropped = 0;
    sh->warn_time = 0;
    sh->last = 0;
    sh->pusher = 0;
    sh->seq = 0;

    /*
     * this host's field in Redis: kept over reloads with the zone, new for
     * a new start (the old instance's counts stay counted under its own)
     */

    seed[0] = (uint64_t) ngx_pid << 32 ^ (uint64_t) ngx_random();
    seed[1] = (uint64_t) ngx_http_llmlimit_now() ^ (uintptr_t) sh;

    ngx_http_llmlimit_hash(seed, ngx_cycle->hostname.data,
                           ngx_cycle->hostname.len, id);

    sh->host = id[0] ^ id[1];

    zone->sh->store = sh;
    sync->sh = sh;

    return NGX_OK;
}


/* the worker: the zone's Redis connection, a timer for the pushes */

static ngx_int_t
ngx_http_llmlimit_sync_init_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone)
{
    ngx_http_llmlimit_sync_t  *sync;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    if (ngx_http_llmlimit_redis_init_process(cycle, zone) != NGX_OK) {
        return NGX_ERROR;
    }

    sync = zone->data;

    sync->log = cycle->log;
    sync->push = NULL;
    sync->failed = 0;

    sync->timer.handler = ngx_http_llmlimit_sync_timer;
    sync->timer.data = sync;
    sync->timer.log = cycle->log;
    sync->timer.cancelable = 1;

    ngx_add_timer(&sync->timer, sync->interval);

    return NGX_OK;
}


static void
ngx_http_llmlimit_sync_exit_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone)
{
    ngx_http_llmlimit_sync_t  *sync;

    sync = zone->data;

    if (sync->timer.timer_set) {
        ngx_del_timer(&sync->timer);
    }

    /* a push owed a reply is answered NULL: ngx_exiting, it ends there */

    ngx_http_llmlimit_redis_exit_process(cycle, zone);
}
