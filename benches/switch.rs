//! The full switch pipeline on one core, 64-byte packets: anti-spoofing, a
//! 1 000-rule security group, load balancing with DNAT to three backends,
//! routing with MAC rewrite.
//!
//! Run: `cargo bench --bench switch`. Results go in docs/performance.md.
//!
//! - `fast_path/{1000,100000,1000000}`: flow-table hits, the flows cycled
//!   round robin (each packet a different flow of the set), after every flow
//!   was installed once; `fast_path_random/*` the same flows in random order;
//! - `new_flows`: every packet a new connection through the slow path (ACL
//!   classification both ways, Maglev, conntrack, DNAT, two flow installs);
//! - `overlay/encap/*`: `fast_path` with the three backends on other hosts
//!   (remote endpoints): every packet put in VXLAN and sent out of the
//!   uplink; `overlay/decap/*`: the clients on another host, every packet
//!   arriving in VXLAN on the uplink and taken out of its tunnel (its VNI,
//!   inner source and outer source checked) before the same pipeline;
//!   `overlay/mux/*`: a Mux, the clients' packets arriving on the uplink
//!   for a VIP whose three DIPs are on another host, each sent on
//!   unchanged in IP in IP (no security group, no NAT).
//!
//! - `capture/*`: `fast_path/1000` without a live-capture tap, with one
//!   that is off, one copying every frame, and one whose filter matches
//!   none.
//!
//! `SWITCH_BENCH_CHURN=<rigs> cargo bench --bench switch` runs only
//! `new_flows` at a fixed 524 288 connections per rig, fresh and steady,
//! and prints the rates (criterion's `new_flows` sizes its rigs by its
//! iteration counts: mostly far smaller tables);
//! `SWITCH_BENCH_CHURN_ONLY=steady_state` (or `slow_path`) runs one kind;
//! `SWITCH_BENCH_CHURN_BURSTS=<n>` sizes each rig for `n` bursts instead
//! of 16 384 (small tables stay in the caches: what is left is the cost
//! of the work itself, without waiting for memory).
//! `SWITCH_BENCH_CHURN_FROM=wire` sends the new connections from clients
//! on the wire (the uplink) to a public VIP, as a load balancer in front
//! of a host's VMs meets them, instead of from a VM of the host.
//! `SWITCH_BENCH_STORM=<rigs>` runs only the storm: established flows'
//! packets in bursts that are mostly new connections, and the time each
//! waits from the start of the worker's poll to its transmission
//! ([`storm`]).
//! `SWITCH_BENCH_BURST=<k>` (1 to 32) makes the `fast_path` benches'
//! generator send bursts of `k` frames instead of 32 (what a switch that
//! keeps up with its traffic polls).
//! `SWITCH_BENCH_PERF_CTL=<fifo>` writes `enable` and `disable` to perf's
//! control fifo around each timed run, so that
//! `perf record -D -1 --control fifo:<fifo>` samples only those (the
//! generator and sinks included, not the rigs' set-up). Start perf first:
//! opening a fifo that no one reads waits until someone does.
//!
//! One thread does everything: the generator fills 32 frames and sends them
//! into the switch's input ring, the worker polls once (`Worker::poll_once`),
//! and the three backend rings are drained. `fast_path` and
//! `new_flows/slow_path` time only the worker's poll (TSC stamps around
//! `poll_once`: receive, pipeline, transmit, with `platform::timing_fence`
//! before each so that none of the generator's loads or stores are still in
//! flight when the window opens), which is the switch's cost per core; the
//! `..._with_generator` variants time the whole loop, the generator's and
//! sinks' work included. The generator writes each frame from one template
//! and the flow's number (as a NIC delivers it, reading nothing per flow;
//! [`Frames`]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dataplane::capture::{Spec, Tap};
use dataplane::clock::TscClock;
use dataplane::pool::{Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::{Pipeline, Worker};
use dataplane::{BURST, Batch, LinkInfo, MacAddr, PacketBuf, Port};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, VipConfig};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vswitch::{Policy, Switch, SwitchConfig, SwitchStats, Topology, VipDef, VmDef, VnetDef};

const GEN_IPS: u32 = 64;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);

fn gen_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 1, 0)) + i)
}

