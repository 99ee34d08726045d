//! The control API's bodies as types: what the server ([`crate::control`])
//! sends, what `pollux ctl` ([`crate::ctl`]) reads, and what the metrics
//! ([`crate::metrics`]) and the stop report ([`crate::run::RunReport`]) are
//! made of. One definition each, so the three cannot drift apart.
//!
//! Every JSON body of the API is one of these with the published
//! `generation` added at the top level.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A refused request: `{"error", "problems"}` with a 4xx/5xx status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line naming what is wrong.
    pub error: String,
    /// Every validation problem, one per line (422).
    #[serde(default)]
    pub problems: Vec<String>,
}

impl ErrorBody {
    /// The text to show: every problem when there are several, else the
    /// error.
    pub fn text(&self) -> String {
        if self.problems.len() > 1 {
            self.problems.join("\n")
        } else {
            self.error.clone()
        }
    }
}

/// A change applied: the generation it published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The new policy generation.
    pub applied: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Configured ports.
    pub ports: usize,
    /// Worker threads.
    pub workers: usize,
    /// Vnets.
    pub vnets: usize,
    /// VMs.
    pub vms: usize,
    /// Security groups.
    pub nsgs: usize,
    /// VIPs.
    pub vips: usize,
    /// Reloads of the configuration file (SIGHUP).
    pub reloads: Reloads,
    /// The running pollux's version.
    #[serde(default)]
    pub version: String,
    /// Its process id.
    #[serde(default)]
    pub pid: u32,
    /// The takeover this process made from its predecessor, if it took
    /// over (`pollux run --takeover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<crate::takeover::Takeover>,
    /// Why the last attempt to hand over to a successor failed (this
    /// process went on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover_failed: Option<String>,
    /// The DPDK devices under the ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
    /// The BGP speaker, with `[bgp]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpView>,
}

/// A DPDK device under a port, as its driver describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The port.
    pub port: String,
    /// The DPDK driver (`net_e1000_igb_vf`, `net_vhost`, ...).
    pub driver: String,
    /// The device: a PCI address, or a vdev's name.
    pub device: String,
    /// Queue pairs in use (one per worker).
    pub queues: u16,
    /// Receive queues the device has.
    pub max_rx_queues: u16,
    /// Transmit queues the device has.
    pub max_tx_queues: u16,
    /// `up` or `down`, where the driver reports its link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// The link's speed in Mbit/s, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mbps: Option<u32>,
}

/// What SIGHUP reloads did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloads {
    /// Reloads published.
    pub applied: u64,
    /// Reloads refused (the file unreadable or invalid); nothing changed.
    pub refused: u64,
    /// Why the last refused reload was refused.
    pub last_error: Option<String>,
}

/// One probed backend's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeState {
    /// VIP name.
    pub vip: String,
    /// Backend address:port.
    pub backend: String,
    /// Receives new flows.
    pub up: bool,
    /// Probes completed.
    pub probes: u64,
    /// Why it is up or down.
    pub reason: String,
    /// Last successful probe's round trip, milliseconds.
    pub rtt_ms: Option<f64>,
}

/// `GET /v1/probes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probes {
    /// Every probed backend.
    pub probes: Vec<ProbeState>,
}

/// `GET /v1/underlay`: the uplink as a host on its network, its
/// neighbours, and the tunnels to remote endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UnderlayView {
    /// The uplink's address (`None`: it has none; no tunnels).
    pub address: Option<String>,
    /// Static routes (prefix, next hop).
    pub routes: Vec<(String, String)>,
    /// The ARP cache.
    pub neighbours: Vec<NeighbourView>,
    /// One tunnel per remote endpoint.
    pub tunnels: Vec<TunnelView>,
}

/// One entry of the underlay's ARP cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourView {
    /// Its address.
    pub ip: String,
    /// Its MAC, once resolved.
    pub mac: Option<String>,
    /// `incomplete`, `reachable`, `stale` (being confirmed) or `failed`.
    pub state: String,
    /// Seconds since it last answered (`None`: never).
    pub confirmed_ago_s: Option<f64>,
}

