//! # filter — the packet filter (network security groups)
//!
//! Owns: the security-group rule model (priority, direction, action, protocol,
//! prefixes, port ranges, stateful flag), the Azure-style default rules, the
//! compiler from a rule set to a classifier, and per-rule hit counters.
//!
//! Must not touch: ports, threads, clocks or any I/O. It is pure logic over the
//! flow keys that [`dataplane`] parses, so it is testable without a network.
//!
//! Status: the rule model and classifier are the subject of the packet-filter
//! issue; this crate only fixes its place in the workspace for now.
