//! The switch with VMs: smoltcp stacks on ring ports, a worker thread running
//! the vswitch pipeline between them. HTTP through a VIP, ACLs, isolation,
//! anti-spoofing, policy updates under open connections, malformed traffic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use arc_swap::ArcSwap;
use common::{Running, Vm, pool, run_until, vm_port};
use dataplane::pool::{Pool, PoolBuf};
use dataplane::port::ring::RingPort;
use dataplane::worker::{Worker, WorkerStats};
use dataplane::{Batch, MacAddr, Port};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, VipConfig};
use smoltcp::socket::tcp;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vswitch::switch::{LiveEnd, LiveTrace, TraceEnd};
use vswitch::{
    Policy, Switch, SwitchConfig, SwitchDrop, SwitchStats, Topology, VipDef, VmDef, VnetDef,
};

const GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);

fn rule(priority: i64, dir: &str, action: &str, proto: &str, dst_ports: &[&str]) -> RuleSpec {
    RuleSpec {
        name: None,
        priority,
        direction: dir.into(),
        action: action.into(),
        protocol: proto.into(),
        src: vec!["any".into()],
        dst: vec!["any".into()],
        src_ports: vec!["any".into()],
        dst_ports: dst_ports.iter().map(|s| s.to_string()).collect(),
        stateful: None,
    }
}

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

fn topology(weights: [u32; 3]) -> Topology {
    let vnet = |name: &str, g: u8| VnetDef {
        name: name.into(),
        prefixes: vec!["10.1.0.0/16".parse().unwrap()],
        gateway_mac: MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, g]),
        snat: None,
        vni: None,
        encap: Default::default(),
    };
    let vm = |name: &str, port: u16, vnet: usize, m: u8, ip: &str, nsg: Option<usize>| VmDef {
        name: name.into(),
        port,
        vnet,
        mac: mac(m),
        ips: vec![ip.parse().unwrap()],
        nsg,
        internal: false,
    };
    let web = NsgSpec {
        name: "web".into(),
        rules: vec![
            rule(100, "in", "allow", "tcp", &["8080"]),
            rule(110, "in", "deny", "tcp", &["22"]),
        ],
    };
    let client = NsgSpec {
        name: "client".into(),
        rules: vec![rule(100, "out", "deny", "tcp", &["23"])],
    };
    let backends = ["10.1.0.4", "10.1.0.5", "10.1.0.6"]
        .iter()
        .zip(weights)
        .map(|(ip, weight)| Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
            weight,
        })
        .collect();
    Topology {
        vnets: vec![vnet("a", 0xbc), vnet("b", 0xbd)],
        vms: vec![
            vm("web1", 0, 0, 1, "10.1.0.4", Some(0)),
            vm("web2", 1, 0, 2, "10.1.0.5", Some(0)),
            vm("web3", 2, 0, 3, "10.1.0.6", Some(0)),
            vm("client", 3, 0, 0x10, "10.1.0.20", Some(1)),
            vm("other", 4, 1, 0x20, "10.1.0.20", None),
        ],
        nsgs: vec![web, client],
        vips: vec![VipDef {
            vnet: 0,
            config: VipConfig::new("web", IpAddr::V4(VIP), 80, 6, backends),
            health: vec![],
        }],
        ports: 6,
        uplink: None,
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

struct Net {
    vms: Vec<Vm>,
    /// The VM end of port #5, which has no VM (for "no VM" drops).
    raw: RingPort<PoolBuf>,
    acl_hits: Arc<ArcSwap<Vec<vswitch::switch::AclHits>>>,
    policy: Arc<ArcSwap<Policy>>,
    stats: Arc<SwitchStats>,
    worker: Arc<WorkerStats>,
    live: Arc<LiveTrace>,
    /// Off until a test turns it on.
    flow_log: Arc<vswitch::flowlog::FlowLog>,
    _worker: Running,
    pool: Pool,
}

impl Net {
    fn new(name: &str) -> Net {
        Net::with(name, SwitchConfig::default())
    }

    fn with(name: &str, cfg: SwitchConfig) -> Net {
        let pool = pool(name);
        let start = Instant::now();
        let names = [
            ("web1", 1u8, "10.1.0.4", true),
            ("web2", 2, "10.1.0.5", true),
            ("web3", 3, "10.1.0.6", true),
            ("client", 0x10, "10.1.0.20", false),
            ("other", 0x20, "10.1.0.20", false),
        ];
        let mut vms = Vec::new();
        let mut sw_ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
        for (n, m, ip, server) in names {
            let (vm_end, sw_end) = vm_port(n, mac(m));
            vms.push(
                Vm::new(
                    n,
                    vm_end,
                    pool,
                    ip.parse().unwrap(),
                    GW,
                    server.then_some(8080),
                    start,
                )
                .unwrap(),
            );
            sw_ports.push(Box::new(sw_end));
        }
        let (raw, sw_raw) = vm_port("raw", mac(0x30));
        sw_ports.push(Box::new(sw_raw));
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology([1, 1, 1]), 1).unwrap(),
        ));
        let live = LiveTrace::new(64);
        let flow_log = vswitch::flowlog::FlowLog::new(256);
        let sw = Switch::new(policy.clone(), cfg)
            .with_live_trace(0, live.clone())
            .with_flow_log(flow_log.clone());
        let stats = sw.stats();
        let acl_hits = sw.acl_hits();
        let worker = Worker::new(name, None, sw_ports, sw);
        let wstats = worker.stats();
        Net {
            vms,
            raw,
            acl_hits,
            policy,
            stats,
            worker: wstats,
            live,
            flow_log,
            _worker: Running::spawn(worker),
            pool,
        }
    }

    fn vm(&mut self, name: &str) -> &mut Vm {
        self.vms.iter_mut().find(|v| v.name == name).unwrap()
    }

    fn run(&mut self, limit: Duration, done: impl FnMut(&[&mut Vm]) -> bool) -> bool {
        let mut refs: Vec<&mut Vm> = self.vms.iter_mut().collect();
        run_until(&mut refs, limit, done)
    }
}

