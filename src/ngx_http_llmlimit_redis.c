
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The Redis store.  Each worker holds one hiredis asynchronous connection
 * per zone, driven by nginx's event loop through the adapter below; all
 * requests of the worker share it, so commands issued while others are in
 * flight are pipelined.  The requests of one turn of the event loop go out
 * together in a call, one EVALSHA that checks and counts the counters of
 * each of them in the zone, request by request (see
 * ngx_http_llmlimit_redis_lua.h); a posted event sends the calls at the end
 * of the turn.
 *
 * Connection states:
 *
 *   DOWN        no context; the worker timer reconnects with backoff;
 *   FINDING     no context yet: asking where to connect (a host name
 *               resolved, Sentinel asked; src/ngx_http_llmlimit_redis_addr.c);
 *   CONNECTING  connect(2) in progress, AUTH, SELECT and SCRIPT LOAD
 *               already queued behind it;
 *   READY       the SCRIPT LOAD reply arrived: requests are sent.
 *
 * While CONNECTING the timer bounds the handshake.  Requests are queued
 * while FINDING or CONNECTING only if Redis was not known to be lost (the
 * first connection of a worker), otherwise they fail at once and the
 * zone's failure policy decides.
 *
 * A slow reply costs the request that waited for it, not the connection:
 * when redis_timeout expires the request goes on by its failure policy
 * (counted in a warning, at most one line a second), and its call keeps it
 * as "late".  The connection is lost only on an error, EOF, a reply of the
 * wrong shape, or no reply at all for 20 times redis_timeout (at least
 * STALL).  A late reply that says Redis counted the request is taken back
 * if the request was not let through in the end, so that each store counts
 * a request at most once.
 *
 * Taking back: when a later zone rejects a request that Redis counted (or
 * a "closed" zone answers 503), refund entries for its counters join the
 * open call, sent at the end of the turn as any other; the script applies
 * them before the call's requests.  The replies carry Redis' time, with
 * which a refund finds the window it counted in.
 *
 * With redis_failure=local, what Redis admitted is also counted in the
 * zone's shared memory, unchecked (shadow counters): when Redis is lost,
 * the local fallback goes on from this host's recent usage.
 */


#include "ngx_http_llmlimit.h"
#include "ngx_http_llmlimit_redis_addr.h"
#include <ngx_sha1.h>

#include <sys/ioctl.h>

#include <hiredis/sds.h>

#include "ngx_http_llmlimit_redis_lua.h"


#define NGX_HTTP_LLMLIMIT_REDIS_DOWN        0
#define NGX_HTTP_LLMLIMIT_REDIS_CONNECTING  1
#define NGX_HTTP_LLMLIMIT_REDIS_READY       2
#define NGX_HTTP_LLMLIMIT_REDIS_FINDING     3

#define NGX_HTTP_LLMLIMIT_REDIS_AUTH        1
#define NGX_HTTP_LLMLIMIT_REDIS_SELECT      2
#define NGX_HTTP_LLMLIMIT_REDIS_LOAD        3
#define NGX_HTTP_LLMLIMIT_REDIS_ROLE        4

/* reconnect backoff, ms */
#define NGX_HTTP_LLMLIMIT_REDIS_BACKOFF     100
#define NGX_HTTP_LLMLIMIT_REDIS_BACKOFF_MAX 2000

/* the handshake and a silent connection get at least this long, ms */
#define NGX_HTTP_LLMLIMIT_REDIS_CONNECT     1000
#define NGX_HTTP_LLMLIMIT_REDIS_STALL       2000

/* requests waiting for replies on one connection, at most */
#define NGX_HTTP_LLMLIMIT_REDIS_PENDING     4096

/* reads of one readiness notification before yielding to other events */
#define NGX_HTTP_LLMLIMIT_REDIS_READS       64

/*
 * requests, counters and refund entries of one call, at most; a request
 * and the refunds of a request (two entries a token budget) always fit
 */
#define NGX_HTTP_LLMLIMIT_REDIS_BATCH       64
#define NGX_HTTP_LLMLIMIT_REDIS_KEYS        256
#define NGX_HTTP_LLMLIMIT_REDIS_REFUNDS     64

#if (NGX_HTTP_LLMLIMIT_REDIS_KEYS < NGX_HTTP_LLMLIMIT_MAX_COUNTERS          \
     || NGX_HTTP_LLMLIMIT_REDIS_REFUNDS < 2 * NGX_HTTP_LLMLIMIT_MAX_COUNTERS)
#error "a call must hold the counters of a request"
#endif

#if (NGX_HTTP_LLMLIMIT_REDIS_KEYS > 256 || NGX_HTTP_LLMLIMIT_MAX_COUNTERS > 255)
#error "a byte must say a counter's limit and a request's counters"
#endif

/*
 * EVALSHA sha numkeys key... m L f (kind period count cost)...
 * (limit amount time)... ns limits; the keys of a call, entries included,
 * are at most REDIS_KEYS, and so are its distinct limits
 */
#define NGX_HTTP_LLMLIMIT_REDIS_ARGS                                          \
    (6 + NGX_HTTP_LLMLIMIT_REDIS_BATCH + 6 * NGX_HTTP_LLMLIMIT_REDIS_KEYS     \
     + 3 * NGX_HTTP_LLMLIMIT_REDIS_REFUNDS)

/* the script's kind of a limit: the algorithm, + 4 for a token budget */
#define NGX_HTTP_LLMLIMIT_REDIS_TOKENS      4

/* Redis' time in a reply, ms, below this */
#define NGX_HTTP_LLMLIMIT_REDIS_TIME_MAX    (1LL << 50)

/* what the warning line of the failed requests counts */
#define NGX_HTTP_LLMLIMIT_REDIS_TIMEOUT     0
#define NGX_HTTP_LLMLIMIT_REDIS_OVERFLOW    1


typedef struct ngx_http_llmlimit_redis_wait_s  ngx_http_llmlimit_redis_wait_t;
typedef struct ngx_http_llmlimit_redis_call_s  ngx_http_llmlimit_redis_call_t;


struct ngx_http_llmlimit_redis_s {
    /* configuration */
    ngx_http_llmlimit_zone_t       *zone;
    ngx_str_t                       addr;          /* for the logs */
    ngx_http_llmlimit_redis_addr_t *where;         /* of the server */
    ngx_int_t                       db;            /* -1: none */
    ngx_str_t                       password;
    ngx_str_t                       prefix;
    ngx_msec_t                      timeout;
    ngx_str_t                       sha;           /* of the script */

    /* per worker */
    redisAsyncContext              *ac;
    ngx_uint_t                      state;
    ngx_pool_t                     *pool;
    ngx_log_t                      *log;
    ngx_event_t                     event;         /* reconnect, deadline */
    ngx_msec_t                      backoff;
    ngx_msec_t                      since;         /* last sign of life */
    ngx_queue_t                     busy;          /* owed a reply */
    ngx_queue_t                     free;
    ngx_uint_t                      pending;

    ngx_queue_t                     calls;         /* not sent yet */
    ngx_queue_t                     free_calls;
    ngx_event_t                     flush;         /* sends the calls */

    ngx_event_t                     warn;          /* one line a second */
    ngx_uint_t                      timeouts;      /* since the last line */
    ngx_uint_t                      overflows;

    const char                    **argv;
    size_t                         *argvlen;
    u_char                         *buf;
    u_char                         *cmd;           /* the call, formatted */
    void                          **limits;        /* distinct, of a call */
    u_char                         *idx;           /* a key's limit */

    u_char                          reason[128];

    ngx_http_llmlimit_redis_peer_t  peer;          /* last found */

    unsigned                        healthy:1;
    unsigned                        exiting:1;
    unsigned                        moved:1;       /* reconnect at once */
    unsigned                        found:1;       /* peer is set */
};


/* what a call sends for a counter: a copy, the request may go first */

typedef struct {
    u_char                          hash[16];
    ngx_msec_t                      period;
    ngx_uint_t                      count;
    ngx_uint_t                      algorithm;
    ngx_uint_t                      cost;
    ngx_uint_t                      tokens;
} ngx_http_llmlimit_redis_counter_t;


/*
 * A request owed a reply; owned by its call until the call's reply.  While
 * the request lives and nothing else decided for it, w->b is its batch
 * (and b->data is w), w->cln its pool cleanup; w->r is the request while
 * it waits, NULL once it timed out.  "refund": the request was not let
 * through, what Redis counts for it is taken back.
 */

struct ngx_http_llmlimit_redis_wait_s {
    ngx_http_llmlimit_redis_t      *redis;
    ngx_http_request_t             *r;             /* NULL: nobody waits */
    ngx_http_llmlimit_batch_t      *b;             /* NULL: detached */
    ngx_pool_cleanup_t             *cln;
    ngx_event_t                     timer;
    ngx_queue_t                     queue;
    ngx_int_t                       rc;
    ngx_uint_t                      n;
    unsigned                        refund:1;
    ngx_http_llmlimit_redis_counter_t  counters[NGX_HTTP_LLMLIMIT_MAX_COUNTERS];
};


/*
 * A change to a counter: "amount" < 0 takes back what was counted at
 * Redis' time "time" (a refund, or the estimate a token charge replaces),
 * "amount" > 0 charges tokens at the script's time (what was used).
 */

typedef struct {
    ngx_http_llmlimit_redis_counter_t  counter;
    int64_t                            time;
    int64_t                            amount;
} ngx_http_llmlimit_redis_refund_t;


/*
 * The requests of one EVALSHA, in order; in redis->calls until sent,
 * then owned by hiredis until its callback runs.
 */

struct ngx_http_llmlimit_redis_call_s {
    ngx_http_llmlimit_redis_t      *redis;
    ngx_uint_t                      nwaits;
    ngx_uint_t                      nkeys;         /* of the requests */
    ngx_uint_t                      nrefunds;
    int64_t                         now;           /* Redis', from the reply */
    uint64_t                        sent;          /* us, for the metrics */
    ngx_queue_t                     queue;
    unsigned                        eval:1;        /* resent with EVAL */
    ngx_http_llmlimit_redis_wait_t *waits[NGX_HTTP_LLMLIMIT_REDIS_BATCH];
    ngx_http_llmlimit_redis_refund_t  refunds[NGX_HTTP_LLMLIMIT_REDIS_REFUNDS];
};


