#!/usr/bin/env bash
# apikeys behind PgBouncer in transaction-pooling mode: test/clients/test_pgbouncer.py
# (psycopg 3) against a private cluster with the preload, on port
# $APIKEYS_PGBOUNCER_PGPORT (default 54346), and a private pgbouncer in front of it
# on port $APIKEYS_PGBOUNCER_PORT (default 54347).  Both listen on Unix sockets
# only, in a fresh directory under /tmp that is removed on exit; both run as the
# postgres OS user and are stopped on exit.  Needs the installed extension,
# Debian's pgbouncer and python3-psycopg (install_packages in test/scripts/lib.sh).
#
#   bash test/clients/pgbouncer.sh  # as root, or as the postgres OS user
#                                   # (run-tests.sh runs it with the clients suite)
#
# The pgbouncer databases (all of them the same PostgreSQL database; PgBouncer
# keeps one pool per database and user, so each test that leaves state on a
# server connection has pools of its own):
#   apikeys_pool    pool_size 3: verification, revocation, actor, rate limits
#   apikeys_leak    pool_size 3: what session-level settings do across clients
#   apikeys_prep    pool_size 2: protocol-level prepared statements
#   apikeys_listen  pool_size 1: LISTEN through the pooler
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
PGPORT=${APIKEYS_PGBOUNCER_PGPORT:-54346}
BOUNCER_PORT=${APIKEYS_PGBOUNCER_PORT:-54347}
PGBOUNCER=/usr/sbin/pgbouncer   # Debian's package; not on an unprivileged user's PATH
PYTHON=/usr/bin/python3          # Debian's, which has python3-psycopg

# Run as postgres (no sudo needed): lib.sh's helpers run their commands directly.
if [ "$(id -un)" = postgres ]; then as_postgres() { "$@"; }; fi

if [ ! -x "$PGBOUNCER" ]; then
    echo "test/clients/pgbouncer.sh: $PGBOUNCER not found; install pgbouncer" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import psycopg' 2>/dev/null; then
    echo "test/clients/pgbouncer.sh: $PYTHON cannot import psycopg; install python3-psycopg" >&2
    exit 1
fi

CLUSTER=$(mktemp -d /tmp/apikeys-pgbouncer.XXXXXX)
BOUNCER=$CLUSTER/bouncer
BOUNCER_PID=

stop_bouncer() {
    [ -n "$BOUNCER_PID" ] || return 0
    # SIGTERM: immediate shutdown.  The pid is the one pgbouncer wrote at start.
    kill -TERM "$BOUNCER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$BOUNCER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$BOUNCER_PID" 2>/dev/null; then
        echo "test/clients/pgbouncer.sh: pgbouncer $BOUNCER_PID did not stop; killing it" >&2
        kill -KILL "$BOUNCER_PID" 2>/dev/null || true
    fi
    BOUNCER_PID=
}

cleanup() {
    local rc=$?
    stop_bouncer
    stop_cluster "$CLUSTER"
    if [ $rc -ne 0 ]; then
        for log in "$BOUNCER/pgbouncer.log" "$CLUSTER/server.log"; do
            [ -f "$log" ] || continue
            echo "-- $log (last lines)"
            tail -n 30 "$log"
        done
    fi
    rm -rf "$CLUSTER"
    exit $rc
}
trap cleanup EXIT

start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'"

DB=apikeys_bouncer
as_postgres "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres \
    -d postgres -c "CREATE DATABASE $DB"
as_postgres "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres \
    -d "$DB" <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION apikeys;
CREATE ROLE bouncer_app LOGIN IN ROLE apikeys_app;
CREATE ROLE bouncer_admin LOGIN IN ROLE apikeys_admin;
SQL

# pgbouncer: Unix socket only (no listen_addr), trust for the users of the
# auth_file, server connections over the cluster's socket (trust there too).
# No server_reset_query runs in transaction mode: what a transaction leaves in
# its session stays on the server connection for the next client.
mkdir -p "$BOUNCER"
server="host=$CLUSTER port=$PGPORT dbname=$DB"
extra=
# From 1.21 PgBouncer can track protocol-level prepared statements
# (max_prepared_statements; on by default from 1.24).  The tests show what
# happens without it, which is what Debian 12's 1.18 does.
version=$("$PGBOUNCER" --version | sed -n 's/^[Pp]g[Bb]ouncer \([0-9][0-9.]*\).*/\1/p' | head -n 1)
if [ -n "$version" ] && printf '1.21\n%s\n' "$version" | sort -V -C; then
    extra="max_prepared_statements = 0"
fi
cat >"$BOUNCER/pgbouncer.ini" <<INI
[databases]
apikeys_pool = $server pool_size=3
apikeys_leak = $server pool_size=3
apikeys_prep = $server pool_size=2
apikeys_listen = $server pool_size=1

[pgbouncer]
pool_mode = transaction
listen_port = $BOUNCER_PORT
unix_socket_dir = $BOUNCER
auth_type = trust
auth_file = $BOUNCER/userlist.txt
admin_users = postgres
default_pool_size = 3
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 100
server_idle_timeout = 3600
server_lifetime = 3600
# A client that waits this long for a server connection fails (a test that
# waits on a full pool fails fast rather than after the default 120 s).
query_wait_timeout = 15
logfile = $BOUNCER/pgbouncer.log
pidfile = $BOUNCER/pgbouncer.pid
$extra
INI
cat >"$BOUNCER/userlist.txt" <<'USERS'
"bouncer_app" ""
"bouncer_admin" ""
"postgres" ""
USERS
chown -R postgres:postgres "$BOUNCER" 2>/dev/null || true

as_postgres "$PGBOUNCER" -d "$BOUNCER/pgbouncer.ini"
for _ in $(seq 1 100); do
    [ -S "$BOUNCER/.s.PGSQL.$BOUNCER_PORT" ] && [ -s "$BOUNCER/pgbouncer.pid" ] && break
    sleep 0.1
done
if [ ! -S "$BOUNCER/.s.PGSQL.$BOUNCER_PORT" ] || [ ! -s "$BOUNCER/pgbouncer.pid" ]; then
    echo "test/clients/pgbouncer.sh: pgbouncer did not start" >&2
    exit 1
fi
BOUNCER_PID=$(cat "$BOUNCER/pgbouncer.pid")

# The test runs from the cluster's directory, which postgres owns, wherever the
# tree is.
mkdir -p "$CLUSTER/py"
cp "$REPO/test/clients/test_pgbouncer.py" "$CLUSTER/py/"
chown -R postgres:postgres "$CLUSTER/py" 2>/dev/null || true

echo "== clients: test_pgbouncer.py (PgBouncer ${version:-?}, transaction pooling;" \
     "python3-psycopg $("$PYTHON" -c 'import psycopg; print(psycopg.__version__)'))"
as_postgres env PGHOST="$PGHOST" PGPORT="$PGPORT" PYTHONDONTWRITEBYTECODE=1 \
    APIKEYS_BOUNCER_HOST="$BOUNCER" APIKEYS_BOUNCER_PORT="$BOUNCER_PORT" \
    APIKEYS_BOUNCER_DB="$DB" APIKEYS_BOUNCER_APP=bouncer_app \
    APIKEYS_BOUNCER_ADMIN=bouncer_admin APIKEYS_BOUNCER_SU=postgres \
    "$PYTHON" "$CLUSTER/py/test_pgbouncer.py" -v
