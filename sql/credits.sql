-- Credits: a key sold as "N calls".  verify spends cost credits (default 1)
-- in shared memory, exactly, and refuses with USAGE_EXCEEDED, spending
-- nothing, when fewer are left; the worker writes what was spent.
-- add_credits and update_key change them, audited as credits_changed.
\set SHOW_CONTEXT never

\i sql/include/try.sql

SELECT apikeys.set_plan('cr-a', 'enterprise');
SELECT apikeys.set_plan('cr-b', 'enterprise');

-- Three credits: the first calls spend them; the next is refused and
-- spends nothing; cost 0 only reads the balance.
SELECT key_id AS k, token AS t FROM apikeys.create_key('cr-a', 'three calls', credits => 3) \gset
SELECT i, v.valid, v.code, v.credits_remaining
  FROM generate_series(1, 5) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'t' END) v;
SELECT code, credits_remaining FROM apikeys.verify(:'t', '{}', NULL, 0);
-- authenticate takes a cost too, and raises the refusal as 28000.
SELECT pg_temp.try(format($$SELECT apikeys.authenticate(%L)$$, :'t')) AS authenticate_exhausted;
SELECT credits FROM apikeys.get_key(:'k', 'cr-a');

-- A cost larger than what is left is refused whole: nothing is spent.
SELECT key_id AS k5, token AS t5 FROM apikeys.create_key('cr-a', 'five', credits => 5) \gset
SELECT code, credits_remaining FROM apikeys.verify(:'t5', '{}', NULL, 6);
SELECT code, credits_remaining FROM apikeys.verify(:'t5', '{}', NULL, 4);
SELECT credits_remaining FROM apikeys.authenticate(:'t5', '{}', NULL, 1);
SELECT code, credits_remaining FROM apikeys.verify(:'t5', '{}', NULL, 1);

-- A refusal for another reason spends nothing either.
SELECT code, credits_remaining FROM apikeys.verify(:'t5', '{admin}', NULL, 0);

-- A key without credits has no credit limit: credits_remaining is NULL.
SELECT token AS tu FROM apikeys.create_key('cr-a', 'unlimited') \gset
SELECT code, credits_remaining FROM apikeys.verify(:'tu', '{}', NULL, 1000);

-- cost is 0 to 1000000: 22023, and nothing is spent.
SELECT pg_temp.try(format($$SELECT apikeys.verify(%L, '{}', NULL, -1)$$, :'t5')) AS negative_cost;
SELECT pg_temp.try(format($$SELECT apikeys.verify(%L, '{}', NULL, 1000001)$$, :'t5')) AS cost_too_large;
SELECT pg_temp.try(format($$SELECT apikeys.verify(%L, '{}', NULL, NULL)$$, :'t5')) AS null_cost;
SELECT pg_temp.try(format($$SELECT apikeys.authenticate(%L, '{}', NULL, -1)$$, :'t5')) AS authenticate_negative_cost;

-- add_credits: relative, returns what is left, audited.
SELECT apikeys.add_credits(:'k', 'cr-a', 10) AS after_adding;
SELECT code, credits_remaining FROM apikeys.verify(:'t', '{}', NULL, 4);
SELECT apikeys.add_credits(:'k', 'cr-a', -5) AS after_taking;
SELECT details FROM apikeys.audit_log WHERE key_id = :'k' AND event = 'credits_changed' ORDER BY id;
-- Its refusals: 22023 for a bad delta, 55000 for a key without a credit
-- limit or a revoked key, P0002 for another owner's key, 42501 for
-- apikeys_app without an owner.
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', -2)$$, :'k')) AS below_zero;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', 0)$$, :'k')) AS zero_delta;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', NULL)$$, :'k')) AS null_delta;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', 1000000000000001)$$, :'k')) AS delta_too_large;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', 999999999999999)$$, :'k')) AS balance_too_large;
SELECT key_id AS ku FROM apikeys.create_key('cr-a', 'unlimited 2') \gset
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', 1)$$, :'ku')) AS unlimited_key;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-b', 1)$$, :'k')) AS other_owner;
SET ROLE apikeys_app;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, NULL, 1)$$, :'k')) AS app_without_owner;
SELECT apikeys.add_credits(:'k', 'cr-a', 1) AS app_adds;
RESET ROLE;
SELECT key_id AS kx FROM apikeys.create_key('cr-a', 'revoked', credits => 1) \gset
SELECT apikeys.revoke(:'kx', 'cr-a') IS NOT NULL AS revoked;
SELECT pg_temp.try(format($$SELECT apikeys.add_credits(%L, 'cr-a', 1)$$, :'kx')) AS revoked_key;
SELECT count(*) AS credit_changes FROM apikeys.audit_log WHERE event = 'credits_changed';