/// `GET` / `PUT /v1/routes`: the uplink's default gateway and static routes
/// (`PUT` replaces both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    /// The default route's next hop.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Static routes.
    #[serde(default)]
    pub routes: Vec<crate::config::RouteCfg>,
}

/// `GET /v1/maglev`: each VIP's Maglev table as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MaglevView {
    /// One per VIP.
    pub vips: Vec<VipTableView>,
}

/// One VIP's Maglev table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipTableView {
    /// The VIP.
    pub vip: String,
    /// Its vnet.
    pub vnet: String,
    /// `local`, `mux` or `dsr`.
    pub mode: String,
    /// Address, port and protocol.
    pub frontend: String,
    /// Slots.
    pub table_size: usize,
    /// Backends configured.
    pub backends: usize,
    /// Backends holding slots now (healthy, weighted).
    pub in_table: usize,
    /// Its backend set's epoch (one more per health change).
    pub epoch: u32,
    /// The table's digest (8 hex digits): the same on every pollux with
    /// the same backends, weights, health and size, whatever their order.
    pub digest: String,
    /// Each slot's backend (`ip:port`, `-` for none), with `?slots=1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<String>>,
}

/// `GET /v1/bgp`: the BGP speaker beside pollux.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpView {
    /// BIRD's process id while it runs.
    pub pid: Option<u32>,
    /// Times BIRD was started.
    pub starts: u64,
    /// This Mux's AS number.
    pub local_as: u32,
    /// The next hop announced with the VIPs.
    pub next_hop: String,
    /// Every VIP withdrawn by `pollux ctl drain-mux`.
    pub draining: bool,
    /// The prefixes announced now.
    pub announced: Vec<String>,
    /// Mux VIPs not announced, with why.
    pub withdrawn: Vec<BgpWithdrawnView>,
    /// The sessions with the neighbours.
    pub sessions: Vec<BgpSessionView>,
    /// The last problem with BIRD, until it is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A Mux VIP not announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpWithdrawnView {
    /// The VIP.
    pub vip: String,
    /// Its address.
    pub address: String,
    /// `no healthy backend`, `draining` or `stopping`.
    pub reason: String,
}

/// A BGP session, as BIRD reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSessionView {
    /// The neighbour's address.
    pub neighbor: String,
    /// Its AS number.
    pub remote_as: u32,
    /// BIRD's protocol for it.
    pub protocol: String,
    /// Established.
    pub up: bool,
    /// BIRD's protocol state (`up`, `start`, ...).
    pub state: String,
    /// The BGP state and last error (`Established`, `Active Socket:
    /// Connection refused`, ...).
    pub info: String,
    /// Since when (BIRD's clock).
    pub since: String,
}

/// A remote endpoint's tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelView {
    /// The remote endpoint (`[[remote]]`).
    pub remote: String,
    /// Its vnet.
    pub vnet: String,
    /// The vnet's VNI.
    pub vni: u32,
    /// `vxlan` or `geneve`.
    pub encap: String,
    /// The host's underlay address.
    pub host: String,
    /// The next hop towards it (`None`: no route).
    pub next_hop: Option<String>,
    /// The next hop's MAC (`None` while it is being resolved).
    pub next_hop_mac: Option<String>,
}

/// One cached flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// The worker whose table holds it.
    pub worker: usize,
    /// The port it arrives on (name).
    pub in_port: String,
    /// Source address, as received.
    pub src: String,
    /// Destination address, as received.
    pub dst: String,
    /// IP protocol number.
    pub proto: u8,
    /// Source port (or ICMP echo id).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// The port it leaves by (name).
    pub out_port: String,
    /// Source rewrite, `address:port`.
    pub nat_src: Option<String>,
    /// Destination rewrite, `address:port`.
    pub nat_dst: Option<String>,
    /// Packets so far.
    pub packets: u64,
    /// IP bytes so far (no link-layer header).
    pub bytes: u64,
    /// The policy generation that decided it.
    pub generation: u64,
    /// FIN or RST seen.
    pub closing: bool,
    /// The state of its tracked connection (`syn_sent`, `syn_received`,
    /// `established`, `fin_wait`, `time_wait`, `closed`; `udp`,
    /// `udp_replied`; `other`), or none when nothing tracks it.
    #[serde(default)]
    pub connection: Option<String>,
}

