//! VIPs and their backend pools, and the per-core load balancer that ties
//! VIP lookup, Maglev, connection tracking and NAT together.
//!
//! The control plane builds [`Vip`]s and publishes them as a [`Vips`]
//! snapshot. A VIP's configuration is immutable (a membership change makes a
//! new `Vip`); its [`BackendSet`] (which backends are healthy, and the Maglev
//! tables over them) is swapped whole by health checks ([`Vip::set_health`],
//! as Pingora swaps its selector), without a new snapshot: each set carries
//! an epoch, and every change ticks a [`HealthClock`] that workers watch, so
//! a switch revalidates only the cached flows of the VIP that changed. Each
//! worker owns an [`LbCore`] and calls it with the snapshot of the moment;
//! established connections carry the `Arc<Vip>` they were made under and
//! keep their backend while it is configured (and, for a VIP that resets
//! the connections of unhealthy backends, while it is healthy).

use crate::conntrack::{
    Conn, ConnError, ConnRef, ConnState, ConnTable, Dir, TcpState, Timeouts, to16,
};
use crate::maglev::{DEFAULT_TABLE_SIZE, MaglevBackend, MaglevError, MaglevTable};
use crate::nat::{NatBinding, Rewrite, SeqShift};
use crate::snat::{SnatAllocator, SnatError};
use crate::syncookie::SynCookies;
use dataplane::FlowKey;
pub use dataplane::synproxy::Seg;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Which fields of a flow choose its backend (Azure Load Balancer's
/// distribution modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distribution {
    /// Source and destination address and port, protocol (the default).
    #[default]
    FiveTuple,
    /// Source and destination address, protocol ("client IP and protocol").
    ThreeTuple,
    /// Source and destination address ("client IP").
    TwoTuple,
}

impl FromStr for Distribution {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, LbError> {
        match s {
            "5-tuple" => Ok(Distribution::FiveTuple),
            "3-tuple" => Ok(Distribution::ThreeTuple),
            "2-tuple" => Ok(Distribution::TwoTuple),
            _ => Err(LbError::BadDistribution(s.to_string())),
        }
    }
}

/// When a TCP VIP answers SYNs itself ([`crate::syncookie`]): the
/// backend then sees a connection only once the client has completed the
/// handshake with the switch, so a flood of spoofed SYNs never reaches it
/// and takes no connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynProxy {
    /// Never: every SYN goes to a backend (the default).
    #[default]
    Off,
    /// When the VIP is at its connection limit (or the table is full),
    /// as Linux sends cookies when a listener's queue overflows.
    Auto,
    /// Always.
    On,
}

impl FromStr for SynProxy {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, LbError> {
        match s {
            "off" => Ok(SynProxy::Off),
            "auto" => Ok(SynProxy::Auto),
            "on" => Ok(SynProxy::On),
            _ => Err(LbError::BadSynProxy(s.to_string())),
        }
    }
}

/// How a VIP's traffic reaches its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum VipMode {
    /// The switch picks a backend, DNATs to it and reverses its replies
    /// (the default).
    #[default]
    Local,
    /// A Mux (Ananta's, Katran's): the switch picks the backend (DIP) by
    /// Maglev and sends the packet, unchanged, to the DIP's address in IP
    /// in IP; the replies go from the DIP's host straight to the client
    /// (direct server return) and never pass here, so the connection is
    /// tracked one way.
    Mux,
    /// The host of a Mux's DIPs: the VIP's traffic arrives in IP in IP
    /// from a Mux, whose outer destination names the backend; it is DNATed
    /// to that backend, and the replies leave with the VIP as their source
    /// straight to the client.
    Dsr,
}

impl VipMode {
    /// Its name as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            VipMode::Local => "local",
            VipMode::Mux => "mux",
            VipMode::Dsr => "dsr",
        }
    }
}

impl FromStr for VipMode {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, LbError> {
        match s {
            "local" => Ok(VipMode::Local),
            "mux" => Ok(VipMode::Mux),
            "dsr" => Ok(VipMode::Dsr),
            _ => Err(LbError::BadMode(s.to_string())),
        }
    }
}

const FLOW_SEED: u64 = 0x706f_6c6c_7578_666c; // "polluxfl"

/// The flow hash Maglev is indexed with: XXH3 with a fixed seed over the
/// fields `dist` selects, so every pollux instance computes the same value.
#[inline]
pub fn flow_hash(k: &FlowKey, dist: Distribution) -> u64 {
    let mut b = [0u8; 37];
    b[..16].copy_from_slice(&k.src_ip);
    b[16..32].copy_from_slice(&k.dst_ip);
    let n = match dist {
        Distribution::TwoTuple => 32,
        Distribution::ThreeTuple => {
            b[32] = k.proto;
            33
        }
        Distribution::FiveTuple => {
            b[32..34].copy_from_slice(&k.src_port.to_be_bytes());
            b[34..36].copy_from_slice(&k.dst_port.to_be_bytes());
            b[36] = k.proto;
            37
        }
    };
    xxh3_64_with_seed(&b[..n], FLOW_SEED)
}

/// How a new connection's backend is chosen.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// By Maglev, with the key's flow hash if already computed.
    Maglev(Option<PickHash>),
    /// The backend (an index into the VIP's) a Mux chose.
    Pinned(usize),
}

/// A key's [`flow_hash`] under one distribution, computed once for a new
/// connection and handed from the stage that prefetches its Maglev slot
/// to the stages that pick (the prefetch of its reply key, the open), so
/// that the key is hashed once. A pick uses it only for a VIP of the same
/// distribution; the caller hands it on only with the key it was
/// computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickHash {
    hash: u64,
    dist: Distribution,
}

impl PickHash {
    /// `k`'s flow hash under `dist`.
    #[inline]
    pub fn of(k: &FlowKey, dist: Distribution) -> Self {
        PickHash {
            hash: flow_hash(k, dist),
            dist,
        }
    }
}

/// Whether connection `c` has ended, so that its client's fresh SYN on the
/// same tuple opens a new one: both FINs or an RST seen; or, for a
/// connection of a Mux (which sees only its client's side) or of a DSR host
/// behind one, the client's FIN. A client sends a SYN on that tuple again
/// only from a new socket; the Mux then decides it afresh, and its host
/// must take it wherever the Mux sends it, even when the backend never
/// sent its own FIN (it hung or went down). (A SYN on that tuple forged,
/// or duplicated and delayed, after the client's FIN would move what is
/// left of the old connection: as for a SYN after both FINs.)
fn finished(c: &Conn<ConnInfo>) -> bool {
    matches!(
        c.state,
        ConnState::Tcp(TcpState::TimeWait | TcpState::Closed)
    ) || (c.fin_seen[Dir::Orig as usize]
        && matches!(&c.value.kind, ConnKind::Dnat { vip, .. }
            if matches!(vip.config().mode, VipMode::Mux | VipMode::Dsr)))
}

/// Whether a packet with `tcp_flags` from connection `c`'s client is a
/// fresh SYN (no ACK) on it after it [`finished`]: a new connection.
fn reopens(c: &Conn<ConnInfo>, tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && finished(c)
}

/// What happens to established connections of a DIP that turns unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnhealthy {
    /// They keep flowing while the DIP stays configured (the default).
    #[default]
    Keep,
    /// They are dropped (and their state removed).
    Reset,
}

/// What happens to new connections when no DIP is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenAllDown {
    /// They are dropped; established ones continue (the default).
    #[default]
    DropNew,
    /// They are spread over every configured DIP, healthy or not.
    FailOpen,
}

/// A backend (DIP) of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Backend address.
    pub ip: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Relative weight; 0 drains it (no new connections, established stay).
    pub weight: u32,
}

/// A VIP as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    /// Name used in messages.
    pub name: String,
    /// Frontend address.
    pub addr: IpAddr,
    /// Frontend port (0 with ICMP).
    pub port: u16,
    /// IP protocol (6, 17, 1, 58).
    pub proto: u8,
    /// Distribution mode.
    pub distribution: Distribution,
    /// The pool.
    pub backends: Vec<Backend>,
    /// Maglev table size (a prime; default 65537).
    pub table_size: usize,
    /// Policy for established connections of unhealthy DIPs.
    pub on_unhealthy: OnUnhealthy,
    /// Policy for new connections when no DIP is healthy.
    pub when_all_down: WhenAllDown,
    /// Most connections tracked to this VIP at once, over all workers
    /// (each takes a share, the shares adding up to it); 0: no limit
    /// beyond the table's.
    pub max_conns: u32,
    /// When the switch answers the VIP's SYNs itself (TCP only).
    pub syn_proxy: SynProxy,
    /// How its traffic reaches the backends.
    pub mode: VipMode,
}

impl VipConfig {
    /// The connection table's timeout class of its connections.
    pub fn class(&self) -> u8 {
        if self.mode == VipMode::Mux {
            MUX_CLASS
        } else {
            0
        }
    }

    /// A VIP with default distribution, table size and policies.
    pub fn new(name: &str, addr: IpAddr, port: u16, proto: u8, backends: Vec<Backend>) -> Self {
        VipConfig {
            name: name.to_string(),
            addr,
            port,
            proto,
            distribution: Distribution::default(),
            backends,
            table_size: DEFAULT_TABLE_SIZE,
            on_unhealthy: OnUnhealthy::default(),
            when_all_down: WhenAllDown::default(),
            max_conns: 0,
            syn_proxy: SynProxy::Off,
            mode: VipMode::Local,
        }
    }
}

/// Why a VIP could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    /// Unknown distribution mode.
    #[error("distribution {0:?} is not one of 5-tuple, 3-tuple, 2-tuple")]
    BadDistribution(String),
    /// Unknown SYN proxy mode.
    #[error("syn_proxy {0:?} is not one of off, auto, on")]
    BadSynProxy(String),
    /// A SYN proxy on a VIP that is not TCP.
    #[error("vip {0:?}: syn_proxy needs a tcp vip")]
    SynProxyNotTcp(String),
    /// Unknown VIP mode.
    #[error("mode {0:?} is not one of local, mux, dsr")]
    BadMode(String),
    /// A Mux or DSR VIP that cannot be one.
    #[error("vip {vip:?}: a {mode} vip {why}")]
    Mode {
        /// VIP name.
        vip: String,
        /// Its mode.
        mode: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A backend listed twice.
    #[error("vip {vip:?}: backend {backend} is listed twice")]
    DuplicateBackend {
        /// VIP name.
        vip: String,
        /// The backend.
        backend: String,
    },
    /// A VIP or backend address in IPv6's IPv4-mapped form
    /// (`::ffff:a.b.c.d`), which no packet carries (the parser drops them).
    #[error("vip {vip:?}: {addr} is an IPv4-mapped IPv6 address: write it as IPv4")]
    V4Mapped {
        /// VIP name.
        vip: String,
        /// The address.
        addr: IpAddr,
    },
    /// A backend of the other address family.
    #[error("vip {vip:?}: backend {backend} is not of the VIP's address family")]
    FamilyMismatch {
        /// VIP name.
        vip: String,
        /// The backend.
        backend: String,
    },
    /// The Maglev table could not be built.
    #[error("vip {vip:?}: {source}")]
    Maglev {
        /// VIP name.
        vip: String,
        /// The table error.
        source: MaglevError,
    },
    /// A health update for a VIP that does not exist.
    #[error("no vip {0}")]
    NoSuchVip(String),
    /// A health update for a backend the VIP does not have.
    #[error("vip {vip:?}: no backend #{index}")]
    NoSuchBackend {
        /// VIP name.
        vip: String,
        /// The index given.
        index: usize,
    },
}

/// Ticks on every health change of the VIPs that share it (one per policy
/// snapshot): a worker that sees it move re-reads the VIPs' epochs.
#[derive(Debug, Default)]
pub struct HealthClock(AtomicU64);

impl HealthClock {
    /// Health changes so far.
    #[inline]
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn tick(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// What health checks change of a VIP: which backends are healthy and the
/// Maglev tables over them. Immutable; [`Vip::set_health`] swaps in a new
/// one with the next epoch.
#[derive(Debug)]
pub struct BackendSet {
    healthy: Vec<bool>,
    table: MaglevTable,
    /// Table over every configured, weighted backend (fail-open mode only).
    all: Option<MaglevTable>,
    epoch: u32,
}

impl BackendSet {
    /// The Maglev table a new connection is picked from, and whether it is
    /// the fallback table of all backends: the healthy backends' table,
    /// unless it is empty and the VIP fails open.
    #[inline]
    fn for_new(&self) -> (&MaglevTable, bool) {
        match &self.all {
            Some(all) if self.table.entries().is_empty() => (all, true),
            _ => (&self.table, false),
        }
    }

    fn build(cfg: &VipConfig, healthy: Vec<bool>, epoch: u32) -> Result<BackendSet, LbError> {
        let table = table_for(cfg, |i| healthy.get(i).copied().unwrap_or(false))?;
        let all = match cfg.when_all_down {
            WhenAllDown::FailOpen => Some(table_for(cfg, |_| true)?),
            WhenAllDown::DropNew => None,
        };
        Ok(BackendSet {
            healthy,
            table,
            all,
            epoch,
        })
    }

    /// Health per configured backend.
    pub fn health(&self) -> &[bool] {
        &self.healthy
    }

    /// Whether backend `index` is healthy (false if there is none).
    pub fn is_healthy(&self, index: usize) -> bool {
        self.healthy.get(index).copied().unwrap_or(false)
    }

    /// The Maglev table over healthy backends.
    pub fn table(&self) -> &MaglevTable {
        &self.table
    }

    /// Changes of the VIP's set before this one (wrapping).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
}

/// A VIP: its configuration, fixed for its lifetime, and its backend set,
/// swapped by health checks.
#[derive(Debug)]
pub struct Vip {
    cfg: VipConfig,
    /// Its number in the policy snapshot (flows name their VIP by it).
    id: u16,
    set: arc_swap::ArcSwap<BackendSet>,
    clock: Arc<HealthClock>,
}

/// A backend's key: what Maglev's permutations and the table's digest
/// name it by.
fn backend_key(b: &Backend) -> Vec<u8> {
    format!("{}:{}", b.ip, b.port).into_bytes()
}

fn table_for(cfg: &VipConfig, include: impl Fn(usize) -> bool) -> Result<MaglevTable, LbError> {
    let bs: Vec<MaglevBackend> = cfg
        .backends
        .iter()
        .enumerate()
        .filter(|(i, _)| include(*i))
        .map(|(i, b)| MaglevBackend {
            key: backend_key(b),
            weight: b.weight,
            id: i as u16,
        })
        .collect();
    MaglevTable::build(&bs, cfg.table_size).map_err(|source| LbError::Maglev {
        vip: cfg.name.clone(),
        source,
    })
}

impl Vip {
    /// Validates `cfg` and builds its table with the given health per backend
    /// (missing entries count as healthy, as for a VIP without a probe).
    pub fn new(cfg: VipConfig, healthy: &[bool]) -> Result<Vip, LbError> {
        if cfg.syn_proxy != SynProxy::Off && cfg.proto != 6 {
            return Err(LbError::SynProxyNotTcp(cfg.name.clone()));
        }
        if cfg.mode != VipMode::Local {
            let bad = |why| LbError::Mode {
                vip: cfg.name.clone(),
                mode: cfg.mode.name(),
                why,
            };
            // IP in IP (protocol 4) carries IPv4.
            if !cfg.addr.is_ipv4() {
                return Err(bad("must be IPv4 (IP in IP carries IPv4)"));
            }
            if cfg.syn_proxy != SynProxy::Off {
                return Err(bad("cannot have a SYN proxy"));
            }
            // The outer destination names a backend by its address alone.
            let mut ips = std::collections::HashSet::new();
            if !cfg.backends.iter().all(|b| ips.insert(b.ip)) {
                return Err(bad("lists a backend address twice"));
            }
        }
        let mapped = |a: &IpAddr| matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
        if let Some(addr) = std::iter::once(&cfg.addr)
            .chain(cfg.backends.iter().map(|b| &b.ip))
            .find(|a| mapped(a))
        {
            return Err(LbError::V4Mapped {
                vip: cfg.name.clone(),
                addr: *addr,
            });
        }
        let mut seen = std::collections::HashSet::new();
        for b in &cfg.backends {
            let name = format!("{}:{}", b.ip, b.port);
            if b.ip.is_ipv4() != cfg.addr.is_ipv4() {
                return Err(LbError::FamilyMismatch {
                    vip: cfg.name.clone(),
                    backend: name,
                });
            }
            if !seen.insert((b.ip, b.port)) {
                return Err(LbError::DuplicateBackend {
                    vip: cfg.name.clone(),
                    backend: name,
                });
            }
        }
        let healthy: Vec<bool> = (0..cfg.backends.len())
            .map(|i| healthy.get(i).copied().unwrap_or(true))
            .collect();
        let set = BackendSet::build(&cfg, healthy, 0)?;
        Ok(Vip {
            cfg,
            id: 0,
            set: arc_swap::ArcSwap::from_pointee(set),
            clock: Arc::default(),
        })
    }

    /// A digest (32 bits) of the VIP's current Maglev table: each slot's
    /// backend named by its address and port, so it is the same on every
    /// pollux whose VIP has the same backends, weights, health and table
    /// size, in whatever order they are configured. What an operator
    /// compares between Muxes: the same digest, the same DIP for every
    /// flow. (A walk of the whole table: for the control path.)
    pub fn table_digest(&self) -> u32 {
        let keys: Vec<Vec<u8>> = self.cfg.backends.iter().map(backend_key).collect();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&(self.cfg.table_size as u64).to_le_bytes());
        for &e in self.backends().table().entries() {
            h.update(keys.get(usize::from(e)).map_or(&b"-"[..], |k| &k[..]));
            h.update(b",");
        }
        let d = h.digest();
        (d ^ (d >> 32)) as u32
    }

    /// This VIP numbered `id` in a snapshot whose health changes tick
    /// `clock`.
    pub fn numbered(mut self, id: u16, clock: Arc<HealthClock>) -> Vip {
        self.id = id;
        self.clock = clock;
        self
    }

    /// Sets backend `index`'s health: a new backend set (new Maglev table,
    /// next epoch) when it changes, and a tick of the health clock. Returns
    /// whether it changed. One writer at a time (the control thread): two
    /// concurrent calls could each build on the same set and one change be
    /// lost. Connections keep their backends; only new ones
    /// (and, with [`OnUnhealthy::Reset`], those of a backend that went down)
    /// see the change.
    pub fn set_health(&self, index: usize, healthy: bool) -> Result<bool, LbError> {
        let cur = self.set.load();
        if index >= self.cfg.backends.len() {
            return Err(LbError::NoSuchBackend {
                vip: self.cfg.name.clone(),
                index,
            });
        }
        if cur.healthy.get(index) == Some(&healthy) {
            return Ok(false);
        }
        let mut h = cur.healthy.clone();
        h[index] = healthy;
        let next = BackendSet::build(&self.cfg, h, cur.epoch.wrapping_add(1))?;
        self.set.store(Arc::new(next));
        self.clock.tick();
        Ok(true)
    }

    /// The configuration.
    pub fn config(&self) -> &VipConfig {
        &self.cfg
    }

    /// Its number in the snapshot.
    #[inline]
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The backend set now (health and tables).
    #[inline]
    pub fn backends(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// The current backend set's epoch.
    #[inline]
    pub fn epoch(&self) -> u32 {
        self.set.load().epoch
    }

    /// Whether backend `index` is healthy now (false if there is none).
    #[inline]
    pub fn is_healthy(&self, index: usize) -> bool {
        self.set.load().is_healthy(index)
    }

    /// Health per backend, now.
    pub fn health(&self) -> Vec<bool> {
        self.set.load().healthy.clone()
    }

    /// The backend a new connection with key `k` goes to (index into the
    /// configured backends), or `None` when none may take it.
    #[inline]
    pub fn pick(&self, k: &FlowKey) -> Option<usize> {
        self.pick_in(&self.set.load(), k)
    }

    /// [`Vip::pick`] in `set`, a backend set of this VIP read earlier.
    #[inline]
    pub fn pick_in(&self, set: &BackendSet, k: &FlowKey) -> Option<usize> {
        self.pick_hashed(set, k, None)
    }

    /// [`Vip::pick_in`] with `k`'s flow hash when `given` holds it for this
    /// VIP's distribution (computed here otherwise).
    #[inline]
    pub fn pick_hashed(
        &self,
        set: &BackendSet,
        k: &FlowKey,
        given: Option<PickHash>,
    ) -> Option<usize> {
        let h = self.hash_of(k, given);
        set.for_new().0.lookup(h.hash).map(usize::from)
    }

    /// `k`'s flow hash under this VIP's distribution: `given` if it is
    /// that, else computed.
    #[inline]
    fn hash_of(&self, k: &FlowKey, given: Option<PickHash>) -> PickHash {
        match given {
            Some(h) if h.dist == self.cfg.distribution => {
                debug_assert_eq!(h.hash, flow_hash(k, h.dist), "a flow hash of another key");
                h
            }
            _ => PickHash::of(k, self.cfg.distribution),
        }
    }

    /// Starts loading the Maglev slot [`Vip::pick`] of `k` reads, without
    /// waiting for it: a VIP's table (two bytes a slot, 128 KiB by default)
    /// does not stay in cache beside a large connection table, and its
    /// slots are read at random.
    #[inline]
    pub fn prefetch_pick(&self, k: &FlowKey) -> PickHash {
        self.prefetch_pick_in(&self.set.load(), k)
    }

    /// [`Vip::prefetch_pick`] in `set`, a backend set of this VIP read
    /// earlier; returns the flow hash it computed, for the pick.
    #[inline]
    pub fn prefetch_pick_in(&self, set: &BackendSet, k: &FlowKey) -> PickHash {
        let h = PickHash::of(k, self.cfg.distribution);
        set.for_new().0.prefetch(h.hash);
        h
    }

    /// The Maglev slot a new connection with key `k` is looked up in, and
    /// whether it is the fallback table of all backends (no backend is
    /// healthy and the VIP sends to them all then): what [`Vip::pick`]
    /// reads, for a trace.
    pub fn slot_of(&self, k: &FlowKey) -> (usize, bool) {
        let h = flow_hash(k, self.cfg.distribution);
        let set = self.set.load();
        let (table, all) = set.for_new();
        (slot(h, table.entries().len()), all)
    }

    /// Index of the backend `ip:port`, if configured.
    pub fn backend_index(&self, ip: IpAddr, port: u16) -> Option<usize> {
        self.cfg
            .backends
            .iter()
            .position(|b| b.ip == ip && b.port == port)
    }
}

/// The slot of flow hash `h` in a table of `n` slots (0 for an empty one).
fn slot(h: u64, n: usize) -> usize {
    h.checked_rem(n as u64).map_or(0, |s| s as usize)
}

/// The frontend key of a VIP: address, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipKey {
    addr: [u8; 16],
    port: u16,
    proto: u8,
}

impl std::hash::Hash for VipKey {
    /// A multiply-fold of the key's words (with xxh3 over its bytes, the
    /// VIP map, looked up twice for each new connection, and the per-VIP
    /// counts, twice more, took 8% of a new connection's cost). Only this
    /// process's maps use it, and the keys they hold are configured VIPs
    /// (a packet only looks one up), so no key from the wire can crowd a
    /// bucket.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        use dataplane::index::fold;
        let [a, b] = [&self.addr[..8], &self.addr[8..]].map(|w| {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            u64::from_le_bytes(x)
        });
        let rest = u64::from(self.port) << 8 | u64::from(self.proto);
        let h = fold(a ^ 0x243f_6a88_85a3_08d3, b ^ 0x1319_8a2e_0370_7344);
        state.write_u64(fold(h ^ rest, 0xa409_3822_299f_31d0));
    }
}

