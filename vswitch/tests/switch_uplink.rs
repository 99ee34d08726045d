//! The switch and the wire: SNAT outbound through an uplink port, a public
//! VIP reached from the wire, ping answered by VIPs. smoltcp stacks on ring
//! ports; the uplink's far end is an "internet" host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use arc_swap::ArcSwap;
use common::{Running, Vm, pool, run_until, vm_port};
use dataplane::pool::{Pool, PoolBuf};
use dataplane::port::ring::RingPort;
use dataplane::worker::Worker;
use dataplane::{Batch, MacAddr, PacketBuf, Port};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, VipConfig};
use lb::snat::SnatConfig;
use smoltcp::socket::tcp;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vswitch::{
    Policy, Switch, SwitchConfig, SwitchDrop, SwitchStats, Topology, UplinkDef, VipDef, VmDef,
    VnetDef,
};

const GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
const PUBLIC_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const INET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const GW_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
const UPLINK_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xfe]);

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

fn topology() -> Topology {
    let vm = |name: &str, port: u16, m: u8, ip: &str, nsg: Option<usize>| VmDef {
        name: name.into(),
        port,
        vnet: 0,
        mac: mac(m),
        ips: vec![ip.parse().unwrap()],
        nsg,
        internal: false,
    };
    // web1 takes 8080 from anywhere, the internet included.
    let web = NsgSpec {
        name: "web".into(),
        rules: vec![RuleSpec {
            name: Some("http-in".into()),
            priority: 100,
            direction: "in".into(),
            action: "allow".into(),
            protocol: "tcp".into(),
            src: vec!["any".into()],
            dst: vec!["any".into()],
            src_ports: vec!["any".into()],
            dst_ports: vec!["8080".into()],
            stateful: None,
        }],
    };
    let web1 = || {
        vec![Backend {
            ip: "10.1.0.4".parse().unwrap(),
            port: 8080,
            weight: 1,
        }]
    };
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: GW_MAC,
            snat: Some(SnatConfig {
                public_ips: vec![IpAddr::V4(SNAT_IP)],
                block_size: 64,
                blocks_per_member: 2,
                ..SnatConfig::default()
            }),
            vni: None,
            encap: Default::default(),
        }],
        vms: vec![
            vm("client", 0, 0x10, "10.1.0.20", None),
            vm("web1", 1, 1, "10.1.0.4", Some(0)),
            vm("pinger", 2, 0x30, "10.1.0.30", None),
        ],
        nsgs: vec![web],
        vips: vec![
            VipDef {
                vnet: 0,
                config: VipConfig::new("web", IpAddr::V4(VIP), 80, 6, web1()),
                health: vec![],
            },
            VipDef {
                vnet: 0,
                config: VipConfig::new("public", IpAddr::V4(PUBLIC_VIP), 80, 6, web1()),
                health: vec![],
            },
        ],
        ports: 4,
        uplink: Some(UplinkDef {
            port: 3,
            mac: UPLINK_MAC,
            next_hop_mac: mac(0x40),
            underlay: None,
        }),
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

struct Net {
    /// client, web1, inet.
    vms: Vec<Vm>,
    pinger: RingPort<PoolBuf>,
    stats: Arc<SwitchStats>,
    _worker: Running,
    pool: Pool,
}

impl Net {
    fn new(name: &str) -> Net {
        let pool = pool(name);
        let start = Instant::now();
        let mut sw_ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
        let mut vms = Vec::new();
        let (c, sw) = vm_port("client", mac(0x10));
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
        sw_ports.push(Box::new(sw));
        let (w, sw) = vm_port("web1", mac(1));
        vms.push(
            Vm::new(
                "web1",
                w,
                pool,
                "10.1.0.4".parse().unwrap(),
                GW,
                Some(8080),
                start,
            )
            .unwrap(),
        );
        sw_ports.push(Box::new(sw));
        let (pinger, sw) = vm_port("pinger", mac(0x30));
        sw_ports.push(Box::new(sw));
        // The internet host shares a /16 with the public addresses, so it
        // ARPs for them directly (the switch answers on the uplink).
        let (i, sw) = vm_port("inet", mac(0x40));
        let gw = Ipv4Addr::new(203, 0, 113, 254);
        vms.push(Vm::new("inet", i, pool, INET, gw, Some(8080), start).unwrap());
        sw_ports.push(Box::new(sw));
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(), 1).unwrap(),
        ));
        let sw = Switch::new(policy, SwitchConfig::default());
        let stats = sw.stats();
        let worker = Worker::new(name, None, sw_ports, sw);
        Net {
            vms,
            pinger,
            stats,
            _worker: Running::spawn(worker),
            pool,
        }
    }

    fn run(&mut self, limit: Duration, done: impl FnMut(&[&mut Vm]) -> bool) -> bool {
        let mut refs: Vec<&mut Vm> = self.vms.iter_mut().collect();
        run_until(&mut refs, limit, done)
    }
}

