#!/usr/bin/env bash
# End-to-end benchmark (not part of CI): the Node.js service of
# test/clients/node/service.js, which checks every request with
# apikeys.verify, against the same service checking keys by hand (SHA-256 with
# pgcrypto in a unique index, variant (b) of run.sh: test/bench/http/
# handwritten.js), both driven over loopback by test/bench/http/loadgen.js.
# Reports req/s, p50 and p99 latency, and the CPU per request of PostgreSQL
# (every process of the cluster) and of the service: what apikeys costs where
# an application pays for it.
#
#   bash test/bench/http.sh                  # 50,000 keys, 3 rounds of 30 s each way
#   bash test/bench/http.sh --smoke          # 1,000 keys, 1 round of 3 s: proves it works
#   bash test/bench/http.sh --keys 200000 --rounds 5 --seconds 60 --warmup 5 --concurrency 20
#
# Runs as root or a user with sudo, on Debian 12: installs what is missing,
# builds and installs the extension (APIKEYS_SKIP_BUILD=1 skips that), and
# runs npm ci in test/clients/node when its node_modules lacks pg (registry
# access needed).  Its cluster: APIKEYS_HTTP_BENCH_DIR (/tmp/apikeys-bench-http),
# port APIKEYS_HTTP_BENCH_PORT (54361); removed on exit, with the tokens file.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"     # bench_median, bench_ratio

KEYS=50000; ROUNDS=3; SECONDS_EACH=30; WARMUP=5; CONCURRENCY=20
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) KEYS=1000; ROUNDS=1; SECONDS_EACH=3; WARMUP=1 ;;
        --keys) KEYS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --seconds) SECONDS_EACH=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --concurrency) CONCURRENCY=$2; shift ;;
        *) echo "usage: $0 [--smoke] [--keys N] [--rounds R] [--seconds D] [--warmup W] [--concurrency C]" >&2
           exit 2 ;;
    esac
    shift
done

PGPORT=${APIKEYS_HTTP_BENCH_PORT:-54361}
CLUSTER=${APIKEYS_HTTP_BENCH_DIR:-/tmp/apikeys-bench-http}
HERE=$REPO/test/bench/http
NODE_DIR=$REPO/test/clients/node
DB=bench_http
APP=bench_app                   # the services' login role
CLK_TCK=$(getconf CLK_TCK)
# Private to the user running this script (mktemp -d makes it 0700): the
# tokens file and the services' output.
WORK=$(mktemp -d /tmp/apikeys-bench-http-work.XXXXXX)
TOKENS=$WORK/tokens
SERVICE_PID=

