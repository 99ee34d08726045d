//! The lab of the load balancer's Mux tests: a client behind a router
//! namespace whose bridge is the underlay (10.200.0.0/24, the router
//! 10.200.0.254), the Mux's uplink on it (the Mux is 10.200.0.1, and the
//! router sends the VIP there), and more links on the bridge for hosts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::netns::{Lab, sh};

/// The VIP the Mux serves.
pub const VIP: &str = "192.0.2.10";
/// The client's address.
pub const CLIENT: &str = "203.0.113.10";
/// The Mux's address on the underlay.
pub const MUX: &str = "10.200.0.1";

/// A lab with the router (`rt`, with `br0`) and the client (`cl`);
/// returns it with the root-side end of the Mux's uplink.
pub fn lab(prefix: &str) -> (Lab, String) {
    let mut lab = Lab::new(prefix);
    // The router: its eth0 (to the Mux's uplink) in the underlay bridge.
    lab.add(
        "rt",
        "02:00:00:00:fe:01",
        &[
            vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            vec!["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"],
            vec!["ip", "link", "add", "br0", "type", "bridge"],
            vec!["ip", "link", "set", "eth0", "master", "br0"],
            vec!["ip", "addr", "add", "10.200.0.254/24", "dev", "br0"],
            vec!["ip", "link", "set", "br0", "up"],
        ],
    );
    let mux_up = lab.ns("rt").host.clone();
    // The client, on the router's other side; the router sends the VIP to
    // the Mux.
    lab.add(
        "cl",
        "02:00:00:00:cc:10",
        &[
            vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            vec!["ip", "addr", "add", "203.0.113.10/24", "dev", "eth0"],
        ],
    );
    lab.exec(
        "cl",
        &["ip", "route", "add", "default", "via", "203.0.113.1"],
    );
    let cl = lab.ns("cl").host.clone();
    let rt = lab.ns("rt").name.clone();
    sh(&["ip", "link", "set", &cl, "netns", &rt]);
    for cmd in [
        vec!["ip", "addr", "add", "203.0.113.1/24", "dev", &cl],
        vec!["ip", "link", "set", &cl, "up"],
        vec!["ip", "route", "add", &format!("{VIP}/32"), "via", MUX],
    ] {
        lab.exec("rt", &cmd);
    }
    (lab, mux_up)
}

/// Another link on the underlay bridge: a veth whose router end `eth{i}`
/// has `mac` and is in the bridge; returns its root-side end (a host's
/// uplink).
pub fn link(lab: &Lab, i: u8, mac: &str) -> String {
    let mux_up = &lab.ns("rt").host;
    let rt = lab.ns("rt").name.clone();
    let up = format!("{}{i}", &mux_up[..mux_up.len() - 1]);
    let peer = format!("eth{i}");
    sh(&[
        "ip", "link", "add", &up, "type", "veth", "peer", "name", &peer, "netns", &rt,
    ]);
    let _ = std::process::Command::new("sysctl")
        .args(["-qw", &format!("net.ipv6.conf.{up}.disable_ipv6=1")])
        .output();
    sh(&["ip", "link", "set", &up, "up"]);
    for cmd in [
        vec!["ip", "link", "set", &peer, "address", mac],
        vec![
            "ethtool", "-K", &peer, "tso", "off", "gso", "off", "gro", "off",
        ],
        vec!["ip", "link", "set", &peer, "master", "br0"],
        vec!["ip", "link", "set", &peer, "up"],
    ] {
        lab.exec("rt", &cmd);
    }
    up
}

/// The Mux's configuration: uplink `uplink`, `routes` (prefix, via) on
/// the underlay, the VIP (TCP port 80) over `backends` ("ip" at port
/// 8080), probed over HTTP at `probe_path` through the VIP.
pub fn config(
    uplink: &str,
    routes: &[(&str, &str)],
    backends: &[&str],
    probe_path: &str,
) -> String {
    config_n(1, uplink, routes, backends, probe_path)
}

/// Mux `n`'s configuration ([`config`]): address 10.200.0.`n`, MAC
/// 02:50:4c:58:00:0`n`.
pub fn config_n(
    n: u8,
    uplink: &str,
    routes: &[(&str, &str)],
    backends: &[&str],
    probe_path: &str,
) -> String {
    let routes: String = routes
        .iter()
        .map(|(p, via)| format!("[[uplink.route]]\nprefix = \"{p}\"\nvia = \"{via}\"\n"))
        .collect();
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ ip = \"{b}\", port = 8080 }}"))
        .collect();
    format!(
        r#"
[dataplane]
idle_sleep_us = 200

[[port]]
name = "wire"
driver = "af_packet"
iface = "{uplink}"

[uplink]
port = "wire"
mac = "02:50:4c:58:00:0{n}"
address = "10.200.0.{n}/24"
gateway = "10.200.0.254"
{routes}
[[vnet]]
name = "lb"
prefixes = ["10.9.0.0/24"]
gateway_mac = "12:34:56:78:9a:01"

[[vip]]
name = "web"
vnet = "lb"
mode = "mux"
address = "{VIP}"
port = 80
protocol = "tcp"
backends = [ {} ]
[vip.probe]
kind = "http"
port = 80
path = "{probe_path}"
interval_ms = 300
threshold = 2
"#,
        backends.join(", ")
    )
}

