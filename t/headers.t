#!/usr/bin/perl

# The response: header modes (x, ietf, both, off), prefix=, reset=delta and
# epoch, Retry-After, the JSON 429 body (with a category that needs
# escaping), error_page 429, llmlimit_status 503, headers on whatever the
# content handler answered (proxied upstream, static file, errors), the
# upstream never seeing a rejected request, and an internal redirect not
# counting a request twice.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time);
use LLMLimit::Test;

my $HTTP = <<'EOF';
    llmlimit_zone  z 1m;
    llmlimit_rules t zone=z {
        "Run query (API)"  *  /q*    $http_x_api_key  3/10s;
        "A \"quoted\" back\\slash/ tab\tcat \u00e9 é <&>"  *  /esc  $http_x_api_key  1/60s;
    }
EOF

my $SERVER = <<'EOF';
    llmlimit t;

    location / {
        proxy_pass http://backend;
    }
    location /q/ietf {
        llmlimit_headers ietf;
        proxy_pass http://backend;
    }
    location /q/both {
        llmlimit_headers both;
        proxy_pass http://backend;
    }
    location /q/off {
        llmlimit_headers off;
        proxy_pass http://backend;
    }
    location /q/prefix {
        llmlimit_headers x prefix=lb-ratelimit;
        proxy_pass http://backend;
    }
    location /q/epoch {
        llmlimit_headers x reset=epoch;
        proxy_pass http://backend;
    }
    location /q/lbepoch {
        llmlimit_headers x prefix=lb-ratelimit reset=epoch;
        proxy_pass http://backend;
    }
    location /q/ep {
        error_page 429 /ratelimited;
        proxy_pass http://backend;
    }
    location = /ratelimited {
        internal;
        llmlimit off;
        default_type text/plain;
        return 200 "slow down\n";
    }
    location /q/503 {
        llmlimit_status 503;
        proxy_pass http://backend;
    }
    location /q/static {
        root html;
        try_files /ok.txt =404;
    }
    location /q/missing {
        root html;
    }
    location /q/err {
        proxy_pass http://127.0.0.1:%%PORT2%%;
    }
    location /q/redir {
        try_files /nonexistent @back;
    }
    location @back {
        proxy_pass http://backend;
    }
EOF

my $ERR_SERVER = q{
    server {
        listen 127.0.0.1:%%PORT2%%;
        location / {
            add_header X-Upstream err always;
            return 500 "upstream error\n";
        }
    }
};

my $CAT_ID = 'run-query-api';

my $t = LLMLimit::Test->new(http => $HTTP, config => $SERVER,
                            servers => $ERR_SERVER, nports => 1)->start;
my $c = $t->conn;

sub run {
    my ($uri, $n, %h) = @_;
    my $k = uid();
    return map { $c->req("GET $uri", headers => { 'X-Api-Key' => $k, %h }) }
           1 .. $n;
}

sub all_of {
    my ($name, $code, @r) = @_;
    my @bad = grep { !$code->($r[$_]) } 0 .. $#r;
    ok(!@bad, $name) or diag(join "\n---\n", map { $r[$_]->as_string } @bad);
}

my $X = qr/^X-RateLimit-/i;
my $IETF = qr/^RateLimit(-Policy)?$/i;

sub names { my ($r) = @_; return keys %{ $r->{headers} } }


# --- x (default) --------------------------------------------------------------

wait_window(10, margin => 3 * slow());

