//! Connections outlive policy changes: real kernel TCP stacks in network
//! namespaces behind `pollux run` (af_packet ports), long downloads, and
//! the control API changing the rules and a backend's health under them.
//!
//! Topology: vnet a (10.1.0.0/16, no SNAT: its addresses are routable) has
//! a server 10.1.0.4 (also the first backend of VIP 10.1.0.100:80; a second
//! backend 10.1.0.5 is probed every 100 ms and flips), and a client
//! 10.1.0.20 whose group denies inbound TCP from its vnet (its own
//! connections work only because the groups are stateful). vnet b
//! (10.2.0.0/16) has a client 10.2.0.20 and SNAT to 198.51.100.50. A host on
//! the wire (198.51.100.10, behind the uplink) serves too.
//!
//! Shown: downloads VM to VM, through the VIP, out of the uplink without
//! SNAT (whose replies the client's inbound rules would deny as new traffic)
//! and with SNAT, all running while 1 000 policy changes and 100 health
//! flips are applied, complete with every byte; `DELETE /v1/flows?reset=true`
//! makes the connections of a VM be judged again by the current rules.
//!
//! Also shown: IPv4 datagrams larger than the links' MTU, fragmented by the
//! sending kernel and reassembled by the receiving one, cross pollux VM to
//! VM (`ping -s 4000`), through a VIP and through SNAT (a 3 000-byte UDP
//! datagram echoed by a real server), every fragment after the first
//! following its first, also when the client writes them last-first (a
//! raw socket): they wait in pollux for their first; and a packet whose
//! TTL runs out in pollux is answered with ICMP time exceeded from the
//! vnet's gateway (`ping -t 1`, and `traceroute` VM to VM, to a VIP and
//! out of the uplink shows pollux as the first hop);
//! and ICMP errors the servers' kernels send (port unreachable) reach the
//! client's socket through a VIP and through SNAT, translated; and a VM
//! behind a port with a smaller MTU is reached by path-MTU discovery (the
//! sender's kernel learns the MTU from pollux's "fragmentation needed"),
//! also from the wire through a public VIP (the error then comes from the
//! VIP's address).
//!
//! Needs root and `ip`, `ethtool`, `curl`, `python3`, `ping`, `traceroute`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::worker_sum;
use common::netns::{FRAGMENT_CLIENT, Lab, REFUSED_CLIENT, UDP_ECHO_SERVER, read, wait_for};
use std::time::{Duration, Instant};

/// (tag, address/prefix, MAC, default gateway) of every namespace.
const NODES: [(&str, &str, &str, &str); 5] = [
    ("sv", "10.1.0.4/16", "02:00:00:00:01:04", "10.1.0.1"),
    ("s2", "10.1.0.5/16", "02:00:00:00:01:05", "10.1.0.1"),
    ("cl", "10.1.0.20/16", "02:00:00:00:01:20", "10.1.0.1"),
    ("cb", "10.2.0.20/16", "02:00:00:00:02:20", "10.2.0.1"),
    ("wr", "198.51.100.10/24", "02:00:00:00:03:10", ""),
];

/// pollux's MAC on the wire.
const UPLINK_MAC: &str = "02:50:4c:58:ff:ff";

/// Size of each download.
const SIZE: usize = 2 << 20;

fn lab() -> Lab {
    let mut lab = Lab::new("ct");
    for (tag, cidr, mac, gw) in NODES {
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
        // The clients' receive buffers stay small, so a rate-limited
        // download's bytes cross the switch as curl reads them: the kernel
        // would otherwise take the whole file in at once and leave nothing
        // to carry over the churn, a rule change or a reset.
        if tag == "cl" || tag == "cb" {
            lab.exec(
                tag,
                &["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 32768 65536"],
            );
        }
    }
    // The wire host reaches vnet a's routable addresses through pollux (a
    // router at 198.51.100.1 whose MAC is pollux's uplink MAC).
    lab.exec(
        "wr",
        &[
            "ip",
            "neigh",
            "add",
            "198.51.100.1",
            "lladdr",
            UPLINK_MAC,
            "dev",
            "eth0",
        ],
    );
    lab.exec(
        "wr",
        &["ip", "route", "add", "10.1.0.0/16", "via", "198.51.100.1"],
    );
    lab
}

