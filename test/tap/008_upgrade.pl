# Copyright: the apikeys authors.
#
# ALTER EXTENSION apikeys UPDATE from 1.0 to 1.1 keeps every key, count and
# audit row, and leaves the same catalog objects as CREATE EXTENSION apikeys
# (1.1) does.
#
#  1. On a server that runs the newest library (preloaded), database
#     "upgraded" gets CREATE EXTENSION apikeys VERSION '1.0' and a scenario:
#     an edited seeded plan and a custom one, owners on several plans, keys
#     in every 1.0 state (active, expired by time, expired by an admin's
#     UPDATE of expires_at, revoked, revoked by token, revoke_all, rotating
#     in a grace, rotated without grace, rotated with a grace that ended,
#     and their replacements), a refused create over a plan's limit, and
#     verifications (valid and refused) that apikeys.flush() writes to
#     key_usage and the audit log.  The usage flush interval is an hour and
#     a session stays connected to the database all along, so counts also
#     stay pending in shared memory across the update.
#  2. At 1.0, with the new library: verify (one- and two-argument forms)
#     answers each state with its code, authenticate returns the key or
#     raises 28000, rate limits apply, create_key, list_keys(owner), revoke
#     and rotate work, and flush() makes the worker write counts and
#     refusals into the 1.0 tables.
#  3. Snapshot: each token's verify row (from a new session and from the
#     session that stays connected), key_usage, list_keys of every owner,
#     plans, owners, keys, the audit log and audit_verify().
#  4. ALTER EXTENSION apikeys UPDATE: extversion is 1.1, key_usage and the
#     list_keys counts are unchanged (pending counts included), plans,
#     owners, keys and audit rows are unchanged and the new columns NULL,
#     the chain verifies, every token verifies exactly as before (in a new
#     session and in the one connected across the update), and the pending
#     counts are then written into the 1.1 tables.  The 1.1 functions
#     (get_key, list_keys with a status, disable_key, enable_key, usage,
#     credits through update_key and add_credits, a plan's rate_limit)
#     work on the upgraded rows.
#  5. Database "fresh" gets CREATE EXTENSION apikeys (1.1).  Every object
#     the extension owns (found through pg_depend, plus indexes, row and
#     array types, composite types' attributes, constraints, triggers,
#     defaults, comments...) is read from the catalogs as OID-free sorted
#     text, and "upgraded" must match "fresh" category by category; a
#     difference is shown as '-'/'+' lines.  The same against a fresh
#     install on a second cluster, where the roles are created by 1.1
#     itself (in one cluster both databases share them).  Self-check: a
#     1.1 install with a changed comment, function setting, grant and
#     column statistics target is reported as different, in exactly those
#     categories.
#  6. A 1.0 install with no data, updated, matches "fresh" too (objects
#     and seeded plans).
#
# No pg_dump / pg_restore here: 001_dump_restore.pl covers that.
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
use Time::HiRes qw(time sleep);

my $t0 = time();

# Counts are per UTC day: stay clear of midnight (UTC) for the whole run.
{
	my $left = 86400 - (int(time()) % 86400);
	if ($left < 300)
	{
		note("$left s to UTC midnight: waiting for the next day");
		sleep($left + 2);
	}
}

# Usage counts are written hourly (or by flush()), so what a session
# connected to the database counts stays pending; audit records every second.
my $node = new_node('upgrade', "apikeys.usage_flush_interval = 3600\n");
my $db   = 'upgraded';

is( sql($node, 'postgres', q{SELECT string_agg(version, ',' ORDER BY version)
	FROM pg_available_extension_versions WHERE name = 'apikeys'}),
	'1.0,1.1', 'versions 1.0 and 1.1 are installed');
is( sql($node, 'postgres', q{SELECT path FROM pg_extension_update_paths('apikeys')
	WHERE source = '1.0' AND target = '1.1'}),
	'1.0--1.1', 'an update path leads from 1.0 to 1.1');

sql($node, 'postgres', "CREATE DATABASE $db");
sql($node, $db, q{CREATE EXTENSION apikeys VERSION '1.0'});
is(sql($node, $db, q{SELECT extversion FROM pg_extension WHERE extname = 'apikeys'}),
	'1.0', "$db: extension at 1.0");

# Connected from now until after the update: its counts stay pending, and it
# shows that a session that lived through the update still verifies.
my $held = $node->background_psql($db);
$held->set_query_timer_restart();
$held->query_safe('SELECT 1');

#
# 1. The 1.0 scenario.
#
my (%id, %tok);

# create_key($args) as key $label.
sub key
{
	my ($label, $args) = @_;
	($id{$label}, $tok{$label}) = new_key($node, $db, $args);
	return;
}

# rotate() key $from (owner SQL $owner, grace $grace) into key $to.
sub rotate_key
{
	my ($from, $to, $owner, $grace) = @_;
	my $row = sql($node, $db,
		qq{SELECT key_id, token FROM apikeys.rotate('$id{$from}', $owner, '$grace')});
	($id{$to}, $tok{$to}) = split /\|/, $row;
	die "rotate of $from returned '$row'" unless defined $tok{$to} && $tok{$to} ne '';
	return;
}

# The codes of $n calls of verify($token, $scopes), comma-joined (one call per row).
sub verify_n
{
	my ($token, $n, $scopes) = @_;
	$scopes //= '{}';
	return sql($node, $db, qq{SELECT string_agg((apikeys.verify('$token', '$scopes')).code, ',')
		FROM generate_series(1, $n)});
}

# Today (UTC): the day key_usage and list_keys count in.
my $today = q{(now() AT TIME ZONE 'UTC')::date};

# key_usage of key $label today: "requests|failures" ("" when no row).
sub usage_row
{
	my ($label) = @_;
	return sql($node, $db, qq{SELECT requests, failures FROM apikeys.key_usage
		WHERE key_id = '$id{$label}' AND day = $today});
}

# Sum of the counts of the verify_failed rows matching $where.
sub failed_count
{
	my ($where) = @_;
	return sql($node, $db, qq{SELECT coalesce(sum((details->>'count')::bigint), 0)
		FROM apikeys.audit_log WHERE event = 'verify_failed' AND $where});
}

sql($node, $db, q{
	UPDATE apikeys.plans SET max_keys = 2, description = 'Two active keys (edited).'
	 WHERE name = 'free';
	INSERT INTO apikeys.plans (name, max_keys, description) VALUES ('team', 3, 'Team plan');
	INSERT INTO apikeys.plans (name, max_keys, description) VALUES ('unused', 0, NULL);
	SELECT apikeys.set_plan('acme', 'team');
	SELECT apikeys.set_plan('bob', 'pro');
	SELECT apikeys.set_plan('erin', 'enterprise');
	SELECT apikeys.set_plan('frank', 'team');
});

# acme (team, 3): an active key with scopes, metadata and its own prefix; one
# that expires by time, one an admin expired with an UPDATE.
key('acme active', q{'acme', 'acme backend', '{read:*,write:users}', NULL, 'acme_live', '{"env": "prod", "n": [1, 2]}'});
key('acme expiring', q{'acme', 'acme short-lived', '{}', now() + interval '2 seconds'});
key('acme admin-expired', q{'acme', 'acme admin-expired', '{read:*}', now() + interval '1 day'});
sql($node, $db, qq{UPDATE apikeys.keys SET expires_at = now() - interval '1 minute'
	WHERE id = '$id{'acme admin-expired'}'});

