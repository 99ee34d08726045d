//! Connection tracking of every admitted connection, frame by frame: the
//! security groups judge a connection when it starts and the decision holds
//! through new policy generations; what is denied, or goes nowhere, is never
//! taken for admitted later; a stateless allow out does not bypass the
//! destination's inbound rules; from the wire, only replies of connections
//! a VM opened out of the uplink enter, in the vnet that owns them. IPv4
//! fragments after the first follow their first fragment's flow through a
//! VIP. The worker is polled by hand, so each step is exactly what was
//! sent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use arc_swap::ArcSwap;
use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::Worker;
use dataplane::{Batch, LinkInfo, MacAddr, PacketBuf, Port};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, VipConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vswitch::{
    Policy, Switch, SwitchConfig, SwitchStats, Topology, UplinkDef, VipDef, VmDef, VnetDef,
};

const GW: MacAddr = MacAddr([0x12, 0, 0, 0, 0, 1]);
const GW_B: MacAddr = MacAddr([0x12, 0, 0, 0, 0, 2]);
const UPLINK: MacAddr = MacAddr([2, 0x50, 0x4c, 0x58, 0xff, 0xff]);
const ROUTER: MacAddr = MacAddr([2, 0, 0, 0, 9, 9]);
/// Ports: 0 client (a), 1 server (a), 2 dip (a), 3 other (b, same
/// addresses as the client), 4 uplink.
const CLIENT: usize = 0;
const SERVER: usize = 1;
const DIP: usize = 2;
const OTHER: usize = 3;
const WIRE: usize = 4;

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn rule(name: &str, prio: i64, dir: &str, action: &str, src: &str, dst_ports: &str) -> RuleSpec {
    RuleSpec {
        name: Some(name.into()),
        priority: prio,
        direction: dir.into(),
        action: action.into(),
        protocol: "tcp".into(),
        src: vec![src.into()],
        dst: vec!["any".into()],
        src_ports: vec!["any".into()],
        dst_ports: vec![dst_ports.into()],
        stateful: None,
    }
}

/// `vm` with an IPv6 address too.
fn with_v6(mut vm: VmDef, ip: &str) -> VmDef {
    vm.ips.push(ip.parse().unwrap());
    vm
}

