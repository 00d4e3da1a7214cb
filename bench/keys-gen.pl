#!/usr/bin/perl

# keys-gen.pl N [full] [FORMAT] > keys.json
#
# A key directory of N keys for llmlimit_keys measurements: keys
# "bench-key-<i>" (or sprintf(FORMAT, i), i = 0 .. N - 1), given as their
# SHA-256, ten keys an organisation, plans in turn.  Without "full" an entry
# has sha256, plan, org and short_key (~140 bytes); with it every field
# (~330 bytes).  bench/run.sh gives the format of the x-api-key values of
# bench/requests.lua.

use strict;
use warnings;

use Digest::SHA qw(sha256_hex);

my ($n, @opt) = @ARGV;
die "usage: $0 N [full] [FORMAT]\n" unless defined $n && $n =~ /^\d+$/;
my $full = @opt && $opt[0] eq 'full' ? shift @opt : undef;
my $format = @opt ? shift @opt : 'bench-key-%d';
die "usage: $0 N [full] [FORMAT]\n" if @opt;

my @plans = qw(hobby pro enterprise);

binmode STDOUT;
print "{\"keys\": [\n";

for my $i (0 .. $n - 1) {
    my $h = sha256_hex(sprintf $format, $i);
    my $org = 'org-' . int($i / 10);
    my $e = sprintf '{"sha256":"%s","plan":"%s","org":"%s"', $h,
                    $plans[$i % 3], $org;

    if ($full) {
        $e .= sprintf ',"workspace":"%08x-7c3b-4a5e-8f6d-%012x",'
                      . '"workspace_name":"Workspace %d","project":"p-%d",'
                      . '"project_name":"Project %d","user":"u-%d",'
                      . '"user_email":"user%d@example.com"',
                      int($i / 10), int($i / 10), int($i / 10),
                      int($i / 5), int($i / 5), $i, $i;
    }

    $e .= sprintf ',"short_key":"bk-...%04d"}', $i % 10000;

    print $i ? ",\n" : '', $e;
}

print "\n]}\n";
