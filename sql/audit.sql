-- The audit log: lifecycle events, append-only, hash chain, purge.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT coalesce(max(id), 0) AS mark FROM apikeys.audit_log \gset

-- Every lifecycle change writes its row, with who did it.
SET apikeys.actor = 'ops@example.com';
SELECT apikeys.set_plan('audit-a', 'developer');
SELECT key_id AS k1, token AS t1 FROM apikeys.create_key('audit-a', 'one', ARRAY['x']) \gset
SELECT key_id AS k2, token AS t2 FROM apikeys.create_key('audit-a', 'two') \gset
SELECT key_id AS k3, token AS t3 FROM apikeys.create_key('audit-a', 'three') \gset
SELECT apikeys.revoke(:'k1', 'audit-a', 'test') IS NOT NULL;
SELECT apikeys.revoke(:'k1', 'audit-a', 'again') IS NOT NULL AS idempotent_revoke_writes_nothing;
SELECT key_id AS k4 FROM apikeys.rotate(:'k2', 'audit-a', '1 hour') \gset
SELECT apikeys.revoke_token(:'t3') IS NOT NULL;
SELECT apikeys.revoke_all('audit-a', 'offboarding');
SELECT apikeys.set_plan('audit-a', 'pro');
UPDATE apikeys.keys SET name = 'renamed' WHERE id = :'k4';
RESET apikeys.actor;

-- (Filtered by owner: the background worker may append verify_failed rows
-- of earlier tests at any moment.)
SELECT row_number() OVER (ORDER BY id) AS n, event,
       CASE key_id WHEN :'k1' THEN 'k1' WHEN :'k2' THEN 'k2' WHEN :'k3' THEN 'k3' WHEN :'k4' THEN 'k4' END AS key,
       owner, actor, db_user, client_addr IS NULL AS local_socket,
       details - 'revoked_at' - 'valid_until' - 'replaced_by' - 'rotated_from' - 'start' AS details
  FROM apikeys.audit_log WHERE id > :mark AND owner = 'audit-a' ORDER BY id;
SELECT bool_and(details->>'replaced_by' = :'k4') AS rotation_names_new_key
  FROM apikeys.audit_log WHERE id > :mark AND event = 'key_rotated';

-- A rolled-back change leaves no row.
SELECT max(id) AS mark2 FROM apikeys.audit_log \gset
BEGIN;
SELECT count(*) FROM apikeys.create_key('audit-a', 'rolled back');
ROLLBACK;
SELECT count(*) AS rows_after_rollback FROM apikeys.audit_log WHERE id > :mark2 AND owner = 'audit-a';

-- No plaintext token in the log.
SELECT count(*) AS rows_with_a_secret FROM apikeys.audit_log a
 WHERE strpos(a::text, substr(:'t1', 9, 32)) > 0 OR strpos(a::text, substr(:'t2', 9, 32)) > 0
    OR strpos(a::text, substr(:'t3', 9, 32)) > 0;

-- The chain: ids without gaps, each row's prev_hash is the hash before it.
SELECT ok, rows_checked > 0 AS checked_rows, first_bad_id FROM apikeys.audit_verify();
SELECT count(*) AS broken_links FROM apikeys.audit_log a JOIN apikeys.audit_log b ON b.id = a.id + 1
 WHERE b.prev_hash <> a.hash;
SELECT prev_hash = '\x0000000000000000000000000000000000000000000000000000000000000000' AS first_from_zeros,
       hash = apikeys._audit_hash(prev_hash, apikeys._audit_payload(a)) AS hash_matches
  FROM apikeys.audit_log a ORDER BY id LIMIT 1;
-- The documented encoding, recomputed from the columns by hand.
SELECT bool_and(hash = apikeys._audit_hash(prev_hash, jsonb_build_array(id,
           to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           event, key_id, owner, actor, db_user, client_addr, details)::text)) AS encoding_as_documented
  FROM apikeys.audit_log;

-- Append-only, for everyone: a superuser gets 42501 too.
SELECT pg_temp.try('UPDATE apikeys.audit_log SET actor = ''mallory''') AS update;
SELECT pg_temp.try('DELETE FROM apikeys.audit_log') AS delete;
SELECT pg_temp.try('TRUNCATE apikeys.audit_log') AS truncate;
SET ROLE apikeys_admin;
SELECT pg_temp.try('UPDATE apikeys.audit_log SET actor = ''mallory''') AS admin_update;
SELECT pg_temp.try('DELETE FROM apikeys.audit_log') AS admin_delete;
SELECT pg_temp.try($$INSERT INTO apikeys.audit_log (event) VALUES ('forged')$$) AS admin_insert;
SELECT count(*) > 0 AS admin_reads FROM apikeys.audit_log;
RESET ROLE;

-- A hand-written insert (superuser) is chained like any other row.
INSERT INTO apikeys.audit_log (event, id, prev_hash, hash, details)
VALUES ('note', 1, '\x00', '\x00', '{"text": "maintenance window"}');
SELECT event, id = (SELECT max(id) FROM apikeys.audit_log) AS appended, octet_length(hash) AS hash_bytes
  FROM apikeys.audit_log WHERE event = 'note';
SELECT ok FROM apikeys.audit_verify();

