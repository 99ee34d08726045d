//! Rule sets and traces in the file formats of DPDK's `dpdk-test-acl`
//! (ClassBench's IPv4 5-tuple), and the same rules as pollux [`Rule`]s, so
//! that rte_acl and pollux's classifier can be given the same work and
//! their answers compared.
//!
//! Rule file: one rule a line, `@src/len dst/len sport_lo : sport_hi
//! dport_lo : dport_hi proto/mask`; the earlier line wins (rte_acl's
//! priority falls and its userdata, the rule's 1-based line, rises down the
//! file). Trace file: `src dst sport dport proto`, addresses as 32-bit
//! numbers. Only TCP and UDP packets, so that a rule of any protocol means
//! the same to both (ports compared for every packet).

use dataplane::FlowKey;
use filter::{Action, Direction, PortRange, Protocol, Rule};
use ipnet::{IpNet, Ipv4Net};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

/// A trace packet: source, destination, source port, destination port,
/// protocol.
pub type Packet = (u32, u32, u16, u16, u8);

/// SplitMix64, seeded: every run makes the same sets.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// One 5-tuple rule, as both classifiers take it.
#[derive(Debug, Clone, Copy)]
pub struct AclRule {
    pub src: Ipv4Net,
    pub dst: Ipv4Net,
    pub sport: (u16, u16),
    pub dport: (u16, u16),
    /// 6, 17, or `None` for any.
    pub proto: Option<u8>,
}

fn prefix(rng: &mut Rng, any_pct: u64) -> Ipv4Net {
    if rng.pct(any_pct) {
        return Ipv4Net::default();
    }
    let len = [8u8, 12, 16, 16, 20, 24, 24, 24, 28, 32, 32][rng.below(11) as usize];
    let addr = if rng.pct(85) {
        (10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff)
    } else {
        rng.next() as u32
    };
    Ipv4Net::new(Ipv4Addr::from(addr), len)
        .map(|n| n.trunc())
        .unwrap_or_default()
}

fn ports(rng: &mut Rng, any_pct: u64) -> (u16, u16) {
    if rng.pct(any_pct) {
        return (0, u16::MAX);
    }
    if rng.pct(75) {
        let p = [22u16, 53, 80, 443, 3306, 5432, 6379, 8080, 8443][rng.below(9) as usize];
        let p = if rng.pct(50) {
            p
        } else {
            1024 + rng.below(60000) as u16
        };
        (p, p)
    } else {
        let lo = rng.below(60000) as u16;
        (lo, lo + rng.below(2000) as u16)
    }
}

/// `n` rules shaped like security groups (the classifier bench's shapes).
pub fn rules(n: usize, seed: u64) -> Vec<AclRule> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let proto = match rng.below(100) {
                0..45 => Some(6),
                45..80 => Some(17),
                _ => None,
            };
            // No rule matches every packet of a protocol (the rules below
            // it would never be reached): a rule of any protocol names its
            // source, narrower than a /8.
            let mut src = prefix(&mut rng, if proto.is_some() { 30 } else { 0 });
            while proto.is_none() && src.prefix_len() <= 8 {
                src = prefix(&mut rng, 0);
            }
            let dst = prefix(&mut rng, 20);
            // Nor does one whose addresses both cover the trace's 10.0.0.0/8
            // (its destination port is named).
            let wide = src.prefix_len() <= 8 && dst.prefix_len() <= 8;
            let (sport, dport) = if proto.is_some() {
                (
                    ports(&mut rng, 90),
                    ports(&mut rng, if wide { 0 } else { 10 }),
                )
            } else {
                ((0, u16::MAX), (0, u16::MAX))
            };
            AclRule {
                src,
                dst,
                sport,
                dport,
                proto,
            }
        })
        .collect()
}

fn inside(rng: &mut Rng, n: Ipv4Net) -> u32 {
    let host_bits = 32 - u32::from(n.prefix_len());
    let mask = if host_bits == 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    u32::from(n.network()) | (rng.next() as u32 & mask)
}

/// `m` packets: half inside a random rule's fields, half anywhere in
/// 10.0.0.0/8; TCP or UDP. (src, dst, sport, dport, proto).
pub fn trace(rules: &[AclRule], m: usize, seed: u64) -> Vec<Packet> {
    let mut rng = Rng(seed);
    (0..m)
        .map(|_| {
            if rng.pct(50) && !rules.is_empty() {
                let r = rules[rng.below(rules.len() as u64) as usize];
                let proto = r.proto.unwrap_or([6, 17][rng.below(2) as usize]);
                let pr = |rng: &mut Rng, (lo, hi): (u16, u16)| {
                    lo + rng.below(u64::from(hi - lo) + 1) as u16
                };
                let src = inside(&mut rng, r.src);
                let dst = inside(&mut rng, r.dst);
                let sp = pr(&mut rng, r.sport);
                (src, dst, sp, pr(&mut rng, r.dport), proto)
            } else {
                let a = |rng: &mut Rng| (10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff);
                let (src, dst) = (a(&mut rng), a(&mut rng));
                let proto = [6, 17][rng.below(2) as usize];
                (src, dst, rng.next() as u16, rng.next() as u16, proto)
            }
        })
        .collect()
}