impl VipKey {
    pub(crate) fn of_cfg(c: &VipConfig) -> Self {
        VipKey {
            addr: to16(c.addr),
            port: if matches!(c.proto, 1 | 58) { 0 } else { c.port },
            proto: c.proto,
        }
    }

    fn of_packet(k: &FlowKey) -> Self {
        VipKey {
            addr: k.dst_ip,
            port: if k.is_icmp() { 0 } else { k.dst_port },
            proto: k.proto,
        }
    }
}

/// A snapshot of every VIP, as workers see it.
#[derive(Debug, Default, Clone)]
pub struct Vips {
    map: HashMap<VipKey, Arc<Vip>, std::hash::BuildHasherDefault<crate::conntrack::IdentityHasher>>,
}

impl Vips {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a VIP (keyed by address, port, protocol).
    pub fn insert(&mut self, vip: Vip) -> Arc<Vip> {
        let a = Arc::new(vip);
        self.map.insert(VipKey::of_cfg(&a.cfg), a.clone());
        a
    }

    /// Removes the VIP `addr:port/proto`.
    pub fn remove(&mut self, addr: IpAddr, port: u16, proto: u8) -> Option<Arc<Vip>> {
        let k = VipKey {
            addr: to16(addr),
            port: if matches!(proto, 1 | 58) { 0 } else { port },
            proto,
        };
        self.map.remove(&k)
    }

    /// Sets the health of backend `backend` of VIP `addr:port/proto`
    /// ([`Vip::set_health`]); returns whether it changed.
    pub fn set_health(
        &self,
        vip: (IpAddr, u16, u8),
        backend: usize,
        healthy: bool,
    ) -> Result<bool, LbError> {
        let Some(cur) = self.get(vip.0, vip.1, vip.2) else {
            return Err(LbError::NoSuchVip(format!("{}:{}/{}", vip.0, vip.1, vip.2)));
        };
        cur.set_health(backend, healthy)
    }

    /// The VIP `addr:port/proto`.
    pub fn get(&self, addr: IpAddr, port: u16, proto: u8) -> Option<&Arc<Vip>> {
        self.map.get(&VipKey {
            addr: to16(addr),
            port: if matches!(proto, 1 | 58) { 0 } else { port },
            proto,
        })
    }

    /// True when some VIP has address `ip` (whatever its port and protocol):
    /// the switch answers ARP for it.
    pub fn has_address(&self, ip: IpAddr) -> bool {
        let a = to16(ip);
        self.map.keys().any(|k| k.addr == a)
    }

    /// The VIP a packet with key `k` is addressed to.
    #[inline]
    pub fn lookup(&self, k: &FlowKey) -> Option<&Arc<Vip>> {
        self.map.get(&VipKey::of_packet(k))
    }
}

/// Why the load balancer dropped a packet. Each is counted by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LbDrop {
    /// New connection to a VIP with no backend that may take it.
    NoHealthyBackend,
    /// The connection table is full of live connections.
    TableFull,
    /// The connection's reply key collides with a tracked connection.
    TupleCollision,
    /// The connection's backend (or VIP) is no longer configured.
    BackendRemoved,
    /// The backend turned unhealthy and the VIP resets its connections.
    BackendUnhealthy,
    /// No SNAT port left for the VM.
    SnatExhausted,
    /// SNAT asked for a VM that is not in the outbound pool.
    SnatNotMember,
    /// New connection to a VIP at its connection limit, none of whose
    /// embryonic connections could make room.
    VipConnLimit,
    /// A segment to a VIP whose SYN proxy is on that opens nothing: not a
    /// SYN, and no ACK of a cookie of this period or the last.
    SynCookieInvalid,
    /// A segment from a backend of a SYN-proxied connection before the
    /// backend's SYN-ACK (which sets the connection's sequence offset), or
    /// the client's reset before it (the backend's SYN-ACK then gets one).
    SynProxyPending,
    /// A packet from the wire to a SNAT address and port that no mapping
    /// holds.
    SnatNoMapping,
    /// A packet from the wire to a SNAT mapping that its filtering does
    /// not let in (or a TCP segment other than a SYN that no connection
    /// expects).
    SnatFiltered,
    /// A Mux's packet (IP in IP) whose outer destination is no backend of
    /// the DSR VIP it carries a packet for, or that carries one for a VIP
    /// that takes no Mux traffic.
    DsrNotBackend,
}

impl LbDrop {
    /// Every reason.
    pub const ALL: [LbDrop; 13] = [
        LbDrop::NoHealthyBackend,
        LbDrop::TableFull,
        LbDrop::TupleCollision,
        LbDrop::BackendRemoved,
        LbDrop::BackendUnhealthy,
        LbDrop::SnatExhausted,
        LbDrop::SnatNotMember,
        LbDrop::VipConnLimit,
        LbDrop::SynCookieInvalid,
        LbDrop::SynProxyPending,
        LbDrop::SnatNoMapping,
        LbDrop::SnatFiltered,
        LbDrop::DsrNotBackend,
    ];

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            LbDrop::NoHealthyBackend => "lb_no_healthy_backend",
            LbDrop::TableFull => "lb_conn_table_full",
            LbDrop::TupleCollision => "lb_tuple_collision",
            LbDrop::BackendRemoved => "lb_backend_removed",
            LbDrop::BackendUnhealthy => "lb_backend_unhealthy_reset",
            LbDrop::SnatExhausted => "snat_port_exhausted",
            LbDrop::SnatNotMember => "snat_not_member",
            LbDrop::VipConnLimit => "lb_vip_conn_limit",
            LbDrop::SynCookieInvalid => "lb_syn_cookie_invalid",
            LbDrop::SynProxyPending => "lb_syn_proxy_pending",
            LbDrop::SnatNoMapping => "snat_no_mapping",
            LbDrop::SnatFiltered => "snat_filtered",
            LbDrop::DsrNotBackend => "lb_dsr_not_backend",
        }
    }
}

impl fmt::Display for LbDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the load balancer decided for a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Rewrite with `rewrite` and forward. `conn` names the connection.
    Forward {
        /// The header rewrite for this direction.
        rewrite: Rewrite,
        /// Direction of the packet within its connection.
        dir: Dir,
        /// The connection in the core's table.
        conn: ConnRef,
        /// True when this packet created the connection.
        new: bool,
    },
    /// Drop, for this reason.
    Drop(LbDrop),
    /// Not load-balancer traffic (no VIP, no tracked connection).
    NotHandled,
    /// A SYN to a SYN-proxied VIP: answer it with a SYN-ACK whose sequence
    /// number is `cookie`, announcing `mss`. Nothing is tracked.
    /// `rewrite` is the DNAT the connection would take now (the backend's
    /// security group may be asked whether it would be admitted).
    Cookie {
        /// The SYN-ACK's sequence number.
        cookie: u32,
        /// The MSS the cookie carries.
        mss: u16,
        /// The DNAT to the backend Maglev picks now.
        rewrite: Rewrite,
    },
    /// A packet of a SYN-proxied connection whose backend has not answered
    /// yet (its first: the client's ACK of a cookie): sent on to the
    /// backend as the SYN `seg`, its payload dropped (the client sends it
    /// again), with the DNAT `rewrite`.
    ProxySyn {
        /// The DNAT to the backend.
        rewrite: Rewrite,
        /// The connection in the core's table.
        conn: ConnRef,
        /// True when this packet created the connection.
        new: bool,
        /// The SYN to write over it.
        seg: Seg,
    },
    /// The backend's SYN-ACK of a SYN-proxied connection: answered with
    /// the ACK `seg` back to the backend, not passed on (the client has
    /// had its SYN-ACK).
    ProxyAck {
        /// The connection in the core's table.
        conn: ConnRef,
        /// The ACK to write over it.
        seg: Seg,
    },
}

/// What a tracked connection is.
#[derive(Debug, Clone)]
pub enum ConnKind {
    /// A connection to a VIP, DNATed to a backend.
    Dnat {
        /// The VIP snapshot it was last validated against.
        vip: Arc<Vip>,
        /// The backend's address.
        backend: IpAddr,
        /// The backend's port.
        port: u16,
    },
    /// An outbound connection, SNATed, or one its mapping's filtering let
    /// in from the wire (`inbound`).
    Snat {
        /// The public address.
        public: IpAddr,
        /// The public port.
        port: u16,
        /// Opened by a packet from the wire: its first packet went to the
        /// public address (the binding DNATs it to the VM).
        inbound: bool,
    },
    /// A connection a stateful allow admitted, without NAT (VM to VM, or
    /// out of the uplink from a vnet without SNAT): tracked so that its
    /// admission holds for its life, whatever the rules become.
    Plain {
        /// It left through the uplink: its replies come from the wire.
        uplink: bool,
    },
}

impl ConnKind {
    /// The connection table's timeout class of a connection of this kind.
    pub fn class(&self) -> u8 {
        match self {
            ConnKind::Snat { .. } => SNAT_CLASS,
            ConnKind::Dnat { vip, .. } => vip.config().class(),
            _ => 0,
        }
    }
}

/// Per connection: what it is and its NAT rewrites.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// DNAT, SNAT or plain.
    pub kind: ConnKind,
    /// Rewrites per direction.
    pub nat: NatBinding,
    /// The SYN proxy's part, for a connection opened by a cookie.
    pub proxy: Option<Proxied>,
}

impl Proxied {
    /// The SYN the backend gets in the client's name.
    fn syn(&self) -> Seg {
        Seg {
            flags: TCP_SYN,
            seq: self.client_isn,
            ack: 0,
            window: self.window,
            mss: Some(self.mss),
        }
    }
}

/// A connection whose handshake the SYN proxy made with the client: what
/// it needs to make the backend's handshake and to shift sequence numbers
/// between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The cookie: the initial sequence number the client was given.
    pub cookie: u32,
    /// The client's initial sequence number.
    pub client_isn: u32,
    /// The MSS the cookie carried, for the backend's SYN.
    pub mss: u16,
    /// The client's window, for the segments sent in its name.
    pub window: u16,
    /// The backend answered (its SYN-ACK set the sequence offset, now in
    /// the connection's NAT binding), or reset.
    pub answered: bool,
    /// The client reset the connection before the backend answered: the
    /// backend's SYN-ACK is answered with a reset.
    pub reset: bool,
}

/// Load balancer counters of one core.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbStats {
    /// Connections created through a VIP.
    pub new_dnat: u64,
    /// Outbound connections created with SNAT.
    pub new_snat: u64,
    /// Connections a SNAT mapping's filtering let in from the wire.
    pub new_snat_inbound: u64,
    /// Connections admitted without NAT.
    pub new_plain: u64,
    /// Connections admitted while the table was full: forwarded without
    /// tracking (their admission does not outlive their cached flows).
    pub untracked: u64,
    /// SYNs answered with a cookie.
    pub syn_cookies_sent: u64,
    /// Connections opened by the ACK of a cookie (counted in `new_dnat`
    /// too).
    pub syn_proxied: u64,
    /// Drops by reason (indexed as [`LbDrop::ALL`]).
    pub drops: [u64; LbDrop::ALL.len()],
}

impl LbStats {
    /// Drops counted for `reason`.
    pub fn dropped(&self, reason: LbDrop) -> u64 {
        self.drops[reason as usize]
    }
}

/// Worker `i` of `n`'s share of a limit of `max`: the shares of all
/// workers add up to `max` exactly.
fn share_of(max: u32, (i, n): (u32, u32)) -> u32 {
    let n = n.max(1);
    max / n + u32::from(i < max % n)
}

/// The connection table's timeout class of SNAT connections.
pub const SNAT_CLASS: u8 = 1;
/// The connection table's timeout class of a Mux's connections: tracked
/// one way (their replies go straight from the DIPs to the clients).
pub const MUX_CLASS: u8 = 2;

/// Embryonic connections a VIP at its limit looks at for one of its own.
const VIP_EVICT_SCAN: usize = 32;

