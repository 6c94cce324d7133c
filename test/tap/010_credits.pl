# Copyright: the apikeys authors.
#
# Credits under real concurrency, across flushes, crashes and restarts
# (library preloaded).  A key's balance lives in shared memory once loaded:
# verify spends cost credits under the key entry's spinlock, refuses with
# USAGE_EXCEEDED (spending nothing) when fewer are left, and the database's
# worker subtracts what was spent from apikeys.keys.credits at its usage
# flushes.
#
#  1. 8 pgbench clients, 400 verifications of one key with 50 credits (no
#     rate limit): exactly 50 VALID (requests) and 350 USAGE_EXCEEDED
#     (failures) in get_key(), which shows 0 credits left; after
#     apikeys.flush() the column apikeys.keys.credits is 0.
#  2. The same with cost 3 and 100 credits: exactly 33 VALID, 367 refused,
#     1 credit left, in get_key() and in the column after a flush.
#  3. 8 pgbench clients verifying for 10 s while another session calls
#     add_credits(+1) N = 200 times, one transaction each (the clients
#     still at work when the last one commits), and the worker flushes
#     every second: right after, VALID answers plus the credits
#     left make exactly the initial credits + N, and every request was
#     counted once; once the clients made more requests than that, VALID =
#     initial + N and 0 are left, in get_key() and in the column.
#  4. A crash loses at most the spending not yet written, so the balance
#     goes back up, never down (apikeys.usage_flush_interval = 1h and a
#     session kept connected, so that only apikeys.flush() writes): spend 5
#     of 10, flush, spend 3 more (unwritten: the column still says 5),
#     immediate stop, restart: 5 left, in get_key() and the column, and
#     exactly those 5 can be spent.
#  5. A clean (fast) restart loses nothing: spend 4 of 10 without a flush
#     (the column still says 10), restart: the shutdown flush wrote them,
#     6 left, and exactly those 6 can be spent.
#  6. apikeys.max_credit_keys = 100: once every entry holds spending not
#     yet written, another credit-limited key is refused (USAGE_EXCEEDED
#     with its written balance, nothing spent) unless the call costs
#     nothing; after a flush the idle entries make room again, and keys
#     whose entries were evicted, verified again, have their spending
#     written.
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
use Time::HiRes qw(time sleep);

my $t0 = time();

# "requests_today|failures_today|credits" of a key, from get_key().
sub key_state
{
	my ($node, $db, $id, $owner) = @_;
	return sql($node, $db, qq{
		SELECT requests_today || '|' || failures_today || '|' || credits
		  FROM apikeys.get_key('$id', '$owner')});
}

# The written balance: the column apikeys.keys.credits.
sub written
{
	my ($node, $db, $id) = @_;
	return sql($node, $db, qq{SELECT credits FROM apikeys.keys WHERE id = '$id'});
}

# A pgbench script file in the node's directory: the path.
sub script
{
	my ($node, $name, $text) = @_;
	my $path = $node->basedir . "/$name.sql";
	open(my $fh, '>', $path) or die "cannot write $path: $!";
	print $fh $text;
	close($fh);
	return $path;
}

#
# 1-3: the worker flushes every second (test/apikeys.conf), so its writes
# race with the spending.
#
my $node = new_node('credits');
$node->safe_psql('postgres', 'CREATE DATABASE cr');
sql($node, 'cr', 'CREATE EXTENSION apikeys');
sql($node, 'cr', q{SELECT apikeys.set_plan('racer', 'enterprise')});
my $log_start = 0;

my ($id1, $tok1) = new_key($node, 'cr', q{'racer', 'fifty', credits => 50});
my ($id2, $tok2) = new_key($node, 'cr', q{'racer', 'hundred at 3', credits => 100});
my ($id3, $tok3) = new_key($node, 'cr', q{'racer', 'topped up', credits => 10});
sql($node, 'cr', qq{CREATE TABLE tok AS
	SELECT * FROM (VALUES (1, '$id1'::uuid, '$tok1'::text), (2, '$id2', '$tok2'), (3, '$id3', '$tok3'))
	    t(n, key_id, token)});

