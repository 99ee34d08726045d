//! A spoofed-SYN flood against a public VIP: real kernel TCP stacks in
//! network namespaces behind `pollux run` (af_packet ports), the flood from
//! `pollux pktgen` on the wire (15 000 SYN/s, or as `POLLUX_FLOOD_PPS`
//! says: `full` for the generator's full rate), from 65 536 spoofed
//! sources.
//!
//! Topology: two backends (10.1.0.4 and 10.1.0.5, python's http.server on
//! port 8000) of the public VIP 198.51.100.100:80 (`max_conns` 4 096), and
//! a host on the wire (198.51.100.10) that is both the real client (curl)
//! and the attacker (pktgen on its own interface, sending SYNs from
//! 100.64.0.0/16 to the VIP).
//!
//! Shown: during the flood, the established downloads finish intact, at
//! least 99% of new requests through the VIP succeed, the connections
//! pollux tracks never exceed the VIP's limit (the flood displaces its own
//! embryonic entries, counted), and pollux's resident memory stays under
//! the bound its tables set.
//!
//! With the VIP's SYN proxy on, the flood at the generator's full rate:
//! pollux answers every SYN with a cookie, the backends' kernels see only
//! the connections of real clients (their passive opens), pollux tracks
//! nothing of the flood, and the same holds for downloads, requests and
//! memory.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `python3`, `taskset`. Runs alone
//! (.config/nextest.toml): its figure is what gets through a busy machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, wait_for};
use common::rss_kib;
use std::time::{Duration, Instant};

/// pollux's MAC on the wire.
const UPLINK_MAC: &str = "02:50:4c:58:ff:ff";
/// The wire host's MAC (pollux's next hop).
const WIRE_MAC: &str = "02:00:00:00:03:10";
/// The VIP's connection limit.
const MAX_CONNS: u64 = 4096;
/// Connections tracked per vnet per core, and flow entries per core.
const CONN_TABLE: u64 = 16_384;
const FLOW_TABLE: u64 = 65_536;
/// How long the flood lasts (with the SYN proxy: longer, for as many
/// requests on a core the full-rate generator keeps busy), and each
/// request's deadline.
const FLOOD_SECS: u64 = 40;
const PROXY_FLOOD_SECS: u64 = 60;
const REQUEST_SECS: u64 = 10;
/// The flood's rate unless `POLLUX_FLOOD_PPS` says otherwise (a number, or
/// `full` for the generator's full rate): what a slow two-core machine
/// carries with the generator, the backends' and the hosts' kernels and the
/// client on one core and pollux on the other. docs/performance.md has
/// what the full rate does.
const FLOOD_PPS: u64 = 15_000;

