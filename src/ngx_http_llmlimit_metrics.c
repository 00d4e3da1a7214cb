
/*
 * Copyright (C) llmlimit developers
 */


/*
 * llmlimit_metrics: the Prometheus text exposition (format 0.0.4) of
 * counters kept in a shared-memory zone of their own, "llmlimit_metrics",
 * so that every worker process reports the same numbers.
 *
 * The zone holds one series per (table, category), one per table for the
 * requests it matched no rule for, and one per Redis zone: a fixed array
 * of counters each.  The series are found or created by name when the
 * configuration is read, and bound to the rules, tables and zones: the
 * request path does an atomic increment per table, without a lock, a
 * lookup, an allocation or any formatting.
 *
 * Series are never freed.  Over a reload the zone is kept as long as its
 * size is the same (a power of two from the number of series, with room
 * to spare), and with it the counters: a series keeps counting under the
 * same (table, category) or zone name, a series new to the configuration
 * starts at zero, one no longer configured is no longer shown.  The
 * workers of the old configuration, finishing their requests, count in
 * the same series.  If the size changes, every counter starts again at
 * zero, which Prometheus takes as a counter reset.
 *
 * The gauges of the counter zones (counters in use, bytes) and of the key
 * directory are read from their own zones at each scrape.
 */


#include "ngx_http_llmlimit.h"

#include <time.h>


/* kinds of series */
#define NGX_HTTP_LLMLIMIT_METRICS_CATEGORY      0
#define NGX_HTTP_LLMLIMIT_METRICS_UNMATCHED     1
#define NGX_HTTP_LLMLIMIT_METRICS_ZONE          2

/* a category's counters: by $llmlimit_status - 1, then tokens */
#define NGX_HTTP_LLMLIMIT_METRICS_TOKENS        5
#define NGX_HTTP_LLMLIMIT_METRICS_NCATEGORY     6

/* a Redis zone's counters */
#define NGX_HTTP_LLMLIMIT_METRICS_UP            0
#define NGX_HTTP_LLMLIMIT_METRICS_CONNECTIONS   1
#define NGX_HTTP_LLMLIMIT_METRICS_RECONNECTS    2
#define NGX_HTTP_LLMLIMIT_METRICS_TIMEOUTS      3
#define NGX_HTTP_LLMLIMIT_METRICS_FALLBACKS     4
#define NGX_HTTP_LLMLIMIT_METRICS_ERRORS        5   /* by kind */
#define NGX_HTTP_LLMLIMIT_METRICS_SUM           10  /* latency, us */
#define NGX_HTTP_LLMLIMIT_METRICS_BUCKETS       11  /* each, then +Inf */
#define NGX_HTTP_LLMLIMIT_METRICS_NBUCKETS      11
#define NGX_HTTP_LLMLIMIT_METRICS_NZONE                                      \
    (NGX_HTTP_LLMLIMIT_METRICS_BUCKETS + NGX_HTTP_LLMLIMIT_METRICS_NBUCKETS + 1)

/* kinds of Redis errors */
#define NGX_HTTP_LLMLIMIT_METRICS_E_CONNECT     0
#define NGX_HTTP_LLMLIMIT_METRICS_E_CLOSED      1
#define NGX_HTTP_LLMLIMIT_METRICS_E_PROTOCOL    2
#define NGX_HTTP_LLMLIMIT_METRICS_E_SCRIPT      3
#define NGX_HTTP_LLMLIMIT_METRICS_E_OVERFLOW    4
#define NGX_HTTP_LLMLIMIT_METRICS_NERRORS       5

/* a line of the exposition, at most, but its labels */
#define NGX_HTTP_LLMLIMIT_METRICS_LINE          128


/* a series in the zone; its name follows its counters */
typedef struct ngx_http_llmlimit_metrics_node_s
    ngx_http_llmlimit_metrics_node_t;

struct ngx_http_llmlimit_metrics_node_s {
    ngx_http_llmlimit_metrics_node_t   *next;
    ngx_uint_t                          kind;
    ngx_uint_t                          n;
    size_t                              len;
    ngx_atomic_t                        v[1];
};


typedef struct {
    ngx_http_llmlimit_metrics_node_t   *series;
    ngx_uint_t                          full;      /* logged once */
} ngx_http_llmlimit_metrics_sh_t;


/* a series of a category, or of a table's requests no rule matched */
typedef struct {
    ngx_uint_t                          kind;
    ngx_http_llmlimit_table_t          *table;
    ngx_str_t                          *category;  /* NULL: unmatched */
    ngx_str_t                           name;      /* in the zone */
    ngx_str_t                           labels;    /* table="",category="" */
    ngx_atomic_t                       *v;         /* NULL: not counted */
} ngx_http_llmlimit_metrics_series_t;


