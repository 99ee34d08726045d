//! `pollux pktgen`: the traffic generator and latency meter's front end.
//!
//! Opens the ports named on the command line (`ring:NAME` of an in-process
//! switch started from `--config`, `af_packet:IFACE`, `pcap:FILE`,
//! `dpdk:DEVARGS`), builds the traffic, and runs one of:
//! - a single trial at a rate (packets/s, or a percentage of the maximum
//!   found by a first unpaced trial);
//! - `--search`: RFC 2544-style binary searches for the no-drop rate (NDR)
//!   and the partial-drop rate (PDR, loss at most `--pdr-loss`), then
//!   latency trials at 10%, 50% and 90% of the NDR, as FD.io CSIT does;
//! - `--calibrate`: the same maximum and latency trials back to back (an
//!   in-process ring pair, or two ports the user connected), so the
//!   generator's own latency can be subtracted.
//!
//! The engine is `dataplane::pktgen`; this module only wires ports, runs
//! trials and prints a table or JSON.

use crate::config::Config;
use crate::run::InProcess;
use dataplane::clock::TscClock;
use dataplane::pktgen::{Pair, Proto, Template, TrafficSpec, TrialConfig, TrialResult};
use dataplane::pool::{Pool, PoolBuf, PoolConfig};
use dataplane::port::ring;
use dataplane::port::spec::{self, PortSpec};
use dataplane::{BufAlloc, LinkInfo, MacAddr, Port};
use serde::Serialize;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// Why `pollux pktgen` could not measure.
#[derive(Debug, thiserror::Error)]
pub enum PktgenError {
    /// The options do not describe a measurement (named in the message).
    #[error("{0}")]
    Usage(String),
    /// The configuration of `--config` cannot be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The in-process switch failed.
    #[error(transparent)]
    Switch(#[from] crate::run::RunError),
    /// A port could not be opened.
    #[error(transparent)]
    Port(#[from] dataplane::port::PortError),
    /// The buffer pool could not be made.
    #[error("buffer pool: {0}")]
    Pool(#[from] dataplane::pool::PoolError),
    /// The traffic cannot be built.
    #[error(transparent)]
    Traffic(#[from] dataplane::pktgen::frame::SpecError),
    /// A trial failed.
    #[error(transparent)]
    Trial(#[from] dataplane::pktgen::TrialError),
    /// DPDK could not be set up.
    #[cfg(feature = "dpdk")]
    #[error(transparent)]
    Dpdk(#[from] dataplane::port::dpdk::DpdkError),
    /// `dpdk:` ports in a build without DPDK.
    #[error("dpdk ports need pollux built with the dpdk feature (cargo build --features dpdk)")]
    NoDpdk,
}

fn usage(msg: impl Into<String>) -> PktgenError {
    PktgenError::Usage(msg.into())
}

/// A rate: packets per second, or a fraction of the found maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Packets per second.
    Pps(f64),
    /// A fraction (0, 1] of the maximum an unpaced trial reaches.
    OfMax(f64),
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `250000`, `250k`, `1.5M`, `2Mpps`, `300kpps`, or `50%`.
    fn from_str(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let bad = || {
            format!(
                "rate {s:?}: use packets/s (250000, 250k, 1.5M, 2Mpps) or a percentage of the maximum (50%)"
            )
        };
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!(
                    "rate {s:?}: a percentage must be above 0 and at most 100"
                ));
            }
            return Ok(Rate::OfMax(v / 100.0));
        }
        let t = t.strip_suffix("pps").unwrap_or(t);
        let (num, mult) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 1e3),
            Some((i, 'm' | 'M')) => (&t[..i], 1e6),
            Some((i, 'g' | 'G')) => (&t[..i], 1e9),
            _ => (t, 1.0),
        };
        let v: f64 = num.trim().parse().map_err(|_| bad())?;
        if !(v * mult >= 1.0 && (v * mult).is_finite()) {
            return Err(format!("rate {s:?}: must be at least 1 packet/s"));
        }
        Ok(Rate::Pps(v * mult))
    }
}

