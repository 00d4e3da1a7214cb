#!/usr/bin/perl

# usage-redis-fill.pl PREFIX KEYS DAYS | redis-cli --pipe
#
# What DAYS days of hourly usage of KEYS API keys flushed by llmlimit look
# like in Redis (see src/ngx_http_llmlimit_usage_redis.c): a hash per hour
# and per day with GROUP:r, GROUP:j and GROUP:t for every key, and the
# groups hash; the days end at the current hour.  For bench/usage.sh.

use strict;
use warnings;

my ($prefix, $keys, $days) = @ARGV;
die "usage: $0 PREFIX KEYS DAYS\n" unless $days;

binmode STDOUT;

sub cmd {
    my $s = '*' . scalar(@_) . "\r\n";
    $s .= '$' . length($_) . "\r\n$_\r\n" for @_;
    print $s;
}

sub uuid { sprintf '%08x-7c3b-4a5e-8f6d-%012x', $_[0], $_[1] }

my @gid = map { sprintf '%016x', 0x1000000 + $_ } 0 .. $keys - 1;

cmd('HSET', "${prefix}usage:groups", map {
    my @f = (uuid(int($_ / 10), 1), '', uuid(int($_ / 5), 2), '',
             uuid(int($_ / 2), 3), '', sprintf('lsv2_...%06d', $_));
    ($gid[$_], join('', map { length($_) . ":$_" } @f))
} 0 .. $keys - 1);

my $now = time;
my $last = $now - $now % 3600;
my %day;

for my $h (0 .. 24 * $days - 1) {
    my $t = $last - $h * 3600;
    my $d = $t - $t % 86400;
    cmd('HSET', "${prefix}usage:h:$t",
        map { ("$_:r" => 10, "$_:j" => 1, "$_:t" => 100) } @gid);
    $day{$d} += 1;
}

for my $d (keys %day) {
    cmd('HSET', "${prefix}usage:d:$d",
        map { ("$_:r" => 10 * $day{$d}, "$_:j" => $day{$d},
               "$_:t" => 100 * $day{$d}) } @gid);
}