/// `GET /v1/flows`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flows {
    /// Matching flows, up to the limit.
    pub flows: Vec<Flow>,
    /// How many matched.
    pub matched: usize,
    /// Flows in all tables.
    pub occupancy: usize,
}

/// `DELETE /v1/flows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsDeleted {
    /// How many were removed.
    pub deleted: usize,
    /// Flows left in all tables.
    pub occupancy: usize,
}

/// One port's counters, summed over its queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Port name.
    pub name: String,
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// `up` or `down`, for drivers that report their link (DPDK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Link changes since the port opened (the first up counts one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_changes: Option<u64>,
    /// The link's speed in Mbit/s, where the driver says (DPDK NICs and
    /// VFs; absent while down or unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mbps: Option<u32>,
    /// Per queue, when the port has several (queue N is worker N's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueCounters>,
}

/// One queue of a port (polled by the worker of the same number).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    /// Queue number, which is also its worker's.
    pub queue: usize,
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Drops counted on this queue.
    pub drops: u64,
}

/// One worker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    /// Worker number.
    pub worker: usize,
    /// Polls that received packets.
    pub busy_polls: u64,
    /// Polls that received nothing.
    pub idle_polls: u64,
    /// Sleeps after a run of empty polls (`[dataplane] idle_sleep_us`).
    #[serde(default)]
    pub idle_sleeps: u64,
    /// Clock ticks spent in busy polls.
    pub busy_ticks: u64,
    /// Clock ticks spent in idle polls.
    pub idle_ticks: u64,
    /// Clock ticks of busy polls spent in the pipeline.
    #[serde(default)]
    pub pipeline_ticks: u64,
    /// Clock ticks of busy polls outside it: port I/O (receiving, and
    /// sending at the end of a burst) and the loop.
    #[serde(default)]
    pub io_ticks: u64,
    /// Clock ticks spent deciding slow-path packets and queueing them
    /// for sending (part of `pipeline_ticks`; the rest of it is the fast
    /// path).
    #[serde(default)]
    pub slow_path_ticks: u64,
    /// Receive bursts by size: element `n - 1` counts the bursts of `n`
    /// packets (1 to 32).
    #[serde(default)]
    pub rx_bursts: Vec<u64>,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets handled by a flow-table hit.
    pub fast_path: u64,
    /// Packets decided by the slow path.
    pub slow_path: u64,
    /// Packets handed to the worker that owns their connection.
    pub handed_off: u64,
    /// Flows installed.
    pub flows_installed: u64,
    /// Flows in its table now.
    pub flow_table_entries: u64,
    /// ICMP errors it sent (time exceeded, fragmentation needed).
    #[serde(default)]
    pub icmp_errors: u64,
    /// ICMP errors about tracked connections it passed on, translated.
    #[serde(default)]
    pub icmp_related: u64,
    /// Connections it tracks now (all vnets).
    #[serde(default)]
    pub connections: u64,
    /// Embryonic connections it evicted to make room (a full table or a
    /// VIP at its limit: what a SYN flood costs).
    #[serde(default)]
    pub conns_evicted_embryonic: u64,
    /// Connections it admitted untracked (the table full of live ones).
    #[serde(default)]
    pub conns_untracked: u64,
    /// First fragments it remembered for their later fragments.
    #[serde(default)]
    pub frags_noted: u64,
    /// Later fragments it sent after their first.
    #[serde(default)]
    pub frags_followed: u64,
    /// Later fragments that came before their first and waited for it.
    #[serde(default)]
    pub frags_held: u64,
    /// Later fragments waiting for their first now.
    #[serde(default)]
    pub frags_waiting: u64,
    /// SYNs its SYN proxy answered with a cookie.
    #[serde(default)]
    pub syn_cookies_sent: u64,
    /// Connections it opened on the ACK of a cookie.
    #[serde(default)]
    pub syn_proxied: u64,
    /// Packets it hairpinned (sent to a public address of the switch and
    /// put back through it as from the wire).
    #[serde(default)]
    pub hairpinned: u64,
    /// Connections its SNAT mappings let in from the wire (filtering).
    #[serde(default)]
    pub snat_inbound: u64,
    /// SNAT public ports it holds now.
    #[serde(default)]
    pub snat_ports_in_use: u64,
    /// Packets it sent to other hosts in a tunnel (VXLAN or Geneve).
    #[serde(default)]
    pub tunnel_tx: u64,
    /// Tunnel packets from other hosts it took in.
    #[serde(default)]
    pub tunnel_rx: u64,
    /// ARP requests it sent on the uplink (the underlay resolving its next
    /// hops).
    #[serde(default)]
    pub arp_requests: u64,
    /// Packets it sent, as a Mux, to DIPs in IP in IP.
    #[serde(default)]
    pub mux_tx: u64,
    /// Packets from Muxes (IP in IP) it took in for a DSR VIP's backend.
    #[serde(default)]
    pub dsr_rx: u64,
    /// Drops by reason (pipeline and malformed).
    pub drops: BTreeMap<String, u64>,
}

