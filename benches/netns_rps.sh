#!/usr/bin/env bash
# HTTP requests per second through a VIP, in one run:
#   1. pollux (release build, `pollux run`, one worker) on af_packet ports
#      between network namespaces, then on af_xdp ports;
#   2. the same clients and servers behind the Linux kernel as the load
#      balancer: a router namespace with a bridge and nftables DNAT
#      (numgen round robin over the three DIPs) — the baseline.
# Servers are nginx (one worker each, 64-byte body) in three DIP namespaces;
# the client is wrk in its own namespace. Every namespace and veth is created
# here and removed on exit.
#
# Usage (root): benches/netns_rps.sh [seconds per run, default 10] [connections, default 32]
# Installs wrk, nginx-light and nftables with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
conns="${2:-32}"
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces, packet sockets)"; exit 2; }

pkgs=()
command -v wrk >/dev/null || pkgs+=(wrk)
command -v nginx >/dev/null || pkgs+=(nginx-light)
command -v nft >/dev/null || pkgs+=(nftables)
command -v ethtool >/dev/null || pkgs+=(ethtool)
if ((${#pkgs[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
cargo build --release -q --bin pollux

id=$$
tmp=$(mktemp -d /tmp/pollux-rps.XXXX)
nsl=()
cleanup() {
    set +e
    [ -n "${pollux_pid:-}" ] && kill "$pollux_pid" 2>/dev/null && wait "$pollux_pid" 2>/dev/null
    for n in "${nsl[@]}"; do
        ip netns pids "$n" 2>/dev/null | xargs -r kill 2>/dev/null
        ip netns del "$n" 2>/dev/null
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# mkns NAME IP/LEN MAC GW: a namespace whose eth0 is one end of a veth pair;
# the other end, NAME-h, stays in the root namespace.
mkns() {
    local n=$1 ip=$2 mac=$3 gw=$4
    ip netns add "$n"; nsl+=("$n")
    ip link add "$n-h" type veth peer name eth0 netns "$n"
    sysctl -qw "net.ipv6.conf.$n-h.disable_ipv6=1" || true
    ip link set "$n-h" up
    ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    ip netns exec "$n" ip link set lo up
    ip netns exec "$n" ip link set eth0 address "$mac"
    ip netns exec "$n" ip addr add "$ip" dev eth0
    ip netns exec "$n" ip link set eth0 up
    ip netns exec "$n" ip route add default via "$gw"
    ip netns exec "$n" ethtool -K eth0 tso off gso off gro off >/dev/null
}

nginx_in() { # NS ROOT-DIR NAME
    local n=$1 d=$2 name=$3
    mkdir -p "$d/www"
    printf '%-63s\n' "$name" > "$d/www/index.html"
    cat > "$d/nginx.conf" <<EOF
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen 80; listen 8000; root $d/www; }
}
EOF
    ip netns exec "$n" nginx -c "$d/nginx.conf"
}

wrk_in() { # NS URL -> "rps p50 p99"
    ip netns exec "$1" wrk -t1 -c"$conns" -d"${secs}s" --latency "$2" > "$tmp/wrk.out"
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' "$tmp/wrk.out")
    p50=$(awk '$1=="50%" {print $2}' "$tmp/wrk.out")
    p99=$(awk '$1=="99%" {print $2}' "$tmp/wrk.out")
    echo "$rps $p50 $p99"
}

# --- 1. pollux on af_packet ports ---------------------------------------------
c="px${id}c"; d=("px${id}d1" "px${id}d2" "px${id}d3")
mkns "$c" 10.1.0.20/16 02:00:00:00:00:20 10.1.0.1
for i in 0 1 2; do
    mkns "${d[$i]}" "10.1.0.$((4 + i))/16" "02:00:00:00:00:0$((4 + i))" 10.1.0.1
    nginx_in "${d[$i]}" "$tmp/d$i" "dip$((i + 1))"
done
{
    for n in "$c" "${d[@]}"; do
        printf '[[port]]\nname = "%s"\ndriver = "af_packet"\niface = "%s-h"\n' "$n" "$n"
    done
    printf '[[vnet]]\nname = "a"\nprefixes = ["10.1.0.0/16"]\ngateway_mac = "12:34:56:78:9a:bc"\n'
    printf '[[vm]]\nname = "client"\nport = "%s"\nvnet = "a"\nmac = "02:00:00:00:00:20"\nips = ["10.1.0.20"]\n' "$c"
    for i in 0 1 2; do
        printf '[[vm]]\nname = "dip%d"\nport = "%s"\nvnet = "a"\nmac = "02:00:00:00:00:0%d"\nips = ["10.1.0.%d"]\n' \
            $((i + 1)) "${d[$i]}" $((4 + i)) $((4 + i))
    done
    printf '[[vip]]\nname = "web"\nvnet = "a"\naddress = "10.1.0.100"\nport = 80\nprotocol = "tcp"\n'
    printf 'backends = [ { vm = "dip1", port = 8000 }, { vm = "dip2", port = 8000 }, { vm = "dip3", port = 8000 } ]\n'
} > "$tmp/pollux.toml"
run_pollux() { # CONFIG -> "rps p50 p99", drops in $tmp/drops
    target/release/pollux run --config "$1" > "$tmp/pollux.out" 2> "$tmp/pollux.log" &
    pollux_pid=$!
    sleep 1
    ip netns exec "$c" curl -s --max-time 5 http://10.1.0.100/ > /dev/null || { cat "$tmp/pollux.log" >&2; echo "pollux path does not answer" >&2; exit 1; }
    wrk_in "$c" http://10.1.0.100/
    kill "$pollux_pid"; wait "$pollux_pid" || true; pollux_pid=""
    grep -E "^switch drops|^malformed" "$tmp/pollux.out" | tr '\n' ' ' >> "$tmp/drops"
}
run_pollux "$tmp/pollux.toml" > "$tmp/res"
read -r p_rps p_p50 p_p99 < "$tmp/res"
# AF_XDP: senders must fill in their checksums (XDP gets no partial mark).
for n in "$c" "${d[@]}"; do ip netns exec "$n" ethtool -K eth0 tx off >/dev/null; done
sed 's/driver = "af_packet"/driver = "af_xdp"/' "$tmp/pollux.toml" > "$tmp/pollux-xdp.toml"
run_pollux "$tmp/pollux-xdp.toml" > "$tmp/res"
read -r x_rps x_p50 x_p99 < "$tmp/res"
drops=$(cat "$tmp/drops")
for n in "$c" "${d[@]}"; do ip netns pids "$n" | xargs -r kill; ip netns del "$n"; done
nsl=()

# --- 2. the kernel: router namespace, bridge, nftables DNAT ----------------------
r="kx${id}r"; c="kx${id}c"; d=("kx${id}d1" "kx${id}d2" "kx${id}d3")
ip netns add "$r"; nsl+=("$r")
ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
ip netns exec "$r" ip link set lo up
ip netns exec "$r" ip link add br0 type bridge
ip netns exec "$r" ip addr add 10.3.0.1/24 dev br0
ip netns exec "$r" ip link set br0 up
mkns "$c" 10.2.0.20/24 02:00:00:00:00:20 10.2.0.1
ip link set "$c-h" netns "$r"
ip netns exec "$r" ip addr add 10.2.0.1/24 dev "$c-h"
ip netns exec "$r" ip link set "$c-h" up
for i in 0 1 2; do
    mkns "${d[$i]}" "10.3.0.$((4 + i))/24" "02:00:00:00:00:0$((4 + i))" 10.3.0.1
    ip link set "${d[$i]}-h" netns "$r"
    ip netns exec "$r" ip link set "${d[$i]}-h" master br0
    ip netns exec "$r" ip link set "${d[$i]}-h" up
    nginx_in "${d[$i]}" "$tmp/k$i" "dip$((i + 1))"
done
ip netns exec "$r" nft -f - <<'EOF'
table ip lb {
    chain pre {
        type nat hook prerouting priority -100;
        ip daddr 10.9.0.100 tcp dport 80 dnat to numgen inc mod 3 map { 0 : 10.3.0.4, 1 : 10.3.0.5, 2 : 10.3.0.6 }
    }
}
EOF
ip netns exec "$c" curl -s --max-time 5 http://10.9.0.100/ > /dev/null || { echo "kernel path does not answer"; exit 1; }
wrk_in "$c" http://10.9.0.100/ > "$tmp/res"
read -r k_rps k_p50 k_p99 < "$tmp/res"

echo "wrk -t1 -c$conns -d${secs}s, nginx x3 (1 worker each), 64-byte bodies"
printf '%-34s %10s %10s %10s\n' "path" "req/s" "p50" "p99"
printf '%-34s %10s %10s %10s\n' "pollux af_packet (1 worker)" "$p_rps" "$p_p50" "$p_p99"
printf '%-34s %10s %10s %10s\n' "pollux af_xdp (1 worker)" "$x_rps" "$x_p50" "$x_p99"
printf '%-34s %10s %10s %10s\n' "kernel: bridge + nftables DNAT" "$k_rps" "$k_p50" "$k_p99"
awk -v a="$p_rps" -v x="$x_rps" -v b="$k_rps" 'BEGIN { printf "ratio to kernel: af_packet %.2f, af_xdp %.2f\n", a / b, x / b }'
echo "pollux: $drops"
