# Copyright: the apikeys authors.
#
# Faults of the per-database worker that a review of 1.1 found, each part
# naming what went wrong before its fix (library preloaded,
# apikeys.audit_queue_size = 16, flushes every second until part (5)):
#  (1) a database owner's ALTER DATABASE ... SET exit_on_error = on made a
#      failed flush exit the worker (ERROR became FATAL), losing the records
#      it had taken from the queue: none was ever written;
#  (2) each failed flush leaked its batch of records (about 200 kB) in the
#      worker's top memory context;
#  (3) with UPDATE on key_usage revoked from apikeys_worker, the worker still
#      wrote counts through the table access method, as if it held it;
#  (4) a database dropped, with DROP DATABASE and no FORCE, just after its
#      last client left, failed: the worker slept out its flush interval
#      (10 s by default, 60 s here) while DROP DATABASE waits 5 s;
#  (5) a refusal counted while the audit queue was full (in another
#      database) started no worker: its count stayed in shared memory;
#  (6) records the worker took after DROP EXTENSION were discarded without
#      being counted in status().records_lost;
#  (7) a session left open after changing a key (it holds the audit chain's
#      lock) held up every flush: the worker waited for the chain before
#      writing counts and spent credits, which a crash would then lose
#      (and, with the first fix, apikeys.flush() said true with the records
#      still queued, and the log said so every interval);
#  (8) with the first fix for (4), a worker left with work it could not do
#      (spending on a row a prepared transaction holds) and no client
#      flushed without pause: a transaction and a commit each time;
#  (4b) with the first fix for (4), a database whose clients connect per
#      request started a worker for each request;
#  (4c) with the second, a worker whose last flush left new counts behind
#      while a client was connected slept its whole interval after the
#      client left, and DROP DATABASE failed again.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use FindBin;
use lib "$FindBin::RealBin/../perl";    # test/perl: ApikeysTest
use ApikeysTest;

my $node = new_node('worker_faults', qq{
apikeys.audit_queue_size = 16
log_min_messages = info
max_prepared_transactions = 2
});

sql($node, 'postgres', 'CREATE EXTENSION apikeys');
sql($node, 'postgres', 'CREATE ROLE mallory LOGIN');
for my $db (qw(eo pv dd qa qb fx))
{
	sql($node, 'postgres', "CREATE DATABASE $db OWNER mallory");
	sql($node, $db, 'CREATE EXTENSION apikeys');
}

# A status() column, read in postgres.
sub status_value
{
	my ($column) = @_;
	return sql($node, 'postgres', "SELECT $column FROM apikeys.status()");
}

# $n refusals of unknown tokens of prefix $prefix in $db, in one statement.
sub fail_unknown
{
	my ($db, $prefix, $n) = @_;
	return sql($node, $db, qq{SELECT count(*) FROM generate_series(1, $n) g,
	                   LATERAL apikeys.verify(apikeys._new_token('$prefix' || left(g::text, 0))::text) v
	                   WHERE v.code = 'API_KEY_INVALID'});
}

# How many refusals of prefix $prefix the audit log holds.
sub failed_sum_sql
{
	my ($prefix) = @_;
	return qq{SELECT coalesce(sum((details->>'count')::bigint), 0) FROM apikeys.audit_log
	           WHERE event = 'verify_failed' AND details->>'prefix' = '$prefix'};
}

# The worker of $db's pid, waiting up to 10 s for it.
sub worker_pid
{
	my ($db) = @_;
	wait_until($node, 'postgres', qq{SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'apikeys worker' AND datname = '$db'}, 10);
	return sql($node, 'postgres', qq{SELECT pid FROM pg_stat_activity
		WHERE backend_type = 'apikeys worker' AND datname = '$db'});
}

