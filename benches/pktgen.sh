#!/usr/bin/env bash
# `pollux pktgen` measurements recorded in docs/performance.md:
#
#   1. calibration on an in-process ring pair (the generator's own bias);
#   2. through pollux in process (examples/pktgen-ring.toml: 1 000 UDP flows
#      to a VIP, outbound + inbound ACL, DNAT, routing): NDR/PDR search,
#      then latency at 10/50/90% of the NDR;
#   with a dpdk build and root, also:
#   3. calibration back to back over DPDK (two net_memif ports of the
#      generator connected to each other);
#   4. through `pollux run` over DPDK vhost-user: pktgen's virtio_user ports
#      are the client VM and the DIP; same search.
#
# The generator gets CPU 0, pollux's worker CPU 1.
# Usage: cargo build --release [--features dpdk] && benches/pktgen.sh [trial seconds, default 1]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-1}"
bin=target/release/pollux
[ -x "$bin" ] || { echo "build first: cargo build --release [--features dpdk]"; exit 2; }
tmp=$(mktemp -d /tmp/pollux-pktgen-bench.XXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp" /var/run/dpdk/pgb-*
}
trap cleanup EXIT
run() { echo; echo "\$ pollux $*"; "$bin" "$@" 2>/dev/null; }

run pktgen --calibrate --duration "$secs" --warmup 0.5
run pktgen --config examples/pktgen-ring.toml --tx ring:gen --rx ring:sink \
    --dst-ip 10.1.0.100 --flows 1000 --search --duration "$secs" --warmup 0.5

if [ "$(id -u)" -ne 0 ] || ! ldd "$bin" | grep -q librte_eal; then
    echo; echo "(DPDK runs skipped: need root and a build with --features dpdk)"
    exit 0
fi
eal="--no-huge -m 1024 --no-pci -l 0 --log-level=error"
run pktgen --calibrate --eal "$eal --file-prefix=pgb-cal" \
    --tx "dpdk:net_memif0,role=server,socket=$tmp/memif.sock,id=0" \
    --rx "dpdk:net_memif1,role=client,socket=$tmp/memif.sock,id=0" \
    --duration "$secs" --warmup 1

cat > "$tmp/pollux.toml" <<TOML
[dpdk]
eal_args = ["--no-huge", "--no-pci", "-m", "512", "-l", "1", "--log-level=error", "--file-prefix=pgb-sw"]
[[port]]
name = "client"
driver = "dpdk"
devargs = "net_vhost0,iface=$tmp/client.sock"
[[port]]
name = "dip1"
driver = "dpdk"
devargs = "net_vhost1,iface=$tmp/dip1.sock"
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
name = "dip1"
port = "dip1"
vnet = "a"
mac = "02:00:00:00:00:04"
ips = ["10.1.0.4"]
[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "udp"
backends = [ { vm = "dip1", port = 8080 } ]
TOML
taskset -c 1 "$bin" run --config "$tmp/pollux.toml" > "$tmp/pollux.out" 2> "$tmp/pollux.err" &
pids+=($!)
for _ in $(seq 100); do [ -S "$tmp/dip1.sock" ] && break; sleep 0.1; done
run pktgen --eal "$eal --file-prefix=pgb-gen" \
    --tx "dpdk:virtio_user0,path=$tmp/client.sock,mac=02:00:00:00:00:20" \
    --rx "dpdk:virtio_user1,path=$tmp/dip1.sock,mac=02:00:00:00:00:04" \
    --src-ip 10.1.0.20 --dst-ip 10.1.0.100 --dst-mac 12:34:56:78:9a:bc --dport 80 \
    --flows 1000 --search --duration "$secs" --warmup 1
kill "${pids[0]}"; wait "${pids[0]}" || true; pids=()
echo; echo "pollux run's report:"; cat "$tmp/pollux.out"
