#!/usr/bin/perl

# llmlimit_keys and llmlimit_key: the $llmlimit_key_* variables of keys in
# clear and hashed, unknown keys falling through to the unauthenticated
# rule, per-plan limits per key, an organisation's keys sharing its budget;
# keys in no log and no 429 body.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;
use LLMLimit::Keys;


my $FILE = keys_file();

# entry N is on line N + 1
my @ENTRIES = (
    { key => 'sk-hobby-1', plan => 'hobby', user => 'u1',
      user_email => 'u1@example.com', short_key => 'sk-...by-1' },
    { key => 'sk-pro-a', plan => 'pro', org => 'acme',
      workspace => 'ws-1', workspace_name => 'Production',
      project => 'p-1', project_name => 'Chat', user => 'u2',
      user_email => 'u2@acme.example', short_key => 'sk-...ro-a' },
    { sha256 => sha256_hex('sk-pro-b'), plan => 'pro', org => 'acme',
      workspace => 'ws-1', user => 'u3', short_key => 'sk-...ro-b' },
    { sha256 => uc sha256_hex('sk-ent-1'), plan => 'enterprise',
      org => 'globex', project => undef },
    { key => 'sk-noplan' },
);

write_keys($FILE, \@ENTRIES);


my $VARS = join '', map { "add_header X-K-$_ \"[\$llmlimit_key_$_]\" always;\n" }
    qw(valid plan org workspace workspace_name project project_name user
       user_email short);

sub vars_of {
    my ($r) = @_;
    my %v;
    for my $n (qw(valid plan org workspace workspace_name project
                  project_name user user_email short))
    {
        my $h = $r->header("X-K-$n") // '';
        $h =~ s/^\[(.*)\]$/$1/;
        $v{$n} = $h;
    }
    return \%v;
}


# --- the variables -----------------------------------------------------------

{
    my $t = LLMLimit::Test->new(
        http => qq{
            llmlimit_keys  $FILE;
            map \$http_authorization \$bearer {
                "~^Bearer (?<token>.+)\$"  \$token;
                default                   "";
            }
        },
        config => qq{
            llmlimit_key  \$http_x_api_key;

            location / {
                $VARS
                proxy_pass http://backend;
            }

            location /bearer {
                llmlimit_key  \$bearer;
                $VARS
                proxy_pass http://backend;
            }

            location /nokey {
                llmlimit_key  "";
                $VARS
                proxy_pass http://backend;
            }

            # an internal redirect: the lookup is found again
            location /redirect {
                error_page 404 = \@named;
                return 404;
            }

            location \@named {
                $VARS
                proxy_pass http://backend;
            }
        },
    )->start;

    my $c = $t->conn;

    sub get { $c->req($_[0], headers => { 'X-Api-Key' => $_[1] }) }

    is_deeply(vars_of(get('GET /', 'sk-pro-a')), {
        valid => 1, plan => 'pro', org => 'acme', workspace => 'ws-1',
        workspace_name => 'Production', project => 'p-1',
        project_name => 'Chat', user => 'u2', user_email => 'u2@acme.example',
        short => 'sk-...ro-a' }, 'a key in clear: every field');

    is_deeply(vars_of(get('GET /', 'sk-pro-b')), {
        valid => 1, plan => 'pro', org => 'acme', workspace => 'ws-1',
        workspace_name => '', project => '', project_name => '',
        user => 'u3', user_email => '', short => 'sk-...ro-b' },
        'a key given as its SHA-256: absent fields are empty');

    my $v = vars_of(get('GET /', 'sk-ent-1'));
    is_deeply([ @$v{qw(valid plan org project)} ],
              [ 1, 'enterprise', 'globex', '' ],
              'SHA-256 in upper case; null is empty');

    $v = vars_of(get('GET /', 'sk-noplan'));
    is_deeply([ @$v{qw(valid plan org)} ], [ 1, '', '' ],
              'a key with no fields is valid');

    for my $k ('sk-unknown', 'SK-PRO-A', 'sk-pro-a2', sha256_hex('sk-pro-b'))
    {
        is_deeply(vars_of(get('GET /', $k)),
                  { map { $_ => '' } qw(valid plan org workspace
                    workspace_name project project_name user user_email
                    short) },
                  "unknown key '$k': every variable empty");
    }

    $v = vars_of($c->req('GET /'));
    is($v->{valid}, '', 'no key: not valid');

    $v = vars_of($c->req('GET /bearer',
                         headers => { Authorization => 'Bearer sk-hobby-1' }));
    is_deeply([ @$v{qw(valid plan user short)} ],
              [ 1, 'hobby', 'u1', 'sk-...by-1' ],
              'llmlimit_key from a map: a Bearer token');

    $v = vars_of(get('GET /nokey', 'sk-pro-a'));
    is($v->{valid}, '', 'llmlimit_key "" here: not looked up');

    $v = vars_of(get('GET /redirect', 'sk-pro-a'));
    is_deeply([ @$v{qw(valid plan org)} ], [ 1, 'pro', 'acme' ],
              'after an internal redirect');

    # a long key is hashed like any other
    $v = vars_of(get('GET /', 'x' x 6000));
    is($v->{valid}, '', 'a 6000-byte key: not known, no error');

    $t->stop;
    unlike($t->error_log, qr/sk-(pro|hobby|ent)/, 'no key in error.log');
}


# --- the rules: plans, the unauthenticated rule, an organisation -------------

