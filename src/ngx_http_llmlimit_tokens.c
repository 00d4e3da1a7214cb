
/*
 * Copyright (C) llmlimit developers
 */


/*
 * Token budgets: what a request used, charged when it ends.
 *
 * "llmlimit_tokens auto" reads the usage the upstream reports in its
 * response body as the body passes through the body filter below,
 * unchanged: the buffers are read where they are, nothing is copied or
 * kept but the scanner's state (ngx_http_llmlimit_usage_t, some 80
 * bytes), so that a number split across buffers is read whole.
 *
 * The scanner is a JSON tokenizer that keeps no text.  It reads plain
 * JSON (a body that starts with "{" or "[") and server-sent events (any
 * other body: the "data:" lines of each event, an empty line ends an
 * event and resets the tokenizer).  An object under a key "usage" in an
 * object at most two levels deep (OpenAI: {"usage": {...}}, Anthropic's
 * stream: {"message": {"usage": {...}}} and {"usage": {...}}) gives its
 * direct members total_tokens, prompt_tokens, completion_tokens,
 * input_tokens and output_tokens; a later one overrides an earlier
 * (Anthropic's message_delta carries the final output_tokens).  The
 * tokens used are total_tokens, else input_tokens + output_tokens, else
 * prompt_tokens + completion_tokens.  A field that is not a non-negative
 * integer up to NGX_HTTP_LLMLIMIT_MAX_TOKENS (-5, 1.5, 1e309, "12",
 * 2^63) makes the whole usage unusable, logged at "warn".
 * Nesting deeper than 64 levels is counted but not told apart (object or
 * array), which only matters above level 3.
 *
 * What cannot be read (no usage, an unusable field, a compressed body, a
 * buffer not in memory) charges nothing more than the estimate counted on
 * admission, with a line at "info".  The budget is never charged a
 * negative or unbelievable number.
 */


#include "ngx_http_llmlimit.h"


/* the tokenizer's states */
#define NGX_HTTP_LLMLIMIT_U_VALUE       0
#define NGX_HTTP_LLMLIMIT_U_STRING      1
#define NGX_HTTP_LLMLIMIT_U_ESCAPE      2
#define NGX_HTTP_LLMLIMIT_U_NUMBER      3
#define NGX_HTTP_LLMLIMIT_U_LITERAL     4

/* the body */
#define NGX_HTTP_LLMLIMIT_U_UNKNOWN     0
#define NGX_HTTP_LLMLIMIT_U_JSON        1
#define NGX_HTTP_LLMLIMIT_U_SSE         2

/* a line of events: 0..5 "data:" matched so far, then */
#define NGX_HTTP_LLMLIMIT_U_DATA        5
#define NGX_HTTP_LLMLIMIT_U_SKIP        6

/* the keys, by bit, "usage" first (most keys match only it); fields[i - 1] */
#define NGX_HTTP_LLMLIMIT_U_USAGE       0
#define NGX_HTTP_LLMLIMIT_U_TOTAL       1
#define NGX_HTTP_LLMLIMIT_U_PROMPT      2
#define NGX_HTTP_LLMLIMIT_U_COMPLETION  3
#define NGX_HTTP_LLMLIMIT_U_INPUT       4
#define NGX_HTTP_LLMLIMIT_U_OUTPUT      5
#define NGX_HTTP_LLMLIMIT_U_KEYS        6

#define NGX_HTTP_LLMLIMIT_U_FIELD_KEYS  0x3e
#define NGX_HTTP_LLMLIMIT_U_NONE        0xffff

/* a number beyond this is only known to be too large */
#define NGX_HTTP_LLMLIMIT_U_HUGE        (1ULL << 60)


static ngx_int_t ngx_http_llmlimit_tokens_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static void ngx_http_llmlimit_usage_reset(ngx_http_llmlimit_usage_t *u);
static u_char *ngx_http_llmlimit_usage_json(ngx_http_llmlimit_usage_t *u,
    u_char *p, u_char *last);
