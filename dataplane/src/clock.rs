//! A TSC clock calibrated at start, for cycle and nanosecond timing.
//!
//! Reading the time stamp counter directly needs `unsafe` (`_rdtsc`), which
//! pollux keeps out of this module; `quanta` reads the TSC for us (falling back
//! to the monotonic clock where the TSC is unusable). We calibrate the raw
//! counter against `std::time::Instant` ourselves so that its frequency is
//! known and ticks can be reported as cycles.

use std::time::{Duration, Instant};

/// A calibrated raw-tick clock. Cheap to copy into each worker.
#[derive(Clone, Debug)]
pub struct TscClock {
    clock: quanta::Clock,
    hz: u64,
    /// Nanoseconds a tick as a fixed-point fraction: `ns = ticks *
    /// ns_mult >> ns_shift` (the kernel's clocksource conversion): one
    /// multiply, where a division by `hz` would take tens of cycles, and
    /// the switch converts a clock read at every burst.
    ns_mult: u64,
    ns_shift: u32,
}

impl TscClock {
    /// Calibrates over `window` (10-50 ms gives a frequency within 0.1 %).
    pub fn calibrate(window: Duration) -> TscClock {
        let clock = quanta::Clock::new();
        let (r0, t0) = (clock.raw(), Instant::now());
        while t0.elapsed() < window {
            std::hint::spin_loop();
        }
        let (r1, t1) = (clock.raw(), Instant::now());
        let ns = (t1 - t0).as_nanos().max(1);
        let hz = (u128::from(r1.wrapping_sub(r0)) * 1_000_000_000 / ns) as u64;
        TscClock::with_hz(clock, hz)
    }

    /// `clock` counting `hz` ticks a second.
    fn with_hz(clock: quanta::Clock, hz: u64) -> TscClock {
        let hz = hz.max(1);
        // The largest shift whose multiplier (10^9 * 2^shift / hz, rounded
        // up so that `hz` ticks make exactly 10^9 ns) fits in 64 bits: a
        // result at most `1 + ticks >> shift` ns above the exact quotient
        // (above 1 GHz the shift is 64 or more, and at 1 GHz the multiplier
        // is exact: at most 1 ns). 10^9 < 2^30, so
        // the dividend fits in 128 bits up to a shift of 97.
        let mut shift = 97u32;
        let mut mult = (1_000_000_000u128 << shift).div_ceil(u128::from(hz));
        while mult > u128::from(u64::MAX) && shift > 0 {
            shift -= 1;
            mult = (1_000_000_000u128 << shift).div_ceil(u128::from(hz));
        }
        TscClock {
            clock,
            hz,
            ns_mult: u64::try_from(mult).unwrap_or(u64::MAX),
            ns_shift: shift,
        }
    }

    /// The process's clock: calibrated over 10 ms on first use, then
    /// shared (the counter is the same on every core), so that workers and
    /// switches built later (a successor taking over, while traffic waits)
    /// cost no calibration each.
    pub fn process() -> TscClock {
        static CLOCK: std::sync::OnceLock<TscClock> = std::sync::OnceLock::new();
        CLOCK
            .get_or_init(|| TscClock::calibrate(Duration::from_millis(10)))
            .clone()
    }

    /// The current raw tick count (TSC cycles where the TSC is used).
    #[inline(always)]
    pub fn now(&self) -> u64 {
        self.clock.raw()
    }

    /// Ticks per second.
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// Converts a tick count into nanoseconds.
    #[inline]
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.ns_mult)) >> self.ns_shift) as u64
    }

    /// Converts nanoseconds into ticks.
    #[inline]
    pub fn ns_to_ticks(&self, ns: u64) -> u64 {
        (u128::from(ns) * u128::from(self.hz) / 1_000_000_000) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_clock_agrees_with_instant() {
        let c = TscClock::calibrate(Duration::from_millis(20));
        assert!(c.hz() > 1_000_000, "implausible tick rate {}", c.hz());
        let (r0, t0) = (c.now(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (r1, el) = (c.now(), t0.elapsed());
        let measured = c.ticks_to_ns(r1 - r0) as f64;
        let reference = el.as_nanos() as f64;
        // Not a timing assertion: a consistency check between two clocks read
        // at the same moments, with a wide margin for preemption.
        assert!(
            (measured / reference - 1.0).abs() < 0.2,
            "{measured} vs {reference}"
        );
        assert_eq!(c.ns_to_ticks(c.ticks_to_ns(c.hz())), c.hz());
    }

    /// The fixed-point conversion against the exact quotient, at tick rates
    /// from a slow counter to a fast TSC, over every count whose time fits
    /// in 64 bits of nanoseconds: never below it, at most `1 + ticks >>
    /// shift` above (at most 1 from 1 GHz up), and a second's ticks make a
    /// second exactly.
    #[test]
    fn ticks_convert_to_nanoseconds_as_a_division_would() {
        use proptest::prelude::*;
        let rates = prop_oneof![
            Just(1_000_000_000u64),
            Just(2_300_000_000),
            1_000_000u64..10_000_000_000,
        ];
        proptest!(|(hz in rates, raw in any::<u64>())| {
            let c = TscClock::with_hz(quanta::Clock::new(), hz);
            let limit = (u128::from(u64::MAX) * u128::from(hz) / 1_000_000_000)
                .min(u128::from(u64::MAX)) as u64;
            let ticks = raw % limit;
            let exact = u128::from(ticks) * 1_000_000_000 / u128::from(hz);
            let got = u128::from(c.ticks_to_ns(ticks));
            let slack = 1 + (u128::from(ticks) >> c.ns_shift);
            prop_assert!(got >= exact && got - exact <= slack, "{hz} Hz, {ticks}: {got} vs {exact}");
            if hz >= 1_000_000_000 {
                prop_assert!(got - exact <= 1, "{hz} Hz, {ticks}: {got} vs {exact}");
            }
            prop_assert_eq!(c.ticks_to_ns(hz), 1_000_000_000);
            prop_assert_eq!(c.ticks_to_ns(0), 0);
        });
    }
}
