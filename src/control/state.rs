//! The control API's state: the desired configuration and how a change is
//! published ([`ControlState`]), the workers' counters and mailboxes the
//! API reads ([`Runtime`]), and the figures derived from them. Routes
//! (`super`) and metrics (`crate::metrics`) read it; it reads neither.

pub use crate::api::{ProbeState, Reloads};
use crate::config::{BackendCfg, Config};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;
use vswitch::flow::FlowFilter;
use vswitch::switch::{AclHits, FlowControl, FlowRequest};
use vswitch::{Policy, SwitchStats, Topology, VmDef};

/// A refused request: HTTP status, message, and the problems found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// 400, 404, 409, 422, 500, 503.
    pub status: u16,
    /// One line naming what is wrong.
    pub message: String,
    /// Every validation problem, one per line (422).
    pub problems: Vec<String>,
}

impl ApiError {
    pub(super) fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    pub(super) fn invalid(problems: Vec<String>) -> ApiError {
        ApiError {
            status: 422,
            message: problems
                .first()
                .cloned()
                .unwrap_or_else(|| "invalid".into()),
            problems,
        }
    }
}

/// A backend's identity in a VIP: its VM name or address, and port.
pub(super) fn backend_key(b: &BackendCfg) -> String {
    format!(
        "{}:{}",
        b.vm.as_deref().or(b.ip.as_deref()).unwrap_or("?"),
        b.port
    )
}

/// The desired state and how to publish it.
pub struct ControlState {
    config: Config,
    policy: Arc<ArcSwap<Policy>>,
    /// Internal VMs (probers) added at start, with their vnet's name.
    internal: Vec<(String, VmDef)>,
    /// Ports beyond the configured ones (probers' internal ports).
    internal_ports: u16,
    /// Vnets with a prober (those that existed at start).
    prober_vnets: Vec<String>,
    /// Changes published so far (the control loop resyncs probes on change).
    changes: u64,
    /// The underlay neighbours' MACs each policy is compiled with.
    neighbours: Vec<(std::net::Ipv4Addr, dataplane::MacAddr)>,
    /// The security groups of the last `GROUP_GENERATIONS` generations
    /// published (shared by the generations that kept them): the flow
    /// logs name a flow's rules from its generation's.
    groups: std::collections::VecDeque<(u64, Arc<Vec<filter::CompiledNsg>>)>,
}

/// Generations whose security groups are kept to name flow logs' rules.
pub const GROUP_GENERATIONS: usize = 64;

impl ControlState {
    /// Control over `policy`, which was compiled from `config` (+ the
    /// internal VMs and ports of `topo`).
    pub fn new(config: Config, topo: &Topology, policy: Arc<ArcSwap<Policy>>) -> ControlState {
        let internal = topo
            .vms
            .iter()
            .filter(|v| v.internal)
            .filter_map(|v| Some((topo.vnets.get(v.vnet)?.name.clone(), v.clone())))
            .collect();
        let prober_vnets = topo
            .vms
            .iter()
            .filter(|v| v.internal)
            .filter_map(|v| Some(topo.vnets.get(v.vnet)?.name.clone()))
            .collect();
        let now = policy.load();
        let groups = [(now.generation, now.nsgs.clone())].into();
        ControlState {
            groups,
            internal_ports: topo.ports.saturating_sub(config.port.len() as u16),
            config,
            policy,
            internal,
            prober_vnets,
            changes: 0,
            neighbours: topo.neighbours.clone(),
        }
    }

    /// The security groups of generation `g`, while it is among the last
    /// [`GROUP_GENERATIONS`] published.
    pub fn groups_of(&self, g: u64) -> Option<&Arc<Vec<filter::CompiledNsg>>> {
        self.groups
            .iter()
            .rev()
            .find(|(gen_, _)| *gen_ == g)
            .map(|(_, n)| n)
    }

    /// The desired state.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many changes were published (health changes excluded).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The published policy.
    pub fn policy(&self) -> &Arc<ArcSwap<Policy>> {
        &self.policy
    }

