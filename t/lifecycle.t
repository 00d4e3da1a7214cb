#!/usr/bin/perl

# Reload keeps the counters (and applies changed limits at once), but
# starts afresh those whose algorithm= or PERIOD changed, a tiny zone
# flooded with 100 000 identities keeps serving and logs the eviction,
# expired counters are reclaimed before any is evicted, a 6 KB API key, and
# no raw key in the error log.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

require "$FindBin::Bin/redis-lib.pl";

my $SERVER = q{
    llmlimit t;

    location / {
        proxy_pass http://backend;
    }
};

sub rules {
    my ($limit, $size) = @_;
    $size //= '1m';
    return qq{
        llmlimit_zone  z $size;
        llmlimit_rules t zone=z {
            "Cat"  *  *  \$http_x_api_key  $limit;
        }
    };
}


# --- reload -------------------------------------------------------------------

{
    my $t = LLMLimit::Test->new(http => rules('3/1h'), config => $SERVER,
                                workers => 2)->start;

    # the whole test inside one hour window
    wait_window(3600, margin => valgrind() ? 300 : 60);

    my %k = (headers => { 'X-Api-Key' => uid() });

    my @r = map { $t->req('GET /', %k) } 1 .. 2;
    is_deeply([ map { $_->header('X-RateLimit-Remaining') } @r ], [2, 1],
              'before reload: 2 of 3 used');

    ok($t->reload(http => rules('3/1h')), 'reload, same configuration');

    my $r = $t->req('GET /', %k);
    is($r->status, 200, 'after reload: passes');
    is($r->header('X-RateLimit-Remaining'), 0,
       'after reload: the counter was kept');
    is($t->req('GET /', %k)->status, 429, 'after reload: then 429');

    ok($t->reload(http => rules('5/1h')), 'reload with a higher limit');

    $r = $t->req('GET /', %k);
    is($r->status, 200, 'the changed limit applies at once');
    is($r->header('X-RateLimit-Limit'), 5, 'X-RateLimit-Limit 5');
    is($r->header('X-RateLimit-Remaining'), 1,
       'the counter kept its 3 requests: 5 - 4 = 1');

    ok($t->reload(http => rules('5/1h', '2m')), 'reload with a new size');
    is($t->req('GET /', headers => { 'X-Api-Key' => uid() })->status, 200,
       'a resized zone serves');

    ok($t->reload(http => rules('5/1h', '2m') . q{
        llmlimit_zone  y 1m;
    }), 'reload adding a zone');
    is($t->req('GET /', headers => { 'X-Api-Key' => uid() })->status, 200,
       'serves');

    $t->stop(name => 'reload');
}


# --- reload: algorithm= and PERIOD name the counter --------------------------
#
# A counter is (table, category, KEY expression, identity, PERIOD,
# algorithm): a reload that changes the table's algorithm= or a limit's
# PERIOD starts it afresh, in shared memory and in Redis alike, while a new
# COUNT, or the same period written another way (1h, 60m), keeps it.

sub table {
    my ($limit, $algorithm, $redis) = @_;
    my $zone = $redis ? ' redis=' . $redis->addr : '';
    return qq{
        llmlimit_zone  z 1m$zone;
        llmlimit_rules t zone=z algorithm=$algorithm {
            "Cat"  *  *  \$http_x_api_key  $limit;
        }
    };
}

