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
use common::vm::{self, Vm, guest, link, ok, port_of, reachable};
use std::time::Duration;
use testkit::guest::{Guest, accel};

const VMS: [Vm; 2] = [vm::CLIENT, vm::WEB1];

const POLICY: &str = r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
"#;

#[test]
fn guests_talk_through_pollux_own_vhost_user_ports_across_reboots_and_restarts() {
    if !vm::required() {
        return;
    }
    let mut lab = Lab::new("vmvu");
    let dir = lab.dir.clone();
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    // web1 reboots below: QEMU keeps running through it.
    let mut guests = vm::start_rebootable(&dir, &VMS);
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
    vm::reboot_relinked(&api, &mut guests, "web1", ctx);
    ok(guest(&mut guests, "web1"), "httpd -p 8080 -h /www", 10);
    let body = ok(
        guest(&mut guests, "client"),
        "for i in $(seq 10); do timeout 20 wget -q -O - http://10.1.0.4:8080/ && break; sleep 1; done",
        240,
    );
    assert_eq!(body.trim(), "web1");

    // web1's QEMU dies and starts again on the same socket.
    let before = vm::kill_unreachable(&api, &mut guests, "web1", "client", "10.1.0.4", ctx);
    vm::restart_relinked(&api, &mut guests, "web1", &before, ctx);
    reachable(guest(&mut guests, "client"), "10.1.0.4");
    let (status, report) = lab.stop(idx, &out);
    assert!(status.success(), "{report}");
    // QEMU asked nothing of the ports that they refused (a connection
    // that ended did with its front end: closed, or its socket failed as
    // a QEMU died), and chose REPLY_ACK.
    let text = common::netns::read(&log);
    common::vhost_user_front_ends_refused_nothing(&text);
    assert!(
        text.contains("vhost-user front end closed the connection"),
        "{text}"
    );
}
