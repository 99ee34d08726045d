//! Reconnection between pollux and real virtual machines, both ways: two
//! QEMU guests (testkit::guest) on pollux's `net_vhost` ports in client
//! mode.
//!
//! - pollux restarted while the guests run (and a download between them
//!   is under way): the new pollux connects to the guests' sockets, their
//!   links come back, and the download completes intact (the connection is
//!   picked up mid-stream); the guests never rebooted.
//! - A guest rebooted while pollux runs: its port's link goes down and up
//!   (counted), and traffic resumes.
//! - A guest's QEMU killed and started again on the same socket: pollux
//!   reconnects by itself, while the link was down what it had to send the
//!   guest was counted `link_down`, and traffic resumes.
//!
//! Needs root, the `dpdk` feature and QEMU (`testkit::require`).
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::port;
use common::netns::Lab;
use common::vm::{self, Vm, guest, link, ok, reachable};
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
fn guests_and_pollux_reconnect_after_either_restarts() {
    if !vm::required() {
        return;
    }
    let mut lab = Lab::new("vmre");
    let dir = lab.dir.clone();
    let prefix = format!("pxre{}", std::process::id());
    let _dpdk = vm::DpdkDir(prefix.clone());
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    // web1 reboots below: QEMU keeps running through it.
    let mut guests = vm::start_rebootable(&dir, &VMS);
    let cfg = vm::config(&dir, &prefix, 1, 1, &VMS) + POLICY;
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
    ok(guest(&mut guests, "web1"), "httpd -p 8080 -h /www", 10);
    reachable(guest(&mut guests, "client"), "10.1.0.4");

    // pollux restarts under a download: it stalls in the client's pipe
    // until /tmp/go exists, pollux stops and starts again, then it goes on.
    let boots: Vec<String> = guests.iter().map(|g| g.boot_id.clone()).collect();
    let sent = ok(
        guest(&mut guests, "web1"),
        "dd if=/dev/urandom of=/www/blob bs=1M count=30 2>/dev/null && md5sum /www/blob",
        300,
    );
    let sent = sent.split_whitespace().next().unwrap().to_string();
    ok(
        guest(&mut guests, "client"),
        "(timeout 600 wget -q -O - http://10.1.0.4:8080/blob | (while [ ! -e /tmp/go ]; do sleep 0.2; done; md5sum > /tmp/blob.md5)) >/dev/null 2>&1 &",
        10,
    );
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "the download under way",
        // Well under what the client's socket and pipe hold before the
        // download stalls (about 200 KB in a small guest).
        |v| port(v, "web1", "rx_bytes") > 100_000,
        || ctx(&guests),
    );
    let (status, report) = lab.stop(idx, &out);
    assert!(status.success(), "{report}");
    // A second name: the first run's log stays for the failure context.
    let (_, _, log2) = lab.pollux("pollux2", &cfg);
    let api = lab.api("pollux2");
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "both links up after pollux restarted",
        |v| link(v, "client").0 == "up" && link(v, "web1").0 == "up",
        || ctx(&guests),
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
        "the download across pollux's restart arrived damaged"
    );
    for (g, before) in guests.iter_mut().zip(&boots) {
        let now = g.wait_ready(vm::BOOT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            &now, before,
            "{} rebooted while pollux restarted",
            g.spec.name
        );
    }

    // web1 reboots; pollux sees its link go down and come back.
    vm::reboot_relinked(&api, &mut guests, "web1", ctx);
    ok(guest(&mut guests, "web1"), "httpd -p 8080 -h /www", 10);
    let body = ok(
        guest(&mut guests, "client"),
        "timeout 20 wget -q -O - http://10.1.0.4:8080/",
        30,
    );
    assert_eq!(body.trim(), "web1");

    // web1's QEMU dies and starts again: pollux reconnects by itself. What
    // it had for web1 meanwhile is counted link_down.
    let before_kill = vm::kill_unreachable(&api, &mut guests, "web1", "client", "10.1.0.4", ctx);
    // ... and logs it.
    assert!(
        common::netns::wait_for(Duration::from_secs(10), || {
            common::netns::read(&log2)
                .lines()
                .any(|l| l.contains("WARN") && l.contains("link web1 down"))
        }),
        "no link-down event:\n{}",
        common::netns::read(&log2)
    );
    vm::restart_relinked(&api, &mut guests, "web1", &before_kill, ctx);
    reachable(guest(&mut guests, "client"), "10.1.0.4");
}
