//! The security-group rule model, its validation, and the Azure-style defaults.
//!
//! A [`RuleSpec`] is what the configuration or the control API says (strings,
//! as in the `[[nsg.rule]]` TOML tables); [`validate`] turns a whole group of
//! them into [`Rule`]s or returns *every* problem, each naming its rule.

use dataplane::FlowKey;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Lowest priority number an explicit rule may have (Azure: 100).
pub const MIN_PRIORITY: u32 = 100;
/// Highest priority number an explicit rule may have (Azure: 4096).
pub const MAX_PRIORITY: u32 = 4096;
/// The probe source address Azure uses (and pollux's prober by default).
pub const DEFAULT_PROBE_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16));

/// Traffic direction, seen from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic reaching the VM.
    In,
    /// Traffic leaving the VM.
    Out,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the packet through.
    Allow,
    /// Drop the packet.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// The protocol a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1) for IPv4 and ICMPv6 (58) for IPv6.
    Icmp,
    /// Every protocol.
    Any,
}

impl Protocol {
    /// True when the rule's protocol covers IP protocol number `proto`.
    pub fn covers(self, proto: u8) -> bool {
        match self {
            Protocol::Tcp => proto == 6,
            Protocol::Udp => proto == 17,
            Protocol::Icmp => proto == 1 || proto == 58,
            Protocol::Any => true,
        }
    }
}

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    /// True when `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A name for counters and logs (given, or `"<direction>-<priority>"`).
    pub name: String,
    /// Lower number wins; unique per direction within a group.
    pub priority: u32,
    /// Which traffic the rule is for.
    pub direction: Direction,
    /// What it does.
    pub action: Action,
    /// Protocol it applies to.
    pub protocol: Protocol,
    /// Source prefixes (`any` is `0.0.0.0/0` and `::/0`).
    pub src: Vec<IpNet>,
    /// Destination prefixes.
    pub dst: Vec<IpNet>,
    /// Source port ranges (`any` is `0-65535`).
    pub src_ports: Vec<PortRange>,
    /// Destination port ranges.
    pub dst_ports: Vec<PortRange>,
    /// For allow rules: the return traffic of a connection this rule admitted
    /// is admitted too, without a rule (the flow table keeps that state).
    pub stateful: bool,
}

fn any_nets() -> Vec<IpNet> {
    vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]
}

fn ports_any(p: &[PortRange]) -> bool {
    p.contains(&PortRange::ANY)
}

impl Rule {
    /// True when both port lists are "any": the rule then also matches
    /// protocols without ports. A rule with a port restriction matches only
    /// TCP and UDP packets.
    pub fn ports_are_any(&self) -> bool {
        ports_any(&self.src_ports) && ports_any(&self.dst_ports)
    }

    /// The reference semantics of a rule: does it match `pkt`?
    /// (The classifier must agree with a priority-ordered scan of this.)
    pub fn matches(&self, pkt: &FlowKey) -> bool {
        if !self.protocol.covers(pkt.proto) {
            return false;
        }
        if !self.src.iter().any(|n| n.contains(&pkt.src()))
            || !self.dst.iter().any(|n| n.contains(&pkt.dst()))
        {
            return false;
        }
        if pkt.has_ports() {
            self.src_ports.iter().any(|r| r.contains(pkt.src_port))
                && self.dst_ports.iter().any(|r| r.contains(pkt.dst_port))
        } else {
            self.ports_are_any()
        }
    }

    /// A `name`/`priority`/`direction` description used in messages.
    pub fn describe(&self) -> String {
        format!(
            "rule {} {:?} ({})",
            self.priority, self.name, self.direction
        )
    }
}

fn default_any() -> Vec<String> {
    vec!["any".to_string()]
}

