//! The switch's overlay and underlay frame by frame: a VM's packet to a
//! remote endpoint leaves in VXLAN through the uplink to the next hop's
//! MAC; tunnel packets are taken in only with a known VNI, a mapped inner
//! source and that source's host; a packet for an unresolved next hop asks
//! the neighbour cache; worker 0 sends the cache's ARP requests; the
//! uplink's address answers ARP and its answers reach the cache; a packet
//! too big for the tunnel is answered with the tunnel's MTU. (The same
//! against real kernels: tests/netns_overlay.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use arc_swap::ArcSwap;
use dataplane::pool::{Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::tunnel::{self, Encap};
use dataplane::worker::Worker;
use dataplane::{Batch, LinkInfo, MacAddr, PacketBuf, Port};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use vswitch::neigh::NeighMail;
use vswitch::{
    Policy, RemoteDef, Switch, SwitchConfig, SwitchDrop, SwitchStats, Topology, Underlay,
    UplinkDef, VmDef, VnetDef,
};

const GW_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
const VM_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 4]);
const UP_MAC: MacAddr = MacAddr([2, 0x50, 0x4c, 0x58, 0, 1]);
const HOST_MAC: MacAddr = MacAddr([2, 0, 0, 0, 2, 7]);
const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

fn topology(resolved: bool) -> Topology {
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: GW_MAC,
            snat: None,
            vni: Some(100),
            encap: Encap::Vxlan,
        }],
        vms: vec![VmDef {
            name: "web".into(),
            port: 0,
            vnet: 0,
            mac: VM_MAC,
            ips: vec!["10.1.0.4".parse().unwrap()],
            nsg: None,
            internal: false,
        }],
        ports: 2,
        uplink: Some(UplinkDef {
            port: 1,
            mac: UP_MAC,
            next_hop_mac: MacAddr::ZERO,
            underlay: Some(Underlay {
                address: "192.0.2.1/24".parse().unwrap(),
                routes: Vec::new(),
                muxes: Vec::new(),
            }),
        }),
        remotes: vec![RemoteDef {
            name: "db".into(),
            vnet: 0,
            ips: vec!["10.1.0.30".parse().unwrap()],
            host: HOST,
            mac: None,
        }],
        neighbours: if resolved {
            vec![(HOST, HOST_MAC)]
        } else {
            Vec::new()
        },
        ..Topology::default()
    }
}

struct Rig {
    worker: Worker<PoolBuf, Switch>,
    stats: Arc<SwitchStats>,
    vm: RingPort<PoolBuf>,
    wire: RingPort<PoolBuf>,
    pool: Pool,
    mail: Arc<NeighMail>,
}

impl Rig {
    fn new(name: &str, resolved: bool) -> Rig {
        let pool = Pool::new(&PoolConfig::new(name, 256)).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(resolved), 1).unwrap(),
        ));
        let cfg = SwitchConfig {
            port_mtu: vec![1500, 1500],
            ..SwitchConfig::default()
        };
        let mail = Arc::new(NeighMail::default());
        let sw = Switch::new(policy, cfg)
            .with_underlay(mail.clone(), Some(Box::new(move || pool.alloc())));
        let stats = sw.stats();
        let l = |n: &str| LinkInfo::new(n, MacAddr([2, 0, 0, 0, 9, 9]), "ring");
        let (vm, sw_vm) = ring::pair(l("vm"), l("sw-vm"), 64);
        let (wire, sw_wire) = ring::pair(l("wire"), l("sw-wire"), 64);
        let ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = vec![Box::new(sw_vm), Box::new(sw_wire)];
        Rig {
            worker: Worker::new(name, None, ports, sw),
            stats,
            vm,
            wire,
            pool,
            mail,
        }
    }

    /// Sends `frame` in from the VM (`wire` false) or the wire, polls the
    /// switch, and returns what came out of the VM's port and the wire.
    fn send(&mut self, wire: bool, frame: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut b = Batch::new();
        b.push(self.pool.alloc_copy(frame).unwrap()).unwrap();
        if wire {
            self.wire.tx_burst(&mut b);
        } else {
            self.vm.tx_burst(&mut b);
        }
        self.poll()
    }

    fn poll(&mut self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        self.worker.poll_once();
        let mut out = (Vec::new(), Vec::new());
        let mut b = Batch::new();
        for (port, into) in [(&mut self.vm, &mut out.0), (&mut self.wire, &mut out.1)] {
            while port.rx_burst(&mut b) > 0 {
                into.extend(b.drain().map(|p| p.data().to_vec()));
            }
        }
        out
    }
}

