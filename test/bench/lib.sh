# Shared by the benchmark scripts (run.sh, compare.sh): loading a database,
# the pgbench scripts of every variant, one measured run, and medians.
# Expects test/scripts/lib.sh sourced and PGHOST/PGPORT set by start_cluster.

# bench_range GROUP N -> "LO HI": the ids of one group of bench_load's N
# keys.  The first tenth is revoked; the next four twentieths carry a limit
# each (too high to refuse anything); the last 70% are plain, so that (d)
# and (b) read the same large range of keys, (d) with usage tracking alone.
# plain_part is the first twentieth of those, as large as each limit group.
bench_range() {
    local p=$(($2 / 20))
    case $1 in
        all)          echo "1 $2" ;;
        revoked)      echo "1 $((2 * p))" ;;
        valid)        echo "$((2 * p + 1)) $2" ;;
        rate)         echo "$((2 * p + 1)) $((3 * p))" ;;
        credits_rate) echo "$((3 * p + 1)) $((4 * p))" ;;
        owner)        echo "$((4 * p + 1)) $((5 * p))" ;;
        credits)      echo "$((5 * p + 1)) $((6 * p))" ;;
        plain)        echo "$((6 * p + 1)) $2" ;;
        plain_part)   echo "$((6 * p + 1)) $((7 * p))" ;;
        *)            echo "bench_range: unknown group $1" >&2; return 1 ;;
    esac
}

# bench_load DB N: N keys in the groups of bench_range; the same tokens in a
# hand-written table keyed by SHA-256 (pgcrypto) for the baselines.
bench_load() {
    local db=$1 n=$2
    local p=$((n / 20))
    createdb "$db"
    psql -X -q -v ON_ERROR_STOP=1 -d "$db" <<SQL
CREATE EXTENSION apikeys;
CREATE EXTENSION pgcrypto;
CREATE SCHEMA bench;
-- Bulk load without per-row triggers: limits and audit are not measured here.
SET session_replication_role = replica;
INSERT INTO apikeys.owners (owner, plan) SELECT 'owner-' || i, 'enterprise' FROM generate_series(0, 999) i;
CREATE TABLE bench.tokens AS
    SELECT i AS id, apikeys._new_token('ak_live')::text AS token FROM generate_series(1, $n) i;
ALTER TABLE bench.tokens ADD PRIMARY KEY (id);
-- Limits too high to refuse anything, so that variants measure what
-- applying them costs, by twentieths p of the keys (bench_range): the first
-- two are revoked; the third has a rate limit; the fourth credits and a
-- rate limit; the fifth belongs to owners whose plan has an owner-wide
-- rate limit; the sixth has credits alone; the rest are plain.
INSERT INTO apikeys.plans (name, rate_limit) VALUES ('metered', 1000000000);
INSERT INTO apikeys.owners (owner, plan) SELECT 'metered-' || i, 'metered' FROM generate_series(0, 999) i;
INSERT INTO apikeys.keys (owner, name, prefix, start, digest, revoked_at, rate_limit, credits)
    SELECT CASE WHEN id > 4 * $p AND id <= 5 * $p THEN 'metered-' ELSE 'owner-' END || (id % 1000),
           'key-' || id, 'ak_live', apikeys.start(token::apikeys.apikey),
           apikeys.digest(token::apikeys.apikey), CASE WHEN id <= 2 * $p THEN now() END,
           CASE WHEN id > 2 * $p AND id <= 4 * $p THEN 1000000 END,
           CASE WHEN (id > 3 * $p AND id <= 4 * $p) OR (id > 5 * $p AND id <= 6 * $p)
                THEN 1000000000000 END
      FROM bench.tokens;
CREATE TABLE bench.plain_keys (
    id bigint PRIMARY KEY, owner text, name text, digest bytea UNIQUE, scopes text[],
    revoked_at timestamptz, expires_at timestamptz, last_used_at timestamptz);
INSERT INTO bench.plain_keys
    SELECT id, 'owner-' || (id % 1000), 'key-' || id, digest(token, 'sha256'), '{}',
           CASE WHEN id <= 2 * $p THEN now() END, NULL, NULL
      FROM bench.tokens;
RESET session_replication_role;
CREATE FUNCTION bench.plpgsql_verify(p_token text)
RETURNS TABLE (valid boolean, key_id bigint, owner text) LANGUAGE plpgsql AS \$\$
DECLARE
    k bench.plain_keys;
BEGIN
    SELECT * INTO k FROM bench.plain_keys p WHERE p.digest = digest(p_token, 'sha256');
    IF NOT FOUND OR k.revoked_at IS NOT NULL OR (k.expires_at IS NOT NULL AND k.expires_at <= now()) THEN
        RETURN QUERY SELECT false, k.id, k.owner;
        RETURN;
    END IF;
    UPDATE bench.plain_keys SET last_used_at = now() WHERE id = k.id;
    RETURN QUERY SELECT true, k.id, k.owner;
END \$\$;
VACUUM ANALYZE;
CHECKPOINT;
CREATE EXTENSION pg_prewarm SCHEMA bench;
SQL
    bench_prewarm "$db"
}

