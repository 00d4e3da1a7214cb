
/*
 * Copyright (C) llmlimit developers
 */


/*
 * Where a zone's Redis connection goes, asked before each (re)connect of
 * a worker and answered with a numeric address:
 *
 *   redis=IP:PORT, unix:PATH  at once;
 *   redis=NAME:PORT           NAME is resolved at configuration (the
 *                             system's way, /etc/hosts included); a name
 *                             of a loopback address is kept so; otherwise,
 *                             with a "resolver" in the http block, NAME is
 *                             resolved through it on every connect
 *                             (asynchronously; its cache keeps an answer
 *                             for its valid= time) and, when that fails,
 *                             the address of the configuration is used
 *                             (logged once); without a resolver, the name
 *                             is resolved once, as proxy_pass does, and a
 *                             warning says so (sentinels' names alike);
 *   redis_sentinel=, redis_master=
 *                             the sentinels are asked in turn, starting
 *                             with the last that answered, with
 *                             "SENTINEL get-master-addr-by-name" on a
 *                             connection of their own, each within the
 *                             connect time; the address named is connected
 *                             to, and the handshake checks with ROLE that
 *                             it is a master (otherwise the connection
 *                             fails, and the next connect asks again).
 *
 * With Sentinel, the sentinel that last answered is asked the same
 * question again every second (a question, not a subscription: its reply
 * is checked like the first, whatever a sentinel sends): when it names
 * another master, the zone's connection is dropped and made again at once,
 * asking again.
 * Whatever the configuration, any connection error leads to a new connect
 * and so to a new question.  Host names are never resolved with a
 * blocking call in a worker: hiredis is only given numeric addresses.
 */


#include "ngx_http_llmlimit_redis_addr.h"


#define NGX_HTTP_LLMLIMIT_REDIS_PORT        6379
#define NGX_HTTP_LLMLIMIT_SENTINEL_PORT     26379

/* a question to a sentinel gets at least this long, ms */
#define NGX_HTTP_LLMLIMIT_SENTINEL_TIMEOUT  1000

/* the sentinel is asked again whether the master moved every, ms */
#define NGX_HTTP_LLMLIMIT_SENTINEL_POLL     1000

/* the longest host name */
#define NGX_HTTP_LLMLIMIT_ADDR_NAME         256

/* what a worker is doing for the next connect */
#define NGX_HTTP_LLMLIMIT_ADDR_IDLE         0
#define NGX_HTTP_LLMLIMIT_ADDR_SENTINEL     1    /* resolving a sentinel */
#define NGX_HTTP_LLMLIMIT_ADDR_ASKING       2    /* asking it */
#define NGX_HTTP_LLMLIMIT_ADDR_MASTER       3    /* resolving the answer */

#define NGX_HTTP_LLMLIMIT_ADDR_IP           (NGX_SOCKADDR_STRLEN + 1)


typedef struct {
    ngx_str_t                       text;          /* as configured */
    ngx_str_t                       host;
    in_port_t                       port;
    unsigned                        name:1;        /* resolved when used */
    unsigned                        fell_back:1;   /* logged */
    u_char                          ip[NGX_HTTP_LLMLIMIT_ADDR_IP];
    u_char                          conf[NGX_HTTP_LLMLIMIT_ADDR_IP];
} ngx_http_llmlimit_redis_endpoint_t;


typedef struct {
    redisAsyncContext              *ac;
    ngx_http_llmlimit_redis_addr_t *addr;
    void                          (*gone)(ngx_http_llmlimit_redis_addr_t *a,
                                          const char *reason);
} ngx_http_llmlimit_redis_link_t;


struct ngx_http_llmlimit_redis_addr_s {
    /* configuration */
    ngx_http_llmlimit_redis_endpoint_t  redis;     /* redis= */
    char                               *path;      /* redis=unix: */
    ngx_array_t                        *sentinels; /* of endpoint_t */
    ngx_str_t                           master;    /* redis_master= */
    ngx_str_t                          *zone;
    ngx_str_t                           label;     /* for the logs */
    ngx_str_t                           file;      /* of llmlimit_zone */
    ngx_uint_t                          line;
    ngx_resolver_t                     *resolver;  /* NULL: none */
    ngx_msec_t                          resolver_timeout;