static void ngx_http_llmlimit_usage_token(ngx_http_llmlimit_usage_t *u,
    u_char ch);
static void ngx_http_llmlimit_usage_number(ngx_http_llmlimit_usage_t *u);
static void ngx_http_llmlimit_usage_key(ngx_http_llmlimit_usage_t *u);


static ngx_str_t  ngx_http_llmlimit_usage_keys[] = {
    ngx_string("usage"),
    ngx_string("total_tokens"),
    ngx_string("prompt_tokens"),
    ngx_string("completion_tokens"),
    ngx_string("input_tokens"),
    ngx_string("output_tokens")
};


static ngx_http_output_body_filter_pt  ngx_http_next_body_filter;


ngx_int_t
ngx_http_llmlimit_tokens_init(ngx_conf_t *cf)
{
    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_llmlimit_tokens_filter;

    return NGX_OK;
}


/*
 * From the header filter: with "auto", a request let through under a
 * token budget gets a scanner for its body, unless the body is encoded.
 */

ngx_int_t
ngx_http_llmlimit_tokens_header(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf, ngx_http_llmlimit_ctx_t *ctx)
{
    ngx_str_t                  *ce;
    ngx_uint_t                  i;
    ngx_http_llmlimit_usage_t  *u;

    if (!ctx->has_tokens || llcf->tokens != NULL || ctx->usage != NULL
        || r->header_only)
    {
        return NGX_OK;
    }

    for (i = 0; i < ctx->nbatches; i++) {
        if (ctx->batches[i].kept) {
            break;
        }
    }

    if (i == ctx->nbatches) {
        /* rejected, nothing to charge */
        return NGX_OK;
    }

    if (r->headers_out.content_encoding
        && r->headers_out.content_encoding->value.len)
    {
        ce = &r->headers_out.content_encoding->value;

        if (ce->len != 8 || ngx_strncasecmp(ce->data, (u_char *) "identity", 8)
                            != 0)
        {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "llmlimit: token usage not read from a body with "
                          "Content-Encoding \"%V\" (proxy_set_header "
                          "Accept-Encoding \"\" asks the upstream for none)",
                          ce);
            return NGX_OK;
        }
    }

    u = ngx_palloc(r->pool, sizeof(ngx_http_llmlimit_usage_t));
    if (u == NULL) {
        return NGX_ERROR;
    }

    ngx_http_llmlimit_usage_init(u);

    ctx->usage = u;

    /* buffers in temporary files are read into memory for the scanner */
    r->filter_need_in_memory = 1;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_tokens_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t                *b;
    ngx_chain_t              *cl;
    ngx_http_llmlimit_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmlimit_module);

    if (ctx == NULL || ctx->usage == NULL || r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            ngx_http_llmlimit_usage_feed(ctx->usage, b->pos, b->last);

        } else if (ngx_buf_size(b)) {
            ctx->usage->unread = 1;
        }
    }

    return ngx_http_next_body_filter(r, in);
}


/*
 * The estimate of llmlimit_tokens_estimate, counted on admission: 0 when
 * there is none or it is not a number.
 */

ngx_uint_t
ngx_http_llmlimit_tokens_estimate(ngx_http_request_t *r,
    ngx_http_llmlimit_loc_conf_t *llcf)
{
    ngx_str_t   value;
    ngx_uint_t  tokens;

    if (llcf->tokens_estimate == NULL) {
        return 0;
    }

    if (ngx_http_complex_value(r, llcf->tokens_estimate, &value) != NGX_OK) {
        return 0;
    }

    if (value.len == 0) {
        return 0;
    }

    if (ngx_http_llmlimit_tokens_parse(value.data, value.len, &tokens)
        == NGX_DECLINED)
    {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "llmlimit: token estimate \"%V\" is not a number, "
                      "none counted", &value);
        return 0;
    }

    return tokens;
}


