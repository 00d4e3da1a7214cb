#!/usr/bin/perl

# llmlimit_usage and llmlimit_usage_api in shared memory: known traffic per
# workspace, project, user and API key (from the key directory), some of
# it rejected, recorded in 5-second buckets on both sides of a boundary;
# the JSON and the CSV of every group_by match it exactly, with the stride
# boundary put on the bucket boundary.  Also: the workspace filter,
# HEAD, CSV quoting, a range beyond retention, a full zone.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use POSIX qw(strftime floor);
use LLMLimit::Test;
use LLMLimit::Keys;

my $BUCKET = 5;

my $FILE = keys_file();

write_keys($FILE, [
    { key => 'k1', workspace => 'ws-1', workspace_name => 'Prod',
      project => 'p-1', project_name => 'Chat', user => 'u1',
      user_email => 'u1@example.com', short_key => 'sk-1' },
    { key => 'k2', workspace => 'ws-1', workspace_name => 'Prod',
      project => 'p-2', project_name => 'Search', user => 'u2',
      user_email => 'u2@example.com', short_key => 'sk-2' },
    { key => 'k3', workspace => 'ws-2', workspace_name => 'Dev, "Inc"',
      project => 'p-1', project_name => 'Chat', user => 'u1',
      user_email => 'u1@example.com', short_key => 'sk-3' },
]);

my $t = LLMLimit::Test->new(
    workers => 2,
    http    => qq{
        llmlimit_keys        $FILE;
        llmlimit_zone        z 1m;
        llmlimit_usage_zone  u 1m bucket=${BUCKET}s;
        llmlimit_rules api zone=z {
            "Keyed"  *  *  \$http_x_api_key  4/60s;
        }
        large_client_header_buffers  4 2m;
    },
    config => q{
        llmlimit_key    $http_x_api_key;

        location / {
            llmlimit        api;
            llmlimit_usage  u;
            proxy_pass      http://backend;
        }

        location /plain/ {
            llmlimit_usage  u;
            proxy_pass      http://backend;
        }

        location /usage/ {
            llmlimit_usage_api  u;
        }
    },
);
$t->start;


# wait until the start of a bucket, so that a phase fits in one
sub bucket_start {
    my $now = time;
    my $into = $now - $BUCKET * floor($now / $BUCKET);
    sleep($BUCKET - $into + 0.05) if $into > 0.5;
    return $BUCKET * floor(time / $BUCKET);
}

my %sent;    # phase, key => [passed, rejected]

sub send_phase {
    my ($phase, %n) = @_;
    my $c = $t->conn;
    for my $key (sort keys %n) {
        for (1 .. $n{$key}) {
            my $path = $key eq 'none' ? '/plain/x' : '/x';
            my $r = $c->req("GET $path",
                            headers => $key eq 'none' ? {}
                                                      : { 'X-API-Key' => $key });
            my $i = $r->status == 429 ? 1 : 0;
            $sent{$phase}{$key}[$i]++;
            $sent{$phase}{$key}[1 - $i] += 0;
        }
    }
}

my $b1 = bucket_start();
send_phase(1, k1 => 3, k2 => 2, k3 => 6, none => 2);
my $took = time - $b1;
my $wait = $b1 + $BUCKET - time + 0.2;
sleep($wait) if $wait > 0;
my $b2 = bucket_start();
send_phase(2, k1 => 2, k3 => 1, unknown => 1);

ok($took < $BUCKET, "phase 1 within its bucket (${took}s)");
is_deeply($sent{1}{k3}, [4, 2], 'k3: 4 passed, 2 rejected in phase 1');
is_deeply($sent{2}{k3}, [0, 1], 'k3: rejected in phase 2');

# who each key is: group fields per group_by
my %who = (
    k1 => { workspace => ['ws-1', 'Prod'], project => ['p-1', 'Chat'],
            user => ['u1', 'u1@example.com'], api_key => ['sk-1'] },
    k2 => { workspace => ['ws-1', 'Prod'], project => ['p-2', 'Search'],
            user => ['u2', 'u2@example.com'], api_key => ['sk-2'] },
    k3 => { workspace => ['ws-2', 'Dev, "Inc"'], project => ['p-1', 'Chat'],
            user => ['u1', 'u1@example.com'], api_key => ['sk-3'] },
);
$who{$_} = { map { ($_ => ['', '']) } qw(workspace project user) }
    for qw(none unknown);
