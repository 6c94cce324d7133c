-- verify and authenticate: every code, scopes, no table reads for bad input.
\set SHOW_CONTEXT never

SELECT apikeys.set_plan('verify-acme', 'enterprise');
SELECT key_id AS k_valid, token AS t_valid
  FROM apikeys.create_key('verify-acme', 'svc', ARRAY['orders:*', 'users:read'], metadata => '{"team": "core"}') \gset
SELECT key_id AS k_revoked, token AS t_revoked FROM apikeys.create_key('verify-acme', 'old') \gset
SELECT key_id AS k_expired, token AS t_expired
  FROM apikeys.create_key('verify-acme', 'temp', expires_at => now() + interval '1 hour') \gset
SELECT key_id AS k_star, token AS t_star FROM apikeys.create_key('verify-acme', 'root', ARRAY['*']) \gset
SELECT key_id AS k_fresh, token AS t_fresh FROM apikeys.create_key('verify-acme', 'fresh') \gset
SELECT apikeys.revoke(:'k_revoked') IS NOT NULL AS revoked;
UPDATE apikeys.keys SET expires_at = now() - interval '1 second' WHERE id = :'k_expired';

-- VALID, with the key's details.
SELECT valid, code, key_id = :'k_valid' AS right_key, owner, name, scopes, metadata, expires_at
  FROM apikeys.verify(:'t_valid');
-- The same row however verify is called: in FROM (which hands it the row
-- type's descriptor), in a select list, and in ROWS FROM with ordinality
-- and column aliases.
SELECT v IS NOT DISTINCT FROM apikeys.verify(:'t_valid') AS same_row FROM apikeys.verify(:'t_valid') v;
SELECT ok, answer, n FROM ROWS FROM (apikeys.verify(:'t_valid')) WITH ORDINALITY
    AS x(ok, answer, k, o, nm, sc, md, ex, rl, rr, rs, cr, n);

-- Scopes: exact, x:* wildcard, * wildcard, and what they do not grant.
SELECT s AS required, (apikeys.verify(:'t_valid', s)).code
  FROM (VALUES (ARRAY['users:read']), (ARRAY['orders:read']), (ARRAY['orders:refund', 'users:read']),
               (ARRAY['users:write']), (ARRAY['orders']), (ARRAY['admin']), ('{}'::text[]),
               (ARRAY['users:read', 'users:write'])) v(s);
SELECT (apikeys.verify(:'t_star', ARRAY['anything', 'billing:write'])).code AS star_grants_all;
SELECT (apikeys.verify(:'t_valid', NULL)).code AS null_scopes_mean_none;
-- required_scopes is bounded: 64 scopes at most, one dimension, no NULL (22023).
\set VERBOSITY terse
SELECT (apikeys.verify(:'t_valid', ARRAY(SELECT 'orders:' || i FROM generate_series(1, 64) i))).code AS required_64;
SELECT (apikeys.verify(:'t_valid', ARRAY(SELECT 'orders:' || i FROM generate_series(1, 65) i))).code AS required_65;
\echo :LAST_ERROR_SQLSTATE
SELECT (apikeys.verify(:'t_valid', ARRAY(SELECT 'x' FROM generate_series(1, 100000)))).code AS required_100000;
\echo :LAST_ERROR_SQLSTATE
SELECT (apikeys.verify(:'t_valid', ARRAY[['orders:a'], ['users:read']])).code AS required_2d;
\echo :LAST_ERROR_SQLSTATE
SELECT (apikeys.verify(:'t_valid', ARRAY['users:read', NULL])).code AS required_null;
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM apikeys.authenticate(:'t_valid', ARRAY[NULL]::text[]);
\echo :LAST_ERROR_SQLSTATE
\set VERBOSITY default

-- Refusals name the key; unknown and malformed tokens do not.
SELECT valid, code, key_id = :'k_revoked' AS right_key FROM apikeys.verify(:'t_revoked');
SELECT valid, code, key_id = :'k_expired' AS right_key FROM apikeys.verify(:'t_expired');
SELECT valid, code, key_id, owner FROM apikeys.verify('ak_live_000000000000000000000000000000004YzvZp');
SELECT valid, code, key_id FROM apikeys.verify(NULL);
SELECT kind, (apikeys.verify(t)).code
  FROM (VALUES ('empty', ''), ('garbage', 'garbage'),
               ('bad checksum', 'ak_live_000000000000000000000000000000004YzvZq'),
               ('100000 characters', repeat('x', 100000)),
               ('truncated', left(:'t_valid', 45)),
               ('uppercased', upper(:'t_valid')),
               ('unknown but well formed', apikeys._new_token('ak_live')::text)) v(kind, t);

-- Malformed tokens are answered without reading apikeys.keys; a
-- well-formed one costs at most one scan of the digest's hash index: a
-- key's first verification probes it and records where the row is (the row
-- locator), and later ones read the row there, with no scan.
SELECT pg_stat_force_next_flush();
SELECT idx_scan AS scans_before FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash' \gset
SELECT count(*) FILTER (WHERE NOT valid) AS refused
  FROM generate_series(1, 50) i, apikeys.verify('ak_live_' || repeat('0', 38 - length(i::text)) || i::text) v;
