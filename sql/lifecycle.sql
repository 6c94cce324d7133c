-- rotate, revoke_all and revoke_token.
\set SHOW_CONTEXT never

\i sql/include/try.sql

-- Rotation with grace 0: the old key is revoked at once; the new one copies
-- owner, name, prefix, scopes, metadata, rate limit and expiry.
SELECT apikeys.set_plan('rot-a', 'developer');
SELECT key_id AS old_id, token AS old_token
  FROM apikeys.create_key('rot-a', 'svc', ARRAY['orders:*'], now() + interval '10 days', 'hm_live',
                          '{"tier": 2}', 50) \gset
SELECT key_id AS new_id, token AS new_token, old_key_expires_at AS old_end FROM apikeys.rotate(:'old_id', 'rot-a') \gset
SELECT :'old_end'::timestamptz <= now() AS old_ends_now,
       (apikeys.verify(:'old_token')).code AS old_code, (apikeys.verify(:'new_token')).code AS new_code;
SELECT n.owner = o.owner AND n.name = o.name AND n.prefix = o.prefix AND n.scopes = o.scopes
       AND n.metadata = o.metadata AND n.rate_limit = o.rate_limit AND n.expires_at = o.expires_at AS copied,
       n.rotated_from = o.id AS links_back, o.replaced_by = n.id AS links_forward,
       n.digest <> o.digest AS new_secret, o.revoke_reason
  FROM apikeys.keys n, apikeys.keys o WHERE n.id = :'new_id' AND o.id = :'old_id';

-- Rotation with grace: the old key stays valid (rotating) until the grace ends.
SELECT key_id AS g_old, token AS g_old_token FROM apikeys.create_key('rot-a', 'graceful') \gset
SELECT key_id AS g_new, token AS g_new_token, old_key_expires_at AS g_end
  FROM apikeys.rotate(:'g_old', 'rot-a', '1 hour') \gset
SELECT :'g_end'::timestamptz BETWEEN now() + interval '59 minutes' AND now() + interval '1 hour' AS ends_after_grace,
       (apikeys.verify(:'g_old_token')).code AS old_code, (apikeys.verify(:'g_new_token')).code AS new_code;
SELECT name, status FROM apikeys.list_keys('rot-a') WHERE key_id IN (:'g_old', :'g_new') ORDER BY created_at;
-- After the grace ends the old key is expired.
UPDATE apikeys.keys SET expires_at = now() - interval '1 second' WHERE id = :'g_old';
SELECT (apikeys.verify(:'g_old_token')).code AS old_after_grace;

-- Grace never extends a key beyond its own expiry.
SELECT key_id AS e_old FROM apikeys.create_key('rot-a', 'expiring', expires_at => now() + interval '5 minutes') \gset
SELECT r.old_key_expires_at = k.expires_at AS capped_at_expiry, k.expires_at < now() + interval '5 minutes' AS kept_own
  FROM apikeys.rotate(:'e_old', 'rot-a', '1 day') r, apikeys.keys k WHERE k.id = :'e_old';

-- Wrong state: 55000.  Bad grace: 22023.  Unknown or other owner's key: P0002.
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L)', :'old_id', 'rot-a')) AS rotate_rotated_without_grace;
SELECT key_id AS v_old FROM apikeys.create_key('rot-a', 'revoked') \gset
SELECT apikeys.revoke(:'v_old') IS NOT NULL AS revoked;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L)', :'v_old', 'rot-a')) AS rotate_revoked;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L)', :'g_old', 'rot-a')) AS rotate_after_grace;
SELECT key_id AS x_old FROM apikeys.create_key('rot-a', 'expired', expires_at => now() + interval '1 hour') \gset
UPDATE apikeys.keys SET expires_at = now() - interval '1 second' WHERE id = :'x_old';
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L)', :'x_old', 'rot-a')) AS rotate_expired;
SELECT key_id AS r_old FROM apikeys.create_key('rot-a', 'twice') \gset
SELECT count(*) FROM apikeys.rotate(:'r_old', 'rot-a', '1 hour');
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'r_old', 'rot-a', '1 hour')) AS rotate_rotated;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '-1 second')) AS negative_grace;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, NULL)', :'new_id', 'rot-a')) AS null_grace;
-- Grace is capped by apikeys.max_rotation_grace (7 days by default): 22023.
SHOW apikeys.max_rotation_grace;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '7 days 1 second')) AS grace_over_cap;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '1000 years')) AS grace_1000_years;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '1 month')) AS grace_month;
-- Intervals compare a month as 30 days: these equal 7 days and 10 days less
-- than nothing as intervals, but end 14 years from now and 10 days ago.
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '12000 mons -359993 days')) AS grace_months_past_cap;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '1 mon -40 days')) AS grace_months_negative;
-- Past the range of timestamps either way: 22023 still, not 22008.
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '300000 years')) AS grace_past_range;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'new_id', 'rot-a', '-300000 years')) AS grace_before_range;
SELECT status FROM apikeys.list_keys('rot-a') WHERE key_id = :'new_id';
SELECT pg_temp.try($$SELECT apikeys.rotate('00000000-0000-0000-0000-000000000000')$$) AS unknown_key;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L)', :'new_id', 'rot-b')) AS other_owner;
SELECT pg_temp.try($$SELECT apikeys.rotate(NULL)$$) AS null_key;

