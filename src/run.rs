//! `pollux run --config FILE`: the switch on the configured ports until
//! SIGINT or SIGTERM.
//!
//! The switch runs on one pinned-if-possible worker thread; health probes run
//! on this (the control) thread, never on the polling core: one prober per
//! vnet with probed VIPs, on an internal switch port of that vnet (source
//! 168.63.129.16, as Azure), so probes take the tenant path. Each health
//! change is published as a new policy generation and logged on stderr.
//!
//! Drivers available to `run` today: `af_packet` (a kernel interface),
//! `pcap` (replay a capture into the switch, record what it sends) and `ring`
//! (an unconnected in-memory port); `dpdk` ports and several workers are
//! refused with a clear message until their issues land.
//!
//! At stop (SIGINT/SIGTERM) it prints a report: packets, per-port counters,
//! each probed backend's state and why, every security-group rule that
//! matched with its hit count, and drops by reason.

use crate::config::{Config, ProbeCfg};
use arc_swap::ArcSwap;
use dataplane::pool::{Pool, PoolBuf, PoolConfig};
use dataplane::port::af_packet::AfPacketPort;
use dataplane::port::pcap::PcapPort;
use dataplane::port::ring::{self, RingPort};
use dataplane::worker::Worker;
use dataplane::{LinkInfo, MacAddr, Port};
use lb::probe::device::PortDevice;
use lb::probe::{ProbeKind, ProbeSpec, Prober, ProberConfig, Target};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vswitch::{Policy, Switch, SwitchConfig, Topology, VmDef};

/// The prober's gateway: inside its /24 (smoltcp takes ARP answers only from
/// its own subnet); the switch answers ARP for any address on internal ports.
const PROBE_GATEWAY: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 1);

/// The probe settings of a `[vip.probe]`, defaults applied.
pub fn probe_spec(p: &ProbeCfg) -> ProbeSpec {
    let interval = Duration::from_millis(p.interval_ms.unwrap_or(5000));
    let timeout = p
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(interval.min(Duration::from_secs(30)));
    ProbeSpec {
        kind: match p.kind.as_str() {
            "tcp" => ProbeKind::Tcp,
            _ => ProbeKind::Http {
                path: p.path.clone().unwrap_or_else(|| "/".into()),
            },
        },
        port: p.port,
        interval,
        timeout,
        threshold: p.threshold.unwrap_or(2),
    }
}

/// One vnet's prober and what its targets are called in logs.
struct VnetProber {
    vnet: usize,
    prober: Prober<RingPort<PoolBuf>>,
    /// `vip "name" backend ip:port` per target.
    names: Vec<String>,
}

/// The switch ends of the probers' internal ports.
type ProbePorts = Vec<RingPort<PoolBuf>>;

