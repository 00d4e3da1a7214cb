# Helpers for the Redis store's tests (t/redis*.t): a real redis-server per
# test on a free port (and optionally a unix socket), a small RESP client,
# and a fake server that answers what it is told to.
#
#   require "$FindBin::Bin/redis-lib.pl";
#   my $rd = LLMLimit::Redis->new(unix => 1, requirepass => 'pw');
#   LLMLimit::Redis->new(bind => '127.0.0.2', port => $p);  # another address
#   $rd->addr;  $rd->port;  $rd->unix;          # for redis=...
#   $rd->cmd('SET', 'k', 'v');                  # reply: string, number,
#                                               # array ref, undef (nil) or
#                                               # { error => '...' }
#   $rd->keys(db => 3);  $rd->stop;  $rd->start;  $rd->restart;
#   my $f = LLMLimit::Redis::Fake->new(sub { my ($args, $n) = @_; ... });
#   my @responses = LLMLimit::Redis::one_turn($worker_pid, \@conns, $text);
#
# Only core Perl.

package LLMLimit::Redis;

use strict;
use warnings;

use Carp qw(croak);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use IO::Socket::UNIX;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

our $SERVER = $ENV{LLMLIMIT_REDIS_SERVER} || 'redis-server';

my @ALL;


sub available {
    return system("command -v $SERVER >/dev/null 2>&1") == 0;
}


sub new {
    my ($class, %o) = @_;

    my $self = bless { %o, creator => $$ }, $class;

    $self->{dir} = tempdir('llmlimit-redis-XXXXXX', TMPDIR => 1,
                           CLEANUP => 1);
    chmod 0755, $self->{dir};

    $self->{port} //= LLMLimit::Test::free_port();
    $self->{unix} = "$self->{dir}/redis.sock" if $o{unix};

    push @ALL, $self;

    return $self->start;
}


