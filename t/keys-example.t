#!/usr/bin/perl

# conf.example on the key directory (keys.example.json): the two keys of an
# organisation share its budget, a hashed key is a key, unknown keys are
# unauthenticated; the auth_request server (llmlimit_phase access).  The
# per-plan limits themselves are t/langbase.t.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $t = LLMLimit::Test->new(conf => conf_example())->start;

my $LANGBASE = $t->subst('%%PORT2%%');
my $AUTH = $t->subst('%%PORT3%%');

sub key { return (headers => { 'X-Api-Key' => $_[0] }) }


# acme (pro, 300 per minute): lb-pro-demo in clear, lb-pro-demo-2 hashed
{
    wait_window(60, margin => 10);
    my $c = $t->conn(port => $LANGBASE);

    my $a = $c->req('GET /v1/pipes', key('lb-pro-demo'));
    my $b = $c->req('GET /v1/pipes', key('lb-pro-demo-2'));

    is_deeply([ $a->status, $b->status ], [ 200, 200 ],
              'acme: both keys valid (one given hashed)');
    is($b->header('lb-ratelimit-limit'), 300, 'acme: pro, 300');

    my $ra = $a->header('lb-ratelimit-remaining');
    my $rb = $b->header('lb-ratelimit-remaining');
    is($rb, $ra - 1, "acme: the second key's request comes off the "
                     . "organisation's budget ($ra, then $rb)");

    # the organisation's budget is spent by its other key
    my $res = count_admitted($c, 'GET /v1/pipes', key('lb-pro-demo-2'),
                             max => 400);
    my $r = $c->req('GET /v1/pipes', key('lb-pro-demo'));
    is($r->status, 429, 'acme: one key spent it, the other is refused');
    is(($r->json // {})->{error}{category}, 'Organization',
       'acme: by the Organization rule');

    # globex is another organisation
    is($c->req('GET /v1/pipes', key('lb-enterprise-demo-2'))->status, 200,
       'globex: its own budget');
}

# an unknown key: unauthenticated, 10 per minute by IP
{
    my $c = $t->conn(port => $LANGBASE, from => '127.0.3.1');
    my $r = $c->req('GET /v1/pipes', key('lb-unknown'));
    is($r->header('lb-ratelimit-limit'), 10, 'an unknown key: 10 by IP');
}

# :8083, after auth_request
{
    my $c = $t->conn(port => $AUTH, from => '127.0.3.2');

    my $r = $c->req('GET /v1/pipes', key('auth-demo-acme'));
    is($r->status, 200, 'auth_request: a known key');
    is($r->header('lb-ratelimit-limit'), 300, 'auth_request: pro from X-Plan');

    $r = $c->req('GET /v1/pipes', key('auth-demo-initech'));
    is($r->header('lb-ratelimit-limit'), 1, 'auth_request: hobby from X-Plan');

    for (1 .. 3) {
        is($c->req('GET /v1/pipes', key('auth-demo-suspended'))->status, 403,
           'auth_request: 403');
        is($c->req('GET /v1/pipes', key('nope'))->status, 401,
           'auth_request: 401');
    }
}

finish();