/// Adds one internal prober port per vnet with probed VIPs to `topo`; marks
/// probed backends down until their first success. Returns the probers and
/// the switch ends of their ports (numbered after the configured ports).
fn probers(
    cfg: &Config,
    topo: &mut Topology,
    pool: Pool,
) -> Result<(Vec<VnetProber>, ProbePorts), Vec<String>> {
    let mut out: Vec<VnetProber> = Vec::new();
    let mut ends = Vec::new();
    let mut problems = Vec::new();
    for (vip_cfg, vip) in cfg.vip.iter().zip(topo.vips.iter_mut()) {
        let Some(p) = &vip_cfg.probe else { continue };
        let c = &vip.config;
        let k = match out.iter().position(|v| v.vnet == vip.vnet) {
            Some(k) => k,
            None => {
                let k = out.len();
                let port = topo.ports + k as u16;
                let mac = MacAddr([0x02, 0x50, 0x4c, 0x58, 0xfe, k as u8]);
                let (sw, end) = ring::pair(
                    LinkInfo::new(&format!("probe{k}"), mac, "ring"),
                    LinkInfo::new(&format!("probe{k}"), mac, "ring"),
                    1024,
                );
                topo.vms.push(VmDef {
                    name: format!("prober:{}", vip_cfg.vnet),
                    port,
                    vnet: vip.vnet,
                    mac,
                    ips: vec![IpAddr::V4(lb::probe::DEFAULT_SOURCE)],
                    nsg: None,
                    internal: true,
                });
                let pc = ProberConfig {
                    source: lb::probe::DEFAULT_SOURCE,
                    prefix_len: 24,
                    mac: mac.0,
                    gateway: PROBE_GATEWAY,
                    seed: k as u64 + 1,
                };
                out.push(VnetProber {
                    vnet: vip.vnet,
                    prober: Prober::new(PortDevice::new(end, pool), &pc, Duration::ZERO),
                    names: Vec::new(),
                });
                ends.push(sw);
                k
            }
        };
        let spec = probe_spec(p);
        vip.health = vec![false; c.backends.len()];
        for (i, b) in c.backends.iter().enumerate() {
            let IpAddr::V4(ip) = b.ip else {
                problems.push(format!(
                    "vip {:?}: backend {} is IPv6; probes reach IPv4 backends only so far",
                    c.name, b.ip
                ));
                continue;
            };
            if let Some(v) = out.get_mut(k) {
                v.prober.add(
                    Target {
                        vip: (c.addr, c.port, c.proto),
                        backend: i,
                        ip,
                        spec: spec.clone(),
                    },
                    Duration::ZERO,
                );
                v.names
                    .push(format!("vip {:?} backend {}:{}", c.name, b.ip, b.port));
            }
        }
    }
    topo.ports += out.len() as u16;
    if problems.is_empty() {
        Ok((out, ends))
    } else {
        Err(problems)
    }
}

