//! Hitless upgrade: a new pollux process (`pollux run --takeover SOCKET`)
//! takes over from the running one, with its connections, probe states,
//! counters and port sockets.
//!
//! The conversation (the old process is "old", the successor "new"):
//!
//! 1. new binds a one-time handover socket beside the control socket and
//!    asks `POST /v1/takeover` on old's control API with its path and the
//!    state formats it reads. old checks that it can hand every port over
//!    and answers 202, or refuses (409) and nothing happens.
//! 2. old stops its workers (traffic stops: the blackout starts), takes
//!    their state and connects to the handover socket: one message with
//!    the [`State`] (JSON) and the port sockets (`SCM_RIGHTS`).
//! 3. new checks the format and the configuration (old's running one, or
//!    its own `--config` when it keeps the same ports and workers: checked
//!    against `GET /v1/config` before it asks), opens its ports on the
//!    sockets it got, restores connections, SNAT layouts, probe states,
//!    counters and the SYN-cookie secret, and says [`Msg::Ready`] (or
//!    [`Msg::Abort`] with why).
//! 4. old stops serving its control API and says [`Msg::Go`]: the ports
//!    are new's from here. New opens the ports it opens itself, serves the
//!    control socket, says [`Msg::Started`] and starts its workers; old
//!    exits. The blackout ends when the workers poll (each first commits
//!    its tables' memory, unless built ahead).
//!
//! Until `Go`, any failure of new (a refusal, an error, being killed: old
//! sees the socket close) leaves old running: it starts its workers again
//! on the same ports and state and goes on. After `Go`, old goes on only
//! if new says `Abort` (it could not open a port) or is dead without
//! having said `Started` (its process gone); while new lives, old never
//! polls the ports again (two processes on one ring would corrupt it), and
//! exits with an error if new neither starts nor dies in time.
//!
//! Ports hand over by driver: `af_packet` passes its sockets with the
//! positions of its rings (nothing the kernel queued is lost or read
//! twice); `af_xdp` its socket, the memfd of its UMEM, its XDP objects
//! (the program stays attached) and its free transmit frames, the ring
//! indexes being in the shared rings; DPDK vhost-user ports (`net_vhost`) are opened by new once old
//! has said go (new runs DPDK under a file prefix of its own, made before
//! it asks), and each guest's QEMU takes new's connection when old's
//! closes as old exits; other DPDK devices (PCI functions, vdevs) are
//! one process's at a time: old removes them from its process once its
//! workers stop (and probes them again if the handover fails), new opens
//! them after go. The probers' internal ports are rebuilt. `pcap` and
//! `ring` ports cannot hand over: old refuses the takeover, naming the
//! port.

use crate::api::PortCounters;
use dataplane::port::fdpass;
use dataplane::{DropReason, PortStats};
use lb::health::HealthRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use vswitch::switch::handover::{WorkerImport, WorkerRecord};

/// The state format this build writes.
pub const FORMAT: u32 = 1;
/// The state formats this build reads.
pub const READS: &[u32] = &[1];
/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Port sockets one handover carries at most.
pub const MAX_SOCKETS: usize = fdpass::MAX_FDS;

/// Largest state message read (a million connections fit).
const MAX_STATE: usize = 1 << 30;

/// How long old waits for new's `Ready` (restoring a large table takes a
/// while), and for `Started` after `Go`; how long a dead successor's
/// process may take to be seen gone.
const READY_WAIT: Duration = Duration::from_secs(60);
const STARTED_WAIT: Duration = Duration::from_secs(60);
const GONE_WAIT: Duration = Duration::from_secs(5);

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The running pollux could not be reached or refused.
    #[error("the running pollux at {socket}: {reason}")]
    Refused {
        /// Its control socket.
        socket: PathBuf,
        /// What it said, or why it could not be asked.
        reason: String,
    },
    /// The handover conversation broke.
    #[error("handover: {0}")]
    Io(String),
    /// The state or configuration received cannot be used.
    #[error("{0}")]
    Unusable(String),
}

fn io(what: &str) -> impl Fn(std::io::Error) -> TakeoverError + '_ {
    move |e| TakeoverError::Io(format!("{what}: {e}"))
}

/// `POST /v1/takeover`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The handover socket to connect to.
    pub socket: PathBuf,
    /// State formats the successor reads.
    pub formats: Vec<u32>,
    /// Its version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
}

