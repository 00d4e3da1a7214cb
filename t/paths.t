#!/usr/bin/perl

# Classification: every PATH form, every METHODS form, KEY skipping to the
# next rule, first match wins, a request matching no rule.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

# the matched category and the status of every response (in brackets:
# add_header drops empty values)
my $SERVER = q{
    llmlimit t;

    location / {
        add_header X-Cat    "[$llmlimit_category]" always;
        add_header X-Status "$llmlimit_status" always;
        proxy_pass http://backend;
    }
};

my $UUID = '0d2c7a1e-9c3b-4a5e-8f6d-123456789abc';

# a request whose expected category is CAT ('' for no rule)
sub cat {
    my ($req, $cat, %o) = @_;
    my $unmatched = $cat eq '';
    return {
        req     => $req,
        send    => $o{send},
        status  => 200,
        name    => "$req -> " . ($unmatched ? 'no rule' : $cat)
                   . ($o{note} ? " ($o{note})" : ''),
        headers => {
            'X-Cat'             => "[$cat]",
            'X-Status'          => $unmatched ? 'BYPASSED' : 'PASSED',
            'X-RateLimit-Limit' => $unmatched ? undef : qr/^\d+$/,
        },
    };
}


run_blocks(
    {
        name => 'PATH forms',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Literal"   *  /info                           $binary_remote_addr  1000/60s;
                "Prefix"    *  /repos*                         $binary_remote_addr  1000/60s;
                "Contains"  *  */charts*                       $binary_remote_addr  1000/60s;
                "Suffix"    *  */v1/metadata/submit            $binary_remote_addr  1000/60s;
                "Uuid"      *  "/runs/{uuid}"                  $binary_remote_addr  1000/60s;
                "Name"      *  "/v1/pipes/{pipe}"              $binary_remote_addr  1000/60s;
                "Names"     *  "/beta/pipes/{owner}/{pipe}/run" $binary_remote_addr 1000/60s;
                "Regex"     *  "~^/api/v[0-9]+/items$"         $binary_remote_addr  1000/60s;
                "RegexI"    *  "~*^/nocase/[a-z]+$"            $binary_remote_addr  1000/60s;
                "Star"      *  *                               $http_x_star         1000/60s;
            }
        },
        config => $SERVER,
        requests => [
            # literal: exact, on the normalised $uri
            cat('GET /info', 'Literal'),
            cat('POST /info', 'Literal'),
            cat('GET /info?x=1&y=2', 'Literal', note => 'query string'),
            cat('GET /in%66o', 'Literal', note => 'percent-decoded'),
            cat('GET //info', 'Literal', note => 'duplicate slash'),
            cat('GET /a/../info', 'Literal', note => 'dot segments'),
            cat('GET /./info', 'Literal', note => 'dot segment'),
            cat('GET /info/', ''),
            cat('GET /infox', ''),
            cat('GET /xinfo', ''),
            cat('GET /INFO', '', note => 'case-sensitive'),

            # trailing *
            cat('GET /repos', 'Prefix'),
            cat('GET /repos/acme/prompt', 'Prefix'),
            cat('GET /repository', 'Prefix'),
            cat('GET /repo', ''),
            cat('GET /x/repos', ''),

            # * on both sides, matching across "/"
            cat('POST /charts', 'Contains'),
            cat('POST /api/v1/charts/section/1', 'Contains'),
            cat('GET /a/b/chartsx', 'Contains'),
            cat('GET /chart', ''),
            cat('GET /xcharts', ''),

            # leading *
            cat('POST /v1/metadata/submit', 'Suffix'),
            cat('POST /api/x/v1/metadata/submit', 'Suffix'),
            cat('POST /v1/metadata/submit/x', ''),

            # {uuid}: one segment in UUID form
            cat("GET /runs/$UUID", 'Uuid'),
            cat('GET /runs/not-a-uuid', ''),
            cat("GET /runs/$UUID/x", ''),
            cat('GET /runs/', ''),
            cat('GET /runs/0d2c7a1e9c3b4a5e8f6d123456789abc', '',
                note => 'no dashes'),
            cat('GET /runs/0d2c7a1e-9c3b-4a5e-8f6d-123456789ab', '',
                note => 'too short'),

            # {name}: exactly one non-empty segment
            cat('GET /v1/pipes/summarizer', 'Name'),
            cat('GET /v1/pipes/a.b-c_d', 'Name'),
            cat('GET /v1/pipes/', ''),
            cat('GET /v1/pipes', ''),
            cat('GET /v1/pipes/a/b', ''),
            cat('POST /beta/pipes/me/summarizer/run', 'Names'),
            cat('POST /beta/pipes/me/run', ''),
            cat('POST /beta/pipes/me/a/b/run', ''),

            # regular expressions
            cat('GET /api/v2/items', 'Regex'),
            cat('GET /api/v10/items', 'Regex'),
            cat('GET /api/vx/items', ''),
            cat('GET /API/v2/items', '', note => '~ is case-sensitive'),
            cat('GET /api/v2/items/1', ''),
            cat('GET /nocase/abc', 'RegexI'),
            cat('GET /NoCase/ABC', 'RegexI', note => '~* is case-insensitive'),
            cat('GET /nocase/ab1', ''),

            # * matches every path
            cat('GET /anything/at/all', 'Star', send => { 'X-Star' => 's' }),
            cat('DELETE /', 'Star', send => { 'X-Star' => 's' }),
        ],
    },

    {
        name => 'METHODS forms',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Get"    GET                /m   $binary_remote_addr  1000/60s;
                "Write"  POST|PATCH|DELETE  /m   $binary_remote_addr  1000/60s;
                "Any"    *                  /m   $binary_remote_addr  1000/60s;
                "Opt"    OPTIONS            /o   $binary_remote_addr  1000/60s;
            }
        },
        config => $SERVER,
        requests => [
            cat('GET /m', 'Get'),
            cat('POST /m', 'Write'),
            cat('PATCH /m', 'Write'),
            cat('DELETE /m', 'Write'),
            cat('PUT /m', 'Any'),
            cat('OPTIONS /m', 'Any'),
            cat('OPTIONS /o', 'Opt'),
            cat('GET /o', ''),
            cat('POST /o', ''),
        ],
    },

    {
        name => 'KEY skipping',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "ByKey"   *  /k  $http_x_api_key                2/60s;
                "ByUser"  *  /k  $http_x_user_id:$remote_addr   3/60s;
                "ByIP"    *  /k  $binary_remote_addr            4/60s;
            }
        },
        config => $SERVER,
        requests => [
            { %{ cat('GET /k', 'ByKey', send => { 'X-Api-Key' => 'k1' }) },
              headers => { 'X-Cat' => '[ByKey]', 'X-RateLimit-Limit' => 2 } },
            { %{ cat('GET /k', 'ByKey', send => { 'X-Api-Key' => 'k2',
                                                  'X-User-Id' => 'u9' }) },
              name => 'key and user id: the first rule' },
            { %{ cat('GET /k', 'ByUser', send => { 'X-User-Id' => 'u1' }) },
              headers => { 'X-Cat' => '[ByUser]', 'X-RateLimit-Limit' => 3 } },
            { %{ cat('GET /k', 'ByUser', send => { 'X-Api-Key' => '',
                                                   'X-User-Id' => 'u2' }) },
              name => 'empty x-api-key is skipped' },
            { %{ cat('GET /k', 'ByIP') },
              headers => { 'X-Cat' => '[ByIP]', 'X-RateLimit-Limit' => 4 } },
            { %{ cat('GET /k', 'ByIP', send => { 'X-User-Id' => '' }) },
              name => 'empty x-user-id with $remote_addr is skipped' },

            # a rejected key does not fall through to the next rule
            { req => 'GET /k', send => { 'X-Api-Key' => 'k3' }, repeat => 2,
              status => 200 },
            { req => 'GET /k', send => { 'X-Api-Key' => 'k3' }, status => 429,
              headers => { 'X-Cat' => '[ByKey]', 'X-Status' => 'REJECTED' },
              name => 'exhausted first rule rejects, no fall-through' },
        ],
    },

    {
        name => 'first match wins',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "First"   GET  /o/*   $binary_remote_addr  1000/60s;
                "Second"  *    /o/x   $binary_remote_addr  1000/60s;
                "Third"   *    /o/x   $binary_remote_addr  1000/60s;
                "Catch"   *    *      $binary_remote_addr  1000/60s;
                "Never"   *    /n     $binary_remote_addr  1000/60s;
            }
        },
        config => $SERVER,
        requests => [
            cat('GET /o/x', 'First'),
            cat('POST /o/x', 'Second'),
            cat('GET /o/y', 'First'),
            cat('POST /o/y', 'Catch'),
            cat('GET /n', 'Catch', note => 'a later rule never wins'),
        ],
    },

    {
        name => 'no rule matches',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Only"  GET  /only  $binary_remote_addr  1/60s;
            }
        },
        config => $SERVER,
        requests => [
            { req => 'GET /other', repeat => 20, status => 200,
              headers => { 'X-Status' => 'BYPASSED', 'X-Cat' => '[]',
                           'X-RateLimit-Limit' => undef,
                           'X-RateLimit-Remaining' => undef,
                           'X-RateLimit-Reset' => undef,
                           'RateLimit' => undef,
                           'Retry-After' => undef },
              name => 'unmatched requests are not limited, no headers' },
            { req => 'POST /only', repeat => 5, status => 200,
              headers => { 'X-Status' => 'BYPASSED' },
              name => 'method does not match' },
            { req => 'GET /only', status => 200,
              headers => { 'X-Status' => 'PASSED' } },
            { req => 'GET /only', status => 429,
              headers => { 'X-Status' => 'REJECTED' } },
        ],
    },
);

finish();
