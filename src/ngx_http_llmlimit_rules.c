
/*
 * Copyright (C) llmlimit developers
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_md5.h>

#include "ngx_http_llmlimit.h"


/*
 * A PATH pattern is compiled into a list of tokens: literal runs, "*"
 * (any run of characters, "/" included), "{uuid}" (one path segment
 * in 8-4-4-4-12 hex form) and "{name}" (one non-empty path segment).
 */

#define NGX_HTTP_LLMLIMIT_TOKEN_LITERAL   0
#define NGX_HTTP_LLMLIMIT_TOKEN_STAR      1
#define NGX_HTTP_LLMLIMIT_TOKEN_UUID      2
#define NGX_HTTP_LLMLIMIT_TOKEN_NAME      3

#define NGX_HTTP_LLMLIMIT_UUID_LEN        36

/* the longest PERIOD, in seconds: 365d */
#define NGX_HTTP_LLMLIMIT_MAX_PERIOD      (365 * 24 * 60 * 60)

/*
 * the largest COUNT: the Redis script multiplies counts by periods in
 * units below 2^24 in Lua doubles, exact below 2^53
 */
#define NGX_HTTP_LLMLIMIT_MAX_COUNT       ((1 << 29) - 1)

/*
 * A PATH regex runs on what the client sent, so its match is bounded:
 * PCRE2's defaults (10 000 000 backtracking steps) let one request hold a
 * worker for a long time with a catastrophic pattern such as "(a+)+$".
 * A match that runs out of these gives up: the rule does not match.
 */
#define NGX_HTTP_LLMLIMIT_REGEX_MATCH_LIMIT   100000
#define NGX_HTTP_LLMLIMIT_REGEX_DEPTH_LIMIT   10000
#define NGX_HTTP_LLMLIMIT_REGEX_HEAP_LIMIT    1024          /* KiB */

/* a regex that gave up is logged at most once a minute per worker */
#define NGX_HTTP_LLMLIMIT_REGEX_LOG_EVERY     60


typedef struct {
    ngx_uint_t                      type;
    size_t                          len;
    u_char                         *data;
} ngx_http_llmlimit_token_t;


typedef struct {
    ngx_str_t                       name;
    ngx_uint_t                      method;
} ngx_http_llmlimit_method_t;


static char *ngx_http_llmlimit_parse_category(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value);
static char *ngx_http_llmlimit_parse_methods(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value);
static char *ngx_http_llmlimit_parse_path(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value);
static char *ngx_http_llmlimit_parse_regex(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value);
static char *ngx_http_llmlimit_parse_pattern(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value);
static char *ngx_http_llmlimit_parse_key(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table, ngx_http_llmlimit_rule_t *rule,
    ngx_str_t *value);
static char *ngx_http_llmlimit_parse_limits(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table, ngx_http_llmlimit_rule_t *rule,
    ngx_str_t *value, ngx_uint_t n);
static char *ngx_http_llmlimit_parse_limit_list(ngx_conf_t *cf,
    ngx_str_t *spec, ngx_http_llmlimit_limits_t *limits);

static ngx_uint_t ngx_http_llmlimit_match_pattern(
    ngx_http_llmlimit_token_t *t, ngx_uint_t n, ngx_str_t *uri);
static ngx_uint_t ngx_http_llmlimit_is_uuid(u_char *p, size_t len);
#if (NGX_PCRE)
static ngx_int_t ngx_http_llmlimit_regex_match(ngx_http_request_t *r,
    ngx_http_llmlimit_table_t *table, ngx_uint_t i, ngx_regex_t *re);
#endif


static ngx_http_llmlimit_method_t  ngx_http_llmlimit_methods[] = {
    { ngx_string("GET"), NGX_HTTP_GET },
    { ngx_string("HEAD"), NGX_HTTP_HEAD },
    { ngx_string("POST"), NGX_HTTP_POST },
    { ngx_string("PUT"), NGX_HTTP_PUT },
    { ngx_string("DELETE"), NGX_HTTP_DELETE },
    { ngx_string("MKCOL"), NGX_HTTP_MKCOL },
    { ngx_string("COPY"), NGX_HTTP_COPY },
    { ngx_string("MOVE"), NGX_HTTP_MOVE },
    { ngx_string("OPTIONS"), NGX_HTTP_OPTIONS },
    { ngx_string("PROPFIND"), NGX_HTTP_PROPFIND },
    { ngx_string("PROPPATCH"), NGX_HTTP_PROPPATCH },
    { ngx_string("LOCK"), NGX_HTTP_LOCK },
    { ngx_string("UNLOCK"), NGX_HTTP_UNLOCK },
    { ngx_string("PATCH"), NGX_HTTP_PATCH },
    { ngx_string("TRACE"), NGX_HTTP_TRACE },
    { ngx_null_string, 0 }
};


