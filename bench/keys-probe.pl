#!/usr/bin/perl

# keys-probe.pl PORT SECONDS [HEADER]
#
# One client, one request after the other on a keep-alive connection, for
# SECONDS: the latency of each, so that a pause of the server shows as one
# slow request (wrk, which saturates the CPUs, mixes pauses with the CPU
# share).  Prints n, p50, p99, p99.9, max and the five slowest.

use strict;
use warnings;

use IO::Socket::INET;
use Time::HiRes qw(time);

my ($port, $seconds, $header) = @ARGV;
die "usage: $0 PORT SECONDS [HEADER]\n" unless $port && $seconds;
$header //= 'X-Api-Key: bench-key-4242';

my $req = "GET / HTTP/1.1\r\nHost: probe\r\n$header\r\n\r\n";
my ($s, @lat);

sub conn {
    $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Proto => 'tcp')
        or die "connect: $!\n";
    $s->autoflush(1);
}

conn();
my $end = time + $seconds;

REQ: while (time < $end) {
    my $t0 = time;
    my $buf = '';

    if (!defined syswrite($s, $req)) {
        conn();
        next;
    }

    # the response: headers and a Content-Length body
    while (1) {
        my $n = sysread($s, $buf, 65536, length $buf);
        if (!$n) {
            conn();
            next REQ;
        }
        my $h = index($buf, "\r\n\r\n");
        next if $h < 0;
        my ($cl) = substr($buf, 0, $h) =~ /Content-Length: (\d+)/i;
        last if length($buf) >= $h + 4 + ($cl // 0);
    }

    push @lat, [ $t0, (time - $t0) * 1000 ];
    conn() if $buf =~ /^Connection: close/mi;
}

my @s = sort { $a <=> $b } map { $_->[1] } @lat;
my $n = @s;
printf "n=%d p50=%.3fms p99=%.3fms p99.9=%.3fms max=%.3fms\n", $n,
    $s[int($n * 0.5)], $s[int($n * 0.99)], $s[int($n * 0.999)], $s[-1];
printf "slowest: %s\n", join ', ',
    map { sprintf '%.1fms', $_->[1] }
    (sort { $b->[1] <=> $a->[1] } @lat)[0 .. 4];
