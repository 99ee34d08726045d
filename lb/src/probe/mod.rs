//! Health probes: HTTP GET and TCP, over smoltcp, with Azure Load Balancer's
//! semantics.
//!
//! The [`Prober`] owns a smoltcp interface (its own address — by default
//! 168.63.129.16, as Azure — and MAC) on a dataplane port, so in the switch its
//! probes take the same path as tenant traffic; in tests it sits directly on a
//! ring port. It runs on the control thread: the caller calls
//! [`Prober::poll`] with the time, and gets back the DIPs whose health changed,
//! to publish as new Maglev tables ([`crate::balancer::Vips::set_health`]).
//!
//! - HTTP probe: connect to `dip:port`, send `GET <path> HTTP/1.1` with `Host`
//!   and `Connection: close`, read the status line. Healthy only on status 200
//!   within the timeout; any other status (`http 503`), a reset (`rst`), a
//!   malformed or cut-off response (`bad response`) or no answer in time
//!   (`timeout`) is a failure.
//! - TCP probe: a completed handshake is success; the connection is then
//!   closed cleanly (FIN).
//! - A DIP is down until its first success; `threshold` consecutive failures
//!   take it down, the same number of consecutive successes bring it back.
//! - Each DIP is probed every `interval` with ±10% jitter (and a first probe
//!   spread over the first interval), so probes do not fire together.

pub mod device;

use crate::conntrack::from16;
use dataplane::BufAlloc;
use dataplane::Port;
use dataplane::pool::Pool;
use device::PortDevice;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// The default probe source address (Azure's).
pub const DEFAULT_SOURCE: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// HTTP GET of `path`; healthy only on 200.
    Http {
        /// Request path, e.g. `/health`.
        path: String,
    },
    /// A completed TCP handshake.
    Tcp,
}

/// How a VIP's backends are probed (the `[vip.probe]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// HTTP or TCP.
    pub kind: ProbeKind,
    /// Port on the backend.
    pub port: u16,
    /// Time between probes of one DIP.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// Consecutive failures that take a DIP down (and successes that bring it back).
    pub threshold: u32,
}

impl ProbeSpec {
    /// A spec with Azure Load Balancer's defaults: 5 s interval, timeout
    /// min(interval, 30 s), threshold 2.
    pub fn new(kind: ProbeKind, port: u16) -> Self {
        ProbeSpec {
            kind,
            port,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            threshold: 2,
        }
    }

    /// Sets the interval; the timeout becomes min(interval, 30 s) unless set after.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self.timeout = interval.min(Duration::from_secs(30));
        self
    }
}

/// Why a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The server answered with this HTTP status (not 200).
    Http(u16),
    /// The connection was reset (refused, or reset mid-request).
    Rst,
    /// No answer within the timeout.
    Timeout,
    /// The response was not an HTTP status line, or was cut off.
    BadResponse,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Http(s) => write!(f, "http {s}"),
            FailReason::Rst => f.write_str("rst"),
            FailReason::Timeout => f.write_str("timeout"),
            FailReason::BadResponse => f.write_str("bad response"),
        }
    }
}

/// The health of one DIP as the prober sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DipHealth {
    /// True while the DIP may receive new connections.
    pub up: bool,
    /// Consecutive successes.
    pub ok_streak: u32,
    /// Consecutive failures.
    pub fail_streak: u32,
    /// Result of the last completed probe (`None` before the first).
    pub last: Option<Result<(), FailReason>>,
    /// Round-trip time of the last successful probe.
    pub rtt: Option<Duration>,
    /// When `up` last changed (prober time).
    pub last_change: Option<Duration>,
    /// Probes completed.
    pub probes: u64,
    ever_up: bool,
}

impl DipHealth {
    fn new() -> Self {
        DipHealth {
            up: false,
            ok_streak: 0,
            fail_streak: 0,
            last: None,
            rtt: None,
            last_change: None,
            probes: 0,
            ever_up: false,
        }
    }

    /// The reason of the last failure, as text (`"http 503"`), or `"ok"`.
    pub fn reason(&self) -> String {
        match self.last {
            None => "not probed yet".into(),
            Some(Ok(())) => "ok".into(),
            Some(Err(r)) => r.to_string(),
        }
    }

