//! End to end with real network stacks: Linux network namespaces behind veth
//! pairs (created here, removed at the end even on failure), real HTTP
//! servers (`python3 -m http.server`) and a real client (`curl`), and
//! `pollux run` switching between them on `af_packet` ports.
//!
//! Topology: vnet a = three DIPs (10.1.0.4-6, HTTP :8000 with a `/health`
//! file, group "web": allow tcp/8000 in, deny tcp/8001 in) behind VIP
//! 10.1.0.100:80 with an HTTP probe, and a client 10.1.0.20; vnet b = another
//! tenant with the same prefix, "other" 10.1.0.30.
//!
//! Shown: `pollux ctl trace` tells what the switch does with a packet to
//! the VIP (the backend), a denied one (the rule), a spoofed frame and one
//! from the other tenant, changing nothing, and the packets sent afterwards
//! do just that; curl through the VIP spreads over the DIPs (the servers'
//! logs say so); a DIP whose health file is removed leaves within the probe threshold
//! while a slow download from it completes; a denied connection times out and
//! the report names the rule; the other vnet reaches nothing.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `ping`, `python3`, `tshark`
//! (`testkit::require`: without them it says why it did not run; under CI it
//! fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::Api;
use common::netns::{Lab, read, wait_for};
use serde_json::Value;
use std::time::Duration;

/// (tag, address, MAC) of every namespace.
const NODES: [(&str, &str, &str); 5] = [
    ("d1", "10.1.0.4", "02:00:00:00:00:04"),
    ("d2", "10.1.0.5", "02:00:00:00:00:05"),
    ("d3", "10.1.0.6", "02:00:00:00:00:06"),
    ("cl", "10.1.0.20", "02:00:00:00:00:20"),
    ("ot", "10.1.0.30", "02:00:00:00:00:30"),
];

fn node(tag: &str) -> (&'static str, &'static str) {
    let n = NODES.iter().find(|n| n.0 == tag).unwrap();
    (n.1, n.2)
}

fn lab() -> Lab {
    let mut lab = Lab::new("e2e");
    for (tag, ip, mac) in NODES {
        let cidr = format!("{ip}/16");
        lab.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", &cidr, "dev", "eth0"],
            ],
        );
        lab.exec(tag, &["ip", "route", "add", "default", "via", "10.1.0.1"]);
    }
    lab
}

/// The bodies of `n` curls from the client to the VIP, one a line.
fn curl_vip(lab: &Lab, n: usize) -> Vec<String> {
    let r = lab.bash(
        "cl",
        &format!("for i in $(seq {n}); do curl -s --max-time 10 http://10.1.0.100/; echo; done"),
    );
    String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Requests from `client` for `path` in a DIP's http.server log.
fn served(log: &str, client: &str, path: &str) -> usize {
    log.lines()
        .filter(|l| l.starts_with(client) && l.contains(&format!("\"GET {path} ")))
        .count()
}

fn config(lab: &Lab, driver: &str) -> String {
    let port = |tag: &str, name: &str| {
        format!(
            "[[port]]\nname = \"{name}\"\ndriver = \"{driver}\"\niface = \"{}\"\n",
            lab.ns(tag).host
        )
    };
    let vm = |tag: &str, name: &str, vnet: &str, nsg: &str| {
        let (ip, mac) = node(tag);
        format!(
            "[[vm]]\nname = \"{name}\"\nport = \"{name}\"\nvnet = \"{vnet}\"\nmac = \"{mac}\"\nips = [\"{ip}\"]\n{nsg}\n"
        )
    };
    let mut c = String::new();
    for (tag, name) in [
        ("d1", "dip1"),
        ("d2", "dip2"),
        ("d3", "dip3"),
        ("cl", "client"),
        ("ot", "other"),
    ] {
        c += &port(tag, name);
    }
    c += r#"
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
dst_ports = ["8000"]
[[nsg.rule]]
name = "deny-8001"
priority = 110
direction = "in"
action = "deny"
protocol = "tcp"
dst_ports = ["8001"]

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { vm = "dip1", port = 8000 }, { vm = "dip2", port = 8000 }, { vm = "dip3", port = 8000 } ]
[vip.probe]
kind = "http"
port = 8000
path = "/health"
interval_ms = 300
timeout_ms = 250
threshold = 2
"#;
    for (tag, name, vnet, nsg) in [
        ("d1", "dip1", "a", "nsg = \"web\""),
        ("d2", "dip2", "a", "nsg = \"web\""),
        ("d3", "dip3", "a", "nsg = \"web\""),
        ("cl", "client", "a", ""),
        ("ot", "other", "b", ""),
    ] {
        c += &vm(tag, name, vnet, nsg);
    }
    c
}