# On any exit: the service, the cluster, the tokens; the server log's tail on failure.
cleanup() {
    local rc=$?
    set +e                      # clean up all of it, whatever fails
    if [ -n "$SERVICE_PID" ]; then kill "$SERVICE_PID" 2>/dev/null; wait "$SERVICE_PID" 2>/dev/null; fi
    stop_cluster "$CLUSTER"
    if [ $rc -ne 0 ]; then
        for f in "$CLUSTER/server.log" "$WORK/service.err"; do
            [ -s "$f" ] && { echo "-- $f (last lines)"; tail -n 20 "$f"; }
        done
    fi
    rm -rf "$WORK" "$CLUSTER"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

install_packages
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; then
    echo "test/bench/http.sh: node $(node --version) is too old (18 or later)" >&2
    exit 1
fi
build_and_install
# service.js's one dependency, pg, from its committed lockfile, as test/clients/run.sh installs it.
if [ ! -f "$NODE_DIR/node_modules/pg/package.json" ]; then
    (cd "$NODE_DIR" && npm ci --ignore-scripts --no-audit --no-fund --no-update-notifier --loglevel=error)
fi
PG_NODE=$(cd "$NODE_DIR" && node -p 'require("./node_modules/pg/package.json").version')

# fsync on, as in production: the worker's writes of the counts pay for their
# commits.  Every key fits in the usage table (run.sh's sizing).
stop_cluster "$CLUSTER"
start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'" "fsync = on" \
    "shared_buffers = 256MB" "apikeys.max_tracked_keys = $((KEYS + KEYS / 4 + 1000))"
POSTMASTER=$(head -1 "$CLUSTER/data/postmaster.pid")

echo "== creating $KEYS keys with apikeys.create_key, and the same tokens in bench.plain_keys"
(umask 077 && : > "$TOKENS")    # \copy keeps the mode of a file that exists
createdb "$DB"
psql -X -q -v ON_ERROR_STOP=1 -d "$DB" <<SQL
SET client_min_messages = warning;
CREATE EXTENSION apikeys;
CREATE EXTENSION pgcrypto;
CREATE SCHEMA bench;
-- 1,000 owners on the unlimited plan, so that no owner's key cap refuses a key.
SELECT apikeys.set_plan('owner-' || i, 'enterprise') FROM generate_series(0, 999) i \\g /dev/null
-- The real path, in bulk: create_key many times a statement, one commit per
-- statement (variant (gb) of run.sh).  Every key may read orders.
CREATE TABLE bench.tokens (id integer PRIMARY KEY, key_id uuid, token text);
DO \$\$
BEGIN
    FOR lo IN 1..$KEYS BY 5000 LOOP
        INSERT INTO bench.tokens
            SELECT i, c.key_id, c.token
              FROM generate_series(lo, least(lo + 4999, $KEYS)) i,
                   apikeys.create_key('owner-' || (i % 1000), 'http-bench ' || i, ARRAY['orders:read']) c;
        COMMIT;
    END LOOP;
END
\$\$;
-- The hand-written table of run.sh's variant (b): SHA-256 of the token
-- (pgcrypto) under a unique index, owner, name, scopes, revoked and expiry.
-- Its id is the key's key_id, so both services answer the same bytes.
CREATE TABLE bench.plain_keys (
    id uuid PRIMARY KEY, owner text, name text, digest bytea UNIQUE, scopes text[],
    revoked_at timestamptz, expires_at timestamptz);
INSERT INTO bench.plain_keys
    SELECT k.id, k.owner, k.name, digest(t.token, 'sha256'), k.scopes, k.revoked_at, k.expires_at
      FROM bench.tokens t JOIN apikeys.keys k ON k.id = t.key_id;
\\copy (SELECT token FROM bench.tokens ORDER BY id) TO '$TOKENS'
-- The load generator's file holds the tokens now; the database keeps digests only.
DROP TABLE bench.tokens;
-- The services' role: verify through apikeys_app, and read the hand-written table.
CREATE ROLE $APP LOGIN;
GRANT apikeys_app TO $APP;
GRANT USAGE ON SCHEMA bench TO $APP;
GRANT SELECT ON bench.plain_keys TO $APP;
VACUUM ANALYZE;
CHECKPOINT;
-- Read every table and index in once (bulk writes bypass shared buffers),
-- as run.sh does, so that no round reads them from disk.
CREATE EXTENSION pg_prewarm SCHEMA bench;
SELECT count(bench.pg_prewarm(c.oid)) FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname IN ('bench', 'apikeys') AND c.relkind IN ('r', 'i') \\g /dev/null
SQL
[ "$(wc -l < "$TOKENS")" -eq "$KEYS" ] || { echo "test/bench/http.sh: $TOKENS holds $(wc -l < "$TOKENS") tokens, not $KEYS" >&2; exit 1; }

declare -A V                # "metric variant" -> the rounds' values, in round order
FLAGGED=0

# start_service apikeys|hand: starts that service on a free port as $APP; sets SERVICE_PID and PORT.
start_service() {
    local script
    if [ "$1" = apikeys ]; then script=$NODE_DIR/service.js; else script=$HERE/handwritten.js; fi
    : > "$WORK/service.out"
    env PGHOST="$PGHOST" PGPORT="$PGPORT" PGDATABASE="$DB" PGUSER="$APP" PORT=0 \
        node "$script" > "$WORK/service.out" 2> "$WORK/service.err" &
    SERVICE_PID=$!
    for _ in $(seq 1 100); do
        PORT=$(sed -n 's|^listening on http://127.0.0.1:\([0-9]*\)$|\1|p' "$WORK/service.out")
        [ -n "$PORT" ] && return 0
        kill -0 "$SERVICE_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "test/bench/http.sh: the $1 service did not start" >&2
    exit 1
}

# stop_service: SIGTERM (service.js closes the server, then its pool), SIGKILL after 10 s.
stop_service() {
    kill -TERM "$SERVICE_PID"
    for _ in $(seq 1 100); do
        kill -0 "$SERVICE_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVICE_PID" 2>/dev/null || true
    wait "$SERVICE_PID" 2>/dev/null || true
    SERVICE_PID=
}

# run_round ROUND apikeys|hand: one measured run of one service; records its figures in V.
run_round() {
    local round=$1 variant=$2 k v after flag=""
    local -A R=()
    # No checkpoint inside the measured window (run.sh's bench_run does the same).
    psql -X -q -d "$DB" -c CHECKPOINT
    start_service "$variant"
    while IFS='=' read -r k v; do R[$k]=$v; done < <(
        node "$HERE/loadgen.js" --port "$PORT" --tokens "$TOKENS" --concurrency "$CONCURRENCY" \
            --warmup "$WARMUP" --duration "$SECONDS_EACH" --postmaster "$POSTMASTER" \
            --service "$SERVICE_PID")
    [ "${R[requests]:-0}" -gt 0 ] || { echo "test/bench/http.sh: the load generator failed or got no answer" >&2; exit 1; }
    stop_service
    # What the round left for the cluster to do once the load stopped (the
    # apikeys worker writing the round's counts; backends ending) is the
    # round's too: wait for it, reading /proc only, and add its CPU.
    after=$(node "$HERE/proc.js" drain "$POSTMASTER" "$APP" 90)
    after=$((after - R[pg_end_ticks]))
    local n=${R[requests]} us=$((1000000 / CLK_TCK))   # microseconds a tick
    put rps "$variant" "${R[rps]}" %.0f
    put p50 "$variant" "${R[p50_ms]}" %.2f
    put p99 "$variant" "${R[p99_ms]}" %.2f
    put pg "$variant" "$(( (R[pg_ticks] + after) * us ))/$n" %.1f
    put after "$variant" "$(( after * us ))/$n" %.1f
    put node "$variant" "$(( R[service_ticks] * us ))/$n" %.1f
    put gen "$variant" "${R[loadgen_us]}/$n" %.1f
    put bad "$variant" "$((R[non200] + R[errors]))" %.0f
    if [ $((R[non200] + R[errors])) -gt 0 ]; then
        flag="   <-- FLAGGED: ${R[non200]} non-200, ${R[errors]} connection errors"
        FLAGGED=$((FLAGGED + 1))
    fi
    printf '   round %s %-8s %6s req/s  p50 %6s ms  p99 %6s ms  PG %6s us/req  Node %6s us/req  statuses %s%s\n' \
        "$round" "$variant" "$(last rps)" "$(last p50)" "$(last p99)" "$(last pg)" "$(last node)" \
        "${R[statuses]}" "$flag"
}

# put METRIC VARIANT EXPR FORMAT: appends EXPR (a number or a/b), printed
# with FORMAT, to the rounds of METRIC; stored as printed, so that the table's
# medians and rounds show the same digits.
put() { V["$1 $2"]+="$(awk -v f="$4" "BEGIN { printf f, $3 }") "; }
# last METRIC: the value the round just added (uses variant from run_round).
last() { tr ' ' '\n' <<<"${V["$1 $variant"]}" | grep . | tail -1; }

# Interleaved rounds, the order alternating, so that a slow spell of the
# machine (or a warmer cache) favours neither service.
echo "== $ROUNDS rounds of each service, ${SECONDS_EACH}s each after ${WARMUP}s warm-up, $CONCURRENCY connections"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then order="apikeys hand"; else order="hand apikeys"; fi
    for variant in $order; do run_round "$round" "$variant"; done
done

# row LABEL METRIC FORMAT [noratio]: medians, their ratio, each round's values.
row() {
    local a h ratio
    a=$(bench_median "${V["$2 apikeys"]}")
    h=$(bench_median "${V["$2 hand"]}")
    if [ -n "${4:-}" ]; then ratio=-; else ratio=$(bench_ratio "$a" "$h"); fi
    printf "%-40s %12$3 %12$3 %8s   %s | %s\n" "$1" "$a" "$h" "$ratio" \
        "$(awk -v f="%$3" '{ for (i = 1; i <= NF; i++) printf (i > 1 ? " " : "") f, $i }' <<<"${V["$2 apikeys"]}")" \
        "$(awk -v f="%$3" '{ for (i = 1; i <= NF; i++) printf (i > 1 ? " " : "") f, $i }' <<<"${V["$2 hand"]}")"
}
echo
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -r); keys: $KEYS;" \
     "concurrency: $CONCURRENCY keep-alive connections; node $(node --version), pg $PG_NODE, pool of 10"
echo "median of $ROUNDS x ${SECONDS_EACH}s (after ${WARMUP}s warm-up), rounds interleaved (order alternating), fsync on"
echo
printf '%-40s %12s %12s %8s   %s\n' "metric" "apikeys" "hand-written" "ratio" "each round: apikeys | hand-written"
row "requests per second" rps .0f
row "latency p50 (ms)" p50 .2f
row "latency p99 (ms)" p99 .2f
row "PostgreSQL CPU per request (us)" pg .1f
row "  of which after the round (us)" after .1f noratio
row "Node service CPU per request (us)" node .1f
row "load generator CPU per request (us)" gen .1f
row "non-200 responses + connection errors" bad .0f noratio
if [ "$FLAGGED" -gt 0 ]; then
    echo
    echo "$FLAGGED round(s) FLAGGED: not every response was 200; their figures are not comparable" >&2
    exit 1
fi
