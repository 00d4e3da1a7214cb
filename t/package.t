#!/usr/bin/perl
# The Debian package (make deb), as a Debian user meets it: installed with
# apt-get, enabled through /etc/nginx/modules-enabled/ only, serving a
# limited request under Debian's /usr/sbin/nginx, then purged.
#
# This installs and removes a package on the machine it runs on, so it only
# runs when asked to: LLMLIMIT_PACKAGE_TEST=1 (or CI=true), as root, with
# apt-get, and never when the package is already installed (it would purge
# someone's install).  The .deb is LLMLIMIT_DEB or the newest
# build/libnginx-mod-http-llmlimit_*.deb (make deb).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use LLMLimit::Test;

my $PKG  = 'libnginx-mod-http-llmlimit';
my $SO   = '/usr/lib/nginx/modules/ngx_http_llmlimit_module.so';
my $SNIP = '/usr/share/nginx/modules-available/mod-http-llmlimit.conf';
my $LINK = '/etc/nginx/modules-enabled/50-mod-http-llmlimit.conf';
my @APT  = ('apt-get', '-y', '-q', '--no-install-recommends',
            '-o', 'DPkg::Lock::Timeout=300');

sub installed {
    my ($rc, $out) = LLMLimit::Test::run_cmd(
        'dpkg-query', '-W', '-f=${Status}', $PKG);
    return $rc == 0 && $out =~ /ok installed/;
}

plan skip_all => 'installs a Debian package on this machine: set '
                 . 'LLMLIMIT_PACKAGE_TEST=1 (CI=true does) to run it'
    unless $ENV{LLMLIMIT_PACKAGE_TEST} || ($ENV{CI} // '') eq 'true';
plan skip_all => 'needs root (apt-get install)' unless $> == 0;
plan skip_all => 'needs apt-get and dpkg-query'
    unless -x '/usr/bin/apt-get' && -x '/usr/bin/dpkg-query';
plan skip_all => 'the package is for Debian\'s /usr/sbin/nginx; this run '
                 . "tests $ENV{LLMLIMIT_NGINX}"
    if $ENV{LLMLIMIT_NGINX} && $ENV{LLMLIMIT_NGINX} ne '/usr/sbin/nginx';
plan skip_all => "$PKG is already installed here: not touching it"
    if installed();

my ($deb) = $ENV{LLMLIMIT_DEB}
            || (sort glob("$LLMLimit::Test::ROOT/build/${PKG}_*.deb"))[-1];

ok($deb && -f $deb, 'make deb built the package')
    or BAIL_OUT("no build/${PKG}_*.deb: run make deb first");

$ENV{DEBIAN_FRONTEND} = 'noninteractive';

my $we_installed = 0;
my $main_pid = $$;

END {
    # a failed run must not leave the package behind
    LLMLimit::Test::run_cmd(@APT, 'purge', $PKG)
        if $we_installed && $$ == $main_pid && installed();
}

my ($rc, $out) = LLMLimit::Test::run_cmd(@APT, 'install', $deb);
is($rc, 0, "apt-get install $deb") or diag($out);
$we_installed = 1;

ok(installed(), "$PKG is installed");
ok(-f $SO, "$SO");
like(LLMLimit::Test::slurp($SNIP) // '',
     qr{^load_module modules/ngx_http_llmlimit_module\.so;$}m,
     "$SNIP loads the module");
is(readlink($LINK), $SNIP, "enabled: $LINK");
ok(-f "/usr/share/doc/$PKG/examples/conf.example", 'conf.example shipped');
ok(-f "/usr/share/doc/$PKG/README.md.gz", 'README shipped');
ok(-f "/usr/share/llmlimit/ui/$_", "the usage page's $_ shipped")
    for qw(index.html app.js style.css);

{
    # Debian's nginx, whatever LLMLIMIT_NGINX says; the module comes from
    # modules-enabled only
    local $LLMLimit::Test::NGINX = '/usr/sbin/nginx';

    my %conf = (
        module => 0,
        main   => 'include /etc/nginx/modules-enabled/*.conf;',
        http   => q{
            llmlimit_zone  pkg 1m;
            llmlimit_rules pkg zone=pkg {
                "Packaged"  GET  /limited  $binary_remote_addr  1/1h;
            }
        },
        config => q{
            llmlimit pkg;
            location / { proxy_pass http://backend; }
            location /usage-ui/ {
                llmlimit off;
                alias /usr/share/llmlimit/ui/;
            }
        },
    );

    my $t = LLMLimit::Test->new(%conf);

    # "load_module modules/..." is relative to the prefix, as in Debian's
    # /usr/share/nginx/modules -> /usr/lib/nginx/modules
    symlink('/usr/lib/nginx/modules', $t->prefix . '/modules')
        or die "symlink: $!";
    $t->write_conf;

    my ($trc, $tout) = LLMLimit::Test::run_cmd($t->command('-t'));
    is($trc, 0, 'nginx -t with the module from modules-enabled')
        or diag($tout);
    like($tout, qr/test is successful/, 'nginx -t: test is successful');

    $t->start;

    my $c = $t->conn(from => '127.0.0.1');
    my $r = $c->req('GET /limited');
    is($r->status, 200, 'first request passes');
    is($r->header('x-ratelimit-limit'), 1, 'X-RateLimit-Limit: 1');
    is($r->header('x-ratelimit-remaining'), 0, 'X-RateLimit-Remaining: 0');

    $r = $c->req('GET /limited');
    is($r->status, 429, 'second request is limited');
    is($r->json && $r->json->{error}{category}, 'Packaged',
       '429 body names the category');

    $r = $c->req('GET /usage-ui/');
    is($r->status, 200, 'the usage page served from the package');
    like($r->body, qr{<title>Granular usage}, 'the usage page itself');

    $t->stop;
}

($rc, $out) = LLMLimit::Test::run_cmd(@APT, 'purge', $PKG);
is($rc, 0, "apt-get purge $PKG") or diag($out);

ok(!installed(), "$PKG is gone");
ok(!-e $SO, "$SO removed");
ok(!-e $SNIP, "$SNIP removed");
ok(!-e $LINK && !-l $LINK, "$LINK removed");
ok(!-e "/usr/share/doc/$PKG", "/usr/share/doc/$PKG removed");
ok(!-e '/usr/share/llmlimit', '/usr/share/llmlimit removed');
$we_installed = 0 unless installed();

finish();
