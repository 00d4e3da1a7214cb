/*
 * Copyright (C) llmlimit developers
 *
 * The rule-line parser and the PATH matcher of src/ngx_http_llmlimit_rules.c:
 * the input is lines, "CATEGORY\nMETHODS\nPATH\nLIMITS...\nURI\nURI...",
 * as nginx's configuration parser would hand them over (LIMITS split on
 * spaces).  A rule that parses is compiled into the table's match block
 * and every URI is matched against its PATH (exact, pattern or regex), as
 * the request path does.  KEY is not parsed here: it is an nginx complex
 * value (variables of a whole http{} configuration), nginx's own code.
 *
 * rules.c is included, not linked, to reach its static functions.
 */

#include "fuzz.h"
#include "../../src/ngx_http_llmlimit_rules.c"


#define FUZZ_MAX_ARGS  16


static ngx_uint_t
fuzz_line(const uint8_t **p, size_t *n, ngx_str_t *s)
{
    const uint8_t  *nl;

    if (*n == 0) {
        return 0;
    }

    nl = memchr(*p, '\n', *n);
    s->data = (u_char *) *p;
    s->len = nl ? (size_t) (nl - *p) : *n;

    *p += s->len + (nl ? 1 : 0);
    *n -= s->len + (nl ? 1 : 0);

    return 1;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                      *copy, *p, *last;
    ngx_str_t                    line[4], *value, uri;
    ngx_int_t                   *idx;
    ngx_uint_t                   i;
    ngx_pool_t                  *pool;
    ngx_conf_t                   cf;
    ngx_array_t                  args;
    ngx_connection_t             c;
    ngx_conf_file_t              conf_file;
    ngx_http_request_t           r;
    ngx_http_complex_value_t     plan;
    ngx_http_llmlimit_rule_t    *rule;
    ngx_http_llmlimit_match_t   *m;
    ngx_http_llmlimit_table_t    table;

    fuzz_init();

    pool = ngx_create_pool(4096, &fuzz_log);
    if (pool == NULL) {
        return 0;
    }

    /* a copy the parser may keep pointers into, freed with the pool */
    copy = ngx_pnalloc(pool, size + 1);
    if (copy == NULL) {
        goto done;
    }

    ngx_memcpy(copy, data, size);
    data = copy;

    for (i = 0; i < 4; i++) {
        if (!fuzz_line(&data, &size, &line[i])) {
            goto done;
        }
    }

    ngx_memzero(&cf, sizeof(ngx_conf_t));
    ngx_memzero(&conf_file, sizeof(ngx_conf_file_t));
    ngx_memzero(&table, sizeof(table));
    ngx_memzero(&plan, sizeof(plan));

    ngx_str_set(&conf_file.file.name, "fuzz.conf");
    conf_file.line = 1;

    cf.pool = pool;
    cf.temp_pool = pool;
    cf.log = &fuzz_log;
    cf.cycle = &fuzz_cycle;
    cf.conf_file = &conf_file;

    if (ngx_array_init(&args, pool, FUZZ_MAX_ARGS, sizeof(ngx_str_t))
        != NGX_OK
        || ngx_array_init(&table.rules, pool, 1,
                          sizeof(ngx_http_llmlimit_rule_t))
           != NGX_OK)
    {
        goto done;
    }

    cf.args = &args;
    ngx_str_set(&table.name, "fuzz");
    table.plan = (line[0].len & 1) ? &plan : NULL;

    /* CATEGORY METHODS PATH KEY, then LIMITS split on spaces */

    value = ngx_array_push_n(&args, 4);
    if (value == NULL) {
        goto done;
    }

    value[0] = line[0];
    value[1] = line[1];
    value[2] = line[2];
    ngx_str_set(&value[3], "$fuzz");

    p = line[3].data;
    last = p + line[3].len;

    while (p < last && args.nelts < FUZZ_MAX_ARGS) {
        while (p < last && *p == ' ') {
            p++;
        }

        if (p == last) {
            break;
        }

        value = ngx_array_push(&args);
        if (value == NULL) {
            goto done;
        }

        value->data = p;

        while (p < last && *p != ' ') {
            p++;
        }

        value->len = p - value->data;
    }

    if (args.nelts < 5) {
        goto done;
    }

    rule = ngx_array_push(&table.rules);
    if (rule == NULL) {
        goto done;
    }

    ngx_memzero(rule, sizeof(ngx_http_llmlimit_rule_t));
    value = args.elts;

    if (ngx_http_llmlimit_parse_category(&cf, rule, &value[0]) != NGX_CONF_OK
        || ngx_http_llmlimit_parse_methods(&cf, rule, &value[1])
           != NGX_CONF_OK
        || ngx_http_llmlimit_parse_path(&cf, rule, &value[2]) != NGX_CONF_OK
        || ngx_http_llmlimit_parse_limits(&cf, &table, rule, &value[4],
                                          args.nelts - 4)
           != NGX_CONF_OK)
    {
        goto done;
    }

    /* KEY: one variable, as ngx_http_llmlimit_parse_key() leaves it */

    rule->key_vars = ngx_array_create(pool, 1, sizeof(ngx_int_t));
    if (rule->key_vars == NULL) {
        goto done;
    }

    idx = ngx_array_push(rule->key_vars);
    if (idx == NULL) {
        goto done;
    }

    *idx = 0;
    rule->key_single = 1;

    if (ngx_http_llmlimit_rules_compile(&cf, &table) != NGX_CONF_OK) {
        goto done;
    }

    ngx_memzero(&r, sizeof(ngx_http_request_t));
    ngx_memzero(&c, sizeof(ngx_connection_t));
    c.log = &fuzz_log;
    r.connection = &c;

    m = table.match;

    while (fuzz_line(&data, &size, &uri)) {
        r.uri = uri;

        switch (m->path_type) {

        case NGX_HTTP_LLMLIMIT_PATH_EXACT:
            (void) (uri.len == m->len
                    && ngx_memcmp(uri.data, m->data, m->len) == 0);
            break;

        case NGX_HTTP_LLMLIMIT_PATH_PATTERN:
            if (uri.len >= m->len) {
                (void) ngx_http_llmlimit_match_pattern(m->data, m->ntokens,
                                                       &uri);
            }
            break;

#if (NGX_PCRE)
        case NGX_HTTP_LLMLIMIT_PATH_REGEX:
            (void) ngx_http_llmlimit_regex_match(&r, &table, 0, m->data);
            break;
#endif
        }
    }

done:

    ngx_destroy_pool(pool);

    return 0;
}
