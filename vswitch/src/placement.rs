//! Which worker owns a connection: both directions of a connection, before
//! and after NAT, must meet the per-core state (flow table, connection
//! tracking, SNAT ports) of one worker. Ports spread packets over workers by
//! their own hash (NIC RSS, AF_PACKET fanout, shared rings), so the switch
//! hands a packet that arrived at the wrong worker to its owner.
//!
//! The owner is computed from the packet alone, the same way for both
//! directions:
//! - a packet from the wire (or hairpinned) to a SNAT address belongs to the worker
//!   whose SNAT blocks hold its destination port (ICMP: its echo
//!   identifier) ([`lb::snat::SnatConfig::worker_of`]); a worker only hands
//!   out ports of its own blocks, so the outbound direction was placed
//!   there already;
//! - when exactly one side is a service endpoint (a VIP frontend or a
//!   backend), the hash of the *other* side (the client's address and port),
//!   which DNAT and reverse NAT leave unchanged;
//! - a packet from a VM of a vnet with SNAT to an address outside the vnet:
//!   the hash of its source (address and port, or echo identifier), so
//!   that every connection of one private endpoint meets the one mapping
//!   that endpoint-independent SNAT gives it, on one worker;
//! - a Mux's health probe (from the prober to a DIP of a Mux VIP, sent
//!   on from the uplink's address) and its reply (from the wire to the
//!   uplink's address): the hash of the prober's port alone, which the
//!   probe's NAT keeps;
//! - otherwise a symmetric hash of both endpoints (ICMP: of both addresses
//!   and the echo identifier).

use crate::hash::FxHasher;
use crate::policy::Policy;
use dataplane::FlowKey;
use std::hash::Hasher;

fn endpoint(ip: &[u8; 16], port: u16) -> u64 {
    let mut h = FxHasher::default();
    h.write(ip);
    h.write_u16(port);
    h.finish()
}

