//! Hitless upgrade of a pollux on DPDK devices that only one process can
//! drive (here DPDK's `net_af_packet` vdevs on veths; a NIC's PCI function
//! goes the same way): the running pollux gives its devices up once its
//! workers stop, the successor opens them once told to go, and the
//! blackout (stop to start, devices reopened included) is printed.
//!
//! Topology: a server (10.1.0.4, backend of TCP VIP 10.1.0.100:80 with an
//! HTTP probe) and a client (10.1.0.20) in network namespaces, each on a
//! veth whose host end is a `net_af_packet` device of pollux.
//!
//! Shown: two rate-limited downloads through the VIP (DNAT: their
//! connection state must come along) complete intact across two upgrades;
//! a successor killed after it received the state makes the running
//! pollux open its devices again and forward on (the downloads still
//! complete, new requests work).
//!
//! Needs root, the `dpdk` feature, `ip`, `ethtool`, `curl`, `python3`.
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, wait_for};
use common::takeover::{download, downloads_intact};
use common::vm::DpdkDir;
use serde_json::Value;
use std::time::{Duration, Instant};

fn config(lab: &Lab, prefix: &str) -> String {
    format!(
        r#"[dpdk]
eal_args = ["--no-huge", "--no-pci", "-m", "256", "-l", "1", "--log-level=error", "--file-prefix={prefix}"]
[dataplane]
idle_sleep_us = 20
[[port]]
name = "s1"
driver = "dpdk"
devargs = "net_af_packet0,iface={s1}"
[[port]]
name = "cl"
driver = "dpdk"
devargs = "net_af_packet1,iface={cl}"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vm]]
name = "s1"
port = "s1"
vnet = "a"
mac = "02:00:00:00:01:04"
ips = ["10.1.0.4"]
[[vm]]
name = "cl"
port = "cl"
vnet = "a"
mac = "02:00:00:00:01:20"
ips = ["10.1.0.20"]
[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ {{ vm = "s1", port = 8000 }} ]
[vip.probe]
kind = "http"
port = 8000
path = "/health"
interval_ms = 200
timeout_ms = 150
"#,
        s1 = lab.ns("s1").host,
        cl = lab.ns("cl").host,
    )
}

fn status(api: &common::api::Api) -> Value {
    api.get("/v1/status").unwrap_or(Value::Null)
}

#[test]
fn dpdk_devices_are_given_up_and_taken_back_across_upgrades() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3"]) {
        return;
    }
    let mut lab = Lab::new("dup");
    let dir = lab.dir.clone();
    let prefix = format!("pxdu{}", std::process::id());
    let _dpdk = DpdkDir(prefix.clone());
    for (tag, cidr, mac) in [
        ("s1", "10.1.0.4/16", "02:00:00:00:01:04"),
        ("cl", "10.1.0.20/16", "02:00:00:00:01:20"),
    ] {
        lab.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", cidr, "dev", "eth0"],
                // DPDK's af_packet driver does not complete partial
                // checksums: the senders fill theirs in.
                vec!["ethtool", "-K", "eth0", "tx", "off"],
            ],
        );
        lab.exec(tag, &["ip", "route", "add", "default", "via", "10.1.0.1"]);
    }
    lab.exec(
        "cl",
        &["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 32768 65536"],
    );
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let big: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(www.join("big"), &big).unwrap();
    std::fs::write(www.join("health"), "ok").unwrap();
    lab.http_server("s1", "10.1.0.4", 8000, &www, &dir.join("http.log"));
    let (mut idx, mut out, mut log) = lab.pollux("d0", &config(&lab, &prefix));
    let api = lab.api("d0");
    api.wait_ready(Duration::from_secs(60), || read(&log));
    api.wait_probes(&["10.1.0.4:8000"], true, Duration::from_secs(60), || {
        read(&log)
    });
    let fetch = |lab: &Lab| {
        lab.bash("cl", "curl -sf --max-time 3 http://10.1.0.100/health")
            .status
            .success()
    };
    assert!(
        wait_for(Duration::from_secs(30), || fetch(&lab)),
        "{}",
        read(&log)
    );
    for i in 0..2 {
        download(&mut lab, "cl", i, "http://10.1.0.100/big", "50k");
    }
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(30),
        "the downloads under way",
        |v| common::api::port(v, "cl", "tx_bytes") > 100_000,
        || read(&log),
    );

    for k in 1..=2 {
        let (n, o, l) = lab.pollux_takeover(&format!("d{k}"), "d0", &[]);
        let pid = u64::from(lab.children[n].id());
        let s = api.wait_for(
            "/v1/status",
            Duration::from_secs(60),
            "the successor running",
            |v| v["pid"].as_u64() == Some(pid),
            || format!("{}\n{}", read(&log), read(&l)),
        );
        let t = &s["takeover"];
        eprintln!(
            "upgrade {k}: traffic stopped {:.1} ms (devices given up and opened again); {} connections",
            t["blackout_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            t["connections"]
        );
        assert!(t["connections"].as_u64().unwrap() >= 2, "{s}");
        let end = Instant::now() + Duration::from_secs(30);
        while lab.children[idx].try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "the predecessor did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        (idx, out, log) = (n, o, l);
        assert!(
            wait_for(Duration::from_secs(30), || fetch(&lab)),
            "upgrade {k}: no new request through the VIP\n{}",
            read(&log)
        );
    }

    // Killed after it received the state: the running pollux opens its
    // devices again and goes on.
    let pid = status(&api)["pid"].as_u64().unwrap();
    let before = api.get("/v1/counters").unwrap();
    let dying = dir.join("dying.py");
    std::fs::write(&dying, common::takeover::DYING_SUCCESSOR).unwrap();
    let n = lab.spawn_root(
        &format!(
            "exec python3 {} {} {}",
            dying.display(),
            api.sock.display(),
            dir.join("state.json").display()
        ),
        &dir.join("dying.log"),
    );
    let end = Instant::now() + Duration::from_secs(30);
    while lab.children[n].try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "the dying successor lives");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = api.wait_for(
        "/v1/status",
        Duration::from_secs(30),
        "the dead successor noted",
        |v| {
            v["takeover_failed"]
                .as_str()
                .is_some_and(|f| f.contains("went away"))
        },
        || read(&log),
    );
    assert_eq!(s["pid"].as_u64(), Some(pid), "{s}");
    let sent: Value = serde_json::from_str(&read(&dir.join("state.json"))).unwrap();
    assert_eq!(sent["ports"].as_array().unwrap().len(), 2, "{sent}");
    assert!(
        wait_for(Duration::from_secs(30), || fetch(&lab)),
        "no new request through the VIP after the failed handover\n{}",
        read(&log)
    );
    // The devices opened again count on from where they were.
    let after = api.get("/v1/counters").unwrap();
    for name in ["s1", "cl"] {
        let (b, a) = (
            common::api::port(&before, name, "rx_packets"),
            common::api::port(&after, name, "rx_packets"),
        );
        assert!(a > b && b > 0, "{name}: rx_packets {b} then {a}");
    }

    downloads_intact(&dir, Duration::from_secs(120), 0..2, &big, || read(&log));
    let (st, report) = lab.stop(idx, &out);
    assert!(st.success(), "{report}\n{}", read(&log));
}
