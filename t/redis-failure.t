# The Redis store when Redis fails: stopped mid-run (each failure policy),
# restarted, slowed beyond redis_timeout (the requests pay, not the
# connection), silent beyond the stall bound, a server answering garbage or
# replies of the wrong shape, a reload under load, a fast shutdown with
# replies owed.  "lost" and "back" are logged once per change.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use Digest::SHA qw(sha1_hex);
use File::Temp ();
use IO::Socket::INET;
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed' unless LLMLimit::Redis::available();

my $SLOW = slow();
my $TMO = int(1000 * $SLOW) . 'ms';


# zones l, o, c (local, open, closed) on ADDR, a table each, /l /o /c
sub three_zones {
    my ($addr, $timeout) = @_;

    my $http = '';
    my %policy = (l => 'local', o => 'open', c => 'closed');

    for my $z (qw(l o c)) {
        $http .= qq{
            llmlimit_zone $z 1m redis=$addr redis_prefix=$z:
                          redis_timeout=$timeout redis_failure=$policy{$z};
            llmlimit_rules $z zone=$z {
                "Q $z"  GET  /$z  \$http_x_api_key  3/1h;
            }
        };
    }

    return $http;
}


my $SERVER = q{
    add_header X-Status $llmlimit_status always;
    location /l { llmlimit l; proxy_pass http://%%BACKEND%%; }
    location /o { llmlimit o; proxy_pass http://%%BACKEND%%; }
    location /c { llmlimit c; proxy_pass http://%%BACKEND%%; }
    location /plain { proxy_pass http://%%BACKEND%%; }
};


sub run {
    my ($c, $spec, $n, $key) = @_;
    my @r = map { $c->req($spec, headers => { 'X-Api-Key' => $key }) } 1 .. $n;
    return (join(' ', map { $_->status } @r),
            join(' ', map { $_->header('X-Status') // '-' } @r));
}


sub count_re {
    my ($text, $re) = @_;
    my @m = $text =~ /$re/g;
    return scalar @m;
}


# ---------------------------------------------------------------------------
# stopped mid-run, then restarted

{
    my $rd = LLMLimit::Redis->new;

    my $t = LLMLimit::Test->new(name => 'redis stopped',
                                http => three_zones($rd->addr, $TMO),
                                config => $SERVER)->start;
    my $c = $t->conn;

    for my $z (qw(l o c)) {
        is_deeply([ run($c, "GET /$z", 1, uid()) ], [ '200', 'PASSED' ],
                  "/$z: Redis up");
    }

    my @keys = $rd->keys;
    is(scalar(grep { /^[loc]:\{/ } @keys), 3, 'counted in Redis');

    $rd->stop;

    my $key = uid();
    is_deeply([ run($c, 'GET /l', 4, $key) ],
              [ '200 200 200 429', 'PASSED PASSED PASSED REJECTED' ],
              'local: limited from shared memory');
    is_deeply([ run($c, 'GET /o', 4, $key) ],
              [ '200 200 200 200', 'ERROR ERROR ERROR ERROR' ],
              'open: passes, status ERROR');
    is_deeply([ run($c, 'GET /c', 2, $key) ], [ '503 503', 'ERROR ERROR' ],
              'closed: 503');
    is($c->req('GET /plain')->status, 200, 'an unlimited location: 200');

    sleep 0.5;    # some reconnect attempts

    my $log = $t->error_log;
    for my $z (qw(l o c)) {
        is(count_re($log, qr/zone "$z": redis \S+ lost/), 1,
           "zone $z: lost logged once") or diag($log);
    }

    $rd->start;

    # reconnected within the backoff (at most 2s)
    my $end = time + 10 * $SLOW;
    my $st = '';
    while (time < $end) {
        (undef, $st) = run($c, 'GET /o', 1, uid());
        last if $st eq 'PASSED';
        sleep 0.1;
    }
    is($st, 'PASSED', 'open: back to Redis after a restart');

    $key = uid();
    is_deeply([ run($c, 'GET /l', 4, $key) ],
              [ '200 200 200 429', 'PASSED PASSED PASSED REJECTED' ],
              'local: limited');
    is_deeply([ run($c, 'GET /c', 1, uid()) ], [ '200', 'PASSED' ],
              'closed: passes again');

    @keys = $rd->keys;
    my @l = grep { /^l:\{/ } @keys;
    is(scalar(@l), 1, 'local: counted in Redis again') or diag("@keys");
    is($rd->cmd('GET', $l[0] // ''), 3, 'the count is 3');

    $log = $t->error_log;
    for my $z (qw(l o c)) {
        is(count_re($log, qr/zone "$z": redis \S+ lost/), 1,
           "zone $z: lost still once");
        is(count_re($log, qr/zone "$z": redis \S+ back/), 1,
           "zone $z: back logged once") or diag($log);
    }
    like($log, qr/\[error\].*zone "l": redis \S+ lost/, 'lost is an error');
    like($log, qr/\[notice\].*zone "l": redis \S+ back/, 'back a notice');

    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# slowed beyond redis_timeout (DEBUG SLEEP, CLIENT PAUSE), less than the
# stall bound (20 x redis_timeout, at least 2 s): each request that waited
# too long is decided by its failure policy, the connection stays, nothing
# is "lost"; then silent beyond the stall bound: lost once, back once

{
    my $rd = LLMLimit::Redis->new;
    my $tmo = int(100 * $SLOW);

    my $t = LLMLimit::Test->new(name => 'redis slow',
                                http => three_zones($rd->addr, "${tmo}ms"),
                                config => $SERVER)->start;
    my $c = $t->conn;

    is_deeply([ run($c, 'GET /o', 1, uid()) ], [ '200', 'PASSED' ],
              'Redis answers in time');

    for my $how ([ 'DEBUG', 'SLEEP', 1.2 * $SLOW ],
                 [ 'CLIENT', 'PAUSE', 1200 * $SLOW, 'ALL' ])
    {
        my $blocker = $rd->send_only(@$how);
        sleep 0.1;

        my $t0 = time;
        my @o = run($c, 'GET /o', 2, uid());
        my $dt = time - $t0;

        is_deeply(\@o, [ '200 200', 'ERROR ERROR' ],
                  "$how->[0]: open passes with ERROR");
        ok($dt < 1.5 * $SLOW, "$how->[0]: without waiting for Redis")
            or diag("took $dt s");

        my $key = uid();
        is_deeply([ run($c, 'GET /l', 4, $key) ],
                  [ '200 200 200 429', 'PASSED PASSED PASSED REJECTED' ],
                  "$how->[0]: local decides from shared memory");
        is_deeply([ run($c, 'GET /c', 1, $key) ], [ '503', 'ERROR' ],
                  "$how->[0]: closed answers 503");

        # Redis answers again
        $blocker->blocking(1);
        LLMLimit::Redis::read_reply($blocker) if $how->[0] eq 'DEBUG';
        if ($how->[0] eq 'CLIENT') {
            LLMLimit::Redis::read_reply($blocker);
            LLMLimit::Redis::write_cmd($blocker, 'CLIENT', 'UNPAUSE');
            LLMLimit::Redis::read_reply($blocker);
        }
        close $blocker;

        my $end = time + 10 * $SLOW;
        my $st = '';
        while (time < $end) {
            (undef, $st) = run($c, 'GET /o', 1, uid());
            last if $st eq 'PASSED';
            sleep 0.1;
        }
        is($st, 'PASSED', "$how->[0]: back to Redis");
    }

    my $log = $t->error_log;
    is(count_re($log, qr/redis \S+ (lost|back)/), 0,
       'slow replies: no "lost", no "back"') or diag($log);

    # silent beyond the stall bound

    my $pause = $rd->send_only('CLIENT', 'PAUSE', int(4000 * $SLOW), 'ALL');
    LLMLimit::Redis::read_reply($pause);

    my $t0 = time;
    my %seen;
    while (time - $t0 < 3 * $SLOW) {
        my (undef, $st) = run($c, 'GET /o', 1, uid());
        $seen{$st}++;
        sleep 0.1;
    }

    is(join(' ', sort keys %seen), 'ERROR', 'stalled: open passes, ERROR');

    LLMLimit::Redis::write_cmd($pause, 'CLIENT', 'UNPAUSE');
    LLMLimit::Redis::read_reply($pause);
    close $pause;

    my $end = time + 10 * $SLOW;
    my $st = '';
    while (time < $end) {
        (undef, $st) = run($c, 'GET /o', 1, uid());
        last if $st eq 'PASSED';
        sleep 0.1;
    }
    is($st, 'PASSED', 'back to Redis');

    $log = $t->error_log;
    is(count_re($log, qr/zone "o": redis \S+ lost/), 1, 'stalled: lost once')
        or diag($log);
    like($log, qr/zone "o": redis \S+ lost: no reply/, 'for no reply');
    is(count_re($log, qr/zone "o": redis \S+ back/), 1, 'back once');
    is(count_re($log, qr/zone "[lc]": redis \S+ (lost|back)/), 0,
       'the zones without requests: nothing');

    # the requests that timed out: in warnings, a line a second at most
    for my $z ([ 'o', 'open', 2 ], [ 'l', 'local', 4 ], [ 'c', 'closed', 1 ])
    {
        my $what = "timed out after ${tmo}ms, decided by "
                   . "redis_failure=$z->[1]";
        my @n = $log =~ /zone "$z->[0]": .*: (\d+) requests? \Q$what\E/g;
        my $sum = 0;
        $sum += $_ for @n;
        cmp_ok($sum, $z->[0] eq 'o' ? '>=' : '==', 2 * $z->[2],
               "zone $z->[0]: the timeouts are counted in warnings")
            or diag($log);

        my @sec = $log =~ /^(\S+ \S+) \[warn\].* "$z->[0]": .* timed out/mg;
        my %uniq = map { ($_ => 1) } @sec;
        is(scalar(keys %uniq), scalar(@sec),
           "zone $z->[0]: at most a line a second") or diag($log);
    }

    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# a server that answers garbage

{
    my $fake = LLMLimit::Redis::Fake->new(sub { "garbage!\r\n" });

    my $t = LLMLimit::Test->new(name => 'garbage server',
                                http => three_zones($fake->addr, $TMO),
                                config => $SERVER)->start;
    my $c = $t->conn;

    # at once: the first requests may wait behind the handshake
    is_deeply([ run($c, 'GET /o', 3, uid()) ],
              [ '200 200 200', 'ERROR ERROR ERROR' ], 'open: ERROR');

    my @pids = $t->workers;
    is_deeply([ run($c, 'GET /l', 4, uid()) ],
              [ '200 200 200 429', 'PASSED PASSED PASSED REJECTED' ],
              'local: shared memory');

    sleep 2.5;    # reconnects

    my $log = $t->error_log;
    like($log, qr/zone "o": redis \S+ lost: Protocol error/,
         'the protocol error is logged') or diag($log);
    is(count_re($log, qr/zone "o": redis \S+ lost/), 1, 'once');
    is_deeply([ $t->workers ], \@pids, 'no worker crashed');
    unlike($log, qr/exited on signal/, 'no worker exited on a signal');

    $t->stop;
    $fake->stop;
}


# ---------------------------------------------------------------------------
# a server that answers more than it was asked: a reply no command waits for
# drops the connection (hiredis would abort the worker on it)

{
    my $now = ":1795426400000\r\n";
    my $fake = LLMLimit::Redis::Fake->new(sub {
        my ($a) = @_;
        my $cmd = uc $a->[0];

        return "\$40\r\n" . sha1_hex($a->[2]) . "\r\n" if $cmd eq 'SCRIPT';

        # a good answer, then one more
        return "*4\r\n$now:0\r\n:2\r\n:1000\r\n" . "+OK\r\n";
    });

    my $t = LLMLimit::Test->new(name => 'unsolicited replies',
                                http => three_zones($fake->addr, $TMO),
                                config => $SERVER)->start;
    my $c = $t->conn;

    my @pids = $t->workers;

    for my $round (1 .. 3) {
        my ($st) = run($c, 'GET /o', 2, uid());
        is($st, '200 200', "open: round $round answered");
        select(undef, undef, undef, 0.3);
    }

    my ($st, $x) = run($c, 'GET /l', 4, uid());
    is($x, 'PASSED PASSED PASSED REJECTED', 'local: shared memory');

    sleep 1.5;    # reconnects, and is answered too much again

    my $log = $t->error_log;
    like($log, qr/zone "o": redis \S+ lost: a reply no command waits for/,
         'the reply is logged') or diag($log);
    is_deeply([ $t->workers ], \@pids, 'no worker crashed');
    unlike($log, qr/exited on signal/, 'no worker exited on a signal')
        or diag($log);

    $t->stop;
    $fake->stop;
}


# ---------------------------------------------------------------------------
# replies of the wrong type or shape; NOSCRIPT from a server that does not
# keep scripts

{
    # { Redis' time, status 0, remaining, reset } (counted), or { Redis'
    # time, status 1, rejected, remaining, reset, retry } (rejected)
    my $now = ":1795426400000\r\n";
    my $good = "*4\r\n$now:0\r\n:2\r\n:1000\r\n";
    my @bad = (
        [ "+OK\r\n",                                     'unexpected reply' ],
        [ ":1\r\n",                                      'unexpected reply' ],
        [ "\$-1\r\n",                                    'unexpected reply' ],
        [ "*2\r\n$now:0\r\n",                             'unexpected reply' ],
        [ "*3\r\n:0\r\n:2\r\n:1000\r\n",                 'unexpected reply' ],
        [ "*4\r\n$now:0\r\n\$1\r\n0\r\n:0\r\n",           'unexpected reply' ],
        [ "*4\r\n\$13\r\n1795426400000\r\n:0\r\n:2\r\n:1000\r\n",
                                                         'unexpected reply' ],
        [ "*5\r\n$now:0\r\n:2\r\n:1000\r\n:0\r\n",          'unexpected reply' ],
        [ "*4\r\n$now:2\r\n:2\r\n:1000\r\n",                'unexpected reply' ],
        [ "*5\r\n$now:1\r\n:1\r\n:0\r\n:5\r\n",            'unexpected reply' ],
        [ "*4\r\n:0\r\n:0\r\n:2\r\n:1000\r\n",             'out of range' ],
        [ "*4\r\n:-7\r\n:0\r\n:2\r\n:1000\r\n",            'out of range' ],
        [ "*4\r\n$now:0\r\n:99\r\n:0\r\n",                  'out of range' ],
        [ "*4\r\n$now:0\r\n:2\r\n:-5\r\n",                  'out of range' ],
        [ "*4\r\n$now:0\r\n:2\r\n:9000000\r\n",             'out of range' ],
        [ "*6\r\n$now:1\r\n:2\r\n:0\r\n:0\r\n:0\r\n",       'out of range' ],
        [ "*6\r\n$now:1\r\n:1\r\n:0\r\n:0\r\n:-1\r\n",      'out of range' ],
        [ "*6\r\n$now:1\r\n:0\r\n:2\r\n:0\r\n:0\r\n",       'inconsistent' ],
        [ "-ERR boom\r\n",                               'ERR boom' ],
        [ "*-1\r\n",                                     'unexpected reply' ],
    );

    # the n-th EVALSHA (0-based): bad[n/2] if n is even, else good; then
    # NOSCRIPT for every EVALSHA and good for EVAL
    my $log_file = File::Temp::tempdir('llmlimit-fake-XXXXXX', TMPDIR => 1,
                                       CLEANUP => 1) . '/commands';
    my $fake = LLMLimit::Redis::Fake->new(sub {
        my ($a) = @_;
        my $cmd = uc $a->[0];
        open my $fh, '>>', $log_file;
        print $fh "$cmd\n";
        close $fh;

        return "+OK\r\n" if $cmd eq 'AUTH' || $cmd eq 'SELECT';
        return "\$40\r\n" . sha1_hex($a->[2]) . "\r\n" if $cmd eq 'SCRIPT';
        return $good if $cmd eq 'EVAL';

        if ($cmd eq 'EVALSHA') {
            our $nev;
            my $n = $nev++ // 0;
            return $n % 2 ? $good : $bad[$n / 2][0] if $n < 2 * @bad;
            return "-NOSCRIPT No matching script. Please use EVAL.\r\n";
        }

        return "-ERR unknown command\r\n";
    });

    my $t = LLMLimit::Test->new(
        name   => 'wrong replies',
        http   => qq{
            llmlimit_zone o 1m redis=} . $fake->addr . qq{ redis_db=2
                          redis_password=x redis_timeout=$TMO
                          redis_failure=open;
            llmlimit_rules o zone=o {
                "Q"  GET  /o  \$http_x_api_key  3/1h;
            }
        },
        config => q{
            add_header X-Status $llmlimit_status always;
            location /o { llmlimit o; proxy_pass http://%%BACKEND%%; }
        },
    )->start;
    my $c = $t->conn;

    for my $i (0 .. $#bad) {
        my $key = uid();
        my $r = $c->req('GET /o', headers => { 'X-Api-Key' => $key });
        is($r->header('X-Status'), 'ERROR',
           "reply " . ($bad[$i][0] =~ s/\r\n/ /gr) . ": ERROR");
        is($r->status, 200, 'open: passes');

        $r = $c->req('GET /o', headers => { 'X-Api-Key' => $key });
        is($r->header('X-Status'), 'PASSED', 'then a good reply: PASSED');
        is($r->header('X-RateLimit-Remaining'), 2, 'with its values');
    }

    my $r = $c->req('GET /o', headers => { 'X-Api-Key' => uid() });
    is($r->header('X-Status'), 'PASSED', 'NOSCRIPT: resent with EVAL');

    my $log = $t->error_log;
    for my $i (0 .. $#bad) {
        like($log, qr/redis \S+ lost: .*\Q$bad[$i][1]\E/,
             "logged: $bad[$i][1]");
    }
    is(count_re($log, qr/redis \S+ lost/), scalar(@bad), 'lost once each');
    is(count_re($log, qr/redis \S+ back/), scalar(@bad), 'back once each');

    my $cmds = do { local (@ARGV, $/) = $log_file; <> } // '';
    unlink $log_file;
    like($cmds, qr/^AUTH\nSELECT\nSCRIPT\nEVALSHA\n/,
         'AUTH, SELECT, SCRIPT LOAD first');
    like($cmds, qr/EVALSHA\nEVAL\n\z/, 'EVAL after NOSCRIPT');

    $t->stop;
    $fake->stop;
}


# ---------------------------------------------------------------------------
# reload under load; a fast shutdown while replies are owed

{
    my $rd = LLMLimit::Redis->new;

    my $http = qq{
        llmlimit_zone rz 1m redis=} . $rd->addr . qq{ redis_timeout=$TMO
                      redis_failure=closed;
        llmlimit_rules api zone=rz {
            "Q"  GET  /q  \$http_x_api_key  1000000/1h;
        }
    };

    my $t = LLMLimit::Test->new(
        name => 'reload under load', http => $http, workers => 2,
        config => q{
            add_header X-Status $llmlimit_status always;
            location /q { llmlimit api; proxy_pass http://%%BACKEND%%; }
        },
    )->start;

    my $port = $t->port;
    my $stop_file = $t->prefix . '/stop-load';

    my $pid = fork;
    if ($pid == 0) {
        sleep 0.3;
        for (1 .. 3) {
            $t->reload(http => $http . "# $_\n");
            sleep 0.3;
        }
        open my $fh, '>', $stop_file;
        close $fh;
        POSIX::_exit(0);
    }

    my @res = parallel(4, sub {
        my %n;
        my $key = uid();
        until (-e $stop_file) {
            my $r = eval {
                LLMLimit::Test::Conn->new(port => $port)->req(
                    'GET /q', headers => { 'X-Api-Key' => $key }, close => 1)
            };
            $n{ $r ? $r->status . ' ' . ($r->header('X-Status') // '-')
                   : 'failed' }++;
        }
        return \%n;
    });

    waitpid($pid, 0);

    my %sum;
    for my $n (@res) {
        $sum{$_} += $n->{$_} for keys %$n;
    }

    note(explain(\%sum));
    ok($sum{'200 PASSED'} > 0, "requests passed through Redis")
        or diag(explain(\%sum));
    is(join(',', grep { $_ ne '200 PASSED' } sort keys %sum), '',
       'and nothing else, across three reloads') or diag(explain(\%sum));

    my $log = $t->error_log;
    is(count_re($log, qr/SIGHUP/), 3, 'three reloads')
        or diag($log);
    unlike($log, qr/redis \S+ lost/, 'no Redis connection lost');
    unlike($log, qr/open socket|exited on signal/,
           'exiting workers closed their connections');

    # a fast shutdown with requests waiting for Redis

    $rd->cmd('CLIENT', 'PAUSE', 1500, 'ALL');

    my @socks = map {
        my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port",
                                      Proto => 'tcp');
        print $s "GET /q HTTP/1.1\r\nHost: x\r\nX-Api-Key: a$_\r\n\r\n";
        $s;
    } 1 .. 4;

    sleep 0.3;
    kill 'TERM', $t->{pid};
    my $end = time + 10 * $SLOW;
    sleep 0.05 while time < $end && $t->alive;
    ok(!$t->alive, 'nginx stopped at once');
    close $_ for @socks;

    $log = $t->error_log;
    unlike($log, qr/exited on signal|open socket|\[alert\]|\[crit\]/,
           'cleanly') or diag($log);

    $t->{pid} = undef;
    $t->check_logs('fast shutdown') if valgrind();

    $rd->stop;
}


# ---------------------------------------------------------------------------
# worker_shutdown_timeout while replies are owed: the requests are freed
# (their cleanup detaches them), then the Redis connection is closed

{
    my $rd = LLMLimit::Redis->new;

    my $t = LLMLimit::Test->new(
        name   => 'shutdown timeout',
        main   => 'worker_shutdown_timeout 1s;',
        http   => qq{
            llmlimit_zone rz 1m redis=} . $rd->addr . qq{ redis_timeout=30s
                          redis_failure=closed;
            llmlimit_rules api zone=rz {
                "Q"  GET  /q  \$http_x_api_key  100/1h;
            }
        },
        config => q{
            location /q { llmlimit api; proxy_pass http://%%BACKEND%%; }
        },
    )->start;

    is($t->conn->req('GET /q', headers => { 'X-Api-Key' => 'k' })->status,
       200, 'connected');
    $t->conn->close;

    my $pause = $rd->send_only('CLIENT', 'PAUSE', int(4000 * $SLOW), 'ALL');

    my @socks = map {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port,
                                      Proto => 'tcp');
        print $s "GET /q HTTP/1.1\r\nHost: x\r\nX-Api-Key: w$_\r\n\r\n";
        $s;
    } 1 .. 3;

    sleep 0.3;

    my $t0 = time;
    kill 'QUIT', $t->{pid};
    my $end = time + 20 * $SLOW;
    sleep 0.05 while time < $end && $t->alive;
    ok(!$t->alive, 'nginx exited');
    ok(time - $t0 < 3.5 * $SLOW, 'after worker_shutdown_timeout, not after '
       . 'the replies') or diag(time - $t0);
    close $_ for @socks;

    my $log = $t->error_log;
    unlike($log, qr/exited on signal|open socket|\[alert\]|\[crit\]/,
           'cleanly') or diag($log);

    $t->{pid} = undef;
    $t->check_logs('shutdown timeout') if valgrind();

    close $pause;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# several requests in one call: a reply of the wrong shape fails them all;
# NOSCRIPT resends the whole call with EVAL

{
    my $N = 3;
    my $now = ":1795426400000\r\n";
    my $one = "*4\r\n$now:0\r\n:2\r\n:1000\r\n";
    my $log_file = File::Temp::tempdir('llmlimit-fake-XXXXXX', TMPDIR => 1,
                                       CLEANUP => 1) . '/commands';

    # the first EVALSHA: one request's reply; then NOSCRIPT; EVAL: right
    my $fake = LLMLimit::Redis::Fake->new(sub {
        my ($a) = @_;
        my $cmd = uc $a->[0];
        open my $fh, '>>', $log_file;
        print $fh "$cmd\n";
        close $fh;

        return "\$40\r\n" . sha1_hex($a->[2]) . "\r\n" if $cmd eq 'SCRIPT';

        if ($cmd eq 'EVALSHA') {
            our $nbatch;
            return $one if !$nbatch++;
            return "-NOSCRIPT No matching script. Please use EVAL.\r\n";
        }

        if ($cmd eq 'EVAL') {
            # ARGV: m, L limits, f entries, 4 per limit, 3 per entry, a
            # byte per request: its number of counters
            my $nkeys = $a->[2];
            my ($m, $l, $f) = @$a[3 + $nkeys .. 5 + $nkeys];
            my $ns = $a->[6 + $nkeys + 4 * $l + 3 * $f];
            my $r = '*' . (1 + $m + 2 * ($nkeys - $f)) . "\r\n$now";
            for my $n (unpack 'C*', $ns) {
                $r .= ":0\r\n" . (":2\r\n:1000\r\n" x $n);
            }
            return $r;
        }

        return "-ERR unknown command\r\n";
    });

    my $t = LLMLimit::Test->new(
        name   => 'batch replies',
        http   => qq{
            llmlimit_zone o 1m redis=} . $fake->addr . qq{
                          redis_timeout=$TMO redis_failure=open;
            llmlimit_rules o zone=o {
                "Q"  GET  /o  \$http_x_api_key  3/1h;
            }
        },
        config => q{
            add_header X-Status $llmlimit_status always;
            location /o { llmlimit o; proxy_pass http://%%BACKEND%%; }
            location /plain/ { proxy_pass http://%%BACKEND%%; }
        },
    )->start;

    my @c = map { LLMLimit::Test::Conn->new(port => $t->port) } 1 .. $N;
    $_->req('GET /plain/') for @c;
    my ($worker) = $t->workers;

    my $req = sub {
        "GET /o HTTP/1.1\r\nHost: localhost\r\nX-Api-Key: " . uid()
        . "\r\n\r\n";
    };

    my @r = LLMLimit::Redis::one_turn($worker, \@c, $req);
    is(join(' ', map { ($_->header('X-Status') // '-') . ' ' . $_->status }
                     @r),
       join(' ', ('ERROR 200') x $N),
       "$N requests in one call, a reply for one: all ERROR (open)");

    @r = LLMLimit::Redis::one_turn($worker, \@c, $req);
    is(join(' ', map { ($_->header('X-Status') // '-') . ' '
                       . ($_->header('X-RateLimit-Remaining') // '-') } @r),
       join(' ', ('PASSED 2') x $N),
       "NOSCRIPT: the $N requests resent in one EVAL");

    like($t->error_log, qr/redis \S+ lost: unexpected reply/,
         'logged: unexpected reply');

    my $cmds = do { local (@ARGV, $/) = $log_file; <> } // '';
    unlink $log_file;
    like($cmds, qr/^SCRIPT\nEVALSHA\nEVALSHA\nEVAL\n\z/,
         'one EVALSHA per call, one EVAL after NOSCRIPT');

    $_->close for @c;
    $t->stop;
    $fake->stop;
}


finish();
