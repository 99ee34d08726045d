//! SR-IOV end to end on QEMU's emulated Intel 82576 (`-device igb`: a real
//! device model whose VFs Linux's igb driver creates and DPDK's e1000 VF
//! driver runs), inside a guest on Debian's generic kernel (igb, igbvf,
//! vfio-pci) with QEMU's emulated IOMMU for vfio.
//!
//! In the guest: `pollux sriov` refuses what the device lacks by name,
//! creates two VFs, sets each one's MAC, VLAN, spoof check and trust
//! (iproute2's `ip link show` reads them back from the igb driver), and
//! binds VF 0 to vfio-pci. `pollux run` (built on the host with the `dpdk`
//! feature, with DPDK's libraries and drivers copied into the image) opens
//! VF 0 by PCI address as its uplink, and the PF through DPDK's af_packet
//! driver as the port of a "VM" that lives on the host: the PF's other side
//! is a tap device bridged with two namespaces, a client on the wire and
//! the web server behind the public VIP. The client's requests to the VIP
//! cross the VF into pollux, leave DNATed to the server through the PF,
//! and the replies come back un-NATed out of the VF: a capture on the
//! bridge shows all four legs with the addresses and MACs each should
//! have. pollux reports the VF's link, speed and device.
//!
//! Needs root, the `dpdk` feature with DPDK's e1000, af_packet and ring
//! mempool drivers, QEMU with the igb device (QEMU 10; Debian's
//! bookworm-backports), tcpdump, curl, python3, ip and ethtool
//! (`testkit::require`: without them it says why it did not run; under CI
//! it fails).
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::netns::{Lab, read, sh, wait_for};
use common::vm::{BOOT, host_tool};
use std::process::Command;
use std::time::Duration;
use testkit::guest::{Guest, Nic, Spec};

/// The PF's MAC: the vnet's gateway, so the igb's switch hands the PF
/// what the server sends to its gateway.
const GATEWAY_MAC: &str = "12:34:56:78:9a:bc";
/// VF 0's MAC: pollux's uplink MAC.
const VF0_MAC: &str = "02:50:4c:58:ff:ff";
const VF1_MAC: &str = "02:00:00:00:aa:02";
const CLIENT_MAC: &str = "02:00:00:00:03:10";
const WEB_MAC: &str = "02:00:00:00:01:04";

/// DPDK's drivers pollux loads in the guest (`-d`): the VF's, the
/// af_packet one and the ring mempool handler (the libraries pollux links
/// come with it), beside the EAL pollux links (same directory, same ABI).
fn pmds() -> Vec<String> {
    let ldd = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_pollux"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "librte_eal.so.23 => /lib/x86_64-linux-gnu/librte_eal.so.23 (0x...)"
    let eal = ldd
        .lines()
        .filter_map(|l| l.split_once("=> "))
        .filter_map(|(_, r)| r.split_whitespace().next())
        .find(|p| p.contains("/librte_eal.so."))
        .unwrap_or("/usr/lib/x86_64-linux-gnu/librte_eal.so.23");
    [
        "librte_net_e1000",
        "librte_net_af_packet",
        "librte_mempool_ring",
    ]
    .iter()
    .map(|d| eal.replace("librte_eal", d))
    .collect()
}

fn config(vf: &str, pf: &str, pmds: &[String]) -> String {
    let mut eal = vec![
        "-l".to_string(),
        "0".into(),
        "-a".into(),
        vf.to_string(),
        "--huge-dir".into(),
        "/dev/hugepages".into(),
        "--file-prefix=sriov".into(),
        "--log-level=notice".into(),
    ];
    for p in pmds {
        eal.extend(["-d".into(), p.clone()]);
    }
    let eal: Vec<String> = eal.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"[control]
socket = "/tmp/pollux.sock"
[dataplane]
workers = 1
idle_sleep_us = 200
[dpdk]
eal_args = [{}]
[[port]]
name = "wire"
driver = "dpdk"
pci = "{vf}"
[[port]]
name = "web"
driver = "dpdk"
devargs = "net_af_packet0,iface={pf}"
[uplink]
port = "wire"
next_hop_mac = "{CLIENT_MAC}"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "{GATEWAY_MAC}"
[[vip]]
name = "www"
vnet = "a"
address = "198.51.100.100"
port = 80
protocol = "tcp"
backends = [ {{ vm = "web", port = 8000 }} ]
[[vm]]
name = "web"
port = "web"
vnet = "a"
mac = "{WEB_MAC}"
ips = ["10.1.0.4"]
"#,
        eal.join(", ")
    )
}

