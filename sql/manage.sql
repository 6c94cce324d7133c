-- 1.1 key management from the app role: update_key, get_key, paged
-- list_keys, usage, disable_key/enable_key, plan policies, client-IP
-- allow-lists and per-key alert thresholds.  Every error path with its
-- SQLSTATE, and nothing changed by a refused call.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT apikeys.set_plan('mg-a', 'enterprise');
SELECT apikeys.set_plan('mg-b', 'enterprise');
SELECT key_id AS k1, token AS t1 FROM apikeys.create_key('mg-a', 'one', '{orders:read}',
    metadata => '{"env": "prod"}', rate_limit => 100) \gset
SELECT key_id AS kb FROM apikeys.create_key('mg-b', 'other owner''s') \gset

------------------------------------------------------------------------------
-- update_key
------------------------------------------------------------------------------
SET ROLE apikeys_app;
-- NULL leaves a field unchanged; the result is the key's public row.
SELECT name, scopes, metadata, rate_limit, expires_at IS NULL AS no_expiry, status
  FROM apikeys.update_key(:'k1', 'mg-a', name => 'renamed', scopes => '{orders:*}');
SELECT name, scopes, metadata, rate_limit FROM apikeys.get_key(:'k1', 'mg-a');
SELECT name, metadata, rate_limit, expires_at > now() + interval '9 days' AS expiry_set,
       allowed_ips, alert_requests_per_minute
  FROM apikeys.update_key(:'k1', 'mg-a', metadata => '{"env": "staging"}', rate_limit => 5,
                          expires_at => now() + interval '10 days', allowed_ips => '{10.0.0.0/8}',
                          alert_requests_per_minute => 50);
-- verify sees the change at once.
SELECT code FROM apikeys.verify(:'t1', '{orders:write}', '10.1.1.1');
SELECT code FROM apikeys.verify(:'t1', '{billing:read}', '10.1.1.1');
-- clear empties the nullable fields.
SELECT expires_at, rate_limit, allowed_ips, alert_requests_per_minute
  FROM apikeys.update_key(:'k1', 'mg-a',
                          clear => '{expires_at,rate_limit,allowed_ips,alert_requests_per_minute}');
RESET ROLE;

-- Audited as key_updated, old and new values of exactly the changed fields.
SELECT details->'changed' AS changed, (details->'old') - 'expires_at' AS old,
       (details->'new') - 'expires_at' AS new,
       (details->'old') ? 'expires_at' AS old_expiry, (details->'new') ? 'expires_at' AS new_expiry
  FROM apikeys.audit_log
 WHERE key_id = :'k1' AND event = 'key_updated' ORDER BY id;

-- Refusals: nothing changes.
SELECT count(*) AS audit_before FROM apikeys.audit_log WHERE key_id = :'k1' AND event = 'key_updated' \gset
SET ROLE apikeys_app;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, NULL, name => 'x')$$, :'k1')) AS app_without_owner;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', name => 'x')$$, :'kb')) AS other_owners_key;
SELECT pg_temp.try($$SELECT apikeys.update_key(gen_random_uuid(), 'mg-a', name => 'x')$$) AS unknown_key;
SELECT pg_temp.try($$SELECT apikeys.update_key(NULL, 'mg-a', name => 'x')$$) AS null_key;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', name => '')$$, :'k1')) AS empty_name;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', scopes => ARRAY[NULL])$$, :'k1')) AS null_scope;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', metadata => '[1]')$$, :'k1')) AS metadata_not_object;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', rate_limit => 0)$$, :'k1')) AS zero_rate_limit;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', expires_at => now() - interval '1 second')$$, :'k1')) AS past_expiry;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', allowed_ips => '{}')$$, :'k1')) AS empty_ip_list;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', allowed_ips => ARRAY[NULL]::cidr[])$$, :'k1')) AS null_network;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', allowed_ips => array_fill('10.0.0.0/8'::cidr, ARRAY[65]))$$, :'k1')) AS too_many_networks;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', allowed_ips => '{{10.0.0.0/8},{10.0.0.0/8}}')$$, :'k1')) AS two_dimensional_networks;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', alert_requests_per_minute => -1)$$, :'k1')) AS negative_threshold;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', clear => '{name}')$$, :'k1')) AS clear_name;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', clear => ARRAY[NULL])$$, :'k1')) AS clear_null;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', clear => NULL)$$, :'k1')) AS clear_is_null;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', clear => array_fill('rate_limit'::text, ARRAY[8]))$$, :'k1')) AS clear_too_long;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', rate_limit => 3, clear => '{rate_limit}')$$, :'k1')) AS set_and_clear;
RESET ROLE;
SELECT (SELECT count(*) FROM apikeys.audit_log WHERE key_id = :'k1' AND event = 'key_updated') = :audit_before AS nothing_audited,
       name, rate_limit, scopes, metadata
  FROM apikeys.keys WHERE id = :'k1';