/// Everything `pollux pktgen` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Transmit port spec.
    pub tx: Option<String>,
    /// Receive port spec (default: the transmit port).
    pub rx: Option<String>,
    /// Start pollux in this process on this configuration (ring ports).
    pub config: Option<PathBuf>,
    /// Frame size, FCS included.
    pub size: usize,
    /// Number of flows.
    pub flows: u32,
    /// UDP or TCP SYN.
    pub proto: Proto,
    /// Rate of a single trial (default: unpaced).
    pub rate: Option<Rate>,
    /// Measured seconds per trial.
    pub duration: f64,
    /// Warm-up seconds before each trial.
    pub warmup: f64,
    /// Addresses (defaults from the configuration or the ports).
    pub src_mac: Option<MacAddr>,
    /// Destination MAC.
    pub dst_mac: Option<MacAddr>,
    /// Source address.
    pub src_ip: Option<Ipv4Addr>,
    /// Consecutive source addresses from `src_ip` (flow `i` from the
    /// `i % src_ips`-th).
    pub src_ips: u32,
    /// Destination address.
    pub dst_ip: Option<Ipv4Addr>,
    /// First source port.
    pub sport: u16,
    /// First destination port.
    pub dport: u16,
    /// Search the NDR/PDR and measure latency at 10/50/90% of the NDR.
    pub search: bool,
    /// Loss ratio the PDR allows.
    pub pdr_loss: f64,
    /// Measure the generator back to back.
    pub calibrate: bool,
    /// EAL arguments for dpdk ports.
    pub eal: Option<String>,
    /// Largest transmit burst.
    pub burst: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tx: None,
            rx: None,
            config: None,
            size: 64,
            flows: 1,
            proto: Proto::Udp,
            rate: None,
            duration: 2.0,
            warmup: 0.5,
            src_mac: None,
            dst_mac: None,
            src_ip: None,
            src_ips: 1,
            dst_ip: None,
            sport: 1024,
            dport: 5000,
            search: false,
            pdr_loss: 0.005,
            calibrate: false,
            eal: None,
            burst: dataplane::BURST,
        }
    }
}

