-- Rate limits by the generic cell rate algorithm (GCRA): rate_limit N per
-- minute paces requests one every 60/N seconds, and rate_burst B lets a key
-- run B requests ahead of that pace, so no 60-second window passes more than
-- N + B.  verify and authenticate report what is left for rate-limit headers.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT apikeys.set_plan('rl-a', 'enterprise');

-- One a minute with a burst of 2: three at once, then RATE_LIMITED.  Each
-- answer says the limit, what is left now, and when it resets: while
-- something is left, when the whole burst is back; once nothing is, when
-- the next request will pass (a minute from the first).
SELECT key_id AS k, token AS t FROM apikeys.create_key('rl-a', 'burst 2', rate_limit => 1, rate_burst => 2) \gset
-- (The argument names i so that each row calls verify again.)
SELECT i, v.code, v.ratelimit_limit, v.ratelimit_remaining,
       round(extract(epoch FROM v.ratelimit_reset - clock_timestamp())) AS reset_in_seconds
  FROM generate_series(1, 5) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'t' END) v;

-- authenticate returns the same columns; a refusal raises 28000.
SELECT key_id AS k2, token AS t2 FROM apikeys.create_key('rl-a', 'burst 1', rate_limit => 1, rate_burst => 1) \gset
SELECT ratelimit_limit, ratelimit_remaining FROM apikeys.authenticate(:'t2');
SELECT ratelimit_limit, ratelimit_remaining FROM apikeys.authenticate(:'t2');
SELECT pg_temp.try(format($$SELECT apikeys.authenticate(%L)$$, :'t2')) AS third;

-- Burst 0: strictly paced, one now and the next a minute later.
SELECT token AS t0 FROM apikeys.create_key('rl-a', 'paced', rate_limit => 1, rate_burst => 0) \gset
SELECT i, (apikeys.verify(:'t0')).code FROM generate_series(1, 2) i;

-- No rate_burst (as every 1.0 key): a whole minute's requests at once, as
-- before, then the pace.
SELECT token AS tn FROM apikeys.create_key('rl-a', 'default burst', rate_limit => 4) \gset
SELECT i, v.code, v.ratelimit_remaining
  FROM generate_series(1, 5) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'tn' END) v;

-- No limit, or a refusal before the limit is applied: the columns are NULL.
SELECT token AS tu FROM apikeys.create_key('rl-a', 'unlimited') \gset
SELECT code, ratelimit_limit, ratelimit_remaining, ratelimit_reset FROM apikeys.verify(:'tu');
SELECT code, ratelimit_limit, ratelimit_remaining, ratelimit_reset
  FROM apikeys.verify(:'tn', '{admin}');
SELECT code, ratelimit_limit, ratelimit_remaining, ratelimit_reset
  FROM apikeys.verify('ak_live_000000000000000000000000000000004YzvZp');

-- update_key changes the burst, and clear restores the default; both audited.
SELECT rate_limit, rate_burst FROM apikeys.update_key(:'k', 'rl-a', rate_burst => 5);
SELECT rate_limit, rate_burst FROM apikeys.update_key(:'k', 'rl-a', clear => '{rate_burst}');
SELECT details->'changed' AS changed, details->'old' AS old, details->'new' AS new
  FROM apikeys.audit_log WHERE key_id = :'k' AND event = 'key_updated' ORDER BY id;
-- Rotation carries it.
SELECT key_id AS kr FROM apikeys.rotate(:'k2', 'rl-a') \gset
SELECT rate_limit, rate_burst FROM apikeys.get_key(:'kr', 'rl-a');

-- Bounds: 22023, and nothing is created or changed.
SELECT count(*) AS keys_before FROM apikeys.keys WHERE owner = 'rl-a' \gset
SELECT pg_temp.try($$SELECT apikeys.create_key('rl-a', 'n', rate_limit => 5, rate_burst => -1)$$) AS negative_burst;
SELECT pg_temp.try($$SELECT apikeys.create_key('rl-a', 'n', rate_limit => 5, rate_burst => 1000001)$$) AS burst_too_large;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'rl-a', rate_burst => -1)$$, :'k')) AS update_negative_burst;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'rl-a', rate_burst => 1, clear => '{rate_burst}')$$, :'k')) AS set_and_clear;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET rate_burst = -5 WHERE id = %L$$, :'k')) AS admin_negative_burst;
SELECT count(*) = :keys_before AS nothing_created, (SELECT rate_burst FROM apikeys.keys WHERE id = :'k') AS burst_unchanged
  FROM apikeys.keys WHERE owner = 'rl-a';

