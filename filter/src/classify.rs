//! The rule-set compiler and the classifier (see the crate doc for the choice
//! of algorithm).

use crate::rule::{Action, Rule};
use dataplane::FlowKey;
use ipnet::IpNet;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The outcome of a lookup: the winning rule and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Index of the winning rule in [`Classifier::rules`] (priority order).
    pub rule: usize,
    /// Its action.
    pub action: Action,
    /// True for a stateful allow: admit the connection's return traffic.
    pub stateful: bool,
}

/// Words per chunk of a class vector: 512 rules, one 64-byte cache line.
const CHUNK: usize = 8;

/// A field value type the interval search works on.
trait Key: Copy + Ord + std::hash::Hash + std::fmt::Debug {
    const BITS: u32;
    const ZERO: Self;
    fn block(self, shift: u32) -> usize;
    fn block_start(i: usize, shift: u32) -> Self;
    fn succ(self) -> Option<Self>;
}

macro_rules! key_impl {
    ($t:ty) => {
        impl Key for $t {
            const BITS: u32 = <$t>::BITS;
            const ZERO: Self = 0;
            // `shift` is below BITS: the top table has at least 2 entries.
            #[inline(always)]
            fn block(self, shift: u32) -> usize {
                (self >> shift) as usize
            }
            fn block_start(i: usize, shift: u32) -> Self {
                (i as $t) << shift
            }
            fn succ(self) -> Option<Self> {
                self.checked_add(1)
            }
        }
    };
}
key_impl!(u16);
key_impl!(u32);
key_impl!(u128);

/// Bit vectors (one bit per rule, in priority order) for each equivalence
/// class of one field, cut into chunks of [`CHUNK`] words (512 rules, one
/// cache line):
///
/// - chunk 0 — the highest-priority rules, where most lookups end — is
///   stored per class in `heads`, one line per class, read directly;
/// - the later chunks are deduplicated: a class holds one small id per
///   chunk into `tail_vecs`, id 0 being the all-zero chunk. Within 512 rules a
///   field has few distinct vectors, so 10 000 rules take a few MB per field
///   instead of one 1.3 KB vector per class (tens of MB), and a zero id lets a
///   lookup skip a chunk without reading it (the "aggregate" of ABV).
#[derive(Debug, Clone, Default)]
struct ClassSet {
    words: usize,
    /// Full vectors while building (for interning); emptied by `done`.
    data: Vec<u64>,
    heads: Vec<[u64; CHUNK]>,
    /// Chunks after the head, per class.
    tail_chunks: usize,
    /// `tail_ids[class * tail_chunks + (chunk - 1)]`: index into `tail_vecs`.
    tail_ids: Vec<u32>,
    tail_vecs: Vec<[u64; CHUNK]>,
    /// Zobrist hash of a bit vector -> classes with that hash.
    index: HashMap<u64, Vec<u32>>,
}

impl ClassSet {
    fn new(words: usize) -> Self {
        ClassSet {
            words,
            ..Default::default()
        }
    }

    /// The class id of bit vector `v` (whose [`zobrist`] hash is `h`),
    /// adding it if new.
    fn intern(&mut self, v: &[u64], h: u64) -> u32 {
        let w = self.words;
        let candidates = self.index.entry(h).or_default();
        for &id in candidates.iter() {
            let at = id as usize * w;
            if self.data.get(at..at + w) == Some(v) {
                return id;
            }
        }
        let id = (self.data.len() / w.max(1)) as u32;
        candidates.push(id);
        self.data.extend_from_slice(v);
        id
    }

    /// Cuts the interned vectors into the head and the deduplicated tail.
    fn done(&mut self) {
        self.index = HashMap::new();
        let w = self.words.max(1);
        let chunks = w.div_ceil(CHUNK);
        self.tail_chunks = chunks - 1;
        let classes = self.data.len() / w;
        let chunk_of = |v: &[u64], c: usize| {
            let mut out = [0u64; CHUNK];
            for (o, &x) in out.iter_mut().zip(v.iter().skip(c * CHUNK)) {
                *o = x;
            }
            out
        };
        let mut seen: HashMap<[u64; CHUNK], u32> = HashMap::new();
        self.tail_vecs = vec![[0; CHUNK]];
        seen.insert([0; CHUNK], 0);
        self.heads = Vec::with_capacity(classes);
        self.tail_ids = Vec::with_capacity(classes * self.tail_chunks);
        for v in self.data.chunks_exact(w) {
            self.heads.push(chunk_of(v, 0));
            for c in 1..chunks {
                let part = chunk_of(v, c);
                let next = self.tail_vecs.len() as u32;
                let id = *seen.entry(part).or_insert(next);
                if id == next {
                    self.tail_vecs.push(part);
                }
                self.tail_ids.push(id);
            }
        }
        self.data = Vec::new();
    }