impl WorkerCounters {
    /// Adds `base`'s counts to these: what a predecessor process had
    /// counted (a hitless upgrade). Gauges (flow table entries,
    /// connections, SNAT ports in use, fragments waiting) are this
    /// process's own.
    pub fn add(&mut self, base: &WorkerCounters) {
        for (c, b) in [
            (&mut self.busy_polls, base.busy_polls),
            (&mut self.idle_polls, base.idle_polls),
            (&mut self.idle_sleeps, base.idle_sleeps),
            (&mut self.busy_ticks, base.busy_ticks),
            (&mut self.pipeline_ticks, base.pipeline_ticks),
            (&mut self.io_ticks, base.io_ticks),
            (&mut self.slow_path_ticks, base.slow_path_ticks),
            (&mut self.idle_ticks, base.idle_ticks),
            (&mut self.rx_packets, base.rx_packets),
            (&mut self.tx_packets, base.tx_packets),
            (&mut self.fast_path, base.fast_path),
            (&mut self.slow_path, base.slow_path),
            (&mut self.handed_off, base.handed_off),
            (&mut self.flows_installed, base.flows_installed),
            (&mut self.icmp_errors, base.icmp_errors),
            (&mut self.icmp_related, base.icmp_related),
            (
                &mut self.conns_evicted_embryonic,
                base.conns_evicted_embryonic,
            ),
            (&mut self.conns_untracked, base.conns_untracked),
            (&mut self.frags_noted, base.frags_noted),
            (&mut self.frags_followed, base.frags_followed),
            (&mut self.frags_held, base.frags_held),
            (&mut self.syn_cookies_sent, base.syn_cookies_sent),
            (&mut self.syn_proxied, base.syn_proxied),
            (&mut self.hairpinned, base.hairpinned),
            (&mut self.snat_inbound, base.snat_inbound),
            (&mut self.tunnel_tx, base.tunnel_tx),
            (&mut self.tunnel_rx, base.tunnel_rx),
            (&mut self.arp_requests, base.arp_requests),
            (&mut self.mux_tx, base.mux_tx),
            (&mut self.dsr_rx, base.dsr_rx),
        ] {
            *c += b;
        }
        for (reason, n) in &base.drops {
            *self.drops.entry(reason.clone()).or_default() += n;
        }
        if self.rx_bursts.len() < base.rx_bursts.len() {
            self.rx_bursts.resize(base.rx_bursts.len(), 0);
        }
        for (c, b) in self.rx_bursts.iter_mut().zip(&base.rx_bursts) {
            *c += b;
        }
    }