    /* per worker */
    ngx_http_llmlimit_redis_t          *owner;
    ngx_log_t                          *log;
    ngx_msec_t                          timeout;   /* of a question */
    ngx_uint_t                          step;
    ngx_resolver_ctx_t                 *rctx;
    ngx_uint_t                          current;   /* sentinel asked */
    ngx_uint_t                          tried;
    ngx_http_llmlimit_redis_link_t      ask;
    ngx_event_t                         timer;     /* question deadline */
    ngx_event_t                         poll;      /* has the master moved */
    int                                 port;      /* of the answer */
    u_char                              name[NGX_HTTP_LLMLIMIT_ADDR_NAME + 8];
    u_char                              ip[NGX_HTTP_LLMLIMIT_ADDR_IP];
    u_char                              last[NGX_HTTP_LLMLIMIT_ADDR_IP + 8];
    u_char                              named[NGX_HTTP_LLMLIMIT_ADDR_NAME + 8];
    u_char                              reason[160];
    unsigned                            checking:1;  /* the poll asks */
    unsigned                            exiting:1;
};


static ngx_int_t ngx_http_llmlimit_redis_addr_parse(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_endpoint_t *e, ngx_str_t *text,
    in_port_t port, ngx_str_t *value);
static ngx_uint_t ngx_http_llmlimit_redis_addr_numeric(u_char *p,
    size_t len);
static void ngx_http_llmlimit_redis_addr_ask(
    ngx_http_llmlimit_redis_addr_t *a);
static void ngx_http_llmlimit_redis_addr_send(
    ngx_http_llmlimit_redis_addr_t *a);
static void ngx_http_llmlimit_redis_addr_answer(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_llmlimit_redis_addr_next(
    ngx_http_llmlimit_redis_addr_t *a, const char *reason);
static void ngx_http_llmlimit_redis_addr_ask_gone(
    ngx_http_llmlimit_redis_addr_t *a, const char *reason);
static void ngx_http_llmlimit_redis_addr_expired(ngx_event_t *ev);
static void ngx_http_llmlimit_redis_addr_resolve(
    ngx_http_llmlimit_redis_addr_t *a, ngx_str_t *name, ngx_uint_t step);
static void ngx_http_llmlimit_redis_addr_resolved(ngx_resolver_ctx_t *ctx);
static void ngx_http_llmlimit_redis_addr_failed(
    ngx_http_llmlimit_redis_addr_t *a, const char *reason);
static void ngx_http_llmlimit_redis_addr_report(
    ngx_http_llmlimit_redis_addr_t *a);
static void ngx_http_llmlimit_redis_addr_schedule(
    ngx_http_llmlimit_redis_addr_t *a);
static void ngx_http_llmlimit_redis_addr_poll(ngx_event_t *ev);
static void ngx_http_llmlimit_redis_addr_checked(
    ngx_http_llmlimit_redis_addr_t *a, u_char *named, size_t len);
static ngx_int_t ngx_http_llmlimit_redis_addr_open(
    ngx_http_llmlimit_redis_addr_t *a, ngx_http_llmlimit_redis_link_t *link,
    u_char *ip, int port);
static void ngx_http_llmlimit_redis_addr_close(
    ngx_http_llmlimit_redis_link_t *link);
static void ngx_http_llmlimit_redis_addr_read(ngx_event_t *rev);
static void ngx_http_llmlimit_redis_addr_write(ngx_event_t *wev);
static void ngx_http_llmlimit_redis_addr_cleanup(void *data);


/* configuration */

ngx_int_t
ngx_http_llmlimit_redis_addr_option(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_addr_t **ap, ngx_str_t *value)
{
    u_char                              *p, *last;
    ngx_str_t                            s;
    ngx_http_llmlimit_redis_addr_t      *a;
    ngx_http_llmlimit_redis_endpoint_t  *e;

    if (ngx_strncmp(value->data, "redis=", 6) != 0
        && ngx_strncmp(value->data, "redis_sentinel=", 15) != 0
        && ngx_strncmp(value->data, "redis_master=", 13) != 0)
    {
        return NGX_DECLINED;
    }

    a = *ap;

    if (a == NULL) {
        a = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_redis_addr_t));
        if (a == NULL) {
            return NGX_ERROR;
        }

        *ap = a;
    }

    a->file = cf->conf_file->file.name;
    a->line = cf->conf_file->line;

    if (value->data[5] == '=') {

        if (a->redis.text.data || a->path) {
            goto duplicate;
        }

        s.data = value->data + 6;
        s.len = value->len - 6;

        if (s.len == 0) {
            goto invalid;
        }

        if (s.len > 5 && ngx_strncasecmp(s.data, (u_char *) "unix:", 5) == 0) {
            if (s.len - 5 >= sizeof(((struct sockaddr_un *) 0)->sun_path)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "unix socket path too long in \"%V\"",
                                   value);
                return NGX_ERROR;
            }

            a->path = ngx_pnalloc(cf->pool, s.len - 5 + 1);
            if (a->path == NULL) {
                return NGX_ERROR;
            }

            ngx_cpystrn((u_char *) a->path, s.data + 5, s.len - 5 + 1);
            a->label = s;

            return NGX_OK;
        }

        a->label = s;

        return ngx_http_llmlimit_redis_addr_parse(cf, &a->redis, &s,
                                                  NGX_HTTP_LLMLIMIT_REDIS_PORT,
                                                  value);
    }

    if (value->data[6] == 'm') {

        if (a->master.data) {
            goto duplicate;
        }

        a->master.data = value->data + 13;
        a->master.len = value->len - 13;

        if (a->master.len == 0) {
            goto invalid;
        }

        return NGX_OK;
    }

    /* redis_sentinel=ADDRESS,ADDRESS,... */

    if (a->sentinels) {
        goto duplicate;
    }

    a->sentinels = ngx_array_create(cf->pool, 3,
                                 sizeof(ngx_http_llmlimit_redis_endpoint_t));
    if (a->sentinels == NULL) {
        return NGX_ERROR;
    }

    p = value->data + 15;
    last = value->data + value->len;

    for ( ;; ) {
        s.data = p;

        while (p < last && *p != ',') {
            p++;
        }

        s.len = p - s.data;

        if (s.len == 0) {
            goto invalid;
        }

        e = ngx_array_push(a->sentinels);
        if (e == NULL) {
            return NGX_ERROR;
        }

        if (ngx_http_llmlimit_redis_addr_parse(cf, e, &s,
                                               NGX_HTTP_LLMLIMIT_SENTINEL_PORT,
                                               value)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        if (p == last) {
            return NGX_OK;
        }

        p++;
    }

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid value \"%V\"", value);
    return NGX_ERROR;