    /// The published generation.
    pub fn generation(&self) -> u64 {
        self.policy.load().generation
    }

    /// Applies `change` to a copy of the desired state; publishes it as the
    /// next generation if it is valid whole. Returns the new generation.
    pub fn apply(
        &mut self,
        change: impl FnOnce(&mut Config) -> Result<(), ApiError>,
    ) -> Result<u64, ApiError> {
        let mut next = self.config.clone();
        change(&mut next)?;
        self.publish(next)
    }

    /// Publishes the current desired state again with the neighbour
    /// cache's MACs `neighbours` (the cache resolved, changed or lost one).
    pub fn set_neighbours(
        &mut self,
        neighbours: Vec<(std::net::Ipv4Addr, dataplane::MacAddr)>,
    ) -> Result<u64, ApiError> {
        let old = std::mem::replace(&mut self.neighbours, neighbours);
        let r = self.publish(self.config.clone());
        if r.is_err() {
            self.neighbours = old;
        }
        r
    }

    /// The neighbours' MACs the published policy was compiled with.
    pub fn neighbours(&self) -> &[(std::net::Ipv4Addr, dataplane::MacAddr)] {
        &self.neighbours
    }

    /// Replaces the whole desired state (`PUT /v1/config`, SIGHUP).
    pub fn replace(&mut self, next: Config) -> Result<u64, ApiError> {
        self.publish(next)
    }

