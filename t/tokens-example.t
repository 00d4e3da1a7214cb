# conf.example's LLM gateway: RPM and TPM per plan in front of the demo LLM
# backend, OpenAI-compatible /v1/chat/completions (openai headers) and
# Anthropic's /v1/messages (anthropic headers), plain and streamed; the
# tokens the backend reports are charged.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;

my $t = LLMLimit::Test->new(conf => conf_example(), nports => 4)->start;
my $port = $t->{ports}[2] // die "no %%PORT4%%";

sub chat {
    my (%h) = @_;
    return $t->req('POST /v1/chat/completions', port => $port, headers => \%h);
}

sub messages {
    my (%h) = @_;
    return $t->req('POST /v1/messages', port => $port, headers => \%h);
}

my $key = 'Bearer ' . uid();
my $r = chat(Authorization => $key);
is($r->status, 200, 'chat completions: 200');
like($r->body, qr/"total_tokens":42/, 'the demo backend answers with usage');
is($r->header('x-ratelimit-limit-requests'), 20, 'hobby: 20 RPM');
is($r->header('x-ratelimit-limit-tokens'), 20000, 'hobby: 20000 TPM');
is($r->header('x-ratelimit-remaining-tokens'), 20000, 'nothing used yet');
$t->wait_log('access.log', qr/tokens=42/);

$r = chat(Authorization => $key, 'X-Demo-Stream' => 1);
is($r->header('x-ratelimit-remaining-tokens'), 20000 - 42,
   'the 42 tokens are charged');
like($r->header('Content-Type'), qr{text/event-stream}, 'a stream');
like($r->body, qr/data: \[DONE\]/, 'the stream comes whole');
$t->wait_log('access.log', qr/tokens=42.*\n.*tokens=42/);

$r = chat(Authorization => $key);
is($r->header('x-ratelimit-remaining-tokens'), 20000 - 84,
   'the stream\'s usage is charged too');

$r = chat(Authorization => 'Bearer sk-demo-pro');
is($r->header('x-ratelimit-limit-tokens'), 1000000, 'pro: 1000000 TPM');

$key = uid();
$r = messages('X-Api-Key' => $key, 'X-Demo-Stream' => 1);
is($r->status, 200, 'messages: 200');
is($r->header('anthropic-ratelimit-requests-limit'), 20, 'anthropic: RPM');
is($r->header('anthropic-ratelimit-tokens-limit'), 20000, 'anthropic: TPM');
like($r->header('anthropic-ratelimit-tokens-reset'),
     qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, 'an RFC 3339 reset');
$t->wait_log('access.log', qr/tokens=40/);

$r = messages('X-Api-Key' => $key);
is($r->header('anthropic-ratelimit-tokens-remaining'), 20000 - 40,
   'input 25 + output 15 of the stream charged');

$t->stop;

finish();
