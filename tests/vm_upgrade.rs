//! Hitless upgrade under real virtual machines: two QEMU guests
//! (testkit::guest) on pollux's `net_vhost` ports in client mode, a VIP
//! with an HTTP probe between them, and `pollux run --takeover` three times
//! in a row while a download through the VIP is under way.
//!
//! Each successor initialises DPDK under a file prefix of its own and
//! opens the vhost-user ports once its predecessor has stopped; the
//! guests' QEMUs take its connections when the predecessor's close. Shown:
//! the download (DNAT through the VIP, so its connection's state must come
//! along each time) completes intact, the guests never reboot, the probe
//! state and the ports' counters carry over, and new connections through
//! the VIP work after; each upgrade's blackout (the successor's count) and
//! the time until both guests' links were up again are printed. The
//! client's NIC does not report link state to the guest (`status=off`,
//! as an operator configures VMs whose switch is upgraded under them):
//! its kernel counts no carrier change across the upgrades; web1's does
//! report it, and what its kernel saw is printed beside.
//!
//! Needs root, the `dpdk` feature and QEMU (`testkit::require`).
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::port;
use common::netns::{Lab, read};
use common::vm::{self, Vm, guest, ok};
use serde_json::Value;
use std::time::{Duration, Instant};
use testkit::guest::{Guest, Nic, Spec, accel};

const VMS: [Vm; 2] = [vm::CLIENT, vm::WEB1];

const POLICY: &str = r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { vm = "web1", port = 8080 } ]
[vip.probe]
kind = "http"
port = 8080
path = "/"
interval_ms = 500
timeout_ms = 400
threshold = 2
"#;

fn link(v: &Value, name: &str) -> String {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["link"].as_str())
        .unwrap_or("")
        .to_string()
}

fn both_up(v: &Value) -> bool {
    link(v, "client") == "up" && link(v, "web1") == "up"
}

