//! SNAT that applications can rely on, shown with a NAT-behaviour tester
//! nobody here wrote: coturn's `turnserver` (two addresses, RFC 5780) on
//! the wire, `turnutils_natdiscovery` in VMs behind `pollux run` (two
//! workers, af_packet ports), real kernel UDP and TCP sockets.
//!
//! Topology: vnet a (10.1.0.0/16) leaves through SNAT from 198.51.100.50;
//! VMs va 10.1.0.21 and vb 10.1.0.22. The wire host has 198.51.100.10 and
//! .11 (turnserver on both, ports 3478 and 3479) and a UDP and a TCP
//! "who am I" server that answers with the address and port it saw (the
//! UDP one echoes the datagram too).
//!
//! Shown, with each filtering behaviour in turn:
//! - natdiscovery reports endpoint-independent mapping and the configured
//!   filtering; with endpoint-independent filtering, hairpinning;
//! - a binding idle for 2 minutes is still alive (natdiscovery's lifetime
//!   discovery: the server answers the first socket's mapping after 125 s);
//! - two VMs sending from the same private port leave from distinct public
//!   ports; a 4 000-byte datagram through SNAT comes back intact;
//! - a VM reaches another VM through its public mapping, UDP and TCP
//!   (hairpinning), and the receiver sees the sender's public mapping;
//! - exhausting one VM's ports (64 here) shows the counted drop and the
//!   metrics, and the other VM is unaffected.
//!
//! Needs root and `ip`, `ethtool`, `python3`, `turnserver`,
//! `turnutils_natdiscovery` (Debian's coturn).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, wait_for};
use pollux::ctl::{Endpoint, call};
use std::time::Duration;

const NODES: [(&str, &str, &str); 3] = [
    ("va", "10.1.0.21/16", "02:00:00:00:01:21"),
    ("vb", "10.1.0.22/16", "02:00:00:00:01:22"),
    ("wr", "198.51.100.10/24", "02:00:00:00:03:10"),
];

const PUBLIC: &str = "198.51.100.50";

/// Answers every datagram on argv[1]:9000 with "ip:port\n" of its sender
/// and the datagram itself; every TCP connection on argv[1]:8000 with
/// "ip:port\n" of its peer.
const WHOAMI: &str = "import socket, sys, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], 9000))
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((sys.argv[1], 8000))
t.listen(64)
def tcp():
    while True:
        c, a = t.accept()
        c.sendall(('%s:%d\\n' % a).encode())
        c.close()
threading.Thread(target=tcp, daemon=True).start()
while True:
    d, a = u.recvfrom(65535)
    u.sendto(('%s:%d\\n' % a).encode() + d, a)
";

/// Client helpers: `udp SPORT N` sends N bytes from port SPORT to the wire's
/// who-am-I and prints the public address it was seen from (exit 1 if the
/// echo is not intact); `udp-many FIRST COUNT` sends from COUNT ports and
/// prints how many were answered; `udp-hairpin SPORT FILE [ADDR PORT]`
/// learns its mapping, sends to ADDR:PORT (a hole punched), writes the
/// mapping to FILE, and waits for a datagram, answering it;
/// `udp-to ADDR PORT SPORT` sends to ADDR:PORT from SPORT and prints the
/// answer's source; `tcp-hairpin SPORT FILE` learns its TCP mapping from
/// SPORT, writes it to FILE, listens on the same port and answers one
/// connection with the peer it saw; `tcp-to ADDR PORT` connects and prints
/// what it was told.
const CLIENT: &str = r#"import socket, sys, time
WIRE = "198.51.100.10"
def udp_sock(sport):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    s.settimeout(2)
    return s
def ask(s, data):
    for _ in range(3):
        s.sendto(data, (WIRE, 9000))
        try:
            d, _ = s.recvfrom(65535)
            return d
        except socket.timeout:
            continue
    return None