duplicate:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "duplicate parameter \"%V\"", value);
    return NGX_ERROR;
}


/* host:port, not resolved yet; an IP literal is kept in numeric form */

static ngx_int_t
ngx_http_llmlimit_redis_addr_parse(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_endpoint_t *e, ngx_str_t *text, in_port_t port,
    ngx_str_t *value)
{
    size_t      n;
    ngx_url_t   u;
    ngx_addr_t  addr;

    ngx_memzero(e, sizeof(ngx_http_llmlimit_redis_endpoint_t));
    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = *text;
    u.default_port = port;
    u.no_resolve = 1;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        if (u.err) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s in \"%V\"", u.err, value);
        }

        return NGX_ERROR;
    }

    if (u.family == AF_UNIX || u.uri.len || u.host.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid address \"%V\" in \"%V\"", text, value);
        return NGX_ERROR;
    }

    e->text = *text;
    e->host = u.host;
    e->port = u.port;

    if (u.host.data[0] == '[') {
        /* an IPv6 literal */
        u.host.data++;
        u.host.len -= 2;
    }

    if (ngx_parse_addr(cf->pool, &addr, u.host.data, u.host.len) != NGX_OK) {
        e->name = 1;
        return NGX_OK;
    }

    n = ngx_sock_ntop(addr.sockaddr, addr.socklen, e->ip,
                      NGX_SOCKADDR_STRLEN, 0);
    e->ip[n] = '\0';

    return NGX_OK;
}


ngx_int_t
ngx_http_llmlimit_redis_addr_conf_done(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_addr_t *a, ngx_str_t *zone, ngx_str_t *label)
{
    u_char  *p;

    if (a && a->master.data && a->sentinels == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_master=\" of zone \"%V\" "
                           "requires \"redis_sentinel=\"", zone);
        return NGX_ERROR;
    }

    if (a == NULL || (a->redis.text.data == NULL && a->path == NULL
                      && a->sentinels == NULL))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "redis parameters of zone \"%V\" "
                           "require \"redis=\" or \"redis_sentinel=\"", zone);
        return NGX_ERROR;
    }

    a->zone = zone;

    if (a->sentinels == NULL) {
        *label = a->label;
        return NGX_OK;
    }

    if (a->redis.text.data || a->path) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis=\" and \"redis_sentinel=\" of zone "
                           "\"%V\" exclude each other", zone);
        return NGX_ERROR;
    }

    if (a->master.data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_sentinel=\" of zone \"%V\" "
                           "requires \"redis_master=\"", zone);
        return NGX_ERROR;
    }

    p = ngx_pnalloc(cf->pool, sizeof("master ") - 1 + a->master.len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    a->label.data = p;
    a->label.len = ngx_sprintf(p, "master %V", &a->master) - p;

    *label = a->label;

    return NGX_OK;
}


/*
 * Once the http block is read, its "resolver" is known (it may follow
 * llmlimit_zone).  Host names are resolved now, the system's way: without
 * a resolver, once for all; with one, for when it fails (it does not read
 * /etc/hosts: "localhost" would not be found).
 */