# bench_prewarm DB: reads every table and index of DB's schemas bench and
# apikeys into shared buffers, after a bulk load (which bypasses them) or a
# restart, so that no variant's first round reads them from disk.
bench_prewarm() {
    psql -XAtq -v ON_ERROR_STOP=1 -d "$1" -o /dev/null -c "
SELECT count(bench.pg_prewarm(c.oid)) FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname IN ('bench', 'apikeys') AND c.relkind IN ('r', 'i')"
}

# bench_scripts DIR: the pgbench script of every variant.
bench_scripts() {
    local dir=$1
    cat > "$dir/a.sql" <<'SQL'
\set id random(:lo, :hi)
SELECT t.token FROM bench.tokens t WHERE t.id = :id;
SQL
    cat > "$dir/b.sql" <<'SQL'
\set id random(:lo, :hi)
SELECT k.id, k.owner, k.name, k.scopes FROM bench.plain_keys k
 WHERE k.digest = digest((SELECT t.token FROM bench.tokens t WHERE t.id = :id), 'sha256')
   AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now());
SQL
    cat > "$dir/c.sql" <<'SQL'
\set id random(:lo, :hi)
SELECT * FROM bench.plpgsql_verify((SELECT t.token FROM bench.tokens t WHERE t.id = :id));
SQL
    # (d) asks verify for what (b) returns, as the README's examples name the
    # columns they use; (d all) reads all twelve (SELECT *).
    cat > "$dir/d.sql" <<'SQL'
\set id random(:lo, :hi)
SELECT v.valid, v.key_id, v.owner, v.name, v.scopes
  FROM apikeys.verify((SELECT t.token FROM bench.tokens t WHERE t.id = :id)) v;
SQL
    cat > "$dir/dall.sql" <<'SQL'
\set id random(:lo, :hi)
SELECT * FROM apikeys.verify((SELECT t.token FROM bench.tokens t WHERE t.id = :id));
SQL
    cat > "$dir/e.sql" <<'SQL'
\set id random(:lo, :hi)
SELECT v.valid, v.key_id, v.owner, v.name, v.scopes
  FROM apikeys.verify((SELECT overlay(t.token PLACING '!' FROM 20 FOR 1) FROM bench.tokens t WHERE t.id = :id)) v;
SQL
    cat > "$dir/g.sql" <<'SQL'
\set o random(0, 999)
SELECT key_id FROM apikeys.create_key('owner-' || :o, 'bench');
SQL
    # The bulk path: many keys in one statement, so one commit.
    cat > "$dir/gb.sql" <<'SQL'
\set o random(0, 999)
SELECT count(c.key_id) FROM generate_series(1, 100) i, apikeys.create_key('owner-' || :o, 'bench ' || i) c;
SQL
}

# Waits (at most a minute) until no apikeys worker runs: the previous
# variant's remaining counts are written and its worker has retired.
bench_quiesce() {
    local i
    for i in $(seq 1 120); do
        [ "$(psql -XAtq -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikeys worker'")" = 0 ] && return 0
        sleep 0.5
    done
    echo "warning: an apikeys worker still runs after 60 s" >&2
}

# bench_run DB SCRIPT LO HI -> TPS (uses SCRIPTS, CLIENTS, WARMUP, SECONDS_EACH)
# A checkpoint first, so that none falls inside a measured run; then an
# unmeasured warm-up.  The worker starts with the warm-up, so its first
# usage flush begins one usage_flush_interval (60 s) later: near the end of
# a 60-s measured run, and after a 30-s one.  Afterwards the counts left
# are written before the next variant starts, so that no variant pays for
# another's writes; the soak (run.sh) is what pays for every flush.
bench_run() {
    local out
    psql -X -q -d "$1" -c CHECKPOINT
    pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$WARMUP" \
        -D lo="$3" -D hi="$4" -f "$SCRIPTS/$2" "$1" >/dev/null 2>&1
    out=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" \
        -D lo="$3" -D hi="$4" -f "$SCRIPTS/$2" "$1" 2>&1) || { echo "$out" >&2; exit 1; }
    bench_quiesce
    echo "$out" | awk '/^tps = / { print $3; exit }'
}

