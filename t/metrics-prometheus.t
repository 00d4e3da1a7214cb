# A real Prometheus server scrapes llmlimit_metrics every second, and a
# PromQL query through its HTTP API returns the request counts that the
# test's traffic made.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

require "$FindBin::Bin/metrics-lib.pl";

my $PROMETHEUS = which('prometheus');

plan skip_all => 'prometheus not installed (Debian package prometheus; '
                 . 'make test installs it)' unless $PROMETHEUS;

my $SLOW = slow();


my $t = LLMLimit::Test->new(
    name   => 'metrics prometheus',
    http   => q{
        llmlimit_zone  z 1m;
        llmlimit_rules api zone=z {
            "Run \"query\" (API)"  GET  /runs  $http_x_api_key  7/1h;
        }
    },
    config => q{
        location / { llmlimit api; proxy_pass http://%%BACKEND%%; }
        location = /metrics { llmlimit_metrics; }
    },
)->start;

my $c = $t->conn;
my @st = map { $c->req('GET /runs', headers => { 'X-Api-Key' => 'k1' })
                 ->status } 1 .. 9;
is("@st", '200 200 200 200 200 200 200 429 429', '7 passed, 2 rejected');

# Prometheus on a free loopback port, its storage in a temporary directory

my $dir = tempdir('llmlimit-prometheus-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $port = LLMLimit::Test::free_port();
my $target = '127.0.0.1:' . $t->port;

open my $fh, '>', "$dir/prometheus.yml" or die "$dir/prometheus.yml: $!";
print $fh <<"EOF";
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: llmlimit
    metrics_path: /metrics
    static_configs:
      - targets: ['$target']
EOF
close $fh;

my $pid = fork;
die "fork: $!" unless defined $pid;

if ($pid == 0) {
    POSIX::setpgid(0, 0);
    open STDIN, '<', '/dev/null';
    open STDOUT, '>', "$dir/prometheus.log";
    open STDERR, '>&', \*STDOUT;
    { exec $PROMETHEUS, "--config.file=$dir/prometheus.yml",
           "--storage.tsdb.path=$dir/data",
           "--web.listen-address=127.0.0.1:$port"; }
    POSIX::_exit(127);
}

my $http = HTTP::Tiny->new(timeout => 5);


# the value of a PromQL query's single sample, or undef
sub query {
    my ($q) = @_;
    my $url = "http://127.0.0.1:$port/api/v1/query?query="
              . join('', map { sprintf('%%%02X', ord) } split //, $q);
    my $res = $http->get($url);
    return undef unless $res->{success};
    my $j = json_decode($res->{content}) or return undef;
    my $r = $j->{data}{result} // [];
    return undef unless $j->{status} eq 'success' && @$r == 1;
    return $r->[0]{value}[1];
}


# polls QUERY until it gives EXPECT (Prometheus starts, then scrapes)
sub wait_query {
    my ($q, $expect) = @_;
    my $v;
    my $end = time + 60 * $SLOW;

    while (time < $end) {
        $v = query($q);
        return $v if defined $v && $v eq $expect;
        last if waitpid($pid, WNOHANG) == $pid;
        sleep 0.25;
    }

    return $v;
}


is(wait_query('up{job="llmlimit"}', 1), 1, 'Prometheus scrapes the endpoint')
    or diag(`tail -20 $dir/prometheus.log`);

is(wait_query('sum(llmlimit_requests_total{table="api",status="passed"})', 7),
   7, 'PromQL: 7 requests passed');
is(wait_query('llmlimit_requests_total{category="Run \"query\" (API)",'
              . 'status="rejected"}', 2),
   2, 'PromQL: 2 rejected, by the category\'s name with its quotes');

# more traffic, seen at the next scrapes
$c->req('GET /runs', headers => { 'X-Api-Key' => "k$_" }) for 2 .. 6;

is(wait_query('sum(llmlimit_requests_total{status="passed"})', 12), 12,
   'PromQL: 12 after five more');

kill 'TERM', -$pid;
my $end = time + 20 * $SLOW;
sleep 0.1 while waitpid($pid, WNOHANG) != $pid && time < $end;
if (kill 0, $pid) {
    kill 'KILL', -$pid;
    waitpid($pid, 0);
}

$t->stop;

finish();