# 1. Eight clients race on 50 credits.
{
	my $s = script($node, 'cost1', "SELECT (apikeys.verify(token)).code FROM tok WHERE n = 1;\n");
	$node->command_ok(
		[ 'pgbench', '-n', '-c', '8', '-j', '8', '-t', '50', '-f', $s, '-d', 'cr' ],
		'1: pgbench: 8 clients x 50 verifications');
	is(key_state($node, 'cr', $id1, 'racer'), '50|350|0',
		'1: exactly 50 VALID, 350 USAGE_EXCEEDED, 0 credits left');
	sql($node, 'cr', 'SELECT apikeys.flush()');
	is(written($node, 'cr', $id1), '0', '1: after flush(): apikeys.keys.credits is 0');
	is(key_state($node, 'cr', $id1, 'racer'), '50|350|0', '1: get_key() unchanged by the flush');
	is(sql($node, 'cr', qq{SELECT code || '|' || credits_remaining FROM apikeys.verify('$tok1')}),
		'USAGE_EXCEEDED|0', '1: a new session: USAGE_EXCEEDED, 0 left');
}

# 2. Cost 3, 100 credits: 33 calls, 1 credit left.
{
	my $s = script($node, 'cost3',
		"SELECT (apikeys.verify(token, '{}', NULL, 3)).code FROM tok WHERE n = 2;\n");
	$node->command_ok(
		[ 'pgbench', '-n', '-c', '8', '-j', '8', '-t', '50', '-f', $s, '-d', 'cr' ],
		'2: pgbench: 8 clients x 50 verifications of cost 3');
	is(key_state($node, 'cr', $id2, 'racer'), '33|367|1',
		'2: exactly 33 VALID, 367 USAGE_EXCEEDED, 1 credit left');
	sql($node, 'cr', 'SELECT apikeys.flush()');
	is(written($node, 'cr', $id2), '1', '2: after flush(): apikeys.keys.credits is 1');
	is(sql($node, 'cr', qq{SELECT string_agg(code || '/' || credits_remaining, ',' ORDER BY c)
	                         FROM unnest(ARRAY[2, 1, 1]) WITH ORDINALITY u(cost, c),
	                              LATERAL apikeys.verify('$tok2', '{}', NULL, u.cost)}),
		'USAGE_EXCEEDED/1,VALID/0,USAGE_EXCEEDED/0', '2: the last credit: cost 2 refused, cost 1 VALID');
}