fn config(lab: &Lab) -> String {
    let mut c = String::new();
    for (tag, name) in [
        ("sv", "sv"),
        ("s2", "s2"),
        ("cl", "cl"),
        ("cb", "cb"),
        ("wr", "wire"),
    ] {
        c += &format!(
            "[[port]]\nname = \"{name}\"\ndriver = \"af_packet\"\niface = \"{}\"\n",
            lab.ns(tag).host
        );
        // s2 stands behind a narrower link: 1 400 bytes of IP at most.
        if tag == "s2" {
            c += "mtu = 1400\n";
        }
    }
    c += &format!(
        r#"
[uplink]
port = "wire"
next_hop_mac = "{}"

[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vnet]]
name = "b"
prefixes = ["10.2.0.0/16"]
gateway_mac = "12:34:56:78:9a:bd"
[vnet.snat]
public_ips = ["198.51.100.50"]

[[nsg]]
name = "cli"
[[nsg.rule]]
name = "deny-vnet-tcp"
priority = 100
direction = "in"
action = "deny"
protocol = "tcp"
src = ["10.1.0.0/16"]

[[nsg]]
name = "srv"
[[nsg.rule]]
name = "allow-http"
priority = 100
direction = "in"
action = "allow"
protocol = "tcp"
dst_ports = ["8000"]
[[nsg.rule]]
name = "allow-sink"
priority = 110
direction = "in"
action = "allow"
protocol = "tcp"
dst_ports = ["7100"]

[[nsg]]
name = "spare"

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ {{ vm = "sv", port = 8000 }}, {{ vm = "s2", port = 8000 }} ]
[vip.probe]
kind = "http"
port = 8000
path = "/health"
interval_ms = 100
timeout_ms = 80
threshold = 1

[[vip]]
name = "echo"
vnet = "a"
address = "10.1.0.101"
port = 7
protocol = "udp"
backends = [ {{ vm = "sv", port = 7007 }} ]

[[vip]]
name = "sink"
vnet = "a"
address = "10.1.0.103"
port = 7100
protocol = "tcp"
backends = [ {{ vm = "s2", port = 7100 }} ]

[[vip]]
name = "sink-public"
vnet = "a"
address = "198.51.100.103"
port = 7100
protocol = "tcp"
backends = [ {{ vm = "s2", port = 7100 }} ]

[[vip]]
name = "closed"
vnet = "a"
address = "10.1.0.102"
port = 9
protocol = "udp"
backends = [ {{ vm = "sv", port = 9999 }} ]

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
[[vm]]
name = "cl"
port = "cl"
vnet = "a"
mac = "02:00:00:00:01:20"
ips = ["10.1.0.20"]
nsg = "cli"
[[vm]]
name = "cb"
port = "cb"
vnet = "b"
mac = "02:00:00:00:02:20"
ips = ["10.2.0.20"]
"#,
        NODES[4].2
    );
    c
}

/// A rule for the spare group that changes with `i` (what the churn PUTs).
fn churn_rule(i: usize) -> String {
    format!(
        r#"{{"priority": {}, "direction": "in", "action": "deny", "protocol": "udp", "dst_ports": ["{}"]}}"#,
        200 + i % 2,
        10_000 + i
    )
}