# bob (pro): revoked, rotating in a grace, rotated without grace, rotated with
# a grace that ended, revoked by token, rate limited, expiring later.
key('bob revoked', q{'bob', 'bob revoked'});
sql($node, $db, qq{SELECT apikeys.revoke('$id{'bob revoked'}', 'bob', 'compromised')});
key('bob rotating', q{'bob', 'bob rotating', '{read}', now() + interval '30 days'});
rotate_key('bob rotating', 'bob rotating: new', q{'bob'}, '1 hour');
key('bob rotated', q{'bob', 'bob rotated'});
rotate_key('bob rotated', 'bob rotated: new', 'NULL', '0');
key('bob grace over', q{'bob', 'bob grace over', '{}', NULL, 'bob_live'});
rotate_key('bob grace over', 'bob grace over: new', q{'bob'}, '1 second');
key('bob leaked', q{'bob', 'bob leaked'});
is(sql($node, $db, qq{SELECT apikeys.revoke_token('$tok{'bob leaked'}')}), $id{'bob leaked'},
	'1.0: revoke_token');
key('bob limited', q{'bob', 'bob rate limited', '{}', NULL, NULL, '{}', 2});
key('bob later', q{'bob', 'bob expires later', '{}', now() + interval '30 days', NULL, '{"a": null}'});

# carol (default plan free, edited to 2): at her limit; the next create is
# refused (a limit_exceeded record).
key('carol 1', q{'carol', 'carol one'});
key('carol 2', q{'carol', 'carol two'});
my ($ret, $err) = sql_error($node, $db, q{SELECT apikeys.create_key('carol', 'one too many')});
like($err, qr/53400/, '1.0: a create over the edited limit of free is refused (53400)');

# erin (enterprise): revoke_all.
key('erin 1', q{'erin', 'erin one', '{billing:read}'});
key('erin 2', q{'erin', 'erin two'});
is(sql($node, $db, q{SELECT apikeys.revoke_all('erin', 'offboarded')}), '2', '1.0: revoke_all');

$tok{unknown} = sql($node, $db, q{SELECT apikeys._new_token('ak_live')::text});
$tok{garbage} = 'not-a-token';

ok( defined wait_until($node, $db, qq{SELECT bool_and(expires_at <= now()) FROM apikeys.keys
		WHERE id IN ('$id{'acme expiring'}', '$id{'bob grace over'}')}),
	'1.0: the short-lived key and the short grace have ended');

# Verifications, valid and refused, then flush(): key_usage and the audit log
# get rows from the worker, into the 1.0 tables.
is(verify_n($tok{'acme active'}, 5), 'VALID,VALID,VALID,VALID,VALID', '1.0: five valid verifications');
is(verify_n($tok{'acme active'}, 1, '{admin}'), 'INSUFFICIENT_SCOPE', '1.0: a scope refusal');
is(verify_n($tok{'bob rotating'}, 2), 'VALID,VALID', '1.0: the rotating key is valid in its grace');
is(verify_n($tok{'bob revoked'}, 3), 'API_KEY_REVOKED,API_KEY_REVOKED,API_KEY_REVOKED',
	'1.0: three refusals of a revoked key');
is(verify_n($tok{'acme expiring'}, 2), 'API_KEY_EXPIRED,API_KEY_EXPIRED', '1.0: two refusals of an expired key');
is(verify_n($tok{unknown}, 2), 'API_KEY_INVALID,API_KEY_INVALID', '1.0: an unknown token, twice');
is(verify_n($tok{garbage}, 1), 'API_KEY_INVALID', '1.0: a malformed token');
is(sql($node, $db, 'SELECT apikeys.flush()'), 't', '1.0: flush()');
is(usage_row('acme active'), '5|1', '1.0: key_usage holds the counts of the active key');
is(usage_row('bob revoked'), '0|3', '1.0: ... and of the revoked key');
is(usage_row('acme expiring'), '0|2', '1.0: ... and of the expired key');
is(failed_count(qq{key_id = '$id{'bob revoked'}' AND details->>'reason' = 'API_KEY_REVOKED'}), '3',
	'1.0: the audit log holds the refusals of the revoked key');
is(failed_count(q{key_id IS NULL AND details->>'prefix' = 'ak_live'}), '2',
	'1.0: ... and of the unknown token');
is(failed_count(q{key_id IS NULL AND details->>'malformed' = 'true'}), '1',
	'1.0: ... and of the malformed token');
is(sql($node, $db, q{SELECT count(*) FROM apikeys.audit_log WHERE event = 'limit_exceeded' AND owner = 'carol'}),
	'1', '1.0: ... and the refused create');

#
# 2. Still at 1.0, served by the new library.
#
is(sql($node, $db, q{SELECT preloaded AND usage_tracking AND failure_audit FROM apikeys.status()}),
	't', '1.0: status() reports the preloaded library');

# Each entry: [label, token, required scopes].
my @tokens = (
	[ 'acme active',              $tok{'acme active'},        '{}' ],
	[ 'acme active scoped',       $tok{'acme active'},        '{read:users,write:users}' ],
	[ 'acme active scope missing', $tok{'acme active'},       '{delete:users}' ],
	[ 'acme expiring',            $tok{'acme expiring'},      '{}' ],
	[ 'acme admin-expired',       $tok{'acme admin-expired'}, '{}' ],
	[ 'bob revoked',              $tok{'bob revoked'},        '{}' ],
	[ 'bob rotating',             $tok{'bob rotating'},       '{read}' ],
	[ 'bob rotating: new',        $tok{'bob rotating: new'},  '{read}' ],
	[ 'bob rotated',              $tok{'bob rotated'},        '{}' ],
	[ 'bob rotated: new',         $tok{'bob rotated: new'},   '{}' ],
	[ 'bob grace over',           $tok{'bob grace over'},     '{}' ],
	[ 'bob grace over: new',      $tok{'bob grace over: new'}, '{}' ],
	[ 'bob leaked',               $tok{'bob leaked'},         '{}' ],
	[ 'bob later',                $tok{'bob later'},          '{}' ],
	[ 'carol 1',                  $tok{'carol 1'},            '{}' ],
	[ 'carol 2',                  $tok{'carol 2'},            '{}' ],
	[ 'erin 1',                   $tok{'erin 1'},             '{billing:read}' ],
	[ 'erin 2',                   $tok{'erin 2'},             '{}' ],
	[ 'unknown',                  $tok{unknown},              '{}' ],
	[ 'garbage',                  $tok{garbage},              '{}' ]);
my %expected = (
	'acme active'               => 'VALID',
	'acme active scoped'        => 'VALID',
	'acme active scope missing' => 'INSUFFICIENT_SCOPE',
	'acme expiring'             => 'API_KEY_EXPIRED',
	'acme admin-expired'        => 'API_KEY_EXPIRED',
	'bob revoked'               => 'API_KEY_REVOKED',
	'bob rotating'              => 'VALID',
	'bob rotating: new'         => 'VALID',
	'bob rotated'               => 'API_KEY_REVOKED',
	'bob rotated: new'          => 'VALID',
	'bob grace over'            => 'API_KEY_EXPIRED',
	'bob grace over: new'       => 'VALID',
	'bob leaked'                => 'API_KEY_REVOKED',
	'bob later'                 => 'VALID',
	'carol 1'                   => 'VALID',
	'carol 2'                   => 'VALID',
	'erin 1'                    => 'API_KEY_REVOKED',
	'erin 2'                    => 'API_KEY_REVOKED',
	'unknown'                   => 'API_KEY_INVALID',
	'garbage'                   => 'API_KEY_INVALID');

