#!/usr/bin/perl

# usage-fill.pl PORT KEYS ROUNDS
#
# Fills a usage zone of bench/usage.sh (bucket=1s): in each second, one
# request for each of KEYS API keys (workspace, project and user of the key
# in the query string, as uuids), pipelined 500 at a time on one
# connection; so ROUNDS rounds make KEYS x ROUNDS buckets.  Prints the
# rounds that did not fit in their second (they would share buckets).

use strict;
use warnings;

use IO::Socket::INET;
use Time::HiRes qw(time sleep);

my ($port, $keys, $rounds) = @ARGV;
die "usage: $0 PORT KEYS ROUNDS\n" unless $rounds;

my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Proto => 'tcp')
    or die "connect: $!";
binmode $s;

sub uuid { sprintf '%08x-7c3b-4a5e-8f6d-%012x', $_[0], $_[1] }

my @req = map {
    my $k = $_;
    "GET /?w=" . uuid(int($k / 10), 1) . "&p=" . uuid(int($k / 5), 2)
    . "&u=" . uuid(int($k / 2), 3) . sprintf("&k=lsv2_...%06d", $k)
    . " HTTP/1.1\r\nHost: b\r\n\r\n"
} 0 .. $keys - 1;

my $late = 0;

for my $round (1 .. $rounds) {
    my $start = int(time) + 1;
    sleep($start - time + 0.02);

    for (my $i = 0; $i < $keys; $i += 500) {
        my $n = $keys - $i < 500 ? $keys - $i : 500;
        print $s join('', @req[$i .. $i + $n - 1]);
        my $got = 0;
        my $buf = '';
        while ($got < $n) {
            sysread($s, $buf, 1 << 20, length $buf) or die "read: $!";
            while ($buf =~ s/^(HTTP\/1\.1 [^\r]*\r\n(?:[^\r]+\r\n)*)\r\n//) {
                my $len = $1 =~ /^Content-Length: (\d+)/mi ? $1 : 0;
                while (length $buf < $len) {
                    sysread($s, $buf, 1 << 20, length $buf) or die "read: $!";
                }
                substr($buf, 0, $len) = '';
                $got++;
            }
        }
    }

    $late++ if time >= $start + 1;
}

print "rounds late: $late\n";