    fn publish(&mut self, next: Config) -> Result<u64, ApiError> {
        let fixed = |what: &str, same: bool| {
            if same {
                Ok(())
            } else {
                Err(ApiError::new(
                    409,
                    format!(
                        "{what} cannot change while pollux runs (restart it with the new configuration)"
                    ),
                ))
            }
        };
        fixed("[[port]]", next.port == self.config.port)?;
        fixed("[dataplane]", next.dataplane == self.config.dataplane)?;
        fixed("[control]", next.control == self.config.control)?;
        fixed("[dpdk]", next.dpdk == self.config.dpdk)?;
        // The uplink's routes (and default gateway) may change; its port,
        // MACs and address may not.
        let fixed_part = |u: &Option<crate::config::UplinkCfg>| {
            u.clone().map(|u| crate::config::UplinkCfg {
                route: Vec::new(),
                gateway: None,
                ..u
            })
        };
        fixed(
            "[uplink] (but its routes and gateway)",
            fixed_part(&next.uplink) == fixed_part(&self.config.uplink),
        )?;
        // A vnet's SNAT (ports, behaviours, timeouts) is laid out in every
        // worker when the vnet first appears; it does not change under
        // the connections and mappings that use it.
        for v in &next.vnet {
            if let Some(old) = self.config.vnet.iter().find(|o| o.name == v.name) {
                fixed(
                    &format!("vnet {:?}: [vnet.snat]", v.name),
                    old.snat == v.snat,
                )?;
            }
        }
        for v in next.vip.iter().filter(|v| v.probe.is_some()) {
            if !self.prober_vnets.contains(&v.vnet) {
                return Err(ApiError::new(
                    409,
                    format!(
                        "vip {:?}: vnet {:?} was added while pollux runs and has no prober; probe its VIPs after a restart",
                        v.name, v.vnet
                    ),
                ));
            }
        }
        // `topology()` runs every check `pollux check` does except the
        // policy compile, which happens once, below, on the full topology.
        let mut topo = next
            .topology()
            .map_err(|e| ApiError::invalid(e.problems()))?;
        // Workers keep a vnet's connections and SNAT state by its place in
        // the list: the vnets there stay where they are (new ones are
        // added at the end).
        let kept = next.vnet.len() >= self.config.vnet.len()
            && self
                .config
                .vnet
                .iter()
                .zip(&next.vnet)
                .all(|(o, n)| o.name == n.name);
        if !kept {
            return Err(ApiError::new(
                409,
                "vnets cannot be removed or reordered while pollux runs (new ones are added \
                 at the end; restart it with the new configuration)"
                    .to_string(),
            ));
        }
        topo.ports += self.internal_ports;
        topo.neighbours = self.neighbours.clone();
        for (vnet, vm) in &self.internal {
            if let Some(i) = topo.vnets.iter().position(|v| &v.name == vnet) {
                topo.vms.push(VmDef {
                    vnet: i,
                    ..vm.clone()
                });
            }
        }
        let cur = self.policy.load_full();
        // Health carries over: a probed backend keeps what its prober found
        // while its probe is unchanged; a newly probed one (new backend, or a
        // new or changed probe) starts down until its first success; without
        // a probe every backend is healthy.
        for (vcfg, vip) in next.vip.iter().zip(topo.vips.iter_mut()) {
            let same_probe = self
                .config
                .vip
                .iter()
                .find(|o| o.name == vcfg.name)
                .is_some_and(|o| o.probe == vcfg.probe && o.vnet == vcfg.vnet);
            let old = cur
                .vnets
                .iter()
                .find(|v| topo.vnets.get(vip.vnet).is_some_and(|n| n.name == v.name))
                .and_then(|v| {
                    v.vips
                        .get(vip.config.addr, vip.config.port, vip.config.proto)
                        .cloned()
                });
            let probed = vcfg.probe.is_some();
            vip.health = vip
                .config
                .backends
                .iter()
                .map(|b| {
                    if !probed {
                        return true;
                    }
                    same_probe
                        && old
                            .as_ref()
                            .and_then(|o| Some(o.is_healthy(o.backend_index(b.ip, b.port)?)))
                            .unwrap_or(false)
                })
                .collect();
        }
        let generation = cur.generation + 1;
        let mut policy = Policy::compile(&topo, generation).map_err(|e| ApiError::invalid(e.0))?;
        // Unchanged security groups keep the published compilation, so the
        // workers keep counting rule hits where they were (they reset their
        // counters only when the groups are a different allocation).
        let same = |a: &filter::CompiledNsg, b: &filter::CompiledNsg| {
            a.name == b.name
                && a.inbound.rules() == b.inbound.rules()
                && a.outbound.rules() == b.outbound.rules()
        };
        if policy.nsgs.len() == cur.nsgs.len()
            && policy
                .nsgs
                .iter()
                .zip(cur.nsgs.iter())
                .all(|(a, b)| same(a, b))
        {
            policy.nsgs = cur.nsgs.clone();
        }
        if self.groups.len() >= GROUP_GENERATIONS {
            self.groups.pop_front();
        }
        self.groups
            .push_back((policy.generation, policy.nsgs.clone()));
        self.policy.store(Arc::new(policy));
        self.config = next;
        self.changes += 1;
        Ok(generation)
    }
}

