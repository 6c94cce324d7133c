# Copyright: the apikeys authors.
#
# The launcher and the per-database workers it starts (library preloaded,
# apikeys.flush_interval = 1, apikeys.usage_flush_interval = 5).  Each part
# names the fault of version 1.0 (no launcher: backends started workers
# themselves) that it shows:
#  (6) a usage alert of an owner of 200 four-byte characters keeps key_id,
#      owner and start whole, in the audit row and in the NOTIFY payload
#      (1.0 replaced details longer than 512 bytes with {});
#  (5) a flush that fails (a CHECK constraint refuses the rows) puts its
#      records back: nothing is written, flush_failures counts, the records
#      stay queued, and all of them are written once the constraint is gone
#      (1.0's worker died with the records it had taken);
#  (4) pg_terminate_backend() stops a worker waiting on the audit chain's
#      lock within seconds, its records stay queued, and once the lock is
#      released a new worker writes them all (1.0's worker ignored SIGTERM
#      while waiting, holding the records it had taken);
#  (7) usage counts: with a client connected they are in list_keys() at
#      once but in apikeys.key_usage only after usage_flush_interval; with
#      none connected they are written at the next tick and the worker
#      leaves; DROP DATABASE (without FORCE) of a database whose keys were
#      just used succeeds at once (1.0 had no usage_flush_interval);
#  (8) one worker per database while two databases have work, and one
#      launcher (1.0 had none);
#  (2) records of a database with ALLOW_CONNECTIONS false are written (1.0's
#      worker could not connect);
#  (3) a worker that could not start because every background worker
#      process was taken (parallel query workers hold them) is started again
#      by the launcher once one is free, with no further activity in its
#      database, and worker_start_failures counts it (1.0's backend gave up
#      and nothing tried again);
#  (1) 100 databases, each dropped with a failure queued and its worker kept
#      from connecting (ALLOW_CONNECTIONS false; on the new code the worker
#      connects anyway and DROP ... FORCE stops it), plus one dropped while
#      no worker process was free: no worker slot leaks, records of a
#      database dropped before its worker connected are counted as lost,
#      nothing of theirs stays queued, and a live database still gets its
#      records written (1.0 leaked a slot for every worker that never
#      connected, and after 64 no database got a worker again).
#  (9) more databases waiting than there are slots (64) all get a worker
#      once one is free, with no further call there; one dropped while it
#      waited has its records counted as lost;
#  (10) the launcher comes back after pg_terminate_backend;
#  (11) a worker still running when the launcher restarts is adopted: the
#      new launcher frees its slot when it exits, and starts the next one.
# Parts (1), (9) and (10) run last: on 1.0 part (1) leaves no worker for anyone.
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
use JSON::PP;
use Time::HiRes qw(time usleep);

my $t0 = time();
$ENV{PGCLIENTENCODING} = 'UTF8';

my $max_workers = 6;
my $node = new_node('workers', qq{
apikeys.alert_requests_per_minute = 5
max_worker_processes = $max_workers
max_parallel_workers = 8
max_connections = 40
autovacuum = off
log_statement = none
});

# Only the new code knows the setting: on 1.0 this fails, and part (7) shows it.
my ($ret, $out, $err) = $node->psql('postgres',
	'ALTER SYSTEM SET apikeys.usage_flush_interval = 5');
$node->psql('postgres', 'SELECT pg_reload_conf()');

# A column of apikeys.status(), or undef (1.0 has fewer columns).
sub status_value
{
	my ($column) = @_;
	return try_sql($node, 'main', "SELECT $column FROM apikeys.status()");
}

# A background session that survives errors; its query output, stderr cleared first.
sub session
{
	my ($db) = @_;
	my $s = $node->background_psql($db, on_error_stop => 0);
	$s->set_query_timer_restart();
	return $s;
}

sub bg
{
	my ($s, $query) = @_;
	$s->{stderr} = '';
	return scalar($s->query($query));
}

# n refusals of unknown well-formed tokens of one prefix; returns how many were refused.
sub fail_unknown
{
	my ($db, $prefix, $n) = @_;
	return sql($node, $db, qq{SELECT count(*) FROM generate_series(1, $n) g,
	                   LATERAL apikeys.verify(apikeys._new_token('$prefix' || left(g::text, 0))::text) v
	                   WHERE v.code = 'API_KEY_INVALID'});
}

