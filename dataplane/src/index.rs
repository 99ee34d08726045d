//! The bucketed hash index under the switch's per-core tables (the flow
//! table and the load balancer's connection tables): from a key's seeded
//! hash to the `u32` values (slab slots) stored under it. The keys
//! themselves live in the caller's slab; a lookup hands each candidate
//! value to the caller to compare.
//!
//! Written here rather than taken from `hashbrown` because the tables look
//! up a whole burst at once in stages (hash every key, prefetch every
//! bucket, then compare), so that the cache misses of 32 lookups overlap
//! instead of following one another; that needs a lookup split at the bucket
//! load, which `hashbrown` has no API for. An index is also sized when it is
//! made and never rehashes by itself (it leaves no tombstones): `hashbrown`
//! under steady insert and delete churn fills with tombstones and rehashes
//! in place from time to time, an O(n) pause in the data path. (The flow
//! table sizes its index for at most 4 Mi entries and makes a larger one
//! only past that.) The layout is DPDK `rte_hash`'s:
//! 64-byte buckets of eight ways (a 16-bit signature and a `u32` value
//! each), linear probing from bucket to bucket with a per-bucket count of
//! entries stored past it, kept at most half full; in huge pages where the
//! kernel has them ([`platform::HugeVec`]).

use crate::FlowKey;
use platform::HugeVec;
use std::num::NonZeroU32;

/// Ways per bucket.
pub const WAYS: usize = 8;

/// The ways of a bucket whose signature is `sig` (0: the empty ways): bit
/// `w` for way `w`, found in one compare (which way holds an entry is
/// random, and a loop stopping there would mispredict its exit on most
/// lookups).
#[inline(always)]
fn matching(sigs: u128, sig: u16) -> u32 {
    platform::lanes_equal(sigs, sig)
}

/// Lane `w` of `sigs`.
#[inline(always)]
fn lane(sigs: u128, w: usize) -> u16 {
    (sigs >> (16 * w)) as u16
}

/// The signature of `hash` in a bucket (never 0: 0 marks an empty way).
#[inline(always)]
fn sig(hash: u64) -> u16 {
    ((hash >> 48) as u16).max(1)
}

/// One cache line: eight 16-bit signatures (0 = empty way) and the values
/// they point to, plus how many entries whose home is this bucket or an
/// earlier one were stored past it (a lookup that misses here stops when
/// that is 0).
#[derive(Debug, Clone, Copy, Default, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Bucket {
    /// Eight 16-bit lanes, way `w` in bits `16 w ..`: one vector compare
    /// (`platform::lanes_equal`) finds the ways matching a signature.
    sigs: u128,
    value: [u32; WAYS],
    overflow: u32,
}

/// Where an entry sits in the index, from [`KeyIndex::find`] or
/// [`KeyIndex::insert`]: what [`KeyIndex::remove`] takes. An entry stays
/// where it was put until it is removed (nothing is moved or rehashed), so
/// a table may keep its entries' positions and remove them without
/// searching. Four bytes (bucket and way, plus one), so that `Option<Pos>`
/// is four bytes too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos(NonZeroU32);

/// Most buckets an index has ([`Pos`] holds a bucket in 28 bits): 16 GiB
/// of buckets.
pub const MAX_BUCKETS: usize = 1 << 28;

/// Most entries an index holds (at most half full): 2^30.
pub const MAX_ENTRIES: usize = MAX_BUCKETS * WAYS / 2;

impl Pos {
    #[inline(always)]
    fn new(bucket: usize, way: usize) -> Pos {
        // (`bucket` < MAX_BUCKETS and `way` < WAYS: below 2^31, plus one.)
        let v = (bucket as u32) << 3 | (way as u32 & 7);
        Pos(NonZeroU32::MIN.saturating_add(v))
    }

    /// The bucket.
    #[inline(always)]
    pub fn bucket(self) -> usize {
        ((self.0.get() - 1) >> 3) as usize
    }