/// Runs `cmd` in the guest; panics with the guest's console unless it
/// exits 0.
fn ok(g: &mut Guest, cmd: &str) -> String {
    g.ok(cmd, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Runs `cmd` in the guest and returns its status and output.
fn run(g: &mut Guest, cmd: &str) -> (i32, String) {
    let o = g
        .run(cmd, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (o.status, o.out)
}

/// Deletes the bridge at the end.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn vfs_of_an_emulated_igb_provisioned_and_driven_by_pollux() {
    use testkit::require::{Need, met};
    let pmds = pmds();
    let mut needs = vec![Need::Root];
    for t in [
        "qemu-system-x86_64",
        "apt-get",
        "dpkg-deb",
        "tcpdump",
        "curl",
        "python3",
        "ethtool",
        "ip",
    ] {
        needs.push(Need::Tool(t));
    }
    needs.push(Need::QemuDevice("igb"));
    for p in &pmds {
        needs.push(Need::File(p, "a DPDK driver"));
    }
    if !met(&needs) {
        return;
    }
    // In the guest, the host's build is /usr/local/bin/pollux.
    let pollux = "/usr/local/bin/pollux";
    let mut lab = Lab::new("sr");
    let dir = lab.dir.clone();
    lab.add(
        "cl",
        CLIENT_MAC,
        &[
            vec!["ip", "addr", "add", "198.51.100.10/24", "dev", "eth0"],
            vec![
                "ip",
                "neigh",
                "add",
                "198.51.100.100",
                "lladdr",
                VF0_MAC,
                "dev",
                "eth0",
            ],
        ],
    );
    lab.add(
        "web",
        WEB_MAC,
        &[
            vec!["ip", "addr", "add", "10.1.0.4/16", "dev", "eth0"],
            vec![
                "ip",
                "neigh",
                "add",
                "10.1.0.1",
                "lladdr",
                GATEWAY_MAC,
                "dev",
                "eth0",
            ],
        ],
    );
    lab.exec("web", &["ip", "route", "add", "default", "via", "10.1.0.1"]);
    let id = std::process::id() % 100_000;
    let br = Bridge(format!("plxsr{id}br"));
    let tap = format!("plxsr{id}tap");
    sh(&["ip", "link", "add", &br.0, "type", "bridge"]);
    let _ = Command::new("sysctl")
        .args(["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", br.0)])
        .output();
    sh(&["ip", "link", "set", &br.0, "up"]);
    for tag in ["cl", "web"] {
        let host = lab.ns(tag).host.clone();
        sh(&["ip", "link", "set", &host, "master", &br.0]);
    }
    // The server, with a file to fetch.
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(www.join("blob"), &blob).unwrap();
    std::fs::write(www.join("index.html"), "web behind a VF\n").unwrap();
    lab.spawn(
        "web",
        &format!(
            "exec python3 -m http.server 8000 --bind 10.1.0.4 --directory {}",
            www.display()
        ),
        &dir.join("web.log"),
    );

    let spec = Spec::new("sriov")
        .generic_kernel(&["igb", "igbvf", "vfio_pci", "vfio_iommu_type1"])
        .memory(1024)
        .cpus(2)
        .hugepages(192)
        .tools(&[
            env!("CARGO_BIN_EXE_pollux"),
            &host_tool("ip"),
            &host_tool("ethtool"),
        ])
        .libs(&pmds.iter().map(String::as_str).collect::<Vec<_>>())
        .nic(Nic::igb(&tap, GATEWAY_MAC));
    let mut g = Guest::start(&dir, spec).unwrap_or_else(|e| panic!("{e}"));
    // QEMU made the tap: onto the bridge with it.
    assert!(
        wait_for(Duration::from_secs(60), || {
            std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()
        }),
        "QEMU made no tap {tap}: {}",
        g.qemu_log()
    );
    sh(&["ip", "link", "set", &tap, "master", &br.0]);
    sh(&["ip", "link", "set", &tap, "up"]);
    g.wait_ready(BOOT).unwrap_or_else(|e| panic!("{e}"));

    // The PF: the interface whose device can have VFs.
    let pf = ok(
        &mut g,
        "for d in /sys/class/net/*; do [ -e $d/device/sriov_totalvfs ] && echo ${d##*/}; done; true",
    )
    .trim()
    .to_string();
    assert!(!pf.is_empty() && !pf.contains('\n'), "PF {pf:?}");
    assert_eq!(
        ok(
            &mut g,
            &format!("cat /sys/class/net/{pf}/device/sriov_totalvfs")
        )
        .trim(),
        "7"
    );

    // What the device lacks is refused by name.
    let (st, out) = run(&mut g, &format!("{pollux} sriov --pf lo --vfs 2"));
    assert!(
        st != 0 && out.contains("\"lo\" is not an SR-IOV physical function"),
        "{st} {out}"
    );
    let (st, out) = run(&mut g, &format!("{pollux} sriov --pf {pf} --vfs 8"));
    assert!(
        st != 0 && out.contains("supports at most 7 VFs, 8 asked for"),
        "{st} {out}"
    );
    // Two VFs, each at its PCI address.
    let out = ok(&mut g, &format!("{pollux} sriov --pf {pf} --vfs 2"));
    assert!(out.contains(&format!("{pf}: 2 VFs")), "{out}");
    let vf_pci = |out: &str, i: u32| -> String {
        let tag = format!("{pf}: VF {i} is ");
        out.lines()
            .find_map(|l| l.strip_prefix(&tag))
            .unwrap_or_else(|| panic!("no VF {i} in {out}"))
            .trim()
            .to_string()
    };
    let vf0 = vf_pci(&out, 0);
    let vf1 = vf_pci(&out, 1);
    let (st, out) = run(
        &mut g,
        &format!("{pollux} sriov --pf {pf} --vf 2 --trust on"),
    );
    assert!(
        st != 0 && out.contains(&format!("\"{pf}\" has 2 VFs (0-1), no VF 2")),
        "{st} {out}"
    );
    let (st, out) = run(
        &mut g,
        &format!("{pollux} sriov --pf {pf} --vf 0 --bind no_such_driver"),
    );
    assert!(
        st != 0 && out.contains("no driver \"no_such_driver\" loaded"),
        "{st} {out}"
    );
    // Each VF set up; the driver reports back what it applied.
    ok(
        &mut g,
        &format!("{pollux} sriov --pf {pf} --vf 0 --mac {VF0_MAC} --spoofchk on --trust off"),
    );
    ok(
        &mut g,
        &format!(
            "{pollux} sriov --pf {pf} --vf 1 --mac {VF1_MAC} --vlan 100 --spoofchk off --trust on"
        ),
    );
    let show = ok(&mut g, &format!("/usr/local/bin/ip link show {pf}"));
    let vf_line = |i: u32| -> String {
        show.lines()
            .find(|l| l.trim_start().starts_with(&format!("vf {i} ")))
            .unwrap_or_else(|| panic!("no vf {i} in {show}"))
            .to_string()
    };
    let (l0, l1) = (vf_line(0), vf_line(1));
    assert!(l0.contains(&format!("link/ether {VF0_MAC}")), "{l0}");
    assert!(
        l0.contains("spoof checking on") && l0.contains("trust off"),
        "{l0}"
    );
    assert!(!l0.contains("vlan"), "{l0}");
    assert!(l1.contains(&format!("link/ether {VF1_MAC}")), "{l1}");
    assert!(l1.contains("vlan 100"), "{l1}");
    assert!(
        l1.contains("spoof checking off") && l1.contains("trust on"),
        "{l1}"
    );
    // VF 0 to vfio-pci, for DPDK.
    let out = ok(
        &mut g,
        &format!("{pollux} sriov --pf {pf} --vf 0 --bind vfio-pci"),
    );
    assert!(
        out.contains(&format!("VF 0 ({vf0}) bound to vfio-pci")),
        "{out}"
    );
    let drv = ok(
        &mut g,
        &format!("basename $(readlink /sys/bus/pci/devices/{vf0}/driver)"),
    );
    assert_eq!(drv.trim(), "vfio-pci");
    assert_ne!(vf0, vf1);

    // pollux on VF 0 (uplink) and the PF (the server's port).
    ok(
        &mut g,
        "mkdir -p /dev/hugepages /var/run && mount -t hugetlbfs nodev /dev/hugepages",
    );
    ok(&mut g, &format!("/usr/local/bin/ip link set {pf} up"));
    // The PF's receive offloads would hand DPDK's af_packet driver
    // coalesced frames larger than the MTU.
    ok(
        &mut g,
        &format!("/usr/local/bin/ethtool -K {pf} gro off lro off tso off gso off"),
    );
    let cfg = config(&vf0, &pf, &pmds);
    ok(
        &mut g,
        &format!(
            "echo {} | base64 -d > /tmp/pollux.toml",
            base64(cfg.as_bytes())
        ),
    );
    ok(&mut g, &format!("{pollux} check --config /tmp/pollux.toml"));
    // EAL arguments that would leave the VF unopened are named up front.
    let bad = cfg.replace("\"-a\", ", "\"--no-pci\", \"-a\", ");
    ok(
        &mut g,
        &format!(
            "echo {} | base64 -d > /tmp/bad.toml",
            base64(bad.as_bytes())
        ),
    );
    let (st, out) = run(&mut g, &format!("{pollux} check --config /tmp/bad.toml"));
    assert!(
        st != 0
            && out.contains(&format!(
                "PCI device {vf0} needs the PCI bus, but [dpdk] eal_args has --no-pci"
            )),
        "{st} {out}"
    );
    // Its exit status is kept, to see it stop cleanly at the end.
    ok(
        &mut g,
        &format!(
            "({pollux} run --config /tmp/pollux.toml > /tmp/pollux.out 2> /tmp/pollux.log; echo $? > /tmp/pollux.rc) &"
        ),
    );
    let ctl = format!("{pollux} ctl --socket /tmp/pollux.sock");
    let mut ready = false;
    for _ in 0..60 {
        if run(&mut g, &format!("{ctl} status")).0 == 0 {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        ready,
        "pollux did not come up: {}",
        run(&mut g, "cat /tmp/pollux.log").1
    );

    // Capture on the bridge while the client talks to the VIP.
    let pcap = dir.join("bridge.pcap");
    let mut dump = Command::new("tcpdump")
        .args(["-i", &br.0, "-U", "-n", "-w"])
        .arg(&pcap)
        .arg("tcp")
        .stderr(std::fs::File::create(dir.join("tcpdump.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || read(&dir.join("tcpdump.log"))
            .contains("listening")),
        "tcpdump did not start: {}",
        read(&dir.join("tcpdump.log"))
    );
    let page = lab.bash(
        "cl",
        "curl -sf --max-time 20 http://198.51.100.100/index.html",
    );
    let got_blob = lab.bash("cl", "curl -sSf --max-time 120 http://198.51.100.100/blob");
    let _ = Command::new("kill")
        .args(["-INT", &dump.id().to_string()])
        .status();
    let _ = dump.wait();
    let counters = run(&mut g, &format!("{ctl} --json counters")).1;
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        "web behind a VF\n",
        "{}\ncounters: {counters}\npollux: {}",
        String::from_utf8_lossy(&page.stderr),
        run(&mut g, "cat /tmp/pollux.log").1
    );
    // The capture as text, with link-layer headers.
    let text = Command::new("tcpdump")
        .args(["-r"])
        .arg(&pcap)
        .args(["-n", "-e", "-t"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    if got_blob.stdout != blob {
        let resets: Vec<&str> = text.lines().filter(|l| l.contains("Flags [R")).collect();
        panic!(
            "the 1 MB download came back {} bytes: {} {}\nresets: {resets:#?}\ncounters: {counters}\npollux: {}\nlast of the capture:\n{}",
            got_blob.stdout.len(),
            got_blob.status,
            String::from_utf8_lossy(&got_blob.stderr),
            run(&mut g, "cat /tmp/pollux.log").1,
            text.lines().rev().take(15).collect::<Vec<_>>().join("\n")
        );
    }

    // The four legs on the wire, with pollux's rewrite.
    // "SRC_MAC > DST_MAC, ethertype IPv4 (0x0800), length N: A.P > B.Q: ..."
    let leg = |src_mac: &str, dst_mac: &str, from: &str, to: &str| {
        text.lines().any(|l| {
            let ips = l
                .split_once("length ")
                .and_then(|(_, r)| r.split_once(": "));
            let words: Vec<&str> = ips.map_or(vec![], |(_, r)| r.split_whitespace().collect());
            l.starts_with(&format!("{src_mac} > {dst_mac},"))
                && words.len() > 2
                && words[0].starts_with(from)
                && words[2].trim_end_matches(':').starts_with(to)
        })
    };
    let cl = "198.51.100.10.";
    assert!(
        leg(CLIENT_MAC, VF0_MAC, cl, "198.51.100.100.80"),
        "client to the VIP (into the VF):\n{text}"
    );
    assert!(
        leg(GATEWAY_MAC, WEB_MAC, cl, "10.1.0.4.8000"),
        "DNATed to the server (out of the PF):\n{text}"
    );
    assert!(
        leg(WEB_MAC, GATEWAY_MAC, "10.1.0.4.8000", cl),
        "the server's reply (into the PF):\n{text}"
    );
    assert!(
        leg(VF0_MAC, CLIENT_MAC, "198.51.100.100.80", cl),
        "the reply from the VIP (out of the VF):\n{text}"
    );

    // What pollux says of the VF: link up at its speed, the device, its
    // traffic.
    let c: serde_json::Value =
        serde_json::from_str(&counters).unwrap_or_else(|e| panic!("{e}: {counters}"));
    let wire = c["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "wire"))
        .unwrap_or_else(|| panic!("no wire port: {c}"));
    assert_eq!(wire["link"], "up", "{wire}");
    assert!(wire["speed_mbps"].as_u64().is_some_and(|s| s > 0), "{wire}");
    // Out of the VF: the 1 MB in about 700 full frames; into it, the
    // client's requests and acknowledgements.
    assert!(wire["tx_packets"].as_u64().unwrap() >= 690, "{wire}");
    assert!(wire["rx_packets"].as_u64().unwrap() > 100, "{wire}");
    let status = ok(&mut g, &format!("{ctl} status"));
    eprintln!("pollux ctl status in the guest:\n{status}");
    assert!(
        status.contains(&vf0) && status.contains("net_e1000_igb_vf"),
        "{status}"
    );
    let exit = |g: &mut Guest, n: &str| -> String {
        for _ in 0..120 {
            let rc = run(g, &format!("cat /tmp/pollux{n}.rc 2>/dev/null")).1;
            if !rc.trim().is_empty() {
                return rc.trim().to_string();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        String::new()
    };

    // A hitless upgrade on the VF: the running pollux gives the PCI
    // function up once its worker stops, the successor (DPDK under a file
    // prefix of its own) probes it after "go".
    let st: serde_json::Value =
        serde_json::from_str(&ok(&mut g, &format!("{ctl} --json status"))).unwrap();
    let old_pid = st["pid"].as_u64().unwrap();
    ok(
        &mut g,
        &format!(
            "({pollux} run --takeover /tmp/pollux.sock > /tmp/pollux2.out 2> /tmp/pollux2.log; echo $? > /tmp/pollux2.rc) &"
        ),
    );
    assert_eq!(
        exit(&mut g, ""),
        "0",
        "the predecessor's exit: {}\nthe successor: {}",
        run(&mut g, "cat /tmp/pollux.out /tmp/pollux.log").1,
        run(&mut g, "cat /tmp/pollux2.log").1
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&mut g, &format!("{ctl} --json status"))).unwrap();
    assert_eq!(st["takeover"]["from_pid"].as_u64(), Some(old_pid), "{st}");
    eprintln!(
        "upgrade on the VF: traffic stopped {:.1} ms (the VF and the PF's af_packet device given up and probed again)",
        st["takeover"]["blackout_us"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    let page = lab.bash(
        "cl",
        "curl -sf --max-time 20 http://198.51.100.100/index.html",
    );
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        "web behind a VF\n",
        "after the upgrade: {}\npollux: {}",
        String::from_utf8_lossy(&page.stderr),
        run(&mut g, "cat /tmp/pollux2.log").1
    );
    let status = ok(&mut g, &format!("{ctl} status"));
    assert!(
        status.contains(&vf0) && status.contains("net_e1000_igb_vf"),
        "{status}"
    );

    // SIGTERM stops it cleanly: the VF's link poller and the ports go
    // down in order, exit status 0.
    ok(&mut g, "kill -TERM $(pidof pollux)");
    assert_eq!(
        exit(&mut g, "2"),
        "0",
        "pollux's exit: {}",
        run(&mut g, "cat /tmp/pollux2.out /tmp/pollux2.log").1
    );
    drop(g);
}

/// Standard base64 (what busybox's `base64 -d` reads).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