# One verify(token, scopes) per entry of @tokens, in one statement: lines "i|code|row".
sub verify_all_sql
{
	my $values = join(",\n",
		map { "($_, '$tokens[$_][1]', '$tokens[$_][2]'::text[])" } 0 .. $#tokens);
	return qq{SELECT t.i || '|' || v.code || '|'
		       || row(v.valid, v.code, v.key_id, v.owner, v.name, v.scopes, v.metadata, v.expires_at)::text
		  FROM (VALUES $values) t(i, tok, scopes),
		       LATERAL apikeys.verify(t.tok, t.scopes) v
		 ORDER BY t.i};
}

# { label => { code => ..., row => ... } } from the output of verify_all_sql().
sub parse_verify
{
	my ($out) = @_;
	my %res;
	for my $line (split /\n/, $out)
	{
		my ($i, $code, $row) = split /\|/, $line, 3;
		$res{ $tokens[$i][0] } = { code => $code, row => $row };
	}
	return \%res;
}

sub verify_all { return parse_verify(sql($node, $db, verify_all_sql())); }
sub verify_all_held { return parse_verify($held->query_safe(verify_all_sql())); }
sub codes_of { my ($res) = @_; return { map { $_ => $res->{$_}{code} } keys %$res }; }

is_deeply(codes_of(verify_all()), \%expected,
	'1.0 with the new library: verify(token, scopes) answers every state with its code');
is( sql($node, $db, qq{SELECT string_agg(v.code, ',') FROM (VALUES (1, '$tok{'bob later'}'),
		(2, '$tok{'bob revoked'}'), (3, '$tok{'acme expiring'}'), (4, '$tok{unknown}')) t(i, tok),
		LATERAL apikeys.verify(t.tok) v}),
	'VALID,API_KEY_REVOKED,API_KEY_EXPIRED,API_KEY_INVALID',
	'1.0 with the new library: verify(token) too');

is( sql($node, $db, qq{SELECT key_id, owner, name FROM apikeys.authenticate('$tok{'carol 1'}')}),
	"$id{'carol 1'}|carol|carol one", '1.0 with the new library: authenticate returns the key');
for my $case ([ 'bob revoked', '{}', 'API_KEY_REVOKED' ], [ 'acme expiring', '{}', 'API_KEY_EXPIRED' ],
	[ 'acme active', '{delete:users}', 'INSUFFICIENT_SCOPE' ])
{
	my ($label, $scopes, $code) = @$case;
	($ret, $err) = sql_error($node, $db,
		qq{SELECT * FROM apikeys.authenticate('$tok{$label}', '$scopes')});
	like($err, qr/28000: $code/, "1.0 with the new library: authenticate raises 28000 $code ($label)");
}

# A rate limit of 2 a minute.
avoid_minute_edge(50);
is(verify_n($tok{'bob limited'}, 3), 'VALID,VALID,RATE_LIMITED',
	'1.0 with the new library: the rate limit applies');

# create_key, list_keys(owner), revoke, rotate.
sql($node, $db, q{SELECT apikeys.set_plan('zed', 'developer')});
key('zed 1', q{'zed', 'zed one', '{x}'});
key('zed 2', q{'zed', 'zed two'});
is(verify_n($tok{'zed 1'}, 1, '{x}'), 'VALID', '1.0 with the new library: create_key');
ok(sql($node, $db, qq{SELECT apikeys.revoke('$id{'zed 1'}', 'zed', 'done') IS NOT NULL}) eq 't',
	'1.0 with the new library: revoke');
rotate_key('zed 2', 'zed 2: new', q{'zed'}, '1 hour');
is( sql($node, $db, q{SELECT string_agg(name || ':' || status, ',' ORDER BY created_at, key_id)
		FROM apikeys.list_keys('zed')}),
	'zed one:revoked,zed two:rotating,zed two:active',
	'1.0 with the new library: rotate, and list_keys(owner) shows the states');
push @tokens, [ 'zed 1', $tok{'zed 1'}, '{}' ], [ 'zed 2', $tok{'zed 2'}, '{}' ],
  [ 'zed 2: new', $tok{'zed 2: new'}, '{}' ];
$expected{'zed 1'} = 'API_KEY_REVOKED';
$expected{'zed 2'} = $expected{'zed 2: new'} = 'VALID';

# flush() writes counts and refusals into the 1.0 tables.
is(sql($node, $db, 'SELECT apikeys.flush()'), 't', '1.0 with the new library: flush() of what is pending');
my $before_usage  = usage_row('acme active');
my $before_failed = failed_count(qq{key_id = '$id{'bob revoked'}'});
verify_n($tok{'acme active'}, 3);
verify_n($tok{'bob revoked'}, 1);
is(sql($node, $db, 'SELECT apikeys.flush()'), 't', '1.0 with the new library: flush()');
my ($r0) = split /\|/, $before_usage;
my $flushed_usage = usage_row('acme active');
my ($r1) = split /\|/, $flushed_usage;
is($r1 - $r0, 3, '1.0 with the new library: the worker wrote the new counts to key_usage')
  or diag("before $before_usage, after $flushed_usage");
is(failed_count(qq{key_id = '$id{'bob revoked'}'}) - $before_failed, 1,
	'1.0 with the new library: ... and the new refusal to the audit log');
is(failed_count(qq{key_id = '$id{'bob limited'}' AND details->>'reason' = 'RATE_LIMITED'}), '1',
	'1.0 with the new library: ... and the rate-limited refusal');
chain_ok($node, $db, '1.0 with the new library');

#
# 3. What 1.0 says, just before the update.
#
my $before = verify_all();
is_deeply(codes_of($before), \%expected, 'before the update: every token answers as expected');
my $before_held = verify_all_held();
is_deeply($before_held, $before, 'before the update: the same rows in the session that stays connected');
queue_drained_ok($node, $db, 'before the update');

my %snapshot_sql = (
	key_usage => q{SELECT row(ku.key_id, ku.day, ku.requests, ku.failures, ku.last_used_at)::text
		FROM apikeys.key_usage ku ORDER BY ku.key_id, ku.day},
	list_keys => q{SELECT row(o.owner, l.key_id, l.name, l.start, l.scopes, l.status, l.created_at,
		       l.expires_at, l.revoked_at, l.last_used_at, l.requests_today, l.failures_today)::text
		  FROM apikeys.owners o CROSS JOIN LATERAL apikeys.list_keys(o.owner) l
		 ORDER BY o.owner, l.created_at, l.key_id},
	plans  => q{SELECT row(p.name, p.max_keys, p.description)::text FROM apikeys.plans p ORDER BY p.name},
	owners => q{SELECT row(o.owner, o.plan, o.created_at, o.updated_at)::text
		FROM apikeys.owners o ORDER BY o.owner},
	keys => q{SELECT row(k.id, k.owner, k.name, k.prefix, k.start, k.digest, k.scopes, k.metadata,
		       k.rate_limit, k.created_at, k.created_by, k.expires_at, k.revoked_at, k.revoked_by,
		       k.revoke_reason, k.rotated_from, k.replaced_by)::text
		  FROM apikeys.keys k ORDER BY k.id},
	audit_chain_lock => q{SELECT l::text FROM apikeys._audit_chain_lock l},
);

sub snapshot
{
	my %s;
	$s{$_} = sql($node, $db, $snapshot_sql{$_}) for keys %snapshot_sql;
	return \%s;
}

# The audit rows up to $max_id, by their 1.0 columns.
sub audit_rows
{
	my ($max_id) = @_;
	return sql($node, $db, qq{SELECT row(a.id, a.at, a.event, a.key_id, a.owner, a.actor, a.db_user,
		       a.client_addr, a.details, a.prev_hash, a.hash)::text
		  FROM apikeys.audit_log a WHERE a.id <= $max_id ORDER BY a.id});
}

# Today's totals of list_keys over every owner and of key_usage: "requests|failures" each.
my $list_totals = q{SELECT coalesce(sum(l.requests_today), 0) || '|' || coalesce(sum(l.failures_today), 0)
	FROM apikeys.owners o CROSS JOIN LATERAL apikeys.list_keys(o.owner) l};
my $usage_totals = qq{SELECT coalesce(sum(ku.requests), 0) || '|' || coalesce(sum(ku.failures), 0)
	FROM apikeys.key_usage ku WHERE ku.day = $today};

my $snap_before = snapshot();
my $audit_max   = sql($node, $db, q{SELECT max(id) FROM apikeys.audit_log});
my $audit_count = sql($node, $db, q{SELECT count(*) FROM apikeys.audit_log});
my $audit_before = audit_rows($audit_max);
is(sql($node, $db, q{SELECT ok, rows_checked, first_bad_id FROM apikeys.audit_verify()}),
	"t|$audit_count|", "before the update: audit_verify() ok ($audit_count rows)");
is( sql($node, $db, q{SELECT string_agg(DISTINCT l.status, ',' ORDER BY l.status)
		FROM apikeys.owners o CROSS JOIN LATERAL apikeys.list_keys(o.owner) l}),
	'active,expired,revoked,rotating', 'before the update: keys in every 1.0 status');
cmp_ok(scalar(() = $snap_before->{key_usage} =~ /\n/g) + 1, '>=', 8,
	'before the update: key_usage has rows');
my $pending = sql($node, $db, q{SELECT sum(p.requests + p.failures)
	FROM apikeys.keys k CROSS JOIN LATERAL apikeys._pending_usage(k.id) p});
cmp_ok($pending, '>', 0, "before the update: counts are pending in shared memory ($pending)");
isnt(sql($node, $db, $list_totals), sql($node, $db, $usage_totals),
	'before the update: list_keys counts more than key_usage holds (the pending counts)');

#
# 4. The update.
#
my $log_update = -s $node->logfile;
sql($node, $db, 'ALTER EXTENSION apikeys UPDATE');
is(sql($node, $db, q{SELECT extversion FROM pg_extension WHERE extname = 'apikeys'}),
	'1.1', 'after the update: extension at 1.1');

# Counts first: nothing below may count anything before they are compared.
my $snap_after = snapshot();
for my $what (qw(key_usage list_keys plans owners keys audit_chain_lock))
{
	is($snap_after->{$what}, $snap_before->{$what}, "after the update: $what unchanged");
}
is(sql($node, $db, q{SELECT count(*) FROM apikeys.keys WHERE disabled_at IS NOT NULL
	OR disabled_by IS NOT NULL OR disable_reason IS NOT NULL OR allowed_ips IS NOT NULL
	OR alert_requests_per_minute IS NOT NULL}),
	'0', 'after the update: the new columns of keys are NULL');
is(sql($node, $db, q{SELECT count(*) FROM apikeys.plans WHERE max_key_lifetime IS NOT NULL
	OR alert_requests_per_minute IS NOT NULL}),
	'0', 'after the update: the new columns of plans are NULL');
is(audit_rows($audit_max), $audit_before, "after the update: audit rows 1..$audit_max unchanged");
my $audit_count_after = sql($node, $db, q{SELECT count(*) FROM apikeys.audit_log});
cmp_ok($audit_count_after, '>=', $audit_count, 'after the update: no audit row lost');
is(sql($node, $db, q{SELECT ok, rows_checked, first_bad_id FROM apikeys.audit_verify()}),
	"t|$audit_count_after|", "after the update: audit_verify() ok ($audit_count_after rows)");

my $after = verify_all();
for my $t (@tokens)
{
	my $label = $t->[0];
	is($after->{$label}{row}, $before->{$label}{row},
		"after the update: '$label' verifies as before ($before->{$label}{code})");
}
is_deeply(verify_all_held(), $before,
	'after the update: the session connected across it gets the same rows');
no_log_errors($node, $log_update, 'the update and the verifications after it: no ERROR in the log');

# The counts pending at the update, and those made since, go into the 1.1 tables.
queue_drained_ok($node, $db, 'after the update');
isnt(sql($node, $db, $list_totals), sql($node, $db, $usage_totals),
	'after the update: counts still pending');
is(sql($node, $db, 'SELECT apikeys.flush()'), 't', 'after the update: flush()');
is(sql($node, $db, $usage_totals), sql($node, $db, $list_totals),
	'after the update: flush() wrote every pending count to key_usage');
cmp_ok(sql($node, $db, qq{SELECT count(*) FROM apikeys.audit_log
	WHERE event = 'verify_failed' AND id > $audit_max}), '>', 0,
	'after the update: the worker writes refusals to the audit log');
chain_ok($node, $db, 'after the update and a flush');
no_log_errors($node, $log_update, 'after the update and a flush: no ERROR in the log');

is( sql($node, $db, qq{SELECT key_id, owner FROM apikeys.authenticate('$tok{'carol 2'}')}),
	"$id{'carol 2'}|carol", 'after the update: authenticate returns the key');
($ret, $err) = sql_error($node, $db, qq{SELECT * FROM apikeys.authenticate('$tok{'bob rotated'}')});
like($err, qr/28000: API_KEY_REVOKED/, 'after the update: authenticate raises 28000 for a revoked key');

# The 1.1 functions on the upgraded rows.
for my $case ([ 'acme active', 'acme', 'active' ], [ 'acme admin-expired', 'acme', 'expired' ],
	[ 'bob rotating', 'bob', 'rotating' ], [ 'bob rotated', 'bob', 'revoked' ], [ 'erin 1', 'erin', 'revoked' ])
{
	my ($label, $owner, $status) = @$case;
	is(sql($node, $db, qq{SELECT status FROM apikeys.get_key('$id{$label}', '$owner')}), $status,
		"1.1 on upgraded rows: get_key of '$label' says $status");
}
is( sql($node, $db, q{SELECT string_agg(name, ',' ORDER BY created_at, key_id) FROM apikeys.list_keys('bob', 'revoked')}),
	'bob revoked,bob rotated,bob leaked', '1.1 on upgraded rows: list_keys(owner, status)');
is(sql($node, $db, qq{SELECT apikeys.disable_key('$id{'acme active'}', 'acme', 'after the update') IS NOT NULL}),
	't', '1.1 on upgraded rows: disable_key');
is(verify_n($tok{'acme active'}, 1), 'API_KEY_DISABLED', '1.1 on upgraded rows: a disabled key is refused');
is(sql($node, $db, qq{SELECT apikeys.enable_key('$id{'acme active'}', 'acme')}), 't',
	'1.1 on upgraded rows: enable_key');
is(verify_n($tok{'acme active'}, 1), 'VALID', '1.1 on upgraded rows: enabled again');
is( sql($node, $db, qq{SELECT (SELECT sum(u.requests) || '|' || sum(u.failures)
		                         FROM apikeys.usage('acme', $today, $today) u)
		                 = (SELECT sum(l.requests_today) || '|' || sum(l.failures_today)
		                      FROM apikeys.list_keys('acme') l)}),
	't', '1.1 on upgraded rows: usage() and list_keys agree');
# Credits and owner-wide limits on upgraded rows: the new columns start
# NULL (no limit), and setting them takes effect at once.
is(sql($node, $db, qq{SELECT credits FROM apikeys.update_key('$id{'acme active'}', 'acme', credits => 2)}),
	'2', '1.1 on upgraded rows: update_key gives credits');
is(verify_n($tok{'acme active'}, 3), 'VALID,VALID,USAGE_EXCEEDED',
	'1.1 on upgraded rows: credits are spent, then USAGE_EXCEEDED');
is(sql($node, $db, qq{SELECT apikeys.add_credits('$id{'acme active'}', 'acme', 1)}), '1',
	'1.1 on upgraded rows: add_credits');
sql($node, $db, 'SELECT apikeys.flush()');
is(sql($node, $db, qq{SELECT credits FROM apikeys.keys WHERE id = '$id{'acme active'}'}), '1',
	'1.1 on upgraded rows: the worker writes the spent credits');
is(sql($node, $db, qq{SELECT credits FROM apikeys.update_key('$id{'acme active'}', 'acme', clear => '{credits}')}),
	'', '1.1 on upgraded rows: clear removes the credit limit');
sql($node, $db, q{UPDATE apikeys.plans SET rate_limit = 2 WHERE name = (SELECT plan FROM apikeys.owners WHERE owner = 'bob')});
is(verify_n($tok{'bob rotating'}, 3), 'VALID,VALID,RATE_LIMITED',
	"1.1 on upgraded rows: a plan's rate_limit limits the owner");
sql($node, $db, q{UPDATE apikeys.plans SET rate_limit = NULL WHERE name = (SELECT plan FROM apikeys.owners WHERE owner = 'bob')});
key('acme new', q{'acme', 'acme after the update'});
is(verify_n($tok{'acme new'}, 1), 'VALID', '1.1 on upgraded rows: a key created after the update works');
chain_ok($node, $db, '1.1 on upgraded rows');

$held->quit;

#
# 5. The catalogs: upgraded against fresh.
#
# Every category is a query whose rows are OID-free text; the objects are
# those pg_depend ties to the extension (deptype 'e'), those in its schema,
# and their sub-objects (indexes, sequences, composite types' relations,
# columns and attributes, constraints, triggers, rules, policies, defaults).
# search_path is pg_catalog only, so every name of ours prints qualified.
my $catalog_setup = q{
SET search_path = pg_catalog, pg_temp;
-- An ACL as "grantee:privilege[*] (by grantor)", the owner named OWNER.
CREATE FUNCTION pg_temp.acl(p_acl aclitem[], p_owner oid) RETURNS text LANGUAGE sql STABLE AS $f$
    SELECT coalesce(string_agg(x.who || ':' || x.privilege_type
                               || CASE WHEN x.is_grantable THEN '*' ELSE '' END
                               || ' (by ' || x.by || ')', ', ' ORDER BY x.who, x.privilege_type), '(none)')
      FROM (SELECT e.privilege_type, e.is_grantable,
                   CASE WHEN e.grantee = 0 THEN 'PUBLIC' WHEN e.grantee = p_owner THEN 'OWNER'
                        ELSE pg_get_userbyid(e.grantee)::text END AS who,
                   CASE WHEN e.grantor = p_owner THEN 'OWNER' ELSE pg_get_userbyid(e.grantor)::text END AS by
              FROM aclexplode(p_acl) e) x
$f$;
CREATE FUNCTION pg_temp.owner_name(p_role oid) RETURNS text LANGUAGE sql STABLE AS $f$
    SELECT CASE WHEN r.rolsuper THEN 'a superuser' ELSE r.rolname::text END FROM pg_roles r WHERE r.oid = p_role
$f$;
};

my $catalog_ctes = q{
ext AS (
    SELECT e.oid, e.extnamespace FROM pg_extension e WHERE e.extname = 'apikeys'),
members AS (
    SELECT d.classid, d.objid, d.objsubid FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
procs AS (
    SELECT m.objid AS oid FROM members m WHERE m.classid = 'pg_proc'::regclass
    UNION SELECT p.oid FROM pg_proc p, ext WHERE p.pronamespace = ext.extnamespace),
types AS (
    SELECT m.objid AS oid FROM members m WHERE m.classid = 'pg_type'::regclass
    UNION SELECT t.oid FROM pg_type t, ext WHERE t.typnamespace = ext.extnamespace),
rels0 AS (
    SELECT m.objid AS oid FROM members m WHERE m.classid = 'pg_class'::regclass
    UNION SELECT t.typrelid FROM pg_type t WHERE t.oid IN (SELECT oid FROM types) AND t.typrelid <> 0
    UNION SELECT c.oid FROM pg_class c, ext WHERE c.relnamespace = ext.extnamespace),
rels AS (
    SELECT oid FROM rels0
    UNION SELECT i.indexrelid FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM rels0)
    UNION SELECT d.objid FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
             AND d.refobjid IN (SELECT oid FROM rels0)),
cons AS (
    SELECT co.oid FROM pg_constraint co
     WHERE co.conrelid IN (SELECT oid FROM rels) OR co.contypid IN (SELECT oid FROM types)),
trigs AS (
    SELECT t.oid FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM rels) AND NOT t.tgisinternal),
rules AS (
    SELECT r.oid FROM pg_rewrite r WHERE r.ev_class IN (SELECT oid FROM rels)),
pols AS (
    SELECT p.oid FROM pg_policy p WHERE p.polrelid IN (SELECT oid FROM rels)),
defs AS (
    SELECT ad.oid FROM pg_attrdef ad WHERE ad.adrelid IN (SELECT oid FROM rels)),
casts AS (
    SELECT m.objid AS oid FROM members m WHERE m.classid = 'pg_cast'::regclass
    UNION SELECT c.oid FROM pg_cast c
           WHERE c.castsource IN (SELECT oid FROM types) OR c.casttarget IN (SELECT oid FROM types))
};