/// A trial as reported.
#[derive(Debug, Clone, Serialize)]
pub struct TrialReport {
    /// What the trial was for (`max`, `rate`, `ndr?`, `latency@50%`...).
    pub label: String,
    /// Requested packets/s (absent: unpaced).
    pub offered_pps: Option<f64>,
    /// Measured transmit rate, packets/s.
    pub tx_pps: f64,
    /// Distinct packets received per second.
    pub rx_pps: f64,
    /// Measured packets sent.
    pub tx: u64,
    /// Of those refused by the transmit port (queue full; counted as lost).
    pub tx_refused: u64,
    /// Not built for want of a buffer.
    pub tx_no_buffer: u64,
    /// Distinct measured packets received.
    pub rx: u64,
    /// Sent and never received.
    pub lost: u64,
    /// lost / tx.
    pub loss_ratio: f64,
    /// Arrived after a later packet of their flow.
    pub reordered: u64,
    /// Received more than once.
    pub duplicates: u64,
    /// Received frames without a signature.
    pub foreign: u64,
    /// Latency percentiles in microseconds.
    pub latency_us: LatencyUs,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyUs {
    /// Samples.
    pub samples: u64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p99_9: f64,
    /// 99.99th.
    pub p99_99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl TrialReport {
    fn new(label: &str, r: &TrialResult) -> TrialReport {
        let l = r.latency;
        let us = |ns: u64| ns as f64 / 1000.0;
        TrialReport {
            label: label.to_string(),
            offered_pps: r.offered_pps,
            tx_pps: r.tx_pps(),
            rx_pps: r.rx_pps(),
            tx: r.tx,
            tx_refused: r.tx_refused,
            tx_no_buffer: r.tx_no_buffer,
            rx: r.rx.unique(),
            lost: r.lost(),
            loss_ratio: r.loss_ratio(),
            reordered: r.rx.reordered,
            duplicates: r.rx.duplicates,
            foreign: r.rx.foreign,
            latency_us: LatencyUs {
                samples: l.count,
                min: us(l.min),
                p50: us(l.p50),
                p90: us(l.p90),
                p99: us(l.p99),
                p99_9: us(l.p999),
                p99_99: us(l.p9999),
                max: us(l.max),
                mean: l.mean / 1000.0,
            },
        }
    }
}

/// The whole run as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `trial`, `search` or `calibrate`.
    pub mode: String,
    /// Transmit and receive ports.
    pub tx_port: String,
    /// Receive port.
    pub rx_port: String,
    /// Frame size, FCS included.
    pub frame_size: usize,
    /// `udp` or `tcp-syn`.
    pub proto: String,
    /// Flows.
    pub flows: u32,
    /// TSC ticks per second the timestamps were taken with.
    pub tsc_hz: u64,
    /// No-drop rate found (`--search`), packets/s.
    pub ndr_pps: Option<f64>,
    /// Partial-drop rate found (`--search`), packets/s.
    pub pdr_pps: Option<f64>,
    /// Loss ratio the PDR allows.
    pub pdr_loss: Option<f64>,
    /// True when the NDR equals the generator's own maximum (the device
    /// under test was not the limit).
    pub generator_bound: bool,
    /// Every trial, in order.
    pub trials: Vec<TrialReport>,
    /// The in-process switch's stop report (`--config`).
    pub switch: Option<crate::run::RunReport>,
}

/// Runs trials on one pair of ports (or one port both ways).
struct Bench<'a, T: Port, R: Port<Buf = T::Buf>, A: BufAlloc<Buf = T::Buf>> {
    tx: T,
    rx: Option<R>,
    alloc: A,
    tpl: &'a Template,
    clock: &'a TscClock,
    base: TrialConfig,
    trials: Vec<TrialReport>,
}

