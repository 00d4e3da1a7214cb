#!/usr/bin/perl

# The limits against a reference model (issue 8): random request sequences
# (seeded; the seed is printed, LLMLIMIT_SEED=N repeats the sequences), 3
# identities, 8 seconds of bursts and pauses, sent in real time to nginx
# (2 workers) under a rule with two limits, 4/1s,7/3s, for each algorithm,
# in shared memory and in Redis.  From the answers, per identity and
# limit (times as in t/accuracy-lib.pl: only what the server certainly
# decided counts):
#
#   - safety: at most the algorithm's bound in any interval of length L,
#     L = 0.25, 0.5, 1, 2, 3, 6 s (fixed C * (ceil(L / P) + 1); sliding
#     C + ceil(C * L / P) for L <= P, else as fixed; gcra
#     C + floor(L * C / P));
#   - liveness, with a margin of 50 ms: a rejected request had, for some
#     limit: fixed, C admitted in the P + margin before it; sliding, C in
#     the 2P + margin before it; gcra, an admitted t_i with
#     t_i + k_i * P / C > now + (C - 1) * P / C - margin (k_i admitted in
#     [t_i, now));
#   - the exact model (check_model): no request admitted while a limit was
#     certainly full, none rejected while every limit certainly had room,
#     the state of each limit replayed from the admitted requests only: a
#     request that one limit rejects is counted in none (all or nothing).

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
my @LIMITS = ([ 4, 1 ], [ 7, 3 ]);
my $SPAN = 8;               # seconds of traffic
my $IDS = 3;
my $MARGIN = 0.05 * slow();

my $SEED = $ENV{LLMLIMIT_SEED} // int(time * 1000) % 1000000;
diag("seed $SEED (LLMLIMIT_SEED=$SEED repeats the sequences)");

my $rd = LLMLimit::Redis->new;
setpriority(0, $rd->pid, -10);      # if allowed: see below

my $limits = join(',', map { "$_->[0]/$_->[1]s" } @LIMITS);
my $http = "llmlimit_zone zs 1m;\n"
         . "llmlimit_zone zr 1m redis=" . $rd->addr . ";\n";

