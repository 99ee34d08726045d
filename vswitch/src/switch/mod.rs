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
//!
//! The modules, in the order a packet meets them: this one (the burst in
//! stages, the flow-table hit, the hand-off), `fast` (the cached action
//! applied), `slow` (the layers of a miss), `respond` (ARP and neighbour
//! discovery), `install` (both directions cached); beside them `stats`
//! (drop reasons and counters), `handoff` (the workers' mailboxes),
//! `requests` (flow queries from the control thread) and `trace` (a
//! packet's decisions, layer by layer, on a scratch switch).

use crate::flow::{FlowTable, HAIRPIN_PORT};
use crate::frag::{FragHold, FragTable};
use crate::policy::{NO_VIP, Policy};
use arc_swap::{ArcSwap, Cache};
use dataplane::clock::TscClock;
use dataplane::worker::{Ctx, Pipeline};
use dataplane::{Batch, DropReason, L3, PacketBuf, Parsed, parse, parse_into, rewrite, synproxy};
use lb::balancer::LbCore;
use lb::conntrack::Timeouts;
use lb::snat::SnatAllocator;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

mod fast;
mod handoff;
pub mod handover;
mod install;
mod overlay;
mod park;
mod requests;
mod respond;
mod slow;
mod stats;
mod trace;

use fast::{Bounce, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, tcp_flags, transpose};
pub use handoff::Handoff;
pub use park::PARK_SLOTS;
use park::Parked;
pub use requests::{FlowControl, FlowReply, FlowRequest};
use slow::Slow;
pub use stats::{AclHits, SwitchDrop, SwitchStats};
pub use trace::{LiveEnd, LiveRecord, LiveTrace, Trace, TraceEnd, TraceStep};

/// The slow path's runs, for the cycle accounting
/// (`SwitchStats::slow_path_ticks`): from a slow-path decision to the next
/// packet that is a hit or is handed to another worker, or to the burst's
/// end (`Switch::end`), the ticks are the slow path's, the sending of what
/// it decided included. A burst's packets that missed are decided after
/// its hits have left, one after another, so a burst of new connections
/// reads the clock twice, where a pair of reads around each decision cost
/// a new connection several percent (a read costs tens of cycles). Under a
/// live trace a burst goes in its order, and the hits after a slow-path
/// packet of it count with the slow path, the traced packet's record
/// excepted: ending the run at those hits too, in the burst's loop, cost
/// every burst of new connections about 4% of their rate.
#[derive(Debug, Default)]
struct SlowRun {
    /// The clock when the current run began.
    since: Option<u64>,
    /// Ticks of the runs closed since the burst's end.
    ticks: u64,
}

impl SlowRun {
    /// A slow-path decision starts: a run, unless one is open.
    #[inline]
    fn open(&mut self, clock: &TscClock) {
        if self.since.is_none() {
            self.since = Some(clock.now());
        }
    }

    /// Ends the current run, if one is open.
    #[inline]
    fn close(&mut self, clock: &TscClock) {
        if let Some(t) = self.since.take() {
            self.ticks += clock.now().wrapping_sub(t);
        }
    }
}

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
    /// The MTU of each port, by port number: larger IP packets are not
    /// sent there (ports beyond the list have no limit).
    pub port_mtu: Vec<u16>,
    /// Fragmented datagrams remembered (first fragment's flow key).
    pub frag_table_size: usize,
    /// How long a first fragment is remembered for its later fragments.
    pub frag_timeout: Duration,
    /// Later fragments held at most, waiting for their first
    /// ([`crate::frag::FragHold`]; 0: none, such a fragment is dropped).
    pub frag_hold: usize,
    /// How long a later fragment waits for its first.
    pub frag_hold_time: Duration,
    /// The SYN cookies' secret: every worker's switch must have the same
    /// (clones of one configuration do).
    pub syn_cookies: lb::syncookie::SynCookies,
    /// Commit the tables' memory when the switch starts
    /// ([`Switch::preallocate`]), not as the dataplane first writes it.
    pub preallocate: bool,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            flow_table_size: 1 << 20,
            flow_idle: Duration::from_secs(240),
            flow_closing: Duration::from_secs(10),
            conn_table_size: 1 << 18,
            timeouts: Timeouts::default(),
            port_mtu: Vec::new(),
            frag_table_size: 4096,
            frag_timeout: Duration::from_secs(5),
            frag_hold: 256,
            frag_hold_time: Duration::from_millis(100),
            syn_cookies: lb::syncookie::SynCookies::new(),
            preallocate: false,
        }
    }
}

/// ICMP errors one worker sends at most, a second, to VMs and again to the
/// wire (each has its bucket; as Linux's `icmp_msgs_per_sec`), after a
/// burst of `ICMP_ERROR_BURST`.
pub const ICMP_ERRORS_PER_SEC: u64 = 1000;
/// The burst of ICMP errors a worker may send at once.
pub const ICMP_ERROR_BURST: u64 = 50;

/// One worker's switch.
pub struct Switch<B = dataplane::pool::PoolBuf> {
    policy: Arc<ArcSwap<Policy>>,
    /// The policy as a burst last read it, checked at each burst against
    /// `policy` with one plain load of its pointer, and read again only
    /// when it changed (`ArcSwap::load_full` at every burst would take a
    /// debt and a reference, locked instructions on lines that every
    /// worker and the control thread share). Taken out for a burst, as
    /// `scratch` is, and put back at its end. It keeps the snapshot it
    /// last read alive until a burst finds a newer one.
    current: Option<PolicyCache>,
    cfg: SwitchConfig,
    flows: FlowTable,
    /// First fragments' flow keys, for the later fragments.
    frags: FragTable,
    /// Later fragments waiting for their first.
    frag_hold: FragHold<B>,
    /// Held fragments whose first just came, with their input port and
    /// whether they were handed over: they go through the switch again
    /// right after it, before the next packet it decides (at most what
    /// the hold has, for which room is reserved up front).
    frag_released: std::collections::VecDeque<(u16, bool, B)>,
    /// The ICMP-error token buckets (errors to VMs, errors to the wire),
    /// each as the time its tokens start from.
    icmp_bucket: [u64; 2],
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
    /// The security groups' verdicts by masked key (the slow path's
    /// classifications go through it).
    verdicts: std::cell::RefCell<filter::VerdictCache>,
    stats: Arc<SwitchStats>,
    clock: TscClock,
    /// The slow path's runs, for the cycle accounting.
    slow_run: SlowRun,
    /// The Maglev flow hash the burst's stages computed for the packet
    /// about to enter [`Switch::packet`] (`LbCore::prefetch_pick`: a miss
    /// to a VIP), with its key: the slow path hands it to the load
    /// balancer only for a packet of that key.
    pick_hash: Option<(dataplane::FlowKey, lb::PickHash)>,
    last_expire: u64,
    last_sweep: u64,
    /// How long a flow's hits go untold to its load-balancer connection.
    lb_touch_ns: u64,
    /// This worker's index and the shared mailboxes, with several workers.
    handoff: Option<(usize, Arc<Handoff<B>>)>,
    /// The control thread's mailbox to this worker, and the worker's index.
    control: Option<(usize, Arc<FlowControl>)>,
    /// Data from clients of SYN-proxied connections whose backends have
    /// not answered yet ([`PARK_SLOTS`] places; the oldest goes when all
    /// are taken).
    parked: Vec<Option<Parked<B>>>,
    /// Hairpinned packets waiting to go through the switch again, as from
    /// the wire (at most [`HAIRPIN_QUEUE`]; room reserved up front).
    looped: std::collections::VecDeque<B>,
    /// The burst's per-packet arrays ([`BurstScratch`]), kept between
    /// bursts; taken out while a burst is processed.
    scratch: Option<Box<BurstScratch>>,
    /// The mailboxes of the control thread's neighbour cache.
    neigh: Option<Arc<crate::neigh::NeighMail>>,
    /// Where worker 0 takes the buffers of the ARP requests it sends.
    alloc: Option<Alloc<B>>,
    /// The largest IP packet a tunnel carries: the uplink's MTU less the
    /// tunnel's headers.
    tunnel_mtu: Option<u16>,
    /// The layers' notes while a trace is being taken (`None` otherwise:
    /// [`Switch::trace`]).
    trace: std::cell::RefCell<Option<Vec<TraceStep>>>,
    /// This worker's index and the live trace it serves, if any.
    live: Option<(usize, Arc<LiveTrace>)>,
    /// True while a live-traced packet goes through (a flow hit notes
    /// itself then).
    tracing: bool,
    /// Where the live-traced packet went.
    live_end: std::cell::Cell<Option<LiveEnd>>,
    /// Where flows and denied first packets are recorded, when it is on.
    flow_log: Option<Arc<crate::flowlog::FlowLog>>,
    /// The rules the slow path's security groups decided the packet by
    /// (the source's outbound, the destination's inbound), and the key the
    /// denying one was asked about: for the flows installed and the flow
    /// log's denied records.
    decided: crate::flowlog::DecidedCell,
    /// The IP length of the packet on the slow path: its flow counts it.
    first_len: u64,
    /// The input port and flow hash of the packet on the slow path, set
    /// by [`Switch::packet`] for its `slow` call alone: the forward flow
    /// installed in that call is that packet's (every install is of the
    /// key `slow` was given), and takes the hash instead of hashing again;
    /// and whether the lookup found the key absent (no flow at all, rather
    /// than a stale one), which spares the install a second search.
    first_hash: Option<(u16, u64, bool)>,
    /// [`Switch::preallocate`] has run.
    preallocated: bool,
    /// The token bucket of denied packets' records (a time, as
    /// `icmp_bucket`).
    deny_bucket: u64,
}