/// A rule as written in the configuration (`[[nsg.rule]]`) or sent to the
/// control API. Every field is checked by [`validate`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Optional name for counters and logs.
    #[serde(default)]
    pub name: Option<String>,
    /// 100-4096, lower wins.
    pub priority: i64,
    /// `in` or `out`.
    pub direction: String,
    /// `allow` or `deny`.
    pub action: String,
    /// `tcp`, `udp`, `icmp` or `any`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Prefixes or addresses, or `any`.
    #[serde(default = "default_any")]
    pub src: Vec<String>,
    /// Prefixes or addresses, or `any`.
    #[serde(default = "default_any")]
    pub dst: Vec<String>,
    /// Ports (`80`), ranges (`8000-8100`) or `any`.
    #[serde(default = "default_any")]
    pub src_ports: Vec<String>,
    /// Ports, ranges or `any`.
    #[serde(default = "default_any")]
    pub dst_ports: Vec<String>,
    /// Defaults to true for allow rules; must not be true on deny rules.
    #[serde(default)]
    pub stateful: Option<bool>,
}

fn default_protocol() -> String {
    "any".to_string()
}

/// A network security group as configured: a name and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NsgSpec {
    /// Group name.
    pub name: String,
    /// Its explicit rules (`[[nsg.rule]]`).
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
}

/// One problem with one rule. Messages name the group and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A prefix or address that does not parse.
    #[error("{rule}: {field} {value:?} is not a prefix or address: {reason}")]
    BadPrefix {
        /// The rule, as `nsg "web" rule 120 (in)`.
        rule: String,
        /// `src` or `dst`.
        field: &'static str,
        /// The offending text.
        value: String,
        /// Why.
        reason: String,
    },
    /// A port or range that does not parse, or whose ends are reversed.
    #[error("{rule}: {field} {value:?}: {reason}")]
    BadPortRange {
        /// The rule.
        rule: String,
        /// `src_ports` or `dst_ports`.
        field: &'static str,
        /// The offending text.
        value: String,
        /// Why.
        reason: String,
    },
    /// Ports given on an ICMP rule.
    #[error("{rule}: {field} must be \"any\" on an icmp rule (icmp has no ports)")]
    PortsOnIcmp {
        /// The rule.
        rule: String,
        /// `src_ports` or `dst_ports`.
        field: &'static str,
    },
    /// Two rules of one group and direction share a priority.
    #[error(
        "nsg {nsg:?}: priority {priority} ({direction}) is used by both {first:?} and {second:?}"
    )]
    DuplicatePriority {
        /// Group name.
        nsg: String,
        /// Direction.
        direction: Direction,
        /// The shared priority.
        priority: u32,
        /// Name of the first rule.
        first: String,
        /// Name of the second rule.
        second: String,
    },
    /// Priority outside 100-4096.
    #[error("{rule}: priority {priority} is outside {MIN_PRIORITY}-{MAX_PRIORITY}")]
    PriorityOutOfRange {
        /// The rule.
        rule: String,
        /// The priority given.
        priority: i64,
    },
    /// A rule that can never match anything.
    #[error("{rule}: can never match: {reason}")]
    NeverMatches {
        /// The rule.
        rule: String,
        /// Why.
        reason: String,
    },
    /// A field whose value is not one of those allowed.
    #[error("{rule}: {field} {value:?} is not one of {expected}")]
    BadValue {
        /// The rule.
        rule: String,
        /// The field.
        field: &'static str,
        /// The offending text.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
    /// An empty list where at least one entry (or `any`) is needed.
    #[error("{rule}: {field} is empty (write [\"any\"] to match everything)")]
    EmptyList {
        /// The rule.
        rule: String,
        /// The field.
        field: &'static str,
    },
    /// `stateful = true` on a deny rule.
    #[error("{rule}: stateful applies to allow rules only")]
    StatefulDeny {
        /// The rule.
        rule: String,
    },
}

fn parse_prefix(s: &str) -> Result<Vec<IpNet>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("any") || t == "*" {
        return Ok(any_nets());
    }
    if t.contains('/') {
        let net: IpNet = t
            .parse()
            .map_err(|e: ipnet::AddrParseError| e.to_string())?;
        if net.trunc() != net {
            return Err(format!("host bits are set (did you mean {}?)", net.trunc()));
        }
        return Ok(vec![net]);
    }
    let ip: IpAddr = t
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    Ok(vec![IpNet::from(ip)])
}