/// One queue of a port as handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Index of its socket among the descriptors of the message (none for
    /// a port the successor opens itself: vhost-user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<usize>,
    /// Next rx ring slot.
    #[serde(default)]
    pub rx_next: usize,
    /// Next tx ring slot.
    #[serde(default)]
    pub tx_next: usize,
    /// Ring slot size.
    #[serde(default)]
    pub frame_size: usize,
    /// Slots per ring.
    #[serde(default)]
    pub frames: usize,
    /// Indexes of further descriptors the queue needs (af_xdp: its UMEM's
    /// memory and its XDP map, program and link).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_fds: Vec<usize>,
    /// UMEM frames free for transmit (af_xdp).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub free_frames: Vec<u64>,
    /// The queue's counters so far.
    pub counters: PortCounters,
}

/// A configured port as handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// Its name.
    pub name: String,
    /// Its driver.
    pub driver: String,
    /// One per worker.
    pub queues: Vec<QueueState>,
}

/// Everything old hands new.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The format ([`FORMAT`] of the writer).
    pub format: u32,
    /// The writer's version.
    pub version: String,
    /// The writer's process id.
    pub pid: u32,
    /// When its workers stopped (ns since the Unix epoch).
    pub stopped_at_ns: u64,
    /// Its running configuration (API changes included).
    pub config: serde_json::Value,
    /// The file it reloads on SIGHUP, which the successor reloads too
    /// (unless given its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
    /// Its policy generation.
    pub generation: u64,
    /// The SYN cookies' secret.
    pub syn_cookie_key: [u8; 16],
    /// The configured ports.
    pub ports: Vec<PortState>,
    /// Per worker: connections and SNAT layouts.
    pub workers: Vec<WorkerRecord>,
    /// Probe states.
    pub probes: Vec<HealthRecord>,
    /// Per worker, its counters so far (what the successor adds its own
    /// to, so that they only grow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_counters: Vec<crate::api::WorkerCounters>,
    /// The underlay's resolved neighbours (address, MAC): the successor's
    /// tunnels and routes need not wait for ARP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neighbours: Vec<(std::net::Ipv4Addr, [u8; 6])>,
}

/// The other messages of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "msg")]
pub enum Msg {
    /// new: ports open and state restored; waiting for `Go`.
    Ready,
    /// new: cannot take over.
    Abort {
        /// Why.
        reason: String,
    },
    /// old: stopped serving; the ports are new's.
    Go,
    /// new: starting its workers; old exits.
    Started,
}

/// How a handover ended, for the process that offered it.
#[derive(Debug)]
pub enum Outcome {
    /// The successor runs: exit.
    HandedOver,
    /// The successor failed before it could touch the ports: go on.
    Failed(TakeoverError),
    /// The successor owns the ports but neither started nor died in time:
    /// this process must not poll them again; it exits with this error.
    Orphaned(TakeoverError),
}

/// What the last takeover did, as the control API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// When (seconds since the Unix epoch).
    pub at_unix: u64,
    /// The process taken over from.
    pub from_pid: u32,
    /// Its version.
    pub from_version: String,
    /// From its workers' stop to this process's workers' start, in
    /// microseconds: how long no packet was forwarded.
    pub blackout_us: u64,
    /// From the predecessor's workers' stop until every port that reports
    /// its link (DPDK: a vhost-user guest's device ready again) was up, in
    /// microseconds; absent while one is down, and for ports without a
    /// link state (af_packet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links_up_us: Option<u64>,
    /// When the predecessor's workers stopped (ns since the Unix epoch).
    #[serde(default)]
    pub stopped_at_ns: u64,
    /// Connections restored.
    pub connections: u64,
    /// Connections left out: their VIP, backend or vnet is no longer
    /// configured.
    pub connections_dropped: u64,
    /// Probe states restored.
    pub probes: u64,
    /// Port sockets taken over.
    pub sockets: u64,
    /// Fragmented datagrams whose first fragment it had seen, taken over.
    #[serde(default)]
    pub fragments: u64,
}

/// Now, in ns since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn send(s: &mut UnixStream, m: &Msg) -> Result<(), TakeoverError> {
    let text = serde_json::to_vec(m).map_err(|e| TakeoverError::Io(e.to_string()))?;
    fdpass::send(s, &text, &[]).map_err(io("sending"))
}