/// 999 rules that never match the bench traffic, then one that admits it
/// (for `Mode::Wire`, another for its clients).
fn big_nsg(mode: Mode) -> NsgSpec {
    let mut rules: Vec<RuleSpec> = (0..999)
        .map(|i| RuleSpec {
            name: None,
            priority: 100 + i,
            direction: if i % 2 == 0 { "in" } else { "out" }.into(),
            action: if i % 3 == 0 { "deny" } else { "allow" }.into(),
            protocol: ["tcp", "udp"][i as usize % 2].into(),
            src: vec![format!("10.{}.{}.0/24", 2 + i % 200, i / 200)],
            dst: vec!["any".into()],
            src_ports: vec!["any".into()],
            dst_ports: vec![format!("{}", 1000 + i)],
            stateful: None,
        })
        .collect();
    let admit = RuleSpec {
        name: Some("allow-bench".into()),
        priority: 1200,
        direction: "in".into(),
        action: "allow".into(),
        protocol: "udp".into(),
        src: vec!["10.1.1.0/24".into()],
        dst: vec!["any".into()],
        src_ports: vec!["any".into()],
        dst_ports: vec!["8080".into()],
        stateful: None,
    };
    if mode == Mode::Wire {
        rules.push(RuleSpec {
            name: Some("allow-wire".into()),
            priority: 1201,
            src: vec!["198.18.0.0/15".into()],
            ..admit.clone()
        });
    }
    rules.push(admit);
    NsgSpec {
        name: "big".into(),
        rules,
    }
}

/// Where the generator's clients and the backends are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All VMs of this host.
    Plain,
    /// The backends on other hosts, behind the uplink (port 1).
    Encap,
    /// The clients on another host: their packets come in VXLAN on the
    /// uplink (port 0).
    Decap,
    /// A Mux: the clients' packets come in on the uplink (port 0), for a
    /// VIP whose DIPs are on another host, and go back out of it in IP in
    /// IP.
    Mux,
    /// Clients on the wire: their packets come in on the uplink (port 0),
    /// for a public VIP whose DIPs are this host's VMs.
    Wire,
}

/// The public VIP of `Mode::Wire` (outside the vnet: reached from the
/// wire).
const WIRE_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 80);

/// Client `i` of `Mode::Wire`, in the benchmarking range (RFC 2544).
fn wire_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i)
}

/// The Mux's VIP (outside the vnet: reached from the wire).
const MUX_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);

/// The uplink's underlay address, and the hosts'.
const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const UPLINK_MAC: [u8; 6] = [2, 0x50, 0x4c, 0x58, 0, 1];

fn topology(mode: Mode) -> Topology {
    let mac = |i: u8| MacAddr([2, 0, 0, 0, 0, i]);
    let clients: Vec<IpAddr> = (0..GEN_IPS).map(|i| IpAddr::V4(gen_ip(i))).collect();
    let mut vms = Vec::new();
    let mut remotes = Vec::new();
    if mode == Mode::Mux || mode == Mode::Wire {
        // No VM: the clients are on the wire.
    } else if mode == Mode::Decap {
        remotes.push(vswitch::RemoteDef {
            name: "clients".into(),
            vnet: 0,
            ips: clients,
            host: CLIENT_HOST,
            mac: None,
        });
    } else {
        vms.push(VmDef {
            name: "gen".into(),
            port: 0,
            vnet: 0,
            mac: mac(1),
            ips: clients,
            nsg: Some(0),
            internal: false,
        });
    }
    for b in 0..3u8 {
        if mode == Mode::Mux {
            continue;
        }
        if mode == Mode::Encap {
            remotes.push(vswitch::RemoteDef {
                name: format!("dip{b}"),
                vnet: 0,
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4 + b))],
                host: Ipv4Addr::new(192, 0, 2, 10 + b),
                mac: None,
            });
            continue;
        }
        vms.push(VmDef {
            name: format!("dip{b}"),
            port: 1 + u16::from(b),
            vnet: 0,
            mac: mac(10 + b),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4 + b))],
            nsg: Some(0),
            internal: false,
        });
    }
    let backends = (0..3)
        .map(|b| Backend {
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4 + b)),
            port: 8080,
            weight: 1,
        })
        .collect();
    Topology {
        vnets: vec![VnetDef {
            name: "a".into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]),
            snat: None,
            vni: Some(100),
            encap: Default::default(),
        }],
        vms,
        nsgs: vec![big_nsg(mode)],
        vips: vec![VipDef {
            vnet: 0,
            config: if mode == Mode::Mux {
                let mut c = VipConfig::new("bench", IpAddr::V4(MUX_VIP), 80, 17, backends);
                c.mode = lb::balancer::VipMode::Mux;
                c
            } else if mode == Mode::Wire {
                VipConfig::new("bench", IpAddr::V4(WIRE_VIP), 80, 17, backends)
            } else {
                VipConfig::new("bench", IpAddr::V4(VIP), 80, 17, backends)
            },
            health: vec![],
        }],
        ports: 4,
        uplink: match mode {
            Mode::Plain => None,
            // A plain uplink: the clients' replies go to its next hop.
            Mode::Wire => Some(vswitch::UplinkDef {
                port: 0,
                mac: MacAddr(UPLINK_MAC),
                next_hop_mac: MacAddr([2, 0, 0, 0, 2, 7]),
                underlay: None,
            }),
            _ => Some(vswitch::UplinkDef {
                port: if mode == Mode::Encap { 1 } else { 0 },
                mac: MacAddr(UPLINK_MAC),
                next_hop_mac: MacAddr::ZERO,
                underlay: Some(vswitch::Underlay {
                    address: "192.0.2.1/24".parse().unwrap(),
                    // The Mux's DIPs are on the host at 192.0.2.10.
                    routes: vec![("10.1.0.0/16".parse().unwrap(), Ipv4Addr::new(192, 0, 2, 10))],
                    muxes: Vec::new(),
                }),
            }),
        },
        remotes,
        // The hosts' MACs are known (resolved by ARP in a running switch).
        neighbours: (7..13)
            .map(|h| (Ipv4Addr::new(192, 0, 2, h), MacAddr([2, 0, 0, 0, 2, h])))
            .collect(),
    }
}

