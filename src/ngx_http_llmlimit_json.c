
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The 429 body.  It is encoded once, at configuration time, with jansson
 * (so that category names are escaped properly and no request allocates
 * with malloc): everything up to the value of "retry_after", which the
 * request appends with "}}".
 */


#include "ngx_http_llmlimit.h"

#include <jansson.h>


static void ngx_http_llmlimit_json_period(u_char *buf, size_t size,
    ngx_msec_t period);


ngx_int_t
ngx_http_llmlimit_json_prefix(ngx_pool_t *pool, ngx_str_t *category,
    ngx_http_llmlimit_limit_t *limit)
{
    char        *text;
    size_t       len;
    u_char       period[NGX_INT64_LEN + 3];
    u_char       message[128];
    json_t      *body, *error, *value;
    ngx_int_t    rc;

    static u_char  tail[] = ",\"retry_after\":";

    ngx_http_llmlimit_json_period(period, sizeof(period), limit->period);

    ngx_sprintf(message, "Rate limit exceeded: %ui %s%s per %s%Z",
                limit->count, limit->tokens ? "token" : "request",
                limit->count == 1 ? "" : "s", period);

    if (limit->period % 1000 == 0) {
        value = json_integer((json_int_t) (limit->period / 1000));

    } else {
        value = json_real((double) limit->period / 1000);
    }

    error = json_object();
    body = json_object();

    if (value == NULL || error == NULL || body == NULL) {
        rc = NGX_ERROR;
        goto done;
    }

    if (json_object_set_new(error, "type",
                            json_string("rate_limit_exceeded")) != 0
        || json_object_set_new(error, "message",
                               json_string((char *) message)) != 0
        || json_object_set_new(error, "category",
                               json_stringn((char *) category->data,
                                            category->len)) != 0
        || json_object_set_new(error, "limit",
                               json_integer((json_int_t) limit->count)) != 0
        || json_object_set(error, "period", value) != 0
        || json_object_set(body, "error", error) != 0)
    {
        rc = NGX_ERROR;
        goto done;
    }

    text = json_dumps(body, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (text == NULL) {
        rc = NGX_ERROR;
        goto done;
    }

    /* drop the closing "}}" and open "retry_after" */

    len = ngx_strlen(text) - 2;

    limit->json.data = ngx_pnalloc(pool, len + sizeof(tail) - 1);
    if (limit->json.data == NULL) {
        free(text);
        rc = NGX_ERROR;
        goto done;
    }

    limit->json.len = ngx_cpymem(limit->json.data, text, len)
                      - limit->json.data;
    limit->json.len = ngx_cpymem(limit->json.data + len, tail,
                                 sizeof(tail) - 1)
                      - limit->json.data;

    free(text);
    rc = NGX_OK;

done:

    if (value) {
        json_decref(value);
    }

    if (error) {
        json_decref(error);
    }

    if (body) {
        json_decref(body);
    }

    return rc;
}


/* "10s", "3600s", "500ms" */

static void
ngx_http_llmlimit_json_period(u_char *buf, size_t size, ngx_msec_t period)
{
    if (period % 1000 == 0) {
        ngx_snprintf(buf, size, "%Ms%Z", (ngx_msec_t) (period / 1000));

    } else {
        ngx_snprintf(buf, size, "%Mms%Z", period);
    }
}
