//! The kernel-interface ports (AF_PACKET, AF_XDP) against a real kernel
//! stack: a network namespace behind a veth pair (created here, removed at
//! the end even on failure). The test plays the neighbour of the namespace:
//! it answers ARP and ping through the port, so `ping` in the namespace
//! succeeds only if rx and tx both work; and it checks that a TCP SYN the
//! kernel sent with checksum offload arrives (AF_PACKET) with its checksum
//! completed.
//!
//! Needs root (namespaces, packet sockets) and `ip`, `ping`, `bash`
//! (`testkit::require`: without them it says why it did not run, and under
//! CI it fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::pool::{Pool, PoolBuf, PoolConfig};
use dataplane::port::af_packet::AfPacketPort;
use dataplane::port::af_xdp::AfXdpPort;
use dataplane::worker::{Ctx, Pipeline, PortBox, Worker};
use dataplane::{Batch, MacAddr, PacketBuf, Port, parse, rewrite};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one end of a veth pair; deleted on drop.
struct Netns {
    ns: String,
    host: String,
    /// The tests of this file take turns (one `Netns` at a time), so one
    /// that counts the process's descriptors and mappings sees only its own.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Netns {
    fn new(tag: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let n = Netns {
            ns: format!("plx{tag}{id}"),
            host: format!("plx{tag}{id}h"),
            _turn: TURN.lock().unwrap_or_else(|p| p.into_inner()),
        };
        let _ = Command::new("ip").args(["netns", "del", &n.ns]).output();
        sh(&["ip", "netns", "add", &n.ns]);
        sh(&[
            "ip", "link", "add", &n.host, "type", "veth", "peer", "name", "eth0", "netns", &n.ns,
        ]);
        // (No IPv6 of its own on the host's end: the namespace's receive
        // count then holds only what the port sent. A kernel without IPv6
        // has no such file, and no such traffic.)
        if let Err(e) = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", n.host),
            "1",
        ) {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        }
        sh(&["ip", "link", "set", &n.host, "up"]);
        n.exec(&["ip", "link", "set", "lo", "up"]);
        n.exec(&["ip", "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
        n.exec(&["ip", "link", "set", "eth0", "up"]);
        n
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.ns];
        all.extend_from_slice(args);
        sh(&all);
    }

    fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

const ME: MacAddr = MacAddr([0x02, 0x50, 0x4c, 0x58, 0x99, 0x01]);

#[test]
fn open_errors_name_the_interface() {
    let pool = Pool::new(&PoolConfig::new("afp-err", 64)).unwrap();
    let e = AfPacketPort::open("p", "nosuchif0", pool).unwrap_err();
    assert!(
        e.to_string()
            .contains("port \"p\": interface \"nosuchif0\" does not exist"),
        "{e}"
    );
    if !testkit::require::is_root() {
        let e = AfPacketPort::open("p", "lo", pool).unwrap_err();
        assert!(e.to_string().contains("needs CAP_NET_RAW"), "{e}");
    }
    let e = AfXdpPort::open("x", "nosuchif0", 0, pool).unwrap_err();
    assert!(
        e.to_string()
            .contains("port \"x\": interface \"nosuchif0\" does not exist"),
        "{e}"
    );
}

/// Plays the namespace's neighbour 10.99.0.1 on `port` (ARP and ping
/// answered) while `ping` runs in the namespace; panics unless it succeeds.
fn answer_pings(net: &Netns, port: &mut impl Port<Buf = dataplane::pool::PoolBuf>) {
    let mut ping = net.spawn(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.99.0.1"]);
    let (mut arp, mut echo) = (0, 0);
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = ping.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "ping did not finish");
        let mut rx = Batch::new();
        port.rx_burst(&mut rx);
        let mut tx = Batch::new();
        for mut pkt in rx.drain() {
            let Ok(p) = parse(pkt.data(), 0) else {
                continue;
            };
            let ok = if p.l3 == dataplane::L3::Arp {
                arp += 1;
                rewrite::arp_reply(pkt.data_mut(), &p, ME).is_ok()
            } else if rewrite::is_echo_request(pkt.data(), &p) {
                echo += 1;
                rewrite::icmp_echo_reply(pkt.data_mut(), &p, ME).is_ok()
            } else {
                false
            };
            if ok {
                tx.push(pkt).unwrap();
            }
        }
        port.tx_burst(&mut tx);
        std::thread::sleep(Duration::from_millis(1));
    };
    let out = ping.wait_with_output().unwrap();
    assert!(
        status.success(),
        "ping failed ({arp} ARP, {echo} echo requests seen): {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 received"));
    assert!(arp >= 1 && echo >= 3, "{arp} ARP, {echo} echo");
    let s = port.stats().snapshot();
    assert!(s.rx_packets >= 4 && s.tx_packets >= 4, "{s:?}");
    assert_eq!(s.drops, 0, "{:?}", port.stats().drops.nonzero());
}