fn parse_ports(s: &str) -> Result<PortRange, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("any") || t == "*" {
        return Ok(PortRange::ANY);
    }
    let num = |p: &str| -> Result<u16, String> {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{:?} is not a port number (0-65535)", p.trim()))
    };
    match t.split_once('-') {
        Some((a, b)) => {
            let (lo, hi) = (num(a)?, num(b)?);
            if lo > hi {
                return Err(format!("range is reversed ({lo} > {hi})"));
            }
            Ok(PortRange { lo, hi })
        }
        None => {
            let p = num(t)?;
            Ok(PortRange { lo: p, hi: p })
        }
    }
}

fn bad_prefix(rule: &str, field: &'static str, value: &str, reason: String) -> RuleError {
    RuleError::BadPrefix {
        rule: rule.to_string(),
        field,
        value: value.to_string(),
        reason,
    }
}

fn bad_ports(rule: &str, field: &'static str, value: &str, reason: String) -> RuleError {
    RuleError::BadPortRange {
        rule: rule.to_string(),
        field,
        value: value.to_string(),
        reason,
    }
}

/// Parses every entry of a list field, pushing one error per bad entry (made
/// by `bad`) and one if the list is empty.
fn parse_list<T>(
    rule: &str,
    field: &'static str,
    list: &[String],
    parse: impl Fn(&str) -> Result<Vec<T>, String>,
    bad: fn(&str, &'static str, &str, String) -> RuleError,
    errors: &mut Vec<RuleError>,
) -> Vec<T> {
    if list.is_empty() {
        errors.push(RuleError::EmptyList {
            rule: rule.to_string(),
            field,
        });
    }
    let mut out = Vec::new();
    for v in list {
        match parse(v) {
            Ok(items) => out.extend(items),
            Err(reason) => errors.push(bad(rule, field, v, reason)),
        }
    }
    out
}

/// Validates one rule; `label` names it in errors. Pushes every problem found.
fn validate_rule(label: &str, spec: &RuleSpec, errors: &mut Vec<RuleError>) -> Option<Rule> {
    let before = errors.len();
    let rule = label.to_string();
    let priority = if (i64::from(MIN_PRIORITY)..=i64::from(MAX_PRIORITY)).contains(&spec.priority) {
        spec.priority as u32
    } else {
        errors.push(RuleError::PriorityOutOfRange {
            rule: rule.clone(),
            priority: spec.priority,
        });
        0
    };
    let bad = |field, value: &str, expected| RuleError::BadValue {
        rule: rule.clone(),
        field,
        value: value.to_string(),
        expected,
    };
    let direction = match spec.direction.to_ascii_lowercase().as_str() {
        "in" | "inbound" => Some(Direction::In),
        "out" | "outbound" => Some(Direction::Out),
        _ => {
            errors.push(bad("direction", &spec.direction, "in, out"));
            None
        }
    };
    let action = match spec.action.to_ascii_lowercase().as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        _ => {
            errors.push(bad("action", &spec.action, "allow, deny"));
            None
        }
    };
    let protocol = match spec.protocol.to_ascii_lowercase().as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "icmp" => Some(Protocol::Icmp),
        "any" | "*" => Some(Protocol::Any),
        _ => {
            errors.push(bad("protocol", &spec.protocol, "tcp, udp, icmp, any"));
            None
        }
    };
    let src = parse_list(&rule, "src", &spec.src, parse_prefix, bad_prefix, errors);
    let dst = parse_list(&rule, "dst", &spec.dst, parse_prefix, bad_prefix, errors);
    let one_range = |v: &str| parse_ports(v).map(|r| vec![r]);
    let src_ports = parse_list(
        &rule,
        "src_ports",
        &spec.src_ports,
        one_range,
        bad_ports,
        errors,
    );
    let dst_ports = parse_list(
        &rule,
        "dst_ports",
        &spec.dst_ports,
        one_range,
        bad_ports,
        errors,
    );
    if protocol == Some(Protocol::Icmp) {
        for (field, p) in [("src_ports", &src_ports), ("dst_ports", &dst_ports)] {
            if !p.is_empty() && !ports_any(p) {
                errors.push(RuleError::PortsOnIcmp {
                    rule: rule.clone(),
                    field,
                });
            }
        }
    }
    let fam = |n: &[IpNet]| {
        (
            n.iter().any(|x| x.addr().is_ipv4()),
            n.iter().any(|x| x.addr().is_ipv6()),
        )
    };
    let ((s4, s6), (d4, d6)) = (fam(&src), fam(&dst));
    let can_meet = (s4 && d4) || (s6 && d6);
    if !src.is_empty() && !dst.is_empty() && !can_meet {
        let f = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
        errors.push(RuleError::NeverMatches {
            rule: rule.clone(),
            reason: format!(
                "src has only {} prefixes and dst only {} prefixes",
                f(s4),
                f(d4)
            ),
        });
    }
    let stateful = match (action, spec.stateful) {
        (Some(Action::Deny), Some(true)) => {
            errors.push(RuleError::StatefulDeny { rule: rule.clone() });
            false
        }
        (Some(Action::Allow), s) => s.unwrap_or(true),
        _ => false,
    };
    if errors.len() != before {
        return None;
    }
    let (Some(direction), Some(action), Some(protocol)) = (direction, action, protocol) else {
        return None;
    };
    Some(Rule {
        name: spec
            .name
            .clone()
            .unwrap_or_else(|| format!("{direction}-{priority}")),
        priority,
        direction,
        action,
        protocol,
        src,
        dst,
        src_ports,
        dst_ports,
        stateful,
    })
}