/// An IPv4 UDP frame from `src` to `dst` with `payload` bytes and DF set.
fn udp(src_mac: MacAddr, dst_mac: MacAddr, src: &str, dst: &str, payload: usize) -> Vec<u8> {
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap().octets();
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ip(etherparse::IpHeaders::Ipv4(
            etherparse::Ipv4Header {
                time_to_live: 64,
                protocol: etherparse::IpNumber::UDP,
                source: ip(src),
                destination: ip(dst),
                dont_fragment: true,
                ..Default::default()
            },
            Default::default(),
        ))
        .udp(40000, 53)
        .write(&mut v, &vec![0x5a; payload])
        .unwrap();
    v
}

/// `inner` in VXLAN with `vni` from host `src` to the switch's address.
fn vxlan(src: Ipv4Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    let mut hdr = vec![0x08, 0, 0, 0];
    hdr.extend_from_slice(&(vni << 8).to_be_bytes());
    hdr.extend_from_slice(inner);
    etherparse::PacketBuilder::ethernet2(HOST_MAC.0, UP_MAC.0)
        .ipv4(src.octets(), LOCAL.octets(), 64)
        .udp(50000, tunnel::VXLAN_PORT)
        .write(&mut v, &hdr)
        .unwrap();
    v
}

#[test]
fn a_vms_packet_to_a_remote_endpoint_leaves_in_vxlan_and_comes_back_out_of_it() {
    let mut r = Rig::new("ov-encap", true);
    let sent = udp(VM_MAC, GW_MAC, "10.1.0.4", "10.1.0.30", 32);
    let (to_vm, to_wire) = r.send(false, &sent);
    assert!(to_vm.is_empty());
    assert_eq!(to_wire.len(), 1, "{:?}", r.stats.nonzero());
    let f = &to_wire[0];
    // Outer: from the uplink to the host's MAC, VXLAN with the vnet's VNI.
    assert_eq!(&f[..6], &HOST_MAC.0);
    assert_eq!(&f[6..12], &UP_MAC.0);
    let d = tunnel::peek(f, HOST).unwrap().unwrap();
    assert_eq!((d.encap, d.vni, d.src), (Encap::Vxlan, 100, LOCAL));
    // Inner: routed (gateway MAC, TTL one less), otherwise the VM's packet.
    let inner = &f[d.inner..];
    assert_eq!(inner.len(), sent.len());
    assert_eq!(&inner[6..12], &GW_MAC.0);
    assert_eq!(inner[22], 63);
    assert_eq!(&inner[26..], &sent[26..]);
    // Its answer, in VXLAN from the host, reaches the VM from its gateway.
    let answer = udp(HOST_MAC, GW_MAC, "10.1.0.30", "10.1.0.4", 16);
    let (to_vm, to_wire) = r.send(true, &vxlan(HOST, 100, &answer));
    assert!(to_wire.is_empty());
    assert_eq!(to_vm.len(), 1, "{:?}", r.stats.nonzero());
    assert_eq!(&to_vm[0][..12], &[VM_MAC.0, GW_MAC.0].concat()[..]);
    assert_eq!(&to_vm[0][26..], &answer[26..]);
    // The underlay is no VM's to reach: a tunnel's host, the uplink's
    // network.
    for dst in ["192.0.2.7", "192.0.2.99"] {
        let before = r.stats.dropped(SwitchDrop::NoRoute);
        let (_, to_wire) = r.send(false, &udp(VM_MAC, GW_MAC, "10.1.0.4", dst, 8));
        assert!(to_wire.is_empty(), "{dst}");
        assert_eq!(r.stats.dropped(SwitchDrop::NoRoute), before + 1, "{dst}");
    }
    let tx = r.stats.tunnel_tx.load(std::sync::atomic::Ordering::Relaxed);
    let rx = r.stats.tunnel_rx.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((tx, rx), (1, 1));
}

