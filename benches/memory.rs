//! What the memory of the machine allows a hash-table lookup in random
//! order, independent of pollux's code: the ceiling under
//! `fast_path_random/1000000` in `benches/switch.rs`.
//!
//! Each lookup reads a 64-byte bucket (which names a slot) and then the first
//! two cache lines of a 192-byte slot, as a flow-table hit does, followed by
//! `MEMORY_BENCH_WORK` rounds of independent arithmetic standing for the
//! rest of a packet's processing. Lookups go in bursts of 32, in passes:
//! every bucket requested, then every slot (each bucket read for its
//! slot), then every slot read, then the work; so all of a burst's misses
//! are in flight together. The same with each lookup also writing the
//! slot's second line, as a hit counts its packet there ("written": the
//! dirty lines go back to memory as they leave the caches); and with the
//! slots addressed directly by the key (no bucket: one dependent load
//! fewer), for comparison. Tables of
//! 1 000 entries (in the caches) and 1 000 000 (2 M buckets and 1 M slots,
//! 305 MiB, in memory advised onto huge pages as the flow table's is), keys in
//! random order.
//!
//! `cargo bench --bench memory` prints, first, the time of one load in a
//! chain of dependent loads through 1 to 320 MiB (which level of the memory
//! holds how much, and its latency); then lookups per second for each kind
//! and size, and the ratio of the large table's rate to the small one's,
//! which is what `fast_path_random/1000000` against `fast_path/1000` can
//! be compared with. `MEMORY_BENCH_WORK` (default 30) sets the work per
//! lookup: pick it so that the small table runs about as fast as
//! `fast_path/1000`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use platform::HugeVec;
use std::hint::black_box;
use std::time::Instant;

const BURST: usize = 32;
const LOOKUPS: usize = 1 << 22;

/// A slot's three cache lines.
type Slot = [u64; 24];
/// A bucket's line: its first word names a slot.
type Bucket = [u64; 8];