ngx_int_t
ngx_http_llmlimit_rules_match(ngx_http_request_t *r,
    ngx_http_llmlimit_table_t *table, ngx_http_llmlimit_rule_t **rule,
    ngx_str_t *identity)
{
    ngx_uint_t                   i, k, n, method;
    ngx_http_llmlimit_rule_t    *rl;
    ngx_http_llmlimit_match_t   *m;
    ngx_http_variable_value_t   *vv;
    m = table->match;
    n = table->rules.nelts;
    method = r->method;

    for (i = 0; i < n; i++, m++) {

        if (m->methods && (m->methods & method) == 0) {
            continue;
        }

        switch (m->path_type) {

        case NGX_HTTP_LLMLIMIT_PATH_EXACT:

            if (r->uri.len != m->len
                || ngx_memcmp(r->uri.data, m->data, m->len) != 0)
            {
                continue;
            }

            break;

        case NGX_HTTP_LLMLIMIT_PATH_PATTERN:

            if (r->uri.len < m->len
                || !ngx_http_llmlimit_match_pattern(m->data, m->ntokens,
                                                    &r->uri))
            {
                continue;
            }

            break;

#if (NGX_PCRE)
        case NGX_HTTP_LLMLIMIT_PATH_REGEX:

            if (!ngx_http_llmlimit_regex_match(r, table, i, m->data)) {
                continue;
            }

            break;
#endif

        default: /* NGX_HTTP_LLMLIMIT_PATH_ANY */
            break;
        }

        /* the rule applies only if every variable of its KEY is non-empty */

        if (m->nvars == 0) {

            /* KEY is one variable: its value is the identity */

            vv = ngx_http_get_indexed_variable(r, m->var);

            if (vv == NULL || vv->not_found || vv->len == 0) {
                continue;
            }

            rl = (ngx_http_llmlimit_rule_t *) table->rules.elts + i;

            identity->len = vv->len;
            identity->data = vv->data;

        } else {

            for (k = 0; k < m->nvars; k++) {
                vv = ngx_http_get_indexed_variable(r, m->vars[k]);

                if (vv == NULL || vv->not_found || vv->len == 0) {
                    break;
                }
            }

            if (k < m->nvars) {
                continue;
            }

            rl = (ngx_http_llmlimit_rule_t *) table->rules.elts + i;

            if (ngx_http_complex_value(r, &rl->key, identity) != NGX_OK) {
                return NGX_ERROR;
            }
        }

        *rule = rl;

        return NGX_OK;
    }

    return NGX_DECLINED;
}


/*
 * The classic iterative glob match: segments between stars are matched
 * at their leftmost position and only the last star seen is backtracked.
 * This is exact here because every token consumes a length determined by
 * where it starts (a literal its length, "{name}" and "{uuid}" up to the
 * next "/"), and a later start never ends earlier.
 */

static ngx_uint_t
ngx_http_llmlimit_match_pattern(ngx_http_llmlimit_token_t *t, ngx_uint_t n,
    ngx_str_t *uri)
{
    u_char      *p, *q, *start, *end, *star_p;
    size_t       len;
    ngx_uint_t   i, star;

    start = uri->data;
    end = start + uri->len;

    p = start;
    i = 0;

    star = n;
    star_p = NULL;

    for ( ;; ) {

        if (i == n) {
            if (p == end) {
                return 1;
            }

            /* mismatch: fall through to backtracking */

        } else {

            switch (t[i].type) {

            case NGX_HTTP_LLMLIMIT_TOKEN_STAR:

                if (i + 1 == n) {
                    return 1;
                }

                if (i + 2 == n
                    && t[i + 1].type == NGX_HTTP_LLMLIMIT_TOKEN_LITERAL)
                {
                    /* a trailing literal can only match at the end */

                    len = t[i + 1].len;

                    if ((size_t) (end - p) < len) {
                        return 0;
                    }

                    return ngx_memcmp(end - len, t[i + 1].data, len) == 0;
                }

                star = i++;
                star_p = p;

                continue;

            case NGX_HTTP_LLMLIMIT_TOKEN_LITERAL:

                if ((size_t) (end - p) >= t[i].len
                    && ngx_memcmp(p, t[i].data, t[i].len) == 0)
                {
                    p += t[i].len;
                    i++;
                    continue;
                }

                break;

            default: /* NGX_HTTP_LLMLIMIT_TOKEN_UUID, _NAME */

                /* exactly one segment: after a "/", up to "/" or the end */

                if (p == start || p[-1] != '/') {
                    break;
                }

                for (q = p; q < end && *q != '/'; q++) { /* void */ }

                if (q == p) {
                    break;
                }

                if (t[i].type == NGX_HTTP_LLMLIMIT_TOKEN_UUID
                    && !ngx_http_llmlimit_is_uuid(p, q - p))
                {
                    break;
                }

                p = q;
                i++;

                continue;
            }
        }

        /* backtrack: let the last star absorb one more character */

        if (star == n || star_p == end) {
            return 0;
        }

        star_p++;

        if (t[star + 1].type == NGX_HTTP_LLMLIMIT_TOKEN_LITERAL) {

            /* skip to where the literal after the star can start */

            star_p = ngx_strlchr(star_p, end, t[star + 1].data[0]);

            if (star_p == NULL) {
                return 0;
            }
        }

        p = star_p;
        i = star + 1;
    }
}