    /// The cycle accounting's counts (polls, ticks, packets, fast and
    /// slow path, bursts) less `base`'s, an earlier reading of the same
    /// worker: what was counted since. Every other field is as read.
    pub fn since(&self, base: &WorkerCounters) -> WorkerCounters {
        let mut d = self.clone();
        for (c, b) in [
            (&mut d.busy_polls, base.busy_polls),
            (&mut d.idle_polls, base.idle_polls),
            (&mut d.busy_ticks, base.busy_ticks),
            (&mut d.idle_ticks, base.idle_ticks),
            (&mut d.pipeline_ticks, base.pipeline_ticks),
            (&mut d.io_ticks, base.io_ticks),
            (&mut d.slow_path_ticks, base.slow_path_ticks),
            (&mut d.rx_packets, base.rx_packets),
            (&mut d.tx_packets, base.tx_packets),
            (&mut d.fast_path, base.fast_path),
            (&mut d.slow_path, base.slow_path),
        ] {
            *c = c.saturating_sub(b);
        }
        for (c, b) in d.rx_bursts.iter_mut().zip(&base.rx_bursts) {
            *c = c.saturating_sub(*b);
        }
        d
    }
}

/// One VIP backend's connections, summed over workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCounters {
    /// VIP name.
    pub vip: String,
    /// Backend `address:port`.
    pub backend: String,
    /// Its weight.
    pub weight: u32,
    /// Connections created to it.
    pub new_connections: u64,
    /// Connections to it tracked now.
    pub active_connections: u64,
}

/// One security-group rule and the lookups it won, summed over workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounters {
    /// The group.
    pub nsg: String,
    /// `in` or `out`.
    pub direction: String,
    /// The rule's name.
    pub rule: String,
    /// Its priority.
    pub priority: u32,
    /// `allow` or `deny`.
    pub action: String,
    /// Lookups it won.
    pub hits: u64,
}

/// `GET /v1/perf`: where each worker's cycles went since the last reset
/// (or start), as OVS's `pmd-perf-show` and VPP's `show runtime` show.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerfView {
    /// The clock's ticks per second (the TSC's: ticks are cycles at its
    /// nominal rate).
    pub ticks_per_second: u64,
    /// Seconds since the last reset (or since pollux started).
    pub seconds: f64,
    /// Per worker.
    pub workers: Vec<WorkerPerf>,
}

/// One worker's cycle accounting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerPerf {
    /// Worker number.
    pub worker: usize,
    /// Polls that received packets.
    pub busy_polls: u64,
    /// Polls that received nothing.
    pub idle_polls: u64,
    /// Ticks in busy polls.
    pub busy_ticks: u64,
    /// Ticks in idle polls: the headroom.
    pub idle_ticks: u64,
    /// Busy ticks' share of all, percent.
    pub busy_percent: f64,
    /// Packets received (and taken from other workers).
    pub rx_packets: u64,
    /// Packets by the fast path.
    pub fast_path: u64,
    /// Packets by the slow path.
    pub slow_path: u64,
    /// Busy ticks per packet received.
    pub cycles_per_packet: f64,
    /// Of which port I/O (receive, send at a burst's end, the loop).
    pub io_cycles_per_packet: f64,
    /// Fast-path ticks per fast-path packet.
    pub fast_path_cycles: f64,
    /// Slow-path ticks per slow-path packet (deciding it: policy,
    /// connection tracking, load balancing, the flow installed; queueing
    /// it for sending).
    pub slow_path_cycles: f64,
    /// Packets per receive burst, on average.
    pub average_burst: f64,
    /// Receive bursts by size (element `n - 1`: bursts of `n`).
    pub rx_bursts: Vec<u64>,
}

impl WorkerPerf {
    /// The accounting of counts `c` (counted since a reset).
    pub fn of(c: &WorkerCounters) -> WorkerPerf {
        let per = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let fast_ticks = c.pipeline_ticks.saturating_sub(c.slow_path_ticks);
        let bursts: u64 = c.rx_bursts.iter().sum();
        let burst_packets: u64 = c
            .rx_bursts
            .iter()
            .enumerate()
            .map(|(i, n)| (i as u64 + 1) * n)
            .sum();
        WorkerPerf {
            worker: c.worker,
            busy_polls: c.busy_polls,
            idle_polls: c.idle_polls,
            busy_ticks: c.busy_ticks,
            idle_ticks: c.idle_ticks,
            busy_percent: 100.0 * per(c.busy_ticks, c.busy_ticks.saturating_add(c.idle_ticks)),
            rx_packets: c.rx_packets,
            fast_path: c.fast_path,
            slow_path: c.slow_path,
            cycles_per_packet: per(c.busy_ticks, c.rx_packets),
            io_cycles_per_packet: per(c.io_ticks, c.rx_packets),
            fast_path_cycles: per(fast_ticks, c.fast_path),
            slow_path_cycles: per(c.slow_path_ticks, c.slow_path),
            average_burst: per(burst_packets, bursts),
            rx_bursts: c.rx_bursts.clone(),
        }
    }
}