-- update_key sets what is left now, or clears the limit.
SELECT credits FROM apikeys.update_key(:'k', 'cr-a', credits => 2);
SELECT i, v.code, v.credits_remaining
  FROM generate_series(1, 3) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'t' END) v;
SELECT credits FROM apikeys.update_key(:'k', 'cr-a', clear => '{credits}');
SELECT code, credits_remaining FROM apikeys.verify(:'t');
SELECT credits FROM apikeys.update_key(:'k', 'cr-a', credits => 1);
SELECT details - 'via' AS details, details->>'via' AS via
  FROM apikeys.audit_log WHERE key_id = :'k' AND event = 'credits_changed' ORDER BY id DESC LIMIT 3;
-- Bounds: 22023, and nothing changes.
SELECT pg_temp.try($$SELECT apikeys.create_key('cr-a', 'n', credits => -1)$$) AS negative_credits;
SELECT pg_temp.try($$SELECT apikeys.create_key('cr-a', 'n', credits => 1000000000000001)$$) AS credits_too_large;
SELECT pg_temp.try($$SELECT apikeys.create_key('cr-a', 'n', credits => 1, credits_refill_amount => 0, credits_refill_interval => 'day')$$) AS zero_refill;
SELECT pg_temp.try($$SELECT apikeys.create_key('cr-a', 'n', credits => 1, credits_refill_amount => 5, credits_refill_interval => 'week')$$) AS weekly_refill;
SELECT pg_temp.try($$SELECT apikeys.create_key('cr-a', 'n', credits => 1, credits_refill_amount => 5)$$) AS refill_without_interval;
SELECT pg_temp.try($$SELECT apikeys.create_key('cr-a', 'n', credits_refill_amount => 5, credits_refill_interval => 'day')$$) AS refill_without_credits;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'cr-a', credits => -1)$$, :'k')) AS update_negative;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'cr-a', credits => 1, clear => '{credits}')$$, :'k')) AS set_and_clear;
SELECT pg_temp.try(format($$SELECT apikeys.update_key(%L, 'cr-a', credits_refill_amount => 1, clear => '{credits_refill}')$$, :'k')) AS refill_set_and_clear;
SELECT pg_temp.try(format($$UPDATE apikeys.keys SET credits = -5 WHERE id = %L$$, :'k')) AS admin_negative;
SELECT credits FROM apikeys.get_key(:'k', 'cr-a');

-- The worker writes what was spent: the column then says what get_key
-- says, without an audit row or a new generation.
SELECT credits_gen AS gen_before FROM apikeys.keys WHERE id = :'k5' \gset
SELECT count(*) AS audit_before FROM apikeys.audit_log WHERE event = 'credits_changed' \gset
SELECT apikeys.flush();
SELECT k.credits AS written, i.credits AS left_now, k.credits_gen = :gen_before AS same_generation
  FROM apikeys.keys k, apikeys.get_key(:'k5', 'cr-a') i WHERE k.id = :'k5';
SELECT count(*) = :audit_before AS flush_not_audited
  FROM apikeys.audit_log WHERE event = 'credits_changed';
-- Only a superuser (the worker, through the library) may say it is writing spent credits.
SET ROLE apikeys_admin;
SELECT pg_temp.try($$SET apikeys.audit_context = 'credits_flush'$$) AS admin_claims_flush;
RESET ROLE;
-- An admin's direct UPDATE is audited and verify sees it.
UPDATE apikeys.keys SET credits = 7 WHERE id = :'k5';
SELECT code, credits_remaining FROM apikeys.verify(:'t5');
SELECT details - 'via' AS details FROM apikeys.audit_log
 WHERE key_id = :'k5' AND event = 'credits_changed' ORDER BY id DESC LIMIT 1;

