package LLMLimit::Test;

# A small test harness for ngx_http_llmlimit_module in the spirit of
# Test::Nginx: every test starts the stock /usr/sbin/nginx in a temporary
# prefix on free loopback ports with the built module loaded, talks raw
# HTTP/1.1 to it, and checks at the end that error.log holds no [alert],
# [crit] or [emerg] (and, under valgrind, that valgrind found nothing).
#
# Only core Perl modules and Test::More.  See t/README.md and the POD at the
# end of this file for how to write a test.

use strict;
use warnings;

use Carp qw(croak);
use Cwd qw(abs_path);
use Exporter qw(import);
use File::Basename qw(dirname);
use File::Path qw(make_path remove_tree);
use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(:sys_wait_h);
use Socket qw(SOL_SOCKET SO_REUSEADDR);
use Test::More;
use Time::HiRes qw(time sleep);

our @EXPORT = qw(
    run_blocks uid valgrind slow nginx_t wait_window count_admitted
    admits_exactly parallel line_of json_decode done finish conf_example
);

our $ROOT   = abs_path(dirname(__FILE__) . '/../../..');
our $NGINX  = $ENV{LLMLIMIT_NGINX} || '/usr/sbin/nginx';
our $MODULE = $ENV{LLMLIMIT_MODULE}
              || "$ROOT/build/ngx_http_llmlimit_module.so";
our $VALGRIND = $ENV{LLMLIMIT_VALGRIND} ? 1 : 0;

# every timeout is multiplied by this factor under valgrind
our $SLOW = $VALGRIND ? ($ENV{LLMLIMIT_SLOW} || 25) : ($ENV{LLMLIMIT_SLOW} || 1);

my $MAIN_PID = $$;

# a test killed by prove or ^C still runs END, which stops its nginx
$SIG{TERM} = $SIG{INT} = $SIG{HUP} = sub { exit 1 };
my @INSTANCES;
my $UID_SEQ = 0;


sub valgrind { $VALGRIND }
sub slow     { $SLOW }


# a fresh identity string, unique within the run
sub uid {
    my ($prefix) = @_;
    $UID_SEQ++;
    return ($prefix // 'id') . "-$$-$UID_SEQ-" . int(rand(1e9));
}


sub json_decode {
    my ($text) = @_;
    my $v = eval { JSON::PP->new->utf8->decode($text) };
    return $v;
}


# ---------------------------------------------------------------------------
# ports

my %USED_PORTS;

sub free_port {
    for (1 .. 50) {
        my $s = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp',
            Listen => 1, ReuseAddr => 1,
        ) or next;
        my $port = $s->sockport;
        close $s;
        next if $USED_PORTS{$port}++;
        return $port;
    }
    croak "cannot find a free port";
}


# ---------------------------------------------------------------------------
# an nginx instance

sub new {
    my ($class, %o) = @_;

    my $self = bless {
        main      => '',
        http      => '',
        config    => '',
        servers   => '',
        workers   => 1,
        master    => 1,
        log_level => 'info',
        listen    => '',
        module    => 1,
        nports    => 0,
        allow_log => [],
        %o,
    }, $class;

    # %%PORT3%% in the configuration needs nports >= 2
    for my $part (grep { defined } @{$self}{qw(conf main http config servers)}) {
        while ($part =~ /%%PORT(\d+)%%/g) {
            $self->{nports} = $1 - 1 if $1 - 1 > $self->{nports};
        }
    }

    $self->{prefix} = tempdir('llmlimit-t-XXXXXX', TMPDIR => 1,
                              CLEANUP => 0);
    chmod 0755, $self->{prefix};    # workers run as nobody
    make_path("$self->{prefix}/logs", "$self->{prefix}/temp",
              "$self->{prefix}/html", "$self->{prefix}/valgrind");
    chmod 0755, "$self->{prefix}/$_" for qw(logs temp html valgrind);

    # static content for "try_files /ok.txt =404;" (a "return" runs in the
    # rewrite phase, before the module's preaccess handler)
    open my $fh, '>', "$self->{prefix}/html/ok.txt" or croak "ok.txt: $!";
    print $fh "ok\n";
    close $fh;
    chmod 0644, "$self->{prefix}/html/ok.txt";

    $self->pick_ports;
    push @INSTANCES, $self;

    return $self;
}


sub pick_ports {
    my ($self) = @_;
    $self->{port}         = free_port();
    $self->{backend_port} = free_port();
    $self->{ports}        = [ map { free_port() } 1 .. ($self->{nports} || 0) ];
}


sub prefix       { $_[0]{prefix} }
sub port         { $_[0]{port} }
sub backend_port { $_[0]{backend_port} }
sub conf_file    { "$_[0]{prefix}/nginx.conf" }
sub error_log_file { "$_[0]{prefix}/logs/error.log" }