#[test]
fn connections_outlive_policy_changes_and_health_flips() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3", "cmp"]) {
        return;
    }
    let mut lab = lab();
    let dir = lab.dir.clone();
    // Random bytes, so a download that mixes up data shows.
    let data: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
        (0..SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    for (tag, ip) in [
        ("sv", "10.1.0.4"),
        ("s2", "10.1.0.5"),
        ("wr", "198.51.100.10"),
    ] {
        let root = dir.join(format!("www-{tag}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("big"), &data).unwrap();
        std::fs::write(root.join("health"), "ok").unwrap();
        lab.http_server(tag, ip, 8000, &root, &dir.join(format!("{tag}.log")));
    }
    // The client serves too: a new connection to it from its vnet is
    // denied by its group.
    lab.http_server(
        "cl",
        "10.1.0.20",
        8000,
        &dir.join("www-sv"),
        &dir.join("cl-server.log"),
    );
    let (idx, out, log) = lab.pollux("ct", &config(&lab));
    let api = lab.api("ct");
    let context = || read(&log);
    api.wait_ready(Duration::from_secs(30), context);
    api.wait_probes(
        &["10.1.0.4:8000", "10.1.0.5:8000"],
        true,
        Duration::from_secs(30),
        context,
    );
    // The servers answer on their port (python may take a moment).
    for (tag, url) in [
        ("cl", "http://10.1.0.4:8000/health"),
        ("cl", "http://198.51.100.10:8000/health"),
    ] {
        assert!(
            wait_for(Duration::from_secs(20), || {
                lab.bash(tag, &format!("curl -sf --max-time 2 {url}"))
                    .status
                    .success()
            }),
            "{url} from {tag}\n{}",
            read(&log)
        );
    }

    // 100 downloads, each stretched over the churn (a rate limit), in four
    // kinds: VM to VM (the client's inbound rules would deny its replies as
    // new traffic), through the VIP, out of the uplink without SNAT (the
    // same), and with SNAT.
    let kinds = [
        ("cl", "http://10.1.0.4:8000/big"),
        ("cl", "http://10.1.0.100/big"),
        ("cl", "http://198.51.100.10:8000/big"),
        ("cb", "http://198.51.100.10:8000/big"),
    ];
    let mut jobs = Vec::new();
    for i in 0..100 {
        let (tag, url) = kinds[i % kinds.len()];
        let file = dir.join(format!("dl{i}"));
        let cmd = format!(
            "exec curl -s --max-time 120 --limit-rate 64k -o {} -w '%{{http_code}}' {url}",
            file.display()
        );
        let c = lab.spawn(tag, &cmd, &dir.join(format!("dl{i}.log")));
        jobs.push((i, c, file, tag, url));
    }
    let started = Instant::now();

    // 1 000 policy changes through the API while they run, and 100 health
    // flips of the VIP's second backend.
    let health = dir.join("www-s2").join("health");
    let mut flips = 0;
    for i in 0..1000 {
        let (status, body) = api.send(
            "PUT",
            &format!("/v1/nsgs/spare/rules/churn{}", i % 2),
            Some(&churn_rule(i)),
        );
        assert!(status < 300, "change {i}: {status} {body}");
        if i % 10 == 9 {
            let up = flips % 2 == 1;
            if up {
                std::fs::write(&health, "ok").unwrap();
            } else {
                std::fs::remove_file(&health).unwrap();
            }
            api.wait_probes(&["10.1.0.5:8000"], up, Duration::from_secs(10), context);
            flips += 1;
        }
    }
    if flips % 2 == 1 {
        std::fs::write(&health, "ok").unwrap();
    }
    let churn = started.elapsed();
    let status = api.get("/v1/status").unwrap();
    assert!(status["generation"].as_u64().unwrap() >= 1000, "{status}");

    // Every download completes with every byte.
    let mut broken = Vec::new();
    for (i, c, file, tag, url) in &jobs {
        let code = lab.children[*c].wait().unwrap();
        let got = std::fs::read(file).unwrap_or_default();
        if !code.success() || got != data {
            broken.push(format!(
                "{tag} {url}: exit {code}, {} of {SIZE} bytes, {}",
                got.len(),
                read(&dir.join(format!("dl{i}.log")))
            ));
        }
    }
    eprintln!(
        "100 downloads over {churn:?} of churn (1000 changes, {flips} flips) in {:?}",
        started.elapsed()
    );
    assert!(
        broken.is_empty(),
        "{} of 100 downloads broke:\n{}\npollux:\n{}",
        broken.len(),
        broken.join("\n"),
        read(&log)
    );

    // A new connection is judged by the rules: the client's group denies
    // inbound TCP from its vnet, so the server cannot reach the client's
    // server, while the wire host (allowed by nothing either) cannot
    // either; the client reaches both.
    for (tag, url) in [
        ("sv", "http://10.1.0.20:8000/health"),
        ("wr", "http://10.1.0.20:8000/health"),
    ] {
        let r = lab.bash(tag, &format!("curl -sf --max-time 2 {url}"));
        assert!(!r.status.success(), "{tag} reached {url}");
    }

    // Re-judging: a client connection admitted now, then the rule that
    // admitted it replaced by a deny; the connection goes on until the
    // operator resets the client's flows, after which it is judged anew.
    let spawn_slow = |lab: &mut Lab, n: &str| {
        let file = dir.join(n);
        let cmd = format!(
            "exec curl -s --max-time 30 --limit-rate 100k -o {} http://10.1.0.4:8000/big",
            file.display()
        );
        lab.spawn("cl", &cmd, &dir.join(format!("{n}.log")))
    };
    let acl_deny = || -> u64 {
        let c = api.get("/v1/counters").unwrap();
        c["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["drops"]["acl_deny"].as_u64().unwrap_or(0))
            .sum()
    };
    let kept = spawn_slow(&mut lab, "kept");
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::metadata(dir.join("kept")).is_ok_and(|m| m.len() > 100_000)
    }));
    let flows_before = api.get("/v1/flows?vm=cl&proto=tcp").unwrap_or_default();
    let (status, body) = api.send(
        "PUT",
        "/v1/nsgs/srv/rules/allow-http",
        Some(
            r#"{"priority": 100, "direction": "in", "action": "deny", "protocol": "tcp", "dst_ports": ["8000"]}"#,
        ),
    );
    assert!(status < 300, "{status} {body}");
    let before = std::fs::metadata(dir.join("kept")).unwrap().len();
    let went_on = wait_for(Duration::from_secs(10), || {
        std::fs::metadata(dir.join("kept")).unwrap().len() > before + 200_000
    });
    if !went_on {
        let ss = |tag: &str| {
            String::from_utf8_lossy(
                &lab.bash(
                    tag,
                    "ss -tino state all '( sport = :8000 or dport = :8000 )'",
                )
                .stdout,
            )
            .into_owned()
        };
        panic!(
            "an admitted connection stopped when its rule changed: {before} bytes at the change, {} now\n\
             flows of the client before the change: {flows_before}\nnow: {}\ncounters: {}\n\
             client sockets:\n{}\nserver sockets:\n{}\npollux:\n{}",
            std::fs::metadata(dir.join("kept")).unwrap().len(),
            api.get("/v1/flows?vm=cl&proto=tcp").unwrap_or_default(),
            api.get("/v1/counters").unwrap_or_default(),
            ss("cl"),
            ss("sv"),
            read(&log)
        );
    }
    let denied_before = acl_deny();
    let (status, body) = api.send("DELETE", "/v1/flows?vm=cl&reset=true", None);
    assert_eq!(status, 200, "{body}");
    let code = lab.children[kept].wait().unwrap();
    let got = std::fs::metadata(dir.join("kept")).unwrap().len() as usize;
    assert!(
        !code.success() && got < SIZE,
        "the reset connection went on: exit {code}, {got} bytes; the reset said {body}; counters {}",
        api.get("/v1/counters").unwrap_or_default()
    );
    // What stopped it: its packets, judged again, were denied.
    assert!(acl_deny() > denied_before, "no acl_deny after the reset");

    let (st, report) = lab.stop(idx, &out);
    assert!(st.success(), "{report}\n{}", read(&log));
}

