/*
 * Copyright (C) llmlimit developers
 *
 * What every libFuzzer harness of t/fuzz needs of nginx: a log to
 * /dev/null, a cycle with a pool, the page size and the time.  The
 * harnesses are linked with the objects of an nginx built with clang and
 * the module in it (make fuzz-build), so they run the module's own code.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


static ngx_open_file_t  fuzz_log_file;
static ngx_log_t        fuzz_log;
static ngx_cycle_t      fuzz_cycle;


static void
fuzz_init(void)
{
    ngx_uint_t  n;
    static int  done;

    if (done) {
        return;
    }

    done = 1;

    ngx_pagesize = getpagesize();
    for (n = ngx_pagesize, ngx_pagesize_shift = 0; n >>= 1;
         ngx_pagesize_shift++)
    {
        /* void */
    }

    ngx_cacheline_size = NGX_CPU_CACHE_LINE;
    ngx_use_stderr = 0;

    fuzz_log_file.fd = open("/dev/null", O_WRONLY);
    fuzz_log.file = &fuzz_log_file;
    fuzz_log.log_level = NGX_LOG_INFO;

    ngx_time_init();
#if (NGX_PCRE)
    ngx_regex_init();
#endif

    fuzz_cycle.log = &fuzz_log;
    fuzz_cycle.pool = ngx_create_pool(NGX_CYCLE_POOL_SIZE, &fuzz_log);
    ngx_cycle = &fuzz_cycle;
}
