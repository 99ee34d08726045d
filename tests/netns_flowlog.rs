//! Flow logs over IPFIX, read by a collector nobody here wrote: `nfcapd`
//! and `nfdump` (Debian's nfdump package), and tshark's IPFIX dissector.
//!
//! Topology: vnet a = two DIPs (10.1.0.4-5, HTTP :8000, group "web": allow
//! tcp/8000 in, deny tcp/8001 in) behind VIP 10.1.0.100:80, and a client
//! 10.1.0.10, on `af_packet` ports; nfcapd listens on loopback.
//!
//! Shown: `[ipfix]` set through the API (a bad one refused, nothing
//! changed); after curl's conversations through the VIP and straight to a
//! DIP, a download that outlasts the active timeout, a connection the
//! group denies, and a conversation still open when pollux stops, nfdump
//! shows records of each direction of each conversation whose packets and
//! IP bytes add up to what tcpdump saw on the client's side, with the
//! ports in and out, the vnet and the VIP's translation to the DIP and
//! back; every denied SYN is a record with no output interface. tshark
//! decodes each record's firewall event, forwarding status, end (FIN,
//! active timeout, pollux stopping) and the group and rule that decided
//! it, and the options naming the ports and the vnet.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `python3`, `tcpdump`, `tshark`,
//! `nfcapd`, `nfdump` (`testkit::require`: without them it says why it did
//! not run; under CI it fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, terminate, wait_for};
use std::collections::BTreeMap;
use std::time::Duration;

/// (tag, address, MAC) of every namespace, in port order.
const NODES: [(&str, &str, &str); 3] = [
    ("cl", "10.1.0.10", "02:00:00:00:00:10"),
    ("d1", "10.1.0.4", "02:00:00:00:00:04"),
    ("d2", "10.1.0.5", "02:00:00:00:00:05"),
];
const CLIENT: &str = "10.1.0.10";
const VIP: &str = "10.1.0.100";
/// The download that lasts a few active timeouts (3 s at 100 KB/s).
const BIG: usize = 300_000;

fn config(lab: &Lab) -> String {
    let mut c = String::from("[dataplane]\nworkers = 1\n");
    for (tag, _, _) in NODES {
        c += &format!(
            "[[port]]\nname = \"{tag}\"\ndriver = \"af_packet\"\niface = \"{}\"\n",
            lab.ns(tag).host
        );
    }
    c += r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"

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

[[nsg]]
name = "client"
[[nsg.rule]]
name = "allow-web-out"
priority = 100
direction = "out"
action = "allow"
protocol = "tcp"
dst_ports = ["80", "8000", "8001"]

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { vm = "d1", port = 8000 }, { vm = "d2", port = 8000 } ]
"#;
    for (tag, ip, mac) in NODES {
        let nsg = if tag == "cl" {
            "nsg = \"client\"\n"
        } else {
            "nsg = \"web\"\n"
        };
        c += &format!(
            "[[vm]]\nname = \"{tag}\"\nport = \"{tag}\"\nvnet = \"a\"\nmac = \"{mac}\"\nips = [\"{ip}\"]\n{nsg}"
        );
    }
    c
}

