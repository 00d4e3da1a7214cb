/*
 * Copyright (C) llmlimit developers
 *
 * The counters' arithmetic (src/ngx_http_llmlimit_algo.c): random
 * algorithm, COUNT, PERIOD and a sequence of check / count / refund at
 * random (possibly backwards) times, checked against invariants:
 *
 *   - a fresh state admits;
 *   - remaining never exceeds COUNT;
 *   - a rejection says when one more fits: retry > 0, and, while every
 *     request was counted after a check that admitted it, at most
 *     PERIOD (+ the GCRA emission interval) from the latest time the
 *     counter saw (a "now" older than that waits the difference too);
 *     unchecked counts (the shadow counters of a Redis zone) may push it
 *     further;
 *   - an admitted request, counted, leaves remaining <= COUNT - its cost.
 *
 * A first byte of 3 to 5 makes the counter a token budget: COUNT up to
 * 2^31 - 1, an estimate counted per request, and charges up and down
 * instead of refunds; its waits may reach two PERIODs (an overdraft).
 */

#include "fuzz.h"
#include <ngx_http_llmlimit.h>


static uint64_t
take(const uint8_t **p, size_t *n, size_t bytes)
{
    uint64_t  v = 0;

    while (bytes-- && *n) {
        v = (v << 8) | **p;
        (*p)++;
        (*n)--;
    }

    return v;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int64_t                       now, base, latest, bound, delta, need;
    ngx_int_t                     rc;
    ngx_uint_t                    op, unchecked, mode;
    ngx_http_llmlimit_state_t     st;
    ngx_http_llmlimit_counter_t   c;

    fuzz_init();

    ngx_memzero(&st, sizeof(st));
    ngx_memzero(&c, sizeof(c));

    mode = take(&data, &size, 1);
    c.algorithm = mode % 3;
    c.tokens = (mode / 3) % 2;
    c.count = take(&data, &size, 4)
              % (c.tokens ? 0x7fffffff : ((1 << 29) - 1)) + 1;
    c.period = take(&data, &size, 4) % (365 * 86400 * 1000ULL) + 1;
    c.cost = c.tokens ? take(&data, &size, 4) % (c.count + 1) : 1;
    need = (c.cost > 1) ? (int64_t) c.cost : 1;

    /* the longest wait of a checked counter, ms (rounding included) */
    bound = (int64_t) c.period + (int64_t) c.period / c.count + 1;

    if (c.tokens) {
        bound = 2 * bound + 2 * (int64_t) c.count / 1000 + 2;
    }

    base = 1700000000000LL + (int64_t) take(&data, &size, 4);
    now = base;
    latest = now;
    unchecked = 0;

    rc = ngx_http_llmlimit_algo_check(&st, &c, now);
    if (rc != NGX_OK) {
        __builtin_trap();               /* a fresh state admits */
    }

    while (size) {
        op = take(&data, &size, 1);

        /* time moves by up to ~3 periods, sometimes backwards */
        now += (int64_t) (take(&data, &size, 2) % (3 * c.period + 1))
               * ((op & 0x80) ? -1 : 1) / 4;

        latest = ngx_max(latest, now);

        switch (op % 4) {

        case 0:
        case 1:
            rc = ngx_http_llmlimit_algo_check(&st, &c, now);

            if (rc == NGX_OK) {
                ngx_http_llmlimit_algo_count(&st, &c, now);

                /* what it counted is no longer left (a token estimate
                   may be 0) */

                if ((int64_t) c.remaining
                    > (int64_t) c.count - (c.tokens ? (int64_t) c.cost : 1))
                {
                    __builtin_trap();
                }

            } else if (rc == NGX_BUSY) {
                if ((int64_t) c.remaining >= need || c.retry == 0) {
                    __builtin_trap();
                }

                if (!unchecked
                    && (int64_t) c.retry > bound + (latest - now))
                {
                    __builtin_trap();
                }

            } else {
                __builtin_trap();
            }

            break;

        case 2:
            ngx_http_llmlimit_algo_count(&st, &c, now);
            unchecked = 1;
            break;

        default:
            if (!c.tokens || (op & 0x40)) {
                ngx_http_llmlimit_algo_refund(&st, &c, now);
                break;
            }

            /* what a request used, charged at its end */
            delta = (int64_t) (take(&data, &size, 4) % (3 * c.count + 1))
                    - (int64_t) c.cost;
            ngx_http_llmlimit_algo_charge(&st, &c, now, delta, now);
            unchecked |= (delta > 0);
            break;
        }

        if (c.remaining > c.count) {
            __builtin_trap();
        }

        (void) ngx_http_llmlimit_algo_expires(&st, &c);
    }

    return 0;
}
