//! Scale-out on BGP and ECMP: three Mux pollux instances announce one VIP
//! to a router running BIRD 2 with multipath, which spreads the client's
//! flows over them; the Muxes agree on each flow's DIP (the same seeded
//! Maglev table) and pick up flows mid-connection, so losing a Mux
//! (SIGKILL), draining one (`pollux ctl drain-mux`) and adding a DIP break
//! no connection. Real kernel routing and TCP stacks in namespaces.
//!
//! Underlay 10.200.0.0/24, a bridge in the router namespace `rt`
//! (10.200.0.254, AS 65000, `fib_multipath_hash_policy=1`: ECMP by the
//! 5-tuple). Mux `i` (1-3) runs in its own namespace `m<i>`, whose
//! kernel holds 10.200.0.1`i` on the link (BIRD's BGP session, AS 65010)
//! while pollux forwards on the same link as 10.200.0.`i` (its own MAC),
//! the next hop BIRD announces. Hosts H1 (10.200.0.21) and H2
//! (10.200.0.22) take IP in IP from the three Muxes for their DIPs
//! (10.1.0.4-6 on H1, 10.2.0.4-5 on H2). The client 203.0.113.10 is on the
//! router's other side.
//!
//! Needs root and `ip`, `ethtool`, `curl`, `python3`, `bird`, `setpriv`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::api::Api;
use common::mux::{self, Dip, VIP};
use common::netns::{Lab, read, wait_for};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The DIPs; d13 joins the VIP while traffic flows.
const DIPS: [Dip; 5] = [
    ("d11", "10.1.0.4/24", "02:00:00:01:00:04", "10.1.0.1"),
    ("d12", "10.1.0.5/24", "02:00:00:01:00:05", "10.1.0.1"),
    ("d13", "10.1.0.6/24", "02:00:00:01:00:06", "10.1.0.1"),
    ("d21", "10.2.0.4/24", "02:00:00:02:00:04", "10.2.0.1"),
    ("d22", "10.2.0.5/24", "02:00:00:02:00:05", "10.2.0.1"),
];

/// The VIP's backends at the start (d13 is added later).
const FIRST: [&str; 4] = ["10.1.0.4", "10.1.0.5", "10.2.0.4", "10.2.0.5"];

/// BGP hold time, seconds.
const HOLD: u64 = 3;

/// Long downloads: this many, of this size, at this rate (bytes/s): each
/// lasts about 40 s, through every event below.
const DOWNLOADS: usize = 50;
const SIZE: usize = 3 << 20;
const RATE: &str = "80k";

fn router_bird(dir: &std::path::Path) -> std::path::PathBuf {
    let mut conf = String::from(
        "router id 10.200.0.254;\n\
         protocol device { }\n\
         protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n",
    );
    for i in 1..=3 {
        conf.push_str(&format!(
            "protocol bgp mux{i} {{ local 10.200.0.254 as 65000; neighbor 10.200.0.1{i} as 65010; \
             hold time {HOLD}; keepalive time 1; connect retry time 1; error wait time 1, 5; \
             ipv4 {{ import all; export none; }}; }}\n"
        ));
    }
    let p = dir.join("rt-bird.conf");
    std::fs::write(&p, conf).unwrap();
    p
}

/// The lab: router, client, the DIPs, the hosts' uplinks (root-side ends)
/// and the three Mux namespaces, their `eth0` in the router's bridge.
fn lab() -> (Lab, [String; 2]) {
    let (mut lab, _) = mux::lab("bg");
    // The VIP is routed by BGP here, not statically.
    lab.exec("rt", &["ip", "route", "del", &format!("{VIP}/32")]);
    lab.exec(
        "rt",
        &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"],
    );
    mux::add_dips(&mut lab, &DIPS);
    let h1 = mux::link(&lab, 1, "02:00:00:00:fe:11");
    let h2 = mux::link(&lab, 2, "02:00:00:00:fe:12");
    let rt = lab.ns("rt").name.clone();
    for i in 1..=3 {
        let tag = format!("m{i}");
        let kernel = format!("10.200.0.1{i}/24");
        lab.add(
            &tag,
            &format!("02:00:00:00:aa:0{i}"),
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", &kernel, "dev", "eth0"],
            ],
        );
        let end = lab.ns(&tag).host.clone();
        common::netns::sh(&["ip", "link", "set", &end, "netns", &rt]);
        for cmd in [
            vec![
                "ethtool", "-K", &end, "tso", "off", "gso", "off", "gro", "off",
            ],
            vec!["ip", "link", "set", &end, "master", "br0"],
            vec!["ip", "link", "set", &end, "up"],
        ] {
            lab.exec("rt", &cmd);
        }
    }
    (lab, [h1, h2])
}

