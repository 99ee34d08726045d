//! `pollux ctl`: calls the control API of a running pollux and prints
//! readable tables (or the JSON it got, with `--json`).

use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Where the API is.
#[derive(Debug, Clone)]
pub enum Endpoint<'a> {
    /// The unix socket.
    Unix(&'a Path),
    /// A loopback `address:port`.
    Tcp(&'a str),
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn call(
    ep: &Endpoint<'_>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: pollux\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.map_or(0, str::len),
        body.unwrap_or("")
    );
    let mut raw = Vec::new();
    let timeout = Some(Duration::from_secs(10));
    match ep {
        Endpoint::Unix(p) => {
            let mut s = std::os::unix::net::UnixStream::connect(p)
                .map_err(|e| format!("control socket {}: {e}", p.display()))?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
            s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        }
        Endpoint::Tcp(a) => {
            let mut s = std::net::TcpStream::connect(a).map_err(|e| format!("control {a}: {e}"))?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
            s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "malformed HTTP response".to_string())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line: {head:?}"))?;
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
fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| "malformed chunked body".to_string())?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("malformed chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| "truncated chunked body".to_string())?;
        out.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| "malformed chunked body".to_string())?;
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
    /// List (or delete) flows matching `key=value` filters.
    Flows(Vec<(String, String)>, bool),
    /// Counters.
    Counters,
    /// The metrics text.
    Metrics,
    /// Replace the whole configuration from a TOML file.
    Reload(String),
}

fn read_input(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))
    }
}

fn get_json(ep: &Endpoint<'_>, path: &str) -> Result<Value, String> {
    let (status, body) = call(ep, "GET", path, None)?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{path}: not JSON ({e})"))?;
    if status >= 400 {
        return Err(error_text(&v));
    }
    Ok(v)
}