/// The client's group denies inbound TCP from its vnet; the server's allows
/// TCP 8000 in; the DIP's denies everything in; `extra` rules go to a spare
/// group (what changes between generations); `stateless_out` makes the
/// client's outbound allow to 9000 stateless.
fn topology(extra: usize, stateless_out: bool) -> Topology {
    let vm = |name: &str, port: u16, vnet: usize, m: u8, ip: &str, nsg: Option<usize>| VmDef {
        name: name.into(),
        port,
        vnet,
        mac: mac(m),
        ips: vec![IpAddr::V4(v4(ip))],
        nsg,
        internal: false,
    };
    let mut out9000 = rule("out-9000", 100, "out", "allow", "any", "9000");
    if stateless_out {
        out9000.stateful = Some(false);
    }
    let client = NsgSpec {
        name: "client".into(),
        rules: vec![
            rule("deny-vnet", 100, "in", "deny", "10.1.0.0/16", "any"),
            out9000,
        ],
    };
    let server = NsgSpec {
        name: "server".into(),
        rules: vec![
            rule("http", 100, "in", "allow", "any", "8000"),
            rule("no-9000", 110, "in", "deny", "any", "9000"),
        ],
    };
    let dip = NsgSpec {
        name: "dip".into(),
        rules: vec![rule("nothing", 100, "in", "deny", "any", "any")],
    };
    let spare = NsgSpec {
        name: "spare".into(),
        rules: (0..extra)
            .map(|i| rule(&format!("r{i}"), 200 + i as i64, "in", "deny", "any", "1"))
            .collect(),
    };
    Topology {
        vnets: vec![
            VnetDef {
                name: "a".into(),
                prefixes: vec![
                    "10.1.0.0/16".parse().unwrap(),
                    "fd00:1::/64".parse().unwrap(),
                ],
                gateway_mac: GW,
                snat: None,
                vni: None,
                encap: Default::default(),
            },
            VnetDef {
                name: "b".into(),
                prefixes: vec!["10.1.0.0/16".parse().unwrap()],
                gateway_mac: GW_B,
                snat: None,
                vni: None,
                encap: Default::default(),
            },
        ],
        vms: vec![
            with_v6(
                vm("client", CLIENT as u16, 0, 1, "10.1.0.20", Some(0)),
                "fd00:1::20",
            ),
            with_v6(
                vm("server", SERVER as u16, 0, 4, "10.1.0.4", Some(1)),
                "fd00:1::4",
            ),
            vm("dip", DIP as u16, 0, 5, "10.1.0.5", Some(2)),
            vm("other", OTHER as u16, 1, 1, "10.1.0.20", None),
        ],
        nsgs: vec![client, server, dip, spare],
        vips: vec![
            VipDef {
                vnet: 0,
                config: VipConfig::new(
                    "v",
                    IpAddr::V4(v4("10.1.0.100")),
                    80,
                    6,
                    vec![Backend {
                        ip: IpAddr::V4(v4("10.1.0.5")),
                        port: 8000,
                        weight: 1,
                    }],
                ),
                health: vec![],
            },
            VipDef {
                vnet: 0,
                config: VipConfig::new(
                    "dns",
                    IpAddr::V4(v4("10.1.0.101")),
                    53,
                    17,
                    vec![Backend {
                        ip: IpAddr::V4(v4("10.1.0.4")),
                        port: 5353,
                        weight: 1,
                    }],
                ),
                health: vec![],
            },
        ],
        ports: 5,
        uplink: Some(UplinkDef {
            port: WIRE as u16,
            mac: UPLINK,
            next_hop_mac: ROUTER,
            underlay: None,
        }),
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

struct Net {
    pool: Pool,
    policy: Arc<ArcSwap<Policy>>,
    generation: u64,
    worker: Worker<PoolBuf, Switch>,
    ends: Vec<RingPort<PoolBuf>>,
    stats: Arc<SwitchStats>,
}

impl Net {
    fn new(stateless_out: bool) -> Net {
        Net::with_mtu(stateless_out, Vec::new())
    }

    /// With `port_mtu` (by port).
    fn with_mtu(stateless_out: bool, port_mtu: Vec<u16>) -> Net {
        Net::with_config(
            stateless_out,
            SwitchConfig {
                port_mtu,
                ..Net::config()
            },
        )
    }

    /// The switch configuration the tests start from.
    fn config() -> SwitchConfig {
        SwitchConfig {
            flow_table_size: 1024,
            conn_table_size: 1024,
            ..SwitchConfig::default()
        }
    }

    fn with_config(stateless_out: bool, sw_cfg: SwitchConfig) -> Net {
        Net::traced(stateless_out, sw_cfg, None)
    }

    /// With a live trace, if given.
    fn traced(
        stateless_out: bool,
        sw_cfg: SwitchConfig,
        live: Option<Arc<vswitch::switch::LiveTrace>>,
    ) -> Net {
        let mut cfg = PoolConfig::new("conntrack-test", 1024);
        cfg.huge = HugePages::Never;
        let pool = Pool::new(&cfg).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(0, stateless_out), 1).unwrap(),
        ));
        let mut sw = Switch::new(policy.clone(), sw_cfg);
        if let Some(l) = live {
            sw = sw.with_live_trace(0, l);
        }
        let stats = sw.stats();
        let mut ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
        let mut ends = Vec::new();
        for i in 0..5 {
            let l = |n: String| LinkInfo::new(&n, MacAddr([2, 0, 0, 0, 8, i]), "ring");
            let (end, sw_end) = ring::pair(l(format!("p{i}")), l(format!("sw-p{i}")), 256);
            ports.push(Box::new(sw_end));
            ends.push(end);
        }
        Net {
            pool,
            policy,
            generation: 1,
            worker: Worker::new("conntrack", None, ports, sw),
            ends,
            stats,
        }
    }

    /// Publishes a new policy generation (rules of the spare group change),
    /// as any API change does: every cached flow goes back through the slow
    /// path.
    fn new_generation(&mut self, stateless_out: bool) {
        self.generation += 1;
        let t = topology(self.generation as usize, stateless_out);
        self.policy
            .store(Arc::new(Policy::compile(&t, self.generation).unwrap()));
    }

    /// Sends `frame` into switch port `port`; returns the ports it left by.
    fn send(&mut self, port: usize, frame: Vec<u8>) -> Vec<usize> {
        self.send_frames(port, frame)
            .into_iter()
            .map(|f| f.0)
            .collect()
    }

    /// Sends `frame` into switch port `port`; returns each frame that left
    /// the switch, with its port.
    fn send_frames(&mut self, port: usize, frame: Vec<u8>) -> Vec<(usize, Vec<u8>)> {
        let mut b = Batch::new();
        b.push(self.pool.alloc_copy(&frame).unwrap()).unwrap();
        self.ends[port].tx_burst(&mut b);
        self.worker.poll_once();
        let mut out = Vec::new();
        let mut rx = Batch::new();
        for (i, e) in self.ends.iter_mut().enumerate() {
            e.rx_burst(&mut rx);
            for p in rx.drain() {
                assert!(p.len() > 14);
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

/// A TCP frame (flags: 0x02 SYN, 0x12 SYN-ACK, 0x10 ACK, 0x11 FIN-ACK).
fn tcp(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut v = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(v4(src).octets(), v4(dst).octets(), 64)
        .tcp(sport, dport, 1, 65535);
    let b = if flags & 0x02 != 0 { b.syn() } else { b };
    let b = if flags & 0x10 != 0 { b.ack(1) } else { b };
    let b = if flags & 0x01 != 0 { b.fin() } else { b };
    b.write(&mut v, &[0x61; 8]).unwrap();
    v
}

#[test]
fn an_admitted_connection_outlives_new_generations_and_new_ones_are_judged() {
    let mut n = Net::new(false);
    // Client -> server:8000: admitted (client out: default allow to the
    // vnet; server in: "http"), and its replies pass although the client's
    // group denies inbound TCP from the vnet.
    assert_eq!(
        n.send(
            CLIENT,
            tcp(mac(1), GW, "10.1.0.20", 40000, "10.1.0.4", 8000, 0x02)
        ),
        [SERVER]
    );
    assert_eq!(
        n.send(
            SERVER,
            tcp(mac(4), GW, "10.1.0.4", 8000, "10.1.0.20", 40000, 0x12)
        ),
        [CLIENT]
    );
    for _ in 0..3 {
        n.new_generation(false);
        // The reply direction first: after a new generation its flow is
        // stale, and judged as new it would be denied.
        let slow = n.stats.slow_path.load(Ordering::Relaxed);
        assert_eq!(
            n.send(
                SERVER,
                tcp(mac(4), GW, "10.1.0.4", 8000, "10.1.0.20", 40000, 0x10)
            ),
            [CLIENT]
        );
        assert_eq!(
            n.stats.slow_path.load(Ordering::Relaxed),
            slow + 1,
            "revalidated"
        );
        assert_eq!(
            n.send(
                CLIENT,
                tcp(mac(1), GW, "10.1.0.20", 40000, "10.1.0.4", 8000, 0x10)
            ),
            [SERVER]
        );
    }
    assert_eq!(n.dropped("acl_deny"), 0);
    // A new connection from the server to the client is judged: denied.
    assert!(
        n.send(
            SERVER,
            tcp(mac(4), GW, "10.1.0.4", 8001, "10.1.0.20", 22, 0x02)
        )
        .is_empty()
    );
    assert_eq!(n.dropped("acl_deny"), 1);
    // ... and so is its next packet: a denied connection is not tracked.
    assert!(
        n.send(
            SERVER,
            tcp(mac(4), GW, "10.1.0.4", 8001, "10.1.0.20", 22, 0x10)
        )
        .is_empty()
    );
    assert_eq!(n.dropped("acl_deny"), 2);
}

#[test]
fn a_new_connection_on_the_port_of_a_timed_out_one_is_tracked_afresh() {
    // Closed connections are forgotten 20 ms after their last packet; their
    // flows stay cached far longer.
    let mut n = Net::with_config(
        false,
        SwitchConfig {
            timeouts: lb::conntrack::Timeouts {
                tcp_time_wait: 20_000_000,
                ..lb::conntrack::Timeouts::default()
            },
            ..Net::config()
        },
    );
    let to_server = |flags| tcp(mac(1), GW, "10.1.0.20", 43000, "10.1.0.4", 8000, flags);
    let to_client = |flags| tcp(mac(4), GW, "10.1.0.4", 8000, "10.1.0.20", 43000, flags);
    // A connection opens and closes (FIN each way); a policy change comes
    // before its last ACK, whose flow is decided again then: it belongs to
    // a closing connection.
    assert_eq!(n.send(CLIENT, to_server(0x02)), [SERVER]);
    assert_eq!(n.send(SERVER, to_client(0x12)), [CLIENT]);
    assert_eq!(n.send(CLIENT, to_server(0x10)), [SERVER]);
    assert_eq!(n.send(SERVER, to_client(0x11)), [CLIENT]);
    assert_eq!(n.send(CLIENT, to_server(0x11)), [SERVER]);
    n.new_generation(false);
    assert_eq!(n.send(SERVER, to_client(0x10)), [CLIENT]);
    // The connection times out; its flows remain.
    std::thread::sleep(std::time::Duration::from_millis(200));
    n.worker.poll_once();
    // The client opens a new connection on the same port: the SYN goes to
    // connection tracking (the slow path), not down the old flow.
    let slow = n.stats.slow_path.load(Ordering::Relaxed);
    assert_eq!(n.send(CLIENT, to_server(0x02)), [SERVER]);
    assert_eq!(n.stats.slow_path.load(Ordering::Relaxed), slow + 1);
    assert_eq!(n.send(SERVER, to_client(0x12)), [CLIENT]);
    // Tracked: after another policy change the server's packets are still
    // the replies of an admitted connection (the client's group denies new
    // inbound TCP from its vnet).
    n.new_generation(false);
    assert_eq!(n.send(SERVER, to_client(0x10)), [CLIENT]);
    assert_eq!(n.dropped("acl_deny"), 0);
}

#[test]
fn a_syn_on_a_flow_whose_connection_timed_out_opens_a_tracked_one() {
    // A handshake left unfinished is forgotten 20 ms after its last packet,
    // without FIN or RST; its flows stay cached, not closing.
    let mut n = Net::with_config(
        false,
        SwitchConfig {
            timeouts: lb::conntrack::Timeouts {
                tcp_handshake: 20_000_000,
                ..lb::conntrack::Timeouts::default()
            },
            ..Net::config()
        },
    );
    let to_server = |flags| tcp(mac(1), GW, "10.1.0.20", 43100, "10.1.0.4", 8000, flags);
    let to_client = |flags| tcp(mac(4), GW, "10.1.0.4", 8000, "10.1.0.20", 43100, flags);
    assert_eq!(n.send(CLIENT, to_server(0x02)), [SERVER]);
    assert_eq!(n.send(SERVER, to_client(0x12)), [CLIENT]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    n.worker.poll_once();
    // The client tries again on the same port: connection tracking decides
    // the SYN (the slow path), not the cached flow.
    let slow = n.stats.slow_path.load(Ordering::Relaxed);
    assert_eq!(n.send(CLIENT, to_server(0x02)), [SERVER]);
    assert_eq!(n.stats.slow_path.load(Ordering::Relaxed), slow + 1);
    assert_eq!(n.send(SERVER, to_client(0x12)), [CLIENT]);
    assert_eq!(n.send(CLIENT, to_server(0x10)), [SERVER]);
    // Tracked: after a policy change the server's packets are still the
    // replies of an admitted connection.
    n.new_generation(false);
    assert_eq!(n.send(SERVER, to_client(0x10)), [CLIENT]);
    assert_eq!(n.dropped("acl_deny"), 0);
}

#[test]
fn a_denied_vip_connection_is_forgotten_and_judged_again() {
    let mut n = Net::new(false);
    // Client -> VIP -> DIP, whose group denies everything in.
    for i in 1..=3 {
        assert!(
            n.send(
                CLIENT,
                tcp(mac(1), GW, "10.1.0.20", 41000, "10.1.0.100", 80, 0x02)
            )
            .is_empty()
        );
        assert_eq!(n.dropped("acl_deny"), i, "attempt {i} judged again");
    }
    // A reply the DIP makes up for that tuple finds no connection: it is a
    // new connection from the DIP to the client, which the client denies.
    assert!(
        n.send(
            DIP,
            tcp(mac(5), GW, "10.1.0.5", 8000, "10.1.0.20", 41000, 0x12)
        )
        .is_empty()
    );
    assert_eq!(n.dropped("acl_deny"), 4);
}

#[test]
fn a_stateless_allow_out_does_not_bypass_the_destination_inbound_rules() {
    let mut n = Net::new(true);
    // The client's "out-9000" allows statelessly; the server's "no-9000"
    // denies it in.
    assert!(
        n.send(
            CLIENT,
            tcp(mac(1), GW, "10.1.0.20", 42000, "10.1.0.4", 9000, 0x02)
        )
        .is_empty()
    );
    assert_eq!(n.dropped("acl_deny"), 1);
}

#[test]
fn from_the_wire_only_replies_of_a_vms_own_uplink_connections_enter() {
    let mut n = Net::new(false);
    // The client opens a connection out of the uplink (its vnet has no
    // SNAT: the address goes out as it is).
    assert_eq!(
        n.send(
            CLIENT,
            tcp(mac(1), GW, "10.1.0.20", 43000, "203.0.113.9", 443, 0x02)
        ),
        [WIRE]
    );
    // Its replies come back, in every generation, though the client's group
    // denies inbound traffic from the wire as new connections.
    assert_eq!(
        n.send(
            WIRE,
            tcp(ROUTER, UPLINK, "203.0.113.9", 443, "10.1.0.20", 43000, 0x12)
        ),
        [CLIENT]
    );
    n.new_generation(false);
    assert_eq!(
        n.send(
            WIRE,
            tcp(ROUTER, UPLINK, "203.0.113.9", 443, "10.1.0.20", 43000, 0x10)
        ),
        [CLIENT]
    );
    // A connection of the client inside its vnet, and a packet from the wire
    // that pretends to be its server: it enters nowhere, and the client's
    // connection goes on where it went.
    assert_eq!(
        n.send(
            CLIENT,
            tcp(mac(1), GW, "10.1.0.20", 44000, "10.1.0.4", 8000, 0x02)
        ),
        [SERVER]
    );
    let before = n.dropped("no_route");
    assert!(
        n.send(
            WIRE,
            tcp(ROUTER, UPLINK, "10.1.0.4", 8000, "10.1.0.20", 44000, 0x12)
        )
        .is_empty()
    );
    assert_eq!(n.dropped("no_route"), before + 1);
    assert_eq!(
        n.send(
            CLIENT,
            tcp(mac(1), GW, "10.1.0.20", 44000, "10.1.0.4", 8000, 0x10)
        ),
        [SERVER]
    );
    assert_eq!(
        n.send(
            SERVER,
            tcp(mac(4), GW, "10.1.0.4", 8000, "10.1.0.20", 44000, 0x12)
        ),
        [CLIENT]
    );
    // Uninvited traffic from the wire to a VM goes nowhere.
    assert!(
        n.send(
            WIRE,
            tcp(ROUTER, UPLINK, "203.0.113.9", 443, "10.1.0.20", 45000, 0x02)
        )
        .is_empty()
    );
    // The other tenant's VM (same address) opens the same tuple out of the
    // uplink: now two vnets track it, and the reply goes to neither.
    assert_eq!(
        n.send(
            OTHER,
            tcp(mac(1), GW_B, "10.1.0.20", 43000, "203.0.113.9", 443, 0x10)
        ),
        [WIRE]
    );
    n.new_generation(false);
    assert!(
        n.send(
            WIRE,
            tcp(ROUTER, UPLINK, "203.0.113.9", 443, "10.1.0.20", 43000, 0x10)
        )
        .is_empty()
    );
}

/// An IPv4 fragment: `payload` at `offset` (8-byte units) of datagram `id`.
fn fragment(src: &str, dst: &str, id: u16, offset: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW.0);
    f.extend_from_slice(&mac(1).0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + payload.len()) as u16;
    let flags = offset | if more { 0x2000 } else { 0 };
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&flags.to_be_bytes());
    ip.extend_from_slice(&[64, 17, 0, 0]);
    ip.extend_from_slice(&v4(src).octets());
    ip.extend_from_slice(&v4(dst).octets());
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(payload);
    f
}

/// The IPv4 header checksum of `h` (with its checksum field as it is: 0
/// to compute it, the stored value to check it, which then gives 0).
fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 2 968-byte UDP datagram from the client's port `sport` to the DNS
/// VIP, in three fragments (1 480 + 1 480 + 16 bytes of IP payload), as
/// (offset in 8-byte units, payload).
fn dns_datagram(sport: u16) -> [(u16, Vec<u8>); 3] {
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&2968u16.to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum
    udp.extend((0..2960).map(|i| (i % 251) as u8));
    [
        (0u16, udp[..1480].to_vec()),
        (185, udp[1480..2960].to_vec()),
        (370, udp[2960..].to_vec()),
    ]
}

/// Checks that `f` is fragment `(offset, data)` of datagram `id` (of
/// [`dns_datagram`] from `sport`) as sent on to the backend: DNATed, TTL
/// down by one, header checksum right, fragment fields and payload
/// untouched.
fn check_sent_on(f: &[u8], id: u16, (offset, data): (u16, &[u8])) {
    let ip = &f[14..34];
    assert_eq!(&ip[16..20], &[10, 1, 0, 4], "fragment at {offset}");
    assert_eq!(ip[8], 63);
    assert_eq!(ipv4_checksum(ip), 0, "fragment at {offset}");
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), id);
    assert_eq!(u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff, offset);
    if offset == 0 {
        // The first carries the UDP header: its port is the backend's.
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 5353);
        assert_eq!(&f[42..], &data[8..]);
    } else {
        assert_eq!(&f[34..], data, "fragment at {offset}");
    }
}

