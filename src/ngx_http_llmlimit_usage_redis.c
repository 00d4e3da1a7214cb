
/*
 * Copyright (C) llmlimit developers
 */


/*
 * Fleet-wide usage: llmlimit_usage_zone ... redis=ZONE.
 *
 * Flushing.  Every second each worker takes what the zone's buckets have
 * not flushed yet (up to 1024 buckets; the rest the next second) and
 * sends it in one EVAL on a connection of its own to the zone's Redis
 * (ngx_http_llmlimit_redis_open()).  The script adds each bucket's counts
 * to the hash of its hour and the hash of its day (HINCRBY, fields
 * "GROUP:r", "GROUP:j", "GROUP:t", GROUP the 16 hex digits of the group's
 * hash), and the group's strings to the groups hash, the first time a
 * bucket is flushed.  Each call carries the worker's id and a sequence
 * number the script keeps: a call that reached Redis but whose reply was
 * lost is sent again with the same number and is then not applied twice.
 * While Redis is away the deltas stay in the zone (and the taken ones in
 * the worker) and go out when it is back: an outage loses nothing the
 * zone still holds.  A worker that exits gives what it took but could not
 * flush back to the zone, for the others.
 *
 * Keys: PREFIXusage:h:HOUR, PREFIXusage:d:DAY (Unix times), expiring
 * retention + a day after their last change; PREFIXusage:groups;
 * PREFIXusage:seq:WORKER.  Redis holds hours, whatever bucket= is.
 *
 * Reading.  The API reads the groups hash, then with HGETALL the hash of
 * each day that lies in one stride bucket of the range and the hash of
 * each other hour, pipelined on the same connection, so no single command
 * holds Redis long; the replies are added up as they come, then this
 * host's deltas not flushed yet.
 */


#include "ngx_http_llmlimit_usage.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>


#define NGX_HTTP_LLMLIMIT_USAGE_PERIOD   1000
#define NGX_HTTP_LLMLIMIT_USAGE_BATCH    1024
#define NGX_HTTP_LLMLIMIT_USAGE_STALL    10000
#define NGX_HTTP_LLMLIMIT_USAGE_TIMEOUT  30000


struct ngx_http_llmlimit_usage_flush_s {
    ngx_http_llmlimit_usage_zone_t    *uz;
    ngx_http_llmlimit_redis_t         *redis;
    ngx_log_t                         *log;
    ngx_event_t                        timer;
    ngx_str_t                          worker;
    uint64_t                           seq;
    ngx_pool_t                        *pool;       /* of the taken deltas */
    ngx_array_t                       *deltas;     /* NULL: none */
    int                                argc;
    const char                       **argv;
    size_t                            *argvlen;
    ngx_msec_t                         sent;
    time_t                             warned;
    unsigned                           inflight:1;
};


/* a group of the groups hash */
typedef struct {
    uint64_t                           gid;
    ngx_str_t                          fields[NGX_HTTP_LLMLIMIT_USAGE_NFIELDS];
    uint32_t                           fhash[NGX_HTTP_LLMLIMIT_USAGE_GROUP_BYS];
    ngx_uint_t                         used;
} ngx_http_llmlimit_usage_rgroup_t;


/*
 * An API request reading from Redis; allocated apart from the request,
 * which may go first ("r" is then NULL): it lives until the last reply.
 */
typedef struct {
    ngx_http_request_t                *r;
    ngx_pool_cleanup_t                *cln;        /* in r's pool */
    ngx_http_llmlimit_usage_query_t   *q;
    ngx_http_llmlimit_usage_zone_t    *uz;
    ngx_event_t                        timer;
    ngx_uint_t                         sent;
    ngx_uint_t                         replied;
    ngx_uint_t                         failed;
    time_t                            *times;      /* of the hashes */
    ngx_http_llmlimit_usage_rgroup_t  *groups;
    ngx_uint_t                         gmask;
} ngx_http_llmlimit_usage_read_t;


static void ngx_http_llmlimit_usage_flush(ngx_event_t *ev);
static ngx_int_t ngx_http_llmlimit_usage_flush_args(
    ngx_http_llmlimit_usage_flush_t *f);
