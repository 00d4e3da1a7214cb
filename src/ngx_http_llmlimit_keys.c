
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The key directory: who each API key belongs to (plan, organisation,
 * workspace, project, user), read from a JSON file, for the
 * $llmlimit_key_* variables.
 *
 * In shared memory a directory is one block of an arena: a header, an
 * open-addressing table of 32-bit entry numbers indexed by the SHA-256 of
 * the key, the entries (the digest and nine 32-bit references to its
 * strings) and the strings, each distinct string stored once.  The key
 * itself is never stored, only its digest.
 *
 * A lookup hashes the key, takes the zone's mutex, probes the table,
 * copies the entry's strings onto the stack and unlocks, then into the
 * request's pool: a directory freed by a later swap is never read.
 *
 * A new directory is built off to the side: the file is read and parsed
 * one key at a time (one json_loadb() per entry, so that jansson holds
 * one entry, not a million), indexed, and copied into a new block that
 * no reader can see yet.  It is then published with one pointer store
 * under the mutex, and the old block is freed.  At start the master
 * process parses the file while reading the configuration (so that
 * "nginx -t" fails on a bad file) and installs it when the zone is
 * created; later every worker checks the file's identity (device, inode,
 * size, mtime) every check=, and one of them at a time (a flag in the
 * zone) loads a changed file in a thread of a thread pool, so that its
 * event loop only posts the task and, at the end, swaps the pointer.
 * Without threads (thread_pool=off, or nginx built without them) the
 * load runs in slices of about a millisecond between events.  A file
 * that does not load is remembered in the zone by its identity, so that
 * its error is logged once, not at every check.
 */


#include "ngx_http_llmlimit.h"

#include <jansson.h>
#include <openssl/evp.h>


#define NGX_HTTP_LLMLIMIT_KEY_PLAN            0
#define NGX_HTTP_LLMLIMIT_KEY_ORG             1
#define NGX_HTTP_LLMLIMIT_KEY_WORKSPACE       2
#define NGX_HTTP_LLMLIMIT_KEY_WORKSPACE_NAME  3
#define NGX_HTTP_LLMLIMIT_KEY_PROJECT         4
#define NGX_HTTP_LLMLIMIT_KEY_PROJECT_NAME    5
#define NGX_HTTP_LLMLIMIT_KEY_USER            6
#define NGX_HTTP_LLMLIMIT_KEY_USER_EMAIL      7
#define NGX_HTTP_LLMLIMIT_KEY_SHORT           8
#define NGX_HTTP_LLMLIMIT_KEY_NFIELDS         9
#define NGX_HTTP_LLMLIMIT_KEY_VALID           NGX_HTTP_LLMLIMIT_KEY_NFIELDS

#define NGX_HTTP_LLMLIMIT_KEY_MAX_FIELD       255

#define NGX_HTTP_LLMLIMIT_KEYS_MAX_SIZE       (512 * 1024 * 1024)
#define NGX_HTTP_LLMLIMIT_KEYS_SLICE          256     /* entries */
#define NGX_HTTP_LLMLIMIT_KEYS_CHUNK          (4 * 1024 * 1024)
#define NGX_HTTP_LLMLIMIT_KEYS_INDEX_SLICE    16384   /* keys */
#define NGX_HTTP_LLMLIMIT_KEYS_BLOCKS         4

/* the phases of a load */
#define NGX_HTTP_LLMLIMIT_KEYS_READ           0
#define NGX_HTTP_LLMLIMIT_KEYS_PARSE          1
#define NGX_HTTP_LLMLIMIT_KEYS_INDEX          2
#define NGX_HTTP_LLMLIMIT_KEYS_COPY           3
#define NGX_HTTP_LLMLIMIT_KEYS_DONE           4


/* one key of a directory in shared memory: 68 bytes */
typedef struct {
    u_char                          digest[32];    /* SHA-256 of the key */
    uint32_t                        field[NGX_HTTP_LLMLIMIT_KEY_NFIELDS];
} ngx_http_llmlimit_key_t;


/* a directory in shared memory, at the start of its block */
typedef struct {
    size_t                          size;          /* of the block */
    ngx_uint_t                      nkeys;
    ngx_uint_t                      mask;          /* buckets - 1 */
    uint32_t                       *buckets;       /* key number + 1 */
    ngx_http_llmlimit_key_t        *keys;
    u_char                         *strings;       /* length byte, bytes */
} ngx_http_llmlimit_keys_table_t;


/* what identifies a version of the file; err: stat() failed with */
typedef struct {
    ngx_uint_t                      dev;
    ngx_uint_t                      ino;
    off_t                           size;
    time_t                          mtime;
    long                            mtime_nsec;
    ngx_err_t                       err;
} ngx_http_llmlimit_keys_stat_t;


/* a directory's block in the arena */
typedef struct {
    size_t                          off;
    size_t                          size;
} ngx_http_llmlimit_keys_block_t;


typedef struct {
    ngx_http_llmlimit_keys_table_t *table;         /* NULL: none yet */
    ngx_http_llmlimit_keys_stat_t   loaded;        /* the file of table */
    ngx_http_llmlimit_keys_stat_t   failed;        /* not loaded, logged */
    ngx_pid_t                       loader;        /* a worker loading */
    ngx_uint_t                      load_seq;      /* its load */
    void                           *pending;       /* its block */
    ngx_uint_t                      generation;
    time_t                          load_time;     /* of table */
    ngx_uint_t                      failures;      /* loads that failed */
    ngx_uint_t                      epoch;         /* of the configuration */

    u_char                         *arena;         /* for the blocks */
    size_t                          arena_size;
    ngx_uint_t                      nblocks;       /* in address order */
    ngx_http_llmlimit_keys_block_t  blocks[NGX_HTTP_LLMLIMIT_KEYS_BLOCKS];
} ngx_http_llmlimit_keys_shctx_t;


/* process memory that grows: mmap(), so that it goes back when freed */
typedef struct {
    u_char                         *data;
    size_t                          len;
    size_t                          size;
} ngx_http_llmlimit_keys_buf_t;


typedef struct ngx_http_llmlimit_keys_conf_s  ngx_http_llmlimit_keys_conf_t;


/* a load of the file, from reading it to the block in shared memory */
typedef struct {
    ngx_http_llmlimit_keys_conf_t  *conf;
    ngx_uint_t                      seq;           /* sh->load_seq; 0: the
                                                      master's, at start or
                                                      reload */
    ngx_uint_t                      phase;
    ngx_int_t                       rc;            /* NGX_OK, NGX_ERROR
                                                      (bad file), NGX_DECLINED
                                                      (try again), NGX_ABORT */
    ngx_http_llmlimit_keys_stat_t   stat;

    ngx_http_llmlimit_keys_buf_t    text;          /* the file */
    ngx_fd_t                        fd;
    size_t                          expect;        /* its size */
    unsigned                        opened:1;
    u_char                         *pos;
    u_char                         *last;
    ngx_uint_t                      line;
    ngx_uint_t                      state;
    ngx_uint_t                      entry_line;
    unsigned                        keys_seen:1;
    unsigned                        in_keys:1;

    ngx_http_llmlimit_keys_buf_t    keys;          /* key_t */
    ngx_http_llmlimit_keys_buf_t    lines;         /* uint32_t per key */
    ngx_http_llmlimit_keys_buf_t    strings;
    ngx_http_llmlimit_keys_buf_t    interned;      /* uint32_t offsets */
    ngx_uint_t                      nstrings;
    ngx_http_llmlimit_keys_buf_t    buckets;
    ngx_uint_t                      nkeys;
    ngx_uint_t                      indexed;
    ngx_uint_t                      mask;
    size_t                          size;          /* of the block */
    size_t                          copied;
    size_t                          peak;          /* process memory */

    ngx_http_llmlimit_keys_table_t *table;         /* the block */

    EVP_MD_CTX                     *md_ctx;
    EVP_MD                         *md;

    uint64_t                        time[4];       /* of each phase, us */
    uint64_t                        held[2];       /* the lock, us: to
                                                      allocate, to swap */
    ngx_uint_t                      err_line;      /* 0: not of a line */
    size_t                          err_len;
    u_char                          err[256];

#if (NGX_THREADS)
    ngx_thread_task_t               task;
#endif
    ngx_event_t                     event;         /* slices */
    ngx_connection_t                dumb;
} ngx_http_llmlimit_keys_build_t;


struct ngx_http_llmlimit_keys_conf_s {
    ngx_str_t                       file;          /* full name, '\0' */
    ngx_msec_t                      check;         /* 0: never */
    off_t                           max_size;
    size_t                          size;          /* of the zone */
#if (NGX_THREADS)
    ngx_thread_pool_t              *thread_pool;   /* NULL: slices */
#endif
    ngx_uint_t                      key_used;      /* llmlimit_key seen */
    ngx_str_t                       key_file;      /* where, for errors */
    ngx_uint_t                      key_line;

    ngx_shm_zone_t                 *shm_zone;
    ngx_slab_pool_t                *shpool;
    ngx_http_llmlimit_keys_shctx_t *sh;

    ngx_uint_t                      epoch;         /* sh->epoch of mine */
    ngx_http_llmlimit_keys_build_t *image;         /* read at start */
    ngx_http_llmlimit_keys_build_t *build;         /* a load under way */

    ngx_event_t                     timer;
    ngx_connection_t                dumb;
};


typedef struct {
    ngx_http_complex_value_t       *key;           /* NULL: none */
} ngx_http_llmlimit_keys_loc_conf_t;


/* the lookup of a request, kept for its variables */
typedef struct {
    ngx_str_t                       key;           /* looked up */
    ngx_uint_t                      found;
    ngx_str_t                       field[NGX_HTTP_LLMLIMIT_KEY_NFIELDS];
} ngx_http_llmlimit_keys_ctx_t;


static ngx_http_llmlimit_keys_ctx_t *ngx_http_llmlimit_keys_lookup(
    ngx_http_request_t *r);
static ngx_http_llmlimit_keys_ctx_t *ngx_http_llmlimit_keys_get_ctx(
    ngx_http_request_t *r);
static void ngx_http_llmlimit_keys_cleanup(void *data);
static ngx_int_t ngx_http_llmlimit_keys_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

static void ngx_http_llmlimit_keys_timer(ngx_event_t *ev);
static void ngx_http_llmlimit_keys_check(ngx_http_llmlimit_keys_conf_t *kcf);
static ngx_int_t ngx_http_llmlimit_keys_start(
    ngx_http_llmlimit_keys_conf_t *kcf, ngx_http_llmlimit_keys_stat_t *st,
    ngx_uint_t seq);