/// Validates every rule of group `nsg`: returns the rules, or every problem
/// (a group with any error is rejected whole).
pub fn validate(nsg: &str, specs: &[RuleSpec]) -> Result<Vec<Rule>, Vec<RuleError>> {
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let label = match &spec.name {
            Some(n) => format!(
                "nsg {nsg:?} rule {n:?} (priority {}, {})",
                spec.priority, spec.direction
            ),
            None => format!(
                "nsg {nsg:?} rule #{} (priority {}, {})",
                i + 1,
                spec.priority,
                spec.direction
            ),
        };
        if let Some(r) = validate_rule(&label, spec, &mut errors) {
            rules.push(r);
        }
    }
    let mut seen: std::collections::HashMap<(Direction, u32), &str> = Default::default();
    for r in &rules {
        if let Some(first) = seen.insert((r.direction, r.priority), &r.name) {
            errors.push(RuleError::DuplicatePriority {
                nsg: nsg.to_string(),
                direction: r.direction,
                priority: r.priority,
                first: first.to_string(),
                second: r.name.clone(),
            });
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// What the default rules need to know about the VM's surroundings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultContext {
    /// The prefixes of the VM's vnet.
    pub vnet: Vec<IpNet>,
    /// The health-probe source address (default 168.63.129.16).
    pub probe_source: IpAddr,
    /// Destinations reached through the uplink ("Internet" in Azure terms).
    pub uplink: Vec<IpNet>,
}

impl DefaultContext {
    /// Defaults for a vnet: probe source 168.63.129.16, uplink = [`internet`].
    pub fn for_vnet(vnet: Vec<IpNet>) -> Self {
        DefaultContext {
            vnet,
            probe_source: DEFAULT_PROBE_SOURCE,
            uplink: internet(),
        }
    }
}

/// Public address space: every address except private, shared, loopback,
/// link-local, multicast and reserved ranges (IPv4 and IPv6), as prefixes.
pub fn internet() -> Vec<IpNet> {
    let v4_reserved: [Ipv4Net; 9] = [
        Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10),
        Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
        Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
        Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
        Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4),
        Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4),
    ];
    let v6_reserved: [Ipv6Net; 5] = [
        Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128),
        Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128),
        Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
        Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
        Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
    ];
    let mut out: Vec<IpNet> = complement(
        &v4_reserved.map(|n| (u128::from(u32::from(n.network())), n.prefix_len())),
        32,
    )
    .into_iter()
    .map(|(a, l)| IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::from(a as u32), l)))
    .collect();
    out.extend(
        complement(
            &v6_reserved.map(|n| (u128::from(n.network()), n.prefix_len())),
            128,
        )
        .into_iter()
        .map(|(a, l)| IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::from(a), l))),
    );
    out
}

