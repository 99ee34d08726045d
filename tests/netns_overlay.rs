//! A vnet across hosts: two `pollux run` processes (host A and host B)
//! whose uplinks are on two underlay networks joined by a router namespace,
//! VMs (real kernel stacks in namespaces) of two vnets with the same prefix
//! on both hosts, and a Linux kernel `vxlan` device standing in for a third
//! host.
//!
//! Underlay (B with two workers): A is 192.168.100.1/24 with a static route to 192.168.101.0/24
//! via the router (192.168.100.254); B is 192.168.101.2/24 with the router
//! (192.168.101.254) as its default gateway; the kernel hosts KV
//! (192.168.100.3) and KW (192.168.100.4) share A's network (a bridge in
//! the router namespace). Nothing is configured with a MAC: every next hop
//! is resolved with ARP.
//!
//! Overlay: vnet a (VNI 100, VXLAN) has a1 10.1.0.10 on A, b1 10.1.0.20 on
//! B, and 10.1.0.50, KV's `vxlan` device; vnet b (VNI 200, Geneve) has a2
//! 10.1.0.10 on A and b2 10.1.0.20 on B: the same addresses.
//!
//! Shown: curl and ping across hosts in both vnets, each reaching its own
//! vnet's server (isolation with overlapping prefixes); a 2 MB download
//! whose full-size segments do not fit the tunnel, carried after path-MTU
//! discovery learns the tunnel's MTU from pollux; KV's kernel VXLAN
//! exchanging HTTP and ping with a1; the captured tunnel packets decoded
//! by `tshark` as VXLAN (VNI 100) and Geneve (VNI 200) with the inner
//! addresses, their outer source ports varying with the inner flow; KW
//! sending with an unknown VNI, from an address mapped to another host,
//! and from an unmapped address, each dropped with its reason; the
//! neighbours and tunnels as `pollux ctl underlay` shows them; A's routes
//! changed through the API and put back with `pollux ctl put-routes`; a hitless
//! upgrade of A whose successor starts with the resolved neighbours.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `python3`, `ping`, `tcpdump`,
//! `tshark`, and a kernel with VXLAN.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, sh, wait_for};
use std::time::Duration;

/// (tag, address/prefix, MAC, gateway) of the VMs.
const VMS: [(&str, &str, &str, &str); 4] = [
    ("a1", "10.1.0.10/16", "02:00:00:0a:00:10", "10.1.0.1"),
    ("a2", "10.1.0.10/16", "02:00:00:0b:00:10", "10.1.0.1"),
    ("b1", "10.1.0.20/16", "02:00:00:0a:00:20", "10.1.0.1"),
    ("b2", "10.1.0.20/16", "02:00:00:0b:00:20", "10.1.0.1"),
];

/// KV's VXLAN device's MAC (its remote mapping names it).
const KV_MAC: &str = "02:00:00:00:00:50";

/// The download's size.
const SIZE: usize = 2 << 20;

