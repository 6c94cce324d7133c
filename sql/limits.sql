-- Plan limits (53400), set_plan, and what frees a slot.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT name, max_keys FROM apikeys.plans ORDER BY max_keys NULLS LAST;

-- A new owner is on the default plan, free: one active key.
SELECT key_id AS f1 FROM apikeys.create_key('lim-free', 'one') \gset
SELECT plan FROM apikeys.owners WHERE owner = 'lim-free';
\set VERBOSITY terse
SELECT apikeys.create_key('lim-free', 'two');
\echo :LAST_ERROR_SQLSTATE
\set VERBOSITY default
SELECT apikeys.create_key('lim-free', 'two');
SELECT count(*) AS keys FROM apikeys.keys WHERE owner = 'lim-free';

-- Revoking frees the slot.
SELECT apikeys.revoke(:'f1') IS NOT NULL AS revoked;
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-free', 'two')$$) AS after_revoke;

-- Expiry frees the slot.
SELECT pg_temp.try($$SELECT apikeys.revoke(id) FROM apikeys.keys WHERE owner = 'lim-free' AND revoked_at IS NULL$$);
SELECT key_id AS f3 FROM apikeys.create_key('lim-free', 'three', expires_at => now() + interval '1 hour') \gset
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-free', 'four')$$) AS while_active;
UPDATE apikeys.keys SET expires_at = now() - interval '1 second' WHERE id = :'f3';
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-free', 'four')$$) AS after_expiry;

-- Reviving the expired key would exceed the plan: refused, nothing changed.
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET expires_at = NULL WHERE id = %L$$, :'f3')) AS revive;
SELECT expires_at < now() AS still_expired FROM apikeys.keys WHERE id = :'f3';

-- developer: five.
SELECT apikeys.set_plan('lim-dev', 'developer');
SELECT count(*) AS created FROM generate_series(1, 5) i, apikeys.create_key('lim-dev', 'k' || i);
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-dev', 'k6')$$) AS sixth;

-- A downgrade keeps existing keys working; new keys wait until under the limit.
SELECT apikeys.set_plan('lim-dev', 'free');
SELECT count(*) FILTER (WHERE status = 'active') AS still_active FROM apikeys.list_keys('lim-dev');
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-dev', 'k7')$$) AS over_limit;
SELECT count(*) AS revoked FROM (SELECT apikeys.revoke(key_id) FROM apikeys.list_keys('lim-dev') WHERE name <> 'k1') r;
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-dev', 'k7')$$) AS at_limit_again;
-- Above its limit, an owner can still rotate: the count does not grow.
SELECT count(*) AS rotated FROM apikeys.list_keys('lim-dev') l, apikeys.rotate(l.key_id, 'lim-dev', '1 hour') r WHERE l.name = 'k1';
SELECT status, count(*) FROM apikeys.list_keys('lim-dev') GROUP BY status ORDER BY status;
SELECT apikeys.revoke(key_id) IS NOT NULL FROM apikeys.list_keys('lim-dev') WHERE name = 'k1' AND status = 'active';
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-dev', 'k7')$$) AS under_limit;

-- Unlimited plan.
SELECT apikeys.set_plan('lim-ent', 'enterprise');
SELECT count(*) AS created FROM generate_series(1, 30) i, apikeys.create_key('lim-ent', 'k' || i);

-- A plan of zero keys, edited limits, and the default plan GUC.
INSERT INTO apikeys.plans VALUES ('suspended', 0, 'No keys.');
SELECT apikeys.set_plan('lim-susp', 'suspended');
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-susp', 'k')$$) AS suspended;
SET apikeys.default_plan = 'developer';
SELECT count(*) AS created FROM generate_series(1, 2) i, apikeys.create_key('lim-guc', 'k' || i);
SELECT plan FROM apikeys.owners WHERE owner = 'lim-guc';
SET apikeys.default_plan = 'no-such-plan';
SELECT pg_temp.try($$SELECT apikeys.create_key('lim-guc2', 'k')$$) AS unknown_default_plan;
SELECT pg_temp.try($$SELECT apikeys.set_plan('lim-guc3', 'pro')$$) AS set_plan_needs_no_default;
SELECT plan FROM apikeys.owners WHERE owner = 'lim-guc3';
RESET apikeys.default_plan;

-- set_plan errors: 22023.
SELECT pg_temp.try($$SELECT apikeys.set_plan('lim-x', 'platinum')$$) AS unknown_plan;
SELECT pg_temp.try($$SELECT apikeys.set_plan(NULL, 'pro')$$) AS null_owner;
SELECT pg_temp.try($$SELECT apikeys.set_plan('lim-x', NULL)$$) AS null_plan;
SELECT count(*) AS owner_rows FROM apikeys.owners WHERE owner = 'lim-x';

-- Refusals survive their rollback as limit_exceeded records, which the
-- worker writes: one per owner, plan and limit (and minute), so lim-dev's
-- refusal under developer and its two under free are not merged.
SELECT apikeys.flush() AS flushed;
SELECT details->>'plan' AS plan, details->>'max_keys' AS max_keys, sum((details->>'count')::int) AS refusals
  FROM apikeys.audit_log WHERE event = 'limit_exceeded' AND owner = 'lim-dev'
 GROUP BY 1, 2 ORDER BY 1;
