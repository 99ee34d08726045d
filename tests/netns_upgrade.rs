//! Hitless upgrade against real kernel TCP stacks in network namespaces:
//! `pollux run --takeover` replaces a running pollux (af_packet ports, two
//! workers) again and again while downloads, a curl loop and a 1 ms UDP
//! stream cross it.
//!
//! Topology: vnet a (10.1.0.0/16) has two servers (10.1.0.4, 10.1.0.5),
//! backends of VIP 10.1.0.100:80 (HTTP probes), and a client 10.1.0.20;
//! vnet b (10.2.0.0/16) has a client 10.2.0.20 that reaches a server on
//! the wire (198.51.100.10) through SNAT (198.51.100.50).
//!
//! Shown: 50 rate-limited downloads (30 through the VIP, 20 through SNAT)
//! and a curl loop of new connections to the VIP run across 10 upgrades in
//! a row: every download completes with every byte, no request fails; each
//! successor restored the connections, probe states and counters; the
//! longest silence of the UDP stream around each upgrade is printed. And:
//! a successor whose configuration file is invalid, or has other ports,
//! never touches the running pollux; one killed after it received the
//! state, one killed after it was told to go, and a real pollux killed
//! once it holds the handed-over sockets, leave it forwarding with nothing
//! lost (the downloads under way complete) and serving its control
//! socket, and it says why in `/v1/status`; the SYN-cookie secret goes
//! from one process to the next.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `python3`, `cmp`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, wait_for};
use common::takeover::{download, downloads_intact};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// (tag, address/prefix, MAC, default gateway) of every namespace.
const NODES: [(&str, &str, &str, &str); 5] = [
    ("s1", "10.1.0.4/16", "02:00:00:00:01:04", "10.1.0.1"),
    ("s2", "10.1.0.5/16", "02:00:00:00:01:05", "10.1.0.1"),
    ("cl", "10.1.0.20/16", "02:00:00:00:01:20", "10.1.0.1"),
    ("cb", "10.2.0.20/16", "02:00:00:00:02:20", "10.2.0.1"),
    ("wr", "198.51.100.10/24", "02:00:00:00:03:10", ""),
];

/// pollux's MAC on the wire.
const UPLINK_MAC: &str = "02:50:4c:58:ff:ff";

/// How long the downloads have to end once the upgrades are done.
const DEADLINE: Duration = Duration::from_secs(240);

fn lab(prefix: &str) -> Lab {
    let mut lab = Lab::new(prefix);
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
        // Small receive buffers: a rate-limited download's bytes cross the
        // switch as curl reads them, so there are bytes in flight at every
        // upgrade (the kernel would otherwise take a whole file at once).
        if tag == "cl" || tag == "cb" {
            lab.exec(
                tag,
                &["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 32768 65536"],
            );
        }
    }
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
    lab
}

/// The configuration; `skip` leaves that port (and its VM) out.
///
/// The backends serve rate-limited downloads beside a busy-polling pollux
/// on two cores, so a probe answer can take a few hundred milliseconds:
/// probes allow 500 ms and three misses before a backend goes down, which
/// keeps "both backends up right after a takeover" a check of the handed
/// over states, not of the backends' load.
fn config(lab: &Lab, skip: Option<&str>) -> String {
    let mut c = String::from("[dataplane]\nworkers = 2\nidle_sleep_us = 20\n");
    for (tag, name) in [
        ("s1", "s1"),
        ("s2", "s2"),
        ("cl", "cl"),
        ("cb", "cb"),
        ("wr", "wire"),
    ] {
        if skip == Some(tag) {
            continue;
        }
        c += &format!(
            "[[port]]\nname = \"{name}\"\ndriver = \"af_packet\"\niface = \"{}\"\n",
            lab.ns(tag).host
        );
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

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ {{ vm = "s1", port = 8000 }}, {{ vm = "s2", port = 8000 }} ]
[vip.probe]
kind = "http"
port = 8000
path = "/health"
interval_ms = 500
timeout_ms = 500
threshold = 3

[[vm]]
name = "s1"
port = "s1"
vnet = "a"
mac = "02:00:00:00:01:04"
ips = ["10.1.0.4"]
[[vm]]
name = "s2"
port = "s2"
vnet = "a"
mac = "02:00:00:00:01:05"
ips = ["10.1.0.5"]
[[vm]]
name = "cl"
port = "cl"
vnet = "a"
mac = "02:00:00:00:01:20"
ips = ["10.1.0.20"]
"#,
        NODES[4].2
    );
    if skip != Some("cb") {
        c += r#"[[vm]]
name = "cb"
port = "cb"
vnet = "b"
mac = "02:00:00:00:02:20"
ips = ["10.2.0.20"]
"#;
    }
    c
}