sub subst {
    my ($self, $text) = @_;

    my %v = (
        PORT         => $self->{port},
        BACKEND_PORT => $self->{backend_port},
        BACKEND      => "127.0.0.1:$self->{backend_port}",
        PREFIX       => $self->{prefix},
        MODULE       => $MODULE,
        ROOT         => $ROOT,
    );
    for my $i (0 .. $#{ $self->{ports} }) {
        $v{ 'PORT' . ($i + 2) } = $self->{ports}[$i];
    }

    $text =~ s/%%([A-Z_0-9]+)%%/
        defined $v{$1} ? $v{$1} : croak "unknown placeholder %%$1%%"/ge;

    return $text;
}


sub conf_text {
    my ($self) = @_;

    if (defined $self->{conf}) {
        return $self->subst($self->{conf});
    }

    my $load = $self->{module} ? "load_module %%MODULE%%;\n" : '';
    my $master = $self->{master} ? 'on' : 'off';
    my $listen = $self->{listen} ? " $self->{listen}" : '';

    my $text = <<"EOF";
# generated by t/lib/LLMLimit/Test.pm
${load}
worker_processes  $self->{workers};
master_process    $master;
pid               logs/nginx.pid;
lock_file         logs/nginx.lock;
error_log         logs/error.log $self->{log_level};

$self->{main}

events {
    worker_connections  1024;
}

http {
    default_type          text/plain;
    access_log            logs/access.log;
    keepalive_requests    100000;
    keepalive_timeout     120s;

    client_body_temp_path temp/client_body;
    proxy_temp_path       temp/proxy;
    fastcgi_temp_path     temp/fastcgi;
    uwsgi_temp_path       temp/uwsgi;
    scgi_temp_path        temp/scgi;

$self->{http}

    # the built-in backend: "proxy_pass http://backend;" answers 200 to any
    # method (a "return" in the tested location itself would run in the
    # rewrite phase, before the module's preaccess handler)
    upstream backend {
        server     127.0.0.1:%%BACKEND_PORT%%;
        keepalive  16;
    }

    proxy_http_version  1.1;
    proxy_set_header    Connection "";

    server {
        listen       127.0.0.1:%%BACKEND_PORT%%;
        access_log   logs/backend.log;
        default_type application/json;

        location / {
            return 200 '{"backend":"ok","uri":"\$uri"}\\n';
        }
    }

$self->{servers}

    server {
        listen       127.0.0.1:%%PORT%%$listen;
        server_name  localhost;

$self->{config}
    }
}
EOF

    return $self->subst($text);
}


sub write_conf {
    my ($self) = @_;
    open my $fh, '>', $self->conf_file or croak "write conf: $!";
    print $fh $self->conf_text;
    close $fh;
}


sub command {
    my ($self, @args) = @_;

    # valgrind's exit code is not used: nginx itself leaks a little (its
    # environment copy, old workers' connections); valgrind_errors() reads
    # the logs and counts what the module is responsible for

    my @cmd = ($NGINX, '-p', "$self->{prefix}/", '-c', $self->conf_file,
               @args);

    if ($VALGRIND) {
        unshift @cmd, 'valgrind', '-q', '--leak-check=full',
            '--errors-for-leak-kinds=definite',
            '--show-leak-kinds=definite', '--num-callers=40',
            '--trace-children=yes', '--child-silent-after-fork=no',
            '--vgdb=no',
            "--log-file=$self->{prefix}/valgrind/vg.%p.log";
    }

    return @cmd;
}


# run a command, return (exit code, stdout+stderr)
sub run_cmd {
    my (@cmd) = @_;

    my $pid = open(my $fh, '-|');
    croak "fork: $!" unless defined $pid;

    if ($pid == 0) {
        open STDERR, '>&', \*STDOUT;
        open STDIN, '<', '/dev/null';
        { exec { $cmd[0] } @cmd; }
        POSIX::_exit(127);
    }

    local $/;
    my $out = <$fh> // '';
    close $fh;

    return ($? >> 8, $out);
}


sub start {
    my ($self) = @_;

    croak "module not built: $MODULE (run make build)"
        if $self->{module} && !defined $self->{conf} && !-f $MODULE;

    for my $attempt (1 .. 3) {
        $self->write_conf;
        truncate $self->error_log_file, 0 if -f $self->error_log_file;

        my @cmd = $self->command('-g', 'daemon off;');

        my $pid = fork;
        croak "fork: $!" unless defined $pid;

        if ($pid == 0) {
            POSIX::setpgid(0, 0);
            open STDIN, '<', '/dev/null';
            open STDOUT, '>>', "$self->{prefix}/logs/stderr.log";
            open STDERR, '>&', \*STDOUT;
            { exec { $cmd[0] } @cmd; }
            POSIX::_exit(127);
        }

        $self->{pid} = $pid;
        $self->{exited} = undef;

        if ($self->wait_port($self->{port}, 30 * $SLOW)) {
            $self->{started} = 1;
            return $self;
        }

        my $err = $self->stderr_text . $self->error_log;
        $self->kill_group;

        if ($err =~ /Address already in use/ && $attempt < 3) {
            $self->pick_ports;
            next;
        }

        croak "nginx did not start:\n$err";
    }
}


