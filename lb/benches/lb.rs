//! Load balancer benches: Maglev table build for 10, 100 and 1 000 backends,
//! backend lookups per second, and new connections per second through
//! connection tracking + DNAT on one core.
//!
//! Run: `cargo bench -p lb --bench lb`. Results go in docs/performance.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dataplane::FlowKey;
use lb::maglev::{DEFAULT_TABLE_SIZE, MaglevBackend, MaglevTable};
use lb::{Backend, Decision, LbCore, Timeouts, Vip, VipConfig, Vips};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            key: format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256).into_bytes(),
            weight: 1 + (i % 3) as u32,
            id: i as u16,
        })
        .collect()
}

fn client(i: u32) -> FlowKey {
    FlowKey::new(
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i >> 8))),
        1024 + (i & 0xff) as u16 * 200,
        "10.1.0.100".parse().unwrap(),
        80,
        6,
    )
}

fn vips(n: usize) -> Vips {
    let bs = (0..n)
        .map(|i| Backend {
            ip: IpAddr::V4(Ipv4Addr::new(10, 2, (i / 256) as u8, (i % 256) as u8)),
            port: 8080,
            weight: 1,
        })
        .collect();
    let mut v = Vips::new();
    v.insert(
        Vip::new(
            VipConfig::new("bench", "10.1.0.100".parse().unwrap(), 80, 6, bs),
            &[],
        )
        .unwrap(),
    );
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20);
    for n in [10usize, 100, 1000] {
        let bs = backends(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &bs, |b, bs| {
            b.iter(|| black_box(MaglevTable::build(bs, DEFAULT_TABLE_SIZE).unwrap()))
        });
    }
    g.finish();

    let v = vips(100);
    let keys: Vec<FlowKey> = (0..4096).map(client).collect();
    let vip = v.lookup(&keys[0]).unwrap().clone();
    let mut g = c.benchmark_group("maglev_lookup");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("100_backends", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for k in &keys {
                acc += vip.pick(black_box(k)).unwrap();
            }
            black_box(acc)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("new_connections");
    g.throughput(Throughput::Elements(1));
    g.bench_function("conntrack_dnat", |b| {
        b.iter_custom(|iters| {
            // Fresh tables per chunk (built outside the timed part), so every
            // timed packet opens a new connection in a table that has room.
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = (iters - done).min(1 << 20);
                let mut core = LbCore::new(n as usize, Timeouts::default(), None);
                let keys: Vec<FlowKey> = (0..n as u32).map(client).collect();
                let t = Instant::now();
                for k in &keys {
                    match core.process(&v, k, 0x02, 0) {
                        Decision::Forward { new: true, .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
                total += t.elapsed();
                done += n;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
