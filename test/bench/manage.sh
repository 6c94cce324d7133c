#!/usr/bin/env bash
# Dashboard calls for one owner with many keys: get_key, a page of
# list_keys (first, deep, filtered), usage over 30 days, and the 1.0 call
# that returns every key, each as the average latency of pgbench over
# BENCH_SECONDS, as the app role.  Not part of CI; figures go to the README
# of test/bench.
#
#   bash test/bench/manage.sh            # 10,000 keys, 10 s per call
#   bash test/bench/manage.sh --smoke    # seconds-long run that only proves it works
#
# Knobs: BENCH_OWNER_KEYS (10000), BENCH_SECONDS (10), BENCH_CLIENTS (1),
# APIKEYS_BENCH_PORT (54333), APIKEYS_BENCH_DIR (/tmp/apikeys-bench-manage).
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

if [ "${1:-}" = "--smoke" ]; then
    N=${BENCH_OWNER_KEYS:-300}; SECONDS_EACH=${BENCH_SECONDS:-1}
else
    N=${BENCH_OWNER_KEYS:-10000}; SECONDS_EACH=${BENCH_SECONDS:-10}
fi
CLIENTS=${BENCH_CLIENTS:-1}
PGPORT=${APIKEYS_BENCH_PORT:-54333}
CLUSTER=${APIKEYS_BENCH_DIR:-/tmp/apikeys-bench-manage}
SCRIPTS=$CLUSTER/scripts

trap 'stop_cluster "$CLUSTER"' EXIT
install_packages
build_and_install
start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'"
mkdir -p "$SCRIPTS"

echo "== one owner with $N keys (a tenth revoked, a tenth disabled), 30 days of usage"
createdb bench
psql -X -q -v ON_ERROR_STOP=1 -d bench <<SQL
CREATE EXTENSION apikeys;
CREATE ROLE bench_app LOGIN IN ROLE apikeys_app;
SELECT apikeys.set_plan('tenant', 'enterprise');
-- One statement per key would take minutes; the rows are what create_key writes.
SET session_replication_role = replica;
INSERT INTO apikeys.keys (owner, name, prefix, start, digest, scopes, metadata, created_at,
                          revoked_at, disabled_at)
SELECT 'tenant', 'key-' || i, 'ak_live', 'ak_live_' || lpad(i::text, 4, '0'),
       apikeys.digest(apikeys._new_token('ak_live')), '{orders:read}', '{"env": "prod"}',
       now() - (i || ' seconds')::interval,
       CASE WHEN i % 10 = 0 THEN now() END, CASE WHEN i % 10 = 5 THEN now() END
  FROM generate_series(1, $N) i;
INSERT INTO apikeys.key_usage (key_id, day, requests, failures, last_used_at)
SELECT k.id, (now() AT TIME ZONE 'UTC')::date - d, 100, 3, now() - (d || ' days')::interval
  FROM apikeys.keys k, generate_series(0, 29) d;
RESET session_replication_role;
ANALYZE;
CREATE TABLE public.ids AS SELECT row_number() OVER () AS n, id FROM apikeys.keys WHERE owner = 'tenant';
ALTER TABLE public.ids ADD PRIMARY KEY (n);
GRANT SELECT ON public.ids TO bench_app;
SQL

# Each call picks a random key of the owner where it needs one.
cat >"$SCRIPTS/get_key.sql" <<'SQL'
\set n random(1, :count)
SELECT * FROM apikeys.get_key((SELECT id FROM public.ids WHERE n = :n), 'tenant');
SQL
cat >"$SCRIPTS/first_page.sql" <<'SQL'
SELECT * FROM apikeys.list_keys('tenant', NULL, 50);
SQL
cat >"$SCRIPTS/deep_page.sql" <<'SQL'
\set n random(1, :count)
SELECT * FROM apikeys.list_keys('tenant', NULL, 50, (SELECT id FROM public.ids WHERE n = :n));
SQL
cat >"$SCRIPTS/filtered_page.sql" <<'SQL'
SELECT * FROM apikeys.list_keys('tenant', 'disabled', 50);
SQL
cat >"$SCRIPTS/usage_30_days.sql" <<'SQL'
\set n random(1, :count)
SELECT * FROM apikeys.usage('tenant', (now() AT TIME ZONE 'UTC')::date - 29, (now() AT TIME ZONE 'UTC')::date,
                            (SELECT id FROM public.ids WHERE n = :n));
SQL
cat >"$SCRIPTS/all_keys.sql" <<'SQL'
SELECT * FROM apikeys.list_keys('tenant');
SQL

echo "== average latency as bench_app, $CLIENTS client(s), ${SECONDS_EACH} s each"
printf '%-28s %12s\n' call "latency ms"
for call in get_key first_page deep_page filtered_page usage_30_days all_keys; do
    out=$(pgbench -n -M prepared -U bench_app -c "$CLIENTS" -T "$SECONDS_EACH" -D count="$N" \
          -f "$SCRIPTS/$call.sql" bench 2>&1) || { echo "$out" >&2; exit 1; }
    printf '%-28s %12s\n' "$call" "$(echo "$out" | awk '/^latency average = / { print $4; exit }')"
done
