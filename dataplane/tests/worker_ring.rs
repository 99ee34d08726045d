//! A worker thread forwarding between ring ports: the pipeline parses, DNATs
//! and forwards; malformed and expiring packets are dropped and counted by
//! reason; nothing leaks back from the pool.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::{Ctx, Pipeline, Worker, WorkerError};
use dataplane::{
    Batch, DropReason, LinkInfo, MacAddr, PacketBuf, ParseError, Port, parse, rewrite,
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
const DIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const GW: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
const DIP_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 5]);

/// Port 0 -> port 1 with DNAT VIP:80 -> DIP:8080; port 1 -> port 0 untouched.
struct Dnat;

impl Pipeline<PoolBuf> for Dnat {
    fn process(&mut self, ctx: &mut Ctx<'_, PoolBuf>, in_port: usize, pkts: &mut Batch<PoolBuf>) {
        for mut pkt in pkts.drain() {
            let p = match parse(pkt.data(), in_port as u16) {
                Ok(p) => p,
                Err(e) => {
                    ctx.drop_packet(pkt, e.into());
                    continue;
                }
            };
            if in_port == 1 {
                ctx.send(0, pkt);
                continue;
            }
            let f = pkt.data_mut();
            let r = rewrite::dec_ttl(f, &p)
                .and_then(|_| rewrite::set_dst_mac(f, DIP_MAC))
                .and_then(|_| rewrite::set_src_mac(f, GW))
                .and_then(|_| rewrite::set_ipv4_dst(f, &p, DIP))
                .and_then(|_| rewrite::set_dst_port(f, &p, 8080));
            match r {
                Ok(()) => ctx.send(1, pkt),
                Err(_) => ctx.drop_packet(pkt, DropReason::TtlExpired),
            }
        }
    }
}

fn udp_frame(sport: u16, ttl: u8) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], GW.0)
        .ipv4([10, 1, 0, 4], VIP.octets(), ttl)
        .udp(sport, 80)
        .write(&mut f, &sport.to_be_bytes())
        .unwrap();
    f
}

fn small_pool(name: &str, n: usize) -> Pool {
    let mut cfg = PoolConfig::new(name, n);
    cfg.huge = HugePages::Never;
    Pool::new(&cfg).unwrap()
}

fn pairs() -> (
    RingPort<PoolBuf>,
    RingPort<PoolBuf>,
    RingPort<PoolBuf>,
    RingPort<PoolBuf>,
) {
    let l = |n: &str, i| LinkInfo::new(n, MacAddr([2, 0, 0, 0, 1, i]), "ring");
    let (vm_a, sw_a) = ring::pair(l("vm-a", 1), l("sw-a", 2), 4096);
    let (vm_b, sw_b) = ring::pair(l("vm-b", 3), l("sw-b", 4), 4096);
    (vm_a, sw_a, vm_b, sw_b)
}

fn send_all(port: &mut RingPort<PoolBuf>, pool: &Pool, frames: &[Vec<u8>]) {
    for chunk in frames.chunks(32) {
        let mut b = Batch::new();
        for f in chunk {
            b.push(pool.alloc_copy(f).unwrap()).unwrap();
        }
        assert_eq!(port.tx_burst(&mut b), chunk.len());
    }
}

fn receive(port: &mut RingPort<PoolBuf>, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    let mut b = Batch::new();
    while got.len() < want && Instant::now() < deadline {
        if port.rx_burst(&mut b) == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
        got.extend(b.drain().map(|p| p.data().to_vec()));
    }
    got
}

