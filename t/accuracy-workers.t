#!/usr/bin/perl

# Limits hold across worker processes, whatever their clocks (issue 8):
# 2 workers ("listen ... reuseport"), clients on keep-alive connections to
# both, one identity per case, hammering for 6 seconds.  Each algorithm, in
# shared memory and in Redis (default redis_timeout, 50 ms), and fixed and
# sliding in a redis_sync=100ms zone (one host: its decisions, taken in
# shared memory, must not be disturbed by the totals read back every
# 100 ms), limits 20/1s (6 boundaries) and 10/2s (3 boundaries), in two
# nginx set-ups:
#
#   timer_resolution 100ms   a worker's cached time is up to 100 ms old;
#                            the two workers are made to tick ~50 ms apart
#                            (as workers started at different moments do);
#   no timer_resolution      a worker's cached time is as old as its
#                            current turn of the event loop: twice, a
#                            worker in a long turn (1200 pipelined requests
#                            per shared-memory and sync case) begun before a
#                            boundary is stopped until 30 ms after it, as
#                            a loaded host preempts a worker.
#
# The clients pause 2 or 4 ms between requests (with timer_resolution, a
# worker busy when its timer fires keeps its time fresh for a while).
# Redis pauses 8 ms every 50 ms (DEBUG SLEEP), as a remote Redis has
# latency spikes: far below the 50 ms timeout.
#
# From the client-side times of the requests each case checks (see
# t/accuracy-lib.pl: a request counts only where the server certainly
# decided it):
#   - the total: at most C per aligned window touched (fixed, sliding),
#     C + floor(L * C / P) over the L the admitted span (gcra): that is
#     C * (T / P + 1) for a run of T; and at least C * (T / P - 1);
#   - at most the algorithm's bound in any interval of length P and of
#     250 ms (fixed 2C; sliding C + ceil(C * L / P); gcra
#     C + floor(L * C / P));
#   - fixed and sliding: at most C in one aligned window;
#   - the reference model: no request admitted while its limit was
#     certainly full, none rejected while it certainly had room;
#   - both workers served the identity.
# And per set-up: the Redis zone did not fall back to its local counters
# while Redis answered (a ping every 5 ms) within 35 ms.  If Redis was
# slower than that (other jobs on the machine), falling back is what
# redis_failure=local asks for and the Redis cases' counts are not checked.
#
# The measured counts are printed (diag).  LLMLIMIT_ACCURACY_MODE=timer
# (or =no) runs one set-up only, LLMLIMIT_ACCURACY_STORES="shm sync" some
# stores only.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use IO::Select;
use Time::HiRes qw(time sleep);
use POSIX qw(ceil);
use LLMLimit::Test;

require "$FindBin::Bin/redis-lib.pl";

BEGIN {
    require "$FindBin::Bin/accuracy-lib.pl";
    LLMLimit::Accuracy->import;
}

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $DURATION = 6;           # seconds of hammering

my @ALGOS  = qw(sliding fixed gcra);
my @STORES = split ' ', $ENV{LLMLIMIT_ACCURACY_STORES} // 'shm redis sync';
my @LIMITS = ([ 'a', 20, 1 ], [ 'b', 10, 2 ]);      # name, C, P


# redis_sync zones take fixed and sliding windows only
sub algos {
    my ($store) = @_;
    return $store eq 'sync' ? grep { $_ ne 'gcra' } @ALGOS : @ALGOS;
}

# name, main context, the clients of a case: each alternates between a
# connection to each worker, or uses only the one to worker N; gap: pause
# between its requests (s); stall: stop a worker in a long turn
my @MODES = (
    [ 'timer_resolution 100ms', 'timer_resolution 100ms;',
      [ { gap => 0.004 }, { gap => 0.004 } ], 0 ],
    [ 'no timer_resolution', '',
      [ { worker => 0, gap => 0.002 }, { worker => 1, gap => 0.002 } ], 1 ],
);

my $STALL_CONNS = 3;        # connections per shared-memory case
my $STALL_BURST = 400;      # requests on each

# a legitimate fallback needs Redis to keep a request over 50 ms: then a
# ping every 5 ms (or 13 ms around a DEBUG SLEEP) sees it over 35 ms late
my $SLOW_PING = 0.035;


