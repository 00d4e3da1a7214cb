package LLMLimit::Keys;

# Key directory files for the tests of llmlimit_keys: a directory the
# workers (nobody) can read, files written whole and renamed into place as
# a deployment would, SHA-256 in hex.

use strict;
use warnings;

use Carp qw(croak);
use Digest::SHA qw(sha256_hex);
use Exporter qw(import);
use File::Temp qw(tempdir);
use JSON::PP ();

our @EXPORT = qw(keys_dir keys_file write_keys write_raw sha256_hex
                 entries_json);

my $DIR;
my $SEQ = 0;


# a directory for key files, removed at the end
sub keys_dir {
    $DIR //= do {
        my $d = tempdir('llmlimit-keys-XXXXXX', TMPDIR => 1, CLEANUP => 1);
        chmod 0755, $d;
        $d;
    };
    return $DIR;
}


# a fresh file name in keys_dir()
sub keys_file {
    my ($name) = @_;
    $SEQ++;
    return keys_dir() . '/' . ($name // 'keys') . "-$$-$SEQ.json";
}


# {"keys": [...]} with one entry a line (entry N on line N + 1)
sub entries_json {
    my ($entries) = @_;
    my $js = JSON::PP->new->canonical;
    return "{\"keys\": [\n"
           . join(",\n", map { $js->encode($_) } @$entries)
           . "\n]}\n";
}


# write_keys(PATH, [ { key => ..., plan => ... }, ... ]): the directory,
# replaced whole (rename), readable by the workers
sub write_keys {
    my ($path, $entries) = @_;
    write_raw($path, entries_json($entries));
}


sub write_raw {
    my ($path, $text) = @_;
    my $tmp = "$path.tmp-$$";
    open my $fh, '>', $tmp or croak "$tmp: $!";
    print $fh $text;
    close $fh or croak "$tmp: $!";
    chmod 0644, $tmp;
    rename $tmp, $path or croak "rename $tmp: $!";
}


1;
