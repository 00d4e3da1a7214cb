
/*
 * Copyright (C) llmlimit developers
 */


/* The rate-limit response headers and the rejection. */


#include "ngx_http_llmlimit.h"


static ngx_int_t ngx_http_llmlimit_header(ngx_http_request_t *r,
    ngx_str_t *key, u_char *value, u_char *last);
static ngx_uint_t ngx_http_llmlimit_has_error_page(ngx_http_request_t *r,
    ngx_uint_t status);
static ngx_int_t ngx_http_llmlimit_llm_headers(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx);
static ngx_http_llmlimit_counter_t *ngx_http_llmlimit_pick(
    ngx_http_llmlimit_ctx_t *ctx, ngx_uint_t tokens);
static u_char *ngx_http_llmlimit_duration(u_char *p, ngx_msec_t ms);


static ngx_str_t  ngx_http_llmlimit_retry_after = ngx_string("Retry-After");
static ngx_str_t  ngx_http_llmlimit_ietf_policy =
    ngx_string("RateLimit-Policy");
static ngx_str_t  ngx_http_llmlimit_ietf = ngx_string("RateLimit");
static ngx_str_t  ngx_http_llmlimit_json_type =
    ngx_string("application/json");

/* by tokens (0, 1), then limit, remaining, reset */

static ngx_str_t  ngx_http_llmlimit_openai[2][3] = {
    { ngx_string("x-ratelimit-limit-requests"),
      ngx_string("x-ratelimit-remaining-requests"),
      ngx_string("x-ratelimit-reset-requests") },
    { ngx_string("x-ratelimit-limit-tokens"),
      ngx_string("x-ratelimit-remaining-tokens"),
      ngx_string("x-ratelimit-reset-tokens") }
};

static ngx_str_t  ngx_http_llmlimit_anthropic[2][3] = {
    { ngx_string("anthropic-ratelimit-requests-limit"),
      ngx_string("anthropic-ratelimit-requests-remaining"),
      ngx_string("anthropic-ratelimit-requests-reset") },
    { ngx_string("anthropic-ratelimit-tokens-limit"),
      ngx_string("anthropic-ratelimit-tokens-remaining"),
      ngx_string("anthropic-ratelimit-tokens-reset") }
};


static ngx_inline time_t
ngx_http_llmlimit_seconds(ngx_msec_t ms)
{
    return (time_t) ((ms + 999) / 1000);
}


/* ngx_sprintf("%uL") for the hot path */

static u_char *
ngx_http_llmlimit_uint(u_char *p, uint64_t n)
{
    u_char   *q, tmp[NGX_INT64_LEN];

    q = tmp + NGX_INT64_LEN;

    do {
        *--q = (u_char) (n % 10 + '0');
        n /= 10;
    } while (n);

    return ngx_cpymem(p, q, tmp + NGX_INT64_LEN - q);
}


