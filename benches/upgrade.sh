#!/usr/bin/env bash
# What an upgrade of pollux costs the traffic crossing it, in one run:
#
#   1. hitless: `pollux run --takeover` replaces the running pollux N times
#      (default 10) while downloads cross it (through a VIP and through
#      SNAT) and a UDP stream sends one datagram a millisecond VM to VM;
#   2. restart: the same traffic, pollux stopped (SIGTERM) and started
#      again N/2 times, as an upgrade without takeover would be;
#   3. with OVS=N: pollux stopped for good and Open vSwitch's user-space
#      datapath (the one OVS-DPDK runs: its own connection tracking and
#      NAT, here on the same veths as system ports) doing the same VIP
#      DNAT and SNAT, its ovs-vswitchd restarted N times and its flows
#      added again each time (as `ovs-ctl restart` restores them).
#
# For each upgrade: the blackout the successor counts (from its
# predecessor's workers' stop to its own workers' start) and the longest
# silence of the UDP stream; at the end, downloads completed intact and
# UDP datagrams lost. Release build, af_packet ports and two workers
# (DRIVER=af_xdp: af_xdp ports and one worker). Every namespace and veth
# is created here and removed on exit.
#
# Usage (root): benches/upgrade.sh [upgrades, default 10]
# (RESTARTS=N: restarts in the second phase, default half the upgrades;
# DRIVER=af_packet|af_xdp; OVS=N restarts of OVS in a third phase, for
# which it installs openvswitch-switch-dpdk; KEEP=1 keeps the scratch
# directory with the UDP arrivals.)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
driver="${DRIVER:-af_packet}"
case "$driver" in
    af_packet) workers=2 ;;
    af_xdp) workers=1 ;;
    *) echo "DRIVER must be af_packet or af_xdp"; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces, packet sockets)"; exit 2; }
