//! The control API: HTTP/JSON on a unix socket (mode 0600) and optionally a
//! loopback TCP address, served on the control thread between probe rounds,
//! never on a polling core.
//!
//! The desired state is a [`Config`]. Every change — a VM, vnet, security
//! group, rule, VIP or backend created, replaced or deleted, or a whole new
//! configuration (`PUT /v1/config`, SIGHUP) — is applied to a copy, validated
//! whole exactly as `pollux check` does, compiled, and published as the next
//! policy generation with one atomic swap; or refused with a 4xx naming the
//! offending item, the generation unchanged. Requests are handled one at a
//! time (serialised by construction). Health learnt from probes is carried
//! into each new generation.
//!
//! What cannot change at run time: ports, `[dataplane]`, `[control]`,
//! `[dpdk]` and `[uplink]` (they shape the workers), and probes on VIPs of a
//! vnet added at run time (each vnet's prober port is attached at start):
//! such changes get a 409. Probes on the other vnets follow every change:
//! the control loop retires and adds probe targets to match.

pub mod state;

use state::backend_key;
pub use state::{ApiError, ControlState, ProbeState, Reloads, RuleHit, Runtime, rule_hits};

use crate::config::{BackendCfg, Config, VipCfg};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use vswitch::flow::FlowFilter;
use vswitch::switch::FlowRequest;

/// Per-backend connection counters summed over workers: for each VIP of
/// `cfg`, each backend's (name, new connections, active connections).
pub fn backend_counters(cfg: &Config, rt: &mut Runtime) -> Result<Vec<Value>, ApiError> {
    let replies = rt.ask(FlowRequest {
        id: 0,
        filter: FlowFilter::default(),
        delete: false,
        limit: 0,
        backends: true,
    })?;
    let mut sum: HashMap<lb::balancer::BackendKey, lb::balancer::BackendCounts> = HashMap::new();
    for (k, v) in replies.into_iter().flat_map(|r| r.backends) {
        let e = sum.entry(k).or_default();
        e.new_conns += v.new_conns;
        e.active += v.active;
    }
    let mut out = Vec::new();
    for v in &cfg.vip {
        let (Ok(addr), Ok(proto)) = (v.address.parse::<IpAddr>(), proto_num(&v.protocol)) else {
            continue;
        };
        for b in &v.backends {
            let ip = match (&b.ip, &b.vm) {
                (Some(ip), _) => ip.parse::<IpAddr>().ok(),
                (None, Some(vm)) => cfg
                    .vm
                    .iter()
                    .find(|m| &m.name == vm)
                    .and_then(|m| m.ips.iter().find_map(|i| i.parse::<IpAddr>().ok())),
                _ => None,
            };
            let Some(ip) = ip else { continue };
            let c = sum
                .get(&(addr, v.port, proto, ip, b.port))
                .copied()
                .unwrap_or_default();
            out.push(json!({"vip": v.name, "backend": format!("{ip}:{}", b.port),
                            "weight": b.weight.unwrap_or(1),
                            "new_connections": c.new_conns, "active_connections": c.active}));
        }
    }
    Ok(out)
}

/// Parses `a=b&c=d` (no percent-decoding needed: the values are addresses,
/// numbers and names).
fn query(url: &str) -> (String, HashMap<String, String>) {
    let (path, q) = url.split_once('?').unwrap_or((url, ""));
    let params = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    (path.trim_end_matches('/').to_string(), params)
}

fn ip16(s: &str, what: &str) -> Result<[u8; 16], ApiError> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a.to_ipv6_mapped().octets()),
        Ok(IpAddr::V6(a)) => Ok(a.octets()),
        Err(_) => Err(ApiError::new(
            400,
            format!("{what}: {s:?} is not an IP address"),
        )),
    }
}

fn proto_num(s: &str) -> Result<u8, ApiError> {
    match s {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        n => n.parse().map_err(|_| {
            ApiError::new(
                400,
                format!("proto: {s:?} is not tcp, udp, icmp or a number"),
            )
        }),
    }
}