ngx_int_t
ngx_http_llmlimit_redis_addr_postconf(ngx_conf_t *cf,
    ngx_http_llmlimit_redis_addr_t *a)
{
    size_t                               n;
    ngx_url_t                            u;
    ngx_uint_t                           i, nnames;
    ngx_http_core_loc_conf_t            *clcf;
    ngx_http_llmlimit_redis_endpoint_t  *e, *all;

    all = &a->redis;
    nnames = 1;

    if (a->sentinels) {
        all = a->sentinels->elts;
        nnames = a->sentinels->nelts;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->resolver && clcf->resolver->connections.nelts) {
        a->resolver = clcf->resolver;
        a->resolver_timeout = (clcf->resolver_timeout == NGX_CONF_UNSET_MSEC)
                              ? 30000 : clcf->resolver_timeout;
    }

    for (i = 0; i < nnames; i++) {
        e = &all[i];

        if (!e->name) {
            continue;
        }

        ngx_memzero(&u, sizeof(ngx_url_t));

        u.url = e->text;
        u.default_port = e->port;

        if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0) {

            if (a->resolver) {
                /* its resolver may know it */
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "%s in \"%V\" of llmlimit_zone \"%V\" in %V:%ui",
                          u.err ? u.err : "host not found", &e->text,
                          a->zone, &a->file, a->line);
            return NGX_ERROR;
        }

        n = ngx_sock_ntop(u.addrs[0].sockaddr, u.addrs[0].socklen, e->conf,
                          NGX_SOCKADDR_STRLEN, 0);
        e->conf[n] = '\0';

        ngx_memcpy(e->ip, e->conf, n + 1);

        if (a->resolver) {
            continue;
        }

        e->name = 0;

        if (e->host.len == 9
            && ngx_strncasecmp(e->host.data, (u_char *) "localhost", 9) == 0)
        {
            continue;
        }

        ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                      "llmlimit_zone \"%V\": \"%V\" is resolved once, now, "
                      "to %s: no \"resolver\" in the http block, in %V:%ui",
                      a->zone, &e->host, e->ip, &a->file, a->line);
    }

    return NGX_OK;
}


/* the worker */

void
ngx_http_llmlimit_redis_addr_init_process(ngx_http_llmlimit_redis_addr_t *a,
    ngx_log_t *log, ngx_msec_t timeout, ngx_http_llmlimit_redis_t *owner)
{
    a->owner = owner;
    a->log = log;
    a->timeout = ngx_max(10 * timeout, NGX_HTTP_LLMLIMIT_SENTINEL_TIMEOUT);
    a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;
    a->rctx = NULL;
    a->current = 0;
    a->exiting = 0;
    a->checking = 0;
    a->last[0] = '\0';
    a->named[0] = '\0';

    a->ask.ac = NULL;
    a->ask.addr = a;
    a->ask.gone = ngx_http_llmlimit_redis_addr_ask_gone;

    a->timer.handler = ngx_http_llmlimit_redis_addr_expired;
    a->timer.data = a;
    a->timer.log = log;
    a->timer.cancelable = 1;

    a->poll.handler = ngx_http_llmlimit_redis_addr_poll;
    a->poll.data = a;
    a->poll.log = log;
    a->poll.cancelable = 1;
}


/* where to connect now: ngx_http_llmlimit_redis_found() answers */

void
ngx_http_llmlimit_redis_addr_find(ngx_http_llmlimit_redis_addr_t *a)
{
    ngx_str_t                       name;
    ngx_http_llmlimit_redis_peer_t  peer;

    if (a->exiting) {
        return;
    }

    if (a->step != NGX_HTTP_LLMLIMIT_ADDR_IDLE) {

        if (a->checking) {
            /* the poll's question answers this connect, all sentinels */
            a->checking = 0;
            a->tried = 0;
        }

        return;
    }

    if (a->path) {
        peer.host = NULL;
        peer.path = a->path;
        peer.port = 0;
        peer.master = 0;

        ngx_http_llmlimit_redis_found(a->owner, &peer, NULL);
        return;
    }

    if (a->sentinels == NULL) {
        a->port = a->redis.port;

        if (!a->redis.name) {
            ngx_cpystrn(a->ip, a->redis.ip, NGX_HTTP_LLMLIMIT_ADDR_IP);
            ngx_http_llmlimit_redis_addr_report(a);
            return;
        }

        name = a->redis.host;
        ngx_http_llmlimit_redis_addr_resolve(a, &name,
                                             NGX_HTTP_LLMLIMIT_ADDR_MASTER);
        return;
    }

    a->tried = 0;
    ngx_http_llmlimit_redis_addr_ask(a);
}


void
ngx_http_llmlimit_redis_addr_exit_process(ngx_http_llmlimit_redis_addr_t *a)
{
    if (a->log == NULL) {
        return;
    }

    a->exiting = 1;

    if (a->timer.timer_set) {
        ngx_del_timer(&a->timer);
    }

    if (a->poll.timer_set) {
        ngx_del_timer(&a->poll);
    }

    if (a->rctx) {
        ngx_resolve_name_done(a->rctx);
        a->rctx = NULL;
    }

    ngx_http_llmlimit_redis_addr_close(&a->ask);
}