static ngx_uint_t ngx_http_llmlimit_keys_owner(
    ngx_http_llmlimit_keys_build_t *b);
#if (NGX_THREADS)
static void ngx_http_llmlimit_keys_thread(void *data, ngx_log_t *log);
static void ngx_http_llmlimit_keys_thread_done(ngx_event_t *ev);
#endif
static void ngx_http_llmlimit_keys_slice(ngx_event_t *ev);
static void ngx_http_llmlimit_keys_done(ngx_http_llmlimit_keys_build_t *b);
static void ngx_http_llmlimit_keys_publish(ngx_http_llmlimit_keys_conf_t *kcf,
    ngx_http_llmlimit_keys_build_t *b, ngx_log_t *log);

static ngx_http_llmlimit_keys_build_t *ngx_http_llmlimit_keys_build_create(
    ngx_http_llmlimit_keys_conf_t *kcf);
static void ngx_http_llmlimit_keys_build_free(
    ngx_http_llmlimit_keys_build_t *b);
static ngx_int_t ngx_http_llmlimit_keys_run(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t budget, ngx_uint_t until);
static ngx_int_t ngx_http_llmlimit_keys_read(
    ngx_http_llmlimit_keys_build_t *b, ngx_uint_t budget);
static ngx_int_t ngx_http_llmlimit_keys_parse(
    ngx_http_llmlimit_keys_build_t *b, ngx_uint_t budget);
static ngx_int_t ngx_http_llmlimit_keys_value(
    ngx_http_llmlimit_keys_build_t *b, json_t **value, size_t flags);
static ngx_int_t ngx_http_llmlimit_keys_add(ngx_http_llmlimit_keys_build_t *b,
    json_t *o);
static ngx_int_t ngx_http_llmlimit_keys_intern(
    ngx_http_llmlimit_keys_build_t *b, const u_char *s, size_t len,
    uint32_t *ref);
static ngx_int_t ngx_http_llmlimit_keys_index(
    ngx_http_llmlimit_keys_build_t *b, ngx_uint_t budget);
static ngx_int_t ngx_http_llmlimit_keys_alloc(
    ngx_http_llmlimit_keys_build_t *b);
static void *ngx_http_llmlimit_keys_arena_alloc(
    ngx_http_llmlimit_keys_shctx_t *sh, size_t size);
static void ngx_http_llmlimit_keys_arena_free(
    ngx_http_llmlimit_keys_shctx_t *sh, void *p);
static ngx_int_t ngx_http_llmlimit_keys_fill(
    ngx_http_llmlimit_keys_build_t *b, ngx_uint_t budget);
static ngx_int_t ngx_http_llmlimit_keys_error(
    ngx_http_llmlimit_keys_build_t *b, ngx_uint_t line, const char *fmt, ...);
static void ngx_http_llmlimit_keys_advance(ngx_http_llmlimit_keys_build_t *b,
    size_t n);

static ngx_int_t ngx_http_llmlimit_keys_buf_reserve(
    ngx_http_llmlimit_keys_buf_t *buf, size_t n);
static void ngx_http_llmlimit_keys_buf_free(ngx_http_llmlimit_keys_buf_t *buf);
static void ngx_http_llmlimit_keys_file_stat(ngx_file_info_t *fi,
    ngx_http_llmlimit_keys_stat_t *st);
static ngx_uint_t ngx_http_llmlimit_keys_same(ngx_http_llmlimit_keys_stat_t *a,
    ngx_http_llmlimit_keys_stat_t *b);
static ngx_int_t ngx_http_llmlimit_keys_digest(EVP_MD_CTX *ctx,
    const EVP_MD *md, u_char *data, size_t len, u_char *digest);
static EVP_MD *ngx_http_llmlimit_keys_md(void);
static void ngx_http_llmlimit_keys_md_free(EVP_MD *md);
static uint64_t ngx_http_llmlimit_keys_clock(void);

static ngx_int_t ngx_http_llmlimit_keys_add_variables(ngx_conf_t *cf);
static void *ngx_http_llmlimit_keys_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_llmlimit_keys_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llmlimit_keys_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static char *ngx_http_llmlimit_keys(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llmlimit_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static void ngx_http_llmlimit_keys_image_cleanup(void *data);
static ngx_int_t ngx_http_llmlimit_keys_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_llmlimit_keys_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_llmlimit_keys_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_llmlimit_keys_init_process(ngx_cycle_t *cycle);
static void ngx_http_llmlimit_keys_exit_process(ngx_cycle_t *cycle);


static ngx_command_t  ngx_http_llmlimit_keys_commands[] = {

    { ngx_string("llmlimit_keys"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_llmlimit_keys,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("llmlimit_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llmlimit_key,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llmlimit_keys_module_ctx = {
    ngx_http_llmlimit_keys_add_variables,  /* preconfiguration */
    ngx_http_llmlimit_keys_init,           /* postconfiguration */

    ngx_http_llmlimit_keys_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_llmlimit_keys_create_loc_conf, /* create location configuration */
    ngx_http_llmlimit_keys_merge_loc_conf  /* merge location configuration */
};


ngx_module_t  ngx_http_llmlimit_keys_module = {
    NGX_MODULE_V1,
    &ngx_http_llmlimit_keys_module_ctx,    /* module context */
    ngx_http_llmlimit_keys_commands,       /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_llmlimit_keys_init_module,    /* init module */
    ngx_http_llmlimit_keys_init_process,   /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_llmlimit_keys_exit_process,   /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* the fields of an entry, in the order of ngx_http_llmlimit_key_t */
static ngx_str_t  ngx_http_llmlimit_keys_fields[] = {
    ngx_string("plan"),
    ngx_string("org"),
    ngx_string("workspace"),
    ngx_string("workspace_name"),
    ngx_string("project"),
    ngx_string("project_name"),
    ngx_string("user"),
    ngx_string("user_email"),
    ngx_string("short_key")
};


static ngx_http_variable_t  ngx_http_llmlimit_keys_vars[] = {

    { ngx_string("llmlimit_key_valid"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_VALID,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_plan"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_PLAN,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_org"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_ORG,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_workspace"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_WORKSPACE,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_workspace_name"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_WORKSPACE_NAME,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_project"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_PROJECT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_project_name"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_PROJECT_NAME,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_user"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_USER,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_user_email"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_USER_EMAIL,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llmlimit_key_short"), NULL,
      ngx_http_llmlimit_keys_variable, NGX_HTTP_LLMLIMIT_KEY_SHORT,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


/* this worker's digest, for the lookups */
static EVP_MD_CTX                     *ngx_http_llmlimit_keys_md_ctx;
static EVP_MD                         *ngx_http_llmlimit_keys_sha256;

/* the lookup of a request without a key or without a directory */
static ngx_http_llmlimit_keys_ctx_t    ngx_http_llmlimit_keys_none;


/*
 * Looks up the request's llmlimit_key once: the result is kept in a
 * context of the main request, found again after an internal redirect
 * (which wipes module contexts) through its pool cleanup, as
 * ngx_http_realip_module does.  It is computed again only if the key's
 * value changed (a key set by auth_request, read before it answered; or
 * another llmlimit_key after a redirect).
 */

static ngx_http_llmlimit_keys_ctx_t *
ngx_http_llmlimit_keys_lookup(ngx_http_request_t *r)
{
    u_char                             *p, *last;
    size_t                              len;
    uint32_t                            h, n;
    ngx_str_t                           key;
    ngx_uint_t                          i, j;
    ngx_pool_cleanup_t                 *cln;
    ngx_http_llmlimit_key_t            *k;
    ngx_http_llmlimit_keys_ctx_t       *ctx;
    ngx_http_llmlimit_keys_conf_t      *kcf;
    ngx_http_llmlimit_keys_table_t     *table;
    ngx_http_llmlimit_keys_loc_conf_t  *klcf;
    u_char                              digest[EVP_MAX_MD_SIZE];
    u_char                              lens[NGX_HTTP_LLMLIMIT_KEY_NFIELDS];
    u_char                              buf[NGX_HTTP_LLMLIMIT_KEY_NFIELDS
                                            * NGX_HTTP_LLMLIMIT_KEY_MAX_FIELD];

    klcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_keys_module);
    kcf = ngx_http_get_module_main_conf(r, ngx_http_llmlimit_keys_module);

    if (klcf->key == NULL || kcf->sh == NULL
        || ngx_http_llmlimit_keys_md_ctx == NULL)
    {
        return &ngx_http_llmlimit_keys_none;
    }

    if (ngx_http_complex_value(r, klcf->key, &key) != NGX_OK) {
        return NULL;
    }

    ctx = ngx_http_llmlimit_keys_get_ctx(r->main);

    if (ctx && ctx->key.len == key.len
        && ngx_memcmp(ctx->key.data, key.data, key.len) == 0)
    {
        return ctx;
    }

    if (ctx == NULL) {
        cln = ngx_pool_cleanup_add(r->main->pool, 0);
        if (cln == NULL) {
            return NULL;
        }

        ctx = ngx_pcalloc(r->main->pool, sizeof(ngx_http_llmlimit_keys_ctx_t));
        if (ctx == NULL) {
            return NULL;
        }

        cln->handler = ngx_http_llmlimit_keys_cleanup;
        cln->data = ctx;

        ngx_http_set_ctx(r->main, ctx, ngx_http_llmlimit_keys_module);

    } else {
        ngx_memzero(ctx, sizeof(ngx_http_llmlimit_keys_ctx_t));
    }

    ctx->key = key;

    if (key.len == 0) {
        return ctx;
    }

    if (ngx_http_llmlimit_keys_digest(ngx_http_llmlimit_keys_md_ctx,
                                      ngx_http_llmlimit_keys_sha256,
                                      key.data, key.len, digest)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "llmlimit_keys: SHA-256 failed");
        return NULL;
    }

    ngx_memcpy(&h, digest, sizeof(uint32_t));

    ngx_shmtx_lock(&kcf->shpool->mutex);

    table = kcf->sh->table;
    k = NULL;

    if (table) {
        for (i = h & table->mask; /* void */ ; i = (i + 1) & table->mask) {
            n = table->buckets[i];

            if (n == 0) {
                break;
            }

            if (ngx_memcmp(table->keys[n - 1].digest, digest, 32) == 0) {
                k = &table->keys[n - 1];
                break;
            }
        }
    }

    if (k == NULL) {
        ngx_shmtx_unlock(&kcf->shpool->mutex);
        return ctx;
    }

    /* the strings (a length byte each, at most 255) onto the stack */

    last = buf;

    for (j = 0; j < NGX_HTTP_LLMLIMIT_KEY_NFIELDS; j++) {
        lens[j] = table->strings[k->field[j]];
        last = ngx_cpymem(last, &table->strings[k->field[j] + 1], lens[j]);
    }

    ngx_shmtx_unlock(&kcf->shpool->mutex);

    /* and into the request's pool, the lock released */

    len = last - buf;

    p = ngx_pnalloc(r->main->pool, len ? len : 1);
    if (p == NULL) {
        return NULL;
    }

    ngx_memcpy(p, buf, len);

    for (j = 0; j < NGX_HTTP_LLMLIMIT_KEY_NFIELDS; j++) {
        ctx->field[j].len = lens[j];
        ctx->field[j].data = p;
        p += lens[j];
    }

    ctx->found = 1;

    return ctx;
}


static ngx_http_llmlimit_keys_ctx_t *
ngx_http_llmlimit_keys_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t            *cln;
    ngx_http_llmlimit_keys_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llmlimit_keys_module);

    if (ctx || !(r->internal || r->filter_finalize)) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_llmlimit_keys_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_llmlimit_keys_module);
            return ctx;
        }
    }

    return NULL;
}


static void
ngx_http_llmlimit_keys_cleanup(void *data)
{
    /* only a marker to find the context again */
}


static ngx_int_t
ngx_http_llmlimit_keys_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_llmlimit_keys_ctx_t  *ctx;

    ctx = ngx_http_llmlimit_keys_lookup(r);
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (data == NGX_HTTP_LLMLIMIT_KEY_VALID) {
        v->len = ctx->found ? 1 : 0;
        v->data = (u_char *) "1";

    } else {
        v->len = ctx->field[data].len;
        v->data = v->len ? ctx->field[data].data : (u_char *) "";
    }

    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}


