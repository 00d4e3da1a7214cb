# redis_sentinel= against fake sentinels (Perl, from this test) that
# answer what the test tells them: garbage, a wrong type, nil (an unknown
# master), nothing at all (every sentinel down) never crash a worker, the
# zone's failure policy decides; a sentinel that answers right but sends
# garbage to anything else asked does not either; a master that a
# sentinel names afresh is followed (it is asked again every second).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $SLOW = slow();


sub wait_for {
    my ($secs, $cond) = @_;
    my $end = time + $secs * $SLOW;
    while (time < $end) {
        return 1 if eval { $cond->() };
        sleep 0.1;
    }
    return 0;
}


sub bulk { my ($s) = @_; return '$' . length($s) . "\r\n$s\r\n" }

sub where { my ($ip, $port) = @_; return "*2\r\n" . bulk($ip) . bulk($port) }


# a fake sentinel: the answer to SENTINEL get-master-addr-by-name read from
# a file (so that the test can change it), $other for anything else
sub sentinel {
    my ($file, $other) = @_;
    return LLMLimit::Redis::Fake->new(sub {
        my ($args) = @_;
        if (uc $args->[0] eq 'SENTINEL') {
            open my $fh, '<', $file or return "-ERR no file\r\n";
            local $/;
            return scalar <$fh>;
        }
        return $other;
    });
}


sub answer {
    my ($file, $text) = @_;
    open my $fh, '>', "$file.tmp" or die $!;
    print {$fh} $text;
    close $fh;
    rename "$file.tmp", $file or die $!;
}


my $dir = tempdir('llmlimit-sentinel-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $A = LLMLimit::Redis->new;
my $B = LLMLimit::Redis->new;

# the first sentinel: answers right, garbage to everything else (the
# reply of a SUBSCRIBE as hiredis' pub/sub mode must not see it)
answer("$dir/1", where('127.0.0.1', $A->port));
my $S1 = sentinel("$dir/1", "*1\r\n\$7\r\nmessage\r\n");

# the second: what the test says
answer("$dir/2", "\$-1\r\n");
my $S2 = sentinel("$dir/2", "-ERR unknown\r\n");

my $t = LLMLimit::Test->new(name => 'sentinel-fake', workers => 2, http => qq{
    llmlimit_zone o 1m redis_sentinel=${\ $S1->addr } redis_master=m
                  redis_timeout=1s redis_failure=open redis_prefix=o:;
    llmlimit_zone c 1m redis_sentinel=${\ $S2->addr } redis_master=m
                  redis_timeout=1s redis_failure=closed redis_prefix=c:;
    llmlimit_rules o zone=o { "O"  GET  /o  \$http_x_api_key  3/1h; }
    llmlimit_rules c zone=c { "C"  GET  /c  \$http_x_api_key  3/1h; }
}, config => q{
    add_header X-Status $llmlimit_status always;
    location /o { llmlimit o; proxy_pass http://%%BACKEND%%; }
    location /c { llmlimit c; proxy_pass http://%%BACKEND%%; }
})->start;

my $c = $t->conn;


sub status {
    my ($uri, $key) = @_;
    my $r = eval {
        $c->req("GET $uri", headers => { 'X-Api-Key' => $key // uid() });
    };
    if (!$r) {
        $c = $t->conn;
        return 'no response';
    }
    return $r->status . ' ' . ($r->header('X-Status') // '-');
}


sub crashed { return $t->error_log =~ /exited on signal|assert/ }


# several in a row decided in Redis: both workers are connected
sub until_redis {
    my ($uri, $secs) = @_;
    my $good = 0;
    return wait_for($secs, sub {
        $good = status($uri) eq '200 PASSED' ? $good + 1 : 0;
        return $good >= 6;
    });
}


sub exact {
    my ($uri) = @_;
    my $key = uid();
    return join ' ', map { (split ' ', status($uri, $key))[0] } 1 .. 4;
}


sub prefixed {
    my ($rd, $p) = @_;
    return scalar grep { /^\Q$p\E/ } $rd->keys;
}


# 1. the master is found; the garbage the sentinel sends to anything else
# does not matter, for a few seconds of questions

ok(until_redis('/o', 20), 'decided in Redis, the master named by a sentinel');
sleep 3;
ok(until_redis('/o', 20), 'still decided in Redis');
is(exact('/o'), '200 200 200 429', 'exact');
ok(prefixed($A, 'o:') > 0, 'counted in the master named');
ok(!crashed(), 'no worker crashed') or diag($t->error_log);


# 2. a master named afresh is followed

my $before = length $t->error_log;
answer("$dir/1", where('127.0.0.1', $B->port));
ok(wait_for(20, sub { status('/o'); prefixed($B, 'o:') > 0 }),
   'counting moves to B');
ok(until_redis('/o', 20), 'decided in Redis');
is(exact('/o'), '200 200 200 429', 'exact in B');
my $port = $B->port;
like($t->error_log($before), qr/redis master m switched to 127\.0\.0\.1:$port/,
     'the switch is logged');


# 3. unknown master (nil), garbage, wrong types, a port out of range, an
# error: the failure policy (closed: 503), no crash

my @bad = (
    [ 'nil', "\$-1\r\n" ],
    [ 'nil array', "*-1\r\n" ],
    [ 'an error', "-IDONTKNOW what\r\n" ],
    [ 'an integer', ":5\r\n" ],
    [ 'a status', "+OK\r\n" ],
    [ 'a message', "*1\r\n\$7\r\nmessage\r\n" ],
    [ 'integers', "*2\r\n:1\r\n:2\r\n" ],
    [ 'nested', "*2\r\n*1\r\n:1\r\n\$4\r\n6379\r\n" ],
    [ 'three', "*3\r\n" . bulk('127.0.0.1') . bulk('1') . bulk('2') ],
    [ 'a bad port', where('127.0.0.1', '99999') ],
    [ 'no port', where('127.0.0.1', 'x') ],
    [ 'an empty host', where('', '6379') ],
    [ 'a long host', where('a' x 300, '6379') ],
    [ 'not RESP', "hello\r\n" ],
);

for my $b (@bad) {
    answer("$dir/2", $b->[1]);
    my %seen;
    $seen{status('/c')}++ for 1 .. 5;
    is(join(',', sort keys %seen), '503 ERROR', "$b->[0]: the policy");
}

ok(!crashed(), 'no worker crashed') or diag($t->error_log);
like($t->error_log, qr/sentinel .* does not know "m"|no sentinel named/,
     'logged');


# 4. every sentinel down and the master lost: the policy

$S1->stop;
$S2->stop;
$B->stop;
ok(wait_for(20, sub { status('/o') eq '200 ERROR' }), 'open: passes, ERROR');
my %seen;
$seen{status('/c')}++ for 1 .. 5;
is(join(',', sort keys %seen), '503 ERROR', 'closed: 503');
ok(!crashed(), 'no worker crashed') or diag($t->error_log);

$t->stop;

finish();