/*
 * Packs the METHODS and PATH of every rule, with the pattern tokens and
 * the literals they point to, into one block: see ngx_http_llmlimit_match_t.
 */

char *
ngx_http_llmlimit_rules_compile(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table)
{
    u_char                     *p, *strings;
    size_t                      size, least;
    ngx_int_t                  *vars, *idx;
    ngx_uint_t                  i, j, n, ntokens, nvars;
    ngx_http_llmlimit_rule_t   *rule;
    ngx_http_llmlimit_match_t  *m;
    ngx_http_llmlimit_token_t  *t, *tokens;

    rule = table->rules.elts;
    n = table->rules.nelts;

    size = n * sizeof(ngx_http_llmlimit_match_t);
    ntokens = 0;
    nvars = 0;

    for (i = 0; i < n; i++) {

        nvars += rule[i].key_vars->nelts;

        switch (rule[i].path_type) {

        case NGX_HTTP_LLMLIMIT_PATH_EXACT:
            size += rule[i].path.len;
            break;

        case NGX_HTTP_LLMLIMIT_PATH_PATTERN:
            t = rule[i].path_tokens->elts;

            for (j = 0; j < rule[i].path_tokens->nelts; j++) {
                size += sizeof(ngx_http_llmlimit_token_t) + t[j].len;
            }

            ntokens += rule[i].path_tokens->nelts;
            break;
        }
    }

    size += nvars * sizeof(ngx_int_t);

    m = ngx_palloc(cf->pool, size);
    if (m == NULL) {
        return NGX_CONF_ERROR;
    }

    table->match = m;

    vars = (ngx_int_t *) (m + n);
    tokens = (ngx_http_llmlimit_token_t *) (vars + nvars);
    strings = (u_char *) (tokens + ntokens);

    for (i = 0; i < n; i++, m++) {

        m->methods = (uint32_t) rule[i].methods;
        m->path_type = (uint16_t) rule[i].path_type;
        m->ntokens = 0;
        m->len = 0;
        m->data = NULL;

        idx = rule[i].key_vars->elts;

        if (rule[i].key_single) {
            m->vars = NULL;
            m->nvars = 0;
            m->var = idx[0];

        } else {
            m->vars = vars;
            m->nvars = rule[i].key_vars->nelts;
            m->var = NGX_ERROR;

            ngx_memcpy(vars, idx, m->nvars * sizeof(ngx_int_t));
            vars += m->nvars;
        }

        switch (rule[i].path_type) {

        case NGX_HTTP_LLMLIMIT_PATH_EXACT:
            m->len = rule[i].path.len;
            m->data = strings;
            strings = ngx_cpymem(strings, rule[i].path.data,
                                 rule[i].path.len);
            break;

        case NGX_HTTP_LLMLIMIT_PATH_PATTERN:
            t = rule[i].path_tokens->elts;
            least = 0;

            m->ntokens = (uint16_t) rule[i].path_tokens->nelts;
            m->data = tokens;

            for (j = 0; j < rule[i].path_tokens->nelts; j++, tokens++) {
                *tokens = t[j];

                switch (t[j].type) {

                case NGX_HTTP_LLMLIMIT_TOKEN_LITERAL:
                    p = strings;
                    strings = ngx_cpymem(strings, t[j].data, t[j].len);
                    tokens->data = p;
                    least += t[j].len;
                    break;

                case NGX_HTTP_LLMLIMIT_TOKEN_UUID:
                    least += NGX_HTTP_LLMLIMIT_UUID_LEN;
                    break;

                case NGX_HTTP_LLMLIMIT_TOKEN_NAME:
                    least++;
                    break;
                }
            }

            /* no URI shorter than this can match */
            m->len = least;
            break;

#if (NGX_PCRE)
        case NGX_HTTP_LLMLIMIT_PATH_REGEX:
            m->data = rule[i].regex;
            break;
#endif
        }
    }

    return NGX_CONF_OK;
}


static ngx_uint_t
ngx_http_llmlimit_is_uuid(u_char *p, size_t len)
{
    u_char      c;
    ngx_uint_t  i;

    if (len != NGX_HTTP_LLMLIMIT_UUID_LEN) {
        return 0;
    }

    for (i = 0; i < NGX_HTTP_LLMLIMIT_UUID_LEN; i++) {
        c = p[i];

        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-') {
                return 0;
            }

            continue;
        }

        if (c >= '0' && c <= '9') {
            continue;
        }

        c |= 0x20;

        if (c < 'a' || c > 'f') {
            return 0;
        }
    }

    return 1;
}