sub failed_sum_sql
{
	my ($prefix) = @_;
	return qq{SELECT coalesce(sum((details->>'count')::bigint), 0) FROM apikeys.audit_log
	           WHERE event = 'verify_failed' AND details->>'prefix' = '$prefix'};
}

# Every background worker process taken: a parallel query whose workers sleep
# on each row holds them (the new code's launcher holds one as well).
my $bgworkers_sql = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type IN
	('parallel worker', 'apikeys launcher', 'apikeys worker',
	 'logical replication launcher', 'logical replication worker')};

sub hold_worker_processes
{
	my $h = session('main');
	my $pid = bg($h, q{SET max_parallel_workers_per_gather = 8;
		SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
		SET min_parallel_table_scan_size = 0;
		SELECT pg_backend_pid()});
	$h->{stdin} .= "SELECT count(*) FROM hold_rows WHERE hold_sleep(x);\n";
	$h->{run}->pump_nb();
	my $full = wait_until($node, 'postgres', "SELECT ($bgworkers_sql) = $max_workers", 15);
	return ($h, $pid, $full);
}

sub release_worker_processes
{
	my ($h, $pid) = @_;
	sql($node, 'postgres', "SELECT pg_cancel_backend($pid)");
	my $freed = wait_until($node, 'postgres', q{SELECT count(*) = 0 FROM pg_stat_activity
		WHERE backend_type = 'parallel worker'}, 15);
	$h->quit;
	return $freed;
}

