//! The burst ring under loom's model checker: the interleavings (up to one
//! preemption) of two producers and a consumer on a ring smaller than
//! what they send, so it fills, wraps and makes producers wait for each
//! other's publication. Each value arrives exactly once, each producer's in
//! order, and loom finds no data race on a slot.
//!
//! Built only with `--cfg loom` (scripts/test.sh runs it:
//! `RUSTFLAGS="--cfg loom" cargo test -p dataplane --test loom_ring --release`).
#![cfg(loom)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::Batch;
use dataplane::port::ring::BurstRing;
use loom::sync::Arc;
use loom::thread;

#[test]
fn two_producers_one_consumer_every_value_once_and_in_order() {
    let mut model = loom::model::Builder::new();
    // One preemption per execution: enough to catch a publication that is
    // not a release store (checked: loom reports the slots' concurrent
    // writes then); with two, the waiting loops (a full ring, an empty one,
    // an earlier reservation not yet published) outgrow the model.
    model.preemption_bound = Some(1);
    model.max_branches = 20_000;
    model.check(|| {
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
