//! IPv6 end to end with real stacks: namespaces with IPv6 only, `pollux run`
//! on `af_packet` ports. The kernels resolve each other and their gateway
//! (a link-local address) through pollux's neighbour-discovery responder;
//! ping, a direct HTTP request and one through an IPv6 VIP all work, and the
//! other tenant reaches nothing. A download through the VIP to a client
//! behind a port with a smaller MTU completes by path-MTU discovery (the
//! server's kernel learns it from pollux's ICMPv6 "packet too big"), and a
//! packet whose hop limit runs out is answered with ICMPv6 time exceeded
//! from the vnet's gateway address; the server kernel's ICMPv6 port
//! unreachable about a datagram to a UDP VIP reaches the client's socket
//! translated. A 3 000-byte UDP datagram through an IPv6 VIP crosses in
//! fragments (the sending kernel's) to a real echo server and back, and
//! so does one whose fragments the client writes last-first (a raw
//! socket): pollux holds the later fragments until their first comes.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `ping`, `python3`
//! (`testkit::require`: without them it says why it did not run; under CI it
//! fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::worker_sum;
use common::netns::{FRAGMENT_CLIENT, Lab, REFUSED_CLIENT, UDP_ECHO_SERVER, read, wait_for};
use std::time::Duration;

const NODES: [(&str, &str, &str, &str); 3] = [
    ("w1", "fd00:1::4", "02:00:00:00:01:04", "a"),
    ("cl", "fd00:1::20", "02:00:00:00:01:20", "a"),
    ("ot", "fd00:1::30", "02:00:00:00:01:30", "b"),
];

fn config(lab: &Lab) -> String {
    let mut c = String::new();
    for (tag, ..) in NODES {
        c += &format!(
            "[[port]]\nname = \"{tag}\"\ndriver = \"af_packet\"\niface = \"{}\"\n",
            lab.ns(tag).host
        );
        // The client stands behind a narrower link.
        if tag == "cl" {
            c += "mtu = 1400\n";
        }
    }
    c += r#"
[[vnet]]
name = "a"
prefixes = ["fd00:1::/64"]
gateway_mac = "12:34:56:78:9a:bc"
[[vnet]]
name = "b"
prefixes = ["fd00:1::/64"]
gateway_mac = "12:34:56:78:9a:bd"
[[vip]]
name = "web6"
vnet = "a"
address = "fd00:1::100"
port = 80
protocol = "tcp"
backends = [ { vm = "w1", port = 8000 } ]
[[vip]]
name = "closed6"
vnet = "a"
address = "fd00:1::101"
port = 9
protocol = "udp"
backends = [ { vm = "w1", port = 9999 } ]
[[vip]]
name = "echo6"
vnet = "a"
address = "fd00:1::102"
port = 7
protocol = "udp"
backends = [ { vm = "w1", port = 7007 } ]
"#;
    for (tag, ip, mac, vnet) in NODES {
        c += &format!(
            "[[vm]]\nname = \"{tag}\"\nport = \"{tag}\"\nvnet = \"{vnet}\"\nmac = \"{mac}\"\nips = [\"{ip}\"]\n"
        );
    }
    c
}