/*
 * The directory's fields of the request's key for other modules (usage
 * accounting), all in one lookup: in the order plan, org, workspace,
 * workspace_name, project, project_name, user, user_email, short_key;
 * empty for an unknown key.  NULL on error.
 */

ngx_str_t *
ngx_http_llmlimit_keys_request_fields(ngx_http_request_t *r)
{
    ngx_http_llmlimit_keys_ctx_t  *ctx;

    ctx = ngx_http_llmlimit_keys_lookup(r);

    return ctx ? ctx->field : NULL;
}


/* every check=, in every worker: has the file changed? */

static void
ngx_http_llmlimit_keys_timer(ngx_event_t *ev)
{
    ngx_connection_t               *c;
    ngx_http_llmlimit_keys_conf_t  *kcf;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    c = ev->data;
    kcf = c->data;

    if (kcf->build == NULL) {
        ngx_http_llmlimit_keys_check(kcf);
    }

    ngx_add_timer(ev, kcf->check);
}


static void
ngx_http_llmlimit_keys_check(ngx_http_llmlimit_keys_conf_t *kcf)
{
    ngx_err_t                        err;
    ngx_uint_t                       nkeys, seq;
    ngx_file_info_t                  fi;
    ngx_http_llmlimit_keys_stat_t    st;
    ngx_http_llmlimit_keys_shctx_t  *sh;

    sh = kcf->sh;

    ngx_memzero(&st, sizeof(ngx_http_llmlimit_keys_stat_t));

    if (ngx_file_info(kcf->file.data, &fi) == NGX_FILE_ERROR) {
        st.err = ngx_errno;

    } else {
        ngx_http_llmlimit_keys_file_stat(&fi, &st);
    }

    ngx_shmtx_lock(&kcf->shpool->mutex);

    if (kcf->epoch != sh->epoch) {
        /* a reload of nginx gave the zone to a newer configuration */
        ngx_shmtx_unlock(&kcf->shpool->mutex);
        return;
    }

    if (sh->loader) {

        /*
         * Another worker is loading: it is waited for as long as it lives,
         * however long its load takes (slices of a huge file with a coarse
         * timer_resolution, a stopped process), as it may write to its
         * block until it publishes.  Only a dead worker's load is taken
         * over, and its block freed.  This process has no load under way
         * (it checks only then): a flag with its own pid is that of a dead
         * worker whose pid came again.
         */

        if (sh->loader != ngx_pid
            && (kill(sh->loader, 0) == 0 || ngx_errno != NGX_ESRCH))
        {
            ngx_shmtx_unlock(&kcf->shpool->mutex);
            return;
        }

        /* the worker that was loading is gone */

        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "llmlimit_keys: process %P did not finish loading "
                      "\"%s\", taking over", sh->loader, kcf->file.data);

        if (sh->pending) {
            ngx_http_llmlimit_keys_arena_free(sh, sh->pending);
            sh->pending = NULL;
        }

        sh->loader = 0;
    }

    if (ngx_http_llmlimit_keys_same(&st, &sh->loaded)
        || ngx_http_llmlimit_keys_same(&st, &sh->failed))
    {
        ngx_shmtx_unlock(&kcf->shpool->mutex);
        return;
    }

    if (st.err) {
        sh->failed = st;
        sh->failures++;
        nkeys = sh->table ? sh->table->nkeys : 0;

        ngx_shmtx_unlock(&kcf->shpool->mutex);

        err = st.err;
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, err,
                      "llmlimit_keys: " ngx_file_info_n " \"%s\" failed, "
                      "keeping the directory of %ui keys",
                      kcf->file.data, nkeys);
        return;
    }

    sh->loader = ngx_pid;
    seq = ++sh->load_seq;

    ngx_shmtx_unlock(&kcf->shpool->mutex);

    if (ngx_http_llmlimit_keys_start(kcf, &st, seq) != NGX_OK) {
        ngx_shmtx_lock(&kcf->shpool->mutex);

        if (sh->loader == ngx_pid && sh->load_seq == seq) {
            sh->loader = 0;
        }

        ngx_shmtx_unlock(&kcf->shpool->mutex);
    }
}


static ngx_int_t
ngx_http_llmlimit_keys_start(ngx_http_llmlimit_keys_conf_t *kcf,
    ngx_http_llmlimit_keys_stat_t *st, ngx_uint_t seq)
{
    ngx_http_llmlimit_keys_build_t  *b;

    b = ngx_http_llmlimit_keys_build_create(kcf);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->seq = seq;

    /* what is remembered if the file cannot even be opened */
    b->stat = *st;

    kcf->build = b;

#if (NGX_THREADS)

    if (kcf->thread_pool) {
        b->task.ctx = b;
        b->task.handler = ngx_http_llmlimit_keys_thread;
        b->task.event.data = b;
        b->task.event.handler = ngx_http_llmlimit_keys_thread_done;
        b->task.event.log = ngx_cycle->log;

        if (ngx_thread_task_post(kcf->thread_pool, &b->task) != NGX_OK) {
            kcf->build = NULL;
            ngx_http_llmlimit_keys_build_free(b);
            return NGX_ERROR;
        }

        return NGX_OK;
    }

#endif

    b->dumb.fd = (ngx_socket_t) -1;
    b->dumb.data = b;

    b->event.data = &b->dumb;
    b->event.handler = ngx_http_llmlimit_keys_slice;
    b->event.log = ngx_cycle->log;
    b->event.cancelable = 1;

    ngx_post_event(&b->event, &ngx_posted_events);

    return NGX_OK;
}


#if (NGX_THREADS)

static void
ngx_http_llmlimit_keys_thread(void *data, ngx_log_t *log)
{
    ngx_http_llmlimit_keys_build_t  *b = data;

    (void) ngx_http_llmlimit_keys_run(b, 0, NGX_HTTP_LLMLIMIT_KEYS_DONE);
}


static void
ngx_http_llmlimit_keys_thread_done(ngx_event_t *ev)
{
    ngx_http_llmlimit_keys_done(ev->data);
}

#endif


/*
 * Without threads: a slice of the work a millisecond: 4 MB of the file
 * read or copied, NGX_HTTP_LLMLIMIT_KEYS_SLICE entries parsed, or
 * NGX_HTTP_LLMLIMIT_KEYS_INDEX_SLICE keys indexed.
 */

static void
ngx_http_llmlimit_keys_slice(ngx_event_t *ev)
{
    ngx_connection_t                *c;
    ngx_http_llmlimit_keys_build_t  *b;

    c = ev->data;
    b = c->data;

    if (ngx_http_llmlimit_keys_run(b, NGX_HTTP_LLMLIMIT_KEYS_SLICE,
                                   NGX_HTTP_LLMLIMIT_KEYS_DONE)
        == NGX_AGAIN)
    {
        ngx_add_timer(ev, 1);
        return;
    }

    ngx_http_llmlimit_keys_done(b);
}


static void
ngx_http_llmlimit_keys_done(ngx_http_llmlimit_keys_build_t *b)
{
    ngx_http_llmlimit_keys_conf_t  *kcf;

    kcf = b->conf;

    ngx_http_llmlimit_keys_publish(kcf, b, ngx_cycle->log);

    kcf->build = NULL;
    ngx_http_llmlimit_keys_build_free(b);
}


/*
 * Is the load still this process's?  A worker's load is, unless another
 * worker took it over (it found this process dead: its pid came again)
 * and freed its block; then nothing of it is touched any more.  Called
 * with the mutex held.
 */

static ngx_uint_t
ngx_http_llmlimit_keys_owner(ngx_http_llmlimit_keys_build_t *b)
{
    ngx_http_llmlimit_keys_shctx_t  *sh;

    sh = b->conf->sh;

    return b->seq == 0 || (sh->loader == ngx_pid && sh->load_seq == b->seq);
}


/*
 * The swap: the new directory is complete in shared memory; one pointer
 * store under the mutex publishes it, and the old one is freed under the
 * same lock, which every reader holds while it reads a directory.
 */