impl<T: Port, R: Port<Buf = T::Buf>, A: BufAlloc<Buf = T::Buf>> Bench<'_, T, R, A> {
    fn trial(&mut self, label: &str, rate: Option<f64>) -> Result<TrialResult, PktgenError> {
        let cfg = TrialConfig {
            rate,
            ..self.base.clone()
        };
        let r = match self.rx.as_mut() {
            Some(rx) => dataplane::pktgen::trial(
                &mut Pair(&mut self.tx, rx),
                self.alloc,
                self.tpl,
                self.clock,
                &cfg,
            ),
            None => dataplane::pktgen::trial(
                &mut dataplane::pktgen::Duplex(&mut self.tx),
                self.alloc,
                self.tpl,
                self.clock,
                &cfg,
            ),
        }?;
        let rep = TrialReport::new(label, &r);
        eprintln!("pktgen: {}", row(&rep));
        self.trials.push(rep);
        Ok(r)
    }

    /// Binary search for the highest rate whose loss is at most `loss`,
    /// between `lo` (known good, may be 0) and `hi`; to 1% of `hi` or 12
    /// trials.
    fn search(
        &mut self,
        what: &str,
        loss: f64,
        mut lo: f64,
        mut hi: f64,
    ) -> Result<f64, PktgenError> {
        for _ in 0..12 {
            if hi - lo <= hi * 0.01 {
                break;
            }
            let mid = (lo + hi) / 2.0;
            let r = self.trial(&format!("{what}?"), Some(mid))?;
            if r.loss_ratio() <= loss && r.tx > 0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Latency trials at 10%, 50% and 90% of `rate`.
    fn latencies(&mut self, of: &str, rate: f64) -> Result<(), PktgenError> {
        for pct in [10u32, 50, 90] {
            let r = rate * f64::from(pct) / 100.0;
            if r >= 1.0 {
                self.trial(&format!("latency@{pct}%{of}"), Some(r))?;
            }
        }
        Ok(())
    }

    fn run(&mut self, opts: &Options, report: &mut Report) -> Result<(), PktgenError> {
        if opts.search {
            let max = self.trial("max", None)?;
            let top = max.tx_pps();
            let (ndr, bound) = if max.lost() == 0 {
                (top, true)
            } else {
                (self.search("ndr", 0.0, 0.0, top)?, false)
            };
            let pdr = if max.loss_ratio() <= opts.pdr_loss {
                top
            } else {
                self.search("pdr", opts.pdr_loss, ndr, top)?
            };
            report.ndr_pps = Some(ndr);
            report.pdr_pps = Some(pdr);
            report.pdr_loss = Some(opts.pdr_loss);
            report.generator_bound = bound;
            self.latencies(" ndr", ndr)?;
        } else if opts.calibrate {
            let max = self.trial("max", None)?;
            self.latencies(" max", max.tx_pps())?;
        } else {
            match opts.rate {
                None => {
                    self.trial("max", None)?;
                }
                Some(Rate::Pps(p)) => {
                    self.trial("rate", Some(p))?;
                }
                Some(Rate::OfMax(f)) => {
                    let max = self.trial("max", None)?;
                    self.trial(&format!("{:.0}% of max", f * 100.0), Some(max.rx_pps() * f))?;
                }
            }
        }
        report.trials = std::mem::take(&mut self.trials);
        Ok(())
    }
}

/// One line per trial for the progress log and the table.
fn row(t: &TrialReport) -> String {
    let l = &t.latency_us;
    format!(
        "{:<16} {:>10} {:>9.3} {:>9.3} {:>10} {:>8.4} {:>7} {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2}",
        t.label,
        t.offered_pps
            .map_or("max".to_string(), |p| format!("{:.3}M", p / 1e6)),
        t.tx_pps / 1e6,
        t.rx_pps / 1e6,
        t.lost,
        t.loss_ratio * 100.0,
        t.reordered,
        t.duplicates,
        l.p50,
        l.p90,
        l.p99,
        l.p99_9,
        l.p99_99,
        l.max
    )
}

/// The readable report.
pub fn table(r: &Report) -> Vec<String> {
    let mut out = vec![format!(
        "pollux pktgen {}: {} -> {}, {}-byte {}, {} flow(s), TSC {:.3} GHz",
        r.mode,
        r.tx_port,
        r.rx_port,
        r.frame_size,
        r.proto,
        r.flows,
        r.tsc_hz as f64 / 1e9
    )];
    out.push(format!(
        "{:<16} {:>10} {:>9} {:>9} {:>10} {:>8} {:>7} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "trial",
        "offered",
        "tx Mpps",
        "rx Mpps",
        "lost",
        "loss %",
        "reord",
        "dup",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9",
        "p99.99",
        "max us"
    ));
    out.extend(r.trials.iter().map(row));
    if let (Some(ndr), Some(pdr)) = (r.ndr_pps, r.pdr_pps) {
        out.push(format!(
            "NDR {:.3} Mpps{}; PDR (loss <= {}%) {:.3} Mpps",
            ndr / 1e6,
            if r.generator_bound {
                " (no loss at the generator's maximum: the generator was the limit)"
            } else {
                ""
            },
            r.pdr_loss.unwrap_or(0.0) * 100.0,
            pdr / 1e6
        ));
    }
    if let Some(sw) = &r.switch {
        out.extend(sw.lines().iter().map(|l| format!("switch: {l}")));
    }
    out
}

/// Where a port spec points.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Spec {
    Ring(String),
    AfPacket(String),
    Pcap(String),
    Dpdk(String),
}

fn parse_spec(s: &str) -> Result<Spec, PktgenError> {
    let (kind, arg) = s.split_once(':').ok_or_else(|| {
        usage(format!(
            "port {s:?}: use ring:NAME, af_packet:IFACE, pcap:FILE or dpdk:DEVARGS"
        ))
    })?;
    if arg.is_empty() {
        return Err(usage(format!("port {s:?}: nothing after \"{kind}:\"")));
    }
    Ok(match kind {
        "ring" => Spec::Ring(arg.into()),
        "af_packet" => Spec::AfPacket(arg.into()),
        "pcap" => Spec::Pcap(arg.into()),
        "dpdk" => Spec::Dpdk(arg.into()),
        _ => {
            return Err(usage(format!(
                "port {s:?}: unknown kind {kind:?} (ring, af_packet, pcap, dpdk)"
            )));
        }
    })
}