-- A revoked key cannot be updated (55000).
SELECT key_id AS kr FROM apikeys.create_key('mg-a', 'to revoke') \gset
SELECT apikeys.revoke(:'kr', 'mg-a') IS NOT NULL AS revoked;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', name => 'x')$$, :'kr')) AS update_revoked;

-- Admins may omit the owner.
SET ROLE apikeys_admin;
SELECT name FROM apikeys.update_key(:'kb', NULL, name => 'by admin');
RESET ROLE;

------------------------------------------------------------------------------
-- get_key
------------------------------------------------------------------------------
SET ROLE apikeys_app;
SELECT key_id = :'k1' AS same_key, name, status, prefix, metadata, rotated_from, replaced_by,
       requests_today, failures_today, error_rate_today
  FROM apikeys.get_key(:'k1', 'mg-a');
SELECT pg_temp.try(format($$SELECT apikeys.get_key(%L, 'mg-a')$$, :'kb')) AS other_owners_key;
SELECT pg_temp.try(format($$SELECT apikeys.get_key(%L, NULL)$$, :'k1')) AS app_without_owner;
SELECT pg_temp.try($$SELECT apikeys.get_key(NULL, 'mg-a')$$) AS null_key;
RESET ROLE;

------------------------------------------------------------------------------
-- disable_key / enable_key
------------------------------------------------------------------------------
SET ROLE apikeys_app;
SELECT apikeys.disable_key(:'k1', 'mg-a', 'billing hold') AS disabled_at \gset
SELECT code, valid FROM apikeys.verify(:'t1');
SELECT apikeys.disable_key(:'k1', 'mg-a', 'again') = :'disabled_at' AS idempotent;
SELECT status, disable_reason FROM apikeys.get_key(:'k1', 'mg-a');
SELECT pg_temp.try(format($$SELECT apikeys.authenticate(%L)$$, :'t1')) AS authenticate_disabled;
SELECT apikeys.enable_key(:'k1', 'mg-a') AS was_disabled;
SELECT apikeys.enable_key(:'k1', 'mg-a') AS was_disabled_again;
SELECT code FROM apikeys.verify(:'t1');
SELECT status, disabled_at, disable_reason FROM apikeys.get_key(:'k1', 'mg-a');
SELECT pg_temp.try(format($$SELECT apikeys.disable_key(%L, NULL)$$, :'k1')) AS app_without_owner;
SELECT pg_temp.try(format($$SELECT apikeys.enable_key(%L, NULL)$$, :'k1')) AS enable_without_owner;
SELECT pg_temp.try(format($$SELECT apikeys.disable_key(%L, 'mg-a')$$, :'kb')) AS other_owners_key;
SELECT pg_temp.try(format($$SELECT apikeys.enable_key(%L, 'mg-a')$$, :'kb')) AS enable_other_owners_key;
SELECT pg_temp.try($$SELECT apikeys.enable_key(NULL, 'mg-a')$$) AS enable_null_key;
SELECT pg_temp.try(format($$SELECT apikeys.disable_key(%L, 'mg-a', repeat('r', 1001))$$, :'k1')) AS long_reason;
RESET ROLE;
SELECT event, details - 'disabled_at' AS details FROM apikeys.audit_log
 WHERE key_id = :'k1' AND event IN ('key_disabled', 'key_enabled') ORDER BY id;

