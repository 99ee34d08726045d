//! The receiving side: sequence accounting per flow and the latency histogram.
//!
//! Per flow the meter keeps the next expected sequence number and a 128-bit
//! window of the sequence numbers just below it. A packet at or above the
//! expected number moves the window; one below it is *reordered* (it arrived
//! after a later packet of its flow, RFC 4737's definition) — or a
//! *duplicate* if its bit is already set. A packet more than 128 behind
//! cannot be checked for duplication and is counted as reordered and *late*.
//! Loss is what was sent minus the distinct packets received.

use super::frame::{Signature, find_signature};
use crate::clock::TscClock;
use hdrhistogram::Histogram;

/// Sequence-window width per flow.
const WINDOW: u64 = 128;

#[derive(Debug, Clone, Copy, Default)]
struct FlowRx {
    /// The next expected sequence number (one above the highest seen).
    next: u64,
    /// Bit `i` set: `next - 1 - i` was received.
    seen: u128,
}

/// Counts of one trial's receive side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxCounts {
    /// Measured (not warm-up) packets with a signature, duplicates included.
    pub received: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Packets received again (same flow and sequence number).
    pub duplicates: u64,
    /// Packets that arrived after a later packet of their flow.
    pub reordered: u64,
    /// Reordered packets too far behind to check for duplication.
    pub late: u64,
    /// Warm-up packets received (not measured).
    pub warmup: u64,
    /// Packets without a signature, or with a flow id out of range.
    pub foreign: u64,
}

impl RxCounts {
    /// Distinct measured packets received.
    pub fn unique(&self) -> u64 {
        self.received - self.duplicates
    }
}

/// The latency percentiles of a trial, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// The receive-side meter of a trial.
#[derive(Debug, Clone)]
pub struct Meter {
    flows: Vec<FlowRx>,
    counts: RxCounts,
    hist: Histogram<u64>,
    clock: TscClock,
}

impl Meter {
    /// A meter for `flows` flows, timestamps from `clock`.
    pub fn new(flows: u32, clock: TscClock) -> Result<Meter, hdrhistogram::CreationError> {
        Ok(Meter {
            flows: vec![FlowRx::default(); flows as usize],
            counts: RxCounts::default(),
            // 1 ns to 100 s at 3 significant digits.
            hist: Histogram::new_with_bounds(1, 100_000_000_000, 3)?,
            clock,
        })
    }

    /// Accounts one received frame at raw time `rx_ts`.
    #[inline]
    pub fn frame(&mut self, frame: &[u8], rx_ts: u64) {
        match find_signature(frame) {
            Some(sig) => self.signature(&sig, frame.len(), rx_ts),
            None => self.counts.foreign += 1,
        }
    }

    /// Accounts one received signature of a `len`-byte frame at raw time `rx_ts`.
    pub fn signature(&mut self, sig: &Signature, len: usize, rx_ts: u64) {
        if sig.warmup {
            self.counts.warmup += 1;
            return;
        }
        let Some(f) = self.flows.get_mut(sig.flow as usize) else {
            self.counts.foreign += 1;
            return;
        };
        self.counts.received += 1;
        self.counts.bytes += len as u64;
        let s = sig.seq;
        if s >= f.next {
            let shift = s - f.next + 1;
            f.seen = if shift >= WINDOW { 0 } else { f.seen << shift };
            f.seen |= 1;
            f.next = s + 1;
        } else {
            self.counts.reordered += 1;
            let back = f.next - 1 - s;
            if back >= WINDOW {
                self.counts.late += 1;
            } else if f.seen & (1 << back) != 0 {
                self.counts.duplicates += 1;
                self.counts.reordered -= 1;
                return;
            } else {
                f.seen |= 1 << back;
            }
        }
        let ns = self.clock.ticks_to_ns(rx_ts.saturating_sub(sig.tx_ts));
        // Values beyond the histogram's range are clamped to it.
        let _ = self.hist.record(ns.clamp(1, self.hist.high()));
    }

