#!/usr/bin/env bash
# The whole pollux test suite, exactly as CI runs it (.ci/run calls this).
#
# Installs what it needs on a fresh Debian 12 machine (apt packages as root or
# through sudo, cargo-nextest and cargo-fuzz through cargo), then runs:
#   cargo fmt --check, cargo clippy -D warnings (all targets, all features),
#   every unit/integration/property test with all features (cargo nextest),
#   the doc tests, and a short run of each fuzz target.
#
# Environment:
#   POLLUX_FUZZ_SECONDS  seconds per fuzz target (default 30; 0 skips fuzzing)
#   CI                   set (as .ci/run's caller does): every test must run
#   POLLUX_REQUIRE_TOOLS 1: every test must run (set here when run as root)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- system packages -------------------------------------------------------
# Each package is checked by its dpkg status, not by a file or command that
# happens to look like it: a fresh Debian 12 image ships libclang-cpp14, whose
# libclang-cpp.so.14 fooled a `libclang*.so*` glob, yet bindgen (clang-sys)
# loads libclang.so / libclang-14.so, which only libclang-dev brings.
needed=(
    build-essential   # cc for the C shim and -sys crates
    pkg-config        # finds libdpdk for the dpdk feature
    libclang-dev      # bindgen (dpdk-sys) loads libclang.so
    libdpdk-dev       # DPDK 22.11 headers and libraries (dpdk feature)
    dpdk              # dpdk-testpmd and the PMD plugins the DPDK tests load
    dpdk-dev          # DPDK's development tools
    tcpdump           # pcap and pktgen tests read captures back with it
    tshark            # decodes the overlay test's captured VXLAN and Geneve headers
    nfdump            # nfcapd and nfdump: the IPFIX collector of the flow-log test
    procps            # kill(1) and sysctl(8) in the end-to-end tests
    util-linux        # setpriv(1): tests as another user, BIRD tied to pollux
    iproute2          # ip(8): namespaces and veth pairs
    iputils-ping      # ping in the namespaces
    traceroute        # traceroute through pollux in the namespaces
    ethtool           # offload settings of test veths
    curl              # HTTP client in the namespaces
    python3           # python3 -m http.server backends
    coturn            # turnserver and turnutils_natdiscovery: SNAT's behaviour (RFC 5780)
    bird2             # BGP: the Muxes' speaker (pollux runs it) and the test router
    cpio              # reads back the guest harness's initramfs archives
    dpkg-dev          # dpkg-shlibdeps: the Debian package's dependencies
    man-db            # man(1): the packaged man page
    systemd           # systemd-analyze verify: the packaged unit
)
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}
pkgs=()
for p in "${needed[@]}"; do
    installed "$p" || pkgs+=("$p")
done
# QEMU for the guest VM tests comes from bookworm-backports (10.0; Debian 12
# itself has 7.2): every qemu package from one suite, since the image's
# qemu-utils is the backports one and main's qemu-system-common 7.2
# conflicts with it.
qemu_bpo=1
if installed qemu-system-x86 &&
    dpkg-query -W -f='${Version}' qemu-system-x86 | grep -q '~bpo12'; then
    qemu_bpo=0
fi
backports=/etc/apt/sources.list.d/pollux-backports.sources
# The guest image is made of Debian packages the tests fetch with apt-get
# download, which needs package lists that know them.
lists_ok=0
apt-cache show linux-image-cloud-amd64 linux-image-amd64 busybox-static >/dev/null 2>&1 && lists_ok=1
if ((${#pkgs[@]})) || [ "$qemu_bpo" -eq 1 ] || [ "$lists_ok" -eq 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "scripts/test.sh: installing packages (${pkgs[*]:-} qemu-system-x86 from bookworm-backports, or the package lists for the guest image) needs root or sudo" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    # A source that names the suite on a line of its own (not a comment).
    if [ "$qemu_bpo" -eq 1 ] &&
        ! grep -qsE '^[^#]*bookworm-backports' /etc/apt/sources.list \
            /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
        log "adding the bookworm-backports suite ($backports)"
        printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
            'Suites: bookworm-backports' 'Components: main' \
            'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' | $sudo tee "$backports" >/dev/null
    fi
    $sudo apt-get update -qq
    if ((${#pkgs[@]})); then
        log "installing system packages: ${pkgs[*]}"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
    fi
    if [ "$qemu_bpo" -eq 1 ]; then
        log "installing qemu-system-x86 from bookworm-backports"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86
    fi
fi

# --- huge pages: let the pool tests and the DPDK ABI test use real 2 MiB pages
# when we may (the DPDK tests fall back to --no-huge without them) ----------
if [ "$(id -u)" -eq 0 ] && [ -w /proc/sys/vm/nr_hugepages ]; then
    if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 512 ]; then
        echo 512 > /proc/sys/vm/nr_hugepages || true
    fi
    if ! grep -qs '^[^ ]* /dev/hugepages hugetlbfs ' /proc/mounts; then
        mkdir -p /dev/hugepages
        mount -t hugetlbfs none /dev/hugepages || true
    fi
    log "huge pages reserved: $(cat /proc/sys/vm/nr_hugepages) x 2 MiB"
else
    log "not root: huge pages not reserved, pools use normal pages"
fi

# --- cargo tools -----------------------------------------------------------
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# Every test that needs root, a tool or huge pages must run (testkit::require
# fails it otherwise): always under CI (CI=true), and whenever this script
# runs as root, since it has installed the tools and reserved the huge pages.
# As a plain user outside CI those tests say what they need and do not run.
if [ "$(id -u)" -eq 0 ]; then
    export POLLUX_REQUIRE_TOOLS=1
fi

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo nextest (unit, property, integration tests; all features)"
cargo nextest run --workspace --all-features --no-fail-fast

log "doc tests"
cargo test --workspace --all-features --doc

# The burst ring's model check: dataplane built with loom's atomics and
# cells (its own target directory, so the main build is left alone).
log "loom model check of the burst ring"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p dataplane --test loom_ring --release

# --- fuzz smoke run ----------------------------------------------------------
fuzz_secs="${POLLUX_FUZZ_SECONDS:-30}"
if [ "$fuzz_secs" -gt 0 ]; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz"
        cargo install --locked cargo-fuzz
    fi
    # cargo-fuzz needs nightly-only flags (sanitizers); this machine has one
    # stable toolchain, which accepts them with RUSTC_BOOTSTRAP=1.
    targets=$(RUSTC_BOOTSTRAP=1 cargo fuzz list)
    if [ -z "$targets" ]; then
        echo "scripts/test.sh: cargo fuzz list found no fuzz target" >&2
        exit 1
    fi
    for target in $targets; do
        log "fuzz $target for ${fuzz_secs}s"
        RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$fuzz_secs" -rss_limit_mb=4096
    done
fi

if [ -z "${POLLUX_REQUIRE_TOOLS:-}" ] && [ -z "${CI:-}" ]; then
    log "all checks passed, except the tests that need root, which did not run (run as root or with CI=true)"
else
    log "all checks passed"
fi
