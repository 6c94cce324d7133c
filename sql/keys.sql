-- create_key, revoke and list_keys: arguments, results and errors.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT apikeys.set_plan('keys-acme', 'pro');

-- create_key returns the key once, with start and created_at.
SELECT key_id, token, start, created_at
  FROM apikeys.create_key('keys-acme', 'backend', ARRAY['orders:read', 'orders:write'],
                          now() + interval '30 days', NULL, '{"env": "prod"}', 100) \gset
SELECT :'start' = apikeys.start(:'token') AS start_matches, :'created_at'::timestamptz <= now() AS created_before_now;
SELECT owner, name, prefix, start = :'start' AS start_stored, scopes, metadata, rate_limit,
       expires_at > now() + interval '29 days' AS expiry_kept, created_by, revoked_at, rotated_from
  FROM apikeys.keys WHERE id = :'key_id';

-- The owner got a row on its plan.
SELECT owner, plan FROM apikeys.owners WHERE owner = 'keys-acme';

-- Bad arguments: 22023, and nothing is created.
SELECT count(*) AS keys_before FROM apikeys.keys WHERE owner LIKE 'keys-%' \gset
SELECT pg_temp.try($$SELECT apikeys.create_key(NULL, 'n')$$) AS null_owner;
SELECT pg_temp.try($$SELECT apikeys.create_key('', 'n')$$) AS empty_owner;
SELECT pg_temp.try($$SELECT apikeys.create_key(repeat('o', 201), 'n')$$) AS long_owner;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', NULL)$$) AS null_name;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', '')$$) AS empty_name;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', repeat('n', 201))$$) AS long_name;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', NULL)$$) AS null_scopes;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY['a', NULL])$$) AS null_scope_element;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY[''])$$) AS empty_scope_element;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', '{}', now() - interval '1 second')$$) AS expiry_in_past;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', '{}', now())$$) AS expiry_now;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => 'AK_live')$$) AS upper_prefix;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => 'a')$$) AS short_prefix;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => 'ak_')$$) AS prefix_ends_underscore;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => '9ak')$$) AS prefix_starts_digit;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => 'ak-live')$$) AS prefix_dash;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => repeat('a', 25))$$) AS long_prefix;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', prefix => '')$$) AS empty_prefix;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', metadata => NULL)$$) AS null_metadata;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', metadata => '[1]')$$) AS array_metadata;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', rate_limit => 0)$$) AS zero_rate_limit;
-- Bounds: blank or control characters in owner and name; 64 scopes of at
-- most 128 characters, one-dimensional; metadata of at most 8192 bytes.
SELECT pg_temp.try($$SELECT apikeys.create_key('   ', 'n')$$) AS blank_owner;
SELECT pg_temp.try($$SELECT apikeys.create_key(E'keys-\nacme', 'n')$$) AS newline_in_owner;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', E'\t')$$) AS tab_name;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', E'n\u0085')$$) AS c1_control_in_name;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY[' '])$$) AS blank_scope;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY[E'a\x01'])$$) AS control_in_scope;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY[repeat('s', 129)])$$) AS long_scope;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY(SELECT 's' || i FROM generate_series(1, 65) i))$$) AS scopes_65;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY(SELECT 's' || i FROM generate_series(1, 100000) i))$$) AS scopes_100000;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY[repeat('s', 1000000)])$$) AS scope_1mb;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', ARRAY[['a', 'b'], ['c', 'd']])$$) AS scopes_2d;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', metadata => jsonb_build_object('x', repeat('m', 8190)))$$) AS metadata_over_8k;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'n', metadata => jsonb_build_object('x', repeat('m', 1000000)))$$) AS metadata_1mb;
SELECT count(*) = :keys_before AS nothing_created FROM apikeys.keys WHERE owner LIKE 'keys-%';