# Databases: a template with the extension (UTF8, for part (6)), and copies.
sql($node, 'postgres', q{CREATE DATABASE tpl TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'});
sql($node, 'tpl', 'CREATE EXTENSION apikeys');
for my $db (qw(main alertdb faildb lockdb usedb dropuse w8a w8b noconn retrydb gone1 live))
{
	sql($node, 'postgres', "CREATE DATABASE $db TEMPLATE tpl");
}
sql($node, 'main', q{
CREATE TABLE hold_rows (x int, pad text) WITH (fillfactor = 10, parallel_workers = 8);
INSERT INTO hold_rows
SELECT g, (SELECT string_agg(md5(g || '/' || i), '') FROM generate_series(1, 30) i)
  FROM generate_series(1, 300) g;
ANALYZE hold_rows;
CREATE FUNCTION hold_sleep(int) RETURNS boolean LANGUAGE plpgsql PARALLEL SAFE COST 100000
AS $$BEGIN PERFORM pg_sleep(0.2); RETURN true; END$$;
});
is(sql($node, 'main', q{SELECT count(DISTINCT (ctid::text::point)[0]) FROM hold_rows}), '300',
	'setup: one row per page of the table that holds worker processes');
is(try_sql($node, 'main', q{SELECT current_setting('apikeys.usage_flush_interval')}), '5s',
	'setup: apikeys.usage_flush_interval = 5s');

#
# (6) Alert details whole.  1.0: details past 512 bytes became {}.
#
my $owner_sql = q{repeat(chr(128512), 200)};
my $owner_text = chr(0x1F600) x 200;
my ($al_id, $al_tok, $al_start) = new_key($node, 'alertdb', "$owner_sql, 'alert key'");
my $listener = alert_listener($node, 'alertdb');
avoid_minute_edge(52);
is( sql($node, 'alertdb', qq{SELECT count(*) FROM generate_series(1, 7) g,
	LATERAL apikeys.verify('$al_tok' || left(g::text, 0)) v WHERE v.valid}),
	'7', '(6) a key of a 200-character owner verified 7 times in a minute (threshold 5)');
ok( defined wait_until($node, 'alertdb', qq{SELECT count(*) = 1 FROM apikeys.audit_log
	WHERE event = 'usage_alert' AND key_id = '$al_id'}, 10),
	'(6) one usage_alert row is written');
is( sql($node, 'alertdb', qq{SELECT concat_ws(',', details->>'key_id' = '$al_id',
	    details->>'owner' = $owner_sql, details->>'start' = '$al_start',
	    (details->>'requests')::int > 5, details->>'threshold', owner = $owner_sql)
	  FROM apikeys.audit_log WHERE event = 'usage_alert' AND key_id = '$al_id'}),
	't,t,t,t,5,t',
	'(6) its details hold key_id, the whole owner (800 bytes), start, requests and threshold');
my @payloads;
for (1 .. 50)
{
	@payloads = alerts_heard($listener);
	last if @payloads;
	usleep(100_000);
}
my ($payload) = @payloads;
ok(defined $payload, '(6) LISTEN apikeys_alert receives a notification') or diag($listener->{heard});
my $alert = eval { JSON::PP->new->utf8->decode($payload // '') } // {};
is($alert->{key_id}, $al_id, '(6) the payload names the key');
ok(defined $alert->{owner} && $alert->{owner} eq $owner_text, '(6) the payload holds the whole owner')
  or diag('payload: ' . ($payload // 'none'));
is($alert->{start}, $al_start, "(6) the payload holds the key's start");
$listener->{psql}->quit;

#
# (5) A flush error puts the records back.  1.0: the worker died with them.
#
my $ff_before = status_value('flush_failures');
sql($node, 'faildb', q{ALTER TABLE apikeys.audit_log
	ADD CONSTRAINT t_no_failed CHECK (event <> 'verify_failed') NOT VALID});
is(fail_unknown('faildb', 'flfail', 9), '9', '(5) 9 refusals queued while the audit log refuses them');
# Two failures: the first flush, and the next interval's attempt.
ok( defined wait_until($node, 'main', sprintf(q{SELECT flush_failures >= %d FROM apikeys.status()},
			($ff_before // 0) + 2), 8),
	'(5) status().flush_failures counts the failed flush, tried again at the next interval');
is(sql($node, 'faildb', failed_sum_sql('flfail')), '0', '(5) nothing written while the constraint is there');
cmp_ok(status_value('queued_records') // 0, '>', 0, '(5) the records are back in the queue');
sql($node, 'faildb', 'ALTER TABLE apikeys.audit_log DROP CONSTRAINT t_no_failed');
ok( defined wait_until($node, 'faildb', 'SELECT (' . failed_sum_sql('flfail') . ') = 9', 10),
	'(5) once the constraint is dropped, the rows count exactly the 9 refusals');

#
# (4) pg_terminate_backend() stops a worker waiting on the chain's lock.
# 1.0: the worker kept waiting, with the records it had taken.
#
my ($lk_id) = new_key($node, 'lockdb', q{'locker', 'held key'});
my $blocker = session('lockdb');
bg($blocker, qq{BEGIN; SELECT apikeys.revoke('$lk_id', NULL, 'hold the chain') IS NOT NULL});
is($blocker->{stderr}, '', '(4) a session holds the audit chain (revoke, not committed)');
is(fail_unknown('lockdb', 'lockq', 7), '7', '(4) 7 refusals queued');
my $wpid;
my $deadline = time() + 10;
while (!$wpid && time() < $deadline)
{
	$wpid = sql($node, 'postgres', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'apikeys worker'
		AND datname = 'lockdb' AND wait_event_type = 'Lock' LIMIT 1});
	usleep(100_000) unless $wpid;
}
ok($wpid, '(4) the worker waits on a lock');
my ($gone_after, $queued_then);
SKIP:
{
	skip 'no worker waiting', 2 unless $wpid;
	my $t_term = time();
	sql($node, 'postgres', "SELECT pg_terminate_backend($wpid)");
	# Read the queue in the statement that sees the process gone: a new
	# worker takes the records a flush interval after it starts.
	while (time() - $t_term < 12)
	{
		my $r = try_sql($node, 'lockdb', qq{SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $wpid),
			(SELECT queued_records FROM apikeys.status())});
		if (defined $r && $r =~ /^t\|(\d+)$/)
		{
			($gone_after, $queued_then) = (time() - $t_term, $1);
			last;
		}
		usleep(100_000);
	}
	# Its last flush waits at most 2 s for the lock, three times.
	ok(defined $gone_after && $gone_after < 8,
		sprintf('(4) the terminated worker is gone within 8 s (%.1f s)', $gone_after // -1));
	cmp_ok($queued_then // 0, '>', 0, '(4) ... and its records are still queued');
}
is(sql($node, 'lockdb', failed_sum_sql('lockq')), '0', '(4) nothing written while the lock is held');
bg($blocker, 'COMMIT');
$blocker->quit;
ok(defined wait_until($node, 'lockdb', 'SELECT (' . failed_sum_sql('lockq') . ') = 7', 12),
	'(4) after COMMIT a worker writes exactly the 7 refusals');

#
# (7) Usage cadence.  1.0 has no usage_flush_interval: it wrote counts every
# flush interval.
#
workers_gone_ok($node, '(7)', 20);
my ($u_id, $u_tok) = new_key($node, 'usedb', q{'user7', 'cadence key'});
my $client = session('usedb');
is( bg($client, qq{SELECT count(*) FROM generate_series(1, 3) g,
	LATERAL apikeys.verify('$u_tok' || left(g::text, 0)) v WHERE v.valid}),
	'3', '(7) a connected client verifies a key 3 times');
my $t_used = time();
is(sql($node, 'usedb', q{SELECT requests_today FROM apikeys.list_keys('user7')}), '3',
	'(7) list_keys() counts them at once');
usleep(int(($t_used + 2 - time()) * 1_000_000)) if time() < $t_used + 2;
is(sql($node, 'usedb', qq{SELECT count(*) FROM apikeys.key_usage WHERE key_id = '$u_id'}), '0',
	'(7) after 2 s, with the client connected, apikeys.key_usage has no row yet');
ok( defined wait_until($node, 'usedb', qq{SELECT coalesce(sum(requests), 0) = 3 FROM apikeys.key_usage
	WHERE key_id = '$u_id'}, $t_used + 8 - time()),
	sprintf('(7) ... and has the 3 requests once usage_flush_interval passed (%.1f s)', time() - $t_used));
$client->quit;
workers_gone_ok($node, '(7) the worker left after writing', 20);
sql($node, 'usedb', qq{SELECT apikeys.verify('$u_tok') FROM generate_series(1, 2)});
my $t_idle = time();
# Polls are client connections too: few of them, so that ticks see none.
ok( defined wait_until($node, 'usedb', qq{SELECT coalesce(sum(requests), 0) = 5 FROM apikeys.key_usage
	WHERE key_id = '$u_id'}, 3.5, 0.5),
	sprintf('(7) with no client connected, counts are written at the next tick (%.1f s)',
		time() - $t_idle));
ok(defined wait_until($node, 'postgres', q{SELECT count(*) = 0 FROM pg_stat_activity
	WHERE backend_type = 'apikeys worker' AND datname = 'usedb'}, 3),
	'(7) ... and the worker leaves');
my ($du_id, $du_tok) = new_key($node, 'dropuse', q{'dropper', 'used then dropped'});
sql($node, 'dropuse', qq{SELECT apikeys.verify('$du_tok') FROM generate_series(1, 3)});
my $t_drop = time();
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE dropuse');
is($ret, 0, '(7) DROP DATABASE of a database whose key was just used') or diag($err);
cmp_ok(time() - $t_drop, '<', 4, sprintf('(7) ... succeeds within seconds (%.1f s)', time() - $t_drop));

#
# (8) One worker per database, and one launcher.  1.0 had no launcher.
#
workers_gone_ok($node, '(8)', 20);
my (undef, $a_tok) = new_key($node, 'w8a', q{'eight', 'a'});
my (undef, $b_tok) = new_key($node, 'w8b', q{'eight', 'b'});
my @clients = (session('w8a'), session('w8a'), session('w8b'));
bg($clients[0], qq{SELECT apikeys.verify('$a_tok')});
bg($clients[2], qq{SELECT apikeys.verify('$b_tok')});
bg($clients[1], qq{SELECT apikeys.verify('$a_tok')});
fail_unknown('w8a', 'eighta', 3);
fail_unknown('w8b', 'eightb', 3);
my $per_db = q{SELECT coalesce(string_agg(datname || ':' || n, ',' ORDER BY datname), '') FROM
	(SELECT datname, count(*) n FROM pg_stat_activity WHERE backend_type = 'apikeys worker'
	  GROUP BY datname) s};
ok( defined wait_until($node, 'postgres', qq{SELECT ($per_db) = 'w8a:1,w8b:1'}, 5),
	'(8) each database with pending work has a worker');
# The clients keep using their keys meanwhile: each database keeps work
# pending, and each verify asks for a worker again.
my @samples;
for my $i (1 .. 10)
{
	bg($clients[$i % 2], qq{SELECT apikeys.verify('$a_tok')});
	bg($clients[2], qq{SELECT apikeys.verify('$b_tok')});
	push @samples, sql($node, 'postgres', $per_db);
	usleep(100_000);
}
is(join(' ', grep { $_ ne 'w8a:1,w8b:1' } @samples), '',
	'(8) ... exactly one per database, and no other, throughout a second');
is( sql($node, 'postgres', q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikeys launcher'
	AND datname IS NULL}),
	'1', '(8) one apikeys launcher runs, connected to no database');
cmp_ok(status_value('workers') // -1, '==', 2, '(8) status().workers counts the two workers');
$_->quit for @clients;

#
# (2) ALLOW_CONNECTIONS false.  1.0: the worker could not connect.
#
my $nc = session('noconn');
sql($node, 'postgres', 'ALTER DATABASE noconn ALLOW_CONNECTIONS false');
($ret, $out, $err) = $node->psql('noconn', 'SELECT 1');
isnt($ret, 0, '(2) noconn takes no new connection');
is(bg($nc, q{SELECT count(*) FROM generate_series(1, 4) g,
	LATERAL apikeys.verify(apikeys._new_token('noconn' || left(g::text, 0))::text) v
	WHERE v.code = 'API_KEY_INVALID'}),
	'4', '(2) 4 refusals queued from a session opened before');
my $written;
for (1 .. 100)
{
	$written = bg($nc, 'SELECT (' . failed_sum_sql('noconn') . ') = 4');
	last if $written eq 't';
	usleep(100_000);
}
is($written, 't', '(2) the worker writes them although the database takes no connections');
$nc->quit;
sql($node, 'postgres', 'ALTER DATABASE noconn ALLOW_CONNECTIONS true');

#
# (3) A start that failed for want of a worker process is retried.  1.0:
# the backend gave up and nothing tried again.
#
workers_gone_ok($node, '(3)', 20);
my $sf_before = status_value('worker_start_failures');
my ($hold, $hold_pid, $full) = hold_worker_processes();
ok(defined $full, "(3) every background worker process ($max_workers) is taken");
is(fail_unknown('retrydb', 'retry', 1), '1', '(3) one refusal in retrydb, and no other call there');
ok( defined wait_until($node, 'main', sprintf(q{SELECT worker_start_failures > %d FROM apikeys.status()},
			$sf_before // 0), 5),
	'(3) status().worker_start_failures counts the failed start');
is(sql($node, 'postgres', "SELECT ($bgworkers_sql) = $max_workers"), 't', '(3) ... the processes are still taken');
is(sql($node, 'retrydb', failed_sum_sql('retry')), '0', '(3) ... and nothing is written');
ok(defined release_worker_processes($hold, $hold_pid), '(3) the worker processes are free again');
ok(defined wait_until($node, 'retrydb', 'SELECT (' . failed_sum_sql('retry') . ') = 1', 15),
	'(3) the launcher starts the worker again and it writes the refusal');

#
# (1) Dropped databases never leak worker slots.  1.0: every worker that
# never connected kept its slot; after 64, no database got a worker.
#
workers_gone_ok($node, '(1)', 20);
# A database dropped while no worker process is free: its worker can only
# start after the drop, and finds the database gone.
($hold, $hold_pid, $full) = hold_worker_processes();
ok(defined $full, '(1) every background worker process is taken');
is(fail_unknown('gone1', 'gone', 2), '2', '(1) 2 refusals queued in gone1');
sql($node, 'postgres', 'DROP DATABASE gone1 WITH (FORCE)');
ok(defined release_worker_processes($hold, $hold_pid), '(1) gone1 dropped; worker processes free again');

my $t_dbs = time();
sql($node, 'postgres', join('', map { "CREATE DATABASE drop$_ TEMPLATE tpl;\n" } 1 .. 100));
note(sprintf('(1) 100 databases created in %.1f s', time() - $t_dbs));
my $admin = session('postgres');
my $queuer = session('postgres');
bg($queuer, '\c drop1');
bg($admin, 'ALTER DATABASE drop1 ALLOW_CONNECTIONS false');
my ($queued, $dropped) = (0, 0);
$t_dbs = time();
for my $i (1 .. 100)
{
	my $next = $i < 100 ? 'drop' . ($i + 1) : 'postgres';
	# From a session connected before ALLOW_CONNECTIONS false, so that the
	# worker started for it cannot connect the ordinary way.
	$queued++ if bg($queuer, qq{SELECT count(*) FROM
		apikeys.verify(apikeys._new_token('dropme')::text) v WHERE v.code = 'API_KEY_INVALID';
		\\c $next}) eq '1';
	bg($admin, "DROP DATABASE drop$i WITH (FORCE);"
		  . ($i < 100 ? "\nALTER DATABASE $next ALLOW_CONNECTIONS false;" : ''));
	$dropped++ if $admin->{stderr} eq '';
}
note(sprintf('(1) 100 databases used and dropped in %.1f s', time() - $t_dbs));
is($queued, 100, '(1) a refusal queued in each of 100 databases');
is($dropped, 100, '(1) ... each dropped (WITH FORCE) at once');
$admin->quit;
$queuer->quit;
is(fail_unknown('live', 'alive', 5), '5', '(1) then 5 refusals in a live database');
# All of them: past 64 databases refusing unknown tokens in a minute, a
# database's refusals are counted in its overflow record, not per prefix.
ok( defined wait_until($node, 'live', q{SELECT coalesce(sum((details->>'count')::bigint), 0) = 5
	FROM apikeys.audit_log WHERE event = 'verify_failed'}, 15),
	'(1) ... are written: a worker still starts');
ok(defined wait_until($node, 'main', 'SELECT records_lost >= 2 FROM apikeys.status()', 10),
	'(1) status().records_lost counts the refusals of gone1, dropped before its worker connected');
ok(defined wait_until($node, 'main', 'SELECT queued_records = 0 FROM apikeys.status()', 10),
	'(1) nothing of the dropped databases stays queued');
workers_gone_ok($node, '(1) end', 20);

#
# (9) More databases waiting than there are slots (64): a database that
# found every slot taken is still given a worker once one is free, with no
# further call there; one dropped while it waited has its records counted
# as lost, and nothing stays queued.  1.0: a database past the 64th waited
# for its next call, and one dropped meanwhile kept its records queued.
#
sql($node, 'postgres', join('', map { "CREATE DATABASE many$_ TEMPLATE tpl;
" } 1 .. 66));
($hold, $hold_pid, $full) = hold_worker_processes();
ok(defined $full, '(9) every background worker process is taken');
my $many_queued = 0;
$many_queued += fail_unknown("many$_", 'many', 1) for 1 .. 66;
is($many_queued, 66, '(9) one refusal in each of 66 databases, while no worker can start');
my $lost_before = status_value('records_lost') // 0;
sql($node, 'postgres', 'DROP DATABASE many66 WITH (FORCE)');
ok(defined release_worker_processes($hold, $hold_pid), '(9) many66 dropped; worker processes free again');
my $many_written = 0;
for my $i (1 .. 65)
{
	$many_written++ if defined wait_until($node, "many$i", q{SELECT coalesce(sum((details->>'count')::bigint), 0) = 1
		FROM apikeys.audit_log WHERE event = 'verify_failed'}, 60, 0.5);
}
is($many_written, 65, '(9) each of the 65 remaining databases got a worker and its record written');
ok(defined wait_until($node, 'main', "SELECT records_lost > $lost_before FROM apikeys.status()", 20),
	'(9) the record of many66, dropped while it waited for a slot, is counted as lost');
ok(defined wait_until($node, 'main', 'SELECT queued_records = 0 FROM apikeys.status()', 20),
	'(9) nothing stays queued');

#
# (10) The launcher comes back after pg_terminate_backend, and records
# queued meanwhile are written.  (1.0 had no launcher.)
#
workers_gone_ok($node, '(10)', 20);
my $launcher_pid = sql($node, 'postgres', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'apikeys launcher'});
ok($launcher_pid =~ /^\d+$/, '(10) the launcher runs');
sql($node, 'postgres', "SELECT pg_terminate_backend($launcher_pid)");
ok( defined wait_until($node, 'postgres', qq{SELECT count(*) = 0 FROM pg_stat_activity
		WHERE backend_type = 'apikeys launcher' AND pid = $launcher_pid}, 10),
	'(10) the launcher is terminated');
my $last_id = sql($node, 'live', 'SELECT coalesce(max(id), 0) FROM apikeys.audit_log');
is(fail_unknown('live', 'after', 3), '3', '(10) 3 refusals queued meanwhile');
ok( defined wait_until($node, 'postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'apikeys launcher'}, 20),
	'(10) the postmaster starts the launcher again');
# In the minute of part (9), 66 databases refused tokens: more than the 64
# databases whose unknown prefixes get records of their own in a minute, so
# these may be counted in the database's overflow record instead.
ok( defined wait_until($node, 'live', qq{SELECT coalesce(sum((details->>'count')::bigint), 0) = 3
		FROM apikeys.audit_log WHERE event = 'verify_failed' AND id > $last_id
		AND (details->>'prefix' = 'after' OR details ? 'overflow')}, 20),
	'(10) ... and the refusals are written');

#
# (11) A worker still running when the launcher restarts is adopted: the new
# launcher learns when it exits and frees its slot, so the database gets a
# worker again for its next record.
#
# Refusals counted in live since $from_id: by prefix, or in the overflow record (see (10)).
sub written_since
{
	my ($from_id, $prefix) = @_;
	return qq{SELECT coalesce(sum((details->>'count')::bigint), 0) FROM apikeys.audit_log
		WHERE event = 'verify_failed' AND id > $from_id
		AND (details->>'prefix' = '$prefix' OR details ? 'overflow')};
}
workers_gone_ok($node, '(11)', 20);
sql($node, 'postgres', q{ALTER SYSTEM SET apikeys.flush_interval = '1h'});
sql($node, 'postgres', 'SELECT pg_reload_conf()');
$last_id = sql($node, 'live', 'SELECT coalesce(max(id), 0) FROM apikeys.audit_log');
# A client stays connected: a worker whose database has none writes and leaves at once.
my $live_client = session('live');
is(fail_unknown('live', 'adopt', 1), '1', '(11) a refusal queued');
ok( defined wait_until($node, 'postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'apikeys worker' AND datname = 'live'}, 20),
	'(11) its worker runs, waiting an hour to flush');
$launcher_pid = sql($node, 'postgres', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'apikeys launcher'});
sql($node, 'postgres', "SELECT pg_terminate_backend($launcher_pid)");
ok( defined wait_until($node, 'postgres', qq{SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'apikeys launcher' AND pid <> $launcher_pid}, 20),
	'(11) a new launcher runs');
is(sql($node, 'postgres', q{SELECT count(*) FROM pg_stat_activity
		WHERE backend_type = 'apikeys worker' AND datname = 'live'}),
	'1', '(11) the worker started by the old launcher still runs');
sql($node, 'postgres', 'ALTER SYSTEM RESET apikeys.flush_interval');
sql($node, 'postgres', 'SELECT pg_reload_conf()');
ok(defined wait_until($node, 'live', 'SELECT (' . written_since($last_id, 'adopt') . ') = 1', 20),
	'(11) after a reload to 1 s it writes the refusal');
$live_client->quit;
workers_gone_ok($node, '(11) ... and exits', 20);
is(fail_unknown('live', 'again', 1), '1', '(11) another refusal queued');
ok(defined wait_until($node, 'live', 'SELECT (' . written_since($last_id, 'again') . ') = 1', 20),
	'(11) the new launcher freed the adopted slot: a new worker writes it');

$node->stop;
note(sprintf('007_workers took %.1f s', time() - $t0));
done_testing();
