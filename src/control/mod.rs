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
//! `[dpdk]` and `[uplink]` (they shape the workers), an existing vnet's
//! `[vnet.snat]` (laid out in every worker), removing or reordering vnets
//! (workers keep their state by the vnet's place), and probes on VIPs of a
//! vnet added at run time (each vnet's prober port is attached at start):
//! such changes get a 409. Probes on the other vnets follow every change:
//! the control loop retires and adds probe targets to match.

pub mod auth;
mod capture;
mod events;
pub mod flowlog;
pub mod state;
mod trace;

pub use events::log_events;

pub use capture::{CAPTURE_RECORDS, LIVE_TRACE_RECORDS, step as capture_step};

use state::backend_key;
pub use state::{ApiError, ControlState, ProbeState, Reloads, RuleHit, Runtime, rule_hits};

use crate::api::{
    Applied, BackendCounters, Counters, Device, ErrorBody, Flow, Flows, FlowsDeleted, PortCounters,
    Probes, QueueCounters, RuleCounters, Status, WorkerCounters,
};
use crate::config::{BackendCfg, Config, VipCfg};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use vswitch::flow::FlowFilter;
use vswitch::switch::FlowRequest;

/// Per-backend connection counters summed over workers: for each VIP of
/// `cfg`, each backend's (name, new connections, active connections).
pub fn backend_counters(cfg: &Config, rt: &mut Runtime) -> Result<Vec<BackendCounters>, ApiError> {
    let replies = rt.ask(FlowRequest {
        id: 0,
        filter: FlowFilter::default(),
        delete: false,
        reset: false,
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
            out.push(BackendCounters {
                vip: v.name.clone(),
                backend: format!("{ip}:{}", b.port),
                weight: b.weight.unwrap_or(1),
                new_connections: c.new_conns,
                active_connections: c.active,
            });
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
    s.parse::<IpAddr>()
        .map(dataplane::key::to16)
        .map_err(|_| ApiError::new(400, format!("{what}: {s:?} is not an IP address")))
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
            "limit" | "reset" => {}
            other => {
                return Err(ApiError::new(
                    400,
                    format!(
                        "flows: unknown filter {other:?} (vm, vip, src, dst, proto, sport, dport, limit, reset)"
                    ),
                ));
            }
        }
    }
    Ok(f)
}

/// A true-or-false query parameter `key` (`1`/`true`, `0`/`false`;
/// absent: false).
fn flag(q: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(ApiError::new(
            400,
            format!("{key}: {other:?} is not true or false"),
        )),
    }
}

/// A cached flow as the API shows it, ports by name.
fn flow_body(i: &vswitch::flow::FlowInfo, ports: &[String], policy: &vswitch::Policy) -> Flow {
    let k = &i.key;
    let e = &i.entry;
    // Ports beyond the configured ones: tunnels (named `remote` or a Mux
    // VIP's `VIP/DIP`) and internal ones.
    let port = |p: u16| match p {
        vswitch::flow::HAIRPIN_PORT => "hairpin".to_string(),
        _ => ports
            .get(usize::from(p))
            .cloned()
            .or_else(|| policy.tunnel(p).map(|t| format!("tunnel {}", t.name)))
            .unwrap_or_else(|| format!("#{p}")),
    };
    Flow {
        worker: i.worker,
        in_port: port(i.in_port),
        src: k.src().to_string(),
        dst: k.dst().to_string(),
        proto: k.proto,
        sport: k.src_port,
        dport: k.dst_port,
        out_port: port(e.action.out_port),
        nat_src: e.action.nat.src.map(|(a, p)| format!("{a}:{p}")),
        nat_dst: e.action.nat.dst.map(|(a, p)| format!("{a}:{p}")),
        packets: e.packets,
        bytes: e.bytes,
        generation: e.generation,
        closing: e.closing,
        connection: i.conn.map(|c| conn_state_name(c).to_string()),
    }
}

/// A tracked connection's state as the API names it.
fn conn_state_name(c: lb::conntrack::ConnState) -> &'static str {
    use lb::conntrack::{ConnState, TcpState};
    match c {
        ConnState::Tcp(TcpState::SynSent) => "syn_sent",
        ConnState::Tcp(TcpState::SynReceived) => "syn_received",
        ConnState::Tcp(TcpState::Established) => "established",
        ConnState::Tcp(TcpState::FinWait) => "fin_wait",
        ConnState::Tcp(TcpState::TimeWait) => "time_wait",
        ConnState::Tcp(TcpState::Closed) => "closed",
        ConnState::Udp { replied: false } => "udp",
        ConnState::Udp { replied: true } => "udp_replied",
        ConnState::Other => "other",
    }
}

