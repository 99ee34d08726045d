//! Core benchmark: parse + rewrite + ring forward of 64-byte packets on one core.
//!
//! Run: `cargo bench --bench forward`. Results go in docs/performance.md.
//!
//! - `parse/64B`: parsing one frame into offsets and flow key;
//! - `parse_rewrite/64B`: parse, then a DNAT-style rewrite (both MACs, IPv4
//!   destination, UDP destination port with incremental checksums, TTL);
//! - `ring_forward/64B`: the whole loop one worker core would run — allocate
//!   and fill 32 buffers from a pool and send them into a ring port (the
//!   "generator"), `rx_burst` them on the switch side, parse + rewrite each,
//!   `tx_burst` to the output ring, `rx_burst` at the sink and free them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dataplane::pool::{Pool, PoolConfig};
use dataplane::port::ring;
use dataplane::{BURST, Batch, DropReason, LinkInfo, MacAddr, PacketBuf, Port, parse, rewrite};
use std::hint::black_box;
use std::net::Ipv4Addr;

/// A 60-byte Ethernet/IPv4/UDP frame: 64 bytes on the wire with the FCS.
fn template() -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv4([10, 1, 0, 4], [10, 1, 0, 100], 64)
        .udp(40000, 80)
        .write(&mut f, &[0u8; 18])
        .unwrap();
    assert_eq!(f.len(), 60);
    f
}

const GW: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
const DIP_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 5]);
const DIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);

#[inline]
fn process(frame: &mut [u8]) -> Result<(), DropReason> {
    let p = parse(frame, 0)?;
    let ok = rewrite::set_dst_mac(frame, DIP_MAC)
        .and_then(|_| rewrite::set_src_mac(frame, GW))
        .and_then(|_| rewrite::set_ipv4_dst(frame, &p, DIP))
        .and_then(|_| rewrite::set_dst_port(frame, &p, 8080))
        .and_then(|_| rewrite::dec_ttl(frame, &p));
    ok.map_err(|_| DropReason::TtlExpired)
}

fn bench(c: &mut Criterion) {
    let tpl = template();

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("64B", |b| {
        b.iter(|| black_box(parse(black_box(&tpl), 0)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("parse_rewrite");
    g.throughput(Throughput::Elements(1));
    let mut frame = tpl.clone();
    g.bench_function("64B", |b| {
        b.iter(|| {
            frame.copy_from_slice(&tpl);
            process(black_box(&mut frame)).unwrap();
        })
    });
    g.finish();

    let pool = Pool::new(&PoolConfig::new("bench", 4096)).unwrap();
    println!("pool: huge pages = {}", pool.is_huge());
    let mac = |i| MacAddr([2, 0, 0, 0, 0, i]);
    let (mut gen_tx, mut sw_in) = ring::pair(
        LinkInfo::new("gen", mac(1), "ring"),
        LinkInfo::new("sw-in", mac(2), "ring"),
        1024,
    );
    let (mut sw_out, mut sink) = ring::pair(
        LinkInfo::new("sw-out", mac(3), "ring"),
        LinkInfo::new("sink", mac(4), "ring"),
        1024,
    );
    let mut g = c.benchmark_group("ring_forward");
    g.throughput(Throughput::Elements(BURST as u64));
    let (mut a, mut rx, mut tx, mut s) = (Batch::new(), Batch::new(), Batch::new(), Batch::new());
    g.bench_function("64B", |b| {
        b.iter(|| {
            for _ in 0..BURST {
                let mut buf = pool.alloc().unwrap();
                buf.append(tpl.len()).unwrap().copy_from_slice(&tpl);
                a.push(buf).unwrap();
            }
            gen_tx.tx_burst(&mut a);
            sw_in.rx_burst(&mut rx);
            for mut pkt in rx.drain() {
                if process(pkt.data_mut()).is_ok() {
                    let _ = tx.push(pkt);
                }
            }
            sw_out.tx_burst(&mut tx);
            let n = sink.rx_burst(&mut s);
            s.clear();
            black_box(n)
        })
    });
    g.finish();
    assert_eq!(sw_out.stats().drops.total(), 0);
}

criterion_group!(benches, bench);
criterion_main!(benches);
