
# Copyright: the apikeys authors.
#
# Everything survives pg_dump / pg_restore.
#
# In database "src": edit a seeded plan's limit, add a custom plan, move
# owners between plans, create keys, revoke some, rotate one within a grace
# period and one without, let a key expire, and push an owner over its limit
# by a downgrade.  Then dump it (custom format, restored with pg_restore into
# "dst"; plain format, replayed with psql into "dst2") and show that
#   - the restore runs with no error and no warning,
#   - every token verifies with the same result (code, key, owner, ...),
#   - apikeys.plans, apikeys.owners and apikeys.keys are identical, row for
#     row (so the over-limit owner is restored as it was),
#   - privileges on the extension's objects are the same,
#   - plan limits are enforced again after the restore, with the restored
#     (edited) limits rather than the seeded ones.
# The server has no setting but the preload line, so it also shows that the
# workers need no configuration: counts and refusals are written (part 6).
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
use Time::HiRes qw(time);

my $t0 = time();

my $node = PostgreSQL::Test::Cluster->new('primary');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'apikeys'");
$node->start;

$node->safe_psql('postgres', 'CREATE DATABASE src');
$node->safe_psql('src', 'CREATE EXTENSION apikeys');

#
# 1. Plans: edit a seeded limit and description, add a custom plan.
#
sql($node, 'src', q{
	UPDATE apikeys.plans SET max_keys = 2, description = 'Two active keys (edited).'
	 WHERE name = 'free';
	UPDATE apikeys.plans SET description = 'Twenty keys, edited.' WHERE name = 'pro';
	INSERT INTO apikeys.plans (name, max_keys, description) VALUES ('team', 2, 'Team plan');
	INSERT INTO apikeys.plans (name, max_keys, description) VALUES ('unused', 0, NULL);
});
is(sql($node, 'src', q{SELECT max_keys FROM apikeys.plans WHERE name = 'free'}),
	'2', 'src: seeded plan free edited to 2');

#
# 2. Owners and keys.
#
# Each entry: [label, token, required_scopes (SQL array literal)].
my @tokens;

# acme: custom plan "team" (2), at its limit, scopes, metadata, custom prefix.
sql($node, 'src', q{SELECT apikeys.set_plan('acme', 'team')});
my ($acme1_id, $acme1) = new_key($node, 'src',
	q{'acme', 'acme backend', '{read:*,write:users}', NULL, NULL, '{"env": "prod", "n": 1}'});
my ($acme2_id, $acme2) = new_key($node, 'src',
	q{'acme', 'acme test', '{*}', NULL, 'hm_test', '{"env": "test"}', 1000});
like($acme2, qr/^hm_test_/, 'src: custom prefix');
push @tokens, ['acme1', $acme1, '{}'], ['acme1 scoped ok', $acme1, '{read:users}'],
  ['acme1 scope missing', $acme1, '{delete:users}'], ['acme2 any scope', $acme2, '{admin}'];

# bob: pro, with revoked, rotated (grace and none), expiring and leaked keys.
sql($node, 'src', q{SELECT apikeys.set_plan('bob', 'pro')});
my ($bob_rev_id, $bob_rev)     = new_key($node, 'src', q{'bob', 'revoked key'});
my ($bob_rot_id, $bob_rot)     = new_key($node, 'src', q{'bob', 'rotated in grace', '{read}'});
my ($bob_rot0_id, $bob_rot0)   = new_key($node, 'src', q{'bob', 'rotated no grace'});
my ($bob_leak_id, $bob_leak)   = new_key($node, 'src', q{'bob', 'leaked key'});
my ($bob_exp_id, $bob_exp)     = new_key($node, 'src',
	q{'bob', 'expiring key', '{}', now() + interval '2 seconds'});
my ($bob_later_id, $bob_later) = new_key($node, 'src',
	q{'bob', 'expires later', '{}', now() + interval '30 days'});
