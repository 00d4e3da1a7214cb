#!/usr/bin/perl

# Rejection lines in the error log: one per rejection, as limit_req writes,
# up to llmlimit_log_limit lines a second in a worker process; past that the
# rejections are counted and their number written a second later, so that
# every rejection is either logged or counted, never lost.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use LLMLimit::Test;


my $HTTP = q{
    llmlimit_zone  z 1m;
    llmlimit_rules t zone=z {
        "Flood"  *  *  $http_x_api_key  1/1h;
    }
};

my $SERVER = q{
    llmlimit t;

    location / {
        proxy_pass http://backend;
    }
    location /capped {
        llmlimit_log_limit 3;
        proxy_pass http://backend;
    }
    location /all {
        llmlimit_log_limit off;
        proxy_pass http://backend;
    }
    location /quiet {
        llmlimit_log_level info;
        llmlimit_log_limit 1;
        proxy_pass http://backend;
    }
};


my $t = LLMLimit::Test->new(http => $HTTP, config => $SERVER,
                            log_level => 'notice')->start;


# sends N + 1 requests of one identity to URI on one connection: the first
# passes, N are rejected; returns the seconds they took
sub flood {
    my ($uri, $key, $n) = @_;

    my $c = $t->conn;
    my $start = time;

    is($c->req("GET $uri", headers => { 'X-Api-Key' => $key })->status, 200,
       "$uri: the first request passes");

    my $rejected = 0;
    for (1 .. $n) {
        $rejected++
            if $c->req("GET $uri", headers => { 'X-Api-Key' => $key })->status
               == 429;
    }
    is($rejected, $n, "$uri: the next $n are rejected");

    return time - $start;
}


# rejection lines and summed "N more rejections not logged" of a category
# key: the fingerprint is in every line
sub tally {
    my $log = $t->error_log;
    my $lines = () = $log =~ /limiting request, table "t", category "Flood"/g;
    my $dropped = 0;
    $dropped += $1 while $log =~ /llmlimit: (\d+) more rejections not logged/g;
    return ($lines, $dropped);
}


# --- the default, 100 a second: a few rejections are all logged --------------

flood('/', uid('few'), 20);
my ($lines, $dropped) = tally();
is($lines, 20, 'default: 20 rejections, 20 lines');
is($dropped, 0, 'default: nothing left out');


# --- llmlimit_log_limit 3 -----------------------------------------------------

# from the start of a second, so that its first 3 are written
sleep(1.05 - (time - int(time)));

my $n = 120;
my $took = flood('/capped', uid('capped'), $n);

# every rejection is logged or counted once the summary timer has fired
my $end = time + 10 * LLMLimit::Test::slow();
my ($l2, $d2);
do {
    sleep 0.2;
    ($l2, $d2) = tally();
    $l2 -= $lines;
} until ($l2 + $d2 >= $n || time > $end);

is($l2 + $d2, $n, "capped: $l2 lines + $d2 counted = $n rejections");
ok($d2 > 0, 'capped: some rejections were counted, not logged')
    or diag("$n requests took ${took}s");
ok($l2 >= 1, "capped: the first ones of a second are written ($l2)");
ok($l2 <= 3 * (int($took) + 2),
   "capped: at most 3 lines a second ($l2 lines in ${took}s)");
like($t->error_log,
     qr/\[error\].*llmlimit: \d+ more rejections not logged, over 3 lines a second/,
     'capped: the summary line, at the rejections\' level');


# --- off: every rejection ---------------------------------------------------------

my ($l3) = tally();
flood('/all', uid('all'), 150);
my ($l4) = tally();
is($l4 - $l3, 150, 'off: 150 rejections, 150 lines');


# --- below the error_log level: not written, not counted ---------------------------

my ($l5, $d5) = tally();
flood('/quiet', uid('quiet'), 30);
sleep 1.5;
my ($l6, $d6) = tally();
is($l6 - $l5, 0, 'info below error_log\'s level: no line');
is($d6 - $d5, 0, 'info below error_log\'s level: nothing counted');

$t->stop;

finish();