/// Takes one token from `bucket`, refilled at `per_sec` a second up to
/// `burst`; false when it is empty. The bucket is a time (ns): its tokens
/// are what lies between it and `now`.
fn take_token(bucket: &mut u64, now: u64, per_sec: u64, burst: u64) -> bool {
    let per = 1_000_000_000 / per_sec.max(1);
    let floor = now.saturating_sub(burst * per);
    if *bucket < floor {
        *bucket = floor;
    }
    if *bucket + per > now {
        return false;
    }
    *bucket += per;
    true
}

/// A source of empty buffers for packets the switch makes itself (ARP
/// requests), not per packet forwarded.
pub type Alloc<B> = Box<dyn FnMut() -> Option<B> + Send>;

/// Hairpinned packets a worker holds between bursts at most (more are
/// dropped as `hairpin_full`).
pub const HAIRPIN_QUEUE: usize = 2 * dataplane::BURST;

/// A packet parsed and looked up ahead of its turn in the burst: headers,
/// flow hash, and the flow found then (see [`FlowTable::entry_for`]).
type Pre<'a> = (&'a Parsed, u64, Option<crate::flow::FlowRef>);

/// The policy a switch holds between bursts ([`Switch::current`]).
type PolicyCache = Cache<Arc<ArcSwap<Policy>>, Arc<Policy>>;

/// What the stages of a burst ([`Switch::process`]) note of each packet,
/// by its place in the burst. Kept by the switch between bursts, so that a
/// burst does not initialise some 3 KiB of arrays on the stack first (about
/// 330 instructions, a fixed cost of each burst that small bursts pay per
/// packet many times over): each stage writes a packet's entry before any
/// later one reads it (decapsulation's port and refusal, which it may leave
/// unwritten, are reset for the burst's packets first).
struct BurstScratch {
    /// Each frame parsed. For a frame that did not parse, as far as the
    /// parse got, or an earlier burst's frame: only the hash stage reads
    /// it then (its hash and prefetch are wasted, never used).
    parsed: [Parsed; dataplane::BURST],
    /// Whether it parsed.
    status: [Result<(), dataplane::ParseError>; dataplane::BURST],
    /// Its flow-table hash.
    hash: [u64; dataplane::BURST],
    /// Its flow, if cached.
    hint: [Option<crate::flow::FlowRef>; dataplane::BURST],
    /// The port it counts as arriving on (a tunnel's, out of its tunnel).
    ports: [u16; dataplane::BURST],
    /// Why decapsulation refused it, if it did.
    refused: [Option<SwitchDrop>; dataplane::BURST],
    /// Its candidate slot in the flow table.
    slot: [u32; dataplane::BURST],
    /// For a miss: the vnet that decides it.
    vnets: [Option<u16>; dataplane::BURST],
    /// For a miss to a VIP: its Maglev hash.
    pick: [Option<lb::PickHash>; dataplane::BURST],
    /// The packets that wait for the rest of the burst: their places.
    later_at: [u8; dataplane::BURST],
    /// And their hashes.
    later_hash: [u64; dataplane::BURST],
}

impl Default for BurstScratch {
    fn default() -> Self {
        const N: usize = dataplane::BURST;
        BurstScratch {
            parsed: [Parsed::default(); N],
            status: [Ok(()); N],
            hash: [0; N],
            hint: [None; N],
            ports: [0; N],
            refused: [None; N],
            slot: [crate::flow::NO_SLOT; N],
            vnets: [None; N],
            pick: [None; N],
            later_at: [0; N],
            later_hash: [0; N],
        }
    }
}

/// The vnet whose load balancer the burst's stages load ahead for a
/// packet with key `key` that missed the flow table on `port`: a VM's (or
/// remote endpoint's) own, or for a packet from the uplink (not out of a
/// tunnel) the vnet of the public address it is sent to (a VIP's, a SNAT
/// address's), whose VIPs and SNAT decide it in the slow path. (An ICMP
/// error from the wire goes to the vnet tracking the connection it
/// quotes, which may differ: the loads are then only wasted.)
#[inline(always)]
fn lb_vnet(policy: &Policy, port: u16, key: &dataplane::FlowKey) -> Option<usize> {
    match policy.vm_on_port(port) {
        Some((_, vm)) => Some(vm.vnet),
        None if policy.is_uplink(port) => policy.vnet_by_public(key.dst_ip),
        None => None,
    }
}