-- Refills: a balance whose period is past reads as the refill amount.
-- (The period is moved back as the worker would write it.)
SELECT key_id AS kf, token AS tf FROM apikeys.create_key('cr-a', 'refilled daily', credits => 0,
    credits_refill_amount => 3, credits_refill_interval => 'day') \gset
SELECT credits, credits_refill_amount, credits_refill_interval FROM apikeys.get_key(:'kf', 'cr-a');
SET apikeys.audit_context = 'credits_flush';
UPDATE apikeys.keys SET credits_period = credits_period - 1 WHERE id = :'kf';
RESET apikeys.audit_context;
SELECT credits FROM apikeys.get_key(:'kf', 'cr-a');
SELECT i, v.code, v.credits_remaining
  FROM generate_series(1, 4) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'tf' END) v;
SELECT apikeys.flush();
SELECT credits, credits_period = apikeys._credit_period('day', now()) AS this_period
  FROM apikeys.keys WHERE id = :'kf';
-- Periods are UTC days and months since 1970.
SELECT apikeys._credit_period('day', '1970-01-02 00:00:00+00') AS day_one,
       apikeys._credit_period('month', '1970-02-28 23:59:59-05') AS march_1970_utc,
       apikeys._credit_period(NULL, now()) AS no_refill;
-- update_key changes the refill; clear removes it.
SELECT credits_refill_amount, credits_refill_interval
  FROM apikeys.update_key(:'kf', 'cr-a', credits_refill_amount => 10, credits_refill_interval => 'month');
SELECT credits_refill_amount, credits_refill_interval, credits
  FROM apikeys.update_key(:'kf', 'cr-a', clear => '{credits_refill}');

-- A change of the refill interval keeps what the key has left, including
-- spending not yet written (the worker writes none made under another
-- interval).
SELECT key_id AS ki, token AS ti FROM apikeys.create_key('cr-a', 'interval change', credits => 10,
    credits_refill_amount => 10, credits_refill_interval => 'day') \gset
SELECT i, v.credits_remaining
  FROM generate_series(1, 3) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'ti' END) v;
SELECT credits, credits_refill_interval FROM apikeys.update_key(:'ki', 'cr-a', clear => '{credits_refill}');
SELECT apikeys.flush();
SELECT (SELECT credits FROM apikeys.keys WHERE id = :'ki') AS written,
       (SELECT credits FROM apikeys.get_key(:'ki', 'cr-a')) AS left_now;
SELECT code, credits_remaining FROM apikeys.verify(:'ti');
SELECT credits FROM apikeys.update_key(:'ki', 'cr-a', credits_refill_amount => 5, credits_refill_interval => 'month');
SELECT code, credits_remaining FROM apikeys.verify(:'ti');

-- A balance this transaction changed is not loaded into shared memory:
-- it may roll back.  verify, whose statement's snapshot is older than the
-- change, fails closed; after the rollback the committed balance holds.
SELECT key_id AS ku2, token AS tu2 FROM apikeys.create_key('cr-a', 'rolled back', credits => 1) \gset
BEGIN;
SELECT apikeys.add_credits(:'ku2', 'cr-a', 1000) AS added, (apikeys.verify(:'tu2')).code AS code;
ROLLBACK;
SELECT i, v.code, v.credits_remaining
  FROM generate_series(1, 2) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'tu2' END) v;

-- A request the rate limit refuses spends no credit.
SELECT key_id AS kr, token AS tr FROM apikeys.create_key('cr-a', 'rate and credits', credits => 10,
    rate_limit => 1, rate_burst => 0) \gset
SELECT i, v.code, v.credits_remaining
  FROM generate_series(1, 3) i, LATERAL apikeys.verify(CASE WHEN i > 0 THEN :'tr' END) v;
SELECT credits FROM apikeys.get_key(:'kr', 'cr-a');

-- A rotation moves the balance to the new key; the old one keeps working
-- through its grace for calls that cost nothing.
SELECT key_id AS kn, token AS tn FROM apikeys.rotate(:'k5', 'cr-a', '1 hour') \gset
SELECT (SELECT credits FROM apikeys.get_key(:'kn', 'cr-a')) AS new_key,
       (SELECT credits FROM apikeys.get_key(:'k5', 'cr-a')) AS old_key;
