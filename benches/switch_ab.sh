#!/usr/bin/env bash
# Compares two builds of the switch bench on the same machine in the same
# minutes: for each benchmark, ROUNDS pairs of runs (before, then after, one
# benchmark at a time, so slow drifts of a noisy machine hit both sides
# alike); prints each run's median throughput and each pair's ratio
# after/before. Compare the ratios, not the absolute figures.
#
#   benches/switch_ab.sh BEFORE_BENCH_BINARY AFTER_BENCH_BINARY [ROUNDS] [BENCHES...]
#
# Build each side with `cargo bench --bench switch --no-run` (in a worktree
# of the old commit for BEFORE, with its own CARGO_TARGET_DIR); the binaries
# are target/release/deps/switch-<hash>. The default benches are
# fast_path/{1000,100000,1000000} and new_flows/{slow_path,steady_state}.
set -euo pipefail
before="$1"
after="$2"
rounds="${3:-3}"
shift $(($# < 3 ? $# : 3))
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
    benches=(fast_path/1000 fast_path/100000 fast_path/1000000 new_flows/slow_path new_flows/steady_state)
fi
# Median throughput of one benchmark, in elements per second.
run() {
    "$1" --bench --noplot --warm-up-time 1 --measurement-time 2 "^$2\$" 2>&1 |
        awk '/thrpt:/ && /elem/ {
            v = $4; u = $5
            m = (u ~ /^G/) ? 1e9 : (u ~ /^M/) ? 1e6 : (u ~ /^K/) ? 1e3 : 1
            printf "%.0f\n", v * m; exit }'
}
for b in "${benches[@]}"; do
    for i in $(seq "$rounds"); do
        x=$(run "$before" "$b")
        y=$(run "$after" "$b")
        awk -v b="$b" -v i="$i" -v x="$x" -v y="$y" \
            'BEGIN { printf "%-28s round %s  before %12.0f/s  after %12.0f/s  after/before %.3f\n", b, i, x, y, y / x }'
    done
done
