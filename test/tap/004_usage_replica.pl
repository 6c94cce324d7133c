# Copyright: the apikeys authors.
#
# Usage counters, rate limits and alerts (library preloaded), and verify on
# a streaming replica.
#
#  1. Counters are exact: N VALID answers and M refusals (scope) of a key
#     show in list_keys() at once; after the worker's flush
#     apikeys.key_usage holds exactly N/M.  With flush_interval = 1h a
#     request is not written at once (the worker waits its interval);
#     list_keys() stays exact while a flush is blocked in flight; with a
#     worker holding pending counts, a clean (fast) restart: the shutdown
#     flush leaves exact totals in key_usage, and list_keys() agrees; the
#     same when the restart comes while a periodic flush is blocked (by a
#     lock) and more requests arrived after it took its counts.
#  2. Rate limit 5: requests 1..5 VALID, 6.. RATE_LIMITED within the minute;
#     the refusals count as failures; in the next minute, and at least
#     24 s after the burst, two requests pass again (the limit is a GCRA of
#     one request every 12 s and a burst of 4: the first passes 12 s after
#     the burst, the second 12 s after that).
#  3. Alerts (apikeys.alert_requests_per_minute = 5): a LISTEN session gets
#     exactly one apikeys_alert notification per key and minute, with the
#     right JSON payload; audit_log holds exactly one usage_alert row for
#     it; a key at the threshold (not past it) raises none.
#  4. verify() inside a read-only transaction works and is counted.
#  5. apikeys.max_tracked_keys = 100 on a separate node: 160 distinct keys
#     (10 revoked) verified in one minute all get the right answer, with no
#     error; status() reports the untracked requests (60, and 3 more for
#     an untracked key with rate limit 1, which is not limited); once the
#     minute has passed and the counts were flushed, idle entries make room
#     and the other keys are tracked (and limited) again, with exact totals.  A minute later, when every entry is idle,
#     keys 1..100 (most of whose entries were forgotten) are each counted
#     exactly once more: forgetting an entry leaves no fast-index slot
#     naming memory the table reuses.
#  6. A streaming standby (also preloaded): verify works (VALID, then
#     API_KEY_REVOKED after the primary revokes and the standby replays,
#     API_KEY_INVALID for unknown and malformed tokens); status() reports
#     in_recovery; rate limits are enforced per server; verify on the
#     standby registers no background worker (none could start before
#     promotion: they would use up max_worker_processes, seen as parallel
#     queries getting no workers); the standby's log has no unexpected
#     ERROR/FATAL; nothing the standby did shows up in the primary's
#     key_usage or audit_log.
#  7. Credits on the standby, which spends none: a credit-limited key is
#     refused (USAGE_EXCEEDED) for cost 1 and VALID for cost 0, with
#     credits_remaining and get_key() the balance the primary wrote and the
#     standby replayed; a key without credits is VALID at any cost; the
#     primary's balance is untouched (exactly what it had can be spent).
#
# The minute-sensitive checks (2, 3, 5 and the standby's rate limit) run
# together inside one minute, then the test waits (bounded) for the next
# minute once.
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
use Time::HiRes qw(time usleep sleep);

my $t0 = time();

#
# Helpers.
#

# The current Unix minute of the clock (the server's clock: same machine).
sub minute_now { return int(time() / 60); }

# Sleeps until the minute after $minute has begun (bounded: at most ~61 s).
sub wait_for_minute_after
{
	my ($minute) = @_;
	my $wait = ($minute + 1) * 60 + 0.3 - time();
	note(sprintf('waiting %.1f s for the next minute', $wait)) if $wait > 0;
	sleep($wait) if $wait > 0 && $wait < 62;
	return minute_now();
}

# Codes of $n calls of verify (select list: one call per row), comma-joined.
sub verify_n
{
	my ($node, $db, $token, $n, $scopes) = @_;
	$scopes //= '{}';
	return sql($node, $db, qq{
		SELECT string_agg(c, ',' ORDER BY i)
		  FROM (SELECT i, (apikeys.verify('$token', '$scopes')).code AS c
		          FROM generate_series(1, $n) i) s});
}

sub codes
{
	my (@spec) = @_;    # pairs: code, count
	my @out;
	while (my ($c, $n) = splice(@spec, 0, 2)) { push @out, ($c) x $n; }
	return join(',', @out);
}

# list_keys(owner) of one key: "requests_today|failures_today".
sub listed
{
	my ($node, $db, $owner, $key_id) = @_;
	return sql($node, $db, qq{
		SELECT requests_today || '|' || failures_today
		  FROM apikeys.list_keys('$owner') WHERE key_id = '$key_id'});
}

# key_usage totals of one key: "requests|failures" ("0|0" without rows).
sub usage_row
{
	my ($node, $db, $key_id) = @_;
	return sql($node, $db, qq{
		SELECT coalesce(sum(requests), 0) || '|' || coalesce(sum(failures), 0)
		  FROM apikeys.key_usage WHERE key_id = '$key_id'});
}