static void
ngx_http_llmlimit_keys_publish(ngx_http_llmlimit_keys_conf_t *kcf,
    ngx_http_llmlimit_keys_build_t *b, ngx_log_t *log)
{
    uint64_t                         start;
    ngx_uint_t                       nkeys;
    ngx_http_llmlimit_keys_shctx_t  *sh;
    ngx_http_llmlimit_keys_table_t  *old;

    sh = kcf->sh;
    old = NULL;

    ngx_shmtx_lock(&kcf->shpool->mutex);

    start = ngx_http_llmlimit_keys_clock();

    if (!ngx_http_llmlimit_keys_owner(b)) {
        /* taken over: the block was freed, and may be another's by now */
        b->rc = NGX_ABORT;
        b->table = NULL;

    } else if (b->rc == NGX_OK && kcf->epoch != sh->epoch) {
        /* loaded for a configuration that a reload of nginx replaced */
        b->rc = NGX_ABORT;
    }

    if (b->rc == NGX_OK) {
        old = sh->table;
        sh->table = b->table;
        sh->loaded = b->stat;
        ngx_memzero(&sh->failed, sizeof(ngx_http_llmlimit_keys_stat_t));
        sh->generation++;
        sh->load_time = ngx_time();

        if (old) {
            ngx_http_llmlimit_keys_arena_free(sh, old);
        }

    } else {

        if (b->table) {
            ngx_http_llmlimit_keys_arena_free(sh, b->table);
        }

        if (b->rc == NGX_ERROR) {
            sh->failed = b->stat;
            sh->failures++;
        }
    }

    if (b->seq && ngx_http_llmlimit_keys_owner(b)) {
        sh->pending = NULL;
        sh->loader = 0;
    }

    b->table = NULL;

    nkeys = sh->table ? sh->table->nkeys : 0;

    b->held[1] = ngx_http_llmlimit_keys_clock() - start;

    ngx_shmtx_unlock(&kcf->shpool->mutex);

    switch (b->rc) {

    case NGX_OK:
        ngx_log_error(NGX_LOG_NOTICE, log, 0,
                      "llmlimit_keys \"%s\": %ui keys loaded, %uz bytes "
                      "of shared memory (%uz of process memory at most), "
                      "in %uLms (read %uLms, parse %uLms, index %uLms, "
                      "copy %uLms), the lock held %uLus to allocate and "
                      "%uLus to swap",
                      kcf->file.data, b->nkeys, b->size, b->peak,
                      (b->time[0] + b->time[1] + b->time[2] + b->time[3])
                      / 1000,
                      b->time[0] / 1000, b->time[1] / 1000,
                      b->time[2] / 1000, b->time[3] / 1000,
                      b->held[0], b->held[1]);
        break;

    case NGX_ERROR:
        if (b->err_line) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llmlimit_keys \"%s\", line %ui: %*s; keeping the "
                          "directory of %ui keys", kcf->file.data,
                          b->err_line, b->err_len, b->err, nkeys);
        } else {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llmlimit_keys \"%s\": %*s; keeping the "
                          "directory of %ui keys", kcf->file.data,
                          b->err_len, b->err, nkeys);
        }

        break;

    case NGX_DECLINED:
        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "llmlimit_keys \"%s\": %*s, trying again",
                      kcf->file.data, b->err_len, b->err);
        break;

    default: /* NGX_ABORT */
        break;
    }
}


static ngx_http_llmlimit_keys_build_t *
ngx_http_llmlimit_keys_build_create(ngx_http_llmlimit_keys_conf_t *kcf)
{
    ngx_http_llmlimit_keys_build_t  *b;

    b = ngx_calloc(sizeof(ngx_http_llmlimit_keys_build_t), ngx_cycle->log);
    if (b == NULL) {
        return NULL;
    }

    b->conf = kcf;
    b->line = 1;

    b->md_ctx = EVP_MD_CTX_new();
    b->md = ngx_http_llmlimit_keys_md();

    if (b->md_ctx == NULL || b->md == NULL) {
        ngx_log_error(NGX_LOG_EMERG, ngx_cycle->log, 0,
                      "llmlimit_keys: no SHA-256 in OpenSSL");
        ngx_http_llmlimit_keys_build_free(b);
        return NULL;
    }

    return b;
}


static void
ngx_http_llmlimit_keys_build_free(ngx_http_llmlimit_keys_build_t *b)
{
    if (b->opened) {
        (void) ngx_close_file(b->fd);
    }

    ngx_http_llmlimit_keys_buf_free(&b->text);
    ngx_http_llmlimit_keys_buf_free(&b->keys);
    ngx_http_llmlimit_keys_buf_free(&b->lines);
    ngx_http_llmlimit_keys_buf_free(&b->strings);
    ngx_http_llmlimit_keys_buf_free(&b->interned);
    ngx_http_llmlimit_keys_buf_free(&b->buckets);

    if (b->md_ctx) {
        EVP_MD_CTX_free(b->md_ctx);
    }

    if (b->md) {
        ngx_http_llmlimit_keys_md_free(b->md);
    }

    if (b->event.timer_set) {
        ngx_del_timer(&b->event);
    }

    if (b->event.posted) {
        ngx_delete_posted_event(&b->event);
    }

    ngx_free(b);
}


/*
 * Runs the phases of a load up to "until".  With a budget (slices), each
 * call does a bounded part of one phase (so many entries parsed, a chunk
 * read or copied, a slice of keys indexed) and returns NGX_AGAIN until
 * the load is done; without (0), everything.  Returns b->rc otherwise.
 */

