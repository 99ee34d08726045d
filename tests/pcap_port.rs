//! The pcap driver: replaying a capture written by an independent writer
//! (pcap-file), recording transmitted packets in a file that tcpdump reads, and
//! a worker forwarding pcap-in to pcap-out with a rewrite.
//!
//! The tcpdump checks need `tcpdump` (`testkit::require`: scripts/test.sh
//! installs it; without it they say so, and under CI they fail).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::pcap::PcapPort;
use dataplane::worker::{Ctx, Pipeline, Worker};
use dataplane::{Batch, DropReason, MacAddr, PacketBuf, Port, PortError, parse, rewrite};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pollux-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pool(name: &str) -> Pool {
    let mut cfg = PoolConfig::new(name, 256);
    cfg.huge = HugePages::Never;
    Pool::new(&cfg).unwrap()
}

fn udp_frame(sport: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 1, 0, 4], [10, 1, 0, 100], 64)
        .udp(sport, 80)
        .write(&mut f, &vec![0xab; payload_len])
        .unwrap();
    f
}

fn write_capture(path: &Path, frames: &[Vec<u8>]) {
    let mut w = PcapWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    for (i, f) in frames.iter().enumerate() {
        w.write_packet(&PcapPacket::new(
            Duration::from_micros(i as u64),
            f.len() as u32,
            f,
        ))
        .unwrap();
    }
}