/* Sentinel: the sentinels in turn, until one names the master */

static void
ngx_http_llmlimit_redis_addr_ask(ngx_http_llmlimit_redis_addr_t *a)
{
    u_char                              *p;
    ngx_http_llmlimit_redis_endpoint_t  *e;

    if (a->exiting || ngx_exiting || ngx_quit || ngx_terminate) {
        a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;
        a->checking = 0;
        return;
    }

    if (a->tried == a->sentinels->nelts && a->checking) {
        /* no answer this time: the next sentinel is asked next time */
        a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;
        a->checking = 0;
        ngx_http_llmlimit_redis_addr_schedule(a);
        return;
    }

    if (a->tried == a->sentinels->nelts) {
        p = ngx_snprintf(a->name, sizeof(a->name) - 1,
                         "no sentinel named the master (last: %s)",
                         a->reason);
        *p = '\0';

        a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;
        ngx_http_llmlimit_redis_found(a->owner, NULL, (const char *) a->name);
        return;
    }

    e = a->sentinels->elts;
    e = &e[a->current];

    if (e->name) {
        ngx_http_llmlimit_redis_addr_resolve(a, &e->host,
                                             NGX_HTTP_LLMLIMIT_ADDR_SENTINEL);
        return;
    }

    ngx_http_llmlimit_redis_addr_send(a);
}


static void
ngx_http_llmlimit_redis_addr_send(ngx_http_llmlimit_redis_addr_t *a)
{
    size_t                               argvlen[3];
    const char                          *argv[3];
    ngx_http_llmlimit_redis_endpoint_t  *e;

    e = a->sentinels->elts;
    e = &e[a->current];

    a->step = NGX_HTTP_LLMLIMIT_ADDR_ASKING;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, a->log, 0,
                   "llmlimit sentinel %s:%d: where is \"%V\"",
                   e->ip, (int) e->port, &a->master);

    if (ngx_http_llmlimit_redis_addr_open(a, &a->ask, e->ip, e->port)
        != NGX_OK)
    {
        ngx_http_llmlimit_redis_addr_next(a, (const char *) a->reason);
        return;
    }

    argv[0] = "SENTINEL";
    argvlen[0] = 8;
    argv[1] = "get-master-addr-by-name";
    argvlen[1] = sizeof("get-master-addr-by-name") - 1;
    argv[2] = (const char *) a->master.data;
    argvlen[2] = a->master.len;

    if (redisAsyncCommandArgv(a->ask.ac, ngx_http_llmlimit_redis_addr_answer,
                              a, 3, argv, argvlen)
        != REDIS_OK)
    {
        ngx_http_llmlimit_redis_addr_next(a, "cannot send the question");
        return;
    }

    ngx_add_timer(&a->timer, a->timeout);
}


static void
ngx_http_llmlimit_redis_addr_answer(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_http_llmlimit_redis_addr_t *a = privdata;

    u_char                              *p;
    ngx_int_t                            port;
    ngx_str_t                            name;
    redisReply                          *rp, **el;
    ngx_http_llmlimit_redis_endpoint_t  *e;

    rp = reply;

    if (rp == NULL || a->ask.ac != ac) {
        /* the connection is freed: its cleanup reports */
        return;
    }

    if (a->timer.timer_set) {
        ngx_del_timer(&a->timer);
    }

    e = a->sentinels->elts;
    e = &e[a->current];
    el = rp->element;

    if (rp->type == REDIS_REPLY_NIL) {
        p = ngx_snprintf(a->reason, sizeof(a->reason) - 1,
                         "sentinel %V does not know \"%V\"",
                         &e->text, &a->master);
        *p = '\0';

        ngx_http_llmlimit_redis_addr_next(a, (const char *) a->reason);
        return;
    }

    if (rp->type != REDIS_REPLY_ARRAY || rp->elements != 2
        || el[0]->type != REDIS_REPLY_STRING
        || el[1]->type != REDIS_REPLY_STRING
        || el[0]->len == 0 || el[0]->len >= NGX_HTTP_LLMLIMIT_ADDR_NAME)
    {
        p = ngx_snprintf(a->reason, sizeof(a->reason) - 1,
                         "sentinel %V: unexpected reply", &e->text);
        *p = '\0';

        ngx_http_llmlimit_redis_addr_next(a, (const char *) a->reason);
        return;
    }

    port = ngx_atoi((u_char *) el[1]->str, el[1]->len);

    if (port < 1 || port > 65535) {
        p = ngx_snprintf(a->reason, sizeof(a->reason) - 1,
                         "sentinel %V: invalid port", &e->text);
        *p = '\0';

        ngx_http_llmlimit_redis_addr_next(a, (const char *) a->reason);
        return;
    }

    /* the question is answered: the connection goes (after this call) */

    ngx_http_llmlimit_redis_addr_close(&a->ask);

    p = ngx_snprintf(a->name, sizeof(a->name) - 1, "%*s:%i",
                     el[0]->len, el[0]->str, port);

    if (a->checking) {
        ngx_http_llmlimit_redis_addr_checked(a, a->name, p - a->name);
        return;
    }

    *p = '\0';
    ngx_cpystrn(a->named, a->name, sizeof(a->named));

    a->port = port;
    ngx_cpystrn(a->name, (u_char *) el[0]->str, el[0]->len + 1);

    if (!ngx_http_llmlimit_redis_addr_numeric(a->name, el[0]->len)) {
        /* a sentinel with "announce-hostnames yes" */
        name.data = a->name;
        name.len = el[0]->len;

        ngx_http_llmlimit_redis_addr_resolve(a, &name,
                                             NGX_HTTP_LLMLIMIT_ADDR_MASTER);
        return;
    }

    ngx_cpystrn(a->ip, a->name, NGX_HTTP_LLMLIMIT_ADDR_IP);
    ngx_http_llmlimit_redis_addr_report(a);
}


