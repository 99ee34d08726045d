//! Fuzzes the frame parser and, on frames it accepts, every rewrite.
//!
//! Run: `cargo install cargo-fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run parse`
//! from the repository root (see docs/fuzzing.md).
#![no_main]

use dataplane::{parse, rewrite, MacAddr};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, Ipv6Addr};

fuzz_target!(|data: &[u8]| {
    let Some((&port, frame)) = data.split_first() else { return };
    let Ok(p) = parse(frame, u16::from(port)) else { return };
    // Offsets the parser returns must lie inside the frame.
    assert!(usize::from(p.l3_off) <= frame.len());
    if p.has_l4 {
        assert!(usize::from(p.l4_off) + usize::from(p.l4_len) <= frame.len());
    }
    // Rewrites on an accepted frame may refuse, but never panic.
    let mut f = frame.to_vec();
    let _ = rewrite::set_dst_mac(&mut f, MacAddr([2, 0, 0, 0, 0, 1]));
    let _ = rewrite::set_ipv4_src(&mut f, &p, Ipv4Addr::new(192, 0, 2, 1));
    let _ = rewrite::set_ipv4_dst(&mut f, &p, Ipv4Addr::new(192, 0, 2, 2));
    let _ = rewrite::set_ipv6_src(&mut f, &p, Ipv6Addr::LOCALHOST);
    let _ = rewrite::set_ipv6_dst(&mut f, &p, Ipv6Addr::LOCALHOST);
    let _ = rewrite::set_src_port(&mut f, &p, 1);
    let _ = rewrite::set_dst_port(&mut f, &p, 2);
    let _ = rewrite::dec_ttl(&mut f, &p);
    // The rewritten frame still parses to the same structure.
    if let Ok(q) = parse(&f, u16::from(port)) {
        assert_eq!((q.l3, q.l3_off, q.l4_off, q.has_l4), (p.l3, p.l3_off, p.l4_off, p.has_l4));
    }
});
