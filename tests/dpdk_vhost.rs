//! End to end over DPDK with a real external peer: `dpdk-testpmd` drives
//! `virtio_user` ports whose vhost-user sockets pollux's `net_vhost` ports
//! connect to (pollux in client mode, as VMs' switches run).
//!
//! testpmd A (the client VM) sends UDP 10.1.0.20:40000 -> VIP 10.1.0.100:80
//! (`txonly`); pollux DNATs it to the DIP 10.1.0.4:8080 and sends it to
//! testpmd B (the DIP), which swaps addresses and ports and sends it back
//! (`5tswap`). The swapped packet is 10.1.0.4:8080 -> 10.1.0.20:40000 only
//! if the DNAT happened: it then hits the connection's reverse flow (fast
//! path) and goes back to the client. Had the destination not been
//! translated, the reply would come from the VIP's address and be dropped as
//! spoofed. So: testpmd B's counters show the packets, pollux's report shows
//! them forwarded both ways on the fast path with no switch drop.
//!
//! Needs root (DPDK's runtime directory), the `dpdk` feature and
//! `dpdk-testpmd` (`testkit::require`: without them it says why it did not
//! run; under CI it fails).
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, wait_for};
use std::process::{Child, Command};
use std::time::Duration;

/// Removes DPDK's per-process runtime directories of this test.
struct DpdkDirs;

impl Drop for DpdkDirs {
    fn drop(&mut self) {
        let id = std::process::id();
        for p in ["tpdip", "tpcl", "pollux"] {
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{p}{id}"));
        }
    }
}

fn testpmd(
    dir: &std::path::Path,
    prefix: &str,
    vdevs: &[String],
    app: &[&str],
    log: &str,
) -> Child {
    let mut cmd = Command::new("dpdk-testpmd");
    cmd.args([
        "-l",
        "0,1",
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "--log-level=error",
    ])
    .arg(format!("--file-prefix={prefix}"));
    for v in vdevs {
        cmd.arg(format!("--vdev={v}"));
    }
    cmd.arg("--")
        .args([
            "--total-num-mbufs=16384",
            "--nb-cores=1",
            "--stats-period=1",
        ])
        .args(app)
        .stdout(std::fs::File::create(dir.join(log)).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{log}.err"))).unwrap());
    cmd.spawn().unwrap()
}

/// "port NAME: rx R tx T drops D" from pollux's report.
fn port(report: &str, name: &str) -> (u64, u64, u64) {
    let l = report
        .lines()
        .find(|l| l.starts_with(&format!("port \"{name}\": ")))
        .unwrap_or_else(|| panic!("no port {name} in {report}"));
    let w: Vec<u64> = l
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (w[0], w[1], w[2])
}

#[test]
fn testpmd_traffic_crosses_pollux_with_lb_nat() {
    if !testkit::require::root_and(&["dpdk-testpmd"]) {
        return;
    }
    let id = std::process::id();
    // Dropped last: the processes (the lab's) end before their directories go.
    let _dpdk_dirs = DpdkDirs;
    let mut lab = Lab::new("vhost");
    let dir = lab.dir.clone();
    let sock = |n: &str| dir.join(format!("{n}.sock")).display().to_string();
    // The VMs' side: testpmd owns the sockets (server), pollux connects.
    lab.children.push(testpmd(
        &dir,
        &format!("tpdip{id}"),
        &[format!(
            "virtio_user1,path={},server=1,queues=1,mac=02:00:00:00:00:04",
            sock("dip1")
        )],
        &["--forward-mode=5tswap", "--port-topology=loop"],
        "dip.log",
    ));
    lab.children.push(testpmd(
        &dir,
        &format!("tpcl{id}"),
        &[format!(
            "virtio_user0,path={},server=1,queues=1,mac=02:00:00:00:00:20",
            sock("client")
        )],
        &[
            "--forward-mode=txonly",
            "--tx-ip=10.1.0.20,10.1.0.100",
            "--tx-udp=40000,80",
            "--eth-peer=0,12:34:56:78:9a:bc",
        ],
        "client.log",
    ));
    assert!(
        wait_for(Duration::from_secs(60), || std::path::Path::new(&sock(
            "dip1"
        ))
        .exists()
            && std::path::Path::new(&sock("client")).exists()),
        "testpmd did not open its sockets: {}",
        read(&dir.join("client.log.err"))
    );
    let cfg = common::dpdk::vip_config(
        &format!("pollux{id}"),
        &format!("net_vhost0,iface={},client=1", sock("client")),
        &format!("net_vhost1,iface={},client=1", sock("dip1")),
    );
    let (idx, out, err) = lab.pollux("pollux", &cfg);
    // Let traffic flow until pollux has carried plenty both ways: the
    // client's packets in and out to the DIP, the DIP's answers in and back.
    let dip_log = dir.join("dip.log");
    lab.api("pollux").wait_for(
        "/v1/counters",
        Duration::from_secs(90),
        "traffic through pollux both ways",
        |v| {
            use common::api::port;
            port(v, "client", "rx_packets") > 12_000
                && port(v, "dip1", "tx_packets") > 12_000
                && port(v, "dip1", "rx_packets") > 12_000
                && port(v, "client", "tx_packets") > 0
        },
        || format!("pollux: {}\ntestpmd: {}", read(&err), read(&dip_log)),
    );
    let (status, report) = lab.stop(idx, &out);
    assert!(status.success(), "{report}\n{}", read(&err));
    eprintln!("pollux report:\n{report}");
    // Client -> VIP in, DNATed out to the DIP; the DIP's swapped replies
    // in, reverse-NATed out to the client (whose txonly testpmd does not
    // read them: its full ring shows as the client port's drops).
    let (c_rx, c_tx, c_drops) = port(&report, "client");
    let (d_rx, d_tx, d_drops) = port(&report, "dip1");
    assert!(c_rx > 10_000 && d_tx > 10_000, "{report}");
    assert!(d_rx > 10_000 && c_tx > 0, "{report}");
    // A peer that falls behind fills its ring: what it refused is counted,
    // never lost silently. Every packet in went out or is counted.
    assert_eq!(c_rx, d_tx + d_drops, "{report}");
    assert_eq!(d_rx, c_tx + c_drops, "{report}");
    assert!(report.contains("switch drops: []"), "{report}");
    let fast: u64 = report
        .lines()
        .next()
        .and_then(|l| l.split("; ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(fast > 20_000, "{report}");
}
