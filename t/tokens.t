# Token budgets in shared memory: "COUNTtokens/PERIOD" limits charged what
# the upstream reports (llmlimit_tokens auto, OpenAI and Anthropic, plain
# JSON and server-sent events, numbers split across chunks) or a variable
# says (llmlimit_tokens $VALUE); the estimate counted on admission; an
# exhausted budget answers 429 with a Retry-After that, honoured, lets the
# next request through; request and token limits in one rule; the openai
# and anthropic header formats; $llmlimit_tokens.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(sleep time);
use LLMLimit::Test;

require "$FindBin::Bin/tokens-lib.pl";


my $OPENAI_JSON = '{"id":"chatcmpl-1","object":"chat.completion","choices":'
    . '[{"index":0,"message":{"role":"assistant","content":"usage: {\"total_tokens\": 999}"},'
    . '"finish_reason":"stop"}],"usage":{"prompt_tokens":19,'
    . '"completion_tokens":10,"total_tokens":29,'
    . '"prompt_tokens_details":{"cached_tokens":0}}}';

# OpenAI's stream with stream_options.include_usage: "usage":null in every
# chunk, the usage in the last one; total_tokens split across two chunks
my @OPENAI_SSE = (
    'data: {"id":"c","choices":[{"delta":{"content":"Hel"}}],"usage":null}' . "\n\n",
    'data: {"id":"c","choices":[{"delta":{"content":"lo"}}],"usage":null}' . "\n\n",
    'data: {"id":"c","choices":[],"usage":{"prompt_tokens":21,"completion_tokens":3,"total_tokens":2',
    '4}}' . "\n\n",
    "data: [DONE]\n\n",
);

# Anthropic's stream: input_tokens in message_start, the final
# output_tokens in message_delta; a key and a number split; CRLF lines
my @ANTHROPIC_SSE = (
    "event: message_start\r\n" . 'data: {"type":"message_start","message":{"id":"msg_1","model":"claude","usage":{"input_t',
    'okens":2',
    '5,"output_tokens":1}}}' . "\r\n\r\n",
    "event: content_block_delta\r\n" . 'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\"usage\":{\"output_tokens\":7777}"}}' . "\r\n\r\n",
    "event: message_delta\r\n" . 'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1',
    '5}}' . "\r\n\r\n",
    "event: message_stop\r\n" . 'data: {"type":"message_stop"}' . "\r\n\r\n",
);

my $ANTHROPIC_JSON = '{"id":"msg_2","type":"message","content":[{"type":"text",'
    . '"text":"hi"}],"usage":{"input_tokens":7,"output_tokens":5}}';

my $llm = LLMLimit::FakeLLM->new(
    '/openai-sse'    => { type => 'text/event-stream', pieces => \@OPENAI_SSE },
    '/anthropic-sse' => { type => 'text/event-stream',
                          pieces => \@ANTHROPIC_SSE },
    '/openai-json'   => { pieces => [ substr($OPENAI_JSON, 0, 200),
                                      substr($OPENAI_JSON, 200) ] },
    '/slow'          => { pieces => [ '{"usage":{"total_tokens":', '250}}' ],
                          delay => 0.5 },
);

my $LLM = $llm->addr;


# the access log line of request N (1-based): "tokens STATUS"
sub logged {
    my ($t, $n) = @_;
    my @l = $t->wait_lines('tok.log', $n);
    return $l[$n - 1] // '';
}


# budgets of 30 days: no share of a previous window while a test runs
my $HTTP = q{
    log_format tok '$llmlimit_tokens $status';
    llmlimit_zone  z 1m;
    llmlimit_rules llm zone=z {
        "Chat"  POST  *  $http_x_api_key  1000/30d,10000tokens/30d;
    }
};

my $SERVERS = q{
    server {
        listen 127.0.0.1:%%PORT2%%;
        default_type application/json;
        location /openai { return 200 '%%OPENAI%%'; }
        location /anthropic { return 200 '%%ANTHROPIC%%'; }
        location /header {
            add_header X-Usage-Tokens $arg_t;
            return 200 '{"no":"usage here"}';
        }
        location /gzip {
            add_header Content-Encoding gzip;
            return 200 '{"usage":{"total_tokens":50}}';
        }
        location /nothing { return 200 'plain text'; }
    }
};

(my $servers = $SERVERS) =~ s/%%OPENAI%%/$OPENAI_JSON/;
$servers =~ s/%%ANTHROPIC%%/$ANTHROPIC_JSON/;
$servers =~ s/\\"/\\\\"/g;

