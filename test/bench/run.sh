#!/usr/bin/env bash
# Verification benchmark: every variant side by side in one run, on one
# private cluster, reported as TPS and ratios (never asserted in tests).
#
#   bash test/bench/run.sh            # full run (about an hour)
#   bash test/bench/run.sh --smoke    # seconds-long run that only proves it works
#
# The headline runs the default configuration: apikeys' shipped settings
# (flush_interval 10 s, usage_flush_interval 60 s), ordinary 4 kB pages,
# 1,000,000 and 200,000 keys.  A measured run holds little of the worker's
# write of its own counts (see bench_run); then a 10-minute soak of verify,
# one worker flushing every minute as under steady load, pays for every
# write and shows whether throughput declines as key_usage is rewritten.
# Extra rows show tuned settings (huge pages).
#
# Knobs: BENCH_KEYS, BENCH_MID_KEYS, BENCH_SECONDS, BENCH_WARMUP, BENCH_ROUNDS,
# BENCH_CLIENTS, BENCH_SOAK_ROUNDS, BENCH_SOAK_SECONDS, BENCH_MIXED_SECONDS.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    KEYS=${BENCH_KEYS:-2000}; MID=${BENCH_MID_KEYS:-500}; SECONDS_EACH=${BENCH_SECONDS:-2}
    WARMUP=${BENCH_WARMUP:-1}; ROUNDS=${BENCH_ROUNDS:-1}
    SOAK_ROUNDS=${BENCH_SOAK_ROUNDS:-2}; SOAK_SECONDS=${BENCH_SOAK_SECONDS:-2}
    MIXED_SECONDS=${BENCH_MIXED_SECONDS:-2}
else
    SMOKE=
    KEYS=${BENCH_KEYS:-1000000}; MID=${BENCH_MID_KEYS:-200000}; SECONDS_EACH=${BENCH_SECONDS:-60}
    WARMUP=${BENCH_WARMUP:-5}; ROUNDS=${BENCH_ROUNDS:-3}
    SOAK_ROUNDS=${BENCH_SOAK_ROUNDS:-10}; SOAK_SECONDS=${BENCH_SOAK_SECONDS:-60}
    MIXED_SECONDS=${BENCH_MIXED_SECONDS:-40}
fi
CLIENTS=${BENCH_CLIENTS:-2}
PGPORT=${APIKEYS_BENCH_PORT:-54330}
CLUSTER=${APIKEYS_BENCH_DIR:-/tmp/apikeys-bench}
SCRIPTS=$(mktemp -d /tmp/apikeys-bench-scripts.XXXXXX)
HUGEPAGES_BEFORE=$(cat /proc/sys/vm/nr_hugepages)
cleanup() {
    stop_cluster "$CLUSTER"
    # The huge pages go back below: leave a cluster that starts without them.
    as_postgres sed -i "s/^huge_pages = on/huge_pages = off/" "$CLUSTER/data/postgresql.conf" 2>/dev/null || true
    rm -rf "$SCRIPTS"
    [ "$(cat /proc/sys/vm/nr_hugepages)" = "$HUGEPAGES_BEFORE" ] ||
        $SUDO sysctl -q -w vm.nr_hugepages="$HUGEPAGES_BEFORE" || true
}
trap cleanup EXIT

install_packages
build_and_install
stop_cluster "$CLUSTER"
# fsync stays on: the hand-written verify that writes a row pays for its
# commits exactly as it would in production.  Every key fits in the usage
# table below the 90% at which the worker starts forgetting today's idle
# entries, as the README advises sizing it.
start_cluster "$CLUSTER" "shared_preload_libraries = 'apikeys'" "fsync = on" \
    "shared_buffers = 1GB" "apikeys.max_tracked_keys = $((KEYS + KEYS / 4 + 1000))" \
    "apikeys.max_credit_keys = $((KEYS / 10 + 1000))" \
    "huge_pages = off"

echo "== loading $KEYS keys (bench_large) and $MID keys (bench_mid)"
bench_load bench_large "$KEYS"
bench_load bench_mid "$MID"
bench_scripts "$SCRIPTS"