static ngx_int_t ngx_http_llmlimit_redis_check(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static void ngx_http_llmlimit_redis_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static void ngx_http_llmlimit_redis_charge(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t tokens);
static ngx_uint_t ngx_http_llmlimit_redis_amounts(
    ngx_http_llmlimit_counter_t *c, ngx_uint_t tokens, int64_t *amount);
static void ngx_http_llmlimit_redis_copy(ngx_http_llmlimit_redis_counter_t *wc,
    ngx_http_llmlimit_counter_t *c);
static ngx_http_llmlimit_redis_refund_t *ngx_http_llmlimit_redis_refunds(
    ngx_http_llmlimit_redis_t *redis, ngx_uint_t n);
static ngx_http_llmlimit_redis_call_t *ngx_http_llmlimit_redis_call(
    ngx_http_llmlimit_redis_t *redis, ngx_uint_t n, ngx_uint_t refunds);
static void ngx_http_llmlimit_redis_flush(ngx_event_t *ev);
static ngx_int_t ngx_http_llmlimit_redis_send(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_call_t *call);
static u_char *ngx_http_llmlimit_redis_int(ngx_http_llmlimit_redis_t *redis,
    int *a, u_char *p, int64_t v);
static ngx_inline ngx_uint_t ngx_http_llmlimit_redis_same(
    ngx_http_llmlimit_redis_counter_t *a, ngx_http_llmlimit_redis_counter_t *b);
static u_char *ngx_http_llmlimit_redis_key(ngx_http_llmlimit_redis_t *redis,
    u_char *p, ngx_http_llmlimit_redis_counter_t *c);
static void ngx_http_llmlimit_redis_reply(redisAsyncContext *ac, void *reply,
    void *privdata);
static ngx_int_t ngx_http_llmlimit_redis_result(
    ngx_http_llmlimit_redis_t *redis, ngx_http_llmlimit_redis_call_t *call,
    redisReply *reply);
static void ngx_http_llmlimit_redis_finish(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_call_t *call, ngx_int_t rc);
static void ngx_http_llmlimit_redis_timeout(ngx_event_t *ev);
static void ngx_http_llmlimit_redis_stalled(ngx_http_llmlimit_redis_t *redis);
static void ngx_http_llmlimit_redis_slow(ngx_http_llmlimit_redis_t *redis,
    ngx_uint_t what);
static void ngx_http_llmlimit_redis_warn(ngx_event_t *ev);
static void ngx_http_llmlimit_redis_cleanup(void *data);
static void ngx_http_llmlimit_redis_detach(ngx_http_llmlimit_redis_wait_t *w);
static void ngx_http_llmlimit_redis_release(ngx_http_llmlimit_redis_wait_t *w);

static void ngx_http_llmlimit_redis_connect(ngx_http_llmlimit_redis_t *redis);
static void ngx_http_llmlimit_redis_connected(const redisAsyncContext *ac,
    int status);
static void ngx_http_llmlimit_redis_disconnected(const redisAsyncContext *ac,
    int status);
static void ngx_http_llmlimit_redis_handshake(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_llmlimit_redis_drop(ngx_http_llmlimit_redis_t *redis,
    const char *reason);
static void ngx_http_llmlimit_redis_gone(ngx_http_llmlimit_redis_t *redis,
    const char *reason);
static void ngx_http_llmlimit_redis_schedule(ngx_http_llmlimit_redis_t *redis);
static void ngx_http_llmlimit_redis_timer(ngx_event_t *ev);
static void ngx_http_llmlimit_redis_fail(ngx_http_llmlimit_redis_t *redis,
    const char *reason);
static void ngx_http_llmlimit_redis_ok(ngx_http_llmlimit_redis_t *redis);
static void ngx_http_llmlimit_redis_error(ngx_http_llmlimit_redis_t *redis,
    const char *what, redisReply *reply);
static ngx_uint_t ngx_http_llmlimit_redis_quitting(
    ngx_http_llmlimit_redis_t *redis);

static void ngx_http_llmlimit_redis_read_handler(ngx_event_t *rev);
static void ngx_http_llmlimit_redis_write_handler(ngx_event_t *wev);
static void ngx_http_llmlimit_redis_add_read(void *data);
static void ngx_http_llmlimit_redis_del_read(void *data);
static void ngx_http_llmlimit_redis_add_write(void *data);
static void ngx_http_llmlimit_redis_del_write(void *data);
static void ngx_http_llmlimit_redis_add_event(ngx_event_t *ev,
    ngx_int_t event);
static void ngx_http_llmlimit_redis_del_event(ngx_event_t *ev,
    ngx_int_t event);
static void ngx_http_llmlimit_redis_free_connection(void *data);
static void ngx_http_llmlimit_redis_guard(redisAsyncContext *ac);
static void *ngx_http_llmlimit_redis_string(const redisReadTask *task,
    char *str, size_t len);
static void *ngx_http_llmlimit_redis_array(const redisReadTask *task,
    int elements);
static void *ngx_http_llmlimit_redis_integer(const redisReadTask *task,
    long long value);
static void *ngx_http_llmlimit_redis_nil(const redisReadTask *task);
static ngx_uint_t ngx_http_llmlimit_redis_unasked(const redisReadTask *task);
static ngx_int_t ngx_http_llmlimit_redis_start(ngx_cycle_t *cycle,
    ngx_http_llmlimit_redis_t *redis);


ngx_http_llmlimit_store_t  ngx_http_llmlimit_redis_store = {
    "redis",
    NGX_HTTP_LLMLIMIT_ALL_ALGORITHMS,
    ngx_http_llmlimit_redis_option,
    ngx_http_llmlimit_redis_conf_done,
    ngx_http_llmlimit_shm_init_zone,
    ngx_http_llmlimit_redis_init_module,
    ngx_http_llmlimit_redis_init_process,
    ngx_http_llmlimit_redis_check,
    ngx_http_llmlimit_redis_refund,
    ngx_http_llmlimit_redis_charge,
    NULL,
    ngx_http_llmlimit_redis_exit_process
};


static char  *ngx_http_llmlimit_redis_policies[] = {
    "local", "open", "closed"
};


/* the request path */

static ngx_int_t
ngx_http_llmlimit_redis_check(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    ngx_uint_t                          i;
    ngx_queue_t                        *q;
    ngx_pool_cleanup_t                 *cln;
    ngx_http_llmlimit_redis_t          *redis;
    ngx_http_llmlimit_redis_call_t     *call;
    ngx_http_llmlimit_redis_wait_t     *w;

    redis = b->zone->redis;

    if (b->n == 0) {
        return NGX_OK;
    }

    if (redis == NULL
        || (redis->ac == NULL
            && redis->state != NGX_HTTP_LLMLIMIT_REDIS_FINDING)
        || b->n > NGX_HTTP_LLMLIMIT_MAX_COUNTERS)
    {
        return NGX_ERROR;
    }

    switch (redis->state) {

    case NGX_HTTP_LLMLIMIT_REDIS_READY:
        break;

    case NGX_HTTP_LLMLIMIT_REDIS_FINDING:
    case NGX_HTTP_LLMLIMIT_REDIS_CONNECTING:

        /* behind the handshake, unless Redis is known to be lost */

        if (redis->healthy) {
            break;
        }

        /* fall through */

    default:
        return NGX_ERROR;
    }

    if (redis->pending >= NGX_HTTP_LLMLIMIT_REDIS_PENDING) {
        /* Redis is slow: this request, not the connection, pays for it */
        ngx_http_llmlimit_redis_slow(redis, NGX_HTTP_LLMLIMIT_REDIS_OVERFLOW);
        ngx_http_llmlimit_redis_stalled(redis);
        return NGX_ERROR;
    }

    call = ngx_http_llmlimit_redis_call(redis, b->n, 0);
    if (call == NULL) {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    if (!ngx_queue_empty(&redis->free)) {
        q = ngx_queue_head(&redis->free);
        ngx_queue_remove(q);
        w = ngx_queue_data(q, ngx_http_llmlimit_redis_wait_t, queue);

    } else {
        w = ngx_pcalloc(redis->pool, sizeof(ngx_http_llmlimit_redis_wait_t));
        if (w == NULL) {
            return NGX_ERROR;
        }

        w->redis = redis;
        w->timer.handler = ngx_http_llmlimit_redis_timeout;
        w->timer.data = w;
    }

    w->r = r;
    w->b = b;
    w->cln = cln;
    w->rc = NGX_ERROR;
    w->n = b->n;
    w->refund = 0;

    for (i = 0; i < b->n; i++) {
        ngx_http_llmlimit_redis_copy(&w->counters[i], &b->counters[i]);
    }

    call->waits[call->nwaits++] = w;
    call->nkeys += b->n;

    ngx_queue_insert_tail(&redis->busy, &w->queue);

    if (redis->pending++ == 0) {
        redis->since = ngx_current_msec;
    }

    cln->handler = ngx_http_llmlimit_redis_cleanup;
    cln->data = w;

    w->timer.log = r->connection->log;
    ngx_add_timer(&w->timer, redis->timeout);

    b->data = w;

    /* sent at the end of this turn, with the other requests of the turn */

    if (!redis->flush.posted) {
        ngx_post_event(&redis->flush, &ngx_posted_events);
    }

    return NGX_AGAIN;
}


/*
 * The request is not let through after all: the local count (fallback or
 * shadow) is taken back at once, the Redis count by refund entries in the
 * open call, and a reply still owed after a timeout when it comes.
 */

static void
ngx_http_llmlimit_redis_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b)
{
    ngx_uint_t                          i;
    ngx_http_llmlimit_redis_t          *redis;
    ngx_http_llmlimit_counter_t        *c;
    ngx_http_llmlimit_redis_wait_t     *w;
    ngx_http_llmlimit_redis_refund_t   *rf;

    redis = b->zone->redis;
    w = b->data;

    if (w != NULL) {
        w->refund = 1;
        ngx_http_llmlimit_redis_detach(w);
    }

    ngx_http_llmlimit_shm_store.refund(r, b);

    if (!b->remote) {
        return;
    }

    b->remote = 0;

    rf = ngx_http_llmlimit_redis_refunds(redis, b->n);

    if (rf == NULL) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "llmlimit redis: cannot take back a count");
        return;
    }

    for (i = 0; i < b->n; i++) {
        c = &b->counters[i];

        ngx_http_llmlimit_redis_copy(&rf[i].counter, c);
        rf[i].time = b->time;
        rf[i].amount = -(int64_t) rf[i].counter.cost;
    }
}


/*
 * The token budgets of a request let through are charged what it used:
 * the shadow (or the local fallback) at once, Redis by entries in the
 * open call, as refunds are; nothing else is sent for it.  As
 * algo_charge(): a GCRA budget by one entry of the difference, a fixed or
 * sliding one by an entry that takes the estimate back from the window it
 * went into and one that charges the usage now.
 */

static void
ngx_http_llmlimit_redis_charge(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t tokens)
{
    int64_t                             amount[2];
    ngx_uint_t                          i, j, n;
    ngx_http_llmlimit_counter_t        *c;
    ngx_http_llmlimit_redis_refund_t   *rf;

    if (b->local) {
        ngx_http_llmlimit_shm_tokens(r, b, tokens);
    }

    if (!b->remote) {
        return;
    }

    n = 0;

    for (i = 0; i < b->n; i++) {
        n += ngx_http_llmlimit_redis_amounts(&b->counters[i], tokens, amount);
    }

    if (n == 0) {
        return;
    }

    rf = ngx_http_llmlimit_redis_refunds(b->zone->redis, n);

    if (rf == NULL) {
        /* Redis is lost (logged once): the charge too, as refunds are */
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "llmlimit redis: cannot charge %ui tokens", tokens);
        return;
    }

    for (i = 0; i < b->n; i++) {
        c = &b->counters[i];
        n = ngx_http_llmlimit_redis_amounts(c, tokens, amount);

        for (j = 0; j < n; j++) {
            ngx_http_llmlimit_redis_copy(&rf->counter, c);
            rf->time = b->time;
            rf->amount = amount[j];
            rf++;
        }
    }
}