#[test]
fn later_fragments_follow_their_first_through_a_vip() {
    let mut n = Net::new(false);
    let parts = dns_datagram(41000);
    for (i, (offset, data)) in parts.iter().enumerate() {
        let more = i < 2;
        let out = n.send_frames(
            CLIENT,
            fragment("10.1.0.20", "10.1.0.101", 7, *offset, more, data),
        );
        assert_eq!(out.len(), 1, "fragment {i}");
        let (port, f) = &out[0];
        assert_eq!(*port, SERVER, "fragment {i}");
        check_sent_on(f, 7, (*offset, data));
    }
    assert_eq!(n.dropped("frag_no_first"), 0);
    // The backend's answer, fragmented too, comes back from the VIP.
    let mut reply = Vec::new();
    reply.extend_from_slice(&5353u16.to_be_bytes());
    reply.extend_from_slice(&41000u16.to_be_bytes());
    reply.extend_from_slice(&2008u16.to_be_bytes());
    reply.extend_from_slice(&[0, 0]);
    reply.extend(std::iter::repeat_n(0x55, 2000));
    let mut back = |offset: u16, more: bool, data: &[u8]| {
        let mut f = fragment("10.1.0.4", "10.1.0.20", 9, offset, more, data);
        f[6..12].copy_from_slice(&mac(4).0);
        n.send_frames(SERVER, f)
    };
    let first = back(0, true, &reply[..1480]);
    let last = back(185, false, &reply[1480..]);
    for (i, out) in [first, last].iter().enumerate() {
        assert_eq!(out.len(), 1, "reply fragment {i}");
        assert_eq!(out[0].0, CLIENT);
        let ip = &out[0].1[14..34];
        assert_eq!(
            &ip[12..16],
            &[10, 1, 0, 101],
            "reply fragment {i} from the VIP"
        );
        assert_eq!(ipv4_checksum(ip), 0);
    }
}