/// The flow filter of `GET`/`DELETE /v1/flows`.
fn flow_filter(cfg: &Config, q: &HashMap<String, String>) -> Result<FlowFilter, ApiError> {
    let mut f = FlowFilter::default();
    for (k, v) in q {
        let port = |what: &str| {
            v.parse::<u16>()
                .map_err(|_| ApiError::new(400, format!("{what}: {v:?} is not a port number")))
        };
        match k.as_str() {
            "src" => f.src = Some(ip16(v, "src")?),
            "dst" => f.dst = Some(ip16(v, "dst")?),
            "proto" => f.proto = Some(proto_num(v)?),
            "sport" => f.src_port = Some(port("sport")?),
            "dport" => f.dst_port = Some(port("dport")?),
            "vm" => {
                let vm = cfg
                    .vm
                    .iter()
                    .find(|m| &m.name == v)
                    .ok_or_else(|| ApiError::new(404, format!("vm {v:?} does not exist")))?;
                let i = cfg.port.iter().position(|p| p.name == vm.port).unwrap_or(0);
                f.port = Some(i as u16);
            }
            "vip" => {
                let vip = cfg
                    .vip
                    .iter()
                    .find(|x| &x.name == v)
                    .ok_or_else(|| ApiError::new(404, format!("vip {v:?} does not exist")))?;
                f.vip = Some((
                    ip16(&vip.address, "vip address")?,
                    vip.port,
                    proto_num(&vip.protocol)?,
                ));
            }
            "limit" => {}
            other => {
                return Err(ApiError::new(
                    400,
                    format!(
                        "flows: unknown filter {other:?} (vm, vip, src, dst, proto, sport, dport, limit)"
                    ),
                ));
            }
        }
    }
    Ok(f)
}

fn flow_json(i: &vswitch::flow::FlowInfo, ports: &[String]) -> Value {
    let k = &i.key;
    let e = &i.entry;
    let port = |p: u16| {
        ports
            .get(usize::from(p))
            .cloned()
            .unwrap_or_else(|| format!("#{p}"))
    };
    json!({
        "worker": i.worker,
        "in_port": port(i.in_port),
        "src": k.src().to_string(),
        "dst": k.dst().to_string(),
        "proto": k.proto,
        "sport": k.src_port,
        "dport": k.dst_port,
        "out_port": port(e.action.out_port),
        "nat_src": e.action.nat.src.map(|(a, p)| format!("{a}:{p}")),
        "nat_dst": e.action.nat.dst.map(|(a, p)| format!("{a}:{p}")),
        "packets": e.packets,
        "bytes": e.bytes,
        "generation": e.generation,
        "closing": e.closing,
    })
}

/// An item kind of the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vnet,
    Vm,
    Nsg,
    Vip,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "vnets" => Kind::Vnet,
            "vms" => Kind::Vm,
            "nsgs" => Kind::Nsg,
            "vips" => Kind::Vip,
            _ => return None,
        })
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Vnet => "vnet",
            Kind::Vm => "vm",
            Kind::Nsg => "nsg",
            Kind::Vip => "vip",
        }
    }

    fn list(self, c: &Config) -> Value {
        let v = match self {
            Kind::Vnet => serde_json::to_value(&c.vnet),
            Kind::Vm => serde_json::to_value(&c.vm),
            Kind::Nsg => serde_json::to_value(&c.nsg),
            Kind::Vip => serde_json::to_value(&c.vip),
        };
        v.unwrap_or(Value::Null)
    }

    fn names(self, c: &Config) -> Vec<String> {
        match self {
            Kind::Vnet => c.vnet.iter().map(|x| x.name.clone()).collect(),
            Kind::Vm => c.vm.iter().map(|x| x.name.clone()).collect(),
            Kind::Nsg => c.nsg.iter().map(|x| x.name.clone()).collect(),
            Kind::Vip => c.vip.iter().map(|x| x.name.clone()).collect(),
        }
    }
}

