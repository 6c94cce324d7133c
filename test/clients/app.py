"""A minimal HTTP service (the standard library's http.server, psycopg 3 and
psycopg_pool) that authenticates every request with apikeys.verify() and
answers each refusal with its HTTP status and the rate-limit headers of
verify's result.  test_app.py drives it over loopback; node/service.js is the
same service in Node.js.

    GET    /orders     scope orders:read
    POST   /reports    scope reports:write, costs 10 credits
    DELETE /keys/<id>  scope keys:write: revokes one of the caller's owner's
                       keys, recording X-Actor (or the calling key) as the actor

Run it by hand: PGHOST=... PGDATABASE=... PGUSER=<a role granted apikeys_app>
/usr/bin/python3 app.py  (listens on 127.0.0.1, port $PORT or 8080).
Debian 12: python3-psycopg and python3-psycopg-pool.

The lines between BEGIN README and END README are the README's example
(section "From Python"); test_app.py checks that README.md holds them byte for
byte.
"""

import json
import logging
import math
import os
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

log = logging.getLogger("apikeys.app")

# BEGIN README: Python
# The status for each refusal of apikeys.verify(); every other code
# (API_KEY_INVALID, API_KEY_REVOKED, API_KEY_EXPIRED, API_KEY_DISABLED) is 401.
DENY = {"INSUFFICIENT_SCOPE": 403, "IP_NOT_ALLOWED": 403, "USAGE_EXCEEDED": 402,
        "RATE_LIMITED": 429}

# retry_after: seconds until ratelimit_reset, by the clock of the server that set it.
# psycopg decodes the row's plain types: key_id as uuid.UUID, scopes as a list,
# metadata as a dict, integer and bigint as int, timestamptz as an aware datetime.
VERIFY = """
  SELECT v.*,
         greatest(0, ceil(extract(epoch FROM v.ratelimit_reset - clock_timestamp())))::integer
           AS retry_after
    FROM apikeys.verify(%s, %s::text[], %s::inet, %s::integer) v"""

# A token is printable ASCII; anything else in the header verifies as ''.
BEARER = re.compile(r"Bearer +([!-~]+)", re.IGNORECASE)


def send_json(request, status, body):
    """Answers an http.server request with JSON and the headers in request.reply_headers."""
    data = json.dumps(body).encode()
    request.send_response(status)
    for name, value in request.reply_headers.items():
        request.send_header(name, value)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def api_key(pool, request, scopes=(), cost=1):
    """Verifies the request's bearer token.  Returns verify()'s row (a dict) when the
    request may go on; otherwise answers it (401, 402, 403 or 429) and returns None.
    pool: a psycopg_pool.ConnectionPool of a role granted apikeys_app, with dict rows.
    request: the http.server handler.  cost: credits the call spends."""
    bearer = BEARER.fullmatch(request.headers.get("Authorization", ""))
    # The peer's address; behind a proxy, take it from the proxy's header instead.
    ip = request.client_address[0]
    with pool.connection() as conn:          # the token is a bind parameter, never SQL text
        v = conn.execute(VERIFY, (bearer[1] if bearer else "", list(scopes), ip, cost)).fetchone()
    if v["credits_remaining"] is not None:
        request.reply_headers["X-Credits-Remaining"] = str(v["credits_remaining"])
    if v["ratelimit_limit"] is not None:
        request.reply_headers["X-RateLimit-Limit"] = str(v["ratelimit_limit"])
        request.reply_headers["X-RateLimit-Remaining"] = str(v["ratelimit_remaining"])
        request.reply_headers["X-RateLimit-Reset"] = str(               # epoch seconds
            math.ceil(v["ratelimit_reset"].timestamp()))
    if v["valid"]:
        return v
    status = DENY.get(v["code"], 401)
    if status == 401:
        request.reply_headers["WWW-Authenticate"] = "Bearer"
    if v["code"] == "RATE_LIMITED":
        request.reply_headers["Retry-After"] = str(v["retry_after"])
    send_json(request, status, {"error": v["code"]})
    return None