/// The traffic for `opts`, with defaults from the in-process configuration
/// (the VMs on the tx and rx ports and their vnet's gateway) or the ports.
fn traffic(
    opts: &Options,
    cfg: Option<(&Config, &str, &str)>,
    tx_mac: MacAddr,
    rx_mac: MacAddr,
) -> Result<TrafficSpec, PktgenError> {
    let vm_on = |c: &Config, port: &str| c.vm.iter().find(|v| v.port == port).cloned();
    let first_v4 = |ips: &[String]| {
        ips.iter()
            .find_map(|i| i.split('/').next().and_then(|a| a.parse::<Ipv4Addr>().ok()))
    };
    let (mut src_mac, mut dst_mac, mut src_ip, mut dst_ip) = (
        tx_mac,
        rx_mac,
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 2),
    );
    if let Some((c, txp, rxp)) = cfg {
        let g = vm_on(c, txp)
            .ok_or_else(|| usage(format!("port {txp:?}: no VM of the configuration is on it")))?;
        src_mac = g
            .mac
            .parse()
            .map_err(|e| usage(format!("vm {:?}: mac: {e}", g.name)))?;
        src_ip = first_v4(&g.ips)
            .ok_or_else(|| usage(format!("vm {:?}: no IPv4 address to send from", g.name)))?;
        let vnet =
            c.vnet.iter().find(|v| v.name == g.vnet).ok_or_else(|| {
                usage(format!("vm {:?}: vnet {:?} is not defined", g.name, g.vnet))
            })?;
        dst_mac = vnet
            .gateway_mac
            .parse()
            .map_err(|e| usage(format!("vnet {:?}: gateway_mac: {e}", vnet.name)))?;
        if let Some(s) = vm_on(c, rxp).and_then(|v| first_v4(&v.ips)) {
            dst_ip = s;
        }
    }
    Ok(TrafficSpec {
        src_mac: opts.src_mac.unwrap_or(src_mac),
        dst_mac: opts.dst_mac.unwrap_or(dst_mac),
        src_ip: opts.src_ip.unwrap_or(src_ip),
        src_ips: opts.src_ips,
        dst_ip: opts.dst_ip.unwrap_or(dst_ip),
        proto: opts.proto,
        frame_size: opts.size,
        flows: opts.flows,
        sport: opts.sport,
        dport: opts.dport,
    })
}

fn trial_config(opts: &Options) -> Result<TrialConfig, PktgenError> {
    let secs = |what: &str, v: f64| {
        if v.is_finite() && (0.0..=3600.0).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(usage(format!("{what} {v}: must be 0 to 3600 seconds")))
        }
    };
    let duration = secs("duration", opts.duration)?;
    if duration.is_zero() {
        return Err(usage("duration 0: a trial must last some time"));
    }
    if !(0.0..1.0).contains(&opts.pdr_loss) {
        return Err(usage(format!(
            "pdr-loss {}: must be at least 0 and below 1",
            opts.pdr_loss
        )));
    }
    if opts.burst == 0 || opts.burst > dataplane::BURST {
        return Err(usage(format!(
            "burst {}: must be 1 to {}",
            opts.burst,
            dataplane::BURST
        )));
    }
    Ok(TrialConfig {
        rate: None,
        duration,
        warmup: secs("warmup", opts.warmup)?,
        drain: Duration::from_millis(200),
        burst: opts.burst,
    })
}

/// Pins this thread to a core the switch's workers do not use, if any.
fn pin_away_from(workers: &[usize]) {
    let free = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .find(|c| !workers.contains(&c.id));
    if let Some(c) = free {
        core_affinity::set_for_current(c);
    }
}

