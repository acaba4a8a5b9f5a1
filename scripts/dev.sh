#!/usr/bin/env bash
# One entry point for the README's two commands.
#
#   scripts/dev.sh quickstart   run the quickstart on the embedded store (no services needed)
#   scripts/dev.sh test         fmt, clippy, docs and the whole test suite
#
# Both first make sure the Debian packages the native builds need are present: RocksDB's build
# runs bindgen (libclang), librdkafka's needs a C toolchain. As root they are installed with
# apt-get; otherwise the exact command is printed and the script stops.
#
# Tests run against librdkafka's in-process mock cluster unless KAFKA_BOOTSTRAP_SERVERS is set
# (for example to the docker/ compose stack), in which case they use that cluster.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

ensure_packages() {
    local missing=()
    local pkg
    for pkg in libclang-dev build-essential pkg-config zlib1g-dev; do
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
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

case "${1:-}" in
    quickstart)
        ensure_packages
        exec cargo run --example quickstart
        ;;
    test)
        ensure_packages
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
        cargo test --all-features
        log "quickstart"
        cargo run --quiet --example quickstart
        log "all checks passed in $(( $(date +%s) - start ))s"
        ;;
    *)
        echo "usage: $0 quickstart|test" >&2
        exit 2
        ;;
esac