/* a counter zone; Redis' counters and this worker's connection */
struct ngx_http_llmlimit_metrics_zone_s {
    ngx_http_llmlimit_zone_t           *zone;
    ngx_str_t                           labels;    /* zone="" */
    ngx_atomic_t                       *v;         /* NULL: not Redis */
    ngx_uint_t                          ready;     /* connected now */
    ngx_uint_t                          connected; /* ever */
    size_t                              gauges[4]; /* of a scrape */
};


typedef struct {
    ngx_array_t                         series;    /* of series_t */
    ngx_array_t                         tables;    /* of table_t * */
    ngx_array_t                         zones;     /* of metrics_zone_t * */
    ngx_uint_t                          used;      /* llmlimit_metrics */
    ngx_shm_zone_t                     *shm_zone;
    ngx_slab_pool_t                    *shpool;
    ngx_http_llmlimit_metrics_sh_t     *sh;
} ngx_http_llmlimit_metrics_conf_t;


static void ngx_http_llmlimit_metrics_latency(ngx_atomic_t *v,
    uint64_t sent);
static ngx_int_t ngx_http_llmlimit_metrics_handler(ngx_http_request_t *r);
static size_t ngx_http_llmlimit_metrics_size(
    ngx_http_llmlimit_metrics_conf_t *mcf);
static u_char *ngx_http_llmlimit_metrics_render(
    ngx_http_llmlimit_metrics_conf_t *mcf, u_char *p, u_char *last);
static u_char *ngx_http_llmlimit_metrics_zones(
    ngx_http_llmlimit_metrics_conf_t *mcf, u_char *p, u_char *last);
static u_char *ngx_http_llmlimit_metrics_redis_zones(
    ngx_http_llmlimit_metrics_conf_t *mcf, u_char *p, u_char *last);
static u_char *ngx_http_llmlimit_metrics_family(u_char *p, u_char *last,
    char *name, char *type, char *help);
static ngx_int_t ngx_http_llmlimit_metrics_escape(ngx_pool_t *pool,
    ngx_str_t *out, char *fmt, ngx_str_t *a, ngx_str_t *b);
static ngx_http_llmlimit_metrics_series_t *ngx_http_llmlimit_metrics_find(
    ngx_http_llmlimit_metrics_conf_t *mcf, ngx_http_llmlimit_table_t *table,
    ngx_str_t *category);
static ngx_atomic_t *ngx_http_llmlimit_metrics_get(
    ngx_http_llmlimit_metrics_conf_t *mcf, ngx_uint_t kind, ngx_str_t *name,
    ngx_uint_t n);
