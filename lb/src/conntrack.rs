//! Per-core connection tracking: both directions of a connection, TCP state,
//! per-state idle timeouts, and a bounded table with a clear policy when full.
//!
//! One table per worker core (flows of a connection always land on the same
//! core), so nothing here is shared or locked. Entries sit in a slab; a hash
//! index ([`dataplane::index::KeyIndex`]: sized once for the capacity, never
//! rehashed, its buckets prefetchable) points both directions' keys at the
//! slab slot; three intrusive LRU
//! lists (active, closing, embryonic) order entries by last use. When the
//! table is full, a new connection evicts the oldest *closing* entry (FIN/RST
//! seen), else the oldest *embryonic* one (TCP before its handshake
//! completed or, picked up mid-stream, before its first reply; UDP before a
//! reply: what a flood is made of), else the oldest
//! active entry if it has already timed out; otherwise the new connection is
//! refused and counted.
//!
//! A table may keep several *timeout classes* ([`ConnTable::with_classes`]):
//! each has its own timeouts and its own three lists, so that connections
//! with long timeouts (a NAT's, which RFC 5382 wants at two hours and more)
//! never hold up the expiry of short-lived ones queued behind them.

use dataplane::FlowKey;
use dataplane::index::{KeyIndex, Pos, Seed};
use std::hash::Hasher;

/// Passes a precomputed u64 through: for maps whose keys hash themselves
/// into one `u64` (the load balancer's VIP maps).
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b) ^ (self.0 >> 56);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub use dataplane::key::{from16, to16};

/// Which way a packet travels relative to the connection's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Same direction as the first packet (client to server).
    Orig,
    /// The reply direction.
    Reply,
}

/// TCP connection state, as far as the tracker follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// A SYN was seen from the originator.
    SynSent,
    /// The SYN-ACK came back.
    SynReceived,
    /// Handshake complete (or a connection picked up mid-stream).
    Established,
    /// One side sent FIN.
    FinWait,
    /// Both sides sent FIN.
    TimeWait,
    /// An RST was seen.
    Closed,
}

/// Per-protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// TCP with its state.
    Tcp(TcpState),
    /// UDP; `replied` once traffic came back.
    Udp {
        /// Traffic was seen in the reply direction.
        replied: bool,
    },
    /// Anything else (ICMP echo included).
    Other,
}

impl ConnState {
    /// True for states that end a connection (FIN or RST seen).
    pub fn is_closing(&self) -> bool {
        matches!(
            self,
            ConnState::Tcp(TcpState::FinWait | TcpState::TimeWait | TcpState::Closed)
        )
    }
}

/// Idle timeouts per state, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// SYN sent or received, handshake not complete.
    pub tcp_handshake: u64,
    /// Established (Azure Load Balancer's default idle timeout: 4 minutes).
    pub tcp_established: u64,
    /// One FIN seen.
    pub tcp_fin: u64,
    /// Both FINs seen.
    pub tcp_time_wait: u64,
    /// RST seen.
    pub tcp_closed: u64,
    /// UDP with no reply yet.
    pub udp_unreplied: u64,
    /// UDP with replies.
    pub udp_replied: u64,
    /// ICMP and other protocols.
    pub other: u64,
}

const SEC: u64 = 1_000_000_000;

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_handshake: 30 * SEC,
            tcp_established: 240 * SEC,
            tcp_fin: 30 * SEC,
            tcp_time_wait: 10 * SEC,
            tcp_closed: 10 * SEC,
            udp_unreplied: 30 * SEC,
            udp_replied: 120 * SEC,
            other: 30 * SEC,
        }
    }
}

impl Timeouts {
    /// The shortest of the timeouts: a connection told of its traffic at
    /// least a few times in this span never times out while in use.
    pub fn shortest(&self) -> u64 {
        [
            self.tcp_handshake,
            self.tcp_established,
            self.tcp_fin,
            self.tcp_time_wait,
            self.tcp_closed,
            self.udp_unreplied,
            self.udp_replied,
            self.other,
        ]
        .into_iter()
        .min()
        .unwrap_or(0)
    }

    /// The idle timeout of `state`.
    pub fn of(&self, state: ConnState) -> u64 {
        match state {
            ConnState::Tcp(TcpState::SynSent | TcpState::SynReceived) => self.tcp_handshake,
            ConnState::Tcp(TcpState::Established) => self.tcp_established,
            ConnState::Tcp(TcpState::FinWait) => self.tcp_fin,
            ConnState::Tcp(TcpState::TimeWait) => self.tcp_time_wait,
            ConnState::Tcp(TcpState::Closed) => self.tcp_closed,
            ConnState::Udp { replied: false } => self.udp_unreplied,
            ConnState::Udp { replied: true } => self.udp_replied,
            ConnState::Other => self.other,
        }
    }
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The initial state for a connection's first packet.
pub fn initial_state(proto: u8, tcp_flags: u8) -> ConnState {
    match proto {
        6 if tcp_flags & RST != 0 => ConnState::Tcp(TcpState::Closed),
        6 if tcp_flags & SYN != 0 && tcp_flags & ACK == 0 => ConnState::Tcp(TcpState::SynSent),
        // A connection seen mid-stream (e.g. after an ECMP change moved it
        // here) is taken as established; Maglev keeps its backend.
        6 => ConnState::Tcp(TcpState::Established),
        17 => ConnState::Udp { replied: false },
        _ => ConnState::Other,
    }
}

/// The state after a packet travelling `dir` with `tcp_flags`.
pub fn next_state(
    state: ConnState,
    dir: Dir,
    tcp_flags: u8,
    fin_seen: &mut [bool; 2],
) -> ConnState {
    match state {
        ConnState::Tcp(s) => {
            if tcp_flags & RST != 0 {
                return ConnState::Tcp(TcpState::Closed);
            }
            if tcp_flags & FIN != 0 {
                fin_seen[dir as usize] = true;
            }
            let next = match s {
                TcpState::SynSent if dir == Dir::Reply && tcp_flags & (SYN | ACK) == SYN | ACK => {
                    TcpState::SynReceived
                }
                TcpState::SynReceived
                    if dir == Dir::Orig && tcp_flags & SYN == 0 && tcp_flags & ACK != 0 =>
                {
                    TcpState::Established
                }
                s => s,
            };
            let next = match (next, fin_seen[0], fin_seen[1]) {
                (TcpState::Closed, _, _) => TcpState::Closed,
                (_, true, true) => TcpState::TimeWait,
                (_, true, false) | (_, false, true) => TcpState::FinWait,
                (n, _, _) => n,
            };
            ConnState::Tcp(next)
        }
        ConnState::Udp { replied } => ConnState::Udp {
            replied: replied || dir == Dir::Reply,
        },
        ConnState::Other => ConnState::Other,
    }
}

/// A tracked connection carrying the caller's data `V` (NAT binding etc.).
///
/// Laid out as declared (`repr(C)`): what every packet that tells it of
/// traffic updates ([`ConnTable::touch`]) first, so that with its slot's
/// own bookkeeping it lies in the slot's first 52 bytes, one or two cache
/// lines of a 304-byte slot, which a touch loads ahead
/// ([`ConnTable::prefetch_slot`]).
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub struct Conn<V> {
    /// When a packet last used it (ns).
    pub last_seen: u64,
    /// Packets per direction.
    pub packets: [u64; 2],
    /// Protocol state.
    pub state: ConnState,
    /// FIN seen per direction.
    pub fin_seen: [bool; 2],
    /// Key of the originating direction (as the first packet arrived).
    pub orig: FlowKey,
    /// Key the reply direction arrives with (after NAT, if any).
    pub reply: FlowKey,
    /// When the connection was created (ns).
    pub created: u64,
    /// The caller's data.
    pub value: V,
}

const NIL: u32 = u32::MAX;

/// Most connections a table holds: two index entries each.
const MAX_CONNS: usize = dataplane::index::MAX_ENTRIES / 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    Active = 0,
    Closing = 1,
    /// Connections not confirmed yet (as Linux's early drop reads
    /// "not assured"): TCP before its handshake completes, TCP picked up
    /// mid-stream before any reply, UDP before any reply. What a flood
    /// fills the table with.
    Embryonic = 2,
}

const LISTS: usize = 3;

