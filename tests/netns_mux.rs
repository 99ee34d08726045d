//! The load balancer as a Mux with direct server return: a client behind a
//! router, one Mux pollux and two host pollux instances with two DIPs
//! each, all real kernel stacks in namespaces.
//!
//! Underlay 10.200.0.0/24, a bridge in the router namespace: the router
//! 10.200.0.254, the Mux 10.200.0.1, host H1 10.200.0.2 (two workers), host
//! H2 10.200.0.3. The client 203.0.113.10 is on the router's other side.
//! The router routes the VIP 192.0.2.10 to the Mux; the Mux routes
//! 10.1.0.0/24 to H1 and 10.2.0.0/24 to H2, whose VMs are the DIPs
//! (10.1.0.4, 10.1.0.5 on H1; 10.2.0.4, 10.2.0.5 on H2), serving on port
//! 8080. Nothing is configured with a MAC: next hops are resolved by ARP.
//!
//! Shown: the Mux picks a DIP per connection and sends the client's
//! packets to it in IP in IP; the host takes them out, DNATs them to the
//! DIP's port 8080 and sends the replies straight to the client from the
//! VIP. The Mux probes each DIP through the VIP the same way (from its own
//! address, which the answers come straight back to), and takes a DIP
//! whose server stopped out of the VIP; a client port whose connection that
//! DIP served, used again, reaches another. A curl loop reaches all four DIPs
//! and long downloads arrive whole;
//! a capture of the Mux's link holds the client's packets and the IP in
//! IP ones, and not one reply; the DIPs log the client's own address; IP
//! in IP to an address that is no DIP, and from a host that is none of
//! the hosts' Muxes, is refused by reason.
//!
//! Needs root and `ip`, `ss`, `ethtool`, `curl`, `python3`, `tcpdump`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::mux::{self, CLIENT, VIP, count};
use common::netns::{Lab, read, wait_for};
use std::time::Duration;

/// (tag, address/prefix, MAC, gateway) of the DIPs: two on each host.
const DIPS: [mux::Dip; 4] = [
    ("d11", "10.1.0.4/24", "02:00:00:01:00:04", "10.1.0.1"),
    ("d12", "10.1.0.5/24", "02:00:00:01:00:05", "10.1.0.1"),
    ("d21", "10.2.0.4/24", "02:00:00:02:00:04", "10.2.0.1"),
    ("d22", "10.2.0.5/24", "02:00:00:02:00:05", "10.2.0.1"),
];

/// The download's size.
const SIZE: usize = 3 << 20;

/// The lab; returns it with the root-side ends of the uplinks of the Mux,
/// H1 and H2.
fn lab() -> (Lab, [String; 3]) {
    let (mut lab, mux_up) = mux::lab("mx");
    mux::add_dips(&mut lab, &DIPS);
    let h1 = mux::link(&lab, 1, "02:00:00:00:fe:11");
    let h2 = mux::link(&lab, 2, "02:00:00:00:fe:12");
    (lab, [mux_up, h1, h2])
}

fn mux_config(uplink: &str) -> String {
    mux::config(
        uplink,
        &[("10.1.0.0/24", "10.200.0.2"), ("10.2.0.0/24", "10.200.0.3")],
        &["10.1.0.4", "10.1.0.5", "10.2.0.4", "10.2.0.5"],
        "/name",
    )
}

/// Host `n` (1 or 2) at 10.200.0.`n+1`, with two of the DIPs.
fn host_config(lab: &Lab, n: u8, uplink: &str, workers: u8) -> String {
    let i = usize::from(n - 1) * 2;
    mux::host_config(
        lab,
        n,
        &format!("10.200.0.{}", n + 1),
        "\"10.200.0.1\"",
        &DIPS[i..i + 2],
        uplink,
        workers,
    )
}

