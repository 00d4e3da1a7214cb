# The Redis script computes exactly what src/ngx_http_llmlimit_algo.c
# computes: a small C driver, built here against the repository's algo.c
# and script, replays random request sequences (several counters, all three
# algorithms, periods from 1s to 30d, times from bursts to gaps of two
# periods) through both and compares every result algo.c defines.  Some
# steps send several requests (sharing counters) in one call, as a worker
# does with the requests of one event-loop turn; algo.c sees them one after
# the other.  Now and then a request just counted is taken back, by
# algo_refund() and by a refund entry of the script, as when a later zone
# rejects it.  The script gets the driver's clock instead of TIME, and keys
# without TTLs, so that both see the same time.
#
# Needs gcc, libhiredis-dev and the configured nginx tree of the build
# (LLMLIMIT_NGX_TREE, default: the directory "nginx" next to the module).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use File::Basename qw(dirname);
use File::Temp qw(tempdir);

require "$FindBin::Bin/redis-lib.pl";

my $ROOT = $LLMLimit::Test::ROOT;
my $TREE = $ENV{LLMLIMIT_NGX_TREE} || dirname($LLMLimit::Test::MODULE) . '/nginx';

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();
plan skip_all => "no configured nginx tree at $TREE"
    unless -f "$TREE/objs/ngx_auto_config.h";
plan skip_all => 'no gcc or hiredis headers'
    unless system('command -v gcc >/dev/null 2>&1') == 0
           && -f '/usr/include/hiredis/hiredis.h';

my $dir = tempdir('llmlimit-algo-XXXXXX', TMPDIR => 1, CLEANUP => 1);

open my $fh, '>', "$dir/driver.c" or die $!;
print $fh <DATA>;
close $fh;

my @inc = map { "-I$TREE/$_" }
          qw(src/core src/event src/event/modules src/os/unix objs src/http
             src/http/modules src/http/v2);

my $out = `gcc -O1 -o $dir/driver $dir/driver.c $ROOT/src/ngx_http_llmlimit_algo.c @inc -I$ROOT/src -lhiredis 2>&1`;
is($?, 0, 'driver built') or diag($out);

my $rd = LLMLimit::Redis->new;

for my $seed (1 .. 6) {
    my $res = `$dir/driver @{[ $rd->port ]} 400 $seed 2>&1`;
    like($res, qr/^done: \d+ steps, 0 mismatches$/m,
         "seed $seed: the script and algo.c agree")
        or diag(substr($res, 0, 3000));
}

$rd->stop;

done_testing();


__DATA__
#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_llmlimit.h"
#include "ngx_http_llmlimit_redis_lua.h"
#include <hiredis/hiredis.h>

/* requests in one call, at most */
#define MAXREQ  5

/* algo.c's ngx_http_llmlimit_now() refers to it; unused here */
volatile ngx_time_t  *ngx_cached_time;

static const char  now_line[] =
    "local now = tm[1] * 1000 + floor(tm[2] / 1000)\n";
static const char  ttl_expr[] = "max(e - now, 1)";


static char *
script_with_clock(void)
{
    char        *s, *p, *q;
    const char  *src = ngx_http_llmlimit_redis_lua;

    s = malloc(sizeof(ngx_http_llmlimit_redis_lua) + 128);

    p = strstr(src, now_line);
    q = strstr(src, ttl_expr);

    if (s == NULL || p == NULL || q == NULL || q < p) {
        printf("the script's clock or TTL line moved\n");
        exit(1);
    }

    sprintf(s, "%.*slocal now = tonumber(ARGV[#ARGV])\n%.*s1e9%s",
            (int) (p - src), src,
            (int) (q - p - strlen(now_line)), p + strlen(now_line),
            q + strlen(ttl_expr));

    return s;
}


