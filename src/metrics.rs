//! `GET /metrics`: the counters in the Prometheus/OpenMetrics text format,
//! encoded by the `prometheus-client` crate from a registry built per scrape
//! (from the same typed counters `GET /v1/counters` returns; nothing is
//! kept here).

use crate::api::{Counters, ProbeState};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// The metrics text of `c` (what `GET /v1/counters` shows), the probe
/// states and the published generation.
pub fn render(
    c: &Counters,
    probes: &[ProbeState],
    tables: &[crate::api::VipTableView],
    bgp: Option<&crate::api::BgpView>,
    ipfix: &crate::api::IpfixView,
    generation: u64,
) -> String {
    let mut reg = Registry::default();
    if ipfix.ipfix.is_some() || ipfix.records_queued > 0 {
        let records = counters(
            &mut reg,
            "pollux_ipfix_records",
            "Flow-log records: queued by the workers, lost (a full queue, or turned off unsent), denied packets suppressed over the rate, unsent (the socket refused), sent to the IPFIX collector",
        );
        for (state, n) in [
            ("queued", ipfix.records_queued),
            ("lost", ipfix.records_lost),
            ("suppressed", ipfix.records_suppressed),
            ("unsent", ipfix.records_unsent),
            ("sent", ipfix.records_sent),
        ] {
            records
                .get_or_create(&labels(&[("state", state)]))
                .inc_by(n);
        }
        let errors: Counter = Counter::default();
        errors.inc_by(ipfix.send_errors);
        reg.register(
            "pollux_ipfix_send_errors",
            "IPFIX messages the socket refused or timed out on (their records, and the rest of that turn's, counted unsent)",
            errors,
        );
    }
    if let Some(b) = bgp {
        let up = gauges(
            &mut reg,
            "pollux_bgp_session_up",
            "1 while the BGP session with a neighbour is established",
        );
        for s in &b.sessions {
            up.get_or_create(&labels(&[
                ("neighbor", &s.neighbor),
                ("remote_as", &s.remote_as.to_string()),
            ]))
            .set(i64::from(s.up));
        }
        let ann = gauges(
            &mut reg,
            "pollux_bgp_announced",
            "1 while a Mux VIP's prefix is announced, 0 while withdrawn",
        );
        for a in &b.announced {
            ann.get_or_create(&labels(&[("prefix", a)])).set(1);
        }
        for w in &b.withdrawn {
            ann.get_or_create(&labels(&[("prefix", &format!("{}/32", w.address))]))
                .set(0);
        }
        let running: Gauge = Gauge::default();
        running.set(i64::from(b.pid.is_some()));
        reg.register(
            "pollux_bgp_speaker_running",
            "1 while BIRD runs beside pollux",
            running,
        );
        let draining: Gauge = Gauge::default();
        draining.set(i64::from(b.draining));
        reg.register(
            "pollux_bgp_draining",
            "1 while the Mux is drained (every VIP withdrawn)",
            draining,
        );
        let starts: Counter = Counter::default();
        starts.inc_by(b.starts);
        reg.register(
            "pollux_bgp_speaker_starts",
            "Times BIRD was started",
            starts,
        );
    }
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
    let link = gauges(
        &mut reg,
        "pollux_port_link_up",
        "1 while the port's link is up (drivers that report it: DPDK)",
    );
    let link_changes = counters(
        &mut reg,
        "pollux_port_link_changes",
        "Link changes since the port opened",
    );
    let queue = counters(
        &mut reg,
        "pollux_port_queue_packets",
        "Packets per queue of ports with several (queue N is worker N's), by direction",
    );
    for p in &c.ports {
        let lp = labels(&[("port", &p.name)]);
        if let Some(l) = &p.link {
            link.get_or_create(&lp).set(i64::from(l == "up"));
        }
        if let Some(n) = p.link_changes {
            link_changes.get_or_create(&lp).inc_by(n);
        }
        for q in &p.queues {
            let qs = q.queue.to_string();
            for (dir, n) in [("rx", q.rx_packets), ("tx", q.tx_packets)] {
                queue
                    .get_or_create(&labels(&[
                        ("port", &p.name),
                        ("queue", &qs),
                        ("direction", dir),
                    ]))
                    .inc_by(n);
            }
        }
        rx.get_or_create(&lp).inc_by(p.rx_packets);
        rxb.get_or_create(&lp).inc_by(p.rx_bytes);
        tx.get_or_create(&lp).inc_by(p.tx_packets);
        txb.get_or_create(&lp).inc_by(p.tx_bytes);
        for (r, n) in &p.drops {
            pdrops
                .get_or_create(&labels(&[("port", &p.name), ("reason", r)]))
                .inc_by(*n);
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
    let icmp_sent = counters(
        &mut reg,
        "pollux_icmp_errors_sent",
        "ICMP errors the switch made (time exceeded, fragmentation needed)",
    );
    let icmp_related = counters(
        &mut reg,
        "pollux_icmp_errors_related",
        "ICMP errors about tracked connections passed on, translated",
    );
    let conns = gauges(
        &mut reg,
        "pollux_connections",
        "Connections tracked per worker",
    );
    let evicted = counters(
        &mut reg,
        "pollux_connections_evicted_embryonic",
        "Embryonic connections evicted to make room (full table or VIP limit)",
    );
    let untracked = counters(
        &mut reg,
        "pollux_connections_untracked",
        "Connections admitted untracked because the table was full",
    );
    let frags = counters(
        &mut reg,
        "pollux_fragments",
        "IP fragments: first ones remembered (noted), later ones that followed them (followed), later ones that came before their first and waited for it (held)",
    );
    let synproxy = counters(
        &mut reg,
        "pollux_syn_proxy",
        "SYN proxy: SYNs answered with a cookie (cookies_sent), connections opened by a cookie's ACK (connections)",
    );
    let hairpinned = counters(
        &mut reg,
        "pollux_hairpinned_packets",
        "Packets sent to a public address of the switch and put back through it as from the wire",
    );
    let snat_inbound = counters(
        &mut reg,
        "pollux_snat_inbound_connections",
        "Connections SNAT mappings let in from the wire (endpoint-independent or address-dependent filtering)",
    );
    let frags_waiting = gauges(
        &mut reg,
        "pollux_fragments_waiting",
        "Later IP fragments held now for their first fragment",
    );
    let snat_ports = gauges(
        &mut reg,
        "pollux_snat_ports_in_use",
        "SNAT public ports held per worker (each protocol's counted apart); exhaustion is pollux_drops{reason=\"snat_port_exhausted\"}",
    );
    let tunnel = counters(
        &mut reg,
        "pollux_tunnel_packets",
        "Overlay packets: sent to other hosts in a tunnel (direction tx), taken in from them (rx)",
    );
    let mux = counters(
        &mut reg,
        "pollux_mux_packets",
        "Load balancer Mux traffic: packets a Mux sent to DIPs in IP in IP (direction tx), packets from Muxes a DSR host took in (rx)",
    );
    let arp_requests = counters(
        &mut reg,
        "pollux_arp_requests",
        "ARP requests sent on the uplink, resolving and confirming the underlay's next hops",
    );
    let busy = counters(
        &mut reg,
        "pollux_worker_busy_polls",
        "Poll iterations that received packets",
    );
    let ticks = counters(
        &mut reg,
        "pollux_worker_ticks",
        "Clock ticks (TSC cycles) of each worker: busy and idle polls; of busy ones, io (receiving, sending, the loop) and pipeline, of which slow_path",
    );
    let bursts = counters(
        &mut reg,
        "pollux_worker_rx_bursts",
        "Receive bursts by their size in packets",
    );
    let idle = counters(
        &mut reg,
        "pollux_worker_idle_polls",
        "Poll iterations that received nothing",
    );
    let sleeps = counters(
        &mut reg,
        "pollux_worker_idle_sleeps",
        "Sleeps after a run of empty polls ([dataplane] idle_sleep_us)",
    );
    for w in &c.workers {
        let name = w.worker.to_string();
        let lw = labels(&[("worker", &name)]);
        for (r, n) in &w.drops {
            drops
                .get_or_create(&labels(&[("worker", &name), ("reason", r)]))
                .inc_by(*n);
        }
        fast.get_or_create(&lw).inc_by(w.fast_path);
        slow.get_or_create(&lw).inc_by(w.slow_path);
        installed.get_or_create(&lw).inc_by(w.flows_installed);
        flows.get_or_create(&lw).set(w.flow_table_entries as i64);
        icmp_sent.get_or_create(&lw).inc_by(w.icmp_errors);
        icmp_related.get_or_create(&lw).inc_by(w.icmp_related);
        conns.get_or_create(&lw).set(w.connections as i64);
        evicted.get_or_create(&lw).inc_by(w.conns_evicted_embryonic);
        untracked.get_or_create(&lw).inc_by(w.conns_untracked);
        for (kind, n) in [
            ("cookies_sent", w.syn_cookies_sent),
            ("connections", w.syn_proxied),
        ] {
            synproxy
                .get_or_create(&labels(&[("worker", &name), ("kind", kind)]))
                .inc_by(n);
        }
        for (kind, n) in [
            ("noted", w.frags_noted),
            ("followed", w.frags_followed),
            ("held", w.frags_held),
        ] {
            frags
                .get_or_create(&labels(&[("worker", &name), ("kind", kind)]))
                .inc_by(n);
        }
        hairpinned.get_or_create(&lw).inc_by(w.hairpinned);
        for (dir, n) in [("tx", w.tunnel_tx), ("rx", w.tunnel_rx)] {
            tunnel
                .get_or_create(&labels(&[("worker", &name), ("direction", dir)]))
                .inc_by(n);
        }
        for (dir, n) in [("tx", w.mux_tx), ("rx", w.dsr_rx)] {
            mux.get_or_create(&labels(&[("worker", &name), ("direction", dir)]))
                .inc_by(n);
        }
        arp_requests.get_or_create(&lw).inc_by(w.arp_requests);
        snat_inbound.get_or_create(&lw).inc_by(w.snat_inbound);
        snat_ports
            .get_or_create(&lw)
            .set(w.snat_ports_in_use as i64);
        frags_waiting.get_or_create(&lw).set(w.frags_waiting as i64);
        busy.get_or_create(&lw).inc_by(w.busy_polls);
        idle.get_or_create(&lw).inc_by(w.idle_polls);
        sleeps.get_or_create(&lw).inc_by(w.idle_sleeps);
        // Each counted apart, so each only grows: busy = io + pipeline;
        // slow_path is part of pipeline (the rest is the fast path).
        for (kind, n) in [
            ("busy", w.busy_ticks),
            ("idle", w.idle_ticks),
            ("io", w.io_ticks),
            ("pipeline", w.pipeline_ticks),
            ("slow_path", w.slow_path_ticks),
        ] {
            ticks
                .get_or_create(&labels(&[("worker", &name), ("kind", kind)]))
                .inc_by(n);
        }
        for (i, n) in w.rx_bursts.iter().enumerate() {
            if *n > 0 {
                bursts
                    .get_or_create(&labels(&[
                        ("worker", &name),
                        ("size", &(i + 1).to_string()),
                    ]))
                    .inc_by(*n);
            }
        }
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
    let digest = gauges(
        &mut reg,
        "pollux_vip_table_digest",
        "Digest of each VIP's Maglev table (32 bits): equal on every pollux that picks the same backend for every flow",
    );
    for t in tables {
        let d = i64::from_str_radix(&t.digest, 16).unwrap_or(0);
        digest
            .get_or_create(&labels(&[("vip", &t.vip), ("vnet", &t.vnet)]))
            .set(d);
    }
    for p in probes {
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
    for b in &c.backends {
        let lb = labels(&[("vip", &b.vip), ("backend", &b.backend)]);
        conns.get_or_create(&lb).inc_by(b.new_connections);
        active.get_or_create(&lb).set(b.active_connections as i64);
    }
    let hits = counters(
        &mut reg,
        "pollux_rule_hits",
        "Lookups won by each security-group rule",
    );
    for r in &c.rules {
        hits.get_or_create(&labels(&[
            ("nsg", &r.nsg),
            ("direction", &r.direction),
            ("rule", &r.rule),
        ]))
        .inc_by(r.hits);
    }
    let g = Gauge::<i64>::default();
    g.set(generation as i64);
    reg.register(
        "pollux_policy_generation",
        "The published policy generation",
        g,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PortCounters, WorkerCounters};

    #[test]
    fn the_counters_of_the_api_are_the_metrics() {
        let c = Counters {
            ports: vec![PortCounters {
                name: "web1".into(),
                rx_packets: 5,
                drops: [("rx_oversize".to_string(), 2)].into(),
                ..PortCounters::default()
            }],
            workers: vec![WorkerCounters {
                worker: 0,
                fast_path: 40,
                flow_table_entries: 3,
                busy_ticks: 1000,
                idle_ticks: 50,
                io_ticks: 300,
                pipeline_ticks: 700,
                slow_path_ticks: 200,
                rx_bursts: [vec![0; 31], vec![4]].concat(),
                ..WorkerCounters::default()
            }],
            ..Counters::default()
        };
        let tables = [crate::api::VipTableView {
            vip: "web".into(),
            vnet: "lb".into(),
            mode: "mux".into(),
            frontend: "192.0.2.10:80/tcp".into(),
            table_size: 65537,
            backends: 4,
            in_table: 4,
            epoch: 0,
            digest: "8a0f1c2e".into(),
            slots: None,
        }];
        let bgp = crate::api::BgpView {
            pid: Some(7),
            starts: 1,
            local_as: 65010,
            next_hop: "10.200.0.1".into(),
            draining: false,
            announced: vec!["192.0.2.10/32".into()],
            withdrawn: vec![crate::api::BgpWithdrawnView {
                vip: "api".into(),
                address: "192.0.2.11".into(),
                reason: "no healthy backend".into(),
            }],
            sessions: vec![crate::api::BgpSessionView {
                neighbor: "10.200.0.254".into(),
                remote_as: 65000,
                protocol: "peer0".into(),
                up: true,
                state: "up".into(),
                info: "Established".into(),
                since: "20:21:28.594".into(),
            }],
            error: None,
        };
        let ipfix = crate::api::IpfixView {
            ipfix: None,
            running: false,
            records_queued: 12,
            records_lost: 2,
            records_suppressed: 3,
            records_unsent: 4,
            records_waiting: 0,
            records_sent: 10,
            messages_sent: 3,
            send_errors: 1,
            last_error: None,
        };
        let text = render(&c, &[], &tables, Some(&bgp), &ipfix, 9);
        for line in [
            "pollux_ipfix_records_total{state=\"queued\"} 12",
            "pollux_ipfix_records_total{state=\"lost\"} 2",
            "pollux_ipfix_records_total{state=\"suppressed\"} 3",
            "pollux_ipfix_records_total{state=\"unsent\"} 4",
            "pollux_ipfix_records_total{state=\"sent\"} 10",
            "pollux_ipfix_send_errors_total 1",
            "pollux_bgp_session_up{neighbor=\"10.200.0.254\",remote_as=\"65000\"} 1",
            "pollux_bgp_announced{prefix=\"192.0.2.10/32\"} 1",
            "pollux_bgp_announced{prefix=\"192.0.2.11/32\"} 0",
            "pollux_bgp_draining 0",
            "pollux_bgp_speaker_running 1",
            "pollux_bgp_speaker_starts_total 1",
            "pollux_vip_table_digest{vip=\"web\",vnet=\"lb\"} 2316246062",
            "pollux_port_rx_packets_total{port=\"web1\"} 5",
            "pollux_port_drops_total{port=\"web1\",reason=\"rx_oversize\"} 2",
            "pollux_fast_path_packets_total{worker=\"0\"} 40",
            "pollux_flow_table_entries{worker=\"0\"} 3",
            "pollux_worker_ticks_total{worker=\"0\",kind=\"busy\"} 1000",
            "pollux_worker_ticks_total{worker=\"0\",kind=\"idle\"} 50",
            "pollux_worker_ticks_total{worker=\"0\",kind=\"io\"} 300",
            "pollux_worker_ticks_total{worker=\"0\",kind=\"pipeline\"} 700",
            "pollux_worker_ticks_total{worker=\"0\",kind=\"slow_path\"} 200",
            "pollux_worker_rx_bursts_total{worker=\"0\",size=\"32\"} 4",
            "pollux_policy_generation 9",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
