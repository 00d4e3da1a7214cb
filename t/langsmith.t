#!/usr/bin/perl

# conf.example's LangSmith table (US limits): every row admits exactly
# COUNT requests per identity and answers the next with 429, the row's
# category in the JSON body and Retry-After.  Each row gets fresh
# identities: a new API key, a new user id, or a new client address on the
# loopback (127.0.0.N) for the rows keyed by IP.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $UUID = '0d2c7a1e-9c3b-4a5e-8f6d-123456789abc';

# category, request, identity (ip, key, user), count, period (s): one line
# per rule of the table, in the table's order
my @ROWS = (
    [ 'High throughput',    'OPTIONS /runs/query',              ip   => 2000, 10 ],
    [ 'High throughput',    'GET /info',                        ip   => 2000, 10 ],
    [ 'High throughput',    'POST /api/v1/metadata/submit',     ip   => 2000, 10 ],
    [ 'High throughput',    'POST /auth',                       key  => 2000, 10 ],
    [ 'High throughput',    'GET /auth',                        user => 2000, 10 ],
    [ 'High throughput',    'POST /v1/beacon',                  ip   => 2000, 10 ],
    [ 'Repository',         'GET /repos/acme/prompt',           key  => 100,  60 ],
    [ 'Repository',         'POST /repos',                      user => 100,  60 ],
    [ 'High throughput',    'POST /runs/batch',                 key  => 2000, 10 ],
    [ 'Run ingest',         'POST /otel/v1/traces',             key  => 2000, 10 ],
    [ 'Charts',             'POST /api/v1/charts/section',      key  => 750,  600 ],
    [ 'Charts',             'POST /charts',                     user => 750,  600 ],
    [ 'Multipart ingest',   'POST /runs/multipart',             key  => 6000, 10 ],
    [ 'Run query (API)',    'POST /runs/query',                 key  => 15,   10 ],
    [ 'Run query (User)',   'POST /runs/query',                 user => 300,  10 ],
    [ 'Generation',         'POST /generate',                   key  => 30,   3600 ],
    [ 'Generation',         'POST /generate/prompt',            user => 30,   3600 ],
    [ 'Commits',            'POST /commits/acme/prompt',        key  => 10000, 60 ],
    [ 'Commits',            'GET /commits/acme/prompt',         user => 10000, 60 ],
    [ 'Deletion',           'DELETE /sessions/42',              key  => 10,   60 ],
    [ 'Deletion',           'POST /flows/7/trigger',            key  => 10,   60 ],
    [ 'Deletion',           'DELETE /sessions',                 user => 30,   60 ],
    [ 'Deletion',           'GET /x/trigger',                   user => 30,   60 ],
    [ 'Run ingest',         'POST /runs',                       key  => 2000, 10 ],
    [ 'Run ingest',         "PATCH /runs/$UUID",                key  => 2000, 10 ],
    [ 'High throughput',    'POST /feedback',                   key  => 2000, 10 ],
    [ 'Run lookup',         "GET /runs/$UUID",                  key  => 30,   60 ],
    [ 'Run lookup',         "GET /api/v1/runs/$UUID",           key  => 30,   60 ],
    [ 'Examples',           'GET /datasets/7/examples',         key  => 5000, 60 ],
    [ 'Default (API key)',  'GET /datasets',                    key  => 1000, 10 ],
    [ 'Default (User)',     'POST /anything/else',              user => 1000, 10 ],
    [ 'Public download',    'GET /public/download',             ip   => 5000, 60 ],
    [ 'Stats',              'GET /runs/stats',                  key  => 1,    10 ],
    [ 'Public (catch-all)', 'GET /anything',                    ip   => 100,  60 ],
);

# under valgrind only the small rows are counted to the end
my $FULL = valgrind() ? 300 : 1e9;

my $t = LLMLimit::Test->new(conf => conf_example(), nports => 1)->start;

my $ip = 1;
sub fresh_ip {
    $ip++;
    return '127.0.0.' . (2 + $ip % 250);
}

for my $row (@ROWS) {
    my ($cat, $req, $id, $count, $period) = @$row;

    my $name = "$cat: $req by $id, $count/${period}s";
    my %who;
    if ($id eq 'ip') {
        $who{from} = \&fresh_ip;
    } elsif ($id eq 'key') {
        $who{headers} = sub { { 'X-Api-Key' => uid('key') } };
    } else {
        $who{headers} = sub { { 'X-User-Id' => uid('user') } };
    }

    if ($count > $FULL) {
        my $c = $t->conn(from => $who{from} ? fresh_ip() : '127.0.0.1');
        my $r = $c->req($req, headers => $who{headers}
                                         ? $who{headers}->() : {});
        ok($r->status == 200 && $r->header('X-RateLimit-Limit') == $count
           && $r->header('RateLimit-Policy') =~ /;q=$count;w=$period$/,
           "$name: the first request (valgrind: not counted to the end)")
            or diag($r->as_string);
        next;
    }

    my $res = admits_exactly($t, $req, count => $count, period => $period,
                             name => "$name: exactly $count pass", %who);

    my $last = $res->{last};
    my $x = $res->{rejected};
    next unless $last && $x && $x->status == 429;

    is($last->header('X-RateLimit-Limit'), $count,
       "$name: X-RateLimit-Limit");
    is($last->header('X-RateLimit-Remaining'), 0,
       "$name: X-RateLimit-Remaining 0 on the last one");

    my $ra = $x->header('Retry-After') // '';
    my $j = $x->json // {};
    ok($ra =~ /^\d+$/ && $ra >= 1 && $ra <= 2 * $period,
       "$name: Retry-After $ra");
    is_deeply([ @{ $j->{error} || {} }{qw(category limit period retry_after)} ],
              [ $cat, $count, $period, $ra ],
              "$name: the JSON body names the category")
        or diag($x->body);
}


# the table as a whole: the same identity, different categories

{
    my $k = uid('key');
    my $c = $t->conn;
    my %h = (headers => { 'X-Api-Key' => $k });

    is($c->req('GET /runs/stats', %h)->status, 200, 'stats: 1 passes');
    is($c->req('GET /runs/stats', %h)->status, 429, 'stats: then 429');
    my $r = $c->req('GET /datasets', %h);
    is($r->status, 200, 'the same key: its default budget is untouched');
    is($r->header('X-RateLimit-Limit'), 1000, 'Default (API key): 1000');

    $r = $c->req('GET /health');
    is($r->status, 200, '/health is not limited');
    ok(!defined $r->header('X-RateLimit-Limit'), '/health: no headers');

    $r = $c->req('POST /runs/query', headers => { 'X-Api-Key' => uid(),
                                                  'X-User-Id' => uid() });
    is($r->header('X-RateLimit-Limit'), 15,
       'key and user id: the x-api-key rule comes first');
    like($r->body, qr/"backend"|"service"/, 'the demo backend answered');
}

finish();