static ngx_uint_t
ngx_http_llmlimit_redis_addr_numeric(u_char *p, size_t len)
{
#if (NGX_HAVE_INET6)
    u_char  buf[16];

    if (ngx_inet6_addr(p, len, buf) == NGX_OK) {
        return 1;
    }
#endif

    return ngx_inet_addr(p, len) != INADDR_NONE;
}


/* this sentinel did not answer: the next one */

static void
ngx_http_llmlimit_redis_addr_next(ngx_http_llmlimit_redis_addr_t *a,
    const char *reason)
{
    if (reason != (const char *) a->reason) {
        ngx_cpystrn(a->reason, (u_char *) reason, sizeof(a->reason));
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, a->log, 0,
                   "llmlimit sentinel: %s", a->reason);

    if (a->timer.timer_set) {
        ngx_del_timer(&a->timer);
    }

    ngx_http_llmlimit_redis_addr_close(&a->ask);

    a->tried++;
    a->current = (a->current + 1) % a->sentinels->nelts;

    ngx_http_llmlimit_redis_addr_ask(a);
}


static void
ngx_http_llmlimit_redis_addr_ask_gone(ngx_http_llmlimit_redis_addr_t *a,
    const char *reason)
{
    u_char                              *p;
    ngx_http_llmlimit_redis_endpoint_t  *e;

    e = a->sentinels->elts;
    e = &e[a->current];

    p = ngx_snprintf(a->reason, sizeof(a->reason) - 1, "sentinel %V: %s",
                     &e->text, reason);
    *p = '\0';

    ngx_http_llmlimit_redis_addr_next(a, (const char *) a->reason);
}


static void
ngx_http_llmlimit_redis_addr_expired(ngx_event_t *ev)
{
    ngx_http_llmlimit_redis_addr_t *a = ev->data;

    ngx_http_llmlimit_redis_addr_ask_gone(a, "timed out");
}


/* host names, through nginx's resolver */

static void
ngx_http_llmlimit_redis_addr_resolve(ngx_http_llmlimit_redis_addr_t *a,
    ngx_str_t *name, ngx_uint_t step)
{
    ngx_resolver_ctx_t  *ctx;

    a->step = step;

    if (a->resolver == NULL) {
        ngx_http_llmlimit_redis_addr_failed(a, "a host name to resolve, "
                                            "but no \"resolver\"");
        return;
    }

    ctx = ngx_resolve_start(a->resolver, NULL);

    if (ctx == NULL || ctx == NGX_NO_RESOLVER) {
        ngx_http_llmlimit_redis_addr_failed(a, "cannot start resolving");
        return;
    }

    ctx->name = *name;
    ctx->handler = ngx_http_llmlimit_redis_addr_resolved;
    ctx->data = a;
    ctx->timeout = a->resolver_timeout;
    ctx->cancelable = 1;

    a->rctx = ctx;

    /* the handler may run before this returns */

    if (ngx_resolve_name(ctx) != NGX_OK) {
        a->rctx = NULL;
        ngx_http_llmlimit_redis_addr_failed(a, "cannot resolve");
    }
}


