
/*
 * Copyright (C) llmlimit developers
 */


#include "ngx_http_llmlimit.h"
#include "ngx_http_llmlimit_usage.h"


typedef struct {
    ngx_array_t                     zones;     /* ngx_http_llmlimit_zone_t * */
    ngx_array_t                     tables;    /* ngx_http_llmlimit_table_t * */
    ngx_uint_t                      phase_access;  /* some "access" */
} ngx_http_llmlimit_main_conf_t;


/* where a zone or a table was first named, for "unknown ..." errors */
typedef struct {
    ngx_str_t                       file;
    ngx_uint_t                      line;
} ngx_http_llmlimit_ref_t;


typedef struct {
    ngx_http_llmlimit_zone_t        zone;
    ngx_http_llmlimit_ref_t         ref;
    ngx_uint_t                      defined;
} ngx_http_llmlimit_zone_decl_t;


typedef struct {
    ngx_http_llmlimit_table_t       table;
    ngx_http_llmlimit_ref_t         ref;
    ngx_uint_t                      defined;
} ngx_http_llmlimit_table_decl_t;


static ngx_int_t ngx_http_llmlimit_preaccess_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llmlimit_precontent_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llmlimit_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llmlimit_classify(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
static ngx_int_t ngx_http_llmlimit_run(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
static void ngx_http_llmlimit_take_back(ngx_http_request_t *r,
    ngx_http_llmlimit_ctx_t *ctx);
static ngx_int_t ngx_http_llmlimit_decide(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
static void ngx_http_llmlimit_log_rejection(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_counter_t *report);
static void ngx_http_llmlimit_log_dropped(ngx_event_t *ev);
static void ngx_http_llmlimit_done(ngx_http_request_t *r,
    ngx_http_llmlimit_batch_t *b);
static ngx_http_llmlimit_ctx_t *ngx_http_llmlimit_get_ctx(
    ngx_http_request_t *r);
static void ngx_http_llmlimit_cleanup(void *data);
static ngx_int_t ngx_http_llmlimit_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_llmlimit_log_handler(ngx_http_request_t *r);
static ngx_uint_t ngx_http_llmlimit_table_tokens(
    ngx_http_llmlimit_table_t *table);
static ngx_uint_t ngx_http_llmlimit_limits_tokens(
    ngx_http_llmlimit_limits_t *limits);

static ngx_int_t ngx_http_llmlimit_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

static void *ngx_http_llmlimit_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_llmlimit_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llmlimit_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_http_llmlimit_zone_decl_t *ngx_http_llmlimit_get_zone(
    ngx_conf_t *cf, ngx_str_t *name);
static ngx_http_llmlimit_table_decl_t *ngx_http_llmlimit_get_table(
    ngx_conf_t *cf, ngx_str_t *name);
static char *ngx_http_llmlimit_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_rules(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_rules_line(ngx_conf_t *cf, ngx_command_t *dummy,
    void *conf);
static char *ngx_http_llmlimit_prepare_rule(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule);
static char *ngx_http_llmlimit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_headers(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_log_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_phase(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_tokens(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_llmlimit_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_llmlimit_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_llmlimit_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_llmlimit_init_process(ngx_cycle_t *cycle);
static void ngx_http_llmlimit_exit_process(ngx_cycle_t *cycle);


/*
 * The rejection lines of this worker process: how many were written in
 * the current second, and those left out, for the summary line.
 */
typedef struct {
    time_t                          sec;
    ngx_uint_t                      lines;
    ngx_uint_t                      dropped;
    ngx_uint_t                      limit;
    ngx_uint_t                      level;
    ngx_log_t                      *log;
    ngx_event_t                     event;
    ngx_connection_t                dumb;          /* the event's data */
} ngx_http_llmlimit_log_state_t;


static ngx_http_llmlimit_log_state_t  ngx_http_llmlimit_log_state;


static ngx_conf_enum_t  ngx_http_llmlimit_log_levels[] = {
    { ngx_string("info"), NGX_LOG_INFO },
    { ngx_string("notice"), NGX_LOG_NOTICE },
    { ngx_string("warn"), NGX_LOG_WARN },
    { ngx_string("error"), NGX_LOG_ERR },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_llmlimit_phases[] = {
    { ngx_string("preaccess"), NGX_HTTP_LLMLIMIT_PHASE_PREACCESS },
    { ngx_string("access"), NGX_HTTP_LLMLIMIT_PHASE_ACCESS },
    { ngx_null_string, 0 }
};


static ngx_conf_num_bounds_t  ngx_http_llmlimit_status_bounds = {
    ngx_conf_check_num_bounds, 400, 599
};


static ngx_command_t  ngx_http_llmlimit_commands[] = {

    { ngx_string("llmlimit_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_llmlimit_zone,
      0,
      0,
      NULL },

    { ngx_string("llmlimit_rules"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_BLOCK|NGX_CONF_2MORE,
      ngx_http_llmlimit_rules,
      0,
      0,
      NULL },

    { ngx_string("llmlimit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmlimit,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("llmlimit_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, status_code),
      &ngx_http_llmlimit_status_bounds },

    { ngx_string("llmlimit_dry_run"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, dry_run),
      NULL },

    { ngx_string("llmlimit_log_level"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, log_level),
      &ngx_http_llmlimit_log_levels },

    { ngx_string("llmlimit_log_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmlimit_log_limit,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, log_limit),
      NULL },

    { ngx_string("llmlimit_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_llmlimit_headers,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("llmlimit_phase"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmlimit_phase,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, phase),
      &ngx_http_llmlimit_phases },

    { ngx_string("llmlimit_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmlimit_tokens,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, tokens),
      NULL },

    { ngx_string("llmlimit_tokens_estimate"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llmlimit_loc_conf_t, tokens_estimate),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llmlimit_module_ctx = {
    ngx_http_llmlimit_add_variables,       /* preconfiguration */
    ngx_http_llmlimit_init,                /* postconfiguration */

    ngx_http_llmlimit_create_main_conf,    /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_llmlimit_create_loc_conf,     /* create location configuration */
    ngx_http_llmlimit_merge_loc_conf       /* merge location configuration */
};


ngx_module_t  ngx_http_llmlimit_module = {
    NGX_MODULE_V1,
    &ngx_http_llmlimit_module_ctx,         /* module context */
    ngx_http_llmlimit_commands,            /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_llmlimit_init_module,         /* init module */
    ngx_http_llmlimit_init_process,        /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_llmlimit_exit_process,        /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * The stores, in the order llmlimit_zone offers them its parameters and
 * its zone (see ngx_http_llmlimit_store_t): a new kind of store is one
 * line here.  The shared-memory store takes any zone, it comes last.
 */

static ngx_http_llmlimit_store_t  *ngx_http_llmlimit_stores[] = {
    &ngx_http_llmlimit_sync_store,
    &ngx_http_llmlimit_redis_store,
    &ngx_http_llmlimit_shm_store,
    NULL
};


/* by NGX_HTTP_LLMLIMIT_SLIDING, FIXED, GCRA */

static char  *ngx_http_llmlimit_algorithms[] = {
    "sliding", "fixed", "gcra"
};


#define NGX_HTTP_LLMLIMIT_VAR_STATUS      0
#define NGX_HTTP_LLMLIMIT_VAR_CATEGORY    1
#define NGX_HTTP_LLMLIMIT_VAR_LIMIT       2
#define NGX_HTTP_LLMLIMIT_VAR_REMAINING   3
#define NGX_HTTP_LLMLIMIT_VAR_RESET       4
#define NGX_HTTP_LLMLIMIT_VAR_PLAN        5
#define NGX_HTTP_LLMLIMIT_VAR_TOKENS      6


static ngx_http_variable_t  ngx_http_llmlimit_vars[] = {

    { ngx_string("llmlimit_status"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_STATUS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_category"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_CATEGORY, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_limit"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_LIMIT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_remaining"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_REMAINING, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_reset"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_RESET, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_plan"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_PLAN, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_tokens"), NULL, ngx_http_llmlimit_variable,
      NGX_HTTP_LLMLIMIT_VAR_TOKENS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_str_t  ngx_http_llmlimit_status_names[] = {
    ngx_null_string,
    ngx_string("PASSED"),
    ngx_string("REJECTED"),
    ngx_string("REJECTED_DRY_RUN"),
    ngx_string("BYPASSED"),
    ngx_string("ERROR")
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


/*
 * llmlimit_phase: the same handler in one of two phases, each acting
 * only where the location asks for it.
 *
 * "preaccess" is limit_req's place: before access control, so that a
 * flood is refused before it costs an auth_request subrequest.
 *
 * "access" runs in the precontent phase, the first after access
 * control: auth_request, auth_basic, allow/deny have all run, under
 * "satisfy any" as under "all" (ngx_http_core_post_access_phase has
 * refused the request if they did not let it through, and a refused
 * request never gets here, so it is never counted), and what they set
 * (auth_request_set) is there for KEY and plan=.  A handler of the
 * access phase itself would not do: the access phase is skipped as soon
 * as one handler allows the request under "satisfy any", and handlers of
 * a module loaded last run first in it.  In the precontent phase this
 * handler, registered after try_files and mirror, runs before them, so a
 * request is counted before try_files redirects it, and a rejected one
 * is not mirrored.  Subrequests are declined in both phases.
 */

static ngx_int_t
ngx_http_llmlimit_preaccess_handler(ngx_http_request_t *r)
{
    ngx_http_llmlimit_loc_conf_t  *llcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_module);

    if (llcf->phase != NGX_HTTP_LLMLIMIT_PHASE_PREACCESS) {
        return NGX_DECLINED;
    }

    return ngx_http_llmlimit_handler(r);
}


static ngx_int_t
ngx_http_llmlimit_precontent_handler(ngx_http_request_t *r)
{
    ngx_http_llmlimit_loc_conf_t  *llcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_module);

    if (llcf->phase != NGX_HTTP_LLMLIMIT_PHASE_ACCESS) {
        return NGX_DECLINED;
    }

    if (r->error_page && ngx_http_llmlimit_get_ctx(r) == NULL) {
        /*
         * an error page of a request that never got here: refused by
         * access control, which must not cost it its budget
         */
        return NGX_DECLINED;
    }

    return ngx_http_llmlimit_handler(r);
}


static ngx_int_t
ngx_http_llmlimit_handler(ngx_http_request_t *r)
{
    ngx_int_t                      rc;
    ngx_pool_cleanup_t            *cln;
    ngx_http_llmlimit_ctx_t       *ctx;
    ngx_http_llmlimit_loc_conf_t  *llcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_llmlimit_get_ctx(r);

    if (ctx != NULL) {

        if (ctx->decided) {
            /* an internal redirect: the request was counted once */
            return NGX_DECLINED;
        }

        if (ctx->waiting) {
            return NGX_AGAIN;
        }
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_module);

    if (ctx == NULL) {

        if (llcf->tables == NULL) {
            return NGX_DECLINED;
        }

        cln = ngx_pool_cleanup_add(r->pool, 0);
        if (cln == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_llmlimit_ctx_t));
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->request = r;

        cln->handler = ngx_http_llmlimit_cleanup;
        cln->data = ctx;

        ngx_http_set_ctx(r, ctx, ngx_http_llmlimit_module);

        rc = ngx_http_llmlimit_classify(r, llcf, ctx);

        if (rc != NGX_OK) {
            ctx->status = NGX_HTTP_LLMLIMIT_ERROR;
            rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
            goto failed;
        }
    }

    rc = ngx_http_llmlimit_run(r, llcf, ctx);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    if (rc == NGX_OK) {
        ctx->decided = 1;
        return ngx_http_llmlimit_decide(r, llcf, ctx);
    }

failed:

    ctx->decided = 1;
    ngx_http_llmlimit_metrics_request(ctx);

    return rc;
}


/*
 * Walks every table that applies here, and turns the first matching rule
 * of each into counters, grouped by zone into batches.
 */

static ngx_int_t
ngx_http_llmlimit_classify(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    u_char                       *p;
    uint64_t                      hash[2];
    ngx_str_t                     identity, plan;
    ngx_int_t                     rc;
    ngx_uint_t                    i, j, n, m, matched, estimate;
    ngx_http_llmlimit_rule_t     *rule, *rules[NGX_HTTP_LLMLIMIT_MAX_TABLES];
    ngx_http_llmlimit_zone_t     *zone;
    ngx_http_llmlimit_batch_t    *b;
    ngx_http_llmlimit_table_t   **tables, *table;
    ngx_http_llmlimit_table_t    *tbls[NGX_HTTP_LLMLIMIT_MAX_TABLES];
    ngx_http_llmlimit_limits_t   *limits, *lims[NGX_HTTP_LLMLIMIT_MAX_TABLES];
    ngx_http_llmlimit_counter_t  *c, *counters;
    ngx_str_t                     ids[NGX_HTTP_LLMLIMIT_MAX_TABLES];

    tables = llcf->tables->elts;
    estimate = NGX_CONF_UNSET_UINT;
    n = 0;
    m = 0;
    matched = 0;

    for (i = 0; i < llcf->tables->nelts; i++) {
        table = tables[i];

        rc = ngx_http_llmlimit_rules_match(r, table, &rule, &identity);

        if (rc == NGX_DECLINED) {
            ctx->unmatched |= 1 << ctx->nmetrics;
            ctx->metrics[ctx->nmetrics++] = table->metrics;
            continue;
        }

        if (rc == NGX_OK) {
            ctx->metrics[ctx->nmetrics++] = rule->metrics;
        }

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }

        ngx_str_null(&plan);

        if (table->plan) {
            if (ngx_http_complex_value(r, table->plan, &plan) != NGX_OK) {
                return NGX_ERROR;
            }

            if (ctx->plan.len == 0) {
                ctx->plan = plan;
            }
        }

        if (!matched) {
            ctx->category = &rule->category;
            matched = 1;
        }

        limits = ngx_http_llmlimit_rule_limits(rule, &plan);

        if (limits->nlimits == 0) {
            /* "unlimited": passes uncounted */
            continue;
        }

        rules[m] = rule;
        tbls[m] = table;
        lims[m] = limits;
        ids[m] = identity;
        m++;

        n += limits->nlimits;
    }

    if (!matched) {
        ctx->status = NGX_HTTP_LLMLIMIT_BYPASSED;
        return NGX_OK;
    }

    ctx->status = NGX_HTTP_LLMLIMIT_PASSED;

    if (n == 0) {
        return NGX_OK;
    }

    /* counters, their copy regrouped by zone, and the batches */

    p = ngx_palloc(r->pool, 2 * n * sizeof(ngx_http_llmlimit_counter_t)
                            + n * sizeof(ngx_http_llmlimit_batch_t));
    if (p == NULL) {
        return NGX_ERROR;
    }

    counters = (ngx_http_llmlimit_counter_t *) p;
    ctx->batches = (ngx_http_llmlimit_batch_t *) (counters + 2 * n);

    c = counters;

    for (i = 0; i < m; i++) {
        ngx_http_llmlimit_hash(rules[i]->budget, ids[i].data, ids[i].len,
                               hash);

        for (j = 0; j < lims[i]->nlimits; j++, c++) {
            ngx_memcpy(c->hash, hash, sizeof(hash));

            c->period = lims[i]->limits[j].period;
            c->count = lims[i]->limits[j].count;
            c->algorithm = tbls[i]->algorithm;
            c->table = tbls[i];
            c->rule = rules[i];
            c->limit = &lims[i]->limits[j];
            c->remaining = 0;
            c->reset = 0;
            c->retry = 0;
            c->rejected = 0;
            c->tokens = lims[i]->limits[j].tokens ? 1 : 0;
            c->cost = 1;

            if (c->tokens) {
                /* a token budget counts the estimate on admission */

                if (estimate == NGX_CONF_UNSET_UINT) {
                    estimate = ngx_http_llmlimit_tokens_estimate(r, llcf);
                    ctx->estimate = estimate;
                }

                c->cost = ngx_min(estimate, c->count);
                ctx->has_tokens = 1;
            }
        }
    }

    ctx->counters = counters;
    ctx->ncounters = n;

    /* one batch per zone, in the order the zones appear */

    for (i = 0; i < n; i++) {
        zone = counters[i].table->zone;

        for (j = 0; j < ctx->nbatches; j++) {
            if (ctx->batches[j].zone == zone) {
                break;
            }
        }

        if (j < ctx->nbatches) {
            continue;
        }

        b = &ctx->batches[ctx->nbatches++];
        ngx_memzero(b, sizeof(ngx_http_llmlimit_batch_t));
        b->zone = zone;
        b->rc = NGX_DECLINED;
        b->local = 0;
        b->done = ngx_http_llmlimit_done;
    }

    c = counters;

    if (ctx->nbatches > 1) {
        /* regroup the counters so that each batch holds a run of them */
        c = counters + n;
        ctx->counters = c;
    }

    for (j = 0; j < ctx->nbatches; j++) {
        b = &ctx->batches[j];
        b->counters = c;

        for (i = 0; i < n; i++) {
            if (counters[i].table->zone == b->zone) {
                if (c != &counters[i]) {
                    *c = counters[i];
                }

                c++;
                b->n++;
            }
        }
    }

    return NGX_OK;
}


/*
 * Checks the batches one by one; NGX_AGAIN while a store is answering.
 * A request is counted in every zone or in none: when a zone rejects it,
 * or a "closed" zone answers 503, what the zones before counted is taken
 * back, each in the store that counted it.
 */

static ngx_int_t
ngx_http_llmlimit_run(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    ngx_int_t                   rc;
    ngx_uint_t                  i;
    ngx_http_llmlimit_zone_t   *zone;
    ngx_http_llmlimit_batch_t  *b;

    while (ctx->batch < ctx->nbatches) {
        b = &ctx->batches[ctx->batch];
        zone = b->zone;

        if (b->rc == NGX_AGAIN) {
            /* a store has answered: see ngx_http_llmlimit_done() */
            return NGX_AGAIN;
        }

        if (b->rc == NGX_DECLINED) {
            b->rc = NGX_AGAIN;
            rc = zone->store->check(r, b);

            if (rc == NGX_AGAIN) {
                ctx->waiting = 1;
                return NGX_AGAIN;
            }

            b->rc = rc;
        }

        if (b->rc == NGX_ERROR) {

            ngx_http_llmlimit_metrics_fallback(zone);

            switch (zone->failure) {

            case NGX_HTTP_LLMLIMIT_FAIL_OPEN:
                /* passes uncounted; the batch reports nothing */
                ctx->status = NGX_HTTP_LLMLIMIT_ERROR;
                break;

            case NGX_HTTP_LLMLIMIT_FAIL_CLOSED:
                ctx->status = NGX_HTTP_LLMLIMIT_ERROR;
                ctx->nbatches = ctx->batch + 1;
                ngx_http_llmlimit_take_back(r, ctx);
                return NGX_HTTP_SERVICE_UNAVAILABLE;

            default: /* NGX_HTTP_LLMLIMIT_FAIL_LOCAL */
                b->rc = ngx_http_llmlimit_shm_store.check(r, b);
                break;
            }
        }

        /* the time of the decision, for usage accounting's buckets */

        if (b->checked == 0) {
            b->checked = ngx_http_llmlimit_now();
        }

        ctx->checked = b->checked;

        if (b->rc == NGX_BUSY) {

            /* the batches after it are not counted */

            ctx->nbatches = ctx->batch + 1;
            ngx_http_llmlimit_take_back(r, ctx);
            return NGX_OK;
        }

        ctx->batch++;
    }

    /* let through: the late replies of timed out stores keep their counts */

    for (i = 0; i < ctx->nbatches; i++) {
        ctx->batches[i].kept = 1;
    }

    return NGX_OK;
}


/*
 * The request is not let through: every batch checked takes back what it
 * counted, the one that rejected included (a Redis count that timed out
 * may still arrive for it).
 */

static void
ngx_http_llmlimit_take_back(ngx_http_request_t *r,
    ngx_http_llmlimit_ctx_t *ctx)
{
    ngx_uint_t                  i;
    ngx_http_llmlimit_batch_t  *b;

    for (i = 0; i < ctx->nbatches; i++) {
        b = &ctx->batches[i];

        if (b->rc != NGX_DECLINED) {
            b->zone->store->refund(r, b);
        }
    }
}


static void
ngx_http_llmlimit_done(ngx_http_request_t *r, ngx_http_llmlimit_batch_t *b)
{
    ngx_connection_t         *c;
    ngx_http_llmlimit_ctx_t  *ctx;

    ctx = ngx_http_llmlimit_get_ctx(r);
    if (ctx == NULL) {
        return;
    }

    if (b->rc == NGX_AGAIN) {
        b->rc = NGX_ERROR;
    }

    ctx->waiting = 0;

    c = r->connection;

    ngx_http_core_run_phases(r);
    ngx_http_run_posted_requests(c);
}


static ngx_int_t
ngx_http_llmlimit_decide(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    ngx_int_t                     rc;
    ngx_uint_t                    i, j, rejected;
    ngx_http_llmlimit_batch_t    *b;
    ngx_http_llmlimit_counter_t  *c, *report;

    report = NULL;
    rejected = 0;

    for (i = 0; i < ctx->nbatches; i++) {
        b = &ctx->batches[i];

        if (b->rc == NGX_ERROR) {
            /* redis_failure=open: no results */
            continue;
        }

        for (j = 0; j < b->n; j++) {
            c = &b->counters[j];

            if (b->rc == NGX_BUSY) {
                if (!c->rejected) {
                    continue;
                }

                rejected = 1;

                /* all must pass: the longest wait is the one to report */

                if (report == NULL || !report->rejected
                    || c->retry > report->retry)
                {
                    report = c;
                }

                continue;
            }

            if (report == NULL
                || c->remaining < report->remaining
                || (c->remaining == report->remaining
                    && c->reset > report->reset))
            {
                report = c;
            }
        }
    }

    ctx->report = report;

    if (report) {
        ctx->category = &report->rule->category;
    }

    if (rejected) {
        ctx->retry = report->retry;
        ctx->status = llcf->dry_run ? NGX_HTTP_LLMLIMIT_REJECTED_DRY
                                    : NGX_HTTP_LLMLIMIT_REJECTED;

        ngx_http_llmlimit_log_rejection(r, llcf, report);
    }

    ngx_http_llmlimit_metrics_request(ctx);

    if (ctx->status != NGX_HTTP_LLMLIMIT_REJECTED) {
        return NGX_DECLINED;
    }

    rc = ngx_http_llmlimit_reject(r, llcf, ctx);

    if (rc == (ngx_int_t) llcf->status_code) {
        /* an error_page answers */
        return rc;
    }

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


/*
 * One line per rejection, as limit_req writes, up to llmlimit_log_limit
 * lines a second in this worker process; past that, the rejections are
 * counted, and a timer writes their number a second later.  A flood of
 * over-limit requests then costs neither a write() each nor the disk.
 */

static void
ngx_http_llmlimit_log_rejection(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_counter_t *report)
{
    u_char                          *fp;
    time_t                           now;
    ngx_event_t                     *ev;
    ngx_http_core_loc_conf_t        *clcf;
    ngx_http_llmlimit_log_state_t   *ls;
    u_char                           fingerprint[8];

    if (r->connection->log->log_level < llcf->log_level) {
        return;
    }

    ls = &ngx_http_llmlimit_log_state;
    now = ngx_time();

    if (ls->sec != now) {
        ls->sec = now;
        ls->lines = 0;
    }

    if (llcf->log_limit && ls->lines >= llcf->log_limit) {
        clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

        ls->dropped++;
        ls->limit = llcf->log_limit;
        ls->level = llcf->log_level;
        ls->log = clcf->error_log;

        ev = &ls->event;

        if (!ev->timer_set) {
            ls->dumb.fd = (ngx_socket_t) -1;

            ev->handler = ngx_http_llmlimit_log_dropped;
            ev->data = &ls->dumb;
            ev->log = ngx_cycle->log;
            ev->cancelable = 1;

            ngx_add_timer(ev, 1000);
        }

        return;
    }

    ls->lines++;

    ngx_hex_dump(fingerprint, report->hash, 4);

    fp = fingerprint;

    ngx_log_error(llcf->log_level, r->connection->log, 0,
                  "llmlimit: %slimiting request, table \"%V\", category "
                  "\"%V\", key %*s, limit %ui/%M%s, retry after %Mms",
                  llcf->dry_run ? "dry run, " : "", &report->table->name,
                  &report->rule->category, (size_t) 8, fp, report->count,
                  report->period % 1000 ? report->period
                                        : report->period / 1000,
                  report->period % 1000 ? "ms" : "s", report->retry);
}


static void
ngx_http_llmlimit_log_dropped(ngx_event_t *ev)
{
    ngx_http_llmlimit_log_state_t  *ls;

    ls = &ngx_http_llmlimit_log_state;

    if (ls->dropped == 0) {
        return;
    }

    ngx_log_error(ls->level, ls->log, 0,
                  "llmlimit: %ui more rejections not logged, over %ui "
                  "lines a second", ls->dropped, ls->limit);

    ls->dropped = 0;
}


/*
 * The context survives an internal redirect, which wipes module contexts,
 * in a pool cleanup: ngx_http_realip_module does the same.
 */

static ngx_http_llmlimit_ctx_t *
ngx_http_llmlimit_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t       *cln;
    ngx_http_llmlimit_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmlimit_module);

    if (ctx || !(r->internal || r->filter_finalize)) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_llmlimit_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_llmlimit_module);
            return ctx;
        }
    }

    return NULL;
}


/*
 * The request is freed.  The pool cleanup is also the marker that finds
 * the context again after a redirect.  A request freed while its check
 * was under way (the client went away, worker_shutdown_timeout) was never
 * let through: what it counted is taken back.
 */

static void
ngx_http_llmlimit_cleanup(void *data)
{
    ngx_http_llmlimit_ctx_t *ctx = data;

    if (!ctx->decided && ctx->nbatches) {
        ctx->decided = 1;
        ngx_http_llmlimit_take_back(ctx->request, ctx);
    }
}


static ngx_int_t
ngx_http_llmlimit_header_filter(ngx_http_request_t *r)
{
    ngx_http_llmlimit_ctx_t       *ctx;
    ngx_http_llmlimit_loc_conf_t  *llcf;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_llmlimit_get_ctx(r);

    if (ctx == NULL || !ctx->decided
        || (ctx->report == NULL
            && ctx->status != NGX_HTTP_LLMLIMIT_REJECTED))
    {
        return ngx_http_next_header_filter(r);
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_module);

    if (ngx_http_llmlimit_add_headers(r, llcf, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_llmlimit_tokens_header(r, llcf, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


/*
 * The end of a request, its one place: the token budgets are charged what
 * it used (ngx_http_llmlimit_tokens_end() sets ctx->tokens, and
 * ctx->charged if there was anything to charge); whatever else counts
 * the request at its end goes here too, after it.
 */

static ngx_int_t
ngx_http_llmlimit_log_handler(ngx_http_request_t *r)
{
    ngx_uint_t                charged;
    ngx_http_llmlimit_ctx_t  *ctx;

    if (r != r->main) {
        /* a subrequest (log_subrequest on) shares the main request's ctx */
        return NGX_OK;
    }

    ctx = ngx_http_llmlimit_get_ctx(r);

    if (ctx == NULL || !ctx->decided || !ctx->has_tokens) {
        return NGX_OK;
    }

    charged = ctx->charged;

    ngx_http_llmlimit_tokens_end(r, ctx);

    if (!charged && ctx->charged) {
        /* what was charged, for usage accounting and the metrics */
        (void) ngx_http_llmlimit_usage_add_tokens(r, ctx->tokens);
        ngx_http_llmlimit_metrics_tokens(ctx, ctx->tokens);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                       *p;
    ngx_str_t                    *s;
    ngx_http_llmlimit_ctx_t      *ctx;
    ngx_http_llmlimit_counter_t  *c;

    ctx = ngx_http_llmlimit_get_ctx(r->main);

    if (ctx == NULL || ctx->status == NGX_HTTP_LLMLIMIT_UNSET) {
        v->not_found = 1;
        return NGX_OK;
    }

    c = ctx->report;
    s = NULL;

    switch (data) {

    case NGX_HTTP_LLMLIMIT_VAR_STATUS:
        s = &ngx_http_llmlimit_status_names[ctx->status];
        break;

    case NGX_HTTP_LLMLIMIT_VAR_CATEGORY:
        s = ctx->category;
        break;

    case NGX_HTTP_LLMLIMIT_VAR_PLAN:
        s = &ctx->plan;
        break;

    default:
        break;
    }

    if (s == NULL && data <= NGX_HTTP_LLMLIMIT_VAR_CATEGORY) {
        v->not_found = 1;
        return NGX_OK;
    }

    if (data == NGX_HTTP_LLMLIMIT_VAR_TOKENS) {
        if (!ctx->charged) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->len = ngx_sprintf(p, "%ui", ctx->tokens) - p;
        v->data = p;

    } else if (s == NULL) {
        if (c == NULL) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        switch (data) {

        case NGX_HTTP_LLMLIMIT_VAR_LIMIT:
            v->len = ngx_sprintf(p, "%ui", c->count) - p;
            break;

        case NGX_HTTP_LLMLIMIT_VAR_REMAINING:
            v->len = ngx_sprintf(p, "%ui", c->remaining) - p;
            break;

        default: /* NGX_HTTP_LLMLIMIT_VAR_RESET */
            v->len = ngx_sprintf(p, "%M",
                                 (ngx_msec_t) ((c->rejected ? c->retry
                                                            : c->reset)
                                               + 999) / 1000)
                     - p;
            break;
        }

        v->data = p;

    } else {
        v->len = s->len;
        v->data = s->data;
    }

    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}


static void *
ngx_http_llmlimit_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_main_conf_t  *lmcf;

    lmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_main_conf_t));
    if (lmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&lmcf->zones, cf->pool, 4,
                       sizeof(ngx_http_llmlimit_zone_decl_t *))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&lmcf->tables, cf->pool, 4,
                       sizeof(ngx_http_llmlimit_table_decl_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return lmcf;
}


static void *
ngx_http_llmlimit_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->header_limit = { 0, NULL };
     *     conf->header_remaining = { 0, NULL };
     *     conf->header_reset = { 0, NULL };
     */

    conf->tables = NGX_CONF_UNSET_PTR;
    conf->status_code = NGX_CONF_UNSET_UINT;
    conf->dry_run = NGX_CONF_UNSET;
    conf->log_level = NGX_CONF_UNSET_UINT;
    conf->log_limit = NGX_CONF_UNSET_UINT;
    conf->headers = NGX_CONF_UNSET_UINT;
    conf->reset_epoch = NGX_CONF_UNSET_UINT;
    conf->phase = NGX_CONF_UNSET_UINT;
    conf->tokens = NGX_CONF_UNSET_PTR;
    conf->tokens_estimate = NGX_CONF_UNSET_PTR;

    return conf;
}


static char *
ngx_http_llmlimit_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_llmlimit_loc_conf_t *prev = parent;
    ngx_http_llmlimit_loc_conf_t *conf = child;

    ngx_conf_merge_ptr_value(conf->tables, prev->tables, NULL);
    ngx_conf_merge_uint_value(conf->status_code, prev->status_code,
                              NGX_HTTP_TOO_MANY_REQUESTS);
    ngx_conf_merge_value(conf->dry_run, prev->dry_run, 0);
    ngx_conf_merge_uint_value(conf->log_level, prev->log_level, NGX_LOG_ERR);
    ngx_conf_merge_uint_value(conf->log_limit, prev->log_limit, 100);
    ngx_conf_merge_uint_value(conf->phase, prev->phase,
                              NGX_HTTP_LLMLIMIT_PHASE_PREACCESS);
    ngx_conf_merge_ptr_value(conf->tokens, prev->tokens, NULL);
    ngx_conf_merge_ptr_value(conf->tokens_estimate, prev->tokens_estimate,
                             NULL);

    if (conf->headers == NGX_CONF_UNSET_UINT) {
        conf->headers = prev->headers;
        conf->reset_epoch = prev->reset_epoch;
        conf->header_limit = prev->header_limit;
        conf->header_remaining = prev->header_remaining;
        conf->header_reset = prev->header_reset;
    }

    if (conf->headers == NGX_CONF_UNSET_UINT) {
        conf->headers = NGX_HTTP_LLMLIMIT_HEADERS_X;
        conf->reset_epoch = 0;
        ngx_str_set(&conf->header_limit, "X-RateLimit-Limit");
        ngx_str_set(&conf->header_remaining, "X-RateLimit-Remaining");
        ngx_str_set(&conf->header_reset, "X-RateLimit-Reset");
    }

    return NGX_CONF_OK;
}


static ngx_http_llmlimit_zone_decl_t *
ngx_http_llmlimit_get_zone(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_uint_t                       i;
    ngx_http_llmlimit_zone_decl_t  **zones, *zd;
    ngx_http_llmlimit_main_conf_t   *lmcf;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llmlimit_module);

    zones = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        if (zones[i]->zone.name.len == name->len
            && ngx_strncmp(zones[i]->zone.name.data, name->data, name->len)
               == 0)
        {
            return zones[i];
        }
    }

    zd = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_zone_decl_t));
    if (zd == NULL) {
        return NULL;
    }

    zd->zone.name = *name;
    zd->zone.failure = NGX_HTTP_LLMLIMIT_FAIL_LOCAL;
    zd->ref.file = cf->conf_file->file.name;
    zd->ref.line = cf->conf_file->line;

    zones = ngx_array_push(&lmcf->zones);
    if (zones == NULL) {
        return NULL;
    }

    *zones = zd;

    return zd;
}


/* a zone named elsewhere (llmlimit_usage_zone redis=); checked as any */

ngx_http_llmlimit_zone_t *
ngx_http_llmlimit_zone_ref(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_http_llmlimit_zone_decl_t  *zd;

    zd = ngx_http_llmlimit_get_zone(cf, name);

    return zd ? &zd->zone : NULL;
}


static ngx_http_llmlimit_table_decl_t *
ngx_http_llmlimit_get_table(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_uint_t                        i;
    ngx_http_llmlimit_table_decl_t  **tables, *td;
    ngx_http_llmlimit_main_conf_t    *lmcf;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llmlimit_module);

    tables = lmcf->tables.elts;

    for (i = 0; i < lmcf->tables.nelts; i++) {
        if (tables[i]->table.name.len == name->len
            && ngx_strncmp(tables[i]->table.name.data, name->data, name->len)
               == 0)
        {
            return tables[i];
        }
    }

    td = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_table_decl_t));
    if (td == NULL) {
        return NULL;
    }

    td->table.name = *name;
    td->ref.file = cf->conf_file->file.name;
    td->ref.line = cf->conf_file->line;

    tables = ngx_array_push(&lmcf->tables);
    if (tables == NULL) {
        return NULL;
    }

    *tables = td;

    return td;
}


static char *
ngx_http_llmlimit_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ssize_t                         size;
    ngx_int_t                       rc;
    ngx_str_t                      *value, s;
    ngx_uint_t                      i;
    ngx_http_llmlimit_store_t     **store;
    ngx_http_llmlimit_zone_t       *zone;
    ngx_http_llmlimit_zone_decl_t  *zd;

    value = cf->args->elts;

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    zd = ngx_http_llmlimit_get_zone(cf, &value[1]);
    if (zd == NULL) {
        return NGX_CONF_ERROR;
    }

    if (zd->defined) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate llmlimit_zone \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    zd->defined = 1;
    zone = &zd->zone;

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

    zone->size = size;

    for (i = 3; i < cf->args->nelts; i++) {

        for (store = ngx_http_llmlimit_stores; *store; store++) {

            if ((*store)->option == NULL) {
                continue;
            }

            rc = (*store)->option(cf, zone, &value[i]);

            if (rc == NGX_ERROR) {
                return NGX_CONF_ERROR;
            }

            if (rc == NGX_OK) {
                break;
            }
        }

        if (*store == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }
    }

    /* the first store to take the zone counts in it */

    for (store = ngx_http_llmlimit_stores; *store; store++) {

        rc = (*store)->conf_done(cf, zone);

        if (rc == NGX_ERROR) {
            return NGX_CONF_ERROR;
        }

        if (rc == NGX_OK) {
            zone->store = *store;
            break;
        }
    }

    zone->shm_zone = ngx_shared_memory_add(cf, &value[1], size,
                                           &ngx_http_llmlimit_module);
    if (zone->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (zone->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    zone->shm_zone->init = zone->store->init_zone;
    zone->shm_zone->data = zone;

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_rules(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char                            *rv;
    ngx_str_t                       *value, s;
    ngx_uint_t                       i, j;
    ngx_conf_t                       save;
    ngx_http_llmlimit_rule_t        *rule;
    ngx_http_llmlimit_table_t       *table;
    ngx_http_llmlimit_zone_decl_t   *zd;
    ngx_http_llmlimit_table_decl_t  *td;
    ngx_http_compile_complex_value_t ccv;

    value = cf->args->elts;

    td = ngx_http_llmlimit_get_table(cf, &value[1]);
    if (td == NULL) {
        return NGX_CONF_ERROR;
    }

    if (td->defined) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate llmlimit_rules \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    td->defined = 1;
    table = &td->table;
    table->algorithm = NGX_HTTP_LLMLIMIT_SLIDING;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            s.len = value[i].len - 5;
            s.data = value[i].data + 5;

            if (s.len == 0) {
                goto invalid;
            }

            zd = ngx_http_llmlimit_get_zone(cf, &s);
            if (zd == NULL) {
                return NGX_CONF_ERROR;
            }

            table->zone = &zd->zone;
            continue;
        }

        if (ngx_strncmp(value[i].data, "algorithm=", 10) == 0) {
            s.len = value[i].len - 10;
            s.data = value[i].data + 10;

            if (s.len == 7 && ngx_strncmp(s.data, "sliding", 7) == 0) {
                table->algorithm = NGX_HTTP_LLMLIMIT_SLIDING;

            } else if (s.len == 5 && ngx_strncmp(s.data, "fixed", 5) == 0) {
                table->algorithm = NGX_HTTP_LLMLIMIT_FIXED;

            } else if (s.len == 4 && ngx_strncmp(s.data, "gcra", 4) == 0) {
                table->algorithm = NGX_HTTP_LLMLIMIT_GCRA;

            } else {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "plan=", 5) == 0) {
            s.len = value[i].len - 5;
            s.data = value[i].data + 5;

            if (s.len == 0 || s.data[0] != '$') {
                goto invalid;
            }

            table->plan = ngx_palloc(cf->pool,
                                     sizeof(ngx_http_complex_value_t));
            if (table->plan == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

            ccv.cf = cf;
            ccv.value = &s;
            ccv.complex_value = table->plan;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        goto invalid;
    }

    if (table->zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone=\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (ngx_array_init(&table->rules, cf->pool, 16,
                       sizeof(ngx_http_llmlimit_rule_t))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    save = *cf;
    cf->handler = ngx_http_llmlimit_rules_line;
    cf->handler_conf = (char *) table;

    rv = ngx_conf_parse(cf, NULL);

    *cf = save;

    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (table->rules.nelts == 0) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "llmlimit_rules \"%V\" has no rules", &value[1]);
    }

    if (ngx_http_llmlimit_rules_compile(cf, table) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    /* the 429 bodies, encoded once */

    rule = table->rules.elts;

    for (j = 0; j < table->rules.nelts; j++) {
        if (ngx_http_llmlimit_prepare_rule(cf, &rule[j]) != NGX_CONF_OK) {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_llmlimit_rules_line(ngx_conf_t *cf, ngx_command_t *dummy, void *conf)
{
    return ngx_http_llmlimit_rule_parse(cf, conf);
}


static char *
ngx_http_llmlimit_prepare_rule(ngx_conf_t *cf, ngx_http_llmlimit_rule_t *rule)
{
    ngx_uint_t                   i, j, n;
    ngx_http_llmlimit_limits_t  *limits;

    n = rule->plans ? rule->plans->nelts : 0;

    for (i = 0; i <= n; i++) {
        limits = (i < n) ? (ngx_http_llmlimit_limits_t *) rule->plans->elts + i
                         : &rule->deflt;

        for (j = 0; j < limits->nlimits; j++) {
            if (ngx_http_llmlimit_json_prefix(cf->pool, &rule->category,
                                              &limits->limits[j])
                != NGX_OK)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "could not encode the rejection of "
                                   "category \"%V\"", &rule->category);
                return NGX_CONF_ERROR;
            }
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_loc_conf_t *llcf = conf;

    ngx_str_t                        *value;
    ngx_uint_t                        i;
    ngx_http_llmlimit_table_t       **tables;
    ngx_http_llmlimit_table_decl_t   *td;

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {

        if (llcf->tables != NGX_CONF_UNSET_PTR) {
            return (llcf->tables == NULL) ? "is duplicate"
                                          : "\"off\" conflicts with tables";
        }

        llcf->tables = NULL;
        return NGX_CONF_OK;
    }

    if (llcf->tables == NULL) {
        return "conflicts with \"off\"";
    }

    if (llcf->tables == NGX_CONF_UNSET_PTR) {
        llcf->tables = ngx_array_create(cf->pool, 2,
                                        sizeof(ngx_http_llmlimit_table_t *));
        if (llcf->tables == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    td = ngx_http_llmlimit_get_table(cf, &value[1]);
    if (td == NULL) {
        return NGX_CONF_ERROR;
    }

    tables = llcf->tables->elts;

    for (i = 0; i < llcf->tables->nelts; i++) {
        if (tables[i] == &td->table) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llmlimit \"%V\" is duplicate", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    if (llcf->tables->nelts == NGX_HTTP_LLMLIMIT_MAX_TABLES) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many llmlimit tables, at most %d at one level",
                           NGX_HTTP_LLMLIMIT_MAX_TABLES);
        return NGX_CONF_ERROR;
    }

    tables = ngx_array_push(llcf->tables);
    if (tables == NULL) {
        return NGX_CONF_ERROR;
    }

    *tables = &td->table;

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_log_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_loc_conf_t *llcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;

    if (llcf->log_limit != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        llcf->log_limit = 0;
        return NGX_CONF_OK;
    }

    n = ngx_atoi(value[1].data, value[1].len);

    if (n == NGX_ERROR || n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid llmlimit_log_limit \"%V\", "
                           "must be \"off\" or lines a second", &value[1]);
        return NGX_CONF_ERROR;
    }

    llcf->log_limit = n;

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_phase(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_loc_conf_t *llcf = conf;

    char                           *rv;
    ngx_http_llmlimit_main_conf_t  *lmcf;

    rv = ngx_conf_set_enum_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (llcf->phase == NGX_HTTP_LLMLIMIT_PHASE_ACCESS) {
        /* the precontent handler is registered only if it has work */
        lmcf = ngx_http_conf_get_module_main_conf(cf,
                                                  ngx_http_llmlimit_module);
        lmcf->phase_access = 1;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_headers(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_loc_conf_t *llcf = conf;

    u_char      *p;
    ngx_str_t   *value, prefix, *h;
    ngx_uint_t   i, f, first, upper;

    static char  *suffixes[] = { "-Limit", "-Remaining", "-Reset" };

    if (llcf->headers != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    /* formats, combined: "ietf openai", "x anthropic", or "off" alone */

    llcf->headers = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strcmp(value[i].data, "x") == 0) {
            f = NGX_HTTP_LLMLIMIT_HEADERS_X;

        } else if (ngx_strcmp(value[i].data, "ietf") == 0) {
            f = NGX_HTTP_LLMLIMIT_HEADERS_IETF;

        } else if (ngx_strcmp(value[i].data, "both") == 0) {
            f = NGX_HTTP_LLMLIMIT_HEADERS_X | NGX_HTTP_LLMLIMIT_HEADERS_IETF;

        } else if (ngx_strcmp(value[i].data, "openai") == 0) {
            f = NGX_HTTP_LLMLIMIT_HEADERS_OPENAI;

        } else if (ngx_strcmp(value[i].data, "anthropic") == 0) {
            f = NGX_HTTP_LLMLIMIT_HEADERS_ANTHROPIC;

        } else if (ngx_strcmp(value[i].data, "off") == 0
                   && cf->args->nelts == 2)
        {
            return NGX_CONF_OK;

        } else if (i > 1 && ngx_strchr(value[i].data, '=') != NULL) {
            break;

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid value \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        llcf->headers |= f;
    }

    first = i;

    ngx_str_set(&prefix, "X-RateLimit");
    llcf->reset_epoch = 0;

    for (i = first; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0
            && value[i].len > 7)
        {
            prefix.len = value[i].len - 7;
            prefix.data = value[i].data + 7;

            for (p = prefix.data; p < prefix.data + prefix.len; p++) {
                if (*p <= ' ' || *p == ':' || *p >= 0x7f) {
                    goto invalid;
                }
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "reset=delta") == 0) {
            llcf->reset_epoch = 0;
            continue;
        }

        if (ngx_strcmp(value[i].data, "reset=epoch") == 0) {
            llcf->reset_epoch = 1;
            continue;
        }

        goto invalid;
    }

    /* "lb-ratelimit" gives "lb-ratelimit-limit", "X-RateLimit" "-Limit" */

    upper = 0;

    for (p = prefix.data; p < prefix.data + prefix.len; p++) {
        if (*p >= 'A' && *p <= 'Z') {
            upper = 1;
            break;
        }
    }

    h = &llcf->header_limit;

    for (i = 0; i < 3; i++) {
        h[i].len = prefix.len + ngx_strlen(suffixes[i]);
        h[i].data = ngx_pnalloc(cf->pool, h[i].len);
        if (h[i].data == NULL) {
            return NGX_CONF_ERROR;
        }

        p = ngx_cpymem(h[i].data, prefix.data, prefix.len);
        p = ngx_cpymem(p, suffixes[i], ngx_strlen(suffixes[i]));

        if (!upper) {
            ngx_strlow(h[i].data + prefix.len, h[i].data + prefix.len,
                       h[i].len - prefix.len);
        }
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


/* llmlimit_tokens auto | $VALUE */

static char *
ngx_http_llmlimit_tokens(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_loc_conf_t *llcf = conf;

    ngx_str_t  *value;

    if (llcf->tokens != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "auto") == 0) {
        llcf->tokens = NULL;
        return NGX_CONF_OK;
    }

    if (value[1].len == 0 || value[1].data[0] != '$') {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid value \"%V\": expected \"auto\" or "
                           "a value with variables", &value[1]);
        return NGX_CONF_ERROR;
    }

    llcf->tokens = NGX_CONF_UNSET_PTR;

    return ngx_http_set_complex_value_slot(cf, cmd, conf);
}


static ngx_int_t
ngx_http_llmlimit_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_llmlimit_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}



/* whether a table has a token budget in any rule, for any plan */

static ngx_uint_t
ngx_http_llmlimit_table_tokens(ngx_http_llmlimit_table_t *table)
{
    ngx_uint_t                   i, j, n;
    ngx_http_llmlimit_rule_t    *rule;
    ngx_http_llmlimit_limits_t  *limits;

    rule = table->rules.elts;

    for (i = 0; i < table->rules.nelts; i++) {
        limits = rule[i].plans ? rule[i].plans->elts : NULL;
        n = rule[i].plans ? rule[i].plans->nelts : 0;

        for (j = 0; j <= n; j++) {
            if (ngx_http_llmlimit_limits_tokens(j < n ? &limits[j]
                                                      : &rule[i].deflt))
            {
                return 1;
            }
        }
    }

    return 0;
}


static ngx_uint_t
ngx_http_llmlimit_limits_tokens(ngx_http_llmlimit_limits_t *limits)
{
    ngx_uint_t  i;

    for (i = 0; i < limits->nlimits; i++) {
        if (limits->limits[i].tokens) {
            return 1;
        }
    }

    return 0;
}


static ngx_int_t
ngx_http_llmlimit_init(ngx_conf_t *cf)
{
    ngx_uint_t                        i, n;
    ngx_http_handler_pt              *h;
    ngx_http_core_main_conf_t        *cmcf;
    ngx_http_llmlimit_zone_decl_t   **zones;
    ngx_http_llmlimit_table_t        *table;
    ngx_http_llmlimit_main_conf_t    *lmcf;
    ngx_http_llmlimit_table_decl_t  **tables;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llmlimit_module);

    zones = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        if (!zones[i]->defined) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown llmlimit_zone \"%V\" in %V:%ui",
                          &zones[i]->zone.name, &zones[i]->ref.file,
                          zones[i]->ref.line);
            return NGX_ERROR;
        }

        if (ngx_http_llmlimit_metrics_add_zone(cf, &zones[i]->zone)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        /* the Redis connection of any store: the http block's resolver */

        if (ngx_http_llmlimit_redis_postconf(cf, &zones[i]->zone) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    tables = lmcf->tables.elts;

    for (i = 0; i < lmcf->tables.nelts; i++) {
        if (!tables[i]->defined) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown llmlimit_rules \"%V\" in %V:%ui",
                          &tables[i]->table.name, &tables[i]->ref.file,
                          tables[i]->ref.line);
            return NGX_ERROR;
        }

        table = &tables[i]->table;

        if (!(table->zone->store->algorithms & (1 << table->algorithm))) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "algorithm=%s of llmlimit_rules \"%V\" in %V:%ui "
                          "is not supported by the %s store of "
                          "llmlimit_zone \"%V\"",
                          ngx_http_llmlimit_algorithms[table->algorithm],
                          &table->name, &tables[i]->ref.file,
                          tables[i]->ref.line, table->zone->store->name,
                          &table->zone->name);
            return NGX_ERROR;
        }

        if (table->zone->store->charge == NULL
            && ngx_http_llmlimit_table_tokens(table))
        {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "token budgets of llmlimit_rules \"%V\" in %V:%ui "
                          "are not supported by the %s store of "
                          "llmlimit_zone \"%V\"",
                          &table->name, &tables[i]->ref.file,
                          tables[i]->ref.line, table->zone->store->name,
                          &table->zone->name);
            return NGX_ERROR;
        }

        if (ngx_http_llmlimit_metrics_add_table(cf, table) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_llmlimit_preaccess_handler;

    /* first in the log phase: the access log writes $llmlimit_tokens */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    n = cmcf->phases[NGX_HTTP_LOG_PHASE].handlers.nelts;
    h = cmcf->phases[NGX_HTTP_LOG_PHASE].handlers.elts;

    ngx_memmove(&h[1], &h[0], (n - 1) * sizeof(ngx_http_handler_pt));
    h[0] = ngx_http_llmlimit_log_handler;

    if (lmcf->phase_access) {
        h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        *h = ngx_http_llmlimit_precontent_handler;
    }

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_llmlimit_header_filter;

    return ngx_http_llmlimit_tokens_init(cf);
}


/*
 * Once the whole configuration is read (timer_resolution may come after
 * the http block), in the master process and with "nginx -t".
 */

static ngx_int_t
ngx_http_llmlimit_init_module(ngx_cycle_t *cycle)
{
    ngx_uint_t                       i;
    ngx_http_llmlimit_zone_t        *zone;
    ngx_http_llmlimit_zone_decl_t  **zones;
    ngx_http_llmlimit_main_conf_t   *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_llmlimit_module);
    if (lmcf == NULL) {
        return NGX_OK;
    }

    zones = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        zone = &zones[i]->zone;

        if (zone->store->init_module
            && zone->store->init_module(cycle, zone) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                       i;
    ngx_http_llmlimit_zone_t        *zone;
    ngx_http_llmlimit_zone_decl_t  **zones;
    ngx_http_llmlimit_main_conf_t   *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_llmlimit_module);
    if (lmcf == NULL) {
        return NGX_OK;
    }

    zones = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        zone = &zones[i]->zone;

        if (zone->store->init_process
            && zone->store->init_process(cycle, zone) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_llmlimit_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                       i;
    ngx_http_llmlimit_zone_t        *zone;
    ngx_http_llmlimit_zone_decl_t  **zones;
    ngx_http_llmlimit_main_conf_t   *lmcf;

    if (ngx_http_llmlimit_log_state.dropped) {
        ngx_http_llmlimit_log_dropped(&ngx_http_llmlimit_log_state.event);
    }

    lmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_llmlimit_module);
    if (lmcf == NULL) {
        return;
    }

    zones = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        zone = &zones[i]->zone;

        if (zone->store->exit_process) {
            zone->store->exit_process(cycle, zone);
        }
    }
}
