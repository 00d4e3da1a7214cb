# redis_sync=TIME (SPEC, llmlimit_zone): decisions from shared memory,
# deltas pushed and cluster totals read back every TIME; two nginx
# instances on one redis-server.  The README's bound: in a window, the
# admitted total is at most COUNT + what the other host admits in 2 * TIME
# (plus a round trip and timer lag).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $SLOW = slow();


sub http {
    my ($addr, $extra) = @_;
    $extra //= '';
    return qq{
        llmlimit_zone y 1m redis=$addr redis_prefix=y: redis_sync=100ms
                      $extra;
        llmlimit_rules f zone=y algorithm=fixed {
            "F"  GET  /f  \$http_x_api_key  50/2s;
        }
        llmlimit_rules h zone=y algorithm=sliding {
            "H"  GET  /h  \$http_x_api_key  100/1h;
        }
    };
}

my $SERVER = q{
    add_header X-Status $llmlimit_status always;
    location /f { llmlimit f; try_files /ok.txt =404; }
    location /h { llmlimit h; try_files /ok.txt =404; }
};


sub passed {
    my ($c, $spec, $key) = @_;
    my $r = $c->req($spec, headers => { 'X-Api-Key' => $key });
    return $r->status == 200 ? 1 : 0;
}


# the total of a counter's window keys in Redis (one key per window)
sub redis_total {
    my ($rd) = @_;
    my $n = 0;
    $n += $rd->cmd('GET', $_) // 0 for grep { /^y:s\{/ } $rd->keys;
    return $n;
}


# ---------------------------------------------------------------------------
# nginx -t

for my $case (['redis=127.0.0.1 redis_sync=abc', qr/invalid value/],
              ['redis=127.0.0.1 redis_sync=0', qr/invalid value/],
              ['redis=127.0.0.1 redis_sync=5ms', qr/invalid value/],
              ['redis_sync=100ms', qr/requires "redis="/],
              ['redis=127.0.0.1 redis_sync=1s redis_sync=off',
               qr/duplicate parameter/])
{
    my ($p, $re) = @$case;
    my $r = nginx_t(http => qq{
        llmlimit_zone z 1m $p;
        llmlimit_rules r zone=z { "A" GET /a \$http_x_api_key 5/1m; }
    });
    isnt($r->{rc}, 0, "nginx -t rejects: $p");
    like($r->{out}, qr/\[emerg\].*$re/, "message for: $p") or diag($r->{out});
}

{
    my $r = nginx_t(http => q{
        llmlimit_zone z 1m redis=127.0.0.1 redis_sync=100ms;
        llmlimit_rules r zone=z algorithm=gcra { "A" GET /a $http_x_api_key 5/1m; }
    });
    isnt($r->{rc}, 0, 'nginx -t rejects gcra with redis_sync');
    like($r->{out}, qr/\[emerg\].*algorithm=gcra .* not supported by the redis_sync store/,
         'gcra: message') or diag($r->{out});

    for my $p ('redis_sync=off', 'redis_sync=250ms') {
        $r = nginx_t(http => qq{
            llmlimit_zone z 1m redis=127.0.0.1 $p;
            llmlimit_rules r zone=z { "A" GET /a \$http_x_api_key 5/1m; }
        });
        is($r->{rc}, 0, "nginx -t accepts $p") or diag($r->{out});
    }
}


my $rd = LLMLimit::Redis->new;

my $ta = LLMLimit::Test->new(name => 'sync a', http => http($rd->addr),
                             config => $SERVER, workers => 2)->start;
my $tb = LLMLimit::Test->new(name => 'sync b', http => http($rd->addr),
                             config => $SERVER, workers => 2)->start;
my $ca = $ta->conn;
my $cb = $tb->conn;


# ---------------------------------------------------------------------------
# one host alone gets COUNT, then the other learns it within a push

{
    my $key = uid();

    # at the start of a window
    sleep 0.01 while int(time * 1000) % 2000 > 100;

    my $a = 0;
    $a += passed($ca, 'GET /f', $key) for 1 .. 60;
    is($a, 50, 'one host alone: COUNT admitted');

    sleep 0.3;

    # B paced at 100/s: it admits at most what it admits in one sync
    my $b = 0;
    for (1 .. 30) { $b += passed($cb, 'GET /f', $key); sleep 0.01; }
    ok($b <= 30 * $SLOW, "the other host learns within a push: $b");
    diag("other host after A took COUNT: admitted $b");
}


# ---------------------------------------------------------------------------
# both hosts, paced at 100 requests/s each, for three whole windows:
# per window, COUNT <= admitted <= COUNT + 100/s * (2 * 100ms + slack)

{
    my $key = uid();
    my %win;

    sleep 0.01 while int(time * 1000) % 2000 > 20;
    my $end = time + 6;

    while (time < $end) {
        my $t0 = time;
        my $w = int($t0 * 1000 / 2000);
        $win{$w} += passed($ca, 'GET /f', $key);
        $win{$w} += passed($cb, 'GET /f', $key);
        my $rest = 0.01 - (time - $t0);
        sleep $rest if $rest > 0;
    }

    my @w = sort { $a <=> $b } keys %win;
    @w = @w[0 .. 2] if @w > 3;
    my $bound = 50 + int(100 * (0.2 + 0.1 * $SLOW));

    for my $w (@w) {
        my $n = $win{$w};
        diag("window $w: admitted $n across both hosts");
        ok($n >= 50, "window: not starved ($n >= 50)");
        ok($n <= $bound, "window: within the bound ($n <= $bound)");
    }
}


# ---------------------------------------------------------------------------
# Redis stopped: both hosts go on locally; restarted: the deltas kept are
# pushed and both converge on the cluster's total

{
    my $key = uid();

    $rd->stop;
    sleep 0.2;

    my ($a, $b) = (0, 0);
    $a += passed($ca, 'GET /h', $key) for 1 .. 30;
    $b += passed($cb, 'GET /h', $key) for 1 .. 30;
    is("$a $b", '30 30', 'Redis down: both hosts serve, locally');

    sleep 0.5;
    $rd->start;

    my $end = time + 8 * $SLOW;
    my $n = 0;
    while (time < $end) {
        $n = redis_total($rd);
        last if $n >= 60;
        sleep 0.1;
    }
    is($n, 60, 'Redis back: the deltas kept while it was down are pushed');

    sleep 0.5;    # both hosts read the totals again

    my $ra = $ca->req('GET /h', headers => { 'X-Api-Key' => $key });
    my $rb = $cb->req('GET /h', headers => { 'X-Api-Key' => $key });
    my $rem = join ' ', map { $_->header('X-RateLimit-Remaining') // '-' }
                        $ra, $rb;
    like($rem, qr/^39 3[89]$/, "both hosts see the cluster total: $rem");

    for my $t ($ta, $tb) {
        my $log = $t->error_log;
        my @lost = $log =~ /redis \S+ lost/g;
        my @back = $log =~ /redis \S+ back/g;
        ok(@lost >= 1 && @lost <= 2 && @back == @lost,
           'lost and back logged once per worker')
            or diag($log);
    }
}

$ta->stop;
$tb->stop;

done_testing;