#[test]
fn http_through_the_vip_spreads_over_the_dips() {
    let mut net = Net::new("sw-http");
    let gets: Vec<usize> = (0..24)
        .map(|_| net.vm("client").get(VIP, 80, "/"))
        .collect();
    let c = 3;
    assert!(
        net.run(Duration::from_secs(20), |vms| gets
            .iter()
            .all(|&g| vms[c].body(g).is_some())),
        "responses did not all arrive"
    );
    let bodies: Vec<String> = gets.iter().map(|&g| net.vms[c].body(g).unwrap()).collect();
    let distinct: HashSet<&str> = bodies.iter().map(|s| s.as_str()).collect();
    assert!(
        distinct
            .iter()
            .all(|b| ["web1", "web2", "web3"].contains(b)),
        "{bodies:?}"
    );
    assert!(
        distinct.len() >= 2,
        "24 connections all went to one DIP: {bodies:?}"
    );
    assert_eq!(
        net.vms[0].served + net.vms[1].served + net.vms[2].served,
        24
    );
    // Direct routing inside the vnet works too (port 8080 is allowed in).
    let g = net.vm("client").get(Ipv4Addr::new(10, 1, 0, 5), 8080, "/");
    assert!(net.run(Duration::from_secs(10), |vms| vms[c].body(g).is_some()));
    assert_eq!(net.vms[c].body(g).unwrap(), "web2");
    assert!(net.stats.fast_path.load(Ordering::Relaxed) > 0);
    assert!(net.stats.arp_replies.load(Ordering::Relaxed) > 0);
    assert_eq!(net.stats.nonzero(), vec![], "no drops expected");
}