declare -A TPS
PER_CALL=
# One round runs every variant once, readers first; rounds interleave so a
# slow spell of the machine hits every variant alike.  Each figure is the
# median of its rounds.  (b), (c) and (d) read the same plain keys (see
# bench_range); (d mix) verifies every valid key, limits included.
echo "== default configuration: $ROUNDS rounds of every variant, ${SECONDS_EACH}s each after ${WARMUP}s, $CLIENTS clients"
for round in $(seq 1 "$ROUNDS"); do
    TPS[a]+="$(bench_run bench_large a.sql $(bench_range all "$KEYS")) "
    TPS[b]+="$(bench_run bench_large b.sql $(bench_range plain "$KEYS")) "
    TPS[d]+="$(bench_run bench_large d.sql $(bench_range plain "$KEYS")) "
    TPS[da]+="$(bench_run bench_large dall.sql $(bench_range plain "$KEYS")) "
    TPS[dv]+="$(bench_run bench_large d.sql $(bench_range valid "$KEYS")) "
    # What each limit costs: a group that carries it against a plain group
    # of the same size, so that both meet the same cache.
    TPS[h]+="$(bench_run bench_large d.sql $(bench_range rate "$KEYS")) "
    TPS[hp]+="$(bench_run bench_large d.sql $(bench_range plain_part "$KEYS")) "
    TPS[i]+="$(bench_run bench_large d.sql $(bench_range credits "$KEYS")) "
    TPS[j]+="$(bench_run bench_large d.sql $(bench_range credits_rate "$KEYS")) "
    TPS[k]+="$(bench_run bench_large d.sql $(bench_range owner "$KEYS")) "
    TPS[bm]+="$(bench_run bench_mid b.sql $(bench_range plain "$MID")) "
    TPS[dm]+="$(bench_run bench_mid d.sql $(bench_range plain "$MID")) "
    TPS[e]+="$(bench_run bench_large e.sql $(bench_range all "$KEYS")) "
    TPS[f]+="$(bench_run bench_large d.sql $(bench_range revoked "$KEYS")) "
    TPS[c]+="$(bench_run bench_large c.sql $(bench_range plain "$KEYS")) "
    TPS[cm]+="$(bench_run bench_mid c.sql $(bench_range plain "$MID")) "
    TPS[g]+="$(bench_run bench_large g.sql 0 0) "
    TPS[gb]+="$(bench_run bench_large gb.sql 0 0) "
done

# Per call: (b) and (d) mixed transaction by transaction in one run, so
# that the machine's drift, which moves whole rounds by up to 15%, cancels.
echo "== per call: $ROUNDS runs of ${MIXED_SECONDS}s mixing (b) and (d)"
for round in $(seq 1 "$ROUNDS"); do
    PER_CALL+="$(bench_per_call bench_large $(bench_range plain "$KEYS") "$MIXED_SECONDS") "
done

# The soak: verify alone, round after round, with no pause between rounds
# (one worker stays, flushing as under steady load).
echo "== soak: $SOAK_ROUNDS rounds of ${SOAK_SECONDS}s of verify at $KEYS keys"
psql -X -q -d bench_large -c CHECKPOINT
for round in $(seq 1 "$SOAK_ROUNDS"); do
    TPS[soak]+="$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SOAK_SECONDS" \
        -D lo="$(bench_range plain "$KEYS" | cut -d' ' -f1)" -D hi="$KEYS" -f "$SCRIPTS/d.sql" bench_large 2>&1 |
        awk '/^tps = / { print $3; exit }') "
done
bench_quiesce

# Tuned: the same server on 2 MB huge pages, as PostgreSQL's documentation
# advises for a shared memory segment this size (fewer TLB misses among a
# million keys).  The pages are reserved for these runs and given back on
# exit; where the kernel refuses, the rows say so.
HUGE_PAGES=skipped
if [ -z "$SMOKE" ]; then
    HUGEPAGES_NEEDED=$(psql -XAtq -d postgres -c "SHOW shared_memory_size_in_huge_pages")
    if $SUDO sysctl -q -w vm.nr_hugepages=$((HUGEPAGES_BEFORE + HUGEPAGES_NEEDED)) 2>/dev/null; then
        as_postgres sed -i "s/^huge_pages = off/huge_pages = on/" "$CLUSTER/data/postgresql.conf"
        if as_postgres "$PG_BIN/pg_ctl" -D "$CLUSTER/data" -l "$CLUSTER/server.log" -w restart >/dev/null; then
            HUGE_PAGES=yes
            bench_prewarm bench_large
            echo "== tuned: $ROUNDS rounds on huge pages"
            for round in $(seq 1 "$ROUNDS"); do
                TPS[bh]+="$(bench_run bench_large b.sql $(bench_range plain "$KEYS")) "
                TPS[dh]+="$(bench_run bench_large d.sql $(bench_range plain "$KEYS")) "
            done
        else
            HUGE_PAGES=refused
        fi
    else
        HUGE_PAGES=refused
    fi
fi