/// An item kind of the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vnet,
    Vm,
    Nsg,
    Vip,
    Remote,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "vnets" => Kind::Vnet,
            "vms" => Kind::Vm,
            "nsgs" => Kind::Nsg,
            "vips" => Kind::Vip,
            "remotes" => Kind::Remote,
            _ => return None,
        })
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Vnet => "vnet",
            Kind::Vm => "vm",
            Kind::Nsg => "nsg",
            Kind::Vip => "vip",
            Kind::Remote => "remote",
        }
    }

    fn list(self, c: &Config) -> Value {
        let v = match self {
            Kind::Vnet => serde_json::to_value(&c.vnet),
            Kind::Vm => serde_json::to_value(&c.vm),
            Kind::Nsg => serde_json::to_value(&c.nsg),
            Kind::Vip => serde_json::to_value(&c.vip),
            Kind::Remote => serde_json::to_value(&c.remote),
        };
        v.unwrap_or(Value::Null)
    }

    fn names(self, c: &Config) -> Vec<String> {
        match self {
            Kind::Vnet => c.vnet.iter().map(|x| x.name.clone()).collect(),
            Kind::Vm => c.vm.iter().map(|x| x.name.clone()).collect(),
            Kind::Nsg => c.nsg.iter().map(|x| x.name.clone()).collect(),
            Kind::Vip => c.vip.iter().map(|x| x.name.clone()).collect(),
            Kind::Remote => c.remote.iter().map(|x| x.name.clone()).collect(),
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

/// Answers one request: (status, JSON or text body, content type). Every
/// JSON body carries the published generation.
pub fn handle(
    state: &mut ControlState,
    rt: &mut Runtime,
    method: &str,
    url: &str,
    body: &str,
) -> (u16, String, &'static str) {
    let r = route(state, rt, method, url, body);
    let generation = state.generation();
    let with_generation = |status: u16, mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.insert("generation".into(), json!(generation));
        }
        (status, v.to_string(), "application/json")
    };
    match r {
        Ok(Reply::Json(status, v)) => with_generation(status, v),
        Ok(Reply::Text(t)) => (
            200,
            t,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        Err(e) => with_generation(
            e.status,
            serde_json::to_value(ErrorBody {
                error: e.message,
                problems: e.problems,
            })
            .unwrap_or(Value::Null),
        ),
    }
}

enum Reply {
    Json(u16, Value),
    Text(String),
}

/// A typed body as a reply.
fn reply<T: Serialize>(status: u16, body: &T) -> Result<Reply, ApiError> {
    serde_json::to_value(body)
        .map(|v| Reply::Json(status, v))
        .map_err(|e| ApiError::new(500, format!("cannot encode the reply: {e}")))
}

/// A change published as generation `g`: 201 when it created the item.
fn applied(created: bool, g: u64) -> Result<Reply, ApiError> {
    reply(if created { 201 } else { 200 }, &Applied { applied: g })
}

fn no_endpoint(method: &str, path: &str) -> ApiError {
    ApiError::new(404, format!("no such endpoint: {method} {path}"))
}

/// Dispatches a request to its handler by method and path.
fn route(
    state: &mut ControlState,
    rt: &mut Runtime,
    method: &str,
    url: &str,
    body: &str,
) -> Result<Reply, ApiError> {
    let (path, q) = query(url);
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method, parts.as_slice()) {
        ("GET", ["metrics"]) => {
            let c = counters(state, rt)?;
            Ok(Reply::Text(crate::metrics::render(
                &c,
                &rt.probes,
                &maglev(state, false).vips,
                rt.bgp.view(state.config()).as_ref(),
                &flowlog::view(rt),
                state.generation(),
            )))
        }
        ("GET", ["v1", "status"]) => reply(200, &status(state, rt)),
        ("GET", ["v1", "config"]) => reply(200, &json!({"config": state.config()})),
        ("PUT", ["v1", "config"]) => applied(false, state.replace(body_json(body, "config")?)?),
        (_, ["v1", kind, name @ ..]) if name.len() <= 1 && Kind::parse(kind).is_some() => {
            item(state, method, kind, name.first().copied(), body)
                .map_err(|e| e.unwrap_or_else(|| no_endpoint(method, &path)))
        }
        ("PUT" | "DELETE", ["v1", "nsgs", nsg, "rules", rule]) => {
            change_rule(state, nsg, rule, (method == "PUT").then_some(body))
        }
        (_, ["v1", "vips", vip, "backends", backend, rest @ ..]) => {
            let change = match (method, rest) {
                ("PUT", []) => BackendChange::Put(body_json(body, &backend_what(vip, backend))?),
                ("DELETE", []) => BackendChange::Delete,
                ("POST", ["drain"]) => BackendChange::Drain,
                _ => return Err(no_endpoint(method, &path)),
            };
            change_backend(state, vip, backend, change)
        }
        ("GET", ["v1", "underlay"]) => reply(200, &underlay(state, rt)),
        ("GET", ["v1", "maglev"]) => reply(200, &maglev(state, flag(&q, "slots")?)),
        ("GET", ["v1", "perf"]) => reply(200, &perf(state, rt)),
        ("POST", ["v1", "perf", "reset"]) => {
            rt.perf_base = (local_counters(state, rt).workers, std::time::Instant::now());
            reply(200, &perf(state, rt))
        }
        ("GET", ["v1", "bgp"]) => match rt.bgp.view(state.config()) {
            Some(v) => reply(200, &v),
            None => Err(no_bgp()),
        },
        ("POST" | "DELETE", ["v1", "bgp", "drain"]) => {
            if state.config().bgp.is_none() {
                return Err(no_bgp());
            }
            let p = state.policy().load_full();
            rt.bgp.set_draining(method == "POST", state.config(), &p);
            match rt.bgp.view(state.config()) {
                Some(v) => reply(200, &v),
                None => Err(no_bgp()),
            }
        }
        ("GET", ["v1", "routes"]) => reply(200, &routes_of(state.config())),
        ("PUT", ["v1", "routes"]) => {
            let r: crate::api::Routes = body_json(body, "routes")?;
            let g = state.apply(|c| match c.uplink.as_mut() {
                Some(u) if u.address.is_some() => {
                    u.gateway = r.gateway;
                    u.route = r.routes;
                    Ok(())
                }
                _ => Err(ApiError::new(
                    409,
                    "the uplink has no address: it has no routes (give [uplink] an address and restart)",
                )),
            })?;
            applied(false, g)
        }
        ("GET", ["v1", "probes"]) => reply(
            200,
            &Probes {
                probes: rt.probes.clone(),
            },
        ),
        ("GET" | "DELETE", ["v1", "flows"]) => flows(state, rt, method == "DELETE", &q),
        ("GET", ["v1", "counters"]) => reply(200, &counters(state, rt)?),
        ("POST", ["v1", "takeover"]) => takeover(state, rt, body),
        ("POST", ["v1", "trace"]) => trace::trace(state, rt, body),
        ("POST", ["v1", "trace", "live"]) => capture::start_live(state, rt, body),
        ("GET" | "DELETE", ["v1", "trace", "live"]) => {
            capture::read_live(state, rt, method == "DELETE")
        }
        ("POST", ["v1", "capture"]) => capture::start(state, rt, body),
        ("GET" | "DELETE", ["v1", "capture"]) => capture::read(state, rt, method == "DELETE"),
        ("GET", ["v1", "ipfix"]) => reply(200, &flowlog::view(rt)),
        ("PUT", ["v1", "ipfix"]) => {
            applied(false, flowlog::set(state, Some(body_json(body, "ipfix")?))?)
        }
        ("DELETE", ["v1", "ipfix"]) => applied(false, flowlog::set(state, None)?),
        _ => Err(no_endpoint(method, &path)),
    }
}