    /// The counts so far.
    pub fn counts(&self) -> RxCounts {
        self.counts
    }

    /// The latency percentiles so far.
    pub fn latency(&self) -> Latency {
        let h = &self.hist;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sig(flow: u32, seq: u64, tx_ts: u64) -> Signature {
        Signature {
            warmup: false,
            flow,
            seq,
            tx_ts,
        }
    }

    fn meter(flows: u32) -> Meter {
        Meter::new(flows, TscClock::calibrate(Duration::from_millis(5))).unwrap()
    }

    #[test]
    fn in_order_traffic_has_no_anomalies() {
        let mut m = meter(3);
        for seq in 0..1000 {
            for f in 0..3 {
                m.signature(&sig(f, seq, 0), 60, 0);
            }
        }
        let c = m.counts();
        assert_eq!(
            (c.received, c.unique(), c.reordered, c.duplicates),
            (3000, 3000, 0, 0)
        );
        assert_eq!(c.bytes, 3000 * 60);
    }

    #[test]
    fn gaps_swaps_duplicates_and_late_packets() {
        let mut m = meter(2);
        // Flow 0: 0 1 3 2 (one swap) 2 (a duplicate) 5 (4 lost) 5 (dup).
        for s in [0, 1, 3, 2, 2, 5, 5] {
            m.signature(&sig(0, s, 0), 60, 0);
        }
        // Flow 1: 0..300 without 10, then 10 (late: 289 behind) and 299
        // (a duplicate within the window).
        for s in (0..300).filter(|&s| s != 10) {
            m.signature(&sig(1, s, 0), 60, 0);
        }
        m.signature(&sig(1, 10, 0), 60, 0);
        m.signature(&sig(1, 299, 0), 60, 0);
        // Unknown flow and warm-up packets are not measured.
        m.signature(&sig(9, 0, 0), 60, 0);
        m.signature(
            &Signature {
                warmup: true,
                ..sig(0, 100, 0)
            },
            60,
            0,
        );
        m.frame(&[0u8; 60], 0);
        let c = m.counts();
        assert_eq!(c.received, 7 + 301);
        assert_eq!(c.duplicates, 3);
        assert_eq!(c.reordered, 2, "2 after 3, and the late 10");
        assert_eq!(c.late, 1);
        assert_eq!(c.unique(), 5 + 300);
        assert_eq!((c.warmup, c.foreign), (1, 2));
        // Sent: flow 0 seqs 0..=5, flow 1 0..300: 306; only flow 0's 4 is lost.
        assert_eq!(306 - c.unique(), 1);
    }

    #[test]
    fn percentiles_follow_a_known_distribution() {
        let clock = TscClock::calibrate(Duration::from_millis(5));
        let mut m = Meter::new(1, clock.clone()).unwrap();
        // Latencies 1..=10 000 us, one packet each, in a shuffled order of
        // sequence numbers so reordering does not matter to the histogram.
        for i in 1..=10_000u64 {
            let ticks = clock.ns_to_ticks(i * 1000);
            m.signature(&sig(0, i, 1_000_000), 60, 1_000_000 + ticks);
        }
        let l = m.latency();
        assert_eq!(l.count, 10_000);
        let near = |got: u64, want_us: u64| {
            let want = want_us * 1000;
            // HDR at 3 significant digits plus the tick conversion's rounding.
            (got as f64 / want as f64 - 1.0).abs() < 0.002
        };
        assert!(near(l.min, 1), "{l:?}");
        assert!(near(l.p50, 5000), "{l:?}");
        assert!(near(l.p90, 9000), "{l:?}");
        assert!(near(l.p99, 9900), "{l:?}");
        assert!(near(l.p999, 9990), "{l:?}");
        assert!(near(l.p9999, 9999), "{l:?}");
        assert!(near(l.max, 10_000), "{l:?}");
        assert!((l.mean / 5_000_500.0 - 1.0).abs() < 0.002, "{l:?}");
    }
}
