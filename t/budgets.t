#!/usr/bin/perl

# Whose budget a request spends: per category, shared within a category,
# API key vs user id, several limits at once (all or nothing), several
# tables at one level, per-plan limits with the default token, unlimited.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $SERVER = q{
    llmlimit t;

    location / {
        add_header X-Cat    "[$llmlimit_category]" always;
        add_header X-Status "$llmlimit_status" always;
        add_header X-Plan   "[$llmlimit_plan]" always;
        proxy_pass http://backend;
    }
};

# N passes then a 429 for request REQ with headers SEND
sub passes {
    my ($n, $req, $send, $name, %o) = @_;
    return (
        { req => $req, send => $send, repeat => $n, status => 200,
          name => "$name: $n pass", %o },
        { req => $req, send => $send, status => 429,
          name => "$name: then 429" },
    );
}


run_blocks(
    {
        name => 'per-category budgets',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Run query (API)"  POST  /runs/query   $http_x_api_key  3/60s;
                "Examples"         GET   */examples*   $http_x_api_key  2/60s;
                "Default"          *     *             $http_x_api_key  5/60s;
            }
        },
        config => $SERVER,
        requests => [
            passes(3, 'POST /runs/query', { 'X-Api-Key' => 'same' },
                   'Run query'),
            # the same key still has its whole Examples and Default budgets
            passes(2, 'GET /datasets/1/examples', { 'X-Api-Key' => 'same' },
                   'Examples, same key'),
            passes(5, 'GET /other', { 'X-Api-Key' => 'same' },
                   'Default, same key'),
            # and another key its own Run query budget
            passes(3, 'POST /runs/query', { 'X-Api-Key' => 'other' },
                   'Run query, other key'),
        ],
    },

    {
        name => 'one category, one budget',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Deletion"  DELETE  /sessions*  $http_x_api_key  3/60s;
                "Deletion"  *       */trigger   $http_x_api_key  3/60s;
                "Other"     *       *           $http_x_api_key  100/60s;
            }
        },
        config => $SERVER,
        requests => [
            { req => 'DELETE /sessions/1', send => { 'X-Api-Key' => 'k' },
              repeat => 2, status => 200,
              headers => { 'X-RateLimit-Remaining' => [2, 1] } },
            { req => 'POST /flows/9/trigger', send => { 'X-Api-Key' => 'k' },
              status => 200, headers => { 'X-RateLimit-Remaining' => 0,
                                          'X-Cat' => '[Deletion]' },
              name => 'the other rule of the category counts in the same budget' },
            { req => 'DELETE /sessions/2', send => { 'X-Api-Key' => 'k' },
              status => 429 },
            { req => 'GET /x/trigger', send => { 'X-Api-Key' => 'k' },
              status => 429, json => { error => { category => 'Deletion' } } },
            { req => 'GET /x/trigger', send => { 'X-Api-Key' => 'k2' },
              status => 200, name => 'other key: own budget' },
        ],
    },

    {
        name => 'an API key and a user id never share a budget',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t zone=z {
                "Repository"  *  /repos*  $http_x_api_key  2/60s;
                "Repository"  *  /repos*  $http_x_user_id  2/60s;
            }
        },
        config => $SERVER,
        requests => [
            passes(2, 'GET /repos/a', { 'X-Api-Key' => 'abc' }, 'key abc'),
            passes(2, 'GET /repos/a', { 'X-User-Id' => 'abc' },
                   'user id abc, same string'),
        ],
    },

    {
        name => 'the same category in two tables',
        http => q{
            llmlimit_zone  z 1m;
            llmlimit_rules t  zone=z {
                "Cat"  *  *  $http_x_api_key  2/60s;
            }
            llmlimit_rules t2 zone=z {
                "Cat"  *  *  $http_x_api_key  2/60s;
            }
        },
        config => q{
            location /a {
                llmlimit t;
                proxy_pass http://backend;
            }
            location /b {
                llmlimit t2;
                proxy_pass http://backend;
            }
        },
        requests => [
            passes(2, 'GET /a', { 'X-Api-Key' => 'k' }, 'table t'),
            passes(2, 'GET /b', { 'X-Api-Key' => 'k' }, 'table t2'),
        ],
    },
);


# several limits on one rule: all must hold, counted in all or none
run_blocks({
    name => 'several limits, all or nothing',
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z algorithm=fixed {
            "Two"  *  /two  $http_x_api_key  2/2s,4/1h;
        }
    },
    config => $SERVER,
    requests => [
        sub {
            my ($t) = @_;
            my $c = $t->conn;
            my %h = (headers => { 'X-Api-Key' => uid() });

            # the whole test stays inside one hour window
            wait_window(3600, margin => valgrind() ? 120 : 30);
            wait_window(2, start => 1);

            my @s = map { $c->req('GET /two', %h) } 1 .. 2;
            is_deeply([ map { $_->status } @s ], [200, 200], 'two pass');
            is($s[0]->header('X-RateLimit-Limit'), 2,
               'the most restrictive limit is reported');
            is($s[0]->header('X-RateLimit-Remaining'), 1, 'remaining 1');

            my @r = map { $c->req('GET /two', %h)->status } 1 .. 5;
            is_deeply(\@r, [ (429) x 5 ], 'the 2/2s limit rejects');

            # the next 2 s window: 2 more pass, the rejected 5 did not
            # count against 4/1h
            wait_window(2, start => 1);
            my $a = $c->req('GET /two', %h);
            my $b = $c->req('GET /two', %h);
            is_deeply([ $a->status, $b->status ], [200, 200],
                      'rejected requests were not counted on the other limit');
            is($b->header('X-RateLimit-Remaining'), 0, 'remaining 0');

            wait_window(2, start => 1);
            my $x = $c->req('GET /two', %h);
            is($x->status, 429, 'now 4/1h is spent');
            is($x->header('X-RateLimit-Limit'), 4,
               'the limit that rejects is reported');
            is($x->header('X-RateLimit-Remaining'), 0, 'remaining 0');
            my $j = $x->json // {};
            is($j->{error}{limit}, 4, 'JSON limit 4');
            is($j->{error}{period}, 3600, 'JSON period 3600');
            ok($x->header('Retry-After') > 2,
               'Retry-After is for the hour limit');
        },
    ],
});


