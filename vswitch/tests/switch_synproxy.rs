//! A VIP's SYN proxy, frame by frame: a SYN is answered by the switch with
//! a cookie and nothing reaches the backend; the client's ACK of the
//! cookie becomes the backend's SYN; the backend's SYN-ACK is answered by
//! the switch; from then on both directions pass with their sequence
//! numbers shifted between the cookie and the backend's own, on the slow
//! path and on cached flows alike; data the client sends before the
//! backend answered waits for it. Every frame's checksums are checked by
//! etherparse. The worker is polled by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use arc_swap::ArcSwap;
use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::Worker;
use dataplane::{Batch, LinkInfo, MacAddr, PacketBuf, Port};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, SynProxy, VipConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use vswitch::{Policy, Switch, SwitchConfig, SwitchStats, Topology, VipDef, VmDef, VnetDef};

const GW: MacAddr = MacAddr([0x12, 0, 0, 0, 0, 1]);
const CLIENT: usize = 0;
const BACKEND: usize = 1;

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn topology() -> Topology {
    let vm = |name: &str, port: u16, m: u8, ip: &str, nsg| VmDef {
        name: name.into(),
        port,
        vnet: 0,
        mac: mac(m),
        ips: vec![IpAddr::V4(v4(ip))],
        nsg,
        internal: false,
    };
    let http = NsgSpec {
        name: "http".into(),
        rules: vec![RuleSpec {
            name: Some("http".into()),
            priority: 100,
            direction: "in".into(),
            action: "allow".into(),
            protocol: "tcp".into(),
            src: vec!["any".into()],
            dst: vec!["any".into()],
            src_ports: vec!["any".into()],
            dst_ports: vec!["8000".into()],
            stateful: None,
        }],
    };
    let mut vip = VipConfig::new(
        "web",
        IpAddr::V4(v4("10.1.0.100")),
        80,
        6,
        vec![Backend {
            ip: IpAddr::V4(v4("10.1.0.5")),
            port: 8000,
            weight: 1,
        }],
    );
    vip.syn_proxy = SynProxy::On;
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: GW,
            snat: None,
            vni: None,
            encap: Default::default(),
        }],
        vms: vec![
            vm("client", CLIENT as u16, 1, "10.1.0.20", None),
            vm("backend", BACKEND as u16, 5, "10.1.0.5", Some(0)),
        ],
        nsgs: vec![http],
        vips: vec![VipDef {
            vnet: 0,
            config: vip,
            health: vec![],
        }],
        ports: 2,
        uplink: None,
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

struct Net {
    pool: Pool,
    worker: Worker<PoolBuf, Switch>,
    ends: Vec<RingPort<PoolBuf>>,
    stats: Arc<SwitchStats>,
}

impl Net {
    fn new() -> Net {
        let mut cfg = PoolConfig::new("synproxy-test", 256);
        cfg.huge = HugePages::Never;
        let pool = Pool::new(&cfg).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(), 1).unwrap(),
        ));
        let sw = Switch::new(
            policy,
            SwitchConfig {
                flow_table_size: 1024,
                conn_table_size: 1024,
                ..SwitchConfig::default()
            },
        );
        let stats = sw.stats();
        let mut ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
        let mut ends = Vec::new();
        for i in 0..2 {
            let l = |n: String| LinkInfo::new(&n, MacAddr([2, 0, 0, 0, 8, i]), "ring");
            let (end, sw_end) = ring::pair(l(format!("p{i}")), l(format!("sw-p{i}")), 64);
            ports.push(Box::new(sw_end));
            ends.push(end);
        }
        Net {
            pool,
            worker: Worker::new("synproxy", None, ports, sw),
            ends,
            stats,
        }
    }

    /// Sends `frame` into `port`; returns the frames that left, by port.
    fn send(&mut self, port: usize, frame: Vec<u8>) -> Vec<(usize, Vec<u8>)> {
        let mut b = Batch::new();
        b.push(self.pool.alloc_copy(&frame).unwrap()).unwrap();
        self.ends[port].tx_burst(&mut b);
        self.worker.poll_once();
        let mut out = Vec::new();
        let mut rx = Batch::new();
        for (i, e) in self.ends.iter_mut().enumerate() {
            e.rx_burst(&mut rx);
            for p in rx.drain() {
                out.push((i, p.data().to_vec()));
            }
        }
        out
    }

    fn dropped(&self, name: &str) -> u64 {
        self.stats
            .nonzero()
            .iter()
            .find(|d| d.0 == name)
            .map_or(0, |d| d.1)
    }
}

