//! Flow logs over IPFIX: the control loop takes the workers' flow-log
//! records (`vswitch::flowlog`), names their rules from the security groups
//! of the generation that decided them and their vnets from the current
//! policy, and sends them as IPFIX messages
//! (`vswitch::ipfix`) over UDP to `[ipfix] collector`, with the templates
//! every `template_interval_s`. Configured by `[ipfix]`, through the
//! configuration or `PUT /v1/ipfix`; without it the workers make no
//! records.

use super::{ApiError, ControlState, Runtime};
use crate::config::IpfixCfg;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use vswitch::flowlog::{FlowEnd, FlowLog, FlowRecord, RuleRef};
use vswitch::ipfix::{self, Exporter};

/// Records queued between the workers and the control thread, at most.
pub const FLOW_LOG_RECORDS: usize = 1 << 16;
/// Records the control loop sends at most per turn (it turns at least
/// every 50 ms).
const PER_STEP: usize = 8192;
/// The largest message: one Ethernet MTU's worth of UDP.
const MAX_MESSAGE: usize = 1400;
/// How long a send waits for room in the socket's buffer.
const SEND_WAIT: Duration = Duration::from_millis(100);
/// How often a collector no socket could be opened to is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// The exporter's state in the control thread.
pub struct Export {
    /// The records, shared with every worker's switch.
    pub log: Arc<FlowLog>,
    /// What it runs for (`None`: off).
    cfg: Option<IpfixCfg>,
    /// To the collector, with its exporter state.
    out: Option<(UdpSocket, Exporter)>,
    /// When the templates were last sent.
    templates_at: Option<Instant>,
    /// When to try again to open a socket to the collector.
    retry_at: Option<Instant>,
    /// A send failed while draining at the end: the rest is not tried.
    given_up: bool,
    /// Counters.
    pub stats: ExportStats,
}

/// The exporter's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Records sent.
    pub records: u64,
    /// Records not sent: the socket refused or timed out on their message
    /// (or one before it in the same turn).
    pub unsent: u64,
    /// Messages sent (templates too).
    pub messages: u64,
    /// Messages the socket refused or timed out on (their records, and
    /// the rest of that turn's, counted in `unsent`).
    pub send_errors: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

impl Default for Export {
    fn default() -> Self {
        Export {
            log: FlowLog::new(1),
            cfg: None,
            out: None,
            templates_at: None,
            retry_at: None,
            given_up: false,
            stats: ExportStats::default(),
        }
    }
}

impl Export {
    /// What it runs for.
    pub fn config(&self) -> Option<&IpfixCfg> {
        self.cfg.as_ref()
    }

    /// True while records go to the collector.
    pub fn running(&self) -> bool {
        self.out.is_some()
    }

    /// Follows `cfg`: opens the socket to its collector and turns the
    /// workers' records on, or off. A collector no socket could be opened
    /// to is tried again every 10 s.
    fn configure(&mut self, cfg: Option<&IpfixCfg>) {
        let same = self.cfg.as_ref() == cfg;
        if same && (cfg.is_none() || self.out.is_some()) {
            return;
        }
        if same && self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if !same && self.cfg.is_some() && cfg.is_none() {
            tracing::info!("ipfix: flow logs off");
        }
        self.cfg = cfg.cloned();
        self.out = None;
        self.templates_at = None;
        self.retry_at = None;
        let Some(c) = cfg else {
            self.log.set(None);
            self.log.discard();
            return;
        };
        match open(c) {
            Ok(s) => {
                self.out = Some((s, Exporter::new(c.domain_id, c.enterprise, MAX_MESSAGE)));
                self.log.set(Some(Duration::from_secs(c.active_timeout_s)));
                tracing::info!(
                    collector = %c.collector,
                    active_timeout_s = c.active_timeout_s,
                    "ipfix: flow logs to {}",
                    c.collector
                );
            }
            Err(e) => {
                self.log.set(None);
                self.retry_at = Some(Instant::now() + RETRY);
                let why = format!(
                    "ipfix: no socket to collector {} (tried again every {} s): {e}",
                    c.collector,
                    RETRY.as_secs()
                );
                // Logged once, not at every try.
                if self.stats.last_error.as_ref() != Some(&why) {
                    tracing::warn!("{why}");
                }
                self.stats.last_error = Some(why);
            }
        }
    }
}

