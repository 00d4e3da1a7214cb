
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The sync store (redis_sync=TIME): approximate cluster-wide counting at
 * shared-memory speed.  Requests are decided by the shared-memory store,
 * on counter states that hold the cluster's totals as last read from
 * Redis plus what this host admitted since.
 *
 * What this host admitted is kept, under the zone's lock, in a table in
 * the zone's shared memory: per counter, this host's own totals of the
 * current window and of the one before (absolute counts, not deltas), and
 * whether they changed since the last push.  Every TIME the first worker
 * whose timer fires at least 3/4 TIME after the last push sends one EVAL
 * with the changed totals (and, for two more pushes, the unchanged ones,
 * so that a host that stopped admitting still reads the others' counts).
 *
 * Pushes are idempotent: in Redis a window of a counter is a hash, the key
 * PREFIX "s{" counter "}:" window-start, with one field per host (its own
 * total, set only upwards) and a field "t", the sum of the hosts' fields.
 * A total pushed twice (applied by Redis, the reply lost with the
 * connection, pushed again) sets the same value again: nothing is counted
 * twice.  The reply gives, per counter and window, the others' total, t
 * minus this host's field; the local state becomes others + this host's
 * own total at the time of the reply, never lowered.
 *
 * A push that fails (no connection, an error, the connection lost before
 * the reply) marks the table for a full push: every counter whose windows
 * still hold a count of this host is pushed again with the next, so a
 * Redis that lost its data (restarted, flushed) gets this host's totals
 * back.  A restart between two pushes is seen from the key PREFIX
 * "sync:epoch", which the script creates from Redis' TIME when it is
 * missing: a new value is a new data set, and the table is pushed whole.
 *
 * The windows are the local clock's aligned windows, floor(now / P) * P,
 * the same on every host whose clock is synchronised.  The table is
 * bounded; a counter that finds it full is counted locally only (a
 * warning per minute).  Connection changes are logged once by the Redis
 * connection (src/ngx_http_llmlimit_redis.c), whose code this store uses
 * through ngx_http_llmlimit_redis_command().
 *
 * Only fixed and sliding: their counts per window add up across hosts;
 * GCRA's theoretical arrival time does not, and is refused at
 * configuration.
 */


#include "ngx_http_llmlimit.h"

#include <hiredis/hiredis.h>


/* a push older than this is taken as lost, ms */
#define NGX_HTTP_LLMLIMIT_SYNC_STALE     5000
#define NGX_HTTP_LLMLIMIT_SYNC_WARN      60000

/* pushes that still read a counter after its last change */
#define NGX_HTTP_LLMLIMIT_SYNC_IDLE      2

/* slots in the table: one for every this many counters of a zone */
#define NGX_HTTP_LLMLIMIT_SYNC_RATIO     4
#define NGX_HTTP_LLMLIMIT_SYNC_MIN       64
#define NGX_HTTP_LLMLIMIT_SYNC_MAX       65536

/* arguments of a counter in the EVAL */
#define NGX_HTTP_LLMLIMIT_SYNC_ARGS      5


/* this host's own counts of a counter */
typedef struct {
    uint64_t                        k[2];        /* the shm counter's key */
    int64_t                         t;           /* window of "cur" */
    uint32_t                        period;      /* 0: a free slot */
    uint32_t                        cur;         /* admitted here, in t */
    uint32_t                        prev;        /* ... in t - period */
    uint8_t                         dirty;       /* changed since pushed */
    uint8_t                         sliding;     /* else fixed */
    uint16_t                        idle;        /* pushes since a change */
} ngx_http_llmlimit_own_t;


typedef struct {
    ngx_uint_t                      mask;
    ngx_uint_t                      n;
    ngx_uint_t                      dropped;
    int64_t                         warn_time;
    int64_t                         last;        /* push taken, ms */
    ngx_pid_t                       pusher;      /* 0: none in flight */
    ngx_uint_t                      full;        /* push every count */
    uint64_t                        host;        /* field in Redis */
    int64_t                         epoch;       /* of Redis' data; 0: none */
    ngx_http_llmlimit_own_t        *own;
} ngx_http_llmlimit_sync_sh_t;


typedef struct ngx_http_llmlimit_sync_push_s  ngx_http_llmlimit_sync_push_t;

typedef struct {
    ngx_msec_t                      interval;    /* 0: off */
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_sh_t    *sh;

    /* per worker */
    ngx_event_t                     timer;
    ngx_log_t                      *log;
    ngx_http_llmlimit_sync_push_t  *push;        /* in flight */
    unsigned                        failed:1;
} ngx_http_llmlimit_sync_t;


struct ngx_http_llmlimit_sync_push_s {
    ngx_http_llmlimit_redis_cmd_t   cmd;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_pool_t                     *pool;
    ngx_uint_t                      n;
    ngx_http_llmlimit_own_t        *own;         /* as pushed */
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
static ngx_http_llmlimit_own_t *ngx_http_llmlimit_sync_slot(
    ngx_http_llmlimit_sync_sh_t *sh, uint64_t k[2], ngx_uint_t create);
static void ngx_http_llmlimit_sync_delete(ngx_http_llmlimit_sync_sh_t *sh,
    uint64_t k[2]);
static void ngx_http_llmlimit_sync_roll(ngx_http_llmlimit_own_t *d,
    int64_t now);
static ngx_uint_t ngx_http_llmlimit_sync_take(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push, int64_t now);
static void ngx_http_llmlimit_sync_timer(ngx_event_t *ev);
static void ngx_http_llmlimit_sync_send(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push);
static void ngx_http_llmlimit_sync_reply(ngx_http_llmlimit_redis_cmd_t *cmd,
    void *reply);
static void ngx_http_llmlimit_sync_update(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_own_t *d, int64_t cur, int64_t prev);
static void ngx_http_llmlimit_sync_done(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push, ngx_uint_t failed);


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
    ngx_http_llmlimit_sync_count,
    ngx_http_llmlimit_sync_exit_process
};


/*
 * KEYS: none (the keys are made by the caller).  ARGV: the epoch key, this
 * host's field, then five per counter: key of the window, key of the
 * window before, period, this host's total in the window and in the one
 * before (-1: that window is not wanted).  A host's field only grows, "t"
 * moves with it.  Returns the epoch, then the others' totals of both
 * windows per counter.
 */

static char  ngx_http_llmlimit_sync_lua[] =
    "local ek, host = ARGV[1], ARGV[2]\n"
    "local e = tonumber(redis.call('GET', ek))\n"
    "if not e then\n"
    "  local t = redis.call('TIME')\n"
    "  e = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "  redis.call('SET', ek, e)\n"
    "end\n"
    "local r, n = {e}, 1\n"
    "for i = 3, #ARGV, 5 do\n"
    "  local p = tonumber(ARGV[i + 2])\n"
    "  for j = 0, 1 do\n"
    "    local v, o = tonumber(ARGV[i + 3 + j]), 0\n"
    "    if v >= 0 then\n"
    "      local k = ARGV[i + j]\n"
    "      local h = redis.call('HMGET', k, host, 't')\n"
    "      local mine, all = tonumber(h[1]) or 0, tonumber(h[2]) or 0\n"
    "      if v > mine then\n"
    "        redis.call('HSET', k, host, v, 't', all + v - mine)\n"
    "        if all == 0 then\n"
    "          redis.call('PEXPIRE', k, (2 - j) * p + 1000)\n"
    "        end\n"
    "        all = all + v - mine\n"
    "        mine = v\n"
    "      end\n"
    "      o = all - mine\n"
    "    end\n"
    "    n = n + 1\n"
    "    r[n] = o\n"
    "  end\n"
    "end\n"
    "return r\n";


/* the request path: the shared-memory store's, own counts kept by count() */

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
    uint32_t                     *v;
    ngx_http_llmlimit_sync_t     *sync;
    ngx_http_llmlimit_own_t      *d;
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
        v = &d->cur;

    } else if (w == d->t - d->period) {
        v = &d->prev;

    } else {
        return;
    }

    if (n > 0) {
        *v += (*v < NGX_MAX_UINT32_VALUE);

    } else if (*v > 0) {
        (*v)--;
    }

    d->dirty = 1;
    d->idle = 0;
}


