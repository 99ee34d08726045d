//! The switch pipeline: what a worker runs on every burst.
//!
//! Fast path: parse, look the flow key up in the unified flow table, and if
//! the entry was decided under the current policy generation (and, for a
//! flow of a load-balanced connection, under its VIP's current backend set),
//! apply its one action (MACs, NAT, TTL) and queue the packet on its output
//! port. A health change swaps one VIP's backend set in place: only that
//! VIP's flows go back through the slow path, where the connection keeps
//! its backend.
//!
//! Slow path (a miss, or an entry decided under an older generation or
//! backend set), in order:
//! anti-spoofing (source MAC and IP must be the VM's on that port), the ARP
//! and IPv6 neighbour-discovery responder (every address of the vnet and
//! every VIP answers with the gateway MAC; nothing is flooded), ping to a VIP
//! answered, load balancing (new connection to a VIP: Maglev + DNAT; reply
//! from a DIP: reverse NAT; both tracked per vnet), routing (destination must
//! be a VM of the *same* vnet: tenant isolation; outside the vnet, the uplink
//! with SNAT), the source VM's outbound ACL and the destination VM's inbound
//! ACL. The result is installed for both directions (a stateful allow admits
//! the return traffic), with its rewrite compiled for the fast path, and
//! applied. Packets from the uplink may only answer connections that left
//! through it or open connections to a public VIP.
//!
//! With several workers, a packet whose connection another worker owns
//! ([`crate::placement`]) is handed to that worker's mailbox ([`Handoff`]).

use crate::flow::{FlowAction, FlowEntry, FlowTable};
use crate::policy::{NO_VIP, Policy, UplinkDef};
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use dataplane::clock::TscClock;
use dataplane::wire::arp;
use dataplane::worker::{Ctx, Pipeline};
use dataplane::{Batch, DropReason, FlowKey, L3, PacketBuf, Parsed, parse, parse_into, rewrite};
use filter::{Action, Direction, HitCounters, PacketKey};
use lb::balancer::{Decision, LbCore, LbDrop};
use lb::conntrack::{ConnKey, Dir, Timeouts};
use lb::nat::Rewrite;
use lb::snat::SnatAllocator;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why the switch dropped a packet (beyond parse errors, which the worker
/// counts under `DropReason::Malformed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchDrop {
    /// Source MAC or IP is not the VM's on that port.
    Spoofed,
    /// A security-group rule denied it.
    AclDeny,
    /// The destination is not a VM of the source's vnet.
    NoRoute,
    /// Arrived on a port with no VM.
    NoVm,
    /// An ARP packet the switch does not answer (a reply, or an address outside the vnet).
    ArpIgnored,
    /// A protocol the switch does not carry (non-IP, non-ARP).
    Unsupported,
    /// The owning worker's mailbox was full.
    HandoffFull,
    /// IPv6 neighbour or multicast-listener discovery the switch does not
    /// answer (advertisements, router and listener messages, duplicate
    /// address detection, targets outside the vnet).
    NdIgnored,
    /// TTL or hop limit expired.
    TtlExpired,
    /// The header rewrite failed.
    RewriteFailed,
    /// The load balancer dropped it.
    Lb(LbDrop),
}

const BASE: [SwitchDrop; 10] = [
    SwitchDrop::Spoofed,
    SwitchDrop::AclDeny,
    SwitchDrop::NoRoute,
    SwitchDrop::NoVm,
    SwitchDrop::ArpIgnored,
    SwitchDrop::Unsupported,
    SwitchDrop::HandoffFull,
    SwitchDrop::NdIgnored,
    SwitchDrop::TtlExpired,
    SwitchDrop::RewriteFailed,
];

impl SwitchDrop {
    /// Number of reasons.
    pub const COUNT: usize = BASE.len() + LbDrop::ALL.len();

    /// Dense index.
    pub fn index(self) -> usize {
        match self {
            SwitchDrop::Lb(r) => BASE.len() + r as usize,
            other => BASE.iter().position(|b| *b == other).unwrap_or(0),
        }
    }

    /// Every reason, in index order.
    pub fn all() -> impl Iterator<Item = SwitchDrop> {
        BASE.into_iter()
            .chain(LbDrop::ALL.into_iter().map(SwitchDrop::Lb))
    }

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            SwitchDrop::Spoofed => "spoofed",
            SwitchDrop::AclDeny => "acl_deny",
            SwitchDrop::NoRoute => "no_route",
            SwitchDrop::NoVm => "no_vm",
            SwitchDrop::ArpIgnored => "arp_ignored",
            SwitchDrop::Unsupported => "unsupported",
            SwitchDrop::HandoffFull => "handoff_full",
            SwitchDrop::NdIgnored => "nd_ignored",
            SwitchDrop::TtlExpired => "ttl_expired",
            SwitchDrop::RewriteFailed => "rewrite_failed",
            SwitchDrop::Lb(r) => r.name(),
        }
    }
}

