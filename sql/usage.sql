-- Usage counters and rate limits (the regression server preloads apikeys).
\set SHOW_CONTEXT never

SELECT preloaded, usage_tracking, rate_limits, failure_audit FROM apikeys.status();

-- Waits (bounded) until the worker has written what shared memory holds.
CREATE FUNCTION pg_temp.wait_for_flush(p_key uuid, p_requests bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..300 LOOP
        IF (SELECT coalesce(sum(requests), 0) FROM apikeys.key_usage WHERE key_id = p_key) >= p_requests THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
    RETURN false;
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
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN EXISTS (SELECT FROM apikeys.audit_log WHERE owner = 'usage-a' AND event = 'verify_failed');
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT pg_sleep(1.5);
SELECT event, details->>'reason' AS reason, sum((details->>'count')::int) AS count
  FROM apikeys.audit_log WHERE owner = 'usage-a' AND event = 'verify_failed' GROUP BY 1, 2;
