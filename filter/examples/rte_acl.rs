//! pollux's classifier on the rule and trace files of DPDK's
//! `dpdk-test-acl`, for `benches/peers.sh`'s comparison with rte_acl.
//!
//! ```text
//! rte_acl gen RULES N TRACE M SEED     write N rules and a trace of M packets
//! rte_acl run RULES TRACE ITER [OUT]   classify the trace ITER times; print
//!                                      the cycles (TSC) and time per packet;
//!                                      OUT: each packet's rule (0-based, or
//!                                      4294967295 for none), one a line
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "../tests/rte_acl/files.rs"]
mod files;

use dataplane::clock::TscClock;
use filter::Classifier;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    match a[..] {
        ["gen", rf, n, tf, m, seed] => {
            let seed: u64 = seed.parse().expect("SEED");
            let rules = files::rules(n.parse().expect("N"), seed);
            let trace = files::trace(&rules, m.parse().expect("M"), seed ^ 0x5eed);
            std::fs::write(rf, files::rule_file(&rules)).expect("writing the rules");
            std::fs::write(tf, files::trace_file(&trace)).expect("writing the trace");
        }
        ["run", rf, tf, iter, ref out @ ..] => {
            let rules = files::parse_rules(&std::fs::read_to_string(rf).expect("rules"))
                .unwrap_or_else(|e| panic!("{e}"));
            let trace = files::parse_trace(&std::fs::read_to_string(tf).expect("trace"))
                .unwrap_or_else(|e| panic!("{e}"));
            let keys: Vec<_> = trace.iter().map(|p| files::key(*p)).collect();
            let iter: u64 = iter.parse().expect("ITER");
            let t = Instant::now();
            let cls = Classifier::new(files::pollux_rules(&rules));
            let build = t.elapsed();
            let clock = TscClock::calibrate(Duration::from_millis(100));
            let t0 = clock.now();
            let mut matched = 0u64;
            for _ in 0..iter {
                for k in &keys {
                    matched += u64::from(cls.classify(black_box(k)).is_some());
                }
            }
            let ticks = clock.now().wrapping_sub(t0);
            let pkts = iter * keys.len() as u64;
            println!(
                "pollux classify: {} rules, {pkts} packets ({matched} matched), {:.2} cycles/pkt, {:.1} ns/pkt, {:.2} Mpps, built in {:.1} ms",
                rules.len(),
                ticks as f64 / pkts as f64,
                clock.ticks_to_ns(ticks) as f64 / pkts as f64,
                pkts as f64 / (clock.ticks_to_ns(ticks) as f64 / 1e9) / 1e6,
                build.as_secs_f64() * 1e3
            );
            if let [out] = out {
                let mut s = String::new();
                for k in &keys {
                    let r = cls.classify(k).map_or(u32::MAX, |v| v.rule as u32);
                    s.push_str(&format!("{r}\n"));
                }
                std::fs::write(out, s).expect("writing the results");
            }
        }
        _ => {
            eprintln!(
                "usage: rte_acl gen RULES N TRACE M SEED | rte_acl run RULES TRACE ITER [OUT]"
            );
            std::process::exit(2);
        }
    }
}