/*
 * A count of tokens: digits only; NGX_DECLINED if it is not one, NGX_DONE
 * if it was capped at NGX_HTTP_LLMLIMIT_MAX_TOKENS.
 */

ngx_int_t
ngx_http_llmlimit_tokens_parse(u_char *p, size_t len, ngx_uint_t *tokens)
{
    u_char    *last;
    uint64_t   n;

    if (len == 0) {
        return NGX_DECLINED;
    }

    n = 0;

    for (last = p + len; p < last; p++) {
        if (*p < '0' || *p > '9') {
            return NGX_DECLINED;
        }

        if (n <= NGX_HTTP_LLMLIMIT_MAX_TOKENS) {
            n = n * 10 + (*p - '0');
        }
    }

    if (n > NGX_HTTP_LLMLIMIT_MAX_TOKENS) {
        *tokens = NGX_HTTP_LLMLIMIT_MAX_TOKENS;
        return NGX_DONE;
    }

    *tokens = (ngx_uint_t) n;

    return NGX_OK;
}


/*
 * The request ends: what it used is charged to the token budgets of every
 * zone that let it through, less the estimate each counted on admission.
 * Sets ctx->tokens, what was charged in all: the tokens read, or, when
 * nothing could be read, the estimate.
 */

void
ngx_http_llmlimit_tokens_end(ngx_http_request_t *r,
    ngx_http_llmlimit_ctx_t *ctx)
{
    ngx_int_t                      rc;
    ngx_str_t                      value;
    ngx_uint_t                     i, tokens, level;
    const char                    *why;
    ngx_http_llmlimit_batch_t     *b;
    ngx_http_llmlimit_loc_conf_t  *llcf;

    if (ctx->charged) {
        return;
    }

    for (i = 0; i < ctx->nbatches; i++) {
        if (ctx->batches[i].kept) {
            break;
        }
    }

    if (i == ctx->nbatches) {
        return;
    }

    ctx->charged = 1;
    ctx->tokens = ctx->estimate;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_module);

    tokens = 0;

    if (llcf->tokens) {
        if (ngx_http_complex_value(r, llcf->tokens, &value) != NGX_OK) {
            return;
        }

        rc = ngx_http_llmlimit_tokens_parse(value.data, value.len, &tokens);

        if (rc != NGX_OK) {
            level = (rc == NGX_DONE) ? NGX_LOG_WARN : NGX_LOG_INFO;

            ngx_log_error(level, r->connection->log, 0,
                          "llmlimit: llmlimit_tokens value \"%V\" is not a "
                          "number of tokens up to %d, charged the "
                          "estimate %ui", &value, NGX_HTTP_LLMLIMIT_MAX_TOKENS,
                          ctx->estimate);
            return;
        }

    } else if (ctx->usage == NULL) {
        return;

    } else {
        rc = ngx_http_llmlimit_usage_result(ctx->usage, &tokens, &why);

        if (rc != NGX_OK) {
            level = (rc == NGX_ERROR) ? NGX_LOG_WARN : NGX_LOG_INFO;

            ngx_log_error(level, r->connection->log, 0,
                          "llmlimit: token usage not read from the "
                          "response: %s, charged the estimate %ui",
                          why, ctx->estimate);
            return;
        }
    }

    ctx->tokens = tokens;

    for (i = 0; i < ctx->nbatches; i++) {
        b = &ctx->batches[i];

        if (b->kept) {
            b->zone->store->charge(r, b, tokens);
        }
    }
}


/* the scanner */

void
ngx_http_llmlimit_usage_init(ngx_http_llmlimit_usage_t *u)
{
    ngx_memzero(u, sizeof(ngx_http_llmlimit_usage_t));
}


/* an event ends: the tokenizer starts afresh, the fields read stay */