-- A revoked key cannot be disabled or enabled; a disabled key can be revoked.
SELECT pg_temp.try(format($$SELECT apikeys.disable_key(%L, 'mg-a')$$, :'kr')) AS disable_revoked;
SELECT pg_temp.try(format($$SELECT apikeys.enable_key(%L, 'mg-a')$$, :'kr')) AS enable_revoked;
SELECT key_id AS kd, token AS td FROM apikeys.create_key('mg-a', 'disabled then revoked') \gset
SELECT apikeys.disable_key(:'kd', 'mg-a') IS NOT NULL AS disabled;
SELECT apikeys.revoke(:'kd', 'mg-a') IS NOT NULL AS revoked;
SELECT code FROM apikeys.verify(:'td');
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET disabled_at = NULL WHERE id = %L$$, :'kd')) AS direct_enable_revoked;

-- A disabled key keeps its slot in the plan.
SELECT apikeys.set_plan('mg-c', 'free');
SELECT key_id AS kc FROM apikeys.create_key('mg-c', 'only') \gset
SELECT apikeys.disable_key(:'kc', 'mg-c') IS NOT NULL AS disabled;
SELECT pg_temp.try($$SELECT apikeys.create_key('mg-c', 'second')$$) AS slot_kept;

------------------------------------------------------------------------------
-- Client-IP allow-lists
------------------------------------------------------------------------------
SELECT key_id AS ki, token AS ti
  FROM apikeys.create_key('mg-a', 'office only', allowed_ips => '{192.0.2.0/24,2001:db8::/32}') \gset
SELECT ip, (apikeys.verify(:'ti', '{}', ip)).code
  FROM unnest(ARRAY['192.0.2.7', '192.0.3.7', '2001:db8::1', '2001:db9::1', NULL]::inet[]) ip;
SELECT code FROM apikeys.verify(:'ti');
-- A network in place of the client's address is refused, even inside the list.
SELECT (apikeys.verify(:'ti', '{}', '192.0.2.0/24')).code AS network_given,
       (apikeys.verify(:'ti', '{}', '192.0.2.7/32')).code AS host_with_mask;
SELECT pg_temp.try(format($$SELECT apikeys.authenticate(%L, '{}', '198.51.100.1')$$, :'ti')) AS authenticate_outside;
SELECT key_id = :'ki' AS accepted FROM apikeys.authenticate(:'ti', '{}', '192.0.2.200');
-- Rotation carries the list.
SELECT token AS ti2 FROM apikeys.rotate(:'ki', 'mg-a') \gset
SELECT (apikeys.verify(:'ti2', '{}', '192.0.3.7')).code AS rotated_outside,
       (apikeys.verify(:'ti2', '{}', '192.0.2.7')).code AS rotated_inside;
SELECT pg_temp.try($$SELECT apikeys.create_key('mg-a', 'n', allowed_ips => '{}')$$) AS create_empty_list;
-- Keys without a list ignore the address.
SELECT key_id AS kn, token AS tn FROM apikeys.create_key('mg-a', 'anywhere') \gset
SELECT (apikeys.verify(:'tn', '{}', '203.0.113.9')).code AS with_address, (apikeys.verify(:'tn')).code AS without;

------------------------------------------------------------------------------
-- Plan policies
------------------------------------------------------------------------------
INSERT INTO apikeys.plans (name, max_keys, description, max_key_lifetime)
VALUES ('rotate90', NULL, 'Keys rotate every 90 days.', '90 days');
SELECT apikeys.set_plan('mg-p', 'rotate90');
-- An omitted expiry takes the longest allowed; a longer one is refused.
SELECT key_id AS kp FROM apikeys.create_key('mg-p', 'policy') \gset
SELECT expires_at BETWEEN now() + interval '90 days' - interval '1 minute' AND now() + interval '90 days' AS expires_in_90_days
  FROM apikeys.keys WHERE id = :'kp';