for my $store ('shm', 'redis') {
    SKIP: {
        skip 'redis-server not installed', 12
            if $store eq 'redis' && !LLMLimit::Redis::available();

        my $rd = $store eq 'redis' ? LLMLimit::Redis->new : undef;

        my $t = LLMLimit::Test->new(http => table('3/1h', 'sliding', $rd),
                                    config => $SERVER, workers => 2)->start;

        # inside one hour window, so inside one of 2h (aligned) too
        wait_window(3600, margin => valgrind() ? 300 : 60);

        my %k = (headers => { 'X-Api-Key' => uid() });

        my $remaining = sub {
            my $r = $t->req('GET /', %k);
            return $r->status == 200 ? $r->header('X-RateLimit-Remaining')
                                     : 'status ' . $r->status;
        };

        $remaining->();
        is($remaining->(), 1, "$store: sliding 3/1h, 2 used");

        ok($t->reload(http => table('3/60m', 'sliding', $rd)),
           "$store: reload, 3/60m");
        is($remaining->(), 0, "$store: 60m is 1h: the counter was kept");

        ok($t->reload(http => table('3/60m', 'fixed', $rd)),
           "$store: reload, algorithm=fixed");
        is($remaining->(), 2, "$store: algorithm changed: counted afresh");

        ok($t->reload(http => table('3/2h', 'fixed', $rd)),
           "$store: reload, 3/2h");
        is($remaining->(), 2, "$store: period changed: counted afresh");

        ok($t->reload(http => table('5/2h', 'fixed', $rd)),
           "$store: reload, 5/2h");
        is($remaining->(), 3, "$store: count changed: the counter was kept");

        if ($rd) {
            # decided in Redis: a key per period and algorithm (and window:
            # s sliding, f fixed), each holding what it counted
            my @keys = sort $rd->keys;
            is_deeply([ map { [ /:(\d+):([fs])\d+$/, $rd->cmd('GET', $_) ] }
                        @keys ],
                      [ [ 3600000, 'f', 1 ], [ 3600000, 's', 3 ],
                        [ 7200000, 'f', 2 ] ],
                      'redis: keys PREFIX{hash}:PERIOD:fWINDOW and '
                      . ':sWINDOW, what each counted')
                or diag(join ', ', map { "$_ = " . $rd->cmd('GET', $_) }
                                   @keys);
        }

        unlike($t->error_log, qr/ lost: /, "$store: Redis was never lost")
            if $rd;

        $t->stop(name => "reload, $store");
        $rd->stop if $rd;
    }
}


# --- a tiny zone flooded ---------------------------------------------------------