#[test]
fn ipv6_stacks_resolve_and_talk_through_pollux() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "ping", "python3"]) {
        return;
    }
    let mut lab = Lab::new("v6");
    for (tag, ip, mac, _) in NODES {
        let cidr = format!("{ip}/64");
        lab.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=0"],
                vec!["ip", "-6", "addr", "add", &cidr, "dev", "eth0", "nodad"],
            ],
        );
        // Off-link traffic goes to the gateway, a link-local address that
        // pollux answers for.
        lab.exec(
            tag,
            &[
                "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ],
        );
    }
    let root = lab.dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "w1 over v6").unwrap();
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("big"), &big).unwrap();
    let log = lab.dir.join("w1.log");
    lab.http_server("w1", "fd00:1::4", 8000, &root, &log);
    let (idx, out, err) = lab.pollux("pollux-v6", &config(&lab));
    lab.api("pollux-v6")
        .wait_ready(Duration::from_secs(60), || read(&err));

    let r = lab.bash("cl", "ping -6 -c 2 -W 2 fd00:1::4 >/dev/null; echo rc=$?");
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("rc=0"),
        "ping failed: {}\n{}",
        String::from_utf8_lossy(&r.stdout),
        read(&err)
    );
    let r = lab.bash("cl", "curl -s -g --max-time 5 'http://[fd00:1::4]:8000/'");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "w1 over v6");
    let r = lab.bash("cl", "curl -s -g --max-time 5 'http://[fd00:1::100]/'");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "w1 over v6");
    // A download through the VIP to the client behind its 1 400-byte link:
    // the server's kernel learns the path MTU from pollux's "packet too
    // big" and the download completes, every byte.
    let got = lab.dir.join("big.got");
    let r = lab.bash(
        "cl",
        &format!(
            "curl -s -g --max-time 30 -o {} 'http://[fd00:1::100]/big'",
            got.display()
        ),
    );
    assert!(r.status.success(), "download: {:?}\n{}", r, read(&err));
    assert!(std::fs::read(&got).unwrap() == big, "download differs");
    let r = lab.bash("w1", "ip -6 route get fd00:1::20");
    let route = String::from_utf8_lossy(&r.stdout);
    assert!(route.contains("mtu 1400"), "{route}");
    // A packet whose hop limit runs out in pollux is answered from the
    // vnet's gateway address.
    let r = lab.bash("cl", "ping -6 -c 1 -W 2 -t 1 fd00:1::4");
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("From fd00:1::1") && text.contains("Time exceeded"),
        "{text}\n{}",
        read(&err)
    );
    // The server's port unreachable about a datagram to a VIP reaches the
    // client's socket translated (it quotes what the client sent: the
    // VIP's address and port).
    std::fs::write(lab.dir.join("refused.py"), REFUSED_CLIENT).unwrap();
    let r = lab.bash(
        "cl",
        &format!(
            "python3 {} fd00:1::101 9",
            lab.dir.join("refused.py").display()
        ),
    );
    assert!(
        r.status.success(),
        "no port unreachable through the IPv6 VIP: {r:?}\n{}",
        read(&err)
    );
    // A datagram larger than the links crosses the UDP VIP in fragments,
    // both ways; and so does one whose fragments come last-first: the
    // later ones wait in pollux for their first.
    std::fs::write(lab.dir.join("echo6.py"), UDP_ECHO_SERVER).unwrap();
    std::fs::write(lab.dir.join("echo6_client.py"), FRAGMENT_CLIENT).unwrap();
    lab.spawn(
        "w1",
        &format!(
            "exec python3 -u {} fd00:1::4",
            lab.dir.join("echo6.py").display()
        ),
        &lab.dir.join("w1-echo.log"),
    );
    let client = lab.dir.join("echo6_client.py");
    // (The echo crosses the client's 1 400-byte port in one go because
    // the server's kernel learnt that path MTU from the download above;
    // otherwise its first answer is refused with "packet too big" and a
    // try after it crosses.)
    for how in ["", "reversed"] {
        let cmd = format!(
            "python3 {} fd00:1::20 fd00:1::102 7 {how}",
            client.display()
        );
        // The server may take a moment to start: a few tries.
        let ok = wait_for(Duration::from_secs(20), || {
            lab.bash("cl", &cmd).status.success()
        });
        assert!(ok, "{cmd} failed\n{}", read(&err));
    }
    let api = lab.api("pollux-v6");
    // (`frags_held` is published every 100 ms.)
    let held = wait_for(Duration::from_secs(20), || {
        worker_sum(&api.get("/v1/counters").unwrap(), |w| {
            w["frags_held"].as_u64()
        }) >= 2
    });
    let c = api.get("/v1/counters").unwrap();
    assert!(held, "no fragment held: {c}");
    assert_eq!(
        worker_sum(&c, |w| w["drops"]["frag_no_first"].as_u64()),
        0,
        "{c}"
    );
    // The other tenant has the same prefix and reaches neither.
    let r = lab.bash(
        "ot",
        "curl -s -g --max-time 2 'http://[fd00:1::100]/'; echo vip=$?; \
         curl -s -g --max-time 2 'http://[fd00:1::4]:8000/'; echo dip=$?",
    );
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("vip=28") && text.contains("dip=28"), "{text}");

    let (status, report) = lab.stop(idx, &out);
    assert!(status.success(), "{report}\n{}", read(&err));
    assert!(report.contains("(\"no_route\", "), "{report}");
    assert!(
        !read(&log).contains("fd00:1::30"),
        "the other vnet was served"
    );
}