impl List {
    /// The list a connection in `state` belongs on (`replied`: a packet
    /// came back in the reply direction).
    fn of(state: ConnState, replied: bool) -> List {
        match state {
            s if s.is_closing() => List::Closing,
            ConnState::Tcp(TcpState::SynSent | TcpState::SynReceived)
            | ConnState::Udp { replied: false } => List::Embryonic,
            // Picked up mid-stream (a bare ACK, or an ECMP change moved it
            // here): confirmed by its first reply, evictable before it.
            ConnState::Tcp(TcpState::Established) if !replied => List::Embryonic,
            _ => List::Active,
        }
    }
}

/// Laid out as declared (`repr(C)`): the bookkeeping, then the connection
/// with what a packet updates first (see [`Conn`]): [`TOUCHED`] bytes.
/// Whether the slot holds a connection, which `resolve` and `touch` read
/// too, `Option` keeps in a spare value of one of the connection's fields:
/// the compiler's choice, today `fin_seen` (inside those bytes; a field
/// with more spare values added to [`Conn`] or its value could move it
/// out, which would cost a touch a cache miss, nothing else).
#[derive(Debug)]
#[repr(C)]
struct Slot<V> {
    /// Connections this slot has held before the current one (wrapping):
    /// what a [`ConnRef`] is checked against.
    generation: u32,
    prev: u32,
    next: u32,
    /// The connection's timeout class (index into the table's timeouts).
    class: u8,
    list: List,
    /// When it was put at the tail of its list: a connection seen since
    /// (`last_seen` later) is further back in LRU order than its place.
    queued: u64,
    conn: Option<Conn<V>>,
    /// The index hashes of the connection's keys (originating, reply),
    /// kept so that taking it out of the index (an expiry, an eviction)
    /// and loading its buckets ahead of an eviction do not hash its keys
    /// again. At the end, with `at`: nothing a packet reads.
    hashes: [u64; 2],
    /// Where those keys sit in the index (the reply key's `None` when the
    /// connection is indexed once, its keys being equal): an entry stays
    /// where it was put, so taking it out searches nothing.
    at: [Option<Pos>; 2],
}

/// The first bytes of a [`Slot`], which hold everything
/// [`ConnTable::resolve`] and [`ConnTable::touch`] read (a test checks it).
const TOUCHED: usize = 52;

/// A tracked connection as others hold it (a flow of the switch): its slot
/// and the slot's generation when the connection was put there. A slot
/// reused by another connection is of a later generation, so a stale
/// reference resolves to nothing ([`ConnTable::resolve`]) instead of to the
/// wrong connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    slot: u32,
    generation: u32,
}

impl ConnRef {
    /// The slot it names (valid only while [`ConnTable::resolve`] says so).
    pub fn slot(self) -> u32 {
        self.slot
    }
}

/// What [`ConnTable::settle_head`] found at the head of a list.
enum Head {
    Empty,
    Expired(u32),
    Requeued,
    Live,
}

/// Heads an insert into a full table looks at for an idle connection.
const EVICT_SCAN: usize = 8;

/// Counters of a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Connections created.
    pub created: u64,
    /// New connections refused because the table was full of live entries.
    pub refused_full: u64,
    /// Closing entries evicted to make room.
    pub evicted_closing: u64,
    /// Embryonic entries (TCP before its handshake completed or, picked up
    /// mid-stream, before its first reply; UDP before a reply) evicted to
    /// make room.
    pub evicted_embryonic: u64,
    /// Timed-out entries evicted to make room.
    pub evicted_idle: u64,
    /// Entries removed because they timed out.
    pub expired: u64,
    /// Entries removed on request.
    pub removed: u64,
}

/// Why a connection could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The table is full and nothing could be evicted.
    #[error("connection table full ({capacity} live entries)")]
    Full {
        /// The table's capacity.
        capacity: usize,
    },
    /// One of the two keys is already tracked.
    #[error("connection key already tracked")]
    Exists,
}

/// A bounded connection table for one core.
#[derive(Debug)]
pub struct ConnTable<V> {
    /// Both keys of every connection: the value is the slot shifted left
    /// once, its low bit set for the reply key ([`entry`]). The keys are
    /// compared in the slot.
    index: KeyIndex,
    seed: Seed,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    /// List heads and tails, `LISTS` per timeout class.
    heads: Vec<u32>,
    tails: Vec<u32>,
    len: usize,
    capacity: usize,
    /// Timeouts per class.
    timeouts: Vec<Timeouts>,
    /// Per class: its connections are seen one way only (a Mux's, whose
    /// replies go straight from the backend to the client).
    one_way: Vec<bool>,
    stats: ConnStats,
    /// Connections whose keys were put in the index (or were tried to
    /// be) so far, wrapping: what a [`Missed`] is checked against.
    indexed: u64,
    /// The last key [`ConnTable::lookup`] did not find: while nothing has
    /// been indexed since, the insert that usually follows (a new
    /// connection) takes its hash and does not search for it again.
    missed: Missed,
}

/// A key a lookup did not find: its hash, and [`ConnTable`]'s `indexed`
/// count then (removals since cannot make it present; an insert can).
#[derive(Debug, Clone, Copy, Default)]
struct Missed {
    key: FlowKey,
    hash: u64,
    indexed: u64,
}

/// The index value of slot `i`'s key in direction `dir`.
#[inline(always)]
fn entry(i: u32, dir: Dir) -> u32 {
    (i << 1) | u32::from(dir == Dir::Reply)
}

/// The slot and direction of an index value.
#[inline(always)]
fn unentry(v: u32) -> (u32, Dir) {
    (v >> 1, if v & 1 == 1 { Dir::Reply } else { Dir::Orig })
}

/// The index of `list` of timeout class `class` in the heads and tails.
#[inline]
fn li(class: u8, list: List) -> usize {
    usize::from(class) * LISTS + list as usize
}

