# llmlimit_zone's redis options: nginx -t accepts the good forms and names
# the bad value, file and line of each bad one.  No Redis is needed: the
# address is only resolved, never connected to, by nginx -t.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;


sub zone_conf {
    my ($params) = @_;
    return qq{
        llmlimit_zone z 1m $params;
        llmlimit_rules api zone=z {
            "Q"  *  *  \$binary_remote_addr  10/1m;
        }
    };
}


my @good = (
    'redis=127.0.0.1:6379',
    'redis=127.0.0.1',
    'redis=localhost:6380',
    'redis=[::1]:6379',
    'redis=unix:/run/redis/redis.sock',
    'redis=127.0.0.1:6379 redis_db=15 redis_password=s3cret '
        . 'redis_timeout=250ms redis_prefix=app:rl: redis_failure=open',
    'redis=127.0.0.1:6379 redis_timeout=2s redis_failure=closed',
    'redis=127.0.0.1:6379 redis_failure=local redis_prefix=',
    'redis_failure=open redis=127.0.0.1:6379',
    'redis_sentinel=127.0.0.1:26379,127.0.0.1:26380,[::1] redis_master=mymaster',
    'redis_master=m redis_sentinel=127.0.0.1 redis_db=2 redis_failure=closed',
);

for my $p (@good) {
    my $r = nginx_t(http => zone_conf($p));
    is($r->{rc}, 0, "accepted: $p") or diag($r->{out});
}


my @bad = (
    [ 'redis=',                               qr/invalid value "redis="/ ],
    [ 'redis=127.0.0.1:99999',                qr/invalid port/ ],
    [ 'redis=no-such-host.invalid:6379',      qr/host not found/ ],
    [ 'redis=127.0.0.1:6379/x',               qr/invalid host in "redis=/ ],
    [ 'redis=unix:/' . ('x' x 200),           qr/unix socket path too long/ ],
    [ 'redis=127.0.0.1 redis=127.0.0.2',      qr/duplicate parameter "redis=127.0.0.2"/ ],
    [ 'redis=127.0.0.1 redis_db=x',           qr/invalid value "redis_db=x"/ ],
    [ 'redis=127.0.0.1 redis_db=-1',          qr/invalid value "redis_db=-1"/ ],
    [ 'redis=127.0.0.1 redis_password=',      qr/invalid value "redis_password="/ ],
    [ 'redis=127.0.0.1 redis_timeout=0',      qr/invalid value "redis_timeout=0"/ ],
    [ 'redis=127.0.0.1 redis_timeout=fast',   qr/invalid value "redis_timeout=fast"/ ],
    [ 'redis=127.0.0.1 redis_failure=maybe',  qr/invalid value "redis_failure=maybe"/ ],
    [ 'redis=127.0.0.1 "redis_prefix=a{b}:"', qr/braces are not allowed in "redis_prefix=a\{b\}:"/ ],
    [ 'redis=127.0.0.1 redis_bogus=1',        qr/invalid parameter "redis_bogus=1"/ ],
    [ 'redis_master=m',                       qr/"redis_master=" of zone "z" requires "redis_sentinel="/ ],
    [ 'redis_sentinel=127.0.0.1',             qr/"redis_sentinel=" of zone "z" requires "redis_master="/ ],
    [ 'redis=127.0.0.1 redis_sentinel=127.0.0.1 redis_master=m',
                                              qr/"redis=" and "redis_sentinel=" of zone "z" exclude each other/ ],
    [ 'redis_sentinel= redis_master=m',       qr/invalid value "redis_sentinel="/ ],
    [ 'redis_sentinel=127.0.0.1,,127.0.0.2 redis_master=m',
                                              qr/invalid value "redis_sentinel=127.0.0.1,,127.0.0.2"/ ],
    [ 'redis_sentinel=127.0.0.1:99999 redis_master=m', qr/invalid port in "redis_sentinel=127.0.0.1:99999"/ ],
    [ 'redis_sentinel=unix:/tmp/s.sock redis_master=m', qr/invalid address "unix:\/tmp\/s.sock"/ ],
    [ 'redis_sentinel=127.0.0.1/x redis_master=m', qr/invalid host in "redis_sentinel=127.0.0.1\/x"/ ],
    [ 'redis_sentinel=127.0.0.1 redis_sentinel=127.0.0.2 redis_master=m',
                                              qr/duplicate parameter "redis_sentinel=127.0.0.2"/ ],
    [ 'redis_sentinel=127.0.0.1 redis_master=', qr/invalid value "redis_master="/ ],
    [ 'redis_sentinel=127.0.0.1 redis_master=a redis_master=b', qr/duplicate parameter "redis_master=b"/ ],
    [ 'redis_db=3',                           qr/require "redis="/ ],
    [ 'redis_failure=open',                   qr/require "redis="/ ],
);

for my $case (@bad) {
    my ($p, $re) = @$case;

    my $r = nginx_t(http => zone_conf($p));
    isnt($r->{rc}, 0, "rejected: $p");

    my $line = line_of($r->{conf}, 'llmlimit_zone z');
    like($r->{out}, qr/\[emerg\].*$re.* in \Q$r->{conf}\E:$line/,
         "names the value, file and line: $p") or diag($r->{out});
}


# the password is never echoed back, even when the line is rejected

my $r = nginx_t(http => zone_conf('redis=127.0.0.1 redis_password=pw-1x9 '
                                  . 'redis_db=bad'));
isnt($r->{rc}, 0, 'rejected');
unlike($r->{out}, qr/pw-1x9/, 'no password in the messages');

finish();
