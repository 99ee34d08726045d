#!/usr/bin/env bash
# Runs one fuzz target for a long time and prints how many executions it
# made, for the figures in docs/fuzzing.md.
#
#   scripts/fuzz-long.sh [TARGET] [SECONDS] [JOBS]
#
# TARGET defaults to `switch` (the whole pipeline), SECONDS to 3600, JOBS
# (parallel fuzzing processes) to 1. Needs cargo-fuzz (scripts/test.sh
# installs it). Exits non-zero, naming the artifact, if a run crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-switch}"
secs="${2:-3600}"
jobs="${3:-1}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "fuzzing $target for ${secs}s with $jobs job(s); log: $log"
status=0
RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -jobs="$jobs" -workers="$jobs" \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
# libFuzzer prints "stat::number_of_executed_units: N" per process at the end.
runs=$(awk '/stat::number_of_executed_units:/ { n += $2 } END { print n + 0 }' "$log" fuzz-*.log 2>/dev/null || true)
rm -f fuzz-*.log
echo "$target: $runs executions in ${secs}s, exit status $status"
if [ "$status" -ne 0 ]; then
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -20
    exit "$status"
fi