impl<V> ConnTable<V> {
    /// A table holding at most `capacity` connections (all memory reserved now).
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        Self::with_classes(capacity, vec![timeouts])
    }

    /// A table with one timeout class per entry of `timeouts` (at least
    /// one, at most 255): [`ConnTable::insert_in`] puts a connection in
    /// one, [`ConnTable::insert`] in the first.
    pub fn with_classes(capacity: usize, mut timeouts: Vec<Timeouts>) -> Self {
        // Slots are numbered in 31 bits (the index keeps a direction bit),
        // and the index holds two keys a connection.
        let capacity = capacity.clamp(1, MAX_CONNS);
        if timeouts.is_empty() {
            timeouts.push(Timeouts::default());
        }
        timeouts.truncate(usize::from(u8::MAX));
        let mut slots = Vec::with_capacity(capacity);
        // A million connections' slots are hundreds of MiB, reached at
        // random (a flow telling its connection of traffic): on 2 MiB pages
        // those accesses stop missing the TLB too. (A reservation that
        // small or that the kernel refuses stays on small pages.)
        platform::advise_huge(slots.spare_capacity_mut());
        ConnTable {
            // Two keys per connection, at most half full; its pages are
            // committed as they are first written. Without the memory for
            // it, the index is empty: each new connection tries to make it
            // again, and is refused as for a full table while that fails.
            index: KeyIndex::for_entries(capacity * 2).unwrap_or_default(),
            // Keys come from packets: a per-table random seed keeps an
            // attacker from aiming them at one bucket.
            seed: Seed::random(),
            slots,
            free: Vec::new(),
            heads: vec![NIL; LISTS * timeouts.len()],
            tails: vec![NIL; LISTS * timeouts.len()],
            len: 0,
            capacity,
            one_way: vec![false; timeouts.len()],
            timeouts,
            stats: ConnStats::default(),
            indexed: 0,
            // (Stale from the start: no key was found missing.)
            missed: Missed {
                indexed: u64::MAX,
                ..Missed::default()
            },
        }
    }

    /// Bytes [`ConnTable::preallocate`] commits for a table of `capacity`
    /// connections: index, slots and free list.
    pub fn bytes_for(capacity: usize) -> usize {
        let capacity = capacity.clamp(1, MAX_CONNS);
        let per = std::mem::size_of::<Slot<V>>() + std::mem::size_of::<u32>();
        dataplane::index::bytes_for(capacity * 2).saturating_add(capacity.saturating_mul(per))
    }

    /// Commits the memory of the whole table now: the index, every slot
    /// and the free list, so that tracking connections up to the capacity
    /// faults no page in on the dataplane (each first write to a 2 MiB page
    /// stops the worker while the kernel zeroes it). `Err` when the kernel
    /// could not commit all of it (the rest is then committed as written).
    pub fn preallocate(&mut self) -> Result<(), std::io::Error> {
        let free = self
            .free
            .try_reserve_exact(self.capacity.saturating_sub(self.free.len()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))
            .and_then(|()| platform::populate(self.free.spare_capacity_mut()));
        // Each part on its own, the first error reported. (The slots' room
        // was reserved when the table was made.)
        [
            free,
            self.index.populate(),
            platform::populate(self.slots.spare_capacity_mut()),
        ]
        .into_iter()
        .collect()
    }

    /// This table with timeout class `class` tracking connections seen
    /// one way only (as Linux's IPVS does for direct routing): the
    /// originator's ACK after its SYN completes the handshake, and an
    /// established connection keeps the established timeout without a
    /// reply. Never confirmed by one, such connections stay on the
    /// embryonic list: a full table takes the least recently used of them
    /// (one packet from anyone makes such an entry, and a connection whose
    /// entry went is given the same backend again by Maglev, as Katran's
    /// LRU does).
    pub fn with_one_way(mut self, class: u8) -> Self {
        if let Some(o) = self.one_way.get_mut(usize::from(class)) {
            *o = true;
        }
        self
    }

    fn is_one_way(&self, class: u8) -> bool {
        self.one_way
            .get(usize::from(class))
            .copied()
            .unwrap_or(false)
    }

    /// The timeout classes.
    fn classes(&self) -> std::ops::Range<u8> {
        0..self.timeouts.len() as u8
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum connections.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// The timeouts of the first class.
    pub fn timeouts(&self) -> &Timeouts {
        // (There is always one class.)
        &self.timeouts[0]
    }

    /// The timeout of the connection in slot `i` in its current state, if
    /// there is one.
    pub fn timeout_of(&self, i: u32) -> Option<u64> {
        let s = self.slots.get(i as usize)?;
        Some(self.timeout(s.conn.as_ref()?, s.class))
    }

    fn timeout(&self, c: &Conn<V>, class: u8) -> u64 {
        let t = self
            .timeouts
            .get(usize::from(class))
            .unwrap_or(&self.timeouts[0]);
        // A connection picked up mid-stream that never heard back has the
        // handshake's timeout, as the other embryonic ones: its list is
        // expired in order, and one long-lived entry at its head would
        // hold up those behind it.
        match c.state {
            ConnState::Tcp(TcpState::Established)
                if c.packets[1] == 0 && !self.is_one_way(class) =>
            {
                t.tcp_handshake
            }
            s => t.of(s),
        }
    }

    fn expired(&self, c: &Conn<V>, class: u8, now: u64) -> bool {
        now.saturating_sub(c.last_seen) > self.timeout(c, class)
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, list) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next, li(s.class, s.list))
        };
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[list] = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_tail(&mut self, i: u32, list: List, now: u64) {
        let l = li(self.slots[i as usize].class, list);
        let tail = self.tails[l];
        {
            let s = &mut self.slots[i as usize];
            s.prev = tail;
            s.next = NIL;
            s.list = list;
            s.queued = now;
        }
        if tail == NIL {
            self.heads[l] = i;
        } else {
            self.slots[tail as usize].next = i;
        }
        self.tails[l] = i;
    }

    /// The hash of `key` in this table's index.
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.seed.hash(key, 0)
    }

    /// Starts loading the index bucket of a key whose [`ConnTable::hash`]
    /// is `hash` into the cache without waiting for it: called for the
    /// packets of a burst before their lookups, so that the misses overlap.
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Where `key` (hash `hash`) is in the index, its slot and direction.
    #[inline(always)]
    fn find(&self, key: &FlowKey, hash: u64) -> Option<(Pos, u32, Dir)> {
        let (pos, v) = self.index.find(hash, |v| {
            let (i, dir) = unentry(v);
            self.slots
                .get(i as usize)
                .and_then(|s| s.conn.as_ref())
                .is_some_and(|c| match dir {
                    Dir::Orig => c.orig == *key,
                    Dir::Reply => c.reply == *key,
                })
        })?;
        let (i, dir) = unentry(v);
        Some((pos, i, dir))
    }

    /// Takes slot `i`'s key in direction `dir`, whose hash is `h`, out of
    /// the index, from `at` where the slot says it is (searched for, were
    /// it not there).
    fn unindex(&mut self, h: u64, at: Option<Pos>, i: u32, dir: Dir) {
        let want = entry(i, dir);
        let pos = at.filter(|&p| self.index.value_at(p) == Some(want));
        debug_assert!(pos.is_some(), "slot {i} {dir:?}: not at its position");
        let pos = pos.or_else(|| self.index.find(h, |v| v == want).map(|(p, _)| p));
        if let Some(pos) = pos {
            self.index.remove(h, pos);
        }
    }

    /// Puts both keys of the connection in slot `i` in the index (a
    /// connection whose keys are equal is indexed once, as its originating
    /// direction); returns where they went. `None`, and nothing indexed,
    /// when the index has no room (it could not be made).
    fn index_pair_or_retry(
        &mut self,
        i: u32,
        orig: (&FlowKey, u64),
        reply: (&FlowKey, u64),
    ) -> Option<[Option<Pos>; 2]> {
        // An index that could not be made when the table was: tried again
        // (memory may have come free since).
        if self.index.buckets() == 0
            && let Ok(ix) = KeyIndex::for_entries(self.capacity * 2)
        {
            self.index = ix;
        }
        self.index_pair(i, orig, reply)
    }

    fn index_pair(
        &mut self,
        i: u32,
        (orig, ho): (&FlowKey, u64),
        (reply, hr): (&FlowKey, u64),
    ) -> Option<[Option<Pos>; 2]> {
        // (Counted before the inserts: a key found absent before is
        // searched for again from now on, whatever happens below.)
        self.indexed = self.indexed.wrapping_add(1);
        let ao = self.index.insert(ho, entry(i, Dir::Orig))?;
        if orig == reply {
            return Some([Some(ao), None]);
        }
        match self.index.insert(hr, entry(i, Dir::Reply)) {
            Some(ar) => Some([Some(ao), Some(ar)]),
            None => {
                self.unindex(ho, Some(ao), i, Dir::Orig);
                None
            }
        }
    }

    /// Removes the connection in slot `i` and returns it.
    fn remove_slot(&mut self, i: u32) -> Option<Conn<V>> {
        if !self.forget(i) {
            return None;
        }
        self.slots.get_mut(i as usize)?.conn.take()
    }

    /// Removes the connection in slot `i`, handing it to `f`; false when
    /// the slot holds none. (The connection is dropped in its slot: a few
    /// hundred bytes are not copied.)
    fn remove_slot_with(&mut self, i: u32, f: impl FnOnce(&Conn<V>)) -> bool {
        if !self.forget(i) {
            return false;
        }
        if let Some(s) = self.slots.get_mut(i as usize) {
            if let Some(c) = &s.conn {
                f(c);
            }
            s.conn = None;
        }
        true
    }

    /// Takes slot `i`'s connection out of its list and the index, and
    /// frees the slot; the connection itself stays for the caller to take
    /// or drop. False when the slot holds none.
    fn forget(&mut self, i: u32) -> bool {
        let Some(slot) = self.slots.get_mut(i as usize).filter(|s| s.conn.is_some()) else {
            return false;
        };
        let ([ho, hr], [ao, ar]) = (slot.hashes, slot.at);
        // References to this connection no longer resolve.
        slot.generation = slot.generation.wrapping_add(1);
        debug_assert!(
            self.get(i)
                .is_some_and(|c| [ho, hr] == [self.hash(&c.orig), self.hash(&c.reply)])
        );
        self.unlink(i);
        self.unindex(ho, ao, i, Dir::Orig);
        if ar.is_some() {
            self.unindex(hr, ar, i, Dir::Reply);
        }
        self.free.push(i);
        self.len -= 1;
        true
    }

    /// Looks up `key`: the slot and direction, if tracked and not timed out.
    /// A timed-out entry is removed (and handed to `on_remove`).
    pub fn lookup(
        &mut self,
        key: &FlowKey,
        now: u64,
        on_remove: impl FnOnce(&Conn<V>),
    ) -> Option<(u32, Dir)> {
        let hash = self.hash(key);
        let Some((_, i, dir)) = self.find(key, hash) else {
            self.note_missed(key, hash);
            return None;
        };
        let slot = self.slots.get(i as usize)?;
        let expired = slot
            .conn
            .as_ref()
            .is_some_and(|c| self.expired(c, slot.class, now));
        if expired {
            if self.remove_slot_with(i, on_remove) {
                self.stats.expired += 1;
                // (Both its keys left the index with it.)
                self.note_missed(key, hash);
            }
            return None;
        }
        Some((i, dir))
    }

    /// Notes that `key` (hash `hash`) is not in the index now.
    #[inline(always)]
    fn note_missed(&mut self, key: &FlowKey, hash: u64) {
        self.missed = Missed {
            key: *key,
            hash,
            indexed: self.indexed,
        };
    }

    /// The slot and direction of `key` if tracked (timed out or not),
    /// changing nothing.
    pub fn peek(&self, key: &FlowKey) -> Option<(u32, Dir)> {
        self.find(key, self.hash(key)).map(|(_, i, dir)| (i, dir))
    }

    /// True when `key` is tracked (timed out or not).
    pub fn contains(&self, key: &FlowKey) -> bool {
        self.find(key, self.hash(key)).is_some()
    }

    /// The connection in slot `i`.
    pub fn get(&self, i: u32) -> Option<&Conn<V>> {
        self.slots.get(i as usize)?.conn.as_ref()
    }

    /// A reference to the connection in slot `i`, if there is one.
    pub fn conn_ref(&self, i: u32) -> Option<ConnRef> {
        let s = self.slots.get(i as usize)?;
        s.conn.as_ref()?;
        Some(ConnRef {
            slot: i,
            generation: s.generation,
        })
    }

    /// Starts loading the part of the slot `r` names that
    /// [`ConnTable::resolve`] and [`ConnTable::touch`] read, without waiting
    /// for it: the switch calls it for a burst's packets whose flows are due
    /// to tell their connection of traffic, before it tells any, so that
    /// those misses overlap too.
    #[inline(always)]
    pub fn prefetch_slot(&self, r: ConnRef) {
        if let Some(s) = self.slots.get(r.slot as usize) {
            platform::prefetch_first(s, TOUCHED);
        }
    }

    /// The slot of the connection `r` names, if it is still tracked (not
    /// removed, its slot not reused since).
    pub fn resolve(&self, r: ConnRef) -> Option<u32> {
        let s = self.slots.get(r.slot as usize)?;
        (s.generation == r.generation && s.conn.is_some()).then_some(r.slot)
    }

    /// Records a packet of the connection in slot `i` travelling `dir`:
    /// updates the state and the counters. Returns the new state.
    ///
    /// The LRU position is updated lazily: the connection moves to the tail
    /// of its list only when its state moves it between the active and
    /// closing lists; otherwise it stays in place with a later `last_seen`
    /// than its place says, and is moved back when it reaches the head (in
    /// [`ConnTable::expire`] or an eviction). Moving it on every packet
    /// would write its neighbours and the tail: several cache misses per
    /// packet in a table of a million connections.
    pub fn touch(&mut self, i: u32, dir: Dir, tcp_flags: u8, now: u64) -> Option<ConnState> {
        let one_way = self.is_one_way(self.slots.get(i as usize)?.class);
        let (list_before, state, packets) = {
            let slot = self.slots.get_mut(i as usize)?;
            let before = slot.list;
            let c = slot.conn.as_mut()?;
            let was = c.state;
            c.state = next_state(c.state, dir, tcp_flags, &mut c.fin_seen);
            // Seen one way: the originator's ACK after its SYN says the
            // handshake completed (its SYN-ACK went another way).
            if one_way
                && was == ConnState::Tcp(TcpState::SynSent)
                && c.state == was
                && tcp_flags & (SYN | ACK | RST) == ACK
            {
                c.state = ConnState::Tcp(TcpState::Established);
            }
            c.last_seen = now;
            c.packets[dir as usize] += 1;
            (before, c.state, c.packets)
        };
        let list = List::of(state, packets[1] > 0);
        if list != list_before {
            self.unlink(i);
            self.push_tail(i, list, now);
        }
        Some(state)
    }

    /// What the head of `list` is: nothing, expired, seen since it was
    /// queued (then it is moved to the tail, its true LRU place), or the
    /// least recently used live connection.
    fn settle_head(&mut self, class: u8, list: List, now: u64) -> Head {
        let h = self.heads[li(class, list)];
        let Some(slot) = self.slots.get(h as usize) else {
            return Head::Empty;
        };
        let Some(c) = slot.conn.as_ref() else {
            return Head::Empty;
        };
        if self.expired(c, class, now) {
            return Head::Expired(h);
        }
        if c.last_seen > slot.queued {
            let seen = c.last_seen;
            self.unlink(h);
            self.push_tail(h, list, now.max(seen));
            return Head::Requeued;
        }
        Head::Live
    }

    /// [`ConnTable::settle_head`] until the head of `list` stays put: heads
    /// seen since they were queued go back first, a few at most (so an
    /// insert into a full table stays cheap; `Requeued` when that was not
    /// enough).
    fn settled_head(&mut self, class: u8, list: List, now: u64) -> Head {
        let mut head = Head::Empty;
        for _ in 0..EVICT_SCAN {
            head = self.settle_head(class, list, now);
            if !matches!(head, Head::Requeued) {
                break;
            }
        }
        head
    }

    /// Adds a connection whose first packet (with `tcp_flags`) had key
    /// `orig` and whose replies will carry `reply`. When full, evicts the
    /// oldest closing entry, else the oldest embryonic one, else the oldest
    /// timed-out one (each handed to `on_evict`), else refuses.
    pub fn insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        tcp_flags: u8,
        now: u64,
        value: V,
        on_evict: impl FnMut(&Conn<V>),
    ) -> Result<u32, ConnError> {
        self.insert_in(0, orig, reply, tcp_flags, now, value, on_evict)
    }

    /// [`ConnTable::insert`] into timeout class `class` (a class the table
    /// does not have is the first). When full, the entry evicted is the
    /// oldest closing one of the first class that has one, else the
    /// oldest embryonic one likewise, else a timed-out one.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_in(
        &mut self,
        class: u8,
        orig: FlowKey,
        reply: FlowKey,
        tcp_flags: u8,
        now: u64,
        value: V,
        mut on_evict: impl FnMut(&Conn<V>),
    ) -> Result<u32, ConnError> {
        let class = if usize::from(class) < self.timeouts.len() {
            class
        } else {
            0
        };
        // A new connection's key was usually just looked up, and missed:
        // its hash is known, and it is not in the index unless something
        // was indexed since (one search of the index for it, not two).
        let known = self.missed.indexed == self.indexed && self.missed.key == orig;
        let hr = self.hash(&reply);
        self.index.prefetch(hr);
        let ho = if known {
            self.missed.hash
        } else {
            self.hash(&orig)
        };
        debug_assert_eq!(ho, self.hash(&orig));
        // A full table makes room by evicting: choose the victim first and
        // start loading the index buckets its removal writes, so that they
        // arrive with the reply key's bucket instead of after it.
        let victim = if self.len >= self.capacity {
            let v = self.victim(now);
            if let Some(s) = v.and_then(|(h, _)| self.slots.get(h as usize)) {
                self.index.prefetch(s.hashes[0]);
                self.index.prefetch(s.hashes[1]);
            }
            Some(v)
        } else {
            None
        };
        // Either key tracked already: refused before anything is evicted.
        if self.find(&reply, hr).is_some() || (!known && self.find(&orig, ho).is_some()) {
            return Err(ConnError::Exists);
        }
        match victim {
            None => {}
            Some(Some((h, why))) => {
                let victim_class = self.slots.get(h as usize).map_or(0, |s| s.class);
                if self.remove_slot_with(h, &mut on_evict) {
                    match why {
                        List::Closing => self.stats.evicted_closing += 1,
                        List::Embryonic => self.stats.evicted_embryonic += 1,
                        List::Active => self.stats.evicted_idle += 1,
                    }
                }
                self.prefetch_victims(victim_class, why);
            }
            Some(None) => {
                self.stats.refused_full += 1;
                return Err(ConnError::Full {
                    capacity: self.capacity,
                });
            }
        }
        let i = match self.free.last() {
            Some(&i) => i,
            None => self.slots.len() as u32,
        };
        let Some(at) = self.index_pair_or_retry(i, (&orig, ho), (&reply, hr)) else {
            self.stats.refused_full += 1;
            return Err(ConnError::Full {
                capacity: self.capacity,
            });
        };
        let state = initial_state(orig.proto, tcp_flags);
        let conn = Conn {
            orig,
            reply,
            state,
            fin_seen: [false; 2],
            created: now,
            last_seen: now,
            packets: [1, 0],
            value,
        };
        if self.free.pop().is_some() {
            let s = &mut self.slots[i as usize];
            s.conn = Some(conn);
            s.class = class;
            s.hashes = [ho, hr];
            s.at = at;
        } else {
            self.slots.push(Slot {
                conn: Some(conn),
                class,
                generation: 0,
                prev: NIL,
                next: NIL,
                list: List::Active,
                queued: now,
                hashes: [ho, hr],
                at,
            });
            // The place the next push writes, loaded while this connection
            // is finished (its lines are written whole, and in a table
            // still filling up would otherwise be read from memory first).
            if self.slots.len() < self.slots.capacity() {
                platform::prefetch_place(self.slots.as_ptr().wrapping_add(self.slots.len()));
            }
        }
        self.push_tail(i, List::of(state, false), now);
        self.len += 1;
        self.stats.created += 1;
        Ok(i)
    }

    /// Starts loading what the next two evictions from `list` of class
    /// `class` will touch, while a full table takes new connections one
    /// after another: the index buckets of the list's head (whose slot the
    /// previous call loaded), and the whole slot after it. Each eviction
    /// then finds in cache what it would otherwise wait for in turn: the
    /// victim's slot, then its buckets (waiting for those was a third of
    /// an insert into a full table of half a million).
    #[inline]
    fn prefetch_victims(&self, class: u8, list: List) {
        let Some(head) = self
            .heads
            .get(li(class, list))
            .and_then(|&h| self.slots.get(h as usize))
        else {
            return;
        };
        if head.conn.is_some() {
            self.index.prefetch(head.hashes[0]);
            self.index.prefetch(head.hashes[1]);
        }
        if let Some(next) = self.slots.get(head.next as usize) {
            platform::prefetch_all(next);
        }
    }

    /// The connection a full table evicts for a new one, and the list it
    /// is taken from: the least recently used closing connection (timed
    /// out or not), else the oldest embryonic one (a SYN and nothing
    /// since: under a SYN flood the flood's own entries make room, and a
    /// confirmed connection is never pushed out), else the oldest
    /// timed-out active one; `None` when there is none of these.
    fn victim(&mut self, now: u64) -> Option<(u32, List)> {
        // (An empty list, the usual case for the closing ones, is seen as
        // such without the settling's set-up.)
        if self.has_any(List::Closing)
            && let Some(h) = self.any_head(List::Closing, now)
        {
            return Some((h, List::Closing));
        }
        if self.has_any(List::Embryonic)
            && let Some(h) = self.any_head(List::Embryonic, now)
        {
            return Some((h, List::Embryonic));
        }
        self.classes()
            .find_map(|k| match self.settled_head(k, List::Active, now) {
                Head::Expired(h) => Some((h, List::Active)),
                _ => None,
            })
    }

    /// The head of `list` in the first class where it is not empty, after
    /// [`ConnTable::settled_head`].
    fn any_head(&mut self, list: List, now: u64) -> Option<u32> {
        self.classes()
            .find_map(|k| match self.settled_head(k, list, now) {
                Head::Empty => None,
                _ => Some(self.heads[li(k, list)]),
            })
    }

    /// Whether `list` holds a connection in any class.
    #[inline(always)]
    fn has_any(&self, list: List) -> bool {
        self.classes()
            .any(|k| self.heads.get(li(k, list)).is_some_and(|&h| h != NIL))
    }

    /// Evicts the oldest embryonic connection that `pred` accepts among the
    /// first `scan` of the embryonic list of timeout class `class`,
    /// handing it to `on_evict`; up to
    /// `scan` of those seen since they were queued (a SYN answered, or
    /// retransmitted) go to their true place at the tail on the way, as
    /// the expiry does. False when none was found. What a group at its own
    /// limit (a VIP) uses to make room among its own entries.
    pub fn evict_embryonic(
        &mut self,
        class: u8,
        scan: usize,
        now: u64,
        pred: impl Fn(&Conn<V>) -> bool,
        on_evict: impl FnOnce(&Conn<V>),
    ) -> bool {
        let Some(&head) = self.heads.get(li(class, List::Embryonic)) else {
            return false;
        };
        let mut i = head;
        let mut found = None;
        // Up to `scan` entries seen since they were queued move to the tail
        // first (they do not count against `scan`); past that, such an
        // entry is taken as it stands: under a flood nearly every one was
        // answered since (the backend's SYN-ACK), and a VIP at its limit
        // must not refuse a new connection while it holds embryonic ones.
        let (mut looked, mut moved) = (0, 0);
        while looked < scan {
            let Some(s) = self.slots.get(i as usize) else {
                break;
            };
            let next = s.next;
            if let Some(c) = &s.conn {
                let seen = c.last_seen;
                if moved < scan && seen > s.queued && !self.expired(c, s.class, now) {
                    self.unlink(i);
                    self.push_tail(i, List::Embryonic, now.max(seen));
                    moved += 1;
                } else if pred(c) {
                    found = Some(i);
                    break;
                } else {
                    looked += 1;
                }
            } else {
                looked += 1;
            }
            i = next;
        }
        if !found.is_some_and(|i| self.remove_slot_with(i, on_evict)) {
            return false;
        }
        self.stats.evicted_embryonic += 1;
        true
    }

    /// Puts back a connection saved elsewhere (another process's table, a
    /// hitless upgrade) into timeout class `class`, as it was: state,
    /// counts and times (on this table's clock). It goes to the tail of
    /// the list its state belongs on, so connections should come least
    /// recently used first. Refused when full or when either key is
    /// tracked already; nothing is evicted for it.
    pub fn restore(&mut self, class: u8, conn: Conn<V>, now: u64) -> Result<(), ConnError> {
        let class = if usize::from(class) < self.timeouts.len() {
            class
        } else {
            0
        };
        if self.len >= self.capacity {
            return Err(ConnError::Full {
                capacity: self.capacity,
            });
        }
        let (ho, hr) = (self.hash(&conn.orig), self.hash(&conn.reply));
        if conn.orig == conn.reply
            || self.find(&conn.orig, ho).is_some()
            || self.find(&conn.reply, hr).is_some()
        {
            return Err(ConnError::Exists);
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    conn: None,
                    class,
                    generation: 0,
                    prev: NIL,
                    next: NIL,
                    list: List::Active,
                    queued: now,
                    hashes: [0; 2],
                    at: [None; 2],
                });
                self.slots.len() as u32 - 1
            }
        };
        let Some(at) = self.index_pair_or_retry(i, (&conn.orig, ho), (&conn.reply, hr)) else {
            self.free.push(i);
            return Err(ConnError::Full {
                capacity: self.capacity,
            });
        };
        let list = List::of(conn.state, conn.packets[1] > 0);
        let s = &mut self.slots[i as usize];
        s.conn = Some(conn);
        s.class = class;
        s.hashes = [ho, hr];
        s.at = at;
        self.push_tail(i, list, now);
        self.len += 1;
        Ok(())
    }

    /// Removes the connection in slot `i`.
    pub fn remove(&mut self, i: u32) -> Option<Conn<V>> {
        let c = self.remove_slot(i)?;
        self.stats.removed += 1;
        Some(c)
    }

    /// Removes timed-out connections, oldest first, looking at up to
    /// `budget` list heads of each timeout class (each removed, or moved
    /// back to its true LRU place when seen since it was queued); call it
    /// between bursts. Each removed connection goes to `on_remove`. Returns
    /// how many.
    pub fn expire(
        &mut self,
        now: u64,
        budget: usize,
        mut on_remove: impl FnMut(&Conn<V>),
    ) -> usize {
        let mut n = 0;
        for class in self.classes() {
            let mut steps = 0;
            for list in [List::Closing, List::Embryonic, List::Active] {
                while steps < budget {
                    steps += 1;
                    match self.settle_head(class, list, now) {
                        Head::Expired(h) => {
                            if self.remove_slot_with(h, &mut on_remove) {
                                self.stats.expired += 1;
                                n += 1;
                            }
                        }
                        // Seen since it was queued: moved to its place; go on.
                        Head::Requeued => {}
                        // LRU order: entries behind the head were used
                        // later; an entry with a shorter timeout may still
                        // be behind it and is then caught by `lookup` or a
                        // later pass.
                        Head::Live | Head::Empty => break,
                    }
                }
            }
        }
        n
    }

    /// Iterates over live connections (slot, connection).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Conn<V>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.conn.as_ref().map(|c| (i as u32, c)))
    }

    /// Mutable access to the caller's data of slot `i`.
    pub fn value_mut(&mut self, i: u32) -> Option<&mut V> {
        self.slots
            .get_mut(i as usize)?
            .conn
            .as_mut()
            .map(|c| &mut c.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn key(sport: u16) -> FlowKey {
        FlowKey::new(
            "10.0.0.1".parse().unwrap(),
            sport,
            "10.1.0.100".parse().unwrap(),
            80,
            6,
        )
    }

    fn table(cap: usize) -> ConnTable<u32> {
        ConnTable::new(cap, Timeouts::default())
    }

    proptest::proptest! {
        /// Inserts, removals and lookups against a map of both keys of
        /// every connection: every key is found (with its direction) exactly
        /// while its connection is tracked, and a connection whose key is
        /// tracked already is refused. Few keys, so they collide often.
        /// Some inserts follow a lookup of their key (as a new
        /// connection's do), whose miss the insert relies on.
        #[test]
        fn both_keys_are_found_exactly_while_tracked(
            ops in proptest::collection::vec(
                (proptest::bool::weighted(0.6), 0u16..24, 0u16..24, proptest::bool::ANY),
                1..300,
            ),
        ) {
            use std::collections::HashMap;
            let reply = |p: u16| FlowKey::new(
                "10.2.0.5".parse().unwrap(), 8080, "10.0.0.1".parse().unwrap(), p, 6,
            );
            // Eight places: a full table evicts its oldest embryonic
            // connection (every one here: SYNs) for each new one.
            let mut t = table(8);
            let mut model: HashMap<FlowKey, (u32, Dir)> = HashMap::new();
            for (add, a, b, look) in ops {
                let (o, r) = (key(a), reply(b));
                if look {
                    proptest::prop_assert_eq!(t.lookup(&o, 0, |_| {}), model.get(&o).copied());
                }
                if add {
                    let mut evicted = Vec::new();
                    let got = t.insert(o, r, 0x02, 0, u32::from(a), |c| evicted.push(c.clone()));
                    if model.contains_key(&o) || model.contains_key(&r) {
                        proptest::prop_assert_eq!(got, Err(ConnError::Exists));
                        proptest::prop_assert!(evicted.is_empty());
                    } else {
                        let i = got.unwrap();
                        for c in evicted {
                            proptest::prop_assert!(model.remove(&c.orig).is_some());
                            proptest::prop_assert!(model.remove(&c.reply).is_some());
                        }
                        model.insert(o, (i, Dir::Orig));
                        model.insert(r, (i, Dir::Reply));
                    }
                } else if let Some(&(i, _)) = model.get(&o) {
                    let c = t.remove(i).unwrap();
                    proptest::prop_assert!(model.remove(&c.orig).is_some());
                    proptest::prop_assert!(model.remove(&c.reply).is_some());
                }
                proptest::prop_assert_eq!(t.len() * 2, model.len());
                // No index entry is left behind (the key compare would hide
                // one from lookups).
                proptest::prop_assert_eq!(t.index.len(), model.len());
            }
            for p in 0..24 {
                for k in [key(p), reply(p)] {
                    proptest::prop_assert_eq!(t.peek(&k), model.get(&k).copied());
                    proptest::prop_assert_eq!(t.lookup(&k, 1, |_| {}), model.get(&k).copied());
                }
            }
        }
    }

    /// A key a lookup did not find is not searched for again by its
    /// insert, but only while nothing was indexed in between.
    #[test]
    fn a_key_found_missing_is_looked_for_again_once_anything_is_indexed() {
        let mut t = table(8);
        let other = key(9).reversed();
        assert_eq!(t.lookup(&key(1), 0, |_| {}), None);
        // The missing key indexed meanwhile, as another connection's reply.
        let i = t.insert(other, key(1), 0x02, 0, 1, |_| {}).unwrap();
        assert_eq!(
            t.insert(key(1), key(1).reversed(), 0x02, 0, 2, |_| {}),
            Err(ConnError::Exists)
        );
        assert_eq!(t.lookup(&key(1), 0, |_| {}), Some((i, Dir::Reply)));
        // Missing, and inserted right after: once, under its own slot.
        assert_eq!(t.lookup(&key(2), 0, |_| {}), None);
        let j = t
            .insert(key(2), key(2).reversed(), 0x02, 0, 3, |_| {})
            .unwrap();
        assert_eq!(
            t.insert(key(2), key(3).reversed(), 0x02, 0, 4, |_| {}),
            Err(ConnError::Exists)
        );
        assert_eq!(t.lookup(&key(2), 0, |_| {}), Some((j, Dir::Orig)));
        assert_eq!(t.len(), 2);
        assert_eq!(t.index.len(), 4);
    }

    /// A key restored (as a handover does) after a lookup missed it is
    /// found by the insert that follows.
    #[test]
    fn a_key_restored_after_a_missed_lookup_is_not_inserted_again() {
        let mut from = table(8);
        let i = from
            .insert(key(1), key(1).reversed(), 0x02, 0, 7, |_| {})
            .unwrap();
        let c = from.remove(i).unwrap();
        let mut t = table(8);
        assert_eq!(t.lookup(&key(1), 0, |_| {}), None);
        t.restore(0, c, 0).unwrap();
        assert_eq!(
            t.insert(key(1), key(2).reversed(), 0x02, 0, 2, |_| {}),
            Err(ConnError::Exists)
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.index.len(), 2);
    }

    #[test]
    fn a_preallocated_table_keeps_what_it_held_and_fills_to_its_capacity() {
        let mut t = table(5000);
        let reply = |p: u16| key(p).reversed();
        let first = t.insert(key(1), reply(1), 0x02, 0, 1, |_| {}).unwrap();
        t.preallocate().unwrap();
        assert_eq!(t.peek(&key(1)), Some((first, Dir::Orig)));
        for p in 2..=5000 {
            assert!(
                t.insert(key(p), reply(p), 0x02, 0, 1, |_| {}).is_ok(),
                "{p}"
            );
        }
        assert_eq!(t.len(), 5000);
        assert!((1..=5000).all(|p| t.peek(&reply(p)).is_some_and(|(_, d)| d == Dir::Reply)));
    }

    #[test]
    fn a_connection_whose_keys_are_equal_is_indexed_once_as_its_originating_direction() {
        let mut t = table(4);
        let k = key(7);
        let i = t.insert(k, k, 0x02, 0, 1, |_| {}).unwrap();
        assert_eq!(t.index.len(), 1);
        assert_eq!(t.peek(&k), Some((i, Dir::Orig)));
        assert!(t.remove(i).is_some());
        assert!(t.index.is_empty());
        assert_eq!(t.peek(&k), None);
    }

    #[test]
    fn a_reference_outlives_nothing_its_slot_holds_later() {
        let mut t = table(4);
        let (a, b) = (key(1000), key(1001));
        let i = t.insert(a, a.reversed(), 0x02, 0, 7, |_| {}).unwrap();
        let ra = t.conn_ref(i).unwrap();
        assert_eq!(t.resolve(ra), Some(i));
        assert!(t.remove(i).is_some());
        assert_eq!(t.resolve(ra), None, "removed");
        assert_eq!(t.conn_ref(i), None, "an empty slot has no connection");
        // The free slot is reused for `b`: a later generation of it.
        let j = t.insert(b, b.reversed(), 0x02, 1, 8, |_| {}).unwrap();
        assert_eq!(j, i);
        let rb = t.conn_ref(j).unwrap();
        assert_ne!(rb, ra);
        assert_eq!(rb.slot(), ra.slot());
        assert_eq!(t.resolve(ra), None, "the old reference does not reach b");
        assert_eq!(t.resolve(rb), Some(j));
        assert_eq!(t.get(j).map(|c| c.value), Some(8));
    }

    /// Restored connections sit in LRU order on the list their state
    /// belongs on: they expire oldest first, an embryonic one is what a
    /// full table evicts, and a full table or a tracked key refuses.
    #[test]
    fn restored_connections_expire_and_evict_as_if_they_had_been_here() {
        let mut t = table(3);
        let conn = |sport: u16, state: ConnState, last_seen: u64, replied: bool| Conn {
            orig: key(sport),
            reply: key(sport).reversed(),
            state,
            fin_seen: [false; 2],
            created: 0,
            last_seen,
            packets: [3, u64::from(replied)],
            value: u32::from(sport),
        };
        let est = ConnState::Tcp(TcpState::Established);
        let now = 1000 * SEC;
        // Least recently used first, as an export lists them.
        t.restore(0, conn(1, est, now - 240 * SEC + MS, true), now)
            .unwrap();
        t.restore(0, conn(2, est, now - 100 * SEC, true), now)
            .unwrap();
        let syn = ConnState::Tcp(TcpState::SynSent);
        t.restore(0, conn(3, syn, now, false), now).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.restore(0, conn(4, est, now, true), now),
            Err(ConnError::Full { capacity: 3 })
        );
        let mut t2 = table(3);
        t2.restore(0, conn(1, est, now, true), now).unwrap();
        assert_eq!(
            t2.restore(0, conn(1, est, now, true), now),
            Err(ConnError::Exists)
        );
        // A second later only the first has timed out (240 s idle).
        let mut gone = Vec::new();
        t.expire(now + SEC, 64, |c| gone.push(c.value));
        assert_eq!(gone, [1]);
        // Full again, a new connection evicts the embryonic one (its SYN
        // was never answered), not the established one.
        t.restore(0, conn(5, est, now, true), now).unwrap();
        let mut evicted = Vec::new();
        t.insert(key(6), key(6).reversed(), 0x02, now + 2 * SEC, 6, |c| {
            evicted.push(c.value)
        })
        .unwrap();
        assert_eq!(evicted, [3]);
        assert!(t.contains(&key(2)) && t.contains(&key(5)) && t.contains(&key(6)));
    }

    #[test]
    fn shortest_timeout_is_the_minimum() {
        let mut t = Timeouts::default();
        assert_eq!(t.shortest(), 10 * SEC);
        t.udp_unreplied = 3 * SEC;
        assert_eq!(t.shortest(), 3 * SEC);
    }

    /// UDP connections timing out after 50 ns.
    fn udp_table(cap: usize) -> ConnTable<u32> {
        let to = Timeouts {
            udp_unreplied: 50,
            udp_replied: 50,
            ..Timeouts::default()
        };
        ConnTable::new(cap, to)
    }

    fn udp(sport: u16) -> FlowKey {
        FlowKey {
            proto: 17,
            ..key(sport)
        }
    }

    #[test]
    fn a_connection_seen_lately_is_not_expired_from_the_head_and_does_not_shield_others() {
        let mut t = udp_table(8);
        let a = t
            .insert(udp(1), udp(1).reversed(), 0, 0, 1, |_| {})
            .unwrap();
        let b = t
            .insert(udp(2), udp(2).reversed(), 0, 10, 2, |_| {})
            .unwrap();
        // `a` is seen again at 40 but stays at the head of the list.
        t.touch(a, Dir::Orig, 0, 40);
        // At 70: `a` (seen 30 ago) lives, `b` (60 ago) has timed out though
        // it is behind `a`.
        let mut gone = Vec::new();
        assert_eq!(t.expire(70, 16, |c| gone.push(c.value)), 1);
        assert_eq!(gone, vec![2]);
        assert!(t.get(a).is_some());
        assert!(t.get(b).is_none());
        // `a` went back to its place: at 91 (51 after it was seen) it goes.
        assert_eq!(t.expire(89, 16, |_| {}), 0);
        assert_eq!(t.expire(91, 16, |_| {}), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_table_evicts_the_closing_connection_seen_least_lately() {
        let mut t = table(2);
        let a = t
            .insert(key(1), key(1).reversed(), ACK, 0, 1, |_| {})
            .unwrap();
        let b = t
            .insert(key(2), key(2).reversed(), ACK, 1, 2, |_| {})
            .unwrap();
        // Both close (queued in that order), then `a` sees more packets.
        t.touch(a, Dir::Orig, FIN | ACK, 2);
        t.touch(b, Dir::Orig, FIN | ACK, 3);
        t.touch(a, Dir::Reply, ACK, 4);
        let mut evicted = Vec::new();
        t.insert(key(3), key(3).reversed(), SYN, 5, 3, |c| {
            evicted.push(c.value)
        })
        .unwrap();
        assert_eq!(evicted, vec![2]);
        assert_eq!(t.stats().evicted_closing, 1);
        // `a` stays; `b`'s slot went to the new connection.
        assert_eq!(t.get(a).map(|c| c.orig), Some(key(1)));
        assert_eq!(t.get(b).map(|c| c.orig), Some(key(3)));
    }

    #[test]
    fn a_full_table_evicts_an_idle_connection_behind_a_busy_head() {
        let mut t = udp_table(2);
        // Two replied (confirmed) flows, so none is embryonic.
        let a = t
            .insert(udp(1), udp(1).reversed(), 0, 0, 1, |_| {})
            .unwrap();
        t.touch(a, Dir::Reply, 0, 0);
        let b = t
            .insert(udp(2), udp(2).reversed(), 0, 10, 2, |_| {})
            .unwrap();
        t.touch(b, Dir::Reply, 0, 10);
        t.touch(a, Dir::Orig, 0, 40);
        let mut evicted = Vec::new();
        let c = t
            .insert(udp(3), udp(3).reversed(), 0, 70, 3, |c| {
                evicted.push(c.value)
            })
            .unwrap();
        assert_eq!(evicted, vec![2]);
        assert_eq!(t.stats().evicted_idle, 1);
        assert!(t.get(a).is_some() && t.get(c).is_some());
        // Both live and confirmed now: a fourth is refused.
        t.touch(c, Dir::Reply, 0, 71);
        assert!(matches!(
            t.insert(udp(4), udp(4).reversed(), 0, 71, 4, |_| {}),
            Err(ConnError::Full { .. })
        ));
    }

    fn state(t: &ConnTable<u32>, i: u32) -> ConnState {
        t.get(i).unwrap().state
    }

    #[test]
    fn tcp_open_and_close() {
        let mut t = table(8);
        let k = key(1000);
        let i = t.insert(k, k.reversed(), SYN, 0, 7, |_| {}).unwrap();
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::SynSent));
        assert_eq!(t.lookup(&k.reversed(), 1, |_| {}), Some((i, Dir::Reply)));
        t.touch(i, Dir::Reply, SYN | ACK, 1);
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::SynReceived));
        t.touch(i, Dir::Orig, ACK, 2);
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::Established));
        t.touch(i, Dir::Orig, ACK | FIN, 3);
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::FinWait));
        t.touch(i, Dir::Reply, ACK | FIN, 4);
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::TimeWait));
        assert_eq!(t.get(i).unwrap().packets, [3, 2]);
        // Time-wait lasts 10 s of idleness.
        assert!(t.lookup(&k, 4 + 9_000 * MS, |_| {}).is_some());
        let mut removed = Vec::new();
        assert!(
            t.lookup(&k, 4 + 9_000 * MS + 10_001 * MS, |c| removed.push(c.value))
                .is_none()
        );
        assert_eq!(removed, vec![7]);
        assert!(t.is_empty());
        assert!(!t.contains(&k.reversed()));
    }

    #[test]
    fn rst_closes_and_midstream_pickup_is_established() {
        let mut t = table(8);
        let i = t
            .insert(key(1), key(1).reversed(), ACK, 0, 0, |_| {})
            .unwrap();
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::Established));
        t.touch(i, Dir::Reply, RST, 1);
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::Closed));
        // An RST does not reopen.
        t.touch(i, Dir::Orig, SYN, 2);
        assert_eq!(state(&t, i), ConnState::Tcp(TcpState::Closed));
    }

    #[test]
    fn timeouts_per_state() {
        let to = Timeouts::default();
        let mut t = table(8);
        let syn = t
            .insert(key(1), key(1).reversed(), SYN, 0, 0, |_| {})
            .unwrap();
        let est = t
            .insert(key(2), key(2).reversed(), ACK, 0, 0, |_| {})
            .unwrap();
        // Picked up mid-stream and answered: established.
        t.touch(est, Dir::Reply, ACK, 0);
        let u = FlowKey {
            proto: 17,
            ..key(3)
        };
        let udp = t.insert(u, u.reversed(), 0, 0, 0, |_| {}).unwrap();
        assert_eq!(state(&t, udp), ConnState::Udp { replied: false });
        t.touch(udp, Dir::Reply, 0, 0);
        assert_eq!(state(&t, udp), ConnState::Udp { replied: true });
        let _ = (syn, est);
        // Just past the handshake timeout: the SYN entry goes, the others stay.
        let now = to.tcp_handshake + 1;
        let mut gone = Vec::new();
        assert_eq!(t.expire(now, 100, |c| gone.push(c.orig.src_port)), 1);
        assert_eq!(gone, vec![1]);
        assert!(t.lookup(&key(2), now, |_| {}).is_some());
        // UDP (replied) outlives 30 s; established outlives 120 s.
        let now = to.udp_replied + 1;
        assert!(t.lookup(&u, now, |_| {}).is_none());
        assert!(t.lookup(&key(2), now, |_| {}).is_some());
        assert_eq!(t.stats().expired, 2);
    }

    #[test]
    fn full_table_evicts_closing_then_idle_then_refuses() {
        let mut t = table(3);
        // Connections picked up mid-stream, each confirmed by a reply.
        let a = t
            .insert(key(1), key(1).reversed(), ACK, 0, 1, |_| {})
            .unwrap();
        let b = t
            .insert(key(2), key(2).reversed(), ACK, 0, 2, |_| {})
            .unwrap();
        let c = t
            .insert(key(3), key(3).reversed(), ACK, 0, 3, |_| {})
            .unwrap();
        for i in [a, b] {
            t.touch(i, Dir::Reply, ACK, 0);
        }
        t.touch(c, Dir::Orig, FIN | ACK, 1); // closing
        let mut evicted = Vec::new();
        let d = t
            .insert(key(4), key(4).reversed(), ACK, 2, 4, |c| {
                evicted.push(c.value)
            })
            .unwrap();
        t.touch(d, Dir::Reply, ACK, 2);
        assert_eq!(evicted, vec![3]);
        // No closing entry left, none timed out: refused and counted.
        assert_eq!(
            t.insert(key(5), key(5).reversed(), SYN, 3, 5, |_| {}),
            Err(ConnError::Full { capacity: 3 })
        );
        assert_eq!(t.stats().refused_full, 1);
        // Once the oldest active entry (a, last used at 0) has timed out, it makes room.
        t.touch(a, Dir::Orig, ACK, 0);
        let late = Timeouts::default().tcp_established + 10;
        t.insert(key(6), key(6).reversed(), SYN, late, 6, |c| {
            evicted.push(c.value)
        })
        .unwrap();
        assert_eq!(evicted.len(), 2);
        assert_eq!(t.stats().evicted_closing, 1);
        assert_eq!(t.stats().evicted_idle, 1);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.insert(key(6), key(6).reversed(), SYN, late, 6, |_| {}),
            Err(ConnError::Exists)
        );
    }

    #[test]
    fn a_full_table_evicts_the_oldest_embryonic_before_refusing() {
        let mut t = table(3);
        let est = t
            .insert(key(1), key(1).reversed(), SYN, 0, 1, |_| {})
            .unwrap();
        t.touch(est, Dir::Reply, SYN | ACK, 0);
        t.touch(est, Dir::Orig, ACK, 0);
        t.insert(key(2), key(2).reversed(), SYN, 1, 2, |_| {})
            .unwrap();
        t.insert(key(3), key(3).reversed(), SYN, 2, 3, |_| {})
            .unwrap();
        let mut evicted = Vec::new();
        t.insert(key(4), key(4).reversed(), SYN, 3, 4, |c| {
            evicted.push(c.value)
        })
        .unwrap();
        // The oldest SYN-only entry went; the established one stays.
        assert_eq!(evicted, vec![2]);
        assert_eq!(t.stats().evicted_embryonic, 1);
        assert!(t.lookup(&key(1), 3, |_| {}).is_some());
        // A SYN answered is no longer embryonic: it is not evicted.
        let (i3, _) = t.lookup(&key(3), 3, |_| {}).unwrap();
        t.touch(i3, Dir::Reply, SYN | ACK, 3);
        t.insert(key(5), key(5).reversed(), SYN, 4, 5, |c| {
            evicted.push(c.value)
        })
        .unwrap();
        assert_eq!(evicted, vec![2, 4]);
        assert!(t.lookup(&key(3), 4, |_| {}).is_some());
    }

    #[test]
    fn a_connection_picked_up_mid_stream_is_evictable_until_its_first_reply() {
        let mut t = table(3);
        // Two bare ACKs (mid-stream pickups); the first one hears back.
        let a = t
            .insert(key(1), key(1).reversed(), ACK, 0, 1, |_| {})
            .unwrap();
        t.insert(key(2), key(2).reversed(), ACK, 1, 2, |_| {})
            .unwrap();
        t.touch(a, Dir::Reply, ACK, 2);
        t.insert(key(3), key(3).reversed(), ACK, 3, 3, |_| {})
            .unwrap();
        // A flood of bare ACKs displaces the unconfirmed ones, oldest
        // first, never the confirmed one.
        let mut evicted = Vec::new();
        for k in 4..10u16 {
            t.insert(key(k), key(k).reversed(), ACK, 4, u32::from(k), |c| {
                evicted.push(c.value)
            })
            .unwrap();
        }
        assert_eq!(evicted, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(t.stats().evicted_embryonic, 6);
        assert!(t.lookup(&key(1), 5, |_| {}).is_some());
    }

    #[test]
    fn an_unanswered_mid_stream_pickup_times_out_as_a_handshake() {
        let to = Timeouts::default();
        let mut t = table(8);
        // A stray ACK first, a SYN behind it: both go when the handshake
        // timeout has passed (the first does not hold up the second).
        t.insert(key(1), key(1).reversed(), ACK, 0, 1, |_| {})
            .unwrap();
        t.insert(key(2), key(2).reversed(), SYN, 0, 2, |_| {})
            .unwrap();
        // One answered pickup keeps the established timeout.
        let c = t
            .insert(key(3), key(3).reversed(), ACK, 0, 3, |_| {})
            .unwrap();
        t.touch(c, Dir::Reply, ACK, 0);
        assert_eq!(t.expire(to.tcp_handshake + 1, 100, |_| {}), 2);
        assert!(t.lookup(&key(3), to.tcp_handshake + 1, |_| {}).is_some());
    }

    #[test]
    fn what_a_touch_reads_lies_in_a_slots_first_bytes() {
        use std::mem::{offset_of, size_of};
        type S = Slot<crate::balancer::ConnInfo>;
        type C = Conn<crate::balancer::ConnInfo>;
        let conn = offset_of!(S, conn);
        let ends = [
            offset_of!(S, generation) + 4,
            offset_of!(S, class) + 1,
            offset_of!(S, list) + 1,
            offset_of!(S, queued) + 8,
            conn + offset_of!(C, last_seen) + 8,
            conn + offset_of!(C, packets) + 16,
            conn + offset_of!(C, state) + size_of::<ConnState>(),
            conn + offset_of!(C, fin_seen) + 2,
        ];
        assert_eq!(ends.into_iter().max(), Some(TOUCHED));
        // (Where `Option` keeps whether a slot holds a connection is the
        // compiler's choice; it takes a niche of the connection's.)
        assert_eq!(size_of::<Option<C>>(), size_of::<C>());
        assert_eq!(size_of::<S>(), 304);
    }

    #[test]
    fn slots_are_reused_and_lists_stay_consistent() {
        let mut t = table(64);
        for round in 0..10u64 {
            let ids: Vec<u32> = (0..64u16)
                .map(|p| {
                    t.insert(key(p), key(p).reversed(), SYN, round, 0, |_| {})
                        .unwrap()
                })
                .collect();
            for (n, i) in ids.iter().enumerate() {
                if n % 2 == 0 {
                    t.touch(*i, Dir::Orig, FIN, round);
                }
            }
            for i in ids {
                assert!(t.remove(i).is_some());
            }
            assert!(t.is_empty());
        }
        assert_eq!(t.slots.len(), 64);
        assert_eq!(t.heads, [NIL; LISTS]);
    }
}
