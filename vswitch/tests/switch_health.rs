//! Health changes are per VIP: a backend of VIP A flips 100 times while
//! 10 000 established UDP connections flow to VIPs A and B. VIP B's flows
//! never leave the fast path; VIP A's are revalidated once per flip (one
//! slow-path lookup each) and keep their backends, also while theirs is
//! down; new connections follow the health state. The worker is polled by
//! hand, so each burst is exactly what was sent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use arc_swap::ArcSwap;
use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::Worker;
use dataplane::{BURST, Batch, LinkInfo, MacAddr, PacketBuf, Port};
use lb::balancer::{Backend, VipConfig};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vswitch::{Policy, Switch, SwitchConfig, SwitchStats, Topology, VipDef, VmDef, VnetDef};

const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 101);
const GW_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
/// Source ports: VIP A's established flows, VIP B's, then new connections.
const A_PORTS: u16 = 10_000;
const B_PORTS: u16 = 20_000;
const NEW_PORTS: u16 = 30_000;
const FLOWS_PER_VIP: u16 = 5_000;

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

/// A client on port 0; backends 10.1.0.4-7 on ports 1-4; VIP A balances
/// over the first two, VIP B over the other two (UDP 80 -> 8080).
fn topology() -> Topology {
    let mut vms = vec![VmDef {
        name: "client".into(),
        port: 0,
        vnet: 0,
        mac: mac(1),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 1, 1))],
        nsg: None,
        internal: false,
    }];
    for b in 0..4u8 {
        vms.push(VmDef {
            name: format!("web{b}"),
            port: 1 + u16::from(b),
            vnet: 0,
            mac: mac(10 + b),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4 + b))],
            nsg: None,
            internal: false,
        });
    }
    let vip = |name: &str, addr: Ipv4Addr, first: u8| VipDef {
        vnet: 0,
        config: VipConfig::new(
            name,
            IpAddr::V4(addr),
            80,
            17,
            (first..first + 2)
                .map(|b| Backend {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4 + b)),
                    port: 8080,
                    weight: 1,
                })
                .collect(),
        ),
        health: vec![],
    };
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: GW_MAC,
            snat: None,
            vni: None,
            encap: Default::default(),
        }],
        vms,
        nsgs: vec![],
        vips: vec![vip("a", VIP_A, 0), vip("b", VIP_B, 2)],
        ports: 5,
        uplink: None,
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

/// A UDP frame from the client, source port `sport`, to `vip`:80.
fn frame(vip: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(1).0, GW_MAC.0)
        .ipv4([10, 1, 1, 1], vip.octets(), 64)
        .udp(sport, 80)
        .write(&mut v, &[7u8; 18])
        .unwrap();
    v
}

struct Rig {
    pool: Pool,
    policy: Arc<ArcSwap<Policy>>,
    stats: Arc<SwitchStats>,
    client: RingPort<PoolBuf>,
    backends: Vec<RingPort<PoolBuf>>,
    worker: Worker<PoolBuf, Switch>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(SwitchConfig::default())
    }

    fn with(switch: SwitchConfig) -> Rig {
        let mut cfg = PoolConfig::new("health-flips", 4096);
        cfg.huge = HugePages::Never;
        let pool = Pool::new(&cfg).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(), 1).unwrap(),
        ));
        let sw = Switch::new(policy.clone(), switch);
        let stats = sw.stats();
        let l = |n: &str| LinkInfo::new(n, MacAddr([2, 0, 0, 0, 9, 9]), "ring");
        let (client, sw_client) = ring::pair(l("client"), l("sw-client"), 256);
        let mut ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = vec![Box::new(sw_client)];
        let mut backends = Vec::new();
        for b in 0..4 {
            let (d, s) = ring::pair(l(&format!("web{b}")), l(&format!("sw-web{b}")), 256);
            backends.push(d);
            ports.push(Box::new(s));
        }
        Rig {
            pool,
            policy,
            stats,
            client,
            backends,
            worker: Worker::new("health", None, ports, sw),
        }
    }

    /// Sends `frames` through the switch a burst at a time; returns, per
    /// source port, the backend (0-3) each packet reached, checking that
    /// the switch rewrote it to that backend's address.
    fn pass(&mut self, frames: &[Vec<u8>]) -> HashMap<u16, usize> {
        let mut got = HashMap::new();
        let mut b = Batch::new();
        for chunk in frames.chunks(BURST) {
            for f in chunk {
                b.push(self.pool.alloc_copy(f).unwrap()).unwrap();
            }
            assert_eq!(self.client.tx_burst(&mut b), chunk.len());
            self.worker.poll_once();
            for (i, port) in self.backends.iter_mut().enumerate() {
                port.rx_burst(&mut b);
                for p in b.drain() {
                    let f = p.data();
                    assert_eq!(&f[26..34][4..], &[10, 1, 0, 4 + i as u8], "dst of web{i}");
                    let sport = u16::from_be_bytes([f[34], f[35]]);
                    assert!(
                        got.insert(sport, i).is_none(),
                        "flow {sport} twice in a pass"
                    );
                }
            }
        }
        assert_eq!(got.len(), frames.len(), "every packet forwarded");
        got
    }

    fn slow(&self) -> u64 {
        self.stats.slow_path.load(Ordering::Relaxed)
    }

    /// Sets backend 0 of VIP A (web0) up or down, as a probe verdict does.
    fn web0(&self, up: bool) {
        let changed = self
            .policy
            .load()
            .set_health(0, (IpAddr::V4(VIP_A), 80, 17), 0, up)
            .unwrap();
        assert!(changed);
    }
}

