//! Fuzzes pktgen's receive side: whatever a device under test sends back
//! (untrusted frames) goes through `find_signature` and the meter.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run pktgen_rx` (see docs/fuzzing.md).
#![no_main]

use dataplane::clock::TscClock;
use dataplane::pktgen::{Meter, Signature, find_signature, frame::MAX_FLOWS};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    // One meter for the whole run (calibrating a clock per input is slow):
    // state carried between inputs is part of what is fuzzed.
    static METER: RefCell<Option<Meter>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    if let Some(sig) = find_signature(data) {
        assert!(sig.flow < MAX_FLOWS);
        assert!(sig.seq < 1 << 40);
        // A signature re-encodes to itself.
        assert_eq!(Signature::decode(&sig.encode()), Some(sig));
    }
    METER.with(|m| {
        let mut m = m.borrow_mut();
        let meter = m.get_or_insert_with(|| {
            Meter::new(1024, TscClock::calibrate(Duration::from_millis(1))).expect("histogram")
        });
        let before = meter.counts();
        meter.frame(data, u64::from_le_bytes([7; 8]));
        let after = meter.counts();
        // Every frame is counted exactly once somewhere.
        let seen = |c: dataplane::pktgen::RxCounts| c.received + c.warmup + c.foreign;
        assert_eq!(seen(after), seen(before) + 1);
        assert!(after.duplicates <= after.received);
    });
});
