#!/usr/bin/perl

# The llmlimit_rules line grammar: `nginx -t` accepts every form of a
# rule line and rejects each malformed one with the file, the line and
# the offending token.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

# a configuration holding one rule line, in a table with or without plan=
sub table {
    my ($line, %o) = @_;
    my $plan = $o{plan} ? ' plan=$http_x_plan' : '';
    return qq{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z$plan {
            $line
        }
    };
}

# the line must be accepted
sub good {
    my ($line, %o) = @_;
    my $r = nginx_t(http => table($line, %o), config => 'llmlimit t;');
    is($r->{rc}, 0, "accepted: $line")
        or diag($r->{out});
}

# the line must be rejected with a message matching RE, at its line
sub bad {
    my ($line, $re, %o) = @_;
    my $r = nginx_t(http => table($line, %o), config => 'llmlimit t;');
    my $n = line_of($r->{conf}, $line);
    ok($r->{rc} != 0
       && $r->{out} =~ /\[emerg\] .*$re.* in \Q$r->{conf}\E:$n$/m,
       "rejected: $line")
        or diag("rc $r->{rc}, expected $re at line $n:\n$r->{out}");
}


# the forms that are valid

good('"Run query (API)"  POST  /runs/query  $http_x_api_key  15/10s;');
good('a  *  *  $binary_remote_addr  100/60s;');
good('a  GET  /info  $binary_remote_addr  unlimited;');
good('a  POST|PATCH|DELETE  */charts*  $http_x_api_key  750/600s;');
good('a  OPTIONS  */v1/metadata/submit  $binary_remote_addr  2000/10;');
good('a  GET  "/runs/{uuid}"  $http_x_api_key  30/60s;');
good('a  *  "/beta/pipes/{owner}/{pipe}"  $http_x_api_key  1/1s;');
good('a  *  "/a/{x}*"  $http_x_api_key  1/1s;');
good('a  *  "~^/api/v[0-9]+/items$"  $http_x_api_key  1/1s;');
good('a  *  "~*^/nocase"  $http_x_api_key  1/1s;');
good('a  *  *  $http_x_user_id:$remote_addr  1/1s,5000/30d;');
good('a  *  *  "u=${http_x_user_id}"  1/500ms;');
good('a  *  *  $http_x_api_key  536870911/365d;');
good('a  *  *  $http_x_api_key  1/1ms,2/8760h;');
good('a  *  *  $http_x_api_key  1/1s,2/2s,3/3s,4/4s,5/5s,6/6s,7/7s,8/8s;');
good('a  *  *  $http_authorization'
     . '  hobby=1/1s  pro=300/60s  enterprise=unlimited  10/60s;',
     plan => 1);
good('a  *  *  $http_authorization  10/60s  hobby=1/1s;', plan => 1);
good('"!!!"  *  *  $http_x_api_key  1/1s;');


# the number of tokens

bad('a  *  /info  $binary_remote_addr;',
    qr/invalid number of parameters in llmlimit rule "a"/);
bad('a;', qr/invalid number of parameters/);
bad('""  *  /info  $binary_remote_addr  1/1s;', qr/empty category/);


# METHODS

bad('a  FOO  /  $binary_remote_addr  1/1s;', qr/invalid method "FOO"/);
bad('a  get  /  $binary_remote_addr  1/1s;', qr/invalid method "get"/);
bad('a  GET||POST  /  $binary_remote_addr  1/1s;',
    qr/invalid methods "GET\|\|POST"/);
bad('a  GET|  /  $binary_remote_addr  1/1s;', qr/invalid methods "GET\|"/);
bad('a  GET|*  /  $binary_remote_addr  1/1s;', qr/invalid method "\*"/);


# PATH

bad('a  *  "/runs/{uuid"  $binary_remote_addr  1/1s;',
    qr/unbalanced "\{" in path "\/runs\/\{uuid"/);
bad('a  *  "/runs/uuid}"  $binary_remote_addr  1/1s;',
    qr/unbalanced "\}" in path "\/runs\/uuid\}"/);
bad('a  *  "/runs/{}"  $binary_remote_addr  1/1s;',
    qr/empty "\{\}" in path/);
bad('a  *  "/runs/{a{b}}"  $binary_remote_addr  1/1s;',
    qr/nested "\{" in path/);
bad('a  *  "/runs/x{id}"  $binary_remote_addr  1/1s;',
    qr/"\{id\}" is not a whole segment in path "\/runs\/x\{id\}"/);
bad('a  *  "/runs/{id}.json"  $binary_remote_addr  1/1s;',
    qr/"\{id\}" is not a whole segment/);