/// Switch counters, readable from any thread.
#[derive(Debug)]
pub struct SwitchStats {
    drops: [AtomicU64; SwitchDrop::COUNT],
    /// Packets handled by a flow-table hit.
    pub fast_path: AtomicU64,
    /// Packets that went through the slow path.
    pub slow_path: AtomicU64,
    /// ARP requests answered.
    pub arp_replies: AtomicU64,
    /// ICMP echo requests to a VIP or public address answered.
    pub icmp_replies: AtomicU64,
    /// IPv6 neighbour solicitations answered.
    pub nd_replies: AtomicU64,
    /// Flows installed.
    pub flows_installed: AtomicU64,
    /// Packets handed to the worker that owns their connection.
    pub handed_off: AtomicU64,
    /// Flow-table occupancy, published every 100 ms (at expiry).
    pub flows: AtomicU64,
}

impl Default for SwitchStats {
    fn default() -> Self {
        SwitchStats {
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            fast_path: AtomicU64::new(0),
            slow_path: AtomicU64::new(0),
            arp_replies: AtomicU64::new(0),
            icmp_replies: AtomicU64::new(0),
            nd_replies: AtomicU64::new(0),
            flows_installed: AtomicU64::new(0),
            handed_off: AtomicU64::new(0),
            flows: AtomicU64::new(0),
        }
    }
}

impl SwitchStats {
    /// Drops for `r`.
    pub fn dropped(&self, r: SwitchDrop) -> u64 {
        self.drops[r.index()].load(Ordering::Relaxed)
    }

    /// Non-zero drop counters by name.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        SwitchDrop::all()
            .map(|r| (r.name(), self.dropped(r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn count(&self, r: SwitchDrop) {
        self.drops[r.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-rule hit counters of one compiled group: [inbound, outbound].
pub type AclHits = [HitCounters; 2];

/// Tunables of a switch worker.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// Flow table entries.
    pub flow_table_size: usize,
    /// Idle timeout of a flow entry.
    pub flow_idle: Duration,
    /// Timeout of a flow entry after FIN/RST.
    pub flow_closing: Duration,
    /// Connections tracked per vnet by the load balancer.
    pub conn_table_size: usize,
    /// Load-balancer connection timeouts.
    pub timeouts: Timeouts,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            flow_table_size: 1 << 20,
            flow_idle: Duration::from_secs(240),
            flow_closing: Duration::from_secs(10),
            conn_table_size: 1 << 18,
            timeouts: Timeouts::default(),
        }
    }
}

/// The mailboxes through which workers hand each other packets of
/// connections they do not own ([`crate::placement`]): one bounded lock-free
/// queue per worker, of (input port, packet).
pub struct Handoff<B> {
    queues: Vec<ArrayQueue<(u16, B)>>,
}

impl<B> Handoff<B> {
    /// Mailboxes for `workers` workers, `capacity` packets each.
    pub fn new(workers: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Handoff {
            queues: (0..workers.max(1))
                .map(|_| ArrayQueue::new(capacity.max(1)))
                .collect(),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.queues.len()
    }
}

/// A control request to one worker about its flow table.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    /// Echoed in the reply.
    pub id: u64,
    /// Which flows.
    pub filter: crate::flow::FlowFilter,
    /// Remove them (else list them).
    pub delete: bool,
    /// List at most this many.
    pub limit: usize,
    /// Instead: report the load balancer's per-backend counters.
    pub backends: bool,
}

/// A worker's answer to a [`FlowRequest`].
#[derive(Debug, Clone)]
pub struct FlowReply {
    /// The request's id.
    pub id: u64,
    /// Matching flows (listing), at most the limit.
    pub flows: Vec<crate::flow::FlowInfo>,
    /// Matching flows in all (listing: beyond the limit too; deleting: removed).
    pub matched: usize,
    /// The worker's table occupancy after the request.
    pub occupancy: usize,
    /// Per-backend counters (when asked for).
    pub backends: Vec<(lb::balancer::BackendKey, lb::balancer::BackendCounts)>,
}

/// A worker's control mailbox: the control thread posts requests, the
/// worker answers between bursts (never per packet; one request per poll).
#[derive(Debug)]
pub struct FlowControl {
    /// Requests to the worker.
    pub requests: ArrayQueue<FlowRequest>,
    /// Replies from the worker.
    pub replies: ArrayQueue<FlowReply>,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            requests: ArrayQueue::new(16),
            replies: ArrayQueue::new(16),
        }
    }
}

/// One worker's switch.
pub struct Switch<B = dataplane::pool::PoolBuf> {
    policy: Arc<ArcSwap<Policy>>,
    cfg: SwitchConfig,
    flows: FlowTable,
    lb: Vec<LbCore>,
    generation: u64,
    /// The health clock reading the epochs below were taken at.
    health_seen: u64,
    /// Each VIP's backend-set epoch (by VIP number) as of `health_seen`: a
    /// cached flow of a VIP whose epoch moved is revalidated.
    vip_epochs: Vec<u16>,
    acl_hits: Arc<ArcSwap<Vec<AclHits>>>,
    /// The counters `acl_hits` publishes, held here so that classifying
    /// does not go through the `ArcSwap` each time.
    hits: Arc<Vec<AclHits>>,
    /// The groups `acl_hits` counts for.
    counted_nsgs: Option<Arc<Vec<filter::CompiledNsg>>>,
    stats: Arc<SwitchStats>,
    clock: TscClock,
    last_expire: u64,
    last_sweep: u64,
    /// How long a flow's hits go untold to its load-balancer connection.
    lb_touch_ns: u64,
    /// This worker's index and the shared mailboxes, with several workers.
    handoff: Option<(usize, Arc<Handoff<B>>)>,
    /// The control thread's mailbox to this worker, and the worker's index.
    control: Option<(usize, Arc<FlowControl>)>,
}

/// What the load balancer decided for a packet the switch forwards: the
/// rewrite, the tracked connection, the key after the rewrite, and whether
/// the packet is reply traffic of that connection.
struct LbStep {
    nat: Rewrite,
    lb: (u32, u32, Dir),
    post: ConnKey,
    reply: bool,
}

/// Reads a load-balancer decision for `key` in vnet `vnet`: `Ok(None)` when
/// the load balancer does not handle the packet.
fn lb_step(d: Option<Decision>, vnet: usize, key: &ConnKey) -> Result<Option<LbStep>, SwitchDrop> {
    match d {
        Some(Decision::Forward {
            rewrite, dir, conn, ..
        }) => Ok(Some(LbStep {
            nat: rewrite,
            lb: (vnet as u32, conn, dir),
            post: rewrite.apply_to_key(key),
            reply: dir == Dir::Reply,
        })),
        Some(Decision::Drop(r)) => Err(SwitchDrop::Lb(r)),
        Some(Decision::NotHandled) | None => Ok(None),
    }
}

/// Applies a flow's action to `pkt` and queues it on the output port: MACs,
/// then the compiled transposition (or the field-by-field NAT and TTL for
/// flows without one); failures are dropped and counted.
#[inline]
fn transpose<B: PacketBuf>(
    stats: &SwitchStats,
    ctx: &mut Ctx<'_, B>,
    mut pkt: B,
    pk: &Parsed,
    a: &FlowAction,
) {
    let f = pkt.data_mut();
    let r = match f.get_mut(0..12) {
        Some(macs) => {
            macs.copy_from_slice(&a.macs());
            match a.fast {
                // Addresses, ports, TTL, two checksum additions.
                Some(t) => t.apply(f, pk),
                None => a.nat.apply(f, pk).and_then(|_| rewrite::dec_ttl(f, pk)),
            }
        }
        None => Err(rewrite::RewriteError::Mismatch),
    };
    match r {
        Ok(()) => ctx.send(usize::from(a.out_port), pkt),
        Err(rewrite::RewriteError::TtlExpired) => stats.count(SwitchDrop::TtlExpired),
        Err(_) => stats.count(SwitchDrop::RewriteFailed),
    }
}

/// A packet parsed and looked up ahead of its turn in the burst: headers,
/// flow hash, and the flow found then (see [`FlowTable::entry_for`]).
type Pre<'a> = (&'a Parsed, u64, Option<crate::flow::FlowRef>);