/* the entries that charge a counter "tokens", at most two; their number */

static ngx_uint_t
ngx_http_llmlimit_redis_amounts(ngx_http_llmlimit_counter_t *c,
    ngx_uint_t tokens, int64_t *amount)
{
    ngx_uint_t  n;

    if (!c->tokens) {
        return 0;
    }

    if (c->algorithm == NGX_HTTP_LLMLIMIT_GCRA) {
        amount[0] = (int64_t) tokens - (int64_t) c->cost;
        return amount[0] != 0;
    }

    n = 0;

    if (c->cost) {
        amount[n++] = -(int64_t) c->cost;
    }

    if (tokens) {
        amount[n++] = (int64_t) tokens;
    }

    return n;
}


/* what a call sends for a counter */

static void
ngx_http_llmlimit_redis_copy(ngx_http_llmlimit_redis_counter_t *wc,
    ngx_http_llmlimit_counter_t *c)
{
    ngx_memcpy(wc->hash, c->hash, 16);
    wc->period = c->period;
    wc->count = c->count;
    wc->algorithm = c->algorithm;
    wc->cost = c->tokens ? c->cost : 1;
    wc->tokens = c->tokens;
}


/*
 * Room for n refund entries in the open call, which is sent at the end of
 * this turn; NULL while Redis cannot be reached
 */

static ngx_http_llmlimit_redis_refund_t *
ngx_http_llmlimit_redis_refunds(ngx_http_llmlimit_redis_t *redis,
    ngx_uint_t n)
{
    ngx_http_llmlimit_redis_call_t  *call;

    if (redis->pool == NULL || redis->ac == NULL || redis->exiting
        || redis->state == NGX_HTTP_LLMLIMIT_REDIS_DOWN
        || n == 0 || n > 2 * NGX_HTTP_LLMLIMIT_MAX_COUNTERS)
    {
        return NULL;
    }

    call = ngx_http_llmlimit_redis_call(redis, 0, n);
    if (call == NULL) {
        return NULL;
    }

    call->nrefunds += n;

    if (!redis->flush.posted) {
        ngx_post_event(&redis->flush, &ngx_posted_events);
    }

    return &call->refunds[call->nrefunds - n];
}


/*
 * The call that takes a request of n counters, or refund entries, opened
 * if need be
 */

static ngx_http_llmlimit_redis_call_t *
ngx_http_llmlimit_redis_call(ngx_http_llmlimit_redis_t *redis, ngx_uint_t n,
    ngx_uint_t refunds)
{
    ngx_queue_t                     *q;
    ngx_http_llmlimit_redis_call_t  *call;

    if (!ngx_queue_empty(&redis->calls)) {
        q = ngx_queue_last(&redis->calls);
        call = ngx_queue_data(q, ngx_http_llmlimit_redis_call_t, queue);

        if ((n == 0 || call->nwaits < NGX_HTTP_LLMLIMIT_REDIS_BATCH)
            && call->nrefunds + refunds <= NGX_HTTP_LLMLIMIT_REDIS_REFUNDS
            && call->nkeys + call->nrefunds + n + refunds
               <= NGX_HTTP_LLMLIMIT_REDIS_KEYS)
        {
            return call;
        }
    }

    if (!ngx_queue_empty(&redis->free_calls)) {
        q = ngx_queue_head(&redis->free_calls);
        ngx_queue_remove(q);
        call = ngx_queue_data(q, ngx_http_llmlimit_redis_call_t, queue);

    } else {
        call = ngx_palloc(redis->pool, sizeof(ngx_http_llmlimit_redis_call_t));
        if (call == NULL) {
            return NULL;
        }

        call->redis = redis;
    }

    call->nwaits = 0;
    call->nkeys = 0;
    call->nrefunds = 0;
    call->now = 0;
    call->eval = 0;

    ngx_queue_insert_tail(&redis->calls, &call->queue);

    return call;
}


/* the end of the turn: the calls go to hiredis, in order */

static void
ngx_http_llmlimit_redis_flush(ngx_event_t *ev)
{
    ngx_http_llmlimit_redis_t *redis = ev->data;

    ngx_queue_t                     *q;
    ngx_http_llmlimit_redis_call_t  *call;

    while (!ngx_queue_empty(&redis->calls)) {
        q = ngx_queue_head(&redis->calls);
        ngx_queue_remove(q);
        call = ngx_queue_data(q, ngx_http_llmlimit_redis_call_t, queue);

        if (call->nwaits == 0 && call->nrefunds == 0) {
            /* opened by a check that failed next */
            ngx_queue_insert_head(&redis->free_calls, &call->queue);
            continue;
        }

        ngx_log_debug3(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                       "llmlimit redis call: %ui requests, %ui counters, "
                       "%ui refunds", call->nwaits, call->nkeys,
                       call->nrefunds);

        if (redis->state == NGX_HTTP_LLMLIMIT_REDIS_FINDING) {
            /* sent once there is a connection, failed if there is none */
            ngx_queue_insert_head(&redis->calls, q);
            return;
        }

        if (redis->ac == NULL
            || redis->state == NGX_HTTP_LLMLIMIT_REDIS_DOWN)
        {
            if (!ngx_http_llmlimit_redis_quitting(redis)) {
                ngx_http_llmlimit_redis_fail(redis, "not connected");
            }

            ngx_http_llmlimit_redis_finish(redis, call, NGX_ERROR);
            continue;
        }

        call->sent = ngx_http_llmlimit_metrics_clock();

        if (ngx_http_llmlimit_redis_send(redis, call) != NGX_OK) {
            ngx_http_llmlimit_redis_fail(redis, "cannot send EVALSHA");
            ngx_http_llmlimit_redis_finish(redis, call, NGX_ERROR);
        }
    }
}


/*
 * EVALSHA sha numkeys key... m L f (kind period count cost)...
 * (limit amount time)... ns limits, or, after NOSCRIPT, the same with EVAL
 * and the script: f entries (refunds and token charges, signed amounts),
 * then m requests of n counters each (keys in the same order, ns a byte
 * per request, its n), each entry and counter naming one of the call's L
 * distinct limits ("limits": a byte per counter; see
 * ngx_http_llmlimit_redis_lua.h).  Keys are PREFIX{hex of the counter's
 * hash}:PERIOD, and "t" after it for a token budget: one budget's counters
 * share a hash slot, and no identity appears in clear.
 */

static ngx_int_t
ngx_http_llmlimit_redis_send(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_call_t *call)
{
    int                                 k, a;
    u_char                             *p, *start, *idx;
    size_t                             *argvlen;
    ngx_uint_t                          i, j, n, l, nlimits;
    const char                        **argv;
    ngx_http_llmlimit_redis_counter_t  *c, **limits;

    argv = redis->argv;
    argvlen = redis->argvlen;
    limits = (ngx_http_llmlimit_redis_counter_t **) redis->limits;
    idx = redis->idx;
    p = redis->buf;

    /* the distinct limits, and each entry's and counter's, in KEYS order */

    nlimits = 0;
    l = 0;
    n = 0;

    for (j = 0; j < call->nrefunds + call->nwaits; j++) {

        if (j < call->nrefunds) {
            c = &call->refunds[j].counter;
            i = 1;

        } else {
            c = call->waits[j - call->nrefunds]->counters;
            i = call->waits[j - call->nrefunds]->n;
        }

        for ( /* void */ ; i; i--, c++) {

            if (nlimits == 0 || !ngx_http_llmlimit_redis_same(limits[l], c)) {

                for (l = 0; l < nlimits; l++) {
                    if (ngx_http_llmlimit_redis_same(limits[l], c)) {
                        break;
                    }
                }

                if (l == nlimits) {
                    limits[nlimits++] = c;
                }
            }

            idx[n++] = (u_char) l;          /* l < REDIS_KEYS = 256 */
        }
    }

    if (call->eval) {
        argv[0] = "EVAL";
        argvlen[0] = 4;
        argv[1] = ngx_http_llmlimit_redis_lua;
        argvlen[1] = sizeof(ngx_http_llmlimit_redis_lua) - 1;

    } else {
        argv[0] = "EVALSHA";
        argvlen[0] = 7;
        argv[1] = (const char *) redis->sha.data;
        argvlen[1] = redis->sha.len;
    }

    k = 2;
    a = 3 + n;

    p = ngx_http_llmlimit_redis_int(redis, &k, p, n);
    p = ngx_http_llmlimit_redis_int(redis, &a, p, call->nwaits);
    p = ngx_http_llmlimit_redis_int(redis, &a, p, nlimits);
    p = ngx_http_llmlimit_redis_int(redis, &a, p, call->nrefunds);

    for (l = 0; l < nlimits; l++) {
        c = limits[l];
        p = ngx_http_llmlimit_redis_int(redis, &a, p, c->algorithm
                                        + (c->tokens
                                           ? NGX_HTTP_LLMLIMIT_REDIS_TOKENS
                                           : 0));
        p = ngx_http_llmlimit_redis_int(redis, &a, p, c->period);
        p = ngx_http_llmlimit_redis_int(redis, &a, p, c->count);
        p = ngx_http_llmlimit_redis_int(redis, &a, p, c->cost);
    }

    n = 0;

    for (i = 0; i < call->nrefunds; i++) {
        start = p;
        p = ngx_http_llmlimit_redis_key(redis, p, &call->refunds[i].counter);
        argv[k] = (const char *) start;
        argvlen[k++] = p - start;

        p = ngx_http_llmlimit_redis_int(redis, &a, p, idx[n++] + 1);
        p = ngx_http_llmlimit_redis_int(redis, &a, p,
                                        call->refunds[i].amount);
        p = ngx_http_llmlimit_redis_int(redis, &a, p, call->refunds[i].time);
    }

    /* a byte per request, its counters; a byte per counter, its limit */

    argv[a] = (const char *) p;
    argvlen[a++] = call->nwaits;

    for (j = 0; j < call->nwaits; j++) {
        *p++ = (u_char) call->waits[j]->n;
    }

    argv[a] = (const char *) p;
    argvlen[a++] = call->nkeys;

    p = ngx_cpymem(p, &idx[n], call->nkeys);

    for (j = 0; j < call->nwaits; j++) {
        c = call->waits[j]->counters;

        for (i = call->waits[j]->n; i; i--, c++) {
            start = p;
            p = ngx_http_llmlimit_redis_key(redis, p, c);
            argv[k] = (const char *) start;
            argvlen[k++] = p - start;
        }
    }

    /*
     * the command in the protocol, written here: hiredis 0.14's
     * redisAsyncCommandArgv() formats each argument with sdscatfmt(),
     * which cost more than the rest of the request together
     */

    p = ngx_sprintf(redis->cmd, "*%d\r\n", a);

    for (i = 0; i < (ngx_uint_t) a; i++) {
        p = ngx_sprintf(p, "$%uz\r\n", argvlen[i]);
        p = ngx_cpymem(p, argv[i], argvlen[i]);
        *p++ = CR; *p++ = LF;
    }

    if (redisAsyncFormattedCommand(redis->ac, ngx_http_llmlimit_redis_reply,
                                   call, (const char *) redis->cmd,
                                   p - redis->cmd)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a number argument at argv[*a] */

static u_char *
ngx_http_llmlimit_redis_int(ngx_http_llmlimit_redis_t *redis, int *a,
    u_char *p, int64_t v)
{
    redis->argv[*a] = (const char *) p;
    redis->argvlen[*a] = ngx_sprintf(p, "%L", v) - p;

    return p + redis->argvlen[(*a)++];
}


static ngx_inline ngx_uint_t
ngx_http_llmlimit_redis_same(ngx_http_llmlimit_redis_counter_t *a,
    ngx_http_llmlimit_redis_counter_t *b)
{
    return a->algorithm == b->algorithm && a->period == b->period
           && a->count == b->count && a->cost == b->cost
           && a->tokens == b->tokens;
}


static u_char *
ngx_http_llmlimit_redis_key(ngx_http_llmlimit_redis_t *redis, u_char *p,
    ngx_http_llmlimit_redis_counter_t *c)
{
    p = ngx_cpymem(p, redis->prefix.data, redis->prefix.len);
    *p++ = '{';
    p = ngx_hex_dump(p, c->hash, 16);
    p = ngx_sprintf(p, "}:%M", c->period);

    if (c->tokens) {
        *p++ = 't';
    }

    return p;
}


static void
ngx_http_llmlimit_redis_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_http_llmlimit_redis_call_t *call = privdata;

    ngx_int_t                   rc;
    redisReply                 *rp;
    ngx_http_llmlimit_redis_t  *redis;

    redis = call->redis;
    rp = reply;

    if (rp == NULL) {

        /*
         * the context is being freed; the cleanup hook, called next,
         * reports why
         */

        if (redis->ac == ac) {
            redis->state = NGX_HTTP_LLMLIMIT_REDIS_DOWN;
        }

        ngx_http_llmlimit_redis_finish(redis, call, NGX_ERROR);
        return;
    }

    redis->since = ngx_current_msec;

    /*
     * Late replies are read too: whether Redis counted a request that
     * timed out decides whether it is taken back.
     */

    if (rp->type == REDIS_REPLY_ERROR && !call->eval
        && rp->len >= 8 && ngx_strncmp(rp->str, "NOSCRIPT", 8) == 0)
    {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                       "llmlimit redis NOSCRIPT, sending the script");

        call->eval = 1;

        if (ngx_http_llmlimit_redis_send(redis, call) == NGX_OK) {
            return;
        }

        rc = NGX_ERROR;
        ngx_http_llmlimit_redis_fail(redis, "cannot send EVAL");

    } else {
        rc = ngx_http_llmlimit_redis_result(redis, call, rp);
    }

    if (rc != NGX_ERROR) {
        ngx_http_llmlimit_redis_ok(redis);
    }

    ngx_http_llmlimit_metrics_redis(redis->zone,
                                    rc != NGX_ERROR
                                    ? NGX_HTTP_LLMLIMIT_METRICS_REPLY
                                    : rp->type == REDIS_REPLY_ERROR
                                    ? NGX_HTTP_LLMLIMIT_METRICS_SCRIPT
                                    : NGX_HTTP_LLMLIMIT_METRICS_PROTOCOL,
                                    call->sent);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "llmlimit redis reply: %i, %ui requests, %ui refunds",
                   rc, call->nwaits, call->nrefunds);

    ngx_http_llmlimit_redis_finish(redis, call, rc);
}