pkgs=()
command -v curl >/dev/null || pkgs+=(curl)
command -v ethtool >/dev/null || pkgs+=(ethtool)
command -v python3 >/dev/null || pkgs+=(python3)
[ "${OVS:-0}" -eq 0 ] || [ -x /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk ] || pkgs+=(openvswitch-switch-dpdk)
if ((${#pkgs[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
cargo build --release -q --bin pollux
bin=$PWD/target/release/pollux

id=$$
tmp=$(mktemp -d /tmp/pollux-upgrade.XXXX)
nsl=()
pids=()
cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    [ -z "${ovs_pids:-}" ] || kill $ovs_pids 2>/dev/null
    pkill -f "pollux run --takeover $tmp" 2>/dev/null
    pkill -f "pollux run --config $tmp" 2>/dev/null
    for ns in "${nsl[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    [ -n "${KEEP:-}" ] || rm -rf "$tmp"
}
trap cleanup EXIT
trap "exit 1" INT TERM

mkns() { # TAG IP/LEN MAC GW
    local ns="pu${id}$1"
    ip netns add "$ns"; nsl+=("$ns")
    ip link add "$ns-h" type veth peer name eth0 netns "$ns"
    sysctl -qw "net.ipv6.conf.$ns-h.disable_ipv6=1" || true
    ip link set "$ns-h" up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set eth0 address "$3"
    ip netns exec "$ns" ip addr add "$2" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    [ -z "$4" ] || ip netns exec "$ns" ip route add default via "$4"
    ip netns exec "$ns" ethtool -K eth0 tso off gso off gro off >/dev/null
    # XDP sees no "checksum not ready" mark: senders fill theirs in.
    [ "$driver" != af_xdp ] || ip netns exec "$ns" ethtool -K eth0 tx off >/dev/null
}
in_ns() { local t=$1; shift; ip netns exec "pu${id}$t" "$@"; }

mkns s1 10.1.0.4/16 02:00:00:00:01:04 10.1.0.1
mkns s2 10.1.0.5/16 02:00:00:00:01:05 10.1.0.1
mkns cl 10.1.0.20/16 02:00:00:00:01:20 10.1.0.1
mkns cb 10.2.0.20/16 02:00:00:00:02:20 10.2.0.1
mkns wr 198.51.100.10/24 02:00:00:00:03:10 ""
in_ns wr ip neigh add 198.51.100.1 lladdr 02:50:4c:58:ff:ff dev eth0
# Small client receive buffers: rate-limited downloads keep bytes in flight.
in_ns cl sysctl -qw net.ipv4.tcp_rmem="4096 32768 65536"
in_ns cb sysctl -qw net.ipv4.tcp_rmem="4096 32768 65536"

head -c $((3 << 20)) /dev/urandom > "$tmp/big"
echo ok > "$tmp/health"
for s in s1:10.1.0.4 s2:10.1.0.5 wr:198.51.100.10; do
    in_ns "${s%%:*}" python3 -m http.server 8000 --bind "${s#*:}" --directory "$tmp" > /dev/null 2>&1 &
    pids+=($!)
done

sock=$tmp/ctl.sock
{
    printf '[control]\nsocket = "%s"\n[dataplane]\nworkers = %s\nidle_sleep_us = 20\n' "$sock" "$workers"
    for p in s1 s2 cl cb wr; do
        printf '[[port]]\nname = "%s"\ndriver = "%s"\niface = "pu%s%s-h"\n' "$p" "$driver" "$id" "$p"
    done
    cat <<'EOF'
[uplink]
port = "wr"
next_hop_mac = "02:00:00:00:03:10"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vnet]]
name = "b"
prefixes = ["10.2.0.0/16"]
gateway_mac = "12:34:56:78:9a:bd"
[vnet.snat]
public_ips = ["198.51.100.50"]
[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { vm = "s1", port = 8000 }, { vm = "s2", port = 8000 } ]
[vip.probe]
kind = "http"
port = 8000
path = "/health"
interval_ms = 200
timeout_ms = 150
[[vm]]
name = "s1"
port = "s1"
vnet = "a"
mac = "02:00:00:00:01:04"
ips = ["10.1.0.4"]
[[vm]]
name = "s2"
port = "s2"
vnet = "a"
mac = "02:00:00:00:01:05"
ips = ["10.1.0.5"]
[[vm]]
name = "cl"
port = "cl"
vnet = "a"
mac = "02:00:00:00:01:20"
ips = ["10.1.0.20"]
[[vm]]
name = "cb"
port = "cb"
vnet = "b"
mac = "02:00:00:00:02:20"
ips = ["10.2.0.20"]
EOF
} > "$tmp/pollux.toml"

api() { curl -s --unix-socket "$sock" "http://pollux$1"; }
start_pollux() {
    "$bin" run --config "$tmp/pollux.toml" >> "$tmp/pollux.out" 2>> "$tmp/pollux.log" &
    pollux_pid=$!
    for _ in $(seq 300); do
        api /v1/probes 2>/dev/null | python3 -c 'import json,sys; p=json.load(sys.stdin)["probes"]; sys.exit(0 if len(p)==2 and all(x["up"] for x in p) else 1)' 2>/dev/null && return 0
        sleep 0.1
    done
    cat "$tmp/pollux.log"; echo "pollux did not come up"; exit 1
}
start_pollux

cat > "$tmp/sink.py" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.1.0.4", 9000))
out = open(sys.argv[1], "w", buffering=1)
while True:
    d, _ = s.recvfrom(64)
    out.write("%.6f %s\n" % (time.time(), d.decode()))
EOF
cat > "$tmp/source.py" <<'EOF'
import socket, sys, time, os
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, t = 0, time.monotonic()
while not os.path.exists(sys.argv[1]):
    s.sendto(str(n).encode(), ("10.1.0.4", 9000))
    n += 1
    t += 0.001
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)
EOF
cat > "$tmp/gaps.py" <<'EOF'
import sys
arr = []
for l in open(sys.argv[1]):
    t, k = l.split()
    arr.append((float(t), int(k)))
for l in open(sys.argv[2]):
    label, a, b, blackout = l.split()
    a, b = float(a), float(b)
    g = max([(y[0] - x[0]) * 1000 for x, y in zip(arr, arr[1:]) if y[0] >= a and x[0] <= b] or [0])
    print("%-10s %12s %16.1f" % (label, blackout, g))