/// Runs the switch; returns the report lines printed at stop, or the problems.
pub fn run(cfg: &Config) -> Result<Vec<String>, Vec<String>> {
    let mut topo = cfg.topology()?;
    let mut problems = Vec::new();
    if cfg.dataplane.workers > 1 {
        problems.push(format!(
            "dataplane: workers = {}: `pollux run` starts one worker so far",
            cfg.dataplane.workers
        ));
    }
    for p in &cfg.port {
        if !matches!(p.driver.as_str(), "pcap" | "ring" | "af_packet") {
            problems.push(format!(
                "port {:?}: driver {:?} is not available to `pollux run` yet (pcap, ring and af_packet are)",
                p.name, p.driver
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let pool = Pool::new(&PoolConfig::new("run", 65536)).map_err(|e| vec![e.to_string()])?;
    let mut ports: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
    let mut idle_peers = Vec::new();
    for (i, p) in cfg.port.iter().enumerate() {
        let mac = MacAddr([0x02, 0x50, 0x4c, 0x58, (i >> 8) as u8, i as u8]);
        if p.driver == "pcap" {
            let port = PcapPort::open(
                &p.name,
                mac,
                p.rx_pcap.as_deref(),
                p.tx_pcap.as_deref(),
                pool,
            )
            .map_err(|e| vec![e.to_string()])?;
            ports.push(Box::new(port));
        } else if p.driver == "af_packet" {
            let iface = p.iface.as_deref().unwrap_or_default();
            let port = AfPacketPort::open(&p.name, iface, pool).map_err(|e| vec![e.to_string()])?;
            ports.push(Box::new(port));
        } else {
            let (sw, peer) = ring::pair(
                LinkInfo::new(&p.name, mac, "ring"),
                LinkInfo::new(&p.name, mac, "ring"),
                1024,
            );
            ports.push(Box::new(sw));
            idle_peers.push(peer);
        }
    }
    let (mut probers, probe_ports) = probers(cfg, &mut topo, pool)?;
    for p in probe_ports {
        ports.push(Box::new(p));
    }
    let policy = Policy::compile(&topo, 1).map_err(|e| e.0)?;
    let swap = Arc::new(ArcSwap::from_pointee(policy));
    let sw_cfg = SwitchConfig {
        flow_table_size: cfg.dataplane.flow_table_size,
        ..SwitchConfig::default()
    };
    let switch = Switch::new(swap.clone(), sw_cfg);
    let stats = switch.stats();
    let acl_hits = switch.acl_hits();
    let port_stats: Vec<_> = ports
        .iter()
        .map(|p| (p.info().name.clone(), p.stats().clone()))
        .collect();
    let worker = Worker::new("worker0", None, ports, switch);
    let stop = worker.stop_flag();
    let wstats = worker.stats();
    let signalled = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, signalled.clone())
            .map_err(|e| vec![format!("cannot handle signal {sig}: {e}")])?;
    }
    let handle = worker.spawn().map_err(|e| vec![e.to_string()])?;
    eprintln!(
        "pollux: switch running on {} ports, {} probed backends (SIGINT or SIGTERM stops)",
        cfg.port.len(),
        probers.iter().map(|p| p.names.len()).sum::<usize>()
    );
    control_loop(&signalled, &stop, &mut probers, &swap);
    stop.store(true, Ordering::Relaxed);
    // The worker flushes and closes its ports when it returns.
    match handle.join() {
        Ok(Ok(stopped)) => drop(stopped),
        Ok(Err(e)) => return Err(vec![e.to_string()]),
        Err(_) => return Err(vec!["worker thread panicked".into()]),
    }
    drop(idle_peers);
    let mut report = vec![format!(
        "stopped: {} packets received, {} sent; {} fast path, {} slow path",
        wstats.rx_packets.load(Ordering::Relaxed),
        wstats.tx_packets.load(Ordering::Relaxed),
        stats.fast_path.load(Ordering::Relaxed),
        stats.slow_path.load(Ordering::Relaxed)
    )];
    for (name, s) in port_stats {
        let s = s.snapshot();
        report.push(format!(
            "port {name:?}: rx {} tx {} drops {}",
            s.rx_packets, s.tx_packets, s.drops
        ));
    }
    for p in &probers {
        for (i, name) in p.names.iter().enumerate() {
            if let Some(h) = p.prober.health(i) {
                report.push(format!(
                    "{name}: {} after {} probes ({})",
                    if h.up { "up" } else { "down" },
                    h.probes,
                    h.reason()
                ));
            }
        }
    }
    let (hits, policy) = (acl_hits.load(), swap.load());
    for (n, h) in policy.nsgs.iter().zip(hits.iter()) {
        for (dir, counters) in [
            (filter::Direction::In, &h[0]),
            (filter::Direction::Out, &h[1]),
        ] {
            for (i, r) in n.classifier(dir).rules().iter().enumerate() {
                let c = counters.get(i);
                if c > 0 {
                    report.push(format!(
                        "nsg {:?} {dir} rule {:?} (priority {}, {}): {c} hits",
                        n.name, r.name, r.priority, r.action
                    ));
                }
            }
        }
    }
    report.push(format!("switch drops: {:?}", stats.nonzero()));
    report.push(format!("malformed: {:?}", wstats.drops.nonzero()));
    Ok(report)
}

/// Polls the probers and publishes their health changes until a signal.
fn control_loop(
    signalled: &AtomicBool,
    stop: &AtomicBool,
    probers: &mut [VnetProber],
    policy: &ArcSwap<Policy>,
) {
    let start = Instant::now();
    while !signalled.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
        let now = start.elapsed();
        let mut next = now + Duration::from_millis(50);
        for p in probers.iter_mut() {
            for c in p.prober.poll(now) {
                let name = p.names.get(c.target).map_or("?", |s| s.as_str());
                let cur = policy.load();
                match cur.with_health(p.vnet, c.vip, c.backend, c.up, cur.generation + 1) {
                    Ok(next_policy) => {
                        eprintln!(
                            "pollux: {name} {} ({}); policy generation {}",
                            if c.up { "up" } else { "down" },
                            c.reason,
                            next_policy.generation
                        );
                        policy.store(Arc::new(next_policy));
                    }
                    Err(e) => eprintln!("pollux: {name}: health change not applied: {e}"),
                }
            }
            next = next.min(p.prober.poll_at(now));
        }
        // Sleep until the next probe is due, at most 50 ms (signals are
        // noticed within that), at least 1 ms (packets of probes in flight).
        let wait = next.saturating_sub(start.elapsed());
        std::thread::sleep(wait.clamp(Duration::from_millis(1), Duration::from_millis(50)));
    }
}
