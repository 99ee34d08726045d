#!/usr/bin/env bash
# Builds pollux's Debian package: the binary, the systemd unit
# (packaging/pollux.service), the example configuration as a conffile
# (/etc/pollux/pollux.toml), the man page and the bash completion (both
# generated from the command line's definition by the binary itself).
#
#   scripts/deb.sh [--binary PATH] [--out DIR]
#
# Without --binary it builds `cargo build --release` (no DPDK) first. The
# package's Depends come from dpkg-shlibdeps (a binary built with the dpdk
# feature depends on Debian's DPDK libraries). Prints the .deb's path.
# Needs dpkg-dev (dpkg-shlibdeps), binutils (strip) and gzip.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=""
out="$root/target/debian"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary|--out)
            [ $# -ge 2 ] || { echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2; }
            if [ "$1" = --binary ]; then bin=$2; else out=$2; fi
            shift 2 ;;
        *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release --locked --bin pollux >&2)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/pollux"
fi
[ -x "$bin" ] || { echo "deb.sh: $bin is not an executable" >&2; exit 2; }

version=$("$bin" --version | awk '{print $2}')
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/pkg"

install -D -m 0755 "$bin" "$pkg/usr/bin/pollux"
# Debug information is not shipped (a debug build's is hundreds of MB).
strip --strip-debug "$pkg/usr/bin/pollux"
install -D -m 0644 "$root/packaging/pollux.service" "$pkg/lib/systemd/system/pollux.service"
install -D -m 0644 "$root/packaging/pollux.toml" "$pkg/etc/pollux/pollux.toml"
mkdir -p "$pkg/usr/share/man/man1" "$pkg/usr/share/bash-completion/completions" \
    "$pkg/usr/share/doc/pollux"
"$bin" manpage | gzip -9n > "$pkg/usr/share/man/man1/pollux.1.gz"
"$bin" completions bash > "$pkg/usr/share/bash-completion/completions/pollux"
cat > "$pkg/usr/share/doc/pollux/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pollux

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

# The shared libraries the binary needs, as Debian package dependencies.
mkdir -p "$stage/src/debian"
printf 'Source: pollux\n\nPackage: pollux\nArchitecture: any\n' > "$stage/src/debian/control"
# (Its warnings go to stderr; a failure stops the script with them.)
shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O -e"$pkg/usr/bin/pollux")
depends=$(printf '%s\n' "$shlibs" | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }
# kill(1) for the unit's reload.
depends="$depends, procps"

mkdir -p "$pkg/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: pollux
Version: $version
Architecture: $arch
Maintainer: pollux developers <pollux@example.invalid>
Depends: $depends
Suggests: bird2
Section: net
Priority: optional
Installed-Size: $size
Homepage: https://example.invalid/pollux
Description: poll-mode virtual networking dataplane
 The switch between VMs and the wire on a cloud host: busy-polling pinned
 cores, VIP load balancing with NAT (Maglev) and health probes, security
 groups, tenant isolation; ports on DPDK, af_packet, af_xdp and pcap.
 Installs pollux.service (not enabled): edit /etc/pollux/pollux.toml,
 then systemctl enable --now pollux.
CONTROL
echo /etc/pollux/pollux.toml > "$pkg/DEBIAN/conffiles"
# The service is not enabled or started on install (its configuration is
# the operator's to write); a running one is stopped before its binary is
# removed or replaced, and started again after an upgrade.
cat > "$pkg/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && systemctl is-active --quiet pollux.service; then
    systemctl stop pollux.service || true
    if [ "$1" = upgrade ]; then
        mkdir -p /run/pollux-upgrade && touch /run/pollux-upgrade/restart
    fi
fi
SCRIPT
cat > "$pkg/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ -e /run/pollux-upgrade/restart ]; then
        rm -rf /run/pollux-upgrade
        systemctl start pollux.service || true
    fi
fi
SCRIPT
cat > "$pkg/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
# Purged: the enablement symlinks go too.
if [ "$1" = purge ]; then
    rm -f /etc/systemd/system/multi-user.target.wants/pollux.service
fi
SCRIPT
chmod 0755 "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/pollux_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$pkg" "$deb" >&2
echo "$deb"