/// A 60-byte UDP frame of flow `f` (source address and port vary); for
/// `Mode::Decap`, in VXLAN from the clients' host (110 bytes).
fn frame(f: u32, mode: Mode) -> Vec<u8> {
    let mut v = Vec::with_capacity(60);
    let src = match mode {
        Mode::Wire => wire_ip(f % GEN_IPS),
        _ => gen_ip(f % GEN_IPS),
    };
    let sport = 1024 + (f / GEN_IPS) as u16;
    let (dst_mac, vip) = match mode {
        Mode::Mux => (UPLINK_MAC, MUX_VIP),
        Mode::Wire => (UPLINK_MAC, WIRE_VIP),
        _ => ([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc], VIP),
    };
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], dst_mac)
        .ipv4(src.octets(), vip.octets(), 64)
        .udp(sport, 80)
        .write(&mut v, &[0u8; 18])
        .unwrap();
    if mode != Mode::Decap {
        return v;
    }
    let mut outer = Vec::with_capacity(110);
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 2, 7], UPLINK_MAC)
        .ipv4(CLIENT_HOST.octets(), LOCAL.octets(), 64)
        .udp(50000 + (f % 1000) as u16, 4789)
        .write(
            &mut outer,
            &[[0x08, 0, 0, 0, 0, 0, 100, 0].as_slice(), &v].concat(),
        )
        .unwrap();
    outer
}

/// The frames a rig's generator sends: flow `first + i`'s for `i` below
/// the count.
///
/// Where one flow's frame differs from another's only in the source address
/// and port (every mode but `Decap`), the generator writes each from one
/// template and the flow's number, updating both checksums, as a NIC
/// delivers frames without the core reading anything per flow; a check at
/// construction compares a sample with [`frame`]'s. Otherwise the frames
/// are stored one after another at a fixed stride of whole cache lines, in
/// one allocation advised onto huge pages. (Stored as a million small
/// allocations, a frame in random order cost the generator a TLB miss and
/// two cache misses, and its loads evicted the worker's lines and TLB
/// entries between the timed polls.)
enum Frames {
    Made {
        template: Vec<u8>,
        mode: Mode,
        first: u32,
        count: usize,
    },
    Stored {
        data: Vec<u8>,
        stride: usize,
        lens: Vec<u16>,
    },
}

impl Frames {
    /// Flows `first..first + count` of a rig of `mode`.
    fn flows(first: u32, count: u32, mode: Mode) -> Frames {
        if mode == Mode::Decap {
            return Frames::stored((first..first + count).map(|f| frame(f, mode)));
        }
        let made = Frames::Made {
            template: frame(0, mode),
            mode,
            first,
            count: count as usize,
        };
        let last = count.saturating_sub(1);
        for i in (0..count).step_by(997).chain([last]) {
            let (f, len) = made.get(i as usize);
            assert_eq!(
                f[..len],
                frame(first + i, mode),
                "the frame of flow {}",
                first + i
            );
        }
        made
    }

    /// `frames`, stored.
    fn stored(frames: impl ExactSizeIterator<Item = Vec<u8>>) -> Frames {
        let n = frames.len();
        let (mut data, mut stride, mut lens) = (Vec::new(), 0, Vec::with_capacity(n));
        for v in frames {
            if stride == 0 {
                stride = v.len().next_multiple_of(64).max(64);
                data = Vec::with_capacity(n * stride);
                platform::advise_huge(data.spare_capacity_mut());
            }
            assert!(
                v.len() <= stride.min(128),
                "frames of one rig differ in length, or are long"
            );
            lens.push(v.len() as u16);
            data.extend_from_slice(&v);
            data.resize(lens.len() * stride, 0);
        }
        Frames::Stored { data, stride, lens }
    }

    fn len(&self) -> usize {
        match self {
            Frames::Made { count, .. } => *count,
            Frames::Stored { lens, .. } => lens.len(),
        }
    }

    /// Appends frame `i` to `buf`.
    #[inline]
    fn write(&self, i: usize, buf: &mut PoolBuf) {
        // A made frame is made on the stack and copied whole, so that it is
        // written as a stored one is: the worker's loads of its headers
        // would otherwise wait for the patches' narrow stores (store
        // forwarding), which a NIC's writes never leave behind.
        let (f, len) = self.get(i);
        buf.append(len).unwrap().copy_from_slice(&f[..len]);
    }

