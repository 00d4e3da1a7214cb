#!/usr/bin/perl

# llmlimit_usage_zone ... redis=ZONE: two nginx instances on one
# redis-server each answer for both (their flushed buckets plus their own
# deltas not flushed yet); Redis stopped during traffic and started again:
# the API says Redis is away meanwhile, and the totals match once flushed;
# what lands in Redis holds no key in clear.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use POSIX qw(strftime);
use LLMLimit::Test;
use LLMLimit::Keys;

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();

my $FILE = keys_file();

write_keys($FILE, [
    { key => 'k1', workspace => 'ws-1', workspace_name => 'Prod',
      user => 'u1', short_key => 'sk-1' },
    { key => 'k2', workspace => 'ws-1', workspace_name => 'Prod',
      user => 'u2', short_key => 'sk-2' },
    { key => 'k3', workspace => 'ws-2', workspace_name => 'Dev',
      user => 'u1', short_key => 'sk-3' },
]);

my $rd = LLMLimit::Redis->new;

sub instance {
    my $t = LLMLimit::Test->new(
        workers => 2,
        http    => qq{
            llmlimit_keys        $FILE;
            llmlimit_zone        z 1m redis=@{[ $rd->addr ]}
                                 redis_prefix=fleet:;
            llmlimit_usage_zone  u 1m redis=z;
            llmlimit_rules api zone=z {
                "Keyed"  *  *  \$http_x_api_key  3/60s;
            }
        },
        config  => q{
            llmlimit_key    $http_x_api_key;

            location / {
                llmlimit        api;
                llmlimit_usage  u;
                proxy_pass      http://backend;
            }
            location /usage/ {
                llmlimit_usage_api  u;
            }
        },
        allow_log => [ qr/redis .* lost/ ],
    );
    $t->start;
    return $t;
}

my @t = (instance(), instance());

