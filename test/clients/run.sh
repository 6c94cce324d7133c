#!/usr/bin/env bash
# The client examples' tests: test/clients/test_cache.py (the LISTEN-based
# verify cache of cache.py), test/clients/test_app.py (the Python HTTP service
# of app.py), then test/clients/node/test.js (the Node.js HTTP service of
# service.js), against a private cluster with the preload, on port
# $APIKEYS_CLIENTS_PORT (default 54341), in a fresh directory under /tmp that
# is removed on exit.  Needs the installed extension, python3-psycopg,
# python3-psycopg-pool, and node (18 or later) with npm; npm ci installs the
# Node example's one dependency, pg, from its committed package-lock.json into
# test/clients/node/node_modules (registry access needed), as the user running
# this script.
#
#   bash test/clients/run.sh        # as root, or as the postgres OS user
#                                   # (make clientcheck, from run-tests.sh)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
PGPORT=${APIKEYS_CLIENTS_PORT:-54341}
PYTHON=/usr/bin/python3          # Debian's, which has python3-psycopg(-pool)

# Run as postgres (no sudo needed): lib.sh's helpers run their commands directly.
if [ "$(id -un)" = postgres ]; then as_postgres() { "$@"; }; fi

if ! "$PYTHON" -c 'import psycopg' 2>/dev/null; then
    echo "test/clients/run.sh: $PYTHON cannot import psycopg; install python3-psycopg" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import psycopg_pool' 2>/dev/null; then
    echo "test/clients/run.sh: $PYTHON cannot import psycopg_pool; install python3-psycopg-pool" >&2
    exit 1
fi
for tool in node npm; do
    if ! command -v "$tool" >/dev/null; then
        echo "test/clients/run.sh: $tool not found; install nodejs and npm" >&2
        exit 1
    fi
done
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; then
    echo "test/clients/run.sh: node $(node --version) is too old; the tests need node:test (18 or later)" >&2
    exit 1
fi

CLUSTER=$(mktemp -d /tmp/apikeys-clients.XXXXXX)
cleanup() {
    local rc=$?
    stop_cluster "$CLUSTER"
    if [ $rc -ne 0 ] && [ -f "$CLUSTER/server.log" ]; then
        echo "-- $CLUSTER/server.log (last lines)"
        tail -n 30 "$CLUSTER/server.log"
    fi
    rm -rf "$CLUSTER"
    exit $rc
}
trap cleanup EXIT

start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'"

DB=apikeys_clients
as_postgres "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres \
    -d postgres -c "CREATE DATABASE $DB"
as_postgres "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres \
    -d "$DB" <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION apikeys;
CREATE ROLE cache_app LOGIN IN ROLE apikeys_app;
CREATE ROLE cache_admin LOGIN IN ROLE apikeys_admin;
-- The Python service's roles (test_app.py).
CREATE ROLE py_app LOGIN IN ROLE apikeys_app;
CREATE ROLE py_admin LOGIN IN ROLE apikeys_admin;
-- The Node example's roles, granted as the README's "Granting roles" says.
CREATE ROLE node_app LOGIN;
GRANT apikeys_app TO node_app;
CREATE ROLE node_admin LOGIN;
GRANT apikeys_admin TO node_admin;
SQL

# The scripts run from the cluster's directory, which postgres owns, wherever
# the tree is.
mkdir -p "$CLUSTER/py"
cp "$REPO/test/clients/cache.py" "$REPO/test/clients/test_cache.py" \
   "$REPO/test/clients/app.py" "$REPO/test/clients/test_app.py" "$CLUSTER/py/"
chown -R postgres:postgres "$CLUSTER/py" 2>/dev/null || true

echo "== clients: test_cache.py (python3-psycopg $("$PYTHON" -c 'import psycopg; print(psycopg.__version__)'))"
as_postgres env PGHOST="$PGHOST" PGPORT="$PGPORT" PYTHONDONTWRITEBYTECODE=1 \
    APIKEYS_CLIENTS_DB="$DB" APIKEYS_CLIENTS_APP=cache_app \
    APIKEYS_CLIENTS_ADMIN=cache_admin APIKEYS_CLIENTS_SU=postgres \
    "$PYTHON" "$CLUSTER/py/test_cache.py"

# test_app.py also reads README.md, doc/keys.md and cache.py from the tree
# (postgres must be able to read it).
echo "== clients: test_app.py (psycopg_pool $("$PYTHON" -c 'import psycopg_pool; print(psycopg_pool.__version__)'))"
as_postgres env PGHOST="$PGHOST" PGPORT="$PGPORT" PYTHONDONTWRITEBYTECODE=1 \
    APIKEYS_CLIENTS_DB="$DB" APIKEYS_CLIENTS_PY_APP=py_app \
    APIKEYS_CLIENTS_PY_ADMIN=py_admin APIKEYS_CLIENTS_SU=postgres \
    APIKEYS_CLIENTS_REPO="$REPO" \
    "$PYTHON" "$CLUSTER/py/test_app.py"

# The Node.js example runs in place, as the user running this script: it
# connects over the cluster's socket directory, which any user may use (trust).
NODE_DIR="$REPO/test/clients/node"
echo "== clients: node/test.js (node $(node --version), npm $(npm --version))"
(cd "$NODE_DIR" && npm ci --ignore-scripts --no-audit --no-fund --no-update-notifier --loglevel=error)
echo "   pg $(cd "$NODE_DIR" && node -p 'require("./node_modules/pg/package.json").version') from package-lock.json"
(cd "$NODE_DIR" && env PGHOST="$PGHOST" PGPORT="$PGPORT" APIKEYS_CLIENTS_DB="$DB" \
    APIKEYS_CLIENTS_NODE_APP=node_app APIKEYS_CLIENTS_NODE_ADMIN=node_admin \
    node --test test.js)
