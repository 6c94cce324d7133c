-- apikeys 1.0 -> 1.1: ALTER EXTENSION apikeys UPDATE runs this script.
--
-- Adds what an application needs to manage keys without an admin
-- connection: update_key, get_key, a paged list_keys, usage history,
-- disable_key/enable_key, NOTIFY apikeys_event, plan policies (key lifetime,
-- alert thresholds) and client-IP allow-lists.  Every token, audit row and
-- count is kept: columns are only added, and functions are replaced.
--
-- A fresh 1.1 install (sql/apikeys.sql) defines the same objects;
-- test/tap/008_upgrade.pl compares the two from the catalogs.  So every
-- definition below is written exactly as it is there.

\echo Use "ALTER EXTENSION apikeys UPDATE TO '1.1'" to load this file. \quit

------------------------------------------------------------------------------
-- Columns.  Appended, so a 1.0 row keeps its layout and needs no rewrite.
------------------------------------------------------------------------------
ALTER TABLE apikeys.plans
    ADD COLUMN max_key_lifetime interval
        CHECK (max_key_lifetime OPERATOR(pg_catalog.>) '0'::interval),
    ADD COLUMN alert_requests_per_minute integer
        CHECK (alert_requests_per_minute OPERATOR(pg_catalog.>=) 0),
    ADD COLUMN rate_limit integer CHECK (rate_limit OPERATOR(pg_catalog.>) 0);
COMMENT ON COLUMN apikeys.plans.max_key_lifetime IS 'Longest a key of this plan may live: created and rotated keys expire no later than this after their creation; NULL: no limit.';
COMMENT ON COLUMN apikeys.plans.alert_requests_per_minute IS 'Usage-alert threshold for this plan''s keys (0: off); NULL: apikeys.alert_requests_per_minute.';
COMMENT ON COLUMN apikeys.plans.rate_limit IS 'Requests per minute an owner on this plan may make across all its keys (burst: one minute''s worth), enforced with the preload; NULL: no owner-wide limit.';

ALTER TABLE apikeys.keys
    ADD COLUMN disabled_at timestamptz,
    ADD COLUMN disabled_by text,
    ADD COLUMN disable_reason text
        CHECK (pg_catalog.length(disable_reason) OPERATOR(pg_catalog.<=) 1000),
    ADD COLUMN allowed_ips cidr[]
        CHECK (pg_catalog.cardinality(allowed_ips) OPERATOR(pg_catalog.<=) 64),
    ADD COLUMN alert_requests_per_minute integer
        CHECK (alert_requests_per_minute OPERATOR(pg_catalog.>=) 0),
    ADD COLUMN rate_burst integer
        CHECK (rate_burst OPERATOR(pg_catalog.>=) 0
               AND rate_burst OPERATOR(pg_catalog.<=) 1000000),
    ADD COLUMN credits bigint CHECK (credits OPERATOR(pg_catalog.>=) 0),
    ADD COLUMN credits_refill_amount bigint
        CHECK (credits_refill_amount OPERATOR(pg_catalog.>) 0),
    ADD COLUMN credits_refill_interval text
        CHECK (credits_refill_interval OPERATOR(pg_catalog.=) ANY (ARRAY['day', 'month'])),
    ADD COLUMN credits_period integer NOT NULL DEFAULT 0,
    ADD COLUMN credits_gen bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT keys_credits_refill_check CHECK (
        (credits_refill_amount IS NULL) OPERATOR(pg_catalog.=) (credits_refill_interval IS NULL)
        AND (credits_refill_amount IS NULL OR credits IS NOT NULL));
-- Room on each page for the worker's writes of spent credits to stay HOT
-- (no index entries): pages written from now on.
ALTER TABLE apikeys.keys SET (fillfactor = 80);
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

-- Keyset paging of list_keys: (created_at, id) is the cursor.
DROP INDEX apikeys.keys_owner_created_idx;
CREATE INDEX keys_owner_created_idx ON apikeys.keys (owner, created_at, id);
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

------------------------------------------------------------------------------
-- Types.
------------------------------------------------------------------------------
ALTER TYPE apikeys.verify_result
    ADD ATTRIBUTE ratelimit_limit integer,
    ADD ATTRIBUTE ratelimit_remaining integer,
    ADD ATTRIBUTE ratelimit_reset timestamptz,
    ADD ATTRIBUTE credits_remaining bigint;
