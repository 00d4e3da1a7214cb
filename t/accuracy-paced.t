#!/usr/bin/perl

# A client that keeps to its limit is never rejected (issue 8): each
# algorithm, in shared memory and in Redis (default redis_timeout), a
# client sends evenly at 98 % of COUNT/PERIOD for several periods:
#
#   1/1s     10 requests (9 periods)
#   5/1s     42 requests (8 periods)
#   15/10s   32 requests (2 periods, 3 boundaries)
#   1/10s     3 requests (2 periods)
#
# and never waits less than PERIOD / COUNT after the previous answer (so
# that, however late a request leaves, every gap the server sees is at
# least PERIOD / COUNT).  Every request must pass.  With COUNT 1, a request
# right after an admitted one (of another identity, before the paced run)
# is rejected with a Retry-After that a paced client can keep to: at most
# PERIOD / COUNT (not 2 or 20).
#
# All 24 cases run at once, each starting at its own offset into its
# window (spread over the window), on 2 workers.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use POSIX qw(ceil floor);
use LLMLimit::Test;

require "$FindBin::Bin/redis-lib.pl";

BEGIN {
    require "$FindBin::Bin/accuracy-lib.pl";
    LLMLimit::Accuracy->import;
}

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my @ALGOS  = qw(sliding fixed gcra);
my @STORES = qw(shm redis);

# name, C, P (s), requests
my @LIMITS = (
    [ 'a', 1, 1, 10 ],
    [ 'b', 5, 1, 42 ],
    [ 'c', 15, 10, 32 ],
    [ 'd', 1, 10, 3 ],
);

my $RATE = 0.98;

my $rd = LLMLimit::Redis->new;
setpriority(0, $rd->pid, -10);      # if allowed: other jobs may run

my $http = "llmlimit_zone zs 1m;\n"
         . "llmlimit_zone zr 1m redis=" . $rd->addr . ";\n";

for my $store (@STORES) {
    for my $algo (@ALGOS) {
        my $zone = $store eq 'shm' ? 'zs' : 'zr';
        $http .= "llmlimit_rules ${store}_$algo zone=$zone "
                 . "algorithm=$algo {\n";
        for my $l (@LIMITS) {
            my ($n, $C, $P) = @$l;
            $http .= "    \"$store $algo $n\" * /$store/$algo/$n "
                     . "\$http_x_api_key $C/${P}s;\n";
        }
        $http .= "}\n";
    }
}

my $t = LLMLimit::Test->new(
    workers => 2,
    listen  => 'reuseport',
    http    => $http,
    config  => "add_header X-Pid \$pid always;\n"
               . "location = /pid { return 200 ok; }\n"
               . join('', map {
                     my $s = $_;
                     "location /$s/ {\n"
                     . join('', map { "    llmlimit ${s}_$_;\n" } @ALGOS)
                     . "    try_files /ok.txt =404;\n}\n"
                 } @STORES),
)->start;

my @cases;

for my $store (@STORES) {
    for my $l (@LIMITS) {
        my ($n, $C, $P, $N) = @$l;
        for my $ai (0 .. $#ALGOS) {
            push @cases, {
                store => $store, algo => $ALGOS[$ai], C => $C, P => $P,
                N => $N, uri => "/$store/$ALGOS[$ai]/$n", key => uid(),
            };
        }
    }
}

# each case's first request at its own offset into the window: the 6 cases
# of a limit spread over it (and, for 1/1s and 1/10s, over the last 2 % of
# the gap too, where a second request falls into the next window)
my $base = time + 1.5 * slow();

for my $i (0 .. $#cases) {
    my $k = $cases[$i];
    my $off = (($i % 6) + 0.5) / 6 * $k->{P};
    $off = $k->{P} - 0.003 * ($i % 6 + 1) if $k->{C} == 1 && $i % 2;
    my $w = floor($base / $k->{P}) * $k->{P};
    $w += $k->{P} while $w + $off < $base;
    $k->{t0} = $w + $off;
    $k->{offset} = $off;
}

