#!/usr/bin/perl

# keys-gen.pl N [full] > keys.json
#
# A key directory of N keys for llmlimit_keys measurements: keys
# "bench-key-<i>", given as their SHA-256, ten keys an organisation, plans
# in turn.  Without "full" an entry has sha256, plan, org and short_key
# (~140 bytes); with it every field (~330 bytes).

use strict;
use warnings;

use Digest::SHA qw(sha256_hex);

my ($n, $full) = @ARGV;
die "usage: $0 N [full]\n" unless defined $n && $n =~ /^\d+$/;
$full = defined $full && $full eq 'full';

my @plans = qw(hobby pro enterprise);

binmode STDOUT;
print "{\"keys\": [\n";

for my $i (0 .. $n - 1) {
    my $h = sha256_hex("bench-key-$i");
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