{
    my $t = LLMLimit::Test->new(
        http => q{
            llmlimit_zone  tiny 32k;
            llmlimit_rules t zone=tiny {
                "Flood"  *  *  $http_x_api_key  5/1h;
            }
        },
        config => $SERVER,
        workers => 2,
    )->start;

    my $n = valgrind() ? 4_000 : 100_000;
    my $clients = 4;
    my $tag = uid('flood');

    my @res = parallel($clients, sub {
        my ($i) = @_;
        my $c = $t->conn;
        my %s;
        for my $j (1 .. $n / $clients) {
            my $r = $c->req('GET /',
                            headers => { 'X-Api-Key' => "$tag-$i-$j" });
            $s{ $r->status }++;
        }
        return \%s;
    });

    my %total;
    for my $s (@res) {
        diag("client error: $s->{error}") if $s->{error};
        $total{$_} += $s->{$_} for grep { $_ ne 'error' } keys %$s;
    }

    is($total{200} // 0, $n, "$n identities, each answered 200")
        or diag(explain(\%total));

    like($t->error_log, qr/\[warn\][^\n]*(evict|full)/i,
         'the eviction is logged as a warning');

    my $lines = () = $t->error_log =~ /^.*\[warn\].*(evict|full).*$/mig;
    ok($lines < 1000, "the warning is rate-limited ($lines lines)");

    admits_exactly($t, 'GET /', count => 5, period => 3600,
                   headers => sub { { 'X-Api-Key' => uid() } },
                   name => 'after the flood a fresh identity gets exactly 5');

    $t->stop(name => 'flood');
}


# --- expired counters go before any is evicted ---------------------------------

# Zones "a" and "b" have one size, so one capacity: "a" measures it (new
# identities, which never expire, until its zone-full warning), "b" then
# takes 0.7 of it, lets those counters expire, and takes 0.7 of it again:
# no eviction, no warning, as the expired counters are reclaimed first.
# 1.2 of it, none expiring, must then evict.
{
    my $t = LLMLimit::Test->new(
        http => q{
            llmlimit_zone  a 64k;
            llmlimit_zone  b 64k;
            llmlimit_rules ta zone=a algorithm=fixed {
                "A"  *  *  $http_x_api_key  1/1h;
            }
            llmlimit_rules tb zone=b algorithm=fixed {
                "B"  *  *  $http_x_api_key  1/1s;
            }
            llmlimit_rules tl zone=b algorithm=fixed {
                "Long"  *  *  $http_x_api_key  1/1h;
            }
        },
        config => q{
            location /a {
                llmlimit ta;
                proxy_pass http://backend;
            }
            location /b {
                llmlimit tb;
                proxy_pass http://backend;
            }
            location /long {
                llmlimit tl;
                proxy_pass http://backend;
            }
        },
    )->start;

    my $c = $t->conn;
    my $tag = uid('expire');
    my $full = sub { $t->error_log =~ /zone "$_[0]" is full/ };

    my $cap = 0;
    while (!$full->('a') && $cap < 20_000) {
        $c->req('GET /a', headers => { 'X-Api-Key' => "$tag-a-" . $cap++ })
            for 1 .. 10;
    }
    ok($full->('a'), "zone a holds about $cap counters");

    my $pass = sub {
        my ($uri, $from, $n) = @_;
        my $ok = 0;
        for my $i ($from .. $from + $n - 1) {
            $ok++ if $c->req("GET $uri",
                             headers => { 'X-Api-Key' => "$tag-b-$i" })
                       ->status == 200;
        }
        return $ok;
    };

    my $n = int($cap * 0.7);

    is($pass->('/b', 0, $n), $n, "zone b: $n identities pass");
    sleep 2.5;
    is($pass->('/b', $n, $n), $n, "zone b: $n more once the first expired");
    ok(!$full->('b'), 'zone b: the expired counters made room, no eviction');

    # more counters than the zone holds, none expiring: the warning shows
    my $m = int($cap * 1.2);

    is($pass->('/long', 0, $m), $m, "zone b: $m identities for an hour");
    ok($full->('b'), 'zone b: then counters are evicted, with the warning');

    $t->stop(name => 'expire');
}



# --- long keys, no raw key in the log ----------------------------------------

{
    my $t = LLMLimit::Test->new(
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Cat"  *  *  $http_x_api_key  2/1h;
            }
        },
        config => q{
            llmlimit t;
            llmlimit_log_level info;

            location / {
                proxy_pass http://backend;
            }
        },
    )->start;

    wait_window(3600, margin => valgrind() ? 120 : 30);

    my $base = join '', map { ('a' .. 'z', 0 .. 9)[rand 36] } 1 .. 6144;
    my $k1 = $base;
    my $k2 = substr($base, 0, -1) . ($base =~ /z$/ ? 'y' : 'z');
    my $k3 = ($base =~ /^z/ ? 'y' : 'z') . substr($base, 1);

    my @s = map { $t->conn->req('GET /', headers => { 'X-Api-Key' => $k1 })
                       ->status } 1 .. 3;
    is_deeply(\@s, [200, 200, 429], '6 KB key: 2 pass, 429');

    @s = map { $t->conn->req('GET /', headers => { 'X-Api-Key' => $k2 })
                   ->status } 1 .. 3;
    is_deeply(\@s, [200, 200, 429],
              '6 KB key differing in the last byte: its own budget');

    @s = map { $t->conn->req('GET /', headers => { 'X-Api-Key' => $k3 })
                   ->status } 1 .. 3;
    is_deeply(\@s, [200, 200, 429],
              '6 KB key differing in the first byte: its own budget');

    my $secret = 'SECRET-' . uid('key');
    @s = map { $t->conn->req('GET /', headers => { 'X-Api-Key' => $secret })
                   ->status } 1 .. 4;
    is_deeply(\@s, [200, 200, 429, 429], 'secret key rejected');

    my $log = $t->error_log;
    like($log, qr/Cat/, 'the rejections are logged with the category');
    unlike($log, qr/SECRET-/, 'the raw key is not in error.log');
    ok(index($log, substr($base, 0, 32)) < 0
       && index($log, substr($base, -32)) < 0,
       'no part of the 6 KB keys is in error.log');

    $t->stop(name => 'keys');
}

finish();