/// TCP flags the tracker reads here.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A backend of a VIP: (VIP address, VIP port, protocol, backend address,
/// backend port).
pub type BackendKey = (IpAddr, u16, u8, IpAddr, u16);

/// One backend's counters on one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Connections created to it.
    pub new_conns: u64,
    /// Connections to it tracked now.
    pub active: u64,
}

/// Each VIP's backend set as one core last read it, by VIP number. Reading
/// a VIP's current set (an `ArcSwap` load) takes two locked instructions
/// (its debt taken and paid back), and on x86 each waits for every store
/// before it to drain: a new connection's pick, behind the stores of the
/// connections before it, paid that three times. An entry holds while the
/// VIP is the same object and its health clock reads as it did when the
/// set was read (a health change swaps the set, then ticks the clock).
#[derive(Debug, Default)]
struct SetCache(Vec<Option<CachedSet>>);

#[derive(Debug)]
struct CachedSet {
    /// The VIP (held weakly: its allocation, hence its address, stays
    /// while the entry does, so no other VIP can take it).
    vip: std::sync::Weak<Vip>,
    /// Its health clock when the set was read.
    seen: u64,
    set: Arc<BackendSet>,
}

impl SetCache {
    /// `vip`'s current backend set, if this cache has it.
    #[inline]
    fn get(&self, vip: &Arc<Vip>) -> Option<&BackendSet> {
        let c = self.0.get(usize::from(vip.id))?.as_ref()?;
        (std::ptr::eq(c.vip.as_ptr(), Arc::as_ptr(vip)) && c.seen == vip.clock.now())
            .then_some(&*c.set)
    }

    /// Forgets every set.
    fn clear(&mut self) {
        self.0.clear();
    }

    /// [`Vip::pick`], from this cache (read again when stale), with `k`'s
    /// flow hash if `given` ([`Vip::pick_hashed`]).
    #[inline]
    fn pick(&mut self, vip: &Arc<Vip>, k: &FlowKey, given: Option<PickHash>) -> Option<usize> {
        if let Some(set) = self.get(vip) {
            return vip.pick_hashed(set, k, given);
        }
        // The clock first: a change after it ticks it again.
        let seen = vip.clock.now();
        let set = vip.backends();
        let pick = vip.pick_hashed(&set, k, given);
        let i = usize::from(vip.id);
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        if let Some(e) = self.0.get_mut(i) {
            *e = Some(CachedSet {
                vip: Arc::downgrade(vip),
                seen,
                set,
            });
        }
        pick
    }
}

/// The load balancer of one worker core.
#[derive(Debug)]
pub struct LbCore {
    conns: ConnTable<ConnInfo>,
    held: Held,
    /// This core's number among the workers sharing each VIP's connection
    /// limit, and how many they are.
    shard: (u32, u32),
    stats: LbStats,
    /// The SYN cookies' secret (every worker's core has the same).
    cookies: SynCookies,
    /// The VIPs' backend sets as last read.
    sets: SetCache,
}

/// What tracked connections hold beyond their table slot: SNAT ports, and
/// their VIPs' connection counts. Every connection that leaves the table
/// goes through [`Held::release`].
#[derive(Debug)]
struct Held {
    snat: Option<SnatAllocator>,
    /// DNAT connections tracked per VIP.
    per_vip: VipCounts,
}

/// A VIP object and the connections opened to each of its backends (by
/// index in its configuration), with the backend's key.
type OpenedBy = (Weak<Vip>, Vec<(BackendKey, u64)>);

/// DNAT connections tracked per VIP, by the VIP's frontend key (so that a
/// VIP recompiled by a policy change keeps its count: a connection holds
/// the VIP object current when it last had a packet, old or new), and
/// the connections opened to each backend. Each key has a counter of its
/// own, found through a map; the VIP object counted last is remembered
/// with its counter, so that a connection opened or released of the same
/// VIP as the one before (most of them, in a storm) costs a pointer
/// compare instead of a map lookup: the two took 4% of a new connection's
/// instructions in a full table. New connections are counted by backend
/// index for the VIP object they were opened with, and those counts
/// folded into a map by backend (address, port) when the key's VIP object
/// changes: a map update per connection cost another 2%.
#[derive(Debug, Default)]
struct VipCounts {
    /// Each key's counter (counters are never taken back: there are as
    /// many as VIP keys this worker has ever tracked a connection of).
    slots: HashMap<VipKey, usize, std::hash::BuildHasherDefault<crate::conntrack::IdentityHasher>>,
    counts: Vec<u32>,
    /// By counter: the VIP object of the key whose new connections are
    /// counted by backend index, with each backend's key and count.
    opened: Vec<Option<OpenedBy>>,
    /// New connections per backend of the VIP objects `opened` no longer
    /// counts for.
    folded: rustc_hash::FxHashMap<BackendKey, u64>,
    /// The VIP object counted last, and its key's counter. (Weak
    /// references keep a VIP's address from being another's while
    /// remembered, not its tables.)
    last: Option<(Weak<Vip>, usize)>,
}

impl VipCounts {
    /// The counter of `key`, made on first use.
    fn slot_of_key(&mut self, key: VipKey) -> usize {
        let next = self.counts.len();
        let s = *self.slots.entry(key).or_insert(next);
        if s == next {
            self.counts.push(0);
            self.opened.push(None);
        }
        s
    }

    /// The counter of `vip`'s key.
    #[inline]
    fn slot(&mut self, vip: &Arc<Vip>) -> usize {
        if let Some((v, s)) = &self.last
            && std::ptr::eq(v.as_ptr(), Arc::as_ptr(vip))
        {
            return *s;
        }
        let s = self.slot_of_key(VipKey::of_cfg(vip.config()));
        self.last = Some((Arc::downgrade(vip), s));
        s
    }

    /// A connection opened to backend `b` (an index into `vip`'s
    /// configuration) of `vip`, whose counter is `s`.
    fn open(&mut self, vip: &Arc<Vip>, s: usize, b: usize) {
        self.add(s);
        let Some(o) = self.opened.get_mut(s) else {
            return;
        };
        let counted = o
            .as_ref()
            .is_some_and(|(v, _)| std::ptr::eq(v.as_ptr(), Arc::as_ptr(vip)));
        if !counted {
            // Another object of the key (a policy change): what was
            // counted for the one before goes to the map.
            for (k, n) in o.take().into_iter().flat_map(|(_, c)| c) {
                if n > 0 {
                    *self.folded.entry(k).or_default() += n;
                }
            }
            let c = vip.config();
            let keys = c
                .backends
                .iter()
                .map(|be| ((c.addr, c.port, c.proto, be.ip, be.port), 0))
                .collect();
            *o = Some((Arc::downgrade(vip), keys));
        }
        if let Some((_, c)) = o
            && let Some((_, n)) = c.get_mut(b)
        {
            *n += 1;
        }
    }

    /// New connections per backend, by (VIP address, port, protocol,
    /// backend address, port).
    fn opened_by_backend(&self) -> rustc_hash::FxHashMap<BackendKey, u64> {
        let mut out = self.folded.clone();
        for (k, n) in self.opened.iter().flatten().flat_map(|(_, c)| c) {
            if *n > 0 {
                *out.entry(*k).or_default() += n;
            }
        }
        out
    }

    /// The connections of `vip` tracked.
    fn of(&mut self, vip: &Arc<Vip>) -> u32 {
        let s = self.slot(vip);
        self.counts.get(s).copied().unwrap_or(0)
    }

    /// One more connection of the VIP whose counter is `s`.
    fn add(&mut self, s: usize) {
        if let Some(n) = self.counts.get_mut(s) {
            *n += 1;
        }
    }