/// Puts `item` (named `name`) into `list`, replacing one of the same name;
/// returns true if it was created.
fn upsert<T>(list: &mut Vec<T>, name: &str, item: T, name_of: impl Fn(&T) -> &str) -> bool {
    match list.iter().position(|x| name_of(x) == name) {
        Some(i) => {
            list[i] = item;
            false
        }
        None => {
            list.push(item);
            true
        }
    }
}

fn remove<T>(list: &mut Vec<T>, name: &str, name_of: impl Fn(&T) -> &str) -> bool {
    let before = list.len();
    list.retain(|x| name_of(x) != name);
    list.len() != before
}

fn body_json<T: serde::de::DeserializeOwned>(body: &str, what: &str) -> Result<T, ApiError> {
    serde_json::from_str(body).map_err(|e| ApiError::new(400, format!("{what}: {e}")))
}

/// The name in a body must be absent or the path's.
fn same_name(body: &mut Value, name: &str, what: &str) -> Result<(), ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::new(
            400,
            format!("{what}: the body must be a JSON object"),
        ));
    };
    match obj.get("name") {
        None => {
            obj.insert("name".into(), Value::String(name.into()));
            Ok(())
        }
        Some(Value::String(n)) if n == name => Ok(()),
        Some(other) => Err(ApiError::new(
            400,
            format!("{what}: name {other} differs from the path's {name:?}"),
        )),
    }
}

/// Answers one request: (status, JSON or text body, content type).
pub fn handle(
    state: &mut ControlState,
    rt: &mut Runtime,
    method: &str,
    url: &str,
    body: &str,
) -> (u16, String, &'static str) {
    let r = route(state, rt, method, url, body);
    let generation = state.generation();
    match r {
        Ok(Reply::Json(status, mut v)) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("generation".into(), json!(generation));
            }
            (status, v.to_string(), "application/json")
        }
        Ok(Reply::Text(t)) => (
            200,
            t,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        Err(e) => (
            e.status,
            json!({"error": e.message, "problems": e.problems, "generation": generation})
                .to_string(),
            "application/json",
        ),
    }
}

enum Reply {
    Json(u16, Value),
    Text(String),
}