/// A TCP segment from `src_mac` to the gateway.
#[allow(clippy::too_many_arguments)]
fn seg(
    src_mac: MacAddr,
    (src, sport): (&str, u16),
    (dst, dport): (&str, u16),
    flags: u8,
    seq: u32,
    ack: u32,
    mss: Option<u16>,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src_mac.0, GW.0)
        .ipv4(v4(src).octets(), v4(dst).octets(), 64)
        .tcp(sport, dport, seq, 64240);
    let b = if flags & 0x02 != 0 { b.syn() } else { b };
    let b = if flags & 0x04 != 0 { b.rst() } else { b };
    let b = if flags & 0x08 != 0 { b.psh() } else { b };
    let b = if flags & 0x10 != 0 { b.ack(ack) } else { b };
    let b = match mss {
        Some(m) => b
            .options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(m),
                etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
                etherparse::TcpOptionElement::WindowScale(7),
            ])
            .unwrap(),
        None => b,
    };
    b.write(&mut v, payload).unwrap();
    v
}

/// What a frame the switch sent says, its checksums checked.
#[derive(Debug)]
struct Seen {
    dst_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    ack: bool,
    seq: u32,
    ack_no: u32,
    mss: Option<u16>,
    payload: Vec<u8>,
}

fn seen(f: &[u8]) -> Seen {
    let s = SlicedPacket::from_ethernet(f).unwrap();
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) = (&s.net, &s.transport) else {
        panic!("not tcp/ipv4: {f:02x?}")
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "ip checksum");
    let th = t.to_header();
    assert_eq!(
        th.checksum,
        th.calc_checksum_ipv4(&h, t.payload()).unwrap(),
        "tcp checksum"
    );
    let mss = th.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
        _ => None,
    });
    Seen {
        dst_mac: f[0..6].try_into().unwrap(),
        src: (Ipv4Addr::from(h.source), th.source_port),
        dst: (Ipv4Addr::from(h.destination), th.destination_port),
        syn: th.syn,
        ack: th.ack,
        seq: th.sequence_number,
        ack_no: th.acknowledgment_number,
        mss,
        payload: t.payload().to_vec(),
    }
}

fn one(out: Vec<(usize, Vec<u8>)>, port: usize) -> Seen {
    assert_eq!(out.len(), 1, "{out:02x?}");
    assert_eq!(out[0].0, port, "left by the wrong port");
    seen(&out[0].1)
}

const C: (&str, u16) = ("10.1.0.20", 40000);
const VIP: (&str, u16) = ("10.1.0.100", 80);
const B: (&str, u16) = ("10.1.0.5", 8000);
const ISN: u32 = 0xfffff000;
const BISN: u32 = 0x1234_5678;

