-- Usage counters and rate limits (the regression server preloads apikeys).
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT preloaded, usage_tracking, rate_limits, failure_audit FROM apikeys.status();

-- Has the worker write what shared memory holds (apikeys.flush()), then,
-- in a statement of its own (a snapshot that sees that flush), whether the
-- key's written requests reached the number expected.
CREATE FUNCTION pg_temp.wait_for_flush(p_key uuid, p_requests bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT apikeys.flush() THEN
        RETURN false;
    END IF;
    RETURN (SELECT coalesce(sum(requests), 0) FROM apikeys.key_usage WHERE key_id = p_key) >= p_requests;
END $$;

-- Keep the rate-limit checks inside one minute.
DO $$
BEGIN
    IF extract(second FROM clock_timestamp()) > 45 THEN
        PERFORM pg_sleep(61 - extract(second FROM clock_timestamp()));
    END IF;
END $$;

SELECT key_id AS k, token AS t FROM apikeys.create_key('usage-a', 'limited', rate_limit => 3) \gset
SELECT key_id AS k2, token AS t2 FROM apikeys.create_key('usage-b', 'free', ARRAY['read']) \gset

-- rate_limit 3: three requests pass, the rest of the minute is RATE_LIMITED.
SELECT i, (apikeys.verify(:'t')).code FROM generate_series(1, 5) i;
SELECT valid, code, key_id = :'k' AS right_key FROM apikeys.verify(:'t');
\set VERBOSITY terse
SELECT * FROM apikeys.authenticate(:'t');
\set VERBOSITY default

-- Counts are exact before any flush: requests are VALID answers, failures
-- are refusals of the key (here the rate-limited ones).
SELECT requests_today, failures_today, last_used_at IS NOT NULL AS used FROM apikeys.list_keys('usage-a');

-- A key without a limit, in a read-only transaction; refusals count too.
BEGIN TRANSACTION READ ONLY;
SELECT count(*) FILTER (WHERE c = 'VALID') AS valid FROM (SELECT (apikeys.verify(:'t2')).code AS c FROM generate_series(1, 7)) s;
SELECT (apikeys.verify(:'t2', ARRAY['write'])).code;
COMMIT;
SELECT requests_today, failures_today FROM apikeys.list_keys('usage-b');

-- After the worker's flush the same numbers come from apikeys.key_usage.
SELECT pg_temp.wait_for_flush(:'k2', 7) AS flushed;
SELECT requests, failures, last_used_at IS NOT NULL AS used, day = (now() AT TIME ZONE 'UTC')::date AS today
  FROM apikeys.key_usage WHERE key_id = :'k2';
SELECT requests_today, failures_today FROM apikeys.list_keys('usage-b');
-- More requests add to what was written.
SELECT count(*) FROM (SELECT (apikeys.verify(:'t2')).code FROM generate_series(1, 3)) s;
SELECT requests_today, failures_today FROM apikeys.list_keys('usage-b');
SELECT pg_temp.wait_for_flush(:'k2', 10) AS flushed_again;
SELECT requests, failures FROM apikeys.key_usage WHERE key_id = :'k2';
SELECT pg_temp.wait_for_flush(:'k', 3) AS flushed_limited;
SELECT requests, failures FROM apikeys.key_usage WHERE key_id = :'k';

-- Revoked and expired keys count failures; unknown tokens count nowhere.
SELECT apikeys.revoke(:'k2') IS NOT NULL;
SELECT (apikeys.verify(:'t2')).code;
SELECT requests_today, failures_today FROM apikeys.list_keys('usage-b');
SELECT count(*) AS rows_for_unknown FROM apikeys.key_usage u
 WHERE NOT EXISTS (SELECT FROM apikeys.keys k WHERE k.id = u.key_id);

-- The rate-limited refusals also reached the audit log (one row per flush
-- and minute, so summed).
SELECT apikeys.flush() AS flushed;
SELECT event, details->>'reason' AS reason, sum((details->>'count')::int) AS count
  FROM apikeys.audit_log WHERE owner = 'usage-a' AND event = 'verify_failed' GROUP BY 1, 2;

-- flush() waits at most its timeout: 0 to 1 hour (22023 otherwise).
SELECT pg_temp.try($$SELECT apikeys.flush('-1 second')$$) AS negative_timeout;
SELECT pg_temp.try($$SELECT apikeys.flush('2 hours')$$) AS long_timeout;
SELECT pg_temp.try($$SELECT apikeys.flush('1 month')$$) AS month_timeout;
SELECT pg_temp.try($$SELECT apikeys.flush('2562047788 hours 1 day')$$) AS overflowing_timeout;
SELECT apikeys.flush('0') IS NOT NULL AS zero_timeout_answers;

-- The worker writes counts through the table's access methods only while
-- key_usage is as the extension made it.  A trigger a DBA adds sends the
-- counts through SQL, so the trigger fires for every written row.
CREATE TABLE public.usage_seen (key_id uuid, requests bigint);
GRANT INSERT ON public.usage_seen TO apikeys_worker;
CREATE FUNCTION public.note_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.usage_seen VALUES (NEW.key_id, NEW.requests);
    RETURN NEW;
END $$;
CREATE TRIGGER note_usage BEFORE INSERT OR UPDATE ON apikeys.key_usage
    FOR EACH ROW EXECUTE FUNCTION public.note_usage();
SELECT key_id AS k3, token AS t3 FROM apikeys.create_key('usage-c', 'free') \gset
SELECT count(*) FROM (SELECT (apikeys.verify(:'t3')).code FROM generate_series(1, 4)) s;
SELECT pg_temp.wait_for_flush(:'k3', 4) AS flushed_through_sql;
SELECT requests FROM public.usage_seen WHERE key_id = :'k3';
DROP TRIGGER note_usage ON apikeys.key_usage;
DROP FUNCTION public.note_usage();
DROP TABLE public.usage_seen;

-- The worker goes first where it last wrote a key's row, and checks that it
-- is still that key's row for the day; else it looks it up by key.  Each
-- case below would lose or misplace counts if the hint were trusted.
CREATE FUNCTION pg_temp.written(p_key uuid) RETURNS bigint LANGUAGE sql AS
$$SELECT coalesce(sum(requests), 0) FROM apikeys.key_usage WHERE key_id = p_key$$;
SELECT key_id AS k4, token AS t4 FROM apikeys.create_key('usage-d', 'hinted') \gset
SELECT count(*) FROM (SELECT (apikeys.verify(:'t4')).code FROM generate_series(1, 2)) s;
SELECT pg_temp.wait_for_flush(:'k4', 2) AS flushed_before_truncate;
-- A table emptied by TRUNCATE: the hint points past its end.
TRUNCATE apikeys.key_usage;
SELECT (apikeys.verify(:'t4')).code;
SELECT pg_temp.wait_for_flush(:'k4', 1) AS flushed_after_truncate, pg_temp.written(:'k4') AS k4_written;
-- A row deleted, its slot freed by VACUUM and taken by another key's row:
-- the hint points to a live row of the wrong key.
SELECT ctid AS k4_slot FROM apikeys.key_usage WHERE key_id = :'k4' \gset
DELETE FROM apikeys.key_usage WHERE key_id = :'k4';
VACUUM apikeys.key_usage;
INSERT INTO apikeys.key_usage (key_id, day, requests, failures)
    VALUES (:'k3', (now() AT TIME ZONE 'UTC')::date, 50, 0);
SELECT ctid = :'k4_slot' AS k3_took_k4_slot FROM apikeys.key_usage WHERE key_id = :'k3';
SELECT (apikeys.verify(:'t4')).code;
SELECT pg_temp.wait_for_flush(:'k4', 1) AS flushed_after_reuse,
       pg_temp.written(:'k4') AS k4_written, pg_temp.written(:'k3') AS k3_written;
-- A row a DBA changed: the hint points to its old, dead version.
UPDATE apikeys.key_usage SET requests = requests + 100 WHERE key_id = :'k4';
SELECT (apikeys.verify(:'t4')).code;
SELECT pg_temp.wait_for_flush(:'k4', 102) AS flushed_after_update, pg_temp.written(:'k4') AS k4_written;

-- A flush prunes each page it reaches by a hint, as an index scan would:
-- else the page fills with the versions earlier flushes left, and updates
-- stop being HOT until VACUUM.  With autovacuum off and nothing else
-- reading the table, 150 flushes of one key (a page holds about a hundred
-- versions of its row) keep the row on the page it was first written to.
ALTER TABLE apikeys.key_usage SET (autovacuum_enabled = off);
CREATE PROCEDURE pg_temp.verify_and_flush(p_token text, p_times integer) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. p_times LOOP
        PERFORM apikeys.verify(p_token);
        PERFORM apikeys.flush();
        -- A snapshot held across flushes would keep every version alive.
        COMMIT;
    END LOOP;
END $$;
SELECT key_id AS k5, token AS t5 FROM apikeys.create_key('usage-e', 'pruned') \gset
CALL pg_temp.verify_and_flush(:'t5', 1);
SELECT (ctid::text::point)[0] AS k5_block FROM apikeys.key_usage WHERE key_id = :'k5' \gset
CALL pg_temp.verify_and_flush(:'t5', 150);
SELECT (ctid::text::point)[0] = :k5_block AS k5_row_on_its_page, requests
  FROM apikeys.key_usage WHERE key_id = :'k5';
ALTER TABLE apikeys.key_usage RESET (autovacuum_enabled);
