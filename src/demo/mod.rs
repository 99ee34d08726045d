//! `pollux demo`: the switch in one process, with no privileges and no system
//! packages. VMs are smoltcp stacks on ring ports; the switch runs on its own
//! worker thread; the health prober sits on an internal port of the switch so
//! its probes take the tenant path. The run prints a short report:
//! load spreading, probe failover with an open connection kept, an ACL drop,
//! tenant isolation, latency and packet rate through the switch, and the
//! rate of new connections through a VIP.

use arc_swap::ArcSwap;
use dataplane::clock::TscClock;
use dataplane::pool::{Pool, PoolBuf};
use dataplane::port::ring::RingPort;
use dataplane::worker::Worker;
use dataplane::{Batch, MacAddr, PacketBuf, Port};
use filter::{NsgSpec, RuleSpec};
use lb::balancer::{Backend, VipConfig};
use lb::probe::device::PortDevice;
use lb::probe::{HealthChange, ProbeKind, ProbeSpec, Prober, ProberConfig, Target};
use smoltcp::socket::tcp;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vmsim::{Vm, vm_port};
use vswitch::{Policy, Switch, SwitchConfig, SwitchDrop, Topology, VipDef, VmDef, VnetDef};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A VM could not be made.
    #[error(transparent)]
    Vm(#[from] vmsim::VmError),
    /// The demo's topology or a health change was refused.
    #[error(transparent)]
    Policy(#[from] vswitch::policy::PolicyError),
    /// The switch's worker could not start.
    #[error(transparent)]
    Worker(#[from] dataplane::worker::WorkerError),
    /// The buffer pool could not be made.
    #[error("buffer pool: {0}")]
    Pool(#[from] dataplane::pool::PoolError),
    /// A piece of the demo's own set-up is missing (named).
    #[error("demo set-up: {0}")]
    Setup(String),
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
const GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const WEB: [(&str, Ipv4Addr); 3] = [
    ("web1", Ipv4Addr::new(10, 1, 0, 4)),
    ("web2", Ipv4Addr::new(10, 1, 0, 5)),
    ("web3", Ipv4Addr::new(10, 1, 0, 6)),
];
const GEN_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 30);
const SINK_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 31);
/// A UDP VIP whose backends are the sink's ports 6000-6002: every flow
/// from the generator to it is a new connection.
const CONN_VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 101);
const CONN_PORT: u16 = 7000;
const SINK_PORTS: [u16; 3] = [6000, 6001, 6002];

fn mac(i: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, i])
}

fn rule(name: &str, priority: i64, action: &str, dst_ports: &str) -> RuleSpec {
    proto_rule(name, priority, action, "tcp", dst_ports)
}

fn proto_rule(
    name: &str,
    priority: i64,
    action: &str,
    protocol: &str,
    dst_ports: &str,
) -> RuleSpec {
    RuleSpec {
        name: Some(name.into()),
        priority,
        direction: "in".into(),
        action: action.into(),
        protocol: protocol.into(),
        src: vec!["any".into()],
        dst: vec!["any".into()],
        src_ports: vec!["any".into()],
        dst_ports: vec![dst_ports.into()],
        stateful: None,
    }
}