fn route(
    state: &mut ControlState,
    rt: &mut Runtime,
    method: &str,
    url: &str,
    body: &str,
) -> Result<Reply, ApiError> {
    let (path, q) = query(url);
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let ok = |v: Value| Ok(Reply::Json(200, v));
    let changed = |status: u16, g: u64| Ok(Reply::Json(status, json!({"applied": g})));
    match (method, parts.as_slice()) {
        ("GET", ["metrics"]) => {
            let backends = backend_counters(state.config(), rt)?;
            Ok(Reply::Text(crate::metrics::render(state, rt, &backends)))
        }
        ("GET", ["v1", "status"]) => {
            let c = state.config();
            ok(json!({
                "vnets": c.vnet.len(), "vms": c.vm.len(), "nsgs": c.nsg.len(),
                "vips": c.vip.len(), "workers": rt.workers.len(), "ports": c.port.len(),
                "reloads": rt.reloads,
            }))
        }
        ("GET", ["v1", "config"]) => ok(json!({"config": state.config()})),
        ("PUT", ["v1", "config"]) => {
            let next: Config = body_json(body, "config")?;
            changed(200, state.replace(next)?)
        }
        ("GET", ["v1", kind]) if Kind::parse(kind).is_some() => {
            let k = Kind::parse(kind).ok_or_else(|| ApiError::new(404, "?"))?;
            ok(json!({ *kind: k.list(state.config()) }))
        }
        ("GET", ["v1", kind, name]) if Kind::parse(kind).is_some() => {
            let k = Kind::parse(kind).ok_or_else(|| ApiError::new(404, "?"))?;
            let i = k
                .names(state.config())
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| {
                    ApiError::new(404, format!("{} {name:?} does not exist", k.noun()))
                })?;
            ok(json!({ k.noun(): k.list(state.config()).get(i).cloned().unwrap_or(Value::Null) }))
        }
        ("PUT", ["v1", kind, name]) if Kind::parse(kind).is_some() => {
            let k = Kind::parse(kind).ok_or_else(|| ApiError::new(404, "?"))?;
            let what = format!("{} {name:?}", k.noun());
            let mut v: Value = body_json(body, &what)?;
            same_name(&mut v, name, &what)?;
            let v = v.to_string();
            let mut created = false;
            let generation = state.apply(|c| {
                created = match k {
                    Kind::Vnet => upsert(&mut c.vnet, name, body_json(&v, &what)?, |x| &x.name),
                    Kind::Vm => upsert(&mut c.vm, name, body_json(&v, &what)?, |x| &x.name),
                    Kind::Nsg => upsert(&mut c.nsg, name, body_json(&v, &what)?, |x| &x.name),
                    Kind::Vip => upsert(&mut c.vip, name, body_json(&v, &what)?, |x| &x.name),
                };
                Ok(())
            })?;
            changed(if created { 201 } else { 200 }, generation)
        }
        ("DELETE", ["v1", kind, name]) if Kind::parse(kind).is_some() => {
            let k = Kind::parse(kind).ok_or_else(|| ApiError::new(404, "?"))?;
            let gone = ApiError::new(404, format!("{} {name:?} does not exist", k.noun()));
            changed(
                200,
                state.apply(|c| {
                    let found = match k {
                        Kind::Vnet => remove(&mut c.vnet, name, |x| &x.name),
                        Kind::Vm => remove(&mut c.vm, name, |x| &x.name),
                        Kind::Nsg => remove(&mut c.nsg, name, |x| &x.name),
                        Kind::Vip => remove(&mut c.vip, name, |x| &x.name),
                    };
                    if found { Ok(()) } else { Err(gone) }
                })?,
            )
        }
        ("PUT" | "DELETE", ["v1", "nsgs", nsg, "rules", rule]) => {
            let what = format!("nsg {nsg:?} rule {rule:?}");
            let spec: Option<filter::RuleSpec> = if method == "PUT" {
                let mut v: Value = body_json(body, &what)?;
                same_name(&mut v, rule, &what)?;
                Some(body_json(&v.to_string(), &what)?)
            } else {
                None
            };
            let mut created = false;
            let generation = state.apply(|c| {
                let g = c
                    .nsg
                    .iter_mut()
                    .find(|g| g.name == *nsg)
                    .ok_or_else(|| ApiError::new(404, format!("nsg {nsg:?} does not exist")))?;
                fn name_of(r: &filter::RuleSpec) -> &str {
                    r.name.as_deref().unwrap_or("")
                }
                match spec {
                    Some(s) => created = upsert(&mut g.rules, rule, s, name_of),
                    None if remove(&mut g.rules, rule, name_of) => {}
                    None => return Err(ApiError::new(404, format!("{what} does not exist"))),
                }
                Ok(())
            })?;
            changed(if created { 201 } else { 200 }, generation)
        }
        ("PUT" | "DELETE" | "POST", ["v1", "vips", vip, "backends", backend, rest @ ..]) => {
            let what = format!("vip {vip:?} backend {backend:?}");
            let action = match (method, rest) {
                ("PUT", []) => Some(body_json::<BackendCfg>(body, &what)?),
                ("DELETE", []) => None,
                ("POST", ["drain"]) => None,
                _ => {
                    return Err(ApiError::new(
                        404,
                        format!("no such endpoint: {method} {path}"),
                    ));
                }
            };
            let drain = method == "POST";
            let mut created = false;
            let generation = state.apply(|c| {
                let v: &mut VipCfg = c
                    .vip
                    .iter_mut()
                    .find(|v| v.name == *vip)
                    .ok_or_else(|| ApiError::new(404, format!("vip {vip:?} does not exist")))?;
                // A backend is named by its VM or address, optionally :port.
                let is = |b: &BackendCfg| {
                    backend_key(b) == *backend
                        || b.vm.as_deref() == Some(backend)
                        || b.ip.as_deref() == Some(backend)
                };
                let at = v.backends.iter().position(is);
                match (action, at) {
                    (Some(b), Some(i)) => v.backends[i] = b,
                    (Some(b), None) => {
                        v.backends.push(b);
                        created = true;
                    }
                    (None, Some(i)) if drain => v.backends[i].weight = Some(0),
                    (None, Some(i)) => {
                        v.backends.remove(i);
                    }
                    (None, None) => {
                        return Err(ApiError::new(404, format!("{what} does not exist")));
                    }
                }
                Ok(())
            })?;
            changed(if created { 201 } else { 200 }, generation)
        }
        ("GET", ["v1", "probes"]) => ok(json!({"probes": rt.probes})),
        ("GET" | "DELETE", ["v1", "flows"]) => {
            let f = flow_filter(state.config(), &q)?;
            let limit = match q.get("limit") {
                Some(l) => l
                    .parse()
                    .map_err(|_| ApiError::new(400, format!("limit: {l:?} is not a number")))?,
                None => 1000,
            };
            let delete = method == "DELETE";
            let (flows, matched, occupancy) = rt.flows(f, delete, limit)?;
            let ports: Vec<String> = state.config().port.iter().map(|p| p.name.clone()).collect();
            if delete {
                ok(json!({"deleted": matched, "occupancy": occupancy}))
            } else {
                ok(json!({
                    "flows": flows.iter().map(|i| flow_json(i, &ports)).collect::<Vec<_>>(),
                    "matched": matched,
                    "occupancy": occupancy,
                }))
            }
        }
        ("GET", ["v1", "counters"]) => {
            let mut v = counters(state, rt);
            v["backends"] = Value::Array(backend_counters(state.config(), rt)?);
            ok(v)
        }
        _ => Err(ApiError::new(
            404,
            format!("no such endpoint: {method} {path}"),
        )),
    }
}

