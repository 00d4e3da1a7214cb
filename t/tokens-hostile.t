# Hostile upstream bodies under llmlimit_tokens auto: 10 MB of JSON, deep
# nesting, usage values that are negative, not integers, strings or beyond
# 2^31, truncated streams, an upstream that dies in the middle of a
# number.  Never a crash, never a negative or absurd charge (unusable
# values charge nothing and are logged), the response passed through as
# it came.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use LLMLimit::Test;

require "$FindBin::Bin/tokens-lib.pl";


my $BIG = '{"id":"x","content":"' . ('abcdefgh' x (10 * 1024 * 1024 / 8))
        . '","usage":{"total_tokens":5}}';
my $DEEP = '{"d":' . ('[' x 100000) . (']' x 100000)
         . ',"o":' . ('{"a":' x 50000) . '1' . ('}' x 50000)
         . ',"usage":{"total_tokens":6}}';
my $DEEP_USAGE = '{"a":{"b":{"c":{"usage":{"total_tokens":999}}}},'
               . '"usage":{"total_tokens":8}}';

sub pieces {
    my ($s, $n) = @_;
    return [ unpack("(a$n)*", $s) ];
}

my %routes = (
    '/big'       => { pieces => pieces($BIG, 65536), delay => 0 },
    '/deep'      => { pieces => pieces($DEEP, 4096), delay => 0 },
    '/nested'    => { pieces => [ $DEEP_USAGE ] },
    '/negative'  => { pieces => [ '{"usage":{"total_tokens":-5}}' ] },
    '/huge-exp'  => { pieces => [ '{"usage":{"total_tokens":1e309}}' ] },
    '/fraction'  => { pieces => [ '{"usage":{"input_tokens":1.5,"output_tokens":2}}' ] },
    '/string'    => { pieces => [ '{"usage":{"total_tokens":"12"}}' ] },
    '/2pow63'    => { pieces => [ '{"usage":{"total_tokens":9223372036854775808}}' ] },
    '/2pow31'    => { pieces => [ '{"usage":{"total_tokens":2147483648}}' ] },
    '/max'       => { pieces => [ '{"usage":{"input_tokens":2147483647,',
                                  '"output_tokens":2147483647}}' ] },
    '/truncated' => { type => 'text/event-stream', die => 1,
                      pieces => [ "event: message_start\n",
                                  'data: {"type":"message_start","message":'
                                  . '{"usage":{"input_tokens":25,'
                                  . '"output_tokens":1}}}' . "\n\n",
                                  'data: {"type":"content_block_delta","t' ] },
    '/mid-number' => { type => 'text/event-stream', die => 1,
                       pieces => [ 'data: {"usage":{"total_tokens":12' ] },
    '/garbage'   => { type => 'text/event-stream',
                      pieces => [ "data: {{{{]]]]\"\\\n\n", "data: \x00\xff\n",
                                  ":comment\n\ndata: {\"usage\":{\"total_tokens\":3}}\n\n" ] },
);

my $llm = LLMLimit::FakeLLM->new(%routes);
my $LLM = $llm->addr;

