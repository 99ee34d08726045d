//! SNAT as RFC 4787 asks of a NAT, on raw UDP frames through ring ports:
//! endpoint-independent mapping (one public port per private endpoint,
//! whatever the destination; the private port kept when it lies free in
//! the VM's block), each filtering behaviour (and a forged public source
//! from the wire refused), hairpinning between two VMs through their public
//! mappings, and exhaustion of one VM's ports counted without touching
//! another's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use arc_swap::ArcSwap;
use common::{Running, pool, vm_port};
use dataplane::pool::{Pool, PoolBuf};
use dataplane::port::ring::RingPort;
use dataplane::worker::Worker;
use dataplane::{Batch, MacAddr, PacketBuf, Port};
use lb::balancer::LbDrop;
use lb::snat::{Filtering, SnatConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vswitch::{
    Policy, Switch, SwitchConfig, SwitchDrop, SwitchStats, Topology, UplinkDef, VmDef, VnetDef,
};

const SNAT_IP: [u8; 4] = [203, 0, 113, 10];
const GW_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
const UPLINK_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xfe]);
const ROUTER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x40]);
/// The VMs' addresses, on ports 0, 1 and 2.
const VMS: [[u8; 4]; 3] = [[10, 1, 0, 21], [10, 1, 0, 22], [10, 1, 0, 23]];

fn mac(i: usize) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, 0x10 + i as u8])
}

fn topology(filtering: Filtering) -> Topology {
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: GW_MAC,
            // One block of 64 ports per VM: the first VM's is 1024-1087.
            snat: Some(SnatConfig {
                public_ips: vec![IpAddr::V4(SNAT_IP.into())],
                block_size: 64,
                blocks_per_member: 1,
                filtering,
                ..SnatConfig::default()
            }),
            vni: None,
            encap: Default::default(),
        }],
        vms: VMS
            .iter()
            .enumerate()
            .map(|(i, a)| VmDef {
                name: format!("vm{i}"),
                port: i as u16,
                vnet: 0,
                mac: mac(i),
                ips: vec![IpAddr::V4(Ipv4Addr::from(*a))],
                nsg: None,
                internal: false,
            })
            .collect(),
        nsgs: vec![],
        vips: vec![],
        ports: 4,
        uplink: Some(UplinkDef {
            port: 3,
            mac: UPLINK_MAC,
            next_hop_mac: ROUTER_MAC,
            underlay: None,
        }),
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

/// A UDP datagram as the switch delivers it: (source, destination, payload).
type Dgram = (([u8; 4], u16), ([u8; 4], u16), Vec<u8>);

struct Net {
    /// The VMs' ends of their ports.
    vms: Vec<RingPort<PoolBuf>>,
    /// The wire's end of the uplink.
    wire: RingPort<PoolBuf>,
    stats: Arc<SwitchStats>,
    pool: Pool,
    _worker: Running,
}