/// Where the slow path routes a packet.
#[derive(Clone, Copy)]
enum Hop<'a> {
    /// A VM of the same vnet.
    Vm(&'a crate::policy::Vm),
    /// Out to the wire.
    Uplink(&'a UplinkDef),
}

/// What the slow path decided.
enum Slow {
    /// Send this (rewritten) packet back out of its port (ARP reply).
    Reply,
    /// Answer this neighbour solicitation with an advertisement at this MAC.
    Advert(dataplane::MacAddr),
    /// Forward with this action.
    Forward(FlowAction),
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

fn tcp_flags(frame: &[u8], p: &Parsed) -> u8 {
    if p.key.proto == 6 && p.has_l4 {
        frame.get(usize::from(p.l4_off) + 13).copied().unwrap_or(0)
    } else {
        0
    }
}

fn flow_key(k: &ConnKey, in_port: u16) -> FlowKey {
    FlowKey {
        src_ip: k.src,
        dst_ip: k.dst,
        src_port: k.sport,
        dst_port: k.dport,
        in_port,
        proto: k.proto,
    }
}

impl<B: PacketBuf> Switch<B> {
    /// A switch worker reading policy from `policy`.
    pub fn new(policy: Arc<ArcSwap<Policy>>, cfg: SwitchConfig) -> Self {
        let flows = FlowTable::new(
            cfg.flow_table_size,
            cfg.flow_idle.as_nanos() as u64,
            cfg.flow_closing.as_nanos() as u64,
        );
        Switch {
            policy,
            flows,
            lb: Vec::new(),
            generation: u64::MAX,
            health_seen: u64::MAX,
            vip_epochs: Vec::new(),
            acl_hits: Arc::new(ArcSwap::from_pointee(Vec::new())),
            hits: Arc::new(Vec::new()),
            counted_nsgs: None,
            stats: Arc::default(),
            clock: TscClock::calibrate(Duration::from_millis(10)),
            last_expire: 0,
            last_sweep: 0,
            lb_touch_ns: (cfg.timeouts.shortest() / 4).clamp(1_000_000, 10_000_000_000),
            handoff: None,
            control: None,
            cfg,
        }
    }

    /// Worker `worker` of `handoff.workers()`: it processes only the
    /// connections [`crate::placement::owner`] gives it, hands the others
    /// to their owner's mailbox, and takes its own from its mailbox; its SNAT
    /// allocators own only its share of the port blocks.
    pub fn with_handoff(mut self, worker: usize, handoff: Arc<Handoff<B>>) -> Self {
        if handoff.workers() > 1 && worker < handoff.workers() {
            self.handoff = Some((worker, handoff));
        }
        self
    }

    /// Answers flow requests from `control` as worker `worker`.
    pub fn with_control(mut self, worker: usize, control: Arc<FlowControl>) -> Self {
        self.control = Some((worker, control));
        self
    }

    /// Answers one pending flow request, if any.
    fn serve_control(&mut self) {
        let Some((worker, c)) = &self.control else {
            return;
        };
        let Some(req) = c.requests.pop() else { return };
        let mut flows = Vec::new();
        let mut backends = Vec::new();
        let matched = if req.backends {
            for l in &self.lb {
                backends.extend(l.backend_counts());
            }
            backends.len()
        } else if req.delete {
            self.flows.remove_where(|k, e| req.filter.matches(k, e))
        } else {
            let mut n = 0;
            for (k, e) in self.flows.iter() {
                if req.filter.matches(k, e) {
                    if flows.len() < req.limit {
                        flows.push(crate::flow::FlowInfo {
                            worker: *worker,
                            key: *k,
                            entry: *e,
                        });
                    }
                    n += 1;
                }
            }
            n
        };
        // The control thread waits for this reply; a full queue means it
        // gave up on earlier ones, which are stale.
        let _ = c.replies.force_push(FlowReply {
            id: req.id,
            flows,
            matched,
            occupancy: self.flows.len(),
            backends,
        });
    }

    /// The switch's counters.
    pub fn stats(&self) -> Arc<SwitchStats> {
        self.stats.clone()
    }

    /// Per-group rule hit counters (index = `Policy::nsgs` index); replaced
    /// (from zero) when a generation brings different groups, kept across
    /// generations that share them (health and weight changes).
    pub fn acl_hits(&self) -> Arc<ArcSwap<Vec<AclHits>>> {
        self.acl_hits.clone()
    }

    /// Flows cached.
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Drops `pkt`, counting `r` in the switch's counters (which name
    /// switch-level reasons; parse errors go to the worker's counters).
    fn drop_pkt(&self, pkt: B, r: SwitchDrop) {
        self.stats.count(r);
        drop(pkt);
    }

    fn on_new_generation(&mut self, p: &Policy) {
        self.generation = p.generation;
        while self.lb.len() < p.vnets.len() {
            // A vnet's SNAT layout is fixed when its core is created (ports
            // in use must not move); later snapshots only add members.
            let (me, workers) = self
                .handoff
                .as_ref()
                .map_or((0, 1), |(w, h)| (*w, h.workers()));
            let snat = p
                .vnets
                .get(self.lb.len())
                .and_then(|v| v.snat.clone())
                .and_then(|c| SnatAllocator::for_worker(c, me, workers).ok());
            self.lb.push(LbCore::new(
                self.cfg.conn_table_size,
                self.cfg.timeouts,
                snat,
            ));
        }
        for vm in &p.vms {
            if let Some(snat) = self.lb.get_mut(vm.vnet).and_then(|l| l.snat_mut()) {
                for ip in &vm.ips {
                    // A VM without blocks is refused per connection
                    // (counted as `snat_not_member`).
                    let _ = snat.add_member(*ip);
                }
            }
        }
        // Rule hit counters survive generations that keep the same groups
        // (health and weight changes); new groups start from zero.
        if !self
            .counted_nsgs
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(n, &p.nsgs))
        {
            let hits: Vec<AclHits> = p
                .nsgs
                .iter()
                .map(|n| [n.inbound.new_counters(), n.outbound.new_counters()])
                .collect();
            self.hits = Arc::new(hits);
            self.acl_hits.store(self.hits.clone());
            self.counted_nsgs = Some(p.nsgs.clone());
        }
    }

    fn acl(
        &self,
        p: &Policy,
        nsg: Option<usize>,
        dir: Direction,
        key: &ConnKey,
    ) -> Result<bool, SwitchDrop> {
        let Some(n) = nsg.and_then(|i| p.nsgs.get(i).map(|c| (i, c))) else {
            return Ok(true);
        };
        let pk = PacketKey {
            src: key.src_ip(),
            dst: key.dst_ip(),
            proto: key.proto,
            src_port: key.sport,
            dst_port: key.dport,
        };
        let hits = &self.hits;
        let c = n.1.classifier(dir);
        let v = match hits.get(n.0) {
            Some(h) => c.classify_counted(&pk, &h[if dir == Direction::In { 0 } else { 1 }]),
            None => c.classify(&pk),
        };
        match v {
            Some(v) if v.action == Action::Allow => Ok(v.stateful),
            _ => Err(SwitchDrop::AclDeny),
        }
    }

    fn slow(
        &mut self,
        p: &Policy,
        frame: &mut [u8],
        pk: &Parsed,
        in_port: u16,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        if let Some(up) = p.uplink.as_ref().filter(|u| u.port == in_port) {
            return self.slow_uplink(p, up, frame, pk, now);
        }
        let (_, vm) = p.vm_on_port(in_port).ok_or(SwitchDrop::NoVm)?;
        let vnet = p.vnets.get(vm.vnet).ok_or(SwitchDrop::NoRoute)?;
        if frame.get(6..12) != Some(&vm.mac.0[..]) {
            return Err(SwitchDrop::Spoofed);
        }
        match pk.l3 {
            L3::Arp => {
                return self.arp(p, vm, frame, pk).map(|_| Slow::Reply);
            }
            L3::Ipv4 | L3::Ipv6 => {}
            L3::Other => return Err(SwitchDrop::Unsupported),
        }
        if rewrite::is_icmpv6_link_control(frame, pk) {
            return self.nd(p, vm, frame, pk);
        }
        if !vm.ips.contains(&pk.key.src()) {
            return Err(SwitchDrop::Spoofed);
        }
        let key = ConnKey::from(&pk.key);
        if rewrite::is_echo_request(frame, pk) && vnet.vips.has_address(pk.key.dst()) {
            // A VIP answers ping itself, if the VM's security group lets
            // the request out.
            self.acl(p, vm.nsg, Direction::Out, &key)?;
            rewrite::icmp_echo_reply(frame, pk, vnet.gateway_mac)
                .map_err(|_| SwitchDrop::RewriteFailed)?;
            self.stats.icmp_replies.fetch_add(1, Ordering::Relaxed);
            return Ok(Slow::Reply);
        }
        let flags = tcp_flags(frame, pk);
        let d = self
            .lb
            .get_mut(vm.vnet)
            .map(|l| l.process(&vnet.vips, &key, flags, now));
        let (mut nat, mut lb, mut post, reply) = match lb_step(d, vm.vnet, &key)? {
            Some(s) => (s.nat, Some(s.lb), s.post, s.reply),
            None => (Rewrite::NONE, None, key, false),
        };
        // Routing: inside the vnet to a VM of the *same* vnet (tenant
        // isolation), outside it through the uplink, with SNAT when the vnet
        // has it.
        let hop = match p.vm_by_addr(vm.vnet, post.dst) {
            Some((_, dst)) => Hop::Vm(dst),
            None => {
                let up = p
                    .uplink
                    .as_ref()
                    .filter(|_| !vnet.contains(&post.dst_ip()))
                    .ok_or(SwitchDrop::NoRoute)?;
                if lb.is_none() && vnet.snat.is_some() {
                    let d = self
                        .lb
                        .get_mut(vm.vnet)
                        .map(|l| l.process_snat(&key, flags, now));
                    if let Some(s) = lb_step(d, vm.vnet, &key)? {
                        (nat, lb, post) = (s.nat, Some(s.lb), s.post);
                    }
                }
                Hop::Uplink(up)
            }
        };
        let stateful = if reply {
            // Return traffic of a tracked load-balanced connection.
            true
        } else {
            let out = self.acl(p, vm.nsg, Direction::Out, &key)?;
            let inn = match hop {
                Hop::Vm(dst) => self.acl(p, dst.nsg, Direction::In, &post)?,
                Hop::Uplink(_) => true,
            };
            out && inn
        };
        let fwd = match hop {
            Hop::Vm(dst) => FlowAction::to_vm(dst, vnet.gateway_mac, nat, lb),
            Hop::Uplink(up) => FlowAction::to_uplink(up, nat, lb),
        };
        // The other direction arrives on the output port with the post-NAT
        // addresses swapped and goes back to this VM.
        let back = FlowAction {
            out_port: in_port,
            src_mac: vnet.gateway_mac,
            dst_mac: vm.mac,
            ..fwd
        };
        // The first packet takes the compiled action too.
        Ok(Slow::Forward(
            self.install(p, now, pk.key, fwd, &post, back, stateful),
        ))
    }

    /// The slow path of a packet from the wire: ARP and ping for the public
    /// addresses, replies of SNAT connections, new connections to a VIP
    /// outside its vnet. Nothing else enters a vnet from outside.
    fn slow_uplink(
        &mut self,
        p: &Policy,
        up: &UplinkDef,
        frame: &mut [u8],
        pk: &Parsed,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        match pk.l3 {
            L3::Arp => {
                let l3 = frame
                    .get(usize::from(pk.l3_off)..)
                    .ok_or(SwitchDrop::ArpIgnored)?;
                let a = arp::Packet::new_checked(l3).map_err(|_| SwitchDrop::ArpIgnored)?;
                let target = dataplane::parse::to16(std::net::IpAddr::V4(a.target_ip()));
                if a.operation() != arp::OP_REQUEST || p.vnet_by_public(target).is_none() {
                    return Err(SwitchDrop::ArpIgnored);
                }
                rewrite::arp_reply(frame, pk, up.mac).map_err(|_| SwitchDrop::RewriteFailed)?;
                self.stats.arp_replies.fetch_add(1, Ordering::Relaxed);
                return Ok(Slow::Reply);
            }
            L3::Ipv4 | L3::Ipv6 => {}
            L3::Other => return Err(SwitchDrop::Unsupported),
        }
        let vn = p.vnet_by_public(pk.key.dst_ip).ok_or(SwitchDrop::NoRoute)?;
        let vnet = p.vnets.get(vn).ok_or(SwitchDrop::NoRoute)?;
        if rewrite::is_echo_request(frame, pk) {
            rewrite::icmp_echo_reply(frame, pk, up.mac).map_err(|_| SwitchDrop::RewriteFailed)?;
            self.stats.icmp_replies.fetch_add(1, Ordering::Relaxed);
            return Ok(Slow::Reply);
        }
        let key = ConnKey::from(&pk.key);
        let flags = tcp_flags(frame, pk);
        let d = self
            .lb
            .get_mut(vn)
            .map(|l| l.process(&vnet.vips, &key, flags, now));
        let LbStep {
            nat,
            lb,
            post,
            reply,
        } = lb_step(d, vn, &key)?.ok_or(SwitchDrop::NoRoute)?;
        let lb = Some(lb);
        let (_, dst) = p.vm_by_addr(vn, post.dst).ok_or(SwitchDrop::NoRoute)?;
        let stateful = reply || self.acl(p, dst.nsg, Direction::In, &post)?;
        let fwd = FlowAction::to_vm(dst, vnet.gateway_mac, nat, lb);
        let back = FlowAction::to_uplink(up, nat, lb);
        // The first packet takes the compiled action too.
        Ok(Slow::Forward(
            self.install(p, now, pk.key, fwd, &post, back, stateful),
        ))
    }

    /// Installs `fwd` for `key`, and — for a stateful allow or a tracked
    /// connection — `back` (its ports and MACs; the NAT is derived here) for
    /// the reverse of `post` arriving on `fwd`'s output port. Returns `fwd`
    /// compiled for `key`.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        p: &Policy,
        now: u64,
        key: FlowKey,
        fwd: FlowAction,
        post: &ConnKey,
        back: FlowAction,
        stateful: bool,
    ) -> FlowAction {
        let gen_ = p.generation;
        // The VIP of the connection, if load-balanced, and its epoch as this
        // worker last read it (never newer than what decided the
        // connection: at worst the flow is revalidated once more).
        let (vip, vip_epoch) = fwd
            .lb
            .and_then(|(vn, conn, _)| {
                let c = self.lb.get(vn as usize)?.conns().get(conn)?;
                match &c.value.kind {
                    lb::balancer::ConnKind::Dnat { vip, .. } => Some(vip.id()),
                    _ => None,
                }
            })
            .and_then(|id| Some((id, *self.vip_epochs.get(usize::from(id))?)))
            .unwrap_or((NO_VIP, 0));
        let e = |action| FlowEntry {
            action,
            generation: gen_,
            vip,
            vip_epoch,
            last_seen: now,
            lb_touched: now,
            packets: 0,
            bytes: 0,
            closing: false,
        };
        let fwd = fwd.compiled_for(&key);
        if self.flows.insert(key, e(fwd)) == crate::flow::Insert::New {
            self.stats.flows_installed.fetch_add(1, Ordering::Relaxed);
        }
        if !stateful && fwd.lb.is_none() {
            return fwd;
        }
        // The reverse direction gets the opposite rewrite of the connection.
        let (nat, lb) = match fwd.lb {
            Some((vn, conn, dir)) => {
                let nat = self
                    .lb
                    .get(vn as usize)
                    .and_then(|l| l.conns().get(conn))
                    .map(|c| {
                        if dir == Dir::Orig {
                            c.value.nat.reverse
                        } else {
                            c.value.nat.forward
                        }
                    })
                    .unwrap_or_default();
                let other = if dir == Dir::Orig {
                    Dir::Reply
                } else {
                    Dir::Orig
                };
                (nat, Some((vn, conn, other)))
            }
            None => (Rewrite::NONE, None),
        };
        let back_key = flow_key(&post.reversed(), fwd.out_port);
        let back = FlowAction { nat, lb, ..back }.compiled_for(&back_key);
        if self.flows.insert(back_key, e(back)) == crate::flow::Insert::New {
            self.stats.flows_installed.fetch_add(1, Ordering::Relaxed);
        }
        fwd
    }

    /// Answers an ARP request for any address of the vnet or any of its VIPs
    /// (any address at all for an internal endpoint) with the gateway MAC,
    /// rewriting the request into the reply in place.
    fn arp(
        &self,
        p: &Policy,
        vm: &crate::policy::Vm,
        frame: &mut [u8],
        pk: &Parsed,
    ) -> Result<(), SwitchDrop> {
        let (ips, internal) = (&vm.ips, vm.internal);
        let vn = p.vnets.get(vm.vnet).ok_or(SwitchDrop::NoRoute)?;
        let l3 = frame
            .get(usize::from(pk.l3_off)..)
            .ok_or(SwitchDrop::ArpIgnored)?;
        let a = arp::Packet::new_checked(l3).map_err(|_| SwitchDrop::ArpIgnored)?;
        if a.operation() != arp::OP_REQUEST {
            return Err(SwitchDrop::ArpIgnored);
        }
        if !ips.contains(&std::net::IpAddr::V4(a.sender_ip())) {
            return Err(SwitchDrop::Spoofed);
        }
        let target = std::net::IpAddr::V4(a.target_ip());
        if !internal && !vn.contains(&target) && !vn.vips.has_address(target) {
            return Err(SwitchDrop::ArpIgnored);
        }
        rewrite::arp_reply(frame, pk, vn.gateway_mac).map_err(|_| SwitchDrop::RewriteFailed)?;
        self.stats.arp_replies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// IPv6's ARP: a neighbour solicitation from a VM for any address of its
    /// vnet, a VIP, or a link-local address (the gateway) is answered with
    /// the gateway MAC (any target for an internal endpoint). Duplicate
    /// address detection (source `::`) is never answered, so a VM's own
    /// address is never claimed.
    fn nd(
        &self,
        p: &Policy,
        vm: &crate::policy::Vm,
        frame: &[u8],
        pk: &Parsed,
    ) -> Result<Slow, SwitchDrop> {
        let vn = p.vnets.get(vm.vnet).ok_or(SwitchDrop::NoRoute)?;
        let (target, src) = rewrite::nd_solicitation(frame, pk).ok_or(SwitchDrop::NdIgnored)?;
        let link_local = |a: &[u8; 16]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
        if src == [0; 16] {
            return Err(SwitchDrop::NdIgnored);
        }
        if !link_local(&src) && !vm.ips.contains(&dataplane::parse::from16(src)) {
            return Err(SwitchDrop::Spoofed);
        }
        let t = dataplane::parse::from16(target);
        if vm.internal || link_local(&target) || vn.contains(&t) || vn.vips.has_address(t) {
            Ok(Slow::Advert(vn.gateway_mac))
        } else {
            Err(SwitchDrop::NdIgnored)
        }
    }
}

impl<B: PacketBuf> Switch<B> {
    /// One packet received on `in_port`; `owned` when placement already
    /// chose this worker (a packet from the mailbox).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn packet(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        in_port: usize,
        mut pkt: B,
        now: u64,
        owned: bool,
        tally: &mut (u64, u64, u64),
        pre: Option<Pre<'_>>,
    ) {
        let in_port16 = in_port as u16;
        let parsed;
        // By reference: copying the parsed headers costs more than using them.
        let (pk, hash, hint): (&Parsed, u64, _) = match pre {
            Some(p) => p,
            None => match parse(pkt.data(), in_port16) {
                Ok(p) => {
                    parsed = p;
                    (&parsed, self.flows.hash(&parsed.key), None)
                }
                Err(e) => {
                    ctx.drop_packet(pkt, DropReason::Malformed(e));
                    return;
                }
            },
        };
        let flags = tcp_flags(pkt.data(), pk);
        let len = pkt.len() as u64;
        if let Some(e) = self.flows.entry_for(hint, hash, &pk.key) {
            // A fresh SYN on a closing flow may open a new connection on a
            // reused port: the slow path (the load balancer) decides.
            let reopen = flags & (TCP_SYN | TCP_ACK) == TCP_SYN && e.closing;
            // Decided under this policy and, for a flow of a VIP, under
            // that VIP's current backend set (health changes elsewhere
            // leave it alone).
            let current = e.generation == policy.generation
                && (e.vip == NO_VIP
                    || self.vip_epochs.get(usize::from(e.vip)) == Some(&e.vip_epoch));
            if current && !reopen {
                e.last_seen = now;
                e.packets += 1;
                e.bytes += len;
                let closing = flags & (TCP_FIN | TCP_RST | TCP_SYN) != 0;
                if flags & (TCP_FIN | TCP_RST) != 0 {
                    e.closing = true;
                }
                // Keep the load balancer's connection state current: at
                // once for SYN/FIN/RST, otherwise at most every
                // `lb_touch_ns` (a quarter of its shortest timeout, so a
                // connection in use never times out there; touching it per
                // packet costs several cache misses: it moves the
                // connection in its LRU list). The time is checked first:
                // `lb` lies in the slot's third cache line, which a hit
                // otherwise does not read.
                if closing || now.saturating_sub(e.lb_touched) > self.lb_touch_ns {
                    e.lb_touched = now;
                    if let Some((vn, conn, dir)) = e.action.lb {
                        let key = ConnKey::from(&pk.key);
                        let told = self
                            .lb
                            .get_mut(vn as usize)
                            .and_then(|l| l.touch(conn, &key, dir, flags, now));
                        if told.is_none() {
                            // The load balancer has forgotten the connection
                            // (it timed out there): the flow keeps its
                            // backend, but must not touch whatever
                            // connection now has that slot.
                            e.action.lb = None;
                        }
                    }
                }
                tally.0 += 1;
                // The action is used in place (no copy of it per packet).
                transpose(&self.stats, ctx, pkt, pk, &e.action);
                return;
            }
        }
        // Not in this worker's table: only the connection's owner may decide
        // it (a hit needs no placement: only the owner installs flows).
        if !owned && pk.is_ip() {
            if let Some((me, h)) = &self.handoff {
                let w = crate::placement::owner(policy, &pk.key, h.workers());
                if w != *me {
                    match h.queues.get(w).map(|q| q.push((in_port16, pkt))) {
                        Some(Ok(())) => tally.2 += 1,
                        Some(Err((_, pkt))) => self.drop_pkt(pkt, SwitchDrop::HandoffFull),
                        None => {}
                    }
                    return;
                }
            }
        }
        tally.1 += 1;
        match self.slow(policy, pkt.data_mut(), pk, in_port16, now) {
            Ok(Slow::Reply) => ctx.send(in_port, pkt),
            Ok(Slow::Advert(mac)) => match rewrite::neighbor_advert(&mut pkt, pk, mac) {
                Ok(()) => {
                    self.stats.nd_replies.fetch_add(1, Ordering::Relaxed);
                    ctx.send(in_port, pkt)
                }
                Err(_) => self.drop_pkt(pkt, SwitchDrop::RewriteFailed),
            },
            Ok(Slow::Forward(a)) => transpose(&self.stats, ctx, pkt, pk, &a),
            Err(r) => self.drop_pkt(pkt, r),
        }
    }

    /// The policy for this burst (noticing a new generation) and the time.
    #[inline]
    fn begin(&mut self, ctx: &Ctx<'_, B>) -> (Arc<Policy>, u64) {
        let policy = self.policy.load_full();
        let fresh = policy.generation != self.generation;
        if fresh {
            self.on_new_generation(&policy);
        }
        // A new snapshot has new VIPs (and its own clock).
        let health = policy.health_changes();
        if fresh || health != self.health_seen {
            self.health_seen = health;
            self.vip_epochs.clear();
            self.vip_epochs
                .extend(policy.vips().iter().map(|v| v.epoch() as u16));
        }
        (policy, self.clock.ticks_to_ns(ctx.now()))
    }

    /// Counters once per burst, not per packet; periodic expiry.
    #[inline]
    fn end(&mut self, now: u64, (fast, slow, handed): (u64, u64, u64)) {
        if fast > 0 {
            self.stats.fast_path.fetch_add(fast, Ordering::Relaxed);
        }
        if slow > 0 {
            self.stats.slow_path.fetch_add(slow, Ordering::Relaxed);
        }
        if handed > 0 {
            self.stats.handed_off.fetch_add(handed, Ordering::Relaxed);
        }
        // Flow expiry a little every millisecond, in proportion to the time
        // since the last step, so the whole table is swept about once a
        // second (entries expire at most about a second late).
        let since = now.saturating_sub(self.last_sweep);
        if since > 1_000_000 {
            self.last_sweep = now;
            let share = self.flows.slots() as u128 * u128::from(since.min(1_000_000_000));
            let budget = (share / 1_000_000_000) as usize;
            self.flows.expire_some(now, budget.max(64));
        }
        if now.saturating_sub(self.last_expire) > 100_000_000 {
            self.last_expire = now;
            self.stats
                .flows
                .store(self.flows.len() as u64, Ordering::Relaxed);
            for l in &mut self.lb {
                l.expire(now, 4096);
            }
        }
    }
}

