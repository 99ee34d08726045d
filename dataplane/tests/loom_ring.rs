//! The burst ring under loom's model checker, the interleavings (up to one
//! or two preemptions) of: two producers and a consumer on a ring smaller
//! than what they send, so it fills, wraps and makes producers wait for
//! each other's publication; a sole producer and consumer (no
//! reservation); a sole producer against shared consumers; a producer
//! shared while the ring is in use. Each value arrives exactly once, in
//! order from each producer (or to each consumer), and loom finds no data
//! race on a slot.
//!
//! Built only with `--cfg loom` (scripts/test.sh runs it:
//! `RUSTFLAGS="--cfg loom" cargo test -p dataplane --test loom_ring --release`).
#![cfg(loom)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::Batch;
use dataplane::port::ring::{BurstRing, Consumer, Producer};
use loom::sync::Arc;
use loom::thread;

/// Loom's model checker, up to `preemptions` preemptions an execution.
fn model(preemptions: usize) -> loom::model::Builder {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(preemptions);
    model.max_branches = 20_000;
    model
}

#[test]
fn two_producers_one_consumer_every_value_once_and_in_order() {
    // One preemption per execution: enough to catch a publication that is
    // not a release store (checked: loom reports the slots' concurrent
    // writes then); with two, the waiting loops (a full ring, an empty one,
    // an earlier reservation not yet published) outgrow the model.
    model(1).check(|| {
        let ring = Arc::new(BurstRing::<u32>::new(2));
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let ring = ring.clone();
                thread::spawn(move || {
                    let mut b = Batch::new();
                    for v in 0..2 {
                        b.push(p * 10 + v).unwrap();
                    }
                    while !b.is_empty() {
                        if ring.push_burst(&mut b) == 0 {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        let mut b = Batch::new();
        while got.len() < 4 {
            if ring.pop_burst(&mut b) == 0 {
                thread::yield_now();
            }
            got.extend(b.drain());
        }
        for p in producers {
            p.join().unwrap();
        }
        for p in 0..2u32 {
            let mine: Vec<u32> = got.iter().copied().filter(|v| v / 10 == p).collect();
            assert_eq!(mine, [p * 10, p * 10 + 1], "{got:?}");
        }
        assert!(ring.is_empty());
    });
}

/// Pushes `values` through `tx`, waiting (yielding to the model) while
/// the ring is full.
fn push_all(tx: &mut Producer<u32>, values: &[u32]) {
    let mut b = Batch::new();
    for &v in values {
        b.push(v).unwrap();
    }
    while !b.is_empty() {
        if tx.push_burst(&mut b) == 0 {
            thread::yield_now();
        }
    }
}

/// Pops through `rx` until `n` values came, waiting while the ring is
/// empty.
fn pop_n(rx: &mut Consumer<u32>, n: usize) -> Vec<u32> {
    let (mut got, mut b) = (Vec::new(), Batch::new());
    while got.len() < n {
        if rx.pop_burst(&mut b) == 0 {
            thread::yield_now();
        }
        got.extend(b.drain());
    }
    got
}

/// A sole producer and a sole consumer: plain stores publish, and the
/// consumer's reads of a slot are ordered before the producer's next write
/// of it (a ring of 2 carrying 3 values wraps).
#[test]
fn a_sole_producer_and_consumer_every_value_once_and_in_order() {
    model(2).check(|| {
        let (mut tx, mut rx) = BurstRing::<u32>::with_handles(2);
        let producer = thread::spawn(move || push_all(&mut tx, &[0, 1, 2]));
        let got = pop_n(&mut rx, 3);
        producer.join().unwrap();
        assert_eq!(got, [0, 1, 2]);
        assert!(rx.is_empty());
    });
}

/// A producer that has pushed alone is shared and the copy pushes from
/// another thread while the first goes on: from then on both reserve, and
/// the sole consumer gets every value once, each producer's in order.
#[test]
fn a_producer_shared_in_use_every_value_once_and_in_order() {
    model(1).check(|| {
        let (mut tx, mut rx) = BurstRing::<u32>::with_handles(2);
        let mut b = Batch::new();
        b.push(0).unwrap();
        assert_eq!(tx.push_burst(&mut b), 1, "an empty ring takes it at once");
        let mut other = tx.share();
        let second = thread::spawn(move || push_all(&mut other, &[10]));
        let first = thread::spawn(move || push_all(&mut tx, &[1]));
        let got = pop_n(&mut rx, 3);
        first.join().unwrap();
        second.join().unwrap();
        let mine: Vec<u32> = got.iter().copied().filter(|v| *v < 10).collect();
        assert_eq!(mine, [0, 1], "{got:?}");
        assert!(got.contains(&10), "{got:?}");
    });
}

/// A sole producer against two consumers (a consumer shared before the
/// first pop), each taking one burst while the producer fills the ring and
/// tries one more value into a slot a consumer may just have freed; what
/// is left is taken afterwards. Every value is taken once, each
/// consumer's in order. (No waiting loops: two consumers spinning outgrow
/// the model.)
#[test]
fn a_sole_producer_and_shared_consumers_every_value_once() {
    model(2).check(|| {
        let (mut tx, mut rx) = BurstRing::<u32>::with_handles(2);
        let mut other = rx.share();
        let producer = thread::spawn(move || {
            let mut b = Batch::new();
            b.push(0).unwrap();
            b.push(1).unwrap();
            assert_eq!(tx.push_burst(&mut b), 2);
            b.push(2).unwrap();
            tx.push_burst(&mut b);
            (tx, b)
        });
        let theirs = thread::spawn(move || {
            let mut b = Batch::new();
            other.pop_burst(&mut b);
            b.drain().collect::<Vec<u32>>()
        });
        let mut b = Batch::new();
        rx.pop_burst(&mut b);
        let theirs = theirs.join().unwrap();
        let (mut tx, mut left) = producer.join().unwrap();
        // The rest: what is in the ring, then what did not fit.
        rx.pop_burst(&mut b);
        let want = left.len();
        assert_eq!(tx.push_burst(&mut left), want, "room after the pop");
        rx.pop_burst(&mut b);
        let mut mine: Vec<u32> = b.drain().collect();
        assert!(
            mine.is_sorted() && theirs.is_sorted(),
            "{mine:?} {theirs:?}"
        );
        mine.extend(theirs);
        mine.sort_unstable();
        assert_eq!(mine, [0, 1, 2]);
        assert!(rx.is_empty());
    });
}

/// Values left in the ring are dropped with it, once each.
#[test]
fn values_left_in_the_ring_are_dropped_once() {
    loom::model(|| {
        let drops = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        struct Counted(Arc<loom::sync::atomic::AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, loom::sync::atomic::Ordering::Relaxed);
            }
        }
        let ring = Arc::new(BurstRing::<Counted>::new(4));
        let r = ring.clone();
        let d = drops.clone();
        let producer = thread::spawn(move || {
            let mut b = Batch::new();
            for _ in 0..3 {
                let _ = b.push(Counted(d.clone()));
            }
            r.push_burst(&mut b);
        });
        let mut b = Batch::new();
        ring.pop_burst(&mut b);
        let taken = b.len();
        drop(b);
        producer.join().unwrap();
        drop(ring);
        assert_eq!(
            drops.load(loom::sync::atomic::Ordering::Relaxed),
            3,
            "taken {taken}"
        );
    });
}