    /// One connection of `vip` fewer.
    fn sub(&mut self, vip: &Arc<Vip>) {
        let s = self.slot(vip);
        debug_assert!(
            self.counts.get(s).is_some_and(|&n| n > 0),
            "vip {:?}: a connection released that was never counted",
            vip.config().name
        );
        if let Some(n) = self.counts.get_mut(s) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Held {
    fn release(&mut self, c: &Conn<ConnInfo>) {
        match &c.value.kind {
            ConnKind::Snat {
                public,
                port,
                inbound,
            } => {
                if let Some(s) = self.snat.as_mut() {
                    // The far end: where the first packet came from, or went.
                    let remote = if *inbound { c.orig.src() } else { c.orig.dst() };
                    s.release(*public, *port, c.orig.proto, remote);
                }
            }
            ConnKind::Dnat { vip, .. } => self.per_vip.sub(vip),
            _ => {}
        }
    }
}

impl LbCore {
    /// A core tracking up to `capacity` connections, with SNAT if given.
    ///
    /// SNAT connections keep the SNAT configuration's timeouts (in a
    /// timeout class of their own, [`SNAT_CLASS`]).
    pub fn new(capacity: usize, timeouts: Timeouts, snat: Option<SnatAllocator>) -> Self {
        let snat_timeouts = snat
            .as_ref()
            .map_or(timeouts, |s| s.config().timeouts.conn_timeouts(&timeouts));
        LbCore {
            conns: ConnTable::with_classes(capacity, vec![timeouts, snat_timeouts, timeouts])
                .with_one_way(MUX_CLASS),
            held: Held {
                snat,
                per_vip: VipCounts::default(),
            },
            shard: (0, 1),
            stats: LbStats::default(),
            cookies: SynCookies::new(),
            sets: SetCache::default(),
        }
    }

    /// Bytes [`LbCore::preallocate`] commits for a core tracking up to
    /// `capacity` connections.
    pub fn table_bytes(capacity: usize) -> usize {
        ConnTable::<ConnInfo>::bytes_for(capacity)
    }

    /// Commits the memory of this core's connection table now
    /// ([`ConnTable::preallocate`]); `Err` when the kernel could not.
    pub fn preallocate(&mut self) -> Result<(), std::io::Error> {
        self.conns.preallocate()
    }

    /// This core with the SYN cookies' secret `cookies` (the same for all
    /// workers).
    pub fn with_cookies(mut self, cookies: SynCookies) -> Self {
        self.cookies = cookies;
        self
    }

    /// Forgets the VIPs' backend sets this core has read: called when the
    /// caller reads the VIPs' epochs again (a new snapshot, a tick of the
    /// health clock), so that every set it picks from afterwards is read
    /// after those epochs, never older than one of them (a health change
    /// swaps a set before it ticks the clock: a set cached just before the
    /// swap could otherwise outlive the epoch read after it). It also lets
    /// go of the sets of VIPs that are gone.
    pub fn forget_sets(&mut self) {
        self.sets.clear();
    }

    /// Checks and gives out cookies of `cookies` from now on (those of
    /// the secret before no longer check).
    pub fn set_cookies(&mut self, cookies: SynCookies) {
        self.cookies = cookies;
    }

    /// Counters per backend: connections created, and tracked now (a walk
    /// of the connection table: for the control path, not per packet).
    pub fn backend_counts(&self) -> HashMap<BackendKey, BackendCounts> {
        let mut out: HashMap<BackendKey, BackendCounts> = self
            .held
            .per_vip
            .opened_by_backend()
            .into_iter()
            .map(|(k, n)| {
                (
                    k,
                    BackendCounts {
                        new_conns: n,
                        active: 0,
                    },
                )
            })
            .collect();
        for (_, c) in self.conns.iter() {
            if let ConnKind::Dnat { vip, backend, port } = &c.value.kind {
                let v = vip.config();
                out.entry((v.addr, v.port, v.proto, *backend, *port))
                    .or_default()
                    .active += 1;
            }
        }
        out
    }

    /// Counters.
    pub fn stats(&self) -> &LbStats {
        &self.stats
    }

    /// This core as worker `index` of `n`: each VIP's connection limit is
    /// shared among them as evenly as whole numbers allow (flows are
    /// spread evenly over workers), the shares adding up to the limit.
    pub fn with_shard(mut self, index: u32, n: u32) -> Self {
        let n = n.max(1);
        self.shard = (index.min(n - 1), n);
        self
    }

    /// The connection table.
    pub fn conns(&self) -> &ConnTable<ConnInfo> {
        &self.conns
    }

    /// The connection table, to restore saved connections.
    pub(crate) fn conns_mut(&mut self) -> &mut ConnTable<ConnInfo> {
        &mut self.conns
    }

    /// Counts one more connection of the VIP `key`.
    pub(crate) fn count_vip(&mut self, key: VipKey) {
        let s = self.held.per_vip.slot_of_key(key);
        self.held.per_vip.add(s);
    }

    /// The SNAT allocator.
    pub fn snat(&self) -> Option<&SnatAllocator> {
        self.held.snat.as_ref()
    }

    /// The SNAT allocator, to add or remove member VMs.
    pub fn snat_mut(&mut self) -> Option<&mut SnatAllocator> {
        self.held.snat.as_mut()
    }

    fn drop(&mut self, r: LbDrop) -> Decision {
        self.stats.drops[r as usize] += 1;
        Decision::Drop(r)
    }

    /// Looks up a tracked connection for `key`, revalidating a DNAT one
    /// against the current snapshot. `Ok(None)` means "not tracked".
    fn existing(
        &mut self,
        vips: Option<&Vips>,
        key: &FlowKey,
        seg: &Seg,
        now: u64,
    ) -> Result<Option<Decision>, LbDrop> {
        let tcp_flags = seg.flags;
        let held = &mut self.held;
        let Some((i, dir)) = self.conns.lookup(key, now, |c| held.release(c)) else {
            return Ok(None);
        };
        // A fresh SYN from the client on a finished connection's tuple (the
        // client reused its port): a new connection, decided afresh, as
        // Linux conntrack does in TIME_WAIT. It must not inherit a backend
        // that may since have been drained or gone down.
        if dir == Dir::Orig && self.conns.get(i).is_some_and(|c| reopens(c, tcp_flags)) {
            self.remove_conn(i);
            return Ok(None);
        }
        let mut verdict = Ok(());
        let mut refresh = None;
        if let Some(Conn {
            orig,
            value:
                ConnInfo {
                    kind: ConnKind::Dnat { vip, backend, port },
                    ..
                },
            ..
        }) = self.conns.get(i)
        {
            match vips.map(|v| v.lookup(orig)).unwrap_or(Some(vip)) {
                Some(cur) => {
                    // The same VIP keeps its backends; its health may have
                    // changed in place.
                    let same = Arc::ptr_eq(cur, vip);
                    let reset = cur.config().on_unhealthy == OnUnhealthy::Reset;
                    // (A VIP whose mode changed has other connections:
                    // NAT, tracking, where its packets go.)
                    if cur.config().mode != vip.config().mode {
                        verdict = Err(LbDrop::BackendRemoved);
                    } else if !same || reset {
                        match cur.backend_index(*backend, *port) {
                            None => verdict = Err(LbDrop::BackendRemoved),
                            Some(b) if reset && !cur.is_healthy(b) => {
                                verdict = Err(LbDrop::BackendUnhealthy)
                            }
                            Some(_) if !same => refresh = Some(cur.clone()),
                            Some(_) => {}
                        }
                    }
                }
                None => verdict = Err(LbDrop::BackendRemoved),
            }
        }
        if let Err(r) = verdict {
            self.remove_conn(i);
            return Err(r);
        }
        if let (
            Some(cur),
            Some(ConnInfo {
                kind: ConnKind::Dnat { vip, .. },
                ..
            }),
        ) = (refresh, self.conns.value_mut(i))
        {
            *vip = cur;
        }
        self.conns.touch(i, dir, tcp_flags, now);
        let Some(conn) = self.conns.conn_ref(i) else {
            return Ok(None);
        };
        if let Some(px) = self.conns.get(i).and_then(|c| c.value.proxy) {
            let synack = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
            if !px.answered || (dir == Dir::Reply && synack) {
                return self.proxy_step(i, conn, dir, seg, px);
            }
        }
        let nat = self.conns.get(i).map(|c| c.value.nat).unwrap_or_default();
        let rewrite = if dir == Dir::Orig {
            nat.forward
        } else {
            nat.reverse
        };
        Ok(Some(Decision::Forward {
            rewrite,
            dir,
            conn,
            new: false,
        }))
    }

    /// A packet arriving for a VIP, or a reply from a backend: tracked
    /// connections get their rewrite; a new connection to a VIP gets a
    /// backend by Maglev over the healthy backends and a DNAT binding.
    pub fn process(&mut self, vips: &Vips, key: &FlowKey, tcp_flags: u8, now: u64) -> Decision {
        let seg = Seg::with_flags(tcp_flags);
        self.process_seg(vips, key, &seg, now)
    }

    /// Starts loading the Maglev slot of a new connection to a VIP of
    /// `vips` with key `key` ([`Vip::prefetch_pick`]), before
    /// [`LbCore::prefetch_new`] picks. Returns the key's flow hash, for the
    /// stages that pick. (The switch's burst uses
    /// [`LbCore::prefetch_pick_of`], which returns the VIP too.)
    #[inline]
    pub fn prefetch_pick(&self, vips: &Vips, key: &FlowKey) -> Option<PickHash> {
        self.prefetch_pick_of(vips, key).map(|(h, _)| h)
    }

    /// [`LbCore::prefetch_pick`], returning the VIP too, for
    /// [`LbCore::prefetch_new_to`] (so that the next stage does not look
    /// it up again).
    #[inline]
    pub fn prefetch_pick_of<'v>(
        &self,
        vips: &'v Vips,
        key: &FlowKey,
    ) -> Option<(PickHash, &'v Arc<Vip>)> {
        let vip = vips.lookup(key)?;
        if vip.config().mode != VipMode::Local {
            return None;
        }
        let h = match self.sets.get(vip) {
            Some(set) => vip.prefetch_pick_in(set, key),
            None => vip.prefetch_pick(key),
        };
        Some((h, vip))
    }

    /// Starts loading the connection-table bucket of `key` into the cache
    /// without waiting for it: the switch calls it for the packets of a
    /// burst that missed its flow table, before deciding any of them, so
    /// that their connection lookups do not each wait for memory in turn.
    #[inline]
    pub fn prefetch(&self, key: &FlowKey) {
        self.conns.prefetch(self.conns.hash(key));
    }

    /// [`LbCore::prefetch`], and for a packet to one of `vips`'
    /// [`VipMode::Local`] VIPs the bucket of the reply key its connection
    /// would have: the backend Maglev picks for it, as [`LbCore::process`]
    /// would. A new connection's insert looks both keys up, and the reply
    /// key is known no earlier than the pick: loaded with the burst's other
    /// misses, it does not wait for memory on its own. (A packet of a
    /// connection already tracked only wastes the pick. A Mux's connections
    /// have no reply here, and a DSR VIP's backend is the Mux's choice.)
    /// Returns that reply key, for the caller's own tables. `given`: the
    /// key's flow hash, if [`LbCore::prefetch_pick`] gave it. (The
    /// switch's burst uses [`LbCore::prefetch_new_to`], given the VIP.)
    #[inline]
    pub fn prefetch_new(
        &self,
        vips: &Vips,
        key: &FlowKey,
        given: Option<PickHash>,
    ) -> Option<FlowKey> {
        match vips.lookup(key) {
            Some(vip) => self.prefetch_new_to(vip, key, given),
            None => {
                self.prefetch(key);
                None
            }
        }
    }

    /// [`LbCore::prefetch_new`] for a packet to `vip` (the VIP its key is
    /// addressed to, as [`LbCore::prefetch_pick_of`] found it).
    #[inline]
    pub fn prefetch_new_to(
        &self,
        vip: &Arc<Vip>,
        key: &FlowKey,
        given: Option<PickHash>,
    ) -> Option<FlowKey> {
        self.prefetch(key);
        let c = vip.config();
        if c.mode != VipMode::Local {
            return None;
        }
        let b = match self.sets.get(vip) {
            Some(set) => vip.pick_hashed(set, key, given),
            None => vip.pick_hashed(&vip.set.load(), key, given),
        };
        let be = c.backends.get(b?)?;
        let reply = NatBinding::dnat_reply_key(key, be.ip, be.port);
        self.conns.prefetch(self.conns.hash(&reply));
        Some(reply)
    }

    /// [`LbCore::process`] for a packet whose TCP header is `seg` (what a
    /// VIP with a SYN proxy needs: sequence numbers, window, MSS).
    pub fn process_seg(&mut self, vips: &Vips, key: &FlowKey, seg: &Seg, now: u64) -> Decision {
        self.process_to(vips, key, seg, now, Pick::Maglev(None))
    }

    /// [`LbCore::process_seg`] with the key's flow hash, as
    /// [`LbCore::prefetch_pick`] gave it for this key.
    pub fn process_hashed(
        &mut self,
        vips: &Vips,
        key: &FlowKey,
        seg: &Seg,
        now: u64,
        given: Option<PickHash>,
    ) -> Decision {
        self.process_to(vips, key, seg, now, Pick::Maglev(given))
    }

    /// [`LbCore::process_seg`] for a packet a Mux sent to the backend at
    /// `dip` (IP in IP): a new connection to a [`VipMode::Dsr`] VIP goes
    /// to that backend, whatever its health here (the Mux chose it);
    /// a packet to a VIP of another mode, to an address that is none of
    /// its backends, or that matches any tracked connection but this
    /// VIP's to this backend (its client's side), is dropped
    /// (`lb_dsr_not_backend`), touching nothing. The one exception: the
    /// client's fresh SYN on a finished connection of this VIP (the client
    /// reused its port) opens a new one to `dip`, whichever backend the
    /// old one had: the Mux decides a new connection afresh, and may have
    /// picked another backend since.
    pub fn process_dsr(
        &mut self,
        vips: &Vips,
        key: &FlowKey,
        seg: &Seg,
        now: u64,
        dip: IpAddr,
    ) -> Decision {
        // Only a client's packet to a DSR VIP that has `dip`, and, if
        // tracked, one of that VIP's connections to that backend: a packet
        // from the wire must not reach (or touch) any other live connection
        // (a client's fresh SYN replaces a finished one of the VIP's).
        let pinned = vips
            .lookup(key)
            .filter(|v| v.config().mode == VipMode::Dsr)
            .and_then(|v| v.config().backends.iter().position(|b| b.ip == dip));
        let theirs = |c: &Conn<ConnInfo>| {
            matches!(&c.value.kind, ConnKind::Dnat { vip, backend, .. }
                if vip.config().mode == VipMode::Dsr && *backend == dip)
        };
        let replaced = |c: &Conn<ConnInfo>| {
            reopens(c, seg.flags)
                && matches!(&c.value.kind, ConnKind::Dnat { vip, .. }
                    if vip.config().mode == VipMode::Dsr)
        };
        let ok = match self.conns.peek(key) {
            None => true,
            Some((i, dir)) => {
                dir == Dir::Orig && self.conns.get(i).is_some_and(|c| theirs(c) || replaced(c))
            }
        };
        match pinned.filter(|_| ok) {
            Some(b) => self.process_to(vips, key, seg, now, Pick::Pinned(b)),
            None => self.drop(LbDrop::DsrNotBackend),
        }
    }

    /// [`LbCore::process_seg`], a new connection going to the backend
    /// `pick` says.
    fn process_to(
        &mut self,
        vips: &Vips,
        key: &FlowKey,
        seg: &Seg,
        now: u64,
        pick: Pick,
    ) -> Decision {
        match self.existing(Some(vips), key, seg, now) {
            Ok(Some(d)) => return d,
            Err(r) => return self.drop(r),
            Ok(None) => {}
        }
        let Some(vip) = vips.lookup(key) else {
            return Decision::NotHandled;
        };
        // A DSR VIP is reached only through a Mux (with its backend).
        let given = match pick {
            Pick::Maglev(given) => given,
            Pick::Pinned(_) => None,
        };
        if vip.config().mode == VipMode::Dsr && !matches!(pick, Pick::Pinned(_)) {
            return Decision::NotHandled;
        }
        if let Pick::Pinned(_) = pick {
            return match self.open_dnat(vip, key, seg.flags, now, None, pick) {
                Ok((rewrite, conn)) => Decision::Forward {
                    rewrite,
                    dir: Dir::Orig,
                    conn,
                    new: true,
                },
                Err(r) => self.drop(r),
            };
        }
        let mode = vip.config().syn_proxy;
        if mode != SynProxy::Off && key.proto == 6 {
            let flags = seg.flags & (TCP_SYN | TCP_ACK | TCP_RST);
            if flags == TCP_SYN && (mode == SynProxy::On || self.under_pressure(vip)) {
                let Some(b) = self.sets.pick(vip, key, given) else {
                    return self.drop(LbDrop::NoHealthyBackend);
                };
                let be = vip.config().backends[b];
                let (cookie, mss) = self.cookies.make(key, seg.seq, seg.mss, now);
                self.stats.syn_cookies_sent += 1;
                return Decision::Cookie {
                    cookie,
                    mss,
                    rewrite: NatBinding::dnat(key, be.ip, be.port).forward,
                };
            }
            if flags == TCP_ACK {
                let client_isn = seg.seq.wrapping_sub(1);
                let cookie = seg.ack.wrapping_sub(1);
                if let Some(mss) = self.cookies.check(key, client_isn, cookie, now) {
                    let px = Proxied {
                        cookie,
                        client_isn,
                        mss,
                        window: seg.window,
                        answered: false,
                        reset: false,
                    };
                    return match self.open_dnat(vip, key, seg.flags, now, Some(px), pick) {
                        Ok((rewrite, conn)) => {
                            self.stats.syn_proxied += 1;
                            Decision::ProxySyn {
                                rewrite,
                                conn,
                                new: true,
                                seg: px.syn(),
                            }
                        }
                        Err(r) => self.drop(r),
                    };
                }
            }
            // Under `auto`, anything else is what it would be without the
            // proxy (a SYN, a connection picked up mid-stream). Under `on`,
            // only a SYN or a cookie's ACK opens a connection.
            if mode == SynProxy::On && flags != TCP_SYN {
                return self.drop(LbDrop::SynCookieInvalid);
            }
        }
        match self.open_dnat(vip, key, seg.flags, now, None, pick) {
            Ok((rewrite, conn)) => Decision::Forward {
                rewrite,
                dir: Dir::Orig,
                conn,
                new: true,
            },
            Err(r) => self.drop(r),
        }
    }

    /// Whether a VIP with `syn_proxy = "auto"` answers SYNs itself now: at
    /// this worker's share of its limit, or with the table full.
    fn under_pressure(&mut self, vip: &Arc<Vip>) -> bool {
        let cfg = vip.config();
        let at_limit =
            cfg.max_conns > 0 && self.held.per_vip.of(vip) >= share_of(cfg.max_conns, self.shard);
        at_limit || self.conns.len() >= self.conns.capacity()
    }

    /// Opens a connection to `vip` for a packet with `key`: a backend by
    /// Maglev over the healthy ones (or the backend `pick` pins), the VIP's
    /// limit, the DNAT binding (none for a Mux: the packet goes to the
    /// backend unchanged, in IP in IP). Returns the forward rewrite and
    /// the connection.
    fn open_dnat(
        &mut self,
        vip: &Arc<Vip>,
        key: &FlowKey,
        tcp_flags: u8,
        now: u64,
        proxy: Option<Proxied>,
        pick: Pick,
    ) -> Result<(Rewrite, ConnRef), LbDrop> {
        let b = match pick {
            Pick::Pinned(b) => b,
            Pick::Maglev(given) => self
                .sets
                .pick(vip, key, given)
                .ok_or(LbDrop::NoHealthyBackend)?,
        };
        let be = *vip
            .config()
            .backends
            .get(b)
            .ok_or(LbDrop::NoHealthyBackend)?;
        let (nat, reply) = match vip.config().mode {
            VipMode::Mux => (NatBinding::default(), key.reversed()),
            _ => (
                NatBinding::dnat(key, be.ip, be.port),
                NatBinding::dnat_reply_key(key, be.ip, be.port),
            ),
        };
        debug_assert_eq!(reply, nat.reply_key(key));
        if vip.config().max_conns > 0 && !self.room_for(vip, &reply, now) {
            return Err(LbDrop::VipConnLimit);
        }
        let info = ConnInfo {
            kind: ConnKind::Dnat {
                vip: vip.clone(),
                backend: be.ip,
                port: be.port,
            },
            nat,
            proxy,
        };
        let conn = self.open_conn_to(key, reply, tcp_flags, now, info)?;
        self.stats.new_dnat += 1;
        let s = self.held.per_vip.slot(vip);
        self.held.per_vip.open(vip, s, b);
        Ok((nat.forward, conn))
    }

    /// A packet of a SYN-proxied connection (slot `i`, reference `conn`)
    /// before its backend answered, or a SYN-ACK of its backend:
    /// - from the client, before the answer: the backend's SYN again (the
    ///   first was lost, or this is data sent before the backend answered);
    /// - the client's SYN again (same sequence number): answered with the
    ///   connection's own cookie, the connection kept;
    /// - a new SYN from the client (another sequence number): the
    ///   connection is forgotten (the SYN gets a cookie again);
    /// - the client's reset: noted (and dropped), so that the backend's
    ///   SYN-ACK is answered with a reset and the connection forgotten;
    /// - the backend's SYN-ACK: sets the sequence offset (the client was
    ///   told `cookie`, the backend chose its own) in the NAT binding and
    ///   is answered with the ACK that completes the backend's handshake
    ///   (again for a repeated SYN-ACK, leaving the offset as it was);
    /// - the backend's RST before that: passed on, its sequence number
    ///   made the one the client expects;
    /// - anything else from the backend before its answer: dropped.
    fn proxy_step(
        &mut self,
        i: u32,
        conn: ConnRef,
        dir: Dir,
        seg: &Seg,
        px: Proxied,
    ) -> Result<Option<Decision>, LbDrop> {
        let Some(c) = self.conns.value_mut(i) else {
            return Ok(None);
        };
        let synack = seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
        match dir {
            // The client's SYN again (its first answer was lost or slow):
            // the same cookie again, the connection kept (a fresh cookie
            // would not match the sequence offset the backend's answer
            // sets, and forgetting the connection would leave that answer
            // nothing to belong to).
            Dir::Orig if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN && seg.seq == px.client_isn => {
                self.stats.syn_cookies_sent += 1;
                Ok(Some(Decision::Cookie {
                    cookie: px.cookie,
                    mss: px.mss,
                    rewrite: c.nat.forward,
                }))
            }
            // A new SYN from the client (another sequence number: the
            // client started over): it starts again (with a cookie).
            Dir::Orig if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN => {
                self.remove_conn(i);
                Ok(None)
            }
            // The client gave up: the backend's answer gets a reset.
            Dir::Orig if seg.flags & TCP_RST != 0 => {
                c.proxy = Some(Proxied { reset: true, ..px });
                Err(LbDrop::SynProxyPending)
            }
            Dir::Orig => Ok(Some(Decision::ProxySyn {
                rewrite: c.nat.forward,
                conn,
                new: false,
                seg: px.syn(),
            })),
            Dir::Reply if synack && seg.ack == px.client_isn.wrapping_add(1) && px.reset => {
                self.remove_conn(i);
                Ok(Some(Decision::ProxyAck {
                    conn,
                    seg: Seg {
                        flags: TCP_RST,
                        seq: seg.ack,
                        ack: 0,
                        window: 0,
                        mss: None,
                    },
                }))
            }
            Dir::Reply if synack && seg.ack == px.client_isn.wrapping_add(1) => {
                // (A repeated SYN-ACK leaves the offset as the first set it.)
                if !px.answered {
                    let offset = seg.seq.wrapping_sub(px.cookie);
                    c.nat.forward.shift = SeqShift::ack(offset);
                    c.nat.reverse.shift = SeqShift::seq(offset.wrapping_neg());
                    c.proxy = Some(Proxied {
                        answered: true,
                        ..px
                    });
                }
                Ok(Some(Decision::ProxyAck {
                    conn,
                    seg: Seg {
                        flags: TCP_ACK,
                        seq: seg.ack,
                        ack: seg.seq.wrapping_add(1),
                        window: px.window,
                        mss: None,
                    },
                }))
            }
            Dir::Reply if seg.flags & TCP_RST != 0 && !px.answered => {
                c.nat.reverse.shift =
                    SeqShift::seq(px.cookie.wrapping_add(1).wrapping_sub(seg.seq));
                c.proxy = Some(Proxied {
                    answered: true,
                    ..px
                });
                Ok(Some(Decision::Forward {
                    rewrite: c.nat.reverse,
                    dir,
                    conn,
                    new: false,
                }))
            }
            Dir::Reply => Err(LbDrop::SynProxyPending),
        }
    }

    /// Whether a new connection to `vip` fits under
    /// this worker's share of its limit: it does when the VIP has fewer
    /// connections here, or when one of its embryonic ones (near the head
    /// of the embryonic list: the flood's own oldest entries) makes room.
    fn room_for(&mut self, vip: &Arc<Vip>, reply: &FlowKey, now: u64) -> bool {
        let cfg = vip.config();
        let key = VipKey::of_cfg(cfg);
        let share = share_of(cfg.max_conns, self.shard);
        if self.held.per_vip.of(vip) < share {
            return true;
        }
        // A connection that cannot be opened (its reply key is taken) must
        // not cost another its place.
        if self.conns.contains(reply) {
            return true;
        }
        let ours = |c: &Conn<ConnInfo>| matches!(&c.value.kind, ConnKind::Dnat { vip, .. } if VipKey::of_cfg(vip.config()) == key);
        let held = &mut self.held;
        self.conns
            .evict_embryonic(cfg.class(), VIP_EVICT_SCAN, now, ours, |c| held.release(c))
    }

    /// Tracks a new connection whose first packet has `key`; its reply key
    /// and rewrite come from `info.nat`.
    fn open(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        now: u64,
        info: ConnInfo,
    ) -> Result<Decision, LbDrop> {
        let rewrite = info.nat.forward;
        self.open_conn(key, tcp_flags, now, info)
            .map(|conn| Decision::Forward {
                rewrite,
                dir: Dir::Orig,
                conn,
                new: true,
            })
    }

    /// [`LbCore::open`], returning only the connection (in registers: a
    /// caller that read it back out of a returned `Decision` waited for
    /// the store of each part to forward).
    fn open_conn(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        now: u64,
        info: ConnInfo,
    ) -> Result<ConnRef, LbDrop> {
        let reply = info.nat.reply_key(key);
        self.open_conn_to(key, reply, tcp_flags, now, info)
    }

    /// [`LbCore::open_conn`] given the reply key (`info.nat.reply_key(key)`).
    #[inline]
    fn open_conn_to(
        &mut self,
        key: &FlowKey,
        reply: FlowKey,
        tcp_flags: u8,
        now: u64,
        info: ConnInfo,
    ) -> Result<ConnRef, LbDrop> {
        let class = info.kind.class();
        let held = &mut self.held;
        match self
            .conns
            .insert_in(class, *key, reply, tcp_flags, now, info, |c| {
                held.release(c)
            }) {
            // Just inserted: the slot holds it (a missing one would be a
            // table without room).
            Ok(i) => self.conns.conn_ref(i).ok_or(LbDrop::TableFull),
            Err(ConnError::Full { .. }) => Err(LbDrop::TableFull),
            Err(ConnError::Exists) => Err(LbDrop::TupleCollision),
        }
    }

    /// An outbound packet of a VM that policy says leaves through SNAT (or a
    /// reply to one): new connections get a public address and port from
    /// the VM's blocks.
    pub fn process_snat(&mut self, key: &FlowKey, tcp_flags: u8, now: u64) -> Decision {
        let seg = Seg::with_flags(tcp_flags);
        match self.existing(None, key, &seg, now) {
            Ok(Some(d)) => return d,
            Err(r) => return self.drop(r),
            Ok(None) => {}
        }
        let Some(snat) = self.held.snat.as_mut() else {
            return Decision::NotHandled;
        };
        let conns = &self.conns;
        let taken = |public: IpAddr, port: u16| {
            conns.contains(&NatBinding::snat(key, public, port).reply_key(key))
        };
        let (public, port) =
            match snat.allocate(key.src(), key.src_port, key.proto, key.dst(), taken) {
                Ok(p) => p,
                Err(SnatError::NotMember(_)) => return self.drop(LbDrop::SnatNotMember),
                Err(_) => return self.drop(LbDrop::SnatExhausted),
            };
        let nat = NatBinding::snat(key, public, port);
        match self.open_snat(key, tcp_flags, now, (public, port, false), nat) {
            Ok(d) => {
                self.stats.new_snat += 1;
                d
            }
            Err(r) => self.drop(r),
        }
    }

    /// Tracks a SNAT connection on `public` port `port` (`inbound`: opened
    /// from the wire) whose first packet has `key`, with binding `nat`; if
    /// it cannot be tracked, the allocator's hold on the port is released.
    fn open_snat(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        now: u64,
        (public, port, inbound): (IpAddr, u16, bool),
        nat: NatBinding,
    ) -> Result<Decision, LbDrop> {
        let info = ConnInfo {
            kind: ConnKind::Snat {
                public,
                port,
                inbound,
            },
            nat,
            proxy: None,
        };
        self.open(key, tcp_flags, now, info).inspect_err(|_| {
            if let Some(s) = self.held.snat.as_mut() {
                // The far end, as `Held::release` finds it.
                let remote = if inbound { key.src() } else { key.dst() };
                s.release(public, port, key.proto, remote);
            }
        })
    }

    /// A packet from the wire to a SNAT address that no tracked connection
    /// expects ([`LbCore::process`] did not handle it): if an
    /// endpoint-independent mapping holds its destination port and the
    /// mapping's filtering lets its source in, it opens a connection to
    /// the mapping's VM (the binding DNATs it there; the VM's replies leave
    /// from the mapping), counted in `new_snat_inbound`. TCP only by a SYN.
    /// `NotHandled` for an address that is not this vnet's.
    pub fn snat_inbound(&mut self, key: &FlowKey, tcp_flags: u8, now: u64) -> Decision {
        let public = key.dst();
        let Some(snat) = self.held.snat.as_mut().filter(|s| s.is_public(public)) else {
            return Decision::NotHandled;
        };
        if !matches!(key.proto, 6 | 17) {
            return self.drop(LbDrop::SnatNoMapping);
        }
        if key.proto == 6 && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
            return self.drop(LbDrop::SnatFiltered);
        }
        let (ip, port) = match snat.inbound(public, key.dst_port, key.proto, key.src()) {
            Ok(p) => p,
            Err(SnatError::Filtered { .. }) => return self.drop(LbDrop::SnatFiltered),
            Err(_) => return self.drop(LbDrop::SnatNoMapping),
        };
        let nat = NatBinding::dnat(key, ip, port);
        match self.open_snat(key, tcp_flags, now, (public, key.dst_port, true), nat) {
            Ok(d) => {
                self.stats.new_snat_inbound += 1;
                d
            }
            Err(r) => self.drop(r),
        }
    }

