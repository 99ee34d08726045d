//! `pollux ctl`: calls the control API of a running pollux and prints
//! readable tables (or the JSON it got, with `--json`).

use crate::api::{
    Applied, Counters, ErrorBody, Flows, FlowsDeleted, Probes, Status, WithGeneration,
};
use crate::config::{BackendCfg, ConfigError, VipCfg, VmCfg, VnetCfg};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Why a `pollux ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API could not be reached or read.
    #[error("{endpoint}: {source}")]
    Io {
        /// The socket or address.
        endpoint: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The answer is not the HTTP the API speaks.
    #[error("malformed HTTP response: {0}")]
    Http(String),
    /// The body is not the JSON expected.
    #[error("{path}: unexpected reply ({source}): {text}")]
    Body {
        /// The request path.
        path: String,
        /// What did not fit.
        source: serde_json::Error,
        /// The body.
        text: String,
    },
    /// The API refused the request (its message, or every problem).
    #[error("{0}")]
    Refused(String),
    /// `/metrics` answered with an error status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The input file cannot be read.
    #[error("{file}: {source}")]
    Input {
        /// The file (`-`: stdin).
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request body could not be encoded.
    #[error("{what}: cannot encode the request: {source}")]
    Encode {
        /// What was being sent.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The configuration to reload has problems.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `weight` of a backend the VIP does not have.
    #[error("vip {vip:?} has no backend {backend:?}")]
    NoBackend {
        /// The VIP.
        vip: String,
        /// The backend as given.
        backend: String,
    },
}

impl Endpoint<'_> {
    fn name(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("control socket {}", p.display()),
            Endpoint::Tcp(a, _) => format!("control {a}"),
        }
    }
}

/// Where the API is.
#[derive(Debug, Clone)]
pub enum Endpoint<'a> {
    /// The unix socket.
    Unix(&'a Path),
    /// A loopback `address:port`, and the token to send (read with
    /// [`crate::control::auth::Token::read`]).
    Tcp(&'a str, Option<crate::control::auth::Token>),
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn call(
    ep: &Endpoint<'_>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), CtlError> {
    let auth = match ep {
        Endpoint::Tcp(_, Some(t)) => format!("Authorization: {}\r\n", t.bearer()),
        _ => String::new(),
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: pollux\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.map_or(0, str::len),
        body.unwrap_or("")
    );
    let mut raw = Vec::new();
    let timeout = Some(Duration::from_secs(10));
    let io = |source| CtlError::Io {
        endpoint: ep.name(),
        source,
    };
    match ep {
        Endpoint::Unix(p) => {
            let mut s = std::os::unix::net::UnixStream::connect(p).map_err(io)?;
            s.set_read_timeout(timeout).map_err(io)?;
            s.write_all(req.as_bytes()).map_err(io)?;
            s.read_to_end(&mut raw).map_err(io)?;
        }
        Endpoint::Tcp(a, _) => {
            let mut s = std::net::TcpStream::connect(a).map_err(io)?;
            s.set_read_timeout(timeout).map_err(io)?;
            s.write_all(req.as_bytes()).map_err(io)?;
            s.read_to_end(&mut raw).map_err(io)?;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| CtlError::Http("no end of headers".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CtlError::Http(format!("status line {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response (large responses
/// come this way).
fn dechunk(mut rest: &str) -> Result<String, CtlError> {
    let bad = |what: String| CtlError::Http(what);
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| bad("chunked body without a chunk size".into()))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad(format!("chunk size {size:?}")))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| bad("truncated chunked body".into()))?;
        out.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| bad("chunk without its line end".into()))?;
    }
}

/// A `pollux ctl` command.
#[derive(Debug, Clone)]
pub enum Cmd {
    /// Generation and counts.
    Status,
    /// List a kind, or show one item.
    Get(String, Option<String>),
    /// Create or replace an item from a JSON file (`-`: stdin).
    Put(String, String, String),
    /// Delete an item.
    Delete(String, String),
    /// Create or replace a rule of a group from a JSON file.
    PutRule(String, String, String),
    /// Delete a rule of a group.
    DeleteRule(String, String),
    /// Weight 0 for a backend: no new flows, established ones stay.
    Drain(String, String),
    /// Set a backend's weight.
    Weight(String, String, u32),
    /// Probe states.
    Probes,
    /// The underlay: address, routes, neighbours, tunnels.
    Underlay,
    /// Each VIP's Maglev table and its digest.
    Maglev,
    /// The BGP speaker's sessions and announcements.
    Bgp,
    /// Each worker's cycle accounting; with true, reset it.
    Perf(bool),
    /// Withdraw every VIP (true) or announce them again (false).
    DrainMux(bool),
    /// Replace the uplink's gateway and routes from a JSON file.
    PutRoutes(String),
    /// List (or delete) flows matching `key=value` filters.
    Flows(Vec<(String, String)>, bool),
    /// Counters.
    Counters,
    /// The metrics text.
    Metrics,
    /// Replace the whole configuration from a TOML file.
    Reload(String),
    /// Trace a packet through the switch.
    Trace(crate::api::TraceRequest),
}

/// Frame `index` (from 0) of the pcap file `path`, in hex.
pub fn pcap_frame(path: &Path, index: usize) -> Result<String, CtlError> {
    let input = |source| CtlError::Input {
        file: path.display().to_string(),
        source,
    };
    let bad = |what: String| input(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    let f = std::fs::File::open(path).map_err(input)?;
    let mut r = pcap_file::pcap::PcapReader::new(f).map_err(|e| bad(e.to_string()))?;
    let link = r.header().datalink;
    if link != pcap_file::DataLink::ETHERNET {
        return Err(bad(format!(
            "holds {link:?} frames, not Ethernet (capture on an interface, not \"any\")"
        )));
    }
    let mut i = 0;
    while let Some(p) = r.next_packet() {
        let p = p.map_err(|e| bad(e.to_string()))?;
        if i == index {
            return Ok(crate::api::to_hex(&p.data));
        }
        i += 1;
    }
    Err(bad(format!("has {i} frames, no frame {index}")))
}

fn read_input(file: &str) -> Result<String, CtlError> {
    let input = |source| CtlError::Input {
        file: file.to_string(),
        source,
    };
    if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(input)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(input)
    }
}

/// The body of a reply as `T` (with the generation), or the API's refusal.
fn decode<T: DeserializeOwned>(
    path: &str,
    status: u16,
    text: &str,
) -> Result<WithGeneration<T>, CtlError> {
    let body = |source| CtlError::Body {
        path: path.to_string(),
        source,
        text: text.to_string(),
    };
    if status >= 400 {
        let e: ErrorBody = serde_json::from_str(text).map_err(body)?;
        return Err(CtlError::Refused(e.text()));
    }
    serde_json::from_str(text).map_err(body)
}

fn get<T: DeserializeOwned>(ep: &Endpoint<'_>, path: &str) -> Result<WithGeneration<T>, CtlError> {
    let (status, text) = call(ep, "GET", path, None)?;
    decode(path, status, &text)
}

/// `{"vip": {...}}`: one VIP.
#[derive(serde::Deserialize)]
struct OneVip {
    vip: VipCfg,
}

/// Runs `cmd`; returns the lines to print, or the error (exit 2).
pub fn run(ep: &Endpoint<'_>, cmd: &Cmd, json: bool) -> Result<Vec<String>, CtlError> {
    let (method, path, body): (&str, String, Option<String>) = match cmd {
        Cmd::Status => ("GET", "/v1/status".into(), None),
        Cmd::Get(kind, None) => ("GET", format!("/v1/{kind}"), None),
        Cmd::Get(kind, Some(n)) => ("GET", format!("/v1/{kind}/{n}"), None),
        Cmd::Put(kind, n, f) => ("PUT", format!("/v1/{kind}/{n}"), Some(read_input(f)?)),
        Cmd::Delete(kind, n) => ("DELETE", format!("/v1/{kind}/{n}"), None),
        Cmd::PutRule(g, r, f) => (
            "PUT",
            format!("/v1/nsgs/{g}/rules/{r}"),
            Some(read_input(f)?),
        ),
        Cmd::DeleteRule(g, r) => ("DELETE", format!("/v1/nsgs/{g}/rules/{r}"), None),
        Cmd::Drain(v, b) => ("POST", format!("/v1/vips/{v}/backends/{b}/drain"), None),
        Cmd::Weight(v, b, w) => {
            let vip = get::<OneVip>(ep, &format!("/v1/vips/{v}"))?.body.vip;
            let mut found: BackendCfg = vip
                .backends
                .into_iter()
                .find(|x| {
                    [&x.vm, &x.ip].iter().any(|k| {
                        k.as_deref()
                            .is_some_and(|k| *b == k || *b == format!("{k}:{}", x.port))
                    })
                })
                .ok_or_else(|| CtlError::NoBackend {
                    vip: v.clone(),
                    backend: b.clone(),
                })?;
            found.weight = Some(*w);
            let body = serde_json::to_string(&found).map_err(|source| CtlError::Encode {
                what: format!("vip {v:?} backend {b:?}"),
                source,
            })?;
            ("PUT", format!("/v1/vips/{v}/backends/{b}"), Some(body))
        }
        Cmd::Probes => ("GET", "/v1/probes".into(), None),
        Cmd::Underlay => ("GET", "/v1/underlay".into(), None),
        Cmd::Maglev => ("GET", "/v1/maglev".into(), None),
        Cmd::Bgp => ("GET", "/v1/bgp".into(), None),
        Cmd::Perf(false) => ("GET", "/v1/perf".into(), None),
        Cmd::Perf(true) => ("POST", "/v1/perf/reset".into(), None),
        Cmd::DrainMux(on) => (
            if *on { "POST" } else { "DELETE" },
            "/v1/bgp/drain".into(),
            None,
        ),
        Cmd::PutRoutes(f) => ("PUT", "/v1/routes".into(), Some(read_input(f)?)),
        Cmd::Flows(filters, delete) => {
            let q: Vec<String> = filters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (
                if *delete { "DELETE" } else { "GET" },
                format!("/v1/flows?{}", q.join("&")),
                None,
            )
        }
        Cmd::Counters => ("GET", "/v1/counters".into(), None),
        Cmd::Metrics => ("GET", "/metrics".into(), None),
        Cmd::Trace(req) => {
            let body = serde_json::to_string(req).map_err(|source| CtlError::Encode {
                what: "the trace".into(),
                source,
            })?;
            ("POST", "/v1/trace".into(), Some(body))
        }
        Cmd::Reload(f) => {
            let cfg = crate::config::Config::parse(&read_input(f)?)?;
            let body = serde_json::to_string(&cfg).map_err(|source| CtlError::Encode {
                what: f.clone(),
                source,
            })?;
            ("PUT", "/v1/config".into(), Some(body))
        }
    };
    let (status, text) = call(ep, method, &path, body.as_deref())?;
    if matches!(cmd, Cmd::Metrics) {
        return if status == 200 {
            Ok(text.lines().map(String::from).collect())
        } else {
            Err(CtlError::Status(status))
        };
    }
    if json {
        return Ok(vec![pretty(decode(&path, status, &text)?)]);
    }
    table(cmd, &path, status, &text)
}

/// A reply as indented JSON, its generation included.
fn pretty(v: WithGeneration<Value>) -> String {
    let mut body = v.body;
    if let Some(o) = body.as_object_mut() {
        o.insert("generation".into(), Value::from(v.generation));
    }
    serde_json::to_string_pretty(&body).unwrap_or_default()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), T::to_string)
}

/// A list of `T` under `key`.
#[derive(serde::Deserialize)]
struct List<T> {
    #[serde(flatten)]
    items: std::collections::HashMap<String, Vec<T>>,
}

fn list<T: DeserializeOwned>(
    path: &str,
    status: u16,
    text: &str,
    key: &str,
) -> Result<(Vec<T>, u64), CtlError> {
    let mut l = decode::<List<T>>(path, status, text)?;
    Ok((l.body.items.remove(key).unwrap_or_default(), l.generation))
}

/// The cycle accounting, readably.
fn perf_lines(p: &crate::api::PerfView) -> Vec<String> {
    let mut out = vec![format!(
        "over {:.1} s; clock {:.3} GHz (cycles are its ticks)",
        p.seconds,
        p.ticks_per_second as f64 / 1e9
    )];
    for w in &p.workers {
        out.push(format!(
            "worker {}: {:.1}% busy ({} busy, {} idle polls); {} packets, {:.1} per burst",
            w.worker, w.busy_percent, w.busy_polls, w.idle_polls, w.rx_packets, w.average_burst
        ));
        out.push(format!(
            "  cycles/packet {:.0}: port I/O {:.0}; fast path {:.0} per packet ({}), slow path {:.0} per packet ({})",
            w.cycles_per_packet,
            w.io_cycles_per_packet,
            w.fast_path_cycles,
            w.fast_path,
            w.slow_path_cycles,
            w.slow_path
        ));
        let bursts: Vec<String> = w
            .rx_bursts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| format!("{}:{n}", i + 1))
            .collect();
        if !bursts.is_empty() {
            out.push(format!("  rx bursts (size:count) {}", bursts.join(" ")));
        }
    }
    out
}

/// The BGP speaker, readably.
fn bgp_lines(b: &crate::api::BgpView) -> Vec<String> {
    let mut out = vec![format!(
        "bgp: AS {}, next hop {}, BIRD {}{}",
        b.local_as,
        b.next_hop,
        b.pid.map_or("not running".into(), |p| format!("pid {p}")),
        if b.draining { ", draining" } else { "" }
    )];
    for s in &b.sessions {
        out.push(format!(
            "  neighbour {} AS {}: {} ({}{})",
            s.neighbor,
            s.remote_as,
            if s.up { "established" } else { "down" },
            if s.info.is_empty() { &s.state } else { &s.info },
            if s.since.is_empty() {
                String::new()
            } else {
                format!(" since {}", s.since)
            }
        ));
    }
    for a in &b.announced {
        out.push(format!("  announced {a}"));
    }
    for w in &b.withdrawn {
        out.push(format!(
            "  withdrawn {}/32 (vip {}): {}",
            w.address, w.vip, w.reason
        ));
    }
    if let Some(e) = &b.error {
        out.push(format!("  problem: {e}"));
    }
    out
}

/// The readable form of a reply.
fn table(cmd: &Cmd, path: &str, status: u16, text: &str) -> Result<Vec<String>, CtlError> {
    let generation = |g: u64| format!("generation {g}");
    let mut out = Vec::new();
    match cmd {
        Cmd::Status => {
            let r = decode::<Status>(path, status, text)?;
            let st = &r.body;
            out.push(generation(r.generation));
            for (k, v) in [
                ("ports", st.ports),
                ("workers", st.workers),
                ("vnets", st.vnets),
                ("vms", st.vms),
                ("nsgs", st.nsgs),
                ("vips", st.vips),
            ] {
                out.push(format!("{k:<8} {v}"));
            }
            for d in &st.devices {
                let link = match (&d.link, d.speed_mbps) {
                    (Some(l), Some(s)) => format!(", link {l} at {s} Mb/s"),
                    (Some(l), None) => format!(", link {l}"),
                    _ => String::new(),
                };
                out.push(format!(
                    "port {}: {} {}, {} of {}/{} queues{link}",
                    d.port, d.driver, d.device, d.queues, d.max_rx_queues, d.max_tx_queues
                ));
            }
            out.push(format!("version  {} (pid {})", st.version, st.pid));
            if let Some(t) = &st.takeover {
                out.push(format!(
                    "took over from pid {} (version {}) at {}: traffic stopped {:.1} ms{}; {} connections, {} left out, {} probe states, {} sockets",
                    t.from_pid,
                    t.from_version,
                    utc(t.at_unix),
                    t.blackout_us as f64 / 1000.0,
                    t.links_up_us.map_or(String::new(), |u| format!(
                        " (links up again after {:.1} ms)",
                        u as f64 / 1000.0
                    )),
                    t.connections,
                    t.connections_dropped,
                    t.probes,
                    t.sockets
                ));
            }
            if let Some(f) = &st.takeover_failed {
                out.push(f.clone());
            }
            if let Some(b) = &st.bgp {
                out.extend(bgp_lines(b));
            }
        }
        Cmd::Get(kind, None) => {
            let g = match kind.as_str() {
                "vnets" => {
                    let (items, g) = list::<VnetCfg>(path, status, text, kind)?;
                    for i in items {
                        out.push(format!(
                            "{:<16} {:?} gateway {}",
                            i.name, i.prefixes, i.gateway_mac
                        ));
                    }
                    g
                }
                "vms" => {
                    let (items, g) = list::<VmCfg>(path, status, text, kind)?;
                    for i in items {
                        out.push(format!(
                            "{:<16} port {} vnet {} mac {} ips {:?} nsg {}",
                            i.name,
                            i.port,
                            i.vnet,
                            i.mac,
                            i.ips,
                            opt(&i.nsg)
                        ));
                    }
                    g
                }
                "vips" => {
                    let (items, g) = list::<VipCfg>(path, status, text, kind)?;
                    for i in items {
                        let backends: Vec<String> = i
                            .backends
                            .iter()
                            .map(|b| {
                                format!(
                                    "{}:{}{}",
                                    b.vm.as_deref().or(b.ip.as_deref()).unwrap_or("-"),
                                    b.port,
                                    b.weight.map_or(String::new(), |w| format!(" w{w}"))
                                )
                            })
                            .collect();
                        out.push(format!(
                            "{:<16} {} {}:{} vnet {} backends {}",
                            i.name,
                            i.protocol,
                            i.address,
                            i.port,
                            i.vnet,
                            backends.join(", ")
                        ));
                    }
                    g
                }
                "remotes" => {
                    let (items, g) = list::<crate::config::RemoteCfg>(path, status, text, kind)?;
                    for i in items {
                        out.push(format!(
                            "{:<16} vnet {} ips {:?} host {} mac {}",
                            i.name,
                            i.vnet,
                            i.ips,
                            i.host,
                            opt(&i.mac)
                        ));
                    }
                    g
                }
                _ => {
                    let (items, g) = list::<Value>(path, status, text, kind)?;
                    for i in items {
                        let rules = i["rule"].as_array().map_or(0, Vec::len);
                        out.push(format!("{:<16} {rules} rules", s(&i["name"])));
                    }
                    g
                }
            };
            out.push(generation(g));
        }
        Cmd::Get(_, Some(_)) => out.push(pretty(decode(path, status, text)?)),
        Cmd::Maglev => {
            let m = decode::<crate::api::MaglevView>(path, status, text)?.body;
            out.push(format!(
                "{:<16} {:<10} {:<5} {:<26} {:>7} {:>9} {:>6}  digest",
                "vip", "vnet", "mode", "frontend", "slots", "backends", "epoch"
            ));
            for v in m.vips {
                out.push(format!(
                    "{:<16} {:<10} {:<5} {:<26} {:>7} {:>9} {:>6}  {}",
                    v.vip,
                    v.vnet,
                    v.mode,
                    v.frontend,
                    v.table_size,
                    format!("{}/{}", v.in_table, v.backends),
                    v.epoch,
                    v.digest
                ));
            }
        }
        Cmd::Perf(reset) => {
            let p = decode::<crate::api::PerfView>(path, status, text)?.body;
            if *reset {
                out.push("cycle accounting reset".into());
                return Ok(out);
            }
            out.extend(perf_lines(&p));
        }
        Cmd::Bgp | Cmd::DrainMux(_) => {
            let b = decode::<crate::api::BgpView>(path, status, text)?.body;
            out.extend(bgp_lines(&b));
        }
        Cmd::Underlay => {
            let u = decode::<crate::api::UnderlayView>(path, status, text)?.body;
            let Some(a) = u.address else {
                out.push("the uplink has no address: no underlay, no tunnels".into());
                return Ok(out);
            };
            out.push(format!("address {a}"));
            for (n, via) in &u.routes {
                out.push(format!("route {n} via {via}"));
            }
            out.push(format!(
                "{:<16} {:<18} {:<11} {:>10}",
                "neighbour", "mac", "state", "answered"
            ));
            for n in &u.neighbours {
                out.push(format!(
                    "{:<16} {:<18} {:<11} {:>10}",
                    n.ip,
                    opt(&n.mac),
                    n.state,
                    n.confirmed_ago_s
                        .map_or("-".into(), |s| format!("{s:.1} s ago"))
                ));
            }
            out.push(format!(
                "{:<16} {:<10} {:>8} {:<7} {:<16} {:<16} next hop mac",
                "tunnel", "vnet", "vni", "encap", "host", "next hop"
            ));
            for t in &u.tunnels {
                out.push(format!(
                    "{:<16} {:<10} {:>8} {:<7} {:<16} {:<16} {}",
                    t.remote,
                    t.vnet,
                    t.vni,
                    t.encap,
                    t.host,
                    opt(&t.next_hop),
                    t.next_hop_mac.as_deref().unwrap_or("(resolving)")
                ));
            }
        }
        Cmd::Probes => {
            let r = decode::<Probes>(path, status, text)?;
            out.push(format!(
                "{:<16} {:<22} {:<5} {:>7} {:>9}  reason",
                "vip", "backend", "state", "probes", "rtt ms"
            ));
            for p in r.body.probes {
                out.push(format!(
                    "{:<16} {:<22} {:<5} {:>7} {:>9}  {}",
                    p.vip,
                    p.backend,
                    if p.up { "up" } else { "down" },
                    p.probes,
                    p.rtt_ms.map_or("-".into(), |r| format!("{r:.3}")),
                    p.reason
                ));
            }
        }
        Cmd::Flows(_, false) => {
            let r = decode::<Flows>(path, status, text)?;
            out.push(format!(
                "{:<3} {:<10} {:<40} {:<10} {:<22} {:<12} {:>10} {:>12}",
                "w", "in", "flow", "out", "nat", "connection", "packets", "bytes"
            ));
            for f in &r.body.flows {
                let nat = match (&f.nat_src, &f.nat_dst) {
                    (None, None) => "-".to_string(),
                    (Some(a), None) => format!("src {a}"),
                    (None, Some(b)) => format!("dst {b}"),
                    (Some(a), Some(b)) => format!("src {a} dst {b}"),
                };
                out.push(format!(
                    "{:<3} {:<10} {:<40} {:<10} {:<22} {:<12} {:>10} {:>12}",
                    f.worker,
                    f.in_port,
                    format!("{} {}:{} > {}:{}", f.proto, f.src, f.sport, f.dst, f.dport),
                    f.out_port,
                    nat,
                    f.connection.as_deref().unwrap_or("-"),
                    f.packets,
                    f.bytes
                ));
            }
            out.push(format!(
                "{} matched, {} in the tables; {}",
                r.body.matched,
                r.body.occupancy,
                generation(r.generation)
            ));
        }
        Cmd::Flows(_, true) => {
            let r = decode::<FlowsDeleted>(path, status, text)?;
            out.push(format!(
                "{} flows deleted; {}",
                r.body.deleted,
                generation(r.generation)
            ))
        }
        Cmd::Counters => {
            let r = decode::<Counters>(path, status, text)?;
            out.extend(counters_table(&r.body));
            out.push(generation(r.generation));
        }
        Cmd::Trace(_) => {
            let r = decode::<crate::api::TraceView>(path, status, text)?;
            out.extend(trace_lines(&r.body, r.generation));
        }
        _ => {
            let r = decode::<Applied>(path, status, text)?;
            out.push(format!("applied: {}", generation(r.generation)));
        }
    }
    Ok(out)
}

/// `pollux ctl counters` as text.
fn counters_table(c: &Counters) -> Vec<String> {
    let drops =
        |m: &std::collections::BTreeMap<String, u64>| serde_json::to_string(m).unwrap_or_default();
    let mut out = vec![format!(
        "{:<12} {:>12} {:>14} {:>12} {:>14}  drops",
        "port", "rx pkts", "rx bytes", "tx pkts", "tx bytes"
    )];
    for p in &c.ports {
        out.push(format!(
            "{:<12} {:>12} {:>14} {:>12} {:>14}  {}",
            p.name,
            p.rx_packets,
            p.rx_bytes,
            p.tx_packets,
            p.tx_bytes,
            drops(&p.drops)
        ));
        if let Some(l) = &p.link {
            out.push(format!(
                "  link {l} ({} changes)",
                p.link_changes.unwrap_or(0)
            ));
        }
        for q in &p.queues {
            out.push(format!(
                "  queue {:<4} {:>12} {:>14} {:>12} {:>14}  {}",
                q.queue, q.rx_packets, q.rx_bytes, q.tx_packets, q.tx_bytes, q.drops
            ));
        }
    }
    out.push(format!(
        "{:<7} {:>12} {:>12} {:>12} {:>12} {:>12}  drops",
        "worker", "busy polls", "idle polls", "rx", "fast path", "slow path"
    ));
    for w in &c.workers {
        out.push(format!(
            "{:<7} {:>12} {:>12} {:>12} {:>12} {:>12}  {}",
            w.worker,
            w.busy_polls,
            w.idle_polls,
            w.rx_packets,
            w.fast_path,
            w.slow_path,
            drops(&w.drops)
        ));
        if w.tunnel_tx + w.tunnel_rx + w.mux_tx + w.dsr_rx > 0 {
            out.push(format!(
                "  tunnels tx {} rx {}; mux (IP in IP to DIPs) tx {}; dsr (from Muxes) rx {}",
                w.tunnel_tx, w.tunnel_rx, w.mux_tx, w.dsr_rx
            ));
        }
    }
    for b in &c.backends {
        out.push(format!(
            "vip {} backend {} (weight {}): {} connections, {} active",
            b.vip, b.backend, b.weight, b.new_connections, b.active_connections
        ));
    }
    for r in c.rules.iter().filter(|r| r.hits > 0) {
        out.push(format!(
            "nsg {} {} rule {} (priority {}, {}): {} hits",
            r.nsg, r.direction, r.rule, r.priority, r.action, r.hits
        ));
    }
    out
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC` (the civil
/// calendar from a day count, as in Howard Hinnant's `civil_from_days`).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What a capture took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureSummary {
    /// Frames written.
    pub written: u64,
    /// Frames that matched while the reader was behind: not captured.
    pub missed: u64,
}

