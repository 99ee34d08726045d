//! `pollux run` as a user runs it, on pcap ports: a capture from a client VM
//! goes through the switch (routing, a UDP VIP with DNAT, anti-spoofing) into
//! captures per backend; SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::api::Api;

fn udp(src_mac: [u8; 6], src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut f, b"hello")
        .unwrap();
    f
}

/// Runs `pollux run` on the configuration at `path` (given a control
/// socket beside it) until `ready` holds on its control API (given the
/// process id too), then stops it with SIGTERM as an operator does; returns
/// its output. Panics, with that output, when `ready` does not hold within
/// a minute.
fn run_until(
    path: &std::path::Path,
    why: &str,
    ready: impl Fn(&Api, u32) -> bool,
) -> std::process::Output {
    let sock = path.with_extension("sock");
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(
        path,
        format!("[control]\nsocket = \"{}\"\n{text}", sock.display()),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["run", "--config", path.to_str().unwrap()])
        // (Its start is an info event, which the tests read.)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let api = Api { sock };
    let end = Instant::now() + Duration::from_secs(60);
    let mut held = false;
    while Instant::now() < end && child.try_wait().unwrap().is_none() {
        if ready(&api, child.id()) {
            held = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    common::netns::terminate(&mut child);
    let out = child.wait_with_output().unwrap();
    assert!(
        held,
        "{why}: not so within a minute (or pollux ended)\nstdout {}\nstderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Counter `field` of port `name` now, 0 until the API answers.
fn port_now(api: &Api, name: &str, field: &str) -> u64 {
    api.get("/v1/counters")
        .map_or(0, |v| common::api::port(&v, name, field))
}

fn read(path: &std::path::Path) -> Vec<Vec<u8>> {
    let mut r = PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

/// Writes the client's capture (26 frames: 5 direct, 20 to the VIP, one
/// spoofed) into `dir` and returns a configuration that switches it.
fn switching_config(dir: &std::path::Path) -> String {
    let client_mac = [2, 0, 0, 0, 0, 0x10];
    let mut frames = Vec::new();
    for i in 0..5 {
        frames.push(udp(
            client_mac,
            [10, 1, 0, 20],
            4000 + i,
            [10, 1, 0, 4],
            8080,
        ));
    }
    for i in 0..20 {
        frames.push(udp(
            client_mac,
            [10, 1, 0, 20],
            5000 + i,
            [10, 1, 0, 53],
            53,
        ));
    }
    frames.push(udp(client_mac, [10, 1, 0, 4], 1, [10, 1, 0, 5], 8080)); // spoofed source
    let mut w = PcapWriter::new(std::fs::File::create(dir.join("in.pcap")).unwrap()).unwrap();
    for (i, f) in frames.iter().enumerate() {
        w.write_packet(&PcapPacket::new(
            Duration::from_micros(i as u64),
            f.len() as u32,
            f,
        ))
        .unwrap();
    }
    drop(w);
    format!(
        r#"
[[port]]
name = "client"
driver = "pcap"
rx_pcap = "{d}/in.pcap"
[[port]]
name = "web1"
driver = "pcap"
tx_pcap = "{d}/web1.pcap"
[[port]]
name = "web2"
driver = "pcap"
tx_pcap = "{d}/web2.pcap"

[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"

[[vm]]
name = "client"
port = "client"
vnet = "a"
mac = "02:00:00:00:00:10"
ips = ["10.1.0.20"]
[[vm]]
name = "web1"
port = "web1"
vnet = "a"
mac = "02:00:00:00:00:01"
ips = ["10.1.0.4"]
[[vm]]
name = "web2"
port = "web2"
vnet = "a"
mac = "02:00:00:00:00:02"
ips = ["10.1.0.5"]

[[vip]]
name = "dns"
vnet = "a"
address = "10.1.0.53"
port = 53
protocol = "udp"
backends = [ {{ vm = "web1", port = 5353 }}, {{ vm = "web2", port = 5353 }} ]
"#,
        d = dir.display()
    )
}

#[test]
fn run_switches_a_capture_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("pollux-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = switching_config(&dir);
    let cfg_path = dir.join("pollux.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    // The capture's 26 frames read, the 25 that are not spoofed written.
    let out = run_until(&cfg_path, "the capture switched", |api, _| {
        port_now(api, "client", "rx_packets") == 26
            && port_now(api, "web1", "tx_packets") + port_now(api, "web2", "tx_packets") == 25
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("stopped: 26 packets received, 25 sent"),
        "{stdout}"
    );
    assert!(stdout.contains("(\"spoofed\", 1)"), "{stdout}");

    let (w1, w2) = (read(&dir.join("web1.pcap")), read(&dir.join("web2.pcap")));
    assert_eq!(w1.len() + w2.len(), 25);
    let key = |f: &[u8]| dataplane::parse(f, 0).unwrap().key;
    // Direct packets keep their destination; the switch rewrote the MACs.
    let direct: Vec<_> = w1.iter().filter(|f| key(f).dst_port == 8080).collect();
    assert_eq!(direct.len(), 5);
    assert_eq!(&direct[0][0..6], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(&direct[0][6..12], &[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
    // VIP packets were DNATed to a backend's address and port 5353, spread over both.
    let via_vip = |v: &[Vec<u8>], ip: &str| {
        v.iter()
            .filter(|f| {
                key(f).dst_port == 5353 && key(f).dst() == ip.parse::<std::net::IpAddr>().unwrap()
            })
            .count()
    };
    let (a, b) = (via_vip(&w1, "10.1.0.4"), via_vip(&w2, "10.1.0.5"));
    assert_eq!(a + b, 20);
    assert!(a > 0 && b > 0, "{a} / {b}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_config(text: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!(
        "pollux-refuse-{}-{}",
        std::process::id(),
        text.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pollux.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn run_refuses_what_it_cannot_do() {
    let out = run_config(
        "[dataplane]\nworkers = 512\n[[port]]\nname = \"cap\"\ndriver = \"pcap\"\ntx_pcap = \"/dev/null\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dataplane: workers = 512, but this machine has "),
        "{err}"
    );
    assert!(
        err.contains("port \"cap\": a pcap port has one queue; with workers = 512 use af_packet or ring ports"),
        "{err}"
    );
    // A missing interface is named, and nothing runs.
    let out = run_config("[[port]]\nname = \"vm1\"\ndriver = \"af_packet\"\niface = \"nosuch0\"\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("port \"vm1\": interface \"nosuch0\" does not exist"),
        "{err}"
    );
}

#[test]
fn run_probes_backends_through_the_switch() {
    let dir = std::env::temp_dir().join(format!("pollux-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        r#"
[[port]]
name = "web1"
driver = "pcap"
tx_pcap = "{d}/web1.pcap"
[[port]]
name = "web2"
driver = "pcap"
tx_pcap = "{d}/web2.pcap"

[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"

[[vm]]
name = "web1"
port = "web1"
vnet = "a"
mac = "02:00:00:00:00:01"
ips = ["10.1.0.4"]
[[vm]]
name = "web2"
port = "web2"
vnet = "a"
mac = "02:00:00:00:00:02"
ips = ["10.1.0.5"]

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ {{ vm = "web1", port = 8080 }}, {{ vm = "web2", port = 8080 }} ]
[vip.probe]
kind = "http"
port = 8081
path = "/health"
interval_ms = 200
timeout_ms = 100
threshold = 2
"#,
        d = dir.display()
    );
    let cfg_path = dir.join("pollux.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    // Three probe SYNs out of each DIP's port, and each probe timed out.
    let out = run_until(&cfg_path, "probes sent and timed out", |api, _| {
        let timed_out = api.get("/v1/probes").is_some_and(|v| {
            let list = v["probes"].as_array().cloned().unwrap_or_default();
            list.len() == 2 && list.iter().all(|p| p["reason"] == "timeout")
        });
        timed_out
            && port_now(api, "web1", "tx_packets") >= 3
            && port_now(api, "web2", "tx_packets") >= 3
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout} stderr {stderr}"
    );
    assert!(stderr.contains("probed_backends=2"), "{stderr}");
    // Nobody answers: both stay down, and the report says why.
    for dip in ["10.1.0.4", "10.1.0.5"] {
        let line = format!("vip \"web\" backend {dip}:8080: down after ");
        assert!(stdout.contains(&line), "{line} not in {stdout}");
    }
    assert!(stdout.contains("(timeout)"), "{stdout}");
    // The probes took the tenant path: SYNs from the probe source to each
    // DIP's probe port, delivered by the switch with the gateway MAC.
    for (file, dip, mac) in [
        ("web1.pcap", [10, 1, 0, 4], 1u8),
        ("web2.pcap", [10, 1, 0, 5], 2),
    ] {
        let frames = read(&dir.join(file));
        let syns: Vec<_> = frames
            .iter()
            .filter(|f| {
                let k = dataplane::parse(f, 0).unwrap().key;
                k.src() == std::net::IpAddr::from([168, 63, 129, 16])
                    && k.dst() == std::net::IpAddr::from(dip)
                    && k.dst_port == 8081
                    && k.proto == 6
            })
            .collect();
        assert!(syns.len() >= 3, "{file}: {} probe packets", syns.len());
        assert_eq!(&syns[0][0..6], &[2, 0, 0, 0, 0, mac]);
        assert_eq!(&syns[0][6..12], &[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kernel_ports_without_privileges_name_the_capability() {
    // As root, drop to `nobody` for the run; as a user, run as is.
    let root = testkit::require::is_root();
    if root && !testkit::require::tool("setpriv") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pollux-nopriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (driver, want) in [
        ("af_packet", "needs CAP_NET_RAW"),
        ("af_xdp", "needs CAP_NET_RAW, CAP_NET_ADMIN and CAP_BPF"),
    ] {
        let path = dir.join(format!("{driver}.toml"));
        std::fs::write(
            &path,
            format!("[[port]]\nname = \"vm1\"\ndriver = \"{driver}\"\niface = \"lo\"\n"),
        )
        .unwrap();
        let args = ["run", "--config", path.to_str().unwrap()];
        let out = if root {
            // A copy `nobody` can reach, wherever the build lives.
            use std::os::unix::fs::PermissionsExt;
            let bin = dir.join("pollux");
            if !bin.exists() {
                std::fs::copy(env!("CARGO_BIN_EXE_pollux"), &bin).unwrap();
            }
            for (p, mode) in [(&dir, 0o755), (&path, 0o644), (&bin, 0o755)] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin)
                .args(args)
                .output()
                .unwrap()
        } else {
            Command::new(env!("CARGO_BIN_EXE_pollux"))
                .args(args)
                .output()
                .unwrap()
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("port \"vm1\": opening") && err.contains(want),
            "{driver}: {err}"
        );
        assert!(err.contains("on \"lo\""), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pollux run` on DPDK ports: `net_null` vdevs (an endless source of
/// zero-filled frames, a sink for transmit), EAL without huge pages or PCI.
/// Every frame is dropped by name (all-zero source MACs belong to no VM);
/// SIGTERM stops it cleanly. Mixed drivers are refused; probes go out
/// through the switch on mbufs.
#[cfg(feature = "dpdk")]
#[test]
fn run_on_dpdk_ports() {
    let eal = format!(
        "[dpdk]\neal_args = [\"--no-huge\", \"--no-pci\", \"-m\", \"256\", \"-l\", \"0\", \"--log-level=error\", \"--file-prefix=pollux-run-{}\"]\n",
        std::process::id()
    );
    let ports = "[[port]]\nname = \"a\"\ndriver = \"dpdk\"\ndevargs = \"net_null0\"\n[[port]]\nname = \"b\"\ndriver = \"dpdk\"\ndevargs = \"net_null1\"\n";
    let net = "[[vnet]]\nname = \"v\"\nprefixes = [\"10.1.0.0/16\"]\ngateway_mac = \"12:34:56:78:9a:bc\"\n[[vm]]\nname = \"x\"\nport = \"a\"\nvnet = \"v\"\nmac = \"02:00:00:00:00:01\"\nips = [\"10.1.0.4\"]\n";
    let dir = std::env::temp_dir().join(format!("pollux-run-dpdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pollux.toml");
    std::fs::write(&path, format!("{eal}{ports}{net}")).unwrap();
    let out = run_until(&path, "frames from both null ports", |api, _| {
        port_now(api, "a", "rx_packets") > 1000 && port_now(api, "b", "rx_packets") > 1000
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let rx = |name: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("port \"{name}\": rx ")))
            .unwrap_or_else(|| panic!("{stdout}"));
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    assert!(rx("a") > 1000 && rx("b") > 1000, "{stdout}");
    assert!(
        stdout.contains("(\"spoofed\", ") && stdout.contains("(\"no_vm\", "),
        "{stdout}"
    );

    // A dpdk port cannot share a worker with a pool-buffer port.
    let mixed = format!("{eal}{ports}[[port]]\nname = \"r\"\ndriver = \"ring\"\n{net}");
    std::fs::write(&path, mixed).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("port \"r\": driver \"ring\" cannot share a worker with dpdk ports"),
        "{err}"
    );

    // Probes over dpdk ports: the prober's internal port carries mbufs; its
    // SYNs reach the DIP's port (a silent net_null sink), which stays down.
    let quiet = ports
        .replace("net_null0", "net_null0,no-rx=1")
        .replace("net_null1", "net_null1,no-rx=1");
    let probed = format!(
        "{eal}{quiet}{net}[[vip]]\nname = \"w\"\nvnet = \"v\"\naddress = \"10.1.0.100\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ {{ vm = \"x\", port = 8080 }} ]\n[vip.probe]\nkind = \"tcp\"\nport = 8080\ninterval_ms = 200\ntimeout_ms = 100\n"
    );
    std::fs::write(&path, probed).unwrap();
    let out = run_until(&path, "probe SYNs out of the DIP's port", |api, _| {
        port_now(api, "a", "tx_packets") >= 3
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("probed_backends=1"), "{stderr}");
    assert!(
        stdout.contains("vip \"w\" backend 10.1.0.4:8080: down after "),
        "{stdout}"
    );
    let tx_a: u64 = stdout
        .lines()
        .find(|l| l.starts_with("port \"a\": rx "))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        tx_a >= 3,
        "probe SYNs did not reach the DIP's port: {stdout}"
    );
    // Two workers: one queue of every port each.
    std::fs::write(
        &path,
        format!("[dataplane]\nworkers = 2\n{eal}{ports}{net}"),
    )
    .unwrap();
    let out = run_until(&path, "frames on both workers", |api, _| {
        api.get("/v1/counters")
            .is_some_and(|v| (0..2).all(|w| common::api::worker(&v, w, "rx_packets") > 1000))
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for w in ["worker0", "worker1"] {
        let got: u64 = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{w}: received ")))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.trim_end_matches(',').parse().ok())
            .unwrap_or(0);
        assert!(got > 1000, "{w} received {got}: {stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // DPDK's runtime directory of the run above.
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/pollux-run-{}", std::process::id()));
}

/// `pollux sriov`: missing interfaces and capabilities are named, also for
/// VF settings on an interface without SR-IOV (a veth). The VF message
/// itself is proven on a real driver in `vm_sriov` (QEMU's igb).
#[test]
fn sriov_names_what_is_missing() {
    let sriov = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pollux"))
            .arg("sriov")
            .args(args)
            .output()
            .unwrap()
    };
    let out = sriov(&["--pf", "nosuchpf0", "--vfs", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interface \"nosuchpf0\" does not exist")
    );
    let out = sriov(&["--pf", "lo", "--vfs", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"lo\" is not an SR-IOV physical function"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sriov(&["--pf", "lo", "--vf", "0", "--spoofchk", "maybe"]);
    assert_eq!(out.status.code(), Some(2), "bad on/off is a usage error");
    // The kernel part: root to create a veth.
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let (a, b) = (
        format!("plxsv{}a", std::process::id() % 100_000),
        format!("plxsv{}b", std::process::id() % 100_000),
    );
    assert!(
        Command::new("ip")
            .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
            .status()
            .unwrap()
            .success()
    );
    let out = sriov(&[
        "--pf",
        &a,
        "--vf",
        "0",
        "--mac",
        "02:00:00:00:00:09",
        "--vlan",
        "100",
        "--spoofchk",
        "on",
        "--trust",
        "off",
    ]);
    let _ = Command::new("ip").args(["link", "del", &a]).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "sriov: \"{a}\" is not an SR-IOV physical function (no /sys/class/net/{a}/device/sriov_numvfs)"
        )),
        "{err}"
    );
}

/// `pollux run` commits its tables' memory when each worker starts (the
/// default), or as the dataplane first writes it with
/// `preallocate_tables = false`: its resident memory once the same capture
/// is switched differs by the tables' size.
#[test]
fn tables_are_committed_when_the_worker_starts_unless_told_otherwise() {
    let resident = |preallocate: bool| -> u64 {
        let dir = std::env::temp_dir().join(format!(
            "pollux-prealloc-{}-{preallocate}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pollux.toml");
        let cfg = format!(
            "[dataplane]\nflow_table_size = 1048576\nconn_table_size = 262144\n\
             preallocate_tables = {preallocate}\n{}",
            switching_config(&dir)
        );
        std::fs::write(&path, cfg).unwrap();
        // Read once the worker has run (the vnet's load balancer made):
        // the capture is switched.
        let kb = std::cell::Cell::new(0);
        run_until(&path, "the capture switched", |api, pid| {
            let switched = port_now(api, "client", "rx_packets") == 26
                && port_now(api, "web1", "tx_packets") + port_now(api, "web2", "tx_packets") == 25;
            if switched {
                kb.set(common::rss_kib(pid).unwrap());
            }
            switched
        });
        let _ = std::fs::remove_dir_all(&dir);
        kb.get()
    };
    let (lazy, committed) = (resident(false), resident(true));
    eprintln!("resident: {committed} kB with the tables committed at start, {lazy} kB without");
    // A million flow entries' slab alone is 192 MiB; the index, the flow
    // logs' data and the connection table add about 100 MiB more (of which
    // the switched capture touched a few pages without committing ahead).
    assert!(
        committed >= lazy + 200 * 1024,
        "resident: {committed} kB with the tables committed at start, {lazy} kB without"
    );
}