/// `GET /v1/routes`: the uplink's gateway and static routes.
fn routes_of(c: &crate::config::Config) -> crate::api::Routes {
    crate::api::Routes {
        gateway: c.uplink.as_ref().and_then(|u| u.gateway.clone()),
        routes: c
            .uplink
            .as_ref()
            .map(|u| u.route.clone())
            .unwrap_or_default(),
    }
}

/// `GET /v1/perf`: each worker's cycle accounting since the last reset.
fn perf(state: &ControlState, rt: &Runtime) -> crate::api::PerfView {
    let (base, at) = &rt.perf_base;
    crate::api::PerfView {
        ticks_per_second: dataplane::clock::TscClock::process().hz(),
        seconds: at.elapsed().as_secs_f64(),
        workers: local_counters(state, rt)
            .workers
            .iter()
            .map(|c| {
                let since = match base.get(c.worker) {
                    Some(b) => c.since(b),
                    None => c.clone(),
                };
                crate::api::WorkerPerf::of(&since)
            })
            .collect(),
    }
}

/// The refusal of a BGP request without `[bgp]`.
fn no_bgp() -> ApiError {
    ApiError::new(
        409,
        "no [bgp] section: this pollux announces no VIP (add one and restart or reload)",
    )
}

/// `GET /v1/maglev`: each VIP's table, its digest; with `slots`, each
/// slot's backend.
fn maglev(state: &ControlState, slots: bool) -> crate::api::MaglevView {
    let p = state.policy().load();
    let vips = p
        .vips()
        .iter()
        .map(|v| {
            let c = v.config();
            let vnet = p
                .vnets
                .iter()
                .find(|n| {
                    n.vips
                        .get(c.addr, c.port, c.proto)
                        .is_some_and(|x| std::sync::Arc::ptr_eq(x, v))
                })
                .map_or(String::new(), |n| n.name.clone());
            let set = v.backends();
            let mut ids: Vec<u16> = set.table().entries().to_vec();
            ids.sort_unstable();
            ids.dedup();
            crate::api::VipTableView {
                vip: c.name.clone(),
                vnet,
                mode: c.mode.name().to_string(),
                frontend: format!("{}:{}/{}", c.addr, c.port, proto_name(c.proto)),
                table_size: c.table_size,
                backends: c.backends.len(),
                in_table: ids.len(),
                epoch: set.epoch(),
                digest: format!("{:08x}", v.table_digest()),
                slots: slots.then(|| {
                    set.table()
                        .entries()
                        .iter()
                        .map(|&e| {
                            c.backends
                                .get(usize::from(e))
                                .map_or("-".into(), |b| format!("{}:{}", b.ip, b.port))
                        })
                        .collect()
                }),
            }
        })
        .collect();
    crate::api::MaglevView { vips }
}

