
/*
 * Copyright (C) llmlimit developers
 */


#ifndef _NGX_HTTP_LLMLIMIT_H_INCLUDED_
#define _NGX_HTTP_LLMLIMIT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_md5.h>


#define NGX_HTTP_LLMLIMIT_SLIDING         0
#define NGX_HTTP_LLMLIMIT_FIXED           1
#define NGX_HTTP_LLMLIMIT_GCRA            2

#define NGX_HTTP_LLMLIMIT_PATH_ANY        0
#define NGX_HTTP_LLMLIMIT_PATH_EXACT      1
#define NGX_HTTP_LLMLIMIT_PATH_PATTERN    2
#define NGX_HTTP_LLMLIMIT_PATH_REGEX      3

#define NGX_HTTP_LLMLIMIT_FAIL_LOCAL      0
#define NGX_HTTP_LLMLIMIT_FAIL_OPEN       1
#define NGX_HTTP_LLMLIMIT_FAIL_CLOSED     2

#define NGX_HTTP_LLMLIMIT_MAX_LIMITS      8
#define NGX_HTTP_LLMLIMIT_MAX_COUNTERS    32
#define NGX_HTTP_LLMLIMIT_MAX_TABLES                                         \
    (NGX_HTTP_LLMLIMIT_MAX_COUNTERS / NGX_HTTP_LLMLIMIT_MAX_LIMITS)

/* $llmlimit_status */
#define NGX_HTTP_LLMLIMIT_UNSET           0
#define NGX_HTTP_LLMLIMIT_PASSED          1
#define NGX_HTTP_LLMLIMIT_REJECTED        2
#define NGX_HTTP_LLMLIMIT_REJECTED_DRY    3
#define NGX_HTTP_LLMLIMIT_BYPASSED        4
#define NGX_HTTP_LLMLIMIT_ERROR           5


typedef struct ngx_http_llmlimit_redis_s  ngx_http_llmlimit_redis_t;
typedef struct ngx_http_llmlimit_store_s  ngx_http_llmlimit_store_t;
typedef struct ngx_http_llmlimit_metrics_zone_s
    ngx_http_llmlimit_metrics_zone_t;


/*
 * The largest COUNT of a token budget, and the most tokens one request is
 * charged (src/ngx_http_llmlimit_algo.c: an overdraft is remembered up to
 * one more COUNT, so counts stay below 2^32)
 */
#define NGX_HTTP_LLMLIMIT_MAX_TOKENS      0x7fffffff


/* one COUNT/PERIOD, or COUNTtokens/PERIOD */
typedef struct {
    ngx_uint_t                      count;
    ngx_msec_t                      period;
    ngx_uint_t                      tokens;        /* a token budget */
    ngx_str_t                       json;          /* 429 body, set by lead */
} ngx_http_llmlimit_limit_t;


/* the limits of a rule, for one plan; nlimits == 0 means "unlimited" */
typedef struct {
    ngx_str_t                       plan;
    ngx_uint_t                      nlimits;
    ngx_http_llmlimit_limit_t       limits[NGX_HTTP_LLMLIMIT_MAX_LIMITS];
} ngx_http_llmlimit_limits_t;


typedef struct {
    ngx_str_t                       category;
    ngx_str_t                       category_id;   /* IETF policy name */
    ngx_uint_t                      methods;       /* NGX_HTTP_* bits; 0: any */

    ngx_uint_t                      path_type;
    ngx_str_t                       path;          /* literal or pattern */
    ngx_array_t                    *path_tokens;   /* compiled pattern */
#if (NGX_PCRE)
    ngx_regex_t                    *regex;
#endif

    ngx_http_complex_value_t        key;
    ngx_array_t                    *key_vars;      /* ngx_int_t indexes */
    ngx_uint_t                      key_single;    /* KEY is "$var" */

    /* hash of (table, category, KEY expression): the identity's seed */
    uint64_t                        budget[2];

    ngx_array_t                    *plans;         /* limits_t per plan */
    ngx_http_llmlimit_limits_t      deflt;         /* any other plan */

    ngx_atomic_t                   *metrics;       /* of its category */
} ngx_http_llmlimit_rule_t;