/// What the control thread reads to answer: counters and mailboxes.
pub struct Runtime {
    /// Per port: name, each worker's counters.
    pub ports: Vec<(String, Vec<Arc<dataplane::PortStats>>)>,
    /// Per worker.
    pub workers: Vec<Arc<dataplane::worker::WorkerStats>>,
    /// Per worker's switch.
    pub switches: Vec<Arc<SwitchStats>>,
    /// Per worker's rule hit counters.
    pub acl_hits: Vec<Arc<ArcSwap<Vec<AclHits>>>>,
    /// Per worker's flow mailbox.
    pub flow_control: Vec<Arc<FlowControl>>,
    /// Probe states: (vip, backend, health) per target.
    pub probes: Vec<ProbeState>,
    /// Reloads of the configuration file (SIGHUP) so far.
    pub reloads: Reloads,
    /// A successor's request to take over, accepted and not yet carried
    /// out (the control loop carries it out).
    pub takeover_request: Option<crate::takeover::Request>,
    /// The takeover this process made, if it took over.
    pub takeover: Option<crate::takeover::Takeover>,
    /// Why the last attempt to hand over to a successor failed.
    pub takeover_failed: Option<String>,
    /// Per worker, what a predecessor process had counted: added to this
    /// process's counts wherever they are shown.
    pub base: Vec<crate::api::WorkerCounters>,
    /// The underlay's neighbour cache and its mailboxes to the workers.
    pub neighbours: Neighbours,
    /// The BGP speaker (BIRD runs only with `[bgp]`).
    pub bgp: crate::bgp::Speaker,
    /// Each worker's counts at the last reset of the cycle accounting
    /// (`POST /v1/perf/reset`), and when.
    pub perf_base: (Vec<crate::api::WorkerCounters>, std::time::Instant),
    /// The workers' switch tunables, which a trace's scratch switch takes.
    pub switch_cfg: vswitch::SwitchConfig,
    /// The buffers a trace's packet is put in (made at the first trace).
    pub trace_pool: Option<dataplane::pool::Pool>,
    /// Live capture, shared with every worker.
    pub tap: Arc<dataplane::capture::Tap>,
    /// The capture under way or last made, if any.
    pub capture: Option<super::capture::Session>,
    /// Live trace, served by every worker's switch.
    pub live: Arc<vswitch::switch::LiveTrace>,
    /// The live trace under way or last made, if any.
    pub live_session: Option<super::capture::Session>,
    /// What the control loop logs of its own accord.
    pub events: super::events::Events,
    /// The flow logs' export to an IPFIX collector.
    pub ipfix: super::flowlog::Export,
    next_id: u64,
}

/// The control thread's side of the underlay: the ARP cache, the
/// workers' mailboxes, and the clock the cache's timers run on.
pub struct Neighbours {
    /// Shared with every worker's switch.
    pub mail: Arc<vswitch::neigh::NeighMail>,
    /// The cache.
    pub cache: vswitch::neigh::NeighCache,
    epoch: std::time::Instant,
    /// Why the last publication of the neighbours failed, if it did.
    failed: Option<String>,
}

impl Default for Neighbours {
    fn default() -> Self {
        Neighbours {
            mail: Arc::default(),
            cache: vswitch::neigh::NeighCache::default(),
            epoch: std::time::Instant::now(),
            failed: None,
        }
    }
}

impl Neighbours {
    /// Takes `known` in as neighbours confirmed and in use now (a
    /// predecessor's).
    pub fn seed(&mut self, known: &[(std::net::Ipv4Addr, dataplane::MacAddr)]) {
        let now = self.now();
        for (ip, mac) in known {
            self.cache.insert(*ip, *mac, now);
        }
    }

    /// Nanoseconds on the cache's clock.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// One step of the cache for `state`'s policy; publishes the policy
    /// again when the resolved MACs in use differ from the published ones
    /// (also after a publication that failed), and says so.
    pub fn step(&mut self, state: &mut ControlState) {
        let cur = state.policy().load_full();
        let Some((_, ul)) = cur.underlay() else {
            return;
        };
        let now = self.now();
        let needed = cur.next_hops();
        self.cache
            .step(now, &self.mail, &needed, |ip| ul.on_link(ip));
        let resolved = self.cache.resolved();
        if resolved == state.neighbours() {
            return;
        }
        let list: Vec<String> = resolved
            .iter()
            .map(|(ip, mac)| format!("{ip} at {mac}"))
            .collect();
        match state.set_neighbours(resolved) {
            Ok(g) => {
                self.failed = None;
                tracing::info!(
                    "underlay neighbours now [{}]; policy generation {g}",
                    list.join(", ")
                )
            }
            // Said once; tried again every step.
            Err(e) if self.failed.as_ref() != Some(&e.message) => {
                tracing::warn!("underlay neighbours not applied: {}", e.message);
                self.failed = Some(e.message);
            }
            Err(_) => {}
        }
    }
}