/// A UDP port on loopback that nothing uses now.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What tcpdump saw on the client's side: per (source, source port,
/// destination, destination port), packets and IP bytes.
fn seen(pcap: &std::path::Path) -> Seen {
    let out = std::process::Command::new("tshark")
        .args(["-r", pcap.to_str().unwrap(), "-Y", "tcp", "-T", "fields"])
        .args(["-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst"])
        .args(["-e", "tcp.dstport", "-e", "ip.len"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = l.split('\t').collect();
        let k = (
            f[0].to_string(),
            f[1].parse().unwrap(),
            f[2].to_string(),
            f[3].parse().unwrap(),
        );
        let e: &mut (u64, u64) = m.entry(k).or_default();
        e.0 += 1;
        e.1 += f[4].parse::<u64>().unwrap();
    }
    m
}

/// One record as nfdump shows it.
#[derive(Debug, Clone, PartialEq)]
struct Flow {
    src: (String, u16),
    dst: (String, u16),
    packets: u64,
    bytes: u64,
    in_if: u32,
    out_if: u32,
    post_src: (String, u16),
    post_dst: (String, u16),
    vrf: u32,
    /// First and last packet, seconds since the epoch (nfdump 1.7.1's
    /// `%ter` prints the wrong milliseconds: the start and the duration).
    times: (f64, f64),
}

/// nfdump's records in `dir`.
fn nfdump(dir: &std::path::Path) -> Vec<Flow> {
    let out = std::process::Command::new("nfdump")
        .args(["-q", "-N", "-R", dir.to_str().unwrap(), "-o"])
        .arg("fmt:%sa|%sp|%da|%dp|%pkt|%byt|%in|%out|%xsa|%xsp|%xda|%xdp|%ivrf|%tsr|%tds")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains('|'))
        .map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            let n = |i: usize| -> u64 {
                f[i].parse()
                    .unwrap_or_else(|_| panic!("field {i} of {l:?} is not a number"))
            };
            Flow {
                src: (f[0].into(), n(1) as u16),
                dst: (f[2].into(), n(3) as u16),
                packets: n(4),
                bytes: n(5),
                in_if: n(6) as u32,
                out_if: n(7) as u32,
                post_src: (f[8].into(), n(9) as u16),
                post_dst: (f[10].into(), n(11) as u16),
                vrf: n(12) as u32,
                times: {
                    let start: f64 = f[13].parse().unwrap();
                    (start, start + f[14].parse::<f64>().unwrap())
                },
            }
        })
        .collect()
}

