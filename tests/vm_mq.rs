//! Multi-queue vhost-user between pollux and real virtual machines: two
//! QEMU guests with two virtual CPUs and a two-queue-pair virtio-net NIC
//! each (testkit::guest), on `net_vhost` ports with `queues=2` served by
//! two pollux workers (each polls its own queue of every port).
//!
//! Each guest's virtio-net driver maps CPU N's transmissions to queue N, so
//! two web servers pinned to the web guest's two CPUs, and two downloads
//! pinned to the client's, send on both queues of both NICs: pollux's
//! per-queue counters show both queues of both ports carrying traffic,
//! both workers receive, both downloads arrive intact, and nothing is
//! dropped for want of a queue.
//!
//! Needs root, the `dpdk` feature and QEMU (`testkit::require`).
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::worker;
use common::netns::Lab;
use common::vm::{self, Vm, guest, ok};
use serde_json::Value;
use std::time::Duration;
use testkit::guest::accel;

const VMS: [Vm; 3] = [
    Vm {
        name: "client",
        vnet: "a",
        ip: "10.1.0.20",
        mac: "02:00:00:00:00:20",
        nsg: None,
        memory_mb: 192,
    },
    Vm {
        name: "web1",
        vnet: "a",
        ip: "10.1.0.4",
        mac: "02:00:00:00:00:04",
        nsg: None,
        memory_mb: 256,
    },
    Vm {
        name: "solo",
        vnet: "a",
        ip: "10.1.0.30",
        mac: "02:00:00:00:00:30",
        nsg: None,
        memory_mb: 192,
    },
];

const POLICY: &str = r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
"#;