cmd = sys.argv[1]
if cmd == "udp":
    s = udp_sock(int(sys.argv[2]))
    data = bytes((i * 7) % 251 for i in range(int(sys.argv[3])))
    d = ask(s, data)
    if d is None:
        sys.exit(2)
    seen, _, rest = d.partition(b"\n")
    print(seen.decode())
    sys.exit(0 if rest == data else 1)
elif cmd == "udp-many":
    import select
    first, count = int(sys.argv[2]), int(sys.argv[3])
    socks = [udp_sock(first + i) for i in range(count)]
    answered = set()
    for _ in range(3):
        for s in socks:
            if s not in answered:
                s.sendto(b"x", (WIRE, 9000))
        end = time.time() + 2
        while time.time() < end:
            r, _, _ = select.select(socks, [], [], max(0, end - time.time()))
            for s in r:
                s.recv(100)
                answered.add(s)
    print(len(answered))
elif cmd == "udp-hairpin":
    s = udp_sock(int(sys.argv[2]))
    seen = ask(s, b"hello").partition(b"\n")[0].decode()
    if len(sys.argv) > 5:
        s.sendto(b"open", (sys.argv[4], int(sys.argv[5])))
    open(sys.argv[3], "w").write(seen)
    s.settimeout(60)
    d, a = s.recvfrom(65535)
    s.sendto(b"back:" + d, a)
    print("%s:%d" % a)
elif cmd == "udp-to":
    s = udp_sock(int(sys.argv[4]))
    for _ in range(5):
        s.sendto(b"punch", (sys.argv[2], int(sys.argv[3])))
        try:
            d, a = s.recvfrom(65535)
            print("%s:%d %s" % (a[0], a[1], d.decode()))
            sys.exit(0)
        except socket.timeout:
            continue
    sys.exit(1)
elif cmd == "tcp-hairpin":
    sport = int(sys.argv[2])
    def sock():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", sport))
        return s
    out = sock()
    out.connect((WIRE, 8000))
    seen = out.recv(100).decode().strip()
    l = sock()
    l.listen(1)
    open(sys.argv[3], "w").write(seen)
    l.settimeout(60)
    c, a = l.accept()
    c.sendall(("%s:%d\n" % a).encode())
    c.close()
    print("%s:%d" % a)
elif cmd == "tcp-to":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    print(s.recv(100).decode().strip())
"#;

fn lab() -> Lab {
    let mut lab = Lab::new("snat");
    for (tag, cidr, mac) in NODES {
        lab.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", cidr, "dev", "eth0"],
            ],
        );
        if tag != "wr" {
            lab.exec(tag, &["ip", "route", "add", "default", "via", "10.1.0.1"]);
        }
    }
    // The STUN server's second address (RFC 5780's "other address").
    lab.exec(
        "wr",
        &["ip", "addr", "add", "198.51.100.11/24", "dev", "eth0"],
    );
    lab
}

fn config(lab: &Lab, snat: &str) -> String {
    let mut c = String::from("[dataplane]\nworkers = 2\n");
    for (tag, name) in [("va", "va"), ("vb", "vb"), ("wr", "wire")] {
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
[vnet.snat]
public_ips = ["{PUBLIC}"]
{snat}

[[vm]]
name = "va"
port = "va"
vnet = "a"
mac = "02:00:00:00:01:21"
ips = ["10.1.0.21"]
[[vm]]
name = "vb"
port = "vb"
vnet = "a"
mac = "02:00:00:00:01:22"
ips = ["10.1.0.22"]
"#,
        NODES[2].2
    );
    c
}

/// natdiscovery's verdicts (the lines between its rules of `=`).
fn verdicts(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("NAT with") || l.starts_with("No NAT"))
        .map(str::to_string)
        .collect()
}