ngx_int_t
ngx_http_llmlimit_add_headers(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    u_char                       *p, *last;
    time_t                        reset;
    ngx_str_t                    *id;
    ngx_http_llmlimit_counter_t  *c;

    c = ctx->report;

    if (c != NULL
        && (llcf->headers
            & (NGX_HTTP_LLMLIMIT_HEADERS_X | NGX_HTTP_LLMLIMIT_HEADERS_IETF)))
    {

        reset = ngx_http_llmlimit_seconds(c->reset);

        if (llcf->headers & NGX_HTTP_LLMLIMIT_HEADERS_X) {

            p = ngx_pnalloc(r->pool, 3 * NGX_INT64_LEN);
            if (p == NULL) {
                return NGX_ERROR;
            }

            last = ngx_http_llmlimit_uint(p, c->count);
            if (ngx_http_llmlimit_header(r, &llcf->header_limit, p, last)
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            p = last;
            last = ngx_http_llmlimit_uint(p, c->remaining);
            if (ngx_http_llmlimit_header(r, &llcf->header_remaining, p, last)
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            p = last;
            last = ngx_http_llmlimit_uint(p, llcf->reset_epoch
                                             ? ngx_time() + reset : reset);
            if (ngx_http_llmlimit_header(r, &llcf->header_reset, p, last)
                != NGX_OK)
            {
                return NGX_ERROR;
            }
        }

        if (llcf->headers & NGX_HTTP_LLMLIMIT_HEADERS_IETF) {
            id = &c->rule->category_id;

            p = ngx_pnalloc(r->pool, 2 * id->len + 4 * NGX_INT64_LEN + 32);
            if (p == NULL) {
                return NGX_ERROR;
            }

            last = ngx_sprintf(p, "\"%V\";q=%ui;w=%T", id, c->count,
                               ngx_http_llmlimit_seconds(c->period));
            if (ngx_http_llmlimit_header(r, &ngx_http_llmlimit_ietf_policy,
                                         p, last)
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            p = last;
            last = ngx_sprintf(p, "\"%V\";r=%ui;t=%T", id, c->remaining,
                               reset);
            if (ngx_http_llmlimit_header(r, &ngx_http_llmlimit_ietf, p, last)
                != NGX_OK)
            {
                return NGX_ERROR;
            }
        }
    }

    if (llcf->headers
        & (NGX_HTTP_LLMLIMIT_HEADERS_OPENAI
           | NGX_HTTP_LLMLIMIT_HEADERS_ANTHROPIC))
    {
        if (ngx_http_llmlimit_llm_headers(r, llcf, ctx) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (ctx->status == NGX_HTTP_LLMLIMIT_REJECTED) {
        reset = ngx_http_llmlimit_seconds(ctx->retry);

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        last = ngx_http_llmlimit_uint(p, reset ? reset : 1);
        if (ngx_http_llmlimit_header(r, &ngx_http_llmlimit_retry_after,
                                     p, last)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The names LLM SDKs read, requests and tokens apart: each reports its
 * most restrictive counter, the token fields only where the rule has a
 * token budget.  OpenAI's reset is a duration ("1s", "6m0s", "250ms"),
 * Anthropic's an RFC 3339 time.
 */

static ngx_int_t
ngx_http_llmlimit_llm_headers(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    u_char                       *p, *last;
    time_t                        t;
    ngx_tm_t                      tm;
    ngx_str_t                    *names;
    ngx_msec_t                    ms;
    ngx_uint_t                    k, f;
    ngx_http_llmlimit_counter_t  *c;

    for (k = 0; k < 2; k++) {
        c = ngx_http_llmlimit_pick(ctx, k);

        if (c == NULL) {
            continue;
        }

        ms = c->rejected ? c->retry : c->reset;

        for (f = NGX_HTTP_LLMLIMIT_HEADERS_OPENAI;
             f <= NGX_HTTP_LLMLIMIT_HEADERS_ANTHROPIC;
             f <<= 1)
        {
            if (!(llcf->headers & f)) {
                continue;
            }

            names = (f == NGX_HTTP_LLMLIMIT_HEADERS_OPENAI)
                    ? ngx_http_llmlimit_openai[k]
                    : ngx_http_llmlimit_anthropic[k];

            p = ngx_pnalloc(r->pool, 2 * NGX_INT64_LEN + 32);
            if (p == NULL) {
                return NGX_ERROR;
            }

            last = ngx_http_llmlimit_uint(p, c->count);
            if (ngx_http_llmlimit_header(r, &names[0], p, last) != NGX_OK) {
                return NGX_ERROR;
            }

            p = last;
            last = ngx_http_llmlimit_uint(p, c->remaining);
            if (ngx_http_llmlimit_header(r, &names[1], p, last) != NGX_OK) {
                return NGX_ERROR;
            }

            p = last;

            if (f == NGX_HTTP_LLMLIMIT_HEADERS_OPENAI) {
                last = ngx_http_llmlimit_duration(p, ms);

            } else {
                t = ngx_time() + ngx_http_llmlimit_seconds(ms);
                ngx_gmtime(t, &tm);
                last = ngx_sprintf(p, "%4d-%02d-%02dT%02d:%02d:%02dZ",
                                   tm.ngx_tm_year, tm.ngx_tm_mon,
                                   tm.ngx_tm_mday, tm.ngx_tm_hour,
                                   tm.ngx_tm_min, tm.ngx_tm_sec);
            }

            if (ngx_http_llmlimit_header(r, &names[2], p, last) != NGX_OK) {
                return NGX_ERROR;
            }
        }
    }

    return NGX_OK;
}


/*
 * The most restrictive counter of requests (tokens == 0) or of tokens: a
 * rejecting one with the longest wait, else the one with the fewest
 * remaining; only of the zones that answered
 */

static ngx_http_llmlimit_counter_t *
ngx_http_llmlimit_pick(ngx_http_llmlimit_ctx_t *ctx, ngx_uint_t tokens)
{
    ngx_uint_t                    i, j;
    ngx_http_llmlimit_batch_t    *b;
    ngx_http_llmlimit_counter_t  *c, *best;

    best = NULL;

    for (i = 0; i < ctx->nbatches; i++) {
        b = &ctx->batches[i];

        if (b->rc != NGX_OK && b->rc != NGX_BUSY) {
            continue;
        }

        for (j = 0; j < b->n; j++) {
            c = &b->counters[j];

            if (c->tokens != tokens) {
                continue;
            }

            if (best == NULL
                || (c->rejected && !best->rejected)
                || (c->rejected && best->rejected && c->retry > best->retry)
                || (!c->rejected && !best->rejected
                    && (c->remaining < best->remaining
                        || (c->remaining == best->remaining
                            && c->reset > best->reset))))
            {
                best = c;
            }
        }
    }

    return best;
}


/* a duration as OpenAI writes it (Go's): "0s", "250ms", "1.5s", "6m0s" */

static u_char *
ngx_http_llmlimit_duration(u_char *p, ngx_msec_t ms)
{
    ngx_msec_t  h, m, s, frac;

    if (ms < 1000) {
        return (ms == 0) ? ngx_cpymem(p, "0s", 2) : ngx_sprintf(p, "%Mms", ms);
    }

    h = ms / 3600000;
    m = ms / 60000 % 60;
    s = ms / 1000 % 60;
    frac = ms % 1000;

    if (h) {
        p = ngx_sprintf(p, "%Mh%Mm", h, m);

    } else if (m) {
        p = ngx_sprintf(p, "%Mm", m);
    }

    p = ngx_sprintf(p, "%M", s);

    if (frac) {
        p = ngx_sprintf(p, ".%03M", frac);

        while (p[-1] == '0') {
            p--;
        }
    }

    *p++ = 's';

    return p;
}


/* the value is in the request pool already */

static ngx_int_t
ngx_http_llmlimit_header(ngx_http_request_t *r, ngx_str_t *key,
    u_char *value, u_char *last)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = *key;
    h->value.len = last - value;
    h->value.data = value;

#if (nginx_version >= 1023000)
    h->next = NULL;
#endif

    return NGX_OK;
}


/*
 * Answers the rejected request: the JSON body, unless an error_page
 * for the status takes over; returns what the phase handler returns.
 */

ngx_int_t
ngx_http_llmlimit_reject(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    u_char       *p;
    time_t        retry;
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_str_t    *json;
    ngx_chain_t   out;

    if (ngx_http_llmlimit_has_error_page(r, llcf->status_code)) {
        return llcf->status_code;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    json = &ctx->report->limit->json;

    retry = ngx_http_llmlimit_seconds(ctx->retry);

    b = ngx_create_temp_buf(r->pool, json->len + NGX_TIME_T_LEN + 3);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(b->pos, json->data, json->len);
    p = ngx_http_llmlimit_uint(p, retry ? retry : 1);
    b->last = ngx_cpymem(p, "}}\n", 3);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = llcf->status_code;
    r->headers_out.content_type = ngx_http_llmlimit_json_type;
    r->headers_out.content_type_len = ngx_http_llmlimit_json_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = b->last - b->pos;

    if (r->headers_out.content_length) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = NULL;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static ngx_uint_t
ngx_http_llmlimit_has_error_page(ngx_http_request_t *r, ngx_uint_t status)
{
    ngx_uint_t                 i;
    ngx_http_err_page_t       *err_page;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (clcf->error_pages == NULL || r->uri_changes == 0) {
        return 0;
    }

    if (r->error_page && !clcf->recursive_error_pages) {
        return 0;
    }

    err_page = clcf->error_pages->elts;

    for (i = 0; i < clcf->error_pages->nelts; i++) {
        if (err_page[i].status == (ngx_int_t) status) {
            return 1;
        }
    }

    return 0;
}