    /// Records a result; returns true when `up` changed.
    fn record(
        &mut self,
        r: Result<(), FailReason>,
        threshold: u32,
        now: Duration,
        rtt: Duration,
    ) -> bool {
        self.probes += 1;
        self.last = Some(r);
        let threshold = threshold.max(1);
        let before = self.up;
        match r {
            Ok(()) => {
                self.ok_streak += 1;
                self.fail_streak = 0;
                self.rtt = Some(rtt);
                // Down until the first success; after a failure, back only
                // after `threshold` successes in a row.
                if !self.up && (!self.ever_up || self.ok_streak >= threshold) {
                    self.up = true;
                    self.ever_up = true;
                }
            }
            Err(_) => {
                self.fail_streak += 1;
                self.ok_streak = 0;
                if self.up && self.fail_streak >= threshold {
                    self.up = false;
                }
            }
        }
        if self.up != before {
            self.last_change = Some(now);
        }
        self.up != before
    }
}

/// What a successor process needs of a [`DipHealth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedHealth {
    /// Up.
    pub up: bool,
    /// It has been up before (a later success brings it back only after
    /// the threshold).
    pub ever_up: bool,
    /// Consecutive successes.
    pub ok_streak: u32,
    /// Consecutive failures.
    pub fail_streak: u32,
    /// The last result.
    pub last: Option<Result<(), FailReason>>,
    /// Probes completed.
    pub probes: u64,
}

impl From<&DipHealth> for SavedHealth {
    fn from(h: &DipHealth) -> SavedHealth {
        SavedHealth {
            up: h.up,
            ever_up: h.ever_up,
            ok_streak: h.ok_streak,
            fail_streak: h.fail_streak,
            last: h.last,
            probes: h.probes,
        }
    }
}

/// A DIP to probe, and where its health goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// VIP address, port and protocol (to find the pool to update).
    pub vip: (IpAddr, u16, u8),
    /// Index of the backend in the VIP's configuration.
    pub backend: usize,
    /// The DIP's address (IPv4).
    pub ip: Ipv4Addr,
    /// How to probe it.
    pub spec: ProbeSpec,
}

/// A DIP whose health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// Index of the target in the prober.
    pub target: usize,
    /// The VIP.
    pub vip: (IpAddr, u16, u8),
    /// The backend index.
    pub backend: usize,
    /// New health.
    pub up: bool,
    /// Why (the last probe's result: `ok`, `http 500`, ...).
    pub reason: String,
}

/// How the prober attaches to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProberConfig {
    /// Probe source address.
    pub source: Ipv4Addr,
    /// Prefix length of the source's subnet; the gateway must be inside it
    /// (smoltcp only takes ARP answers from its own subnet).
    pub prefix_len: u8,
    /// The prober's MAC.
    pub mac: [u8; 6],
    /// Next hop for every probe (the switch's gateway address).
    pub gateway: Ipv4Addr,
    /// Seed of the jitter, of the first local port and of the TCP initial
    /// sequence numbers: fixed in tests (runs are reproducible), different
    /// for every process in production ([`ProberConfig::process_seed`]).
    pub seed: u64,
}