/*
 * validates the whole reply before it touches a counter: Redis' time,
 * then each request's status and its counters' results (two numbers per
 * counter of a counted request, remaining and reset; four of a rejected
 * one, rejected, remaining, reset, retry); sets each request's rc and,
 * for those still waiting, their counters' results
 */

static ngx_int_t
ngx_http_llmlimit_redis_result(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_call_t *call, redisReply *reply)
{
    long long                           v, max;
    ngx_uint_t                          i, j, k, o, w4, rejected;
    redisReply                        **e, **f;
    ngx_http_llmlimit_counter_t        *c;
    ngx_http_llmlimit_redis_wait_t     *w;
    ngx_http_llmlimit_redis_counter_t  *wc;

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_http_llmlimit_redis_error(redis, "error reply", reply);
        return NGX_ERROR;
    }

    if (reply->type != REDIS_REPLY_ARRAY
        || reply->elements < 1 + call->nwaits + 2 * call->nkeys)
    {
        ngx_http_llmlimit_redis_fail(redis, "unexpected reply");
        return NGX_ERROR;
    }

    e = reply->element;

    for (i = 0; i < reply->elements; i++) {
        if (e[i] == NULL || e[i]->type != REDIS_REPLY_INTEGER) {
            ngx_http_llmlimit_redis_fail(redis, "unexpected reply");
            return NGX_ERROR;
        }
    }

    if (e[0]->integer <= 0
        || e[0]->integer >= NGX_HTTP_LLMLIMIT_REDIS_TIME_MAX)
    {
        ngx_http_llmlimit_redis_fail(redis, "reply out of range");
        return NGX_ERROR;
    }

    /*
     * request k's results start at o: status, then 2 or 4 per counter;
     * the elements are checked to be there before they are read
     */

    for (k = 0, o = 1; k < call->nwaits; k++, o += 1 + w4 * w->n) {
        w = call->waits[k];

        if (o >= reply->elements || (v = e[o]->integer) < 0 || v > 1) {
            ngx_http_llmlimit_redis_fail(redis, "unexpected reply");
            return NGX_ERROR;
        }

        w4 = v ? 4 : 2;

        if (o + w4 * w->n >= reply->elements) {
            ngx_http_llmlimit_redis_fail(redis, "unexpected reply");
            return NGX_ERROR;
        }

        rejected = 0;

        for (i = 0; i < w->n; i++) {
            wc = &w->counters[i];
            max = 2 * (long long) wc->period + 1000;

            /*
             * f[1] rejected, f[2] remaining, f[3] reset, f[4] retry; a
             * counted request's counters have f[2] and f[3] only
             */

            f = &e[o + w4 * i + 1] - (w4 == 4 ? 1 : 2);

            for (j = (w4 == 4 ? 1 : 2); j <= (w4 == 4 ? 4 : 3); j++) {
                v = f[j]->integer;

                if (v < 0
                    || (j == 1 && v > 1)
                    || (j == 2 && v > (long long) wc->count)
                    || (j >= 3 && v > max))
                {
                    ngx_http_llmlimit_redis_fail(redis, "reply out of range");
                    return NGX_ERROR;
                }
            }

            if (w4 == 4) {
                rejected |= f[1]->integer;
            }
        }

        if (e[o]->integer != (long long) rejected) {
            ngx_http_llmlimit_redis_fail(redis, "inconsistent reply");
            return NGX_ERROR;
        }
    }

    if (o != reply->elements) {
        ngx_http_llmlimit_redis_fail(redis, "unexpected reply");
        return NGX_ERROR;
    }

    call->now = e[0]->integer;

    for (k = 0, o = 1; k < call->nwaits; k++, o += 1 + w4 * w->n) {
        w = call->waits[k];
        w4 = e[o]->integer ? 4 : 2;
        w->rc = e[o]->integer ? NGX_BUSY : NGX_OK;

        if (w->r == NULL) {
            continue;
        }

        for (i = 0; i < w->n; i++) {
            c = &w->b->counters[i];
            f = &e[o + w4 * i + 1] - (w4 == 4 ? 1 : 2);

            if (w4 == 4) {
                c->rejected = f[1]->integer ? 1 : 0;
                c->retry = (ngx_msec_t) f[4]->integer;

            } else {
                c->rejected = 0;
                c->retry = 0;
            }

            c->remaining = (ngx_uint_t) f[2]->integer;
            c->reset = (ngx_msec_t) f[3]->integer;
        }
    }

    return NGX_OK;
}


/*
 * The call is done: each request still waiting is resumed with its own
 * result, or with NGX_ERROR if the call failed.  A resumed request may
 * finalize another of the call (its cleanup clears w->r) or start new
 * checks (new calls): w->r is read afresh for each.
 *
 * What Redis counted is noted in the batch of a request that still lives,
 * so that a take-back finds it; the late reply of a request that was not
 * let through is taken back at once.  The refund entries of the call need
 * nothing more.
 */

static void
ngx_http_llmlimit_redis_finish(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_call_t *call, ngx_int_t rc)
{
    ngx_int_t                          wrc;
    ngx_uint_t                         i, j;
    ngx_http_request_t                *r;
    ngx_http_llmlimit_batch_t         *b;
    ngx_http_llmlimit_redis_wait_t    *w;
    ngx_http_llmlimit_redis_refund_t  *rf;

    for (i = 0; i < call->nwaits; i++) {
        w = call->waits[i];
        r = w->r;
        b = w->b;
        wrc = (rc == NGX_ERROR) ? NGX_ERROR : w->rc;

        if (b != NULL && wrc == NGX_OK) {
            b->remote = 1;
            b->time = call->now;
        }

        if (b == NULL && w->refund && wrc == NGX_OK) {
            rf = ngx_http_llmlimit_redis_refunds(redis, w->n);

            if (rf == NULL) {
                ngx_log_debug0(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                               "llmlimit redis: cannot take back a count");

            } else {
                for (j = 0; j < w->n; j++) {
                    rf[j].counter = w->counters[j];
                    rf[j].time = call->now;
                    rf[j].amount = -(int64_t) w->counters[j].cost;
                }
            }
        }

        ngx_http_llmlimit_redis_release(w);

        if (r == NULL) {
            /* timed out or gone: decided without this reply */
            continue;
        }

        if (wrc == NGX_OK
            && redis->zone->failure == NGX_HTTP_LLMLIMIT_FAIL_LOCAL)
        {
            /* the shadow counters */
            ngx_http_llmlimit_shm_charge(r, b);
            b->local = 1;
        }

        b->rc = wrc;
        b->done(r, b);
    }

    call->nwaits = 0;
    call->nkeys = 0;
    call->nrefunds = 0;

    ngx_queue_insert_head(&redis->free_calls, &call->queue);
}


/*
 * A request waited redis_timeout: it goes on by the zone's failure policy,
 * the connection stays as it is.  The call still holds w: its late reply
 * tells whether Redis counted the request.
 */

static void
ngx_http_llmlimit_redis_timeout(ngx_event_t *ev)
{
    ngx_http_llmlimit_redis_wait_t *w = ev->data;

    ngx_http_request_t         *r;
    ngx_http_llmlimit_batch_t  *b;
    ngx_http_llmlimit_redis_t  *redis;

    redis = w->redis;
    r = w->r;
    b = w->b;

    w->r = NULL;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "llmlimit redis timed out");

    ngx_http_llmlimit_redis_slow(redis, NGX_HTTP_LLMLIMIT_REDIS_TIMEOUT);

    b->rc = NGX_ERROR;
    b->done(r, b);

    ngx_http_llmlimit_redis_stalled(redis);
}