#[test]
fn acls_deny_and_count_and_stateful_replies_pass() {
    let mut net = Net::new("sw-acl");
    let c = 3;
    // web's group denies tcp/22 in; client's denies tcp/23 out.
    let ssh = net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 22);
    let telnet = net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 23);
    // Port 80 on web1 is allowed by the vnet default (nothing listens: RST).
    let closed = net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 80);
    net.run(Duration::from_secs(2), |_| false);
    assert_eq!(net.vms[c].state(ssh), tcp::State::SynSent);
    assert_eq!(net.vms[c].state(telnet), tcp::State::SynSent);
    assert_eq!(
        net.vms[c].state(closed),
        tcp::State::Closed,
        "the RST came back through the stateful return path"
    );
    assert!(
        net.stats.dropped(SwitchDrop::AclDeny) >= 2,
        "{:?}",
        net.stats.nonzero()
    );
    // The deny rules' own hit counters say which rules fired.
    let p = net.policy.load();
    let web = p.vms[0].nsg.unwrap();
    let rules = p.nsgs[web].inbound.rules();
    let deny22 = rules.iter().position(|r| r.priority == 110).unwrap();
    assert!(net.acl_hits.load()[web][0].get(deny22) >= 1);
    let client = p.vms[3].nsg.unwrap();
    let deny23 = p.nsgs[client]
        .outbound
        .rules()
        .iter()
        .position(|r| r.priority == 100)
        .unwrap();
    assert!(net.acl_hits.load()[client][1].get(deny23) >= 1);
    // A new generation with the same groups (the control API keeps their
    // compilation when they do not change): the rule counters carry on
    // instead of starting over.
    let before = net.acl_hits.load()[web][0].get(deny22);
    let mut p2 = Policy::compile(&topology([1, 1, 2]), 2).unwrap();
    p2.nsgs = p.nsgs.clone();
    net.policy.store(Arc::new(p2));
    let again = net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 22);
    net.run(Duration::from_secs(1), |_| false);
    assert_eq!(net.vms[c].state(again), tcp::State::SynSent);
    assert!(net.acl_hits.load()[web][0].get(deny22) > before);
    // A recompiled group that now denies port 80: the next connection
    // there, which differs from the one allowed above only in its client
    // port (bits no rule reads, so the verdict cache's entry), is refused.
    let denied = net.stats.dropped(SwitchDrop::AclDeny);
    let mut t = topology([1, 1, 2]);
    t.nsgs[0]
        .rules
        .push(rule(105, "in", "deny", "tcp", &["80"]));
    net.policy.store(Arc::new(Policy::compile(&t, 3).unwrap()));
    let refused = net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 80);
    net.run(Duration::from_secs(1), |_| false);
    assert_eq!(net.vms[c].state(refused), tcp::State::SynSent);
    assert!(
        net.stats.dropped(SwitchDrop::AclDeny) > denied,
        "{:?}",
        net.stats.nonzero()
    );
}

#[test]
fn another_vnet_reaches_nothing() {
    let mut net = Net::new("sw-iso");
    let o = 4;
    let to_vip = net.vm("other").get(VIP, 80, "/");
    let to_vm = net.vm("other").get(Ipv4Addr::new(10, 1, 0, 4), 8080, "/");
    net.run(Duration::from_secs(2), |_| false);
    assert_eq!(net.vms[o].state(to_vip), tcp::State::SynSent);
    assert_eq!(net.vms[o].state(to_vm), tcp::State::SynSent);
    assert!(
        net.stats.dropped(SwitchDrop::NoRoute) >= 2,
        "{:?}",
        net.stats.nonzero()
    );
    assert_eq!(net.vms[0].served + net.vms[1].served + net.vms[2].served, 0);
}

