#!/usr/bin/env bash
# The README's second command: install what is missing, build, install, and
# run every test: codec unit tests, pg_regress (with and without the
# preload), isolation specs, TAP tests and a benchmark smoke run.
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

PGXS_DIR=$("$PG_BIN/pg_config" --pkglibdir)/pgxs
CLUSTER=${APIKEYS_TEST_DIR:-/tmp/apikeys-test}
WORK=$(mktemp -d /tmp/apikeys-work.XXXXXX)
chmod 755 "$WORK"
failures=()
trap 'stop_cluster "$CLUSTER"' EXIT

install_packages
build_and_install

echo "== codec unit tests"
cc -O2 -Wall -Wextra -Werror -I"$REPO/src" -o "$WORK/token_test" \
    "$REPO/test/unit/token_test.c" "$REPO/src/token.c" -lsodium
"$WORK/token_test" || failures+=("unit")

stop_cluster "$CLUSTER"
start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'" "max_connections = 50" \
    "apikeys.flush_interval = 1" "apikeys.usage_flush_interval = 1"

echo "== pg_regress"
make -C "$REPO" -s installcheck PG_CONFIG="$PG_BIN/pg_config" || failures+=("regress")

echo "== isolation"
"$PGXS_DIR/src/test/isolation/pg_isolation_regress" \
    --bindir="$PG_BIN" --inputdir="$REPO/test/isolation" --outputdir="$WORK/isolation" \
    --load-extension=apikeys \
    $(cd "$REPO/test/isolation/specs" && ls *.spec | sed 's/\.spec$//') \
    || { failures+=("isolation"); cat "$WORK/isolation/regression.diffs" 2>/dev/null || true; }

stop_cluster "$CLUSTER"

echo "== pg_regress without the preload"
start_cluster "$CLUSTER"
"$PGXS_DIR/src/test/regress/pg_regress" --bindir="$PG_BIN" --inputdir="$REPO/test/nopreload" \
    --outputdir="$WORK/nopreload" --load-extension=apikeys --dbname=apikeys_nopreload nopreload \
    || { failures+=("nopreload"); cat "$WORK/nopreload/regression.diffs" 2>/dev/null || true; }
stop_cluster "$CLUSTER"

echo "== TAP"
# initdb refuses root, and the clone may sit where postgres cannot read:
# the TAP tests run as postgres from a copy in a directory it owns.
mkdir -p "$WORK/tap"
cp "$REPO"/test/tap/*.pl "$WORK/tap/"
chown -R postgres:postgres "$WORK/tap" 2>/dev/null || $SUDO chown -R postgres:postgres "$WORK/tap"
(cd "$WORK/tap" && as_postgres env PATH="$PATH" \
    PERL5LIB="$PGXS_DIR/src/test/perl" PG_REGRESS="$PGXS_DIR/src/test/regress/pg_regress" \
    PG_CONFIG="$PG_BIN/pg_config" \
    prove -v -I "$PGXS_DIR/src/test/perl" ./*.pl) || failures+=("tap")

echo "== benchmark smoke run (proves test/bench/run.sh works; figures are not judged)"
APIKEYS_SKIP_BUILD=1 bash "$REPO/test/bench/run.sh" --smoke || failures+=("bench-smoke")

suites=6
echo "suites: $((suites - ${#failures[@]})) passed, ${#failures[@]} failed"
if [ ${#failures[@]} -gt 0 ]; then
    echo "FAILED: ${failures[*]}"
    exit 1
fi