static ngx_int_t ngx_http_llmlimit_metrics_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void *ngx_http_llmlimit_metrics_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_llmlimit_metrics(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_llmlimit_metrics_init(ngx_conf_t *cf);


static ngx_command_t  ngx_http_llmlimit_metrics_commands[] = {

    { ngx_string("llmlimit_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_llmlimit_metrics,
      0,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llmlimit_metrics_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_llmlimit_metrics_init,        /* postconfiguration */

    ngx_http_llmlimit_metrics_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


ngx_module_t  ngx_http_llmlimit_metrics_module = {
    NGX_MODULE_V1,
    &ngx_http_llmlimit_metrics_module_ctx, /* module context */
    ngx_http_llmlimit_metrics_commands,    /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* by $llmlimit_status - 1 */

static char  *ngx_http_llmlimit_metrics_statuses[] = {
    "passed", "rejected", "rejected_dry_run", "bypassed", "error"
};


static char  *ngx_http_llmlimit_metrics_errors[] = {
    "connect", "closed", "protocol", "script", "overflow"
};


/* by NGX_HTTP_LLMLIMIT_FAIL_* */

static char  *ngx_http_llmlimit_metrics_policies[] = {
    "local", "open", "closed"
};


/* the latency buckets' upper bounds, us, and as shown */

static uint64_t  ngx_http_llmlimit_metrics_bounds[] = {
    250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000
};

static char  *ngx_http_llmlimit_metrics_le[] = {
    "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025",
    "0.05", "0.1", "0.25", "1", "+Inf"
};


/* the request path */

/*
 * The request is decided: counted once in each table that applied, under
 * the category its rule gave, or as "bypassed" in a table none of whose
 * rules matched.
 */

void
ngx_http_llmlimit_metrics_request(ngx_http_llmlimit_ctx_t *ctx)
{
    ngx_uint_t  i, s;

    if (ctx->status == NGX_HTTP_LLMLIMIT_UNSET) {
        return;
    }

    for (i = 0; i < ctx->nmetrics; i++) {
        if (ctx->metrics[i] == NULL) {
            continue;
        }

        s = (ctx->unmatched & (1 << i)) ? NGX_HTTP_LLMLIMIT_BYPASSED
                                        : ctx->status;

        (void) ngx_atomic_fetch_add(&ctx->metrics[i][s - 1], 1);
    }
}


/* tokens charged to a request: in each category it was counted under */

void
ngx_http_llmlimit_metrics_tokens(ngx_http_llmlimit_ctx_t *ctx, ngx_uint_t n)
{
    ngx_uint_t  i;

    for (i = 0; i < ctx->nmetrics; i++) {
        if (ctx->metrics[i] && !(ctx->unmatched & (1 << i))) {
            (void) ngx_atomic_fetch_add(
                &ctx->metrics[i][NGX_HTTP_LLMLIMIT_METRICS_TOKENS], n);
        }
    }
}


/* a request decided by the zone's failure policy */

void
ngx_http_llmlimit_metrics_fallback(ngx_http_llmlimit_zone_t *zone)
{
    if (zone->metrics && zone->metrics->v) {
        (void) ngx_atomic_fetch_add(
            &zone->metrics->v[NGX_HTTP_LLMLIMIT_METRICS_FALLBACKS], 1);
    }
}


/*
 * An event of this worker's Redis connection; "sent": when the call that
 * got a reply was sent (ngx_http_llmlimit_metrics_clock()), 0 if none.
 * "up" is what the latest connection event of any worker said.  A lost
 * connection that had completed its handshake is a "closed" error, else
 * a "connect" error.
 */

void
ngx_http_llmlimit_metrics_redis(ngx_http_llmlimit_zone_t *zone,
    ngx_uint_t event, uint64_t sent)
{
    ngx_atomic_t                      *v;
    ngx_http_llmlimit_metrics_zone_t  *mz;

    mz = zone->metrics;

    if (mz == NULL || mz->v == NULL) {
        return;
    }

    v = mz->v;

    switch (event) {

    case NGX_HTTP_LLMLIMIT_METRICS_CONNECTED:
        v[NGX_HTTP_LLMLIMIT_METRICS_UP] = 1;
        (void) ngx_atomic_fetch_add(&v[NGX_HTTP_LLMLIMIT_METRICS_CONNECTIONS],
                                    1);
        if (mz->connected) {
            (void) ngx_atomic_fetch_add(
                &v[NGX_HTTP_LLMLIMIT_METRICS_RECONNECTS], 1);
        }

        mz->connected = 1;
        mz->ready = 1;
        return;

    case NGX_HTTP_LLMLIMIT_METRICS_LOST:
        v[NGX_HTTP_LLMLIMIT_METRICS_UP] = 0;
        (void) ngx_atomic_fetch_add(
            &v[NGX_HTTP_LLMLIMIT_METRICS_ERRORS
               + (mz->ready ? NGX_HTTP_LLMLIMIT_METRICS_E_CLOSED
                            : NGX_HTTP_LLMLIMIT_METRICS_E_CONNECT)], 1);
        mz->ready = 0;
        return;

    case NGX_HTTP_LLMLIMIT_METRICS_TIMEOUT:
        (void) ngx_atomic_fetch_add(&v[NGX_HTTP_LLMLIMIT_METRICS_TIMEOUTS], 1);
        return;

    case NGX_HTTP_LLMLIMIT_METRICS_OVERFLOW:
        (void) ngx_atomic_fetch_add(
            &v[NGX_HTTP_LLMLIMIT_METRICS_ERRORS
               + NGX_HTTP_LLMLIMIT_METRICS_E_OVERFLOW], 1);
        return;

    case NGX_HTTP_LLMLIMIT_METRICS_PROTOCOL:
        (void) ngx_atomic_fetch_add(
            &v[NGX_HTTP_LLMLIMIT_METRICS_ERRORS
               + NGX_HTTP_LLMLIMIT_METRICS_E_PROTOCOL], 1);
        break;

    case NGX_HTTP_LLMLIMIT_METRICS_SCRIPT:
        (void) ngx_atomic_fetch_add(
            &v[NGX_HTTP_LLMLIMIT_METRICS_ERRORS
               + NGX_HTTP_LLMLIMIT_METRICS_E_SCRIPT], 1);
        break;

    default: /* NGX_HTTP_LLMLIMIT_METRICS_REPLY */
        break;
    }

    if (sent) {
        ngx_http_llmlimit_metrics_latency(v, sent);
    }
}


static void
ngx_http_llmlimit_metrics_latency(ngx_atomic_t *v, uint64_t sent)
{
    uint64_t    now, us;
    ngx_uint_t  i;

    now = ngx_http_llmlimit_metrics_clock();
    us = (now > sent) ? now - sent : 0;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_METRICS_NBUCKETS; i++) {
        if (us <= ngx_http_llmlimit_metrics_bounds[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&v[NGX_HTTP_LLMLIMIT_METRICS_BUCKETS + i], 1);
    (void) ngx_atomic_fetch_add(&v[NGX_HTTP_LLMLIMIT_METRICS_SUM],
                                (ngx_atomic_int_t) us);
}


/* microseconds of a monotonic clock */

uint64_t
ngx_http_llmlimit_metrics_clock(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}


/* the scrape */

static ngx_int_t
ngx_http_llmlimit_metrics_handler(ngx_http_request_t *r)
{
    size_t                             size;
    ngx_int_t                          rc;
    ngx_buf_t                         *b;
    ngx_chain_t                        out;
    ngx_http_llmlimit_metrics_conf_t  *mcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_llmlimit_metrics_module);

    size = ngx_http_llmlimit_metrics_size(mcf);

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_http_llmlimit_metrics_render(mcf, b->pos, b->end);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4; charset=utf-8");
    r->headers_out.content_type_len = sizeof("text/plain") - 1;
    r->headers_out.content_type_lowcase = NULL;

    if (b->last == b->pos) {
        /* nothing to show: no zone, no table, no key directory */
        r->header_only = 1;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* what the exposition takes at most */

static size_t
ngx_http_llmlimit_metrics_size(ngx_http_llmlimit_metrics_conf_t *mcf)
{
    size_t                               size;
    ngx_uint_t                           i;
    ngx_http_llmlimit_metrics_zone_t   **zones;
    ngx_http_llmlimit_metrics_series_t  *s;

    /* the HELP and TYPE lines, the key directory */
    size = 8192;

    s = mcf->series.elts;

    for (i = 0; i < mcf->series.nelts; i++) {
        size += NGX_HTTP_LLMLIMIT_METRICS_NCATEGORY
                * (s[i].labels.len + NGX_HTTP_LLMLIMIT_METRICS_LINE);
    }

    zones = mcf->zones.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        size += (4 + NGX_HTTP_LLMLIMIT_METRICS_NZONE
                 + NGX_HTTP_LLMLIMIT_METRICS_NERRORS)
                * (zones[i]->labels.len + NGX_HTTP_LLMLIMIT_METRICS_LINE);
    }

    return size;
}


static u_char *
ngx_http_llmlimit_metrics_render(ngx_http_llmlimit_metrics_conf_t *mcf,
    u_char *p, u_char *last)
{
    time_t                               loaded;
    ngx_uint_t                           i, j, nkeys, failures;
    ngx_atomic_t                        *v;
    ngx_http_llmlimit_metrics_series_t  *s;

    s = mcf->series.elts;

    if (mcf->series.nelts) {
        p = ngx_http_llmlimit_metrics_family(p, last,
                "llmlimit_requests_total", "counter",
                "Requests decided, by rules table, category and "
                "$llmlimit_status; category \"\" with status \"bypassed\": "
                "requests that no rule of the table matched.");

        for (i = 0; i < mcf->series.nelts; i++) {
            v = s[i].v;

            if (v == NULL) {
                continue;
            }

            for (j = 0; j < NGX_HTTP_LLMLIMIT_METRICS_TOKENS; j++) {
                if ((j == NGX_HTTP_LLMLIMIT_BYPASSED - 1)
                    != (s[i].kind == NGX_HTTP_LLMLIMIT_METRICS_UNMATCHED))
                {
                    continue;
                }

                p = ngx_slprintf(p, last,
                                 "llmlimit_requests_total{%V,status=\"%s\"} "
                                 "%uA\n", &s[i].labels,
                                 ngx_http_llmlimit_metrics_statuses[j], v[j]);
            }
        }

        p = ngx_http_llmlimit_metrics_family(p, last,
                "llmlimit_tokens_total", "counter",
                "Tokens charged, by rules table and category.");

        for (i = 0; i < mcf->series.nelts; i++) {
            v = s[i].v;

            if (v == NULL || s[i].kind == NGX_HTTP_LLMLIMIT_METRICS_UNMATCHED) {
                continue;
            }

            p = ngx_slprintf(p, last, "llmlimit_tokens_total{%V} %uA\n",
                             &s[i].labels,
                             v[NGX_HTTP_LLMLIMIT_METRICS_TOKENS]);
        }
    }

    p = ngx_http_llmlimit_metrics_zones(mcf, p, last);
    p = ngx_http_llmlimit_metrics_redis_zones(mcf, p, last);

    if (ngx_http_llmlimit_keys_stats((ngx_cycle_t *) ngx_cycle, &nkeys,
                                     &loaded, &failures)
        == NGX_OK)
    {
        p = ngx_http_llmlimit_metrics_family(p, last,
                "llmlimit_keys_loaded", "gauge",
                "API keys in the key directory in use.");
        p = ngx_slprintf(p, last, "llmlimit_keys_loaded %ui\n", nkeys);

        p = ngx_http_llmlimit_metrics_family(p, last,
                "llmlimit_keys_last_load_timestamp_seconds", "gauge",
                "When the key directory in use was loaded, Unix time; "
                "0: none.");
        p = ngx_slprintf(p, last,
                         "llmlimit_keys_last_load_timestamp_seconds %T\n",
                         loaded);

        p = ngx_http_llmlimit_metrics_family(p, last,
                "llmlimit_keys_load_failures_total", "counter",
                "Loads of the key file that failed (the directory in use "
                "was kept).");
        p = ngx_slprintf(p, last, "llmlimit_keys_load_failures_total %ui\n",
                         failures);
    }

    return p;
}


/* the counter zones: read under each zone's lock */

static u_char *
ngx_http_llmlimit_metrics_zones(ngx_http_llmlimit_metrics_conf_t *mcf,
    u_char *p, u_char *last)
{
    size_t                             *g;
    ngx_uint_t                          i, k, n;
    ngx_slab_pool_t                    *shpool;
    ngx_http_llmlimit_zone_t           *zone;
    ngx_http_llmlimit_metrics_zone_t  **zones;

    static char  *names[] = {
        "llmlimit_zone_counters", "gauge",
        "Counters (identity and limit) held in the zone.",

        "llmlimit_zone_size_bytes", "gauge",
        "Size of the zone.",

        "llmlimit_zone_used_bytes", "gauge",
        "Bytes of the zone taken (pages of counters are kept once "
        "taken); at the size, new counters replace expired or least "
        "recently used ones.",

        "llmlimit_zone_evictions_total", "counter",
        "Counters evicted before they expired, the zone being full."
    };

    zones = mcf->zones.elts;
    n = mcf->zones.nelts;

    if (n == 0) {
        return p;
    }

    /* one look under each zone's lock: counters, size, used, evictions */

    for (i = 0; i < n; i++) {
        zone = zones[i]->zone;
        shpool = zone->shpool;
        g = zones[i]->gauges;

        if (zone->sh == NULL || shpool == NULL) {
            ngx_memzero(g, sizeof(zones[i]->gauges));
            continue;
        }

        ngx_shmtx_lock(&shpool->mutex);

        g[0] = zone->sh->nodes;
        g[1] = zone->shm_zone->shm.size;
        g[2] = g[1] - shpool->pfree * ngx_pagesize;
        g[3] = zone->sh->evictions;

        ngx_shmtx_unlock(&shpool->mutex);
    }

    for (k = 0; k < 4; k++) {
        p = ngx_http_llmlimit_metrics_family(p, last, names[3 * k],
                                             names[3 * k + 1],
                                             names[3 * k + 2]);

        for (i = 0; i < n; i++) {
            p = ngx_slprintf(p, last, "%s{%V} %uz\n", names[3 * k],
                             &zones[i]->labels, zones[i]->gauges[k]);
        }
    }

    return p;
}


static u_char *
ngx_http_llmlimit_metrics_redis_zones(ngx_http_llmlimit_metrics_conf_t *mcf,
    u_char *p, u_char *last)
{
    ngx_uint_t                          i, j, k, n, redis;
    ngx_atomic_t                       *v;
    ngx_atomic_uint_t                   cum, us;
    ngx_http_llmlimit_metrics_zone_t  **zones, *mz;

    static ngx_uint_t  simple[] = {
        NGX_HTTP_LLMLIMIT_METRICS_UP,
        NGX_HTTP_LLMLIMIT_METRICS_CONNECTIONS,
        NGX_HTTP_LLMLIMIT_METRICS_RECONNECTS,
        NGX_HTTP_LLMLIMIT_METRICS_TIMEOUTS
    };

    static char  *names[] = {
        "llmlimit_redis_up", "gauge",
        "1 if the latest connection event of any worker was a connection "
        "to Redis made, 0 if it was one lost or refused.",

        "llmlimit_redis_connections_total", "counter",
        "Connections to Redis made (handshake done), all workers.",

        "llmlimit_redis_reconnects_total", "counter",
        "Connections to Redis made again by a worker that had one "
        "before.",

        "llmlimit_redis_timeouts_total", "counter",
        "Requests that waited redis_timeout for Redis and were decided "
        "by the failure policy."
    };

    zones = mcf->zones.elts;
    n = mcf->zones.nelts;
    redis = 0;

    for (i = 0; i < n; i++) {
        if (zones[i]->v) {
            redis = 1;
        }
    }

    if (!redis) {
        return p;
    }

    for (k = 0; k < 4; k++) {
        p = ngx_http_llmlimit_metrics_family(p, last, names[3 * k],
                                             names[3 * k + 1],
                                             names[3 * k + 2]);

        for (i = 0; i < n; i++) {
            if (zones[i]->v) {
                p = ngx_slprintf(p, last, "%s{%V} %uA\n", names[3 * k],
                                 &zones[i]->labels, zones[i]->v[simple[k]]);
            }
        }
    }

    p = ngx_http_llmlimit_metrics_family(p, last,
            "llmlimit_redis_errors_total", "counter",
            "Redis errors by kind: connect (a connection or its handshake "
            "failed), closed (a connection lost: EOF, reset, no reply), "
            "protocol (a reply of the wrong type or shape), script (an "
            "error reply), overflow (a request not sent, too many replies "
            "owed).");

    for (i = 0; i < n; i++) {
        if (zones[i]->v == NULL) {
            continue;
        }

        for (j = 0; j < NGX_HTTP_LLMLIMIT_METRICS_NERRORS; j++) {
            p = ngx_slprintf(p, last,
                             "llmlimit_redis_errors_total{%V,kind=\"%s\"} "
                             "%uA\n", &zones[i]->labels,
                             ngx_http_llmlimit_metrics_errors[j],
                             zones[i]->v[NGX_HTTP_LLMLIMIT_METRICS_ERRORS + j]);
        }
    }

    p = ngx_http_llmlimit_metrics_family(p, last,
            "llmlimit_redis_fallbacks_total", "counter",
            "Requests decided by the zone's failure policy (redis_failure=) "
            "as Redis could not answer.");

    for (i = 0; i < n; i++) {
        if (zones[i]->v) {
            p = ngx_slprintf(p, last,
                             "llmlimit_redis_fallbacks_total{%V,policy=\"%s\"} "
                             "%uA\n", &zones[i]->labels,
                             ngx_http_llmlimit_metrics_policies[
                                 zones[i]->zone->failure],
                             zones[i]->v[NGX_HTTP_LLMLIMIT_METRICS_FALLBACKS]);
        }
    }

    p = ngx_http_llmlimit_metrics_family(p, last,
            "llmlimit_redis_latency_seconds", "histogram",
            "Round trip of a Redis call (the requests of one event loop "
            "turn), from sending it to its reply.");

    for (i = 0; i < n; i++) {
        mz = zones[i];
        v = mz->v;

        if (v == NULL) {
            continue;
        }

        cum = 0;

        for (j = 0; j <= NGX_HTTP_LLMLIMIT_METRICS_NBUCKETS; j++) {
            cum += v[NGX_HTTP_LLMLIMIT_METRICS_BUCKETS + j];

            p = ngx_slprintf(p, last,
                             "llmlimit_redis_latency_seconds_bucket"
                             "{%V,le=\"%s\"} %uA\n", &mz->labels,
                             ngx_http_llmlimit_metrics_le[j], cum);
        }

        us = v[NGX_HTTP_LLMLIMIT_METRICS_SUM];

        p = ngx_slprintf(p, last,
                         "llmlimit_redis_latency_seconds_sum{%V} %uA.%06uA\n"
                         "llmlimit_redis_latency_seconds_count{%V} %uA\n",
                         &mz->labels, us / 1000000, us % 1000000,
                         &mz->labels, cum);
    }

    return p;
}


static u_char *
ngx_http_llmlimit_metrics_family(u_char *p, u_char *last, char *name,
    char *type, char *help)
{
    return ngx_slprintf(p, last, "# HELP %s %s\n# TYPE %s %s\n",
                        name, help, name, type);
}


/*
 * Label values as the exposition format wants them: backslash, double
 * quote and line feed escaped.  "fmt" has two "%V" for a and b (b may be
 * NULL with one "%V").
 */

static ngx_int_t
ngx_http_llmlimit_metrics_escape(ngx_pool_t *pool, ngx_str_t *out, char *fmt,
    ngx_str_t *a, ngx_str_t *b)
{
    u_char     *p, *q, *d;
    ngx_str_t   e[2], *in[2];
    ngx_uint_t  i, n;

    in[0] = a;
    in[1] = b;

    for (i = 0; i < 2; i++) {
        if (in[i] == NULL) {
            ngx_str_set(&e[i], "");
            continue;
        }

        n = 0;

        for (p = in[i]->data; p < in[i]->data + in[i]->len; p++) {
            if (*p == '\\' || *p == '"' || *p == '\n') {
                n++;
            }
        }

        d = ngx_pnalloc(pool, in[i]->len + n);
        if (d == NULL) {
            return NGX_ERROR;
        }

        e[i].data = d;

        for (p = in[i]->data; p < in[i]->data + in[i]->len; p++) {
            if (*p == '\\' || *p == '"' || *p == '\n') {
                *d++ = '\\';
                *d++ = (*p == '\n') ? 'n' : *p;

            } else {
                *d++ = *p;
            }
        }

        e[i].len = d - e[i].data;
    }

    out->len = ngx_strlen(fmt) + e[0].len + e[1].len;

    q = ngx_pnalloc(pool, out->len);
    if (q == NULL) {
        return NGX_ERROR;
    }

    out->data = q;
    out->len = ngx_snprintf(q, out->len, fmt, &e[0], &e[1]) - q;

    return NGX_OK;
}


/* configuration */

ngx_int_t
ngx_http_llmlimit_metrics_add_table(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table)
{
    u_char                              *p;
    ngx_uint_t                           i;
    ngx_str_t                           *category;
    ngx_http_llmlimit_rule_t            *rule;
    ngx_http_llmlimit_table_t          **t;
    ngx_http_llmlimit_metrics_conf_t    *mcf;
    ngx_http_llmlimit_metrics_series_t  *s;

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_llmlimit_metrics_module);

    t = ngx_array_push(&mcf->tables);
    if (t == NULL) {
        return NGX_ERROR;
    }

    *t = table;

    rule = table->rules.elts;

    /* each category once, then the requests no rule matched */

    for (i = 0; i <= table->rules.nelts; i++) {
        category = (i < table->rules.nelts) ? &rule[i].category : NULL;

        if (category
            && ngx_http_llmlimit_metrics_find(mcf, table, category))
        {
            continue;
        }

        s = ngx_array_push(&mcf->series);
        if (s == NULL) {
            return NGX_ERROR;
        }

        s->kind = category ? NGX_HTTP_LLMLIMIT_METRICS_CATEGORY
                           : NGX_HTTP_LLMLIMIT_METRICS_UNMATCHED;
        s->table = table;
        s->category = category;
        s->v = NULL;

        /* in the zone: the table's name, a NUL, the category's */

        s->name.len = table->name.len + 1 + (category ? category->len : 0);
        s->name.data = ngx_pnalloc(cf->pool, s->name.len);
        if (s->name.data == NULL) {
            return NGX_ERROR;
        }

        p = ngx_cpymem(s->name.data, table->name.data, table->name.len);
        *p++ = '\0';

        if (category) {
            ngx_memcpy(p, category->data, category->len);
        }

        if (ngx_http_llmlimit_metrics_escape(cf->pool, &s->labels,
                                             "table=\"%V\",category=\"%V\"",
                                             &table->name, category)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_llmlimit_metrics_add_zone(ngx_conf_t *cf,
    ngx_http_llmlimit_zone_t *zone)
{
    ngx_http_llmlimit_metrics_conf_t   *mcf;
    ngx_http_llmlimit_metrics_zone_t  **mzp, *mz;

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_llmlimit_metrics_module);

    mz = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_metrics_zone_t));
    if (mz == NULL) {
        return NGX_ERROR;
    }

    mz->zone = zone;

    if (ngx_http_llmlimit_metrics_escape(cf->pool, &mz->labels,
                                         "zone=\"%V\"%V", &zone->name, NULL)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    mzp = ngx_array_push(&mcf->zones);
    if (mzp == NULL) {
        return NGX_ERROR;
    }

    *mzp = mz;
    zone->metrics = mz;

    return NGX_OK;
}


static ngx_http_llmlimit_metrics_series_t *
ngx_http_llmlimit_metrics_find(ngx_http_llmlimit_metrics_conf_t *mcf,
    ngx_http_llmlimit_table_t *table, ngx_str_t *category)
{
    ngx_uint_t                           i;
    ngx_http_llmlimit_metrics_series_t  *s;

    s = mcf->series.elts;

    for (i = 0; i < mcf->series.nelts; i++) {
        if (s[i].table != table) {
            continue;
        }

        if (category == NULL || s[i].category == NULL) {
            if (category == s[i].category) {
                return &s[i];
            }

            continue;
        }

        if (s[i].category->len == category->len
            && ngx_strncmp(s[i].category->data, category->data,
                           category->len)
               == 0)
        {
            return &s[i];
        }
    }

    return NULL;
}


/*
 * The counters of a series in the zone, found by kind and name, or added;
 * NULL if the zone is full.
 */

static ngx_atomic_t *
ngx_http_llmlimit_metrics_get(ngx_http_llmlimit_metrics_conf_t *mcf,
    ngx_uint_t kind, ngx_str_t *name, ngx_uint_t n)
{
    size_t                             size;
    ngx_http_llmlimit_metrics_node_t  *node;

    for (node = mcf->sh->series; node; node = node->next) {
        if (node->kind == kind && node->n == n && node->len == name->len
            && ngx_memcmp((u_char *) &node->v[n], name->data, name->len) == 0)
        {
            return node->v;
        }
    }

    size = offsetof(ngx_http_llmlimit_metrics_node_t, v)
           + n * sizeof(ngx_atomic_t) + name->len;

    node = ngx_slab_calloc(mcf->shpool, size);

    if (node == NULL) {
        if (!mcf->sh->full) {
            mcf->sh->full = 1;
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "llmlimit_metrics zone is full: the series added "
                          "by reloads are not counted until nginx restarts");
        }

        return NULL;
    }

    node->kind = kind;
    node->n = n;
    node->len = name->len;
    ngx_memcpy((u_char *) &node->v[n], name->data, name->len);

    node->next = mcf->sh->series;
    mcf->sh->series = node;

    return node->v;
}


/*
 * In the master process, once the configuration is read: a zone kept over
 * a reload (same size) is reused with its series.  The series are bound
 * to the rules, the tables and the zones of this configuration.
 */

static ngx_int_t
ngx_http_llmlimit_metrics_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_uint_t                           i, j;
    ngx_http_llmlimit_rule_t            *rule;
    ngx_http_llmlimit_table_t          **tables;
    ngx_http_llmlimit_metrics_sh_t      *sh;
    ngx_http_llmlimit_metrics_conf_t    *mcf;
    ngx_http_llmlimit_metrics_zone_t   **zones;
    ngx_http_llmlimit_metrics_series_t  *s;

    mcf = shm_zone->data;
    mcf->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (data || shm_zone->shm.exists) {
        mcf->sh = mcf->shpool->data;

    } else {
        sh = ngx_slab_calloc(mcf->shpool,
                             sizeof(ngx_http_llmlimit_metrics_sh_t));
        if (sh == NULL) {
            return NGX_ERROR;
        }

        mcf->sh = sh;
        mcf->shpool->data = sh;
        mcf->shpool->log_nomem = 0;
    }

    s = mcf->series.elts;

    for (i = 0; i < mcf->series.nelts; i++) {
        s[i].v = ngx_http_llmlimit_metrics_get(mcf, s[i].kind, &s[i].name,
                                          NGX_HTTP_LLMLIMIT_METRICS_NCATEGORY);
    }

    tables = mcf->tables.elts;

    for (i = 0; i < mcf->tables.nelts; i++) {
        rule = tables[i]->rules.elts;

        for (j = 0; j < tables[i]->rules.nelts; j++) {
            s = ngx_http_llmlimit_metrics_find(mcf, tables[i],
                                               &rule[j].category);
            rule[j].metrics = s->v;
        }

        s = ngx_http_llmlimit_metrics_find(mcf, tables[i], NULL);
        tables[i]->metrics = s->v;
    }

    zones = mcf->zones.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        if (zones[i]->zone->redis) {
            zones[i]->v = ngx_http_llmlimit_metrics_get(mcf,
                                          NGX_HTTP_LLMLIMIT_METRICS_ZONE,
                                          &zones[i]->zone->name,
                                          NGX_HTTP_LLMLIMIT_METRICS_NZONE);
        }
    }

    return NGX_OK;
}


static void *
ngx_http_llmlimit_metrics_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_metrics_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_metrics_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&mcf->series, cf->pool, 16,
                       sizeof(ngx_http_llmlimit_metrics_series_t))
        != NGX_OK
        || ngx_array_init(&mcf->tables, cf->pool, 4,
                          sizeof(ngx_http_llmlimit_table_t *))
           != NGX_OK
        || ngx_array_init(&mcf->zones, cf->pool, 4,
                          sizeof(ngx_http_llmlimit_metrics_zone_t *))
           != NGX_OK)
    {
        return NULL;
    }

    return mcf;
}