/// Runs `pollux pktgen`; returns the report, or what was wrong.
pub fn run(opts: &Options) -> Result<Report, PktgenError> {
    let base = trial_config(opts)?;
    let clock = TscClock::calibrate(Duration::from_millis(50));
    let mut report = Report {
        mode: if opts.search {
            "search"
        } else if opts.calibrate {
            "calibrate"
        } else {
            "trial"
        }
        .into(),
        tx_port: String::new(),
        rx_port: String::new(),
        frame_size: opts.size,
        proto: match opts.proto {
            Proto::Udp => "udp",
            Proto::TcpSyn => "tcp-syn",
        }
        .into(),
        flows: opts.flows,
        tsc_hz: clock.hz(),
        ndr_pps: None,
        pdr_pps: None,
        pdr_loss: None,
        generator_bound: false,
        trials: Vec::new(),
        switch: None,
    };
    let tx = opts.tx.as_deref().map(parse_spec).transpose()?;
    let rx = opts.rx.as_deref().map(parse_spec).transpose()?;
    let bench = |tx: Box<dyn Port<Buf = PoolBuf>>,
                 rx: Option<Box<dyn Port<Buf = PoolBuf>>>,
                 pool: Pool,
                 tpl: &Template,
                 report: &mut Report| {
        Bench {
            tx,
            rx,
            alloc: pool,
            tpl,
            clock: &clock,
            base: base.clone(),
            trials: Vec::new(),
        }
        .run(opts, report)
    };
    match (&tx, &rx, &opts.config) {
        (None, None, None) if opts.calibrate => {
            report.tx_port = "ring:a".into();
            report.rx_port = "ring:b".into();
            let pool = Pool::new(&PoolConfig::new("pktgen", 16384))?;
            let (a, b) = ring::pair(
                LinkInfo::new("a", MacAddr([2, 0, 0, 0, 0, 1]), "ring"),
                LinkInfo::new("b", MacAddr([2, 0, 0, 0, 0, 2]), "ring"),
                4096,
            );
            let tpl = Template::new(&traffic(opts, None, a.info().mac, b.info().mac)?)?;
            bench(Box::new(a), Some(Box::new(b)), pool, &tpl, &mut report)?;
        }
        (None, _, _) => {
            return Err(usage(
                "--tx is needed (ring:NAME with --config, af_packet:IFACE, pcap:FILE, dpdk:DEVARGS), or --calibrate alone",
            ));
        }
        (Some(Spec::Ring(t)), r, Some(path)) => {
            let r = match r {
                None => None,
                Some(Spec::Ring(r)) => Some(r.clone()),
                Some(other) => {
                    return Err(usage(format!(
                        "--rx {other:?}: with --config both ports are ring ports of the configuration"
                    )));
                }
            };
            let cfg = Config::load(path)?;
            cfg.validate()?;
            let mut sw = InProcess::start(&cfg)?;
            report.tx_port = format!("ring:{t}");
            report.rx_port = format!("ring:{}", r.as_deref().unwrap_or(t));
            let result = (|| {
                let txp = sw.take_end(t)?;
                let rxp = r.as_deref().map(|r| sw.take_end(r)).transpose()?;
                let spec = traffic(
                    opts,
                    Some((&cfg, t, r.as_deref().unwrap_or(t))),
                    txp.info().mac,
                    rxp.as_ref().map_or(txp.info().mac, |p| p.info().mac),
                )?;
                let tpl = Template::new(&spec)?;
                pin_away_from(&sw.worker_cores);
                let pool = sw.pool;
                bench(
                    Box::new(txp),
                    rxp.map(|p| Box::new(p) as Box<dyn Port<Buf = PoolBuf>>),
                    pool,
                    &tpl,
                    &mut report,
                )
            })();
            let stopped = sw.stop();
            result?;
            report.switch = Some(stopped?);
        }
        (Some(Spec::Ring(_)), _, None) => {
            return Err(usage(
                "ring:NAME ports belong to an in-process switch: give --config",
            ));
        }
        (Some(Spec::Dpdk(_)), _, _) | (_, Some(Spec::Dpdk(_)), _) => {
            report.tx_port = opts.tx.clone().unwrap_or_default();
            report.rx_port = opts.rx.clone().or(opts.tx.clone()).unwrap_or_default();
            run_dpdk(opts, tx.as_ref(), rx.as_ref(), &clock, &base, &mut report)?;
        }
        (Some(t), r, None) => {
            report.tx_port = opts.tx.clone().unwrap_or_default();
            report.rx_port = opts.rx.clone().or(opts.tx.clone()).unwrap_or_default();
            let pool = Pool::new(&PoolConfig::new("pktgen", 16384))?;
            let open = |s: &Spec, dir: &str| -> Result<Box<dyn Port<Buf = PoolBuf>>, PktgenError> {
                let name = format!("pktgen-{dir}");
                let spec = match s {
                    Spec::AfPacket(i) => PortSpec::AfPacket { iface: i.clone() },
                    Spec::Pcap(f) if dir == "tx" => PortSpec::Pcap {
                        rx_pcap: None,
                        tx_pcap: Some(f.into()),
                    },
                    Spec::Pcap(f) => PortSpec::Pcap {
                        rx_pcap: Some(f.into()),
                        tx_pcap: None,
                    },
                    other => return Err(usage(format!("{other:?}: not usable here"))),
                };
                let mac = MacAddr([2, 0, 0, 0, 0, 1]);
                let mut opened = spec::open(&spec, &name, mac, 1, pool, 0)?;
                opened
                    .queues
                    .pop()
                    .ok_or_else(|| usage(format!("port {name:?}: opened without a queue")))
            };
            let txp = open(t, "tx")?;
            let rxp = r.as_ref().map(|r| open(r, "rx")).transpose()?;
            let rx_mac = rxp.as_ref().map_or(txp.info().mac, |p| p.info().mac);
            let tpl = Template::new(&traffic(opts, None, txp.info().mac, rx_mac)?)?;
            bench(txp, rxp, pool, &tpl, &mut report)?;
        }
        (Some(_), _, Some(_)) => {
            return Err(usage(
                "--config runs pollux in this process: its ports are ring:NAME",
            ));
        }
    }
    Ok(report)
}

