//! # filter — the packet filter (network security groups)
//!
//! Owns: the security-group rule model ([`rule`]: priority, direction, action,
//! protocol, prefixes, port ranges, stateful flag), its validation with errors
//! that name the rule, the Azure-style default rules, the compiler from a rule
//! set to a [`Classifier`], per-rule hit counters, and a cache of verdicts
//! by masked key for a worker's lookups ([`VerdictCache`]).
//!
//! Must not touch: ports, threads, clocks or any I/O. It is pure logic over the
//! flow keys that `dataplane` parses, so it is testable without a network. The
//! connection state that makes a stateful allow admit return traffic lives in
//! the switch's flow table; this crate reports [`Verdict::stateful`] for that.
//!
//! ## Classifier: bit vectors per field, with aggregation
//!
//! We use the bit-vector scheme of Lakshman and Stiliadis (SIGCOMM '98) with
//! the aggregated bit vectors of Baboescu and Varghese (SIGCOMM '01):
//!
//! - rules are numbered in priority order; for each field (protocol, source
//!   and destination address per family, source and destination port) the
//!   value space is cut into elementary intervals, and each interval gets the
//!   set of rules that cover it as a bit vector. Intervals with equal vectors
//!   share one *equivalence class*, so memory follows the number of distinct
//!   vectors, not of intervals;
//! - a lookup finds one class per field — a 256-entry table for the protocol,
//!   and for addresses and ports a direct table on the top bits whose entry is
//!   either the class itself (a block inside one interval: most of them) or
//!   the few intervals of the block to search — then ANDs the five vectors and
//!   returns the lowest set bit: the highest-priority match;
//! - vectors are stored in chunks of 512 rules (one cache line). The first
//!   chunk is kept per class and read directly; matches concentrate in the
//!   highest-priority rules, so most lookups end there. Later chunks are
//!   deduplicated per field (few distinct vectors exist within 512 rules),
//!   and an all-zero chunk has id 0, so a lookup skips it without reading it
//!   (the aggregation of ABV, at chunk granularity).
//!
//! Why this and not the alternatives: the lookup is a fixed number of table
//! probes plus an AND over `rules / 64` words at worst (so it grows by 1/64 of
//! a linear scan, and much less when chunks are empty or a rule matches
//! early), it has no worst-case memory blow-up from rule replication (decision
//! trees such as HiCuts/HyperSplit do), it handles arbitrary port ranges
//! without expanding them into prefixes (tuple-space search must), and its
//! compile step is a sort-and-sweep per field, fast enough to rebuild a group
//! on every policy change. Its correctness reference is simple: a priority
//! scan of [`Rule::matches`], which a property test compares it against.
#![forbid(unsafe_code)]

pub mod cache;
pub mod classify;
pub mod rule;

pub use cache::VerdictCache;
pub use classify::{Classifier, HitCounters, Verdict, linear_scan};
pub use rule::{
    Action, DefaultContext, Direction, NsgSpec, PortRange, Protocol, Rule, RuleError, RuleSpec,
    default_rules, validate,
};

/// A group compiled for both directions, default rules included.
#[derive(Debug, Clone)]
pub struct CompiledNsg {
    /// Group name.
    pub name: String,
    /// Rules for traffic reaching the VM.
    pub inbound: Classifier,
    /// Rules for traffic leaving the VM.
    pub outbound: Classifier,
}

impl CompiledNsg {
    /// The classifier for `direction`.
    pub fn classifier(&self, direction: Direction) -> &Classifier {
        match direction {
            Direction::In => &self.inbound,
            Direction::Out => &self.outbound,
        }
    }
}