#[test]
fn no_vnet_may_hold_the_underlay_and_no_public_address_be_the_uplinks() {
    let mut t = topology(true);
    t.vnets[0].prefixes.push("192.0.0.0/16".parse().unwrap());
    let e = Policy::compile(&t, 1).unwrap_err().0.join("\n");
    assert!(
        e.contains("vnet \"a\": its prefixes overlap the uplink's network 192.0.2.0/24"),
        "{e}"
    );
    assert!(
        e.contains("vnet \"a\": its prefixes hold remote \"db\"'s host 192.0.2.7"),
        "{e}"
    );
    let mut t = topology(true);
    t.vnets[0].snat = Some(lb::snat::SnatConfig {
        public_ips: vec![IpAddr::V4(LOCAL)],
        ..lb::snat::SnatConfig::default()
    });
    let e = Policy::compile(&t, 1).unwrap_err().0.join("\n");
    assert!(
        e.contains("uplink: address 192.0.2.1 is also a public address"),
        "{e}"
    );
}

#[test]
fn tunnel_packets_need_a_known_vni_a_mapped_source_and_its_host() {
    let mut r = Rig::new("ov-checks", true);
    let from = |src: &str| udp(HOST_MAC, GW_MAC, src, "10.1.0.4", 16);
    let cases: [(Vec<u8>, SwitchDrop); 4] = [
        (
            vxlan(HOST, 5, &from("10.1.0.30")),
            SwitchDrop::TunnelUnknownVni,
        ),
        (
            vxlan(HOST, 100, &from("10.1.0.99")),
            SwitchDrop::TunnelUnknownSource,
        ),
        // The VM's own address, from outside.
        (
            vxlan(HOST, 100, &from("10.1.0.4")),
            SwitchDrop::TunnelUnknownSource,
        ),
        (
            vxlan(Ipv4Addr::new(192, 0, 2, 8), 100, &from("10.1.0.30")),
            SwitchDrop::TunnelSpoofed,
        ),
    ];
    for (frame, why) in cases {
        let before = r.stats.dropped(why);
        let (to_vm, to_wire) = r.send(true, &frame);
        assert!(to_vm.is_empty() && to_wire.is_empty(), "{why:?}");
        assert_eq!(r.stats.dropped(why), before + 1, "{why:?}");
    }
    // A good one after them, in the same place of its burst, is delivered:
    // nothing of their refusals stays.
    let good = vxlan(HOST, 100, &from("10.1.0.30"));
    let (to_vm, _) = r.send(true, &good);
    assert_eq!(to_vm.len(), 1);
    // Truncated: the inner frame cut short of its Ethernet header.
    let mut cut = good[..60].to_vec();
    cut[16..18].copy_from_slice(&(60u16 - 14).to_be_bytes());
    cut[38..40].copy_from_slice(&(60u16 - 34).to_be_bytes());
    let (to_vm, _) = r.send(true, &cut);
    assert!(to_vm.is_empty());
    assert_eq!(r.stats.dropped(SwitchDrop::TunnelMalformed), 1);
    // Other traffic to the uplink's address on other ports is no tunnel's.
    assert_eq!(r.stats.dropped(SwitchDrop::Spoofed), 0);
}