/// Trials on DPDK ports (every port spec must then be dpdk).
#[cfg(feature = "dpdk")]
fn run_dpdk(
    opts: &Options,
    tx: Option<&Spec>,
    rx: Option<&Spec>,
    clock: &TscClock,
    base: &TrialConfig,
    report: &mut Report,
) -> Result<(), PktgenError> {
    use dataplane::port::dpdk::{DpdkPort, Eal, Mempool};
    let dev = |s: Option<&Spec>| match s {
        Some(Spec::Dpdk(d)) => Ok(d.clone()),
        other => Err(usage(format!(
            "{other:?}: with a dpdk port, both ports must be dpdk (one buffer type)"
        ))),
    };
    let txd = dev(tx)?;
    let rxd = rx.map(|r| dev(Some(r))).transpose()?;
    let args: Vec<String> = opts
        .eal
        .as_deref()
        .unwrap_or("--no-huge -m 1024 --no-pci")
        .split_whitespace()
        .map(String::from)
        .collect();
    let eal = Eal::init(&args)?;
    let pool = Mempool::new(&eal, "pktgen", 16383, 2176, -1)?;
    let txp = DpdkPort::open(&eal, "pktgen-tx", &txd, pool)?;
    let rxp = rxd
        .as_deref()
        .map(|d| DpdkPort::open(&eal, "pktgen-rx", d, pool))
        .transpose()?;
    let rx_mac = rxp.as_ref().map_or(txp.info().mac, |p| p.info().mac);
    let tpl = Template::new(&traffic(opts, None, txp.info().mac, rx_mac)?)?;
    Bench {
        tx: txp,
        rx: rxp,
        alloc: pool,
        tpl: &tpl,
        clock,
        base: base.clone(),
        trials: Vec::new(),
    }
    .run(opts, report)
}