static ngx_int_t
ngx_http_llmlimit_keys_run(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t budget, ngx_uint_t until)
{
    uint64_t    start;
    ngx_int_t   rc;

    while (b->phase < until) {

        start = ngx_http_llmlimit_keys_clock();

        switch (b->phase) {

        case NGX_HTTP_LLMLIMIT_KEYS_READ:
            rc = ngx_http_llmlimit_keys_read(b, budget);
            break;

        case NGX_HTTP_LLMLIMIT_KEYS_PARSE:
            rc = ngx_http_llmlimit_keys_parse(b, budget);
            break;

        case NGX_HTTP_LLMLIMIT_KEYS_INDEX:
            rc = ngx_http_llmlimit_keys_index(b, budget);
            break;

        default: /* NGX_HTTP_LLMLIMIT_KEYS_COPY */
            rc = NGX_OK;

            if (b->table == NULL) {
                rc = ngx_http_llmlimit_keys_alloc(b);
            }

            if (rc == NGX_OK) {
                rc = ngx_http_llmlimit_keys_fill(b, budget);
            }

            break;
        }

        b->time[b->phase] += ngx_http_llmlimit_keys_clock() - start;

        if (rc == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        if (rc != NGX_OK) {
            b->rc = rc;
            b->phase = NGX_HTTP_LLMLIMIT_KEYS_DONE;
            return rc;
        }

        b->phase++;

        if (budget && b->phase < until) {
            /* one phase a slice */
            return NGX_AGAIN;
        }
    }

    b->rc = NGX_OK;

    return NGX_OK;
}


/*
 * Reads the file whole into process memory.  A file that changes while
 * it is read is read again at the next check: replace it with rename()
 * to avoid that.
 */

static ngx_int_t
ngx_http_llmlimit_keys_read(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t budget)
{
    u_char                         *name, *p;
    off_t                           size;
    size_t                          chunk;
    ssize_t                         n;
    ngx_err_t                       err;
    ngx_int_t                       rc;
    ngx_file_info_t                 fi;
    ngx_http_llmlimit_keys_stat_t   st;
    u_char                          errstr[NGX_MAX_ERROR_STR];

    if (!b->opened) {
        name = b->conf->file.data;

        b->fd = ngx_open_file(name, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);

        if (b->fd == NGX_INVALID_FILE) {
            err = ngx_errno;
            p = ngx_strerror(err, errstr, sizeof(errstr));
            return ngx_http_llmlimit_keys_error(b, 0, ngx_open_file_n
                                                " failed (%d: %*s)", err,
                                                p - errstr, errstr);
        }

        b->opened = 1;

        if (ngx_fd_info(b->fd, &fi) == NGX_FILE_ERROR) {
            err = ngx_errno;
            p = ngx_strerror(err, errstr, sizeof(errstr));
            rc = ngx_http_llmlimit_keys_error(b, 0, ngx_fd_info_n
                                              " failed (%d: %*s)", err,
                                              p - errstr, errstr);
            goto done;
        }

        ngx_http_llmlimit_keys_file_stat(&fi, &b->stat);

        if (!ngx_is_file(&fi)) {
            rc = ngx_http_llmlimit_keys_error(b, 0, "not a regular file");
            goto done;
        }

        size = ngx_file_size(&fi);

        if (size > b->conf->max_size) {
            rc = ngx_http_llmlimit_keys_error(b, 0, "the file is %O bytes, "
                                              "more than max_size=%O", size,
                                              b->conf->max_size);
            goto done;
        }

        b->expect = (size_t) size;

        if (ngx_http_llmlimit_keys_buf_reserve(&b->text, b->expect + 1)
            != NGX_OK)
        {
            rc = ngx_http_llmlimit_keys_error(b, 0, "out of memory");
            goto done;
        }
    }

    while (b->text.len < b->expect) {
        chunk = b->expect - b->text.len;

        if (budget && chunk > NGX_HTTP_LLMLIMIT_KEYS_CHUNK) {
            chunk = NGX_HTTP_LLMLIMIT_KEYS_CHUNK;
        }

        n = read(b->fd, b->text.data + b->text.len, chunk);

        if (n == -1) {
            err = ngx_errno;

            if (err == NGX_EINTR) {
                continue;
            }

            p = ngx_strerror(err, errstr, sizeof(errstr));
            rc = ngx_http_llmlimit_keys_error(b, 0, "read() failed (%d: %*s)",
                                              err, p - errstr, errstr);
            goto done;
        }

        if (n == 0) {
            break;
        }

        b->text.len += n;

        if (budget && b->text.len < b->expect) {
            return NGX_AGAIN;
        }
    }

    /* still the file it was when it was opened? */

    ngx_memzero(&st, sizeof(ngx_http_llmlimit_keys_stat_t));

    if (ngx_fd_info(b->fd, &fi) != NGX_FILE_ERROR) {
        ngx_http_llmlimit_keys_file_stat(&fi, &st);
    }

    if (b->text.len != b->expect
        || !ngx_http_llmlimit_keys_same(&st, &b->stat))
    {
        (void) ngx_http_llmlimit_keys_error(b, 0, "the file changed while "
                                            "it was read");
        rc = NGX_DECLINED;
        goto done;
    }

    b->pos = b->text.data;
    b->last = b->text.data + b->text.len;

    /*
     * room for an entry every 64 bytes of the file, so that the arrays
     * seldom grow: pages never written to take no memory
     */

    n = b->text.len / 64 + 16;

    if (ngx_http_llmlimit_keys_buf_reserve(&b->keys,
                                  n * sizeof(ngx_http_llmlimit_key_t))
        != NGX_OK
        || ngx_http_llmlimit_keys_buf_reserve(&b->lines, n * sizeof(uint32_t))
           != NGX_OK
        || ngx_http_llmlimit_keys_buf_reserve(&b->strings, b->text.len / 4)
           != NGX_OK)
    {
        rc = ngx_http_llmlimit_keys_error(b, 0, "out of memory");
        goto done;
    }

    rc = NGX_OK;

done:

    (void) ngx_close_file(b->fd);
    b->opened = 0;

    return rc;
}


/*
 * The file is parsed one JSON value at a time: the punctuation of
 *
 *     {"keys": [ {...}, {...}, ... ], "other": ...}
 *
 * here, each member name, key entry and other value by json_loadb() with
 * JSON_DISABLE_EOF_CHECK, which reports how far it read.  jansson then
 * holds one entry at a time, not a tree of the whole file (which takes
 * some 2 KB a key), and a parse can stop after any entry and go on later.
 */

enum {
    sw_start = 0,
    sw_first_member,
    sw_member,
    sw_colon,
    sw_value,
    sw_member_next,
    sw_first_key,
    sw_key,
    sw_key_next,
    sw_end
};


static ngx_int_t
ngx_http_llmlimit_keys_parse(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t budget)
{
    u_char      ch;
    json_t     *v;
    ngx_int_t   rc;
    ngx_uint_t  n;

    n = 0;

    for ( ;; ) {

        /* JSON white space */

        while (b->pos < b->last) {
            ch = *b->pos;

            if (ch == '\n') {
                b->line++;

            } else if (ch != ' ' && ch != '\t' && ch != '\r') {
                break;
            }

            b->pos++;
        }

        if (b->pos == b->last) {

            if (b->state != sw_end) {
                return ngx_http_llmlimit_keys_error(b, b->line,
                                                    "unexpected end of file");
            }

            if (!b->keys_seen) {
                return ngx_http_llmlimit_keys_error(b, 1, "no \"keys\" "
                                                    "array");
            }

            return NGX_OK;
        }

        ch = *b->pos;

        switch (b->state) {

        case sw_start:
            if (ch != '{') {
                return ngx_http_llmlimit_keys_error(b, b->line, "expected "
                                "a JSON object, {\"keys\": [...]}");
            }

            b->pos++;
            b->state = sw_first_member;
            break;

        case sw_first_member:
            if (ch == '}') {
                b->pos++;
                b->state = sw_end;
                break;
            }

            /* fall through */

        case sw_member:
            if (ch != '"') {
                return ngx_http_llmlimit_keys_error(b, b->line,
                                                "expected a member name");
            }

            rc = ngx_http_llmlimit_keys_value(b, &v, JSON_DECODE_ANY);
            if (rc != NGX_OK) {
                return rc;
            }

            b->in_keys = (ngx_strcmp(json_string_value(v), "keys") == 0);

            json_decref(v);

            if (b->in_keys && b->keys_seen) {
                return ngx_http_llmlimit_keys_error(b, b->line,
                                                "duplicate \"keys\" member");
            }

            b->state = sw_colon;
            break;

        case sw_colon:
            if (ch != ':') {
                return ngx_http_llmlimit_keys_error(b, b->line,
                                                    "expected \":\"");
            }

            b->pos++;
            b->state = sw_value;
            break;

        case sw_value:
            if (b->in_keys) {
                if (ch != '[') {
                    return ngx_http_llmlimit_keys_error(b, b->line,
                                            "\"keys\" must be an array");
                }

                b->keys_seen = 1;
                b->pos++;
                b->state = sw_first_key;
                break;
            }

            /* another member: any JSON value, ignored */

            rc = ngx_http_llmlimit_keys_value(b, &v, JSON_DECODE_ANY);
            if (rc != NGX_OK) {
                return rc;
            }

            json_decref(v);
            b->state = sw_member_next;
            break;

        case sw_member_next:
            if (ch == ',') {
                b->pos++;
                b->state = sw_member;
                break;
            }

            if (ch == '}') {
                b->pos++;
                b->state = sw_end;
                break;
            }

            return ngx_http_llmlimit_keys_error(b, b->line,
                                                "expected \",\" or \"}\"");

        case sw_first_key:
            if (ch == ']') {
                b->pos++;
                b->state = sw_member_next;
                break;
            }

            /* fall through */

        case sw_key:
            if (budget && n == budget) {
                return NGX_AGAIN;
            }

            if ((++n & 0x3ff) == 0 && (ngx_exiting || ngx_terminate)) {
                return NGX_ABORT;
            }

            if (ch != '{') {
                return ngx_http_llmlimit_keys_error(b, b->line,
                                                "a key must be an object");
            }

            b->entry_line = b->line;

            rc = ngx_http_llmlimit_keys_value(b, &v, 0);
            if (rc != NGX_OK) {
                return rc;
            }

            rc = ngx_http_llmlimit_keys_add(b, v);

            json_decref(v);

            if (rc != NGX_OK) {
                return rc;
            }

            b->state = sw_key_next;
            break;

        case sw_key_next:
            if (ch == ',') {
                b->pos++;
                b->state = sw_key;
                break;
            }

            if (ch == ']') {
                b->pos++;
                b->state = sw_member_next;
                break;
            }

            return ngx_http_llmlimit_keys_error(b, b->line,
                                                "expected \",\" or \"]\"");

        default: /* sw_end */
            return ngx_http_llmlimit_keys_error(b, b->line, "unexpected "
                                                "data after the object");
        }
    }
}


/* one JSON value at b->pos, by jansson; b->pos goes past it */

static ngx_int_t
ngx_http_llmlimit_keys_value(ngx_http_llmlimit_keys_build_t *b,
    json_t **value, size_t flags)
{
    u_char        *near;
    json_t        *v;
    json_error_t   err;

    v = json_loadb((char *) b->pos, b->last - b->pos,
                   flags | JSON_DISABLE_EOF_CHECK | JSON_REJECT_DUPLICATES,
                   &err);

    if (v == NULL) {

        /* "... near 'TOKEN'" may quote a key: the line will do */

        err.text[JSON_ERROR_TEXT_LENGTH - 1] = '\0';

        near = (u_char *) ngx_strstr(err.text, " near ");
        if (near) {
            *near = '\0';
        }

        if (ngx_strcmp(err.text, "duplicate object key") == 0) {
            return ngx_http_llmlimit_keys_error(b, b->line
                                                   + (err.line > 0
                                                      ? err.line - 1 : 0),
                                                "a field appears twice");
        }

        return ngx_http_llmlimit_keys_error(b, b->line
                                               + (err.line > 0
                                                  ? err.line - 1 : 0),
                                            "%s", err.text);
    }

    if (err.position <= 0 || err.position > b->last - b->pos) {
        json_decref(v);
        return ngx_http_llmlimit_keys_error(b, b->line, "jansson reported "
                                            "no position");
    }

    ngx_http_llmlimit_keys_advance(b, (size_t) err.position);

    *value = v;

    return NGX_OK;
}


/* one entry of "keys" */

static ngx_int_t
ngx_http_llmlimit_keys_add(ngx_http_llmlimit_keys_build_t *b, json_t *o)
{
    u_char                   *s, c, d;
    size_t                    len, j;
    json_t                   *v;
    uint32_t                 *line;
    ngx_uint_t                i, have, line0;
    const char               *name;
    ngx_http_llmlimit_key_t  *k;

    line0 = b->entry_line;

    if (b->nkeys >= 0x7fffffff) {
        return ngx_http_llmlimit_keys_error(b, line0, "too many keys");
    }

    if (ngx_http_llmlimit_keys_buf_reserve(&b->keys,
                                           sizeof(ngx_http_llmlimit_key_t))
        != NGX_OK
        || ngx_http_llmlimit_keys_buf_reserve(&b->lines, sizeof(uint32_t))
           != NGX_OK)
    {
        return ngx_http_llmlimit_keys_error(b, line0, "out of memory");
    }

    k = (ngx_http_llmlimit_key_t *) (b->keys.data + b->keys.len);
    ngx_memzero(k, sizeof(ngx_http_llmlimit_key_t));

    have = 0;

    json_object_foreach(o, name, v) {

        if (ngx_strcmp(name, "key") == 0) {
            have |= 1;

            if (!json_is_string(v) || json_string_length(v) == 0) {
                return ngx_http_llmlimit_keys_error(b, line0, "\"key\" must "
                                                    "be a non-empty string");
            }

            if (ngx_http_llmlimit_keys_digest(b->md_ctx, b->md,
                                              (u_char *) json_string_value(v),
                                              json_string_length(v),
                                              k->digest)
                != NGX_OK)
            {
                return ngx_http_llmlimit_keys_error(b, line0,
                                                    "SHA-256 failed");
            }

            continue;
        }

        if (ngx_strcmp(name, "sha256") == 0) {
            have |= 2;

            s = (u_char *) (json_is_string(v) ? json_string_value(v) : NULL);

            if (s == NULL || json_string_length(v) != 64) {
                goto bad_sha256;
            }

            for (i = 0; i < 32; i++) {
                c = ngx_tolower(s[2 * i]);
                d = ngx_tolower(s[2 * i + 1]);

                if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))
                    || !((d >= '0' && d <= '9') || (d >= 'a' && d <= 'f')))
                {
                    goto bad_sha256;
                }

                c = (c <= '9') ? c - '0' : c - 'a' + 10;
                d = (d <= '9') ? d - '0' : d - 'a' + 10;

                k->digest[i] = (u_char) (c << 4 | d);
            }

            continue;
        }

        for (i = 0; i < NGX_HTTP_LLMLIMIT_KEY_NFIELDS; i++) {
            if (ngx_strcmp(name, ngx_http_llmlimit_keys_fields[i].data)
                == 0)
            {
                break;
            }
        }

        if (i == NGX_HTTP_LLMLIMIT_KEY_NFIELDS) {
            return ngx_http_llmlimit_keys_error(b, line0, "unknown field "
                                                "\"%s\"", name);
        }

        if (json_is_null(v)) {
            continue;
        }

        if (!json_is_string(v)) {
            return ngx_http_llmlimit_keys_error(b, line0, "\"%s\" must be "
                                                "a string", name);
        }

        s = (u_char *) json_string_value(v);
        len = json_string_length(v);

        if (len > NGX_HTTP_LLMLIMIT_KEY_MAX_FIELD) {
            return ngx_http_llmlimit_keys_error(b, line0, "\"%s\" is longer "
                                    "than %d bytes", name,
                                    NGX_HTTP_LLMLIMIT_KEY_MAX_FIELD);
        }

        /* the values may end up in headers and logs */

        for (j = 0; j < len; j++) {
            if (s[j] < 0x20 || s[j] == 0x7f) {
                return ngx_http_llmlimit_keys_error(b, line0, "\"%s\" has "
                                                "a control character", name);
            }
        }

        if (ngx_http_llmlimit_keys_intern(b, s, len, &k->field[i]) != NGX_OK)
        {
            return ngx_http_llmlimit_keys_error(b, line0, "out of memory");
        }
    }

    if (have == 0) {
        return ngx_http_llmlimit_keys_error(b, line0, "a key needs \"key\" "
                                            "or \"sha256\"");
    }

    if (have == 3) {
        return ngx_http_llmlimit_keys_error(b, line0, "a key has both "
                                            "\"key\" and \"sha256\"");
    }

    line = (uint32_t *) (b->lines.data + b->lines.len);
    *line = (uint32_t) line0;

    b->keys.len += sizeof(ngx_http_llmlimit_key_t);
    b->lines.len += sizeof(uint32_t);
    b->nkeys++;

    return NGX_OK;

