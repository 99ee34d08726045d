//! `pollux run --config FILE`: the switch on the configured ports until
//! SIGINT or SIGTERM.
//!
//! The switch runs on `[dataplane] workers` worker threads, pinned to the
//! last cores (worker 0 on the last); each has its own queue of every port
//! (an AF_PACKET fanout socket, a shared ring handle) and hands packets of
//! connections it does not own to their owner ([`vswitch::placement`]).
//! Health probes run on this (the control) thread, never on a polling core:
//! one prober per vnet (so probes can be added to any vnet at run time), on
//! an internal switch port of that vnet (source 168.63.129.16, as Azure),
//! so probes take the tenant path.
//! Each health change swaps the VIP's backend set in place (no new policy
//! generation: only that VIP's cached flows are revalidated) and is logged
//! on stderr.
//!
//! Drivers: `af_packet` and `af_xdp` (kernel interfaces; `af_xdp` with one
//! worker), `pcap` (replay a capture into the switch, record what it sends;
//! one worker), `ring` (an unconnected in-memory port), and `dpdk` (any DPDK
//! device, one queue per worker; every port must then be `dpdk`).
//!
//! At stop it prints a report: packets, per-worker and per-port counters,
//! each probed backend's state and why, every security-group rule that
//! matched with its hit count, and drops by reason.