my ($bob_ok_id, $bob_ok)       = new_key($node, 'src', q{'bob', 'plain key'});

ok(sql($node, 'src', qq{SELECT apikeys.revoke('$bob_rev_id', NULL, 'compromised') IS NOT NULL}) eq 't',
	'src: revoke');
is(sql($node, 'src', qq{SELECT apikeys.revoke_token('$bob_leak')}), $bob_leak_id, 'src: revoke_token');

my ($bob_new_id, $bob_new) = split /\|/,
  sql($node, 'src', qq{SELECT key_id, token FROM apikeys.rotate('$bob_rot_id', NULL, '1 hour')});
ok(defined $bob_new && $bob_new ne '', 'src: rotate with 1 hour grace');
my ($bob_new0_id, $bob_new0) = split /\|/,
  sql($node, 'src', qq{SELECT key_id, token FROM apikeys.rotate('$bob_rot0_id', 'bob')});
ok(defined $bob_new0 && $bob_new0 ne '', 'src: rotate without grace');

is(sql($node, 'src', qq{SELECT code FROM apikeys.verify('$bob_rot')}), 'VALID',
	'src: old key valid during its grace');
is(sql($node, 'src', qq{SELECT code FROM apikeys.verify('$bob_new')}), 'VALID',
	'src: its replacement valid');
is(sql($node, 'src', qq{SELECT code FROM apikeys.verify('$bob_rot0')}), 'API_KEY_REVOKED',
	'src: key rotated without grace is revoked');

push @tokens, ['bob revoked', $bob_rev, '{}'], ['bob rotating (grace)', $bob_rot, '{}'],
  ['bob rotating scoped', $bob_rot, '{read}'], ['bob replacement', $bob_new, '{}'],
  ['bob replacement scoped', $bob_new, '{read}'], ['bob rotated (no grace)', $bob_rot0, '{}'],
  ['bob replacement (no grace)', $bob_new0, '{}'], ['bob leaked', $bob_leak, '{}'],
  ['bob expired', $bob_exp, '{}'], ['bob expires later', $bob_later, '{}'],
  ['bob plain', $bob_ok, '{}'];

# carol: three keys on developer (5), then downgraded to free (2): over the
# limit, and her existing keys keep working.
sql($node, 'src', q{SELECT apikeys.set_plan('carol', 'developer')});
my @carol;
for my $i (1 .. 3)
{
	my ($id, $tok) = new_key($node, 'src', qq{'carol', 'carol key $i'});
	push @carol, $tok;
	push @tokens, ["carol $i (over limit)", $tok, '{}'];
}
sql($node, 'src', q{SELECT apikeys.set_plan('carol', 'free')});
is(sql($node, 'src', q{SELECT plan FROM apikeys.owners WHERE owner = 'carol'}), 'free',
	'src: carol downgraded to free');
is(sql($node, 'src', qq{SELECT string_agg(code, ',') FROM (VALUES ('$carol[0]'), ('$carol[1]'), ('$carol[2]')) t(tok),
	LATERAL apikeys.verify(t.tok)}),
	'VALID,VALID,VALID', 'src: over-limit owner keeps its keys');
my ($ret, $err) = sql_error($node, 'src', q{SELECT apikeys.create_key('carol', 'one too many')});
isnt($ret, 0, 'src: over-limit owner cannot create a key');
like($err, qr/53400/, 'src: ... with SQLSTATE 53400');

# dave: never set_plan'd, so he lands on the default plan (free, now 2).
my ($dave1_id, $dave1) = new_key($node, 'src', q{'dave', 'dave key'});
push @tokens, ['dave (default plan)', $dave1, '{}'];