    /// Frame `i`, and its length.
    #[inline]
    fn get(&self, i: usize) -> ([u8; 128], usize) {
        match self {
            Frames::Made {
                template,
                mode,
                first,
                ..
            } => made(template, first + i as u32, *mode),
            Frames::Stored { data, stride, lens } => {
                let len = usize::from(lens[i]);
                let mut f = [0u8; 128];
                f[..len].copy_from_slice(&data[i * stride..][..len]);
                (f, len)
            }
        }
    }
}

/// Flow `f`'s frame (of `template`'s length) made from `template`, flow 0's
/// ([`retarget`]).
#[inline]
fn made(template: &[u8], f: u32, mode: Mode) -> ([u8; 128], usize) {
    let mut d = [0u8; 128];
    let len = template.len();
    d[..len].copy_from_slice(template);
    retarget(&mut d[..len], f, mode);
    (d, len)
}

/// Makes `d`, flow 0's frame of a rig of `mode` (not `Decap`), flow
/// `f`'s: its source address and port, the IPv4 header checksum computed
/// again and the UDP checksum updated (RFC 1624) for the bytes changed.
#[inline]
fn retarget(d: &mut [u8], f: u32, mode: Mode) {
    use dataplane::wire::checksum;
    let src = match mode {
        Mode::Wire => wire_ip(f % GEN_IPS),
        _ => gen_ip(f % GEN_IPS),
    }
    .octets();
    let sport = (1024 + (f / GEN_IPS) as u16).to_be_bytes();
    let old = [d[26], d[27], d[28], d[29], d[34], d[35]];
    let new = [src[0], src[1], src[2], src[3], sport[0], sport[1]];
    d[26..30].copy_from_slice(&src);
    d[34..36].copy_from_slice(&sport);
    d[24..26].fill(0);
    let ip = checksum::checksum(&d[14..34]);
    d[24..26].copy_from_slice(&ip.to_be_bytes());
    let udp = match checksum::update(u16::from_be_bytes([d[40], d[41]]), &old, &new) {
        0 => 0xffff,
        c => c,
    };
    d[40..42].copy_from_slice(&udp.to_be_bytes());
}

struct Rig {
    /// Frames the generator sends at a time (32, or fewer to measure
    /// small bursts).
    per_burst: usize,
    worker: Worker<PoolBuf, Switch>,
    stats: Arc<SwitchStats>,
    gen_end: RingPort<PoolBuf>,
    sinks: Vec<RingPort<PoolBuf>>,
    pool: Pool,
    frames: Frames,
    mode: Mode,
    next: usize,
    /// Flows in random order (xorshift) instead of round robin.
    random: bool,
    rng: u64,
    rx: Batch<PoolBuf>,
    forwarded: u64,
    /// Live capture, emptied with the sinks (outside the timed poll).
    tap: Option<Arc<Tap>>,
}

impl Rig {
    fn new(flows: u32, table: usize) -> Rig {
        Rig::with_timeouts(flows, table, None, Mode::Plain)
    }

    /// A rig whose flows and connections time out after `idle` (instead
    /// of the defaults: minutes).
    fn with_timeouts(flows: u32, table: usize, idle: Option<Duration>, mode: Mode) -> Rig {
        Rig::build(flows, table, idle, mode, None)
    }