sub http_conf {
    my ($rd) = @_;

    my $h = "llmlimit_zone zs 1m;\n"
          . "llmlimit_zone zr 1m redis=" . $rd->addr . ";\n"
          . "llmlimit_zone zy 1m redis=" . $rd->addr
          . " redis_prefix=y: redis_sync=100ms;\n";
    my %zone = (shm => 'zs', redis => 'zr', sync => 'zy');

    for my $store (@STORES) {
        for my $algo (algos($store)) {
            my $zone = $zone{$store};
            $h .= "llmlimit_rules ${store}_$algo zone=$zone "
                  . "algorithm=$algo {\n";
            for my $l (@LIMITS) {
                my ($n, $C, $P) = @$l;
                $h .= "    \"$store $algo $n\" * /$store/$algo/$n "
                      . "\$http_x_api_key $C/${P}s;\n";
            }
            $h .= "}\n";
        }
    }

    return $h;
}

# a location per store (at most 4 tables at one level), a static file (a
# worker answers on its own, without the backend), short answers; /pid is
# not limited
my $CONFIG = "llmlimit_headers off;\n"
    . "server_tokens off;\n"
    . "add_header X-Pid \$pid always;\n"
    . "add_header X-Msec \$msec always;\n"
    . "location = /pid { return 200 ok; }\n"
    . join('', map {
          my $s = $_;
          "location /$s/ {\n"
          . join('', map { "    llmlimit ${s}_$_;\n" } algos($s))
          . "    try_files /ok.txt =404;\n}\n"
      } @STORES);


for my $m (@MODES) {
    next if $ENV{LLMLIMIT_ACCURACY_MODE}
            && $m->[0] !~ /^$ENV{LLMLIMIT_ACCURACY_MODE}/;
    run_mode(@$m);
}

finish();


