"""An application-side cache of apikeys.verify() results, kept correct by
LISTEN apikeys_event (psycopg 3).

    from cache import VerifyCache

    cache = VerifyCache("dbname=app user=app_verifier")   # a role granted apikeys_app
    cache.wait_ready()
    r = cache.verify(token, ["orders:read"], client_ip)    # a dict: valid, code, key_id, owner, ...
    if not r["valid"]:
        reject(r["code"])

How it stays correct:

- Only VALID results are cached, under a keyed BLAKE2b hash of the token
  (plus the required scopes and client address), never the token itself.
  An entry lives at most `ttl` seconds and never past the key's expires_at.
- A listener thread holds its own connection with LISTEN apikeys_event.
  Every notification names one key ({"key_id", "owner", "event"}); every
  cached entry of that key is dropped, whatever the event but "created"
  (a new key has nothing cached).  A payload that does not parse drops
  everything.  Notifications only ever remove entries,
  so a forged one (any role may NOTIFY) costs a cache miss, nothing more.
- The cache serves hits only while the listener is connected and listening.
  When its connection is lost, the cache is emptied and bypassed; the
  listener reconnects with backoff, runs LISTEN again and only then empties
  the cache once more and serves from it: notifications sent while it was
  away are lost, so nothing cached before the LISTEN can be trusted.
- A result read from the server is stored only if no notification for its
  key arrived (and no reconnect happened) while the query ran, so a revoke
  that commits during the query cannot leave its stale VALID behind.

Trade-off: a hit does not reach the server, so the usage counters
(requests_today, last_used_at) see only the misses.  Results of keys with
credits or a rate limit (their own or their plan's) are never cached: each
call must spend, or count against the limit, on the server.
"""

import copy
import datetime
import hashlib
import json
import logging
import os
import secrets
import select
import threading
import time
import uuid
from collections import OrderedDict, deque

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

CHANNEL = "apikeys_event"

log = logging.getLogger("apikeys.cache")

_VERIFY = ("SELECT valid, code, key_id, owner, name, scopes, metadata, expires_at, "
           "ratelimit_limit, credits_remaining "
           "FROM apikeys.verify(%s, %s::text[], %s::inet)")


class _Entry:
    __slots__ = ("result", "key_id", "deadline")

    def __init__(self, result, key_id, deadline):
        self.result = result
        self.key_id = key_id
        self.deadline = deadline