my $RULES = qq{
    llmlimit_zone  z 1m;
    llmlimit_keys  $FILE;

    llmlimit_rules  keys  zone=z  plan=\$llmlimit_key_plan {
        "API"              *  *  \$llmlimit_key_valid:\$http_x_api_key  hobby=1/60s  pro=3/60s  5/60s;
        "Unauthenticated"  *  *  \$binary_remote_addr                  2/60s;
    }

    llmlimit_rules  orgs  zone=z  plan=\$llmlimit_key_plan {
        "Organization"     *  *  \$llmlimit_key_org                    pro=4/60s  6/60s;
    }

    log_format  keys  '\$status \$llmlimit_status "\$llmlimit_category" '
                      '\$llmlimit_limit \$llmlimit_remaining \$llmlimit_plan '
                      '[\$llmlimit_key_valid] [\$llmlimit_key_plan] '
                      '[\$llmlimit_key_org] [\$llmlimit_key_workspace] '
                      '[\$llmlimit_key_project] [\$llmlimit_key_user] '
                      '[\$llmlimit_key_short] [\$llmlimit_key_user_email]';
};

my $SERVER = q{
    llmlimit_key      $http_x_api_key;
    llmlimit          keys;
    llmlimit          orgs;
    llmlimit_log_level  warn;
    access_log        logs/keys.log keys;

    location / {
        proxy_pass http://backend;
    }
};

sub key { return { 'X-Api-Key' => $_[0] } }

run_blocks(
    {
        name   => 'plans per key',
        http   => $RULES,
        config => $SERVER,
        requests => [
            { req => 'GET /', send => key('sk-hobby-1'), status => 200,
              headers => { 'X-RateLimit-Limit' => 1 },
              name => 'hobby: 1' },
            { req => 'GET /', send => key('sk-hobby-1'), status => 429,
              json => { error => { category => 'API', limit => 1 } },
              name => 'hobby: then 429' },
            { req => 'GET /', send => key('sk-noplan'), repeat => 5,
              status => 200, name => 'no plan: the default token, 5' },
            { req => 'GET /', send => key('sk-noplan'), status => 429 },
        ],
    },
    {
        name   => 'unknown keys fall through to the unauthenticated rule',
        http   => $RULES,
        config => $SERVER,
        requests => [
            { req => 'GET /', from => '127.0.0.2',
              send => key('sk-unknown-1'), status => 200,
              headers => { 'X-RateLimit-Limit' => 2 } },
            { req => 'GET /', from => '127.0.0.2',
              send => key('sk-unknown-2'), status => 200 },
            { req => 'GET /', from => '127.0.0.2', status => 429,
              json => { error => { category => 'Unauthenticated' } },
              name => 'unknown keys and no key: one budget per IP' },
            { req => 'GET /', from => '127.0.0.2', send => key('sk-pro-a'),
              status => 200, headers => { 'X-RateLimit-Limit' => 3 },
              name => 'a valid key from that IP: its own budget' },
        ],
    },
    {
        name   => 'an organisation shares one budget',
        http   => $RULES,
        config => $SERVER,
        requests => [
            # pro: 3 per key, 4 per organisation
            { req => 'GET /', send => key('sk-pro-a'), repeat => 2,
              status => 200, headers => { 'X-RateLimit-Remaining' => [2, 1] } },
            { req => 'GET /', send => key('sk-pro-b'), repeat => 2,
              status => 200, headers => { 'X-RateLimit-Remaining' => [1, 0] },
              name => 'the hashed key of the same organisation: '
                      . 'the organisation has 1 left, then 0' },
            { req => 'GET /', send => key('sk-pro-b'), status => 429,
              json => { error => { category => 'Organization',
                                   limit => 4 } },
              name => 'the organisation is out, its key is not' },
            { req => 'GET /', send => key('sk-pro-a'), status => 429,
              json => { error => { category => 'Organization' } },
              name => 'so is every key of it' },
            { req => 'GET /', send => key('sk-ent-1'), repeat => 5,
              status => 200, name => 'another organisation: its own' },
        ],
    },
);


# --- keys never in the logs or the 429 body ----------------------------------

{
    my $t = LLMLimit::Test->new(http => $RULES, config => $SERVER)->start;
    my $c = $t->conn(from => '127.0.0.3');
    my @bodies;

    for my $k ('sk-hobby-1', 'sk-pro-a', 'sk-unknown-secret') {
        for (1 .. 6) {
            my $r = $c->req('POST /runs', headers => key($k));
            push @bodies, $r->body if $r->status == 429;
        }
    }

    ok(@bodies >= 3, 'rejections to look at');
    ok(!grep({ /sk-/ } @bodies), 'no key in a 429 body');

    my @lines = $t->wait_lines('keys.log', 18);
    is(scalar @lines, 18, 'access log: a line a request');
    ok(!grep({ /sk-(hobby|pro|unknown)/ } @lines),
       'no key in the access log through the module\'s variables')
        or diag(join "\n", @lines);
    like(join("\n", @lines), qr/\[1\] \[pro\] \[acme\] \[ws-1\]/,
         'the access log has the directory\'s fields');

    $t->stop;
    like($t->error_log, qr/limiting request/, 'rejections were logged');
    unlike($t->error_log, qr/sk-(hobby|pro|unknown)/, 'no key in error.log');
    unlike($t->error_log, qr/\Q@{[ sha256_hex('sk-pro-a') ]}\E/,
           'nor its digest');
}


# --- llmlimit_key without a directory: nginx -t fails -------------------------

{
    my $r = nginx_t(http => '', config => q{
        llmlimit_key $http_x_api_key;
        location / { proxy_pass http://backend; }
    });
    my $line = line_of($r->{conf}, 'llmlimit_key $http_x_api_key');
    ok($r->{rc} != 0
       && $r->{out} =~ /\[emerg\].*"llmlimit_key" in \Q$r->{conf}\E:$line needs "llmlimit_keys"/,
       'llmlimit_key needs llmlimit_keys') or diag($r->{out});
}


finish();
