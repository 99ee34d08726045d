//! `pollux demo` end to end: its report states every outcome it shows, and
//! the outcomes are the right ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[test]
fn the_demo_shows_what_it_promises() {
    let mut out = Vec::new();
    pollux::demo::run(
        &mut out,
        pollux::demo::Options {
            rate_packets: 50_000,
        },
    )
    .unwrap();
    let report = String::from_utf8(out).unwrap();
    let line = |prefix: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{report}"))
            .to_string()
    };
    assert!(line("1. probes").contains("all three DIPs up"), "{report}");
    // Requests spread: at least two backends answered.
    let spread = line("2. 30 requests");
    let zeros = spread.matches(" 0").count();
    assert!(zeros <= 1, "{report}");
    assert!(
        line("3. web2").contains("down after 2 failed probes"),
        "{report}"
    );
    assert!(line("30 new requests").contains("web2 0,"), "{report}");
    assert!(
        line("12 connections").contains("12 still answered"),
        "{report}"
    );
    assert!(line("4. client").contains("blocked ("), "{report}");
    assert!(line("5. vnet b").contains("unreachable"), "{report}");
    assert!(line("6. through").contains("latency p50"), "{report}");
}