use crate::api::{PortCounters, ProbeState, RuleCounters, WorkerCounters};
use crate::config::{Config, ConfigError, ProbeCfg};
use arc_swap::ArcSwap;
use dataplane::pool::{Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::port::spec::{self, PortSpec};
use dataplane::worker::Worker;
use dataplane::{BufAlloc, LinkInfo, MacAddr, PacketBuf, Port};
use lb::health::{HealthService, ProbeTarget};
use lb::probe::device::PortDevice;
use lb::probe::{ProbeKind, ProbeSpec, Prober, ProberConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vswitch::switch::Handoff;
use vswitch::{Policy, Switch, SwitchConfig, Topology, VmDef};

/// Why the switch could not run (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration has problems (every one, one line each).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A port could not be opened.
    #[error(transparent)]
    Port(#[from] dataplane::port::PortError),
    /// The packet buffer pool could not be made.
    #[error("buffer pool: {0}")]
    Pool(#[from] dataplane::pool::PoolError),
    /// DPDK could not be set up.
    #[cfg(feature = "dpdk")]
    #[error(transparent)]
    Dpdk(#[from] dataplane::port::dpdk::DpdkError),
    /// `dpdk` ports in a build without DPDK.
    #[error("dpdk ports need pollux built with the dpdk feature (cargo build --features dpdk)")]
    NoDpdk,
    /// The health service refused the probes of the configuration.
    #[error("probes: {0}")]
    Health(#[from] lb::health::HealthError),
    /// The control API could not be served.
    #[error(transparent)]
    Control(#[from] crate::control::BindError),
    /// A signal handler could not be installed.
    #[error("cannot handle {signal}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which thread.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Workers failed while running, one line each.
    #[error("{}", .0.join("\n"))]
    Workers(Vec<String>),
    /// An in-process switch got a port that is not a ring.
    #[error("{}", .0.join("\n"))]
    NotRing(Vec<String>),
    /// `take_end` of a port that is not a ring port of the configuration.
    #[error("port {0:?} is not a ring port of the configuration")]
    NoSuchRing(String),
    /// Taking over from a running pollux failed (it goes on).
    #[error("takeover: {0}")]
    Takeover(#[from] crate::takeover::TakeoverError),
}

impl RunError {
    /// The error, one line per problem.
    pub fn lines(&self) -> Vec<String> {
        self.to_string().lines().map(String::from).collect()
    }
}

/// What `pollux run` prints when it stops: every counter that says what
/// the switch did (serde, so it can be read as JSON too).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Per worker.
    pub workers: Vec<WorkerCounters>,
    /// Per port, summed over its queues.
    pub ports: Vec<PortCounters>,
    /// Each probed backend's last state.
    pub probes: Vec<ProbeState>,
    /// Security-group rules that won lookups.
    pub rules: Vec<RuleCounters>,
    /// Drops by the switch's pipeline, by reason.
    pub switch_drops: BTreeMap<String, u64>,
    /// Frames the workers could not parse, by reason.
    pub malformed: BTreeMap<String, u64>,
}

impl RunReport {
    /// The report as text lines.
    pub fn lines(&self) -> Vec<String> {
        let sum = |f: fn(&WorkerCounters) -> u64| self.workers.iter().map(f).sum::<u64>();
        let mut out = vec![format!(
            "stopped: {} packets received, {} sent; {} fast path, {} slow path",
            sum(|w| w.rx_packets),
            sum(|w| w.tx_packets),
            sum(|w| w.fast_path),
            sum(|w| w.slow_path),
        )];
        if self.workers.len() > 1 {
            for w in &self.workers {
                out.push(format!(
                    "worker{}: received {}, processed {}, handed to their owner {}",
                    w.worker,
                    w.rx_packets,
                    w.fast_path + w.slow_path,
                    w.handed_off
                ));
            }
        }
        for p in &self.ports {
            out.push(format!(
                "port {:?}: rx {} tx {} drops {}",
                p.name,
                p.rx_packets,
                p.tx_packets,
                p.drops.values().sum::<u64>()
            ));
        }
        for p in &self.probes {
            out.push(format!(
                "vip {:?} backend {}: {} after {} probes ({})",
                p.vip,
                p.backend,
                if p.up { "up" } else { "down" },
                p.probes,
                p.reason
            ));
        }
        for r in self.rules.iter().filter(|r| r.hits > 0) {
            out.push(format!(
                "nsg {:?} {} rule {:?} (priority {}, {}): {} hits",
                r.nsg, r.direction, r.rule, r.priority, r.action, r.hits
            ));
        }
        let list = |m: &BTreeMap<String, u64>| {
            format!(
                "{:?}",
                m.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>()
            )
        };
        out.push(format!("switch drops: {}", list(&self.switch_drops)));
        out.push(format!("malformed: {}", list(&self.malformed)));
        out
    }
}

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

/// The health service of a switch whose frames come from `A` (pollux's
/// pool, or a DPDK mempool: the worker's buffers): one prober per vnet on an
/// internal ring port.
type Health<A> = HealthService<RingPort<<A as BufAlloc>::Buf>, A>;

/// The idle far ends of configured ring ports.
type RingEnds = Vec<RingPort<PoolBuf>>;

/// Adds one internal prober port per vnet to `topo` and to every worker's
/// port set (numbered after the configured ports; a handle of the switch's
/// end each, [`RingPort::into_handles`]), so that probes can be added to
/// any vnet at run time; gives each vnet's prober the probed backends of
/// its vnet, which start down until their first success. Returns the
/// health service.
fn probers<A: BufAlloc>(
    cfg: &Config,
    topo: &mut Topology,
    pool: A,
    sets: &mut [PortSet<A::Buf>],
) -> Result<Health<A>, RunError> {
    let mut health = Health::<A>::new();
    // Fresh ports and sequence numbers in every process (see ProberConfig).
    let seed = ProberConfig::process_seed();
    for (k, v) in cfg.vnet.iter().enumerate() {
        let port = topo.ports + k as u16;
        let mac = MacAddr([0x02, 0x50, 0x4c, 0x58, 0xfe, k as u8]);
        let (sw, end) = ring::pair(
            LinkInfo::new(&format!("probe{k}"), mac, "ring"),
            LinkInfo::new(&format!("probe{k}"), mac, "ring"),
            1024,
        );
        topo.vms.push(VmDef {
            name: format!("prober:{}", v.name),
            port,
            vnet: k,
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
            seed: seed.wrapping_add(k as u64),
        };
        health.add_vnet(
            &v.name,
            Prober::new(PortDevice::new(end, pool), &pc, Duration::ZERO),
        );
        let handles = sw.into_handles(sets.len());
        for (set, q) in sets.iter_mut().zip(handles) {
            set.push(Box::new(q));
        }
    }
    topo.ports += cfg.vnet.len() as u16;
    for (vip_cfg, vip) in cfg.vip.iter().zip(topo.vips.iter_mut()) {
        if vip_cfg.probe.is_some() {
            vip.health = vec![false; vip.config.backends.len()];
        }
    }
    sync_probes(cfg, &mut health, Duration::ZERO)?;
    Ok(health)
}

/// Makes the health service probe exactly the backends `cfg` says.
fn sync_probes<A: BufAlloc>(
    cfg: &Config,
    health: &mut Health<A>,
    now: Duration,
) -> Result<(), RunError> {
    let topo = cfg.topology()?;
    let mut want = Vec::new();
    for (vip_cfg, vip) in cfg.vip.iter().zip(topo.vips.iter()) {
        let Some(p) = &vip_cfg.probe else { continue };
        let c = &vip.config;
        let spec = probe_spec(p);
        for (index, b) in c.backends.iter().enumerate() {
            // Probed backends are IPv4: the configuration's validation says so.
            let IpAddr::V4(ip) = b.ip else { continue };
            let target = ProbeTarget {
                vnet: vip_cfg.vnet.clone(),
                vip: c.name.clone(),
                frontend: (c.addr, c.port, c.proto),
                backend: (ip, b.port),
                spec: spec.clone(),
            };
            want.push((target, index));
        }
    }
    health.sync(&want, now)?;
    Ok(())
}

/// The ports of one worker.
type PortSet<B = PoolBuf> = Vec<Box<dyn Port<Buf = B>>>;

/// Opens every configured port for `workers` workers (through
/// [`dataplane::port::spec::open`]): queue `w` of each port goes to worker
/// `w`. Returns the per-worker port lists and the idle far ends of the
/// rings.
fn open_ports(
    cfg: &Config,
    workers: usize,
    pool: Pool,
) -> Result<(Vec<PortSet>, RingEnds), RunError> {
    let mut sets: Vec<PortSet> = (0..workers).map(|_| Vec::new()).collect();
    let mut idle_peers = Vec::new();
    for (i, p) in cfg.port.iter().enumerate() {
        let mac = MacAddr([0x02, 0x50, 0x4c, 0x58, (i >> 8) as u8, i as u8]);
        // A fanout group id per interface, distinct between pollux
        // processes sharing a namespace.
        let group = (std::process::id() as u16)
            .wrapping_mul(31)
            .wrapping_add(i as u16);
        let opened = spec::open(&p.spec, &p.name, mac, workers, pool, group)?;
        for (set, q) in sets.iter_mut().zip(opened.queues) {
            set.push(q);
        }
        idle_peers.extend(opened.peer);
    }
    Ok((sets, idle_peers))
}

/// Runs the switch; returns the report printed at stop, or the problems.
pub fn run(cfg: &Config) -> Result<RunReport, RunError> {
    run_with(cfg, None)
}

/// [`run`], reloading `source` (the file `cfg` came from) on SIGHUP: the new
/// configuration is validated whole and published, or refused and logged.
pub fn run_with(cfg: &Config, source: Option<&std::path::Path>) -> Result<RunReport, RunError> {
    let mut topo = cfg.topology()?;
    let workers = cfg.dataplane.workers.max(1);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let stop = Stop::signals(cfg, source)?;
    if cfg.port.iter().any(|p| p.spec.is_dpdk()) {
        return run_dpdk(cfg, topo, stop);
    }
    let pool = Pool::new(&PoolConfig::new("run", 65536))?;
    let (mut sets, idle_peers) = open_ports(cfg, workers, pool)?;
    let probers = probers(cfg, &mut topo, pool, &mut sets)?;
    let report = run_on(
        cfg,
        &topo,
        sets,
        (probers, pool),
        &cores,
        stop,
        Extra::none(),
    );
    drop(idle_peers);
    report
}

/// `pollux run --takeover SOCKET`: takes over from the pollux serving the
/// control socket `control` ([`crate::takeover`]), with its running
/// configuration or, given `file`, with that one if it keeps the same
/// ports and workers; then runs as [`run_with`] does (reloading `file` on
/// SIGHUP). Any failure before this process starts its workers leaves the
/// running pollux as it was.
pub fn run_takeover(
    control: &std::path::Path,
    file: Option<&std::path::Path>,
) -> Result<RunReport, RunError> {
    // A file this build refuses is refused before the running pollux is
    // even asked.
    let mine = match file {
        Some(f) => {
            let c = Config::load(f)?;
            c.validate()?;
            Some(c)
        }
        None => None,
    };
    // What costs time and does not depend on the state is done before the
    // running pollux stops: the packet pool (prefaulted) or DPDK's EAL and
    // mempool, and the clock's calibration.
    let running = crate::takeover::running_config(control)?;
    let ahead = match &mine {
        Some(c) => {
            // Ports or workers this process cannot take over are refused
            // before the running pollux stops for it.
            let problems = crate::takeover::compatibility(&running, c);
            if !problems.is_empty() {
                return Err(ConfigError::Invalid(problems).into());
            }
            c.clone()
        }
        None => running,
    };
    if ahead.port.iter().any(|p| p.spec.is_dpdk()) {
        return run_takeover_dpdk(control, mine, file, &ahead);
    }
    let pool = Pool::new(&PoolConfig::new("run", 65536))?;
    let _ = dataplane::clock::TscClock::process();
    let prebuilt = prebuild::<PoolBuf>(&ahead)?;
    let mut inc = crate::takeover::Incoming::request(control)?;
    match prepare_takeover(&mut inc, mine, file, pool) {
        Ok((cfg, topo, sets, probers, stop)) => {
            let cores = core_affinity::get_core_ids().unwrap_or_default();
            let successor = Successor {
                incoming: inc,
                late: None,
                prebuilt,
            };
            let extra = Extra {
                successor: Some(successor),
                devices: None,
            };
            run_on(&cfg, &topo, sets, (probers, pool), &cores, stop, extra)
        }
        Err(e) => Err(RunError::Takeover(inc.abort(e.lines().join("; ")))),
    }
}

/// The switches of `ahead` (the configuration a successor expects to
/// run), built before the running pollux is asked to stop.
fn prebuild<B: PacketBuf>(ahead: &Config) -> Result<Switches<B>, RunError> {
    let policy = Policy::compile(&ahead.topology()?, 0).map_err(|e| ConfigError::Invalid(e.0))?;
    Ok(Switches::build(
        ahead,
        policy,
        ahead.dataplane.workers.max(1),
        true,
    ))
}

/// What [`run_on`] needs, for a successor.
type Prepared = (Config, Topology, Vec<PortSet>, Health<Pool>, Stop);

/// The configuration a successor runs (its own `mine`, or its
/// predecessor's), checked against what the predecessor runs; its
/// topology, and the signals (SIGHUP reloads `file`, or the file the
/// predecessor reloaded).
fn takeover_config(
    inc: &crate::takeover::Incoming,
    mine: Option<Config>,
    file: Option<&std::path::Path>,
) -> Result<(Config, Topology, Stop), RunError> {
    let running: Config = serde_json::from_value(inc.state.config.clone()).map_err(|e| {
        ConfigError::Invalid(vec![format!(
            "the running configuration does not parse here: {e}"
        )])
    })?;
    let cfg = mine.unwrap_or_else(|| running.clone());
    cfg.validate()?;
    let problems = crate::takeover::compatibility(&running, &cfg);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems).into());
    }
    let topo = cfg.topology()?;
    let reload = file
        .map(std::path::Path::to_path_buf)
        .or_else(|| inc.state.config_file.clone());
    let stop = Stop::signals_only(reload.as_deref())?;
    Ok((cfg, topo, stop))
}

/// The configuration a successor runs, checked, and its ports opened on
/// the sockets handed over.
fn prepare_takeover(
    inc: &mut crate::takeover::Incoming,
    mine: Option<Config>,
    file: Option<&std::path::Path>,
    pool: Pool,
) -> Result<Prepared, RunError> {
    let (cfg, mut topo, stop) = takeover_config(inc, mine, file)?;
    let workers = cfg.dataplane.workers.max(1);
    let mut sets: Vec<PortSet> = (0..workers).map(|_| Vec::new()).collect();
    let ports = inc.state.ports.clone();
    for (i, p) in cfg.port.iter().enumerate() {
        let (PortSpec::AfPacket { iface } | PortSpec::AfXdp { iface }) = &p.spec else {
            return Err(ConfigError::Invalid(crate::takeover::port_problems(&cfg)).into());
        };
        // One queue for every worker, or the one an af_xdp port has.
        let queues = match p.spec.queues() {
            spec::Queues::One => 1,
            spec::Queues::PerWorker => workers,
        };
        let Some(ps) = ports
            .get(i)
            .filter(|ps| ps.name == p.name && ps.queues.len() == queues)
        else {
            return Err(ConfigError::Invalid(vec![format!(
                "port {:?}: the running pollux handed over no socket per worker for it",
                p.name
            )])
            .into());
        };
        for (set, q) in sets.iter_mut().zip(&ps.queues) {
            let fd = inc.take_fd(q).ok_or_else(|| {
                ConfigError::Invalid(vec![format!(
                    "port {:?}: descriptor {:?} was not handed over",
                    p.name, q.fd
                )])
            })?;
            let extra = inc.take_extra(q).ok_or_else(|| {
                ConfigError::Invalid(vec![format!(
                    "port {:?}: descriptors {:?} were not handed over",
                    p.name, q.extra_fds
                )])
            })?;
            let h = dataplane::port::Handover {
                fd,
                rx_next: q.rx_next,
                tx_next: q.tx_next,
                frame_size: q.frame_size,
                frames: q.frames,
                extra,
                free: q.free_frames.clone(),
            };
            let port: Box<dyn Port<Buf = PoolBuf>> = match &p.spec {
                PortSpec::AfXdp { .. } => Box::new(dataplane::port::af_xdp::AfXdpPort::adopt(
                    &p.name, iface, pool, h,
                )?),
                _ => Box::new(dataplane::port::af_packet::AfPacketPort::adopt(
                    &p.name, iface, pool, h,
                )?),
            };
            crate::takeover::add_counters(port.stats(), &q.counters);
            set.push(port);
        }
    }
    let probers = probers(&cfg, &mut topo, pool, &mut sets)?;
    Ok((cfg, topo, sets, probers, stop))
}

/// What stops the control loop, what makes it reload, and the control API.
struct Stop {
    /// Set by SIGINT/SIGTERM (or by an in-process owner).
    stop: Arc<AtomicBool>,
    /// Set by SIGHUP, with the file to reload.
    reload: Option<(Arc<AtomicBool>, std::path::PathBuf)>,
    /// The control API's listeners (with a `[control]` section).
    server: Option<crate::control::Server>,
    /// Set once every worker has started (its tables committed) and polls,
    /// for an in-process owner that waits for it.
    started: Arc<AtomicBool>,
}

/// Binds the control API of `cfg`, before any worker starts: a socket that
/// cannot be served is a configuration error, not something to find later;
/// and once this returns, clients can connect.
fn bind_control(cfg: &Config) -> Result<Option<crate::control::Server>, RunError> {
    match &cfg.control {
        Some(c) => crate::control::Server::bind(c)
            .map(Some)
            .map_err(RunError::from),
        None => Ok(None),
    }
}

impl Stop {
    /// SIGINT and SIGTERM stop; SIGHUP reloads `source` if given.
    fn signals(cfg: &Config, source: Option<&std::path::Path>) -> Result<Stop, RunError> {
        let mut s = Self::signals_only(source)?;
        s.server = bind_control(cfg)?;
        Ok(s)
    }

    /// [`Stop::signals`] without the control API (a successor binds it
    /// once it runs).
    fn signals_only(source: Option<&std::path::Path>) -> Result<Stop, RunError> {
        let stop = Arc::new(AtomicBool::new(false));
        let register = |(number, signal), flag: &Arc<AtomicBool>| {
            signal_hook::flag::register(number, flag.clone())
                .map(drop)
                .map_err(|source| RunError::Signal { signal, source })
        };
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        for sig in [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM")] {
            register(sig, &stop)?;
        }
        let reload = match source {
            Some(p) => {
                let f = Arc::new(AtomicBool::new(false));
                register((SIGHUP, "SIGHUP"), &f)?;
                Some((f, p.to_path_buf()))
            }
            None => None,
        };
        Ok(Stop {
            stop,
            reload,
            server: None,
            started: Arc::default(),
        })
    }
}

/// A switch running in this process on a configuration of `ring` ports
/// (and probes), whose far ends the caller drives: what `pollux pktgen
/// --config` measures.
pub struct InProcess {
    /// The far end of each configured ring port, by port name.
    pub ends: Vec<(String, RingPort<PoolBuf>)>,
    /// The pool the switch's ports carry buffers of (send from it).
    pub pool: Pool,
    /// Cores the workers are pinned to.
    pub worker_cores: Vec<usize>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<RunReport, RunError>>,
}

impl InProcess {
    /// Starts the switch of `cfg`; every port must be a `ring` port.
    pub fn start(cfg: &Config) -> Result<InProcess, RunError> {
        let mut topo = cfg.topology()?;
        let problems: Vec<String> = cfg
            .port
            .iter()
            .filter(|p| p.spec != PortSpec::Ring {})
            .map(|p| {
                format!(
                    "port {:?}: driver {:?}: an in-process switch has ring ports only",
                    p.name,
                    p.spec.driver()
                )
            })
            .collect();
        if !problems.is_empty() {
            return Err(RunError::NotRing(problems));
        }
        let workers = cfg.dataplane.workers.max(1);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let worker_cores = (0..workers)
            .filter_map(|w| cores.len().checked_sub(w + 1).and_then(|c| cores.get(c)))
            .map(|c| c.id)
            .collect();
        let pool = Pool::new(&PoolConfig::new("in-process", 65536))?;
        let (mut sets, peers) = open_ports(cfg, workers, pool)?;
        let probers = probers(cfg, &mut topo, pool, &mut sets)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let started = Arc::new(AtomicBool::new(false));
        let up = started.clone();
        let server = bind_control(cfg)?;
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("pollux-control".into())
            .spawn(move || {
                let stop = Stop {
                    stop: flag,
                    reload: None,
                    server,
                    started: up,
                };
                run_on(
                    &cfg,
                    &topo,
                    sets,
                    (probers, pool),
                    &cores,
                    stop,
                    Extra::none(),
                )
            })
            .map_err(|source| RunError::Spawn {
                what: "the switch's control thread".into(),
                source,
            })?;
        // Returned once the workers poll (their tables committed first),
        // so that traffic sent at once is not held up behind that; or with
        // the switch's error if it stopped before.
        while !started.load(Ordering::Acquire) {
            if thread.is_finished() {
                return match thread.join() {
                    Ok(Err(e)) => Err(e),
                    _ => Err(RunError::Workers(vec![
                        "the switch's control thread stopped before its workers started"
                            .to_string(),
                    ])),
                };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(InProcess {
            ends: peers
                .into_iter()
                .map(|p| (p.info().name.clone(), p))
                .collect(),
            pool,
            worker_cores,
            stop,
            thread,
        })
    }

    /// Takes the far end of ring port `name`.
    pub fn take_end(&mut self, name: &str) -> Result<RingPort<PoolBuf>, RunError> {
        let i = self
            .ends
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| RunError::NoSuchRing(name.to_string()))?;
        Ok(self.ends.swap_remove(i).1)
    }

    /// Stops the switch and returns its report.
    pub fn stop(self) -> Result<RunReport, RunError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| {
            RunError::Workers(vec!["the switch's control thread panicked".to_string()])
        })?
    }
}

/// `run` with DPDK ports: every port must be `dpdk` (the workers move mbufs
/// end to end, the probers' internal ports carry mbufs too); each worker
/// polls its own queue of every port.
#[cfg(feature = "dpdk")]
fn run_dpdk(cfg: &Config, mut topo: Topology, stop: Stop) -> Result<RunReport, RunError> {
    use dataplane::port::dpdk::{Eal, Mempool};
    let args = cfg
        .dpdk
        .as_ref()
        .map(|d| d.eal_args.clone())
        .unwrap_or_default();
    let eal = Eal::init(&args)?;
    let pool = Mempool::new(&eal, "pollux", 16383, 2176, -1)?;
    let workers = cfg.dataplane.workers.max(1);
    let mut sets: Vec<PortSet<dataplane::port::dpdk::Mbuf>> =
        (0..workers).map(|_| Vec::new()).collect();
    for p in &cfg.port {
        // One queue per worker.
        let opened = spec::open_dpdk(&p.spec, &p.name, workers, &eal, pool)?;
        for (set, q) in sets.iter_mut().zip(opened.queues) {
            set.push(q);
        }
    }
    let probers = probers(cfg, &mut topo, pool, &mut sets)?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let extra = Extra {
        successor: None,
        devices: Some(dpdk_devices(cfg, &eal, pool, workers)),
    };
    run_on(cfg, &topo, sets, (probers, pool), &cores, stop, extra)
}

/// [`run_takeover`] of a pollux on DPDK ports: EAL (under a file prefix
/// of its own, the ports' PCI functions kept out of its start-up probe)
/// and the mempool are made before the running pollux is asked; the ports
/// are opened once it has stopped and said go (vhost-user guests' QEMUs
/// take the new connections when its own close, as it exits; other
/// devices it has given up by then).
#[cfg(feature = "dpdk")]
fn run_takeover_dpdk(
    control: &std::path::Path,
    mine: Option<Config>,
    file: Option<&std::path::Path>,
    ahead: &Config,
) -> Result<RunReport, RunError> {
    use dataplane::port::dpdk::{Eal, Mempool};
    let args = ahead
        .dpdk
        .as_ref()
        .map(|d| d.eal_args.clone())
        .unwrap_or_default();
    let pci: Vec<String> = ahead
        .port
        .iter()
        .filter_map(|p| p.spec.pci_address())
        .collect();
    let eal = Eal::init(&crate::takeover::successor_eal_args(&args, &pci))?;
    let pool = Mempool::new(&eal, "pollux", 16383, 2176, -1)?;
    let _ = dataplane::clock::TscClock::process();
    let prebuilt = prebuild::<dataplane::port::dpdk::Mbuf>(ahead)?;
    let mut inc = crate::takeover::Incoming::request(control)?;
    let prepared = (|| {
        let (cfg, mut topo, stop) = takeover_config(&inc, mine, file)?;
        if cfg.dpdk != ahead.dpdk || cfg.port != ahead.port {
            return Err(RunError::Config(ConfigError::Invalid(vec![
                "the running configuration's ports or [dpdk] changed while taking over".into(),
            ])));
        }
        let workers = cfg.dataplane.workers.max(1);
        let mut sets: Vec<PortSet<dataplane::port::dpdk::Mbuf>> =
            (0..workers).map(|_| Vec::new()).collect();
        let probers = probers(&cfg, &mut topo, pool, &mut sets)?;
        Ok((cfg, topo, sets, probers, stop))
    })();
    let (cfg, topo, sets, probers, stop) = match prepared {
        Ok(p) => p,
        Err(e) => return Err(RunError::Takeover(inc.abort(e.lines().join("; ")))),
    };
    let counters: Vec<Vec<crate::api::PortCounters>> = inc
        .state
        .ports
        .iter()
        .map(|p| p.queues.iter().map(|q| q.counters.clone()).collect())
        .collect();
    let ports = cfg.port.clone();
    let workers = sets.len();
    let devices = dpdk_devices(&cfg, &eal, pool, workers);
    let late: Late<dataplane::port::dpdk::Mbuf> = Box::new(move || {
        let mut out: Vec<PortSet<dataplane::port::dpdk::Mbuf>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (i, p) in ports.iter().enumerate() {
            let opened = match spec::open_dpdk(&p.spec, &p.name, workers, &eal, pool) {
                Ok(o) => o,
                Err(e) => {
                    // The devices opened so far go back, for the
                    // predecessor to take.
                    drop(out);
                    let opened: Vec<(String, PortSpec)> = ports
                        .iter()
                        .take(i)
                        .filter(|q| !crate::takeover::reopens(q))
                        .map(|q| (q.name.clone(), q.spec.clone()))
                        .collect();
                    let _ = release_devices(&eal, &opened);
                    return Err(e.into());
                }
            };
            for (w, (set, q)) in out.iter_mut().zip(opened.queues).enumerate() {
                if let Some(c) = counters.get(i).and_then(|c| c.get(w)) {
                    crate::takeover::add_counters(q.stats(), c);
                }
                set.push(q);
            }
        }
        Ok(out)
    });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    run_on(
        &cfg,
        &topo,
        sets,
        (probers, pool),
        &cores,
        stop,
        Extra {
            successor: Some(Successor {
                incoming: inc,
                late: Some(late),
                prebuilt,
            }),
            devices: Some(devices),
        },
    )
}

#[cfg(not(feature = "dpdk"))]
fn run_takeover_dpdk(
    _control: &std::path::Path,
    _mine: Option<Config>,
    _file: Option<&std::path::Path>,
    _ahead: &Config,
) -> Result<RunReport, RunError> {
    Err(RunError::NoDpdk)
}

#[cfg(not(feature = "dpdk"))]
fn run_dpdk(_cfg: &Config, _topo: Topology, _stop: Stop) -> Result<RunReport, RunError> {
    Err(RunError::NoDpdk)
}

/// A stopped worker: its ports and switch.
type StoppedWorker<B> = dataplane::worker::Stopped<B, Switch<B>>;

/// Opens, for a successor, the configured ports it does not get from its
/// predecessor (per worker, in configuration order), once the predecessor
/// has stopped.
type Late<B> = Box<dyn FnOnce() -> Result<Vec<PortSet<B>>, RunError>>;

/// A port's name and each worker's counters of it.
type PortStatsOf = (String, Vec<Arc<dataplane::PortStats>>);

/// What a [`run_on`] has beyond its ports and probes.
struct Extra<B: PacketBuf> {
    /// It takes over from a predecessor.
    successor: Option<Successor<B>>,
    /// Its DPDK devices that a successor opens itself.
    devices: Option<Devices<B>>,
}

impl<B: PacketBuf> Extra<B> {
    fn none() -> Self {
        Extra {
            successor: None,
            devices: None,
        }
    }
}

/// DPDK devices (every DPDK port but vhost-user's: a NIC's PCI function
/// above all) that a running pollux gives up for a successor, which opens
/// them once told to go (only one process can drive a device), and takes
/// back if the handover fails.
struct Devices<B: PacketBuf> {
    /// Their ports' places in the configuration (and in each worker's
    /// port set).
    ports: Vec<usize>,
    /// Removes the devices from this process (their queues gone first).
    release: Box<dyn Fn() -> Result<(), RunError>>,
    /// Opens them again: per port of `ports`, a queue per worker.
    reopen: ReopenFn<B>,
}

type ReopenFn<B> = Box<dyn Fn() -> Vec<Result<PortSet<B>, RunError>>>;

impl<B: PacketBuf> Devices<B> {
    /// Puts a stand-in in place of each of the devices' queues (keeping
    /// name and counters; dropping the last queue of a port stops it) and
    /// releases the devices.
    fn give_up(&self, stopped: &mut [StoppedWorker<B>]) -> Result<(), RunError> {
        for s in stopped.iter_mut() {
            for &i in &self.ports {
                if let Some(q) = s.ports.get_mut(i) {
                    let stand_in = Released::new(q.info().clone(), q.stats().clone());
                    *q = Box::new(stand_in);
                }
            }
        }
        (self.release)()
    }

    /// Opens the devices again in their stand-ins' places, their counters
    /// going on from the stand-ins'; `port_stats` follows. A device that
    /// cannot be opened keeps its stand-in (named in the error); the
    /// others are back.
    fn take_back(
        &self,
        stopped: &mut [StoppedWorker<B>],
        port_stats: &mut [PortStatsOf],
    ) -> Result<(), String> {
        let mut failed = Vec::new();
        for (&i, opened) in self.ports.iter().zip((self.reopen)()) {
            let queues = match opened {
                Ok(q) => q,
                Err(e) => {
                    failed.push(e.lines().join("; "));
                    continue;
                }
            };
            for (w, q) in queues.into_iter().enumerate() {
                let (Some(s), Some((name, stats))) = (stopped.get_mut(w), port_stats.get_mut(i))
                else {
                    continue;
                };
                if let (Some(slot), Some(old)) = (s.ports.get_mut(i), stats.get_mut(w)) {
                    crate::takeover::add_counters(
                        q.stats(),
                        &crate::takeover::counters_of(name, old),
                    );
                    *old = q.stats().clone();
                    *slot = q;
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

/// The stand-in of a DPDK queue whose device this process gave up: it
/// receives nothing and drops what it is given (`link_down`).
struct Released<B> {
    info: LinkInfo,
    stats: Arc<dataplane::PortStats>,
    _buf: std::marker::PhantomData<fn() -> B>,
}

impl<B> Released<B> {
    fn new(info: LinkInfo, stats: Arc<dataplane::PortStats>) -> Self {
        Released {
            info,
            stats,
            _buf: std::marker::PhantomData,
        }
    }
}

impl<B: PacketBuf> Port for Released<B> {
    type Buf = B;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<dataplane::PortStats> {
        &self.stats
    }

    fn rx_burst(&mut self, _batch: &mut dataplane::Batch<B>) -> usize {
        0
    }

    fn tx_burst(&mut self, batch: &mut dataplane::Batch<B>) -> usize {
        let n = batch.drain().count();
        self.stats
            .drops
            .add(dataplane::DropReason::LinkDown, n as u64);
        0
    }

    /// (Nothing waits: what it is given is dropped.)
    fn kick(&mut self) {}
}

/// The devices of `cfg`'s DPDK ports that a successor opens itself (all
/// but vhost-user's), opened again through `eal` and `pool` for
/// `workers` workers.
#[cfg(feature = "dpdk")]
fn dpdk_devices(
    cfg: &Config,
    eal: &dataplane::port::dpdk::Eal,
    pool: dataplane::port::dpdk::Mempool,
    workers: usize,
) -> Devices<dataplane::port::dpdk::Mbuf> {
    let ports: Vec<usize> = cfg
        .port
        .iter()
        .enumerate()
        .filter(|(_, p)| p.spec.is_dpdk() && !crate::takeover::reopens(p))
        .map(|(i, _)| i)
        .collect();
    let specs: Vec<(String, PortSpec)> = ports
        .iter()
        .filter_map(|&i| cfg.port.get(i))
        .map(|p| (p.name.clone(), p.spec.clone()))
        .collect();
    let (eal2, eal3, specs2) = (eal.clone(), eal.clone(), specs.clone());
    Devices {
        ports,
        release: Box::new(move || release_devices(&eal2, &specs)),
        reopen: Box::new(move || {
            specs2
                .iter()
                .map(|(name, spec)| Ok(spec::open_dpdk(spec, name, workers, &eal3, pool)?.queues))
                .collect()
        }),
    }
}

/// Removes the devices of `ports` (name, spec) from this process
/// ([`dataplane::port::dpdk::DpdkPort::release`]; one it does not have is
/// no error), each tried whatever became of the others; the first error.
#[cfg(feature = "dpdk")]
fn release_devices(
    eal: &dataplane::port::dpdk::Eal,
    ports: &[(String, PortSpec)],
) -> Result<(), RunError> {
    let mut first = Ok(());
    for (name, spec) in ports {
        if let Some(device) = spec.dpdk_device() {
            let r = dataplane::port::dpdk::DpdkPort::release(eal, name, device);
            if first.is_ok() {
                first = r.map_err(RunError::from);
            }
        }
    }
    first
}

/// What a successor's [`run_on`] takes over and brings.
struct Successor<B: PacketBuf> {
    /// Its predecessor's state.
    incoming: crate::takeover::Incoming,
    /// The ports it opens itself once the predecessor has stopped.
    late: Option<Late<B>>,
    /// Its switches, built before the predecessor stopped.
    prebuilt: Switches<B>,
}

/// A process's switches, one per worker, before their workers run, with
/// what they share. A successor builds them before its predecessor stops:
/// their tables take most of a takeover's time to allocate.
struct Switches<B: PacketBuf> {
    swap: Arc<ArcSwap<Policy>>,
    cfg: SwitchConfig,
    flow_control: Vec<Arc<vswitch::switch::FlowControl>>,
    /// The live trace every switch serves.
    live: Arc<vswitch::switch::LiveTrace>,
    /// The flow log every switch records in.
    flow_log: Arc<vswitch::flowlog::FlowLog>,
    switches: Vec<Switch<B>>,
    /// The configuration they were built for.
    made_for: Config,
}

impl<B: PacketBuf> Switches<B> {
    /// One switch per worker on `policy`; `ahead`: with each vnet's load
    /// balancer made, and the tables' memory committed, now (else each
    /// worker does both on its own core when it starts, so that the memory
    /// is that core's).
    fn build(cfg: &Config, policy: Policy, workers: usize, ahead: bool) -> Self {
        let swap = Arc::new(ArcSwap::from_pointee(policy));
        let mut sw_cfg = SwitchConfig {
            flow_table_size: cfg.dataplane.flow_table_size,
            conn_table_size: cfg.dataplane.conn_table_size,
            preallocate: cfg.dataplane.preallocate_tables,
            // Each configured port's MTU (the probers' internal ports,
            // after them, have none).
            port_mtu: cfg.port.iter().map(|p| p.mtu.unwrap_or(1500)).collect(),
            ..SwitchConfig::default()
        };
        // Every worker's tables together (each worker checks its own parts
        // as well, but they commit at the same time).
        let need = vswitch::flow::FlowTable::bytes_for(sw_cfg.flow_table_size).saturating_add(
            cfg.vnet
                .len()
                .saturating_mul(lb::balancer::LbCore::table_bytes(sw_cfg.conn_table_size)),
        );
        let need = u64::try_from(need.saturating_mul(workers)).unwrap_or(u64::MAX);
        if sw_cfg.preallocate
            && let Some(left) = platform::memory_available()
            && platform::too_big_to_commit(need, left)
        {
            tracing::warn!(
                "preallocate_tables: the tables of {workers} workers ({} MiB) would take over \
                 half the memory left ({} MiB); they are committed as the dataplane first writes them",
                need >> 20,
                left >> 20
            );
            sw_cfg.preallocate = false;
        }
        let handoff = Handoff::new(workers, 8192);
        let mut flow_control = Vec::new();
        let live = vswitch::switch::LiveTrace::new(crate::control::LIVE_TRACE_RECORDS);
        let flow_log = vswitch::flowlog::FlowLog::new(crate::control::flowlog::FLOW_LOG_RECORDS);
        let mut switches = Vec::new();
        for w in 0..workers {
            let fc = Arc::new(vswitch::switch::FlowControl::default());
            flow_control.push(fc.clone());
            let mut switch = Switch::new(swap.clone(), sw_cfg.clone())
                .with_handoff(w, handoff.clone())
                .with_control(w, fc)
                .with_live_trace(w, live.clone())
                .with_flow_log(flow_log.clone());
            if ahead {
                // The tables' memory committed too while the predecessor
                // still runs, so its successor does not take the time when
                // it starts, after the predecessor stopped. (From this
                // thread, not the worker's core: on a host of several
                // NUMA nodes it may be another node's memory.)
                switch.load_policy();
                switch.preallocate();
            }
            switches.push(switch);
        }
        Switches {
            swap,
            cfg: sw_cfg,
            flow_control,
            live,
            flow_log,
            switches,
            made_for: cfg.clone(),
        }
    }

    /// Whether these switches serve `cfg` on `workers` workers as well as
    /// ones built for it: the same tables, ports (MTUs) and vnets' SNAT
    /// layouts, which a switch fixes when it is built.
    fn fits(&self, cfg: &Config, workers: usize) -> bool {
        let vnets = |c: &Config| -> Vec<(String, Option<crate::config::SnatCfg>)> {
            c.vnet
                .iter()
                .map(|v| (v.name.clone(), v.snat.clone()))
                .collect()
        };
        self.switches.len() == workers
            && self.made_for.dataplane == cfg.dataplane
            && self.made_for.port == cfg.port
            && vnets(&self.made_for) == vnets(cfg)
    }
}

/// Starts one switch worker per port set, serves the control API (with a
/// `[control]` section), runs the control loop until `stop` says so, stops
/// the workers and returns the report. `health` probes; `alloc` gives
/// worker 0 the buffers of the underlay's ARP requests. A successor
/// (`incoming`) restores its predecessor's state (its underlay neighbours
/// too) into the switches, and serves the control API
/// once its workers run. A successor's request to take over (from the
/// API) stops the workers and hands over; if that fails, the same workers
/// start again and the loop goes on.
fn run_on<A: BufAlloc>(
    cfg: &Config,
    topo: &Topology,
    sets: Vec<PortSet<A::Buf>>,
    (mut health, alloc): (Health<A>, A),
    cores: &[core_affinity::CoreId],
    stop: Stop,
    extra: Extra<A::Buf>,
) -> Result<RunReport, RunError> {
    let Extra { successor, devices } = extra;
    let (mut incoming, late, prebuilt) = match successor {
        Some(s) => (Some(s.incoming), s.late, Some(s.prebuilt)),
        None => (None, None, None),
    };
    let workers = sets.len().max(1);
    let generation = incoming.as_ref().map_or(1, |i| i.state.generation + 1);
    // A successor starts with its predecessor's underlay neighbours.
    let mut topo = topo.clone();
    if let Some(inc) = &incoming {
        topo.neighbours = inc
            .state
            .neighbours
            .iter()
            .map(|(ip, m)| (*ip, dataplane::MacAddr(*m)))
            .collect();
    }
    let topo = &topo;
    let policy = match (Policy::compile(topo, generation), incoming.as_mut()) {
        (Ok(p), _) => p,
        (Err(e), Some(inc)) => return Err(RunError::Takeover(inc.abort(e.0.join("; ")))),
        (Err(e), None) => return Err(ConfigError::Invalid(e.0).into()),
    };
    // Switches built ahead serve if they were built for the same tables,
    // ports and SNAT layouts; else they are built now.
    let Switches {
        swap,
        cfg: mut sw_cfg,
        flow_control,
        live,
        flow_log,
        switches,
        ..
    } = match prebuilt.filter(|s| s.fits(cfg, workers)) {
        Some(s) => {
            s.swap.store(Arc::new(policy));
            s
        }
        None => Switches::build(cfg, policy, workers, false),
    };
    // Cookies the predecessor gave out still check here (and go on to a
    // successor of this process).
    if let Some(inc) = &incoming {
        sw_cfg.syn_cookies = lb::syncookie::SynCookies::with_key(inc.state.syn_cookie_key);
    }
    let mut server = stop.server;
    let (mut stats, mut acl_hits, mut wstats) = (Vec::new(), Vec::new(), Vec::new());
    let mut built = Vec::new();
    let neigh_mail = Arc::new(vswitch::neigh::NeighMail::default());
    for (w, (ports, switch)) in sets.into_iter().zip(switches).enumerate() {
        // Worker 0 sends the underlay's ARP requests.
        let arp_bufs =
            (w == 0).then(|| Box::new(move || alloc.alloc_buf()) as vswitch::switch::Alloc<A::Buf>);
        let mut switch = switch.with_underlay(neigh_mail.clone(), arp_bufs);
        if let Some(inc) = incoming.as_mut() {
            switch.set_syn_cookies(sw_cfg.syn_cookies.clone());
            let done = match inc.state.workers.get(w) {
                Some(rec) => switch
                    .import_state(rec)
                    .map_err(|e| format!("worker{w}: state not restored: {e}")),
                None => Err(format!(
                    "worker{w}: the running pollux sent no state for it ({} workers)",
                    inc.state.workers.len()
                )),
            };
            match done {
                Ok(done) => inc.count(&done),
                Err(why) => return Err(RunError::Takeover(inc.abort(why))),
            }
        }
        stats.push(switch.stats());
        acl_hits.push(switch.acl_hits());
        wstats.push(Arc::new(dataplane::worker::WorkerStats::default()));
        built.push(dataplane::worker::Stopped {
            ports,
            pipeline: switch,
        });
    }
    if let Some(inc) = incoming.as_mut() {
        let cur = swap.load();
        let by_name = |name: &str| cur.vnets.iter().find(|v| v.name == name).map(|v| &v.vips);
        inc.report.probes = health.restore(&inc.state.probes, by_name) as u64;
        // Told to stop meanwhile: not taking over at all.
        if stop.stop.load(Ordering::Relaxed) {
            return Err(RunError::Takeover(inc.abort("stopped by a signal".into())));
        }
        // The predecessor stops serving and says go; from here on this
        // process owns the ports.
        inc.ready()?;
        // Ports this process opens itself, now that its predecessor has
        // stopped: before the internal ports, as numbered. If one cannot
        // be opened, the predecessor is told and goes on.
        if let Some(open) = late {
            match open() {
                Ok(opened) => {
                    for (b, mut ports) in built.iter_mut().zip(opened) {
                        ports.append(&mut b.ports);
                        b.ports = ports;
                    }
                }
                Err(e) => return Err(RunError::Takeover(inc.abort(e.lines().join("; ")))),
            }
        }
        // The control socket, in the predecessor's place (it stopped
        // serving it). One it served that this process does not is removed
        // first (if both name one file, the bind makes it anew).
        if cfg.control.as_ref().is_none_or(|c| c.socket != inc.control) {
            let _ = std::fs::remove_file(&inc.control);
        }
        if let Some(c) = &cfg.control {
            match crate::control::Server::bind_as(c, true) {
                Ok(s) => server = Some(s),
                // Forwarding matters more than the API: go on without it.
                Err(e) => tracing::warn!("control API not served: {e}"),
            }
        }
        inc.started();
    }
    let mut port_stats: Vec<PortStatsOf> = Vec::new();
    for b in &built {
        for (i, p) in b.ports.iter().enumerate() {
            match port_stats.get_mut(i) {
                Some((_, v)) => v.push(p.stats().clone()),
                None => port_stats.push((p.info().name.clone(), vec![p.stats().clone()])),
            }
        }
    }
    let core_of = |w: usize| {
        // Polling cores from the last one down; the control thread floats.
        cores
            .len()
            .checked_sub(w + 1)
            .and_then(|c| cores.get(c))
            .map(|c| c.id)
    };
    let idle_sleep = Duration::from_micros(cfg.dataplane.idle_sleep_us);
    // Live capture, shared by every worker (`POST /v1/capture`).
    let tap = dataplane::capture::Tap::new(crate::control::CAPTURE_RECORDS);
    let spawn = |stopped: Vec<StoppedWorker<A::Buf>>| {
        let mut out = (Vec::new(), Vec::new());
        for (w, s) in stopped.into_iter().enumerate() {
            let worker = Worker::new(&format!("worker{w}"), core_of(w), s.ports, s.pipeline)
                .with_tap(tap.clone())
                .with_idle_sleep(idle_sleep)
                .with_stats(wstats[w].clone());
            let flag = worker.stop_flag();
            match worker.spawn() {
                Ok(h) => {
                    out.0.push(flag);
                    out.1.push(h);
                }
                Err(e) => {
                    // The workers spawned already stop: none is left
                    // polling ports that no one serves.
                    let mut failures = vec![e.to_string()];
                    failures.extend(stop_all(&out.0, out.1).1);
                    return Err(RunError::Workers(failures));
                }
            }
        }
        Ok::<_, RunError>(out)
    };
    let (mut stops, mut handles) = spawn(built)?;
    // The workers commit their tables' memory before their first poll:
    // until then what arrives waits in the ports' queues. Serving starts
    // when they poll (or one has stopped: its error is reported below).
    while !wstats.iter().all(|s| s.started.load(Ordering::Acquire))
        && !handles.iter().any(|h| h.is_finished())
        && !stop.stop.load(Ordering::Relaxed)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    // A worker that stopped already (its core refused, or it failed as it
    // began): all stop, and say why. Not for a successor: its predecessor,
    // told it started, is gone, and the workers that run still forward
    // (the failure is reported when they stop).
    if incoming.is_none() && handles.iter().any(|h| h.is_finished()) {
        let (_, failures) = stop_all(&stops, std::mem::take(&mut handles));
        return Err(RunError::Workers(failures));
    }
    if let Some(inc) = incoming.as_mut() {
        // The blackout lasts until the workers poll (committing tables
        // first, where they were not built ahead).
        inc.report.blackout_us =
            crate::takeover::now_ns().saturating_sub(inc.report.stopped_at_ns) / 1000;
    }
    stop.started.store(true, Ordering::Release);
    let mut rt = crate::control::Runtime::new(
        port_stats.clone(),
        wstats.clone(),
        stats.clone(),
        acl_hits.clone(),
        flow_control,
    );
    rt.neighbours.mail = neigh_mail;
    rt.switch_cfg = sw_cfg.clone();
    rt.tap = tap.clone();
    rt.live = live;
    rt.ipfix.log = flow_log;
    rt.neighbours.seed(&topo.neighbours);
    if let Some(inc) = incoming.take() {
        tracing::info!(
            from_pid = inc.report.from_pid,
            from_version = %inc.report.from_version,
            blackout_us = inc.report.blackout_us,
            connections = inc.report.connections,
            probes = inc.report.probes,
            sockets = inc.report.sockets,
            "took over from pid {}",
            inc.report.from_pid,
        );
        rt.takeover = Some(inc.report.clone());
        // The predecessor's BIRD holds the sessions until it is gone.
        rt.bgp.after(inc.report.from_pid);
        // Counters go on from the predecessor's.
        if inc.state.worker_counters.len() == workers {
            rt.base = inc.state.worker_counters.clone();
            // The cycle accounting counts this process's work.
            rt.perf_base = (rt.base.clone(), std::time::Instant::now());
        }
    }
    if sw_cfg.preallocate {
        // Committing memory ahead (MADV_POPULATE_WRITE) needs Linux 5.14:
        // tried on a small buffer, as the workers will on their tables.
        let mut probe = vec![0u8; 1 << 17];
        if let Err(e) = platform::populate(&mut probe[..]) {
            let why = if e.kind() == std::io::ErrorKind::OutOfMemory {
                "almost no memory is left".to_string()
            } else {
                format!("the kernel does not commit memory ahead ({e})")
            };
            tracing::warn!(
                "preallocate_tables: {why}; the tables are committed as the dataplane first writes them"
            );
        }
    }
    tracing::info!(
        ports = cfg.port.len(),
        workers,
        probed_backends = health.states().count(),
        "switch running (SIGINT or SIGTERM stops)"
    );
    let mut state = crate::control::ControlState::new(cfg.clone(), topo, swap.clone());
    if let Some(s) = &server {
        tracing::info!(
            "control API on {}{}",
            cfg.control
                .as_ref()
                .map_or(String::new(), |c| c.socket.display().to_string()),
            s.tcp_addr()
                .map_or(String::new(), |a| format!(" and http://{a}"))
        );
    }
    loop {
        control_loop(
            &stop.stop,
            stop.reload.as_ref(),
            &stops,
            &mut health,
            &mut state,
            &mut rt,
            server.as_ref(),
        );
        // Stopping (not handing over): the VIPs are withdrawn while the
        // workers still forward, for routers to move the flows elsewhere.
        if rt.takeover_request.is_none() {
            rt.bgp.stop(state.config(), &state.policy().load());
        }
        // (`stopped_at` is taken as the flags are set, before the wait.)
        let stopped_at = crate::takeover::now_ns();
        // Workers flush their ports when they return.
        let (mut stopped, failures) = stop_all(&stops, std::mem::take(&mut handles));
        if !failures.is_empty() {
            return Err(RunError::Workers(failures));
        }
        let Some(req) = rt.takeover_request.take() else {
            flush_flow_logs(&mut stopped, &state, &mut rt);
            break;
        };
        // Packets one worker handed another, or queued to go through it
        // again, are sent before the sockets go.
        let mut idle: Vec<_> = stopped
            .into_iter()
            .enumerate()
            .map(|(w, s)| {
                Worker::new(&format!("worker{w}"), None, s.ports, s.pipeline)
                    .with_stats(wstats[w].clone())
            })
            .collect();
        for _ in 0..1000 {
            if idle.iter_mut().map(|w| w.finish_pending()).sum::<usize>() == 0 {
                break;
            }
        }
        let mut stopped: Vec<_> = idle.into_iter().map(Worker::into_stopped).collect();
        // Devices only one process may hold go now: the successor opens
        // them once told to go.
        let released = devices
            .as_ref()
            .filter(|d| !d.ports.is_empty())
            .map(|d| d.give_up(&mut stopped));
        let file = stop.reload.as_ref().map(|(_, p)| p.as_path());
        let outcome = match &released {
            // Not handed over at all (the successor is told by the
            // conversation's end); they are taken back below.
            Some(Err(e)) => {
                crate::takeover::decline(&req);
                crate::takeover::Outcome::Failed(crate::takeover::TakeoverError::Unusable(format!(
                    "devices not given up: {}",
                    e.lines().join("; ")
                )))
            }
            _ => hand_over(
                &req,
                &stopped,
                (
                    &state,
                    file,
                    stopped_at,
                    crate::control::local_counters(&state, &rt).workers,
                ),
                &health,
                &port_stats,
                &sw_cfg,
                &mut server,
            ),
        };
        match outcome {
            crate::takeover::Outcome::HandedOver => {
                tracing::info!("handed over to pid {}", req.pid);
                // (The successor decides their connections' flows again:
                // these end here.)
                flush_flow_logs(&mut stopped, &state, &mut rt);
                break;
            }
            crate::takeover::Outcome::Orphaned(e) => return Err(RunError::Takeover(e)),
            crate::takeover::Outcome::Failed(e) => {
                let why = format!("handover to pid {} failed, going on: {e}", req.pid);
                tracing::warn!("{why}");
                if let (Some(d), Some(_)) = (&devices, &released) {
                    // A successor that opened some of them lets them go as
                    // it exits.
                    crate::takeover::wait_gone(req.pid);
                    if let Err(e) = d.take_back(&mut stopped, &mut port_stats) {
                        // Forwarding on the other ports goes on.
                        tracing::error!("devices not opened again: {e}");
                        rt.takeover_failed = Some(format!("{why}; devices not opened again: {e}"));
                    } else {
                        rt.takeover_failed = Some(why);
                    }
                    rt.ports = port_stats.clone();
                } else {
                    rt.takeover_failed = Some(why);
                }
                (stops, handles) = spawn(stopped)?;
                // Released to a successor that then failed: serve again.
                if server.is_none()
                    && let Some(c) = &cfg.control
                {
                    match crate::control::Server::bind_as(c, true) {
                        Ok(s) => server = Some(s),
                        Err(e) => tracing::warn!("control API not served again: {e}"),
                    }
                }
            }
        }
    }
    let mut counters = crate::control::local_counters(&state, &rt);
    use crate::control::by_reason;
    let mut report = RunReport {
        probes: probe_states(&health),
        switch_drops: by_reason(stats.iter().flat_map(|s| s.nonzero())),
        malformed: by_reason(wstats.iter().flat_map(|s| s.drops.nonzero())),
        ..RunReport::default()
    };
    report.workers = std::mem::take(&mut counters.workers);
    report.ports = std::mem::take(&mut counters.ports);
    report.rules = std::mem::take(&mut counters.rules);
    Ok(report)
}

/// Records every flow of the stopped workers in the flow log, and sends
/// the records (when flow logs are on): the flows end with the process.
/// Stops the workers (`stops`, their flags) and waits for them: those that
/// returned, and what each that failed said (one that panicked, that it
/// did).
fn stop_all<B: PacketBuf, P: dataplane::worker::Pipeline<B>>(
    stops: &[Arc<AtomicBool>],
    handles: Vec<dataplane::worker::WorkerHandle<B, P>>,
) -> (Vec<dataplane::worker::Stopped<B, P>>, Vec<String>) {
    for s in stops {
        s.store(true, Ordering::Relaxed);
    }
    let mut failures = Vec::new();
    let mut stopped = Vec::new();
    for (w, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(s)) => stopped.push(s),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push(format!("worker{w} panicked")),
        }
    }
    (stopped, failures)
}

fn flush_flow_logs<B: PacketBuf>(
    stopped: &mut [StoppedWorker<B>],
    state: &crate::control::ControlState,
    rt: &mut crate::control::Runtime,
) {
    if rt.ipfix.config().is_none() {
        return;
    }
    for s in stopped {
        s.pipeline
            .flush_flow_log(|| crate::control::flowlog::drain(state, rt));
    }
}

/// Hands the stopped workers' state and sockets to the successor that
/// asked (`req`); `server` is released (left to the successor) when it is
/// ready. An error: nothing was handed over, this process goes on.
fn hand_over<A: BufAlloc>(
    req: &crate::takeover::Request,
    stopped: &[StoppedWorker<A::Buf>],
    (state, file, stopped_at, counted): (
        &crate::control::ControlState,
        Option<&std::path::Path>,
        u64,
        Vec<crate::api::WorkerCounters>,
    ),
    health: &Health<A>,
    port_stats: &[PortStatsOf],
    sw_cfg: &SwitchConfig,
    server: &mut Option<crate::control::Server>,
) -> crate::takeover::Outcome {
    use crate::takeover::{
        Outcome, PortState, QueueState, TakeoverError, counters_of, offer, state_of,
    };
    let cfg = state.config();
    let mut st = match state_of(
        cfg,
        file,
        state.generation(),
        sw_cfg.syn_cookies.key(),
        stopped_at,
    ) {
        Ok(st) => st,
        Err(e) => return Outcome::Failed(e),
    };
    let mut fds = Vec::new();
    for (i, p) in cfg.port.iter().enumerate() {
        let mut queues = Vec::new();
        for (w, s) in stopped.iter().enumerate() {
            let counters = port_stats
                .get(i)
                .and_then(|(_, v)| v.get(w))
                .map(|s| counters_of(&p.name, s))
                .unwrap_or_default();
            if p.spec.is_dpdk() {
                // The successor opens it anew: a vhost-user guest's QEMU
                // takes its connection when this process's closes; other
                // devices this process has given up already.
                queues.push(QueueState {
                    fd: None,
                    rx_next: 0,
                    tx_next: 0,
                    frame_size: 0,
                    frames: 0,
                    extra_fds: Vec::new(),
                    free_frames: Vec::new(),
                    counters,
                });
                continue;
            }
            let h = match s.ports.get(i).and_then(|q| q.handover()) {
                Some(Ok(h)) => h,
                Some(Err(e)) => {
                    return Outcome::Failed(TakeoverError::Io(format!("port {:?}: {e}", p.name)));
                }
                None => {
                    return Outcome::Failed(TakeoverError::Unusable(format!(
                        "port {:?} cannot hand over",
                        p.name
                    )));
                }
            };
            let first = fds.len();
            queues.push(QueueState {
                fd: Some(first),
                rx_next: h.rx_next,
                tx_next: h.tx_next,
                frame_size: h.frame_size,
                frames: h.frames,
                extra_fds: (first + 1..first + 1 + h.extra.len()).collect(),
                free_frames: h.free,
                counters,
            });
            fds.push(h.fd);
            fds.extend(h.extra);
        }
        st.ports.push(PortState {
            name: p.name.clone(),
            driver: p.spec.driver().to_string(),
            queues,
        });
    }
    st.workers = stopped.iter().map(|s| s.pipeline.export_state()).collect();
    st.probes = health.export();
    st.worker_counters = counted;
    st.neighbours = state
        .neighbours()
        .iter()
        .map(|(ip, m)| (*ip, m.0))
        .collect();
    use std::os::fd::AsFd;
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    offer(req, &st, &borrowed, || {
        if let Some(s) = server.take() {
            s.release();
        }
    })
}

/// Polls the health service (which applies health changes to their VIPs),
/// serves the control API and reloads on SIGHUP, until told to stop.
fn control_loop<A: BufAlloc>(
    signalled: &AtomicBool,
    reload: Option<&(Arc<AtomicBool>, std::path::PathBuf)>,
    stop: &[Arc<AtomicBool>],
    health: &mut Health<A>,
    state: &mut crate::control::ControlState,
    rt: &mut crate::control::Runtime,
    server: Option<&crate::control::Server>,
) {
    let start = Instant::now();
    let policy = state.policy().clone();
    let mut changes = state.changes();
    while !signalled.load(Ordering::Relaxed)
        && !stop.iter().any(|s| s.load(Ordering::Relaxed))
        && rt.takeover_request.is_none()
    {
        let now = start.elapsed();
        let mut next = now + Duration::from_millis(50);
        // After an API change or a reload: probe what the new state says,
        // before any result of a probe the change retired is applied.
        if state.changes() != changes {
            changes = state.changes();
            if let Err(e) = sync_probes(state.config(), health, start.elapsed()) {
                tracing::warn!("probes not updated: {}", e.lines().join("; "));
            }
        }
        // Each change swaps its VIP's backend set in place (only that VIP's
        // cached flows are revalidated), and is applied before it is logged:
        // whoever reads the line (an operator) may rely on new connections
        // already seeing it.
        let cur = policy.load();
        let by_name = |name: &str| cur.vnets.iter().find(|v| v.name == name).map(|v| &v.vips);
        for a in health.poll(now, by_name) {
            match a.result {
                Ok(_) => tracing::info!(
                    backend = %a.target.name(),
                    up = a.up,
                    reason = %a.reason,
                    "health: {} {}",
                    a.target.name(),
                    if a.up { "up" } else { "down" },
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        next = next.min(health.poll_at(now));
        // What BGP announces follows health, drains and reloads.
        rt.bgp.step(state.config(), &cur);
        // Only the API reads them.
        if server.is_some() {
            rt.probes = probe_states(health);
        }
        if let Some(t) = rt.takeover.as_mut() {
            crate::takeover::note_links(t, &rt.ports);
        }
        if let Some((flag, path)) = reload
            && flag.swap(false, Ordering::Relaxed)
        {
            let loaded = Config::load(path).map_err(|e| e.problems().join("; "));
            let refused = match loaded.map(|c| state.replace(c)) {
                Ok(Ok(g)) => {
                    rt.reloads.applied += 1;
                    tracing::info!(file = %path.display(), generation = g, "reloaded");
                    None
                }
                Ok(Err(e)) if e.problems.is_empty() => Some(e.message),
                Ok(Err(e)) => Some(e.problems.join("; ")),
                Err(e) => Some(e),
            };
            if let Some(why) = refused {
                let why = format!(
                    "reload of {} refused, generation {} kept: {why}",
                    path.display(),
                    state.generation(),
                );
                tracing::warn!("{why}");
                rt.reloads.refused += 1;
                rt.reloads.last_error = Some(why);
            }
        }
        // The underlay's neighbours: requests due, answers taken in.
        rt.neighbours.step(state);
        // Link changes and the periodic drop summary.
        crate::control::log_events(state, rt);
        // Captures and live traces whose time is up or whose reader went.
        crate::control::capture_step(rt);
        // Flow logs to the IPFIX collector.
        crate::control::flowlog::step(state, rt);
        // Wait until the next probe is due, at most 50 ms (signals are
        // noticed within that), at least 1 ms (packets of probes in flight);
        // requests to the control API end the wait at once.
        let wait = next
            .saturating_sub(start.elapsed())
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        match server {
            Some(s) => s.serve(wait, state, rt),
            None => std::thread::sleep(wait),
        }
    }
}

/// The probe state of every probed backend, for the API and metrics.
fn probe_states<A: BufAlloc>(health: &Health<A>) -> Vec<ProbeState> {
    health
        .states()
        .map(|(t, h)| ProbeState {
            vip: t.vip.clone(),
            backend: format!("{}:{}", t.backend.0, t.backend.1),
            up: h.up,
            probes: h.probes,
            reason: h.reason(),
            rtt_ms: h.rtt.map(|d| d.as_secs_f64() * 1000.0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_reads_as_lines_and_round_trips_as_json() {
        let w = |worker, rx, fast, slow| WorkerCounters {
            worker,
            rx_packets: rx,
            tx_packets: rx,
            fast_path: fast,
            slow_path: slow,
            ..WorkerCounters::default()
        };
        let report = RunReport {
            workers: vec![w(0, 10, 8, 2), w(1, 5, 5, 0)],
            ports: vec![PortCounters {
                name: "web1".into(),
                rx_packets: 15,
                tx_packets: 15,
                drops: [("tx_queue_full".to_string(), 2)].into(),
                ..PortCounters::default()
            }],
            probes: vec![ProbeState {
                vip: "web".into(),
                backend: "10.1.0.4:8080".into(),
                up: true,
                probes: 3,
                reason: "HTTP 200".into(),
                rtt_ms: None,
            }],
            rules: vec![RuleCounters {
                nsg: "web".into(),
                direction: "in".into(),
                rule: "http".into(),
                priority: 100,
                action: "allow".into(),
                hits: 4,
            }],
            switch_drops: BTreeMap::new(),
            malformed: [("truncated".to_string(), 1)].into(),
        };
        assert_eq!(
            report.lines(),
            [
                "stopped: 15 packets received, 15 sent; 13 fast path, 2 slow path",
                "worker0: received 10, processed 10, handed to their owner 0",
                "worker1: received 5, processed 5, handed to their owner 0",
                "port \"web1\": rx 15 tx 15 drops 2",
                "vip \"web\" backend 10.1.0.4:8080: up after 3 probes (HTTP 200)",
                "nsg \"web\" in rule \"http\" (priority 100, allow): 4 hits",
                "switch drops: []",
                "malformed: [(\"truncated\", 1)]",
            ]
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<RunReport>(&json).unwrap(), report);
    }
}
