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
            conns: 5_000,
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
    // Every connection arrived, each went through the slow path once, and
    // the VIP spread them over all three of the sink's ports.
    let conns = line("7. 5000 new connections");
    assert!(conns.contains("(0 lost)"), "{report}");
    let spread = line("each decided");
    assert!(spread.contains("(5000 packets there)"), "{report}");
    let per: Vec<u64> = ["6000 ", "6001 ", "6002 "]
        .iter()
        .map(|p| {
            let at = spread.find(p).unwrap() + p.len();
            spread[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(per.iter().sum::<u64>(), 5_000, "{report}");
    assert!(per.iter().all(|&n| n > 1_000), "{report}");
}