#[test]
fn a_kernel_stack_pings_through_the_port() {
    if !testkit::require::root_and(&["ip", "ping", "bash"]) {
        return;
    }
    let net = Netns::new("p");
    let pool = Pool::new(&PoolConfig::new("afp-ping", 1024)).unwrap();
    let mut port = AfPacketPort::open("veth", &net.host, pool).unwrap();
    assert_eq!(port.info().driver, "af_packet");
    answer_pings(&net, &mut port);
}

#[test]
fn a_kernel_stack_pings_through_an_xdp_socket() {
    if !testkit::require::root_and(&["ip", "ping", "bash"]) {
        return;
    }
    let net = Netns::new("x");
    let pool = Pool::new(&PoolConfig::new("xdp-ping", 1024)).unwrap();
    let mut port = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
    assert_eq!(port.info().driver, "af_xdp");
    answer_pings(&net, &mut port);
    let native = port.native();
    drop(port);
    // Closing the port detached the program: the interface is clean.
    let out = Command::new("ip")
        .args(["link", "show", &net.host])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("xdp"),
        "XDP still attached (native {native}): {text}"
    );
    // A second open on the same interface works (nothing left behind).
    let again = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
    drop(again);
}

#[test]
fn offloaded_checksums_arrive_completed() {
    if !testkit::require::root_and(&["ip", "ping", "bash"]) {
        return;
    }
    let net = Netns::new("c");
    // A static neighbour, so the SYN leaves without ARP.
    net.exec(&[
        "ip",
        "neigh",
        "add",
        "10.99.0.1",
        "lladdr",
        "02:50:4c:58:99:01",
        "dev",
        "eth0",
    ]);
    let pool = Pool::new(&PoolConfig::new("afp-csum", 1024)).unwrap();
    let mut port = AfPacketPort::open("veth", &net.host, pool).unwrap();
    let mut conn = net.spawn(&[
        "timeout",
        "2",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.99.0.1/8080",
    ]);
    let end = Instant::now() + Duration::from_secs(5);
    let syn = 'found: loop {
        assert!(Instant::now() < end, "no SYN arrived");
        let mut rx = Batch::new();
        port.rx_burst(&mut rx);
        for pkt in rx.drain() {
            let Ok(p) = parse(pkt.data(), 0) else {
                continue;
            };
            if p.key.proto == 6 && p.key.dst_port == 8080 {
                break 'found pkt.data().to_vec();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = conn.kill();
    let _ = conn.wait();
    let s = etherparse::SlicedPacket::from_ethernet(&syn).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
        panic!("not IPv4")
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = &s.transport else {
        panic!("not TCP")
    };
    let want = tcp
        .to_header()
        .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
        .unwrap();
    assert_eq!(tcp.checksum(), want, "TCP checksum not completed");
}

/// Descriptors and mappings open now (`/proc/self/fd`, `/proc/self/maps`).
fn open_resources() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count();
    (fds, maps)
}

/// Opening and dropping ports, and failing to open them half way (a bad
/// queue, a second XDP socket on a queue that has one), leaves no
/// descriptor or mapping behind: each is owned (`OwnedFd`, `Mapping`) and
/// released once.
#[test]
fn ports_release_their_descriptors_and_mappings() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("r");
    let pool = Pool::new(&PoolConfig::new("release", 1024)).unwrap();
    // Warm up whatever the first open allocates for good (caches, threads).
    drop(AfPacketPort::open("veth", &net.host, pool).unwrap());
    drop(AfXdpPort::open("veth", &net.host, 0, pool).unwrap());
    let before = open_resources();
    for _ in 0..3 {
        drop(AfPacketPort::open("veth", &net.host, pool).unwrap());
        let xdp = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
        // The queue is taken: the second socket fails after its socket and
        // UMEM exist, and must release them.
        let e = AfXdpPort::open("veth2", &net.host, 0, pool).unwrap_err();
        assert!(e.to_string().contains("port \"veth2\""), "{e}");
        drop(xdp);
    }
    assert_eq!(open_resources(), before, "(descriptors, mappings)");
}