const CLIENT: usize = 0;
const WEB1: usize = 1;
const INTERNET: usize = 2;

#[test]
fn snat_outbound_through_the_uplink() {
    let mut net = Net::new("up-snat");
    let gets: Vec<usize> = (0..6)
        .map(|_| net.vms[CLIENT].get(INET, 8080, "/"))
        .collect();
    assert!(
        net.run(Duration::from_secs(20), |vms| gets
            .iter()
            .all(|&g| vms[CLIENT].body(g).is_some())),
        "responses did not all arrive: drops {:?}",
        net.stats.nonzero()
    );
    for &g in &gets {
        assert_eq!(net.vms[CLIENT].body(g).unwrap(), "inet");
    }
    // The internet saw the public address, never the private one, from six
    // distinct SNAT ports.
    let peers = net.vms[INTERNET].peers.clone();
    assert_eq!(peers.len(), 6, "{peers:?}");
    assert!(
        peers
            .iter()
            .all(|(ip, port)| *ip == SNAT_IP && *port >= 1024),
        "{peers:?}"
    );
    let ports: HashSet<u16> = peers.iter().map(|p| p.1).collect();
    assert_eq!(ports.len(), 6, "{peers:?}");
    assert_eq!(net.stats.nonzero(), vec![], "no drops expected");
    // Nothing enters from the wire uninvited: a connection to the SNAT
    // address on a port no mapping holds goes nowhere.
    let probe = net.vms[INTERNET].connect(SNAT_IP, 5555);
    net.run(Duration::from_secs(1), |_| false);
    assert_eq!(net.vms[INTERNET].state(probe), tcp::State::SynSent);
    assert!(
        net.stats
            .dropped(SwitchDrop::Lb(lb::balancer::LbDrop::SnatNoMapping))
            >= 1,
        "{:?}",
        net.stats.nonzero()
    );
}

#[test]
fn a_public_vip_is_reached_from_the_wire() {
    let mut net = Net::new("up-vip");
    let g = net.vms[INTERNET].get(PUBLIC_VIP, 80, "/");
    assert!(
        net.run(Duration::from_secs(10), |vms| vms[INTERNET]
            .body(g)
            .is_some()),
        "no answer through the public VIP: drops {:?}",
        net.stats.nonzero()
    );
    assert_eq!(net.vms[INTERNET].body(g).unwrap(), "web1");
    // DNAT only: the DIP sees the real client address.
    assert_eq!(net.vms[WEB1].peers.first().map(|p| p.0), Some(INET));
    assert!(net.stats.arp_replies.load(Ordering::Relaxed) >= 1);
}

fn echo_request(dst: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(0x30).0, GW_MAC.0)
        .ipv4([10, 1, 0, 30], dst, 64)
        .icmpv4_echo_request(0x77, 1)
        .write(&mut f, b"are you there")
        .unwrap();
    f
}

#[test]
fn a_vip_answers_ping() {
    let mut net = Net::new("up-ping");
    let mut b = Batch::new();
    b.push(net.pool.alloc_copy(&echo_request(VIP.octets())).unwrap())
        .unwrap();
    net.pinger.tx_burst(&mut b);
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = Batch::new();
    while got.is_empty() && Instant::now() < end {
        net.pinger.rx_burst(&mut got);
        std::thread::sleep(Duration::from_millis(1));
    }
    let reply = got.drain().next().expect("no echo reply");
    let s = etherparse::SlicedPacket::from_ethernet(reply.data()).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header().source(), VIP.octets());
    assert_eq!(ip.header().destination(), [10, 1, 0, 30]);
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &s.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 0x77, seq: 1 })
    );
    assert_eq!(icmp.payload(), b"are you there");
    assert_eq!(dataplane::wire::checksum::checksum(icmp.slice()), 0);
    assert_eq!(&reply.data()[0..6], &mac(0x30).0);
    assert_eq!(&reply.data()[6..12], &GW_MAC.0);
    assert_eq!(net.stats.icmp_replies.load(Ordering::Relaxed), 1);
}