/// Ports: 0-2 web, 3 client, 4 other (vnet b), 5 prober, 6 gen, 7 sink.
fn topology() -> Topology {
    let vnet = |name: &str, g: u8| VnetDef {
        name: name.into(),
        prefixes: vec![ipnet::IpNet::V4(ipnet::Ipv4Net::new_assert(
            Ipv4Addr::new(10, 1, 0, 0),
            16,
        ))],
        gateway_mac: MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, g]),
        snat: None,
        vni: None,
        encap: Default::default(),
    };
    let vm =
        |name: &str, port: u16, vnet: usize, ip: Ipv4Addr, nsg: Option<usize>, internal: bool| {
            VmDef {
                name: name.into(),
                port,
                vnet,
                mac: mac(port as u8 + 1),
                ips: vec![IpAddr::V4(ip)],
                nsg,
                internal,
            }
        };
    let mut vms: Vec<VmDef> = WEB
        .iter()
        .enumerate()
        .map(|(i, (n, ip))| vm(n, i as u16, 0, *ip, Some(0), false))
        .collect();
    vms.push(vm("client", 3, 0, Ipv4Addr::new(10, 1, 0, 20), None, false));
    vms.push(vm("other", 4, 1, Ipv4Addr::new(10, 1, 0, 20), None, false));
    vms.push(vm("prober", 5, 0, lb::probe::DEFAULT_SOURCE, None, true));
    vms.push(vm("gen", 6, 0, GEN_IP, None, false));
    vms.push(vm("sink", 7, 0, SINK_IP, Some(1), false));
    let backends = WEB
        .iter()
        .map(|(_, ip)| Backend {
            ip: IpAddr::V4(*ip),
            port: 8080,
            weight: 1,
        })
        .collect();
    let sinks = SINK_PORTS
        .iter()
        .map(|&port| Backend {
            ip: IpAddr::V4(SINK_IP),
            port,
            weight: 1,
        })
        .collect();
    Topology {
        vnets: vec![vnet("a", 0xbc), vnet("b", 0xbd)],
        vms,
        nsgs: vec![
            NsgSpec {
                name: "web".into(),
                rules: vec![
                    rule("allow-http", 100, "allow", "8080"),
                    rule("deny-ssh", 110, "deny", "22"),
                ],
            },
            NsgSpec {
                name: "sink".into(),
                rules: vec![proto_rule("allow-udp", 100, "allow", "udp", "6000-6002")],
            },
        ],
        vips: vec![
            VipDef {
                vnet: 0,
                config: VipConfig::new("web", IpAddr::V4(VIP), 80, 6, backends),
                // Probed backends start down until their first successful probe.
                health: vec![false; 3],
            },
            VipDef {
                vnet: 0,
                config: VipConfig::new("conns", IpAddr::V4(CONN_VIP), CONN_PORT, 17, sinks),
                health: vec![true; 3],
            },
        ],
        ports: 8,
        uplink: None,
        remotes: Vec::new(),
        neighbours: Vec::new(),
    }
}

struct Demo {
    vms: Vec<Vm>,
    prober: Prober<RingPort<PoolBuf>>,
    policy: Arc<ArcSwap<Policy>>,
    start: Instant,
    changes: Vec<(Duration, HealthChange)>,
}

impl Demo {
    fn vm(&mut self, name: &str) -> Result<&mut Vm, DemoError> {
        self.vms
            .iter_mut()
            .find(|v| v.name == name)
            .ok_or_else(|| DemoError::Setup(format!("no vm {name}")))
    }

    fn idx(&self, name: &str) -> usize {
        self.vms.iter().position(|v| v.name == name).unwrap_or(0)
    }

    /// One round: VMs, prober, and health changes applied to their VIPs.
    fn tick(&mut self) -> Result<(), DemoError> {
        for v in &mut self.vms {
            v.poll();
        }
        let now = self.start.elapsed();
        for c in self.prober.poll(now) {
            self.policy.load().set_health(0, c.vip, c.backend, c.up)?;
            self.changes.push((now, c));
        }
        std::thread::sleep(Duration::from_micros(200));
        Ok(())
    }

    fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Demo) -> bool,
    ) -> Result<bool, DemoError> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.tick()?;
            if done(self) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `n` GETs through the VIP; answers counted per backend.
    fn spread(&mut self, n: usize) -> Result<[usize; 3], DemoError> {
        let c = self.idx("client");
        let gets: Vec<usize> = (0..n).map(|_| self.vms[c].get(VIP, 80, "/")).collect();
        self.run_until(Duration::from_secs(10), |d| {
            gets.iter().all(|&g| d.vms[c].body(g).is_some())
        })?;
        let mut per = [0usize; 3];
        for &g in &gets {
            if let Some(b) = self.vms[c].body(g)
                && let Some(i) = WEB.iter().position(|(n, _)| *n == b)
            {
                per[i] += 1;
            }
        }
        Ok(per)
    }
}