# From the first datagram the sink got (the source may start first).
seen = sorted(set(k for _, k in arr))
span = seen[-1] - seen[0] + 1 if seen else 0
print("UDP datagrams %d (from the first received), lost %d" % (span, span - len(seen)))
EOF

# phase LABEL COUNT ACTION: downloads and the UDP stream across COUNT
# actions (upgrade or restart), one every 2 s.
phase() {
    local label=$1 count=$2 action=$3
    rm -f "$tmp/stop" "$tmp"/dl-* "$tmp/udp-$label.log"
    # (`ip netns exec` execs python: $! is python's pid.)
    ip netns exec "pu${id}s1" python3 "$tmp/sink.py" "$tmp/udp-$label.log" & pids+=($!); local sink=$!
    ip netns exec "pu${id}cl" python3 "$tmp/source.py" "$tmp/stop" & pids+=($!)
    local rate=$((3 * 1024 / (2 * count + 6)))k
    for i in $(seq 0 14); do
        local ns=cl url=http://10.1.0.100/big
        [ "$i" -lt 10 ] || { ns=cb; url=http://198.51.100.10:8000/big; }
        (set +e; in_ns "$ns" curl -sS --max-time 600 --speed-limit 1 --speed-time 20 --limit-rate "$rate" -o "$tmp/dl-$i" "$url" 2> "$tmp/dl-$i.err"; echo $? > "$tmp/dl-$i.rc") &
    done
    sleep 3
    : > "$tmp/windows"
    for k in $(seq 1 "$count"); do
        local a b old=$pollux_pid
        a=$(date +%s.%N)
        if [ "$action" = ovs ]; then
            ovs_restart
            us=-
        elif [ "$action" = upgrade ]; then
            "$bin" run --takeover "$sock" >> "$tmp/pollux.out" 2>> "$tmp/pollux.log" &
            pollux_pid=$!
            while kill -0 "$old" 2>/dev/null; do sleep 0.01; done
            for _ in $(seq 500); do
                api /v1/status 2>/dev/null | grep -q "\"from_pid\":$old" && break
                sleep 0.01
            done
            local us
            us=$(api /v1/status | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["takeover"]["blackout_us"] / 1000))')
        else
            kill -TERM "$old"; wait "$old" || true
            start_pollux
            us=-
        fi
        b=$(date +%s.%N)
        echo "$label-$k $a $b $us" >> "$tmp/windows"
        sleep 2
    done
    local ok=0 broken=0
    for i in $(seq 0 14); do
        while [ ! -e "$tmp/dl-$i.rc" ]; do sleep 0.2; done
        if [ "$(cat "$tmp/dl-$i.rc")" = 0 ] && cmp -s "$tmp/dl-$i" "$tmp/big"; then ok=$((ok + 1)); else broken=$((broken + 1)); fi
    done
    touch "$tmp/stop"; sleep 0.5; kill "$sink" 2>/dev/null || true; wait "$sink" 2>/dev/null || true
    printf '%-10s %12s %16s\n' "$label" "blackout ms" "UDP silence ms"
    python3 "$tmp/gaps.py" "$tmp/udp-$label.log" "$tmp/windows"
    echo "downloads (10 through the VIP, 5 through SNAT): $ok intact, $broken broken or cut short"
    echo
}

echo "$driver ports, $workers worker(s)"
echo "$("$bin" --version); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $(date -u +%F)"
phase upgrade "$n" upgrade
restarts="${RESTARTS:-$(((n + 1) / 2))}"
[ "$restarts" -eq 0 ] || phase restart "$restarts" restart

