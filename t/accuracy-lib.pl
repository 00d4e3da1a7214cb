# Helpers for the accuracy tests (t/accuracy-*.t): the bounds each
# algorithm guarantees, and counting what a client saw against them.
#
#   require "$FindBin::Bin/accuracy-lib.pl";
#
# Times are the client's (Time::HiRes::time, the same clock the server
# reads).  A request sent at s and answered at r was decided by the server
# at some d in [s - TICK, r]: TICK covers a coarse clock such as
# CLOCK_REALTIME_COARSE, which lags the real time by a kernel tick or two
# (up to 6.5 ms measured here, with 4 ms ticks).  The counts below only
# take requests whose whole [s - TICK, r] lies inside the interval
# counted, so a count over a bound is a certain violation, however slow
# the machine: a slow machine only makes the checks less sharp.
#
# Only core Perl.

package LLMLimit::Accuracy;

use strict;
use warnings;

use Exporter qw(import);
use POSIX qw(floor ceil);
use Time::HiRes qw(time sleep clock_getres);

our @EXPORT = qw(
    TICK bound_interval bound_total windows_touched max_in_interval
    max_per_window check_model worker_conns spread_timers sleep_until
);

# CLOCK_REALTIME_COARSE is 5 on Linux; its resolution is the kernel tick
my $RES;
BEGIN {
    $RES = eval { clock_getres(5) } || 0.004;
    $RES = 0.004 if $RES <= 0 || $RES > 0.02;
}

use constant TICK => 2 * $RES + 0.002 > 0.010 ? 2 * $RES + 0.002 : 0.010;

my $EPS = 1e-9;


# The most that ALGORITHM lets pass for COUNT/PERIOD in any interval of
# length L (seconds), as the README states it:
#   fixed    C per aligned window, so C * (ceil(L / P) + 1) in L;
#   sliding  C + ceil(C * L / P) for L <= P, C * (ceil(L / P) + 1) beyond;
#   gcra     C + floor(L * C / P).
sub bound_interval {
    my ($algo, $C, $P, $L) = @_;

    if ($algo eq 'gcra') {
        return $C + floor($L * $C / $P + $EPS);
    }

    if ($algo eq 'sliding' && $L <= $P + $EPS) {
        return $C + ceil($C * $L / $P - $EPS);
    }

    return $C * (ceil($L / $P - $EPS) + 1);
}


# The most that may pass under a hammer lasting T seconds, C * (T / P + 1),
# and the least, C * (T / P - 1).
sub bound_total {
    my ($C, $P, $T) = @_;
    return (floor($C * ($T / $P + 1) + $EPS),
            ceil($C * ($T / $P - 1) - $EPS));
}


# ADM: array of [s, r] (admitted requests).  The largest number of them
# certainly decided within one interval of length L: max over a of
# #{ i : s_i - TICK >= a, r_i <= a + L }.  Returns (count, a).
sub max_in_interval {
    my ($adm, $L) = @_;

    my @a = sort { $a->[0] <=> $b->[0] } @$adm;
    my ($max, $at) = (0, undef);

    for my $j (0 .. $#a) {
        my $lo = $a[$j][0] - TICK;
        my $hi = $lo + $L;
        my $n = 0;

        for (my $i = $j; $i < @a && $a[$i][0] - TICK <= $hi; $i++) {
            $n++ if $a[$i][1] <= $hi;
        }

        ($max, $at) = ($n, $lo) if $n > $max;
    }

    return ($max, $at);
}


# The largest number of ADM certainly decided inside one window aligned to
# the epoch, [k * P, (k + 1) * P).  Returns (count, window start).
sub max_per_window {
    my ($adm, $P) = @_;

    my %w;
    for my $x (@$adm) {
        my $k = floor(($x->[0] - TICK) / $P);
        next unless floor($x->[1] / $P) == $k;
        $w{$k}++;
    }

    my ($max, $at) = (0, undef);
    for my $k (keys %w) {
        ($max, $at) = ($w{$k}, $k * $P) if $w{$k} > $max;
    }

    return ($max, $at);
}