    /// True when `key` is the reply direction of a connection a VM opened
    /// out of the uplink without NAT (a packet from the wire for a VM's own
    /// address). Looks without touching anything: a packet from the wire
    /// that matches any other connection must not affect it.
    pub fn is_uplink_reply(&self, key: &FlowKey) -> bool {
        self.conns.peek(key).is_some_and(|(i, dir)| {
            dir == Dir::Reply
                && self
                    .conns
                    .get(i)
                    .is_some_and(|c| matches!(c.value.kind, ConnKind::Plain { uplink: true }))
        })
    }

    /// The decision for a reply from the wire of a connection a VM opened
    /// out of the uplink without NAT ([`LbCore::is_uplink_reply`]); `None`
    /// for any other packet, which it leaves alone.
    pub fn uplink_reply(&mut self, key: &FlowKey, tcp_flags: u8, now: u64) -> Option<Decision> {
        if !self.is_uplink_reply(key) {
            return None;
        }
        let seg = Seg::with_flags(tcp_flags);
        match self.existing(None, key, &seg, now) {
            Ok(d) => d,
            Err(r) => Some(self.drop(r)),
        }
    }

    /// A health probe a Mux sends to a DIP through the VIP (the prober's
    /// packet `key`, to the DIP): tracked as a connection out of the uplink
    /// with `nat` (from the Mux's own address, to the VIP), so that the
    /// DIP's reply, which comes straight from its host to that address,
    /// finds its way back to the prober. Its later packets, both ways, are
    /// this connection's.
    pub fn probe_through(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        now: u64,
        nat: NatBinding,
    ) -> Decision {
        let seg = Seg::with_flags(tcp_flags);
        match self.existing(None, key, &seg, now) {
            Ok(Some(d)) => return d,
            Err(r) => return self.drop(r),
            Ok(None) => {}
        }
        let info = ConnInfo {
            kind: ConnKind::Plain { uplink: true },
            nat,
            proxy: None,
        };
        match self.open(key, tcp_flags, now, info) {
            Ok(d) => d,
            Err(r) => self.drop(r),
        }
    }

    /// Tracks a new connection a stateful allow admitted, without NAT,
    /// whose first packet has `key` (`uplink`: it leaves through the
    /// uplink). The caller has found no connection for it
    /// ([`LbCore::process`] said so). Its later packets, both ways, are this
    /// connection's, whatever the rules become, until it closes or times
    /// out. When the table is full the connection goes untracked
    /// (`NotHandled`, counted in `untracked`): forwarded as admitted, but
    /// judged again once its cached flows are gone.
    pub fn open_plain(&mut self, key: &FlowKey, tcp_flags: u8, now: u64, uplink: bool) -> Decision {
        let info = ConnInfo {
            kind: ConnKind::Plain { uplink },
            nat: NatBinding::default(),
            proxy: None,
        };
        match self.open(key, tcp_flags, now, info) {
            Ok(d) => {
                self.stats.new_plain += 1;
                d
            }
            Err(LbDrop::TableFull) => {
                self.stats.untracked += 1;
                Decision::NotHandled
            }
            Err(r) => self.drop(r),
        }
    }

    /// The rewrite for an ICMP error about a packet of a tracked
    /// connection: `quoted` is the packet the error quotes, as the host that
    /// made the error saw it; the error travels against it, as a packet of
    /// the other direction does, and takes that direction's rewrite. Looks
    /// without touching the connection (errors do not keep one alive).
    pub fn related(&self, quoted: &FlowKey) -> Option<Rewrite> {
        let (i, dir) = self.conns.peek(&quoted.reversed())?;
        let c = self.conns.get(i)?;
        Some(if dir == Dir::Orig {
            c.value.nat.forward
        } else {
            c.value.nat.reverse
        })
    }

    /// Forgets connection `conn` (releasing its SNAT port): its next packet
    /// is decided as a new connection. False when it was gone already.
    pub fn forget(&mut self, conn: ConnRef) -> bool {
        self.conns
            .resolve(conn)
            .is_some_and(|i| self.remove_conn(i))
    }

    /// Removes the connection in slot `i`, releasing what it holds; false
    /// when the slot was empty.
    fn remove_conn(&mut self, i: u32) -> bool {
        match self.conns.remove(i) {
            Some(c) => {
                self.held.release(&c);
                true
            }
            None => false,
        }
    }

    /// Records a packet of tracked connection `conn`, going `dir`, handled
    /// outside [`LbCore::process`] (a flow-table hit in the switch): keeps
    /// its state and idle timer current. `None`, touching nothing, when the
    /// connection is gone (it timed out here, and its slot may since hold
    /// another, while the flow stayed cached): the reference says so by its
    /// generation.
    pub fn touch(
        &mut self,
        conn: ConnRef,
        dir: Dir,
        tcp_flags: u8,
        now: u64,
    ) -> Option<crate::conntrack::ConnState> {
        let i = self.conns.resolve(conn)?;
        self.conns.touch(i, dir, tcp_flags, now)
    }

    /// Starts loading what [`LbCore::touch`] of `conn` reads, without
    /// waiting for it ([`ConnTable::prefetch_slot`]).
    #[inline(always)]
    pub fn prefetch_touch(&self, conn: ConnRef) {
        self.conns.prefetch_slot(conn);
    }

    /// The connection `conn` names, if it is still tracked.
    pub fn conn(&self, conn: ConnRef) -> Option<&Conn<ConnInfo>> {
        self.conns.get(self.conns.resolve(conn)?)
    }

    /// Removes up to `budget` timed-out connections (releasing SNAT ports).
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        let held = &mut self.held;
        self.conns.expire(now, budget, |c| held.release(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snat::SnatConfig;

    const SEC: u64 = 1_000_000_000;
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn vip_cfg(n: usize) -> VipConfig {
        let backends = (0..n)
            .map(|i| Backend {
                ip: ip(&format!("10.1.0.{}", 10 + i)),
                port: 8080,
                weight: 1,
            })
            .collect();
        VipConfig::new("web", ip("10.1.0.100"), 80, 6, backends)
    }

    fn client(i: u32, port: u16) -> FlowKey {
        let a = std::net::Ipv4Addr::from(0xcb00_7100u32 + i); // 203.0.113.x and up
        FlowKey::new(IpAddr::V4(a), port, ip("10.1.0.100"), 80, 6)
    }

    fn backend_of(d: Decision) -> IpAddr {
        match d {
            Decision::Forward {
                rewrite:
                    Rewrite {
                        dst: Some((ip, 8080)),
                        ..
                    },
                ..
            } => ip,
            other => panic!("not a DNAT forward: {other:?}"),
        }
    }

    fn core() -> LbCore {
        LbCore::new(100_000, Timeouts::default(), None)
    }

    #[test]
    fn picks_follow_a_vip_replaced_under_the_same_number_and_its_health() {
        let clock = Arc::new(HealthClock::default());
        let mut lb = core();
        let mut vips = Vips::new();
        let old = vips.insert(
            Vip::new(vip_cfg(3), &[])
                .unwrap()
                .numbered(0, clock.clone()),
        );
        for i in 0..50 {
            let b = backend_of(lb.process(&vips, &client(i, 1000), SYN, 0));
            assert!(old.backend_index(b, 8080).is_some());
        }
        // The next snapshot's VIP 0 has other backends: new connections
        // go to them, not by what this core read of the old one.
        let mut cfg = vip_cfg(2);
        for (i, b) in cfg.backends.iter_mut().enumerate() {
            b.ip = ip(&format!("10.2.0.{}", 10 + i));
        }
        let mut next = Vips::new();
        let new = next.insert(Vip::new(cfg, &[]).unwrap().numbered(0, clock.clone()));
        drop(vips);
        drop(old);
        for i in 100..150 {
            let b = backend_of(lb.process(&next, &client(i, 1000), SYN, 1));
            assert!(new.backend_index(b, 8080).is_some(), "{b}");
        }
        // A health change: none goes to the backend that went down, and
        // the prefetch of a reply key follows the same pick.
        assert!(new.set_health(0, false).unwrap());
        let down = new.config().backends[0].ip;
        for i in 200..300 {
            let k = client(i, 1000);
            let reply = lb.prefetch_new(&next, &k, None).unwrap();
            let b = backend_of(lb.process(&next, &k, SYN, 2));
            assert_ne!(b, down);
            assert_eq!(reply.src(), b);
        }
    }

    #[test]
    fn a_mux_keeps_its_pick_unrewritten_and_tracks_one_way() {
        let mut cfg = vip_cfg(3);
        cfg.mode = VipMode::Mux;
        let mut vips = Vips::new();
        let vip = vips.insert(Vip::new(cfg, &[]).unwrap());
        let mut lb = core();
        let k = client(1, 40000);
        let (conn, first) = match lb.process(&vips, &k, SYN, 0) {
            Decision::Forward {
                rewrite,
                conn,
                new: true,
                ..
            } => {
                // The packet goes on as it came (in IP in IP).
                assert_eq!(rewrite, Rewrite::NONE);
                (conn, lb.conn(conn).unwrap().clone())
            }
            d => panic!("{d:?}"),
        };
        let ConnKind::Dnat { backend, .. } = first.value.kind else {
            panic!("{:?}", first.value.kind)
        };
        // The same backend as Maglev's pick, which any Mux makes alike.
        let picked = vip.config().backends[vip.pick(&k).unwrap()].ip;
        assert_eq!(backend, picked);
        // The client's ACK completes the handshake; its connection is
        // confirmed without ever a reply, and times out as established.
        assert!(matches!(
            lb.process(&vips, &k, ACK, 1),
            Decision::Forward { new: false, .. }
        ));
        let c = lb.conn(conn).unwrap();
        assert_eq!(c.state, ConnState::Tcp(TcpState::Established));
        let i = lb.conns().resolve(conn).unwrap();
        assert_eq!(
            lb.conns().timeout_of(i),
            Some(Timeouts::default().tcp_established)
        );
        // A connection picked up mid-stream (another Mux had its SYN) goes
        // to the same backend, established at once.
        let mut other = core();
        match other.process(&vips, &k, ACK, 5) {
            Decision::Forward {
                conn, new: true, ..
            } => {
                let c = other.conn(conn).unwrap();
                assert_eq!(c.state, ConnState::Tcp(TcpState::Established));
                assert!(matches!(&c.value.kind, ConnKind::Dnat { backend: b, .. } if *b == picked));
                let i = other.conns().resolve(conn).unwrap();
                assert_eq!(
                    other.conns().timeout_of(i),
                    Some(Timeouts::default().tcp_established)
                );
            }
            d => panic!("{d:?}"),
        }
    }

    /// The backend of connection `d` opened or followed (any mode).
    fn conn_backend(lb: &LbCore, d: &Decision) -> IpAddr {
        match d {
            Decision::Forward { conn, .. } => match lb.conn(*conn).map(|c| &c.value.kind) {
                Some(ConnKind::Dnat { backend, .. }) => *backend,
                k => panic!("{k:?}"),
            },
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_reused_port_on_a_finished_connection_goes_where_its_mux_sends_it() {
        let mut cfg = vip_cfg(2);
        cfg.mode = VipMode::Dsr;
        let mut vips = Vips::new();
        vips.insert(Vip::new(cfg, &[]).unwrap());
        let (a, b) = (ip("10.1.0.10"), ip("10.1.0.11"));
        let k = client(1, 40000);
        let reply = FlowKey::new(a, 8080, k.src(), 40000, 6);
        let seg = |f| Seg::with_flags(f);
        // Both sides close, or the client alone (backend a hung).
        for backend_closes in [true, false] {
            let mut lb = core();
            // A connection through backend a.
            let d = lb.process_dsr(&vips, &k, &seg(SYN), 0, a);
            assert_eq!(conn_backend(&lb, &d), a);
            lb.process(&vips, &reply, SYN | ACK, 1);
            lb.process_dsr(&vips, &k, &seg(ACK), 2, a);
            // While it is open, nothing of it goes through backend b.
            for f in [SYN, ACK] {
                assert_eq!(
                    lb.process_dsr(&vips, &k, &seg(f), 3, b),
                    Decision::Drop(LbDrop::DsrNotBackend)
                );
            }
            if backend_closes {
                lb.process(&vips, &reply, FIN | ACK, 4);
            }
            lb.process_dsr(&vips, &k, &seg(FIN | ACK), 5, a);
            // Finished: still no ACK through b, but the client's fresh SYN
            // on its old port (the Mux picked b for it) opens a new
            // connection to b in its place.
            assert_eq!(
                lb.process_dsr(&vips, &k, &seg(ACK), 6, b),
                Decision::Drop(LbDrop::DsrNotBackend)
            );
            let d = lb.process_dsr(&vips, &k, &seg(SYN), 7, b);
            assert!(matches!(d, Decision::Forward { new: true, .. }), "{d:?}");
            assert_eq!(conn_backend(&lb, &d), b);
            assert_eq!(lb.conns().len(), 1);
            assert!(matches!(
                lb.process_dsr(&vips, &k, &seg(ACK), 8, b),
                Decision::Forward { new: false, .. }
            ));
        }
    }

    #[test]
    fn a_mux_decides_a_reused_port_afresh_once_its_client_has_closed() {
        let mut cfg = vip_cfg(3);
        cfg.mode = VipMode::Mux;
        let mut vips = Vips::new();
        let vip = vips.insert(Vip::new(cfg, &[]).unwrap());
        let mut lb = core();
        let k = client(1, 40000);
        let d = lb.process(&vips, &k, SYN, 0);
        let first = conn_backend(&lb, &d);
        // Its backend goes down while the connection lives: the client's
        // packets, a retransmitted SYN among them, keep going to it.
        let i = vip
            .config()
            .backends
            .iter()
            .position(|b| b.ip == first)
            .unwrap();
        assert!(vip.set_health(i, false).unwrap());
        for (f, t) in [(ACK, 1), (SYN, 2), (FIN | ACK, 3), (ACK, 4)] {
            let d = lb.process(&vips, &k, f, t);
            assert!(matches!(d, Decision::Forward { new: false, .. }), "{d:?}");
            assert_eq!(conn_backend(&lb, &d), first);
        }
        // The client has closed its side (all a Mux sees): its fresh SYN
        // on the same port is a new connection, to a healthy backend.
        let d = lb.process(&vips, &k, SYN, 5);
        assert!(matches!(d, Decision::Forward { new: true, .. }), "{d:?}");
        assert_ne!(conn_backend(&lb, &d), first);
        assert_eq!(lb.conns().len(), 1);
    }

    #[test]
    fn a_dsr_vip_takes_the_backend_the_mux_named_and_nothing_else() {
        let mut cfg = vip_cfg(2);
        cfg.mode = VipMode::Dsr;
        let mut vips = Vips::new();
        vips.insert(Vip::new(cfg, &[false, false]).unwrap());
        vips.insert(
            Vip::new(
                VipConfig::new(
                    "plain",
                    ip("10.1.0.101"),
                    80,
                    6,
                    vec![Backend {
                        ip: ip("10.1.0.10"),
                        port: 80,
                        weight: 1,
                    }],
                ),
                &[],
            )
            .unwrap(),
        );
        let mut lb = core();
        let k = client(1, 40000);
        let seg = Seg::with_flags(SYN);
        // Unhealthy here: the Mux chose it, the host takes it.
        let d = lb.process_dsr(&vips, &k, &seg, 0, ip("10.1.0.11"));
        assert_eq!(backend_of(d), ip("10.1.0.11"));
        // Its replies leave as the VIP.
        let reply = FlowKey::new(ip("10.1.0.11"), 8080, k.src(), 40000, 6);
        match lb.process(&vips, &reply, SYN | ACK, 1) {
            Decision::Forward {
                rewrite,
                dir: Dir::Reply,
                ..
            } => {
                assert_eq!(rewrite.src, Some((ip("10.1.0.100"), 80)))
            }
            d => panic!("{d:?}"),
        }
        // Not through a Mux, to no backend, or to a VIP of another mode.
        let k2 = client(2, 40000);
        assert_eq!(lb.process(&vips, &k2, SYN, 2), Decision::NotHandled);
        assert_eq!(
            lb.process_dsr(&vips, &k2, &seg, 2, ip("10.1.0.99")),
            Decision::Drop(LbDrop::DsrNotBackend)
        );
        let k3 = FlowKey::new(k2.src(), 40000, ip("10.1.0.101"), 80, 6);
        assert_eq!(
            lb.process_dsr(&vips, &k3, &seg, 2, ip("10.1.0.10")),
            Decision::Drop(LbDrop::DsrNotBackend)
        );
        assert_eq!(lb.stats().dropped(LbDrop::DsrNotBackend), 2);
        // IP in IP from the wire reaches no connection but the client's
        // side of this VIP's to this backend, and touches none: not the
        // backend's side, not through another backend, not a connection
        // of another VIP.
        let plain = FlowKey::new(k.src(), 40001, ip("10.1.0.101"), 80, 6);
        assert!(matches!(
            lb.process(&vips, &plain, SYN, 3),
            Decision::Forward { new: true, .. }
        ));
        let before = |lb: &LbCore| {
            lb.conns()
                .iter()
                .map(|(_, c)| (c.packets, c.state))
                .collect::<Vec<_>>()
        };
        let was = before(&lb);
        for (key, dip) in [
            (reply, "10.1.0.11"),
            (k, "10.1.0.10"),
            (plain, "10.1.0.10"),
            (plain.reversed(), "10.1.0.10"),
        ] {
            let rst = Seg::with_flags(0x04);
            assert_eq!(
                lb.process_dsr(&vips, &key, &rst, 4, ip(dip)),
                Decision::Drop(LbDrop::DsrNotBackend),
                "{key:?} via {dip}"
            );
        }
        assert_eq!(before(&lb), was, "a refused packet touched a connection");
        assert!(matches!(
            lb.process_dsr(&vips, &k, &Seg::with_flags(ACK), 5, ip("10.1.0.11")),
            Decision::Forward { new: false, .. }
        ));
        // What a Mux or DSR VIP cannot be.
        for (mode, bad) in [
            (VipMode::Mux, "must be IPv4"),
            (VipMode::Dsr, "cannot have a SYN proxy"),
            (VipMode::Mux, "lists a backend address twice"),
        ] {
            let mut c = vip_cfg(2);
            c.mode = mode;
            match bad {
                "must be IPv4" => {
                    c.addr = ip("2001:db8::1");
                    c.backends = vec![Backend {
                        ip: ip("2001:db8::5"),
                        port: 80,
                        weight: 1,
                    }];
                }
                "cannot have a SYN proxy" => c.syn_proxy = SynProxy::On,
                _ => c.backends[1].ip = c.backends[0].ip,
            }
            let e = Vip::new(c, &[]).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(mode.name()), "{e}");
        }
    }

    #[test]
    fn new_connections_spread_by_weight_and_replies_come_back_as_the_vip() {
        let mut cfg = vip_cfg(3);
        cfg.backends[2].weight = 2;
        let mut vips = Vips::new();
        vips.insert(Vip::new(cfg, &[]).unwrap());
        let mut lb = core();
        let mut per: HashMap<IpAddr, u32> = HashMap::new();
        for i in 0..8000 {
            let k = client(i, 40000 + (i % 1000) as u16);
            let b = backend_of(lb.process(&vips, &k, SYN, 0));
            *per.entry(b).or_default() += 1;
            // The backend's SYN-ACK is the reply direction: rewritten back to the VIP.
            let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
            match lb.process(&vips, &reply, SYN | ACK, 1) {
                Decision::Forward {
                    rewrite,
                    dir: Dir::Reply,
                    new: false,
                    ..
                } => {
                    assert_eq!(rewrite.apply_to_key(&reply), k.reversed());
                }
                other => panic!("{other:?}"),
            }
        }
        let w = |a: &str| f64::from(per[&ip(a)]) / 8000.0;
        assert!((w("10.1.0.10") - 0.25).abs() < 0.03, "{per:?}");
        assert!((w("10.1.0.11") - 0.25).abs() < 0.03, "{per:?}");
        assert!((w("10.1.0.12") - 0.5).abs() < 0.03, "{per:?}");
        assert_eq!(lb.stats().new_dnat, 8000);
        // Traffic for no VIP is not ours.
        let other = FlowKey::new(ip("203.0.113.1"), 1, ip("10.1.0.99"), 80, 6);
        assert_eq!(lb.process(&vips, &other, SYN, 0), Decision::NotHandled);
    }

    #[test]
    fn prefetch_new_names_the_reply_key_the_connection_gets() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(3), &[]).unwrap());
        let mut mux = vip_cfg(3);
        mux.mode = VipMode::Mux;
        mux.port = 443;
        vips.insert(Vip::new(mux, &[]).unwrap());
        let mut lb = core();
        for i in 0..200 {
            let k = client(i, 40000 + i as u16);
            // Half with the flow hash the prefetch of the Maglev slot gave,
            // half computing it at each step.
            let given = if i % 2 == 0 {
                let h = lb.prefetch_pick(&vips, &k);
                assert_eq!(h, Some(PickHash::of(&k, Distribution::FiveTuple)));
                // The VIP it returns is the one the key is addressed to.
                let (_, vip) = lb.prefetch_pick_of(&vips, &k).unwrap();
                assert!(Arc::ptr_eq(vip, vips.lookup(&k).unwrap()));
                assert_eq!(
                    lb.prefetch_new_to(vip, &k, h),
                    lb.prefetch_new(&vips, &k, h)
                );
                h
            } else {
                None
            };
            let reply = lb.prefetch_new(&vips, &k, given).unwrap();
            let b = backend_of(lb.process_hashed(&vips, &k, &Seg::with_flags(SYN), 0, given));
            assert_eq!(reply, FlowKey::new(b, 8080, k.src(), k.src_port, 6));
            // What the reply key names is the connection's reply.
            match lb.process(&vips, &reply, SYN | ACK, 1) {
                Decision::Forward {
                    dir: Dir::Reply,
                    new: false,
                    ..
                } => {}
                other => panic!("{other:?}"),
            }
        }
        // Nothing for a Mux's VIP (its connections have no reply here), nor
        // for an address that is no VIP.
        let to_mux = FlowKey::new(ip("203.0.113.1"), 1, ip("10.1.0.100"), 443, 6);
        assert_eq!(lb.prefetch_pick(&vips, &to_mux), None);
        assert_eq!(lb.prefetch_new(&vips, &to_mux, None), None);
        let other = FlowKey::new(ip("203.0.113.1"), 1, ip("10.1.0.99"), 80, 6);
        assert_eq!(lb.prefetch_pick(&vips, &other), None);
        assert_eq!(lb.prefetch_new(&vips, &other, None), None);
    }

