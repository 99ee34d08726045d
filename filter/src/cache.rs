//! A cache of verdicts, one per worker, in front of the classifiers it is
//! given: a connection's first packet is classified once per group and
//! direction, and new connections from clients seen before, or from
//! networks the rules cut coarsely, differ from earlier ones only in bits
//! no rule looks at (the client's port, an address's bits beyond the
//! prefixes of the rules that can hold it). OVS's megaflows and VFP's
//! flow caches do the same; here the bits kept are fixed per rule set
//! (and for IPv4 per /8: `Classifier::masked_words`), so an entry is exact
//! without tracking which fields a lookup consulted. A lookup that misses
//! costs its classification and about a third of one more: clients from
//! more distinct masked keys than the cache has entries (a storm from
//! a whole /8 that the rules cut into /24s, say) pay that on every
//! connection.
//!
//! Direct-mapped, one cache line an entry, tagged with the classifier's
//! [`Classifier::id`]: a recompiled group (a policy change) never finds the
//! entries of the one before, and nothing needs to be flushed.

use crate::classify::{Classifier, HitCounters, Verdict};
use dataplane::FlowKey;

/// Entries of [`VerdictCache::new`] when it is given none (64 KiB).
pub const DEFAULT_ENTRIES: usize = 1024;

#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Entry {
    /// The masked key ([`Classifier::masked_words`]).
    src: u128,
    dst: u128,
    rest: u64,
    /// The classifier's id; 0 for an empty entry (ids start at 1).
    classifier: u64,
    verdict: Option<Verdict>,
}

/// Folds a 128-bit product: a multiply-xor hash step.
#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Verdicts by classifier and masked key; see the module doc.
#[derive(Debug)]
pub struct VerdictCache {
    entries: Box<[Entry]>,
    hits: u64,
    misses: u64,
}

impl Default for VerdictCache {
    fn default() -> Self {
        VerdictCache::new(DEFAULT_ENTRIES)
    }
}

impl VerdictCache {
    /// A cache of `entries` (rounded up to a power of two, at least 1).
    pub fn new(entries: usize) -> VerdictCache {
        let n = entries.max(1).next_power_of_two();
        VerdictCache {
            entries: vec![Entry::default(); n].into_boxed_slice(),
            hits: 0,
            misses: 0,
        }
    }

    /// [`Classifier::classify`] of `pkt` by `c`, from the cache when a key
    /// with the same masked key was classified by `c` before.
    #[inline]
    pub fn classify(&mut self, c: &Classifier, pkt: &FlowKey) -> Option<Verdict> {
        let (src, dst, rest) = c.masked_words(pkt);
        let id = c.id();
        // A multiply-xor hash of the words (not the flow key's own xxh3,
        // which costs half as much as a classification). It is not keyed:
        // keys chosen to collide cost a classification and the lookup each,
        // as keys that miss do.
        const K: [u64; 4] = [
            0x9e37_79b9_7f4a_7c15,
            0xc2b2_ae3d_27d4_eb4f,
            0x1656_67b1_9e37_79f9,
            0x85eb_ca77_c2b2_ae63,
        ];
        let h = fold((src as u64) ^ K[0], ((src >> 64) as u64) ^ K[1])
            ^ fold((dst as u64) ^ K[2], ((dst >> 64) as u64) ^ K[3])
            ^ fold(rest ^ id, K[0]);
        let i = (h as usize) & (self.entries.len() - 1);
        let Some(e) = self.entries.get_mut(i) else {
            return c.classify(pkt);
        };
        if e.classifier == id && e.src == src && e.dst == dst && e.rest == rest {
            self.hits += 1;
            return e.verdict;
        }
        self.misses += 1;
        let verdict = c.classify(pkt);
        *e = Entry {
            src,
            dst,
            rest,
            classifier: id,
            verdict,
        };
        verdict
    }

    /// [`VerdictCache::classify`], counting the winning rule in `hits`,
    /// which no other thread counts into (see [`HitCounters`]).
    #[inline]
    pub fn classify_counted(
        &mut self,
        c: &Classifier,
        pkt: &FlowKey,
        hits: &HitCounters,
    ) -> Option<Verdict> {
        let v = self.classify(c, pkt)?;
        hits.hit(v.rule);
        Some(v)
    }

    /// Lookups answered from the cache, and lookups the classifier
    /// answered, since the cache was made.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::tests::{arb_packet, arb_rule};
    use crate::rule::{Action, Direction, PortRange, Protocol, Rule};
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    fn rule(priority: u32, action: Action, src: &str, sports: PortRange, dport: u16) -> Rule {
        Rule {
            name: format!("r{priority}"),
            priority,
            direction: Direction::In,
            action,
            protocol: Protocol::Tcp,
            src: vec![net(src)],
            dst: vec![net("0.0.0.0/0"), net("::/0")],
            src_ports: vec![sports],
            dst_ports: vec![PortRange {
                lo: dport,
                hi: dport,
            }],
            stateful: true,
        }
    }

