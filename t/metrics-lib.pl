# Helpers for the metrics tests (t/metrics*.t): the exposition parsed, the
# path of a program, promtool on a scrape.
#
#   require "$FindBin::Bin/metrics-lib.pl";
#   my %v = metrics_values($text);          # 'name{labels}' => value
#   my %s = metrics_series($text, 'llmlimit_requests_total');
#                                           # 'labels' => value
#   my $promtool = which('promtool');       # undef if not installed
#   my ($rc, $out) = promtool_check($promtool, $text);
#
# Only core Perl.

use strict;
use warnings;
use File::Temp ();


# every sample of the exposition
sub metrics_values {
    my ($text) = @_;
    my %v;

    for my $line (split /\n/, $text) {
        next if $line =~ /^#/ || $line !~ /\S/;
        $line =~ /^(\S+?(?:\{.*\})?) (\S+)$/ or next;
        $v{$1} = $2;
    }

    return %v;
}


# the samples of one metric, by their labels
sub metrics_series {
    my ($text, $name) = @_;
    my %v;

    for my $line (split /\n/, $text) {
        $v{$1} = $2 if $line =~ /^\Q$name\E\{(.*)\} (\S+)$/;
    }

    return %v;
}


sub which {
    my ($prog) = @_;

    for my $dir (split /:/, ($ENV{PATH} // '') . ':/usr/bin:/usr/sbin') {
        return "$dir/$prog" if $dir ne '' && -x "$dir/$prog";
    }

    return undef;
}


# promtool check metrics, reading the exposition from its standard input
sub promtool_check {
    my ($promtool, $text) = @_;

    my $in = File::Temp->new(TEMPLATE => 'llmlimit-scrape-XXXXXX',
                             TMPDIR => 1);
    print $in $text;
    close $in;

    my $out = `$promtool check metrics < $in 2>&1`;

    return ($? >> 8, $out);
}


1;