    #[test]
    fn an_ipv4_mapped_vip_or_backend_is_refused() {
        let mapped: IpAddr = "::ffff:10.1.0.100".parse().unwrap();
        let mut cfg = vip_cfg(2);
        cfg.addr = mapped;
        for b in &mut cfg.backends {
            b.ip = "fd00::10".parse().unwrap();
        }
        assert_eq!(
            Vip::new(cfg, &[]).err(),
            Some(LbError::V4Mapped {
                vip: "web".into(),
                addr: mapped
            })
        );
        let mut cfg = vip_cfg(2);
        cfg.addr = "fd00::100".parse().unwrap();
        cfg.backends[0].ip = "fd00::10".parse().unwrap();
        cfg.backends[1].ip = "::ffff:10.1.0.11".parse().unwrap();
        let err = Vip::new(cfg, &[]).err().unwrap();
        assert!(
            err.to_string()
                .contains("::ffff:10.1.0.11 is an IPv4-mapped"),
            "{err}"
        );
    }

    #[test]
    fn a_flow_hash_of_another_distribution_is_not_used() {
        let vip = Vip::new(vip_cfg(5), &[]).unwrap();
        let set = vip.backends();
        let mut differ = 0;
        for i in 0..400 {
            let k = client(i, 30000 + i as u16);
            let own = vip.pick_in(&set, &k);
            let two = PickHash::of(&k, Distribution::TwoTuple);
            assert_eq!(vip.pick_hashed(&set, &k, Some(two)), own);
            assert_eq!(
                vip.pick_hashed(&set, &k, Some(PickHash::of(&k, Distribution::FiveTuple))),
                own
            );
            // (Used, the two-tuple hash would have picked otherwise.)
            let mut other = vip_cfg(5);
            other.distribution = Distribution::TwoTuple;
            let by_two = Vip::new(other, &[]).unwrap();
            differ += usize::from(by_two.pick_in(&by_two.backends(), &k) != own);
        }
        assert!(differ > 100, "{differ}");
    }