static void
ngx_http_llmlimit_redis_addr_resolved(ngx_resolver_ctx_t *ctx)
{
    ngx_http_llmlimit_redis_addr_t *a = ctx->data;

    u_char                              *p, *ip;
    ngx_http_llmlimit_redis_endpoint_t  *e;

    a->rctx = NULL;

    if (ctx->state || ctx->naddrs == 0) {
        p = ngx_snprintf(a->reason, sizeof(a->reason) - 1,
                         "\"%V\" could not be resolved (%i: %s)",
                         &ctx->name, ctx->state,
                         ngx_resolver_strerror(ctx->state));
        *p = '\0';

        ngx_resolve_name_done(ctx);
        ngx_http_llmlimit_redis_addr_failed(a, (const char *) a->reason);
        return;
    }

    if (a->step == NGX_HTTP_LLMLIMIT_ADDR_SENTINEL) {
        e = a->sentinels->elts;
        ip = e[a->current].ip;

    } else {
        ip = a->ip;
    }

    p = ip + ngx_sock_ntop(ctx->addrs[0].sockaddr, ctx->addrs[0].socklen, ip,
                           NGX_SOCKADDR_STRLEN, 0);
    *p = '\0';

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, a->log, 0,
                   "llmlimit redis: \"%V\" is %s", &ctx->name, ip);

    ngx_resolve_name_done(ctx);

    if (a->step == NGX_HTTP_LLMLIMIT_ADDR_SENTINEL) {
        ngx_http_llmlimit_redis_addr_send(a);
        return;
    }

    ngx_http_llmlimit_redis_addr_report(a);
}


/*
 * No address this time: a name the system resolved at configuration is
 * used as it was then; a sentinel's failure passes to the next one.
 */

static void
ngx_http_llmlimit_redis_addr_failed(ngx_http_llmlimit_redis_addr_t *a,
    const char *reason)
{
    ngx_http_llmlimit_redis_endpoint_t  *e;

    e = NULL;

    if (a->step == NGX_HTTP_LLMLIMIT_ADDR_SENTINEL) {
        e = a->sentinels->elts;
        e = &e[a->current];

    } else if (a->sentinels == NULL) {
        e = &a->redis;
    }

    if (e && e->conf[0]) {

        if (!e->fell_back) {
            e->fell_back = 1;

            ngx_log_error(NGX_LOG_WARN, a->log, 0,
                          "llmlimit zone \"%V\": %s; \"%V\" is %s, "
                          "as at configuration (logged once)",
                          a->zone, reason, &e->host, e->conf);
        }

        if (a->step == NGX_HTTP_LLMLIMIT_ADDR_SENTINEL) {
            ngx_cpystrn(e->ip, e->conf, NGX_HTTP_LLMLIMIT_ADDR_IP);
            ngx_http_llmlimit_redis_addr_send(a);
            return;
        }

        ngx_cpystrn(a->ip, e->conf, NGX_HTTP_LLMLIMIT_ADDR_IP);
        ngx_http_llmlimit_redis_addr_report(a);
        return;
    }

    if (a->step == NGX_HTTP_LLMLIMIT_ADDR_SENTINEL
        || a->step == NGX_HTTP_LLMLIMIT_ADDR_ASKING)
    {
        ngx_http_llmlimit_redis_addr_next(a, reason);
        return;
    }

    a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;

    ngx_http_llmlimit_redis_found(a->owner, NULL, reason);
}


/* a->ip, a->port: the answer; a change of address is logged once */

static void
ngx_http_llmlimit_redis_addr_report(ngx_http_llmlimit_redis_addr_t *a)
{
    u_char                          *p;
    u_char                           now[NGX_HTTP_LLMLIMIT_ADDR_IP + 8];
    ngx_http_llmlimit_redis_peer_t   peer;

    a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;

    p = ngx_snprintf(now, sizeof(now) - 1, "%s:%d", a->ip, a->port);
    *p = '\0';

    if (a->last[0] && ngx_strcmp(a->last, now) != 0) {
        ngx_log_error(NGX_LOG_NOTICE, a->log, 0,
                      "llmlimit zone \"%V\": redis %V is at %s now",
                      a->zone, &a->label, now);
    }

    ngx_cpystrn(a->last, now, sizeof(a->last));

    peer.host = (char *) a->ip;
    peer.path = NULL;
    peer.port = a->port;
    peer.master = (a->sentinels != NULL);

    ngx_http_llmlimit_redis_addr_schedule(a);
    ngx_http_llmlimit_redis_found(a->owner, &peer, NULL);
}


/*
 * Sentinel: the sentinel that answered last is asked again every second,
 * on a connection of its own that is closed with the answer; failing, the
 * next sentinel is asked the next time.
 */

static void
ngx_http_llmlimit_redis_addr_schedule(ngx_http_llmlimit_redis_addr_t *a)
{
    if (a->sentinels == NULL || a->poll.timer_set || a->exiting
        || ngx_exiting || ngx_quit || ngx_terminate)
    {
        return;
    }

    ngx_add_timer(&a->poll, NGX_HTTP_LLMLIMIT_SENTINEL_POLL);
}