COMMENT ON COLUMN apikeys.verify_result.ratelimit_limit IS 'The rate limit (requests per minute) that leaves the fewest requests: the key''s rate_limit or its plan''s owner-wide one; NULL when neither applied.';
COMMENT ON COLUMN apikeys.verify_result.ratelimit_remaining IS 'Requests that limit would let the key make right now without being RATE_LIMITED; NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.verify_result.ratelimit_reset IS 'When ratelimit_remaining is 0, when the next request will pass (Retry-After); otherwise when the whole burst is available again. NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.verify_result.credits_remaining IS 'Credits the key has left after this call; NULL for a key without a credit limit, and before its key was found.';
ALTER TYPE apikeys.authenticate_result
    ADD ATTRIBUTE ratelimit_limit integer,
    ADD ATTRIBUTE ratelimit_remaining integer,
    ADD ATTRIBUTE ratelimit_reset timestamptz,
    ADD ATTRIBUTE credits_remaining bigint;
COMMENT ON COLUMN apikeys.authenticate_result.ratelimit_limit IS 'The rate limit (requests per minute) that leaves the fewest requests: the key''s rate_limit or its plan''s owner-wide one; NULL when neither applied.';
COMMENT ON COLUMN apikeys.authenticate_result.ratelimit_remaining IS 'Requests that limit would let the key make right now without being RATE_LIMITED; NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.authenticate_result.ratelimit_reset IS 'When ratelimit_remaining is 0, when the next request will pass (Retry-After); otherwise when the whole burst is available again. NULL when no rate limit was applied.';
COMMENT ON COLUMN apikeys.authenticate_result.credits_remaining IS 'Credits the key has left after this call; NULL for a key without a credit limit, and before its key was found.';
COMMENT ON COLUMN apikeys.verify_result.code IS 'VALID, API_KEY_INVALID, API_KEY_REVOKED, API_KEY_EXPIRED, API_KEY_DISABLED, IP_NOT_ALLOWED, INSUFFICIENT_SCOPE, RATE_LIMITED or USAGE_EXCEEDED.';

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
-- Internal functions.
------------------------------------------------------------------------------
-- The chain's zero hash is written E'\\x00...': a plain '\x00...' literal
-- reads as an escape string, and fails, where a database or role sets
-- standard_conforming_strings off.
CREATE OR REPLACE FUNCTION apikeys.audit_verify()
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

CREATE OR REPLACE FUNCTION apikeys._audit_before_insert() RETURNS trigger
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

