
/*
 * Copyright (C) llmlimit developers
 */


#include "ngx_http_llmlimit_usage.h"


ngx_int_t
ngx_http_llmlimit_usage_init_flush(ngx_cycle_t *cycle,
    ngx_http_llmlimit_usage_zone_t *uz)
{
    return NGX_OK;
}


ngx_int_t
ngx_http_llmlimit_usage_redis_query(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_zone_t *uz, ngx_http_llmlimit_usage_query_t *q)
{
    if (ngx_http_llmlimit_usage_collect(uz, q, 0) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_llmlimit_usage_answer(r, q);
}