impl<B: PacketBuf> Switch<B> {
    /// A switch worker reading policy from `policy`.
    pub fn new(policy: Arc<ArcSwap<Policy>>, cfg: SwitchConfig) -> Self {
        let current = Some(Cache::new(policy.clone()));
        let flows = FlowTable::new(
            cfg.flow_table_size,
            cfg.flow_idle.as_nanos() as u64,
            cfg.flow_closing.as_nanos() as u64,
        );
        Switch {
            policy,
            current,
            flows,
            frags: FragTable::new(cfg.frag_table_size, cfg.frag_timeout.as_nanos() as u64),
            frag_hold: FragHold::new(cfg.frag_hold, cfg.frag_hold_time.as_nanos() as u64),
            frag_released: std::collections::VecDeque::with_capacity(cfg.frag_hold),
            icmp_bucket: [0; 2],
            lb: Vec::new(),
            generation: u64::MAX,
            health_seen: u64::MAX,
            vip_epochs: Vec::new(),
            acl_hits: Arc::new(ArcSwap::from_pointee(Vec::new())),
            hits: Arc::new(Vec::new()),
            counted_nsgs: None,
            verdicts: std::cell::RefCell::new(filter::VerdictCache::default()),
            stats: Arc::default(),
            clock: TscClock::process(),
            slow_run: SlowRun::default(),
            pick_hash: None,
            last_expire: 0,
            last_sweep: 0,
            lb_touch_ns: (cfg.timeouts.shortest() / 4).clamp(1_000_000, 10_000_000_000),
            handoff: None,
            control: None,
            parked: (0..PARK_SLOTS).map(|_| None).collect(),
            looped: std::collections::VecDeque::with_capacity(HAIRPIN_QUEUE),
            scratch: Some(Box::default()),
            neigh: None,
            alloc: None,
            tunnel_mtu: None,
            trace: std::cell::RefCell::new(None),
            live: None,
            tracing: false,
            live_end: std::cell::Cell::new(None),
            flow_log: None,
            decided: crate::flowlog::DecidedCell::default(),
            first_len: 0,
            first_hash: None,
            preallocated: false,
            deny_bucket: 0,
            cfg,
        }
    }

    /// Records every flow in the flow log (when it is on): its worker
    /// stopped for good. `between` runs every few thousand flows, to take
    /// the records out before the log's queue fills.
    pub fn flush_flow_log(&mut self, between: impl FnMut()) {
        let now = self.clock.ticks_to_ns(self.clock.now());
        self.flows.report_all(now, between);
    }

