# redis_sentinel= and redis_master=: the master is found through real
# redis-sentinel processes (1 master, 1 replica, 3 sentinels on loopback)
# and followed on failover (SENTINEL FAILOVER, deterministic): requests
# during the switch follow the zone's failure policy, then counting is
# exact in the new master.  A master killed outright is followed too.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed'
    unless LLMLimit::Redis::available();
plan skip_all => 'redis-sentinel not installed'
    unless LLMLimit::Redis::Sentinel::available();

my $SLOW = slow();

# Sentinel closes the clients of the servers it reconfigures
$SIG{PIPE} = 'IGNORE';


sub wait_for {
    my ($secs, $what, $cond) = @_;
    my $end = time + $secs * $SLOW;
    while (time < $end) {
        my $ok = eval { $cond->() };
        return 1 if $ok;
        sleep 0.1;
    }
    diag("gave up waiting: $what");
    return 0;
}


# a command on a helper connection that may have been closed: undef then
sub try_cmd {
    my ($rd, @cmd) = @_;
    my $r = eval { $rd->cmd(@cmd) };
    $rd->disconnect unless defined $r;
    return $r;
}


sub role {
    my ($rd) = @_;
    my $r = try_cmd($rd, 'ROLE');
    return ref $r eq 'ARRAY' ? $r->[0] : '';
}


sub master_port {
    my ($s) = @_;
    my $r = try_cmd($s, 'SENTINEL', 'GET-MASTER-ADDR-BY-NAME', 'mymaster');
    return ref $r eq 'ARRAY' ? $r->[1] : 0;
}