fn udp_from(src_mac: MacAddr, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac.0, [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv4(src, dst, 64)
        .udp(1000, 2000)
        .write(&mut f, b"spoof")
        .unwrap();
    f
}

#[test]
fn spoofed_and_malformed_traffic_is_dropped_and_counted() {
    let mut net = Net::new("sw-spoof");
    // The raw port (#5) has no VM: everything on it is dropped as no_vm.
    let frames = [udp_from(mac(0x30), [10, 1, 0, 30], [10, 1, 0, 4])];
    let mut b = Batch::new();
    for f in &frames {
        b.push(net.pool.alloc_copy(f).unwrap()).unwrap();
    }
    net.raw.tx_burst(&mut b);
    // Spoofing from the client's own port: a foreign source IP, then a
    // foreign source MAC (beside the client's stack).
    let spoofed = vec![
        udp_from(mac(0x10), [10, 1, 0, 4], [10, 1, 0, 5]),
        udp_from(mac(0x99), [10, 1, 0, 20], [10, 1, 0, 5]),
    ];
    // A trace of each says so first, and changes nothing.
    let mut scratch: Switch = Switch::scratch(net.policy.clone(), &SwitchConfig::default());
    for f in &spoofed {
        let t = scratch.trace(net.pool.alloc_copy(f).unwrap(), 3);
        assert_eq!(t.end, TraceEnd::Drop(SwitchDrop::Spoofed), "{t:?}");
        assert!(t.steps.iter().any(|s| s.layer == "spoof"), "{t:?}");
    }
    net.vm("client").inject(&spoofed);
    // The client's own address in IPv6's IPv4-mapped form: a flow key
    // could not tell it from IPv4, so the parser drops it.
    let mut mapped = Vec::new();
    let v6 = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets();
    etherparse::PacketBuilder::ethernet2(mac(0x10).0, [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv6(v6([10, 1, 0, 20]), v6([10, 1, 0, 5]), 64)
        .udp(1000, 2000)
        .write(&mut mapped, b"mapped")
        .unwrap();
    net.vm("client").inject(&[mapped]);
    let mut storm = Batch::new();
    let mut seed = 0x1234_5678u64;
    for _ in 0..32 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 200) as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
        storm.push(net.pool.alloc_copy(&bytes).unwrap()).unwrap();
    }
    net.raw.tx_burst(&mut storm);
    // Good traffic is not disturbed meanwhile.
    let g = net.vm("client").get(VIP, 80, "/");
    assert!(net.run(Duration::from_secs(10), |vms| vms[3].body(g).is_some()));
    net.run(Duration::from_millis(200), |_| false);
    let malformed: u64 = net.worker.drops.total();
    let no_vm = net.stats.dropped(SwitchDrop::NoVm);
    assert_eq!(
        malformed + no_vm,
        34,
        "malformed {malformed}, no_vm {no_vm}"
    );
    assert!(no_vm >= 1);
    assert_eq!(
        net.worker
            .drops
            .get(dataplane::stats::DropReason::Malformed(
                dataplane::wire::ParseError::Ipv6V4Mapped
            )),
        1
    );
    assert_eq!(
        net.stats.dropped(SwitchDrop::Spoofed),
        2,
        "{:?}",
        net.stats.nonzero()
    );
}

#[test]
fn established_connections_survive_policy_updates_and_drains() {
    let mut net = Net::new("sw-update");
    let c = 3;
    // Open 12 connections to the VIP, established but idle.
    let conns: Vec<usize> = (0..12).map(|_| net.vm("client").connect(VIP, 80)).collect();
    assert!(net.run(Duration::from_secs(10), |vms| {
        conns
            .iter()
            .all(|&i| vms[c].state(i) == tcp::State::Established)
    }));
    // New policy: web2 and web3 drained (weight 0), web1 marked unhealthy too
    // in a second step; established connections must keep their DIPs.
    let p2 = Policy::compile(&topology([1, 0, 0]), 2).unwrap();
    net.policy.store(Arc::new(p2));
    let req = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n";
    for &i in &conns {
        assert_eq!(net.vm("client").send(i, req), req.len());
    }
    assert!(
        net.run(Duration::from_secs(10), |vms| conns
            .iter()
            .all(|&i| vms[c].body(i).is_some())),
        "an established connection broke"
    );
    let served: Vec<String> = conns.iter().map(|&i| net.vms[c].body(i).unwrap()).collect();
    assert!(
        served.iter().any(|b| b != "web1"),
        "some connections were on drained DIPs: {served:?}"
    );
    // New connections all go to web1 now.
    let fresh: Vec<usize> = (0..8).map(|_| net.vm("client").get(VIP, 80, "/")).collect();
    let ok = net.run(Duration::from_secs(10), |vms| {
        fresh.iter().all(|&i| vms[c].body(i).is_some())
    });
    assert!(
        ok,
        "drops {:?}, states {:?}, bodies {:?}",
        net.stats.nonzero(),
        fresh
            .iter()
            .map(|&i| net.vms[c].state(i))
            .collect::<Vec<_>>(),
        fresh
            .iter()
            .map(|&i| net.vms[c].body(i))
            .collect::<Vec<_>>()
    );
    assert!(fresh.iter().all(|&i| net.vms[c].body(i).unwrap() == "web1"));
    // web1 goes unhealthy (a probe verdict, in place): no healthy DIP is
    // left, so new connections are dropped and counted, by name.
    let changed = net
        .policy
        .load()
        .set_health(0, (IpAddr::V4(VIP), 80, 6), 0, false)
        .unwrap();
    assert!(changed);
    let late = net.vm("client").get(VIP, 80, "/");
    net.run(Duration::from_secs(1), |_| false);
    assert!(net.vms[c].body(late).is_none());
    assert!(
        net.stats
            .dropped(SwitchDrop::Lb(lb::LbDrop::NoHealthyBackend))
            >= 1,
        "{:?}",
        net.stats.nonzero()
    );
}

fn syn(src_mac: MacAddr, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac.0, [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    f
}

/// The layer notes of `t` for `layer`, joined.
fn notes(t: &vswitch::switch::Trace, layer: &str) -> String {
    t.steps
        .iter()
        .filter(|s| s.layer == layer)
        .map(|s| s.detail.as_str())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[test]
fn a_trace_names_each_layers_decision() {
    let pool = pool("sw-trace");
    let policy = Arc::new(ArcSwap::from_pointee(
        Policy::compile(&topology([1, 1, 1]), 1).unwrap(),
    ));
    let trace = |frame: Vec<u8>, port: u16| {
        // A scratch switch per trace: each is a connection's first packet.
        let mut s: Switch = Switch::scratch(policy.clone(), &SwitchConfig::default());
        s.trace(pool.alloc_copy(&frame).unwrap(), port)
    };
    // To the VIP: Maglev's backend, the rewrite and its port.
    let f = syn(mac(0x10), [10, 1, 0, 20], 40001, VIP.octets(), 80);
    let t = trace(f.clone(), 3);
    let key = dataplane::parse(&f, 3).unwrap().key;
    let p = policy.load();
    let pick = p.vips()[0].pick(&key).unwrap();
    let TraceEnd::Forward { out_port, frame } = &t.end else {
        panic!("{t:?}");
    };
    assert_eq!(usize::from(*out_port), pick, "{t:?}");
    let out = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = out.net else {
        panic!("{t:?}")
    };
    assert_eq!(ip.header().destination(), [10, 1, 0, 4 + pick as u8]);
    assert_eq!(ip.header().ttl(), 63);
    assert_eq!(&frame[..6], &mac(1 + pick as u8).0);
    let lb = notes(&t, "lb");
    assert!(
        lb.contains("a new connection to VIP web 10.1.0.100:80/tcp"),
        "{lb}"
    );
    assert!(
        lb.contains(&format!(
            "-> backend 10.1.0.{}:8080 (VM web{}), healthy",
            4 + pick,
            1 + pick
        )),
        "{lb}"
    );
    assert!(
        notes(&t, "port").contains("from VM client of vnet a"),
        "{t:?}"
    );
    assert!(notes(&t, "spoof").contains("VM client's"), "{t:?}");
    let acl = notes(&t, "acl");
    assert!(acl.contains("group client outbound: rule"), "{acl}");
    assert!(
        acl.contains("group web inbound: rule in-100 (priority 100) matches: allow"),
        "{acl}"
    );
    // Denied by the backend's group, naming the rule.
    let t = trace(syn(mac(0x10), [10, 1, 0, 20], 40002, [10, 1, 0, 4], 22), 3);
    assert_eq!(t.end, TraceEnd::Drop(SwitchDrop::AclDeny), "{t:?}");
    let acl = notes(&t, "acl");
    assert!(
        acl.contains("group web inbound: rule in-110 (priority 110) matches: deny"),
        "{acl}"
    );
    // The other tenant's VM reaches nothing in vnet a.
    let t = trace(
        syn(mac(0x20), [10, 1, 0, 20], 40003, [10, 1, 0, 4], 8080),
        4,
    );
    assert_eq!(t.end, TraceEnd::Drop(SwitchDrop::NoRoute), "{t:?}");
    assert!(
        notes(&t, "route").contains("no VM of vnet b has 10.1.0.4"),
        "{t:?}"
    );
    // A TTL that runs out here: answered with ICMP time exceeded from the
    // vnet's gateway, as a worker answers it.
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(0x10).0, [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv4([10, 1, 0, 20], [10, 1, 0, 4], 1)
        .tcp(40004, 8080, 1000, 64240)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    let t = trace(f, 3);
    let TraceEnd::Back { frame } = &t.end else {
        panic!("{t:?}")
    };
    let icmp = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::TransportSlice::Icmpv4(i)) = icmp.transport else {
        panic!("{t:?}")
    };
    assert_eq!(i.type_u8(), 11, "time exceeded: {t:?}");
    assert!(notes(&t, "output").contains("ICMP error"), "{t:?}");
    // A port without a VM; a frame that does not parse.
    let t = trace(udp_from(mac(0x30), [10, 1, 0, 30], [10, 1, 0, 4]), 5);
    assert_eq!(t.end, TraceEnd::Drop(SwitchDrop::NoVm), "{t:?}");
    let t = trace(vec![0; 10], 3);
    assert!(matches!(t.end, TraceEnd::Malformed(_)), "{t:?}");
    // ARP for the gateway is answered.
    let mut arp = Vec::new();
    etherparse::Ethernet2Header {
        source: mac(0x10).0,
        destination: [0xff; 6],
        ether_type: etherparse::EtherType::ARP,
    }
    .write(&mut arp)
    .unwrap();
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac(0x10).0);
    arp.extend_from_slice(&[10, 1, 0, 20, 0, 0, 0, 0, 0, 0, 10, 1, 0, 1]);
    let t = trace(arp, 3);
    let TraceEnd::Back { frame } = &t.end else {
        panic!("{t:?}")
    };
    assert_eq!(&frame[..6], &mac(0x10).0, "{t:?}");
}

#[test]
fn a_live_trace_follows_the_next_packets_that_match() {
    let mut net = Net::new("sw-live");
    let spec = |filter: &str| dataplane::capture::Spec {
        port: Some(3),
        filter: filter.parse().unwrap(),
        snaplen: 2048,
    };
    // The client's next three packets to the VIP: the SYN through the slow
    // path, the rest hitting the flow it installed.
    net.live.arm(spec("tcp and dst port 80"), 3, u64::MAX);
    let g = net.vm("client").get(VIP, 80, "/");
    assert!(net.run(Duration::from_secs(10), |vms| vms[3].body(g).is_some()));
    assert!(!net.live.trigger.is_armed(), "the count ends it");
    let mut got = Vec::new();
    net.live.take(&mut got);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(net.live.traced(), 3);
    let syn = &got[0];
    assert_eq!(syn.in_port, 3);
    assert!(
        syn.steps
            .iter()
            .any(|s| s.layer == "lb" && s.detail.contains("to VIP web")),
        "{syn:?}"
    );
    let Some(LiveEnd::Out(out)) = syn.end else {
        panic!("{syn:?}")
    };
    assert!(out < 3, "to a backend: {syn:?}");
    for hit in &got[1..] {
        assert!(
            hit.steps
                .iter()
                .any(|s| s.layer == "flow" && s.detail.contains("a cached flow")),
            "{hit:?}"
        );
        assert_eq!(hit.end, Some(LiveEnd::Out(out)), "{hit:?}");
    }
    // A denied connection: its SYN, dropped, with the rule.
    net.live.arm(spec("tcp and dst port 22"), 1, u64::MAX);
    net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 22);
    let live = net.live.clone();
    // (The worker claims the packet, which turns the trace off, before it
    // queues the packet's record: wait for the record.)
    assert!(net.run(Duration::from_secs(5), |_| live.traced() >= 1));
    assert!(!net.live.trigger.is_armed(), "the count ends it");
    let mut got = Vec::new();
    net.live.take(&mut got);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].end,
        Some(LiveEnd::Drop(SwitchDrop::AclDeny)),
        "{got:?}"
    );
    assert!(
        got[0].steps.iter().any(|s| s
            .detail
            .contains("rule in-110 (priority 110) matches: deny")),
        "{got:?}"
    );
}