# [category, query of one text column named x]; the order is the report's.
my @catalog_queries = (
	[ members => q{
		SELECT o.type || ' ' || o.identity AS x
		  FROM members m, LATERAL pg_identify_object(m.classid, m.objid, m.objsubid) o} ],
	[ functions => q{
		SELECT concat_ws(' | ', p.oid::regprocedure::text,
		       'kind=' || p.prokind::text, 'language=' || l.lanname::text,
		       'arguments=' || pg_get_function_arguments(p.oid),
		       'identity=' || pg_get_function_identity_arguments(p.oid),
		       'result=' || coalesce(pg_get_function_result(p.oid), '-'),
		       'rettype=' || p.prorettype::regtype::text, 'retset=' || p.proretset,
		       'argtypes=' || p.proargtypes::oid[]::regtype[]::text,
		       'allargtypes=' || coalesce(p.proallargtypes::regtype[]::text, '-'),
		       'argmodes=' || coalesce(p.proargmodes::text, '-'),
		       'argnames=' || coalesce(p.proargnames::text, '-'),
		       'argdefaults=' || coalesce(pg_get_expr(p.proargdefaults, 0), '-'),
		       'variadic=' || p.provariadic::regtype::text,
		       'volatile=' || p.provolatile::text, 'secdef=' || p.prosecdef,
		       'leakproof=' || p.proleakproof, 'strict=' || p.proisstrict,
		       'parallel=' || p.proparallel::text, 'cost=' || p.procost, 'rows=' || p.prorows,
		       'support=' || p.prosupport::regproc::text,
		       'config=' || coalesce(p.proconfig::text, '-'),
		       'probin=' || coalesce(p.probin, '-'),
		       'sqlbody=' || coalesce(pg_get_function_sqlbody(p.oid), '-'),
		       'owner=' || pg_temp.owner_name(p.proowner),
		       'acl=' || pg_temp.acl(coalesce(p.proacl, acldefault('f', p.proowner)), p.proowner)) AS x
		  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
		 WHERE p.oid IN (SELECT oid FROM procs)} ],
	[ function_source => q{
		SELECT p.oid::regprocedure::text || ' | line ' || lpad(s.n::text, 4, '0') || ' | ' || s.line AS x
		  FROM pg_proc p, regexp_split_to_table(p.prosrc, E'\n') WITH ORDINALITY AS s(line, n)
		 WHERE p.oid IN (SELECT oid FROM procs)} ],
	[ relations => q{
		SELECT concat_ws(' | ', c.oid::regclass::text, 'kind=' || c.relkind::text,
		       'persistence=' || c.relpersistence::text, 'am=' || coalesce(am.amname::text, '-'),
		       'options=' || coalesce(c.reloptions::text, '-'), 'natts=' || c.relnatts,
		       'toast=' || (c.reltoastrelid <> 0), 'rowtype=' || c.reltype::regtype::text,
		       'oftype=' || c.reloftype::regtype::text,
		       'rls=' || c.relrowsecurity, 'forcerls=' || c.relforcerowsecurity,
		       'replident=' || c.relreplident::text, 'hasrules=' || c.relhasrules,
		       'hastriggers=' || c.relhastriggers, 'haspk=' || c.relhasindex,
		       'partition=' || c.relispartition,
		       'tablespace=' || coalesce(nullif(c.reltablespace, 0)::regclass::text, '-'),
		       'owner=' || pg_temp.owner_name(c.relowner),
		       'acl=' || CASE WHEN c.relkind IN ('r', 'p', 'v', 'm', 'f')
		                      THEN pg_temp.acl(coalesce(c.relacl, acldefault('r', c.relowner)), c.relowner)
		                      WHEN c.relkind = 'S'
		                      THEN pg_temp.acl(coalesce(c.relacl, acldefault('s', c.relowner)), c.relowner)
		                      ELSE coalesce(pg_temp.acl(c.relacl, c.relowner), '-') END,
		       'view=' || CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) ELSE '-' END) AS x
		  FROM pg_class c LEFT JOIN pg_am am ON am.oid = c.relam
		 WHERE c.oid IN (SELECT oid FROM rels)} ],
	[ columns => q{
		SELECT concat_ws(' | ', a.attrelid::regclass::text, lpad(a.attnum::text, 3, '0'), a.attname,
		       format_type(a.atttypid, a.atttypmod), 'notnull=' || a.attnotnull,
		       'dropped=' || a.attisdropped,
		       'default=' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '-'),
		       'identity=' || a.attidentity::text, 'generated=' || a.attgenerated::text,
		       'collation=' || a.attcollation::regcollation::text,
		       'storage=' || a.attstorage::text, 'compression=' || a.attcompression::text,
		       'stattarget=' || a.attstattarget, 'ndims=' || a.attndims,
		       -- pg_attver (15.x back branches) is an internal counter, like an OID.
		       'options=' || coalesce((SELECT array_agg(o ORDER BY o)::text FROM unnest(a.attoptions) o
		                                WHERE o NOT LIKE 'pg_attver=%'), '-'),
		       'fdwoptions=' || coalesce(a.attfdwoptions::text, '-'),
		       'local=' || a.attislocal, 'inhcount=' || a.attinhcount,
		       'acl=' || coalesce(pg_temp.acl(a.attacl, c.relowner), '-')) AS x
		  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
		  LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
		 WHERE a.attrelid IN (SELECT oid FROM rels) AND a.attnum > 0} ],
	[ constraints => q{
		SELECT concat_ws(' | ',
		       coalesce(nullif(co.conrelid, 0)::regclass::text, co.contypid::regtype::text),
		       co.conname, 'type=' || co.contype::text, pg_get_constraintdef(co.oid),
		       'deferrable=' || co.condeferrable, 'deferred=' || co.condeferred,
		       'validated=' || co.convalidated, 'noinherit=' || co.connoinherit,
		       'local=' || co.conislocal, 'inhcount=' || co.coninhcount,
		       'index=' || co.conindid::regclass::text) AS x
		  FROM pg_constraint co WHERE co.oid IN (SELECT oid FROM cons)} ],
	[ indexes => q{
		SELECT concat_ws(' | ', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid),
		       'unique=' || i.indisunique, 'nullsnotdistinct=' || i.indnullsnotdistinct,
		       'primary=' || i.indisprimary, 'exclusion=' || i.indisexclusion,
		       'immediate=' || i.indimmediate, 'clustered=' || i.indisclustered,
		       'valid=' || i.indisvalid, 'ready=' || i.indisready, 'live=' || i.indislive,
		       'replident=' || i.indisreplident) AS x
		  FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM rels)} ],
	[ triggers => q{
		SELECT concat_ws(' | ', t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid),
		       'enabled=' || t.tgenabled::text) AS x
		  FROM pg_trigger t WHERE t.oid IN (SELECT oid FROM trigs)} ],
	[ types => q{
		SELECT concat_ws(' | ', t.oid::regtype::text, 'type=' || t.typtype::text, 'len=' || t.typlen,
		       'byval=' || t.typbyval, 'category=' || t.typcategory::text,
		       'preferred=' || t.typispreferred, 'delim=' || t.typdelim::text,
		       'relid=' || t.typrelid::regclass::text, 'elem=' || t.typelem::regtype::text,
		       'array=' || t.typarray::regtype::text, 'subscript=' || t.typsubscript::regproc::text,
		       'in=' || t.typinput::regprocedure::text, 'out=' || t.typoutput::regprocedure::text,
		       'recv=' || t.typreceive::regprocedure::text, 'send=' || t.typsend::regprocedure::text,
		       'modin=' || t.typmodin::regprocedure::text, 'modout=' || t.typmodout::regprocedure::text,
		       'analyze=' || t.typanalyze::regprocedure::text,
		       'align=' || t.typalign::text, 'storage=' || t.typstorage::text, 'notnull=' || t.typnotnull,
		       'base=' || t.typbasetype::regtype::text, 'typmod=' || t.typtypmod,
		       'ndims=' || t.typndims, 'collation=' || t.typcollation::regcollation::text,
		       'default=' || coalesce(t.typdefault, '-'),
		       'defaultbin=' || coalesce(pg_get_expr(t.typdefaultbin, 0), '-'),
		       'owner=' || pg_temp.owner_name(t.typowner),
		       'acl=' || pg_temp.acl(coalesce(t.typacl, acldefault('T', t.typowner)), t.typowner)) AS x
		  FROM pg_type t WHERE t.oid IN (SELECT oid FROM types)} ],
	[ casts => q{
		SELECT concat_ws(' | ', c.castsource::regtype::text || ' AS ' || c.casttarget::regtype::text,
		       'function=' || c.castfunc::regprocedure::text, 'context=' || c.castcontext::text,
		       'method=' || c.castmethod::text) AS x
		  FROM pg_cast c WHERE c.oid IN (SELECT oid FROM casts)} ],
	[ comments => q{
		SELECT o.type || ' ' || o.identity || ' | ' || d.description AS x
		  FROM pg_description d, LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) o
		 WHERE (d.classoid = 'pg_proc'::regclass AND d.objoid IN (SELECT oid FROM procs))
		    OR (d.classoid = 'pg_class'::regclass AND d.objoid IN (SELECT oid FROM rels))
		    OR (d.classoid = 'pg_type'::regclass AND d.objoid IN (SELECT oid FROM types))
		    OR (d.classoid = 'pg_constraint'::regclass AND d.objoid IN (SELECT oid FROM cons))
		    OR (d.classoid = 'pg_trigger'::regclass AND d.objoid IN (SELECT oid FROM trigs))
		    OR (d.classoid = 'pg_rewrite'::regclass AND d.objoid IN (SELECT oid FROM rules))
		    OR (d.classoid = 'pg_policy'::regclass AND d.objoid IN (SELECT oid FROM pols))
		    OR (d.classoid = 'pg_cast'::regclass AND d.objoid IN (SELECT oid FROM casts))
		    OR (d.classoid = 'pg_namespace'::regclass AND d.objoid IN (SELECT extnamespace FROM ext))
		    OR (d.classoid = 'pg_extension'::regclass AND d.objoid IN (SELECT oid FROM ext))
		    OR (d.classoid, d.objoid) IN (SELECT m.classid, m.objid FROM members m)} ],
	[ extension => q{
		SELECT concat_ws(' | ', 'extension ' || e.extname::text, 'version=' || e.extversion,
		       'relocatable=' || e.extrelocatable, 'schema=' || e.extnamespace::regnamespace::text,
		       'owner=' || pg_temp.owner_name(e.extowner)) AS x
		  FROM pg_extension e WHERE e.oid IN (SELECT oid FROM ext)
		UNION ALL
		SELECT 'config dump ' || c.rel::regclass::text || ' | condition=' || coalesce(quote_literal(c.cond), 'NULL')
		  FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS c(rel, cond)
		 WHERE e.oid IN (SELECT oid FROM ext)} ],
	[ schema => q{
		SELECT concat_ws(' | ', 'schema ' || n.nspname::text, 'owner=' || pg_temp.owner_name(n.nspowner),
		       'acl=' || pg_temp.acl(coalesce(n.nspacl, acldefault('n', n.nspowner)), n.nspowner)) AS x
		  FROM pg_namespace n WHERE n.oid IN (SELECT extnamespace FROM ext)
		UNION ALL
		SELECT concat_ws(' | ', 'default privileges of ' || pg_temp.owner_name(d.defaclrole),
		       'schema=' || coalesce(nullif(d.defaclnamespace, 0)::regnamespace::text, '-'),
		       'objtype=' || d.defaclobjtype::text, 'acl=' || pg_temp.acl(d.defaclacl, d.defaclrole))
		  FROM pg_default_acl d} ],
	[ roles => q{
		SELECT concat_ws(' | ', 'role ' || r.rolname::text, 'super=' || r.rolsuper, 'inherit=' || r.rolinherit,
		       'createrole=' || r.rolcreaterole, 'createdb=' || r.rolcreatedb,
		       'login=' || r.rolcanlogin, 'replication=' || r.rolreplication,
		       'bypassrls=' || r.rolbypassrls, 'connlimit=' || r.rolconnlimit,
		       'password=' || (SELECT a.rolpassword IS NOT NULL FROM pg_authid a WHERE a.oid = r.oid),
		       'validuntil=' || coalesce(r.rolvaliduntil::text, '-'),
		       'config=' || coalesce(r.rolconfig::text, '-'),
		       'config in this database=' || coalesce((SELECT s.setconfig::text FROM pg_db_role_setting s
		            WHERE s.setrole = r.oid AND s.setdatabase =
		                  (SELECT oid FROM pg_database WHERE datname = current_database())), '-'),
		       'member of=' || coalesce((SELECT string_agg(pg_temp.owner_name(m.roleid)
		                  || CASE WHEN m.admin_option THEN '*' ELSE '' END, ',' ORDER BY 1)
		            FROM pg_auth_members m WHERE m.member = r.oid), '-'),
		       'members=' || coalesce((SELECT string_agg(pg_temp.owner_name(m.member)
		                  || CASE WHEN m.admin_option THEN '*' ELSE '' END, ',' ORDER BY 1)
		            FROM pg_auth_members m WHERE m.roleid = r.oid), '-'),
		       'comment=' || coalesce(shobj_description(r.oid, 'pg_authid'), '-')) AS x
		  FROM pg_roles r WHERE r.rolname LIKE 'apikeys%'} ],
	[ sequences => q{
		SELECT concat_ws(' | ', s.seqrelid::regclass::text, 'type=' || s.seqtypid::regtype::text,
		       'start=' || s.seqstart, 'increment=' || s.seqincrement, 'max=' || s.seqmax,
		       'min=' || s.seqmin, 'cache=' || s.seqcache, 'cycle=' || s.seqcycle,
		       'owned by=' || coalesce((SELECT string_agg(d.refobjid::regclass::text || '.' || a.attname::text
		                                       || ' (' || d.deptype::text || ')', ',')
		            FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		           WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
		             AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0), '-')) AS x
		  FROM pg_sequence s WHERE s.seqrelid IN (SELECT oid FROM rels)} ],
	[ policies => q{
		SELECT concat_ws(' | ', p.polrelid::regclass::text, p.polname, 'cmd=' || p.polcmd::text,
		       'permissive=' || p.polpermissive,
		       'roles=' || (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r)::text END,
		                                      ',' ORDER BY 1) FROM unnest(p.polroles) r),
		       'using=' || coalesce(pg_get_expr(p.polqual, p.polrelid), '-'),
		       'check=' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '-')) AS x
		  FROM pg_policy p WHERE p.oid IN (SELECT oid FROM pols)} ],
	[ rules => q{
		SELECT concat_ws(' | ', r.ev_class::regclass::text, r.rulename, 'enabled=' || r.ev_enabled::text,
		       pg_get_ruledef(r.oid)) AS x
		  FROM pg_rewrite r WHERE r.oid IN (SELECT oid FROM rules)} ],
	[ dependencies => q{
		SELECT pg_describe_object(d.classid, d.objid, d.objsubid) || ' -> '
		       || pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) || ' (' || d.deptype::text || ')' AS x
		  FROM pg_depend d
		 WHERE (d.classid = 'pg_proc'::regclass AND d.objid IN (SELECT oid FROM procs))
		    OR (d.classid = 'pg_type'::regclass AND d.objid IN (SELECT oid FROM types))
		    OR (d.classid = 'pg_class'::regclass AND d.objid IN (SELECT oid FROM rels))
		    OR (d.classid = 'pg_constraint'::regclass AND d.objid IN (SELECT oid FROM cons))
		    OR (d.classid = 'pg_trigger'::regclass AND d.objid IN (SELECT oid FROM trigs))
		    OR (d.classid = 'pg_rewrite'::regclass AND d.objid IN (SELECT oid FROM rules))
		    OR (d.classid = 'pg_policy'::regclass AND d.objid IN (SELECT oid FROM pols))
		    OR (d.classid = 'pg_attrdef'::regclass AND d.objid IN (SELECT oid FROM defs))
		    OR (d.classid = 'pg_cast'::regclass AND d.objid IN (SELECT oid FROM casts))} ],
);
my @categories = map { $_->[0] } @catalog_queries;