my $t = LLMLimit::Test->new(
    name => 'hostile bodies',
    http => q{
        log_format tok '$uri $llmlimit_tokens $status';
        llmlimit_zone  z 4m;
        llmlimit_rules llm zone=z {
            "Chat"  POST  *  $http_x_api_key  2000000000tokens/30d;
        }
    },
    config => qq{
        access_log logs/tok.log tok;
        llmlimit llm;
        llmlimit_headers openai;
        location /buf/ { proxy_pass http://$LLM/; }
        location /sse/ { proxy_buffering off; proxy_pass http://$LLM/; }
        location /small/ {
            proxy_buffer_size 1k;
            proxy_buffers 2 1k;
            proxy_busy_buffers_size 1k;
            proxy_max_temp_file_size 0;
            proxy_pass http://$LLM/;
        }
    },
)->start;


# reads the whole answer on its own connection, chunked or cut short
sub fetch {
    my ($uri, $key) = @_;

    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                  PeerPort => $t->port, Timeout => 30)
        or die "connect: $!";
    print $s "POST $uri HTTP/1.1\r\nHost: localhost\r\nX-Api-Key: $key\r\n"
           . "Content-Length: 0\r\nConnection: close\r\n\r\n";

    my $raw = '';
    while (1) {
        my $n = sysread($s, $raw, 1 << 20, length $raw);
        last unless $n;
    }
    close $s;

    my ($head, $body) = split /\r\n\r\n/, $raw, 2;
    $body //= '';
    my ($status) = $head =~ m{^HTTP/1\.1 (\d+)};

    if ($head =~ /^Transfer-Encoding: chunked/mi) {
        my $out = '';
        while ($body =~ s/^([0-9a-f]+)\r\n//i) {
            my $len = hex $1;
            last if $len == 0;
            $out .= substr($body, 0, $len, '');
            $body =~ s/^\r\n//;
        }
        $out .= $body if $body !~ /^0?\r?\n?$/;
        $body = $out;
    }

    return ($status, $body, $head);
}


my %charged;
my $n = 0;

sub run_case {
    my ($uri, $route, $expect, $name) = @_;
    my $key = uid();

    my ($status, $body) = fetch($uri, $key);
    $n++;
    my @l = $t->wait_lines('tok.log', $n, 30);
    my ($tokens) = ($l[$n - 1] // '') =~ /^\S+ (\S+)/;

    is($status, 200, "$name: 200");
    ok($body eq $llm->body($route),
       "$name: the body as the upstream sent it (" . length($body) . ' bytes)');
    is($tokens, $expect, "$name: charged $expect");

    # the budget tells the same (a window of 30 days: no weighted share
    # of a previous window while the test runs)
    my ($s2, undef, $head) = fetch('/buf/nested', $key);
    $n++;
    $t->wait_lines('tok.log', $n, 30);
    my ($left) = $head =~ /^x-ratelimit-remaining-tokens: (\d+)/mi;
    my $want = 2000000000 - $expect;
    is($left, $want < 0 ? 0 : $want, "$name: the budget holds $expect");
}

run_case('/buf/big', '/big', 5, '10 MB of JSON, proxy buffers');
run_case('/sse/big', '/big', 5, '10 MB of JSON, unbuffered');
run_case('/small/big', '/big', 5, '10 MB of JSON, 1k buffers');
run_case('/buf/deep', '/deep', 6, '100000 levels of nesting');
run_case('/buf/nested', '/nested', 8, 'a "usage" deeper than the top levels is not read');
run_case('/buf/negative', '/negative', 0, 'total_tokens: -5');
run_case('/buf/huge-exp', '/huge-exp', 0, 'total_tokens: 1e309');
run_case('/buf/fraction', '/fraction', 0, 'input_tokens: 1.5');
run_case('/buf/string', '/string', 0, 'total_tokens: "12"');
run_case('/buf/2pow63', '/2pow63', 0, 'total_tokens: 2^63');
run_case('/buf/2pow31', '/2pow31', 0, 'total_tokens: 2^31');
run_case('/buf/max', '/max', 2147483647, 'input + output at the cap');
run_case('/sse/truncated', '/truncated', 26,
         'a stream cut short: what it reported so far');
run_case('/sse/mid-number', '/mid-number', 0,
         'an upstream dying in the middle of a number');
run_case('/sse/garbage', '/garbage', 3, 'garbage events, then usage');

my $log = $t->error_log;
like($log, qr/\[warn\].*token usage not read from the response: a usage field is not a non-negative integer, charged the estimate 0/,
     'unusable values are logged');
like($log, qr/\[warn\].*a usage field is above 2147483647/,
     'values beyond the cap are logged');
like($log, qr/upstream prematurely closed/, 'the dying upstream is seen');

$t->stop;
$llm->stop;

finish();