# The log lines no server may write, but for expected ones: errors, and a
# process that crashed or exited with a failure.
my $bad_line = qr/\b(?:ERROR|FATAL|PANIC):|terminated by signal|exited with exit code [1-9]/;

#
# The primary.
#
my $primary = new_node('primary', qq{
max_connections = 20
# Few background worker slots (the standby inherits this), so that a
# standby which used them up would show it.
max_worker_processes = 4
}, allows_streaming => 1);
$primary->safe_psql('postgres', 'CREATE DATABASE app');
$primary->safe_psql('app', 'CREATE EXTENSION apikeys');
# A table for parallel queries on the standby.
$primary->safe_psql('app', 'CREATE TABLE big AS SELECT g FROM generate_series(1, 20000) g; ANALYZE big');
$primary->safe_psql('app', q{
	SELECT apikeys.set_plan(o, 'enterprise')
	  FROM unnest(ARRAY['acme', 'limited', 'alert1', 'alert2', 'ro', 'sb', 'marker', 'restart']) o});

sub p { return sql($primary, 'app', $_[0]); }

is(p(q{SELECT preloaded AND usage_tracking AND rate_limits AND NOT in_recovery FROM apikeys.status()}),
	't', 'primary: preloaded, tracking usage, not in recovery');

my ($u1_id, $u1)   = new_key($primary, 'app', q{'acme', 'counted', '{read}'});
my ($rl_id, $rl)   = new_key($primary, 'app', q{'limited', 'five a minute', rate_limit => 5});
my ($a1_id, $a1)   = new_key($primary, 'app', q{'alert1', 'hammered 1'});
my ($a2_id, $a2)   = new_key($primary, 'app', q{'alert2', 'hammered 2'});
my ($ro_id, $ro)   = new_key($primary, 'app', q{'ro', 'read only'});
my ($sbv_id, $sbv) = new_key($primary, 'app', q{'sb', 'standby valid'});
my ($sbr_id, $sbr) = new_key($primary, 'app', q{'sb', 'standby revoked'});
my ($sbo_id, $sbo) = new_key($primary, 'app', q{'sb', 'standby only'});
my ($sbl_id, $sbl) = new_key($primary, 'app', q{'sb', 'standby limited', rate_limit => 3});
my ($mk_id, $mk)   = new_key($primary, 'app', q{'marker', 'flush marker'});

