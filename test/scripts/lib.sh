# Shared by demo.sh and run-tests.sh: packages, build, and a private
# PostgreSQL 15 cluster run by the unprivileged "postgres" OS user.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PGPORT=${APIKEYS_PGPORT:-54329}
export PATH="$PG_BIN:$PATH"

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres -- "$@"; fi
}

install_packages() {
    local pkgs=(build-essential postgresql-15 postgresql-server-dev-15
                libsodium-dev libipc-run-perl python3-psycopg python3-psycopg-pool
                nodejs npm pgbouncer libfaketime)
    local missing=()
    for p in "${pkgs[@]}"; do
        # NodeSource's nodejs brings its own npm and conflicts with Debian's.
        [ "$p" = npm ] && command -v npm >/dev/null && continue
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing: ${missing[*]}"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

build_and_install() {
    # Callers that already built this tree (run-tests.sh before the benchmark smoke run).
    [ -n "${APIKEYS_SKIP_BUILD:-}" ] && return 0
    echo "== building apikeys"
    make -C "$REPO" -s clean >/dev/null
    make -C "$REPO" -s PG_CONFIG="$PG_BIN/pg_config"
    $SUDO make -C "$REPO" -s install PG_CONFIG="$PG_BIN/pg_config" >/dev/null
}

# start_cluster DIR [extra postgresql.conf lines...]: a fresh cluster in DIR,
# socket in DIR, port $PGPORT, trust auth on the socket only.
start_cluster() {
    local dir=$1; shift
    rm -rf "$dir"
    mkdir -p "$dir"
    chmod 755 "$dir"
    chown postgres:postgres "$dir" 2>/dev/null || $SUDO chown postgres:postgres "$dir"
    as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
    {
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir'"
        echo "port = $PGPORT"
        echo "fsync = off"
        for line in "$@"; do echo "$line"; done
    } | as_postgres tee -a "$dir/data/postgresql.conf" >/dev/null
    as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
    export PGHOST=$dir PGPORT PGUSER=postgres
}

stop_cluster() {
    local dir=$1
    [ -d "$dir/data" ] && as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}
