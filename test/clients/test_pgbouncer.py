"""apikeys through PgBouncer in transaction-pooling mode, with psycopg 3
(test/clients/pgbouncer.sh starts a private cluster and a pgbouncer in front of
it).  In transaction mode a client holds a server connection only for the
length of a transaction; the next transaction may run on another one, and the
next client's on this one.

What works, and is checked here: verify and authenticate; a revoke or rotate
seen at once by the next verification on every server connection of the pool;
rate limits and usage counts shared by every server connection (they live in
the server's shared memory, not in a session); a plan change reaching the
owner policy that every server connection had cached; apikeys.actor set with
set_config(..., true) (SET LOCAL) in the transaction that makes the change.

What does not, and is shown here: a session-level SET apikeys.actor (or
set_config(..., false)) stays on the server connection, so another client's
transaction inherits it while the next transaction of the client that set it
may not have it; LISTEN through the pooler (listen on a direct connection);
protocol-level prepared statements (psycopg's prepare_threshold) with a
PgBouncer that does not track them (before 1.21, or max_prepared_statements 0).

Connection settings come from the environment: APIKEYS_BOUNCER_HOST and
APIKEYS_BOUNCER_PORT (pgbouncer's socket directory and port), PGHOST and PGPORT
(PostgreSQL itself), APIKEYS_BOUNCER_DB (the database), APIKEYS_BOUNCER_APP (a
role granted apikeys_app), APIKEYS_BOUNCER_ADMIN (a role granted
apikeys_admin), APIKEYS_BOUNCER_SU (a superuser, which reads the audit log
directly)."""

import json
import os
import time
import unittest
import uuid

import psycopg
from psycopg import errors

BOUNCER_HOST = os.environ.get("APIKEYS_BOUNCER_HOST", "/tmp")
BOUNCER_PORT = os.environ.get("APIKEYS_BOUNCER_PORT", "54347")
DB = os.environ.get("APIKEYS_BOUNCER_DB", "apikeys_bouncer")
APP = os.environ.get("APIKEYS_BOUNCER_APP", "bouncer_app")
ADMIN = os.environ.get("APIKEYS_BOUNCER_ADMIN", "bouncer_admin")
SU = os.environ.get("APIKEYS_BOUNCER_SU", "postgres")

# pgbouncer's databases (pgbouncer.sh), all of them DB, and their pool sizes.
# PgBouncer keeps a pool per database and user.
POOL = "apikeys_pool"
POOL_SIZE = {"apikeys_pool": 3, "apikeys_leak": 3, "apikeys_prep": 2, "apikeys_listen": 1}


def bouncer(role, db=POOL, autocommit=True, prepare_threshold=None):
    """A client connection through pgbouncer.  prepare_threshold=None: psycopg
    prepares no statement, which transaction pooling needs (see
    test_prepared_statements_need_the_pooler)."""
    return psycopg.connect(host=BOUNCER_HOST, port=BOUNCER_PORT, dbname=db, user=role,
                           autocommit=autocommit, prepare_threshold=prepare_threshold)


def direct(role):
    """A connection to PostgreSQL itself (PGHOST, PGPORT)."""
    return psycopg.connect(dbname=DB, user=role, autocommit=True)