/// A VIP protocol's name.
fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// `GET /v1/underlay`.
fn underlay(state: &ControlState, rt: &Runtime) -> crate::api::UnderlayView {
    let p = state.policy().load();
    let Some((_, ul)) = p.underlay() else {
        return crate::api::UnderlayView::default();
    };
    let now = rt.neighbours.now();
    let t = *rt.neighbours.cache.timers();
    crate::api::UnderlayView {
        address: Some(ul.address.to_string()),
        routes: ul
            .routes
            .iter()
            .map(|(n, via)| (n.to_string(), via.to_string()))
            .collect(),
        neighbours: rt
            .neighbours
            .cache
            .entries()
            .map(|(ip, n)| crate::api::NeighbourView {
                ip: ip.to_string(),
                mac: n.mac.map(|m| m.to_string()),
                state: n.state(now, &t).to_string(),
                confirmed_ago_s: (n.confirmed > 0)
                    .then(|| now.saturating_sub(n.confirmed) as f64 / 1e9),
            })
            .collect(),
        tunnels: p
            .tunnels
            .iter()
            .map(|tn| {
                let vn = p.vnets.get(tn.vnet);
                crate::api::TunnelView {
                    remote: tn.name.clone(),
                    vnet: vn.map_or(String::new(), |v| v.name.clone()),
                    vni: if tn.encap == dataplane::tunnel::Encap::Ipip {
                        0
                    } else {
                        vn.and_then(|v| v.vni).unwrap_or(0)
                    },
                    encap: tn.encap.name().to_string(),
                    host: tn.host.to_string(),
                    next_hop: tn.next_hop.map(|h| h.to_string()),
                    next_hop_mac: tn.outer.map(|o| o.dst_mac.to_string()),
                }
            })
            .collect(),
    }
}

/// `POST /v1/takeover`: a successor asks to take over. Accepted (202) when
/// every port can be handed over and it reads this build's state format;
/// the control loop then stops the workers and hands over.
fn takeover(state: &ControlState, rt: &mut Runtime, body: &str) -> Result<Reply, ApiError> {
    use crate::takeover::{FORMAT, Request, port_problems};
    let req: Request = body_json(body, "takeover request")?;
    if rt.takeover_request.is_some() {
        return Err(ApiError::new(409, "a takeover is already under way"));
    }
    if !req.formats.contains(&FORMAT) {
        return Err(ApiError::new(
            409,
            format!(
                "this pollux ({}) writes state format {FORMAT}; the successor ({}) reads {:?}",
                crate::takeover::VERSION,
                req.version,
                req.formats
            ),
        ));
    }
    // The handover socket is the successor's, beside the control socket
    // and named after it (`pollux.takeoverPID` beside `pollux.sock`).
    let beside = |p: &Path| {
        let ours = state.config().control.as_ref().map(|c| c.socket.clone());
        ours.is_some_and(|c| {
            c.parent() == p.parent()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .zip(c.file_stem().and_then(|n| n.to_str()))
                    .is_some_and(|(n, stem)| n.starts_with(&format!("{stem}.takeover")))
        })
    };
    if !beside(&req.socket) {
        return Err(ApiError::new(
            400,
            format!(
                "handover socket {}: not beside the control socket",
                req.socket.display()
            ),
        ));
    }
    let mut problems = port_problems(state.config());
    let sockets = crate::takeover::descriptors(state.config());
    if sockets > crate::takeover::MAX_SOCKETS {
        problems.push(format!(
            "{sockets} port descriptors are more than one handover carries ({})",
            crate::takeover::MAX_SOCKETS
        ));
    }
    if !problems.is_empty() {
        return Err(ApiError {
            status: 409,
            message: problems.join("; "),
            problems,
        });
    }
    tracing::info!(
        "pid {} (version {}) takes over; handing over at {}",
        req.pid,
        req.version,
        req.socket.display()
    );
    rt.takeover_request = Some(req);
    reply(202, &json!({"accepted": true}))
}

