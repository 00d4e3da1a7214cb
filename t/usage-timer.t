#!/usr/bin/perl

# Usage buckets under a coarse clock: 2 workers ("listen ... reuseport")
# with timer_resolution 100ms, their timers ticking apart, 1-second
# buckets, two clients (one on each worker) sending one identity's
# requests for 5 seconds, some of them rejected (10/1s).  Nothing is lost
# or counted twice: the API's total of passed and rejected is the clients'
# exactly.  And each request lands in the bucket of the time it was
# decided at, give or take the coarse clock: for each of 3 bucket
# boundaries B (the API's stride boundary put on B), what the stride before
# B holds is at least what was answered before B and at most what was sent
# before B + TICK (t/accuracy-lib.pl: twice the resolution and a little),
# and the passed ones are exactly what the limit admitted in the windows
# before B (its windows are the buckets).  The worker's cached time put
# requests checked up to ~100 ms after B in the bucket before it.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use POSIX qw(strftime ceil);
use LLMLimit::Test;

BEGIN {
    require "$FindBin::Bin/accuracy-lib.pl";
    LLMLimit::Accuracy->import;
}

my $DURATION = 5;
my $GAP = 0.004;

my $t = LLMLimit::Test->new(
    workers => 2,
    listen  => 'reuseport',
    main    => 'timer_resolution 100ms;',
    http    => q{
        llmlimit_zone        z 1m;
        llmlimit_usage_zone  u 1m bucket=1s;
        llmlimit_rules api zone=z algorithm=fixed {
            "Keyed"  GET  /x  $http_x_api_key  10/1s;
        }
    },
    config  => q{
        llmlimit_headers off;
        add_header X-Pid $pid always;
        add_header X-Msec $msec always;

        location = /pid { return 200 ok; }

        location /x {
            llmlimit        api;
            llmlimit_usage  u api_key=$http_x_api_key workspace=ws;
            try_files       /ok.txt =404;
        }

        location /usage/ {
            llmlimit_usage_api  u;
        }
    },
)->start;

my $d = spread_timers($t);
diag($d ? "the workers' timers tick $d ms apart"
        : "could not start workers whose timers tick apart");

my $key = 'k-' . uid();

# from 0.5 s before a second (a bucket boundary) for DURATION seconds
my $start = ceil(time + 1 + slow()) - 0.5;
my $end = $start + $DURATION;

my @res = parallel(2, sub {
    my ($i) = @_;
    my @conns = worker_conns($t, 2, '/pid');
    my $c = $conns[$i];
    my (@req, %pids);

    sleep_until($start + $GAP * $i / 2);

    while (time < $end) {
        my $s = time;
        my $r = $c->req('GET /x', headers => { 'X-Api-Key' => $key });
        my $e = time;
        $pids{ $r->header('X-Pid') // '?' }++;
        push @req, [ $s, $e, $r->status ];
        sleep_until($s + $GAP);
    }

    return { req => \@req, pids => \%pids };
});

my (@req, %pids);
for my $x (@res) {
    if ($x->{error}) {
        fail("client: $x->{error}");
        next;
    }
    push @req, @{ $x->{req} };
    $pids{$_} += $x->{pids}{$_} for keys %{ $x->{pids} };
}

is(scalar(grep { $_ ne '?' } keys %pids), 2, 'both workers served the key');

my %st;
$st{ $_->[2] }++ for @req;
my $passed = $st{200} // 0;
my $rejected = $st{429} // 0;
is($passed + $rejected, scalar @req, 'every answer 200 or 429')
    or diag(explain(\%st));
ok($passed > 0 && $rejected > 0, "some passed ($passed), some rejected "
   . "($rejected)");

sub iso { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

# the recording happens in the log phase, after the answer: let it land
sleep 0.3;

sub rows {
    my ($from, $to) = @_;
    my $r = $t->req('GET /usage/?start_time=' . iso($from) . '&end_time='
                    . iso($to) . '&group_by=api_key');
    is($r->status, 200, 'usage API: 200');
    my $j = LLMLimit::Test::json_decode($r->body);
    return [ grep { ($_->{api_key_short_key} // '') eq $key }
             @{ $j->{usage} || [] } ];
}

{
    my $from = int($start) - 3600;
    my $rows = rows($from, $from + 2 * 3600);
    my ($p, $r) = (0, 0);
    for (@$rows) {
        $p += $_->{requests};
        $r += $_->{rejected};
    }
    is($p, $passed, "the API's passed: the clients' $passed");
    is($r, $rejected, "the API's rejected: the clients' $rejected");
}

# three boundaries inside the run
for my $B (map { int($start) + $_ } 1 .. 3) {
    my $rows = rows($B - 3600, $B + 3600);
    my ($before) = grep { $_->{time_bucket_start} eq iso($B - 3600) } @$rows;
    my ($after) = grep { $_->{time_bucket_start} eq iso($B) } @$rows;

    for my $what ([ 'passed', 'requests', 200 ], [ 'rejected', 'rejected',
                                                   429 ]) {
        my ($name, $field, $status) = @$what;
        my @mine = grep { $_->[2] == $status } @req;
        my $lo = grep { $_->[1] < $B } @mine;
        my $hi = grep { $_->[0] < $B + TICK } @mine;
        my $got = $before ? $before->{$field} : 0;
        my $all = $got + ($after ? $after->{$field} : 0);

        # the fixed windows of the limit are the buckets: the limiter
        # admitted exactly 10 in each (~200 requests a second ask)
        is($got, 10 * ($B - int($start)), "boundary at +"
           . ($B - int($start)) . "s: passed before it: 10 a window")
            if $status == 200;

        ok($got >= $lo && $got <= $hi,
           "boundary at +" . ($B - int($start)) . "s: $name before it "
           . "$got, within $lo..$hi");
        is($all, scalar @mine, "boundary at +" . ($B - int($start))
           . "s: $name before and after it sum to " . scalar @mine);
    }
}

$t->stop;
finish();