typedef struct {
    ngx_rbtree_node_t             **roots;         /* of the trees */
    ngx_uint_t                      mask;          /* trees - 1 */
    ngx_rbtree_node_t               sentinel;
    ngx_queue_t                     lru;
    ngx_queue_t                     free;
    ngx_uint_t                      nodes;
    ngx_uint_t                      evicted;       /* since the warning */
    ngx_uint_t                      evictions;     /* since the start */
    time_t                          warn_time;
    void                           *store;         /* the store's own */
} ngx_http_llmlimit_shctx_t;


typedef struct {
    ngx_str_t                       name;
    size_t                          size;
    ngx_shm_zone_t                 *shm_zone;
    ngx_http_llmlimit_shctx_t      *sh;
    ngx_slab_pool_t                *shpool;
    ngx_http_llmlimit_store_t      *store;         /* where it counts */
    ngx_http_llmlimit_redis_t      *redis;         /* NULL: shm only */
    ngx_uint_t                      failure;       /* redis_failure= */
    void                           *data;          /* the store's own */
    ngx_http_llmlimit_metrics_zone_t  *metrics;    /* NULL: none */
} ngx_http_llmlimit_zone_t;


/*
 * What the rule walk reads of a rule to test METHODS and PATH, packed with
 * the patterns and literals of the whole table into one block, in order:
 * a walk reads a kilobyte or two sequentially instead of several cold
 * cache lines of every rule.
 */
typedef struct {
    uint32_t                        methods;       /* 0: any */
    uint16_t                        path_type;
    uint16_t                        ntokens;       /* of a pattern */
    size_t                          len;           /* exact: path length;
                                                      pattern: the least */
    void                           *data;          /* path, tokens or regex */
    ngx_int_t                      *vars;          /* KEY's variables */
    ngx_uint_t                      nvars;         /* 0: KEY is "$var" */
    ngx_int_t                       var;           /* that "$var" */
} ngx_http_llmlimit_match_t;


typedef struct {
    ngx_str_t                       name;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_uint_t                      algorithm;
    ngx_http_complex_value_t       *plan;
    ngx_array_t                     rules;         /* of rule_t */
    ngx_http_llmlimit_match_t      *match;         /* one per rule */
    ngx_atomic_t                   *metrics;       /* matched no rule */
} ngx_http_llmlimit_table_t;


/*
 * One counter of a request: a (table, category, KEY expression, identity)
 * budget and one of its limits.  The handler fills the first part, a store
 * fills the results.
 */
typedef struct {
    u_char                          hash[16];      /* of budget, identity */
    ngx_msec_t                      period;
    ngx_uint_t                      count;
    ngx_uint_t                      algorithm;
    ngx_uint_t                      cost;          /* counted on admission:
                                                      1, or the tokens
                                                      estimated */
    ngx_http_llmlimit_table_t      *table;
    ngx_http_llmlimit_rule_t       *rule;
    ngx_http_llmlimit_limit_t      *limit;

    ngx_uint_t                      remaining;     /* after this request */
    ngx_msec_t                      reset;         /* until one more fits */
    ngx_msec_t                      retry;         /* until 1 fits, if not */
    unsigned                        rejected:1;
    unsigned                        tokens:1;      /* a token budget */
} ngx_http_llmlimit_counter_t;


typedef struct ngx_http_llmlimit_batch_s  ngx_http_llmlimit_batch_t;

typedef void (*ngx_http_llmlimit_done_pt)(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);

/*
 * The counters of one request in one zone, checked and counted
 * atomically: all are counted or none.  Where they were counted is kept
 * so that it can be taken back: "local" in the zone's shared memory (a
 * shared-memory zone, the local fallback, or a Redis zone's shadow
 * counters), "remote" in Redis, at the store's time "time".
 */
struct ngx_http_llmlimit_batch_s {
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_counter_t    *counters;
    ngx_uint_t                      n;
    ngx_int_t                       rc;            /* NGX_OK, NGX_BUSY, ... */
    ngx_http_llmlimit_done_pt       done;          /* async completion */
    void                           *data;          /* store's own; NULL:
                                                      nothing owed */
    int64_t                         time;          /* of the remote count */
    int64_t                         local_time;    /* of the local count */
    int64_t                         checked;       /* when, ms, by this
                                                      host's clock */
    unsigned                        local:1;       /* counted in shm */
    unsigned                        remote:1;      /* counted in Redis */
    unsigned                        kept:1;        /* the request passed */
};