/// Client ports (from 61000, above the ephemeral range) whose connections
/// to the VIP Maglev gives d22 while the four DIPs are up, with the DIP it
/// gives each once d22 is down: six that move to d21 (on d22's host) and
/// four to H1's DIPs. A Mux's pick depends on the backends (addresses,
/// ports, weights), its table's size, the VIP's distribution and the flow
/// alone: with the defaults the Mux's configuration leaves, it makes the
/// same.
fn d22_ports() -> Vec<(u16, &'static str)> {
    let backends = DIPS
        .iter()
        .map(|(_, cidr, ..)| lb::Backend {
            ip: cidr.split('/').next().unwrap().parse().unwrap(),
            port: 8080,
            weight: 1,
        })
        .collect();
    let mut cfg = lb::VipConfig::new("web", VIP.parse().unwrap(), 80, 6, backends);
    cfg.mode = lb::balancer::VipMode::Mux;
    let up = lb::Vip::new(cfg.clone(), &[]).unwrap();
    let down = lb::Vip::new(cfg, &[true, true, true, false]).unwrap();
    let (mut on_h2, mut on_h1) = (Vec::new(), Vec::new());
    for port in 61000..65000u16 {
        let k = dataplane::FlowKey::new(CLIENT.parse().unwrap(), port, VIP.parse().unwrap(), 80, 6);
        if up.pick(&k) != Some(3) {
            continue;
        }
        let to = DIPS[down.pick(&k).unwrap()].0;
        match to {
            "d21" if on_h2.len() < 6 => on_h2.push((port, to)),
            "d11" | "d12" if on_h1.len() < 4 => on_h1.push((port, to)),
            _ => {}
        }
    }
    assert!(on_h2.len() == 6 && on_h1.len() == 4, "{on_h2:?} {on_h1:?}");
    on_h2.into_iter().chain(on_h1).collect()
}

