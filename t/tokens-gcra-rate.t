# GCRA refills a token budget at exactly COUNT/PERIOD, however fast: the
# emission interval PERIOD/COUNT is not rounded (it used to be, up to a
# whole microsecond: 40000000tokens/60s, 666 667 tokens a second, refilled
# at 500 000).  The whole budget is used at once, and what is back some
# seconds later is measured against the time that passed, in shared
# memory and in Redis: between COUNT/PERIOD times the seconds before the
# charge and after the check, with a margin of a ms of refill.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(sleep time);
use LLMLimit::Test;

require "$FindBin::Bin/redis-lib.pl";

my $rd = LLMLimit::Redis::available() ? LLMLimit::Redis->new : undef;

# budgets whose emission interval is not a whole number of microseconds
my @budgets = ([ 40000000, 60 ], [ 3000000, 10 ], [ 7, 3 ]);
my @zones = ('z', $rd ? 'rz' : ());
my ($http, $config) = ('', '');

for my $z (@zones) {
    for my $b (0 .. $#budgets) {
        my ($count, $period) = @{ $budgets[$b] };
        $http .= qq{
            llmlimit_rules $z$b zone=$z algorithm=gcra {
                "Chat"  POST  *  \$http_x_api_key  ${count}tokens/${period}s;
            }
        };
        $config .= qq{
            location /$z$b/ {
                llmlimit $z$b;
                proxy_pass http://127.0.0.1:%%PORT2%%;
            }
        };
    }
}

$http .= 'llmlimit_zone rz 1m redis=' . $rd->addr . ' redis_timeout=2s;'
    if $rd;

my $t = LLMLimit::Test->new(
    name => 'gcra token rate',
    http => q{
        log_format tok '$uri $llmlimit_tokens $status';
        llmlimit_zone  z 1m;
    } . $http,
    servers => q{
        server {
            listen 127.0.0.1:%%PORT2%%;
            location / { return 200 'ok'; }
        }
    },
    config => q{
        access_log logs/tok.log tok;
        llmlimit_headers openai;
        llmlimit_tokens $arg_t;
    } . $config,
    nports => 1)->start;

for my $z (@zones) {
    for my $b (0 .. $#budgets) {
        my ($count, $period) = @{ $budgets[$b] };
        my $key = uid();
        my $lines = () = $t->wait_lines('tok.log', 0, 0);

        my $t0 = time;
        my $r = $t->req("POST /$z$b/x?t=$count",
                        headers => { 'X-Api-Key' => $key });
        is($r->status, 200, "$z $count/${period}s: the whole budget used");
        $t->wait_lines('tok.log', $lines + 1);
        my $t1 = time;

        # a tenth of the budget back, at least 2 s (a third of 7/3s: 1 s)
        sleep($period / 10 > 2 ? $period / 10 : 2);

        my $t2 = time;
        $r = $t->req("POST /$z$b/x?t=0", headers => { 'X-Api-Key' => $key });
        my $t3 = time;
        my $left = $r->header('x-ratelimit-remaining-tokens') // -1;
        my $rate = $count / $period;

        # refilled between the end of the charge and the check, at most
        # from the request before the charge to the answer of the check
        my ($lo, $hi) = (int($rate * ($t2 - $t1) - $rate / 1000 - 1),
                         int($rate * ($t3 - $t0) + $rate / 1000 + 1));
        $lo = 0 if $lo < 0;
        $lo = $count if $lo > $count;
        $hi = $count if $hi > $count;
        cmp_ok($left, '>=', $lo, "$z $count/${period}s: refilled at "
                                 . "COUNT/PERIOD, not slower ($left)");
        cmp_ok($left, '<=', $hi, "$z $count/${period}s: not faster");
    }
}

$t->stop;
$rd->stop if $rd;
done_testing;