    /// Records the flows that leave the table (and long flows every
    /// active timeout) and the first packets the security groups deny in
    /// `log`, while it is on.
    pub fn with_flow_log(mut self, log: Arc<crate::flowlog::FlowLog>) -> Self {
        self.flows.set_log(log.clone());
        self.flow_log = Some(log);
        self
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

    /// Tells the control thread's neighbour cache (`mail`) what the
    /// uplink's network says and what packets wait for; with `alloc`, this
    /// worker also sends the ARP requests the cache asks for (one worker
    /// does).
    pub fn with_underlay(
        mut self,
        mail: Arc<crate::neigh::NeighMail>,
        alloc: Option<Alloc<B>>,
    ) -> Self {
        self.neigh = Some(mail);
        self.alloc = alloc;
        self
    }

    /// Answers flow requests from `control` as worker `worker`.
    pub fn with_control(mut self, worker: usize, control: Arc<FlowControl>) -> Self {
        self.control = Some((worker, control));
        self
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

    /// A packet the switch cannot forward as it is. A VM's packet is
    /// answered from its vnet's gateway, and a packet from the wire to a
    /// public address of the switch from that address: with ICMP time
    /// exceeded when its
    /// TTL or hop limit ran out (what `traceroute` shows as the switch's
    /// hop), with "fragmentation needed" and the port's MTU when an IPv4
    /// packet is too big with "don't fragment" set, or "packet too big"
    /// for IPv6 (what path-MTU discovery learns from); at most
    /// `ICMP_ERRORS_PER_SEC` a second to VMs and as many to the wire, with
    /// bursts of `ICMP_ERROR_BURST`.
    /// The rest are dropped as `ttl_expired` or `too_big` (the switch does
    /// not fragment).
    #[cold]
    fn bounce(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        bounce: Bounce<B>,
        pk: &Parsed,
        now: u64,
    ) {
        let (mut pkt, why, mtu) = match bounce {
            Bounce::Ttl(p) => (p, SwitchDrop::TtlExpired, None),
            Bounce::TooBig(p, m) => (p, SwitchDrop::TooBig, Some(m)),
            Bounce::Hairpin(p) => return self.hairpin(p),
            Bounce::Tunnel(p, port) => {
                let sport = dataplane::tunnel::entropy_port(&pk.key);
                return self.encap_send(ctx, policy, port, p, sport);
            }
            Bounce::Failed(p, why) => return self.drop_pkt(p, why),
        };
        if self.icmp_error(policy, &mut pkt, pk, mtu, now) {
            self.live_note(LiveEnd::Back, "output", || {
                "answered with an ICMP error from the switch".into()
            });
            self.send_back(ctx, pk.in_port, pkt);
        } else {
            self.drop_pkt(pkt, why);
        }
    }

    /// Writes over `pkt` the ICMP error that answers it (time exceeded, or
    /// with `mtu` "fragmentation needed" or "packet too big"), if it is to
    /// be answered (see [`Switch::bounce`]); false if not.
    fn icmp_error(
        &mut self,
        policy: &Policy,
        pkt: &mut B,
        pk: &Parsed,
        mtu: Option<u16>,
        now: u64,
    ) -> bool {
        let v6 = pk.l3 == L3::Ipv6;
        if mtu.is_some() && !v6 && !rewrite::ipv4_dont_fragment(pkt.data(), pk) {
            // Fragmentable IPv4: dropped, not answered (the switch does not
            // fragment). IPv6 is never fragmented on the way: always told.
            return false;
        }
        // Nothing an error may not be sent about takes a token.
        if !rewrite::may_answer_with_error(pkt.data(), pk) {
            return false;
        }
        // From a VM: the vnet's gateway answers. From the wire, for a public
        // address of the switch (a VIP or an SNAT address): that address
        // answers, from the uplink's MAC (the switch has no address of its
        // own on the wire).
        let vm = policy.vm_on_port(pk.in_port);
        let wire = vm.is_none();
        let from = match vm {
            Some((_, vm)) => policy.vnets.get(vm.vnet).and_then(|v| {
                let ip = if v6 {
                    v.gateway_v6().map(IpAddr::V6)
                } else {
                    v.gateway_v4().map(IpAddr::V4)
                };
                Some((v.gateway_mac, ip?))
            }),
            None => policy
                .uplink
                .as_ref()
                .filter(|up| up.port == pk.in_port || pk.in_port == HAIRPIN_PORT)
                .filter(|_| policy.vnet_by_public(pk.key.dst_ip).is_some())
                .map(|up| (up.mac, pk.key.dst())),
        };
        let answered = from.is_some_and(|(mac, ip)| {
            self.icmp_budget(now, wire)
                && match (ip, mtu) {
                    (IpAddr::V4(ip), Some(m)) => {
                        rewrite::ipv4_frag_needed(pkt, pk, mac, ip, m).is_ok()
                    }
                    (IpAddr::V4(ip), None) => rewrite::ipv4_time_exceeded(pkt, pk, mac, ip).is_ok(),
                    (IpAddr::V6(ip), Some(m)) => {
                        rewrite::ipv6_packet_too_big(pkt, pk, mac, ip, m).is_ok()
                    }
                    (IpAddr::V6(ip), None) => rewrite::ipv6_time_exceeded(pkt, pk, mac, ip).is_ok(),
                }
        });
        if answered {
            dataplane::stats::add_own(&self.stats.icmp_errors, 1);
        }
        answered
    }

    /// Queues a hairpinned packet to go through the switch again, as from
    /// the wire (on [`HAIRPIN_PORT`]), after the packets in hand; dropped
    /// as `hairpin_full` when [`HAIRPIN_QUEUE`] wait already.
    fn hairpin(&mut self, pkt: B) {
        if self.looped.len() < HAIRPIN_QUEUE {
            self.looped.push_back(pkt);
            dataplane::stats::add_own(&self.stats.hairpinned, 1);
        } else {
            self.drop_pkt(pkt, SwitchDrop::HairpinFull);
        }
    }

    /// Sends `pkt`, an answer to a packet that came in on `in_port`, back
    /// where that came from: out of the port, or, for a hairpinned packet,
    /// into the switch again (to the public address that sent it).
    fn send_back(&mut self, ctx: &mut Ctx<'_, B>, in_port: u16, pkt: B) {
        if in_port == HAIRPIN_PORT {
            self.hairpin(pkt);
        } else if overlay::is_tunnel(in_port) {
            self.send_back_tunnel(ctx, in_port, pkt);
        } else {
            ctx.send(usize::from(in_port), pkt);
        }
    }

    /// The hairpinned packets (and those they hairpin in turn, up to
    /// twice the queue's size), each through the switch as from the wire.
    /// Returns how many went through.
    fn drain_looped(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        now: u64,
        tally: &mut (u64, u64, u64),
    ) -> usize {
        for n in 0..2 * HAIRPIN_QUEUE {
            let Some(pkt) = self.looped.pop_front() else {
                return n;
            };
            let port = usize::from(HAIRPIN_PORT);
            self.packet(ctx, policy, port, pkt, now, false, tally, None);
        }
        2 * HAIRPIN_QUEUE
    }

    /// Sends the held fragments whose first just came through the switch
    /// again (each now finds its first's flow key).
    fn drain_released(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        now: u64,
        tally: &mut (u64, u64, u64),
    ) {
        // (A later fragment releases nothing: one pass empties the queue.)
        while let Some((port, owned, pkt)) = self.frag_released.pop_front() {
            self.packet_one(ctx, policy, usize::from(port), pkt, now, owned, tally, None);
        }
    }

    /// Takes one ICMP error from this worker's token bucket, refilled at
    /// `ICMP_ERRORS_PER_SEC`; false when it is empty. Errors about packets
    /// from the wire have a bucket of their own: the wire cannot spend
    /// what the VMs' path-MTU discovery needs.
    fn icmp_budget(&mut self, now: u64, wire: bool) -> bool {
        let bucket = &mut self.icmp_bucket[usize::from(wire)];
        take_token(bucket, now, ICMP_ERRORS_PER_SEC, ICMP_ERROR_BURST)
    }

    /// Drops `pkt`, counting `r` in the switch's counters (which name
    /// switch-level reasons; parse errors go to the worker's counters).
    fn drop_pkt(&self, pkt: B, r: SwitchDrop) {
        self.live_note(LiveEnd::Drop(r), "drop", || r.name().to_string());
        self.stats.count(r);
        drop(pkt);
    }

    /// Takes in the current policy now, as the first burst would: each
    /// vnet's load balancer is made with its tables. (A process that takes
    /// over from another builds its switches this far before its
    /// predecessor stops.)
    pub fn load_policy(&mut self) {
        let p = self.policy.load_full();
        self.on_new_generation(&p);
    }

    /// With `preallocate` in its configuration, once: commits the memory of
    /// the flow table and of each vnet's load balancer's connection table
    /// now, from the thread that calls it (the worker's own core when it
    /// starts: the memory is then local to it), so that filling them faults
    /// no page in on the packet path. At the default sizes that is about
    /// 256 MiB for the flow table and 83 MiB per vnet, some 50 ms of the
    /// kernel zeroing memory. Vnets added later are committed as first
    /// written (committing them would stop the worker mid-traffic), and so
    /// is whatever the kernel cannot commit now. Without `preallocate`,
    /// nothing.
    pub fn preallocate(&mut self) {
        if !self.cfg.preallocate || self.preallocated {
            return;
        }
        self.preallocated = true;
        // (What is not committed now is committed as first written.)
        let _ = self.flows.preallocate();
        for l in &mut self.lb {
            let _ = l.preallocate();
        }
    }

    /// SYN cookies of `cookies` from now on, in every vnet (a successor
    /// process checks those its predecessor gave out).
    pub fn set_syn_cookies(&mut self, cookies: lb::syncookie::SynCookies) {
        for l in &mut self.lb {
            l.set_cookies(cookies.clone());
        }
        self.cfg.syn_cookies = cookies;
    }

    fn on_new_generation(&mut self, p: &Policy) {
        self.generation = p.generation;
        self.tunnel_mtu = p
            .underlay()
            .and_then(|(u, _)| self.cfg.port_mtu.get(usize::from(u.port)))
            .map(|m| m.saturating_sub(dataplane::tunnel::OVERHEAD as u16));
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
            self.lb.push(
                LbCore::new(self.cfg.conn_table_size, self.cfg.timeouts, snat)
                    .with_shard(
                        u32::try_from(me).unwrap_or(u32::MAX),
                        u32::try_from(workers).unwrap_or(u32::MAX),
                    )
                    .with_cookies(self.cfg.syn_cookies.clone()),
            );
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
}

impl<B: PacketBuf> Switch<B> {
    /// For a packet that missed the flow table: when it is to a VIP of
    /// vnet `vn`, the one that decides it ([`lb_vnet`]: a VM's, or one
    /// reached from the uplink), starts loading the Maglev slot that will
    /// pick its backend (a stage before [`LbCore::prefetch_new_to`] picks
    /// it); returns the key's flow hash and the VIP.
    #[inline(always)]
    fn prefetch_pick<'p>(
        &self,
        policy: &'p Policy,
        vn: usize,
        key: &dataplane::FlowKey,
    ) -> Option<(lb::PickHash, &'p Arc<lb::balancer::Vip>)> {
        let (Some(l), Some(vnet)) = (self.lb.get(vn), policy.vnets.get(vn)) else {
            return None;
        };
        l.prefetch_pick_of(&vnet.vips, key)
    }

    /// A packet of a flow cached here that it may follow as it is
    /// (decided under this policy and, for a VIP's flow, that VIP's current
    /// backend set; not a SYN): counted, the load balancer told of it when
    /// due, transposed and queued. Any other packet is handed back, for the
    /// rest of [`Switch::packet`], with whether its flow is absent from the
    /// table (not merely stale: the install need not search again).
    /// Inlined into the burst's loop, so that a hit never pays for
    /// `packet`'s frame; a later fragment goes through `packet` first, for
    /// its first fragment's key.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn hit(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        pkt: B,
        (pk, hash, hint): Pre<'_>,
        in_port: u16,
        now: u64,
        tally: &mut (u64, u64, u64),
    ) -> Result<(), (B, bool)> {
        let flags = tcp_flags(pkt.data(), pk);
        // Flows count IP bytes, as flow records do.
        let len = u64::from(pk.ip_len());
        // (ARP's key is its addresses: it must not take the flow of an IP
        // packet of protocol 0 between them.)
        let cached = if pk.is_ip() {
            self.flows.entry_for(hint, hash, in_port, &pk.key)
        } else {
            None
        };
        let Some(e) = cached else {
            return Err((pkt, pk.is_ip()));
        };
        // A SYN opens a connection: connection tracking decides it,
        // whatever the cached flow says (a new connection on a reused
        // port, whose old one closed or timed out while its flows
        // stayed cached, must not ride them untracked; a retransmitted
        // SYN costs one slow-path lookup).
        let reopen = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        // Decided under this policy and, for a flow of a VIP, under
        // that VIP's current backend set (health changes elsewhere
        // leave it alone).
        let current = e.generation == policy.generation
            && (e.vip == NO_VIP || self.vip_epochs.get(usize::from(e.vip)) == Some(&e.vip_epoch));
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
            // connection in its LRU list). (The lookup stage started
            // loading the connection of a hit due on time.)
            // And on a flow's first hit: a reply's first packet is what
            // confirms a connection to the tracker (no longer embryonic;
            // a forward flow, which counts its first packet at install,
            // is installed as due instead).
            if closing || e.packets == 1 || e.lb_touch_due(now, self.lb_touch_ns) {
                e.set_lb_touched(now);
                // A reverse flow's rewrite is compiled at its first hit
                // (see `Switch::install`); one that cannot be (not IPv4 TCP
                // or UDP, or with a sequence offset) is tried again only
                // when due.
                if e.action.fast.is_none() {
                    e.action = e.action.compiled_for(&pk.key);
                }
                if let Some(r) = e.action.lb {
                    let told = self
                        .lb
                        .get_mut(r.vnet as usize)
                        .and_then(|l| l.touch(r.conn, r.dir, flags, now));
                    if told.is_none() {
                        // The load balancer has forgotten the connection
                        // (it timed out there; its reference no longer
                        // resolves): the flow keeps its backend and
                        // stops touching; with no connection to
                        // revalidate, health changes leave it alone.
                        e.action.lb = None;
                        e.vip = NO_VIP;
                    }
                }
            }
            tally.0 += 1;
            // The action is used in place (no copy of it per packet).
            let bounced =
                fast::transpose_hit(ctx, pkt, pk, &e.action, &self.cfg.port_mtu, self.tunnel_mtu);
            if let Some(b) = bounced {
                self.bounce(ctx, policy, b, pk, now);
            }
            return Ok(());
        }
        Err((pkt, false))
    }