/// `GET /v1/counters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Per port.
    pub ports: Vec<PortCounters>,
    /// Per worker.
    pub workers: Vec<WorkerCounters>,
    /// Per VIP backend.
    pub backends: Vec<BackendCounters>,
    /// Per security-group rule.
    pub rules: Vec<RuleCounters>,
}

/// A body with the published generation beside it (every JSON reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithGeneration<T> {
    /// The body.
    #[serde(flatten)]
    pub body: T,
    /// The published policy generation when the reply was made.
    pub generation: u64,
}

#[cfg(test)]
mod tests {

    /// Every counter of a predecessor's is added, no gauge is: a field
    /// added to the counters and forgotten in `add` fails here.
    #[test]
    fn a_predecessors_worker_counters_add_to_ours_but_not_its_gauges() {
        let mut all = serde_json::to_value(WorkerCounters::default()).unwrap();
        for (k, v) in all.as_object_mut().unwrap() {
            if v.is_u64() && k != "worker" {
                *v = serde_json::json!(3);
            }
        }
        all["drops"] = serde_json::json!({"acl_deny": 2});
        all["rx_bursts"] = serde_json::json!([2, 0, 1]);
        let base: WorkerCounters = serde_json::from_value(all).unwrap();
        let mut mine = WorkerCounters {
            connections: 5,
            drops: [("acl_deny".to_string(), 1)].into(),
            ..WorkerCounters::default()
        };
        mine.add(&base);
        let got = serde_json::to_value(&mine).unwrap();
        for (k, v) in got.as_object().unwrap() {
            let want = match k.as_str() {
                "worker" => 0,
                "connections" => 5,
                "flow_table_entries" | "snat_ports_in_use" | "frags_waiting" => 0,
                "drops" | "rx_bursts" => continue,
                _ => 3,
            };
            assert_eq!(v.as_u64(), Some(want), "{k}");
        }
        assert_eq!(mine.drops["acl_deny"], 3);
        assert_eq!(mine.rx_bursts, vec![2, 0, 1]);
    }

    use super::*;