ngx_http_llmlimit_limits_t *
ngx_http_llmlimit_rule_limits(ngx_http_llmlimit_rule_t *rule,
    ngx_str_t *plan)
{
    ngx_uint_t                   i;
    ngx_http_llmlimit_limits_t  *limits;

    if (plan == NULL || plan->len == 0 || rule->plans == NULL) {
        return &rule->deflt;
    }

    limits = rule->plans->elts;

    for (i = 0; i < rule->plans->nelts; i++) {
        if (limits[i].plan.len == plan->len
            && ngx_memcmp(limits[i].plan.data, plan->data, plan->len) == 0)
        {
            return &limits[i];
        }
    }

    return &rule->deflt;
}


/*
 * One line of an llmlimit_rules block:
 *
 *     CATEGORY METHODS PATH KEY LIMITS...;
 */

char *
ngx_http_llmlimit_rule_parse(ngx_conf_t *cf, ngx_http_llmlimit_table_t *table)
{
    ngx_str_t                 *value;
    ngx_http_llmlimit_rule_t  *rule;

    value = cf->args->elts;

    if (cf->args->nelts < 5) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number of parameters in llmlimit rule "
                           "\"%V\", expected "
                           "\"CATEGORY METHODS PATH KEY LIMITS\"",
                           &value[0]);
        return NGX_CONF_ERROR;
    }

    rule = ngx_array_push(&table->rules);
    if (rule == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(rule, sizeof(ngx_http_llmlimit_rule_t));

    if (ngx_http_llmlimit_parse_category(cf, rule, &value[0]) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_llmlimit_parse_methods(cf, rule, &value[1]) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_llmlimit_parse_path(cf, rule, &value[2]) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_llmlimit_parse_key(cf, table, rule, &value[3])
        != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    return ngx_http_llmlimit_parse_limits(cf, table, rule, &value[4],
                                          cf->args->nelts - 4);
}


/*
 * category_id, the IETF policy name: lower-cased, every run of
 * characters other than [a-z0-9] replaced by one "-", no "-" at either
 * end: "Run query (API)" -> "run-query-api".  A category without any
 * ASCII letter or digit gets "c" and 8 hex digits of its MD5.
 */

static char *
ngx_http_llmlimit_parse_category(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value)
{
    u_char      c, *p, digest[16];
    size_t      n;
    ngx_md5_t   md5;
    ngx_uint_t  i, dash;

    if (value->len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "empty category in llmlimit rule");
        return NGX_CONF_ERROR;
    }

    rule->category = *value;

    p = ngx_pnalloc(cf->pool, ngx_max(value->len, 9));
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    n = 0;
    dash = 0;

    for (i = 0; i < value->len; i++) {
        c = ngx_tolower(value->data[i]);

        if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
            if (dash && n) {
                p[n++] = '-';
            }

            dash = 0;
            p[n++] = c;

        } else {
            dash = 1;
        }
    }

    if (n == 0) {
        ngx_md5_init(&md5);
        ngx_md5_update(&md5, value->data, value->len);
        ngx_md5_final(digest, &md5);

        p[0] = 'c';
        n = ngx_hex_dump(&p[1], digest, 4) - p;
    }

    rule->category_id.len = n;
    rule->category_id.data = p;

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_parse_methods(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value)
{
    u_char                      *p, *q, *last;
    ngx_str_t                    name;
    ngx_http_llmlimit_method_t  *m;

    rule->methods = 0;

    if (value->len == 1 && value->data[0] == '*') {
        return NGX_CONF_OK;
    }

    p = value->data;
    last = p + value->len;

    for ( ;; ) {
        q = ngx_strlchr(p, last, '|');
        if (q == NULL) {
            q = last;
        }

        name.data = p;
        name.len = q - p;

        if (name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid methods \"%V\" in llmlimit rule",
                               value);
            return NGX_CONF_ERROR;
        }

        for (m = ngx_http_llmlimit_methods; m->name.len; m++) {
            if (m->name.len == name.len
                && ngx_strncmp(m->name.data, name.data, name.len) == 0)
            {
                break;
            }
        }

        if (m->name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid method \"%V\" in llmlimit rule",
                               &name);
            return NGX_CONF_ERROR;
        }

        rule->methods |= m->method;

        if (q == last) {
            break;
        }

        p = q + 1;
    }

    /* GET covers HEAD, as in limit_except: a HEAD is a GET without body */

    if (rule->methods & NGX_HTTP_GET) {
        rule->methods |= NGX_HTTP_HEAD;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_parse_path(ngx_conf_t *cf, ngx_http_llmlimit_rule_t *rule,
    ngx_str_t *value)
{
    u_char  *p, *last;

    rule->path = *value;

    if (value->len == 1 && value->data[0] == '*') {
        rule->path_type = NGX_HTTP_LLMLIMIT_PATH_ANY;
        return NGX_CONF_OK;
    }

    if (value->len && value->data[0] == '~') {
        rule->path_type = NGX_HTTP_LLMLIMIT_PATH_REGEX;
        return ngx_http_llmlimit_parse_regex(cf, rule, value);
    }

    if (value->len == 0 || (value->data[0] != '/' && value->data[0] != '*')) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid path \"%V\" in llmlimit rule, "
                           "it must start with \"/\", \"*\" or \"~\"",
                           value);
        return NGX_CONF_ERROR;
    }

    last = value->data + value->len;

    for (p = value->data; p < last; p++) {
        if (*p == '*' || *p == '{' || *p == '}') {
            rule->path_type = NGX_HTTP_LLMLIMIT_PATH_PATTERN;
            return ngx_http_llmlimit_parse_pattern(cf, rule, value);
        }
    }

    rule->path_type = NGX_HTTP_LLMLIMIT_PATH_EXACT;

    return NGX_CONF_OK;
}