fn config(lab: &Lab, proxy: bool) -> String {
    let mut c =
        format!("[dataplane]\nconn_table_size = {CONN_TABLE}\nflow_table_size = {FLOW_TABLE}\n");
    for (tag, name) in [("sv", "sv"), ("s2", "s2"), ("wr", "wire")] {
        c += &format!(
            "[[port]]\nname = \"{name}\"\ndriver = \"af_packet\"\niface = \"{}\"\n",
            lab.ns(tag).host
        );
    }
    c += &format!(
        r#"
[uplink]
port = "wire"
next_hop_mac = "{WIRE_MAC}"
mac = "{UPLINK_MAC}"

[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"

[[nsg]]
name = "srv"
[[nsg.rule]]
name = "allow-http"
priority = 100
direction = "in"
action = "allow"
protocol = "tcp"
dst_ports = ["8000"]

[[vip]]
name = "web"
vnet = "a"
address = "198.51.100.100"
port = 80
protocol = "tcp"
max_conns = {MAX_CONNS}
syn_proxy = "{}"
backends = [ {{ vm = "sv", port = 8000 }}, {{ vm = "s2", port = 8000 }} ]

[[vm]]
name = "sv"
port = "sv"
vnet = "a"
mac = "02:00:00:00:01:04"
ips = ["10.1.0.4"]
nsg = "srv"
[[vm]]
name = "s2"
port = "s2"
vnet = "a"
mac = "02:00:00:00:01:05"
ips = ["10.1.0.5"]
nsg = "srv"
"#,
        if proxy { "on" } else { "off" }
    );
    c
}

/// Connections tracked to the VIP now: its backends' active connections.
fn vip_conns(counters: &serde_json::Value) -> u64 {
    counters["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| b["active_connections"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// TCP connections a backend's kernel accepted (`PassiveOpens` of its
/// namespace).
fn passive_opens(lab: &Lab, tag: &str) -> u64 {
    let out = lab.bash(tag, "cat /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        panic!("no Tcp lines in /proc/net/snmp of {tag}: {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "PassiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no PassiveOpens in {names}"))
}

#[test]
fn a_spoofed_syn_flood_leaves_established_and_new_connections_working() {
    flood(false);
}

#[test]
fn a_syn_proxy_keeps_a_full_rate_flood_off_the_backends() {
    flood(true);
}

fn flood(proxy: bool) {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3", "taskset"]) {
        return;
    }
    let flood_secs = if proxy { PROXY_FLOOD_SECS } else { FLOOD_SECS };
    let mut lab = Lab::new(if proxy { "sp" } else { "sf" });
    // Clients, backends and the generator kept off the last core, where
    // pollux's worker runs alone, as on a host whose dataplane cores are
    // its own.
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if let [others @ .., _worker] = &cores[..]
        && !others.is_empty()
    {
        let list: Vec<String> = others.iter().map(|c| c.id.to_string()).collect();
        lab.pin_helpers(&list.join(","));
    }
    for (tag, cidr, mac, gw) in [
        ("sv", "10.1.0.4/16", "02:00:00:00:01:04", "10.1.0.1"),
        ("s2", "10.1.0.5/16", "02:00:00:00:01:05", "10.1.0.1"),
        ("wr", "198.51.100.10/24", WIRE_MAC, ""),
    ] {
        lab.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", cidr, "dev", "eth0"],
            ],
        );
        if !gw.is_empty() {
            lab.exec(tag, &["ip", "route", "add", "default", "via", gw]);
        }
        // The hosts' kernels do their receive work on the first core (as
        // separate machines would on their own), not in softirq on
        // whichever core sent to them: pollux's worker, pinned to the last
        // core, would otherwise also run the backends' answer to every SYN.
        lab.exec(
            tag,
            &[
                "sh",
                "-c",
                "echo 1 > /sys/class/net/eth0/queues/rx-0/rps_cpus",
            ],
        );
    }
    let dir = lab.dir.clone();
    // 2 MiB of varied bytes, so a download that mixes up data shows.
    let data: Vec<u8> = {
        let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(std::process::id());
        (0..2 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    for (tag, ip) in [("sv", "10.1.0.4"), ("s2", "10.1.0.5")] {
        let root = dir.join(format!("www-{tag}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("big"), &data).unwrap();
        std::fs::write(root.join("small"), "ok\n").unwrap();
        lab.http_server(tag, ip, 8000, &root, &dir.join(format!("{tag}.log")));
    }
    let (idx, _out, log) = lab.pollux("sf", &config(&lab, proxy));
    let pid = lab.children[idx].id();
    let api = lab.api("sf");
    let context = || read(&log);
    api.wait_ready(Duration::from_secs(30), context);
    let vip = "http://198.51.100.100/small";
    // Requests before the flood: their connections, closed, stay tracked
    // for their timeout, beside the flood's.
    let mut before_flood = 0u64;
    assert!(
        wait_for(Duration::from_secs(20), || {
            before_flood += 1;
            lab.bash("wr", &format!("curl -sf --max-time 2 {vip}"))
                .status
                .success()
        }),
        "{vip} before the flood\n{}",
        read(&log)
    );
    let rss_before =
        rss_kib(pid).unwrap_or_else(|| panic!("no resident memory read for pid {pid}"));

    // Established transfers, stretched over the flood.
    let mut downloads = Vec::new();
    for i in 0..4 {
        let file = dir.join(format!("dl{i}"));
        let cmd = format!(
            "exec curl -s --max-time 120 --limit-rate 64k -o {} -w '%{{http_code}}' \
             http://198.51.100.100/big",
            file.display()
        );
        downloads.push((lab.spawn("wr", &cmd, &dir.join(format!("dl{i}.log"))), file));
    }
    // They are established (bytes arrive) before the flood starts.
    assert!(
        wait_for(Duration::from_secs(60), || downloads
            .iter()
            .all(|(_, f)| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))),
        "downloads did not start: {:?}\ncounters: {:?}\n{}",
        downloads
            .iter()
            .map(|(_, f)| std::fs::metadata(f).map(|m| m.len()).ok())
            .collect::<Vec<_>>(),
        api.get("/v1/counters"),
        read(&log)
    );

    // The flood, from 65 536 spoofed sources, two million distinct
    // connections.
    let report = dir.join("flood.json");
    let rate = match std::env::var("POLLUX_FLOOD_PPS").as_deref() {
        _ if proxy => String::new(),
        Ok("full") => String::new(),
        Ok(n) => format!("--rate {}", n.parse::<u64>().expect("POLLUX_FLOOD_PPS")),
        Err(_) => format!("--rate {FLOOD_PPS}"),
    };
    let opens_before = passive_opens(&lab, "sv") + passive_opens(&lab, "s2");
    let counters_before = api.get("/v1/counters");
    let proxied_before = counters_before
        .as_ref()
        .map_or(0, |c| common::api::worker(c, 0, "syn_proxied"));
    let wire_rx_before = counters_before
        .as_ref()
        .map_or(0, |c| common::api::port(c, "wire", "rx_packets"));
    let flood = format!(
        "exec {} pktgen --tx af_packet:eth0 --proto tcp-syn --size 76 \
         --src-ip 100.64.0.0 --src-ips 65536 --flows 2000000 \
         --dst-ip 198.51.100.100 --dport 80 --dst-mac {UPLINK_MAC} \
         {rate} --warmup 0 --duration {flood_secs} --json > {}",
        env!("CARGO_BIN_EXE_pollux"),
        report.display()
    );
    let flooder = lab.spawn("wr", &flood, &dir.join("flood.log"));
    let started = Instant::now();
    // The flood is under way when pollux's table has filled with it.
    let flood_log = dir.join("flood.log");
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(20),
        "the flood fills the VIP's share, or gets cookies",
        |c| {
            if proxy {
                common::api::worker(c, 0, "syn_cookies_sent") > 10_000
            } else {
                common::api::worker(c, 0, "conns_evicted_embryonic") > 0
            }
        },
        || format!("{}\n{}", read(&flood_log), read(&log)),
    );

    // New clients during the flood: one request at a time, each with a
    // deadline (curl's own SYN retransmissions included) that ends before
    // the flood does (with 3 s to spare).
    let mut ok = 0;
    let mut tried = 0;
    let mut peak_rss = rss_before;
    let mut peak_conns = 0;
    let mut failures = Vec::new();
    let mut took = Vec::new();
    while started.elapsed() < Duration::from_secs(flood_secs - REQUEST_SECS - 3) && tried < 300 {
        assert!(
            matches!(lab.children[flooder].try_wait(), Ok(None)),
            "the flood ended early: {}",
            read(&flood_log)
        );
        tried += 1;
        let t = Instant::now();
        let out = lab.bash("wr", &format!("curl -sf --max-time {REQUEST_SECS} {vip}"));
        took.push(t.elapsed());
        if out.status.success() && out.stdout == b"ok\n" {
            ok += 1;
        } else {
            failures.push(format!(
                "curl exit {:?} after {:?} at {:?} into the flood",
                out.status.code(),
                t.elapsed(),
                t - started
            ));
        }
        peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
        if let Some(c) = api.get("/v1/counters") {
            peak_conns = peak_conns.max(vip_conns(&c));
        }
    }
    // Every request ended while the flood still ran.
    assert!(
        matches!(lab.children[flooder].try_wait(), Ok(None)),
        "the flood ended before the requests did: {}",
        read(&flood_log)
    );
    let flood_status = lab.children[flooder].wait().unwrap();
    let flood_report = read(&report);
    assert!(
        flood_status.success(),
        "pktgen: {}\n{}",
        read(&flood_log),
        flood_report
    );
    let sent_pps = serde_json::from_str::<serde_json::Value>(&flood_report)
        .ok()
        .and_then(|r| r["trials"][0]["tx_pps"].as_f64())
        .unwrap_or(0.0);
    // The counters of the last requests are published (every 100 ms).
    if proxy {
        api.wait_for(
            "/v1/counters",
            Duration::from_secs(10),
            "a connection opened by a cookie for every request that succeeded",
            |c| common::api::worker(c, 0, "syn_proxied") >= proxied_before + ok,
            || read(&log),
        );
    }
    let counters = api.get("/v1/counters").unwrap();
    let evicted = common::api::worker(&counters, 0, "conns_evicted_embryonic");
    let cookies = common::api::worker(&counters, 0, "syn_cookies_sent");
    let proxied = common::api::worker(&counters, 0, "syn_proxied") - proxied_before;
    let opens = passive_opens(&lab, "sv") + passive_opens(&lab, "s2") - opens_before;

    // The established downloads finished, every byte right.
    for (c, file) in &downloads {
        let status = lab.children[*c].wait().unwrap();
        assert!(status.success(), "download {}", file.display());
        assert_eq!(
            std::fs::read(file).unwrap(),
            data,
            "download {} is not the file",
            file.display()
        );
    }
    let wire = |f: &str| common::api::port(&counters, "wire", f);

    took.sort();
    let wire_rx = wire("rx_packets") - wire_rx_before;
    eprintln!(
        "flood: {sent_pps:.0} SYN/s sent; pollux received {wire_rx} packets on the wire port \
         during it (dropped there: {}); \
         requests during the flood: {ok}/{tried} ({failures:?}), each took {:?} (median), \
         {:?} at most; embryonic connections \
         evicted: {evicted}; refused at the VIP's limit: {}; peak connections to the VIP: {peak_conns}; \
         cookies sent: {cookies}, connections opened by a cookie: {proxied}; \
         connections the backends accepted: {opens}; \
         rss {rss_before} KiB before, {peak_rss} KiB at most; switch drops {}",
        counters["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "wire"))
            .map(|p| p["drops"].to_string())
            .unwrap_or_default(),
        took.get(took.len() / 2).copied().unwrap_or_default(),
        took.last().copied().unwrap_or_default(),
        counters["workers"][0]["drops"]["lb_vip_conn_limit"],
        counters["workers"][0]["drops"]
    );
    assert!(
        tried >= 100,
        "only {tried} requests in the flood, each took {:?} (median)",
        took.get(took.len() / 2)
    );
    assert!(
        ok * 100 >= tried * 99,
        "only {ok} of {tried} requests through the VIP succeeded under the flood: {failures:?}\n{counters}\n{}",
        read(&log)
    );
    if proxy {
        // Every SYN got a cookie (what pollux received on the wire during
        // the flood was the flood's SYNs but for the clients' few packets),
        // many times what the VIP could have tracked; only real clients
        // came back with one, and only they reached the backends: the flood
        // took no state. How much of the generator's rate reaches pollux
        // depends on what else the machine runs, so the floor is what the
        // VIP's table holds, not a rate.
        assert!(
            cookies > 10 * MAX_CONNS && cookies * 10 >= wire_rx * 9,
            "{cookies} cookies sent for {wire_rx} packets received on the wire"
        );
        assert!(
            (ok..=tried + 10).contains(&proxied),
            "{proxied} connections opened by a cookie for {ok} of {tried} requests"
        );
        assert!(
            opens <= tried + 10,
            "the backends accepted {opens} connections for {tried} requests"
        );
        // Every connection pollux tracked was a real client's.
        assert!(
            peak_conns <= tried + 4 + before_flood,
            "{peak_conns} connections to the VIP for {tried} requests, 4 downloads and {before_flood} requests before the flood"
        );
        assert_eq!(evicted, 0, "nothing to evict");
    } else {
        // The flood displaced its own entries, far more than the VIP holds.
        assert!(evicted > 10 * MAX_CONNS, "evicted {evicted}");
        // The VIP held its limit (one worker: all of it), never more.
        assert!(
            (MAX_CONNS * 9 / 10..=MAX_CONNS).contains(&peak_conns),
            "{peak_conns} connections to the VIP at most"
        );
    }
    // Memory: what pollux held before the flood (its tables committed when
    // its worker started), plus what the tables take when full where they
    // could not be committed then, plus 16 MiB for everything else; the
    // flood cannot push it further.
    let tables = vswitch::flow::FlowTable::bytes_for(FLOW_TABLE as usize)
        + lb::balancer::LbCore::table_bytes(CONN_TABLE as usize);
    let bound = rss_before + tables as u64 / 1024 + 16 * 1024;
    assert!(
        peak_rss <= bound,
        "rss {peak_rss} KiB over the bound {bound} KiB (before the flood: {rss_before} KiB)"
    );
}