# Categories every install of apikeys has rows in (so none compares empty to empty by mistake).
my @nonempty = qw(members functions function_source relations columns constraints indexes
  triggers types casts comments extension schema roles dependencies);

# { category => [sorted rows] } of the extension in $dbname on $n.
sub catalog_snapshot
{
	my ($n, $dbname) = @_;
	my $select = join(",\n", map {
		my ($name, $q) = @$_;
		"'$name', (SELECT coalesce(json_agg(c.x ORDER BY c.x COLLATE \"C\"), '[]'::json) FROM ($q) c)"
	} @catalog_queries);
	my $json = sql($n, $dbname, "$catalog_setup\nWITH $catalog_ctes\nSELECT json_build_object($select)");
	my $snap = JSON::PP->new->decode($json);
	$snap->{$_} = [ sort @{ $snap->{$_} } ] for keys %$snap;

	# Kept for whoever reads a failure: tmp_check/catalog_<node>_<db>.txt.
	my $file = "$PostgreSQL::Test::Utils::tmp_check/catalog_" . $n->name . "_$dbname.txt";
	if (open(my $fh, '>', $file))
	{
		for my $cat (@categories)
		{
			print $fh "== $cat\n", map { s/\n/\\n/gr . "\n" } @{ $snap->{$cat} };
		}
		close $fh;
	}
	return $snap;
}

