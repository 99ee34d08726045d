//! pollux's classifier against DPDK's rte_acl, a classifier nobody here
//! wrote: the same 10 000 rules and 20 000 packets given to `dpdk-test-acl`
//! (Debian's dpdk-dev) and to `filter::Classifier`, every packet's winning
//! rule compared.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "rte_acl/files.rs"]
#[allow(dead_code)]
mod files;

use filter::Classifier;
use std::process::Command;
use testkit::require::{self, Need};

#[test]
fn every_packet_gets_the_rule_rte_acl_gives_it() {
    if !require::met(&[Need::Root, Need::Tool("dpdk-test-acl")]) {
        return;
    }
    let rules = files::rules(10_000, 2026);
    let trace = files::trace(&rules, 20_000, 7);
    let dir = std::env::temp_dir().join(format!("pollux-rte-acl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rf, tf) = (dir.join("rules"), dir.join("trace"));
    std::fs::write(&rf, files::rule_file(&rules)).unwrap();
    std::fs::write(&tf, files::trace_file(&trace)).unwrap();
    // The files read back as written.
    assert_eq!(
        files::parse_rules(&std::fs::read_to_string(&rf).unwrap())
            .unwrap()
            .len(),
        rules.len()
    );
    assert_eq!(
        files::parse_trace(&std::fs::read_to_string(&tf).unwrap()).unwrap(),
        trace
    );
    let prefix = format!("pxacl{}", std::process::id());
    let out = Command::new("dpdk-test-acl")
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "-l",
            "0",
            "--log-level=error",
        ])
        .arg(format!("--file-prefix={prefix}"))
        .arg("--")
        .arg(format!("--rulesf={}", rf.display()))
        .arg(format!("--tracef={}", tf.display()))
        .args(["--iter=1", "--verbose=2", "--alg=scalar"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dpdk-test-acl failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    // `ipv4_5tuple: <1-based packet>, category: 0, result: <rule index, or
    // 4294967295 for none>`
    let theirs: Vec<(usize, u32)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ipv4_5tuple: "))
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            let n: usize = f[0].parse().unwrap();
            let r: u32 = f[2].strip_prefix("result: ").unwrap().parse().unwrap();
            (n, r)
        })
        .collect();
    assert_eq!(
        theirs.len(),
        trace.len(),
        "rte_acl classified {} packets",
        theirs.len()
    );
    let cls = Classifier::new(files::pollux_rules(&rules));
    let mut matched = 0;
    for (n, r) in &theirs {
        let p = trace[n - 1];
        let ours = cls
            .classify(&files::key(p))
            .map_or(u32::MAX, |v| v.rule as u32);
        assert_eq!(
            ours, *r,
            "packet {n} {p:x?}: pollux says {ours}, rte_acl {r}"
        );
        matched += usize::from(*r != u32::MAX);
    }
    // Both kinds of answer were compared, many times over.
    assert!(
        matched > trace.len() / 3,
        "only {matched} packets matched a rule"
    );
    assert!(matched < trace.len(), "every packet matched a rule");
    // Rules deep in the set (past the classifier's first 512-rule chunk)
    // decided some packets.
    assert!(
        theirs.iter().any(|&(_, r)| r != u32::MAX && r >= 512),
        "no packet matched a rule past the 512th"
    );
}
