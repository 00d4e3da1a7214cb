#!/usr/bin/perl

# llmlimit_usage_api's parameters: the stride of the seed's table for
# 12 h, 7 d, 60 d, 200 d and 2 y ranges and at the table's edges; the ISO
# 8601 forms clients send; bad parameters answered 400 with a JSON error
# naming the parameter (never a 500, never a crash), 10 000 workspace ids
# and a 1 MB query string included; bad configurations fail nginx -t.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $t = LLMLimit::Test->new(
    http   => q{
        llmlimit_usage_zone  u 1m;
        large_client_header_buffers  4 2m;
    },
    config => q{
        location / {
            llmlimit_usage  u;
            proxy_pass      http://backend;
        }
        location /usage/ {
            llmlimit_usage_api  u;
        }
    },
);
$t->start;

sub get {
    my ($q) = @_;
    my $r = $t->req("GET /usage/?$q");
    my $j = eval { LLMLimit::Test::json_decode($r->body) };
    return ($r, $j);
}


# --- the stride ----------------------------------------------------------------

my @strides = (
    [ '2026-01-05T00:00:00Z', '2026-01-05T12:00:00Z', { hours => 1 },  '12 h' ],
    [ '2026-01-05T00:00:00Z', '2026-01-05T23:59:59Z', { hours => 1 },  '1 s under a day' ],
    [ '2026-01-05T00:00:00Z', '2026-01-06T00:00:00Z', { days => 1 },   '1 d' ],
    [ '2026-01-05T00:00:00Z', '2026-01-12T00:00:00Z', { days => 1 },   '7 d' ],
    [ '2026-01-01T00:00:00Z', '2026-02-01T00:00:00Z', { days => 1 },   '31 d' ],
    [ '2026-01-01T00:00:00Z', '2026-02-02T00:00:00Z', { days => 7 },   '32 d' ],
    [ '2026-01-01T00:00:00Z', '2026-03-02T00:00:00Z', { days => 7 },   '60 d' ],
    [ '2026-01-01T00:00:00Z', '2026-04-04T00:00:00Z', { days => 7 },   '93 d' ],
    [ '2026-01-01T00:00:00Z', '2026-04-05T00:00:00Z', { days => 30 },  '94 d' ],
    [ '2026-01-01T00:00:00Z', '2026-07-20T00:00:00Z', { days => 30 },  '200 d' ],
    [ '2025-01-01T00:00:00Z', '2026-01-02T00:00:00Z', { days => 30 },  '366 d' ],
    [ '2025-01-01T00:00:00Z', '2026-01-03T00:00:00Z', { days => 365 }, '367 d' ],
    [ '2024-11-30T00:00:00Z', '2026-11-30T00:00:00Z', { days => 365 }, '2 y' ],
);

for my $s (@strides) {
    my ($r, $j) = get("start_time=$s->[0]&end_time=$s->[1]");
    is($r->status, 200, "$s->[3]: 200");
    is_deeply($j->{stride}, $s->[2], "$s->[3]: stride")
        or diag($r->body);
}


# --- ISO 8601 forms ------------------------------------------------------------

my @forms = (
    [ '2026-01-05T00:00:00Z',          '2026-01-05T00:00:00Z' ],
    [ '2026-01-05T00:00:00.123Z',      '2026-01-05T00:00:00.123Z' ],
    [ '2026-01-05T00:00:00.5Z',        '2026-01-05T00:00:00.500Z' ],
    [ '2026-01-05T00:00:00.123456789Z', '2026-01-05T00:00:00.123Z' ],
    [ '2026-01-05T01:00:00%2B01:00',   '2026-01-05T00:00:00Z' ],
    [ '2026-01-05T01:00:00+01:00',     '2026-01-05T00:00:00Z' ],
    [ '2026-01-04T19:30:00-04:30',     '2026-01-05T00:00:00Z' ],
    [ '2026-01-05T01:00:00%2B0100',    '2026-01-05T00:00:00Z' ],
    [ '2026-01-05',                    '2026-01-05T00:00:00Z' ],
    [ '2026-01-05T00:00',              '2026-01-05T00:00:00Z' ],
    [ '2026-01-05T00:00:00',           '2026-01-05T00:00:00Z' ],
    [ '2026-01-05%2000:00:00Z',        '2026-01-05T00:00:00Z' ],
    [ '2024-02-29T00:00:00Z',          '2024-02-29T00:00:00Z' ],
);

for my $f (@forms) {
    my ($r, $j) = get("start_time=$f->[0]&end_time=2027-01-01");
    is($r->status, 200, "$f->[0]: 200");
    is($j->{start_time}, $f->[1], "$f->[0]: read as $f->[1]")
        or diag($r->body);
}


# --- bad parameters --------------------------------------------------------------

my $ok = 'start_time=2026-01-05&end_time=2026-01-06';