fn error_text(v: &Value) -> String {
    let problems: Vec<String> = v["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if problems.len() > 1 {
        problems.join("\n")
    } else {
        v["error"].as_str().unwrap_or("error").to_string()
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs `cmd`; returns the lines to print, or the error (exit 2).
pub fn run(ep: &Endpoint<'_>, cmd: &Cmd, json: bool) -> Result<Vec<String>, String> {
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
            let vip = get_json(ep, &format!("/v1/vips/{v}"))?;
            let backends = vip["vip"]["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut found = backends
                .into_iter()
                .find(|x| {
                    let port = x["port"].as_u64().unwrap_or(0);
                    [&x["vm"], &x["ip"]].iter().any(|k| {
                        k.as_str()
                            .is_some_and(|k| *b == k || *b == format!("{k}:{port}"))
                    })
                })
                .ok_or_else(|| format!("vip {v:?} has no backend {b:?}"))?;
            found["weight"] = Value::from(*w);
            (
                "PUT",
                format!("/v1/vips/{v}/backends/{b}"),
                Some(found.to_string()),
            )
        }
        Cmd::Probes => ("GET", "/v1/probes".into(), None),
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
        Cmd::Reload(f) => {
            let text = read_input(f)?;
            let cfg = crate::config::Config::parse(&text)?;
            let body = serde_json::to_string(&cfg).map_err(|e| e.to_string())?;
            ("PUT", "/v1/config".into(), Some(body))
        }
    };
    let (status, text) = call(ep, method, &path, body.as_deref())?;
    if matches!(cmd, Cmd::Metrics) {
        return if status == 200 {
            Ok(text.lines().map(String::from).collect())
        } else {
            Err(format!("HTTP {status}"))
        };
    }
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{path}: not JSON ({e}): {text}"))?;
    if status >= 400 {
        return Err(error_text(&v));
    }
    if json {
        return Ok(vec![serde_json::to_string_pretty(&v).unwrap_or_default()]);
    }
    Ok(table(cmd, &v))
}

fn table(cmd: &Cmd, v: &Value) -> Vec<String> {
    let generation = format!("generation {}", s(&v["generation"]));
    let mut out = Vec::new();
    match cmd {
        Cmd::Status => {
            out.push(generation);
            for k in ["ports", "workers", "vnets", "vms", "nsgs", "vips"] {
                out.push(format!("{k:<8} {}", s(&v[k])));
            }
        }
        Cmd::Get(kind, None) => {
            let items = v[kind.as_str()].as_array().cloned().unwrap_or_default();
            for i in items {
                let detail = match kind.as_str() {
                    "vnets" => format!("{} gateway {}", s(&i["prefixes"]), s(&i["gateway_mac"])),
                    "vms" => format!(
                        "port {} vnet {} mac {} ips {} nsg {}",
                        s(&i["port"]),
                        s(&i["vnet"]),
                        s(&i["mac"]),
                        s(&i["ips"]),
                        s(&i["nsg"])
                    ),
                    "nsgs" => format!("{} rules", i["rule"].as_array().map_or(0, Vec::len)),
                    "vips" => format!(
                        "{} {}:{} vnet {} backends {}",
                        s(&i["protocol"]),
                        s(&i["address"]),
                        s(&i["port"]),
                        s(&i["vnet"]),
                        i["backends"].as_array().map_or(String::new(), |b| b
                            .iter()
                            .map(|b| format!(
                                "{}:{}{}",
                                s(if b["vm"].is_null() {
                                    &b["ip"]
                                } else {
                                    &b["vm"]
                                }),
                                s(&b["port"]),
                                b["weight"]
                                    .as_u64()
                                    .map_or(String::new(), |w| format!(" w{w}"))
                            ))
                            .collect::<Vec<_>>()
                            .join(", "))
                    ),
                    _ => String::new(),
                };
                out.push(format!("{:<16} {detail}", s(&i["name"])));
            }
            out.push(generation);
        }
        Cmd::Get(_, Some(_)) => {
            out.push(serde_json::to_string_pretty(v).unwrap_or_default());
        }
        Cmd::Probes => {
            out.push(format!(
                "{:<16} {:<22} {:<5} {:>7} {:>9}  reason",
                "vip", "backend", "state", "probes", "rtt ms"
            ));
            for p in v["probes"].as_array().cloned().unwrap_or_default() {
                out.push(format!(
                    "{:<16} {:<22} {:<5} {:>7} {:>9}  {}",
                    s(&p["vip"]),
                    s(&p["backend"]),
                    if p["up"].as_bool() == Some(true) {
                        "up"
                    } else {
                        "down"
                    },
                    s(&p["probes"]),
                    p["rtt_ms"]
                        .as_f64()
                        .map_or("-".into(), |r| format!("{r:.3}")),
                    s(&p["reason"])
                ));
            }
        }
        Cmd::Flows(_, false) => {
            out.push(format!(
                "{:<3} {:<10} {:<40} {:<10} {:<22} {:>10} {:>12}",
                "w", "in", "flow", "out", "nat", "packets", "bytes"
            ));
            for f in v["flows"].as_array().cloned().unwrap_or_default() {
                let nat = match (&f["nat_src"], &f["nat_dst"]) {
                    (Value::Null, Value::Null) => "-".to_string(),
                    (a, Value::Null) => format!("src {}", s(a)),
                    (Value::Null, b) => format!("dst {}", s(b)),
                    (a, b) => format!("src {} dst {}", s(a), s(b)),
                };
                out.push(format!(
                    "{:<3} {:<10} {:<40} {:<10} {:<22} {:>10} {:>12}",
                    s(&f["worker"]),
                    s(&f["in_port"]),
                    format!(
                        "{} {}:{} > {}:{}",
                        s(&f["proto"]),
                        s(&f["src"]),
                        s(&f["sport"]),
                        s(&f["dst"]),
                        s(&f["dport"])
                    ),
                    s(&f["out_port"]),
                    nat,
                    s(&f["packets"]),
                    s(&f["bytes"])
                ));
            }
            out.push(format!(
                "{} matched, {} in the tables; {generation}",
                s(&v["matched"]),
                s(&v["occupancy"])
            ));
        }
        Cmd::Flows(_, true) => {
            out.push(format!("{} flows deleted; {generation}", s(&v["deleted"])))
        }
        Cmd::Counters => {
            out.push(format!(
                "{:<12} {:>12} {:>14} {:>12} {:>14}  drops",
                "port", "rx pkts", "rx bytes", "tx pkts", "tx bytes"
            ));
            for p in v["ports"].as_array().cloned().unwrap_or_default() {
                out.push(format!(
                    "{:<12} {:>12} {:>14} {:>12} {:>14}  {}",
                    s(&p["name"]),
                    s(&p["rx_packets"]),
                    s(&p["rx_bytes"]),
                    s(&p["tx_packets"]),
                    s(&p["tx_bytes"]),
                    s(&p["drops"])
                ));
            }
            out.push(format!(
                "{:<7} {:>12} {:>12} {:>12} {:>12} {:>12}  drops",
                "worker", "busy polls", "idle polls", "rx", "fast path", "slow path"
            ));
            for w in v["workers"].as_array().cloned().unwrap_or_default() {
                out.push(format!(
                    "{:<7} {:>12} {:>12} {:>12} {:>12} {:>12}  {}",
                    s(&w["worker"]),
                    s(&w["busy_polls"]),
                    s(&w["idle_polls"]),
                    s(&w["rx_packets"]),
                    s(&w["fast_path"]),
                    s(&w["slow_path"]),
                    s(&w["drops"])
                ));
            }
            for b in v["backends"].as_array().cloned().unwrap_or_default() {
                out.push(format!(
                    "vip {} backend {} (weight {}): {} connections, {} active",
                    s(&b["vip"]),
                    s(&b["backend"]),
                    s(&b["weight"]),
                    s(&b["new_connections"]),
                    s(&b["active_connections"])
                ));
            }
            for r in v["rules"].as_array().cloned().unwrap_or_default() {
                if r["hits"].as_u64().unwrap_or(0) > 0 {
                    out.push(format!(
                        "nsg {} {} rule {} (priority {}, {}): {} hits",
                        s(&r["nsg"]),
                        s(&r["direction"]),
                        s(&r["rule"]),
                        s(&r["priority"]),
                        s(&r["action"]),
                        s(&r["hits"])
                    ));
                }
            }
            out.push(generation);
        }
        _ => out.push(format!("applied: {generation}")),
    }
    out
}

#[cfg(test)]
mod tests {
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