sub stderr_text {
    my ($self) = @_;
    return slurp("$self->{prefix}/logs/stderr.log") // '';
}


sub alive {
    my ($self) = @_;
    return 0 unless $self->{pid};
    return 0 if defined $self->{exited};
    my $r = waitpid($self->{pid}, WNOHANG);
    if ($r == $self->{pid}) {
        $self->{exited} = $?;
        return 0;
    }
    return 1;
}


sub wait_port {
    my ($self, $port, $timeout) = @_;

    my $end = time + $timeout;

    while (time < $end) {
        return 0 unless $self->alive;
        my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port",
                                      Proto => 'tcp', Timeout => 1);
        if ($s) {
            close $s;
            return 1;
        }
        sleep 0.05;
    }

    return 0;
}


# worker processes of the running master, from /proc
sub workers {
    my ($self) = @_;

    my @w;
    opendir my $d, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $stat = slurp("/proc/$p/stat") // next;
        # pid (comm) state ppid ...
        next unless $stat =~ /\)\s+\S+\s+(\d+)/;
        push @w, $p if $1 == $self->{pid};
    }
    closedir $d;

    return sort { $a <=> $b } @w;
}


# Reload with new configuration parts (same keys as new()), like
# "nginx -s reload": returns true when the old workers are gone and the new
# ones serve, false if nginx refused the configuration (see error_log).
sub reload {
    my ($self, %o) = @_;

    croak "reload needs master_process on" unless $self->{master};

    my $log_before = -s $self->error_log_file || 0;

    for my $k (keys %o) {
        $self->{$k} = $o{$k};
    }
    $self->write_conf;

    my %old = map { $_ => 1 } $self->workers;

    kill 'HUP', $self->{pid};

    my $end = time + 30 * $SLOW;

    while (time < $end) {
        my $log = $self->error_log($log_before);

        if ($log =~ /\[emerg\]/) {
            return 0;
        }

        my @now = $self->workers;
        my @new = grep { !$old{$_} } @now;
        my @still = grep { $old{$_} } @now;

        if (@new >= $self->{workers} && !@still) {
            $self->wait_port($self->{port}, 10 * $SLOW);
            return 1;
        }

        sleep 0.05;
    }

    return 0;
}


sub kill_group {
    my ($self) = @_;

    return unless $self->{pid};

    if ($self->alive) {
        kill 'KILL', -$self->{pid};
        kill 'KILL', $self->{pid};
        waitpid($self->{pid}, 0);
    }

    $self->{pid} = undef;
}