    /// The way in the bucket.
    #[inline(always)]
    pub fn way(self) -> usize {
        ((self.0.get() - 1) & 7) as usize
    }
}

/// The index could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot make a hash index of {buckets} buckets: {reason}")]
pub struct IndexError {
    /// Buckets asked for.
    pub buckets: usize,
    /// Why: more buckets than an index has, or the mapping failed.
    pub reason: String,
}

/// A hash index of `u32` values; see the module documentation.
#[derive(Debug, Default)]
pub struct KeyIndex {
    buckets: HugeVec<Bucket>,
    mask: usize,
    len: usize,
}

/// Bytes of an index sized for `entries` ([`KeyIndex::for_entries`]).
pub fn bytes_for(entries: usize) -> usize {
    // (Mapped, and committed, in whole huge pages.)
    buckets_for(entries)
        .saturating_mul(std::mem::size_of::<Bucket>())
        .next_multiple_of(platform::HUGE_PAGE)
}

/// Buckets that hold `entries` at most half full (a power of two, at least 2).
pub fn buckets_for(entries: usize) -> usize {
    (entries.saturating_mul(2))
        .div_ceil(WAYS)
        .next_power_of_two()
        .max(2)
}

impl KeyIndex {
    /// An empty index of `buckets` buckets (rounded up to a power of two).
    /// Its memory is committed as buckets are first written (an empty
    /// bucket is zero bytes), so a table sized for a large capacity and
    /// holding a few entries costs the pages those touch.
    pub fn with_buckets(buckets: usize) -> Result<Self, IndexError> {
        let n = buckets.next_power_of_two().max(2);
        if n > MAX_BUCKETS {
            return Err(IndexError {
                buckets: n,
                reason: format!("an index has at most {MAX_BUCKETS}"),
            });
        }
        let buckets = HugeVec::zeroed(n).map_err(|e| IndexError {
            buckets: n,
            reason: format!("no memory: {e}"),
        })?;
        Ok(KeyIndex {
            mask: n - 1,
            buckets,
            len: 0,
        })
    }

    /// An empty index sized for `entries` entries at most half full.
    pub fn for_entries(entries: usize) -> Result<Self, IndexError> {
        Self::with_buckets(buckets_for(entries))
    }

    /// Commits the memory of every bucket now ([`platform::populate`]), so
    /// that inserting faults nothing in; `Err` when the kernel could not.
    pub fn populate(&mut self) -> Result<(), std::io::Error> {
        self.buckets.populate()
    }

    /// Buckets (0 for an index that could not be made: it holds nothing).
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when one more entry keeps the index at most half full.
    pub fn has_room(&self) -> bool {
        (self.len + 1) * 2 <= self.buckets.len() * WAYS
    }

    /// Buckets holding entries whose home is an earlier bucket (how far
    /// the index has clustered).
    pub fn overflowing(&self) -> usize {
        self.buckets.iter().filter(|b| b.overflow > 0).count()
    }