fn read_capture(path: &Path) -> Vec<Vec<u8>> {
    let mut r = PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

/// `tcpdump -nn -r FILE` output lines, or None (said why) if tcpdump is absent.
fn tcpdump(path: &Path) -> Option<Vec<String>> {
    if !testkit::require::tool("tcpdump") {
        return None;
    }
    let out = Command::new("tcpdump")
        .arg("-nn")
        .arg("-r")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tcpdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn replays_a_capture_and_records_what_it_sends() {
    let dir = tmpdir("pcap-replay");
    let (inp, out) = (dir.join("in.pcap"), dir.join("out.pcap"));
    let mut frames: Vec<_> = (0..50u16).map(|i| udp_frame(10000 + i, 18)).collect();
    frames[20] = udp_frame(999, 3000); // larger than a 2048-byte buffer
    write_capture(&inp, &frames);
    let pool = pool("pcap-replay");
    let mut port = PcapPort::open(
        "cap",
        MacAddr([2, 0, 0, 0, 0, 9]),
        Some(&inp),
        Some(&out),
        pool,
    )
    .unwrap();
    assert_eq!(port.info().driver, "pcap");

    let mut got = Vec::new();
    let mut b = Batch::new();
    while !port.rx_done() {
        port.rx_burst(&mut b);
        assert!(b.len() <= 32);
        got.extend(b.drain());
    }
    assert_eq!(port.rx_burst(&mut b), 0);
    assert_eq!(got.len(), 49);
    assert_eq!(port.stats().drops.get(DropReason::RxOversize), 1);
    assert_eq!(port.rx_errors(), 0);
    let expect: Vec<_> = frames
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 20)
        .map(|(_, f)| f.clone())
        .collect();
    let data: Vec<_> = got.iter().map(|p| p.data().to_vec()).collect();
    assert_eq!(data, expect);

    let mut sent = 0;
    let mut it = got.into_iter();
    loop {
        let mut tx = Batch::new();
        for p in it.by_ref().take(32) {
            tx.push(p).unwrap();
        }
        if tx.is_empty() {
            break;
        }
        sent += port.tx_burst(&mut tx);
    }
    assert_eq!(sent, 49);
    port.flush().unwrap();
    assert_eq!(read_capture(&out), expect);
    assert_eq!(port.stats().snapshot().tx_packets, 49);
    drop(port);
    assert_eq!(pool.available(), pool.capacity());

    if let Some(lines) = tcpdump(&out) {
        assert_eq!(lines.len(), 49, "{lines:?}");
        assert!(
            lines[0].contains("10.1.0.4.10000 > 10.1.0.100.80: UDP, length 18"),
            "{}",
            lines[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn open_errors_name_the_port_and_file() {
    let dir = tmpdir("pcap-errors");
    let pool = pool("pcap-errors");
    let mac = MacAddr([2, 0, 0, 0, 0, 9]);
    let missing = dir.join("missing.pcap");
    let e = PcapPort::open("p1", mac, Some(&missing), None, pool).unwrap_err();
    assert!(matches!(e, PortError::Open { .. }));
    assert!(
        e.to_string().contains("p1") && e.to_string().contains("missing.pcap"),
        "{e}"
    );

    let junk = dir.join("junk.pcap");
    std::fs::write(&junk, b"this is not a capture file at all").unwrap();
    let e = PcapPort::open("p2", mac, Some(&junk), None, pool).unwrap_err();
    assert!(matches!(e, PortError::BadPcap { .. }), "{e}");
    assert!(e.to_string().contains("junk.pcap"), "{e}");

    let e = PcapPort::open("p3", mac, None, None, pool).unwrap_err();
    assert!(matches!(e, PortError::BadConfig { .. }), "{e}");

    let e = PcapPort::open(
        "p4",
        mac,
        None,
        Some(&dir.join("no/such/dir/out.pcap")),
        pool,
    )
    .unwrap_err();
    assert!(matches!(e, PortError::Open { .. }), "{e}");

    // A record cut short at the end of the file stops the replay and is counted.
    let cut = dir.join("cut.pcap");
    write_capture(&cut, &[udp_frame(1, 18), udp_frame(2, 18)]);
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let mut port = PcapPort::open("p5", mac, Some(&cut), None, pool).unwrap();
    let mut b = Batch::new();
    assert_eq!(port.rx_burst(&mut b), 1);
    assert!(port.rx_done());
    assert_eq!(port.rx_errors(), 1);
    // Transmitting on a port with no output file drops and counts.
    assert_eq!(port.tx_burst(&mut b), 0);
    assert_eq!(port.stats().drops.get(DropReason::NoRoute), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// pcap-in (port 0) -> DNAT to 10.1.0.5:8080 -> pcap-out (port 1).
struct Dnat;

impl Pipeline<PoolBuf> for Dnat {
    fn process(&mut self, ctx: &mut Ctx<'_, PoolBuf>, in_port: usize, pkts: &mut Batch<PoolBuf>) {
        for mut pkt in pkts.drain() {
            match parse(pkt.data(), in_port as u16) {
                Ok(p) => {
                    let f = pkt.data_mut();
                    let ok = rewrite::set_ipv4_dst(f, &p, Ipv4Addr::new(10, 1, 0, 5))
                        .and_then(|_| rewrite::set_dst_port(f, &p, 8080));
                    match ok {
                        Ok(()) => ctx.send(1, pkt),
                        Err(_) => ctx.drop_packet(pkt, DropReason::NoRoute),
                    }
                }
                Err(e) => ctx.drop_packet(pkt, e.into()),
            }
        }
    }
}

#[test]
fn worker_forwards_pcap_to_pcap_and_tcpdump_checks_checksums() {
    let dir = tmpdir("pcap-worker");
    let (inp, out) = (dir.join("in.pcap"), dir.join("out.pcap"));
    let mut frames: Vec<_> = (0..100u16).map(|i| udp_frame(20000 + i, 32)).collect();
    frames.push(frames[0][..30].to_vec()); // truncated IPv4
    write_capture(&inp, &frames);
    let pool = pool("pcap-worker");
    let mac = MacAddr([2, 0, 0, 0, 0, 9]);
    let rx = PcapPort::open("in", mac, Some(&inp), None, pool).unwrap();
    let tx = PcapPort::open("out", mac, None, Some(&out), pool).unwrap();
    let worker = Worker::new("pcap-w", None, vec![Box::new(rx), Box::new(tx)], Dnat);
    let (stop, stats) = (worker.stop_flag(), worker.stats());
    let h = worker.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.rx_packets.load(Ordering::Relaxed) < 101 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    drop(h.join().unwrap().unwrap()); // drops the ports: flushes out.pcap
    assert_eq!(stats.rx_packets.load(Ordering::Relaxed), 101);
    assert_eq!(
        stats.drops.get(dataplane::ParseError::Ipv4Truncated.into()),
        1
    );
    let written = read_capture(&out);
    assert_eq!(written.len(), 100);
    if let Some(lines) = tcpdump(&out) {
        assert_eq!(lines.len(), 100);
        assert!(
            lines[0].contains("10.1.0.4.20000 > 10.1.0.5.8080: UDP, length 32"),
            "{}",
            lines[0]
        );
    }
    // tcpdump -vv verifies the UDP checksum; a wrong one prints "bad udp cksum".
    if let Ok(o) = Command::new("tcpdump")
        .args(["-nn", "-vv", "-r"])
        .arg(&out)
        .output()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(!text.contains("bad"), "{text}");
        assert_eq!(text.matches("[udp sum ok]").count(), 100, "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A running worker's pcap output holds what it sent so far, though the
/// file's buffer is far from full and no more frames come: the worker's
/// periodic kick writes it out.
#[test]
fn a_running_workers_pcap_output_holds_what_it_sent() {
    let dir = tmpdir("pcap-kick");
    let (inp, out) = (dir.join("in.pcap"), dir.join("out.pcap"));
    let frames: Vec<_> = (0..20u16).map(|i| udp_frame(20000 + i, 32)).collect();
    write_capture(&inp, &frames);
    let pool = pool("pcap-kick");
    let mac = MacAddr([2, 0, 0, 0, 0, 9]);
    let rx = PcapPort::open("in", mac, Some(&inp), None, pool).unwrap();
    let tx = PcapPort::open("out", mac, None, Some(&out), pool).unwrap();
    let worker = Worker::new("pcap-k", None, vec![Box::new(rx), Box::new(tx)], Dnat);
    let stop = worker.stop_flag();
    let h = worker.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut written = 0;
    while written < 20 {
        assert!(
            Instant::now() < deadline,
            "the output held {written} of the 20 frames sent"
        );
        std::thread::sleep(Duration::from_millis(5));
        // (Nothing at all, not even the file's header, until a first write.)
        if std::fs::metadata(&out).unwrap().len() > 0 {
            written = read_capture(&out).len();
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(h.join().unwrap().unwrap());
    assert_eq!(read_capture(&out).len(), 20);
    let _ = std::fs::remove_dir_all(&dir);
}