    #[test]
    fn cycle_accounting_splits_busy_ticks_and_counts_since_a_reset() {
        let at_reset = WorkerCounters {
            busy_ticks: 1_000,
            idle_ticks: 500,
            pipeline_ticks: 600,
            io_ticks: 400,
            slow_path_ticks: 100,
            rx_packets: 10,
            fast_path: 8,
            slow_path: 2,
            rx_bursts: vec![10],
            ..WorkerCounters::default()
        };
        let now = WorkerCounters {
            busy_ticks: 11_000,
            idle_ticks: 10_500,
            pipeline_ticks: 8_600,
            io_ticks: 2_400,
            slow_path_ticks: 2_100,
            rx_packets: 110,
            fast_path: 98,
            slow_path: 12,
            rx_bursts: vec![10, 0, 0, 25],
            ..WorkerCounters::default()
        };
        let p = WorkerPerf::of(&now.since(&at_reset));
        assert_eq!(
            (p.busy_ticks, p.idle_ticks, p.rx_packets),
            (10_000, 10_000, 100)
        );
        assert_eq!(p.busy_percent, 50.0);
        assert_eq!(p.cycles_per_packet, 100.0);
        // 10 000 busy: 2 000 I/O, 6 000 fast path, 2 000 slow path.
        assert_eq!(p.io_cycles_per_packet, 20.0);
        assert_eq!(p.fast_path_cycles, 6_000.0 / 90.0);
        assert_eq!(p.slow_path_cycles, 200.0);
        assert_eq!(p.rx_bursts, vec![0, 0, 0, 25]);
        assert_eq!(p.average_burst, 4.0);
        // Nothing counted: no division by zero.
        let z = WorkerPerf::of(&WorkerCounters::default());
        assert_eq!(
            (z.cycles_per_packet, z.average_burst, z.busy_percent),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn bodies_carry_the_generation_beside_their_fields() {
        let v = serde_json::to_value(WithGeneration {
            body: Applied { applied: 7 },
            generation: 7,
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"applied": 7, "generation": 7}));
        let e: WithGeneration<ErrorBody> =
            serde_json::from_str(r#"{"error":"vm \"x\" does not exist","generation":3}"#).unwrap();
        assert_eq!(e.generation, 3);
        assert_eq!(e.body.text(), "vm \"x\" does not exist");
        let two = ErrorBody {
            error: "a".into(),
            problems: vec!["a".into(), "b".into()],
        };
        assert_eq!(two.text(), "a\nb");
    }
}

/// `POST /v1/trace`: a packet to trace, arriving on `port`: either a whole
/// frame in hex, or a description (the rest default from the port's VM:
/// its MAC and first address, the vnet gateway's MAC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// The port it arrives on, by name.
    pub port: String,
    /// The whole Ethernet frame in hex (no other field then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<String>,
    /// Source MAC (default: the port's VM's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_mac: Option<String>,
    /// Destination MAC (default: the vnet gateway's; on the uplink, the
    /// uplink's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_mac: Option<String>,
    /// Source address (default: the port's VM's first of the family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Destination address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// `tcp` (the default), `udp` or `icmp` (an echo request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Source port (default 40000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    /// Destination port (tcp, udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// TCP flags as letters, `S` (the default), `SA`, `A`, `F`, `R`, `P`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// TTL or hop limit (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u8>,
    /// Payload bytes (zeros; default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<usize>,
}

/// One layer's decision in a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStepView {
    /// `port`, `spoof`, `arp`, `nd`, `icmp`, `lb`, `route`, `acl`,
    /// `output`; in live traces also `flow`, `drop` and `handoff`.
    pub layer: String,
    /// What it decided and why.
    pub detail: String,
}

/// `POST /v1/trace`: what the switch decides for the packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceView {
    /// The input port.
    pub port: String,
    /// The packet as parsed, in words (`None`: not parsed).
    pub packet: Option<String>,
    /// The frame traced, in hex.
    pub frame: String,
    /// Each layer's decision, in order.
    pub steps: Vec<TraceStepView>,
    /// `forward`, `answer` (sent back out of the input port), `drop` or
    /// `malformed`.
    pub result: String,
    /// With `forward`: the output port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_port: Option<String>,
    /// With `drop` and `malformed`: the reason counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `forward` and `answer`: the frame sent, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_packet: Option<String>,
    /// With `forward` and `answer`: the frame sent, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_frame: Option<String>,
    /// Flows the workers hold now for this packet's key on this port
    /// (a packet of a cached flow takes its action instead).
    pub cached: Vec<Flow>,
}

/// `POST /v1/capture`: start a live capture (one at a time: a new one
/// replaces the one under way).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// The port, by name (default: every port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Which frames, as tcpdump puts it: `host A`, `src host A`, `dst host
    /// A`, `port N`, `src port N`, `dst port N`, `tcp`, `udp`, `icmp`,
    /// `icmp6`, `arp`, `ip`, `ip6`, joined by `and` (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Frames to capture (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Seconds at most (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Bytes kept of each frame (default and most: 2176).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snaplen: Option<usize>,
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedFrame {
    /// When, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The port.
    pub port: String,
    /// `rx` (received from the port, before the switch) or `tx` (sent to
    /// it, after the switch's rewrite).
    pub direction: String,
    /// Its length on the wire.
    pub len: u32,
    /// Its first bytes (the snap length), in hex.
    pub data: String,
}

/// `GET` / `DELETE /v1/capture`: the capture and the frames captured since
/// the last read (each frame is read once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureView {
    /// Still capturing (false once its count or time is spent, or after
    /// `DELETE`).
    pub running: bool,
    /// Its port (`None`: every port).
    pub port: Option<String>,
    /// Its filter.
    pub filter: String,
    /// Frames it was asked for.
    pub count: u64,
    /// Frames captured so far.
    pub captured: u64,
    /// Frames that matched while the reader was behind (no room): not
    /// captured.
    pub missed: u64,
    /// The frames captured since the last read.
    pub frames: Vec<CapturedFrame>,
}