/// Frames the namespace's end of the veth pair received.
fn ns_rx_packets(net: &Netns) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns,
            "cat",
            "/sys/class/net/eth0/statistics/rx_packets",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// 32 broadcast frames of a local experimental EtherType: the namespace's
/// kernel counts them received and has nothing to answer.
fn throwaway_frames(pool: Pool) -> Batch<dataplane::pool::PoolBuf> {
    sized_frames(pool, &[60; 32])
}

/// [`throwaway_frames`] of the given lengths.
fn sized_frames(pool: Pool, lens: &[usize]) -> Batch<dataplane::pool::PoolBuf> {
    use dataplane::BufAlloc;
    let mut tx = Batch::new();
    for (i, len) in lens.iter().enumerate() {
        let mut buf = pool.alloc_buf().unwrap();
        let room = buf.append(*len).unwrap();
        room.fill(i as u8);
        // (A frame shorter than a header: just bytes.)
        if let Some(hdr) = room.get_mut(..14) {
            hdr[..6].copy_from_slice(&[0xff; 6]);
            hdr[6..12].copy_from_slice(&ME.0);
            hdr[12..14].copy_from_slice(&[0x88, 0xb5]);
        }
        tx.push(buf).unwrap();
    }
    tx
}

/// Waits until the namespace has received `n` frames more than `before`,
/// running `between` at each look.
fn ns_receives_while(net: &Netns, before: u64, n: u64, what: &str, mut between: impl FnMut()) {
    let end = Instant::now() + Duration::from_secs(10);
    while ns_rx_packets(net) < before + n {
        assert!(
            Instant::now() < end,
            "the namespace received {} of the {n} frames {what}",
            ns_rx_packets(net) - before
        );
        between();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`ns_receives_while`] doing nothing meanwhile.
fn ns_receives(net: &Netns, before: u64, n: u64, what: &str) {
    ns_receives_while(net, before, n, what, || {});
}

/// A frame longer than the interface's MTU allows is counted
/// `tx_oversize` and does not hold back the frames after it; nor does one
/// the kernel refuses after the MTU was lowered under the port (it
/// discards it: `PACKET_LOSS`).
#[test]
fn a_packet_socket_drops_a_frame_too_long_for_the_link_and_goes_on() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("m");
    let pool = Pool::new(&PoolConfig::new("afp-mtu", 1024)).unwrap();
    let mut port = AfPacketPort::open("veth", &net.host, pool).unwrap();
    assert_eq!(port.info().mtu, 1500);
    let before = ns_rx_packets(&net);
    let mut lens = [60; 32];
    lens[2] = 1600;
    lens[5] = 10;
    port.tx_burst(&mut sized_frames(pool, &lens));
    ns_receives(&net, before, 30, "around one of 1600 bytes and one of 10");
    let drops = |port: &AfPacketPort| {
        let d = &port.stats().drops;
        (
            d.get(dataplane::DropReason::TxOversize),
            d.get(dataplane::DropReason::Malformed(
                dataplane::ParseError::EthernetTruncated,
            )),
        )
    };
    assert_eq!(drops(&port), (1, 1));
    sh(&["ip", "link", "set", &net.host, "mtu", "1400"]);
    let before = ns_rx_packets(&net);
    let mut lens = [60; 32];
    lens[2] = 1450;
    port.tx_burst(&mut sized_frames(pool, &lens));
    ns_receives(
        &net,
        before,
        31,
        "around one of 1450 bytes, the MTU lowered to 1400",
    );
    // (Not counted: the port had not read the new MTU yet.)
    assert_eq!(drops(&port), (1, 1));
    // The port reads the MTU again every few kicks; then it counts such a
    // frame itself.
    for _ in 0..64 {
        if port.info().mtu == 1400 {
            break;
        }
        port.kick();
    }
    assert_eq!(port.info().mtu, 1400);
    let before = ns_rx_packets(&net);
    port.tx_burst(&mut sized_frames(pool, &lens));
    ns_receives(
        &net,
        before,
        31,
        "around one of 1450 bytes, the MTU read again",
    );
    assert_eq!(drops(&port), (2, 1));
}

