#!/usr/bin/env bash
# Runs one fuzz target for a long time and prints how many executions it
# made (the figure docs/fuzzing.md records).
#
#   scripts/fuzz-long.sh [TARGET] [SECONDS] [JOBS] [RUNS]
#
# TARGET defaults to `switch` (the whole pipeline), SECONDS to 3600, JOBS
# (parallel fuzzing processes) to 1. RUNS, if given, ends each process
# after that many executions (whichever of SECONDS and RUNS comes first):
# `switch 20000 2 50000000` makes 100 million executions. POLLUX_FUZZ_SANITIZER picks
# cargo-fuzz's sanitizer (default `address`; `none` runs several times
# faster: the code under test is safe Rust apart from the ring and pool
# internals, which the short runs under ASan keep covering). Needs
# cargo-fuzz (scripts/test.sh installs it). Exits non-zero, naming what
# libFuzzer reported, if a run crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-switch}"
secs="${2:-3600}"
jobs="${3:-1}"
runs="${4:--1}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fuzzing $target for ${secs}s with $jobs job(s)"
args=(-max_total_time="$secs" -runs="$runs" -rss_limit_mb=4096 -print_final_stats=1)
if [ "$jobs" -gt 1 ]; then
    # Several processes: each writes its own log in the working directory.
    args+=(-jobs="$jobs" -workers="$jobs")
fi
status=0
start=$(date +%s)
sanitizer="${POLLUX_FUZZ_SANITIZER:-address}"
echo "sanitizer: $sanitizer"
(cd "$work" && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer "$sanitizer" --fuzz-dir "$OLDPWD/fuzz" "$target" -- "${args[@]}") \
    >"$work/main.log" 2>&1 || status=$?
# With several processes each writes its own log and the main log repeats
# their final statistics: count each process once.
if [ "$jobs" -gt 1 ]; then
    logs=("$work"/fuzz-*.log)
else
    logs=("$work"/main.log)
fi
# libFuzzer prints "stat::number_of_executed_units: N" per process at the end.
total=$(awk '/stat::number_of_executed_units:/ { n += $2 } END { print n + 0 }' "${logs[@]}")
echo "$target: $total executions in $(($(date +%s) - start))s, exit status $status"
if [ "$status" -ne 0 ]; then
    grep -hE "panicked|ERROR|SUMMARY|Test unit written" "${logs[@]}" | head -20
    exit "$status"
fi