/// Sends fragment `(offset, data)` of datagram `id` from the client to the
/// DNS VIP; returns what left the switch.
fn send_fragment(
    n: &mut Net,
    id: u16,
    (offset, data): (u16, &[u8]),
    more: bool,
) -> Vec<(usize, Vec<u8>)> {
    n.send_frames(
        CLIENT,
        fragment("10.1.0.20", "10.1.0.101", id, offset, more, data),
    )
}

/// A switch whose hold has room for three fragments, each for `hold`.
fn holding(hold: Duration) -> Net {
    Net::with_config(
        false,
        SwitchConfig {
            frag_hold: 3,
            frag_hold_time: hold,
            ..Net::config()
        },
    )
}

/// Later fragments that come before their first wait for it and follow
/// it at once, in the order they came, ahead of the flow's next packet;
/// a full hold drops at once.
#[test]
fn later_fragments_before_their_first_wait_for_it() {
    // (A hold long enough that nothing expires during the test.)
    let mut n = holding(Duration::from_secs(600));
    // Datagram 8 sent last-first: its later fragments wait.
    let parts = dns_datagram(42000);
    let at = |i: usize| (parts[i].0, &parts[i].1[..]);
    assert!(send_fragment(&mut n, 8, at(2), false).is_empty());
    assert!(send_fragment(&mut n, 8, at(1), true).is_empty());
    assert_eq!(n.stats.frags_waiting.load(Ordering::Relaxed), 2);
    // Its first, then the flow's next datagram (unfragmented), in one
    // burst: the first, the held fragments, then the next datagram.
    let mut next = Vec::new();
    next.extend_from_slice(&42000u16.to_be_bytes());
    next.extend_from_slice(&53u16.to_be_bytes());
    next.extend_from_slice(&16u16.to_be_bytes());
    next.extend_from_slice(&[0, 0]);
    next.extend_from_slice(&[0x77; 8]);
    let mut b = Batch::new();
    for f in [
        fragment("10.1.0.20", "10.1.0.101", 8, 0, true, &parts[0].1),
        fragment("10.1.0.20", "10.1.0.101", 20, 0, false, &next),
    ] {
        b.push(n.pool.alloc_copy(&f).unwrap()).unwrap();
    }
    n.ends[CLIENT].tx_burst(&mut b);
    n.worker.poll_once();
    let mut rx = Batch::new();
    n.ends[SERVER].rx_burst(&mut rx);
    let out: Vec<Vec<u8>> = rx.drain().map(|p| p.data().to_vec()).collect();
    assert_eq!(out.len(), 4, "{out:?}");
    for (f, i) in out.iter().zip([0, 2, 1]) {
        check_sent_on(f, 8, at(i));
    }
    assert_eq!(
        u16::from_be_bytes([out[3][18], out[3][19]]),
        20,
        "the next datagram last"
    );
    assert_eq!(n.stats.frags_waiting.load(Ordering::Relaxed), 0);
    // Three later fragments of datagrams whose first does not come fill
    // the hold; a fourth is dropped at once.
    let lost = dns_datagram(43000);
    for id in [9, 10, 11] {
        assert!(send_fragment(&mut n, id, (lost[1].0, &lost[1].1), true).is_empty());
    }
    assert_eq!(n.dropped("frag_no_first"), 0, "held, not dropped");
    assert!(send_fragment(&mut n, 12, (lost[1].0, &lost[1].1), true).is_empty());
    assert_eq!(n.dropped("frag_no_first"), 1, "the hold is full");
    assert_eq!(n.stats.frags_waiting.load(Ordering::Relaxed), 3);
    // The counter of held fragments is published with the others (every
    // 100 ms, also while the worker has nothing to do).
    let deadline = Instant::now() + Duration::from_secs(20);
    while n.stats.frags_held.load(Ordering::Relaxed) < 5 {
        assert!(Instant::now() < deadline, "frags_held not published");
        n.worker.poll_once();
        std::thread::yield_now();
    }
    assert_eq!(
        n.stats.frags_held.load(Ordering::Relaxed),
        5,
        "datagram 8's two, and 9, 10, 11"
    );
}