# The grand total of process $pid's memory contexts, in bytes, as it logs it.
sub memory_total
{
	my ($pid) = @_;
	my $from = -s $node->logfile;
	sql($node, 'postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	my $total;
	poll_until($node, 'postgres', 'SELECT 1', '1', 1);    # let it answer
	for (1 .. 100)
	{
		($total) = log_since($node, $from) =~ /\[$pid\] LOG:  Grand total: (\d+) bytes/;
		last if defined $total;
		usleep(100_000);
	}
	return $total;
}

#
# (1) exit_on_error, set by the database's owner, does not make a failed
# flush lose its records.  (2) Nor does a failed flush leak memory.
#
sql($node, 'eo', 'ALTER DATABASE eo SET exit_on_error = on', 'mallory');
sql($node, 'eo', q{ALTER TABLE apikeys.audit_log
	ADD CONSTRAINT t_no_failed CHECK (event <> 'verify_failed') NOT VALID});
my $ff_before = status_value('flush_failures');
my $log_from = -s $node->logfile;
is(fail_unknown('eo', 'eofail', 3), '3', '(1) 3 refusals queued in a database with exit_on_error = on');
ok( defined wait_until($node, 'postgres', "SELECT flush_failures >= $ff_before + 2 FROM apikeys.status()", 15),
	'(1) the failed flush is counted, and tried again');
my @fatal = log_lines($node, $log_from, qr/FATAL:/);
is(scalar(@fatal), 0, '(1) the worker did not exit with FATAL') or diag(join("\n", @fatal));

my $eo_pid = worker_pid('eo');
my $mem_first = memory_total($eo_pid);
my $ff_mid = status_value('flush_failures');
ok(defined wait_until($node, 'postgres', "SELECT flush_failures >= $ff_mid + 5 FROM apikeys.status()", 20),
	'(2) five more failed flushes');
my $mem_last = memory_total($eo_pid);
ok(defined $mem_first && defined $mem_last, '(2) the worker logged its memory twice')
  or diag('no Grand total line in the log');
cmp_ok(($mem_last // 1e9) - ($mem_first // 0), '<', 100_000,
	sprintf('(2) five failed flushes leave its memory as it was (%s bytes, then %s)',
		$mem_first // '?', $mem_last // '?'));

sql($node, 'eo', 'ALTER TABLE apikeys.audit_log DROP CONSTRAINT t_no_failed');
ok(defined wait_until($node, 'eo', 'SELECT (' . failed_sum_sql('eofail') . ') = 3', 15),
	'(1) once the constraint is gone, the 3 refusals are written');
sql($node, 'eo', 'ALTER DATABASE eo RESET exit_on_error', 'mallory');

#
# (3) The worker writes key_usage only with the privileges SQL would need:
# without UPDATE, the flush fails (and says so) rather than update rows.
#
my ($pv_id, $pv_tok) = new_key($node, 'pv', q{'pv-owner', 'privileges'});
sql($node, 'pv', "SELECT apikeys.verify('$pv_tok')");
ok( defined wait_until($node, 'pv', "SELECT requests = 1 FROM apikeys.key_usage WHERE key_id = '$pv_id'", 15),
	'(3) the first count is written');
sql($node, 'pv', 'REVOKE UPDATE ON apikeys.key_usage FROM apikeys_worker');
$log_from = -s $node->logfile;
$ff_before = status_value('flush_failures');
my $pv = $node->background_psql('pv');
$pv->query_safe("SELECT apikeys.verify('$pv_tok')");
ok(defined wait_until($node, 'postgres', "SELECT flush_failures > $ff_before FROM apikeys.status()", 15),
	'(3) without UPDATE on key_usage the usage flush fails');
is(sql($node, 'pv', "SELECT requests FROM apikeys.key_usage WHERE key_id = '$pv_id'"), '1',
	'(3) and the row is not updated');
ok(scalar(log_lines($node, $log_from, qr/permission denied for table key_usage/)) > 0,
	'(3) the log says why: permission denied for table key_usage');
sql($node, 'pv', 'GRANT UPDATE ON apikeys.key_usage TO apikeys_worker');
$pv->quit;
ok( defined wait_until($node, 'pv', "SELECT requests = 2 FROM apikeys.key_usage WHERE key_id = '$pv_id'", 15),
	'(3) with UPDATE granted back, the count is written');

#
# (7) A session left open after changing a key holds the audit chain's
# lock: the audit records wait for it, but counts and spent credits are
# written meanwhile.
#
my ($cl_id, $cl_tok) = new_key($node, 'pv', q{'cl-owner', 'credits', credits => 100});
my $holder = $node->background_psql('pv');
$holder->query_safe(q{BEGIN; SELECT count(*) FROM apikeys.create_key('cl-holder', 'held open')});
is(sql($node, 'pv', "SELECT string_agg((apikeys.verify('$cl_tok')).code, ',') FROM generate_series(1, 3)"),
	'VALID,VALID,VALID', '(7) 3 verifications of a key with credits while the chain is held');
is(fail_unknown('pv', 'clwait', 2), '2', '(7) and 2 refusals, whose record waits for the chain');
ok( defined wait_until($node, 'pv', qq{SELECT
	    (SELECT requests = 3 FROM apikeys.key_usage WHERE key_id = '$cl_id')
	    AND (SELECT credits = 97 FROM apikeys.keys WHERE id = '$cl_id')}, 15),
	'(7) the counts and the spent credits are written while the chain is held');
is(sql($node, 'pv', failed_sum_sql('clwait')), '0', '(7) the refusals are not');
is(sql($node, 'pv', q{SELECT apikeys.flush('3 s')}), 'f',
	'(7) apikeys.flush() waits for them, and answers false after its timeout');
is(scalar(log_lines($node, 0, qr/another session holds a lock the audit records need/)), 1,
	'(7) the log says why, once for the whole spell');
$holder->query_safe('COMMIT');
$holder->quit;
ok(defined wait_until($node, 'pv', 'SELECT (' . failed_sum_sql('clwait') . ') = 2', 15),
	'(7) after COMMIT they are written');

#
# (8) Spending that a prepared transaction keeps the worker from writing
# (it holds the key's row) leaves work behind after each flush: with no
# client connected, the worker still waits its interval between flushes,
# rather than flush (a transaction and a commit each) without pause.
#
sql($node, 'postgres', 'CREATE DATABASE pt OWNER mallory');
sql($node, 'pt', 'CREATE EXTENSION apikeys');
my ($pt_id, $pt_tok) = new_key($node, 'pt', q{'pt-owner', 'credits', credits => 100});
sql($node, 'pt', qq{BEGIN; SELECT id FROM apikeys.keys WHERE id = '$pt_id' FOR NO KEY UPDATE;
	PREPARE TRANSACTION 'hold_key'});
is(sql($node, 'pt', "SELECT (apikeys.verify('$pt_tok')).code"), 'VALID', '(8) a credit spent on the held key');
sleep(2);
my $xid_before = sql($node, 'postgres', 'SELECT pg_current_xact_id()');
sleep(3);
my $xid_after = sql($node, 'postgres', 'SELECT pg_current_xact_id()');
cmp_ok($xid_after - $xid_before, '<', 20,
	sprintf('(8) the worker flushes about once an interval: %d transactions in 3 s', $xid_after - $xid_before));
sql($node, 'pt', q{COMMIT PREPARED 'hold_key'});
ok(defined wait_until($node, 'pt', "SELECT credits = 99 FROM apikeys.keys WHERE id = '$pt_id'", 15),
	'(8) once the transaction commits, the spending is written');
workers_gone_ok($node, '(8)');

# From here on workers sleep a minute between flushes.
$node->append_conf('postgresql.conf', 'apikeys.flush_interval = 60');
$node->reload;
is(try_sql($node, 'postgres', q{SELECT current_setting('apikeys.flush_interval')}), '1min',
	'setup: apikeys.flush_interval = 1min');
workers_gone_ok($node, 'setup');

#
# (4) DROP DATABASE, without FORCE, just after the last client of a
# database whose keys were used: its worker writes and leaves at once.
#
my ($dd_id, $dd_tok) = new_key($node, 'dd', q{'dd-owner', 'dropped'});
sql($node, 'dd', "SELECT apikeys.verify('$dd_tok') FROM generate_series(1, 3)");
my $t_drop = time();
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE dd');
is($ret, 0, '(4) DROP DATABASE of a database whose key was just used succeeds') or diag($err);
cmp_ok(time() - $t_drop, '<', 4, sprintf('(4) ... within seconds (%.1f s)', time() - $t_drop));

#
# (4c) The same after a flush that left new counts behind while a client
# was connected (they arrived while a lock held the flush up): the worker
# still leaves a second after the last client, so DROP DATABASE succeeds.
#
sql($node, 'postgres', 'CREATE DATABASE dd2 OWNER mallory');
sql($node, 'dd2', 'CREATE EXTENSION apikeys');
my ($dd2_id, $dd2_tok) = new_key($node, 'dd2', q{'dd2-owner', 'busy'});
my $dd2_client = $node->background_psql('dd2');
$dd2_client->query_safe("SELECT apikeys.verify('$dd2_tok')");
my $dd2_lock = $node->background_psql('dd2');
$dd2_lock->query_safe(q{BEGIN; LOCK TABLE apikeys.key_usage IN SHARE ROW EXCLUSIVE MODE});
$dd2_client->query_safe(q{SELECT apikeys.flush('0')});
ok( defined wait_until($node, 'postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'apikeys worker' AND datname = 'dd2' AND wait_event_type = 'Lock'}, 10),
	'(4c) a flush waits for a lock on key_usage');
$dd2_client->query_safe("SELECT apikeys.verify('$dd2_tok')");
$dd2_lock->query_safe('COMMIT');
$dd2_lock->quit;
ok(defined wait_until($node, 'dd2', "SELECT requests = 1 FROM apikeys.key_usage WHERE key_id = '$dd2_id'", 10),
	'(4c) the flush wrote the first count; the second arrived meanwhile');
$dd2_client->quit;
$t_drop = time();
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE dd2');
is($ret, 0, '(4c) DROP DATABASE just after the client left succeeds') or diag($err);
cmp_ok(time() - $t_drop, '<', 4, sprintf('(4c) ... within seconds (%.1f s)', time() - $t_drop));

#
# (4b) A database whose clients connect for each request keeps its worker
# between requests a quarter of a second apart: it leaves after a second
# without clients, not at the first moment it has none.
#
sql($node, 'postgres', 'CREATE DATABASE cgi OWNER mallory');
sql($node, 'cgi', 'CREATE EXTENSION apikeys');
my ($cgi_id, $cgi_tok) = new_key($node, 'cgi', q{'cgi-owner', 'per request'});
sql($node, 'cgi', "SELECT apikeys.verify('$cgi_tok')");
my $cgi_pid = worker_pid('cgi');
for (1 .. 6)
{
	usleep(400_000);
	sql($node, 'cgi', "SELECT apikeys.verify('$cgi_tok')");
}
is(sql($node, 'postgres', q{SELECT pid FROM pg_stat_activity
	WHERE backend_type = 'apikeys worker' AND datname = 'cgi'}), $cgi_pid,
	'(4b) one worker served 7 connections 0.4 s apart');
ok( defined wait_until($node, 'cgi', "SELECT requests = 7 FROM apikeys.key_usage WHERE key_id = '$cgi_id'", 10),
	'(4b) and wrote their 7 counts once they stopped');
workers_gone_ok($node, '(4b)');

#
# (5) With the audit queue full (16 records of qa, whose client stays), a
# refusal counted in qb still gets a worker, which writes the count.
#
my $qa = $node->background_psql('qa');
$qa->query_safe(q{CREATE TABLE held AS
	SELECT k.key_id, k.token FROM generate_series(1, 16) g,
	       LATERAL apikeys.create_key('qa-owner-' || g, 'held') k});
$qa->query_safe(q{SELECT count(apikeys.revoke(key_id)) FROM held});
$qa->query_safe(q{SELECT count(*) FROM held, LATERAL apikeys.verify(held.token::text) v
	WHERE v.code = 'API_KEY_REVOKED'});
is(status_value('queued_records'), '16', '(5) the audit queue is full: 16 records of qa');
my ($qb_id, $qb_tok) = new_key($node, 'qb', q{'qb-owner', 'refused'});
sql($node, 'qb', "SELECT apikeys.revoke('$qb_id')");
my $dropped = status_value('records_dropped');
is(sql($node, 'qb', "SELECT string_agg((apikeys.verify('$qb_tok')).code, ',') FROM generate_series(1, 5)"),
	join(',', ('API_KEY_REVOKED') x 5), '(5) 5 refusals of a revoked key in qb');
cmp_ok(status_value('records_dropped'), '>', $dropped, '(5) their audit record found no room');
ok( defined wait_until($node, 'qb', "SELECT failures = 5 FROM apikeys.key_usage WHERE key_id = '$qb_id'", 10),
	"(5) qb's worker starts anyway and writes the 5 failures");
$qa->quit;
queue_drained_ok($node, 'postgres', '(5) once qa has no client');

#
# (6) Records taken after DROP EXTENSION count as lost.
#
my $lost = status_value('records_lost');
my $fx = $node->background_psql('fx');
$fx->query_safe(q{SELECT count(*) FROM generate_series(1, 3) g,
	LATERAL apikeys.verify(apikeys._new_token('fxgone' || left(g::text, 0))::text) v});
ok(defined wait_until($node, 'postgres', q{SELECT queued_records >= 1 FROM apikeys.status()}, 10),
	'(6) 3 refusals queued in fx');
$fx->query_safe('DROP EXTENSION apikeys');
$fx->quit;
ok( defined wait_until($node, 'postgres', "SELECT records_lost = $lost + 3 FROM apikeys.status()", 10),
	'(6) once fx has no client, its worker finds the extension gone: records_lost counts the 3');
workers_gone_ok($node, '(6)');

$node->stop;
done_testing();
