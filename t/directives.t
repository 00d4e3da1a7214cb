#!/usr/bin/perl

# llmlimit_dry_run, llmlimit_log_level, `llmlimit off` and inheritance, the
# variables in log_format, add_header and map.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;


run_blocks(
    {
        name => 'dry run',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "DryCat"   *  /dry*   $http_x_api_key  2/60s;
                "RealCat"  *  /real*  $http_x_api_key  2/60s;
            }
        },
        config => q{
            llmlimit t;

            location / {
                add_header X-Status "$llmlimit_status" always;
                proxy_pass http://backend;
            }
            location /dry {
                llmlimit_dry_run on;
                add_header X-Status "$llmlimit_status" always;
                proxy_pass http://backend;
            }
        },
        requests => [
            { req => 'GET /dry', send => { 'X-Api-Key' => 'k' }, repeat => 5,
              status => 200,
              headers => { 'X-Status' => [ qw(PASSED PASSED REJECTED_DRY_RUN
                                              REJECTED_DRY_RUN
                                              REJECTED_DRY_RUN) ],
                           'X-RateLimit-Remaining' => [1, 0, 0, 0, 0] },
              name => 'dry run: never rejects, $llmlimit_status tells' },
            { req => 'GET /real', send => { 'X-Api-Key' => 'k' }, repeat => 2,
              status => 200 },
            { req => 'GET /real', send => { 'X-Api-Key' => 'k' },
              status => 429, headers => { 'X-Status' => 'REJECTED' },
              name => 'dry run is per location' },
        ],
        error_log => [ qr/\[error\].*DryCat/, qr/\[error\].*RealCat/ ],
    },

    {
        name => 'llmlimit_log_level',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "ErrCat"     *  /err*     $http_x_api_key  1/60s;
                "WarnCat"    *  /warn*    $http_x_api_key  1/60s;
                "NoticeCat"  *  /notice*  $http_x_api_key  1/60s;
                "InfoCat"    *  /info*    $http_x_api_key  1/60s;
            }
        },
        config => q{
            llmlimit t;

            location / {
                proxy_pass http://backend;
            }
            location /warn {
                llmlimit_log_level warn;
                proxy_pass http://backend;
            }
            location /notice {
                llmlimit_log_level notice;
                proxy_pass http://backend;
            }
            location /info {
                llmlimit_log_level info;
                proxy_pass http://backend;
            }
        },
        requests => [
            map {
                ({ req => "GET /$_", send => { 'X-Api-Key' => 'k' },
                   status => 200 },
                 { req => "GET /$_", send => { 'X-Api-Key' => 'k' },
                   status => 429 })
            } qw(err warn notice info)
        ],
        error_log => [ qr/\[error\].*ErrCat/, qr/\[warn\].*WarnCat/,
                       qr/\[notice\].*NoticeCat/, qr/\[info\].*InfoCat/ ],
        no_error_log => [ qr/\[error\].*(WarnCat|NoticeCat|InfoCat)/,
                          qr/\[warn\].*(ErrCat|NoticeCat|InfoCat)/ ],
    },
);


