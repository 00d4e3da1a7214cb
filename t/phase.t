#!/usr/bin/perl

# llmlimit_phase: with "access" the limiter runs after auth_request (and
# allow/deny, satisfy any), keys and plans on what the auth service
# answered, and never counts a request access control refused; with
# "preaccess" (the default) the old behaviour, before access control.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;


my $HTTP = q{
    # the auth service's answers: "ORG PLAN", or a status
    map $http_x_api_key $auth_answer {
        default      401;
        k-acme-1     "acme pro";
        k-acme-2     "acme pro";
        k-ini-1      "initech hobby";
        k-blocked    403;
    }

    map $auth_answer $auth_answer_org {
        "~^(?<o>\S+) "  $o;
        default         "";
    }

    map $auth_answer $auth_answer_plan {
        "~ (?<p>\S+)$"  $p;
        default         "";
    }

    llmlimit_zone  z 1m;

    llmlimit_rules  by_org  zone=z  plan=$auth_plan {
        "Org"  *  *  $auth_org             hobby=1/60s  pro=3/60s  2/60s;
        "IP"   *  *  $binary_remote_addr   2/60s;
    }

    llmlimit_rules  by_ip  zone=z {
        "IP"   *  *  $binary_remote_addr   2/60s;
    }
};

# the auth service: 204 with X-Org and X-Plan, or 401 / 403
my $AUTH_SERVER = q{
    server {
        listen       127.0.0.1:%%PORT2%%;
        access_log   logs/auth.log;

        location = /auth {
            if ($auth_answer = 401) {
                return 401;
            }
            if ($auth_answer = 403) {
                return 403;
            }
            add_header  X-Org   $auth_answer_org;
            add_header  X-Plan  $auth_answer_plan;
            return 204;
        }
    }
};

my $SERVER = q{
    location = /_auth {
        internal;

        # the auth subrequest itself is never limited
        llmlimit_phase  access;
        llmlimit        by_ip;

        proxy_pass               http://127.0.0.1:%%PORT2%%/auth;
        proxy_pass_request_body  off;
        proxy_set_header         Content-Length "";
    }

    # after auth_request, by what it answered
    location /api/ {
        llmlimit_phase    access;
        llmlimit          by_org;
        auth_request      /_auth;
        auth_request_set  $auth_org   $upstream_http_x_org;
        auth_request_set  $auth_plan  $upstream_http_x_plan;
        proxy_pass        http://backend;
    }

    location /ip/ {
        llmlimit_phase  access;
        llmlimit        by_ip;
        auth_request    /_auth;
        proxy_pass      http://backend;
    }

    # the default phase: before auth_request
    location /pre/ {
        llmlimit          by_org;
        auth_request      /_auth;
        auth_request_set  $auth_org   $upstream_http_x_org;
        auth_request_set  $auth_plan  $upstream_http_x_plan;
        proxy_pass        http://backend;
    }

    location /pre-ip/ {
        llmlimit      by_ip;
        auth_request  /_auth;
        proxy_pass    http://backend;
    }

    location /any/ {
        llmlimit_phase  access;
        llmlimit        by_ip;
        satisfy         any;
        allow           127.0.0.4;
        deny            all;
        auth_request    /_auth;
        proxy_pass      http://backend;
    }

    location /deny/ {
        llmlimit_phase  access;
        llmlimit        by_ip;
        deny            127.0.0.5;
        proxy_pass      http://backend;
    }

    # counted once, before try_files sends it to @backend
    location /tf/ {
        llmlimit_phase  access;
        llmlimit        by_ip;
        try_files       /nonexistent @backend;
    }

    location @backend {
        proxy_pass  http://backend;
    }
};

sub key { return { 'X-Api-Key' => $_[0] } }

my $NO_HEADERS = { 'X-RateLimit-Limit' => undef };