static void
ngx_http_llmlimit_usage_reset(ngx_http_llmlimit_usage_t *u)
{
    u->state = NGX_HTTP_LLMLIMIT_U_VALUE;
    u->depth = 0;
    u->usage_depth = 0;
    u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
    u->expect_key = 0;
    u->is_key = 0;
}


void
ngx_http_llmlimit_usage_feed(ngx_http_llmlimit_usage_t *u, u_char *p,
    u_char *last)
{
    u_char  ch, *eol;

    static u_char  sp[] = " ";

    if (u->mode == NGX_HTTP_LLMLIMIT_U_UNKNOWN) {

        while (p < last && (*p == ' ' || *p == '\t' || *p == '\r'
                            || *p == '\n'))
        {
            p++;
        }

        if (p == last) {
            return;
        }

        u->mode = (*p == '{' || *p == '[') ? NGX_HTTP_LLMLIMIT_U_JSON
                                           : NGX_HTTP_LLMLIMIT_U_SSE;
        u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
    }

    if (u->mode == NGX_HTTP_LLMLIMIT_U_JSON) {
        (void) ngx_http_llmlimit_usage_json(u, p, last);
        return;
    }

    /* server-sent events, line by line */

    while (p < last) {
        ch = *p;

        if (ch == '\n' && u->cr) {
            /* the "\n" of "\r\n" */
            u->cr = 0;
            p++;
            continue;
        }

        u->cr = 0;

        if (u->sse == NGX_HTTP_LLMLIMIT_U_DATA) {
            eol = p;

            while (eol < last && *eol != '\n' && *eol != '\r') {
                eol++;
            }

            p = ngx_http_llmlimit_usage_json(u, p, eol);

            if (p == last) {
                return;
            }

            /* the line ends: whitespace to JSON, a number ends */
            (void) ngx_http_llmlimit_usage_json(u, sp, sp + 1);
            u->sse = NGX_HTTP_LLMLIMIT_U_SKIP;
            continue;
        }

        if (ch == '\n' || ch == '\r') {
            if (u->sse == 0) {
                /* an empty line: the event ends */
                ngx_http_llmlimit_usage_reset(u);
            }

            u->cr = (ch == '\r');
            u->sse = 0;
            p++;
            continue;
        }

        if (u->sse < NGX_HTTP_LLMLIMIT_U_DATA) {
            u->sse = (ch == "data:"[u->sse]) ? u->sse + 1
                                             : NGX_HTTP_LLMLIMIT_U_SKIP;
        }

        p++;
    }
}


/* the tokenizer, up to last; returns last */

static u_char *
ngx_http_llmlimit_usage_json(ngx_http_llmlimit_usage_t *u, u_char *p,
    u_char *last)
{
    u_char  ch, *q, *e;

    while (p < last) {

        switch (u->state) {

        case NGX_HTTP_LLMLIMIT_U_STRING:

            if (u->key == 0) {
                /*
                 * a value, or a key of no interest: on to its closing
                 * quote or an escape before it, with memchr(), which reads
                 * a word or a vector at a time: most of a response is
                 * text in strings
                 */

                q = memchr(p, '"', last - p);
                e = memchr(p, '\\', (q ? q : last) - p);

                if (e != NULL) {
                    p = e;

                } else if (q != NULL) {
                    p = q;

                } else {
                    return last;
                }
            }

            ch = *p++;

            if (ch == '\\') {
                u->state = NGX_HTTP_LLMLIMIT_U_ESCAPE;
                u->key = 0;
                break;
            }

            if (ch == '"') {
                u->state = NGX_HTTP_LLMLIMIT_U_VALUE;

                if (u->is_key) {
                    ngx_http_llmlimit_usage_key(u);
                }

                break;
            }

            ngx_http_llmlimit_usage_token(u, ch);
            break;

        case NGX_HTTP_LLMLIMIT_U_ESCAPE:
            u->state = NGX_HTTP_LLMLIMIT_U_STRING;
            p++;
            break;

        case NGX_HTTP_LLMLIMIT_U_NUMBER:
            ch = *p;

            if (ch >= '0' && ch <= '9') {
                if (u->number < NGX_HTTP_LLMLIMIT_U_HUGE) {
                    u->number = u->number * 10 + (ch - '0');

                } else {
                    u->capped = 1;
                }

                p++;
                break;
            }

            if (ch == '.' || ch == 'e' || ch == 'E' || ch == '+'
                || ch == '-')
            {
                u->inexact = 1;
                p++;
                break;
            }

            ngx_http_llmlimit_usage_number(u);
            u->state = NGX_HTTP_LLMLIMIT_U_VALUE;
            break;

        case NGX_HTTP_LLMLIMIT_U_LITERAL:
            ch = *p;

            if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')) {
                p++;
                break;
            }

            u->state = NGX_HTTP_LLMLIMIT_U_VALUE;
            break;

        default: /* NGX_HTTP_LLMLIMIT_U_VALUE */
            ngx_http_llmlimit_usage_token(u, *p++);
            break;
        }
    }

    return last;
}