/// A live-traced packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivePacket {
    /// When its burst began, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The worker that handled it.
    pub worker: usize,
    /// The input port.
    pub port: String,
    /// The packet as it arrived, in words.
    pub packet: String,
    /// Each layer's decision (a cached flow's hit, or the slow path's).
    pub steps: Vec<TraceStepView>,
    /// `forward`, `answer`, `drop`, `handed` (to the worker that owns its
    /// connection, not traced there), `held` (a later fragment waiting for
    /// its first) or `unknown`.
    pub result: String,
    /// With `forward` and `answer`: the output port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_port: Option<String>,
    /// With `drop`: the reason counted; with `handed`: the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/ipfix`: the flow-log export's configuration and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpfixView {
    /// `[ipfix]` as configured (`null`: off).
    pub ipfix: Option<crate::config::IpfixCfg>,
    /// True while records go to the collector (false while no socket
    /// could be opened to it: `last_error` says why).
    pub running: bool,
    /// Records the workers queued.
    pub records_queued: u64,
    /// Records lost: the queue was full, or flow logs were turned off
    /// with them unsent.
    pub records_lost: u64,
    /// Denied packets not recorded: over a worker's 1000 a second.
    pub records_suppressed: u64,
    /// Records not sent: in a message the socket refused or timed out
    /// on, or after one in the same turn.
    pub records_unsent: u64,
    /// Records waiting to be sent.
    pub records_waiting: u64,
    /// Records sent to the collector.
    pub records_sent: u64,
    /// Messages sent (templates too).
    pub messages_sent: u64,
    /// Messages the socket refused or timed out on (see `records_unsent`).
    pub send_errors: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// `GET` / `DELETE /v1/trace/live`: the live trace and the packets traced
/// since the last read (each read once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTraceView {
    /// Still tracing.
    pub running: bool,
    /// Its port (`None`: every port).
    pub port: Option<String>,
    /// Its filter.
    pub filter: String,
    /// Packets it was asked for.
    pub count: u64,
    /// Packets traced so far.
    pub traced: u64,
    /// Packets traced while the queue was full (their records were lost).
    pub missed: u64,
    /// The packets traced since the last read.
    pub packets: Vec<LivePacket>,
}

/// `bytes` in hex, as frames travel in the API's JSON.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why hex digits are not bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// An odd number of digits.
    #[error("an odd number of hex digits")]
    Odd,
    /// Not a hex digit.
    #[error("byte {0} ({1:?}) is not hex")]
    NotHex(usize, String),
}

/// Bytes from hex digits: spaces, colons and one `0x` prefix allowed.
pub fn from_hex(s: &str) -> Result<Vec<u8>, HexError> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':')
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(HexError::Odd);
    }
    let value = |d: u8| char::from(d).to_digit(16);
    digits
        .chunks(2)
        .enumerate()
        .map(|(i, d)| match d {
            [a, b] => match (value(*a), value(*b)) {
                (Some(a), Some(b)) => Ok((a * 16 + b) as u8),
                _ => Err(HexError::NotHex(i, String::from_utf8_lossy(d).into_owned())),
            },
            _ => Err(HexError::Odd),
        })
        .collect()
}

#[cfg(test)]
mod hex_tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let f = from_hex("0x02:00 0a\nFf").unwrap();
        assert_eq!(f, vec![2, 0, 0x0a, 0xff]);
        assert_eq!(to_hex(&f), "02000aff");
        assert_eq!(from_hex("0X0a"), Ok(vec![10]));
        assert_eq!(from_hex("abc"), Err(HexError::Odd));
        assert_eq!(from_hex("zz00"), Err(HexError::NotHex(0, "zz".into())));
        assert_eq!(from_hex("00+f"), Err(HexError::NotHex(1, "+f".into())));
        assert_eq!(from_hex("0x0x12"), Err(HexError::NotHex(0, "0x".into())));
        assert_eq!(from_hex(""), Ok(vec![]));
    }
}
