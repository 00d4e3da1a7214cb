
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
 * not yet pushed.  One push per host: every worker has a timer of TIME,
 * and the first whose timer fires at least 3/4 TIME after the last push
 * takes the table (and empties it) and sends one EVAL that adds the
 * deltas to Redis and returns the cluster totals of both windows, which
 * are written back into the local states (never lowering them); a
 * counter stays in the table for two pushes after its last delta, so a
 * host that stopped admitting still reads the others' counts.  The
 * windows are the local clock's aligned windows, floor(now / P) * P, the
 * same on every host whose clock is synchronised; a window's count is
 * the key PREFIX "s{" counter "}:" window-start, expiring after the window
 * stops mattering.
 *
 * When Redis cannot be reached (or answers an error) the taken deltas go
 * back into the table, and are pushed with the next: requests are decided
 * locally meanwhile.  The table is bounded; deltas of windows that no
 * longer matter are dropped when a counter moves on, and a counter that
 * finds the table full is counted locally only (a warning per minute).
 * Connection changes are logged once by the Redis connection.
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

/* deltas in the table, at most: for every this many counters of a zone */
#define NGX_HTTP_LLMLIMIT_SYNC_RATIO     4
#define NGX_HTTP_LLMLIMIT_SYNC_MIN       64
#define NGX_HTTP_LLMLIMIT_SYNC_MAX       65536


typedef struct {
    uint64_t                        k[2];        /* the shm counter's key */
    int64_t                         t;           /* window of "cur" */
    uint32_t                        period;      /* 0: a free slot */
    int32_t                         cur;         /* not pushed, in t */
    int32_t                         prev;        /* ... in t - period */
    uint32_t                        idle;        /* pushes without deltas */
} ngx_http_llmlimit_delta_t;


typedef struct {
    ngx_uint_t                      mask;
    ngx_uint_t                      n;
    ngx_uint_t                      dropped;
    int64_t                         warn_time;
    int64_t                         last;        /* push taken, ms */
    ngx_pid_t                       pusher;      /* 0: none in flight */
    ngx_http_llmlimit_delta_t      *deltas;
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
    ngx_http_llmlimit_delta_t      *deltas;
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
static void ngx_http_llmlimit_sync_reply(ngx_http_llmlimit_redis_cmd_t *cmd,
    void *reply);
static void ngx_http_llmlimit_sync_restore(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push);
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
    ngx_http_llmlimit_sync_count,
    ngx_http_llmlimit_sync_exit_process
};


/*
 * KEYS: none (the keys are made by the caller).  ARGV, five per counter:
 * key of the window, key of the window before, period, delta of the
 * window, delta of the window before.  Returns both totals per counter.
 */

static char  ngx_http_llmlimit_sync_lua[] =
    "local r, n = {}, 0\n"
    "for i = 1, #ARGV, 5 do\n"
    "  local p = tonumber(ARGV[i + 2])\n"
    "  for j = 0, 1 do\n"
    "    local k, d = ARGV[i + j], tonumber(ARGV[i + 3 + j])\n"
    "    local v\n"
    "    if d ~= 0 then\n"
    "      v = redis.call('INCRBY', k, d)\n"
    "      redis.call('PEXPIRE', k, (2 - j) * p + 1000)\n"
    "    else\n"
    "      v = tonumber(redis.call('GET', k) or '0') or 0\n"
    "    end\n"
    "    n = n + 1\n"
    "    r[n] = v\n"
    "  end\n"
    "end\n"
    "return r\n";


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
    }

    ngx_http_llmlimit_sync_roll(d, w);

    if (w == d->t) {
        d->cur += (int32_t) n;

    } else if (w == d->t - d->period) {
        d->prev += (int32_t) n;
    }
}


