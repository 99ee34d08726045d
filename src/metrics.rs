//! `GET /metrics`: the counters in the Prometheus/OpenMetrics text format,
//! encoded by the `prometheus-client` crate from a registry built per scrape
//! (the values live in the workers' atomics; nothing is kept here).

use crate::control::state::{ControlState, Runtime, rule_hits};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A counter family registered under `name` (`_total` is appended).
fn counters(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauges(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics text.
pub fn render(state: &ControlState, rt: &Runtime, backends: &[serde_json::Value]) -> String {
    let mut reg = Registry::default();
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rx = counters(
        &mut reg,
        "pollux_port_rx_packets",
        "Packets received per port",
    );
    let rxb = counters(&mut reg, "pollux_port_rx_bytes", "Bytes received per port");
    let tx = counters(&mut reg, "pollux_port_tx_packets", "Packets sent per port");
    let txb = counters(&mut reg, "pollux_port_tx_bytes", "Bytes sent per port");
    let pdrops = counters(
        &mut reg,
        "pollux_port_drops",
        "Packets dropped per port, by reason",
    );
    for (name, ss) in &rt.ports {
        let lb = labels(&[("port", name)]);
        for s in ss {
            let n = s.snapshot();
            rx.get_or_create(&lb).inc_by(n.rx_packets);
            rxb.get_or_create(&lb).inc_by(n.rx_bytes);
            tx.get_or_create(&lb).inc_by(n.tx_packets);
            txb.get_or_create(&lb).inc_by(n.tx_bytes);
            for (r, c) in s.drops.nonzero() {
                pdrops
                    .get_or_create(&labels(&[("port", name), ("reason", r)]))
                    .inc_by(c);
            }
        }
    }
    let drops = counters(
        &mut reg,
        "pollux_drops",
        "Packets dropped by the pipeline, by worker and reason",
    );
    let fast = counters(
        &mut reg,
        "pollux_fast_path_packets",
        "Packets handled by a flow-table hit",
    );
    let slow = counters(
        &mut reg,
        "pollux_slow_path_packets",
        "Packets that went through the slow path",
    );
    let installed = counters(
        &mut reg,
        "pollux_flows_installed",
        "Flows installed (new flows)",
    );
    let flows = gauges(
        &mut reg,
        "pollux_flow_table_entries",
        "Flow-table occupancy per worker",
    );
    let busy = counters(
        &mut reg,
        "pollux_worker_busy_polls",
        "Poll iterations that received packets",
    );
    let idle = counters(
        &mut reg,
        "pollux_worker_idle_polls",
        "Poll iterations that received nothing",
    );
    for (w, (ws, ss)) in rt.workers.iter().zip(&rt.switches).enumerate() {
        let ws_name = w.to_string();
        let lw = labels(&[("worker", &ws_name)]);
        for (r, c) in ws.drops.nonzero().into_iter().chain(ss.nonzero()) {
            drops
                .get_or_create(&labels(&[("worker", &ws_name), ("reason", r)]))
                .inc_by(c);
        }
        fast.get_or_create(&lw).inc_by(l(&ss.fast_path));
        slow.get_or_create(&lw).inc_by(l(&ss.slow_path));
        installed.get_or_create(&lw).inc_by(l(&ss.flows_installed));
        flows.get_or_create(&lw).set(l(&ss.flows) as i64);
        busy.get_or_create(&lw).inc_by(l(&ws.busy_polls));
        idle.get_or_create(&lw).inc_by(l(&ws.idle_polls));
    }
    let up = gauges(
        &mut reg,
        "pollux_backend_up",
        "1 while a probed backend receives new flows",
    );
    let rtt = gauges(
        &mut reg,
        "pollux_backend_probe_rtt_microseconds",
        "Round trip of the last successful probe",
    );
    for p in &rt.probes {
        let lp = labels(&[("vip", &p.vip), ("backend", &p.backend)]);
        up.get_or_create(&lp).set(i64::from(p.up));
        if let Some(ms) = p.rtt_ms {
            rtt.get_or_create(&lp).set((ms * 1000.0) as i64);
        }
    }
    let conns = counters(
        &mut reg,
        "pollux_backend_connections",
        "Connections created to each VIP backend",
    );
    let active = gauges(
        &mut reg,
        "pollux_backend_active_connections",
        "Connections to each VIP backend tracked now",
    );
    for b in backends {
        let s = |k: &str| b.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let n = |k: &str| b.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let lb = labels(&[("vip", &s("vip")), ("backend", &s("backend"))]);
        conns.get_or_create(&lb).inc_by(n("new_connections"));
        active
            .get_or_create(&lb)
            .set(n("active_connections") as i64);
    }
    let hits = counters(
        &mut reg,
        "pollux_rule_hits",
        "Lookups won by each security-group rule",
    );
    for r in rule_hits(&state.policy().load(), &rt.acl_hits) {
        hits.get_or_create(&labels(&[
            ("nsg", &r.nsg),
            ("direction", &r.direction.to_string()),
            ("rule", &r.rule),
        ]))
        .inc_by(r.hits);
    }
    let generation = Gauge::<i64>::default();
    generation.set(state.generation() as i64);
    reg.register(
        "pollux_policy_generation",
        "The published policy generation",
        generation,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}
