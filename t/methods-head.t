#!/usr/bin/perl

# GET in METHODS covers HEAD (issue 8), as nginx's own "limit_except GET"
# does: a HEAD is classified, counted and limited by a GET rule, so it
# cannot be used to get round it; other methods still fall through to the
# next rule.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $RUN = '/runs/0d2c7a1e-9c3b-4a5e-8f6d-123456789abc';

my $HTTP = q{
    llmlimit_zone  z 1m;
    llmlimit_rules api zone=z {
        "Run"  GET  "/runs/{uuid}"  $http_x_api_key       3/60s;
        "All"  *    *               $binary_remote_addr   1000/60s;
    }
};

my $CONFIG = q{
    llmlimit api;
    add_header X-Cat "[$llmlimit_category]" always;

    location / {
        proxy_pass http://backend;
    }
};

my ($k1, $k2, $k3) = (uid(), uid(), uid());

# (each block runs inside one 60 s window: waits only if less than 5 s are
# left in the current one)

run_blocks(
    {
        name     => 'HEAD after GETs',
        http     => $HTTP,
        config   => $CONFIG,
        requests => [
            sub { wait_window(60, margin => 5 * slow()) },
            { req => "GET $RUN", send => { 'X-Api-Key' => $k1 },
              repeat => 3, status => 200,
              headers => { 'X-Cat' => '[Run]', 'X-RateLimit-Limit' => 3,
                           'X-RateLimit-Remaining' => [2, 1, 0] },
              name => '3 GETs pass under "Run"' },
            { req => "HEAD $RUN", send => { 'X-Api-Key' => $k1 },
              status => 429,
              headers => { 'X-Cat' => '[Run]', 'X-RateLimit-Limit' => 3,
                           'Retry-After' => qr/^[1-9]\d*$/ },
              name => 'then a HEAD is 429 under "Run", not let through '
                      . 'by the catch-all' },
            { req => "GET $RUN", send => { 'X-Api-Key' => $k1 },
              status => 429, headers => { 'X-Cat' => '[Run]' },
              name => 'and so is a GET' },
        ],
    },
    {
        name     => 'HEAD first',
        http     => $HTTP,
        config   => $CONFIG,
        requests => [
            sub { wait_window(60, margin => 5 * slow()) },
            { req => "HEAD $RUN",
              send => { 'X-Api-Key' => $k2 }, status => 200,
              headers => { 'X-Cat' => '[Run]', 'X-RateLimit-Limit' => 3,
                           'X-RateLimit-Remaining' => 2 },
              name => 'a HEAD is counted under "Run"' },
            { req => "GET $RUN", send => { 'X-Api-Key' => $k2 },
              repeat => 2, status => 200,
              headers => { 'X-Cat' => '[Run]',
                           'X-RateLimit-Remaining' => [1, 0] },
              name => 'against the same budget as the GETs' },
            { req => "GET $RUN", send => { 'X-Api-Key' => $k2 },
              status => 429, headers => { 'X-Cat' => '[Run]' },
              name => 'the 4th request of the budget is 429' },
        ],
    },
    {
        name     => 'other methods',
        http     => $HTTP,
        config   => $CONFIG,
        requests => [
            sub { wait_window(60, margin => 5 * slow()) },
            { req => "POST $RUN", send => { 'X-Api-Key' => $k3 }, body => '{}',
              repeat => 4, status => 200,
              headers => { 'X-Cat' => '[All]', 'X-RateLimit-Limit' => 1000 },
              name => 'POST still goes to the catch-all' },
            { req => "DELETE $RUN", send => { 'X-Api-Key' => $k3 },
              status => 200,
              headers => { 'X-Cat' => '[All]', 'X-RateLimit-Limit' => 1000 },
              name => 'DELETE too' },
            { req => "GET $RUN", send => { 'X-Api-Key' => $k3 },
              status => 200,
              headers => { 'X-Cat' => '[Run]', 'X-RateLimit-Limit' => 3,
                           'X-RateLimit-Remaining' => 2 },
              name => 'they were not counted under "Run"' },
        ],
    },
);

finish();