/// The lab: VMs, the router with A's bridge and B's link, KV and KW.
/// Returns it with the names of the root-side veth ends of A's and B's
/// uplinks.
fn lab() -> (Lab, String, String) {
    let mut lab = Lab::new("ov");
    for (tag, cidr, mac, gw) in VMS {
        lab.add_host(tag, cidr, mac, gw);
    }
    // The router: its eth0 (to A's uplink) in a bridge with KV's and KW's
    // links; eth1 (to B's uplink) on the other network.
    lab.add(
        "rt",
        "02:00:00:00:fe:01",
        &[
            vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            vec!["ip", "link", "add", "br0", "type", "bridge"],
            vec!["ip", "link", "set", "eth0", "master", "br0"],
            vec!["ip", "addr", "add", "192.168.100.254/24", "dev", "br0"],
            vec!["ip", "link", "set", "br0", "up"],
        ],
    );
    let a_up = lab.ns("rt").host.clone();
    let rt = lab.ns("rt").name.clone();
    let b_up = format!("{}b", &a_up[..a_up.len() - 1]);
    sh(&[
        "ip", "link", "add", &b_up, "type", "veth", "peer", "name", "eth1", "netns", &rt,
    ]);
    let _ = sh(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{b_up}.disable_ipv6=1"),
    ]);
    sh(&["ip", "link", "set", &b_up, "up"]);
    for cmd in [
        vec!["ip", "link", "set", "eth1", "address", "02:00:00:00:fe:02"],
        vec![
            "ethtool", "-K", "eth1", "tso", "off", "gso", "off", "gro", "off",
        ],
        vec!["ip", "addr", "add", "192.168.101.254/24", "dev", "eth1"],
        vec!["ip", "link", "set", "eth1", "up"],
    ] {
        lab.exec("rt", &cmd);
    }
    // KV and KW: kernel hosts on A's network, their links in the bridge.
    for (tag, ip, mac) in [
        ("kv", "192.168.100.3/24", "02:00:00:00:64:03"),
        ("kw", "192.168.100.4/24", "02:00:00:00:64:04"),
    ] {
        lab.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", ip, "dev", "eth0"],
                // Checksums complete before encapsulation.
                vec!["ethtool", "-K", "eth0", "tx", "off"],
            ],
        );
        let host = lab.ns(tag).host.clone();
        sh(&["ip", "link", "set", &host, "netns", &rt]);
        lab.exec("rt", &["ip", "link", "set", &host, "master", "br0"]);
        lab.exec("rt", &["ip", "link", "set", &host, "up"]);
    }
    let vxlan =
        |lab: &Lab, tag: &str, dev: &str, vni: &str, local: &str, mac: &str, addrs: &[&str]| {
            lab.exec(
                tag,
                &[
                    "ip",
                    "link",
                    "add",
                    dev,
                    "address",
                    mac,
                    "type",
                    "vxlan",
                    "id",
                    vni,
                    "local",
                    local,
                    "remote",
                    "192.168.100.1",
                    "dstport",
                    "4789",
                    "nolearning",
                ],
            );
            for a in addrs {
                lab.exec(tag, &["ip", "addr", "add", a, "dev", dev]);
            }
            lab.exec(
                tag,
                &[
                    "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off",
                ],
            );
            lab.exec(tag, &["ip", "link", "set", dev, "up"]);
        };
    // KV: vnet a's 10.1.0.50, as pollux A's remote mapping says.
    vxlan(
        &lab,
        "kv",
        "vx100",
        "100",
        "192.168.100.3",
        KV_MAC,
        &["10.1.0.50/16"],
    );
    // KW: vnet a's 10.1.0.50 again (mapped to KV, not KW) and an unmapped
    // 10.1.0.61; and VNI 300, which no vnet has.
    vxlan(
        &lab,
        "kw",
        "vx100",
        "100",
        "192.168.100.4",
        "02:00:00:00:00:51",
        &["10.1.0.50/16", "10.1.0.61/16"],
    );
    vxlan(
        &lab,
        "kw",
        "vx300",
        "300",
        "192.168.100.4",
        "02:00:00:00:00:52",
        &["10.3.0.60/16"],
    );
    (lab, a_up, b_up)
}

fn vnets() -> &'static str {
    r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
vni = 100
[[vnet]]
name = "b"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bd"
vni = 200
encap = "geneve"
"#
}

fn host_a(lab: &Lab, uplink: &str) -> String {
    format!(
        r#"
[[port]]
name = "a1"
driver = "af_packet"
iface = "{}"
[[port]]
name = "a2"
driver = "af_packet"
iface = "{}"
[[port]]
name = "wire"
driver = "af_packet"
iface = "{uplink}"
mtu = 1500

[uplink]
port = "wire"
mac = "02:50:4c:58:00:0a"
address = "192.168.100.1/24"
[[uplink.route]]
prefix = "192.168.101.0/24"
via = "192.168.100.254"
{}
[[vm]]
name = "a1"
port = "a1"
vnet = "a"
mac = "{}"
ips = ["10.1.0.10"]
[[vm]]
name = "a2"
port = "a2"
vnet = "b"
mac = "{}"
ips = ["10.1.0.10"]

[[remote]]
name = "b1"
vnet = "a"
ips = ["10.1.0.20"]
host = "192.168.101.2"
[[remote]]
name = "b2"
vnet = "b"
ips = ["10.1.0.20"]
host = "192.168.101.2"
[[remote]]
name = "kv"
vnet = "a"
ips = ["10.1.0.50"]
host = "192.168.100.3"
mac = "{KV_MAC}"
"#,
        lab.ns("a1").host,
        lab.ns("a2").host,
        vnets(),
        VMS[0].2,
        VMS[1].2,
    )
}

