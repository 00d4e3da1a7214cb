#!/usr/bin/perl
# bench/fill.pl PORT N forward|reverse
# Sends one request per identity (x-api-key: fill-<i>, i = 1..N, or N..1)
# over one keep-alive connection to 127.0.0.1:PORT, pipelined in batches,
# and prints how the responses were answered: "s2xx=.. s429=.. other=..".

use strict;
use warnings;
use IO::Socket::INET;

my ($port, $n, $order) = @ARGV;
die "usage: fill.pl PORT N forward|reverse\n"
    unless $port && $n && $order && $order =~ /^(forward|reverse)$/;

my $batch = 200;
my %count = (s2xx => 0, s429 => 0, other => 0);
my $sock;
my $buf = '';

sub connect_once {
    $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp')
        or die "fill.pl: connect 127.0.0.1:$port: $!\n";
    $buf = '';
}

sub fill_buf {
    my $r = sysread($sock, $buf, 65536, length $buf);
    die "fill.pl: read: " . (defined $r ? "connection closed" : $!) . "\n"
        unless $r;
}

# reads one response, returns its status
sub response {
    my $end;
    fill_buf() while ($end = index($buf, "\r\n\r\n")) < 0;
    my $head = substr($buf, 0, $end + 4, '');
    my ($status) = $head =~ m{^HTTP/1\.\d (\d{3})} or die "fill.pl: bad response\n";

    if ($head =~ /^content-length:\s*(\d+)/mi) {
        my $len = $1;
        fill_buf() while length $buf < $len;
        substr($buf, 0, $len, '');
    } elsif ($head =~ /^transfer-encoding:\s*chunked/mi) {
        while (1) {
            my $e;
            fill_buf() while ($e = index($buf, "\r\n")) < 0;
            my $size = hex substr($buf, 0, $e);
            fill_buf() while length $buf < $e + 2 + $size + 2;
            substr($buf, 0, $e + 2 + $size + 2, '');
            last if $size == 0;
        }
    }
    return $status;
}

connect_once();

my @ids = $order eq 'forward' ? (1 .. $n) : reverse(1 .. $n);

while (@ids) {
    my @b = splice @ids, 0, $batch;
    my $req = join '', map {
        "GET /fill HTTP/1.1\r\nHost: api.bench.test\r\n"
        . sprintf("x-api-key: fill-%08d\r\n\r\n", $_)
    } @b;
    my $off = 0;
    while ($off < length $req) {
        my $w = syswrite($sock, $req, length($req) - $off, $off);
        die "fill.pl: write: $!\n" unless defined $w;
        $off += $w;
    }
    for (@b) {
        my $s = response();
        if ($s =~ /^2/) { $count{s2xx}++ }
        elsif ($s == 429) { $count{s429}++ }
        else { $count{other}++ }
    }
}

print join(' ', map { "$_=$count{$_}" } qw(s2xx s429 other)), "\n";