-- Owner-wide limits: a plan's rate_limit paces all of an owner's keys
-- together (burst: a minute's worth), and the tighter of key and owner
-- limit applies.  The columns describe the tighter one.
INSERT INTO apikeys.plans (name, rate_limit) VALUES ('metered', 3);
SELECT apikeys.set_plan('rl-o', 'metered');
SELECT token AS oa FROM apikeys.create_key('rl-o', 'a', rate_limit => 100) \gset
SELECT token AS ob FROM apikeys.create_key('rl-o', 'b') \gset
SELECT i, v.code, v.ratelimit_limit, v.ratelimit_remaining
  FROM generate_series(1, 5) i,
       LATERAL apikeys.verify(CASE WHEN i % 2 = 0 THEN :'oa' ELSE :'ob' END) v;
-- A request the owner's limit refuses costs its key nothing: once the plan
-- is lifted, key a still has 100 - 2 left (the change is audited).
UPDATE apikeys.plans SET rate_limit = NULL WHERE name = 'metered';
SELECT code, ratelimit_limit, ratelimit_remaining FROM apikeys.verify(:'oa');
SELECT details->'old'->'rate_limit' AS old, details->'new'->'rate_limit' AS new
  FROM apikeys.audit_log WHERE event = 'plan_updated' AND details->>'plan' = 'metered'
 ORDER BY id DESC LIMIT 1;
-- Each owner has its own state: rl-p's first request passes while rl-o,
-- whose earlier requests still count, is refused at the lower limit.
UPDATE apikeys.plans SET rate_limit = 1 WHERE name = 'metered';
SELECT apikeys.set_plan('rl-p', 'metered');
SELECT token AS pa FROM apikeys.create_key('rl-p', 'a') \gset
SELECT code, ratelimit_limit, ratelimit_remaining FROM apikeys.verify(:'pa');
SELECT code FROM apikeys.verify(:'pa');
SELECT code FROM apikeys.verify(:'ob');
-- Owners are told apart by their whole name: two of 200 characters (400
-- bytes) that differ only in the last one, or two whose names hash alike,
-- each get their own policy and state, looked up first from the tables and
-- then from each backend's cache.
SELECT repeat('ü', 199) || 'x' AS long_x, repeat('ü', 199) || 'y' AS long_y \gset
SELECT apikeys.set_plan(:'long_x', 'metered'), apikeys.set_plan(:'long_y', 'metered');
SELECT token AS lx FROM apikeys.create_key(:'long_x', 'a') \gset
SELECT token AS ly FROM apikeys.create_key(:'long_y', 'a') \gset
SELECT i, v.code, v.ratelimit_limit, v.ratelimit_remaining
  FROM generate_series(1, 4) i,
       LATERAL apikeys.verify(CASE WHEN i % 2 = 1 THEN :'lx' ELSE :'ly' END) v;
SELECT hashtext('owner-61602') = hashtext('owner-114702') AS names_hash_alike;
SELECT apikeys.set_plan('owner-61602', 'metered'), apikeys.set_plan('owner-114702', 'metered');
SELECT token AS hx FROM apikeys.create_key('owner-61602', 'a') \gset
SELECT token AS hy FROM apikeys.create_key('owner-114702', 'a') \gset
SELECT i, v.code, v.ratelimit_limit, v.ratelimit_remaining
  FROM generate_series(1, 4) i,
       LATERAL apikeys.verify(CASE WHEN i % 2 = 1 THEN :'hx' ELSE :'hy' END) v;
-- Both limits spent: the columns describe the one that passes the next
-- request later, so that ratelimit_reset is when it will pass.  rl-q's key
-- paces one request every 30 s, its plan one every 60 s; the key refuses
-- the second request itself, and still the owner's reset is reported.
SELECT apikeys.set_plan('rl-q', 'metered');
SELECT token AS qa FROM apikeys.create_key('rl-q', 'a', rate_limit => 2, rate_burst => 0) \gset
SELECT code, ratelimit_limit, ratelimit_remaining,
       ratelimit_reset - now() > interval '45 seconds' AS reset_is_owners
  FROM apikeys.verify(:'qa');
SELECT code, ratelimit_limit, ratelimit_remaining,
       ratelimit_reset - now() > interval '45 seconds' AS reset_is_owners
  FROM apikeys.verify(:'qa');
-- A rotation hands out no fresh burst: the new key takes over the old
-- one's allowance, spent as far as it is.
SELECT key_id AS rk, token AS rt FROM apikeys.create_key('rl-a', 'rotated', rate_limit => 1, rate_burst => 0) \gset
SELECT code FROM apikeys.verify(:'rt');
SELECT code FROM apikeys.verify(:'rt');
SELECT token AS rt2 FROM apikeys.rotate(:'rk', 'rl-a') \gset
SELECT code, ratelimit_remaining FROM apikeys.verify(:'rt2');
-- A raised limit forgives what the key ran ahead beyond a burst under the
-- new limit: 6 spent at 1 a minute (6 minutes ahead), then 60000 a minute
-- (1 ms apart): refused for about an interval, not six minutes.
SELECT key_id AS fk, token AS ft FROM apikeys.create_key('rl-a', 'raised', rate_limit => 1, rate_burst => 5) \gset
SELECT count(*) FILTER (WHERE v.code = 'VALID') AS valid
  FROM generate_series(1, 7) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'ft' END) v;
SELECT rate_limit FROM apikeys.update_key(:'fk', 'rl-a', rate_limit => 60000);
SELECT code, ratelimit_reset - clock_timestamp() < interval '1 second' AS passes_within_a_second
  FROM apikeys.verify(:'ft');
SELECT pg_sleep(0.01);
SELECT code FROM apikeys.verify(:'ft');
-- Bounds: 22023, and the plan is unchanged.
SELECT pg_temp.try($$UPDATE apikeys.plans SET rate_limit = 0 WHERE name = 'metered'$$) AS zero_plan_limit;
SELECT rate_limit FROM apikeys.plans WHERE name = 'metered';
