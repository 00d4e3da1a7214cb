# llmlimit_metrics of a Redis zone, with a real redis-server: up, the
# latency histogram, timeouts and fallbacks while Redis sleeps, a stopped
# Redis (up 0, errors, fallbacks), restarted (a reconnect, up 1); error
# replies and replies of the wrong shape from a fake server.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use Digest::SHA qw(sha1_hex);
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";
require "$FindBin::Bin/metrics-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $SLOW = slow();
my $TMO = int(400 * $SLOW) . 'ms';


sub scrape {
    my ($t) = @_;
    return metrics_values($t->req('GET /metrics')->body);
}


# polls the exposition until CODE is true of it (or gives up): the
# connection events of the worker come on their own time
sub scrape_until {
    my ($t, $code) = @_;
    my %m;
    my $end = time + 15 * $SLOW;

    while (time < $end) {
        %m = scrape($t);
        return %m if $code->(\%m);
        sleep 0.1;
    }

    return %m;
}


sub statuses {
    my ($c, $n) = @_;
    return join ' ', map {
        $c->req('GET /r', headers => { 'X-Api-Key' => LLMLimit::Test::uid() })
          ->header('X-Status') // '-'
    } 1 .. $n;
}


my $rd = LLMLimit::Redis->new;

my $t = LLMLimit::Test->new(
    name   => 'metrics redis',
    http   => qq{
        llmlimit_zone  r 1m redis=} . $rd->addr . qq{ redis_timeout=$TMO
                       redis_failure=local;
        llmlimit_rules r zone=r {
            "R"  GET  /r  \$http_x_api_key  3/1h;
        }
    },
    config => q{
        add_header X-Status $llmlimit_status always;
        location /r { llmlimit r; proxy_pass http://%%BACKEND%%; }
        location = /metrics { llmlimit_metrics; }
    },
)->start;

my $c = $t->conn;
my $Z = 'zone="r"';

# Redis answers

my %m = scrape_until($t, sub { $_[0]{"llmlimit_redis_up{$Z}"} });
is($m{"llmlimit_redis_up{$Z}"}, 1, 'up 1');

is(statuses($c, 5), 'PASSED PASSED PASSED PASSED PASSED', 'Redis answers');

%m = scrape($t);
is($m{"llmlimit_redis_connections_total{$Z}"}, 1, 'one connection');
is($m{"llmlimit_redis_reconnects_total{$Z}"}, 0, 'no reconnect');
is($m{"llmlimit_redis_latency_seconds_count{$Z}"}, 5,
   'five round trips (one call each)');
is($m{"llmlimit_redis_latency_seconds_bucket{$Z,le=\"+Inf\"}"}, 5,
   '+Inf bucket = count');
ok($m{"llmlimit_redis_latency_seconds_sum{$Z}"} > 0
   && $m{"llmlimit_redis_latency_seconds_sum{$Z}"} < 5,
   'latency sum in seconds: ' . $m{"llmlimit_redis_latency_seconds_sum{$Z}"});

my @le = map { $m{"llmlimit_redis_latency_seconds_bucket{$Z,le=\"$_\"}"} }
         qw(0.00025 0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 1 +Inf);
is(scalar(grep { defined } @le), 12, 'twelve buckets');
ok(!grep({ $le[$_] < $le[$_ - 1] } 1 .. $#le), 'cumulative buckets');

is($m{"llmlimit_redis_timeouts_total{$Z}"}, 0, 'no timeout');
is($m{"llmlimit_redis_fallbacks_total{$Z,policy=\"local\"}"}, 0,
   'no fallback');
is($m{"llmlimit_requests_total{table=\"r\",category=\"R\",status=\"passed\"}"},
   5, 'requests counted');

# Redis sleeps beyond redis_timeout: timeouts, decided locally

my $blocker = $rd->send_only('DEBUG', 'SLEEP', 1.5 * $SLOW);
sleep 0.1;

is(statuses($c, 2), 'PASSED PASSED', 'Redis sleeping: decided locally');

$blocker->blocking(1);
LLMLimit::Redis::read_reply($blocker);
close $blocker;

%m = scrape_until($t, sub {
    $_[0]{"llmlimit_redis_latency_seconds_count{$Z}"} >= 7 });
is($m{"llmlimit_redis_timeouts_total{$Z}"}, 2, 'two timeouts');
is($m{"llmlimit_redis_fallbacks_total{$Z,policy=\"local\"}"}, 2,
   'two fallbacks');
is($m{"llmlimit_redis_latency_seconds_count{$Z}"}, 7,
   'the late replies are round trips too');
ok($m{"llmlimit_redis_latency_seconds_bucket{$Z,le=\"0.25\"}"} <= 5,
   'the two late ones above redis_timeout, above 0.25 s');
is($m{"llmlimit_redis_up{$Z}"}, 1, 'a slow Redis is still up');

# Redis stopped

$rd->stop;

%m = scrape_until($t, sub { defined $_[0]{"llmlimit_redis_up{$Z}"}
                            && $_[0]{"llmlimit_redis_up{$Z}"} == 0 });
is($m{"llmlimit_redis_up{$Z}"}, 0, 'stopped: up 0');

is(statuses($c, 3), 'PASSED PASSED PASSED', 'stopped: decided locally');

%m = scrape_until($t, sub {
    $_[0]{"llmlimit_redis_errors_total{$Z,kind=\"connect\"}"} });
is($m{"llmlimit_redis_errors_total{$Z,kind=\"closed\"}"}, 1,
   'the connection lost: one "closed" error');
ok($m{"llmlimit_redis_errors_total{$Z,kind=\"connect\"}"} >= 1,
   'reconnects refused: "connect" errors ('
   . $m{"llmlimit_redis_errors_total{$Z,kind=\"connect\"}"} . ')');
is($m{"llmlimit_redis_fallbacks_total{$Z,policy=\"local\"}"}, 5,
   'three more fallbacks');
is($m{"llmlimit_redis_errors_total{$Z,kind=\"protocol\"}"}, 0, 'no protocol error');
is($m{"llmlimit_redis_errors_total{$Z,kind=\"script\"}"}, 0, 'no script error');

# restarted

$rd->start;

%m = scrape_until($t, sub { $_[0]{"llmlimit_redis_up{$Z}"} });
is($m{"llmlimit_redis_up{$Z}"}, 1, 'restarted: up 1');
is($m{"llmlimit_redis_reconnects_total{$Z}"}, 1, 'one reconnect');
is($m{"llmlimit_redis_connections_total{$Z}"}, 2, 'two connections');

is(statuses($c, 1), 'PASSED', 'Redis answers again');

SKIP: {
    my $promtool = which('promtool');
    skip 'promtool not installed (Debian package prometheus; make test '
         . 'installs it)', 1 unless $promtool;

    my $text = $t->req('GET /metrics')->body;
    my ($rc, $out) = promtool_check($promtool, $text);
    is($rc, 0, 'promtool check metrics: no problem') or diag($out . $text);
}

$t->stop;
$rd->stop;


# ---------------------------------------------------------------------------
# a server that answers an error, then a reply of the wrong shape, then
# good replies

{
    # { Redis' time, status 0 (counted), remaining, reset }
    my $good = "*4\r\n:1795426400000\r\n:0\r\n:2\r\n:1000\r\n";
    my $fake = LLMLimit::Redis::Fake->new(sub {
        my ($a) = @_;
        my $cmd = uc $a->[0];

        return "\$40\r\n" . sha1_hex($a->[2]) . "\r\n" if $cmd eq 'SCRIPT';

        if ($cmd eq 'EVALSHA') {
            our $nev;
            my $n = $nev++ // 0;
            return "-ERR boom\r\n" if $n == 0;
            return "+OK\r\n" if $n == 1;
            return $good;
        }

        return "-ERR unknown command\r\n";
    });

    my $t = LLMLimit::Test->new(
        name   => 'metrics redis errors',
        http   => qq{
            llmlimit_zone  f 1m redis=} . $fake->addr . qq{
                           redis_timeout=$TMO redis_failure=open;
            llmlimit_rules f zone=f {
                "F"  GET  /r  \$http_x_api_key  3/1h;
            }
        },
        config => q{
            add_header X-Status $llmlimit_status always;
            location /r { llmlimit f; proxy_pass http://%%BACKEND%%; }
            location = /metrics { llmlimit_metrics; }
        },
    )->start;

    my $c = $t->conn;
    is(statuses($c, 3), 'ERROR ERROR PASSED',
       'an error reply, a wrong reply, a good one');

    my %m = scrape($t);
    my $Z = 'zone="f"';
    is($m{"llmlimit_redis_errors_total{$Z,kind=\"script\"}"}, 1,
       'the error reply: one "script" error');
    is($m{"llmlimit_redis_errors_total{$Z,kind=\"protocol\"}"}, 1,
       'the wrong reply: one "protocol" error');
    is($m{"llmlimit_redis_fallbacks_total{$Z,policy=\"open\"}"}, 2,
       'two requests decided by redis_failure=open');
    is($m{"llmlimit_redis_latency_seconds_count{$Z}"}, 3, 'three round trips');
    is($m{"llmlimit_requests_total{table=\"f\",category=\"F\",status=\"error\"}"},
       2, 'two requests with status ERROR');

    $t->stop;
    $fake->stop;
}

finish();
