#!/usr/bin/env bash
# Compares two builds of the switch bench on the same machine in the same
# minutes: for each benchmark, ROUNDS pairs of runs (before, then after, one
# benchmark at a time, so slow drifts of a noisy machine hit both sides
# alike); prints each run's median throughput and each pair's ratio
# after/before. Compare the ratios, not the absolute figures. Each run also
# gives the throughput of its fastest tenth of criterion's samples ("p10"):
# a host that steals time from the guest slows some samples, never speeds
# one up, so on a noisy machine that figure moves much less than the median.
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
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
# Median throughput of one benchmark and that of its fastest tenth of
# samples, in elements per second.
run() {
    local median
    median=$(CRITERION_HOME="$home" "$1" --bench --noplot --warm-up-time 1 --measurement-time 2 "^$2\$" 2>&1 |
        awk '/thrpt:/ && /elem/ {
            v = $4; u = $5
            m = (u ~ /^G/) ? 1e9 : (u ~ /^M/) ? 1e6 : (u ~ /^K/) ? 1e3 : 1
            printf "%.0f\n", v * m; exit }')
    python3 - "$home/$2/new" "$median" <<'PY'
import json, sys
d = sys.argv[1]
s = json.load(open(d + "/sample.json"))
n = json.load(open(d + "/benchmark.json"))["throughput"]["Elements"]
per = sorted(t / i for t, i in zip(s["times"], s["iters"]))
print(sys.argv[2], round(n / per[len(per) // 10] * 1e9))
PY
}
for b in "${benches[@]}"; do
    for i in $(seq "$rounds"); do
        read -r x xb < <(run "$before" "$b")
        read -r y yb < <(run "$after" "$b")
        awk -v b="$b" -v i="$i" -v x="$x" -v y="$y" -v xb="$xb" -v yb="$yb" \
            'BEGIN { printf "%-26s round %s  median before %11.0f/s after %11.0f/s ratio %.3f  p10 before %11.0f/s after %11.0f/s ratio %.3f\n", b, i, x, y, y / x, xb, yb, yb / xb }'
    done
done
