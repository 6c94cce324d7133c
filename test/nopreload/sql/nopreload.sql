-- Without shared_preload_libraries every function works; what needs shared
-- memory is off, and status() says so.
\set SHOW_CONTEXT never

SELECT preloaded, usage_tracking, rate_limits, failure_audit, queued_records,
       records_queued_total, records_dropped, tracked_keys, untracked_requests
  FROM apikeys.status();

SELECT key_id AS k, token AS t FROM apikeys.create_key('np-a', 'limited', rate_limit => 2) \gset

-- Verification is unchanged; rate limits are not enforced without the preload.
SELECT (apikeys.verify(:'t')).code FROM generate_series(1, 4);
SELECT (apikeys.verify('ak_live_000000000000000000000000000000004YzvZp')).code;
BEGIN TRANSACTION READ ONLY;
SELECT code FROM apikeys.verify(:'t');
COMMIT;

-- No counts are kept, and verify writes nothing.
SELECT requests_today, failures_today, last_used_at FROM apikeys.list_keys('np-a');
SELECT count(*) AS usage_rows FROM apikeys.key_usage;

-- Lifecycle events are still audited in the same transaction...
SELECT apikeys.revoke(:'k') IS NOT NULL AS revoked;
SELECT (apikeys.verify(:'t')).code;
SELECT event FROM apikeys.audit_log WHERE owner = 'np-a' ORDER BY id;
SELECT ok FROM apikeys.audit_verify();

-- ...but refused verifications and limit overruns are not recorded.
SELECT count(*) FROM apikeys.create_key('np-b', 'one');
SELECT count(*) FROM apikeys.create_key('np-b', 'two');
SELECT pg_sleep(1.5);
SELECT count(*) AS rollback_surviving_rows FROM apikeys.audit_log
 WHERE event IN ('verify_failed', 'limit_exceeded', 'usage_alert');
SELECT count(*) AS workers FROM pg_stat_activity WHERE backend_type = 'apikeys worker';