/// Arms `live` for the client's next packet that `filter` selects.
fn arm(live: &vswitch::switch::LiveTrace, filter: &str) {
    let spec = dataplane::capture::Spec {
        port: Some(CLIENT as u16),
        filter: filter.parse().unwrap(),
        snaplen: 2048,
    };
    live.arm(spec, 1, u64::MAX);
}

/// A live trace shows a later fragment that came before its first as
/// held.
#[test]
fn a_live_trace_shows_a_held_fragment() {
    let live = vswitch::switch::LiveTrace::new(8);
    let cfg = SwitchConfig {
        frag_hold: 3,
        frag_hold_time: Duration::from_secs(600),
        ..Net::config()
    };
    let mut n = Net::traced(false, cfg, Some(live.clone()));
    arm(&live, "udp");
    let parts = dns_datagram(44000);
    assert!(send_fragment(&mut n, 13, (parts[1].0, &parts[1].1), true).is_empty());
    let mut got = Vec::new();
    live.take(&mut got);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].end, Some(vswitch::switch::LiveEnd::Held), "{got:?}");
    assert!(got[0].steps.iter().any(|s| s.layer == "frag"), "{got:?}");
    // A traced first fragment's record is its own, not that of the held
    // fragments it releases (which go through untraced): here a TCP SYN
    // with data to the server's port 9000, which its group denies, so
    // that each fragment takes the slow path and is denied.
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&45000u16.to_be_bytes());
    tcp.extend_from_slice(&9000u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend(std::iter::repeat_n(0x42, 1500));
    let to_server = |offset: u16, more: bool, data: &[u8]| {
        let mut f = fragment("10.1.0.20", "10.1.0.4", 14, offset, more, data);
        // (TCP, with the header checksum again.)
        f[23] = 6;
        f[24..26].copy_from_slice(&[0, 0]);
        let c = ipv4_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    assert!(
        n.send(CLIENT, to_server(185, false, &tcp[1480..]))
            .is_empty()
    );
    arm(&live, "tcp");
    assert!(n.send(CLIENT, to_server(0, true, &tcp[..1480])).is_empty());
    assert_eq!(n.dropped("acl_deny"), 2, "both fragments denied");
    let mut got = Vec::new();
    live.take(&mut got);
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(
        r.end,
        Some(vswitch::switch::LiveEnd::Drop(
            vswitch::switch::SwitchDrop::AclDeny
        )),
        "{r:?}"
    );
    let ports = r.steps.iter().filter(|s| s.layer == "port").count();
    assert_eq!(ports, 1, "one packet's steps: {:?}", r.steps);
}

/// A held fragment whose first does not come within the hold time is
/// dropped and counted (the worker's periodic step sees to it, also while
/// it has nothing else to do); its first, coming later, goes on alone.
#[test]
fn a_held_fragment_whose_first_does_not_come_is_dropped() {
    let mut n = holding(Duration::from_millis(1));
    let lost = dns_datagram(43000);
    assert!(send_fragment(&mut n, 9, (lost[1].0, &lost[1].1), true).is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    while n.dropped("frag_no_first") < 1 {
        assert!(Instant::now() < deadline, "the held fragment never dropped");
        n.worker.poll_once();
        std::thread::yield_now();
    }
    assert_eq!(n.stats.frags_waiting.load(Ordering::Relaxed), 0);
    let out = send_fragment(&mut n, 9, (lost[0].0, &lost[0].1), true);
    assert_eq!(out.len(), 1, "{out:?}");
    check_sent_on(&out[0].1, 9, (lost[0].0, &lost[0].1));
}

#[test]
fn a_packet_whose_ttl_runs_out_is_answered_from_the_gateway_within_a_rate() {
    let mut n = Net::new(false);
    let expiring = |sport: u16| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(mac(1).0, GW.0)
            .ipv4(v4("10.1.0.20").octets(), v4("10.1.0.4").octets(), 1)
            .udp(sport, 33434)
            .write(&mut v, &[0x61; 12])
            .unwrap();
        v
    };
    let sent = expiring(50000);
    let out = n.send_frames(CLIENT, sent.clone());
    assert_eq!(out.len(), 1);
    let (port, f) = &out[0];
    assert_eq!(*port, CLIENT, "back to the sender");
    // From the gateway to the client, ICMP time exceeded quoting the IP
    // header and the first 8 bytes after it, checksums right.
    assert_eq!(&f[0..6], &mac(1).0);
    assert_eq!(&f[6..12], &GW.0);
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[14..]).unwrap();
    assert_eq!(ip.source_addr(), v4("10.1.0.1"));
    assert_eq!(ip.destination_addr(), v4("10.1.0.20"));
    assert_eq!(ip.protocol(), etherparse::IpNumber::ICMP);
    assert_eq!(ipv4_checksum(&f[14..34]), 0);
    let icmp = &f[34..];
    assert_eq!((icmp[0], icmp[1]), (11, 0));
    assert_eq!(ipv4_checksum(icmp), 0, "ICMP checksum");
    assert_eq!(&icmp[8..], &sent[14..14 + 28], "the quote");
    assert_eq!(n.stats.icmp_errors.load(Ordering::Relaxed), 1);
    // A burst of 300 more in a few milliseconds: the bucket holds 50 (one
    // already spent) and refills at one a millisecond, so most are dropped
    // and counted (however slowly this machine sends them, far fewer than
    // 300 are answered).
    let mut answered = 0;
    for i in 0..300 {
        answered += n.send_frames(CLIENT, expiring(50001 + i)).len();
    }
    assert!((49..250).contains(&answered), "{answered} answered");
    assert_eq!(n.dropped("ttl_expired"), 300 - answered as u64);
    // No error about a packet to a multicast group (RFC 1122).
    let before = n.stats.icmp_errors.load(Ordering::Relaxed);
    let mut mcast = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(1).0, GW.0)
        .ipv4(v4("10.1.0.20").octets(), [224, 0, 0, 252], 1)
        .udp(5355, 5355)
        .write(&mut mcast, &[0x61; 12])
        .unwrap();
    assert!(n.send(CLIENT, mcast).is_empty());
    assert_eq!(n.stats.icmp_errors.load(Ordering::Relaxed), before);
}