# off and inheritance, as limit_req: a level inherits only if it sets no
# llmlimit of its own
run_blocks({
    name => 'off and inheritance',
    nports => 1,
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules outer zone=z {
            "Outer"  *  *  $http_x_api_key  2/60s;
        }
        llmlimit_rules inner zone=z {
            "Inner"  *  *  $http_x_api_key  3/60s;
        }

        llmlimit outer;
    },
    servers => q{
        server {
            listen 127.0.0.1:%%PORT2%%;
            llmlimit inner;

            location / {
                add_header X-Cat "[$llmlimit_category]" always;
                proxy_pass http://backend;
            }
            location /off {
                llmlimit off;
                add_header X-Cat "[$llmlimit_category]" always;
                proxy_pass http://backend;
            }
        }
    },
    config => q{
        add_header X-Cat "[$llmlimit_category]" always;

        location /inherit {
            proxy_pass http://backend;
        }
        location /off {
            llmlimit off;
            proxy_pass http://backend;

            location /off/nested {
                proxy_pass http://backend;
            }
            location /off/again {
                llmlimit inner;
                proxy_pass http://backend;
            }
        }
        location /own {
            llmlimit inner;
            proxy_pass http://backend;
        }
    },
    requests => [
        { req => 'GET /inherit', send => { 'X-Api-Key' => 'a' }, repeat => 2,
          status => 200, headers => { 'X-Cat' => '[Outer]' },
          name => 'http-level llmlimit is inherited' },
        { req => 'GET /inherit', send => { 'X-Api-Key' => 'a' }, status => 429 },

        { req => 'GET /off', send => { 'X-Api-Key' => 'a' }, repeat => 10,
          status => 200, headers => { 'X-RateLimit-Limit' => undef,
                                      'X-Cat' => '[]' },
          name => 'off cancels the inherited table' },
        { req => 'GET /off/nested', send => { 'X-Api-Key' => 'a' },
          repeat => 10, status => 200,
          headers => { 'X-RateLimit-Limit' => undef },
          name => 'a nested location inherits off' },

        { req => 'GET /own', send => { 'X-Api-Key' => 'b' }, repeat => 3,
          status => 200, headers => { 'X-Cat' => '[Inner]',
                                      'X-RateLimit-Limit' => 3 },
          name => 'its own llmlimit replaces the inherited one' },
        { req => 'GET /own', send => { 'X-Api-Key' => 'b' }, status => 429,
          json => { error => { category => 'Inner' } } },
        { req => 'GET /inherit', send => { 'X-Api-Key' => 'b' }, repeat => 2,
          status => 200, name => '... and did not count in the outer table' },

        { req => 'GET /off/again', send => { 'X-Api-Key' => 'c' },
          repeat => 3, status => 200, headers => { 'X-Cat' => '[Inner]' },
          name => 'a nested location can set a table again' },
        { req => 'GET /off/again', send => { 'X-Api-Key' => 'c' },
          status => 429 },

        { req => 'GET /x', port => 'PORT2', send => { 'X-Api-Key' => 'd' },
          repeat => 3, status => 200, headers => { 'X-Cat' => '[Inner]' },
          name => 'server level replaces http level' },
        { req => 'GET /x', port => 'PORT2', send => { 'X-Api-Key' => 'd' },
          status => 429 },
        { req => 'GET /off', port => 'PORT2', send => { 'X-Api-Key' => 'd' },
          repeat => 5, status => 200, headers => { 'X-Cat' => '[]' },
          name => 'off under a server-level table' },
    ],
});


# the variables
run_blocks({
    name => 'variables',
    http => q{
        map $http_x_api_key $plan {
            default  "";
            ~^pro-   pro;
        }

        map $llmlimit_status $rejected {
            REJECTED  yes;
            default   no;
        }

        log_format ll '$llmlimit_status|$llmlimit_category|$llmlimit_limit|'
                      '$llmlimit_remaining|$llmlimit_reset|$llmlimit_plan|'
                      '$request_uri';

        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z plan=$plan {
            "Cat"  *  /v*  $http_x_api_key  pro=2/60s 1/60s;
        }
    },
    config => q{
        llmlimit t;
        access_log logs/ll.log ll;

        location / {
            add_header X-Rejected $rejected always;
            add_header X-Vars "$llmlimit_status $llmlimit_limit $llmlimit_remaining" always;
            proxy_pass http://backend;
        }
        location /v/dry {
            llmlimit_dry_run on;
            proxy_pass http://backend;
        }
    },
    requests => [
        { req => 'GET /v/1', send => { 'X-Api-Key' => 'pro-a' }, status => 200,
          headers => { 'X-Rejected' => 'no', 'X-Vars' => 'PASSED 2 1' } },
        { req => 'GET /v/2', send => { 'X-Api-Key' => 'pro-a' }, status => 200,
          headers => { 'X-Vars' => 'PASSED 2 0' } },
        { req => 'GET /v/3', send => { 'X-Api-Key' => 'pro-a' }, status => 429,
          headers => { 'X-Rejected' => 'yes', 'X-Vars' => 'REJECTED 2 0' },
          name => 'variables in map and add_header' },
        { req => 'GET /v/4', send => { 'X-Api-Key' => 'free-a' },
          status => 200 },
        { req => 'GET /v/dry', send => { 'X-Api-Key' => 'free-a' },
          status => 200 },
        { req => 'GET /none', status => 200 },
        sub {
            my ($t) = @_;
            my @l = $t->wait_lines('ll.log', 6);
            is(scalar @l, 6, 'six access log lines');
            my @f = map { [ split /\|/ ] } @l;

            like($l[0], qr{^PASSED\|Cat\|2\|1\|\d+\|pro\|/v/1$},
                 'log_format: passed');
            like($l[1], qr{^PASSED\|Cat\|2\|0\|\d+\|pro\|/v/2$},
                 'log_format: last one');
            like($l[2], qr{^REJECTED\|Cat\|2\|0\|\d+\|pro\|/v/3$},
                 'log_format: rejected');
            like($l[3], qr{^PASSED\|Cat\|1\|0\|\d+\|-?\|/v/4$},
                 'log_format: default plan, empty $llmlimit_plan');
            like($l[4], qr{^REJECTED_DRY_RUN\|Cat\|1\|0\|\d+\|-?\|/v/dry$},
                 'log_format: dry run');
            like($l[5], qr{^BYPASSED\|}, 'log_format: no rule matched');
            ok($f[2][4] >= 1, '$llmlimit_reset on rejection is >= 1');
        },
    ],
});

finish();