#if (NGX_PCRE2)

/* the bounded match's context and data, per worker */
static pcre2_match_context  *ngx_http_llmlimit_regex_mc;
static pcre2_match_data     *ngx_http_llmlimit_regex_md;


static void
ngx_http_llmlimit_regex_cleanup(void *data)
{
    if (ngx_http_llmlimit_regex_mc) {
        pcre2_match_context_free(ngx_http_llmlimit_regex_mc);
        ngx_http_llmlimit_regex_mc = NULL;
    }

    if (ngx_http_llmlimit_regex_md) {
        pcre2_match_data_free(ngx_http_llmlimit_regex_md);
        ngx_http_llmlimit_regex_md = NULL;
    }
}

#endif


#if (NGX_PCRE)

/*
 * 1 if the rule's regex matches the URI.  A match that fails (PCRE2's
 * match, depth or heap limit above, or any other error) is no match: the
 * walk goes on to the next rule, and the failure is logged at most once a
 * minute per worker, with the number of failures since the last message.
 * The client never sees an error for it.
 */

static ngx_int_t
ngx_http_llmlimit_regex_match(ngx_http_request_t *r,
    ngx_http_llmlimit_table_t *table, ngx_uint_t i, ngx_regex_t *re)
{
    ngx_int_t                    rc;
    ngx_http_llmlimit_rule_t    *rl;

    static time_t                logged;
    static ngx_uint_t            failed;

#if (NGX_PCRE2)
    ngx_pool_cleanup_t          *cln;

    if (ngx_http_llmlimit_regex_mc == NULL) {

        /* once per worker, freed with its cycle */

        cln = ngx_pool_cleanup_add(ngx_cycle->pool, 0);
        if (cln == NULL) {
            rc = PCRE2_ERROR_NOMEMORY;
            goto failed;
        }

        cln->handler = ngx_http_llmlimit_regex_cleanup;

        ngx_http_llmlimit_regex_mc = pcre2_match_context_create(NULL);
        ngx_http_llmlimit_regex_md = pcre2_match_data_create(1, NULL);

        if (ngx_http_llmlimit_regex_mc == NULL
            || ngx_http_llmlimit_regex_md == NULL)
        {
            ngx_http_llmlimit_regex_cleanup(NULL);
            rc = PCRE2_ERROR_NOMEMORY;
            goto failed;
        }

        pcre2_set_match_limit(ngx_http_llmlimit_regex_mc,
                              NGX_HTTP_LLMLIMIT_REGEX_MATCH_LIMIT);
        pcre2_set_depth_limit(ngx_http_llmlimit_regex_mc,
                              NGX_HTTP_LLMLIMIT_REGEX_DEPTH_LIMIT);
        pcre2_set_heap_limit(ngx_http_llmlimit_regex_mc,
                             NGX_HTTP_LLMLIMIT_REGEX_HEAP_LIMIT);
    }

    rc = pcre2_match(re, r->uri.data, r->uri.len, 0, 0,
                     ngx_http_llmlimit_regex_md, ngx_http_llmlimit_regex_mc);

    if (rc == PCRE2_ERROR_NOMATCH) {
        return 0;
    }

#else

    rc = ngx_regex_exec(re, &r->uri, NULL, 0);

    if (rc == NGX_REGEX_NO_MATCHED) {
        return 0;
    }

#endif

    if (rc >= 0) {
        return 1;
    }

#if (NGX_PCRE2)
failed:
#endif

    failed++;

    if (ngx_time() - logged >= NGX_HTTP_LLMLIMIT_REGEX_LOG_EVERY) {
        rl = (ngx_http_llmlimit_rule_t *) table->rules.elts + i;

        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "llmlimit: regex \"%V\" gave up (" ngx_regex_exec_n
                      " failed: %i) on a URI of %uz bytes, the rule does "
                      "not match; %ui such failures in this worker since "
                      "the last message", &rl->path, rc, r->uri.len, failed);

        logged = ngx_time();
        failed = 0;
    }

    return 0;
}