/// `GET /v1/status`.
fn status(state: &ControlState, rt: &Runtime) -> Status {
    let c = state.config();
    Status {
        ports: c.port.len(),
        workers: rt.workers.len(),
        vnets: c.vnet.len(),
        vms: c.vm.len(),
        nsgs: c.nsg.len(),
        vips: c.vip.len(),
        reloads: rt.reloads.clone(),
        version: crate::takeover::VERSION.to_string(),
        pid: std::process::id(),
        takeover: rt.takeover.clone(),
        takeover_failed: rt.takeover_failed.clone(),
        bgp: rt.bgp.view(c),
        devices: rt
            .ports
            .iter()
            .filter_map(|(name, ss)| {
                let s = ss.first()?;
                let d = s.device.as_ref()?;
                let link = s.link.as_ref();
                Some(Device {
                    port: name.clone(),
                    driver: d.driver.clone(),
                    device: d.name.clone(),
                    queues: d.queues,
                    max_rx_queues: d.max_queues.0,
                    max_tx_queues: d.max_queues.1,
                    link: link.map(|l| if l.is_up() { "up" } else { "down" }.to_string()),
                    speed_mbps: link.map(|l| l.speed_mbps()).filter(|&s| s > 0),
                })
            })
            .collect(),
    }
}

/// `GET /v1/{kind}`, and `GET`, `PUT`, `DELETE /v1/{kind}/{name}` of vnets,
/// VMs, groups, VIPs and remote endpoints. `Err(None)`: no such endpoint.
fn item(
    state: &mut ControlState,
    method: &str,
    kind: &str,
    name: Option<&str>,
    body: &str,
) -> Result<Reply, Option<ApiError>> {
    let k = Kind::parse(kind).ok_or(None)?;
    match (method, name) {
        ("GET", None) => Ok(reply(200, &json!({ kind: k.list(state.config()) }))?),
        ("GET", Some(name)) => {
            let i = k
                .names(state.config())
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| {
                    ApiError::new(404, format!("{} {name:?} does not exist", k.noun()))
                })?;
            let one = k
                .list(state.config())
                .get(i)
                .cloned()
                .unwrap_or(Value::Null);
            Ok(reply(200, &json!({ k.noun(): one }))?)
        }
        ("PUT", Some(name)) => {
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
                    Kind::Remote => upsert(&mut c.remote, name, body_json(&v, &what)?, |x| &x.name),
                };
                Ok(())
            })?;
            Ok(applied(created, generation)?)
        }
        ("DELETE", Some(name)) => {
            let gone = ApiError::new(404, format!("{} {name:?} does not exist", k.noun()));
            let generation = state.apply(|c| {
                let found = match k {
                    Kind::Vnet => remove(&mut c.vnet, name, |x| &x.name),
                    Kind::Vm => remove(&mut c.vm, name, |x| &x.name),
                    Kind::Nsg => remove(&mut c.nsg, name, |x| &x.name),
                    Kind::Vip => remove(&mut c.vip, name, |x| &x.name),
                    Kind::Remote => remove(&mut c.remote, name, |x| &x.name),
                };
                if found { Ok(()) } else { Err(gone) }
            })?;
            Ok(applied(false, generation)?)
        }
        _ => Err(None),
    }
}