def wait_until(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class PgBouncerTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.app = bouncer(APP)
        cls.admin = bouncer(ADMIN)
        cls.su = direct(SU)
        mode = cls.pool_mode()
        assert mode == "transaction", f"pgbouncer runs pool_mode {mode!r}"

    @classmethod
    def tearDownClass(cls):
        for c in (cls.app, cls.admin, cls.su):
            c.close()

    @staticmethod
    def pool_mode():
        with psycopg.connect(host=BOUNCER_HOST, port=BOUNCER_PORT, dbname="pgbouncer",
                             user=SU, autocommit=True, prepare_threshold=None) as c:
            for row in c.execute("SHOW CONFIG").fetchall():
                if row[0] == "pool_mode":
                    return row[1]
        return None

    # -- helpers ---------------------------------------------------------

    def new_owner(self, plan="enterprise"):
        owner = f"owner-{uuid.uuid4()}"
        self.admin.execute("SELECT apikeys.set_plan(%s, %s)", (owner, plan))
        return owner

    TYPES = {"scopes": "text[]", "rate_limit": "integer", "rate_burst": "integer"}

    def create_key(self, owner, **kw):
        """create_key through the pooler; (key_id, token)."""
        args = "".join(f", {k} => %s::{self.TYPES[k]}" for k in kw)
        return self.app.execute(
            f"SELECT key_id, token::text FROM apikeys.create_key(%s, %s{args})",
            (owner, "k", *kw.values())).fetchone()

    def hold_every_server(self, db=POOL, role=APP):
        """One client per server connection of db's pool for role, each in an
        open transaction: a pool has at most pool_size server connections, so
        pool_size clients in open transactions hold every one of them.
        Returns [(connection, backend pid)]; the caller commits."""
        held = []
        for _ in range(POOL_SIZE[db]):
            c = bouncer(role, db, autocommit=False)
            self.addCleanup(c.close)
            held.append((c, c.execute("SELECT pg_backend_pid()").fetchone()[0]))
        pids = [pid for _, pid in held]
        self.assertEqual(len(set(pids)), POOL_SIZE[db],
                         f"clients in open transactions shared a server connection: {pids}")
        return held

    @staticmethod
    def code(conn, token, scopes=()):
        return conn.execute("SELECT (apikeys.verify(%s, %s::text[])).code",
                            (token, list(scopes))).fetchone()[0]

    def audit(self, key_id, event):
        return self.su.execute(
            "SELECT actor, db_user FROM apikeys.audit_log WHERE key_id = %s AND event = %s "
            "ORDER BY id", (key_id, event)).fetchall()

    # -- what works ------------------------------------------------------

    def test_verify_and_authenticate(self):
        owner = self.new_owner()
        key_id, token = self.create_key(owner, scopes=["orders:*"])
        # Several clients, many calls each: no state of one call is needed by the next.
        clients = [bouncer(APP) for _ in range(4)]
        for c in clients:
            self.addCleanup(c.close)
        for i in range(12):
            c = clients[i % len(clients)]
            row = c.execute("SELECT valid, code, key_id, owner, scopes "
                            "FROM apikeys.verify(%s, '{orders:read}')", (token,)).fetchone()
            self.assertEqual(row, (True, "VALID", key_id, owner, ["orders:*"]))
            self.assertEqual(self.code(c, token, ["billing:read"]), "INSUFFICIENT_SCOPE")
            self.assertEqual(c.execute("SELECT owner, name FROM apikeys.authenticate(%s)",
                                       (token,)).fetchone(), (owner, "k"))
        # authenticate refuses with 28000 and the code as the message.
        bad = token[:-1] + ("A" if token[-1] != "A" else "B")
        with self.assertRaises(errors.InvalidAuthorizationSpecification) as cm:
            clients[0].execute("SELECT * FROM apikeys.authenticate(%s)", (bad,))
        self.assertEqual(cm.exception.sqlstate, "28000")
        self.assertEqual(cm.exception.diag.message_primary, "API_KEY_INVALID")
        # The error ended that transaction only; the client goes on.
        self.assertEqual(self.code(clients[0], token), "VALID")
        # Inside an explicit transaction too: it must be rolled back, then the
        # server connection goes back to the pool and the next one works.
        c = bouncer(APP, autocommit=False)
        self.addCleanup(c.close)
        with self.assertRaises(errors.InvalidAuthorizationSpecification):
            c.execute("SELECT * FROM apikeys.authenticate(%s)", (bad,))
        c.rollback()
        self.assertEqual(self.code(c, token), "VALID")
        c.commit()
        # Usage is counted in the server's shared memory, whichever server
        # connection answered: 12 VALID verifies, 12 authenticates, 2 more
        # verifies (VALID), and 12 INSUFFICIENT_SCOPE refusals.
        self.assertEqual(self.app.execute(
            "SELECT requests_today, failures_today FROM apikeys.list_keys(%s)",
            (owner,)).fetchone(), (12 + 12 + 2, 12))

    def test_revoke_and_rotate_seen_at_once_on_every_server_connection(self):
        owner = self.new_owner()
        revoked_id, revoked = self.create_key(owner)
        rotated_id, rotated = self.create_key(owner)
        # Every server connection of the pool answers VALID (and has looked
        # the keys up once).
        held = self.hold_every_server()
        pids = {pid for _, pid in held}
        for c, _ in held:
            self.assertEqual(self.code(c, revoked), "VALID")
            self.assertEqual(self.code(c, rotated), "VALID")
            c.commit()
        self.app.execute("SELECT apikeys.revoke(%s, %s, 'pgbouncer test')", (revoked_id, owner))
        new_id, new = self.app.execute(
            "SELECT key_id, token::text FROM apikeys.rotate(%s, %s)", (rotated_id, owner)).fetchone()
        # The next transaction on each of the same server connections sees both.
        held = self.hold_every_server()
        self.assertEqual({pid for _, pid in held}, pids,
                         "the pool's server connections changed; the test proves nothing")
        for c, pid in held:
            self.assertEqual(self.code(c, revoked), "API_KEY_REVOKED", f"server pid {pid}")
            self.assertEqual(self.code(c, rotated), "API_KEY_REVOKED", f"server pid {pid}")
            self.assertEqual(self.code(c, new), "VALID", f"server pid {pid}")
            with self.assertRaises(errors.InvalidAuthorizationSpecification) as cm:
                c.execute("SELECT * FROM apikeys.authenticate(%s)", (revoked,))
            self.assertEqual(cm.exception.diag.message_primary, "API_KEY_REVOKED")
            c.rollback()
        self.assertEqual(len(self.audit(new_id, "key_created")), 1)

    def test_rate_limit_shared_by_every_server_connection(self):
        # rate_limit 1 with burst 1: two requests at once, then one a minute,
        # however many server connections the requests arrive on.
        owner = self.new_owner()
        key_id, token = self.create_key(owner, rate_limit=1, rate_burst=1)
        held = self.hold_every_server()
        codes = [self.code(c, token) for c, _ in held]
        for c, _ in held:
            c.commit()
        self.assertEqual(codes, ["VALID", "VALID", "RATE_LIMITED"])
        self.assertEqual(self.code(self.app, token), "RATE_LIMITED")
        self.assertEqual(self.app.execute(
            "SELECT requests_today, failures_today FROM apikeys.list_keys(%s)",
            (owner,)).fetchone(), (2, 2))

    def test_plan_change_reaches_every_server_connection(self):
        # verify caches an owner's plan policy per session; a committed plan
        # change makes every session forget it, pooled server connections
        # included.  A stale one would answer VALID below.
        owner = self.new_owner()
        key_id, token = self.create_key(owner)
        held = self.hold_every_server()
        pids = {pid for _, pid in held}
        for c, _ in held:
            self.assertEqual(self.code(c, token), "VALID")    # caches "no owner-wide limit"
            c.commit()
        plan = f"one-{uuid.uuid4()}"
        with self.admin.transaction():
            self.admin.execute("INSERT INTO apikeys.plans (name, rate_limit) VALUES (%s, 1)", (plan,))
            self.admin.execute("SELECT apikeys.set_plan(%s, %s)", (owner, plan))
        held = self.hold_every_server()
        self.assertEqual({pid for _, pid in held}, pids,
                         "the pool's server connections changed; the test proves nothing")
        codes = [self.code(c, token) for c, _ in held]
        for c, _ in held:
            c.commit()
        # An owner-wide rate_limit of 1: one request at once, then one a minute.
        self.assertEqual(codes, ["VALID", "RATE_LIMITED", "RATE_LIMITED"])

    def test_actor_set_in_the_transaction_of_the_change(self):
        owner = self.new_owner()
        key_id, token = self.create_key(owner)
        other_id, _ = self.create_key(owner)
        actor = f"alice-{uuid.uuid4()}@example.com"
        # set_config(..., true) is SET LOCAL with a bind parameter (psycopg
        # binds on the server, and SET takes no parameters).
        with self.app.transaction():
            self.app.execute("SELECT set_config('apikeys.actor', %s, true)", (actor,))
            self.app.execute("SELECT apikeys.revoke(%s, %s, 'requested by user')", (key_id, owner))
            new_id, _ = self.app.execute(
                "SELECT key_id, token::text FROM apikeys.rotate(%s, %s)", (other_id, owner)).fetchone()
        self.assertEqual(self.audit(key_id, "key_revoked"), [(actor, APP)])
        self.assertEqual(self.audit(other_id, "key_rotated"), [(actor, APP)])
        self.assertEqual(self.audit(new_id, "key_created"), [(actor, APP)])
        self.assertEqual(self.su.execute(
            "SELECT revoked_by FROM apikeys.keys WHERE id = %s", (key_id,)).fetchone()[0], actor)
        # It ended with its transaction: no server connection of the pool has it.
        held = self.hold_every_server()
        for c, pid in held:
            self.assertEqual(c.execute("SELECT current_setting('apikeys.actor')").fetchone()[0],
                             "", f"server pid {pid}")
            c.commit()
        # So the next change without it records the database role.
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (new_id, owner))
        self.assertEqual(self.audit(new_id, "key_revoked"), [(APP, APP)])

    # -- what does not work ----------------------------------------------

    def test_session_level_actor_leaks_and_is_lost(self):
        # Its own pools (apikeys_leak), so that nothing it leaves on a server
        # connection reaches the other tests.
        owner = self.new_owner()
        mine_id, _ = self.create_key(owner)
        theirs_id, _ = self.create_key(owner)
        a = bouncer(APP, "apikeys_leak")
        self.addCleanup(a.close)
        # Client A sets the actor for "its session" (SET without LOCAL, the same
        # as set_config(..., false)); the transaction ran on server connection pa.
        with a.transaction():
            a.execute("SET apikeys.actor = 'alice'")
            pa = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        # Other clients take every server connection of the pool: the one on pa
        # has alice, although it never set anything.
        held = self.hold_every_server("apikeys_leak")
        seen = {pid: c.execute("SELECT current_setting('apikeys.actor')").fetchone()[0]
                for c, pid in held}
        self.assertIn(pa, seen, "pa was closed; the test proves nothing")
        self.assertEqual(seen, {pid: ("alice" if pid == pa else "") for pid in seen})
        heir = next(c for c, pid in held if pid == pa)
        for c, pid in held:
            if pid != pa:
                c.commit()
        # A's next transaction cannot get pa (the heir holds it): A's own
        # setting is gone, and A's change records the database role.
        with a.transaction():
            pid, setting = a.execute(
                "SELECT pg_backend_pid(), current_setting('apikeys.actor')").fetchone()
            a.execute("SELECT apikeys.revoke(%s, %s)", (mine_id, owner))
        self.assertNotEqual(pid, pa)
        self.assertEqual(setting, "")
        self.assertEqual(self.audit(mine_id, "key_revoked"), [(APP, APP)])
        # The heir's change is recorded as alice's.
        heir.execute("SELECT apikeys.revoke(%s, %s)", (theirs_id, owner))
        heir.execute("RESET apikeys.actor")
        heir.commit()
        self.assertEqual(self.audit(theirs_id, "key_revoked"), [("alice", APP)])

    def test_listen_needs_a_direct_connection(self):
        # PgBouncer forwards a notification only to the client linked to the
        # server connection at that moment; a LISTEN through it registers on a
        # server connection that goes back to the pool, so the listener misses
        # what is sent.  A listener connected directly gets it, also for a
        # change made through the pooler.
        got_direct, got_pooled = [], []
        listener = direct(APP)
        self.addCleanup(listener.close)
        listener.add_notify_handler(lambda n: got_direct.append(n.payload))
        listener.execute("LISTEN apikeys_event")
        pooled = bouncer(APP, "apikeys_listen")
        self.addCleanup(pooled.close)
        pooled.add_notify_handler(lambda n: got_pooled.append(n.payload))
        pooled.execute("LISTEN apikeys_event")

        owner = self.new_owner()
        key_id, _ = self.create_key(owner)
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (key_id, owner))

        def events(payloads):
            return [d["event"] for d in map(json.loads, payloads) if d["key_id"] == str(key_id)]

        def direct_has_both():
            listener.execute("SELECT 1")      # reads what has arrived
            return events(got_direct) == ["created", "revoked"]

        wait_until(direct_has_both, "the direct listener's notifications")
        time.sleep(1.0)                       # the pooled one's were sent as long ago
        for _ in range(3):
            pooled.execute("SELECT 1")
        self.assertEqual(events(got_pooled), [])
        pooled.execute("UNLISTEN *")

    def test_prepared_statements_need_the_pooler(self):
        # psycopg prepares a query it has run prepare_threshold times (default
        # 5; 0 here, to prepare at once).  The prepared statement lives on one
        # server connection; the next execution may run on another, where it
        # does not exist.  Its own pools (apikeys_prep).
        owner = self.new_owner()
        _, token = self.create_key(owner)
        query = "SELECT pg_backend_pid(), (apikeys.verify(%s)).code"
        a = bouncer(APP, "apikeys_prep", prepare_threshold=0)
        self.addCleanup(a.close)
        pa, code = a.execute(query, (token,)).fetchone()
        self.assertEqual(code, "VALID")
        held = self.hold_every_server("apikeys_prep")
        self.assertIn(pa, {pid for _, pid in held}, "pa was closed; the test proves nothing")
        heir = next(c for c, pid in held if pid == pa)
        for c, pid in held:
            if pid != pa:
                c.commit()
        with self.assertRaises(errors.InvalidSqlStatementName) as cm:
            a.execute(query, (token,))
        self.assertEqual(cm.exception.sqlstate, "26000")
        heir.commit()
        # Without prepared statements (prepare_threshold=None) the same calls work
        # on any server connection.
        b = bouncer(APP, "apikeys_prep")
        self.addCleanup(b.close)
        held = self.hold_every_server("apikeys_prep")
        for c, _ in held[1:]:
            c.commit()
        for _ in range(10):
            self.assertEqual(b.execute(query, (token,)).fetchone()[1], "VALID")
        held[0][0].commit()


if __name__ == "__main__":
    unittest.main()
