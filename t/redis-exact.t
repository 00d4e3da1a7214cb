# Limits that hold exactly with Redis (issue 8): a slow reply costs the
# request that waited for it, not the connection; redis_timeout below
# timer_resolution is raised.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use POSIX ();
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $SLOW = slow();

# a per-request timeout well above a loaded loopback round trip; the stall
# bound (a silent connection is dropped) is 20 times it: 4 s
my $TMO = int(200 * $SLOW);


sub zone {
    my ($name, $addr, $policy, %o) = @_;
    my $tmo = $o{timeout} // "${TMO}ms";
    return qq{
        llmlimit_zone $name 1m redis=$addr redis_prefix=$name:
                      redis_timeout=$tmo redis_failure=$policy;
    };
}


sub run {
    my ($c, $spec, $n, %h) = @_;
    my @r = map { $c->req($spec, headers => { %h }) } 1 .. $n;
    return (join(' ', map { $_->status } @r),
            join(' ', map { $_->header('X-Status') // '-' } @r),
            join(' ', map { $_->header('X-RateLimit-Remaining') // '-' } @r));
}


# the statuses only
sub st { return (run(@_))[0] }


sub count_re {
    my ($text, $re) = @_;
    my @m = $text =~ /$re/g;
    return scalar @m;
}


# what Redis counted under a prefix (one key): cur + prev of the sliding
# window, so that an hour boundary inside the test changes nothing
sub redis_count {
    my ($rd, $prefix) = @_;

    my @k = grep { index($_, $prefix) == 0 } $rd->keys;
    return 0 unless @k;
    return "keys: @k" if @k > 1;

    my $v = $rd->cmd('GET', $k[0]) // return 0;
    my (undef, undef, $cur, $prev) = split ' ', $v;

    return $cur + $prev;
}


# polls until Redis holds WANT under PREFIX (replies and take-backs are
# asynchronous); returns the last count seen
sub wait_count {
    my ($rd, $prefix, $want) = @_;

    my $end = time + 5 * $SLOW;
    my $n;

    while (1) {
        $n = redis_count($rd, $prefix);
        return $n if $n eq $want || time > $end;
        sleep 0.05;
    }
}


# Redis slowed by sleeps of EACH seconds one after the other, from another
# connection, for SECONDS; returns the pid of the process that sends them
sub sleeper {
    my ($rd, $seconds, $each) = @_;

    my $until = time + $seconds;
    my $pid = fork;
    die "fork: $!" unless defined $pid;

    if ($pid == 0) {
        my $s = $rd->connect;
        while (time < $until) {
            LLMLimit::Redis::write_cmd($s, 'DEBUG', 'SLEEP', $each);
            LLMLimit::Redis::read_reply($s);
            sleep 0.005;
        }
        POSIX::_exit(0);
    }

    return $pid;
}


my $SERVER = q{
    add_header X-Status $llmlimit_status always;
    location /l { llmlimit l; proxy_pass http://%%BACKEND%%; }
    location /o { llmlimit o; proxy_pass http://%%BACKEND%%; }
};


# ---------------------------------------------------------------------------
# Redis slowed, but below the timeout, then paused for less than the stall
# bound: no "lost", the requests are answered from Redis, those that timed
# out by their failure policy; one line a second at most about them

{
    my $rd = LLMLimit::Redis->new;

    my $t = LLMLimit::Test->new(
        name   => 'slow replies',
        http   => zone('l', $rd->addr, 'local') . zone('o', $rd->addr, 'open')
                  . q{
            llmlimit_rules l zone=l { "L"  GET  /l  $http_x_api_key  1000/1h; }
            llmlimit_rules o zone=o { "O"  GET  /o  $http_x_api_key  1000/1h; }
        },
        config => $SERVER,
    )->start;
    my $c = $t->conn;

    # 30 ms sleeps one after the other, for 1.5 s
    my $until = time + 1.5 * $SLOW;
    my $pid = sleeper($rd, 1.5 * $SLOW, '0.03');

    sleep 0.05;

    my $key = uid();
    my ($st, $x, $rem) = run($c, 'GET /l', 15, 'X-Api-Key' => $key);
    is($x, join(' ', ('PASSED') x 15), 'slowed by 30 ms sleeps: PASSED');
    is($rem, join(' ', reverse 985 .. 999), 'counted in Redis, in order');
    ok(time < $until, 'while Redis was sleeping') or diag('too slow a run');

    waitpid($pid, 0);

    is(redis_count($rd, 'l:'), 15, 'Redis holds the 15');
    my %before = map { ($_ => 1) } $rd->keys;

    # paused for 2 s, less than the stall bound (4 s)

    my $pause = $rd->send_only('CLIENT', 'PAUSE', int(2000 * $SLOW), 'ALL');
    LLMLimit::Redis::read_reply($pause);
    my $t0 = time;

    my $k2 = uid();
    is_deeply([ run($c, 'GET /l', 3, 'X-Api-Key' => $k2) ],
              [ '200 200 200', 'PASSED PASSED PASSED', '999 998 997' ],
              'paused: local decides, from shared memory');
    is_deeply([ (run($c, 'GET /o', 2, 'X-Api-Key' => uid()))[0, 1] ],
              [ '200 200', 'ERROR ERROR' ], 'paused: open passes, ERROR');

    ok(time - $t0 < 2 * $SLOW, 'within the pause') or diag(time - $t0);
    sleep 0.05 while time - $t0 < 2.1 * $SLOW;
    close $pause;

    my $end = time + 10 * $SLOW;
    my $o = '';
    while (time < $end) {
        (undef, $o) = run($c, 'GET /o', 1, 'X-Api-Key' => uid());
        last if $o eq 'PASSED';
        sleep 0.1;
    }
    is($o, 'PASSED', 'Redis answers again');

    # the late replies counted the three requests the fallback admitted:
    # once in Redis, once in shared memory, as any admitted request
    my ($k2key) = grep { /^l:/ && !$before{$_} } $rd->keys;
    is(wait_count($rd, $k2key // 'none', 3), 3,
       'the three counted once in Redis');
    is_deeply([ run($c, 'GET /l', 1, 'X-Api-Key' => $k2) ],
              [ '200', 'PASSED', '996' ],
              'a request that timed out and was admitted is counted once '
              . 'in Redis');

    my $log = $t->error_log;
    is(count_re($log, qr/redis \S+ lost/), 0, 'no "lost" line')
        or diag($log);
    is(count_re($log, qr/redis \S+ back/), 0, 'no "back" line');
    like($log, qr/\[warn\].*zone "l": redis \S+: \d+ requests? timed out/,
         'the timeouts are logged as a warning');
    my @sec = $log =~ /^(\S+ \S+) \[warn\].* zone "l": .* timed out/mg;
    my %uniq = map { ($_ => 1) } @sec;
    is(scalar(keys %uniq), scalar(@sec), 'at most one line a second')
        or diag($log);

    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# redis_timeout below timer_resolution

{
    my $rd = LLMLimit::Redis->new;
    my $res = int(100 * $SLOW) . 'ms';
    my $http = zone('tr', $rd->addr, 'local', timeout => '20ms') . q{
        llmlimit_rules tr zone=tr { "TR"  GET  /tr  $http_x_api_key  1000/1h; }
    };

    my $r = nginx_t(main => "timer_resolution $res;", http => $http);
    is($r->{rc}, 0, 'nginx -t passes');
    like($r->{out}, qr/\[warn\].*zone "tr".*redis_timeout.*timer_resolution/,
         'nginx -t warns, naming the zone') or diag($r->{out});

    # timer_resolution after the http block
    my $t0 = LLMLimit::Test->new(http => $http);
    $r = nginx_t(conf => $t0->conf_text . "\ntimer_resolution $res;\n");
    $t0->{tested} = 1;
    like($r->{out}, qr/\[warn\].*zone "tr".*redis_timeout.*timer_resolution/,
         'also with timer_resolution after http { }') or diag($r->{out});

    $r = nginx_t(main => 'timer_resolution 10ms;', http => $http);
    unlike($r->{out}, qr/\[warn\].*zone "tr"/,
           'no warning when the timeout is above it') or diag($r->{out});

    my $t = LLMLimit::Test->new(
        name   => 'timer_resolution',
        main   => "timer_resolution $res;",
        http   => $http,
        config => q{
            add_header X-Status $llmlimit_status always;
            location /tr { llmlimit tr; proxy_pass http://%%BACKEND%%; }
        },
    )->start;

    my $c = $t->conn;
    my $key = uid();

    # replies 10 ms late at most, within even the 20 ms configured: a
    # timer of 20 ms fires at the next tick, which may come sooner
    my $pid = sleeper($rd, 2 * $SLOW, '0.01');
    sleep 0.05;

    my ($st, $x, $rem) = run($c, 'GET /tr', 40, 'X-Api-Key' => $key);
    is($x, join(' ', ('PASSED') x 40), 'answered from Redis');
    is($rem, join(' ', reverse 960 .. 999), 'with the counts of Redis');

    waitpid($pid, 0);

    is(redis_count($rd, 'tr:'), 40, 'Redis holds them');

    my $log = $t->error_log;
    is(count_re($log, qr/redis \S+ lost/), 0, 'no "lost" line') or diag($log);
    like($log, qr/\[warn\].*zone "tr".*timer_resolution/,
         'the warning is in error.log too');

    $t->stop;
    $rd->stop;
}



finish();
