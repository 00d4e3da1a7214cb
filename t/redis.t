# The Redis store: counting lands in Redis under the prefix with no identity
# in clear, the same answers as shared memory, two nginx instances sharing
# one budget, AUTH, redis_db, a unix socket, the script evicted mid-run.
# Each part starts its own redis-server.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/redis-lib.pl";

plan skip_all => 'redis-server not installed' unless LLMLimit::Redis::available();

# generous for the cases that must reach Redis (valgrind is slow)
my $TMO = int(1000 * slow()) . 'ms';

my $SERVER = q{
    llmlimit api;

    location / {
        add_header X-Status $llmlimit_status always;
        proxy_pass http://%%BACKEND%%;
    }
    location /plain/ {
        llmlimit off;
        proxy_pass http://%%BACKEND%%;
    }
};


sub statuses {
    my ($conn, $spec, $n, %o) = @_;
    return map { my $r = $conn->req($spec, %o); $r } 1 .. $n;
}


sub hdr_list {
    my ($name, @r) = @_;
    return join ' ', map { $_->header($name) // '-' } @r;
}


# ---------------------------------------------------------------------------
# counting lands in Redis, keys hashed under the prefix

{
    my $rd = LLMLimit::Redis->new;

    my $t = LLMLimit::Test->new(
        name   => 'redis counting',
        http   => qq{
            llmlimit_zone rz 1m redis=} . $rd->addr . qq{ redis_prefix=tst:
                          redis_timeout=$TMO redis_failure=closed;
            llmlimit_rules api zone=rz {
                "Run query (API)"  POST  /runs/query  \$http_x_api_key  5/1h;
                "Info"             GET   /info        \$http_x_api_key  3/1h,10/1d;
            }
        },
        config => $SERVER,
    )->start;

    my $key = uid('secret-api-key');
    my %h = (headers => { 'X-Api-Key' => $key });

    # watch every command nginx sends
    my $mon = $rd->send_only('MONITOR');
    LLMLimit::Redis::read_reply($mon);

    my $c = $t->conn;
    my @r = statuses($c, 'POST /runs/query', 6, %h);

    is(join(' ', map { $_->status } @r), '200 200 200 200 200 429',
       'five pass, the sixth is rejected');
    is(hdr_list('X-RateLimit-Remaining', @r), '4 3 2 1 0 0',
       'remaining counts down');
    is(hdr_list('X-Status', @r), 'PASSED PASSED PASSED PASSED PASSED REJECTED',
       '$llmlimit_status');
    like($r[5]->header('Retry-After') // '', qr/^[1-9]\d*$/, 'Retry-After');

    my @info = statuses($c, 'GET /info', 4, %h);
    is(join(' ', map { $_->status } @info), '200 200 200 429',
       'two limits: the smaller one rejects');

    my @keys = $rd->keys;
    is(scalar(@keys), 3, 'three counters in Redis') or diag("@keys");
    is(scalar(grep { /^tst:\{[0-9a-f]{32}\}:(3600000|86400000):s\d+$/ }
              @keys),
       scalar(@keys), 'keys are PREFIX{hash}:PERIOD:sWINDOW') or diag("@keys");

    my %tags;
    $tags{ (/\{(.*)\}/)[0] }++ for @keys;
    ok((grep { $_ == 2 } values %tags),
       'the two limits of one budget share a hash tag');

    my @values = map { $rd->cmd('GET', $_) } @keys;
    ok((grep { $_ eq '5' } @values), 'the query budget holds 5')
        or diag("@values");

    my @ttl = map { $rd->cmd('PTTL', $_) } @keys;
    ok(!(grep { $_ <= 0 || $_ > 2 * 86400000 } @ttl), 'keys have TTLs')
        or diag("@ttl");

    # what MONITOR saw
    $mon->blocking(0);
    sleep 0.2;
    my $seen = '';
    while (sysread($mon, my $chunk, 65536)) {
        $seen .= $chunk;
    }
    close $mon;

    like($seen, qr/"EVALSHA"/, 'MONITOR saw EVALSHA');

    my $stats = $rd->cmd('INFO', 'commandstats');
    like($stats, qr/cmdstat_script\|load:calls=1,/, 'one SCRIPT LOAD')
        or diag($stats);
    like($stats, qr/cmdstat_evalsha:calls=10,/, 'one EVALSHA per request')
        or diag($stats);

    ok(index($seen, $key) < 0, 'the identity was never sent to Redis');
    ok(!(grep { index($_, $key) >= 0 } @keys, @values),
       'the identity is in no key and no value');
    ok(index($t->error_log, $key) < 0, 'nor in error.log');

    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# the same answers as the shared-memory store, for each algorithm

{
    my $rd = LLMLimit::Redis->new;

    my $http = '';
    for my $alg (qw(sliding fixed gcra)) {
        for my $z (qw(r s)) {
            $http .= qq{
                llmlimit_rules $alg$z zone=$z algorithm=$alg {
                    "C"  GET  /$alg/*  \$http_x_api_key  4/1h,6/1d;
                }
            };
        }
    }

    my $t = LLMLimit::Test->new(
        name   => 'redis as shm',
        http   => qq{
            llmlimit_zone r 1m redis=} . $rd->addr . qq{ redis_timeout=$TMO
                          redis_failure=closed;
            llmlimit_zone s 1m;
            $http
        },
        config => join('', map {
            my $alg = $_;
            map {
                qq{
                    location /$alg/$_ {
                        llmlimit $alg$_;
                        proxy_pass http://%%BACKEND%%;
                    }
                }
            } qw(r s)
        } qw(sliding fixed gcra)),
    )->start;

    my $c = $t->conn;

    for my $alg (qw(sliding fixed gcra)) {
        my $key = uid();
        my %h = (headers => { 'X-Api-Key' => $key });
        my (@r, @s);

        for (1 .. 6) {
            push @r, $c->req("GET /$alg/r", %h);
            push @s, $c->req("GET /$alg/s", %h);
        }

        is(join(' ', map { $_->status } @r), join(' ', map { $_->status } @s),
           "$alg: same statuses");
        is(hdr_list('X-RateLimit-Remaining', @r),
           hdr_list('X-RateLimit-Remaining', @s), "$alg: same remaining");

        my @d = map {
            abs(($r[$_]->header('X-RateLimit-Reset') // 0)
                - ($s[$_]->header('X-RateLimit-Reset') // 0))
        } 0 .. $#r;
        ok(!(grep { $_ > 1 } @d), "$alg: same reset, within a second")
            or diag(hdr_list('X-RateLimit-Reset', @r) . ' / '
                    . hdr_list('X-RateLimit-Reset', @s));
    }

    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# two nginx instances, two workers each, one Redis, one prefix: exactly
# COUNT pass together

{
    my $rd = LLMLimit::Redis->new;
    my $COUNT = 50;

    my $http = qq{
        llmlimit_zone rz 1m redis=} . $rd->addr . qq{ redis_prefix=shared:
                      redis_timeout=$TMO redis_failure=closed;
        llmlimit_rules api zone=rz {
            "Q"  POST  /q  \$http_x_api_key  $COUNT/1h;
        }
    };

    my @t = map {
        LLMLimit::Test->new(name => "instance $_", http => $http,
                            config => $SERVER, workers => 2)->start
    } 1 .. 2;

    my $key = uid();
    my @ports = map { $_->port } @t;

    my @res = parallel(8, sub {
        my ($i) = @_;
        my $c = LLMLimit::Test::Conn->new(port => $ports[$i % 2]);
        my %n;
        for (1 .. 25) {
            my $r = $c->req('POST /q', headers => { 'X-Api-Key' => $key });
            $n{ $r->status }++;
        }
        return \%n;
    });

    my %sum;
    for my $n (@res) {
        $sum{$_} += $n->{$_} for keys %$n;
    }

    is($sum{200} // 0, $COUNT, "exactly $COUNT admitted by the two instances")
        or diag(explain(\@res));
    is($sum{429} // 0, 8 * 25 - $COUNT, 'the rest rejected');

    for my $t (@t) {
        my $r = $t->req('POST /q', headers => { 'X-Api-Key' => $key });
        is($r->status . ' ' . ($r->header('X-Status') // '-'),
           '429 REJECTED', 'the budget is spent for instance ' . $t->{name});
    }

    $_->stop for @t;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# AUTH with the right password, a wrong one, none

{
    my $rd = LLMLimit::Redis->new(requirepass => 'right-pass-9f3');

    my $zone = sub {
        my ($extra) = @_;
        return qq{
            llmlimit_zone rz 1m redis=} . $rd->addr . qq{ $extra
                          redis_timeout=$TMO redis_failure=open;
            llmlimit_rules api zone=rz {
                "Q"  POST  /q  \$http_x_api_key  3/1h;
            }
            llmlimit api;
        };
    };

    my $t = LLMLimit::Test->new(name => 'auth right',
                                http => $zone->('redis_password=right-pass-9f3'),
                                config => $SERVER)->start;

    my @r = statuses($t->conn, 'POST /q', 4,
                     headers => { 'X-Api-Key' => uid() });
    is(join(' ', map { $_->status } @r), '200 200 200 429',
       'right password: limited');
    is(hdr_list('X-Status', @r), 'PASSED PASSED PASSED REJECTED',
       'right password: decided by Redis');
    my @k = $rd->keys;
    ok(@k > 0, 'right password: keys in Redis');
    $t->stop;

    for my $case (['wrong', 'redis_password=wrong-pass-77a', qr/AUTH failed/],
                  ['none', '', qr/NOAUTH/])
    {
        my ($name, $opt, $re) = @$case;

        my $t2 = LLMLimit::Test->new(name => "auth $name",
                                     http => $zone->($opt),
                                     config => $SERVER)->start;

        my @r2 = statuses($t2->conn, 'POST /q', 5,
                          headers => { 'X-Api-Key' => uid() });
        is(join(' ', map { $_->status } @r2), '200 200 200 200 200',
           "$name password: failure policy open lets requests through");
        is(hdr_list('X-Status', @r2), 'ERROR ERROR ERROR ERROR ERROR',
           "$name password: \$llmlimit_status ERROR");

        sleep 0.5;    # a few reconnect attempts

        my $log = $t2->error_log;
        my @lost = $log =~ /redis \S+ lost/g;
        is(scalar(@lost), 1, "$name password: lost logged once")
            or diag($log);
        like($log, $re, "$name password: the reason is logged");
        ok(index($log, 'wrong-pass-77a') < 0
           && index($log, 'right-pass-9f3') < 0,
           "$name password: no password in the log");

        $t2->stop;
    }

    $rd->stop;
}


# ---------------------------------------------------------------------------
# redis_db, and a unix socket

{
    my $rd = LLMLimit::Redis->new(unix => 1);

    my $t = LLMLimit::Test->new(
        name   => 'redis_db and unix',
        http   => qq{
            llmlimit_zone tcp 1m redis=} . $rd->addr . qq{ redis_db=5
                          redis_prefix=db5: redis_timeout=$TMO
                          redis_failure=closed;
            llmlimit_zone sock 1m redis=unix:} . $rd->unix . qq{
                          redis_prefix=sock: redis_timeout=$TMO
                          redis_failure=closed;
            llmlimit_rules a zone=tcp {
                "A"  GET  /a  \$http_x_api_key  2/1h;
            }
            llmlimit_rules b zone=sock {
                "B"  GET  /b  \$http_x_api_key  2/1h;
            }
        },
        config => q{
            add_header X-Status $llmlimit_status always;
            location /a { llmlimit a; proxy_pass http://%%BACKEND%%; }
            location /b { llmlimit b; proxy_pass http://%%BACKEND%%; }
        },
    )->start;

    my $c = $t->conn;

    for my $p (qw(a b)) {
        my @r = statuses($c, "GET /$p", 3,
                         headers => { 'X-Api-Key' => uid() });
        is(join(' ', map { $_->status } @r), '200 200 429', "/$p limited");
        is(hdr_list('X-Status', @r), 'PASSED PASSED REJECTED',
           "/$p decided by Redis");
    }

    my @db0 = $rd->keys;
    my @db5 = $rd->keys(db => 5);

    ok((grep { /^db5:/ } @db5), 'redis_db=5: keys in database 5')
        or diag("db5: @db5");
    ok(!(grep { /^db5:/ } @db0), 'redis_db=5: none in database 0');
    ok((grep { /^sock:/ } @db0), 'unix socket: keys in database 0')
        or diag("db0: @db0");

    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# the requests of one event-loop turn go out together: one EVALSHA for up
# to 64 requests, each request counted on its own, in order

{
    my $rd = LLMLimit::Redis->new;
    my ($N, $COUNT) = (100, 70);

    my $t = LLMLimit::Test->new(
        name   => 'one call per turn',
        http   => qq{
            llmlimit_zone rz 1m redis=} . $rd->addr . qq{ redis_timeout=$TMO
                          redis_failure=closed;
            llmlimit_rules api zone=rz {
                "Q"  POST  /q  \$http_x_api_key  $COUNT/1h;
                "P"  POST  /p  \$http_x_api_key  1/1h;
            }
        },
        config => $SERVER,
    )->start;

    my $key = uid();
    my @c = map { LLMLimit::Test::Conn->new(port => $t->port) } 1 .. $N;

    # kept-alive connections first, then all requests while the worker is
    # stopped: it reads them in one turn of its event loop
    $_->req('GET /plain/') for @c;

    my ($worker) = $t->workers;
    $rd->cmd('CONFIG', 'RESETSTAT');

    my @r = LLMLimit::Redis::one_turn($worker, \@c,
        "POST /q HTTP/1.1\r\nHost: localhost\r\nX-Api-Key: $key\r\n\r\n");

    my @pass = grep { $_->status == 200 } @r;
    is(scalar(@pass), $COUNT, "$N requests in one turn: exactly $COUNT pass");
    is(scalar(grep { $_->status == 429 } @r), $N - $COUNT, 'the rest 429');
    is(join(' ', sort { $a <=> $b }
                 map { $_->header('X-RateLimit-Remaining') // '-' } @pass),
       join(' ', 0 .. $COUNT - 1), 'each counted once, one after the other');
    is(hdr_list('X-Status', @r),
       join(' ', map { $_->status == 200 ? 'PASSED' : 'REJECTED' } @r),
       'all decided by Redis');

    my $stats = $rd->cmd('INFO', 'commandstats');
    like($stats, qr/cmdstat_evalsha:calls=2,/,
         "$N requests of one turn: two EVALSHA (64 requests at most each)")
        or diag($stats);

    # different keys in one call: a rejected request does not stop others
    my @keys = map { uid() } 1 .. 10;
    @r = LLMLimit::Redis::one_turn($worker, [ @c[0 .. 19] ], sub {
        "POST /p HTTP/1.1\r\nHost: localhost\r\nX-Api-Key: "
        . $keys[$_[0] % 10] . "\r\n\r\n";
    });
    is(join(' ', map { $_->status } @r),
       join(' ', (200) x 10, (429) x 10),
       'one call, ten keys twice: the first of each passes');

    $stats = $rd->cmd('INFO', 'commandstats');
    like($stats, qr/cmdstat_evalsha:calls=3,/, 'in one EVALSHA')
        or diag($stats);
    unlike($t->error_log, qr/redis .* lost/, 'nothing lost');

    $_->close for @c;
    $t->stop;
    $rd->stop;
}


# ---------------------------------------------------------------------------
# SCRIPT FLUSH mid-run: NOSCRIPT is recovered without failing requests

{
    my $rd = LLMLimit::Redis->new;

    my $t = LLMLimit::Test->new(
        name   => 'script flush',
        http   => qq{
            llmlimit_zone rz 1m redis=} . $rd->addr . qq{ redis_timeout=$TMO
                          redis_failure=closed;
            llmlimit_rules api zone=rz {
                "Q"  POST  /q  \$http_x_api_key  10/1h;
            }
        },
        config => $SERVER,
        workers => 2,
    )->start;

    my %h = (headers => { 'X-Api-Key' => uid() });
    my @r;

    for my $round (1 .. 3) {
        push @r, statuses($t->conn, 'POST /q', 2, %h);
        push @r, statuses($t->conn(from => '127.0.0.2'), 'POST /q', 1, %h);
        is_deeply($rd->cmd('SCRIPT', 'FLUSH'), 'OK', "SCRIPT FLUSH $round");
    }

    push @r, statuses($t->conn, 'POST /q', 2, %h);

    is(join(' ', map { $_->status } @r), join(' ', (200) x 10, 429),
       'no request failed');
    is(hdr_list('X-RateLimit-Remaining', @r), '9 8 7 6 5 4 3 2 1 0 0',
       'every request was counted once, in Redis');
    is(hdr_list('X-Status', @r), join(' ', ('PASSED') x 10, 'REJECTED'),
       'all decided by Redis');
    unlike($t->error_log, qr/redis .* lost/, 'nothing lost');

    $t->stop;
    $rd->stop;
}


finish();
