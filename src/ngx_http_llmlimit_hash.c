
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The 128-bit hash that names a counter: MurmurHash3's x64 128-bit
 * construction, seeded with the hash of the budget (table, category,
 * KEY expression), over the identity.  Collisions are as unlikely as
 * MD5's for keys nobody chooses to collide, at a tenth of the cost; the
 * rbtree is balanced, so crafted keys cannot degrade it.
 */


#include "ngx_http_llmlimit.h"


#define ngx_http_llmlimit_rotl(x, r)  ((x) << (r) | (x) >> (64 - (r)))


static ngx_inline uint64_t
ngx_http_llmlimit_fmix(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;

    return k;
}


void
ngx_http_llmlimit_hash(const uint64_t seed[2], const u_char *data, size_t len,
    uint64_t out[2])
{
    size_t          n;
    uint64_t        h1, h2, k1, k2;
    u_char          tail[16];
    const u_char   *p;

    static const uint64_t  c1 = 0x87c37b91114253d5ULL;
    static const uint64_t  c2 = 0x4cf5ad432745937fULL;

    h1 = seed[0];
    h2 = seed[1];

    p = data;

    for (n = len / 16; n; n--, p += 16) {
        ngx_memcpy(&k1, p, 8);
        ngx_memcpy(&k2, p + 8, 8);

        k1 *= c1;
        k1 = ngx_http_llmlimit_rotl(k1, 31);
        k1 *= c2;
        h1 ^= k1;

        h1 = ngx_http_llmlimit_rotl(h1, 27);
        h1 += h2;
        h1 = h1 * 5 + 0x52dce729;

        k2 *= c2;
        k2 = ngx_http_llmlimit_rotl(k2, 33);
        k2 *= c1;
        h2 ^= k2;

        h2 = ngx_http_llmlimit_rotl(h2, 31);
        h2 += h1;
        h2 = h2 * 5 + 0x38495ab5;
    }

    n = len % 16;

    if (n) {
        ngx_memzero(tail, sizeof(tail));
        ngx_memcpy(tail, p, n);
        ngx_memcpy(&k1, tail, 8);
        ngx_memcpy(&k2, tail + 8, 8);

        if (n > 8) {
            k2 *= c2;
            k2 = ngx_http_llmlimit_rotl(k2, 33);
            k2 *= c1;
            h2 ^= k2;
        }

        k1 *= c1;
        k1 = ngx_http_llmlimit_rotl(k1, 31);
        k1 *= c2;
        h1 ^= k1;
    }

    h1 ^= len;
    h2 ^= len;

    h1 += h2;
    h2 += h1;

    h1 = ngx_http_llmlimit_fmix(h1);
    h2 = ngx_http_llmlimit_fmix(h2);

    h1 += h2;
    h2 += h1;

    out[0] = h1;
    out[1] = h2;
}
