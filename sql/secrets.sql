-- A plaintext token never reaches a table.
\set SHOW_CONTEXT never

CREATE TEMP TABLE issued (token text);
SELECT apikeys.set_plan('secret-owner', 'enterprise');
INSERT INTO issued SELECT token FROM generate_series(1, 5) i, apikeys.create_key('secret-owner', 'k' || i, ARRAY['s']);
INSERT INTO issued SELECT token FROM apikeys.rotate((SELECT id FROM apikeys.keys WHERE owner = 'secret-owner' AND name = 'k1'), NULL, '1 hour');
SELECT apikeys.revoke_token(token, 'leak drill') IS NOT NULL FROM issued LIMIT 1;
SELECT count(*) AS verified FROM issued, apikeys.verify(token) v WHERE v.code IN ('VALID', 'API_KEY_REVOKED');

-- Search every row of every non-temporary table in the database for any
-- secret (the 32 characters after the prefix), in text and in hex.
CREATE FUNCTION pg_temp.tables_holding(needle text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    t record;
    n bigint;
    total bigint := 0;
BEGIN
    FOR t IN SELECT c.oid::regclass AS rel FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p', 'm') AND s.nspname NOT LIKE 'pg_temp%'
                AND s.nspname NOT LIKE 'pg_toast%' LOOP
        EXECUTE format('SELECT count(*) FROM %s x WHERE strpos(x::text, %L) > 0 OR strpos(x::text, %L) > 0',
                       t.rel, needle, encode(convert_to(needle, 'UTF8'), 'hex')) INTO n;
        total := total + n;
    END LOOP;
    RETURN total;
END $$;

SELECT count(*) AS tokens_checked, sum(pg_temp.tables_holding(substr(token, 9, 32))) AS rows_holding_a_secret
  FROM issued;
-- The search works: it finds a secret planted in a table on purpose.
CREATE TABLE public.planted AS SELECT token FROM issued LIMIT 1;
SELECT pg_temp.tables_holding(substr(token, 9, 32)) AS found_planted FROM public.planted;
DROP TABLE public.planted;