run_blocks(
    {
        name     => 'access: limits follow what auth_request answered',
        http     => $HTTP,
        servers  => $AUTH_SERVER,
        config   => $SERVER,
        requests => [
            { req => 'GET /api/x', send => key('k-acme-1'), repeat => 2,
              status => 200,
              headers => { 'X-RateLimit-Limit' => 3,
                           'X-RateLimit-Remaining' => [2, 1] },
              name => 'pro organisation from X-Org / X-Plan: 3' },
            { req => 'GET /api/x', send => key('k-acme-2'), status => 200,
              headers => { 'X-RateLimit-Remaining' => 0 },
              name => 'another key of that organisation: one budget' },
            { req => 'GET /api/x', send => key('k-acme-2'), status => 429,
              json => { error => { category => 'Org', limit => 3 } } },
            { req => 'GET /api/x', send => key('k-ini-1'), status => 200,
              headers => { 'X-RateLimit-Limit' => 1 },
              name => 'a hobby organisation: 1' },
            { req => 'GET /api/x', send => key('k-ini-1'), status => 429 },
            { req => 'GET /api/x', send => key('k-unknown'), repeat => 3,
              status => 401, headers => $NO_HEADERS,
              name => 'auth says 401: no limit, no headers' },
        ],
    },
    {
        name     => 'access: a 401 or 403 from auth_request is never counted',
        http     => $HTTP,
        servers  => $AUTH_SERVER,
        config   => $SERVER,
        requests => [
            { req => 'GET /ip/x', from => '127.0.0.6', send => key('k-nope'),
              repeat => 5, status => 401, headers => $NO_HEADERS },
            { req => 'GET /ip/x', from => '127.0.0.6',
              send => key('k-blocked'), repeat => 5, status => 403,
              headers => $NO_HEADERS },
            { req => 'GET /ip/x', from => '127.0.0.6', send => key('k-acme-1'),
              repeat => 2, status => 200,
              headers => { 'X-RateLimit-Limit' => 2,
                           'X-RateLimit-Remaining' => [1, 0] },
              name => 'the IP still has its whole budget '
                      . '(and the auth subrequests were not counted)' },
            { req => 'GET /ip/x', from => '127.0.0.6', send => key('k-acme-1'),
              status => 429, json => { error => { category => 'IP' } } },
            { req => 'GET /ip/x', from => '127.0.0.6', send => key('k-nope'),
              status => 401, name => 'refused first, over the limit or not' },
        ],
    },
    {
        name     => 'preaccess: before auth_request, as before',
        http     => $HTTP,
        servers  => $AUTH_SERVER,
        config   => $SERVER,
        requests => [
            { req => 'GET /pre-ip/x', from => '127.0.0.7',
              send => key('k-nope'), repeat => 2, status => 401,
              headers => { 'X-RateLimit-Remaining' => [1, 0] },
              name => 'refused by auth_request, but counted' },
            { req => 'GET /pre-ip/x', from => '127.0.0.7',
              send => key('k-acme-1'), status => 429,
              name => 'the budget is gone' },
            { req => 'GET /pre-ip/x', from => '127.0.0.7',
              send => key('k-nope'), status => 429,
              name => 'rejected before auth_request runs' },
            { req => 'GET /pre/x', from => '127.0.0.8',
              send => key('k-acme-1'), repeat => 2, status => 200,
              headers => { 'X-RateLimit-Limit' => 2 },
              name => 'auth_request_set is empty at preaccess: the IP rule' },
            { req => 'GET /pre/x', from => '127.0.0.8',
              send => key('k-acme-1'), status => 429,
              json => { error => { category => 'IP' } } },
        ],
    },
    {
        name     => 'access: satisfy any, allow/deny, try_files',
        http     => $HTTP,
        servers  => $AUTH_SERVER,
        config   => $SERVER,
        requests => [
            { req => 'GET /any/x', from => '127.0.0.4', repeat => 2,
              status => 200, headers => { 'X-RateLimit-Remaining' => [1, 0] },
              name => 'satisfy any: let through by allow, counted' },
            { req => 'GET /any/x', from => '127.0.0.4', status => 429 },
            { req => 'GET /any/x', from => '127.0.0.9', send => key('k-nope'),
              repeat => 3, status => [401, 401, 401],
              name => 'satisfy any: refused by both, never counted' },
            { req => 'GET /any/x', from => '127.0.0.9',
              send => key('k-acme-1'), repeat => 2, status => 200,
              headers => { 'X-RateLimit-Remaining' => [1, 0] },
              name => 'satisfy any: let through by auth_request, counted' },
            { req => 'GET /deny/x', from => '127.0.0.5', repeat => 4,
              status => 403, headers => $NO_HEADERS,
              name => 'deny: 403, never counted' },
            { req => 'GET /deny/x', from => '127.0.0.11', repeat => 2,
              status => 200, headers => { 'X-RateLimit-Remaining' => [1, 0] } },
            { req => 'GET /tf/x', from => '127.0.0.10', repeat => 2,
              status => 200, headers => { 'X-RateLimit-Remaining' => [1, 0] },
              name => 'try_files: counted once, then redirected' },
            { req => 'GET /tf/x', from => '127.0.0.10', status => 429 },
        ],
    },
);


# nginx -t

{
    my $r = nginx_t(http => $HTTP, config => q{
        llmlimit_phase  content;
        location / { proxy_pass http://backend; }
    });
    my $line = line_of($r->{conf}, 'llmlimit_phase  content');
    ok($r->{rc} != 0 && $r->{out} =~ /\[emerg\].*invalid value "content".*:$line/,
       'llmlimit_phase: an unknown phase fails') or diag($r->{out});

    $r = nginx_t(http => "$HTTP llmlimit_phase access;", config => q{
        llmlimit by_ip;
        location / {
            llmlimit_phase    preaccess;
            auth_request_set  $auth_org   $upstream_http_x_org;
            auth_request_set  $auth_plan  $upstream_http_x_plan;
            proxy_pass        http://backend;
        }
    });
    is($r->{rc}, 0, 'llmlimit_phase in http and location') or diag($r->{out});
}


# a request refused by access control and answered by an error_page in a
# location that the limiter covers is still not counted (it never got past
# access control)

run_blocks({
    name     => 'access: refused, then an error_page in a limited location',
    http     => q{
        llmlimit_zone  ze 1m;
        llmlimit_rules  by_ip_e  zone=ze {
            "IP"   *  *  $binary_remote_addr   2/60s;
        }
    },
    config   => q{
        llmlimit_phase  access;
        llmlimit        by_ip_e;
        error_page 403 /errors/ok.txt;

        location /errors/ {
            internal;
            alias html/;
        }
        location /deny/ {
            deny all;
            proxy_pass http://backend;
        }
        location /ok/ {
            proxy_pass http://backend;
        }
    },
    requests => [
        { req => 'GET /deny/x', from => '127.0.0.7', repeat => 3,
          status => 403, name => 'refused' },
        { req => 'GET /ok/x', from => '127.0.0.7', status => 200,
          headers => { 'X-RateLimit-Remaining' => 1 },
          name => 'the budget is untouched by the refusals' },
    ],
});


finish();
