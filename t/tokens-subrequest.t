# With log_subrequest on, a subrequest's log phase (here a mirror) must not
# charge the main request's token budget: the charge is made once, when the
# main request ends, from its own response.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;

my $t = LLMLimit::Test->new(
    name => 'subrequest charge',
    http => q{
        log_format tok '$uri $llmlimit_tokens $status';
        llmlimit_zone  z 1m;
        llmlimit_rules llm zone=z {
            "Chat"  POST  *  $http_x_api_key  1000/30d,10000tokens/30d;
        }
    },
    servers => q{
        server {
            listen 127.0.0.1:%%PORT2%%;
            default_type application/json;
            location / { return 200 '{"usage":{"total_tokens":50}}'; }
        }
    },
    config => q{
        access_log logs/tok.log tok;
        llmlimit llm;
        llmlimit_headers openai;
        location /plain/ { proxy_pass http://127.0.0.1:%%PORT2%%/; }
        location /m/ {
            mirror /mirror;
            proxy_pass http://127.0.0.1:%%PORT2%%/;
        }
        location = /mirror { internal; log_subrequest on; return 204; }
    },
    nports => 1)->start;

my $key = uid();

# control: without a subrequest, 50 tokens are charged
my $r = $t->req('POST /plain/x', headers => { 'X-Api-Key' => $key });
is($r->status, 200, 'control passes');
$t->wait_lines('tok.log', 1);
$r = $t->req('POST /plain/x', headers => { 'X-Api-Key' => $key });
is($r->header('x-ratelimit-remaining-tokens'), 9950, 'control: 50 charged');
$t->wait_lines('tok.log', 2);

# with a mirror and log_subrequest on
$r = $t->req('POST /m/x', headers => { 'X-Api-Key' => $key });
is($r->status, 200, 'mirrored passes');
$t->wait_lines('tok.log', 4);  # the mirror's line and its own
$r = $t->req('POST /plain/x', headers => { 'X-Api-Key' => $key });
is($r->header('x-ratelimit-remaining-tokens'), 9850,
   'mirrored request: its 50 tokens charged too');
my @l = $t->wait_lines('tok.log', 6);


$t->stop;
done_testing;