{
    my @r = run('/q/x', 4);

    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'x: 3 pass, 429');
    is_deeply([ map { $_->header('X-RateLimit-Limit') } @r ], [3, 3, 3, 3],
              'x: X-RateLimit-Limit');
    is_deeply([ map { $_->header('X-RateLimit-Remaining') } @r ],
              [2, 1, 0, 0], 'x: X-RateLimit-Remaining');
    all_of('x: X-RateLimit-Reset is a delta in seconds', sub {
        my $v = $_[0]->header('X-RateLimit-Reset') // '';
        $v =~ /^\d+$/ && $v <= 20;
    }, @r);
    all_of('x: no IETF fields', sub { !grep { $_ =~ $IETF } names($_[0]) },
           @r);
    all_of('x: no Retry-After when passed',
           sub { !defined $_[0]->header('Retry-After') }, @r[0 .. 2]);

    like($r[0]->body, qr/"backend":"ok"/, 'the upstream body passes');
    is($r[0]->header('Content-Type'), 'application/json',
       'the upstream Content-Type passes');

    # the rejection
    my $x = $r[3];
    like($x->header('Content-Type') // '', qr{^application/json\b},
         '429: Content-Type application/json');
    my $ra = $x->header('Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 1 && $ra <= 20,
       "429: Retry-After, integer >= 1 ($ra)");

    my $j = $x->json;
    ok($j, '429: body is JSON') or diag($x->body);
    $j //= {};
    is_deeply($j, {
        error => {
            type        => 'rate_limit_exceeded',
            message     => 'Rate limit exceeded: 3 requests per 10s',
            category    => 'Run query (API)',
            limit       => 3,
            period      => 10,
            retry_after => $ra,
        },
    }, '429: the JSON body') or diag($x->body);
    like($x->body, qr/"limit"\s*:\s*3\s*[,}]/, 'limit is a JSON number');
    like($x->body, qr/"period"\s*:\s*10\s*[,}]/, 'period is a JSON number');
    like($x->body, qr/"retry_after"\s*:\s*\d+\s*[,}]/,
         'retry_after is a JSON number');
    is($x->header('Content-Length'), length($x->body),
       '429: Content-Length matches');
}


# --- ietf, both, off ----------------------------------------------------------

{
    my @r = run('/q/ietf', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429], 'ietf: 429');
    is_deeply([ map { $_->header('RateLimit-Policy') } @r ],
              [ ("\"$CAT_ID\";q=3;w=10") x 4 ], 'ietf: RateLimit-Policy');
    my @rl = map { $_->header('RateLimit') // '' } @r;
    my @ok = map { /^"\Q$CAT_ID\E";r=(\d+);t=(\d+)$/ ? $1 : 'bad' } @rl;
    is_deeply(\@ok, [2, 1, 0, 0], 'ietf: RateLimit r=')
        or diag(join "\n", @rl);
    all_of('ietf: no X-RateLimit-*',
           sub { !grep { $_ =~ $X } names($_[0]) }, @r);
    like($r[3]->header('Retry-After') // '', qr/^[1-9]\d*$/,
         'ietf: Retry-After on 429');
}

{
    my @r = run('/q/both', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429], 'both: 429');
    all_of('both: both sets', sub {
        my $r = shift;
        defined $r->header('X-RateLimit-Limit')
            && defined $r->header('X-RateLimit-Remaining')
            && defined $r->header('X-RateLimit-Reset')
            && defined $r->header('RateLimit-Policy')
            && defined $r->header('RateLimit');
    }, @r);
    is($r[1]->header('X-RateLimit-Remaining'), 1, 'both: remaining');
    like($r[1]->header('RateLimit') // '', qr/;r=1;/, 'both: r=1');
}