    /// A TCP key from `src` to a server of its family.
    fn key(src: IpAddr, sport: u16, dport: u16) -> FlowKey {
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
        };
        FlowKey::new(src, sport, dst, dport, 6)
    }

    #[test]
    fn keys_that_differ_in_unlooked_bits_share_an_entry() {
        let c = Classifier::new(vec![
            rule(100, Action::Deny, "10.1.2.0/24", PortRange::ANY, 80),
            rule(200, Action::Allow, "10.1.0.0/16", PortRange::ANY, 80),
        ]);
        let mut cache = VerdictCache::new(64);
        let a = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let first = cache.classify(&c, &key(a, 40000, 80));
        assert_eq!(first.map(|v| v.rule), Some(0));
        assert_eq!(cache.stats(), (0, 1));
        // Another client port and host of the same /24: the same entry.
        let b = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 200));
        assert_eq!(cache.classify(&c, &key(b, 50000, 80)), first);
        assert_eq!(cache.stats(), (1, 1));
        // Another /24, another destination port: entries of their own,
        // with their own verdicts.
        let d = IpAddr::V4(Ipv4Addr::new(10, 1, 3, 3));
        assert_eq!(
            cache.classify(&c, &key(d, 40000, 80)).map(|v| v.rule),
            Some(1)
        );
        assert_eq!(cache.classify(&c, &key(a, 40000, 81)), None);
        assert_eq!(cache.stats(), (1, 3));
    }

    #[test]
    fn a_probe_sources_host_prefix_keeps_whole_only_the_addresses_of_its_own_slash_8() {
        let c = Classifier::new(vec![
            rule(100, Action::Allow, "168.63.129.16/32", PortRange::ANY, 80),
            rule(200, Action::Deny, "203.0.113.0/24", PortRange::ANY, 80),
            rule(300, Action::Allow, "0.0.0.0/0", PortRange::ANY, 80),
        ]);
        let mut cache = VerdictCache::new(64);
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        // Clients of one /24 in a /8 without longer prefixes: one entry.
        for (i, host) in [7u8, 8, 9, 200].into_iter().enumerate() {
            let k = key(v4(203, 0, 113, host), 40000 + u16::from(host), 80);
            assert_eq!(cache.classify(&c, &k).map(|v| v.rule), Some(1));
            assert_eq!(cache.stats(), (i as u64, 1));
        }
        // Another /24 of that /8, and another /8 altogether: their own.
        let other = key(v4(203, 0, 114, 7), 40000, 80);
        assert_eq!(cache.classify(&c, &other).map(|v| v.rule), Some(2));
        let far = key(v4(198, 51, 100, 7), 40000, 80);
        assert_eq!(cache.classify(&c, &far).map(|v| v.rule), Some(2));
        // (The rest of that /8 shares the entry.)
        assert_eq!(
            cache
                .classify(&c, &key(v4(198, 51, 7, 1), 1, 80))
                .map(|v| v.rule),
            Some(2)
        );
        assert_eq!(cache.stats(), (4, 3));
        // In the probe source's /8 every bit counts.
        let probe = key(v4(168, 63, 129, 16), 40000, 80);
        let next = key(v4(168, 63, 129, 17), 40000, 80);
        assert_eq!(cache.classify(&c, &probe).map(|v| v.rule), Some(0));
        assert_eq!(cache.classify(&c, &next).map(|v| v.rule), Some(2));
        assert_eq!(cache.stats(), (4, 5));
    }

    #[test]
    fn addresses_of_different_slash_8s_never_share_an_entry() {
        // Rules of 8 bits or fewer only: every /8 keeps its first byte.
        let c = Classifier::new(vec![
            rule(100, Action::Deny, "0.0.0.0/1", PortRange::ANY, 80),
            rule(200, Action::Allow, "0.0.0.0/0", PortRange::ANY, 80),
        ]);
        let mut cache = VerdictCache::new(64);
        let v4 = |a| IpAddr::V4(Ipv4Addr::new(a, 1, 2, 3));
        for (first, rule) in [(10, 0), (200, 1), (11, 0), (201, 1)] {
            let k = key(v4(first), 40000, 80);
            assert_eq!(cache.classify(&c, &k).map(|v| v.rule), Some(rule), "{k:?}");
        }
        assert_eq!(cache.stats(), (0, 4));
    }

    #[test]
    fn a_verdict_from_the_cache_counts_its_rule() {
        let c = Classifier::new(vec![rule(
            100,
            Action::Allow,
            "10.0.0.0/8",
            PortRange::ANY,
            80,
        )]);
        let hits = c.new_counters();
        let mut cache = VerdictCache::new(16);
        for port in [1000, 2000, 3000] {
            let k = key(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), port, 80);
            assert_eq!(
                cache.classify_counted(&c, &k, &hits).map(|v| v.rule),
                Some(0)
            );
        }
        assert_eq!(cache.stats(), (2, 1));
        assert_eq!(hits.get(0), 3);
    }

    #[test]
    fn a_recompiled_group_never_finds_the_old_entries() {
        let old = Classifier::new(vec![rule(
            100,
            Action::Allow,
            "10.0.0.0/8",
            PortRange::ANY,
            80,
        )]);
        let new = Classifier::new(vec![rule(
            100,
            Action::Deny,
            "10.0.0.0/8",
            PortRange::ANY,
            80,
        )]);
        assert_ne!(old.id(), new.id());
        let mut cache = VerdictCache::new(1);
        let k = key(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), 1234, 80);
        assert_eq!(
            cache.classify(&old, &k).map(|v| v.action),
            Some(Action::Allow)
        );
        assert_eq!(
            cache.classify(&new, &k).map(|v| v.action),
            Some(Action::Deny)
        );
        assert_eq!(
            cache.classify(&old, &k).map(|v| v.action),
            Some(Action::Allow)
        );
        assert_eq!(cache.stats(), (0, 3));
    }

    #[test]
    fn a_source_port_rule_keeps_the_port_and_each_family_its_prefix() {
        let c = Classifier::new(vec![
            rule(
                100,
                Action::Deny,
                "10.0.0.0/8",
                PortRange { lo: 1000, hi: 1999 },
                80,
            ),
            rule(200, Action::Allow, "2001:db8::/32", PortRange::ANY, 80),
            rule(300, Action::Allow, "0.0.0.0/0", PortRange::ANY, 80),
        ]);
        let mut cache = VerdictCache::new(256);
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 1));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 3, 4, 5, 6));
        for (src, sport, rule) in [
            (v4, 1500, Some(0)),
            (v4, 2500, Some(2)),
            (v4, 1501, Some(0)),
            (v6, 1500, Some(1)),
            (v6, 2500, Some(1)),
        ] {
            let k = key(src, sport, 80);
            assert_eq!(cache.classify(&c, &k).map(|v| v.rule), rule, "{k:?}");
            assert_eq!(c.classify(&k).map(|v| v.rule), rule, "{k:?}");
        }
    }

    proptest! {
        /// Through one small cache shared by two rule sets, every lookup —
        /// keys repeated, keys that share a masked key with an earlier one,
        /// keys of the other family — gives the classifier's own verdict.
        #[test]
        fn the_cache_answers_as_the_classifier(
            a in prop::collection::vec(arb_rule(), 1..20),
            b in prop::collection::vec(arb_rule(), 1..20),
            keys in prop::collection::vec(arb_packet(), 1..60),
            bits in prop::collection::vec(any::<(u32, u16)>(), 60),
        ) {
            // Keys at the edges of the rules' prefixes too: each source and
            // destination network with one bit flipped (inside the prefix
            // or just past it).
            let mut keys = keys;
            let edge = |n: &ipnet::IpNet, bit: u32| -> IpAddr {
                match n {
                    ipnet::IpNet::V4(n) => {
                        let at = (u32::from(n.prefix_len()) + bit % 3).saturating_sub(1).min(31);
                        IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) ^ (1 << (31 - at))))
                    }
                    ipnet::IpNet::V6(n) => {
                        let at = (u32::from(n.prefix_len()) + bit % 3).saturating_sub(1).min(127);
                        IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) ^ (1 << (127 - at))))
                    }
                }
            };
            for (r, (bit, port)) in a.iter().zip(&bits) {
                for (s, d) in r.src.iter().zip(&r.dst) {
                    if matches!(s, ipnet::IpNet::V4(_)) == matches!(d, ipnet::IpNet::V4(_)) {
                        let (sp, dp) = (r.src_ports[0].lo, r.dst_ports[0].hi);
                        keys.push(FlowKey::new(edge(s, *bit), sp, edge(d, *bit >> 2), dp, 6));
                        keys.push(FlowKey::new(edge(s, *bit), sp ^ port, d.addr(), dp, 17));
                    }
                }
            }
            let (a, b) = (Classifier::new(a), Classifier::new(b));
            let mut cache = VerdictCache::new(8);
            for (i, k) in keys.iter().enumerate() {
                // The key, then the key with low bits and a port changed
                // (often the same masked key).
                let (low, port) = bits[i % bits.len()];
                let mut other = *k;
                other.src_ip[15] ^= low as u8;
                other.dst_ip[14] ^= (low >> 8) as u8;
                // (Now and then another /8, for an IPv4 address.)
                other.src_ip[12] ^= (low >> 16) as u8 & 0x81;
                other.src_port ^= port;
                for k in [k, &other, k] {
                    for c in [&a, &b] {
                        prop_assert_eq!(cache.classify(c, k), c.classify(k), "{:?}", k);
                    }
                }
            }
        }
    }
}