/// `PUT` (with `body`) or `DELETE` (without) `/v1/nsgs/{nsg}/rules/{rule}`.
fn change_rule(
    state: &mut ControlState,
    nsg: &str,
    rule: &str,
    body: Option<&str>,
) -> Result<Reply, ApiError> {
    let what = format!("nsg {nsg:?} rule {rule:?}");
    let spec: Option<filter::RuleSpec> = match body {
        Some(body) => {
            let mut v: Value = body_json(body, &what)?;
            same_name(&mut v, rule, &what)?;
            Some(body_json(&v.to_string(), &what)?)
        }
        None => None,
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
    applied(created, generation)
}

/// What a request does to one backend of a VIP.
enum BackendChange {
    /// Create or replace it.
    Put(BackendCfg),
    /// Remove it.
    Delete,
    /// Weight 0: no new connections, established ones stay.
    Drain,
}

fn backend_what(vip: &str, backend: &str) -> String {
    format!("vip {vip:?} backend {backend:?}")
}

/// `PUT`, `DELETE /v1/vips/{vip}/backends/{backend}` and `POST .../drain`.
/// A backend is named by its VM or address, optionally with `:port`.
fn change_backend(
    state: &mut ControlState,
    vip: &str,
    backend: &str,
    change: BackendChange,
) -> Result<Reply, ApiError> {
    let what = backend_what(vip, backend);
    let mut created = false;
    let generation = state.apply(|c| {
        let v: &mut VipCfg = c
            .vip
            .iter_mut()
            .find(|v| v.name == *vip)
            .ok_or_else(|| ApiError::new(404, format!("vip {vip:?} does not exist")))?;
        let is = |b: &BackendCfg| {
            backend_key(b) == *backend
                || b.vm.as_deref() == Some(backend)
                || b.ip.as_deref() == Some(backend)
        };
        let at = v.backends.iter().position(is);
        match (change, at) {
            (BackendChange::Put(b), Some(i)) => v.backends[i] = b,
            (BackendChange::Put(b), None) => {
                v.backends.push(b);
                created = true;
            }
            (BackendChange::Drain, Some(i)) => v.backends[i].weight = Some(0),
            (BackendChange::Delete, Some(i)) => {
                v.backends.remove(i);
            }
            (_, None) => return Err(ApiError::new(404, format!("{what} does not exist"))),
        }
        Ok(())
    })?;
    applied(created, generation)
}

/// `GET` (or `DELETE`) `/v1/flows?filters`.
fn flows(
    state: &ControlState,
    rt: &mut Runtime,
    delete: bool,
    q: &HashMap<String, String>,
) -> Result<Reply, ApiError> {
    let f = flow_filter(state.config(), q)?;
    let limit = match q.get("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::new(400, format!("limit: {l:?} is not a number")))?,
        None => 1000,
    };
    let reset = flag(q, "reset")?;
    if reset && !delete {
        return Err(ApiError::new(
            400,
            "reset: only with DELETE (it forgets the connections of the flows deleted)",
        ));
    }
    let (flows, matched, occupancy) = rt.flows(f, delete, reset, limit)?;
    if delete {
        return reply(
            200,
            &FlowsDeleted {
                deleted: matched,
                occupancy,
            },
        );
    }
    let ports: Vec<String> = state.config().port.iter().map(|p| p.name.clone()).collect();
    reply(
        200,
        &Flows {
            flows: {
                let p = state.policy().load();
                flows.iter().map(|i| flow_body(i, &ports, &p)).collect()
            },
            matched,
            occupancy,
        },
    )
}

/// Sums `(reason, count)` pairs by reason.
pub fn by_reason<'a>(pairs: impl IntoIterator<Item = (&'a str, u64)>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (r, c) in pairs {
        *out.entry(r.to_string()).or_default() += c;
    }
    out
}

/// `GET /v1/counters`, which the metrics are made of too.
pub fn counters(state: &ControlState, rt: &mut Runtime) -> Result<Counters, ApiError> {
    Ok(Counters {
        backends: backend_counters(state.config(), rt)?,
        ..local_counters(state, rt)
    })
}