    /// A packet of a burst that is no hit: [`Switch::packet`], with the
    /// burst's lookup and the Maglev hash its stages computed, if any.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn burst_slow(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        in_port: usize,
        pkt: B,
        pre: Pre<'_>,
        pick: Option<lb::PickHash>,
        now: u64,
        tally: &mut (u64, u64, u64),
    ) {
        self.pick_hash = pick.map(|m| (pre.0.key, m));
        self.packet(ctx, policy, in_port, pkt, now, false, tally, Some(pre));
        // (None left for a packet that did not take it.)
        self.pick_hash = None;
    }

    /// One packet received on `in_port`; `owned` when placement already
    /// chose this worker (a packet from the mailbox). A first fragment's
    /// held later fragments follow it at once, ahead of the packets
    /// decided after it (its flow's next packets among them).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn packet(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        in_port: usize,
        pkt: B,
        now: u64,
        owned: bool,
        tally: &mut (u64, u64, u64),
        pre: Option<Pre<'_>>,
    ) {
        self.packet_one(ctx, policy, in_port, pkt, now, owned, tally, pre);
        if !self.frag_released.is_empty() {
            // Each its own packet: a live trace follows only the first.
            self.untraced(|s| s.drain_released(ctx, policy, now, tally));
        }
    }

    /// Runs `f` with the trace's notes and the live trace off, then puts
    /// them back: for packets that a traced packet sets going, each its
    /// own.
    fn untraced(&mut self, f: impl FnOnce(&mut Self)) {
        let tracing = std::mem::replace(&mut self.tracing, false);
        let notes = self.trace.borrow_mut().take();
        f(self);
        self.tracing = tracing;
        *self.trace.borrow_mut() = notes;
    }

    /// [`Switch::packet`] without what it releases.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn packet_one(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        in_port: usize,
        pkt: B,
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
                    (&parsed, self.flows.hash(in_port16, &parsed.key), None)
                }
                Err(e) => {
                    ctx.drop_packet(pkt, DropReason::Malformed(e));
                    return;
                }
            },
        };
        // A later fragment has no ports: it takes its first fragment's flow
        // key (hence its flow and decision); a first fragment is noted for
        // them.
        let later;
        let (pk, hash, hint) = if pk.frag.is_later() {
            let Some(key) = self.frags.find(pk, now) else {
                // Its first has not come (yet): it waits for it a while.
                let held = self.frag_hold.hold(pk, owned, pkt, now);
                self.stats
                    .frags_waiting
                    .store(self.frag_hold.len() as u64, Ordering::Relaxed);
                match held {
                    Ok(()) => self.live_note(LiveEnd::Held, "frag", || {
                        format!(
                            "a fragment after the first, before its first: held for it (at \
                             most {} ms)",
                            self.cfg.frag_hold_time.as_millis()
                        )
                    }),
                    Err(pkt) => self.drop_pkt(pkt, SwitchDrop::FragNoFirst),
                }
                return;
            };
            // The rest of an ICMP message that is no echo (an error, whose
            // quote is in the first fragment) is never passed on alone.
            if key.is_icmp() && key.dst_port == dataplane::key::ICMP_NOT_ECHO {
                self.drop_pkt(pkt, SwitchDrop::IcmpUnrelated);
                return;
            }
            later = Parsed { key, ..*pk };
            (&later, self.flows.hash(in_port16, &key), None)
        } else {
            if pk.frag.is_first() {
                self.frags.note(pk, now);
                // Its later fragments that came before it follow it.
                if !self.frag_hold.is_empty() {
                    self.frag_hold.release(pk, &mut self.frag_released);
                    self.stats
                        .frags_waiting
                        .store(self.frag_hold.len() as u64, Ordering::Relaxed);
                }
            }
            (pk, hash, hint)
        };
        let (mut pkt, absent) =
            match self.hit(ctx, policy, pkt, (pk, hash, hint), in_port16, now, tally) {
                Ok(()) => {
                    self.slow_run.close(&self.clock);
                    return;
                }
                Err(miss) => miss,
            };
        // Not in this worker's table: only the connection's owner may decide
        // it (a hit needs no placement: only the owner installs flows).
        if !owned
            && pk.is_ip()
            && let Some((me, h)) = &self.handoff
        {
            // An ICMP error goes where the connection it quotes is (the
            // quote reversed is a packet of the error's direction).
            let place =
                dataplane::icmp_error::quote(pkt.data(), pk).map_or(pk.key, |q| q.key.reversed());
            let w = crate::placement::owner(policy, in_port16, &place, h.workers());
            if w != *me {
                self.slow_run.close(&self.clock);
                match h.queues.get(w).map(|q| q.push((in_port16, pkt))) {
                    Some(Ok(())) => {
                        tally.2 += 1;
                        self.live_note(LiveEnd::Handed(w), "handoff", || {
                            format!(
                                "worker {w} owns its connection: handed to it (not traced \
                                 there)"
                            )
                        });
                    }
                    Some(Err((_, pkt))) => self.drop_pkt(pkt, SwitchDrop::HandoffFull),
                    None => {}
                }
                return;
            }
        }
        tally.1 += 1;
        self.slow_run.open(&self.clock);
        self.first_len = u64::from(pk.ip_len());
        self.first_hash = Some((in_port16, hash, absent));
        let decided = self.slow(policy, pkt.data_mut(), pk, in_port16, now);
        // (Never left for another packet's install.)
        self.first_hash = None;
        self.live_decided(&decided);
        match decided {
            Ok(Slow::Reply) => self.send_back(ctx, in_port16, pkt),
            Ok(Slow::Advert(mac)) => match rewrite::neighbor_advert(&mut pkt, pk, mac) {
                Ok(()) => {
                    dataplane::stats::add_own(&self.stats.nd_replies, 1);
                    self.send_back(ctx, in_port16, pkt)
                }
                Err(_) => self.drop_pkt(pkt, SwitchDrop::RewriteFailed),
            },
            Ok(Slow::Forward(a)) => {
                // A reset passed on (a backend's, before it answered a SYN
                // proxy's SYN) ends what was held for its connection.
                if let Some(r) = a.lb
                    && pk.key.proto == 6
                    && tcp_flags(pkt.data(), pk) & TCP_RST != 0
                {
                    self.unpark_drop(r);
                }
                if let Some(b) = transpose(ctx, pkt, pk, &a, &self.cfg.port_mtu, self.tunnel_mtu) {
                    self.bounce(ctx, policy, b, pk, now);
                }
            }
            Ok(Slow::Segment(mac, seg)) => self.answer(ctx, in_port, pkt, pk, mac, &seg),
            Ok(Slow::ProxyAck(mac, seg, r)) => {
                self.answer(ctx, in_port, pkt, pk, mac, &seg);
                if seg.flags & TCP_RST != 0 {
                    // The client reset before the backend answered.
                    self.unpark_drop(r);
                } else {
                    // The packets held for the connection go on, each its
                    // own (a live trace follows only the ACK).
                    self.untraced(|s| s.unpark(ctx, policy, r, now, tally));
                }
            }
            Ok(Slow::ProxySyn(a, seg, first)) => {
                if !first
                    && synproxy::payload_len(pkt.data(), pk).is_some_and(|n| n > 0)
                    && let Some(r) = a.lb
                {
                    let seq = synproxy::read(pkt.data(), pk).map_or(0, |s| s.seq);
                    match self.park(r, in_port16, seq, now, pkt) {
                        None => return,
                        Some(p) => pkt = p,
                    }
                }
                // The SYN is parsed again: its lengths are not the packet's.
                let syn = synproxy::write(&mut pkt, pk, synproxy::Way::Onward, &seg)
                    .ok()
                    .and_then(|()| parse(pkt.data(), in_port16).ok());
                match syn {
                    Some(sp) => {
                        if let Some(b) =
                            transpose(ctx, pkt, &sp, &a, &self.cfg.port_mtu, self.tunnel_mtu)
                        {
                            self.bounce(ctx, policy, b, &sp, now);
                        }
                    }
                    None => self.drop_pkt(pkt, SwitchDrop::RewriteFailed),
                }
            }
            Err(r) => {
                if r == SwitchDrop::AclDeny {
                    self.log_denied(policy, in_port16, pk, now);
                }
                self.drop_pkt(pkt, r)
            }
        }
    }

    /// Records in the flow log (if on) a first packet the security groups
    /// denied: nothing was installed for it. At most
    /// `DENIED_RECORDS_PER_SEC` a second (after a burst of as many); the
    /// rest are counted.
    #[cold]
    fn log_denied(&mut self, policy: &Policy, in_port: u16, pk: &Parsed, now: u64) {
        use crate::flowlog::DENIED_RECORDS_PER_SEC as RATE;
        let Some(log) = self.flow_log.as_ref().filter(|l| l.active_ns().is_some()) else {
            return;
        };
        if !take_token(&mut self.deny_bucket, now, RATE, RATE) {
            log.suppressed();
            return;
        }
        let crate::flowlog::Decided { rules, asked, .. } = self.decided.get();
        log.push(crate::flowlog::FlowRecord {
            end: crate::flowlog::FlowEnd::Denied,
            in_port,
            out_port: None,
            key: pk.key,
            post: asked.unwrap_or(pk.key),
            first_ns: now,
            last_ns: now,
            packets: 1,
            bytes: self.first_len,
            rules,
            initiator: true,
            generation: policy.generation,
        });
    }

    /// Writes the SYN proxy's segment `seg` over `pkt` and sends it back
    /// out of `in_port`, from `mac`.
    fn answer(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        in_port: usize,
        mut pkt: B,
        pk: &Parsed,
        mac: dataplane::MacAddr,
        seg: &synproxy::Seg,
    ) {
        match synproxy::write(&mut pkt, pk, synproxy::Way::Back(mac), seg) {
            Ok(()) => self.send_back(ctx, in_port as u16, pkt),
            Err(_) => self.drop_pkt(pkt, SwitchDrop::RewriteFailed),
        }
    }

    /// The policy cache for a burst, taken out of the switch (put back by
    /// [`Switch::end`]'s caller): the one kept, or, if none was (a burst
    /// cut short), a new one.
    fn take_policy(&mut self) -> PolicyCache {
        self.current
            .take()
            .unwrap_or_else(|| Cache::new(self.policy.clone()))
    }

    /// A burst's start under `policy` (the current one, from
    /// [`Switch::take_policy`]): a new snapshot or health tick taken in.
    /// Returns the time (ns).
    #[inline]
    fn begin(&mut self, ctx: &Ctx<'_, B>, policy: &Policy) -> u64 {
        let fresh = policy.generation != self.generation;
        if fresh {
            self.on_new_generation(policy);
        }
        // A new snapshot has new VIPs (and its own clock).
        let health = policy.health_changes();
        if fresh || health != self.health_seen {
            self.health_seen = health;
            // (The backend sets the load balancers pick from are read
            // again after the epochs, so none is older than its epoch.)
            for l in &mut self.lb {
                l.forget_sets();
            }
            self.vip_epochs.clear();
            self.vip_epochs
                .extend(policy.vips().iter().map(|v| v.epoch() as u16));
        }
        self.clock.ticks_to_ns(ctx.now())
    }

    /// Counters once per burst, not per packet; periodic expiry.
    #[inline]
    fn end(&mut self, now: u64, (fast, slow, handed): (u64, u64, u64)) {
        if fast > 0 {
            dataplane::stats::add_own(&self.stats.fast_path, fast);
        }
        if slow > 0 {
            dataplane::stats::add_own(&self.stats.slow_path, slow);
        }
        self.slow_run.close(&self.clock);
        if self.slow_run.ticks > 0 {
            dataplane::stats::add_own(
                &self.stats.slow_path_ticks,
                std::mem::take(&mut self.slow_run.ticks),
            );
        }
        if handed > 0 {
            dataplane::stats::add_own(&self.stats.handed_off, handed);
        }
        // Fragments that waited for their first in vain.
        if let Some(pkt) = self.frag_hold.pop_expired(now) {
            self.drop_pkt(pkt, SwitchDrop::FragNoFirst);
            while let Some(pkt) = self.frag_hold.pop_expired(now) {
                self.drop_pkt(pkt, SwitchDrop::FragNoFirst);
            }
            self.stats
                .frags_waiting
                .store(self.frag_hold.len() as u64, Ordering::Relaxed);
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
            let (mut conns, mut evicted, mut untracked) = (0, 0, 0);
            let (mut cookies, mut proxied) = (0, 0);
            let (mut inbound, mut ports) = (0, 0);
            for l in &mut self.lb {
                l.expire(now, 4096);
                conns += l.conns().len() as u64;
                evicted += l.conns().stats().evicted_embryonic;
                untracked += l.stats().untracked;
                cookies += l.stats().syn_cookies_sent;
                proxied += l.stats().syn_proxied;
                inbound += l.stats().new_snat_inbound;
                ports += l.snat().map_or(0, |s| s.ports_in_use() as u64);
            }
            let s = &self.stats;
            s.conns.store(conns, Ordering::Relaxed);
            s.conns_evicted_embryonic.store(evicted, Ordering::Relaxed);
            s.conns_untracked.store(untracked, Ordering::Relaxed);
            s.syn_cookies_sent.store(cookies, Ordering::Relaxed);
            s.syn_proxied.store(proxied, Ordering::Relaxed);
            s.snat_inbound.store(inbound, Ordering::Relaxed);
            s.snat_ports.store(ports, Ordering::Relaxed);
            let f = self.frags.stats();
            s.frags_noted.store(f.noted, Ordering::Relaxed);
            s.frags_followed.store(f.found, Ordering::Relaxed);
            s.frags_held
                .store(self.frag_hold.stats().held, Ordering::Relaxed);
            self.expire_parked(now);
        }
    }
}

