#!/usr/bin/env bash
# One entry point for the README's two commands.
#
#   scripts/dev.sh quickstart   run the quickstart on the embedded store (no services needed)
#   scripts/dev.sh test         fmt, clippy, docs and the whole test suite (the dashboard's
#                               test loads its page in headless Chromium, installed if missing)
#   scripts/dev.sh bench        the throughput benchmark (release build; flags pass through)
#   scripts/dev.sh bench-http   idempotency keys over HTTP against the plain handler
#
# Both first make sure the Debian packages the native builds need are present: RocksDB's build
# runs bindgen (libclang) and compiles with Clang (scripts/cxx: about 30 % faster than GCC per
# file), librdkafka's needs a C toolchain, zlib and libzstd (gzip and zstd records). As root they
# are installed with apt-get; otherwise the exact command is printed and the script stops.
#
# Tests run against librdkafka's in-process mock cluster unless KAFKA_BOOTSTRAP_SERVERS is set
# (for example to the docker/ compose stack), in which case they use that cluster.
#
# PostgreSQL: unless DATABASE_URL is set, `test` starts a throwaway server (initdb and pg_ctl in
# a temporary directory, on a free loopback port, as an unprivileged user), installing Debian's
# postgresql first when it is missing and we are root, and stops and removes it on exit, failure
# included. Each test creates (and drops) its own database on it. The fault harness gets a
# second throwaway server, which it restarts mid-run through CHAOS_PG_RESTART, and runs beside
# the suites. With your own DATABASE_URL the harness runs after the suites on that server: set
# CHAOS_PG_RESTART to a command that restarts it, or to `none`.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

# Installs Debian packages (as root; the callers check).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_packages() {
    local missing=()
    local pkg
    for pkg in libclang-dev clang build-essential pkg-config zlib1g-dev libzstd-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}" >&2
        echo "install them with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
}