# Keep-alive connections to the instance $t, at least one answered by each
# of its NWORKERS worker processes (with "listen ... reuseport" the kernel
# spreads connections by their ports).  URI must answer with an X-Pid
# header (add_header X-Pid $pid) without being limited.  Returns the
# connections, one per worker ($conn->{pid}: its worker).
sub worker_conns {
    my ($t, $nworkers, $uri, %o) = @_;

    my %by_pid;

    for (1 .. 200) {
        my $c = LLMLimit::Test::Conn->new(port => $o{port} // $t->port,
                                          from => $o{from} // '127.0.0.1');
        my $r = $c->req("GET $uri");
        my $pid = $r->header('X-Pid') // die "no X-Pid on $uri";

        if ($by_pid{$pid}) {
            $c->close;
        } else {
            $c->{pid} = $pid;
            $by_pid{$pid} = $c;
        }

        last if keys %by_pid >= $nworkers;
    }

    die "could not reach $nworkers workers" if keys %by_pid < $nworkers;

    return map { $by_pid{$_} } sort keys %by_pid;
}


# The number of windows of P aligned to the epoch that the admitted
# requests ADM may have been decided in.
sub windows_touched {
    my ($adm, $P) = @_;

    my ($lo, $hi);
    for my $x (@$adm) {
        $lo = $x->[0] if !defined $lo || $x->[0] < $lo;
        $hi = $x->[1] if !defined $hi || $x->[1] > $hi;
    }

    return 0 unless defined $lo;
    return floor($hi / $P) - floor(($lo - TICK) / $P) + 1;
}


# ---------------------------------------------------------------------------
# The reference model.
#
# check_model(ALGORITHM, [[C, P], ...], REQUESTS) replays what the server
# answered to one identity, REQUESTS being [s, r, admitted] (times in
# seconds, admitted 1 or 0), and returns two lists of the requests (with a
# reason) that no server clock within [s - TICK, r] explains:
#
#   unsafe    admitted although some limit was certainly full;
#   unlive    rejected although every limit certainly had room.
#
# The state of a counter is computed from the admitted requests only: a
# request that one limit rejected and another counted (not all-or-nothing)
# makes later requests look rejected with room.  "Full", for request x at
# server time c, C/P, e = c - W in its window W:
#
#   fixed    cur >= C  (cur: admitted earlier in W);
#   sliding  cur + prev * (P - e) / P >= C  (prev: admitted in W - P); the
#            module rounds prev's share down, so a paced client is never
#            rejected: this holds exactly when floor() of it makes >= C;
#   gcra     TAT - c > (C - 1) * T, T = P / C, TAT = max over earlier
#            admitted y of c_y + k_y * T (k_y: admitted from y on).
#
# Earlier, later and the window of a request are taken in the favour of the
# server: "certainly full" counts only requests certainly earlier and
# certainly in the window, "possibly full" all that may be.

sub check_model {
    my ($algo, $limits, $reqs) = @_;

    my @req = sort { $a->[0] <=> $b->[0] } @$reqs;
    my @adm = grep { $_->[2] } @req;
    my @as = map { $_->[0] } @adm;

    my $maxlat = 0;
    for my $x (@req) {
        $maxlat = $x->[1] - $x->[0] if $x->[1] - $x->[0] > $maxlat;
    }

    my (@unsafe, @unlive);

    for my $x (@req) {
        if ($x->[2]) {
            for my $l (@$limits) {
                my $why = full($algo, @$l, $x, \@adm, \@as, $maxlat, 1);
                if (defined $why) {
                    push @unsafe, [ @$x, "$l->[0]/$l->[1]s: $why" ];
                    last;
                }
            }

        } else {
            my @why;
            for my $l (@$limits) {
                my $why = full($algo, @$l, $x, \@adm, \@as, $maxlat, 0);
                if (!defined $why) {
                    @why = ();
                    last;
                }
                push @why, "$l->[0]/$l->[1]s: $why";
            }
            push @unlive, [ @$x, join('; ', @why) ] if @why;
        }
    }

    return (\@unsafe, \@unlive);
}


# index of the first element of the sorted list >= v
sub first_ge {
    my ($list, $v) = @_;
    my ($lo, $hi) = (0, scalar @$list);
    while ($lo < $hi) {
        my $mid = ($lo + $hi) >> 1;
        if ($list->[$mid] < $v) { $lo = $mid + 1 } else { $hi = $mid }
    }
    return $lo;
}


# CERTAIN (admitted x): a reason if the limit was certainly full, else
# undef.  Otherwise (rejected x): undef if the limit was possibly full,
# else a reason (how much room it certainly had).
sub full {
    my ($algo, $C, $P, $x, $adm, $as, $maxlat, $certain) = @_;

    my ($s, $r) = @$x;

    if ($algo eq 'gcra') {
        return gcra_full($C, $P, $x, $adm, $as, $certain);
    }

    my $w0 = floor(($s - TICK) / $P);
    my $w1 = floor($r / $P);

    # requests that may lie in windows w0 - 1 .. w1
    my $from = first_ge($as, ($w0 - 1) * $P - $maxlat - 1);
    my $to = first_ge($as, $r);

    if ($certain) {
        return undef if $w0 != $w1;         # which window: unknown

        my ($cur, $prev) = (0, 0);

        for my $i ($from .. $to - 1) {
            my $y = $adm->[$i];
            next if $y == $x;
            my $k = floor(($y->[0] - TICK) / $P);
            next unless floor($y->[1] / $P) == $k;
            $cur++ if $k == $w0 && $y->[1] < $s;
            $prev++ if $k == $w0 - 1;
        }

        my $e = $r - $w0 * $P;
        my $est = $cur;
        $est += $prev * ($P - $e) / $P if $algo eq 'sliding' && $e < $P;

        return $est >= $C - 1e-9
            ? sprintf("%d in its window%s", $cur,
                      $algo eq 'sliding'
                      ? sprintf(" + %d in the previous one x %.3f", $prev,
                                ($P - $e) / $P)
                      : '')
            : undef;
    }

    my @room;

    for my $w ($w0 .. $w1) {
        my ($cur, $prev) = (0, 0);

        for my $i ($from .. $to - 1) {
            my $y = $adm->[$i];
            next if $y == $x;
            my $k0 = floor(($y->[0] - TICK) / $P);
            my $k1 = floor($y->[1] / $P);
            $cur++ if $k0 <= $w && $w <= $k1;
            $prev++ if $k0 <= $w - 1 && $w - 1 <= $k1;
        }

        my $e = $w == $w0 ? $s - TICK - $w * $P : 0;
        $e = 0 if $e < 0;
        my $est = $cur;
        $est += $prev * ($P - $e) / $P if $algo eq 'sliding' && $e < $P;

        return undef if $est >= $C - 1e-9;

        push @room, $algo eq 'sliding'
            ? sprintf("at most %d in its window + %d in the previous "
                      . "one x %.3f", $cur, $prev, ($P - $e) / $P)
            : "at most $cur in its window";
    }

    return join(' or ', @room);
}


sub gcra_full {
    my ($C, $P, $x, $adm, $as, $certain) = @_;

    my ($s, $r) = @$x;
    my $T = $P / $C;
    my $Ts = $T + 1e-6;                  # the module's T, rounded up to 1us

    if ($certain) {
        # y certainly earlier (r_y < s), within 2P: a lower bound of TAT
        my $from = first_ge($as, $s - 2 * $P - 1);
        my $to = first_ge($as, $s);

        for my $i (reverse $from .. $to - 1) {
            my $y = $adm->[$i];
            next if $y == $x || $y->[1] >= $s;

            # admitted certainly after y and certainly before x
            my $k = 1;
            for my $j ($i + 1 .. $to - 1) {
                my $z = $adm->[$j];
                $k++ if $z != $x && $z->[0] > $y->[1] && $z->[1] < $s;
            }

            my $room = $C - 1 - $k;
            my $lhs = ($y->[0] - TICK) - $r;
            if ($lhs > $room * ($room >= 0 ? $Ts : $T) + 1e-9) {
                return sprintf("%d admitted in the last %.3fs", $k,
                               $r - $y->[0] + TICK);
            }
        }

        return undef;
    }

    # y possibly earlier (s_y < r): is there one that may make x wait?
    # k_y = 1 + the other admitted z possibly after y (r_z > s_y) and
    # possibly before x (s_z < r)
    my $to = first_ge($as, $r);
    my @rs = sort { $a <=> $b } map { $adm->[$_][1] } 0 .. $to - 1;
    my $best;

    for my $i (reverse 0 .. $to - 1) {
        my $y = $adm->[$i];

        my $k = 1 + ($to - first_ge(\@rs, $y->[0] + 1e-9))
                - ($y->[1] > $y->[0] + 1e-9 ? 1 : 0);

        my $room = $C - 1 - $k;
        my $lhs = $y->[1] - ($s - TICK);
        return undef if $lhs > $room * ($room >= 0 ? $T : $Ts) - 1e-9;

        $best //= sprintf("at most %d admitted in the last %.3fs", $k,
                          $r - $y->[0]);
    }

    return $best // 'nothing admitted before';
}