/* the slot of a counter's deltas; with "create", a free one if none */

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

    sh->n++;
    d->k[0] = k[0];
    d->k[1] = k[1];
    d->cur = 0;
    d->prev = 0;
    d->idle = 0;

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
    u_char                         *p, *buf;
    size_t                          len, *argvlen;
    int64_t                         now;
    ngx_str_t                      *prefix;
    ngx_int_t                       rc;
    ngx_uint_t                      i, n, dropped;
    const char                    **argv;
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

    if (sync->push) {
        /* still in flight from this worker */
        return;
    }

    now = ngx_http_llmlimit_now();
    dropped = 0;
    push = NULL;
    pool = NULL;

    ngx_shmtx_lock(&zone->shpool->mutex);

    if ((sh->pusher && now - sh->last < NGX_HTTP_LLMLIMIT_SYNC_STALE)
        || now - sh->last < (int64_t) (sync->interval / 4 * 3)
        || sh->n == 0)
    {
        ngx_shmtx_unlock(&zone->shpool->mutex);
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

    pool = ngx_create_pool(4096, sync->log);

    if (pool) {
        push = ngx_pcalloc(pool, sizeof(ngx_http_llmlimit_sync_push_t));
        if (push) {
            push->deltas = ngx_palloc(pool, sh->n
                                      * sizeof(ngx_http_llmlimit_delta_t));
        }
    }

    if (push == NULL || push->deltas == NULL) {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        goto failed;
    }

    /*
     * the counters with deltas, and for two more pushes those without: a
     * host that stopped admitting still reads the others' last counts
     */

    n = 0;

    for (i = 0; i <= sh->mask; i++) {
        d = &sh->deltas[i];

        if (d->period == 0) {
            continue;
        }

        if (d->cur || d->prev) {
            d->idle = 0;

        } else if (d->idle++ >= 2) {
            continue;
        }

        push->deltas[n++] = *d;
    }

    ngx_memzero(sh->deltas, (sh->mask + 1) * sizeof(ngx_http_llmlimit_delta_t));
    sh->n = 0;

    for (i = 0; i < n; i++) {
        d = ngx_http_llmlimit_sync_slot(sh, push->deltas[i].k, 1);
        *d = push->deltas[i];
        d->cur = 0;
        d->prev = 0;
    }

    sh->pusher = n ? ngx_pid : 0;

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (dropped) {
        ngx_log_error(NGX_LOG_WARN, sync->log, 0,
                      "llmlimit zone \"%V\": no room for the deltas of "
                      "%ui requests, counted on this host only",
                      &zone->name, dropped);
    }

    push->n = n;
    push->sync = sync;
    push->pool = pool;
    push->cmd.handler = ngx_http_llmlimit_sync_reply;

    if (n == 0) {
        ngx_destroy_pool(pool);
        return;
    }

    /* EVAL script 0, then five arguments per counter */

    argv = ngx_palloc(pool, (3 + 5 * n) * sizeof(char *));
    argvlen = ngx_palloc(pool, (3 + 5 * n) * sizeof(size_t));

    prefix = ngx_http_llmlimit_redis_prefix(zone->redis);
    len = 2 * (prefix->len + sizeof("s{}:") - 1 + 32 + NGX_INT64_LEN)
          + 3 * NGX_INT64_LEN;

    buf = ngx_pnalloc(pool, n * len);

    if (argv == NULL || argvlen == NULL || buf == NULL) {
        ngx_http_llmlimit_sync_restore(sync, push);
        ngx_http_llmlimit_sync_done(sync, push);
        return;
    }

    argv[0] = "EVAL";
    argvlen[0] = 4;
    argv[1] = ngx_http_llmlimit_sync_lua;
    argvlen[1] = sizeof(ngx_http_llmlimit_sync_lua) - 1;
    argv[2] = "0";
    argvlen[2] = 1;

    p = buf;

    for (i = 0; i < n; i++) {
        d = &push->deltas[i];

        argv[3 + 5 * i] = (char *) p;
        p = ngx_sprintf(p, "%Vs{%016uxL%016uxL}:%L", prefix, d->k[0], d->k[1],
                        d->t);
        argvlen[3 + 5 * i] = p - (u_char *) argv[3 + 5 * i];

        argv[4 + 5 * i] = (char *) p;
        p = ngx_sprintf(p, "%Vs{%016uxL%016uxL}:%L", prefix, d->k[0], d->k[1],
                        d->t - (int64_t) d->period);
        argvlen[4 + 5 * i] = p - (u_char *) argv[4 + 5 * i];

        argv[5 + 5 * i] = (char *) p;
        p = ngx_sprintf(p, "%uD", d->period);
        argvlen[5 + 5 * i] = p - (u_char *) argv[5 + 5 * i];

        argv[6 + 5 * i] = (char *) p;
        p = ngx_sprintf(p, "%D", d->cur);
        argvlen[6 + 5 * i] = p - (u_char *) argv[6 + 5 * i];

        argv[7 + 5 * i] = (char *) p;
        p = ngx_sprintf(p, "%D", d->prev);
        argvlen[7 + 5 * i] = p - (u_char *) argv[7 + 5 * i];
    }

    rc = ngx_http_llmlimit_redis_command(zone->redis, (int) (3 + 5 * n),
                                         argv, argvlen, &push->cmd);

    if (rc != NGX_OK) {
        /* Redis is not there: the deltas wait for the next push */
        ngx_http_llmlimit_sync_restore(sync, push);
        ngx_http_llmlimit_sync_done(sync, push);
        return;
    }

    sync->push = push;

    return;

failed:

    ngx_log_error(NGX_LOG_ALERT, sync->log, 0,
                  "llmlimit zone \"%V\": no memory for a push", &zone->name);

    ngx_shmtx_lock(&zone->shpool->mutex);
    sh->pusher = 0;
    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (pool) {
        ngx_destroy_pool(pool);
    }
}


