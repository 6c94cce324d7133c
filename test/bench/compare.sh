#!/usr/bin/env bash
# Before and after: the hot path and the worker's flush of an earlier
# revision and of this tree, measured side by side in one run, on two
# private clusters with the same settings and data, in interleaved rounds
# (median of each).
#
#   bash test/bench/compare.sh <git revision>     # e.g. HEAD~1, or a tag
#
# The earlier revision is built and installed into a private copy of the
# PostgreSQL 15 installation (PostgreSQL finds its files relative to its
# binaries), so both versions of apikeys run at once; this tree is installed
# into the system's PostgreSQL as run.sh does.  Only one cluster is busy at
# a time.  Knobs: BENCH_KEYS (200000), BENCH_SECONDS (10), BENCH_WARMUP (12),
# BENCH_ROUNDS (3), BENCH_CLIENTS (2), BENCH_VARIANTS ("b d e f i w"; also h, j, k, p),
# APIKEYS_COMPARE_DIR, and the two ports APIKEYS_COMPARE_PORT (54331 and
# the next).
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REV=${1:?usage: compare.sh <git revision to compare this tree with>}
KEYS=${BENCH_KEYS:-200000}; SECONDS_EACH=${BENCH_SECONDS:-10}
WARMUP=${BENCH_WARMUP:-12}; ROUNDS=${BENCH_ROUNDS:-3}; CLIENTS=${BENCH_CLIENTS:-2}
DIR=${APIKEYS_COMPARE_DIR:-/tmp/apikeys-compare}
PORT_BEFORE=${APIKEYS_COMPARE_PORT:-54331}; PORT_AFTER=$((PORT_BEFORE + 1))
SYSTEM_BIN=$PG_BIN
OLD_ROOT=$DIR/pg
OLD_BIN=$OLD_ROOT/usr/lib/postgresql/15/bin
SCRIPTS=$DIR/scripts

cleanup() {
    PG_BIN=$OLD_BIN stop_cluster "$DIR/before"
    PG_BIN=$SYSTEM_BIN stop_cluster "$DIR/after"
}
trap cleanup EXIT

install_packages
build_and_install
rm -rf "$DIR"
mkdir -p "$DIR/src" "$OLD_ROOT/usr/lib/postgresql" "$OLD_ROOT/usr/share/postgresql" "$OLD_ROOT/usr/include" "$SCRIPTS"
echo "== a private PostgreSQL 15 with apikeys at $REV ($(git -C "$REPO" rev-parse --short "$REV"))"
cp -a /usr/lib/postgresql/15 "$OLD_ROOT/usr/lib/postgresql/"
cp -a /usr/share/postgresql/15 "$OLD_ROOT/usr/share/postgresql/"
cp -a /usr/include/postgresql "$OLD_ROOT/usr/include/"
git -C "$REPO" archive "$REV" | tar -x -C "$DIR/src"
make -C "$DIR/src" -s PG_CONFIG="$OLD_BIN/pg_config" >/dev/null
make -C "$DIR/src" -s install PG_CONFIG="$OLD_BIN/pg_config" >/dev/null
chmod -R a+rX "$DIR"

settings=("shared_preload_libraries = 'apikeys'" "fsync = on" "shared_buffers = 1GB"
          "apikeys.max_tracked_keys = $((KEYS + KEYS / 4 + 1000))"
          "apikeys.max_credit_keys = $((KEYS / 10 + 1000))")
PG_BIN=$OLD_BIN PGPORT=$PORT_BEFORE start_cluster "$DIR/before" "${settings[@]}"
PG_BIN=$SYSTEM_BIN PGPORT=$PORT_AFTER start_cluster "$DIR/after" "${settings[@]}"

# on SIDE CMD...: runs CMD against the "before" or "after" cluster.
on() {
    local side=$1; shift
    if [ "$side" = before ]; then PGHOST=$DIR/before PGPORT=$PORT_BEFORE "$@"
    else PGHOST=$DIR/after PGPORT=$PORT_AFTER "$@"; fi
}

echo "== loading $KEYS keys into each"
on before bench_load bench "$KEYS"
on after bench_load bench "$KEYS"
bench_scripts "$SCRIPTS"

declare -A TPS
read -r -a variants <<<"${BENCH_VARIANTS:-b d e f i w}"
# Key groups of bench_range: (b) and (d) read the plain keys; (h) the
# rate-limited ones, (p) a plain group of the same size, (i) keys with
# credits, (j) keys with credits and a rate limit, (k) keys whose owners'
# plan has a rate limit.  (w): not a rate but the worker's time, in ms, to write what a
# run of (d) over every valid key left (credits spent among it).
declare -A SCRIPT=([b]=b.sql [d]=d.sql [e]=e.sql [f]=d.sql [h]=d.sql [p]=d.sql [i]=d.sql [j]=d.sql [k]=d.sql)
declare -A GROUP=([b]=plain [d]=plain [e]=all [f]=revoked [h]=rate [p]=plain_part [i]=credits [j]=credits_rate [k]=owner [w]=valid)
echo "== $ROUNDS rounds, ${SECONDS_EACH}s a run after ${WARMUP}s warm-up, $CLIENTS clients; sides alternate"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order=(before after); else order=(after before); fi
    for v in "${variants[@]}"; do
        for side in "${order[@]}"; do
            if [ "$v" = w ]; then
                TPS[$v.$side]+="$(on "$side" bench_flush bench $(bench_range "${GROUP[$v]}" "$KEYS")) "
            else
                TPS[$v.$side]+="$(on "$side" bench_run bench "${SCRIPT[$v]}" $(bench_range "${GROUP[$v]}" "$KEYS")) "
            fi
        done
    done
done

echo
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB; keys: $KEYS; median of $ROUNDS x ${SECONDS_EACH}s"
echo "before: $REV ($(git -C "$REPO" rev-parse --short "$REV")); after: this tree"
printf '%-44s %9s %9s %7s   %s\n' "variant" "before" "after" "after/" "each round (before | after)"
declare -A labels=([b]="(b) hand-written SHA-256 lookup (pgcrypto)" [d]="(d) apikeys.verify, plain keys"
                   [e]="(e) apikeys.verify, malformed tokens" [f]="(f) apikeys.verify, revoked keys"
                   [h]="(h) apikeys.verify, rate-limited keys" [p]="(p) apikeys.verify, plain keys"
                   [i]="(i) apikeys.verify, keys with credits"
                   [j]="(j) apikeys.verify, credits and rate limit"
                   [k]="(k) apikeys.verify, owner-limited keys"
                   [w]="(w) worker's flush after a run of (d), ms")
for v in "${variants[@]}"; do
    before=$(bench_median "${TPS[$v.before]}"); after=$(bench_median "${TPS[$v.after]}")
    printf '%-44s %9.0f %9.0f %7s   %s | %s\n' "${labels[$v]}" "$before" "$after" \
        "$(bench_ratio "$after" "$before")" "$(bench_rounds "${TPS[$v.before]}")" "$(bench_rounds "${TPS[$v.after]}")"
done
