//! The BGP speaker beside pollux: BIRD 2, started and configured by this
//! process, announcing each Mux VIP's address to the routers while the VIP
//! can take new flows, so that several Muxes share one VIP by ECMP.
//!
//! pollux owns the policy (which VIPs to announce, and when to withdraw
//! them: no healthy backend, `pollux ctl drain-mux`, stopping); BIRD owns
//! BGP. The configuration BIRD runs is a function of `[bgp]` and the set
//! of addresses to announce ([`bird_config`]); when it changes, pollux
//! writes it and tells BIRD `configure` over its control socket, which
//! changes the routes without resetting the sessions. Sessions' state is
//! read back from `show protocols` for the API and the metrics.
//!
//! Why BIRD 2 rather than FRR: one daemon with one configuration file and
//! one control socket, each instance in its own directory (several Muxes
//! can share a machine, each in its own network namespace, as the tests'
//! do: BIRD listens on port 179 of every address); FRR is zebra, bgpd and
//! watchfrr, configured through vtysh. Why pollux starts it: BIRD lives and
//! dies with pollux (it runs under `setpriv --pdeathsig KILL`), so a Mux
//! whose pollux dies, even by SIGKILL, closes its sessions at once and the
//! routers take its routes away; a companion service would go on
//! announcing a VIP nobody forwards.

use crate::api::{BgpSessionView, BgpView, BgpWithdrawnView};
use crate::config::{BgpCfg, Config};
use crate::takeover::alive;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a read or write on BIRD's socket may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// BIRD started again after it exits: this long at first, twice as long
/// after each exit up to the most, from the least again once it ran a
/// while.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// How often sessions' state is read.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How soon it is read again when BIRD did not answer.
const POLL_RETRY: Duration = Duration::from_millis(250);
/// How long a BIRD just started may take to answer on its socket.
const STARTUP_GRACE: Duration = Duration::from_secs(5);
/// The static protocol that holds the VIPs' routes.
const STATIC: &str = "pollux_vips";

/// Why talking to BIRD failed.
#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    /// Its control socket cannot be reached or read.
    #[error("BIRD control socket {path}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// It answered a command with an error.
    #[error("BIRD refused {command:?}: {reply}")]
    Refused {
        /// The command.
        command: String,
        /// Its reply.
        reply: String,
    },
    /// Its reply ended before its last line.
    #[error("BIRD's reply to {command:?} ended early")]
    Truncated {
        /// The command.
        command: String,
    },
    /// A file of its directory cannot be written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// It cannot be started (setpriv, which starts it, is missing).
    #[error("BIRD ({bird}) not started: setpriv (util-linux): {source}")]
    Spawn {
        /// The binary.
        bird: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A line of a BIRD reply: its code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The four-digit code (0 for a continuation line's, which takes its
    /// predecessor's).
    pub code: u16,
    /// The text.
    pub text: String,
}

/// Sends `command` on BIRD's control socket `sock`; returns the reply's
/// lines. Codes 8000 and above are errors (`Refused`).
pub fn command(sock: &Path, command: &str) -> Result<Vec<Line>, BgpError> {
    let io = |source| BgpError::Socket {
        path: sock.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(sock).map_err(io)?;
    s.set_read_timeout(Some(COMMAND_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(COMMAND_TIMEOUT)).map_err(io)?;
    let mut r = BufReader::new(s.try_clone().map_err(io)?);
    // The greeting: "0001 BIRD 2.0.12 ready."
    read_reply(&mut r, sock, "(greeting)")?;
    s.write_all(format!("{command}\n").as_bytes()).map_err(io)?;
    read_reply(&mut r, sock, command)
}

/// Reads one reply from `sock`: lines `NNNN-text` (more follow), ` text`
/// (the same code goes on) and last `NNNN text`.
fn read_reply(r: &mut impl BufRead, sock: &Path, command: &str) -> Result<Vec<Line>, BgpError> {
    let mut out = Vec::new();
    let mut code = 0u16;
    loop {
        let mut l = String::new();
        let n = r.read_line(&mut l).map_err(|source| BgpError::Socket {
            path: sock.to_path_buf(),
            source,
        })?;
        if n == 0 {
            return Err(BgpError::Truncated {
                command: command.to_string(),
            });
        }
        let l = l.trim_end_matches('\n');
        let head = l.get(..4).and_then(|h| h.parse::<u16>().ok());
        let (text, last) = match (head, l.as_bytes().get(4)) {
            (Some(c), Some(b'-')) => {
                code = c;
                (l.get(5..).unwrap_or(""), false)
            }
            (Some(c), Some(b' ') | None) => {
                code = c;
                (l.get(5..).unwrap_or(""), true)
            }
            _ => (l.strip_prefix(' ').unwrap_or(l), false),
        };
        out.push(Line {
            code,
            text: text.to_string(),
        });
        if code >= 8000 {
            return Err(BgpError::Refused {
                command: command.to_string(),
                reply: text.trim().to_string(),
            });
        }
        if last {
            return Ok(out);
        }
    }
}

/// A BGP protocol's row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolRow {
    /// Its name.
    pub name: String,
    /// BIRD's protocol state (`up`, `start`, `down`...).
    pub state: String,
    /// Since when (`timeformat protocol iso long`: date and time).
    pub since: String,
    /// The BGP state and the last error (`Established`, `Active  Socket:
    /// Connection closed`...).
    pub info: String,
}

/// The BGP protocols of a `show protocols` reply (written with
/// `timeformat protocol iso long`: "since" is a date and a time).
pub fn bgp_rows(lines: &[Line]) -> Vec<ProtocolRow> {
    lines
        .iter()
        .filter(|l| l.code == 1002)
        .filter_map(|l| {
            let mut w = l.text.split_whitespace();
            let (name, proto, _table, state) = (w.next()?, w.next()?, w.next()?, w.next()?);
            let since = format!("{} {}", w.next()?, w.next()?);
            (proto == "BGP").then(|| ProtocolRow {
                name: name.to_string(),
                state: state.to_string(),
                since,
                info: w.collect::<Vec<_>>().join(" "),
            })
        })
        .collect()
}

/// The addresses to announce, and the Mux VIPs not announced with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The Mux VIPs' addresses to announce (/32 each).
    pub announce: BTreeSet<Ipv4Addr>,
    /// The Mux VIPs that make them wanted: name and address.
    pub announce_vips: Vec<(String, Ipv4Addr)>,
    /// Mux VIPs not announced: name, address and why.
    pub withdrawn: Vec<BgpWithdrawnView>,
}

/// What `policy` says to announce: each Mux VIP's address while one of
/// the VIPs at that address has a backend in its table (a healthy one with
/// a weight), none while `draining` or `stopping`.
pub fn wanted(policy: &vswitch::Policy, draining: bool, stopping: bool) -> Wanted {
    let mut w = Wanted::default();
    let mut idle = Vec::new();
    for v in policy.vips() {
        let c = v.config();
        if c.mode != lb::balancer::VipMode::Mux {
            continue;
        }
        // Mux VIPs are IPv4 (checked with the configuration).
        let std::net::IpAddr::V4(a) = c.addr else {
            continue;
        };
        let reason = if stopping {
            "stopping"
        } else if draining {
            "draining"
        } else if v.backends().table().entries().is_empty() {
            "no healthy backend"
        } else {
            w.announce.insert(a);
            w.announce_vips.push((c.name.clone(), a));
            continue;
        };
        idle.push((c.name.clone(), a, reason));
    }
    w.withdrawn = idle
        .into_iter()
        // Another VIP at the address keeps it announced.
        .filter(|(_, a, _)| !w.announce.contains(a))
        .map(|(vip, a, reason)| BgpWithdrawnView {
            vip,
            address: a.to_string(),
            reason: reason.to_string(),
        })
        .collect();
    w
}

/// The next hop announced: the uplink's address.
pub fn next_hop(cfg: &Config) -> Option<Ipv4Addr> {
    cfg.uplink
        .as_ref()
        .and_then(|u| u.address.as_ref())
        .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok())
        .map(|n| n.addr())
}

