
/*
 * Copyright (C) llmlimit developers
 */


#ifndef _NGX_HTTP_LLMLIMIT_REDIS_ADDR_H_INCLUDED_
#define _NGX_HTTP_LLMLIMIT_REDIS_ADDR_H_INCLUDED_


#include "ngx_http_llmlimit.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>


/*
 * Where a zone's Redis connection goes (src/ngx_http_llmlimit_redis_addr.c):
 * redis=, its host name resolved on each connect, or the master Sentinel
 * names.  The connection (src/ngx_http_llmlimit_redis.c) asks with
 * ngx_http_llmlimit_redis_addr_find() before each connect and is answered,
 * at once or later, through ngx_http_llmlimit_redis_found().
 */

typedef struct ngx_http_llmlimit_redis_addr_s  ngx_http_llmlimit_redis_addr_t;

typedef struct {
    char                           *host;          /* numeric */
    char                           *path;          /* or a unix socket */
    int                             port;
    unsigned                        master:1;      /* to be checked: ROLE */
} ngx_http_llmlimit_redis_peer_t;


ngx_int_t ngx_http_llmlimit_redis_addr_option(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_addr_t **ap, ngx_str_t *value);
ngx_int_t ngx_http_llmlimit_redis_addr_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_addr_t *a, ngx_str_t *zone, ngx_str_t *label);
ngx_int_t ngx_http_llmlimit_redis_addr_postconf(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_addr_t *a);
void ngx_http_llmlimit_redis_addr_init_process(
    ngx_http_llmlimit_redis_addr_t *a, ngx_log_t *log, ngx_msec_t timeout,
    ngx_http_llmlimit_redis_t *owner);
void ngx_http_llmlimit_redis_addr_find(ngx_http_llmlimit_redis_addr_t *a);
void ngx_http_llmlimit_redis_addr_exit_process(
    ngx_http_llmlimit_redis_addr_t *a);


/* src/ngx_http_llmlimit_redis.c: the answers */

void ngx_http_llmlimit_redis_found(ngx_http_llmlimit_redis_t *redis,
    ngx_http_llmlimit_redis_peer_t *peer, const char *error);
void ngx_http_llmlimit_redis_moved(ngx_http_llmlimit_redis_t *redis,
    const char *reason);


/* src/ngx_http_llmlimit_redis.c: a hiredis context in nginx's event loop */

ngx_connection_t *ngx_http_llmlimit_redis_hook(redisAsyncContext *ac,
    ngx_log_t *log, ngx_event_handler_pt read, ngx_event_handler_pt write,
    void (*cleanup)(void *data));
const char *ngx_http_llmlimit_redis_reason(redisAsyncContext *ac);
void ngx_http_llmlimit_redis_unhook(redisAsyncContext *ac,
    ngx_connection_t *c);
void ngx_http_llmlimit_redis_read(ngx_event_t *rev,
    redisAsyncContext **owner);
void ngx_http_llmlimit_redis_write(ngx_event_t *wev,
    redisAsyncContext **owner);


#endif /* _NGX_HTTP_LLMLIMIT_REDIS_ADDR_H_INCLUDED_ */