sub port { $_[0]{port} }
sub unix { $_[0]{unix} }
sub addr { ($_[0]{bind} // '127.0.0.1') . ":$_[0]{port}" }
sub pid  { $_[0]{pid} }


sub start {
    my ($self) = @_;

    my @cmd = ($SERVER, '--port', $self->{port},
               '--bind', $self->{bind} // '127.0.0.1',
               '--save', '', '--appendonly', 'no', '--daemonize', 'no',
               '--dir', $self->{dir}, '--logfile', "$self->{dir}/redis.log",
               '--enable-debug-command', 'yes');

    push @cmd, '--unixsocket', $self->{unix}, '--unixsocketperm', '777'
        if $self->{unix};
    push @cmd, '--requirepass', $self->{requirepass}
        if defined $self->{requirepass};

    return $self->spawn(@cmd);
}


# runs the command, returns once it answers PING
sub spawn {
    my ($self, @cmd) = @_;

    my $pid = fork;
    croak "fork: $!" unless defined $pid;

    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$self->{dir}/stdout.log";
        open STDERR, '>&', \*STDOUT;
        { exec { $cmd[0] } @cmd; }
        POSIX::_exit(127);
    }

    $self->{pid} = $pid;

    my $end = time + 10 * LLMLimit::Test::slow();

    while (time < $end) {
        if (waitpid($pid, WNOHANG) == $pid) {
            $self->{pid} = undef;
            croak "$cmd[0] exited:\n" . $self->log;
        }

        my $r = eval { $self->cmd('PING') };
        return $self if defined $r && !ref $r && $r eq 'PONG';

        $self->disconnect;
        sleep 0.05;
    }

    croak "$cmd[0] did not start:\n" . $self->log;
}


sub log {
    my ($self) = @_;
    local $/;
    open my $fh, '<', "$self->{dir}/redis.log" or return '';
    return <$fh> // '';
}


sub stop {
    my ($self) = @_;

    $self->disconnect;

    return unless $self->{pid};

    kill 'TERM', $self->{pid};

    my $end = time + 10;
    while (time < $end) {
        last if waitpid($self->{pid}, WNOHANG) == $self->{pid};
        sleep 0.02;
    }

    if (kill 0, $self->{pid}) {
        kill 'KILL', $self->{pid};
        waitpid($self->{pid}, 0);
    }

    $self->{pid} = undef;
    unlink $self->{unix} if $self->{unix};
}


sub restart {
    my ($self) = @_;
    $self->stop;
    return $self->start;
}


sub disconnect {
    my ($self) = @_;
    close $self->{sock} if $self->{sock};
    $self->{sock} = undef;
}


sub connect {
    my ($self) = @_;

    my $s = IO::Socket::INET->new(PeerAddr => $self->addr, Proto => 'tcp',
                                  Timeout => 5)
        or croak "connect to redis " . $self->addr . ": $!";
    binmode $s;

    if (defined $self->{requirepass}) {
        write_cmd($s, 'AUTH', $self->{requirepass});
        my $r = read_reply($s);
        croak "AUTH: $r->{error}" if ref $r eq 'HASH';
    }

    return $s;
}


# one command on the helper's own connection; the reply as Perl data
sub cmd {
    my ($self, @args) = @_;

    $self->{sock} //= $self->connect;
    write_cmd($self->{sock}, @args);

    return read_reply($self->{sock});
}


# sends a command on a new connection without waiting for the reply
# (DEBUG SLEEP, CLIENT PAUSE); returns the connection
sub send_only {
    my ($self, @args) = @_;
    my $s = $self->connect;
    write_cmd($s, @args);
    return $s;
}


# all keys (of database db), by SCAN
sub keys {
    my ($self, %o) = @_;

    my $s = $self->connect;

    if ($o{db}) {
        write_cmd($s, 'SELECT', $o{db});
        read_reply($s);
    }

    my ($cursor, @keys) = (0);

    do {
        write_cmd($s, 'SCAN', $cursor, 'COUNT', 1000);
        my $r = read_reply($s);
        croak "SCAN: unexpected reply" unless ref $r eq 'ARRAY';
        $cursor = $r->[0];
        push @keys, @{ $r->[1] };
    } while ($cursor ne '0');

    close $s;

    return sort @keys;
}


sub write_cmd {
    my ($s, @args) = @_;

    my $out = '*' . scalar(@args) . "\r\n";
    $out .= '$' . length($_) . "\r\n$_\r\n" for @args;

    print {$s} $out or croak "redis write: $!";
}


sub read_line {
    my ($s) = @_;
    my $line = <$s>;
    croak "redis: connection closed" unless defined $line;
    $line =~ s/\r\n\z//;
    return $line;
}


sub read_reply {
    my ($s) = @_;

    my $line = read_line($s);
    my ($type, $rest) = (substr($line, 0, 1), substr($line, 1));

    return $rest if $type eq '+';
    return { error => $rest } if $type eq '-';
    return 0 + $rest if $type eq ':';

    if ($type eq '$') {
        return undef if $rest < 0;
        my $buf = '';
        while (length $buf < $rest + 2) {
            my $n = read($s, $buf, $rest + 2 - length $buf, length $buf);
            croak "redis: connection closed" unless $n;
        }
        return substr($buf, 0, $rest);
    }

    if ($type eq '*') {
        return undef if $rest < 0;
        return [ map { read_reply($s) } 1 .. $rest ];
    }

    croak "redis: unexpected reply line '$line'";
}


END {
    $_->stop for grep { $_->{pid} && $_->{creator} == $$ } @ALL;
}


# ---------------------------------------------------------------------------
# A redis-sentinel watching MASTER_PORT (on 127.0.0.1) as "mymaster", quorum
# 2, down after 1 s; the same helpers as a redis-server.
#
#   my $s = LLMLimit::Redis::Sentinel->new(master_port => $m->port);

package LLMLimit::Redis::Sentinel;

use strict;
use warnings;

use Carp qw(croak);

our @ISA = ('LLMLimit::Redis');

our $SENTINEL = $ENV{LLMLIMIT_REDIS_SENTINEL} || 'redis-sentinel';


sub available {
    return system("command -v $SENTINEL >/dev/null 2>&1") == 0;
}


sub start {
    my ($self) = @_;

    my $conf = "$self->{dir}/sentinel.conf";

    open my $fh, '>', $conf or croak "$conf: $!";
    print {$fh} <<"END";
port $self->{port}
bind 127.0.0.1
daemonize no
dir $self->{dir}
logfile $self->{dir}/redis.log
sentinel monitor mymaster 127.0.0.1 $self->{master_port} 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 5000
sentinel parallel-syncs mymaster 1
END
    close $fh;

    return $self->spawn($SENTINEL, $conf);
}


# SENTINEL MASTER mymaster as a hash
sub master {
    my ($self) = @_;
    my $r = eval { $self->cmd('SENTINEL', 'MASTER', 'mymaster') };
    $self->disconnect unless defined $r;
    return {} unless ref $r eq 'ARRAY';
    return { @$r };
}


# ---------------------------------------------------------------------------
# A fake Redis: a forked process accepting connections on a free port and
# answering each command (an array of bulk strings) with what
# $answer->(\@args, $n) returns: raw bytes to send, or undef to close the
# connection.  $n counts commands over all connections.

package LLMLimit::Redis::Fake;

use strict;
use warnings;

use Carp qw(croak);
use IO::Select;
use IO::Socket::INET;
use POSIX ();

my @FAKES;


sub new {
    my ($class, $answer) = @_;

    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                  Proto => 'tcp', Listen => 64,
                                  ReuseAddr => 1)
        or croak "listen: $!";

    my $self = bless { port => $l->sockport, creator => $$ }, $class;

    my $pid = fork;
    croak "fork: $!" unless defined $pid;

    if ($pid == 0) {
        serve($l, $answer);
        POSIX::_exit(0);
    }

    close $l;
    $self->{pid} = $pid;
    push @FAKES, $self;

    return $self;
}