SELECT pg_temp.try($$SELECT apikeys.create_key('mg-p', 'n', expires_at => now() + interval '91 days')$$) AS create_too_long;
SELECT key_id AS kp_short FROM apikeys.create_key('mg-p', 'short', expires_at => now() + interval '30 days') \gset
SELECT expires_at < now() + interval '31 days' AS shorter_kept FROM apikeys.keys WHERE id = :'kp_short';
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-p', expires_at => now() + interval '100 days')$$, :'kp')) AS update_too_long;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-p', clear => '{expires_at}')$$, :'kp')) AS update_clear_expiry;
-- A rotated key starts a full term.
UPDATE apikeys.keys SET expires_at = now() + interval '1 day' WHERE id = :'kp';
SELECT key_id AS kp2 FROM apikeys.rotate(:'kp', 'mg-p') \gset
SELECT expires_at > now() + interval '89 days' AS rotated_full_term FROM apikeys.keys WHERE id = :'kp2';
-- Bad plan values: 22023.
SELECT pg_temp.try($$UPDATE apikeys.plans SET max_key_lifetime = '0' WHERE name = 'rotate90'$$) AS zero_lifetime;
SELECT pg_temp.try($$UPDATE apikeys.plans SET max_key_lifetime = '-1 day' WHERE name = 'rotate90'$$) AS negative_lifetime;
SELECT pg_temp.try($$UPDATE apikeys.plans SET alert_requests_per_minute = -1 WHERE name = 'rotate90'$$) AS negative_plan_threshold;
-- Plan changes are audited.
SELECT details->'new'->>'max_key_lifetime' AS lifetime FROM apikeys.audit_log
 WHERE event = 'plan_updated' AND details->>'plan' = 'rotate90' ORDER BY id DESC LIMIT 1;

------------------------------------------------------------------------------
-- Alert thresholds: key, else plan, else apikeys.alert_requests_per_minute.
------------------------------------------------------------------------------
INSERT INTO apikeys.plans (name, alert_requests_per_minute) VALUES ('alerting', 3);
SELECT apikeys.set_plan('mg-alert', 'alerting');
SELECT key_id AS ka1, token AS ta1 FROM apikeys.create_key('mg-alert', 'plan threshold') \gset
SELECT key_id AS ka2, token AS ta2 FROM apikeys.create_key('mg-alert', 'own threshold', alert_requests_per_minute => 5) \gset
SELECT key_id AS ka3, token AS ta3 FROM apikeys.create_key('mg-alert', 'alerts off', alert_requests_per_minute => 0) \gset
SELECT count(*) FILTER (WHERE (apikeys.verify(:'ta1')).valid) AS plan_key_valid,
       count(*) FILTER (WHERE (apikeys.verify(:'ta2')).valid) AS own_key_valid,
       count(*) FILTER (WHERE (apikeys.verify(:'ta3')).valid) AS off_key_valid
  FROM generate_series(1, 6);
SELECT apikeys.flush();
SELECT k.name, a.details->>'threshold' AS threshold, a.details->>'requests' AS requests
  FROM apikeys.audit_log a JOIN apikeys.keys k ON k.id = a.key_id
 WHERE a.event = 'usage_alert' AND k.owner = 'mg-alert' ORDER BY k.name;