for my $store (@STORES) {
    for my $algo (@ALGOS) {
        my $zone = $store eq 'shm' ? 'zs' : 'zr';
        $http .= "llmlimit_rules ${store}_$algo zone=$zone "
                 . "algorithm=$algo {\n"
                 . "    \"$store $algo\" * /$store/$algo "
                 . "\$http_x_api_key $limits;\n}\n";
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
    for my $algo (@ALGOS) {
        push @cases, { store => $store, algo => $algo,
                       uri => "/$store/$algo", seed => $SEED + @cases };
    }
}

my $start = time + 1.5 * slow();

my @res = parallel(scalar @cases, sub {
    my ($i) = @_;
    my $k = $cases[$i];

    my @conns = worker_conns($t, 2, '/pid');
    my @keys = map { uid() } 1 .. $IDS;
    my @plan = sequence($k->{seed});
    my @req;

    for my $p (@plan) {
        my ($at, $id, $w) = @$p;
        sleep_until($start + $at);
        my $s = time;
        my $r = $conns[$w]->req("GET $k->{uri}",
                                headers => { 'X-Api-Key' => $keys[$id] });
        push @req, [ $s, time, $r->status == 200 ? 1 : 0, $id, $r->status ];
    }

    return \@req;
});

# Redis kept a request past redis_timeout (other jobs on the machine): the
# zone then decided from its local counters, as redis_failure=local asks,
# and the Redis cases cannot be held to the limits (t/accuracy-workers.t
# checks that the zone does not fall back while Redis answers in time)
my @lost = $t->error_log =~ /redis \S+ lost: ([^\n,]*)/g;
diag("the redis zone fell back to local counters " . scalar(@lost)
     . " times") if @lost;

for my $i (0 .. $#cases) {
    my $k = $cases[$i];
    my $name = "$k->{store}, $k->{algo} $limits";
    my $x = $res[$i];

    if (ref $x ne 'ARRAY') {
        fail("$name: client: " . ($x->{error} // '?'));
        next;
    }

    if ($k->{store} eq 'redis' && @lost) {
        SKIP: { skip "$name: the redis zone fell back", 4 }
        next;
    }

    my @bad = grep { $_->[4] != 200 && $_->[4] != 429 } @$x;
    ok(!@bad, "$name: every answer 200 or 429")
        or diag(join ', ', map { $_->[4] } @bad[0 .. ($#bad > 9 ? 9 : $#bad)]);

    my (@safety, @live, @model);
    my %n = (req => scalar @$x, adm => 0);

    for my $id (0 .. $IDS - 1) {
        my @req = map { [ @$_[0 .. 2] ] } grep { $_->[3] == $id } @$x;
        my @adm = grep { $_->[2] } @req;
        $n{adm} += @adm;

        for my $l (@LIMITS) {
            my ($C, $P) = @$l;
            for my $L (0.25, 0.5, 1, 2, 3, 6) {
                my ($m, $at) = max_in_interval(\@adm, $L);
                my $b = bound_interval($k->{algo}, $C, $P, $L);
                push @safety, sprintf("identity %d, %d/%ds: %d admitted "
                                      . "in %ss from %.3f (bound %d)", $id,
                                      $C, $P, $m, $L, $at, $b)
                    if $m > $b;
            }
        }

        for my $q (grep { !$_->[2] } @req) {
            my @why = map { live_reason($k->{algo}, @$_, $q, \@adm) }
                      @LIMITS;
            push @live, sprintf("identity %d: rejected at %.3f: %s", $id,
                                $q->[0], join('; ', @why))
                unless grep { !defined } @why;
        }

        my ($unsafe, $unlive) = check_model($k->{algo}, \@LIMITS, \@req);
        push @model, map {
            sprintf("identity %d: %s at %.3f: %s", $id,
                    $_->[2] ? 'admitted' : 'rejected', $_->[0], $_->[3])
        } @$unsafe, @$unlive;
    }

    diag(sprintf("%s: %d requests, %d admitted; %d over a bound, %d "
                 . "rejected with room (margin %d ms), %d against the "
                 . "model", $name, $n{req}, $n{adm}, scalar @safety,
                 scalar @live, $MARGIN * 1000, scalar @model));

    ok(!@safety, "$name: at most the bound in any interval")
        or diag(show(@safety));
    ok(!@live, "$name: rejected only when a limit was full")
        or diag(show(@live));
    ok(!@model, "$name: the exact model, all or nothing")
        or diag(show(@model));
}

$t->stop;
$rd->stop;

finish();


# The requests of a case: [time from the start, identity, worker], over
# SPAN seconds: bursts of 2..9 requests, single requests, pauses.
sub sequence {
    my ($seed) = @_;

    srand($seed);

    my ($at, @p) = (0);

    while ($at < $SPAN) {
        my $id = int(rand($IDS));
        my $kind = rand();

        if ($kind < 0.4) {
            # a burst, one identity, as fast as it goes
            push @p, [ $at, $id, int(rand(2)) ] for 1 .. 2 + int(rand(8));
            $at += 0.02 + rand(0.23);

        } elsif ($kind < 0.9) {
            push @p, [ $at, $id, int(rand(2)) ];
            $at += rand(0.15);

        } else {
            $at += 0.2 + rand(0.8);
        }
    }

    return @p;
}


# A rejected request Q: undef if limit C/P may have been full, else why not
# (the brief's rules, with MARGIN).  Times: the server decided each request
# in [s - TICK, r].
sub live_reason {
    my ($algo, $C, $P, $q, $adm) = @_;

    my $now = $q->[0] - TICK;
    my @before = grep { $_->[0] < $q->[1] } @$adm;

    if ($algo eq 'gcra') {
        my $T = $P / $C;
        for my $i (0 .. $#before) {
            my $k = @before - $i;
            return undef
                if $before[$i][1] + $k * $T > $now + ($C - 1) * $T - $MARGIN;
        }
        return "$C/${P}s: no admitted t_i with t_i + k_i * T past "
               . "now + (C - 1) * T";
    }

    my $back = ($algo eq 'fixed' ? 1 : 2) * $P + $MARGIN;
    my $n = grep { $_->[1] >= $now - $back } @before;

    return undef if $n >= $C;
    return sprintf("%d/%ds: %d admitted in the %.2fs before", $C, $P, $n,
                   $back);
}


sub show {
    my (@l) = @_;
    my @s = @l[ 0 .. ($#l > 5 ? 5 : $#l) ];
    return join("\n", map { "  $_" } @s)
           . (@l > 6 ? "\n  ... " . (@l - 6) . " more" : '');
}