/// The file format a capture is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFormat {
    /// pcap, nanosecond timestamps, Ethernet.
    Pcap,
    /// pcapng: one interface per port (named after it), each frame's
    /// direction (inbound: received from the port; outbound: sent to it).
    PcapNg,
}

/// Where captured frames are written.
enum CaptureFile<W: Write> {
    Pcap(pcap_file::pcap::PcapWriter<W>),
    PcapNg(pcap_file::pcapng::PcapNgWriter<W>, Vec<String>, u32),
}

impl<W: Write> CaptureFile<W> {
    fn new(out: W, format: CaptureFormat, snaplen: u32) -> Result<Self, pcap_file::PcapError> {
        Ok(match format {
            CaptureFormat::Pcap => {
                let header = pcap_file::pcap::PcapHeader {
                    snaplen,
                    datalink: pcap_file::DataLink::ETHERNET,
                    ts_resolution: pcap_file::TsResolution::NanoSecond,
                    ..pcap_file::pcap::PcapHeader::default()
                };
                CaptureFile::Pcap(pcap_file::pcap::PcapWriter::with_header(out, header)?)
            }
            CaptureFormat::PcapNg => CaptureFile::PcapNg(
                pcap_file::pcapng::PcapNgWriter::new(out)?,
                Vec::new(),
                snaplen,
            ),
        })
    }