{
    my @r = run('/q/off', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'off: still limited');
    all_of('off: no rate-limit fields', sub {
        !grep { $_ =~ $X || $_ =~ $IETF } names($_[0]);
    }, @r);
    is(($r[3]->json // {})->{error}{category}, 'Run query (API)',
       'off: the JSON body stays');
}


# --- prefix, reset=epoch -------------------------------------------------------

{
    my @r = run('/q/prefix', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429], 'prefix: 429');
    is_deeply([ map { $_->header('lb-ratelimit-limit') } @r ], [3, 3, 3, 3],
              'prefix: lb-ratelimit-limit');
    is_deeply([ map { $_->header('lb-ratelimit-remaining') } @r ],
              [2, 1, 0, 0], 'prefix: lb-ratelimit-remaining');
    all_of('prefix: lb-ratelimit-reset', sub {
        ($_[0]->header('lb-ratelimit-reset') // '') =~ /^\d+$/;
    }, @r);
    all_of('prefix: no X-RateLimit-*',
           sub { !grep { $_ =~ $X } names($_[0]) }, @r);
    my ($name) = grep { /ratelimit-limit/i } @{ [ $r[0]{head} =~ /^([^:\r\n]+):/mg ] };
    is($name, 'lb-ratelimit-limit', 'prefix: the name as given');
}

for my $loc ('/q/epoch', '/q/lbepoch') {
    my $name = $loc eq '/q/epoch' ? 'X-RateLimit-Reset' : 'lb-ratelimit-reset';
    my $t0 = int(time);
    my @r = run($loc, 4);
    my $t1 = time;
    all_of("reset=epoch ($loc): $name is a Unix time", sub {
        my $v = $_[0]->header($name) // '';
        $v =~ /^\d+$/ && $v >= $t0 - 1 && $v <= $t1 + 21;
    }, @r);
    my $ra = $r[3]->header('Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 1 && $ra <= 20,
       "reset=epoch ($loc): Retry-After stays a delta ($ra)");
}


# --- escaping --------------------------------------------------------------------

{
    my @r = run('/esc', 2);
    is($r[1]->status, 429, 'escaping: 429');
    my $j = $r[1]->json;
    ok($j, 'escaping: the body is valid JSON') or diag($r[1]->body);
    is($j && $j->{error}{category},
       "A \"quoted\" back\\slash/ tab\tcat \\u00e9 \x{e9} <&>",
       'escaping: the category survives quotes, backslashes, control '
       . 'characters and UTF-8');
}


# --- error_page, llmlimit_status ------------------------------------------------

{
    my @r = run('/q/ep', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'error_page 429: status stays 429');
    is($r[3]->body, "slow down\n", 'error_page 429: its body replaces JSON');
    like($r[3]->header('Retry-After') // '', qr/^[1-9]\d*$/,
         'error_page 429: Retry-After still sent');
    is($r[3]->header('X-RateLimit-Limit'), 3,
       'error_page 429: rate-limit headers still sent');
}

{
    my @r = run('/q/503', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 503],
              'llmlimit_status 503');
    is(($r[3]->json // {})->{error}{type}, 'rate_limit_exceeded',
       'llmlimit_status 503: the JSON body');
    like($r[3]->header('Retry-After') // '', qr/^[1-9]\d*$/,
         'llmlimit_status 503: Retry-After');
}


# --- whatever the content handler ----------------------------------------------

{
    my @r = run('/q/static', 2);
    is($r[0]->body, "ok\n", 'static file served');
    is($r[1]->header('X-RateLimit-Remaining'), 1, 'static file: headers');

    @r = run('/q/missing', 1);
    is($r[0]->status, 404, 'static 404');
    is($r[0]->header('X-RateLimit-Remaining'), 2, '404: headers');

    @r = run('/q/err', 1);
    is($r[0]->status, 500, 'upstream 500');
    is($r[0]->header('X-Upstream'), 'err', 'upstream headers kept');
    is($r[0]->header('X-RateLimit-Limit'), 3, 'upstream 500: headers');
}


# --- the upstream never sees a rejected request --------------------------------

{
    my $probe = uid('probe');
    my $k = uid();
    my @s = map {
        $c->req("GET /q/up?$probe", headers => { 'X-Api-Key' => $k })->status
    } 1 .. 6;
    is_deeply(\@s, [200, 200, 200, 429, 429, 429], 'upstream: 3 pass');

    # the backend logs after it answered: wait for the 3, then a moment more
    my $log = $t->wait_log('backend.log', qr/(?:\Q$probe\E.*\n.*){3}/s);
    sleep 0.5;
    $log = $t->log_file('backend.log');
    my $n = () = $log =~ /\Q$probe\E/g;
    is($n, 3, 'the backend saw exactly the 3 passed requests');
}


# --- an internal redirect does not count twice ---------------------------------

{
    my @r = run('/q/redir', 4);
    is_deeply([ map { $_->status } @r ], [200, 200, 200, 429],
              'try_files to a named location: counted once');
    is_deeply([ map { $_->header('X-RateLimit-Remaining') } @r ],
              [2, 1, 0, 0], 'try_files: remaining counts down by one');
}

finish();