/// The counters the control thread reads by itself (ports, workers, rules;
/// not the backends', which the workers are asked for): also what is left
/// to read once the workers have stopped.
pub fn local_counters(state: &ControlState, rt: &Runtime) -> Counters {
    let ports = rt
        .ports
        .iter()
        .map(|(name, ss)| {
            let mut c = PortCounters {
                name: name.clone(),
                ..PortCounters::default()
            };
            for (queue, s) in ss.iter().enumerate() {
                let n = s.snapshot();
                c.rx_packets += n.rx_packets;
                c.rx_bytes += n.rx_bytes;
                c.tx_packets += n.tx_packets;
                c.tx_bytes += n.tx_bytes;
                if ss.len() > 1 {
                    c.queues.push(QueueCounters {
                        queue,
                        rx_packets: n.rx_packets,
                        rx_bytes: n.rx_bytes,
                        tx_packets: n.tx_packets,
                        tx_bytes: n.tx_bytes,
                        drops: n.drops,
                    });
                }
            }
            c.drops = by_reason(ss.iter().flat_map(|s| s.drops.nonzero()));
            if let Some(l) = ss.first().and_then(|s| s.link.as_ref()) {
                c.link = Some(if l.is_up() { "up" } else { "down" }.to_string());
                c.link_changes = Some(l.changes());
                c.speed_mbps = Some(l.speed_mbps()).filter(|&s| s > 0);
            }
            c
        })
        .collect();
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let workers = rt
        .workers
        .iter()
        .zip(&rt.switches)
        .enumerate()
        .map(|(w, (ws, ss))| WorkerCounters {
            worker: w,
            busy_polls: l(&ws.busy_polls),
            idle_polls: l(&ws.idle_polls),
            idle_sleeps: l(&ws.idle_sleeps),
            busy_ticks: l(&ws.busy_ticks),
            idle_ticks: l(&ws.idle_ticks),
            rx_packets: l(&ws.rx_packets),
            tx_packets: l(&ws.tx_packets),
            fast_path: l(&ss.fast_path),
            slow_path: l(&ss.slow_path),
            handed_off: l(&ss.handed_off),
            flows_installed: l(&ss.flows_installed),
            flow_table_entries: l(&ss.flows),
            icmp_errors: l(&ss.icmp_errors),
            icmp_related: l(&ss.icmp_related),
            connections: l(&ss.conns),
            conns_evicted_embryonic: l(&ss.conns_evicted_embryonic),
            conns_untracked: l(&ss.conns_untracked),
            frags_noted: l(&ss.frags_noted),
            frags_followed: l(&ss.frags_followed),
            frags_held: l(&ss.frags_held),
            frags_waiting: l(&ss.frags_waiting),
            syn_cookies_sent: l(&ss.syn_cookies_sent),
            syn_proxied: l(&ss.syn_proxied),
            hairpinned: l(&ss.hairpinned),
            snat_inbound: l(&ss.snat_inbound),
            snat_ports_in_use: l(&ss.snat_ports),
            tunnel_tx: l(&ss.tunnel_tx),
            tunnel_rx: l(&ss.tunnel_rx),
            arp_requests: l(&ss.arp_requests),
            mux_tx: l(&ss.mux_tx),
            dsr_rx: l(&ss.dsr_rx),
            pipeline_ticks: l(&ws.pipeline_ticks),
            io_ticks: l(&ws.io_ticks),
            slow_path_ticks: l(&ss.slow_path_ticks),
            rx_bursts: ws.rx_bursts.iter().map(l).collect(),
            drops: by_reason(ws.drops.nonzero().into_iter().chain(ss.nonzero())),
        })
        .map(|mut c| {
            if let Some(b) = rt.base.get(c.worker) {
                c.add(b);
            }
            c
        })
        .collect();
    let rules = rule_hits(&state.policy().load(), &rt.acl_hits)
        .into_iter()
        .map(|r| RuleCounters {
            nsg: r.nsg,
            direction: r.direction.to_string(),
            rule: r.rule,
            priority: r.priority,
            action: r.action.to_string(),
            hits: r.hits,
        })
        .collect();
    Counters {
        ports,
        workers,
        backends: Vec::new(),
        rules,
    }
}