bad_sha256:

    return ngx_http_llmlimit_keys_error(b, line0, "\"sha256\" must be 64 "
                                        "hexadecimal digits");
}


/*
 * Each distinct string is stored once, as a length byte and the bytes; a
 * reference is its offset, 0 the empty string.  Plans, organisations,
 * workspaces and projects repeat across keys.
 */

static ngx_int_t
ngx_http_llmlimit_keys_intern(ngx_http_llmlimit_keys_build_t *b,
    const u_char *s, size_t len, uint32_t *ref)
{
    u_char                        *p;
    uint32_t                      *slots, off;
    ngx_uint_t                     i, j, mask, nslots;
    ngx_http_llmlimit_keys_buf_t   grown;

    if (len == 0) {
        *ref = 0;
        return NGX_OK;
    }

    if (b->strings.len == 0) {
        if (ngx_http_llmlimit_keys_buf_reserve(&b->strings, 1) != NGX_OK) {
            return NGX_ERROR;
        }

        b->strings.data[0] = 0;
        b->strings.len = 1;
    }

    nslots = b->interned.len / sizeof(uint32_t);

    if (2 * (b->nstrings + 1) > nslots) {

        /* twice the slots, and every string in its new slot */

        ngx_memzero(&grown, sizeof(ngx_http_llmlimit_keys_buf_t));

        j = nslots ? 2 * nslots : 1024;

        if (ngx_http_llmlimit_keys_buf_reserve(&grown, j * sizeof(uint32_t))
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        grown.len = j * sizeof(uint32_t);
        ngx_memzero(grown.data, grown.len);

        slots = (uint32_t *) grown.data;
        mask = j - 1;

        for (i = 0; i < nslots; i++) {
            off = ((uint32_t *) b->interned.data)[i];

            if (off == 0) {
                continue;
            }

            p = b->strings.data + off;

            for (j = ngx_murmur_hash2(p + 1, p[0]) & mask;
                 slots[j];
                 j = (j + 1) & mask)
            { /* void */ }

            slots[j] = off;
        }

        ngx_http_llmlimit_keys_buf_free(&b->interned);
        b->interned = grown;
        nslots = mask + 1;
    }

    slots = (uint32_t *) b->interned.data;
    mask = nslots - 1;

    for (j = ngx_murmur_hash2((u_char *) s, len) & mask;
         slots[j];
         j = (j + 1) & mask)
    {
        p = b->strings.data + slots[j];

        if (p[0] == len && ngx_memcmp(p + 1, s, len) == 0) {
            *ref = slots[j];
            return NGX_OK;
        }
    }

    if (b->strings.len + len + 1 > 0xffffffff) {
        return NGX_ERROR;
    }

    if (ngx_http_llmlimit_keys_buf_reserve(&b->strings, len + 1) != NGX_OK) {
        return NGX_ERROR;
    }

    off = (uint32_t) b->strings.len;

    p = b->strings.data + off;
    *p++ = (u_char) len;
    ngx_memcpy(p, s, len);

    b->strings.len += len + 1;
    b->nstrings++;

    slots[j] = off;
    *ref = off;

    return NGX_OK;
}


/*
 * The table: a power of two of 32-bit slots, at least twice the keys,
 * indexed by the digest's first bytes, linear probing.  A key listed
 * twice (in clear or hashed) is an error.
 */

static ngx_int_t
ngx_http_llmlimit_keys_index(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t budget)
{
    uint32_t                 *slots, *lines, h;
    ngx_uint_t                i, j, n, last;
    ngx_http_llmlimit_key_t  *keys;

    if (b->indexed == 0) {
        for (n = 16; n < 2 * b->nkeys; n *= 2) { /* void */ }

        if (ngx_http_llmlimit_keys_buf_reserve(&b->buckets,
                                               n * sizeof(uint32_t))
            != NGX_OK)
        {
            return ngx_http_llmlimit_keys_error(b, 0, "out of memory");
        }

        /* fresh pages are zeroes */
        b->buckets.len = n * sizeof(uint32_t);
        b->mask = n - 1;

        if (b->strings.len == 0) {
            if (ngx_http_llmlimit_keys_buf_reserve(&b->strings, 1) != NGX_OK)
            {
                return ngx_http_llmlimit_keys_error(b, 0, "out of memory");
            }

            b->strings.data[0] = 0;
            b->strings.len = 1;
        }
    }

    slots = (uint32_t *) b->buckets.data;
    keys = (ngx_http_llmlimit_key_t *) b->keys.data;
    lines = (uint32_t *) b->lines.data;

    last = b->nkeys;

    if (budget && last - b->indexed > NGX_HTTP_LLMLIMIT_KEYS_INDEX_SLICE) {
        last = b->indexed + NGX_HTTP_LLMLIMIT_KEYS_INDEX_SLICE;
    }

    for (i = b->indexed; i < last; i++) {
        ngx_memcpy(&h, keys[i].digest, sizeof(uint32_t));

        for (j = h & b->mask; slots[j]; j = (j + 1) & b->mask) {
            if (ngx_memcmp(keys[slots[j] - 1].digest, keys[i].digest, 32)
                == 0)
            {
                return ngx_http_llmlimit_keys_error(b, lines[i],
                                        "duplicate key, also at line %uD",
                                        lines[slots[j] - 1]);
            }
        }

        slots[j] = (uint32_t) (i + 1);
    }

    b->indexed = last;

    if (last < b->nkeys) {
        return NGX_AGAIN;
    }

    b->size = ngx_align(sizeof(ngx_http_llmlimit_keys_table_t), 8)
              + ngx_align(b->buckets.len, 8)
              + ngx_align(b->keys.len, 8)
              + b->strings.len;

    /* what was written to, at most at once */

    b->peak = b->text.len + b->keys.len + b->lines.len
              + b->strings.len + b->interned.len + b->buckets.len;

    /* the text and the interning are no longer needed */

    ngx_http_llmlimit_keys_buf_free(&b->text);
    ngx_http_llmlimit_keys_buf_free(&b->interned);
    ngx_http_llmlimit_keys_buf_free(&b->lines);

    return NGX_OK;
}


/* a block of the zone for the new directory, unseen until published */

static ngx_int_t
ngx_http_llmlimit_keys_alloc(ngx_http_llmlimit_keys_build_t *b)
{
    void                           *p;
    uint64_t                        start;
    ngx_http_llmlimit_keys_conf_t  *kcf;

    kcf = b->conf;

    ngx_shmtx_lock(&kcf->shpool->mutex);

    if (!ngx_http_llmlimit_keys_owner(b)) {
        ngx_shmtx_unlock(&kcf->shpool->mutex);
        return NGX_ABORT;
    }

    start = ngx_http_llmlimit_keys_clock();

    p = ngx_http_llmlimit_keys_arena_alloc(kcf->sh, b->size);

    if (p != NULL && b->seq) {
        /* freed by another worker if this one dies before publishing */
        kcf->sh->pending = p;
    }

    b->held[0] = ngx_http_llmlimit_keys_clock() - start;

    ngx_shmtx_unlock(&kcf->shpool->mutex);

    if (p == NULL) {
        return ngx_http_llmlimit_keys_error(b, 0, "%ui keys take %uz bytes, "
                                   "more than the shared memory has free "
                                   "(size=%uz; a reload of nginx sizes it "
                                   "for the file)", b->nkeys, b->size,
                                   kcf->size);
    }

    b->table = p;

    return NGX_OK;
}


/*
 * The directories live in one arena that takes the whole zone, as at most
 * a few blocks (the one in use, the one being built, a master's at a
 * reload): allocating and freeing one walks this short list, where the
 * slab allocator would walk a descriptor for each page of a block (some
 * 20 000 for a million keys, a millisecond or two with the lock held,
 * every request of every worker waiting).  Called with the mutex held.
 */

static void *
ngx_http_llmlimit_keys_arena_alloc(ngx_http_llmlimit_keys_shctx_t *sh,
    size_t size)
{
    size_t                           start;
    ngx_uint_t                       i;
    ngx_http_llmlimit_keys_block_t  *bl;

    if (sh->nblocks == NGX_HTTP_LLMLIMIT_KEYS_BLOCKS) {
        return NULL;
    }

    size = ngx_align(size, 64);
    bl = sh->blocks;
    start = 0;

    /* the first gap that fits */

    for (i = 0; i < sh->nblocks; i++) {
        if (bl[i].off - start >= size) {
            break;
        }

        start = bl[i].off + bl[i].size;
    }

    if (i == sh->nblocks && sh->arena_size - start < size) {
        return NULL;
    }

    ngx_memmove(&bl[i + 1], &bl[i],
                (sh->nblocks - i) * sizeof(ngx_http_llmlimit_keys_block_t));

    bl[i].off = start;
    bl[i].size = size;
    sh->nblocks++;

    return sh->arena + start;
}


static void
ngx_http_llmlimit_keys_arena_free(ngx_http_llmlimit_keys_shctx_t *sh,
    void *p)
{
    size_t                           off;
    ngx_uint_t                       i;
    ngx_http_llmlimit_keys_block_t  *bl;

    off = (u_char *) p - sh->arena;
    bl = sh->blocks;

    for (i = 0; i < sh->nblocks; i++) {
        if (bl[i].off == off) {
            ngx_memmove(&bl[i], &bl[i + 1],
                        (sh->nblocks - i - 1)
                        * sizeof(ngx_http_llmlimit_keys_block_t));
            sh->nblocks--;
            return;
        }
    }
}


static ngx_int_t
ngx_http_llmlimit_keys_fill(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t budget)
{
    size_t                           n, left, off;
    ngx_uint_t                       i;
    ngx_http_llmlimit_keys_buf_t    *src[3];
    ngx_http_llmlimit_keys_table_t  *t;
    size_t                           at[3];

    if (b->seq) {
        /* the block is still this load's (checked at every slice) */

        ngx_shmtx_lock(&b->conf->shpool->mutex);

        if (!ngx_http_llmlimit_keys_owner(b)) {
            ngx_shmtx_unlock(&b->conf->shpool->mutex);
            return NGX_ABORT;
        }

        ngx_shmtx_unlock(&b->conf->shpool->mutex);
    }

    t = b->table;

    at[0] = ngx_align(sizeof(ngx_http_llmlimit_keys_table_t), 8);
    at[1] = at[0] + ngx_align(b->buckets.len, 8);
    at[2] = at[1] + ngx_align(b->keys.len, 8);

    src[0] = &b->buckets;
    src[1] = &b->keys;
    src[2] = &b->strings;

    if (b->copied == 0) {
        t->size = b->size;
        t->nkeys = b->nkeys;
        t->mask = b->mask;
        t->buckets = (uint32_t *) ((u_char *) t + at[0]);
        t->keys = (ngx_http_llmlimit_key_t *) ((u_char *) t + at[1]);
        t->strings = (u_char *) t + at[2];
    }

    /* the three arrays, one after the other, a chunk a slice */

    left = budget ? NGX_HTTP_LLMLIMIT_KEYS_CHUNK : (size_t) -1;
    off = b->copied;

    for (i = 0; i < 3 && left; i++) {
        if (off >= src[i]->len) {
            off -= src[i]->len;
            continue;
        }

        n = ngx_min(src[i]->len - off, left);

        ngx_memcpy((u_char *) t + at[i] + off, src[i]->data + off, n);

        b->copied += n;
        left -= n;
        off = 0;
    }

    if (b->copied < b->buckets.len + b->keys.len + b->strings.len) {
        return NGX_AGAIN;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_keys_error(ngx_http_llmlimit_keys_build_t *b,
    ngx_uint_t line, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    va_start(args, fmt);
    p = ngx_vslprintf(b->err, b->err + sizeof(b->err), fmt, args);
    va_end(args);

    b->err_len = p - b->err;
    b->err_line = line;

    /* names from the file: no control characters in the log */

    for (p = b->err; p < b->err + b->err_len; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            *p = '?';
        }
    }

    return NGX_ERROR;
}


static void
ngx_http_llmlimit_keys_advance(ngx_http_llmlimit_keys_build_t *b, size_t n)
{
    u_char  *p, *last;

    last = b->pos + n;

    for (p = b->pos; p < last; p++) {
        p = memchr(p, '\n', last - p);

        if (p == NULL) {
            break;
        }

        b->line++;
    }

    b->pos = last;
}


static ngx_int_t
ngx_http_llmlimit_keys_buf_reserve(ngx_http_llmlimit_keys_buf_t *buf,
    size_t n)
{
    u_char  *p;
    size_t   size;

    if (buf->len + n <= buf->size) {
        return NGX_OK;
    }

    size = buf->size ? 2 * buf->size : 65536;

    while (size < buf->len + n) {
        size *= 2;
    }

#if (NGX_LINUX)

    if (buf->data) {
        /* the pages move, not their contents */

        p = mremap(buf->data, buf->size, size, MREMAP_MAYMOVE);

        if (p == MAP_FAILED) {
            return NGX_ERROR;
        }

        buf->data = p;
        buf->size = size;

        return NGX_OK;
    }

#endif

    p = mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANON, -1, 0);

    if (p == MAP_FAILED) {
        return NGX_ERROR;
    }

    if (buf->data) {
        ngx_memcpy(p, buf->data, buf->len);
        (void) munmap(buf->data, buf->size);
    }

    buf->data = p;
    buf->size = size;

    return NGX_OK;
}


static void
ngx_http_llmlimit_keys_buf_free(ngx_http_llmlimit_keys_buf_t *buf)
{
    if (buf->data) {
        (void) munmap(buf->data, buf->size);
    }

    buf->data = NULL;
    buf->len = 0;
    buf->size = 0;
}


static void
ngx_http_llmlimit_keys_file_stat(ngx_file_info_t *fi,
    ngx_http_llmlimit_keys_stat_t *st)
{
    st->dev = (ngx_uint_t) fi->st_dev;
    st->ino = (ngx_uint_t) ngx_file_uniq(fi);
    st->size = ngx_file_size(fi);
    st->mtime = ngx_file_mtime(fi);
#if (NGX_LINUX)
    st->mtime_nsec = fi->st_mtim.tv_nsec;
#else
    st->mtime_nsec = 0;
#endif
    st->err = 0;
}


static ngx_uint_t
ngx_http_llmlimit_keys_same(ngx_http_llmlimit_keys_stat_t *a,
    ngx_http_llmlimit_keys_stat_t *b)
{
    if (a->err || b->err) {
        return a->err == b->err;
    }

    return a->dev == b->dev && a->ino == b->ino && a->size == b->size
           && a->mtime == b->mtime && a->mtime_nsec == b->mtime_nsec
           && a->size >= 0 && (a->ino || a->dev || a->mtime);
}


static ngx_int_t
ngx_http_llmlimit_keys_digest(EVP_MD_CTX *ctx, const EVP_MD *md,
    u_char *data, size_t len, u_char *digest)
{
    unsigned int  n;

    if (EVP_DigestInit_ex(ctx, md, NULL) != 1
        || EVP_DigestUpdate(ctx, data, len) != 1
        || EVP_DigestFinal_ex(ctx, digest, &n) != 1
        || n != 32)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* OpenSSL 3 looks a digest up at every init unless it is fetched once */

static EVP_MD *
ngx_http_llmlimit_keys_md(void)
{
#if (OPENSSL_VERSION_NUMBER >= 0x30000000L && !defined LIBRESSL_VERSION_NUMBER)
    return EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    return (EVP_MD *) EVP_sha256();
#endif
}


static void
ngx_http_llmlimit_keys_md_free(EVP_MD *md)
{
#if (OPENSSL_VERSION_NUMBER >= 0x30000000L && !defined LIBRESSL_VERSION_NUMBER)
    EVP_MD_free(md);
#endif
}


/* microseconds, for the load's log line */

static uint64_t
ngx_http_llmlimit_keys_clock(void)
{
#if (NGX_HAVE_CLOCK_MONOTONIC)
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
#else
    struct timeval   tv;

    ngx_gettimeofday(&tv);

    return (uint64_t) tv.tv_sec * 1000000 + tv.tv_usec;
#endif
}


static ngx_int_t
ngx_http_llmlimit_keys_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_llmlimit_keys_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static void *
ngx_http_llmlimit_keys_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_keys_conf_t  *kcf;

    kcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_keys_conf_t));
    if (kcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     kcf->file = { 0, NULL };
     *     kcf->shm_zone = NULL;
     *     kcf->sh = NULL;
     *     kcf->image = NULL;
     *     kcf->build = NULL;
     */

    return kcf;
}