impl<B: PacketBuf> Pipeline<B> for Switch<B> {
    fn process(&mut self, ctx: &mut Ctx<'_, B>, in_port: usize, pkts: &mut Batch<B>) {
        let (policy, now) = self.begin(ctx);
        let mut tally = (0, 0, 0);
        // The burst in stages, so that the cache misses of its lookups
        // overlap instead of following one another, and no stage reads
        // what the one before has only just written (store forwarding
        // stalls): parse every packet in place; hash every key and load its
        // bucket; search the index for all of them (the bucket and slot
        // loads of one packet do not wait for the previous one); then
        // process each packet.
        const N: usize = dataplane::BURST;
        let in16 = in_port as u16;
        let n = pkts.len();
        let mut parsed = [Parsed::default(); N];
        let mut status = [Ok(()); N];
        let mut hash = [0u64; N];
        let mut hint = [None; N];
        for ((pkt, p), st) in pkts.iter().zip(parsed.iter_mut()).zip(status.iter_mut()) {
            *st = parse_into(pkt.data(), in16, p);
        }
        let mut touched = 0;
        for (h, p) in hash.iter_mut().zip(parsed.iter()).take(n) {
            *h = self.flows.hash(&p.key);
            touched ^= self.flows.touch(*h);
        }
        std::hint::black_box(touched);
        for (((r, p), h), st) in hint
            .iter_mut()
            .zip(parsed.iter())
            .zip(hash.iter())
            .zip(status.iter())
            .take(n)
        {
            *r = match st {
                Ok(()) => self.flows.find(*h, &p.key),
                Err(_) => None,
            };
        }
        for (i, pkt) in pkts.drain().enumerate() {
            let (Some(p), Some(h), Some(r), Some(st)) =
                (parsed.get(i), hash.get(i), hint.get(i), status.get(i))
            else {
                break;
            };
            match st {
                Ok(()) => self.packet(
                    ctx,
                    &policy,
                    in_port,
                    pkt,
                    now,
                    false,
                    &mut tally,
                    Some((p, *h, *r)),
                ),
                Err(e) => ctx.drop_packet(pkt, DropReason::Malformed(*e)),
            }
        }
        self.end(now, tally);
    }

    fn poll(&mut self, ctx: &mut Ctx<'_, B>) -> usize {
        if self
            .control
            .as_ref()
            .is_some_and(|(_, c)| !c.requests.is_empty())
        {
            self.serve_control();
        }
        // The common case, an empty mailbox, costs one load and no
        // reference counting.
        let busy = self
            .handoff
            .as_ref()
            .is_some_and(|(me, h)| h.queues.get(*me).is_some_and(|q| !q.is_empty()));
        let (true, Some((me, h))) = (busy, self.handoff.clone()) else {
            return 0;
        };
        let Some(q) = h.queues.get(me) else { return 0 };
        let (policy, now) = self.begin(ctx);
        let mut tally = (0, 0, 0);
        let mut n = 0;
        while n < 2 * dataplane::BURST {
            let Some((in_port, pkt)) = q.pop() else { break };
            self.packet(
                ctx,
                &policy,
                usize::from(in_port),
                pkt,
                now,
                true,
                &mut tally,
                None,
            );
            n += 1;
        }
        self.end(now, tally);
        n
    }
}