#[test]
fn an_unresolved_next_hop_asks_the_cache_and_worker_zero_sends_its_requests() {
    let mut r = Rig::new("ov-arp", false);
    let (_, to_wire) = r.send(false, &udp(VM_MAC, GW_MAC, "10.1.0.4", "10.1.0.30", 32));
    assert!(to_wire.is_empty());
    assert_eq!(r.stats.dropped(SwitchDrop::NeighborUnresolved), 1);
    assert_eq!(r.mail.wanted.pop(), Some(HOST));
    // The cache asks for a broadcast request; worker 0 sends it.
    r.mail.send.push((HOST, None)).unwrap();
    let (_, to_wire) = r.poll();
    assert_eq!(to_wire.len(), 1);
    let f = &to_wire[0];
    let a = dataplane::wire::arp::Packet::new_checked(&f[14..]).unwrap();
    assert_eq!(&f[..6], &[0xff; 6]);
    assert_eq!(
        (a.sender_ip(), a.target_ip(), a.sender_mac()),
        (LOCAL, HOST, UP_MAC)
    );
    // The host's request for the uplink's address is answered, and what it
    // says of the host goes to the cache.
    let mut req = vec![0u8; 60];
    req[..6].copy_from_slice(&[0xff; 6]);
    req[6..12].copy_from_slice(&HOST_MAC.0);
    req[12..14].copy_from_slice(&[0x08, 0x06]);
    req[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    req[22..28].copy_from_slice(&HOST_MAC.0);
    req[28..32].copy_from_slice(&HOST.octets());
    req[38..42].copy_from_slice(&LOCAL.octets());
    let (_, to_wire) = r.send(true, &req);
    assert_eq!(to_wire.len(), 1);
    let a = dataplane::wire::arp::Packet::new_checked(&to_wire[0][14..]).unwrap();
    assert_eq!(
        (a.operation(), a.sender_ip(), a.sender_mac(), a.target_ip()),
        (2, LOCAL, UP_MAC, HOST)
    );
    assert_eq!(r.mail.learned.pop(), Some((HOST, HOST_MAC, true)));
    // A request for someone else's address teaches nothing.
    req[38..42].copy_from_slice(&[192, 0, 2, 9]);
    let (_, to_wire) = r.send(true, &req);
    assert!(to_wire.is_empty());
    assert!(r.mail.learned.pop().is_none());
}

#[test]
fn an_arp_request_waits_while_the_pool_has_no_buffer() {
    let mut r = Rig::new("ov-arp-pool", false);
    let held: Vec<_> = std::iter::from_fn(|| r.pool.alloc()).collect();
    assert!(!held.is_empty());
    r.mail.send.push((HOST, None)).unwrap();
    let (_, to_wire) = r.poll();
    assert!(to_wire.is_empty());
    assert_eq!(r.mail.send.len(), 1, "the request stays queued");
    drop(held);
    let (_, to_wire) = r.poll();
    assert_eq!(to_wire.len(), 1);
    let a = dataplane::wire::arp::Packet::new_checked(&to_wire[0][14..]).unwrap();
    assert_eq!(a.target_ip(), HOST);
    assert!(r.mail.send.is_empty());
}

#[test]
fn a_packet_too_big_for_the_tunnel_is_answered_with_its_mtu() {
    let mut r = Rig::new("ov-mtu", true);
    // 1 480 bytes of IP: fits the VM's link and the uplink, not the tunnel.
    let big = udp(VM_MAC, GW_MAC, "10.1.0.4", "10.1.0.30", 1480 - 28);
    let (to_vm, to_wire) = r.send(false, &big);
    assert!(to_wire.is_empty());
    assert_eq!(to_vm.len(), 1, "{:?}", r.stats.nonzero());
    let e = &to_vm[0];
    // ICMP destination unreachable, fragmentation needed, MTU 1450, from
    // the vnet's gateway.
    assert_eq!((e[34], e[35]), (3, 4));
    assert_eq!(u16::from_be_bytes([e[40], e[41]]), 1450);
    assert_eq!(
        IpAddr::V4(Ipv4Addr::new(e[26], e[27], e[28], e[29])),
        "10.1.0.1".parse::<IpAddr>().unwrap()
    );
    // 1 450 bytes go.
    let fits = udp(VM_MAC, GW_MAC, "10.1.0.4", "10.1.0.30", 1450 - 28);
    let (_, to_wire) = r.send(false, &fits);
    assert_eq!(to_wire.len(), 1);
    assert_eq!(to_wire[0].len(), 14 + 1450 + tunnel::OVERHEAD);
}