/*
 * No reply at all for long while replies are owed: the connection is
 * dead, reconnect.  The only way slowness loses the connection.
 */

static void
ngx_http_llmlimit_redis_stalled(ngx_http_llmlimit_redis_t *redis)
{
    if (redis->ac != NULL && redis->pending
        && ngx_current_msec - redis->since
           >= ngx_max(20 * redis->timeout, NGX_HTTP_LLMLIMIT_REDIS_STALL))
    {
        ngx_http_llmlimit_redis_drop(redis, "no reply");
    }
}


/* a request failed by slowness: counted, logged at most once a second */

static void
ngx_http_llmlimit_redis_slow(ngx_http_llmlimit_redis_t *redis,
    ngx_uint_t what)
{
    if (what == NGX_HTTP_LLMLIMIT_REDIS_TIMEOUT) {
        redis->timeouts++;

    } else {
        redis->overflows++;
    }

    ngx_http_llmlimit_metrics_redis(redis->zone,
                                    what == NGX_HTTP_LLMLIMIT_REDIS_TIMEOUT
                                    ? NGX_HTTP_LLMLIMIT_METRICS_TIMEOUT
                                    : NGX_HTTP_LLMLIMIT_METRICS_OVERFLOW, 0);

    if (!redis->warn.timer_set && !ngx_http_llmlimit_redis_quitting(redis)) {
        ngx_add_timer(&redis->warn, 1000);
    }
}


static void
ngx_http_llmlimit_redis_warn(ngx_event_t *ev)
{
    ngx_http_llmlimit_redis_t *redis = ev->data;

    if (redis->timeouts) {
        ngx_log_error(NGX_LOG_WARN, redis->log, 0,
                      "llmlimit zone \"%V\": redis %V: %ui request%s timed "
                      "out after %Mms, decided by redis_failure=%s",
                      &redis->zone->name, &redis->addr, redis->timeouts,
                      redis->timeouts == 1 ? "" : "s", redis->timeout,
                      ngx_http_llmlimit_redis_policies[redis->zone->failure]);
    }

    if (redis->overflows) {
        ngx_log_error(NGX_LOG_WARN, redis->log, 0,
                      "llmlimit zone \"%V\": redis %V: %ui request%s not "
                      "sent, %ui replies owed already, decided by "
                      "redis_failure=%s",
                      &redis->zone->name, &redis->addr, redis->overflows,
                      redis->overflows == 1 ? "" : "s", redis->pending,
                      ngx_http_llmlimit_redis_policies[redis->zone->failure]);
    }

    redis->timeouts = 0;
    redis->overflows = 0;
}


/*
 * The request is freed while w is attached: while it waited, or after a
 * timeout.  Unless it was let through, what Redis counts for it is taken
 * back when the reply comes.
 */

static void
ngx_http_llmlimit_redis_cleanup(void *data)
{
    ngx_http_llmlimit_redis_wait_t *w = data;

    if (w->r != NULL || w->b == NULL || !w->b->kept) {
        w->refund = 1;
    }

    ngx_http_llmlimit_redis_detach(w);
}


/* w no longer refers to its request: the request goes on, or is gone */

static void
ngx_http_llmlimit_redis_detach(ngx_http_llmlimit_redis_wait_t *w)
{
    if (w->timer.timer_set) {
        ngx_del_timer(&w->timer);
    }

    if (w->cln != NULL) {
        w->cln->handler = NULL;
        w->cln = NULL;
    }

    if (w->b != NULL) {
        w->b->data = NULL;
        w->b = NULL;
    }

    w->r = NULL;
}


/* the call is done with w */

static void
ngx_http_llmlimit_redis_release(ngx_http_llmlimit_redis_wait_t *w)
{
    ngx_http_llmlimit_redis_t  *redis;

    redis = w->redis;

    ngx_http_llmlimit_redis_detach(w);

    w->refund = 0;

    ngx_queue_remove(&w->queue);
    ngx_queue_insert_head(&redis->free, &w->queue);

    redis->pending--;
}


/* the connection */

/*
 * Where to connect is asked first (src/ngx_http_llmlimit_redis_addr.c):
 * the address of redis=, its host name resolved again, or the master that
 * Sentinel names; ngx_http_llmlimit_redis_found() is told, now or later.
 */

static void
ngx_http_llmlimit_redis_connect(ngx_http_llmlimit_redis_t *redis)
{
    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "llmlimit redis connect %V", &redis->addr);

    redis->state = NGX_HTTP_LLMLIMIT_REDIS_FINDING;

    if (redis != redis->zone->redis) {

        /* a connection of its own goes where the zone's last went */

        if (redis->zone->redis->found) {
            ngx_http_llmlimit_redis_found(redis, &redis->zone->redis->peer,
                                          NULL);

        } else {
            ngx_http_llmlimit_redis_gone(redis, "no address yet");
        }

        return;
    }

    ngx_http_llmlimit_redis_addr_find(redis->where);
}


void
ngx_http_llmlimit_redis_found(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_peer_t *peer, const char *error)
{
    const char         *argv[3];
    size_t              argvlen[3];
    redisAsyncContext  *ac;

    if (redis->ac || ngx_http_llmlimit_redis_quitting(redis)) {
        return;
    }

    if (peer == NULL) {
        ngx_http_llmlimit_redis_gone(redis, error);
        return;
    }

    if (redis == redis->zone->redis) {
        redis->peer = *peer;
        redis->found = 1;
    }

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "llmlimit redis %V: connect to %s:%d", &redis->addr,
                   peer->path ? peer->path : peer->host, peer->port);

    if (peer->path) {
        ac = redisAsyncConnectUnix(peer->path);

    } else {
        ac = redisAsyncConnect(peer->host, peer->port);
    }

    if (ac == NULL) {
        ngx_http_llmlimit_redis_gone(redis, "cannot allocate a context");
        return;
    }

    if (ac->err) {
        ngx_http_llmlimit_redis_gone(redis, ac->errstr);
        redisAsyncFree(ac);
        return;
    }

    if (ngx_http_llmlimit_redis_hook(ac, redis->log,
                                     ngx_http_llmlimit_redis_read_handler,
                                     ngx_http_llmlimit_redis_write_handler,
                                     ngx_http_llmlimit_redis_free_connection)
        == NULL)
    {
        ngx_http_llmlimit_redis_gone(redis, "no free connection");
        redisAsyncFree(ac);
        return;
    }

    ac->data = redis;
    redis->ac = ac;
    redis->state = NGX_HTTP_LLMLIMIT_REDIS_CONNECTING;

    /* the requests that came while FINDING wait for this connection now */
    redis->since = ngx_current_msec;

    redisAsyncSetConnectCallback(ac, ngx_http_llmlimit_redis_connected);
    redisAsyncSetDisconnectCallback(ac, ngx_http_llmlimit_redis_disconnected);

    /* the handshake goes out first, before any request's command */

    if (redis->password.len) {
        argv[0] = "AUTH";
        argvlen[0] = 4;
        argv[1] = (const char *) redis->password.data;
        argvlen[1] = redis->password.len;

        if (redisAsyncCommandArgv(ac, ngx_http_llmlimit_redis_handshake,
                                  (void *) NGX_HTTP_LLMLIMIT_REDIS_AUTH,
                                  2, argv, argvlen)
            != REDIS_OK)
        {
            goto failed;
        }
    }

    if (peer->master) {
        /* the address Sentinel named must still be a master */
        argv[0] = "ROLE";
        argvlen[0] = 4;

        if (redisAsyncCommandArgv(ac, ngx_http_llmlimit_redis_handshake,
                                  (void *) NGX_HTTP_LLMLIMIT_REDIS_ROLE,
                                  1, argv, argvlen)
            != REDIS_OK)
        {
            goto failed;
        }
    }

    if (redis->db >= 0) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) redis->buf;
        argvlen[1] = ngx_sprintf(redis->buf, "%i", redis->db) - redis->buf;

        if (redisAsyncCommandArgv(ac, ngx_http_llmlimit_redis_handshake,
                                  (void *) NGX_HTTP_LLMLIMIT_REDIS_SELECT,
                                  2, argv, argvlen)
            != REDIS_OK)
        {
            goto failed;
        }
    }

    argv[0] = "SCRIPT";
    argvlen[0] = 6;
    argv[1] = "LOAD";
    argvlen[1] = 4;
    argv[2] = ngx_http_llmlimit_redis_lua;
    argvlen[2] = sizeof(ngx_http_llmlimit_redis_lua) - 1;

    if (redisAsyncCommandArgv(ac, ngx_http_llmlimit_redis_handshake,
                              (void *) NGX_HTTP_LLMLIMIT_REDIS_LOAD,
                              3, argv, argvlen)
        != REDIS_OK)
    {
        goto failed;
    }

    ngx_add_timer(&redis->event, ngx_max(10 * redis->timeout,
                                         NGX_HTTP_LLMLIMIT_REDIS_CONNECT));

    /* the requests that came while FINDING */

    if (!ngx_queue_empty(&redis->calls) && !redis->flush.posted) {
        ngx_post_event(&redis->flush, &ngx_posted_events);
    }

    return;

failed:

    ngx_http_llmlimit_redis_drop(redis, "cannot queue the handshake");
}


static void
ngx_http_llmlimit_redis_connected(const redisAsyncContext *ac, int status)
{
    ngx_http_llmlimit_redis_t  *redis;

    redis = ac->data;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "llmlimit redis %V connected: %d", &redis->addr, status);

    if (status != REDIS_OK && redis->ac == ac) {
        /* hiredis frees the context next; the cleanup hook reports */
        redis->state = NGX_HTTP_LLMLIMIT_REDIS_DOWN;
    }
}


static void
ngx_http_llmlimit_redis_disconnected(const redisAsyncContext *ac, int status)
{
#if (NGX_DEBUG)
    ngx_http_llmlimit_redis_t  *redis;

    redis = ac->data;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "llmlimit redis %V disconnected: %d", &redis->addr, status);
#endif
}