/// Random bytes (a download that mixes data up shows).
fn data(size: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Serves `big` and `health` on port 8000 of each server.
fn servers(lab: &mut Lab, big: &[u8]) {
    let dir = lab.dir.clone();
    for (tag, ip) in [
        ("s1", "10.1.0.4"),
        ("s2", "10.1.0.5"),
        ("wr", "198.51.100.10"),
    ] {
        let root = dir.join(format!("www-{tag}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("big"), big).unwrap();
        std::fs::write(root.join("health"), "ok").unwrap();
        lab.http_server(tag, ip, 8000, &root, &dir.join(format!("{tag}.log")));
    }
}

fn status(api: &common::api::Api) -> Value {
    api.get("/v1/status").unwrap_or(Value::Null)
}

/// Waits for child `idx` to exit by itself; returns its exit status.
fn exited(lab: &mut Lab, idx: usize, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(s) = lab.children[idx].try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Writes a python script into `dir`; returns its path.
fn script(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A UDP receiver: one line `arrival-time sequence` per datagram.
const UDP_SINK: &str = "import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
out = open(sys.argv[3], 'w', buffering=1)
while True:
    d, _ = s.recvfrom(64)
    out.write('%.6f %s\\n' % (time.time(), d.decode()))
";

/// A UDP sender: one datagram a millisecond, numbered, until a file exists.
const UDP_SOURCE: &str = "import socket, sys, time, os
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[1], int(sys.argv[2]))
n = 0
t = time.monotonic()
while not os.path.exists(sys.argv[3]):
    s.sendto(str(n).encode(), dst)
    n += 1
    t += 0.001
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)
";

/// The longest silence of the UDP stream (arrivals in `log`) within each
/// window (start, end) of wall-clock seconds, in ms; and how many
/// datagrams were lost in all.
fn gaps(log: &Path, windows: &[(f64, f64)]) -> (Vec<f64>, u64) {
    let arrivals: Vec<(f64, u64)> = read(log)
        .lines()
        .filter_map(|l| {
            let (t, n) = l.split_once(' ')?;
            Some((t.parse().ok()?, n.parse().ok()?))
        })
        .collect();
    let per = windows
        .iter()
        .map(|&(a, b)| {
            arrivals
                .windows(2)
                .filter(|w| w[1].0 >= a && w[0].0 <= b)
                .map(|w| (w[1].0 - w[0].0) * 1000.0)
                .fold(0.0, f64::max)
        })
        .collect();
    let mut seen: Vec<u64> = arrivals.iter().map(|a| a.1).collect();
    seen.sort_unstable();
    seen.dedup();
    // From the first datagram received (the sender may start first).
    let lost = match (seen.first(), seen.last()) {
        (Some(&a), Some(&b)) => b - a + 1 - seen.len() as u64,
        _ => 0,
    };
    (per, lost)
}

#[test]
fn fifty_downloads_and_a_curl_loop_outlive_ten_upgrades() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3", "cmp"]) {
        return;
    }
    let mut lab = lab("up");
    let dir = lab.dir.clone();
    let big = data(3 << 20);
    servers(&mut lab, &big);
    let (mut idx, _, log0) = lab.pollux("u0", &config(&lab, None));
    let api = lab.api("u0");
    let logs = |n: usize| {
        (0..=n)
            .map(|i| format!("--- u{i} ---\n{}", read(&dir.join(format!("u{i}.log")))))
            .collect::<Vec<_>>()
            .join("\n")
    };
    api.wait_ready(Duration::from_secs(30), || read(&log0));
    api.wait_probes(
        &["10.1.0.4:8000", "10.1.0.5:8000"],
        true,
        Duration::from_secs(30),
        || read(&log0),
    );
    for (tag, url) in [
        ("cl", "http://10.1.0.100/health"),
        ("cb", "http://198.51.100.10:8000/health"),
    ] {
        assert!(
            wait_for(Duration::from_secs(20), || {
                lab.bash(tag, &format!("curl -sf --max-time 2 {url}"))
                    .status
                    .success()
            }),
            "{url} from {tag}\n{}",
            read(&log0)
        );
    }
    // The UDP stream, VM to VM, and the curl loop of new connections.
    let stop = dir.join("stop");
    let udp_log = dir.join("udp.log");
    let sink = script(&dir, "udp-sink.py", UDP_SINK);
    let source = script(&dir, "udp-source.py", UDP_SOURCE);
    lab.spawn(
        "s1",
        &format!("exec python3 {sink} 10.1.0.4 9000 {}", udp_log.display()),
        &dir.join("udp-sink.log"),
    );
    lab.spawn(
        "cl",
        &format!("exec python3 {source} 10.1.0.4 9000 {}", stop.display()),
        &dir.join("udp-source.log"),
    );
    let loop_file = dir.join("loop");
    lab.spawn(
        "cl",
        &format!(
            "ok=0; bad=0; while [ ! -e {stop} ]; do \
             if curl -sf --max-time 10 -o /dev/null http://10.1.0.100/health; then ok=$((ok+1)); else bad=$((bad+1)); fi; \
             sleep 0.05; done; echo \"$ok $bad\" > {f}.tmp && mv {f}.tmp {f}",
            stop = stop.display(),
            f = loop_file.display()
        ),
        &dir.join("loop.log"),
    );
    // 30 downloads through the VIP, 20 through SNAT to the wire: 3 MB at
    // 100 KB/s, about 30 s each, over all the upgrades.
    for i in 0..50 {
        let (tag, url) = if i < 30 {
            ("cl", "http://10.1.0.100/big")
        } else {
            ("cb", "http://198.51.100.10:8000/big")
        };
        download(&mut lab, tag, i, url, "100k");
    }
    // Every download under way, with bytes still to come.
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(30),
        "every download under way",
        |v| {
            let conns: u64 = v["workers"].as_array().map_or(0, |w| {
                w.iter()
                    .map(|w| w["connections"].as_u64().unwrap_or(0))
                    .sum()
            });
            conns >= 50
        },
        || read(&log0),
    );
    let mut windows = Vec::new();
    let mut reports = Vec::new();
    // A port's and the workers' counters (summed).
    let counted = |c: &Value| {
        let workers = |f: &str| {
            c["workers"].as_array().map_or(0, |w| {
                w.iter().map(|w| w[f].as_u64().unwrap_or(0)).sum::<u64>()
            })
        };
        (
            common::api::port(c, "cl", "rx_packets"),
            workers("rx_packets"),
            workers("slow_path"),
        )
    };
    let mut before = counted(&api.get("/v1/counters").unwrap());
    for n in 1..=10 {
        let old_pid = status(&api)["pid"].as_u64().unwrap();
        let start = unix_now();
        let (next, _, _) = lab.pollux_takeover(&format!("u{n}"), "u0", &[]);
        let st = exited(&mut lab, idx, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("upgrade {n}: pid {old_pid} did not exit\n{}", logs(n)));
        assert!(
            st.success(),
            "upgrade {n}: pid {old_pid} exited {st}\n{}",
            logs(n)
        );
        let s = api.wait_for(
            "/v1/status",
            Duration::from_secs(30),
            &format!("upgrade {n}: the successor serves the API"),
            |v| v["takeover"]["from_pid"].as_u64() == Some(old_pid),
            || logs(n),
        );
        windows.push((start, unix_now()));
        assert!(
            read(&dir.join(format!("u{}.log", n - 1))).contains("handed over to pid"),
            "{}",
            logs(n)
        );
        let t = &s["takeover"];
        assert!(t["connections"].as_u64().unwrap() >= 50, "upgrade {n}: {t}");
        assert_eq!(
            t["connections_dropped"].as_u64(),
            Some(0),
            "upgrade {n}: {t}"
        );
        assert_eq!(t["probes"].as_u64(), Some(2), "upgrade {n}: {t}");
        assert_eq!(t["sockets"].as_u64(), Some(10), "upgrade {n}: {t}");
        // Probe states came along: both backends up at once, not after
        // their first probes.
        let p = api.get("/v1/probes").unwrap();
        assert!(
            common::api::probes(&p)
                .iter()
                .all(|(_, up)| *up == Some(true)),
            "upgrade {n}: {p}"
        );
        // Counters carried over, the ports' and the workers': they only
        // grow.
        let now = counted(&api.get("/v1/counters").unwrap());
        assert!(
            now.0 >= before.0 && now.1 >= before.1 && now.2 >= before.2,
            "upgrade {n}: (cl rx_packets, workers' rx_packets, slow_path) {now:?} < {before:?}"
        );
        before = now;
        reports.push(t.clone());
        idx = next;
    }
    downloads_intact(&dir, DEADLINE, 0..50, &big, || logs(10));
    std::fs::write(&stop, "").unwrap();
    // The loop writes its tally once, after its last curl, by a rename:
    // never read half-written.
    assert!(
        wait_for(Duration::from_secs(30), || loop_file.exists()),
        "the curl loop did not finish\n{}",
        read(&dir.join("loop.log"))
    );
    let l = read(&loop_file);
    let (ok, bad) = l.trim().split_once(' ').unwrap_or(("0", "0"));
    assert_eq!(bad, "0", "the curl loop saw failures ({ok} ok)");
    assert!(
        ok.parse::<u64>().unwrap() > 10,
        "the curl loop ran {ok} times"
    );
    let (per, lost) = gaps(&udp_log, &windows);
    for (n, (g, t)) in per.iter().zip(&reports).enumerate() {
        eprintln!(
            "upgrade {}: longest UDP silence {g:.1} ms; blackout {:.1} ms by the successor's count; {} connections",
            n + 1,
            t["blackout_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            t["connections"]
        );
    }
    eprintln!("UDP datagrams lost over all upgrades: {lost}");
    // The stream went on after the last upgrade.
    let last = windows.last().unwrap().1;
    assert!(
        read(&udp_log)
            .lines()
            .filter_map(|l| l.split_once(' ')?.0.parse::<f64>().ok())
            .any(|t| t > last),
        "no UDP datagram after the last upgrade"
    );
    // The last successor reloads the file the first one was started with.
    let pid = lab.children[idx].id().to_string();
    common::netns::sh(&["kill", "-HUP", &pid]);
    api.wait_for(
        "/v1/status",
        Duration::from_secs(30),
        "a SIGHUP reload by the last successor",
        |v| v["reloads"]["applied"].as_u64() == Some(1),
        || logs(10),
    );
    let (st, report) = lab.stop(idx, &dir.join("u10.out"));
    assert!(st.success(), "{report}\n{}", logs(10));
}

#[test]
fn a_successor_that_refuses_or_dies_leaves_the_running_pollux_forwarding() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3", "cmp"]) {
        return;
    }
    let mut lab = lab("uf");
    let dir = lab.dir.clone();
    let big = data(1 << 20);
    servers(&mut lab, &big);
    let (idx, _, log) = lab.pollux("f0", &config(&lab, None));
    let api = lab.api("f0");
    api.wait_ready(Duration::from_secs(30), || read(&log));
    api.wait_probes(
        &["10.1.0.4:8000", "10.1.0.5:8000"],
        true,
        Duration::from_secs(30),
        || read(&log),
    );
    assert!(
        wait_for(Duration::from_secs(20), || {
            lab.bash("cl", "curl -sf --max-time 2 http://10.1.0.100/health")
                .status
                .success()
        }),
        "{}",
        read(&log)
    );
    let pid = status(&api)["pid"].as_u64().unwrap();
    for i in 0..6 {
        let (tag, url) = if i < 4 {
            ("cl", "http://10.1.0.100/big")
        } else {
            ("cb", "http://198.51.100.10:8000/big")
        };
        download(&mut lab, tag, i, url, "60k");
    }
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(30),
        "the downloads under way",
        |v| {
            v["workers"].as_array().map_or(0, |w| {
                w.iter()
                    .map(|w| w["connections"].as_u64().unwrap_or(0))
                    .sum::<u64>()
            }) >= 6
        },
        || read(&log),
    );

    // An invalid file: refused before the running pollux is asked.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        config(&lab, None).replace("workers = 2", "workers = 0\nbogus = 1"),
    )
    .unwrap();
    let (n, _, l1) = lab.pollux_takeover("t1", "f0", &["--config", bad.to_str().unwrap()]);
    let st = exited(&mut lab, n, Duration::from_secs(30)).expect("t1 did not exit");
    assert_eq!(st.code(), Some(2), "{}", read(&l1));
    assert!(read(&l1).contains("bogus"), "{}", read(&l1));
    assert!(
        status(&api)["takeover_failed"].is_null(),
        "{}",
        status(&api)
    );

    // Other ports: refused before the running pollux is asked.
    let other = dir.join("other.toml");
    std::fs::write(
        &other,
        format!(
            "[control]\nsocket = \"{}\"\n{}",
            api.sock.display(),
            config(&lab, Some("cb"))
        ),
    )
    .unwrap();
    let (n, _, l2) = lab.pollux_takeover("t2", "f0", &["--config", other.to_str().unwrap()]);
    let st = exited(&mut lab, n, Duration::from_secs(30)).expect("t2 did not exit");
    assert_eq!(st.code(), Some(2), "{}", read(&l2));
    assert!(read(&l2).contains("ports differ"), "{}", read(&l2));
    let s = status(&api);
    assert!(s["takeover_failed"].is_null(), "{s}");
    assert_eq!(s["pid"].as_u64(), Some(pid));

    // Killed after it received the state: the running pollux goes on.
    let state = dir.join("state.json");
    let dying = script(&dir, "dying.py", common::takeover::DYING_SUCCESSOR);
    let n = lab.spawn_root(
        &format!(
            "exec python3 {dying} {} {}",
            api.sock.display(),
            state.display()
        ),
        &dir.join("dying.log"),
    );
    let st = exited(&mut lab, n, Duration::from_secs(30)).expect("the dying successor lives");
    assert_eq!(st.code(), None, "{}", read(&dir.join("dying.log")));
    let s = api.wait_for(
        "/v1/status",
        Duration::from_secs(30),
        "the dead successor noted",
        |v| {
            v["takeover_failed"]
                .as_str()
                .is_some_and(|f| f.contains("went away"))
        },
        || read(&log),
    );
    assert_eq!(s["pid"].as_u64(), Some(pid));
    // What it received: format 1, the ports' sockets and the connections.
    let sent: Value = serde_json::from_str(&read(&state)).unwrap();
    assert_eq!(sent["format"], 1);
    assert_eq!(sent["ports"].as_array().unwrap().len(), 5);
    let conns: usize = sent["workers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["vnets"].as_array().unwrap())
        .map(|v| v["conns"].as_array().unwrap().len())
        .sum();
    assert!(conns >= 6, "{sent}");

    // Killed after "go": it never started, so the running pollux goes on
    // and serves its control socket again.
    let n = lab.spawn_root(
        &format!(
            "exec python3 {dying} {} {} go",
            api.sock.display(),
            dir.join("state2.json").display()
        ),
        &dir.join("dying2.log"),
    );
    let st = exited(&mut lab, n, Duration::from_secs(30)).expect("the dying successor lives");
    assert_eq!(st.code(), None, "{}", read(&dir.join("dying2.log")));
    // Its second handover failed too, and its control socket answers
    // again.
    assert!(
        wait_for(Duration::from_secs(30), || read(&log)
            .matches("failed, going on")
            .count()
            >= 2),
        "{}",
        read(&log)
    );
    let s = api.wait_for(
        "/v1/status",
        Duration::from_secs(30),
        "the control API served again",
        |v| v["pid"].as_u64() == Some(pid),
        || read(&log),
    );
    assert!(
        s["takeover_failed"]
            .as_str()
            .is_some_and(|f| f.contains("went away")),
        "{s}"
    );

    // A real pollux killed halfway: once it holds its predecessor's
    // sockets (the state has arrived with them), before it has started.
    let failed_before = s["takeover_failed"].as_str().unwrap_or("").to_string();
    let (n, _, l3) = lab.pollux_takeover("t3", "f0", &[]);
    let child = lab.children[n].id();
    let olds = socket_inodes(pid as u32);
    let end = Instant::now() + Duration::from_secs(60);
    while socket_inodes(child).is_disjoint(&olds) {
        assert!(
            Instant::now() < end && lab.children[n].try_wait().unwrap().is_none(),
            "t3 never received the sockets: {}",
            read(&l3)
        );
        std::thread::yield_now();
    }
    lab.children[n].kill().unwrap();
    lab.children[n].wait().unwrap();
    let s = api.wait_for(
        "/v1/status",
        Duration::from_secs(30),
        "the killed successor noted",
        |v| {
            v["pid"].as_u64() == Some(pid)
                && v["takeover_failed"]
                    .as_str()
                    .is_some_and(|f| f != failed_before && f.contains(&child.to_string()))
        },
        || format!("{}\n{}", read(&log), read(&l3)),
    );
    assert!(s["takeover"].is_null(), "{s}");
    // Its handover socket's file, left behind, was removed.
    let left = api.sock.with_extension(format!("takeover{child}"));
    assert!(
        wait_for(Duration::from_secs(10), || !left.exists()),
        "{} left behind",
        left.display()
    );

    // A successor that runs: the SYN-cookie secret goes on to the next
    // one (cookies given out before still check after two upgrades).
    let (n4, out4, l4) = lab.pollux_takeover("t4", "f0", &[]);
    let s = api.wait_for(
        "/v1/status",
        Duration::from_secs(60),
        "t4 running",
        |v| v["pid"].as_u64() == Some(u64::from(lab.children[n4].id())),
        || format!("{}\n{}", read(&log), read(&l4)),
    );
    assert_eq!(s["takeover"]["from_pid"].as_u64(), Some(pid), "{s}");
    assert!(exited(&mut lab, idx, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let n = lab.spawn_root(
        &format!(
            "exec python3 {dying} {} {}",
            api.sock.display(),
            dir.join("state3.json").display()
        ),
        &dir.join("dying3.log"),
    );
    exited(&mut lab, n, Duration::from_secs(30)).expect("the dying successor lives");
    let third: Value = serde_json::from_str(&read(&dir.join("state3.json"))).unwrap();
    assert_eq!(
        third["pid"].as_u64(),
        Some(u64::from(lab.children[n4].id()))
    );
    assert_eq!(third["syn_cookie_key"], sent["syn_cookie_key"]);
    assert!(third["generation"].as_u64() > sent["generation"].as_u64());

    downloads_intact(&dir, DEADLINE, 0..6, &big, || read(&l4));
    let (st, report) = lab.stop(n4, &out4);
    assert!(st.success(), "{report}\n{}", read(&l4));
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

/// The same lab on af_xdp ports (one worker): three upgrades in a row hand
/// over each port's socket, UMEM and XDP program; downloads through the
/// VIP and through SNAT go on intact, and the last pollux leaves no XDP
/// program behind when it stops.
#[test]
fn af_xdp_ports_hand_over_with_their_connections() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3", "cmp"]) {
        return;
    }
    let mut lab = lab("ux");
    for (tag, ..) in NODES {
        // XDP sees no "checksum not ready" mark: senders fill theirs in.
        lab.exec(tag, &["ethtool", "-K", "eth0", "tx", "off"]);
    }
    let big = data(1 << 20);
    servers(&mut lab, &big);
    let cfg = config(&lab, None)
        .replace("workers = 2", "workers = 1")
        .replace("driver = \"af_packet\"", "driver = \"af_xdp\"");
    let (mut idx, mut out, mut log) = lab.pollux("x0", &cfg);
    let api = lab.api("x0");
    api.wait_ready(Duration::from_secs(30), || read(&log));
    api.wait_probes(
        &["10.1.0.4:8000", "10.1.0.5:8000"],
        true,
        Duration::from_secs(30),
        || read(&log),
    );
    for i in 0..4 {
        let (tag, url) = if i < 2 {
            ("cl", "http://10.1.0.100/big")
        } else {
            ("cb", "http://198.51.100.10:8000/big")
        };
        download(&mut lab, tag, i, url, "60k");
    }
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(30),
        "the downloads under way",
        |v| {
            v["workers"].as_array().map_or(0, |w| {
                w.iter()
                    .map(|w| w["connections"].as_u64().unwrap_or(0))
                    .sum::<u64>()
            }) >= 4
        },
        || read(&log),
    );
    for k in 1..=3 {
        let (n, o, l) = lab.pollux_takeover(&format!("x{k}"), "x0", &[]);
        let pid = u64::from(lab.children[n].id());
        let s = api.wait_for(
            "/v1/status",
            Duration::from_secs(60),
            "the successor running",
            |v| v["pid"].as_u64() == Some(pid),
            || format!("{}\n{}", read(&log), read(&l)),
        );
        let t = &s["takeover"];
        // Five ports, each its socket, UMEM and map, program and link.
        assert_eq!(t["sockets"].as_u64(), Some(25), "{s}");
        assert!(t["connections"].as_u64().unwrap() >= 4, "{s}");
        assert!(
            exited(&mut lab, idx, Duration::from_secs(30)).is_some_and(|s| s.success()),
            "{}",
            read(&log)
        );
        (idx, out, log) = (n, o, l);
    }
    downloads_intact(&lab.dir.clone(), DEADLINE, 0..4, &big, || read(&log));
    assert!(
        lab.bash("cl", "curl -sf --max-time 5 http://10.1.0.100/health")
            .status
            .success(),
        "{}",
        read(&log)
    );
    let (st, report) = lab.stop(idx, &out);
    assert!(st.success(), "{report}\n{}", read(&log));
    let links = std::process::Command::new("ip")
        .args(["-d", "link", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&links.stdout);
    for (tag, ..) in NODES {
        let host = &lab.ns(tag).host;
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {host}@")))
            .unwrap_or("");
        assert!(!line.contains("xdp"), "XDP left on {host}: {line}");
    }
}