/// `GET /v1/counters`.
fn counters(state: &ControlState, rt: &Runtime) -> Value {
    let ports: Vec<Value> = rt
        .ports
        .iter()
        .map(|(name, ss)| {
            let mut t = dataplane::stats::PortStatsSnapshot::default();
            let mut drops: HashMap<&str, u64> = HashMap::new();
            for s in ss {
                let n = s.snapshot();
                t.rx_packets += n.rx_packets;
                t.rx_bytes += n.rx_bytes;
                t.tx_packets += n.tx_packets;
                t.tx_bytes += n.tx_bytes;
                for (r, c) in s.drops.nonzero() {
                    *drops.entry(r).or_default() += c;
                }
            }
            json!({"name": name, "rx_packets": t.rx_packets, "rx_bytes": t.rx_bytes,
                   "tx_packets": t.tx_packets, "tx_bytes": t.tx_bytes, "drops": drops})
        })
        .collect();
    let workers: Vec<Value> = rt
        .workers
        .iter()
        .zip(&rt.switches)
        .enumerate()
        .map(|(w, (ws, ss))| {
            let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let drops: HashMap<&str, u64> =
                ws.drops.nonzero().into_iter().chain(ss.nonzero()).collect();
            json!({"worker": w, "busy_polls": l(&ws.busy_polls), "idle_polls": l(&ws.idle_polls),
                   "busy_ticks": l(&ws.busy_ticks), "idle_ticks": l(&ws.idle_ticks),
                   "rx_packets": l(&ws.rx_packets), "tx_packets": l(&ws.tx_packets),
                   "fast_path": l(&ss.fast_path), "slow_path": l(&ss.slow_path),
                   "handed_off": l(&ss.handed_off), "drops": drops})
        })
        .collect();
    let rules: Vec<Value> = rule_hits(&state.policy().load(), &rt.acl_hits)
        .into_iter()
        .map(|r| {
            json!({"nsg": r.nsg, "direction": r.direction.to_string(), "rule": r.rule,
                   "priority": r.priority, "action": r.action.to_string(), "hits": r.hits})
        })
        .collect();
    json!({"ports": ports, "workers": workers, "rules": rules})
}