/// The worker of `workers` that owns the connection of `k`, which arrived
/// on `in_port`.
pub fn owner(p: &Policy, in_port: u16, k: &FlowKey, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    let icmp = matches!(k.proto, 1 | 58);
    let vm = p.vm_on_port(in_port).map(|(_, vm)| vm);
    // From the wire (or hairpinned): to a SNAT port, its block's worker.
    // (Echo request and reply both carry the identifier in `src_port`.) A
    // VM's packet to a SNAT address is placed by its own source below: it
    // takes its own mapping first, and only its hairpinned half goes to
    // the destination port's worker.
    let dst_port = if icmp { k.src_port } else { k.dst_port };
    if vm.is_none()
        && let Some(w) = p.snat_worker(k.dst_ip, dst_port, workers)
    {
        return w;
    }
    let mine = p.is_own_address(k.dst());
    let probe_port = match vm {
        Some(vm) if vm.internal && p.mux_port(k.dst()).is_some() => Some(k.src_port),
        None if mine => Some(k.dst_port),
        _ => None,
    };
    let snat_source = || {
        vm.and_then(|vm| p.vnets.get(vm.vnet))
            .is_some_and(|v| v.snat.is_some() && !v.contains(&k.dst()))
    };
    let h = if let Some(port) = probe_port {
        endpoint(&[0; 16], port)
    } else if icmp {
        if snat_source() {
            endpoint(&k.src_ip, k.src_port)
        } else {
            let (a, b) = (endpoint(&k.src_ip, 0), endpoint(&k.dst_ip, 0));
            a.wrapping_add(b) ^ endpoint(&[0; 16], k.src_port)
        }
    } else {
        let src = p.is_service(k.src_ip, k.src_port, k.proto);
        let dst = p.is_service(k.dst_ip, k.dst_port, k.proto);
        match (src, dst) {
            (true, false) => endpoint(&k.dst_ip, k.dst_port),
            (false, true) => endpoint(&k.src_ip, k.src_port),
            _ if snat_source() => endpoint(&k.src_ip, k.src_port),
            _ => endpoint(&k.src_ip, k.src_port).wrapping_add(endpoint(&k.dst_ip, k.dst_port)),
        }
    };
    // FxHash's low bits are weak; the finaliser in `finish` mixed them, and
    // the sum of two mixed values is mixed again here.
    let mut f = FxHasher::default();
    f.write_u64(h);
    (f.finish() % workers as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Topology, UplinkDef, VipDef, VmDef, VnetDef};
    use dataplane::MacAddr;
    use dataplane::key::to16;
    use lb::balancer::{Backend, VipConfig};
    use lb::snat::SnatConfig;
    use std::net::IpAddr;

    fn ip(s: &str) -> [u8; 16] {
        to16(s.parse().unwrap())
    }

    fn key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src_ip: ip(src),
            dst_ip: ip(dst),
            src_port: sport,
            dst_port: dport,
            proto,
        }
    }

    fn policy() -> Policy {
        let vm = |name: &str, port: u16, a: &str| VmDef {
            name: name.into(),
            port,
            vnet: 0,
            mac: MacAddr([2, 0, 0, 0, 0, port as u8 + 1]),
            ips: vec![a.parse().unwrap()],
            nsg: None,
            internal: false,
        };
        let backends = ["10.1.0.4", "10.1.0.5"]
            .iter()
            .map(|b| Backend {
                ip: b.parse().unwrap(),
                port: 8080,
                weight: 1,
            })
            .collect();
        let t = Topology {
            vnets: vec![VnetDef {
                name: "a".into(),
                prefixes: vec!["10.1.0.0/16".parse().unwrap()],
                gateway_mac: MacAddr([0x12, 0, 0, 0, 0, 1]),
                snat: Some(SnatConfig {
                    public_ips: vec!["203.0.113.10".parse().unwrap()],
                    ..SnatConfig::default()
                }),
                vni: None,
                encap: Default::default(),
            }],
            vms: vec![
                vm("w1", 0, "10.1.0.4"),
                vm("w2", 1, "10.1.0.5"),
                vm("c", 2, "10.1.0.20"),
            ],
            nsgs: vec![],
            vips: vec![VipDef {
                vnet: 0,
                config: VipConfig::new("web", IpAddr::from([10, 1, 0, 100]), 80, 6, backends),
                health: vec![],
            }],
            ports: 4,
            uplink: Some(UplinkDef {
                port: 3,
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                next_hop_mac: MacAddr([2, 0, 0, 0, 0, 10]),
                underlay: None,
            }),
            ..Topology::default()
        };
        Policy::compile(&t, 1).unwrap()
    }

    #[test]
    fn both_directions_of_every_connection_meet() {
        let p = policy();
        for workers in [2usize, 3, 4, 7] {
            let mut used = std::collections::HashSet::new();
            for cport in 40000..40200u16 {
                // Client -> VIP, and the DIP's reply after DNAT.
                let orig = key("10.1.0.20", cport, "10.1.0.100", 80, 6);
                let w = owner(&p, 2, &orig, workers);
                used.insert(w);
                for (dport, dip) in [(0, "10.1.0.4"), (1, "10.1.0.5")] {
                    let reply = key(dip, 8080, "10.1.0.20", cport, 6);
                    assert_eq!(owner(&p, dport, &reply, workers), w);
                    // And straight to a DIP, not through the VIP.
                    let direct = key("10.1.0.20", cport, dip, 8080, 6);
                    assert_eq!(owner(&p, 2, &direct, workers), w);
                }
                // VM to VM, no service: symmetric.
                let a = key("10.1.0.20", cport, "10.1.0.4", 22, 6);
                let b = key("10.1.0.4", 22, "10.1.0.20", cport, 6);
                assert_eq!(owner(&p, 2, &a, workers), owner(&p, 0, &b, workers));
                // ICMP echo: the identifier rides in src_port both ways.
                let e = key("10.1.0.20", cport, "10.1.0.4", 0, 1);
                let r = key("10.1.0.4", cport, "10.1.0.20", 0, 1);
                assert_eq!(owner(&p, 2, &e, workers), owner(&p, 0, &r, workers));
                // Replies from the wire to a SNAT port go to the port's worker.
                let back = key("198.51.100.7", 443, "203.0.113.10", 1024 + cport % 4000, 6);
                let snat = SnatConfig::default();
                assert_eq!(
                    Some(owner(&p, 3, &back, workers)),
                    snat.worker_of(1024 + cport % 4000, workers)
                );
                // An echo reply to a SNAT address: by its identifier.
                let echo = key("198.51.100.7", 1024 + cport % 4000, "203.0.113.10", 0, 1);
                assert_eq!(
                    Some(owner(&p, 3, &echo, workers)),
                    snat.worker_of(1024 + cport % 4000, workers)
                );
                // Out through SNAT: every destination of one private
                // endpoint on one worker (its one mapping's), a SNAT
                // address of the switch too (hairpinning: the VM's own
                // mapping first; the hairpinned half, from the hairpin
                // port, then goes to the destination port's worker).
                for proto in [6, 17, 1] {
                    let out = |dst: &str, dport: u16| key("10.1.0.20", cport, dst, dport, proto);
                    let first = owner(&p, 2, &out("198.51.100.1", 443), workers);
                    for dport in [1024, 1025, 1026, 2000] {
                        assert_eq!(owner(&p, 2, &out("203.0.113.10", dport), workers), first);
                        let looped = key("203.0.113.10", 5000, "203.0.113.10", dport, 6);
                        assert_eq!(
                            Some(owner(&p, crate::flow::HAIRPIN_PORT, &looped, workers)),
                            snat.worker_of(dport, workers)
                        );
                    }
                    for (dst, dport) in [("198.51.100.2", 443), ("192.0.2.9", 3478)] {
                        assert_eq!(owner(&p, 2, &out(dst, dport), workers), first);
                    }
                }
            }
            assert_eq!(used.len(), workers, "connections spread over every worker");
        }
        assert_eq!(owner(&p, 2, &key("10.1.0.20", 1, "10.1.0.4", 2, 6), 1), 0);
    }
}
