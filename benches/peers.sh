#!/usr/bin/env bash
# pollux beside its peers over the same vhost-user path, in one run:
#
#   generator  `pollux pktgen` on CPU 0, two virtio_user ports (the client
#              and the server side), unpaced 64-byte UDP; what comes back
#              on the server side is the device's forwarding rate
#   DUT        on CPU 1, owning both vhost-user sockets (net_vhost /
#              dpdkvhostuser, server mode), one polling core:
#     1. dpdk-testpmd io forwarding (touches no packet byte)
#     2. OVS-DPDK, plain forwarding (in_port -> output, one flow rule)
#     3. OVS-DPDK, VIP load balancing as OVN does it: ct(nat) lookup, a
#        select group of three backends whose buckets ct(commit, nat(dst))
#        the new connections, MACs set, output
#     4. pollux, plain routing (client VM -> server VM: conntrack, route, MACs, TTL)
#     5. pollux, the VIP (3 backends, Maglev, conntrack, DNAT, MACs, TTL)
#     6. and 7. (`own`) pollux as 4. and 5. on its own vhost_user ports
#        (no DPDK in pollux): these connect, as to a QEMU, to sockets the
#        generator's virtio_user ports own (server=1)
#   at 1, 10 000 and 1 000 000 flows (16 client addresses x source ports,
#   each flow a connection for the load balancers).
#
# Busy cycles per packet: testpmd's own (`--record-core-cycles`, printed
# when it stops), OVS's "avg processing cycles per packet" from
# `dpif-netdev/pmd-stats-show`, pollux's `cycles_per_packet` from
# `GET /v1/perf`; OVS's
# and pollux's over the measured phase only (reset after the warm-up),
# testpmd's over its whole run (it has no reset; io forwarding keeps no
# state), so a generator-bound run still shows the switch's headroom.
#
# Prints a Markdown section and puts it into docs/performance.md between
# the `peers.sh` markers (WRITE=0: print only).
#
# RATE (pktgen's --rate in packets/s: 4M, 2500k...) paces the trials, so that every
# device is measured at the same offered load: unpaced, a device slower
# than the generator polls full bursts and a faster one smaller bursts,
# and busy cycles per packet differ between the two (each poll's fixed
# costs are shared by fewer packets).
#
# REPEAT=n (default 1) runs each device's trial n times and keeps the one
# with the fewest busy cycles a packet (and its rate): a cloud host that
# gives a vCPU half its speed at times (machine D class does, in stretches
# of 0.1 s to minutes) only ever makes a trial slower, so the best of a
# few makes it likelier that the devices are compared at the same speed.
# Every trial is logged.
#
# DEVICES="testpmd ovs pollux own acl" (the default) chooses which to run
# (`pollux`: on DPDK's net_vhost; `own`: on its own vhost_user ports);
# `acl` compares the classifiers: dpdk-test-acl (rte_acl, scalar and AVX2)
# and pollux's on the same generated rule files and trace at 100, 1 000
# and 10 000 rules (ACL_SIZES), checking that both give every packet the
# same rule.
#
# Usage (root): benches/peers.sh [seconds per trial, default 5] [flow counts, default "1 10000 1000000"]
# Installs what it lacks from Debian (dpdk, dpdk-dev for dpdk-test-acl,
# openvswitch-switch-dpdk, libdpdk-dev and libclang-dev for pollux's dpdk
# build) and builds pollux with --features dpdk.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
[ "$secs" -ge 4 ] || { echo "trials of at least 4 seconds"; exit 2; }
sizes="${2:-1 10000 1000000}"
[ "$(id -u)" -eq 0 ] || { echo "needs root (DPDK, huge pages)"; exit 2; }
# (A percentage would pace each device at a share of its own maximum, after
# an unpaced trial: not one offered load for all.)
[[ "${RATE:-}" != *%* ]] || { echo "RATE: packets/s (4M, 2500k), not a percentage"; exit 2; }
repeat="${REPEAT:-1}"
[[ $repeat =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT: a count of trials (1, 3...)"; exit 2; }

pkgs=()
command -v dpdk-testpmd >/dev/null || pkgs+=(dpdk)
command -v dpdk-test-acl >/dev/null || pkgs+=(dpdk-dev)
[ -x /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk ] || pkgs+=(openvswitch-switch-dpdk)
pkg-config --exists libdpdk 2>/dev/null || pkgs+=(libdpdk-dev pkg-config)
[ -n "$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null)" ] || pkgs+=(libclang-dev)
command -v curl >/dev/null || pkgs+=(curl)
if [ "${#pkgs[@]}" -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}"
fi
# OVS runs its EAL in huge pages (512 MiB); the others run without.
huge_before=$(cat /proc/sys/vm/nr_hugepages)
[ "$huge_before" -ge 512 ] || echo 512 > /proc/sys/vm/nr_hugepages
cargo build --release --features dpdk -q
bin="${CARGO_TARGET_DIR:-target}/release/pollux"

tmp=$(mktemp -d /tmp/pollux-peers.XXXX)
dut_pid=""
ovs_pids=""
cleanup() {
    [ -z "$dut_pid" ] || kill "$dut_pid" 2>/dev/null || true
    [ ! -s "$tmp/testpmd.pid" ] || kill "$(cat "$tmp/testpmd.pid")" 2>/dev/null || true
    # shellcheck disable=SC2086
    [ -z "$ovs_pids" ] || kill $ovs_pids 2>/dev/null || true
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$tmp"
    rm -rf /var/run/dpdk/pp-*
    [ "$huge_before" -ge 512 ] || echo "$huge_before" > /proc/sys/vm/nr_hugepages
}
trap cleanup EXIT

CLIENT_MAC=02:00:00:00:00:20
SERVER_MAC=02:00:00:00:00:04
GW_MAC=12:34:56:78:9a:bc
VIP=10.1.0.100

# The generator's virtio_user ports connect to the device's sockets, or
# (`,server=1`, for pollux's own vhost-user ports, which connect as QEMU's
# clients do) own them.
vu_server=""
gen() { # pktgen from CPU 0 into the sockets $1 (client side) and $2 (server side), towards $3, $4 flows; the rest are pktgen's
    local in=$1 out=$2 dst=$3 flows=$4
    shift 4
    # (A virtio_user server leaves its socket file behind, and cannot bind
    # to one left so.)
    [ -z "$vu_server" ] || rm -f "$in" "$out"
    # (Bounded: a generator that hangs fails its trial, or its ready or
    # fill round, rather than the whole run waiting on it.)
    timeout 300 taskset -c 0 "$bin" pktgen --eal "--no-huge -m 1024 --no-pci -l 0 --log-level=error --file-prefix=pp-gen" \
        --tx "dpdk:virtio_user0,path=$in,mac=$CLIENT_MAC$vu_server" \
        --rx "dpdk:virtio_user1,path=$out,mac=$SERVER_MAC$vu_server" \
        --src-ip 10.1.1.0 --src-ips 16 --sport 1024 --dst-ip "$dst" --dport 80 \
        --dst-mac "$GW_MAC" --flows "$flows" "$@"
}

# Sends the flows until the device tracks (nearly) all of them as
# connections ($5: a shell function printing how many it tracks; `none`
# for a device without state): a device that sets connections up slowly is
# then measured in its steady state, not while it is still setting up.
fill() {
    local in=$1 out=$2 dst=$3 flows=$4 count=$5 n=0 t0=$SECONDS
    [ "$count" != none ] || return 0
    while [ $((SECONDS - t0)) -lt 120 ]; do
        gen "$in" "$out" "$dst" "$flows" --duration 2 --warmup 0 > /dev/null 2>> "$tmp/gen.err" || true
        n=$("$count") || n=0
        if [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge $((flows * 99 / 100)) ]; then
            echo "$n connections after $((SECONDS - t0)) s" >> "$tmp/fill.log"
            return 0
        fi
    done
    echo "$what: the device tracks $n of $flows connections after 120 s" >&2
    return 1
}

# Sends for 2 s at a time until packets come back through the device (a
# device just started, or just given its rules, may not forward at once:
# its vhost-user queues are not yet enabled, its first packets go to its
# slow path); fails after 60 s.
ready() {
    local in=$1 out=$2 dst=$3 flows=$4 t0=$SECONDS
    while [ $((SECONDS - t0)) -lt 60 ]; do
        gen "$in" "$out" "$dst" "$flows" --duration 2 --warmup 0 --json > "$tmp/ready.json" 2>> "$tmp/gen.err" || true
        if python3 -c '
import json, sys
sys.exit(0 if json.load(open(sys.argv[1]))["trials"][-1]["rx_pps"] > 0 else 1)
' "$tmp/ready.json" 2> /dev/null; then
            return 0
        fi
    done
    echo "$what: nothing came back through the device in 60 s" >&2
    return 1
}

# One trial (after `fill` and `ready`), unpaced or at $RATE, with a 1 s warm-up; runs $5 (a shell
# function: reset the device's cycle accounting) 1.5 s into the trial,
# past pktgen's start and warm-up, and $6 (read it) 1 s before the measured
# phase ends. Prints the rate received in Mpps and leaves the reading in
# $tmp/cpp.
trial() {
    local in=$1 out=$2 dst=$3 flows=$4 reset=$5 read=$6
    local pace=()
    [ -z "${RATE:-}" ] || pace=(--rate "$RATE")
    gen "$in" "$out" "$dst" "$flows" --duration "$secs" --warmup 1 "${pace[@]}" --json > "$tmp/gen.json" 2>> "$tmp/gen.err" &
    local g=$!
    sleep 2.5
    "$reset" || { echo "$what: resetting the cycle accounting failed" >&2; kill "$g"; wait "$g"; return 1; }
    sleep "$((secs - 2))"
    "$read" > "$tmp/cpp" || { echo "$what: reading the cycle accounting failed" >&2; kill "$g"; wait "$g"; return 1; }
    wait "$g" || { echo "$what: pktgen failed:" >&2; cat "$tmp/gen.err" >&2; return 1; }
    # Nothing back is a failed trial, not a rate of 0.
    python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))["trials"][-1]
if t["rx_pps"] <= 0:
    sys.exit(sys.argv[2] + ": nothing came back through the device during the trial")
print("%.2f" % (t["rx_pps"] / 1e6))
' "$tmp/gen.json" "$what"
}

