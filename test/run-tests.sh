#!/usr/bin/env bash
# The README's second command: install what is missing, build, install, then
# run every suite through the PGXS targets (see the Makefile) as the
# unprivileged postgres user, and a benchmark smoke run.
#
#   unitcheck                      token codec unit tests (pure C)
#   installcheck (regress)         pg_regress on a temporary server with test/apikeys.conf
#   installcheck (isolation)       isolation specs, likewise
#   installcheck-nopreload         pg_regress on a temporary server without the preload
#   prove_installcheck             TAP tests (each starts its own servers)
#   clientcheck                    client examples (test/clients) on their own server,
#                                  then test/clients/pgbouncer.sh (apikeys behind PgBouncer)
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

WORK=$(mktemp -d /tmp/apikeys-work.XXXXXX)
chmod 755 "$WORK"
failures=()

install_packages
build_and_install

# initdb refuses root, and the clone may sit where postgres cannot write:
# the suites run as postgres in a copy of the tree that it owns.
cp -a "$REPO/." "$WORK/tree"
chown -R postgres:postgres "$WORK/tree" 2>/dev/null || $SUDO chown -R postgres:postgres "$WORK/tree"

# suite NAME MAKE-ARGUMENTS...: runs one PGXS target; on failure shows why.
suite() {
    local name=$1; shift
    echo "== $name"
    if ! as_postgres env PATH="$PATH" make -C "$WORK/tree" -s PG_CONFIG="$PG_BIN/pg_config" "$@"; then
        failures+=("$name")
        find "$WORK/tree" -name regression.diffs -newer "$WORK/tree/Makefile" \
            -exec echo "-- {}" \; -exec cat {} \; 2>/dev/null || true
        find "$WORK/tree/tmp_check/log" -name 'regress_log_*' -newer "$WORK/tree/Makefile" \
            -exec echo "-- {} (last lines)" \; -exec tail -n 30 {} \; 2>/dev/null || true
    fi
}

suite unit unitcheck
suite regress installcheck TEMP_INSTANCE=1 ISOLATION= TAP_TESTS=
suite isolation installcheck TEMP_INSTANCE=1 REGRESS= TAP_TESTS=
suite nopreload installcheck-nopreload TEMP_INSTANCE=1
suite tap prove_installcheck
suite clients clientcheck
# The clients suite goes on behind PgBouncer in transaction-pooling mode
# (test/clients/pgbouncer.sh: its own cluster and pgbouncer); a failure there
# fails the clients suite.
echo "== clients (pgbouncer)"
if ! as_postgres env PATH="$PATH" bash "$WORK/tree/test/clients/pgbouncer.sh"; then
    [[ " ${failures[*]} " == *" clients "* ]] || failures+=("clients")
fi

echo "== benchmark smoke runs (prove test/bench/run.sh and manage.sh work; figures are not judged)"
{ APIKEYS_SKIP_BUILD=1 bash "$REPO/test/bench/run.sh" --smoke &&
  APIKEYS_SKIP_BUILD=1 bash "$REPO/test/bench/manage.sh" --smoke; } || failures+=("bench-smoke")

suites=7
echo "suites: $((suites - ${#failures[@]})) passed, ${#failures[@]} failed"
if [ ${#failures[@]} -gt 0 ]; then
    echo "FAILED: ${failures[*]}"
    exit 1
fi
rm -rf "$WORK"