run_blocks({
    name => 'several tables on two zones: a rejection counts in neither',
    http => q{
        llmlimit_zone  z1 1m;
        llmlimit_zone  z2 1m;
        llmlimit_rules endpoint zone=z1 {
            "Endpoint"  *  *  $http_x_api_key  5/60s;
        }
        llmlimit_rules org zone=z2 {
            "Org"       *  *  $http_x_org      2/60s;
        }
    },
    config => q{
        location / {
            llmlimit endpoint;
            llmlimit org;
            proxy_pass http://backend;
        }

        location /endpoint-only/ {
            llmlimit endpoint;
            proxy_pass http://backend;
        }
    },
    requests => [
        { req => 'GET /a', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o' },
          repeat => 2, status => 200,
          name => 'both zones count' },
        { req => 'GET /a', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o' },
          repeat => 2, status => 429,
          json => { error => { category => 'Org' } },
          name => 'the second zone rejects' },
        # 5 - 2 counted = 3 left before this one: the rejected requests
        # were taken back from the first zone
        { req => 'GET /endpoint-only/x', send => { 'X-Api-Key' => 'k' },
          status => 200, headers => { 'X-RateLimit-Remaining' => 2 },
          name => 'the first zone kept no rejected request' },
    ],
},
{
    name => 'several tables at one level',
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules endpoint zone=z {
            "Endpoint"  *  /a  $http_x_api_key  5/60s;
        }
        llmlimit_rules org zone=z {
            "Org"       *  *   $http_x_org      3/60s;
        }
    },
    config => q{
        llmlimit endpoint;
        llmlimit org;

        location / {
            add_header X-Cat "[$llmlimit_category]" always;
            proxy_pass http://backend;
        }
    },
    requests => [
        { req => 'GET /a', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o1' },
          repeat => 3, status => 200,
          headers => { 'X-RateLimit-Remaining' => [2, 1, 0] },
          name => 'both tables count; the fewest remaining is reported' },
        { req => 'GET /a', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o1' },
          status => 429, json => { error => { category => 'Org' } },
          name => 'the org table rejects' },
        # the endpoint table did not count the rejected request: 5 - 3 = 2
        { req => 'GET /a', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o2' },
          repeat => 2, status => 200,
          name => 'a rejected request is counted in no table' },
        { req => 'GET /a', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o3' },
          status => 429, json => { error => { category => 'Endpoint' } },
          name => 'now the endpoint table rejects' },
        { req => 'GET /b', send => { 'X-Api-Key' => 'k', 'X-Org' => 'o3' },
          status => 200, headers => { 'X-Cat' => '[Org]' },
          name => 'a table that matches nothing does not stop the others' },
    ],
});


my $PLANS = q{
    map $http_x_api_key $plan {
        default      "";
        ~^hobby-     hobby;
        ~^pro-       pro;
        ~^ent-       enterprise;
        ~^gold-      gold;
    }

    llmlimit_zone  z 1m;
    llmlimit_rules t zone=z plan=$plan {
        "Pipes"   *  /v1/pipes*  $http_x_api_key       hobby=1/1h pro=3/1h enterprise=unlimited 2/1h;
        "Free"    *  /free       $binary_remote_addr   unlimited;
        "Public"  *  *           $binary_remote_addr   3/1h;
    }
};

run_blocks(
    {
        name => 'per-plan limits and the default token',
        http => $PLANS,
        config => $SERVER,
        requests => [
            { req => 'GET /v1/pipes', send => { 'X-Api-Key' => 'hobby-1' },
              status => 200, headers => { 'X-RateLimit-Limit' => 1,
                                          'X-Plan' => '[hobby]' } },
            { req => 'GET /v1/pipes', send => { 'X-Api-Key' => 'hobby-1' },
              status => 429, name => 'hobby: 1' },
            passes(3, 'GET /v1/pipes/x', { 'X-Api-Key' => 'pro-1' }, 'pro',
                   headers => { 'X-RateLimit-Limit' => 3,
                                'X-Plan' => '[pro]' }),
            passes(2, 'GET /v1/pipes', { 'X-Api-Key' => 'gold-1' },
                   'a plan not named: the default token',
                   headers => { 'X-RateLimit-Limit' => 2,
                                'X-Plan' => '[gold]' }),
            passes(2, 'GET /v1/pipes', { 'X-Api-Key' => 'nobody-1' },
                   'empty plan: the default token',
                   headers => { 'X-RateLimit-Limit' => 2 }),
            { req => 'GET /v1/pipes', send => { 'X-Api-Key' => 'ent-1' },
              repeat => 50, status => 200,
              headers => { 'X-Plan' => '[enterprise]' },
              name => 'enterprise=unlimited' },
        ],
    },

    {
        name => 'unlimited',
        http => $PLANS,
        config => $SERVER,
        requests => [
            { req => 'GET /free', repeat => 100, status => 200,
              headers => { 'X-Cat' => '[Free]' },
              name => 'unlimited: never rejected' },
            # unlimited matched first: the catch-all below was not spent
            passes(3, 'GET /other', undef, 'the catch-all budget is whole'),
            { req => 'GET /free', status => 200,
              name => 'unlimited while the catch-all is spent' },
        ],
    },
);

finish();
