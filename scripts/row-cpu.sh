#!/usr/bin/env bash
# CPU per record of one throughput row, inside the row's measured window only:
#
#   scripts/row-cpu.sh <throughput-binary> <row>      e.g. framework-noop
#
# Runs the benchmark binary (target/release/deps/throughput-*, built by `scripts/dev.sh bench`
# or `cargo bench --all-features --bench throughput --no-run`) with THROUGHPUT_WINDOW=1 under
# `perf record -k CLOCK_MONOTONIC`, keeps the samples inside the printed window, and prints the
# row's ratio to raw and the CPU per record of all threads and of tokio's workers. A single run
# is noisy on a shared machine: alternate two binaries several times and compare medians.
set -euo pipefail
bin=$1
row=$2
data=$(mktemp)
trap 'rm -f "$data" "$data.report"' EXIT
out=$(THROUGHPUT_WINDOW=1 perf record -q -k CLOCK_MONOTONIC -F 4000 -o "$data" "$bin" --rows "$row" 2>&1)
window=$(echo "$out" | grep "window from" \
    | sed -E 's/.*tv_sec: ([0-9]+), tv_nsec: ([0-9]+).*tv_sec: ([0-9]+), tv_nsec: ([0-9]+).*/\1 \2 \3 \4/')
read -r s1 n1 s2 n2 <<< "$window"
from=$(printf "%d.%06d" "$s1" $((10#$n1 / 1000)))
to=$(printf "%d.%06d" "$s2" $((10#$n2 / 1000)))
ratio=$(echo "$out" | grep "BENCH ratio" | head -1 | sed -E 's/.*=([0-9.]+) target.*/\1/')
records=$(echo "$out" | grep "BENCH name=$row " | sed -E 's/.*records=([0-9]+).*/\1/')
perf report -q -i "$data" --time "$from,$to" --sort comm --stdio -F sample,comm 2>/dev/null > "$data.report"
awk -v row="$row" -v ratio="$ratio" -v n="$records" '
    { all += $1 } /tokio-rt-worker/ { workers += $1 }
    END { printf "%s ratio=%s all_us_per_record=%.2f workers_us_per_record=%.2f\n",
          row, ratio, all / 4000 * 1e6 / n, workers / 4000 * 1e6 / n }' "$data.report"
