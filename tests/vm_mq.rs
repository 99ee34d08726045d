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

/// The workers sleep 100 us after a run of empty polls: the guests'
/// emulated CPUs share the machine's two cores with them.
const POLICY: &str = r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
"#;

/// Received packets of queue `q` of port `name`.
fn queue_rx(v: &Value, name: &str, q: usize) -> u64 {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["queues"].as_array())
        .and_then(|qs| qs.iter().find(|x| x["queue"] == q))
        .and_then(|x| x["rx_packets"].as_u64())
        .unwrap_or(0)
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
    // The one-queue guest downloads too: whichever worker sends to it, its
    // packets go out on the queue it enabled.
    let got = ok(
        guest(&mut guests, "solo"),
        "timeout 300 wget -q -O - http://10.1.0.4:8080/blob | md5sum; timeout 300 wget -q -O - http://10.1.0.4:8081/blob | md5sum",
        620,
    );
    let sums: Vec<&str> = got
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(sums, [sum.as_str(), sum.as_str()], "{got}");
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
}