/* the slot of a counter; with "create", a free one if none */

static ngx_http_llmlimit_own_t *
ngx_http_llmlimit_sync_slot(ngx_http_llmlimit_sync_sh_t *sh, uint64_t k[2],
    ngx_uint_t create)
{
    ngx_uint_t                i;
    ngx_http_llmlimit_own_t  *d;

    for (i = (ngx_uint_t) k[1] & sh->mask;
         /* void */ ;
         i = (i + 1) & sh->mask)
    {
        d = &sh->own[i];

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

    sh->n++;
    d->k[0] = k[0];
    d->k[1] = k[1];
    d->cur = 0;
    d->prev = 0;
    d->dirty = 0;
    d->sliding = 0;
    d->idle = 0;

    /* d->period == 0: the caller sets it */

    return d;
}


/* frees a counter's slot; the ones after it move back into the gap */

static void
ngx_http_llmlimit_sync_delete(ngx_http_llmlimit_sync_sh_t *sh, uint64_t k[2])
{
    ngx_uint_t                i, j, h;
    ngx_http_llmlimit_own_t  *d;

    d = ngx_http_llmlimit_sync_slot(sh, k, 0);
    if (d == NULL) {
        return;
    }

    i = d - sh->own;
    j = i;

    for ( ;; ) {
        j = (j + 1) & sh->mask;
        d = &sh->own[j];

        if (d->period == 0) {
            break;
        }

        /* a slot stays if its home is cyclically in (i, j] */

        h = (ngx_uint_t) d->k[1] & sh->mask;

        if (i <= j ? (i < h && h <= j) : (i < h || h <= j)) {
            continue;
        }

        sh->own[i] = *d;
        i = j;
    }

    sh->own[i].period = 0;
    sh->n--;
}


/* moves a counter's own counts on to the window of "now" */

static void
ngx_http_llmlimit_sync_roll(ngx_http_llmlimit_own_t *d, int64_t now)
{
    int64_t  w;

    w = now - now % (int64_t) d->period;

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
    ngx_uint_t                      dropped;
    ngx_pool_t                     *pool;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_http_llmlimit_sync_sh_t    *sh;
    ngx_http_llmlimit_sync_push_t  *push;

    sync = ev->data;
    zone = sync->zone;
    sh = sync->sh;

    if (!ngx_exiting) {
        ngx_add_timer(&sync->timer, sync->interval);
    }

    if (sync->push) {
        /* still in flight from this worker */
        return;
    }

    now = ngx_http_llmlimit_now();

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

    dropped = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    if ((sh->pusher && now - sh->last < NGX_HTTP_LLMLIMIT_SYNC_STALE)
        || now - sh->last < (int64_t) (sync->interval / 4 * 3)
        || sh->n == 0)
    {
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

    push->own = ngx_palloc(pool, sh->n * sizeof(ngx_http_llmlimit_own_t));

    if (push->own == NULL) {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        ngx_destroy_pool(pool);
        return;
    }

    push->n = ngx_http_llmlimit_sync_take(sync, push, now);

    sh->pusher = push->n ? ngx_pid : 0;

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (dropped) {
        ngx_log_error(NGX_LOG_WARN, sync->log, 0,
                      "llmlimit zone \"%V\": no room for the counts of "
                      "%ui requests, counted on this host only",
                      &zone->name, dropped);
    }

    if (push->n == 0) {
        ngx_destroy_pool(pool);
        return;
    }

    ngx_http_llmlimit_sync_send(sync, push);
}


/*
 * Under the zone's lock: copies into the push the counters to push (the
 * changed ones, those changed in the last pushes, or all after a failure)
 * and frees the slots of counters with no count of this host left.
 */

static ngx_uint_t
ngx_http_llmlimit_sync_take(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push, int64_t now)
{
    ngx_uint_t                    i, n, nfree, full;
    ngx_http_llmlimit_own_t      *d, *gone;
    ngx_http_llmlimit_sync_sh_t  *sh;

    sh = sync->sh;
    full = sh->full;
    sh->full = 0;

    n = 0;
    nfree = 0;

    /* the slots to free are listed from the end of the push's array */

    gone = push->own + sh->n;

    for (i = 0; i <= sh->mask; i++) {
        d = &sh->own[i];

        if (d->period == 0) {
            continue;
        }

        ngx_http_llmlimit_sync_roll(d, now);

        if (d->dirty || (full && (d->cur || d->prev))
            || d->idle < NGX_HTTP_LLMLIMIT_SYNC_IDLE)
        {
            if (!d->dirty && d->idle < NGX_HTTP_LLMLIMIT_SYNC_IDLE) {
                d->idle++;
            }

            d->dirty = 0;
            push->own[n++] = *d;
            continue;
        }

        if (d->cur == 0 && d->prev == 0) {
            *--gone = *d;
            nfree++;
        }
    }

    /* the array holds sh->n slots: "gone" never meets the pushed ones */

    for (i = 0; i < nfree; i++) {
        ngx_http_llmlimit_sync_delete(sh, gone[i].k);
    }

    return n;
}


/* EVAL script 0 epoch-key host, then five arguments per counter */

static void
ngx_http_llmlimit_sync_send(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push)
{
    u_char                    *p, *buf;
    size_t                     len, *argvlen;
    ngx_int_t                  rc;
    ngx_str_t                 *prefix;
    ngx_uint_t                 i, a, argc;
    const char               **argv;
    ngx_http_llmlimit_own_t   *d;
    ngx_http_llmlimit_zone_t  *zone;

    zone = sync->zone;

    argc = 5 + NGX_HTTP_LLMLIMIT_SYNC_ARGS * push->n;

    argv = ngx_palloc(push->pool, argc * sizeof(char *));
    argvlen = ngx_palloc(push->pool, argc * sizeof(size_t));

    prefix = ngx_http_llmlimit_redis_prefix(zone->redis);
    len = 2 * (prefix->len + sizeof("s{}:") - 1 + 32 + NGX_INT64_LEN)
          + 3 * NGX_INT64_LEN;

    buf = ngx_pnalloc(push->pool, push->n * len + prefix->len
                                  + sizeof("sync:epoch") + 16);

    if (argv == NULL || argvlen == NULL || buf == NULL) {
        ngx_http_llmlimit_sync_done(sync, push, 1);
        return;
    }

    argv[0] = "EVAL";
    argvlen[0] = 4;
    argv[1] = ngx_http_llmlimit_sync_lua;
    argvlen[1] = sizeof(ngx_http_llmlimit_sync_lua) - 1;
    argv[2] = "0";
    argvlen[2] = 1;

    p = buf;

#define ngx_http_llmlimit_sync_arg(fmt, ...)                                 \
    argv[a] = (char *) p;                                                    \
    p = ngx_sprintf(p, fmt, __VA_ARGS__);                                    \
    argvlen[a] = p - (u_char *) argv[a];                                     \
    a++

    a = 3;

    ngx_http_llmlimit_sync_arg("%Vsync:epoch", prefix);
    ngx_http_llmlimit_sync_arg("%016uxL", sync->sh->host);

    for (i = 0; i < push->n; i++) {
        d = &push->own[i];

        ngx_http_llmlimit_sync_arg("%Vs{%016uxL%016uxL}:%L", prefix,
                                   d->k[0], d->k[1], d->t);
        ngx_http_llmlimit_sync_arg("%Vs{%016uxL%016uxL}:%L", prefix,
                                   d->k[0], d->k[1],
                                   d->t - (int64_t) d->period);
        ngx_http_llmlimit_sync_arg("%uD", d->period);
        ngx_http_llmlimit_sync_arg("%uD", d->cur);

        /* the window before matters to sliding counters only */

        if (d->sliding) {
            ngx_http_llmlimit_sync_arg("%uD", d->prev);

        } else {
            ngx_http_llmlimit_sync_arg("%s", "-1");
        }
    }

#undef ngx_http_llmlimit_sync_arg

    rc = ngx_http_llmlimit_redis_command(zone->redis, (int) argc, argv,
                                         argvlen, &push->cmd);

    if (rc != NGX_OK) {
        /* Redis is not there: the counts wait for the next push */
        ngx_http_llmlimit_sync_done(sync, push, 1);
        return;
    }

    sync->push = push;
}


/* the others' totals of both windows of every counter pushed */

static void
ngx_http_llmlimit_sync_reply(ngx_http_llmlimit_redis_cmd_t *cmd, void *reply)
{
    ngx_uint_t                      i, ok;
    redisReply                     *rep;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_http_llmlimit_sync_sh_t    *sh;
    ngx_http_llmlimit_sync_push_t  *push;

    push = (ngx_http_llmlimit_sync_push_t *) cmd;
    sync = push->sync;
    zone = sync->zone;
    sh = sync->sh;
    rep = reply;

    ok = (rep != NULL && rep->type == REDIS_REPLY_ARRAY
          && rep->elements == 1 + 2 * push->n);

    for (i = 0; ok && i < rep->elements; i++) {
        if (rep->element[i]->type != REDIS_REPLY_INTEGER
            || rep->element[i]->integer < 0)
        {
            ok = 0;
        }
    }

    if (!ok) {
        if (rep && !sync->failed) {
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

        ngx_http_llmlimit_sync_done(sync, push, 1);
        return;
    }

    if (sync->failed) {
        ngx_log_error(NGX_LOG_NOTICE, sync->log, 0,
                      "llmlimit zone \"%V\": redis_sync pushes again",
                      &zone->name);
        sync->failed = 0;
    }

    ngx_shmtx_lock(&zone->shpool->mutex);

    if (sh->epoch != rep->element[0]->integer) {

        /* a new data set (a Redis restarted empty): push all again */

        if (sh->epoch) {
            sh->full = 1;
        }

        sh->epoch = rep->element[0]->integer;
    }

    for (i = 0; i < push->n; i++) {
        ngx_http_llmlimit_sync_update(sync, &push->own[i],
                                      rep->element[1 + 2 * i]->integer,
                                      rep->element[2 + 2 * i]->integer);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    ngx_http_llmlimit_sync_done(sync, push, 0);
}


/*
 * Under the zone's lock: a counter's local state takes the others' totals
 * of the windows pushed plus this host's own now, unless it holds more.
 */

static void
ngx_http_llmlimit_sync_update(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_own_t *d, int64_t cur, int64_t prev)
{
    int64_t                     P;
    ngx_http_llmlimit_own_t    *now;
    ngx_http_llmlimit_state_t  *st;

    st = ngx_http_llmlimit_shm_state_locked(sync->zone, d->k);
    if (st == NULL) {
        return;
    }

    P = d->period;

    /* this host's own counts in the windows pushed, as they are now */

    now = ngx_http_llmlimit_sync_slot(sync->sh, d->k, 0);

    if (now && now->t == d->t) {
        cur += now->cur;
        prev += now->prev;

    } else if (now && now->t == d->t + P) {
        cur += now->prev;
    }

    cur = ngx_min(cur, NGX_MAX_UINT32_VALUE);
    prev = ngx_min(prev, NGX_MAX_UINT32_VALUE);

    if (st->t == d->t) {
        st->cur = ngx_max(st->cur, (uint32_t) cur);

        if (d->sliding) {
            st->prev = ngx_max(st->prev, (uint32_t) prev);
        }

        return;
    }

    if (!d->sliding) {
        return;
    }

    /* a window before or after the state's: it rolls into or out of prev */

    if (st->t == d->t + P) {
        st->prev = ngx_max(st->prev, (uint32_t) cur);

    } else if (st->t == d->t - P) {
        st->cur = ngx_max(st->cur, (uint32_t) prev);
    }
}


/*
 * The end of a push; one that failed (may not have been applied, or
 * applied with its reply lost) has the whole table pushed with the next.
 */

static void
ngx_http_llmlimit_sync_done(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push, ngx_uint_t failed)
{
    ngx_http_llmlimit_zone_t  *zone;

    zone = sync->zone;

    ngx_shmtx_lock(&zone->shpool->mutex);

    if (sync->sh->pusher == ngx_pid) {
        sync->sh->pusher = 0;
    }

    if (failed) {
        sync->sh->full = 1;
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

    sh->own = ngx_slab_calloc(zone->shpool,
                              n * sizeof(ngx_http_llmlimit_own_t));
    if (sh->own == NULL) {
        return NGX_ERROR;
    }

    sh->mask = n - 1;
    sh->n = 0;
    sh->dropped = 0;
    sh->warn_time = 0;
    sh->last = 0;
    sh->pusher = 0;
    sh->full = 0;
    sh->epoch = 0;

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

    /* a push in flight is answered NULL: the next is a full one */

    ngx_http_llmlimit_redis_exit_process(cycle, zone);
}