fn recv(s: &mut UnixStream, wait: Duration) -> Result<Msg, TakeoverError> {
    s.set_read_timeout(Some(wait)).map_err(io("socket"))?;
    let (text, _) = fdpass::recv(s, 1 << 16).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => TakeoverError::Io("the other side went away".into()),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            TakeoverError::Io(format!("no answer within {} s", wait.as_secs()))
        }
        _ => TakeoverError::Io(e.to_string()),
    })?;
    serde_json::from_slice(&text).map_err(|e| TakeoverError::Io(format!("message: {e}")))
}

/// A port's counters as a record.
pub fn counters_of(name: &str, s: &PortStats) -> PortCounters {
    let snap = s.snapshot();
    PortCounters {
        name: name.to_string(),
        rx_packets: snap.rx_packets,
        rx_bytes: snap.rx_bytes,
        tx_packets: snap.tx_packets,
        tx_bytes: snap.tx_bytes,
        drops: s
            .drops
            .nonzero()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..PortCounters::default()
    }
}

/// Adds a predecessor's counters to a port's.
pub fn add_counters(s: &PortStats, c: &PortCounters) {
    use std::sync::atomic::Ordering::Relaxed;
    s.rx_packets.fetch_add(c.rx_packets, Relaxed);
    s.rx_bytes.fetch_add(c.rx_bytes, Relaxed);
    s.tx_packets.fetch_add(c.tx_packets, Relaxed);
    s.tx_bytes.fetch_add(c.tx_bytes, Relaxed);
    let by_name: BTreeMap<&str, DropReason> = DropReason::all().map(|r| (r.name(), r)).collect();
    for (k, v) in &c.drops {
        if let Some(r) = by_name.get(k.as_str()) {
            s.drops.add(*r, *v);
        }
    }
}

// ---- the running process's side ----------------------------------------

