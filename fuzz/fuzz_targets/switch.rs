//! Fuzzes the whole pipeline: arbitrary frames into a switch with a
//! realistic policy (two tenants with the same prefix, security groups,
//! UDP and TCP VIPs, SNAT and a public VIP on an uplink with an underlay
//! address and tunnels to a remote endpoint of each tenant, ARP/ND/echo
//! responders that rewrite frames in place) on every port. Besides never
//! panicking, every packet is accounted for: each one received is sent, or
//! dropped and counted with a reason (by the switch, the worker or a port).
//!
//! Input: a sequence of records `[port, len_hi, len_lo, bytes...]`. A port
//! byte below 0x80 sends `bytes` as the frame into switch port `port % 6`
//! (port 5 is the uplink); from 0x80 on, `bytes` pick one of the frames a
//! real network would send (a client's SYN to a VIP, a reply from a
//! backend, an SNAT reply from the wire, a VM's packet to a public address
//! that hairpins, ARP, neighbour solicitation, VXLAN and Geneve packets
//! from remote endpoints, a client's packet to a Mux VIP, IP in IP from a
//! Mux to a DSR VIP's backend, ...)
//! on its port and overwrite some of its bytes, so that the fuzzer reaches
//! the deep states without a corpus. For the VIPs with a SYN proxy, the
//! harness reads the cookies and the backends' SYNs the switch sends, so
//! that templates can answer them (the client's ACK of the last cookie,
//! the backend's SYN-ACK of the last SYN). The switch persists from input
//! to input (flows and connections pile up, as in a running switch).
//! Packets the switch holds for a SYN-proxied connection count as
//! accounted for while it holds them.
//!
//! Every packet is also traced live as it goes (`LiveTrace`), and each
//! frame is first traced on a scratch switch over the same policy
//! (`Switch::trace`): the traces' notes must never panic either, and a
//! packet traced live says where it went. Flow logs are on, with an
//! active timeout of a millisecond: every record is consistent.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run switch` from the repository root
//! (see docs/fuzzing.md).
#![no_main]

use arc_swap::ArcSwap;
use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::Worker;
use dataplane::{Batch, LinkInfo, MacAddr, PacketBuf, Port, PortStats};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, SynProxy, VipConfig, VipMode};
use lb::snat::SnatConfig;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use vswitch::switch::{LiveTrace, TraceEnd};
use vswitch::{
    Policy, Switch, SwitchConfig, SwitchStats, Topology, UplinkDef, VipDef, VmDef, VnetDef,
};

const PORTS: usize = 6;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rule(name: &str, prio: i64, dir: &str, action: &str, proto: &str, dst_ports: &str) -> RuleSpec {
    RuleSpec {
        name: Some(name.into()),
        priority: prio,
        direction: dir.into(),
        action: action.into(),
        protocol: proto.into(),
        src: vec!["any".into()],
        dst: vec!["any".into()],
        src_ports: vec!["any".into()],
        dst_ports: vec![dst_ports.into()],
        stateful: None,
    }
}

