#!/usr/bin/perl

# nginx -t: every kind of bad line fails with [emerg], the file, the line
# and what is wrong (the rule-line grammar in detail is t/rules-conf.t); the
# good forms of every directive pass.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use LLMLimit::Test;

my $RULES = q{
    llmlimit_zone  z 1m;
    llmlimit_rules t zone=z {
        "Cat"  *  *  $binary_remote_addr  10/60s;
    }
};

my $LOC = q{ location / { proxy_pass http://backend; } };

# the configuration must pass nginx -t
sub good {
    my ($name, %conf) = @_;
    $conf{config} //= "llmlimit t; $LOC";
    my $r = nginx_t(%conf);
    is($r->{rc}, 0, "accepted: $name") or diag($r->{out});
}

# it must fail, with an [emerg] naming the line holding MARKER and matching
# RE (what is wrong)
sub bad {
    my ($name, $marker, $re, %conf) = @_;
    $conf{config} //= "llmlimit t; $LOC";
    my $r = nginx_t(%conf);
    my $line = line_of($r->{conf}, $marker);
    my ($emerg) = $r->{out} =~ /^(.*\[emerg\].*)$/m;
    $emerg //= '';
    ok($r->{rc} != 0 && $emerg =~ /\Q$r->{conf}\E:$line\b/
       && $emerg =~ $re, "rejected: $name")
        or diag("rc $r->{rc}; expected line $line and $re:\n$r->{out}");
}


# --- the good forms ---------------------------------------------------------

good('every directive, every value',
    http => q{
        map $http_x_api_key $plan { default ""; ~^pro- pro; }

        llmlimit_zone  z  1m;
        llmlimit_zone  z2 64k;
        llmlimit_rules t zone=z {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
        llmlimit_rules fx zone=z algorithm=fixed {
            "F"  GET  /f  $http_x_api_key  1/1s,100/1d;
        }
        llmlimit_rules sl zone=z2 algorithm=sliding plan=$plan {
            "S"  *  "/s/{name}"  $http_x_api_key  pro=2/1m 1/1m;
        }
        llmlimit_rules gc zone=z algorithm=gcra {
            "G"  POST|PATCH  "~*^/g"  $http_x_user_id:$remote_addr  5/10s;
        }

        llmlimit t;
        llmlimit_status 429;
        llmlimit_dry_run off;
        llmlimit_log_level error;
        llmlimit_log_limit 100;
        llmlimit_headers x;
    },
    config => q{
        llmlimit fx;
        llmlimit sl;
        llmlimit_status 503;
        llmlimit_dry_run on;
        llmlimit_log_level warn;
        llmlimit_headers both prefix=lb-ratelimit reset=epoch;

        location / {
            llmlimit gc;
            llmlimit t;
            llmlimit_status 400;
            llmlimit_log_level notice;
            llmlimit_headers ietf;
            proxy_pass http://backend;
        }
        location /a {
            llmlimit off;
            llmlimit_status 599;
            llmlimit_log_level info;
            llmlimit_log_limit off;
            llmlimit_headers off;
            proxy_pass http://backend;
        }
        location /b {
            llmlimit_headers x reset=delta;
            proxy_pass http://backend;
        }
    },
);



# --- llmlimit_zone -------------------------------------------------------------

bad('a zone used with two sizes', 'llmlimit_zone  z 2m;', qr/"z"/,
    http => $RULES . "\n    llmlimit_zone  z 2m;\n");
bad('a zone declared twice', 'llmlimit_zone  z 1m; # again', qr/"z"/,
    http => $RULES . "\n    llmlimit_zone  z 1m; # again\n");
bad('zone size', 'llmlimit_zone  z lots;', qr/lots/,
    http => "llmlimit_zone  z lots;\n" . q{
        llmlimit_rules t zone=z { "Cat" * * $binary_remote_addr 1/1s; }
    });
bad('zone without a size', 'llmlimit_zone  z;', qr/llmlimit_zone|number|param/i,
    http => "llmlimit_zone  z;\n");
bad('llmlimit_zone outside http', 'llmlimit_zone  zz 1m;',
    qr/not allowed|llmlimit_zone/,
    http => $RULES, config => "llmlimit_zone  zz 1m;\n llmlimit t; $LOC");


# --- llmlimit_rules --------------------------------------------------------------

bad('unknown zone', 'zone=nosuch', qr/nosuch/,
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=nosuch {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
    });
bad('rules without zone=', 'llmlimit_rules t {', qr/zone|arguments/,
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules t {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
    });
bad('duplicate rules name', 'llmlimit_rules t zone=z2', qr/"?\bt\b"?/,
    http => $RULES . q{
        llmlimit_zone  z2 1m;
        llmlimit_rules t zone=z2 {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
    });
bad('unknown algorithm', 'algorithm=leaky', qr/leaky/,
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z algorithm=leaky {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
    });
bad('unknown parameter', 'colour=blue', qr/colour/,
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z colour=blue {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
    });
bad('plan= without a variable', 'plan=gold', qr/plan|gold/,
    http => q{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z plan=gold {
            "Cat"  *  *  $binary_remote_addr  10/60s;
        }
    });

# one of each kind of bad rule line (the details: t/rules-conf.t)
for my $case (
    [ 'bad METHODS',               '"Cat"  GETT  /x  $binary_remote_addr  1/1s;', qr/GETT/ ],
    [ 'bad METHODS list',          '"Cat"  GET||POST  /x  $binary_remote_addr  1/1s;', qr/GET\|\|POST/ ],
    [ 'unbalanced { in PATH',      '"Cat"  *  "/runs/{uuid"  $binary_remote_addr  1/1s;', qr/\{uuid/ ],
    [ 'regex that does not compile', '"Cat"  *  "~^/a(b"  $binary_remote_addr  1/1s;', qr/\^\/a\(b/ ],
    [ 'bad LIMITS: no period',     '"Cat"  *  /x  $binary_remote_addr  10;', qr/"10"/ ],
    [ 'bad LIMITS: bad count',     '"Cat"  *  /x  $binary_remote_addr  ten/10s;', qr/ten\/10s/ ],
    [ 'bad LIMITS: bad unit',      '"Cat"  *  /x  $binary_remote_addr  10/10q;', qr/10\/10q/ ],
    [ 'bad LIMITS: zero count',    '"Cat"  *  /x  $binary_remote_addr  0/10s;', qr/0\/10s/ ],
    [ 'per-plan limits without plan=', '"Cat"  *  /x  $binary_remote_addr  hobby=1/1s  10/60s;', qr/plan/ ],
    [ 'too few fields',            '"Cat"  *  /x  1/1s;', qr/param|Cat|number/i ],
) {
    my ($name, $line, $re) = @$case;
    bad($name, $line, $re, http => qq{
        llmlimit_zone  z 1m;
        llmlimit_rules t zone=z {
            "Ok"  *  /ok  \$binary_remote_addr  1/1s;
            $line
        }
    });
}


# --- llmlimit --------------------------------------------------------------------

bad('unknown table', 'llmlimit nosuch;', qr/nosuch/,
    http => $RULES, config => "llmlimit nosuch;\n $LOC");
bad('unknown table in a location', 'llmlimit other;', qr/other/,
    http => $RULES,
    config => "location / {\n llmlimit other;\n proxy_pass http://backend;\n }");
bad('llmlimit without a name', 'llmlimit;', qr/llmlimit/,
    http => $RULES, config => "llmlimit;\n $LOC");


# --- response and logging directives -------------------------------------------

for my $case (
    [ 'llmlimit_status below 400', 'llmlimit_status 200;',  qr/200|400 and 599/ ],
    [ 'llmlimit_status above 599', 'llmlimit_status 600;',  qr/600|400 and 599/ ],
    [ 'llmlimit_status not a number', 'llmlimit_status many;', qr/many|invalid number/ ],
    [ 'llmlimit_dry_run value',    'llmlimit_dry_run maybe;', qr/maybe/ ],
    [ 'llmlimit_log_level value',  'llmlimit_log_level debug9;', qr/debug9/ ],
    [ 'llmlimit_log_limit zero',   'llmlimit_log_limit 0;', qr/"0"/ ],
    [ 'llmlimit_log_limit word',   'llmlimit_log_limit many;', qr/many/ ],
    [ 'llmlimit_headers mode',     'llmlimit_headers all;', qr/all/ ],
    [ 'llmlimit_headers parameter', 'llmlimit_headers x colour=red;', qr/colour/ ],
    [ 'llmlimit_headers reset',    'llmlimit_headers x reset=later;', qr/later/ ],
    [ 'llmlimit_headers empty prefix', 'llmlimit_headers x prefix=;', qr/prefix/ ],
) {
    my ($name, $line, $re) = @$case;
    bad($name, $line, $re, http => $RULES,
        config => "llmlimit t;\n location / {\n $line\n proxy_pass http://backend;\n }");
}

bad('llmlimit_log_limit twice', 'llmlimit_log_limit 6;', qr/duplicate/,
    http => $RULES,
    config => "llmlimit t;\n llmlimit_log_limit 5;\n llmlimit_log_limit 6;\n $LOC");

finish();