fn run(lab: &Lab, tag: &str, cmd: &str) -> (bool, String) {
    let o = lab.bash(tag, cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn snat_behaves_as_rfc_4787_asks_under_coturns_nat_discovery() {
    if !testkit::require::root_and(&[
        "ip",
        "ethtool",
        "python3",
        "turnserver",
        "turnutils_natdiscovery",
    ]) {
        return;
    }
    let mut lab = lab();
    let dir = lab.dir.clone();
    std::fs::write(dir.join("whoami.py"), WHOAMI).unwrap();
    std::fs::write(dir.join("client.py"), CLIENT).unwrap();
    let client = format!("python3 {}", dir.join("client.py").display());
    lab.spawn(
        "wr",
        "exec turnserver -n -z --no-cli --no-tls --no-dtls --log-file stdout \
         -L 198.51.100.10 -L 198.51.100.11 --listening-port 3478 --alt-listening-port 3479",
        &dir.join("turnserver.log"),
    );
    lab.spawn(
        "wr",
        &format!(
            "exec python3 -u {} 198.51.100.10",
            dir.join("whoami.py").display()
        ),
        &dir.join("whoami.log"),
    );
    let listening = |port: &str, proto: &str| {
        wait_for(Duration::from_secs(20), || {
            let (_, out) = run(&lab, "wr", &format!("ss -Hln{proto} 'sport = :{port}'"));
            !out.trim().is_empty()
        })
    };
    assert!(
        listening("3479", "u") && listening("9000", "u") && listening("8000", "t"),
        "servers did not start: {}{}",
        read(&dir.join("turnserver.log")),
        read(&dir.join("whoami.log"))
    );

    // The default: endpoint-independent mapping, address-and-port-dependent
    // filtering.
    let (idx, out, log) = lab.pollux("apdf", &config(&lab, ""));
    let api = lab.api("apdf");
    let context = || format!("pollux: {}\n{}", read(&log), read(&out));
    api.wait_ready(Duration::from_secs(30), context);
    // Binding lifetime, in the background: the server answers the first
    // socket's mapping 125 s after it was last used.
    lab.spawn(
        "va",
        "exec turnutils_natdiscovery -t -T 125 198.51.100.10",
        &dir.join("lifetime.log"),
    );
    let lifetime = lab.children.len() - 1;
    let (_, nd) = run(&lab, "vb", "turnutils_natdiscovery -m -f 198.51.100.10");
    assert_eq!(
        verdicts(&nd),
        [
            "NAT with Endpoint Independent Mapping!",
            "NAT with Address and Port Dependent Filtering!"
        ],
        "{nd}\n{}",
        context()
    );
    // Two VMs, one private port: two public ports. A 4 000-byte datagram
    // (fragmented by the kernel) comes back intact.
    let mut seen = Vec::new();
    for tag in ["va", "vb"] {
        let (ok, s) = run(&lab, tag, &format!("{client} udp 7000 4000"));
        assert!(ok, "{tag}: {s}\n{}", context());
        let s = s.trim().to_string();
        assert!(s.starts_with(&format!("{PUBLIC}:")), "{tag} seen as {s}");
        seen.push(s);
    }
    assert_ne!(seen[0], seen[1], "the same public port for two VMs");
    // And the same private endpoint keeps its public port towards another
    // destination (the second STUN address through natdiscovery above;
    // here the who-am-I server again, from the same port).
    let (_, again) = run(&lab, "va", &format!("{client} udp 7000 10"));
    assert_eq!(again.trim(), seen[0]);
    // Hairpinning under address-and-port-dependent filtering: the hole
    // punching of peer-to-peer applications. va learns its mapping and
    // waits; vb sends to it until va's answer comes back (va's mapping
    // lets vb in once va has sent to vb's mapping, which vb's first
    // datagram told it nothing of: so va first sends to vb's).
    udp_hairpin(&mut lab, &client, &dir, true);
    // The lifetime check ends: a response after 125 s idle.
    let done = wait_for(Duration::from_secs(200), || {
        matches!(lab.children[lifetime].try_wait(), Ok(Some(_)))
    });
    let lt = read(&dir.join("lifetime.log"));
    assert!(done, "lifetime discovery did not end: {lt}");
    assert_eq!(
        lt.matches("UDP reflexive addr").count(),
        2,
        "no answer to the mapping after 2 minutes idle: {lt}\n{}",
        context()
    );
    assert!(!lt.contains("timeout"), "{lt}");
    let (st, _) = lab.stop(idx, &out);
    assert!(st.success());

    // Endpoint-independent filtering: natdiscovery sees hairpinning too,
    // and a VM reaches another's TCP mapping.
    let cfg = config(&lab, "filtering = \"endpoint-independent\"");
    let (idx, out, log) = lab.pollux("eif", &cfg);
    let api = lab.api("eif");
    let context = || format!("pollux: {}\n{}", read(&log), read(&out));
    api.wait_ready(Duration::from_secs(30), context);
    let (_, nd) = run(&lab, "va", "turnutils_natdiscovery -m -f -H 198.51.100.10");
    assert_eq!(
        verdicts(&nd),
        [
            "NAT with Endpoint Independent Mapping!",
            "NAT with Endpoint Independent Filtering!"
        ],
        "{nd}\n{}",
        context()
    );
    assert!(
        nd.contains("Received a request (maybe a successful hairpinning)"),
        "no hairpinning: {nd}\n{}",
        context()
    );
    udp_hairpin(&mut lab, &client, &dir, false);
    tcp_hairpin(&mut lab, &client, &dir);
    let c = api.get("/v1/counters").unwrap();
    let sum = |f: &str| (0..2).map(|w| common::api::worker(&c, w, f)).sum::<u64>();
    assert!(sum("hairpinned") > 0 && sum("snat_inbound") > 0, "{c}");
    let (st, _) = lab.stop(idx, &out);
    assert!(st.success());

    // Address-dependent filtering, and 64 ports per VM: exhaustion.
    let cfg = config(&lab, "filtering = \"address-dependent\"\nports_per_vm = 64");
    let (idx, out, log) = lab.pollux("adf", &cfg);
    let api = lab.api("adf");
    let context = || format!("pollux: {}\n{}", read(&log), read(&out));
    api.wait_ready(Duration::from_secs(30), context);
    let (_, nd) = run(&lab, "vb", "turnutils_natdiscovery -f 198.51.100.10");
    assert_eq!(
        verdicts(&nd),
        ["NAT with Address Dependent Filtering!"],
        "{nd}\n{}",
        context()
    );
    // 64 ports per VM on each worker (each worker has its blocks): 128.
    // 200 private ports spread over both by their hash: 128 answered, the
    // rest counted.
    let (_, n) = run(&lab, "va", &format!("{client} udp-many 20000 200"));
    let answered: u64 = n.trim().parse().unwrap_or(0);
    assert_eq!(answered, 128, "of 200\n{}", context());
    let c = api.wait_for(
        "/v1/counters",
        Duration::from_secs(10),
        "exhaustion counted",
        |c| {
            (0..2)
                .map(|w| {
                    c["workers"][w]["drops"]["snat_port_exhausted"]
                        .as_u64()
                        .unwrap_or(0)
                })
                .sum::<u64>()
                > 0
        },
        context,
    );
    let held: u64 = (0..2)
        .map(|w| common::api::worker(&c, w, "snat_ports_in_use"))
        .sum();
    assert!(
        held >= answered,
        "{held} ports held, {answered} answered: {c}"
    );
    // The other VM is unaffected.
    let (ok, s) = run(&lab, "vb", &format!("{client} udp 7001 100"));
    assert!(ok, "vb after va's exhaustion: {s}\n{}", context());
    let (code, metrics) = call(&Endpoint::Unix(&api.sock), "GET", "/metrics", None).unwrap();
    assert_eq!(code, 200);
    for m in [
        "pollux_drops_total{worker=",
        "reason=\"snat_port_exhausted\"",
        "pollux_snat_ports_in_use{worker=",
    ] {
        assert!(metrics.contains(m), "no {m} in the metrics:\n{metrics}");
    }
    let (st, _) = lab.stop(idx, &out);
    assert!(st.success());
}

/// Runs `cmd` in the background in `tag`, output to `log`; returns the
/// child's index in the lab.
fn background(lab: &mut Lab, tag: &str, cmd: &str, log: &std::path::Path) -> usize {
    lab.spawn(tag, cmd, log)
}

/// Waits (up to a minute) for background child `idx` to end; its output.
fn finish(lab: &mut Lab, idx: usize, log: &std::path::Path) -> (bool, String) {
    let ended = wait_for(Duration::from_secs(60), || {
        matches!(lab.children[idx].try_wait(), Ok(Some(_)))
    });
    let ok = ended
        && lab.children[idx]
            .try_wait()
            .ok()
            .flatten()
            .is_some_and(|s| s.success());
    (ok, read(log))
}

/// Waits for `file` (a helper's mapping) and returns its text.
fn mapping(file: &std::path::Path, context: &str) -> String {
    assert!(
        wait_for(Duration::from_secs(20), || file.exists()
            && !read(file).is_empty()),
        "no mapping learnt: {context}"
    );
    read(file).trim().to_string()
}

/// va learns its UDP mapping and waits for a datagram; vb sends to that
/// mapping and gets va's answer from it: each sees the other's public
/// mapping. With `punch` (address-and-port-dependent filtering), va first
/// sends to vb's mapping, as peer-to-peer applications punch holes.
fn udp_hairpin(lab: &mut Lab, client: &str, dir: &std::path::Path, punch: bool) {
    let file = dir.join("va-udp.txt");
    let log = dir.join("va-udp.log");
    let _ = std::fs::remove_file(&file);
    // vb's mapping (of its port 7100), which va punches towards.
    let (ok, vb_seen) = run(lab, "vb", &format!("{client} udp 7100 10"));
    assert!(ok, "{vb_seen}");
    let vb_seen = vb_seen.trim().to_string();
    let peer = if punch {
        vb_seen.replace(':', " ")
    } else {
        String::new()
    };
    let cmd = format!("exec {client} udp-hairpin 7200 {} {peer}", file.display());
    let va = background(lab, "va", &cmd, &log);
    let va_seen = mapping(&file, &read(&log));
    assert!(va_seen.starts_with(&format!("{PUBLIC}:")), "{va_seen}");
    let (host, port) = va_seen.split_once(':').unwrap();
    let (ok, got) = run(lab, "vb", &format!("{client} udp-to {host} {port} 7100"));
    assert!(ok, "vb did not hear back through va's mapping: {got}");
    assert_eq!(got.trim(), format!("{va_seen} back:punch"), "vb's view");
    let (ok, va_out) = finish(lab, va, &log);
    assert!(ok, "{va_out}");
    assert_eq!(va_out.trim(), vb_seen, "va sees vb's public mapping");
}

/// va learns the TCP mapping of its port 7300 (a connection out to the
/// wire) and listens on that port; vb connects to the mapping and is
/// told who va saw: vb's public mapping (endpoint-independent filtering).
fn tcp_hairpin(lab: &mut Lab, client: &str, dir: &std::path::Path) {
    let file = dir.join("va-tcp.txt");
    let log = dir.join("va-tcp.log");
    let _ = std::fs::remove_file(&file);
    let cmd = format!("exec {client} tcp-hairpin 7300 {}", file.display());
    let va = background(lab, "va", &cmd, &log);
    let va_seen = mapping(&file, &read(&log));
    assert!(va_seen.starts_with(&format!("{PUBLIC}:")), "{va_seen}");
    let (host, port) = va_seen.split_once(':').unwrap();
    let (ok, told) = run(lab, "vb", &format!("{client} tcp-to {host} {port}"));
    assert!(ok, "vb could not connect to va's mapping: {told}");
    let (ok, va_out) = finish(lab, va, &log);
    assert!(ok, "{va_out}");
    assert_eq!(told.trim(), va_out.trim());
    assert!(
        told.trim().starts_with(&format!("{PUBLIC}:")),
        "va saw {told}"
    );
}