static void
ngx_http_llmlimit_redis_handshake(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_uint_t                  step;
    redisReply                 *rp;
    ngx_http_llmlimit_redis_t  *redis;

    redis = ac->data;
    rp = reply;
    step = (ngx_uint_t) (uintptr_t) privdata;

    if (rp == NULL || redis->ac != ac) {
        return;
    }

    redis->since = ngx_current_msec;

    switch (step) {

    case NGX_HTTP_LLMLIMIT_REDIS_AUTH:
    case NGX_HTTP_LLMLIMIT_REDIS_SELECT:
        if (rp->type == REDIS_REPLY_STATUS && rp->len == 2
            && ngx_strncmp(rp->str, "OK", 2) == 0)
        {
            return;
        }

        ngx_http_llmlimit_redis_error(redis,
                                      step == NGX_HTTP_LLMLIMIT_REDIS_AUTH
                                      ? "AUTH failed" : "SELECT failed",
                                      rp);
        break;

    case NGX_HTTP_LLMLIMIT_REDIS_ROLE:
        if (rp->type == REDIS_REPLY_ARRAY && rp->elements > 0
            && rp->element[0]->type == REDIS_REPLY_STRING
            && rp->element[0]->len == 6
            && ngx_strncmp(rp->element[0]->str, "master", 6) == 0)
        {
            return;
        }

        ngx_http_llmlimit_redis_fail(redis, "not a master (ROLE)");
        break;

    default: /* NGX_HTTP_LLMLIMIT_REDIS_LOAD */
        if (rp->type == REDIS_REPLY_STRING && rp->len == redis->sha.len
            && ngx_strncasecmp((u_char *) rp->str, redis->sha.data,
                               redis->sha.len)
               == 0)
        {
            redis->state = NGX_HTTP_LLMLIMIT_REDIS_READY;
            redis->backoff = 0;

            ngx_http_llmlimit_metrics_redis(redis->zone,
                                            NGX_HTTP_LLMLIMIT_METRICS_CONNECTED,
                                            0);

            if (redis->event.timer_set) {
                ngx_del_timer(&redis->event);
            }

            ngx_http_llmlimit_redis_ok(redis);
            return;
        }

        ngx_http_llmlimit_redis_error(redis, "SCRIPT LOAD failed", rp);
        break;
    }

    /* the failure is logged: do not report it again when dropping */

    ngx_http_llmlimit_redis_drop(redis, NULL);
}


/* closes the connection; hiredis calls the pending callbacks first */

static void
ngx_http_llmlimit_redis_drop(ngx_http_llmlimit_redis_t *redis,
    const char *reason)
{
    if (redis->ac == NULL) {
        return;
    }

    if (reason) {
        ngx_cpystrn(redis->reason, (u_char *) reason, sizeof(redis->reason));

    } else {
        redis->reason[0] = '\0';
        redis->healthy = 0;
    }

    redis->state = NGX_HTTP_LLMLIMIT_REDIS_DOWN;

    /* inside a hiredis callback this is deferred until it returns */
    redisAsyncFree(redis->ac);
}


/* the context is gone (or never was): report and reconnect later */

static void
ngx_http_llmlimit_redis_gone(ngx_http_llmlimit_redis_t *redis,
    const char *reason)
{
    redis->ac = NULL;
    redis->state = NGX_HTTP_LLMLIMIT_REDIS_DOWN;

    if (ngx_http_llmlimit_redis_quitting(redis)) {
        return;
    }

    ngx_http_llmlimit_metrics_redis(redis->zone, NGX_HTTP_LLMLIMIT_METRICS_LOST,
                                    0);

    ngx_http_llmlimit_redis_fail(redis, reason);
    ngx_http_llmlimit_redis_schedule(redis);

    /* the requests that came while FINDING fail */

    if (!ngx_queue_empty(&redis->calls) && !redis->flush.posted) {
        ngx_post_event(&redis->flush, &ngx_posted_events);
    }
}


static void
ngx_http_llmlimit_redis_schedule(ngx_http_llmlimit_redis_t *redis)
{
    if (redis->moved) {
        /* the next turn of the event loop, out of hiredis' callbacks */
        redis->moved = 0;
        ngx_add_timer(&redis->event, 1);
        return;
    }

    if (redis->backoff == 0) {
        redis->backoff = NGX_HTTP_LLMLIMIT_REDIS_BACKOFF;

    } else {
        redis->backoff = ngx_min(2 * redis->backoff,
                                 NGX_HTTP_LLMLIMIT_REDIS_BACKOFF_MAX);
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                   "llmlimit redis %V: reconnect in %M ms",
                   &redis->addr, redis->backoff);

    ngx_add_timer(&redis->event, redis->backoff);
}


/* reconnects, or gives up on a handshake that takes too long */

static void
ngx_http_llmlimit_redis_timer(ngx_event_t *ev)
{
    ngx_http_llmlimit_redis_t  *redis = ev->data;

    if (ngx_http_llmlimit_redis_quitting(redis)) {
        return;
    }

    if (redis->ac) {
        ngx_http_llmlimit_redis_drop(redis, "connect timed out");
        return;
    }

    ngx_http_llmlimit_redis_connect(redis);
}


/* Sentinel announced a new master: the connection goes there at once */

void
ngx_http_llmlimit_redis_moved(ngx_http_llmlimit_redis_t *redis,
    const char *reason)
{
    if (ngx_http_llmlimit_redis_quitting(redis)) {
        return;
    }

    if (redis->ac) {
        redis->backoff = 0;
        redis->moved = 1;
        ngx_http_llmlimit_redis_drop(redis, reason);
        return;
    }

    if (redis->event.timer_set) {
        /* waiting to reconnect */
        ngx_del_timer(&redis->event);
        redis->backoff = 0;
        ngx_http_llmlimit_redis_connect(redis);
    }
}


/* "lost" and "back" are logged once per change of state */

static void
ngx_http_llmlimit_redis_fail(ngx_http_llmlimit_redis_t *redis,
    const char *reason)
{
    if (!redis->healthy) {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, redis->log, 0,
                       "llmlimit redis %V: %s", &redis->addr, reason);
        return;
    }

    redis->healthy = 0;

    ngx_log_error(NGX_LOG_ERR, redis->log, 0,
                  "llmlimit zone \"%V\": redis %V lost: %s",
                  &redis->zone->name, &redis->addr, reason);
}


static void
ngx_http_llmlimit_redis_ok(ngx_http_llmlimit_redis_t *redis)
{
    if (redis->healthy) {
        return;
    }

    redis->healthy = 1;

    ngx_log_error(NGX_LOG_NOTICE, redis->log, 0,
                  "llmlimit zone \"%V\": redis %V back",
                  &redis->zone->name, &redis->addr);
}


static void
ngx_http_llmlimit_redis_error(ngx_http_llmlimit_redis_t *redis,
    const char *what, redisReply *reply)
{
    u_char  *p, *last;
    u_char   buf[128];

    last = buf + sizeof(buf) - 1;
    p = ngx_slprintf(buf, last, "%s", what);

    if (reply->type == REDIS_REPLY_ERROR || reply->type == REDIS_REPLY_STATUS)
    {
        p = ngx_slprintf(p, last, ": %*s",
                         ngx_min(reply->len, 96), reply->str);

    } else {
        p = ngx_slprintf(p, last, ": unexpected reply type %d", reply->type);
    }

    *p = '\0';

    ngx_http_llmlimit_redis_fail(redis, (const char *) buf);

    if (reply->type == REDIS_REPLY_ERROR && reply->len >= 8
        && ngx_strncmp(reply->str, "READONLY", 8) == 0)
    {
        /* a replica now, after a failover: connect to the master again */
        ngx_http_llmlimit_redis_drop(redis, NULL);
    }
}


static ngx_uint_t
ngx_http_llmlimit_redis_quitting(ngx_http_llmlimit_redis_t *redis)
{
    return redis->exiting || ngx_exiting || ngx_quit || ngx_terminate;
}


/* the hiredis adapter */

static void
ngx_http_llmlimit_redis_read_handler(ngx_event_t *rev)
{
    ngx_connection_t           *c;
    redisAsyncContext          *ac;
    ngx_http_llmlimit_redis_t  *redis;

    c = rev->data;
    ac = c->data;
    redis = ac->data;

    if (c->close) {
        /* worker_shutdown_timeout */
        redis->exiting = 1;
        ngx_http_llmlimit_redis_drop(redis, "closing");
        return;
    }

    ngx_http_llmlimit_redis_read(rev, &redis->ac);
}


static void
ngx_http_llmlimit_redis_write_handler(ngx_event_t *wev)
{
    ngx_connection_t           *c;
    redisAsyncContext          *ac;
    ngx_http_llmlimit_redis_t  *redis;

    c = wev->data;
    ac = c->data;
    redis = ac->data;

    ngx_http_llmlimit_redis_write(wev, &redis->ac);
}


/*
 * The reads and writes of a hooked context; "owner" is where its owner
 * keeps it: a context no longer there was freed, and its connection too.
 *
 * hiredis reads at most 16K per call, and an edge-triggered event does not
 * fire again for what is left: read until the socket is empty.
 */

void
ngx_http_llmlimit_redis_read(ngx_event_t *rev, redisAsyncContext **owner)
{
    int                 n;
    ngx_uint_t          i;
    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    c = rev->data;
    ac = c->data;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_REDIS_READS; i++) {

        redisAsyncHandleRead(ac);

        if (*owner != ac) {
            return;
        }

        if (ioctl(c->fd, FIONREAD, &n) == -1 || n <= 0) {
            return;
        }
    }

    ngx_post_event(rev, &ngx_posted_events);
}


void
ngx_http_llmlimit_redis_write(ngx_event_t *wev, redisAsyncContext **owner)
{
    ngx_connection_t   *c;
    redisAsyncContext  *ac;

    c = wev->data;
    ac = c->data;

    redisAsyncHandleWrite(ac);

    if (*owner == ac && sdslen(ac->c.obuf) > 0) {
        /* the socket buffer is full: wait for the next edge */
        wev->ready = 0;
    }
}


static void
ngx_http_llmlimit_redis_add_read(void *data)
{
    ngx_connection_t  *c = data;

    ngx_http_llmlimit_redis_add_event(c->read, NGX_READ_EVENT);
}


static void
ngx_http_llmlimit_redis_del_read(void *data)
{
    ngx_connection_t  *c = data;

    if (ngx_event_flags & NGX_USE_CLEAR_EVENT) {
        return;
    }

    ngx_http_llmlimit_redis_del_event(c->read, NGX_READ_EVENT);
}


/*
 * With edge-triggered events both are armed from the start; while the
 * socket is writable, hiredis' output is written by a posted event at the
 * end of this turn of the event loop, so that the commands of all requests
 * read in this turn go out in one write.  Otherwise the write event is
 * armed only while hiredis has something to write.
 */

static void
ngx_http_llmlimit_redis_add_write(void *data)
{
    ngx_connection_t  *c = data;

    ngx_event_t  *wev;

    wev = c->write;

    if (!(ngx_event_flags & NGX_USE_CLEAR_EVENT)) {
        ngx_http_llmlimit_redis_add_event(wev, NGX_WRITE_EVENT);
        return;
    }

    if (wev->ready && !wev->posted) {
        ngx_post_event(wev, &ngx_posted_events);
    }
}


static void
ngx_http_llmlimit_redis_del_write(void *data)
{
    ngx_connection_t  *c = data;

    if (ngx_event_flags & NGX_USE_CLEAR_EVENT) {
        return;
    }

    ngx_http_llmlimit_redis_del_event(c->write, NGX_WRITE_EVENT);
}


