-- The apikeys.apikey type: input checks with 22P02, binary I/O, casts.
\set SHOW_CONTEXT never

CREATE FUNCTION pg_temp.input_error(input text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_state text; v_msg text; v_detail text;
BEGIN
    PERFORM input::apikeys.apikey;
    RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
    RETURN v_state || ': ' || v_msg || ' / ' || v_detail;
END $$;

-- A real token to damage; its secret must never appear in an error.
SELECT apikeys._new_token('ak_live')::text AS good \gset
SELECT substr(:'good', 9, 32) AS secret \gset

CREATE TEMP TABLE malformed (kind text, input text);
INSERT INTO malformed VALUES
    ('empty',               ''),
    ('too short',           left(:'good', 40)),
    ('truncated by one',    left(:'good', 45)),
    ('too long',            :'good' || repeat('x', 20)),
    ('no separator',        replace(:'good', 'ak_live_', 'ak_liveX')),
    ('uppercase prefix',    replace(:'good', 'ak_live_', 'AK_live_')),
    ('prefix starts digit', replace(:'good', 'ak_live_', '1k_live_')),
    ('prefix ends with _',  replace(:'good', 'ak_live_', 'ak_live__')),
    ('bad secret char',     overlay(:'good' PLACING '-' FROM 20 FOR 1)),
    ('bad check char',      overlay(:'good' PLACING '!' FROM 45 FOR 1)),
    ('wrong checksum',      overlay(:'good' PLACING CASE WHEN substr(:'good', 20, 1) = 'a' THEN 'b' ELSE 'a' END FROM 20 FOR 1)),
    ('whitespace',          ' ' || :'good'),
    ('multibyte',           overlay(:'good' PLACING 'é' FROM 20 FOR 1));

SELECT kind, pg_temp.input_error(input) FROM malformed ORDER BY kind;

-- No error names any part of the secret.
SELECT count(*) AS errors_leaking_secret
  FROM malformed
 WHERE position(:'secret' IN pg_temp.input_error(input)) > 0
    OR position(substr(:'secret', 5, 12) IN pg_temp.input_error(input)) > 0;

-- The well-formed original is accepted, and text round-trips.
SELECT pg_temp.input_error(:'good') AS original, (:'good'::apikeys.apikey)::text = :'good' AS round_trip;

-- Binary send/receive: COPY BINARY out and back in.
CREATE TEMP TABLE bin_out (t apikeys.apikey);
CREATE TEMP TABLE bin_in (t apikeys.apikey);
INSERT INTO bin_out SELECT apikeys._new_token(p) FROM unnest(ARRAY['ak_live', 'hm_test', 'ab']) p;
COPY bin_out TO '/tmp/apikeys_regress_type.bin' (FORMAT binary);
COPY bin_in FROM '/tmp/apikeys_regress_type.bin' (FORMAT binary);
SELECT count(*) AS round_tripped FROM bin_in JOIN bin_out ON bin_in.t::text = bin_out.t::text;

-- text has the same wire format, so a malformed text value sent in binary
-- reaches apikey_recv, which refuses it.
COPY (SELECT left(:'good', 44)) TO '/tmp/apikeys_regress_type.bin' (FORMAT binary);
\set VERBOSITY terse
COPY bin_in FROM '/tmp/apikeys_regress_type.bin' (FORMAT binary);
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS rows_after_bad_copy FROM bin_in;

-- Accessors on the type.
SELECT apikeys.prefix('hm_test_abcdefghijklmnopqrstuvwxyzABCDEF0cGHw9') AS prefix,
       apikeys.start('hm_test_abcdefghijklmnopqrstuvwxyzABCDEF0cGHw9') AS start;

-- A column of the type refuses malformed values and changes nothing.
CREATE TEMP TABLE holder (t apikeys.apikey);
INSERT INTO holder VALUES (:'good');
\set VERBOSITY terse
INSERT INTO holder VALUES ('ak_live_000000000000000000000000000000004YzvZq');
\set VERBOSITY default
SELECT count(*) AS rows FROM holder;