/// Packets in capture `pcap` that tcpdump's `filter` matches.
pub fn count(pcap: &std::path::Path, filter: &str) -> usize {
    let out = std::process::Command::new("tcpdump")
        .args(["-nn", "-r", pcap.to_str().unwrap(), filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A DIP: (namespace tag, address/prefix, MAC, gateway).
pub type Dip = (&'static str, &'static str, &'static str, &'static str);

/// A namespace for each DIP, its address on `eth0` and its default route.
pub fn add_dips(lab: &mut Lab, dips: &[Dip]) {
    for (tag, cidr, mac, gw) in dips {
        lab.add_host(tag, cidr, mac, gw);
    }
}

/// A curl loop in a namespace: requests a URL every 50 ms until
/// [`CurlLoop::finish`]; counts successes and failures.
pub struct CurlLoop {
    stop: std::path::PathBuf,
    tally: std::path::PathBuf,
}

impl CurlLoop {
    /// Starts it in namespace `tag`, on `url`.
    pub fn start(lab: &mut Lab, tag: &str, url: &str) -> CurlLoop {
        let stop = lab.dir.join("loop-stop");
        let tally = lab.dir.join("loop");
        let log = lab.dir.join("loop.log");
        lab.spawn(
            tag,
            &format!(
                "ok=0; bad=0; while [ ! -e {stop} ]; do \
                 if curl -sf --max-time 10 -o /dev/null {url}; then ok=$((ok+1)); else bad=$((bad+1)); fi; \
                 sleep 0.05; done; echo \"$ok $bad\" > {t}.tmp && mv {t}.tmp {t}",
                stop = stop.display(),
                t = tally.display()
            ),
            &log,
        );
        CurlLoop { stop, tally }
    }

    /// Stops it; returns (succeeded, failed). The tally is written once,
    /// by a rename, after the last request.
    pub fn finish(self) -> (u64, u64) {
        std::fs::write(&self.stop, "").unwrap();
        assert!(
            super::netns::wait_for(std::time::Duration::from_secs(30), || self.tally.exists()),
            "the curl loop did not finish"
        );
        let t = super::netns::read(&self.tally);
        let (ok, bad) = t.trim().split_once(' ').unwrap();
        (ok.parse().unwrap(), bad.parse().unwrap())
    }
}

/// Starts `n` downloads of `url` in namespace `tag` at `rate` (curl's
/// `--limit-rate`), into `dl<i>` of the lab's directory, each writing its
/// exit status to `dl<i>.rc`.
pub fn downloads(lab: &mut Lab, tag: &str, n: usize, url: &str, rate: &str) {
    let d = lab.dir.display().to_string();
    for i in 0..n {
        let log = lab.dir.join(format!("dl{i}.log"));
        lab.spawn(
            tag,
            &format!(
                "curl -sf --max-time 300 --limit-rate {rate} -o {d}/dl{i} {url}; echo $? > {d}/dl{i}.rc"
            ),
            &log,
        );
    }
}

/// Waits (up to `limit`) for the `n` downloads to end; returns those that
/// failed or differ from `data`: (index, curl's exit status).
pub fn broken_downloads(
    lab: &Lab,
    n: usize,
    data: &[u8],
    limit: std::time::Duration,
) -> Vec<(usize, String)> {
    let dir = &lab.dir;
    let done = super::netns::wait_for(limit, || {
        (0..n).all(|i| dir.join(format!("dl{i}.rc")).exists())
    });
    assert!(done, "downloads did not finish");
    (0..n)
        .filter_map(|i| {
            let rc = super::netns::read(&dir.join(format!("dl{i}.rc")));
            let whole = std::fs::read(dir.join(format!("dl{i}"))).is_ok_and(|d| d == data);
            (rc.trim() != "0" || !whole).then(|| (i, rc.trim().to_string()))
        })
        .collect()
}

/// Host `n`'s configuration: its uplink `uplink` at `address` on the
/// underlay taking IP in IP from `muxes`, a VM for each DIP of `dips`
/// (their vnet 10.`n`.0.0/24) and the VIP in DSR mode over them.
pub fn host_config(
    lab: &Lab,
    n: u8,
    address: &str,
    muxes: &str,
    dips: &[Dip],
    uplink: &str,
    workers: u8,
) -> String {
    let mut ports = String::new();
    let mut vms = String::new();
    let mut backends = Vec::new();
    for (tag, cidr, mac, _) in dips {
        let ip = cidr.split('/').next().unwrap();
        ports.push_str(&format!(
            "[[port]]\nname = \"{tag}\"\ndriver = \"af_packet\"\niface = \"{}\"\n",
            lab.ns(tag).host
        ));
        vms.push_str(&format!(
            "[[vm]]\nname = \"{tag}\"\nport = \"{tag}\"\nvnet = \"t\"\nmac = \"{mac}\"\nips = [\"{ip}\"]\n"
        ));
        backends.push(format!("{{ vm = \"{tag}\", port = 8080 }}"));
    }
    format!(
        r#"
[dataplane]
workers = {workers}
idle_sleep_us = 200

{ports}
[[port]]
name = "wire"
driver = "af_packet"
iface = "{uplink}"

[uplink]
port = "wire"
mac = "02:50:4c:58:00:1{n}"
address = "{address}/24"
gateway = "10.200.0.254"
muxes = [{muxes}]

[[vnet]]
name = "t"
prefixes = ["10.{n}.0.0/24"]
gateway_mac = "12:34:56:78:9a:1{n}"

{vms}
[[vip]]
name = "web"
vnet = "t"
mode = "dsr"
address = "{VIP}"
port = 80
protocol = "tcp"
backends = [ {} ]
"#,
        backends.join(", ")
    )
}