# erin: unlimited plan, a revoke_all.
sql($node, 'src', q{SELECT apikeys.set_plan('erin', 'enterprise')});
my ($erin1_id, $erin1) = new_key($node, 'src', q{'erin', 'erin 1', '{billing:read}'});
my ($erin2_id, $erin2) = new_key($node, 'src', q{'erin', 'erin 2'});
is(sql($node, 'src', q{SELECT apikeys.revoke_all('erin', 'offboarded')}), '2', 'src: revoke_all');
my ($erin3_id, $erin3) = new_key($node, 'src', q{'erin', 'erin 3', '{}', NULL, 'er_live', '{"a": [1, 2]}', 50});
push @tokens, ['erin revoked 1', $erin1, '{}'], ['erin revoked 2', $erin2, '{}'],
  ['erin 3', $erin3, '{}'];

# frank: an owner row with no keys at all.
sql($node, 'src', q{SELECT apikeys.set_plan('frank', 'team')});

# Tokens that were never issued, and garbage.
my $unknown = sql($node, 'src', q{SELECT apikeys._new_token('ak_live')::text});
push @tokens, ['unknown well-formed', $unknown, '{}'], ['garbage', 'not-a-token', '{}'];

# Let the expiring key expire.
ok( $node->poll_query_until(
		'src', qq{SELECT code = 'API_KEY_EXPIRED' FROM apikeys.verify('$bob_exp')}),
	'src: short-lived key expired');

#
# 3. What src says: verify result for every token, and table snapshots.
#
sub verify_all
{
	my ($db) = @_;
	my %res;
	for my $t (@tokens)
	{
		my ($label, $tok, $scopes) = @$t;
		# The key's answer, without ratelimit_remaining and ratelimit_reset:
		# each verification spends some of a rate-limited key's allowance.
		my $row = sql($node, $db,
			qq{SELECT code, (v.valid, v.code, v.key_id, v.owner, v.name, v.scopes, v.metadata,
			                 v.expires_at, v.ratelimit_limit)::text
			     FROM apikeys.verify('$tok', '$scopes') v});
		my ($code, $full) = split /\|/, $row, 2;
		$res{$label} = { code => $code, row => $full };
	}
	return \%res;
}

my %snapshot_sql = (
	plans  => q{SELECT p::text FROM apikeys.plans p ORDER BY p.name},
	owners => q{SELECT o::text FROM apikeys.owners o ORDER BY o.owner},
	keys   => q{SELECT k::text FROM apikeys.keys k ORDER BY k.id},
	keys_columns => q{
		SELECT id, owner, name, prefix, start, encode(digest, 'hex'), scopes, metadata,
		       rate_limit, created_at, created_by, expires_at, revoked_at, revoked_by,
		       revoke_reason, rotated_from, replaced_by
		  FROM apikeys.keys ORDER BY id},
	acl => q{
		SELECT 'rel ' || c.oid::regclass::text || ' ' || coalesce(c.relacl::text, '-')
		  FROM pg_class c WHERE c.relnamespace = 'apikeys'::regnamespace
		UNION ALL
		SELECT 'att ' || a.attrelid::regclass::text || '.' || a.attname || ' ' || a.attacl::text
		  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
		 WHERE c.relnamespace = 'apikeys'::regnamespace AND a.attacl IS NOT NULL
		UNION ALL
		SELECT 'fn ' || p.oid::regprocedure::text || ' ' || coalesce(p.proacl::text, '-')
		  FROM pg_proc p WHERE p.pronamespace = 'apikeys'::regnamespace
		UNION ALL
		SELECT 'type ' || t.oid::regtype::text || ' ' || coalesce(t.typacl::text, '-')
		  FROM pg_type t WHERE t.typnamespace = 'apikeys'::regnamespace AND t.typelem = 0
		UNION ALL
		SELECT 'schema ' || n.nspname || ' ' || coalesce(n.nspacl::text, '-')
		  FROM pg_namespace n WHERE n.nspname = 'apikeys'
		ORDER BY 1},
	triggers => q{
		SELECT tgrelid::regclass::text || ' ' || tgname || ' ' || tgenabled::text
		  FROM pg_trigger WHERE NOT tgisinternal
		   AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'apikeys'::regnamespace)
		 ORDER BY 1},
);