sub in_sync {
    my ($rd) = @_;
    return (try_cmd($rd, 'INFO', 'replication') // '')
           =~ /master_link_status:up/;
}


# a master, its replica, three sentinels that know each other

my $M = LLMLimit::Redis->new;
my $R = LLMLimit::Redis->new;
$R->cmd('REPLICAOF', '127.0.0.1', $M->port);

ok(wait_for(30, 'replica in sync', sub { in_sync($R) }),
   'the replica is in sync');

my @S = map { LLMLimit::Redis::Sentinel->new(master_port => $M->port) } 1 .. 3;

ok(wait_for(60, 'sentinels know each other and the replica', sub {
    for my $s (@S) {
        my $m = $s->master;
        return 0 unless ($m->{'num-other-sentinels'} // 0) == 2
                        && ($m->{'num-slaves'} // 0) == 1;
    }
    return 1;
}), 'the sentinels are ready');

my $TMO = int(1000 * $SLOW) . 'ms';
my $SENTINELS = join ',', map { $_->addr } @S;

my $t = LLMLimit::Test->new(name => 'sentinel', workers => 2, http => qq{
    llmlimit_zone o 1m redis_sentinel=$SENTINELS redis_master=mymaster
                  redis_timeout=$TMO redis_failure=open redis_prefix=o:;
    llmlimit_zone c 1m redis_sentinel=$SENTINELS redis_master=mymaster
                  redis_timeout=$TMO redis_failure=closed redis_prefix=c:;
    llmlimit_rules o zone=o { "O"  GET  /o  \$http_x_api_key  5/1h; }
    llmlimit_rules c zone=c { "C"  GET  /c  \$http_x_api_key  5/1h; }
}, config => q{
    add_header X-Status $llmlimit_status always;
    location /o { llmlimit o; proxy_pass http://%%BACKEND%%; }
    location /c { llmlimit c; proxy_pass http://%%BACKEND%%; }
})->start;

my $c = $t->conn;


sub status {
    my ($uri, $key) = @_;
    my $r = $c->req("GET $uri", headers => { 'X-Api-Key' => $key // uid() });
    return $r->status . ' ' . ($r->header('X-Status') // '-');
}


# both zones decide in Redis again (every worker), at most $secs
sub until_redis {
    my ($secs, $seen) = @_;
    my $good = 0;

    return wait_for($secs, 'requests decided in Redis', sub {
        for my $z ('/o', '/c') {
            my $st = status($z);
            $seen->{"$z $st"}++;
            $good = $st eq '200 PASSED' ? $good + 1 : 0;
        }
        # several in a row: both workers are connected
        return $good >= 8;
    });
}


# exactly 5 pass then 429, for a fresh key
sub exact {
    my ($what) = @_;
    for my $z ('/o', '/c') {
        my $key = uid();
        my @st = map { (split ' ', status($z, $key))[0] } 1 .. 6;
        is("@st", '200 200 200 200 200 429', "exact in $what ($z)");
    }
}


sub prefixed {
    my ($rd) = @_;
    my @k = grep { /^[oc]:/ } eval { $rd->keys };
    return scalar @k;
}


ok(until_redis(30), 'decided in Redis through Sentinel');
exact('the master');
ok(prefixed($M) > 0, 'the counters are in the master');


# SENTINEL FAILOVER: the replica becomes the master, the old master its
# replica; the switch is announced and followed

my %during;
my $before = length $t->error_log;

my $r = $S[0]->cmd('SENTINEL', 'FAILOVER', 'mymaster');
is($r, 'OK', 'SENTINEL FAILOVER') or diag(explain($r));

ok(wait_for(60, 'the replica is the master', sub {
    $during{'/o ' . status('/o')}++;
    $during{'/c ' . status('/c')}++;
    return role($R) eq 'master'
           && (grep { master_port($_) == $R->port } @S) == 3;
}), 'failed over');

ok(until_redis(60, \%during), 'decided in Redis again') or diag(explain(\%during));

my @bad = grep { !m{^/o 200 (PASSED|ERROR)$} && !m{^/c (200 PASSED|503 ERROR)$} }
          keys %during;
is("@bad", '', 'during the switch: the failure policy, nothing else')
    or diag(explain(\%during));

my $keys = prefixed($R);
exact('the new master');
ok(prefixed($R) > $keys, 'new counters in the new master');

my $log = $t->error_log($before);
my $port = $R->port;
like($log, qr/redis master mymaster switched to 127\.0\.0\.1:$port/,
     'the switch is logged');
my @switched = $log =~ /zone "o": redis master mymaster switched/g;
ok(@switched >= 1 && @switched <= 2, 'once per worker') or diag($log);


# the master killed: the sentinels promote the old one, which is found
# through them (the subscription, or a connection error and a new question)

ok(wait_for(60, 'the old master replicates', sub { in_sync($M) }),
   'the old master is a replica in sync');

ok(wait_for(60, 'the sentinels see the old master as a replica', sub {
    for my $s (@S) {
        return 0 unless ($s->master->{'num-slaves'} // 0) >= 1;
    }
    return 1;
}), 'and the sentinels know it');

%during = ();
$before = length $t->error_log;

kill 'KILL', $R->pid;
waitpid($R->pid, 0);
$R->{pid} = undef;

ok(wait_for(90, 'the old master is promoted', sub {
    $during{'/o ' . status('/o')}++;
    $during{'/c ' . status('/c')}++;
    return role($M) eq 'master'
           && (grep { master_port($_) == $M->port } @S) == 3;
}), 'failed over after a kill');

ok(until_redis(60, \%during), 'decided in Redis again after the kill')
    or diag(explain(\%during));

@bad = grep { !m{^/o 200 (PASSED|ERROR)$} && !m{^/c (200 PASSED|503 ERROR)$} }
       keys %during;
is("@bad", '', 'during the failover: the failure policy')
    or diag(explain(\%during));

exact('the promoted master');

$log = $t->error_log($before);
$port = $M->port;
like($log, qr/redis master mymaster (switched to|is at) 127\.0\.0\.1:$port/,
     'the new master is logged');


# a reload: the old workers leave (their sentinel connections with them),
# the new ones find the master, and no request meanwhile is answered
# other than by the policy

%during = ();
ok($t->reload, 'reloaded');
ok(until_redis(30, \%during), 'decided in Redis after the reload');
@bad = grep { !m{^/o 200 (PASSED|ERROR)$} && !m{^/c (200 PASSED|503 ERROR)$} }
       keys %during;
is("@bad", '', 'after the reload: the policy at most') or diag(explain(\%during));
exact('the master after a reload');

$t->stop;

finish();
