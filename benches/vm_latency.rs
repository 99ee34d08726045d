//! VM-to-VM latency and throughput between two real QEMU guests
//! (testkit::guest), in one run, through three switches:
//!
//! - a Linux bridge with a tap device per guest (QEMU's own virtio-net
//!   backend: the kernel path a VM has without a user-space switch);
//! - pollux on vhost-user (`net_vhost` client ports, one worker);
//! - OVS-DPDK (Debian's `openvswitch-switch-dpdk`) on vhost-user
//!   (`dpdkvhostuserclient` ports, one PMD thread, the NORMAL action: plain
//!   L2 forwarding).
//!
//! Each guest has one virtual CPU; both QEMUs run on host CPU 0, the
//! switch's polling thread on CPU 1 (pollux and OVS alike: pure polling).
//! OVS needs huge pages for its mbufs (512 MiB of 2 MiB pages); pollux
//! runs on ordinary memory.
//! Measured by Debian's `sockperf` (UDP ping-pong, one 64-byte message in
//! flight, round trips in microseconds: p50, p99, p99.9) and `iperf3` (one
//! TCP stream), both copied into the guests' image. It prints a Markdown
//! table naming the accelerator the guests ran on: under TCG (software
//! emulation) the guests' own CPU time dominates every figure.
//!
//! Run by `benches/vm_latency.sh [SECONDS]` (root; installs nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::guest::{Guest, Nic, Spec, accel};

const TOOLS: [&str; 2] = ["sockperf", "iperf3"];
const A: (&str, &str, &str) = ("vma", "02:00:00:00:00:0a", "10.1.0.10");
const B: (&str, &str, &str) = ("vmb", "02:00:00:00:00:0b", "10.1.0.11");

