//! pollux's own vhost-user ports (`driver = "vhost_user"`: no DPDK in
//! pollux) between real virtual machines: two QEMU guests (testkit::guest)
//! whose Linux virtio-net driver runs on the rings pollux serves.
//!
//! Shown, in order: both guests boot and their links come up; ping both
//! ways; a 10 MB download from web1's httpd arrives intact (its data
//! crosses web1's transmit ring and the client's receive ring, its ACKs
//! the other two); web1 reboots, its driver resets the device and sets its
//! rings up again, and traffic resumes; web1's QEMU is killed (what pollux
//! has for it meanwhile is counted `link_down`) and started again on the
//! same socket, pollux connects to it by itself, and traffic resumes.
//!
//! Needs root and QEMU (`testkit::require`: without them it says why it
//! did not run; under CI it fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::Lab;
use common::vm::{self, Vm, guest, ok};
use serde_json::Value;
use std::time::Duration;
use testkit::guest::{Guest, Nic, Spec, accel};

const VMS: [Vm; 2] = [vm::CLIENT, vm::WEB1];

const POLICY: &str = r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
"#;

fn port_of<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn link(v: &Value, name: &str) -> (String, u64) {
    let p = port_of(v, name);
    (
        p["link"].as_str().unwrap_or("").to_string(),
        p["link_changes"].as_u64().unwrap_or(0),
    )
}

/// Pings `to` from `from` until one gets through (a link just back may
/// lose the first).
fn reachable(from: &mut Guest, to: &str) {
    let o = ok(
        from,
        &format!("for i in $(seq 30); do ping -c 1 -W 2 {to} >/dev/null && echo ok && break; done"),
        120,
    );
    assert!(
        o.contains("ok"),
        "{to} unreachable from {}: {o}",
        from.spec.name
    );
}

#[test]
fn guests_talk_through_pollux_own_vhost_user_ports_across_reboots_and_restarts() {
    if !vm::required() {
        return;
    }
    let mut lab = Lab::new("vmvu");
    let dir = lab.dir.clone();
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    let mut guests: Vec<Guest> = VMS
        .iter()
        .map(|v| {
            let nic = Nic::new(vm::socket(&dir, v.name), v.mac, &format!("{}/16", v.ip))
                .gateway("10.1.0.1");
            // web1 reboots below: QEMU keeps running through it.
            let spec = Spec::new(v.name)
                .memory(v.memory_mb)
                .host_cpus("0")
                .nic(nic)
                .rebootable();
            Guest::start(&dir, spec).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let cfg = vm::own_config(&dir, &VMS) + POLICY;
    let (idx, out, log) = lab.pollux("pollux", &cfg);
    vm::wait_all(&mut guests, &log);
    let api = lab.api("pollux");
    let ctx = |guests: &[Guest]| vm::context(&dir, guests);
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "both links up",
        |v| link(v, "client").0 == "up" && link(v, "web1").0 == "up",
        || ctx(&guests),
    );
    reachable(guest(&mut guests, "client"), "10.1.0.4");
    reachable(guest(&mut guests, "web1"), "10.1.0.20");

    // A download, checked end to end.
    ok(guest(&mut guests, "web1"), "httpd -p 8080 -h /www", 10);
    let sent = ok(
        guest(&mut guests, "web1"),
        "dd if=/dev/urandom of=/www/blob bs=1M count=10 2>/dev/null && md5sum /www/blob",
        300,
    );
    let sent = sent.split_whitespace().next().unwrap().to_string();
    let got = ok(
        guest(&mut guests, "client"),
        "timeout 600 wget -q -O - http://10.1.0.4:8080/blob | md5sum",
        660,
    );
    assert_eq!(
        got.split_whitespace().next().unwrap(),
        sent,
        "the download through pollux's own vhost-user ports arrived damaged"
    );
    let c = api.get("/v1/counters").unwrap();
    let web1 = port_of(&c, "web1");
    assert!(web1["rx_bytes"].as_u64().unwrap_or(0) > 10_000_000, "{c}");
    for p in ["client", "web1"] {
        assert!(
            port_of(&c, p)["drops"].get("bad_descriptor").is_none(),
            "{c}"
        );
    }

    // web1 reboots: its driver resets the device and sets it up again.
    let (_, changes) = link(&c, "web1");
    let w = guest(&mut guests, "web1");
    let old = w.boot_id.clone();
    w.start_command("reboot -f")
        .unwrap_or_else(|e| panic!("{e}"));
    w.wait_rebooted(&old, vm::BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "web1's link down and up again",
        |v| {
            let (l, n) = link(v, "web1");
            l == "up" && n >= changes + 2
        },
        || ctx(&guests),
    );
    ok(guest(&mut guests, "web1"), "httpd -p 8080 -h /www", 10);
    let body = ok(
        guest(&mut guests, "client"),
        "for i in $(seq 10); do timeout 20 wget -q -O - http://10.1.0.4:8080/ && break; sleep 1; done",
        240,
    );
    assert_eq!(body.trim(), "web1");

    // web1's QEMU dies and starts again on the same socket.
    let w = guest(&mut guests, "web1");
    let before = w.boot_id.clone();
    w.kill();
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "web1's link down",
        |v| link(v, "web1").0 == "down",
        || ctx(&guests),
    );
    let o = guest(&mut guests, "client")
        .run("ping -c 3 -W 1 10.1.0.4", Duration::from_secs(20))
        .unwrap();
    assert_ne!(o.status, 0, "web1 answered while its QEMU was gone: {o:?}");
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(30),
        "link_down drops on web1",
        |v| {
            port_of(v, "web1")["drops"]["link_down"]
                .as_u64()
                .unwrap_or(0)
                > 0
        },
        || ctx(&guests),
    );
    let w = guest(&mut guests, "web1");
    w.restart().unwrap_or_else(|e| panic!("{e}"));
    w.wait_rebooted(&before, vm::BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "web1's link up after its QEMU restarted",
        |v| link(v, "web1").0 == "up",
        || ctx(&guests),
    );
    reachable(guest(&mut guests, "client"), "10.1.0.4");
    let (status, report) = lab.stop(idx, &out);
    assert!(status.success(), "{report}");
    // QEMU asked nothing of the ports that they refused: every connection
    // ended with its front end, none on an error.
    let text = common::netns::read(&log);
    assert!(!text.contains("vhost-user connection dropped"), "{text}");
    assert!(
        text.contains("vhost-user front end closed the connection"),
        "{text}"
    );
}