/// The prefixes covering every `bits`-bit address not covered by `nets`.
fn complement(nets: &[(u128, u8)], bits: u8) -> Vec<(u128, u8)> {
    fn walk(addr: u128, len: u8, bits: u8, nets: &[(u128, u8)], out: &mut Vec<(u128, u8)>) {
        let span = |a: u128, l: u8| -> (u128, u128) {
            let size = if bits - l >= 128 {
                u128::MAX
            } else {
                (1u128 << (bits - l)) - 1
            };
            (a, a + size)
        };
        let (lo, hi) = span(addr, len);
        if nets.iter().any(|&(a, l)| {
            l <= len && {
                let (nl, nh) = span(a, l);
                nl <= lo && hi <= nh
            }
        }) {
            return; // fully reserved
        }
        if !nets.iter().any(|&(a, l)| {
            let (nl, nh) = span(a, l);
            nl <= hi && lo <= nh
        }) {
            out.push((addr, len)); // no reserved overlap
            return;
        }
        let half = 1u128 << (bits - len - 1);
        walk(addr, len + 1, bits, nets, out);
        walk(addr + half, len + 1, bits, nets, out);
    }
    let mut out = Vec::new();
    walk(0, 0, bits, nets, &mut out);
    out
}

/// Priorities of the default rules (Azure's numbers).
pub mod default_priority {
    /// Allow the same vnet.
    pub const ALLOW_VNET: u32 = 65000;
    /// Allow the probe source (in) / the uplink (out).
    pub const ALLOW_PROBE_OR_UPLINK: u32 = 65001;
    /// Deny the rest.
    pub const DENY_ALL: u32 = 65500;
}