fn assert_valid_dnat(frame: &[u8]) -> u16 {
    let s = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &s.net else {
        panic!("not ipv4")
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    assert_eq!(h.destination, DIP.octets());
    assert_eq!(h.time_to_live, 63);
    let Some(TransportSlice::Udp(u)) = &s.transport else {
        panic!("not udp")
    };
    let uh = u.to_header();
    assert_eq!(uh.destination_port, 8080);
    assert_eq!(uh.checksum, uh.calc_checksum_ipv4(&h, u.payload()).unwrap());
    assert_eq!(&frame[0..6], &DIP_MAC.0);
    uh.source_port
}

#[test]
fn worker_forwards_rewrites_and_counts_drops() {
    let pool = small_pool("worker-fwd", 4096);
    let (mut vm_a, sw_a, mut vm_b, sw_b) = pairs();
    let (sw_a_stats, sw_b_stats) = (sw_a.stats().clone(), sw_b.stats().clone());
    let worker = Worker::new("w0", Some(0), vec![Box::new(sw_a), Box::new(sw_b)], Dnat);
    let (stop, stats) = (worker.stop_flag(), worker.stats());
    let handle = worker.spawn().unwrap();

    let good: Vec<_> = (0..1000u16).map(|i| udp_frame(10000 + i, 64)).collect();
    let mut truncated = udp_frame(1, 64);
    truncated.truncate(30);
    let mut lying = udp_frame(2, 64);
    lying[16..18].copy_from_slice(&200u16.to_be_bytes()); // total length > frame
    let expiring = udp_frame(3, 1);
    let mut bad: Vec<Vec<u8>> = vec![truncated; 10];
    bad.extend(vec![lying; 7]);
    bad.extend(vec![expiring; 5]);

    send_all(&mut vm_a, &pool, &good[..500]);
    send_all(&mut vm_a, &pool, &bad);
    send_all(&mut vm_a, &pool, &good[500..]);
    let out = receive(&mut vm_b, 1000);
    assert_eq!(out.len(), 1000);
    let mut ports: Vec<u16> = out.iter().map(|f| assert_valid_dnat(f)).collect();
    // The ring keeps order.
    assert!(ports.windows(2).all(|w| w[0] < w[1]));
    ports.dedup();
    assert_eq!(ports.len(), 1000);

    // The reverse direction passes through untouched.
    send_all(&mut vm_b, &pool, &good[..3]);
    let back = receive(&mut vm_a, 3);
    assert_eq!(back, good[..3].to_vec());

    stop.store(true, Ordering::Relaxed);
    let stopped = handle.join().unwrap().unwrap();
    assert_eq!(stopped.ports.len(), 2);

    assert_eq!(stats.rx_packets.load(Ordering::Relaxed), 1000 + 22 + 3);
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 1003);
    assert_eq!(stats.drops.get(ParseError::Ipv4Truncated.into()), 10);
    assert_eq!(stats.drops.get(ParseError::Ipv4BadTotalLen.into()), 7);
    assert_eq!(stats.drops.get(DropReason::TtlExpired), 5);
    assert_eq!(stats.drops.total(), 22);
    assert!(stats.busy_polls.load(Ordering::Relaxed) > 0);
    assert!(stats.idle_polls.load(Ordering::Relaxed) > 0);
    // Cycle accounting: every packet received is in one burst of its
    // size, and the pipeline's ticks are part of the busy ones.
    let in_bursts: u64 = stats
        .rx_bursts
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1) * n.load(Ordering::Relaxed))
        .sum();
    assert_eq!(in_bursts, 1000 + 22 + 3);
    let (busy, pipeline) = (
        stats.busy_ticks.load(Ordering::Relaxed),
        stats.pipeline_ticks.load(Ordering::Relaxed),
    );
    assert!(pipeline > 0 && pipeline < busy, "{pipeline} of {busy}");
    let io = stats.io_ticks.load(Ordering::Relaxed);
    assert_eq!(
        io + pipeline,
        busy,
        "I/O and pipeline make up the busy ticks"
    );
    assert_eq!(sw_a_stats.snapshot().rx_packets, 1022);
    assert_eq!(sw_b_stats.snapshot().tx_packets, 1000);
    assert_eq!(
        sw_b_stats.snapshot().tx_bytes,
        out.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    drop(stopped);
    // Every buffer is back: nothing leaked on any path.
    assert_eq!(pool.available(), pool.capacity());
}

/// Sends everything to a port that does not exist and leaves some packets in
/// the batch: both are counted as `no_route`, and nothing leaks.
struct Careless;

impl Pipeline<PoolBuf> for Careless {
    fn process(&mut self, ctx: &mut Ctx<'_, PoolBuf>, _in_port: usize, pkts: &mut Batch<PoolBuf>) {
        if let Some(p) = pkts.pop() {
            ctx.send(ctx.n_ports() + 5, p);
        }
    }
}

#[test]
fn unsent_packets_are_counted_not_leaked() {
    let pool = small_pool("worker-careless", 256);
    let (mut vm_a, sw_a, _vm_b, sw_b) = pairs();
    let worker = Worker::new("w1", None, vec![Box::new(sw_a), Box::new(sw_b)], Careless);
    let (stop, stats) = (worker.stop_flag(), worker.stats());
    let handle = worker.spawn().unwrap();
    let frames: Vec<_> = (0..100).map(|i| udp_frame(i, 64)).collect();
    send_all(&mut vm_a, &pool, &frames);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.available() < pool.capacity() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    drop(handle.join().unwrap().unwrap());
    assert_eq!(stats.drops.get(DropReason::NoRoute), 100);
    assert_eq!(pool.available(), pool.capacity());
}

#[test]
fn pinning_to_a_missing_core_is_a_clear_error() {
    let (_a, sw_a, _b, _sw_b) = pairs();
    let worker = Worker::new("w-bad", Some(100_000), vec![Box::new(sw_a)], Careless);
    let err = match worker.run() {
        Err(e) => e,
        Ok(_) => panic!("pinned to core 100000"),
    };
    assert!(matches!(err, WorkerError::NoSuchCore { core: 100_000, .. }));
    assert!(err.to_string().contains("w-bad"), "{err}");
}

#[test]
fn an_idle_worker_with_a_sleep_sleeps_and_still_forwards() {
    let pool = small_pool("worker-sleepy", 256);
    let (mut vm_a, sw_a, mut vm_b, sw_b) = pairs();
    let worker = Worker::new("w-sleep", None, vec![Box::new(sw_a), Box::new(sw_b)], Dnat)
        .with_idle_sleep(Duration::from_micros(200));
    let (stop, stats) = (worker.stop_flag(), worker.stats());
    let handle = worker.spawn().unwrap();
    // Nothing arrives: it sleeps, again and again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.idle_sleeps.load(Ordering::Relaxed) < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(stats.idle_sleeps.load(Ordering::Relaxed) >= 10);
    // Then packets come, and all of them are forwarded.
    let frames: Vec<_> = (0..50).map(|i| udp_frame(1000 + i, 64)).collect();
    send_all(&mut vm_a, &pool, &frames);
    let got = receive(&mut vm_b, 50);
    assert_eq!(got.len(), 50);
    stop.store(true, Ordering::Relaxed);
    drop(handle.join().unwrap().unwrap());
}