/// While its interface is down a port's transmit ring fills with frames
/// the kernel refuses (counted `tx_queue_full` beyond it); once the link is
/// back up, the port sends again: the frames waiting in the ring and new
/// ones reach the namespace.
fn sends_again_after_the_link_was_down(
    net: &Netns,
    port: &mut impl Port<Buf = dataplane::pool::PoolBuf>,
    pool: Pool,
) {
    sh(&["ip", "link", "set", &net.host, "down"]);
    // More than a ring of frames, with nowhere to go.
    for _ in 0..5000 / 32 {
        port.tx_burst(&mut throwaway_frames(pool));
    }
    assert!(
        port.stats().drops.get(dataplane::DropReason::TxQueueFull) > 0,
        "the ring never filled while the link was down: {:?}",
        port.stats().drops.nonzero()
    );
    sh(&["ip", "link", "set", &net.host, "up"]);
    let before = ns_rx_packets(net);
    let end = Instant::now() + Duration::from_secs(10);
    let mut taken = 0;
    while ns_rx_packets(net) < before + 1000 {
        assert!(
            Instant::now() < end,
            "the namespace received {} frames since the link came back; the port took {taken} new ones",
            ns_rx_packets(net) - before
        );
        taken += port.tx_burst(&mut throwaway_frames(pool));
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_packet_socket_sends_again_after_its_link_was_down() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("d");
    let pool = Pool::new(&PoolConfig::new("afp-down", 8192)).unwrap();
    let mut port = AfPacketPort::open("veth", &net.host, pool).unwrap();
    sends_again_after_the_link_was_down(&net, &mut port, pool);
}

#[test]
fn an_xdp_socket_sends_again_after_its_link_was_down() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("e");
    let pool = Pool::new(&PoolConfig::new("xdp-down", 8192)).unwrap();
    let mut port = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
    sends_again_after_the_link_was_down(&net, &mut port, pool);
}

/// A pipeline that drops whatever it receives.
struct Ignore;

impl Pipeline<PoolBuf> for Ignore {
    fn process(&mut self, _: &mut Ctx<'_, PoolBuf>, _: usize, pkts: &mut Batch<PoolBuf>) {
        pkts.clear();
    }
}