SELECT pg_stat_force_next_flush();
SELECT idx_scan - :scans_before AS scans_for_malformed FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash';
SELECT (apikeys.verify(:'t_fresh')).code;
SELECT pg_stat_force_next_flush();
SELECT idx_scan - :scans_before AS scans_after_one_valid FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash';
SELECT (apikeys.verify(:'t_fresh')).code AS again, (apikeys.verify(:'t_valid')).code AS verified_before;
SELECT pg_stat_force_next_flush();
SELECT idx_scan - :scans_before AS scans_after_located FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash';

-- The hash index finds rows by a 32-bit hash code of the digest, so two
-- tokens whose digests share a code (this pair, found by a birthday search
-- on x86-64) reach the same index entry: verify compares the digest, and the
-- token whose key does not exist is refused.  The key is inserted by hand,
-- as its token is fixed.
INSERT INTO apikeys.keys (owner, name, prefix, start, digest)
VALUES ('verify-acme', 'hash twin', 'ak_live', 'ak_live_y7LR',
        apikeys.digest('ak_live_y7LRJQB8JTsHtIVqxAeXGmKQ330Iv6Hc2oxD35'::apikeys.apikey));
SELECT valid, code, name FROM apikeys.verify('ak_live_y7LRJQB8JTsHtIVqxAeXGmKQ330Iv6Hc2oxD35');
SELECT valid, code, name FROM apikeys.verify('ak_live_fw19AyW5kahVGjG7my0KKonHRJHDHq7d0yZ7AF');

-- The locator's record is a hint that verify checks against the row (the
-- snapshot must see it, its digest must be the token's), so a key is found
-- as the index finds it after any change.  An update in place (HOT) keeps
-- the row's chain: the record names the chain's root, as the index entry
-- does, and the new version is found from there with no scan, whether the
-- key was located before the update (fresh) or first probed after it (hot:
-- one scan, then none).  A revocation moves the row (revoked_at is in an
-- index's predicate), the old version is no longer seen, and the index is
-- probed once; so after VACUUM FULL, which moves every row.
SELECT key_id AS k_hot, token AS t_hot FROM apikeys.create_key('verify-acme', 'hot') \gset
SELECT pg_stat_force_next_flush();
SELECT idx_scan AS scans_before FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash' \gset
SELECT name FROM apikeys.update_key(:'k_fresh', 'verify-acme', name => 'fresh, renamed');
SELECT name FROM apikeys.update_key(:'k_hot', 'verify-acme', name => 'hot, renamed');
SELECT valid, name FROM apikeys.verify(:'t_fresh');
SELECT valid, name FROM apikeys.verify(:'t_hot');
SELECT valid, name FROM apikeys.verify(:'t_hot');
SELECT pg_stat_force_next_flush();
SELECT idx_scan - :scans_before AS scans_after_renames FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash';
SELECT apikeys.revoke(:'k_fresh') IS NOT NULL AS revoked;
SELECT valid, code FROM apikeys.verify(:'t_fresh');
SELECT valid, code FROM apikeys.verify(:'t_fresh');
SELECT pg_stat_force_next_flush();
SELECT idx_scan - :scans_before AS scans_after_revoke FROM pg_stat_user_indexes WHERE indexrelname = 'keys_digest_hash';
VACUUM FULL apikeys.keys;
SELECT valid, key_id = :'k_valid' AS right_key FROM apikeys.verify(:'t_valid');
SELECT valid, key_id = :'k_star' AS right_key FROM apikeys.verify(:'t_star');
-- A record may point past the table's end (after a vacuum truncated it, or
-- here a TRUNCATE, rolled back): verify checks the table's length first,
-- and answers from the index.
BEGIN;
SET LOCAL session_replication_role = replica;
TRUNCATE apikeys.keys;
SELECT valid, code FROM apikeys.verify(:'t_valid');
ROLLBACK;
SELECT valid, code FROM apikeys.verify(:'t_valid');

-- verify writes nothing: it runs in a read-only transaction.
BEGIN TRANSACTION READ ONLY;
SELECT code FROM apikeys.verify(:'t_valid');
SELECT code FROM apikeys.verify(:'t_revoked');
SELECT code FROM apikeys.verify('nonsense');
COMMIT;

-- authenticate: the key's details, or 28000 with the code as message.
SELECT key_id = :'k_valid' AS right_key, owner, name, scopes, metadata FROM apikeys.authenticate(:'t_valid', ARRAY['orders:read']);
\set VERBOSITY terse
SELECT * FROM apikeys.authenticate(:'t_revoked');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM apikeys.authenticate(:'t_expired');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM apikeys.authenticate(:'t_valid', ARRAY['admin']);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM apikeys.authenticate('ak_live_000000000000000000000000000000004YzvZp');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM apikeys.authenticate('not a key');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM apikeys.authenticate(NULL);
\echo :LAST_ERROR_SQLSTATE
\set VERBOSITY default
