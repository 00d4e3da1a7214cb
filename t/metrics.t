# llmlimit_metrics: known traffic over two workers gives exact counters
# per (table, category, status) whichever worker is scraped; the zones'
# gauges and evictions; label values escaped; no identity as a label;
# counters kept over a reload; promtool check metrics on a scrape.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use LLMLimit::Keys;
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/metrics-lib.pl";

my $SLOW = slow();


# a Redis zone on a port nothing listens on: redis_failure=open decides
my $DEAD = do {
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                  Proto => 'tcp', Listen => 1);
    my $p = $s->sockport;
    close $s;
    "127.0.0.1:$p";
};

my $HTTP = qq{
    llmlimit_zone  z 1m;
    llmlimit_zone  down 1m redis=$DEAD redis_failure=open
                   redis_timeout=100ms;

    llmlimit_rules api zone=z {
        "Info"  GET  /info  \$http_x_api_key  3/1h;
        "Say \\"hi\\" to C:\\\\temp\\nnow"  GET  /esc  \$http_x_api_key
                unlimited;
        "Dry"   GET  /dry   \$http_x_api_key  1/1h;
    }
    llmlimit_rules org zone=z {
        "Org"   *    *      \$http_x_org  1000/1h;
    }
    llmlimit_rules down zone=down {
        "Down"  *    *      \$http_x_api_key  5/1h;
    }
};