my $CONFIG = qq{
    access_log logs/tok.log tok;
    llmlimit llm;
    llmlimit_headers openai anthropic;
    location /v1/ { proxy_pass http://127.0.0.1:%%PORT2%%/; }
    location /sse/ {
        proxy_buffering off;
        proxy_pass http://$LLM/;
    }
    location /buf/ { proxy_pass http://$LLM/; }
    location /var/ {
        llmlimit_tokens \$upstream_http_x_usage_tokens;
        proxy_pass http://127.0.0.1:%%PORT2%%/;
    }
};


# ---------------------------------------------------------------------------
# what is charged, per format; the body arrives byte for byte

{
    my $t = LLMLimit::Test->new(name => 'formats', http => $HTTP,
                                servers => $servers, config => $CONFIG,
                                nports => 1)->start;
    my $key = uid();
    my $left = 10000;
    my $n = 0;

    my @cases = (
        [ '/v1/openai',        29, $OPENAI_JSON,        'OpenAI JSON' ],
        [ '/v1/anthropic',     12, $ANTHROPIC_JSON,     'Anthropic JSON' ],
        [ '/sse/openai-sse',   24, join('', @OPENAI_SSE),
          'OpenAI stream, total_tokens split across chunks' ],
        [ '/sse/anthropic-sse', 40, join('', @ANTHROPIC_SSE),
          'Anthropic stream: message_start + message_delta, split' ],
        [ '/buf/anthropic-sse', 40, join('', @ANTHROPIC_SSE),
          'Anthropic stream through proxy buffers' ],
        [ '/buf/openai-json',  29, $OPENAI_JSON,
          'OpenAI JSON in two chunks' ],
        [ '/var/header?t=77',  77, '{"no":"usage here"}',
          'llmlimit_tokens $upstream_http_x_usage_tokens' ],
    );

    for my $case (@cases) {
        my ($uri, $tokens, $body, $name) = @$case;

        my $r = $t->req("POST $uri", headers => { 'X-Api-Key' => $key });
        $n++;

        is($r->status, 200, "$name: 200");
        is($r->body, $body, "$name: the body byte for byte");
        is($r->header('x-ratelimit-remaining-tokens'), $left,
           "$name: the budget before it");
        is(logged($t, $n), "$tokens 200", "$name: $tokens tokens charged");

        $left -= $tokens;
    }

    my $r = $t->req('POST /v1/openai', headers => { 'X-Api-Key' => $key });
    is($r->header('x-ratelimit-remaining-tokens'), $left,
       'the budget holds every charge');
    is($r->header('x-ratelimit-limit-tokens'), 10000, 'limit-tokens');
    is($r->header('x-ratelimit-limit-requests'), 1000, 'limit-requests');
    is($r->header('x-ratelimit-remaining-requests'), 1000 - @cases - 1,
       'remaining-requests');
    ok(defined openai_duration($r->header('x-ratelimit-reset-requests')),
       'reset-requests is a duration: '
       . $r->header('x-ratelimit-reset-requests'));
    is($r->header('anthropic-ratelimit-tokens-remaining'), $left,
       'anthropic-ratelimit-tokens-remaining');
    like($r->header('anthropic-ratelimit-requests-reset'),
         qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, 'an RFC 3339 reset');
    is($r->header('X-RateLimit-Limit'), undef, 'no x format asked for');

    $t->stop;
}


# ---------------------------------------------------------------------------
# what cannot be read: nothing charged, a line at info; compressed bodies
# are not read

{
    my $t = LLMLimit::Test->new(name => 'unread', http => $HTTP,
                                servers => $servers, config => $CONFIG,
                                nports => 1)->start;
    my $key = uid();

    my $r = $t->req('POST /v1/nothing', headers => { 'X-Api-Key' => $key });
    is($r->body, 'plain text', 'no usage: the body as it came');
    is(logged($t, 1), '0 200', 'no usage: nothing charged');

    $r = $t->req('POST /v1/gzip', headers => { 'X-Api-Key' => $key });
    is($r->status, 200, 'gzip: passed');
    is(logged($t, 2), '0 200', 'gzip: nothing charged');

    $r = $t->req('POST /var/header?t=-5', headers => { 'X-Api-Key' => $key });
    is(logged($t, 3), '0 200', 'a variable that is not a count: nothing');

    $r = $t->req('POST /v1/openai', headers => { 'X-Api-Key' => $key });
    is($r->header('x-ratelimit-remaining-tokens'), 10000, 'the budget is whole');

    like($t->error_log, qr/\[info\].*token usage not read from the response: no usage found/,
         'logged: no usage found');
    like($t->error_log, qr/\[info\].*token usage not read from a body with Content-Encoding "gzip"/,
         'logged: gzip');

    $t->stop;
}


# ---------------------------------------------------------------------------
# the budget exhausted: 429 with remaining-tokens 0 and a Retry-After that,
# honoured, lets the next request through; OpenAI's reset duration parsed
# as an SDK does tells the same wait

# "1m2.5s", "250ms", "6m0s" -> seconds
sub openai_duration {
    my ($s) = @_;
    my $sec = 0;
    return undef unless defined $s && length $s;
    while ($s =~ s/^(\d+(?:\.\d+)?)(h|ms|m|s)//) {
        $sec += $1 * { h => 3600, m => 60, s => 1, ms => 0.001 }->{$2};
    }
    return length $s ? undef : $sec;
}

is(openai_duration('6m0s'), 360, 'the duration parser: 6m0s');
is(openai_duration('1h2m3s'), 3723, 'the duration parser: 1h2m3s');
is(openai_duration('1.5s'), 1.5, 'the duration parser: 1.5s');
is(openai_duration('250ms'), 0.25, 'the duration parser: 250ms');

for my $algo (qw(sliding fixed gcra)) {
    my $t = LLMLimit::Test->new(
        name => "exhausted $algo",
        http => qq{
            log_format tok '\$llmlimit_tokens \$status';
            llmlimit_zone  z 1m;
            llmlimit_rules llm zone=z algorithm=$algo {
                "Chat"  POST  *  \$http_x_api_key  100/60s,40tokens/2s;
            }
        },
        servers => $servers, config => $CONFIG, nports => 1)->start;
    my $key = uid();

    # a window to ourselves: the 29 + 29 tokens of two requests overdraw 40
    wait_window(2, start => 1) unless $algo eq 'gcra';

    my $r = $t->req('POST /v1/openai', headers => { 'X-Api-Key' => $key });
    is($r->status, 200, "$algo: the first passes");
    logged($t, 1);
    $r = $t->req('POST /v1/openai', headers => { 'X-Api-Key' => $key });
    is($r->status, 200, "$algo: the second passes, 11 tokens left");
    logged($t, 2);

    $r = $t->req('POST /v1/openai', headers => { 'X-Api-Key' => $key });
    is($r->status, 429, "$algo: overdrawn: 429");
    is($r->header('x-ratelimit-remaining-tokens'), 0,
       "$algo: x-ratelimit-remaining-tokens: 0");
    is($r->header('x-ratelimit-remaining-requests'), 98,
       "$algo: the request limit not counted");
    my $retry = $r->header('Retry-After');
    like($retry, qr/^[1-9]\d*$/, "$algo: Retry-After");
    my $wait = openai_duration($r->header('x-ratelimit-reset-tokens'));
    ok(defined $wait && $wait > 0 && $wait <= $retry,
       "$algo: x-ratelimit-reset-tokens parsed: $wait s, within Retry-After")
        or diag($r->header('x-ratelimit-reset-tokens'));
    ok($retry <= 4, "$algo: the wait is within two periods ($retry s)");
    is($r->json->{error}{message}, 'Rate limit exceeded: 40 tokens per 2s',
       "$algo: the message names tokens");

    # the SDK's wait, honoured: the next one passes
    sleep($wait + 0.05);
    $r = $t->req('POST /v1/openai', headers => { 'X-Api-Key' => $key });
    is($r->status, 200, "$algo: after x-ratelimit-reset-tokens, it passes");

    $t->stop;
}


# ---------------------------------------------------------------------------
# request and token limits in one rule, per plan; the estimate

{
    my $t = LLMLimit::Test->new(
        name => 'both limits',
        http => q{
            log_format tok '$llmlimit_tokens $status';
            llmlimit_zone  z 1m;
            llmlimit_rules llm zone=z plan=$http_x_plan {
                "Chat"  POST  *  $http_x_api_key
                        hobby=3/30d,1000tokens/30d  pro=10/30d,70tokens/30d
                        unlimited;
            }
        },
        servers => $servers,
        config => q{
            access_log logs/tok.log tok;
            llmlimit llm;
            llmlimit_headers x openai;
            llmlimit_tokens_estimate $http_x_estimate;
            location /v1/ { proxy_pass http://127.0.0.1:%%PORT2%%/; }
        },
        nports => 1)->start;

    my $key = uid();
    my %h = ('X-Api-Key' => $key, 'X-Plan' => 'hobby');
    my @st = map { $t->req('POST /v1/openai', headers => \%h)->status } 1 .. 4;
    is("@st", '200 200 200 429', 'hobby: the request limit first');
    my $r = $t->req('POST /v1/openai', headers => \%h);
    is($r->header('x-ratelimit-remaining-requests'), 0, 'requests: 0 left');
    is($r->header('x-ratelimit-remaining-tokens'), 1000 - 3 * 29,
       'tokens: what three used');

    $key = uid();
    %h = ('X-Api-Key' => $key, 'X-Plan' => 'pro');
    @st = ();
    for (1 .. 4) {
        push @st, $t->req('POST /v1/openai', headers => \%h)->status;
        logged($t, 5 + @st);
    }
    is("@st", '200 200 200 429', 'pro: the token budget first (29 x 3 > 70)');

    # the estimate: reserved on admission, the rest charged at the end
    $key = uid();
    %h = ('X-Api-Key' => $key, 'X-Plan' => 'hobby', 'X-Estimate' => 600);
    $r = $t->req('POST /v1/openai', headers => \%h);
    is($r->header('x-ratelimit-remaining-tokens'), 400,
       'the estimate is counted on admission');
    logged($t, 10);
    $h{'X-Estimate'} = 980;
    $r = $t->req('POST /v1/openai', headers => \%h);
    is($r->status, 429, 'then an estimate above what is left waits');
    $h{'X-Estimate'} = 900;
    $r = $t->req('POST /v1/openai', headers => \%h);
    is($r->status, 200, 'after the charge (29): 971 left, 900 fits');
    is($r->header('x-ratelimit-remaining-tokens'), 71, 'remaining 71');

    $h{'X-Plan'} = 'free';
    $r = $t->req('POST /v1/openai', headers => \%h);
    is($r->header('x-ratelimit-limit-tokens'), undef, 'unlimited: no fields');

    $t->stop;
}


# ---------------------------------------------------------------------------
# concurrent requests each reserve their estimate: of six at once with an
# estimate of 300 on a budget of 1000, three are admitted; they use 250
# each, and the budget ends at 1000 - 750

{
    my $t = LLMLimit::Test->new(
        name => 'concurrent estimates',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules llm zone=z {
                "Chat"  POST  *  $http_x_api_key  1000/30d,1000tokens/30d;
            }
        },
        config => qq{
            llmlimit llm;
            llmlimit_headers openai;
            llmlimit_tokens_estimate \$http_x_estimate;
            location / { proxy_pass http://$LLM/; }
        },
        workers => 2)->start;

    my $key = uid();
    my @st = sort map { $_->{status} // 'error' } parallel(6, sub {
        my $r = $t->req('POST /slow', headers => { 'X-Api-Key' => $key,
                                                   'X-Estimate' => 300 });
        return { status => $r->status };
    });
    is("@st", '200 200 200 429 429 429',
       'three admitted: their estimates reserve 900 of 1000');

    # their log phases ran as their responses went out: a margin
    sleep 1 * slow();
    my $r = $t->req('POST /slow', headers => { 'X-Api-Key' => $key,
                                               'X-Estimate' => 0 });
    is($r->header('x-ratelimit-remaining-tokens'), 250,
       'the three charged 250 each, the estimates given back');

    $t->stop;
}


# ---------------------------------------------------------------------------
# the formats combined, and no token fields without a token budget

{
    my $t = LLMLimit::Test->new(
        name => 'header formats',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules r zone=z {
                "Req"  GET  *  $binary_remote_addr  5/10m;
            }
        },
        config => q{
            llmlimit r;
            llmlimit_headers ietf openai anthropic;
            location / { proxy_pass http://backend; }
        })->start;

    my $r = $t->req('GET /');
    is($r->header('x-ratelimit-limit-requests'), 5, 'openai: limit');
    is($r->header('x-ratelimit-remaining-requests'), 4, 'openai: remaining');
    my $d = openai_duration($r->header('x-ratelimit-reset-requests'));
    ok(defined $d && $d <= 600, 'openai: reset as a duration within 10m: '
                                . $r->header('x-ratelimit-reset-requests'));
    is($r->header('anthropic-ratelimit-requests-limit'), 5, 'anthropic: limit');
    like($r->header('RateLimit-Policy'), qr/q=5/, 'ietf too');
    is($r->header('x-ratelimit-limit-tokens'), undef, 'no token budget: none');
    is($r->header('anthropic-ratelimit-tokens-limit'), undef,
       'no anthropic token fields');

    $t->stop;
}


# ---------------------------------------------------------------------------
# configuration errors

for my $case (
    [ 'llmlimit_tokens nonsense;', qr/invalid value "nonsense": expected "auto" or a value with variables/ ],
    [ 'llmlimit_tokens auto; llmlimit_tokens auto;', qr/"llmlimit_tokens" directive is duplicate/ ],
    [ 'llmlimit_headers openai off;', qr/invalid value "off"/ ],
    [ 'llmlimit_headers openai bogus;', qr/invalid value "bogus"/ ],
) {
    my ($line, $re) = @$case;
    my $res = LLMLimit::Test::nginx_t(name => 'conf', http => $HTTP,
                                      config => "location / { $line }");
    isnt($res->{rc}, 0, "nginx -t fails: $line");
    like($res->{out}, $re, "names the reason: $line");
}


$llm->stop;

finish();