#[test]
fn flow_logs_reach_nfdump_with_the_bytes_and_decisions() {
    if !testkit::require::root_and(&[
        "ip", "ethtool", "curl", "python3", "tcpdump", "tshark", "nfcapd", "nfdump",
    ]) {
        return;
    }
    let mut lab = Lab::new("flog");
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
    let dir = lab.dir.clone();
    let addr = |tag: &str| NODES.iter().find(|n| n.0 == tag).unwrap().1;
    for (tag, ip, _) in &NODES[1..] {
        let root = dir.join(tag);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("hello from {tag}\n")).unwrap();
        std::fs::write(root.join("big"), vec![b'x'; BIG]).unwrap();
        lab.http_server(tag, ip, 8000, &root, &dir.join(format!("{tag}.log")));
    }
    // The collector, and what reaches it, on loopback.
    let port = free_udp_port();
    let flows = dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    let nfcapd_log = dir.join("nfcapd.log");
    let nfcapd = lab.spawn_root(
        &format!(
            "exec nfcapd -b 127.0.0.1 -p {port} -w {} -t 3600",
            flows.display()
        ),
        &nfcapd_log,
    );
    assert!(
        wait_for(Duration::from_secs(30), || {
            let ss = std::process::Command::new("ss")
                .arg("-lun")
                .output()
                .unwrap();
            String::from_utf8_lossy(&ss.stdout).contains(&format!("127.0.0.1:{port} "))
        }),
        "nfcapd did not listen: {}",
        read(&nfcapd_log)
    );
    let export = dir.join("export.pcap");
    let export_log = dir.join("export.log");
    let export_dump = lab.spawn_root(
        &format!(
            "exec tcpdump --immediate-mode -i lo -U -w {} udp port {port}",
            export.display()
        ),
        &export_log,
    );
    let client_pcap = dir.join("client.pcap");
    let client_dump = lab.capture("cl", "-i eth0 tcp", &client_pcap);
    assert!(
        wait_for(Duration::from_secs(30), || {
            std::fs::metadata(&export).is_ok_and(|m| m.len() >= 24)
        }),
        "tcpdump on lo did not start: {}",
        read(&export_log)
    );

    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (pollux, out, log) = lab.pollux("flog", &config(&lab));
    let api = lab.api("flog");
    let context = || format!("pollux log:\n{}", read(&log));
    api.wait_ready(Duration::from_secs(60), context);

    // [ipfix] through the API: a collector that is no address is refused,
    // and nothing changes; a good one is taken.
    let before = api.get("/v1/status").unwrap()["generation"].clone();
    let (code, body) = api.send(
        "PUT",
        "/v1/ipfix",
        Some(r#"{"collector": "collector.example:4739"}"#),
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("is not an address:port"), "{body}");
    assert_eq!(api.get("/v1/status").unwrap()["generation"], before);
    assert!(api.get("/v1/ipfix").unwrap()["ipfix"].is_null());
    let (code, body) = api.send(
        "PUT",
        "/v1/ipfix",
        Some(&format!(
            r#"{{"collector": "127.0.0.1:{port}", "template_interval_s": 1, "active_timeout_s": 1}}"#
        )),
    );
    assert_eq!(code, 200, "{body}");
    api.wait_for(
        "/v1/ipfix",
        Duration::from_secs(10),
        "the exporter to run",
        |v| {
            v["ipfix"]["collector"] == format!("127.0.0.1:{port}")
                && v["messages_sent"].as_u64() > Some(0)
        },
        context,
    );

    // Three conversations through the VIP, one straight to a DIP, a
    // download through the VIP that lasts a few active timeouts, and a
    // connection the group denies (curl gives up after 2 s: a SYN and its
    // retransmission).
    for p in [41001, 41002, 41003] {
        let r = lab.bash(
            "cl",
            &format!("curl -s --max-time 10 --local-port {p} http://{VIP}/"),
        );
        assert!(
            String::from_utf8_lossy(&r.stdout).starts_with("hello from d"),
            "curl from port {p}: {r:?}\n{}",
            context()
        );
    }
    let r = lab.bash(
        "cl",
        "curl -s --max-time 10 --local-port 41010 http://10.1.0.5:8000/",
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hello from d2\n");
    let r = lab.bash(
        "cl",
        &format!(
            "curl -s --max-time 30 --limit-rate 100K --local-port 41040 -o /dev/null \
             -w '%{{size_download}}' http://{VIP}/big"
        ),
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), BIG.to_string(), "{r:?}");
    let r = lab.bash(
        "cl",
        "curl -s --max-time 2 --local-port 41020 http://10.1.0.4:8001/; echo rc=$?",
    );
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("rc=28"),
        "{r:?}"
    );

    // The flows end 10 s after their FINs (the closing timeout): then
    // every record is made, and sent.
    api.wait_for(
        "/v1/flows",
        Duration::from_secs(60),
        "every flow to end",
        |v| v["matched"] == 0,
        context,
    );
    let v = api.wait_for(
        "/v1/ipfix",
        Duration::from_secs(10),
        "every record sent",
        |v| v["records_waiting"] == 0 && v["records_sent"].as_u64() > Some(0),
        context,
    );
    for k in [
        "records_lost",
        "records_suppressed",
        "records_unsent",
        "send_errors",
    ] {
        assert_eq!(v[k], 0, "{k}: {v}");
    }
    assert_eq!(v["running"], true, "{v}");

    // One more conversation, and pollux stops before its flows end: it
    // records them as it stops.
    let r = lab.bash(
        "cl",
        &format!("curl -s --max-time 10 --local-port 41030 http://{VIP}/"),
    );
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("hello from d"));
    let (status, _) = lab.stop(pollux, &out);
    assert!(status.success(), "{}", context());
    let reported = |sport: u16| {
        let out = std::process::Command::new("tshark")
            .args(["-r", export.to_str().unwrap()])
            .args(["-d", &format!("udp.port=={port},cflow")])
            .args(["-T", "fields", "-e", "cflow.srcport"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&sport.to_string())
    };
    assert!(
        wait_for(Duration::from_secs(10), || reported(41030)),
        "no record of the conversation open when pollux stopped"
    );
    for idx in [client_dump, export_dump, nfcapd] {
        terminate(&mut lab.children[idx]);
        lab.children[idx].wait().unwrap();
    }

    // nfdump: the packets and IP bytes tcpdump saw each way, the ports
    // in and out, the vnet and the translations.
    let got = nfdump(&flows);
    let seen = seen(&client_pcap);
    eprintln!("nfdump:\n{got:#?}\ntcpdump on the client's side:\n{seen:#?}");
    // Their times: within the test's, in order.
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for f in &got {
        let (a, b) = f.times;
        assert!(
            started - 1.0 <= a && a <= b && b <= ended + 1.0,
            "{started} {ended}: {f:?}"
        );
    }
    for p in [41001, 41002, 41003, 41040, 41030] {
        both_ways(&got, &seen, p, VIP);
    }
    assert_eq!(both_ways(&got, &seen, 41010, addr("d2")), addr("d2"));
    // Each denied SYN is a record of its own, sent nowhere.
    let denied: Vec<&Flow> = got
        .iter()
        .filter(|f| f.src == (CLIENT.into(), 41020) && f.dst == (addr("d1").into(), 8001))
        .collect();
    let syns = seen[&(CLIENT.to_string(), 41020, addr("d1").to_string(), 8001)];
    assert_eq!(denied.len() as u64, syns.0, "{denied:#?}");
    assert!(
        denied
            .iter()
            .all(|f| f.packets == 1 && f.out_if == 0 && f.in_if == 1 && f.vrf == 1),
        "{denied:#?}"
    );
    assert_eq!(denied.iter().map(|f| f.bytes).sum::<u64>(), syns.1);

    // tshark's IPFIX dissector: each record's decision, its end, and the
    // group and rule that decided it.
    let out = std::process::Command::new("tshark")
        .args(["-r", export.to_str().unwrap()])
        .args(["-d", &format!("udp.port=={port},cflow"), "-V"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Unexpected flow sequence"), "{text}");
    let records = dissected(&text);
    let rec = |sport: u16, dport: u16| -> Vec<&Dissected> {
        records
            .iter()
            .filter(|r| {
                r.get("SrcPort") == Some(&sport.to_string())
                    && r.get("DstPort") == Some(&dport.to_string())
            })
            .collect()
    };
    let field = |r: &Dissected, k: &str| r.get(k).cloned().unwrap_or_default();
    for (p, dport) in [
        (41001, 80),
        (41002, 80),
        (41003, 80),
        (41040, 80),
        (41030, 80),
        (41010, 8000),
    ] {
        for (sport, dport, initiator) in [(p, dport, true), (8000, p, false)] {
            let rs = rec(sport, dport);
            assert!(!rs.is_empty(), "tshark: no record from {sport} to {dport}");
            for r in &rs {
                let want = [
                    ("ForwardingStatus", "Forward (1)"),
                    (
                        "Biflow Direction",
                        if initiator {
                            "Initiator (1)"
                        } else {
                            "ReverseInitiator (2)"
                        },
                    ),
                    // The client's group and outbound rule, the
                    // destination's group and inbound rule (the replies'
                    // records name the rules that admitted their
                    // connection).
                    ("pen 32473 type 1", "client"),
                    ("pen 32473 type 2", "allow-web-out"),
                    ("pen 32473 type 3", "web"),
                    ("pen 32473 type 4", "allow-http"),
                ];
                for (k, v) in want {
                    assert_eq!(field(r, k), v, "{k} of {sport} to {dport}: {r:#?}");
                }
            }
            // Its end: once, as FIN and the closing timeout ended it, or
            // as pollux stopped; before it, the download's active
            // timeouts.
            let (end, event) = if p == 41030 {
                ("Forced end (4)", "Flow deleted (2)")
            } else {
                ("End of Flow detected (3)", "Flow deleted (2)")
            };
            let ends: Vec<_> = rs
                .iter()
                .filter(|r| field(r, "Flow End Reason") == end)
                .collect();
            assert_eq!(ends.len(), 1, "{sport} to {dport}: {rs:#?}");
            assert_eq!(field(ends[0], "Firewall Event"), event);
            let active: Vec<_> = rs
                .iter()
                .filter(|r| field(r, "Flow End Reason") == "Active timeout (2)")
                .collect();
            assert!(
                active
                    .iter()
                    .all(|r| field(r, "Firewall Event").ends_with("(5)")),
                "{active:#?}"
            );
            assert_eq!(active.len() + 1, rs.len(), "{sport} to {dport}: {rs:#?}");
            if p == 41040 {
                assert!(
                    !active.is_empty(),
                    "the download was never reported active: {rs:#?}"
                );
            }
        }
    }
    let denied = rec(41020, 8001);
    assert_eq!(denied.len() as u64, syns.0);
    for r in denied {
        for (k, v) in [
            ("Firewall Event", "Flow denied (3)"),
            ("ForwardingStatus", "Drop (2)"),
            ("ForwardingStatusDropCode", "Drop ACL Deny (1)"),
            ("OutputInt", "0"),
            ("pen 32473 type 1", "client"),
            ("pen 32473 type 2", "allow-web-out"),
            ("pen 32473 type 3", "web"),
            ("pen 32473 type 4", "deny-8001"),
        ] {
            assert_eq!(field(r, k), v, "{k} of a denied SYN: {r:#?}");
        }
    }
    // The options name the ports and the vnet.
    for name in ["IfName: cl", "IfName: d1", "IfName: d2", "VRFname: a"] {
        assert!(text.contains(name), "no {name:?} in the export");
    }
}

type Seen = BTreeMap<(String, u16, String, u16), (u64, u64)>;

/// Checks the records of both directions of the client's conversation
/// from port `p` with `to` (the VIP, port 80, or a DIP, port 8000):
/// alike but for their counts, which add up to what tcpdump saw on the
/// client's side, the ports in and out (cl 1, d1 2, d2 3: port number +
/// 1), the vnet (VRF 1) and the translations. Returns the DIP.
fn both_ways(got: &[Flow], seen: &Seen, p: u16, to: &str) -> String {
    let port = if to == VIP { 80 } else { 8000 };
    let if_of = |ip: &str| NODES.iter().position(|n| n.1 == ip).unwrap() as u32 + 1;
    let of = |src: (&str, u16), dst: (&str, u16)| -> Vec<&Flow> {
        got.iter()
            .filter(|f| f.src == (src.0.into(), src.1) && f.dst == (dst.0.into(), dst.1))
            .collect()
    };
    let sum = |rs: &[&Flow]| {
        rs.iter()
            .fold((0, 0), |a, f| (a.0 + f.packets, a.1 + f.bytes))
    };
    let saw = |src: (&str, u16), dst: (&str, u16)| {
        *seen
            .get(&(src.0.into(), src.1, dst.0.into(), dst.1))
            .unwrap_or_else(|| panic!("tcpdump saw nothing from {src:?} to {dst:?}"))
    };
    let fwd = of((CLIENT, p), (to, port));
    assert!(
        !fwd.is_empty(),
        "no record from client port {p} to {to}: {got:#?}"
    );
    let dip = fwd[0].post_dst.0.clone();
    assert!(dip == "10.1.0.4" || dip == "10.1.0.5", "{fwd:#?}");
    for f in &fwd {
        assert_eq!(f.post_src, (CLIENT.into(), p), "{f:?}");
        assert_eq!(f.post_dst, (dip.clone(), 8000), "{f:?}");
        assert_eq!((f.in_if, f.out_if, f.vrf), (1, if_of(&dip), 1), "{f:?}");
    }
    assert_eq!(sum(&fwd), saw((CLIENT, p), (to, port)), "{fwd:#?}");
    let back = of((&dip, 8000), (CLIENT, p));
    assert!(
        !back.is_empty(),
        "no record of {dip}'s replies to port {p}: {got:#?}"
    );
    for f in &back {
        assert_eq!(f.post_src, (to.into(), port), "{f:?}");
        assert_eq!(f.post_dst, (CLIENT.into(), p), "{f:?}");
        assert_eq!((f.in_if, f.out_if, f.vrf), (if_of(&dip), 1, 1), "{f:?}");
    }
    assert_eq!(sum(&back), saw((to, port), (CLIENT, p)), "{back:#?}");
    dip
}

type Dissected = BTreeMap<String, String>;

/// The data records in tshark's `-V` text of IPFIX messages: each field
/// `name: value` as tshark names it, the enterprise-specific ones as
/// `pen N type T` with their bytes as text.
fn dissected(text: &str) -> Vec<Dissected> {
    let mut out: Vec<Dissected> = Vec::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with("Flow ") && t[5..].chars().all(|c| c.is_ascii_digit()) {
            out.push(BTreeMap::new());
            continue;
        }
        if t.starts_with("Set ") || t.starts_with("Cisco NetFlow") {
            // (A record's fields end with its set.)
            out.push(BTreeMap::new());
            continue;
        }
        let Some(r) = out.last_mut() else { continue };
        if let Some(rest) = t.strip_prefix("Enterprise Private entry: ") {
            // "(name) Type 4: Value (hex bytes): 64 65 ..."
            let ty = rest
                .split("Type ")
                .nth(1)
                .and_then(|x| x.split(':').next())
                .unwrap();
            let hex = rest.split("(hex bytes): ").nth(1).unwrap();
            let bytes: Vec<u8> = hex
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect();
            let pen = rest.split("(").nth(1).unwrap_or("");
            assert!(pen.contains("Example Enterprise Number"), "{t}");
            r.insert(
                format!("pen 32473 type {ty}"),
                String::from_utf8(bytes).unwrap(),
            );
        } else if let Some((k, v)) = t.split_once(": ") {
            // Bit fields: "10.. .... = ForwardingStatus: Drop (2)".
            let k = k.rsplit("= ").next().unwrap_or(k);
            r.insert(k.to_string(), v.to_string());
        }
    }
    out.retain(|r| r.contains_key("SrcPort"));
    out
}