#
# 1. Counters: exact before a flush, after it, and across a clean restart.
#
{
	my ($n, $m) = (12, 4);
	is(verify_n($primary, 'app', $u1, $n, '{read}'), codes('VALID', $n),
		"1: $n requests VALID");
	is(verify_n($primary, 'app', $u1, $m, '{write}'), codes('INSUFFICIENT_SCOPE', $m),
		"1: $m requests refused for scope");
	is(listed($primary, 'app', 'acme', $u1_id), "$n|$m",
		'1: list_keys shows the counts at once, before any flush');
	is(p(qq{SELECT last_used_at IS NOT NULL AND last_used_at <= now() AND last_used_at > now() - interval '1 minute'
	          FROM apikeys.list_keys('acme') WHERE key_id = '$u1_id'}),
		't', '1: list_keys shows last_used_at');

	ok(defined poll_until($primary, 'app',
			qq{SELECT requests || '|' || failures FROM apikeys.key_usage WHERE key_id = '$u1_id'},
			"$n|$m"),
		'1: the worker flushed the counts into key_usage');
	is(p(qq{SELECT count(*) || '|' || bool_and(day = (now() AT TIME ZONE 'UTC')::date)
	          FROM apikeys.key_usage WHERE key_id = '$u1_id'}),
		'1|true', '1: one key_usage row, for today (UTC)');
	is(listed($primary, 'app', 'acme', $u1_id), "$n|$m",
		'1: list_keys unchanged after the flush (nothing counted twice)');
	is(p(qq{SELECT l.last_used_at = u.last_used_at
	          FROM apikeys.list_keys('acme') l JOIN apikeys.key_usage u ON u.key_id = l.key_id
	         WHERE l.key_id = '$u1_id'}),
		't', '1: last_used_at in key_usage is the one list_keys showed');

	# The shutdown flush.  With a flush interval of an hour, a worker waits
	# an hour before it writes: the only flush that can write what follows
	# is the one at shutdown.
	my $workers = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikeys worker'};
	ok(defined poll_until($primary, 'app', $workers, '0'), '1: the worker left once idle');
	p(q{ALTER SYSTEM SET apikeys.flush_interval = 3600});
	p(q{SELECT pg_reload_conf()});
	ok(defined poll_until($primary, 'app', q{SHOW apikeys.flush_interval}, '1h'),
		'1: flush interval raised to an hour');
	ok(defined poll_until($primary, 'app', $workers, '0'), '1: no worker left from before the reload');

	# A lone request: the worker started for it waits the interval (an
	# hour) before it writes, as long as a client is connected (with none
	# for a second, it would write and leave).
	my $stay = $primary->background_psql('app');
	is(verify_n($primary, 'app', $u1, 1, '{read}'), 'VALID', '1: one more request');
	my $tot_r = $n + 1;
	my $tot_f = $m;
	sleep(1.5);
	is(usage_row($primary, 'app', $u1_id), "$n|$m",
		'1: flush_interval = 1h: the request is not written within 1.5 s (the worker waits an interval)');

	# A worker with counts pending when the server shuts down, whatever it
	# did with the lone request: hold a lock that blocks its next write, so
	# requests arriving meanwhile are still pending when that write commits.
	my $blocked_q = q{SELECT count(*) FROM pg_stat_activity
	                   WHERE backend_type = 'apikeys worker' AND wait_event_type = 'Lock'};
	my $blocker = $primary->background_psql('app');
	$blocker->query_safe(q{BEGIN; LOCK TABLE apikeys.key_usage IN SHARE ROW EXCLUSIVE MODE});
	my ($n2, $m2) = (7, 2);
	is(verify_n($primary, 'app', $u1, $n2, '{read}'), codes('VALID', $n2),
		"1: $n2 more requests VALID");
	is(verify_n($primary, 'app', $u1, $m2, '{write}'), codes('INSUFFICIENT_SCOPE', $m2),
		"1: $m2 more refusals");
	$tot_r += $n2;
	$tot_f += $m2;
	note(defined poll_until($primary, 'app', $blocked_q, '1', 5, quiet => 1)
		? 'a worker is blocked in the middle of a flush'
		: 'no worker is writing (it waits its interval)');
	is(listed($primary, 'app', 'acme', $u1_id), "$tot_r|$tot_f",
		'1: list_keys exact while a flush is in flight or pending');
	my $n3 = 5;
	is(verify_n($primary, 'app', $u1, $n3, '{read}'), codes('VALID', $n3),
		"1: $n3 more requests VALID");
	$tot_r += $n3;
	$blocker->query_safe('COMMIT');
	$blocker->quit;
	ok(defined poll_until($primary, 'app',
			q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikeys worker' AND wait_event_type IS DISTINCT FROM 'Lock'},
			'1'),
		'1: a worker runs');
	is(listed($primary, 'app', 'acme', $u1_id), "$tot_r|$tot_f",
		'1: list_keys exact');
	note('before the restart key_usage has ' . usage_row($primary, 'app', $u1_id)
		  . " of $tot_r|$tot_f");

	$primary->restart;    # pg_ctl restart: fast shutdown
	$stay->quit;

	is(usage_row($primary, 'app', $u1_id), "$tot_r|$tot_f",
		'1: after a clean restart key_usage holds the exact totals (shutdown flush)');
	is(listed($primary, 'app', 'acme', $u1_id), "$tot_r|$tot_f",
		'1: list_keys still exact after the restart');

	# A clean shutdown while a periodic flush is blocked: what arrived after
	# that flush took its counts must still be written at shutdown.  Back to
	# a 1 s interval, so a flush comes soon; a lock blocks it; the fast
	# shutdown ends the session holding the lock.
	p(q{ALTER SYSTEM SET apikeys.flush_interval = 1});
	p(q{SELECT pg_reload_conf()});
	ok(defined poll_until($primary, 'app', q{SHOW apikeys.flush_interval}, '1s'),
		'1: flush interval back to 1 s');
	$blocker = $primary->background_psql('app');
	$blocker->query_safe(q{BEGIN; LOCK TABLE apikeys.key_usage IN SHARE ROW EXCLUSIVE MODE});
	my $n4 = 6;
	is(verify_n($primary, 'app', $u1, $n4, '{read}'), codes('VALID', $n4),
		"1: $n4 more requests VALID");
	$tot_r += $n4;
	ok(defined poll_until($primary, 'app', $blocked_q, '1', 15),
		'1: the next flush is blocked by the lock');
	my $n5 = 4;
	is(verify_n($primary, 'app', $u1, $n5, '{read}'), codes('VALID', $n5),
		"1: $n5 more requests VALID, after that flush took its counts");
	$tot_r += $n5;
	is(listed($primary, 'app', 'acme', $u1_id), "$tot_r|$tot_f",
		'1: list_keys exact while the flush is blocked');

	$primary->restart;    # fast shutdown; it terminates the blocking session
	$blocker->quit;

	is(usage_row($primary, 'app', $u1_id), "$tot_r|$tot_f",
		'1: after a clean restart during a blocked flush key_usage holds the exact totals');
	is(listed($primary, 'app', 'acme', $u1_id), "$tot_r|$tot_f",
		'1: list_keys still exact after that restart');
	is(p(q{SHOW apikeys.flush_interval}), '1s', '1: flush interval still 1 s');

	# After a restart the server no longer knows which keys have a row today.
	# A flush inserts rows it believes new; a batch that meets an existing row
	# is written again as an upsert, new keys in the same batch included.  A
	# row deleted by hand is written again.
	my ($w1_id, $w1) = new_key($primary, 'app', q{'restart', 'written before the restart'});
	is(verify_n($primary, 'app', $w1, 2), codes('VALID', 2), '1: w1: 2 requests');
	ok(defined poll_until($primary, 'app', qq{SELECT requests FROM apikeys.key_usage WHERE key_id = '$w1_id'}, '2'),
		'1: w1: its row is written');
	$primary->restart;
	my ($w2_id, $w2) = new_key($primary, 'app', q{'restart', 'new after the restart'});
	is(verify_n($primary, 'app', $w1, 3), codes('VALID', 3), '1: w1: 3 requests after the restart');
	is(verify_n($primary, 'app', $w2, 1), 'VALID', '1: w2: 1 request');
	ok(defined poll_until($primary, 'app',
			qq{SELECT string_agg(requests::text, ',' ORDER BY key_id = '$w1_id')
			     FROM apikeys.key_usage WHERE key_id IN ('$w1_id', '$w2_id')}, '1,5'),
		'1: after the restart: w1 added to its existing row (5), w2 inserted (1), one row each');
	p(qq{DELETE FROM apikeys.key_usage WHERE key_id = '$w1_id'});
	is(verify_n($primary, 'app', $w1, 1), 'VALID', '1: w1: 1 request after its row was deleted');
	ok(defined poll_until($primary, 'app', qq{SELECT requests FROM apikeys.key_usage WHERE key_id = '$w1_id'}, '1'),
		'1: a row deleted by hand is written again');
}

