#!/usr/bin/env bash
# The README's first command: install what is missing, build, install, start a
# private PostgreSQL 15 cluster with apikeys preloaded, and run the quickstart.
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

CLUSTER=${APIKEYS_DEMO_DIR:-/tmp/apikeys-demo}
PGPORT=${APIKEYS_DEMO_PORT:-54328}
install_packages
build_and_install
stop_cluster "$CLUSTER"
start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'"
echo "== private cluster: psql -h $CLUSTER -p $PGPORT -U postgres"
echo "== quickstart (test/demo.sql)"
psql -X -v ON_ERROR_STOP=1 -d postgres -f "$REPO/test/demo.sql"
echo "== the demo server keeps running; stop it with:"
echo "   sudo -u postgres $PG_BIN/pg_ctl -D $CLUSTER/data stop"