# The browser the dashboard's test loads its page in: Debian's chromium (or $CHROMIUM),
# installed with apt-get as root, else the command is printed and the script stops.
ensure_browser() {
    if [ -n "${CHROMIUM:-}" ]; then
        [ -x "$CHROMIUM" ] || { echo "CHROMIUM=$CHROMIUM is not an executable" >&2; exit 1; }
        return 0
    fi
    [ -x /usr/bin/chromium ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "the dashboard's browser test needs Debian's chromium; install it with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y chromium" >&2
        echo "or set CHROMIUM to a Chromium or Chrome binary" >&2
        exit 1
    fi
    log "installing chromium"
    apt_install chromium
}

# Every throwaway server started by this script, stopped and removed on exit.
PG_DIRS=()
PG_CTL=""
PG_USER=""

stop_postgres() {
    local dir
    for dir in "${PG_DIRS[@]}"; do
        if [ -f "$dir/data/postmaster.pid" ]; then
            as_pg_user "$PG_CTL" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
        fi
        rm -rf "$dir"
    done
    PG_DIRS=()
}

as_pg_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

# The command prefix that runs a command as the server's user, for commands run by others.
as_pg_user_prefix() {
    if [ "$(id -u)" -eq 0 ]; then
        printf 'runuser -u %s -- ' "$PG_USER"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_postgres() {
    local bindir
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "PostgreSQL's server binaries are missing; install them with:" >&2
            echo "  sudo apt-get update && sudo apt-get install -y postgresql" >&2
            echo "or set DATABASE_URL to a server where this user may create databases" >&2
            exit 1
        fi
        log "installing postgresql"
        apt_install postgresql
        bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    PG_CTL="$bindir/pg_ctl"
    if [ "$(id -u)" -eq 0 ]; then
        # initdb refuses to run as root: the server runs as an unprivileged user.
        PG_USER=postgres
        id -u "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$PG_USER"
    else
        PG_USER=$(id -un)
    fi
    local PG_DIR
    PG_DIR=$(mktemp -d /tmp/idc-pg.XXXXXX)
    PG_DIRS+=("$PG_DIR")
    chmod 755 "$PG_DIR"
    [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$PG_DIR"
    trap 'stop_postgres; kill $(jobs -p) 2>/dev/null || true' EXIT
    local port
    port=$(free_port)
    as_pg_user "$bindir/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync \
        >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
    # fsync off for tests (durability is not what they measure); on for benchmarks. Deadlocks
    # are found after 100 ms instead of PostgreSQL's 1 s: the suites' handlers on shared rows
    # deadlock on purpose, and each one would otherwise hold a partition for a second.
    if ! as_pg_user "$PG_CTL" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 start \
        -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=${PG_FSYNC:-off} -c max_connections=300 -c deadlock_timeout=${PG_DEADLOCK_TIMEOUT:-100ms}" \
        >/dev/null; then
        cat "$PG_DIR/server.log" >&2
        exit 1
    fi
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    # How the fault harness restarts this server mid-run (pg_ctl keeps the start options).
    export CHAOS_PG_RESTART="$(as_pg_user_prefix)$PG_CTL -D $PG_DIR/data -l $PG_DIR/server.log -m fast -w -t 60 restart"
    log "throwaway PostgreSQL on 127.0.0.1:$port ($PG_DIR)"
}

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

case "${1:-}" in
    quickstart)
        ensure_packages
        exec cargo run --example quickstart
        ;;
    test)
        ensure_packages
        ensure_browser
        start=$(date +%s)
        log "cargo fmt --check"
        cargo fmt --all -- --check
        log "building"
        cargo build --all-targets --all-features
        log "cargo clippy"
        cargo clippy --all-targets --all-features -- -D warnings
        log "cargo doc"
        RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
        if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
            log "tests against KAFKA_BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP_SERVERS}"
        else
            log "tests against librdkafka's in-process mock cluster"
        fi
        if [ -n "${DATABASE_URL:-}" ]; then
            log "PostgreSQL tests against DATABASE_URL"
            chaos_log=""
        else
            # The fault harness restarts its server mid-run: it gets one of its own and runs
            # beside the suites (both mostly wait on consumers, brokers and databases, not on
            # the CPU), its output kept in a file and shown when it ends.
            start_postgres
            chaos_env=("DATABASE_URL=$DATABASE_URL" "CHAOS_PG_RESTART=$CHAOS_PG_RESTART")
            start_postgres
            chaos_log=$(mktemp /tmp/idc-chaos.XXXXXX.log)
            log "fault harness (kill -9, rebalance storm, zombies, broker and database faults), beside the suites"
            # The binary itself, built above: `cargo run` would hold the build directory's
            # lock for the whole run and the suites' cargo would wait for it.
            env "${chaos_env[@]}" "${CARGO_TARGET_DIR:-target}/debug/examples/chaos" run \
                >"$chaos_log" 2>&1 &
            chaos_pid=$!
        fi
        # The suites mostly wait on consumers, brokers and databases, not on the CPU: four at
        # a time halves the runtime suite's wall time on two cores.
        cargo test --all-features -- --test-threads=4
        # The examples with the features the suites were built with: the same code, no second
        # build of the crate and its dependencies for the default features.
        log "quickstart"
        cargo run --quiet --all-features --example quickstart
        log "metrics example"
        cargo run --quiet --all-features --example metrics_prometheus
        log "HTTP example"
        cargo run --quiet --all-features --example payments_http -- demo
        log "device shadow example (resolver)"
        cargo run --quiet --all-features --example device_shadow
        log "dashboard example (served by a running consumer, read back over HTTP)"
        cargo run --quiet --all-features --example dashboard -- --listen 127.0.0.1:0 --seconds 8
        if [ -n "$chaos_log" ]; then
            chaos_rc=0
            wait "$chaos_pid" || chaos_rc=$?
            log "fault harness output"
            cat "$chaos_log"
            rm -f "$chaos_log"
            [ "$chaos_rc" -eq 0 ] || { echo "the fault harness failed (exit $chaos_rc)" >&2; exit 1; }
        else
            log "fault harness (kill -9, rebalance storm, zombies, broker and database faults)"
            cargo run --quiet --all-features --example chaos -- run
        fi
        log "all checks passed in $(( $(date +%s) - start ))s"
        ;;
    bench)
        # The throughput benchmark (release build), against a throwaway server with fsync on.
        shift
        PG_FSYNC=on PG_DEADLOCK_TIMEOUT=1s start_postgres
        cargo bench --all-features --bench throughput -- "$@"
        ;;
    bench-http)
        # Idempotency keys over HTTP against the plain handler (release build), against a
        # throwaway server with fsync on.
        shift
        PG_FSYNC=on start_postgres
        cargo bench --all-features --bench http -- "$@"
        ;;
    bench-relay)
        # The outbox relay against raw produce, and the end-to-end latency (release build),
        # against a throwaway server with fsync on.
        shift
        PG_FSYNC=on start_postgres
        cargo bench --all-features --bench relay -- "$@"
        ;;
    postgres)
        # A throwaway server for working on the PostgreSQL store by hand: prints its URL and
        # keeps it until Ctrl-C.
        start_postgres
        echo "DATABASE_URL=$DATABASE_URL"
        echo "CHAOS_PG_RESTART=$CHAOS_PG_RESTART"
        trap 'stop_postgres; exit 0' INT TERM
        # `wait` returns as soon as a signal arrives, so the trap stops the server at once.
        while :; do sleep 3600 & wait $!; done
        ;;
    *)
        echo "usage: $0 quickstart|test|bench|bench-http|bench-relay|postgres" >&2
        exit 2
        ;;
esac