#[test]
fn an_icmp_error_about_a_vip_connection_reaches_the_client_translated() {
    let mut n = Net::new(false);
    let udp = |src: &str, sport: u16, dst: &str, dport: u16, ttl: u8| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(v4(src).octets(), v4(dst).octets(), ttl)
            .udp(sport, dport)
            .write(&mut v, &[0x61; 16])
            .unwrap();
        v
    };
    let error_from_server = |quoted: &[u8]| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(mac(4).0, GW.0)
            .ipv4(v4("10.1.0.4").octets(), v4("10.1.0.20").octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut v, quoted)
            .unwrap();
        v
    };
    // The client's datagram to the DNS VIP reaches the server DNATed.
    let mut first = GW.0.to_vec();
    first.extend_from_slice(&mac(1).0);
    first.extend_from_slice(&[0x08, 0x00]);
    first.extend_from_slice(&udp("10.1.0.20", 41000, "10.1.0.101", 53, 64));
    assert_eq!(n.send(CLIENT, first), [SERVER]);
    // The server's port is closed: its kernel quotes the datagram as it
    // got it (to 10.1.0.4:5353). The client gets the error as from the
    // VIP, quoting what it sent (to the VIP, port 53).
    let out = n.send_frames(
        SERVER,
        error_from_server(&udp("10.1.0.20", 41000, "10.1.0.4", 5353, 63)),
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, CLIENT);
    let s = etherparse::SlicedPacket::from_ethernet(&out[0].1).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
        panic!()
    };
    assert_eq!(ip.header().source_addr(), v4("10.1.0.101"));
    assert_eq!(ip.header().destination_addr(), v4("10.1.0.20"));
    assert_eq!(ipv4_checksum(ip.header().slice()), 0);
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &s.transport else {
        panic!()
    };
    assert_eq!(
        icmp.icmp_type().calc_checksum(icmp.payload()),
        icmp.checksum()
    );
    let quoted = icmp.payload();
    assert_eq!(&quoted[16..20], &[10, 1, 0, 101]);
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 53);
    assert_eq!(
        ipv4_checksum(&quoted[..20]),
        0,
        "the quoted header's checksum"
    );
    assert_eq!(n.stats.icmp_related.load(Ordering::Relaxed), 1);
    // An error about nothing the switch tracks goes nowhere, counted.
    assert!(
        n.send(
            SERVER,
            error_from_server(&udp("10.1.0.20", 1, "10.1.0.4", 2, 63))
        )
        .is_empty()
    );
    assert_eq!(n.dropped("icmp_unrelated"), 1);
}

