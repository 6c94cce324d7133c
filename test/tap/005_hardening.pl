# Copyright: the apikeys authors.
#
# Hardening against a database owner who is not a superuser ("mallory"), and
# against secrets and text that used to leak or break (library preloaded,
# apikeys.flush_interval = 1, apikeys.alert_requests_per_minute = 5):
#  (1) the background worker cannot be hijacked: in a database that mallory
#      owns, mallory shadows every pg_catalog operator and function the
#      extension's SQL or the worker's SQL might name unqualified (generated
#      from the catalog, same signatures; each logs "apikeys-trap fired",
#      tries ALTER ROLE mallory SUPERUSER and returns the right answer) and
#      puts that schema first on the database's search_path.  Failed and
#      valid verifications, a usage alert, a refused create and a call of
#      every public function, by a superuser and by an apikeys_app login,
#      are all recorded (verify_failed, limit_exceeded, usage_alert,
#      key_usage counts, a NOTIFY), the chain verifies, no trap fired and
#      mallory is still not a superuser;
#  (2) check_function_bodies = off, set by mallory on her database, does not
#      make sessions look like a restore: the worker still writes its rows,
#      a superuser's create_key and hand-written INSERT are held to the plan
#      limit (53400) and audited; a pg_dump -Fc / pg_restore round trip of
#      that database still restores keys, owners and the audit log exactly;
#      nor does default_transaction_read_only = on stop the worker;
#  (3) CREATE EXTENSION refuses a schema "apikeys" that mallory owns, that
#      already holds an object, or that mallory may create objects in
#      (42P06, nothing installed), and accepts an empty one a superuser owns;
#  (4) multibyte text survives the queue: a 200-character owner of 4-byte
#      characters and a 300-character apikeys.actor reach verify_failed and
#      limit_exceeded rows whole (the actor cut to 200 characters), and the
#      database dumps and restores with its audit chain intact;
#  (5) tokens given to authenticate() inside PL/pgSQL (EXECUTE format(%L),
#      a static statement in a function) and a malformed token cast to
#      apikeys.apikey in PL/pgSQL stay out of the server log; the 22P02
#      input errors themselves are logged, authenticate()'s refusals are
#      not (test/tap/011_quiet_log.pl).
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
use Time::HiRes qw(time usleep);

my $t0 = time();

my $node = new_node('hardening', qq{
apikeys.alert_requests_per_minute = 5
log_statement = none
log_min_error_statement = error
});

my $tempdir = PostgreSQL::Test::Utils::tempdir;

# Statements as an application would send them, through sql(), new_key()
# and run_error(): a new session that takes the database's settings (in
# "hijack", search_path = trap, pg_catalog, public).  They name nothing
# outside schema apikeys, so that only the extension could fire a trap.

# The test's own checks: a superuser session that pins search_path first,
# so that no trap can fire in it.
my $pinned = "SET search_path = pg_catalog, pg_temp;\n";

# An error does not end the test: it is returned (and shown), so that the
# check comparing the result fails.
sub look
{
	my ($db, $sql) = @_;
	my ($ret, $out, $err) = $node->psql($db, $pinned . $sql, on_error_stop => 1);
	return $out if $ret == 0;
	diag("query in $db failed: $err");
	return "ERROR: $err";
}

# Runs statements expected to fail (psql goes on after an error); returns
# stderr, where VERBOSITY verbose puts each error's SQLSTATE.
sub run_error
{
	my ($db, $sql, $user) = @_;
	my (undef, $err) = sql_error($node, $db, $sql, on_error_stop => 0, user => $user);
	return $err;
}

# n verify() calls of one token, one statement each; returns the codes.
sub verify_codes
{
	my ($db, $tok, $n, $user) = @_;
	return join ',', split /\n/,
	  sql($node, $db, "SELECT (apikeys.verify('$tok')).code;\n" x $n, $user);
}

# Polls a check (search_path pinned) until it returns 't', for at most
# $timeout seconds; returns whether it did.
sub wait_pinned
{
	my ($db, $query, $timeout) = @_;
	return defined wait_until($node, $db, $pinned . $query, $timeout);
}

# Row snapshots of the extension's tables, for dump/restore comparisons.
sub snapshot
{
	my ($db, $table) = @_;
	return look($db, "SELECT t::text FROM apikeys.$table t ORDER BY t::text");
}

# pg_dump -Fc of $src, restored with pg_restore into a new database $dst.
sub dump_restore
{
	my ($src, $dst, $create_opts, $label) = @_;
	my $file = "$tempdir/$src.dump";
	$node->command_ok([ 'pg_dump', '-Fc', '-f', $file, '-d', $node->connstr($src) ],
		"$label: pg_dump -Fc $src");
	$node->safe_psql('postgres', "CREATE DATABASE $dst $create_opts");
	$node->command_ok(
		[ 'pg_restore', '--exit-on-error', '-d', $node->connstr($dst), $file ],
		"$label: pg_restore into $dst");
	return;
}

$node->safe_psql('postgres', q{
	CREATE ROLE mallory LOGIN;
	CREATE ROLE webapp LOGIN;
});

###########################################################################
# (1) The worker cannot be hijacked through the database's search_path.
###########################################################################

$node->safe_psql('postgres', 'CREATE DATABASE hijack OWNER mallory');
look('hijack', 'CREATE EXTENSION apikeys');
look('postgres', 'GRANT apikeys_app TO webapp');