my @res = parallel(scalar @cases, sub {
    my ($i) = @_;
    my $k = $cases[$i];

    my @conns = worker_conns($t, 2, '/pid');
    my %h = (headers => { 'X-Api-Key' => $k->{key} });
    my $gap = $k->{P} / $k->{C} / $RATE;
    my (@req, $last_r, $probe);

    if ($k->{C} == 1) {
        # not within 20 ms of a boundary
        my $e = time - floor(time / $k->{P}) * $k->{P};
        sleep(0.03) if $e < 0.02 || $e > $k->{P} - 0.02;
        my %p = (headers => { 'X-Api-Key' => uid() });
        my $r1 = $conns[0]->req("GET $k->{uri}", %p);
        my $r2 = $conns[1]->req("GET $k->{uri}", %p);
        $probe = { first => $r1->status, status => $r2->status,
                   retry => $r2->header('Retry-After') };
    }

    for my $j (0 .. $k->{N} - 1) {
        my $at = $k->{t0} + $j * $gap;
        $at = $last_r + $k->{P} / $k->{C}
            if defined $last_r && $at < $last_r + $k->{P} / $k->{C};
        sleep_until($at);

        my $s = time;
        my $r = $conns[ $j % 2 ]->req("GET $k->{uri}", %h);
        $last_r = time;

        push @req, { s => $s, r => $last_r, status => $r->status,
                     retry => $r->header('Retry-After'),
                     pid => $r->header('X-Pid') };
    }

    return { req => \@req, probe => $probe };
});

for my $i (0 .. $#cases) {
    my $k = $cases[$i];
    my $x = $res[$i];
    my $name = sprintf("%s, %s %d/%ds", $k->{store}, $k->{algo}, $k->{C},
                       $k->{P});

    if ($x->{error}) {
        fail("$name: client: $x->{error}");
        next;
    }

    my @req = @{ $x->{req} };
    my @rej = grep { $_->{status} != 200 } @req;
    my %pids = map { ($_->{pid} // '?') => 1 } @req;

    my ($ming, $prev);
    for my $q (@req) {
        my $g = defined $prev ? $q->{s} - $prev->{r} : undef;
        $ming = $g if defined $g && (!defined $ming || $g < $ming);
        $prev = $q;
    }

    diag(sprintf("%s: %d requests from %.2fs into the window, every "
                 . "%.3fs (shortest gap after an answer %.3fs): %d "
                 . "rejected%s", $name, scalar @req, $k->{offset},
                 $k->{P} / $k->{C} / $RATE, $ming // 0, scalar @rej,
                 $x->{probe} ? sprintf("; a fresh identity: %s then %s, "
                                       . "Retry-After %s",
                                       $x->{probe}{first},
                                       $x->{probe}{status},
                                       $x->{probe}{retry} // '-')
                             : ''));

    is(scalar @rej, 0, "$name: a client at 98% of the rate is never "
       . "rejected (" . scalar(@rej) . " of " . scalar(@req) . ")")
        or diag(join "\n", map {
            sprintf("  request %d at %.3f (%.3fs into its window): %s, "
                    . "Retry-After %s", $_->{n}, $_->{s},
                    $_->{s} - floor($_->{s} / $k->{P}) * $k->{P},
                    $_->{status}, $_->{retry} // '-')
        } map { +{ %{ $req[$_] }, n => $_ + 1 } }
          grep { $req[$_]{status} != 200 } 0 .. $#req);

    if ($x->{probe}) {
        my $max = ceil($k->{P} / $k->{C});
        my $ra = $x->{probe}{retry} // '';
        ok($x->{probe}{first} == 200 && $x->{probe}{status} == 429
           && $ra =~ /^\d+$/ && $ra >= 1 && $ra <= $max,
           "$name: right after an admitted request: 429 with Retry-After "
           . "1..$max ($x->{probe}{first}, $x->{probe}{status}, "
           . "Retry-After $ra)");
    }

    is(scalar(grep { $_ ne '?' } keys %pids), 2,
       "$name: both workers served the client");
}

$t->stop;
$rd->stop;

finish();