static void
ngx_http_llmlimit_redis_add_event(ngx_event_t *ev, ngx_int_t event)
{
    ngx_uint_t  flags;

    if (ev->active) {
        return;
    }

    flags = (ngx_event_flags & NGX_USE_CLEAR_EVENT) ? NGX_CLEAR_EVENT
                                                    : NGX_LEVEL_EVENT;

    if (ngx_add_event(ev, event, flags) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, ev->log, 0,
                      "llmlimit redis: cannot add an event");
    }
}


static void
ngx_http_llmlimit_redis_del_event(ngx_event_t *ev, ngx_int_t event)
{
    ngx_uint_t  flags;

    if (!ev->active) {
        return;
    }

    /* the other event, if active, stays edge-triggered */

    flags = (ngx_event_flags & NGX_USE_CLEAR_EVENT) ? NGX_CLEAR_EVENT
                                                    : NGX_LEVEL_EVENT;

    if (ngx_del_event(ev, event, flags) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, ev->log, 0,
                      "llmlimit redis: cannot delete an event");
    }
}


/*
 * hiredis aborts the process (assert()) on a reply that no command waits
 * for, unless it is an error or the context is subscribed: a server that
 * answers more than it was asked would take the worker down.  The reader
 * of each hooked context builds its replies through these wrappers of
 * hiredis' own functions; a top-level reply with no callback waiting is
 * refused, which fails the read and drops the connection, with "reason"
 * for the log.
 */

static redisReplyObjectFunctions   ngx_http_llmlimit_redis_fns;
static redisReplyObjectFunctions  *ngx_http_llmlimit_redis_hiredis_fns;
static redisAsyncContext          *ngx_http_llmlimit_redis_refused;


static void
ngx_http_llmlimit_redis_guard(redisAsyncContext *ac)
{
    redisReader  *r;

    if (ngx_http_llmlimit_redis_refused == ac) {
        /* a context freed without its reason asked, at the same address */
        ngx_http_llmlimit_redis_refused = NULL;
    }

    r = ac->c.reader;

    if (r == NULL || r->fn == NULL) {
        return;
    }

    if (ngx_http_llmlimit_redis_hiredis_fns == NULL) {
        ngx_http_llmlimit_redis_hiredis_fns = r->fn;

        ngx_http_llmlimit_redis_fns = *r->fn;
        ngx_http_llmlimit_redis_fns.createString =
                                           ngx_http_llmlimit_redis_string;
        ngx_http_llmlimit_redis_fns.createArray =
                                           ngx_http_llmlimit_redis_array;
        ngx_http_llmlimit_redis_fns.createInteger =
                                           ngx_http_llmlimit_redis_integer;
        ngx_http_llmlimit_redis_fns.createNil = ngx_http_llmlimit_redis_nil;
    }

    if (r->fn != ngx_http_llmlimit_redis_hiredis_fns) {
        /* not hiredis' own functions: left alone */
        return;
    }

    r->fn = &ngx_http_llmlimit_redis_fns;
    r->privdata = ac;
}


static ngx_uint_t
ngx_http_llmlimit_redis_unasked(const redisReadTask *task)
{
    redisAsyncContext  *ac;

    if (task->parent != NULL) {
        return 0;
    }

    ac = task->privdata;

    if (ac == NULL
        || ac->replies.head != NULL
        || (ac->c.flags & (REDIS_SUBSCRIBED|REDIS_MONITORING)))
    {
        return 0;
    }

    ngx_http_llmlimit_redis_refused = ac;

    return 1;
}


static void *
ngx_http_llmlimit_redis_string(const redisReadTask *task, char *str,
    size_t len)
{
    if (task->type != REDIS_REPLY_ERROR
        && ngx_http_llmlimit_redis_unasked(task))
    {
        return NULL;
    }

    return ngx_http_llmlimit_redis_hiredis_fns->createString(task, str, len);
}


static void *
ngx_http_llmlimit_redis_array(const redisReadTask *task, int elements)
{
    if (ngx_http_llmlimit_redis_unasked(task)) {
        return NULL;
    }

    return ngx_http_llmlimit_redis_hiredis_fns->createArray(task, elements);
}


static void *
ngx_http_llmlimit_redis_integer(const redisReadTask *task, long long value)
{
    if (ngx_http_llmlimit_redis_unasked(task)) {
        return NULL;
    }

    return ngx_http_llmlimit_redis_hiredis_fns->createInteger(task, value);
}


static void *
ngx_http_llmlimit_redis_nil(const redisReadTask *task)
{
    if (ngx_http_llmlimit_redis_unasked(task)) {
        return NULL;
    }

    return ngx_http_llmlimit_redis_hiredis_fns->createNil(task);
}


/*
 * Why a hooked context was dropped, for the log: hiredis says "Out of
 * memory" when the guard above refused a reply.
 */

const char *
ngx_http_llmlimit_redis_reason(redisAsyncContext *ac)
{
    if (ngx_http_llmlimit_redis_refused == ac) {
        ngx_http_llmlimit_redis_refused = NULL;
        return "a reply no command waits for";
    }

    return ac->err ? ac->errstr : "connection closed";
}


/*
 * A hiredis context in nginx's event loop: one ngx_connection_t on its
 * socket, with the read and write handlers given and "cleanup" called
 * when hiredis frees the context (which must then call unhook()).  Also
 * for the connections to sentinels (src/ngx_http_llmlimit_redis_addr.c).
 */

ngx_connection_t *
ngx_http_llmlimit_redis_hook(redisAsyncContext *ac, ngx_log_t *log,
    ngx_event_handler_pt read, ngx_event_handler_pt write,
    void (*cleanup)(void *data))
{
    ngx_connection_t  *c;

    c = ngx_get_connection(ac->c.fd, log);
    if (c == NULL) {
        return NULL;
    }

    c->data = ac;
    c->read->handler = read;
    c->write->handler = write;
    c->read->log = c->log;
    c->write->log = c->log;

    if (ngx_event_flags & NGX_USE_CLEAR_EVENT) {
        /* armed once: the write edge tells that connect(2) is done */
        ngx_http_llmlimit_redis_add_event(c->read, NGX_READ_EVENT);
        ngx_http_llmlimit_redis_add_event(c->write, NGX_WRITE_EVENT);
    }

    ac->ev.data = c;
    ac->ev.addRead = ngx_http_llmlimit_redis_add_read;
    ac->ev.delRead = ngx_http_llmlimit_redis_del_read;
    ac->ev.addWrite = ngx_http_llmlimit_redis_add_write;
    ac->ev.delWrite = ngx_http_llmlimit_redis_del_write;
    ac->ev.cleanup = cleanup;

    ngx_http_llmlimit_redis_guard(ac);

    return c;
}


/*
 * hiredis frees the context: the socket is hiredis', so only the events
 * and the connection structure are released here, never closed.
 */

static void
ngx_http_llmlimit_redis_free_connection(void *data)
{
    ngx_connection_t *c = data;

    const char                 *reason;
    redisAsyncContext          *ac;
    ngx_http_llmlimit_redis_t  *redis;

    ac = c->data;
    redis = ac->data;

    ngx_http_llmlimit_redis_unhook(ac, c);

    if (redis->ac != ac) {
        return;
    }

    reason = ngx_http_llmlimit_redis_reason(ac);

    if (redis->reason[0]) {
        reason = (const char *) redis->reason;
    }

    ngx_http_llmlimit_redis_gone(redis, reason);

    redis->reason[0] = '\0';
}


void
ngx_http_llmlimit_redis_unhook(redisAsyncContext *ac, ngx_connection_t *c)
{
    ac->ev.data = NULL;
    ac->ev.addRead = NULL;
    ac->ev.delRead = NULL;
    ac->ev.addWrite = NULL;
    ac->ev.delWrite = NULL;
    ac->ev.cleanup = NULL;

    if (ngx_del_conn) {
        ngx_del_conn(c, NGX_CLOSE_EVENT);

    } else {
        if (c->read->active || c->read->disabled) {
            ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->write->active || c->write->disabled) {
            ngx_del_event(c->write, NGX_WRITE_EVENT, NGX_CLOSE_EVENT);
        }
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    c->read->closed = 1;
    c->write->closed = 1;

    ngx_free_connection(c);

    c->fd = (ngx_socket_t) -1;
}


/*
 * configuration: the parameters of llmlimit_zone that start with "redis",
 * shared with the stores that use a Redis connection of their own
 */

ngx_int_t
ngx_http_llmlimit_redis_option(ngx_conf_t *cf, ngx_http_llmlimit_zone_t *zone,
    ngx_str_t *value)
{
    ngx_int_t                   rc;
    ngx_str_t                   s;
    ngx_http_llmlimit_redis_t  *redis;

    if (ngx_strncmp(value->data, "redis", 5) != 0) {
        return NGX_DECLINED;
    }

    redis = zone->redis;

    if (redis == NULL) {
        redis = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_redis_t));
        if (redis == NULL) {
            return NGX_ERROR;
        }

        redis->zone = zone;
        redis->db = NGX_CONF_UNSET;
        redis->timeout = NGX_CONF_UNSET_MSEC;

        zone->redis = redis;
    }

    rc = ngx_http_llmlimit_redis_addr_option(cf, &redis->where, value);

    if (rc != NGX_DECLINED) {
        return rc;
    }

    if (ngx_strncmp(value->data, "redis_db=", 9) == 0) {

        if (redis->db != NGX_CONF_UNSET) {
            goto duplicate;
        }

        redis->db = ngx_atoi(value->data + 9, value->len - 9);
        if (redis->db == NGX_ERROR) {
            goto invalid;
        }

        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "redis_password=", 15) == 0) {

        if (redis->password.data) {
            goto duplicate;
        }

        redis->password.data = value->data + 15;
        redis->password.len = value->len - 15;

        if (redis->password.len == 0) {
            goto invalid;
        }

        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "redis_timeout=", 14) == 0) {

        if (redis->timeout != NGX_CONF_UNSET_MSEC) {
            goto duplicate;
        }

        s.data = value->data + 14;
        s.len = value->len - 14;

        redis->timeout = ngx_parse_time(&s, 0);
        if (redis->timeout == (ngx_msec_t) NGX_ERROR || redis->timeout == 0) {
            goto invalid;
        }

        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "redis_prefix=", 13) == 0) {

        if (redis->prefix.data) {
            goto duplicate;
        }

        redis->prefix.data = value->data + 13;
        redis->prefix.len = value->len - 13;

        /* the hash tag must be the first braces of a key */

        if (ngx_strlchr(redis->prefix.data,
                        redis->prefix.data + redis->prefix.len, '{')
            || ngx_strlchr(redis->prefix.data,
                           redis->prefix.data + redis->prefix.len, '}'))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "braces are not allowed in \"%V\"", value);
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "redis_failure=", 14) == 0) {

        s.data = value->data + 14;
        s.len = value->len - 14;

        if (s.len == 5 && ngx_strncmp(s.data, "local", 5) == 0) {
            zone->failure = NGX_HTTP_LLMLIMIT_FAIL_LOCAL;

        } else if (s.len == 4 && ngx_strncmp(s.data, "open", 4) == 0) {
            zone->failure = NGX_HTTP_LLMLIMIT_FAIL_OPEN;

        } else if (s.len == 6 && ngx_strncmp(s.data, "closed", 6) == 0) {
            zone->failure = NGX_HTTP_LLMLIMIT_FAIL_CLOSED;

        } else {
            goto invalid;
        }

        return NGX_OK;
    }

    return NGX_DECLINED;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\"", value);
    return NGX_ERROR;

