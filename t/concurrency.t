#!/usr/bin/perl

# Exact across worker processes: 2 workers, 8 concurrent clients, one
# identity; exactly COUNT requests pass, for each algorithm and for a rule
# with two limits.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $COUNT = 200;
my $PER_CLIENT = 60;       # 8 x 60 = 480 requests for 200 places
my $CLIENTS = 8;

my $t = LLMLimit::Test->new(
    workers => 2,
    listen  => 'reuseport',     # connections spread over both workers
    http    => qq{
        llmlimit_zone  z 1m;
        llmlimit_rules sliding zone=z {
            "Sliding"  *  /sliding  \$http_x_api_key  $COUNT/1h;
        }
        llmlimit_rules fixed zone=z algorithm=fixed {
            "Fixed"    *  /fixed    \$http_x_api_key  $COUNT/1h;
        }
        llmlimit_rules gcra zone=z algorithm=gcra {
            "Gcra"     *  /gcra     \$http_x_api_key  $COUNT/1h;
        }
        llmlimit_rules multi zone=z algorithm=fixed {
            "Multi"    *  /multi    \$http_x_api_key  $COUNT/1h,100000/1d;
        }
    },
    config  => q{
        llmlimit sliding;
        llmlimit fixed;
        llmlimit gcra;
        llmlimit multi;

        location / {
            add_header X-Pid $pid always;
            proxy_pass http://backend;
        }
    },
)->start;

for my $uri ('/sliding', '/fixed', '/gcra', '/multi') {
    my $key = uid();

    wait_window(3600, margin => valgrind() ? 300 : 60);
    wait_window(86400, margin => valgrind() ? 300 : 60) if $uri eq '/multi';

    my @res = parallel($CLIENTS, sub {
        my %s = (pids => {});
        for (1 .. $PER_CLIENT) {
            # a new connection each time, so both workers take part
            my $r = $t->req("GET $uri", headers => { 'X-Api-Key' => $key });
            $s{ $r->status }++;
            $s{pids}{ $r->header('X-Pid') // '?' } = 1;
        }
        return \%s;
    });

    my (%total, %pids);
    for my $s (@res) {
        diag("client error: $s->{error}") if $s->{error};
        $total{$_} += $s->{$_} for grep { /^\d+$/ } keys %$s;
        $pids{$_} = 1 for keys %{ $s->{pids} || {} };
    }

    is($total{200} // 0, $COUNT,
       "$uri: 8 clients on 2 workers, exactly $COUNT pass");
    is($total{429} // 0, $CLIENTS * $PER_CLIENT - $COUNT,
       "$uri: the rest are 429");
    is(scalar(keys %pids), 2, "$uri: both workers answered");
}

finish();