/// The default rules of one direction, in Azure's style, below every explicit
/// rule: inbound allows the vnet and the probe source and denies the rest;
/// outbound allows the vnet and the uplink and denies the rest.
pub fn default_rules(direction: Direction, ctx: &DefaultContext) -> Vec<Rule> {
    let rule = |name: &str, priority, action, src: Vec<IpNet>, dst: Vec<IpNet>| Rule {
        name: name.to_string(),
        priority,
        direction,
        action,
        protocol: Protocol::Any,
        src,
        dst,
        src_ports: vec![PortRange::ANY],
        dst_ports: vec![PortRange::ANY],
        stateful: action == Action::Allow,
    };
    use default_priority::*;
    match direction {
        Direction::In => vec![
            rule(
                "AllowVnetInBound",
                ALLOW_VNET,
                Action::Allow,
                ctx.vnet.clone(),
                ctx.vnet.clone(),
            ),
            rule(
                "AllowProbeInBound",
                ALLOW_PROBE_OR_UPLINK,
                Action::Allow,
                vec![IpNet::from(ctx.probe_source)],
                any_nets(),
            ),
            rule(
                "DenyAllInBound",
                DENY_ALL,
                Action::Deny,
                any_nets(),
                any_nets(),
            ),
        ],
        Direction::Out => vec![
            rule(
                "AllowVnetOutBound",
                ALLOW_VNET,
                Action::Allow,
                ctx.vnet.clone(),
                ctx.vnet.clone(),
            ),
            rule(
                "AllowUplinkOutBound",
                ALLOW_PROBE_OR_UPLINK,
                Action::Allow,
                any_nets(),
                ctx.uplink.clone(),
            ),
            rule(
                "DenyAllOutBound",
                DENY_ALL,
                Action::Deny,
                any_nets(),
                any_nets(),
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(priority: i64, dir: &str, action: &str, proto: &str) -> RuleSpec {
        RuleSpec {
            name: None,
            priority,
            direction: dir.into(),
            action: action.into(),
            protocol: proto.into(),
            src: default_any(),
            dst: default_any(),
            src_ports: default_any(),
            dst_ports: default_any(),
            stateful: None,
        }
    }

    fn pkt(src: &str, dst: &str, proto: u8, sp: u16, dp: u16) -> FlowKey {
        FlowKey::new(src.parse().unwrap(), sp, dst.parse().unwrap(), dp, proto)
    }

    #[test]
    fn parses_an_example_group_from_toml() {
        let nsg: NsgSpec = toml::from_str(
            r#"
            name = "web"
            [[rule]]
            priority = 100
            direction = "in"
            action = "allow"
            protocol = "tcp"
            src = ["10.1.0.0/24"]
            dst = ["any"]
            src_ports = ["any"]
            dst_ports = ["80", "8000-8100"]
            "#,
        )
        .unwrap();
        let rules = validate(&nsg.name, &nsg.rules).unwrap();
        let r = &rules[0];
        assert_eq!(
            (r.priority, r.direction, r.action, r.protocol),
            (100, Direction::In, Action::Allow, Protocol::Tcp)
        );
        assert_eq!(r.name, "in-100");
        assert!(r.stateful);
        assert_eq!(
            r.dst_ports,
            vec![
                PortRange { lo: 80, hi: 80 },
                PortRange { lo: 8000, hi: 8100 }
            ]
        );
        assert!(r.matches(&pkt("10.1.0.7", "10.1.0.4", 6, 5555, 8050)));
        assert!(!r.matches(&pkt("10.1.1.7", "10.1.0.4", 6, 5555, 80)));
        assert!(!r.matches(&pkt("10.1.0.7", "10.1.0.4", 17, 5555, 80)));
        assert!(!r.matches(&pkt("10.1.0.7", "10.1.0.4", 6, 5555, 81)));
    }

    #[test]
    fn every_error_names_its_rule_and_all_are_reported() {
        let mut bad_prefix = spec(100, "in", "allow", "tcp");
        bad_prefix.src = vec![
            "10.1.0.0/33".into(),
            "10.1.0.1/24".into(),
            "nonsense".into(),
        ];
        let mut reversed = spec(101, "in", "allow", "tcp");
        reversed.dst_ports = vec!["200-100".into(), "http".into()];
        let mut icmp_ports = spec(102, "in", "allow", "icmp");
        icmp_ports.dst_ports = vec!["80".into()];
        let dup1 = spec(103, "out", "deny", "any");
        let mut dup2 = spec(103, "out", "allow", "udp");
        dup2.name = Some("second".into());
        let mut mixed = spec(104, "in", "allow", "any");
        mixed.src = vec!["10.0.0.0/8".into()];
        mixed.dst = vec!["2001:db8::/32".into()];
        let low = spec(99, "in", "allow", "any");
        let mut words = spec(105, "sideways", "maybe", "sctp");
        words.src = vec![];
        let mut stateful_deny = spec(106, "in", "deny", "any");
        stateful_deny.stateful = Some(true);
        let ok = spec(107, "in", "allow", "any");
        let all = vec![
            bad_prefix,
            reversed,
            icmp_ports,
            dup1,
            dup2,
            mixed,
            low,
            words,
            stateful_deny,
            ok,
        ];
        let errs = validate("web", &all).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(
            has("rule #1 (priority 100, in): src \"10.1.0.0/33\" is not a prefix"),
            "{text:#?}"
        );
        assert!(
            has(
                "src \"10.1.0.1/24\" is not a prefix or address: host bits are set (did you mean 10.1.0.0/24?)"
            ),
            "{text:#?}"
        );
        assert!(has("src \"nonsense\""), "{text:#?}");
        assert!(
            has("rule #2 (priority 101, in): dst_ports \"200-100\": range is reversed (200 > 100)"),
            "{text:#?}"
        );
        assert!(
            has("dst_ports \"http\": \"http\" is not a port number"),
            "{text:#?}"
        );
        assert!(
            has("rule #3 (priority 102, in): dst_ports must be \"any\" on an icmp rule"),
            "{text:#?}"
        );
        assert!(
            has("nsg \"web\": priority 103 (out) is used by both \"out-103\" and \"second\""),
            "{text:#?}"
        );
        assert!(
            has(
                "rule #6 (priority 104, in): can never match: src has only IPv4 prefixes and dst only IPv6"
            ),
            "{text:#?}"
        );
        assert!(
            has("rule #7 (priority 99, in): priority 99 is outside 100-4096"),
            "{text:#?}"
        );
        assert!(
            has("direction \"sideways\" is not one of in, out"),
            "{text:#?}"
        );
        assert!(
            has("action \"maybe\" is not one of allow, deny"),
            "{text:#?}"
        );
        assert!(
            has("protocol \"sctp\" is not one of tcp, udp, icmp, any"),
            "{text:#?}"
        );
        assert!(
            has("rule #8 (priority 105, sideways): src is empty"),
            "{text:#?}"
        );
        assert!(
            has("rule #9 (priority 106, in): stateful applies to allow rules only"),
            "{text:#?}"
        );
        assert_eq!(errs.len(), 14, "{text:#?}");
    }

    #[test]
    fn same_priority_in_both_directions_is_fine() {
        let rules = validate(
            "g",
            &[
                spec(100, "in", "allow", "any"),
                spec(100, "out", "allow", "any"),
            ],
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn ports_restrict_a_rule_to_tcp_and_udp() {
        let mut s = spec(100, "in", "deny", "any");
        s.dst_ports = vec!["22".into()];
        let r = validate("g", &[s]).unwrap().remove(0);
        assert!(r.matches(&pkt("1.1.1.1", "2.2.2.2", 6, 1, 22)));
        assert!(r.matches(&pkt("1.1.1.1", "2.2.2.2", 17, 1, 22)));
        assert!(!r.matches(&pkt("1.1.1.1", "2.2.2.2", 1, 0, 0)));
        let any = validate("g", &[spec(100, "in", "deny", "any")])
            .unwrap()
            .remove(0);
        assert!(any.matches(&pkt("1.1.1.1", "2.2.2.2", 1, 0, 0)));
        assert!(any.matches(&pkt("::1", "::2", 58, 0, 0)));
    }

    #[test]
    fn defaults_follow_azure() {
        let ctx = DefaultContext::for_vnet(vec!["10.1.0.0/16".parse().unwrap()]);
        let first = |dir, p: &FlowKey| {
            default_rules(dir, &ctx)
                .into_iter()
                .find(|r| r.matches(p))
                .unwrap()
        };
        let r = first(Direction::In, &pkt("10.1.2.3", "10.1.0.4", 6, 1, 80));
        assert_eq!(
            (r.name.as_str(), r.action),
            ("AllowVnetInBound", Action::Allow)
        );
        let r = first(Direction::In, &pkt("168.63.129.16", "10.1.0.4", 6, 1, 8080));
        assert_eq!(
            (r.name.as_str(), r.action),
            ("AllowProbeInBound", Action::Allow)
        );
        let r = first(Direction::In, &pkt("8.8.8.8", "10.1.0.4", 6, 1, 80));
        assert_eq!(
            (r.name.as_str(), r.action),
            ("DenyAllInBound", Action::Deny)
        );
        let r = first(Direction::Out, &pkt("10.1.0.4", "10.1.9.9", 17, 1, 53));
        assert_eq!(r.name, "AllowVnetOutBound");
        let r = first(Direction::Out, &pkt("10.1.0.4", "8.8.8.8", 17, 1, 53));
        assert_eq!(
            (r.name.as_str(), r.action),
            ("AllowUplinkOutBound", Action::Allow)
        );
        let r = first(
            Direction::Out,
            &pkt("10.1.0.4", "2606:4700::1111", 6, 1, 443),
        );
        assert_eq!(r.name, "AllowUplinkOutBound");
        // Another private network is neither the vnet nor the uplink.
        let r = first(Direction::Out, &pkt("10.1.0.4", "192.168.1.1", 6, 1, 443));
        assert_eq!(
            (r.name.as_str(), r.action),
            ("DenyAllOutBound", Action::Deny)
        );
        let r = first(Direction::Out, &pkt("10.1.0.4", "10.2.0.1", 6, 1, 443));
        assert_eq!(r.action, Action::Deny);
    }

    #[test]
    fn internet_is_the_exact_complement_of_the_reserved_ranges() {
        let inet = internet();
        let inside = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            inet.iter().filter(|n| n.contains(&ip)).count()
        };
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "11.0.0.0",
            "9.255.255.255",
            "172.32.0.0",
            "223.255.255.255",
            "2001:db8::1",
            "2606:4700::1",
        ] {
            assert_eq!(inside(public), 1, "{public}");
        }
        for private in [
            "10.0.0.1",
            "172.16.5.5",
            "172.31.255.255",
            "192.168.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::1",
        ] {
            assert_eq!(inside(private), 0, "{private}");
        }
    }
}
