#!/usr/bin/perl

# The key directory changes without a reload of nginx: a new key is valid
# within check=, a removed key invalid, and no request fails meanwhile; a
# broken or missing file keeps the directory in use and is logged once;
# the same without threads; a directory too big for the zone; nginx -s
# reload; a reload that fails after the zones were set up; a loader stopped
# and a worker killed while it loads.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP ();
use IO::Socket::INET;
use POSIX ();
use Test::More;
use Time::HiRes qw(time sleep);
use LLMLimit::Test;
use LLMLimit::Keys;


# what the directory says of KEY, from any worker
my $SERVER = q{
    llmlimit_key  $http_x_api_key;

    location / {
        return 200 "[$llmlimit_key_valid][$llmlimit_key_plan][$llmlimit_key_org]\n";
    }
};

sub http_conf {
    my ($file, $params) = @_;
    return "llmlimit_keys  $file check=200ms $params;";
}

sub ask {
    my ($c, $key) = @_;
    my $r = $c->req('GET /', headers => { 'X-Api-Key' => $key });
    return $r->status == 200 ? $r->body : "status " . $r->status;
}

# waits until KEY reads WANT; returns the seconds it took, or undef
sub until_is {
    my ($c, $key, $want, $timeout) = @_;
    my $t0 = time;
    my $end = $t0 + ($timeout // 5) * slow();
    while (time < $end) {
        return time - $t0 if ask($c, $key) eq $want;
        sleep 0.02;
    }
    return undef;
}

sub many {
    my ($n, $prefix, %f) = @_;
    return map { { key => "$prefix$_", %f } } 1 .. $n;
}

# a client hammering KEY for SECONDS, over several connections: how many
# requests, and those that did not read WANT
sub hammer {
    my ($t, $key, $want, $seconds) = @_;
    return parallel(2, sub {
        my ($i) = @_;
        my $c = $t->conn(from => "127.0.0." . (20 + $i));
        my ($n, @bad) = (0);
        my $end = time + $seconds;
        while (time < $end) {
            my $got = eval { ask($c, $key) } // "error: $@";
            $n++;
            push @bad, $got if $got ne $want && @bad < 5;
            sleep 0.001;    # steady, not a load test
        }
        return { n => $n, bad => \@bad };
    });
}

# user + system CPU of a process, in ticks
sub cpu_of {
    my ($pid) = @_;
    my $stat = LLMLimit::Test::slurp("/proc/$pid/stat") // return 0;
    my @f = split ' ', (split /\)\s+/, $stat, 2)[1];
    return $f[11] + $f[12];
}

sub count_of {
    my ($text, $re) = @_;
    my $n = () = $text =~ /$re/g;
    return $n;
}


# --- rewritten during traffic ---------------------------------------------------