impl ProberConfig {
    /// A seed of this process and moment (clock and process id mixed), for
    /// probers that must not repeat an earlier process's ports and sequence
    /// numbers.
    pub fn process_seed() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut z = nanos ^ (u64::from(std::process::id()) << 32);
        // SplitMix64's finaliser: nearby clocks give unrelated seeds.
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

struct Inflight {
    target: usize,
    handle: SocketHandle,
    started: Duration,
    deadline: Duration,
    sent: bool,
    established: bool,
    response: Vec<u8>,
}

/// Probes many DIPs from one thread.
pub struct Prober<P: Port, A: BufAlloc<Buf = P::Buf> = Pool> {
    iface: Interface,
    dev: PortDevice<P, A>,
    sockets: SocketSet<'static>,
    targets: Vec<Target>,
    health: Vec<DipHealth>,
    /// False for retired targets: no longer probed, results ignored.
    active: Vec<bool>,
    queue: BinaryHeap<Reverse<(Duration, usize)>>,
    inflight: Vec<Inflight>,
    draining: Vec<(SocketHandle, Duration)>,
    next_port: u16,
    rng: u64,
}

const HEADER_MAX: usize = 512;

fn sinstant(t: Duration) -> SInstant {
    SInstant::from_micros(t.as_micros() as i64)
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> Prober<P, A> {
    /// A prober on `dev` with `cfg`'s address, MAC and gateway. `now` is the
    /// prober's clock (any monotonic origin).
    pub fn new(mut dev: PortDevice<P, A>, cfg: &ProberConfig, now: Duration) -> Self {
        let hw = HardwareAddress::Ethernet(EthernetAddress(cfg.mac));
        // The seed also picks the TCP initial sequence numbers and the first
        // local port: a prober started again within a backend's TIME_WAIT
        // (60 s on Linux) must not reuse the same (port, ISN) sequence, or
        // the backend answers its SYNs as old duplicates and probes fail.
        let mut config = Config::new(hw);
        config.random_seed = cfg.seed;
        let mut iface = Interface::new(config, &mut dev, sinstant(now));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(
                IpAddress::Ipv4(cfg.source),
                cfg.prefix_len.min(32),
            ));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(cfg.gateway);
        Prober {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            targets: Vec::new(),
            health: Vec::new(),
            active: Vec::new(),
            queue: BinaryHeap::new(),
            inflight: Vec::new(),
            draining: Vec::new(),
            next_port: 49152 + (cfg.seed % 16384) as u16,
            rng: cfg.seed | 1,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: only for jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Adds a DIP; its first probe is at a random point of its first interval.
    pub fn add(&mut self, t: Target, now: Duration) -> usize {
        let i = self.targets.len();
        let iv = t.spec.interval.as_micros().max(1) as u64;
        let first = now + Duration::from_micros(self.random() % iv);
        self.targets.push(t);
        self.health.push(DipHealth::new());
        self.active.push(true);
        self.queue.push(Reverse((first, i)));
        i
    }

    /// Stops probing target `i` (its backend left the configuration, or its
    /// probe changed): it is not probed again and a result still in flight
    /// is ignored. Indices stay stable; a new probe is a new target.
    pub fn retire(&mut self, i: usize) {
        if let Some(a) = self.active.get_mut(i) {
            *a = false;
        }
    }

    /// True while target `i` is probed.
    pub fn is_active(&self, i: usize) -> bool {
        self.active.get(i).copied().unwrap_or(false)
    }

    /// The targets.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Health of target `i`.
    pub fn health(&self, i: usize) -> Option<&DipHealth> {
        self.health.get(i)
    }

    /// Sets target `i`'s health to what another process learnt of the same
    /// backend (a hitless upgrade): up or down, the streaks, the last
    /// result and how many probes, so that the switch goes on from there
    /// instead of starting the backend down. False for no such target.
    pub fn restore_health(&mut self, i: usize, saved: &SavedHealth) -> bool {
        let Some(h) = self.health.get_mut(i) else {
            return false;
        };
        h.up = saved.up;
        h.ever_up = saved.up || saved.ever_up;
        h.ok_streak = saved.ok_streak;
        h.fail_streak = saved.fail_streak;
        h.last = saved.last;
        h.probes = saved.probes;
        true
    }

    /// Probes in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// When `poll` next needs to run (the earliest of the next scheduled probe
    /// and what smoltcp asks for).
    pub fn poll_at(&mut self, now: Duration) -> Duration {
        let mut at = self
            .queue
            .peek()
            .map_or(now + Duration::from_secs(1), |Reverse((t, _))| *t);
        if let Some(d) = self.iface.poll_delay(sinstant(now), &self.sockets) {
            at = at.min(now + Duration::from_micros(d.total_micros()));
        }
        if let Some(i) = self.inflight.iter().map(|f| f.deadline).min() {
            at = at.min(i);
        }
        at.max(now)
    }

    fn local_port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if p == 65535 { 49152 } else { p + 1 };
        p
    }

    fn start(&mut self, i: usize, now: Duration) -> Option<HealthChange> {
        let t = self.targets.get(i)?;
        let (ip, port, timeout) = (t.ip, t.spec.port, t.spec.timeout);
        let rx = tcp::SocketBuffer::new(vec![0; 1024]);
        let tx = tcp::SocketBuffer::new(vec![0; 512]);
        let mut sock = tcp::Socket::new(rx, tx);
        sock.set_timeout(Some(SDuration::from_micros(timeout.as_micros() as u64)));
        let local = self.local_port();
        let remote = (IpAddress::Ipv4(ip), port);
        if sock.connect(self.iface.context(), remote, local).is_err() {
            // Only an unusable address gets here (e.g. 0.0.0.0): a failure.
            return self.finish_result(i, Err(FailReason::Rst), now, now);
        }
        let handle = self.sockets.add(sock);
        self.inflight.push(Inflight {
            target: i,
            handle,
            started: now,
            deadline: now + timeout,
            sent: false,
            established: false,
            response: Vec::new(),
        });
        None
    }

    fn finish_result(
        &mut self,
        i: usize,
        r: Result<(), FailReason>,
        started: Duration,
        now: Duration,
    ) -> Option<HealthChange> {
        if !self.is_active(i) {
            return None;
        }
        let threshold = self.targets.get(i)?.spec.threshold;
        let h = self.health.get_mut(i)?;
        if h.record(r, threshold, now, now.saturating_sub(started)) {
            let t = &self.targets[i];
            return Some(HealthChange {
                target: i,
                vip: t.vip,
                backend: t.backend,
                up: h.up,
                reason: h.reason(),
            });
        }
        None
    }

    /// Runs due probes, moves packets, collects results. Returns the DIPs
    /// whose health changed.
    pub fn poll(&mut self, now: Duration) -> Vec<HealthChange> {
        let mut changes = Vec::new();
        // Start what is due and schedule the next round with jitter.
        while let Some(&Reverse((t, i))) = self.queue.peek() {
            if t > now {
                break;
            }
            self.queue.pop();
            if !self.is_active(i) {
                continue; // retired: not rescheduled
            }
            let Some(iv) = self.targets.get(i).map(|t| t.spec.interval) else {
                continue;
            };
            let iv_us = iv.as_micros().max(10) as u64;
            let jitter = self.random() % (iv_us / 5 + 1);
            let next = t + Duration::from_micros(iv_us - iv_us / 10 + jitter);
            self.queue.push(Reverse((next.max(now), i)));
            if self.inflight.iter().any(|f| f.target == i) {
                continue; // the previous probe of this DIP is still running
            }
            if let Some(c) = self.start(i, now) {
                changes.push(c);
            }
        }
        self.iface
            .poll(sinstant(now), &mut self.dev, &mut self.sockets);
        self.dev.flush();

        let mut k = 0;
        while k < self.inflight.len() {
            let outcome = self.check(k, now);
            match outcome {
                None => k += 1,
                Some((r, graceful)) => {
                    let f = self.inflight.swap_remove(k);
                    let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
                    if graceful {
                        sock.close();
                        self.draining.push((f.handle, now + Duration::from_secs(2)));
                    } else {
                        sock.abort();
                        self.draining.push((f.handle, now));
                    }
                    if let Some(c) = self.finish_result(f.target, r, f.started, now) {
                        changes.push(c);
                    }
                }
            }
        }
        // Send the FINs/RSTs just queued, then free finished sockets.
        self.iface
            .poll(sinstant(now), &mut self.dev, &mut self.sockets);
        self.dev.flush();
        let sockets = &mut self.sockets;
        self.draining.retain(|&(h, until)| {
            let st = sockets.get::<tcp::Socket>(h).state();
            let done = matches!(st, tcp::State::Closed | tcp::State::TimeWait) || now >= until;
            if done {
                sockets.remove(h);
            }
            !done
        });
        changes
    }

    /// The outcome of in-flight probe `k`, if decided, and whether to close
    /// gracefully.
    fn check(&mut self, k: usize, now: Duration) -> Option<(Result<(), FailReason>, bool)> {
        let f = self.inflight.get_mut(k)?;
        let t = self.targets.get(f.target)?;
        let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
        let state = sock.state();
        if matches!(state, tcp::State::Established | tcp::State::CloseWait) {
            f.established = true;
        }
        match &t.spec.kind {
            ProbeKind::Tcp => {
                if f.established {
                    return Some((Ok(()), true));
                }
            }
            ProbeKind::Http { path } => {
                if f.established && !f.sent && sock.can_send() {
                    let req = format!(
                        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: pollux-probe\r\nConnection: close\r\n\r\n",
                        t.ip, t.spec.port
                    );
                    if sock.send_slice(req.as_bytes()).is_ok() {
                        f.sent = true;
                    }
                }
                while sock.can_recv() && f.response.len() < HEADER_MAX {
                    let mut buf = [0u8; 256];
                    match sock.recv_slice(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => f.response.extend_from_slice(&buf[..n]),
                    }
                }
                if let Some(end) = f.response.windows(2).position(|w| w == b"\r\n") {
                    return Some((status(&f.response[..end]), true));
                }
                if f.response.len() >= HEADER_MAX {
                    return Some((Err(FailReason::BadResponse), false));
                }
                if f.established
                    && matches!(
                        state,
                        tcp::State::CloseWait
                            | tcp::State::LastAck
                            | tcp::State::TimeWait
                            | tcp::State::Closing
                    )
                {
                    // The server closed before a complete status line.
                    return Some((Err(FailReason::BadResponse), true));
                }
            }
        }
        if state == tcp::State::Closed {
            // Closed without our doing: a RST (refused or mid-request), or
            // smoltcp's own timeout.
            return Some((
                Err(if now >= f.deadline {
                    FailReason::Timeout
                } else {
                    FailReason::Rst
                }),
                false,
            ));
        }
        if now >= f.deadline {
            return Some((Err(FailReason::Timeout), false));
        }
        None
    }
}

/// Parses an HTTP status line: healthy only on 200.
fn status(line: &[u8]) -> Result<(), FailReason> {
    let text = std::str::from_utf8(line).map_err(|_| FailReason::BadResponse)?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || code.len() != 3 {
        return Err(FailReason::BadResponse);
    }
    match code.parse::<u16>() {
        Ok(200) => Ok(()),
        Ok(c) if (100..600).contains(&c) => Err(FailReason::Http(c)),
        _ => Err(FailReason::BadResponse),
    }
}

/// The IPv4 address of a 16-byte key address, if it is one.
pub fn ipv4_of(b: [u8; 16]) -> Option<Ipv4Addr> {
    match from16(b) {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status(b"HTTP/1.1 200 OK"), Ok(()));
        assert_eq!(status(b"HTTP/1.0 200"), Ok(()));
        assert_eq!(
            status(b"HTTP/1.1 503 Service Unavailable"),
            Err(FailReason::Http(503))
        );
        assert_eq!(status(b"HTTP/1.1 301 Moved"), Err(FailReason::Http(301)));
        for bad in [
            &b"hello"[..],
            b"HTTP/2 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 abc",
            b"HTTP/1.1 999 X",
            b"\xff\xfe",
        ] {
            assert_eq!(status(bad), Err(FailReason::BadResponse), "{bad:?}");
        }
    }

    #[test]
    fn state_machine() {
        let mut h = DipHealth::new();
        let s = Duration::ZERO;
        assert!(!h.up);
        // Down until the first success, which brings it up at once.
        assert!(!h.record(Err(FailReason::Timeout), 2, s, s));
        assert!(h.record(Ok(()), 2, s, s));
        assert!(h.up);
        // One failure is not enough with threshold 2; two are.
        assert!(!h.record(Err(FailReason::Http(500)), 2, s, s));
        assert!(h.up);
        assert!(h.record(Err(FailReason::Http(500)), 2, s, s));
        assert!(!h.up);
        assert_eq!(h.reason(), "http 500");
        // Back only after two successes in a row.
        assert!(!h.record(Ok(()), 2, s, s));
        assert!(!h.record(Err(FailReason::Rst), 2, s, s));
        assert!(!h.record(Ok(()), 2, s, s));
        assert!(h.record(Ok(()), 2, s, Duration::from_millis(3)));
        assert_eq!(h.rtt, Some(Duration::from_millis(3)));
        assert_eq!(h.probes, 8);
    }
}
