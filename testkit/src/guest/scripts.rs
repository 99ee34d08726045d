//! The guest's own scripts, run by busybox in the initramfs.

/// busybox init's table: `/etc/rc` once, then the command loop on the
/// second serial port, started again whenever it ends.
pub const INITTAB: &str = "::sysinit:/etc/rc
ttyS1::respawn:/bin/cmdloop
::ctrlaltdel:/sbin/reboot -f
";

/// Boot: file systems, modules (already in dependency order), then each
/// `pollux.net=MAC,ADDRESS/LEN[,GATEWAY]` of the kernel command line on
/// the NIC with that MAC (never assuming its name), the host name from
/// `pollux.name=`, and a web root with `index.html` (the name) and
/// `health`. `pollux.probe=1` only says the guest came up, then powers
/// off (the harness's test of an accelerator).
pub const RC: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# The initramfs leaves / writable by all, which DPDK's EAL refuses for
# the directories it loads drivers from.
chmod 755 /
case " $(cat /proc/cmdline) " in
*" pollux.probe=1 "*) echo "@@PROBE-OK"; poweroff -f ;;
esac
for m in /lib/modules/*.ko; do
    insmod "$m" || echo "@@ERROR insmod $m failed"
done
ip link set lo up
echo ok > /www/health
for w in $(cat /proc/cmdline); do
    case "$w" in
    pollux.name=*)
        hostname "${w#pollux.name=}"
        echo "${w#pollux.name=}" > /www/index.html
        ;;
    pollux.net=*)
        set -- $(echo "${w#pollux.net=}" | tr , ' ')
        dev=""
        n=0
        while [ -z "$dev" ] && [ $n -lt 100 ]; do
            for d in /sys/class/net/*; do
                [ "$(cat "$d/address")" = "$1" ] && dev=${d##*/}
            done
            [ -z "$dev" ] && sleep 0.1
            n=$((n + 1))
        done
        if [ -z "$dev" ]; then
            echo "@@ERROR no NIC with MAC $1"
            continue
        fi
        ip addr add "$2" dev "$dev"
        ip link set "$dev" up
        [ -n "$3" ] && ip route add default via "$3" dev "$dev"
        ;;
    esac
done
echo "@@BOOTED"
"#;

/// The command channel, on the second serial port: the harness writes
/// `TOKEN COMMAND` lines; each command runs with no input, and its output
/// comes back between `@@BEGIN TOKEN` and `@@END TOKEN STATUS`. A random
/// token per request means neither a command's output nor an old answer
/// can pass for the answer (and each command's output file is its own: a
/// process it left in the background cannot write into another's).
/// `TOKEN @@PING` is answered `@@PONG TOKEN
/// BOOT_ID` (a new boot id: the guest rebooted). The line is raw: no echo,
/// no translation.
pub const CMDLOOP: &str = r#"#!/bin/sh
stty raw -echo 2>/dev/null
boot=$(cat /proc/sys/kernel/random/boot_id)
echo "@@READY $boot"
while IFS= read -r line; do
    tok=${line%% *}
    cmd=${line#* }
    if [ "$cmd" = "@@PING" ]; then
        echo "@@PONG $tok $boot"
        continue
    fi
    out=/tmp/.out.$tok
    sh -c "$cmd" </dev/null >"$out" 2>&1
    rc=$?
    echo "@@BEGIN $tok"
    cat "$out"
    rm -f "$out"
    echo ""
    echo "@@END $tok $rc"
done
"#;
