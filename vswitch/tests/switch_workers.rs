//! Two switch workers sharing every port (each ring end polled by both, like
//! a two-queue NIC whose hash ignores NAT): connections through a VIP (DNAT
//! and reverse NAT) and out through SNAT must work whichever worker receives
//! each packet, because packets are handed to the worker that owns their
//! connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use arc_swap::ArcSwap;
use common::{Running, Vm, pool, run_until, vm_port};
use dataplane::pool::PoolBuf;
use dataplane::port::ring::RingPort;
use dataplane::worker::Worker;
use dataplane::{MacAddr, Port};
use lb::balancer::{Backend, VipConfig};
use lb::snat::SnatConfig;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vswitch::switch::Handoff;
use vswitch::{
    Policy, Switch, SwitchConfig, SwitchStats, Topology, UplinkDef, VipDef, VmDef, VnetDef,
};

const GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const INET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

const WEB: [(&str, &str); 3] = [
    ("web1", "10.1.0.4"),
    ("web2", "10.1.0.5"),
    ("web3", "10.1.0.6"),
];

fn topology() -> Topology {
    let vm = |name: &str, port: u16, ip: &str| VmDef {
        name: name.into(),
        port,
        vnet: 0,
        mac: mac(port as u8 + 1),
        ips: vec![ip.parse().unwrap()],
        nsg: None,
        internal: false,
    };
    let backends = WEB
        .iter()
        .map(|(_, ip)| Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
            weight: 1,
        })
        .collect();
    let mut vms: Vec<VmDef> = WEB
        .iter()
        .enumerate()
        .map(|(i, (n, ip))| vm(n, i as u16, ip))
        .collect();
    vms.push(vm("client", 3, "10.1.0.20"));
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]),
            snat: Some(SnatConfig {
                public_ips: vec![IpAddr::V4(SNAT_IP)],
                block_size: 64,
                blocks_per_member: 2,
                ..SnatConfig::default()
            }),
            vni: None,
            encap: Default::default(),
        }],
        vms,
        nsgs: vec![],
        vips: vec![VipDef {
            vnet: 0,
            config: VipConfig::new("web", IpAddr::V4(VIP), 80, 6, backends),
            health: vec![],
        }],
        ports: 5,
        uplink: Some(UplinkDef {
            port: 4,
            mac: MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xfe]),
            next_hop_mac: mac(0x40),
            underlay: None,
        }),
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

#[test]
fn two_workers_keep_each_connection_on_its_owner() {
    let pool = pool("workers");
    let start = Instant::now();
    let mut vms = Vec::new();
    let mut ends: Vec<RingPort<PoolBuf>> = Vec::new();
    for (i, (n, ip)) in WEB.iter().enumerate() {
        let (v, sw) = vm_port(n, mac(i as u8 + 1));
        vms.push(Vm::new(n, v, pool, ip.parse().unwrap(), GW, Some(8080), start).unwrap());
        ends.push(sw);
    }
    let (c, sw) = vm_port("client", mac(4));
    vms.push(
        Vm::new(
            "client",
            c,
            pool,
            "10.1.0.20".parse().unwrap(),
            GW,
            None,
            start,
        )
        .unwrap(),
    );
    ends.push(sw);
    let (i, sw) = vm_port("inet", mac(0x40));
    let inet_gw = Ipv4Addr::new(203, 0, 113, 254);
    vms.push(Vm::new("inet", i, pool, INET, inet_gw, Some(8080), start).unwrap());
    ends.push(sw);

    let policy = Arc::new(ArcSwap::from_pointee(
        Policy::compile(&topology(), 1).unwrap(),
    ));
    let handoff = Handoff::new(2, 4096);
    let mut stats: Vec<Arc<SwitchStats>> = Vec::new();
    let mut workers: Vec<Running> = Vec::new();
    for w in 0..2 {
        let ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = ends
            .iter()
            .map(|e| Box::new(e.share()) as Box<dyn Port<Buf = PoolBuf>>)
            .collect();
        let sw =
            Switch::new(policy.clone(), SwitchConfig::default()).with_handoff(w, handoff.clone());
        stats.push(sw.stats());
        let worker = Worker::new(&format!("w{w}"), None, ports, sw);
        workers.push(Running::spawn(worker));
    }

    let (client, inet) = (3, 4);
    let gets: Vec<usize> = (0..24).map(|_| vms[client].get(VIP, 80, "/")).collect();
    let out: Vec<usize> = (0..6).map(|_| vms[client].get(INET, 8080, "/")).collect();
    let mut refs: Vec<&mut Vm> = vms.iter_mut().collect();
    let done = run_until(&mut refs, Duration::from_secs(30), |vms| {
        gets.iter()
            .chain(&out)
            .all(|&g| vms[client].body(g).is_some())
    });
    drop(workers);
    let sum = |f: fn(&SwitchStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let drops: Vec<_> = stats.iter().map(|s| s.nonzero()).collect();
    assert!(done, "not every request completed; drops {drops:?}");
    let bodies: HashSet<String> = gets.iter().map(|&g| vms[client].body(g).unwrap()).collect();
    assert!(bodies.len() >= 2, "{bodies:?}");
    assert!(bodies.iter().all(|b| b.starts_with("web")), "{bodies:?}");
    for &g in &out {
        assert_eq!(vms[client].body(g).unwrap(), "inet");
    }
    assert!(
        vms[inet].peers.iter().all(|p| p.0 == SNAT_IP),
        "{:?}",
        vms[inet].peers
    );
    // Both workers did work, and packets did cross between them.
    for s in &stats {
        let work = s.fast_path.load(Ordering::Relaxed) + s.slow_path.load(Ordering::Relaxed);
        assert!(work > 0, "a worker processed nothing");
    }
    assert!(sum(|s| s.handed_off.load(Ordering::Relaxed)) > 0);
    assert!(drops.iter().all(|d| d.is_empty()), "{drops:?}");
}