# spread_timers($t): with timer_resolution, a worker's cached time moves
# at its interval timer's ticks, which start when the worker starts: the
# two workers of one nginx tick nearly together.  Workers started at other
# moments (a respawn, a reload) do not: restart one worker (SIGQUIT to it;
# the master starts another) until their ticks are 35..65 ms apart, so
# that around each boundary one of them is behind the other for a while.
# The instance must answer /pid with X-Pid ($pid) and X-Msec ($msec), and
# have 2 workers.  Returns how far apart (ms), or 0 if it could not.
sub spread_timers {
    my ($t) = @_;

    my $slow = LLMLimit::Test::slow();

    my $lat = 0.005;        # from SIGQUIT to the new worker's first tick

    for my $try (1 .. 20) {
        my @c = worker_conns($t, 2, '/pid');
        my @ph = map { tick_phase($_) } @c;
        my $d = ($ph[1] - $ph[0]) % 100;
        my ($keep, $pid) = ($c[0]{pid}, $c[1]{pid});
        $_->close for @c;

        return $d if $d >= 35 && $d <= 65;

        # restart the second one, to tick 50 ms after the first
        my $at = int(time * 10) / 10 + (($ph[0] + 50) % 100) / 1000 - $lat;
        $at += 0.1 while $at < time + 0.02;
        sleep_until($at);
        kill 'QUIT', $pid;

        my $w = time + 10 * $slow;
        sleep 0.01 while time < $w
                         && (kill(0, $pid) || (() = $t->workers) < 2);
        sleep 0.1;

        my @c2 = worker_conns($t, 2, '/pid');
        my ($new) = grep { $_->{pid} != $keep } @c2;
        my $got = tick_phase($new);
        $_->close for @c2;

        # when it ticked, against when it was asked to
        my $want = (($ph[0] + 50) % 100);
        $lat += ((($got - $want + 50) % 100) - 50) / 1000;
        $lat = 0.005 if $lat < 0 || $lat > 0.1;
    }

    return 0;
}


# the phase (ms, 0..99) of the 100 ms ticks at which the worker behind
# connection C updates its time, from $msec of its answers
sub tick_phase {
    my ($c) = @_;

    my %seen;
    my $end = time + 0.45;

    while (time < $end) {
        my $r = $c->req('GET /pid');
        $seen{ $r->header('X-Msec') }++;
        sleep 0.003;
    }

    # a circular mean of the phases seen; a worker busy when its timer
    # fires updates its time at every turn of its loop for a while, so
    # only the values seen several times count
    my ($x, $y) = (0, 0);
    for my $v (grep { $seen{$_} >= 3 } keys %seen) {
        my $a = (($v * 1000) % 100) / 100 * 2 * 3.14159265;
        $x += cos($a);
        $y += sin($a);
    }
    my $a = atan2($y, $x) / (2 * 3.14159265) * 100;
    return int($a < 0 ? $a + 100 : $a);
}


sub sleep_until {
    my ($when) = @_;
    my $d = $when - time;
    sleep($d) if $d > 0;
}


sub fmt_count {
    my ($n, $bound, $what) = @_;
    return sprintf("%d %s (bound %d)", $n, $what, $bound);
}


1;