# bench_per_call DB LO HI SECONDS -> (d)/(b) per call: one pgbench run in
# which every client picks (b) or (d) at random for each transaction, so a
# slow spell of the machine slows both alike; the ratio is (b)'s mean
# latency over (d)'s, from a quarter of the transactions (pgbench -l).  The
# worker's usage flush, one usage_flush_interval after it starts, falls
# after a run shorter than that; within one it would slow both alike.
bench_per_call() {
    local dir
    dir=$(mktemp -d /tmp/apikeys-bench-mixed.XXXXXX)
    psql -X -q -d "$1" -c CHECKPOINT
    (cd "$dir" && pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$4" -l --sampling-rate=0.25 \
        -D lo="$2" -D hi="$3" -f "$SCRIPTS/b.sql" -f "$SCRIPTS/d.sql" "$1" >/dev/null 2>&1) || exit 1
    bench_quiesce
    # A log line: client, transaction, latency (us), script (0 is b.sql, 1 d.sql), ...
    cat "$dir"/pgbench_log.* | awk '{ sum[$4] += $3; n[$4]++ }
        END { if (n[0] && n[1] && sum[1]) printf "%.4f", (sum[0] / n[0]) / (sum[1] / n[1]); else print 0 }'
    rm -rf "$dir"
}

# bench_flush DB LO HI -> milliseconds the worker takes to write what
# SECONDS_EACH of (d) over keys LO..HI left: usage counts and spent credits.
# The usage flush interval is lifted for the run, and a session stays
# connected throughout (a worker writes counts at once when no client is
# connected), so that all of it is written by the one timed apikeys.flush().
# Needs a revision with apikeys.usage_flush_interval and apikeys.flush().
bench_flush() {
    local t0 t1 written before
    written="SELECT coalesce(sum(requests), 0) FROM apikeys.key_usage"
    psql -X -q -d postgres -c "ALTER SYSTEM SET apikeys.usage_flush_interval = '1d'" \
        -c "SELECT pg_reload_conf()" >/dev/null
    psql -X -q -d "$1" -c "SELECT apikeys.flush('5 min')" -c CHECKPOINT >/dev/null
    PGAPPNAME=bench_flush_holder psql -X -q -d "$1" -c "SELECT pg_sleep(3600)" >/dev/null 2>&1 &
    before=$(psql -XAtq -d "$1" -c "$written")
    pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" \
        -D lo="$2" -D hi="$3" -f "$SCRIPTS/d.sql" "$1" >/dev/null 2>&1 || exit 1
    # A flush before the timed one would leave it less to write: say so.
    [ "$(psql -XAtq -d "$1" -c "$written")" = "$before" ] ||
        echo "warning: bench_flush: counts were written before the timed flush; its time is not the whole write" >&2
    t0=$(date +%s%N)
    psql -X -q -d "$1" -c "SELECT apikeys.flush('5 min')" >/dev/null
    t1=$(date +%s%N)
    psql -X -q -d postgres -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                WHERE application_name = 'bench_flush_holder'" >/dev/null
    wait
    psql -X -q -d postgres -c "ALTER SYSTEM RESET apikeys.usage_flush_interval" \
        -c "SELECT pg_reload_conf()" >/dev/null
    bench_quiesce
    echo $(((t1 - t0) / 1000000))
}

# The rounds' figures, in the order they ran; their median; a ratio; met or MISSED.
bench_rounds() { tr ' ' '\n' <<<"$1" | grep . | awk '{ printf "%s%.0f", (NR > 1 ? " " : ""), $1 }'; }
bench_rounds_exact() { tr ' ' '\n' <<<"$1" | grep . | paste -sd' '; }
bench_median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
# bench_round_ratios "X1 X2 .." "Y1 Y2 .." -> "X1/Y1 X2/Y2 ..": a ratio of each round,
# of two variants run minutes apart, which the machine's slower drift moves less than medians.
bench_round_ratios() {
    paste -d' ' <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
        awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), ($2 > 0 ? $1 / $2 : 0) }'
}
bench_ratio() { awk -v x="$1" -v y="$2" 'BEGIN { printf "%.2f", (y > 0 ? x / y : 0) }'; }
bench_check() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t ? "met" : "MISSED") }'; }