fn mux_config(lab: &Lab, i: u8) -> String {
    let base = mux::config_n(
        i,
        "eth0",
        &[
            ("10.1.0.0/24", "10.200.0.21"),
            ("10.2.0.0/24", "10.200.0.22"),
        ],
        &FIRST,
        "/name",
    );
    format!(
        "{base}
[bgp]
local_as = 65010
hold_time_s = {HOLD}
keepalive_s = 1
stop_wait_ms = 1500
dir = \"{}\"
[[bgp.neighbor]]
address = \"10.200.0.254\"
remote_as = 65000
",
        lab.dir.join(format!("bgp-m{i}")).display()
    )
}

/// The router's next hops for the VIP, sorted.
fn next_hops(lab: &Lab) -> Vec<String> {
    let out = lab.bash("rt", &format!("ip route show {VIP}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut hops: Vec<String> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    hops
}

fn hops(list: &[u8]) -> Vec<String> {
    list.iter().map(|i| format!("10.200.0.{i}")).collect()
}

fn mux_tx(api: &Api) -> u64 {
    api.get("/v1/counters")
        .and_then(|c| {
            c["workers"]
                .as_array()
                .map(|ws| ws.iter().filter_map(|w| w["mux_tx"].as_u64()).sum())
        })
        .unwrap_or(0)
}

fn ctl(api: &Api, args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["ctl", "--socket", api.sock.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The established connections a Mux tracks to the VIP: (client port) ->
/// the tunnel (DIP) its flow leaves by.
fn established(api: &Api) -> BTreeMap<u64, String> {
    let f = api
        .get(&format!("/v1/flows?dst={VIP}&limit=100000"))
        .unwrap();
    f["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["connection"] == "established")
        .filter_map(|x| Some((x["sport"].as_u64()?, x["out_port"].as_str()?.to_string())))
        .collect()
}

/// A Mux's VIP table: digest and each slot's backend.
fn table(api: &Api) -> (String, Vec<String>) {
    let m = api.get("/v1/maglev?slots=1").unwrap();
    let v = &m["vips"][0];
    (
        v["digest"].as_str().unwrap().to_string(),
        v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
    )
}

#[test]
fn three_muxes_behind_bgp_ecmp_lose_no_connection_to_a_kill_a_drain_or_a_new_dip() {
    if !testkit::require::root_and(&["ip", "ethtool", "curl", "python3", "bird", "setpriv", "cmp"])
    {
        return;
    }
    let (mut lab, [h1_up, h2_up]) = lab();
    let dir = lab.dir.clone();
    // Each DIP serves a page naming it and a download.
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 253) as u8).collect();
    for (tag, cidr, _, _) in DIPS {
        let root = dir.join(format!("www-{tag}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("name"), tag).unwrap();
        std::fs::write(root.join("big"), &data).unwrap();
        let ip = cidr.split('/').next().unwrap();
        lab.http_server(tag, ip, 8080, &root, &dir.join(format!("{tag}.log")));
    }
    let conf = router_bird(&dir);
    lab.spawn(
        "rt",
        &format!(
            "exec bird -f -c {} -s {}",
            conf.display(),
            dir.join("rt-bird.ctl").display()
        ),
        &dir.join("rt-bird.log"),
    );
    let muxes = "\"10.200.0.1\", \"10.200.0.2\", \"10.200.0.3\"";
    let h1c = mux::host_config(&lab, 1, "10.200.0.21", muxes, &DIPS[..3], &h1_up, 1);
    let h2c = mux::host_config(&lab, 2, "10.200.0.22", muxes, &DIPS[3..], &h2_up, 1);
    let (_, _, log_h1) = lab.pollux("h1", &h1c);
    let (_, _, log_h2) = lab.pollux("h2", &h2c);
    let mut idx = Vec::new();
    let mut logs_m = Vec::new();
    for i in 1..=3u8 {
        let c = mux_config(&lab, i);
        let tag = format!("m{i}");
        let (k, out, log) = lab.pollux_in(Some(&tag), &tag, &c);
        idx.push((k, out));
        logs_m.push(log);
    }
    let apis: Vec<Api> = (1..=3).map(|i| lab.api(&format!("m{i}"))).collect();
    let (h1, h2) = (lab.api("h1"), lab.api("h2"));
    let logs = || {
        let mut s = String::new();
        for (i, l) in logs_m.iter().enumerate() {
            s += &format!("M{}:\n{}\n", i + 1, read(l));
        }
        s += &format!("H1:\n{}\nH2:\n{}\n", read(&log_h1), read(&log_h2));
        s += &format!("ROUTER BIRD:\n{}\n", read(&dir.join("rt-bird.log")));
        s
    };
    for api in apis.iter().chain([&h1, &h2]) {
        api.wait_ready(Duration::from_secs(30), logs);
    }
    let first: Vec<String> = FIRST.iter().map(|d| format!("{d}:8080")).collect();
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    // Each Mux: DIPs probed up through the VIP, its session established,
    // the VIP announced.
    for api in &apis {
        api.wait_probes(&first, true, Duration::from_secs(30), logs);
        api.wait_for(
            "/v1/bgp",
            Duration::from_secs(30),
            "the session established and the VIP announced",
            |b| {
                b["sessions"][0]["up"] == true
                    && b["announced"] == serde_json::json!(["192.0.2.10/32"])
                    && b["error"].is_null()
            },
            logs,
        );
    }
    // The router: the VIP over three next hops, the Muxes' forwarding
    // addresses.
    assert!(
        wait_for(Duration::from_secs(20), || next_hops(&lab)
            == hops(&[1, 2, 3])),
        "router: {:?}\n{}",
        next_hops(&lab),
        logs()
    );
    // The Muxes agree: one digest.
    let digests: BTreeSet<String> = apis.iter().map(|a| table(a).0).collect();
    assert_eq!(digests.len(), 1, "{digests:?}");
    // What an operator sees.
    let st = ctl(&apis[0], &["status"]);
    for want in [
        "bgp: AS 65010, next hop 10.200.0.1, BIRD pid",
        "neighbour 10.200.0.254 AS 65000: established",
        "announced 192.0.2.10/32",
    ] {
        assert!(st.contains(want), "{want}:\n{st}");
    }
    let metrics = ctl(&apis[0], &["metrics"]);
    for want in [
        "pollux_bgp_session_up{neighbor=\"10.200.0.254\",remote_as=\"65000\"} 1",
        "pollux_bgp_announced{prefix=\"192.0.2.10/32\"} 1",
        "pollux_bgp_draining 0",
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want}:\n{metrics}");
    }

    // A curl loop and long downloads.
    let ok = wait_for(Duration::from_secs(20), || {
        lab.bash("cl", &format!("curl -sf --max-time 2 http://{VIP}/name"))
            .status
            .success()
    });
    assert!(ok, "the VIP from the client\n{}", logs());
    let tx0: Vec<u64> = apis.iter().map(mux_tx).collect();
    let curls = mux::CurlLoop::start(&mut lab, "cl", &format!("http://{VIP}/name"));
    mux::downloads(
        &mut lab,
        "cl",
        DOWNLOADS,
        &format!("http://{VIP}/big"),
        RATE,
    );
    // Flows spread over the three Muxes.
    let spread = wait_for(Duration::from_secs(30), || {
        apis.iter().zip(&tx0).all(|(a, t)| mux_tx(a) > t + 500)
    });
    let tx1: Vec<u64> = apis.iter().map(mux_tx).collect();
    assert!(
        spread,
        "flows not over all three Muxes: {tx0:?} -> {tx1:?}\n{}",
        logs()
    );

    // Mux 1 killed: BIRD dies with it, its sessions close, the router
    // withdraws its next hop.
    let bird1 = apis[0].get("/v1/bgp").unwrap()["pid"].as_u64().unwrap();
    let killed = Instant::now();
    lab.children[idx[0].0].kill().unwrap();
    let _ = lab.children[idx[0].0].wait();
    assert!(
        wait_for(Duration::from_secs(3 * HOLD), || next_hops(&lab)
            == hops(&[2, 3])),
        "router after the kill: {:?}\n{}",
        next_hops(&lab),
        logs()
    );
    let withdrawn_in = killed.elapsed();
    // The sessions closed with the process: well within the hold time.
    assert!(
        withdrawn_in < Duration::from_secs(HOLD),
        "withdrawn {withdrawn_in:?} after the kill"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{bird1}"
        ))
        .exists()),
        "Mux 1's BIRD (pid {bird1}) outlived it"
    );
    // Its flows went on through Muxes 2 and 3.
    let tx2: Vec<u64> = apis[1..].iter().map(mux_tx).collect();
    assert!(
        wait_for(Duration::from_secs(20), || {
            apis[1..].iter().zip(&tx2).all(|(a, t)| mux_tx(a) > t + 300)
        }),
        "Muxes 2 and 3 after the kill\n{}",
        logs()
    );

    // Mux 2 drained: withdrawn, still forwarding what still reaches it.
    let out = ctl(&apis[1], &["drain-mux"]);
    assert!(
        out.contains("draining") && out.contains("withdrawn 192.0.2.10/32 (vip web): draining"),
        "{out}"
    );
    let drained = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || next_hops(&lab) == hops(&[3])),
        "router after the drain: {:?}\n{}",
        next_hops(&lab),
        logs()
    );
    let drained_in = drained.elapsed();
    // Traffic moves to Mux 3; Mux 2 carries next to nothing more.
    let (m2, m3) = (mux_tx(&apis[1]), mux_tx(&apis[2]));
    assert!(
        wait_for(Duration::from_secs(20), || mux_tx(&apis[2]) > m3 + 2000),
        "Mux 3 after the drain\n{}",
        logs()
    );
    let (d2, d3) = (mux_tx(&apis[1]) - m2, mux_tx(&apis[2]) - m3);
    assert!(d2 * 10 < d3, "drained Mux 2 sent {d2}, Mux 3 {d3}");
    let metrics = ctl(&apis[1], &["metrics"]);
    assert!(
        metrics.lines().any(|l| l == "pollux_bgp_draining 1")
            && metrics
                .lines()
                .any(|l| l == "pollux_bgp_announced{prefix=\"192.0.2.10/32\"} 0"),
        "{metrics}"
    );
    let out = ctl(&apis[1], &["undrain-mux"]);
    assert!(out.contains("announced 192.0.2.10/32"), "{out}");
    assert!(
        wait_for(Duration::from_secs(20), || next_hops(&lab) == hops(&[2, 3])),
        "router after the drain ended: {:?}\n{}",
        next_hops(&lab),
        logs()
    );

    // Mux 3's link cut (a machine gone silent: no FIN, no Cease): the
    // router's hold timer takes the next hop away; back, the session comes
    // up again and so does the next hop.
    let cut = Instant::now();
    lab.exec("m3", &["ip", "link", "set", "eth0", "down"]);
    assert!(
        wait_for(Duration::from_secs(5 * HOLD), || next_hops(&lab)
            == hops(&[2])),
        "router after Mux 3 went silent: {:?}\n{}",
        next_hops(&lab),
        logs()
    );
    let silent_in = cut.elapsed();
    lab.exec("m3", &["ip", "link", "set", "eth0", "up"]);
    assert!(
        wait_for(Duration::from_secs(30), || next_hops(&lab) == hops(&[2, 3])),
        "router after Mux 3 came back: {:?}\n{}",
        next_hops(&lab),
        logs()
    );
    let m3 = mux_tx(&apis[2]);
    assert!(
        wait_for(Duration::from_secs(20), || mux_tx(&apis[2]) > m3 + 300),
        "Mux 3 carries no traffic again\n{}",
        logs()
    );

    // A DIP added while traffic flows: no established connection changes
    // DIP, and about 1/5 of new flows move (to it).
    let live = &apis[1..];
    let before: Vec<_> = live.iter().map(established).collect();
    let (digest4, slots4) = table(&live[0]);
    for a in live {
        let (code, body) = a.send(
            "PUT",
            "/v1/vips/web/backends/10.1.0.6:8080",
            Some(r#"{"ip": "10.1.0.6", "port": 8080}"#),
        );
        assert!(code == 201 || code == 200, "{code} {body}");
    }
    for a in live {
        a.wait_probes(&["10.1.0.6:8080"], true, Duration::from_secs(30), logs);
        a.wait_for(
            "/v1/maglev",
            Duration::from_secs(10),
            "five DIPs in the table",
            |m| m["vips"][0]["in_table"] == 5,
            logs,
        );
    }
    let (digest5, slots5) = table(&live[0]);
    assert_eq!(table(&live[1]).0, digest5, "Muxes 2 and 3 disagree");
    assert_ne!(digest4, digest5);
    let moved = slots4.iter().zip(&slots5).filter(|(a, b)| a != b).count();
    let to_new = slots5.iter().filter(|s| *s == "10.1.0.6:8080").count();
    let frac = moved as f64 / slots5.len() as f64;
    assert!(
        (0.17..0.30).contains(&frac),
        "{moved} of {} slots moved ({frac:.3})",
        slots5.len()
    );
    let after: Vec<_> = live.iter().map(established).collect();
    let (mut compared, mut changed) = (0, 0);
    for (b, a) in before.iter().zip(&after) {
        for (port, dip) in b {
            if let Some(now) = a.get(port) {
                compared += 1;
                if now != dip {
                    changed += 1;
                }
            }
        }
    }
    assert!(compared >= 10, "only {compared} connections to compare");
    assert_eq!(
        changed, 0,
        "{changed} of {compared} established connections changed DIP"
    );
    // New connections reach the new DIP.
    let mut seen = BTreeMap::new();
    for _ in 0..50 {
        let out = lab.bash("cl", &format!("curl -sf --max-time 5 http://{VIP}/name"));
        assert!(out.status.success(), "{out:?}\n{}", logs());
        *seen
            .entry(String::from_utf8_lossy(&out.stdout).to_string())
            .or_insert(0u32) += 1;
    }
    assert!(seen.contains_key("d13"), "{seen:?}");

    // Every download whole, the curl loop without a failure.
    let broken = mux::broken_downloads(&lab, DOWNLOADS, &data, Duration::from_secs(240));
    assert!(broken.is_empty(), "broken downloads {broken:?}\n{}", logs());
    let (ok, bad) = curls.finish();
    assert_eq!(bad, 0, "the curl loop saw failures ({ok} ok)");

    // Mux 2 upgraded in place (`pollux run --takeover`): its BIRD ends
    // with the predecessor, the successor starts its own once the
    // predecessor is gone, and the router takes the Mux back; Mux 3
    // serves meanwhile.
    let upgraded = Instant::now();
    let (_, _, log_up) = lab.pollux_takeover_in(Some("m2"), "m2up", "m2", &[]);
    let _ = lab.children[idx[1].0].wait();
    let api2 = &apis[1];
    api2.wait_for(
        "/v1/bgp",
        Duration::from_secs(30),
        "the successor's session established and the VIP announced",
        |b| {
            b["sessions"][0]["up"] == true
                && b["announced"] == serde_json::json!(["192.0.2.10/32"])
                && b["starts"] == 1
        },
        || format!("{}\nSUCCESSOR:\n{}", logs(), read(&log_up)),
    );
    assert!(
        wait_for(Duration::from_secs(20), || next_hops(&lab) == hops(&[2, 3])),
        "router after Mux 2's upgrade: {:?}\n{}",
        next_hops(&lab),
        read(&log_up)
    );
    let back_in = upgraded.elapsed();
    for _ in 0..10 {
        let out = lab.bash("cl", &format!("curl -sf --max-time 5 http://{VIP}/name"));
        assert!(out.status.success(), "{out:?}\n{}", read(&log_up));
    }

    // Mux 3 stopped as an operator does: it withdraws first, while it
    // still runs (forwarding for `stop_wait_ms`), then stops.
    common::netns::terminate(&mut lab.children[idx[2].0]);
    assert!(
        wait_for(Duration::from_secs(10), || next_hops(&lab) == hops(&[2])),
        "router after SIGTERM to Mux 3: {:?}\n{}",
        next_hops(&lab),
        logs()
    );
    assert!(
        matches!(lab.children[idx[2].0].try_wait(), Ok(None)),
        "Mux 3 ended before the router withdrew it\n{}",
        logs()
    );
    let status = lab.children[idx[2].0].wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", logs());
    let log3 = read(&logs_m[2]);
    assert!(log3.contains("withdrew 192.0.2.10/32 (stopping)"), "{log3}");
    eprintln!(
        "bgp: flows over 3 Muxes {tx0:?} -> {tx1:?} (mux_tx); SIGKILL of Mux 1 withdrawn at the router in {:.0} ms; Mux 3 silent withdrawn in {:.0} ms (hold time {HOLD} s); drain withdrawn in {:.0} ms; Mux 2 upgraded and back at the router in {:.0} ms; DIP added: {moved} of {} slots moved ({:.1}%, {to_new} to the new DIP), {changed} of {compared} established connections changed DIP; {DOWNLOADS} downloads whole, curl loop {ok} ok 0 failed; new connections {seen:?}",
        withdrawn_in.as_secs_f64() * 1000.0,
        silent_in.as_secs_f64() * 1000.0,
        drained_in.as_secs_f64() * 1000.0,
        back_in.as_secs_f64() * 1000.0,
        slots5.len(),
        frac * 100.0,
    );
}
