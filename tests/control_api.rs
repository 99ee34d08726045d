//! The control API against a switch running in this process (ring ports,
//! `run::InProcess`), and `pollux run` reloading on SIGHUP.
//!
//! Topology: VM `gen` sends UDP to the VIP 10.1.0.100:5000, which balances
//! over VMs `sink1` and `sink2` (port 6000). Traffic is pktgen's signed
//! frames, so every packet is accounted for by flow and sequence number.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use dataplane::clock::TscClock;
use dataplane::pktgen::{self, Endpoints, Proto, Template, TrafficSpec, TrialConfig};
use dataplane::pool::PoolBuf;
use dataplane::port::ring::RingPort;
use dataplane::{Batch, MacAddr, PacketBuf, Port};
use pollux::config::Config;
use pollux::ctl::{Endpoint, call};
use pollux::run::InProcess;
use serde_json::Value;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn config(dir: &Path) -> String {
    format!(
        r#"[control]
socket = "{sock}"

[[port]]
name = "gen"
driver = "ring"
[[port]]
name = "sink1"
driver = "ring"
[[port]]
name = "sink2"
driver = "ring"

[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16", "fd00:1::/64"]
gateway_mac = "12:34:56:78:9a:bc"

[[vm]]
name = "gen"
port = "gen"
vnet = "a"
mac = "02:00:00:00:00:10"
ips = ["10.1.0.10"]
[[vm]]
name = "sink1"
port = "sink1"
vnet = "a"
mac = "02:00:00:00:00:21"
ips = ["10.1.0.21"]
nsg = "sink"
[[vm]]
name = "sink2"
port = "sink2"
vnet = "a"
mac = "02:00:00:00:00:22"
ips = ["10.1.0.22"]
nsg = "sink"

[[nsg]]
name = "sink"
[[nsg.rule]]
name = "udp-in"
priority = 100
direction = "in"
action = "allow"
protocol = "udp"
src = ["10.1.0.0/16"]
dst_ports = ["6000"]

[[vip]]
name = "load"
vnet = "a"
address = "10.1.0.100"
port = 5000
protocol = "udp"
backends = [{{ vm = "sink1", port = 6000 }}, {{ vm = "sink2", port = 6000 }}]
"#,
        sock = dir.join("ctl.sock").display()
    )
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("pollux-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The in-process switch (stopped on drop) and its API socket.
struct Switch {
    sw: Option<InProcess>,
    sock: PathBuf,
}

/// The far ends of the VMs' ports: gen, and the two sinks.
struct Ends {
    source: RingPort<PoolBuf>,
    sinks: [RingPort<PoolBuf>; 2],
}

impl Switch {
    fn start(dir: &Path) -> (Switch, Ends) {
        let cfg = Config::parse(&config(dir)).unwrap();
        let mut sw = InProcess::start(&cfg).unwrap();
        let source = sw.take_end("gen").unwrap();
        let sinks = [sw.take_end("sink1").unwrap(), sw.take_end("sink2").unwrap()];
        (
            Switch {
                sw: Some(sw),
                sock: dir.join("ctl.sock"),
            },
            Ends { source, sinks },
        )
    }

    fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, text) = call(&Endpoint::Unix(&self.sock), method, path, body).unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    fn generation(&self) -> u64 {
        self.api("GET", "/v1/status", None).1["generation"]
            .as_u64()
            .unwrap()
    }

    fn pool(&self) -> dataplane::pool::Pool {
        self.sw.as_ref().unwrap().pool
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some(sw) = self.sw.take() {
            let _ = sw.stop();
        }
    }
}

fn spec(flows: u32, sport: u16) -> TrafficSpec {
    TrafficSpec {
        src_mac: MacAddr([2, 0, 0, 0, 0, 0x10]),
        dst_mac: MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]),
        src_ip: "10.1.0.10".parse().unwrap(),
        src_ips: 1,
        dst_ip: "10.1.0.100".parse().unwrap(),
        proto: Proto::Udp,
        frame_size: 64,
        flows,
        sport,
        dport: 5000,
    }
}

/// Sends on `gen`, receives from both sinks.
struct ToSinks<'a>(&'a mut RingPort<PoolBuf>, &'a mut [RingPort<PoolBuf>; 2]);