const BIG: usize = 4 << 20;

/// The probed backends, as the API names them.
const DIPS: [&str; 3] = ["10.1.0.4:8000", "10.1.0.5:8000", "10.1.0.6:8000"];

#[test]
fn real_stacks_through_pollux_on_kernel_ports() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "ping", "python3", "tshark"]) {
        return;
    }
    let mut lab = lab();
    let dir = lab.dir.clone();
    // Web roots: the DIP's name, a health file, a large file.
    for (i, tag) in ["d1", "d2", "d3"].iter().enumerate() {
        let root = dir.join(tag);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("dip{}", i + 1)).unwrap();
        std::fs::write(root.join("health"), "ok").unwrap();
        std::fs::write(root.join("big"), vec![b'x'; BIG]).unwrap();
        let ip = node(tag).0;
        lab.http_server(tag, ip, 8000, &root, &dir.join(format!("{tag}.log")));
    }
    // One worker, then two (AF_PACKET fanout queues, packets handed to
    // the worker that owns their connection): the same story both times.
    scenario(&mut lab, "af_packet", 1);
    scenario(&mut lab, "af_packet", 2);
    scenario(&mut lab, "af_xdp", 1);
}

/// Runs pollux with `driver` ports and `workers` workers over the lab and
/// checks everything.
fn scenario(lab: &mut Lab, driver: &str, workers: usize) {
    eprintln!("round: {driver}, {workers} worker(s)");
    if driver == "af_xdp" {
        // XDP sees no "checksum not ready" mark: senders must fill in
        // their checksums themselves (docs/config.md says so).
        for (tag, ..) in NODES {
            lab.exec(tag, &["ethtool", "-K", "eth0", "tx", "off"]);
        }
    }
    let dir = lab.dir.clone();
    // Where each DIP's log stands: what it logs from here on is this round's.
    let offsets = || -> Vec<(&str, usize)> {
        ["d1", "d2", "d3"]
            .iter()
            .map(|t| (*t, read(&dir.join(format!("{t}.log"))).len()))
            .collect()
    };
    let since = offsets();
    let mut since_traces = since.clone();
    let name = format!("pollux-{driver}-{workers}");
    let (pollux_idx, out, log) = lab.pollux(
        &name,
        &format!(
            "[dataplane]\nworkers = {workers}\ndrop_summary_s = 1\n{}",
            config(lab, driver)
        ),
    );
    let api = lab.api(&name);
    let context = || format!("pollux log:\n{}", read(&log));

    // 1. Every DIP comes up on its first successful probes.
    api.wait_probes(&DIPS, true, Duration::from_secs(60), context);

    // Traces first, then the same packets: one round is enough.
    if driver == "af_packet" && workers == 1 {
        traces_match_what_happens(lab, &api);
        // The drops are summed up in the log, by reason, every second.
        assert!(
            wait_for(Duration::from_secs(10), || read(&log)
                .lines()
                .any(|l| l.contains("drops: ") && l.contains("acl_deny="))),
            "no drop summary naming acl_deny:\n{}",
            read(&log)
        );
        since_traces = offsets();
    }

    // 2. curl through the VIP spreads over the DIPs. With two workers, a
    // pcap capture of the VIP's port 80 meanwhile: both workers capture.
    let capture = (workers == 2).then(|| {
        let pcap = dir.join("vip80.pcap");
        let child = start_capture(
            &api,
            &["--filter", "tcp and port 80", "--seconds", "5"],
            &pcap,
        );
        (child, pcap)
    });
    let bodies = curl_vip(lab, 15);
    if let Some((child, pcap)) = capture {
        let done = child.wait_with_output().unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        let out = std::process::Command::new("tshark")
            .args([
                "-r",
                pcap.to_str().unwrap(),
                "-Y",
                "http.request",
                "-T",
                "fields",
            ])
            .args(["-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let n = text
            .lines()
            .filter(|l| *l == "10.1.0.20\t10.1.0.100\t80")
            .count();
        assert!(n >= 15, "{n} requests to the VIP in the capture:\n{text}");
    }
    assert_eq!(bodies.len(), 15, "{bodies:?}");
    let count = |name: &str| bodies.iter().filter(|b| b.as_str() == name).count();
    let per = [count("dip1"), count("dip2"), count("dip3")];
    assert_eq!(per.iter().sum::<usize>(), 15, "{bodies:?}");
    assert!(
        per.iter().filter(|&&n| n > 0).count() >= 2,
        "all on one DIP: {per:?}"
    );
    // Only what the servers logged during this round (after the traces'
    // request, for the client's).
    let logs_from = |tag: &str, since: &[(&str, usize)]| {
        let all = read(&dir.join(format!("{tag}.log")));
        let from = since.iter().find(|(t, _)| *t == tag).map_or(0, |(_, n)| *n);
        all.get(from..).unwrap_or_default().to_string()
    };
    let logs = |tag: &str| logs_from(tag, &since);
    for (i, tag) in ["d1", "d2", "d3"].iter().enumerate() {
        assert_eq!(
            served(&logs_from(tag, &since_traces), "10.1.0.20", "/"),
            per[i],
            "{tag} log disagrees with the bodies"
        );
        // The prober's requests arrive from the probe source.
        assert!(served(&logs(tag), "168.63.129.16", "/health") >= 1);
    }

    // 3. A slow download starts; its DIP then fails its health check.
    let dl = dir.join("big.out");
    let dl_log = dir.join("curl-big.log");
    lab.spawn(
        "cl",
        &format!(
            "exec curl -s --max-time 90 --limit-rate 256K -o {} -w '%{{http_code}} %{{size_download}}' http://10.1.0.100/big",
            dl.display()
        ),
        &dl_log,
    );
    // The download's connection, as the switch's flow table shows it: the
    // one flow of the client to the VIP that is not closing; its DNAT
    // names the backend.
    let open_flow = |v: &serde_json::Value| {
        v["flows"].as_array().and_then(|fs| {
            fs.iter()
                .find(|f| f["src"] == "10.1.0.20" && f["closing"] == false)
                .and_then(|f| f["nat_dst"].as_str().map(str::to_string))
        })
    };
    let flows = api.wait_for(
        "/v1/flows?vip=web",
        Duration::from_secs(60),
        "the download's connection",
        |v| open_flow(v).is_some(),
        context,
    );
    let backend = open_flow(&flows).unwrap();
    let victim = ["d1", "d2", "d3"]
        .into_iter()
        .find(|t| backend == format!("{}:8000", node(t).0))
        .unwrap_or_else(|| panic!("download to {backend}"));
    let victim_name = format!("dip{}", &victim[1..]);
    let health = dir.join(victim).join("health");
    std::fs::remove_file(&health).unwrap();
    let victim_backend = format!("{}:8000", node(victim).0);
    api.wait_probes(&[&victim_backend], false, Duration::from_secs(60), context);
    // The download is still running: it outlives its backend's health.
    let so_far = std::fs::metadata(&dl).map_or(0, |m| m.len()) as usize;
    assert!(
        so_far < BIG && !read(&dl_log).starts_with("200"),
        "the download ended ({so_far} bytes) before {victim} was taken out"
    );
    let after = curl_vip(lab, 12);
    assert_eq!(after.len(), 12, "{after:?}");
    assert!(
        after
            .iter()
            .all(|b| b.starts_with("dip") && *b != victim_name),
        "new requests reached {victim_name}: {after:?}"
    );
    // ... while the download from it completes.
    assert!(
        wait_for(Duration::from_secs(60), || read(&dl_log)
            .starts_with("200 ")),
        "download: {:?}",
        read(&dl_log)
    );
    assert_eq!(
        read(&dl_log),
        format!("200 {BIG}"),
        "the long-lived connection broke"
    );
    assert_eq!(std::fs::metadata(&dl).unwrap().len() as usize, BIG);

    // 4. The group denies tcp/8001 in: the connection attempt times out.
    let r = lab.bash(
        "cl",
        "curl -s --max-time 2 http://10.1.0.4:8001/; echo rc=$?",
    );
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("rc=28"),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );

    // 5. The other tenant reaches nothing: not the VIP, not a DIP.
    let r = lab.bash(
        "ot",
        "ping -c 2 -W 1 10.1.0.100 >/dev/null; echo ping=$?; \
         curl -s --max-time 2 http://10.1.0.100/; echo vip=$?; \
         curl -s --max-time 2 http://10.1.0.4:8000/; echo dip=$?",
    );
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("ping=1"), "{text}");
    assert!(text.contains("vip=28"), "{text}");
    assert!(text.contains("dip=28"), "{text}");
    for tag in ["d1", "d2", "d3"] {
        assert!(
            !logs(tag).contains("10.1.0.30"),
            "{tag} served the other vnet"
        );
    }

    // 6. A clean stop, with a report that names what was dropped and why.
    let (status, report) = lab.stop(pollux_idx, &out);
    eprintln!("pollux log:\n{}\nreport:\n{report}", read(&log));
    assert!(status.success(), "{report}\n{}", read(&log));
    assert!(
        report.contains("nsg \"web\" in rule \"deny-8001\" (priority 110, deny): "),
        "{report}"
    );
    // The other backends stayed up all along. (Each round is a new pollux
    // whose probes meet the TIME_WAIT connections of the previous one's in
    // the DIPs' kernels: a prober that repeated its ports and sequence
    // numbers failed there and took healthy backends down.)
    for b in DIPS.iter().filter(|b| **b != victim_backend) {
        assert!(
            report.contains(&format!("vip \"web\" backend {b}: up after ")),
            "{b} did not stay up:\n{report}\n{}",
            read(&log)
        );
    }
    assert!(report.contains("(\"no_route\", "), "{report}");
    if workers > 1 {
        // The kernel's fanout hash ignores NAT: packets did reach workers
        // that do not own their connection, and were handed over.
        let handed: u64 = report
            .lines()
            .filter_map(|l| l.split("handed to their owner ").nth(1))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum();
        assert!(handed > 0, "{report}");
    }
    // Ready for the next round: every DIP healthy again.
    std::fs::write(&health, "ok").unwrap();
}