/* level d (1, 2, ...) is an object */

static ngx_inline ngx_uint_t
ngx_http_llmlimit_usage_in_object(ngx_http_llmlimit_usage_t *u)
{
    return u->depth && u->depth <= 64
           && (u->objects >> (u->depth - 1) & 1);
}


/*
 * A character in the VALUE state, or of a key being matched (STRING with
 * candidates left)
 */

static void
ngx_http_llmlimit_usage_token(ngx_http_llmlimit_usage_t *u, u_char ch)
{
    ngx_uint_t  i, bits;

    if (u->state == NGX_HTTP_LLMLIMIT_U_STRING) {

        /* the candidates that still match */

        for (i = 0, bits = u->key; bits; i++, bits >>= 1) {
            if ((bits & 1)
                && (u->keypos >= ngx_http_llmlimit_usage_keys[i].len
                    || ngx_http_llmlimit_usage_keys[i].data[u->keypos] != ch))
            {
                u->key &= ~(1 << i);
            }
        }

        u->keypos++;
        return;
    }

    switch (ch) {

    case ' ': case '\t': case '\r': case '\n':
        return;

    case '{':
    case '[':
        u->depth++;

        if (u->depth <= 64) {
            if (ch == '{') {
                u->objects |= 1ULL << (u->depth - 1);

            } else {
                u->objects &= ~(1ULL << (u->depth - 1));
            }
        }

        if (ch == '{' && u->pending == NGX_HTTP_LLMLIMIT_U_USAGE) {
            u->usage_depth = u->depth;
        }

        u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
        u->expect_key = (ch == '{');
        return;

    case '}':
    case ']':
        if (u->depth) {
            u->depth--;
        }

        if (u->usage_depth > u->depth) {
            u->usage_depth = 0;
        }

        u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
        u->expect_key = 0;
        return;

    case ':':
        u->expect_key = 0;
        return;

    case ',':
        u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
        u->expect_key = ngx_http_llmlimit_usage_in_object(u);
        return;

    case '"':
        u->state = NGX_HTTP_LLMLIMIT_U_STRING;
        u->is_key = u->expect_key && ngx_http_llmlimit_usage_in_object(u);
        u->keypos = 0;
        bits = 0;

        if (u->is_key) {
            if (u->depth <= 2) {
                bits |= 1 << NGX_HTTP_LLMLIMIT_U_USAGE;
            }

            if (u->depth == u->usage_depth) {
                bits |= NGX_HTTP_LLMLIMIT_U_FIELD_KEYS;
            }

        } else if (u->pending >= NGX_HTTP_LLMLIMIT_U_TOTAL
                   && u->pending < NGX_HTTP_LLMLIMIT_U_KEYS)
        {
            /* a field given as a string: "12" */
            u->bad = 1;
        }

        u->key = (uint16_t) bits;
        u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
        return;

    default:
        break;
    }

    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        u->state = NGX_HTTP_LLMLIMIT_U_NUMBER;
        u->negative = (ch == '-');
        u->inexact = 0;
        u->capped = 0;
        u->number = (ch == '-') ? 0 : (uint64_t) (ch - '0');
        return;
    }

    /* true, false, null, or what is not JSON: no value for a field */

    u->state = NGX_HTTP_LLMLIMIT_U_LITERAL;
    u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
}