fn spread_line(per: &[usize; 3]) -> String {
    WEB.iter()
        .zip(per)
        .map(|((n, _), c)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A gen -> sink frame carrying a sequence number and a TSC timestamp.
fn udp_frame(seq: u64, ts: u64) -> Vec<u8> {
    let mut payload = [0u8; 18];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    payload[8..16].copy_from_slice(&ts.to_le_bytes());
    let mut f = Vec::with_capacity(60);
    build_udp(&mut f, (SINK_IP, 5000, 6000), &payload);
    f
}

/// Appends a 60-byte Ethernet/IPv4/UDP frame from gen (source port
/// `sport`) to `dst`:`dport` with valid checksums.
fn build_udp(f: &mut Vec<u8>, (dst, sport, dport): (Ipv4Addr, u16, u16), payload: &[u8; 18]) {
    f.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
    f.extend_from_slice(&mac(7).0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + payload.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GEN_IP.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = dataplane::wire::checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    let mut seg = udp.to_vec();
    seg.extend_from_slice(payload);
    let sum = dataplane::wire::checksum::combine(
        dataplane::wire::checksum::pseudo_v4(GEN_IP.octets(), dst.octets(), 17, seg.len() as u16),
        dataplane::wire::checksum::sum(&seg),
    );
    let mut c = !dataplane::wire::checksum::fold(sum);
    if c == 0 {
        c = 0xffff;
    }
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&seg);
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latency (one packet in flight) and rate (bursts) gen -> switch -> sink.
fn measure(
    gen_port: &mut RingPort<PoolBuf>,
    sink: &mut RingPort<PoolBuf>,
    pool: Pool,
    clock: &TscClock,
    total: u64,
) -> (Vec<u64>, f64, u64) {
    let mut rx = Batch::new();
    // Latency: 5000 packets, one at a time.
    let mut lat = Vec::with_capacity(5000);
    for seq in 0..5000u64 {
        let t0 = clock.now();
        let mut b = Batch::new();
        if let Ok(buf) = pool.alloc_copy(&udp_frame(seq, t0)) {
            let _ = b.push(buf);
        }
        gen_port.tx_burst(&mut b);
        let deadline = Instant::now() + Duration::from_millis(50);
        'wait: while Instant::now() < deadline {
            if sink.rx_burst(&mut rx) > 0 {
                let t1 = clock.now();
                for p in rx.drain() {
                    let d = p.data();
                    if d.len() >= 58 {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&d[50..58]);
                        lat.push(clock.ticks_to_ns(t1.wrapping_sub(u64::from_le_bytes(ts))));
                    }
                }
                break 'wait;
            }
        }
    }
    // Rate: `total` packets in bursts of 32, as fast as the switch takes them.
    let template = udp_frame(0, 0);
    let (mut sent, mut got) = (0u64, 0u64);
    let t0 = Instant::now();
    let (mut last_rx, mut moved) = (t0, t0);
    // Stop when everything arrived, or nothing arrived for 200 ms after the
    // last send, or nothing moved for 2 s (what is missing was dropped and
    // is reported as lost).
    while got < sent || sent < total {
        if sent < total {
            let mut b = Batch::new();
            for _ in 0..dataplane::BURST {
                let Some(mut buf) = pool.alloc() else { break };
                if let Ok(room) = buf.append(template.len()) {
                    room.copy_from_slice(&template);
                    let _ = b.push(buf);
                }
            }
            let n = gen_port.tx_burst(&mut b) as u64;
            if n > 0 {
                sent += n;
                moved = Instant::now();
            }
        }
        let n = sink.rx_burst(&mut rx) as u64;
        rx.clear();
        if n > 0 {
            got += n;
            last_rx = Instant::now();
            moved = last_rx;
        } else if (sent >= total && last_rx.elapsed() > Duration::from_millis(200))
            || moved.elapsed() > Duration::from_secs(2)
        {
            break;
        }
    }
    let secs = last_rx.duration_since(t0).as_secs_f64().max(1e-9);
    // (What was never sent, the switch having stopped taking frames, is
    // lost too.)
    (lat, got as f64 / secs / 1e6, total.saturating_sub(got))
}

/// The most new connections the new-connection step opens: one per source
/// port from 1024.
pub const MAX_CONNS: u32 = 65_536 - 1024;

/// The first payload bytes of the new-connection step's frames: what the
/// sink counts (a frame of the rate step still on its way is not one of
/// them).
const CONN_MARK: [u8; 4] = *b"conn";

/// New connections (bursts) gen -> the UDP VIP -> the sink's ports, one
/// frame each from its own source port: returns how many it was to open,
/// the rate (connections a second, from the first send to the last
/// arrival), how many of them did not arrive (or were never sent), and how
/// many arrived at each of [`SINK_PORTS`]. No more are in flight than the
/// sink's ring holds, so none is lost for the demo's own slowness in
/// draining it, and the step waits for every one; a switch that moves none
/// of them for 2 s ends it.
fn conn_rate(
    gen_port: &mut RingPort<PoolBuf>,
    sink: &mut RingPort<PoolBuf>,
    pool: Pool,
    conns: u32,
) -> (usize, f64, u64, [u64; 3]) {
    let mut payload = [0u8; 18];
    payload[..4].copy_from_slice(&CONN_MARK);
    let frames: Vec<Vec<u8>> = (0..conns.min(MAX_CONNS))
        .map(|i| {
            let mut f = Vec::with_capacity(60);
            build_udp(&mut f, (CONN_VIP, (1024 + i) as u16, CONN_PORT), &payload);
            f
        })
        .collect();
    let mut rx = Batch::new();
    // What an earlier step left on its way to the sink.
    let quiet = Instant::now() + Duration::from_millis(50);
    while Instant::now() < quiet {
        sink.rx_burst(&mut rx);
        rx.clear();
    }
    let mut per = [0u64; 3];
    let (mut sent, mut got) = (0usize, 0u64);
    let t0 = Instant::now();
    let (mut last_rx, mut moved) = (t0, t0);
    while got < sent as u64 || sent < frames.len() {
        let in_flight = sent - (got as usize).min(sent);
        if sent < frames.len() && in_flight + dataplane::BURST <= vmsim::VM_RING {
            let mut b = Batch::new();
            for f in frames[sent..].iter().take(dataplane::BURST) {
                match pool.alloc_copy(f) {
                    Ok(buf) => {
                        let _ = b.push(buf);
                    }
                    Err(_) => break,
                }
            }
            let n = gen_port.tx_burst(&mut b);
            if n > 0 {
                sent += n;
                moved = Instant::now();
            }
        }
        loop {
            if sink.rx_burst(&mut rx) == 0 {
                break;
            }
            let before = got;
            for p in rx.drain() {
                // One of this step's, at the UDP destination port the
                // VIP's NAT wrote.
                let d = p.data();
                if d.get(42..46) != Some(&CONN_MARK[..]) {
                    continue;
                }
                got += 1;
                if let Some(port) = d.get(36..38).map(|b| u16::from_be_bytes([b[0], b[1]]))
                    && let Some(i) = SINK_PORTS.iter().position(|&s| s == port)
                {
                    per[i] += 1;
                }
            }
            if got > before {
                last_rx = Instant::now();
                moved = last_rx;
            }
        }
        if moved.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let secs = last_rx.duration_since(t0).as_secs_f64().max(1e-9);
    (
        frames.len(),
        got as f64 / secs,
        (frames.len() as u64).saturating_sub(got),
        per,
    )
}

/// Knobs of a demo run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Packets sent for the rate measurement.
    pub rate_packets: u64,
    /// New connections opened through the UDP VIP (at most [`MAX_CONNS`]).
    pub conns: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rate_packets: 2_000_000,
            conns: MAX_CONNS,
        }
    }
}