# Every trap logs, tries to make mallory a superuser (which works only when
# a superuser runs it) and then answers as pg_catalog would.
my $trap_sql = <<'SQL';
CREATE SCHEMA trap;
DO $build$
DECLARE
    r       record;
    v_args  text;
    v_call  text;
    v_body  text;
    v_made  integer := 0;
    v_skip  text[] := '{}';
    v_head  constant text := $h$
BEGIN
    RAISE LOG 'apikeys-trap fired: %%', %L;
    BEGIN
        ALTER ROLE mallory SUPERUSER;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
$h$;
BEGIN
    -- Operators: pg_catalog's, with the same name, argument and result types.
    FOR r IN
        SELECT o.oid, o.oprname, o.oprleft, o.oprright, o.oprresult
          FROM pg_catalog.pg_operator o
         WHERE o.oprnamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
           AND o.oprname OPERATOR(pg_catalog.=) ANY (ARRAY[
               '=', '<>', '<', '>', '<=', '>=', '+', '-', '*', '/', '%', '||', '~', '!~', '~~',
               '!~~', '~~*', '->', '->>', '#>', '#>>', '@>', '<@', '?', '?|', '?&', '&&', '#-', '@@'])
         ORDER BY o.oid
    LOOP
        BEGIN
            IF r.oprleft OPERATOR(pg_catalog.=) 0 THEN
                v_args := pg_catalog.format('b %s', r.oprright::pg_catalog.regtype);
                v_call := pg_catalog.format('RETURN OPERATOR(pg_catalog.%s) b;', r.oprname);
            ELSE
                v_args := pg_catalog.format('a %s, b %s', r.oprleft::pg_catalog.regtype,
                                            r.oprright::pg_catalog.regtype);
                v_call := pg_catalog.format('RETURN a OPERATOR(pg_catalog.%s) b;', r.oprname);
            END IF;
            v_body := pg_catalog.format(v_head, pg_catalog.format('operator %s(%s)', r.oprname, v_args))
                      OPERATOR(pg_catalog.||) v_call OPERATOR(pg_catalog.||) ' END';
            EXECUTE pg_catalog.format('CREATE FUNCTION trap.op_%s(%s) RETURNS %s LANGUAGE plpgsql '
                                      'SET search_path = pg_catalog, pg_temp AS %L',
                                      r.oid, v_args, r.oprresult::pg_catalog.regtype, v_body);
            IF r.oprleft OPERATOR(pg_catalog.=) 0 THEN
                EXECUTE pg_catalog.format('CREATE OPERATOR trap.%s (RIGHTARG = %s, FUNCTION = trap.op_%s)',
                                          r.oprname, r.oprright::pg_catalog.regtype, r.oid);
            ELSE
                EXECUTE pg_catalog.format('CREATE OPERATOR trap.%s (LEFTARG = %s, RIGHTARG = %s, '
                                          'FUNCTION = trap.op_%s)', r.oprname,
                                          r.oprleft::pg_catalog.regtype, r.oprright::pg_catalog.regtype, r.oid);
            END IF;
            v_made := v_made OPERATOR(pg_catalog.+) 1;
        EXCEPTION WHEN OTHERS THEN
            v_skip := v_skip OPERATOR(pg_catalog.||) pg_catalog.format('operator %s(%s, %s): %s',
                r.oprname, r.oprleft::pg_catalog.regtype, r.oprright::pg_catalog.regtype, SQLERRM);
        END;
    END LOOP;
    -- Functions: every pg_catalog function of these names, with the same
    -- arguments (defaults and VARIADIC included) and result.
    FOR r IN
        SELECT p.oid, p.proname, p.proretset, p.prorettype, p.provariadic, p.pronargs,
               pg_catalog.pg_get_function_arguments(p.oid) AS args,
               pg_catalog.pg_get_function_result(p.oid) AS result
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
           AND p.prokind OPERATOR(pg_catalog.=) 'f'
           AND p.proallargtypes IS NULL
           AND p.proname OPERATOR(pg_catalog.=) ANY (ARRAY[
               'now', 'clock_timestamp', 'statement_timestamp', 'transaction_timestamp', 'timeofday',
               'to_timestamp', 'to_char', 'date_trunc', 'date_part', 'timezone', 'make_interval',
               'length', 'char_length', 'character_length', 'octet_length', 'lower', 'upper', 'left',
               'right', 'btrim', 'ltrim', 'rtrim', 'substr', 'substring', 'strpos', 'position',
               'replace', 'starts_with', 'regexp_replace', 'regexp_match', 'regexp_matches',
               'split_part', 'repeat', 'md5', 'sha256', 'encode', 'decode', 'convert_to',
               'convert_from', 'quote_ident', 'quote_literal', 'quote_nullable', 'format',
               'concat_ws', 'string_to_array', 'array_to_string', 'cardinality', 'array_ndims',
               'array_length', 'array_position', 'array_append', 'array_cat', 'unnest',
               'generate_series', 'jsonb_typeof', 'to_jsonb', 'to_json', 'jsonb_strip_nulls',
               'jsonb_set', 'jsonb_insert', 'jsonb_array_length', 'jsonb_each', 'jsonb_object_keys',
               'jsonb_extract_path_text', 'gen_random_uuid', 'current_setting', 'set_config',
               'pg_has_role', 'has_schema_privilege', 'has_table_privilege',
               'has_function_privilege', 'pg_notify', 'pg_advisory_xact_lock',
               'pg_try_advisory_xact_lock', 'pg_advisory_lock', 'txid_current',
               'pg_current_xact_id', 'current_database', 'current_schema', 'inet_client_addr',
               'pg_backend_pid', 'random', 'abs', 'floor', 'ceil', 'round', 'trunc', 'mod',
               'hashtext', 'aclexplode', 'pg_sleep', 'row_to_json'])
         ORDER BY p.oid
    LOOP
        BEGIN
            SELECT pg_catalog.string_agg(CASE WHEN i OPERATOR(pg_catalog.=) r.pronargs
                                                   AND r.provariadic OPERATOR(pg_catalog.<>) 0
                                              THEN 'VARIADIC ' ELSE '' END
                                         OPERATOR(pg_catalog.||) '$' OPERATOR(pg_catalog.||) i,
                                         ', ' ORDER BY i)
              INTO v_args
              FROM pg_catalog.generate_series(1, r.pronargs) i;
            v_call := pg_catalog.format('pg_catalog.%I(%s)', r.proname, COALESCE(v_args, ''));
            IF r.proretset THEN
                v_call := 'RETURN QUERY SELECT * FROM ' OPERATOR(pg_catalog.||) v_call
                          OPERATOR(pg_catalog.||) '; RETURN;';
            ELSIF r.prorettype OPERATOR(pg_catalog.=) 'pg_catalog.void'::pg_catalog.regtype THEN
                v_call := 'PERFORM ' OPERATOR(pg_catalog.||) v_call OPERATOR(pg_catalog.||) '; RETURN;';
            ELSE
                v_call := 'RETURN ' OPERATOR(pg_catalog.||) v_call OPERATOR(pg_catalog.||) ';';
            END IF;
            v_body := pg_catalog.format(v_head, pg_catalog.format('%s(%s)', r.proname, r.args))
                      OPERATOR(pg_catalog.||) v_call OPERATOR(pg_catalog.||) ' END';
            EXECUTE pg_catalog.format('CREATE FUNCTION trap.%I(%s) RETURNS %s LANGUAGE plpgsql '
                                      'SET search_path = pg_catalog, pg_temp AS %L',
                                      r.proname, r.args, r.result, v_body);
            v_made := v_made OPERATOR(pg_catalog.+) 1;
        EXCEPTION WHEN OTHERS THEN
            v_skip := v_skip OPERATOR(pg_catalog.||) pg_catalog.format('%s(%s): %s', r.proname, r.args, SQLERRM);
        END;
    END LOOP;
    RAISE NOTICE 'trap: % objects, % skipped: %', v_made, pg_catalog.cardinality(v_skip), v_skip;
