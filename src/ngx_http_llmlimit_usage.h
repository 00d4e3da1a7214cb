
/*
 * Copyright (C) llmlimit developers
 */


#ifndef _NGX_HTTP_LLMLIMIT_USAGE_H_INCLUDED_
#define _NGX_HTTP_LLMLIMIT_USAGE_H_INCLUDED_


#include "ngx_http_llmlimit.h"


/* the fields of a group, in the order of llmlimit_usage's parameters */
#define NGX_HTTP_LLMLIMIT_USAGE_WORKSPACE       0
#define NGX_HTTP_LLMLIMIT_USAGE_WORKSPACE_NAME  1
#define NGX_HTTP_LLMLIMIT_USAGE_PROJECT         2
#define NGX_HTTP_LLMLIMIT_USAGE_PROJECT_NAME    3
#define NGX_HTTP_LLMLIMIT_USAGE_USER            4
#define NGX_HTTP_LLMLIMIT_USAGE_USER_EMAIL      5
#define NGX_HTTP_LLMLIMIT_USAGE_API_KEY         6
#define NGX_HTTP_LLMLIMIT_USAGE_NFIELDS          7

/* group_by: the id field is 2 * group_by, its name the next one */
#define NGX_HTTP_LLMLIMIT_USAGE_BY_WORKSPACE    0
#define NGX_HTTP_LLMLIMIT_USAGE_BY_PROJECT      1
#define NGX_HTTP_LLMLIMIT_USAGE_BY_USER         2
#define NGX_HTTP_LLMLIMIT_USAGE_BY_API_KEY      3
#define NGX_HTTP_LLMLIMIT_USAGE_GROUP_BYS       4

/* a field's value is cut to this many bytes */
#define NGX_HTTP_LLMLIMIT_USAGE_FIELD_MAX       512


typedef struct ngx_http_llmlimit_usage_bucket_s
    ngx_http_llmlimit_usage_bucket_t;


/*
 * A group: the strings of one (workspace, project, user, api_key), interned
 * once in the zone, in an rbtree keyed by their hash.  "fhash" holds the
 * hash of each group_by's id field, for the API.
 */
typedef struct {
    ngx_rbtree_node_t                  node;       /* key: hash[0] */
    uint64_t                           hash2;      /* hash[1] */
    ngx_http_llmlimit_usage_bucket_t  *cur;        /* latest bucket */
    uint32_t                           nbuckets;
    uint32_t                           fhash[NGX_HTTP_LLMLIMIT_USAGE_GROUP_BYS];
    uint16_t                           len[NGX_HTTP_LLMLIMIT_USAGE_NFIELDS];
    u_char                             data[1];
} ngx_http_llmlimit_usage_group_t;


/*
 * The counters of a group in one bucket (an hour), 64 bytes: a slab chunk
 * of its own size.  The "d_" counters are what is not flushed to Redis
 * yet.  Buckets are queued in the order they were made, which is the
 * order of their start, give or take a worker's cached time.
 */
struct ngx_http_llmlimit_usage_bucket_s {
    ngx_queue_t                        queue;
    ngx_http_llmlimit_usage_group_t   *group;
    uint32_t                           start;      /* Unix time */
    uint32_t                           requests;
    uint32_t                           rejected;
    uint32_t                           d_requests;
    uint32_t                           d_rejected;
    uint32_t                           taken;      /* once, for Redis */
    uint64_t                           tokens;
    uint64_t                           d_tokens;
};


typedef struct {
    ngx_rbtree_node_t                 *root;       /* of the groups */
    ngx_rbtree_node_t                  sentinel;
    ngx_queue_t                        buckets;    /* oldest first */
    ngx_uint_t                         nbuckets;
    ngx_uint_t                         ngroups;
    ngx_uint_t                         evicted;    /* buckets, since start */
    ngx_uint_t                         lost;       /* unflushed, evicted */
    time_t                             warn_time;
    time_t                             flushed;    /* all before: taken */
} ngx_http_llmlimit_usage_sh_t;


typedef struct ngx_http_llmlimit_usage_flush_s
    ngx_http_llmlimit_usage_flush_t;

typedef struct {
    ngx_str_t                          name;
    ngx_shm_zone_t                    *shm_zone;
    ngx_slab_pool_t                   *shpool;
    ngx_http_llmlimit_usage_sh_t      *sh;
    time_t                             retention;  /* seconds */
    time_t                             bucket;     /* seconds */
    ngx_http_llmlimit_zone_t          *redis;      /* its llmlimit_zone */
    ngx_http_llmlimit_usage_flush_t   *flush;      /* per worker */
    ngx_str_t                          file;       /* where declared */
    ngx_uint_t                         line;
    ngx_uint_t                         defined;
} ngx_http_llmlimit_usage_zone_t;