-- verify cached the plan's threshold; a change to the plan (or the owner's
-- plan) reaches it at once.
UPDATE apikeys.plans SET alert_requests_per_minute = 10 WHERE name = 'alerting';
SELECT key_id AS ka4, token AS ta4 FROM apikeys.create_key('mg-alert', 'raised plan threshold') \gset
SELECT key_id AS ka5, token AS ta5 FROM apikeys.create_key('mg-alert', 'moved owner') \gset
SELECT count(*) FILTER (WHERE (apikeys.verify(:'ta4')).valid) AS raised_valid FROM generate_series(1, 6);
SELECT apikeys.set_plan('mg-alert', 'enterprise');
SELECT count(*) FILTER (WHERE (apikeys.verify(:'ta5')).valid) AS moved_valid FROM generate_series(1, 12);
UPDATE apikeys.plans SET alert_requests_per_minute = 2 WHERE name = 'enterprise';
SELECT key_id AS ka6, token AS ta6 FROM apikeys.create_key('mg-alert', 'enterprise threshold') \gset
SELECT count(*) FILTER (WHERE (apikeys.verify(:'ta6')).valid) AS enterprise_valid FROM generate_series(1, 3);
UPDATE apikeys.plans SET alert_requests_per_minute = NULL WHERE name = 'enterprise';
SELECT apikeys.flush();
SELECT k.name, a.details->>'threshold' AS threshold, a.details->>'requests' AS requests
  FROM apikeys.audit_log a JOIN apikeys.keys k ON k.id = a.key_id
 WHERE a.event = 'usage_alert' AND k.owner = 'mg-alert' ORDER BY k.name;

