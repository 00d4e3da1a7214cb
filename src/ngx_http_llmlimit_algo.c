
/*
 * Copyright (C) llmlimit developers
 */


/*
 * The counter algorithms, on one counter's state, in integer arithmetic.
 * Both stores use these definitions: the shared-memory store calls the
 * functions below under the zone's lock, the Redis script mirrors them.
 *
 *   fixed    t: start of the aligned window floor(now / P) * P, ms;
 *            cur: requests counted in it.
 *   sliding  t: start of the current aligned window, ms; cur: requests in
 *            it; prev: requests in the window before.  The count is
 *            cur + prev * (P - e) / P, e = now - t.
 *   gcra     t: theoretical arrival time (TAT), microseconds; emission
 *            interval T = ceil(P / COUNT), a request fits while
 *            TAT - now <= (COUNT - 1) * T.
 */


#include "ngx_http_llmlimit.h"


/* keep products of counts and periods within 64 bits */
#define NGX_HTTP_LLMLIMIT_SCALE_BITS  24


static void ngx_http_llmlimit_roll(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
static int64_t ngx_http_llmlimit_remaining(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
static int64_t ngx_http_llmlimit_wait(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now, int64_t n);


int64_t
ngx_http_llmlimit_now(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (int64_t) tp->sec * 1000 + tp->msec;
}


ngx_int_t
ngx_http_llmlimit_algo_check(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    ngx_http_llmlimit_roll(st, c, now);

    if (ngx_http_llmlimit_remaining(st, c, now) >= 1) {
        c->rejected = 0;
        return NGX_OK;
    }

    /* the results of a counted request are set by count() */

    c->rejected = 1;
    c->remaining = 0;
    c->retry = (ngx_msec_t) ngx_http_llmlimit_wait(st, c, now, 1);
    c->reset = c->retry;

    return NGX_BUSY;
}


/* counts one request; the state has been rolled by check() */

void
ngx_http_llmlimit_algo_count(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  T, tat, remaining;

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + c->count - 1) / c->count;
        tat = ngx_max(st->t, now * 1000);
        st->t = tat + T;
        break;

    default: /* NGX_HTTP_LLMLIMIT_FIXED, NGX_HTTP_LLMLIMIT_SLIDING */
        if (st->cur < NGX_MAX_UINT32_VALUE) {
            st->cur++;
        }
        break;
    }

    remaining = ngx_http_llmlimit_remaining(st, c, now);

    c->remaining = (ngx_uint_t) remaining;
    c->reset = (ngx_msec_t) ngx_http_llmlimit_wait(st, c, now, remaining + 1);
}


/*
 * takes back what count() did, for a request that another zone rejected
 * right after; a window that has rolled meanwhile is left as it is
 */

void
ngx_http_llmlimit_algo_refund(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  T;

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + c->count - 1) / c->count;
        st->t -= T;
        break;

    default: /* NGX_HTTP_LLMLIMIT_FIXED, NGX_HTTP_LLMLIMIT_SLIDING */
        if (st->t == now - now % (int64_t) c->period && st->cur > 0) {
            st->cur--;
        }
        break;
    }
}


/* when the state is worth no more than a fresh one, ms */

int64_t
ngx_http_llmlimit_algo_expires(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c)
{
    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        return (st->t + 999) / 1000;

    case NGX_HTTP_LLMLIMIT_FIXED:
        return st->t + (int64_t) c->period;

    default: /* NGX_HTTP_LLMLIMIT_SLIDING */
        return st->t + 2 * (int64_t) c->period;
    }
}


static void
ngx_http_llmlimit_roll(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  P, w;

    if (c->algorithm == NGX_HTTP_LLMLIMIT_GCRA) {
        return;
    }

    P = c->period;
    w = now - now % P;

    if (w == st->t) {
        return;
    }

    if (c->algorithm == NGX_HTTP_LLMLIMIT_SLIDING && w - st->t == P) {
        st->prev = st->cur;

    } else {
        st->prev = 0;
    }

    st->cur = 0;
    st->t = w;
}


/*
 * The sliding window works in units of u ms, u = 1 for periods up to
 * 2^24 ms (4.6 hours), so that count * period stays within 64 bits.
 */

static ngx_inline int64_t
ngx_http_llmlimit_unit(int64_t P)
{
    int64_t  u;

    u = 1;

    while ((P / u) >> NGX_HTTP_LLMLIMIT_SCALE_BITS) {
        u <<= 1;
    }

    return u;
}


static int64_t
ngx_http_llmlimit_remaining(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  P, e, u, T, tat, count, used;

    count = c->count;

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + count - 1) / count;
        tat = ngx_max(st->t, now * 1000);
        used = (tat - now * 1000 + T - 1) / T;
        break;

    case NGX_HTTP_LLMLIMIT_FIXED:
        used = st->cur;
        break;

    default: /* NGX_HTTP_LLMLIMIT_SLIDING */
        u = ngx_http_llmlimit_unit(c->period);
        P = c->period / u;
        e = ngx_min((now - st->t) / u, P);
        used = st->cur + (st->prev * (P - e) + P - 1) / P;
        break;
    }

    if (used >= count) {
        return 0;
    }

    return count - used;
}


/* ms until n requests fit, n <= COUNT; 0 for n > COUNT (nothing is used) */

static int64_t
ngx_http_llmlimit_wait(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now, int64_t n)
{
    int64_t  P, e, u, T, K, tat, wait, count, cur, prev;

    count = c->count;

    if (n > count) {
        return 0;
    }

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + count - 1) / count;
        tat = ngx_max(st->t, now * 1000);
        wait = tat + (n - count) * T - now * 1000;
        return (wait <= 0) ? 0 : (wait + 999) / 1000;

    case NGX_HTTP_LLMLIMIT_FIXED:
        if (st->cur + n <= count) {
            return 0;
        }

        return st->t + (int64_t) c->period - now;

    default: /* NGX_HTTP_LLMLIMIT_SLIDING */
        break;
    }

    u = ngx_http_llmlimit_unit(c->period);
    P = c->period / u;
    e = ngx_min((now - st->t) / u, P);
    cur = st->cur;
    prev = st->prev;

    if (cur + n <= count) {

        if (prev == 0) {
            return 0;
        }

        /* the earliest e' with prev * (P - e') <= K * P */

        K = count - cur - n;
        wait = P - K * P / prev - e;

        if (wait <= 0) {
            return 0;
        }

        return wait * u - (now - st->t) % u;
    }

    /* next window: prev' = cur, cur' = 0, the earliest e'' likewise */

    K = count - n;
    wait = P - e + P - K * P / cur;

    return wait * u - (now - st->t) % u;
}
