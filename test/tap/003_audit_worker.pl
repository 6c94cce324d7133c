# Copyright: the apikeys authors.
#
# Records that survive the caller's rollback, and the per-database background
# workers that write them (library preloaded, apikeys.flush_interval = 1):
#  (a) failed authenticate() calls in rolled-back transactions reach the audit
#      log as verify_failed, with the key, owner, actor, reason and a count
#      equal to the number of failures, within a few flush intervals;
#  (b) 1000 verifications of unknown well-formed tokens (two prefixes) and
#      250 of malformed ones add a bounded number of rows (at most two per
#      prefix, allowing for a minute boundary) whose counts add up; a slow
#      trickle of one key's failures takes a row per flush interval, not a
#      row per failure;
#  (c) two databases with the extension each get their own failures and not
#      the other's; a third database without the extension gets no worker,
#      no schema, and drops at once;
#  (g) a 53400 plan-limit failure leaves a limit_exceeded row even though
#      the caller's transaction rolled back;
#  (d) the worker killed with SIGKILL: the server restarts, and new failures
#      are recorded again (a worker comes back);
#  (e) clean shutdown flushes: with flush_interval = 1h, failures are not
#      written until a fast shutdown, and are there after the restart; a
#      worker asleep for 1h writes within seconds of a reload to 1 s;
#  (f) DROP EXTENSION stops its database's worker, with no error in the
#      server log, and DROP DATABASE of a database that had failures succeeds
#      once its queue drained;
#  (h) with apikeys.audit_queue_size = 16, failures of 40 distinct keys
#      within one flush count drops in status(), nothing errors, and what was
#      queued is written;
#  (i) on a hot standby verify() answers with the right codes, writes
#      nothing, logs no error, starts no worker, and its failures appear in
#      no audit log, the primary's included.
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
use Time::HiRes qw(time usleep);

my $t0 = time();

my $node = new_node('primary', qq{
restart_after_crash = on
log_statement = none
max_connections = 20
}, allows_streaming => 1);

for my $db (qw(db1 db2 db3 db4 plain))
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
}
for my $db (qw(db1 db2 db3 db4))
{
	$node->safe_psql($db, 'CREATE EXTENSION apikeys');
}
my $superuser = $node->safe_psql('postgres', 'SELECT current_user');

# A key of $owner named $name, revoked: (key_id, token).
sub revoked_key
{
	my ($db, $owner, $name) = @_;
	my ($id, $tok) = new_key($node, $db, "'$owner', '$name'");
	sql($node, $db, qq{SELECT apikeys.revoke('$id', NULL, 'test')});
	return ($id, $tok);
}

my $workers_sql = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikeys worker'};

# No worker runs and nothing is queued: the start of a clean window.
sub quiesce
{
	my ($label) = @_;
	workers_gone_ok($node, $label, 15);
	queue_drained_ok($node, 'db1', $label, 15);
	return;
}

# n failed authenticate() calls, each in its own transaction that is rolled
# back; returns how many raised 28000 with the given verify code.
sub fail_authenticate
{
	my ($db, $token, $n, $code, $actor) = @_;
	my $script = defined $actor ? "SET apikeys.actor = '$actor';\n" : '';
	$script .= "BEGIN;\nSELECT key_id FROM apikeys.authenticate('$token');\nROLLBACK;\n" x $n;
	my (undef, $err) = sql_error($node, $db, $script, on_error_stop => 0);
	my $count = () = $err =~ /ERROR:  28000: \Q$code\E\b/g;
	return $count;
}

# n verify() calls of one token, one per statement; returns how many
# answered $code.
sub fail_verify
{
	my ($db, $token, $n, $code, $n_node) = @_;
	return sql($n_node // $node, $db, qq{SELECT count(*) FROM generate_series(1, $n) g,
	                   LATERAL apikeys.verify('$token' || left(g::text, 0)) v
	                   WHERE v.code = '$code'});
}