bad('a  *  runs  $binary_remote_addr  1/1s;', qr/invalid path "runs"/);
bad('a  *  ""  $binary_remote_addr  1/1s;', qr/invalid path ""/);
bad('a  *  "~"  $binary_remote_addr  1/1s;', qr/empty regex "~"/);
bad('a  *  "~^/(a"  $binary_remote_addr  1/1s;',
    qr/regex "\^\/\(a" does not compile: /);


# KEY

bad('a  *  /  abc  1/1s;', qr/key "abc" of llmlimit rule has no variables/);
bad('a  *  /  $1  1/1s;', qr/invalid variable "\$1" in key "\$1"/);


# LIMITS: each error names the range of COUNT (the Redis script keeps
# counts below 2^29) and of PERIOD

my $RANGE = 'expected COUNT/PERIOD with COUNT from 1 to 536870911, '
          . 'or COUNTtokens/PERIOD with COUNT from 1 to 2147483647, '
          . 'and PERIOD from 1ms to 365d, or "unlimited"';

sub bad_limit {
    my ($limits, $reason, %o) = @_;
    my $line = "a  *  /  \$binary_remote_addr  $limits;";
    my $item = $o{item} // $limits;
    bad($line, qr/\Qinvalid limit "$item" in llmlimit rule, $reason: $RANGE\E/,
        %o);
}

bad_limit('0/1s', 'COUNT out of range');
bad_limit('536870912/1s', 'COUNT out of range');
bad_limit('2147483648/1s', 'COUNT out of range');
bad_limit('99999999999/1s', 'COUNT out of range');
bad_limit('99999999999999999999999/1s', 'COUNT out of range');
bad_limit('-1/1s', 'COUNT is not a positive integer');
bad_limit('x/1s', 'COUNT is not a positive integer');
bad_limit('15/0s', 'PERIOD out of range');
bad_limit('15/0', 'PERIOD out of range');
bad_limit('1/366d', 'PERIOD out of range');
bad_limit('1/8761h', 'PERIOD out of range');
bad_limit('1/365d1ms', 'PERIOD out of range');
bad_limit('1/1x', 'PERIOD is not a time');
bad_limit('1/1.5s', 'PERIOD is not a time');
bad_limit('1/s', 'PERIOD is not a time');
bad_limit('15', 'not COUNT/PERIOD');
bad_limit('15/', 'not COUNT/PERIOD');
bad_limit('/1s', 'not COUNT/PERIOD');
bad_limit('1/1s,', 'not COUNT/PERIOD', item => '');
bad_limit('1/1s,0/60s', 'COUNT out of range', item => '0/60s');
bad_limit('hobby=1/0s  3/3s', 'PERIOD out of range', plan => 1,
          item => '1/0s');
bad_limit('2147483648tokens/1s', 'token COUNT out of range');
bad_limit('0tokens/1s', 'token COUNT out of range');
bad_limit('tokens/1s', 'COUNT is not a positive integer');
bad_limit('-5tokens/1s', 'COUNT is not a positive integer');
bad_limit('5token/1s', 'COUNT is not a positive integer');
bad_limit('5tokens/1x', 'PERIOD is not a time');
bad('a  *  /  $binary_remote_addr  10tokens/60s,20tokens/1m;',
    qr/duplicate period in limit "20tokens\/1m"/);
bad('a  *  /  $binary_remote_addr  10/60s,20/60s;',
    qr/duplicate period in limit "20\/60s" of "10\/60s,20\/60s"/);
bad('a  *  /  $binary_remote_addr  10/60s,20/1m;',
    qr/duplicate period in limit "20\/1m"/);
bad('a  *  /  $binary_remote_addr  1/1s,2/2s,3/3s,4/4s,5/5s,6/6s,7/7s,8/8s,9/9s;',
    qr/too many limits/);
bad('a  *  /  $binary_remote_addr  unlimited,1/1s;',
    qr/"unlimited" cannot be combined with other limits/);
bad('a  *  /  $binary_remote_addr  1/1s  2/2s;',
    qr/duplicate default limits "2\/2s"/);
bad('a  *  /  $binary_remote_addr  hobby=1/1s  2/2s;',
    qr/per-plan limits "hobby=1\/1s" need plan= on llmlimit_rules "t"/);
bad('a  *  /  $binary_remote_addr  hobby=1/1s  pro=300/60s;',
    qr/no default limits in llmlimit rule "a"/, plan => 1);
bad('a  *  /  $binary_remote_addr  hobby=1/1s  hobby=2/2s  3/3s;',
    qr/duplicate plan "hobby"/, plan => 1);
bad('a  *  /  $binary_remote_addr  =1/1s  3/3s;',
    qr/empty plan name in limits "=1\/1s"/, plan => 1);


finish();