/// The rule file `dpdk-test-acl --rulesf` reads.
pub fn rule_file(rules: &[AclRule]) -> String {
    let mut s = String::new();
    for r in rules {
        let (proto, mask) = r.proto.map_or((0, 0), |p| (p, 0xff));
        let _ = writeln!(
            s,
            "@{}/{}\t{}/{}\t{} : {}\t{} : {}\t0x{:02x}/0x{:02x}",
            r.src.network(),
            r.src.prefix_len(),
            r.dst.network(),
            r.dst.prefix_len(),
            r.sport.0,
            r.sport.1,
            r.dport.0,
            r.dport.1,
            proto,
            mask
        );
    }
    s
}

/// The trace file `dpdk-test-acl --tracef` reads.
pub fn trace_file(trace: &[Packet]) -> String {
    let mut s = String::new();
    for (src, dst, sp, dp, proto) in trace {
        let _ = writeln!(s, "0x{src:08x}\t0x{dst:08x}\t{sp}\t{dp}\t{proto}");
    }
    s
}

/// Parses a rule file back (what the example's `run` reads).
pub fn parse_rules(text: &str) -> Result<Vec<AclRule>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("rule line {}: cannot read {line:?}", i + 1);
        let t: Vec<&str> = line.trim_start_matches('@').split_whitespace().collect();
        let [src, dst, slo, ":", shi, dlo, ":", dhi, proto] = t[..] else {
            return Err(bad());
        };
        let num = |s: &str| -> Result<u64, String> {
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            }
            .map_err(|_| bad())
        };
        let port = |s: &str| num(s).and_then(|v| u16::try_from(v).map_err(|_| bad()));
        let (p, m) = proto.split_once('/').ok_or_else(bad)?;
        // Only what both classifiers mean the same by: TCP or UDP
        // exactly, or any protocol.
        let proto = match (num(p)?, num(m)?) {
            (_, 0) => None,
            (6, 0xff) => Some(6),
            (17, 0xff) => Some(17),
            _ => return Err(format!("{}: only 6/0xff, 17/0xff or any (mask 0)", bad())),
        };
        out.push(AclRule {
            src: src.parse().map_err(|_| bad())?,
            dst: dst.parse().map_err(|_| bad())?,
            sport: (port(slo)?, port(shi)?),
            dport: (port(dlo)?, port(dhi)?),
            proto,
        });
    }
    Ok(out)
}

/// Parses a trace file back.
pub fn parse_trace(text: &str) -> Result<Vec<Packet>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let bad = || format!("trace line {}: cannot read {line:?}", i + 1);
            let num = |s: &str| -> Result<u64, String> {
                match s.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => s.parse(),
                }
                .map_err(|_| bad())
            };
            let t: Vec<&str> = line.split_whitespace().collect();
            let [src, dst, sp, dp, proto, ..] = t[..] else {
                return Err(bad());
            };
            // pollux compares no ports for other protocols; rte_acl does.
            if !matches!(num(proto)?, 6 | 17) {
                return Err(format!("{}: only TCP (6) and UDP (17)", bad()));
            }
            Ok((
                u32::try_from(num(src)?).map_err(|_| bad())?,
                u32::try_from(num(dst)?).map_err(|_| bad())?,
                u16::try_from(num(sp)?).map_err(|_| bad())?,
                u16::try_from(num(dp)?).map_err(|_| bad())?,
                u8::try_from(num(proto)?).map_err(|_| bad())?,
            ))
        })
        .collect()
}

/// The same rules for pollux's classifier: rule `i` has priority `i + 1`
/// (lower wins, as the earlier line does in rte_acl), so its index in
/// [`filter::Classifier::rules`] is `i`.
pub fn pollux_rules(rules: &[AclRule]) -> Vec<Rule> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| Rule {
            name: format!("r{i}"),
            priority: i as u32 + 1,
            direction: Direction::In,
            action: Action::Allow,
            protocol: match r.proto {
                Some(6) => Protocol::Tcp,
                Some(17) => Protocol::Udp,
                _ => Protocol::Any,
            },
            src: vec![IpNet::V4(r.src)],
            dst: vec![IpNet::V4(r.dst)],
            src_ports: vec![PortRange {
                lo: r.sport.0,
                hi: r.sport.1,
            }],
            dst_ports: vec![PortRange {
                lo: r.dport.0,
                hi: r.dport.1,
            }],
            stateful: false,
        })
        .collect()
}

/// A trace packet as a flow key.
pub fn key((src, dst, sp, dp, proto): Packet) -> FlowKey {
    FlowKey::new(
        IpAddr::V4(Ipv4Addr::from(src)),
        sp,
        IpAddr::V4(Ipv4Addr::from(dst)),
        dp,
        proto,
    )
}