fn topology() -> Topology {
    let vm = |name: &str, port: u16, vnet: usize, mac: u8, ips: &[&str], nsg| VmDef {
        name: name.into(),
        port,
        vnet,
        mac: MacAddr([2, 0, 0, 0, vnet as u8, mac]),
        ips: ips.iter().map(|a| ip(a)).collect(),
        nsg,
        internal: false,
    };
    let backends = |port| {
        vec![
            Backend {
                ip: ip("10.1.0.4"),
                port,
                weight: 1,
            },
            Backend {
                ip: ip("10.1.0.5"),
                port,
                weight: 2,
            },
        ]
    };
    Topology {
        vnets: vec![
            VnetDef {
                name: "a".into(),
                prefixes: vec![
                    "10.1.0.0/16".parse().unwrap(),
                    "fd00:1::/64".parse().unwrap(),
                ],
                gateway_mac: MacAddr([0x12, 0, 0, 0, 0, 1]),
                // Endpoint-independent filtering: the wire may open
                // connections to the mappings (and VMs hairpin to them).
                snat: Some(SnatConfig {
                    public_ips: vec![ip("198.51.100.50")],
                    filtering: lb::snat::Filtering::EndpointIndependent,
                    ..SnatConfig::default()
                }),
                vni: Some(100),
                encap: Default::default(),
            },
            VnetDef {
                name: "b".into(),
                prefixes: vec!["10.1.0.0/16".parse().unwrap()],
                gateway_mac: MacAddr([0x12, 0, 0, 0, 0, 2]),
                snat: None,
                vni: Some(200),
                encap: dataplane::tunnel::Encap::Geneve,
            },
        ],
        vms: vec![
            vm("client", 0, 0, 1, &["10.1.0.20", "fd00:1::20"], None),
            vm("web1", 1, 0, 4, &["10.1.0.4", "fd00:1::4"], Some(0)),
            vm("web2", 2, 0, 5, &["10.1.0.5"], Some(0)),
            vm("other", 3, 1, 30, &["10.1.0.30"], None),
            vm("same", 4, 1, 20, &["10.1.0.20"], Some(1)),
        ],
        nsgs: vec![
            NsgSpec {
                name: "web".into(),
                rules: vec![
                    rule("http", 100, "in", "allow", "tcp", "8000"),
                    rule("dns", 110, "in", "allow", "udp", "53"),
                    rule("no-ssh", 120, "in", "deny", "tcp", "22"),
                ],
            },
            NsgSpec {
                name: "closed".into(),
                rules: vec![rule("none-out", 100, "out", "deny", "any", "any")],
            },
        ],
        vips: vec![
            VipDef {
                vnet: 0,
                config: VipConfig::new("tcp", ip("10.1.0.100"), 80, 6, backends(8000)),
                health: vec![],
            },
            VipDef {
                vnet: 0,
                config: VipConfig::new("udp", ip("10.1.0.100"), 53, 17, backends(53)),
                health: vec![true, false],
            },
            VipDef {
                vnet: 0,
                // A connection limit small enough that the fuzzer reaches
                // it: eviction of the VIP's embryonic entries, and refusal;
                // and SYN cookies at the limit.
                config: VipConfig {
                    max_conns: 16,
                    syn_proxy: SynProxy::Auto,
                    ..VipConfig::new("public", ip("198.51.100.80"), 80, 6, backends(8000))
                },
                health: vec![],
            },
            VipDef {
                vnet: 0,
                config: VipConfig {
                    syn_proxy: SynProxy::On,
                    ..VipConfig::new("proxied", ip("10.1.0.100"), 81, 6, backends(8000))
                },
                health: vec![],
            },
            // A Mux VIP (its DIPs on the underlay: one's MAC known, the
            // other's not) and a DSR VIP of this host's web servers.
            VipDef {
                vnet: 0,
                config: VipConfig {
                    mode: VipMode::Mux,
                    ..VipConfig::new(
                        "mux",
                        ip("198.51.100.90"),
                        80,
                        6,
                        vec![
                            Backend {
                                ip: ip("192.0.2.20"),
                                port: 80,
                                weight: 1,
                            },
                            Backend {
                                ip: ip("192.0.2.21"),
                                port: 80,
                                weight: 1,
                            },
                        ],
                    )
                },
                health: vec![],
            },
            VipDef {
                vnet: 0,
                config: VipConfig {
                    mode: VipMode::Dsr,
                    ..VipConfig::new("dsr", ip("198.51.100.91"), 80, 6, backends(8000))
                },
                health: vec![],
            },
            VipDef {
                vnet: 0,
                config: VipConfig::new(
                    "v6",
                    ip("fd00:1::100"),
                    80,
                    6,
                    vec![Backend {
                        ip: ip("fd00:1::4"),
                        port: 8000,
                        weight: 1,
                    }],
                ),
                health: vec![],
            },
        ],
        ports: PORTS as u16,
        uplink: Some(UplinkDef {
            port: 5,
            mac: MacAddr([2, 0x50, 0x4c, 0x58, 0xff, 0xff]),
            next_hop_mac: MacAddr([2, 0, 0, 0, 9, 9]),
            underlay: Some(vswitch::Underlay {
                address: "192.0.2.1/24".parse().unwrap(),
                routes: Vec::new(),
                // A Mux whose IP in IP the DSR VIP's backends take.
                muxes: vec!["192.0.2.30/32".parse().unwrap()],
            }),
        }),
        // 10.1.0.30 (vnet a) and 10.1.0.31 (vnet b) on other hosts: vnet a's host's MAC is
        // known, vnet b's is not (its packets wait for ARP).
        remotes: vec![
            vswitch::RemoteDef {
                name: "ra".into(),
                vnet: 0,
                ips: vec![ip("10.1.0.30")],
                host: "192.0.2.7".parse().unwrap(),
                mac: None,
            },
            vswitch::RemoteDef {
                name: "rb".into(),
                vnet: 1,
                ips: vec![ip("10.1.0.31")],
                host: "192.0.2.8".parse().unwrap(),
                mac: Some(MacAddr([2, 0, 0, 0, 7, 7])),
            },
        ],
        neighbours: vec![
            ("192.0.2.7".parse().unwrap(), MacAddr([2, 0, 0, 0, 7, 1])),
            ("192.0.2.20".parse().unwrap(), MacAddr([2, 0, 0, 0, 7, 20])),
        ],
    }
}