#[test]
fn a_packet_too_big_for_its_port_is_answered_with_the_mtu_when_it_may_not_be_fragmented() {
    // The server's port takes IP packets of 1 400 bytes at most.
    let mut n = Net::with_mtu(false, vec![1500, 1400, 1500, 1500, 1500]);
    // 1 500 bytes of IP (etherparse sets "don't fragment"; cleared here
    // on demand, the header checksum made right again).
    let big = |df: bool, sport: u16| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(mac(1).0, GW.0)
            .ipv4(v4("10.1.0.20").octets(), v4("10.1.0.4").octets(), 64)
            .udp(sport, 7000)
            .write(&mut v, &[0x61; 1472])
            .unwrap();
        if !df {
            v[20] &= !0x40;
            v[24..26].copy_from_slice(&[0, 0]);
            let c = ipv4_checksum(&v[14..34]);
            v[24..26].copy_from_slice(&c.to_be_bytes());
        }
        v
    };
    // 1 500 bytes with "don't fragment": fragmentation needed, MTU 1 400.
    let sent = big(true, 46000);
    let out = n.send_frames(CLIENT, sent.clone());
    assert_eq!(out.len(), 1);
    let (port, f) = &out[0];
    assert_eq!(*port, CLIENT);
    assert_eq!(&f[26..30], &[10, 1, 0, 1], "from the gateway");
    let icmp = &f[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400);
    assert_eq!(ipv4_checksum(icmp), 0);
    assert_eq!(&icmp[8..], &sent[14..42], "the quote");
    // 1 400 bytes pass.
    let mut fits = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(1).0, GW.0)
        .ipv4(v4("10.1.0.20").octets(), v4("10.1.0.4").octets(), 64)
        .udp(46001, 7000)
        .write(&mut fits, &[0x61; 1372])
        .unwrap();
    assert_eq!(n.send(CLIENT, fits), [SERVER]);
    // Without "don't fragment" it is dropped (the switch does not
    // fragment), and counted.
    assert!(n.send(CLIENT, big(false, 46002)).is_empty());
    assert_eq!(n.dropped("too_big"), 1);
}