/// Sets the host's end of the veth pair up and waits until the kernel
/// says it is.
fn link_up(net: &Netns) {
    sh(&["ip", "link", "set", &net.host, "up"]);
    let end = Instant::now() + Duration::from_secs(10);
    let state = format!("/sys/class/net/{}/operstate", net.host);
    while std::fs::read_to_string(&state).unwrap().trim() != "up" {
        assert!(Instant::now() < end, "{} never came up", net.host);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Frames queued while the link was down leave once it is back up though
/// the port is given nothing new to send: its worker kicks it as it polls
/// (`Port::kick`); with `once`, a single kick sends them all.
fn stranded_frames_leave_with_no_new_traffic(
    net: &Netns,
    port: PortBox<PoolBuf>,
    pool: Pool,
    once: bool,
) {
    let mut port = port;
    sh(&["ip", "link", "set", &net.host, "down"]);
    for _ in 0..4 {
        port.tx_burst(&mut throwaway_frames(pool));
    }
    link_up(net);
    let before = ns_rx_packets(net);
    if once {
        port.kick();
        ns_receives(
            net,
            before,
            4 * 32,
            "queued while the link was down, after one kick",
        );
        return;
    }
    let mut worker = Worker::new("kick", None, vec![port], Ignore);
    ns_receives_while(
        net,
        before,
        4 * 32,
        "queued while the link was down, through a worker that only polls",
        || {
            for _ in 0..1000 {
                worker.poll_once();
            }
        },
    );
}

#[test]
fn a_packet_socket_sends_what_it_queued_while_down_with_no_new_traffic() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("k");
    let pool = Pool::new(&PoolConfig::new("afp-kick", 4096)).unwrap();
    let port = AfPacketPort::open("veth", &net.host, pool).unwrap();
    stranded_frames_leave_with_no_new_traffic(&net, Box::new(port), pool, false);
}

#[test]
fn a_packet_socket_sends_its_backlog_at_one_kick() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("o");
    let pool = Pool::new(&PoolConfig::new("afp-once", 4096)).unwrap();
    let port = AfPacketPort::open("veth", &net.host, pool).unwrap();
    stranded_frames_leave_with_no_new_traffic(&net, Box::new(port), pool, true);
}

/// Frames a port queued while its link was down (its kicks refused) and
/// then handed over with its socket leave at its successor's first kick,
/// with nothing new to send.
#[test]
fn a_handed_over_packet_socket_sends_what_its_predecessor_queued_while_down() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("s");
    let pool = Pool::new(&PoolConfig::new("afp-strand", 4096)).unwrap();
    let mut first = AfPacketPort::open("veth", &net.host, pool).unwrap();
    sh(&["ip", "link", "set", &net.host, "down"]);
    for _ in 0..4 {
        assert_eq!(first.tx_burst(&mut throwaway_frames(pool)), 32);
    }
    let h = first.handover().expect("af_packet hands over").unwrap();
    drop(first);
    let mut second = AfPacketPort::adopt("veth", &net.host, pool, h).unwrap();
    link_up(&net);
    let before = ns_rx_packets(&net);
    second.kick();
    ns_receives(
        &net,
        before,
        4 * 32,
        "queued by the predecessor while the link was down, after the successor's first kick",
    );
}

#[test]
fn an_xdp_socket_sends_what_it_queued_while_down_with_no_new_traffic() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("z");
    let pool = Pool::new(&PoolConfig::new("xdp-kick", 4096)).unwrap();
    let port = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
    stranded_frames_leave_with_no_new_traffic(&net, Box::new(port), pool, false);
}

/// (The kernel sends 32 descriptors a call: the kick calls again while it
/// has more to take.)
#[test]
fn an_xdp_socket_sends_its_backlog_at_one_kick() {
    if !testkit::require::root_and(&["ip"]) {
        return;
    }
    let net = Netns::new("q");
    let pool = Pool::new(&PoolConfig::new("xdp-once", 4096)).unwrap();
    let port = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
    stranded_frames_leave_with_no_new_traffic(&net, Box::new(port), pool, true);
}

/// The UDP payloads `seq N` among the frames of `rx`.
fn seqs(rx: &mut Batch<dataplane::pool::PoolBuf>, out: &mut Vec<u32>) {
    for pkt in rx.drain() {
        let Ok(p) = parse(pkt.data(), 0) else {
            continue;
        };
        if p.key.proto != 17 || p.key.dst_port != 9999 {
            continue;
        }
        let text = String::from_utf8_lossy(&pkt.data()[usize::from(p.l4_off) + 8..]).to_string();
        if let Some(n) = text.trim().strip_prefix("seq ") {
            out.push(n.parse().unwrap());
        }
    }
}