END
$build$;
-- format(text, VARIADIC "any") cannot be shadowed in PL/pgSQL; this one
-- catches calls whose arguments are all text.
CREATE FUNCTION trap.format(fmt text, VARIADIC args text[]) RETURNS text LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    RAISE LOG 'apikeys-trap fired: %', 'format(text, VARIADIC text[])';
    BEGIN
        ALTER ROLE mallory SUPERUSER;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN pg_catalog.format(fmt, VARIADIC args);
END
$f$;
SQL

my ($ret, $out, $err) = $node->psql('hijack', $trap_sql, extra_params => [ '-U', 'mallory' ]);
is($ret, 0, '(1) mallory plants her traps in schema trap') or diag($err);
my ($made) = $err =~ /trap: (\d+) objects/;
note("(1) $err");
cmp_ok($made // 0, '>', 700, '(1) ... shadowing hundreds of pg_catalog operators and functions');
is( look('hijack', q{
	SELECT coalesce(string_agg(s, ', '), 'all there') FROM unnest(ARRAY[
	  'trap.now()', 'trap.to_timestamp(double precision)', 'trap.length(text)',
	  'trap.lower(text)', 'trap.upper(text)', 'trap.left(text,integer)', 'trap.btrim(text)',
	  'trap.btrim(text,text)', 'trap.octet_length(text)', 'trap.octet_length(bytea)',
	  'trap.cardinality(anyarray)', 'trap.array_ndims(anyarray)', 'trap.jsonb_typeof(jsonb)',
	  'trap.to_jsonb(anyelement)', 'trap.jsonb_strip_nulls(jsonb)', 'trap.format(text,text[])',
	  'trap.encode(bytea,text)', 'trap.gen_random_uuid()', 'trap.current_setting(text,boolean)',
	  'trap.set_config(text,text,boolean)', 'trap.pg_has_role(name,text)',
	  'trap.pg_has_role(name,name,text)', 'trap.pg_notify(text,text)', 'trap.unnest(anyarray)',
	  'trap.to_char(timestamp with time zone,text)', 'trap.date_trunc(text,timestamp with time zone)']) s
	 WHERE to_regprocedure(s) IS NULL}),
	'all there', '(1) ... including now(), to_timestamp(), lower(), format(), pg_has_role(), unnest() ...');
is( look('hijack', q{
	SELECT coalesce(string_agg(s, ', '), 'all there') FROM unnest(ARRAY[
	  'trap.=(text,text)', 'trap.=(name,name)', 'trap.=(uuid,uuid)', 'trap.=(bytea,bytea)',
	  'trap.=(integer,integer)', 'trap.=(anyarray,anyarray)', 'trap.<>(text,text)',
	  'trap.<=(timestamp with time zone,timestamp with time zone)', 'trap.>(bigint,bigint)',
	  'trap.*(double precision,double precision)', 'trap.+(date,integer)',
	  'trap.-(timestamp with time zone,interval)', 'trap.-(NONE,integer)', 'trap.||(text,text)',
	  'trap.||(jsonb,jsonb)', 'trap.~(text,text)', 'trap.->>(jsonb,text)', 'trap.@>(jsonb,jsonb)',
	  'trap.?(jsonb,text)', 'trap.@>(anyarray,anyarray)']) s
	 WHERE to_regoperator(s) IS NULL}),
	'all there', '(1) ... and operators =, <>, <=, >, *, +, -, ||, ~, ->>, @>, ? with their signatures');

sql($node, 'hijack', 'ALTER DATABASE hijack SET search_path = trap, pg_catalog, public', 'mallory');
is(sql($node, 'hijack', 'SHOW search_path'), 'trap, pg_catalog, public',
	"(1) a new session, a superuser's too, gets mallory's search_path");

# The trap is armed: mallory's own unqualified "=" fires it (and her
# ALTER ROLE fails, as she is no superuser).
my $log_from = -s $node->logfile;
is(sql($node, 'hijack', 'SELECT 1 = 1', 'mallory'), 't', '(1) mallory runs an unqualified 1 = 1');
like(log_since($node, $log_from),
	qr/LOG:  apikeys-trap fired: operator =\(a integer, b integer\)/,
	'(1) ... and the trap fired: the log shows it (the trap is armed)');
is(look('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}), 'f',
	'(1) ... mallory is still not a superuser');
my $armed = -s $node->logfile;

# The listener, a session of the superuser with mallory's search_path.
my $listener = alert_listener($node, 'hijack');

# A well-formed token that matches no key.
my $unknown = look('hijack', q{SELECT apikeys._new_token('zz_test')::text});

# Superuser: a refused create (53400), in a transaction rolled back.
sql($node, 'hijack', q{SELECT apikeys.set_plan('lim', 'free')});
new_key($node, 'hijack', q{'lim', 'the one key'});
like(run_error('hijack', "BEGIN;\nSELECT apikeys.create_key('lim', 'second');\nROLLBACK;"),
	qr/ERROR:  53400: key limit reached/, '(1) superuser: a second key on plan free is refused (53400)');

# Superuser: a key verified 7 times within a minute (threshold 5), a revoked
# key, and an unknown token.
sql($node, 'hijack', q{SELECT apikeys.set_plan('acme', 'pro')});
my ($hot_id, $hot) = new_key($node, 'hijack', q{'acme', 'hot key'});
my ($rev_id, $rev) = new_key($node, 'hijack', q{'acme', 'revoked key'});
ok(sql($node, 'hijack', "SELECT apikeys.revoke('$rev_id', 'acme', 'test')") ne '',
	'(1) superuser: revoke with owner');
avoid_minute_edge(52);
is(verify_codes('hijack', $hot, 7), join(',', ('VALID') x 7), '(1) superuser: 7 valid verifications of one key');
is(verify_codes('hijack', $rev, 3), join(',', ('API_KEY_REVOKED') x 3),
	'(1) superuser: 3 verifications of a revoked key');
is(verify_codes('hijack', $unknown, 4), join(',', ('API_KEY_INVALID') x 4),
	'(1) superuser: 4 verifications of an unknown well-formed token');

# The app role: what apikeys_app may call, and a refusal for the rest.
my ($app1_id, $app1) = new_key($node, 'hijack', q{'appco', 'app key'}, 'webapp');
is(verify_codes('hijack', $app1, 2, 'webapp'), 'VALID,VALID', '(1) app: verify');
is(sql($node, 'hijack', "SELECT owner FROM apikeys.authenticate('$app1')", 'webapp'), 'appco',
	'(1) app: authenticate');
my ($app2_id, $app2) = split /\|/,
  sql($node, 'hijack', "SELECT key_id, token FROM apikeys.rotate('$app1_id', 'appco')", 'webapp');
ok(defined $app2 && $app2 ne '', '(1) app: rotate with owner');
like(run_error('hijack', "SELECT owner FROM apikeys.authenticate('$app1')", 'webapp'),
	qr/ERROR:  28000: API_KEY_REVOKED/, '(1) app: the rotated key no longer authenticates');
is(verify_codes('hijack', $app2, 1, 'webapp'), 'VALID', '(1) app: its replacement verifies');
ok(sql($node, 'hijack', "SELECT apikeys.revoke('$app2_id', 'appco', 'done')", 'webapp') ne '',
	'(1) app: revoke with owner');
is(sql($node, 'hijack', q{SELECT status FROM apikeys.list_keys('appco')}, 'webapp'), "revoked\nrevoked",
	'(1) app: list_keys');
is( sql($node, 'hijack', qq{SELECT apikeys.is_well_formed('$app2'), apikeys.prefix('$app2'),
	                  apikeys.start('$app2') IS NOT NULL, apikeys.digest('$app2') IS NOT NULL}, 'webapp'),
	't|ak_live|t|t', '(1) app: is_well_formed, prefix, start, digest');
is(sql($node, 'hijack', q{SELECT preloaded FROM apikeys.status()}, 'webapp'), 't', '(1) app: status');
my $denied = () = run_error('hijack', q{
		SELECT apikeys.set_plan('appco', 'pro');
		SELECT apikeys.revoke_all('appco');
		SELECT apikeys.revoke_token('x');
		SELECT * FROM apikeys.audit_verify();}, 'webapp')
  =~ /ERROR:  42501: permission denied for function (?:set_plan|revoke_all|revoke_token|audit_verify)\n/g;
is($denied, 4, '(1) app: set_plan, revoke_all, revoke_token and audit_verify are refused (42501)');

# Superuser: every public function.
my ($boss_id, $boss) = new_key($node, 'hijack', q{'boss', 'boss key', '{orders:read}'});
is(verify_codes('hijack', $boss, 1), 'VALID', '(1) superuser: create_key and verify');
is(sql($node, 'hijack', qq{SELECT owner FROM apikeys.authenticate('$boss', '{orders:read}')}), 'boss',
	'(1) superuser: authenticate with scopes');
my ($boss2_id, $boss2) = split /\|/,
  sql($node, 'hijack', qq{SELECT key_id, token FROM apikeys.rotate('$boss_id', 'boss', '1 hour')});
ok(defined $boss2 && $boss2 ne '', '(1) superuser: rotate with owner and grace');
is(sql($node, 'hijack', "SELECT apikeys.revoke_token('$boss')"), $boss_id,
	'(1) superuser: revoke_token of the rotating key');
ok(sql($node, 'hijack', "SELECT apikeys.revoke('$boss2_id', 'boss', 'done')") ne '',
	'(1) superuser: revoke with owner');
sql($node, 'hijack', q{SELECT apikeys.set_plan('gone', 'pro')});
new_key($node, 'hijack', q{'gone', 'gone 1'});
new_key($node, 'hijack', q{'gone', 'gone 2'});
is(sql($node, 'hijack', q{SELECT apikeys.revoke_all('gone', 'offboarded')}), '2', '(1) superuser: revoke_all');
is(sql($node, 'hijack', q{SELECT name, status FROM apikeys.list_keys('boss')}),
	"boss key|revoked\nboss key|revoked", '(1) superuser: list_keys');
is(sql($node, 'hijack', q{SELECT apikeys.purge_audit('2000-01-01')}), '0',
	'(1) superuser: purge_audit (nothing that old)');
is(sql($node, 'hijack', q{SELECT ok FROM apikeys.audit_verify()}), 't', '(1) superuser: audit_verify');
is(sql($node, 'hijack', q{SELECT preloaded, failure_audit FROM apikeys.status()}), 't|t',
	'(1) superuser: status');

# What the worker writes.
ok( wait_pinned('hijack', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 4
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND details->>'prefix' = 'zz_test'}, 15),
	'(1) verify_failed: the 4 unknown tokens are counted under their prefix');
ok( wait_pinned('hijack', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 3
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$rev_id'
	 AND owner = 'acme' AND details->>'reason' = 'API_KEY_REVOKED'}, 15),
	'(1) verify_failed: the revoked key, 3 times, naming its owner');