my $SERVER = q{
    add_header X-Pid $pid always;
    add_header X-Status $llmlimit_status always;

    location / { llmlimit api; llmlimit org; proxy_pass http://%%BACKEND%%; }
    location /dry {
        llmlimit api;
        llmlimit_dry_run on;
        proxy_pass http://%%BACKEND%%;
    }
    location /err { llmlimit down; proxy_pass http://%%BACKEND%%; }
    location = /metrics { llmlimit_metrics; }
};


# ---------------------------------------------------------------------------
# known traffic, each request on a connection of its own, over two workers

my $t = LLMLimit::Test->new(name => 'metrics', http => $HTTP,
                            config => $SERVER, workers => 2,
                            listen => 'reuseport')->start;

my $secret = 'sk-' . uid('secret');
my (%pids, %got);

my @traffic = (
    # request, headers, times, the statuses expected in order
    [ 'GET /info', { 'X-Api-Key' => $secret, 'X-Org' => 'acme-org' }, 5,
      'PASSED PASSED PASSED REJECTED REJECTED' ],
    [ 'GET /info', {}, 4, 'BYPASSED BYPASSED BYPASSED BYPASSED' ],
    [ 'GET /esc', { 'X-Api-Key' => 'k-esc', 'X-Org' => 'acme-org' }, 3,
      'PASSED PASSED PASSED' ],
    [ 'GET /dry', { 'X-Api-Key' => 'k-dry' }, 3,
      'PASSED REJECTED_DRY_RUN REJECTED_DRY_RUN' ],
    [ 'GET /err', { 'X-Api-Key' => 'k-err' }, 2, 'ERROR ERROR' ],
);

for my $tr (@traffic) {
    my ($spec, $h, $n, $expect) = @$tr;
    my @st;

    for (1 .. $n) {
        my $r = $t->req($spec, headers => $h);
        push @st, $r->header('X-Status') // '-';
        $pids{ $r->header('X-Pid') // '-' }++;
    }

    is(join(' ', @st), $expect, "$spec: $expect");
}

# more requests, to make sure both workers served some
for (1 .. 30) {
    my $r = $t->req('GET /info', headers => { 'X-Org' => 'spread-org' });
    $pids{ $r->header('X-Pid') // '-' }++;
}

is(scalar(keys %pids), 2, 'both workers served requests')
    or diag(explain(\%pids));

my %expect = (
    'table="api",category="Info",status="passed"'             => 3,
    'table="api",category="Info",status="rejected"'           => 2,
    'table="api",category="Info",status="rejected_dry_run"'   => 0,
    'table="api",category="Info",status="error"'              => 0,
    'table="api",category="Say \"hi\" to C:\\\\temp\nnow",status="passed"' => 3,
    'table="api",category="Say \"hi\" to C:\\\\temp\nnow",status="rejected"' => 0,
    'table="api",category="Say \"hi\" to C:\\\\temp\nnow",status="rejected_dry_run"' => 0,
    'table="api",category="Say \"hi\" to C:\\\\temp\nnow",status="error"' => 0,
    'table="api",category="Dry",status="passed"'              => 1,
    'table="api",category="Dry",status="rejected"'            => 0,
    'table="api",category="Dry",status="rejected_dry_run"'    => 2,
    'table="api",category="Dry",status="error"'               => 0,
    'table="api",category="",status="bypassed"'               => 4 + 30,
    'table="org",category="Org",status="passed"'              => 6 + 30,
    'table="org",category="Org",status="rejected"'            => 2,
    'table="org",category="Org",status="rejected_dry_run"'    => 0,
    'table="org",category="Org",status="error"'               => 0,
    'table="org",category="",status="bypassed"'               => 4,
    'table="down",category="Down",status="passed"'            => 0,
    'table="down",category="Down",status="rejected"'          => 0,
    'table="down",category="Down",status="rejected_dry_run"'  => 0,
    'table="down",category="Down",status="error"'             => 2,
    'table="down",category="",status="bypassed"'              => 0,
);

# every scrape, whichever worker answers it, gives the same numbers
my (%scrapers, @texts);

for (1 .. 12) {
    my $r = $t->req('GET /metrics');
    is($r->status, 200, 'scrape: 200') if $_ == 1;
    is($r->header('Content-Type'), 'text/plain; version=0.0.4; charset=utf-8',
       'the exposition format\'s content type') if $_ == 1;
    push @texts, $r->body;
}

my $same = 1;
my %first = metrics_series($texts[0], 'llmlimit_requests_total');

for my $text (@texts) {
    my %m = metrics_series($text, 'llmlimit_requests_total');
    $same = 0 unless join(',', map { "$_=$m{$_}" } sort keys %m)
                     eq join(',', map { "$_=$first{$_}" } sort keys %first);
}

ok($same, 'twelve scrapes over both workers: the same requests_total');
is_deeply(\%first, \%expect, 'requests_total: exact per (table, category, '
          . 'status)') or diag($texts[0]);

my $text = $texts[0];

like($text, qr/^# HELP llmlimit_requests_total .+\n# TYPE llmlimit_requests_total counter$/m,
     'HELP and TYPE');
like($text,
     qr/^llmlimit_requests_total\{table="api",category="Say \\"hi\\" to C:\\\\temp\\nnow",status="passed"\} 3$/m,
     'a category with a quote, a backslash and a line feed, escaped');

unlike($text, qr/\Q$secret\E|k-esc|k-dry|acme-org|spread-org/,
       'no identity in the exposition');

my %tok = metrics_series($text, 'llmlimit_tokens_total');
is_deeply([ sort values %tok ], [ (0) x 5 ], 'tokens_total: 0 per category')
    or diag(explain(\%tok));
ok(exists $tok{'table="org",category="Org"'}, 'tokens_total by category');

# zones: counters in use (api/Info for the secret, api/Dry, org/Org for
# two organisations), size, used, evictions

my %zone = metrics_values($text);
is($zone{'llmlimit_zone_counters{zone="z"}'}, 4, 'zone z: 4 counters');
is($zone{'llmlimit_zone_counters{zone="down"}'}, 0,
   'zone down: nothing counted (open)');
is($zone{'llmlimit_zone_size_bytes{zone="z"}'}, 1048576, 'zone z: 1m');
ok($zone{'llmlimit_zone_used_bytes{zone="z"}'} > 0
   && $zone{'llmlimit_zone_used_bytes{zone="z"}'} < 1048576,
   'zone z: some bytes used');
is($zone{'llmlimit_zone_evictions_total{zone="z"}'}, 0, 'no evictions');

# the Redis zone that cannot connect

is($zone{'llmlimit_redis_up{zone="down"}'}, 0, 'redis down: up 0');
ok($zone{'llmlimit_redis_errors_total{zone="down",kind="connect"}'} >= 2,
   'redis down: connect errors (each worker)');
is($zone{'llmlimit_redis_fallbacks_total{zone="down",policy="open"}'}, 2,
   'redis down: 2 requests decided by redis_failure=open');
is($zone{'llmlimit_redis_latency_seconds_count{zone="down"}'}, 0,
   'no round trip');
ok(!exists $zone{'llmlimit_redis_up{zone="z"}'},
   'no Redis metrics for a shared-memory zone');

# promtool

SKIP: {
    my $promtool = which('promtool');
    skip 'promtool not installed (Debian package prometheus; make test '
         . 'installs it)', 1 unless $promtool;

    my ($rc, $out) = promtool_check($promtool, $text);
    is($rc, 0, 'promtool check metrics: no problem') or diag($out);
}

# a method other than GET and HEAD

is($t->req('POST /metrics', body => 'x')->status, 405, 'POST: 405');
my $head = $t->req('HEAD /metrics');
is($head->status, 200, 'HEAD: 200');
is($head->body, '', 'HEAD: no body');

# kept over a reload (the zone's size is the same); a new category starts
# at zero, one removed is no longer shown

(my $http2 = $HTTP) =~ s/"Dry"   GET  \/dry/"Dry2"  GET  \/dry/;
ok($t->reload(http => $http2), 'reload');

%first = metrics_series($t->req('GET /metrics')->body,
                        'llmlimit_requests_total');
is($first{'table="api",category="Info",status="passed"'}, 3,
   'after a reload: kept');
is($first{'table="api",category="Dry2",status="passed"'}, 0,
   'a new category: 0');
ok(!exists $first{'table="api",category="Dry",status="passed"'},
   'a category no longer configured: not shown');

$t->stop;


# ---------------------------------------------------------------------------
# a zone too small for its identities: evictions counted

{
    my $t = LLMLimit::Test->new(
        name   => 'evictions',
        http   => q{
            llmlimit_zone  small 32k;
            llmlimit_rules s zone=small {
                "S"  *  *  $http_x_api_key  10/1h;
            }
        },
        config => q{
            location / { llmlimit s; proxy_pass http://%%BACKEND%%; }
            location = /metrics { llmlimit_metrics; }
        },
    )->start;

    my $c = $t->conn;
    my $N = 2000;

    for my $i (1 .. $N) {
        $c->req('GET /x', headers => { 'X-Api-Key' => "key-$i" });
    }

    my %m = metrics_values($t->req('GET /metrics')->body);
    my $held = $m{'llmlimit_zone_counters{zone="small"}'};
    my $ev = $m{'llmlimit_zone_evictions_total{zone="small"}'};

    ok($held > 10 && $held < $N, "32k holds $held counters");
    is($ev, $N - $held, "evicted: $N - $held");
    is($m{'llmlimit_zone_used_bytes{zone="small"}'},
       $m{'llmlimit_zone_size_bytes{zone="small"}'}, 'every byte used');
    like($t->error_log, qr/llmlimit zone "small" is full, evicted/,
         'the full zone is logged');

    $t->stop;
}


# ---------------------------------------------------------------------------
# the key directory: keys loaded, when, failed loads (the directory in use
# kept)

{
    my $file = keys_file();

    write_keys($file, [ { key => 'secret-one', plan => 'pro', org => 'o1' },
                        { key => 'secret-two', plan => 'pro', org => 'o2' } ]);

    my $before = time;

    my $t = LLMLimit::Test->new(
        name   => 'metrics keys',
        http   => qq{
            llmlimit_keys  $file check=100ms;
            llmlimit_zone  z 1m;
            llmlimit_rules org zone=z {
                "Org"  *  *  \$llmlimit_key_org  5/1h;
            }
        },
        config => q{
            llmlimit_key $http_x_api_key;
            location / { llmlimit org; proxy_pass http://%%BACKEND%%; }
            location = /metrics { llmlimit_metrics; }
        },
    )->start;

    is($t->req('GET /x', headers => { 'X-Api-Key' => 'secret-one' })->status,
       200, 'a known key');

    my $text = $t->req('GET /metrics')->body;
    my %m = metrics_values($text);
    is($m{llmlimit_keys_loaded}, 2, 'two keys loaded');
    ok($m{llmlimit_keys_last_load_timestamp_seconds} >= int($before) - 1
       && $m{llmlimit_keys_last_load_timestamp_seconds} <= time + 1,
       'loaded now, Unix time');
    is($m{llmlimit_keys_load_failures_total}, 0, 'no failure');
    unlike($text, qr/secret-one|secret-two|o1|o2/, 'no key, no organisation');

    write_raw($file, '{"keys": [ broken');

    my $end = time + 10 * $SLOW;
    while (time < $end) {
        %m = metrics_values($t->req('GET /metrics')->body);
        last if $m{llmlimit_keys_load_failures_total};
        sleep 0.1;
    }

    is($m{llmlimit_keys_load_failures_total}, 1, 'a bad file: one failure');
    is($m{llmlimit_keys_loaded}, 2, 'the directory in use kept');

    $t->stop;
}


# ---------------------------------------------------------------------------
# llmlimit_metrics alone, no zone: an empty exposition; a user zone named
# like the metrics' zone is refused; llmlimit_metrics takes no argument

{
    my $t = LLMLimit::Test->new(
        name   => 'metrics alone',
        config => q{ location = /metrics { llmlimit_metrics; } },
    )->start;

    my $r = $t->req('GET /metrics');
    is($r->status, 200, 'no zone: 200');
    is($r->body, '', 'no zone: nothing to show');
    $t->stop;

    my $res = nginx_t(http => q{
        llmlimit_zone llmlimit_metrics 1m;
        llmlimit_rules a zone=llmlimit_metrics { "A" * * $remote_addr 1/1s; }
    }, config => q{ location / { llmlimit a; } });
    isnt($res->{rc}, 0, 'a zone named "llmlimit_metrics": nginx -t fails');
    like($res->{out}, qr/"llmlimit_metrics" is already declared/,
         '... naming it') or diag($res->{out});

    $res = nginx_t(config => q{ location / { llmlimit_metrics on; } });
    isnt($res->{rc}, 0, 'llmlimit_metrics with an argument: nginx -t fails');
    like($res->{out}, qr/invalid number of arguments in "llmlimit_metrics"/,
         '... saying why') or diag($res->{out});
}

finish();