/// Waits (up to a few seconds) for process `pid` to be gone.
pub fn wait_gone(pid: u32) {
    let end = std::time::Instant::now() + GONE_WAIT;
    while alive(pid) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tells the successor that asked (`req`) that nothing is handed over: its
/// handover socket is connected to and closed at once, before any state.
pub fn decline(req: &Request) {
    drop(UnixStream::connect(&req.socket));
}

/// True while process `pid` lives (neither gone nor a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(st) => st
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Old's part after its workers stopped: connects to `req.socket`, sends
/// `state` with `fds`, and waits for new's `Ready`; then calls `release`
/// (stop serving the control API), says `Go` and waits for `Started`.
/// A successor that died in between leaves its handover socket's file
/// behind (it removes it itself otherwise): it is removed here.
pub fn offer(
    req: &Request,
    state: &State,
    fds: &[std::os::fd::BorrowedFd<'_>],
    release: impl FnOnce(),
) -> Outcome {
    let out = converse(req, state, fds, release);
    if matches!(out, Outcome::Failed(TakeoverError::Io(_))) {
        // A killed process closes its sockets (the conversation ends) a
        // moment before it is gone.
        let end = std::time::Instant::now() + Duration::from_millis(100);
        while alive(req.pid) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !alive(req.pid) {
            let _ = std::fs::remove_file(&req.socket);
        }
    }
    out
}

fn converse(
    req: &Request,
    state: &State,
    fds: &[std::os::fd::BorrowedFd<'_>],
    release: impl FnOnce(),
) -> Outcome {
    let before_go = || -> Result<UnixStream, TakeoverError> {
        let mut s = UnixStream::connect(&req.socket).map_err(io("connecting"))?;
        // A successor that stops reading must not hold this process (and
        // its traffic) forever.
        s.set_write_timeout(Some(READY_WAIT))
            .map_err(io("socket"))?;
        let text = serde_json::to_vec(state).map_err(|e| TakeoverError::Io(e.to_string()))?;
        fdpass::send(&mut s, &text, fds).map_err(io("sending the state"))?;
        match recv(&mut s, READY_WAIT)? {
            Msg::Ready => Ok(s),
            Msg::Abort { reason } => Err(TakeoverError::Unusable(reason)),
            m => Err(TakeoverError::Io(format!("unexpected {m:?}"))),
        }
    };
    let mut s = match before_go() {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(e),
    };
    release();
    let answer = send(&mut s, &Msg::Go).and_then(|()| recv(&mut s, STARTED_WAIT));
    match answer {
        Ok(Msg::Started) => Outcome::HandedOver,
        Ok(Msg::Abort { reason }) => Outcome::Failed(TakeoverError::Unusable(reason)),
        other => {
            let why = match other {
                Ok(m) => TakeoverError::Io(format!("unexpected {m:?} after go")),
                Err(e) => e,
            };
            // Gone without a word: it never started; still there: it owns
            // the ports now.
            let end = std::time::Instant::now() + GONE_WAIT;
            while alive(req.pid) && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            if alive(req.pid) {
                Outcome::Orphaned(TakeoverError::Io(format!(
                    "pid {} has the ports but did not start ({why}); not polling them again",
                    req.pid
                )))
            } else {
                Outcome::Failed(why)
            }
        }
    }
}

// ---- the successor's side ----------------------------------------------

/// New's end of the conversation, from the state received until it runs.
pub struct Incoming {
    /// What old sent.
    pub state: State,
    /// The port sockets, by the index in [`QueueState::fd`].
    pub fds: Vec<Option<std::os::fd::OwnedFd>>,
    conn: UnixStream,
    /// Old's control socket (new serves it once running).
    pub control: PathBuf,
    /// What was restored (filled in while starting).
    pub report: Takeover,
}

impl Incoming {
    /// Asks the pollux serving `control` to hand over, and receives its
    /// state: what `pollux run --takeover` does first.
    pub fn request(control: &Path) -> Result<Incoming, TakeoverError> {
        let refused = |reason: String| TakeoverError::Refused {
            socket: control.to_path_buf(),
            reason,
        };
        let path = control.with_extension(format!("takeover{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| TakeoverError::Io(format!("cannot bind {}: {e}", path.display())))?;
        // Removed whatever happens next: old has connected by then or never will.
        struct Unlink<'a>(&'a Path);
        impl Drop for Unlink<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let _unlink = Unlink(&path);
        let req = Request {
            socket: path.clone(),
            formats: READS.to_vec(),
            version: VERSION.to_string(),
            pid: std::process::id(),
        };
        let body = serde_json::to_string(&req).map_err(|e| refused(e.to_string()))?;
        let ep = crate::ctl::Endpoint::Unix(control);
        let (status, text) = crate::ctl::call(&ep, "POST", "/v1/takeover", Some(&body))
            .map_err(|e| refused(e.to_string()))?;
        if status != 202 {
            let why = serde_json::from_str::<crate::api::ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(refused(format!("refused ({status}): {why}")));
        }
        // Old connects once its workers stopped and its state is taken.
        listener.set_nonblocking(true).map_err(io("listener"))?;
        let end = std::time::Instant::now() + READY_WAIT;
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > end {
                        return Err(TakeoverError::Io(
                            "the running pollux never connected".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(TakeoverError::Io(format!("accept: {e}"))),
            }
        };
        conn.set_nonblocking(false).map_err(io("socket"))?;
        conn.set_read_timeout(Some(READY_WAIT))
            .map_err(io("socket"))?;
        let (text, fds) = fdpass::recv(&mut conn, MAX_STATE).map_err(io("receiving the state"))?;
        let mut inc = Incoming {
            state: State {
                format: 0,
                version: String::new(),
                pid: 0,
                stopped_at_ns: 0,
                config: serde_json::Value::Null,
                config_file: None,
                generation: 0,
                syn_cookie_key: [0; 16],
                ports: Vec::new(),
                workers: Vec::new(),
                probes: Vec::new(),
                worker_counters: Vec::new(),
                neighbours: Vec::new(),
            },
            fds: fds.into_iter().map(Some).collect(),
            conn,
            control: control.to_path_buf(),
            report: Takeover::default(),
        };
        // A format this build does not read, or a state it cannot parse:
        // old is told why and goes on.
        let parsed = serde_json::from_slice::<State>(&text);
        let format = match &parsed {
            Ok(s) => Some(u64::from(s.format)),
            // (Only on a failure is it read a second time, for the format.)
            Err(_) => serde_json::from_slice::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("format").and_then(|f| f.as_u64())),
        };
        if let Some(f) = format.filter(|&f| !READS.iter().any(|&r| u64::from(r) == f)) {
            return Err(inc.abort(format!(
                "state format {f} is not one this pollux reads ({READS:?})"
            )));
        }
        match parsed {
            Ok(s) => inc.state = s,
            Err(e) => return Err(inc.abort(format!("the state does not parse: {e}"))),
        }
        inc.report.from_pid = inc.state.pid;
        inc.report.from_version = inc.state.version.clone();
        inc.report.sockets = inc.fds.len() as u64;
        Ok(inc)
    }

    /// Tells old why this process will not take over (old goes on), and
    /// returns the error to exit with.
    pub fn abort(&mut self, reason: String) -> TakeoverError {
        let _ = send(
            &mut self.conn,
            &Msg::Abort {
                reason: reason.clone(),
            },
        );
        TakeoverError::Unusable(reason)
    }

    /// Takes the socket of queue `q`.
    pub fn take_fd(&mut self, q: &QueueState) -> Option<std::os::fd::OwnedFd> {
        self.fds.get_mut(q.fd?)?.take()
    }

    /// The further descriptors of `q` (taken: each once); `None` if one
    /// is missing.
    pub fn take_extra(&mut self, q: &QueueState) -> Option<Vec<std::os::fd::OwnedFd>> {
        q.extra_fds
            .iter()
            .map(|&i| self.fds.get_mut(i)?.take())
            .collect()
    }

    /// Everything is ready: tells old, waits for `Go`.
    pub fn ready(&mut self) -> Result<(), TakeoverError> {
        send(&mut self.conn, &Msg::Ready)?;
        match recv(&mut self.conn, READY_WAIT)? {
            Msg::Go => Ok(()),
            m => Err(TakeoverError::Io(format!("unexpected {m:?} instead of go"))),
        }
    }

    /// About to start the workers: tells old (which exits; if it cannot
    /// be told, it is gone already) and notes the blackout so far (the
    /// caller notes it again once the workers poll).
    pub fn started(&mut self) {
        let now = now_ns();
        self.report.blackout_us = now.saturating_sub(self.state.stopped_at_ns) / 1000;
        self.report.stopped_at_ns = self.state.stopped_at_ns;
        self.report.at_unix = now / 1_000_000_000;
        let _ = send(&mut self.conn, &Msg::Started);
    }

    /// Adds one worker's import to the report.
    pub fn count(&mut self, w: &WorkerImport) {
        self.report.connections += w.conns.conns;
        self.report.connections_dropped += w.conns.vip_gone + w.conns.duplicate + w.vnet_gone;
        self.report.fragments += w.frags;
    }
}

/// Notes in `t` when every port that reports a link is up after a
/// takeover (once): `ports`' link states.
pub fn note_links(t: &mut Takeover, ports: &[(String, Vec<std::sync::Arc<PortStats>>)]) {
    if t.links_up_us.is_some() {
        return;
    }
    let links: Vec<bool> = ports
        .iter()
        .filter_map(|(_, q)| q.first()?.link.as_ref().map(|l| l.is_up()))
        .collect();
    if !links.is_empty() && links.iter().all(|&up| up) {
        t.links_up_us = Some(now_ns().saturating_sub(t.stopped_at_ns) / 1000);
    }
}

/// The state old hands over, less ports and workers (filled by the caller).
pub fn state_of(
    config: &crate::config::Config,
    config_file: Option<&Path>,
    generation: u64,
    cookie_key: [u8; 16],
    stopped_at_ns: u64,
) -> Result<State, TakeoverError> {
    Ok(State {
        format: FORMAT,
        version: VERSION.to_string(),
        pid: std::process::id(),
        stopped_at_ns,
        config: serde_json::to_value(config)
            .map_err(|e| TakeoverError::Io(format!("the configuration as JSON: {e}")))?,
        config_file: config_file.map(Path::to_path_buf),
        generation,
        syn_cookie_key: cookie_key,
        ports: Vec::new(),
        workers: Vec::new(),
        probes: Vec::new(),
        worker_counters: Vec::new(),
        neighbours: Vec::new(),
    })
}

/// True for a port the successor opens itself once its predecessor has
/// stopped: a DPDK vhost-user port (`net_vhost`), whose guest's QEMU takes
/// the successor's connection when the predecessor's closes.
pub fn reopens(p: &crate::config::PortCfg) -> bool {
    matches!(&p.spec, dataplane::port::spec::PortSpec::Dpdk { devargs: Some(d), .. } if d.starts_with("net_vhost"))
}

/// Why old cannot hand `cfg`'s ports over, one line per port; empty when
/// it can.
pub fn port_problems(cfg: &crate::config::Config) -> Vec<String> {
    cfg.port
        .iter()
        .filter(|p| !matches!(p.spec.driver(), "af_packet" | "af_xdp" | "dpdk"))
        .map(|p| {
            format!(
                "port {:?} (driver {}): only af_packet, af_xdp and dpdk ports hand over to a successor",
                p.name,
                p.spec.driver()
            )
        })
        .collect()
}

/// How many descriptors the handover of `cfg`'s ports carries: a socket
/// per worker of every af_packet port; the socket, the UMEM's memory and
/// the XDP map, program and link of every af_xdp port (one queue).
pub fn descriptors(cfg: &crate::config::Config) -> usize {
    cfg.port
        .iter()
        .map(|p| match p.spec.driver() {
            "af_packet" => cfg.dataplane.workers.max(1),
            "af_xdp" => 5,
            _ => 0,
        })
        .sum()
}

/// The EAL arguments of a successor: its predecessor's, with a file
/// prefix of its own instead (two DPDK primary processes cannot share
/// one), and without probing the PCI functions of its ports (`pci`, full
/// lower-case addresses) when EAL starts: the predecessor still drives
/// them then (EAL would fail on them), and they are probed once it has
/// let them go. They leave the allow list (`-a`); if that leaves it empty,
/// an address no machine has stands in, so that EAL does not take every
/// other device bound to a DPDK driver; with no allow list, they are
/// blocked (`-b`).
pub fn successor_eal_args(args: &[String], pci: &[String]) -> Vec<String> {
    /// In the allow list of a successor whose every allowed device is a
    /// port's: a PCI address no machine has (domain ffff).
    const NOTHING: &str = "ffff:ff:1f.7";
    let mut prefix = "rte".to_string();
    let mut out = Vec::new();
    let (mut listed, mut kept) = (0, 0);
    let ours = |dev: &str| {
        let name = dev.split(',').next().unwrap_or(dev);
        dataplane::port::spec::pci_address(name).is_some_and(|a| pci.contains(&a))
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // (The successor's own prefix replaces it.)
        if let Some(p) = a.strip_prefix("--file-prefix=") {
            prefix = p.to_string();
            continue;
        } else if a == "--file-prefix" {
            if let Some(p) = it.next() {
                prefix = p.clone();
            }
            continue;
        }
        let (flag, dev) = if ["-a", "--allow", "-w", "--pci-whitelist"].contains(&a.as_str()) {
            (Some(a.clone()), it.next().cloned())
        } else if let Some(d) = a.strip_prefix("--allow=") {
            (None, Some(d.to_string()))
        } else if let Some(d) = a.strip_prefix("-a").filter(|d| !d.is_empty()) {
            (None, Some(d.to_string()))
        } else {
            out.push(a.clone());
            continue;
        };
        let Some(dev) = dev else {
            out.extend(flag);
            continue;
        };
        listed += 1;
        if !ours(&dev) {
            kept += 1;
            match flag {
                Some(flag) => out.extend([flag, dev]),
                None => out.push(a.clone()),
            }
        }
    }
    if listed == 0 {
        for p in pci {
            out.extend(["-b".to_string(), p.clone()]);
        }
    } else if kept == 0 {
        out.extend(["-a".to_string(), NOTHING.to_string()]);
    }
    // A successor of a successor does not grow the name.
    let base = prefix.split("-pid").next().unwrap_or(&prefix).to_string();
    out.push(format!("--file-prefix={base}-pid{}", std::process::id()));
    out
}

/// The configuration the pollux serving `control` runs (`GET
/// /v1/config`), which a successor prepares with before it asks to take
/// over.
pub fn running_config(control: &Path) -> Result<crate::config::Config, TakeoverError> {
    let refused = |reason: String| TakeoverError::Refused {
        socket: control.to_path_buf(),
        reason,
    };
    let ep = crate::ctl::Endpoint::Unix(control);
    let (status, text) =
        crate::ctl::call(&ep, "GET", "/v1/config", None).map_err(|e| refused(e.to_string()))?;
    if status != 200 {
        return Err(refused(format!("GET /v1/config answered {status}")));
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| refused(format!("its configuration: {e}")))?;
    serde_json::from_value(v.get("config").cloned().unwrap_or_default())
        .map_err(|e| refused(format!("its configuration does not parse here: {e}")))
}

/// Why new cannot run `mine` on old's ports, one line per problem: the
/// same ports (names, drivers, interfaces, in order) and workers.
pub fn compatibility(old: &crate::config::Config, mine: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.port != mine.port {
        let names = |c: &crate::config::Config| {
            c.port
                .iter()
                .map(|p| format!("{} ({:?})", p.name, p.spec))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(format!(
            "ports differ from the running pollux's: [{}] here, [{}] there",
            names(mine),
            names(old)
        ));
    }
    if old.dataplane.workers.max(1) != mine.dataplane.workers.max(1) {
        out.push(format!(
            "workers differ from the running pollux's: {} here, {} there",
            mine.dataplane.workers.max(1),
            old.dataplane.workers.max(1)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state format as this build writes it: a fixture of format 1
    /// (`tests/data/takeover-state-v1.json`, written by the first release
    /// that had it) must always parse.
    #[test]
    fn the_first_format_still_parses() {
        let text = include_str!("../tests/data/takeover-state-v1.json");
        let s: State = serde_json::from_str(text).unwrap();
        assert_eq!(s.format, 1);
        assert!(READS.contains(&s.format));
        assert!(!s.workers.is_empty());
        let conns: usize = s
            .workers
            .iter()
            .flat_map(|w| &w.vnets)
            .map(|v| v.core.conns.len())
            .sum();
        assert!(conns > 0);
        let cfg: crate::config::Config = serde_json::from_value(s.config.clone()).unwrap();
        cfg.validate().unwrap();
        // It writes back to the same JSON (nothing in it is dropped).
        let again: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(
            again,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
    }

    #[test]
    fn a_successor_runs_dpdk_under_a_file_prefix_of_its_own() {
        let me = std::process::id();
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = successor_eal_args(&v(&["-l", "1", "--file-prefix=px1", "--no-huge"]), &[]);
        assert_eq!(
            got,
            v(&[
                "-l",
                "1",
                "--no-huge",
                &format!("--file-prefix=px1-pid{me}")
            ])
        );
        let got = successor_eal_args(&v(&["--file-prefix", "px1-pid77"]), &[]);
        assert_eq!(got.last().unwrap(), &format!("--file-prefix=px1-pid{me}"));
        let got = successor_eal_args(&v(&["--no-pci"]), &[]);
        assert_eq!(got.last().unwrap(), &format!("--file-prefix=rte-pid{me}"));
        // A port's PCI function leaves the allow list (however written);
        // an address no machine has keeps the list from becoming empty
        // (EAL would then take every DPDK-bound device); without an allow
        // list, the port's function is blocked at start.
        let vf = "0000:01:10.0".to_string();
        let got = successor_eal_args(
            &v(&["-l", "0", "-a", "01:10.0", "--file-prefix=s"]),
            std::slice::from_ref(&vf),
        );
        let want = format!("--file-prefix=s-pid{me}");
        assert_eq!(got, v(&["-l", "0", "-a", "ffff:ff:1f.7", &want]));
        let got = successor_eal_args(
            &v(&[
                "-a",
                "0000:01:10.0,txq_inline=0",
                "--allow=0000:02:00.0",
                "-a0000:01:10.0",
            ]),
            std::slice::from_ref(&vf),
        );
        let want = format!("--file-prefix=rte-pid{me}");
        assert_eq!(got, v(&["--allow=0000:02:00.0", &want]));
        let got = successor_eal_args(&v(&["-l", "0"]), &[vf]);
        assert_eq!(got, v(&["-l", "0", "-b", "0000:01:10.0", &want]));
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            Msg::Ready,
            Msg::Go,
            Msg::Started,
            Msg::Abort {
                reason: "no".into(),
            },
        ] {
            let t = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Msg>(&t).unwrap(), m);
        }
        assert_eq!(serde_json::to_string(&Msg::Go).unwrap(), r#"{"msg":"go"}"#);
    }
}