/// A UDP socket connected to `c`'s collector.
fn open(c: &IpfixCfg) -> std::io::Result<UdpSocket> {
    let to: std::net::SocketAddr = c
        .collector
        .parse()
        .map_err(|_| std::io::Error::other("not an address:port"))?;
    let any: std::net::SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)?;
    s.connect(to)?;
    // Blocking, briefly: a burst of messages waits for room in the
    // socket's buffer rather than being lost to it.
    s.set_write_timeout(Some(SEND_WAIT))?;
    Ok(s)
}

/// One turn of the control loop: follows `[ipfix]`, sends the templates
/// when due and the records waiting.
pub fn step(state: &ControlState, rt: &mut Runtime) {
    let x = &mut rt.ipfix;
    x.configure(state.config().ipfix.as_ref());
    let (Some(cfg), Some((socket, exporter))) = (x.cfg.clone(), x.out.as_mut()) else {
        return;
    };
    let policy = state.policy().load_full();
    let wall = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let export_s = wall.as_secs() as u32;
    // Each message with the records it holds.
    let mut msgs: Vec<(Vec<u8>, u64)> = Vec::new();
    let due = x
        .templates_at
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(cfg.template_interval_s));
    if due {
        x.templates_at = Some(Instant::now());
        let ifs: Vec<(u32, &str)> = state
            .config()
            .port
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u32 + 1, p.name.as_str()))
            .collect();
        let vrfs: Vec<(u32, &str)> = policy
            .vnets
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u32 + 1, v.name.as_str()))
            .collect();
        let t = exporter.templates(export_s, &ifs, &vrfs);
        msgs.extend(t.into_iter().map(|m| (m, 0)));
    }
    let mut records = Vec::new();
    while records.len() < PER_STEP {
        match x.log.pop() {
            Some(r) => records.push(r),
            None => break,
        }
    }
    if !records.is_empty() {
        // The worker clock's reading now, against the wall clock's: a
        // record's times are the wall clock's then.
        let clock = dataplane::clock::TscClock::process();
        let now_ns = clock.ticks_to_ns(clock.now());
        let wall_ms = wall.as_millis() as u64;
        let ms = |ns: u64| wall_ms.saturating_sub(now_ns.saturating_sub(ns) / 1_000_000);
        let resolved: Vec<ipfix::Record<'_>> = records
            .iter()
            .map(|r| record(&policy, state.groups_of(r.generation), r, ms))
            .collect();
        msgs.extend(exporter.data(export_s, &resolved));
    }
    let mut failed = false;
    for (m, held) in &msgs {
        if failed {
            x.stats.unsent += held;
            continue;
        }
        match socket.send(m) {
            Ok(_) => {
                x.stats.messages += 1;
                x.stats.records += held;
            }
            Err(e) => {
                // (A collector that is down or slow: the rest of this
                // turn's messages are counted, not waited for.)
                failed = true;
                x.stats.send_errors += 1;
                x.stats.unsent += held;
                x.stats.last_error = Some(format!("to {}: {e}", cfg.collector));
            }
        }
    }
    if failed {
        // The templates go again with the next messages.
        x.templates_at = None;
    }
}

/// Sends every record waiting (the process stops); once a send fails,
/// the rest are counted unsent without waiting on the socket again.
pub fn drain(state: &ControlState, rt: &mut Runtime) {
    while !rt.ipfix.log.is_empty() {
        if rt.ipfix.given_up {
            while rt.ipfix.log.pop().is_some() {
                rt.ipfix.stats.unsent += 1;
            }
            break;
        }
        let (before, errors) = (rt.ipfix.log.len(), rt.ipfix.stats.send_errors);
        step(state, rt);
        rt.ipfix.given_up = rt.ipfix.stats.send_errors > errors;
        if rt.ipfix.log.len() >= before {
            break;
        }
    }
}

