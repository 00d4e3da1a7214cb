#!/usr/bin/perl
# The Granular Usage page (ui/) in headless Chromium against the module's own
# usage API (llmlimit_usage_api) after known traffic through a location with
# llmlimit_usage: for each group-by the page's table holds the traffic per
# group and its CSV link downloads the same numbers; switching range,
# aggregation, group-by and workspaces changes the address and the data;
# reloading restores the view; the browser's console stays clean.  The page's
# error states are t/ui-states.t's.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use LLMLimit::Keys;

require "$FindBin::Bin/ui-lib.pl";

if (my $why = ui_skip_reason()) {
    plan skip_all => $why;
}

my $KEYS = keys_file();

# who each key is: two workspaces, three projects, two users
my %WHO = (
    'ui-key-1' => { workspace => 'ws-a', workspace_name => 'Prod',
                    project => 'p-1', project_name => 'Chat',
                    user => 'u-1', user_email => 'ann@example.org',
                    short_key => 'lsv2_...ky1' },
    'ui-key-2' => { workspace => 'ws-a', workspace_name => 'Prod',
                    project => 'p-2', project_name => 'Search, "beta"',
                    user => 'u-2', user_email => 'bob@example.org',
                    short_key => 'lsv2_...ky2' },
    'ui-key-3' => { workspace => 'ws-b', workspace_name => 'Staging',
                    project => 'p-3', project_name => 'Eval',
                    user => 'u-1', user_email => 'ann@example.org',
                    short_key => 'lsv2_...ky3' },
);
write_keys($KEYS, [ map { { key => $_, plan => 'pro', org => 'acme',
                            %{ $WHO{$_} } } } sort keys %WHO ]);

my $HTTP = qq{
    types { text/html html; application/javascript js; text/css css; }

    llmlimit_keys  $KEYS;
    llmlimit_key   \$http_x_api_key;

    llmlimit_zone  z 1m;
    llmlimit_rules api zone=z {
        "Runs"  *  /api/runs*  \$http_x_api_key  3/1h;
        "Any"   *  *           \$http_x_api_key  1000/1h;
    }

    llmlimit_usage_zone  u 4m;
};

my $SERVER = q{
    location /api/ {
        llmlimit        api;
        llmlimit_usage  u;
        proxy_pass      http://backend;
    }

    location /usage/ {
        llmlimit_usage_api  u;
        allow 127.0.0.1;
        deny  all;
    }

    location /usage-ui/ {
        alias %%ROOT%%/ui/;
    }
};