for my $mode ([ 'a thread', '' ], [ 'slices (thread_pool=off)', 'thread_pool=off' ])
{
    my ($name, $params) = @$mode;

    my $file = keys_file();
    my @filler = many(20000, 'filler-', plan => 'pro', org => 'filler');

    write_keys($file, [ { key => 'k-a', plan => 'pro', org => 'acme' },
                        { key => 'k-c', plan => 'hobby' }, @filler ]);

    my $t = LLMLimit::Test->new(http => http_conf($file, $params),
                                config => $SERVER, workers => 2)->start;
    my $c = $t->conn;

    is(ask($c, 'k-c'), "[1][hobby][]\n", "$name: k-c at start");

    # a client reads k-a all along, through several rewrites
    my $pid = fork;
    die "fork: $!" unless defined $pid;

    if ($pid == 0) {
        my @r = hammer($t, 'k-a', "[1][pro][acme]\n", 4 * slow());
        open my $fh, '>', $t->prefix . '/hammer.json' or POSIX::_exit(1);
        print $fh JSON::PP->new->encode(\@r);
        close $fh;
        POSIX::_exit(0);
    }

    sleep 0.3;

    write_keys($file, [ { key => 'k-a', plan => 'pro', org => 'acme' },
                        { key => 'k-b', plan => 'enterprise', org => 'b' },
                        @filler ]);

    my $took_b = until_is($c, 'k-b', "[1][enterprise][b]\n");
    ok(defined $took_b, "$name: a new key is valid")
        and diag(sprintf "%s: new key valid after %.2fs (check=200ms)",
                 $name, $took_b);
    is(ask($c, 'k-c'), "[][][]\n", "$name: the removed key is not");

    for my $v (1 .. 4) {
        write_keys($file, [ { key => 'k-a', plan => 'pro', org => 'acme' },
                            { key => "k-v$v", plan => "v$v" }, @filler ]);
        ok(defined until_is($c, "k-v$v", "[1][v$v][]\n"),
           "$name: version $v");
    }

    waitpid($pid, 0);
    my $res = JSON::PP->new->decode(
        LLMLimit::Test::slurp($t->prefix . '/hammer.json') // '[]');
    my $n = 0;
    my @bad;
    for my $r (@$res) {
        $n += $r->{n} // 0;
        push @bad, @{ $r->{bad} || [] }, $r->{error} // ();
    }
    ok($n > 500 && !@bad,
       "$name: $n requests during the swaps, all saw k-a")
        or diag(explain \@bad);

    my $log = $t->error_log;
    ok(count_of($log, qr/llmlimit_keys "\Q$file\E": 20002 keys loaded/) >= 5,
       "$name: each version loaded once, logged");
    unlike($log, qr/k-[abc]\b/, "$name: no key in error.log");

    $t->stop;
}


# --- a broken file, a missing file ----------------------------------------------

{
    my $file = keys_file();
    write_keys($file, [ { key => 'k-a', plan => 'pro' } ]);

    my $t = LLMLimit::Test->new(http => http_conf($file, ''),
                                config => $SERVER, workers => 2)->start;
    my $c = $t->conn;

    write_raw($file, qq({"keys": [\n {"key": "k-a", "plan": "pro"},\n)
                     . qq( {"key": "k-b", "plan": 5}\n]}\n));
    sleep 1.5;   # some 14 checks by two workers

    is(ask($c, 'k-a'), "[1][pro][]\n", 'a broken file: the directory stays');
    is(ask($c, 'k-b'), "[][][]\n", 'nothing of the broken file');

    my $log = $t->error_log;
    is(count_of($log, qr/\[error\].*llmlimit_keys "\Q$file\E", line 3: "plan" must be a string; keeping the directory of 1 keys/),
       1, 'the error is logged once, with the line and reason')
        or diag($log);

    write_keys($file, [ { key => 'k-a', plan => 'pro' },
                        { key => 'k-b', plan => 'hobby' } ]);
    ok(defined until_is($c, 'k-b', "[1][hobby][]\n"),
       'fixed: the new directory');

    write_raw($file, "{\"keys\": [}\n");
    sleep 1;
    write_raw($file, "{\"keys\": [}  \n");
    sleep 1;
    is(count_of($t->error_log, qr/llmlimit_keys "\Q$file\E", line 1: .*keeping the directory of 2 keys/),
       2, 'another broken version: logged once more');

    unlink $file;
    sleep 1;
    is(ask($c, 'k-b'), "[1][hobby][]\n", 'a missing file: the directory stays');
    is(count_of($t->error_log, qr/\[error\].*llmlimit_keys: stat\(\) "\Q$file\E" failed, keeping the directory of 2 keys \(2: No such file or directory\)/),
       1, 'logged once');

    write_keys($file, [ { key => 'k-c', plan => 'pro' } ]);
    ok(defined until_is($c, 'k-c', "[1][pro][]\n"), 'the file is back');
    is(ask($c, 'k-b'), "[][][]\n", 'with its own keys');

    $t->stop;
}


# --- a directory too big for the zone; nginx -s reload --------------------------

{
    my $file = keys_file();
    write_keys($file, [ { key => 'k-a', plan => 'pro' } ]);

    my $t = LLMLimit::Test->new(http => http_conf($file, ''),
                                config => $SERVER, workers => 2)->start;
    my $c = $t->conn;

    # the zone was sized for one key: 1 MB
    write_keys($file, [ { key => 'k-a', plan => 'pro' },
                        many(30000, 'big-', org => 'big') ]);
    sleep 1.5;

    is(ask($c, 'big-7'), "[][][]\n", 'too big for the zone: not loaded');
    is(ask($c, 'k-a'), "[1][pro][]\n", 'the directory stays');
    is(count_of($t->error_log, qr/\[error\].*llmlimit_keys "\Q$file\E": 30001 keys take \d+ bytes, more than the shared memory has free \(size=1048576;/),
       1, 'logged once') or diag($t->error_log);

    ok($t->reload, 'nginx -s reload');
    is(ask($t->conn(from => '127.0.0.2'), 'big-7'), "[1][][big]\n",
       'the reload sized the zone for the file');

    # a reload with the file unchanged keeps the directory
    ok($t->reload, 'another reload');
    is(ask($t->conn(from => '127.0.0.3'), 'big-30000'), "[1][][big]\n",
       'the directory is there');

    # a reload with a changed file of the same size class
    write_keys($file, [ { key => 'k-d', plan => 'ent' },
                        many(30000, 'big-', org => 'big2') ]);
    ok($t->reload, 'a reload with a changed file');
    is(ask($t->conn(from => '127.0.0.4'), 'big-7'), "[1][][big2]\n",
       'the new directory');

    $t->stop;
    unlike($t->error_log, qr/big-\d|k-[ad]\b/, 'no key in error.log');
}


# --- nginx -s reload to another file while the old one loads --------------------

{
    my $old = keys_file('old');
    my $new = keys_file('new');

    write_keys($old, [ { key => 'k-a', plan => 'old' },
                       many(20000, 'o-', plan => 'old') ]);
    write_keys($new, [ { key => 'k-a', plan => 'new' },
                       many(20000, 'n-', plan => 'new') ]);

    # slices: the old workers' load of a changed file takes a while
    my $t = LLMLimit::Test->new(http => http_conf($old, 'thread_pool=off'),
                                config => $SERVER, workers => 2)->start;

    write_keys($old, [ { key => 'k-a', plan => 'old2' },
                       many(20000, 'o-', plan => 'old2') ]);
    sleep 0.25;

    ok($t->reload(http => http_conf($new, 'thread_pool=off')),
       'reloaded with another file, the zone kept (same size)');

    my $c = $t->conn(from => '127.0.0.30');
    is(ask($c, 'k-a'), "[1][new][]\n", 'the new file');
    sleep 1.5;
    is(ask($c, 'k-a'), "[1][new][]\n",
       'and no load of the old file replaced it');
    is(ask($c, 'o-5'), "[][][]\n", 'nothing of the old file');

    $t->stop;
}


# --- a reload that fails after the zones were set up ----------------------------

# bind() fails after nginx has initialised the shared zones: the old workers
# go on serving, and must go on checking and loading their file; nothing of
# the configuration that failed is published

{
    my $file = keys_file();
    my $other = keys_file('other');
    write_keys($file, [ { key => 'k-a', plan => 'pro' } ]);
    write_keys($other, [ { key => 'k-x', plan => 'failed' } ]);

    my $t = LLMLimit::Test->new(
        http => http_conf($file, 'size=1m'), config => $SERVER, workers => 2,
        allow_log => [ qr/bind\(\) to 127\.0\.0\.1:\d+ failed|still could not bind/ ])->start;
    my $c = $t->conn(from => '127.0.0.40');

    # a port that another socket holds
    my $busy = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                     Proto => 'tcp', Listen => 5)
        or die "listen: $!";
    my $port = $busy->sockport;

    # both workers up (a slow nginx, under ASan, starts them late)
    my $up = time + 10 * slow();
    sleep 0.05 while (() = $t->workers) < 2 && time < $up;

    my $log_before = -s $t->error_log_file;
    my %old = map { $_ => 1 } $t->workers;

    $t->{http} = http_conf($other, 'size=1m')
                 . "\n    server { listen 127.0.0.1:$port; }\n";
    $t->write_conf;
    kill 'HUP', $t->{pid};

    my $end = time + 15 * slow();
    sleep 0.1 while time < $end
        && $t->error_log($log_before) !~ /still could not bind/;
    like($t->error_log($log_before), qr/still could not bind/,
         'the reload failed: bind()');
    is(join(' ', sort keys %old), join(' ', $t->workers),
       'the old workers go on');

    is(ask($c, 'k-a'), "[1][pro][]\n", 'the directory in use stays');
    is(ask($c, 'k-x'), "[][][]\n",
       'nothing of the configuration that failed');

    write_keys($file, [ { key => 'k-a', plan => 'pro' },
                        { key => 'k-b', plan => 'hobby' } ]);
    ok(defined until_is($c, 'k-b', "[1][hobby][]\n"),
       'the old workers still load a changed file');

    # the port is free: the same configuration now loads
    close $busy;
    ok($t->reload, 'reloaded once the port is free');
    my $c2 = $t->conn(from => '127.0.0.41');
    is(ask($c2, 'k-x'), "[1][failed][]\n", 'its file');
    is(ask($c2, 'k-b'), "[][][]\n", 'alone');

    write_keys($other, [ { key => 'k-y', plan => 'next' } ]);
    ok(defined until_is($c2, 'k-y', "[1][next][]\n"),
       'and its workers load a changed file');

    $t->stop;
}


# --- a loader stopped (SIGSTOP) in the middle of its load ------------------------

# a live loader is waited for, however long it takes: its block is never
# freed under it; once it goes on, its directory is published whole

{
    my $file = keys_file();
    write_keys($file, [ { key => 'k-a', plan => 'pro' } ]);

    my $t = LLMLimit::Test->new(
        http => http_conf($file, 'size=64m thread_pool=off'),
        config => $SERVER, workers => 2)->start;

    write_keys($file, [ { key => 'k-a', plan => 'pro' },
                        many(200000, 'many-', plan => 'p') ]);

    # the loader is the worker that burns CPU
    sleep 0.5;
    my %cpu0 = map { $_ => cpu_of($_) } $t->workers;
    sleep 0.2;
    my ($loader) = sort { (cpu_of($b) - $cpu0{$b}) <=> (cpu_of($a) - $cpu0{$a}) }
                   keys %cpu0;

    kill 'STOP', $loader;
    sleep 2;    # some 10 checks by the other worker
    my $log = $t->error_log;
    kill 'CONT', $loader;

    unlike($log, qr/taking over/, 'a stopped loader is not taken over');

    my $c = $t->conn(from => '127.0.0.50');
    ok(defined until_is($c, 'many-199999', "[1][p][]\n", 20),
       'it goes on, and publishes its directory');
    is(ask($c, 'many-7'), "[1][p][]\n", 'whole');
    is(count_of($t->error_log, qr/200001 keys loaded/), 1, 'loaded once');

    $t->stop;
}


# --- a worker killed while it loads ---------------------------------------------

{
    my $file = keys_file();
    write_keys($file, [ { key => 'k-a', plan => 'pro' } ]);

    # in slices, a load of 200 000 keys takes a second or two
    my $t = LLMLimit::Test->new(
        http => http_conf($file, 'size=64m thread_pool=off'),
        config => $SERVER, workers => 2,
        allow_log => [ qr/exited on signal 9/ ])->start;

    write_keys($file, [ { key => 'k-a', plan => 'pro' },
                        many(200000, 'many-', plan => 'p') ]);

    # a load starts within check= (200ms): kill every worker in the
    # middle of it
    sleep 0.6;
    kill 'KILL', $t->workers;

    my $c = $t->conn(from => '127.0.0.5');
    my $ok;
    for (1 .. 40 * slow()) {
        $ok = eval { ask($c, 'many-199999') } // '';
        last if $ok eq "[1][p][]\n";
        $c = $t->conn(from => '127.0.0.' . (6 + int(rand(100))));
        sleep 0.25;
    }
    is($ok, "[1][p][]\n", 'the new workers load the file');
    like($t->error_log, qr/llmlimit_keys: process \d+ did not finish loading "\Q$file\E", taking over/,
         'one of them took over the load');

    $t->stop;
}


finish();
