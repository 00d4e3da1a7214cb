# Shared by t/ui*.t: the Granular Usage page (ui/) in headless Chromium,
# driven by t/ui/drive.py (python3-selenium, chromium-driver), against a
# real nginx started by LLMLimit::Test.
#
#   ui_skip_reason()              why the browser tests cannot run, or undef
#   ui_drive($t, @steps)          drive.py over the steps; its observations
#   ui_drive_port($t, $port, @steps)  the same on another port of $t
#   ui_console_clean($o, $name, @statuses)
#                                 no console entry but network ones of those
#                                 HTTP statuses (a 403 the page expects)
#   ui_rows($o)                   { group => [requests, rejected] } of the table
#   ui_csv_sums($text, $group_by) the same summed from a CSV export

use strict;
use warnings;
use File::Temp qw(tempdir);
use JSON::PP ();
use Test::More;

our $PYTHON = '/usr/bin/python3';     # Debian's, with python3-selenium
our $DRIVE  = "$LLMLimit::Test::ROOT/t/ui/drive.py";
our $UI_DIR;

sub ui_skip_reason {
    return 'needs Debian\'s chromium (make test installs it)'
        unless -x '/usr/bin/chromium';
    return 'needs chromium-driver (make test installs it)'
        unless -x '/usr/bin/chromedriver';
    my ($rc) = LLMLimit::Test::run_cmd($PYTHON, '-c', 'import selenium');
    return 'needs python3-selenium (make test installs it)' if $rc != 0;
    return undef;
}


# a directory for the plan, the observations and the screenshots, kept
# after the run (the test prints the screenshots' paths)
sub ui_dir {
    $UI_DIR //= tempdir('llmlimit-ui-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    return $UI_DIR;
}


sub ui_drive {
    my ($t, @steps) = @_;
    return ui_drive_port($t, $t->port, @steps);
}


# the same on another port of the instance
sub ui_drive_port {
    my ($t, $port, @steps) = @_;

    my $dir = ui_dir();
    my $n = 1 + (() = glob("$dir/plan-*.json"));
    my $plan = "$dir/plan-$n.json";
    my $out = "$dir/out-$n.json";
    my $js = JSON::PP->new->utf8->canonical;

    open my $fh, '>', $plan or die "$plan: $!";
    print $fh $js->encode({ base => "http://127.0.0.1:$port",
                            dir => $dir, steps => \@steps });
    close $fh;

    my ($rc, $text) = LLMLimit::Test::run_cmd($PYTHON, $DRIVE, $plan, $out);
    is($rc, 0, "drive.py ran ($plan)") or diag($text);

    my $r = LLMLimit::Test::json_decode(LLMLimit::Test::slurp($out) // '')
        // { steps => [] };
    my @obs = @{ $r->{steps} };
    for my $o (@obs) {
        ok(!$o->{exception}, "$o->{name}: the browser did it")
            or diag($o->{exception});
    }
    return @obs;
}


sub ui_console_clean {
    my ($o, $name, @statuses) = @_;

    my @bad;
    for my $e (@{ $o->{console} || [] }) {
        next if $e->{level} ne 'SEVERE' && $e->{level} ne 'WARNING';
        my $expected = grep {
            $e->{source} eq 'network'
            && $e->{message} =~ /status of $_ /
        } @statuses;
        push @bad, "$e->{level} $e->{source}: $e->{message}"
            unless $expected;
    }
    ok(!@bad, "$name: no JavaScript error or warning in the console")
        or diag(join("\n", @bad));
}


sub num { my ($s) = @_; $s =~ s/,//g; return $s + 0 }

sub ui_rows {
    my ($o) = @_;
    return { map { ($_->{group} => [ num($_->{requests}),
                                     num($_->{rejected}) ]) }
             @{ $o->{rows} || [] } };
}


# RFC 4180 fields of one CSV text
sub csv_records {
    my ($text) = @_;
    my (@records, @f, $field);
    my $i = 0;
    my $len = length $text;
    $field = '';
    while ($i < $len) {
        my $c = substr($text, $i, 1);
        if ($c eq '"') {
            my $j = $i + 1;
            while ($j < $len) {
                if (substr($text, $j, 1) eq '"') {
                    last if substr($text, $j + 1, 1) ne '"';
                    $field .= '"';
                    $j += 2;
                    next;
                }
                $field .= substr($text, $j, 1);
                $j++;
            }
            $i = $j + 1;
        } elsif ($c eq ',') {
            push @f, $field;
            $field = '';
            $i++;
        } elsif ($c eq "\r" || $c eq "\n") {
            push @f, $field;
            push @records, [@f];
            @f = ();
            $field = '';
            $i++;
            $i++ if $c eq "\r" && substr($text, $i, 1) eq "\n";
        } else {
            $field .= $c;
            $i++;
        }
    }
    if (@f || length $field) {
        push @f, $field;
        push @records, [@f];
    }
    return @records;
}


my %CSV_GROUP = (workspace => 'Workspace ID', project => 'Project ID',
                 user => 'User ID', api_key => 'API Key Short Key');

sub ui_csv_sums {
    my ($text, $group_by) = @_;
    my ($head, @rows) = csv_records($text // '');
    return {} unless $head;
    my %col = map { ($head->[$_] => $_) } 0 .. $#$head;
    my %sum;
    for my $r (@rows) {
        my $g = $r->[ $col{ $CSV_GROUP{$group_by} } // 0 ];
        $sum{$g}[0] += $r->[ $col{Requests} // 0 ];
        $sum{$g}[1] += $r->[ $col{Rejected} // 0 ];
    }
    return \%sum;
}

our @CSV_COLUMNS = ('Time Bucket Start', 'Time Bucket End', 'Workspace ID',
    'Workspace Name', 'Project ID', 'Project Name', 'User ID', 'User Email',
    'API Key Short Key', 'Requests', 'Rejected', 'Tokens');

sub ui_csv_header {
    my ($text) = @_;
    my ($head) = csv_records($text // '');
    return join ',', @{ $head || [] };
}

1;