/// Packets of reason `why` every worker dropped, from `/v1/counters`.
fn dropped(api: &Api, why: &str) -> u64 {
    let v = api.get("/v1/counters").unwrap();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["drops"][why].as_u64().unwrap_or(0))
        .sum()
}

/// Hits of rule `rule` of group `nsg`, from `/v1/counters`.
fn rule_hits(api: &Api, nsg: &str, rule: &str) -> u64 {
    let v = api.get("/v1/counters").unwrap();
    v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["nsg"] == nsg && r["rule"] == rule)
        .map(|r| r["hits"].as_u64().unwrap_or(0))
        .sum()
}

/// `pollux ctl --json trace args...`.
fn trace(api: &Api, args: &[&str]) -> Value {
    let out = api.ctl(&[&["--json", "trace"][..], args].concat());
    assert!(
        out.status.success(),
        "ctl trace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Layer `layer`'s notes in trace `t`, joined.
fn steps(t: &Value, layer: &str) -> String {
    t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["layer"] == layer)
        .map(|s| s["detail"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Traces four packets with `pollux ctl trace`, checks that the traces
/// changed nothing, then sends the packets and checks that the switch did
/// what each trace said.
fn traces_match_what_happens(lab: &Lab, api: &Api) {
    let generation = api.get("/v1/status").unwrap()["generation"].clone();
    let counted = |api: &Api| {
        (
            dropped(api, "acl_deny"),
            dropped(api, "spoofed"),
            dropped(api, "no_route"),
            rule_hits(api, "web", "deny-8001"),
        )
    };
    let before = counted(api);
    // To the VIP, allowed: the backend Maglev picks for this 5-tuple.
    let vip = trace(
        api,
        &[
            "--port",
            "client",
            "--dst",
            "10.1.0.100",
            "--dport",
            "80",
            "--sport",
            "41234",
        ],
    );
    assert_eq!(vip["result"], "forward", "{vip:#}");
    let backend = vip["out_port"].as_str().unwrap().to_string();
    let n: u8 = backend.strip_prefix("dip").unwrap().parse().unwrap();
    let lb = steps(&vip, "lb");
    assert!(
        lb.contains("a new connection to VIP web 10.1.0.100:80/tcp"),
        "{lb}"
    );
    assert!(
        lb.contains(&format!(
            "-> backend 10.1.0.{}:8000 (VM {backend}), healthy",
            3 + n
        )),
        "{lb}"
    );
    assert!(
        vip["out_packet"]
            .as_str()
            .unwrap()
            .contains(&format!("tcp 10.1.0.20:41234 > 10.1.0.{}:8000 [S]", 3 + n)),
        "{vip:#}"
    );
    assert!(
        steps(&vip, "acl")
            .contains("group web inbound: rule allow-http (priority 100) matches: allow"),
        "{vip:#}"
    );
    // Denied by the DIP's group, naming the rule.
    let denied = trace(
        api,
        &["--port", "client", "--dst", "10.1.0.4", "--dport", "8001"],
    );
    assert_eq!(denied["result"], "drop", "{denied:#}");
    assert_eq!(denied["reason"], "acl_deny", "{denied:#}");
    assert!(
        steps(&denied, "acl")
            .contains("group web inbound: rule deny-8001 (priority 110) matches: deny"),
        "{denied:#}"
    );
    // A frame from the client's port with another source address, whole.
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(
        [2, 0, 0, 0, 0, 0x20],
        [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc],
    )
    .ipv4([10, 1, 0, 99], [10, 1, 0, 4], 64)
    .udp(5000, 9)
    .write(&mut frame, b"spoofed")
    .unwrap();
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let spoofed = trace(api, &["--port", "client", "--hex", &hex]);
    assert_eq!(spoofed["reason"], "spoofed", "{spoofed:#}");
    assert!(
        steps(&spoofed, "spoof").contains("source address 10.1.0.99 is not one of VM client's"),
        "{spoofed:#}"
    );
    // The other tenant, to a DIP of vnet a.
    let isolated = trace(
        api,
        &["--port", "other", "--dst", "10.1.0.4", "--dport", "8000"],
    );
    assert_eq!(isolated["reason"], "no_route", "{isolated:#}");
    assert!(
        steps(&isolated, "route").contains("no VM of vnet b has 10.1.0.4"),
        "{isolated:#}"
    );
    // The readable form says the same.
    let text = api.ctl(&[
        "trace", "--port", "client", "--dst", "10.1.0.4", "--dport", "8001",
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    eprintln!("pollux ctl trace:\n{text}");
    assert!(text.contains("drop: acl_deny"), "{text}");
    // The traces changed nothing: no generation, no counter, no flow.
    assert_eq!(api.get("/v1/status").unwrap()["generation"], generation);
    assert_eq!(counted(api), before);
    // (The health probes keep the other counters moving: no flow of the
    // client or the other tenant, which have sent nothing yet, says it.)
    for src in ["10.1.0.20", "10.1.0.30"] {
        let flows = api.get(&format!("/v1/flows?src={src}")).unwrap();
        assert_eq!(flows["matched"], 0, "{flows:#}");
    }

    // Now the packets themselves, captured live on every port. The VIP:
    // the traced backend answers.
    let pcap = lab.dir.join("vip.pcapng");
    let capture = start_capture(
        api,
        &[
            "--filter",
            "tcp and port 41234",
            "--seconds",
            "6",
            "--pcapng",
        ],
        &pcap,
    );
    // And its first two packets traced live: the SYN through the slow
    // path, to the backend the trace named; the next, the flow it left.
    let live = live_trace(api, "tcp and src port 41234", 2);
    let r = lab.bash(
        "cl",
        "curl -s --max-time 10 --local-port 41234 http://10.1.0.100/",
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), backend);
    let traced = live_traced(live);
    assert_eq!(traced.len(), 2, "{traced:?}");
    assert_eq!(traced[0]["out_port"], backend.as_str(), "{:#}", traced[0]);
    assert!(
        steps(&traced[0], "lb").contains("a new connection to VIP web"),
        "{:#}",
        traced[0]
    );
    assert_eq!(traced[1]["out_port"], backend.as_str(), "{:#}", traced[1]);
    assert!(
        steps(&traced[1], "flow").contains("a cached flow"),
        "{:#}",
        traced[1]
    );
    let done = capture.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&done.stderr);
    eprintln!("pollux ctl capture: {said}");
    assert!(done.status.success(), "{said}");
    assert!(said.contains(" 0 missed"), "{said}");
    // tshark reads it: the client's request to the VIP as it came in, and
    // as the switch sent it on to the DIP (DNAT); the DIP's answer as it
    // came in, and as the client got it, from the VIP again.
    let dip = format!("10.1.0.{}", 3 + n);
    let fields = |filter: &str, f: &[&str]| {
        let mut args = vec!["-r", pcap.to_str().unwrap(), "-Y", filter, "-T", "fields"];
        for x in f {
            args.extend(["-e", x]);
        }
        let out = std::process::Command::new("tshark")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let requests = fields(
        "http.request",
        &[
            "ip.dst",
            "tcp.dstport",
            "http.request.uri",
            "frame.interface_name",
            "frame.packet_flags_direction",
        ],
    );
    // (pcapng: each port an interface; received from it inbound (1),
    // sent to it outbound (2).)
    assert!(
        requests.contains("10.1.0.100\t80\t/\tclient\t0x00000001"),
        "{requests}"
    );
    assert!(
        requests.contains(&format!("{dip}\t8000\t/\t{backend}\t0x00000002")),
        "{requests}"
    );
    let answers = fields(
        "http.response",
        &["ip.src", "tcp.srcport", "http.response.code"],
    );
    assert!(answers.contains(&format!("{dip}\t8000\t200")), "{answers}");
    assert!(answers.contains("10.1.0.100\t80\t200"), "{answers}");
    // Denied: the connection times out, counted under the traced rule; its
    // SYN traced live says so too.
    let live = live_trace(api, "tcp and dst port 8001", 1);
    let r = lab.bash(
        "cl",
        "curl -s --max-time 2 http://10.1.0.4:8001/; echo rc=$?",
    );
    assert!(String::from_utf8_lossy(&r.stdout).contains("rc=28"));
    let traced = live_traced(live);
    assert_eq!(traced.len(), 1, "{traced:?}");
    assert_eq!(traced[0]["reason"], "acl_deny", "{:#}", traced[0]);
    assert!(
        steps(&traced[0], "acl").contains("rule deny-8001 (priority 110) matches: deny"),
        "{:#}",
        traced[0]
    );
    // The spoofed frame, sent as it is from the client's interface.
    lab.exec(
        "cl",
        &[
            "python3",
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); \
             s.bind(('eth0', 0)); s.send(bytes.fromhex(sys.argv[1]))",
            &hex,
        ],
    );
    // The other tenant: nothing answers.
    let r = lab.bash(
        "ot",
        "curl -s --max-time 2 http://10.1.0.4:8000/; echo rc=$?",
    );
    assert!(String::from_utf8_lossy(&r.stdout).contains("rc=28"));
    let what = || format!("{:?} before, {:?} now", before, counted(api));
    assert!(
        wait_for(Duration::from_secs(10), || {
            let now = counted(api);
            now.0 > before.0 && now.1 > before.1 && now.2 > before.2 && now.3 > before.3
        }),
        "each packet dropped as traced: {}",
        what()
    );
}

/// Starts `pollux ctl --json trace --live` for `count` packets matching
/// `filter`, and waits until the workers trace.
fn live_trace(api: &Api, filter: &str, count: u32) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
        .arg("ctl")
        .arg("--socket")
        .arg(&api.sock)
        .args([
            "--json",
            "trace",
            "--live",
            "--filter",
            filter,
            "--seconds",
            "20",
        ])
        .args(["--count", &count.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // (Nothing matches before the packets are sent: reading takes none.)
    api.wait_for(
        "/v1/trace/live",
        Duration::from_secs(10),
        "the live trace to start",
        |v| v["running"] == true && v["filter"] == filter,
        String::new,
    );
    child
}

/// The packets a live trace printed, once it ended.
fn live_traced(child: std::process::Child) -> Vec<Value> {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Starts `pollux ctl capture args... -w pcap`, and waits until the
/// workers capture.
fn start_capture(api: &Api, args: &[&str], pcap: &std::path::Path) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
        .arg("ctl")
        .arg("--socket")
        .arg(&api.sock)
        .arg("capture")
        .args(args)
        .arg("-w")
        .arg(pcap)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    api.wait_for(
        "/v1/capture",
        Duration::from_secs(10),
        "the capture to start",
        |v| v["running"] == true,
        String::new,
    );
    child
}
