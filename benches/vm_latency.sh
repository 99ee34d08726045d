#!/usr/bin/env bash
# VM-to-VM UDP round trip (one message in flight: p50/p99/p99.9) and TCP
# throughput between two QEMU guests, in one run, through a Linux bridge
# with taps, pollux on vhost-user, and OVS-DPDK on vhost-user
# (benches/vm_latency.rs says how). Prints a Markdown table naming the
# accelerator the guests ran on.
#
#   benches/vm_latency.sh [SECONDS per measurement, default 10]
#
# Needs root, QEMU (scripts/test.sh installs it), and sockperf, iperf3 and
# openvswitch-switch-dpdk:
#   apt-get install sockperf iperf3 openvswitch-switch-dpdk
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "needs root (namespaces, taps, DPDK)"; exit 2; }
for t in qemu-system-x86_64 sockperf iperf3 ovsdb-tool /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk; do
    command -v "$t" >/dev/null || [ -x "$t" ] || {
        echo "needs $t (apt-get install sockperf iperf3 openvswitch-switch-dpdk; QEMU from scripts/test.sh)"
        exit 2
    }
done
exec cargo bench --features dpdk --bench vm_latency -- "${1:-10}"