# Graceful stop, then the end-of-test checks on error.log (and valgrind's
# logs); these are reported as tests.
sub stop {
    my ($self, %o) = @_;

    return $self unless $self->{pid};

    for my $c (values %{ $self->{conns} || {} }) {
        $c->close;
    }
    $self->{conns} = {};

    kill 'QUIT', $self->{pid};

    my $end = time + 20 * $SLOW;
    while (time < $end && $self->alive) {
        sleep 0.05;
    }

    if ($self->alive) {
        diag("nginx $self->{pid} did not stop gracefully, killing it");
        kill 'TERM', $self->{pid};
        my $end2 = time + 5 * $SLOW;
        sleep 0.05 while time < $end2 && $self->alive;
        $self->kill_group;
    }

    # workers left behind would hold the ports
    my $ww = time + 10 * $SLOW;
    sleep 0.05 while time < $ww && grep { kill 0, $_ } $self->workers;

    $self->{pid} = undef;
    $self->{stopped} = 1;

    $self->check_logs($o{name} // $self->{name}) unless $o{no_check};

    return $self;
}


sub check_logs {
    my ($self, $name) = @_;

    $name = defined $name ? "$name: " : '';

    my @bad = grep { /\[(alert|crit|emerg)\]/ } split /\n/, $self->error_log;
    for my $allow (@{ $self->{allow_log} }) {
        @bad = grep { $_ !~ $allow } @bad;
    }

    ok(!@bad, "${name}error.log has no [alert], [crit] or [emerg]")
        or diag(join("\n", @bad[0 .. ($#bad > 20 ? 20 : $#bad)]));

    if ($VALGRIND) {
        my @err = valgrind_errors("$self->{prefix}/valgrind");
        ok(!@err, "${name}valgrind: no memory errors, no definite leaks "
                  . "from the module")
            or diag(join("\n\n", @err[0 .. ($#err > 5 ? 5 : $#err)]));
    }
}


# The error records of valgrind's logs that count: any invalid access or
# bad free, a crash, and uninitialised values or definite leaks whose stack
# goes through the module.
sub valgrind_errors {
    my ($dir) = @_;

    my @found;

    for my $f (sort glob("$dir/vg.*.log")) {
        my $text = slurp($f) // next;
        my @records = split /^==\d+==\s*\n/m, $text;

        for my $r (@records) {
            next unless $r =~ /\S/;
            (my $head) = $r =~ /^==\d+== (.*)$/m;
            next unless defined $head;

            my $module = $r =~ /ngx_http_llmlimit/;

            # nginx's own: ngx_regex_compile() creates a PCRE2 compile
            # context that only a running cycle's cleanup frees (plain
            # nginx -t with "location ~" shows the same 72 bytes)
            $module = 0 if $r =~ /pcre2_compile_context_create/;

            if ($head =~ /^(Invalid (read|write|free)|Mismatched free|Source and destination overlap|Process terminating|Jump to the invalid address)/
                || ($head =~ /uninitialised/ && $module)
                || ($head =~ /definitely lost/ && $module))
            {
                push @found, "$f:\n$r";
            }
        }
    }

    return @found;
}


# error.log text, optionally from a byte offset
sub error_log {
    my ($self, $from) = @_;
    my $text = slurp($self->error_log_file) // '';
    $text = substr($text, $from) if $from && $from <= length $text;
    return $text;
}


sub log_file {
    my ($self, $name) = @_;
    return slurp("$self->{prefix}/logs/$name") // '';
}


# wait until logs/NAME matches RE (access logs are written after the
# response went out); returns the text
sub wait_log {
    my ($self, $name, $re, $timeout) = @_;

    my $end = time + ($timeout // 5) * $SLOW;
    my $text = '';

    while (time < $end) {
        $text = $self->log_file($name);
        return $text if $text =~ $re;
        sleep 0.05;
    }

    return $text;
}


# wait until logs/NAME holds at least N lines; returns them
sub wait_lines {
    my ($self, $name, $n, $timeout) = @_;

    my $end = time + ($timeout // 5) * $SLOW;
    my @lines;

    while (time < $end) {
        @lines = split /\n/, $self->log_file($name);
        return @lines if @lines >= $n;
        sleep 0.05;
    }

    return @lines;
}


sub slurp {
    my ($file) = @_;
    open my $fh, '<', $file or return undef;
    local $/;
    my $t = <$fh>;
    close $fh;
    return $t;
}


# ---------------------------------------------------------------------------
# conf.example

# conf.example as a harness configuration: the module built here, its
# ports (8080, 8081, 8082, 8083, 8084, 8085) replaced by %%PORT%%,
# %%BACKEND_PORT%%, %%PORT2%% to %%PORT5%% (new() makes the ports the
# placeholders name), its key directory and usage page (ui/) read from the
# repository.
sub conf_example {
    my $text = slurp("$ROOT/conf.example") // croak "conf.example: $!";

    $text =~ s{^(\s*load_module\s+)\S*ngx_http_llmlimit_module\.so;}
              {$1%%MODULE%%;}m
        or croak "conf.example: no load_module line";
    $text =~ s/127\.0\.0\.1:8080\b/127.0.0.1:%%PORT%%/g;
    $text =~ s/127\.0\.0\.1:8081\b/127.0.0.1:%%BACKEND_PORT%%/g;
    $text =~ s/127\.0\.0\.1:8082\b/127.0.0.1:%%PORT2%%/g;
    $text =~ s/127\.0\.0\.1:8083\b/127.0.0.1:%%PORT3%%/g;
    $text =~ s/127\.0\.0\.1:8084\b/127.0.0.1:%%PORT4%%/g;
    $text =~ s/127\.0\.0\.1:8085\b/127.0.0.1:%%PORT5%%/g;
    $text =~ s{^(\s*llmlimit_keys\s+)(keys\.example\.json)\b}
              {$1%%ROOT%%/$2}m;
    # the usage page of this tree, not the package's
    $text =~ s{^(\s*alias\s+)/usr/share/llmlimit/ui/;}{$1%%ROOT%%/ui/;}mg;

    return $text;
}


# ---------------------------------------------------------------------------
# nginx -t

# nginx_t(http => ..., config => ...): writes the configuration in a fresh
# prefix and runs "nginx -t"; returns a hash: rc (exit code), out (its
# output), conf (the file), t (the instance).
sub nginx_t {
    my (%o) = @_;

    my $t = LLMLimit::Test->new(%o);
    $t->write_conf;

    my ($rc, $out) = run_cmd($t->command('-t'));
    $out .= $t->error_log;

    if ($VALGRIND) {
        my @err = valgrind_errors("$t->{prefix}/valgrind");
        ok(!@err, "nginx -t: valgrind found nothing")
            or diag(join("\n\n", @err[0 .. ($#err > 5 ? 5 : $#err)]));
    }

    $t->{tested} = 1;

    return { rc => $rc, out => $out, conf => $t->conf_file, t => $t };
}


# the line number of the first line of FILE containing STRING
sub line_of {
    my ($file, $string) = @_;
    my $n = 0;
    open my $fh, '<', $file or croak "$file: $!";
    while (my $l = <$fh>) {
        $n++;
        return $n if index($l, $string) >= 0;
    }
    croak "\"$string\" not in $file";
}


# ---------------------------------------------------------------------------
# HTTP client

# a keep-alive connection: $t->conn(from => '127.0.0.2')
sub conn {
    my ($self, %o) = @_;
    my $port = $o{port} // $self->{port};
    my $from = $o{from} // '127.0.0.1';
    my $key = "$from>$port";
    return $self->{conns}{$key}
        //= LLMLimit::Test::Conn->new(port => $port, from => $from);
}


# one request on a new connection (Connection: close)
sub req {
    my ($self, $spec, %o) = @_;
    my $c = LLMLimit::Test::Conn->new(port => $o{port} // $self->{port},
                                      from => $o{from} // '127.0.0.1');
    my $r = $c->req($spec, %o, close => 1);
    $c->close;
    return $r;
}


# ---------------------------------------------------------------------------
# parallel clients

# parallel(N, sub { my ($i) = @_; ...; return $data }): runs the sub in N
# forked processes at once; returns their results (JSON-able data) in order.
sub parallel {
    my ($n, $code) = @_;

    my @kids;

    for my $i (0 .. $n - 1) {
        pipe(my $r, my $w) or croak "pipe: $!";
        my $pid = fork;
        croak "fork: $!" unless defined $pid;

        if ($pid == 0) {
            close $r;
            my $res = eval { $code->($i) };
            $res = { error => "$@" } if $@;
            print $w JSON::PP->new->canonical->encode([$res]);
            close $w;
            POSIX::_exit(0);
        }

        close $w;
        push @kids, [ $pid, $r ];
    }

    my @res;
    for my $k (@kids) {
        my ($pid, $r) = @$k;
        local $/;
        my $text = <$r>;
        close $r;
        waitpid($pid, 0);
        my $v = eval { JSON::PP->new->decode($text) };
        push @res, $v ? $v->[0] : { error => "no result from child $pid" };
    }

    return @res;
}


# ---------------------------------------------------------------------------
# windows and counting

# The module's windows are aligned to the epoch (floor(now / PERIOD)).
# wait_window(PERIOD, margin => S): make sure at least S seconds are left in
# the current window, waiting for the next one if not; with start => 1
# always wait for the next window to begin.  Returns the window start.
sub wait_window {
    my ($period, %o) = @_;

    # never wait more than half a window (an hour window: 30 minutes)
    my $margin = $o{margin} // 1;
    $margin = $period * 0.5 if $margin > $period * 0.5;
    my $after = $o{after} // 0.02;

    my $now = time;
    my $start = int($now / $period) * $period;

    if ($o{start} || $start + $period - $now < $margin) {
        $start += $period;
        sleep($start - $now + $after);
    }

    return $start;
}


# Sends SPEC on CONN until the first non-2xx answer or MAX requests.
# %o: headers, body (as req()), max.  Returns a hash: admitted, rejected (the
# first rejecting response or undef), last (last 2xx response), t0, t1.
sub count_admitted {
    my ($conn, $spec, %o) = @_;

    my $max = $o{max} // 1_000_000;
    my %res = (admitted => 0, t0 => time);

    for (1 .. $max) {
        my $r = $conn->req($spec, %o);
        if ($r->status >= 200 && $r->status < 300) {
            $res{admitted}++;
            $res{last} = $r;
            next;
        }
        $res{rejected} = $r;
        last;
    }

    $res{t1} = time;
    return \%res;
}


# admits_exactly($conn, SPEC, count => C, period => P, headers => sub {...})
# checks that a fresh identity is admitted exactly COUNT times and the next
# request is rejected, all inside one window of PERIOD seconds (retried with
# a fresh identity if a window boundary fell inside the run).  headers is a
# sub returning the request headers of a fresh identity; from likewise may
# be a sub returning a fresh source address; port another port of the
# instance.  Returns the result of
# count_admitted (admitted, rejected, last, ...) after reporting one test.
sub admits_exactly {
    my ($t, $spec, %o) = @_;

    my $count  = $o{count};
    my $period = $o{period};
    my $name   = $o{name} // "$spec admits exactly $count";
    my $status = $o{status} // 429;

    my $res;

    for my $attempt (1 .. 3) {
        my %h = $o{headers} ? (headers => $o{headers}->()) : ();
        my $from = ref $o{from} ? $o{from}->() : $o{from};
        my $conn = $t->conn(defined $from ? (from => $from) : (),
                            defined $o{port} ? (port => $o{port}) : ());

        # expected run time: generous
        my $need = (0.5 + $count * 0.001) * $SLOW + 0.5;
        my $w = wait_window($period, margin => $need);

        $res = count_admitted($conn, $spec, %h, max => $count + 1,
                              body => $o{body});

        my $w1 = int($res->{t1} / $period) * $period;
        if ($w1 == $w && $res->{t0} >= $w) {
            last;
        }

        if ($attempt == 3) {
            my $msg = sprintf("%s: could not send %d requests within one "
                              . "%ss window (took %.1fs)", $name, $count + 1,
                              $period, $res->{t1} - $res->{t0});
            if ($VALGRIND) {
                SKIP: { skip $msg, 1 }
                return $res;
            }
            fail($msg);
            return $res;
        }
    }

    my $ok = $res->{admitted} == $count && $res->{rejected}
             && $res->{rejected}->status == $status;

    ok($ok, $name) or diag(sprintf("admitted %d (expected %d), then %s",
        $res->{admitted}, $count,
        $res->{rejected} ? $res->{rejected}->status_line . "\n"
                           . $res->{rejected}->body
                         : 'no rejection'));

    return $res;
}


# ---------------------------------------------------------------------------
# blocks: the table form of a test

sub run_blocks {
    my (@blocks) = @_;

    for my $b (@blocks) {
        my %conf = %$b;
        my $name = delete $conf{name} // 'block';
        my $steps = delete $conf{requests} // [];
        my $want_log = delete $conf{error_log} // [];
        my $no_log = delete $conf{no_error_log} // [];

        my $t = LLMLimit::Test->new(%conf, name => $name)->start;

        my $i = 0;
        for my $s (@$steps) {
            $i++;
            if (ref $s eq 'CODE') {
                $s->($t);
                next;
            }
            run_step($t, $s, "$name: step $i");
        }

        for my $re (@$want_log) {
            my $end = time + 5 * $SLOW;
            sleep 0.05 while time < $end && $t->error_log !~ $re;
            like($t->error_log, $re, "$name: error.log matches $re");
        }

        for my $re (@$no_log) {
            unlike($t->error_log, $re, "$name: error.log does not match $re");
        }

        $t->stop;
    }
}


# one request entry of a block:
#   req     => 'GET /path' (method and URI, HTTP/1.1)
#   send    => { header => value } request headers (or headers =>)
#   body    => request body
#   from    => source address ('127.0.0.2'), a keep-alive connection each
#   port    => another port of the instance: a number or 'PORT2'
#   repeat  => N (default 1)
#   status  => expected status (or [per-iteration list])
#   headers => { name => 'exact' | qr/re/ | undef (absent) | [list] | sub }
#   body_is / body_like => expected response body
#   json    => { subset of the decoded JSON body }
#   name    => test name
#   sleep   => seconds to sleep before the request
#   window  => PERIOD: start at the beginning of a window of PERIOD seconds
sub run_step {
    my ($t, $s, $default_name) = @_;

    my $name = $s->{name} // "$default_name ($s->{req})";
    my $n = $s->{repeat} // 1;

    sleep($s->{sleep} * ($s->{sleep_slow} ? $SLOW : 1)) if $s->{sleep};
    wait_window($s->{window}, start => 1) if $s->{window};

    # port: a number or a placeholder name such as 'PORT2'
    my $port = $s->{port};
    $port = $t->subst("%%$port%%") if defined $port && $port !~ /^\d+$/;

    my $conn = $t->conn(from => $s->{from}, port => $port);

    my @problems;

    for my $k (0 .. $n - 1) {
        my $r = $conn->req($s->{req},
                           headers => $s->{send} // $s->{request_headers},
                           body => $s->{body});

        push @problems, check_response($r, $s, $k, $n);
        last if @problems;
    }

    local $Test::Builder::Level = $Test::Builder::Level + 2;
    ok(!@problems, $name) or diag(join("\n", @problems));
}


sub pick {
    my ($v, $k) = @_;
    return ref $v eq 'ARRAY' ? $v->[$k] : $v;
}


sub match_value {
    my ($got, $want) = @_;

    if (!defined $want) {
        return !defined $got;
    }
    return 0 unless defined $got;
    if (ref $want eq 'Regexp') {
        return $got =~ $want;
    }
    if (ref $want eq 'CODE') {
        return $want->($got);
    }
    return "$got" eq "$want";
}


sub show { defined $_[0] ? "'$_[0]'" : 'undef' }


sub check_response {
    my ($r, $s, $k, $n) = @_;

    my @p;
    my $it = $n > 1 ? " (request " . ($k + 1) . " of $n)" : '';

    if (defined $s->{status}) {
        my $want = pick($s->{status}, $k);
        push @p, "status " . $r->status . ", expected $want$it"
            . "\n" . $r->as_string
            if $r->status != $want;
    }

    for my $h (sort keys %{ $s->{headers} || {} }) {
        my $want = $s->{headers}{$h};
        $want = $want->[$k] if ref $want eq 'ARRAY';
        my $got = $r->header($h);
        push @p, "header $h: got " . show($got) . ", expected "
                 . show($want) . $it
            unless match_value($got, $want);
    }

    if (exists $s->{body_is}) {
        push @p, "body: got " . show($r->body) . $it
            unless $r->body eq $s->{body_is};
    }

    if (exists $s->{body_like}) {
        push @p, "body: got " . show($r->body) . ", expected to match "
                 . $s->{body_like} . $it
            unless $r->body =~ $s->{body_like};
    }

    if ($s->{json}) {
        my $j = json_decode($r->body);
        if (!$j) {
            push @p, "body is not JSON: " . show($r->body) . $it;
        } else {
            push @p, map { "$_$it" } json_subset($j, $s->{json}, '');
        }
    }

    return @p;
}


# differences between decoded JSON GOT and the expected subset WANT
sub json_subset {
    my ($got, $want, $path) = @_;

    if (ref $want eq 'HASH') {
        return ("$path: not an object") unless ref $got eq 'HASH';
        return map {
            exists $got->{$_}
                ? json_subset($got->{$_}, $want->{$_}, "$path.$_")
                : ("$path.$_: missing")
        } sort keys %$want;
    }

    return () if match_value($got, $want);
    return ("$path: got " . show($got) . ", expected " . show($want));
}


# ---------------------------------------------------------------------------
# end of the test file

# finish(): stops every nginx still running (with the log checks), then
# done_testing.
sub finish {
    for my $t (@INSTANCES) {
        $t->stop if $t->{pid};
    }
    done_testing();
}

sub done { finish(@_) }


END {
    if ($$ == $MAIN_PID) {
        my $failed = !Test::More->builder->is_passing;
        for my $t (@INSTANCES) {
            $t->kill_group if $t->{pid};
            if ($ENV{LLMLIMIT_KEEP} || ($failed && !$t->{tested})) {
                Test::More->builder->diag("kept $t->{prefix}")
                    if $failed && $t->{started};
                next;
            }
            remove_tree($t->{prefix});
        }
    }
}


# ===========================================================================

package LLMLimit::Test::Conn;

use strict;
use warnings;

use Carp qw(croak);
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time);

sub new {
    my ($class, %o) = @_;
    return bless { port => $o{port}, from => $o{from} // '127.0.0.1' },
                 $class;
}


sub connect {
    my ($self) = @_;

    my $s = IO::Socket::INET->new(
        PeerAddr  => "127.0.0.1:$self->{port}",
        LocalAddr => $self->{from},
        Proto     => 'tcp',
        Timeout   => 10 * $LLMLimit::Test::SLOW,
    ) or croak "connect 127.0.0.1:$self->{port} from $self->{from}: $!";

    $s->autoflush(1);
    binmode $s;
    $self->{sock} = $s;
    $self->{buf} = '';
}


sub close {
    my ($self) = @_;
    close $self->{sock} if $self->{sock};
    $self->{sock} = undef;
}


# req('GET /path', headers => {...} | [k, v, ...], body => '...',
#     close => 1, raw => 'full request text')
sub req {
    my ($self, $spec, %o) = @_;

    my ($method, $uri) = split ' ', $spec, 2;
    $uri //= '/';

    my @h;
    if (ref $o{headers} eq 'HASH') {
        @h = map { ($_, $o{headers}{$_}) } sort keys %{ $o{headers} };
    } elsif (ref $o{headers} eq 'ARRAY') {
        @h = @{ $o{headers} };
    }

    my %has = map { (lc($h[$_]) => 1) } grep { $_ % 2 == 0 } 0 .. $#h;

    my $text = "$method $uri HTTP/1.1\r\n";
    $text .= "Host: localhost\r\n" unless grep { lc $_ eq 'host' } keys %has;
    for (my $i = 0; $i < @h; $i += 2) {
        $text .= "$h[$i]: $h[$i + 1]\r\n";
    }
    $text .= "Connection: close\r\n" if $o{close};
    if (defined $o{body}) {
        $text .= "Content-Length: " . length($o{body}) . "\r\n";
    }
    $text .= "\r\n";
    $text .= $o{body} if defined $o{body};
    $text = $o{raw} if defined $o{raw};

    for my $try (1 .. 2) {
        $self->connect unless $self->{sock};

        my $fresh = $self->{fresh} = ($self->{nreq} // 0) == 0;
        $self->{nreq}++;

        my $r = eval { $self->exchange($text, $method) };
        return $r if $r;

        my $err = $@;
        $self->close;
        $self->{nreq} = 0;

        # a kept-alive connection the server closed: retry on a new one
        next if $try == 1 && !$fresh && $err =~ /^closed before response/;

        croak "$spec: $err";
    }
}


sub exchange {
    my ($self, $text, $method) = @_;

    my $s = $self->{sock};
    my $timeout = 30 * $LLMLimit::Test::SLOW;

    local $SIG{PIPE} = 'IGNORE';
    my $off = 0;
    while ($off < length $text) {
        my $n = syswrite($s, $text, length($text) - $off, $off);
        die "closed before response (write: $!)\n" unless defined $n;
        $off += $n;
    }

    my $r = LLMLimit::Test::Response->new;

    # status line and headers
    my $end;
    while (($end = index($self->{buf}, "\r\n\r\n")) < 0) {
        $self->fill($timeout)
            or die(length $self->{buf}
                   ? "connection closed inside the headers\n"
                   : "closed before response\n");
    }

    my $head = substr($self->{buf}, 0, $end);
    substr($self->{buf}, 0, $end + 4) = '';

    my ($line, @lines) = split /\r\n/, $head;
    $line =~ m{^HTTP/(\d\.\d) (\d{3})(?: (.*))?$}
        or die "bad status line: $line\n";
    $r->{status} = $2;
    $r->{reason} = $3 // '';
    $r->{status_line} = $line;
    $r->{head} = $head;

    for my $l (@lines) {
        my ($k, $v) = $l =~ /^([^:]+):\s*(.*?)\s*$/ or die "bad header $l\n";
        push @{ $r->{headers}{ lc $k } }, $v;
    }

    # body
    my $te = lc($r->header('Transfer-Encoding') // '');
    my $cl = $r->header('Content-Length');
    my $body = '';

    if ($method eq 'HEAD' || $r->{status} == 204 || $r->{status} == 304
        || $r->{status} < 200)
    {
        # no body
    } elsif ($te =~ /chunked/) {
        while (1) {
            my $e;
            while (($e = index($self->{buf}, "\r\n")) < 0) {
                $self->fill($timeout) or die "closed inside chunked body\n";
            }
            my $size = hex(substr($self->{buf}, 0, $e));
            substr($self->{buf}, 0, $e + 2) = '';
            while (length($self->{buf}) < $size + 2) {
                $self->fill($timeout) or die "closed inside chunk\n";
            }
            $body .= substr($self->{buf}, 0, $size);
            substr($self->{buf}, 0, $size + 2) = '';
            if ($size == 0) {
                # trailers are not used here
                last;
            }
        }
    } elsif (defined $cl) {
        while (length($self->{buf}) < $cl) {
            $self->fill($timeout) or die "closed inside the body\n";
        }
        $body = substr($self->{buf}, 0, $cl);
        substr($self->{buf}, 0, $cl) = '';
    } else {
        1 while $self->fill($timeout);
        $body = $self->{buf};
        $self->{buf} = '';
        $self->close;
    }

    $r->{body} = $body;

    my $connection = lc($r->header('Connection') // '');
    if ($connection =~ /close/ || !$self->{sock}) {
        $self->close;
        $self->{nreq} = 0;
    }

    return $r;
}


sub fill {
    my ($self, $timeout) = @_;

    my $s = $self->{sock} or return 0;
    my $sel = IO::Select->new($s);

    $sel->can_read($timeout) or die "timeout reading the response\n";

    my $n = sysread($s, my $chunk, 65536);
    return 0 unless $n;

    $self->{buf} .= $chunk;
    return 1;
}


# ===========================================================================

package LLMLimit::Test::Response;

use strict;
use warnings;

sub new { bless { headers => {}, body => '' }, shift }

sub status      { $_[0]{status} }
sub status_line { $_[0]{status_line} }
sub body        { $_[0]{body} }

# the value of header NAME (case-insensitive), several joined by ", ";
# undef if absent
sub header {
    my ($self, $name) = @_;
    my $v = $self->{headers}{ lc $name } or return undef;
    return join ', ', @$v;
}

# all values of header NAME
sub headers {
    my ($self, $name) = @_;
    return @{ $self->{headers}{ lc $name } || [] };
}

sub json { LLMLimit::Test::json_decode($_[0]{body}) }

sub as_string {
    my ($self) = @_;
    my $b = $self->{body};
    $b = substr($b, 0, 500) . '...' if length $b > 500;
    return "$self->{head}\r\n\r\n$b";
}


1;

__END__

=head1 NAME

LLMLimit::Test - start nginx with ngx_http_llmlimit_module and talk HTTP to it

=head1 SYNOPSIS

    use FindBin;
    use lib "$FindBin::Bin/lib";
    use Test::More;
    use LLMLimit::Test;

    my $HTTP = q{
        llmlimit_zone  z 1m;
        llmlimit_rules api zone=z {
            "Info"  GET  /info  $binary_remote_addr  2/60s;
        }
    };

    run_blocks(
        {
            name     => 'exact path',
            http     => $HTTP,
            config   => q{ llmlimit api; location / { return 200 "ok\n"; } },
            requests => [
                { req => 'GET /info', repeat => 2, status => 200,
                  headers => { 'X-RateLimit-Remaining' => [1, 0] } },
                { req => 'GET /info', status => 429,
                  headers => { 'Retry-After' => qr/^\d+$/ },
                  json => { error => { category => 'Info' } } },
            ],
        },
    );

    # or by hand
    my $t = LLMLimit::Test->new(http => $HTTP, config => '...')->start;
    my $r = $t->conn->req('GET /info', headers => { 'X-Api-Key' => uid() });
    is($r->status, 200);
    $t->reload(http => $HTTP2);
    $t->stop;                      # also checks error.log (and valgrind)

    finish();                      # stops what runs, done_testing

=head1 DESCRIPTION

See t/README.md.

=cut