#endif


static char *
ngx_http_llmlimit_parse_regex(ngx_conf_t *cf, ngx_http_llmlimit_rule_t *rule,
    ngx_str_t *value)
{
#if (NGX_PCRE)
    u_char               errstr[NGX_MAX_CONF_ERRSTR];
    ngx_regex_compile_t  rc;

    ngx_memzero(&rc, sizeof(ngx_regex_compile_t));

    rc.pattern.data = value->data + 1;
    rc.pattern.len = value->len - 1;

    if (rc.pattern.len && rc.pattern.data[0] == '*') {
        rc.options = NGX_REGEX_CASELESS;
        rc.pattern.data++;
        rc.pattern.len--;
    }

    if (rc.pattern.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "empty regex \"%V\" in llmlimit rule", value);
        return NGX_CONF_ERROR;
    }

    rc.pool = cf->pool;
    rc.err.len = NGX_MAX_CONF_ERRSTR;
    rc.err.data = errstr;

    if (ngx_regex_compile(&rc) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "regex \"%V\" does not compile: %V",
                           &rc.pattern, &rc.err);
        return NGX_CONF_ERROR;
    }

    rule->regex = rc.regex;

    return NGX_CONF_OK;

#else

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "using regex \"%V\" in llmlimit rule "
                       "requires PCRE library", value);
    return NGX_CONF_ERROR;

#endif
}


static char *
ngx_http_llmlimit_parse_pattern(ngx_conf_t *cf,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value)
{
    u_char                     *p, *q, *start, *last;
    ngx_uint_t                  type;
    ngx_http_llmlimit_token_t  *t, *prev;

    rule->path_tokens = ngx_array_create(cf->pool, 4,
                                         sizeof(ngx_http_llmlimit_token_t));
    if (rule->path_tokens == NULL) {
        return NGX_CONF_ERROR;
    }

    start = value->data;
    last = start + value->len;
    prev = NULL;

    for (p = start; p < last; /* void */ ) {

        if (*p == '*') {
            p++;

            if (prev && prev->type == NGX_HTTP_LLMLIMIT_TOKEN_STAR) {
                continue;
            }

            type = NGX_HTTP_LLMLIMIT_TOKEN_STAR;
            q = p;

        } else if (*p == '}') {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unbalanced \"}\" in path \"%V\"", value);
            return NGX_CONF_ERROR;

        } else if (*p == '{') {

            for (q = p + 1; q < last && *q != '}'; q++) {
                if (*q == '{') {
                    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                       "nested \"{\" in path \"%V\"", value);
                    return NGX_CONF_ERROR;
                }

                if (*q == '/' || *q == '*') {
                    break;
                }
            }

            if (q == last || *q != '}') {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "unbalanced \"{\" in path \"%V\"", value);
                return NGX_CONF_ERROR;
            }

            if (q == p + 1) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "empty \"{}\" in path \"%V\"", value);
                return NGX_CONF_ERROR;
            }

            /* a placeholder is a whole segment */

            if (p == start || (p[-1] != '/' && p[-1] != '*')
                || (q + 1 < last && q[1] != '/' && q[1] != '*'))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%*s\" is not a whole segment "
                                   "in path \"%V\"",
                                   q + 1 - p, p, value);
                return NGX_CONF_ERROR;
            }

            if (q - p - 1 == 4 && ngx_strncmp(p + 1, "uuid", 4) == 0) {
                type = NGX_HTTP_LLMLIMIT_TOKEN_UUID;

            } else {
                type = NGX_HTTP_LLMLIMIT_TOKEN_NAME;
            }

            p = q + 1;

        } else {
            for (q = p; q < last; q++) {
                if (*q == '*' || *q == '{' || *q == '}') {
                    break;
                }
            }

            type = NGX_HTTP_LLMLIMIT_TOKEN_LITERAL;
        }

        t = ngx_array_push(rule->path_tokens);
        if (t == NULL) {
            return NGX_CONF_ERROR;
        }

        t->type = type;

        if (type == NGX_HTTP_LLMLIMIT_TOKEN_LITERAL) {
            t->data = p;
            t->len = q - p;
            p = q;

        } else {
            t->data = NULL;
            t->len = 0;
        }

        prev = t;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_parse_key(ngx_conf_t *cf, ngx_http_llmlimit_table_t *table,
    ngx_http_llmlimit_rule_t *rule, ngx_str_t *value)
{
    u_char                            *p, *last;
    size_t                             len;
    ngx_int_t                          index, *idx;
    ngx_str_t                          name;
    ngx_uint_t                         i;
    ngx_http_compile_complex_value_t   ccv;

    static const uint64_t  zero[2] = { 0, 0 };

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = value;
    ccv.complex_value = &rule->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    rule->key_vars = ngx_array_create(cf->pool, 2, sizeof(ngx_int_t));
    if (rule->key_vars == NULL) {
        return NGX_CONF_ERROR;
    }

    /* the variables of KEY, each to be non-empty for the rule to apply */

    last = value->data + value->len;

    p = value->data;

    while (p < last) {

        if (*p++ != '$') {
            continue;
        }

        if (p < last && *p == '{') {
            name.data = ++p;

            while (p < last && *p != '}') {
                p++;
            }

            name.len = p - name.data;

            if (p < last) {
                p++;
            }

        } else {
            name.data = p;

            while (p < last
                   && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                       || (*p >= '0' && *p <= '9') || *p == '_'))
            {
                p++;
            }

            name.len = p - name.data;
        }

        if (name.len == 0 || (name.data[0] >= '0' && name.data[0] <= '9')) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid variable \"$%V\" in key \"%V\" "
                               "of llmlimit rule, regex captures "
                               "are not supported", &name, value);
            return NGX_CONF_ERROR;
        }

        index = ngx_http_get_variable_index(cf, &name);
        if (index == NGX_ERROR) {
            return NGX_CONF_ERROR;
        }

        idx = rule->key_vars->elts;

        for (i = 0; i < rule->key_vars->nelts; i++) {
            if (idx[i] == index) {
                break;
            }
        }

        if (i < rule->key_vars->nelts) {
            continue;
        }

        idx = ngx_array_push(rule->key_vars);
        if (idx == NULL) {
            return NGX_CONF_ERROR;
        }

        *idx = index;
    }

    if (rule->key_vars->nelts == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "key \"%V\" of llmlimit rule has no variables",
                           value);
        return NGX_CONF_ERROR;
    }

    /* "$name" or "${name}" alone */

    rule->key_single = (rule->key_vars->nelts == 1
                        && value->data[0] == '$'
                        && (value->len == name.len + 1
                            || (value->data[1] == '{'
                                && value->len == name.len + 3)));

    /* the budget: (table, category, KEY expression) */

    len = table->name.len + rule->category.len + value->len + 3;

    p = ngx_pnalloc(cf->temp_pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    last = ngx_cpymem(p, table->name.data, table->name.len);
    *last++ = '\0';
    last = ngx_cpymem(last, rule->category.data, rule->category.len);
    *last++ = '\0';
    last = ngx_cpymem(last, value->data, value->len);
    *last++ = '\0';

    ngx_http_llmlimit_hash(zero, p, len, rule->budget);

    return NGX_CONF_OK;
}


