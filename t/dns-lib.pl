# A tiny DNS server for the tests (core Perl only): a forked process
# answering UDP queries on a free loopback port, type A from a file of
# "NAME ADDRESS" lines that a test rewrites to move a name, read afresh for
# each query.  Names not in the file get NXDOMAIN; other types of a known
# name get an empty answer.  TTL 1 s.
#
#   require "$FindBin::Bin/dns-lib.pl";
#   my $dns = LLMLimit::DNS->new;
#   $dns->set('redis.test' => '127.0.0.2');    # for "resolver $dns->addr"
#   $dns->queries('redis.test');               # A queries answered so far
#   $dns->delay(2);                            # answers 2 s late from now

package LLMLimit::DNS;

use strict;
use warnings;

use Carp qw(croak);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX ();
use Time::HiRes ();

my @ALL;


sub new {
    my ($class) = @_;

    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                  Proto => 'udp')
        or croak "dns: $!";

    my $dir = tempdir('llmlimit-dns-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $self = bless { port => $s->sockport, file => "$dir/names",
                       log => "$dir/queries", creator => $$ }, $class;

    $self->set();

    my $pid = fork;
    croak "fork: $!" unless defined $pid;

    if ($pid == 0) {
        serve($self, $s);
        POSIX::_exit(0);
    }

    close $s;
    $self->{pid} = $pid;
    push @ALL, $self;

    return $self;
}


sub port { $_[0]{port} }
sub addr { "127.0.0.1:$_[0]{port}" }


# the whole table: set(NAME => ADDRESS, ...)
sub set {
    my ($self, %names) = @_;

    open my $fh, '>', "$self->{file}.tmp" or croak "dns: $!";
    print {$fh} "$_ $names{$_}\n" for sort keys %names;
    close $fh;
    rename "$self->{file}.tmp", $self->{file} or croak "dns: $!";
}


sub delay {
    my ($self, $secs) = @_;
    open my $fh, '>', "$self->{file}.delay" or croak "dns: $!";
    print {$fh} "$secs\n";
    close $fh;
}


sub queries {
    my ($self, $name) = @_;
    open my $fh, '<', $self->{log} or return 0;
    return scalar grep { $_ eq "$name\n" } <$fh>;
}


sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'KILL', $self->{pid};
    waitpid($self->{pid}, 0);
    $self->{pid} = undef;
}


sub serve {
    my ($self, $s) = @_;

    for (;;) {
        my $q;
        my $peer = $s->recv($q, 512) or next;
        my $a = answer($self, $q) // next;

        if (open my $fh, '<', "$self->{file}.delay") {
            my $d = <$fh>;
            Time::HiRes::sleep($d) if $d && $d > 0;
        }

        $s->send($a, 0, $peer);
    }
}


sub answer {
    my ($self, $q) = @_;

    return undef if length $q < 17;

    my ($id, $flags) = unpack 'n n', $q;

    # the question: labels, type, class
    my ($pos, @labels) = (12);

    while (1) {
        my $len = ord substr($q, $pos, 1);
        last if $len == 0;
        return undef if $len > 63 || $pos + 1 + $len > length $q;
        push @labels, substr($q, $pos + 1, $len);
        $pos += 1 + $len;
    }

    $pos++;
    return undef if $pos + 4 > length $q;

    my ($type) = unpack 'n', substr($q, $pos, 2);
    my $question = substr($q, 12, $pos + 4 - 12);
    my $name = lc join '.', @labels;

    my %names;
    if (open my $fh, '<', $self->{file}) {
        while (<$fh>) {
            my ($n, $a) = split;
            $names{lc $n} = $a if defined $a;
        }
    }

    my $rd = $flags & 0x0100;
    my ($rcode, @rr) = (0);

    if (!exists $names{$name}) {
        $rcode = 3;

    } elsif ($type == 1) {
        push @rr, pack('n n n N n', 0xc00c, 1, 1, 1, 4)
                  . pack('C4', split /\./, $names{$name});

        if (open my $fh, '>>', $self->{log}) {
            print {$fh} "$name\n";
        }
    }

    return pack('n n n n n n', $id, 0x8400 | $rd | 0x80 | $rcode, 1,
                scalar @rr, 0, 0)
           . $question . join('', @rr);
}


END {
    $_->stop for grep { $_->{pid} && $_->{creator} == $$ } @ALL;
}

1;
