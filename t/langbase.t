#!/usr/bin/perl

# conf.example's Langbase server: limits by plan (hobby 1/1s, pro 300/60s,
# other plans 300/60s), unauthenticated requests 10/60s by IP, Langbase's
# lb-ratelimit-* headers with the reset as a Unix time.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(time sleep);
use LLMLimit::Test;

my $t = LLMLimit::Test->new(conf => conf_example(), nports => 1)->start;
my $PORT = $t->subst('%%PORT2%%');

my $c = $t->conn(port => $PORT);

sub key { return (headers => { 'X-Api-Key' => $_[0] }) }


# hobby: 1 per second
{
    wait_window(1, start => 1, after => 0.05);
    my $a = $c->req('GET /v1/pipes', key('lb-hobby-demo'));
    my $b = $c->req('POST /v1/pipes/run', key('lb-hobby-demo'));
    is_deeply([ $a->status, $b->status ], [200, 429], 'hobby: 1 per second');
    is($a->header('lb-ratelimit-limit'), 1, 'hobby: lb-ratelimit-limit 1');
    is($a->header('lb-ratelimit-remaining'), 0, 'hobby: remaining 0');
    my $reset = $a->header('lb-ratelimit-reset') // '';
    ok($reset =~ /^\d+$/ && $reset >= int(time) && $reset <= time + 3,
       "hobby: lb-ratelimit-reset is a Unix time ($reset)");
    ok(!defined $a->header('X-RateLimit-Limit'), 'no X-RateLimit-*');
    my $j = $b->json // {};
    is($j->{error}{category}, 'API', 'hobby: 429 JSON category');
    is($j->{error}{limit}, 1, 'hobby: JSON limit 1');
    is($j->{error}{period}, 1, 'hobby: JSON period 1');
    like($b->header('Retry-After') // '', qr/^[12]$/, 'hobby: Retry-After');

    # two seconds later the budget is back
    sleep 2.1;
    is($c->req('GET /v1/pipes', key('lb-hobby-demo'))->status, 200,
       'hobby: the next second');
}

# pro: 300 per minute; enterprise: the default token, 300 per minute
for my $plan ('pro', 'enterprise') {
    my $res = admits_exactly($t, 'POST /v1/pipes/run', count => 300,
        period => 60, port => $PORT,
        headers => sub { { 'X-Api-Key' => "lb-$plan-demo" } },
        name => "$plan: exactly 300 per minute");
    is($res->{last} && $res->{last}->header('lb-ratelimit-limit'), 300,
       "$plan: lb-ratelimit-limit 300");
}

# unauthenticated: no key, or a key that is not known, 10 per minute per IP
{
    my $n = 50;
    admits_exactly($t, 'GET /v1/memory', count => 10, period => 60,
        port => $PORT, from => sub { '127.0.1.' . $n++ },
        name => 'no key: 10 per minute per IP');

    my $res = admits_exactly($t, 'GET /v1/memory', count => 10, period => 60,
        port => $PORT, from => sub { '127.0.1.' . $n++ },
        headers => sub { { 'X-Api-Key' => uid('unknown') } },
        name => 'an unknown key: 10 per minute per IP');
    is(($res->{rejected} && $res->{rejected}->json // {})->{error}{category},
       'Unauthenticated', 'unauthenticated: category');

    # the same IP with unknown keys: one budget
    my $from = '127.0.1.' . $n++;
    my $cc = $t->conn(port => $PORT, from => $from);
    my @s = map { $cc->req('GET /', key(uid()))->status } 1 .. 11;
    is_deeply(\@s, [ (200) x 10, 429 ],
              'different unknown keys from one IP share its budget');
}

finish();