-- Names of exactly 200 characters, 64 scopes of 128 characters, and
-- metadata of exactly 8192 bytes are fine; a multibyte name counts characters.
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', repeat('n', 200))$$) AS name_200;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', repeat(U&'\+01F600', 200))$$) AS name_200_4byte_chars;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'wide', ARRAY(SELECT lpad(i::text, 128, 's') FROM generate_series(1, 64) i))$$) AS scopes_64x128;
SELECT pg_temp.try($$SELECT apikeys.create_key('keys-acme', 'meta', metadata => jsonb_build_object('x', repeat('m', 8183)))$$) AS metadata_8192;
SELECT octet_length(metadata::text) AS metadata_bytes FROM apikeys.keys WHERE owner = 'keys-acme' AND name = 'meta';

-- The same bounds hold for an admin's hand-written UPDATE, with the same SQLSTATE.
SELECT key_id AS kb FROM apikeys.create_key('keys-acme', 'bounded') \gset
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET scopes = ARRAY(SELECT 's' || i FROM generate_series(1, 65) i) WHERE id = %L$$, :'kb')) AS admin_scopes_65;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET name = E'a\nb' WHERE id = %L$$, :'kb')) AS admin_newline_name;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET metadata = jsonb_build_object('x', repeat('m', 9000)) WHERE id = %L$$, :'kb')) AS admin_big_metadata;
SELECT name, scopes, metadata FROM apikeys.keys WHERE id = :'kb';

-- revoke: returns revoked_at; again returns the same timestamp.
SELECT apikeys.revoke(:'key_id', 'keys-acme', 'rotating staff') AS first_revoke \gset
SELECT pg_sleep(0.01);
SELECT apikeys.revoke(:'key_id', 'keys-acme', 'again') = :'first_revoke'::timestamptz AS same_timestamp;
SELECT apikeys.revoke(:'key_id') = :'first_revoke'::timestamptz AS same_without_owner;
SELECT revoked_at = :'first_revoke'::timestamptz AS kept, revoke_reason, revoked_by
  FROM apikeys.keys WHERE id = :'key_id';

-- A reason is at most 1000 characters (22023), and an owner row obeys the
-- owner's bounds whoever writes it.
SELECT key_id AS kr FROM apikeys.create_key('keys-acme', 'reasoned') \gset
SELECT pg_temp.try(format('SELECT apikeys.revoke(%L, %L, %L)', :'kr', 'keys-acme', repeat('r', 1001))) AS long_reason;
SELECT revoked_at IS NULL AS still_active FROM apikeys.keys WHERE id = :'kr';
SELECT pg_temp.try($$INSERT INTO apikeys.owners (owner, plan) VALUES (E'bad\nowner', 'free')$$) AS hand_written_owner;
SELECT pg_temp.try($$INSERT INTO apikeys.owners (owner, plan) VALUES (repeat('o', 201), 'free')$$) AS hand_written_long_owner;

-- revoke errors: unknown key and another owner's key are P0002; NULL id 22023.
SELECT pg_temp.try($$SELECT apikeys.revoke('00000000-0000-0000-0000-000000000000')$$) AS unknown_key;
SELECT pg_temp.try(format('SELECT apikeys.revoke(%L, %L)', :'key_id', 'keys-other')) AS other_owner;
SELECT pg_temp.try($$SELECT apikeys.revoke(NULL)$$) AS null_key;

-- list_keys: status, no digests, usage columns.
SELECT key_id AS k2 FROM apikeys.create_key('keys-acme', 'worker') \gset
SELECT key_id AS k3 FROM apikeys.create_key('keys-acme', 'short-lived', expires_at => now() + interval '1 hour') \gset
UPDATE apikeys.keys SET expires_at = now() - interval '1 minute' WHERE id = :'k3';
SELECT left(name, 12) AS name, start ~ '^ak_live_[0-9A-Za-z]{4}$' AS start_ok, status, revoked_at IS NOT NULL AS revoked,
       last_used_at, requests_today, failures_today
  FROM apikeys.list_keys('keys-acme') ORDER BY name;
SELECT count(*) AS columns_exposing_digest_or_token
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = 'apikeys.key_info'::regclass AND a.attname IN ('digest', 'token');
SELECT count(*) AS other_owner_rows FROM apikeys.list_keys('keys-nobody');
SELECT pg_temp.try($$SELECT apikeys.list_keys(NULL)$$) AS null_owner;