#
# 4. Read-only transactions.
#
{
	my $out = p(qq{
		BEGIN TRANSACTION READ ONLY;
		SELECT current_setting('transaction_read_only');
		SELECT code FROM apikeys.verify('$ro');
		SELECT code FROM apikeys.verify('$ro');
		COMMIT;
		SET default_transaction_read_only = on;
		SELECT owner FROM apikeys.authenticate('$ro');
		SELECT code FROM apikeys.verify('$ro', '{admin}');});
	is($out, "on\nVALID\nVALID\nro\nINSUFFICIENT_SCOPE",
		'4: verify and authenticate work in read-only transactions');
	is(listed($primary, 'app', 'ro', $ro_id), '3|1', '4: ... and are counted');
	ok(defined poll_until($primary, 'app',
			qq{SELECT requests || '|' || failures FROM apikeys.key_usage WHERE key_id = '$ro_id'},
			'3|1'),
		'4: ... and flushed');
}

#
# 6 (set-up). The standby.
#
$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'apikeys'
apikeys.flush_interval = 1
apikeys.usage_flush_interval = 1
});
my $standby_log_start = -s $standby->logfile // 0;
$standby->start;
$primary->wait_for_catchup($standby);

sub sb { return sql($standby, 'app', $_[0]); }

# Workers a parallel query on the standby launched (of 2 planned).
sub standby_parallel_workers
{
	my $out = sb(q{
		SET max_parallel_workers_per_gather = 2;
		SET parallel_setup_cost = 0;
		SET parallel_tuple_cost = 0;
		SET min_parallel_table_scan_size = 0;
		EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT count(*) FROM big});
	return $out =~ /Workers Launched: (\d+)/ ? $1 : "none in: $out";
}

is(standby_parallel_workers(), 2, '6: standby: a parallel query launches its 2 workers (before any verify)');

is(sb(q{SELECT in_recovery AND preloaded AND rate_limits FROM apikeys.status()}), 't',
	'6: standby: status() says in_recovery');
is(sb(qq{SELECT code FROM apikeys.verify('$sbv')}), 'VALID', '6: standby: valid key VALID');
is(sb(qq{SELECT owner || '|' || name FROM apikeys.authenticate('$sbv')}), 'sb|standby valid',
	'6: standby: authenticate works');
is(sb(qq{BEGIN READ ONLY; SELECT code FROM apikeys.verify('$sbv'); COMMIT;}), 'VALID',
	'6: standby: verify in an explicit read-only transaction');
is(sb(qq{SELECT code FROM apikeys.verify('$sbr')}), 'VALID', '6: standby: key to revoke is VALID');
is(verify_n($standby, 'app', $sbo, 5), codes('VALID', 5), '6: standby: standby-only key VALID x5');

p(qq{SELECT apikeys.revoke('$sbr_id', 'sb', 'standby test')});
$primary->wait_for_catchup($standby);
is(sb(qq{SELECT code FROM apikeys.verify('$sbr')}), 'API_KEY_REVOKED',
	'6: standby: revoked on the primary and replayed: API_KEY_REVOKED');