ok( wait_pinned('hijack', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 1
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$app1_id'
	 AND db_user = 'webapp'}, 15),
	"(1) verify_failed: the app's rotated key, recorded for webapp");
ok( wait_pinned('hijack', q{SELECT coalesce(sum((details->>'count')::int), 0) = 1
	FROM apikeys.audit_log WHERE event = 'limit_exceeded' AND owner = 'lim'
	 AND details->>'plan' = 'free' AND details->>'max_keys' = '1'}, 15),
	'(1) limit_exceeded: the refused create, though it was rolled back');
ok( wait_pinned('hijack', qq{SELECT count(*) = 1 FROM apikeys.audit_log
	WHERE event = 'usage_alert' AND key_id = '$hot_id' AND details->>'requests' = '6'
	  AND details->>'threshold' = '5'}, 15),
	'(1) usage_alert: one row for the key verified 7 times (requests 6, threshold 5)');
ok( wait_pinned('hijack', qq{SELECT coalesce(sum(requests), 0) = 7 AND coalesce(sum(failures), 0) = 0
	FROM apikeys.key_usage WHERE key_id = '$hot_id'}, 15),
	'(1) key_usage: 7 requests for the hot key');
ok( wait_pinned('hijack', qq{SELECT coalesce(sum(requests), 0) = 0 AND coalesce(sum(failures), 0) = 3
	FROM apikeys.key_usage WHERE key_id = '$rev_id'}, 15),
	'(1) key_usage: 3 failures for the revoked key');