ovs="${OVS:-0}"
[ "$ovs" -gt 0 ] || exit 0
vswitchd=/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk
kill -TERM "$pollux_pid"; wait "$pollux_pid" || true
od=$tmp/ovs
mkdir -p "$od"
export OVS_RUNDIR=$od OVS_DBDIR=$od OVS_LOGDIR=$od OVS_SYSCONFDIR=$od
ovsdb-tool create "$od/conf.db" /usr/share/openvswitch/vswitch.ovsschema
ovsdb-server "$od/conf.db" --remote="punix:$od/db.sock" --unixctl="$od/ovsdb.ctl" > "$od/ovsdb.log" 2>&1 &
ovs_pids=$!
vsctl() { ovs-vsctl --db="unix:$od/db.sock" --timeout=30 "$@"; }
until vsctl --no-wait init 2>/dev/null; do sleep 0.1; done
vswitchd_start() {
    "$vswitchd" "unix:$od/db.sock" --unixctl="$od/vswitchd.ctl" >> "$od/vswitchd.log" 2>&1 &
    vswitchd_pid=$!
    ovs_pids="$ovs_pids $vswitchd_pid"
    until ovs-appctl -t "$od/vswitchd.ctl" version >/dev/null 2>&1; do sleep 0.01; done
}
vswitchd_start
vsctl add-br br0 -- set bridge br0 datapath_type=netdev fail_mode=secure
for p in s1 s2 cl cb wr; do
    vsctl add-port br0 "pu${id}$p-h"
    # OVS's user-space datapath gets no "checksum not ready" mark either.
    in_ns "$p" ethtool -K eth0 tx off >/dev/null
done
# The VIP's and gateways' MACs (pollux answers ARP for them).
in_ns cl ip neigh replace 10.1.0.100 lladdr 12:34:56:78:9a:bc dev eth0
in_ns cb ip neigh replace 10.2.0.1 lladdr 12:34:56:78:9a:bd dev eth0
in_ns wr ip neigh replace 198.51.100.50 lladdr 02:50:4c:58:ff:ff dev eth0
port() { echo "pu${id}$1-h"; }
cat > "$tmp/flows" <<FLOWS
table=0,priority=100,tcp,nw_dst=10.1.0.100,tp_dst=80,actions=ct(commit,nat(dst=10.1.0.4-10.1.0.5:8000),table=1)
table=0,priority=100,tcp,nw_src=10.1.0.4,tp_src=8000,actions=ct(nat,table=1)
table=0,priority=100,tcp,nw_src=10.1.0.5,tp_src=8000,actions=ct(nat,table=1)
table=0,priority=100,ip,in_port=$(port cb),actions=ct(commit,nat(src=198.51.100.50),table=1)
table=0,priority=100,ip,in_port=$(port wr),nw_dst=198.51.100.50,actions=ct(nat,table=1)
table=0,priority=50,ip,actions=resubmit(,1)
table=0,priority=0,actions=NORMAL
table=1,ip,nw_dst=10.1.0.4,actions=mod_dl_dst:02:00:00:00:01:04,output:$(port s1)
table=1,ip,nw_dst=10.1.0.5,actions=mod_dl_dst:02:00:00:00:01:05,output:$(port s2)
table=1,ip,nw_dst=10.1.0.20,actions=mod_dl_dst:02:00:00:00:01:20,output:$(port cl)
table=1,ip,nw_dst=10.2.0.20,actions=mod_dl_src:12:34:56:78:9a:bd,mod_dl_dst:02:00:00:00:02:20,output:$(port cb)
table=1,ip,nw_dst=198.51.100.10,actions=mod_dl_src:02:50:4c:58:ff:ff,mod_dl_dst:02:00:00:00:03:10,output:$(port wr)
FLOWS
flows() { ovs-ofctl add-flows "unix:$od/br0.mgmt" "$tmp/flows"; }
until flows 2>/dev/null; do sleep 0.05; done
ovs_restart() {
    ovs-appctl -t "$od/vswitchd.ctl" exit >/dev/null 2>&1 || kill "$vswitchd_pid"
    wait "$vswitchd_pid" 2>/dev/null || true
    vswitchd_start
    until flows 2>/dev/null; do sleep 0.01; done
}
for _ in $(seq 100); do
    in_ns cl curl -sf --max-time 1 -o /dev/null http://10.1.0.100/health && break
    sleep 0.1
done
in_ns cb curl -sf --max-time 2 -o /dev/null http://198.51.100.10:8000/health || { echo "OVS does not forward"; exit 1; }
echo "Open vSwitch $(ovs-vsctl --version | head -1 | awk '{print $NF}'), user-space datapath, the same traffic:"
phase ovs "$ovs" ovs