is(sb(qq{SELECT code || '|' || key_id FROM apikeys.verify('$sbr')}), "API_KEY_REVOKED|$sbr_id",
	'6: standby: ... naming the key');

my $unknown = p(q{SELECT apikeys._new_token('sbonly')::text});
is(sb(qq{SELECT string_agg(code, ',') FROM (VALUES ('$unknown'), ('not-a-token'), (''), ('sbonly_xyz'))
          t(tok), LATERAL apikeys.verify(t.tok)}),
	'API_KEY_INVALID,API_KEY_INVALID,API_KEY_INVALID,API_KEY_INVALID',
	'6: standby: unknown and malformed tokens API_KEY_INVALID');
is(sb(qq{SELECT requests_today || '|' || failures_today FROM apikeys.list_keys('acme')}),
	usage_row($primary, 'app', $u1_id), '6: standby: list_keys shows the replicated key_usage');

#
# 5 (set-up). A node that tracks at most 100 keys.
#
my $small = new_node('small', qq{
apikeys.max_tracked_keys = 100
log_statement = none
});
$small->safe_psql('postgres', 'CREATE DATABASE small');
$small->safe_psql('small', 'CREATE EXTENSION apikeys');
sub sm { return sql($small, 'small', $_[0]); }
# 160 keys: 1..150 valid (149 with rate limit 1), 151..160 revoked.
sm(q{
	SELECT apikeys.set_plan('bulk', 'enterprise');
	CREATE TABLE toks AS
	SELECT i, c.key_id, c.token::text AS token
	  FROM generate_series(1, 160) i,
	       LATERAL apikeys.create_key('bulk', 'bulk ' || i,
	                                  rate_limit => CASE WHEN i = 149 THEN 1 END) c;
	SELECT count(apikeys.revoke(key_id, NULL, 'test')) FROM toks WHERE i > 150;
});
is(sm(q{SELECT tracked_keys || '|' || untracked_requests FROM apikeys.status()}), '0|0',
	'5: nothing tracked yet');
my $small_log_start = -s $small->logfile;

# verify of keys $from..$to of toks, in order: "valid|revoked|wrong".
sub small_batch
{
	my ($from, $to) = @_;
	return sm(qq{
		SELECT count(*) FILTER (WHERE c = 'VALID' AND i <= 150) || '|' ||
		       count(*) FILTER (WHERE c = 'API_KEY_REVOKED' AND i > 150) || '|' ||
		       count(*) FILTER (WHERE NOT ((c = 'VALID' AND i <= 150)
		                                   OR (c = 'API_KEY_REVOKED' AND i > 150)))
		  FROM (SELECT i, (apikeys.verify(token)).code AS c FROM toks
		         WHERE i BETWEEN $from AND $to ORDER BY i) s});
}

#
# Alerts on; the listener.
#
p(q{ALTER SYSTEM SET apikeys.alert_requests_per_minute = 5});
p(q{SELECT pg_reload_conf()});
ok(defined poll_until($primary, 'app', q{SHOW apikeys.alert_requests_per_minute}, '5'),
	'3: alert threshold set to 5');

my $listener = alert_listener($primary, 'app');
is(scalar(alerts_heard($listener)), 0, '3: no alert before the burst');

#
# The minute: every check that must not straddle a minute boundary.
#
my $minute = avoid_minute_edge(45);
my $minute_start = p(qq{SELECT to_timestamp($minute * 60)});
note("minute window starts at $minute_start");

# 2. Rate limit 5.
is(verify_n($primary, 'app', $rl, 7), codes('VALID', 5, 'RATE_LIMITED', 2),
	'2: rate limit 5: requests 1..5 VALID, 6 and 7 RATE_LIMITED');
my $rl_burst_at = time();
is(p(qq{SELECT valid || '|' || code || '|' || key_id FROM apikeys.verify('$rl')}),
	"false|RATE_LIMITED|$rl_id", '2: a rate-limited answer names the key');

# 3. Two keys hammered past the threshold; a third key (rl) reached it
# without passing it.
is(verify_n($primary, 'app', $a1, 20), codes('VALID', 20), '3: key 1 hammered 20 times');
is(verify_n($primary, 'app', $a2, 20), codes('VALID', 20), '3: key 2 hammered 20 times');
is(verify_n($primary, 'app', $a1, 10), codes('VALID', 10), '3: key 1 10 more times');

# 6. Rate limits are per server: the primary used up rl's minute, the
# standby has its own; sbl is used up on the standby first.
is(verify_n($standby, 'app', $rl, 7), codes('VALID', 5, 'RATE_LIMITED', 2),
	'6: standby enforces rl independently of the primary');
