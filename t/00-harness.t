#!/usr/bin/perl

# The harness itself, against plain nginx (no module): start, requests over
# fresh and kept-alive connections, source addresses, chunked bodies,
# parallel clients, reload, nginx -t, the end-of-test log checks.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $t = LLMLimit::Test->new(
    module  => 0,
    workers => 2,
    listen  => 'reuseport',
    http    => q{
        log_format who '$remote_addr $request_uri $status';
        access_log logs/who.log who;
    },
    config  => q{
        location / {
            add_header X-Addr $remote_addr always;
            add_header X-Pid  $pid always;
            add_header X-Gen  one always;
            add_header X-Multi a always;
            add_header X-Multi b always;
            return 200 "hello $http_x_test\n";
        }
        location /teapot {
            return 418 "short and stout\n";
        }
        location /proxy {
            proxy_pass http://%%BACKEND%%;
        }
        location /chunked {
            proxy_http_version 1.1;
            proxy_pass http://%%BACKEND%%/x;
            proxy_buffering off;
            chunked_transfer_encoding on;
        }
    },
)->start;

# one-shot request
my $r = $t->req('GET /', headers => { 'X-Test' => 'world' });
is($r->status, 200, 'one-shot request');
is($r->body, "hello world\n", 'body');
is($r->header('x-addr'), '127.0.0.1', 'headers are case-insensitive');
is_deeply([ $r->headers('X-Multi') ], [ 'a', 'b' ], 'multi-valued header');
is($r->header('X-Absent'), undef, 'absent header is undef');

# keep-alive: many requests on one connection
my $c = $t->conn;
my $ok = 0;
for (1 .. 200) {
    $ok++ if $c->req('GET /?' . $_)->status == 200;
}
is($ok, 200, '200 requests over one keep-alive connection');

# other source addresses on the loopback
is($t->conn(from => '127.0.0.7')->req('GET /')->header('X-Addr'),
   '127.0.0.7', 'from 127.0.0.7');

is($t->req('GET /teapot')->status, 418, 'other status');
like($t->req('GET /proxy/a')->body, qr/"uri":"\/proxy\/a"/, 'backend');

# the block form
run_blocks(
    {
        name     => 'block',
        module   => 0,
        config   => q{ location / { return 200 "b $arg_n\n"; } },
        requests => [
            { req => 'GET /?n=1', status => 200, body_is => "b 1\n" },
            { req => 'GET /', repeat => 3, status => [200, 200, 200],
              headers => { 'Content-Length' => [3, 3, 3],
                           'X-None' => undef } },
            { req => 'GET /?n=2', from => '127.0.0.9', status => 200,
              body_like => qr/^b 2/ },
        ],
        no_error_log => [ qr/\[error\]/ ],
    },
);

# parallel clients reach both workers
my @res = parallel(8, sub {
    my %pids;
    for (1 .. 10) {
        my $x = $t->req('GET /');
        $pids{ $x->header('X-Pid') }++ if $x->status == 200;
    }
    return [ keys %pids ];
});
my %pids = map { $_ => 1 } map { @$_ } @res;
is(scalar(keys %pids), 2, '8 parallel clients reached both workers');

# access log is written after the response
my @lines = $t->wait_lines('who.log', 200);
ok(@lines >= 200, 'access log lines');

# reload
my @w1 = $t->workers;
is(scalar @w1, 2, 'two workers');
ok($t->reload(config => q{
    location / {
        add_header X-Gen two always;
        return 200 "after reload\n";
    }
}), 'reload');
is($t->conn->req('GET /')->header('X-Gen'), 'two', 'new generation serves');
my %w1 = map { $_ => 1 } @w1;
ok(!(grep { $w1{$_} } $t->workers), 'old workers gone');

# a bad reload is refused and the old configuration keeps serving
ok(!$t->reload(config => q{ location / { bad_directive; } }),
   'bad reload refused');
is($t->conn->req('GET /')->header('X-Gen'), 'two', 'old config serves');
push @{ $t->{allow_log} }, qr/unknown directive "bad_directive"/;

$t->stop;

# nginx -t
my $res = nginx_t(module => 0, config => q{
    location / {
        return 200;
    }
    location /x {
        nonsense_here 1;
    }
});
isnt($res->{rc}, 0, 'nginx -t fails');
my $line = line_of($res->{conf}, 'nonsense_here');
like($res->{out}, qr/\[emerg\].* unknown directive "nonsense_here" in \Q$res->{conf}\E:$line/,
     'nginx -t names file and line');

$res = nginx_t(module => 0, config => q{ location / { return 200; } });
is($res->{rc}, 0, 'nginx -t passes') or diag($res->{out});

# windows
my $s = wait_window(1, start => 1);
my $now = Time::HiRes::time();
ok($now >= $s && $now < $s + 0.5, 'wait_window(1, start => 1)');

finish();
