-- apikeys 1.1: API keys inside PostgreSQL.
--
-- This is sql/apikeys.sql, the source of the install script of the version
-- being built: the build copies it to sql/apikeys--<version>.sql (the
-- version is default_version in apikeys.control), the file CREATE EXTENSION
-- runs.  Edit this file, never the copy.  README.md documents every object.
-- Released versions' scripts are never edited: what changes after a release
-- goes here and into an upgrade script (sql/apikeys--1.0--1.1.sql), and
-- test/tap/008_upgrade.pl proves the two install the same objects.
--
-- Sections, in order:
--    1. The schema: refuse one that is unsafe to install into.
--    2. Roles: apikeys_admin, apikeys_app, apikeys_worker.
--    3. Types: apikey and its functions; the rows verify(), authenticate()
--       and the key-management functions (key_info) return.
--    4. Who is acting: functions the tables' defaults call.
--    5. Tables: plans, owners, keys, key_usage, audit_log, _audit_chain_lock.
--    6. Internal functions: the library's, argument checks, plan limits,
--       the audit chain.
--    7. Public functions, with _rotate, _pending_usage, _key_info and _usage
--       beside their callers.
--    8. Trigger functions.
--    9. Triggers.
--   10. Privileges.
-- Each object's COMMENT follows it.
--
-- Qualification: every SQL and PL/pgSQL function pins
-- search_path = pg_catalog, pg_temp.  pg_catalog is searched first there,
-- and pg_temp never for functions or operators, so their bodies call
-- built-in functions and operators unqualified.  Wherever no path is
-- pinned (the DO blocks below, column defaults, CHECK constraints) built-ins
-- are written pg_catalog.f() and OPERATOR(pg_catalog.=).  The extension's
-- own tables, types and functions are always written apikeys.name: schema
-- apikeys is on no pinned path.

\echo Use "CREATE EXTENSION apikeys" to load this file. \quit

------------------------------------------------------------------------------
-- 1. The schema.  CREATE EXTENSION made it, or it was made for us.  Refuse
-- one that a role other than a superuser owns, or that anything already
-- sits in: its owner could add objects beside ours (a verify(varchar) that
-- captures tokens) or drop them all.
------------------------------------------------------------------------------
DO $schema$
DECLARE
    v_owner name;
    v_super boolean;
    v_grantee name;
BEGIN
    SELECT r.rolname, r.rolsuper INTO v_owner, v_super
      FROM pg_catalog.pg_namespace n
      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
     WHERE n.nspname OPERATOR(pg_catalog.=) 'apikeys';
    IF NOT v_super THEN
        RAISE EXCEPTION 'schema "apikeys" is owned by role "%"', v_owner
            USING ERRCODE = 'duplicate_schema',
                  DETAIL = 'apikeys installs only into a schema that a superuser owns, that holds nothing and that no other role may create objects in.',
                  HINT = 'Drop the schema, or make a superuser its owner after checking what it holds, then run CREATE EXTENSION again.';
    END IF;
    SELECT r.rolname INTO v_grantee
      FROM pg_catalog.pg_namespace n,
           LATERAL pg_catalog.aclexplode(n.nspacl) a
      LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.grantee
     WHERE n.nspname OPERATOR(pg_catalog.=) 'apikeys'
       AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
       AND a.grantee OPERATOR(pg_catalog.<>) n.nspowner
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'schema "apikeys" lets role "%" create objects in it', COALESCE(v_grantee, 'public')
            USING ERRCODE = 'duplicate_schema',
                  DETAIL = 'apikeys installs only into a schema that a superuser owns, that holds nothing and that no other role may create objects in.',
                  HINT = 'Revoke CREATE on the schema from every role but its owner, then run CREATE EXTENSION again.';
    END IF;
    -- Every object in a schema depends on it; so does this extension itself.
    IF EXISTS (SELECT FROM pg_catalog.pg_depend d
                WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass
                  AND d.refobjid OPERATOR(pg_catalog.=) 'apikeys'::pg_catalog.regnamespace
                  AND NOT (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                           AND d.objid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e
                                                               WHERE e.extname OPERATOR(pg_catalog.=) 'apikeys'))) THEN
        RAISE EXCEPTION 'schema "apikeys" is not empty'
            USING ERRCODE = 'duplicate_schema',
                  DETAIL = 'apikeys installs only into a schema that a superuser owns, that holds nothing and that no other role may create objects in.',
                  HINT = 'Move or drop what the schema holds, then run CREATE EXTENSION again.';
    END IF;
END
$schema$;

------------------------------------------------------------------------------
-- 2. Roles: created if absent; DBAs grant the first two to login roles.
-- apikeys_worker is the role the background workers write as: no one logs
-- in as it, and it holds only what writing queued records needs.
------------------------------------------------------------------------------
DO $roles$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['apikeys_admin', 'apikeys_app', 'apikeys_worker'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) v_role) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;
END
$roles$;

------------------------------------------------------------------------------
-- 3. Types.
------------------------------------------------------------------------------

-- The apikey type: a well-formed token, binary-compatible with text.
CREATE TYPE apikeys.apikey;

CREATE FUNCTION apikeys.apikey_in(cstring) RETURNS apikeys.apikey
    AS 'MODULE_PATHNAME', 'apikey_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.apikey_in(cstring) IS 'Input of apikey: checks format and checksum.';
CREATE FUNCTION apikeys.apikey_out(apikeys.apikey) RETURNS cstring
    AS 'MODULE_PATHNAME', 'apikey_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.apikey_out(apikeys.apikey) IS 'Output of apikey.';
CREATE FUNCTION apikeys.apikey_recv(internal) RETURNS apikeys.apikey
    AS 'MODULE_PATHNAME', 'apikey_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.apikey_recv(internal) IS 'Binary input of apikey: checks format and checksum.';
CREATE FUNCTION apikeys.apikey_send(apikeys.apikey) RETURNS bytea
    AS 'MODULE_PATHNAME', 'apikey_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.apikey_send(apikeys.apikey) IS 'Binary output of apikey.';

CREATE TYPE apikeys.apikey (
    INPUT = apikeys.apikey_in,
    OUTPUT = apikeys.apikey_out,
    RECEIVE = apikeys.apikey_recv,
    SEND = apikeys.apikey_send,
    INTERNALLENGTH = VARIABLE,
    STORAGE = plain,
    CATEGORY = 'S',
    COLLATABLE = false
);
COMMENT ON TYPE apikeys.apikey IS 'A well-formed API key token: <prefix>_<secret><check>.';

-- Same bytes as text, so the cast to text is free; text to apikey goes
-- through the validating input function.
CREATE CAST (apikeys.apikey AS text) WITHOUT FUNCTION AS IMPLICIT;

-- Taking a token apart; is_well_formed tests text without raising.
CREATE FUNCTION apikeys.prefix(apikeys.apikey) RETURNS text
    AS 'MODULE_PATHNAME', 'apikey_prefix' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.prefix(apikeys.apikey) IS 'The prefix of a token, e.g. ak_live.';
CREATE FUNCTION apikeys.start(apikeys.apikey) RETURNS text
    AS 'MODULE_PATHNAME', 'apikey_start' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.start(apikeys.apikey) IS 'The prefix, "_" and the first four secret characters: the only part shown after creation.';
CREATE FUNCTION apikeys.digest(apikeys.apikey) RETURNS bytea
    AS 'MODULE_PATHNAME', 'apikey_digest' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.digest(apikeys.apikey) IS 'BLAKE2b-256 of the whole token, as stored in apikeys.keys.digest.';
