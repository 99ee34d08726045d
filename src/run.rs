//! `pollux run --config FILE`: the switch on the configured ports until
//! SIGINT or SIGTERM.
//!
//! Today the drivers available to `run` are `pcap` (replay a capture into
//! the switch, record what it sends) and `ring` (an unconnected in-memory
//! port). `af_packet` and `dpdk` ports, several workers and health probes are
//! refused with a clear message until their issues land.

use crate::config::Config;
use arc_swap::ArcSwap;
use dataplane::pool::{Pool, PoolConfig};
use dataplane::port::pcap::PcapPort;
use dataplane::port::ring;
use dataplane::worker::Worker;
use dataplane::{LinkInfo, MacAddr, Port};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vswitch::{Policy, Switch, SwitchConfig};

/// Runs the switch; returns the report lines printed at stop, or the problems.
pub fn run(cfg: &Config) -> Result<Vec<String>, Vec<String>> {
    let topo = cfg.topology()?;
    let mut problems = Vec::new();
    if cfg.dataplane.workers > 1 {
        problems.push(format!(
            "dataplane: workers = {}: `pollux run` starts one worker so far",
            cfg.dataplane.workers
        ));
    }
    for v in &cfg.vip {
        if v.probe.is_some() {
            problems.push(format!(
                "vip {:?}: probes are not started by `pollux run` yet (remove [vip.probe] to treat backends as healthy)",
                v.name
            ));
        }
    }
    for p in &cfg.port {
        if !matches!(p.driver.as_str(), "pcap" | "ring") {
            problems.push(format!(
                "port {:?}: driver {:?} is not available to `pollux run` yet (pcap and ring are)",
                p.name, p.driver
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let pool = Pool::new(&PoolConfig::new("run", 65536)).map_err(|e| vec![e.to_string()])?;
    let mut ports: Vec<Box<dyn Port<Buf = dataplane::pool::PoolBuf>>> = Vec::new();
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
    let policy = Policy::compile(&topo, 1).map_err(|e| e.0)?;
    let swap = Arc::new(ArcSwap::from_pointee(policy));
    let sw_cfg = SwitchConfig {
        flow_table_size: cfg.dataplane.flow_table_size,
        ..SwitchConfig::default()
    };
    let switch = Switch::new(swap, sw_cfg);
    let stats = switch.stats();
    let port_stats: Vec<_> = ports
        .iter()
        .map(|p| (p.info().name.clone(), p.stats().clone()))
        .collect();
    let worker = Worker::new("worker0", None, ports, switch);
    let stop = worker.stop_flag();
    let wstats = worker.stats();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| vec![format!("cannot handle signal {sig}: {e}")])?;
    }
    let handle = worker.spawn().map_err(|e| vec![e.to_string()])?;
    eprintln!(
        "pollux: switch running on {} ports (SIGINT or SIGTERM stops)",
        cfg.port.len()
    );
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
    report.push(format!("switch drops: {:?}", stats.nonzero()));
    report.push(format!("malformed: {:?}", wstats.drops.nonzero()));
    Ok(report)
}
