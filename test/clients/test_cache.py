"""Tests of cache.py's VerifyCache against a live server (test/clients/run.sh
starts one).  Connection settings come from the environment: PGHOST, PGPORT,
APIKEYS_CLIENTS_DB, APIKEYS_CLIENTS_APP (a role granted apikeys_app),
APIKEYS_CLIENTS_ADMIN (a role granted apikeys_admin), APIKEYS_CLIENTS_SU (a
superuser, for pg_terminate_backend and forged NOTIFYs)."""

import json
import os
import sys
import threading
import time
import unittest
import uuid

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache import VerifyCache  # noqa: E402

DB = os.environ.get("APIKEYS_CLIENTS_DB", "apikeys_clients")
APP = os.environ.get("APIKEYS_CLIENTS_APP", "cache_app")
ADMIN = os.environ.get("APIKEYS_CLIENTS_ADMIN", "cache_admin")
SU = os.environ.get("APIKEYS_CLIENTS_SU", "postgres")
EVENTS = {"created", "updated", "disabled", "enabled", "rotated", "revoked", "credits_changed"}


def dsn(role):
    return f"dbname={DB} user={role}"


def wait_until(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class CacheTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.app = psycopg.connect(dsn(APP), autocommit=True)
        cls.admin = psycopg.connect(dsn(ADMIN), autocommit=True)
        cls.su = psycopg.connect(dsn(SU), autocommit=True)

    @classmethod
    def tearDownClass(cls):
        for c in (cls.app, cls.admin, cls.su):
            c.close()

    def setUp(self):
        self.owner = f"owner-{uuid.uuid4()}"
        self.tokens = []
        self.payloads = []
        self.payload_lock = threading.Lock()
        self.cache = self.new_cache()

    def new_cache(self, **kw):
        cache = VerifyCache(dsn(APP), on_notify=self.record, **kw)
        self.assertTrue(cache.wait_ready(), "the listener did not start")
        return cache

    def tearDown(self):
        self.cache.close()
        # Every notification this test saw: exactly key_id, owner, event, and
        # no token (nor a token's secret part) anywhere in it.
        for p in self.received():
            d = json.loads(p)
            self.assertEqual(set(d), {"key_id", "owner", "event"}, p)
            uuid.UUID(d["key_id"])
            self.assertIn(d["event"], EVENTS, p)
            for t in self.tokens:
                self.assertNotIn(t, p)
                self.assertNotIn(t.rsplit("_", 1)[-1], p)

    # -- helpers ---------------------------------------------------------

    def record(self, payload):
        with self.payload_lock:
            self.payloads.append(payload)

    def received(self):
        with self.payload_lock:
            return list(self.payloads)

    def events_for(self, key_id):
        out = []
        for p in self.received():
            try:
                d = json.loads(p)
            except ValueError:
                continue
            if d.get("key_id") == str(key_id):
                out.append(d["event"])
        return out

    def wait_event(self, key_id, event, count=1):
        """Waits until the cache has applied `count` notifications of `event`
        for key_id (on_notify runs after the eviction)."""
        wait_until(lambda: self.events_for(key_id).count(event) >= count,
                   f"{event} notification for {key_id}")

    def create_key(self, owner=None, scopes=()):
        row = self.app.execute(
            "SELECT key_id, token::text FROM apikeys.create_key(%s, %s, %s::text[])",
            (owner or self.owner, "k", list(scopes))).fetchone()
        self.tokens.append(row[1])
        return row[0], row[1]

    def cached_valid(self, token, scopes=()):
        """verify twice: a miss that stores, then a hit."""
        misses, hits = self.cache.stats["misses"], self.cache.stats["hits"]
        r = self.cache.verify(token, scopes)
        self.assertEqual(r["code"], "VALID")
        self.assertTrue(r["valid"])
        self.assertTrue(self.cache.is_cached(token, scopes))
        r2 = self.cache.verify(token, scopes)
        self.assertEqual(r2, r)
        self.assertEqual(self.cache.stats["misses"], misses + 1)
        self.assertEqual(self.cache.stats["hits"], hits + 1)
        return r

    def assert_refused(self, token, code):
        hits = self.cache.stats["hits"]
        r = self.cache.verify(token)
        self.assertEqual(r["code"], code)
        self.assertFalse(r["valid"])
        self.assertEqual(self.cache.stats["hits"], hits, "a refusal came from the cache")
        self.assertFalse(self.cache.is_cached(token), "a refusal was cached")

    # -- tests -----------------------------------------------------------

    def test_valid_result_cached_by_hash(self):
        key_id, token = self.create_key(scopes=["read"])
        r = self.cached_valid(token)
        self.assertEqual(r["key_id"], key_id)
        self.assertEqual(r["owner"], self.owner)
        self.assertEqual(r["scopes"], ["read"])
        # scopes and client address are part of the cache key
        self.assertFalse(self.cache.is_cached(token, ["read"]))
        self.cached_valid(token, ["read"])
        self.assertEqual(len(self.cache), 2)
        # the plaintext token is in no cache key
        for ck in list(self.cache._entries):
            self.assertNotIn(token, repr(ck))
            self.assertNotIn(token.rsplit("_", 1)[-1], repr(ck))
        # a refusal is answered by the server every time
        self.assert_refused(token[:-1] + ("A" if token[-1] != "A" else "B"), "API_KEY_INVALID")
        self.assertEqual(self.cache.verify(token, ["write"])["code"], "INSUFFICIENT_SCOPE")
        self.assertFalse(self.cache.is_cached(token, ["write"]))
        # a copy is returned: the caller cannot change the cached result
        self.cache.verify(token)["scopes"].append("admin")
        self.assertEqual(self.cache.verify(token)["scopes"], ["read"])
        self.wait_event(key_id, "created")
        self.assertEqual(self.events_for(key_id), ["created"])
        self.assertEqual(self.cache.stats["evictions"], 0)   # "created" evicts nothing
        self.assertTrue(self.cache.is_cached(token))

    def test_limited_keys_are_never_cached(self):
        # A hit would skip the server's spending of credits and its rate limit.
        self.admin.execute("SELECT apikeys.set_plan(%s, 'pro')", (self.owner,))
        key_id, token = self.create_key()
        self.app.execute("SELECT apikeys.update_key(%s, %s, credits => 2)", (key_id, self.owner))
        self.wait_event(key_id, "credits_changed")
        codes = [self.cache.verify(token)["code"] for _ in range(3)]
        self.assertEqual(codes, ["VALID", "VALID", "USAGE_EXCEEDED"])
        self.assertFalse(self.cache.is_cached(token))
        key_id, token = self.create_key()
        self.app.execute("SELECT apikeys.update_key(%s, %s, rate_limit => 1, rate_burst => 0)",
                         (key_id, self.owner))
        self.wait_event(key_id, "updated")
        codes = [self.cache.verify(token)["code"] for _ in range(2)]
        self.assertEqual(codes, ["VALID", "RATE_LIMITED"])
        self.assertFalse(self.cache.is_cached(token))

    def test_client_ip_is_part_of_the_key(self):
        key_id, token = self.create_key()
        self.app.execute("SELECT apikeys.update_key(%s, %s, allowed_ips => '{10.0.0.0/8}')",
                         (key_id, self.owner))
        self.wait_event(key_id, "updated")
        r = self.cache.verify(token, client_ip="10.1.2.3")
        self.assertEqual(r["code"], "VALID")
        self.assertTrue(self.cache.is_cached(token, client_ip="10.1.2.3"))
        self.assertEqual(self.cache.verify(token, client_ip="10.1.2.3"), r)
        for ip in ("192.168.1.1", None):
            self.assertEqual(self.cache.verify(token, client_ip=ip)["code"], "IP_NOT_ALLOWED")
            self.assertFalse(self.cache.is_cached(token, client_ip=ip))
        self.assertEqual(len(self.cache), 1)

    def test_revoke_during_query_is_not_stored(self):
        # The revoke commits, and its notification is applied, after the
        # server answered VALID but before the answer is stored.
        key_id, token = self.create_key()
        self.wait_event(key_id, "created")
        cache, test = self.cache, self
        real_query = cache._query

        def query_then_revoke(*args):
            result = real_query(*args)
            test.app.execute("SELECT apikeys.revoke(%s, %s)", (key_id, test.owner))
            test.wait_event(key_id, "revoked")
            return result

        cache._query = query_then_revoke
        self.assertEqual(cache.verify(token)["code"], "VALID")
        cache._query = real_query
        self.assertFalse(cache.is_cached(token), "a result older than a revoke was stored")
        self.assert_refused(token, "API_KEY_REVOKED")

    def test_revoke_evicts(self):
        key_id, token = self.create_key()
        self.cached_valid(token)
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (key_id, self.owner))
        self.wait_event(key_id, "revoked")
        self.assertFalse(self.cache.is_cached(token))
        self.assert_refused(token, "API_KEY_REVOKED")

    def test_disable_enable(self):
        key_id, token = self.create_key()
        self.cached_valid(token)
        self.app.execute("SELECT apikeys.disable_key(%s, %s, %s)", (key_id, self.owner, "test"))
        self.wait_event(key_id, "disabled")
        self.assertFalse(self.cache.is_cached(token))
        self.assert_refused(token, "API_KEY_DISABLED")
        self.app.execute("SELECT apikeys.enable_key(%s, %s)", (key_id, self.owner))
        self.wait_event(key_id, "enabled")
        self.cached_valid(token)

    def test_update_scopes_evicts(self):
        key_id, token = self.create_key(scopes=["read"])
        self.cached_valid(token)
        self.cached_valid(token, ["read"])
        self.app.execute("SELECT apikeys.update_key(%s, %s, scopes => %s::text[])",
                         (key_id, self.owner, ["read", "write"]))
        self.wait_event(key_id, "updated")
        self.assertFalse(self.cache.is_cached(token))
        self.assertFalse(self.cache.is_cached(token, ["read"]))
        self.assertEqual(len(self.cache), 0)
        r = self.cached_valid(token, ["write"])
        self.assertEqual(r["scopes"], ["read", "write"])

    def test_rotate_evicts_old(self):
        old_id, old_token = self.create_key()
        self.cached_valid(old_token)
        new_id, new_token = self.app.execute(
            "SELECT key_id, token::text FROM apikeys.rotate(%s, %s)",
            (old_id, self.owner)).fetchone()
        self.tokens.append(new_token)
        self.wait_event(old_id, "rotated")
        self.assertFalse(self.cache.is_cached(old_token))
        self.assert_refused(old_token, "API_KEY_REVOKED")
        self.assertEqual(self.cached_valid(new_token)["key_id"], new_id)
        wait_until(lambda: self.events_for(new_id), f"a notification for the new key {new_id}")

    def test_rotate_with_grace_evicts_old(self):
        old_id, old_token = self.create_key()
        r = self.cached_valid(old_token)
        self.assertIsNone(r["expires_at"])
        _, new_token = self.app.execute(
            "SELECT key_id, token::text FROM apikeys.rotate(%s, %s, '1 hour')",
            (old_id, self.owner)).fetchone()
        self.tokens.append(new_token)
        self.wait_event(old_id, "rotated")
        self.assertFalse(self.cache.is_cached(old_token))
        # still valid during the grace, now with an expiry
        self.assertIsNotNone(self.cached_valid(old_token)["expires_at"])

    def test_revoke_all_evicts_every_key(self):
        self.admin.execute("SELECT apikeys.set_plan(%s, 'pro')", (self.owner,))
        keys = [self.create_key() for _ in range(3)]
        other_id, other_token = self.create_key(owner=f"other-{uuid.uuid4()}")
        for _, token in keys + [(other_id, other_token)]:
            self.cached_valid(token)
        self.assertEqual(len(self.cache), 4)
        n = self.admin.execute("SELECT apikeys.revoke_all(%s)", (self.owner,)).fetchone()[0]
        self.assertEqual(n, 3)
        for key_id, _ in keys:
            self.wait_event(key_id, "revoked")
        for key_id, token in keys:
            self.assertEqual(self.events_for(key_id), ["created", "revoked"])
            self.assertFalse(self.cache.is_cached(token))
            self.assert_refused(token, "API_KEY_REVOKED")
        # another owner's key is untouched
        self.assertEqual(len(self.cache), 1)
        self.assertTrue(self.cache.is_cached(other_token))
        for p in self.received():
            d = json.loads(p)
            if d["event"] == "revoked":
                self.assertEqual(d["owner"], self.owner)

    def test_rolled_back_revoke_sends_nothing(self):
        key_id, token = self.create_key()
        self.cached_valid(token)
        with self.app.transaction() as tx:
            self.app.execute("SELECT apikeys.update_key(%s, %s, scopes => '{x}')", (key_id, self.owner))
            self.app.execute("SELECT apikeys.disable_key(%s, %s)", (key_id, self.owner))
            self.app.execute("SELECT apikeys.revoke(%s, %s)", (key_id, self.owner))
            raise psycopg.Rollback(tx)
        # Notifications reach a listener in commit order: once a later
        # commit's notification has been applied, a notification from the
        # rolled-back transaction would have been applied before it.
        sentinel_id, _ = self.create_key(owner=f"sentinel-{uuid.uuid4()}")
        self.wait_event(sentinel_id, "created")
        self.assertEqual(self.events_for(key_id), ["created"])
        self.assertTrue(self.cache.is_cached(token))
        self.assertEqual(self.cache.stats["evictions"], 0)
        self.assertEqual(self.cache.verify(token)["code"], "VALID")
        self.assertEqual(self.app.execute("SELECT (apikeys.verify(%s)).code", (token,)).fetchone()[0],
                         "VALID")

    def test_listener_reconnects_after_terminate(self):
        self.cache.close()
        self.cache = self.new_cache(reconnect_delay=2.0)
        kept_owner = f"kept-{uuid.uuid4()}"
        kept_id, kept = self.create_key(owner=kept_owner)
        lost_id, lost = self.create_key()
        self.cached_valid(kept)
        self.cached_valid(lost)
        pid = self.cache.listener_pid
        clears = self.cache.stats["clears"]
        self.assertEqual(self.cache.stats["connects"], 1)
        with self.assertLogs("apikeys.cache", "WARNING") as logs:
            self.assertTrue(self.su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0])
            # The loss is noticed; until the listener is back the cache is empty
            # and bypassed, so a revoke it cannot hear about is still answered right.
            wait_until(lambda: not self.cache.listening, "the listener to notice the loss")
            wait_until(lambda: logs.output, "the listener's warning")
        self.assertIn("reconnecting in 2.0 s", logs.output[0])
        self.assertEqual(len(self.cache), 0)
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (lost_id, self.owner))
        self.assert_refused(lost, "API_KEY_REVOKED")
        self.assertEqual(self.cache.verify(kept)["code"], "VALID")
        self.assertFalse(self.cache.is_cached(kept), "cached while not listening")

        # Back: new backend, LISTEN again, the cache cleared once more.
        wait_until(lambda: self.cache.listening, "the listener to reconnect")
        self.assertEqual(self.cache.stats["connects"], 2)
        self.assertNotEqual(self.cache.listener_pid, pid)
        self.assertGreaterEqual(self.cache.stats["clears"], clears + 2)
        self.assertEqual(self.su.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query = 'LISTEN apikeys_event'",
            (self.cache.listener_pid,)).fetchone()[0], 1)

        # ... and keeps invalidating.
        self.cached_valid(kept)
        self.app.execute("SELECT apikeys.disable_key(%s, %s)", (kept_id, kept_owner))
        self.wait_event(kept_id, "disabled")
        self.assertFalse(self.cache.is_cached(kept))
        self.assert_refused(kept, "API_KEY_DISABLED")
        self.assertEqual(self.cache.stats["connects"], 2)

    def test_payload_shape(self):
        key_id, token = self.create_key(scopes=["a"])
        self.app.execute("SELECT apikeys.update_key(%s, %s, name => 'renamed')", (key_id, self.owner))
        self.app.execute("SELECT apikeys.disable_key(%s, %s)", (key_id, self.owner))
        self.app.execute("SELECT apikeys.enable_key(%s, %s)", (key_id, self.owner))
        new_id, new_token = self.app.execute(
            "SELECT key_id, token::text FROM apikeys.rotate(%s, %s)", (key_id, self.owner)).fetchone()
        self.tokens.append(new_token)
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (new_id, self.owner))
        self.wait_event(new_id, "revoked")
        self.assertEqual(self.events_for(key_id), ["created", "updated", "disabled", "enabled", "rotated"])
        self.assertEqual(self.events_for(new_id)[-1], "revoked")
        for p in self.received():
            d = json.loads(p)
            self.assertEqual(set(d), {"key_id", "owner", "event"}, p)
            self.assertEqual(d["owner"], self.owner)
            self.assertNotIn(token, p)
            self.assertNotIn(new_token, p)
            self.assertNotIn("digest", p)
        # tearDown checks the same for every test's notifications

    def test_prepare_false_prepares_nothing(self):
        # psycopg prepares a statement run 5 times (prepare_threshold); a
        # transaction pooler that does not track them needs prepare=False.
        def prepared_after_refusals(cache):
            """How many verify statements cache's connection prepared for 8 refusals."""
            for _ in range(8):                  # refusals: never cached, each one a query
                self.assertEqual(cache.verify("ak_live_garbage")["code"], "API_KEY_INVALID")
            return cache._conn.execute(
                "SELECT count(*) FROM pg_prepared_statements"
                " WHERE statement LIKE '%apikeys.verify(%'").fetchone()["count"]
        self.assertEqual(prepared_after_refusals(self.cache), 1)
        self.cache.close()
        self.cache = self.new_cache(prepare=False)
        self.assertEqual(prepared_after_refusals(self.cache), 0)

    def test_forged_payload_clears(self):
        _, token = self.create_key()
        self.cached_valid(token)
        with self.assertLogs("apikeys.cache", "WARNING") as logs:
            self.su.execute("NOTIFY apikeys_event, 'not json'")
            wait_until(lambda: "not json" in self.received(), "the forged notification")
        self.assertIn("clearing the cache", logs.output[0])
        self.assertEqual(len(self.cache), 0)
        with self.payload_lock:
            self.payloads.remove("not json")   # not one of the extension's
        self.cached_valid(token)


if __name__ == "__main__":
    unittest.main(verbosity=2)