#[cfg(not(feature = "dpdk"))]
fn run_dpdk(
    _opts: &Options,
    _tx: Option<&Spec>,
    _rx: Option<&Spec>,
    _clock: &TscClock,
    _base: &TrialConfig,
    _report: &mut Report,
) -> Result<(), PktgenError> {
    Err(PktgenError::NoDpdk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_percentages() {
        assert_eq!("250000".parse(), Ok(Rate::Pps(250_000.0)));
        assert_eq!("250k".parse(), Ok(Rate::Pps(250_000.0)));
        assert_eq!("1.5M".parse(), Ok(Rate::Pps(1_500_000.0)));
        assert_eq!("2Mpps".parse(), Ok(Rate::Pps(2_000_000.0)));
        assert_eq!("300kpps".parse(), Ok(Rate::Pps(300_000.0)));
        assert_eq!("50%".parse(), Ok(Rate::OfMax(0.5)));
        for bad in ["", "fast", "0", "-5k", "0%", "150%", "1e400"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn port_specs_name_the_problem() {
        assert_eq!(parse_spec("ring:gen").ok(), Some(Spec::Ring("gen".into())));
        assert_eq!(
            parse_spec("dpdk:net_virtio_user0,path=/tmp/s").ok(),
            Some(Spec::Dpdk("net_virtio_user0,path=/tmp/s".into()))
        );
        assert!(
            parse_spec("eth0")
                .unwrap_err()
                .to_string()
                .contains("ring:NAME")
        );
        assert!(
            parse_spec("tap:x")
                .unwrap_err()
                .to_string()
                .contains("unknown kind \"tap\"")
        );
        assert!(
            parse_spec("pcap:")
                .unwrap_err()
                .to_string()
                .contains("nothing after")
        );
    }

    #[test]
    fn bad_options_are_refused_before_any_port_opens() {
        let o = Options {
            duration: 0.0,
            ..Options::default()
        };
        assert!(run(&o).unwrap_err().to_string().contains("duration 0"));
        let o = Options {
            pdr_loss: 1.5,
            ..Options::default()
        };
        assert!(run(&o).unwrap_err().to_string().contains("pdr-loss"));
        let o = Options::default();
        assert!(run(&o).unwrap_err().to_string().contains("--tx is needed"));
        let o = Options {
            tx: Some("ring:gen".into()),
            ..Options::default()
        };
        assert!(run(&o).unwrap_err().to_string().contains("give --config"));
        let o = Options {
            calibrate: true,
            size: 40,
            ..Options::default()
        };
        assert!(run(&o).unwrap_err().to_string().contains("frame size 40"));
    }

    #[test]
    fn calibrate_on_a_ring_pair_loses_nothing() {
        let o = Options {
            calibrate: true,
            duration: 0.2,
            warmup: 0.05,
            ..Options::default()
        };
        let r = run(&o).unwrap();
        assert_eq!(r.mode, "calibrate");
        let labels: Vec<_> = r.trials.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "max",
                "latency@10% max",
                "latency@50% max",
                "latency@90% max"
            ]
        );
        for t in &r.trials {
            assert!(t.tx > 0, "{t:?}");
            assert_eq!((t.lost, t.duplicates, t.foreign), (0, 0, 0), "{t:?}");
            assert_eq!(t.latency_us.samples, t.rx, "{t:?}");
        }
        // Paced trials (10% and 50% of the maximum) never send faster than
        // offered (by the TSC); how far a stalled machine falls behind is
        // no property of the generator.
        for t in &r.trials[1..3] {
            let want = t.offered_pps.unwrap();
            assert!(t.tx_pps <= want * 1.03, "{t:?}");
        }
        let text = table(&r).join("\n");
        assert!(text.contains("latency@50% max"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["trials"][0]["label"], "max");
        assert!(json["trials"][1]["latency_us"]["p99_9"].as_f64().is_some());
    }
}