static void
ngx_http_llmlimit_redis_addr_poll(ngx_event_t *ev)
{
    ngx_http_llmlimit_redis_addr_t *a = ev->data;

    if (a->step != NGX_HTTP_LLMLIMIT_ADDR_IDLE) {
        /* a connect asks: its answer schedules the next poll */
        return;
    }

    a->checking = 1;
    a->tried = a->sentinels->nelts - 1;

    ngx_http_llmlimit_redis_addr_ask(a);
}


/* the poll's answer, "NAME:PORT": another master is connected to */

static void
ngx_http_llmlimit_redis_addr_checked(ngx_http_llmlimit_redis_addr_t *a,
    u_char *named, size_t len)
{
    a->step = NGX_HTTP_LLMLIMIT_ADDR_IDLE;
    a->checking = 0;

    ngx_http_llmlimit_redis_addr_schedule(a);

    named[len] = '\0';

    if (ngx_strcmp(a->named, named) == 0) {
        return;
    }

    ngx_log_error(NGX_LOG_NOTICE, a->log, 0,
                  "llmlimit zone \"%V\": redis %V switched to %s",
                  a->zone, &a->label, named);

    ngx_cpystrn(a->named, named, sizeof(a->named));

    /* the connect that follows asks again: not logged twice */
    ngx_cpystrn(a->last, named, sizeof(a->last));

    ngx_http_llmlimit_redis_moved(a->owner, "master switched");
}


/* a connection to a sentinel, in nginx's event loop */

static ngx_int_t
ngx_http_llmlimit_redis_addr_open(ngx_http_llmlimit_redis_addr_t *a,
    ngx_http_llmlimit_redis_link_t *link, u_char *ip, int port)
{
    u_char             *p;
    redisAsyncContext  *ac;

    ac = redisAsyncConnect((const char *) ip, port);

    if (ac == NULL || ac->err) {
        p = ngx_snprintf(a->reason, sizeof(a->reason) - 1, "%s:%d: %s",
                         ip, port, ac ? ac->errstr : "cannot connect");
        *p = '\0';

        if (ac) {
            redisAsyncFree(ac);
        }

        return NGX_ERROR;
    }

    if (ngx_http_llmlimit_redis_hook(ac, a->log,
                                     ngx_http_llmlimit_redis_addr_read,
                                     ngx_http_llmlimit_redis_addr_write,
                                     ngx_http_llmlimit_redis_addr_cleanup)
        == NULL)
    {
        ngx_cpystrn(a->reason, (u_char *) "no free connection",
                    sizeof(a->reason));
        redisAsyncFree(ac);
        return NGX_ERROR;
    }

    ac->data = link;
    link->ac = ac;

    return NGX_OK;
}


/* inside a hiredis callback of the context, it is freed when it returns */

static void
ngx_http_llmlimit_redis_addr_close(ngx_http_llmlimit_redis_link_t *link)
{
    redisAsyncContext  *ac;

    ac = link->ac;

    if (ac == NULL) {
        return;
    }

    link->ac = NULL;
    redisAsyncFree(ac);
}


static void
ngx_http_llmlimit_redis_addr_read(ngx_event_t *rev)
{
    ngx_connection_t                *c;
    redisAsyncContext               *ac;
    ngx_http_llmlimit_redis_link_t  *link;

    c = rev->data;
    ac = c->data;
    link = ac->data;

    if (c->close) {
        /* worker_shutdown_timeout */
        link->addr->exiting = 1;
        ngx_http_llmlimit_redis_addr_close(link);
        return;
    }

    ngx_http_llmlimit_redis_read(rev, &link->ac);
}


static void
ngx_http_llmlimit_redis_addr_write(ngx_event_t *wev)
{
    ngx_connection_t                *c;
    redisAsyncContext               *ac;
    ngx_http_llmlimit_redis_link_t  *link;

    c = wev->data;
    ac = c->data;
    link = ac->data;

    ngx_http_llmlimit_redis_write(wev, &link->ac);
}


static void
ngx_http_llmlimit_redis_addr_cleanup(void *data)
{
    ngx_connection_t *c = data;

    u_char                           reason[128];
    redisAsyncContext               *ac;
    ngx_http_llmlimit_redis_link_t  *link;

    ac = c->data;
    link = ac->data;

    ngx_http_llmlimit_redis_unhook(ac, c);

    if (link->ac != ac) {
        /* closed on purpose */
        return;
    }

    link->ac = NULL;

    ngx_cpystrn(reason, (u_char *) ngx_http_llmlimit_redis_reason(ac),
                sizeof(reason));

    link->gone(link->addr, (const char *) reason);
}
