//! Classifier benches: lookups per second at 10, 100, 1 000 and 10 000 rules,
//! and the compile time of 10 000 rules.
//!
//! Run: `cargo bench -p filter --bench classify`. Results go in docs/performance.md.
//!
//! Rule sets are random but shaped like real security groups (seeded, so every
//! run sees the same sets): prefixes of lengths /8 to /32, mostly inside
//! 10.0.0.0/8 with some public ones; 45% TCP, 25% UDP, 10% ICMP, 20% any;
//! destination ports mostly single ports, some ranges, some any; source ports
//! mostly any; 60% allow; the three Azure default rules at the bottom. Half of
//! the packets are drawn from inside a random rule's prefixes and ports, half
//! from anywhere in 10.0.0.0/8.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dataplane::FlowKey;
use filter::{
    Action, Classifier, DefaultContext, Direction, PortRange, Protocol, Rule, default_rules,
};
use ipnet::{IpNet, Ipv4Net};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

/// SplitMix64: a tiny seeded generator, so the bench needs no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn prefix(rng: &mut Rng) -> IpNet {
    let len = [8u8, 12, 16, 16, 20, 24, 24, 24, 28, 32, 32][rng.below(11) as usize];
    let addr = if rng.pct(85) {
        (10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff)
    } else {
        rng.next() as u32
    };
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc())
}

fn any() -> Vec<IpNet> {
    vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]
}

fn ports(rng: &mut Rng, any_pct: u64) -> Vec<PortRange> {
    if rng.pct(any_pct) {
        return vec![PortRange::ANY];
    }
    (0..1 + rng.below(2))
        .map(|_| {
            if rng.pct(75) {
                let p = [22u16, 53, 80, 443, 3306, 5432, 6379, 8080, 8443][rng.below(9) as usize];
                let p = if rng.pct(50) {
                    p
                } else {
                    1024 + rng.below(60000) as u16
                };
                PortRange { lo: p, hi: p }
            } else {
                let lo = rng.below(60000) as u16;
                PortRange {
                    lo,
                    hi: lo + rng.below(2000) as u16,
                }
            }
        })
        .collect()
}

fn rules(n: usize, seed: u64) -> Vec<Rule> {
    let mut rng = Rng(seed);
    let mut out: Vec<Rule> = (0..n)
        .map(|i| {
            let protocol = match rng.below(100) {
                0..45 => Protocol::Tcp,
                45..70 => Protocol::Udp,
                70..80 => Protocol::Icmp,
                _ => Protocol::Any,
            };
            let src = if rng.pct(30) {
                any()
            } else {
                (0..1 + rng.below(3)).map(|_| prefix(&mut rng)).collect()
            };
            let dst = if rng.pct(20) {
                any()
            } else {
                (0..1 + rng.below(2)).map(|_| prefix(&mut rng)).collect()
            };
            let (src_ports, dst_ports) = if protocol == Protocol::Icmp {
                (vec![PortRange::ANY], vec![PortRange::ANY])
            } else {
                (ports(&mut rng, 90), ports(&mut rng, 10))
            };
            let allow = rng.pct(60);
            Rule {
                name: format!("r{i}"),
                priority: 100 + i as u32,
                direction: Direction::In,
                action: if allow { Action::Allow } else { Action::Deny },
                protocol,
                src,
                dst,
                src_ports,
                dst_ports,
                stateful: allow,
            }
        })
        .collect();
    out.extend(default_rules(
        Direction::In,
        &DefaultContext::for_vnet(vec!["10.1.0.0/16".parse().unwrap()]),
    ));
    out
}

fn inside(rng: &mut Rng, nets: &[IpNet]) -> IpAddr {
    let IpNet::V4(n) = nets[rng.below(nets.len() as u64) as usize] else {
        return IpAddr::V4(Ipv4Addr::from(
            (10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff),
        ));
    };
    let host_bits = 32 - u32::from(n.prefix_len());
    let mask = if host_bits == 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    IpAddr::V4(Ipv4Addr::from(
        u32::from(n.network()) | (rng.next() as u32 & mask),
    ))
}

fn packets(rules: &[Rule], n: usize, seed: u64) -> Vec<FlowKey> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            if rng.pct(50) {
                let r = &rules[rng.below(rules.len() as u64) as usize];
                let proto = match r.protocol {
                    Protocol::Tcp => 6,
                    Protocol::Udp => 17,
                    Protocol::Icmp => 1,
                    Protocol::Any => [6, 17, 1][rng.below(3) as usize],
                };
                let pr = |rng: &mut Rng, v: &[PortRange]| {
                    let p = v[rng.below(v.len() as u64) as usize];
                    p.lo + (rng.below(u64::from(p.hi - p.lo) + 1) as u16)
                };
                let src = inside(&mut rng, &r.src);
                let sp = pr(&mut rng, &r.src_ports);
                let dst = inside(&mut rng, &r.dst);
                FlowKey::new(src, sp, dst, pr(&mut rng, &r.dst_ports), proto)
            } else {
                let a = |rng: &mut Rng| {
                    IpAddr::V4(Ipv4Addr::from(
                        (10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff),
                    ))
                };
                let (src, dst) = (a(&mut rng), a(&mut rng));
                let proto = [6, 17, 1][rng.below(3) as usize];
                FlowKey::new(src, rng.next() as u16, dst, rng.next() as u16, proto)
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    for n in [10usize, 100, 1000, 10_000] {
        let rs = rules(n, 42 + n as u64);
        let cls = Classifier::new(rs.clone());
        let pkts = packets(&rs, 4096, 7);
        // Sanity: the classifier agrees with the linear scan on this workload.
        for p in pkts.iter().take(256) {
            let want = filter::linear_scan(cls.rules(), p);
            assert_eq!(cls.classify(p).map(|v| v.rule), want);
        }
        println!(
            "{n} rules: classes per field [proto, src4, dst4, src6, dst6, sport, dport] = {:?}",
            cls.class_counts()
        );
        g.throughput(Throughput::Elements(pkts.len() as u64));
        g.bench_with_input(BenchmarkId::new("lookup", n), &pkts, |b, pkts| {
            b.iter(|| {
                let mut allow = 0u32;
                for p in pkts {
                    if let Some(v) = cls.classify(black_box(p)) {
                        allow += u32::from(v.action == Action::Allow);
                    }
                }
                black_box(allow)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    let rs = rules(10_000, 99);
    g.bench_function("10000_rules", |b| {
        b.iter(|| black_box(Classifier::new(black_box(rs.clone()))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
