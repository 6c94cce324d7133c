-- The README quickstart: create -> verify -> revoke -> verify again -> list.
\pset footer off
CREATE EXTENSION IF NOT EXISTS apikeys;

\echo '-- 1. create a key for owner acme (the token is shown this once)'
SELECT key_id, token, start FROM apikeys.create_key('acme', 'backend', ARRAY['orders:*'])
\gset
SELECT :'key_id' AS key_id, :'token' AS token, :'start' AS start;

\echo '-- 2. verify it'
SELECT valid, code, owner, name, scopes FROM apikeys.verify(:'token', ARRAY['orders:read']);

\echo '-- 3. revoke it'
SELECT apikeys.revoke(:'key_id', 'acme', 'demo') IS NOT NULL AS revoked;

\echo '-- 4. verify again'
SELECT valid, code FROM apikeys.verify(:'token');

\echo '-- 5. list the owner''s keys (no digests, no tokens)'
SELECT name, start, status, revoked_at IS NOT NULL AS revoked FROM apikeys.list_keys('acme');

\echo '-- 6. the audit trail of those steps, and its hash chain'
SELECT id, event, owner, actor, details->>'reason' AS reason FROM apikeys.audit_log ORDER BY id;
SELECT ok, rows_checked FROM apikeys.audit_verify();