/// Why the control API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The unix socket could not be set up.
    #[error("control socket {}: {reason}", path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TCP endpoint's token could not be read.
    #[error("control tcp: {0}")]
    Token(#[from] auth::TokenError),
    /// The TCP listener could not be set up.
    #[error("control tcp {addr:?}: {reason}")]
    Tcp {
        /// The address as configured.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// The control API's listeners: a unix socket (mode 0600) and optionally a
/// loopback TCP address, both feeding one request queue.
pub struct Server {
    unix: tiny_http::Server,
    tcp: Option<tiny_http::Server>,
    /// The token every request over TCP must carry.
    token: Option<auth::Token>,
    /// `GET /metrics` over TCP without the token.
    metrics_open: bool,
    /// Requests over TCP refused for want of the token.
    refused: std::cell::Cell<u64>,
    path: PathBuf,
}

impl Server {
    /// Binds `socket` (replacing a stale socket file) with mode 0600 before
    /// anyone can connect: it is bound under a temporary name, restricted,
    /// then renamed into place; and `tcp`, which must be a loopback address,
    /// with its token read from `token_file` (required with `tcp`).
    pub fn bind(cfg: &crate::config::ControlCfg) -> Result<Server, BindError> {
        Self::bind_as(cfg, false)
    }

    /// [`Server::bind`]; `successor`: this process takes over from the
    /// pollux that served `socket`, which has stopped serving it (its file
    /// is replaced, and a TCP address it just closed is retried for a
    /// while).
    pub fn bind_as(cfg: &crate::config::ControlCfg, successor: bool) -> Result<Server, BindError> {
        use std::os::unix::fs::PermissionsExt;
        let (socket, tcp) = (cfg.socket.as_path(), cfg.tcp.as_deref());
        // The token first: a TCP endpoint is never served without one.
        let token = match (tcp, &cfg.token_file) {
            (None, _) => None,
            (Some(addr), None) => {
                return Err(BindError::Tcp {
                    addr: addr.to_string(),
                    reason: "needs token_file".into(),
                });
            }
            (Some(_), Some(f)) => Some(auth::Token::read(f)?),
        };
        let err = |e: &dyn std::fmt::Display| BindError::Socket {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        };
        // A socket someone answers on belongs to a running pollux: never
        // take it over (a stale file, with nobody listening, is replaced).
        if !successor && std::os::unix::net::UnixStream::connect(socket).is_ok() {
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
                let err = |reason: String| BindError::Tcp {
                    addr: addr.to_string(),
                    reason,
                };
                let a: std::net::SocketAddr = addr
                    .parse()
                    .map_err(|_| err("not an address:port".into()))?;
                if !a.ip().is_loopback() {
                    return Err(err("must be a loopback address".into()));
                }
                let mut tries = if successor { 200 } else { 1 };
                let l = loop {
                    match std::net::TcpListener::bind(a) {
                        Ok(l) => break l,
                        Err(e) if tries > 1 && e.kind() == std::io::ErrorKind::AddrInUse => {
                            tries -= 1;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(err(e.to_string())),
                    }
                };
                Some(tiny_http::Server::from_listener(l, None).map_err(|e| err(e.to_string()))?)
            }
        };
        Ok(Server {
            unix,
            tcp,
            token,
            metrics_open: cfg.metrics_without_token,
            refused: std::cell::Cell::new(0),
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
            let tcp = req.remote_addr().is_some();
            // The path as `route` reads it: its non-empty segments, without
            // the query (`//v1/takeover` is `/v1/takeover`).
            let path = req.url().split('?').next().unwrap_or("").to_string();
            let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            // A takeover hands over the port sockets: asked only on the
            // unix socket (mode 0600), never over TCP.
            let over_tcp = tcp && segs.starts_with(&["v1", "takeover"]);
            // Over TCP, anything but an open metrics scrape needs the token
            // (no token configured: nothing is admitted).
            let refused = tcp
                && !(self.metrics_open
                    && req.method() == &tiny_http::Method::Get
                    && segs == ["metrics"])
                && !self.token.as_ref().is_some_and(|t| {
                    t.admits(
                        req.headers()
                            .iter()
                            .find(|h| h.field.equiv("Authorization"))
                            .map(|h| h.value.as_str()),
                    )
                });
            let resp = match std::io::Read::read_to_string(req.as_reader(), &mut body) {
                // (The body is read, and dropped, so the client sees the
                // answer rather than a reset.)
                _ if refused => (
                    401,
                    json!({"error": "a request over TCP needs the control token (Authorization: Bearer TOKEN)"})
                        .to_string(),
                    "application/json",
                ),
                Ok(_) if over_tcp => (
                    403,
                    json!({"error": "a takeover is asked on the control socket, not over TCP"})
                        .to_string(),
                    "application/json",
                ),
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
            // A change through the API: one event, with the generation it
            // published (nothing is logged for reads, or per packet).
            // (The path is logged without its query, which could carry a
            // token in RFC 6750's `access_token=` form.)
            let method = req.method().to_string().to_uppercase();
            if method != "GET" && (200..300).contains(&status) {
                tracing::info!(
                    method = %method,
                    path = %path,
                    status,
                    generation = state.generation(),
                    over_tcp = tcp,
                    "api change"
                );
            } else if status == 401 {
                // Any local user can send these: logged at the 1st, 2nd,
                // 4th, 8th ... refusal, with the count.
                let n = self.refused.get() + 1;
                self.refused.set(n);
                if n.is_power_of_two() {
                    tracing::warn!(method = %method, path = %path, refused = n, "api requests over TCP without the token refused");
                }
            }
            let mut r = tiny_http::Response::from_string(text).with_status_code(status);
            if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()) {
                r = r.with_header(h);
            }
            if status == 401
                && let Ok(h) = tiny_http::Header::from_bytes(
                    &b"WWW-Authenticate"[..],
                    &b"Bearer realm=\"pollux\""[..],
                )
            {
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

impl Server {
    /// Stops serving, leaving the socket file for the successor that
    /// takes it over (a hitless upgrade).
    pub fn release(mut self) {
        let path = std::mem::take(&mut self.path);
        drop(self);
        // tiny_http wakes its accept thread (to see it must stop) by
        // connecting to the name it bound, which was renamed into place:
        // connect to that place instead, so the listener really closes.
        let _ = std::os::unix::net::UnixStream::connect(&path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