/// The name of the BGP protocol of the neighbour at `address`: named by
/// its address, so a neighbour added or removed leaves the others' alone.
fn peer_name(address: &str) -> String {
    format!("peer_{}", address.replace(['.', ':'], "_"))
}

/// BIRD's configuration: a static protocol with a route (a blackhole:
/// BIRD installs nothing in any kernel table) for each address of
/// `announce`, exported to each neighbour with `next_hop` as BGP next hop
/// (the uplink pollux forwards on, whatever link the session runs over).
/// Nothing is imported. Graceful restart is off: a Mux that goes away
/// must lose its routes at once, not be kept as stale. Sessions are tried
/// a second after start (BIRD's default waits 5 s).
pub fn bird_config(b: &BgpCfg, next_hop: Ipv4Addr, announce: &BTreeSet<Ipv4Addr>) -> String {
    let router_id = b.router_id.clone().unwrap_or_else(|| next_hop.to_string());
    let mut s = format!(
        "# Written by pollux from its [bgp] section; rewritten on every change.\n\
         log stderr all;\n\
         timeformat protocol iso long;\n\
         router id {router_id};\n\
         protocol device {{ }}\n\
         protocol static {STATIC} {{\n  ipv4;\n"
    );
    for a in announce {
        s.push_str(&format!("  route {a}/32 blackhole;\n"));
    }
    s.push_str("}\n");
    for n in &b.neighbor {
        s.push_str(&format!(
            "protocol bgp {} {{\n  local as {};\n  neighbor {} as {};\n  hold time {};\n  keepalive time {};\n  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 10;\n  graceful restart off;\n  ipv4 {{\n    import none;\n    export filter {{\n      if proto != \"{STATIC}\" then reject;\n      bgp_next_hop = {next_hop};\n      accept;\n    }};\n  }};\n}}\n",
            peer_name(&n.address),
            b.local_as,
            n.address,
            n.remote_as,
            b.hold_time_s,
            b.keepalive().max(1),
        ));
    }
    s
}