#[test]
fn ipv6_hop_limit_and_port_mtu_are_answered_with_icmpv6_from_the_gateway() {
    let mut n = Net::with_mtu(false, vec![1500, 1400, 1500, 1500, 1500]);
    let client: [u8; 16] = "fd00:1::20".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let server: [u8; 16] = "fd00:1::4".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let gateway: [u8; 16] = "fd00:1::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let udp6 = |hops: u8, sport: u16, payload: usize| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(mac(1).0, GW.0)
            .ipv6(client, server, hops)
            .udp(sport, 7000)
            .write(&mut v, &vec![0x61; payload])
            .unwrap();
        v
    };
    // Checks an ICMPv6 error from the gateway to the client: returns its
    // type, its 4 bytes after the checksum and its quote.
    let error = |f: &[u8]| {
        assert_eq!(&f[0..6], &mac(1).0);
        assert_eq!(&f[6..12], &GW.0);
        let s = etherparse::SlicedPacket::from_ethernet(f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &s.net else {
            panic!("not ipv6: {f:?}")
        };
        assert_eq!(ip.header().source(), gateway);
        assert_eq!(ip.header().destination(), client);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!("not icmpv6")
        };
        let want = icmp
            .icmp_type()
            .calc_checksum(gateway, client, icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want, "ICMPv6 checksum");
        let raw = icmp.slice();
        (raw[0], raw[4..8].to_vec(), icmp.payload().to_vec())
    };
    // Hop limit 1: time exceeded (type 3), quoting the whole packet.
    let sent = udp6(1, 50000, 12);
    let out = n.send_frames(CLIENT, sent.clone());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, CLIENT);
    let (kind, _, quote) = error(&out[0].1);
    assert_eq!(kind, 3);
    assert_eq!(quote, &sent[14..]);
    // 1 500 bytes of IP to a port of 1 400: packet too big (type 2) with
    // the MTU, quoting what fits in 1 280 bytes.
    let sent = udp6(64, 50001, 1452);
    let out = n.send_frames(CLIENT, sent.clone());
    assert_eq!(out.len(), 1);
    let (kind, mtu, quote) = error(&out[0].1);
    assert_eq!(kind, 2);
    assert_eq!(mtu, 1400u32.to_be_bytes());
    assert_eq!(out[0].1.len(), 14 + 1280);
    assert_eq!(quote, &sent[14..14 + 1232]);
    // 1 400 bytes pass.
    assert_eq!(n.send(CLIENT, udp6(64, 50002, 1352)), [SERVER]);
    assert_eq!(n.stats.icmp_errors.load(Ordering::Relaxed), 2);
    // No error about an ICMPv6 error (RFC 4443 2.4): the server's port
    // unreachable about the client's datagram goes back to the client (it
    // belongs to the client's connection), but with its hop limit run out
    // it is dropped, not answered.
    let dgram = udp6(64, 50003, 12);
    assert_eq!(n.send(CLIENT, dgram.clone()), [SERVER]);
    let unreachable = |hops: u8| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(mac(4).0, GW.0)
            .ipv6(server, client, hops)
            .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                etherparse::icmpv6::DestUnreachableCode::Port,
            ))
            .write(&mut v, &dgram[14..])
            .unwrap();
        v
    };
    assert_eq!(n.send(SERVER, unreachable(64)), [CLIENT]);
    let expired = n.dropped("ttl_expired");
    assert!(n.send(SERVER, unreachable(1)).is_empty());
    assert_eq!(n.dropped("ttl_expired"), expired + 1);
    assert_eq!(n.stats.icmp_errors.load(Ordering::Relaxed), 2);
}

#[test]
fn a_forged_icmp_error_reaches_no_one_but_the_quoted_packets_sender() {
    let mut n = Net::new(false);
    let udp = |src: &str, sport: u16, dst: &str, dport: u16| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(v4(src).octets(), v4(dst).octets(), 60)
            .udp(sport, dport)
            .write(&mut v, &[0x61; 8])
            .unwrap();
        v
    };
    let error = |from_mac: MacAddr, to_mac: MacAddr, src: &str, dst: &str, quoted: &[u8]| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(from_mac.0, to_mac.0)
            .ipv4(v4(src).octets(), v4(dst).octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut v, quoted)
            .unwrap();
        v
    };
    // The client's datagram out of the uplink (a plain connection).
    let mut out = GW.0.to_vec();
    out.extend_from_slice(&mac(1).0);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&udp("10.1.0.20", 47000, "203.0.113.9", 53));
    assert_eq!(n.send(CLIENT, out), [WIRE]);
    // From the wire: an error about it, to the client, passes; the same
    // quote aimed at the server goes nowhere.
    let quoted = udp("10.1.0.20", 47000, "203.0.113.9", 53);
    assert_eq!(
        n.send(
            WIRE,
            error(ROUTER, UPLINK, "198.51.100.1", "10.1.0.20", &quoted)
        ),
        [CLIENT]
    );
    assert!(
        n.send(
            WIRE,
            error(ROUTER, UPLINK, "198.51.100.1", "10.1.0.4", &quoted)
        )
        .is_empty()
    );
    // From the client: an error about what it received from the wire host
    // goes to that host, and to no one else (not past the groups to the
    // server); and it may not speak of packets that were not sent to it.
    let reply = udp("203.0.113.9", 53, "10.1.0.20", 47000);
    assert_eq!(
        n.send(
            CLIENT,
            error(mac(1), GW, "10.1.0.20", "203.0.113.9", &reply)
        ),
        [WIRE]
    );
    assert!(
        n.send(CLIENT, error(mac(1), GW, "10.1.0.20", "10.1.0.4", &reply))
            .is_empty()
    );
    let not_mine = udp("203.0.113.9", 53, "10.1.0.4", 47000);
    assert!(
        n.send(
            CLIENT,
            error(mac(1), GW, "10.1.0.20", "203.0.113.9", &not_mine)
        )
        .is_empty()
    );
    assert_eq!(n.dropped("icmp_unrelated"), 3);
}