sub port { $_[0]{port} }
sub addr { "127.0.0.1:$_[0]{port}" }


sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'KILL', $self->{pid};
    waitpid($self->{pid}, 0);
    $self->{pid} = undef;
}


sub serve {
    my ($l, $answer) = @_;

    my $sel = IO::Select->new($l);
    my (%buf, $n);

    $n = 0;

    for (;;) {
        for my $s ($sel->can_read) {
            if ($s == $l) {
                my $c = $l->accept or next;
                binmode $c;
                $sel->add($c);
                $buf{$c} = '';
                next;
            }

            my $got = sysread($s, $buf{$s}, 65536, length $buf{$s});

            if (!$got) {
                $sel->remove($s);
                delete $buf{$s};
                close $s;
                next;
            }

            while (my $args = parse(\$buf{$s})) {
                my $out = $answer->($args, $n++);

                if (!defined $out) {
                    $sel->remove($s);
                    delete $buf{$s};
                    close $s;
                    last;
                }

                syswrite($s, $out) if length $out;
            }
        }
    }
}


# one complete command from the buffer, or undef
sub parse {
    my ($b) = @_;

    return undef unless $$b =~ /\A\*(\d+)\r\n/;

    my $n = $1;
    my $pos = length("*$n\r\n");
    my @args;

    for (1 .. $n) {
        return undef unless substr($$b, $pos) =~ /\A\$(\d+)\r\n/;
        my $len = $1;
        $pos += length("\$$len\r\n");
        return undef if length($$b) < $pos + $len + 2;
        push @args, substr($$b, $pos, $len);
        $pos += $len + 2;
    }

    substr($$b, 0, $pos) = '';

    return \@args;
}


END {
    $_->stop for grep { $_->{creator} == $$ } @FAKES;
}



# one_turn(WORKER, [Conn...], TEXT or sub { my ($i) = @_; TEXT }): writes a
# request on each kept-alive connection while the worker is stopped, so
# that it reads them all in one turn of its event loop; returns the
# responses in order.
sub LLMLimit::Redis::one_turn {
    my ($worker, $conns, $text) = @_;

    kill 'STOP', $worker;

    for (1 .. 1000) {
        my $st = LLMLimit::Test::slurp("/proc/$worker/stat") // '';
        last if $st =~ /\)\s+T/;
        Time::HiRes::sleep(0.01);
    }

    for my $i (0 .. $#$conns) {
        my $req = ref $text ? $text->($i) : $text;
        syswrite($conns->[$i]{sock}, $req) == length $req
            or die "write: $!";
    }

    kill 'CONT', $worker;

    return map { $_->exchange('', 'POST') } @$conns;
}

1;