class VerifyCache:
    """Caches apikeys.verify() results; evicts on NOTIFY apikeys_event.

    conninfo: libpq connection string of a role granted apikeys_app, used
    for verify().  listen_conninfo: the listener's connection (default: the
    same).  Use keepalives (keepalives_idle, tcp_user_timeout) on TCP so a
    silently dropped connection is noticed.
    on_notify: optional callable(payload: str), called in the listener
    thread after each notification has been applied (metrics, tests).
    prepare=False: the verify connection prepares no statement (psycopg's
    prepare_threshold=None), for conninfo through a transaction pooler such
    as PgBouncer that does not track prepared statements.
    """

    def __init__(self, conninfo, listen_conninfo=None, *, ttl=300.0,
                 max_entries=10000, reconnect_delay=0.5,
                 max_reconnect_delay=30.0, health_interval=30.0,
                 on_notify=None, prepare=True):
        self._conninfo = conninfo
        self._prepare = prepare
        self._listen_conninfo = listen_conninfo or conninfo
        self._ttl = ttl
        self._max_entries = max_entries
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._health_interval = health_interval
        self._on_notify = on_notify

        # Cache keys are keyed hashes: a per-process secret, so a memory
        # dump holds no token and nothing to test guessed tokens against.
        self._hash_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._entries = OrderedDict()   # cache key -> _Entry, LRU order
        self._by_key_id = {}            # key_id -> set of cache keys
        self._generation = 0            # bumped by every invalidation
        self._recent = deque(maxlen=4096)   # (generation, key_id or None = all)
        self._listening = False
        self._listener_pid = None
        self.stats = dict(hits=0, misses=0, evictions=0, clears=0,
                          notifications=0, connects=0)

        self._query_lock = threading.Lock()
        self._conn = None

        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._listen_loop,
                                        name="apikeys-cache-listener",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------
    # Public interface

    def verify(self, token, required_scopes=(), client_ip=None):
        """apikeys.verify(token, required_scopes, client_ip) as a dict,
        from the cache when a VALID result for the same arguments is held."""
        scopes = sorted(set(required_scopes or ()))
        ip = None if client_ip is None else str(client_ip)
        ck = None if token is None else self._cache_key(token, scopes, ip)
        with self._lock:
            gen = self._generation
            if ck is not None and self._listening:
                entry = self._entries.get(ck)
                if entry is not None:
                    if entry.deadline > time.monotonic():
                        self._entries.move_to_end(ck)
                        self.stats["hits"] += 1
                        return copy.deepcopy(entry.result)
                    self._drop(ck)
            self.stats["misses"] += 1

        result = self._query(token, scopes, ip)

        # A key with credits or a rate limit must reach the server every time.
        if ck is not None and result["valid"] and result["credits_remaining"] is None \
                and result["ratelimit_limit"] is None:
            deadline = time.monotonic() + self._ttl
            if result["expires_at"] is not None:
                left = (result["expires_at"]
                        - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
                deadline = min(deadline, time.monotonic() + left)
            with self._lock:
                # Stored only if this key was not invalidated while the query ran.
                if self._listening and self._unchanged_since(gen, result["key_id"]) \
                        and deadline > time.monotonic():
                    self._store(ck, _Entry(copy.deepcopy(result),
                                           result["key_id"], deadline))
        return result

    def is_cached(self, token, required_scopes=(), client_ip=None):
        ip = None if client_ip is None else str(client_ip)
        ck = self._cache_key(token, sorted(set(required_scopes or ())), ip)
        with self._lock:
            return ck in self._entries

    def clear(self):
        with self._lock:
            self._clear_locked()

    def wait_ready(self, timeout=10.0):
        """Waits until the listener is listening; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.listening:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @property
    def listening(self):
        with self._lock:
            return self._listening

    @property
    def listener_pid(self):
        """The backend pid of the listener's connection (None while down)."""
        with self._lock:
            return self._listener_pid

    def __len__(self):
        with self._lock:
            return len(self._entries)

    def close(self):
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with self._query_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------
    # Cache internals (callers hold self._lock)

    def _cache_key(self, token, scopes, ip):
        h = hashlib.blake2b(token.encode("utf-8", "surrogatepass"),
                            digest_size=32, key=self._hash_key).digest()
        return (h, tuple(scopes), ip)

    def _store(self, ck, entry):
        if ck in self._entries:
            self._drop(ck)
        self._entries[ck] = entry
        self._by_key_id.setdefault(entry.key_id, set()).add(ck)
        while len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, ck):
        entry = self._entries.pop(ck)
        cks = self._by_key_id.get(entry.key_id)
        if cks is not None:
            cks.discard(ck)
            if not cks:
                del self._by_key_id[entry.key_id]

    def _unchanged_since(self, gen, key_id):
        """Whether no invalidation of key_id (nor a clear) happened after gen."""
        if self._generation == gen:
            return True
        if not self._recent or self._recent[0][0] > gen + 1:
            return False                # the log no longer reaches back to gen
        for g, k in reversed(self._recent):
            if g <= gen:
                break
            if k is None or k == key_id:
                return False
        return True

    def _evict_key_id(self, key_id):
        self._generation += 1
        self._recent.append((self._generation, key_id))
        for ck in self._by_key_id.pop(key_id, ()):
            del self._entries[ck]
            self.stats["evictions"] += 1

    def _clear_locked(self):
        self._generation += 1
        self._recent.append((self._generation, None))
        self._entries.clear()
        self._by_key_id.clear()
        self.stats["clears"] += 1

    # ------------------------------------------------------------------
    # The verify connection

    def _query(self, token, scopes, ip):
        with self._query_lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                if self._conn is not None:
                    self._conn.close()
                self._conn = psycopg.connect(self._conninfo, autocommit=True,
                                             row_factory=dict_row)
                if not self._prepare:
                    self._conn.prepare_threshold = None
            return self._conn.execute(_VERIFY, (token, scopes, ip)).fetchone()

    # ------------------------------------------------------------------
    # The listener

    def _listen_loop(self):
        delay = self._reconnect_delay
        while not self._stop.is_set():
            conn = None
            try:
                conn = psycopg.connect(self._listen_conninfo, autocommit=True)
                # Notifications that arrive during a query (the health check)
                # reach this handler; the others are read in _poll.
                conn.add_notify_handler(lambda n: self._apply(n.payload))
                conn.execute("LISTEN " + CHANNEL)
                # Listening from here on: anything committed from now is
                # notified.  What was cached before may have missed its
                # notification, so start empty.
                with self._lock:
                    self._clear_locked()
                    self._listening = True
                    self._listener_pid = conn.info.backend_pid
                    self.stats["connects"] += 1
                delay = self._reconnect_delay
                self._poll(conn)
            except Exception as e:  # psycopg.Error, mostly; the thread must live on
                if not self._stop.is_set():
                    log.warning("apikeys cache listener: %s; reconnecting in %.1f s",
                                " ".join(str(e).split()), delay)
            finally:
                with self._lock:
                    if self._listening:
                        self._listening = False
                        self._listener_pid = None
                        self._clear_locked()
                if conn is not None:
                    conn.close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self._max_reconnect_delay)

    def _poll(self, conn):
        """Reads notifications until stopped; raises when the connection is lost."""
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        sock = conn.fileno()
        last_traffic = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, last_traffic + self._health_interval - time.monotonic())
            readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
            if self._stop.is_set():
                return
            if sock in readable:
                pgconn.consume_input()      # raises when the server went away
                if pgconn.status != pq.ConnStatus.OK:
                    raise psycopg.OperationalError("listener connection lost")
                while True:
                    n = pgconn.notifies()
                    if n is None:
                        break
                    self._apply(n.extra.decode(encoding))
                last_traffic = time.monotonic()
            elif not readable:
                # Idle for health_interval: prove the connection still works.
                conn.execute("SELECT 1")
                last_traffic = time.monotonic()

    def _apply(self, payload):
        try:
            d = json.loads(payload)
            key_id = uuid.UUID(d["key_id"])
            event = d.get("event")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("apikeys cache: unexpected %s payload; clearing the cache", CHANNEL)
            key_id = event = None
        with self._lock:
            self.stats["notifications"] += 1
            if key_id is None:
                self._clear_locked()
            elif event != "created":
                # A new key has nothing cached that could be stale; any
                # other event (or an unknown one) drops the key's entries.
                self._evict_key_id(key_id)
        if self._on_notify is not None:
            try:
                self._on_notify(payload)
            except Exception:
                log.exception("apikeys cache: on_notify failed")