# { category => [diff lines] }: "- row" only in $a, "+ row" only in $b.
sub catalog_diffs
{
	my ($a, $b) = @_;
	my %diffs;
	for my $cat (@categories)
	{
		my %count;
		$count{$_}++ for @{ $a->{$cat} };
		$count{$_}-- for @{ $b->{$cat} };
		my @lines;
		for my $row (sort keys %count)
		{
			my $c = $count{$row};
			next if $c == 0;
			push @lines, ($c > 0 ? '- ' : '+ ') . ($row =~ s/\n/\\n/gr) for 1 .. abs($c);
		}
		$diffs{$cat} = \@lines;
	}
	return \%diffs;
}

# Tests: $a (named $a_name) and $b have the same rows in every category.
sub catalogs_identical
{
	my ($label, $a_name, $a, $b_name, $b) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $diffs = catalog_diffs($a, $b);
	for my $cat (@categories)
	{
		my $n = scalar @{ $a->{$cat} };
		is(join("\n", @{ $diffs->{$cat} }), '',
			"$label: $cat identical ($n rows; a difference shows '-' for $a_name, '+' for $b_name)");
	}
	return;
}

sql($node, 'postgres', 'CREATE DATABASE fresh');
sql($node, 'fresh', 'CREATE EXTENSION apikeys');
is(sql($node, 'fresh', q{SELECT extversion FROM pg_extension WHERE extname = 'apikeys'}),
	'1.1', 'fresh: CREATE EXTENSION installs 1.1');

