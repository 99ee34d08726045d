//! The control API of a `pollux run` under test: end-to-end tests wait on
//! its state (probes, counters) with generous deadlines instead of reading
//! log lines or sleeping a fixed time.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pollux::ctl::{Endpoint, call};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A running pollux's control socket.
pub struct Api {
    /// The unix socket of its `[control]` section.
    pub sock: PathBuf,
}

impl Api {
    /// `GET path`, parsed; `None` until the API answers 200 with JSON.
    pub fn get(&self, path: &str) -> Option<Value> {
        let (code, body) = call(&Endpoint::Unix(&self.sock), "GET", path, None).ok()?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// `pollux ctl args...` on this socket.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_pollux"))
            .arg("ctl")
            .arg("--socket")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap()
    }

    /// `method path` with `body`: (status, body); panics when the API
    /// cannot be reached.
    pub fn send(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        call(&Endpoint::Unix(&self.sock), method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Polls `GET path` every 50 ms until `what` holds on the answer or
    /// `limit` passes; panics then, with the last answer and `context()`.
    pub fn wait_for(
        &self,
        path: &str,
        limit: Duration,
        why: &str,
        mut what: impl FnMut(&Value) -> bool,
        context: impl Fn() -> String,
    ) -> Value {
        let end = Instant::now() + limit;
        let mut last = Value::Null;
        while Instant::now() < end {
            if let Some(v) = self.get(path) {
                if what(&v) {
                    return v;
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{why}: not so within {limit:?}; last GET {path}: {last}\n{}",
            context()
        );
    }

    /// Waits until the API answers: the ports are open and the workers
    /// started (the control loop serves only after both).
    pub fn wait_ready(&self, limit: Duration, context: impl Fn() -> String) {
        self.wait_for("/v1/status", limit, "pollux ready", |_| true, context);
    }

    /// Waits until every backend in `backends` ("ip:port") has probe state
    /// `up`; health changes are published before the API shows them, so
    /// new connections already see it.
    pub fn wait_probes(
        &self,
        backends: &[&str],
        up: bool,
        limit: Duration,
        context: impl Fn() -> String,
    ) {
        let why = format!("backends {backends:?} {}", if up { "up" } else { "down" });
        self.wait_for(
            "/v1/probes",
            limit,
            &why,
            |v| {
                backends.iter().all(|b| {
                    probes(v)
                        .iter()
                        .any(|(name, is_up)| name == b && *is_up == Some(up))
                })
            },
            context,
        );
    }
}

/// (backend "ip:port", up) of every probe in a `/v1/probes` answer (`up`
/// `None` if the answer lacks it).
pub fn probes(v: &Value) -> Vec<(String, Option<bool>)> {
    v["probes"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|p| {
                    (
                        p["backend"].as_str().unwrap_or_default().to_string(),
                        p["up"].as_bool(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Counter `field` (`rx_packets`, `tx_packets`) of port `name` in a
/// `/v1/counters` answer; 0 if absent.
pub fn port(v: &Value, name: &str, field: &str) -> u64 {
    v["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == name))
        .and_then(|p| p[field].as_u64())
        .unwrap_or(0)
}

/// Counter `field` of worker `w` in a `/v1/counters` answer; 0 if absent.
pub fn worker(v: &Value, w: usize, field: &str) -> u64 {
    v["workers"][w][field].as_u64().unwrap_or(0)
}

/// The sum over the workers of `/v1/counters` (`c`) of what `f` reads of
/// each (0 where it reads nothing).
pub fn worker_sum(c: &Value, f: impl Fn(&Value) -> Option<u64>) -> u64 {
    c["workers"]
        .as_array()
        .map_or(0, |ws| ws.iter().map(|w| f(w).unwrap_or(0)).sum())
}
