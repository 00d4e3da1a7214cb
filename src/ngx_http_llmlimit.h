
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


/* one COUNT/PERIOD */
typedef struct {
    ngx_uint_t                      count;
    ngx_msec_t                      period;
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
} ngx_http_llmlimit_rule_t;


typedef struct {
    ngx_rbtree_node_t             **roots;         /* of the trees */
    ngx_uint_t                      mask;          /* trees - 1 */
    ngx_rbtree_node_t               sentinel;
    ngx_queue_t                     lru;
    ngx_queue_t                     free;
    ngx_uint_t                      nodes;
    ngx_uint_t                      evicted;
    time_t                          warn_time;
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
    ngx_http_llmlimit_table_t      *table;
    ngx_http_llmlimit_rule_t       *rule;
    ngx_http_llmlimit_limit_t      *limit;

    ngx_uint_t                      remaining;     /* after this request */
    ngx_msec_t                      reset;         /* until one more fits */
    ngx_msec_t                      retry;         /* until 1 fits, if not */
    unsigned                        rejected:1;
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
 * Configuration: llmlimit_zone offers each of its "key=value" parameters
 * to the stores in the order of registration (ngx_http_llmlimit_stores[]
 * in ngx_http_llmlimit_module.c); option() returns NGX_OK if it took the
 * parameter, NGX_DECLINED if it is not its own, NGX_ERROR (logged) if it
 * is invalid.  Then conf_done() of each store in the same order: the first
 * to return NGX_OK is the zone's store; NGX_DECLINED passes the zone on.
 * "algorithms" are the algorithms the store can count (bits
 * 1 << NGX_HTTP_LLMLIMIT_*).  option, init_module, init_process and
 * exit_process may be NULL.
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
    int64_t                         t;     /* window start or TAT, ms */
    uint32_t                        cur;
    uint32_t                        prev;
} ngx_http_llmlimit_state_t;

ngx_int_t ngx_http_llmlimit_algo_check(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
void ngx_http_llmlimit_algo_count(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
void ngx_http_llmlimit_algo_refund(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t counted);
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

/* a connection of its own to a zone's Redis (usage accounting) */
struct redisAsyncContext;
typedef void (*ngx_http_llmlimit_redis_reply_pt)(struct redisAsyncContext *ac,
    void *reply, void *data);

ngx_http_llmlimit_redis_t *ngx_http_llmlimit_redis_open(ngx_cycle_t *cycle,
    ngx_http_llmlimit_zone_t *zone);
ngx_int_t ngx_http_llmlimit_redis_command(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_reply_pt fn, void *data, int argc,
    const char **argv, const size_t *argvlen);
void ngx_http_llmlimit_redis_reset(ngx_http_llmlimit_redis_t *redis,
    const char *reason);
ngx_str_t *ngx_http_llmlimit_redis_prefix(ngx_http_llmlimit_redis_t *redis);
void ngx_http_llmlimit_redis_close(ngx_http_llmlimit_redis_t *redis);


/* the module's configuration and request state */

#define NGX_HTTP_LLMLIMIT_HEADERS_X       0x01
#define NGX_HTTP_LLMLIMIT_HEADERS_IETF    0x02

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
} ngx_http_llmlimit_loc_conf_t;


typedef struct {
    ngx_http_request_t             *request;
    ngx_uint_t                      status;        /* $llmlimit_status */
    ngx_uint_t                      waiting;       /* on a store */
    ngx_uint_t                      decided;

    ngx_http_llmlimit_counter_t    *counters;
    ngx_uint_t                      ncounters;
    ngx_http_llmlimit_batch_t      *batches;
    ngx_uint_t                      nbatches;
    ngx_uint_t                      batch;         /* the one at hand */

    ngx_http_llmlimit_counter_t    *report;        /* most restrictive */
    ngx_str_t                      *category;
    ngx_str_t                       plan;
    ngx_msec_t                      retry;
} ngx_http_llmlimit_ctx_t;


/* src/ngx_http_llmlimit_response.c */
ngx_int_t ngx_http_llmlimit_add_headers(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
ngx_int_t ngx_http_llmlimit_reject(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);


/* src/ngx_http_llmlimit_json.c */
ngx_int_t ngx_http_llmlimit_json_prefix(ngx_pool_t *pool,
    ngx_str_t *category, ngx_http_llmlimit_limit_t *limit);


#endif /* _NGX_HTTP_LLMLIMIT_H_INCLUDED_ */