const GW_A: [u8; 6] = [0x12, 0, 0, 0, 0, 1];
const UPLINK_MAC: [u8; 6] = [2, 0x50, 0x4c, 0x58, 0xff, 0xff];

fn vm_mac(vnet: u8, last: u8) -> [u8; 6] {
    [2, 0, 0, 0, vnet, last]
}

/// Ethernet + IPv4 (no options) + TCP (flags) or UDP, 8 bytes of payload;
/// checksums left 0 (the switch patches them incrementally either way).
fn ipv4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let l4_len = if proto == 6 { 20 } else { 8 };
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4_len + 8) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        proto,
        0,
        0,
    ]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&[0, 16, 0, 0]);
    }
    f.extend_from_slice(&[0x61; 8]);
    f
}

/// `inner` in a VXLAN (or Geneve) packet with VNI `vni` from `src` to the
/// uplink's underlay address; checksums left 0.
fn tunnelled(geneve: bool, vni: u32, src: [u8; 4], inner: Vec<u8>) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&UPLINK_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 7, 1]);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + 8 + inner.len()) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[192, 0, 2, 1]);
    let port: u16 = if geneve { 6081 } else { 4789 };
    f.extend_from_slice(&50000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    if geneve {
        f.extend_from_slice(&[0, 0, 0x65, 0x58]);
    } else {
        f.extend_from_slice(&[0x08, 0, 0, 0]);
    }
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(&inner);
    f
}

/// The IP packet of frame `inner` in IP in IP from a Mux at `src` to
/// `dst`, arriving on the uplink; checksums left 0.
fn ipip(src: [u8; 4], dst: [u8; 4], inner: Vec<u8>) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&UPLINK_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 9, 9]);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip = inner.get(14..).unwrap_or_default();
    let total = (20 + ip.len()) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        4,
        0,
        0,
    ]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(ip);
    f
}

/// Ethernet + IPv6 + TCP SYN.
fn ipv6_syn(src_mac: [u8; 6], dst_mac: [u8; 6], src: u8, dst: u8, dport: u16) -> Vec<u8> {
    let a = |last: u8| {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&[0xfd, 0, 0, 1]);
        x[15] = last;
        x
    };
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&a(src));
    f.extend_from_slice(&a(dst));
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// A neighbour solicitation from the client for `fd00:1::<target>`.
fn neighbor_solicit(target: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x33, 0x33, 0xff, 0, 0, target]);
    f.extend_from_slice(&vm_mac(0, 1));
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
    f.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20]);
    f.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, target]);
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, target]);
    f.extend_from_slice(&[1, 1]);
    f.extend_from_slice(&vm_mac(0, 1));
    f
}