int
main(int argc, char **argv)
{
    static const ngx_msec_t  periods[] = {
        1000, 999, 7000, 10000, 60000, 3600000, 86400000, 2592000000UL
    };

    int            port, it, iters, i, j, n, k, k2, steps, ac, bad, m, q;
    int            o, w;
    int            nkeys, nq[MAXREQ], rej[MAXREQ];
    long           total, refunds, charges;
    char          *script, keys[3][64], nums[12][32], nn[MAXREQ + 4][32],
                   lim[3][8], ns[MAXREQ], cs[3 * MAXREQ], amounts[6][32];
    int            x, ne, ek[6];
    int64_t        now, dt, amount, used, later;
    size_t         al[32 + 6 * MAXREQ * 3];
    const char    *av[32 + 6 * MAXREQ * 3];
    redisReply    *r, *e;
    redisContext  *rc;

    ngx_http_llmlimit_counter_t  c[3], out[MAXREQ][3];
    ngx_http_llmlimit_state_t    st[3];

    port = atoi(argv[1]);
    iters = atoi(argv[2]);
    srand(atoi(argv[3]));

    rc = redisConnect("127.0.0.1", port);
    if (rc == NULL || rc->err) {
        printf("cannot connect\n");
        return 1;
    }

    script = script_with_clock();
    bad = 0;
    total = 0;
    refunds = 0;
    charges = 0;

    for (it = 0; it < iters; it++) {
        n = 1 + rand() % 3;
        steps = 5 + rand() % 60;
        now = 1795426400000LL + rand() % 100000;

        for (i = 0; i < n; i++) {
            memset(&c[i], 0, sizeof(c[i]));
            memset(&st[i], 0, sizeof(st[i]));
            c[i].algorithm = rand() % 3;
            c[i].period = periods[rand() % 8];
            c[i].count = (rand() % 4 == 0) ? 1 + rand() % 3
                                           : 1 + rand() % 1000;
            c[i].cost = 1;

            /* a token budget: large counts, an estimate counted */

            if (rand() % 3 == 0) {
                c[i].tokens = 1;

                if (rand() % 2) {
                    c[i].count = 1 + ((unsigned long) rand() * 4099
                                      + rand()) % 0x7fffffff;
                }

                c[i].cost = (rand() % 3 == 0) ? 0
                                              : rand() % (c[i].count + 1);
            }

            sprintf(keys[i], "algo:%d:%d", it, i);
        }

        r = redisCommand(rc, "FLUSHALL");
        freeReplyObject(r);

        for (k = 0; k < steps; k++) {
            switch (rand() % 4) {
            case 0:  dt = 0; break;
            case 1:  dt = rand() % 50; break;
            case 2:  dt = rand() % (c[0].period / 4 + 1); break;
            default: dt = rand() % (2 * c[0].period + 1); break;
            }

            now += dt;

            /*
             * m requests at the same time, as one call sends them:
             * request q has the first nq[q] counters
             */

            m = (rand() % 3 == 0) ? 1 + rand() % MAXREQ : 1;

            for (q = 0; q < m; q++, total++) {
                nq[q] = (q == 0 || rand() % 2) ? n : 1 + rand() % n;

                /* algo.c, as the shared-memory store uses it */

                rej[q] = 0;

                for (i = 0; i < nq[q]; i++) {
                    out[q][i] = c[i];

                    if (ngx_http_llmlimit_algo_check(&st[i], &out[q][i], now)
                        != NGX_OK)
                    {
                        rej[q] = 1;
                    }
                }

                if (!rej[q]) {
                    for (i = 0; i < nq[q]; i++) {
                        ngx_http_llmlimit_algo_count(&st[i], &out[q][i], now);
                    }
                }
            }

            /*
             * the script: counter i of every request has limit i + 1
             * (kind, period, count, cost)
             */

            for (i = 0; i < n; i++) {
                sprintf(nums[4 * i], "%d",
                        (int) c[i].algorithm + (c[i].tokens ? 4 : 0));
                sprintf(nums[4 * i + 1], "%lu", (unsigned long) c[i].period);
                sprintf(nums[4 * i + 2], "%lu", (unsigned long) c[i].count);
                sprintf(nums[4 * i + 3], "%lu", (unsigned long) c[i].cost);
                sprintf(lim[i], "%d", i + 1);
            }

            nkeys = 0;

            for (q = 0; q < m; q++) {
                nkeys += nq[q];
                sprintf(nn[q], "%d", nq[q]);
            }

            sprintf(nn[MAXREQ], "%d", nkeys);
            sprintf(nn[MAXREQ + 1], "%d", m);
            sprintf(nn[MAXREQ + 2], "%lld", (long long) now);
            sprintf(nn[MAXREQ + 3], "%d", n);

            ac = 0;
            av[ac] = "EVAL"; al[ac++] = 4;
            av[ac] = script; al[ac++] = strlen(script);
            av[ac] = nn[MAXREQ]; al[ac++] = strlen(nn[MAXREQ]);

            for (q = 0; q < m; q++) {
                for (i = 0; i < nq[q]; i++) {
                    av[ac] = keys[i]; al[ac++] = strlen(keys[i]);
                }
            }

            av[ac] = nn[MAXREQ + 1]; al[ac++] = strlen(nn[MAXREQ + 1]);
            av[ac] = nn[MAXREQ + 3]; al[ac++] = strlen(nn[MAXREQ + 3]);
            av[ac] = "0"; al[ac++] = 1;     /* no entries */

            for (i = 0; i < 4 * n; i++) {
                av[ac] = nums[i]; al[ac++] = strlen(nums[i]);
            }

            /* a byte per request, its counters; per counter, its limit */

            for (q = 0, j = 0; q < m; q++) {
                ns[q] = (char) nq[q];

                for (i = 0; i < nq[q]; i++) {
                    cs[j++] = (char) i;
                }
            }

            av[ac] = ns; al[ac++] = m;
            av[ac] = cs; al[ac++] = j;

            av[ac] = nn[MAXREQ + 2]; al[ac++] = strlen(nn[MAXREQ + 2]);

            r = redisCommandArgv(rc, ac, av, al);

            /* counted: 2 results per counter, rejected: 4 */

            for (q = 0, o = 1; q < m; q++) {
                o += 1 + (rej[q] ? 4 : 2) * nq[q];
            }

            if (r == NULL || r->type != REDIS_REPLY_ARRAY
                || r->elements != (size_t) o
                || r->element[0]->integer != now)
            {
                printf("bad reply: %s\n",
                       r && r->type == REDIS_REPLY_ERROR ? r->str : "?");
                return 1;
            }

            for (q = 0, o = 1; q < m; o += 1 + w * nq[q], q++) {

                if (r->element[o]->integer != rej[q]) {
                    bad++;
                    printf("scenario %d step %d request %d/%d: status %lld, "
                           "algo.c %d\n", it, k, q, m,
                           r->element[o]->integer, rej[q]);
                }

                w = rej[q] ? 4 : 2;

                for (i = 0; i < nq[q]; i++) {
                    long long  v[4];

                    /* a passing counter of a rejected request: no results */

                    if (rej[q] && !out[q][i].rejected) {
                        if (r->element[o + 1 + 4 * i]->integer != 0) {
                            bad++;
                            printf("scenario %d step %d request %d/%d "
                                   "counter %d: rejected by the script "
                                   "only\n", it, k, q, m, i);
                        }

                        continue;
                    }

                    v[0] = out[q][i].rejected;
                    v[1] = out[q][i].remaining;
                    v[2] = out[q][i].reset;
                    v[3] = out[q][i].retry;

                    /*
                     * a counted request's counters: remaining and reset
                     * (v[1], v[2]) only; a rejected one's: all four
                     */

                    for (j = (w == 4) ? 0 : 1; j <= ((w == 4) ? 3 : 2); j++) {
                        e = r->element[o + 1 + w * i + j - (w == 4 ? 0 : 1)];

                        if (e->integer == v[j]) {
                            continue;
                        }

                        bad++;
                        printf("scenario %d step %d request %d/%d counter %d "
                               "(algorithm %d, %lu/%lums) field %d: "
                               "script %lld, algo.c %lld\n",
                               it, k, q, m, i, (int) c[i].algorithm,
                               (unsigned long) c[i].count,
                               (unsigned long) c[i].period, j,
                               e->integer, v[j]);
                    }
                }
            }

            freeReplyObject(r);

            /*
             * now and then a request just counted is taken back, as when
             * a later zone rejects it, or its token budgets are charged
             * what it used, at once or up to two periods later (in a
             * window the counter may have moved to since): a call of
             * refund entries only, two for a fixed or sliding token budget
             * (the estimate taken back, the usage charged), as
             * src/ngx_http_llmlimit_redis.c sends them
             */

            q = rand() % m;

            if (!rej[q] && rand() % 3 == 0) {
                k2 = rand() % 2;
                later = now;

                if (k2) {
                    charges++;

                    if (rand() % 2) {
                        later = now + rand() % (2 * c[0].period + 1);
                    }

                } else {
                    refunds++;
                }

                ne = 0;

                for (i = 0; i < nq[q]; i++) {
                    if (!k2 || !c[i].tokens) {
                        ngx_http_llmlimit_algo_refund(&st[i], &out[q][i],
                                                      now);
                        ek[ne] = i;
                        sprintf(amounts[ne++], "%lld",
                                -(long long) c[i].cost);
                        continue;
                    }

                    used = rand() % (3 * c[i].count + 1);
                    ngx_http_llmlimit_algo_charge(&st[i], &out[q][i], later,
                                                  used, now);

                    if (c[i].algorithm == NGX_HTTP_LLMLIMIT_GCRA) {
                        amount = used - (int64_t) c[i].cost;

                        if (amount != 0) {
                            ek[ne] = i;
                            sprintf(amounts[ne++], "%lld", (long long) amount);
                        }

                        continue;
                    }

                    if (c[i].cost) {
                        ek[ne] = i;
                        sprintf(amounts[ne++], "%lld",
                                -(long long) c[i].cost);
                    }

                    if (used) {
                        ek[ne] = i;
                        sprintf(amounts[ne++], "%lld", (long long) used);
                    }
                }

                now = later;
                sprintf(nn[MAXREQ + 3], "%d", ne);
                sprintf(nn[MAXREQ + 1], "%lld", (long long) now);

                /* no request, nq[q] limits, ne entries (signed amounts) */

                sprintf(nn[MAXREQ], "%d", nq[q]);

                ac = 0;
                av[ac] = "EVAL"; al[ac++] = 4;
                av[ac] = script; al[ac++] = strlen(script);
                av[ac] = nn[MAXREQ + 3]; al[ac++] = strlen(nn[MAXREQ + 3]);

                for (x = 0; x < ne; x++) {
                    av[ac] = keys[ek[x]]; al[ac++] = strlen(keys[ek[x]]);
                }

                av[ac] = "0"; al[ac++] = 1;
                av[ac] = nn[MAXREQ]; al[ac++] = strlen(nn[MAXREQ]);
                av[ac] = nn[MAXREQ + 3]; al[ac++] = strlen(nn[MAXREQ + 3]);

                for (i = 0; i < nq[q]; i++) {
                    for (j = 0; j < 4; j++) {
                        av[ac] = nums[4 * i + j];
                        al[ac++] = strlen(nums[4 * i + j]);
                    }
                }

                for (x = 0; x < ne; x++) {
                    av[ac] = lim[ek[x]]; al[ac++] = strlen(lim[ek[x]]);
                    av[ac] = amounts[x]; al[ac++] = strlen(amounts[x]);
                    av[ac] = nn[MAXREQ + 2]; al[ac++] = strlen(nn[MAXREQ + 2]);
                }

                av[ac] = ""; al[ac++] = 0;      /* no request, no counter */
                av[ac] = ""; al[ac++] = 0;
                av[ac] = nn[MAXREQ + 1]; al[ac++] = strlen(nn[MAXREQ + 1]);

                r = redisCommandArgv(rc, ac, av, al);

                if (r == NULL || r->type != REDIS_REPLY_ARRAY
                    || r->elements != 1)
                {
                    printf("bad refund reply: %s\n",
                           r && r->type == REDIS_REPLY_ERROR ? r->str : "?");
                    return 1;
                }

                freeReplyObject(r);
            }

            if (bad > 20) {
                printf("done: %ld steps, %d mismatches\n", total, bad);
                return 1;
            }
        }
    }

    printf("refunds: %ld, charges: %ld\n", refunds, charges);
    printf("done: %ld steps, %d mismatches\n", total, bad);

    return bad != 0;
}