fn host_b(lab: &Lab, uplink: &str) -> String {
    // Two workers: a tunnel packet taken in by one may belong to a
    // connection the other owns.
    format!(
        r#"
[dataplane]
workers = 2
idle_sleep_us = 200

[[port]]
name = "b1"
driver = "af_packet"
iface = "{}"
[[port]]
name = "b2"
driver = "af_packet"
iface = "{}"
[[port]]
name = "wire"
driver = "af_packet"
iface = "{uplink}"
mtu = 1500

[uplink]
port = "wire"
mac = "02:50:4c:58:00:0b"
address = "192.168.101.2/24"
gateway = "192.168.101.254"
{}
[[vm]]
name = "b1"
port = "b1"
vnet = "a"
mac = "{}"
ips = ["10.1.0.20"]
[[vm]]
name = "b2"
port = "b2"
vnet = "b"
mac = "{}"
ips = ["10.1.0.20"]

[[remote]]
name = "a1"
vnet = "a"
ips = ["10.1.0.10"]
host = "192.168.100.1"
[[remote]]
name = "a2"
vnet = "b"
ips = ["10.1.0.10"]
host = "192.168.100.1"
"#,
        lab.ns("b1").host,
        lab.ns("b2").host,
        vnets(),
        VMS[2].2,
        VMS[3].2,
    )
}