#[test]
fn flow_logs_record_both_directions_and_denials_with_their_rules() {
    use vswitch::flowlog::{FlowEnd, FlowRecord};
    let mut net = Net::with(
        "sw-flowlog",
        SwitchConfig {
            flow_closing: Duration::from_millis(200),
            ..SwitchConfig::default()
        },
    );
    net.flow_log.set(Some(Duration::from_secs(60)));
    let c = 3;
    let g = net.vm("client").get(VIP, 80, "/");
    assert!(net.run(Duration::from_secs(10), |vms| vms[c].body(g).is_some()));
    let ssh = net.vm("client").connect(Ipv4Addr::new(10, 1, 0, 4), 22);
    // The connection's flows end 200 ms after its FINs (and the sweep
    // finds them within about a second).
    let mut got: Vec<FlowRecord> = Vec::new();
    let log = net.flow_log.clone();
    let done = net.run(Duration::from_secs(10), |_| {
        got.extend(std::iter::from_fn(|| log.pop()));
        got.iter().filter(|r| r.end == FlowEnd::Closed).count() >= 2
            && got.iter().any(|r| r.end == FlowEnd::Denied)
    });
    assert!(
        done,
        "no records of both directions and the denial: {got:#?}"
    );
    assert_eq!(net.vms[c].state(ssh), tcp::State::SynSent);
    let p = net.policy.load();
    let rule = |r: vswitch::flowlog::RuleRef| {
        let g = &p.nsgs[usize::from(r.nsg)];
        let list = if r.dir == 1 { &g.inbound } else { &g.outbound };
        (g.name.clone(), list.rules()[usize::from(r.rule)].priority)
    };
    let vip = |port| (dataplane::key::to16(IpAddr::V4(VIP)), port);
    let fwd: Vec<_> = got
        .iter()
        .filter(|r| r.end == FlowEnd::Closed && (r.key.dst_ip, r.key.dst_port) == vip(80))
        .collect();
    assert_eq!(fwd.len(), 1, "{got:#?}");
    let f = fwd[0];
    assert_eq!((f.in_port, f.initiator), (3, true));
    let dip = f.out_port.unwrap();
    assert!(dip < 3, "{f:?}");
    assert_eq!(f.post.dst_port, 8080);
    assert_eq!(
        f.post.dst_ip,
        dataplane::key::to16(p.vms[usize::from(dip)].ips[0])
    );
    // The client's outbound rule (its group's default for the vnet) and
    // web's inbound allow of 8080.
    assert_eq!(rule(f.rules[0]).0, "client");
    assert_eq!(rule(f.rules[1]), ("web".into(), 100));
    // IP bytes: at least 40 a TCP packet.
    assert!(f.packets >= 3 && f.bytes > f.packets * 40, "{f:?}");
    assert!(f.first_ns <= f.last_ns);
    let back: Vec<_> = got
        .iter()
        .filter(|r| r.end == FlowEnd::Closed && r.in_port == dip)
        .collect();
    assert_eq!(back.len(), 1, "{got:#?}");
    let b = back[0];
    assert_eq!((b.out_port, b.initiator), (Some(3), false));
    assert_eq!((b.post.src_ip, b.post.src_port), vip(80));
    assert_eq!(b.rules, f.rules);
    // The denied SYN: its own record, sent nowhere, with web's deny.
    let d = got.iter().find(|r| r.end == FlowEnd::Denied).unwrap();
    assert_eq!((d.in_port, d.out_port, d.packets), (3, None, 1));
    assert_eq!(d.key.dst_port, 22);
    assert_eq!(rule(d.rules[1]), ("web".into(), 110));
    assert_eq!(net.flow_log.stats().lost, 0);
}