static void
ngx_http_llmlimit_usage_key(ngx_http_llmlimit_usage_t *u)
{
    ngx_uint_t  i;

    u->pending = NGX_HTTP_LLMLIMIT_U_NONE;
    u->is_key = 0;

    for (i = 0; i < NGX_HTTP_LLMLIMIT_U_KEYS; i++) {
        if ((u->key & (1 << i))
            && u->keypos == ngx_http_llmlimit_usage_keys[i].len)
        {
            u->pending = (uint16_t) i;
            break;
        }
    }

    u->key = 0;
}


/* a number ends: the value of a usage field? */

static void
ngx_http_llmlimit_usage_number(ngx_http_llmlimit_usage_t *u)
{
    ngx_uint_t  f;

    f = u->pending;
    u->pending = NGX_HTTP_LLMLIMIT_U_NONE;

    if (f < NGX_HTTP_LLMLIMIT_U_TOTAL || f >= NGX_HTTP_LLMLIMIT_U_KEYS
        || u->depth != u->usage_depth)
    {
        return;
    }

    if (u->negative || u->inexact) {
        u->bad = 1;
        return;
    }

    if (u->capped || u->number > NGX_HTTP_LLMLIMIT_MAX_TOKENS) {
        u->bad = 1;
        u->huge = 1;
        return;
    }

    u->fields[f - 1] = u->number;
    u->seen |= 1 << f;
}


/*
 * The tokens used, by what was read so far: NGX_OK; NGX_DECLINED and
 * *why when there is no usage to read; NGX_ERROR and *why when a usage
 * field is unusable.
 */

ngx_int_t
ngx_http_llmlimit_usage_result(ngx_http_llmlimit_usage_t *u,
    ngx_uint_t *tokens, const char **why)
{
    uint64_t  n;

    if (u->bad) {
        *why = u->huge ? "a usage field is above 2147483647"
                       : "a usage field is not a non-negative integer";
        return NGX_ERROR;
    }

    if (u->unread) {
        *why = "a part of the body was not in memory";
        return NGX_DECLINED;
    }

    if (u->seen & (1 << NGX_HTTP_LLMLIMIT_U_TOTAL)) {
        n = u->fields[NGX_HTTP_LLMLIMIT_U_TOTAL - 1];

    } else if (u->seen & (1 << NGX_HTTP_LLMLIMIT_U_INPUT
                          | 1 << NGX_HTTP_LLMLIMIT_U_OUTPUT))
    {
        n = u->fields[NGX_HTTP_LLMLIMIT_U_INPUT - 1]
            + u->fields[NGX_HTTP_LLMLIMIT_U_OUTPUT - 1];

    } else if (u->seen & (1 << NGX_HTTP_LLMLIMIT_U_PROMPT
                          | 1 << NGX_HTTP_LLMLIMIT_U_COMPLETION))
    {
        n = u->fields[NGX_HTTP_LLMLIMIT_U_PROMPT - 1]
            + u->fields[NGX_HTTP_LLMLIMIT_U_COMPLETION - 1];

    } else {
        *why = "no usage found";
        return NGX_DECLINED;
    }

    /* two fields of at most 2^31 - 1 each */

    *tokens = (ngx_uint_t) ngx_min(n, NGX_HTTP_LLMLIMIT_MAX_TOKENS);

    return NGX_OK;
}