    /// A rig as [`Rig::with_timeouts`]; with `stamps`, its backend ports
    /// note when each marked frame leaves ([`Stamped`]).
    fn build(
        flows: u32,
        table: usize,
        idle: Option<Duration>,
        mode: Mode,
        stamps: Option<(&TscClock, Arc<std::sync::Mutex<Vec<u64>>>)>,
    ) -> Rig {
        let pool = Pool::new(&PoolConfig::new("switch-bench", 8192)).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::compile(&topology(mode), 1).unwrap(),
        ));
        let mut cfg = SwitchConfig {
            flow_table_size: table * 2 + 64,
            conn_table_size: table + 64,
            // As `pollux run` (`preallocate_tables`, the default).
            preallocate: true,
            ..SwitchConfig::default()
        };
        if let Some(idle) = idle {
            let ns = idle.as_nanos() as u64;
            cfg.flow_idle = idle;
            cfg.flow_closing = idle;
            cfg.timeouts = lb::conntrack::Timeouts {
                tcp_handshake: ns,
                tcp_established: ns,
                tcp_fin: ns,
                tcp_time_wait: ns,
                tcp_closed: ns,
                udp_unreplied: ns,
                udp_replied: ns,
                other: ns,
            };
        }
        // As `pollux run` builds it: with a flow log, off (the flow table
        // keeps what the log needs of each flow all the same).
        let mut sw = Switch::new(policy, cfg).with_flow_log(vswitch::flowlog::FlowLog::new(
            pollux::control::flowlog::FLOW_LOG_RECORDS,
        ));
        // What the worker does on its core before its first poll: the
        // tables' memory committed, the policy taken in.
        Pipeline::start(&mut sw);
        let l = |n: &str| LinkInfo::new(n, MacAddr([2, 0, 0, 0, 9, 9]), "ring");
        let (gen_end, sw_gen) = ring::pair(l("gen"), l("sw-gen"), 1024);
        let mut ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = vec![Box::new(sw_gen)];
        let mut sinks = Vec::new();
        for b in 0..3 {
            let (s, sw) = ring::pair(l(&format!("dip{b}")), l(&format!("sw-dip{b}")), 1024);
            sinks.push(s);
            match &stamps {
                Some((clock, at)) => ports.push(Box::new(Stamped {
                    inner: sw,
                    clock: (*clock).clone(),
                    at: at.clone(),
                })),
                None => ports.push(Box::new(sw)),
            }
        }
        let stats = sw.stats();
        let worker = Worker::new("bench", None, ports, sw);
        Rig {
            worker,
            stats,
            gen_end,
            sinks,
            pool,
            frames: Frames::flows(0, flows, mode),
            mode,
            next: 0,
            random: false,
            rng: 0x9e37_79b9_7f4a_7c15,
            rx: Batch::new(),
            forwarded: 0,
            tap: None,
            per_burst: BURST,
        }
    }

    /// This rig with its worker copying frames to `tap` while it is armed.
    fn tapped(self, tap: Arc<Tap>) -> Rig {
        Rig {
            worker: self.worker.with_tap(tap.clone()),
            tap: Some(tap),
            ..self
        }
    }

    /// From now on, generate flows `first..first + count`.
    fn use_flows(&mut self, first: u32, count: u32) {
        self.frames = Frames::flows(first, count, self.mode);
        self.next = 0;
    }

    /// Generates a burst of frames (`per_burst`) into the switch's input
    /// ring.
    #[inline]
    fn generate(&mut self) {
        let mut b = Batch::new();
        for _ in 0..self.per_burst {
            let mut buf = self.pool.alloc().unwrap();
            self.frames.write(self.next, &mut buf);
            if self.random {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.next = (self.rng % self.frames.len() as u64) as usize;
            } else {
                self.next += 1;
                if self.next == self.frames.len() {
                    self.next = 0;
                }
            }
            b.push(buf).unwrap();
        }
        self.gen_end.tx_burst(&mut b);
    }

    /// Drains the backend rings (and a Mux's uplink), freeing the frames;
    /// returns how many.
    #[inline]
    fn drain(&mut self) -> usize {
        let mut n = 0;
        if self.mode == Mode::Mux {
            n += self.gen_end.rx_burst(&mut self.rx);
            self.rx.clear();
        }
        for s in &mut self.sinks {
            n += s.rx_burst(&mut self.rx);
            self.rx.clear();
        }
        if let Some(t) = &self.tap {
            let mut got = Vec::new();
            t.take(&mut got);
            t.give_back(got);
        }
        n
    }

    /// One burst: generate a burst of frames, poll the switch once, drain
    /// the sinks.
    #[inline]
    fn burst(&mut self) -> usize {
        self.generate();
        self.worker.poll_once();
        self.drain()
    }

    /// `iters` bursts, timing only the worker's poll (TSC ticks); adds the
    /// packets that came out to `self.forwarded`. Not inlined: a symbol a
    /// profiler can split its counts at (callgrind's `--dump-before`).
    #[inline(never)]
    fn timed_bursts(&mut self, clock: &TscClock, iters: u64) -> u64 {
        let mut ticks = 0;
        for _ in 0..iters {
            self.generate();
            // The window opens once the generator's loads and stores are
            // done (its last frames' misses are not the worker's) and closes
            // once the worker's are (`platform::timing_fence`).
            platform::timing_fence();
            let t0 = clock.now();
            self.worker.poll_once();
            platform::timing_fence();
            ticks += clock.now().wrapping_sub(t0);
            self.forwarded += self.drain() as u64;
        }
        ticks
    }
}