#[test]
fn a_proxied_connection_from_syn_to_data_both_ways() {
    let mut n = Net::new();
    // The SYN: answered by the switch, from the VIP, with a cookie.
    let sa = one(
        n.send(CLIENT, seg(mac(1), C, VIP, 0x02, ISN, 0, Some(1460), b"")),
        CLIENT,
    );
    assert_eq!(sa.dst_mac, mac(1).0);
    assert_eq!((sa.src, sa.dst), ((v4(VIP.0), 80), (v4(C.0), C.1)));
    assert!(sa.syn && sa.ack);
    assert_eq!(sa.ack_no, ISN.wrapping_add(1));
    assert_eq!(sa.mss, Some(1460));
    let cookie = sa.seq;
    // A forged ACK reaches nobody.
    assert!(
        n.send(
            CLIENT,
            seg(mac(1), C, VIP, 0x10, ISN.wrapping_add(1), cookie, None, b"")
        )
        .is_empty()
    );
    assert_eq!(n.dropped("lb_syn_cookie_invalid"), 1);
    // The client's ACK: the backend's SYN, in the client's name.
    let ack = |payload: &[u8], acked: u32| to_vip(C, 0x10, 0, cookie.wrapping_add(acked), payload);
    let syn = one(n.send(CLIENT, ack(b"", 0)), BACKEND);
    assert_eq!(syn.dst_mac, mac(5).0);
    assert_eq!((syn.src, syn.dst), ((v4(C.0), C.1), (v4(B.0), B.1)));
    assert!(syn.syn && !syn.ack);
    assert_eq!(syn.seq, ISN);
    assert_eq!(syn.mss, Some(1460));
    assert!(syn.payload.is_empty());
    // Data before the backend answered waits.
    assert!(n.send(CLIENT, ack(b"GET /", 0)).is_empty());
    // The backend's SYN-ACK: the switch completes its handshake; the
    // waiting data follows, shifted to the backend's numbers.
    let out = n.send(
        BACKEND,
        seg(
            mac(5),
            B,
            C,
            0x12,
            BISN,
            ISN.wrapping_add(1),
            Some(1400),
            b"",
        ),
    );
    assert_eq!(out.len(), 2, "{out:02x?}");
    let a = seen(&out[0].1);
    assert_eq!(out[0].0, BACKEND);
    assert_eq!(a.dst_mac, mac(5).0);
    assert_eq!((a.src, a.dst), ((v4(C.0), C.1), (v4(B.0), B.1)));
    assert!(a.ack && !a.syn);
    assert_eq!(
        (a.seq, a.ack_no),
        (ISN.wrapping_add(1), BISN.wrapping_add(1))
    );
    let d = seen(&out[1].1);
    assert_eq!(out[1].0, BACKEND);
    assert_eq!(d.payload, b"GET /");
    assert_eq!(
        (d.seq, d.ack_no),
        (ISN.wrapping_add(1), BISN.wrapping_add(1))
    );
    // Both ways, twice: the slow path, then the cached flows.
    for round in 0..2u32 {
        let sent = 5 + 3 * round;
        let to_b = one(n.send(CLIENT, ack(b"abc", 100 * round)), BACKEND);
        assert_eq!(to_b.seq, ISN.wrapping_add(1));
        assert_eq!(to_b.ack_no, BISN.wrapping_add(1 + 100 * round));
        assert_eq!(to_b.payload, b"abc");
        let back = seg(
            mac(5),
            B,
            C,
            0x10,
            BISN.wrapping_add(1 + 100 * round),
            ISN.wrapping_add(1 + sent),
            None,
            &[0x5a; 100],
        );
        let to_c = one(n.send(BACKEND, back), CLIENT);
        assert_eq!(to_c.dst_mac, mac(1).0);
        assert_eq!((to_c.src, to_c.dst), ((v4(VIP.0), 80), (v4(C.0), C.1)));
        assert_eq!(to_c.seq, cookie.wrapping_add(1 + 100 * round));
        assert_eq!(to_c.ack_no, ISN.wrapping_add(1 + sent));
        assert_eq!(to_c.payload, [0x5a; 100]);
    }
    // An ICMP error the client sends about a segment it got reaches the
    // backend about the backend's own segment: addresses and sequence
    // number as the backend sent it (Linux ignores an error whose quoted
    // sequence number it never sent).
    let seq = BISN.wrapping_add(201);
    let back = seg(mac(5), B, C, 0x10, seq, ISN.wrapping_add(12), None, b"xyz");
    let out = n.send(BACKEND, back);
    assert_eq!(out.len(), 1);
    let got = &out[0].1;
    assert_eq!(seen(got).seq, cookie.wrapping_add(201));
    let mut err = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(1).0, GW.0)
        .ipv4(v4(C.0).octets(), v4(VIP.0).octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut err, &got[14..14 + 28])
        .unwrap();
    let out = n.send(CLIENT, err);
    assert_eq!(out.len(), 1, "{out:02x?}");
    assert_eq!(out[0].0, BACKEND);
    let e = &out[0].1;
    let quoted_ip = 14 + 20 + 8;
    assert_eq!(
        &e[quoted_ip + 12..quoted_ip + 16],
        &v4(B.0).octets(),
        "quoted source"
    );
    assert_eq!(&e[quoted_ip + 20..quoted_ip + 22], &8000u16.to_be_bytes());
    assert_eq!(
        &e[quoted_ip + 24..quoted_ip + 28],
        &seq.to_be_bytes(),
        "the backend's own sequence number"
    );
    assert_eq!(n.dropped("rewrite_failed"), 0);
}