/*
 * The cluster's totals of both windows of every counter pushed: the local
 * state takes them, plus what was counted here since the push was taken,
 * unless it already holds more (a Redis that lost its data).
 */

static void
ngx_http_llmlimit_sync_reply(ngx_http_llmlimit_redis_cmd_t *cmd, void *reply)
{
    int64_t                         cur, prev, uc, up;
    ngx_uint_t                      i, ok;
    redisReply                     *rep, *e;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_sync_t       *sync;
    ngx_http_llmlimit_state_t      *st;
    ngx_http_llmlimit_delta_t      *d, *now;
    ngx_http_llmlimit_sync_sh_t    *sh;
    ngx_http_llmlimit_sync_push_t  *push;

    push = (ngx_http_llmlimit_sync_push_t *) cmd;
    sync = push->sync;
    zone = sync->zone;
    sh = sync->sh;
    rep = reply;

    ok = (rep != NULL && rep->type == REDIS_REPLY_ARRAY
          && rep->elements == 2 * push->n);

    for (i = 0; ok && i < rep->elements; i++) {
        if (rep->element[i]->type != REDIS_REPLY_INTEGER) {
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

        ngx_http_llmlimit_sync_restore(sync, push);
        ngx_http_llmlimit_sync_done(sync, push);
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
        d = &push->deltas[i];

        e = rep->element[2 * i];
        cur = e->integer;
        e = rep->element[2 * i + 1];
        prev = e->integer;

        st = ngx_http_llmlimit_shm_state_locked(zone, d->k);
        if (st == NULL) {
            continue;
        }

        /* counted here since the push was taken */

        now = ngx_http_llmlimit_sync_slot(sh, d->k, 0);
        uc = 0;
        up = 0;

        if (now && now->t == d->t) {
            uc = now->cur;
            up = now->prev;

        } else if (now && now->t == d->t + (int64_t) d->period) {
            up = now->prev;
        }

        if (st->t == d->t) {
            cur += uc;
            prev += up;

            if (cur > (int64_t) st->cur) {
                st->cur = (uint32_t) ngx_min(cur, NGX_MAX_UINT32_VALUE);
            }

            if (prev > (int64_t) st->prev) {
                st->prev = (uint32_t) ngx_min(prev, NGX_MAX_UINT32_VALUE);
            }

        } else if (st->t == d->t + (int64_t) d->period) {
            cur += up;

            if (cur > (int64_t) st->prev) {
                st->prev = (uint32_t) ngx_min(cur, NGX_MAX_UINT32_VALUE);
            }
        }
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    ngx_http_llmlimit_sync_done(sync, push);
}


/* the deltas of a push that did not reach Redis go back to the table */

static void
ngx_http_llmlimit_sync_restore(ngx_http_llmlimit_sync_t *sync,
    ngx_http_llmlimit_sync_push_t *push)
{
    ngx_uint_t                    i;
    ngx_http_llmlimit_zone_t     *zone;
    ngx_http_llmlimit_delta_t    *d, *s;
    ngx_http_llmlimit_sync_sh_t  *sh;

    zone = sync->zone;
    sh = sync->sh;

    ngx_shmtx_lock(&zone->shpool->mutex);

    for (i = 0; i < push->n; i++) {
        s = &push->deltas[i];

        d = ngx_http_llmlimit_sync_slot(sh, s->k, 1);

        if (d == NULL) {
            sh->dropped += (s->cur > 0 ? s->cur : 0)
                           + (s->prev > 0 ? s->prev : 0);
            continue;
        }

        if (d->period == 0) {
            *d = *s;
            d->idle = 0;
            continue;
        }

        if (d->t == s->t) {
            d->cur += s->cur;
            d->prev += s->prev;

        } else if (d->t == s->t + (int64_t) s->period) {
            d->prev += s->cur;
        }
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


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
    if (sh->deltas == NULL) {
        return NGX_ERROR;
    }

    sh->mask = n - 1;
    sh->n = 0;
    sh->dropped = 0;
    sh->warn_time = 0;
    sh->last = 0;
    sh->pusher = 0;

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

    /* a push in flight is answered NULL: its deltas go back to the table */

    ngx_http_llmlimit_redis_exit_process(cycle, zone);
}