fn bench(c: &mut Criterion) {
    let clock = TscClock::calibrate(Duration::from_millis(50));
    if let Ok(rigs) = std::env::var("SWITCH_BENCH_STORM") {
        storm(
            &clock,
            rigs.parse().expect("SWITCH_BENCH_STORM: a number of rigs"),
        );
        std::process::exit(0);
    }
    if let Ok(rigs) = std::env::var("SWITCH_BENCH_CHURN") {
        churn(
            &clock,
            rigs.parse().expect("SWITCH_BENCH_CHURN: a number of rigs"),
        );
        std::process::exit(0);
    }
    // `SWITCH_BENCH_FLOWS=1000,100000` runs only those sizes.
    let sizes: Vec<u32> = std::env::var("SWITCH_BENCH_FLOWS")
        .map(|v| v.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![1_000, 100_000, 1_000_000]);
    // `SWITCH_BENCH_BURST=4`: the `fast_path` benches send bursts of 4
    // frames (a switch that keeps up with its traffic polls bursts
    // smaller than 32, which pay each poll's fixed costs over fewer
    // packets).
    let per_burst = std::env::var("SWITCH_BENCH_BURST").map_or(BURST, |v| {
        v.parse()
            .ok()
            .filter(|k| (1..=BURST).contains(k))
            .expect("SWITCH_BENCH_BURST: frames per burst, 1 to 32")
    });
    let mut rigs = Vec::new();
    for flows in sizes {
        let mut rig = Rig::new(flows, flows as usize);
        // Install every flow once (slow path), then check they all hit.
        let mut out = 0;
        for _ in 0..(flows as usize).div_ceil(BURST) {
            out += rig.burst();
        }
        assert!(
            out as u32 >= flows - BURST as u32,
            "only {out} of {flows} forwarded while installing"
        );
        rig.per_burst = per_burst;
        rigs.push((flows, rig));
    }
    let worker_only = |rig: &mut Rig, n: u64| {
        Duration::from_nanos(clock.ticks_to_ns(rig.timed_bursts(&clock, n)))
    };
    // The switch's own cost: only `poll_once` is timed (receive from the
    // input ring, the pipeline, transmit to the backend rings); then the
    // same with the flows in random order: round robin walks the flow
    // table's slab in the order the flows were installed, which the
    // hardware prefetcher follows; random order is what traffic looks like.
    for (name, random) in [("fast_path", false), ("fast_path_random", true)] {
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(per_burst as u64));
        for (flows, rig) in &mut rigs {
            rig.random = random;
            g.bench_with_input(BenchmarkId::from_parameter(*flows), flows, |b, _| {
                b.iter_custom(|iters| worker_only(rig, iters))
            });
            rig.random = false;
        }
        g.finish();
    }
    // The same with the generator's and sinks' work on the same thread.
    let mut g = c.benchmark_group("fast_path_with_generator");
    g.throughput(Throughput::Elements(per_burst as u64));
    for (flows, rig) in &mut rigs {
        g.bench_with_input(BenchmarkId::from_parameter(*flows), flows, |b, _| {
            b.iter(|| rig.burst())
        });
    }
    g.finish();
    drop(rigs);

    // Live capture: the fast path at 1 000 flows without a tap, with one
    // that is off, one that copies every frame (received and sent: two
    // per packet; the records are read back outside the timed poll), and
    // one whose filter matches nothing (each frame parsed for it).
    let mut g = c.benchmark_group("capture");
    g.throughput(Throughput::Elements(BURST as u64));
    let everything = |filter: &str| Spec {
        port: None,
        filter: filter.parse().unwrap(),
        snaplen: dataplane::capture::MAX_SNAPLEN,
    };
    for (name, armed) in [
        ("none", None),
        ("off", Some(None)),
        ("all", Some(Some(""))),
        ("filtered_out", Some(Some("port 9"))),
    ] {
        let flows = 1_000;
        let mut rig = Rig::new(flows, flows as usize);
        if let Some(on) = armed {
            let tap = Tap::new(4096);
            if let Some(f) = on {
                tap.arm(everything(f), u64::MAX, u64::MAX);
            }
            rig = rig.tapped(tap);
        }
        for _ in 0..(flows as usize).div_ceil(BURST) {
            rig.burst();
        }
        g.bench_function(name, |b| {
            b.iter_custom(|iters| worker_only(&mut rig, iters))
        });
        if let (Some(Some("")), Some(t)) = (armed, &rig.tap) {
            assert!(t.captured() > 0 && t.is_armed(), "the capture stopped");
        }
    }
    g.finish();

    // The overlay: the same pipeline with every packet leaving in a tunnel
    // (encap) or arriving in one (decap), next to the plain fast path.
    let mut g = c.benchmark_group("overlay");
    g.throughput(Throughput::Elements(BURST as u64));
    for (name, mode) in [
        ("plain", Mode::Plain),
        ("encap", Mode::Encap),
        ("decap", Mode::Decap),
        ("mux", Mode::Mux),
    ] {
        let flows = 1_000;
        let mut rig = Rig::with_timeouts(flows, flows as usize, None, mode);
        let mut out = 0;
        for _ in 0..(flows as usize).div_ceil(BURST) {
            out += rig.burst();
        }
        assert!(
            out as u32 >= flows - BURST as u32,
            "{name}: only {out} forwarded"
        );
        g.bench_with_input(BenchmarkId::new(name, flows), &flows, |b, _| {
            b.iter_custom(|iters| worker_only(&mut rig, iters))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("new_flows");
    g.throughput(Throughput::Elements(BURST as u64));
    g.sample_size(10);
    let whole_loop = |rig: &mut Rig, n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            rig.forwarded += rig.burst() as u64;
        }
        t.elapsed()
    };
    // Fresh tables: their memory is touched for the first time.
    g.bench_function("slow_path", |b| {
        b.iter_custom(|iters| new_flows(iters, false, Mode::Plain, worker_only))
    });
    g.bench_function("slow_path_with_generator", |b| {
        b.iter_custom(|iters| new_flows(iters, false, Mode::Plain, whole_loop))
    });
    // Steady state: the tables are full of flows that have timed out (as on
    // a switch that has run a while), so new flows reuse their memory:
    // flow-table slots from the free list after the periodic expiry, load
    // balancer connections by evicting the oldest expired one. The same
    // number of flows and table sizes as `slow_path`; what differs is that
    // the memory was touched before (no page faults on first use).
    g.bench_function("steady_state", |b| {
        b.iter_custom(|iters| new_flows(iters, true, Mode::Plain, worker_only))
    });
    g.finish();
}

