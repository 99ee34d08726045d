//! pollux between real virtual machines: five QEMU guests (Debian's cloud
//! kernel, busybox, virtio-net on vhost-user; testkit::guest) on pollux's
//! `net_vhost` ports.
//!
//! Tenant a (10.1.0.0/16): a client and three web guests (busybox httpd on
//! 8080, `/health`) behind the VIP 10.1.0.100:80 with HTTP probes; the web
//! guests' group denies TCP 9000. Tenant b has the same prefix and a guest
//! with web1's address. Shown, in order: every guest boots and gets its
//! link; requests to the VIP reach all three web guests; a web guest whose
//! health fails leaves the VIP while a large download it was serving goes
//! on intact, and comes back; ping between guests; the group's deny (its
//! rule counted) beside an allowed port; tenant isolation with overlapping
//! addresses; a 100 MB TCP transfer (`POLLUX_VM_BLOB_MB`) with matching
//! checksums on both sides.
//!
//! Needs root, the `dpdk` feature and QEMU (`testkit::require`: without
//! them it says why it did not run; under CI it fails).
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::{port, probes};
use common::netns::Lab;
use common::vm::{self, Vm, guest, ok, rule_hits};
use std::time::{Duration, Instant};
use testkit::guest::accel;

const VMS: [Vm; 5] = [
    vm::CLIENT,
    Vm {
        name: "web1",
        vnet: "a",
        ip: "10.1.0.4",
        mac: "02:00:00:00:00:04",
        nsg: Some("web"),
        memory_mb: 352,
    },
    Vm {
        name: "web2",
        vnet: "a",
        ip: "10.1.0.5",
        mac: "02:00:00:00:00:05",
        nsg: Some("web"),
        memory_mb: 192,
    },
    Vm {
        name: "web3",
        vnet: "a",
        ip: "10.1.0.6",
        mac: "02:00:00:00:00:06",
        nsg: Some("web"),
        memory_mb: 192,
    },
    Vm {
        name: "b1",
        vnet: "b",
        ip: "10.1.0.4",
        mac: "02:00:00:00:01:04",
        nsg: None,
        memory_mb: 160,
    },
];

const POLICY: &str = r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vnet]]
name = "b"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bd"

[[nsg]]
name = "web"
[[nsg.rule]]
name = "allow-http"
priority = 100
direction = "in"
action = "allow"
protocol = "tcp"
dst_ports = ["8080"]
[[nsg.rule]]
name = "deny-9000"
priority = 110
direction = "in"
action = "deny"
protocol = "tcp"
dst_ports = ["9000"]

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { vm = "web1", port = 8080 }, { vm = "web2", port = 8080 }, { vm = "web3", port = 8080 } ]
[vip.probe]
kind = "http"
port = 8080
path = "/health"
interval_ms = 500
timeout_ms = 400
threshold = 2
"#;

const WEBS: [&str; 3] = ["10.1.0.4:8080", "10.1.0.5:8080", "10.1.0.6:8080"];