-- An owner at its plan limit can still rotate (a rotating key does not count).
SELECT key_id AS full_id FROM apikeys.create_key('rot-full', 'only') \gset
SELECT pg_temp.try($$SELECT apikeys.create_key('rot-full', 'second')$$) AS at_limit;
SELECT pg_temp.try(format('SELECT apikeys.rotate(%L, %L, %L)', :'full_id', 'rot-full', '1 hour')) AS rotate_at_limit;
SELECT status, count(*) FROM apikeys.list_keys('rot-full') GROUP BY status ORDER BY status;

-- A rotation chain never holds more than two valid keys: rotating the new
-- key ends the grace of the key it replaced, however the app role retries.
SELECT apikeys.set_plan('rot-chain', 'free');
SELECT key_id AS c0, token AS c0_token FROM apikeys.create_key('rot-chain', 'svc') \gset
SET ROLE apikeys_app;
SELECT key_id AS c1, token AS c1_token FROM apikeys.rotate(:'c0', 'rot-chain', '7 days') \gset
SELECT key_id AS c2, token AS c2_token FROM apikeys.rotate(:'c1', 'rot-chain', '7 days') \gset
SELECT count(*) FROM generate_series(1, 8) i, LATERAL (
    SELECT apikeys.rotate((SELECT k.key_id FROM apikeys.list_keys('rot-chain') k WHERE k.status = 'active'),
                          'rot-chain', '7 days')) r;
RESET ROLE;
SELECT (apikeys.verify(:'c0_token')).code AS first, (apikeys.verify(:'c1_token')).code AS second,
       (apikeys.verify(:'c2_token')).code AS third;
SELECT count(*) FILTER (WHERE v.valid) AS valid_keys, count(*) AS keys
  FROM apikeys.keys k, LATERAL (SELECT k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()) AS valid) v
 WHERE k.owner = 'rot-chain';
SELECT event, details->'changed' AS changed FROM apikeys.audit_log
 WHERE key_id = :'c0' AND event = 'key_updated';
-- A rotated key's grace can end sooner by hand, never later.
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET expires_at = expires_at + interval '1 day' WHERE id = %L$$, :'c2')) AS extend_grace;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET expires_at = NULL WHERE id = %L$$, :'c2')) AS clear_grace;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET expires_at = now() + interval '1 minute' WHERE id = %L$$, :'c2')) AS shorten_grace;

-- revoke_all: every active and rotating key; a second call revokes none.
SELECT apikeys.set_plan('rot-all', 'pro');
SELECT count(*) FROM generate_series(1, 3) i, apikeys.create_key('rot-all', 'k' || i);
SELECT key_id AS ra_rot FROM apikeys.create_key('rot-all', 'rotating') \gset
SELECT count(*) FROM apikeys.rotate(:'ra_rot', 'rot-all', '1 day');
SELECT key_id AS ra_exp, token AS ra_exp_token FROM apikeys.create_key('rot-all', 'expired', expires_at => now() + interval '1 hour') \gset
UPDATE apikeys.keys SET expires_at = now() - interval '1 second' WHERE id = :'ra_exp';
SELECT status, count(*) FROM apikeys.list_keys('rot-all') GROUP BY status ORDER BY status;
SELECT apikeys.revoke_all('rot-all', 'breach') AS revoked;
SELECT apikeys.revoke_all('rot-all', 'breach') AS revoked_again;
SELECT status, count(*) FROM apikeys.list_keys('rot-all') GROUP BY status ORDER BY status;
SELECT DISTINCT revoke_reason FROM apikeys.keys WHERE owner = 'rot-all' AND revoked_at IS NOT NULL;
-- revoke_all also revoked the expired key, so clearing its expiry revives nothing.
UPDATE apikeys.keys SET expires_at = NULL WHERE id = :'ra_exp';
SELECT revoked_at IS NOT NULL AS revoked, revoke_reason FROM apikeys.keys WHERE id = :'ra_exp';
SELECT (apikeys.verify(:'ra_exp_token')).code AS cleared_expiry_code;
SELECT apikeys.revoke_all('rot-nobody') AS unknown_owner;
SELECT pg_temp.try($$SELECT apikeys.revoke_all(NULL)$$) AS null_owner;

-- revoke_token: by the leaked secret itself.
SELECT key_id AS leak_id, token AS leak_token FROM apikeys.create_key('rot-leak', 'leaked') \gset
SELECT apikeys.revoke_token(:'leak_token', 'found on a public repository') = :'leak_id' AS returns_key;
SELECT (apikeys.verify(:'leak_token')).code, revoke_reason FROM apikeys.keys WHERE id = :'leak_id';
SELECT apikeys.revoke_token(:'leak_token') = :'leak_id' AS idempotent;
SELECT apikeys.revoke_token(apikeys._new_token('ak_live')) IS NULL AS unknown_is_null;
SELECT apikeys.revoke_token('not a token') IS NULL AS malformed_is_null;
SELECT apikeys.revoke_token(NULL) IS NULL AS null_is_null;
