//! The prober's source address is admitted by the default inbound NSG rules,
//! so health probes reach VMs whose groups have no explicit rule for them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::FlowKey;
use filter::{Action, DefaultContext, Direction, NsgSpec, compile_nsg};
use std::net::IpAddr;

#[test]
fn default_inbound_rules_allow_the_probe_source() {
    // A group with no explicit rule: only the defaults apply.
    let spec = NsgSpec {
        name: "web".into(),
        rules: vec![],
    };
    let nsg = compile_nsg(
        &spec,
        &DefaultContext::for_vnet(vec!["10.1.0.0/16".parse().unwrap()]),
    )
    .unwrap();
    let probe = FlowKey::new(
        IpAddr::V4(lb::probe::DEFAULT_SOURCE),
        49152,
        "10.1.0.4".parse().unwrap(),
        8080,
        6,
    );
    let c = nsg.classifier(Direction::In);
    let v = c.classify(&probe).unwrap();
    assert_eq!(v.action, Action::Allow);
    assert_eq!(c.rule(v.rule).unwrap().name, "AllowProbeInBound");
    // Someone else from outside is denied.
    let other = FlowKey {
        src_ip: dataplane::key::to16("203.0.113.5".parse().unwrap()),
        ..probe
    };
    assert_eq!(c.classify(&other).unwrap().action, Action::Deny);
}