/// The control API's listeners: a unix socket (mode 0600) and optionally a
/// loopback TCP address, both feeding one request queue.
pub struct Server {
    unix: tiny_http::Server,
    tcp: Option<tiny_http::Server>,
    path: PathBuf,
}

impl Server {
    /// Binds `socket` (replacing a stale socket file) with mode 0600 before
    /// anyone can connect: it is bound under a temporary name, restricted,
    /// then renamed into place; and `tcp`, which must be a loopback address.
    pub fn bind(socket: &Path, tcp: Option<&str>) -> Result<Server, String> {
        use std::os::unix::fs::PermissionsExt;
        let err = |e: &dyn std::fmt::Display| format!("control socket {}: {e}", socket.display());
        // A socket someone answers on belongs to a running pollux: never
        // take it over (a stale file, with nobody listening, is replaced).
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(err(
                &"another process is serving it (is pollux already running?)",
            ));
        }
        let tmp = socket.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| err(&e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(&e))?;
        std::fs::rename(&tmp, socket).map_err(|e| err(&e))?;
        let unix = tiny_http::Server::from_listener(listener, None).map_err(|e| err(&e))?;
        let tcp = match tcp {
            None => None,
            Some(addr) => {
                let a: std::net::SocketAddr = addr
                    .parse()
                    .map_err(|_| format!("control tcp {addr:?}: not an address:port"))?;
                if !a.ip().is_loopback() {
                    return Err(format!("control tcp {addr:?}: must be a loopback address"));
                }
                let l = std::net::TcpListener::bind(a)
                    .map_err(|e| format!("control tcp {addr}: {e}"))?;
                Some(
                    tiny_http::Server::from_listener(l, None)
                        .map_err(|e| format!("control tcp {addr}: {e}"))?,
                )
            }
        };
        Ok(Server {
            unix,
            tcp,
            path: socket.to_path_buf(),
        })
    }

    /// The bound TCP address, if any.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|t| t.server_addr().to_ip())
    }

    /// Waits up to `wait` for requests and answers every one that came.
    pub fn serve(&self, wait: Duration, state: &mut ControlState, rt: &mut Runtime) {
        let first = match self.unix.recv_timeout(if self.tcp.is_some() {
            Duration::ZERO
        } else {
            wait
        }) {
            Ok(Some(r)) => Some(r),
            _ => match &self.tcp {
                Some(t) => t.recv_timeout(wait).ok().flatten(),
                None => None,
            },
        };
        let Some(first) = first else { return };
        let mut next = Some(first);
        while let Some(mut req) = next {
            let mut body = String::new();
            let resp = match std::io::Read::read_to_string(req.as_reader(), &mut body) {
                Ok(_) => handle(
                    state,
                    rt,
                    &req.method().to_string().to_uppercase(),
                    req.url(),
                    &body,
                ),
                Err(e) => (
                    400,
                    json!({"error": format!("body: {e}")}).to_string(),
                    "application/json",
                ),
            };
            let (status, text, ctype) = resp;
            let mut r = tiny_http::Response::from_string(text).with_status_code(status);
            if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()) {
                r = r.with_header(h);
            }
            let _ = req.respond(r);
            next = self
                .unix
                .try_recv()
                .ok()
                .flatten()
                .or_else(|| self.tcp.as_ref().and_then(|t| t.try_recv().ok().flatten()));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