impl Net {
    fn new(name: &str, filtering: Filtering) -> Net {
        let pool = pool(name);
        let mut sw_ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
        let mut vms = Vec::new();
        for i in 0..VMS.len() {
            let (far, sw) = vm_port(&format!("vm{i}"), mac(i));
            vms.push(far);
            sw_ports.push(Box::new(sw));
        }
        let (wire, sw) = vm_port("wire", ROUTER_MAC);
        sw_ports.push(Box::new(sw));
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(filtering), 1).unwrap(),
        ));
        let sw = Switch::new(policy, SwitchConfig::default());
        let stats = sw.stats();
        let worker = Worker::new(name, None, sw_ports, sw);
        Net {
            vms,
            wire,
            stats,
            pool,
            _worker: Running::spawn(worker),
        }
    }

    fn frame(
        src_mac: MacAddr,
        dst_mac: MacAddr,
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        data: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
            .ipv4(src.0, dst.0, 64)
            .udp(src.1, dst.1)
            .write(&mut f, data)
            .unwrap();
        f
    }

    fn push(&mut self, port: Option<usize>, f: Vec<u8>) {
        let mut b = Batch::new();
        b.push(self.pool.alloc_copy(&f).unwrap()).unwrap();
        match port {
            Some(i) => self.vms[i].tx_burst(&mut b),
            None => self.wire.tx_burst(&mut b),
        };
    }

    /// VM `vm` sends from its port `sport` to `dst`.
    fn send(&mut self, vm: usize, sport: u16, dst: ([u8; 4], u16), data: &[u8]) {
        let f = Self::frame(mac(vm), GW_MAC, (VMS[vm], sport), dst, data);
        self.push(Some(vm), f);
    }

    /// The wire sends from `src` to the SNAT address's port `port`.
    fn wire_sends(&mut self, src: ([u8; 4], u16), port: u16, data: &[u8]) {
        let f = Self::frame(ROUTER_MAC, UPLINK_MAC, src, (SNAT_IP, port), data);
        self.push(None, f);
    }

    /// The next datagram out of `port` (a VM, or the wire), within a second.
    fn recv(&mut self, port: Option<usize>) -> Option<Dgram> {
        let end = Instant::now() + Duration::from_secs(1);
        let mut got = Batch::new();
        while Instant::now() < end {
            match port {
                Some(i) => self.vms[i].rx_burst(&mut got),
                None => self.wire.rx_burst(&mut got),
            };
            if let Some(p) = got.drain().next() {
                let s = etherparse::SlicedPacket::from_ethernet(p.data()).unwrap();
                let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
                    panic!("not IPv4")
                };
                let Some(etherparse::TransportSlice::Udp(u)) = &s.transport else {
                    panic!("not UDP")
                };
                return Some((
                    (ip.header().source(), u.source_port()),
                    (ip.header().destination(), u.destination_port()),
                    u.payload().to_vec(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// What the wire sees of VM `vm`'s datagram from `sport` to `dst`:
    /// the public port it left from.
    fn mapped(&mut self, vm: usize, sport: u16, dst: ([u8; 4], u16)) -> u16 {
        self.send(vm, sport, dst, b"out");
        let (src, to, data) = self.recv(None).expect("nothing left by the uplink");
        assert_eq!((to, data.as_slice()), (dst, &b"out"[..]));
        assert_eq!(src.0, SNAT_IP, "left from the public address");
        src.1
    }

    fn dropped(&self, r: LbDrop) -> u64 {
        self.stats.dropped(SwitchDrop::Lb(r))
    }
}

const STUN1: ([u8; 4], u16) = ([198, 51, 100, 1], 3478);
const STUN2: ([u8; 4], u16) = ([198, 51, 100, 2], 3479);

#[test]
fn one_public_port_per_private_endpoint_and_udp_hairpins_between_vms() {
    let mut net = Net::new("snat-eim", Filtering::AddressAndPortDependent);
    // The first VM's block is 1024-1087: its port 1030 is kept.
    assert_eq!(net.mapped(0, 1030, STUN1), 1030);
    // Endpoint-independent mapping: one public port whatever the destination.
    let pa = net.mapped(0, 7000, STUN1);
    assert_eq!(net.mapped(0, 7000, STUN2), pa);
    assert_eq!(net.mapped(0, 7000, ([192, 0, 2, 9], 53)), pa);
    // Another VM with the same private port gets another public port.
    let pb = net.mapped(1, 7000, STUN1);
    assert_ne!(pb, pa);
    // Replies come back; address-and-port-dependent filtering lets
    // nothing else in.
    net.wire_sends(STUN2, pa, b"back");
    assert_eq!(
        net.recv(Some(0)),
        Some((STUN2, (VMS[0], 7000), b"back".to_vec()))
    );
    net.wire_sends(([198, 51, 100, 1], 9999), pa, b"stranger");
    assert_eq!(net.recv(Some(0)), None);
    assert_eq!(net.dropped(LbDrop::SnatFiltered), 1);
    // Hairpinning, with the hole punching of peer-to-peer applications:
    // vm1 sends to vm0's public mapping (filtered there: vm0 never sent to
    // vm1's mapping), then vm0 to vm1's, which vm1's first packet opened.
    net.send(1, 7000, (SNAT_IP, pa), b"punch");
    assert_eq!(net.recv(Some(0)), None);
    assert_eq!(net.dropped(LbDrop::SnatFiltered), 2);
    net.send(0, 7000, (SNAT_IP, pb), b"hello b");
    assert_eq!(
        net.recv(Some(1)),
        Some(((SNAT_IP, pa), (VMS[1], 7000), b"hello b".to_vec())),
        "vm1 sees vm0's public mapping: drops {:?}",
        net.stats.nonzero()
    );
    net.send(1, 7000, (SNAT_IP, pa), b"hello a");
    assert_eq!(
        net.recv(Some(0)),
        Some(((SNAT_IP, pb), (VMS[0], 7000), b"hello a".to_vec()))
    );
    // Nothing of it reached the wire.
    assert_eq!(net.recv(None), None);
    assert!(net.stats.hairpinned.load(Ordering::Relaxed) >= 3);
}

#[test]
fn each_filtering_lets_in_what_it_says() {
    let stranger = ([203, 0, 113, 99], 4000);
    let other_port = (STUN1.0, 5000);
    for (filtering, from_other_port, from_stranger) in [
        (Filtering::EndpointIndependent, true, true),
        (Filtering::AddressDependent, true, false),
        (Filtering::AddressAndPortDependent, false, false),
    ] {
        let mut net = Net::new(&format!("snat-{filtering:?}"), filtering);
        let pa = net.mapped(0, 7000, STUN1);
        for (src, allowed) in [(other_port, from_other_port), (stranger, from_stranger)] {
            net.wire_sends(src, pa, b"in");
            let got = net.recv(Some(0));
            if allowed {
                assert_eq!(
                    got,
                    Some((src, (VMS[0], 7000), b"in".to_vec())),
                    "{filtering:?}"
                );
                // The VM's answer leaves from its mapping.
                net.send(0, 7000, src, b"answer");
                assert_eq!(
                    net.recv(None),
                    Some(((SNAT_IP, pa), src, b"answer".to_vec())),
                    "{filtering:?}"
                );
            } else {
                assert_eq!(got, None, "{filtering:?}: {src:?} let in");
            }
        }
        let filtered = 2 - u64::from(from_other_port) - u64::from(from_stranger);
        assert_eq!(net.dropped(LbDrop::SnatFiltered), filtered, "{filtering:?}");
        let inbound = 2 - filtered;
        let end = Instant::now() + Duration::from_secs(5);
        while net.stats.snat_inbound.load(Ordering::Relaxed) != inbound && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(net.stats.snat_inbound.load(Ordering::Relaxed), inbound);
        // A port no mapping holds.
        net.wire_sends(stranger, 2000, b"nobody");
        assert_eq!(net.recv(Some(0)), None);
        assert_eq!(net.dropped(LbDrop::SnatNoMapping), 1);
        // From the wire, the switch's own public address as the source is
        // forged (what answered it would hairpin back in).
        net.wire_sends((SNAT_IP, 4444), pa, b"forged");
        assert_eq!(net.recv(Some(0)), None, "{filtering:?}");
        assert_eq!(net.stats.dropped(SwitchDrop::Spoofed), 1);
    }
}

#[test]
fn exhausting_one_vms_ports_is_counted_and_leaves_the_others_alone() {
    let mut net = Net::new("snat-exhaust", Filtering::AddressAndPortDependent);
    let mut ports = std::collections::HashSet::new();
    for sport in 0..64 {
        ports.insert(net.mapped(0, 20000 + sport, STUN1));
    }
    assert_eq!(ports.len(), 64, "64 distinct ports");
    assert!(ports.iter().all(|p| (1024..1088).contains(p)), "{ports:?}");
    // The 65th private port finds none free: dropped and counted.
    net.send(0, 30000, STUN1, b"one too many");
    assert_eq!(net.recv(None), None);
    assert_eq!(net.dropped(LbDrop::SnatExhausted), 1);
    // A mapping in use still works, and so does another VM.
    assert!(ports.contains(&net.mapped(0, 20000, STUN2)));
    let other = net.mapped(2, 30000, STUN1);
    assert!(!ports.contains(&other));
    let end = Instant::now() + Duration::from_secs(5);
    while net.stats.snat_ports.load(Ordering::Relaxed) != 65 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(net.stats.snat_ports.load(Ordering::Relaxed), 65);
}