fn sum(v: &serde_json::Value, field: &str) -> u64 {
    v["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w[field].as_u64()).sum())
        .unwrap_or(0)
}

fn drops(v: &serde_json::Value, reason: &str) -> u64 {
    v["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["drops"][reason].as_u64()).sum())
        .unwrap_or(0)
}

#[test]
fn a_mux_spreads_a_vip_over_two_hosts_whose_replies_go_straight_to_the_client() {
    if !testkit::require::root_and(&["ip", "ss", "ethtool", "curl", "python3", "tcpdump", "cmp"]) {
        return;
    }
    let (mut lab, [mux_up, h1_up, h2_up]) = lab();
    let dir = lab.dir.clone();
    // Each DIP serves a page naming it and a download, and logs who asked.
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 13 % 251) as u8).collect();
    let mut servers = Vec::new();
    for (tag, cidr, _, _) in DIPS {
        let root = dir.join(format!("www-{tag}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("name"), tag).unwrap();
        std::fs::write(root.join("big"), &data).unwrap();
        let ip = cidr.split('/').next().unwrap();
        servers.push(lab.http_server(tag, ip, 8080, &root, &dir.join(format!("{tag}.log"))));
    }
    // What the Mux's link carries, as its other end sees it (pollux sends
    // past the kernel's taps on its own end).
    let cap = dir.join("mux.pcap");
    let tcpdump = lab.capture("rt", "-i eth0 -nn", &cap);
    let (_, _, log_m) = lab.pollux("mux", &mux_config(&mux_up));
    let (_, _, log_1) = lab.pollux("h1", &host_config(&lab, 1, &h1_up, 2));
    let (_, _, log_2) = lab.pollux("h2", &host_config(&lab, 2, &h2_up, 1));
    let (mux, h1, h2) = (lab.api("mux"), lab.api("h1"), lab.api("h2"));
    let logs = || {
        format!(
            "MUX:\n{}\nH1:\n{}\nH2:\n{}",
            read(&log_m),
            read(&log_1),
            read(&log_2)
        )
    };
    for api in [&mux, &h1, &h2] {
        api.wait_ready(Duration::from_secs(30), logs);
    }
    // The Mux's tunnels to the four DIPs, their next hops (the hosts)
    // resolved by ARP.
    let u = mux.wait_for(
        "/v1/underlay",
        Duration::from_secs(20),
        "the Mux's tunnels resolved",
        |u| {
            u["tunnels"]
                .as_array()
                .is_some_and(|t| t.len() == 4 && t.iter().all(|t| t["next_hop_mac"].is_string()))
        },
        logs,
    );
    // The Mux probes each DIP through the VIP, as clients reach it (IP in
    // IP from its own address; the answer comes straight back): all up.
    let all = [
        "10.1.0.4:8080",
        "10.1.0.5:8080",
        "10.2.0.4:8080",
        "10.2.0.5:8080",
    ];
    mux.wait_probes(&all, true, Duration::from_secs(30), logs);
    // The table the Mux picks from: all four DIPs in it, and its digest
    // (what Muxes compare).
    let m = mux.get("/v1/maglev").unwrap();
    let t = &m["vips"][0];
    assert_eq!(
        (
            t["vip"].as_str(),
            t["mode"].as_str(),
            t["in_table"].as_u64()
        ),
        (Some("web"), Some("mux"), Some(4)),
        "{m}"
    );
    let digest4 = t["digest"].as_str().unwrap().to_string();
    let tunnels = u["tunnels"].to_string();
    for (dip, hop, mac) in [
        ("10.1.0.4", "10.200.0.2", "02:50:4c:58:00:11"),
        ("10.2.0.5", "10.200.0.3", "02:50:4c:58:00:12"),
    ] {
        assert!(
            tunnels.contains(dip) && tunnels.contains(hop) && tunnels.contains(mac),
            "{tunnels}"
        );
    }
    // The client reaches the VIP: every connection to one DIP, all four
    // DIPs among them.
    let ok = wait_for(Duration::from_secs(20), || {
        lab.bash("cl", &format!("curl -sf --max-time 2 http://{VIP}/name"))
            .status
            .success()
    });
    assert!(ok, "the VIP from the client\n{}", logs());
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let out = lab.bash("cl", &format!("curl -sf --max-time 5 http://{VIP}/name"));
        assert!(out.status.success(), "{out:?}\n{}", logs());
        *seen
            .entry(String::from_utf8_lossy(&out.stdout).to_string())
            .or_insert(0) += 1;
    }
    let names: Vec<&str> = DIPS.iter().map(|d| d.0).collect();
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "{seen:?}"
    );
    // Long downloads, with a curl loop beside them.
    let curls = mux::CurlLoop::start(&mut lab, "cl", &format!("http://{VIP}/name"));
    mux::downloads(&mut lab, "cl", 8, &format!("http://{VIP}/big"), "400k");
    let broken = mux::broken_downloads(&lab, 8, &data, Duration::from_secs(150));
    assert!(broken.is_empty(), "broken downloads {broken:?}\n{}", logs());
    let (ok, bad) = curls.finish();
    assert_eq!(bad, 0, "the curl loop saw failures ({ok} ok)");
    assert!(ok > 5, "the curl loop ran {ok} times");
    // Connections from client ports that Maglev gives d22 (the ports the
    // client reuses once d22 is down), each served by d22.
    let moving = d22_ports();
    for (port, _) in &moving {
        let out = lab.bash(
            "cl",
            &format!("curl -sf --max-time 5 --local-port {port} http://{VIP}/name"),
        );
        assert!(out.status.success(), "{out:?}\n{}", logs());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "d22", "port {port}");
    }
    // A DIP whose server stops is taken down by the Mux's probes; new
    // connections go to the other three.
    common::netns::terminate(&mut lab.children[servers[3]]);
    mux.wait_probes(&["10.2.0.5:8080"], false, Duration::from_secs(30), logs);
    mux.wait_probes(&all[..3], true, Duration::from_secs(5), logs);
    let mut after = std::collections::BTreeSet::new();
    // Those ports used again: each a new connection, which the Mux
    // decides afresh (the client had closed the old one), to the DIP
    // Maglev now gives it; on H2, which still tracks the old one's end to
    // d22, to d21, none refused. (The servers close first, so the client
    // keeps no TIME_WAIT and binds the ports again at once; a port whose
    // connection the client happened to close first is left out.)
    let waiting = lab.bash("cl", "ss -Htan state time-wait");
    let waiting = String::from_utf8_lossy(&waiting.stdout).to_string();
    let free: Vec<_> = moving
        .iter()
        .filter(|(port, _)| !waiting.contains(&format!(":{port} ")))
        .collect();
    assert!(
        free.iter().any(|(_, dip)| *dip == "d21") && free.iter().any(|(_, dip)| *dip != "d21"),
        "the client holds these ports in TIME_WAIT:\n{waiting}"
    );
    let refused = drops(&h2.get("/v1/counters").unwrap(), "lb_dsr_not_backend");
    for (port, dip) in free {
        let out = lab.bash(
            "cl",
            &format!("curl -sf --max-time 5 --local-port {port} http://{VIP}/name"),
        );
        assert!(out.status.success(), "port {port}: {out:?}\n{}", logs());
        assert_eq!(String::from_utf8_lossy(&out.stdout), *dip, "port {port}");
        after.insert(dip.to_string());
    }
    let c2 = h2.get("/v1/counters").unwrap();
    assert_eq!(drops(&c2, "lb_dsr_not_backend"), refused, "{c2}");
    for _ in 0..20 {
        let out = lab.bash("cl", &format!("curl -sf --max-time 5 http://{VIP}/name"));
        assert!(out.status.success(), "{out:?}\n{}", logs());
        after.insert(String::from_utf8_lossy(&out.stdout).to_string());
    }
    assert!(!after.contains("d22") && after.len() == 3, "{after:?}");
    // The DIPs saw the client's own address.
    for (tag, ..) in DIPS {
        let log = read(&dir.join(format!("{tag}.log")));
        assert!(
            log.contains(&format!("{CLIENT} - - ")),
            "{tag} did not log the client's address:\n{log}"
        );
    }
    // What an operator sees of the Mux: its tunnels to the DIPs, and what
    // went through them.
    let ctl = |api: &common::api::Api, what: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
            .args(["ctl", "--socket", api.sock.to_str().unwrap(), what])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // The digest changed with the table (three DIPs in it), in the API, in
    // `pollux ctl maglev` and in the metrics.
    let m = mux.get("/v1/maglev").unwrap();
    let t = &m["vips"][0];
    let digest3 = t["digest"].as_str().unwrap().to_string();
    assert!(
        digest3 != digest4 && t["in_table"].as_u64() == Some(3),
        "{m}"
    );
    let text = ctl(&mux, "maglev");
    assert!(text.contains(&digest3) && text.contains("3/4"), "{text}");
    let metric = format!(
        "pollux_vip_table_digest{{vip=\"web\",vnet=\"lb\"}} {}",
        u32::from_str_radix(&digest3, 16).unwrap()
    );
    assert!(
        ctl(&mux, "metrics").lines().any(|l| l == metric),
        "{metric}"
    );
    let text = ctl(&mux, "underlay");
    for want in ["web/10.1.0.4", "web/10.2.0.5", "ipip", "10.200.0.3"] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert!(ctl(&mux, "counters").contains("mux (IP in IP to DIPs) tx"));
    assert!(ctl(&h1, "counters").contains("dsr (from Muxes) rx"));
    // The counters: the Mux sent in IP in IP, each host took in.
    let cm = mux.get("/v1/counters").unwrap();
    let (c1, c2) = (
        h1.get("/v1/counters").unwrap(),
        h2.get("/v1/counters").unwrap(),
    );
    assert!(sum(&cm, "mux_tx") > 1000, "{cm}");
    assert!(
        sum(&c1, "dsr_rx") > 100 && sum(&c2, "dsr_rx") > 100,
        "{c1}\n{c2}"
    );
    // IP in IP sent to H1 from the router, which is no Mux: to an address
    // no DIP has, not taken in (not H1's), dropped as no route; to a DIP,
    // refused as spoofed.
    let c = h1.get("/v1/counters").unwrap();
    let (sp0, nr0) = (drops(&c, "tunnel_spoofed"), drops(&c, "no_route"));
    let py = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)\n\
         inner = bytes([0x45,0,0,20,0,0,0x40,0,64,6,0,0]) + socket.inet_aton('{CLIENT}') + socket.inet_aton('{VIP}')\n\
         for dst in ['10.1.0.9', '10.1.0.4']:\n    s.sendto(inner, (dst, 0))\n"
    );
    lab.exec(
        "rt",
        &["ip", "route", "add", "10.1.0.0/24", "via", "10.200.0.2"],
    );
    lab.exec("rt", &["python3", "-c", &py]);
    h1.wait_for(
        "/v1/counters",
        Duration::from_secs(10),
        "the IP-in-IP packets counted",
        |c| drops(c, "tunnel_spoofed") == sp0 + 1 && drops(c, "no_route") > nr0,
        logs,
    );
    // Nothing came back through the Mux: the capture of its link has the
    // client's packets to the VIP and the IP-in-IP ones to the DIPs, and
    // not one packet from the VIP to the client (from the VIP, only the
    // answers to the Mux's own probes, to its own address).
    common::netns::terminate(&mut lab.children[tcpdump]);
    let _ = lab.children[tcpdump].wait();
    let to_vip = count(
        &cap,
        &format!("tcp and dst host {VIP} and src host {CLIENT}"),
    );
    let ipip = count(&cap, "ip proto 4 and src host 10.200.0.1");
    let replies = count(&cap, &format!("src host {VIP} and dst host {CLIENT}"));
    let probes = count(&cap, &format!("src host {VIP} and dst host 10.200.0.1"));
    let other = count(&cap, &format!("src host {VIP} and not dst host 10.200.0.1"));
    assert!(
        to_vip > 1000 && ipip > 1000,
        "to the VIP {to_vip}, IP in IP {ipip}"
    );
    assert_eq!((replies, other), (0, 0), "replies through the Mux");
    assert!(probes > 0, "no probe answers");
    eprintln!(
        "mux link: {to_vip} client packets in, {ipip} IP-in-IP out, {replies} replies, {probes} probe answers; DIPs {seen:?}"
    );
}