    #[test]
    fn a_touch_for_a_connection_whose_slot_was_reused_touches_nothing() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(2), &[]).unwrap());
        let mut lb = LbCore::new(1, Timeouts::default(), None);
        let conn_of = |d: Decision| match d {
            Decision::Forward { conn, .. } => conn,
            other => panic!("{other:?}"),
        };
        let a = client(1, 40000);
        let a_ref = conn_of(lb.process(&vips, &a, ACK, 0));
        assert!(lb.touch(a_ref, Dir::Orig, ACK, 1).is_some());
        // Confirmed by a reply, `a` is established.
        assert!(lb.touch(a_ref, Dir::Reply, ACK, 1).is_some());
        // `a` times out (established: 240 s) and is evicted as idle; `b`
        // takes its slot, as a later generation of it.
        let b = client(2, 40001);
        let later = 300 * SEC;
        let b_ref = conn_of(lb.process(&vips, &b, SYN, later));
        assert_eq!(b_ref.slot(), a_ref.slot());
        assert_ne!(b_ref, a_ref);
        assert_eq!(lb.conns().stats().evicted_idle, 1);
        // A cached flow of `a` touching its reference does not reach `b`,
        // even with a FIN that would close it.
        assert!(lb.touch(a_ref, Dir::Orig, FIN | ACK, later + 1).is_none());
        assert!(lb.conn(a_ref).is_none());
        let c = lb.conn(b_ref).unwrap();
        assert_eq!(c.orig, b);
        assert_eq!(c.packets, [1, 0]);
        assert!(!c.state.is_closing());
        // `b`'s own touches (either way) still count.
        assert!(lb.touch(b_ref, Dir::Orig, ACK, later + 2).is_some());
        assert!(lb.touch(b_ref, Dir::Reply, ACK, later + 3).is_some());
        assert_eq!(lb.conn(b_ref).unwrap().packets, [2, 1]);
    }

    #[test]
    fn a_reused_port_after_close_is_a_new_connection() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(2), &[]).unwrap());
        let mut lb = core();
        let k = client(1, 40000);
        let first = backend_of(lb.process(&vips, &k, SYN, 0));
        let reply = FlowKey::new(first, 8080, k.src(), k.src_port, 6);
        lb.process(&vips, &reply, SYN | ACK, 1);
        lb.process(&vips, &k, ACK, 2);
        // Drain that backend: the established connection keeps it.
        let other = (0..2)
            .find(|&i| ip(&format!("10.1.0.{}", 10 + i)) != first)
            .unwrap();
        let mut cfg = vip_cfg(2);
        cfg.backends[1 - other].weight = 0;
        let mut drained = Vips::new();
        drained.insert(Vip::new(cfg, &[]).unwrap());
        assert_eq!(backend_of(lb.process(&drained, &k, ACK, 3)), first);
        // A SYN while one side is only half-closed is still that connection.
        lb.process(&drained, &k, FIN | ACK, 4);
        assert_eq!(backend_of(lb.process(&drained, &k, SYN, 5)), first);
        // Both FINs: finished. The client reuses its port: a new connection,
        // which goes to a backend that takes new flows.
        lb.process(&drained, &reply, FIN | ACK, 6);
        let again = lb.process(&drained, &k, SYN, 7);
        assert!(
            matches!(again, Decision::Forward { new: true, .. }),
            "{again:?}"
        );
        assert_ne!(backend_of(again), first);
        assert_eq!(lb.stats().new_dnat, 2);
        // A retransmitted SYN of that new connection is not new again.
        assert!(matches!(
            lb.process(&drained, &k, SYN, 8),
            Decision::Forward { new: false, .. }
        ));
    }

    #[test]
    fn table_digests_agree_whatever_the_order_and_follow_the_backends() {
        let a = Vip::new(vip_cfg(4), &[]).unwrap();
        let mut rev = vip_cfg(4);
        rev.backends.reverse();
        rev.name = "other name".into();
        let b = Vip::new(rev, &[]).unwrap();
        assert_eq!(a.table_digest(), b.table_digest());
        // Same digest, same pick for every flow.
        for i in 0..1000 {
            let k = client(i, 40000);
            let (x, y) = (a.pick(&k).unwrap(), b.pick(&k).unwrap());
            assert_eq!(a.config().backends[x], b.config().backends[y]);
        }
        // A health change, a weight, another backend, another size: another
        // digest (and the same again when health comes back).
        let d = a.table_digest();
        a.set_health(1, false).unwrap();
        assert_ne!(a.table_digest(), d);
        a.set_health(1, true).unwrap();
        assert_eq!(a.table_digest(), d);
        let mut w = vip_cfg(4);
        w.backends[0].weight = 2;
        let mut size = vip_cfg(4);
        size.table_size = 251;
        for c in [w, vip_cfg(5), size] {
            assert_ne!(Vip::new(c, &[]).unwrap().table_digest(), d);
        }
    }

    #[test]
    fn distribution_modes() {
        for (mode, same_for_ports) in [
            (Distribution::FiveTuple, false),
            (Distribution::ThreeTuple, true),
            (Distribution::TwoTuple, true),
        ] {
            let mut cfg = vip_cfg(8);
            cfg.distribution = mode;
            let vip = Vip::new(cfg, &[]).unwrap();
            let picks: std::collections::HashSet<usize> = (0..50)
                .map(|p| vip.pick(&client(1, 10000 + p)).unwrap())
                .collect();
            assert_eq!(picks.len() == 1, same_for_ports, "{mode:?}: {picks:?}");
        }
        assert_eq!(
            "2-tuple".parse::<Distribution>(),
            Ok(Distribution::TwoTuple)
        );
        assert!(
            "4-tuple"
                .parse::<Distribution>()
                .unwrap_err()
                .to_string()
                .contains("4-tuple")
        );
    }

    #[test]
    fn unhealthy_backend_gets_no_new_flows_but_keeps_established_ones() {
        let vip = Vip::new(vip_cfg(3), &[]).unwrap();
        let mut vips = Vips::new();
        let v = vips.insert(vip);
        let mut lb = core();
        // Open one connection per backend.
        let mut by_backend: HashMap<IpAddr, FlowKey> = HashMap::new();
        let mut i = 0;
        while by_backend.len() < 3 {
            let k = client(i, 1234);
            i += 1;
            let b = backend_of(lb.process(&vips, &k, SYN, 0));
            by_backend.entry(b).or_insert(k);
        }
        let sick = ip("10.1.0.11");
        let idx = v.backend_index(sick, 8080).unwrap();
        let epoch = v.epoch();
        assert!(v.set_health(idx, false).unwrap());
        // In place: the same VIP, its next backend set.
        assert!(Arc::ptr_eq(&v, vips.get(v.config().addr, 80, 6).unwrap()));
        assert_eq!(v.epoch(), epoch.wrapping_add(1));
        assert!(!v.set_health(idx, false).unwrap(), "no change, no new set");
        assert_eq!(v.epoch(), epoch.wrapping_add(1));
        // Established flow to the sick backend keeps its backend.
        assert_eq!(
            backend_of(lb.process(&vips, &by_backend[&sick], ACK, 1)),
            sick
        );
        // New flows avoid it.
        for j in 1000..3000 {
            assert_ne!(backend_of(lb.process(&vips, &client(j, 999), SYN, 2)), sick);
        }
        // With the reset policy, its established flow is dropped and forgotten.
        let mut cfg = vip_cfg(3);
        cfg.on_unhealthy = OnUnhealthy::Reset;
        let mut h = vec![true; 3];
        h[idx] = false;
        vips.insert(Vip::new(cfg, &h).unwrap());
        assert_eq!(
            lb.process(&vips, &by_backend[&sick], ACK, 3),
            Decision::Drop(LbDrop::BackendUnhealthy)
        );
        assert_eq!(lb.stats().dropped(LbDrop::BackendUnhealthy), 1);
        // The healthy ones continue.
        assert_eq!(
            backend_of(lb.process(&vips, &by_backend[&ip("10.1.0.10")], ACK, 3)),
            ip("10.1.0.10")
        );
    }

    #[test]
    fn removed_backend_ends_its_flows_and_drain_keeps_them() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(2), &[]).unwrap());
        let mut lb = core();
        let flows: Vec<(FlowKey, IpAddr)> = (0..200)
            .map(|i| {
                let k = client(i, 5555);
                (k, backend_of(lb.process(&vips, &k, SYN, 0)))
            })
            .collect();
        // Drain backend .10 (weight 0): established stay, new ones avoid it.
        let mut cfg = vip_cfg(2);
        cfg.backends[0].weight = 0;
        vips.insert(Vip::new(cfg, &[]).unwrap());
        for (k, b) in &flows {
            assert_eq!(backend_of(lb.process(&vips, k, ACK, 1)), *b);
        }
        for j in 500..700 {
            assert_eq!(
                backend_of(lb.process(&vips, &client(j, 1), SYN, 1)),
                ip("10.1.0.11")
            );
        }
        // Remove .10 from the pool: its flows are dropped, .11's continue.
        let mut cfg = vip_cfg(2);
        cfg.backends.remove(0);
        vips.insert(Vip::new(cfg, &[]).unwrap());
        for (k, b) in &flows {
            let d = lb.process(&vips, k, ACK, 2);
            if *b == ip("10.1.0.10") {
                assert_eq!(d, Decision::Drop(LbDrop::BackendRemoved));
            } else {
                assert_eq!(backend_of(d), *b);
            }
        }
        assert!(lb.stats().dropped(LbDrop::BackendRemoved) > 50);
    }

    #[test]
    fn all_down_drop_new_or_fail_open() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(2), &[]).unwrap());
        let mut lb = core();
        let est = client(1, 1);
        let b = backend_of(lb.process(&vips, &est, SYN, 0));
        vips.insert(Vip::new(vip_cfg(2), &[false, false]).unwrap());
        assert_eq!(
            lb.process(&vips, &client(2, 2), SYN, 1),
            Decision::Drop(LbDrop::NoHealthyBackend)
        );
        assert_eq!(backend_of(lb.process(&vips, &est, ACK, 1)), b);
        let mut cfg = vip_cfg(2);
        cfg.when_all_down = WhenAllDown::FailOpen;
        vips.insert(Vip::new(cfg, &[false, false]).unwrap());
        backend_of(lb.process(&vips, &client(3, 3), SYN, 2));
        assert_eq!(lb.stats().dropped(LbDrop::NoHealthyBackend), 1);
    }

    #[test]
    fn table_full_is_a_counted_drop() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(2), &[]).unwrap());
        let mut lb = LbCore::new(10, Timeouts::default(), None);
        // Ten established connections (picked up mid-stream, confirmed by
        // their backends' replies).
        for i in 0..10 {
            let k = client(i, 1);
            let b = backend_of(lb.process(&vips, &k, ACK, 0));
            let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
            lb.process(&vips, &reply, ACK, 0);
        }
        assert_eq!(
            lb.process(&vips, &client(99, 1), SYN, 0),
            Decision::Drop(LbDrop::TableFull)
        );
        assert_eq!(lb.stats().dropped(LbDrop::TableFull), 1);
        // After the established timeout, the old entries make room.
        let later = Timeouts::default().tcp_established + SEC;
        backend_of(lb.process(&vips, &client(99, 1), SYN, later));
    }

    #[test]
    fn a_syn_flood_displaces_only_its_own_kind() {
        let mut vips = Vips::new();
        vips.insert(Vip::new(vip_cfg(2), &[]).unwrap());
        let mut lb = LbCore::new(100, Timeouts::default(), None);
        // Twenty established connections, their handshakes done.
        let est: Vec<FlowKey> = (0..20).map(|i| client(i, 1)).collect();
        for k in &est {
            let b = backend_of(lb.process(&vips, k, SYN, 0));
            let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
            let d = lb.process(&vips, &reply, SYN | ACK, 0);
            assert!(matches!(d, Decision::Forward { new: false, .. }), "{d:?}");
            backend_of(lb.process(&vips, k, ACK, 0));
        }
        // A flood of spoofed SYNs, ten times the table: never refused, and
        // the established connections are never pushed out.
        for i in 0..1000u32 {
            let k = client(1000 + i, 2);
            assert!(matches!(
                lb.process(&vips, &k, SYN, SEC),
                Decision::Forward { new: true, .. }
            ));
        }
        assert_eq!(lb.stats().dropped(LbDrop::TableFull), 0);
        assert_eq!(lb.conns().stats().evicted_embryonic, 1000 - 80);
        for k in &est {
            assert!(
                matches!(
                    lb.process(&vips, k, ACK, 2 * SEC),
                    Decision::Forward { new: false, .. }
                ),
                "{k:?} was pushed out"
            );
        }
        // A legitimate client amid the flood completes its handshake.
        let k = client(5000, 3);
        let b = backend_of(lb.process(&vips, &k, SYN, 3 * SEC));
        let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
        assert!(matches!(
            lb.process(&vips, &reply, SYN | ACK, 3 * SEC),
            Decision::Forward { new: false, .. }
        ));
    }

    #[test]
    fn a_vip_at_its_limit_displaces_its_own_embryonic_connections_or_refuses() {
        let mut vips = Vips::new();
        let mut cfg = vip_cfg(2);
        // 8 over two workers: 4 on this one.
        cfg.max_conns = 8;
        vips.insert(Vip::new(cfg, &[]).unwrap());
        let mut other = vip_cfg(1);
        other.name = "other".into();
        other.port = 81;
        vips.insert(Vip::new(other, &[]).unwrap());
        let mut lb = LbCore::new(100, Timeouts::default(), None).with_shard(1, 2);
        let handshake = |lb: &mut LbCore, k: &FlowKey, now: u64| {
            let b = backend_of(lb.process(&vips, k, SYN, now));
            let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
            lb.process(&vips, &reply, SYN | ACK, now);
            backend_of(lb.process(&vips, k, ACK, now));
        };
        // Two established connections, then a flood of spoofed SYNs: it
        // keeps displacing its own oldest entries, so the VIP never holds
        // more than its share and nothing is refused.
        handshake(&mut lb, &client(0, 1), 0);
        handshake(&mut lb, &client(1, 1), 0);
        for i in 0..100u32 {
            // The backend answers each spoofed SYN (its SYN-ACK goes
            // nowhere): the connection stays embryonic, and evictable.
            let k = client(100 + i, 2);
            let b = backend_of(lb.process(&vips, &k, SYN, SEC));
            let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
            lb.process(&vips, &reply, SYN | ACK, SEC + 1);
        }
        assert_eq!(lb.conns().len(), 4);
        assert_eq!(lb.conns().stats().evicted_embryonic, 98);
        assert_eq!(lb.stats().dropped(LbDrop::VipConnLimit), 0);
        // A legitimate client amid the flood gets in; the established stay.
        handshake(&mut lb, &client(7, 1), 2 * SEC);
        for k in [client(0, 1), client(1, 1)] {
            assert!(matches!(
                lb.process(&vips, &k, ACK, 2 * SEC),
                Decision::Forward { new: false, .. }
            ));
        }
        // The limit is the VIP's own: another VIP is not held by it.
        let mut k = client(50, 3);
        k.dst_port = 81;
        assert!(matches!(
            lb.process(&vips, &k, SYN, 2 * SEC),
            Decision::Forward { new: true, .. }
        ));
        // With its share established, a new connection is refused, counted.
        handshake(&mut lb, &client(8, 1), 2 * SEC);
        assert_eq!(
            lb.process(&vips, &client(9, 1), SYN, 2 * SEC),
            Decision::Drop(LbDrop::VipConnLimit)
        );
        assert_eq!(lb.stats().dropped(LbDrop::VipConnLimit), 1);
        // A connection that ends gives its place back.
        let gone = client(0, 1);
        lb.process(&vips, &gone, 0x04, 3 * SEC);
        assert_eq!(lb.expire(3 * SEC + 11 * SEC, 100), 1);
        handshake(&mut lb, &client(9, 1), 15 * SEC);
    }

    #[test]
    fn a_recompiled_vip_keeps_its_count_under_its_limit() {
        let mut cfg = vip_cfg(2);
        cfg.max_conns = 2;
        let mut vips = Vips::new();
        vips.insert(Vip::new(cfg.clone(), &[]).unwrap());
        let mut lb = LbCore::new(100, Timeouts::default(), None);
        let handshake = |lb: &mut LbCore, vips: &Vips, k: &FlowKey, now: u64| {
            let b = backend_of(lb.process(vips, k, SYN, now));
            let reply = FlowKey::new(b, 8080, k.src(), k.src_port, 6);
            lb.process(vips, &reply, SYN | ACK, now);
            backend_of(lb.process(vips, k, ACK, now));
        };
        handshake(&mut lb, &vips, &client(0, 1), 0);
        // A policy change compiles the VIP again (a new object, the same
        // frontend): its connections so far still count against it.
        let mut again = Vips::new();
        again.insert(Vip::new(cfg, &[]).unwrap());
        handshake(&mut lb, &again, &client(1, 1), 0);
        assert_eq!(
            lb.process(&again, &client(2, 1), SYN, 0),
            Decision::Drop(LbDrop::VipConnLimit)
        );
        // The first connection, opened with the old object (and still
        // holding it: its reset comes while a worker has the old policy),
        // ends: its place is the recompiled VIP's again.
        lb.process(&vips, &client(0, 1), 0x04, SEC);
        assert_eq!(lb.expire(12 * SEC, 100), 1);
        handshake(&mut lb, &again, &client(2, 1), 12 * SEC);
        assert_eq!(
            lb.process(&vips, &client(3, 1), SYN, 12 * SEC),
            Decision::Drop(LbDrop::VipConnLimit)
        );
        assert_eq!(lb.stats().dropped(LbDrop::VipConnLimit), 2);
    }

    #[test]
    fn new_connections_are_counted_by_backend_across_a_recompiled_vip() {
        let cfg = vip_cfg(3);
        let mut vips = Vips::new();
        vips.insert(Vip::new(cfg.clone(), &[]).unwrap());
        let mut lb = LbCore::new(1000, Timeouts::default(), None);
        let mut expect: HashMap<IpAddr, u64> = HashMap::new();
        for i in 0..60 {
            *expect
                .entry(backend_of(lb.process(&vips, &client(i, 1), SYN, 0)))
                .or_default() += 1;
        }
        // The VIP compiled again, its backends in another order, one
        // removed and one added: the counts so far carry on by backend,
        // and the new backend's start.
        let mut four = cfg.clone();
        four.backends.remove(1);
        four.backends.reverse();
        four.backends.push(Backend {
            ip: ip("10.1.0.13"),
            port: 8080,
            weight: 1,
        });
        let mut again = Vips::new();
        again.insert(Vip::new(four, &[]).unwrap());
        for i in 60..120 {
            *expect
                .entry(backend_of(lb.process(&again, &client(i, 1), SYN, 0)))
                .or_default() += 1;
        }
        // And back to the first object (a worker may see either while a
        // change spreads).
        for i in 120..150 {
            *expect
                .entry(backend_of(lb.process(&vips, &client(i, 1), SYN, 0)))
                .or_default() += 1;
        }
        assert_eq!(expect.len(), 4, "{expect:?}");
        let counts = lb.backend_counts();
        for (b, n) in &expect {
            let c = counts[&(cfg.addr, 80, 6, *b, 8080)];
            assert_eq!(c.new_conns, *n, "{b}");
            // Every connection opened is tracked still.
            assert_eq!(c.active, *n, "{b}");
        }
        assert_eq!(counts.values().map(|c| c.new_conns).sum::<u64>(), 150);
        // (No rows for what was never picked.)
        assert_eq!(counts.len(), expect.len());
    }

    #[test]
    fn the_workers_shares_of_a_limit_add_up_to_it() {
        for (max, n) in [(8, 2), (5, 2), (1, 3), (100, 7), (7, 1)] {
            let shares: Vec<u32> = (0..n).map(|i| share_of(max, (i, n))).collect();
            assert_eq!(
                shares.iter().sum::<u32>(),
                max,
                "{max} over {n}: {shares:?}"
            );
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn a_vip_at_its_limit_under_a_long_answered_flood_never_refuses() {
        // Each spoofed SYN is answered by the backend a little later (20
        // SYNs on): the VIP's share fills with answered embryonic entries,
        // turns over fifty times, and a new connection always finds room.
        let mut vips = Vips::new();
        let mut cfg = vip_cfg(1);
        cfg.max_conns = 4096;
        vips.insert(Vip::new(cfg, &[]).unwrap());
        let mut lb = LbCore::new(16_384, Timeouts::default(), None);
        let mut pending = std::collections::VecDeque::new();
        for i in 0..200_000u32 {
            let now = u64::from(i) * 50_000;
            let k = client(i, 1000);
            let b = backend_of(lb.process(&vips, &k, SYN, now));
            pending.push_back(FlowKey::new(b, 8080, k.src(), k.src_port, 6));
            if pending.len() > 20 {
                let reply = pending.pop_front().unwrap();
                lb.process(&vips, &reply, SYN | ACK, now);
            }
        }
        assert_eq!(lb.stats().dropped(LbDrop::VipConnLimit), 0);
        assert_eq!(lb.conns().len(), 4096);
        assert_eq!(lb.conns().stats().evicted_embryonic, 200_000 - 4096);
    }

    #[test]
    fn snat_allocates_reuses_and_releases() {
        // Per-connection ports (TCP reusing them across destinations),
        // with short timeouts.
        let snat = SnatAllocator::new(SnatConfig {
            public_ips: vec![ip("192.0.2.10")],
            port_lo: 2000,
            port_hi: 2003,
            block_size: 2,
            blocks_per_member: 1,
            mapping: crate::snat::Mapping::AddressAndPortDependent,
            timeouts: crate::snat::SnatTimeouts {
                udp: 30 * SEC,
                tcp_established: 240 * SEC,
                tcp_transitory: 30 * SEC,
                icmp: 30 * SEC,
            },
            ..SnatConfig::default()
        })
        .unwrap();
        let mut lb = LbCore::new(100, Timeouts::default(), Some(snat));
        lb.snat_mut().unwrap().add_member(ip("10.1.0.4")).unwrap();
        let out = |sport: u16, dst: &str| FlowKey::new(ip("10.1.0.4"), sport, ip(dst), 443, 6);
        let public_of = |d: Decision| match d {
            Decision::Forward {
                rewrite: Rewrite { src: Some(p), .. },
                new: true,
                ..
            } => p,
            other => panic!("{other:?}"),
        };
        // Two ports; each destination can take both.
        let a = public_of(lb.process_snat(&out(1, "198.51.100.1"), SYN, 0));
        let b = public_of(lb.process_snat(&out(2, "198.51.100.1"), SYN, 0));
        assert_ne!(a, b);
        assert_eq!(
            lb.process_snat(&out(3, "198.51.100.1"), SYN, 0),
            Decision::Drop(LbDrop::SnatExhausted)
        );
        let c = public_of(lb.process_snat(&out(3, "198.51.100.2"), SYN, 0));
        assert!(
            c == a || c == b,
            "TCP reuses a port towards another destination"
        );
        // The reply from outside finds its way back to the VM.
        let reply = FlowKey::new(ip("198.51.100.1"), 443, a.0, a.1, 6);
        match lb.process_snat(&reply, SYN | ACK, 1) {
            Decision::Forward {
                rewrite,
                dir: Dir::Reply,
                ..
            } => assert_eq!(
                rewrite.apply_to_key(&reply),
                out(1, "198.51.100.1").reversed()
            ),
            other => panic!("{other:?}"),
        }
        // Close the first connection (FIN both ways), let time-wait pass: its port is free again.
        lb.process_snat(&out(1, "198.51.100.1"), FIN | ACK, 2);
        lb.process_snat(&reply, FIN | ACK, 2);
        assert_eq!(lb.expire(2 + 11 * SEC, 100), 1);
        let d = public_of(lb.process_snat(&out(4, "198.51.100.1"), SYN, 2 + 11 * SEC));
        assert_eq!(d, a);
        // UDP needs a port of its own per flow, and a non-member is refused.
        let udp = |sport: u16, dst: &str| FlowKey::new(ip("10.1.0.4"), sport, ip(dst), 53, 17);
        public_of(lb.process_snat(&udp(7, "198.51.100.9"), 0, 3 + 11 * SEC));
        public_of(lb.process_snat(&udp(8, "198.51.100.8"), 0, 3 + 11 * SEC));
        assert_eq!(
            lb.process_snat(&udp(9, "198.51.100.7"), 0, 3 + 11 * SEC),
            Decision::Drop(LbDrop::SnatExhausted)
        );
        // 30 s later the two UDP flows and the three unanswered TCP
        // handshakes have timed out: their ports come back.
        assert_eq!(lb.expire(3 + 42 * SEC, 100), 5);
        assert_eq!(lb.conns().len(), 0);
        public_of(lb.process_snat(&udp(9, "198.51.100.7"), 0, 3 + 42 * SEC));
        let stranger = FlowKey::new(ip("10.1.0.99"), 1, ip("198.51.100.1"), 443, 6);
        assert_eq!(
            lb.process_snat(&stranger, SYN, 0),
            Decision::Drop(LbDrop::SnatNotMember)
        );
        assert_eq!(lb.stats().dropped(LbDrop::SnatExhausted), 2);
    }

    fn eim_core(filtering: crate::snat::Filtering) -> LbCore {
        let snat = SnatAllocator::new(SnatConfig {
            public_ips: vec![ip("192.0.2.10")],
            port_lo: 2000,
            port_hi: 2127,
            block_size: 64,
            blocks_per_member: 1,
            filtering,
            ..SnatConfig::default()
        })
        .unwrap();
        let mut lb = LbCore::new(100, Timeouts::default(), Some(snat));
        lb.snat_mut().unwrap().add_member(ip("10.1.0.4")).unwrap();
        lb.snat_mut().unwrap().add_member(ip("10.1.0.5")).unwrap();
        lb
    }

    fn snat_public(d: Decision) -> (IpAddr, u16) {
        match d {
            Decision::Forward {
                rewrite: Rewrite { src: Some(p), .. },
                new: true,
                ..
            } => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn snat_maps_a_private_endpoint_once_and_lets_in_what_its_filtering_allows() {
        use crate::snat::Filtering;
        let mut lb = eim_core(Filtering::EndpointIndependent);
        let udp = |src: &str, sport: u16, dst: &str, dport: u16| {
            FlowKey::new(ip(src), sport, ip(dst), dport, 17)
        };
        let m = snat_public(lb.process_snat(&udp("10.1.0.4", 5000, "198.51.100.1", 3478), 0, 0));
        for (dst, dport) in [("198.51.100.1", 3479), ("198.51.100.2", 3478)] {
            let d = lb.process_snat(&udp("10.1.0.4", 5000, dst, dport), 0, 0);
            assert_eq!(snat_public(d), m, "one mapping towards {dst}:{dport}");
        }
        // Another VM with the same private port: another public port.
        let n = snat_public(lb.process_snat(&udp("10.1.0.5", 5000, "198.51.100.1", 3478), 0, 0));
        assert_ne!(n, m);
        // Endpoint-independent filtering: a stranger's packet to the
        // mapping opens a connection to the VM, whose reply leaves from
        // the mapping.
        let stranger = FlowKey::new(ip("203.0.113.7"), 999, m.0, m.1, 17);
        match lb.snat_inbound(&stranger, 0, 1) {
            Decision::Forward {
                rewrite,
                dir: Dir::Orig,
                new: true,
                ..
            } => assert_eq!(
                rewrite.apply_to_key(&stranger),
                udp("203.0.113.7", 999, "10.1.0.4", 5000)
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(lb.stats().new_snat_inbound, 1);
        let back = udp("10.1.0.4", 5000, "203.0.113.7", 999);
        match lb.process_snat(&back, 0, 2) {
            Decision::Forward {
                rewrite,
                dir: Dir::Reply,
                new: false,
                ..
            } => assert_eq!(rewrite.apply_to_key(&back), stranger.reversed()),
            other => panic!("{other:?}"),
        }
        // A port nothing maps (neither VM's mapping: their ports are
        // random); TCP other than a SYN.
        let unmapped = (2126..).find(|p| *p != m.1 && *p != n.1).unwrap();
        let nothing = FlowKey::new(ip("203.0.113.7"), 999, m.0, unmapped, 17);
        assert_eq!(
            lb.snat_inbound(&nothing, 0, 3),
            Decision::Drop(LbDrop::SnatNoMapping)
        );
        let ack = FlowKey::new(ip("203.0.113.7"), 999, m.0, m.1, 6);
        assert_eq!(
            lb.snat_inbound(&ack, ACK, 3),
            Decision::Drop(LbDrop::SnatFiltered)
        );
        // Another vnet's address is not this core's.
        let elsewhere = FlowKey::new(ip("203.0.113.7"), 999, ip("192.0.2.99"), m.1, 17);
        assert_eq!(lb.snat_inbound(&elsewhere, 0, 3), Decision::NotHandled);
        // Address-and-port-dependent filtering (the default) lets nothing in.
        let mut lb = eim_core(Filtering::AddressAndPortDependent);
        let m = snat_public(lb.process_snat(&udp("10.1.0.4", 5000, "198.51.100.1", 3478), 0, 0));
        let other_port = FlowKey::new(ip("198.51.100.1"), 3479, m.0, m.1, 17);
        assert_eq!(
            lb.snat_inbound(&other_port, 0, 1),
            Decision::Drop(LbDrop::SnatFiltered)
        );
    }

    #[test]
    fn snat_connections_keep_the_nat_timeouts_without_holding_up_others() {
        use crate::snat::Filtering;
        let mut lb = eim_core(Filtering::AddressAndPortDependent);
        let udp = FlowKey::new(ip("10.1.0.4"), 5000, ip("198.51.100.1"), 3478, 17);
        let m = snat_public(lb.process_snat(&udp, 0, 0));
        // A plain connection queued after it, with the default 30 s.
        let plain = FlowKey::new(ip("10.1.0.4"), 6000, ip("10.1.0.5"), 53, 17);
        assert!(matches!(
            lb.open_plain(&plain, 0, SEC, false),
            Decision::Forward { new: true, .. }
        ));
        // At 2 minutes idle the UDP mapping is alive (5 minutes by
        // default), the plain connection gone.
        assert_eq!(lb.expire(120 * SEC, 100), 1);
        let reply = FlowKey::new(ip("198.51.100.1"), 3478, m.0, m.1, 17);
        assert!(matches!(
            lb.process_snat(&reply, 0, 120 * SEC),
            Decision::Forward {
                dir: Dir::Reply,
                ..
            }
        ));
        assert_eq!(lb.expire(419 * SEC, 100), 0);
        assert_eq!(lb.expire(421 * SEC, 100), 1);
        assert_eq!(
            lb.snat_mut().unwrap().mapping_of(ip("10.1.0.4"), 5000, 17),
            None
        );
        // Established TCP lives past 2 hours idle, and then goes.
        let tcp = FlowKey::new(ip("10.1.0.4"), 5001, ip("198.51.100.1"), 443, 6);
        let t0 = 500 * SEC;
        let m = snat_public(lb.process_snat(&tcp, SYN, t0));
        let reply = FlowKey::new(ip("198.51.100.1"), 443, m.0, m.1, 6);
        lb.process_snat(&reply, SYN | ACK, t0);
        lb.process_snat(&tcp, ACK, t0);
        assert_eq!(lb.expire(t0 + 7439 * SEC, 100), 0);
        assert_eq!(lb.expire(t0 + 7441 * SEC, 100), 1);
        assert_eq!(lb.snat_mut().unwrap().users(m.0, m.1, 6), 0);
    }

    #[test]
    fn vip_validation() {
        let mut cfg = vip_cfg(2);
        cfg.backends[1] = cfg.backends[0];
        assert!(matches!(
            Vip::new(cfg, &[]),
            Err(LbError::DuplicateBackend { .. })
        ));
        let mut cfg = vip_cfg(1);
        cfg.backends[0].ip = ip("2001:db8::1");
        let e = Vip::new(cfg, &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("vip \"web\": backend 2001:db8::1:8080"),
            "{e}"
        );
        let mut cfg = vip_cfg(1);
        cfg.table_size = 100;
        assert!(matches!(Vip::new(cfg, &[]), Err(LbError::Maglev { .. })));
        assert!(matches!(
            Vip::new(vip_cfg(1), &[]).unwrap().set_health(5, true),
            Err(LbError::NoSuchBackend { index: 5, .. })
        ));
    }

    fn seg(flags: u8, seq: u32, ack: u32, window: u16, mss: Option<u16>) -> Seg {
        Seg {
            flags,
            seq,
            ack,
            window,
            mss,
        }
    }

    fn proxied_vips(mode: SynProxy, max_conns: u32) -> Vips {
        let mut vips = Vips::new();
        let mut cfg = vip_cfg(2);
        cfg.syn_proxy = mode;
        cfg.max_conns = max_conns;
        vips.insert(Vip::new(cfg, &[]).unwrap());
        vips
    }

    const RST: u8 = 0x04;

    /// A core given another's secret (a successor process's, built before
    /// it knew the secret) checks the cookies the other gave out; with its
    /// own secret it does not.
    #[test]
    fn a_core_given_anothers_cookie_secret_checks_its_cookies() {
        let vips = proxied_vips(SynProxy::On, 0);
        let key = [7u8; 16];
        let mut first = core().with_cookies(SynCookies::with_key(key));
        let k = client(1, 40000);
        let now = 5 * SEC;
        let Decision::Cookie { cookie, .. } =
            first.process_seg(&vips, &k, &seg(SYN, 1000, 0, 64240, Some(1460)), now)
        else {
            panic!("a SYN is answered with a cookie")
        };
        let ack = seg(ACK, 1001, cookie.wrapping_add(1), 502, None);
        let mut own = core();
        assert_eq!(
            own.process_seg(&vips, &k, &ack, now),
            Decision::Drop(LbDrop::SynCookieInvalid)
        );
        let mut next = core();
        next.set_cookies(SynCookies::with_key(key));
        assert!(matches!(
            next.process_seg(&vips, &k, &ack, now),
            Decision::ProxySyn { new: true, .. }
        ));
    }

    #[test]
    fn a_syn_proxied_connection_opens_on_its_cookies_ack_and_shifts_sequence_numbers() {
        let vips = proxied_vips(SynProxy::On, 0);
        let mut lb = core();
        let k = client(1, 40000);
        let now = 5 * SEC;
        let Decision::Cookie {
            cookie,
            mss,
            rewrite,
        } = lb.process_seg(&vips, &k, &seg(SYN, 1000, 0, 64240, Some(1460)), now)
        else {
            panic!("a SYN is answered with a cookie")
        };
        assert_eq!(mss, 1460);
        assert_eq!(lb.conns().len(), 0, "a SYN leaves nothing behind");
        // An ACK that does not carry the cookie opens nothing (nor does a
        // segment without ACK).
        for bad in [
            seg(ACK, 1001, cookie.wrapping_add(2), 502, None),
            seg(ACK, 1002, cookie.wrapping_add(1), 502, None),
            seg(FIN, 1001, cookie.wrapping_add(1), 502, None),
            seg(RST | ACK, 1001, cookie.wrapping_add(1), 502, None),
        ] {
            assert_eq!(
                lb.process_seg(&vips, &k, &bad, now),
                Decision::Drop(LbDrop::SynCookieInvalid)
            );
        }
        assert_eq!(lb.conns().len(), 0);
        // The client's ACK: the backend gets the client's SYN, with the
        // MSS the cookie carried and the client's window.
        let ack = seg(ACK, 1001, cookie.wrapping_add(1), 502, None);
        let Decision::ProxySyn {
            rewrite: to_backend,
            new: true,
            seg: syn,
            ..
        } = lb.process_seg(&vips, &k, &ack, now)
        else {
            panic!("the cookie's ACK opens the connection")
        };
        assert_eq!(to_backend, rewrite, "the backend the cookie was made for");
        assert_eq!(syn, seg(SYN, 1000, 0, 502, Some(1460)));
        // Data before the backend answered: its SYN again.
        let data = seg(ACK | 0x08, 1001, cookie.wrapping_add(1), 502, None);
        assert!(matches!(
            lb.process_seg(&vips, &k, &data, now),
            Decision::ProxySyn {
                new: false,
                seg: s,
                ..
            } if s == syn
        ));
        let reply = to_backend.apply_to_key(&k).reversed();
        assert_eq!(
            lb.process_seg(&vips, &reply, &seg(ACK, 5, 1001, 100, None), now),
            Decision::Drop(LbDrop::SynProxyPending)
        );
        // The backend's SYN-ACK: answered with the ACK of its handshake.
        let backend_isn = 7_000_000u32;
        let synack = seg(SYN | ACK, backend_isn, 1001, 65160, Some(1460));
        for _ in 0..2 {
            let Decision::ProxyAck { seg: a, .. } = lb.process_seg(&vips, &reply, &synack, now)
            else {
                panic!("a backend's SYN-ACK is answered, repeated or not")
            };
            assert_eq!(a, seg(ACK, 1001, backend_isn + 1, 502, None));
        }
        // From now on both ways are forwarded, shifted: the client acks
        // the cookie's numbers, the backend its own.
        let Decision::Forward {
            rewrite: fwd,
            new: false,
            ..
        } = lb.process_seg(&vips, &k, &data, now)
        else {
            panic!("established")
        };
        let (seq, ack) = fwd.shift.amounts();
        assert_eq!(cookie.wrapping_add(1).wrapping_add(ack), backend_isn + 1);
        assert_eq!(seq, 0);
        let Decision::Forward { rewrite: back, .. } = lb.process_seg(
            &vips,
            &reply,
            &seg(ACK, backend_isn + 1, 1001, 100, None),
            now,
        ) else {
            panic!("established")
        };
        let (seq, ack) = back.shift.amounts();
        assert_eq!((backend_isn + 1).wrapping_add(seq), cookie.wrapping_add(1));
        assert_eq!(ack, 0);
        assert_eq!(lb.stats().syn_cookies_sent, 1);
        assert_eq!(lb.stats().syn_proxied, 1);
        assert_eq!(lb.stats().new_dnat, 1);
    }

    /// A client's SYN that comes again after its ACK (retransmitted, or
    /// late) gets the same cookie, and the connection stays for the
    /// backend's answer; a SYN with another sequence number starts over.
    #[test]
    fn a_repeated_syn_keeps_a_pending_proxied_connection() {
        let vips = proxied_vips(SynProxy::On, 0);
        let mut lb = core();
        let k = client(1, 40000);
        let syn = seg(SYN, 1000, 0, 64240, Some(1460));
        // Just before a cookie period ends.
        let t0 = crate::syncookie::PERIOD_NS - SEC;
        let Decision::Cookie { cookie, mss, .. } = lb.process_seg(&vips, &k, &syn, t0) else {
            panic!("cookie")
        };
        let ack = seg(ACK, 1001, cookie.wrapping_add(1), 502, None);
        let Decision::ProxySyn { rewrite, .. } = lb.process_seg(&vips, &k, &ack, t0) else {
            panic!("opened")
        };
        // In the next cookie period: still its own cookie.
        let t1 = t0 + 2 * SEC;
        let again = lb.process_seg(&vips, &k, &syn, t1);
        assert_eq!(
            again,
            Decision::Cookie {
                cookie,
                mss,
                rewrite
            }
        );
        assert_eq!(lb.conns().len(), 1, "the connection stays");
        assert_eq!(lb.stats().syn_cookies_sent, 2, "its cookie sent again");
        let reply = rewrite.apply_to_key(&k).reversed();
        let synack = seg(SYN | ACK, 77, 1001, 65160, Some(1460));
        assert!(matches!(
            lb.process_seg(&vips, &reply, &synack, t1),
            Decision::ProxyAck { .. }
        ));
        // A SYN with another sequence number: the client started over.
        let k2 = client(2, 40000);
        let Decision::Cookie { cookie: c2, .. } = lb.process_seg(&vips, &k2, &syn, 0) else {
            panic!("cookie")
        };
        let ack2 = seg(ACK, 1001, c2.wrapping_add(1), 502, None);
        assert!(matches!(
            lb.process_seg(&vips, &k2, &ack2, 0),
            Decision::ProxySyn { new: true, .. }
        ));
        let other = seg(SYN, 5000, 0, 64240, Some(1460));
        assert!(matches!(
            lb.process_seg(&vips, &k2, &other, 0),
            Decision::Cookie { .. }
        ));
        assert_eq!(lb.conns().len(), 1, "the first connection only");
    }

    #[test]
    fn a_backends_reset_reaches_the_client_at_its_sequence() {
        let vips = proxied_vips(SynProxy::On, 0);
        let mut lb = core();
        let k = client(1, 40000);
        let Decision::Cookie { cookie, .. } =
            lb.process_seg(&vips, &k, &seg(SYN, 1000, 0, 64240, None), 0)
        else {
            panic!("cookie")
        };
        let ack = seg(ACK, 1001, cookie.wrapping_add(1), 502, None);
        let Decision::ProxySyn {
            rewrite, seg: syn, ..
        } = lb.process_seg(&vips, &k, &ack, 0)
        else {
            panic!("opened")
        };
        assert_eq!(syn.mss, Some(536), "no MSS offered: the default");
        let reply = rewrite.apply_to_key(&k).reversed();
        let Decision::Forward { rewrite: back, .. } =
            lb.process_seg(&vips, &reply, &seg(RST | ACK, 0, 1001, 0, None), 0)
        else {
            panic!("a reset is passed on")
        };
        assert_eq!(back.shift, SeqShift::seq(cookie.wrapping_add(1)));
    }

    #[test]
    fn auto_answers_with_cookies_only_at_the_vips_limit() {
        let vips = proxied_vips(SynProxy::Auto, 2);
        let mut lb = core();
        for i in 0..2 {
            let d = lb.process_seg(&vips, &client(i, 1), &seg(SYN, 9, 0, 1000, None), 0);
            assert!(matches!(d, Decision::Forward { new: true, .. }), "{d:?}");
        }
        let k = client(7, 1);
        let Decision::Cookie { cookie, .. } =
            lb.process_seg(&vips, &k, &seg(SYN, 9, 0, 1000, None), 0)
        else {
            panic!("at the limit: a cookie")
        };
        // Its ACK makes room among the VIP's embryonic connections.
        let ack = seg(ACK, 10, cookie.wrapping_add(1), 1000, None);
        assert!(matches!(
            lb.process_seg(&vips, &k, &ack, 0),
            Decision::ProxySyn { new: true, .. }
        ));
        assert_eq!(lb.conns().len(), 2);
        // Under `auto`, an ACK without a cookie is a connection picked up
        // mid-stream, as without the proxy.
        let d = lb.process_seg(&vips, &client(8, 1), &seg(ACK, 10, 77, 1000, None), 0);
        assert!(matches!(d, Decision::Forward { new: true, .. }), "{d:?}");
    }

    #[test]
    fn a_syn_proxy_needs_tcp() {
        let mut cfg = VipConfig::new("dns", ip("10.1.0.100"), 53, 17, vec![]);
        cfg.syn_proxy = SynProxy::Auto;
        assert_eq!(
            Vip::new(cfg, &[]).err(),
            Some(LbError::SynProxyNotTcp("dns".into()))
        );
        assert_eq!(
            "maybe".parse::<SynProxy>(),
            Err(LbError::BadSynProxy("maybe".into()))
        );
    }
}