/*
 * The store interface, one table per kind of store; a zone points at its
 * own, chosen at configuration.
 *
 * check() returns
 *   NGX_OK     all counters passed and were counted (results filled);
 *   NGX_BUSY   some counter is over its limit, none counted (results filled);
 *   NGX_AGAIN  b->done(r, b) will be called later with b->rc set to one of
 *              NGX_OK, NGX_BUSY or NGX_ERROR;
 *   NGX_ERROR  the store cannot answer: the zone's failure policy applies.
 *
 * refund() takes back what a checked batch counted, for a request that is
 * not let through after all (a later zone rejected it, a "closed" zone
 * answered 503, or it was freed before a decision); a count the store may
 * still make (a reply owed after a timeout) is taken back when it is
 * known.  Calling it again does nothing.
 *
 * charge() charges the token budgets of a batch that was let through with
 * what the request used, "tokens", when it ends, in place of what each
 * token counter counted on admission (cost, the estimate), in the store
 * that counted it (src/ngx_http_llmlimit_algo.c: algo_charge()); a Redis
 * charge rides in the next call.  Counters of requests are left alone.  A
 * store without charge() (NULL) cannot count token budgets: nginx -t
 * refuses a table with token budgets on its zones.
 *
 * Configuration: llmlimit_zone offers each of its "key=value" parameters
 * to the stores in the order of registration (ngx_http_llmlimit_stores[]
 * in ngx_http_llmlimit_module.c); option() returns NGX_OK if it took the
 * parameter, NGX_DECLINED if it is not its own, NGX_ERROR (logged) if it
 * is invalid.  Then conf_done() of each store in the same order: the first
 * to return NGX_OK is the zone's store; NGX_DECLINED passes the zone on.
 * "algorithms" are the algorithms the store can count (bits
 * 1 << NGX_HTTP_LLMLIMIT_*).  option, init_module, init_process,
 * charge, count and exit_process may be NULL.
 *
 * count() is told, under the zone's lock, of every change the
 * shared-memory counters make for the zone's own check() and refund():
 * n = 1 for a request counted at "time", n = -1 for one taken back.
 * (Stores with count() have no charge(): token budgets are not counted
 * there.)
 */
struct ngx_http_llmlimit_store_s {
    char       *name;
    ngx_uint_t  algorithms;
    ngx_int_t (*option)(ngx_conf_t *cf, ngx_http_llmlimit_zone_t *zone,
                        ngx_str_t *value);
    ngx_int_t (*conf_done)(ngx_conf_t *cf, ngx_http_llmlimit_zone_t *zone);
    ngx_int_t (*init_zone)(ngx_shm_zone_t *shm_zone, void *data);
    ngx_int_t (*init_module)(ngx_cycle_t *cycle,
                             ngx_http_llmlimit_zone_t *zone);
    ngx_int_t (*init_process)(ngx_cycle_t *cycle,
                              ngx_http_llmlimit_zone_t *zone);
    ngx_int_t (*check)(ngx_http_request_t *r, ngx_http_llmlimit_batch_t *b);
    void      (*refund)(ngx_http_request_t *r, ngx_http_llmlimit_batch_t *b);
    void      (*charge)(ngx_http_request_t *r, ngx_http_llmlimit_batch_t *b,
                        ngx_uint_t tokens);
    void      (*count)(ngx_http_llmlimit_zone_t *zone,
                       ngx_http_llmlimit_counter_t *c, uint64_t k[2],
                       int64_t time, ngx_int_t n);
    void      (*exit_process)(ngx_cycle_t *cycle,
                              ngx_http_llmlimit_zone_t *zone);
};

#define NGX_HTTP_LLMLIMIT_ALL_ALGORITHMS                                     \
    (1 << NGX_HTTP_LLMLIMIT_SLIDING | 1 << NGX_HTTP_LLMLIMIT_FIXED           \
     | 1 << NGX_HTTP_LLMLIMIT_GCRA)


