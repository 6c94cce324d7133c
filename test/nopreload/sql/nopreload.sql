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

-- Credits live in shared memory: without it a credit-limited key is
-- refused (fail closed) unless the call costs nothing.
SELECT token AS tc FROM apikeys.create_key('np-c', 'credits', credits => 5) \gset
SELECT code, credits_remaining FROM apikeys.verify(:'tc');
SELECT code, credits_remaining FROM apikeys.verify(:'tc', '{}', NULL, 0);

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

-- A placeholder cannot relabel audit events.  Before the library loads, an
-- unprivileged session may set apikeys.audit_context (the setting is still
-- an unknown placeholder); the triggers read it through the library, whose
-- loading refuses that value, so revoke() stays key_revoked.
SELECT key_id AS ctx_key FROM apikeys.create_key('np-ctx', 'relabel me') \gset
\c
SET ROLE apikeys_admin;
SET apikeys.audit_context = 'revoke_token';
SELECT apikeys.revoke(:'ctx_key') IS NOT NULL AS revoked;
RESET ROLE;
SELECT event FROM apikeys.audit_log WHERE key_id = :'ctx_key' ORDER BY id;
-- The superuser-only settings read through the library resist the same trick.
\c
SET ROLE apikeys_admin;
SET apikeys.max_rotation_grace = '1000y';
SET apikeys.audit_retention_min = 0;
SELECT key_id AS grace_key FROM apikeys.create_key('np-ctx', 'grace') \gset
\set VERBOSITY terse
SELECT count(*) FROM apikeys.rotate(:'grace_key', NULL, '100 years');
SELECT apikeys.purge_audit('infinity');
\set VERBOSITY default
RESET ROLE;
