"""Tests of app.py, the Python HTTP service, over loopback HTTP (urllib),
against a live server with the preload (test/clients/run.sh starts one).  Also
checks that the README's Python example is app.py's excerpt, and that
doc/keys.md's Python blocks are cache.py's text.

The LISTEN loop that survives a terminated connection and resumes is cache.py's
listener, tested in test_cache.py (test_listener_reconnects_after_terminate).

Environment: PGHOST, PGPORT; APIKEYS_CLIENTS_DB (the database);
APIKEYS_CLIENTS_PY_APP, a login role granted apikeys_app: the service's pool,
and every key is created through it; APIKEYS_CLIENTS_PY_ADMIN, a login role
granted apikeys_admin: plans and the audit log; APIKEYS_CLIENTS_SU, a
superuser (pg_stat_activity); APIKEYS_CLIENTS_REPO, the source tree (default:
two directories up from this file).

The expected statuses and headers are written out here, never taken from
app.py, so a wrong mapping in the middleware fails these tests."""

import base64
import datetime
import json
import os
import re
import socket
import sys
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
from collections import namedtuple

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import app  # noqa: E402

DB = os.environ.get("APIKEYS_CLIENTS_DB", "apikeys_clients")
APP = os.environ.get("APIKEYS_CLIENTS_PY_APP", "py_app")
ADMIN = os.environ.get("APIKEYS_CLIENTS_PY_ADMIN", "py_admin")
SU = os.environ.get("APIKEYS_CLIENTS_SU", "postgres")
REPO = os.environ.get("APIKEYS_CLIENTS_REPO") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..")
POOL_SIZE = 4
MARK = "Python"
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")

Reply = namedtuple("Reply", "status headers body")

# Loopback requests bypass any proxy set in the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def dsn(role):
    """A libpq connection string for `role` in the test database."""
    return f"dbname={DB} user={role}"


def call(port, method, path, token=None, headers=None):
    """An HTTP request to 127.0.0.1:port; `token` goes in "Authorization: Bearer"."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=h)
    try:
        with OPENER.open(req, timeout=30) as res:
            status, hdrs, text = res.status, res.headers, res.read()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, e.headers, e.read()
    assert hdrs["Content-Type"] == "application/json", (status, text)
    return Reply(status, hdrs, json.loads(text))


def flip_case(token):
    """Flips the case of the first letter of a token's secret part (ak_live_...)."""
    i = 8 + next(i for i, c in enumerate(token[8:]) if c.isalpha())
    return token[:i] + token[i].swapcase() + token[i + 1:]


def swap_adjacent(token):
    """Swaps the first two adjacent characters of the secret part that differ."""
    i = 8
    while token[i] == token[i + 1]:
        i += 1
    return token[:i] + token[i + 1] + token[i] + token[i + 2:]


def python_blocks(markdown, heading):
    """The ```python blocks of the section `heading` of a markdown text, as written
    (a section ends at the next heading of its level or above, outside code)."""
    lines = markdown.split("\n")
    next_heading = re.compile(r"#{1,%d} " % heading.index(" "))
    blocks, fence = [], None
    for line in lines[lines.index(heading) + 1:]:
        if fence is None:
            if next_heading.match(line):
                break
            if line.lstrip(" ").startswith("```"):
                indent = line[:len(line) - len(line.lstrip(" "))]
                fence, lang, body = indent + "```", line.strip()[3:], []
        elif line == fence:
            if lang == "python":
                blocks.append("\n".join(body) + "\n")
            fence = None
        else:
            body.append(line)
    return blocks


class AppTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.app = psycopg.connect(dsn(APP), autocommit=True)
        cls.admin = psycopg.connect(dsn(ADMIN), autocommit=True)
        cls.su = psycopg.connect(dsn(SU), autocommit=True)
        cls.pool = app.make_pool(dsn(APP), size=POOL_SIZE, timeout=10)
        cls.pool.wait()
        cls.server, cls.port = cls.start(cls.pool)

    @classmethod
    def tearDownClass(cls):
        cls.stop(cls.server)
        cls.pool.close()
        for c in (cls.app, cls.admin, cls.su):
            c.close()

    @staticmethod
    def start(pool):
        """app.Service on 127.0.0.1, an ephemeral port, served by a thread."""
        server = app.Service(("127.0.0.1", 0), pool)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, server.server_address[1]

    @staticmethod
    def stop(server):
        """Stops a server started by start()."""
        server.shutdown()
        server.server_close()

    # -- helpers ---------------------------------------------------------

    def get(self, token=None, headers=None):
        """GET /orders (scope orders:read)."""
        return call(self.port, "GET", "/orders", token, headers)

    def report(self, token):
        """POST /reports (scope reports:write, 10 credits)."""
        return call(self.port, "POST", "/reports", token)

    def new_owner(self, plan="enterprise"):
        """A new owner, on a plan without a key limit (set_plan is apikeys_admin's)."""
        owner = f"py-{uuid.uuid4()}"
        self.admin.execute("SELECT apikeys.set_plan(%s, %s)", (owner, plan))
        return owner

    def create_key(self, owner, scopes=("orders:read",), rate_limit=None, rate_burst=None,
                   credits=None, allowed_ips=None, expires_in=None):
        """A key created by APP, as the application creates keys: (key_id, token)."""
        return self.app.execute(
            """SELECT key_id, token::text
                 FROM apikeys.create_key(%s, 'py test', %s::text[],
                                         rate_limit => %s::integer, rate_burst => %s::integer,
                                         credits => %s::bigint, allowed_ips => %s::cidr[],
                                         expires_at => now() + %s::interval)""",
            (owner, list(scopes), rate_limit, rate_burst, credits, allowed_ips,
             expires_in)).fetchone()

    def rotate(self, key_id, owner, grace):
        """apikeys.rotate by APP: (new key_id, new token)."""
        return self.app.execute(
            "SELECT key_id, token::text FROM apikeys.rotate(%s, %s, %s::interval)",
            (key_id, owner, grace)).fetchone()

    def assert_refused(self, r, status, code, what=None):
        """A refusal: the status, {"error": code}, WWW-Authenticate on 401 only."""
        what = what or code
        self.assertEqual(r.status, status, f"{what}: {r.body}")
        self.assertEqual(r.body, {"error": code}, what)
        self.assertEqual(r.headers["WWW-Authenticate"], "Bearer" if status == 401 else None,
                         f"{what}: WWW-Authenticate")

    def assert_no_headers(self, r, names, what):
        """None of the headers `names` in the reply."""
        for name in names:
            self.assertIsNone(r.headers[name], f"{what}: {name}")

    def on_each_connection(self, fn):
        """Checks out every connection of the service's pool, then hands them back
        one at a time: while the others are held, the pool can give the service
        only the one handed back, so fn(i) is served by connection i.  Checks
        that it was: the connection's backend last ran one of the service's
        statements, not the test's marker, and the pool gives back the same
        connection.  Returns the backend pids."""
        held = [self.pool.getconn() for _ in range(POOL_SIZE)]
        out = None
        try:
            for i, c in enumerate(held):
                c.execute("SELECT 'held by the test'")
                out = i
                self.pool.putconn(c)
                fn(i)
                held[i] = self.pool.getconn()
                out = None
                self.assertIs(held[i], c, "the pool handed back another connection")
                query = self.su.execute("SELECT query FROM pg_stat_activity WHERE pid = %s",
                                        (c.info.backend_pid,)).fetchone()[0]
                self.assertIn("apikeys.", query, f"connection {i} served nothing")
        finally:
            for i, c in enumerate(held):
                if i != out:
                    self.pool.putconn(c)
        return [c.info.backend_pid for c in held]

    # -- the README and doc/keys.md --------------------------------------

    def test_readme_excerpt_is_app_py(self):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")) as f:
            source = f.read().split("\n")
        begin, end = f"# BEGIN README: {MARK}", f"# END README: {MARK}"
        self.assertEqual(source.count(begin), 1, "one BEGIN marker in app.py")
        self.assertEqual(source.count(end), 1, "one END marker in app.py")
        excerpt = "\n".join(source[source.index(begin) + 1:source.index(end)]) + "\n"
        self.assertGreater(excerpt.count("\n"), 20, "the excerpt holds the middleware")

        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        blocks = python_blocks(readme, f"### From {MARK}")
        self.assertEqual(len(blocks), 1, "one python block in the section")
        self.assertEqual(blocks[0], excerpt, "README.md's example differs from app.py's")
        self.assertEqual(readme.count(excerpt), 1, "README.md holds the excerpt exactly once")

    def test_keys_md_python_blocks_are_cache_py(self):
        with open(os.path.join(REPO, "doc", "keys.md")) as f:
            blocks = python_blocks(f.read(), "## Caching verify() in the application")
        with open(os.path.join(REPO, "test", "clients", "cache.py")) as f:
            lines = f.read().split("\n")
        self.assertEqual(len(blocks), 3, "the usage example and two excerpts of cache.py")
        for block in map(textwrap.dedent, blocks):
            n = block.count("\n")
            self.assertGreater(n, 3, block)
            found = any(textwrap.dedent("\n".join(lines[i:i + n]) + "\n") == block
                        for i in range(len(lines) - n + 1))
            self.assertTrue(found, f"doc/keys.md quotes text that cache.py does not hold:\n{block}")

    # -- statuses --------------------------------------------------------

    def test_every_code_maps_to_its_status(self):
        owner = self.new_owner()
        _, expiring = self.create_key(owner, expires_in="1 second")
        made_at = time.monotonic()
        self.assertEqual(self.get(expiring).status, 200, "valid until it expires")

        _, valid = self.create_key(owner)
        revoked_id, revoked = self.create_key(owner)
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (revoked_id, owner))
        disabled_id, disabled = self.create_key(owner)
        self.app.execute("SELECT apikeys.disable_key(%s, %s)", (disabled_id, owner))
        _, elsewhere = self.create_key(owner, allowed_ips=["192.0.2.0/24"])
        _, here = self.create_key(owner, allowed_ips=["127.0.0.1/32"])
        _, wrong_scope = self.create_key(owner, scopes=["orders:write", "reports:write"])
        _, broke = self.create_key(owner, credits=0)
        _, paced = self.create_key(owner, rate_limit=1, rate_burst=0)
        self.assertEqual(self.get(paced).status, 200, "the first request of the minute")
        time.sleep(max(0.0, made_at + 1.1 - time.monotonic()))

        cases = [
            ("VALID", valid, 200),
            ("VALID", here, 200),                 # the client's address reaches verify
            ("API_KEY_INVALID", "ak_live_not-a-token", 401),
            ("API_KEY_REVOKED", revoked, 401),
            ("API_KEY_EXPIRED", expiring, 401),
            ("API_KEY_DISABLED", disabled, 401),
            ("IP_NOT_ALLOWED", elsewhere, 403),
            ("INSUFFICIENT_SCOPE", wrong_scope, 403),
            ("USAGE_EXCEEDED", broke, 402),
            ("RATE_LIMITED", paced, 429),
        ]
        for code, token, status in cases:
            with self.subTest(code=code):
                r = self.get(token)
                if code == "VALID":
                    self.assertEqual(r.status, 200, r.body)
                    self.assertEqual(r.body["owner"], owner)
                    continue
                self.assert_refused(r, status, code)
                self.assertEqual(r.headers["Retry-After"] is not None, code == "RATE_LIMITED",
                                 f"{code}: Retry-After only on 429")
        self.assertEqual(len({c for c, _, _ in cases}), 9, "VALID and the eight refusals")

    def test_garbage_truncated_and_case_changed_tokens_are_401(self):
        owner = self.new_owner()
        key_id, t = self.create_key(owner)
        self.assertRegex(t, r"^ak_live_[0-9A-Za-z]{38}$")
        flipped = flip_case(t)
        self.assertNotEqual(flipped, t)
        authorizations = [
            None,                                   # no Authorization header
            "", "Bearer", "Bearer ", t,             # no scheme, no token
            "Basic " + base64.b64encode(f"{t}:".encode()).decode(),
            f"Token {t}", f"Bearer {t} {t}", f"Bearer {t},", f'Bearer "{t}"',
            "Bearer garbage", "Bearer ' OR 1=1; --", "Bearer ak_live_", "Bearer " + "x" * 8000,
            f"Bearer {t[:-1]}", f"Bearer {t[:20]}", f"Bearer {t[1:]}",
            f"Bearer {t}A", f"Bearer {t}{t}",
            f"Bearer {flipped}", f"Bearer {t.upper()}", f"Bearer {t.lower()}",
            f"Bearer AK_LIVE_{t[8:]}", f"Bearer ak_test_{t[8:]}",
            f"Bearer {swap_adjacent(t)}",
            f"Bearer {t[:10]}\x00{t[11:]}", f"Bearer {t[:10]}\u00e9{t[11:]}",   # NUL, Latin-1
        ]
        for authorization in authorizations:
            what = f"Authorization: {str(authorization)[:60]!r}"
            with self.subTest(what):
                headers = {} if authorization is None else {"Authorization": authorization}
                r = self.get(headers=headers)
                self.assert_refused(r, 401, "API_KEY_INVALID", what)
                self.assert_no_headers(r, RATE_HEADERS + ("X-Credits-Remaining",), what)
        r = self.get(t)
        self.assertEqual(r.status, 200, "the real token still passes")
        self.assertEqual(r.body["key_id"], str(key_id))

    def test_wrong_scope_is_403(self):
        owner = self.new_owner()
        _, t = self.create_key(owner, scopes=["reports:write", "orders:readx", "orders"])
        self.assert_refused(self.get(t), 403, "INSUFFICIENT_SCOPE")
        # the scope /reports needs is held: it passes there (no credits needed)
        self.assertEqual(self.report(t).status, 200)
        # a wildcard grants orders:read
        _, w = self.create_key(owner, scopes=["orders:*"])
        self.assertEqual(self.get(w).status, 200)
        self.assert_refused(self.report(w), 403, "INSUFFICIENT_SCOPE")

    def test_revoke_is_seen_by_the_next_request_on_every_pooled_connection(self):
        owner = self.new_owner()
        key_id, t = self.create_key(owner)

        # Each connection verifies the key first (and so has the key's owner
        # and plan in its session cache) ...
        def before(i):
            self.assertEqual(self.get(t).status, 200, f"connection {i} before the revoke")
        pids = self.on_each_connection(before)
        self.assertEqual(len(set(pids)), POOL_SIZE, "distinct server processes")

        # ... then another session revokes it, and each connection's next request is refused.
        self.app.execute("SELECT apikeys.revoke(%s, %s)", (key_id, owner))

        def after(i):
            self.assert_refused(self.get(t), 401, "API_KEY_REVOKED", f"connection {i} after")
        self.assertEqual(sorted(self.on_each_connection(after)), sorted(pids),
                         "the same connections")

    def test_rotation_with_a_grace(self):
        owner = self.new_owner("pro")
        a_id, a = self.create_key(owner)
        b_id, b = self.rotate(a_id, owner, "1 hour")
        r = self.get(a)
        self.assertEqual(r.status, 200, "the old token, in its grace")
        self.assertEqual(r.body["key_id"], str(a_id))
        r = self.get(b)
        self.assertEqual(r.status, 200, "the new token")
        self.assertEqual(r.body["key_id"], str(b_id))

        # Rotating again without a grace: the middle key is revoked at once, and
        # the oldest one's grace ends (at most two keys verify).
        c_id, c = self.rotate(b_id, owner, "0")
        self.assert_refused(self.get(a), 401, "API_KEY_EXPIRED", "the oldest token")
        self.assert_refused(self.get(b), 401, "API_KEY_REVOKED", "the middle token")
        self.assertEqual(self.get(c).status, 200)

        # A short grace runs out by itself.
        _, d = self.rotate(c_id, owner, "1 second")
        rotated_at = time.monotonic()
        self.assertEqual(self.get(c).status, 200, "in its one-second grace")
        time.sleep(max(0.0, rotated_at + 1.1 - time.monotonic()))
        self.assert_refused(self.get(c), 401, "API_KEY_EXPIRED", "after the grace")
        self.assertEqual(self.get(d).status, 200)

    def test_key_rate_limit_headers_and_429(self):
        owner = self.new_owner()
        _, t = self.create_key(owner, rate_limit=1, rate_burst=2)   # 3 at once, then 1/min
        expect = [(200, "2", 60), (200, "1", 120), (200, "0", 60), (429, "0", 60), (429, "0", 60)]
        for i, (status, remaining, reset_in) in enumerate(expect, 1):
            what = f"request {i}"
            r = self.get(t)
            self.assertEqual(r.status, status, f"{what}: {r.body}")
            self.assertEqual(r.headers["X-RateLimit-Limit"], "1", what)
            self.assertEqual(r.headers["X-RateLimit-Remaining"], remaining, what)
            self.assertRegex(r.headers["X-RateLimit-Reset"], r"^\d+$", f"{what}: epoch seconds")
            ahead = int(r.headers["X-RateLimit-Reset"]) - time.time()
            self.assertTrue(reset_in - 5 < ahead <= reset_in + 1,
                            f"{what}: X-RateLimit-Reset {ahead:.1f} s ahead, not {reset_in}")
            if status == 429:
                self.assert_refused(r, 429, "RATE_LIMITED", what)
                self.assertRegex(r.headers["Retry-After"], r"^\d+$", what)
                self.assertTrue(55 <= int(r.headers["Retry-After"]) <= 60,
                                f"{what}: Retry-After {r.headers['Retry-After']}")
            else:
                self.assertIsNone(r.headers["Retry-After"], f"{what}: no Retry-After")

    def test_plan_rate_limit_headers_and_429(self):
        plan = f"py-rl-{uuid.uuid4()}"
        self.admin.execute("INSERT INTO apikeys.plans (name, rate_limit) VALUES (%s, 2)", (plan,))
        owner = self.new_owner(plan)
        _, k1 = self.create_key(owner)
        _, k2 = self.create_key(owner)
        r = self.get(k1)
        self.assertEqual((r.status, r.headers["X-RateLimit-Limit"],
                          r.headers["X-RateLimit-Remaining"]), (200, "2", "1"))
        r = self.get(k2)                     # the other key shares the owner's allowance
        self.assertEqual((r.status, r.headers["X-RateLimit-Remaining"]), (200, "0"))
        r = self.get(k1)
        self.assert_refused(r, 429, "RATE_LIMITED")
        self.assertEqual((r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]),
                         ("2", "0"))
        self.assertTrue(25 <= int(r.headers["Retry-After"]) <= 30,   # one request every 30 s
                        f"Retry-After {r.headers['Retry-After']}")

    def test_credits_and_402(self):
        owner = self.new_owner()
        _, t = self.create_key(owner, scopes=["orders:read", "reports:write"], credits=25)
        r = self.report(t)                                   # costs 10
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.body["report"], "queued")
        self.assertEqual(r.headers["X-Credits-Remaining"], "15")
        self.assertEqual(self.report(t).headers["X-Credits-Remaining"], "5")
        r = self.report(t)
        self.assert_refused(r, 402, "USAGE_EXCEEDED")
        self.assertEqual(r.headers["X-Credits-Remaining"], "5", "a refusal spends nothing")
        self.assert_no_headers(r, RATE_HEADERS, "USAGE_EXCEEDED")
        r = self.get(t)                                      # costs 1
        self.assertEqual((r.status, r.headers["X-Credits-Remaining"]), (200, "4"))

    def test_actor_is_recorded_with_set_config(self):
        owner = self.new_owner()
        caller_id, caller = self.create_key(owner, scopes=["keys:write"])
        t1_id, t1 = self.create_key(owner)
        t2_id, _ = self.create_key(owner)

        def delete(key_id, token, headers=None):
            """DELETE /keys/<key_id> with `token`."""
            return call(self.port, "DELETE", f"/keys/{key_id}", token, headers)

        def revoked_by(key_id):
            """(actor, db_user) of the key's key_revoked audit rows."""
            return self.admin.execute(
                """SELECT actor, db_user::text FROM apikeys.audit_log
                    WHERE key_id = %s AND event = 'key_revoked'""", (key_id,)).fetchall()

        # Quotes, a semicolon and SQL in the actor are data, recorded as given.
        actor = "o'hara\"; SET LOCAL apikeys.actor = 'mallory'; -- \\ %s $1"
        r = delete(t1_id, caller, {"X-Actor": actor})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.body["key_id"], str(t1_id))
        self.assertIsNotNone(datetime.datetime.fromisoformat(r.body["revoked_at"]).tzinfo,
                             "revoked_at carries its offset")
        self.assert_refused(self.get(t1), 401, "API_KEY_REVOKED", "the next request")
        self.assertEqual(revoked_by(t1_id), [(actor, APP)])

        self.assertEqual(delete(t2_id, caller).status, 200)     # no X-Actor: the calling key
        self.assertEqual(revoked_by(t2_id), [(f"apikey:{caller_id}", APP)])

        # Another owner's key is not found, and stays valid; so is a malformed id.
        other_id, other = self.create_key(self.new_owner())
        r = delete(other_id, caller, {"X-Actor": actor})
        self.assertEqual((r.status, r.body), (404, {"error": "KEY_NOT_FOUND"}))
        self.assertEqual(self.get(other).status, 200)
        self.assertEqual(revoked_by(other_id), [])
        self.assertEqual(delete("not-a-uuid", caller).status, 404)
        # A key without keys:write may not revoke.
        _, reader = self.create_key(owner)
        t3_id, t3 = self.create_key(owner)
        self.assert_refused(delete(t3_id, reader), 403, "INSUFFICIENT_SCOPE")
        self.assertEqual(self.get(t3).status, 200)

        # No pooled connection keeps an actor after its transaction.
        held = [self.pool.getconn() for _ in range(POOL_SIZE)]
        try:
            for i, c in enumerate(held):
                row = c.execute("SELECT current_setting('apikeys.actor') AS actor").fetchone()
                self.assertEqual(row["actor"], "", f"connection {i}")
        finally:
            for c in held:
                self.pool.putconn(c)
        # Why set_config: SET takes no bind parameters.
        with self.assertRaises(psycopg.errors.SyntaxError):
            self.app.execute("SET LOCAL apikeys.actor = %s", (actor,))

    def test_no_database_is_503(self):
        with socket.socket() as s:                   # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        _, t = self.create_key(self.new_owner())
        # The pool's failed connection attempts and the service's 503 are logged.
        with self.assertLogs(level="WARNING") as logs:
            dead_pool = app.make_pool(f"host=127.0.0.1 port={dead_port} {dsn(APP)}", size=1,
                                      timeout=2)
            server, port = self.start(dead_pool)
            try:
                r = call(port, "GET", "/orders", t)
            finally:
                self.stop(server)
                dead_pool.close()
        self.assertEqual((r.status, r.body), (503, {"error": "SERVICE_UNAVAILABLE"}))
        self.assert_no_headers(r, RATE_HEADERS + ("WWW-Authenticate", "X-Credits-Remaining"),
                               "503")
        self.assertTrue(any(rec.name == "apikeys.app"
                            and rec.getMessage().startswith("GET /orders: ")
                            for rec in logs.records), logs.output)

    # -- what psycopg returns ----------------------------------------------

    def test_psycopg_types(self):
        # verify's row, as app.py's comment says psycopg decodes it.
        owner = self.new_owner()
        key_id, t = self.create_key(owner, rate_limit=10, credits=5)
        with self.pool.connection() as conn:
            v = conn.execute(app.VERIFY, (t, [], None, 1)).fetchone()
        self.assertEqual(v["code"], "VALID")
        self.assertIsInstance(v["key_id"], uuid.UUID)
        self.assertEqual(v["key_id"], key_id)
        self.assertEqual((v["scopes"], v["metadata"]), (["orders:read"], {}))
        for col in ("ratelimit_limit", "ratelimit_remaining", "credits_remaining"):
            self.assertIs(type(v[col]), int, col)
        self.assertIsInstance(v["ratelimit_reset"], datetime.datetime)
        self.assertIsNotNone(v["ratelimit_reset"].tzinfo)

        # An apikeys.apikey value is text in text results, its bytes in binary ones;
        # a token passed as bytes is a bytea, which verify(text) does not take.
        sql = "SELECT %s::apikeys.apikey AS token"
        self.assertEqual(self.app.execute(sql, (t,)).fetchone()[0], t)
        self.assertEqual(self.app.cursor(binary=True).execute(sql, (t,)).fetchone()[0],
                         t.encode())
        with self.assertRaises(psycopg.errors.UndefinedFunction):
            self.app.execute("SELECT code FROM apikeys.verify(%s)", (t.encode(),))


if __name__ == "__main__":
    unittest.main(verbosity=2)
