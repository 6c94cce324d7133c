# Copyright: the apikeys authors.
#
# Rate limits under real concurrency (library preloaded).  The allowance of
# a key is one theoretical arrival time in shared memory, changed under the
# key entry's spinlock, so clients racing on one key never get one VALID too
# many.
#
#  1. 8 pgbench clients, 400 verifications of one key with rate_limit 1 a
#     minute and rate_burst 49: exactly 50 answer VALID (counted as
#     requests) and the other 350 RATE_LIMITED (failures).
#  2. The same key's allowance is shared by every database session and
#     survives the worker's flushes: right after, a new session still gets
#     RATE_LIMITED with ratelimit_remaining 0 and a reset about a minute
#     after the first request.
#  3. apikeys.max_tracked_keys = 100 (the least): in the next minute, a key
#     whose allowance is spent keeps its rate-limit entry while other keys
#     fill the table (forgetting it would hand it a fresh burst): of 5 more
#     verifications at most 2 pass (one a minute since the burst).
#  4. An owner-wide limit (its plan's rate_limit 3, so 3 at once): 8
#     pgbench clients, 400 verifications spread over 4 keys of the owner:
#     exactly 3 VALID in all.
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
use Time::HiRes qw(time sleep);

my $node = new_node('ratelimits', "apikeys.max_tracked_keys = 100\n");
$node->safe_psql('postgres', 'CREATE DATABASE rl');
sql($node, 'rl', 'CREATE EXTENSION apikeys');
sql($node, 'rl', q{SELECT apikeys.set_plan('racer', 'enterprise')});

# 1. Eight clients race on one key.
my ($id, $token) = new_key($node, 'rl', q{'racer', 'raced', rate_limit => 1, rate_burst => 49});
sql($node, 'rl', "CREATE TABLE tok AS SELECT '$token'::text AS token");
my $script = $node->basedir . '/verify.sql';
open(my $fh, '>', $script) or die "cannot write $script: $!";
print $fh "SELECT (apikeys.verify(token)).code FROM tok;\n";
close($fh);
$node->command_ok(
	[ 'pgbench', '-n', '-c', '8', '-j', '8', '-t', '50', '-f', $script, '-d', 'rl' ],
	'1: pgbench: 8 clients x 50 verifications');
is(sql($node, 'rl',
		qq{SELECT requests_today || '|' || failures_today FROM apikeys.get_key('$id', 'racer')}),
	'50|350', '1: exactly 50 VALID (1 a minute + burst 49), 350 RATE_LIMITED');

# 2. Shared across sessions, and unaffected by flushes.
sql($node, 'rl', 'SELECT apikeys.flush()');
is(sql($node, 'rl',
		qq{SELECT code || '|' || ratelimit_remaining || '|' ||
		          (ratelimit_reset BETWEEN now() AND now() + interval '61 seconds')
		     FROM apikeys.verify('$token')}),
	'RATE_LIMITED|0|true', '2: a new session after the flush: still RATE_LIMITED, reset within a minute');
sql($node, 'rl', 'SELECT apikeys.flush()');
is(sql($node, 'rl', qq{SELECT requests || '|' || failures FROM apikeys.key_usage WHERE key_id = '$id'}),
	'50|351', '2: the flushes wrote exactly those counts');

# 4 (before 3, which fills the usage table). An owner-wide limit under the
# same race: four keys of one owner whose
# plan allows 3 a minute (its burst is a minute's worth: 3 at once, then one
# every 20 s, longer than the race takes), shared by 8 clients over the
# four keys.
sql($node, 'rl', q{INSERT INTO apikeys.plans (name, rate_limit) VALUES ('metered', 3)});
sql($node, 'rl', q{SELECT apikeys.set_plan('tenant', 'metered')});
my @tenant;
for my $i (1 .. 4)
{
	my ($kid, $t) = new_key($node, 'rl', qq{'tenant', 'tenant $i'});
	push @tenant, [ $kid, $t ];
}
sql($node, 'rl', 'CREATE TABLE tenant_tok (n int, token text)');
sql($node, 'rl', 'INSERT INTO tenant_tok VALUES ' . join(',', map { "($_, '$tenant[$_ - 1][1]')" } 1 .. 4));
my $tscript = $node->basedir . '/verify_tenant.sql';
open($fh, '>', $tscript) or die "cannot write $tscript: $!";
print $fh "\\set n random(1, 4)\n";
print $fh "SELECT (apikeys.verify(token)).code FROM tenant_tok WHERE n = :n;\n";
close($fh);
$node->command_ok(
	[ 'pgbench', '-n', '-c', '8', '-j', '8', '-t', '50', '-f', $tscript, '-d', 'rl' ],
	'4: pgbench: 8 clients x 50 verifications over 4 keys of one owner');
is(sql($node, 'rl',
		q{SELECT sum(requests_today) || '|' || sum(failures_today) FROM apikeys.list_keys('tenant')}),
	'3|397', "4: exactly 3 VALID across the owner's keys (the plan's 3 a minute), 397 RATE_LIMITED");

# 3. A full table does not forget a spent allowance.  In the next minute the
# raced key's entry has nothing to write and was not used this minute: only
# its rate-limit state, 50 minutes ahead, keeps it.
{
	my $left = 61 - (time() % 60);
	note("waiting $left s for the next minute");
	sleep($left);
}
my @others;
for my $i (1 .. 130)
{
	my (undef, $t) = new_key($node, 'rl', qq{'racer', 'filler $i'});
	push @others, $t;
}
sql($node, 'rl', 'SELECT apikeys.flush()');
sql($node, 'rl', join('', map { "SELECT (apikeys.verify('$_')).code;\n" } @others));
sql($node, 'rl', 'SELECT apikeys.flush()');
sql($node, 'rl', join('', map { "SELECT (apikeys.verify('$_')).code;\n" } @others));
cmp_ok(sql($node, 'rl', 'SELECT untracked_requests FROM apikeys.status()'), '>', 0,
	'3: the table was full (some requests went untracked)');
# A minute or two has passed since its 50, so one or two more may pass (1
# a minute); a forgotten state would let all 5 through (a fresh burst).
cmp_ok(sql($node, 'rl',
		qq{SELECT count(*) FILTER (WHERE v.code = 'VALID')
		     FROM generate_series(1, 5) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN '$token' END) v}),
	'<=', 2, '3: the raced key is still limited: its state was kept');

no_log_errors($node, 'no unexpected errors in the server log');
done_testing();
