-- Token format: length, alphabet, prefix rules, checksum, start and digest.
\set SHOW_CONTEXT never

-- Format of created tokens, default and custom prefixes.
SELECT token AS t1 FROM apikeys.create_key('tok-owner-1', 'default prefix') \gset
SELECT length(:'t1') AS len,
       :'t1' ~ '^ak_live_[0-9A-Za-z]{38}$' AS matches_format,
       apikeys.prefix(:'t1') AS prefix,
       apikeys.start(:'t1') = left(:'t1', 12) AS start_is_prefix_and_4,
       length(apikeys.start(:'t1')) AS start_len,
       apikeys.digest(:'t1') = (SELECT digest FROM apikeys.keys WHERE owner = 'tok-owner-1') AS digest_stored,
       octet_length(apikeys.digest(:'t1')) AS digest_bytes;

SELECT token AS t2 FROM apikeys.create_key('tok-owner-2', 'custom prefix', prefix => 'hm_test') \gset
SELECT length(:'t2') AS len, :'t2' ~ '^hm_test_[0-9A-Za-z]{38}$' AS matches_format,
       apikeys.prefix(:'t2') AS prefix, apikeys.start(:'t2') = left(:'t2', 12) AS start_ok;

-- Shortest and longest prefixes.
SELECT length(apikeys._new_token('ab')) AS shortest, length(apikeys._new_token('abcdefghijklmnopqrstuvwx')) AS longest;

-- GUC apikeys.default_prefix.
SET apikeys.default_prefix = 'sk_dev';
SELECT apikeys.prefix(token) FROM apikeys.create_key('tok-owner-3', 'guc prefix');
RESET apikeys.default_prefix;
SET apikeys.default_prefix = 'Bad-Prefix';

-- Tokens computed independently (zlib CRC-32, base62 0-9A-Za-z, most
-- significant digit first) are accepted; the type round-trips them.
SELECT apikeys.is_well_formed('ak_live_000000000000000000000000000000004YzvZp') AS known_1,
       apikeys.is_well_formed('hm_test_abcdefghijklmnopqrstuvwxyzABCDEF0cGHw9') AS known_2,
       'hm_test_abcdefghijklmnopqrstuvwxyzABCDEF0cGHw9'::apikeys.apikey AS round_trip;

-- The stored digest is BLAKE2b-256 of the whole token (a known vector).
SELECT encode(apikeys.digest('ak_live_000000000000000000000000000000004YzvZp'), 'hex') AS digest;

-- Secrets are unbiased enough never to repeat in a sample.
SELECT count(DISTINCT apikeys._new_token('ak_test')::text) AS distinct_of_2000 FROM generate_series(1, 2000);

-- The checksum catches every single-character substitution (each position,
-- every other base62 character and a few others) on a sample of tokens.
WITH tokens AS (
    SELECT apikeys._new_token(CASE WHEN i % 2 = 0 THEN 'ak_live' ELSE 'hm_test' END)::text AS t
      FROM generate_series(1, 25) i
), alphabet AS (
    SELECT substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-.', j, 1) AS c
      FROM generate_series(1, 65) j
), variants AS (
    SELECT overlay(t PLACING c FROM pos FOR 1) AS v
      FROM tokens, alphabet, generate_series(1, 46) pos
     WHERE substr(t, pos, 1) <> c
)
SELECT count(*) AS substitutions_tried,
       count(*) FILTER (WHERE apikeys.is_well_formed(v)) AS undetected
  FROM variants;

-- So do truncations and extensions.
SELECT count(*) FILTER (WHERE apikeys.is_well_formed(left(:'t1', n))) AS truncations_accepted
  FROM generate_series(0, 45) n;
SELECT apikeys.is_well_formed(:'t1' || 'x') AS extended, apikeys.is_well_formed(:'t1') AS original;

-- is_well_formed never raises.
SELECT apikeys.is_well_formed(NULL) AS null_input, apikeys.is_well_formed('') AS empty,
       apikeys.is_well_formed(repeat('x', 10000)) AS huge,
       apikeys.is_well_formed('ak_live_' || repeat('é', 38)) AS multibyte;