struct Table {
    buckets: HugeVec<Bucket>,
    slots: HugeVec<Slot>,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl Table {
    fn new(entries: usize) -> Table {
        let mut buckets = HugeVec::<Bucket>::zeroed(2 * entries).expect("buckets");
        let mut slots = HugeVec::<Slot>::zeroed(entries).expect("slots");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in buckets.iter_mut() {
            b[0] = xorshift(&mut x) % entries as u64;
        }
        for (i, s) in slots.iter_mut().enumerate() {
            s[0] = i as u64;
            s[8] = i as u64;
        }
        Table { buckets, slots }
    }
}

/// The work standing for a packet's processing: `n` rounds of four
/// independent xorshift steps (about four instructions a cycle, as the
/// switch's fast path runs), seeded by `v`.
#[inline(always)]
fn work(v: u64, n: u32) -> u64 {
    let mut a = [v, v ^ 1, v ^ 2, v ^ 3];
    for _ in 0..black_box(n) {
        for x in &mut a {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
        }
    }
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

/// Lookups per second through bucket and slot, in passes over each burst;
/// `read` reads (and may write) each slot found, given its key.
#[inline(always)]
fn passes(t: &mut Table, keys: &[u64], n: u32, read: impl Fn(&mut Slot, u64) -> u64) -> f64 {
    let start = Instant::now();
    let mut sum = 0u64;
    for burst in keys.chunks_exact(BURST) {
        for &k in burst {
            platform::prefetch(&t.buckets[k as usize]);
        }
        for &k in burst {
            let s = t.buckets[k as usize][0] as usize;
            platform::prefetch(&t.slots[s][0]);
            platform::prefetch(&t.slots[s][8]);
        }
        let mut got = [0u64; BURST];
        for (g, &k) in got.iter_mut().zip(burst) {
            let s = t.buckets[k as usize][0] as usize;
            *g = read(&mut t.slots[s], k);
        }
        for g in got {
            sum = work(sum ^ g, n);
        }
    }
    black_box(sum);
    keys.len() as f64 / start.elapsed().as_secs_f64()
}

/// Lookups reading the slot's two lines.
fn two_stage(t: &mut Table, keys: &[u64], n: u32) -> f64 {
    passes(t, keys, n, |s, _| s[0] ^ s[8])
}

/// [`two_stage`], each lookup also writing the slot's second line (as a
/// hit counts its packet and time there): the line then goes back to
/// memory dirty when it leaves the caches.
fn two_stage_write(t: &mut Table, keys: &[u64], n: u32) -> f64 {
    passes(t, keys, n, |s, k| {
        s[9] += 1;
        s[10] = k;
        s[0] ^ s[8]
    })
}

/// Lookups per second with the slot addressed by the key itself.
fn one_stage(t: &mut Table, keys: &[u64], n: u32) -> f64 {
    let start = Instant::now();
    let mut sum = 0u64;
    // (A key is below twice the slots, as it names a bucket.)
    for burst in keys.chunks_exact(BURST) {
        for &k in burst {
            let s = &t.slots[(k >> 1) as usize];
            platform::prefetch(&s[0]);
            platform::prefetch(&s[8]);
        }
        let mut got = [0u64; BURST];
        for (g, &k) in got.iter_mut().zip(burst) {
            let s = &t.slots[(k >> 1) as usize];
            *g = s[0] ^ s[8];
        }
        for g in got {
            sum = work(sum ^ g, n);
        }
    }
    black_box(sum);
    keys.len() as f64 / start.elapsed().as_secs_f64()
}

/// Nanoseconds per load of a chain of dependent loads through `bytes` of
/// memory (advised onto huge pages), one line at a time in random order:
/// the latency of the level that holds that much.
fn chase(bytes: usize, loads: usize) -> f64 {
    let lines = bytes / 64;
    // Each line's first word names the next in a random order of all of
    // them, the last the first: one cycle through every line.
    let mut order: Vec<usize> = (0..lines).collect();
    let mut x = 0x5851_f42d_4c95_7f2du64;
    for i in (1..lines).rev() {
        let j = (xorshift(&mut x) % i as u64) as usize;
        order.swap(i, j);
    }
    let mut next = HugeVec::<Bucket>::zeroed(lines).expect("lines");
    for (i, &o) in order.iter().enumerate() {
        next[o][0] = order[(i + 1) % lines] as u64;
    }
    let mut at = 0usize;
    let start = Instant::now();
    for _ in 0..loads {
        at = next[at][0] as usize;
    }
    black_box(at);
    start.elapsed().as_secs_f64() * 1e9 / loads as f64
}

fn main() {
    // (Run by `cargo test --benches` too: one short round there.)
    let quick = std::env::args().any(|a| a == "--test");
    let n: u32 = std::env::var("MEMORY_BENCH_WORK").map_or(30, |v| {
        v.parse()
            .expect("MEMORY_BENCH_WORK: rounds of work per lookup")
    });
    let lookups = if quick { LOOKUPS / 64 } else { LOOKUPS };
    let rounds = if quick { 1 } else { 3 };
    for mib in [1usize, 4, 8, 32, 320] {
        println!(
            "memory/latency/{mib}MiB: {:.1} ns a dependent load",
            chase(mib << 20, lookups / 2)
        );
    }
    let mut rates = Vec::new();
    for entries in [1_000usize, 1_000_000] {
        let mut t = Table::new(entries);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let keys: Vec<u64> = (0..lookups)
            .map(|_| xorshift(&mut x) % (2 * entries as u64))
            .collect();
        // Each kind's best of a few rounds (a noisy host only slows one).
        let mut best = |f: fn(&mut Table, &[u64], u32) -> f64| {
            (0..rounds).map(|_| f(&mut t, &keys, n)).fold(0.0, f64::max)
        };
        let (two, written, one) = (best(two_stage), best(two_stage_write), best(one_stage));
        println!(
            "memory/{entries}: bucket then slot {:.2} M/s, written {:.2} M/s, slot alone {:.2} M/s (work {n})",
            two / 1e6,
            written / 1e6,
            one / 1e6
        );
        rates.push((two, written, one));
    }
    if let [(small2, small_w, small1), (large2, large_w, large1)] = rates[..] {
        println!(
            "memory: 1 000 000 against 1 000: bucket then slot {:.2}, written {:.2}, slot alone {:.2}",
            large2 / small2,
            large_w / small_w,
            large1 / small1
        );
    }
}
