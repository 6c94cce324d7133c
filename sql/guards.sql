-- Guard triggers: a superuser writing plain SQL cannot break the invariants.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT current_setting('is_superuser') AS superuser;
SELECT apikeys.set_plan('guard-a', 'pro');
SELECT key_id AS k, token AS t FROM apikeys.create_key('guard-a', 'live') \gset
SELECT key_id AS r FROM apikeys.create_key('guard-a', 'revoked') \gset
SELECT apikeys.revoke(:'r', 'guard-a', 'test') IS NOT NULL;
CREATE TEMP TABLE before AS SELECT * FROM apikeys.keys WHERE owner = 'guard-a';

-- Immutable columns.
SELECT col, pg_temp.try(format('UPDATE apikeys.keys SET %s WHERE id = %L', expr, :'k')) AS result
  FROM (VALUES ('id', 'id = gen_random_uuid()'), ('owner', $$owner = 'guard-b'$$),
               ('prefix', $$prefix = 'xx'$$), ('start', $$start = 'ak_live_AAAA'$$),
               ('digest', $$digest = '\x00'::bytea || substr(digest, 2)$$),
               ('created_at', $$created_at = created_at - interval '1 day'$$),
               ('created_by', $$created_by = 'mallory'$$),
               ('rotated_from', 'rotated_from = id')) v(col, expr);

-- No reactivation, no rewriting of a revocation.
SELECT col, pg_temp.try(format('UPDATE apikeys.keys SET %s WHERE id = %L', expr, :'r')) AS result
  FROM (VALUES ('clear revoked_at', 'revoked_at = NULL'),
               ('move revoked_at', $$revoked_at = revoked_at + interval '1 day'$$),
               ('revoked_by', $$revoked_by = 'mallory'$$),
               ('revoke_reason', $$revoke_reason = 'nothing happened'$$)) v(col, expr);

-- No deletion, no truncation.
SELECT pg_temp.try(format('DELETE FROM apikeys.keys WHERE id = %L', :'r')) AS delete_one;
SELECT pg_temp.try('DELETE FROM apikeys.keys') AS delete_all;
SELECT pg_temp.try('TRUNCATE apikeys.keys') AS truncate;

-- Nothing changed.
SELECT count(*) AS unchanged_rows FROM before b JOIN apikeys.keys k ON row(b.*) IS NOT DISTINCT FROM row(k.*);
SELECT (apikeys.verify(:'t')).code AS still_valid;

-- What may change does: name, metadata, scopes; revoking by hand records who.
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET name = 'renamed', metadata = '{"a": 1}', scopes = '{x}' WHERE id = %L$$, :'k')) AS editable;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET revoked_at = now(), revoke_reason = 'by hand' WHERE id = %L$$, :'k')) AS revoke_by_sql;
SELECT name, revoked_by, revoke_reason, (apikeys.verify(:'t')).code FROM apikeys.keys WHERE id = :'k';

-- Inserting by hand still honours the plan limit.
SELECT apikeys.set_plan('guard-c', 'free');
SELECT count(*) FROM apikeys.create_key('guard-c', 'first');
SELECT pg_temp.try($$INSERT INTO apikeys.keys (owner, name, prefix, start, digest)
                     VALUES ('guard-c', 'sneaky', 'ak_live', 'ak_live_AAAA', apikeys.digest(apikeys._new_token('ak_live')))$$) AS insert_over_limit;
SELECT count(*) AS guard_c_keys FROM apikeys.keys WHERE owner = 'guard-c';

-- A rotation cannot be undone: replaced_by is fixed once set.
SELECT key_id AS rot FROM apikeys.create_key('guard-a', 'rotated') \gset
SELECT count(*) FROM apikeys.rotate(:'rot', 'guard-a', '1 hour');
SELECT pg_temp.try(format('UPDATE apikeys.keys SET replaced_by = NULL WHERE id = %L', :'rot')) AS clear_replaced_by;
SELECT status FROM apikeys.list_keys('guard-a') WHERE key_id = :'rot';