static char *
ngx_http_llmlimit_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_llmlimit_metrics_conf_t  *mcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llmlimit_metrics_handler;

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_llmlimit_metrics_module);
    mcf->used = 1;

    return NGX_CONF_OK;
}


/*
 * After ngx_http_llmlimit_module's postconfiguration has added the tables
 * and zones: the zone's size, a power of two at least four times what the
 * series take (the slab's rounding, and series that reloads add), so
 * that it stays the same, and the zone is kept, over most reloads.
 */

static ngx_int_t
ngx_http_llmlimit_metrics_init(ngx_conf_t *cf)
{
    size_t                               need, size;
    ngx_str_t                            name;
    ngx_uint_t                           i;
    ngx_http_llmlimit_metrics_conf_t    *mcf;
    ngx_http_llmlimit_metrics_zone_t   **zones;
    ngx_http_llmlimit_metrics_series_t  *s;

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_llmlimit_metrics_module);

    if (!mcf->used && mcf->series.nelts == 0 && mcf->zones.nelts == 0) {
        return NGX_OK;
    }

    need = 0;
    s = mcf->series.elts;

    for (i = 0; i < mcf->series.nelts; i++) {
        need += sizeof(ngx_http_llmlimit_metrics_node_t)
                + NGX_HTTP_LLMLIMIT_METRICS_NCATEGORY * sizeof(ngx_atomic_t)
                + s[i].name.len;
    }

    zones = mcf->zones.elts;

    for (i = 0; i < mcf->zones.nelts; i++) {
        need += sizeof(ngx_http_llmlimit_metrics_node_t)
                + NGX_HTTP_LLMLIMIT_METRICS_NZONE * sizeof(ngx_atomic_t)
                + zones[i]->zone->name.len;
    }

    for (size = 32 * ngx_pagesize; size < 4 * need + 16 * ngx_pagesize;
         size *= 2)
    {
        /* void */
    }

    ngx_str_set(&name, "llmlimit_metrics");

    mcf->shm_zone = ngx_shared_memory_add(cf, &name, size,
                                          &ngx_http_llmlimit_metrics_module);
    if (mcf->shm_zone == NULL) {
        return NGX_ERROR;
    }

    mcf->shm_zone->init = ngx_http_llmlimit_metrics_init_zone;
    mcf->shm_zone->data = mcf;

    return NGX_OK;
}
