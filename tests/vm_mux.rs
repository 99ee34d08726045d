//! A Linux DIP behind a pollux Mux, the way Katran's backends run: a QEMU
//! guest (Debian's kernel, whose `ipip` module this test loads) on the
//! underlay takes the Mux's IP in IP in with its own `tunl0` device and
//! serves the VIP, which it holds on `lo`, answering the client straight
//! from it. The lab is netns_mux's: a client behind a router namespace,
//! the Mux on the router's underlay bridge, the guest on a tap in it.
//!
//! Shown: the Mux's probes through the VIP reach the guest and find it
//! up; curl from the client reaches the guest's web server through the
//! VIP, and a download arrives whole; the guest's socket table shows the
//! client's own address; not one packet from the VIP crosses the Mux's
//! link towards the client.
//!
//! Needs root, `ip`, `ethtool`, `curl`, `tcpdump`, and QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::mux::{self, CLIENT, VIP, count};
use common::netns::{read, sh, wait_for};
use common::vm::{BOOT, host_tool, ok};
use std::time::Duration;
use testkit::guest::{Guest, Nic, Spec};

/// The guest's address on the underlay (the DIP).
const DIP: &str = "10.200.0.5";

#[test]
fn a_linux_dip_with_ipip_and_the_vip_on_lo_serves_through_the_mux() {
    if !(common::vm::required()
        && testkit::require::root_and(&["ip", "ethtool", "curl", "tcpdump", "cmp"]))
    {
        return;
    }
    let (mut lab, mux_up) = mux::lab("vx");
    let dir = lab.dir.clone();
    let rt = lab.ns("rt").name.clone();
    // The guest, on a tap that goes into the router's bridge.
    let tap = format!("{}t", &mux_up[..mux_up.len() - 1]);
    let spec = Spec::new("dip")
        .modules(&["ipip"])
        .memory(256)
        .tools(&[&host_tool("ip")])
        .nic(
            Nic::new(
                std::path::PathBuf::new(),
                "02:00:00:00:c8:05",
                &format!("{DIP}/24"),
            )
            .gateway("10.200.0.254")
            .tap(&tap),
        );
    let mut g = Guest::start(&dir, spec).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(60), || {
            std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()
        }),
        "QEMU made no tap {tap}: {}",
        g.qemu_log()
    );
    sh(&["ip", "link", "set", &tap, "netns", &rt]);
    lab.exec("rt", &["ip", "link", "set", &tap, "master", "br0"]);
    lab.exec("rt", &["ip", "link", "set", &tap, "up"]);
    g.wait_ready(BOOT).unwrap_or_else(|e| panic!("{e}"));
    // Katran's backend set-up: IP in IP taken in by the kernel's tunl0, the
    // VIP on lo, no reverse-path filter (the client's packets come out of
    // the tunnel, their replies leave by eth0).
    // (iproute2's, not busybox's: the host's `ip`, in /usr/local/bin.)
    let ip = "/usr/local/bin/ip";
    ok(
        &mut g,
        &format!(
            "{ip} link set tunl0 up && {ip} addr add {VIP}/32 dev lo && \
             for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done && \
             dd if=/dev/urandom of=/www/big bs=64k count=32 2>/dev/null && \
             md5sum /www/big && httpd -p 80 -h /www"
        ),
        30,
    );
    let md5 = ok(&mut g, "md5sum /www/big", 10);
    let md5 = md5.split_whitespace().next().unwrap().to_string();
    // The Mux, its one DIP the guest, on-link.
    let cap = dir.join("mux.pcap");
    let tcpdump = lab.capture("rt", "-i eth0 -nn", &cap);
    let (_, _, log) = lab.pollux("mux", &mux::config(&mux_up, &[], &[DIP], "/health"));
    let api = lab.api("mux");
    let logs = || format!("MUX:\n{}", read(&log));
    api.wait_ready(Duration::from_secs(30), logs);
    api.wait_probes(
        &[&format!("{DIP}:8080")],
        true,
        Duration::from_secs(60),
        logs,
    );
    // The client reaches the guest through the VIP.
    for _ in 0..5 {
        let out = lab.bash("cl", &format!("curl -sf --max-time 10 http://{VIP}/"));
        assert!(out.status.success(), "{out:?}\n{}", logs());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dip");
    }
    // A download, slow enough to see its connection in the guest.
    lab.spawn(
        "cl",
        &format!(
            "curl -sf --max-time 120 --limit-rate 200k -o {d}/big http://{VIP}/big; echo $? > {d}/big.rc",
            d = dir.display()
        ),
        &dir.join("big.log"),
    );
    let seen = wait_for(Duration::from_secs(30), || {
        g.run("netstat -tn", Duration::from_secs(10))
            .map(|o| o.out.contains(&format!("{CLIENT}:")))
            .unwrap_or(false)
    });
    assert!(seen, "the guest never saw the client's address\n{}", logs());
    assert!(
        wait_for(Duration::from_secs(120), || dir.join("big.rc").exists()),
        "the download did not finish\n{}",
        logs()
    );
    assert_eq!(read(&dir.join("big.rc")).trim(), "0");
    let got = sh(&["md5sum", dir.join("big").to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&got.stdout)
            .split_whitespace()
            .next(),
        Some(md5.as_str())
    );
    let c = api.get("/v1/counters").unwrap();
    let tx: u64 = c["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["mux_tx"].as_u64().unwrap_or(0))
        .sum();
    assert!(tx > 20, "{c}");
    common::netns::terminate(&mut lab.children[tcpdump]);
    let _ = lab.children[tcpdump].wait();
    let ipip = count(&cap, &format!("ip proto 4 and dst host {DIP}"));
    let replies = count(&cap, &format!("src host {VIP} and dst host {CLIENT}"));
    if ipip <= 20 {
        // What the capture holds, to tell a capture that missed them from
        // packets that went elsewhere.
        let all = std::process::Command::new("tcpdump")
            .args(["-nn", "-r", cap.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&all.stdout);
        panic!(
            "IP in IP to the guest: {ipip} of {} packets captured ({}); the first:\n{}",
            text.lines().count(),
            String::from_utf8_lossy(&all.stderr).trim(),
            text.lines().take(15).collect::<Vec<_>>().join("\n")
        );
    }
    assert_eq!(replies, 0, "replies through the Mux");
    eprintln!("mux link: {ipip} IP-in-IP packets to the guest, {replies} replies");
    g.kill();
}
