
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
 *            cur + floor(prev * (P - 1 - e) / P), e = now - t: the share
 *            of the previous window inside the sliding window (now - P,
 *            now], rounded down, so that a client pacing itself at
 *            COUNT / P is never rejected (README: the guarantees).
 *   gcra     t: theoretical arrival time (TAT), microseconds; emission
 *            interval T = ceil(P / COUNT), a request fits while
 *            TAT - now <= (COUNT - 1) * T.
 *
 * Costs.  A request limit counts 1 per request.  A token budget counts
 * the tokens estimated on admission (c->cost, 0 without an estimate) and
 * is charged what the request used when it ends (algo_charge(), up or
 * down): a request fits while max(cost, 1) fits.  A charge may drive the
 * budget past COUNT, an overdraft that later requests wait for; it is
 * remembered up to one more COUNT (sliding and fixed: cur <= 2 COUNT;
 * gcra: TAT <= now + 2 COUNT T), so that a wait stays within two PERIODs
 * and counts within 2^32 (token COUNT < 2^31).  The sliding window of a
 * token budget works in units below 2^21 ms instead of 2^24, so that
 * prev * units stays below 2^53 in the Redis script's doubles.
 *
 * Time never goes backwards for a counter: a "now" older than the state
 * (another worker's, a clock stepped back) counts as no time passed, and
 * a window only ever moves forward, as limit_req clamps a negative
 * elapsed time.  "now" itself is read afresh for every decision.
 */


#include "ngx_http_llmlimit.h"


/* keep products of counts and periods exact (see above) */
#define NGX_HTTP_LLMLIMIT_SCALE_BITS  24
#define NGX_HTTP_LLMLIMIT_TOKEN_BITS  21


static void ngx_http_llmlimit_roll(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
static ngx_inline int64_t ngx_http_llmlimit_gcra_now(
    ngx_http_llmlimit_state_t *st, ngx_http_llmlimit_counter_t *c,
    int64_t now, int64_t T);
static int64_t ngx_http_llmlimit_remaining(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now);
static int64_t ngx_http_llmlimit_wait(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now, int64_t n);


/*
 * The wall clock, ms, read afresh: never the worker's cached time, which
 * timer_resolution or a long turn of the event loop can leave 100 ms and
 * more behind the other workers'.  The coarse clock costs a few
 * nanoseconds (no system call) and is a few ms fine.
 */

int64_t
ngx_http_llmlimit_now(void)
{
#if defined(CLOCK_REALTIME_COARSE)
    struct timespec  ts;

    (void) clock_gettime(CLOCK_REALTIME_COARSE, &ts);

    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
#else
    struct timeval  tv;

    ngx_gettimeofday(&tv);

    return (int64_t) tv.tv_sec * 1000 + tv.tv_usec / 1000;
#endif
}


/* what a counter needs to fit: 1, or a token estimate (at most COUNT) */

static ngx_inline int64_t
ngx_http_llmlimit_need(ngx_http_llmlimit_counter_t *c)
{
    return (c->cost > 1) ? (int64_t) ngx_min(c->cost, c->count) : 1;
}


/* what a counter's state holds at most: one COUNT of overdraft */

static ngx_inline int64_t
ngx_http_llmlimit_room(ngx_http_llmlimit_counter_t *c)
{
    return c->tokens ? 2 * (int64_t) c->count : NGX_MAX_UINT32_VALUE;
}


ngx_int_t
ngx_http_llmlimit_algo_check(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  need, remaining;

    ngx_http_llmlimit_roll(st, c, now);

    need = ngx_http_llmlimit_need(c);
    remaining = ngx_http_llmlimit_remaining(st, c, now);

    if (remaining >= need) {
        c->rejected = 0;
        return NGX_OK;
    }

    /* the results of a counted request are set by count() */

    c->rejected = 1;
    c->remaining = (ngx_uint_t) remaining;
    c->retry = (ngx_msec_t) ngx_http_llmlimit_wait(st, c, now, need);
    c->reset = c->retry;

    return NGX_BUSY;
}


/*
 * the results of a counter that fits, in a request that another counter
 * rejected: nothing is counted
 */

void
ngx_http_llmlimit_algo_peek(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  remaining;

    remaining = ngx_http_llmlimit_remaining(st, c, now);

    c->remaining = (ngx_uint_t) remaining;
    c->reset = (ngx_msec_t) ngx_http_llmlimit_wait(st, c, now, remaining + 1);
}


/* counts one request (its cost), checked or not */

void
ngx_http_llmlimit_algo_count(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    ngx_http_llmlimit_roll(st, c, now);
    ngx_http_llmlimit_algo_charge(st, c, now, c->tokens ? c->cost : 1, 0);
    ngx_http_llmlimit_algo_peek(st, c, now);
}


/*
 * takes back what count() did at "counted", for a request that another
 * zone rejected after; a window that has rolled since is left as it is
 * (the count is no longer in "cur")
 */

void
ngx_http_llmlimit_algo_refund(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t counted)
{
    ngx_http_llmlimit_algo_charge(st, c, counted,
                                  c->tokens ? -(int64_t) c->cost : -1,
                                  counted);
}


/*
 * Adds delta to a counter at "now": up to the state's room; a negative
 * delta takes back from what was counted at "counted", as refund().
 */

void
ngx_http_llmlimit_algo_charge(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now, int64_t delta,
    int64_t counted)
{
    int64_t  T, us, tat, room;

    if (delta == 0) {
        return;
    }

    room = ngx_http_llmlimit_room(c);

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + c->count - 1) / c->count;

        if (delta < 0) {
            st->t -= ngx_min(-delta, (int64_t) c->count) * T;
            break;
        }

        us = ngx_http_llmlimit_gcra_now(st, c, now, T);
        tat = ngx_max(st->t, us);

        if (c->tokens) {
            st->t = tat + ngx_min(delta, room - (tat - us) / T) * T;

        } else {
            st->t = tat + delta * T;
        }

        break;

    default: /* NGX_HTTP_LLMLIMIT_FIXED, NGX_HTTP_LLMLIMIT_SLIDING */

        if (delta < 0) {
            if (st->t == counted - counted % (int64_t) c->period) {
                st->cur -= (uint32_t) ngx_min(-delta, (int64_t) st->cur);
            }

            break;
        }

        ngx_http_llmlimit_roll(st, c, now);

        st->cur = (uint32_t) ngx_min((int64_t) st->cur + delta, room);
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

    if (w <= st->t) {
        /* the same window, or an older "now": no time passed */
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
 * GCRA's "now", microseconds.  The TAT is never more than COUNT emission
 * intervals ahead of a clock that only moves forward (2 COUNT for a token
 * budget, which may be overdrawn): one further ahead
 * was set by a clock that has stepped back since, and that now counts as
 * no time passed, so that waits stay within a PERIOD.
 */

static ngx_inline int64_t
ngx_http_llmlimit_gcra_now(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now, int64_t T)
{
    return ngx_max(now * 1000,
                   st->t - (int64_t) c->count * T * (c->tokens ? 2 : 1));
}


/*
 * The sliding window works in units of u ms, u = 1 for periods up to
 * 2^24 ms (4.6 hours; 2^21 ms, 35 minutes, for a token budget), so that
 * count * period stays exact in the Redis script's doubles.
 */

static ngx_inline int64_t
ngx_http_llmlimit_unit(ngx_http_llmlimit_counter_t *c)
{
    int64_t     u, P;
    ngx_uint_t  bits;

    u = 1;
    P = c->period;
    bits = c->tokens ? NGX_HTTP_LLMLIMIT_TOKEN_BITS
                     : NGX_HTTP_LLMLIMIT_SCALE_BITS;

    while ((P / u) >> bits) {
        u <<= 1;
    }

    return u;
}


static int64_t
ngx_http_llmlimit_remaining(ngx_http_llmlimit_state_t *st,
    ngx_http_llmlimit_counter_t *c, int64_t now)
{
    int64_t  P, e, u, T, us, tat, count, used;

    count = c->count;

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + count - 1) / count;
        us = ngx_http_llmlimit_gcra_now(st, c, now, T);
        tat = ngx_max(st->t, us);
        used = (tat - us + T - 1) / T;
        break;

    case NGX_HTTP_LLMLIMIT_FIXED:
        used = st->cur;
        break;

    default: /* NGX_HTTP_LLMLIMIT_SLIDING */
        u = ngx_http_llmlimit_unit(c);
        P = c->period / u;
        e = ngx_min(ngx_max(now - st->t, 0) / u, P);
        used = st->cur + st->prev * ngx_max(P - 1 - e, 0) / P;
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
    int64_t  P, d, e, u, T, K, us, tat, wait, count, cur, prev;

    count = c->count;

    if (n > count) {
        return 0;
    }

    switch (c->algorithm) {

    case NGX_HTTP_LLMLIMIT_GCRA:
        T = ((int64_t) c->period * 1000 + count - 1) / count;
        us = ngx_http_llmlimit_gcra_now(st, c, now, T);
        tat = ngx_max(st->t, us);
        wait = tat + (n - count) * T - us;
        return (wait <= 0) ? 0 : (wait + 999) / 1000;

    case NGX_HTTP_LLMLIMIT_FIXED:
        if (st->cur + n <= count) {
            return 0;
        }

        return (int64_t) c->period - ngx_max(now - st->t, 0);

    default: /* NGX_HTTP_LLMLIMIT_SLIDING */
        break;
    }

    u = ngx_http_llmlimit_unit(c);
    P = c->period / u;
    d = ngx_max(now - st->t, 0);
    e = ngx_min(d / u, P);
    cur = st->cur;
    prev = st->prev;

    /*
     * n more fit at the earliest e' (units into a window whose previous
     * window holds m) with floor(m * (P - 1 - e') / P) <= K, that is
     * e' = P - ceil((K + 1) * P / m), or at once when m <= K
     */

    if (cur + n <= count) {
        K = count - cur - n;

        if (prev <= K) {
            return 0;
        }

        wait = P - ((K + 1) * P + prev - 1) / prev - e;

        if (wait <= 0) {
            return 0;
        }

        return wait * u - d % u;
    }

    /* in the next window: prev' = cur, cur' = 0, and cur > count - n */

    K = count - n;

    wait = P - e + P - ((K + 1) * P + cur - 1) / cur;

    return wait * u - d % u;
}