/*
 * a field: one of the key directory's fields (key >= 0), one variable read
 * as it is (index), or a complex value
 */
typedef struct {
    ngx_int_t                          key;        /* NGX_ERROR: not one */
    ngx_int_t                          index;      /* NGX_ERROR: complex */
    ngx_http_complex_value_t          *cv;
} ngx_http_llmlimit_usage_field_t;


typedef struct {
    ngx_http_llmlimit_usage_zone_t    *zone;       /* NULL: off */
    ngx_http_llmlimit_usage_zone_t    *api;        /* llmlimit_usage_api */
    ngx_http_llmlimit_usage_field_t    fields[NGX_HTTP_LLMLIMIT_USAGE_NFIELDS];
} ngx_http_llmlimit_usage_loc_conf_t;


/* what a bucket has not flushed to Redis yet, taken from the zone */
typedef struct {
    uint64_t                           hash[2];    /* of the group */
    ngx_str_t                          fields[NGX_HTTP_LLMLIMIT_USAGE_NFIELDS];
    time_t                             start;
    uint64_t                           requests;
    uint64_t                           rejected;
    uint64_t                           tokens;
    ngx_uint_t                         first;      /* the bucket's first */
} ngx_http_llmlimit_usage_delta_t;


/* one row of an answer: a (stride bucket, group) */
typedef struct {
    int64_t                            idx;        /* stride bucket */
    uint32_t                           hash;       /* of idx and id */
    ngx_str_t                          id;
    ngx_str_t                          name;
    uint64_t                           requests;
    uint64_t                           rejected;
    uint64_t                           tokens;
} ngx_http_llmlimit_usage_row_t;


/* an API query and its answer in the making */
typedef struct {
    int64_t                            start;      /* ms */
    int64_t                            end;        /* ms */
    int64_t                            stride;     /* ms */
    int64_t                            kept;       /* retention start, s */
    ngx_uint_t                         group_by;
    ngx_uint_t                         csv;

    ngx_str_t                         *ids;        /* workspace filter */
    uint32_t                          *ids_index;  /* NULL: all */
    ngx_uint_t                         ids_mask;

    ngx_array_t                        rows;       /* of row_t */
    uint32_t                          *index;      /* row + 1; 0: free */
    ngx_uint_t                         mask;
    ngx_pool_t                        *pool;
} ngx_http_llmlimit_usage_query_t;


extern ngx_module_t  ngx_http_llmlimit_usage_module;


/* src/ngx_http_llmlimit_usage.c */
ngx_int_t ngx_http_llmlimit_usage_add_tokens(ngx_http_request_t *r,
    uint64_t tokens);
ngx_int_t ngx_http_llmlimit_usage_collect(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_http_llmlimit_usage_query_t *q, ngx_uint_t deltas);
ngx_int_t ngx_http_llmlimit_usage_take(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_array_t *deltas, ngx_uint_t max);
void ngx_http_llmlimit_usage_give_back(ngx_http_llmlimit_usage_zone_t *uz,
    ngx_array_t *deltas);
void ngx_http_llmlimit_usage_exit_flush(ngx_http_llmlimit_usage_zone_t *uz);
ngx_int_t ngx_http_llmlimit_usage_init_flush(ngx_cycle_t *cycle,
    ngx_http_llmlimit_usage_zone_t *uz);
ngx_int_t ngx_http_llmlimit_usage_redis_query(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_zone_t *uz, ngx_http_llmlimit_usage_query_t *q);


/* src/ngx_http_llmlimit_usage_api.c */
ngx_int_t ngx_http_llmlimit_usage_api_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_llmlimit_usage_add(ngx_http_llmlimit_usage_query_t *q,
    time_t start, ngx_str_t *workspace, uint32_t ws_hash, ngx_str_t *id,
    uint32_t id_hash, ngx_str_t *name, uint64_t requests, uint64_t rejected,
    uint64_t tokens);
ngx_int_t ngx_http_llmlimit_usage_answer(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q);
ngx_int_t ngx_http_llmlimit_usage_fail(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *message);
uint32_t ngx_http_llmlimit_usage_hash(u_char *data, size_t len);


#endif /* _NGX_HTTP_LLMLIMIT_USAGE_H_INCLUDED_ */