/// `new_flows` at a fixed size, outside criterion: `rigs` rigs of 16 384
/// bursts (524 288 new connections each, into tables sized for them),
/// into fresh tables and in steady state, the worker's time only; prints
/// each rate. Criterion's `new_flows` sizes its rigs by its iteration
/// counts, mostly far smaller tables.
fn churn(clock: &TscClock, rigs: u64) {
    let worker_only =
        |rig: &mut Rig, n: u64| Duration::from_nanos(clock.ticks_to_ns(rig.timed_bursts(clock, n)));
    let only = std::env::var("SWITCH_BENCH_CHURN_ONLY").ok();
    if let Some(o) = only.as_deref() {
        assert!(
            o == "steady_state" || o == "slow_path",
            "SWITCH_BENCH_CHURN_ONLY={o}: steady_state or slow_path"
        );
    }
    let mode = match std::env::var("SWITCH_BENCH_CHURN_FROM").as_deref() {
        Err(_) | Ok("vm") => Mode::Plain,
        Ok("wire") => Mode::Wire,
        Ok(o) => panic!("SWITCH_BENCH_CHURN_FROM={o}: vm or wire"),
    };
    for steady in [false, true] {
        let name = if steady { "steady_state" } else { "slow_path" };
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let n = std::env::var("SWITCH_BENCH_CHURN_BURSTS").map_or(16_384, |v| {
            v.parse()
                .ok()
                .filter(|&n| n > 0 && n <= 16_384)
                .expect("SWITCH_BENCH_CHURN_BURSTS: bursts per rig, 1 to 16384")
        });
        for _ in 0..rigs {
            let t = new_flows(n, steady, mode, worker_only);
            let conns = n * BURST as u64;
            println!(
                "new_flows/{name}/{conns}: {:.3} M/s",
                conns as f64 / t.as_secs_f64() / 1e6
            );
        }
    }
}

/// Times `iters` bursts of flows the switch has not seen, with `run`, on a
/// fresh rig of `mode` per 16 384 bursts (built untimed); `steady` first fills the
/// rig's tables with other flows and lets them time out. Checks that every
/// packet took the slow path and was forwarded (none refused for a full
/// table).
fn new_flows(
    iters: u64,
    steady: bool,
    mode: Mode,
    run: impl Fn(&mut Rig, u64) -> Duration,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    while done < iters {
        let n = (iters - done).min(16_384);
        let flows = (n as usize * BURST) as u32;
        let mut rig = if steady {
            // Long enough that the timed flows stay in the table (it grows
            // to as many entries as without `steady`).
            let idle = Duration::from_millis(500);
            let mut rig = Rig::with_timeouts(flows, flows as usize, Some(idle), mode);
            // Fill, let everything time out, and send one burst of other
            // flows: the flow table's expiry step, more than a second after
            // the last, sweeps the whole table.
            for _ in 0..n {
                rig.burst();
            }
            std::thread::sleep(Duration::from_millis(1200));
            rig.use_flows(2 * flows, BURST as u32);
            rig.burst();
            rig.use_flows(flows, flows);
            rig
        } else {
            Rig::with_timeouts(flows, flows as usize, None, mode)
        };
        let slow = rig.stats.slow_path.load(Ordering::Relaxed);
        rig.forwarded = 0;
        perf_ctl("enable");
        total += run(&mut rig, n);
        perf_ctl("disable");
        let new = rig.stats.slow_path.load(Ordering::Relaxed) - slow;
        assert_eq!(new, u64::from(flows), "slow-path packets");
        assert_eq!(rig.forwarded, u64::from(flows), "forwarded");
        done += n;
    }
    total
}

/// A backend port of the switch that notes the time (TSC) at which each
/// frame marked as an established flow's (first payload byte 1) is sent.
struct Stamped {
    inner: RingPort<PoolBuf>,
    clock: TscClock,
    at: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Port for Stamped {
    type Buf = PoolBuf;

    fn info(&self) -> &LinkInfo {
        self.inner.info()
    }

    fn stats(&self) -> &Arc<dataplane::PortStats> {
        self.inner.stats()
    }

    fn rx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        self.inner.rx_burst(batch)
    }