# one instance (and one Redis) per set-up, all its cases at once
sub run_mode {
    my ($mname, $main, $clients, $stall) = @_;

    my $rd = LLMLimit::Redis->new;

    # other jobs on the machine can stall Redis past the timeout, which
    # makes falling back legitimate: raise its priority if allowed
    setpriority(0, $rd->pid, -10);

    my $t = LLMLimit::Test->new(
        workers => 2,
        listen  => 'reuseport',
        main    => $main,
        http    => http_conf($rd),
        config  => $CONFIG,
    )->start;

    # (the module is not to blame if this fails: the checks below are
    # then less sharp)
    if ($main) {
        my $d = spread_timers($t);
        diag($d ? "$mname: the workers' timers tick $d ms apart"
                : "$mname: could not start workers whose timers tick apart");
    }

    my (@cases, @cl);

    for my $store (@STORES) {
        for my $algo (algos($store)) {
            for my $l (@LIMITS) {
                my ($n, $C, $P) = @$l;
                my $k = {
                    mode => $mname, store => $store, algo => $algo,
                    C => $C, P => $P, uri => "/$store/$algo/$n",
                    key => uid(), first => scalar @cl,
                };
                push @cases, $k;
                push @cl, map { { %$_, case => $k } } @$clients;
                $k->{last} = $#cl;
            }
        }
    }

    # from just after an even second (a boundary of both periods) for
    # DURATION seconds: 0.1 s into the first window, so that the run
    # touches DURATION / P + 1 windows of each limit
    my $start = ceil((time + 1.5 * slow()) / 2) * 2 + 0.1;
    my $end = $start + $DURATION;

    my @res = parallel(@cl + 2, sub {
        my ($i) = @_;

        # until the last answers are in; the clients write their results
        # (which takes CPU) only after that
        if ($i == @cl) {
            setpriority(0, 0, -10);
            return redis_pings($rd, $start, $end + 0.4);
        }

        if ($i == @cl + 1) {
            return {} unless $stall;
            # at the boundaries 2 s and 4 s into the run
            return stalls($t, [ grep { $_->{store} ne 'redis' } @cases ],
                          [ $start - 0.1 + 2, $start - 0.1 + 4 ]);
        }

        my @conns = worker_conns($t, 2, '/pid');
        sleep_until($start + 0.003 * $i / @cl);

        my $res = client($cl[$i], \@conns, $end);
        sleep_until($end + 0.5);
        return $res;
    });

    my $st = pop @res;
    my $mon = pop @res;

    # how the stops went (the module is not to blame if they could not
    # be made: the checks below are then less sharp)
    if ($stall) {
        diag("$mname: stall: $st->{error}") if $st->{error};
        diag(sprintf("%s: stopped a worker in a turn at %d of 2 "
                     . "boundaries%s", $mname,
                     scalar @{ $st->{stops} || [] },
                     @{ $st->{missed} || [] }
                     ? " (the worker did not answer before "
                       . join(', ', @{ $st->{missed} }) . ")" : ''));
    }
    my @lost = $t->error_log =~ /redis \S+ lost: ([^\n,]*)/g;
    my $slow = $mon->{max} > $SLOW_PING;

    diag(sprintf("%s: the redis zone fell back to local counters %d times; "
                 . "%d redis pings, the slowest %.1f ms", $mname,
                 scalar @lost, $mon->{n}, $mon->{max} * 1000));

    SKIP: {
        skip "$mname: redis answered a ping in over "
             . ($SLOW_PING * 1000) . " ms: falling back may be right", 1
            if $slow;

        is(scalar @lost, 0, "$mname: the redis zone did not fall back to "
           . "local counters while redis answered within "
           . ($SLOW_PING * 1000) . " ms");
    }

    for my $k (@cases) {
        SKIP: {
            skip "$mname, $k->{store}, $k->{algo} $k->{C}/$k->{P}s: "
                 . "redis was slow and the zone fell back", 1
                if $k->{store} eq 'redis' && $slow && @lost;

            check_case($k, @res[ $k->{first} .. $k->{last} ],
                       $st->{case}{ $k->{key} } // ());
        }
    }

    $t->stop;
    $rd->stop;
}


# one client until END: [s, r, admitted] of each request
sub client {
    my ($c, $conns, $end) = @_;

    my $k = $c->{case};
    my %h = (headers => { 'X-Api-Key' => $k->{key} });
    my (@req, %st, %pids);

    $conns = [ $conns->[ $c->{worker} ] ] if defined $c->{worker};

    for (my $j = 0; time < $end; $j++) {
        my $s = time;
        my $r = $conns->[ $j % @$conns ]->req("GET $k->{uri}", %h);
        my $e = time;

        $st{ $r->status }++;
        $pids{ $r->header('X-Pid') // '?' }++;
        push @req, [ $s, $e, $r->status == 200 ? 1 : 0 ];

        sleep_until($s + $c->{gap}) if $c->{gap};
    }

    return { req => \@req, st => \%st, pids => \%pids };
}


sub check_case {
    my ($k, @r) = @_;

    my ($C, $P, $algo) = @$k{qw(C P algo)};
    my $name = "$k->{mode}, $k->{store}, $algo $C/${P}s";

    my (@req, %st, %pids);
    for my $x (@r) {
        if ($x->{error}) {
            fail("$name: client: $x->{error}");
            next;
        }
        push @req, @{ $x->{req} };
        $st{$_} += $x->{st}{$_} for keys %{ $x->{st} };
        $pids{$_} += $x->{pids}{$_} for keys %{ $x->{pids} };
    }
    return unless @req;

    @req = sort { $a->[0] <=> $b->[0] } @req;
    my @adm = grep { $_->[2] } @req;
    my $n = @adm;
    my $T = $req[-1][0] - $req[0][0];

    # the most: C per window the admitted ones touch (fixed, sliding),
    # C + floor(L * C / P) over the L they span (gcra: from the first sent
    # to the last answered, which may be a stalled worker's); the least: over
    # the run, C * (T / P - 1)
    my $hi = !@adm ? 0
             : $algo eq 'gcra'
             ? bound_interval('gcra', $C, $P,
                              (sort { $b <=> $a } map { $_->[1] } @adm)[0]
                              - $adm[0][0]
                              + TICK)
             : $C * windows_touched(\@adm, $P);
    my (undef, $lo) = bound_total($C, $P, $T);

    my ($inP) = max_in_interval(\@adm, $P);
    my ($in250) = max_in_interval(\@adm, 0.25);
    my ($inW) = max_per_window(\@adm, $P);
    my $bP = bound_interval($algo, $C, $P, $P);
    my $b250 = bound_interval($algo, $C, $P, 0.25);
    my ($unsafe, $unlive) = check_model($algo, [[ $C, $P ]], \@req);

    diag(sprintf("%s: admitted %d in %.2fs (bounds %d..%d); max in %ss %d "
                 . "(bound %d), in 250ms %d (bound %d), per window %d "
                 . "(bound %d); model: %d admitted over the limit, %d "
                 . "rejected with room; %d requests, by worker %s",
                 $name, $n, $T, $lo, $hi, $P, $inP, $bP, $in250, $b250,
                 $inW, $C, scalar @$unsafe, scalar @$unlive, scalar @req,
                 join('/', map { $pids{$_} } sort keys %pids)));

    ok($n <= $hi, "$name: at most $hi admitted ($n)");

    SKIP: {
        skip "$name: under valgrind the clients may not keep up", 1
            if valgrind();
        ok($n >= $lo, "$name: at least $lo admitted ($n)");
    }
    ok($inP <= $bP, "$name: at most $bP in any ${P}s ($inP)");
    ok($in250 <= $b250, "$name: at most $b250 in any 250 ms ($in250)");

    if ($algo ne 'gcra') {
        ok($inW <= $C, "$name: at most $C in one aligned window ($inW)");
    }

    ok(!@$unsafe, "$name: model: no request admitted over the limit")
        or diag(show_model($unsafe));
    ok(!@$unlive, "$name: model: no request rejected with room")
        or diag(show_model($unlive));

    my @bad = grep { $_ != 200 && $_ != 429 } keys %st;
    ok(!@bad, "$name: every answer 200 or 429")
        or diag(join ', ', map { "$_: $st{$_}" } @bad);

    is(scalar(grep { $_ ne '?' } keys %pids), 2,
       "$name: both workers served the identity");
}


# At each of the boundaries W (an even second): write STALL_BURST
# pipelined HEAD requests on each of STALL_CONNS connections per case to
# one worker at W - 80 ms (a turn of its event loop that lasts tens of ms:
# the 429s are answered at once, and fit in the sockets' buffers), stop
# that worker as soon as it answers (if before W), continue it at W + 30
# ms, then read the answers.  Returns { stops => [W...], missed => [W...],
# case => { key => the requests of the case (as client()) } }.
sub stalls {
    my ($t, $cases, $boundaries) = @_;

    my (%case, @stops, @missed);

    for my $j (0 .. $#$boundaries) {
        my $W = $boundaries->[$j];
        my @w = worker_conns($t, 2, '/pid');
        my $pid = $w[ $j % 2 ]{pid};
        $_->close for @w;

        my @c = map {
            my $k = $_;
            map { [ $k, conn_to($t, $pid) ] } 1 .. $STALL_CONNS
        } @$cases;

        sleep_until($W - 0.080);
        my $s = time;

        for my $x (@c) {
            my ($k, $c) = @$x;
            my $out = "HEAD $k->{uri} HTTP/1.1\r\nHost: localhost\r\n"
                      . "X-Api-Key: $k->{key}\r\n\r\n";
            $out x= $STALL_BURST;
            syswrite($c->{sock}, $out) == length $out
                or die "write: $!";
        }

        # the worker is in its turn once it answers
        my $sel = IO::Select->new(map { $_->[1]{sock} } @c);
        my @ready = $sel->can_read($W - 0.002 - time);

        if (@ready && time < $W - 0.002) {
            kill 'STOP', $pid;
            sleep_until($W + 0.030);
            kill 'CONT', $pid;
            push @stops, $W;
        } else {
            push @missed, $W;
        }

        for my $x (@c) {
            my ($k, $c) = @$x;
            my $y = $case{ $k->{key} } //= { req => [], st => {},
                                               pids => {} };
            for (1 .. $STALL_BURST) {
                my $r = $c->exchange('', 'HEAD');
                my $e = time;
                $y->{st}{ $r->status }++;
                $y->{pids}{ $r->header('X-Pid') // '?' }++;
                push @{ $y->{req} }, [ $s, $e, $r->status == 200 ? 1 : 0 ];
            }
            $c->close;
        }
    }

    return { stops => \@stops, missed => \@missed, case => \%case };
}


# a new keep-alive connection to the worker PID
sub conn_to {
    my ($t, $pid) = @_;

    for (1 .. 200) {
        my $c = LLMLimit::Test::Conn->new(port => $t->port,
                                          from => '127.0.0.1');
        my $r = $c->req('GET /pid');
        return $c if ($r->header('X-Pid') // '') eq $pid;
        $c->close;
    }

    die "no connection to worker $pid";
}


# From START to END, on a connection of its own: TIME every 5 ms (how
# many; the slowest, from sending it to Redis' clock in the answer: how
# late Redis itself was, not this process), and every 50 ms DEBUG SLEEP
# 8 ms (latency spikes far below redis_timeout)
sub redis_pings {
    my ($rd, $start, $end) = @_;

    my %m = (n => 0, max => 0);
    sleep_until($start);

    for (my $i = 0; time < $end; $i++) {
        my $s = time;
        my $tm = $rd->cmd('TIME');
        my $d = ref $tm eq 'ARRAY' ? $tm->[0] + $tm->[1] / 1e6 - $s
                                   : time - $s;
        $m{n}++;
        $m{max} = $d if $d > $m{max};
        $rd->cmd('DEBUG', 'SLEEP', '0.008') if $i % 10 == 9;
        sleep_until($s + 0.005);
    }

    return \%m;
}


sub show_model {
    my ($list) = @_;
    my @l = @$list[ 0 .. ($#$list > 4 ? 4 : $#$list) ];
    return join("\n", map {
        sprintf("  sent %.3f, answered %.3f: %s", @$_[0, 1, 3])
    } @l) . (@$list > 5 ? "\n  ... " . (@$list - 5) . " more" : '');
}
