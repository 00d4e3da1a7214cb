#!/usr/bin/perl
# The Granular Usage page (ui/) in headless Chromium against answers in the
# usage API's wire format (USAGE-API.md) served by nginx as files (ten
# workspaces, names to quote), and against what a usage location can answer
# besides usage: 403 from deny and 400 with its JSON error (the module's
# API), 500, a body that is not usage, an API that does not answer, no
# usage at all, a range the page refuses.  t/ui.t drives the
# same page against the module's own API after real traffic.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use File::Path qw(make_path);
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(strftime);
use Test::More;
use LLMLimit::Test;

require "$FindBin::Bin/ui-lib.pl";

if (my $why = ui_skip_reason()) {
    plan skip_all => $why;
}

# ---------------------------------------------------------------------------
# fixtures: the page's default view (last 7 days, ending at the next UTC
# midnight), daily buckets

sub iso { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

my $DAY = 86400;
my $END = (int(time / $DAY) + 1) * $DAY;
my $START = $END - 7 * $DAY;

# ten workspaces (more than the chart's eight colours: "Other"), names that
# need CSV quoting, and keys without a workspace ("")
my @WS = map { { id => sprintf('ws-%02d', $_), name => "Team $_" } } 1 .. 9;
$WS[0]{name} = 'Research, "R&D"';
push @WS, { id => '', name => '' };

my (%expect, @rows);
for my $d (0 .. 6) {
    for my $i (0 .. $#WS) {
        my $w = $WS[$i];
        my $req = ($i * 7 + $d * 3) % 11 + ($i == 1 ? 40 : 0);
        my $rej = ($d + $i) % 3 == 0 ? $d + 1 : 0;
        next unless $req || $rej;
        push @rows, {
            time_bucket_start => iso($START + $d * $DAY),
            time_bucket_end   => iso($START + ($d + 1) * $DAY),
            workspace_id      => $w->{id},
            workspace_name    => $w->{name},
            requests          => $req,
            rejected          => $rej,
            tokens            => 0,
        };
        $expect{ $w->{id} }[0] += $req;
        $expect{ $w->{id} }[1] += $rej;
    }
}

my $js = JSON::PP->new->utf8->canonical;

sub answer {
    my (%o) = @_;
    return $js->encode({
        start_time => iso($START), end_time => iso($END),
        group_by => 'workspace', stride => { days => 1 },
        retention_start => '2025-10-26T00:00:00Z', truncated => JSON::PP::false,
        usage => [], %o,
    });
}

# a socket that takes connections and never answers: the slow API
my $silent = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                   Listen => 64, Proto => 'tcp')
    or die "listen: $!";
my $SILENT = $silent->sockport;

my $t = LLMLimit::Test->new(
    http => q{
        types { text/html html; application/javascript js; text/css css; }
        llmlimit_usage_zone  u 1m;
    },
    config => qq{
        location /usage-ui/ { alias %%ROOT%%/ui/; }

        # files in the API's format, whatever the query
        location /fix/ {
            default_type application/json;
            root %%PREFIX%%/html;
            try_files /fix/workspace.json =404;
        }
        location /empty/ {
            default_type application/json;
            root %%PREFIX%%/html;
            try_files /fix/empty.json =404;
        }
        # the module's usage API, behind deny
        location /denied/ {
            llmlimit_usage_api  u;
            deny all;
        }
        # the module's usage API, asked with an end before the start
        location /bad/ {
            rewrite ^ /usage/?start_time=2026-02-01&end_time=2026-01-01? last;
        }
        location /usage/ {
            llmlimit_usage_api  u;
        }
        location /broken/ { return 500; }
        location /garbage/ {
            default_type text/html;
            return 200 '<html>a login page, say</html>';
        }
        location /slow/ {
            proxy_pass http://127.0.0.1:$SILENT;
            proxy_read_timeout 300s;
        }
    },
);

make_path($t->prefix . '/html/fix');
for (['workspace.json', answer(usage => \@rows)],
     ['empty.json', answer()])
{
    open my $fh, '>', $t->prefix . "/html/fix/$_->[0]" or die $!;
    print $fh $_->[1];
    close $fh;
}
chmod 0755, $t->prefix . '/html/fix';
chmod 0644, glob($t->prefix . '/html/fix/*');

$t->start;

my $q = 'start_time=' . iso($START) . '&end_time=' . iso($END);
(my $qe = $q) =~ s/:/%3A/g;

my @obs = ui_drive($t,
    { name => 'fixture, 1280x800', size => [1280, 800],
      url => '/usage-ui/?api=/fix/', screenshot => 'states-desktop.png' },
    { name => 'keyboard: group by typed', keys => { group_by => 'P' } },
    { name => 'phone width', size => [390, 844],
      url => '/usage-ui/?api=/fix/', screenshot => 'states-phone.png' },
    { name => 'no usage', size => [1280, 800], url => '/usage-ui/?api=/empty/' },
    { name => '403', url => '/usage-ui/?api=/denied/' },
    { name => '400', url => '/usage-ui/?api=/bad/' },
    { name => '500', url => '/usage-ui/?api=/broken/' },
    { name => '404', url => '/usage-ui/?api=/nowhere/' },
    { name => 'not usage', url => '/usage-ui/?api=/garbage/' },
    { name => 'slow', url => '/usage-ui/?api=/slow/&timeout=3',
      timeout => 60, screenshot => 'states-slow.png' },
    { name => 'end before start',
      url => '/usage-ui/?api=/fix/&range=custom&start=2026-02-01T00:00:00Z'
             . '&end=2026-01-01T00:00:00Z' },
    { name => 'too many buckets',
      url => '/usage-ui/?api=/fix/&range=custom&start=2024-01-01T00:00:00Z'
             . '&end=2026-01-01T00:00:00Z&agg=daily' },
    { name => 'an api elsewhere is not followed',
      url => '/usage-ui/?api=http://example.invalid/usage/' },
);