# verify_failed rows of one key: "rows|sum of counts".
sub failed_rows
{
	my ($db, $where) = @_;
	return sql($node, $db, qq{SELECT count(*), coalesce(sum((details->>'count')::bigint), 0)
	                    FROM apikeys.audit_log WHERE event = 'verify_failed' AND $where});
}

# The authenticate() failures below are logged as ERROR by the server; they
# are expected, nothing else is.
my $auth_errors = qr/ERROR:  API_KEY_[A-Z_]+$/;

my $log_from = -s $node->logfile;

#
# (a) authenticate() failures in rolled-back transactions.
#
my ($a_id, $a_tok) = revoked_key('db1', 'alice', 'alice key');
avoid_minute_edge(54);
is(fail_authenticate('db1', $a_tok, 5, 'API_KEY_REVOKED', 'frontend'), 5,
	'(a) five authenticate() calls of a revoked key raise 28000 API_KEY_REVOKED');
my $took = wait_until($node, 'db1', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 5
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$a_id'}, 10);
ok(defined $took, '(a) the failures reach the audit log within a few flush intervals');
note(sprintf('(a) written after %.1f s', $took // -1));
my ($rows, $sum) = split /\|/, failed_rows('db1', "key_id = '$a_id'");
is($sum, 5, '(a) verify_failed counts add up to the five failures');
ok($rows >= 1 && $rows <= 2, "(a) ... in at most two rows ($rows)");
is( sql($node, 'db1', qq{SELECT string_agg(DISTINCT concat_ws(',', owner, actor, db_user,
	                  details->>'reason', details ? 'count'), ';')
	            FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$a_id'}),
	"alice,frontend,$superuser,API_KEY_REVOKED,t",
	'(a) rows name the owner, the actor, the database user and reason API_KEY_REVOKED');
is( sql($node, 'db1', qq{SELECT bool_and(at = date_trunc('minute', at)) AND bool_and(at > now() - interval '3 minutes')
	            FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$a_id'}),
	't', '(a) rows are stamped with the minute of the failures');
chain_ok($node, 'db1', '(a)');

#
# (b) unknown and malformed tokens aggregate per prefix, reason and minute.
#
quiesce('(b)');
avoid_minute_edge(54);
my $b_from = sql($node, 'db1', 'SELECT coalesce(max(id), 0) FROM apikeys.audit_log');
is( sql($node, 'db1', q{SELECT count(*) FROM generate_series(1, 600) g,
	              LATERAL apikeys.verify(apikeys._new_token('ak_live' || left(g::text, 0))::text) v
	             WHERE NOT v.valid AND v.code = 'API_KEY_INVALID'}),
	'600', '(b) 600 unknown ak_live tokens are API_KEY_INVALID');
is( sql($node, 'db1', q{SELECT count(*) FROM generate_series(1, 400) g,
	              LATERAL apikeys.verify(apikeys._new_token('zz_scan' || left(g::text, 0))::text) v
	             WHERE NOT v.valid AND v.code = 'API_KEY_INVALID'}),
	'400', '(b) 400 unknown zz_scan tokens are API_KEY_INVALID');
is( sql($node, 'db1', q{SELECT count(*) FROM generate_series(1, 250) g,
	              LATERAL apikeys.verify('not a token ' || g) v
	             WHERE NOT v.valid AND v.code = 'API_KEY_INVALID'}),
	'250', '(b) 250 malformed tokens are API_KEY_INVALID');
ok( defined wait_until($node, 'db1', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 1250
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND id > $b_from}, 10),
	'(b) all 1250 failures are counted in the log');
is( sql($node, 'db1', qq{SELECT string_agg(g, ' ' ORDER BY g) FROM (
	    SELECT concat_ws(':', coalesce(details->>'prefix', 'malformed=' || (details->>'malformed')),
	                     details->>'reason', sum((details->>'count')::int),
	                     CASE WHEN count(*) <= 2 THEN 'bounded' ELSE count(*) || ' rows' END,
	                     CASE WHEN bool_and(key_id IS NULL AND owner IS NULL) THEN 'nokey' END) g
	      FROM apikeys.audit_log WHERE event = 'verify_failed' AND id > $b_from
	     GROUP BY details->>'prefix', details->>'malformed', details->>'reason') s}),
	'ak_live:API_KEY_INVALID:600:bounded:nokey malformed=true:API_KEY_INVALID:250:bounded:nokey '
	  . 'zz_scan:API_KEY_INVALID:400:bounded:nokey',
	'(b) one or two rows per prefix (and for malformed tokens), counts 600, 400 and 250');
cmp_ok(sql($node, 'db1', "SELECT count(*) FROM apikeys.audit_log WHERE id > $b_from"), '<=', 6,
	'(b) 1250 failures added at most 6 audit rows');

# A slow trickle aggregates too: 12 failures of one key, 100 ms apart, must
# not become a row per failure.  A flush interval (1 s) can end while they
# come in, so they may take one row per interval they span, plus one.
my ($b_id, $b_tok) = revoked_key('db1', 'trickle', 'trickled key');
quiesce('(b) trickle');
avoid_minute_edge(54);
my $trickled = 0;
my $trickle_start = time();
for (1 .. 12)
{
	$trickled += fail_verify('db1', $b_tok, 1, 'API_KEY_REVOKED');
	usleep(100_000);
}
my $trickle_time = time() - $trickle_start;
is($trickled, 12, sprintf('(b) 12 failures of one key, 100 ms apart (%.1f s)', $trickle_time));
ok( defined wait_until($node, 'db1', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 12
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$b_id'}, 10),
	'(b) ... all counted');
($rows, $sum) = split /\|/, failed_rows('db1', "key_id = '$b_id'");
cmp_ok($rows, '<=', int($trickle_time) + 2,
	"(b) ... in at most one row per flush interval spanned, plus one ($rows rows)");
chain_ok($node, 'db1', '(b)');

#
# (c) two databases with the extension, one without.
#
my ($c1_id, $c1_tok) = revoked_key('db1', 'carol', 'db1 key');
my ($c2_id, $c2_tok) = revoked_key('db2', 'dave', 'db2 key');
my $c_from1 = sql($node, 'db1', 'SELECT coalesce(max(id), 0) FROM apikeys.audit_log');
my $c_from2 = sql($node, 'db2', 'SELECT coalesce(max(id), 0) FROM apikeys.audit_log');
my $dbtwo_tok = sql($node, 'db2', q{SELECT apikeys._new_token('dbtwo')::text});
avoid_minute_edge(54);
is(fail_authenticate('db1', $c1_tok, 4, 'API_KEY_REVOKED'), 4, '(c) 4 failures in db1');
is(fail_authenticate('db2', $c2_tok, 3, 'API_KEY_REVOKED'), 3, '(c) 3 failures in db2');
is(fail_verify('db2', $dbtwo_tok, 7, 'API_KEY_INVALID'), 7, '(c) 7 unknown tokens in db2');
is(fail_verify('db2', $c1_tok, 2, 'API_KEY_INVALID'), 2, "(c) db1's key is unknown in db2");
is( sql($node, 'plain', qq{SELECT count(*) FROM pg_stat_activity
	                 WHERE backend_type = 'apikeys worker' AND datname NOT IN ('db1', 'db2')}),
	'0', '(c) the running workers are those of db1 and db2');
ok( defined wait_until($node, 'db1', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 4
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$c1_id'}, 10),
	'(c) db1 has its failures');
ok( defined wait_until($node, 'db2', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 12
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND id > $c_from2}, 10),
	'(c) db2 has its failures');
is((split /\|/, failed_rows('db2', "key_id = '$c2_id'"))[1], 3, "(c) db2: its key's 3 failures");
is((split /\|/, failed_rows('db2', "details->>'prefix' = 'dbtwo'"))[1], 7,
	'(c) db2: 7 unknown dbtwo tokens');
is((split /\|/, failed_rows('db2', "details->>'prefix' = 'ak_live' AND id > $c_from2"))[1], 2,
	"(c) db2: db1's token counted as an unknown ak_live token");
is( sql($node, 'db2', qq{SELECT count(*) FROM apikeys.audit_log WHERE key_id IN ('$c1_id', '$a_id')}),
	'0', "(c) db2: nothing about db1's keys");
is( sql($node, 'db1', qq{SELECT count(*) FROM apikeys.audit_log
	               WHERE id > $c_from1 AND (key_id = '$c2_id' OR details->>'prefix' = 'dbtwo'
	                                        OR key_id IS NULL)}),
	'0', "(c) db1: nothing of db2's failures");
is( sql($node, 'db1', qq{SELECT count(*) FROM apikeys.audit_log WHERE id > $c_from1 AND key_id <> '$c1_id'}),
	'0', '(c) db1: only its own key since');
chain_ok($node, 'db1', '(c)');
chain_ok($node, 'db2', '(c)');
is( sql($node, 'plain', q{SELECT count(*) FROM pg_namespace WHERE nspname = 'apikeys'}),
	'0', '(c) the database without the extension has no apikeys schema');
is( sql($node, 'plain', q{SELECT count(*) FROM pg_class WHERE relname = 'audit_log'}),
	'0', '(c) ... and no audit table');
my $t_drop = time();
$node->safe_psql('postgres', 'DROP DATABASE plain');
cmp_ok(time() - $t_drop, '<', 3, '(c) ... and drops at once (no worker holds it)');
no_log_errors($node, $log_from, '(a)-(c): no error in the server log', $auth_errors);

#
# (g) limit_exceeded survives the rollback of the refused create.
#
$log_from = -s $node->logfile;
sql($node, 'db1', q{SELECT apikeys.set_plan('lim', 'free')});
my ($g_id) = new_key($node, 'db1', q{'lim', 'the one key'});
my ($ret, $out, $err) = $node->psql('db1',
	"\\set VERBOSITY verbose\nBEGIN;\nSELECT apikeys.create_key('lim', 'second');\nROLLBACK;\n"
	  . "SELECT apikeys.create_key('lim', 'third');\n",
	on_error_stop => 0);
my $n53400 = () = $err =~ /ERROR:  53400: key limit reached/g;
is($n53400, 2, '(g) two creates over the limit raise 53400 (one in a rolled-back transaction)');
ok( defined wait_until($node, 'db1', q{SELECT coalesce(sum((details->>'count')::int), 0) = 2
	FROM apikeys.audit_log WHERE event = 'limit_exceeded' AND owner = 'lim'}, 10),
	'(g) limit_exceeded rows for the owner, counting both refusals');
is( sql($node, 'db1', q{SELECT string_agg(DISTINCT concat_ws(',', details->>'plan', details->>'max_keys',
	                  coalesce(key_id::text, 'nokey')), ';')
	            FROM apikeys.audit_log WHERE event = 'limit_exceeded' AND owner = 'lim'}),
	'free,1,nokey', '(g) ... naming the plan and its limit');
is(sql($node, 'db1', q{SELECT count(*) FROM apikeys.keys WHERE owner = 'lim'}), '1',
	'(g) the refused keys do not exist');
is( sql($node, 'db1', q{SELECT count(*) FROM apikeys.audit_log WHERE owner = 'lim' AND event = 'key_created'}),
	'1', '(g) ... and have no key_created row');
chain_ok($node, 'db1', '(g)');
no_log_errors($node, $log_from, '(g): no error in the server log', qr/ERROR:  key limit reached/);

#
# (d) SIGKILL of a worker: the server restarts, failures are recorded again.
#
my ($d_id, $d_tok) = revoked_key('db1', 'erin', 'kill key');
my $db1_oid = sql($node, 'db1', q{SELECT oid FROM pg_database WHERE datname = 'db1'});
$log_from = -s $node->logfile;
# Keep failures coming for a few seconds so that the worker stays alive.
my ($bg_out, $bg_err) = ('', '');
my $bg = IPC::Run::start(
	[ 'psql', '-X', '-q', '-d', $node->connstr('db1'), '-c',
		qq{DO \$\$ BEGIN FOR i IN 1 .. 200 LOOP
		     PERFORM apikeys.verify('$d_tok'); PERFORM pg_sleep(0.05);
		   END LOOP; END \$\$} ],
	'<', \undef, '>', \$bg_out, '2>', \$bg_err,
	IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
# The worker may exit between the look-up and the kill (it leaves when its
# queue is empty): look it up again until a kill makes the postmaster restart.
my ($pid, $title, $restarted);
for my $attempt (1 .. 5)
{
	my $killed;
	my $deadline = time() + 10;
	while (!$killed && time() < $deadline)
	{
		$pid = sql($node, 'db1', q{SELECT pid FROM pg_stat_activity
		                     WHERE backend_type = 'apikeys worker' AND datname = 'db1' LIMIT 1});
		if ($pid)
		{
			my $t = eval { slurp_file("/proc/$pid/cmdline") };
			$title = $t if defined $t && $t ne '';
			$killed = kill('KILL', $pid);
		}
		usleep(20_000) unless $killed;
	}
	next unless $killed;
	$deadline = time() + 10;
	while (!$restarted && time() < $deadline)
	{
		$restarted = log_since($node, $log_from)
		  =~ /all server processes terminated; reinitializing/;
		usleep(100_000) unless $restarted;
	}
	last if $restarted;
	note("attempt $attempt: pid $pid was gone before the kill");
}
ok($restarted, '(d) a worker of db1 killed with SIGKILL; the postmaster reinitializes');
SKIP:
{
	skip 'no /proc', 1 unless defined $title;
	like($title, qr/apikeys worker for database $db1_oid/,
		"(d) the worker's process title names the database's oid");
}
ok(defined wait_until($node, 'postgres', 'SELECT true', 60), '(d) the server accepts connections again');
eval { $bg->finish; };
like(log_since($node, $log_from),
	qr/apikeys worker.*terminated by signal 9/, '(d) the postmaster saw the worker die');
my ($d2_id, $d2_tok) = revoked_key('db1', 'erin', 'after the kill');
avoid_minute_edge(54);
is(fail_authenticate('db1', $d2_tok, 3, 'API_KEY_REVOKED'), 3, '(d) new failures after the restart');
ok( defined wait_until($node, 'db1', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 3
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$d2_id'}, 10),
	'(d) ... are written: a worker came back');
chain_ok($node, 'db1', '(d)');

#
# (e) clean shutdown flushes what is queued.
#
quiesce('(e)');
sql($node, 'postgres', q{ALTER SYSTEM SET apikeys.flush_interval = 3600});
sql($node, 'postgres', q{SELECT pg_reload_conf()});
ok(defined wait_until($node, 'db1', q{SELECT current_setting('apikeys.flush_interval') = '1h'}, 10),
	'(e) flush_interval is now 1h');
my ($e_id, $e_tok) = revoked_key('db1', 'frank', 'shutdown key');
my $e_unknown = sql($node, 'db2', q{SELECT apikeys._new_token('shutdn')::text});
# A client stays connected to each database: a worker whose database has
# none writes and leaves within a second.  The fast shutdown ends them.
my @e_clients = map { $node->background_psql($_) } qw(db1 db2);
$log_from = -s $node->logfile;
is(fail_authenticate('db1', $e_tok, 4, 'API_KEY_REVOKED'), 4, '(e) 4 failures in db1');
is(fail_verify('db2', $e_unknown, 6, 'API_KEY_INVALID'), 6, '(e) 6 failures in db2');
usleep(2_500_000);
is(failed_rows('db1', "key_id = '$e_id'"), '0|0', '(e) nothing written before the shutdown');
is(failed_rows('db2', "details->>'prefix' = 'shutdn'"), '0|0', '(e) ... in either database');
cmp_ok(sql($node, 'db1', 'SELECT queued_records FROM apikeys.status()'), '>=', 2,
	'(e) the records wait in the queue');
is(sql($node, 'db1', $workers_sql), '2', '(e) the two workers wait');
$node->stop('fast');
$node->start;
is(failed_rows('db1', "key_id = '$e_id'"), '1|4', '(e) after a fast shutdown: db1 has its 4 failures');
is(failed_rows('db2', "details->>'prefix' = 'shutdn'"), '1|6', '(e) ... and db2 its 6');
chain_ok($node, 'db1', '(e)');
chain_ok($node, 'db2', '(e)');
no_log_errors($node, $log_from, '(e): no error in the server log', $auth_errors,
	qr/FATAL:  terminating connection due to administrator command/);
# A worker that went to sleep for 1h writes soon after a reload shortens the interval.
my ($e2_id, $e2_tok) = revoked_key('db1', 'frank', 'reload key');
my $e2_client = $node->background_psql('db1');
is(fail_authenticate('db1', $e2_tok, 2, 'API_KEY_REVOKED'), 2, '(e) 2 failures with the 1h interval');
usleep(1_500_000);
is(failed_rows('db1', "key_id = '$e2_id'"), '0|0', '(e) ... not written while the interval is 1h');
sql($node, 'postgres', q{ALTER SYSTEM RESET apikeys.flush_interval});
sql($node, 'postgres', q{SELECT pg_reload_conf()});
ok(defined wait_until($node, 'db1', q{SELECT current_setting('apikeys.flush_interval') = '1s'}, 10),
	'(e) flush_interval back to 1s');
ok(defined wait_until($node, 'db1', qq{SELECT count(*) = 1 FROM apikeys.audit_log
	WHERE event = 'verify_failed' AND key_id = '$e2_id'}, 10),
	'(e) ... and the sleeping worker writes the 2 failures at once');
$e2_client->quit;

#
# (f) DROP EXTENSION stops the worker; DROP DATABASE after failures works.
#
my ($f_id, $f_tok) = revoked_key('db3', 'gina', 'db3 key');
is(fail_verify('db3', $f_tok, 3, 'API_KEY_REVOKED'), 3, '(f) failures in db3');
ok( defined wait_until($node, 'db3', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 3
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$f_id'}, 10),
	'(f) ... written by its worker');
$log_from = -s $node->logfile;
is(fail_verify('db3', $f_tok, 5, 'API_KEY_REVOKED'), 5, '(f) more failures in db3 ...');
sql($node, 'db3', 'DROP EXTENSION apikeys');
pass('(f) ... and DROP EXTENSION while they are queued');
ok( defined wait_until($node, 'postgres', q{SELECT count(*) = 0 FROM pg_stat_activity
	WHERE backend_type = 'apikeys worker' AND datname = 'db3'}, 10),
	'(f) no worker remains for db3');
ok(defined wait_until($node, 'db1', 'SELECT queued_records = 0 FROM apikeys.status()', 10),
	'(f) the queue drained');
usleep(1_500_000);
is( sql($node, 'postgres', q{SELECT count(*) FROM pg_stat_activity
	WHERE backend_type = 'apikeys worker' AND datname = 'db3'}),
	'0', '(f) ... and none comes back after a flush interval');
is(sql($node, 'db3', q{SELECT to_regclass('apikeys.audit_log') IS NULL}), 't',
	'(f) db3 has no audit log any more (nothing recreated it)');
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE db3');
is($ret, 0, '(f) DROP DATABASE of the database whose extension was dropped') or diag($err);

my ($f4_id, $f4_tok) = revoked_key('db4', 'hank', 'db4 key');
is(fail_verify('db4', $f4_tok, 4, 'API_KEY_REVOKED'), 4, '(f) failures in db4');
ok( defined wait_until($node, 'db4', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 4
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$f4_id'}, 10),
	'(f) ... written');
ok(defined wait_until($node, 'db1', 'SELECT queued_records = 0 FROM apikeys.status()', 10),
	'(f) the queue drained');
$t_drop = time();
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE db4');
is($ret, 0, '(f) DROP DATABASE of a database that had failures') or diag($err);
cmp_ok(time() - $t_drop, '<', 8, sprintf('(f) ... within a few seconds (%.1f s)', time() - $t_drop));
usleep(1_500_000);
no_log_errors($node, $log_from, '(f): no error in the server log');

#
# (h) a full queue drops records, and nothing errors.
#
$node->append_conf('postgresql.conf', 'apikeys.audit_queue_size = 16');
$node->restart;
is(sql($node, 'db1', 'SHOW apikeys.audit_queue_size'), '16', '(h) audit_queue_size = 16');
sql($node, 'db1', q{SELECT apikeys.set_plan('flood', 'enterprise')});
sql($node, 'db1', q{CREATE TABLE flood AS
	SELECT k.key_id, k.token::text AS token
	  FROM generate_series(1, 40) g, LATERAL apikeys.create_key('flood', 'flood ' || g) k});
is(sql($node, 'db1', q{SELECT apikeys.revoke_all('flood')}), '40', '(h) 40 revoked keys');
quiesce('(h)');
avoid_minute_edge(54);
$log_from = -s $node->logfile;
my ($q0, $d0) = split /\|/,
  sql($node, 'db1', 'SELECT records_queued_total, records_dropped FROM apikeys.status()');
is( sql($node, 'db1', q{SELECT count(*) FROM flood, LATERAL apikeys.verify(flood.token) v
	              WHERE v.code = 'API_KEY_REVOKED'}),
	'40', '(h) 40 distinct keys fail at once, without an error');
my ($q1, $d1, $now) = split /\|/,
  sql($node, 'db1', 'SELECT records_queued_total, records_dropped, queued_records FROM apikeys.status()');
my ($queued, $dropped) = ($q1 - $q0, $d1 - $d0);
cmp_ok($dropped, '>', 0, "(h) status().records_dropped grew ($dropped)");
is($queued + $dropped, 40, "(h) every failure was queued ($queued) or dropped");
cmp_ok($now, '<=', 16, "(h) at most 16 records queued ($now)");
ok(defined wait_until($node, 'db1', 'SELECT queued_records = 0 FROM apikeys.status()', 10),
	'(h) the queue drains');
ok( defined wait_until($node, 'db1', qq{SELECT count(*) = $queued FROM apikeys.audit_log a
	JOIN flood f USING (key_id) WHERE a.event = 'verify_failed'}, 10),
	'(h) the queued records are written, one row per key');
is( sql($node, 'db1', q{SELECT coalesce(sum((details->>'count')::int), 0) FROM apikeys.audit_log a
	              JOIN flood f USING (key_id) WHERE a.event = 'verify_failed'}),
	$queued, '(h) ... each counting its one failure');
my ($h_id, $h_tok) = split /\|/, sql($node, 'db1', q{SELECT key_id, token FROM flood f
	WHERE NOT EXISTS (SELECT FROM apikeys.audit_log a WHERE a.key_id = f.key_id
	                   AND a.event = 'verify_failed') LIMIT 1});
is(fail_verify('db1', $h_tok, 1, 'API_KEY_REVOKED'), 1, '(h) a dropped key fails again');
ok( defined wait_until($node, 'db1', qq{SELECT count(*) = 1 FROM apikeys.audit_log
	WHERE event = 'verify_failed' AND key_id = '$h_id'}, 10),
	'(h) ... and is recorded now that the queue has room');
chain_ok($node, 'db1', '(h)');
no_log_errors($node, $log_from, '(h): no error in the server log');

#
# (i) a hot standby verifies, and writes nothing.
#
$node->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'bk', has_streaming => 1);
$standby->start;
sql($node, 'db1', q{SELECT apikeys.set_plan('ivy', 'pro')});
my ($iv_id, $iv_tok) = new_key($node, 'db1', q{'ivy', 'valid on the standby'});
my ($ir_id, $ir_tok) = revoked_key('db1', 'ivy', 'revoked on the standby');
my $i_unknown = sql($node, 'db1', q{SELECT apikeys._new_token('stby')::text});
$node->wait_for_catchup($standby);
my $slog_from = -s $standby->logfile;
is(sql($standby, 'db1', q{SELECT pg_is_in_recovery()}), 't', '(i) the standby is in recovery');
is(sql($standby, 'db1', qq{SELECT valid, code, key_id, owner FROM apikeys.verify('$iv_tok')}),
	"t|VALID|$iv_id|ivy", '(i) standby: a valid key is VALID');
is(sql($standby, 'db1', qq{SELECT key_id FROM apikeys.authenticate('$iv_tok')}),
	$iv_id, '(i) standby: authenticate() of a valid key');
is(sql($standby, 'db1', qq{SELECT valid, code, key_id FROM apikeys.verify('$ir_tok')}),
	"f|API_KEY_REVOKED|$ir_id", '(i) standby: a revoked key is API_KEY_REVOKED');
is(sql($standby, 'db1', qq{SELECT code FROM apikeys.verify('$iv_tok', '{admin}')}),
	'INSUFFICIENT_SCOPE', '(i) standby: a missing scope is INSUFFICIENT_SCOPE');
is(sql($standby, 'db1', qq{SELECT code FROM apikeys.verify('$i_unknown')}),
	'API_KEY_INVALID', '(i) standby: an unknown key is API_KEY_INVALID');
is(sql($standby, 'db1', q{SELECT code FROM apikeys.verify('garbage')}),
	'API_KEY_INVALID', '(i) standby: a malformed token is API_KEY_INVALID');
is(fail_verify('db1', $ir_tok, 20, 'API_KEY_REVOKED', $standby), 20,
	'(i) standby: 20 more failures');
is(fail_verify('db2', $i_unknown, 5, 'API_KEY_INVALID', $standby), 5,
	'(i) standby: failures in db2 as well');
is(sql($standby, 'db1', 'SELECT queued_records FROM apikeys.status()'), '0',
	'(i) standby: nothing queued');
# A failure on the primary, after the standby's: once it is written, the
# primary's worker has flushed whatever it had.
my ($im_id, $im_tok) = revoked_key('db1', 'ivy', 'marker on the primary');
is(fail_verify('db1', $im_tok, 1, 'API_KEY_REVOKED'), 1, '(i) primary: a marker failure');
ok( defined wait_until($node, 'db1', qq{SELECT count(*) = 1 FROM apikeys.audit_log
	WHERE event = 'verify_failed' AND key_id = '$im_id'}, 10),
	'(i) primary: the marker is written');
usleep(1_000_000);
$node->wait_for_catchup($standby);
for my $n ([ 'primary', $node ], [ 'standby', $standby ])
{
	is( sql($n->[1], 'db1', qq{SELECT count(*) FROM apikeys.audit_log
		               WHERE key_id IN ('$iv_id', '$ir_id') AND event = 'verify_failed'
		                  OR details->>'prefix' = 'stby'}),
		'0', "(i) $n->[0]: no record of the standby's failures in db1");
	is( sql($n->[1], 'db2', q{SELECT count(*) FROM apikeys.audit_log WHERE details->>'prefix' = 'stby'}),
		'0', "(i) $n->[0]: ... nor in db2");
}
is(sql($standby, 'db1', $workers_sql), '0', '(i) standby: no apikeys worker runs');
chain_ok($standby, 'db1', '(i) standby');
no_log_errors($standby, $slog_from, '(i) standby: no error in the server log');
my @warnings = grep { /WARNING:.*apikeys/ } split /\n/, log_since($standby, $slog_from);
is(scalar(@warnings), 0, '(i) standby: no warning about apikeys') or diag(join("\n", @warnings));

$standby->stop;
$node->stop;
note(sprintf('003_audit_worker took %.1f s', time() - $t0));
done_testing();