SELECT code FROM apikeys.verify(:'t5', '{}', NULL, 1);
SELECT code FROM apikeys.verify(:'t5', '{}', NULL, 0);
SELECT code, credits_remaining FROM apikeys.verify(:'tn');
SELECT details->>'via' AS via, details->'credits' AS credits
  FROM apikeys.audit_log WHERE key_id = :'k5' AND event = 'credits_changed' ORDER BY id DESC LIMIT 1;

-- list_keys shows the balance and refill.
SELECT name, credits, credits_refill_amount FROM apikeys.list_keys('cr-a', 'active') ORDER BY name;

-- A key deleted behind the extension's back (a superuser, its triggers
-- off) with spending not yet written: the worker's flush forgets that
-- spending, as it has nowhere to go, instead of taking it back for ever.
-- The row stays locked until the delete commits, so that no flush can
-- write the spending first (a flush skips locked rows).
SELECT key_id AS kg, token AS tg FROM apikeys.create_key('cr-a', 'deleted', credits => 5) \gset
BEGIN;
SELECT credits FROM apikeys.keys WHERE id = :'kg' FOR NO KEY UPDATE;
SELECT code, credits_remaining FROM apikeys.verify(:'tg');
SELECT apikeys._credits_unflushed(:'kg', apikeys._credit_period(NULL, now())) AS unwritten_before;
SET LOCAL session_replication_role = replica;
DELETE FROM apikeys.keys WHERE id = :'kg';
COMMIT;
SELECT apikeys.flush();
SELECT apikeys._credits_unflushed(:'kg', apikeys._credit_period(NULL, now())) AS unwritten_after;

-- A balance already in shared memory is spent without reading the table:
-- verify then takes no lock on the primary key, which only a (re)load reads.
SELECT key_id AS kl, token AS tl FROM apikeys.create_key('cr-a', 'loaded', credits => 5) \gset
SELECT code, credits_remaining FROM apikeys.verify(:'tl');
BEGIN;
SELECT code, credits_remaining FROM apikeys.verify(:'tl');
SELECT count(*) AS pkey_locks FROM pg_locks
 WHERE locktype = 'relation' AND relation = 'apikeys.keys_pkey'::regclass AND pid = pg_backend_pid();
COMMIT;
-- A change of the balance is a new generation: that verify reloads it, and so reads the key.
SELECT credits FROM apikeys.update_key(:'kl', 'cr-a', credits => 9);
BEGIN;
SELECT code, credits_remaining FROM apikeys.verify(:'tl');
SELECT count(*) AS pkey_locks FROM pg_locks
 WHERE locktype = 'relation' AND relation = 'apikeys.keys_pkey'::regclass AND pid = pg_backend_pid();
COMMIT;

-- A key this transaction only updated (a new name) existed before: it is
-- charged from the live balance like any other, not checked against its
-- row, whose credits do not hold the spending not yet written.  With 3
-- credits spent, the column still says 3, and the answer is USAGE_EXCEEDED.
SELECT key_id AS ku, token AS tu FROM apikeys.create_key('cr-a', 'updated', credits => 3) \gset
SELECT count(*) FILTER (WHERE v.code = 'VALID') AS valid
  FROM generate_series(1, 3) i, LATERAL apikeys.verify(:'tu', cost => 1 + 0 * i) v;
BEGIN;
SELECT name FROM apikeys.update_key(:'ku', 'cr-a', name => 'renamed');
SELECT credits AS column_says FROM apikeys.keys WHERE id = :'ku';
SELECT code, credits_remaining FROM apikeys.verify(:'tu');
COMMIT;
-- One with credits left spends them, and is counted as a use; the balance
-- add_credits made a new generation of is loaded from the row this
-- transaction wrote, as the rename left the credits as they were.
SELECT apikeys.add_credits(:'ku', 'cr-a', 2) AS credits;
BEGIN;
SELECT name FROM apikeys.update_key(:'ku', 'cr-a', name => 'renamed again');
SELECT code, credits_remaining FROM apikeys.verify(:'tu');
COMMIT;
SELECT code, credits_remaining FROM apikeys.verify(:'tu', cost => 0);
SELECT apikeys.flush();
SELECT requests FROM apikeys.key_usage WHERE key_id = :'ku';
