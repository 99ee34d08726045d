//! `pollux pktgen` as users run it: the binary, through a pollux switch.
//!
//! - In process (no privileges): `--config examples/pktgen-ring.toml` starts
//!   pollux on ring ports; pktgen sends 1 000 UDP flows to the VIP, pollux
//!   load-balances them to the sink VM (DNAT), and pktgen's JSON report
//!   accounts for every packet with latency samples; the switch's own report
//!   agrees (one slow-path packet per flow, the rest on the fast path).
//! - Over DPDK (root, `dpdk` feature): `pollux run` owns vhost-user sockets
//!   (`net_vhost`), and a separate `pollux pktgen` process attaches
//!   `virtio_user` ports to them, as VMs do: the same VIP path over real
//!   DPDK vdevs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::process::Command;

fn json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs `pollux pktgen ARGS --json`, which must succeed; its report.
fn pktgen_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .arg("pktgen")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn pktgen_through_in_process_pollux_accounts_for_every_packet() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pktgen-ring.toml");
    let r = pktgen_json(&[
        "--config",
        cfg,
        "--tx",
        "ring:gen",
        "--rx",
        "ring:sink",
        "--dst-ip",
        "10.1.0.100",
        "--flows",
        "1000",
        "--rate",
        "20k",
        "--duration",
        "1",
        "--warmup",
        "0.3",
    ]);
    assert_eq!(r["mode"], "trial");
    assert_eq!(r["flows"], 1000);
    let t = &r["trials"][0];
    assert_eq!(t["label"], "rate");
    let tx = u(&t["tx"]);
    // 20 kpps for one second, paced by the TSC.
    assert!((19_000..=21_000).contains(&tx), "{t}");
    // At 20 kpps a stall of the switch's core of up to 50 ms fits in the
    // rings: nothing may be lost, duplicated or foreign.
    assert_eq!(u(&t["lost"]), 0, "{t}");
    assert_eq!(u(&t["rx"]), tx, "{t}");
    assert_eq!((u(&t["duplicates"]), u(&t["foreign"])), (0, 0), "{t}");
    assert_eq!(u(&t["latency_us"]["samples"]), tx, "{t}");
    let p50 = t["latency_us"]["p50"].as_f64().unwrap();
    let p99 = t["latency_us"]["p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p99, "{t}");
    // The switch saw the VIP traffic: 1 000 new flows on the slow path (one
    // per flow, warm-up included), the rest from the flow table.
    // The switch's stop report, as JSON.
    let sw = &r["switch"];
    let workers = sw["workers"].as_array().unwrap();
    let slow: u64 = workers.iter().map(|w| u(&w["slow_path"])).sum();
    let fast: u64 = workers.iter().map(|w| u(&w["fast_path"])).sum();
    assert_eq!(slow, 1000, "{sw}");
    assert!(fast > 0, "{sw}");
    assert!(
        sw["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["rule"] == "udp-load" && u(&l["hits"]) == 1000),
        "{sw}"
    );
}

#[test]
fn pktgen_reports_problems_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["pktgen", "--tx", "ring:gen"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --config"));
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pktgen-ring.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args([
            "pktgen",
            "--config",
            cfg,
            "--tx",
            "ring:nope",
            "--duration",
            "0.1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("port \"nope\" is not a ring port"), "{err}");
}

/// TCP SYN frames written to a pcap file are what tcpdump calls valid: the
/// flows' ports and correct TCP checksums.
#[test]
fn pktgen_writes_valid_tcp_syn_frames_to_pcap() {
    if !testkit::require::tool("tcpdump") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pollux-pktgen-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("syn.pcap");
    let r = pktgen_json(&[
        "--tx",
        &format!("pcap:{}", file.display()),
        "--proto",
        "tcp-syn",
        "--size",
        "76",
        "--flows",
        "3",
        "--rate",
        "2k",
        "--duration",
        "0.1",
        "--warmup",
        "0",
    ]);
    let tx = u(&r["trials"][0]["tx"]);
    assert!(tx > 0, "{r}");
    // Nothing comes back from a file: all of it counts as lost.
    assert_eq!(u(&r["trials"][0]["lost"]), tx);
    let dump = Command::new("tcpdump")
        .args(["-nn", "-vv", "-r", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    let frames: Vec<&str> = text.lines().filter(|l| l.contains("Flags [S]")).collect();
    assert_eq!(frames.len() as u64, tx, "{text}");
    let correct = text
        .lines()
        .filter(|l| l.contains("cksum") && l.contains("(correct)"));
    assert_eq!(correct.count() as u64, tx, "{text}");
    for sport in ["1024", "1025", "1026"] {
        assert!(
            text.contains(&format!("10.0.0.1.{sport} > 10.0.0.2.5000")),
            "{text}"
        );
    }
}

/// Kernel interfaces back to back: a veth pair this test creates, pktgen on
/// an `af_packet` socket at each end.
#[test]
fn pktgen_over_af_packet_on_a_veth_pair() {
    use common::netns::sh;
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let a = format!("pga{}", std::process::id() % 100_000);
    let b = format!("pgb{}", std::process::id() % 100_000);
    struct Veth(String);
    impl Drop for Veth {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
    let _veth = Veth(a.clone());
    for i in [&a, &b] {
        // No IPv6 on the pair: no router solicitations among the frames.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{i}/disable_ipv6"), "1");
        sh(&["ip", "link", "set", i, "up"]);
    }
    let r = pktgen_json(&[
        "--tx",
        &format!("af_packet:{a}"),
        "--rx",
        &format!("af_packet:{b}"),
        "--flows",
        "16",
        "--rate",
        "10k",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
    ]);
    let t = &r["trials"][0];
    let tx = u(&t["tx"]);
    assert!((4_500..=5_500).contains(&tx), "{t}");
    // A veth pair loses nothing at 10 kpps; every packet carries its stamp.
    assert_eq!(u(&t["rx"]), tx, "{t}");
    assert_eq!(
        (u(&t["lost"]), u(&t["duplicates"]), u(&t["reordered"])),
        (0, 0, 0),
        "{t}"
    );
    assert_eq!(u(&t["latency_us"]["samples"]), tx, "{t}");
}

#[cfg(feature = "dpdk")]
#[test]
fn pktgen_over_dpdk_vhost_through_pollux() {
    use common::netns::{Lab, read, wait_for};
    use std::time::Duration;
    // Root for DPDK's runtime directory.
    if !testkit::require::root() {
        return;
    }
    let id = std::process::id();
    struct Dirs(u32);
    impl Drop for Dirs {
        fn drop(&mut self) {
            for p in ["pgsw", "pgen"] {
                let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{p}{}", self.0));
            }
        }
    }
    let _dirs = Dirs(id);
    let mut lab = Lab::new("pktgen");
    let dir = lab.dir.clone();
    let sock = |n: &str| dir.join(format!("{n}.sock")).display().to_string();
    // pollux owns the sockets (vhost-user server); pktgen's virtio_user
    // ports connect as a VM's would.
    let cfg = common::dpdk::vip_config(
        &format!("pgsw{id}"),
        &format!("net_vhost0,iface={}", sock("client")),
        &format!("net_vhost1,iface={}", sock("dip1")),
    );
    let (idx, out, err) = lab.pollux("pollux", &cfg);
    // The API answers once every port is open and the workers run.
    lab.api("pollux")
        .wait_ready(Duration::from_secs(60), || read(&err));
    assert!(
        wait_for(Duration::from_secs(10), || {
            std::path::Path::new(&sock("client")).exists()
                && std::path::Path::new(&sock("dip1")).exists()
        }),
        "pollux did not open its vhost-user sockets: {}",
        read(&err)
    );
    let gen_out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args([
            "pktgen",
            "--tx",
            &format!(
                "dpdk:virtio_user0,path={},mac=02:00:00:00:00:20",
                sock("client")
            ),
            "--rx",
            &format!(
                "dpdk:virtio_user1,path={},mac=02:00:00:00:00:04",
                sock("dip1")
            ),
            "--eal",
            &format!("--no-huge -m 512 --no-pci -l 0 --log-level=error --file-prefix=pgen{id}"),
            "--src-ip",
            "10.1.0.20",
            "--dst-ip",
            "10.1.0.100",
            "--dst-mac",
            "12:34:56:78:9a:bc",
            "--dport",
            "80",
            "--flows",
            "100",
            "--rate",
            "20k",
            "--duration",
            "1",
            "--warmup",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let (status, report) = lab.stop(idx, &out);
    assert!(
        gen_out.status.success(),
        "pktgen: {}\npollux: {report}{}",
        String::from_utf8_lossy(&gen_out.stderr),
        read(&err)
    );
    assert!(status.success(), "{report}\n{}", read(&err));
    let r = json(&gen_out);
    let t = &r["trials"][0];
    let tx = u(&t["tx"]);
    assert!((18_000..=22_000).contains(&tx), "{t}");
    // Over vhost-user (256-descriptor rings) on a 2-core machine shared with
    // other tests, a stall of pollux's core loses packets, so only most of
    // them must arrive; those that do were DNATed (they reached the DIP's
    // port) and carry intact signatures.
    let rx = u(&t["rx"]);
    assert!(rx * 2 >= tx, "{t}\npollux: {report}");
    assert_eq!(u(&t["foreign"]), 0, "{t}");
    assert_eq!(u(&t["latency_us"]["samples"]), rx, "{t}");
    assert!(report.contains("switch drops: []"), "{report}");
}

/// pollux's own vhost-user ports (`driver = "vhost_user"`, no DPDK in
/// pollux) against DPDK's `virtio_user` front end in pktgen, which owns the
/// sockets as QEMU does: pollux connects to them, serves the VIP over
/// them, and connects again when pktgen comes back.
#[cfg(feature = "dpdk")]
#[test]
fn pktgen_over_virtio_user_through_pollux_own_vhost_user_ports() {
    use common::api::port;
    use common::netns::{Lab, read};
    use std::time::Duration;
    // Root for DPDK's runtime directory (pktgen's EAL).
    if !testkit::require::root() {
        return;
    }
    let id = std::process::id();
    let _dirs = common::vm::DpdkDir(format!("pgown{id}"));
    let mut lab = Lab::new("pktgen-own");
    let dir = lab.dir.clone();
    let sock = |n: &str| dir.join(format!("{n}.sock")).display().to_string();
    let cfg = common::dpdk::vip_config("unused", "", "");
    // The same VIP, on vhost_user ports instead of DPDK's (no [dpdk]).
    let cfg = cfg
        .split("[[vnet]]")
        .nth(1)
        .map(|rest| {
            format!(
                "[[port]]\nname = \"client\"\ndriver = \"vhost_user\"\nsocket = \"{}\"\n[[port]]\nname = \"dip1\"\ndriver = \"vhost_user\"\nsocket = \"{}\"\n[[vnet]]{rest}",
                sock("client"),
                sock("dip1")
            )
        })
        .unwrap();
    let (idx, out, err) = lab.pollux("pollux", &cfg);
    lab.api("pollux")
        .wait_ready(Duration::from_secs(60), || read(&err));
    let generate = |rate: &str, duration: &str| {
        // (A virtio_user server leaves its socket file behind, and cannot
        // bind to one left so.)
        for s in ["client", "dip1"] {
            let _ = std::fs::remove_file(sock(s));
        }
        Command::new(env!("CARGO_BIN_EXE_pollux"))
            .args([
                "pktgen",
                "--tx",
                &format!(
                    "dpdk:virtio_user0,path={},server=1,mac=02:00:00:00:00:20",
                    sock("client")
                ),
                "--rx",
                &format!(
                    "dpdk:virtio_user1,path={},server=1,mac=02:00:00:00:00:04",
                    sock("dip1")
                ),
                "--eal",
                &format!(
                    "--no-huge -m 512 --no-pci -l 0 --log-level=error --file-prefix=pgown{id}"
                ),
                "--src-ip",
                "10.1.0.20",
                "--dst-ip",
                "10.1.0.100",
                "--dst-mac",
                "12:34:56:78:9a:bc",
                "--dport",
                "80",
                "--flows",
                "100",
                "--rate",
                rate,
                "--duration",
                duration,
                "--warmup",
                "2",
                "--json",
            ])
            .output()
            .unwrap()
    };
    // Twice: the second pktgen is a new front end on the same sockets
    // (new guest memory, new rings), which pollux connects to again.
    let runs: Vec<_> = (0..2).map(|_| generate("20k", "1")).collect();
    let ports = lab.api("pollux").get("/v1/counters");
    let (status, report) = lab.stop(idx, &out);
    for g in &runs {
        assert!(
            g.status.success(),
            "pktgen: {}\npollux: {report}{}",
            String::from_utf8_lossy(&g.stderr),
            read(&err)
        );
    }
    assert!(status.success(), "{report}\n{}", read(&err));
    for g in &runs {
        let r = json(g);
        let t = &r["trials"][0];
        let tx = u(&t["tx"]);
        assert!((18_000..=22_000).contains(&tx), "{t}");
        // As over DPDK's vhost-user ports: a stall of pollux's core on this
        // shared machine may lose some; what arrives was DNATed to the
        // DIP's port, intact.
        let rx = u(&t["rx"]);
        assert!(rx * 2 >= tx, "{t}\npollux: {report}");
        assert_eq!(u(&t["foreign"]), 0, "{t}");
        assert_eq!(u(&t["latency_us"]["samples"]), rx, "{t}");
    }
    assert!(report.contains("switch drops: []"), "{report}");
    // pollux's ports counted what both runs sent and received, saw no bad
    // descriptor, and went up and down with each front end.
    let c = ports.unwrap();
    let (sent, got): (u64, u64) = runs
        .iter()
        .map(|g| {
            let t = &json(g)["trials"][0];
            (u(&t["tx"]), u(&t["rx"]))
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert!(port(&c, "client", "rx_packets") >= sent, "{c}");
    assert!(port(&c, "dip1", "tx_packets") >= got, "{c}");
    assert!(port(&c, "client", "link_changes") >= 3, "{c}");
    assert!(!c.to_string().contains("bad_descriptor"), "{c}");
    // virtio_user chose REPLY_ACK, had no request refused, and no
    // connection ended on a refusal.
    common::vhost_user_front_ends_refused_nothing(&read(&err));
}