# 3. Spending while credits are added, one transaction at a time.
{
	my ($initial, $n_adds, $seconds) = (10, 200, 10);
	my $verify = script($node, 'verify3', "SELECT (apikeys.verify(token)).code FROM tok WHERE n = 3;\n");
	my $add = script($node, 'add3',
		"SELECT apikeys.add_credits(key_id, 'racer', 1) FROM tok WHERE n = 3;\n\\sleep 5 ms\n");
	my ($out, $err) = ('', '');
	my $verifiers = IPC::Run::start(
		[ 'pgbench', '-n', '-c', '8', '-j', '8', '-T', $seconds, '-f', $verify,
			'-h', $node->host, '-p', $node->port, 'cr' ],
		'<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout($seconds + 120));
	sleep(0.3);
	my $t_add = time();
	$node->command_ok(
		[ 'pgbench', '-n', '-c', '1', '-t', $n_adds, '-f', $add, '-d', 'cr' ],
		"3: pgbench: $n_adds add_credits(+1), one transaction each, while 8 clients verify");
	my $add_seconds = time() - $t_add;
	is(sql($node, 'cr', q{SELECT count(*) FROM pg_stat_activity
	                       WHERE datname = 'cr' AND backend_type = 'client backend'
	                         AND pid <> pg_backend_pid()}),
		'8', '3: the 8 verifying clients were still at work when the last add had committed');
	my $finished = eval { $verifiers->finish; };
	ok($finished, '3: the verifying clients ran to the end') or diag("pgbench: $@\n$err");
	my ($total) = $out =~ /number of transactions actually processed: (\d+)/;
	$total //= -1;
	note(sprintf('3: %d verifications in %d s; the adds took %.2f s', $total, $seconds, $add_seconds));

	my ($valid, $failed, $left) = split /\|/, key_state($node, 'cr', $id3, 'racer');
	is($valid + $left, $initial + $n_adds,
		"3: VALID ($valid) + credits left ($left) = initial + added (" . ($initial + $n_adds) . ')');
	is($valid + $failed, $total, "3: every verification counted once ($total)");
	is(sql($node, 'cr', qq{SELECT count(*) FROM apikeys.audit_log
	                        WHERE key_id = '$id3' AND event = 'credits_changed'}),
		$n_adds, "3: $n_adds credits_changed audit rows");

	# The clients made far more requests than there were credits; spend what
	# is left, if anything, so that the totals are known exactly.
	my $drain = $initial + $n_adds + 10;
	is(sql($node, 'cr', qq{SELECT count(*) FILTER (WHERE (apikeys.verify('$tok3')).code = 'VALID')
	                         FROM generate_series(1, $drain)}),
		$left, "3: $drain more verifications: exactly the $left credits left are VALID");
	is(key_state($node, 'cr', $id3, 'racer'),
		($initial + $n_adds) . '|' . ($total + $drain - $initial - $n_adds) . '|0',
		'3: VALID = initial + added, the rest refused, 0 left');
	sql($node, 'cr', 'SELECT apikeys.flush()');
	is(written($node, 'cr', $id3), '0', '3: after flush(): apikeys.keys.credits is 0');
	is(sql($node, 'cr', qq{SELECT apikeys.add_credits('$id3', 'racer', 2)}), '2',
		'3: add_credits(+2) on the empty key returns 2');
	is(sql($node, 'cr', qq{SELECT string_agg(v.code, ',' ORDER BY i) FROM generate_series(1, 3) i,
	                                LATERAL apikeys.verify(CASE WHEN i > 0 THEN '$tok3' END) v}),
		'VALID,VALID,USAGE_EXCEEDED', '3: ... and exactly 2 more calls pass');
}

no_log_errors($node, $log_start, '1-3: no ERROR in the server log');
$node->stop;

#
# 4-5: usage counts and spending are written only by apikeys.flush() and at
# shutdown.  A worker also writes them as soon as no client is connected to
# its database, so a session stays connected throughout.
#
my $cnode = new_node('crash', "apikeys.usage_flush_interval = 3600\napikeys.max_credit_keys = 100\n");
$cnode->safe_psql('postgres', 'CREATE DATABASE cr');
sql($cnode, 'cr', 'CREATE EXTENSION apikeys');
sql($cnode, 'cr', q{SELECT apikeys.set_plan('crash', 'enterprise')});
is(sql($cnode, 'cr', q{SHOW apikeys.usage_flush_interval}), '1h', '4: usage_flush_interval is an hour');

# Codes and credits_remaining of verifications of the given costs in one statement.
sub spend
{
	my ($s, $token, @costs) = @_;
	my $arr = join(',', @costs);
	return $s->query_safe(qq{SELECT string_agg(code || '/' || credits_remaining, ',' ORDER BY c)
	                           FROM unnest(ARRAY[$arr]) WITH ORDINALITY u(cost, c),
	                                LATERAL apikeys.verify('$token', '{}', NULL, u.cost)});
}

# 4. Crash.
{
	my ($id, $tok) = new_key($cnode, 'cr', q{'crash', 'crashed', credits => 10});
	my $held = $cnode->background_psql('cr');
	$held->set_query_timer_restart();
	is(spend($held, $tok, (1) x 5), 'VALID/9,VALID/8,VALID/7,VALID/6,VALID/5', '4: spend 5 of 10');
	$held->query_safe('SELECT apikeys.flush()');
	is(written($cnode, 'cr', $id), '5', '4: flush() wrote them: the column says 5');
	is(spend($held, $tok, 1, 2), 'VALID/4,VALID/2', '4: spend 3 more');
	sleep(2);
	is(written($cnode, 'cr', $id), '5', '4: 2 s later the 3 are still unwritten: the column says 5');
	is(key_state($cnode, 'cr', $id, 'crash'), '7|0|2', '4: get_key(): 7 requests, 2 credits left');

	my $log_from = -s $cnode->logfile;
	$cnode->stop('immediate');
	eval { $held->quit; };
	$cnode->start;

	is(written($cnode, 'cr', $id), '5', '4: after the crash: the column still says 5');
	is(sql($cnode, 'cr', qq{SELECT credits FROM apikeys.get_key('$id', 'crash')}), '5',
		'4: after the crash: get_key() says 5 (the unwritten 3 came back, nothing more was taken)');
	is(sql($cnode, 'cr', qq{SELECT string_agg(code || '/' || credits_remaining, ',' ORDER BY c)
	                          FROM unnest(ARRAY[6, 5, 1]) WITH ORDINALITY u(cost, c),
	                               LATERAL apikeys.verify('$tok', '{}', NULL, u.cost)}),
		'USAGE_EXCEEDED/5,VALID/0,USAGE_EXCEEDED/0', '4: exactly 5 can be spent: cost 6 refused, cost 5 VALID, then cost 1 refused');
	no_log_errors($cnode, $log_from, '4: no ERROR in the server log across the crash');
}

# 5. Clean restart.
{
	my ($id, $tok) = new_key($cnode, 'cr', q{'crash', 'restarted', credits => 10});
	my $held = $cnode->background_psql('cr');
	$held->set_query_timer_restart();
	is(spend($held, $tok, 1, 1, 2), 'VALID/9,VALID/8,VALID/6', '5: spend 4 of 10');
	sleep(2);
	is(written($cnode, 'cr', $id), '10', '5: 2 s later nothing is written: the column says 10');
	is(sql($cnode, 'cr', qq{SELECT credits FROM apikeys.get_key('$id', 'crash')}), '6',
		'5: get_key() says 6');

	my $log_from = -s $cnode->logfile;
	$cnode->restart;    # pg_ctl restart: fast shutdown, which ends $held
	eval { $held->quit; };

	is(written($cnode, 'cr', $id), '6', '5: after a clean restart the column says 6 (shutdown flush)');
	is(sql($cnode, 'cr', qq{SELECT credits FROM apikeys.get_key('$id', 'crash')}), '6',
		'5: get_key() says 6');
	is(sql($cnode, 'cr', qq{SELECT string_agg(code || '/' || credits_remaining, ',' ORDER BY c)
	                          FROM unnest(ARRAY[7, 6, 1]) WITH ORDINALITY u(cost, c),
	                               LATERAL apikeys.verify('$tok', '{}', NULL, u.cost)}),
		'USAGE_EXCEEDED/6,VALID/0,USAGE_EXCEEDED/0', '5: exactly 6 can be spent');
	no_log_errors($cnode, $log_from, '5: no ERROR in the server log across the restart',
		qr/FATAL:  terminating connection due to administrator command/);
}

# 6. A full table: apikeys.max_credit_keys = 100 (the least).  Once 100
# keys hold spending not yet written, a further credit-limited key is
# refused (fail closed) for any cost but 0, with its written balance; a
# flush makes the entries idle, and the next keys are loaded in their place.
{
	my $held = $cnode->background_psql('cr');
	$held->set_query_timer_restart();
	$held->query_safe(q{CREATE TABLE full_keys AS
		SELECT i, c.key_id, c.token::text AS token
		  FROM generate_series(1, 102) i,
		       LATERAL apikeys.create_key('crash', 'full ' || i, credits => 3) c});
	# Section 5's key holds the one entry left: the flush makes it idle.
	$held->query_safe('SELECT apikeys.flush()');
	is($held->query_safe(q{SELECT string_agg(v.code, ',' ORDER BY f.i)
	                          FROM full_keys f, LATERAL apikeys.verify(f.token) v
	                         WHERE f.i <= 100}),
		join(',', ('VALID') x 100),
		'6: 100 keys spend a credit each (the last one in the place of the idle entry)');
	is($held->query_safe(q{SELECT string_agg(v.code || '/' || v.credits_remaining, ',' ORDER BY f.i)
	                          FROM full_keys f, LATERAL apikeys.verify(f.token) v
	                         WHERE f.i IN (101, 102)}),
		'USAGE_EXCEEDED/3,USAGE_EXCEEDED/3', '6: no room: refused, spending nothing, with the written balance');
	is($held->query_safe(q{SELECT string_agg(v.code || '/' || v.credits_remaining, ',') FROM full_keys f,
	                               LATERAL apikeys.verify(f.token, '{}', NULL, 0) v WHERE f.i = 101}),
		'VALID/3', '6: a call that costs nothing still passes');
	$held->query_safe('SELECT apikeys.flush()');
	is($held->query_safe(q{SELECT string_agg(v.code || '/' || v.credits_remaining, ',' ORDER BY f.i)
	                          FROM full_keys f, LATERAL apikeys.verify(f.token) v
	                         WHERE f.i IN (101, 102)}),
		'VALID/2,VALID/2', '6: after a flush the entries are idle and make room');
	is($held->query_safe(q{SELECT count(*) FROM full_keys f JOIN apikeys.keys k ON k.id = f.key_id
	                        WHERE f.i <= 100 AND k.credits = 2}),
		'100', '6: and the flush wrote the 100 spent credits');
	# The fast index forgets every entry evicted to make room: a key
	# evicted, and verified again, is loaded afresh into the table, so its
	# spending is written (a slot still naming the freed entry would spend
	# there, where no flush finds it).
	$held->query_safe(q{CREATE TABLE again AS SELECT f.i, f.key_id, v.code
	                      FROM full_keys f, LATERAL apikeys.verify(f.token) v WHERE f.i <= 100});
	$held->query_safe('SELECT apikeys.flush()');
	is($held->query_safe(q{SELECT count(*) FILTER (WHERE a.code = 'VALID') || '/' ||
	                              count(*) FILTER (WHERE k.credits = CASE a.code WHEN 'VALID' THEN 1 ELSE 2 END)
	                         FROM again a JOIN apikeys.keys k ON k.id = a.key_id}),
		'98/100', '6: keys evicted and verified again: every spending written (two found no room)');
	$held->quit;
}

$cnode->stop;
note(sprintf('010_credits took %.1f s', time() - $t0));
done_testing();