extern ngx_module_t                     ngx_http_llmlimit_module;
extern ngx_module_t                     ngx_http_llmlimit_keys_module;
extern ngx_http_llmlimit_store_t        ngx_http_llmlimit_shm_store;
extern ngx_http_llmlimit_store_t        ngx_http_llmlimit_redis_store;
extern ngx_http_llmlimit_store_t        ngx_http_llmlimit_sync_store;


/* ngx_http_llmlimit_module.c */
ngx_http_llmlimit_zone_t *ngx_http_llmlimit_zone_ref(ngx_conf_t *cf,
    ngx_str_t *name);


/* src/ngx_http_llmlimit_rules.c */
char *ngx_http_llmlimit_rule_parse(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table);
char *ngx_http_llmlimit_rules_compile(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table);
ngx_int_t ngx_http_llmlimit_rules_match(ngx_http_request_t *r,
    ngx_http_llmlimit_table_t *table, ngx_http_llmlimit_rule_t **rule,
    ngx_str_t *identity);
ngx_http_llmlimit_limits_t *ngx_http_llmlimit_rule_limits(
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *plan);


/* src/ngx_http_llmlimit_keys.c */
ngx_str_t *ngx_http_llmlimit_keys_request_fields(ngx_http_request_t *r);


/* src/ngx_http_llmlimit_hash.c */
void ngx_http_llmlimit_hash(const uint64_t seed[2], const u_char *data,
    size_t len, uint64_t out[2]);


/* src/ngx_http_llmlimit_algo.c */
typedef struct {
    int64_t                         t;     /* window start, ms, or TAT */
    uint32_t                        cur;
    uint32_t                        prev;
} ngx_http_llmlimit_state_t;