static void *
ngx_http_llmlimit_keys_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_llmlimit_keys_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llmlimit_keys_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->key = NGX_CONF_UNSET_PTR;

    return conf;
}


static char *
ngx_http_llmlimit_keys_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_llmlimit_keys_loc_conf_t *prev = parent;
    ngx_http_llmlimit_keys_loc_conf_t *conf = child;

    ngx_conf_merge_ptr_value(conf->key, prev->key, NULL);

    return NGX_CONF_OK;
}


/*
 * llmlimit_keys FILE [check=TIME|off] [max_size=SIZE] [size=SIZE]
 *               [thread_pool=NAME|off];
 *
 * The file is read and checked here, so that "nginx -t" fails on a bad
 * one; the directory goes into shared memory when the zone is created.
 */

static char *
ngx_http_llmlimit_keys(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_keys_conf_t *kcf = conf;

    size_t                           size, need;
    ssize_t                          n;
    ngx_str_t                       *value, s, name;
    ngx_uint_t                       i;
    ngx_msec_t                       check;
    ngx_pool_cleanup_t              *cln;
    ngx_http_llmlimit_keys_build_t  *b;
#if (NGX_THREADS)
    ngx_str_t                        pool;
    ngx_uint_t                       threads;
#endif

    if (kcf->file.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    kcf->file = value[1];

    if (kcf->file.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "empty file name");
        return NGX_CONF_ERROR;
    }

    if (ngx_conf_full_name(cf->cycle, &kcf->file, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    kcf->check = 1000;
    kcf->max_size = NGX_HTTP_LLMLIMIT_KEYS_MAX_SIZE;
    kcf->size = 0;

#if (NGX_THREADS)
    threads = 1;
    ngx_str_null(&pool);
#endif

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "check=", 6) == 0) {
            s.len = value[i].len - 6;
            s.data = value[i].data + 6;

            if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
                kcf->check = 0;
                continue;
            }

            check = ngx_parse_time(&s, 0);
            if (check == (ngx_msec_t) NGX_ERROR || check == 0) {
                goto invalid;
            }

            kcf->check = check;
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_size=", 9) == 0) {
            s.len = value[i].len - 9;
            s.data = value[i].data + 9;

            kcf->max_size = ngx_parse_offset(&s);
            if (kcf->max_size == NGX_ERROR || kcf->max_size == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "size=", 5) == 0) {
            s.len = value[i].len - 5;
            s.data = value[i].data + 5;

            n = ngx_parse_size(&s);
            if (n == NGX_ERROR || n < (ssize_t) (8 * ngx_pagesize)) {
                goto invalid;
            }

            kcf->size = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "thread_pool=", 12) == 0) {
            s.len = value[i].len - 12;
            s.data = value[i].data + 12;

            if (s.len == 0) {
                goto invalid;
            }

#if (NGX_THREADS)
            if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
                threads = 0;

            } else {
                pool = s;
            }

            continue;
#else
            if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
                continue;
            }

            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" needs nginx built with threads",
                               &value[i]);
            return NGX_CONF_ERROR;
#endif
        }

        goto invalid;
    }

#if (NGX_THREADS)
    if (threads) {
        kcf->thread_pool = ngx_thread_pool_add(cf, pool.len ? &pool : NULL);
        if (kcf->thread_pool == NULL) {
            return NGX_CONF_ERROR;
        }
    }