impl<B: PacketBuf> Pipeline<B> for Switch<B> {
    /// Takes in the policy, making each vnet's load balancer, and commits
    /// the tables' memory ([`Switch::preallocate`]), from the worker's core
    /// before its first packet.
    fn start(&mut self) {
        self.load_policy();
        self.preallocate();
    }

    fn process(&mut self, ctx: &mut Ctx<'_, B>, in_port: usize, pkts: &mut Batch<B>) {
        let mut current = self.take_policy();
        let policy = current.load();
        let now = self.begin(ctx, policy);
        // A live trace costs one load per burst while it is off.
        let live = self
            .live
            .as_ref()
            .and_then(|(_, l)| l.trigger.session(ctx.now()).map(|s| (l.clone(), s)));
        let mut tally = (0, 0, 0);
        // The burst in stages, so that the cache misses of its lookups
        // overlap instead of following one another, and no stage reads
        // what the one before has only just written (store forwarding
        // stalls): parse every packet in place; hash every key and
        // prefetch its bucket; prefetch the slot each bucket points at
        // (the buckets have arrived meanwhile); compare each key with the
        // one in that slot, in a pass short enough that the core runs
        // through the whole burst's slots with all their loads in flight
        // (a longer pass, waiting on each slot in turn, keeps only a few
        // in flight: `FlowTable::find_at`); search the index for the
        // rest, and for a hit due to tell the load balancer of its traffic
        // prefetch its connection (named in the slot's lines just loaded),
        // for a miss to a VIP its Maglev slot; then for those that missed
        // prefetch what their slow path reads first; then process each
        // packet.
        const N: usize = dataplane::BURST;
        let in16 = in_port as u16;
        let n = pkts.len().min(N);
        let mut scratch = self.scratch.take().unwrap_or_default();
        let BurstScratch {
            parsed,
            status,
            hash,
            hint,
            ports,
            refused,
            slot,
            vnets,
            pick,
            later_at,
            later_hash,
        } = &mut *scratch;
        // (What decapsulation may leave unwritten, reset for this burst's
        // packets: each arrives on the port it came in by, unless it comes
        // out of a tunnel below.)
        for (port, r) in ports.iter_mut().zip(refused.iter_mut()).take(n) {
            (*port, *r) = (in16, None);
        }
        // Packets from the uplink come out of their tunnels first: each
        // then arrives on its remote endpoint's tunnel port.
        if policy.is_uplink(in16) && (policy.has_overlay() || policy.has_dsr()) {
            for ((pkt, port), r) in pkts
                .iter_mut()
                .zip(ports.iter_mut())
                .zip(refused.iter_mut())
            {
                match self.decap(policy, pkt) {
                    Ok(Some(t)) => *port = t,
                    Ok(None) => {}
                    Err(why) => *r = Some(why),
                }
            }
        }
        for (((pkt, p), st), port) in pkts
            .iter()
            .zip(parsed.iter_mut())
            .zip(status.iter_mut())
            .zip(ports.iter())
        {
            *st = parse_into(pkt.data(), *port, p);
        }
        for ((h, p), port) in hash.iter_mut().zip(parsed.iter()).zip(ports.iter()).take(n) {
            *h = self.flows.hash(*port, &p.key);
            self.flows.prefetch_bucket(*h);
        }
        for (h, s) in hash.iter().zip(slot.iter_mut()).take(n) {
            *s = self.flows.prefetch_slot(*h);
        }
        for ((((r, s), p), st), port) in hint
            .iter_mut()
            .zip(slot.iter())
            .zip(parsed.iter())
            .zip(status.iter())
            .zip(ports.iter())
            .take(n)
        {
            if st.is_ok() {
                *r = self.flows.find_at(*s, *port, &p.key);
            }
        }
        // A miss: the vnet that decides it (`lb_vnet`), and to a VIP its
        // key's flow hash, for the stages that pick, and the VIP (borrowed
        // from the policy, for this burst only).
        let mut vip_of: [Option<&Arc<lb::balancer::Vip>>; N] = [None; N];
        for (((((((r, v), m), vp), p), h), st), port) in hint
            .iter_mut()
            .zip(vnets.iter_mut())
            .zip(pick.iter_mut())
            .zip(vip_of.iter_mut())
            .zip(parsed.iter())
            .zip(hash.iter())
            .zip(status.iter())
            .zip(ports.iter())
            .take(n)
        {
            *r = match st {
                Ok(()) => r.or_else(|| self.flows.find(*h, *port, &p.key)),
                Err(_) => None,
            };
            (*v, *m) = (None, None);
            match r {
                Some(f) => {
                    // A hit due to tell its connection of traffic: start
                    // loading the connection.
                    if let Some(c) = self.flows.due_conn(*f, now, self.lb_touch_ns)
                        && let Some(l) = self.lb.get(usize::from(c.vnet))
                    {
                        l.prefetch_touch(c.conn);
                    }
                }
                None if st.is_ok() => {
                    if let Some(vn) = lb_vnet(policy, *port, &p.key) {
                        // (A policy has at most `MAX_VNETS`, which fit.)
                        *v = u16::try_from(vn).ok();
                        (*m, *vp) = self.prefetch_pick(policy, vn, &p.key).unzip();
                    }
                }
                None => {}
            }
        }
        // The packets that missed go through the slow path: start loading
        // their connection-table buckets (in the load balancer of the vnet
        // that decides them, found above; for a VIP's, the reply key's too,
        // and its reverse flow's bucket) and the flow-table slots their
        // installs will take.
        let mut misses = 0;
        for (((((r, m), vp), p), st), vn) in hint
            .iter()
            .zip(pick.iter())
            .zip(vip_of.iter())
            .zip(parsed.iter())
            .zip(status.iter())
            .zip(vnets.iter())
            .take(n)
        {
            if r.is_some() || st.is_err() {
                continue;
            }
            misses += 1;
            let Some(vn) = vn.map(usize::from) else {
                continue;
            };
            let Some(l) = self.lb.get(vn) else {
                continue;
            };
            // For a new connection to a VIP: the bucket of the reverse flow
            // its install looks up too, keyed by the backend's port. (Any
            // other packet that missed: its connection-table bucket.)
            let Some(vip) = vp else {
                l.prefetch(&p.key);
                continue;
            };
            if let Some(reply) = l.prefetch_new_to(vip, &p.key, *m)
                && let Some((_, be)) = policy.vm_by_addr(vn, reply.src_ip)
            {
                self.flows.prefetch_bucket(self.flows.hash(be.port, &reply));
            }
        }
        if misses > 0 {
            self.flows.prefetch_free(2 * misses);
        }
        // The hits of established flows go first, and leave (the ports'
        // queues are sent) before the burst's other packets: so a burst of
        // new connections (a SYN flood, a connection storm) delays the
        // established flows' packets in it by the hits before them, not by
        // every slow path of the burst. The rest (misses, fragments, stale
        // flows, a SYN on a cached flow) follow, in their order; so does
        // every later packet with the hash of one of them (colliding flows
        // too; after a later fragment, whose key has no ports, every later
        // packet), which keeps each flow's packets in order. Refused and
        // malformed frames are dropped where they are; under a live trace
        // the burst goes in its order, one packet at a time. (Each packet
        // moved out whole: `drain_each`.)
        const _: () = assert!(N <= 256, "a burst's positions are kept in a u8");
        let mut later: Batch<B> = Batch::new();
        // A later fragment carries no ports: its hash is not its flow's.
        // Once one waits, so does the rest of the burst.
        let mut all_wait = false;
        let mut i = 0;
        pkts.drain_each(|pkt| {
            let at = i;
            i += 1;
            let (Some(p), Some(h), Some(r), Some(st), Some(port), Some(no)) = (
                parsed.get(at),
                hash.get(at),
                hint.get(at),
                status.get(at),
                ports.get(at),
                refused.get(at),
            ) else {
                // (Cannot happen: a burst holds at most N packets.)
                drop(pkt);
                return;
            };
            if let Some(why) = no {
                self.drop_pkt(pkt, *why);
                return;
            }
            let port = usize::from(*port);
            // A packet the live trace selects (by the port it arrived on,
            // and the frame as parsed: out of its tunnel, if it came in
            // one) is taken of its count; the claim is held until its
            // record is queued (and lives in this branch alone: no drop
            // check on the way of other packets).
            if let (Ok(()), Some((l, spec))) = (st, &live)
                && spec.selects_parsed(in_port, Some(p))
                && let Some(_claim) = l.trigger.claim()
            {
                self.packet_live(
                    l,
                    spec,
                    ctx,
                    policy,
                    port,
                    pkt,
                    now,
                    &mut tally,
                    (p, *h, *r),
                );
                return;
            }
            match st {
                Ok(()) => {
                    // A hit that is no fragment is forwarded here (a packet
                    // that missed goes to `packet`, which finds a flow an
                    // earlier packet of the burst installed), unless a
                    // packet of its flow waits for the rest.
                    let pkt = if r.is_some()
                        && !p.frag.is_first()
                        && !p.frag.is_later()
                        && !all_wait
                        && (later.is_empty()
                            || !later_hash.get(..later.len()).is_some_and(|d| d.contains(h)))
                    {
                        match self.hit(ctx, policy, pkt, (p, *h, *r), port as u16, now, &mut tally)
                        {
                            Ok(()) => return,
                            Err((pkt, _)) => pkt,
                        }
                    } else {
                        pkt
                    };
                    if live.is_none() {
                        let k = later.len();
                        if let (Some(a), Some(d)) = (later_at.get_mut(k), later_hash.get_mut(k)) {
                            (*a, *d) = (at as u8, *h);
                        }
                        all_wait |= p.frag.is_later();
                        let _ = later.push(pkt);
                        return;
                    }
                    let m = pick.get(at).copied().flatten();
                    self.burst_slow(ctx, policy, port, pkt, (p, *h, *r), m, now, &mut tally);
                }
                Err(e) => ctx.drop_packet(pkt, DropReason::Malformed(*e)),
            }
        });
        if !later.is_empty() {
            // What went before the rest leaves now.
            if later.len() < n {
                ctx.flush();
            }
            let mut k = 0;
            later.drain_each(|pkt| {
                let at = usize::from(later_at.get(k).copied().unwrap_or(u8::MAX));
                k += 1;
                let (Some(p), Some(h), Some(r), Some(port)) =
                    (parsed.get(at), hash.get(at), hint.get(at), ports.get(at))
                else {
                    drop(pkt);
                    return;
                };
                let m = pick.get(at).copied().flatten();
                let port = usize::from(*port);
                self.burst_slow(ctx, policy, port, pkt, (p, *h, *r), m, now, &mut tally);
            });
        }
        self.scratch = Some(scratch);
        if !self.looped.is_empty() {
            self.drain_looped(ctx, policy, now, &mut tally);
        }
        self.end(now, tally);
        self.current = Some(current);
    }

