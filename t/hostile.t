#!/usr/bin/perl
# Hostile clients: huge and duplicate key headers, odd paths and methods,
# HTTP/1.0, HTTP/2, pipelining, bodies on rejected requests, internal
# redirects and subrequests (a request is counted once), and a regex PATH
# with catastrophic backtracking (bounded: no 500, the rule does not match).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use LLMLimit::Test;

my $HTTP = q{
    llmlimit_zone  z 4m;
    llmlimit_rules h zone=z {
        "Key"      *     /key          $http_x_api_key      3/1h;
        "Exact"    GET   /exact        $binary_remote_addr  4/1h;
        "Method"   *     /method       $binary_remote_addr  2/1h;
        "H10"      *     /h10          $binary_remote_addr  2/1h;
        "H2"       *     /h2           $binary_remote_addr  2/1h;
        "Pipe"     *     /pipe         $binary_remote_addr  2/1h;
        "Body"     POST  /body         $binary_remote_addr  1/1h;
        "EP"       *     /ep*          $binary_remote_addr  3/1h;
        "TF"       *     /tf*          $binary_remote_addr  3/1h;
        "AR"       *     /ar*          $binary_remote_addr  3/1h;
        "MI"       *     /mi*          $binary_remote_addr  3/1h;
        "RW"       *     /rw*          $binary_remote_addr  3/1h;
        "Regex"    *     "~^/re/(a+)+$"  $binary_remote_addr  2/1h;
        "ReOther"  *     /re/*         $binary_remote_addr  100/1h;
    }
};

my $SERVER = q{
    listen 127.0.0.1:%%PORT2%% http2;
    large_client_header_buffers 4 128k;
    client_max_body_size 1m;
    llmlimit h;

    location / { proxy_pass http://backend; }

    # the backend's header buffers are nginx's defaults
    location = /key { try_files /ok.txt =404; }

    # error_page: /ep/x is not found, answered by /ep-fallback
    location /ep/ {
        error_page 404 = /ep-fallback;
        try_files /nonexistent =404;
    }
    location = /ep-fallback { proxy_pass http://backend; }

    # try_files falling back to a URI: an internal redirect
    location /tf/ { try_files /nonexistent /tf-target; }
    location = /tf-target { proxy_pass http://backend; }

    # auth_request and mirror: subrequests
    location /ar/ {
        auth_request /ar-auth;
        proxy_pass http://backend;
    }
    location = /ar-auth { internal; proxy_pass http://backend; }

    location /mi/ {
        mirror /mi-mirror;
        proxy_pass http://backend;
    }
    location = /mi-mirror { internal; proxy_pass http://backend; }

    # rewrite ... last: a new location for the same request
    location /rw/ {
        rewrite ^/rw/(.*)$ /rw-target/$1 last;
    }
    location /rw-target/ { proxy_pass http://backend; }
};

my $t = LLMLimit::Test->new(http => $HTTP, config => $SERVER, nports => 1,
                            allow_log => [])->start;


# --- key headers ------------------------------------------------------------

{
    my $c = $t->conn;
    my $big = 'k' x 65536;

    my $r = $c->req('GET /key', headers => { 'X-Api-Key' => $big });
    is($r->status, 200, '64 KiB key: served');
    is($r->header('x-ratelimit-remaining'), 2, '64 KiB key: counted');

    $r = $c->req('GET /key', headers => { 'X-Api-Key' => $big });
    is($r->header('x-ratelimit-remaining'), 1,
       '64 KiB key: the same key, the same budget');

    # differs in the last byte only: a budget of its own
    $r = $c->req('GET /key', headers => { 'X-Api-Key' => ('k' x 65535) . 'j' });
    is($r->header('x-ratelimit-remaining'), 2,
       '64 KiB key differing in its last byte: another budget');

    # 200 copies of the header: the identity is one of them, every request
    # counted once against it
    my $id = uid('dup');
    my @h = map { ('X-Api-Key' => $_ == 0 ? $id : "$id-$_") } 0 .. 199;
    my @st;
    for (1 .. 4) {
        $r = $c->req('GET /key', headers => \@h);
        push @st, $r->status;
    }
    is("@st", '200 200 200 429', '200 duplicate key headers: 3 pass, then 429');
    ok(!grep({ /\Q$id\E/ } split /\n/, $t->error_log),
       'the keys are not logged');
}


# --- paths --------------------------------------------------------------------

{
    my $c = $t->conn(from => '127.0.0.2');
    my @st;

    # all of them are /exact once normalised
    for my $uri ('/a/../exact', '/./exact', '//exact', '/ex%61ct') {
        my $r = $c->req("GET $uri");
        push @st, $r->status . '/' . ($r->header('x-ratelimit-remaining') // '-');
    }
    is("@st", '200/3 200/2 200/1 200/0',
       'dot segments, // and %61 are the same /exact budget');

    my $r = $c->req('GET /exact');
    is($r->status, 429, '... and the next /exact is limited');

    $r = $t->req('GET /../exact');
    is($r->status, 400, '/../exact (above the root): 400 from nginx');

    $r = $t->req('GET /exact%00x');
    is($r->status, 400, '%00 in the path: 400 from nginx');

    $r = $t->req('GET /', raw => "GET /ex\0act HTTP/1.1\r\nHost: x\r\n"
                              . "Connection: close\r\n\r\n");
    is($r->status, 400, 'a NUL byte in the path: 400 from nginx');

    # %2F decodes to "/": /key%2Fx is /key/x, not the exact /key
    $r = $t->req('GET /key%2Fx', headers => { 'X-Api-Key' => uid() });
    is($r->status, 200, '%2F: served');
    is($r->header('x-ratelimit-limit'), undef, '%2F: /key/x is not /key');
}


# --- methods ------------------------------------------------------------------

{
    my $c = $t->conn(from => '127.0.0.3');

    my $r = $t->req('GET /', raw => "get /method HTTP/1.1\r\nHost: x\r\n"
                              . "Connection: close\r\n\r\n");
    is($r->status, 400, 'a lowercase method: 400 from nginx');

    my $m = 'X' x 1024;
    $r = $c->req("$m /method");
    ok($r->status == 200 || $r->status == 405,
       '1 KiB method: answered (' . $r->status . ')');
    is($r->header('x-ratelimit-remaining'), 1,
       '1 KiB method: counted by a "*" rule');

    $r = $c->req("$m /exact");
    is($r->header('x-ratelimit-limit'), undef,
       '1 KiB method: not a GET rule\'s');

    $r = $c->req('GET /method');
    is($r->header('x-ratelimit-remaining'), 0, 'the same budget for GET');
    $r = $c->req("$m /method");
    is($r->status, 429, '1 KiB method: limited');
}


# --- HTTP/1.0 -------------------------------------------------------------------

{
    my @st;
    for (1 .. 3) {
        my $r = $t->req('GET /', from => '127.0.0.4',
                        raw => "GET /h10 HTTP/1.0\r\n\r\n");
        push @st, $r->status;
        like($r->status_line, qr{^HTTP/1\.1 }, 'HTTP/1.0 request answered')
            if $_ == 1;
    }
    is("@st", '200 200 429', 'HTTP/1.0 without Host: 2 pass, then 429');
}


# --- HTTP/2 (h2c with prior knowledge) -------------------------------------------

SKIP: {
    my ($rc, $v) = LLMLimit::Test::run_cmd('curl', '--version');
    skip 'curl with HTTP/2 is not installed', 3
        unless $rc == 0 && $v =~ /\bHTTP2\b/;

    # one request per connection: Debian 12's curl (7.88) fails to reuse
    # a prior-knowledge HTTP/2 connection (exit 16), with or without the
    # module
    my $url = 'http://127.0.0.1:' . $t->{ports}[0] . '/h2';
    my (@codes, @versions, @rcs);
    for (1 .. 3) {
        ($rc, my $out) = LLMLimit::Test::run_cmd(
            'curl', '-s', '--http2-prior-knowledge', '-o', '/dev/null',
            '-w', '%{http_code} %{http_version}', '-H',
            'X-Junk: ' . ('j' x 8000), $url);
        push @rcs, $rc;
        my ($code, $version) = split ' ', $out;
        push @codes, $code // '';
        push @versions, $version // '';
    }
    is("@rcs", '0 0 0', 'curl --http2-prior-knowledge');
    is("@versions", '2 2 2', 'three requests over HTTP/2');
    is("@codes", '200 200 429',
       'HTTP/2: 2 pass, then 429');
}


# --- pipelining -------------------------------------------------------------------

{
    my $c = $t->conn(from => '127.0.0.5');
    my $one = "GET /pipe HTTP/1.1\r\nHost: x\r\n\r\n";

    my @st;
    my $r = $c->req('GET /pipe', raw => $one x 4);
    push @st, $r->status;
    for (2 .. 4) {
        $r = $c->exchange('', 'GET');
        push @st, $r->status;
    }
    is("@st", '200 200 429 429', 'four pipelined requests: 2 pass, 2 limited');

    $r = $c->req('GET /bypassed');
    is($r->status, 200, 'the connection goes on after them');
}


# --- bodies on rejected requests, keep-alive ---------------------------------------

{
    my $c = $t->conn(from => '127.0.0.6');

    my $r = $c->req('POST /body', body => 'a' x 10000);
    is($r->status, 200, 'POST with a body: passes');

    $r = $c->req('POST /body', body => 'b' x 200000);
    is($r->status, 429, 'POST with a 200 KB body: limited');

    $r = $c->req('GET /bypassed');
    is($r->status, 200, 'keep-alive: the next request is read after the body');
    like($r->body, qr{"uri":"/bypassed"}, '... and is the right one');

    my $chunk = sprintf("%x\r\n%s\r\n", 5000, 'c' x 5000) x 10 . "0\r\n\r\n";
    $r = $c->req('POST /body', raw => "POST /body HTTP/1.1\r\nHost: x\r\n"
                                      . "Transfer-Encoding: chunked\r\n\r\n"
                                      . $chunk);
    is($r->status, 429, 'chunked body: limited');

    $r = $c->req('GET /bypassed2');
    is($r->status, 200, 'keep-alive after a chunked body');
    like($r->body, qr{"uri":"/bypassed2"}, '... and is the right one');
}


# --- internal redirects and subrequests: a request is counted once ------------------

for my $case (['error_page', '/ep/x'], ['try_files', '/tf/x'],
              ['auth_request', '/ar/x'], ['mirror', '/mi/x'],
              ['rewrite last', '/rw/x'])
{
    my ($what, $uri) = @$case;
    my $c = $t->conn(from => '127.0.1.' . (10 + length $what));

    my @st;
    for (1 .. 4) {
        my $r = $c->req("GET $uri");
        push @st, $r->status . '/'
                  . ($r->header('x-ratelimit-remaining') // '-');
    }
    is("@st", '200/2 200/1 200/0 429/0', "$what: each request counted once");
}

# the backend saw the mirror subrequests and the auth subrequests
like($t->wait_log('backend.log', qr{/mi-mirror}), qr{/mi-mirror},
     'mirror subrequests reached the backend');


# --- a regex with catastrophic backtracking -------------------------------------------

{
    my $c = $t->conn(from => '127.0.0.7');
    my $evil = '/re/' . ('a' x 40) . '!';

    my $t0 = time;
    my $r = $c->req("GET $evil");
    my $dt = time - $t0;

    is($r->status, 200, '(a+)+$ against aaaa...!: no 500');
    is($r->header('x-ratelimit-limit'), 100,
       '... the regex rule does not match, the next rule does');
    cmp_ok($dt, '<', 5 * slow(), '... and the match is bounded');

    $r = $c->req("GET $evil");
    is($r->status, 200, 'again: no 500');

    like($t->error_log, qr/regex "~\^\/re\/\(a\+\)\+\$" gave up/,
         'the failure is logged');
    my @lines = grep { /gave up/ } split /\n/, $t->error_log;
    is(scalar @lines, 1, '... once, not once per request');

    $r = $c->req('GET /re/aaaa');
    is($r->header('x-ratelimit-limit'), 2, 'the regex still matches /re/aaaa');
}

$t->stop;

finish();