/// Runs the demo, writing the report to `out`.
pub fn run(out: &mut impl Write, opts: Options) -> Result<(), DemoError> {
    let w = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let pool = vmsim::pool("demo")?;
    let start = Instant::now();
    let topo = topology();
    let policy = Arc::new(ArcSwap::from_pointee(Policy::compile(&topo, 1)?));
    let mut sw_ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
    let mut vms = Vec::new();
    let mut ends = Vec::new();
    for v in &topo.vms {
        let (end, sw) = vm_port(&v.name, v.mac);
        sw_ports.push(Box::new(sw));
        ends.push(end);
    }
    let mut ends = ends.into_iter();
    for (i, v) in topo.vms.iter().enumerate().take(5) {
        let Some(end) = ends.next() else { break };
        let IpAddr::V4(ip) = v.ips[0] else { continue };
        vms.push(Vm::new(
            &v.name,
            end,
            pool,
            ip,
            GW,
            (i < 3).then_some(8080),
            start,
        )?);
    }
    let mut port = |what: &str| {
        ends.next()
            .ok_or_else(|| DemoError::Setup(format!("no {what} port")))
    };
    let prober_end = port("prober")?;
    let mut gen_port = port("gen")?;
    let mut sink = port("sink")?;
    let cfg = ProberConfig {
        source: lb::probe::DEFAULT_SOURCE,
        prefix_len: 24,
        mac: mac(6).0,
        gateway: Ipv4Addr::new(168, 63, 129, 1),
        seed: 1,
    };
    let mut prober = Prober::new(PortDevice::new(prober_end, pool), &cfg, Duration::ZERO);
    let spec = ProbeSpec {
        kind: ProbeKind::Http {
            path: "/health".into(),
        },
        port: 8080,
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(400),
        threshold: 2,
    };
    for (i, (_, ip)) in WEB.iter().enumerate() {
        prober.add(
            Target {
                vip: (IpAddr::V4(VIP), 80, 6),
                backend: i,
                ip: *ip,
                spec: spec.clone(),
            },
            Duration::ZERO,
        );
    }
    // Tables committed before the first packet, as `pollux run` does by
    // default (`[dataplane] preallocate_tables`), sized for what the demo
    // opens (the new-connection step's, a flow each way) rather than a
    // host's.
    let sw_cfg = SwitchConfig {
        preallocate: true,
        flow_table_size: 1 << 18,
        conn_table_size: 1 << 17,
        ..SwitchConfig::default()
    };
    let switch = Switch::new(policy.clone(), sw_cfg);
    let stats = switch.stats();
    let hits = switch.acl_hits();
    let worker = Worker::new("demo", None, sw_ports, switch);
    let (stop, wstats) = (worker.stop_flag(), worker.stats());
    let handle = worker.spawn()?;
    let mut d = Demo {
        vms,
        prober,
        policy,
        start,
        changes: Vec::new(),
    };

    w(
        out,
        "pollux demo: one switch worker, 8 ring ports, smoltcp VMs".into(),
    );
    w(
        out,
        format!(
            "  vnet a 10.1.0.0/16: web1 {} web2 {} web3 {} (HTTP :8080), client 10.1.0.20",
            WEB[0].1, WEB[1].1, WEB[2].1
        ),
    );
    w(
        out,
        "  vnet b 10.1.0.0/16 (same addresses, other tenant): other 10.1.0.20".into(),
    );
    w(
        out,
        format!(
            "  VIP {VIP}:80 -> web1-3:8080, Maglev 5-tuple; HTTP probe GET /health every 500 ms, threshold 2"
        ),
    );
    w(out, String::new());

    let up = d.run_until(Duration::from_secs(10), |d| {
        (0..3).all(|i| d.prober.health(i).is_some_and(|h| h.up))
    })?;
    w(
        out,
        format!(
            "1. probes: {} (first success brings a DIP up)",
            if up {
                "all three DIPs up"
            } else {
                "NOT all DIPs came up"
            }
        ),
    );

    let per = d.spread(30)?;
    w(
        out,
        format!("2. 30 requests through the VIP: {}", spread_line(&per)),
    );

    // Open connections, then web2's health endpoint starts failing.
    let c = d.idx("client");
    let open: Vec<usize> = (0..12).map(|_| d.vms[c].connect(VIP, 80)).collect();
    d.run_until(Duration::from_secs(5), |d| {
        open.iter()
            .all(|&i| d.vms[c].state(i) == tcp::State::Established)
    })?;
    let w2 = d.idx("web2");
    d.vms[w2].failing = true;
    let t_fail = d.start.elapsed();
    let probes_before = d.prober.health(1).map_or(0, |h| h.probes);
    let gone = d.run_until(Duration::from_secs(10), |d| {
        d.prober.health(1).is_some_and(|h| !h.up)
    })?;
    let probes_after = d.prober.health(1).map_or(0, |h| h.probes);
    let when = d
        .changes
        .iter()
        .rev()
        .find(|(_, ch)| ch.backend == 1 && !ch.up)
        .map(|(t, ch)| (t.saturating_sub(t_fail), ch.reason.clone()));
    match (gone, when) {
        (true, Some((after, reason))) => w(
            out,
            format!(
                "3. web2 /health now answers 500: down after {} failed probes ({} ms), reason \"{reason}\"",
                probes_after - probes_before,
                after.as_millis()
            ),
        ),
        _ => w(out, "3. web2 did NOT go down".into()),
    }
    let per = d.spread(30)?;
    w(out, format!("   30 new requests: {}", spread_line(&per)));
    let req = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n";
    for &i in &open {
        d.vms[c].send(i, req);
    }
    d.run_until(Duration::from_secs(10), |d| {
        open.iter().all(|&i| d.vms[c].body(i).is_some())
    })?;
    let answered: Vec<String> = open.iter().filter_map(|&i| d.vms[c].body(i)).collect();
    let on_web2 = answered.iter().filter(|b| *b == "web2").count();
    w(
        out,
        format!(
            "   12 connections opened before: {} still answered, {on_web2} of them by web2",
            answered.len()
        ),
    );
    d.vm("web2")?.failing = false;

    // ACL.
    let ssh = d.vms[c].connect(WEB[0].1, 22);
    d.run_until(Duration::from_secs(1), |_| false)?;
    let p = d.policy.load_full();
    let deny_hits = p.vms[0]
        .nsg
        .and_then(|g| {
            let r = p
                .nsgs
                .get(g)?
                .inbound
                .rules()
                .iter()
                .position(|r| r.name == "deny-ssh")?;
            Some(hits.load().get(g)?[0].get(r))
        })
        .unwrap_or(0);
    w(
        out,
        format!(
            "4. client -> web1:22: {} (acl_deny drops {}, rule \"deny-ssh\" hits {deny_hits})",
            if d.vms[c].state(ssh) == tcp::State::SynSent {
                "blocked"
            } else {
                "NOT blocked"
            },
            stats.dropped(SwitchDrop::AclDeny)
        ),
    );

    // Isolation.
    let o = d.idx("other");
    let a = d.vms[o].get(VIP, 80, "/");
    let b = d.vms[o].get(WEB[0].1, 8080, "/");
    d.run_until(Duration::from_secs(1), |_| false)?;
    let reached = d.vms[o].body(a).is_some() || d.vms[o].body(b).is_some();
    w(
        out,
        format!(
            "5. vnet b -> VIP and -> 10.1.0.4: {} (no_route drops {})",
            if reached {
                "REACHED (isolation broken)"
            } else {
                "unreachable"
            },
            stats.dropped(SwitchDrop::NoRoute)
        ),
    );

    // Latency and rate.
    let clock = TscClock::calibrate(Duration::from_millis(20));
    let (mut lat, mpps, lost) = measure(&mut gen_port, &mut sink, pool, &clock, opts.rate_packets);
    lat.sort_unstable();
    w(
        out,
        format!(
            "6. through the switch, 64-byte UDP: latency p50 {:.1} us, p99 {:.1} us ({} samples); rate {:.2} Mpps ({} lost)",
            percentile(&lat, 0.5) as f64 / 1000.0,
            percentile(&lat, 0.99) as f64 / 1000.0,
            lat.len(),
            mpps,
            lost
        ),
    );
    w(
        out,
        "   (both ends and the switch share this 2-core machine; see docs/performance.md for benches)".into(),
    );
    let slow = stats.slow_path.load(Ordering::Relaxed);
    let fast = stats.fast_path.load(Ordering::Relaxed);
    w(
        out,
        format!(
            "   flow table: {fast} fast-path packets, {slow} slow-path; worker busy polls {}",
            wstats.busy_polls.load(Ordering::Relaxed)
        ),
    );
    w(out, format!("   drops by reason: {:?}", stats.nonzero()));

    // New connections.
    let slow_before = stats.slow_path.load(Ordering::Relaxed);
    let (n, rate, lost, per) = conn_rate(&mut gen_port, &mut sink, pool, opts.conns);
    let slow = stats
        .slow_path
        .load(Ordering::Relaxed)
        .saturating_sub(slow_before);
    w(
        out,
        format!(
            "7. {n} new connections, gen -> UDP VIP {CONN_VIP}:{CONN_PORT} -> sink:6000-6002 (a source port each): {:.2} M/s ({lost} lost)",
            rate / 1e6
        ),
    );
    w(
        out,
        format!(
            "   each decided on the slow path ({slow} packets there) and load-balanced: sink port 6000 {}, 6001 {}, 6002 {}",
            per[0], per[1], per[2]
        ),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = handle.join();
    Ok(())
}
