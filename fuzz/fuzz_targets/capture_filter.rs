//! Fuzzes live capture's filter and copy: an arbitrary filter expression
//! (as `POST /v1/capture` takes it from a user) parsed, then matched against
//! an arbitrary frame, which a tap armed with it copies or not.
//!
//! Input: `[n, filter (n bytes), frame...]`. A filter that parses must
//! select the frame exactly when it matches it (the tap captures it then,
//! with its first snap-length bytes), and never panic.
#![no_main]

use dataplane::capture::{Filter, Spec, Tap, Way};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let (text, frame) = rest.split_at(n);
    let Ok(filter) = String::from_utf8_lossy(text).parse::<Filter>() else {
        return;
    };
    let matches = filter.is_empty()
        || filter.matches(dataplane::parse(frame, 0).ok().as_ref());
    let snaplen = 1 + usize::from(n % 97);
    let spec = Spec {
        port: Some(1),
        filter,
        snaplen,
    };
    assert_eq!(spec.selects(1, frame), matches);
    assert!(!spec.selects(2, frame));
    let tap = Tap::new(2);
    tap.arm(spec, 5, u64::MAX);
    let Some(s) = tap.session(0) else {
        panic!("an armed tap has a session")
    };
    tap.capture(&s, 1, Way::Rx, 7, std::iter::once(frame));
    let mut got = Vec::new();
    tap.take(&mut got);
    assert_eq!(got.len(), usize::from(matches));
    if let Some(r) = got.first() {
        assert_eq!(r.data, frame[..frame.len().min(snaplen)]);
        assert_eq!(r.len as usize, frame.len());
    }
});