/*
 * LIMITS: "COUNT/PERIOD[,COUNT/PERIOD...]" or "unlimited", each optionally
 * prefixed by "PLAN="; exactly one token without a plan, the default.
 */

static char *
ngx_http_llmlimit_parse_limits(ngx_conf_t *cf,
    ngx_http_llmlimit_table_t *table, ngx_http_llmlimit_rule_t *rule,
    ngx_str_t *value, ngx_uint_t n)
{
    u_char                      *eq;
    ngx_str_t                    plan, spec;
    ngx_uint_t                   i, j, deflt;
    ngx_http_llmlimit_limits_t  *limits;

    deflt = 0;

    for (i = 0; i < n; i++) {

        eq = ngx_strlchr(value[i].data, value[i].data + value[i].len, '=');

        if (eq == NULL) {

            if (deflt) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate default limits \"%V\" "
                                   "in llmlimit rule", &value[i]);
                return NGX_CONF_ERROR;
            }

            deflt = 1;

            if (ngx_http_llmlimit_parse_limit_list(cf, &value[i],
                                                   &rule->deflt)
                != NGX_CONF_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (table->plan == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "per-plan limits \"%V\" need plan= "
                               "on llmlimit_rules \"%V\"",
                               &value[i], &table->name);
            return NGX_CONF_ERROR;
        }

        plan.data = value[i].data;
        plan.len = eq - value[i].data;

        spec.data = eq + 1;
        spec.len = value[i].data + value[i].len - spec.data;

        if (plan.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "empty plan name in limits \"%V\"",
                               &value[i]);
            return NGX_CONF_ERROR;
        }

        if (rule->plans == NULL) {
            rule->plans = ngx_array_create(cf->pool, n,
                                          sizeof(ngx_http_llmlimit_limits_t));
            if (rule->plans == NULL) {
                return NGX_CONF_ERROR;
            }
        }

        limits = rule->plans->elts;

        for (j = 0; j < rule->plans->nelts; j++) {
            if (limits[j].plan.len == plan.len
                && ngx_memcmp(limits[j].plan.data, plan.data, plan.len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate plan \"%V\" in llmlimit rule",
                                   &plan);
                return NGX_CONF_ERROR;
            }
        }

        limits = ngx_array_push(rule->plans);
        if (limits == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(limits, sizeof(ngx_http_llmlimit_limits_t));

        limits->plan = plan;

        if (ngx_http_llmlimit_parse_limit_list(cf, &spec, limits)
            != NGX_CONF_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (!deflt) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no default limits in llmlimit rule \"%V\": "
                           "add COUNT/PERIOD or \"unlimited\" without "
                           "a plan name for the other plans",
                           &rule->category);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llmlimit_parse_limit_list(ngx_conf_t *cf, ngx_str_t *spec,
    ngx_http_llmlimit_limits_t *limits)
{
    char                       *reason;
    u_char                     *p, *q, *d, *slash, *last, *digits;
    ngx_int_t                   count, period, tokens;
    ngx_str_t                   item, s;
    ngx_uint_t                  j;
    ngx_http_llmlimit_limit_t  *limit;

    limits->nlimits = 0;

    if (spec->len == 9 && ngx_strncmp(spec->data, "unlimited", 9) == 0) {
        return NGX_CONF_OK;
    }

    p = spec->data;
    last = p + spec->len;

    for ( ;; ) {
        q = ngx_strlchr(p, last, ',');
        if (q == NULL) {
            q = last;
        }

        item.data = p;
        item.len = q - p;

        if (item.len == 9 && ngx_strncmp(p, "unlimited", 9) == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"unlimited\" cannot be combined with "
                               "other limits in \"%V\"", spec);
            return NGX_CONF_ERROR;
        }

        slash = ngx_strlchr(p, q, '/');

        if (slash == NULL || slash == p || slash + 1 == q) {
            reason = "not COUNT/PERIOD";
            goto invalid;
        }

        /* "100000tokens/60s": a token budget */

        tokens = (slash - p > 6
                  && ngx_strncmp(slash - 6, "tokens", 6) == 0);

        digits = tokens ? slash - 6 : slash;

        if (digits == p) {
            reason = "COUNT is not a positive integer";
            goto invalid;
        }

        for (d = p; d < digits; d++) {
            if (*d < '0' || *d > '9') {
                reason = "COUNT is not a positive integer";
                goto invalid;
            }
        }

        /* NGX_ERROR here is an overflow */

        count = ngx_atoi(p, digits - p);

        if (count == NGX_ERROR || count == 0
            || count > (tokens ? NGX_HTTP_LLMLIMIT_MAX_TOKENS
                               : NGX_HTTP_LLMLIMIT_MAX_COUNT))
        {
            reason = tokens ? "token COUNT out of range"
                            : "COUNT out of range";
            goto invalid;
        }

        s.data = slash + 1;
        s.len = q - s.data;

        period = ngx_parse_time(&s, 0);

        if (period == NGX_ERROR) {
            reason = "PERIOD is not a time";
            goto invalid;
        }

        if (period <= 0
            || period / 1000 > NGX_HTTP_LLMLIMIT_MAX_PERIOD
            || (period / 1000 == NGX_HTTP_LLMLIMIT_MAX_PERIOD
                && period % 1000))
        {
            reason = "PERIOD out of range";
            goto invalid;
        }

        if (limits->nlimits == NGX_HTTP_LLMLIMIT_MAX_LIMITS) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "too many limits in \"%V\", at most %d",
                               spec, NGX_HTTP_LLMLIMIT_MAX_LIMITS);
            return NGX_CONF_ERROR;
        }

        for (j = 0; j < limits->nlimits; j++) {
            if (limits->limits[j].period == (ngx_msec_t) period
                && limits->limits[j].tokens == (ngx_uint_t) tokens)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate period in limit \"%V\" "
                                   "of \"%V\"", &item, spec);
                return NGX_CONF_ERROR;
            }
        }

        limit = &limits->limits[limits->nlimits++];

        limit->count = count;
        limit->period = (ngx_msec_t) period;
        limit->tokens = tokens;

        if (q == last) {
            return NGX_CONF_OK;
        }

        p = q + 1;
    }

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid limit \"%V\" in llmlimit rule, %s: "
                       "expected COUNT/PERIOD with COUNT from 1 to %d, "
                       "or COUNTtokens/PERIOD with COUNT from 1 to %d, "
                       "and PERIOD from 1ms to %dd, or \"unlimited\"",
                       &item, reason, NGX_HTTP_LLMLIMIT_MAX_COUNT,
                       NGX_HTTP_LLMLIMIT_MAX_TOKENS,
                       NGX_HTTP_LLMLIMIT_MAX_PERIOD / (24 * 60 * 60));

    return NGX_CONF_ERROR;
}