my $cat_fresh    = catalog_snapshot($node, 'fresh');
my $cat_upgraded = catalog_snapshot($node, $db);
for my $cat (@nonempty)
{
	cmp_ok(scalar @{ $cat_fresh->{$cat} }, '>', 0, "fresh: the catalog query '$cat' finds rows");
}
ok((grep { /^function apikeys\.verify\(/ } @{ $cat_fresh->{members} }),
	'fresh: the members include apikeys.verify');
ok((grep { /^apikeys\.keys \| 0\d\d \| allowed_ips \| cidr\[\]/ } @{ $cat_fresh->{columns} }),
	'fresh: the columns include keys.allowed_ips');
catalogs_identical('upgraded vs fresh', $db, $cat_upgraded, 'fresh', $cat_fresh);

# Self-check: a 1.1 install changed in four small ways is reported, in exactly
# the four categories concerned.
sql($node, 'postgres', 'CREATE DATABASE tampered');
sql($node, 'tampered', q{
	CREATE EXTENSION apikeys;
	COMMENT ON FUNCTION apikeys.audit_verify() IS 'tampered';
	ALTER FUNCTION apikeys.audit_verify() SET work_mem = '1MB';
	GRANT SELECT ON apikeys.plans TO apikeys_app;
	ALTER TABLE apikeys.keys ALTER COLUMN name SET STATISTICS 500;
});
my $tamper = catalog_diffs(catalog_snapshot($node, 'tampered'), $cat_fresh);
my %tampered_in = map { $_ => join("\n", @{ $tamper->{$_} }) } grep { @{ $tamper->{$_} } } @categories;
is_deeply([ sort keys %tampered_in ], [qw(columns comments functions relations)],
	'self-check: a changed install differs in exactly the categories changed')
  or diag(explain \%tampered_in);
like($tampered_in{comments} // '', qr/^- function apikeys\.audit_verify\(\) \| tampered$/m,
	'self-check: the changed comment is reported');
like($tampered_in{functions} // '', qr/^- apikeys\.audit_verify\(\) \|.*work_mem=1MB/m,
	'self-check: the function setting is reported');
like($tampered_in{relations} // '', qr/^- apikeys\.plans \|.*apikeys_app:SELECT/m,
	'self-check: the grant is reported');
like($tampered_in{columns} // '', qr/^- apikeys\.keys \| \d+ \| name \|.*stattarget=500/m,
	'self-check: the statistics target is reported');
for my $cat (qw(columns comments functions relations))
{
	is(scalar(() = ($tampered_in{$cat} // '') =~ /^[-+] /mg), 2,
		"self-check: $cat: one line removed and one added");
}

# Roles belong to the cluster: in one cluster, "fresh" found those 1.0 made.
# A second cluster where 1.1 makes them itself.
my $pristine = new_node('pristine');
sql($pristine, 'postgres', 'CREATE DATABASE fresh');
sql($pristine, 'fresh', 'CREATE EXTENSION apikeys');
catalogs_identical('upgraded vs fresh on a new cluster', $db, $cat_upgraded, 'fresh (new cluster)',
	catalog_snapshot($pristine, 'fresh'));
$pristine->stop;

#
# 6. 1.0 with no data, updated.
#
sql($node, 'postgres', 'CREATE DATABASE upgraded_empty');
sql($node, 'upgraded_empty', q{CREATE EXTENSION apikeys VERSION '1.0'});
sql($node, 'upgraded_empty', q{ALTER EXTENSION apikeys UPDATE TO '1.1'});
catalogs_identical('upgraded empty vs fresh', 'upgraded_empty', catalog_snapshot($node, 'upgraded_empty'),
	'fresh', $cat_fresh);
my $plans_sql = q{SELECT p::text FROM apikeys.plans p ORDER BY p.name};
is(sql($node, 'upgraded_empty', $plans_sql), sql($node, 'fresh', $plans_sql),
	'upgraded empty vs fresh: the seeded plans are the same rows');
is(sql($node, 'upgraded_empty', $snapshot_sql{audit_chain_lock}), '(1)',
	'upgraded empty: the chain lock row is there');
chain_ok($node, 'upgraded_empty', 'upgraded empty');

# Nothing failed but what the scenario asked for: the refused create, and
# authenticate()'s refusals.
no_log_errors($node, 0, 'no unexpected ERROR in the server log',
	qr/ERROR:  key limit reached/, qr/ERROR:  (?:API_KEY_[A-Z_]+|INSUFFICIENT_SCOPE)$/);

$node->stop;

note(sprintf('008_upgrade took %.1f s', time() - $t0));
done_testing();