ok( wait_pinned('hijack', qq{SELECT coalesce(sum(requests), 0) = 3 AND coalesce(sum(failures), 0) = 1
	FROM apikeys.key_usage WHERE key_id = '$app1_id'}, 15),
	"(1) key_usage: 3 requests and 1 failure for the app's first key");
my @alerts;
my $deadline = time() + 10;
while (time() < $deadline)
{
	@alerts = grep { /"key_id": "$hot_id"/ } alerts_heard($listener);
	last if @alerts;
	usleep(200_000);
}
is(scalar(@alerts), 1, '(1) NOTIFY apikeys_alert heard once for the hot key');
queue_drained_ok($node, 'hijack', '(1)');
$listener->{psql}->quit;

# The verdict.
is(look('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}), 'f',
	'(1) mallory is not a superuser');
my $since_armed = log_since($node, $armed);
my @fired = grep { /apikeys-trap fired/ } split /\n/, $since_armed;
is(scalar(@fired), 0, '(1) no trap fired after it was armed')
  or diag(join("\n", @fired[ 0 .. ($#fired < 10 ? $#fired : 10) ]));
like($since_armed, qr/ERROR:  key limit reached/,
	'(1) ... in a server log that was written meanwhile');
chain_ok($node, 'hijack', '(1)');

###########################################################################
# (2) check_function_bodies = off is no restore.
###########################################################################

$node->safe_psql('postgres', 'CREATE DATABASE nocheck OWNER mallory');
look('nocheck', 'CREATE EXTENSION apikeys');
sql($node, 'nocheck', 'ALTER DATABASE nocheck SET check_function_bodies = off', 'mallory');
is(sql($node, 'nocheck', 'SHOW check_function_bodies'), 'off',
	"(2) a superuser's new session in mallory's database has check_function_bodies off");

# (a) the worker writes.
my $nc_unknown = look('nocheck', q{SELECT apikeys._new_token('nc_test')::text});
is(verify_codes('nocheck', $nc_unknown, 4), join(',', ('API_KEY_INVALID') x 4),
	'(2a) 4 verifications of an unknown token');
ok( wait_pinned('nocheck', q{SELECT coalesce(sum((details->>'count')::int), 0) = 4
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND details->>'prefix' = 'nc_test'}, 15),
	'(2a) the worker writes their verify_failed rows');
queue_drained_ok($node, 'nocheck', '(2a)');

# (b) create_key is limited and audited.
my ($bob_id) = new_key($node, 'nocheck', q{'bob', 'first'});
is( look('nocheck', qq{SELECT string_agg(event, ',' ORDER BY id) FROM apikeys.audit_log
	                    WHERE owner = 'bob' AND event IN ('owner_created', 'key_created')}),
	'owner_created,key_created', "(2b) a superuser's create_key writes owner_created and key_created");
is(look('nocheck', qq{SELECT count(*) FROM apikeys.audit_log WHERE key_id = '$bob_id'}), '1',
	'(2b) ... the key_created row names the key');
like(run_error('nocheck', q{SELECT apikeys.create_key('bob', 'second')}),
	qr/ERROR:  53400: key limit reached/, "(2b) a superuser's second key on plan free gets 53400");

# (c) a hand-written INSERT is limited too (and audited when allowed).
like( run_error('nocheck', q{INSERT INTO apikeys.keys (owner, name, prefix, start, digest)
	VALUES ('bob', 'by hand', 'ak_live', 'ak_live_hand', apikeys.digest(apikeys._new_token('ak_live')))}),
	qr/ERROR:  53400: key limit reached/, "(2c) a superuser's INSERT beyond the limit gets 53400");
sql($node, 'nocheck', q{INSERT INTO apikeys.keys (owner, name, prefix, start, digest)
	VALUES ('carl', 'by hand', 'ak_live', 'ak_live_hand', apikeys.digest(apikeys._new_token('ak_live')))});
is( look('nocheck', q{SELECT string_agg(event, ',' ORDER BY id) FROM apikeys.audit_log WHERE owner = 'carl'}),
	'owner_created,key_created', '(2c) an allowed INSERT is audited and chained');
is(look('nocheck', q{SELECT count(*) FROM apikeys.keys WHERE owner = 'bob'}), '1',
	'(2c) bob still has one key');

# (d) the refusals' limit_exceeded rows, written by the worker, and the chain.
ok( wait_pinned('nocheck', q{SELECT coalesce(sum((details->>'count')::int), 0) = 2
	FROM apikeys.audit_log WHERE event = 'limit_exceeded' AND owner = 'bob'}, 15),
	'(2d) both refusals have their limit_exceeded record');
chain_ok($node, 'nocheck', '(2d)');

# A real restore still keeps rows as dumped.
queue_drained_ok($node, 'nocheck', '(2)');
my %nc_src = map { $_ => snapshot('nocheck', $_) } qw(plans owners keys audit_log);
dump_restore('nocheck', 'nocheck_copy', '', '(2)');
for my $t (qw(plans owners keys audit_log))
{
	is(snapshot('nocheck_copy', $t), $nc_src{$t}, "(2) restored $t identical");
}
is( look('nocheck_copy', 'SELECT count(*) FROM apikeys.audit_log'),
	look('nocheck', 'SELECT count(*) FROM apikeys.audit_log'), '(2) restored audit log has as many rows');
chain_ok($node, 'nocheck_copy', '(2) restored');
like(run_error('nocheck_copy', q{SELECT apikeys.create_key('bob', 'after restore')}),
	qr/ERROR:  53400/, '(2) after the restore, limits hold');

# (e) Nor can mallory stop the worker with default_transaction_read_only:
# verification works in read-only transactions, and the worker still writes.
$node->safe_psql('postgres', 'CREATE DATABASE readonly OWNER mallory');
look('readonly', 'CREATE EXTENSION apikeys');
sql($node, 'readonly', 'ALTER DATABASE readonly SET default_transaction_read_only = on', 'mallory');
my $ro_unknown = look('readonly', q{SELECT apikeys._new_token('ro_test')::text});
is(verify_codes('readonly', $ro_unknown, 3), join(',', ('API_KEY_INVALID') x 3),
	'(2e) 3 verifications in a database whose transactions default to read-only');
ok( wait_pinned('readonly', q{SELECT coalesce(sum((details->>'count')::int), 0) = 3
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND details->>'prefix' = 'ro_test'}, 15),
	'(2e) the worker still writes their verify_failed rows');
queue_drained_ok($node, 'readonly', '(2e)');

###########################################################################
# (3) CREATE EXTENSION refuses a squatted schema.
###########################################################################

sub not_installed
{
	my ($db, $label) = @_;
	is(look($db, q{SELECT count(*) FROM pg_extension WHERE extname = 'apikeys'}), '0',
		"$label: no extension installed");
	return;
}

# What schema apikeys holds (objects that depend on it).
my $holds = q{SELECT coalesce(string_agg(o, ', '), 'nothing') FROM (
	SELECT pg_describe_object(classid, objid, objsubid) o FROM pg_depend
	 WHERE refclassid = 'pg_namespace'::regclass AND refobjid = 'apikeys'::regnamespace
	 ORDER BY 1 LIMIT 3) s};

# (a) a schema mallory owns.
$node->safe_psql('postgres', 'CREATE DATABASE squat_owner OWNER mallory');
sql($node, 'squat_owner', 'CREATE SCHEMA apikeys', 'mallory');
like(run_error('squat_owner', 'CREATE EXTENSION apikeys'),
	qr/ERROR:  42P06: schema "apikeys" is owned by role "mallory"/,
	'(3a) a schema owned by mallory: 42P06 naming the schema and its owner');
not_installed('squat_owner', '(3a)');
is(look('squat_owner', $holds), 'nothing', '(3a) the schema still holds nothing');

# (b) a superuser's schema that already holds an object.
$node->safe_psql('postgres', 'CREATE DATABASE squat_object');
look('squat_object', q{CREATE SCHEMA apikeys;
	CREATE FUNCTION apikeys.verify(varchar) RETURNS text LANGUAGE sql AS $$SELECT 'captured'$$});
like(run_error('squat_object', 'CREATE EXTENSION apikeys'),
	qr/ERROR:  42P06: schema "apikeys" is not empty/, '(3b) a schema holding a function: 42P06, not empty');
not_installed('squat_object', '(3b)');
is(look('squat_object', $holds), 'function apikeys.verify(character varying)',
	'(3b) the schema holds only what it held');

# (c) a superuser's schema mallory may create objects in.
$node->safe_psql('postgres', 'CREATE DATABASE squat_grant');
look('squat_grant', 'CREATE SCHEMA apikeys; GRANT CREATE ON SCHEMA apikeys TO mallory');
like(run_error('squat_grant', 'CREATE EXTENSION apikeys'),
	qr/ERROR:  42P06: schema "apikeys" [^\n]*"mallory"/,
	'(3c) a schema with CREATE granted to mallory: 42P06 naming mallory');
not_installed('squat_grant', '(3c)');
is(look('squat_grant', $holds), 'nothing', '(3c) the schema still holds nothing');

# (d) a superuser's empty schema is fine.
$node->safe_psql('postgres', 'CREATE DATABASE squat_empty');
look('squat_empty', 'CREATE SCHEMA apikeys');
is(run_error('squat_empty', 'CREATE EXTENSION apikeys'), '',
	"(3d) a superuser's empty schema: CREATE EXTENSION succeeds");
is(look('squat_empty', q{SELECT count(*) FROM pg_extension WHERE extname = 'apikeys'}), '1',
	'(3d) ... the extension is installed');
my (undef, $sq_tok) = new_key($node, 'squat_empty', q{'acme', 'k'});
is(verify_codes('squat_empty', $sq_tok, 1), 'VALID', '(3d) ... and works');

###########################################################################
# (4) Multibyte owners and actors survive the queue.
###########################################################################

$node->safe_psql('postgres',
	q{CREATE DATABASE utf8src ENCODING 'UTF8' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'});
look('utf8src', 'CREATE EXTENSION apikeys');
is(look('utf8src', 'SHOW server_encoding'), 'UTF8', '(4) the database is UTF8');

# U+1F600 and U+1F680: 4 bytes each in UTF-8.
my $owner = 'repeat(chr(128512), 200)';
my $actor = 'repeat(chr(128640), 300)';
my ($mb_rev_id, $mb_rev) = new_key($node, 'utf8src', "$owner, 'revoked'");
sql($node, 'utf8src', "SELECT apikeys.revoke('$mb_rev_id', $owner, 'test')");
new_key($node, 'utf8src', "$owner, 'the one key'");
avoid_minute_edge(52);
my $mb_err = run_error('utf8src', qq{
	SELECT set_config('apikeys.actor', $actor, false) IS NOT NULL;
	SELECT (apikeys.verify('$mb_rev')).code;
	SELECT (apikeys.verify('$mb_rev')).code;
	BEGIN;
	SELECT apikeys.create_key($owner, 'second');
	ROLLBACK;});
like($mb_err, qr/ERROR:  53400: key limit reached/, '(4) a second key for the owner is refused (53400)');
ok( wait_pinned('utf8src', qq{SELECT coalesce(sum((details->>'count')::int), 0) = 2
	FROM apikeys.audit_log WHERE event = 'verify_failed' AND key_id = '$mb_rev_id'}, 15),
	'(4) the revoked key\'s verify_failed rows are written');
ok( wait_pinned('utf8src', q{SELECT coalesce(sum((details->>'count')::int), 0) = 1
	FROM apikeys.audit_log WHERE event = 'limit_exceeded'}, 15),
	'(4) the limit_exceeded row is written');
is( look('utf8src', qq{SELECT string_agg(DISTINCT concat_ws(',', event, owner = $owner,
	                      actor = left($actor, 200), length(owner), octet_length(owner),
	                      length(actor), octet_length(actor),
	                      convert_from(convert_to(owner, 'UTF8'), 'UTF8') = owner), ';')
	               FROM apikeys.audit_log WHERE event IN ('verify_failed', 'limit_exceeded')}),
	'limit_exceeded,t,t,200,800,200,800,t;verify_failed,t,t,200,800,200,800,t',
	'(4) both rows: the whole 200-character owner, the first 200 characters of the actor, valid UTF-8');
queue_drained_ok($node, 'utf8src', '(4)');
chain_ok($node, 'utf8src', '(4)');

my %mb_src = map { $_ => snapshot('utf8src', $_) } qw(owners keys audit_log);
dump_restore('utf8src', 'utf8copy', q{ENCODING 'UTF8' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'},
	'(4)');
is( look('utf8copy', 'SELECT count(*) FROM apikeys.audit_log'),
	look('utf8src', 'SELECT count(*) FROM apikeys.audit_log'),
	'(4) the restored audit log has as many rows as the source');
for my $t (qw(owners keys audit_log))
{
	is(snapshot('utf8copy', $t), $mb_src{$t}, "(4) restored $t identical");
}
chain_ok($node, 'utf8copy', '(4) restored');

###########################################################################
# (5) Tokens in PL/pgSQL stay out of the server log.
###########################################################################

$node->safe_psql('postgres', 'CREATE DATABASE logs');
look('logs', 'CREATE EXTENSION apikeys');
is(look('logs', 'SHOW log_min_error_statement'), 'error', '(5) log_min_error_statement = error');

sub revoked_token
{
	my ($name) = @_;
	my ($id, $tok) = new_key($node, 'logs', "'acme', '$name'");
	sql($node, 'logs', "SELECT apikeys.revoke('$id', 'acme', 'test')");
	return $tok;
}

# A well-formed token with one check character changed: 22P02 on input.
sub malformed_token
{
	my $tok = look('logs', q{SELECT apikeys._new_token('ak_live')::text});
	substr($tok, -1, 1) = substr($tok, -1, 1) eq '0' ? '1' : '0';
	return $tok;
}

sub secret_of
{
	my ($tok) = @_;
	my ($secret) = $tok =~ /_([0-9A-Za-z]{32})[0-9A-Za-z]{6}$/;
	die "no secret in $tok" unless defined $secret;
	return $secret;
}

my $tok_dyn    = revoked_token('dynamic');
my $tok_static = revoked_token('static');
my $tok_cast   = malformed_token();
my $tok_lit    = malformed_token();
look('logs', qq{CREATE FUNCTION public.check_key() RETURNS text LANGUAGE plpgsql AS \$f\$
	BEGIN
	    RETURN (SELECT owner FROM apikeys.authenticate('$tok_static'));
	END
	\$f\$});

$log_from = -s $node->logfile;
like( run_error('logs', qq{DO \$\$ BEGIN
	    EXECUTE format('SELECT * FROM apikeys.authenticate(%L)', '$tok_dyn');
	END \$\$}),
	qr/ERROR:  28000: API_KEY_REVOKED/, '(5) EXECUTE format(%L) of authenticate() raises API_KEY_REVOKED');
like(run_error('logs', 'SELECT public.check_key()'),
	qr/ERROR:  28000: API_KEY_REVOKED/, '(5) a function with the token in a static statement raises it too');
like( run_error('logs', qq{DO \$\$ DECLARE k apikeys.apikey; BEGIN
	    k := '$tok_cast'::text::apikeys.apikey;
	END \$\$}),
	qr/ERROR:  22P02: invalid input syntax for type apikey/,
	'(5) a malformed token cast to apikeys.apikey in PL/pgSQL raises 22P02');
like( run_error('logs', qq{DO \$\$ DECLARE k apikeys.apikey; BEGIN
	    k := '$tok_lit'::apikeys.apikey;
	END \$\$}),
	qr/ERROR:  22P02: invalid input syntax for type apikey/,
	'(5) a malformed apikey literal in PL/pgSQL raises 22P02');

my $log = log_since($node, $log_from);
my $revoked_lines = () = $log =~ /ERROR:  API_KEY_REVOKED\n/g;
is($revoked_lines, 0, "(5) the server log has neither API_KEY_REVOKED error: authenticate's refusals stay out of it");
my $input_lines = () = $log =~ /ERROR:  invalid input syntax for type apikey/g;
is($input_lines, 2, '(5) ... and both 22P02 errors');
unlike($log, qr/\Q@{[secret_of($tok_dyn)]}\E/, '(5) no secret of the token passed through EXECUTE');
unlike($log, qr/\Q@{[secret_of($tok_static)]}\E/, '(5) no secret of the token in the static statement');
unlike($log, qr/\Q@{[secret_of($tok_cast)]}\E/, '(5) no secret of the malformed token cast from text');
# The parser runs the input function on a literal, and PL/pgSQL would log
# the expression as the report's QUERY: the library's log hook removes it.
unlike($log, qr/\Q@{[secret_of($tok_lit)]}\E/, '(5) no secret of the malformed apikey literal');

# Nothing in the whole run fired a trap.
@fired = grep { /apikeys-trap fired/ } split /\n/, log_since($node, $armed);
is(scalar(@fired), 0, 'no trap fired anywhere after it was armed');
is(look('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}), 'f',
	'mallory is still not a superuser at the end');

$node->stop;

note(sprintf('005_hardening took %.1f s', time() - $t0));
done_testing();
