#!/usr/bin/perl

# nginx -t and the key directory: every kind of bad file fails with
# [emerg], the file, the line in it and what is wrong, and the line of
# llmlimit_keys in nginx.conf; never the key itself.  Bad parameters; the
# good forms.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;
use LLMLimit::Keys;

my $SECRET = 'sk-secret-0123456789';

my $LOC = q{
    llmlimit_key  $http_x_api_key;
    location / { proxy_pass http://backend; }
};

sub conf_t {
    my ($file, $params, %o) = @_;
    $params //= '';
    return nginx_t(http => "\n    llmlimit_keys  $file $params;\n",
                   config => $LOC, main => $o{main} // '');
}

# a file with TEXT must fail at LINE (undef: no line) with RE
sub bad_file {
    my ($name, $text, $line, $re, %o) = @_;

    my $file = keys_file('bad');
    write_raw($file, $text) if defined $text;

    my $r = conf_t($file, $o{params});
    my $cline = line_of($r->{conf}, 'llmlimit_keys');
    my ($emerg) = $r->{out} =~ /^(.*\[emerg\].*)$/m;
    $emerg //= '';

    my $where = defined $line ? qr/"\Q$file\E", line $line: /
                              : qr/"\Q$file\E": /;

    ok($r->{rc} != 0 && $emerg =~ $where && $emerg =~ $re
       && $emerg =~ /in \Q$r->{conf}\E:$cline$/,
       "rejected: $name")
        or diag("expected line " . ($line // 'none') . " and $re:\n$r->{out}");

    unlike($r->{out}, qr/\Q$SECRET\E/, "$name: the key is not shown")
        if defined $text && index($text, $SECRET) >= 0;
}

sub good_file {
    my ($name, $text, %o) = @_;
    my $file = keys_file('good');
    write_raw($file, $text);
    my $r = conf_t($file, $o{params}, %o);
    is($r->{rc}, 0, "accepted: $name") or diag($r->{out});
}

sub bad_conf {
    my ($name, $params, $marker, $re, %o) = @_;
    my $file = keys_file('ok');
    write_keys($file, [ { key => 'a' } ]);
    my $r = conf_t($file, $params, %o);
    my $line = line_of($r->{conf}, $marker);
    my ($emerg) = $r->{out} =~ /^(.*\[emerg\].*)$/m;
    $emerg //= '';
    ok($r->{rc} != 0 && $emerg =~ $re && $emerg =~ /:$line\b/,
       "rejected: $name") or diag("expected line $line and $re:\n$r->{out}");
}


# --- not JSON, not the shape ----------------------------------------------------

bad_file('not JSON', "hello world\n", 1, qr/expected a JSON object/);
bad_file('not JSON on line 3',
         qq({"keys": [\n  {"key": "a"},\n  {"key": "b" "plan": "x"}\n]}\n),
         3, qr/'}' expected/);
bad_file('an unquoted key',
         qq({"keys": [\n  {"key": $SECRET}\n]}\n), 2, qr/invalid token/);
bad_file('a bad escape in a key',
         qq({"keys": [\n\n  {"key": "$SECRET\\q"}\n]}\n), 3,
         qr/invalid escape/);
bad_file('cut short', qq({"keys": [\n  {"key": "a"},\n), 3,
         qr/unexpected end of file/);
bad_file('empty', '', 1, qr/unexpected end of file/);
bad_file('an array', "[]\n", 1, qr/expected a JSON object/);
bad_file('no "keys"', qq({"version": 2}\n), 1, qr/no "keys" array/);
bad_file('"keys" not an array', qq({\n "keys": {"key": "a"}\n}\n), 2,
         qr/"keys" must be an array/);
bad_file('"keys" twice', qq({"keys": [],\n "keys": []}\n), 2,
         qr/duplicate "keys" member/);
bad_file('data after the object', qq({"keys": []}\n{}\n), 2,
         qr/unexpected data after the object/);
bad_file('an entry not an object', qq({"keys": [\n  "$SECRET"\n]}\n), 2,
         qr/a key must be an object/);


# --- entries ----------------------------------------------------------------------

bad_file('no key', qq({"keys": [\n {"key": "a"},\n {"plan": "pro"}\n]}\n), 3,
         qr/a key needs "key" or "sha256"/);
bad_file('key and sha256',
         qq({"keys": [\n {"key": "$SECRET", "sha256": "@{[ sha256_hex('x') ]}"}\n]}\n),
         2, qr/a key has both "key" and "sha256"/);
bad_file('an empty key', qq({"keys": [\n {"key": ""}\n]}\n), 2,
         qr/"key" must be a non-empty string/);
bad_file('a number for a key', qq({"keys": [\n {"key": 12345}\n]}\n), 2,
         qr/"key" must be a non-empty string/);
bad_file('sha256 too short',
         qq({"keys": [\n {"sha256": "@{[ substr(sha256_hex('x'), 1) ]}"}\n]}\n),
         2, qr/"sha256" must be 64 hexadecimal digits/);
bad_file('sha256 not hex',
         qq({"keys": [\n {"sha256": "@{[ 'g' x 64 ]}"}\n]}\n),
         2, qr/"sha256" must be 64 hexadecimal digits/);
bad_file('a number for a plan',
         qq({"keys": [\n {"key": "a",\n  "plan": 3}\n]}\n), 2,
         qr/"plan" must be a string/);
bad_file('an object for an org',
         qq({"keys": [\n {"key": "a", "org": {"id": 1}}\n]}\n), 2,
         qr/"org" must be a string/);
bad_file('an unknown field',
         qq({"keys": [\n {"key": "a", "orgs": "acme"}\n]}\n), 2,
         qr/unknown field "orgs"/);
bad_file('a field twice',
         qq({"keys": [\n {"key": "a", "plan": "pro", "plan": "hobby"}\n]}\n),
         2, qr/a field appears twice/);
bad_file('a field too long',
         qq({"keys": [\n {"key": "a", "user_email": "@{[ 'e' x 256 ]}"}\n]}\n),
         2, qr/"user_email" is longer than 255 bytes/);
bad_file('a control character',
         qq({"keys": [\n {"key": "a", "org": "acme\\r\\nX-Injected: 1"}\n]}\n),
         2, qr/"org" has a control character/);


# --- duplicate keys -----------------------------------------------------------------

bad_file('the same key twice',
         entries_json([ { key => 'a' }, { key => $SECRET }, { key => 'b' },
                        { key => $SECRET, plan => 'pro' } ]),
         5, qr/duplicate key, also at line 3/);
bad_file('a key in clear and hashed',
         entries_json([ { sha256 => sha256_hex($SECRET) }, { key => 'b' },
                        { key => $SECRET } ]),
         4, qr/duplicate key, also at line 2/);
bad_file('a digest in upper and lower case',
         entries_json([ { sha256 => sha256_hex('k') },
                        { sha256 => uc sha256_hex('k') } ]),
         3, qr/duplicate key, also at line 2/);


# --- the file itself --------------------------------------------------------------------

{
    # a sparse file: its size is refused before anything is read
    my $file = keys_file('big');
    open my $fh, '>', $file or die "$file: $!";
    truncate $fh, 100 * 1024 * 1024 or die "truncate: $!";
    close $fh;
    chmod 0644, $file;

    my $r = conf_t($file, 'max_size=64m');
    like($r->{out}, qr/\[emerg\].*"\Q$file\E": the file is 104857600 bytes, more than max_size=67108864/,
         'a 100 MB file over max_size=64m');

    truncate $file, 512 * 1024 * 1024 + 1 or die "truncate: $!";
    $r = conf_t($file);
    like($r->{out}, qr/\[emerg\].*"\Q$file\E": the file is 536870913 bytes, more than max_size=536870912/,
         'over the default max_size (512m)');
    unlink $file;
}

bad_file('no such file', undef, undef, qr/open\(\) failed \(2: No such file/);

{
    my $dir = keys_dir();
    my $r = conf_t($dir);
    like($r->{out}, qr/\[emerg\].*"\Q$dir\E": not a regular file/,
         'a directory');
}


# --- parameters -------------------------------------------------------------------------

bad_conf('check=abc', 'check=abc', 'llmlimit_keys',
         qr/invalid parameter "check=abc"/);
bad_conf('check=0', 'check=0', 'llmlimit_keys',
         qr/invalid parameter "check=0"/);
bad_conf('max_size=x', 'max_size=x', 'llmlimit_keys',
         qr/invalid parameter "max_size=x"/);
bad_conf('size too small', 'size=4k', 'llmlimit_keys',
         qr/invalid parameter "size=4k"/);
bad_conf('thread_pool=', 'thread_pool=', 'llmlimit_keys',
         qr/invalid parameter "thread_pool="/);
bad_conf('an unknown parameter', 'foo=1', 'llmlimit_keys',
         qr/invalid parameter "foo=1"/);
bad_conf('an unknown thread pool', 'thread_pool=nope', 'llmlimit_keys',
         qr/unknown thread pool "nope"/);
bad_conf('llmlimit_keys twice', '; llmlimit_keys /x.json', 'llmlimit_keys /x',
         qr/"llmlimit_keys" directive is duplicate/);

{
    my $file = keys_file('ok');
    write_keys($file, [ map { { key => "k$_", org => "org-$_" } } 1 .. 2000 ]);
    my $r = conf_t($file, 'size=32k');
    like($r->{out}, qr/\[emerg\].*2000 keys need size=\d+ at least/,
         'size= too small for the directory');

    $r = nginx_t(http => '', config => qq{
        llmlimit_keys  $file;
        location / { proxy_pass http://backend; }
    });
    like($r->{out}, qr/\[emerg\].*"llmlimit_keys" directive is not allowed here/,
         'llmlimit_keys in a server');
}


# --- the good forms ---------------------------------------------------------------------

good_file('no keys', qq({"keys": []}\n));
good_file('other members are ignored',
          qq({"version": 3, "generated": {"by": "x", "at": [1, 2]},\n)
          . qq( "keys": [ {"key": "a", "plan": null} ], "n": 1.5e3}\n));
good_file('white space', qq(\r\n\t{ "keys" :\n[\n{"key":"a"}\n,\n{"key":"b"} ]\n}\n\n));
good_file('UTF-8 values', qq({"keys": [{"key": "a", "workspace_name": "Équipe ☃", "user": "\\u00e9"}]}));
good_file('every parameter',
          entries_json([ { key => 'a', plan => 'pro' } ]),
          params => 'check=500ms max_size=1k size=2m thread_pool=off');
good_file('check=off', entries_json([ { key => 'a' } ]), params => 'check=off');
good_file('a thread pool of its own', entries_json([ { key => 'a' } ]),
          params => 'thread_pool=keys', main => 'thread_pool keys threads=1;');
{
    # relative to the configuration file's directory, as include
    my $t = LLMLimit::Test->new(http => q{ llmlimit_keys  keys.json; },
                                config => $LOC);
    write_keys($t->prefix . '/keys.json', [ { key => 'a' } ]);
    $t->write_conf;
    my ($rc, $out) = LLMLimit::Test::run_cmd($t->command('-t'));
    is($rc, 0, 'a file name relative to nginx.conf') or diag($out);
    $t->{tested} = 1;
}


finish();
