# Token budgets in Redis: two nginx instances on one Redis share one token
# budget exactly; what a request used is charged by an entry of the
# batched script call (the estimate counted on admission, the rest up or
# down when the request ends); an overdrawn budget waits as in shared
# memory.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(sleep time);
use LLMLimit::Test;

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $SLOW = slow();
my $rd = LLMLimit::Redis->new;
my $ADDR = $rd->addr;

my $HTTP = qq{
    llmlimit_zone  tk 1m redis=$ADDR redis_prefix=tk: redis_timeout=2s;
    llmlimit_rules llm zone=tk algorithm=ALGO {
        "Short" POST  /short  \$http_x_api_key  40tokens/2s;
        "Chat"  POST  *  \$http_x_api_key  1000/30d,500tokens/30d;
    }
};

my $SERVERS = q{
    server {
        listen 127.0.0.1:%%PORT2%%;
        default_type application/json;
        location / { return 200 '{"usage":{"prompt_tokens":60,"completion_tokens":40,"total_tokens":100}}'; }
    }
};

my $CONFIG = q{
    llmlimit llm;
    llmlimit_headers openai;
    llmlimit_tokens_estimate $http_x_estimate;
    location / { proxy_pass http://127.0.0.1:%%PORT2%%/; }
};


# the token count of a budget's current window in Redis (sliding, fixed:
# PREFIX{HASH}:PERIODt:sWINDOW or :fWINDOW, an integer; the highest WINDOW
# is the current one); waits until it is WANT
sub token_state {
    my ($want) = @_;
    my $end = time + 5 * $SLOW;

    while (time < $end) {
        my ($k) = sort { ($b =~ /(\d+)$/)[0] <=> ($a =~ /(\d+)$/)[0] }
                  grep { /t:[fs]\d+$/ } $rd->keys;
        my $v = defined $k ? $rd->cmd('GET', $k) : undef;
        return $v if defined $want && defined $v && $v == $want;
        sleep 0.05;
    }

    return undef;
}


for my $algo (qw(sliding fixed)) {
    (my $http = $HTTP) =~ s/ALGO/$algo/;

    $rd->cmd('FLUSHALL');

    my @t = map {
        LLMLimit::Test->new(name => "instance $_ $algo", http => $http,
                            servers => $SERVERS, config => $CONFIG,
                            nports => 1)->start
    } 1 .. 2;

    my $key = uid();

    for my $i (0 .. 4) {
        my $t = $t[$i % 2];
        my $r = $t->req('POST /v1/chat/completions',
                        headers => { 'X-Api-Key' => $key });
        is($r->status, 200, "$algo: request $i through instance "
                            . ($i % 2 + 1));
        is($r->header('x-ratelimit-remaining-tokens'), 500 - 100 * $i,
           "$algo: request $i sees every charge of both instances");
        is(token_state(100 * ($i + 1)), 100 * ($i + 1),
           "$algo: Redis holds " . 100 * ($i + 1));
    }

    for my $i (0 .. 1) {
        my $r = $t[$i]->req('POST /v1/chat/completions',
                            headers => { 'X-Api-Key' => $key });
        is($r->status, 429, "$algo: instance " . ($i + 1)
                            . ': the shared budget is spent');
        is($r->header('x-ratelimit-remaining-tokens'), 0,
           "$algo: remaining-tokens 0");
        is($r->header('x-ratelimit-remaining-requests'), 995,
           "$algo: five requests counted");
    }

    # the estimate: counted on admission, the rest taken back at the end
    $rd->cmd('FLUSHALL');
    $key = uid();

    my $r = $t[0]->req('POST /v1/chat/completions',
                       headers => { 'X-Api-Key' => $key,
                                    'X-Estimate' => 300 });
    is($r->header('x-ratelimit-remaining-tokens'), 200,
       "$algo: an estimate of 300 counted on admission");
    is(token_state(100), 100, "$algo: 200 of it taken back at the end");

    $r = $t[1]->req('POST /v1/chat/completions',
                    headers => { 'X-Api-Key' => $key, 'X-Estimate' => 50 });
    is($r->header('x-ratelimit-remaining-tokens'), 350,
       "$algo: the other instance sees it");
    is(token_state(200), 200, "$algo: 50 more charged at the end");

    $_->stop for @t;
}


# overdrawn in Redis: Retry-After, honoured, gets the next request through

for my $algo (qw(sliding fixed gcra)) {
    (my $http = $HTTP) =~ s/ALGO/$algo/;
    $rd->cmd('FLUSHALL');

    my $t = LLMLimit::Test->new(name => "short $algo", http => $http,
                                servers => $SERVERS, config => $CONFIG,
                                nports => 1)->start;
    my $key = uid();

    wait_window(2, start => 1) unless $algo eq 'gcra';

    my $r = $t->req('POST /short', headers => { 'X-Api-Key' => $key });
    is($r->status, 200, "$algo: 100 tokens on a budget of 40: passes");
    sleep 0.3 * $SLOW;

    $r = $t->req('POST /short', headers => { 'X-Api-Key' => $key });
    is($r->status, 429, "$algo: overdrawn: 429");
    my $retry = $r->header('Retry-After');
    like($retry, qr/^[1-4]$/, "$algo: Retry-After within two periods");

    sleep $retry;
    $r = $t->req('POST /short', headers => { 'X-Api-Key' => $key });
    is($r->status, 200, "$algo: after Retry-After, it passes");

    $t->stop;
}

$rd->stop;

finish();