my %o = map { ($_->{name} => $_) } @obs;

# the fixture: totals per workspace, the chart, the CSV link
{
    my $o = $o{'fixture, 1280x800'};
    is($o->{state}, 'ready', 'fixture: shown');
    is_deeply(ui_rows($o), \%expect,
              'fixture: the table holds the totals per workspace')
        or diag(explain($o->{rows}));
    my ($r, $j) = (0, 0);
    $r += $_->[0], $j += $_->[1] for values %expect;
    is_deeply([ map { s/,//gr } @{ $o->{total} }{qw(requests rejected)} ],
              [ $r, $j ], 'fixture: the total row');
    is($o->{buckets}, 7, 'fixture: seven daily buckets drawn');
    ok($o->{bars} > 7, "fixture: stacked bars ($o->{bars} segments)");
    ok($o->{rejected_dots} == 7, 'fixture: the rejected line, a dot a day');
    like($o->{legend}, qr/Other \(2 more, in the table\)/,
         'fixture: the chart names eight groups and "Other"');
    is((map { $_->{label} } grep { $_->{group} eq 'ws-01' }
            @{ $o->{rows} })[0],
       'Research, "R&D"', 'fixture: names as they are');
    is(scalar(grep { $_->{group} eq '' } @{ $o->{rows} }), 1,
       'fixture: keys without a workspace are a row of their own');
    is($o->{csv_source}, 'api', 'fixture: the CSV is the API\'s');
    is($o->{csv_href},
       "http://127.0.0.1:" . $t->port . "/fix/export.csv?$qe"
       . '&group_by=workspace',
       'fixture: the CSV link has the parameters of what is shown');
    is(scalar(@{ $o->{workspaces} }), 9,
       'fixture: nine workspaces to filter by (not the empty one)');
    is($o->{unlabelled}, 0, 'fixture: every control has a label');
    ok($o->{overflow} <= 0, 'fixture: nothing wider than 1280 px');
    ui_console_clean($o, 'fixture');
    diag("screenshot: $o->{screenshot}") if $o->{screenshot};
}

{
    my $o = $o{'keyboard: group by typed'};
    is($o->{controls}{group_by}, 'project', 'keyboard: "P" picks Project');
    like($o->{search}, qr/group_by=project/, 'keyboard: in the address');
    ui_console_clean($o, 'keyboard');
}

{
    my $o = $o{'phone width'};
    is($o->{state}, 'ready', 'phone: shown');
    ok($o->{overflow} <= 0,
       "phone: no horizontal scrolling at 390 px ($o->{overflow})");
    is_deeply(ui_rows($o), \%expect, 'phone: the same totals');
    ui_console_clean($o, 'phone');
    diag("screenshot: $o->{screenshot}") if $o->{screenshot};
}

{
    my $o = $o{'no usage'};
    is($o->{state}, 'empty', 'no usage: the empty state');
    like($o->{message}, qr/No usage recorded from/, 'no usage: says so');
    ok($o->{result_hidden}, 'no usage: no blank chart');
    ui_console_clean($o, 'no usage');
}

for (['403', 403, qr/Access denied \(403\).*\/denied\//],
     ['400', 400, qr/refused the request \(400\), parameter end_time: \S/],
     ['500', 500, qr/failed \(HTTP 500\) at \/broken\//],
     ['404', 404, qr/No usage API at \/nowhere\/ \(404\)/],
     ['not usage', 200, qr/not usage data/])
{
    my ($name, $status, $re) = @$_;
    my $o = $o{$name};
    is($o->{state}, 'error', "$name: an error state");
    like($o->{message}, $re, "$name: the message");
    ok($o->{result_hidden}, "$name: no chart");
    like($o->{message}, qr/Try again/, "$name: a retry button");
    ui_console_clean($o, $name, $status);
}

{
    my $o = $o{slow};
    is_deeply([ @{ $o->{states_seen} }[0, -1] ], ['loading', 'error'],
              'slow: loading first, then an error')
        or diag(explain($o->{states_seen}));
    like($o->{message}, qr/did not answer within 3 s \(\/slow\/\)/,
         'slow: the timeout message');
    ui_console_clean($o, 'slow');
}

{
    my $o = $o{'end before start'};
    is($o->{state}, 'error', 'end before start: refused');
    like($o->{message}, qr/end of the range must be after its start/,
         'end before start: the message');
    is($o->{controls}{range}, 'custom', 'end before start: custom shown');
    ui_console_clean($o, 'end before start');
}

{
    my $o = $o{'too many buckets'};
    is($o->{state}, 'error', 'too many buckets: refused');
    like($o->{message}, qr/731 daily buckets are too many/,
         'too many buckets: says how many and what to do');
    ui_console_clean($o, 'too many buckets');
}

{
    my $o = $o{'an api elsewhere is not followed'};
    is($o->{api_url}, '/usage/', 'api elsewhere: this origin\'s /usage/');
    is($o->{state}, 'empty', 'api elsewhere: /usage/ answered (no usage)');
    ui_console_clean($o, 'api elsewhere');
}

close $silent;
$t->stop;
finish();
