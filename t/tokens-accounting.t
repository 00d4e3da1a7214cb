# The tokens charged to a request reach usage accounting's Tokens column
# (JSON and CSV) and the metrics' llmlimit_tokens_total, from the same
# charge as $llmlimit_tokens: the usage the upstream reports (auto), or the
# estimate where it reports none.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use POSIX qw(strftime);
use LLMLimit::Test;

my $t = LLMLimit::Test->new(
    name => 'tokens in usage and metrics',
    http => q{
        log_format tok '$uri $llmlimit_tokens';
        llmlimit_zone        z 1m;
        llmlimit_usage_zone  u 1m;
        llmlimit_rules llm zone=z {
            "Chat"  POST  *  $http_x_api_key  1000/30d,100000tokens/30d;
        }
    },
    servers => q{
        server {
            listen 127.0.0.1:%%PORT2%%;
            default_type application/json;
            location /used/ { return 200 '{"usage":{"total_tokens":50}}'; }
            location /none/ { return 200 '{"id":"no usage here"}'; }
        }
    },
    config => q{
        access_log logs/tok.log tok;
        llmlimit_tokens_estimate  $http_x_estimate;

        location /v1/ {
            llmlimit        llm;
            llmlimit_usage  u  workspace=$http_x_ws  api_key=$http_x_short;
            proxy_pass      http://127.0.0.1:%%PORT2%%/;
        }

        location /usage/  { llmlimit_usage_api  u; }
        location /metrics { llmlimit_metrics; }
    },
    nports => 1)->start;

my %h = ('X-Api-Key' => 'k-' . $$, 'X-Ws' => 'ws-1', 'X-Short' => 'sk-1');

# 3 x 50 reported, and 2 without usage, charged their estimate of 7
for (1 .. 3) {
    is($t->req('POST /v1/used/x', headers => \%h)->status, 200, 'passed');
}
for (1 .. 2) {
    is($t->req('POST /v1/none/x', headers => { %h, 'X-Estimate' => 7 })
       ->status, 200, 'passed, no usage reported');
}

my @l = $t->wait_lines('tok.log', 5);
is_deeply([ map { (split ' ')[1] } @l ], [ 50, 50, 50, 7, 7 ],
          '$llmlimit_tokens: what was charged');

sub iso { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

my $range = 'start_time=' . iso(time - 7200) . '&end_time='
            . iso(time + 7200);

my $j = decode_json($t->req("GET /usage/?$range&group_by=api_key")->body);
my ($row) = grep { $_->{api_key_short_key} eq 'sk-1' } @{ $j->{usage} };
ok($row, 'usage: a row for the key') or diag(explain($j));
is($row->{requests}, 5, 'usage: requests');
is($row->{tokens}, 3 * 50 + 2 * 7, 'usage: tokens as charged');

my $csv = $t->req("GET /usage/export.csv?$range&group_by=api_key")->body;
my ($line) = grep { /,sk-1,/ } split /\r?\n/, $csv;
like($line // '', qr/,sk-1,5,0,164$/, 'CSV: Requests, Rejected, Tokens')
    or diag($csv);

my $m = $t->req('GET /metrics')->body;
like($m, qr/^llmlimit_tokens_total\{table="llm",category="Chat"\} 164$/m,
     'metrics: llmlimit_tokens_total') or diag($m);
like($m, qr/^llmlimit_requests_total\{table="llm",category="Chat",status="passed"\} 5$/m,
     'metrics: the requests beside them');

$t->stop;
done_testing;
