#!/usr/bin/env bash
# The end-to-end tests (network namespaces, kernel ports, DPDK, control API,
# pktgen) run RUNS times in a row (default 5) while one busy loop per core
# (`sh -c 'while :; do :; done'`) competes with them: the timing-sensitive
# tests must wait on states, never on luck. Needs what scripts/test.sh
# installs, and root (run it in a root shell, where cargo is on PATH);
# missing tools fail the run (POLLUX_REQUIRE_TOOLS=1).
#
#   scripts/stress-e2e.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
export POLLUX_REQUIRE_TOOLS=1
filter='binary(netns_e2e) | binary(netns_ipv6) | binary(dpdk_vhost) | binary(pktgen) | binary(cli_run) | binary(kernel_ports) | binary(control_api)'
# Built before the load starts: the runs time the tests, not the compiler.
cargo nextest run --workspace --all-features --no-run
busy=()
for _ in $(seq "$(nproc)"); do
    sh -c 'while :; do :; done' &
    busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null || true' EXIT
for i in $(seq "$runs"); do
    printf '\n==> run %s of %s, %s busy loops\n' "$i" "$runs" "${#busy[@]}"
    cargo nextest run --workspace --all-features --no-fail-fast -E "$filter"
done
printf '\n==> %s runs passed under load\n' "$runs"