sub iso { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

my $T0 = time;
my $RANGE = 'start_time=' . iso($T0 - 7200) . '&end_time=' . iso($T0 + 7200);

my %sent;    # api key => [passed, rejected]

sub traffic {
    my ($t, %n) = @_;
    my $c = $t->conn;
    for my $key (sort keys %n) {
        for (1 .. $n{$key}) {
            my $r = $c->req('GET /x', headers => { 'X-API-Key' => $key });
            my $i = $r->status == 429 ? 1 : 0;
            $sent{$key}[$i]++;
            $sent{$key}[1 - $i] += 0;
        }
    }
}

# api key => [requests, rejected] as an instance's API says
sub totals {
    my ($t) = @_;
    my $r = $t->req("GET /usage/?$RANGE&group_by=api_key");
    return { status => $r->status } unless $r->status == 200;
    my $j = LLMLimit::Test::json_decode($r->body);
    my %tot;
    for my $row (@{ $j->{usage} }) {
        my $k = $tot{ $row->{api_key_short_key} } //= [0, 0];
        $k->[0] += $row->{requests};
        $k->[1] += $row->{rejected};
    }
    return \%tot;
}

sub want {
    return { map { ("sk-" . substr($_, 1) => $sent{$_}) } keys %sent };
}

# both instances answer the sum, within a few flushes
sub both_agree {
    my ($name) = @_;
    my $end = time + 15 * LLMLimit::Test::slow();
    my @got;
    while (time < $end) {
        @got = map { totals($_) } @t;
        last if !grep { !eq_deeply_simple($_, want()) } @got;
        sleep 0.25;
    }
    is_deeply($got[$_], want(), "$name: instance " . ($_ + 1) . ' reports the sum')
        for 0, 1;
}

sub eq_deeply_simple {
    my ($a, $b) = @_;
    require Data::Dumper;
    no warnings 'once';
    local $Data::Dumper::Sortkeys = 1;
    local $Data::Dumper::Indent = 0;
    return Data::Dumper::Dumper($a) eq Data::Dumper::Dumper($b);
}


# --- two instances, one Redis ----------------------------------------------------

traffic($t[0], k1 => 2, k2 => 2);
traffic($t[1], k1 => 2, k3 => 1);

is_deeply($sent{k1}, [3, 1], 'k1: the budget is shared by both instances');

both_agree('two instances');

{
    my @keys = @{ $rd->cmd('KEYS', 'fleet:usage:*') };
    ok((grep { /^fleet:usage:h:\d+$/ } @keys), 'hourly hashes in Redis');
    ok((grep { /^fleet:usage:d:\d+$/ } @keys), 'daily hashes in Redis');
    ok((grep { $_ eq 'fleet:usage:groups' } @keys), 'the groups hash');
    my $seqs = grep { /^fleet:usage:seq:/ } @keys;
    ok($seqs >= 2 && $seqs <= 4, "a sequence per worker that flushed ($seqs)");
    my $dump = join ' ', map { ref $_ ? @$_ : $_ }
        map { $rd->cmd('HGETALL', $_) } grep { /usage:[hdg]/ } @keys;
    unlike($dump, qr/\bk[123]\b/, 'no API key in clear in Redis');
    my $ttl = $rd->cmd('TTL', (grep { /usage:h:/ } @keys)[0]);
    ok($ttl > 400 * 86400, "the hashes expire after retention ($ttl s)");
}

# the workspace filter and the other group_bys over Redis
{
    my $r = $t[0]->req("GET /usage/export.csv?$RANGE&group_by=workspace"
                       . '&workspace_ids=ws-2');
    my @lines = split /\r\n/, $r->body;
    is(scalar @lines, 2, 'CSV over Redis: a header and one row');
    like($lines[1], qr/,ws-2,Dev,,,,,,1,0,0$/, 'CSV over Redis: ws-2');

    $r = $t[1]->req("GET /usage/?$RANGE&group_by=user");
    my $j = LLMLimit::Test::json_decode($r->body);
    my %u = map { ($_->{user_id} => $_->{requests} + $_->{rejected}) }
            @{ $j->{usage} };
    is_deeply(\%u, { u1 => 5, u2 => 2 }, 'group_by=user over Redis');

    # the widest range reads what Redis can hold, not 8 000 years of hours
    $r = $t[0]->req('GET /usage/?start_time=1970-01-01&end_time=9999-12-31'
                    . '&group_by=api_key');
    is($r->status, 200, '1970 to 9999 over Redis: 200');
    $j = LLMLimit::Test::json_decode($r->body);
    is_deeply($j->{stride}, { days => 365 }, '1970 to 9999: yearly');
    ok($j->{truncated}, '1970 to 9999: truncated');
}


# --- Redis stopped during traffic, started again -------------------------------

eval { $rd->cmd('SHUTDOWN', 'SAVE') };
$rd->disconnect;
{
    my $end = time + 10;
    sleep 0.05 while time < $end && kill 0, $rd->pid;
    waitpid($rd->pid, 0);
    $rd->{pid} = undef;
}

traffic($t[0], k2 => 1, k3 => 4);
traffic($t[1], k2 => 3);
sleep(1.5);
traffic($t[0], k1 => 1);

{
    my $r = $t[0]->req("GET /usage/?$RANGE");
    is($r->status, 503, 'Redis away: the API answers 503');
    my $j = LLMLimit::Test::json_decode($r->body);
    is($j->{error}{type}, 'redis_unavailable', 'Redis away: says so');
}

$rd->start;

both_agree('after the outage');

# a flush whose reply is lost (Redis asleep beyond the 10 s a flush may
# wait: the connection is dropped) is sent again with its sequence number
# and applied once

{
    traffic($t[0], k2 => 2);
    sleep(0.3);
    $rd->send_only('DEBUG', 'SLEEP', '13');
    $rd->{sock} = undef;
    sleep(14);
    both_agree('a flush sent again');
    my $log = $t[0]->error_log;
    like($log, qr/no reply to a usage flush/, 'the flush was given up on');
}

$_->stop for @t;

# a worker that exits gives back what it could not flush: nothing lost, a
# reload (new workers) keeps the zone and its deltas
{
    my $t = instance();
    traffic($t, k1 => 1);
    $t->reload;
    my $end = time + 15 * LLMLimit::Test::slow();
    my $got;
    while (time < $end) {
        $got = totals($t);
        last if eq_deeply_simple($got, want());
        sleep 0.25;
    }
    is_deeply($got, want(), 'after a reload: the sum');
    $t->stop;
}

# an API request read from Redis frees what it read with: many of them, over
# the widest range, and the workers' memory stays put

{
    my $t = instance();
    traffic($t, k1 => 1);
    sleep(1.5);

    my $wide = 'start_time=1970-01-01&end_time=9999-12-31&group_by=api_key';

    my $ask = sub {
        my $n = 0;
        for (1 .. $_[0]) {
            $n++ if $t->req("GET /usage/?$wide")->status == 200;
        }
        return $n;
    };

    my $rss = sub {
        my $kb = 0;
        for my $pid ($t->workers) {
            open my $fh, '<', "/proc/$pid/status" or next;
            while (<$fh>) { $kb += $1 if /^VmRSS:\s+(\d+)/ }
        }
        return $kb;
    };

    # under ASan (freed memory held in quarantine) or valgrind the RSS says
    # nothing: there LeakSanitizer and memcheck report a leak at exit
    my $tooled = $ENV{ASAN_OPTIONS} || LLMLimit::Test::valgrind();
    my $n = $tooled ? 100 : 1000;

    $ask->(100);
    my $before = $rss->();
    is($ask->($n), $n, "$n wide reads answered");
    my $grew = $rss->() - $before;

    SKIP: {
        skip 'RSS is not the measure under ASan or valgrind', 1 if $tooled;
        diag("workers' RSS grew by $grew KiB over $n reads");
        cmp_ok($grew, '<', 2048, 'the reads freed their memory');
    }

    $t->stop;
}

$rd->stop;

done_testing();