/// Validates a group and compiles it, defaults below the explicit rules.
/// Any error rejects the whole group; every error is returned.
pub fn compile_nsg(spec: &NsgSpec, ctx: &DefaultContext) -> Result<CompiledNsg, Vec<RuleError>> {
    let rules = validate(&spec.name, &spec.rules)?;
    let side = |dir: Direction| {
        let mut v: Vec<Rule> = rules
            .iter()
            .filter(|r| r.direction == dir)
            .cloned()
            .collect();
        v.extend(default_rules(dir, ctx));
        Classifier::new(v)
    };
    Ok(CompiledNsg {
        name: spec.name.clone(),
        inbound: side(Direction::In),
        outbound: side(Direction::Out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_rules_override_defaults_and_verdicts_name_rules() {
        let spec: NsgSpec = toml::from_str(
            r#"
            name = "web"
            [[rule]]
            name = "deny-ssh-from-vnet"
            priority = 100
            direction = "in"
            action = "deny"
            protocol = "tcp"
            src = ["10.1.0.0/16"]
            dst_ports = ["22"]
            [[rule]]
            name = "allow-web-from-internet"
            priority = 200
            direction = "in"
            action = "allow"
            protocol = "tcp"
            dst_ports = ["80", "443"]
            [[rule]]
            name = "no-dns-out"
            priority = 100
            direction = "out"
            action = "deny"
            protocol = "udp"
            dst_ports = ["53"]
            "#,
        )
        .unwrap();
        let ctx = DefaultContext::for_vnet(vec!["10.1.0.0/16".parse().unwrap()]);
        let nsg = compile_nsg(&spec, &ctx).unwrap();
        let check = |dir, src: &str, dst: &str, proto, dport, name: &str, action| {
            let c = nsg.classifier(dir);
            let p = dataplane::FlowKey::new(
                src.parse().unwrap(),
                40000,
                dst.parse().unwrap(),
                dport,
                proto,
            );
            let v = c.classify(&p).unwrap();
            assert_eq!(
                (c.rule(v.rule).unwrap().name.as_str(), v.action),
                (name, action),
                "{p:?}"
            );
        };
        check(
            Direction::In,
            "10.1.0.5",
            "10.1.0.4",
            6,
            22,
            "deny-ssh-from-vnet",
            Action::Deny,
        );
        check(
            Direction::In,
            "10.1.0.5",
            "10.1.0.4",
            6,
            80,
            "allow-web-from-internet",
            Action::Allow,
        );
        check(
            Direction::In,
            "10.1.0.5",
            "10.1.0.4",
            17,
            22,
            "AllowVnetInBound",
            Action::Allow,
        );
        check(
            Direction::In,
            "203.0.113.9",
            "10.1.0.4",
            6,
            443,
            "allow-web-from-internet",
            Action::Allow,
        );
        check(
            Direction::In,
            "203.0.113.9",
            "10.1.0.4",
            6,
            22,
            "DenyAllInBound",
            Action::Deny,
        );
        check(
            Direction::In,
            "168.63.129.16",
            "10.1.0.4",
            6,
            8080,
            "AllowProbeInBound",
            Action::Allow,
        );
        check(
            Direction::Out,
            "10.1.0.4",
            "10.1.0.1",
            17,
            53,
            "no-dns-out",
            Action::Deny,
        );
        check(
            Direction::Out,
            "10.1.0.4",
            "8.8.8.8",
            6,
            443,
            "AllowUplinkOutBound",
            Action::Allow,
        );
        check(
            Direction::Out,
            "10.1.0.4",
            "192.168.0.1",
            6,
            443,
            "DenyAllOutBound",
            Action::Deny,
        );
        assert_eq!(nsg.inbound.rules().len(), 5);
        assert_eq!(nsg.outbound.rules().len(), 4);
    }

    #[test]
    fn a_group_with_one_bad_rule_is_rejected_whole() {
        let spec: NsgSpec = toml::from_str(
            r#"
            name = "g"
            [[rule]]
            priority = 100
            direction = "in"
            action = "allow"
            [[rule]]
            priority = 101
            direction = "in"
            action = "allow"
            protocol = "tcp"
            dst_ports = ["90-80"]
            "#,
        )
        .unwrap();
        let errs = compile_nsg(&spec, &DefaultContext::for_vnet(vec![])).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .to_string()
                .contains("nsg \"g\" rule #2 (priority 101, in)"),
            "{}",
            errs[0]
        );
    }
}
