/*
 * Copyright (C) llmlimit developers
 *
 * The token-usage scanner (src/ngx_http_llmlimit_tokens.c) on any body:
 * fed whole, and fed in pieces of sizes drawn from the first byte, it
 * must come to the same result (a number, a key, an escape split across
 * buffers reads the same), never above the cap, without reading outside
 * the buffers (ASan).
 */

#include "fuzz.h"
#include <ngx_http_llmlimit.h>


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                     *buf, *p, *last;
    uint32_t                    seed;
    ngx_int_t                   rc1, rc2;
    ngx_uint_t                  t1, t2;
    const char                 *why;
    ngx_http_llmlimit_usage_t   u1, u2;

    fuzz_init();

    if (size == 0) {
        return 0;
    }

    seed = data[0] | 1;
    data++;
    size--;

    /* a copy of exactly the body's size: ASan sees any overread */

    buf = malloc(size ? size : 1);
    if (buf == NULL) {
        return 0;
    }

    ngx_memcpy(buf, data, size);
    last = buf + size;

    ngx_http_llmlimit_usage_init(&u1);
    ngx_http_llmlimit_usage_feed(&u1, buf, last);

    ngx_http_llmlimit_usage_init(&u2);

    for (p = buf; p < last; /* void */ ) {
        size_t  n;

        seed = seed * 1103515245 + 12345;
        n = 1 + (seed >> 16) % ((seed & 0x100) ? 3 : 64);
        n = ngx_min(n, (size_t) (last - p));

        ngx_http_llmlimit_usage_feed(&u2, p, p + n);
        p += n;
    }

    t1 = 0;
    t2 = 0;
    rc1 = ngx_http_llmlimit_usage_result(&u1, &t1, &why);
    rc2 = ngx_http_llmlimit_usage_result(&u2, &t2, &why);

    if (rc1 != rc2 || (rc1 == NGX_OK && t1 != t2)) {
        __builtin_trap();               /* split differently, read alike */
    }

    if (rc1 == NGX_OK && t1 > NGX_HTTP_LLMLIMIT_MAX_TOKENS) {
        __builtin_trap();
    }

    free(buf);

    return 0;
}