# In a request handler (request.reply_headers = {} first):
#   key = api_key(pool, request, ["reports:write"], cost=10)    # costs 10 credits
#   if key is None: return                                       # refused, and answered
#   ... key["owner"], key["key_id"], key["scopes"], key["metadata"] ...
# END README: Python

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def revoke_as(pool, actor, key_id, owner):
    """Revokes owner's key key_id in one transaction that records `actor` as apikeys.actor.

    set_config(..., true) lasts until the transaction ends, so the pooled
    connection goes back clean, and the actor travels as a bind parameter:
    `SET LOCAL apikeys.actor = %s` is a syntax error (SET takes no parameters),
    and pasting the value into the SQL text would let a caller inject SQL."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT set_config('apikeys.actor', %s, true)", (actor,))
        return conn.execute("SELECT apikeys.revoke(%s, %s, %s) AS at",
                            (key_id, owner, "revoked through the API")).fetchone()["at"]


def route(pool, request):
    """Answers one request: the three routes above, 404 for anything else."""
    path = urlsplit(request.path).path
    method = request.command
    m = re.fullmatch(r"/keys/([^/]+)", path)
    if method == "GET" and path == "/orders":
        key = api_key(pool, request, ["orders:read"])
        if key is not None:
            send_json(request, 200, {"owner": key["owner"], "key_id": str(key["key_id"]),
                                     "orders": []})
    elif method == "POST" and path == "/reports":
        key = api_key(pool, request, ["reports:write"], cost=10)
        if key is not None:
            send_json(request, 200, {"owner": key["owner"], "key_id": str(key["key_id"]),
                                     "report": "queued"})
    elif method == "DELETE" and m:
        key = api_key(pool, request, ["keys:write"])
        if key is None:
            return
        if not UUID.fullmatch(m[1]):
            send_json(request, 404, {"error": "KEY_NOT_FOUND"})
            return
        # Who acts: the end user the client names (a label, as apikeys.actor is;
        # a real service would name the user its own login established), else the key.
        actor = request.headers.get("X-Actor") or f"apikey:{key['key_id']}"
        try:
            revoked_at = revoke_as(pool, actor, m[1], key["owner"])
        except psycopg.errors.NoDataFound:       # P0002: another owner's key, or none
            send_json(request, 404, {"error": "KEY_NOT_FOUND"})
            return
        send_json(request, 200, {"key_id": m[1], "revoked_at": revoked_at.isoformat()})
    else:
        send_json(request, 404, {"error": "NOT_FOUND"})


class Handler(BaseHTTPRequestHandler):
    """One HTTP request.  When the database cannot answer, the request gets 503:
    no request is let through unverified."""

    def handle_request(self):
        """Routes the request; answers 503 when the database (or the pool) fails."""
        self.reply_headers = {}
        try:
            route(self.server.pool, self)
        except psycopg.Error as e:       # psycopg_pool.PoolTimeout included
            log.warning("%s %s: %s", self.command, self.path, " ".join(str(e).split()))
            self.reply_headers = {}
            send_json(self, 503, {"error": "SERVICE_UNAVAILABLE"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_request

    def log_message(self, format, *args):
        """The access log, at debug level of the apikeys.app logger rather than on stderr."""
        log.debug("%s " + format, self.address_string(), *args)


class Service(ThreadingHTTPServer):
    """The HTTP server: a thread per request, all sharing one connection pool."""

    def __init__(self, address, pool):
        super().__init__(address, Handler)
        self.pool = pool


def make_pool(conninfo="", size=10, **kwargs):
    """A pool of `size` connections (autocommit, dict rows) for the service.
    conninfo: libpq connection string of a role granted apikeys_app (or the PG*
    environment).  kwargs go to ConnectionPool (timeout, name, ...)."""
    return ConnectionPool(conninfo, min_size=size, max_size=size,
                          kwargs={"autocommit": True, "row_factory": dict_row}, **kwargs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with make_pool() as pool:
        server = Service(("127.0.0.1", int(os.environ.get("PORT", "8080"))), pool)
        log.info("listening on http://127.0.0.1:%d", server.server_address[1])
        server.serve_forever()