declare -A M
for v in "${!TPS[@]}"; do M[$v]=$(bench_median "${TPS[$v]}"); done
# One round is noise; the decline is judged on the median of the last three
# rounds against the median of the first three.
SOAK_FIRST=$(bench_median "$(tr ' ' '\n' <<<"${TPS[soak]}" | grep . | head -3 | tr '\n' ' ')")
SOAK_LAST=$(bench_median "$(tr ' ' '\n' <<<"${TPS[soak]}" | grep . | tail -3 | tr '\n' ' ')")

row() { printf '%-62s %10.0f   %s\n' "$1" "${M[$2]:-0}" "$(bench_rounds "${TPS[$2]:-}")"; }
echo
echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -r); keys: $KEYS and $MID;"
echo "median of $ROUNDS x ${SECONDS_EACH}s (after ${WARMUP}s warm-up), $CLIENTS clients, fsync on"
echo
echo "default configuration (4 kB pages, flush_interval 10s, usage_flush_interval 60s)"
printf '%-62s %10s   %s\n' "variant" "TPS" "each round"
row "(a) fetch a token by id" a
row "(b) hand-written SHA-256 lookup (pgcrypto)" b
row "(c) hand-written PL/pgSQL verify that updates last_used_at" c
row "(d) apikeys.verify, plain keys, usage tracking on" d
row "(d all) (d) reading all 12 columns (SELECT *)" da
row "(d mix) (d) on every valid key, 2 in 9 with a limit" dv
row "(h) (d), a twentieth of the keys, rate-limited (never refused)" h
row "(h plain) a twentieth of plain keys" hp
row "(i) (d), a twentieth with credits (never exhausted)" i
row "(j) (d), a twentieth with credits and a rate limit" j
row "(k) (d), a twentieth whose owners' plan has a rate_limit" k
row "(b) at $MID keys" bm
row "(c) at $MID keys" cm
row "(d) at $MID keys" dm
row "(e) apikeys.verify, malformed tokens" e
row "(f) apikeys.verify, revoked keys" f
row "(g) apikeys.create_key, one key a transaction" g
printf '%-62s %10.0f   %s\n' "(gb) create_key, 100 keys a statement: keys per second" \
    "$(awk -v t="${M[gb]:-0}" 'BEGIN { print t * 100 }')" "$(bench_rounds "${TPS[gb]:-}")"
printf '%-62s %10s   %s\n' "soak: (d), ${SOAK_SECONDS}s rounds in a row" "" "$(bench_rounds "${TPS[soak]}")"
echo
echo "tuned (huge pages: $HUGE_PAGES)"
row "(b) on huge pages" bh
row "(d) on huge pages" dh
echo
# The value judged is the ratio of the medians; each round's ratio is shown
# beside it, to tell a miss by the machine's noise from one by every round.
printf '%-44s %8s %8s %8s   %s\n' "ratio" "value" "target" "result" "each round"
# ratio_row LABEL X Y TARGET: X's median over Y's; a TARGET of - reports without judging.
ratio_row() {
    local r
    r=$(bench_ratio "${M[$2]:-0}" "${M[$3]:-0}")
    printf '%-44s %8s %8s %8s   %s\n' "$1" "$r" "$4" "$([ "$4" = - ] && echo - || bench_check "$r" "$4")" \
        "$(bench_round_ratios "${TPS[$2]:-}" "${TPS[$3]:-}")"
}
ratio_row "(d) / (b) at $KEYS keys" d b 1.00
ratio_row "(d) / (b) at $MID keys" dm bm 0.90
ratio_row "(h) / (h plain): a rate limit costs at most 10%" h hp 0.91
ratio_row "(i) / (h plain): credits cost at most 10%" i hp 0.91
ratio_row "(j) / (h plain): credits + rate limit, at most 10%" j hp 0.91
ratio_row "(k) / (h plain): an owner limit costs at most 10%" k hp 0.91
ratio_row "(d) / (c) at $KEYS keys" d c 10.00
ratio_row "(d) / (c) at $MID keys" dm cm 10.00
ratio_row "(e) / (d)" e d 1.00
ratio_row "(d all) / (b) at $KEYS keys" da b -
M[soak_last]=$SOAK_LAST; M[soak_first]=$SOAK_FIRST
ratio_row "soak: median last 3 / median first 3 rounds" soak_last soak_first 0.95
echo
echo "per call, (b) and (d) mixed in one run (drift cancels; the flush is outside, see bench_per_call)"
printf '%-44s %8s   %s\n' "(d) / (b) per call at $KEYS keys" "$(bench_median "$PER_CALL")" "$(bench_rounds_exact "$PER_CALL")"