duplicate:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "duplicate parameter \"%V\"", value);
    return NGX_ERROR;
}


ngx_int_t
ngx_http_llmlimit_redis_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone)
{
    u_char                      digest[20];
    ngx_sha1_t                  sha1;
    ngx_http_llmlimit_redis_t  *redis;

    redis = zone->redis;

    if (redis == NULL) {
        return NGX_DECLINED;
    }

    if (ngx_http_llmlimit_redis_addr_conf_done(cf, redis->where, &zone->name,
                                               &redis->addr)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (redis->timeout == NGX_CONF_UNSET_MSEC) {
        redis->timeout = 50;
    }

    if (redis->prefix.data == NULL) {
        ngx_str_set(&redis->prefix, "llmlimit:");
    }

    redis->sha.data = ngx_pnalloc(cf->pool, 40);
    if (redis->sha.data == NULL) {
        return NGX_ERROR;
    }

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, ngx_http_llmlimit_redis_lua,
                    sizeof(ngx_http_llmlimit_redis_lua) - 1);
    ngx_sha1_final(digest, &sha1);

    redis->sha.len = ngx_hex_dump(redis->sha.data, digest, 20)
                     - redis->sha.data;

    return NGX_OK;
}


/* once the http block is read: its "resolver" */

ngx_int_t
ngx_http_llmlimit_redis_postconf(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone)
{
    if (zone->redis == NULL) {
        return NGX_OK;
    }

    return ngx_http_llmlimit_redis_addr_postconf(cf, zone->redis->where);
}


/*
 * With timer_resolution R, nginx reads the clock and runs the timers every
 * R only: a timer of less than R expires at the next tick, however soon
 * after the request it comes, so such a redis_timeout means nothing.  It
 * is raised to 2 * R: every request then waits at least R, which is more
 * than what was asked, and at most 3 * R.  Called once the whole
 * configuration is read (timer_resolution may follow the http block), so
 * that "nginx -t" shows the warning.
 */

ngx_int_t
ngx_http_llmlimit_redis_init_module(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone)
{
    ngx_msec_t                  res;
    ngx_core_conf_t            *ccf;
    ngx_http_llmlimit_redis_t  *redis;

    redis = zone->redis;
    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    if (redis == NULL || ccf == NULL) {
        return NGX_OK;
    }

    res = ccf->timer_resolution;

    if (res == 0 || res == NGX_CONF_UNSET_MSEC || redis->timeout >= res) {
        return NGX_OK;
    }

    ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                  "llmlimit zone \"%V\": redis_timeout=%Mms is below "
                  "timer_resolution %Mms, %Mms is used instead",
                  &zone->name, redis->timeout, res, 2 * res);

    redis->timeout = 2 * res;

    return NGX_OK;
}


/*
 * Sends a command of another store (the sync store's push) over the
 * worker's connection, pipelined with the others; NGX_DECLINED while the
 * connection is not ready.
 */

static void
ngx_http_llmlimit_redis_command_reply(redisAsyncContext *ac, void *reply,
    void *data)
{
    ngx_http_llmlimit_redis_cmd_t  *cmd = data;

    cmd->handler(cmd, reply);
}


ngx_int_t
ngx_http_llmlimit_redis_command(ngx_http_llmlimit_redis_t *redis, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_llmlimit_redis_cmd_t *cmd)
{
    if (redis->state != NGX_HTTP_LLMLIMIT_REDIS_READY || redis->ac == NULL) {
        return NGX_DECLINED;
    }

    if (redisAsyncCommandArgv(redis->ac, ngx_http_llmlimit_redis_command_reply,
                              cmd, argc, argv, argvlen)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_str_t *
ngx_http_llmlimit_redis_prefix(ngx_http_llmlimit_redis_t *redis)
{
    return &redis->prefix;
}


/* the worker */

ngx_int_t
ngx_http_llmlimit_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone)
{
    if (zone->redis == NULL
        || (ngx_process != NGX_PROCESS_WORKER
            && ngx_process != NGX_PROCESS_SINGLE))
    {
        return NGX_OK;
    }

    return ngx_http_llmlimit_redis_start(cycle, zone->redis);
}


static ngx_int_t
ngx_http_llmlimit_redis_start(ngx_cycle_t *cycle,
    ngx_http_llmlimit_redis_t *redis)
{
    size_t  size;

    redis->log = cycle->log;

    redis->pool = ngx_create_pool(4096, cycle->log);
    if (redis->pool == NULL) {
        return NGX_ERROR;
    }

    redis->argv = ngx_palloc(redis->pool,
                             NGX_HTTP_LLMLIMIT_REDIS_ARGS * sizeof(char *));
    redis->argvlen = ngx_palloc(redis->pool,
                                NGX_HTTP_LLMLIMIT_REDIS_ARGS * sizeof(size_t));

    redis->limits = ngx_palloc(redis->pool,
                               NGX_HTTP_LLMLIMIT_REDIS_KEYS * sizeof(void *));
    redis->idx = ngx_pnalloc(redis->pool, NGX_HTTP_LLMLIMIT_REDIS_KEYS);

    /*
     * per key (counter or entry): the key ("t" for a token budget), its
     * limit (four numbers at most), its index and an entry's two numbers;
     * a number per request, four
     */

    size = NGX_HTTP_LLMLIMIT_REDIS_KEYS
           * (redis->prefix.len + sizeof("{}:t") - 1 + 32 + 8 * NGX_INT64_LEN)
           + (NGX_HTTP_LLMLIMIT_REDIS_BATCH + 4) * NGX_INT64_LEN;

    redis->buf = ngx_pnalloc(redis->pool, size);

    /* the arguments, the script, and a header for each */

    size += sizeof(ngx_http_llmlimit_redis_lua) + sizeof("EVALSHA")
            + (NGX_HTTP_LLMLIMIT_REDIS_ARGS + 1) * (NGX_SIZE_T_LEN + 5);

    redis->cmd = ngx_pnalloc(redis->pool, size);

    if (redis->argv == NULL || redis->argvlen == NULL || redis->buf == NULL
        || redis->cmd == NULL || redis->limits == NULL || redis->idx == NULL)
    {
        return NGX_ERROR;
    }

    ngx_queue_init(&redis->busy);
    ngx_queue_init(&redis->free);
    ngx_queue_init(&redis->calls);
    ngx_queue_init(&redis->free_calls);

    redis->flush.handler = ngx_http_llmlimit_redis_flush;
    redis->flush.data = redis;
    redis->flush.log = cycle->log;

    redis->warn.handler = ngx_http_llmlimit_redis_warn;
    redis->warn.data = redis;
    redis->warn.log = cycle->log;
    redis->warn.cancelable = 1;
    redis->timeouts = 0;
    redis->overflows = 0;

    redis->event.handler = ngx_http_llmlimit_redis_timer;
    redis->event.data = redis;
    redis->event.log = cycle->log;
    redis->event.cancelable = 1;

    redis->ac = NULL;
    redis->state = NGX_HTTP_LLMLIMIT_REDIS_DOWN;
    redis->pending = 0;
    redis->backoff = 0;
    redis->healthy = 1;
    redis->exiting = 0;
    redis->moved = 0;

    if (redis == redis->zone->redis) {
        ngx_http_llmlimit_redis_addr_init_process(redis->where, cycle->log,
                                                  redis->timeout, redis);
    }

    ngx_http_llmlimit_redis_connect(redis);

    return NGX_OK;
}


void
ngx_http_llmlimit_redis_exit_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone)
{
    if (zone->redis) {
        ngx_http_llmlimit_redis_close(zone->redis);
    }
}


/*
 * A connection of its own to a zone's Redis, for the worker, for other
 * users than the store (usage accounting): the same configuration, the
 * same handshake and reconnection, and commands of their own sent with
 * ngx_http_llmlimit_redis_own_command(), so that they never wait behind the
 * store's calls nor these behind them.
 */

ngx_http_llmlimit_redis_t *
ngx_http_llmlimit_redis_open(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone)
{
    size_t                      conf;
    ngx_http_llmlimit_redis_t  *redis;

    redis = ngx_pcalloc(cycle->pool, sizeof(ngx_http_llmlimit_redis_t));
    if (redis == NULL) {
        return NULL;
    }

    /* the configuration, before "ac" */

    conf = offsetof(ngx_http_llmlimit_redis_t, ac);
    ngx_memcpy(redis, zone->redis, conf);

    if (ngx_http_llmlimit_redis_start(cycle, redis) != NGX_OK) {
        return NULL;
    }

    return redis;
}


/*
 * Sends a command on the connection if it is ready (NGX_DECLINED if not);
 * fn(ac, reply, data) is called with the reply, or with NULL if the
 * connection is lost first.
 */

ngx_int_t
ngx_http_llmlimit_redis_own_command(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_reply_pt fn, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    if (redis->state != NGX_HTTP_LLMLIMIT_REDIS_READY
        || ngx_http_llmlimit_redis_quitting(redis))
    {
        return NGX_DECLINED;
    }

    if (redisAsyncCommandArgv(redis->ac, (redisCallbackFn *) fn, data, argc,
                              argv, argvlen)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* gives up on a connection that owes replies for too long */

void
ngx_http_llmlimit_redis_reset(ngx_http_llmlimit_redis_t *redis,
    const char *reason)
{
    ngx_http_llmlimit_redis_drop(redis, reason);
}


void
ngx_http_llmlimit_redis_close(ngx_http_llmlimit_redis_t *redis)
{
    ngx_queue_t                     *q;
    ngx_http_llmlimit_redis_wait_t  *w;

    if (redis->pool == NULL) {
        return;
    }

    redis->exiting = 1;

    if (redis == redis->zone->redis) {
        ngx_http_llmlimit_redis_addr_exit_process(redis->where);
    }

    if (redis->event.timer_set) {
        ngx_del_timer(&redis->event);
    }

    if (redis->flush.posted) {
        ngx_delete_posted_event(&redis->flush);
    }

    if (redis->warn.timer_set) {
        ngx_del_timer(&redis->warn);
        ngx_http_llmlimit_redis_warn(&redis->warn);
    }

    /*
     * requests still waiting are not resumed any more, nor sent; no
     * request refers to a wait any more
     */

    for (q = ngx_queue_head(&redis->busy);
         q != ngx_queue_sentinel(&redis->busy);
         q = ngx_queue_next(q))
    {
        w = ngx_queue_data(q, ngx_http_llmlimit_redis_wait_t, queue);
        ngx_http_llmlimit_redis_detach(w);
    }

    if (redis->ac) {
        redisAsyncFree(redis->ac);
        redis->ac = NULL;
    }

    ngx_destroy_pool(redis->pool);
    redis->pool = NULL;
}