impl Runtime {
    /// A runtime over these counters and mailboxes.
    pub fn new(
        ports: Vec<(String, Vec<Arc<dataplane::PortStats>>)>,
        workers: Vec<Arc<dataplane::worker::WorkerStats>>,
        switches: Vec<Arc<SwitchStats>>,
        acl_hits: Vec<Arc<ArcSwap<Vec<AclHits>>>>,
        flow_control: Vec<Arc<FlowControl>>,
    ) -> Runtime {
        Runtime {
            ports,
            workers,
            switches,
            acl_hits,
            flow_control,
            probes: Vec::new(),
            reloads: Reloads::default(),
            takeover_request: None,
            takeover: None,
            takeover_failed: None,
            base: Vec::new(),
            neighbours: Neighbours::default(),
            bgp: crate::bgp::Speaker::new(),
            perf_base: (Vec::new(), std::time::Instant::now()),
            switch_cfg: vswitch::SwitchConfig::default(),
            trace_pool: None,
            tap: dataplane::capture::Tap::new(1),
            capture: None,
            live: vswitch::switch::LiveTrace::new(1),
            live_session: None,
            events: super::events::Events::default(),
            ipfix: super::flowlog::Export::default(),
            next_id: 1,
        }
    }

    /// Posts `req` (its id set here) to every worker and collects their
    /// replies, waiting up to a second for all.
    pub(super) fn ask(
        &mut self,
        mut req: FlowRequest,
    ) -> Result<Vec<vswitch::switch::FlowReply>, ApiError> {
        req.id = self.next_id;
        self.next_id += 1;
        for c in &self.flow_control {
            c.requests
                .push(req.clone())
                .map_err(|_| ApiError::new(503, "a worker's control mailbox is full; retry"))?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut replies = Vec::new();
        for c in &self.flow_control {
            loop {
                match c.replies.pop() {
                    // Replies to requests that timed out earlier are stale.
                    Some(r) if r.id == req.id => {
                        replies.push(r);
                        break;
                    }
                    Some(_) => {}
                    None if std::time::Instant::now() > deadline => {
                        return Err(ApiError::new(503, "a worker did not answer within 1 s"));
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        }
        Ok(replies)
    }

    /// Lists (or deletes) the flows matching `filter` in every worker's table.
    pub(super) fn flows(
        &mut self,
        filter: FlowFilter,
        delete: bool,
        reset: bool,
        limit: usize,
    ) -> Result<(Vec<vswitch::flow::FlowInfo>, usize, usize), ApiError> {
        let replies = self.ask(FlowRequest {
            id: 0,
            filter,
            delete,
            reset,
            limit,
            backends: false,
        })?;
        let (mut flows, mut matched, mut occupancy) = (Vec::new(), 0, 0);
        for r in replies {
            matched += r.matched;
            occupancy += r.occupancy;
            flows.extend(r.flows);
        }
        flows.truncate(limit);
        Ok((flows, matched, occupancy))
    }
}

/// One security-group rule and how often it won, summed over workers.
#[derive(Debug, Clone)]
pub struct RuleHit {
    /// The group.
    pub nsg: String,
    /// Its direction.
    pub direction: filter::Direction,
    /// The rule's name.
    pub rule: String,
    /// Its priority.
    pub priority: u32,
    /// Its action.
    pub action: filter::Action,
    /// Lookups it won.
    pub hits: u64,
}

/// Every rule of `policy` with its hits summed over the workers' counters.
pub fn rule_hits(policy: &Policy, acl_hits: &[Arc<ArcSwap<Vec<AclHits>>>]) -> Vec<RuleHit> {
    let hits: Vec<_> = acl_hits.iter().map(|h| h.load()).collect();
    let mut out = Vec::new();
    for (g, n) in policy.nsgs.iter().enumerate() {
        for (d, dir) in [filter::Direction::In, filter::Direction::Out]
            .into_iter()
            .enumerate()
        {
            for (i, r) in n.classifier(dir).rules().iter().enumerate() {
                out.push(RuleHit {
                    nsg: n.name.clone(),
                    direction: dir,
                    rule: r.name.clone(),
                    priority: r.priority,
                    action: r.action,
                    hits: hits
                        .iter()
                        .filter_map(|h| h.get(g).map(|h| h[d].get(i)))
                        .sum(),
                });
            }
        }
    }
    out
}
