-- Roles and owner scoping: the privilege matrix, each call as each role.
\set SHOW_CONTEXT never

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'apikeys_regress_nobody') THEN
        CREATE ROLE apikeys_regress_nobody NOLOGIN;
    END IF;
END $$;

-- PUBLIC gets nothing.
SELECT count(*) AS public_function_grants
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.pronamespace = 'apikeys'::regnamespace AND a.grantee = 0;
SELECT count(*) AS functions_without_acl
  FROM pg_proc p WHERE p.pronamespace = 'apikeys'::regnamespace AND p.proacl IS NULL;
SELECT has_schema_privilege('public', 'apikeys', 'USAGE') AS public_usage,
       has_table_privilege('apikeys_regress_nobody', 'apikeys.keys', 'SELECT') AS nobody_reads_keys;
SELECT t AS apikeys_type, has_type_privilege('apikeys_regress_nobody', t, 'USAGE') AS nobody_uses
  FROM unnest(ARRAY['apikeys.apikey', 'apikeys.verify_result', 'apikeys.authenticate_result']) t;
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('apikeys_admin', 'apikeys_app') ORDER BY 1;

\i sql/include/try.sql

CREATE FUNCTION pg_temp.try_as(r text, cmd text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('SET ROLE %I', r);
    EXECUTE cmd;
    RESET ROLE;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;

-- Fixtures: one owner per role with enough keys for every call.
CREATE TEMP TABLE fx (role text, owner text, k1 uuid, k2 uuid, k3 uuid, k4 uuid, t1 text, t5 text, k_other uuid);
INSERT INTO fx (role, owner)
SELECT r, 'role-' || r FROM unnest(ARRAY['apikeys_app', 'apikeys_admin', 'apikeys_regress_nobody']) r;
SELECT count(*) FROM fx, apikeys.set_plan(fx.owner, 'enterprise');
UPDATE fx SET k1 = (SELECT key_id FROM apikeys.create_key(owner, 'k1')),
              k2 = (SELECT key_id FROM apikeys.create_key(owner, 'k2')),
              k3 = (SELECT key_id FROM apikeys.create_key(owner, 'k3')),
              k4 = (SELECT key_id FROM apikeys.create_key(owner, 'k4')),
              t1 = (SELECT token FROM apikeys.create_key(owner, 't1')),
              t5 = (SELECT token FROM apikeys.create_key(owner, 't5')),
              k_other = (SELECT key_id FROM apikeys.create_key('role-victim', 'victim'));

CREATE TEMP TABLE calls (seq int, call text, tpl text);
INSERT INTO calls VALUES
    (1,  'verify',                   'SELECT apikeys.verify(%3$L)'),
    (2,  'authenticate',             'SELECT apikeys.authenticate(%3$L)'),
    (3,  'create_key',               'SELECT apikeys.create_key(%1$L, %5$L)'),
    (4,  'list_keys',                'SELECT apikeys.list_keys(%1$L)'),
    (5,  'revoke with owner',        'SELECT apikeys.revoke(%2$L, %1$L)'),
    (6,  'revoke without owner',     'SELECT apikeys.revoke(%4$L)'),
    (7,  'revoke other owner''s key', 'SELECT apikeys.revoke(%6$L, %1$L)'),
    (8,  'rotate with owner',        'SELECT apikeys.rotate(%7$L, %1$L)'),
    (9,  'rotate without owner',     'SELECT apikeys.rotate(%8$L)'),
    (10, 'rotate other owner''s key', 'SELECT apikeys.rotate(%6$L, %1$L)'),
    (11, 'revoke_token',             'SELECT apikeys.revoke_token(%9$L)'),
    (12, 'set_plan',                 'SELECT apikeys.set_plan(%1$L, ''pro'')'),
    (13, 'status',                   'SELECT apikeys.status()'),
    (14, 'is_well_formed / start',   'SELECT apikeys.is_well_formed(%3$L), apikeys.start(%3$L)'),
    (15, 'select keys',              'SELECT count(*) FROM apikeys.keys'),
    (16, 'select plans, owners, key_usage', 'SELECT (SELECT count(*) FROM apikeys.plans), (SELECT count(*) FROM apikeys.owners), (SELECT count(*) FROM apikeys.key_usage)'),
    (17, 'edit plans',               'UPDATE apikeys.plans SET description = description WHERE name = ''pro'''),
    (18, 'rename a key by SQL',      'UPDATE apikeys.keys SET name = name WHERE id = %2$L'),
    (19, 'change a digest by SQL',   'UPDATE apikeys.keys SET digest = digest WHERE id = %2$L'),
    (20, 'insert a key by SQL',      'INSERT INTO apikeys.keys (owner, name, prefix, start, digest) VALUES (%1$L, ''x'', ''ak'', ''ak_AAAA'', ''\x00'')'),
    (21, 'delete a key by SQL',      'DELETE FROM apikeys.keys WHERE id = %2$L'),
    (22, 'insert an owner by SQL',   'INSERT INTO apikeys.owners VALUES (''role-new'', ''pro'')'),
    (23, 'new token',                'SELECT apikeys._new_token(NULL)'),
    (24, 'audit_verify',             'SELECT apikeys.audit_verify()'),
    (25, 'select audit_log',         'SELECT count(*) FROM apikeys.audit_log'),
    (26, 'update audit_log',         'UPDATE apikeys.audit_log SET actor = actor'),
    (27, 'purge_audit',              'SELECT apikeys.purge_audit(''-infinity'')'),
    (28, 'revoke_all',               'SELECT apikeys.revoke_all(%1$L)'),
    (29, 'insert a plan by SQL',     'INSERT INTO apikeys.plans (name, max_keys) VALUES (''plan-'' || %1$L, 1)'),
    (30, 'lock the audit chain',     'SELECT FROM apikeys._audit_chain_lock FOR UPDATE'),
    (31, 'flush (without waiting)',  'SELECT apikeys.flush(''0'')');

CREATE TEMP TABLE matrix (seq int, call text, role text, result text);
DO $$
DECLARE c record; f record;
BEGIN
    FOR c IN SELECT * FROM calls ORDER BY seq LOOP
        FOR f IN SELECT * FROM fx ORDER BY role LOOP
            INSERT INTO matrix VALUES (c.seq, c.call, f.role,
                pg_temp.try_as(f.role, format(c.tpl, f.owner, f.k1, f.t1, f.k2, 'made by ' || f.role,
                                              f.k_other, f.k3, f.k4, f.t5)));
        END LOOP;
    END LOOP;
END $$;

-- ok = allowed; otherwise the SQLSTATE (42501 denied, P0002 not found).
SELECT call,
       max(result) FILTER (WHERE role = 'apikeys_app') AS app,
       max(result) FILTER (WHERE role = 'apikeys_admin') AS admin,
       max(result) FILTER (WHERE role = 'apikeys_regress_nobody') AS nobody
  FROM matrix GROUP BY seq, call ORDER BY seq;

-- verify and authenticate are SECURITY INVOKER: they run no SQL and read
-- apikeys.keys by OID, so the EXECUTE grant is the whole gate.  The app role
-- cannot read apikeys.keys (above), yet verifies; nobody cannot call them.
SELECT p.proname, p.prosecdef, p.proconfig
  FROM pg_proc p
 WHERE p.oid IN ('apikeys.verify(text, text[], inet, integer)'::regprocedure, 'apikeys.authenticate(text, text[], inet, integer)'::regprocedure)
 ORDER BY 1;
SELECT has_table_privilege('apikeys_app', 'apikeys.keys', 'SELECT') AS app_reads_keys,
       has_function_privilege('apikeys_regress_nobody', 'apikeys.verify(text, text[], inet, integer)', 'EXECUTE') AS nobody_executes;

-- The internal functions behind them: apikeys_app may call the _owned form
-- only with an owner, and not the one that acts on any owner's keys (the
-- other owner's key stays intact, checked below).
SELECT pg_temp.try_as('apikeys_app', format('SELECT apikeys._revoke_owned(%L, NULL, NULL)', k_other)) AS owned_without_owner,
       pg_temp.try_as('apikeys_app', format('SELECT apikeys._revoke(%L, NULL, NULL)', k_other)) AS any_owner_body,
       pg_temp.try_as('apikeys_app', format('SELECT * FROM apikeys._rotate_call(%L, NULL, %L)', k_other, '0')) AS rotate_dispatch,
       pg_temp.try_as('apikeys_app', format('SELECT * FROM apikeys._usage_call(NULL, current_date, current_date, %L)', k_other)) AS usage_dispatch
  FROM fx WHERE role = 'apikeys_app';
-- Every internal function apikeys_app may execute: the _owned forms (which
-- refuse a NULL owner), the dispatchers and _require_admin; none of the
-- bodies that act on any owner's keys.
SELECT p.oid::regprocedure AS app_executes
  FROM pg_proc p
 WHERE p.pronamespace = 'apikeys'::regnamespace AND p.proname LIKE '\_%'
   AND has_function_privilege('apikeys_app', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;

-- The messages of the owner-scoping refusals.
SELECT k4 AS app_k4 FROM fx WHERE role = 'apikeys_app' \gset
SET ROLE apikeys_app;
SELECT pg_temp.try(format('SELECT apikeys.revoke(%L)', :'app_k4')) AS revoke_no_owner;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L)', :'app_k4')) AS rotate_no_owner;
SELECT pg_temp.try($$SELECT apikeys.revoke_all('role-apikeys_app')$$) AS revoke_all;
RESET ROLE;

-- The other owner's key survived every attempt.
SELECT count(*) FILTER (WHERE revoked_at IS NULL AND replaced_by IS NULL) AS victim_intact
  FROM apikeys.keys WHERE owner = 'role-victim';

-- created_by and revoked_by record the calling role, or apikeys.actor.
SELECT k.created_by, k.revoked_by FROM apikeys.keys k, fx
 WHERE fx.role = 'apikeys_app' AND k.id = fx.k1;
SET ROLE apikeys_app;
SET apikeys.actor = 'alice@example.com';
SELECT key_id AS actor_key FROM apikeys.create_key('role-apikeys_app', 'by alice') \gset
SELECT apikeys.revoke(:'actor_key', 'role-apikeys_app') IS NOT NULL;
RESET apikeys.actor;
RESET ROLE;
SELECT created_by, revoked_by FROM apikeys.keys WHERE id = :'actor_key';
-- An actor is recorded up to its first 200 characters.
SELECT set_config('apikeys.actor', repeat(U&'\+01F600', 300), false) IS NOT NULL AS long_actor_set;
SELECT key_id AS long_actor_key FROM apikeys.create_key('role-apikeys_app', 'by a long actor') \gset
RESET apikeys.actor;
SELECT length(created_by) AS created_by_chars, created_by = repeat(U&'\+01F600', 200) AS first_200
  FROM apikeys.keys WHERE id = :'long_actor_key';
SELECT length(actor) AS audit_actor_chars FROM apikeys.audit_log
 WHERE key_id = :'long_actor_key' AND event = 'key_created';

-- A maintenance command runs a table's index functions as the table's
-- owner, whoever runs it.  A superuser's REINDEX or ANALYZE (autovacuum's
-- too) lends a function that apikeys_app put in an index no right to omit
-- an owner: it gets 42501, and the other owner's key stays as it was.
SELECT key_id AS trap_victim FROM apikeys.create_key('role-trap-victim', 'target of a maintenance trap') \gset
CREATE SCHEMA rg_trap AUTHORIZATION apikeys_app;
SET ROLE apikeys_app;
CREATE FUNCTION rg_trap.revoke_victim(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF current_setting('rg_trap.victim', true) <> '' THEN
        PERFORM apikeys.revoke(current_setting('rg_trap.victim')::uuid);
    END IF;
    RETURN x;
END $$;
CREATE TABLE rg_trap.t (x int);
INSERT INTO rg_trap.t VALUES (1), (2);
CREATE INDEX ON rg_trap.t (rg_trap.revoke_victim(x));
RESET ROLE;
SELECT set_config('rg_trap.victim', :'trap_victim', false) IS NOT NULL AS trap_armed;
SELECT pg_temp.try('REINDEX TABLE rg_trap.t') AS reindex_trap,
       pg_temp.try('ANALYZE rg_trap.t') AS analyze_trap;
SELECT set_config('rg_trap.victim', '', false) = '' AS trap_disarmed;
SELECT revoked_at IS NULL AS trap_victim_intact FROM apikeys.keys WHERE id = :'trap_victim';

-- Outside maintenance commands too, a function apikeys_app owns runs as
-- apikeys_app, as PostgreSQL runs it: a superuser's session calling one
-- that is SECURITY DEFINER lends it no right to omit an owner.
SET ROLE apikeys_app;
CREATE FUNCTION rg_trap.revoke_any(k uuid) RETURNS timestamptz
    LANGUAGE sql SECURITY DEFINER AS $$ SELECT apikeys.revoke(k) $$;
RESET ROLE;
SELECT pg_temp.try(format('SELECT rg_trap.revoke_any(%L)', :'trap_victim')) AS definer_trap;
SELECT revoked_at IS NULL AS trap_victim_intact FROM apikeys.keys WHERE id = :'trap_victim';
-- The other way round: apikeys_admin's SECURITY DEFINER function runs as
-- apikeys_admin whoever calls it, so it may omit the owner for apikeys_app.
GRANT CREATE ON SCHEMA rg_trap TO apikeys_admin;
SET ROLE apikeys_admin;
CREATE FUNCTION rg_trap.admin_revoke(k uuid) RETURNS timestamptz
    LANGUAGE sql SECURITY DEFINER AS $$ SELECT apikeys.revoke(k, NULL, 'by an admin''s function') $$;
RESET ROLE;
SET ROLE apikeys_app;
SELECT rg_trap.admin_revoke(:'trap_victim') IS NOT NULL AS revoked_through_admin_function;
RESET ROLE;
SELECT revoke_reason FROM apikeys.keys WHERE id = :'trap_victim';
DROP SCHEMA rg_trap CASCADE;