impl Endpoints for ToSinks<'_> {
    type Buf = PoolBuf;
    fn send(&mut self, b: &mut Batch<PoolBuf>) -> usize {
        self.0.tx_burst(b)
    }
    fn recv(&mut self, b: &mut Batch<PoolBuf>) -> usize {
        self.1[0].rx_burst(b) + self.1[1].rx_burst(b)
    }
    fn kick(&mut self) {
        self.0.kick();
    }
}

#[test]
fn changes_under_traffic_lose_no_packet_of_established_flows() {
    let dir = TempDir::new("traffic");
    let (s, ends) = Switch::start(&dir.0);
    let g0 = s.generation();
    let pool = s.pool();
    let sock = s.sock.clone();
    let Ends {
        mut source,
        mut sinks,
    } = ends;
    // 200 flows at 20 kpps for 3 s after a warm-up that establishes them.
    let traffic = std::thread::spawn(move || {
        let clock = TscClock::calibrate(Duration::from_millis(20));
        let tpl = Template::new(&spec(200, 1000)).unwrap();
        let cfg = TrialConfig {
            rate: Some(20_000.0),
            duration: Duration::from_millis(3000),
            warmup: Duration::from_millis(300),
            drain: Duration::from_millis(300),
            burst: 8,
        };
        pktgen::trial(
            &mut ToSinks(&mut source, &mut sinks),
            pool,
            &tpl,
            &clock,
            &cfg,
        )
        .unwrap()
    });
    // While it flows: a rule, a new VIP, a weight change, a vnet replaced
    // by itself, a rule removed; each is a new generation. Each change
    // waits for more traffic into the switch (its port counter), so the
    // changes are spread over the flowing traffic however loaded the
    // machine is.
    let api = |m: &str, p: &str, b: Option<&str>| {
        let (st, t) = call(&Endpoint::Unix(&sock), m, p, b).unwrap();
        (st, serde_json::from_str::<Value>(&t).unwrap())
    };
    let ctl = common::api::Api { sock: sock.clone() };
    let received = || {
        ctl.get("/v1/counters")
            .map_or(0, |v| common::api::port(&v, "gen", "rx_packets"))
    };
    let more_traffic = |than: u64| {
        ctl.wait_for(
            "/v1/counters",
            Duration::from_secs(30),
            "traffic into the switch",
            |v| common::api::port(v, "gen", "rx_packets") >= than,
            String::new,
        );
    };
    // The warm-up's 6 000 packets established the flows.
    more_traffic(6_000);
    let steps: [(&str, &str, Option<&str>); 5] = [
        (
            "PUT",
            "/v1/nsgs/sink/rules/no-ssh",
            Some(
                r#"{"priority":120,"direction":"in","action":"deny","protocol":"tcp","dst_ports":["22"]}"#,
            ),
        ),
        (
            "PUT",
            "/v1/vips/other",
            Some(
                r#"{"vnet":"a","address":"10.1.0.101","port":53,"protocol":"udp","backends":[{"vm":"sink2","port":53}]}"#,
            ),
        ),
        (
            "PUT",
            "/v1/vips/load/backends/sink2",
            Some(r#"{"vm":"sink2","port":6000,"weight":3}"#),
        ),
        (
            "PUT",
            "/v1/vnets/a",
            Some(r#"{"prefixes":["10.1.0.0/16"],"gateway_mac":"12:34:56:78:9a:bc"}"#),
        ),
        ("DELETE", "/v1/nsgs/sink/rules/no-ssh", None),
    ];
    let mut at_last_change = 0;
    for (i, (m, p, b)) in steps.iter().enumerate() {
        more_traffic(received() + 2_000);
        let (st, v) = api(m, p, *b);
        at_last_change = received();
        assert!(st == 200 || st == 201, "{m} {p}: {st} {v}");
        assert_eq!(v["generation"].as_u64(), Some(g0 + 1 + i as u64), "{v}");
    }
    let r = traffic.join().unwrap();
    // Traffic went on after the last change.
    assert!(received() > at_last_change, "{r:?}");
    assert!(r.tx > 50_000, "{r:?}");
    assert_eq!(r.lost(), 0, "packets lost during policy updates: {r:?}");
    assert_eq!((r.rx.duplicates, r.rx.foreign), (0, 0), "{r:?}");
    // The changes are visible.
    let (_, v) = s.api("GET", "/v1/vips/load", None);
    assert_eq!(v["vip"]["backends"][1]["weight"], 3, "{v}");
    // Flows: listed by VIP, then deleted by VM.
    let (st, v) = s.api("GET", "/v1/flows?vip=load&limit=5", None);
    assert_eq!(st, 200, "{v}");
    assert!(v["matched"].as_u64().unwrap() >= 200, "{v}");
    assert_eq!(v["flows"].as_array().unwrap().len(), 5, "{v}");
    // Both directions of VIP connections: to the VIP, and back from a DIP
    // with the VIP restored as the source.
    for f in v["flows"].as_array().unwrap() {
        assert!(
            f["dst"] == "10.1.0.100" || f["nat_src"] == "10.1.0.100:5000",
            "{f}"
        );
        // Each belongs to a tracked UDP connection.
        assert!(
            f["connection"]
                .as_str()
                .is_some_and(|c| c.starts_with("udp")),
            "{f}"
        );
    }
    // Each client flow's counters span the whole run (about 180 packets at
    // 100 pps), not just the time since the last change revalidated it.
    let (_, v) = s.api("GET", "/v1/flows?src=10.1.0.10&proto=udp", None);
    assert_eq!(v["matched"], 200, "{v}");
    for f in v["flows"].as_array().unwrap() {
        assert!(f["packets"].as_u64().unwrap() >= 120, "{f}");
    }
    let (st, v) = s.api("DELETE", "/v1/flows?vm=gen", None);
    assert_eq!(st, 200, "{v}");
    assert!(v["deleted"].as_u64().unwrap() >= 200, "{v}");
    let (_, v) = s.api("GET", "/v1/flows?vm=gen", None);
    assert_eq!(v["matched"], 0, "{v}");
    // Counters and metrics show the traffic: 200 connections through the
    // VIP, split over its two backends, all still tracked.
    let (_, v) = s.api("GET", "/v1/counters", None);
    let per: Vec<&Value> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["vip"] == "load")
        .collect();
    assert_eq!(per.len(), 2, "{v}");
    let total = |k: &str| per.iter().map(|b| b[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(total("new_connections"), 200, "{v}");
    assert_eq!(total("active_connections"), 200, "{v}");
    assert!(
        per.iter()
            .all(|b| b["new_connections"].as_u64().unwrap() > 0),
        "{v}"
    );
    let gen_port = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "gen")
        .unwrap();
    assert!(gen_port["rx_packets"].as_u64().unwrap() >= r.tx, "{v}");
    let (st, text) = call(&Endpoint::Unix(&s.sock), "GET", "/metrics", None).unwrap();
    assert_eq!(st, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let sample = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(c)
                | prometheus_parse::Value::Gauge(c)
                | prometheus_parse::Value::Untyped(c) => c,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {label:?} missing:\n{text}"))
    };
    let rx = sample("pollux_port_rx_packets_total", Some(("port", "gen")));
    assert!(rx >= r.tx as f64, "{rx} < {}:\n{text}", r.tx);
    assert!(sample("pollux_slow_path_packets_total", Some(("worker", "0"))) >= 200.0);
    assert_eq!(sample("pollux_policy_generation", None), (g0 + 5) as f64);
    // Cycle accounting: the traffic's packets in bursts, their cycles
    // split, the slow path's 200 connections among them; a reset starts
    // it afresh.
    let ticks = |k| sample("pollux_worker_ticks_total", Some(("kind", k)));
    assert!(ticks("slow_path") > 0.0 && ticks("pipeline") > 0.0);
    assert!(ticks("io") > 0.0 && ticks("io") < ticks("busy"));
    let (st, p) = s.api("GET", "/v1/perf", None);
    assert_eq!(st, 200, "{p}");
    let w = &p["workers"][0];
    let rx = w["rx_packets"].as_u64().unwrap();
    let in_bursts: u64 = w["rx_bursts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1) * n.as_u64().unwrap())
        .sum();
    assert!(rx >= r.tx && in_bursts <= rx, "{p}");
    assert!(w["slow_path"].as_u64().unwrap() >= 200, "{p}");
    for k in [
        "cycles_per_packet",
        "io_cycles_per_packet",
        "fast_path_cycles",
        "slow_path_cycles",
    ] {
        assert!(w[k].as_f64().unwrap() > 0.0, "{k}: {p}");
    }
    assert!(
        w["cycles_per_packet"].as_f64().unwrap() >= w["io_cycles_per_packet"].as_f64().unwrap(),
        "{p}"
    );
    let (st, p) = s.api("POST", "/v1/perf/reset", None);
    assert_eq!(st, 200, "{p}");
    assert!(p["workers"][0]["rx_packets"].as_u64().unwrap() < rx, "{p}");
    // Rule hits count connections judged: the 200 were admitted before the
    // first change replaced their group (which restarts its counters), and
    // are not judged again after it.
    assert_eq!(
        sample("pollux_rule_hits_total", Some(("rule", "udp-in"))),
        0.0
    );
    assert_eq!(
        sample(
            "pollux_backend_connections_total",
            Some(("backend", "10.1.0.21:6000"))
        ) + sample(
            "pollux_backend_connections_total",
            Some(("backend", "10.1.0.22:6000"))
        ),
        200.0
    );
}

#[test]
fn bad_requests_are_refused_and_leave_the_generation_unchanged() {
    let dir = TempDir::new("bad");
    let (s, _ends) = Switch::start(&dir.0);
    let g = s.generation();
    let cases: [(&str, &str, Option<&str>, u16, &str); 10] = [
        ("PUT", "/v1/vms/x", Some(r#"{"port":"#), 400, "vm \"x\""),
        (
            "PUT",
            "/v1/vms/x",
            Some(r#"{"port":"gen","vnet":"a","mac":"zz","ips":["10.1.0.9"]}"#),
            422,
            "vm \"x\": mac",
        ),
        (
            "PUT",
            "/v1/vms/x",
            Some(r#"{"name":"y","port":"gen","vnet":"a","mac":"02:00:00:00:00:99","ips":[]}"#),
            400,
            "differs",
        ),
        (
            "PUT",
            "/v1/vips/load/backends/ghost",
            Some(r#"{"vm":"ghost","port":6000}"#),
            422,
            "ghost",
        ),
        (
            "PUT",
            "/v1/nsgs/sink/rules/r",
            Some(r#"{"priority":100,"direction":"in","action":"allow"}"#),
            422,
            "priority",
        ),
        (
            "DELETE",
            "/v1/vms/nobody",
            None,
            404,
            "vm \"nobody\" does not exist",
        ),
        ("DELETE", "/v1/vnets/a", None, 422, "vnet"),
        ("GET", "/v1/flows?proto=xyz", None, 400, "proto"),
        ("GET", "/v1/nothing", None, 404, "no such endpoint"),
        (
            "PUT",
            "/v1/vips/v6",
            Some(
                r#"{"vnet":"a","address":"fd00:1::100","port":80,"protocol":"tcp","backends":[{"ip":"fd00:1::5","port":80}],"probe":{"kind":"tcp","port":80}}"#,
            ),
            422,
            "IPv6",
        ),
    ];
    for (m, p, b, want, says) in cases {
        let (st, v) = s.api(m, p, b);
        assert_eq!(st, want, "{m} {p}: {v}");
        let mut text = v["error"].as_str().unwrap_or("").to_string();
        for p in v["problems"].as_array().into_iter().flatten() {
            text += "\n";
            text += p.as_str().unwrap_or("");
        }
        assert!(text.contains(says), "{m} {p}: {v} should say {says:?}");
        assert_eq!(v["generation"].as_u64(), Some(g), "{m} {p}: {v}");
        assert_eq!(s.generation(), g);
    }
    // What cannot change at run time is named.
    let (_, cfg) = s.api("GET", "/v1/config", None);
    let mut c = cfg["config"].clone();
    c["port"][0]["name"] = "renamed".into();
    let (st, v) = s.api("PUT", "/v1/config", Some(&c.to_string()));
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("[[port]]"), "{v}");
    assert_eq!(s.generation(), g);
    let mut c = cfg["config"].clone();
    c["vnet"][0]["snat"] = serde_json::json!({"public_ips": ["203.0.113.10"]});
    let (st, v) = s.api("PUT", "/v1/config", Some(&c.to_string()));
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("[vnet.snat] cannot change"),
        "{v}"
    );
    assert_eq!(s.generation(), g);
    // The same configuration back is a valid change.
    let (st, v) = s.api("PUT", "/v1/config", Some(&cfg["config"].to_string()));
    assert_eq!((st, v["generation"].as_u64()), (200, Some(g + 1)), "{v}");
    // A vnet is added at the end; none is removed (workers keep each
    // vnet's connections and SNAT by its place).
    let (st, v) = s.api(
        "PUT",
        "/v1/vnets/z",
        Some(r#"{"prefixes":["10.9.0.0/16"],"gateway_mac":"12:34:56:78:9a:99"}"#),
    );
    assert!(st == 200 || st == 201, "{st} {v}");
    let g = s.generation();
    let (st, v) = s.api("DELETE", "/v1/vnets/z", None);
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cannot be removed or reordered"),
        "{v}"
    );
    assert_eq!(s.generation(), g);
}

/// Sends one packet of each flow of `tpl` (sequence `seq`) and returns, per
/// flow, the sink (0 or 1) it came out of.
fn round(s: &Switch, e: &mut Ends, tpl: &Template, seq: u64) -> Vec<Option<usize>> {
    let flows = tpl.spec().flows;
    let pool = s.pool();
    for f in 0..flows {
        let mut b = Batch::new();
        let mut buf = pool.alloc().unwrap();
        let room = buf.append(tpl.len()).unwrap();
        assert!(tpl.write(
            room,
            &pktgen::Signature {
                warmup: false,
                flow: f,
                seq,
                tx_ts: 0
            }
        ));
        b.push(buf).unwrap();
        assert_eq!(e.source.tx_burst(&mut b), 1);
    }
    let mut out = vec![None; flows as usize];
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got < flows && std::time::Instant::now() < deadline {
        std::thread::yield_now();
        for (i, sink) in e.sinks.iter_mut().enumerate() {
            let mut b = Batch::new();
            sink.rx_burst(&mut b);
            for p in b.drain() {
                if let Some(sig) = pktgen::find_signature(p.data()) {
                    assert!(
                        out[sig.flow as usize].replace(i).is_none(),
                        "flow {} twice",
                        sig.flow
                    );
                    got += 1;
                }
            }
        }
    }
    assert_eq!(got, flows, "not every flow arrived: {out:?}");
    out
}

#[test]
fn drain_moves_new_flows_away_and_keeps_established_ones() {
    let dir = TempDir::new("drain");
    let (s, mut e) = Switch::start(&dir.0);
    let old = Template::new(&spec(64, 1000)).unwrap();
    let before = round(&s, &mut e, &old, 0);
    let on_sink1: Vec<usize> = (0..64).filter(|&f| before[f] == Some(0)).collect();
    assert!(
        !on_sink1.is_empty() && on_sink1.len() < 64,
        "both sinks get flows: {before:?}"
    );
    let hits = |s: &Switch| {
        let (_, v) = s.api("GET", "/v1/counters", None);
        v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == "udp-in")
            .map(|r| r["hits"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(hits(&s), 64);
    let (st, v) = s.api("POST", "/v1/vips/load/backends/sink1/drain", None);
    assert_eq!(st, 200, "{v}");
    // Established flows stay where they were, sink1 included.
    assert_eq!(round(&s, &mut e, &old, 1), before);
    // A change that leaves the security groups alone keeps their counters;
    // the revalidated flows belong to connections admitted before, which
    // are not judged again (their admission holds), so nothing is added.
    assert_eq!(hits(&s), 64);
    // New flows avoid the drained backend.
    let new = Template::new(&spec(64, 3000)).unwrap();
    assert!(round(&s, &mut e, &new, 0).iter().all(|&x| x == Some(1)));
    let (_, v) = s.api("GET", "/v1/vips/load", None);
    assert_eq!(v["vip"]["backends"][0]["weight"], 0, "{v}");
}

#[test]
fn the_socket_is_private_to_its_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("perm");
    let (s, _ends) = Switch::start(&dir.0);
    let meta = std::fs::metadata(&s.sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), my_uid());
    // A second switch on the same socket is refused instead of taking it over.
    let cfg = Config::parse(&config(&dir.0)).unwrap();
    let e = InProcess::start(&cfg)
        .err()
        .expect("a second server on the socket");
    assert!(
        e.to_string().contains("another process is serving it"),
        "{e:?}"
    );
    // The other-user check: root to become "nobody", with setpriv.
    if !testkit::require::root_and(&["setpriv"]) {
        return;
    }
    // Let "nobody" reach the socket's directory: only the socket's own mode stops it.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_pollux"),
            "ctl",
            "--socket",
        ])
        .arg(&s.sock)
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    // And its owner gets in.
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["ctl", "--socket"])
        .arg(&s.sock)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation"));
}

/// This process's uid, read from /proc (no libc call, no unsafe).
fn my_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap()
}

#[test]
fn sighup_reloads_the_file_validate_then_swap() {
    let dir = TempDir::new("hup");
    let file = dir.0.join("pollux.toml");
    let text = config(&dir.0);
    std::fs::write(&file, &text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["run", "--config"])
        .arg(&file)
        .stderr(std::fs::File::create(dir.0.join("err")).unwrap())
        .stdout(std::fs::File::create(dir.0.join("out")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sock = dir.0.join("ctl.sock");
    let err = dir.0.join("err");
    let ctl = common::api::Api { sock: sock.clone() };
    let log = || std::fs::read_to_string(&err).unwrap_or_default();
    let wait = |why: &str, what: &dyn Fn(&Value) -> bool| {
        ctl.wait_for("/v1/vips/load", Duration::from_secs(60), why, what, log);
    };
    let pid = child.id().to_string();
    let guard = Kill(std::mem::replace(
        &mut child,
        Command::new("true").spawn().unwrap(),
    ));
    wait("pollux serving its API", &|v| v["generation"] == 1);
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    // A broken file is refused; the generation stays.
    std::fs::write(
        &file,
        text.replace("port = 6000 }]", "port = 6000, weight = -1 }]"),
    )
    .unwrap();
    hup();
    // The API counts the refusal and says why; the generation stays.
    let st = ctl.wait_for(
        "/v1/status",
        Duration::from_secs(60),
        "the reload refused",
        |v| v["reloads"]["refused"] == 1,
        log,
    );
    assert_eq!(st["generation"], 1, "{st}");
    assert_eq!(st["reloads"]["applied"], 0, "{st}");
    let why = st["reloads"]["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("refused, generation 1 kept"), "{st}");
    wait("the generation kept", &|v| v["generation"] == 1);
    // A valid one is published.
    std::fs::write(
        &file,
        text.replace(
            "{ vm = \"sink2\", port = 6000 }",
            "{ vm = \"sink2\", port = 6000, weight = 5 }",
        ),
    )
    .unwrap();
    hup();
    wait("the valid file published", &|v| {
        v["generation"] == 2 && v["vip"]["backends"][1]["weight"] == 5
    });
    drop(guard);
}

#[test]
fn probes_added_and_removed_at_run_time() {
    let dir = TempDir::new("probe");
    let (s, mut e) = Switch::start(&dir.0);
    let g = s.generation();
    let (_, vip) = s.api("GET", "/v1/vips/load", None);
    let mut v = vip["vip"].clone();
    v["probe"] = serde_json::json!({"kind": "tcp", "port": 6000, "interval_ms": 200, "timeout_ms": 100, "threshold": 1});
    let (st, r) = s.api("PUT", "/v1/vips/load", Some(&v.to_string()));
    assert_eq!((st, r["generation"].as_u64()), (200, Some(g + 1)), "{r}");
    // The vnet's prober starts probing both backends: nobody answers on the
    // test's ring ends, so they stay down, with the reason.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut probes = Value::Null;
    while std::time::Instant::now() < end {
        probes = s.api("GET", "/v1/probes", None).1["probes"].clone();
        let list = probes.as_array().cloned().unwrap_or_default();
        if list.len() == 2 && list.iter().all(|p| p["probes"].as_u64().unwrap_or(0) >= 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = probes.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 2, "{probes}");
    let mut backends: Vec<String> = list
        .iter()
        .map(|p| p["backend"].as_str().unwrap().to_string())
        .collect();
    backends.sort();
    assert_eq!(backends, ["10.1.0.21:6000", "10.1.0.22:6000"], "{probes}");
    assert!(
        list.iter().all(|p| p["up"] == false && p["vip"] == "load"),
        "{probes}"
    );
    assert!(
        list.iter().all(|p| p["probes"].as_u64().unwrap() >= 2),
        "{probes}"
    );
    // The probes went through the switch to the backends' ports: SYNs from
    // 168.63.129.16 to port 6000.
    for sink in &mut e.sinks {
        let mut b = Batch::new();
        sink.rx_burst(&mut b);
        let syn = b.drain().any(|p| {
            dataplane::parse(p.data(), 0).is_ok_and(|k| {
                k.key.src() == IpAddr::from([168, 63, 129, 16])
                    && k.key.proto == 6
                    && k.key.dst_port == 6000
            })
        });
        assert!(syn, "no probe reached a backend");
    }
    // The probe removed: no probe state, the backends healthy again.
    v.as_object_mut().unwrap().remove("probe");
    let (st, r) = s.api("PUT", "/v1/vips/load", Some(&v.to_string()));
    assert_eq!(st, 200, "{r}");
    // The control loop retires the probes after the change is applied.
    common::api::Api {
        sock: s.sock.clone(),
    }
    .wait_for(
        "/v1/probes",
        Duration::from_secs(30),
        "probes retired",
        |p| p["probes"] == serde_json::json!([]),
        String::new,
    );
    // New flows are balanced over both again.
    let tpl = Template::new(&spec(32, 7000)).unwrap();
    let to = round(&s, &mut e, &tpl, 0);
    assert!(to.contains(&Some(0)) && to.contains(&Some(1)), "{to:?}");
}

/// A client that reuses its port after resetting a connection to a drained
/// backend opens a new connection: it goes to a backend that takes new flows.
#[test]
fn a_reused_port_after_reset_avoids_the_drained_backend() {
    let dir = TempDir::new("reuse");
    let (s, mut e) = Switch::start(&dir.0);
    let rule = r#"{"priority":110,"direction":"in","action":"allow","protocol":"tcp","src":["10.1.0.0/16"],"dst_ports":["6000"]}"#;
    assert_eq!(
        s.api("PUT", "/v1/nsgs/sink/rules/tcp-in", Some(rule)).0,
        201
    );
    let vip = r#"{"vnet":"a","address":"10.1.0.101","port":80,"protocol":"tcp","backends":[{"vm":"sink1","port":6000},{"vm":"sink2","port":6000}]}"#;
    assert_eq!(s.api("PUT", "/v1/vips/web", Some(vip)).0, 201);
    let tpl = Template::new(&TrafficSpec {
        dst_ip: "10.1.0.101".parse().unwrap(),
        dport: 80,
        proto: Proto::TcpSyn,
        frame_size: 76,
        ..spec(1, 1024)
    })
    .unwrap();
    // One frame of flow 0 with TCP flags `flags`, sequence `seq`.
    let send = |e: &mut Ends, flags: u8, seq: u64| {
        let mut buf = s.pool().alloc().unwrap();
        let room = buf.append(tpl.len()).unwrap();
        assert!(tpl.write(
            room,
            &pktgen::Signature {
                warmup: false,
                flow: 0,
                seq,
                tx_ts: 0
            }
        ));
        let f = buf.data_mut();
        let old = u16::from_be_bytes([f[46], f[47]]);
        f[47] = flags;
        let new = u16::from_be_bytes([f[46], f[47]]);
        let c = u16::from_be_bytes([f[50], f[51]]);
        let c = dataplane::wire::checksum::update_word(c, old, new);
        f[50..52].copy_from_slice(&c.to_be_bytes());
        let mut b = Batch::new();
        b.push(buf).unwrap();
        assert_eq!(e.source.tx_burst(&mut b), 1);
    };
    // Where the next frame of the flow comes out (0 or 1), if anywhere.
    let out = |e: &mut Ends| {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < end {
            std::thread::yield_now();
            for (i, sink) in e.sinks.iter_mut().enumerate() {
                let mut b = Batch::new();
                sink.rx_burst(&mut b);
                if b.drain()
                    .any(|p| pktgen::find_signature(p.data()).is_some())
                {
                    return Some(i);
                }
            }
        }
        None
    };
    send(&mut e, 0x02, 0);
    let first = out(&mut e).expect("the SYN went nowhere");
    let name = ["sink1", "sink2"][first];
    assert_eq!(
        s.api("POST", &format!("/v1/vips/web/backends/{name}/drain"), None)
            .0,
        200
    );
    // The connection keeps its backend (a retransmitted SYN too).
    send(&mut e, 0x02, 1);
    assert_eq!(out(&mut e), Some(first));
    // The client resets it, then reuses the port: a new connection.
    send(&mut e, 0x04, 2);
    assert_eq!(out(&mut e), Some(first), "the RST follows the connection");
    send(&mut e, 0x02, 3);
    assert_eq!(
        out(&mut e),
        Some(1 - first),
        "the new connection went to the drained backend"
    );
}