sub snapshots
{
	my ($db) = @_;
	my %s;
	$s{$_} = sql($node, $db, $snapshot_sql{$_}) for keys %snapshot_sql;
	return \%s;
}

my $has_audit = sql($node, 'src', q{SELECT to_regclass('apikeys.audit_log') IS NOT NULL}) eq 't';
ok($has_audit, 'src: the extension keeps an audit log');

# Audit rows may be appended asynchronously (failed verifications are flushed
# by a background worker), so the audit log is compared as a prefix: every
# row src had before the dump must be in the restored copy, unchanged.
sub audit_rows
{
	my ($db, $max_id) = @_;
	my $where = defined $max_id ? "WHERE a.id <= $max_id" : '';
	return sql($node, $db, "SELECT a::text FROM apikeys.audit_log a $where ORDER BY a.id");
}

my $src_verify = verify_all('src');
my $src_snap   = snapshots('src');
my $src_audit_max = sql($node, 'src', q{SELECT coalesce(max(id), 0) FROM apikeys.audit_log});
my $src_audit     = audit_rows('src', $src_audit_max);
cmp_ok($src_audit_max, '>', 0, 'src: the scenario left audit rows');
is(sql($node, 'src', qq{SELECT ok, rows_checked >= $src_audit_max FROM apikeys.audit_verify()}),
	't|t', 'src: audit hash chain verifies before the dump');
is( sql($node, 'src', qq{SELECT count(*) FROM apikeys.keys k
	               WHERE NOT EXISTS (SELECT FROM apikeys.audit_log a
	                                  WHERE a.id <= $src_audit_max AND a.key_id = k.id
	                                    AND a.event = 'key_created')}),
	'0', 'src: every key has its key_created row in the dumped part of the log');

# Sanity: src is in the state the scenario built.
my %expect_src = (
	'acme1'                      => 'VALID',
	'acme1 scoped ok'            => 'VALID',
	'acme1 scope missing'        => 'INSUFFICIENT_SCOPE',
	'acme2 any scope'            => 'VALID',
	'bob revoked'                => 'API_KEY_REVOKED',
	'bob rotating (grace)'       => 'VALID',
	'bob rotating scoped'        => 'VALID',
	'bob replacement'            => 'VALID',
	'bob replacement scoped'     => 'VALID',
	'bob rotated (no grace)'     => 'API_KEY_REVOKED',
	'bob replacement (no grace)' => 'VALID',
	'bob leaked'                 => 'API_KEY_REVOKED',
	'bob expired'                => 'API_KEY_EXPIRED',
	'bob expires later'          => 'VALID',
	'bob plain'                  => 'VALID',
	'carol 1 (over limit)'       => 'VALID',
	'carol 2 (over limit)'       => 'VALID',
	'carol 3 (over limit)'       => 'VALID',
	'dave (default plan)'        => 'VALID',
	'erin revoked 1'             => 'API_KEY_REVOKED',
	'erin revoked 2'             => 'API_KEY_REVOKED',
	'erin 3'                     => 'VALID',
	'unknown well-formed'        => 'API_KEY_INVALID',
	'garbage'                    => 'API_KEY_INVALID',);
is_deeply({ map { $_ => $src_verify->{$_}{code} } keys %$src_verify },
	\%expect_src, 'src: every token verifies as the scenario expects');
is(sql($node, 'src', q{SELECT count(*) FROM apikeys.keys}), '18', 'src: 18 keys');
is(sql($node, 'src', q{SELECT string_agg(owner || '=' || plan, ',' ORDER BY owner) FROM apikeys.owners}),
	'acme=team,bob=pro,carol=free,dave=free,erin=enterprise,frank=team',
	'src: owners and plans');

#
# 4. Dump in both formats.
#
my $tempdir = PostgreSQL::Test::Utils::tempdir;
my $dump_c  = "$tempdir/src.dump";
my $dump_p  = "$tempdir/src.sql";