#[test]
fn a_backend_that_refuses_resets_the_client_at_its_sequence() {
    let mut n = Net::new();
    let sa = one(
        n.send(CLIENT, seg(mac(1), C, VIP, 0x02, ISN, 0, None, b"")),
        CLIENT,
    );
    assert_eq!(sa.mss, Some(536), "no MSS offered: the default");
    let cookie = sa.seq;
    one(n.send(CLIENT, to_vip(C, 0x10, 0, cookie, b"")), BACKEND);
    // The backend's RST (as Linux answers a SYN to a closed port).
    let rst = seg(mac(5), B, C, 0x14, 0, ISN.wrapping_add(1), None, b"");
    let r = one(n.send(BACKEND, rst), CLIENT);
    assert_eq!(r.seq, cookie.wrapping_add(1), "where the client expects it");
    assert_eq!(r.src, (v4(VIP.0), 80));

    // Data held when the backend refuses is dropped with the reset, not
    // kept until the handshake's timeout.
    let c = ("10.1.0.20", 40010);
    let cookie = open(&mut n, c);
    assert!(
        n.send(CLIENT, to_vip(c, 0x18, 0, cookie, b"GET"))
            .is_empty()
    );
    assert_eq!(held(&n), 1);
    let rst = seg(mac(5), B, c, 0x14, 0, ISN.wrapping_add(1), None, b"");
    one(n.send(BACKEND, rst), CLIENT);
    assert_eq!(held(&n), 0);
    assert_eq!(n.dropped("syn_proxy_park_expired"), 1);
}

/// A segment from client `c` to the VIP, `off` bytes into its stream,
/// acknowledging the SYN-ACK with `cookie`.
fn to_vip(c: (&str, u16), flags: u8, off: u32, cookie: u32, payload: &[u8]) -> Vec<u8> {
    let seq = ISN.wrapping_add(1 + off);
    seg(
        mac(1),
        c,
        VIP,
        flags,
        seq,
        cookie.wrapping_add(1),
        None,
        payload,
    )
}

/// The SYN-ACK and the ACK that opens the connection; returns the cookie.
fn open(n: &mut Net, c: (&str, u16)) -> u32 {
    let sa = one(
        n.send(CLIENT, seg(mac(1), c, VIP, 0x02, ISN, 0, Some(1460), b"")),
        CLIENT,
    );
    let cookie = sa.seq;
    let syn = one(n.send(CLIENT, to_vip(c, 0x10, 0, cookie, b"")), BACKEND);
    assert!(syn.syn);
    cookie
}

