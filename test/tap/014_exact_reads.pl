# Copyright: the apikeys authors.
#
# get_key() is exact while the worker writes: a flush moves a key's counts
# and spending from shared memory to the tables, and a read whose snapshot
# was taken before that flush committed must still find them in shared
# memory, even when the flush has already settled by the time the read
# looks there.  (It once did not: such a read missed a whole flush's worth,
# about 1 read in 750 under load.)
#
# 4 pgbench clients verify one key with 10^12 credits (cost 1) for 8 s,
# while the worker flushes every second and one session reads
# get_key() 3000 times in a row: requests_today never goes down and the
# credits left never go up from one read to the next.
#
# Run from the repository root (make prove_installcheck), with the helpers
# of test/perl/ApikeysTest.pm.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/../perl";    # test/perl: ApikeysTest
use ApikeysTest;
use IPC::Run;

my $node = new_node('reads');
$node->safe_psql('postgres', 'CREATE DATABASE er');
sql($node, 'er', 'CREATE EXTENSION apikeys');
sql($node, 'er', q{SELECT apikeys.set_plan('reader', 'enterprise')});
my ($id, $token) = new_key($node, 'er', q{'reader', 'k', credits => 1000000000000});

my $script = $node->basedir . '/verify.sql';
open(my $fh, '>', $script) or die "cannot write $script: $!";
print $fh "SELECT (apikeys.verify('$token')).code;\n";
close($fh);
my ($out, $err) = ('', '');
my $clients = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '4', '-j', '4', '-T', '8', '-f', $script, '-h', $node->host, '-p', $node->port, 'er' ],
	'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(120));
sleep(1);

my $reads = join('', map { "SELECT requests_today || ' ' || credits FROM apikeys.get_key('$id', 'reader');\n" } 1 .. 3000);
my @rows = split /\n/, sql($node, 'er', $reads);
$clients->finish or diag("pgbench: $err");
is(scalar(@rows), 3000, '3000 reads while the clients verify and the worker flushes');

my ($dips, $rises) = (0, 0);
for my $i (1 .. $#rows)
{
	my ($r0, $c0) = split / /, $rows[ $i - 1 ];
	my ($r1, $c1) = split / /, $rows[$i];
	$dips++ if $r1 < $r0;
	$rises++ if $c1 > $c0;
	diag("read $i: requests $r0 -> $r1, credits $c0 -> $c1") if $r1 < $r0 || $c1 > $c0;
}
my ($first_requests) = split / /, $rows[0];
my ($last_requests) = split / /, $rows[-1];
cmp_ok($last_requests - $first_requests, '>', 1000, 'the clients verified throughout the reads');
is($dips, 0, 'requests_today never went down from one read to the next');
is($rises, 0, 'the credits left never went up from one read to the next');

$node->stop;
done_testing();