#[test]
fn guests_keep_a_download_through_a_vip_across_three_upgrades() {
    if !vm::required() {
        return;
    }
    let mut lab = Lab::new("vmup");
    let dir = lab.dir.clone();
    let prefix = format!("pxup{}", std::process::id());
    let _dpdk = vm::DpdkDir(prefix.clone());
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    let mut guests: Vec<Guest> = VMS
        .iter()
        .map(|v| {
            let mut nic = Nic::new(vm::socket(&dir, v.name), v.mac, &format!("{}/16", v.ip))
                .gateway("10.1.0.1");
            if v.name == "client" {
                nic = nic.without_link_status();
            }
            let spec = Spec::new(v.name)
                .memory(v.memory_mb)
                .host_cpus("0")
                .nic(nic);
            Guest::start(&dir, spec).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let cfg = vm::config(&dir, &prefix, 1, 1, &VMS) + POLICY;
    let (mut idx, _, log) = lab.pollux("pollux", &cfg);
    vm::wait_all(&mut guests, &log);
    let api = lab.api("pollux");
    let ctx = |guests: &[Guest]| {
        let mut s = String::new();
        for n in ["pollux", "up1", "up2", "up3"] {
            let l = dir.join(format!("{n}.log"));
            if l.exists() {
                s += &format!("--- {n} ---\n{}\n", read(&l));
            }
        }
        s + &vm::context(&dir, guests)
    };
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "both links up",
        both_up,
        || ctx(&guests),
    );
    ok(
        guest(&mut guests, "web1"),
        "echo web1 > /www/index.html; httpd -p 8080 -h /www",
        10,
    );
    api.wait_probes(&["10.1.0.4:8080"], true, Duration::from_secs(120), || {
        ctx(&guests)
    });
    let body = ok(
        guest(&mut guests, "client"),
        "for i in $(seq 20); do timeout 10 wget -q -O - http://10.1.0.100/ && break; sleep 1; done",
        240,
    );
    assert!(body.contains("web1"), "{body}");

    // A download through the VIP that stalls in the client's pipe until
    // /tmp/go exists: its connection (DNAT) must outlive every upgrade.
    let boots: Vec<String> = guests.iter().map(|g| g.boot_id.clone()).collect();
    let sent = ok(
        guest(&mut guests, "web1"),
        "dd if=/dev/urandom of=/www/blob bs=1M count=20 2>/dev/null && md5sum /www/blob",
        300,
    );
    let sent = sent.split_whitespace().next().unwrap().to_string();
    ok(
        guest(&mut guests, "client"),
        "(timeout 900 wget -q -O - http://10.1.0.100/blob | (while [ ! -e /tmp/go ]; do sleep 0.2; done; md5sum > /tmp/blob.md5)) >/dev/null 2>&1 &",
        10,
    );
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "the download under way",
        |v| port(v, "web1", "rx_bytes") > 100_000,
        || ctx(&guests),
    );

    let carrier = |guests: &mut [Guest], name: &str| -> u64 {
        ok(
            guest(guests, name),
            "cat /sys/class/net/eth0/carrier_changes",
            10,
        )
        .trim()
        .parse()
        .unwrap()
    };
    let flaps: Vec<u64> = ["client", "web1"]
        .iter()
        .map(|n| carrier(&mut guests, n))
        .collect();
    // VIRTIO_NET_F_STATUS (feature bit 16) offered to web1 only.
    for (name, want) in [("client", '0'), ("web1", '1')] {
        let bits = ok(
            guest(&mut guests, name),
            "cat /sys/class/net/eth0/device/features",
            10,
        );
        assert_eq!(bits.trim().chars().nth(16), Some(want), "{name}: {bits}");
    }

    for n in 1..=3 {
        let before = api.get("/v1/counters").unwrap();
        let old_pid = api.get("/v1/status").unwrap()["pid"].as_u64().unwrap();
        let start = Instant::now();
        let (next, _, _) = lab.pollux_takeover(&format!("up{n}"), "pollux", &[]);
        let end = Instant::now() + Duration::from_secs(120);
        let st = loop {
            if let Some(s) = lab.children[idx].try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < end,
                "upgrade {n}: pid {old_pid} did not exit\n{}",
                ctx(&guests)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "upgrade {n}: exit {st}\n{}", ctx(&guests));
        api.wait_for(
            "/v1/status",
            Duration::from_secs(60),
            &format!("upgrade {n}: the successor serves the API"),
            |v| v["takeover"]["from_pid"].as_u64() == Some(old_pid),
            || ctx(&guests),
        );
        api.wait_for(
            "/v1/counters",
            Duration::from_secs(120),
            &format!("upgrade {n}: both guests' links up again"),
            both_up,
            || ctx(&guests),
        );
        let s = api.wait_for(
            "/v1/status",
            Duration::from_secs(30),
            &format!("upgrade {n}: the links' return noted"),
            |v| v["takeover"]["links_up_us"].as_u64().is_some(),
            || ctx(&guests),
        );
        let t = &s["takeover"];
        eprintln!(
            "upgrade {n}: workers stopped for {:.1} ms, guests' links back after {:.1} ms (the successor's counts); {:.0} ms from its start to links up; {} connections",
            t["blackout_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            t["links_up_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            start.elapsed().as_secs_f64() * 1000.0,
            t["connections"]
        );
        assert!(t["connections"].as_u64().unwrap() >= 1, "{t}");
        assert_eq!(t["probes"].as_u64(), Some(1), "{t}");
        assert_eq!(t["sockets"].as_u64(), Some(0), "{t}");
        let p = api.get("/v1/probes").unwrap();
        assert!(
            common::api::probes(&p)
                .iter()
                .all(|(_, up)| *up == Some(true)),
            "upgrade {n}: {p}"
        );
        let now = api.get("/v1/counters").unwrap();
        for name in ["client", "web1"] {
            assert!(
                port(&now, name, "rx_packets") >= port(&before, name, "rx_packets"),
                "upgrade {n}: {name}'s counters went back"
            );
        }
        idx = next;
    }

    let client = carrier(&mut guests, "client");
    let web1 = carrier(&mut guests, "web1");
    eprintln!(
        "carrier changes across the upgrades: client (no link state) {}, web1 (link state) {}",
        client - flaps[0],
        web1 - flaps[1]
    );
    assert_eq!(
        client,
        flaps[0],
        "the client guest saw its link go down\n{}",
        ctx(&guests)
    );

    ok(guest(&mut guests, "client"), "touch /tmp/go", 10);
    let got = (0..600)
        .find_map(|_| {
            let o = guest(&mut guests, "client")
                .run("cat /tmp/blob.md5", Duration::from_secs(10))
                .unwrap();
            if o.status == 0 && o.out.len() >= 32 {
                return Some(o.out.split_whitespace().next().unwrap().to_string());
            }
            std::thread::sleep(Duration::from_millis(500));
            None
        })
        .unwrap_or_else(|| panic!("the download did not finish\n{}", ctx(&guests)));
    assert_eq!(
        got, sent,
        "the download across the upgrades arrived damaged"
    );
    for (g, before) in guests.iter_mut().zip(&boots) {
        let now = g.wait_ready(vm::BOOT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&now, before, "{} rebooted during the upgrades", g.spec.name);
    }
    let body = ok(
        guest(&mut guests, "client"),
        "timeout 20 wget -q -O - http://10.1.0.100/",
        30,
    );
    assert_eq!(body.trim(), "web1");
    let (st, report) = lab.stop(idx, &dir.join("up3.out"));
    assert!(st.success(), "{report}\n{}", ctx(&guests));
}