    fn tx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        let t = self.clock.now();
        let marked = batch
            .iter()
            .filter(|p| p.data().get(42) == Some(&1))
            .count();
        if marked > 0 {
            let mut at = self.at.lock().unwrap();
            at.extend(std::iter::repeat_n(t, marked));
        }
        self.inner.tx_burst(batch)
    }

    fn kick(&mut self) {
        self.inner.kick()
    }
}

/// `SWITCH_BENCH_STORM=<rigs>`: established flows' packets in a storm of
/// new connections. Each rig installs 1 000 established flows, then times
/// 16 384 bursts of 24 new connections and 8 packets of the established
/// flows (every fourth packet of the burst), and, for comparison, 16 384
/// bursts of the established flows alone. Prints, for the established
/// flows' packets, the time from the start of the worker's poll to their
/// transmission (p50, p99, p99.9, max), and the new connections' rate.
fn storm(clock: &TscClock, rigs: u64) {
    const ESTABLISHED: u32 = 1_000;
    const BURSTS: usize = 16_384;
    let new = (BURSTS * 24) as u32;
    let marked = |f: u32| {
        let mut v = frame(f, Mode::Plain);
        v[42] = 1;
        v
    };
    let quantiles = |mut v: Vec<u64>| {
        v.sort_unstable();
        let q = |x: f64| clock.ticks_to_ns(v[((v.len() - 1) as f64 * x) as usize]) as f64 / 1e3;
        format!(
            "p50 {:.2} us, p99 {:.2}, p99.9 {:.2}, max {:.2} ({} packets)",
            q(0.5),
            q(0.99),
            q(0.999),
            q(1.0),
            v.len()
        )
    };
    for _ in 0..rigs {
        let at = Arc::new(std::sync::Mutex::new(Vec::new()));
        let total = ESTABLISHED + new;
        let mut rig = Rig::build(
            total,
            total as usize,
            None,
            Mode::Plain,
            Some((clock, at.clone())),
        );
        let est: Vec<Vec<u8>> = (0..ESTABLISHED).map(marked).collect();
        let fresh: Vec<Vec<u8>> = (ESTABLISHED..total)
            .map(|f| frame(f, Mode::Plain))
            .collect();
        // Install the established flows.
        rig.frames = Frames::stored(est.iter().cloned());
        rig.next = 0;
        for _ in 0..(ESTABLISHED as usize).div_ceil(BURST) {
            rig.burst();
        }
        at.lock().unwrap().clear();
        let (mut e, mut f) = (0usize, 0usize);
        let mut run = |rig: &mut Rig, with_new: bool| {
            let mut lat = Vec::with_capacity(BURSTS * BURST);
            let mut ticks = 0u64;
            for _ in 0..BURSTS {
                let mut b = Batch::new();
                for i in 0..BURST {
                    let frame = if with_new && i % 4 != 3 {
                        f += 1;
                        &fresh[f - 1]
                    } else {
                        e = (e + 1) % est.len();
                        &est[e]
                    };
                    let mut buf = rig.pool.alloc().unwrap();
                    buf.append(frame.len()).unwrap().copy_from_slice(frame);
                    b.push(buf).unwrap();
                }
                rig.gen_end.tx_burst(&mut b);
                platform::timing_fence();
                let t0 = clock.now();
                rig.worker.poll_once();
                platform::timing_fence();
                ticks += clock.now().wrapping_sub(t0);
                let mut at = at.lock().unwrap();
                lat.extend(at.drain(..).map(|t| t.wrapping_sub(t0)));
                drop(at);
                rig.drain();
            }
            (lat, ticks)
        };
        let slow = rig.stats.slow_path.load(Ordering::Relaxed);
        let (alone, _) = run(&mut rig, false);
        let (stormed, ticks) = run(&mut rig, true);
        let opened = rig.stats.slow_path.load(Ordering::Relaxed) - slow;
        assert_eq!(opened, u64::from(new), "slow-path packets");
        println!("storm/established_alone: {}", quantiles(alone));
        println!("storm/established_in_storm: {}", quantiles(stormed));
        println!(
            "storm/new_connections: {:.3} M/s",
            f64::from(new) / (clock.ticks_to_ns(ticks) as f64 / 1e9) / 1e6
        );
    }
}

/// Writes `cmd` to the perf control fifo named by `SWITCH_BENCH_PERF_CTL`,
/// if set.
fn perf_ctl(cmd: &str) {
    if let Ok(fifo) = std::env::var("SWITCH_BENCH_PERF_CTL") {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .unwrap_or_else(|e| panic!("SWITCH_BENCH_PERF_CTL {fifo}: {e}"));
        writeln!(f, "{cmd}").unwrap();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