/// The link of port `name`.
fn port_link(v: &Value, name: &str) -> String {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["link"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Twelve downloads of web1's `/small` (md5 `sum`) by `g`, a guest that
/// enabled only its first queue pair: the worker owning a connection (by
/// a hash of its ports) sends to `g`, and worker 1's packets must go out on
/// queue 0. (All twelve on worker 0 would leave that untested: one run in
/// 4 096.)
fn twelve_downloads(api: &common::api::Api, g: &mut testkit::guest::Guest, sum: &str) {
    let name = g.spec.name.clone();
    let before = api.get("/v1/counters").unwrap();
    let got = ok(
        g,
        "for i in 1 2 3 4 5 6; do for p in 8080 8081; do timeout 60 wget -q -O - http://10.1.0.4:$p/small | md5sum; done; done",
        900,
    );
    let sums: Vec<&str> = got
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(sums, vec![sum; 12], "{name}: {got}");
    let after = api.get("/v1/counters").unwrap();
    let by_worker1 = queue_tx(&after, &name, 1) - queue_tx(&before, &name, 1);
    assert!(
        by_worker1 > 20,
        "worker 1 sent {by_worker1} packets to {name}\n{after}"
    );
}

/// Counter `field` of queue `q` of port `name`.
fn queue_field(v: &Value, name: &str, q: usize, field: &str) -> u64 {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["queues"].as_array())
        .and_then(|qs| qs.iter().find(|x| x["queue"] == q))
        .and_then(|x| x[field].as_u64())
        .unwrap_or(0)
}

/// Received packets of queue `q` of port `name`.
fn queue_rx(v: &Value, name: &str, q: usize) -> u64 {
    queue_field(v, name, q, "rx_packets")
}

/// Packets sent through queue handle `q` (worker `q`'s) of port `name`.
fn queue_tx(v: &Value, name: &str, q: usize) -> u64 {
    queue_field(v, name, q, "tx_packets")
}

#[test]
fn two_queue_guests_use_both_workers() {
    if !vm::required() {
        return;
    }
    if core_affinity::get_core_ids().map_or(0, |c| c.len()) < 2 {
        panic!("the multi-queue test needs 2 cores for 2 workers");
    }
    let mut lab = Lab::new("vmmq");
    let dir = lab.dir.clone();
    let prefix = format!("pxmq{}", std::process::id());
    let _dpdk = vm::DpdkDir(prefix.clone());
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    let mut guests = vm::start(&dir, &VMS[..2], 2, 2);
    // A guest of one CPU enables one of its NIC's two queue pairs.
    guests.extend(vm::start(&dir, &VMS[2..], 2, 1));
    // The workers sleep 100 us after a run of empty polls: the guests'
    // emulated CPUs share the machine's two cores with them.
    let cfg = vm::config(&dir, &prefix, 2, 2, &VMS).replacen(
        "[dataplane]\nworkers = 2\n",
        "[dataplane]\nworkers = 2\nidle_sleep_us = 100\n",
        1,
    ) + POLICY;
    let (_idx, _out, log) = lab.pollux("pollux", &cfg);
    vm::wait_all(&mut guests, &log);
    let api = lab.api("pollux");
    let ctx = |guests: &[testkit::guest::Guest]| vm::context(&dir, guests);
    for g in guests.iter_mut().take(2) {
        let n = ok(
            g,
            "ls -d /sys/class/net/eth0/queues/tx-* | wc -l; nproc",
            10,
        );
        assert_eq!(
            n.split_whitespace().collect::<Vec<_>>(),
            ["2", "2"],
            "{}: tx queues, CPUs",
            g.spec.name
        );
    }
    // One web server per CPU of web1; a 16 MB file to fetch from each.
    let web1 = guest(&mut guests, "web1");
    let sum = ok(
        web1,
        "dd if=/dev/urandom of=/www/blob bs=1M count=16 2>/dev/null && md5sum /www/blob && taskset 1 httpd -p 8080 -h /www && taskset 2 httpd -p 8081 -h /www",
        120,
    );
    let sum = sum.split_whitespace().next().unwrap().to_string();
    let before = api.get("/v1/counters").unwrap();
    let got = ok(
        guest(&mut guests, "client"),
        "taskset 1 sh -c 'timeout 300 wget -q -O - http://10.1.0.4:8080/blob | md5sum > /tmp/a' & taskset 2 sh -c 'timeout 300 wget -q -O - http://10.1.0.4:8081/blob | md5sum > /tmp/b' & wait; cat /tmp/a /tmp/b",
        330,
    );
    let sums: Vec<&str> = got
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(sums, [sum.as_str(), sum.as_str()], "{got}");
    // The one-queue guest downloads too, over twelve connections.
    ok(
        guest(&mut guests, "web1"),
        "dd if=/dev/urandom of=/www/small bs=64k count=8 2>/dev/null",
        60,
    );
    let small = ok(guest(&mut guests, "web1"), "md5sum /www/small", 10);
    let small = small.split_whitespace().next().unwrap().to_string();
    twelve_downloads(&api, guest(&mut guests, "solo"), &small);
    let v = api.get("/v1/counters").unwrap();
    for name in ["client", "web1"] {
        for q in 0..2 {
            let n = queue_rx(&v, name, q) - queue_rx(&before, name, q);
            assert!(
                n > 100,
                "queue {q} of {name} received {n} packets\n{v}\n{}",
                ctx(&guests)
            );
        }
    }
    for w in 0..2 {
        assert!(worker(&v, w, "rx_packets") > 100, "worker {w} idle: {v}");
    }
    for p in v["ports"].as_array().unwrap() {
        // (A guest under emulation may fall behind and fill its ring:
        // tx_queue_full is no failure here. The one-queue guest's downloads
        // above show its disabled queue was not used: the half of them
        // sent there would have been lost.)
        assert!(
            p["drops"]["link_down"].is_null(),
            "link_down on {}: {p}",
            p["name"]
        );
    }
    assert!(
        worker(&v, 0, "idle_sleeps") + worker(&v, 1, "idle_sleeps") > 0,
        "{v}"
    );

    // The client's VM is restarted with one CPU: its queues went with the
    // old guest, the new one enables one pair, and what worker 1 sends it
    // still arrives, on queue 0.
    let client = guest(&mut guests, "client");
    let old = client.boot_id.clone();
    client.kill();
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "the client's link down",
        |v| port_link(v, "client") == "down",
        || ctx(&guests),
    );
    let client = guest(&mut guests, "client");
    client.spec.cpus = 1;
    client.restart().unwrap_or_else(|e| panic!("{e}"));
    client
        .wait_rebooted(&old, vm::BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "the client's link up",
        |v| port_link(v, "client") == "up",
        || ctx(&guests),
    );
    twelve_downloads(&api, guest(&mut guests, "client"), &small);
}