# Runs "$@" (one trial: prints the rate in Mpps and leaves its busy cycles
# a packet in $tmp/cpp) $repeat times; prints the rate of the trial with the
# fewest cycles a packet and leaves those cycles in $tmp/cpp. Each trial
# goes to stderr when there are several.
best() {
    local k out c best_out="" best_c=""
    for ((k = 1; k <= repeat; k++)); do
        out=$("$@") || return 1
        c=$(cat "$tmp/cpp")
        [ "$repeat" -eq 1 ] || echo "$what, trial $k of $repeat: $out Mpps, $c cycles/packet" >&2
        # (A reading that is no number never wins over one that is.)
        [[ $c =~ ^[0-9]+(\.[0-9]+)?$ ]] || { [ -n "$best_out" ] || best_out=$out best_c=$c; continue; }
        if [[ ! $best_c =~ ^[0-9]+(\.[0-9]+)?$ ]] || awk -v a="$c" -v b="$best_c" 'BEGIN { exit !(a < b) }'; then
            best_out=$out best_c=$c
        fi
    done
    echo "$best_c" > "$tmp/cpp"
    echo "$best_out"
}

wait_sock() { for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1" >&2; return 1; }

# --- testpmd io ------------------------------------------------------------------
testpmd_start() {
    rm -f "$tmp"/tp-*.sock
    taskset -c 1 dpdk-testpmd --lcores=0@1,1@1 --no-huge -m 512 --no-pci --log-level=error \
        --file-prefix=pp-tpmd \
        --vdev="net_vhost0,iface=$tmp/tp-in.sock" --vdev="net_vhost1,iface=$tmp/tp-out.sock" -- \
        --total-num-mbufs=16384 --nb-cores=1 --forward-mode=io --port-topology=paired \
        --record-core-cycles --stats-period=1 > "$tmp/testpmd.log" 2>&1 &
    dut_pid=$!
    # (Its trials run in subshells: the exit trap finds it here.)
    echo "$dut_pid" > "$tmp/testpmd.pid"
    wait_sock "$tmp/tp-out.sock"
}
# testpmd has no reset: its count covers its whole run (io forwarding
# keeps no state, so its warm-up costs what the rest does).
testpmd_reset() { :; }
testpmd_read() { :; }
# One testpmd trial, on a testpmd started for it (its count covers its
# whole run); $1: flows.
testpmd_trial() {
    local m ok=0
    testpmd_start &&
        m=$(trial "$tmp/tp-in.sock" "$tmp/tp-out.sock" 10.1.0.4 "$1" testpmd_reset testpmd_read) &&
        ok=1
    testpmd_stop
    [ "$ok" -eq 1 ] && echo "$m"
}
testpmd_stop() { # testpmd prints its forwarding statistics when it stops
    kill -INT "$dut_pid"; wait "$dut_pid" || true; dut_pid=""
    rm -f "$tmp/testpmd.pid"
    tr -d '\000' < "$tmp/testpmd.log" | sed -n 's|.*CPU cycles/packet=\([0-9.]*\).*|\1|p' | tail -1 > "$tmp/cpp"
}

# --- OVS-DPDK --------------------------------------------------------------------
od=$tmp/ovs
vsctl() { ovs-vsctl --db="unix:$od/db.sock" --timeout=60 "$@"; }
ofctl() { local cmd=$1; shift; ovs-ofctl -O OpenFlow15 "$cmd" "unix:$od/br0.mgmt" "$@"; }
ovs_start() {
    mkdir -p "$od"
    export OVS_RUNDIR=$od OVS_DBDIR=$od OVS_LOGDIR=$od OVS_SYSCONFDIR=$od
    ovsdb-tool create "$od/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server "$od/conf.db" --remote="punix:$od/db.sock" --unixctl="$od/ovsdb.ctl" > "$od/ovsdb.log" 2>&1 &
    ovs_pids=$!
    until vsctl --no-wait init 2>/dev/null; do sleep 0.1; done
    vsctl --no-wait set Open_vSwitch . other_config:dpdk-init=true \
        "other_config:dpdk-extra=--no-pci --file-prefix=pp-ovs" \
        other_config:dpdk-socket-mem=512 other_config:dpdk-socket-limit=512 \
        other_config:dpdk-lcore-mask=0x2 other_config:pmd-cpu-mask=0x2
    taskset -c 1 /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk "unix:$od/db.sock" \
        --unixctl="$od/vswitchd.ctl" > "$od/vswitchd.log" 2>&1 &
    ovs_pids="$ovs_pids $!"
    vsctl add-br br0 -- set bridge br0 datapath_type=netdev fail_mode=secure
    vsctl add-port br0 vin -- set Interface vin type=dpdkvhostuser ofport_request=1
    vsctl add-port br0 vout -- set Interface vout type=dpdkvhostuser ofport_request=2
    wait_sock "$od/vout"
    # Room for a million connections.
    ovs-appctl -t "$od/vswitchd.ctl" dpctl/ct-set-maxconns 3000000 > /dev/null
}
ovs_flows() { # plain | vip
    ofctl del-flows
    ofctl del-groups
    if [ "$1" = plain ]; then
        ofctl add-flow "table=0,in_port=1,actions=mod_dl_dst:$SERVER_MAC,output:2"
        return
    fi
    ofctl add-group "group_id=1,type=select,selection_method=hash,fields(ip_src,ip_dst,udp_src,udp_dst),bucket=bucket_id=0,actions=ct(commit,nat(dst=10.1.0.4:8080),table=2),bucket=bucket_id=1,actions=ct(commit,nat(dst=10.1.0.5:8080),table=2),bucket=bucket_id=2,actions=ct(commit,nat(dst=10.1.0.6:8080),table=2)"
    ofctl add-flow "table=0,priority=100,in_port=1,udp,nw_dst=$VIP,tp_dst=80,actions=ct(nat,table=1)"
    ofctl add-flow "table=1,priority=100,ct_state=+new+trk,udp,nw_dst=$VIP,tp_dst=80,actions=group:1"
    # A committed connection's packets come back NATed (to the DIP), and
    # still +new while it has seen no reply (one-way UDP, as in Linux).
    ofctl add-flow "table=1,priority=50,ct_state=+trk-inv,actions=resubmit(,2)"
    ofctl add-flow "table=2,priority=100,ip,actions=mod_dl_src:$GW_MAC,mod_dl_dst:$SERVER_MAC,dec_ttl,output:2"
}
ovs_reset() {
    ovs-appctl -t "$od/vswitchd.ctl" dpif-netdev/pmd-stats-clear > /dev/null
}
ovs_read() {
    ovs-appctl -t "$od/vswitchd.ctl" dpif-netdev/pmd-stats-show | tee -a "$tmp/ovs-stats.txt" |
        sed -n 's/.*avg processing cycles per packet: \([0-9.]*\).*/\1/p' | head -1
}
ovs_flush() { ovs-appctl -t "$od/vswitchd.ctl" dpctl/flush-conntrack > /dev/null; }
ovs_conns() {
    ovs-appctl -t "$od/vswitchd.ctl" dpctl/ct-get-nconns
}

# --- pollux ----------------------------------------------------------------------
pollux_start() { # $1: dpdk (DPDK's net_vhost ports) or own (pollux's vhost_user ports)
    local ips ports
    ips=$(python3 -c 'print(", ".join("\"10.1.1.%d\"" % i for i in range(16)))')
    rm -f "$tmp"/px-*.sock
    if [ "$1" = own ]; then
        ports="[[port]]
name = \"client\"
driver = \"vhost_user\"
socket = \"$tmp/px-in.sock\"
[[port]]
name = \"server\"
driver = \"vhost_user\"
socket = \"$tmp/px-out.sock\""
    else
        ports="[dpdk]
eal_args = [\"--no-huge\", \"-m\", \"1024\", \"--no-pci\", \"-l\", \"1\", \"--log-level=error\", \"--file-prefix=pp-pollux\"]
[[port]]
name = \"client\"
driver = \"dpdk\"
devargs = \"net_vhost0,iface=$tmp/px-in.sock\"
[[port]]
name = \"server\"
driver = \"dpdk\"
devargs = \"net_vhost1,iface=$tmp/px-out.sock\""
    fi
    cat > "$tmp/pollux.toml" <<TOML
$ports
[control]
socket = "$tmp/px-ctl.sock"
[dataplane]
flow_table_size = 4194304
conn_table_size = 2097152
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "$GW_MAC"
[[vm]]
name = "client"
port = "client"
vnet = "a"
mac = "$CLIENT_MAC"
ips = [$ips]
[[vm]]
name = "server"
port = "server"
vnet = "a"
mac = "$SERVER_MAC"
ips = ["10.1.0.4", "10.1.0.5", "10.1.0.6"]
[[vip]]
name = "web"
vnet = "a"
address = "$VIP"
port = 80
protocol = "udp"
backends = [ { ip = "10.1.0.4", port = 8080 }, { ip = "10.1.0.5", port = 8080 }, { ip = "10.1.0.6", port = 8080 } ]
TOML
    taskset -c 1 "$bin" run --config "$tmp/pollux.toml" > "$tmp/pollux.out" 2> "$tmp/pollux.err" &
    dut_pid=$!
    # (pollux's own ports connect to the generator's sockets, made when
    # it starts.)
    [ "$1" = own ] || wait_sock "$tmp/px-out.sock"
    wait_sock "$tmp/px-ctl.sock"
}
api() { curl -sf --unix-socket "$tmp/px-ctl.sock" "$@"; }
pollux_reset() { api -X POST http://pollux/v1/perf/reset > /dev/null; }
pollux_read() {
    api http://pollux/v1/perf | tee -a "$tmp/pollux-perf.json" | python3 -c '
import json, sys
w = json.load(sys.stdin)["workers"][0]
print("%.0f" % w["cycles_per_packet"])'
}
pollux_conns() {
    api http://pollux/v1/counters | python3 -c '
import json, sys
print(sum(w.get("connections", 0) for w in json.load(sys.stdin)["workers"]))'
}

# --- the run ---------------------------------------------------------------------
declare -A mpps cpp
what="(before the first device)"
devices="${DEVICES:-testpmd ovs pollux own acl}"
for flows in $sizes; do
    [[ $devices == *testpmd* ]] || break
    # (No `ready` step: testpmd counts its cycles over its whole run, which
    # is to be the trial's; a trial with nothing back still fails.)
    what="testpmd io, $flows flows"
    mpps[testpmd,$flows]=$(best testpmd_trial "$flows")
    cpp[testpmd,$flows]=$(cat "$tmp/cpp")
    echo "testpmd io, $flows flows: ${mpps[testpmd,$flows]} Mpps, ${cpp[testpmd,$flows]} cycles/packet" >&2
done
[[ $devices != *ovs* ]] || ovs_start
for flows in $sizes; do
    [[ $devices == *ovs* ]] || break
    for mode in plain vip; do
        what="OVS $mode, $flows flows"
        ovs_flows "$mode"
        ovs_flush
        dst=10.1.0.4
        [ "$mode" = vip ] && dst=$VIP
        if [ "$mode" = vip ]; then
            fill "$od/vin" "$od/vout" "$dst" "$flows" ovs_conns
        fi
        ready "$od/vin" "$od/vout" "$dst" "$flows"
        mpps[ovs-$mode,$flows]=$(best trial "$od/vin" "$od/vout" "$dst" "$flows" ovs_reset ovs_read)
        cpp[ovs-$mode,$flows]=$(cat "$tmp/cpp")
        echo "OVS $mode, $flows flows: ${mpps[ovs-$mode,$flows]} Mpps, ${cpp[ovs-$mode,$flows]} cycles/packet" >&2
    done
done
# shellcheck disable=SC2086
[ -z "$ovs_pids" ] || kill $ovs_pids 2>/dev/null || true; wait 2>/dev/null || true; ovs_pids=""
# pollux on DPDK's vhost library (`pollux`), then on its own vhost-user
# ports (`own`).
for kind in pollux own; do
    [[ " $devices " == *" $kind "* ]] || continue
    driver=dpdk key=pollux vu_server=""
    if [ "$kind" = own ]; then
        driver=own key=own vu_server=",server=1"
    fi
    for flows in $sizes; do
        for mode in plain vip; do
            what="pollux ($driver vhost-user) $mode, $flows flows"
            pollux_start "$driver"
            dst=10.1.0.4
            [ "$mode" = vip ] && dst=$VIP
            fill "$tmp/px-in.sock" "$tmp/px-out.sock" "$dst" "$flows" pollux_conns
            ready "$tmp/px-in.sock" "$tmp/px-out.sock" "$dst" "$flows"
            mpps[$key-$mode,$flows]=$(best trial "$tmp/px-in.sock" "$tmp/px-out.sock" "$dst" "$flows" pollux_reset pollux_read)
            cpp[$key-$mode,$flows]=$(cat "$tmp/cpp")
            echo "$what: ${mpps[$key-$mode,$flows]} Mpps, ${cpp[$key-$mode,$flows]} cycles/packet" >&2
            kill "$dut_pid"; wait "$dut_pid" || true; dut_pid=""
        done
    done
done
vu_server=""

# --- classifiers: rte_acl (dpdk-test-acl) and pollux's, same rules, same trace --------
declare -A acl
acl_differ=0
acl_sizes="${ACL_SIZES:-100 1000 10000}"
if [[ $devices == *acl* ]]; then
    cargo build --release -q -p filter --example rte_acl
    acl_bin="${CARGO_TARGET_DIR:-target}/release/examples/rte_acl"
    for n in $acl_sizes; do
        "$acl_bin" gen "$tmp/rules-$n" "$n" "$tmp/trace-$n" 50000 "$n"
        # The answers first, packet by packet (rte_acl prints them at
        # --verbose=2, inside its timed loop, so it is timed apart).
        taskset -c 1 dpdk-test-acl --no-huge -m 512 --no-pci -l 1 --log-level=error --file-prefix=pp-acl -- \
            --rulesf="$tmp/rules-$n" --tracef="$tmp/trace-$n" --iter=1 --verbose=2 |
            sed -n 's/^ipv4_5tuple: .*result: //p' > "$tmp/rte-$n.out" || true
        for alg in scalar avx2; do
            acl[rte-$alg,$n]=$(taskset -c 1 dpdk-test-acl --no-huge -m 512 --no-pci -l 1 --log-level=error \
                --file-prefix=pp-acl -- --rulesf="$tmp/rules-$n" --tracef="$tmp/trace-$n" \
                --iter=200 --verbose=0 --alg=$alg |
                sed -n 's/.* \([0-9.]*\) cycles\/pkt.*/\1/p' | tail -1) || true
        done
        acl[pollux,$n]=$(taskset -c 1 "$acl_bin" run "$tmp/rules-$n" "$tmp/trace-$n" 200 "$tmp/pollux-$n.out" |
            sed -n 's/.* \([0-9.]*\) cycles\/pkt.*/\1/p') || true
        if [ -s "$tmp/rte-$n.out" ] && cmp -s "$tmp/rte-$n.out" "$tmp/pollux-$n.out"; then
            acl[agree,$n]="all $(wc -l < "$tmp/rte-$n.out")"
        else
            acl[agree,$n]="DIFFER"
            acl_differ=1
            echo "rte_acl and pollux disagree at $n rules (line: rte_acl pollux):" >&2
            paste -d ' ' "$tmp/rte-$n.out" "$tmp/pollux-$n.out" | awk '$1 != $2 { print NR ": " $0 }' | head -5 >&2 || true
        fi
        echo "classifiers, $n rules: rte_acl scalar ${acl[rte-scalar,$n]}, avx2 ${acl[rte-avx2,$n]}, pollux ${acl[pollux,$n]} cycles/packet; answers: ${acl[agree,$n]}" >&2
    done
fi

ovs_version=$(ovs-vswitchd --version | head -1 | awk '{print $NF}')
dpdk_version=$(pkg-config --modversion libdpdk 2>/dev/null || echo "?")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else printf "-" }'; }
section=$(
    echo "## pollux, OVS-DPDK and testpmd over vhost-user — \`sudo $([ "$repeat" -eq 1 ] || echo "REPEAT=$repeat ")benches/peers.sh $secs\` ($(date -u +%Y-%m-%d), pollux at $(git rev-parse --short HEAD))"
    echo
    echo "$(nproc) vCPUs: $(lscpu | sed -n 's/^Model name: *//p' | head -1). \`pollux pktgen\` (two \`virtio_user\` ports, $([ -n "${RATE:-}" ] && echo "64-byte UDP paced at $RATE packets/s" || echo "unpaced 64-byte UDP"), ${secs} s per trial after a 1 s warm-up$([ "$repeat" -eq 1 ] || echo ", each row the best of $repeat trials (the one with the fewest busy cycles a packet)"); before it, for the devices that track connections, the flows are sent until the device tracks 99% of them, then for OVS and pollux until packets come back through them; a trial in which none come back fails the run) on CPU 0; the device under test on CPU 1 with one polling core, owning both vhost-user sockets (pollux's own \`vhost_user\` ports connect to the generator's instead, which then own them). Mpps: what came back on the server side. Cycles: the device's busy cycles per packet over the measured phase (testpmd \`--record-core-cycles\`, over its whole run; OVS \`dpif-netdev/pmd-stats-show\`, avg processing cycles per packet; pollux \`GET /v1/perf\`). OVS-DPDK $ovs_version (Debian), DPDK $dpdk_version; the VIP in OVS is OVN's pipeline: \`ct(nat)\`, a select group of three buckets each \`ct(commit,nat(dst=DIP:8080))\`, MACs, TTL; in pollux a VIP of three backends (Maglev, connection tracking, DNAT, MACs, TTL). Flows: 16 client addresses times source ports, each a connection to the load balancers."
    echo
    echo "| device | flows | Mpps | cycles/packet |"
    echo "|---|---:|---:|---:|"
    for dev in testpmd ovs-plain ovs-vip pollux-plain pollux-vip own-plain own-vip; do
        case $dev in
            testpmd) name="dpdk-testpmd io forwarding" ;;
            ovs-plain) name="OVS-DPDK, in_port -> output" ;;
            ovs-vip) name="OVS-DPDK, VIP (ct nat + select group)" ;;
            pollux-plain) name="pollux, VM to VM (conntrack, route)" ;;
            pollux-vip) name="pollux, VIP (Maglev, conntrack, DNAT)" ;;
            own-plain) name="pollux on its own vhost-user ports, VM to VM" ;;
            own-vip) name="pollux on its own vhost-user ports, VIP" ;;
        esac
        for flows in $sizes; do
            echo "| $name | $flows | ${mpps[$dev,$flows]:--} | ${cpp[$dev,$flows]:--} |"
        done
    done
    if [[ $devices == *acl* ]]; then
        echo
        echo "Classifiers, one core (CPU 1), the same rule files and a 50 000-packet trace (TCP and UDP, half drawn from inside a random rule, half anywhere in 10.0.0.0/8), 200 passes: DPDK's rte_acl through \`dpdk-test-acl\` (its own TSC count around the search, bursts of 256), pollux's \`filter::Classifier\` through \`filter/examples/rte_acl.rs\` (one packet at a time, the same count). Answers: each packet's winning rule from both, compared."
        echo
        echo "| rules | rte_acl scalar, cycles/packet | rte_acl avx2 | pollux | pollux / rte_acl avx2 | answers agree |"
        echo "|---:|---:|---:|---:|---:|---|"
        for n in $acl_sizes; do
            echo "| $n | ${acl[rte-scalar,$n]:--} | ${acl[rte-avx2,$n]:--} | ${acl[pollux,$n]:--} | $(ratio "${acl[pollux,$n]:-0}" "${acl[rte-avx2,$n]:-0}") | ${acl[agree,$n]:--} |"
        done
    fi
    echo
    echo "Ratios, same run:"
    echo
    for flows in $sizes; do
        echo "- $flows flows: pollux VIP / OVS VIP throughput $(ratio "${mpps[pollux-vip,$flows]:-0}" "${mpps[ovs-vip,$flows]:-0}"), cycles per packet $(ratio "${cpp[pollux-vip,$flows]:-0}" "${cpp[ovs-vip,$flows]:-0}"); pollux VIP / testpmd io cycles per packet $(ratio "${cpp[pollux-vip,$flows]:-0}" "${cpp[testpmd,$flows]:-0}"). On pollux's own vhost-user ports: VIP / OVS VIP throughput $(ratio "${mpps[own-vip,$flows]:-0}" "${mpps[ovs-vip,$flows]:-0}"), cycles per packet $(ratio "${cpp[own-vip,$flows]:-0}" "${cpp[ovs-vip,$flows]:-0}"); VIP / testpmd io cycles per packet $(ratio "${cpp[own-vip,$flows]:-0}" "${cpp[testpmd,$flows]:-0}")"
    done
)
echo "$section"
if [ "${WRITE:-1}" = 1 ]; then
    python3 - "$section" <<'PY'
import re, sys
path = "docs/performance.md"
doc = open(path).read()
begin, end = "<!-- peers.sh begin -->", "<!-- peers.sh end -->"
block = begin + "\n" + sys.argv[1] + "\n" + end
if begin in doc and end in doc:
    doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
else:
    doc = doc.rstrip("\n") + "\n\n" + block + "\n"
open(path, "w").write(doc)
PY
    echo "(written into docs/performance.md)"
fi
[ "$acl_differ" = 0 ] || { echo "the classifiers disagreed (above)" >&2; exit 1; }