/// An ARP request from `src_mac`/`src` for `target`.
fn arp(src_mac: [u8; 6], src: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// What the harness learned from the frames the switch sent: the last
/// SYN-ACK with a cookie to the client VM and to the wire (client port,
/// client's sequence number + 1, cookie), and the last SYN a SYN proxy
/// sent a backend (its switch port and frame).
#[derive(Default)]
struct Learned {
    vm_cookie: Option<(u16, u32, u32)>,
    wire_cookie: Option<(u16, u32, u32)>,
    backend_syn: Option<(usize, Vec<u8>)>,
}

impl Learned {
    /// Reads a frame the switch sent out of `port` (IPv4 TCP, no options
    /// in the IP header).
    fn read(&mut self, port: usize, f: &[u8]) {
        let be32 = |at: usize| {
            f.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let be16 = |at: usize| f.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        if f.get(12..14) != Some(&[0x08, 0x00]) || f.get(14) != Some(&0x45) || f.get(23) != Some(&6)
        {
            return;
        }
        let (Some(sport), Some(dport), Some(seq), Some(ack), Some(&flags)) =
            (be16(34), be16(36), be32(38), be32(42), f.get(47))
        else {
            return;
        };
        match (port, flags & 0x12) {
            (0, 0x12) if sport == 81 => self.vm_cookie = Some((dport, ack, seq)),
            (5, 0x12) if sport == 80 => self.wire_cookie = Some((dport, ack, seq)),
            (1 | 2, 0x02) => self.backend_syn = Some((port, f.to_vec())),
            _ => {}
        }
    }
}

/// `f` (Ethernet + IPv4 without options + TCP) with sequence and
/// acknowledgment numbers `seq` and `ack`.
fn with_numbers(mut f: Vec<u8>, seq: u32, ack: u32) -> Vec<u8> {
    if let Some(b) = f.get_mut(38..46) {
        b[..4].copy_from_slice(&seq.to_be_bytes());
        b[4..].copy_from_slice(&ack.to_be_bytes());
    }
    f
}

/// The backend's SYN-ACK to the SYN `syn` (as the switch sent it), with
/// its own sequence number `isn`.
fn syn_ack_to(syn: &[u8], isn: u32) -> Vec<u8> {
    let mut f = syn.to_vec();
    if f.len() < 54 {
        return f;
    }
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    let (a, b) = f[26..34].split_at_mut(4);
    a.swap_with_slice(b);
    let (a, b) = f[34..38].split_at_mut(2);
    a.swap_with_slice(b);
    let client_isn = u32::from_be_bytes([f[38], f[39], f[40], f[41]]);
    let f = with_numbers(f, isn, client_isn.wrapping_add(1));
    let mut f = f;
    f[47] = 0x12;
    f
}

/// Frame number `which` of what a real network sends, with its port; `x`
/// varies ports and addresses.
fn template(which: u8, x: u16, learned: &Learned) -> (usize, Vec<u8>) {
    let client = vm_mac(0, 1);
    let c4 = [10, 1, 0, 20];
    let vip = [10, 1, 0, 100];
    let sport = 40000 + x % 64;
    let wire = [2, 0, 0, 0, 9, 9];
    match which % 28 {
        14 => (0, ipv4(client, GW_A, c4, vip, 6, sport, 81, 0x02)),
        // The client's ACK of the last cookie (with 8 bytes of data:
        // the first opens the connection, the next wait for the backend).
        15 => match learned.vm_cookie {
            Some((p, next, cookie)) => (
                0,
                with_numbers(
                    ipv4(client, GW_A, c4, vip, 6, p, 81, 0x10),
                    next,
                    cookie.wrapping_add(1),
                ),
            ),
            None => (0, ipv4(client, GW_A, c4, vip, 6, sport, 81, 0x10)),
        },
        16 => match &learned.backend_syn {
            Some((p, syn)) => (*p, syn_ack_to(syn, u32::from(x) << 8)),
            None => (
                1,
                ipv4(vm_mac(0, 4), GW_A, [10, 1, 0, 4], c4, 6, 8000, sport, 0x12),
            ),
        },
        17 => match learned.wire_cookie {
            Some((p, next, cookie)) => (
                5,
                with_numbers(
                    ipv4(
                        wire,
                        UPLINK_MAC,
                        [203, 0, 113, 9],
                        [198, 51, 100, 80],
                        6,
                        p,
                        80,
                        0x10,
                    ),
                    next,
                    cookie.wrapping_add(1),
                ),
            ),
            None => (
                5,
                ipv4(
                    wire,
                    UPLINK_MAC,
                    [203, 0, 113, 9],
                    [198, 51, 100, 80],
                    6,
                    sport,
                    80,
                    0x10,
                ),
            ),
        },
        18 => (
            1,
            ipv4(vm_mac(0, 4), GW_A, [10, 1, 0, 4], c4, 6, 8000, sport, 0x04),
        ),
        // (19-27: the plain templates from 14 on.)
        which if which >= 19 => template_plain(which - 5, x),
        which => template_plain(which, x),
    }
}

/// The templates that need nothing learned.
fn template_plain(which: u8, x: u16) -> (usize, Vec<u8>) {
    let client = vm_mac(0, 1);
    let c4 = [10, 1, 0, 20];
    let vip = [10, 1, 0, 100];
    let sport = 40000 + x % 64;
    let snat_port = 1024 + x % 4096;
    let client_on_wire = |dst: [u8; 4], flags: u8| {
        ipv4(
            [2, 0, 0, 0, 9, 9],
            UPLINK_MAC,
            [203, 0, 113, 9],
            dst,
            6,
            sport,
            80,
            flags,
        )
    };
    match which % 23 {
        // To the Mux VIP: a SYN, then the rest of a connection (seen one
        // way), each on to a DIP in IP in IP.
        20 => (5, client_on_wire([198, 51, 100, 90], 0x02)),
        21 => (
            5,
            client_on_wire([198, 51, 100, 90], if x % 2 == 0 { 0x10 } else { 0x11 }),
        ),
        // From a Mux, in IP in IP, to a DSR backend (or to an address that
        // is none), for the DSR VIP.
        22 => (
            5,
            ipip(
                [192, 0, 2, 30],
                [10, 1, 0, 4 + (x % 3) as u8],
                client_on_wire([198, 51, 100, 91], if x % 4 == 0 { 0x10 } else { 0x02 }),
            ),
        ),
        0 => (0, ipv4(client, GW_A, c4, vip, 6, sport, 80, 0x02)),
        1 => (0, ipv4(client, GW_A, c4, vip, 6, sport, 80, 0x10)),
        2 => (0, ipv4(client, GW_A, c4, vip, 17, sport, 53, 0)),
        3 => (
            1,
            ipv4(vm_mac(0, 4), GW_A, [10, 1, 0, 4], c4, 6, 8000, sport, 0x12),
        ),
        4 => (
            0,
            ipv4(client, GW_A, c4, [10, 1, 0, 4], 6, sport, 8000, 0x02),
        ),
        5 => (
            0,
            ipv4(client, GW_A, c4, [203, 0, 113, 9], 6, sport, 443, 0x02),
        ),
        6 => (
            5,
            ipv4(
                [2, 0, 0, 0, 9, 9],
                UPLINK_MAC,
                [203, 0, 113, 9],
                [198, 51, 100, 50],
                6,
                443,
                1024 + x % 4096,
                0x12,
            ),
        ),
        7 => (
            5,
            ipv4(
                [2, 0, 0, 0, 9, 9],
                UPLINK_MAC,
                [203, 0, 113, 9],
                [198, 51, 100, 80],
                6,
                sport,
                80,
                0x02,
            ),
        ),
        8 => (0, arp(client, c4, [10, 1, 0, (x % 8) as u8])),
        9 => (
            5,
            arp([2, 0, 0, 0, 9, 9], [203, 0, 113, 9], [198, 51, 100, 50]),
        ),
        10 => (
            0,
            ipv6_syn(client, GW_A, 0x20, 0x00 | (x % 2) as u8 * 4, 8000),
        ),
        11 => (0, neighbor_solicit((x % 8) as u8)),
        12 => (
            3,
            ipv4(
                vm_mac(1, 30),
                [0x12, 0, 0, 0, 0, 2],
                [10, 1, 0, 30],
                c4,
                6,
                sport,
                80,
                0x02,
            ),
        ),
        13 => (
            5,
            ipv4(
                [2, 0, 0, 0, 9, 9],
                UPLINK_MAC,
                [203, 0, 113, 9],
                c4,
                6,
                443,
                sport,
                0x12,
            ),
        ),
        // Hairpinned: to a SNAT mapping, and to the public VIP, from a VM.
        14 => (
            0,
            ipv4(
                client,
                GW_A,
                c4,
                [198, 51, 100, 50],
                17,
                sport,
                snat_port,
                0,
            ),
        ),
        15 => (
            0,
            ipv4(client, GW_A, c4, [198, 51, 100, 80], 6, sport, 80, 0x02),
        ),
        // To the remote endpoint of vnet a: out in VXLAN.
        17 => (
            0,
            ipv4(client, GW_A, c4, [10, 1, 0, 30], 6, sport, 8000, 0x02),
        ),
        // From the remote endpoints, in their tunnels (VXLAN from vnet a's
        // host, Geneve from vnet b's), to the server and the client.
        18 => (
            5,
            tunnelled(
                false,
                100,
                [192, 0, 2, 7],
                ipv4(
                    [2, 0, 0, 0, 7, 1],
                    GW_A,
                    [10, 1, 0, 30],
                    [10, 1, 0, 4],
                    6,
                    sport,
                    8000,
                    0x02,
                ),
            ),
        ),
        19 => (
            5,
            tunnelled(
                true,
                200,
                [192, 0, 2, 8],
                ipv4(
                    [2, 0, 0, 0, 7, 7],
                    [0x12, 0, 0, 0, 0, 2],
                    [10, 1, 0, 31],
                    [10, 1, 0, 20],
                    17,
                    sport,
                    53,
                    0,
                ),
            ),
        ),
        // From the wire to a SNAT mapping that no connection expects.
        _ => (
            5,
            ipv4(
                [2, 0, 0, 0, 9, 9],
                UPLINK_MAC,
                [203, 0, 113, 9],
                [198, 51, 100, 50],
                17,
                3478,
                snat_port,
                0,
            ),
        ),
    }
}

struct Harness {
    learned: Learned,
    pool: Pool,
    worker: Worker<PoolBuf, Switch>,
    ends: Vec<RingPort<PoolBuf>>,
    port_stats: Vec<Arc<PortStats>>,
    switch: Arc<SwitchStats>,
    /// Every packet traced live as it goes through the switch.
    live: Arc<LiveTrace>,
    /// A scratch switch over the same policy, tracing each frame first.
    scratch: Switch,
    /// Flow logs, on.
    flow_log: Arc<vswitch::flowlog::FlowLog>,
}

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let mut cfg = PoolConfig::new("fuzz-switch", 4096);
        cfg.huge = HugePages::Never;
        let pool = Pool::new(&cfg).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(), 1).unwrap(),
        ));
        let sw_cfg = SwitchConfig {
            flow_table_size: 4096,
            conn_table_size: 4096,
            flow_idle: Duration::from_secs(60),
            // web1's port is narrow: "fragmentation needed" and too_big.
            port_mtu: vec![1500, 600, 1500, 1500, 1500, 1500],
            ..SwitchConfig::default()
        };
        let live = LiveTrace::new(4096);
        live.arm(
            dataplane::capture::Spec {
                port: None,
                filter: Default::default(),
                snaplen: 64,
            },
            u64::MAX,
            u64::MAX,
        );
        let scratch = Switch::scratch(policy.clone(), &sw_cfg);
        let flow_log = vswitch::flowlog::FlowLog::new(4096);
        flow_log.set(Some(Duration::from_millis(1)));
        let sw = Switch::new(policy, sw_cfg)
            .with_live_trace(0, live.clone())
            .with_flow_log(flow_log.clone());
        let switch = sw.stats();
        let mut ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
        let mut ends = Vec::new();
        let mut port_stats = Vec::new();
        for i in 0..PORTS {
            let l = |n: String| LinkInfo::new(&n, MacAddr([2, 0, 0, 0, 8, i as u8]), "ring");
            let (end, sw_end) = ring::pair(l(format!("p{i}")), l(format!("sw-p{i}")), 256);
            port_stats.push(sw_end.stats().clone());
            ports.push(Box::new(sw_end));
            ends.push(end);
        }
        Mutex::new(Harness {
            learned: Learned::default(),
            pool,
            worker: Worker::new("fuzz", None, ports, sw),
            ends,
            port_stats,
            switch,
            live,
            scratch,
            flow_log,
        })
    })
}