    fn poll(&mut self, ctx: &mut Ctx<'_, B>) -> usize {
        let arp = if self.alloc.is_some() {
            self.send_arp_requests(ctx)
        } else {
            0
        };
        if self
            .control
            .as_ref()
            .is_some_and(|(_, c)| !c.requests.is_empty())
        {
            self.serve_control();
            ctx.note_work();
        }
        // Hairpinned packets left over (a burst that hairpinned more than
        // the queue's size); counted in what this poll did, so that the
        // worker flushes what they sent.
        let mut looped = 0;
        if !self.looped.is_empty() {
            let mut current = self.take_policy();
            let policy = current.load();
            let now = self.begin(ctx, policy);
            let mut tally = (0, 0, 0);
            looped = self.drain_looped(ctx, policy, now, &mut tally);
            self.end(now, tally);
            self.current = Some(current);
        }
        // The common case, an empty mailbox, costs one load and no
        // reference counting.
        let busy = self
            .handoff
            .as_ref()
            .is_some_and(|(me, h)| h.queues.get(*me).is_some_and(|q| !q.is_empty()));
        let (true, Some((me, h))) = (busy, self.handoff.clone()) else {
            // Idle: the periodic work (expiry, counters published) is not
            // left waiting for traffic.
            let now = self.clock.ticks_to_ns(ctx.now());
            if now.saturating_sub(self.last_expire) > 100_000_000 {
                self.end(now, (0, 0, 0));
                ctx.note_work();
            }
            return looped + arp;
        };
        let Some(q) = h.queues.get(me) else {
            return looped + arp;
        };
        let mut current = self.take_policy();
        let policy = current.load();
        let now = self.begin(ctx, policy);
        let mut tally = (0, 0, 0);
        let mut n = 0;
        while n < 2 * dataplane::BURST {
            let Some((in_port, pkt)) = q.pop() else { break };
            self.packet(
                ctx,
                policy,
                usize::from(in_port),
                pkt,
                now,
                true,
                &mut tally,
                None,
            );
            n += 1;
        }
        if !self.looped.is_empty() {
            n += self.drain_looped(ctx, policy, now, &mut tally);
        }
        self.end(now, tally);
        self.current = Some(current);
        n + looped + arp
    }
}