-- Tampering as a superuser with triggers disabled is detected.
SELECT min(id) AS t1_id, max(id) AS t2_id FROM apikeys.audit_log WHERE owner = 'audit-a' AND event = 'key_created' \gset
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE apikeys.audit_log SET actor = 'mallory' WHERE id = :t1_id;
SELECT ok, first_bad_id = :t1_id AS names_edited_row FROM apikeys.audit_verify();
ROLLBACK;
BEGIN;
SET LOCAL session_replication_role = replica;
DELETE FROM apikeys.audit_log WHERE id = :t1_id;
SELECT ok, first_bad_id = :t1_id + 1 AS names_row_after_gap FROM apikeys.audit_verify();
ROLLBACK;
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE apikeys.audit_log SET hash = apikeys._audit_hash(prev_hash, apikeys._audit_payload(audit_log) || ' ') WHERE id = :t2_id;
SELECT ok, first_bad_id = :t2_id AS names_rehashed_row FROM apikeys.audit_verify();
ROLLBACK;
SELECT ok FROM apikeys.audit_verify();

-- Retention has a floor: nothing younger than apikeys.audit_retention_min
-- (90 days by default) is purged, not even by 'infinity' (22023).
SHOW apikeys.audit_retention_min;
SELECT count(*) AS rows_before FROM apikeys.audit_log \gset
SELECT pg_temp.try($$SELECT apikeys.purge_audit('infinity')$$) AS purge_everything;
SELECT pg_temp.try($$SELECT apikeys.purge_audit(now() - interval '89 days')$$) AS purge_89_days;
SELECT pg_temp.try($$SELECT apikeys.purge_audit(now() - interval '90 days 1 second')$$) AS purge_past_floor;
SET ROLE apikeys_admin;
SELECT pg_temp.try($$SET apikeys.audit_retention_min = 0$$) AS admin_lowers_floor;
RESET ROLE;
SELECT count(*) = :rows_before AS nothing_purged FROM apikeys.audit_log;

-- Retention: purge_audit removes a prefix of the chain and records it (a
-- superuser lowers the floor for this test).
SET apikeys.audit_retention_min = 0;
SELECT id AS cut_id, at AS cut_at FROM apikeys.audit_log WHERE owner = 'audit-a' AND event = 'key_revoked' \gset
SELECT apikeys.purge_audit(:'cut_at'::timestamptz + interval '1 microsecond') > 0 AS purged_some;
SELECT min(id) > :cut_id AS prefix_gone FROM apikeys.audit_log;
SELECT event, details ? 'last_purged_hash' AS carries_hash,
       (details->>'purged_through_id')::bigint >= :cut_id AS through_cut,
       details->>'last_purged_hash' = (SELECT encode(prev_hash, 'hex') FROM apikeys.audit_log ORDER BY id LIMIT 1) AS links_first_row
  FROM apikeys.audit_log WHERE event = 'audit_purged' ORDER BY id DESC LIMIT 1;
SELECT ok FROM apikeys.audit_verify();
SELECT apikeys.purge_audit('-infinity') AS nothing_older;
SELECT pg_temp.try('SELECT apikeys.purge_audit(NULL)') AS null_before;
-- The log keeps chaining after a purge.
SELECT count(*) FROM apikeys.create_key('audit-b', 'after purge');
SELECT ok FROM apikeys.audit_verify();
RESET apikeys.audit_retention_min;

-- Changes to plans are audited (plan_updated), with the row before and after.
SELECT count(*) AS plan_rows_before FROM apikeys.audit_log WHERE event = 'plan_updated' \gset
SET ROLE apikeys_admin;
INSERT INTO apikeys.plans (name, max_keys, description) VALUES ('audit-plan', 3, 'Three keys.');
UPDATE apikeys.plans SET max_keys = 2 WHERE name = 'audit-plan';
UPDATE apikeys.plans SET max_keys = NULL WHERE name = 'audit-plan';
UPDATE apikeys.plans SET max_keys = NULL WHERE name = 'audit-plan';
DELETE FROM apikeys.plans WHERE name = 'audit-plan';
RESET ROLE;
SELECT event, owner, actor, details->>'plan' AS plan, details->>'change' AS change,
       details->'old'->'max_keys' AS old_max, details->'new'->'max_keys' AS new_max
  FROM apikeys.audit_log WHERE event = 'plan_updated' ORDER BY id OFFSET :plan_rows_before;
SELECT ok FROM apikeys.audit_verify();
-- Bounds on plans: 22023.
SELECT pg_temp.try($$INSERT INTO apikeys.plans (name, max_keys) VALUES (repeat('p', 64), 1)$$) AS long_plan_name;
SELECT pg_temp.try($$INSERT INTO apikeys.plans (name, max_keys) VALUES ('', 1)$$) AS empty_plan_name;
SELECT pg_temp.try($$INSERT INTO apikeys.plans (name, max_keys) VALUES ('neg', -1)$$) AS negative_limit;
SELECT pg_temp.try($$INSERT INTO apikeys.plans (name, description) VALUES ('wordy', repeat('d', 1001))$$) AS long_description;

-- With standard_conforming_strings off (a database, role or session may set
-- it), keys are still created and the chain still checks: its zero hash is
-- not a literal that setting reads otherwise.  A new session, so that no
-- function is already compiled with the setting on.
\c
SET standard_conforming_strings = off;
SELECT count(*) AS scs_off_created FROM apikeys.create_key('scs-owner', 'standard_conforming_strings off');
SELECT ok AS scs_off_chain_ok FROM apikeys.audit_verify();
RESET standard_conforming_strings;