    /// Starts loading the home bucket of `hash` into the cache without
    /// waiting for it: called for every packet of a burst before the
    /// lookups, so that their cache misses overlap.
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        if let Some(b) = self.buckets.get(hash as usize & self.mask) {
            platform::prefetch(b);
        }
    }

    /// Calls `f` with each value of `hash`'s home bucket stored under
    /// `hash`'s signature (in practice the one entry the key may be):
    /// for prefetching the slots a lookup will compare. Compares no key.
    #[inline(always)]
    pub fn for_home_candidates(&self, hash: u64, mut f: impl FnMut(u32)) {
        let Some(bucket) = self.buckets.get(hash as usize & self.mask) else {
            return;
        };
        let mut m = matching(bucket.sigs, sig(hash));
        while m != 0 {
            let w = m.trailing_zeros() as usize;
            m &= m - 1;
            if let Some(&v) = bucket.value.get(w) {
                f(v);
            }
        }
    }

    /// The entry stored under `hash` whose value `is_key` accepts (the
    /// caller compares the key it keeps for that value), and where it is.
    #[inline(always)]
    pub fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<(Pos, u32)> {
        let sig = sig(hash);
        let mut b = hash as usize & self.mask;
        for _ in 0..self.buckets.len() {
            let bucket = self.buckets.get(b)?;
            // (A signature is never 0, so no empty way, whose value is
            // stale, matches.)
            let mut m = matching(bucket.sigs, sig);
            while m != 0 {
                let w = m.trailing_zeros() as usize;
                m &= m - 1;
                if let Some(&v) = bucket.value.get(w)
                    && is_key(v)
                {
                    return Some((Pos::new(b, w), v));
                }
            }
            if bucket.overflow == 0 {
                return None;
            }
            b = (b + 1) & self.mask;
        }
        None
    }

    /// Stores `value` under `hash` in the first free way from its home
    /// bucket on, counting the overflow in the buckets passed; returns
    /// where. `None` when the index is half full already (see
    /// [`KeyIndex::has_room`]): nothing stored. Does not look for the key
    /// first.
    pub fn insert(&mut self, hash: u64, value: u32) -> Option<Pos> {
        if !self.has_room() {
            return None;
        }
        let sig = sig(hash);
        let mut b = hash as usize & self.mask;
        for _ in 0..self.buckets.len() {
            let bucket = self.buckets.get_mut(b)?;
            // The first free way, in one compare (which ways are free is
            // random: a loop stopping at the first would mispredict its
            // exit on most inserts).
            let free = matching(bucket.sigs, 0);
            if free != 0 {
                let w = free.trailing_zeros() as usize;
                bucket.sigs |= u128::from(sig) << (16 * w);
                if let Some(v) = bucket.value.get_mut(w) {
                    *v = value;
                }
                self.len += 1;
                return Some(Pos::new(b, w));
            }
            bucket.overflow += 1;
            b = (b + 1) & self.mask;
        }
        None
    }

    /// The value stored at `pos`, if its way holds an entry.
    #[inline(always)]
    pub fn value_at(&self, pos: Pos) -> Option<u32> {
        let b = self.buckets.get(pos.bucket())?;
        if lane(b.sigs, pos.way()) == 0 {
            return None;
        }
        b.value.get(pos.way()).copied()
    }

    /// Removes the entry at `pos`, where [`KeyIndex::find`] or
    /// [`KeyIndex::insert`] placed it under `hash` (valid until that entry
    /// is removed). It checks only that the way holds an entry: a caller
    /// holding a kept position confirms it is its entry first
    /// ([`KeyIndex::value_at`]), or would remove another and lower the
    /// wrong overflow counts.
    pub fn remove(&mut self, hash: u64, pos: Pos) {
        // A way that holds nothing (a stale position): nothing to undo.
        let (bucket, way) = (pos.bucket(), pos.way());
        if self
            .buckets
            .get(bucket)
            .is_none_or(|b| lane(b.sigs, way) == 0)
        {
            return;
        }
        let mut at = hash as usize & self.mask;
        while at != bucket {
            if let Some(x) = self.buckets.get_mut(at) {
                x.overflow = x.overflow.saturating_sub(1);
            }
            at = (at + 1) & self.mask;
        }
        if let Some(x) = self.buckets.get_mut(bucket) {
            x.sigs &= !(0xffff_u128 << (16 * way));
            self.len -= 1;
        }
    }
}

/// The 128-bit product of `a` and `b`, folded to 64 bits (as in wyhash):
/// the mixing of this module's hash, for other small keys too.
#[inline(always)]
pub fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A per-table random hash seed: keys come from packets, so an attacker
/// who knew the hash could aim many of them at one bucket.
#[derive(Debug, Clone, Copy)]
pub struct Seed([u64; 4]);