/// The link of port `name` in a `/v1/counters` answer.
fn link_of(v: &serde_json::Value, name: &str) -> String {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["link"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The names answering `n` requests from the client to the VIP.
fn vip_names(g: &mut testkit::guest::Guest, n: usize) -> Vec<String> {
    let out = ok(
        g,
        &format!(
            "for i in $(seq {n}); do timeout 10 wget -q -O - http://10.1.0.100/ || echo failed; done"
        ),
        20 * n as u64,
    );
    out.lines().map(str::to_string).collect()
}

#[test]
fn guests_on_pollux_vips_probes_groups_tenants_and_a_large_transfer() {
    if !vm::required() {
        return;
    }
    let mut lab = Lab::new("vm");
    let dir = lab.dir.clone();
    let prefix = format!("pxvm{}", std::process::id());
    let _dpdk = vm::DpdkDir(prefix.clone());
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    let started = Instant::now();
    let mut guests = vm::start(&dir, &VMS, 1, 1);
    let cfg = vm::config(&dir, &prefix, 1, 1, &VMS) + POLICY;
    let (_idx, _out, log) = lab.pollux("pollux", &cfg);
    vm::wait_all(&mut guests, &log);
    eprintln!("5 guests up in {:?}", started.elapsed());
    let api = lab.api("pollux");
    let ctx = |guests: &[testkit::guest::Guest]| vm::context(&dir, guests);

    for name in ["web1", "web2", "web3", "b1"] {
        ok(guest(&mut guests, name), "httpd -p 8080 -h /www", 10);
    }
    api.wait_probes(&WEBS, true, Duration::from_secs(120), || ctx(&guests));
    let at_start = api.get("/v1/counters").unwrap();

    // Spread: the VIP reaches all three web guests.
    let names = vip_names(guest(&mut guests, "client"), 30);
    for w in ["web1", "web2", "web3"] {
        assert!(
            names.iter().any(|n| n == w),
            "{w} never answered: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n == "failed" || n == "b1"),
        "{names:?}"
    );

    // Failover: a download through the VIP starts (the client reads only
    // what fits in its buffers until /tmp/go exists); the web guest
    // serving it fails its health check and leaves the VIP; the download
    // then completes, intact, from it.
    let big_mb = 8;
    let mut sums = Vec::new();
    for w in ["web1", "web2", "web3"] {
        let out = ok(
            guest(&mut guests, w),
            &format!(
                "dd if=/dev/urandom of=/www/big bs=1M count={big_mb} 2>/dev/null && md5sum /www/big"
            ),
            120,
        );
        sums.push((w, out.split_whitespace().next().unwrap().to_string()));
    }
    let before = api.get("/v1/counters").unwrap();
    ok(
        guest(&mut guests, "client"),
        "(timeout 600 wget -q -O - http://10.1.0.100/big | (while [ ! -e /tmp/go ]; do sleep 0.2; done; md5sum > /tmp/big.md5)) >/dev/null 2>&1 &",
        10,
    );
    // The server is the web guest whose replies start to flow.
    let mut serving = None;
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        "a web guest sending the download",
        |v| {
            serving = ["web1", "web2", "web3"]
                .into_iter()
                .find(|w| port(v, w, "rx_bytes") > port(&before, w, "rx_bytes") + 100_000);
            serving.is_some()
        },
        || ctx(&guests),
    );
    let serving = serving.unwrap();
    let backend = WEBS[["web1", "web2", "web3"]
        .iter()
        .position(|w| *w == serving)
        .unwrap()];
    ok(guest(&mut guests, serving), "rm /www/health", 10);
    api.wait_probes(&[backend], false, Duration::from_secs(60), || ctx(&guests));
    let names = vip_names(guest(&mut guests, "client"), 20);
    assert!(
        !names.iter().any(|n| n == serving || n == "failed"),
        "{serving} down: {names:?}"
    );
    ok(guest(&mut guests, "client"), "touch /tmp/go", 10);
    let client = guest(&mut guests, "client");
    let got = (0..300)
        .find_map(|_| {
            let o = client
                .run("cat /tmp/big.md5", Duration::from_secs(10))
                .unwrap();
            if o.status == 0 && o.out.len() >= 32 {
                return Some(o.out.split_whitespace().next().unwrap().to_string());
            }
            std::thread::sleep(Duration::from_millis(500));
            None
        })
        .unwrap_or_else(|| panic!("the download did not finish\n{}", ctx(&guests)));
    let want = &sums.iter().find(|s| s.0 == serving).unwrap().1;
    assert_eq!(&got, want, "the download from {serving} arrived damaged");
    ok(guest(&mut guests, serving), "echo ok > /www/health", 10);
    api.wait_probes(&WEBS, true, Duration::from_secs(60), || ctx(&guests));

    // Ping between guests of a tenant.
    let client = guest(&mut guests, "client");
    let out = ok(client, "ping -c 3 -W 5 10.1.0.5", 30);
    assert!(out.contains("3 packets received"), "{out}");

    // The group: TCP 9000 denied (rule counted), 8080 allowed.
    ok(
        guest(&mut guests, "web1"),
        "nc -l -p 9000 >/dev/null 2>&1 &",
        10,
    );
    let hits = rule_hits(&api.get("/v1/counters").unwrap(), "web", "deny-9000");
    let o = guest(&mut guests, "client")
        .run(
            "echo hi | timeout 5 nc 10.1.0.4 9000",
            Duration::from_secs(20),
        )
        .unwrap();
    assert_ne!(o.status, 0, "port 9000 is denied: {o:?}");
    assert!(rule_hits(&api.get("/v1/counters").unwrap(), "web", "deny-9000") > hits);
    let out = ok(
        guest(&mut guests, "client"),
        "timeout 10 wget -q -O - http://10.1.0.4:8080/",
        20,
    );
    assert_eq!(out.trim(), "web1");

    // Tenants: b1 has web1's address in its own vnet; it reaches nothing of
    // tenant a, and a's traffic to 10.1.0.4 reaches web1, never b1.
    let before = api.get("/v1/counters").unwrap();
    let o = guest(&mut guests, "b1")
        .run("ping -c 2 -W 2 10.1.0.5", Duration::from_secs(20))
        .unwrap();
    assert_ne!(o.status, 0, "b1 reached tenant a: {o:?}");
    let after = api.get("/v1/counters").unwrap();
    let no_route =
        |v: &serde_json::Value| v["workers"][0]["drops"]["no_route"].as_u64().unwrap_or(0);
    assert!(
        no_route(&after) >= no_route(&before) + 2,
        "b1's pings are dropped as no_route: {after}"
    );
    // web2 answered the client's 3 pings above and nothing from b1.
    let echos = ok(
        guest(&mut guests, "web2"),
        "awk '/^Icmp:/ { if (!h) { for (i = 1; i <= NF; i++) n[$i] = i; h = 1 } else print $n[\"InEchos\"] }' /proc/net/snmp",
        10,
    );
    assert_eq!(echos.trim(), "3", "echo requests web2 received");
    let out = ok(
        guest(&mut guests, "b1"),
        "timeout 10 wget -q -O - http://10.1.0.4:8080/",
        20,
    );
    assert_eq!(out.trim(), "b1", "b1 reaches its own address");

    // A large transfer between guests, checked end to end.
    let mb: u64 = std::env::var("POLLUX_VM_BLOB_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let sent = ok(
        guest(&mut guests, "web1"),
        &format!(
            "dd if=/dev/urandom of=/www/blob bs=1M count={mb} 2>/dev/null && md5sum /www/blob"
        ),
        600,
    );
    let t = Instant::now();
    let got = ok(
        guest(&mut guests, "client"),
        "timeout 900 wget -q -O - http://10.1.0.4:8080/blob | md5sum",
        960,
    );
    eprintln!("{mb} MB from web1 to the client in {:?}", t.elapsed());
    assert_eq!(
        got.split_whitespace().next(),
        sent.split_whitespace().next(),
        "{mb} MB arrived damaged"
    );

    // Nothing dropped but what the policy asked for.
    let v = api.get("/v1/counters").unwrap();
    let drops: Vec<String> = v["workers"][0]["drops"]
        .as_object()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    for d in &drops {
        assert!(
            ["acl_deny", "no_route"].contains(&d.as_str()),
            "unexpected drop {d}: {}",
            v["workers"][0]["drops"]
        );
    }
    // Every link stayed up and every frame from a guest was taken in; a
    // guest under emulation may fall behind and fill its ring
    // (tx_queue_full, which TCP recovers from).
    let port_drop = |v: &serde_json::Value, name: &str, reason: &str| {
        v["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p["drops"][reason].as_u64())
            .unwrap_or(0)
    };
    for vm in VMS {
        for reason in ["link_down", "rx_no_buffer", "rx_oversize"] {
            assert_eq!(
                port_drop(&v, vm.name, reason),
                port_drop(&at_start, vm.name, reason),
                "{reason} on {}: {v}",
                vm.name
            );
        }
        assert_eq!(link_of(&v, vm.name), "up", "{v}");
    }
    let p = probes(&api.get("/v1/probes").unwrap());
    assert_eq!(p.len(), 3, "{p:?}");
    eprintln!("whole test in {:?}", started.elapsed());
}