static void ngx_http_llmlimit_usage_flushed(struct redisAsyncContext *ac,
    void *reply, void *data);
static void ngx_http_llmlimit_usage_forget(ngx_http_llmlimit_usage_flush_t *f);
static ngx_int_t ngx_http_llmlimit_usage_get(ngx_http_llmlimit_usage_read_t *rd,
    ngx_http_llmlimit_usage_flush_t *f, const char *what, time_t t);
static void ngx_http_llmlimit_usage_groups(struct redisAsyncContext *ac,
    void *reply, void *data);
static ngx_int_t ngx_http_llmlimit_usage_group_of(
    ngx_http_llmlimit_usage_rgroup_t *g, u_char *p, size_t len,
    ngx_pool_t *pool);
static void ngx_http_llmlimit_usage_counts(struct redisAsyncContext *ac,
    void *reply, void *data);
static ngx_int_t ngx_http_llmlimit_usage_gid(u_char *p, size_t len,
    uint64_t *gid);
static void ngx_http_llmlimit_usage_read_done(
    ngx_http_llmlimit_usage_read_t *rd);
static void ngx_http_llmlimit_usage_read_timeout(ngx_event_t *ev);
static void ngx_http_llmlimit_usage_read_cleanup(void *data);


/*
 * ARGV: prefix, worker, seq, ttl, n, n x (group, strings),
 * then (hour, day, group, passed, rejected, tokens)...
 */
static const char  ngx_http_llmlimit_usage_lua[] =
    "local p, ttl = ARGV[1], tonumber(ARGV[4])\n"
    "local sk = p .. 'usage:seq:' .. ARGV[2]\n"
    "local last = tonumber(redis.call('GET', sk) or '0')\n"
    "if tonumber(ARGV[3]) <= last then return 0 end\n"
    "local n = tonumber(ARGV[5])\n"
    "local i = 6\n"
    "local gk = p .. 'usage:groups'\n"
    "for k = 1, n do\n"
    "  redis.call('HSET', gk, ARGV[i], ARGV[i + 1])\n"
    "  i = i + 2\n"
    "end\n"
    "if n > 0 then redis.call('EXPIRE', gk, ttl) end\n"
    "local f = {':r', ':j', ':t'}\n"
    "while i + 5 <= #ARGV do\n"
    "  local keys = {p .. 'usage:h:' .. ARGV[i],\n"
    "                p .. 'usage:d:' .. ARGV[i + 1]}\n"
    "  for _, key in ipairs(keys) do\n"
    "    for c = 1, 3 do\n"
    "      if ARGV[i + 2 + c] ~= '0' then\n"
    "        redis.call('HINCRBY', key, ARGV[i + 2] .. f[c], ARGV[i + 2 + c])\n"
    "      end\n"
    "    end\n"
    "    redis.call('EXPIRE', key, ttl)\n"
    "  end\n"
    "  i = i + 6\n"
    "end\n"
    "redis.call('SET', sk, ARGV[3], 'EX', ttl)\n"
    "return 1\n";


static ngx_str_t  ngx_http_llmlimit_usage_empty[NGX_HTTP_LLMLIMIT_USAGE_NFIELDS];