-- Replaced by the EXECUTE grants of the internal functions (section "Who
-- may omit an owner" below).
DROP FUNCTION apikeys._caller_is_admin();

-- The bounds on what a key holds, for every writer (functions and SQL alike).
CREATE OR REPLACE FUNCTION apikeys._require_key_fields(k apikeys.keys) RETURNS void
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

-- Statement-level trigger on plans and owners: tells every backend that the
-- alert thresholds it cached for owners may have changed.
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

CREATE FUNCTION apikeys._policy_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'apikeys_policy_changed' LANGUAGE C;
COMMENT ON FUNCTION apikeys._policy_changed() IS 'Internal: invalidates the plan thresholds cached by verify.';

------------------------------------------------------------------------------
-- Public functions.
------------------------------------------------------------------------------
DROP FUNCTION apikeys.create_key(text, text, text[], timestamptz, text, jsonb, integer);
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

DROP FUNCTION apikeys.verify(text, text[]);
DROP FUNCTION apikeys.authenticate(text, text[]);
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

-- The work of rotate(); PL/pgSQL cannot name an input and a result column
-- alike (key_id), so rotate() is a SQL wrapper around this.
CREATE OR REPLACE FUNCTION apikeys._rotate(p_key_id uuid, p_owner text, grace interval)
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

CREATE OR REPLACE FUNCTION apikeys.rotate(key_id uuid, owner text DEFAULT NULL, grace interval DEFAULT '0')
RETURNS TABLE (key_id uuid, token apikeys.apikey, start text, old_key_expires_at timestamptz)
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM apikeys._rotate_call(key_id, owner, grace)
$$;
COMMENT ON FUNCTION apikeys.rotate(uuid, text, interval) IS 'Issues a replacement key; the old one is revoked now or valid until the grace ends.';

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

CREATE OR REPLACE FUNCTION apikeys.revoke(key_id uuid, owner text DEFAULT NULL, reason text DEFAULT NULL)
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

DROP FUNCTION apikeys.list_keys(text);
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

------------------------------------------------------------------------------
-- Trigger functions.
------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION apikeys._keys_before_insert() RETURNS trigger
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

CREATE OR REPLACE FUNCTION apikeys._keys_before_update() RETURNS trigger
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

-- Checks what admins write to plans.  A restore replays plans over the
-- seeded rows the extension script just wrote: the dumped row (perhaps an
-- edited limit) replaces the seed.
CREATE OR REPLACE FUNCTION apikeys._plans_before_write() RETURNS trigger
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

-- Lifecycle events, in the transaction of the change, whoever writes it,
-- each also sent as NOTIFY apikeys_event (delivered at commit) so that
-- applications can drop what they cached.  Functions name their context
-- (revoke_all, revoke_token) in the superuser-only setting
-- apikeys.audit_context, read through the library.
CREATE OR REPLACE FUNCTION apikeys._keys_audit() RETURNS trigger
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

------------------------------------------------------------------------------
-- Triggers.
------------------------------------------------------------------------------
CREATE TRIGGER owners_policy_changed AFTER UPDATE OF plan OR DELETE OR TRUNCATE ON apikeys.owners
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys._policy_changed();
CREATE TRIGGER plans_policy_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikeys.plans
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys._policy_changed();

------------------------------------------------------------------------------
-- Privileges.
------------------------------------------------------------------------------
REVOKE ALL ON FUNCTION
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
    apikeys._plan_lifetime(text),
    apikeys._expiry_within_plan(text, timestamptz, boolean),
    apikeys._key_for_change(uuid, text, text),
    apikeys._key_info(uuid[]),
    apikeys._usage(text, date, date, uuid),
    apikeys._policy_changed(),
    apikeys._credit_period(text, timestamptz),
    apikeys._credits_base(apikeys.keys, integer),
    apikeys._credits_unflushed(uuid, integer),
    apikeys._rate_carry(uuid, uuid),
    apikeys._credits_left(apikeys.keys),
    apikeys._credits_flush(apikeys.keys, apikeys.keys),
    apikeys._require_admin(text),
    apikeys._owner_given(text, text),
    apikeys._revoke(uuid, text, text),
    apikeys._revoke_owned(uuid, text, text),
    apikeys._rotate_owned(uuid, text, interval),
    apikeys._rotate_call(uuid, text, interval),
    apikeys._get_key(uuid, text),
    apikeys._get_key_owned(uuid, text),
    apikeys._update_key(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]),
    apikeys._update_key_owned(uuid, text, text, text[], jsonb, timestamptz, integer, cidr[], integer, integer, bigint, bigint, text, text[]),
    apikeys._disable_key(uuid, text, text),
    apikeys._disable_key_owned(uuid, text, text),
    apikeys._enable_key(uuid, text),
    apikeys._enable_key_owned(uuid, text),
    apikeys._add_credits(uuid, text, bigint),
    apikeys._add_credits_owned(uuid, text, bigint),
    apikeys._usage_owned(text, date, date, uuid),
    apikeys._usage_call(text, date, date, uuid)
FROM PUBLIC;
REVOKE ALL ON TYPE apikeys.key_info FROM PUBLIC;
GRANT USAGE ON TYPE apikeys.key_info TO apikeys_admin, apikeys_app;

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
    apikeys.usage(text, date, date, uuid)
TO apikeys_app, apikeys_admin;

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

GRANT UPDATE (allowed_ips, alert_requests_per_minute, rate_burst, credits, credits_refill_amount,
               credits_refill_interval) ON apikeys.keys TO apikeys_admin;
-- The worker writes spent credits.
GRANT SELECT (id, credits, credits_period, credits_refill_amount, credits_refill_interval),
      UPDATE (credits, credits_period) ON apikeys.keys TO apikeys_worker;