impl Seed {
    /// A new random seed.
    pub fn random() -> Seed {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new();
        let mut seed = [0u64; 4];
        for (i, w) in seed.iter_mut().enumerate() {
            *w = random.hash_one(0x706f_6c6c_7578u64 + i as u64) | 1;
        }
        Seed(seed)
    }

    /// The hash of `key` with `extra` (the port a flow arrives on, say):
    /// the low bits choose the bucket, the top 16 the signature.
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey, extra: u16) -> u64 {
        let w = |b: &[u8; 16]| {
            let (lo, hi) = b.split_at(8);
            let mut a = [0u8; 8];
            let mut c = [0u8; 8];
            a.copy_from_slice(lo);
            c.copy_from_slice(hi);
            (u64::from_le_bytes(a), u64::from_le_bytes(c))
        };
        let (s0, s1) = w(&key.src_ip);
        let (d0, d1) = w(&key.dst_ip);
        let rest = u64::from(key.src_port)
            | u64::from(key.dst_port) << 16
            | u64::from(extra) << 32
            | u64::from(key.proto) << 48;
        let [k0, k1, k2, k3] = self.0;
        let h = fold(s0 ^ k0, s1 ^ k1) ^ fold(d0 ^ k2, d1 ^ k3) ^ fold(rest ^ k1, k0);
        fold(h ^ k2, k3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn sized_half_full_and_refuses_past_it() {
        let mut ix = KeyIndex::for_entries(10).unwrap();
        assert_eq!(ix.buckets(), 4);
        let half = ix.buckets() * WAYS / 2;
        for v in 0..half as u32 {
            assert!(
                ix.insert(u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15), v)
                    .is_some()
            );
        }
        assert_eq!(ix.insert(7, 99), None, "an insert past half full");
        assert_eq!(ix.len(), half);
    }

    #[test]
    fn an_insert_takes_the_first_free_way_of_its_home_bucket() {
        let mut ix = KeyIndex::with_buckets(64).unwrap();
        let hash = |v: u32| (u64::from(v) << 48) | 0x40_0000; // bucket 0
        for v in 1..=WAYS as u32 {
            assert!(ix.insert(hash(v), v).is_some());
        }
        assert_eq!(ix.buckets[0].value, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Ways 5 and 2 freed: the next inserts fill way 2, then way 5, then
        // spill into bucket 1 (counted in bucket 0's overflow).
        for v in [6u32, 3] {
            let (p, _) = ix.find(hash(v), |x| x == v).unwrap();
            ix.remove(hash(v), p);
        }
        for (v, way) in [(20u32, 2usize), (21, 5)] {
            assert!(ix.insert(hash(v), v).is_some());
            assert_eq!(
                ix.find(hash(v), |x| x == v)
                    .map(|(p, _)| (p.bucket(), p.way())),
                Some((0, way))
            );
        }
        assert_eq!(ix.buckets[0].overflow, 0);
        assert!(ix.insert(hash(22), 22).is_some());
        assert_eq!(
            ix.find(hash(22), |x| x == 22)
                .map(|(p, _)| (p.bucket(), p.way())),
            Some((1, 0))
        );
        assert_eq!(ix.buckets[0].overflow, 1);
    }

    #[test]
    fn overflowing_buckets_are_found_and_unwound() {
        // Every entry's home is bucket 0 of 64: they spill into the next
        // buckets, are all found, and removing them clears the overflow.
        let mut ix = KeyIndex::with_buckets(64).unwrap();
        let hash = |v: u32| (u64::from(v) << 48) | 0x40_0000; // bucket 0
        for v in 1..=40u32 {
            assert!(ix.insert(hash(v), v).is_some());
        }
        for v in 1..=40u32 {
            assert_eq!(ix.find(hash(v), |x| x == v).map(|f| f.1), Some(v));
        }
        assert_eq!(ix.find(hash(41), |x| x == 41), None);
        for v in 1..=40u32 {
            let (p, _) = ix.find(hash(v), |x| x == v).unwrap();
            ix.remove(hash(v), p);
        }
        assert!(ix.is_empty());
        assert_eq!(ix.overflowing(), 0);
        assert!(ix.buckets.iter().all(|b| b.sigs == 0));
    }

    #[test]
    fn positions_hold_bucket_and_way_and_the_size_is_bounded() {
        for (b, w) in [(0, 0), (0, 7), (1, 3), (MAX_BUCKETS - 1, 7)] {
            let p = Pos::new(b, w);
            assert_eq!((p.bucket(), p.way()), (b, w));
        }
        assert_eq!(std::mem::size_of::<Option<Pos>>(), 4);
        // (Refused before any memory is asked for.)
        let e = KeyIndex::with_buckets(MAX_BUCKETS + 1).unwrap_err();
        assert_eq!(e.buckets, 2 * MAX_BUCKETS);
        assert!(e.to_string().contains("at most"), "{e}");
    }

    #[test]
    fn seeds_differ_and_spread_similar_keys() {
        let (a, b) = (Seed::random(), Seed::random());
        let k = FlowKey::default();
        assert_ne!(a.hash(&k, 0), b.hash(&k, 0));
        assert_ne!(a.hash(&k, 0), a.hash(&k, 1), "extra is hashed");
        let mut homes = std::collections::HashSet::new();
        for p in 0..4096u16 {
            let key = FlowKey {
                src_port: p,
                ..FlowKey::default()
            };
            homes.insert(a.hash(&key, 0) & 1023);
        }
        assert!(homes.len() > 900, "{} of 1024 buckets", homes.len());
    }

    proptest! {
        /// The ways matching a signature are exactly the lanes equal to it
        /// (empty lanes, 0, never match: a signature is at least 1).
        #[test]
        fn signature_match_is_exact(
            lanes in proptest::array::uniform8(prop_oneof![Just(0u16), Just(1u16), Just(2u16), any::<u16>()]),
            s in prop_oneof![Just(1u16), Just(2u16), 1..=u16::MAX],
        ) {
            let sigs = lanes
                .iter()
                .enumerate()
                .fold(0u128, |a, (w, &x)| a | u128::from(x) << (16 * w));
            let m = matching(sigs, s);
            for (w, &x) in lanes.iter().enumerate() {
                prop_assert_eq!(lane(sigs, w), x);
                prop_assert_eq!(m >> w & 1 == 1, x == s, "lane {}", w);
            }
            prop_assert_eq!(m >> WAYS, 0);
        }
    }

    proptest! {
        /// Inserts and removals of values under small hashes (many
        /// collisions) agree with a map; an entry stays where its insert
        /// put it until it is removed, and is removed from there.
        #[test]
        fn index_equals_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..200), 1..400)) {
            let mut ix = KeyIndex::with_buckets(32).unwrap();
            let mut map: HashMap<u32, (u64, Pos)> = HashMap::new();
            // Few homes and few signatures: collisions everywhere.
            let hash = |v: u32| (u64::from(v % 7) << 48) | u64::from(v % 5);
            for (add, v) in ops {
                if add && !map.contains_key(&v) {
                    if ix.has_room() {
                        let at = ix.insert(hash(v), v);
                        prop_assert!(at.is_some());
                        if let Some(at) = at {
                            map.insert(v, (hash(v), at));
                        }
                    }
                } else if let Some((h, at)) = map.remove(&v) {
                    let (p, got) = ix.find(h, |x| x == v).unwrap();
                    prop_assert_eq!(got, v);
                    prop_assert_eq!(p, at);
                    prop_assert_eq!(ix.value_at(at), Some(v));
                    ix.remove(h, at);
                    prop_assert_eq!(ix.value_at(at), None);
                }
                prop_assert_eq!(ix.len(), map.len());
            }
            for v in 0..200 {
                prop_assert_eq!(ix.find(hash(v), |x| x == v).is_some(), map.contains_key(&v));
            }
        }
    }
}