CREATE FUNCTION apikeys.is_well_formed(text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'apikey_is_well_formed' LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikeys.is_well_formed(text) IS 'Whether the text is a well-formed token (format and checksum); never raises.';

-- The hot path returns one row, not a set, of a named row type rather than
-- OUT parameters: the executor takes a row type's descriptor from the type
-- cache, where OUT parameters are decoded from pg_proc on every execution.
CREATE TYPE apikeys.verify_result AS (
    valid boolean, code text, key_id uuid, owner text, name text,
    scopes text[], metadata jsonb, expires_at timestamptz,
    ratelimit_limit integer, ratelimit_remaining integer, ratelimit_reset timestamptz,
    credits_remaining bigint);
COMMENT ON TYPE apikeys.verify_result IS 'The row verify() returns.';
COMMENT ON COLUMN apikeys.verify_result.valid IS 'Whether the token was accepted: code is VALID.';
COMMENT ON COLUMN apikeys.verify_result.code IS 'VALID, API_KEY_INVALID, API_KEY_REVOKED, API_KEY_EXPIRED, API_KEY_DISABLED, IP_NOT_ALLOWED, INSUFFICIENT_SCOPE, RATE_LIMITED or USAGE_EXCEEDED.';
COMMENT ON COLUMN apikeys.verify_result.key_id IS 'The key the token belongs to; NULL for API_KEY_INVALID.';
COMMENT ON COLUMN apikeys.verify_result.owner IS 'The key''s owner; NULL for API_KEY_INVALID.';
COMMENT ON COLUMN apikeys.verify_result.name IS 'The key''s name; NULL for API_KEY_INVALID.';
COMMENT ON COLUMN apikeys.verify_result.scopes IS 'The key''s granted scopes; NULL for API_KEY_INVALID.';
COMMENT ON COLUMN apikeys.verify_result.metadata IS 'The key''s metadata; NULL for API_KEY_INVALID.';
COMMENT ON COLUMN apikeys.verify_result.expires_at IS 'The key''s expiry; NULL when it never expires, and for API_KEY_INVALID.';
COMMENT ON COLUMN apikeys.verify_result.ratelimit_limit IS 'The rate limit (requests per minute) that leaves the fewest requests: the key''s rate_limit or its plan''s owner-wide one; NULL when neither applied.';
COMMENT ON COLUMN apikeys.verify_result.ratelimit_remaining IS 'Requests that limit would let the key make right now without being RATE_LIMITED; NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.verify_result.ratelimit_reset IS 'When ratelimit_remaining is 0, when the next request will pass (Retry-After); otherwise when the whole burst is available again. NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.verify_result.credits_remaining IS 'Credits the key has left after this call; NULL for a key without a credit limit, and before its key was found.';

CREATE TYPE apikeys.authenticate_result AS (
    key_id uuid, owner text, name text, scopes text[], metadata jsonb,
    ratelimit_limit integer, ratelimit_remaining integer, ratelimit_reset timestamptz,
    credits_remaining bigint);
COMMENT ON TYPE apikeys.authenticate_result IS 'The row authenticate() returns.';
COMMENT ON COLUMN apikeys.authenticate_result.key_id IS 'The accepted key.';
COMMENT ON COLUMN apikeys.authenticate_result.owner IS 'The key''s owner.';
COMMENT ON COLUMN apikeys.authenticate_result.name IS 'The key''s name.';
COMMENT ON COLUMN apikeys.authenticate_result.scopes IS 'The key''s granted scopes.';
COMMENT ON COLUMN apikeys.authenticate_result.metadata IS 'The key''s metadata.';
COMMENT ON COLUMN apikeys.authenticate_result.ratelimit_limit IS 'The rate limit (requests per minute) that leaves the fewest requests: the key''s rate_limit or its plan''s owner-wide one; NULL when neither applied.';
COMMENT ON COLUMN apikeys.authenticate_result.ratelimit_remaining IS 'Requests that limit would let the key make right now without being RATE_LIMITED; NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.authenticate_result.ratelimit_reset IS 'When ratelimit_remaining is 0, when the next request will pass (Retry-After); otherwise when the whole burst is available again. NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.authenticate_result.credits_remaining IS 'Credits the key has left after this call; NULL for a key without a credit limit, and before its key was found.';

CREATE TYPE apikeys.key_info AS (
    key_id uuid, name text, start text, scopes text[], status text,
    created_at timestamptz, expires_at timestamptz, revoked_at timestamptz,
    last_used_at timestamptz, requests_today bigint, failures_today bigint,
    prefix text, metadata jsonb, rate_limit integer, revoke_reason text,
    rotated_from uuid, replaced_by uuid, error_rate_today double precision,
    disabled_at timestamptz, disable_reason text, allowed_ips cidr[],
    alert_requests_per_minute integer, rate_burst integer,
    credits bigint, credits_refill_amount bigint, credits_refill_interval text);
COMMENT ON TYPE apikeys.key_info IS 'One key''s public row, as get_key, list_keys and update_key return it: never a digest or token.';
COMMENT ON COLUMN apikeys.key_info.key_id IS 'Key id.';
COMMENT ON COLUMN apikeys.key_info.name IS 'The key''s label.';
COMMENT ON COLUMN apikeys.key_info.start IS 'Prefix, "_" and the first four secret characters.';
COMMENT ON COLUMN apikeys.key_info.scopes IS 'Granted scopes.';
COMMENT ON COLUMN apikeys.key_info.status IS 'revoked, expired, disabled, rotating or active (the first that applies).';
COMMENT ON COLUMN apikeys.key_info.created_at IS 'When the key was created.';
COMMENT ON COLUMN apikeys.key_info.expires_at IS 'When the key expires (NULL: never); for a rotating key, the end of its grace.';
COMMENT ON COLUMN apikeys.key_info.revoked_at IS 'When the key was revoked (NULL: not revoked).';
COMMENT ON COLUMN apikeys.key_info.last_used_at IS 'The key''s last VALID answer, including counts not yet written.';
COMMENT ON COLUMN apikeys.key_info.requests_today IS 'VALID answers this UTC day, including counts not yet written.';
COMMENT ON COLUMN apikeys.key_info.failures_today IS 'Refusals of the key this UTC day, including counts not yet written.';
COMMENT ON COLUMN apikeys.key_info.prefix IS 'The token''s prefix.';
COMMENT ON COLUMN apikeys.key_info.metadata IS 'Application data.';
COMMENT ON COLUMN apikeys.key_info.rate_limit IS 'Allowed requests per minute; NULL: no limit.';
COMMENT ON COLUMN apikeys.key_info.revoke_reason IS 'Why the key was revoked.';
COMMENT ON COLUMN apikeys.key_info.rotated_from IS 'The key this one replaced in a rotation.';
COMMENT ON COLUMN apikeys.key_info.replaced_by IS 'The key that replaced this one in a rotation.';
COMMENT ON COLUMN apikeys.key_info.error_rate_today IS 'failures_today / (requests_today + failures_today); NULL when both are zero.';
COMMENT ON COLUMN apikeys.key_info.disabled_at IS 'When the key was disabled (NULL: not disabled).';
COMMENT ON COLUMN apikeys.key_info.disable_reason IS 'Why the key was disabled.';
COMMENT ON COLUMN apikeys.key_info.allowed_ips IS 'Client networks the key may be used from; NULL: any.';
COMMENT ON COLUMN apikeys.key_info.alert_requests_per_minute IS 'The key''s own usage-alert threshold; NULL: its plan''s.';
COMMENT ON COLUMN apikeys.key_info.rate_burst IS 'Requests the key may make ahead of its rate_limit pace; NULL: rate_limit - 1.';
COMMENT ON COLUMN apikeys.key_info.credits IS 'Credits the key has left now, spending not yet written included; NULL: no credit limit.';
COMMENT ON COLUMN apikeys.key_info.credits_refill_amount IS 'What the key''s credits are set to at the start of each refill period; NULL: no refill.';
COMMENT ON COLUMN apikeys.key_info.credits_refill_interval IS 'The refill period, a UTC day or month; NULL: no refill.';

------------------------------------------------------------------------------
-- 4. Who is acting.  Before the tables: apikeys.keys.created_by defaults to
-- apikeys._actor().
------------------------------------------------------------------------------

-- The role that called into apikeys.  Inside a SECURITY DEFINER function
-- current_user is the extension's owner, so this reads the session's role:
-- the one set by SET ROLE, else the login role.
CREATE FUNCTION apikeys._caller() RETURNS name
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN current_setting('role') = 'none'
                THEN session_user
                ELSE current_setting('role')::name END
$$;
COMMENT ON FUNCTION apikeys._caller() IS 'Internal: the role that called into apikeys (SET ROLE role, else session user).';

-- apikeys.actor when the application sets it (its first 200 characters),
-- else the calling role.
CREATE FUNCTION apikeys._actor() RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT COALESCE(left(NULLIF(current_setting('apikeys.actor', true), ''), 200),
                    apikeys._caller()::text)
$$;
COMMENT ON FUNCTION apikeys._actor() IS 'Internal: apikeys.actor if set, else the calling role.';

------------------------------------------------------------------------------
-- 5. Tables.  Only the digest of a token is stored, never the token.
------------------------------------------------------------------------------
CREATE TABLE apikeys.plans (
    name        text PRIMARY KEY CHECK (pg_catalog.length(name) OPERATOR(pg_catalog.<=) 63),
    max_keys    integer CHECK (max_keys IS NULL OR max_keys OPERATOR(pg_catalog.>=) 0),
    description text CHECK (pg_catalog.length(description) OPERATOR(pg_catalog.<=) 1000),
    max_key_lifetime interval
        CHECK (max_key_lifetime OPERATOR(pg_catalog.>) '0'::interval),
    alert_requests_per_minute integer
        CHECK (alert_requests_per_minute OPERATOR(pg_catalog.>=) 0),
    rate_limit  integer CHECK (rate_limit OPERATOR(pg_catalog.>) 0)
);
COMMENT ON TABLE apikeys.plans IS 'Plans and how many active keys each allows (NULL: unlimited).';
COMMENT ON COLUMN apikeys.plans.name IS 'Plan name: 1 to 63 characters, not blank, no control characters.';
COMMENT ON COLUMN apikeys.plans.max_keys IS 'Most active keys an owner on this plan may hold; NULL: unlimited.';
COMMENT ON COLUMN apikeys.plans.description IS 'Free text, at most 1000 characters.';
COMMENT ON COLUMN apikeys.plans.max_key_lifetime IS 'Longest a key of this plan may live: created and rotated keys expire no later than this after their creation; NULL: no limit.';
COMMENT ON COLUMN apikeys.plans.alert_requests_per_minute IS 'Usage-alert threshold for this plan''s keys (0: off); NULL: apikeys.alert_requests_per_minute.';
COMMENT ON COLUMN apikeys.plans.rate_limit IS 'Requests per minute an owner on this plan may make across all its keys (burst: one minute''s worth), enforced with the preload; NULL: no owner-wide limit.';

-- The seeded plans; apikeys_admin may add, change and delete plans.
INSERT INTO apikeys.plans (name, max_keys, description) VALUES
    ('free', 1, 'One active key.'),
    ('developer', 5, 'Up to five active keys.'),
    ('pro', 20, 'Up to twenty active keys.'),
    ('enterprise', NULL, 'Unlimited active keys.');

CREATE TABLE apikeys.owners (
    owner       text PRIMARY KEY CHECK (pg_catalog.length(owner) OPERATOR(pg_catalog.<=) 200),
    plan        text NOT NULL REFERENCES apikeys.plans (name) ON UPDATE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE apikeys.owners IS 'Owners (the application''s users, accounts or tenants) and their plans.';
COMMENT ON COLUMN apikeys.owners.owner IS 'The application''s id of the user, account or tenant; at most 200 characters.';
COMMENT ON COLUMN apikeys.owners.plan IS 'The owner''s plan.';
COMMENT ON COLUMN apikeys.owners.created_at IS 'When the row was created: at the owner''s first key or first set_plan.';
COMMENT ON COLUMN apikeys.owners.updated_at IS 'When apikeys last took the owner''s row lock (set_plan, revoke_all, rotate, a key counted against a limited plan).';

CREATE TABLE apikeys.keys (
    id            uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    owner         text NOT NULL REFERENCES apikeys.owners (owner),
    name          text NOT NULL
                  CHECK (pg_catalog.length(name) OPERATOR(pg_catalog.>=) 1
                         AND pg_catalog.length(name) OPERATOR(pg_catalog.<=) 200),
    prefix        text NOT NULL,
    start         text NOT NULL,
    digest        bytea NOT NULL UNIQUE
                  CHECK (pg_catalog.octet_length(digest) OPERATOR(pg_catalog.=) 32),
    scopes        text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}',
    rate_limit    integer CHECK (rate_limit OPERATOR(pg_catalog.>) 0),
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by    text NOT NULL DEFAULT apikeys._actor(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    revoked_by    text,
    revoke_reason text CHECK (pg_catalog.length(revoke_reason) OPERATOR(pg_catalog.<=) 1000),
    rotated_from  uuid,
    replaced_by   uuid,
    disabled_at   timestamptz,
    disabled_by   text,
    disable_reason text
                  CHECK (pg_catalog.length(disable_reason) OPERATOR(pg_catalog.<=) 1000),
    allowed_ips   cidr[]
                  CHECK (pg_catalog.cardinality(allowed_ips) OPERATOR(pg_catalog.<=) 64),
    alert_requests_per_minute integer
                  CHECK (alert_requests_per_minute OPERATOR(pg_catalog.>=) 0),
    rate_burst    integer
                  CHECK (rate_burst OPERATOR(pg_catalog.>=) 0
                         AND rate_burst OPERATOR(pg_catalog.<=) 1000000),
    credits       bigint CHECK (credits OPERATOR(pg_catalog.>=) 0),
    credits_refill_amount bigint
                  CHECK (credits_refill_amount OPERATOR(pg_catalog.>) 0),
    credits_refill_interval text
                  CHECK (credits_refill_interval OPERATOR(pg_catalog.=) ANY (ARRAY['day', 'month'])),
    credits_period integer NOT NULL DEFAULT 0,
    credits_gen   bigint NOT NULL DEFAULT 0,
    CONSTRAINT keys_credits_refill_check CHECK (
        (credits_refill_amount IS NULL) OPERATOR(pg_catalog.=) (credits_refill_interval IS NULL)
        AND (credits_refill_amount IS NULL OR credits IS NOT NULL))
) WITH (fillfactor = 80);
COMMENT ON TABLE apikeys.keys IS 'Every key ever issued; only the digest of a token is stored. Rows are never deleted.';
COMMENT ON COLUMN apikeys.keys.id IS 'Key id.';
COMMENT ON COLUMN apikeys.keys.owner IS 'The key''s owner.';
COMMENT ON COLUMN apikeys.keys.name IS 'Label: 1 to 200 characters, not blank, no control characters.';
COMMENT ON COLUMN apikeys.keys.prefix IS 'The token''s prefix, e.g. ak_live.';
COMMENT ON COLUMN apikeys.keys.start IS 'Prefix, "_" and the first four secret characters.';
COMMENT ON COLUMN apikeys.keys.digest IS 'BLAKE2b-256 of the whole token.';
COMMENT ON COLUMN apikeys.keys.scopes IS 'Granted scopes: at most 64, each 1 to 128 characters.';
COMMENT ON COLUMN apikeys.keys.metadata IS 'Application data that verify and authenticate return: a JSON object of at most 8192 bytes.';
COMMENT ON COLUMN apikeys.keys.rate_limit IS 'Allowed requests per minute, enforced with the preload; NULL: no limit.';
COMMENT ON COLUMN apikeys.keys.created_at IS 'When the key was created.';
COMMENT ON COLUMN apikeys.keys.created_by IS 'Who created the key: apikeys.actor, else the calling role.';
COMMENT ON COLUMN apikeys.keys.expires_at IS 'When the key expires (NULL: never); for a rotating key, the end of its grace.';
COMMENT ON COLUMN apikeys.keys.revoked_at IS 'When the key was revoked (NULL: not revoked).';
COMMENT ON COLUMN apikeys.keys.revoked_by IS 'Who revoked the key: apikeys.actor, else the calling role.';
COMMENT ON COLUMN apikeys.keys.revoke_reason IS 'Why the key was revoked (rotated: a rotation without grace; leaked: revoke_token''s default); at most 1000 characters.';
COMMENT ON COLUMN apikeys.keys.rotated_from IS 'The key this one replaced in a rotation.';
COMMENT ON COLUMN apikeys.keys.replaced_by IS 'The key that replaced this one in a rotation.';
COMMENT ON COLUMN apikeys.keys.disabled_at IS 'When disable_key suspended the key (NULL: not disabled); enable_key clears it.';
COMMENT ON COLUMN apikeys.keys.disabled_by IS 'Who disabled the key: apikeys.actor, else the calling role.';
COMMENT ON COLUMN apikeys.keys.disable_reason IS 'Why the key was disabled; at most 1000 characters.';
COMMENT ON COLUMN apikeys.keys.allowed_ips IS 'Client addresses the key may be used from (at most 64 networks); NULL: any address.';
COMMENT ON COLUMN apikeys.keys.alert_requests_per_minute IS 'Usage-alert threshold of this key (0: off); NULL: its plan''s.';
COMMENT ON COLUMN apikeys.keys.rate_burst IS 'Requests the key may make ahead of its rate_limit pace (0 to 1000000): in any 60 seconds it passes at most rate_limit + rate_burst; NULL: rate_limit - 1, a whole minute''s requests at once.';
COMMENT ON COLUMN apikeys.keys.credits IS 'Credits left as of the last write (0 to 10^15); spending not yet written by the worker is in shared memory (get_key and list_keys count it). NULL: no credit limit.';
COMMENT ON COLUMN apikeys.keys.credits_refill_amount IS 'What credits are set to at the start of each refill period (1 to 10^15); NULL: no refill.';
COMMENT ON COLUMN apikeys.keys.credits_refill_interval IS 'The refill period: day or month, UTC; NULL: no refill.';
COMMENT ON COLUMN apikeys.keys.credits_period IS 'The refill period credits belongs to (UTC days or months since 1970; 0 without refill): in a later one the balance is credits_refill_amount again.';
COMMENT ON COLUMN apikeys.keys.credits_gen IS 'Bumped by every change of credits or refill other than the worker''s writing of spent credits: verify then reloads the balance it keeps in shared memory.';

-- list_keys (its keyset cursor is (created_at, id)), revoke_all; the partial
-- index keeps the plan-limit count cheap for owners with many revoked or
-- rotated keys.
CREATE INDEX keys_owner_created_idx ON apikeys.keys (owner, created_at, id);
CREATE INDEX keys_owner_live_idx ON apikeys.keys (owner)
    WHERE revoked_at IS NULL AND replaced_by IS NULL;
-- verify's probe: a hash index finds a digest in a bucket page (and its
-- overflow page where inserts overflowed the bucket: about 7% of lookups
-- at a million keys), where the unique B-tree (which keeps digests
-- unique) descends three levels.  Hash codes can collide, so verify
-- compares the digest.
CREATE INDEX keys_digest_hash ON apikeys.keys USING hash (digest);
COMMENT ON INDEX apikeys.keys_digest_hash IS 'The index verify and authenticate probe (a bucket page, or two where the bucket overflowed); keys_digest_key keeps digests unique.';
-- Pages of list_keys filtered to the rarer statuses read only those keys.
CREATE INDEX keys_owner_revoked_idx ON apikeys.keys (owner, created_at, id)
    WHERE revoked_at IS NOT NULL;
CREATE INDEX keys_owner_disabled_idx ON apikeys.keys (owner, created_at, id)
    WHERE revoked_at IS NULL AND disabled_at IS NOT NULL;
CREATE INDEX keys_owner_rotating_idx ON apikeys.keys (owner, created_at, id)
    WHERE revoked_at IS NULL AND replaced_by IS NOT NULL;

-- Written only by the background workers, which add counts of keys that
-- exist (keys are never deleted).  No foreign key: its check would lock a
-- keys row for every count written, on the busiest write path there is.
-- Rows are updated at every flush, so pages keep room for HOT updates.
CREATE TABLE apikeys.key_usage (
    key_id       uuid NOT NULL,
    day          date NOT NULL,
    requests     bigint NOT NULL DEFAULT 0,
    failures     bigint NOT NULL DEFAULT 0,
    last_used_at timestamptz,
    PRIMARY KEY (key_id, day)
) WITH (fillfactor = 70);
COMMENT ON TABLE apikeys.key_usage IS 'Per key and UTC day: successful and refused verifications.';
COMMENT ON COLUMN apikeys.key_usage.key_id IS 'The key (an apikeys.keys id; no foreign key).';
COMMENT ON COLUMN apikeys.key_usage.day IS 'The UTC day counted.';
COMMENT ON COLUMN apikeys.key_usage.requests IS 'VALID answers for the key that day.';
COMMENT ON COLUMN apikeys.key_usage.failures IS 'Refusals of the key that day: revoked, expired, insufficient scope or rate limited.';
COMMENT ON COLUMN apikeys.key_usage.last_used_at IS 'Time of the key''s last VALID answer that day.';

-- Append-only and hash-chained: the triggers of section 9 chain every new
-- row (id, prev_hash, hash) and refuse UPDATE, DELETE and TRUNCATE.
CREATE TABLE apikeys.audit_log (
    id          bigint PRIMARY KEY,
    at          timestamptz NOT NULL,
    event       text NOT NULL,
    key_id      uuid,
    owner       text,
    actor       text,
    db_user     name,
    client_addr inet,
    details     jsonb NOT NULL DEFAULT '{}',
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL
);
COMMENT ON TABLE apikeys.audit_log IS 'Append-only, hash-chained record of every key change and of refused verifications.';
COMMENT ON COLUMN apikeys.audit_log.id IS 'Position in the chain: 1, 2, 3, ... without gaps (a purge removes a prefix).';
COMMENT ON COLUMN apikeys.audit_log.at IS 'now() of the writing transaction; for records a worker writes, the start of their minute.';
COMMENT ON COLUMN apikeys.audit_log.event IS 'What happened, e.g. key_created, key_revoked, verify_failed (README.md lists every event).';
COMMENT ON COLUMN apikeys.audit_log.key_id IS 'The key, if any.';
COMMENT ON COLUMN apikeys.audit_log.owner IS 'The owner, if any.';
COMMENT ON COLUMN apikeys.audit_log.actor IS 'apikeys.actor (its first 200 characters), else the calling role.';
COMMENT ON COLUMN apikeys.audit_log.db_user IS 'The calling role: the SET ROLE role, else the session user.';
COMMENT ON COLUMN apikeys.audit_log.client_addr IS 'inet_client_addr() of the writing session; NULL over a Unix socket and for records a worker writes.';
COMMENT ON COLUMN apikeys.audit_log.details IS 'Event details; NULL values are left out.';
COMMENT ON COLUMN apikeys.audit_log.prev_hash IS 'hash of the row before (32 zero bytes for the first).';
COMMENT ON COLUMN apikeys.audit_log.hash IS 'BLAKE2b-256 of prev_hash followed by apikeys._audit_payload(row).';
CREATE INDEX audit_log_key_idx ON apikeys.audit_log (key_id);
CREATE INDEX audit_log_owner_at_idx ON apikeys.audit_log (owner, at);

-- The audit chain's lock: a writer locks this one row until it commits, so
-- rows chain one at a time.  Locking a row takes UPDATE on its table, which
-- no role but the extension's owner holds; an advisory lock, which any role
-- that can connect may take and keep, would let that role stop every key
-- change.  Not dumped: the install script writes the row.
CREATE TABLE apikeys._audit_chain_lock (
    id integer PRIMARY KEY CHECK (id OPERATOR(pg_catalog.=) 1)
);
COMMENT ON TABLE apikeys._audit_chain_lock IS 'Internal: one row whose lock serialises writers of the audit chain.';
COMMENT ON COLUMN apikeys._audit_chain_lock.id IS 'Always 1: the one row.';
INSERT INTO apikeys._audit_chain_lock VALUES (1);

-- Rows of these tables are dumped (pg_dump, pg_restore); the chain lock's is
-- not: this script writes it.
SELECT pg_catalog.pg_extension_config_dump('apikeys.plans', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.owners', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.keys', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.key_usage', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.audit_log', '');

------------------------------------------------------------------------------
-- 6. Internal functions: no role is granted EXECUTE on them, but for those
-- that decide who may omit an owner (section 7).  First those the library
-- implements.
------------------------------------------------------------------------------

-- A fresh token (NULL prefix: apikeys.default_prefix).
CREATE FUNCTION apikeys._new_token(text) RETURNS apikeys.apikey
    AS 'MODULE_PATHNAME', 'apikey_generate' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION apikeys._new_token(text) IS 'Internal: a fresh token from the CSPRNG.';

-- apikeys.default_plan as the loaded library sees it.
CREATE FUNCTION apikeys._default_plan() RETURNS text
    AS 'MODULE_PATHNAME', 'apikeys_default_plan_name' LANGUAGE C STABLE;
COMMENT ON FUNCTION apikeys._default_plan() IS 'Internal: the apikeys.default_plan setting.';

-- Whether the row a trigger sees arrives from a restore: a superuser's
-- COPY ... FROM into that very table, named with its schema, as pg_restore
-- and pg_dump's scripts write it.  Such rows are kept as they were dumped:
-- limits are not re-judged and no audit row is added.  No setting anyone
-- can give a session makes another write look like one.
CREATE FUNCTION apikeys._restoring(regclass) RETURNS boolean
    AS 'MODULE_PATHNAME', 'apikeys_restoring' LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION apikeys._restoring(regclass) IS 'Internal: whether the row a trigger sees comes from a superuser''s COPY into its table (a restore).';

-- The library's superuser-only settings, read through the library: calling
-- it loads it, and loading it refuses a value that an unprivileged session
-- gave such a setting while it was still an unknown placeholder.
CREATE FUNCTION apikeys._audit_context() RETURNS text
    AS 'MODULE_PATHNAME', 'apikeys_audit_context_setting' LANGUAGE C STABLE;
COMMENT ON FUNCTION apikeys._audit_context() IS 'Internal: which apikeys function is making a change, read through the library.';
CREATE FUNCTION apikeys._max_rotation_grace() RETURNS interval
    AS 'MODULE_PATHNAME', 'apikeys_max_rotation_grace_setting' LANGUAGE C STABLE;
COMMENT ON FUNCTION apikeys._max_rotation_grace() IS 'Internal: apikeys.max_rotation_grace, read through the library.';
CREATE FUNCTION apikeys._audit_retention_min() RETURNS interval
    AS 'MODULE_PATHNAME', 'apikeys_audit_retention_min_setting' LANGUAGE C STABLE;
COMMENT ON FUNCTION apikeys._audit_retention_min() IS 'Internal: apikeys.audit_retention_min, read through the library.';

-- Argument checks shared by the public functions and the guard triggers.
CREATE FUNCTION apikeys._require_text(p_value text, p_what text, p_max integer) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_value IS NULL THEN
        RAISE EXCEPTION '% must not be null', p_what USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_value = '' THEN
        RAISE EXCEPTION '% must not be empty', p_what USING ERRCODE = 'invalid_parameter_value';
    ELSIF length(p_value) > p_max THEN
        RAISE EXCEPTION '% is longer than % characters', p_what, p_max USING ERRCODE = 'invalid_parameter_value';
    ELSIF btrim(p_value) = '' THEN
        RAISE EXCEPTION '% must not be blank', p_what USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_value ~ E'[\\x01-\\x1f\\x7f-\\x9f]' THEN
        RAISE EXCEPTION '% must not contain control characters', p_what USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION apikeys._require_text(text, text, integer) IS 'Internal: 22023 for a NULL, empty, blank, over-long or control-character argument.';

-- invalid_parameter_value (22023) unless scopes is a one-dimensional array
-- of at most 64 scopes, each 1 to 128 characters, not blank, free of control
-- characters.
CREATE FUNCTION apikeys._require_scopes(p_scopes text[]) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_scope text;
BEGIN
    IF p_scopes IS NULL THEN
        RAISE EXCEPTION 'scopes must not be null' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass an empty array for a key without scopes.';
    ELSIF array_ndims(p_scopes) > 1 THEN
        RAISE EXCEPTION 'scopes must be a one-dimensional array' USING ERRCODE = 'invalid_parameter_value';
    ELSIF cardinality(p_scopes) > 64 THEN
        RAISE EXCEPTION 'a key holds at most 64 scopes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_scope IN ARRAY p_scopes LOOP
        IF v_scope IS NULL THEN
            RAISE EXCEPTION 'scopes must not contain null elements' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM apikeys._require_text(v_scope, 'a scope', 128);
    END LOOP;
END
$$;
COMMENT ON FUNCTION apikeys._require_scopes(text[]) IS 'Internal: 22023 unless scopes are within their bounds.';

-- invalid_parameter_value (22023) unless metadata is a JSON object of at
-- most 8192 bytes as text.
CREATE FUNCTION apikeys._require_metadata(p_metadata jsonb) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_metadata IS NULL OR jsonb_typeof(p_metadata) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    ELSIF octet_length(p_metadata::text) > 8192 THEN
        RAISE EXCEPTION 'metadata is larger than 8192 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION apikeys._require_metadata(jsonb) IS 'Internal: 22023 unless metadata is a JSON object within its bound.';

-- The bounds on what a key holds, for every writer (functions and SQL alike).
CREATE FUNCTION apikeys._require_key_fields(k apikeys.keys) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM apikeys._require_text(k.name, 'name', 200);
    PERFORM apikeys._require_scopes(k.scopes);
    PERFORM apikeys._require_metadata(k.metadata);
    IF k.rate_limit <= 0 THEN
        RAISE EXCEPTION 'rate_limit must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k.rate_burst < 0 OR k.rate_burst > 1000000 THEN
        RAISE EXCEPTION 'rate_burst must be between 0 and 1000000' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL lets the key make a whole minute''s requests at once.';
    END IF;
    IF k.alert_requests_per_minute < 0 THEN
        RAISE EXCEPTION 'alert_requests_per_minute must be zero or more' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Zero turns alerts off for the key; NULL uses its plan''s threshold.';
    END IF;
    IF length(k.disable_reason) > 1000 THEN
        RAISE EXCEPTION 'reason is longer than 1000 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k.credits < 0 OR k.credits > 1000000000000000 THEN
        RAISE EXCEPTION 'credits must be between 0 and 10^15' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL means no credit limit.';
    END IF;
    IF k.credits_refill_amount <= 0 OR k.credits_refill_amount > 1000000000000000 THEN
        RAISE EXCEPTION 'credits_refill_amount must be between 1 and 10^15' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k.credits_refill_interval NOT IN ('day', 'month') THEN
        RAISE EXCEPTION 'credits_refill_interval must be day or month' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (k.credits_refill_amount IS NULL) <> (k.credits_refill_interval IS NULL) THEN
        RAISE EXCEPTION 'a refill needs both credits_refill_amount and credits_refill_interval'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k.credits_refill_amount IS NOT NULL AND k.credits IS NULL THEN
        RAISE EXCEPTION 'a refill needs credits' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A key with NULL credits has no credit limit to refill.';
    END IF;
    IF k.allowed_ips IS NOT NULL THEN
        IF array_ndims(k.allowed_ips) > 1 THEN
            RAISE EXCEPTION 'allowed_ips must be a one-dimensional array' USING ERRCODE = 'invalid_parameter_value';
        ELSIF cardinality(k.allowed_ips) = 0 THEN
            RAISE EXCEPTION 'allowed_ips must not be empty' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'NULL lets the key be used from any address.';
        ELSIF cardinality(k.allowed_ips) > 64 THEN
            RAISE EXCEPTION 'a key allows at most 64 networks' USING ERRCODE = 'invalid_parameter_value';
        ELSIF array_position(k.allowed_ips, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'allowed_ips must not contain null elements' USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
END
$$;
COMMENT ON FUNCTION apikeys._require_key_fields(apikeys.keys) IS 'Internal: the bounds on a key''s name, scopes, metadata, rate limit and burst, alert threshold, allowed networks, credits and refill.';

-- Owners and plan limits.

-- A key counts toward its owner's plan while neither revoked, rotated nor expired.
CREATE FUNCTION apikeys._counts(k apikeys.keys) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.revoked_at IS NULL AND k.replaced_by IS NULL
       AND (k.expires_at IS NULL OR k.expires_at > now())
$$;
COMMENT ON FUNCTION apikeys._counts(apikeys.keys) IS 'Internal: whether a key counts toward its owner''s plan limit.';

-- Makes sure the owner has a row (on apikeys.default_plan) and returns its plan.
CREATE FUNCTION apikeys._ensure_owner(p_owner text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_plan text;
BEGIN
    SELECT o.plan INTO v_plan FROM apikeys.owners o WHERE o.owner = p_owner;
    IF FOUND THEN
        RETURN v_plan;
    END IF;
    v_plan := apikeys._default_plan();
    IF NOT EXISTS (SELECT FROM apikeys.plans p WHERE p.name = v_plan) THEN
        RAISE EXCEPTION 'unknown plan "%"', v_plan
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'apikeys.default_plan names a plan that is not in apikeys.plans.';
    END IF;
    INSERT INTO apikeys.owners (owner, plan) VALUES (p_owner, v_plan)
        ON CONFLICT (owner) DO NOTHING;
    SELECT o.plan INTO v_plan FROM apikeys.owners o WHERE o.owner = p_owner;
    RETURN v_plan;
END
$$;
COMMENT ON FUNCTION apikeys._ensure_owner(text) IS 'Internal: creates the owner''s row on the default plan if missing; returns its plan.';

-- Serialises every change to one owner's set of keys: locks the owner's row
-- by updating it, so concurrent writers queue and a REPEATABLE READ writer
-- that raced gets a serialization failure instead of a stale count.
CREATE FUNCTION apikeys._lock_owner(p_owner text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_plan text;
BEGIN
    PERFORM apikeys._ensure_owner(p_owner);
    UPDATE apikeys.owners o SET updated_at = now()
     WHERE o.owner = p_owner
    RETURNING o.plan INTO v_plan;
    RETURN v_plan;
END
$$;
COMMENT ON FUNCTION apikeys._lock_owner(text) IS 'Internal: serialises changes to one owner''s keys.';

-- Records that must survive the caller's rollback go to shared memory, from
-- where a background worker writes them (no-op without the preload).
CREATE FUNCTION apikeys._record_limit_exceeded(owner text, plan text, max_keys integer)
RETURNS void
    AS 'MODULE_PATHNAME', 'apikeys_record_limit_exceeded' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION apikeys._record_limit_exceeded(text, text, integer) IS 'Internal: queues a limit_exceeded record that survives rollback (preload only).';

-- Raises configuration_limit_exceeded (53400) when one more counting key
-- would exceed the owner's plan.  Unlimited plans count nothing and take
-- only a share lock on the owner's row: creates do not queue behind each
-- other, but revoke_all and set_plan (which update the row) do not slip past
-- them.
CREATE FUNCTION apikeys._enforce_plan_limit(p_owner text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_plan text;
    v_max  integer;
    v_live integer;
BEGIN
    v_plan := apikeys._ensure_owner(p_owner);
    SELECT p.max_keys INTO v_max FROM apikeys.plans p WHERE p.name = v_plan;
    IF v_max IS NULL THEN
        SELECT o.plan INTO v_plan FROM apikeys.owners o
         WHERE o.owner = p_owner FOR SHARE;
        SELECT p.max_keys INTO v_max FROM apikeys.plans p WHERE p.name = v_plan;
        IF v_max IS NULL THEN
            RETURN;
        END IF;
    END IF;

    v_plan := apikeys._lock_owner(p_owner);
    SELECT p.max_keys INTO v_max FROM apikeys.plans p WHERE p.name = v_plan;
    IF v_max IS NULL THEN
        RETURN;
    END IF;

    -- Counting stops at the limit, so an owner with many keys costs no more.
    SELECT count(*) INTO v_live
      FROM (SELECT FROM apikeys.keys k
             WHERE k.owner = p_owner
               AND k.revoked_at IS NULL AND k.replaced_by IS NULL
               AND (k.expires_at IS NULL OR k.expires_at > now())
             LIMIT v_max) live;
    IF v_live >= v_max THEN
        PERFORM apikeys._record_limit_exceeded(p_owner, v_plan, v_max);
        RAISE EXCEPTION 'key limit reached: plan "%" allows % active key%',
                        v_plan, v_max, CASE WHEN v_max = 1 THEN '' ELSE 's' END
            USING ERRCODE = 'configuration_limit_exceeded',
                  DETAIL = format('Owner %s has no free slot on plan %s.', p_owner, v_plan),
                  HINT = 'Revoke a key or move the owner to a larger plan with apikeys.set_plan().';
    END IF;
END
$$;
COMMENT ON FUNCTION apikeys._enforce_plan_limit(text) IS 'Internal: raises 53400 when the owner has no free slot.';

-- The longest life the owner's plan allows a key (NULL: no limit).  An owner
-- without a row is on apikeys.default_plan.
CREATE FUNCTION apikeys._plan_lifetime(p_owner text) RETURNS interval
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.max_key_lifetime FROM apikeys.plans p
     WHERE p.name = COALESCE((SELECT o.plan FROM apikeys.owners o WHERE o.owner = p_owner),
                             apikeys._default_plan())
$$;
COMMENT ON FUNCTION apikeys._plan_lifetime(text) IS 'Internal: max_key_lifetime of the owner''s plan.';

-- An expiry within the plan's lifetime: 22023 when the requested one is
-- later, or absent where the plan requires one.  NULL p_expires_at takes the
-- longest allowed.
CREATE FUNCTION apikeys._expiry_within_plan(p_owner text, p_expires_at timestamptz, p_default boolean)
RETURNS timestamptz
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lifetime interval := apikeys._plan_lifetime(p_owner);
BEGIN
    IF v_lifetime IS NULL THEN
        RETURN p_expires_at;
    ELSIF p_expires_at IS NULL AND p_default THEN
        RETURN now() + v_lifetime;
    ELSIF p_expires_at IS NULL THEN
        RAISE EXCEPTION 'the owner''s plan requires an expiry'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Keys of this plan live at most %s.', v_lifetime);
    ELSIF p_expires_at > now() + v_lifetime THEN
        RAISE EXCEPTION 'expires_at is later than the owner''s plan allows'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Keys of this plan live at most %s.', v_lifetime),
                  HINT = 'Choose an earlier expiry, or move the owner to a plan without max_key_lifetime.';
    END IF;
    RETURN p_expires_at;
END
$$;
COMMENT ON FUNCTION apikeys._expiry_within_plan(text, timestamptz, boolean) IS 'Internal: checks an expiry against max_key_lifetime of the owner''s plan (22023).';

-- Statement-level trigger on plans and owners: tells every backend that the
-- alert thresholds it cached for owners may have changed.
CREATE FUNCTION apikeys._policy_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'apikeys_policy_changed' LANGUAGE C;
COMMENT ON FUNCTION apikeys._policy_changed() IS 'Internal: invalidates the plan thresholds cached by verify.';

-- The audit chain.

CREATE FUNCTION apikeys._audit_hash(prev bytea, payload text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'apikeys_audit_hash' LANGUAGE C IMMUTABLE STRICT;
COMMENT ON FUNCTION apikeys._audit_hash(bytea, text) IS 'Internal: BLAKE2b-256 of prev || payload.';

-- The last row of the chain as of now, even in a REPEATABLE READ transaction.
CREATE FUNCTION apikeys._audit_tail(OUT last_id bigint, OUT last_hash bytea)
    AS 'MODULE_PATHNAME', 'apikeys_audit_tail' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION apikeys._audit_tail() IS 'Internal: the audit chain''s last id and hash, read with the latest snapshot.';

-- The canonical encoding a row's hash covers: a JSON array of id, at (UTC,
-- microseconds), event, key_id, owner, actor, db_user, client_addr, details,
-- in jsonb's normalised text form.
CREATE FUNCTION apikeys._audit_payload(a apikeys.audit_log) RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_array(
        a.id,
        to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        a.event, a.key_id, a.owner, a.actor, a.db_user, a.client_addr, a.details)::text
$$;
COMMENT ON FUNCTION apikeys._audit_payload(apikeys.audit_log) IS 'The canonical encoding of an audit row that its hash covers.';

CREATE FUNCTION apikeys._audit(p_event text, p_key_id uuid, p_owner text, p_details jsonb)
RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO apikeys.audit_log (event, key_id, owner, details)
    VALUES (p_event, p_key_id, p_owner, jsonb_strip_nulls(p_details))
$$;
COMMENT ON FUNCTION apikeys._audit(text, uuid, text, jsonb) IS 'Internal: appends one audit row.';

------------------------------------------------------------------------------
-- 7. Public functions.
------------------------------------------------------------------------------
CREATE FUNCTION apikeys.create_key(
    owner      text,
    name       text,
    scopes     text[] DEFAULT '{}',
    expires_at timestamptz DEFAULT NULL,
    prefix     text DEFAULT NULL,
    metadata   jsonb DEFAULT '{}',
    rate_limit integer DEFAULT NULL,
    allowed_ips cidr[] DEFAULT NULL,
    alert_requests_per_minute integer DEFAULT NULL,
    rate_burst integer DEFAULT NULL,
    credits    bigint DEFAULT NULL,
    credits_refill_amount bigint DEFAULT NULL,
    credits_refill_interval text DEFAULT NULL)
RETURNS TABLE (key_id uuid, token apikeys.apikey, start text, created_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_token   apikeys.apikey;
    v_id      uuid;
    v_at      timestamptz;
    v_expires timestamptz;
BEGIN
    -- Name, scopes, metadata, limits, networks and credits are checked by the insert's trigger.
    PERFORM apikeys._require_text(create_key.owner, 'owner', 200);
    IF create_key.expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_expires := apikeys._expiry_within_plan(create_key.owner, create_key.expires_at, true);

    v_token := apikeys._new_token(create_key.prefix);
    INSERT INTO apikeys.keys AS k (owner, name, prefix, start, digest, scopes, metadata,
                                   rate_limit, expires_at, allowed_ips, alert_requests_per_minute,
                                   rate_burst, credits, credits_refill_amount,
                                   credits_refill_interval)
    VALUES (create_key.owner, create_key.name, apikeys.prefix(v_token), apikeys.start(v_token),
            apikeys.digest(v_token), create_key.scopes, create_key.metadata,
            create_key.rate_limit, v_expires, create_key.allowed_ips,
            create_key.alert_requests_per_minute, create_key.rate_burst, create_key.credits,
            create_key.credits_refill_amount, create_key.credits_refill_interval)
    RETURNING k.id, k.created_at INTO v_id, v_at;

    -- Assigned, not RETURN QUERY: a query's custom plan would hold the token
    -- as a constant, which debug_print_plan or auto_explain (settings a
    -- database owner can give every session) would write to the server log.
    key_id := v_id;
    token := v_token;
    start := apikeys.start(v_token);
    created_at := v_at;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION apikeys.create_key(text, text, text[], timestamptz, text, jsonb, integer, cidr[], integer, integer, bigint, bigint, text) IS 'Issues a key; the only time its token is returned.';

-- verify and authenticate run no SQL: they read apikeys.keys and its digest
-- index by OID, through the table and index access methods, which check no
-- privilege and resolve no name through search_path.  So the EXECUTE grant
-- is the whole privilege gate, and they need neither SECURITY DEFINER nor
-- a pinned search_path (which together cost about 5% of a verification).
CREATE FUNCTION apikeys.verify(token text, required_scopes text[] DEFAULT '{}',
                               client_ip inet DEFAULT NULL, cost integer DEFAULT 1)
RETURNS apikeys.verify_result
    AS 'MODULE_PATHNAME', 'apikeys_verify'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION apikeys.verify(text, text[], inet, integer) IS 'Checks a token (from client_ip, for keys with allowed_ips) and spends cost of its credits (0 to 1000000); never raises for a bad token and never writes a row.';

CREATE FUNCTION apikeys.authenticate(token text, required_scopes text[] DEFAULT '{}',
                                     client_ip inet DEFAULT NULL, cost integer DEFAULT 1)
RETURNS apikeys.authenticate_result
    AS 'MODULE_PATHNAME', 'apikeys_authenticate'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION apikeys.authenticate(text, text[], inet, integer) IS 'Like verify, but a refusal raises 28000 with the code as message.';

-- Who may omit an owner is decided as PostgreSQL decides any privilege: by
-- the role running the call (current_user), through the EXECUTE grant of
-- the internal function that acts on any owner's keys (apikeys_admin
-- only).  So each public function that takes an optional owner is a
-- SECURITY INVOKER wrapper: with an owner it calls the _owned form (any
-- caller, owner required); without, the internal function itself.  Inside
-- a maintenance command (ANALYZE, REINDEX, autovacuum) current_user is the
-- table's owner, and inside a function of a role's SECURITY DEFINER, that
-- role: neither borrows the rights of the session's role.

-- 42501 with p_message unless the role running the call may act for
-- apikeys_admin.  It runs as its caller.  The wrappers call it for a clear
-- message; the grant of the internal function they call next enforces it.
CREATE FUNCTION apikeys._require_admin(p_message text) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT pg_has_role(current_user, 'apikeys_admin', 'USAGE') THEN
        RAISE EXCEPTION '%', p_message
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Only members of apikeys_admin may omit the owner argument.';
    END IF;
END
$$;
COMMENT ON FUNCTION apikeys._require_admin(text) IS 'Internal: 42501 with the message unless the role running the call (current_user) may act for apikeys_admin.';

-- The owner an _owned function was given: 42501 with p_message for NULL.
CREATE FUNCTION apikeys._owner_given(p_owner text, p_message text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_owner IS NULL THEN
        RAISE EXCEPTION '%', p_message
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Only members of apikeys_admin may omit the owner argument.';
    END IF;
    RETURN p_owner;
END
$$;
COMMENT ON FUNCTION apikeys._owner_given(text, text) IS 'Internal: the owner, or 42501 with the message when it is NULL.';

CREATE FUNCTION apikeys._revoke(key_id uuid, owner text, reason text)
RETURNS timestamptz
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_key apikeys.keys;
BEGIN
    IF _revoke.key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT * INTO v_key FROM apikeys.keys k
     WHERE k.id = _revoke.key_id
       AND (_revoke.owner IS NULL OR k.owner = _revoke.owner)
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key % not found', _revoke.key_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v_key.revoked_at IS NOT NULL THEN
        RETURN v_key.revoked_at;
    END IF;

    UPDATE apikeys.keys k
       SET revoked_at = now(), revoked_by = apikeys._actor(),
           revoke_reason = _revoke.reason
     WHERE k.id = _revoke.key_id
    RETURNING k.revoked_at INTO v_key.revoked_at;
    RETURN v_key.revoked_at;
END
$$;
COMMENT ON FUNCTION apikeys._revoke(uuid, text, text) IS 'Internal: the body of revoke(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._revoke_owned(key_id uuid, owner text, reason text)
RETURNS timestamptz
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT apikeys._revoke($1, apikeys._owner_given($2, 'permission denied to revoke a key without naming its owner'), $3)
$$;
COMMENT ON FUNCTION apikeys._revoke_owned(uuid, text, text) IS 'Internal: revoke() on a key of the owner given, which may not be NULL.';

CREATE FUNCTION apikeys.revoke(key_id uuid, owner text DEFAULT NULL, reason text DEFAULT NULL)
RETURNS timestamptz
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $2 IS NOT NULL THEN
        RETURN apikeys._revoke_owned($1, $2, $3);
    END IF;
    PERFORM apikeys._require_admin('permission denied to revoke a key without naming its owner');
    RETURN apikeys._revoke($1, NULL, $3);
END
$$;
COMMENT ON FUNCTION apikeys.revoke(uuid, text, text) IS 'Revokes a key at once and for good; returns the original revoked_at when already revoked.';

CREATE FUNCTION apikeys.revoke_all(owner text, reason text DEFAULT NULL)
RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_count integer;
BEGIN
    PERFORM apikeys._require_text(revoke_all.owner, 'owner', 200);
    IF NOT EXISTS (SELECT FROM apikeys.owners o WHERE o.owner = revoke_all.owner) THEN
        RETURN 0;
    END IF;
    -- Queue behind any create_key or rotate of this owner, so none slips past.
    PERFORM apikeys._lock_owner(revoke_all.owner);
    PERFORM set_config('apikeys.audit_context', 'revoke_all', true);
    UPDATE apikeys.keys k
       SET revoked_at = now(), revoked_by = apikeys._actor(),
           revoke_reason = revoke_all.reason
     WHERE k.owner = revoke_all.owner
       AND k.revoked_at IS NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    PERFORM set_config('apikeys.audit_context', '', true);
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION apikeys.revoke_all(text, text) IS 'Revokes every active and rotating key of an owner; returns how many.';

CREATE FUNCTION apikeys.revoke_token(token text, reason text DEFAULT NULL)
RETURNS uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id uuid;
BEGIN
    IF NOT apikeys.is_well_formed(revoke_token.token) THEN
        RETURN NULL;
    END IF;
    SELECT k.id INTO v_id FROM apikeys.keys k
     WHERE k.digest = apikeys.digest(revoke_token.token::apikeys.apikey);
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('apikeys.audit_context', 'revoke_token', true);
    PERFORM apikeys.revoke(v_id, NULL, COALESCE(revoke_token.reason, 'leaked'));
    PERFORM set_config('apikeys.audit_context', '', true);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION apikeys.revoke_token(text, text) IS 'Revokes the key a leaked token belongs to; NULL when unknown.';

-- The work of rotate(); PL/pgSQL cannot name an input and a result column
-- alike (key_id), so rotate() is a SQL wrapper around this.
CREATE FUNCTION apikeys._rotate(p_key_id uuid, p_owner text, grace interval)
RETURNS TABLE (new_key_id uuid, new_token apikeys.apikey, new_start text,
               old_key_expires_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_old      apikeys.keys;
    v_owner    text;
    v_token    apikeys.apikey;
    v_new_id   uuid := gen_random_uuid();
    v_old_end  timestamptz;
    v_lifetime interval;
    v_grace_end timestamptz;
BEGIN
    IF p_key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF grace IS NULL THEN
        RAISE EXCEPTION 'grace must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The moment the grace ends, added in UTC (a day is 24 hours whatever
    -- the caller's TimeZone), and compared as a moment: intervals compare a
    -- month as 30 days, so '12000 mons -359993 days' equals 7 days yet ends
    -- 14 years on.  One past the timestamps' range ends at an infinity.
    BEGIN
        v_grace_end := ((now() AT TIME ZONE 'UTC') + grace) AT TIME ZONE 'UTC';
    EXCEPTION WHEN datetime_field_overflow THEN
        v_grace_end := CASE WHEN grace < '0'::interval THEN '-infinity'::timestamptz
                            ELSE 'infinity'::timestamptz END;
    END;
    IF v_grace_end < now() THEN
        RAISE EXCEPTION 'grace must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_grace_end > ((now() AT TIME ZONE 'UTC') + apikeys._max_rotation_grace()) AT TIME ZONE 'UTC' THEN
        RAISE EXCEPTION 'grace is longer than apikeys.max_rotation_grace allows'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The longest grace is %s.', apikeys._max_rotation_grace()),
                  HINT = 'A superuser can raise apikeys.max_rotation_grace.';
    END IF;

    SELECT k.owner INTO v_owner FROM apikeys.keys k
     WHERE k.id = p_key_id
       AND (p_owner IS NULL OR k.owner = p_owner);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key % not found', p_key_id USING ERRCODE = 'no_data_found';
    END IF;
    -- Owner first, then key: the same order as revoke_all, so they cannot deadlock.
    PERFORM apikeys._lock_owner(v_owner);
    SELECT * INTO v_old FROM apikeys.keys k WHERE k.id = p_key_id FOR NO KEY UPDATE;

    -- A rotated key is also revoked (grace 0) or expiring: name the rotation.
    IF v_old.replaced_by IS NOT NULL THEN
        RAISE EXCEPTION 'key % was already rotated', p_key_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It was replaced by key %s.', v_old.replaced_by);
    ELSIF v_old.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION 'key % is revoked', p_key_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only active keys can be rotated.';
    ELSIF v_old.expires_at IS NOT NULL AND v_old.expires_at <= now() THEN
        RAISE EXCEPTION 'key % has expired', p_key_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only active keys can be rotated.';
    END IF;

    -- A chain holds at most two valid keys: the grace of the key this one
    -- replaced, if it is still rotating, ends now.
    UPDATE apikeys.keys k SET expires_at = now()
     WHERE k.id = v_old.rotated_from
       AND k.revoked_at IS NULL
       AND k.expires_at > now();

    -- Retire the old key before inserting the new one, so an owner at its
    -- plan limit can rotate: a rotating key no longer counts.
    IF v_grace_end = now() THEN
        UPDATE apikeys.keys k
           SET replaced_by = v_new_id, revoked_at = now(),
               revoked_by = apikeys._actor(), revoke_reason = 'rotated'
         WHERE k.id = p_key_id;
        v_old_end := now();
    ELSE
        v_old_end := v_grace_end;
        IF v_old.expires_at IS NOT NULL AND v_old.expires_at < v_old_end THEN
            v_old_end := v_old.expires_at;
        END IF;
        UPDATE apikeys.keys k
           SET replaced_by = v_new_id, expires_at = v_old_end
         WHERE k.id = p_key_id;
    END IF;

    -- On a plan with max_key_lifetime the new key starts a full term: that
    -- is what a rotation policy asks for.  Otherwise it keeps the old expiry.
    v_lifetime := apikeys._plan_lifetime(v_old.owner);
    v_token := apikeys._new_token(v_old.prefix);
    INSERT INTO apikeys.keys (id, owner, name, prefix, start, digest, scopes, metadata,
                              rate_limit, expires_at, rotated_from, disabled_at, disabled_by,
                              disable_reason, allowed_ips, alert_requests_per_minute, rate_burst,
                              credits, credits_refill_amount, credits_refill_interval)
    VALUES (v_new_id, v_old.owner, v_old.name, v_old.prefix, apikeys.start(v_token),
            apikeys.digest(v_token), v_old.scopes, v_old.metadata, v_old.rate_limit,
            CASE WHEN v_lifetime IS NULL THEN v_old.expires_at ELSE now() + v_lifetime END,
            v_old.id, v_old.disabled_at, v_old.disabled_by, v_old.disable_reason,
            v_old.allowed_ips, v_old.alert_requests_per_minute, v_old.rate_burst,
            apikeys._credits_left(v_old), v_old.credits_refill_amount,
            v_old.credits_refill_interval);
    PERFORM apikeys._rate_carry(v_old.id, v_new_id);

    -- The balance moves to the new key rather than being copied: during a
    -- grace the old key keeps working for calls that cost nothing.
    IF v_old.credits IS NOT NULL THEN
        PERFORM set_config('apikeys.audit_context', 'rotate', true);
        UPDATE apikeys.keys k
           SET credits = 0, credits_refill_amount = NULL, credits_refill_interval = NULL
         WHERE k.id = p_key_id;
        PERFORM set_config('apikeys.audit_context', '', true);
    END IF;

    -- Assigned, not RETURN QUERY: see create_key().
    new_key_id := v_new_id;
    new_token := v_token;
    new_start := apikeys.start(v_token);
    old_key_expires_at := v_old_end;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION apikeys._rotate(uuid, text, interval) IS 'Internal: the body of rotate(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._rotate_owned(p_key_id uuid, p_owner text, grace interval)
RETURNS TABLE (new_key_id uuid, new_token apikeys.apikey, new_start text,
               old_key_expires_at timestamptz)
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM apikeys._rotate($1, apikeys._owner_given($2, 'permission denied to rotate a key without naming its owner'), $3)
$$;
COMMENT ON FUNCTION apikeys._rotate_owned(uuid, text, interval) IS 'Internal: rotate() of a key of the owner given, which may not be NULL.';

-- rotate() is SQL (its input and result both name key_id), so it cannot
-- choose between the two; this does, as its caller.
CREATE FUNCTION apikeys._rotate_call(p_key_id uuid, p_owner text, p_grace interval)
RETURNS TABLE (new_key_id uuid, new_token apikeys.apikey, new_start text,
               old_key_expires_at timestamptz)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_owner IS NOT NULL THEN
        RETURN QUERY SELECT * FROM apikeys._rotate_owned(p_key_id, p_owner, p_grace);
        RETURN;
    END IF;
    PERFORM apikeys._require_admin('permission denied to rotate a key without naming its owner');
    RETURN QUERY SELECT * FROM apikeys._rotate(p_key_id, NULL, p_grace);
END
$$;
COMMENT ON FUNCTION apikeys._rotate_call(uuid, text, interval) IS 'Internal: rotate() as its caller, through _rotate_owned() or, for apikeys_admin without an owner, _rotate().';

CREATE FUNCTION apikeys.rotate(key_id uuid, owner text DEFAULT NULL, grace interval DEFAULT '0')
RETURNS TABLE (key_id uuid, token apikeys.apikey, start text, old_key_expires_at timestamptz)
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM apikeys._rotate_call(key_id, owner, grace)
$$;
COMMENT ON FUNCTION apikeys.rotate(uuid, text, interval) IS 'Issues a replacement key; the old one is revoked now or valid until the grace ends.';

-- Today's counts still in shared memory (zeros without the preload).
CREATE FUNCTION apikeys._pending_usage(key_id uuid,
    OUT requests bigint, OUT failures bigint, OUT last_used_at timestamptz)
    AS 'MODULE_PATHNAME', 'apikeys_pending_usage' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION apikeys._pending_usage(uuid) IS 'Internal: today''s usage counts not yet written to apikeys.key_usage.';

-- Credits.  apikeys.keys.credits is a key's balance as of the last write;
-- verify spends in shared memory, and the worker subtracts what was spent
-- (src/credits.c, src/worker.c).  So what a key has left now is its
-- balance less what is spent but not yet written.  A refilling key's
-- balance belongs to a period (credits_period): in a later one it is the
-- refill amount again, with nothing to write until it is spent.

-- The refill period a moment falls in: UTC days or months since 1970, 0 without a refill.
CREATE FUNCTION apikeys._credit_period(p_interval text, p_at timestamptz) RETURNS integer
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE p_interval
        WHEN 'day' THEN floor(extract(epoch FROM p_at) / 86400)::integer
        WHEN 'month' THEN ((extract(year FROM p_at AT TIME ZONE 'UTC') - 1970) * 12
                           + extract(month FROM p_at AT TIME ZONE 'UTC') - 1)::integer
        ELSE 0 END
$$;
COMMENT ON FUNCTION apikeys._credit_period(text, timestamptz) IS 'Internal: the refill period (UTC days or months since 1970; 0 without refill) a moment falls in.';

-- A key's balance in a period: its refill amount once its balance's period is past.
CREATE FUNCTION apikeys._credits_base(k apikeys.keys, p_period integer) RETURNS bigint
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN k.credits_refill_amount IS NOT NULL AND k.credits_period < p_period
                THEN k.credits_refill_amount ELSE k.credits END
$$;
COMMENT ON FUNCTION apikeys._credits_base(apikeys.keys, integer) IS 'Internal: a key''s written balance as of a refill period.';

CREATE FUNCTION apikeys._credits_unflushed(key_id uuid, period integer) RETURNS bigint
    AS 'MODULE_PATHNAME', 'apikeys_credits_unflushed' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION apikeys._credits_unflushed(uuid, integer) IS 'Internal: credits of a key spent in a refill period and not yet written, as the caller''s snapshot sees the table (0 without the preload).';

-- rotate's new key takes over the old one's rate-limit allowance, spent as
-- far as it is: a rotation hands out no fresh burst.
CREATE FUNCTION apikeys._rate_carry(from_key uuid, to_key uuid) RETURNS void
    AS 'MODULE_PATHNAME', 'apikeys_rate_carry' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION apikeys._rate_carry(uuid, uuid) IS 'Internal: gives to_key the rate-limit state from_key has in shared memory, unless its own is further ahead (nothing without the preload).';

-- What a key has left now; NULL when it has no credit limit.
-- STABLE: it reads the shared-memory spending with its caller's snapshot,
-- the one that read k (a snapshot of its own, taken later, could see a
-- flush commit that k's column does not hold).
CREATE FUNCTION apikeys._credits_left(k apikeys.keys) RETURNS bigint
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT GREATEST(apikeys._credits_base(k, p.period)
                    OPERATOR(pg_catalog.-) apikeys._credits_unflushed(k.id, p.period), 0)
      FROM (SELECT apikeys._credit_period(k.credits_refill_interval, clock_timestamp()) AS period) p
     WHERE k.credits IS NOT NULL
$$;
COMMENT ON FUNCTION apikeys._credits_left(apikeys.keys) IS 'Internal: the credits a key has left now, spending not yet written included; NULL: no credit limit.';

-- Whether an update is the worker writing spent credits: it says so
-- (apikeys.audit_context) and changes nothing but credits and credits_period.
CREATE FUNCTION apikeys._credits_flush(o apikeys.keys, n apikeys.keys) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rest apikeys.keys := n;
BEGIN
    IF apikeys._audit_context() IS DISTINCT FROM 'credits_flush' THEN
        RETURN false;
    END IF;
    v_rest.credits := o.credits;
    v_rest.credits_period := o.credits_period;
    RETURN v_rest IS NOT DISTINCT FROM o;
END
$$;
COMMENT ON FUNCTION apikeys._credits_flush(apikeys.keys, apikeys.keys) IS 'Internal: whether a key''s update is the worker writing spent credits, which is neither audited nor a new generation.';

-- The key of that id (and owner, unless NULL), locked for update: P0002
-- when the key is missing or another owner's (as revoke() scopes its key),
-- 55000 when it is revoked.  Callers decide who may pass a NULL owner.
CREATE FUNCTION apikeys._key_for_change(p_key_id uuid, p_owner text, p_action text)
RETURNS apikeys.keys
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key apikeys.keys;
BEGIN
    IF p_key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_key FROM apikeys.keys k
     WHERE k.id = p_key_id
       AND (p_owner IS NULL OR k.owner = p_owner)
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key % not found', p_key_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v_key.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION 'key % is revoked', p_key_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A revoked key cannot be updated, disabled or enabled.';
    END IF;
    RETURN v_key;
END
$$;
COMMENT ON FUNCTION apikeys._key_for_change(uuid, text, text) IS 'Internal: the unrevoked key of that id and owner (any owner for NULL), locked (P0002, 55000).';

-- Public rows of the keys of those ids, with usage (counts still in shared memory
-- included), in the order given.
CREATE FUNCTION apikeys._key_info(p_key_ids uuid[]) RETURNS SETOF apikeys.key_info
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    -- The key's latest usage row (today's, if any) is one probe of the
    -- primary key (key_id, day).
    RETURN QUERY
    SELECT k.id, k.name, k.start, k.scopes,
           -- The first of these that applies; list_keys filters on the same.
           CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked'
                WHEN k.expires_at IS NOT NULL AND k.expires_at <= now() THEN 'expired'
                WHEN k.disabled_at IS NOT NULL THEN 'disabled'
                WHEN k.replaced_by IS NOT NULL THEN 'rotating'
                ELSE 'active' END,
           k.created_at, k.expires_at, k.revoked_at,
           CASE WHEN p.last_used_at IS NULL THEN t.last_used_at
                ELSE GREATEST(t.last_used_at, p.last_used_at) END,
           COALESCE(t.requests, 0) + p.requests,
           COALESCE(t.failures, 0) + p.failures,
           k.prefix, k.metadata, k.rate_limit, k.revoke_reason, k.rotated_from, k.replaced_by,
           CASE WHEN COALESCE(t.requests, 0) + p.requests + COALESCE(t.failures, 0) + p.failures = 0
                THEN NULL
                ELSE (COALESCE(t.failures, 0) + p.failures)::double precision
                     / (COALESCE(t.requests, 0) + p.requests + COALESCE(t.failures, 0) + p.failures) END,
           k.disabled_at, k.disable_reason, k.allowed_ips, k.alert_requests_per_minute, k.rate_burst,
           apikeys._credits_left(k), k.credits_refill_amount, k.credits_refill_interval
      FROM unnest(p_key_ids) WITH ORDINALITY AS o (id, position)
      JOIN apikeys.keys k ON k.id = o.id
      CROSS JOIN LATERAL apikeys._pending_usage(k.id) p
      LEFT JOIN LATERAL (
           SELECT ku.day, ku.requests, ku.failures, ku.last_used_at FROM apikeys.key_usage ku
            WHERE ku.key_id = k.id
            ORDER BY ku.day DESC
            LIMIT 1) u ON true
      CROSS JOIN LATERAL (
           SELECT CASE WHEN u.day = v_today THEN u.requests END AS requests,
                  CASE WHEN u.day = v_today THEN u.failures END AS failures,
                  -- A day of refusals only has no last use: look further back.
                  COALESCE(u.last_used_at,
                           (SELECT ku.last_used_at FROM apikeys.key_usage ku
                             WHERE ku.key_id = k.id AND ku.last_used_at IS NOT NULL
                             ORDER BY ku.day DESC
                             LIMIT 1)) AS last_used_at) t
     ORDER BY o.position;
END
$$;
COMMENT ON FUNCTION apikeys._key_info(uuid[]) IS 'Internal: the public rows of keys, with usage.';

-- The owner's keys in creation order, a page at a time: pass the key_id of
-- a page's last row as after to get the next page.
CREATE FUNCTION apikeys.list_keys(owner text, status text DEFAULT NULL,
                                  "limit" integer DEFAULT NULL, after uuid DEFAULT NULL)
RETURNS SETOF apikeys.key_info
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    v_after  apikeys.keys;
    v_status text;
BEGIN
    PERFORM apikeys._require_text(list_keys.owner, 'owner', 200);
    IF list_keys.status IS NOT NULL
       AND list_keys.status NOT IN ('active', 'rotating', 'disabled', 'expired', 'revoked') THEN
        RAISE EXCEPTION 'unknown status "%"', list_keys.status
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The statuses are active, rotating, disabled, expired and revoked.';
    END IF;
    IF list_keys."limit" < 1 OR list_keys."limit" > 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL returns every key.';
    END IF;
    IF list_keys.after IS NOT NULL THEN
        SELECT * INTO v_after FROM apikeys.keys k
         WHERE k.id = list_keys.after AND k.owner = list_keys.owner;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'key % not found', list_keys.after USING ERRCODE = 'no_data_found',
                  DETAIL = 'after must be the key_id of a row of an earlier page.';
        END IF;
    END IF;
    -- Each status is written as conditions on columns, so that the partial
    -- indexes of revoked, disabled and rotating keys serve those pages.
    v_status := CASE list_keys.status
        WHEN 'revoked' THEN 'k.revoked_at IS NOT NULL'
        WHEN 'expired' THEN 'k.revoked_at IS NULL AND k.expires_at <= now()'
        WHEN 'disabled' THEN 'k.revoked_at IS NULL AND k.disabled_at IS NOT NULL'
                             ' AND (k.expires_at IS NULL OR k.expires_at > now())'
        WHEN 'rotating' THEN 'k.revoked_at IS NULL AND k.disabled_at IS NULL AND k.replaced_by IS NOT NULL'
                             ' AND (k.expires_at IS NULL OR k.expires_at > now())'
        WHEN 'active' THEN 'k.revoked_at IS NULL AND k.disabled_at IS NULL AND k.replaced_by IS NULL'
                           ' AND (k.expires_at IS NULL OR k.expires_at > now())'
        ELSE 'true' END;
    RETURN QUERY EXECUTE format(
        'SELECT i.* FROM apikeys._key_info(ARRAY('
        '    SELECT k.id FROM apikeys.keys k'
        '     WHERE k.owner = $1 AND %s AND %s'
        '     ORDER BY k.created_at, k.id LIMIT $2)) i',
        CASE WHEN v_after.id IS NULL THEN 'true' ELSE '(k.created_at, k.id) > ($3, $4)' END,
        v_status)
    USING list_keys.owner, list_keys."limit", v_after.created_at, v_after.id;
END
$$;
COMMENT ON FUNCTION apikeys.list_keys(text, text, integer, uuid) IS 'An owner''s keys with status and usage, a page at a time; never digests or tokens.';

CREATE FUNCTION apikeys._get_key(key_id uuid, owner text)
RETURNS apikeys.key_info
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    v_key  apikeys.keys;
    v_info apikeys.key_info;
BEGIN
    IF _get_key.key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_key FROM apikeys.keys k
     WHERE k.id = _get_key.key_id
       AND (_get_key.owner IS NULL OR k.owner = _get_key.owner);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key % not found', _get_key.key_id USING ERRCODE = 'no_data_found';
    END IF;
    SELECT * INTO v_info FROM apikeys._key_info(ARRAY[v_key.id]);
    RETURN v_info;
END
$$;
COMMENT ON FUNCTION apikeys._get_key(uuid, text) IS 'Internal: the body of get_key(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._get_key_owned(key_id uuid, owner text)
RETURNS apikeys.key_info
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT apikeys._get_key($1, apikeys._owner_given($2, 'permission denied to read a key without naming its owner'))
$$;
COMMENT ON FUNCTION apikeys._get_key_owned(uuid, text) IS 'Internal: get_key() on a key of the owner given, which may not be NULL.';

CREATE FUNCTION apikeys.get_key(key_id uuid, owner text)
RETURNS apikeys.key_info
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $2 IS NOT NULL THEN
        RETURN apikeys._get_key_owned($1, $2);
    END IF;
    PERFORM apikeys._require_admin('permission denied to read a key without naming its owner');
    RETURN apikeys._get_key($1, NULL);
END
$$;
COMMENT ON FUNCTION apikeys.get_key(uuid, text) IS 'One key''s public row with status and usage; never its digest or token.';

-- NULL leaves a field unchanged; clear names the fields to set to NULL.
CREATE FUNCTION apikeys._update_key(key_id uuid, owner text, name text, scopes text[], metadata jsonb, expires_at timestamptz, rate_limit integer, allowed_ips cidr[], alert_requests_per_minute integer, rate_burst integer, credits bigint, credits_refill_amount bigint, credits_refill_interval text, clear text[])
RETURNS apikeys.key_info
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    v_key     apikeys.keys;
    v_field   text;
    v_info    apikeys.key_info;
    v_clear   CONSTANT text[] := ARRAY['expires_at', 'rate_limit', 'allowed_ips', 'alert_requests_per_minute',
                                     'rate_burst', 'credits', 'credits_refill'];
    v_period  integer;
BEGIN
    IF _update_key.clear IS NULL OR array_ndims(_update_key.clear) > 1 THEN
        RAISE EXCEPTION 'clear must be a one-dimensional array' USING ERRCODE = 'invalid_parameter_value';
    ELSIF cardinality(_update_key.clear) > cardinality(v_clear) THEN
        RAISE EXCEPTION 'clear names at most % fields', cardinality(v_clear)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_field IN ARRAY _update_key.clear LOOP
        IF v_field IS NULL OR NOT v_field = ANY (v_clear) THEN
            RAISE EXCEPTION 'cannot clear "%"', v_field USING ERRCODE = 'invalid_parameter_value',
                DETAIL = 'clear may name expires_at, rate_limit, allowed_ips, alert_requests_per_minute, rate_burst, credits and credits_refill.';
        END IF;
    END LOOP;
    IF ('expires_at' = ANY (_update_key.clear) AND _update_key.expires_at IS NOT NULL)
       OR ('rate_limit' = ANY (_update_key.clear) AND _update_key.rate_limit IS NOT NULL)
       OR ('allowed_ips' = ANY (_update_key.clear) AND _update_key.allowed_ips IS NOT NULL)
       OR ('alert_requests_per_minute' = ANY (_update_key.clear)
           AND _update_key.alert_requests_per_minute IS NOT NULL)
       OR ('rate_burst' = ANY (_update_key.clear) AND _update_key.rate_burst IS NOT NULL)
       OR ('credits' = ANY (_update_key.clear)
           AND (_update_key.credits IS NOT NULL OR _update_key.credits_refill_amount IS NOT NULL
                OR _update_key.credits_refill_interval IS NOT NULL))
       OR ('credits_refill' = ANY (_update_key.clear)
           AND (_update_key.credits_refill_amount IS NOT NULL
                OR _update_key.credits_refill_interval IS NOT NULL)) THEN
        RAISE EXCEPTION 'a field cannot be both set and cleared' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF _update_key.expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at must be in the future' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use revoke() to end a key now.';
    END IF;

    IF _update_key.credits < 0 OR _update_key.credits > 1000000000000000 THEN
        RAISE EXCEPTION 'credits must be between 0 and 10^15' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'clear => ''{credits}'' removes the credit limit.';
    END IF;

    v_key := apikeys._key_for_change(_update_key.key_id, _update_key.owner, 'update');
    -- credits sets what the key has left now: what verify spent but the
    -- worker has not yet subtracted (in the period of the refill the key
    -- will have) is added, so it comes out exact.
    v_period := apikeys._credit_period(
        CASE WHEN _update_key.clear && ARRAY['credits', 'credits_refill'] THEN NULL
             ELSE COALESCE(_update_key.credits_refill_interval, v_key.credits_refill_interval) END,
        clock_timestamp());
    PERFORM set_config('apikeys.audit_context', 'update_key', true);

    IF _update_key.expires_at IS NOT NULL OR 'expires_at' = ANY (_update_key.clear) THEN
        PERFORM apikeys._expiry_within_plan(v_key.owner, _update_key.expires_at, false);
    END IF;

    -- Bounds, the plan limit for a revived key, the audit row and the
    -- notification come from the table's triggers.
    UPDATE apikeys.keys k
       SET name = COALESCE(_update_key.name, k.name),
           scopes = COALESCE(_update_key.scopes, k.scopes),
           metadata = COALESCE(_update_key.metadata, k.metadata),
           expires_at = CASE WHEN 'expires_at' = ANY (_update_key.clear) THEN NULL
                             ELSE COALESCE(_update_key.expires_at, k.expires_at) END,
           rate_limit = CASE WHEN 'rate_limit' = ANY (_update_key.clear) THEN NULL
                             ELSE COALESCE(_update_key.rate_limit, k.rate_limit) END,
           allowed_ips = CASE WHEN 'allowed_ips' = ANY (_update_key.clear) THEN NULL
                              ELSE COALESCE(_update_key.allowed_ips, k.allowed_ips) END,
           alert_requests_per_minute = CASE WHEN 'alert_requests_per_minute' = ANY (_update_key.clear) THEN NULL
                                            ELSE COALESCE(_update_key.alert_requests_per_minute,
                                                          k.alert_requests_per_minute) END,
           rate_burst = CASE WHEN 'rate_burst' = ANY (_update_key.clear) THEN NULL
                             ELSE COALESCE(_update_key.rate_burst, k.rate_burst) END,
           credits = CASE WHEN 'credits' = ANY (_update_key.clear) THEN NULL
                          WHEN _update_key.credits IS NOT NULL
                          THEN _update_key.credits + apikeys._credits_unflushed(k.id, v_period)
                          ELSE k.credits END,
           -- Given credits belong to the current period (a new one counts as a change).
           credits_period = CASE WHEN _update_key.credits IS NOT NULL THEN v_period
                                 ELSE k.credits_period END,
           credits_refill_amount = CASE WHEN _update_key.clear && ARRAY['credits', 'credits_refill'] THEN NULL
                                        ELSE COALESCE(_update_key.credits_refill_amount,
                                                      k.credits_refill_amount) END,
           credits_refill_interval = CASE WHEN _update_key.clear && ARRAY['credits', 'credits_refill'] THEN NULL
                                          ELSE COALESCE(_update_key.credits_refill_interval,
                                                        k.credits_refill_interval) END
     WHERE k.id = v_key.id
    RETURNING * INTO v_key;
    PERFORM set_config('apikeys.audit_context', '', true);

    SELECT * INTO v_info FROM apikeys._key_info(ARRAY[v_key.id]);
    RETURN v_info;
END
$$;
COMMENT ON FUNCTION apikeys._update_key(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]) IS 'Internal: the body of update_key(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._update_key_owned(key_id uuid, owner text, name text, scopes text[], metadata jsonb, expires_at timestamptz, rate_limit integer, allowed_ips cidr[], alert_requests_per_minute integer, rate_burst integer, credits bigint, credits_refill_amount bigint, credits_refill_interval text, clear text[])
RETURNS apikeys.key_info
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT apikeys._update_key($1, apikeys._owner_given($2, 'permission denied to update a key without naming its owner'), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
$$;
COMMENT ON FUNCTION apikeys._update_key_owned(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]) IS 'Internal: update_key() on a key of the owner given, which may not be NULL.';

CREATE FUNCTION apikeys.update_key(
    key_id     uuid,
    owner      text,
    name       text DEFAULT NULL,
    scopes     text[] DEFAULT NULL,
    metadata   jsonb DEFAULT NULL,
    expires_at timestamptz DEFAULT NULL,
    rate_limit integer DEFAULT NULL,
    allowed_ips cidr[] DEFAULT NULL,
    alert_requests_per_minute integer DEFAULT NULL,
    rate_burst integer DEFAULT NULL,
    credits    bigint DEFAULT NULL,
    credits_refill_amount bigint DEFAULT NULL,
    credits_refill_interval text DEFAULT NULL,
    clear      text[] DEFAULT '{}')
RETURNS apikeys.key_info
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $2 IS NOT NULL THEN
        RETURN apikeys._update_key_owned($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14);
    END IF;
    PERFORM apikeys._require_admin('permission denied to update a key without naming its owner');
    RETURN apikeys._update_key($1, NULL, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14);
END
$$;
COMMENT ON FUNCTION apikeys.update_key(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]) IS 'Changes a key''s name, scopes, metadata, expiry, rate limit and burst, networks, alert threshold, credits or refill; NULL leaves a field as it is, clear empties fields.';

CREATE FUNCTION apikeys._disable_key(key_id uuid, owner text, reason text)
RETURNS timestamptz
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    v_key apikeys.keys;
BEGIN
    v_key := apikeys._key_for_change(_disable_key.key_id, _disable_key.owner, 'disable');
    IF v_key.disabled_at IS NOT NULL THEN
        RETURN v_key.disabled_at;
    END IF;
    UPDATE apikeys.keys k
       SET disabled_at = now(), disabled_by = apikeys._actor(), disable_reason = _disable_key.reason
     WHERE k.id = v_key.id
    RETURNING k.disabled_at INTO v_key.disabled_at;
    RETURN v_key.disabled_at;
END
$$;
COMMENT ON FUNCTION apikeys._disable_key(uuid, text, text) IS 'Internal: the body of disable_key(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._disable_key_owned(key_id uuid, owner text, reason text)
RETURNS timestamptz
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT apikeys._disable_key($1, apikeys._owner_given($2, 'permission denied to disable a key without naming its owner'), $3)
$$;
COMMENT ON FUNCTION apikeys._disable_key_owned(uuid, text, text) IS 'Internal: disable_key() on a key of the owner given, which may not be NULL.';

CREATE FUNCTION apikeys.disable_key(key_id uuid, owner text, reason text DEFAULT NULL)
RETURNS timestamptz
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $2 IS NOT NULL THEN
        RETURN apikeys._disable_key_owned($1, $2, $3);
    END IF;
    PERFORM apikeys._require_admin('permission denied to disable a key without naming its owner');
    RETURN apikeys._disable_key($1, NULL, $3);
END
$$;
COMMENT ON FUNCTION apikeys.disable_key(uuid, text, text) IS 'Suspends a key until enable_key: verify answers API_KEY_DISABLED; the key keeps its plan slot. Returns the original disabled_at when already disabled.';

CREATE FUNCTION apikeys._enable_key(key_id uuid, owner text)
RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    v_key apikeys.keys;
BEGIN
    v_key := apikeys._key_for_change(_enable_key.key_id, _enable_key.owner, 'enable');
    IF v_key.disabled_at IS NULL THEN
        RETURN false;
    END IF;
    UPDATE apikeys.keys k
       SET disabled_at = NULL, disabled_by = NULL, disable_reason = NULL
     WHERE k.id = v_key.id;
    RETURN true;
END
$$;
COMMENT ON FUNCTION apikeys._enable_key(uuid, text) IS 'Internal: the body of enable_key(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._enable_key_owned(key_id uuid, owner text)
RETURNS boolean
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT apikeys._enable_key($1, apikeys._owner_given($2, 'permission denied to enable a key without naming its owner'))
$$;
COMMENT ON FUNCTION apikeys._enable_key_owned(uuid, text) IS 'Internal: enable_key() on a key of the owner given, which may not be NULL.';

CREATE FUNCTION apikeys.enable_key(key_id uuid, owner text)
RETURNS boolean
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $2 IS NOT NULL THEN
        RETURN apikeys._enable_key_owned($1, $2);
    END IF;
    PERFORM apikeys._require_admin('permission denied to enable a key without naming its owner');
    RETURN apikeys._enable_key($1, NULL);
END
$$;
COMMENT ON FUNCTION apikeys.enable_key(uuid, text) IS 'Resumes a disabled key; false when it was not disabled.';

-- Adds delta credits (a negative delta takes them away).  The change is
-- relative, so verifications running meanwhile are neither lost nor
-- counted twice.
CREATE FUNCTION apikeys._add_credits(key_id uuid, owner text, delta bigint)
RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    v_key    apikeys.keys;
    v_period integer;
    v_base   bigint;
    v_left   bigint;
BEGIN
    IF delta IS NULL OR delta = 0 OR delta < -1000000000000000 OR delta > 1000000000000000 THEN
        RAISE EXCEPTION 'delta must be non-zero and at most 10^15 either way'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_key := apikeys._key_for_change(_add_credits.key_id, _add_credits.owner, 'add credits to');
    IF v_key.credits IS NULL THEN
        RAISE EXCEPTION 'key % has no credit limit', v_key.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A key whose credits are NULL may make any number of requests.',
                  HINT = 'Give it credits with update_key(..., credits => n).';
    END IF;
    v_period := apikeys._credit_period(v_key.credits_refill_interval, clock_timestamp());
    v_base := apikeys._credits_base(v_key, v_period);
    v_left := GREATEST(v_base - apikeys._credits_unflushed(v_key.id, v_period), 0);
    IF v_left + delta < 0 THEN
        RAISE EXCEPTION 'key % has % credits left', v_key.id, v_left
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Taking away %s would leave fewer than none.', -delta);
    END IF;
    IF v_base + delta > 1000000000000000 THEN
        RAISE EXCEPTION 'a key holds at most 10^15 credits' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The audit row (credits_changed) and the notification come from the table's triggers.
    PERFORM set_config('apikeys.audit_context', 'add_credits', true);
    UPDATE apikeys.keys k SET credits = v_base + delta, credits_period = v_period
     WHERE k.id = v_key.id;
    PERFORM set_config('apikeys.audit_context', '', true);
    RETURN v_left + delta;
END
$$;
COMMENT ON FUNCTION apikeys._add_credits(uuid, text, bigint) IS 'Internal: the body of add_credits(), on any owner''s key (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._add_credits_owned(key_id uuid, owner text, delta bigint)
RETURNS bigint
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT apikeys._add_credits($1, apikeys._owner_given($2, 'permission denied to add credits to a key without naming its owner'), $3)
$$;
COMMENT ON FUNCTION apikeys._add_credits_owned(uuid, text, bigint) IS 'Internal: add_credits() on a key of the owner given, which may not be NULL.';

CREATE FUNCTION apikeys.add_credits(key_id uuid, owner text, delta bigint)
RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $2 IS NOT NULL THEN
        RETURN apikeys._add_credits_owned($1, $2, $3);
    END IF;
    PERFORM apikeys._require_admin('permission denied to add credits to a key without naming its owner');
    RETURN apikeys._add_credits($1, NULL, $3);
END
$$;
COMMENT ON FUNCTION apikeys.add_credits(uuid, text, bigint) IS 'Adds delta credits to a key (negative: takes them away) and returns what it has left; exact under concurrent verification; audited as credits_changed.';

-- The work of usage(); PL/pgSQL cannot name an input and a result column
-- alike (key_id), so usage() is a SQL wrapper around this.  Per key and UTC
-- day; today's row includes the counts still in shared memory, as
-- list_keys does.
CREATE FUNCTION apikeys._usage(p_owner text, p_from_day date, p_to_day date, p_key_id uuid)
RETURNS TABLE (usage_key_id uuid, usage_day date, usage_requests bigint, usage_failures bigint,
               usage_error_rate double precision, usage_last_used_at timestamptz)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    IF p_from_day IS NULL OR p_to_day IS NULL THEN
        RAISE EXCEPTION 'from_day and to_day must not be null' USING ERRCODE = 'invalid_parameter_value';
    ELSIF NOT isfinite(p_from_day) OR NOT isfinite(p_to_day) THEN
        RAISE EXCEPTION 'from_day and to_day must be finite dates' USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_from_day > p_to_day THEN
        RAISE EXCEPTION 'from_day is after to_day' USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_to_day - p_from_day >= 366 THEN
        RAISE EXCEPTION 'a usage query covers at most 366 days' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_key_id IS NOT NULL AND NOT EXISTS (
           SELECT FROM apikeys.keys k
            WHERE k.id = p_key_id AND (p_owner IS NULL OR k.owner = p_owner)) THEN
        RAISE EXCEPTION 'key % not found', p_key_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY
    WITH owned AS (
        SELECT k.id FROM apikeys.keys k
         WHERE (p_owner IS NULL OR k.owner = p_owner)
           AND (p_key_id IS NULL OR k.id = p_key_id)),
    counted AS (
        SELECT ku.key_id AS id, ku.day AS d, ku.requests AS r, ku.failures AS f, ku.last_used_at AS l
          FROM owned JOIN apikeys.key_usage ku ON ku.key_id = owned.id
         WHERE ku.day BETWEEN p_from_day AND p_to_day
        UNION ALL
        SELECT owned.id, v_today, p.requests, p.failures, p.last_used_at
          FROM owned CROSS JOIN LATERAL apikeys._pending_usage(owned.id) p
         WHERE v_today BETWEEN p_from_day AND p_to_day
           AND (p.requests > 0 OR p.failures > 0))
    SELECT c.id, c.d, sum(c.r)::bigint, sum(c.f)::bigint,
           CASE WHEN sum(c.r) + sum(c.f) = 0 THEN NULL
                ELSE sum(c.f)::double precision / (sum(c.r) + sum(c.f)) END,
           max(c.l)
      FROM counted c
     GROUP BY c.id, c.d
     ORDER BY c.d, c.id;
END
$$;
COMMENT ON FUNCTION apikeys._usage(text, date, date, uuid) IS 'Internal: the body of usage(), for any owner (EXECUTE: apikeys_admin only).';

CREATE FUNCTION apikeys._usage_owned(p_owner text, p_from_day date, p_to_day date, p_key_id uuid)
RETURNS TABLE (usage_key_id uuid, usage_day date, usage_requests bigint, usage_failures bigint,
               usage_error_rate double precision, usage_last_used_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM apikeys._usage(apikeys._owner_given($1, 'permission denied to read usage without naming an owner'), $2, $3, $4)
$$;
COMMENT ON FUNCTION apikeys._usage_owned(text, date, date, uuid) IS 'Internal: usage() of the owner given, which may not be NULL.';

-- usage() is SQL (its input and result both name key_id), so it cannot
-- choose between the two; this does, as its caller.
CREATE FUNCTION apikeys._usage_call(p_owner text, p_from_day date, p_to_day date, p_key_id uuid)
RETURNS TABLE (usage_key_id uuid, usage_day date, usage_requests bigint, usage_failures bigint,
               usage_error_rate double precision, usage_last_used_at timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_owner IS NOT NULL THEN
        RETURN QUERY SELECT * FROM apikeys._usage_owned(p_owner, p_from_day, p_to_day, p_key_id);
        RETURN;
    END IF;
    PERFORM apikeys._require_admin('permission denied to read usage without naming an owner');
    RETURN QUERY SELECT * FROM apikeys._usage(NULL, p_from_day, p_to_day, p_key_id);
END
$$;
COMMENT ON FUNCTION apikeys._usage_call(text, date, date, uuid) IS 'Internal: usage() as its caller, through _usage_owned() or, for apikeys_admin without an owner, _usage().';

CREATE FUNCTION apikeys.usage(owner text, from_day date, to_day date, key_id uuid DEFAULT NULL)
RETURNS TABLE (key_id uuid, day date, requests bigint, failures bigint,
               error_rate double precision, last_used_at timestamptz)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM apikeys._usage_call(owner, from_day, to_day, key_id)
$$;
COMMENT ON FUNCTION apikeys.usage(text, date, date, uuid) IS 'Requests, failures, error rate and last use per key and UTC day (at most 366 days), counts not yet written included.';

CREATE FUNCTION apikeys.set_plan(owner text, plan text)
RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM apikeys._require_text(set_plan.owner, 'owner', 200);
    IF set_plan.plan IS NULL THEN
        RAISE EXCEPTION 'plan must not be null' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT FROM apikeys.plans p WHERE p.name = set_plan.plan) THEN
        RAISE EXCEPTION 'unknown plan "%"', set_plan.plan USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The plans are the rows of apikeys.plans.';
    END IF;
    INSERT INTO apikeys.owners (owner, plan) VALUES (set_plan.owner, set_plan.plan)
        ON CONFLICT (owner) DO NOTHING;
    PERFORM apikeys._lock_owner(set_plan.owner);
    UPDATE apikeys.owners o SET plan = set_plan.plan, updated_at = now()
     WHERE o.owner = set_plan.owner;
END
$$;
COMMENT ON FUNCTION apikeys.set_plan(text, text) IS 'Moves an owner to a plan; existing keys keep working.';

CREATE FUNCTION apikeys.audit_verify()
RETURNS TABLE (ok boolean, rows_checked bigint, first_bad_id bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_zero  CONSTANT bytea := E'\\x0000000000000000000000000000000000000000000000000000000000000000';
    v_row   apikeys.audit_log;
    v_prev  apikeys.audit_log;
    v_count bigint := 0;
BEGIN
    FOR v_row IN SELECT * FROM apikeys.audit_log a ORDER BY a.id LOOP
        v_count := v_count + 1;
        IF v_prev.id IS NULL THEN
            -- The first row chains from zeros, or from the rows a purge removed,
            -- as recorded by that purge's own (chained) audit_purged row.
            IF v_row.prev_hash <> v_zero AND NOT EXISTS (
                SELECT FROM apikeys.audit_log p
                 WHERE p.event = 'audit_purged'
                   AND p.details ->> 'last_purged_hash' = encode(v_row.prev_hash, 'hex')
                   AND (p.details ->> 'purged_through_id')::bigint = v_row.id - 1) THEN
                RETURN QUERY SELECT false, v_count, v_row.id;
                RETURN;
            END IF;
        ELSIF v_row.id <> (v_prev.id + 1)
              OR v_row.prev_hash <> v_prev.hash THEN
            RETURN QUERY SELECT false, v_count, v_row.id;
            RETURN;
        END IF;
        IF v_row.hash <> apikeys._audit_hash(v_row.prev_hash, apikeys._audit_payload(v_row)) THEN
            RETURN QUERY SELECT false, v_count, v_row.id;
            RETURN;
        END IF;
        v_prev := v_row;
    END LOOP;
    RETURN QUERY SELECT true, v_count, NULL::bigint;
END
$$;
COMMENT ON FUNCTION apikeys.audit_verify() IS 'Walks the audit log''s hash chain; the first row that does not verify, if any.';

CREATE FUNCTION apikeys.purge_audit(before timestamptz)
RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_through apikeys.audit_log;
    v_count   bigint;
BEGIN
    IF purge_audit.before IS NULL THEN
        RAISE EXCEPTION 'before must not be null' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF purge_audit.before > (now() - apikeys._audit_retention_min()) THEN
        RAISE EXCEPTION 'audit rows younger than apikeys.audit_retention_min are kept'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('purge_audit() removes only rows older than %s.', apikeys._audit_retention_min()),
                  HINT = 'A superuser can lower apikeys.audit_retention_min.';
    END IF;
    -- Only a prefix of the chain can go, so the rest still verifies.
    PERFORM FROM apikeys._audit_chain_lock l FOR UPDATE;
    SELECT * INTO v_through FROM apikeys.audit_log a
     WHERE a.id = (SELECT max(b.id) FROM apikeys.audit_log b
                    WHERE b.at < purge_audit.before);
    IF v_through.id IS NULL THEN
        RETURN 0;
    END IF;

    PERFORM apikeys._audit('audit_purged', NULL, NULL,
        jsonb_build_object('before', purge_audit.before,
            'purged_through_id', v_through.id,
            'last_purged_hash', encode(v_through.hash, 'hex')));

    -- The append-only trigger refuses every DELETE; this one is the exception.
    SET LOCAL session_replication_role = replica;
    DELETE FROM apikeys.audit_log a WHERE a.id <= v_through.id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    SET LOCAL session_replication_role = origin;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION apikeys.purge_audit(timestamptz) IS 'Removes audit rows older than a time, keeping the chain verifiable; audited as audit_purged.';

CREATE FUNCTION apikeys.status()
RETURNS TABLE (preloaded boolean, usage_tracking boolean, rate_limits boolean,
               failure_audit boolean, default_prefix text, queued_records bigint,
               records_queued_total bigint, records_dropped bigint,
               tracked_keys bigint, untracked_requests bigint, in_recovery boolean,
               workers bigint, worker_start_failures bigint, flush_failures bigint,
               records_lost bigint)
    AS 'MODULE_PATHNAME', 'apikeys_status'
    LANGUAGE C STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION apikeys.status() IS 'Which parts of apikeys are active on this server.';

-- Asks this database's background worker to write what is queued and
-- counted now; true once a flush that began after the call has completed.
CREATE FUNCTION apikeys.flush(timeout interval DEFAULT '30 seconds')
RETURNS boolean
    AS 'MODULE_PATHNAME', 'apikeys_flush'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION apikeys.flush(interval) IS 'Has this database''s worker write queued records and usage counts now; false if that takes longer than timeout.';

------------------------------------------------------------------------------
-- 8. Trigger functions: the invariants hold for every writer, and every
-- change is audited in its own transaction.  Section 9 attaches them.
------------------------------------------------------------------------------

-- The guards on apikeys.keys: bounds and the plan limit on a new key;
-- columns fixed at creation, no reactivation, bounds and the plan limit on
-- an update; no DELETE or TRUNCATE.
CREATE FUNCTION apikeys._keys_before_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF apikeys._restoring(TG_RELID) THEN
        RETURN NEW;
    END IF;
    PERFORM apikeys._require_key_fields(NEW);
    -- A rotation's new key takes the place of the key it replaces, which no
    -- longer counts: the owner's count does not grow, even above a lowered limit.
    IF apikeys._counts(NEW) AND NOT EXISTS (
           SELECT FROM apikeys.keys k
            WHERE k.id = NEW.rotated_from
              AND k.replaced_by = NEW.id
              AND k.owner = NEW.owner) THEN
        PERFORM apikeys._enforce_plan_limit(NEW.owner);
    ELSE
        PERFORM apikeys._ensure_owner(NEW.owner);
    END IF;
    IF NEW.revoked_at IS NOT NULL AND NEW.revoked_by IS NULL THEN
        NEW.revoked_by := apikeys._actor();
    END IF;
    -- A key's first credits belong to the refill period it is created in.
    NEW.credits_period := apikeys._credit_period(NEW.credits_refill_interval, clock_timestamp());
    NEW.credits_gen := 0;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikeys._keys_before_insert() IS 'Internal: plan limit on new keys.';

CREATE FUNCTION apikeys._keys_before_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_column text;
    v_period integer;
BEGIN
    -- The worker writing spent credits (src/worker.c) changes nothing else.
    IF apikeys._credits_flush(OLD, NEW) THEN
        RETURN NEW;
    END IF;
    v_column := CASE
        WHEN NEW.id IS DISTINCT FROM OLD.id THEN 'id'
        WHEN NEW.owner IS DISTINCT FROM OLD.owner THEN 'owner'
        WHEN NEW.prefix IS DISTINCT FROM OLD.prefix THEN 'prefix'
        WHEN NEW.start IS DISTINCT FROM OLD.start THEN 'start'
        WHEN NEW.digest IS DISTINCT FROM OLD.digest THEN 'digest'
        WHEN NEW.created_at IS DISTINCT FROM OLD.created_at THEN 'created_at'
        WHEN NEW.created_by IS DISTINCT FROM OLD.created_by THEN 'created_by'
        WHEN NEW.rotated_from IS DISTINCT FROM OLD.rotated_from THEN 'rotated_from'
    END;
    IF v_column IS NOT NULL THEN
        RAISE EXCEPTION 'column "%" of apikeys.keys cannot be changed', v_column
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'A key''s id, owner, prefix, start, digest, created_at, created_by and rotated_from are fixed when it is created.';
    END IF;

    IF OLD.revoked_at IS NOT NULL AND (NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
                                       OR NEW.revoked_by IS DISTINCT FROM OLD.revoked_by
                                       OR NEW.revoke_reason IS DISTINCT FROM OLD.revoke_reason
                                       OR NEW.disabled_at IS DISTINCT FROM OLD.disabled_at) THEN
        RAISE EXCEPTION 'key % is revoked', OLD.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A revoked key stays revoked: its revoked_at, revoked_by, revoke_reason and disabled_at never change.',
                  HINT = 'Create a new key instead.';
    END IF;

    IF OLD.replaced_by IS NOT NULL AND NEW.replaced_by IS DISTINCT FROM OLD.replaced_by THEN
        RAISE EXCEPTION 'key % was already rotated', OLD.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The key that replaced a rotated key is fixed.';
    END IF;

    -- A rotated key's grace may end sooner, never later: it is capped by
    -- apikeys.max_rotation_grace when rotate() sets it.
    IF OLD.replaced_by IS NOT NULL AND OLD.expires_at IS NOT NULL
       AND (NEW.expires_at IS NULL OR NEW.expires_at > OLD.expires_at) THEN
        RAISE EXCEPTION 'the grace of rotated key % cannot be extended', OLD.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A rotated key stays valid at most until the end of the grace its rotation gave it.';
    END IF;

    IF NEW.revoke_reason IS DISTINCT FROM OLD.revoke_reason
       AND length(NEW.revoke_reason) > 1000 THEN
        RAISE EXCEPTION 'reason is longer than 1000 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF NEW.name IS DISTINCT FROM OLD.name OR NEW.scopes IS DISTINCT FROM OLD.scopes
       OR NEW.metadata IS DISTINCT FROM OLD.metadata OR NEW.rate_limit IS DISTINCT FROM OLD.rate_limit
       OR NEW.allowed_ips IS DISTINCT FROM OLD.allowed_ips
       OR NEW.alert_requests_per_minute IS DISTINCT FROM OLD.alert_requests_per_minute
       OR NEW.rate_burst IS DISTINCT FROM OLD.rate_burst
       OR NEW.disable_reason IS DISTINCT FROM OLD.disable_reason
       OR NEW.credits IS DISTINCT FROM OLD.credits
       OR NEW.credits_refill_amount IS DISTINCT FROM OLD.credits_refill_amount
       OR NEW.credits_refill_interval IS DISTINCT FROM OLD.credits_refill_interval THEN
        PERFORM apikeys._require_key_fields(NEW);
    END IF;

    -- Any other change of the balance or the refill starts a new generation,
    -- which verify sees and reloads the balance it keeps in shared memory
    -- (src/credits.c).  The balance then belongs to the current period.  A
    -- change of the refill alone keeps what the key has left: a balance
    -- whose period is past is refilled first, and when the refill interval
    -- changes, the spending not yet written is taken off here, since the
    -- worker writes no spending made under another interval.
    NEW.credits_gen := OLD.credits_gen;
    IF NEW.credits IS DISTINCT FROM OLD.credits
       OR NEW.credits_refill_amount IS DISTINCT FROM OLD.credits_refill_amount
       OR NEW.credits_refill_interval IS DISTINCT FROM OLD.credits_refill_interval
       OR NEW.credits_period IS DISTINCT FROM OLD.credits_period THEN
        IF NEW.credits IS NOT DISTINCT FROM OLD.credits AND NEW.credits IS NOT NULL
           AND NEW.credits_period = OLD.credits_period THEN
            v_period := apikeys._credit_period(OLD.credits_refill_interval, clock_timestamp());
            NEW.credits := apikeys._credits_base(OLD, v_period);
            IF NEW.credits_refill_interval IS DISTINCT FROM OLD.credits_refill_interval THEN
                NEW.credits := GREATEST(NEW.credits - apikeys._credits_unflushed(OLD.id, v_period), 0);
            END IF;
        END IF;
        NEW.credits_period := apikeys._credit_period(NEW.credits_refill_interval, clock_timestamp());
        NEW.credits_gen := OLD.credits_gen + 1;
    END IF;

    IF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL AND NEW.revoked_by IS NULL THEN
        NEW.revoked_by := apikeys._actor();
    END IF;
    IF OLD.disabled_at IS NULL AND NEW.disabled_at IS NOT NULL AND NEW.disabled_by IS NULL THEN
        NEW.disabled_by := apikeys._actor();
    END IF;

    -- Extending an expired key's expiry brings it back into the count.
    IF NOT apikeys._counts(OLD) AND apikeys._counts(NEW) THEN
        PERFORM apikeys._enforce_plan_limit(NEW.owner);
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikeys._keys_before_update() IS 'Internal: immutable columns, no reactivation, plan limit on revived keys.';

CREATE FUNCTION apikeys._keys_refuse_delete() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'keys are never deleted'
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Revoked and expired keys stay in apikeys.keys for audit.',
              HINT = 'Use apikeys.revoke() to disable a key.';
END
$$;
COMMENT ON FUNCTION apikeys._keys_refuse_delete() IS 'Internal: keys are never deleted or truncated.';

-- The bounds on an owner, for every writer (functions and SQL alike).
CREATE FUNCTION apikeys._owners_before_write() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT apikeys._restoring(TG_RELID) THEN
        PERFORM apikeys._require_text(NEW.owner, 'owner', 200);
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikeys._owners_before_write() IS 'Internal: the bounds on an owner, for every writer.';

-- Checks what admins write to plans.  A restore replays plans over the
-- seeded rows the extension script just wrote: the dumped row (perhaps an
-- edited limit) replaces the seed.
CREATE FUNCTION apikeys._plans_before_write() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' AND apikeys._restoring(TG_RELID) THEN
        IF EXISTS (SELECT FROM apikeys.plans p WHERE p.name = NEW.name) THEN
            UPDATE apikeys.plans p
               SET max_keys = NEW.max_keys, description = NEW.description,
                   max_key_lifetime = NEW.max_key_lifetime,
                   alert_requests_per_minute = NEW.alert_requests_per_minute,
                   rate_limit = NEW.rate_limit
             WHERE p.name = NEW.name;
            RETURN NULL;
        END IF;
        RETURN NEW;
    END IF;
    PERFORM apikeys._require_text(NEW.name, 'plan name', 63);
    IF NEW.max_keys < 0 THEN
        RAISE EXCEPTION 'max_keys must be zero or more' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL means unlimited.';
    END IF;
    IF length(NEW.description) > 1000 THEN
        RAISE EXCEPTION 'description is longer than 1000 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.max_key_lifetime <= '0'::interval THEN
        RAISE EXCEPTION 'max_key_lifetime must be positive' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL means keys may live for ever.';
    END IF;
    IF NEW.alert_requests_per_minute < 0 THEN
        RAISE EXCEPTION 'alert_requests_per_minute must be zero or more' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Zero turns alerts off for the plan; NULL uses apikeys.alert_requests_per_minute.';
    END IF;
    IF NEW.rate_limit <= 0 THEN
        RAISE EXCEPTION 'rate_limit must be positive' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL means no owner-wide limit.';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikeys._plans_before_write() IS 'Internal: bounds on plans; a restored plan row replaces the seeded one.';

-- Chains every new row: one writer at a time (the lock on the row of
-- apikeys._audit_chain_lock, held until commit), ids without gaps, hash
-- over the previous hash and this row.  A restore keeps rows exactly as
-- dumped.
CREATE FUNCTION apikeys._audit_before_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tail record;
BEGIN
    IF apikeys._restoring(TG_RELID) THEN
        RETURN NEW;
    END IF;
    PERFORM FROM apikeys._audit_chain_lock l FOR UPDATE;
    SELECT * INTO v_tail FROM apikeys._audit_tail();
    NEW.id := COALESCE(v_tail.last_id, 0) + 1;
    NEW.prev_hash := COALESCE(v_tail.last_hash, E'\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.at := COALESCE(NEW.at, now());
    NEW.actor := COALESCE(NEW.actor, apikeys._actor());
    NEW.db_user := COALESCE(NEW.db_user, apikeys._caller());
    NEW.client_addr := COALESCE(NEW.client_addr, inet_client_addr());
    NEW.details := COALESCE(NEW.details, '{}');
    NEW.hash := apikeys._audit_hash(NEW.prev_hash, apikeys._audit_payload(NEW));
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikeys._audit_before_insert() IS 'Internal: assigns id, prev_hash and hash to a new audit row.';

CREATE FUNCTION apikeys._audit_refuse_change() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'apikeys.audit_log is append-only'
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = format('%s on the audit log is refused for every role.', TG_OP),
              HINT = 'Old rows are removed only by apikeys.purge_audit(), which keeps the chain verifiable.';
END
$$;
COMMENT ON FUNCTION apikeys._audit_refuse_change() IS 'Internal: the audit log is append-only.';

-- Lifecycle events, in the transaction of the change, whoever writes it,
-- each also sent as NOTIFY apikeys_event (delivered at commit) so that
-- applications can drop what they cached.  Functions name their context
-- (revoke_all, revoke_token) in the superuser-only setting
-- apikeys.audit_context, read through the library.
CREATE FUNCTION apikeys._keys_audit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_context text := apikeys._audit_context();
    v_old     jsonb;
    v_new     jsonb;
    v_changed text[];
    v_events  text[] := '{}';
    v_event   text;
BEGIN
    IF apikeys._restoring(TG_RELID)
       OR (TG_OP = 'UPDATE' AND apikeys._credits_flush(OLD, NEW)) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM apikeys._audit('key_created', NEW.id, NEW.owner,
            jsonb_build_object('name', NEW.name, 'start', NEW.start, 'scopes', NEW.scopes,
                'expires_at', NEW.expires_at, 'rate_limit', NEW.rate_limit,
                'rotated_from', NEW.rotated_from, 'revoked_at', NEW.revoked_at,
                'allowed_ips', NEW.allowed_ips,
                'alert_requests_per_minute', NEW.alert_requests_per_minute,
                'rate_burst', NEW.rate_burst, 'credits', NEW.credits,
                'credits_refill_amount', NEW.credits_refill_amount,
                'credits_refill_interval', NEW.credits_refill_interval));
        v_events := ARRAY['created'];
    ELSIF OLD.replaced_by IS NULL AND NEW.replaced_by IS NOT NULL THEN
        PERFORM apikeys._audit('key_rotated', NEW.id, NEW.owner,
            jsonb_build_object('replaced_by', NEW.replaced_by,
                'valid_until', COALESCE(NEW.revoked_at, NEW.expires_at)));
        v_events := ARRAY['rotated'];
    ELSIF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        PERFORM apikeys._audit(
            CASE v_context WHEN 'revoke_all' THEN 'keys_revoked_all'
                           WHEN 'revoke_token' THEN 'key_revoked_by_token'
                           ELSE 'key_revoked' END,
            NEW.id, NEW.owner,
            jsonb_build_object('reason', NEW.revoke_reason, 'revoked_at', NEW.revoked_at));
        v_events := ARRAY['revoked'];
    ELSE
        IF OLD.disabled_at IS NULL AND NEW.disabled_at IS NOT NULL THEN
            PERFORM apikeys._audit('key_disabled', NEW.id, NEW.owner,
                jsonb_build_object('reason', NEW.disable_reason, 'disabled_at', NEW.disabled_at));
            v_events := v_events || 'disabled'::text;
        ELSIF OLD.disabled_at IS NOT NULL AND NEW.disabled_at IS NULL THEN
            PERFORM apikeys._audit('key_enabled', NEW.id, NEW.owner,
                jsonb_build_object('disabled_at', OLD.disabled_at));
            v_events := v_events || 'enabled'::text;
        END IF;
        -- The changed fields, old and new: never a digest (which cannot change).
        v_old := to_jsonb(OLD);
        v_new := to_jsonb(NEW);
        v_changed := ARRAY(SELECT f FROM unnest(ARRAY['name', 'scopes', 'metadata', 'rate_limit',
                                                      'expires_at', 'allowed_ips',
                                                      'alert_requests_per_minute', 'rate_burst']) f
                            WHERE v_old -> f IS DISTINCT FROM v_new -> f);
        IF cardinality(v_changed) > 0 THEN
            PERFORM apikeys._audit('key_updated', NEW.id, NEW.owner,
                jsonb_build_object('changed', v_changed,
                    'old', (SELECT jsonb_object_agg(f, v_old -> f) FROM unnest(v_changed) f),
                    'new', (SELECT jsonb_object_agg(f, v_new -> f) FROM unnest(v_changed) f)));
            v_events := v_events || 'updated'::text;
        END IF;
        -- Balances as the key's owner sees them: spending not yet written included.
        IF NEW.credits_gen <> OLD.credits_gen THEN
            PERFORM apikeys._audit('credits_changed', NEW.id, NEW.owner,
                jsonb_build_object('credits', apikeys._credits_left(NEW),
                    'previous', apikeys._credits_left(OLD),
                    'refill_amount', NEW.credits_refill_amount,
                    'refill_interval', NEW.credits_refill_interval,
                    'via', NULLIF(v_context, '')));
            v_events := v_events || 'credits_changed'::text;
        END IF;
    END IF;
    FOREACH v_event IN ARRAY v_events LOOP
        PERFORM pg_notify('apikeys_event',
            jsonb_build_object('key_id', NEW.id, 'owner', NEW.owner, 'event', v_event)::text);
    END LOOP;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikeys._keys_audit() IS 'Internal: audit rows and NOTIFY apikeys_event for key changes.';

CREATE FUNCTION apikeys._owners_audit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF apikeys._restoring(TG_RELID) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM apikeys._audit('owner_created', NULL, NEW.owner,
            jsonb_build_object('plan', NEW.plan));
    ELSIF NEW.plan IS DISTINCT FROM OLD.plan THEN
        PERFORM apikeys._audit('plan_changed', NULL, NEW.owner,
            jsonb_build_object('from', OLD.plan, 'to', NEW.plan));
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikeys._owners_audit() IS 'Internal: audit rows for owner and plan changes.';

-- Every change an admin makes to a plan, with the row before and after.
CREATE FUNCTION apikeys._plans_audit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF apikeys._restoring(TG_RELID)
       OR (TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD) THEN
        RETURN NULL;
    END IF;
    INSERT INTO apikeys.audit_log (event, details)
    VALUES ('plan_updated', jsonb_build_object(
        'plan', CASE TG_OP WHEN 'DELETE' THEN OLD.name ELSE NEW.name END,
        'change', lower(TG_OP),
        'old', CASE TG_OP WHEN 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
        'new', CASE TG_OP WHEN 'DELETE' THEN NULL ELSE to_jsonb(NEW) END));
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikeys._plans_audit() IS 'Internal: audit rows for changes to plans.';

------------------------------------------------------------------------------
-- 9. Triggers.  Before-triggers guard, after-triggers audit.  A table's
-- triggers of one kind fire in the order of their names.
------------------------------------------------------------------------------

-- apikeys.keys
CREATE TRIGGER keys_before_insert BEFORE INSERT ON apikeys.keys
    FOR EACH ROW EXECUTE FUNCTION apikeys._keys_before_insert();
CREATE TRIGGER keys_before_update BEFORE UPDATE ON apikeys.keys
    FOR EACH ROW EXECUTE FUNCTION apikeys._keys_before_update();
CREATE TRIGGER keys_refuse_delete BEFORE DELETE ON apikeys.keys
    FOR EACH ROW EXECUTE FUNCTION apikeys._keys_refuse_delete();
CREATE TRIGGER keys_refuse_truncate BEFORE TRUNCATE ON apikeys.keys
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys._keys_refuse_delete();
CREATE TRIGGER keys_audit AFTER INSERT OR UPDATE ON apikeys.keys
    FOR EACH ROW EXECUTE FUNCTION apikeys._keys_audit();

-- apikeys.owners
CREATE TRIGGER owners_before_write BEFORE INSERT OR UPDATE OF owner ON apikeys.owners
    FOR EACH ROW EXECUTE FUNCTION apikeys._owners_before_write();
CREATE TRIGGER owners_audit AFTER INSERT OR UPDATE ON apikeys.owners
    FOR EACH ROW EXECUTE FUNCTION apikeys._owners_audit();
CREATE TRIGGER owners_policy_changed AFTER UPDATE OF plan OR DELETE OR TRUNCATE ON apikeys.owners
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys._policy_changed();

-- apikeys.plans
CREATE TRIGGER plans_before_write BEFORE INSERT OR UPDATE ON apikeys.plans
    FOR EACH ROW EXECUTE FUNCTION apikeys._plans_before_write();
CREATE TRIGGER plans_audit AFTER INSERT OR UPDATE OR DELETE ON apikeys.plans
    FOR EACH ROW EXECUTE FUNCTION apikeys._plans_audit();
CREATE TRIGGER plans_policy_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikeys.plans
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys._policy_changed();

-- apikeys.audit_log
CREATE TRIGGER audit_before_insert BEFORE INSERT ON apikeys.audit_log
    FOR EACH ROW EXECUTE FUNCTION apikeys._audit_before_insert();
CREATE TRIGGER audit_refuse_change BEFORE UPDATE OR DELETE ON apikeys.audit_log
    FOR EACH ROW EXECUTE FUNCTION apikeys._audit_refuse_change();
CREATE TRIGGER audit_refuse_truncate BEFORE TRUNCATE ON apikeys.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys._audit_refuse_change();

------------------------------------------------------------------------------
-- 10. Privileges.  PUBLIC gets nothing.  apikeys_app may call verify,
-- authenticate, create_key, list_keys, get_key, update_key, disable_key,
-- enable_key, usage, revoke, rotate, the apikey functions and status.  apikeys_admin may call those and revoke_all, revoke_token,
-- set_plan, audit_verify, purge_audit and flush; it may read every table but
-- _audit_chain_lock, write plans, and update the columns of keys that may
-- change.  apikeys_worker writes what the background workers write.  Of the
-- internal functions, both roles may call _require_admin and the _owned and
-- _call forms (which refuse a NULL owner), and apikeys_admin those that act
-- on any owner's keys; no role any other.  README.md, "Roles and
-- privileges", has the whole matrix.
------------------------------------------------------------------------------
REVOKE ALL ON SCHEMA apikeys FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA apikeys FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA apikeys FROM PUBLIC;
REVOKE ALL ON TYPE apikeys.apikey, apikeys.verify_result, apikeys.authenticate_result,
    apikeys.key_info FROM PUBLIC;

GRANT USAGE ON SCHEMA apikeys TO apikeys_admin, apikeys_app, apikeys_worker;
GRANT USAGE ON TYPE apikeys.apikey, apikeys.verify_result, apikeys.authenticate_result,
    apikeys.key_info TO apikeys_admin, apikeys_app;

GRANT EXECUTE ON FUNCTION
    apikeys.verify(text, text[], inet, integer),
    apikeys.authenticate(text, text[], inet, integer),
    apikeys.create_key(text, text, text[], timestamptz, text, jsonb, integer, cidr[], integer, integer, bigint, bigint, text),
    apikeys.list_keys(text, text, integer, uuid),
    apikeys.get_key(uuid, text),
    apikeys.update_key(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]),
    apikeys.disable_key(uuid, text, text),
    apikeys.enable_key(uuid, text),
    apikeys.add_credits(uuid, text, bigint),
    apikeys.usage(text, date, date, uuid),
    apikeys.revoke(uuid, text, text),
    apikeys.rotate(uuid, text, interval),
    apikeys.prefix(apikeys.apikey),
    apikeys.start(apikeys.apikey),
    apikeys.digest(apikeys.apikey),
    apikeys.is_well_formed(text),
    apikeys.status()
TO apikeys_app, apikeys_admin;

GRANT EXECUTE ON FUNCTION
    apikeys.revoke_all(text, text),
    apikeys.revoke_token(text, text),
    apikeys.set_plan(text, text),
    apikeys.audit_verify(),
    apikeys.purge_audit(timestamptz),
    apikeys.flush(interval)
TO apikeys_admin;

-- Who may omit an owner (section "Who may omit an owner" above).
GRANT EXECUTE ON FUNCTION
    apikeys._require_admin(text),
    apikeys._revoke_owned(uuid, text, text),
    apikeys._rotate_owned(uuid, text, interval),
    apikeys._rotate_call(uuid, text, interval),
    apikeys._get_key_owned(uuid, text),
    apikeys._update_key_owned(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]),
    apikeys._disable_key_owned(uuid, text, text),
    apikeys._enable_key_owned(uuid, text),
    apikeys._add_credits_owned(uuid, text, bigint),
    apikeys._usage_owned(text, date, date, uuid),
    apikeys._usage_call(text, date, date, uuid)
TO apikeys_app, apikeys_admin;
GRANT EXECUTE ON FUNCTION
    apikeys._revoke(uuid, text, text),
    apikeys._rotate(uuid, text, interval),
    apikeys._get_key(uuid, text),
    apikeys._update_key(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]),
    apikeys._disable_key(uuid, text, text),
    apikeys._enable_key(uuid, text),
    apikeys._add_credits(uuid, text, bigint),
    apikeys._usage(text, date, date, uuid)
TO apikeys_admin;

GRANT SELECT ON ALL TABLES IN SCHEMA apikeys TO apikeys_admin;
REVOKE SELECT ON apikeys._audit_chain_lock FROM apikeys_admin;
GRANT INSERT, UPDATE, DELETE ON apikeys.plans TO apikeys_admin;
GRANT UPDATE (name, scopes, metadata, rate_limit, expires_at, allowed_ips, alert_requests_per_minute,
               rate_burst, credits, credits_refill_amount, credits_refill_interval)
    ON apikeys.keys TO apikeys_admin;

-- The background workers: queued records into the audit log, counts into key_usage.
GRANT INSERT ON apikeys.audit_log TO apikeys_worker;
GRANT SELECT, INSERT, UPDATE ON apikeys.key_usage TO apikeys_worker;
-- The worker writes spent credits.
GRANT SELECT (id, credits, credits_period, credits_refill_amount, credits_refill_interval),
      UPDATE (credits, credits_period) ON apikeys.keys TO apikeys_worker;