/// What `curl` in namespace `tag` got from `url` (empty on failure).
fn curl(lab: &Lab, tag: &str, url: &str) -> String {
    let out = lab.bash(tag, &format!("curl -sf --max-time 5 {url}"));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The value of drop reason `reason` summed over workers in a
/// `/v1/counters` answer.
fn drops(v: &serde_json::Value, reason: &str) -> u64 {
    v["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["drops"][reason].as_u64()).sum())
        .unwrap_or(0)
}

fn sum(v: &serde_json::Value, field: &str) -> u64 {
    v["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w[field].as_u64()).sum())
        .unwrap_or(0)
}

#[test]
fn a_vnet_spans_hosts_in_vxlan_and_geneve_with_the_kernel_as_a_peer() {
    if !testkit::require::root_and(&[
        "ip", "ethtool", "curl", "python3", "ping", "tcpdump", "tshark",
    ]) {
        return;
    }
    let (mut lab, a_up, b_up) = lab();
    let dir = lab.dir.clone();
    // Each VM serves a page naming it, and a download.
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    for (tag, cidr, _, _) in VMS {
        let root = dir.join(format!("www-{tag}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("name"), tag).unwrap();
        std::fs::write(root.join("big"), &data).unwrap();
        let ip = cidr.split('/').next().unwrap();
        lab.http_server(tag, ip, 8000, &root, &dir.join(format!("{tag}.log")));
    }
    // The tunnels, as the router sees them.
    let cap = dir.join("underlay.pcap");
    let tcpdump = lab.capture("rt", "-i any -s 256 'udp port 4789 or udp port 6081'", &cap);
    let (idx_a, _, log_a) = lab.pollux("a", &host_a(&lab, &a_up));
    let (_, _, log_b) = lab.pollux("b", &host_b(&lab, &b_up));
    let (api_a, api_b) = (lab.api("a"), lab.api("b"));
    let logs = || format!("A:\n{}\nB:\n{}", read(&log_a), read(&log_b));
    api_a.wait_ready(Duration::from_secs(30), logs);
    api_b.wait_ready(Duration::from_secs(30), logs);
    // Every tunnel's next hop is resolved by ARP (A: the router for B's
    // network and KV on-link; B: its gateway).
    for api in [&api_a, &api_b] {
        let resolved = wait_for(Duration::from_secs(20), || {
            api.get("/v1/underlay").is_some_and(|u| {
                u["tunnels"].as_array().is_some_and(|t| {
                    !t.is_empty() && t.iter().all(|t| t["next_hop_mac"].is_string())
                })
            })
        });
        assert!(resolved, "{:?}\n{}", api.get("/v1/underlay"), logs());
    }
    let u = api_a.get("/v1/underlay").unwrap();
    let macs: Vec<(String, String)> = u["neighbours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["ip"].as_str().unwrap().into(),
                n["mac"].as_str().unwrap_or("-").into(),
            )
        })
        .collect();
    assert!(
        macs.iter()
            .any(|(ip, mac)| ip == "192.168.100.254" && mac != "-"),
        "{macs:?}"
    );
    assert!(
        macs.contains(&("192.168.100.3".into(), "02:00:00:00:64:03".into())),
        "{macs:?}"
    );

    // curl across hosts: each vnet reaches its own server at 10.1.0.20.

    for (from, url, want) in [
        ("a1", "http://10.1.0.20:8000/name", "b1"),
        ("a2", "http://10.1.0.20:8000/name", "b2"),
        ("b1", "http://10.1.0.10:8000/name", "a1"),
        ("b2", "http://10.1.0.10:8000/name", "a2"),
    ] {
        // (The first packets may wait for the servers to listen.)
        let ok = wait_for(Duration::from_secs(20), || curl(&lab, from, url) == want);
        assert!(
            ok,
            "{from} -> {url}: {:?}\n{}",
            curl(&lab, from, url),
            logs()
        );
    }
    // Several connections: their tunnel packets' source ports differ.
    for _ in 0..8 {
        assert_eq!(curl(&lab, "a1", "http://10.1.0.20:8000/name"), "b1");
    }
    for (from, to) in [
        ("a1", "10.1.0.20"),
        ("a2", "10.1.0.20"),
        ("b1", "10.1.0.10"),
    ] {
        let out = lab.bash(from, &format!("ping -c 3 -i 0.2 -W 2 {to}"));
        assert!(
            out.status.success(),
            "ping {from} -> {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A download larger than the tunnel's MTU allows per segment: B's
    // pollux answers b1's full-size segments with "fragmentation needed"
    // (1450), b1's kernel lowers its path MTU, and every byte arrives.
    let got = dir.join("big.got");
    let out = lab.bash(
        "a1",
        &format!(
            "curl -sf --max-time 60 -o {} http://10.1.0.20:8000/big",
            got.display()
        ),
    );
    assert!(
        out.status.success(),
        "download: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    assert!(std::fs::read(&got).unwrap() == data, "download differs");
    let route = lab.bash("b1", "ip route get 10.1.0.10");
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("mtu 1450"),
        "b1 learned no path MTU: {}",
        String::from_utf8_lossy(&route.stdout)
    );

    // The kernel's VXLAN as a third host.
    let ok = wait_for(Duration::from_secs(20), || {
        curl(&lab, "kv", "http://10.1.0.10:8000/name") == "a1"
    });
    assert!(
        ok,
        "kv -> a1: {:?}\n{}",
        curl(&lab, "kv", "http://10.1.0.10:8000/name"),
        logs()
    );
    let out = lab.bash("a1", "ping -c 3 -i 0.2 -W 2 10.1.0.50");
    assert!(
        out.status.success(),
        "a1 -> kv: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // vnet b has no 10.1.0.50: a2 does not reach KV.
    let out = lab.bash("a2", "ping -c 2 -i 0.2 -W 1 10.1.0.50");
    assert!(!out.status.success(), "a2 reached vnet a's 10.1.0.50");

    // KW: an unknown VNI, a source mapped to another host, an unmapped
    // source; each dropped on A with its reason.
    let before = api_a.get("/v1/counters").unwrap();
    for cmd in [
        "ping -c 2 -i 0.2 -W 1 10.3.0.1",
        "ping -c 2 -i 0.2 -W 1 -I 10.1.0.50 10.1.0.10",
        "ping -c 2 -i 0.2 -W 1 -I 10.1.0.61 10.1.0.10",
    ] {
        let out = lab.bash("kw", cmd);
        assert!(!out.status.success(), "{cmd} was answered");
    }
    let c = api_a.get("/v1/counters").unwrap();
    for reason in [
        "tunnel_unknown_vni",
        "tunnel_spoofed",
        "tunnel_unknown_source",
    ] {
        assert!(
            drops(&c, reason) > drops(&before, reason),
            "{reason}: {}",
            c["workers"]
        );
    }
    for (name, api) in [("A", &api_a), ("B", &api_b)] {
        let c = api.get("/v1/counters").unwrap();
        for f in ["tunnel_tx", "tunnel_rx", "arp_requests"] {
            assert!(sum(&c, f) > 0, "{name} {f}: {}", c["workers"]);
        }
    }
    // B's workers handed each other packets taken out of tunnels.
    let c = api_b.get("/v1/counters").unwrap();
    assert!(sum(&c, "handed_off") > 0, "{}", c["workers"]);
    // What an operator sees.
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["ctl", "--socket", api_a.sock.to_str().unwrap(), "underlay"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ctl.stdout);
    assert!(
        ctl.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    for want in [
        "address 192.168.100.1/24",
        "route 192.168.101.0/24 via 192.168.100.254",
        "192.168.100.3",
        "reachable",
        "kv",
        "geneve",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }

    // A's route to B's network changed through the API to a next hop
    // nobody answers for: the tunnels to B wait for ARP (and their packets
    // are dropped as unresolved); put back with `pollux ctl put-routes`,
    // they work again.
    let dead = r#"{"routes": [{"prefix": "192.168.101.0/24", "via": "192.168.100.250"}]}"#;
    let (code, body) = api_a.send("PUT", "/v1/routes", Some(dead));
    assert_eq!(code, 200, "{body}");
    let before = drops(&api_a.get("/v1/counters").unwrap(), "neighbor_unresolved");
    let moved = wait_for(Duration::from_secs(10), || {
        api_a.get("/v1/underlay").is_some_and(|u| {
            u["tunnels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["next_hop"] == "192.168.100.250" && t["next_hop_mac"].is_null())
        })
    });
    assert!(moved, "{:?}", api_a.get("/v1/underlay"));
    assert_eq!(curl(&lab, "a1", "http://10.1.0.20:8000/name"), "");
    assert!(drops(&api_a.get("/v1/counters").unwrap(), "neighbor_unresolved") > before);
    let routes = dir.join("routes.json");
    std::fs::write(
        &routes,
        r#"{"routes": [{"prefix": "192.168.101.0/24", "via": "192.168.100.254"}]}"#,
    )
    .unwrap();
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args([
            "ctl",
            "--socket",
            api_a.sock.to_str().unwrap(),
            "put-routes",
        ])
        .arg(&routes)
        .output()
        .unwrap();
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let back = wait_for(Duration::from_secs(20), || {
        curl(&lab, "a1", "http://10.1.0.20:8000/name") == "b1"
    });
    assert!(back, "{:?}\n{}", api_a.get("/v1/underlay"), logs());

    // A hitless upgrade of A: the successor starts with A's neighbours
    // (its tunnels need no ARP first), and the vnet goes on.
    let old_pid = api_a.get("/v1/status").unwrap()["pid"].as_u64().unwrap();
    let unresolved = drops(&api_a.get("/v1/counters").unwrap(), "neighbor_unresolved");
    let (_, _, log_n) = lab.pollux_takeover("a-next", "a", &[]);
    let gone = wait_for(Duration::from_secs(60), || {
        lab.children[idx_a].try_wait().unwrap().is_some()
    });
    assert!(gone, "A did not hand over\n{}\n{}", logs(), read(&log_n));
    let st = api_a.wait_for(
        "/v1/status",
        Duration::from_secs(30),
        "the successor serves the API",
        |v| v["takeover"]["from_pid"].as_u64() == Some(old_pid),
        || read(&log_n),
    );
    let u = api_a.get("/v1/underlay").unwrap();
    assert!(
        u["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["next_hop_mac"].is_string()),
        "successor's tunnels unresolved: {u}\n{st}"
    );
    assert_eq!(
        curl(&lab, "a1", "http://10.1.0.20:8000/name"),
        "b1",
        "{}",
        read(&log_n)
    );
    assert_eq!(
        curl(&lab, "kv", "http://10.1.0.10:8000/name"),
        "a1",
        "{}",
        read(&log_n)
    );
    let c = api_a.get("/v1/counters").unwrap();
    // (The counters go on from the predecessor's.)
    assert_eq!(
        drops(&c, "neighbor_unresolved"),
        unresolved,
        "{}",
        c["workers"]
    );

    // The captured tunnel packets, decoded by tshark.
    std::thread::sleep(Duration::from_millis(300));
    let pid = lab.children[tcpdump].id().to_string();
    sh(&["kill", "-INT", &pid]);
    let _ = lab.children[tcpdump].wait();
    // Only the layers pollux writes are checked: the capture keeps 256
    // bytes of each packet, so the HTTP bodies inside are cut short and
    // tshark's HTTP reassembly would call them malformed.
    let layers = [
        "--disable-protocol",
        "http",
        "-o",
        "tcp.desegment_tcp_streams:FALSE",
    ];
    let fields = |filter: &str, f: &[&str]| -> Vec<String> {
        let mut args = layers.to_vec();
        args.extend([
            "-r",
            cap.to_str().unwrap(),
            "-Y",
            filter,
            "-T",
            "fields",
            "-E",
            "separator=|",
        ]);
        for x in f {
            args.push("-e");
            args.push(x);
        }
        let out = std::process::Command::new("tshark")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let vx = fields("vxlan", &["vxlan.vni", "ip.src", "ip.dst", "udp.srcport"]);
    let gn = fields("geneve", &["geneve.vni", "ip.src", "ip.dst"]);
    assert!(
        !vx.is_empty() && !gn.is_empty(),
        "vxlan {vx:?} geneve {gn:?}"
    );
    // Outer and inner addresses (tshark lists both, outer first).
    let a_to_b = "192.168.100.1,10.1.0.10|192.168.101.2,10.1.0.20";
    assert!(
        vx.iter()
            .any(|l| l.starts_with("100|") && l.contains(a_to_b)),
        "no VXLAN a1 -> b1 in {:?}",
        &vx[..vx.len().min(10)]
    );
    assert!(
        gn.iter()
            .any(|l| l.starts_with("0x0000c8|") && l.contains(a_to_b)),
        "no Geneve a2 -> b2 in {:?}",
        &gn[..gn.len().min(10)]
    );
    assert!(
        vx.iter().any(|l| l.starts_with("100|")
            && l.contains("192.168.100.3,10.1.0.50|192.168.100.1,10.1.0.10")),
        "no VXLAN from the kernel"
    );
    let sports: std::collections::HashSet<&str> = vx
        .iter()
        .filter(|l| l.contains(a_to_b))
        .filter_map(|l| l.rsplit('|').next())
        .collect();
    assert!(sports.len() >= 4, "outer source ports {sports:?}");
    let bad = fields("(vxlan or geneve) and _ws.malformed", &["frame.number"]);
    let detail = bad.first().map(|n| {
        let out = std::process::Command::new("tshark")
            .args(layers)
            .args([
                "-r",
                cap.to_str().unwrap(),
                "-Y",
                &format!("frame.number == {n}"),
                "-V",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    });
    assert!(
        bad.is_empty(),
        "malformed: {bad:?}\n{}",
        detail.unwrap_or_default()
    );
}