/// Writes `text` to `path` whole (a rename over the old file).
fn write_file(path: &Path, text: &str) -> Result<(), BgpError> {
    let file = |source| BgpError::File {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(file)?;
    std::fs::rename(&tmp, path).map_err(file)
}

/// The last line of the log at `path` (its last 4 KiB read).
fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// The BIRD this process runs, and what it was told.
pub struct Speaker {
    child: Option<Child>,
    /// The binary and directory the running BIRD was started with (a
    /// reload that changes either starts it anew).
    started_with: Option<(String, PathBuf)>,
    /// When the running BIRD was started.
    started_at: Option<Instant>,
    /// The configuration BIRD runs (as last accepted).
    applied: Option<String>,
    /// A configuration BIRD refused (not sent again until it changes).
    refused: Option<String>,
    /// The VIPs' static protocol disabled: what withdraws them when BIRD
    /// refused the configuration that would have.
    vips_disabled: bool,
    /// When a configuration that could not be sent is tried again.
    configure_at: Instant,
    /// What it announces.
    announced: BTreeSet<Ipv4Addr>,
    withdrawn: Vec<BgpWithdrawnView>,
    draining: bool,
    stopping: bool,
    sessions: Vec<BgpSessionView>,
    /// When the sessions are read next.
    poll_at: Instant,
    /// Not started before this process is gone (a predecessor's BIRD
    /// holds the sessions until then).
    after: Option<u32>,
    next_start: Instant,
    backoff: Duration,
    starts: u64,
    /// BIRD's last problem (it exited, refused a configuration, could not
    /// be started or told), until it is over.
    error: Option<String>,
    /// The last read of the sessions failed.
    poll_error: Option<String>,
    /// Since when BIRD has not answered while a VIP is to be withdrawn.
    unanswered_since: Option<Instant>,
}

impl Default for Speaker {
    fn default() -> Self {
        Speaker::new()
    }
}

impl Speaker {
    /// A speaker that starts BIRD at its first step.
    pub fn new() -> Speaker {
        let now = Instant::now();
        Speaker {
            child: None,
            started_with: None,
            started_at: None,
            applied: None,
            refused: None,
            vips_disabled: false,
            configure_at: now,
            announced: BTreeSet::new(),
            withdrawn: Vec::new(),
            draining: false,
            stopping: false,
            sessions: Vec::new(),
            poll_at: now,
            after: None,
            next_start: now,
            backoff: BACKOFF_MIN,
            starts: 0,
            error: None,
            poll_error: None,
            unanswered_since: None,
        }
    }

    /// BIRD is started only once process `pid` (the predecessor this one
    /// took over from, whose BIRD holds the sessions) is gone.
    pub fn after(&mut self, pid: u32) {
        self.after = Some(pid);
    }

    /// Drains (withdraws every VIP) or ends a drain; applied at once.
    pub fn set_draining(&mut self, on: bool, cfg: &Config, policy: &vswitch::Policy) {
        if self.draining != on {
            self.draining = on;
            tracing::info!(
                "bgp: {}",
                if on {
                    "draining: every VIP withdrawn"
                } else {
                    "drain ended: VIPs announced again"
                }
            );
        }
        self.step(cfg, policy);
    }

    fn sock(b: &BgpCfg) -> PathBuf {
        b.dir.join("bird.ctl")
    }

    /// Keeps BIRD running (started again after it exits: 1 s, then up to
    /// 10 s later, from 1 s again once it ran a minute) and its
    /// configuration what `cfg` and `policy` say; reads the sessions' state
    /// once a second. Without `[bgp]`, BIRD is stopped.
    pub fn step(&mut self, cfg: &Config, policy: &vswitch::Policy) {
        let Some(b) = &cfg.bgp else {
            self.kill();
            return;
        };
        let Some(hop) = next_hop(cfg) else {
            self.error = Some("the [uplink] has no address to announce".into());
            return;
        };
        let now = Instant::now();
        let w = wanted(policy, self.draining, self.stopping);
        let text = bird_config(b, hop, &w.announce);
        if self.child.is_some()
            && self
                .started_with
                .as_ref()
                .is_some_and(|(bird, dir)| *bird != b.bird || *dir != b.dir)
        {
            tracing::info!("bgp: bird or dir changed: BIRD started anew");
            self.kill();
            self.next_start = now;
        }
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let ran = self.started_at.map_or(Duration::ZERO, |t| t.elapsed());
            if ran >= BACKOFF_RESET {
                self.backoff = BACKOFF_MIN;
            }
            self.next_start = now + self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            let log = b.dir.join("bird.log");
            let why = format!(
                "BIRD exited ({status}) after {:.1} s{}; its log: {}",
                ran.as_secs_f64(),
                last_line(&log).map_or(String::new(), |l| format!(": {l}")),
                log.display()
            );
            tracing::warn!("bgp: {why}");
            self.error = Some(why);
            self.child = None;
            self.forget();
            self.sessions = Self::sessions_down(b, "BIRD not running");
        }
        if self.child.is_none() {
            if let Some(pid) = self.after {
                if alive(pid) {
                    self.note_down(&w, "waiting for the predecessor's BIRD to end");
                    return;
                }
                self.after = None;
            }
            if now < self.next_start {
                self.note_down(&w, "BIRD not running");
                return;
            }
            match self.start(b, &text) {
                Ok(()) => {
                    self.starts += 1;
                    self.applied = Some(text.clone());
                    self.refused = None;
                }
                Err(e) => {
                    tracing::warn!("bgp: {e}");
                    self.error = Some(e.to_string());
                    self.next_start = now + self.backoff;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    self.note_down(&w, "BIRD not running");
                    return;
                }
            }
        }
        if self.applied.as_deref() != Some(text.as_str())
            && self.refused.as_deref() != Some(text.as_str())
            && now >= self.configure_at
        {
            match self.configure(b, &text) {
                Ok(()) => {
                    self.applied = Some(text.clone());
                    self.refused = None;
                    self.error = None;
                }
                Err(e @ BgpError::Refused { .. }) => {
                    tracing::warn!("bgp: {e}");
                    self.error = Some(e.to_string());
                    self.refused = Some(text.clone());
                }
                Err(e) => {
                    // Not listening yet, or not answering: again soon.
                    self.configure_at = now + POLL_RETRY;
                    if self.started_at.is_none_or(|t| t.elapsed() >= STARTUP_GRACE) {
                        self.error = Some(e.to_string());
                    }
                }
            }
        }
        // BIRD runs what is wanted: its VIPs' protocol enabled again if it
        // was disabled. Otherwise what it runs stays, less anything
        // withdrawn since (below).
        if self.applied.as_deref() == Some(text.as_str()) {
            if self.vips_disabled {
                match command(&Self::sock(b), &format!("enable {STATIC}")) {
                    Ok(_) => self.vips_disabled = false,
                    Err(e) => self.error = Some(e.to_string()),
                }
            }
            if self.vips_disabled {
                self.note_down(&w, "BIRD refused its configuration");
            } else {
                self.note(&w);
            }
        }
        // Failing closed: an address BIRD announces that should not be
        // (its new configuration refused or not taken) is withdrawn with
        // every other, by disabling the VIPs' protocol.
        // A BIRD that answers nothing for a while is killed: its sessions
        // close, which withdraws everything (it is started again).
        if !self.vips_disabled && !self.announced.is_subset(&w.announce) && now >= self.configure_at
        {
            match command(&Self::sock(b), &format!("disable {STATIC}")) {
                Ok(_) => {
                    self.vips_disabled = true;
                    self.unanswered_since = None;
                    tracing::warn!(
                        "bgp: BIRD did not take the new configuration: every VIP withdrawn"
                    );
                    self.note_down(&w, "BIRD refused its configuration");
                }
                Err(e) => {
                    self.configure_at = now + POLL_RETRY;
                    self.error = Some(e.to_string());
                    let since = *self.unanswered_since.get_or_insert(now);
                    if now.duration_since(since) >= STARTUP_GRACE {
                        tracing::warn!(
                            "bgp: BIRD has not answered for {} s with a VIP to withdraw: killed",
                            STARTUP_GRACE.as_secs()
                        );
                        self.kill();
                        self.next_start = now + self.backoff;
                        self.note_down(&w, "BIRD not answering");
                    }
                }
            }
        } else {
            self.unanswered_since = None;
        }
        if now >= self.poll_at {
            self.poll(b);
        }
    }

    /// Takes `w` as announced, logging what changed.
    fn note(&mut self, w: &Wanted) {
        self.log_changes(&w.announce, &w.withdrawn);
        self.announced = w.announce.clone();
        self.withdrawn = w.withdrawn.clone();
    }

    /// Takes nothing as announced (BIRD not running, or its VIPs'
    /// protocol disabled): what `w` would announce is withdrawn for
    /// `reason`.
    fn note_down(&mut self, w: &Wanted, reason: &str) {
        let mut withdrawn = w.withdrawn.clone();
        withdrawn.extend(w.announce_vips.iter().map(|(vip, a)| BgpWithdrawnView {
            vip: vip.clone(),
            address: a.to_string(),
            reason: reason.to_string(),
        }));
        self.log_changes(&BTreeSet::new(), &withdrawn);
        self.announced.clear();
        self.withdrawn = withdrawn;
    }

    fn log_changes(&self, now: &BTreeSet<Ipv4Addr>, withdrawn: &[BgpWithdrawnView]) {
        for a in now.difference(&self.announced) {
            tracing::info!("bgp: announcing {a}/32");
        }
        for a in self.announced.difference(now) {
            let why = withdrawn
                .iter()
                .find(|x| x.address == a.to_string())
                .map_or("no Mux VIP", |x| x.reason.as_str());
            tracing::info!("bgp: withdrew {a}/32 ({why})");
        }
    }

    fn start(&mut self, b: &BgpCfg, text: &str) -> Result<(), BgpError> {
        let file = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BgpError::File { path, source }
        };
        std::fs::create_dir_all(&b.dir).map_err(file(&b.dir))?;
        let conf = b.dir.join("bird.conf");
        write_file(&conf, text)?;
        let sock = Self::sock(b);
        // A socket left by a BIRD that died is in the way.
        let _ = std::fs::remove_file(&sock);
        let log_path = b.dir.join("bird.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(file(&log_path))?;
        // setpriv (util-linux) sets the parent-death signal and execs BIRD:
        // when this process dies, BIRD is killed, and its sessions close.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&b.bird)
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| BgpError::Spawn {
                bird: b.bird.clone(),
                source,
            })?;
        tracing::info!(
            "bgp: BIRD started (pid {}), AS {}, {} neighbour(s), in {}",
            child.id(),
            b.local_as,
            b.neighbor.len(),
            b.dir.display()
        );
        self.child = Some(child);
        self.started_with = Some((b.bird.clone(), b.dir.clone()));
        self.started_at = Some(Instant::now());
        self.poll_at = Instant::now();
        self.configure_at = Instant::now();
        Ok(())
    }

    fn configure(&mut self, b: &BgpCfg, text: &str) -> Result<(), BgpError> {
        write_file(&b.dir.join("bird.conf"), text)?;
        command(&Self::sock(b), "configure").map(|_| ())
    }

    /// Every neighbour's session down, for `why`.
    fn sessions_down(b: &BgpCfg, why: &str) -> Vec<BgpSessionView> {
        b.neighbor
            .iter()
            .map(|n| BgpSessionView {
                neighbor: n.address.clone(),
                remote_as: n.remote_as,
                protocol: peer_name(&n.address),
                up: false,
                state: "down".into(),
                info: why.into(),
                since: String::new(),
            })
            .collect()
    }

    fn poll(&mut self, b: &BgpCfg) {
        let rows = match command(&Self::sock(b), "show protocols") {
            Ok(lines) => {
                self.poll_at = Instant::now() + POLL_EVERY;
                self.poll_error = None;
                // BIRD answers and runs what it was told: a problem
                // before (an exit, a start) is over.
                if self.refused.is_none() && !self.vips_disabled {
                    self.error = None;
                }
                bgp_rows(&lines)
            }
            Err(e) => {
                // Soon again; a BIRD just started may not listen yet.
                self.poll_at = Instant::now() + POLL_RETRY;
                let starting = self.started_at.is_some_and(|t| t.elapsed() < STARTUP_GRACE);
                if !starting {
                    self.poll_error = Some(e.to_string());
                }
                self.sessions = Self::sessions_down(b, "BIRD not answering");
                return;
            }
        };
        self.sessions = b
            .neighbor
            .iter()
            .map(|n| {
                let name = peer_name(&n.address);
                let row = rows.iter().find(|r| r.name == name);
                let info = row.map_or(String::new(), |r| r.info.clone());
                BgpSessionView {
                    neighbor: n.address.clone(),
                    remote_as: n.remote_as,
                    protocol: name,
                    up: info.starts_with("Established"),
                    state: row.map_or("unknown".into(), |r| r.state.clone()),
                    info,
                    since: row.map_or(String::new(), |r| r.since.clone()),
                }
            })
            .collect();
    }

    /// Before this process stops: withdraws every VIP, forwards on for
    /// `stop_wait_ms` (routers move the flows to other Muxes meanwhile),
    /// then shuts BIRD down (its sessions end with a Cease).
    pub fn stop(&mut self, cfg: &Config, policy: &vswitch::Policy) {
        let Some(b) = &cfg.bgp else {
            return;
        };
        if self.child.is_none() {
            return;
        }
        self.stopping = true;
        // No BIRD started again from here.
        self.next_start = Instant::now() + Duration::from_secs(3600);
        self.configure_at = Instant::now();
        let had = !self.announced.is_empty();
        self.step(cfg, policy);
        if had && self.announced.is_empty() {
            tracing::info!(
                "bgp: VIPs withdrawn; forwarding {} ms more before stopping",
                b.stop_wait_ms
            );
            std::thread::sleep(Duration::from_millis(b.stop_wait_ms));
        } else if had {
            tracing::warn!("bgp: VIPs not withdrawn first; BIRD's sessions end now");
        }
        let _ = command(&Self::sock(b), "down");
        if let Some(c) = self.child.as_mut() {
            let end = Instant::now() + Duration::from_secs(2);
            while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// What is known of a BIRD that is gone.
    fn forget(&mut self) {
        self.applied = None;
        self.vips_disabled = false;
        self.started_with = None;
        self.started_at = None;
        self.announced.clear();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.forget();
            for s in &mut self.sessions {
                s.up = false;
                s.state = "down".into();
                s.info = "BIRD stopped".into();
            }
        }
    }

    /// What the API shows.
    pub fn view(&self, cfg: &Config) -> Option<BgpView> {
        let b = cfg.bgp.as_ref()?;
        Some(BgpView {
            pid: self.child.as_ref().map(Child::id),
            starts: self.starts,
            local_as: b.local_as,
            next_hop: next_hop(cfg).map_or(String::new(), |h| h.to_string()),
            draining: self.draining,
            announced: self.announced.iter().map(|a| format!("{a}/32")).collect(),
            withdrawn: self.withdrawn.clone(),
            sessions: if self.sessions.is_empty() {
                Self::sessions_down(b, "not read yet")
            } else {
                self.sessions.clone()
            },
            error: self.error.clone().or_else(|| self.poll_error.clone()),
        })
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_to_their_last_line() {
        let text = "2002-Name       Proto      Table      State  Since         Info\n\
                    1002-device1    Device     ---        up     2026-12-03 20:21:24  \n \
                    pollux_vips Static     master4    up     2026-12-03 20:21:24  \n \
                    peer_10_200_0_254 BGP        ---        up     2026-12-03 20:21:28  Established   \n \
                    peer_10_200_1_254 BGP        ---        start  2026-12-03 20:21:32  Active        Socket: Connection closed\n\
                    0000 \n";
        let lines = read_reply(&mut text.as_bytes(), Path::new("s"), "show protocols").unwrap();
        assert_eq!(lines.len(), 6);
        let rows = bgp_rows(&lines);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "peer_10_200_0_254");
        assert_eq!(rows[0].state, "up");
        assert_eq!(rows[0].info, "Established");
        assert_eq!(rows[1].since, "2026-12-03 20:21:32");
        assert_eq!(rows[1].info, "Active Socket: Connection closed");
    }

    proptest::proptest! {
        /// Whatever BIRD's socket says, reading it ends in lines or an
        /// error, never a panic; every line read is in the reply.
        #[test]
        fn any_reply_is_read_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(lines) = read_reply(&mut bytes.as_slice(), Path::new("s"), "x") {
                let text = String::from_utf8_lossy(&bytes);
                for l in &lines {
                    proptest::prop_assert!(text.contains(l.text.trim_end()));
                }
                let _ = bgp_rows(&lines);
            }
        }
    }

    #[test]
    fn an_error_code_is_a_refusal_and_a_cut_reply_is_truncated() {
        let e = read_reply(
            &mut "0002-Reading configuration from x\n8002 x, line 3: syntax error\n".as_bytes(),
            Path::new("s"),
            "configure",
        )
        .unwrap_err();
        assert!(
            matches!(&e, BgpError::Refused { reply, .. } if reply.contains("syntax error")),
            "{e}"
        );
        let e = read_reply(
            &mut "1002-peer0 BGP".as_bytes(),
            Path::new("s"),
            "show protocols",
        )
        .unwrap_err();
        assert!(matches!(e, BgpError::Truncated { .. }), "{e}");
    }

    fn cfg() -> BgpCfg {
        let c = Config::parse(
            r#"
[bgp]
local_as = 65010
hold_time_s = 3
keepalive_s = 1
[[bgp.neighbor]]
address = "10.200.0.254"
remote_as = 65000
[[bgp.neighbor]]
address = "10.200.1.254"
remote_as = 65001
"#,
        )
        .unwrap();
        c.bgp.unwrap()
    }

    #[test]
    fn the_configuration_announces_each_address_to_each_neighbour() {
        let b = cfg();
        let hop: Ipv4Addr = "10.200.0.1".parse().unwrap();
        let set: BTreeSet<Ipv4Addr> = ["192.0.2.10", "192.0.2.11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let t = bird_config(&b, hop, &set);
        assert!(t.contains("router id 10.200.0.1;"), "{t}");
        assert!(t.contains("route 192.0.2.10/32 blackhole;"), "{t}");
        assert!(t.contains("route 192.0.2.11/32 blackhole;"), "{t}");
        assert!(t.contains("neighbor 10.200.0.254 as 65000;"), "{t}");
        assert!(t.contains("neighbor 10.200.1.254 as 65001;"), "{t}");
        assert_eq!(t.matches("bgp_next_hop = 10.200.0.1;").count(), 2, "{t}");
        assert_eq!(t.matches("local as 65010;").count(), 2, "{t}");
        assert!(
            t.contains("hold time 3;") && t.contains("keepalive time 1;"),
            "{t}"
        );
        assert!(t.contains("graceful restart off;"), "{t}");
        assert!(t.contains("protocol bgp peer_10_200_0_254 {"), "{t}");
        assert!(t.contains("protocol bgp peer_10_200_1_254 {"), "{t}");
        assert!(t.contains("timeformat protocol iso long;"), "{t}");
        assert!(t.contains("connect delay time 1;"), "{t}");
        // Withdrawing everything leaves the sessions' part unchanged.
        let none = bird_config(&b, hop, &BTreeSet::new());
        assert!(!none.contains("route "), "{none}");
        assert_eq!(
            none.split_once("protocol bgp").unwrap().1,
            t.split_once("protocol bgp").unwrap().1
        );
    }

    #[test]
    fn mux_vips_are_wanted_while_they_have_a_backend_in_their_table() {
        let (c, p) = mux_with_bgp(
            Path::new("/run/pollux/bgp"),
            "bird",
            r#"
[[vip]]
name = "dns"
vnet = "lb"
mode = "mux"
address = "192.0.2.11"
port = 53
protocol = "udp"
backends = [ { ip = "10.201.0.3", port = 53 } ]
"#,
        );
        assert_eq!(next_hop(&c), Some("10.200.0.1".parse().unwrap()));
        let w = wanted(&p, false, false);
        let both: BTreeSet<Ipv4Addr> =
            ["192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap()].into();
        assert_eq!(w.announce, both);
        assert!(w.withdrawn.is_empty());
        // The DNS VIP's only backend goes down: its address is withdrawn.
        let dns = p.vips().iter().find(|v| v.config().name == "dns").unwrap();
        dns.set_health(0, false).unwrap();
        let w = wanted(&p, false, false);
        assert_eq!(w.announce, ["192.0.2.10".parse().unwrap()].into());
        assert_eq!(
            w.withdrawn,
            vec![BgpWithdrawnView {
                vip: "dns".into(),
                address: "192.0.2.11".into(),
                reason: "no healthy backend".into(),
            }]
        );
        // Drained or stopping: nothing.
        for (d, s, why) in [(true, false, "draining"), (false, true, "stopping")] {
            let w = wanted(&p, d, s);
            assert!(w.announce.is_empty());
            assert!(
                w.withdrawn
                    .iter()
                    .any(|x| x.vip == "web" && x.reason == why),
                "{w:?}"
            );
        }
    }

    /// A Mux's configuration with a VIP `web` (and `extra`), BIRD's
    /// files in `dir`, and its policy.
    fn mux_with_bgp(dir: &Path, bird: &str, extra: &str) -> (Config, vswitch::Policy) {
        let text = format!(
            r#"
[[port]]
name = "wire"
driver = "ring"
[uplink]
port = "wire"
address = "10.200.0.1/24"
gateway = "10.200.0.254"
[[vnet]]
name = "lb"
prefixes = ["10.9.0.0/24"]
gateway_mac = "12:34:56:78:9a:01"
[[vip]]
name = "web"
vnet = "lb"
mode = "mux"
address = "192.0.2.10"
port = 80
protocol = "tcp"
backends = [ {{ ip = "10.201.0.2", port = 8080 }} ]
[bgp]
local_as = 65010
bird = "{bird}"
dir = "{}"
[[bgp.neighbor]]
address = "192.0.2.254"
remote_as = 65000
{extra}
"#,
            dir.display()
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        let p = vswitch::Policy::compile(&c.topology().unwrap(), 1).unwrap();
        (c, p)
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pollux-bgp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_bird_that_cannot_run_is_reported_and_started_again() {
        let dir = scratch("false");
        let (c, p) = mux_with_bgp(&dir, "/bin/false", "");
        let mut s = Speaker::new();
        s.step(&c, &p);
        assert_eq!(s.starts, 1);
        let end = Instant::now() + Duration::from_secs(10);
        while s.child.is_some() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            s.step(&c, &p);
        }
        let v = s.view(&c).unwrap();
        assert!(
            v.error
                .as_deref()
                .is_some_and(|e| e.contains("BIRD exited")),
            "{v:?}"
        );
        assert!(v.announced.is_empty() && v.pid.is_none(), "{v:?}");
        // Started again a second later.
        let end = Instant::now() + Duration::from_secs(10);
        while s.starts < 2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            s.step(&c, &p);
        }
        assert_eq!(s.starts, 2);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_real_bird_announces_withdraws_on_a_drain_and_reports_its_session() {
        if !testkit::require::root_and(&["bird", "setpriv"]) {
            return;
        }
        let dir = scratch("real");
        let (c, p) = mux_with_bgp(&dir, "bird", "");
        let mut s = Speaker::new();
        let sock = dir.join("bird.ctl");
        let routes = || {
            command(&sock, "show route protocol pollux_vips")
                .map(|l| {
                    l.iter()
                        .map(|l| l.text.clone())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default()
        };
        // Up, its socket answering, the VIP in its table; the session to a
        // neighbour on no network of this machine (BIRD sends nothing to
        // it) is not established.
        let end = Instant::now() + Duration::from_secs(20);
        while !(routes().contains("192.0.2.10/32")
            && s.sessions.first().is_some_and(|x| x.state != "unknown"))
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(50));
            s.step(&c, &p);
        }
        let v = s.view(&c).unwrap();
        assert_eq!(v.announced, vec!["192.0.2.10/32".to_string()], "{v:?}");
        assert!(routes().contains("192.0.2.10/32"), "{}", routes());
        assert_eq!(v.sessions.len(), 1, "{v:?}");
        assert_eq!(v.sessions[0].neighbor, "192.0.2.254");
        assert!(
            !v.sessions[0].up && v.sessions[0].state != "unknown",
            "{v:?}"
        );
        let conf = std::fs::read_to_string(dir.join("bird.conf")).unwrap();
        assert!(conf.contains("bgp_next_hop = 10.200.0.1;"), "{conf}");
        assert!(v.error.is_none(), "{v:?}");
        // Drained: BIRD's table loses the route, the session part is kept.
        s.set_draining(true, &c, &p);
        assert!(s.view(&c).unwrap().announced.is_empty());
        assert!(!routes().contains("192.0.2.10/32"), "{}", routes());
        s.set_draining(false, &c, &p);
        assert!(routes().contains("192.0.2.10/32"), "{}", routes());
        // The VIP's only backend down: withdrawn; up: announced again.
        let web = p.vips()[0].clone();
        web.set_health(0, false).unwrap();
        s.step(&c, &p);
        assert!(!routes().contains("192.0.2.10/32"), "{}", routes());
        let v = s.view(&c).unwrap();
        assert_eq!(v.withdrawn[0].reason, "no healthy backend", "{v:?}");
        web.set_health(0, true).unwrap();
        s.step(&c, &p);
        assert!(routes().contains("192.0.2.10/32"), "{}", routes());
        // A configuration BIRD refuses (a router ID it cannot read) while
        // the VIP is to be withdrawn: the VIPs' protocol is disabled (fail
        // closed); BIRD taking a configuration again enables it.
        let mut bad = c.clone();
        if let Some(b) = bad.bgp.as_mut() {
            b.router_id = Some("not-an-id".into());
        }
        web.set_health(0, false).unwrap();
        s.step(&bad, &p);
        let v = s.view(&bad).unwrap();
        assert!(
            v.error
                .as_deref()
                .is_some_and(|e| e.contains("BIRD refused")),
            "{v:?}"
        );
        assert!(!routes().contains("192.0.2.10/32"), "{}", routes());
        assert!(v.announced.is_empty() && v.withdrawn.len() == 1, "{v:?}");
        web.set_health(0, true).unwrap();
        s.step(&c, &p);
        assert!(routes().contains("192.0.2.10/32"), "{}", routes());
        assert_eq!(
            s.view(&c).unwrap().announced,
            vec!["192.0.2.10/32".to_string()]
        );
        // BIRD killed behind pollux's back: reported, started again, and
        // announcing again.
        let pid = s.view(&c).unwrap().pid.unwrap();
        assert!(
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
        let end = Instant::now() + Duration::from_secs(20);
        while !(s.starts == 2 && routes().contains("192.0.2.10/32")) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            s.step(&c, &p);
        }
        let v = s.view(&c).unwrap();
        assert_eq!((v.starts, v.announced.len()), (2, 1), "{v:?}");
        assert!(v.pid.is_some_and(|p| p != pid), "{v:?}");
        // Stopped: withdrawn, BIRD down.
        let pid = s.view(&c).unwrap().pid.unwrap();
        s.stop(&c, &p);
        assert!(s.view(&c).unwrap().pid.is_none());
        assert!(!alive(pid), "BIRD {pid} still runs");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bgp_settings_are_checked() {
        let problems = |uplink: &str, extra: &str| -> Vec<String> {
            let text = format!(
                "[[port]]\nname = \"wire\"\ndriver = \"ring\"\n[uplink]\nport = \"wire\"\n{uplink}\n{extra}\n"
            );
            match Config::parse(&text).unwrap().validate() {
                Ok(_) => Vec::new(),
                Err(e) => e.problems(),
            }
        };
        let no_address = "next_hop_mac = \"02:00:00:00:00:01\"";
        let address = "address = \"10.0.0.1/24\"";
        let p = problems(
            no_address,
            "[bgp]\nlocal_as = 0\nhold_time_s = 2\nkeepalive_s = 5\ndir = \"rel\"\nrouter_id = \"0.0.0.0\"\n[[bgp.neighbor]]\naddress = \"x\"\nremote_as = 0\n[[bgp.neighbor]]\naddress = \"224.0.0.5\"\nremote_as = 1\n[[bgp.neighbor]]\naddress = \"224.0.0.5\"\nremote_as = 1\n",
        );
        for want in [
            "bgp: local_as must not be 0",
            "bgp: needs an [uplink] address",
            "bgp: hold_time_s 2 must be at least 3",
            "bgp: keepalive_s 5 must be above 0 and below hold_time_s 2",
            "bgp: dir \"rel\" must be an absolute path",
            "bgp: router_id \"0.0.0.0\" is not a unicast address",
            "bgp: neighbor \"x\" is not an IPv4 address",
            "bgp: neighbor \"x\": remote_as must not be 0",
            "bgp: neighbor \"224.0.0.5\" is not a unicast address",
            "bgp: neighbor \"224.0.0.5\" is listed twice",
        ] {
            assert!(p.iter().any(|l| l.contains(want)), "{want} not in {p:?}");
        }
        let p = problems(
            address,
            &format!(
                "[bgp]\nlocal_as = 65010\nhold_time_s = 9\nkeepalive_s = 9\ndir = \"/{}\"\n",
                "d".repeat(100)
            ),
        );
        for want in [
            "keepalive_s 9 must be above 0 and below",
            "no [[bgp.neighbor]]",
            "is too long for BIRD's control socket",
        ] {
            assert!(p.iter().any(|l| l.contains(want)), "{want} not in {p:?}");
        }
        let p = problems(
            address,
            "[bgp]\nlocal_as = 65010\n[[bgp.neighbor]]\naddress = \"10.0.0.254\"\nremote_as = 65000\n",
        );
        assert!(p.is_empty(), "{p:?}");
    }
}
