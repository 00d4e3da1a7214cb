#!/usr/bin/perl

# The three algorithms: fixed windows reset at the aligned boundary, the
# sliding window does not admit 2 x COUNT across a boundary, GCRA allows a
# burst of COUNT and then one request per PERIOD / COUNT.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use LLMLimit::Test;

my $t = LLMLimit::Test->new(
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules fixed zone=z algorithm=fixed {
            "Fixed"     *  /fixed    $http_x_api_key  3/2s;
            "FixedB"    *  /fixedb   $http_x_api_key  10/4s;
        }
        llmlimit_rules sliding zone=z algorithm=sliding {
            "Sliding"   *  /sliding  $http_x_api_key  3/60s;
            "SlidingB"  *  /slidingb $http_x_api_key  10/4s;
        }
        llmlimit_rules dflt zone=z {
            "Default"   *  /default  $http_x_api_key  10/4s;
        }
        llmlimit_rules gcra zone=z algorithm=gcra {
            "Gcra"      *  /gcra     $http_x_api_key  3/3s;
            "GcraLong"  *  /gcral    $http_x_api_key  4/1h;
        }
    },
    config => q{
        llmlimit fixed;
        llmlimit sliding;
        llmlimit dflt;
        llmlimit gcra;

        location / {
            proxy_pass http://backend;
        }
    },
)->start;

my $c = $t->conn;

sub key { return (headers => { 'X-Api-Key' => $_[0] }) }

sub statuses {
    my ($uri, $key, $n) = @_;
    return [ map { $c->req("GET $uri", key($key))->status } 1 .. $n ];
}

sub admitted {
    my ($uri, $key, $n) = @_;
    return scalar grep { $_ == 200 } @{ statuses($uri, $key, $n) };
}


# --- fixed ----------------------------------------------------------------

{
    my $k = uid();

    wait_window(2, start => 1);

    my @r = map { $c->req('GET /fixed', key($k)) } 1 .. 4;
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'fixed: 3 pass, the 4th is rejected');
    is_deeply([ map { $_->header('X-RateLimit-Remaining') } @r[0 .. 2] ],
              [2, 1, 0], 'fixed: remaining counts down');
    my $reset = $r[0]->header('X-RateLimit-Reset') // '';
    ok($reset =~ /^\d+$/ && $reset <= 2,
       "fixed: reset within the 2s window ($reset)");
    my $ra = $r[3]->header('Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 1 && $ra <= 2,
       "fixed: Retry-After 1..2 ($ra)");

    wait_window(2, start => 1);

    is_deeply(statuses('/fixed', $k, 4), [200, 200, 200, 429],
              'fixed: the next window starts from zero');
}


# --- sliding: no 2 x COUNT across a boundary --------------------------------

{
    my $ks = uid();
    my $kd = uid();
    my $kf = uid();

    # 10 requests late in one 4s window ...
    my $start = wait_window(4, start => 1);
    sleep($start + 2.4 - time);

    is(admitted('/slidingb', $ks, 10), 10, 'sliding: 10 pass');
    is(admitted('/default', $kd, 10), 10, 'default algorithm: 10 pass');
    is(admitted('/fixedb', $kf, 10), 10, 'fixed: 10 pass');

    # ... and 10 more just after the boundary
    sleep($start + 4 + 0.4 - time);

    my $max = valgrind() ? 5 : 3;

    my $n = admitted('/slidingb', $ks, 10);
    ok($n <= $max, "sliding: only $n of 10 more pass just after the "
                   . "boundary (at most $max)");

    $n = admitted('/default', $kd, 10);
    ok($n <= $max, "sliding is the default: $n of 10 more pass "
                   . "(at most $max)");

    $n = admitted('/fixedb', $kf, 10);
    is($n, 10, 'fixed, for contrast: 10 more pass after the boundary');
}


# --- sliding: plain limit ---------------------------------------------------

{
    my $k = uid();
    wait_window(60, margin => 5 * slow());

    my @r = map { $c->req('GET /sliding', key($k)) } 1 .. 4;
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'sliding: 3 pass, the 4th is rejected');
    is_deeply([ map { $_->header('X-RateLimit-Remaining') } @r[0 .. 2] ],
              [2, 1, 0], 'sliding: remaining counts down');
    my $ra = $r[3]->header('Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 1 && $ra <= 120,
       "sliding: Retry-After 1..120 ($ra)");
}


# --- gcra -------------------------------------------------------------------

{
    my $k = uid();

    # a burst of COUNT
    my $t0 = time;
    my @r = map { $c->req('GET /gcra', key($k)) } 1 .. 4;
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'gcra: a burst of 3, the 4th is rejected');
    is_deeply([ map { $_->header('X-RateLimit-Remaining') } @r[0 .. 2] ],
              [2, 1, 0], 'gcra: remaining counts down');
    my $ra = $r[3]->header('Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 1 && $ra <= 2,
       "gcra: Retry-After about one emission interval ($ra)");

    # one request per PERIOD / COUNT = 1s after that
    sleep($t0 + 1.5 - time);
    is_deeply(statuses('/gcra', $k, 2), [200, 429],
              'gcra: 1.5s later one more passes, not two');

    # no window: the burst is not renewed at an aligned boundary
    my $kl = uid();
    is_deeply(statuses('/gcral', $kl, 5), [200, 200, 200, 200, 429],
              'gcra 4/1h: burst of 4');
    sleep(1);
    is_deeply(statuses('/gcral', $kl, 1), [429],
              'gcra 4/1h: a second later still nothing (15 min apart)');
}

finish();
