#!/usr/bin/env bash
# Forwarding rate over the same DPDK vdevs, in one run, one polling core for
# the device under test:
#
#   generator  dpdk-testpmd txonly on virtio_user0 (vhost-user server):
#              64-byte UDP 10.1.0.20:40000 -> 10.1.0.100:80 (one flow)
#   DUT 1      dpdk-testpmd io forwarding from net_vhost0 to net_null0
#   DUT 2      pollux run with net_vhost0 (the client VM) and net_null0 (the
#              DIP): parse, flow-table hit, DNAT 10.1.0.100:80 ->
#              10.1.0.4:8080 with both checksums, MAC rewrite, TTL
#
# The generator has CPU 0, the DUT CPU 1. Both DUTs send everything they
# take to a net_null sink (no-rx), so the rate at which the generator can
# post packets into the vhost ring — its Tx-pps — is the DUT's forwarding
# rate. (A testpmd sink on the generator's CPU would be time-sliced and
# lose the comparison to its own ring size.)
#
# Usage (root, a build with the dpdk feature):
#   cargo build --release --features dpdk && sudo benches/dpdk_vs_testpmd.sh [seconds, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
[ "$(id -u)" -eq 0 ] || { echo "needs root (DPDK runtime directory)"; exit 2; }
command -v dpdk-testpmd >/dev/null || { echo "needs dpdk-testpmd (apt-get install dpdk-dev)"; exit 2; }
bin=target/release/pollux
[ -x "$bin" ] || { echo "build first: cargo build --release --features dpdk"; exit 2; }

tmp=$(mktemp -d /tmp/pollux-dpdk-bench.XXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$tmp"; rm -rf /var/run/dpdk/pxb-*
}
trap cleanup EXIT

eal=(--no-huge -m 512 --no-pci --log-level=error)
peers() { # start the generator (vhost-user server) on CPU 0
    rm -f "$tmp"/*.sock
    dpdk-testpmd --lcores=0@0,1@0 "${eal[@]}" --file-prefix=pxb-gen \
        --vdev="virtio_user0,path=$tmp/in.sock,server=1,queues=1,mac=02:00:00:00:00:20" -- \
        --total-num-mbufs=16384 --nb-cores=1 --forward-mode=txonly \
        --tx-ip=10.1.0.20,10.1.0.100 --tx-udp=40000,80 --eth-peer=0,12:34:56:78:9a:bc \
        --stats-period=1 > "$tmp/gen.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        [ -S "$tmp/in.sock" ] && return 0
        sleep 0.1
    done
    echo "testpmd peers did not start"; cat "$tmp"/*.log; exit 1
}

stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    sleep 1
}

# Mean of the generator's Tx-pps over the last $secs reports.
rate() {
    tr -d '\000' < "$tmp/gen.log" | awk '/Tx-pps:/ {print $2}' | tail -n "$secs" |
        awk '{ s += $1; n++ } END { if (n) printf "%.0f", s / n; else print 0 }'
}

# --- DUT 1: testpmd io forwarding ------------------------------------------
peers
dpdk-testpmd --lcores=0@1,1@1 "${eal[@]}" --file-prefix=pxb-dut \
    --vdev="net_vhost0,iface=$tmp/in.sock,client=1" \
    --vdev="net_null0,no-rx=1" -- \
    --total-num-mbufs=16384 --nb-cores=1 --forward-mode=io --port-topology=paired \
    --stats-period=1 > "$tmp/dut.log" 2>&1 &
pids+=($!)
sleep $((secs + 3))
testpmd_pps=$(rate)
stop_all

# --- DUT 2: pollux ---------------------------------------------------------------
peers
cat > "$tmp/pollux.toml" <<EOF
[dpdk]
eal_args = ["--no-huge", "-m", "512", "--no-pci", "-l", "1", "--log-level=error", "--file-prefix=pxb-pollux"]
[[port]]
name = "client"
driver = "dpdk"
devargs = "net_vhost0,iface=$tmp/in.sock,client=1"
[[port]]
name = "dip"
driver = "dpdk"
devargs = "net_null0,no-rx=1"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vm]]
name = "client"
port = "client"
vnet = "a"
mac = "02:00:00:00:00:20"
ips = ["10.1.0.20"]
[[vm]]
name = "dip"
port = "dip"
vnet = "a"
mac = "02:00:00:00:00:04"
ips = ["10.1.0.4"]
[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "udp"
backends = [ { vm = "dip", port = 8080 } ]
EOF
"$bin" run --config "$tmp/pollux.toml" > "$tmp/pollux.out" 2> "$tmp/pollux.err" &
pids+=($!)
sleep $((secs + 3))
pollux_pps=$(rate)
stop_all

echo "64-byte UDP, one flow, generator on CPU 0, device under test on CPU 1, ${secs}s"
printf '%-44s %12s\n' "device under test" "Mpps"
awk -v t="$testpmd_pps" -v p="$pollux_pps" 'BEGIN {
    printf "%-44s %12.2f\n", "dpdk-testpmd io forwarding (no processing)", t / 1e6
    printf "%-44s %12.2f\n", "pollux (parse, flow hit, DNAT, MACs, TTL)", p / 1e6
    if (t > 0) printf "ratio pollux / testpmd io: %.2f\n", p / t
}'
grep -E "^stopped|^port|^switch drops" "$tmp/pollux.out" || true