my @bad = (
    [ 'end_time=2026-01-06',                         'start_time', 'missing start_time' ],
    [ 'start_time=2026-01-05',                       'end_time',   'missing end_time' ],
    [ '',                                            'start_time', 'no parameters' ],
    [ 'start_time=2026-01-06&end_time=2026-01-05',   'end_time',   'end before start' ],
    [ 'start_time=2026-01-05&end_time=2026-01-05',   'end_time',   'end equal to start' ],
    [ "$ok&group_by=team",                           'group_by',   'unknown group_by' ],
    [ "$ok&group_by=",                               'group_by',   'empty group_by' ],
    [ "$ok&group_by=workspace&group_by=user",        'group_by',   'group_by twice' ],
    [ 'start_time=yesterday&end_time=2026-01-06',    'start_time', 'a word' ],
    [ 'start_time=&end_time=2026-01-06',             'start_time', 'empty' ],
    [ 'start_time=2026-13-01&end_time=2027-01-06',   'start_time', 'month 13' ],
    [ 'start_time=2026-02-29&end_time=2027-01-06',   'start_time', 'February 29 of 2026' ],
    [ 'start_time=2026-01-05T24:00:00Z&end_time=2027-01-06', 'start_time', 'hour 24' ],
    [ 'start_time=2026-01-05T00:60:00Z&end_time=2027-01-06', 'start_time', 'minute 60' ],
    [ 'start_time=2026-01-05T00:00:00+25:00&end_time=2027-01-06', 'start_time', 'offset 25 h' ],
    [ 'start_time=2026-01-05T00:00:00Q&end_time=2027-01-06', 'start_time', 'zone Q' ],
    [ 'start_time=2026-01-05T00:00:00.Z&end_time=2027-01-06', 'start_time', 'a dot, no digits' ],
    [ 'start_time=2026-1-5&end_time=2027-01-06',     'start_time', 'one-digit month' ],
    [ 'start_time=1969-12-31&end_time=2027-01-06',   'start_time', 'before 1970' ],
    [ 'start_time=2026-01-05Z%00&end_time=2027-01-06', 'start_time', 'a NUL' ],
    [ 'start_time=2026-01-05&end_time=2026-01-06T00:00:00ZZ', 'end_time', 'end_time: ZZ' ],
    [ "$ok&start_time=2026-01-04",                   'start_time', 'start_time twice' ],
    [ "$ok&workspace_ids=" . ('x' x 600),            'workspace_ids', 'an id of 600 bytes' ],
    [ "$ok&workspace_ids=" . join(',', 1 .. 10000),  'workspace_ids', '10 000 ids' ],
    [ "$ok&" . join('&', map { "workspace_ids=$_" } 1 .. 1001),
                                                     'workspace_ids', '1001 ids, repeated' ],
    [ 'start_time=' . ('2' x (1 << 20)) . '&end_time=2026-01-06',
                                                     'start_time', 'a 1 MB start_time' ],
    [ "$ok&workspace_ids=" . (',' x (1 << 20)) . 'a' x 513,
                                                     'workspace_ids', 'a 1 MB workspace_ids' ],
);

for my $b (@bad) {
    my ($r, $j) = get($b->[0]);
    is($r->status, 400, "$b->[2]: 400");
    like($r->header('Content-Type') // '', qr{^application/json},
         "$b->[2]: JSON");
    is($j && $j->{error}{parameter}, $b->[1], "$b->[2]: names $b->[1]")
        or diag(substr($r->body, 0, 300));
    is($j && $j->{error}{type}, 'invalid_parameter', "$b->[2]: its type");
}

# what is not the four is let be, however long

{
    my ($r, $j) = get("$ok&_=" . ('y' x (1 << 20)) . '&x');
    is($r->status, 200, 'a 1 MB unknown parameter: 200');

    ($r, $j) = get("$ok&workspace_ids=" . join(',', 1 .. 1000));
    is($r->status, 200, '1000 ids: 200');

    ($r, $j) = get("$ok&workspace_ids=&workspace_ids=,,");
    is($r->status, 200, 'empty workspace_ids: 200');
}

ok($t->alive, 'nginx is alive');
$t->stop;


# --- nginx -t -------------------------------------------------------------------

my @conf = (
    [ q{llmlimit_usage_zone u 1m retention=0s;},    qr/invalid retention "retention=0s"/ ],
    [ q{llmlimit_usage_zone u 1m retention=x;},     qr/invalid retention "retention=x"/ ],
    [ q{llmlimit_usage_zone u 1m bucket=7s;},       qr/invalid bucket "bucket=7s", must divide a day/ ],
    [ q{llmlimit_usage_zone u 1m colour=red;},      qr/invalid parameter "colour=red"/ ],
    [ q{llmlimit_usage_zone u 1k;},                 qr/zone "u" is too small/ ],
    [ q{llmlimit_usage_zone u many;},               qr/invalid zone size "many"/ ],
    [ q{llmlimit_usage_zone u 1m; llmlimit_usage_zone u 1m;},
                                                    qr/duplicate llmlimit_usage_zone "u"/ ],
    [ q{llmlimit_usage_zone u 1m redis=nope;},      qr/unknown llmlimit_zone "nope"/ ],
    [ q{llmlimit_zone z 1m; llmlimit_usage_zone u 1m redis=z;},
                                                    qr/llmlimit_zone "z" of llmlimit_usage_zone "u" has no redis=/ ],
    [ q{llmlimit_usage v;},                         qr/unknown llmlimit_usage_zone "v"/ ],
    [ q{llmlimit_usage_zone u 1m; llmlimit_usage u colour=$host;},
                                                    qr/invalid parameter "colour=\$host"/ ],
    [ q{llmlimit_usage_zone u 1m; llmlimit_usage u user=$a user=$b;},
                                                    qr/duplicate parameter "user=\$b"/ ],
);

for my $c (@conf) {
    my $res = LLMLimit::Test::nginx_t(http => $c->[0],
                                      config => 'location / { }');
    isnt($res->{rc}, 0, "nginx -t fails: $c->[0]");
    like($res->{out}, $c->[1], "names the reason: $c->[0]");
}

{
    my $res = LLMLimit::Test::nginx_t(
        http   => q{
            llmlimit_usage_zone  u 1m retention=30d bucket=10s;
            llmlimit_usage       u workspace=$host project=p-$uri
                                   api_key=$arg_key;
        },
        config => q{
            location / { llmlimit_usage off; }
            location /u/ { llmlimit_usage_api u; }
        });
    is($res->{rc}, 0, 'nginx -t: a good configuration') or diag($res->{out});
}

done_testing();