#[test]
fn a_health_flip_revalidates_only_its_own_vips_flows() {
    let mut rig = Rig::new();
    let a: Vec<Vec<u8>> = (0..FLOWS_PER_VIP)
        .map(|i| frame(VIP_A, A_PORTS + i))
        .collect();
    let b: Vec<Vec<u8>> = (0..FLOWS_PER_VIP)
        .map(|i| frame(VIP_B, B_PORTS + i))
        .collect();
    // Establish the 10 000 connections: one slow-path decision each.
    let a_backend = rig.pass(&a);
    let b_backend = rig.pass(&b);
    assert_eq!(rig.slow(), 2 * u64::from(FLOWS_PER_VIP));
    for (vip, backends, on) in [("A", &a_backend, [0, 1]), ("B", &b_backend, [2, 3])] {
        for w in on {
            let n = backends.values().filter(|&&x| x == w).count();
            assert!(n > 2_000, "VIP {vip}: {n} of 5 000 on web{w}");
        }
    }
    let generation = rig.policy.load().generation;
    let mut new_port = NEW_PORTS;
    for flip in 0..100 {
        let up = flip % 2 == 1;
        rig.web0(up);
        // VIP B's established flows: all on the fast path, same backends.
        let before = rig.slow();
        assert_eq!(rig.pass(&b), b_backend, "flip {flip}: VIP B moved");
        assert_eq!(rig.slow(), before, "flip {flip}: VIP B left the fast path");
        // VIP A's: revalidated once each (the connection keeps its
        // backend, web0 too while it is down), then fast again.
        if flip % 10 == 0 {
            let before = rig.slow();
            assert_eq!(rig.pass(&a), a_backend, "flip {flip}: VIP A moved");
            assert_eq!(rig.slow() - before, u64::from(FLOWS_PER_VIP), "flip {flip}");
            let before = rig.slow();
            assert_eq!(rig.pass(&a), a_backend);
            assert_eq!(rig.slow(), before, "flip {flip}: revalidated twice");
        }
        // New connections follow the health state.
        let new: Vec<Vec<u8>> = (0..64).map(|i| frame(VIP_A, new_port + i)).collect();
        new_port += 64;
        let to = rig.pass(&new);
        let on_web0 = to.values().filter(|&&x| x == 0).count();
        if up {
            assert!(
                on_web0 > 0,
                "flip {flip}: web0 is up but gets no new connection"
            );
        } else {
            assert_eq!(
                on_web0, 0,
                "flip {flip}: new connections reached web0 while down"
            );
        }
        assert!(to.values().all(|&x| x < 2), "VIP A's backends only");
    }
    // Health never made a new policy generation.
    assert_eq!(rig.policy.load().generation, generation);
}

/// A flow whose load-balancer connection timed out while the flow stayed
/// cached keeps its backend and stops telling the load balancer; with no
/// connection left to revalidate, a health change of its VIP leaves it on
/// the fast path, on its backend (it used to go back through the slow path
/// and be balanced afresh, away from a backend that went down).
#[test]
fn a_flow_whose_connection_timed_out_ignores_health_changes() {
    // UDP connections time out after 50 ms at the load balancer (flows
    // after 240 s): a flow tells its connection of traffic every 12.5 ms.
    let mut cfg = SwitchConfig::default();
    cfg.timeouts.udp_unreplied = 50_000_000;
    cfg.timeouts.udp_replied = 50_000_000;
    let mut rig = Rig::with(cfg);
    let a: Vec<Vec<u8>> = (0..100).map(|i| frame(VIP_A, A_PORTS + i)).collect();
    let b: Vec<Vec<u8>> = (0..100).map(|i| frame(VIP_B, B_PORTS + i)).collect();
    let a_backend = rig.pass(&a);
    rig.pass(&b);
    assert!(a_backend.values().any(|&x| x == 0), "some flows on web0");
    // Let the connections time out (a timeout elapsing, not a state being
    // waited for), then traffic: the load balancer's expiry pass runs after
    // the first burst and forgets them; the flows' next touches find them
    // gone.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = rig.slow();
    rig.pass(&b);
    assert_eq!(rig.pass(&a), a_backend);
    assert_eq!(rig.slow(), before, "cached flows stay cached");
    // web0 goes down: the flows of VIP A stay where they are, fast.
    rig.web0(false);
    let before = rig.slow();
    assert_eq!(rig.pass(&a), a_backend, "a flow moved off web0");
    assert_eq!(
        rig.slow(),
        before,
        "flows without a connection were revalidated"
    );
}