# does this build have the usage API?
my $probe = nginx_t(http => $HTTP, config => $SERVER);
if ($probe->{rc} != 0) {
    plan skip_all => 'waits for the usage API (llmlimit_usage_zone, '
        . 'llmlimit_usage, llmlimit_usage_api): '
        . (($probe->{out} =~ /(unknown directive "[^"]+")/)[0]
           // $probe->{out});
}

my $t = LLMLimit::Test->new(http => $HTTP, config => $SERVER)->start;
my $c = $t->conn;

# the traffic: key 1 sends 5 to /api/runs (3 pass, 2 rejected) and 2
# elsewhere; key 2 4 elsewhere; key 3 1 to /api/runs and 6 elsewhere
my @traffic = (['ui-key-1', '/api/runs', 5], ['ui-key-1', '/api/x', 2],
               ['ui-key-2', '/api/x', 4],
               ['ui-key-3', '/api/runs/q', 1], ['ui-key-3', '/api/y', 6]);
my %status;
for my $s (@traffic) {
    my ($key, $uri, $n) = @$s;
    for (1 .. $n) {
        my $r = $c->req("GET $uri", headers => { 'X-Api-Key' => $key });
        $status{ $r->status }++;
    }
}
is_deeply(\%status, { 200 => 16, 429 => 2 }, 'traffic: 16 passed, 2 rejected');

my %FIELD = (workspace => 'workspace', project => 'project', user => 'user',
             api_key => 'short_key');
my %expect;
for my $gb (keys %FIELD) {
    my %by;
    for my $key (sort keys %WHO) {
        my $g = $WHO{$key}{ $FIELD{$gb} };
        $by{$g} //= [0, 0];
    }
    $by{ $WHO{'ui-key-1'}{ $FIELD{$gb} } }[0] += 5;
    $by{ $WHO{'ui-key-1'}{ $FIELD{$gb} } }[1] += 2;
    $by{ $WHO{'ui-key-2'}{ $FIELD{$gb} } }[0] += 4;
    $by{ $WHO{'ui-key-3'}{ $FIELD{$gb} } }[0] += 7;
    $expect{$gb} = \%by;
}

# what was recorded reaches the API (the zone is written as requests end)
my $end = time + 10 * slow();
my $api;
while (time < $end) {
    my $r = $t->req('GET /usage/?start_time=2020-01-01&end_time=2030-01-01');
    $api = $r->json;
    my $n = 0;
    $n += $_->{requests} + $_->{rejected} for @{ $api->{usage} || [] };
    last if $n >= 18;
    select(undef, undef, undef, 0.2);
}

my @steps;
for my $gb (qw(workspace project user api_key)) {
    push @steps, { name => "group by $gb",
                   url => "/usage-ui/?range=7d&group_by=$gb", csv => 1,
                   ($gb eq 'workspace'
                    ? (screenshot => 'usage-page.png', size => [1280, 800])
                    : ()) };
}
push @steps, { name => 'the whole page', size => [1280, 800],
               url => '/usage-ui/?range=7d&group_by=project',
               screenshot => 'usage-page-full.png', full_page => 1 };
push @steps,
    { name => 'default view', url => '/usage-ui/' },
    { name => 'switch group by', select => { group_by => 'project' } },
    { name => 'switch range', select => { range => '30d' } },
    { name => 'last year', select => { range => '1y' }, csv => 1 },
    { name => 'daily for a year', select => { agg => 'daily' }, csv => 1 },
    { name => 'weekly for a year', select => { agg => 'weekly' }, csv => 1 },
    { name => 'one workspace', click => '#ws-list input[value="ws-b"]',
      csv => 1 },
    { name => 'reload', refresh => 1 },
    { name => 'back', back => 1 },
    { name => 'auto again', select => { agg => 'auto' } },
    { name => 'custom chosen', select => { range => 'custom' },
      no_load => 1 },
    { name => 'custom applied',
      set => { start => substr(ui_iso(time - 86400), 0, 11) . '00:00',
               end => substr(ui_iso(time + 86400), 0, 11) . '00:00' },
      click => '#apply' },
    { name => 'no usage yet',
      url => '/usage-ui/?range=custom&start=' . ui_iso(time - 30 * 86400)
             . '&end=' . ui_iso(time - 20 * 86400) },
    { name => 'phone', size => [390, 844],
      url => '/usage-ui/?range=7d&group_by=user', screenshot => 'phone.png' };

sub ui_iso {
    my @g = gmtime(int($_[0] / 3600) * 3600);
    return sprintf('%04d-%02d-%02dT%02d:00:00Z', $g[5] + 1900, $g[4] + 1,
                   @g[3, 2]);
}

my @obs = ui_drive($t, @steps);
my %o = map { ($_->{name} => $_) } @obs;

for my $gb (qw(workspace project user api_key)) {
    my $o = $o{"group by $gb"};
    is($o->{state}, 'ready', "$gb: shown");
    is_deeply(ui_rows($o), $expect{$gb},
              "$gb: the table's totals are the traffic per $gb")
        or diag(explain($o->{rows}));
    is($o->{csv_source}, 'api', "$gb: the CSV link is the API's");
    my $csv = $o->{csv} || {};
    is($csv->{status}, 200, "$gb: the CSV downloads");
    like($csv->{type}, qr{^text/csv}, "$gb: as text/csv");
    is(ui_csv_header($csv->{text}), join(',', @main::CSV_COLUMNS),
       "$gb: the CSV has the API's columns");
    is_deeply(ui_csv_sums($csv->{text}, $gb), $expect{$gb},
              "$gb: the CSV holds the same numbers");
    ui_console_clean($o, $gb);
}
diag('screenshot (1280x800): ' . ($o{'group by workspace'}{screenshot} // '-'));
diag('screenshot (whole page): ' . ($o{'the whole page'}{screenshot} // '-'));
ui_console_clean($o{'the whole page'}, 'the whole page');

{
    my $o = $o{'default view'};
    is_deeply($o->{controls}, { %{ $o->{controls} }, range => '7d',
                                agg => 'auto', group_by => 'workspace' },
              'default view: last 7 days, auto, by workspace');
    is_deeply([ sort map { $_->{id} } @{ $o->{workspaces} } ],
              ['ws-a', 'ws-b'], 'default view: the workspaces of the data');
}

{
    my $prev = $o{'default view'};
    for my $name ('switch group by', 'switch range', 'last year') {
        my $o = $o{$name};
        ok($o->{loads} > $prev->{loads}, "$name: the data was asked again");
        $prev = $o;
    }
    like($o{'switch group by'}{search}, qr/[?&]group_by=project(&|$)/,
         'switch group by: in the address');
    like($o{'switch range'}{search}, qr/[?&]range=30d(&|$)/,
         'switch range: in the address');
    like($o{'switch range'}{search}, qr/group_by=project/,
         'switch range: group by kept');
    for my $name ('switch group by', 'switch range', 'last year') {
        is_deeply(ui_rows($o{$name}), $expect{project},
                  "$name: the totals per project");
        ui_console_clean($o{$name}, $name);
    }
    like($o{'last year'}{note}, qr/monthly \(30 days\) buckets as the API/,
         'last year: the API\'s monthly buckets');
}

for my $name ('daily for a year', 'weekly for a year') {
    my $o = $o{$name};
    my ($agg) = $name =~ /^(\w+)/;
    like($o->{search}, qr/[?&]agg=$agg(&|$)/, "$name: in the address");
    is($o->{state}, 'ready', "$name: shown");
    like($o->{note}, qr/$agg buckets assembled from 14 API requests/,
         "$name: assembled from daily data, and says so");
    is_deeply(ui_rows($o), $expect{project}, "$name: the same totals");
    is($o->{csv_source}, 'page', "$name: the CSV is the page's");
    is(ui_csv_header($o->{csv}{text}), join(',', @main::CSV_COLUMNS),
       "$name: in the API's columns");
    is_deeply(ui_csv_sums($o->{csv}{text}, 'project'), $expect{project},
              "$name: the CSV holds the same numbers");
    ui_console_clean($o, $name);
}
is($o{'daily for a year'}{buckets}, 365, 'daily for a year: 365 buckets');
is($o{'weekly for a year'}{buckets}, 53, 'weekly for a year: 53 buckets');

{
    my $o = $o{'one workspace'};
    like($o->{search}, qr/[?&]ws=ws-b(&|$)/, 'one workspace: in the address');
    is_deeply(ui_rows($o), { 'p-3' => [7, 0] },
              'one workspace: only its projects');
    is_deeply(ui_csv_sums($o->{csv}{text}, 'project'), { 'p-3' => [7, 0] },
              'one workspace: the CSV too');
    ui_console_clean($o, 'one workspace');

    my $r = $o{reload};
    is($r->{search}, $o->{search}, 'reload: the same address');
    is_deeply($r->{controls}, $o->{controls}, 'reload: the same controls');
    is_deeply([ map { $_->{id} } grep { $_->{checked} }
                @{ $r->{workspaces} } ], ['ws-b'],
              'reload: the same workspace ticked');
    is_deeply(ui_rows($r), ui_rows($o), 'reload: the same data');
    ui_console_clean($r, 'reload');

    my $b = $o{back};
    unlike($b->{search}, qr/ws=/, 'back: the workspace filter undone');
    is_deeply(ui_rows($b), $expect{project}, 'back: every project again');
}

{
    my $o = $o{'custom chosen'};
    is($o->{controls}{range}, 'custom', 'custom chosen: shown');
    unlike($o->{search}, qr/range=custom/,
           'custom chosen: nothing asked before Apply');
    ok(!$o->{result_hidden}, 'custom chosen: the view stays');

    my $a = $o{'custom applied'};
    my ($s, $e) = map { substr(ui_iso($_), 0, 11) . '00:00:00Z' }
                  time - 86400, time + 86400;
    like($a->{search}, qr/range=custom&start=\Q$s\E&end=\Q$e\E&/,
         'custom applied: the range in the address');
    like($a->{note}, qr/^daily buckets as the API/,
         'custom applied: two days, daily');
    is($a->{buckets}, 2, 'custom applied: two buckets');
    is_deeply(ui_rows($a), $expect{project},
              'custom applied: the totals per project');
    ui_console_clean($a, 'custom applied');
}

{
    my $o = $o{'no usage yet'};
    is($o->{state}, 'empty', 'a range without usage: the empty state');
    like($o->{message}, qr/No usage recorded/, 'a range without usage: says so');
    is($o->{controls}{range}, 'custom', 'a range without usage: custom');
    ui_console_clean($o, 'no usage yet');
}

{
    my $o = $o{phone};
    is_deeply(ui_rows($o), $expect{user}, 'phone: the totals per user');
    ok($o->{overflow} <= 0, 'phone: no horizontal scrolling at 390 px');
    ui_console_clean($o, 'phone');
    diag("screenshot (390x844): $o->{screenshot}");
}

# make screenshot: the desktop screenshot for the README
if (my $to = $ENV{LLMLIMIT_UI_SCREENSHOT}) {
    my $from = $o{'the whole page'}{screenshot};
    ok($from && system('cp', $from, $to) == 0, "screenshot copied to $to");
}

$t->stop;

# conf.example as make run serves it: traffic, the API and the page on the
# Langbase server
{
    my $ex = LLMLimit::Test->new(conf => conf_example())->start;
    my $port = $ex->subst('%%PORT2%%');
    my $lb = $ex->conn(port => $port);
    my %n;
    for my $key (('lb-pro-demo') x 3, ('lb-enterprise-demo') x 2) {
        $n{ $lb->req('GET /v1/pipes', headers => { 'X-Api-Key' => $key })
               ->status }++;
    }
    is_deeply(\%n, { 200 => 5 }, 'conf.example: 5 requests passed');

    my ($o) = ui_drive_port($ex, $port,
                            { name => 'conf.example', url => '/usage-ui/' });
    is($o->{state}, 'ready', 'conf.example: the page at /usage-ui/');
    is_deeply(ui_rows($o),
              { '0d2c7a1e-9c3b-4a5e-8f6d-123456789abc' => [3, 0],
                '5f0e4b7c-2a61-4d8e-9b3f-abcdef012345' => [2, 0] },
              'conf.example: the totals per workspace')
        or diag(explain($o->{rows}));
    ui_console_clean($o, 'conf.example');
    $ex->stop;
}

finish();