    /// Flushes what is buffered (an error is the caller's to report).
    fn finish(self) -> std::io::Result<()> {
        match self {
            CaptureFile::Pcap(w) => w.into_writer().flush(),
            CaptureFile::PcapNg(w, ..) => w.into_inner().flush(),
        }
    }

    fn write(
        &mut self,
        f: &crate::api::CapturedFrame,
        data: &[u8],
    ) -> Result<(), pcap_file::PcapError> {
        use pcap_file::pcapng::blocks::enhanced_packet::{
            EnhancedPacketBlock, EnhancedPacketOption,
        };
        use pcap_file::pcapng::blocks::interface_description::{
            InterfaceDescriptionBlock, InterfaceDescriptionOption,
        };
        let ts = Duration::from_nanos(f.time_ns);
        match self {
            CaptureFile::Pcap(w) => {
                w.write_packet(&pcap_file::pcap::PcapPacket::new(ts, f.len, data))?;
            }
            CaptureFile::PcapNg(w, ports, snaplen) => {
                let id = match ports.iter().position(|p| *p == f.port) {
                    Some(i) => i,
                    None => {
                        w.write_pcapng_block(InterfaceDescriptionBlock {
                            linktype: pcap_file::DataLink::ETHERNET,
                            snaplen: *snaplen,
                            options: vec![
                                InterfaceDescriptionOption::IfName(f.port.clone().into()),
                                // Nanoseconds, as the blocks' timestamps are written.
                                InterfaceDescriptionOption::IfTsResol(9),
                            ],
                        })?;
                        ports.push(f.port.clone());
                        ports.len() - 1
                    }
                };
                // The direction bits of epb_flags: 1 inbound, 2 outbound.
                let way = if f.direction == "rx" { 1 } else { 2 };
                w.write_pcapng_block(EnhancedPacketBlock {
                    interface_id: id as u32,
                    timestamp: ts,
                    original_len: f.len,
                    data: data.into(),
                    options: vec![EnhancedPacketOption::Flags(way)],
                })?;
            }
        }
        Ok(())
    }
}