/// `r` as an IPFIX record: its vnet from `p`, its rules' names from
/// `groups` (those of the generation that decided them; none when that
/// is gone), its times through `ms`.
fn record<'p>(
    p: &vswitch::Policy,
    groups: Option<&'p Arc<Vec<filter::CompiledNsg>>>,
    r: &FlowRecord,
    ms: impl Fn(u64) -> u64,
) -> ipfix::Record<'p> {
    let vnet = |port: u16| {
        p.vm_on_port(port)
            .map(|(_, vm)| vm.vnet)
            .or_else(|| p.tunnel(port).map(|t| t.vnet))
    };
    let vrf = vnet(r.in_port)
        .or_else(|| r.out_port.and_then(vnet))
        .map_or(0, |v| v as u32 + 1);
    let names = |rr: RuleRef| -> (&'p str, &'p str) {
        if !rr.is_some() {
            return ("", "");
        }
        let Some(g) = groups.and_then(|gs| gs.get(usize::from(rr.nsg))) else {
            return ("", "");
        };
        let dir = if rr.dir == 1 {
            filter::Direction::In
        } else {
            filter::Direction::Out
        };
        let rule = g
            .classifier(dir)
            .rules()
            .get(usize::from(rr.rule))
            .map_or("", |r| r.name.as_str());
        (g.name.as_str(), rule)
    };
    let (sg, sr) = names(r.rules[0]);
    let (dg, dr) = names(r.rules[1]);
    let ip = |a: [u8; 16]| dataplane::key::from16(a);
    let (end_reason, forwarding, firewall_event) = match r.end {
        FlowEnd::Idle => (
            ipfix::end_reason::IDLE,
            ipfix::forwarding::FORWARDED,
            ipfix::firewall_event::DELETED,
        ),
        FlowEnd::Closed => (
            ipfix::end_reason::END,
            ipfix::forwarding::FORWARDED,
            ipfix::firewall_event::DELETED,
        ),
        FlowEnd::Active => (
            ipfix::end_reason::ACTIVE,
            ipfix::forwarding::FORWARDED,
            ipfix::firewall_event::UPDATE,
        ),
        FlowEnd::Forced => (
            ipfix::end_reason::FORCED,
            ipfix::forwarding::FORWARDED,
            ipfix::firewall_event::DELETED,
        ),
        FlowEnd::Denied => (
            ipfix::end_reason::FORCED,
            ipfix::forwarding::ACL_DENY,
            ipfix::firewall_event::DENIED,
        ),
    };
    ipfix::Record {
        start_ms: ms(r.first_ns),
        end_ms: ms(r.last_ns),
        octets: r.bytes,
        packets: r.packets,
        src: (ip(r.key.src_ip), r.key.src_port),
        dst: (ip(r.key.dst_ip), r.key.dst_port),
        proto: r.key.proto,
        post_src: (ip(r.post.src_ip), r.post.src_port),
        post_dst: (ip(r.post.dst_ip), r.post.dst_port),
        in_if: u32::from(r.in_port) + 1,
        out_if: r.out_port.map_or(0, |p| u32::from(p) + 1),
        vrf,
        end_reason,
        initiator: r.initiator,
        forwarding,
        firewall_event,
        rules: [sg, sr, dg, dr],
    }
}

/// `GET /v1/ipfix`.
pub fn view(rt: &Runtime) -> crate::api::IpfixView {
    let x = &rt.ipfix;
    let s = x.log.stats();
    crate::api::IpfixView {
        ipfix: x.cfg.clone(),
        running: x.running(),
        records_queued: s.queued,
        records_lost: s.lost,
        records_suppressed: s.suppressed,
        records_unsent: x.stats.unsent,
        records_waiting: x.log.len() as u64,
        records_sent: x.stats.records,
        messages_sent: x.stats.messages,
        send_errors: x.stats.send_errors,
        last_error: x.stats.last_error.clone(),
    }
}

/// `PUT /v1/ipfix` (`Some`) or `DELETE /v1/ipfix`: the new `[ipfix]`,
/// published as a new generation.
pub fn set(state: &mut ControlState, cfg: Option<IpfixCfg>) -> Result<u64, ApiError> {
    if let Some(c) = &cfg {
        let p = c.problems();
        if !p.is_empty() {
            return Err(ApiError::invalid(p));
        }
    }
    state.apply(|c| {
        c.ipfix = cfg;
        Ok(())
    })
}