/// A TCP sink: reads each connection to its end and answers with the
/// number of bytes it read.
const SINK_SERVER: &str = "import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7100))
s.listen(8)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
    c.sendall(str(n).encode())
    c.close()
";

/// Uploads 2 MiB to argv[1]:argv[2]; exit status 0 when the sink counted
/// every byte.
const UPLOAD: &str = "import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(bytes(2 << 20))
s.shutdown(socket.SHUT_WR)
got = s.recv(100).decode()
sys.exit(0 if got == str(2 << 20) else 1)
";

#[test]
fn fragments_cross_and_expiring_ttls_are_answered() {
    if !testkit::require::root_and(&["ip", "ethtool", "python3", "ping", "traceroute"]) {
        return;
    }
    let mut lab = lab();
    let dir = lab.dir.clone();
    std::fs::write(dir.join("echo_server.py"), UDP_ECHO_SERVER).unwrap();
    std::fs::write(dir.join("echo_client.py"), FRAGMENT_CLIENT).unwrap();
    std::fs::write(dir.join("refused.py"), REFUSED_CLIENT).unwrap();
    std::fs::write(dir.join("sink.py"), SINK_SERVER).unwrap();
    std::fs::write(dir.join("upload.py"), UPLOAD).unwrap();
    lab.spawn(
        "s2",
        &format!("exec python3 -u {} 10.1.0.5", dir.join("sink.py").display()),
        &dir.join("s2-sink.log"),
    );
    for (tag, ip) in [("sv", "10.1.0.4"), ("wr", "198.51.100.10")] {
        let cmd = format!(
            "exec python3 -u {} {ip}",
            dir.join("echo_server.py").display()
        );
        lab.spawn(tag, &cmd, &dir.join(format!("{tag}-echo.log")));
    }
    // One worker, then two (AF_PACKET fanout queues: the kernel sends every
    // fragment of a datagram to the same queue, and its worker hands them
    // to the connection's owner).
    for workers in [1, 2] {
        let name = format!("frag{workers}");
        let cfg = format!("[dataplane]\nworkers = {workers}\n{}", config(&lab));
        let (idx, out, log) = lab.pollux(&name, &cfg);
        let api = lab.api(&name);
        let context = || read(&log);
        api.wait_ready(Duration::from_secs(30), context);
        let client = dir.join("echo_client.py");
        let client = client.display();
        let refused = dir.join("refused.py");
        let refused = refused.display();
        let upload = dir.join("upload.py");
        let upload = upload.display();
        for (what, tag, cmd) in [
            (
                "ping VM to VM",
                "cl",
                "ping -c 3 -W 2 -s 4000 10.1.0.4".to_string(),
            ),
            (
                "ping through SNAT",
                "cb",
                "ping -c 3 -W 2 -s 4000 198.51.100.10".to_string(),
            ),
            (
                "UDP through the VIP",
                "cl",
                format!("python3 {client} 10.1.0.20 10.1.0.101 7"),
            ),
            (
                "UDP through SNAT",
                "cb",
                format!("python3 {client} 10.2.0.20 198.51.100.10 7007"),
            ),
            // Fragments that come before their first wait for it in
            // pollux and follow it.
            (
                "UDP through the VIP, its fragments sent last first",
                "cl",
                format!("python3 {client} 10.1.0.20 10.1.0.101 7 reversed"),
            ),
            // The servers' kernels answer a closed port with ICMP port
            // unreachable; translated back through the VIP's and SNAT's
            // NAT, it reaches the client's socket.
            (
                "port unreachable through the VIP",
                "cl",
                format!("python3 {refused} 10.1.0.102 9"),
            ),
            (
                "port unreachable through SNAT",
                "cb",
                format!("python3 {refused} 198.51.100.10 9999"),
            ),
            // s2's port takes 1 400 bytes of IP: a ping of 1 500 that may
            // not be fragmented is answered "fragmentation needed" with
            // that MTU, and a TCP upload through a VIP completes by
            // path-MTU discovery (s2's own link is 1 500: its MSS does
            // not spare the client from learning).
            (
                "fragmentation needed",
                "cl",
                "ping -c 1 -W 2 -M do -s 1472 10.1.0.5 2>&1 | grep -Eq 'mtu ?= ?1400'".to_string(),
            ),
            (
                "path-MTU discovery through a VIP",
                "cl",
                format!("python3 {upload} 10.1.0.103 7100"),
            ),
            // From the wire through a public VIP: the VIP's address
            // answers.
            (
                "path-MTU discovery from the wire through a public VIP",
                "wr",
                format!("python3 {upload} 198.51.100.103 7100"),
            ),
        ] {
            // The servers may take a moment to start: a few tries.
            let ok = wait_for(Duration::from_secs(20), || {
                lab.bash(tag, &cmd).status.success()
            });
            assert!(
                ok,
                "{workers} worker(s), {what}: {cmd} failed\n{}",
                read(&log)
            );
        }
        // A packet whose TTL runs out in pollux is answered from the
        // vnet's gateway, as traceroute sees a router.
        let r = lab.bash("cl", "ping -c 1 -W 2 -t 1 10.1.0.4");
        let text = String::from_utf8_lossy(&r.stdout);
        assert!(
            text.contains("From 10.1.0.1") && text.contains("Time to live exceeded"),
            "{workers} worker(s): {text}\n{}",
            read(&log)
        );
        // traceroute shows pollux as the first hop, VM to VM, to a VIP
        // (TCP probes to its port) and out of the uplink; the last hop
        // answers through pollux (port unreachable or the SYN-ACK).
        for (args, last) in [
            ("10.1.0.4", "10.1.0.4"),
            ("-T -p 7100 10.1.0.103", "10.1.0.103"),
            ("198.51.100.10", "198.51.100.10"),
        ] {
            // Two probes a hop: one answer each is enough (the targets'
            // kernels rate-limit their port unreachables).
            let r = lab.bash("cl", &format!("traceroute -n -q 2 -w 2 -m 4 {args}"));
            let text = String::from_utf8_lossy(&r.stdout);
            let hops: Vec<(String, Vec<String>)> = text
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    let hop = w.next()?.to_string();
                    let addrs = w
                        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                        .map(str::to_string)
                        .collect();
                    Some((hop, addrs))
                })
                .collect();
            let want = [("1", "10.1.0.1"), ("2", last)];
            assert!(
                hops.len() == want.len()
                    && hops.iter().zip(want).all(|((h, a), (wh, wa))| h == wh
                        && a.iter().all(|x| x == wa)
                        && !a.is_empty()),
                "{workers} worker(s): traceroute {args}: {text}{}\n{}\n{}",
                String::from_utf8_lossy(&r.stderr),
                api.get("/v1/counters").unwrap_or_default(),
                read(&log)
            );
        }
        // The client's kernel learnt the path MTU from pollux's errors.
        let r = lab.bash("cl", "ip route get 10.1.0.103");
        let route = String::from_utf8_lossy(&r.stdout);
        assert!(route.contains("mtu 1400"), "{workers} worker(s): {route}");
        // Fragments did cross: none was dropped for want of its first, and
        // those sent before their first waited for it (the counter is
        // published every 100 ms).
        let held = wait_for(Duration::from_secs(20), || {
            let c = api.get("/v1/counters").unwrap();
            worker_sum(&c, |w| w["frags_held"].as_u64()) >= 2
        });
        let c = api.get("/v1/counters").unwrap();
        assert!(held, "{workers} worker(s): no fragment held: {c}");
        let lost = worker_sum(&c, |w| w["drops"]["frag_no_first"].as_u64());
        assert_eq!(lost, 0, "{c}");
        let (st, report) = lab.stop(idx, &out);
        assert!(st.success(), "{report}\n{}", read(&log));
    }
}