struct Figures {
    p50: f64,
    p99: f64,
    p999: f64,
    mbits: f64,
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

fn guest(dir: &Path, who: (&str, &str, &str), nic: Nic, netns: Option<&str>) -> Guest {
    let mut spec = Spec::new(who.0)
        .memory(256)
        .host_cpus("0")
        .tools(&TOOLS)
        .nic(nic);
    if let Some(ns) = netns {
        spec = spec.netns(ns);
    }
    Guest::start(dir, spec).unwrap_or_else(|e| panic!("{e}"))
}

fn nic(dir: &Path, who: (&str, &str, &str)) -> Nic {
    Nic::new(
        dir.join(format!("{}.vu", who.0)),
        who.1,
        &format!("{}/16", who.2),
    )
}

/// The `percentile P = X` figure of sockperf's output.
fn percentile(out: &str, p: &str) -> f64 {
    out.lines()
        .find(|l| l.contains(&format!("percentile {p} =")))
        .and_then(|l| l.rsplit('=').next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or_else(|| panic!("no percentile {p} in:\n{out}"))
}

/// Runs both measurements between two booted guests.
fn measure(a: &mut Guest, b: &mut Guest, secs: u64) -> Figures {
    let t = Duration::from_secs(30);
    for g in [&mut *a, &mut *b] {
        g.wait_ready(Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    b.ok(
        &format!(
            "sockperf server -i {} -p 11111 >/tmp/sockperf.log 2>&1 & iperf3 -s -D",
            B.2
        ),
        t,
    )
    .unwrap();
    // The first packets pay for ARP and for the switch's first look.
    a.ok(&format!("ping -c 3 -W 5 {}", B.2), t).unwrap();
    let limit = Duration::from_secs(secs + 60);
    let lat = a
        .ok(
            &format!(
                "sockperf ping-pong -i {} -p 11111 -t {secs} -m 64 --full-rtt",
                B.2
            ),
            limit,
        )
        .unwrap();
    let tput = a
        .ok(&format!("iperf3 -c {} -t {secs} -f m", B.2), limit)
        .unwrap();
    let mbits = tput
        .lines()
        .find(|l| l.contains("receiver"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "Mbits/sec")?;
            w.get(at - 1)?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no receiver rate in:\n{tput}"));
    Figures {
        p50: percentile(&lat, "50.000"),
        p99: percentile(&lat, "99.000"),
        p999: percentile(&lat, "99.900"),
        mbits,
    }
}

fn bridge(dir: &Path, secs: u64) -> Figures {
    let ns = format!("pxlat{}", std::process::id());
    let _ = Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", &ns]);
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ns = Ns(ns.clone());
    let x = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        sh(&all);
    };
    x(&["ip", "link", "add", "br0", "type", "bridge"]);
    for t in ["tapa", "tapb"] {
        x(&["ip", "tuntap", "add", "dev", t, "mode", "tap"]);
        x(&["ip", "link", "set", t, "master", "br0"]);
        x(&["ip", "link", "set", t, "up"]);
    }
    x(&["ip", "link", "set", "br0", "up"]);
    let mut a = guest(dir, A, nic(dir, A).tap("tapa"), Some(&ns));
    let mut b = guest(dir, B, nic(dir, B).tap("tapb"), Some(&ns));
    measure(&mut a, &mut b, secs)
}

fn pollux(dir: &Path, secs: u64) -> Figures {
    let mut a = guest(dir, A, nic(dir, A), None);
    let mut b = guest(dir, B, nic(dir, B), None);
    let prefix = format!("pxlat{}", std::process::id());
    let mut cfg = format!(
        "[dpdk]\neal_args = [\"--no-huge\", \"--no-pci\", \"-m\", \"512\", \"-l\", \"1\", \"--log-level=error\", \"--file-prefix={prefix}\"]\n"
    );
    for (i, v) in [A, B].iter().enumerate() {
        cfg += &format!(
            "[[port]]\nname = \"{0}\"\ndriver = \"dpdk\"\ndevargs = \"net_vhost{i},iface={1},client=1\"\n[[vm]]\nname = \"{0}\"\nport = \"{0}\"\nvnet = \"a\"\nmac = \"{2}\"\nips = [\"{3}\"]\n",
            v.0,
            dir.join(format!("{}.vu", v.0)).display(),
            v.1,
            v.2
        );
    }
    cfg += "[[vnet]]\nname = \"a\"\nprefixes = [\"10.1.0.0/16\"]\ngateway_mac = \"12:34:56:78:9a:bc\"\n";
    let path = dir.join("pollux.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut sw = Killed(
        Command::new(env!("CARGO_BIN_EXE_pollux"))
            .args(["run", "--config", path.to_str().unwrap()])
            .stdout(std::fs::File::create(dir.join("pollux.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("pollux.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let f = measure(&mut a, &mut b, secs);
    let _ = Command::new("kill")
        .args(["-TERM", &sw.0.id().to_string()])
        .status();
    let _ = sw.0.wait();
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    f
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ovs(dir: &Path, secs: u64) -> Figures {
    let mut a = guest(dir, A, nic(dir, A), None);
    let mut b = guest(dir, B, nic(dir, B), None);
    // A private instance: its own database, run, log and config dirs.
    let d = dir.join("ovs");
    std::fs::create_dir_all(&d).unwrap();
    let envs: Vec<(&str, PathBuf)> = ["OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR", "OVS_SYSCONFDIR"]
        .iter()
        .map(|k| (*k, d.clone()))
        .collect();
    let db = d.join("conf.db");
    let sock = format!("unix:{}", d.join("db.sock").display());
    sh(&[
        "ovsdb-tool",
        "create",
        db.to_str().unwrap(),
        "/usr/share/openvswitch/vswitch.ovsschema",
    ]);
    let log = |n: &str| std::fs::File::create(d.join(n)).unwrap();
    let _db = Killed(
        Command::new("ovsdb-server")
            .arg(&db)
            .arg(format!("--remote=p{sock}"))
            .arg(format!("--unixctl={}", d.join("ovsdb.ctl").display()))
            .envs(envs.clone())
            .stdout(log("ovsdb.out"))
            .stderr(log("ovsdb.err"))
            .spawn()
            .unwrap(),
    );
    let vsctl = |args: &[&str]| {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let st = Command::new("ovs-vsctl")
                .arg(format!("--db={sock}"))
                .args(args)
                .envs(envs.clone())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if st.success() {
                return;
            }
            assert!(Instant::now() < end, "ovs-vsctl {args:?} failed");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let prefix = format!("ovsb{}", std::process::id());
    vsctl(&["--no-wait", "init"]);
    vsctl(&[
        "--no-wait",
        "set",
        "Open_vSwitch",
        ".",
        "other_config:dpdk-init=true",
        // OVS runs its EAL --in-memory, which needs huge pages (512 MiB of
        // the 1 GiB scripts/test.sh reserves); pollux runs without.
        &format!("other_config:dpdk-extra=--no-pci --file-prefix={prefix}"),
        "other_config:dpdk-socket-mem=512",
        "other_config:dpdk-socket-limit=512",
        "other_config:dpdk-lcore-mask=0x2",
        "other_config:pmd-cpu-mask=0x2",
    ]);
    let _vswitchd = Killed(
        Command::new("/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk")
            .arg(&sock)
            .arg(format!("--unixctl={}", d.join("vswitchd.ctl").display()))
            .envs(envs.clone())
            .stdout(log("vswitchd.out"))
            .stderr(log("vswitchd.err"))
            .spawn()
            .unwrap(),
    );
    vsctl(&[
        "add-br",
        "br0",
        "--",
        "set",
        "bridge",
        "br0",
        "datapath_type=netdev",
    ]);
    for v in [A, B] {
        let path = dir.join(format!("{}.vu", v.0));
        vsctl(&[
            "add-port",
            "br0",
            v.0,
            "--",
            "set",
            "Interface",
            v.0,
            "type=dpdkvhostuserclient",
            &format!("options:vhost-server-path={}", path.display()),
        ]);
    }
    let f = measure(&mut a, &mut b, secs);
    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    f
}

fn main() {
    // `cargo bench` passes `--bench`; the seconds are the one number given.
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = PathBuf::from(format!("/tmp/pxlat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (acc, why) = accel();
    eprintln!("guests run on {acc}: {why}");
    let rows = [
        ("Linux bridge, tap (kernel path)", bridge(&dir, secs)),
        ("pollux, vhost-user", pollux(&dir, secs)),
        ("OVS-DPDK 3.1, vhost-user, NORMAL", ovs(&dir, secs)),
    ];
    println!(
        "Guests on {acc} ({why}); {secs} s per measurement; QEMUs on CPU 0, the switch on CPU 1."
    );
    if acc == testkit::guest::Accel::Tcg {
        println!(
            "Under TCG the guests' emulated CPUs (their virtio drivers, TCP stacks, sockperf) dominate every figure: it compares what each path costs the guests, not the switches' own latency."
        );
    }
    println!();
    println!("| path | UDP RTT p50 (us) | p99 (us) | p99.9 (us) | TCP (Mbit/s) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, f) in &rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.0} |",
            f.p50, f.p99, f.p999, f.mbits
        );
    }
    let (br, px, ov) = (&rows[0].1, &rows[1].1, &rows[2].1);
    println!(
        "\npollux/OVS-DPDK p50 {:.2}, p99 {:.2}; pollux/bridge p99 {:.2}; TCP pollux/OVS-DPDK {:.2}, pollux/bridge {:.2}",
        px.p50 / ov.p50,
        px.p99 / ov.p99,
        px.p99 / br.p99,
        px.mbits / ov.mbits,
        px.mbits / br.mbits
    );
    let _ = std::fs::remove_dir_all(&dir);
}
