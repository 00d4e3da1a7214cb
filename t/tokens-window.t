# A token charge that ends in a later window than the estimate it replaces
# (sliding and fixed): the estimate is taken back from the window it went
# into (sliding: "prev" once the counter has moved on by one window) and
# what the request used is charged to the current window.  10000tokens/10s,
# an estimate of 8000 admitted 9 s into a window, a stream that ends 1.6 s
# later having used 250, and a request in between that moves the counter
# to the next window: that window has 9750 left, for both algorithms, in
# shared memory and in Redis.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(sleep time);
use LLMLimit::Test;

require "$FindBin::Bin/tokens-lib.pl";
require "$FindBin::Bin/redis-lib.pl";

my $rd = LLMLimit::Redis::available() ? LLMLimit::Redis->new : undef;
my @algos = qw(sliding fixed);
my ($http, $config) = ('', '');

for my $a (@algos, $rd ? map { "r$_" } @algos : ()) {
    my $zone = $a =~ /^r/ ? 'rz' : 'z';
    (my $algo = $a) =~ s/^r//;
    $http .= qq{
        llmlimit_rules $a zone=$zone algorithm=$algo {
            "Chat"  POST  *  \$http_x_api_key  10000tokens/10s;
        }
    };
    $config .= qq{
        location /$a/ { llmlimit $a; proxy_pass http://LLM/; }

        # not from the fake upstream, busy with the slow stream
        location = /$a/fast {
            llmlimit $a;
            proxy_pass http://127.0.0.1:%%PORT2%%;
        }
    };
}

$http .= 'llmlimit_zone rz 1m redis=' . $rd->addr . ' redis_timeout=2s;'
    if $rd;
push @algos, map { "r$_" } @algos if $rd;

my $llm = LLMLimit::FakeLLM->new(
    '/slow' => { pieces => [ '{"usage":{"total_tokens":', '250}}' ],
                 delay => 0.8 },
);
my $LLM = $llm->addr;

my $t = LLMLimit::Test->new(
    name => 'token charge in a later window',
    http => q{
        log_format tok '$uri $llmlimit_tokens $status';
        llmlimit_zone  z 1m;
    } . $http,
    servers => q{
        server {
            listen 127.0.0.1:%%PORT2%%;
            location / { return 200 '{}'; }
        }
    },
    config => qq{
        access_log logs/tok.log tok;
        llmlimit_headers openai;
        llmlimit_tokens_estimate \$http_x_estimate;
    } . ($config =~ s/LLM/$LLM/gr),
    nports => 1)->start;

my %key = map { $_ => uid() } @algos;

# admitted 9 s into a 10 s window, answered 1.6 s later, in the next one;
# meanwhile another request (no estimate) moves the counter to that window
my $w = wait_window(10, start => 1);
sleep($w + 9 - time);

my @res = LLMLimit::Test::parallel(2 * @algos, sub {
    my ($i) = @_;
    my $a = $algos[$i % @algos];
    if ($i < @algos) {
        my $r = $t->req("POST /$a/slow",
                        headers => { 'X-Api-Key' => $key{$a},
                                     'X-Estimate' => 8000 });
        return { status => $r->status,
                 left => $r->header('x-ratelimit-remaining-tokens') };
    }
    sleep($w + 10.2 - time);
    my $r = $t->req("POST /$a/fast", headers => { 'X-Api-Key' => $key{$a},
                                                 'X-Estimate' => 0 });
    return { status => $r->status, at => time };
});
my $log = join "\n", $t->wait_lines('tok.log', 2 * @algos), '';


for my $i (0 .. $#algos) {
    my $a = $algos[$i];
    is($res[$i]{status}, 200, "$a: admitted with an estimate of 8000");
    is($res[$i]{left}, 2000, "$a: the estimate counted");
    is($res[$i + @algos]{status}, 200, "$a: another one, in the next window");
    like($log, qr{^/$a/slow 250 200$}m, "$a: the usage charged");

    my $r = $t->req("POST /$a/fast", headers => { 'X-Api-Key' => $key{$a},
                                                 'X-Estimate' => 0 });
    my $at = time;

    SKIP: {
        skip "$a: the counter did not move before the charge, in time", 1
            unless $res[$i + @algos]{at} >= $w + 10 && $at < $w + 20
                   && $log =~ m{^/$a/fast \S+ .*^/$a/slow }ms;

        is($r->header('x-ratelimit-remaining-tokens'), 9750,
           "$a: the next window is charged the usage, not the estimate");
    }
}

$t->stop;
$llm->stop;
$rd->stop if $rd;
done_testing;
