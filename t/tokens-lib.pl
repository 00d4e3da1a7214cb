# A fake LLM upstream for the token tests: a forked Perl HTTP/1.1 server
# that answers each path with a fixed body, written as chunks with a pause
# between them, so that nginx receives the pieces in separate reads and a
# number or a key split between two pieces reaches the scanner split.
#
#   my $llm = LLMLimit::FakeLLM->new(
#       '/split' => { type => 'text/event-stream',
#                     pieces => [ 'data: {"usage":{"total_tokens":1', '23}}' ],
#                     die => 1 },       # close without the last chunk
#   );
#   $llm->addr;                          # 127.0.0.1:PORT
#   LLMLimit::FakeLLM::body('/split');   # what the client must receive
#
# Connections are served one at a time, "Connection: close".

package LLMLimit::FakeLLM;

use strict;
use warnings;

use Carp qw(croak);
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep);

my @FAKES;


sub new {
    my ($class, %routes) = @_;

    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                  Proto => 'tcp', Listen => 64,
                                  ReuseAddr => 1)
        or croak "listen: $!";

    my $self = bless { port => $l->sockport, creator => $$,
                       routes => \%routes }, $class;

    my $pid = fork;
    croak "fork: $!" unless defined $pid;

    if ($pid == 0) {
        $SIG{PIPE} = 'IGNORE';
        while (my $c = $l->accept) {
            serve($c, \%routes);
            close $c;
        }
        POSIX::_exit(0);
    }

    close $l;
    $self->{pid} = $pid;
    push @FAKES, $self;

    return $self;
}


sub port { $_[0]{port} }
sub addr { "127.0.0.1:$_[0]{port}" }

# the body a route sends, whole
sub body { my ($self, $path) = @_; join '', @{ $self->{routes}{$path}{pieces} } }


sub serve {
    my ($c, $routes) = @_;

    my $req = '';
    while ($req !~ /\r\n\r\n/) {
        my $n = sysread($c, $req, 4096, length $req);
        return unless $n;
    }

    my ($path) = $req =~ m{^\S+ (\S+)};
    $path =~ s/\?.*//;
    my $r = $routes->{$path};

    unless ($r) {
        syswrite($c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                     . "Connection: close\r\n\r\n");
        return;
    }

    my $head = "HTTP/1.1 200 OK\r\n"
             . 'Content-Type: ' . ($r->{type} // 'application/json') . "\r\n"
             . join('', map { "$_: $r->{headers}{$_}\r\n" }
                            sort keys %{ $r->{headers} // {} })
             . "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";

    syswrite($c, $head) or return;

    for my $piece (@{ $r->{pieces} }) {
        sleep($r->{delay} // 0.03);
        my $out = sprintf("%x\r\n", length $piece) . $piece . "\r\n";
        while (length $out) {
            my $n = syswrite($c, $out);
            return unless $n;
            substr($out, 0, $n) = '';
        }
    }

    return if $r->{die};

    syswrite($c, "0\r\n\r\n");
}


sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'KILL', $self->{pid};
    waitpid($self->{pid}, 0);
    $self->{pid} = undef;
}


END {
    for my $f (@FAKES) {
        $f->stop if $f->{pid} && $f->{creator} == $$;
    }
}


1;