/// Every packet the switch's ports received: sent, or dropped with a
/// reason, or held (for a SYN-proxied connection, or a later fragment for
/// its first).
fn accounted(h: &Harness) -> (u64, u64) {
    let snap: Vec<_> = h.port_stats.iter().map(|s| s.snapshot()).collect();
    let rx: u64 = snap.iter().map(|s| s.rx_packets).sum();
    let tx: u64 = snap.iter().map(|s| s.tx_packets).sum();
    let port_drops: u64 = snap.iter().map(|s| s.drops).sum();
    let switch_drops: u64 = h.switch.nonzero().iter().map(|d| d.1).sum();
    let worker_drops = h.worker.stats().drops.total();
    let held = h
        .switch
        .syn_proxy_held
        .load(std::sync::atomic::Ordering::Relaxed)
        + h.switch
            .frags_waiting
            .load(std::sync::atomic::Ordering::Relaxed);
    (rx, tx + port_drops + switch_drops + worker_drops + held)
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut h) = harness().lock() else { return };
    let h = &mut *h;
    let mut rest = data;
    while let [port, hi, lo, tail @ ..] = rest {
        let len = (usize::from(*hi) << 8 | usize::from(*lo))
            .min(tail.len())
            .min(2000);
        let (frame, after) = tail.split_at(len);
        rest = after;
        let (p, frame) = if port & 0x80 == 0 {
            (usize::from(*port) % PORTS, frame.to_vec())
        } else {
            // A real frame, with the record's bytes from the second on
            // written over it from offset `frame[1]`.
            let (which, x) = match frame {
                [w, a, b, ..] => (*w, u16::from(*a) << 8 | u16::from(*b)),
                [w, ..] => (*w, 0),
                [] => (*port, 0),
            };
            let (p, mut f) = template(which, x, &h.learned);
            if let [_, _, _, at, bytes @ ..] = frame {
                for (i, b) in bytes.iter().enumerate().take(8) {
                    let at = usize::from(*at) + i;
                    if let Some(slot) = f.get_mut(at) {
                        *slot = *b;
                    }
                }
            }
            (p, f)
        };
        // A trace of it first, on the scratch switch (whose tables take
        // it in as a first packet), which changes nothing of the worker's.
        if let Ok(buf) = h.pool.alloc_copy(&frame) {
            let t = h.scratch.trace(buf, p as u16);
            if let TraceEnd::Drop(r) = t.end {
                assert!(!r.name().is_empty());
            }
        }
        let Ok(buf) = h.pool.alloc_copy(&frame) else {
            continue;
        };
        let mut b = Batch::new();
        let _ = b.push(buf);
        h.ends[p].tx_burst(&mut b);
        h.worker.poll_once();
        // Whatever the switch sent is taken off the far ends.
        let mut out = Batch::new();
        for (i, e) in h.ends.iter_mut().enumerate() {
            while e.rx_burst(&mut out) > 0 {
                for pkt in out.drain() {
                    h.learned.read(i, pkt.data());
                }
            }
        }
    }
    // Every packet traced live says something of where it went.
    let mut traced = Vec::new();
    h.live.take(&mut traced);
    for r in &traced {
        assert!(r.end.is_some() || !r.steps.is_empty(), "{r:?}");
    }
    // Every flow-log record is consistent.
    while let Some(r) = h.flow_log.pop() {
        use vswitch::flowlog::FlowEnd;
        assert!(r.first_ns <= r.last_ns, "{r:?}");
        assert_eq!(r.end == FlowEnd::Denied, r.out_port.is_none(), "{r:?}");
        assert!(r.end != FlowEnd::Active || r.packets > 0, "{r:?}");
        assert!(r.end != FlowEnd::Denied || r.packets == 1, "{r:?}");
        // IP bytes: at least a header a packet.
        assert!(r.bytes >= r.packets * 20, "{r:?}");
    }
    // Checked once per input (the counts are cumulative, so a packet lost
    // anywhere in the input shows here): reading every counter after each
    // record cost more than the pipeline itself.
    let (rx, fate) = accounted(h);
    assert_eq!(rx, fate, "a packet left without a reason");
});