#endif

    /* the directory as it is now */

    b = ngx_http_llmlimit_keys_build_create(kcf);
    if (b == NULL) {
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_http_llmlimit_keys_build_free(b);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_llmlimit_keys_image_cleanup;
    cln->data = kcf;
    kcf->image = b;

    if (ngx_http_llmlimit_keys_run(b, 0, NGX_HTTP_LLMLIMIT_KEYS_COPY)
        != NGX_OK)
    {
        if (b->err_line) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llmlimit_keys \"%s\", line %ui: %*s",
                               kcf->file.data, b->err_line, b->err_len,
                               b->err);
        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llmlimit_keys \"%s\": %*s",
                               kcf->file.data, b->err_len, b->err);
        }

        return NGX_CONF_ERROR;
    }

    /*
     * The zone: by default room for the directory three times over (the
     * directory in use and a new one, which may be twice its size), in a
     * power of two of at least 1 MB so that small changes keep its size.
     * Pages of shared memory not written to take no memory.
     */

    need = b->size + b->size / 16 + 16 * ngx_pagesize;

    if (kcf->size == 0) {
        for (size = 1024 * 1024; size < 3 * need; size *= 2) { /* void */ }

        kcf->size = size;

    } else if (kcf->size < need) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "llmlimit_keys \"%s\": %ui keys need size=%uz "
                           "at least", kcf->file.data, b->nkeys, need);
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&name, "llmlimit_keys");

    kcf->shm_zone = ngx_shared_memory_add(cf, &name, kcf->size,
                                          &ngx_http_llmlimit_keys_module);
    if (kcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    kcf->shm_zone->init = ngx_http_llmlimit_keys_init_zone;
    kcf->shm_zone->data = kcf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_llmlimit_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llmlimit_keys_loc_conf_t *klcf = conf;

    ngx_str_t                         *value;
    ngx_http_llmlimit_keys_conf_t     *kcf;
    ngx_http_compile_complex_value_t   ccv;

    if (klcf->key != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    klcf->key = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
    if (klcf->key == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = klcf->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    kcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_llmlimit_keys_module);

    if (!kcf->key_used) {
        kcf->key_used = 1;
        kcf->key_file = cf->conf_file->file.name;
        kcf->key_line = cf->conf_file->line;
    }

    return NGX_CONF_OK;
}


static void
ngx_http_llmlimit_keys_image_cleanup(void *data)
{
    ngx_http_llmlimit_keys_conf_t  *kcf = data;

    if (kcf->image) {
        ngx_http_llmlimit_keys_build_free(kcf->image);
        kcf->image = NULL;
    }
}


/*
 * A new zone gets the directory read with the configuration.  A zone kept
 * over a reload (same size) is still the old workers' until the new
 * configuration is committed: a reload can fail after the zones were
 * initialised (bind() on a new "listen", say), and the old configuration
 * then goes on as it was.  The directory is only checked to fit here; it
 * is copied and published, and the epoch raised, by
 * ngx_http_llmlimit_keys_init_module(), past the point of no return.
 */

/* for llmlimit_metrics; NGX_DECLINED: no key directory */

ngx_int_t
ngx_http_llmlimit_keys_stats(ngx_cycle_t *cycle, ngx_uint_t *nkeys,
    time_t *loaded, ngx_uint_t *failures)
{
    ngx_http_llmlimit_keys_conf_t   *kcf;
    ngx_http_llmlimit_keys_shctx_t  *sh;

    kcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_llmlimit_keys_module);

    if (kcf == NULL || kcf->sh == NULL) {
        return NGX_DECLINED;
    }

    sh = kcf->sh;

    ngx_shmtx_lock(&kcf->shpool->mutex);

    *nkeys = sh->table ? sh->table->nkeys : 0;
    *loaded = sh->table ? sh->load_time : 0;
    *failures = sh->failures;

    ngx_shmtx_unlock(&kcf->shpool->mutex);

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_keys_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_llmlimit_keys_conf_t  *okcf = data;

    size_t                           len, avail;
    ngx_uint_t                       n;
    ngx_http_llmlimit_keys_conf_t   *kcf;
    ngx_http_llmlimit_keys_build_t  *b;
    ngx_http_llmlimit_keys_shctx_t  *sh;

    kcf = shm_zone->data;
    kcf->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (okcf) {
        kcf->sh = okcf->sh;

    } else if (shm_zone->shm.exists) {
        kcf->sh = kcf->shpool->data;

    } else {
        sh = ngx_slab_alloc(kcf->shpool,
                            sizeof(ngx_http_llmlimit_keys_shctx_t));
        if (sh == NULL) {
            return NGX_ERROR;
        }

        ngx_memzero(sh, sizeof(ngx_http_llmlimit_keys_shctx_t));

        kcf->sh = sh;
        kcf->shpool->data = sh;

        len = sizeof(" in llmlimit_keys zone \"\"") + shm_zone->shm.name.len;

        kcf->shpool->log_ctx = ngx_slab_alloc(kcf->shpool, len);
        if (kcf->shpool->log_ctx == NULL) {
            return NGX_ERROR;
        }

        ngx_sprintf(kcf->shpool->log_ctx, " in llmlimit_keys zone \"%V\"%Z",
                    &shm_zone->shm.name);

        /* a directory that does not fit is logged by the loader */
        kcf->shpool->log_nomem = 0;

        /* the rest of the zone, one run of pages, is the arena */

        for (n = kcf->shpool->pfree; n; n--) {
            sh->arena = ngx_slab_alloc(kcf->shpool, n << ngx_pagesize_shift);
            if (sh->arena) {
                break;
            }
        }

        if (sh->arena == NULL) {
            return NGX_ERROR;
        }

        sh->arena_size = n << ngx_pagesize_shift;
    }

    b = kcf->image;

    if (b == NULL || ngx_test_config) {
        return NGX_OK;
    }

    if (okcf) {
        ngx_shmtx_lock(&kcf->shpool->mutex);

        avail = kcf->sh->arena_size;

        if (kcf->sh->table) {
            avail -= ngx_align(kcf->sh->table->size, 64);
        }

        ngx_shmtx_unlock(&kcf->shpool->mutex);

        if (ngx_align(b->size, 64) > avail) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "llmlimit_keys \"%s\": %ui keys take %uz bytes, "
                          "more than the shared memory has free (size=%uz; "
                          "a reload of nginx sizes it for the file)",
                          kcf->file.data, b->nkeys, b->size, kcf->size);
            return NGX_ERROR;
        }

        /* kcf->image is published by init_module, or freed on failure */

        return NGX_OK;
    }

    if (ngx_http_llmlimit_keys_run(b, 0, NGX_HTTP_LLMLIMIT_KEYS_DONE)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "llmlimit_keys \"%s\": %*s", kcf->file.data,
                      b->err_len, b->err);
        return NGX_ERROR;
    }

    ngx_http_llmlimit_keys_publish(kcf, b, shm_zone->shm.log);

    kcf->image = NULL;
    ngx_http_llmlimit_keys_build_free(b);

    return NGX_OK;
}


/*
 * Called once the new configuration is committed (its listening sockets
 * are open, nothing can fail any more).  The epoch is raised: the workers
 * of the configuration before a reload neither check nor publish any
 * more, even before they are told to exit, as their file may no longer be
 * this one (a load of theirs under way is given up at its end).  Then the
 * directory read with the configuration is copied and published in a zone
 * kept over the reload, unless the zone already holds that version of the
 * file.  A failure here cannot fail the reload: it is logged as a load of
 * a worker would be, and the directory in use is kept.
 */

static ngx_int_t
ngx_http_llmlimit_keys_init_module(ngx_cycle_t *cycle)
{
    ngx_uint_t                       same;
    ngx_http_llmlimit_keys_conf_t   *kcf;
    ngx_http_llmlimit_keys_build_t  *b;

    kcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_llmlimit_keys_module);

    if (kcf == NULL || kcf->sh == NULL || ngx_test_config) {
        return NGX_OK;
    }

    b = kcf->image;

    ngx_shmtx_lock(&kcf->shpool->mutex);

    kcf->epoch = ++kcf->sh->epoch;

    same = (b == NULL
            || (kcf->sh->table
                && ngx_http_llmlimit_keys_same(&b->stat, &kcf->sh->loaded)));

    ngx_shmtx_unlock(&kcf->shpool->mutex);

    if (b == NULL) {
        return NGX_OK;
    }

    if (!same) {
        if (ngx_http_llmlimit_keys_run(b, 0, NGX_HTTP_LLMLIMIT_KEYS_DONE)
            != NGX_OK)
        {
            /* not remembered as failed: the new workers try again */

            ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                          "llmlimit_keys \"%s\": %*s; the workers will try "
                          "again", kcf->file.data, b->err_len, b->err);

            b->rc = NGX_ABORT;
        }

        ngx_http_llmlimit_keys_publish(kcf, b, cycle->log);
    }

    kcf->image = NULL;
    ngx_http_llmlimit_keys_build_free(b);

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_keys_init(ngx_conf_t *cf)
{
    ngx_http_llmlimit_keys_conf_t  *kcf;

    kcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_llmlimit_keys_module);

    if (kcf->key_used && kcf->file.data == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"llmlimit_key\" in %V:%ui needs \"llmlimit_keys\"",
                      &kcf->key_file, kcf->key_line);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_keys_init_process(ngx_cycle_t *cycle)
{
    ngx_event_t                    *ev;
    ngx_http_llmlimit_keys_conf_t  *kcf;

    kcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_llmlimit_keys_module);

    if (kcf == NULL || kcf->file.data == NULL || kcf->sh == NULL) {
        return NGX_OK;
    }

    ngx_http_llmlimit_keys_md_ctx = EVP_MD_CTX_new();
    ngx_http_llmlimit_keys_sha256 = ngx_http_llmlimit_keys_md();

    if (ngx_http_llmlimit_keys_md_ctx == NULL
        || ngx_http_llmlimit_keys_sha256 == NULL)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "llmlimit_keys: no SHA-256 in OpenSSL");
        return NGX_ERROR;
    }

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    if (kcf->check == 0) {
        return NGX_OK;
    }

    kcf->dumb.fd = (ngx_socket_t) -1;
    kcf->dumb.data = kcf;

    ev = &kcf->timer;
    ev->handler = ngx_http_llmlimit_keys_timer;
    ev->data = &kcf->dumb;
    ev->log = cycle->log;
    ev->cancelable = 1;

    ngx_add_timer(ev, kcf->check);

    return NGX_OK;
}


static void
ngx_http_llmlimit_keys_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_llmlimit_keys_conf_t   *kcf;
    ngx_http_llmlimit_keys_build_t  *b;

    kcf = ngx_http_cycle_get_module_main_conf(cycle,
                                              ngx_http_llmlimit_keys_module);

    if (kcf != NULL && kcf->build != NULL) {

        /* the thread pools are gone: a load under way was given up */

        b = kcf->build;
        kcf->build = NULL;

        ngx_shmtx_lock(&kcf->shpool->mutex);

        if (ngx_http_llmlimit_keys_owner(b)) {

            if (b->table) {
                ngx_http_llmlimit_keys_arena_free(kcf->sh, b->table);
            }

            kcf->sh->pending = NULL;
            kcf->sh->loader = 0;
        }

        ngx_shmtx_unlock(&kcf->shpool->mutex);

        ngx_http_llmlimit_keys_build_free(b);
    }

    if (ngx_http_llmlimit_keys_md_ctx) {
        EVP_MD_CTX_free(ngx_http_llmlimit_keys_md_ctx);
        ngx_http_llmlimit_keys_md_ctx = NULL;
    }

    if (ngx_http_llmlimit_keys_sha256) {
        ngx_http_llmlimit_keys_md_free(ngx_http_llmlimit_keys_sha256);
        ngx_http_llmlimit_keys_sha256 = NULL;
    }
}
