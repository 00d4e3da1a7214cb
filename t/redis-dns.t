# redis=NAME:PORT follows the name: with a "resolver" in the http block the
# name is resolved again, through it, on every reconnect.  A test DNS
# server (t/dns-lib.pl) names redis-server A on 127.0.0.2, then B on
# 127.0.0.3 (same port); A is stopped and the counters go to B.  Also what
# nginx -t says of names with and without a resolver.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";
require "$FindBin::Bin/dns-lib.pl";

plan skip_all => 'redis-server not installed' unless LLMLimit::Redis::available();

my $SLOW = slow();
my $NAME = 'redis.llmlimit.test';


# nginx -t: a name is not resolved at configuration when a resolver is set
# (before or after llmlimit_zone); without one it must resolve now

for my $order (0, 1) {
    my $zone = qq{
        llmlimit_zone z 1m redis=no-such-host.invalid:6379;
        llmlimit_rules api zone=z { "Q" * * \$binary_remote_addr 10/1m; }
    };
    my $resolver = "resolver 127.0.0.1:1;\n";

    my $r = nginx_t(http => $order ? $zone . $resolver : $resolver . $zone);
    is($r->{rc}, 0, "a name with a resolver is accepted (resolver "
                    . ($order ? 'after' : 'before') . ')')
        or diag($r->{out});
}

{
    my $r = nginx_t(http => q{
        llmlimit_zone z 1m redis_sentinel=127.0.0.1:26379,s2.invalid redis_master=m;
        llmlimit_rules api zone=z { "Q" * * $binary_remote_addr 10/1m; }
    });
    isnt($r->{rc}, 0, 'a sentinel name without a resolver must resolve');
    my $line = line_of($r->{conf}, 'llmlimit_zone z');
    like($r->{out}, qr/\[emerg\].*host not found in "s2\.invalid" .* in \Q$r->{conf}\E:$line/,
         'names the address, file and line') or diag($r->{out});
}


# the name moves from A to B

my $port = LLMLimit::Test::free_port();
my $A = LLMLimit::Redis->new(bind => '127.0.0.2', port => $port);
my $B = LLMLimit::Redis->new(bind => '127.0.0.3', port => $port);

my $dns = LLMLimit::DNS->new;
$dns->set($NAME => '127.0.0.2');

# an nginx with zone z on the name, redis_timeout TIMEOUT (s), POLICY
sub start_nginx {
    my ($name, $timeout, $policy) = @_;

    my $tmo = int(1000 * $timeout * $SLOW) . 'ms';

    return LLMLimit::Test->new(name => $name, http => qq{
        resolver ${\ $dns->addr } valid=1s ipv6=off;
        resolver_timeout 30s;
        llmlimit_zone z 1m redis=$NAME:$port redis_timeout=$tmo
                      redis_failure=$policy;
        llmlimit_rules api zone=z {
            "Q"  GET  /q  \$http_x_api_key  5/1h;
        }
    }, config => q{
        add_header X-Status $llmlimit_status always;
        location /q { llmlimit api; proxy_pass http://%%BACKEND%%; }
    })->start;
}


my $t = start_nginx('dns', 1, 'open');

my $c = $t->conn;


# requests until one is decided in Redis (PASSED), at most $secs
sub until_redis {
    my ($secs) = @_;
    my $end = time + $secs * $SLOW;
    my %seen;

    while (time < $end) {
        my $r = $c->req('GET /q', headers => { 'X-Api-Key' => uid() });
        my $st = $r->header('X-Status') // '-';
        $seen{$st}++;
        return (1, \%seen) if $st eq 'PASSED';
        sleep 0.1;
    }

    return (0, \%seen);
}


# exactly 5 pass then 429, for a fresh key: counted in one Redis
sub exact {
    my ($what) = @_;
    my $key = uid();
    my @st = map {
        $c->req('GET /q', headers => { 'X-Api-Key' => $key })->status
    } 1 .. 6;
    is("@st", '200 200 200 200 200 429', "exact counting in $what");
}


my ($ok) = until_redis(20);
ok($ok, 'connected to the name\'s address');
exact('A');

my @keys_a = $A->keys;
ok(scalar @keys_a, 'the counters are in A') or diag("A: @keys_a");
my @none = $B->keys;
is(scalar @none, 0, 'nothing in B');
ok($dns->queries($NAME) >= 1, 'the name was asked of the resolver');

# the name moves, A goes away: the next connect resolves again

$dns->set($NAME => '127.0.0.3');
sleep 1.5;
$A->stop;

my ($back, $seen) = until_redis(30);
ok($back, 'reconnected after A stopped')
    or diag(explain($seen));

exact('B');

my @keys_b = $B->keys;
ok(scalar @keys_b, 'the counters are in B now') or diag("B: @keys_b");

my $log = $t->error_log;
like($log, qr/redis \Q$NAME:$port\E is at 127\.0\.0\.3:$port now/,
     'the new address is logged');
my @lost = $log =~ /redis \Q$NAME:$port\E lost/g;
my @again = $log =~ /redis \Q$NAME:$port\E back/g;
ok(@lost >= 1 && @lost <= 2, 'lost logged once per worker') or diag($log);
ok(@again >= 1 && @again <= 2, 'back logged once per worker') or diag($log);
unlike($log, qr/getaddrinfo/, 'no getaddrinfo');

$t->stop;


# while a worker's first connect waits for the resolver, requests wait with
# it (up to redis_timeout), as they do behind the handshake: not 503

$dns->delay(2 * $SLOW);

$t = start_nginx('dns slow', 10, 'closed');

my $r = $t->conn->req('GET /q', headers => { 'X-Api-Key' => uid() });
is($r->status . ' ' . ($r->header('X-Status') // '-'), '200 PASSED',
   'the first request waited for the first connect');

$t->stop;

finish();