    #[inline(always)]
    fn head(&self, class: u32) -> &[u64; CHUNK] {
        self.heads.get(class as usize).unwrap_or(&[0; CHUNK])
    }

    /// Chunk `c` (1-based, after the head) of `class`, `None` when all zero.
    #[inline(always)]
    fn tail(&self, class: u32, c: usize) -> Option<&[u64; CHUNK]> {
        let id = *self
            .tail_ids
            .get(class as usize * self.tail_chunks + c - 1)?;
        if id == 0 {
            return None;
        }
        self.tail_vecs.get(id as usize)
    }

    fn classes(&self) -> usize {
        self.heads.len()
    }
}

/// The random 64-bit value of rule `r` in Zobrist hashing (SplitMix64 of `r`).
fn zobrist(r: usize) -> u64 {
    let mut z = (r as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The Zobrist hash of a whole bit vector (XOR of its rules' values).
fn hash_of(v: &[u64]) -> u64 {
    let mut h = 0;
    for (w, &x) in v.iter().enumerate() {
        let mut bits = x;
        while bits != 0 {
            h ^= zobrist(w * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
    h
}

/// One field as sorted elementary intervals, each with a class, and a direct
/// table on the top bits of the value. A block of that table that lies within
/// one interval holds the class itself (most blocks: the table has about four
/// blocks per interval), so the lookup is one load; other blocks hold the
/// range of intervals to search, stored as `(start, class)` pairs so the
/// search and the class share cache lines.
#[derive(Debug, Clone)]
struct IntervalField<K: Key> {
    ivals: Vec<(K, u32)>,
    top: Vec<u64>,
    shift: u32,
    set: ClassSet,
}

/// Marks a top-table entry holding a class instead of an interval range.
const DIRECT: u64 = 1 << 63;

impl<K: Key> IntervalField<K> {
    /// Builds the field from `(lo, hi, rule)` spans (inclusive) over `rules` rules.
    fn build(spans: &[(K, K, usize)], rules: usize, extra: &[Vec<u64>]) -> (Self, Vec<u32>) {
        let words = rules.div_ceil(64).max(1);
        let mut set = ClassSet::new(words);
        // Sweep: +1 at lo, -1 after hi; a rule's bit is set while its count > 0.
        let mut events: Vec<(K, bool, usize)> = Vec::with_capacity(spans.len() * 2);
        for &(lo, hi, r) in spans {
            events.push((lo, true, r));
            if let Some(after) = hi.succ() {
                events.push((after, false, r));
            }
        }
        events.sort_unstable_by_key(|e| e.0);
        let mut bounds = vec![K::ZERO];
        bounds.extend(events.iter().map(|e| e.0));
        bounds.dedup();
        let mut count = vec![0u32; rules];
        let mut cur = vec![0u64; words];
        // The Zobrist hash of `cur`, kept up to date bit by bit, so interning a
        // class costs O(1) instead of hashing all its words.
        let mut h = 0u64;
        let mut class = Vec::with_capacity(bounds.len());
        let mut ev = events.iter().peekable();
        for &b in &bounds {
            let mut changed = class.is_empty();
            while let Some(&&(pos, add, r)) = ev.peek() {
                if pos != b {
                    break;
                }
                let was = count[r] > 0;
                if add {
                    count[r] += 1;
                } else {
                    count[r] = count[r].saturating_sub(1);
                }
                if was != (count[r] > 0) {
                    cur[r / 64] ^= 1 << (r % 64);
                    h ^= zobrist(r);
                    changed = true;
                }
                ev.next();
            }
            let id = match class.last() {
                Some(&last) if !changed => last,
                _ => set.intern(&cur, h),
            };
            class.push(id);
        }
        let extra_ids = extra.iter().map(|v| set.intern(v, hash_of(v))).collect();
        set.done();
        // Top table: 2^k entries, k ~ log2(#bounds) + 2, 8 to 16 bits, so
        // that most blocks fall inside one interval.
        let want = (usize::BITS - bounds.len().leading_zeros()) + 2;
        let k = want.clamp(8, 16).min(K::BITS);
        let shift = K::BITS - k;
        let blocks = 1usize << k;
        let mut top = Vec::with_capacity(blocks);
        // The interval holding the start of each block, then of the next.
        let mut lo = 0usize;
        for blk in 0..blocks {
            let start = K::block_start(blk, shift);
            while lo + 1 < bounds.len() && bounds[lo + 1] <= start {
                lo += 1;
            }
            let mut hi = lo;
            if blk + 1 < blocks {
                let next = K::block_start(blk + 1, shift);
                while hi + 1 < bounds.len() && bounds[hi + 1] < next {
                    hi += 1;
                }
            } else {
                hi = bounds.len() - 1;
            }
            top.push(if lo == hi {
                DIRECT | u64::from(class[lo])
            } else {
                lo as u64 | ((hi as u64) << 32)
            });
        }
        let ivals = bounds.into_iter().zip(class).collect();
        (
            IntervalField {
                ivals,
                top,
                shift,
                set,
            },
            extra_ids,
        )
    }

    /// The class of value `x`.
    #[inline(always)]
    fn lookup(&self, x: K) -> u32 {
        let Some(&e) = self.top.get(x.block(self.shift)) else {
            return 0;
        };
        if e & DIRECT != 0 {
            return e as u32;
        }
        // The interval holding x is the last one in lo..=hi starting <= x
        // (the one at lo starts at or before the block).
        let (lo, hi) = (e as u32 as usize, (e >> 32) as usize);
        let span = self.ivals.get(lo..=hi).unwrap_or(&[]);
        let i = if span.len() <= 8 {
            let mut i = 0;
            while span.get(i + 1).is_some_and(|b| b.0 <= x) {
                i += 1;
            }
            i
        } else {
            span.partition_point(|b| b.0 <= x).saturating_sub(1)
        };
        span.get(i).map_or(0, |b| b.1)
    }
}

/// Counts per rule of how often it won a lookup, written by one thread
/// ([`Classifier::classify_counted`], [`crate::VerdictCache::classify_counted`]:
/// each worker counts into its own) and
/// read by any (the control thread sums the workers').
#[derive(Debug)]
pub struct HitCounters {
    hits: Box<[AtomicU64]>,
}

impl HitCounters {
    /// Counters for `n` rules, all zero.
    pub fn new(n: usize) -> Self {
        HitCounters {
            hits: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Hits of rule `i` (0 for an unknown index).
    pub fn get(&self, i: usize) -> u64 {
        self.hits.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// (One thread counts into a set of counters: see
    /// [`dataplane::stats::add_own`].)
    #[inline]
    pub(crate) fn hit(&self, i: usize) {
        if let Some(c) = self.hits.get(i) {
            dataplane::stats::add_own(c, 1);
        }
    }
}

/// A compiled rule set for one direction of one group.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
    /// Action and effective stateful flag per rule, compact for the fast path.
    actions: Vec<(Action, bool)>,
    tail_chunks: usize,
    proto_class: [u32; 256],
    proto: ClassSet,
    src4: IntervalField<u32>,
    dst4: IntervalField<u32>,
    src6: IntervalField<u128>,
    dst6: IntervalField<u128>,
    sport: IntervalField<u16>,
    dport: IntervalField<u16>,
    sport_none: u32,
    dport_none: u32,
    /// The bits of a key the rules can tell apart (see [`KeyMask`]).
    mask: KeyMask,
    /// This compiled rule set among all others (from 1), for a
    /// [`crate::VerdictCache`]'s tags: a recompiled group has a new one.
    id: u64,
}

/// Which bits of a key any rule of a classifier looks at: an address's
/// bits beyond the prefixes of the rules that can hold it, or a port no
/// rule restricts, cannot change a verdict. A key with the other bits
/// cleared ([`Classifier::masked_words`]) has the same verdict as the key
/// itself.
///
/// An IPv4 address keeps its first byte, and beyond it as many bits as
/// the longest prefix of the rules within that /8: a /32 of one rule
/// (the load balancer's probe source, in every inbound group) keeps whole
/// only the addresses of its own /8, and clients elsewhere that share
/// their rules' prefixes share a masked key. (Every address of a /8 is in
/// the same rules' prefixes of 8 bits or fewer; the first byte kept, two
/// addresses of different /8s never share a masked key.) An IPv6
/// address keeps the longest prefix of the rules' IPv6 ones.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyMask {
    sport: u16,
    dport: u16,
    /// The masks of a key's 16 address bytes read as one native-endian
    /// word: for an IPv4-mapped address by its first byte (its first 12
    /// bytes kept), and for an IPv6 one; source, then destination.
    src4: Box<[u128]>,
    dst4: Box<[u128]>,
    src6: u128,
    dst6: u128,
}

impl KeyMask {
    fn of(rules: &[Rule]) -> KeyMask {
        // The top `len` bits of a `bits`-bit word, as a u128.
        let top = |len: u32, bits: u32| {
            let all = u128::MAX >> (128 - bits);
            all & !all.checked_shr(len).unwrap_or(0)
        };
        let restricted = |f: fn(&Rule) -> &Vec<crate::rule::PortRange>| {
            rules
                .iter()
                .any(|r| f(r).iter().any(|p| *p != crate::rule::PortRange::ANY))
        };
        // Per /8: the longest of its rules' IPv4 prefixes, at least 8.
        let v4 = |f: fn(&Rule) -> &Vec<IpNet>| -> Box<[u128]> {
            let mut len = [8u32; 256];
            for n in rules.iter().flat_map(|r| f(r).iter()) {
                if let IpNet::V4(n) = n
                    && n.prefix_len() > 8
                    && let Some(l) = len.get_mut(usize::from(n.network().octets()[0]))
                {
                    *l = (*l).max(u32::from(n.prefix_len()));
                }
            }
            len.iter()
                .map(|&l| {
                    // Bytes in memory order, read as a native word.
                    let mut w = [0xff; 16];
                    w[12..].copy_from_slice(&(top(l, 32) as u32).to_be_bytes());
                    u128::from_ne_bytes(w)
                })
                .collect()
        };
        let v6 = |f: fn(&Rule) -> &Vec<IpNet>| {
            let l = rules
                .iter()
                .flat_map(|r| f(r).iter())
                .filter_map(|n| match n {
                    IpNet::V6(n) => Some(u32::from(n.prefix_len())),
                    IpNet::V4(_) => None,
                })
                .max()
                .unwrap_or(0);
            u128::from_ne_bytes(top(l, 128).to_be_bytes())
        };
        KeyMask {
            sport: if restricted(|r| &r.src_ports) {
                u16::MAX
            } else {
                0
            },
            dport: if restricted(|r| &r.dst_ports) {
                u16::MAX
            } else {
                0
            },
            src4: v4(|r| &r.src),
            dst4: v4(|r| &r.dst),
            src6: v6(|r| &r.src),
            dst6: v6(|r| &r.dst),
        }
    }
}

/// Numbers compiled rule sets, for [`Classifier::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn v4_span(n: &IpNet) -> Option<(u32, u32)> {
    match n {
        IpNet::V4(n) => Some((u32::from(n.network()), u32::from(n.broadcast()))),
        IpNet::V6(_) => None,
    }
}

fn v6_span(n: &IpNet) -> Option<(u128, u128)> {
    match n {
        IpNet::V6(n) => Some((u128::from(n.network()), u128::from(n.broadcast()))),
        IpNet::V4(_) => None,
    }
}

impl Classifier {
    /// Compiles `rules`; they are ordered by priority (stable for ties), and
    /// the first matching rule in that order wins.
    pub fn new(mut rules: Vec<Rule>) -> Classifier {
        rules.sort_by_key(|r| r.priority);
        let n = rules.len();
        let words = n.div_ceil(64).max(1);
        let spans4 = |f: fn(&Rule) -> &Vec<IpNet>| -> Vec<(u32, u32, usize)> {
            rules
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    f(r).iter()
                        .filter_map(move |p| v4_span(p).map(|(a, b)| (a, b, i)))
                })
                .collect()
        };
        let spans6 = |f: fn(&Rule) -> &Vec<IpNet>| -> Vec<(u128, u128, usize)> {
            rules
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    f(r).iter()
                        .filter_map(move |p| v6_span(p).map(|(a, b)| (a, b, i)))
                })
                .collect()
        };
        let (src4, _) = IntervalField::build(&spans4(|r| &r.src), n, &[]);
        let (dst4, _) = IntervalField::build(&spans4(|r| &r.dst), n, &[]);
        let (src6, _) = IntervalField::build(&spans6(|r| &r.src), n, &[]);
        let (dst6, _) = IntervalField::build(&spans6(|r| &r.dst), n, &[]);
        // Packets without ports match only rules whose port lists are "any".
        let mut none = vec![0u64; words];
        for (i, r) in rules.iter().enumerate() {
            if r.ports_are_any() {
                none[i / 64] |= 1 << (i % 64);
            }
        }
        let ports = |f: fn(&Rule) -> &Vec<crate::rule::PortRange>| -> Vec<(u16, u16, usize)> {
            rules
                .iter()
                .enumerate()
                .flat_map(|(i, r)| f(r).iter().map(move |p| (p.lo, p.hi, i)))
                .collect()
        };
        let (sport, sn) =
            IntervalField::build(&ports(|r| &r.src_ports), n, std::slice::from_ref(&none));
        let (dport, dn) =
            IntervalField::build(&ports(|r| &r.dst_ports), n, std::slice::from_ref(&none));
        let mut proto = ClassSet::new(words);
        // Rules only tell 1, 6, 17, 58 and "anything else" apart: build those
        // five vectors and map the other 252 protocol numbers to the last.
        let mut proto_class = [0u32; 256];
        let mut other = None;
        for (p, slot) in proto_class.iter_mut().enumerate() {
            let p = p as u8;
            let distinct = matches!(p, 1 | 6 | 17 | 58);
            if let (false, Some(id)) = (distinct, other) {
                *slot = id;
                continue;
            }
            let mut v = vec![0u64; words];
            for (i, r) in rules.iter().enumerate() {
                if r.protocol.covers(p) {
                    v[i / 64] |= 1 << (i % 64);
                }
            }
            *slot = proto.intern(&v, hash_of(&v));
            if !distinct {
                other = Some(*slot);
            }
        }
        proto.done();
        let actions = rules
            .iter()
            .map(|r| (r.action, r.stateful && r.action == Action::Allow))
            .collect();
        Classifier {
            actions,
            tail_chunks: words.div_ceil(CHUNK) - 1,
            proto_class,
            proto,
            src4,
            dst4,
            src6,
            dst6,
            sport,
            dport,
            sport_none: sn.first().copied().unwrap_or(0),
            dport_none: dn.first().copied().unwrap_or(0),
            mask: KeyMask::of(&rules),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rules,
        }
    }

    /// This compiled rule set's number, unique in the process (a clone
    /// shares it: it classifies alike).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `pkt` with every bit no rule looks at cleared, as words: the bits
    /// of each address beyond the prefixes of the rules that can hold it
    /// (see `KeyMask`), the ports no rule restricts. Every key with the
    /// same words classifies alike. The words are the source and destination
    /// addresses (their 16 bytes read in native byte order), then the
    /// ports and the protocol. (An address keeps its family: an IPv4 one
    /// stays IPv4-mapped, and an IPv6 one that is not cannot become so, as
    /// its bits 80-95 would have to be kept and all ones.)
    #[inline(always)]
    pub(crate) fn masked_words(&self, pkt: &FlowKey) -> (u128, u128, u64) {
        let m = &self.mask;
        let addr = |a: &[u8; 16], m4: &[u128], m6: u128| {
            let mask = if dataplane::key::is_v4_mapped(a) {
                // (A missing mask, which cannot be, keeps every bit.)
                m4.get(usize::from(a[12])).copied().unwrap_or(u128::MAX)
            } else {
                m6
            };
            u128::from_ne_bytes(*a) & mask
        };
        let rest = u64::from(pkt.src_port & m.sport)
            | u64::from(pkt.dst_port & m.dport) << 16
            | u64::from(pkt.proto) << 32;
        (
            addr(&pkt.src_ip, &m.src4, m.src6),
            addr(&pkt.dst_ip, &m.dst4, m.dst6),
            rest,
        )
    }

    /// The rules, in priority order (a [`Verdict::rule`] indexes this).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule with index `i`.
    pub fn rule(&self, i: usize) -> Option<&Rule> {
        self.rules.get(i)
    }

    /// Fresh hit counters sized for this classifier.
    pub fn new_counters(&self) -> HitCounters {
        HitCounters::new(self.rules.len())
    }

    /// Number of equivalence classes per field (for stats and docs).
    pub fn class_counts(&self) -> [usize; 7] {
        [
            self.proto.classes(),
            self.src4.set.classes(),
            self.dst4.set.classes(),
            self.src6.set.classes(),
            self.dst6.set.classes(),
            self.sport.set.classes(),
            self.dport.set.classes(),
        ]
    }

    /// The highest-priority rule matching `pkt`, if any.
    #[inline]
    pub fn classify(&self, pkt: &FlowKey) -> Option<Verdict> {
        let (sets, ids) = self.field_classes(pkt)?;
        // The first 512 rules from the heads; most lookups end here.
        let h = [0, 1, 2, 3, 4].map(|f| sets[f].head(ids[f]));
        if let Some(i) = first_in_chunk(h) {
            return self.verdict(i);
        }
        for c in 1..=self.tail_chunks {
            let (Some(a), Some(b), Some(d), Some(e), Some(f)) = (
                sets[0].tail(ids[0], c),
                sets[1].tail(ids[1], c),
                sets[2].tail(ids[2], c),
                sets[3].tail(ids[3], c),
                sets[4].tail(ids[4], c),
            ) else {
                continue;
            };
            if let Some(i) = first_in_chunk([a, b, d, e, f]) {
                return self.verdict(c * CHUNK * 64 + i);
            }
        }
        None
    }

    /// The class set and class of each of the five fields for `pkt`.
    #[inline(always)]
    fn field_classes(&self, pkt: &FlowKey) -> Option<([&ClassSet; 5], [u32; 5])> {
        // The key's addresses as numbers, read off its bytes (IPv4 ones
        // are IPv4-mapped: the last four), not through `IpAddr`.
        let v4 = |a: &[u8; 16]| dataplane::key::v4_of(a).map(u32::from_be_bytes);
        let (s, d) = match (v4(&pkt.src_ip), v4(&pkt.dst_ip)) {
            (Some(s), Some(d)) => (
                (&self.src4.set, self.src4.lookup(s)),
                (&self.dst4.set, self.dst4.lookup(d)),
            ),
            (None, None) => (
                (
                    &self.src6.set,
                    self.src6.lookup(u128::from_be_bytes(pkt.src_ip)),
                ),
                (
                    &self.dst6.set,
                    self.dst6.lookup(u128::from_be_bytes(pkt.dst_ip)),
                ),
            ),
            // Mixed families do not occur in one IP header.
            _ => return None,
        };
        let (sp, dp) = if pkt.has_ports() {
            (
                self.sport.lookup(pkt.src_port),
                self.dport.lookup(pkt.dst_port),
            )
        } else {
            (self.sport_none, self.dport_none)
        };
        let pr = self.proto_class[usize::from(pkt.proto)];
        Some((
            [&self.proto, s.0, d.0, &self.sport.set, &self.dport.set],
            [pr, s.1, d.1, sp, dp],
        ))
    }

    #[inline(always)]
    fn verdict(&self, i: usize) -> Option<Verdict> {
        let (action, stateful) = *self.actions.get(i)?;
        Some(Verdict {
            rule: i,
            action,
            stateful,
        })
    }

    /// [`Classifier::classify`], counting the winning rule in `hits`, which
    /// no other thread counts into (see [`HitCounters`]).
    #[inline]
    pub fn classify_counted(&self, pkt: &FlowKey, hits: &HitCounters) -> Option<Verdict> {
        let v = self.classify(pkt)?;
        hits.hit(v.rule);
        Some(v)
    }
}

/// The first bit set in all five chunks.
#[inline(always)]
fn first_in_chunk(f: [&[u64; CHUNK]; 5]) -> Option<usize> {
    let [a, b, c, d, e] = f;
    for w in 0..CHUNK {
        let m = a[w] & b[w] & c[w] & d[w] & e[w];
        if m != 0 {
            return Some(w * 64 + m.trailing_zeros() as usize);
        }
    }
    None
}

/// The reference: a scan of `rules` in priority order.
pub fn linear_scan(rules: &[Rule], pkt: &FlowKey) -> Option<usize> {
    let mut order: Vec<usize> = (0..rules.len()).collect();
    order.sort_by_key(|&i| rules[i].priority);
    order.into_iter().find(|&i| rules[i].matches(pkt))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rule::{Direction, PortRange, Protocol};
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn rule(
        priority: u32,
        action: Action,
        protocol: Protocol,
        src: &[&str],
        dst: &[&str],
        dports: &[(u16, u16)],
    ) -> Rule {
        Rule {
            name: format!("r{priority}"),
            priority,
            direction: Direction::In,
            action,
            protocol,
            src: src.iter().map(|s| s.parse().unwrap()).collect(),
            dst: dst.iter().map(|s| s.parse().unwrap()).collect(),
            src_ports: vec![PortRange::ANY],
            dst_ports: dports
                .iter()
                .map(|&(lo, hi)| PortRange { lo, hi })
                .collect(),
            stateful: action == Action::Allow,
        }
    }

    fn pkt(src: &str, dst: &str, proto: u8, dp: u16) -> FlowKey {
        FlowKey::new(src.parse().unwrap(), 40000, dst.parse().unwrap(), dp, proto)
    }

    #[test]
    fn priorities_and_fields() {
        let rules = vec![
            rule(
                300,
                Action::Deny,
                Protocol::Any,
                &["0.0.0.0/0", "::/0"],
                &["0.0.0.0/0", "::/0"],
                &[(0, 65535)],
            ),
            rule(
                100,
                Action::Allow,
                Protocol::Tcp,
                &["10.1.0.0/24"],
                &["10.1.0.4/32"],
                &[(80, 80), (8000, 8100)],
            ),
            rule(
                200,
                Action::Deny,
                Protocol::Tcp,
                &["10.1.0.0/16"],
                &["0.0.0.0/0"],
                &[(0, 65535)],
            ),
            rule(
                150,
                Action::Allow,
                Protocol::Icmp,
                &["2001:db8::/32"],
                &["::/0"],
                &[(0, 65535)],
            ),
        ];
        let c = Classifier::new(rules);
        let name = |p: &FlowKey| c.classify(p).map(|v| c.rule(v.rule).unwrap().name.clone());
        assert_eq!(
            name(&pkt("10.1.0.9", "10.1.0.4", 6, 80)).as_deref(),
            Some("r100")
        );
        assert_eq!(
            name(&pkt("10.1.0.9", "10.1.0.4", 6, 8100)).as_deref(),
            Some("r100")
        );
        assert_eq!(
            name(&pkt("10.1.0.9", "10.1.0.4", 6, 8101)).as_deref(),
            Some("r200")
        );
        assert_eq!(
            name(&pkt("10.1.5.9", "10.1.0.4", 6, 80)).as_deref(),
            Some("r200")
        );
        assert_eq!(
            name(&pkt("10.2.0.1", "10.1.0.4", 6, 80)).as_deref(),
            Some("r300")
        );
        assert_eq!(
            name(&pkt("2001:db8::1", "2001:db9::1", 58, 0)).as_deref(),
            Some("r150")
        );
        assert_eq!(
            name(&pkt("2001:db8::1", "2001:db9::1", 6, 22)).as_deref(),
            Some("r300")
        );
        let v = c.classify(&pkt("10.1.0.9", "10.1.0.4", 6, 80)).unwrap();
        assert_eq!((v.action, v.stateful), (Action::Allow, true));
    }

    #[test]
    fn no_rule_no_verdict_and_counters() {
        let c = Classifier::new(vec![rule(
            100,
            Action::Allow,
            Protocol::Udp,
            &["10.0.0.0/8"],
            &["10.0.0.0/8"],
            &[(53, 53)],
        )]);
        assert_eq!(c.classify(&pkt("10.0.0.1", "10.0.0.2", 6, 53)), None);
        assert_eq!(c.classify(&pkt("10.0.0.1", "10.0.0.2", 17, 54)), None);
        assert_eq!(c.classify(&pkt("::1", "::2", 17, 53)), None);
        let hits = c.new_counters();
        for _ in 0..3 {
            assert!(
                c.classify_counted(&pkt("10.0.0.1", "10.0.0.2", 17, 53), &hits)
                    .is_some()
            );
        }
        assert!(
            c.classify_counted(&pkt("10.0.0.1", "10.0.0.2", 6, 53), &hits)
                .is_none()
        );
        assert_eq!(hits.get(0), 3);
        let empty = Classifier::new(vec![]);
        assert_eq!(empty.classify(&pkt("10.0.0.1", "10.0.0.2", 17, 53)), None);
    }

    #[test]
    fn extremes_of_every_domain() {
        let c = Classifier::new(vec![
            rule(
                100,
                Action::Allow,
                Protocol::Any,
                &[
                    "255.255.255.255/32",
                    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
                ],
                &["0.0.0.0/32", "::/128"],
                &[(65535, 65535)],
            ),
            rule(
                200,
                Action::Deny,
                Protocol::Any,
                &["0.0.0.0/0", "::/0"],
                &["0.0.0.0/0", "::/0"],
                &[(0, 0)],
            ),
        ]);
        assert_eq!(
            c.classify(&pkt("255.255.255.255", "0.0.0.0", 6, 65535))
                .map(|v| v.rule),
            Some(0)
        );
        assert_eq!(
            c.classify(&pkt(
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "::",
                17,
                65535
            ))
            .map(|v| v.rule),
            Some(0)
        );
        assert_eq!(
            c.classify(&pkt("255.255.255.254", "0.0.0.0", 6, 0))
                .map(|v| v.rule),
            Some(1)
        );
        assert_eq!(c.classify(&pkt("255.255.255.254", "0.0.0.0", 6, 1)), None);
    }

    // --- property test: classifier == linear scan -------------------------

    fn arb_v4_net() -> impl Strategy<Value = IpNet> {
        // Few distinct base addresses so that prefixes overlap often.
        (0u32..8, any::<u32>(), 0u8..=32).prop_map(|(base, noise, len)| {
            let addr = (10u32 << 24) | (base << 16) | (noise & 0xffff);
            let addr = if base == 7 { noise } else { addr };
            IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::from(addr), len)
                    .unwrap()
                    .trunc(),
            )
        })
    }

    fn arb_v6_net() -> impl Strategy<Value = IpNet> {
        (0u128..4, any::<u64>(), 0u8..=128).prop_map(|(base, noise, len)| {
            let addr = (0x2001_0db8u128 << 96) | (base << 64) | u128::from(noise);
            IpNet::V6(
                ipnet::Ipv6Net::new(Ipv6Addr::from(addr), len)
                    .unwrap()
                    .trunc(),
            )
        })
    }

    fn arb_nets() -> impl Strategy<Value = Vec<IpNet>> {
        prop_oneof![
            1 => Just(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]),
            4 => proptest::collection::vec(arb_v4_net(), 1..4),
            1 => proptest::collection::vec(arb_v6_net(), 1..3),
        ]
    }

    fn arb_ports() -> impl Strategy<Value = Vec<PortRange>> {
        prop_oneof![
            2 => Just(vec![PortRange::ANY]),
            3 => proptest::collection::vec((0u16..100, 0u16..20).prop_map(|(lo, w)| PortRange { lo: lo * 10, hi: lo * 10 + w }), 1..4),
            1 => proptest::collection::vec((any::<u16>(), any::<u16>()).prop_map(|(a, b)| PortRange { lo: a.min(b), hi: a.max(b) }), 1..3),
        ]
    }

    /// Rules whose prefixes and ports overlap one another's (shared by
    /// the verdict cache's tests).
    pub(crate) fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            0u32..2000,
            any::<bool>(),
            prop_oneof![
                Just(Protocol::Tcp),
                Just(Protocol::Udp),
                Just(Protocol::Icmp),
                Just(Protocol::Any)
            ],
            arb_nets(),
            arb_nets(),
            arb_ports(),
            arb_ports(),
        )
            .prop_map(|(priority, allow, protocol, src, dst, sp, dp)| {
                let (sp, dp) = if protocol == Protocol::Icmp {
                    (vec![PortRange::ANY], vec![PortRange::ANY])
                } else {
                    (sp, dp)
                };
                Rule {
                    name: String::new(),
                    priority,
                    direction: Direction::In,
                    action: if allow { Action::Allow } else { Action::Deny },
                    protocol,
                    src,
                    dst,
                    src_ports: sp,
                    dst_ports: dp,
                    stateful: allow,
                }
            })
    }

    /// Packets: half drawn near rule prefixes/ports, half anywhere.
    pub(crate) fn arb_packet() -> impl Strategy<Value = FlowKey> {
        let v4 = (0u32..8, any::<u32>(), any::<bool>()).prop_map(|(base, noise, wild)| {
            let a = if wild || base == 7 {
                noise
            } else {
                (10u32 << 24) | (base << 16) | (noise & 0xffff)
            };
            IpAddr::V4(Ipv4Addr::from(a))
        });
        let v6 = (0u128..4, any::<u64>()).prop_map(|(base, noise)| {
            IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | (base << 64) | u128::from(noise),
            ))
        });
        let port = prop_oneof![(0u16..1020), any::<u16>()];
        (
            any::<bool>(),
            v4.clone(),
            v4,
            v6.clone(),
            v6,
            prop_oneof![Just(6u8), Just(17), Just(1), Just(58), any::<u8>()],
            port.clone(),
            port,
        )
            .prop_map(|(is6, s4, d4, s6, d6, proto, sp, dp)| {
                let (src, dst) = if is6 { (s6, d6) } else { (s4, d4) };
                FlowKey::new(src, sp, dst, dp, proto)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn classifier_equals_linear_scan(
            rules in proptest::collection::vec(arb_rule(), 0..300),
            pkts in proptest::collection::vec(arb_packet(), 200),
        ) {
            let c = Classifier::new(rules.clone());
            // Compare by rule identity: ties in priority keep input order in both.
            let mut order: Vec<usize> = (0..rules.len()).collect();
            order.sort_by_key(|&i| rules[i].priority);
            for p in &pkts {
                let want = linear_scan(&rules, p).map(|i| order.iter().position(|&j| j == i).unwrap());
                let got = c.classify(p).map(|v| v.rule);
                prop_assert_eq!(got, want, "packet {:?}", p);
            }
        }
    }

    /// A narrow rule (a /32 source, one destination port) that random packets
    /// seldom match, with a priority below 1000.
    fn arb_narrow_rule() -> impl Strategy<Value = Rule> {
        (arb_rule(), any::<u32>(), any::<u16>(), 0u32..1000).prop_map(|(mut r, a, p, prio)| {
            r.priority = prio;
            r.src = vec![IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::from(a), 32).unwrap(),
            )];
            if r.protocol != Protocol::Icmp {
                r.dst_ports = vec![PortRange { lo: p, hi: p }];
            }
            r
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        /// Sets larger than one 512-rule chunk, whose matches mostly lie in
        /// the later (deduplicated) chunks: hundreds of narrow rules first,
        /// then random ones, with or without a catch-all at the end.
        #[test]
        fn tail_chunks_equal_linear_scan(
            narrow in proptest::collection::vec(arb_narrow_rule(), 600..1600),
            wide in proptest::collection::vec(arb_rule(), 1..100),
            catch_all in any::<bool>(),
            pkts in proptest::collection::vec(arb_packet(), 200),
        ) {
            let mut rules = narrow;
            rules.extend(wide.into_iter().map(|mut r| { r.priority += 1000; r }));
            if catch_all {
                rules.push(rule(3000, Action::Deny, Protocol::Any, &["0.0.0.0/0", "::/0"], &["0.0.0.0/0", "::/0"], &[(0, u16::MAX)]));
            }
            let c = Classifier::new(rules.clone());
            let mut order: Vec<usize> = (0..rules.len()).collect();
            order.sort_by_key(|&i| rules[i].priority);
            let mut in_tail = 0;
            for p in &pkts {
                let want = linear_scan(&rules, p).map(|i| order.iter().position(|&j| j == i).unwrap());
                in_tail += usize::from(want.is_some_and(|i| i >= 512));
                let got = c.classify(p).map(|v| v.rule);
                prop_assert_eq!(got, want, "packet {:?}", p);
            }
            if catch_all {
                prop_assert!(in_tail > 0, "no packet was decided past the first chunk");
            }
        }
    }
}