ngx_int_t
ngx_http_llmlimit_usage_init_flush(ngx_cycle_t *cycle,
    ngx_http_llmlimit_usage_zone_t *uz)
{
    u_char                           *p;
    ngx_http_llmlimit_usage_flush_t  *f;

    f = ngx_pcalloc(cycle->pool, sizeof(ngx_http_llmlimit_usage_flush_t));
    if (f == NULL) {
        return NGX_ERROR;
    }

    f->redis = ngx_http_llmlimit_redis_open(cycle, uz->redis);
    if (f->redis == NULL) {
        return NGX_ERROR;
    }

    /* a worker's id, unique in the fleet and over time */

    p = ngx_pnalloc(cycle->pool, cycle->hostname.len + 4 * NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    f->worker.data = p;
    f->worker.len = ngx_sprintf(p, "%V:%P:%T:%ui", &cycle->hostname, ngx_pid,
                                ngx_time(), (ngx_uint_t) ngx_random())
                    - p;

    f->uz = uz;
    f->log = cycle->log;
    f->timer.handler = ngx_http_llmlimit_usage_flush;
    f->timer.data = f;
    f->timer.log = cycle->log;
    f->timer.cancelable = 1;

    ngx_add_timer(&f->timer, NGX_HTTP_LLMLIMIT_USAGE_PERIOD);

    uz->flush = f;

    return NGX_OK;
}


static void
ngx_http_llmlimit_usage_flush(ngx_event_t *ev)
{
    ngx_http_llmlimit_usage_flush_t *f = ev->data;

    ngx_int_t    rc;
    ngx_pool_t  *pool;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    ngx_add_timer(&f->timer, NGX_HTTP_LLMLIMIT_USAGE_PERIOD);

    if (f->inflight) {
        if (ngx_current_msec - f->sent >= NGX_HTTP_LLMLIMIT_USAGE_STALL) {
            /* the reply comes as NULL: sent again on the next turn */
            ngx_http_llmlimit_redis_reset(f->redis,
                                          "no reply to a usage flush");
        }

        return;
    }

    if (f->deltas == NULL) {
        pool = ngx_create_pool(16384, f->log);
        if (pool == NULL) {
            return;
        }

        f->deltas = ngx_array_create(pool, 64,
                                     sizeof(ngx_http_llmlimit_usage_delta_t));
        if (f->deltas == NULL) {
            ngx_destroy_pool(pool);
            return;
        }

        f->pool = pool;

        rc = ngx_http_llmlimit_usage_take(f->uz, f->deltas,
                                          NGX_HTTP_LLMLIMIT_USAGE_BATCH);

        if (rc == NGX_ERROR || f->deltas->nelts == 0
            || ngx_http_llmlimit_usage_flush_args(f) != NGX_OK)
        {
            ngx_http_llmlimit_usage_give_back(f->uz, f->deltas);
            ngx_http_llmlimit_usage_forget(f);
            return;
        }

        f->seq++;
    }

    rc = ngx_http_llmlimit_redis_own_command(f->redis,
                                         ngx_http_llmlimit_usage_flushed, f,
                                         f->argc, f->argv, f->argvlen);

    if (rc == NGX_OK) {
        f->inflight = 1;
        f->sent = ngx_current_msec;
    }

    /* else Redis is away: kept, sent when it is back */
}


static ngx_int_t
ngx_http_llmlimit_usage_flush_args(ngx_http_llmlimit_usage_flush_t *f)
{
    u_char                           *p;
    size_t                            len;
    ngx_str_t                        *prefix;
    ngx_uint_t                        i, j, n, argc;
    const char                      **argv;
    size_t                           *argvlen;
    ngx_http_llmlimit_usage_delta_t  *dl;

    dl = f->deltas->elts;
    n = 0;
    len = 0;

    for (i = 0; i < f->deltas->nelts; i++) {
        if (dl[i].first) {
            n++;

            for (j = 0; j < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; j++) {
                len += dl[i].fields[j].len + NGX_INT_T_LEN + 1;
            }
        }
    }

    argc = 8 + 2 * n + 6 * f->deltas->nelts;

    argv = ngx_palloc(f->pool, argc * sizeof(char *));
    argvlen = ngx_palloc(f->pool, argc * sizeof(size_t));
    p = ngx_pnalloc(f->pool, 4 * NGX_INT64_LEN + 17 * n + len
                             + f->deltas->nelts * (2 * NGX_INT64_LEN + 17
                                                   + 3 * NGX_INT64_LEN));

    if (argv == NULL || argvlen == NULL || p == NULL) {
        return NGX_ERROR;
    }

    prefix = ngx_http_llmlimit_redis_prefix(f->redis);

#define ngx_http_llmlimit_usage_arg(s, l)                                    \
    argv[argc] = (const char *) (s); argvlen[argc] = (l); argc++

#define ngx_http_llmlimit_usage_num(fmt, v)                                  \
    argv[argc] = (const char *) p;                                           \
    p = ngx_sprintf(p, fmt, v);                                              \
    argvlen[argc] = (u_char *) p - (u_char *) argv[argc]; argc++

    argc = 0;

    ngx_http_llmlimit_usage_arg("EVAL", 4);
    ngx_http_llmlimit_usage_arg(ngx_http_llmlimit_usage_lua,
                                sizeof(ngx_http_llmlimit_usage_lua) - 1);
    ngx_http_llmlimit_usage_arg("0", 1);
    ngx_http_llmlimit_usage_arg(prefix->data, prefix->len);
    ngx_http_llmlimit_usage_arg(f->worker.data, f->worker.len);
    ngx_http_llmlimit_usage_num("%uL", f->seq + 1);
    ngx_http_llmlimit_usage_num("%T", f->uz->retention + 86400);
    ngx_http_llmlimit_usage_num("%ui", n);

    for (i = 0; i < f->deltas->nelts; i++) {
        if (!dl[i].first) {
            continue;
        }

        ngx_http_llmlimit_usage_num("%016uxL", dl[i].hash[1]);

        argv[argc] = (const char *) p;

        for (j = 0; j < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; j++) {
            p = ngx_sprintf(p, "%uz:%V", dl[i].fields[j].len,
                            &dl[i].fields[j]);
        }

        argvlen[argc] = p - (u_char *) argv[argc];
        argc++;
    }

    for (i = 0; i < f->deltas->nelts; i++) {
        ngx_http_llmlimit_usage_num("%T", dl[i].start - dl[i].start % 3600);
        ngx_http_llmlimit_usage_num("%T", dl[i].start - dl[i].start % 86400);
        ngx_http_llmlimit_usage_num("%016uxL", dl[i].hash[1]);
        ngx_http_llmlimit_usage_num("%uL", dl[i].requests);
        ngx_http_llmlimit_usage_num("%uL", dl[i].rejected);
        ngx_http_llmlimit_usage_num("%uL", dl[i].tokens);
    }

#undef ngx_http_llmlimit_usage_arg
#undef ngx_http_llmlimit_usage_num

    f->argc = (int) argc;
    f->argv = argv;
    f->argvlen = argvlen;

    return NGX_OK;
}


static void
ngx_http_llmlimit_usage_flushed(struct redisAsyncContext *ac, void *reply,
    void *data)
{
    ngx_http_llmlimit_usage_flush_t *f = data;

    redisReply  *rp;

    f->inflight = 0;
    rp = reply;

    if (rp == NULL) {
        /* the connection is lost: sent again when it is back */
        return;
    }

    if (rp->type == REDIS_REPLY_INTEGER) {
        /* applied, or applied before (0) */
        ngx_http_llmlimit_usage_forget(f);
        return;
    }

    if (ngx_time() - f->warned >= 60) {
        f->warned = ngx_time();

        ngx_log_error(NGX_LOG_ERR, f->log, 0,
                      "llmlimit usage zone \"%V\": flush to redis failed: %*s",
                      &f->uz->name,
                      (size_t) (rp->type == REDIS_REPLY_ERROR
                                ? ngx_min(rp->len, 128) : 0),
                      rp->type == REDIS_REPLY_ERROR ? rp->str : "");
    }
}


static void
ngx_http_llmlimit_usage_forget(ngx_http_llmlimit_usage_flush_t *f)
{
    if (f->pool) {
        ngx_destroy_pool(f->pool);
    }

    f->pool = NULL;
    f->deltas = NULL;
}


void
ngx_http_llmlimit_usage_exit_flush(ngx_http_llmlimit_usage_zone_t *uz)
{
    ngx_http_llmlimit_usage_flush_t  *f;

    f = uz->flush;

    if (f->timer.timer_set) {
        ngx_del_timer(&f->timer);
    }

    /* a flush in flight is not known to be applied: given back too */

    ngx_http_llmlimit_redis_close(f->redis);

    if (f->deltas) {
        ngx_http_llmlimit_usage_give_back(uz, f->deltas);
        ngx_http_llmlimit_usage_forget(f);
    }
}


/* the API's reading */

ngx_int_t
ngx_http_llmlimit_usage_redis_query(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_zone_t *uz, ngx_http_llmlimit_usage_query_t *q)
{
    time_t                           from, to, d, h, hour0, kept;
    int64_t                          ds, de;
    ngx_uint_t                       n;
    ngx_pool_cleanup_t              *cln;
    ngx_http_llmlimit_usage_read_t  *rd;
    ngx_http_llmlimit_usage_flush_t *f;

    f = uz->flush;

    if (f == NULL) {
        return ngx_http_llmlimit_usage_fail(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                            "redis_unavailable",
                                            "Redis is not connected");
    }

    kept = q->kept - q->kept % 3600;
    from = (time_t) (q->start / 1000);
    from = ngx_max(from, kept);
    from -= from % 3600;
    to = (time_t) ((q->end + 999) / 1000);

    /* nothing is recorded ahead of now: a far end_time reads no more */

    to = ngx_min(to, ngx_time() + 86400);
    from = ngx_min(from, to);

    /* the hashes, at most: a day of hours for each day, and the groups */

    n = 1 + 24 * ((to - from) / 86400 + 2);

    rd = ngx_calloc(sizeof(ngx_http_llmlimit_usage_read_t)
                    + n * sizeof(time_t), r->connection->log);
    if (rd == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rd->times = (time_t *) (rd + 1);
    rd->r = r;
    rd->q = q;
    rd->uz = uz;

    if (ngx_http_llmlimit_usage_get(rd, f, "groups", 0) != NGX_OK) {
        ngx_free(rd);
        return ngx_http_llmlimit_usage_fail(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                            "redis_unavailable",
                                            "Redis is not connected");
    }

    for (d = from - from % 86400; d < to && !rd->failed; d += 86400) {
        ds = (int64_t) d * 1000;
        de = ds + 86400 * 1000;

        if (ds >= q->start && de <= q->end && d >= kept
            && (ds - q->start) / q->stride == (de - 1 - q->start) / q->stride)
        {
            if (ngx_http_llmlimit_usage_get(rd, f, "d", d) != NGX_OK) {
                rd->failed = 1;
            }

            continue;
        }

        hour0 = ngx_max(d, from);

        for (h = hour0; h < d + 86400 && h < to && !rd->failed; h += 3600) {
            if (ngx_http_llmlimit_usage_get(rd, f, "h", h) != NGX_OK) {
                rd->failed = 1;
            }
        }
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        /* the replies free it */
        rd->r = NULL;
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_llmlimit_usage_read_cleanup;
    cln->data = rd;
    rd->cln = cln;

    rd->timer.handler = ngx_http_llmlimit_usage_read_timeout;
    rd->timer.data = rd;
    rd->timer.log = r->connection->log;

    ngx_add_timer(&rd->timer, NGX_HTTP_LLMLIMIT_USAGE_TIMEOUT);

    r->main->count++;

    return NGX_DONE;
}


static ngx_int_t
ngx_http_llmlimit_usage_get(ngx_http_llmlimit_usage_read_t *rd,
    ngx_http_llmlimit_usage_flush_t *f, const char *what, time_t t)
{
    u_char                           *p;
    u_char                            key[256];
    size_t                            argvlen[2];
    ngx_str_t                        *prefix;
    ngx_int_t                         rc;
    const char                       *argv[2];
    ngx_http_llmlimit_redis_reply_pt  fn;

    prefix = ngx_http_llmlimit_redis_prefix(f->redis);

    if (t == 0) {
        p = ngx_slprintf(key, key + sizeof(key), "%Vusage:groups", prefix);
        fn = ngx_http_llmlimit_usage_groups;

    } else {
        p = ngx_slprintf(key, key + sizeof(key), "%Vusage:%s:%T", prefix,
                         what, t);
        fn = ngx_http_llmlimit_usage_counts;
    }

    argv[0] = "HGETALL";
    argvlen[0] = 7;
    argv[1] = (const char *) key;
    argvlen[1] = p - key;

    rc = ngx_http_llmlimit_redis_own_command(f->redis, fn, rd, 2, argv, argvlen);

    if (rc != NGX_OK) {
        return NGX_ERROR;
    }

    rd->times[rd->sent++] = t;

    return NGX_OK;
}


static void
ngx_http_llmlimit_usage_groups(struct redisAsyncContext *ac, void *reply,
    void *data)
{
    ngx_http_llmlimit_usage_read_t *rd = data;

    size_t                             i, n;
    uint64_t                           gid;
    ngx_uint_t                         j;
    redisReply                        *rp, *k, *v;
    ngx_http_llmlimit_usage_rgroup_t  *g;

    rp = reply;
    rd->replied++;

    if (rd->r == NULL || rd->failed) {
        goto done;
    }

    if (rp == NULL || rp->type != REDIS_REPLY_ARRAY || rp->elements % 2) {
        rd->failed = 1;
        goto done;
    }

    for (n = 16; n < rp->elements; n *= 2) { /* void */ }

    rd->gmask = n - 1;
    rd->groups = ngx_pcalloc(rd->r->pool,
                             n * sizeof(ngx_http_llmlimit_usage_rgroup_t));
    if (rd->groups == NULL) {
        rd->failed = 1;
        goto done;
    }

    for (i = 0; i < rp->elements; i += 2) {
        k = rp->element[i];
        v = rp->element[i + 1];

        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING
            || ngx_http_llmlimit_usage_gid((u_char *) k->str, k->len, &gid)
               != NGX_OK)
        {
            continue;
        }

        for (j = gid & rd->gmask; rd->groups[j].used; j = (j + 1) & rd->gmask)
        {
            if (rd->groups[j].gid == gid) {
                break;
            }
        }

        g = &rd->groups[j];

        if (g->used) {
            continue;
        }

        if (ngx_http_llmlimit_usage_group_of(g, (u_char *) v->str, v->len,
                                             rd->r->pool)
            != NGX_OK)
        {
            continue;
        }

        g->gid = gid;
        g->used = 1;
    }

done:

    ngx_http_llmlimit_usage_read_done(rd);
}


/* the strings of a group: "LEN:DATA" for each field */

static ngx_int_t
ngx_http_llmlimit_usage_group_of(ngx_http_llmlimit_usage_rgroup_t *g,
    u_char *p, size_t len, ngx_pool_t *pool)
{
    u_char      *last, *copy;
    size_t       n;
    ngx_uint_t   i;

    copy = ngx_pnalloc(pool, len + 1);
    if (copy == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(copy, p, len);
    p = copy;
    last = p + len;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; i++) {
        n = 0;

        while (p < last && *p >= '0' && *p <= '9') {
            n = n * 10 + (*p++ - '0');

            if (n > NGX_HTTP_LLMLIMIT_USAGE_FIELD_MAX) {
                return NGX_ERROR;
            }
        }

        if (p == last || *p++ != ':' || (size_t) (last - p) < n) {
            return NGX_ERROR;
        }

        g->fields[i].data = p;
        g->fields[i].len = n;
        p += n;

        if (i % 2 == 0) {
            g->fhash[i / 2] = ngx_http_llmlimit_usage_hash(p - n, n);
        }
    }

    return (p == last) ? NGX_OK : NGX_ERROR;
}


static void
ngx_http_llmlimit_usage_counts(struct redisAsyncContext *ac, void *reply,
    void *data)
{
    ngx_http_llmlimit_usage_read_t *rd = data;

    off_t                              v;
    time_t                             t;
    size_t                             i;
    uint64_t                           gid, c[3];
    ngx_str_t                         *f, *name, none;
    ngx_uint_t                         j, by, wh, ih;
    redisReply                        *rp, *k, *val;
    ngx_http_llmlimit_usage_rgroup_t  *g;

    rp = reply;
    t = rd->times[rd->replied++];
    ngx_str_null(&none);

    if (rd->r == NULL || rd->failed) {
        goto done;
    }

    if (rp == NULL || rp->type != REDIS_REPLY_ARRAY || rp->elements % 2) {
        rd->failed = 1;
        goto done;
    }

    by = 2 * rd->q->group_by;

    for (i = 0; i < rp->elements; i += 2) {
        k = rp->element[i];
        val = rp->element[i + 1];

        if (k->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING
            || k->len != 18 || k->str[16] != ':'
            || ngx_http_llmlimit_usage_gid((u_char *) k->str, 16, &gid)
               != NGX_OK)
        {
            continue;
        }

        v = ngx_atoof((u_char *) val->str, val->len);
        if (v <= 0) {
            continue;
        }

        c[0] = 0;
        c[1] = 0;
        c[2] = 0;

        switch (k->str[17]) {
        case 'r':
            c[0] = v;
            break;
        case 'j':
            c[1] = v;
            break;
        case 't':
            c[2] = v;
            break;
        default:
            continue;
        }

        g = NULL;

        if (rd->groups) {
            for (j = gid & rd->gmask;
                 rd->groups[j].used;
                 j = (j + 1) & rd->gmask)
            {
                if (rd->groups[j].gid == gid) {
                    g = &rd->groups[j];
                    break;
                }
            }
        }

        /* a group whose strings are lost counts as the empty one */

        if (g) {
            f = g->fields;
            wh = g->fhash[0];
            ih = g->fhash[rd->q->group_by];

        } else {
            f = ngx_http_llmlimit_usage_empty;
            wh = ngx_http_llmlimit_usage_hash(NULL, 0);
            ih = wh;
        }

        name = (by + 1 < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS) ? &f[by + 1]
                                                         : &none;

        if (ngx_http_llmlimit_usage_add(rd->q, t, &f[0], wh, &f[by], ih, name,
                                        c[0], c[1], c[2])
            != NGX_OK)
        {
            rd->failed = 1;
            break;
        }
    }

done:

    ngx_http_llmlimit_usage_read_done(rd);
}


static ngx_int_t
ngx_http_llmlimit_usage_gid(u_char *p, size_t len, uint64_t *gid)
{
    ngx_int_t  n;

    if (len != 16) {
        return NGX_ERROR;
    }

    *gid = 0;

    while (len--) {
        n = ngx_hextoi(p++, 1);
        if (n == NGX_ERROR) {
            return NGX_ERROR;
        }

        *gid = *gid << 4 | (uint64_t) n;
    }

    return NGX_OK;
}


static void
ngx_http_llmlimit_usage_read_done(ngx_http_llmlimit_usage_read_t *rd)
{
    ngx_int_t            rc;
    ngx_http_request_t  *r;

    if (rd->replied < rd->sent) {
        return;
    }

    r = rd->r;

    if (r == NULL) {
        ngx_free(rd);
        return;
    }

    /* the request's cleanup must not touch rd any more */
    rd->r = NULL;
    rd->cln->handler = NULL;

    if (rd->timer.timer_set) {
        ngx_del_timer(&rd->timer);
    }

    if (rd->failed) {
        rc = ngx_http_llmlimit_usage_fail(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                          "redis_unavailable",
                                          "Redis did not answer");

    } else if (ngx_http_llmlimit_usage_collect(rd->uz, rd->q, 1) != NGX_OK) {
        rc = NGX_HTTP_INTERNAL_SERVER_ERROR;

    } else {
        rc = ngx_http_llmlimit_usage_answer(r, rd->q);
    }

    ngx_free(rd);

    ngx_http_finalize_request(r, rc);
}


static void
ngx_http_llmlimit_usage_read_timeout(ngx_event_t *ev)
{
    ngx_http_llmlimit_usage_read_t *rd = ev->data;

    ngx_http_request_t  *r;

    /* the replies still to come free rd: the request's cleanup lets it be */

    r = rd->r;
    rd->r = NULL;
    rd->cln->handler = NULL;

    ngx_http_finalize_request(r,
             ngx_http_llmlimit_usage_fail(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                          "redis_unavailable",
                                          "Redis did not answer in time"));
}


static void
ngx_http_llmlimit_usage_read_cleanup(void *data)
{
    ngx_http_llmlimit_usage_read_t *rd = data;

    if (rd->r == NULL) {
        return;
    }

    rd->r = NULL;

    if (rd->timer.timer_set) {
        ngx_del_timer(&rd->timer);
    }
}