$node->command_ok(
	[ 'pg_dump', '-Fc', '-f', $dump_c, '-d', $node->connstr('src') ],
	'pg_dump -Fc');
$node->command_ok(
	[ 'pg_dump', '-Fp', '-f', $dump_p, '-d', $node->connstr('src') ],
	'pg_dump -Fp');

#
# 5. Restore and compare.
#
sub check_restored
{
	my ($db, $how) = @_;

	is(sql($node, $db, q{SELECT extversion FROM pg_extension WHERE extname = 'apikeys'}),
		sql($node, $db, q{SELECT default_version FROM pg_available_extensions WHERE name = 'apikeys'}),
		"$how: extension restored, at the version installed");

	# Tables and catalog state, before anything in $db can add a row.
	my $snap = snapshots($db);
	for my $what (sort keys %snapshot_sql)
	{
		is($snap->{$what}, $src_snap->{$what}, "$how: $what identical to src");
	}
	is(audit_rows($db, $src_audit_max), $src_audit,
		"$how: audit log rows of src restored unchanged");
	is(sql($node, $db, qq{SELECT ok, rows_checked >= $src_audit_max, first_bad_id FROM apikeys.audit_verify()}),
		't|t|', "$how: restored audit hash chain verifies");

	# Every token: same code and the same verify row.
	my $v = verify_all($db);
	for my $t (@tokens)
	{
		my $label = $t->[0];
		is($v->{$label}{code}, $src_verify->{$label}{code},
			"$how: '$label' verifies with the same code ($src_verify->{$label}{code})");
		is($v->{$label}{row}, $src_verify->{$label}{row},
			"$how: '$label' verify row identical");
	}

	# Limits are enforced again, with the restored limits.
	my ($r, $e) = sql_error($node, $db, q{SELECT apikeys.create_key('carol', 'after restore')});
	isnt($r, 0, "$how: over-limit owner (carol, free) cannot create a key");
	like($e, qr/53400/, "$how: ... SQLSTATE 53400");
	like($e, qr/plan "free" allows 2 active keys/, "$how: ... with the edited limit of free");

	($r, $e) = sql_error($node, $db, q{SELECT apikeys.create_key('acme', 'after restore')});
	isnt($r, 0, "$how: owner at the custom plan's limit (acme, team) cannot create a key");
	like($e, qr/53400/, "$how: ... SQLSTATE 53400");
	like($e, qr/plan "team" allows 2 active keys/, "$how: ... naming the custom plan");

	# dave has 1 key on free: the edited limit (2) lets him have one more,
	# the seeded one (1) would not.
	my ($dave2_id, $dave2) = new_key($node, $db, q{'dave', 'after restore'});
	is(sql($node, $db, qq{SELECT code FROM apikeys.verify('$dave2')}), 'VALID',
		"$how: new key under the restored limit works");
	is(sql($node, 'src', qq{SELECT code FROM apikeys.verify('$dave2')}), 'API_KEY_INVALID',
		"$how: ... and is unknown in src");
	($r, $e) = sql_error($node, $db, q{SELECT apikeys.create_key('dave', 'third')});
	like($e, qr/53400/, "$how: ... and the next one hits the limit");

	# A new owner lands on the default plan, which exists.
	my ($gina_id, $gina) = new_key($node, $db, q{'gina', 'new owner'});
	is(sql($node, $db, q{SELECT plan FROM apikeys.owners WHERE owner = 'gina'}), 'free',
		"$how: new owner on the default plan");

	# The restored rotation state is live: the grace key cannot be rotated
	# again, its replacement can.
	($r, $e) = sql_error($node, $db, qq{SELECT apikeys.rotate('$bob_rot_id')});
	like($e, qr/55000/, "$how: already rotated key cannot be rotated again");
	my ($nid, $ntok) = split /\|/,
	  sql($node, $db, qq{SELECT key_id, token FROM apikeys.rotate('$bob_new_id', 'bob', '1 hour')});
	is(sql($node, $db, qq{SELECT code FROM apikeys.verify('$ntok')}), 'VALID',
		"$how: restored key can be rotated");

	# Revoked stays revoked.
	($r, $e) = sql_error($node, $db,
		qq{UPDATE apikeys.keys SET revoked_at = NULL WHERE id = '$bob_rev_id'});
	like($e, qr/55000/, "$how: restored revoked key cannot be reactivated");

	# Plans: a second row named like a seeded one is refused outside a restore.
	($r, $e) = sql_error($node, $db,
		q{INSERT INTO apikeys.plans (name, max_keys) VALUES ('free', 99)});
	isnt($r, 0, "$how: duplicate plan refused outside a restore");
	is(sql($node, $db, q{SELECT max_keys FROM apikeys.plans WHERE name = 'free'}), '2',
		"$how: free still allows 2");

	# The restored chain goes on: the keys made above are logged after the
	# restored rows, and the whole log still verifies.
	is( sql($node, $db, qq{SELECT count(*) FROM apikeys.audit_log
		             WHERE id > $src_audit_max AND event = 'key_created'
		               AND key_id IN ('$dave2_id', '$gina_id', '$nid')}),
		'3', "$how: keys created after the restore are logged after the restored rows");
	my $rows = sql($node, $db, q{SELECT count(*) FROM apikeys.audit_log});
	is(sql($node, $db, q{SELECT ok, rows_checked, first_bad_id FROM apikeys.audit_verify()}),
		"t|$rows|", "$how: audit hash chain still verifies after new rows ($rows)");
	return;
}