/// Runs a live capture (`POST /v1/capture`), reading its frames every
/// 100 ms and writing them to `out` in `format`, until it has its count
/// or its time is up.
pub fn capture(
    ep: &Endpoint<'_>,
    req: &crate::api::CaptureRequest,
    format: CaptureFormat,
    out: impl Write,
) -> Result<CaptureSummary, CtlError> {
    let body = serde_json::to_string(req).map_err(|source| CtlError::Encode {
        what: "the capture".into(),
        source,
    })?;
    let path = "/v1/capture";
    let (status, text) = call(ep, "POST", path, Some(&body))?;
    decode::<crate::api::CaptureView>(path, status, &text)?;
    let write_err = |e: pcap_file::PcapError| CtlError::Input {
        file: "the capture output".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let snaplen = req
        .snaplen
        .map_or(dataplane::capture::MAX_SNAPLEN as u32, |s| s as u32);
    let mut w = CaptureFile::new(out, format, snaplen).map_err(write_err)?;
    let mut written = 0;
    let mut ended = false;
    loop {
        let (status, text) = call(ep, "GET", path, None)?;
        let v = decode::<crate::api::CaptureView>(path, status, &text)?.body;
        for f in &v.frames {
            let data = crate::api::from_hex(&f.data)
                .map_err(|e| CtlError::Http(format!("a captured frame: {e}")))?;
            w.write(f, &data).map_err(write_err)?;
            written += 1;
        }
        // (A frame's record may follow its count by a moment: one more
        // read after the capture ended.)
        if !v.running && v.frames.is_empty() {
            if ended {
                w.finish().map_err(|source| CtlError::Input {
                    file: "the capture output".into(),
                    source,
                })?;
                return Ok(CaptureSummary {
                    written,
                    missed: v.missed,
                });
            }
            ended = true;
        }
        if v.frames.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs a live trace (`POST /v1/trace/live`), reading it every 100 ms and
/// giving each packet's lines to `emit` (one JSON line per packet with
/// `json`) until its count or time is spent; returns the packets traced
/// and those missed.
pub fn live_trace(
    ep: &Endpoint<'_>,
    req: &crate::api::CaptureRequest,
    json: bool,
    mut emit: impl FnMut(String),
) -> Result<(u64, u64), CtlError> {
    let body = serde_json::to_string(req).map_err(|source| CtlError::Encode {
        what: "the live trace".into(),
        source,
    })?;
    let path = "/v1/trace/live";
    let (status, text) = call(ep, "POST", path, Some(&body))?;
    decode::<crate::api::LiveTraceView>(path, status, &text)?;
    let mut ended = false;
    loop {
        let (status, text) = call(ep, "GET", path, None)?;
        let v = decode::<crate::api::LiveTraceView>(path, status, &text)?.body;
        for p in &v.packets {
            if json {
                emit(serde_json::to_string(p).unwrap_or_default());
                continue;
            }
            emit(format!(
                "worker {} on port {}: {}",
                p.worker, p.port, p.packet
            ));
            for s in &p.steps {
                emit(format!("  {:<7} {}", s.layer, s.detail));
            }
            emit(match (p.result.as_str(), &p.out_port) {
                ("forward", Some(o)) => format!("forward out of port {o}"),
                ("answer", Some(o)) => format!("answered out of port {o}"),
                (r, _) => format!("{r}: {}", opt(&p.reason)),
            });
        }
        // (The last packet's record may follow its count by a moment: one
        // more read after the trace ended.)
        if !v.running && v.packets.is_empty() {
            if ended {
                return Ok((v.traced, v.missed));
            }
            ended = true;
        }
        if v.packets.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A trace, readably: the packet, each layer's decision, the end, and the
/// flows that would take the packet instead.
fn trace_lines(t: &crate::api::TraceView, generation: u64) -> Vec<String> {
    let mut out = vec![format!(
        "on port {}: {}",
        t.port,
        t.packet.as_deref().unwrap_or("a frame that does not parse")
    )];
    for s in &t.steps {
        out.push(format!("  {:<6} {}", s.layer, s.detail));
    }
    let what = t.out_packet.as_deref().unwrap_or("");
    out.push(match t.result.as_str() {
        "forward" => format!("forward out of port {}: {what}", opt(&t.out_port)),
        "answer" => format!("answered out of port {}: {what}", t.port),
        r => format!("{r}: {}", opt(&t.reason)),
    });
    if t.cached.is_empty() {
        out.push(format!(
            "(traced as a connection's first packet under generation {generation}; no worker \
             holds a flow for it)"
        ));
    } else {
        out.push(format!(
            "(traced as a connection's first packet under generation {generation}; a packet \
             of these cached flows takes their action instead:)"
        ));
        for f in &t.cached {
            out.push(format!(
                "  worker {} -> {} nat_src {} nat_dst {}, {} packets{}",
                f.worker,
                f.out_port,
                opt(&f.nat_src),
                opt(&f.nat_dst),
                f.packets,
                f.connection
                    .as_ref()
                    .map_or(String::new(), |c| format!(", connection {c}"))
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_reads_as_a_calendar_date() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_796_256_000 + 3_723), "2026-12-03 01:02:03 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("4\r\nWiki\r\n6\r\npedia \r\n0\r\n\r\n").unwrap(),
            "Wikipedia "
        );
        assert_eq!(dechunk("0\r\n\r\n").unwrap(), "");
        assert!(dechunk("zz\r\nab\r\n").is_err());
        assert!(dechunk("9\r\nshort\r\n").is_err());
    }
}