is(verify_n($standby, 'app', $sbl, 4), codes('VALID', 3, 'RATE_LIMITED', 1),
	'6: standby: rate limit 3 enforced');
is(verify_n($primary, 'app', $sbl, 4), codes('VALID', 3, 'RATE_LIMITED', 1),
	'6: primary: the standby used none of its limit');

# 5. 160 distinct keys on the small node: the first 100 (all VALID, so
# none is idle this minute) are tracked, the other 60 are not.
is(small_batch(1, 160), '150|10|0', '5: 160 distinct keys (10 revoked): every answer right');
is(verify_n($small, 'small', sm(q{SELECT token FROM toks WHERE i = 149}), 3),
	codes('VALID', 3), '5: an untracked key is not rate limited');

my $minute_end = minute_now();
is($minute_end, $minute, 'the minute-sensitive checks ran within one minute')
  or diag('the checks above straddled a minute boundary: their counts may be off');

#
# Checks of that minute that may run late.
#

# 2.
is(listed($primary, 'app', 'limited', $rl_id), '5|3',
	'2: rate-limited answers count as failures (5 requests, 3 failures)');

# 5.
is(sm(q{SELECT tracked_keys || '|' || untracked_requests FROM apikeys.status()}), '100|63',
	'5: status(): 100 keys tracked, 63 untracked requests');
is(sm(q{SELECT sum(requests_today) || '|' || sum(failures_today) FROM apikeys.list_keys('bulk')}),
	'100|0', '5: list_keys counts only the tracked keys');