# Custom format: pg_restore --exit-on-error, no output on stderr.
$node->safe_psql('postgres', 'CREATE DATABASE dst');
$node->command_checks_all(
	[ 'pg_restore', '--exit-on-error', '-d', $node->connstr('dst'), $dump_c ],
	0, [qr/^$/], [qr/^$/], 'pg_restore into dst');
check_restored('dst', 'pg_restore');

# Plain format: psql with ON_ERROR_STOP, no output on stderr.
$node->safe_psql('postgres', 'CREATE DATABASE dst2');
$node->command_checks_all(
	[
		'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('dst2'),
		'-f', $dump_p
	],
	0, [], [qr/^$/], 'psql -f plain dump into dst2');
check_restored('dst2', 'plain dump');

# src is untouched by everything that happened in dst and dst2.
is(sql($node, 'src', $snapshot_sql{keys}), $src_snap->{keys}, 'src: keys unchanged');

#
# 6. No configuration beyond the preload line (default intervals, as
#    shipped): the workers write usage counts and refusals.
#
my ($noconf_id, $noconf_token) = new_key($node, 'src', q{'noconf', 'k'});
is(sql($node, 'src', qq{SELECT string_agg((apikeys.verify('$noconf_token')).code, ',')
	FROM generate_series(1, 2)}), 'VALID,VALID', 'preload only: a key verifies twice');
is(sql($node, 'src', q{SELECT (apikeys.verify(apikeys._new_token('noconf')::text)).code}),
	'API_KEY_INVALID', 'preload only: an unknown token is refused');
is(sql($node, 'src', q{SELECT apikeys.flush()}), 't', 'preload only: flush() completes');
is(sql($node, 'src', qq{SELECT requests FROM apikeys.key_usage WHERE key_id = '$noconf_id'}),
	'2', 'preload only: the worker wrote the usage counts');
is(sql($node, 'src', q{SELECT sum((details->>'count')::int) FROM apikeys.audit_log
	WHERE event = 'verify_failed' AND details->>'prefix' = 'noconf'}),
	'1', 'preload only: the worker wrote the refusal');

$node->stop;

note(sprintf('001_dump_restore took %.1f s', time() - $t0));
done_testing();