/// Datagrams sent by [`first_datagrams`].
const N: u32 = 600;

/// Answers pings through `port`; then the namespace sends `N` numbered
/// datagrams to 10.99.0.1:9999 (its neighbour entry made permanent, so
/// they leave without asking ARP again) and the first 100 are read through
/// `port`. Returns the sender, the numbers read and the test's deadline.
fn first_datagrams(
    net: &Netns,
    port: &mut impl Port<Buf = dataplane::pool::PoolBuf>,
) -> (std::process::Child, Vec<u32>, Instant) {
    answer_pings(net, port);
    net.exec(&[
        "ip",
        "neigh",
        "replace",
        "10.99.0.1",
        "lladdr",
        "02:50:4c:58:99:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let sender = net.spawn(&[
        "bash",
        "-c",
        &format!("for i in $(seq 1 {N}); do echo \"seq $i\" > /dev/udp/10.99.0.1/9999; done"),
    ]);
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while got.len() < 100 {
        assert!(Instant::now() < end, "only {} frames arrived", got.len());
        let mut rx = Batch::new();
        port.rx_burst(&mut rx);
        seqs(&mut rx, &mut got);
    }
    (sender, got, end)
}

/// A port's socket handed to a successor (through `SCM_RIGHTS`, as between
/// two processes) goes on where the first stopped: every frame the kernel
/// queued arrives once, in order, none lost or read twice, and the
/// successor sends on its rings.
#[test]
fn a_handed_over_socket_reads_on_from_where_its_port_stopped() {
    if !testkit::require::root_and(&["ip", "ping", "bash"]) {
        return;
    }
    let net = Netns::new("h");
    let pool = Pool::new(&PoolConfig::new("afp-handover", 4096)).unwrap();
    let mut first = AfPacketPort::open("veth", &net.host, pool).unwrap();
    // The first port sends too (ARP and echo replies), so the second must
    // go on from its tx position: the kernel sends a ring's slots in order
    // from where it stopped.
    let (mut sender, mut got, end) = first_datagrams(&net, &mut first);
    let h = first.handover().expect("af_packet hands over").unwrap();
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let meta = format!("{} {} {} {}", h.rx_next, h.tx_next, h.frame_size, h.frames);
    {
        use std::os::fd::AsFd;
        dataplane::port::fdpass::send(&mut a, meta.as_bytes(), &[h.fd.as_fd()]).unwrap();
    }
    drop(h);
    drop(first);
    let (payload, mut fds) = dataplane::port::fdpass::recv(&mut b, 1024).unwrap();
    let n: Vec<usize> = String::from_utf8(payload)
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let h = dataplane::port::Handover {
        fd: fds.remove(0),
        rx_next: n[0],
        tx_next: n[1],
        frame_size: n[2],
        frames: n[3],
        extra: Vec::new(),
        free: Vec::new(),
    };
    let mut second = AfPacketPort::adopt("veth", &net.host, pool, h).unwrap();
    assert!(sender.wait().unwrap().success());
    while got.len() < N as usize {
        assert!(
            Instant::now() < end,
            "{} of {N} frames arrived: {:?}",
            got.len(),
            &got[got.len().saturating_sub(5)..]
        );
        let mut rx = Batch::new();
        second.rx_burst(&mut rx);
        seqs(&mut rx, &mut got);
    }
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
    // The successor answers ARP and ping through the same socket.
    net.exec(&["ip", "neigh", "del", "10.99.0.1", "dev", "eth0"]);
    answer_pings(&net, &mut second);
    // Ring sizes the driver would never make are refused before mapping.
    let h = second.handover().unwrap().unwrap();
    let e = AfPacketPort::adopt(
        "veth",
        &net.host,
        pool,
        dataplane::port::Handover {
            frame_size: 100,
            ..h
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("slots must be a power of two"),
        "{e}"
    );
    // A socket that is not a packet socket is refused by name.
    let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = AfPacketPort::adopt(
        "veth",
        &net.host,
        pool,
        dataplane::port::Handover {
            fd: x.into(),
            rx_next: 0,
            tx_next: 0,
            frame_size: 2048,
            frames: 2048,
            extra: Vec::new(),
            free: Vec::new(),
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("not a TPACKET_V2 packet socket"),
        "{e}"
    );
}

/// An AF_XDP port handed to a successor (socket, UMEM memfd and XDP
/// objects through `SCM_RIGHTS`) goes on where the first stopped: the
/// program stays attached, every frame redirected meanwhile arrives once,
/// in order, and the successor sends from the free frames it was given.
#[test]
fn a_handed_over_xdp_socket_reads_on_from_where_its_port_stopped() {
    if !testkit::require::root_and(&["ip", "ping", "bash"]) {
        return;
    }
    let net = Netns::new("y");
    let pool = Pool::new(&PoolConfig::new("xdp-handover", 4096)).unwrap();
    let mut first = AfXdpPort::open("veth", &net.host, 0, pool).unwrap();
    let (mut sender, mut got, end) = first_datagrams(&net, &mut first);
    let h = first.handover().expect("af_xdp hands over").unwrap();
    assert_eq!(h.extra.len(), 4);
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let meta = h
        .free
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    {
        use std::os::fd::AsFd;
        let mut fds = vec![h.fd.as_fd()];
        fds.extend(h.extra.iter().map(|f| f.as_fd()));
        dataplane::port::fdpass::send(&mut a, meta.as_bytes(), &fds).unwrap();
    }
    drop(h);
    // The first process's port goes; the descriptors in flight keep the
    // socket, its memory and the program's link alive.
    drop(first);
    let (payload, mut fds) = dataplane::port::fdpass::recv(&mut b, 1 << 16).unwrap();
    let free: Vec<u64> = String::from_utf8(payload)
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let fd = fds.remove(0);
    let h = dataplane::port::Handover {
        fd,
        rx_next: 0,
        tx_next: 0,
        frame_size: 2048,
        frames: 4096,
        extra: fds,
        free,
    };
    let mut second = AfXdpPort::adopt("veth", &net.host, pool, h).unwrap();
    assert!(sender.wait().unwrap().success());
    while got.len() < N as usize {
        assert!(
            Instant::now() < end,
            "{} of {N} frames arrived: {:?}",
            got.len(),
            &got[got.len().saturating_sub(5)..]
        );
        let mut rx = Batch::new();
        second.rx_burst(&mut rx);
        seqs(&mut rx, &mut got);
    }
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
    net.exec(&["ip", "neigh", "del", "10.99.0.1", "dev", "eth0"]);
    answer_pings(&net, &mut second);
    // A UMEM of another geometry, a frame twice, or a packet socket are
    // refused by name.
    let h = second.handover().unwrap().unwrap();
    let e = AfXdpPort::adopt(
        "veth",
        &net.host,
        pool,
        dataplane::port::Handover { frames: 1024, ..h },
    )
    .unwrap_err();
    assert!(e.to_string().contains("1024 frames"), "{e}");
    let h = second.handover().unwrap().unwrap();
    let twice = vec![h.free[0], h.free[0]];
    let e = AfXdpPort::adopt(
        "veth",
        &net.host,
        pool,
        dataplane::port::Handover { free: twice, ..h },
    )
    .unwrap_err();
    assert!(e.to_string().contains("or twice"), "{e}");
    let packet = AfPacketPort::open("veth2", &net.host, pool).unwrap();
    let mut h = packet.handover().unwrap().unwrap();
    h.extra = second.handover().unwrap().unwrap().extra;
    let e = AfXdpPort::adopt("veth", &net.host, pool, h).unwrap_err();
    assert!(e.to_string().contains("not an AF_XDP socket"), "{e}");
    drop(second);
    // The last holder gone, the program is detached.
    let out = Command::new("ip")
        .args(["link", "show", &net.host])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("xdp"), "XDP still attached: {text}");
}
