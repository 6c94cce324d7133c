-- Hostile objects in public, first on the search_path, change nothing.
\set SHOW_CONTEXT never

CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE sql AS 'SELECT (1/0)::text';
CREATE FUNCTION public.upper(text) RETURNS text LANGUAGE sql AS 'SELECT (1/0)::text';
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT now() + (1/0) * interval ''1 s''';
CREATE FUNCTION public.length(text) RETURNS integer LANGUAGE sql AS 'SELECT 1/0';
CREATE FUNCTION public.count_hostile(anyelement) RETURNS bigint LANGUAGE sql AS 'SELECT (1/0)::bigint';
CREATE FUNCTION public.gen_random_uuid() RETURNS uuid LANGUAGE sql AS 'SELECT (1/0)::text::uuid';
CREATE FUNCTION public.hostile_eq(uuid, uuid) RETURNS boolean LANGUAGE sql AS 'SELECT 1/0 = 1';
CREATE FUNCTION public.hostile_eq(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT 1/0 = 1';
CREATE FUNCTION public.hostile_eq(bytea, bytea) RETURNS boolean LANGUAGE sql AS 'SELECT 1/0 = 1';
CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.hostile_eq);
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.hostile_eq);
CREATE OPERATOR public.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = public.hostile_eq);

SET search_path = public, pg_catalog;
-- The trap is armed: unqualified calls in this session hit it.
SELECT lower('X');
SELECT 'a'::text = 'a'::text;

-- Every function still works (this file's own SQL qualifies what it uses).
SELECT apikeys.set_plan('path-owner', 'developer');
SELECT key_id AS k, token AS t FROM apikeys.create_key('path-owner', 'svc', ARRAY['a:*'], pg_catalog.now() OPERATOR(pg_catalog.+) interval '1 day') \gset
SELECT code FROM apikeys.verify(:'t', ARRAY['a:b']);
SELECT owner FROM apikeys.authenticate(:'t');
SELECT name, status FROM apikeys.list_keys('path-owner');
SELECT key_id AS k2, token AS t2 FROM apikeys.rotate(:'k', 'path-owner', '1 hour') \gset
SELECT code FROM apikeys.verify(:'t');
SELECT apikeys.revoke(:'k2', 'path-owner') IS NOT NULL AS revoked;
SELECT code FROM apikeys.verify(:'t2');
SELECT key_id AS k3, token AS t3 FROM apikeys.create_key('path-owner', 'leaky') \gset
SELECT apikeys.revoke_token(:'t3') IS NOT NULL AS revoked_by_token;
SELECT apikeys.revoke_all('path-owner') AS revoked_all;
SELECT preloaded FROM apikeys.status();
SELECT apikeys.is_well_formed(:'t'), apikeys.prefix(:'t'), apikeys.start(:'t') OPERATOR(pg_catalog.=) pg_catalog.left(:'t', 12) AS start_ok;
-- Credits and owner-wide limits: the functions, the triggers and the
-- worker's write of spent credits (flush) resolve nothing through the path.
SELECT key_id AS k4, token AS t4 FROM apikeys.create_key('path-owner', 'metered', credits => 5) \gset
SELECT code, credits_remaining FROM apikeys.verify(:'t4', ARRAY[]::text[], NULL, 2);
SELECT apikeys.add_credits(:'k4', 'path-owner', 3) AS left_after_adding;
SELECT credits FROM apikeys.update_key(:'k4', 'path-owner', credits => 4, credits_refill_amount => 4,
                                       credits_refill_interval => 'day');
SELECT code, credits_remaining FROM apikeys.verify(:'t4');
SELECT apikeys.flush();
SELECT credits FROM apikeys.keys WHERE id OPERATOR(pg_catalog.=) :'k4';
INSERT INTO apikeys.plans (name, rate_limit) VALUES ('path-metered', 1);
SELECT apikeys.set_plan('path-owner', 'path-metered');
SELECT pg_catalog.string_agg(v.code, ',') FROM pg_catalog.generate_series(1, 2) i,
       LATERAL apikeys.verify(CASE WHEN i OPERATOR(pg_catalog.>) 0 THEN :'t4' END) v;
SELECT apikeys.revoke(:'k4', 'path-owner') IS NOT NULL AS revoked;
SELECT apikeys.set_plan('path-owner', 'free');
-- Guards still refuse, with their own SQLSTATEs.
\set VERBOSITY sqlstate
DELETE FROM apikeys.keys WHERE owner OPERATOR(pg_catalog.=) 'path-owner';
UPDATE apikeys.keys SET revoked_at = NULL WHERE owner OPERATOR(pg_catalog.=) 'path-owner';
\set VERBOSITY default

RESET search_path;

-- Every SECURITY DEFINER function pins its search_path, and so does every
-- SQL and PL/pgSQL function: a search_path the database or a role sets
-- reaches no function body.
SELECT count(*) AS definer_functions_without_pinned_path
  FROM pg_proc p
 WHERE p.pronamespace = 'apikeys'::regnamespace AND p.prosecdef
   AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false);
SELECT count(*) AS sql_functions_without_pinned_path
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'apikeys'::regnamespace AND l.lanname IN ('sql', 'plpgsql')
   AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false);

DROP OPERATOR public.= (uuid, uuid);
DROP OPERATOR public.= (text, text);
DROP OPERATOR public.= (bytea, bytea);
DROP FUNCTION public.hostile_eq(uuid, uuid), public.hostile_eq(text, text), public.hostile_eq(bytea, bytea),
    public.lower(text), public.upper(text), public.now(), public.length(text),
    public.count_hostile(anyelement), public.gen_random_uuid();