$who{$_}{api_key} = [''] for qw(none unknown);

my %cols = (
    workspace => [qw(workspace_id workspace_name)],
    project   => [qw(project_id project_name)],
    user      => [qw(user_id user_email)],
    api_key   => [qw(api_key_short_key)],
);

sub iso { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

# the stride boundary on the bucket boundary: phase 1 in the first hour
my $start = $b2 - 3600;
my $end = $b2 + 3600;

sub expected {
    my ($by, $ws) = @_;
    my @rows;
    for my $phase (1, 2) {
        my %agg;
        for my $key (keys %{ $sent{$phase} }) {
            my $w = $who{$key};
            next if $ws && !grep { $_ eq $w->{workspace}[0] } @$ws;
            my $id = $w->{$by}[0];
            my $a = $agg{$id} //= { name => $w->{$by}[1], req => 0, rej => 0 };
            $a->{req} += $sent{$phase}{$key}[0];
            $a->{rej} += $sent{$phase}{$key}[1];
        }
        my $bs = $phase == 1 ? $start : $b2;
        for my $id (sort keys %agg) {
            my %row = (time_bucket_start => iso($bs),
                       time_bucket_end => iso($bs + 3600),
                       $cols{$by}[0] => $id,
                       requests => $agg{$id}{req},
                       rejected => $agg{$id}{rej}, tokens => 0);
            $row{ $cols{$by}[1] } = $agg{$id}{name} if $cols{$by}[1];
            push @rows, \%row;
        }
    }
    return \@rows;
}

sub csv_of {
    my ($by, $rows) = @_;
    my %at = (workspace => 2, project => 4, user => 6, api_key => 8);
    my $text = "Time Bucket Start,Time Bucket End,Workspace ID,Workspace Name,"
             . "Project ID,Project Name,User ID,User Email,API Key Short Key,"
             . "Requests,Rejected,Tokens\r\n";
    for my $r (@$rows) {
        my @f = ($r->{time_bucket_start}, $r->{time_bucket_end},
                 ('') x 7, $r->{requests}, $r->{rejected}, $r->{tokens});
        $f[ $at{$by} ] = $r->{ $cols{$by}[0] };
        $f[ $at{$by} + 1 ] = $r->{ $cols{$by}[1] } if $cols{$by}[1];
        $text .= join(',', map { /[,"\r\n]/ ? do { (my $q = $_) =~ s/"/""/g;
                                                  "\"$q\"" } : $_ } @f)
               . "\r\n";
    }
    return $text;
}

my $range = 'start_time=' . iso($start) . '&end_time=' . iso($end);

for my $by (qw(workspace project user api_key)) {
    my $r = $t->req("GET /usage/?$range&group_by=$by");
    is($r->status, 200, "$by: 200");
    like($r->header('Content-Type'), qr{^application/json}, "$by: JSON");
    my $j = LLMLimit::Test::json_decode($r->body);
    is($j->{group_by}, $by, "$by: group_by");
    is_deeply($j->{stride}, { hours => 1 }, "$by: hourly stride");
    is($j->{start_time}, iso($start), "$by: start_time");
    is($j->{end_time}, iso($end), "$by: end_time");
    ok(!$j->{truncated}, "$by: not truncated");
    my $want = expected($by);
    is_deeply($j->{usage}, $want, "$by: the rows")
        or diag(explain($j->{usage}));

    $r = $t->req("GET /usage/export.csv?$range&group_by=$by");
    is($r->status, 200, "$by: CSV 200");
    is($r->header('Content-Type'), 'text/csv; charset=utf-8', "$by: CSV type");
    is($r->header('Content-Disposition'), 'attachment; filename="usage.csv"',
       "$by: CSV attachment");
    is($r->body, csv_of($by, $want), "$by: CSV rows");
}

# the default group_by, the workspace filter, comma-separated and repeated

{
    my $r = $t->req("GET /usage/?$range");
    my $j = LLMLimit::Test::json_decode($r->body);
    is_deeply($j->{usage}, expected('workspace'), 'group_by defaults to workspace');

    $r = $t->req("GET /usage/?$range&workspace_ids=ws-2&group_by=api_key");
    $j = LLMLimit::Test::json_decode($r->body);
    is_deeply($j->{usage}, expected('api_key', ['ws-2']), 'workspace_ids=ws-2');

    $r = $t->req("GET /usage/?$range&workspace_ids=ws-2,ws-1&group_by=user");
    $j = LLMLimit::Test::json_decode($r->body);
    is_deeply($j->{usage}, expected('user', ['ws-1', 'ws-2']),
              'workspace_ids=ws-2,ws-1');

    $r = $t->req("GET /usage/?$range&workspace_ids=ws-1&workspace_ids=nope"
                 . "&group_by=project");
    $j = LLMLimit::Test::json_decode($r->body);
    is_deeply($j->{usage}, expected('project', ['ws-1']),
              'workspace_ids repeated');

    $r = $t->req("GET /usage/?$range&workspace_ids=nope");
    $j = LLMLimit::Test::json_decode($r->body);
    is_deeply($j->{usage}, [], 'an unknown workspace: no rows');

    $r = $t->req("HEAD /usage/?$range");
    is($r->status, 200, 'HEAD: 200');
    is($r->body, '', 'HEAD: no body');

    $r = $t->req("POST /usage/?$range", body => 'x');
    is($r->status, 405, 'POST: 405');
}

# one stride bucket for the whole range: the sums, cut at end_time

{
    my $s = $b1 - 60;
    my $e = $b2 + $BUCKET + 1;
    my $r = $t->req('GET /usage/?start_time=' . iso($s) . '&end_time='
                    . iso($e) . '&group_by=api_key');
    my $j = LLMLimit::Test::json_decode($r->body);
    my %tot;
    for my $row (@{ $j->{usage} }) {
        is($row->{time_bucket_start}, iso($s), 'one bucket: its start');
        is($row->{time_bucket_end}, iso($e), 'one bucket: cut at end_time');
        $tot{ $row->{api_key_short_key} } = [ $row->{requests}, $row->{rejected} ];
    }
    my %want;
    for my $phase (1, 2) {
        for my $key (keys %{ $sent{$phase} }) {
            my $w = $want{ $who{$key}{api_key}[0] } //= [0, 0];
            $w->[$_] += $sent{$phase}{$key}[$_] for 0, 1;
        }
    }
    is_deeply(\%tot, \%want, 'one bucket: the sums')
        or diag(explain(\%tot));

    # a range that ends before the traffic and one that starts after it
    $r = $t->req('GET /usage/?start_time=' . iso($b1 - 7200) . '&end_time='
                 . iso($b1 - 3600));
    is_deeply(LLMLimit::Test::json_decode($r->body)->{usage}, [],
              'before the traffic: nothing');
    $r = $t->req('GET /usage/?start_time=' . iso($b2 + $BUCKET) . '&end_time='
                 . iso($b2 + 7200));
    is_deeply(LLMLimit::Test::json_decode($r->body)->{usage}, [],
              'after the traffic: nothing');
}

# a range beyond retention (400 days): what is kept, and it says so

{
    my $r = $t->req('GET /usage/?start_time=2020-01-01&end_time=' . iso($end));
    my $j = LLMLimit::Test::json_decode($r->body);
    ok($j->{truncated}, 'from 2020: truncated');
    my $kept = time - 400 * 86400;
    my ($y, $m, $d, $H, $M, $S) =
        $j->{retention_start} =~ /^(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)Z$/;
    my $rs = POSIX::mktime($S, $M, $H, $d, $m - 1, $y - 1900);
    $rs -= (POSIX::mktime(gmtime 0) // 0);
    ok(abs($rs - $kept) < 3600 + 60, "retention_start 400 days ago "
       . "($j->{retention_start})");
    is_deeply($j->{stride}, { days => 365 }, 'from 2020: yearly');
    my $sum = 0;
    $sum += $_->{requests} + $_->{rejected} for @{ $j->{usage} };
    is($sum, 17, 'from 2020: all the traffic');
}

$t->stop;


# retention=10s: old buckets are gone, and the answer says what is kept

{
    my $t = LLMLimit::Test->new(
        http   => q{
            llmlimit_usage_zone  u 1m bucket=2s retention=10s;
        },
        config => q{
            location / {
                llmlimit_usage  u api_key=$http_x_k;
                proxy_pass      http://backend;
            }
            location /usage/ {
                llmlimit_usage_api  u;
            }
        },
    );
    $t->start;

    my $t0 = time;
    $t->req('GET /x', headers => { 'X-K' => 'old' }) for 1 .. 3;
    my $q = 'GET /usage/?group_by=api_key&start_time=' . iso($t0 - 600)
          . '&end_time=' . iso($t0 + 600);
    my $j = LLMLimit::Test::json_decode($t->req($q)->body);
    is(scalar @{ $j->{usage} }, 1, 'retention: one row');
    ok($j->{truncated}, 'retention: truncated');
    my $rs = $j->{retention_start};
    ok($rs ge iso($t0 - 13) && $rs le iso(time - 8),
       "retention: retention_start 10 s ago ($rs)");

    sleep(13);
    $t->req('GET /x', headers => { 'X-K' => 'new' });
    $j = LLMLimit::Test::json_decode($t->req($q)->body);
    is_deeply([ map { $_->{api_key_short_key} } @{ $j->{usage} } ], ['new'],
              'retention: the old bucket is gone');
    $t->stop;
}


# the zone is kept on reload; a dry run's rejections were served: requests

{
    my $t = LLMLimit::Test->new(
        http   => q{
            llmlimit_zone        z 1m;
            llmlimit_usage_zone  u 1m;
            llmlimit_rules api zone=z {
                "All"  *  *  $http_x_k  2/60s;
            }
        },
        config => q{
            location / {
                llmlimit        api;
                llmlimit_usage  u api_key=$http_x_k;
                proxy_pass      http://backend;
            }
            location /dry/ {
                llmlimit         api;
                llmlimit_dry_run on;
                llmlimit_usage   u api_key=dry-$http_x_k;
                proxy_pass       http://backend;
            }
            location /usage/ {
                llmlimit_usage_api  u;
            }
        },
    );
    $t->start;

    my @st = map { $t->req('GET /x', headers => { 'X-K' => 'a' })->status }
             1 .. 3;
    is("@st", '200 200 429', 'before the reload: 2 passed, 1 rejected');

    $t->reload;

    $t->req('GET /x', headers => { 'X-K' => 'a' });
    @st = map { $t->req('GET /dry/x', headers => { 'X-K' => 'b' })->status }
          1 .. 3;
    is("@st", '200 200 200', 'dry run: all served');

    my $t0 = time;
    my $j = LLMLimit::Test::json_decode($t->req(
        'GET /usage/?group_by=api_key&start_time=' . iso($t0 - 3600)
        . '&end_time=' . iso($t0 + 3600))->body);
    my %got = map { ($_->{api_key_short_key} => [$_->{requests},
                                                  $_->{rejected}]) }
              @{ $j->{usage} };
    is_deeply(\%got, { a => [2, 2], 'dry-b' => [3, 0] },
              'the zone survived the reload; a dry run counts as requests');
    $t->stop;
}


# a full zone: the oldest buckets go, a warning, requests still served

{
    my $t = LLMLimit::Test->new(
        http   => q{
            llmlimit_usage_zone  u 32k bucket=1s;
        },
        config => q{
            location / {
                llmlimit_usage  u user=$arg_u;
                proxy_pass      http://backend;
            }
            location /usage/ {
                llmlimit_usage_api  u;
            }
        },
    );
    $t->start;

    my $c = $t->conn;
    my $ok = 0;
    for my $i (1 .. 1500) {
        $ok++ if $c->req("GET /x?u=user-$i-" . ('x' x 40))->status == 200;
    }
    is($ok, 1500, 'full zone: every request served');
    like($t->wait_log('error.log', qr/usage zone "u" is full/),
         qr/usage zone "u" is full/, 'full zone: a warning');
    my $t0 = time;
    my $r = $t->req('GET /usage/?group_by=user&start_time=' . iso($t0 - 3600)
                    . '&end_time=' . iso($t0 + 60));
    is($r->status, 200, 'full zone: the API answers');
    my $j = LLMLimit::Test::json_decode($r->body);
    my @u = map { $_->{user_id} } @{ $j->{usage} };
    ok(@u > 10 && @u < 1500, scalar(@u) . ' users kept');
    ok((grep { $_ eq 'user-1500-' . ('x' x 40) } @u), 'the newest is kept');
    ok(!(grep { $_ eq 'user-1-' . ('x' x 40) } @u), 'the oldest is gone');
    $t->stop;
}

done_testing();