ngx_int_t ngx_http_llmlimit_algo_check(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
void ngx_http_llmlimit_algo_count(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
void ngx_http_llmlimit_algo_refund(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t counted);
void ngx_http_llmlimit_algo_charge(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now, int64_t used,
    int64_t counted);
void ngx_http_llmlimit_algo_peek(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
int64_t ngx_http_llmlimit_algo_expires(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c);
int64_t ngx_http_llmlimit_now(void);


/* src/ngx_http_llmlimit_shm.c */
ngx_int_t ngx_http_llmlimit_shm_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
void ngx_http_llmlimit_shm_refund(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
void ngx_http_llmlimit_shm_charge(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
void ngx_http_llmlimit_shm_tokens(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b, ngx_uint_t tokens);
ngx_http_llmlimit_state_t *ngx_http_llmlimit_shm_state_locked(
    ngx_http_llmlimit_zone_t *zone, uint64_t k[2]);


/* src/ngx_http_llmlimit_redis.c */
ngx_int_t ngx_http_llmlimit_redis_option(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone, ngx_str_t *value);
ngx_int_t ngx_http_llmlimit_redis_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone);
ngx_int_t ngx_http_llmlimit_redis_postconf(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone);
ngx_int_t ngx_http_llmlimit_redis_init_module(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);
ngx_int_t ngx_http_llmlimit_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);
void ngx_http_llmlimit_redis_exit_process(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);

/* a command of another store over the zone's Redis connection */
typedef struct ngx_http_llmlimit_redis_cmd_s  ngx_http_llmlimit_redis_cmd_t;

struct ngx_http_llmlimit_redis_cmd_s {
    /* reply: a redisReply, NULL if the connection was lost first */
    void (*handler)(ngx_http_llmlimit_redis_cmd_t *cmd, void *reply);
};

ngx_int_t ngx_http_llmlimit_redis_command(ngx_http_llmlimit_redis_t *redis,
    int argc, const char **argv, const size_t *argvlen,
    ngx_http_llmlimit_redis_cmd_t *cmd);
ngx_str_t *ngx_http_llmlimit_redis_prefix(ngx_http_llmlimit_redis_t *redis);

/* a connection of its own to a zone's Redis (usage accounting) */
struct redisAsyncContext;
typedef void (*ngx_http_llmlimit_redis_reply_pt)(struct redisAsyncContext *ac,
    void *reply, void *data);

ngx_http_llmlimit_redis_t *ngx_http_llmlimit_redis_open(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);
ngx_int_t ngx_http_llmlimit_redis_own_command(
    ngx_http_llmlimit_redis_t *redis, ngx_http_llmlimit_redis_reply_pt fn,
    void *data, int argc, const char **argv, const size_t *argvlen);
void ngx_http_llmlimit_redis_reset(ngx_http_llmlimit_redis_t *redis,
    const char *reason);
void ngx_http_llmlimit_redis_close(ngx_http_llmlimit_redis_t *redis);


/* the module's configuration and request state */

#define NGX_HTTP_LLMLIMIT_HEADERS_X       0x01
#define NGX_HTTP_LLMLIMIT_HEADERS_IETF    0x02
#define NGX_HTTP_LLMLIMIT_HEADERS_OPENAI  0x04
#define NGX_HTTP_LLMLIMIT_HEADERS_ANTHROPIC  0x08

/* llmlimit_phase */
#define NGX_HTTP_LLMLIMIT_PHASE_PREACCESS 0
#define NGX_HTTP_LLMLIMIT_PHASE_ACCESS    1

typedef struct {
    ngx_array_t                    *tables;        /* table_t *; NULL: off */
    ngx_uint_t                      status_code;
    ngx_flag_t                      dry_run;
    ngx_uint_t                      log_level;
    ngx_uint_t                      log_limit;     /* lines/s; 0: all */
    ngx_uint_t                      headers;
    ngx_uint_t                      reset_epoch;
    ngx_str_t                       header_limit;
    ngx_str_t                       header_remaining;
    ngx_str_t                       header_reset;
    ngx_uint_t                      phase;         /* llmlimit_phase */
    ngx_http_complex_value_t       *tokens;        /* NULL: auto */
    ngx_http_complex_value_t       *tokens_estimate;
} ngx_http_llmlimit_loc_conf_t;


/*
 * The usage scanner's state: a JSON tokenizer that keeps no text, only
 * where it is (nesting, in a string, a key being matched, a number being
 * read) and the usage fields read so far
 */

#define NGX_HTTP_LLMLIMIT_USAGE_FIELDS    5

typedef struct {
    uint64_t                        objects;       /* bit d: level d+1 is
                                                      an object */
    uint64_t                        number;
    uint64_t                        fields[NGX_HTTP_LLMLIMIT_USAGE_FIELDS];
    uint32_t                        depth;
    uint32_t                        usage_depth;   /* 0: not in "usage" */
    uint32_t                        seen;          /* bits of fields[] */
    uint16_t                        state;
    uint16_t                        sse;           /* state of the line */
    uint16_t                        key;           /* candidates, bits */
    uint16_t                        keypos;
    uint16_t                        pending;       /* key awaiting value */
    unsigned                        mode:2;        /* unknown, JSON, SSE */
    unsigned                        expect_key:1;
    unsigned                        is_key:1;
    unsigned                        negative:1;
    unsigned                        inexact:1;     /* fraction, exponent */
    unsigned                        capped:1;
    unsigned                        bad:1;         /* a field unusable */
    unsigned                        huge:1;        /* a field too large */
    unsigned                        unread:1;      /* a buffer not read */
    unsigned                        cr:1;
} ngx_http_llmlimit_usage_t;


typedef struct {
    ngx_http_request_t             *request;
    ngx_uint_t                      status;        /* $llmlimit_status */
    ngx_uint_t                      waiting;       /* on a store */
    ngx_uint_t                      decided;
    int64_t                         checked;       /* when, ms, by this
                                                      host's clock */

    ngx_http_llmlimit_counter_t    *counters;
    ngx_uint_t                      ncounters;
    ngx_http_llmlimit_batch_t      *batches;
    ngx_uint_t                      nbatches;
    ngx_uint_t                      batch;         /* the one at hand */

    ngx_http_llmlimit_counter_t    *report;        /* most restrictive */
    ngx_str_t                      *category;
    ngx_str_t                       plan;
    ngx_msec_t                      retry;

    ngx_http_llmlimit_usage_t      *usage;         /* the body's, "auto" */
    ngx_uint_t                      tokens;        /* $llmlimit_tokens */
    ngx_uint_t                      estimate;      /* counted on admission */
    unsigned                        has_tokens:1;  /* has a token budget */
    unsigned                        charged:1;

    /* the metrics of each table applied, by $llmlimit_status */
    ngx_atomic_t                   *metrics[NGX_HTTP_LLMLIMIT_MAX_TABLES];
    ngx_uint_t                      nmetrics;
    ngx_uint_t                      unmatched;     /* bit i: metrics[i] is
                                                      of no rule */
} ngx_http_llmlimit_ctx_t;


/* src/ngx_http_llmlimit_tokens.c */
ngx_int_t ngx_http_llmlimit_tokens_init(ngx_conf_t *cf);
ngx_int_t ngx_http_llmlimit_tokens_header(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
ngx_uint_t ngx_http_llmlimit_tokens_estimate(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf);
void ngx_http_llmlimit_tokens_end(ngx_http_request_t *r,
    ngx_http_llmlimit_ctx_t *ctx);
ngx_int_t ngx_http_llmlimit_tokens_parse(u_char *p, size_t len,
    ngx_uint_t *tokens);

/*
 * The usage scanner, on the body as it passes: feed() every buffer in
 * order, result() at any time (NGX_OK and *tokens, NGX_DECLINED when no
 * usable usage was read); see src/ngx_http_llmlimit_tokens.c.
 */
void ngx_http_llmlimit_usage_init(ngx_http_llmlimit_usage_t *u);
void ngx_http_llmlimit_usage_feed(ngx_http_llmlimit_usage_t *u, u_char *p,
    u_char *last);
ngx_int_t ngx_http_llmlimit_usage_result(ngx_http_llmlimit_usage_t *u,
    ngx_uint_t *tokens, const char **why);


/* src/ngx_http_llmlimit_response.c */
ngx_int_t ngx_http_llmlimit_add_headers(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
ngx_int_t ngx_http_llmlimit_reject(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);


/* src/ngx_http_llmlimit_metrics.c */

/* the Redis events of ngx_http_llmlimit_metrics_redis() */
#define NGX_HTTP_LLMLIMIT_METRICS_CONNECTED   0  /* handshake done */
#define NGX_HTTP_LLMLIMIT_METRICS_LOST        1  /* connection gone */
#define NGX_HTTP_LLMLIMIT_METRICS_TIMEOUT     2  /* a request timed out */
#define NGX_HTTP_LLMLIMIT_METRICS_OVERFLOW    3  /* too many replies owed */
#define NGX_HTTP_LLMLIMIT_METRICS_PROTOCOL    4  /* reply of a wrong shape */
#define NGX_HTTP_LLMLIMIT_METRICS_SCRIPT      5  /* error reply */
#define NGX_HTTP_LLMLIMIT_METRICS_REPLY       6  /* a good reply */

extern ngx_module_t                     ngx_http_llmlimit_metrics_module;

ngx_int_t ngx_http_llmlimit_metrics_add_table(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table);
ngx_int_t ngx_http_llmlimit_metrics_add_zone(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone);
void ngx_http_llmlimit_metrics_request(ngx_http_llmlimit_ctx_t *ctx);
void ngx_http_llmlimit_metrics_tokens(ngx_http_llmlimit_ctx_t *ctx,
    ngx_uint_t n);
void ngx_http_llmlimit_metrics_fallback(ngx_http_llmlimit_zone_t *zone);
void ngx_http_llmlimit_metrics_redis(ngx_http_llmlimit_zone_t *zone,
    ngx_uint_t event, uint64_t sent);
uint64_t ngx_http_llmlimit_metrics_clock(void);


/* src/ngx_http_llmlimit_keys.c */
ngx_int_t ngx_http_llmlimit_keys_stats(ngx_cycle_t *cycle,
    ngx_uint_t *nkeys, time_t *loaded, ngx_uint_t *failures);


/* src/ngx_http_llmlimit_json.c */
ngx_int_t ngx_http_llmlimit_json_prefix(ngx_pool_t *pool,
    ngx_str_t *category, ngx_http_llmlimit_limit_t *limit);


#endif /* _NGX_HTTP_LLMLIMIT_H_INCLUDED_ */