------------------------------------------------------------------------------
-- list_keys: filters, pages, and the added columns
------------------------------------------------------------------------------
SELECT apikeys.set_plan('mg-l', 'enterprise');
-- One statement each, so that creation times (the cursor's order) differ.
SELECT format('SELECT count(*) FROM apikeys.create_key(%L, %L)', 'mg-l', 'k' || lpad(i::text, 2, '0'))
  FROM generate_series(1, 7) i \gexec
SELECT key_id AS l_rev FROM apikeys.list_keys('mg-l') WHERE name = 'k03' \gset
SELECT apikeys.revoke(:'l_rev', 'mg-l') IS NOT NULL AS revoked;
SELECT key_id AS l_dis FROM apikeys.list_keys('mg-l') WHERE name = 'k05' \gset
SELECT apikeys.disable_key(:'l_dis', 'mg-l') IS NOT NULL AS disabled;
SET ROLE apikeys_app;
-- Pages of 3, following the cursor.
SELECT string_agg(name, ',') AS page1, (array_agg(key_id))[3] AS cursor1 FROM apikeys.list_keys('mg-l', "limit" => 3) \gset
SELECT :'page1' AS page1;
SELECT string_agg(name, ',') AS page2, (array_agg(key_id))[3] AS cursor2 FROM apikeys.list_keys('mg-l', "limit" => 3, after => :'cursor1') \gset
SELECT :'page2' AS page2;
SELECT string_agg(name, ',') AS page3 FROM apikeys.list_keys('mg-l', "limit" => 3, after => :'cursor2');
SELECT status, string_agg(name, ',' ORDER BY name) FROM apikeys.list_keys('mg-l') GROUP BY status ORDER BY status;
SELECT name FROM apikeys.list_keys('mg-l', 'revoked');
SELECT name FROM apikeys.list_keys('mg-l', status => 'disabled');
SELECT count(*) AS active FROM apikeys.list_keys('mg-l', 'active', 2);
-- The 1.0 call still works and returns every key.
SELECT count(*) AS all_keys FROM apikeys.list_keys('mg-l');
-- Rotation links in both directions.
SELECT key_id AS l_old FROM apikeys.list_keys('mg-l') WHERE name = 'k01' \gset
SELECT key_id AS l_new FROM apikeys.rotate(:'l_old', 'mg-l', '1 hour') \gset
SELECT replaced_by = :'l_new' AS old_points_to_new FROM apikeys.get_key(:'l_old', 'mg-l');
SELECT rotated_from = :'l_old' AS new_points_to_old FROM apikeys.get_key(:'l_new', 'mg-l');
-- Bad arguments.
SELECT pg_temp.try($$SELECT apikeys.list_keys('mg-l', 'paused')$$) AS unknown_status;
SELECT pg_temp.try($$SELECT apikeys.list_keys('mg-l', NULL, 0)$$) AS zero_limit;
SELECT pg_temp.try($$SELECT apikeys.list_keys('mg-l', NULL, 1001)$$) AS limit_too_large;
SELECT pg_temp.try($$SELECT apikeys.list_keys('mg-l', NULL, 10, gen_random_uuid())$$) AS unknown_cursor;
SELECT pg_temp.try(format($$SELECT apikeys.list_keys('mg-l', NULL, 10, %L)$$, :'kb')) AS other_owners_cursor;
SELECT pg_temp.try($$SELECT apikeys.list_keys(NULL)$$) AS null_owner;
RESET ROLE;

------------------------------------------------------------------------------
-- usage: per key and day, today's counts from shared memory included
------------------------------------------------------------------------------
SELECT apikeys.set_plan('mg-u', 'enterprise');
SELECT key_id AS ku, token AS tu FROM apikeys.create_key('mg-u', 'used', '{a}') \gset
INSERT INTO apikeys.key_usage (key_id, day, requests, failures, last_used_at)
VALUES (:'ku', (now() AT TIME ZONE 'UTC')::date - 2, 8, 2, now() - interval '2 days');
SELECT count(*) FILTER (WHERE (apikeys.verify(:'tu')).valid) AS valid,
       count(*) FILTER (WHERE NOT (apikeys.verify(:'tu', '{b}')).valid) AS refused
  FROM generate_series(1, 3);
SET ROLE apikeys_app;
SELECT day - (now() AT TIME ZONE 'UTC')::date AS days_ago, requests, failures, error_rate, last_used_at IS NOT NULL AS used
  FROM apikeys.usage('mg-u', (now() AT TIME ZONE 'UTC')::date - 7, (now() AT TIME ZONE 'UTC')::date);
SELECT count(*) AS only_that_key FROM apikeys.usage('mg-u', (now() AT TIME ZONE 'UTC')::date - 7, (now() AT TIME ZONE 'UTC')::date, :'ku');
SELECT count(*) AS range_before FROM apikeys.usage('mg-u', (now() AT TIME ZONE 'UTC')::date - 30, (now() AT TIME ZONE 'UTC')::date - 10);
SELECT pg_temp.try($$SELECT apikeys.usage(NULL, current_date - 1, current_date)$$) AS app_without_owner;
SELECT pg_temp.try($$SELECT apikeys.usage('mg-u', current_date, current_date - 1)$$) AS reversed_range;
SELECT pg_temp.try($$SELECT apikeys.usage('mg-u', current_date - 366, current_date)$$) AS range_too_long;
SELECT pg_temp.try($$SELECT apikeys.usage('mg-u', '-infinity', current_date)$$) AS range_from_infinity;
SELECT pg_temp.try($$SELECT apikeys.usage('mg-u', current_date, 'infinity')$$) AS range_to_infinity;
SELECT pg_temp.try($$SELECT apikeys.usage('mg-u', NULL, current_date)$$) AS null_day;
SELECT pg_temp.try(format($$SELECT apikeys.usage('mg-u', current_date - 1, current_date, %L)$$, :'kb')) AS other_owners_key;
RESET ROLE;
SET ROLE apikeys_admin;
SELECT count(*) > 0 AS admin_reads_all FROM apikeys.usage(NULL, (now() AT TIME ZONE 'UTC')::date - 7, (now() AT TIME ZONE 'UTC')::date);
RESET ROLE;

-- Roles without a grant call none of it.
CREATE ROLE mg_nobody;
SET ROLE mg_nobody;
SELECT pg_temp.try(format($$SELECT apikeys.get_key(%L, 'mg-a')$$, :'k1')) AS nobody_get_key;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'mg-a', name => 'x')$$, :'k1')) AS nobody_update_key;
SELECT pg_temp.try(format($$SELECT apikeys.disable_key(%L, 'mg-a')$$, :'k1')) AS nobody_disable_key;
SELECT pg_temp.try($$SELECT apikeys.usage('mg-a', current_date, current_date)$$) AS nobody_usage;
RESET ROLE;
DROP ROLE mg_nobody;