# 3. Both alerts arrive (bounded wait), each once.
{
	my @payloads;
	my $deadline = time() + 30;
	while (time() < $deadline)
	{
		@payloads = alerts_heard($listener);
		last if @payloads >= 2;
		sleep(0.2);
	}
	# Two more flushes: nothing more may come.
	sleep(2.5);
	@payloads = alerts_heard($listener);
	is(scalar(@payloads), 2, '3: exactly two apikeys_alert notifications')
	  or diag("heard:\n$listener->{heard}");

	my %by_key;
	for my $pl (@payloads)
	{
		my $j = eval { decode_json($pl) };
		ok($j, "3: payload is JSON: $pl") or next;
		push @{ $by_key{ $j->{key_id} // '' } }, $j;
	}
	for my $k ([ $a1_id, 'alert1' ], [ $a2_id, 'alert2' ])
	{
		my ($id, $owner) = @$k;
		my $list = $by_key{$id} // [];
		is(scalar(@$list), 1, "3: one notification for ${owner}'s key");
		next unless @$list;
		my $j = $list->[0];
		my $start = p(qq{SELECT start FROM apikeys.keys WHERE id = '$id'});
		is_deeply(
			{ map { $_ => $j->{$_} } qw(key_id owner start requests threshold) },
			{ key_id => $id, owner => $owner, start => $start, requests => 6, threshold => 5 },
			"3: ${owner}'s payload: key_id, owner, start, requests (6), threshold (5)");
		is_deeply([ sort keys %$j ], [qw(key_id owner requests start threshold)],
			"3: ${owner}'s payload has exactly those fields");
	}
	is(scalar(grep { !exists $by_key{$_} } ($rl_id)), 1, '3: no alert for a key at the threshold');

	# The audit rows.
	is(p(qq{SELECT count(*) FROM apikeys.audit_log WHERE event = 'usage_alert'}), '2',
		'3: two usage_alert rows in audit_log');
	for my $k ([ $a1_id, 'alert1' ], [ $a2_id, 'alert2' ])
	{
		my ($id, $owner) = @$k;
		is(p(qq{SELECT count(*) || '|' || min(owner) || '|' || (min(at) = to_timestamp($minute * 60))
		          || '|' || min(details->>'key_id') || '|' || min(details->>'requests')
		          || '|' || min(details->>'threshold')
		          FROM apikeys.audit_log WHERE event = 'usage_alert' AND key_id = '$id'}),
			"1|$owner|true|$id|6|5", "3: one usage_alert row for ${owner}'s key, for that minute");
	}
	is(p(q{SELECT ok FROM apikeys.audit_verify()}), 't', '3: audit chain verifies');
	is(listed($primary, 'app', 'alert1', $a1_id), '30|0', '3: alerted key still counted (30)');
}

#
# 6. Requests on the standby, more than 10 s apart (a worker that has not
# started in 10 s is asked for again): nothing can be written on a standby,
# so verify must not register background workers there, which could not
# start before promotion and would use up max_worker_processes.
#
for my $i (1 .. 3)
{
	is(sb(qq{SELECT code FROM apikeys.verify('$sbv')}), 'VALID', "6: standby: request $i of 3, 10.5 s apart");
	sleep(10.5) if $i < 3;
}
is(standby_parallel_workers(), 2,
	'6: standby: a parallel query still launches its 2 workers (verify used no worker slot)');

#
# The next minute.
#
my $next = wait_for_minute_after($minute);
cmp_ok($next, '>', $minute, 'a new minute has begun');
# Two requests of rl pass 24 s after its burst (see 2. above), which the
# next minute may begin before, when the burst came late in its minute.
my $rl_wait = $rl_burst_at + 25 - time();
sleep($rl_wait) if $rl_wait > 0;

# 2. Allowed again.
is(verify_n($primary, 'app', $rl, 2), 'VALID,VALID', '2: next minute: the key is allowed again');
is(listed($primary, 'app', 'limited', $rl_id), '7|3', '2: ... and counted (7 requests, 3 failures)');
ok(defined poll_until($primary, 'app',
		qq{SELECT requests || '|' || failures FROM apikeys.key_usage WHERE key_id = '$rl_id'},
		'7|3'),
	'2: key_usage: 7 requests, 3 failures');
is(sb(qq{SELECT code FROM apikeys.verify('$rl')}), 'VALID', '6: standby: next minute allowed again');

# 5. The first minute's counts were flushed (100 rows); now idle entries
# make room for the other 50 keys.
ok(defined poll_until($small, 'small', q{SELECT count(*) || '|' || sum(requests) FROM apikeys.key_usage},
		'100|100'),
	'5: the 100 tracked keys were flushed');
is(small_batch(101, 160), '50|10|0', '5: the 60 other keys: every answer right');
is(verify_n($small, 'small', sm(q{SELECT token FROM toks WHERE i = 149}), 1), 'RATE_LIMITED',
	'5: key 149, now tracked, is rate limited again');
my $small_last_use = time();
is(sm(q{SELECT untracked_requests FROM apikeys.status()}), '63',
	'5: no new untracked requests: idle entries were evicted');
ok(defined poll_until($small, 'small',
		q{SELECT count(*) || '|' || sum(requests) || '|' || sum(failures) FROM apikeys.key_usage},
		'160|150|11'),
	'5: key_usage: 160 keys, 150 requests, 11 failures');
is(sm(q{SELECT sum(requests_today) || '|' || sum(failures_today) FROM apikeys.list_keys('bulk')}),
	'150|11', '5: list_keys agrees');

# 5. A forgotten entry leaves nothing a later lookup could find (the fast
# index names no memory the table reuses): once every entry is idle (a
# minute later than any use, key 149's allowance back), keys 1..100 are
# verified again; those evicted above get new entries, in room made by
# forgetting the others, and each of the 100 is counted exactly once more.
my $small_idle_at = $small_last_use + 61;
sleep($small_idle_at - time()) if time() < $small_idle_at;
is(small_batch(1, 100), '100|0|0', '5: keys 1..100 again, a minute later: every answer right');
is(sm(q{SELECT untracked_requests FROM apikeys.status()}), '63',
	'5: keys 1..100 again: none untracked (idle entries made room)');
ok(defined poll_until($small, 'small', q{
		SELECT count(*) FILTER (WHERE requests = 2) || '|' || count(*)
		  FROM (SELECT t.i, sum(u.requests) AS requests
		          FROM toks t JOIN apikeys.key_usage u USING (key_id)
		         WHERE t.i <= 100 GROUP BY t.i) s}, '100|100'),
	'5: key_usage: each of keys 1..100 counted twice, once a minute');
{
	my @bad = log_lines($small, $small_log_start, $bad_line);
	is(scalar(@bad), 0, '5: no ERROR in the log of the small node') or diag(join("\n", @bad));
}

#
# 7. Credits on the standby.  It spends nothing (nothing there could write
# the spending, and its balance is not the primary's): a credit-limited key
# is refused for any cost but 0, and its balance is the replicated written
# one.  A key without credits is not limited.
#
{
	p(q{SELECT apikeys.set_plan('credit', 'enterprise')});
	my ($cl_id, $cl) = new_key($primary, 'app', q{'credit', 'limited', credits => 10});
	my ($cu_id, $cu) = new_key($primary, 'app', q{'credit', 'unlimited'});
	is(p(qq{SELECT code || '/' || credits_remaining FROM apikeys.verify('$cl', '{}', NULL, 3)}), 'VALID/7',
		'7: primary: the limited key spends 3 of 10');
	p(q{SELECT apikeys.flush()});
	is(p(qq{SELECT credits FROM apikeys.keys WHERE id = '$cl_id'}), '7', '7: primary: the spending is written');
	$primary->wait_for_catchup($standby);
	is(sb(qq{SELECT credits FROM apikeys.keys WHERE id = '$cl_id'}), '7', '7: standby: the column replayed (7)');

	is(sb(qq{SELECT string_agg(v.code || '/' || coalesce(v.credits_remaining::text, 'null'), ',' ORDER BY c)
	           FROM unnest(ARRAY[1, 1, 0, 0, 7]) WITH ORDINALITY u(cost, c),
	                LATERAL apikeys.verify('$cl', '{}', NULL, u.cost) v}),
		'USAGE_EXCEEDED/7,USAGE_EXCEEDED/7,VALID/7,VALID/7,USAGE_EXCEEDED/7',
		'7: standby: the limited key: cost 1 (and 7) USAGE_EXCEEDED, cost 0 VALID, credits_remaining the replicated 7');
	is(sb(qq{SELECT code || '/' || valid FROM apikeys.verify('$cl')}), 'USAGE_EXCEEDED/false',
		'7: standby: the default cost (1) is refused too');
	is(sb(qq{SELECT string_agg(v.code || '/' || coalesce(v.credits_remaining::text, 'null'), ',' ORDER BY c)
	           FROM unnest(ARRAY[1, 0, 1000]) WITH ORDINALITY u(cost, c),
	                LATERAL apikeys.verify('$cu', '{}', NULL, u.cost) v}),
		'VALID/null,VALID/null,VALID/null', '7: standby: the unlimited key is VALID at any cost');
	is(sb(qq{SELECT credits FROM apikeys.get_key('$cl_id', 'credit')}), '7',
		'7: standby: get_key() shows the replicated balance');

	# The standby took nothing from the primary's balance.
	is(p(qq{SELECT credits FROM apikeys.get_key('$cl_id', 'credit')}), '7',
		'7: primary: still 7 left');
	is(p(qq{SELECT string_agg(v.code || '/' || v.credits_remaining, ',' ORDER BY c)
	          FROM unnest(ARRAY[8, 7, 1]) WITH ORDINALITY u(cost, c),
	               LATERAL apikeys.verify('$cl', '{}', NULL, u.cost) v}),
		'USAGE_EXCEEDED/7,VALID/0,USAGE_EXCEEDED/0', '7: primary: exactly those 7 can be spent');
}

#
# 6. Nothing the standby did reached the primary.
#
is(verify_n($primary, 'app', $mk, 1), 'VALID', '6: marker request on the primary');
ok(defined poll_until($primary, 'app',
		qq{SELECT requests FROM apikeys.key_usage WHERE key_id = '$mk_id'}, '1'),
	'6: the primary flushed since the standby worked');
is(usage_row($primary, 'app', $sbo_id), '0|0', '6: no usage for the standby-only key');
is(usage_row($primary, 'app', $sbv_id), '0|0', '6: no usage for the key used on the standby');
is(usage_row($primary, 'app', $sbr_id), '0|0', '6: no usage for the key refused on the standby');
is(usage_row($primary, 'app', $sbl_id), '3|1', '6: the key limited on both: only the primary\'s counts');
is(p(q{SELECT string_agg(requests_today || '/' || failures_today, ',' ORDER BY name)
          FROM apikeys.list_keys('sb')}),
	'3/1,0/0,0/0,0/0', '6: list_keys on the primary: only the primary\'s counts');
is(p(qq{SELECT count(*) FROM apikeys.audit_log
         WHERE event = 'verify_failed'
           AND (owner = 'sb' OR details->>'prefix' = 'sbonly' OR (details ? 'malformed'))
           AND key_id IS DISTINCT FROM '$sbl_id'}),
	'0', '6: no verify_failed audit rows for what the standby refused');
is(p(qq{SELECT count(*) FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$sbl_id'}),
	'1', '6: the primary\'s own refusal of the shared key is audited');
is(p(qq{SELECT sum((details->>'count')::int) FROM apikeys.audit_log
         WHERE event = 'verify_failed' AND key_id = '$rl_id'}),
	'3', '6: rl: the primary\'s 3 refusals audited, none of the standby\'s');
$primary->wait_for_catchup($standby);
is(sb(q{SELECT count(*) FROM apikeys.key_usage}), p(q{SELECT count(*) FROM apikeys.key_usage}),
	'6: the standby replays the primary\'s key_usage');
{
	my @bad = log_lines($standby, $standby_log_start, $bad_line,
		qr/FATAL:  the database system is starting up/);
	is(scalar(@bad), 0, '6: standby log: no unexpected ERROR or FATAL') or diag(join("\n", @bad));
}
{
	# The logical replication launcher and the apikeys launcher exit with 1
	# at every shutdown (the restart), so that they are restarted after any
	# other exit.  The session blocking a flush is ended by a restart.
	my @bad = log_lines($primary, 0, $bad_line,
		qr/background worker "(logical replication|apikeys) launcher" \(PID \d+\) exited with exit code 1/,
		qr/FATAL:  terminating connection due to administrator command/);
	is(scalar(@bad), 0, 'primary log: no ERROR or FATAL') or diag(join("\n", @bad));
}

$listener->{psql}->quit;
$standby->stop;
$small->stop;
$primary->stop;

note(sprintf('004_usage_replica took %.1f s', time() - $t0));
done_testing();