#[test]
fn before_the_backend_answers() {
    let mut n = Net::new();
    // Two data segments wait, in order; the first sent again goes to the
    // backend as its SYN again.
    let c = ("10.1.0.20", 40001);
    let cookie = open(&mut n, c);
    let data = |off: u32, payload: &[u8]| to_vip(c, 0x18, off, cookie, payload);
    assert!(n.send(CLIENT, data(0, b"first-")).is_empty());
    assert!(n.send(CLIENT, data(6, b"second")).is_empty());
    let again = one(n.send(CLIENT, data(0, b"first-")), BACKEND);
    assert!(again.syn && again.payload.is_empty());
    assert_eq!(held(&n), 2);
    let out = n.send(BACKEND, backend_syn_ack(c));
    let got: Vec<_> = out.iter().map(|(p, f)| (*p, seen(f))).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|(p, _)| *p == BACKEND));
    assert!(got[0].1.ack && got[0].1.payload.is_empty());
    assert_eq!(got[1].1.payload, b"first-");
    assert_eq!(got[2].1.payload, b"second");
    assert_eq!(got[2].1.ack_no, BISN.wrapping_add(1));
    assert_eq!(held(&n), 0);

    // The client resets before the backend answers: the backend's
    // SYN-ACK is answered with a reset, and what waited is dropped.
    let c = ("10.1.0.20", 40002);
    let cookie = open(&mut n, c);
    assert!(n.send(CLIENT, to_vip(c, 0x18, 0, cookie, b"x")).is_empty());
    assert!(n.send(CLIENT, to_vip(c, 0x14, 0, cookie, b"")).is_empty());
    let out = n.send(BACKEND, backend_syn_ack(c));
    let r = one(out, BACKEND);
    assert_eq!(r.seq, ISN.wrapping_add(1));
    assert!(!r.syn && !r.ack);
    assert_eq!(
        &seen_flags(&n.send(CLIENT, seg(mac(1), c, VIP, 0x02, ISN + 7, 0, None, b""))),
        &[(CLIENT, 0x12)],
        "a new SYN gets a cookie"
    );
    assert_eq!(n.dropped("syn_proxy_park_expired"), 1);

    // The client's SYN again after its ACK (retransmitted, or late): the
    // same cookie again, and the connection still takes the backend's
    // answer and lets the held data go on.
    let c = ("10.1.0.20", 40004);
    let cookie = open(&mut n, c);
    assert!(
        n.send(CLIENT, to_vip(c, 0x18, 0, cookie, b"GET"))
            .is_empty()
    );
    let sa = one(
        n.send(CLIENT, seg(mac(1), c, VIP, 0x02, ISN, 0, Some(1460), b"")),
        CLIENT,
    );
    assert_eq!(sa.seq, cookie, "the connection's own cookie");
    let out = n.send(BACKEND, backend_syn_ack(c));
    let got: Vec<_> = out.iter().map(|(p, f)| (*p, seen(f))).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].1.payload, b"GET");

    // A new SYN (another sequence number) while the backend is silent:
    // the client starts again with a cookie.
    let c = ("10.1.0.20", 40003);
    open(&mut n, c);
    let out = n.send(CLIENT, seg(mac(1), c, VIP, 0x02, ISN + 99, 0, None, b""));
    assert_eq!(seen_flags(&out), [(CLIENT, 0x12)]);
    assert_eq!(seen(&out[0].1).ack_no, ISN + 100);
}

/// The backend's SYN-ACK for client `c` (its SYN carried `ISN`).
fn backend_syn_ack(c: (&str, u16)) -> Vec<u8> {
    seg(
        mac(5),
        B,
        c,
        0x12,
        BISN,
        ISN.wrapping_add(1),
        Some(1460),
        b"",
    )
}

/// Packets the switch holds for proxied connections now.
fn held(n: &Net) -> u64 {
    n.stats
        .syn_proxy_held
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn seen_flags(out: &[(usize, Vec<u8>)]) -> Vec<(usize, u8)> {
    out.iter().map(|(p, f)| (*p, f[14 + 20 + 13])).collect()
}
