//! Later IP fragments carry no transport header, so no ports: they cannot
//! find their flow by themselves. Each worker remembers, for a while, the
//! flow key of every first fragment it sees (by input port, addresses and
//! the datagram's identification, and for IPv4 the protocol), and a later
//! fragment takes its first fragment's key, hence its flow and its
//! decision: through VIPs, security groups and SNAT alike (as VPP and
//! Ananta forward fragments without reassembling them). A later fragment
//! whose first has not been seen (reordered on the way, sent last-first)
//! waits for it a short while in a bounded hold ([`FragHold`], as VPP's
//! shallow virtual reassembly caches them) and follows it when it comes;
//! one whose first does not come in time (lost, or from before a restart),
//! or that finds the hold full, is dropped and counted (`frag_no_first`).
//!
//! The table is bounded: at capacity the oldest entry makes room; entries
//! expire after a timeout. A successor process (a hitless upgrade) gets
//! the live entries with the time each has left ([`FragRecord`]), so the
//! later fragments of a datagram whose first crossed the predecessor still
//! find their flow. Written here (a map plus a ring of insertion
//! order) because the standard map alone cannot find the oldest entry
//! without a scan.

use dataplane::{FlowKey, Parsed};
use serde::{Deserialize, Serialize};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::Ipv6Addr;

/// One remembered datagram as a successor process takes it in (addresses
/// IPv4-mapped for IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragRecord {
    /// The port its fragments arrive on.
    pub in_port: u16,
    /// Its source address.
    pub src: Ipv6Addr,
    /// Its destination address.
    pub dst: Ipv6Addr,
    /// Its first fragment's (its flow's) protocol.
    pub proto: u8,
    /// Its identification.
    pub id: u32,
    /// Its first fragment's ports: source.
    pub src_port: u16,
    /// And destination.
    pub dst_port: u16,
    /// Time it has left, in ns.
    pub left_ns: u64,
}

/// What identifies a fragmented datagram on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    in_port: u16,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    id: u32,
}

impl FragKey {
    /// The datagram `p` (a fragment) belongs to.
    pub fn of(p: &Parsed) -> FragKey {
        FragKey::new(
            p.in_port,
            p.key.src_ip,
            p.key.dst_ip,
            p.key.proto,
            p.frag.id,
        )
    }

    /// The datagram of protocol `proto` and identification `id` from `src`
    /// to `dst` (IPv4-mapped for IPv4) on `in_port`. IPv6 names a datagram
    /// by its addresses and identification alone (RFC 8200, 4.5): its first
    /// fragment's protocol is the one after the extension headers behind
    /// the fragment header, a later fragment's the fragment header's next
    /// header, which differ when there are such headers. (The parser
    /// refuses IPv6 packets with IPv4-mapped addresses, so the address
    /// form tells the two apart.)
    fn new(in_port: u16, src: [u8; 16], dst: [u8; 16], proto: u8, id: u32) -> FragKey {
        FragKey {
            in_port,
            src,
            dst,
            proto: if dataplane::key::is_v4_mapped(&src) {
                proto
            } else {
                0
            },
            id,
        }
    }
}

/// Counters of a fragment table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragStats {
    /// First fragments remembered.
    pub noted: u64,
    /// Later fragments that found their first.
    pub found: u64,
    /// Entries pushed out at capacity before they expired.
    pub evicted: u64,
}

/// A bounded, expiring map from datagram to its first fragment's flow key.
#[derive(Debug)]
pub struct FragTable {
    /// Keyed with a random seed: fragment keys come from packets.
    map: HashMap<FragKey, (FlowKey, u64), RandomState>,
    /// Insertion order, with each entry's expiry: one record per entry.
    order: VecDeque<(FragKey, u64)>,
    capacity: usize,
    timeout_ns: u64,
    stats: FragStats,
}

impl FragTable {
    /// A table of at most `capacity` datagrams, each remembered for
    /// `timeout_ns`.
    pub fn new(capacity: usize, timeout_ns: u64) -> FragTable {
        let capacity = capacity.max(1);
        FragTable {
            // Room for twice the entries, so that the map never grows
            // (nor allocates) while it churns.
            map: HashMap::with_capacity_and_hasher(capacity * 2, RandomState::new()),
            order: VecDeque::with_capacity(capacity + 1),
            capacity,
            timeout_ns,
            stats: FragStats::default(),
        }
    }

    /// Remembers that the datagram of first fragment `p` belongs to flow
    /// `p.key`. A datagram remembered already keeps its first entry (a
    /// repeated or forged first fragment cannot redirect the later ones,
    /// nor fill the order queue).
    pub fn note(&mut self, p: &Parsed, now: u64) {
        self.expire(now);
        let k = FragKey::of(p);
        if self.map.contains_key(&k) {
            return;
        }
        let until = now.saturating_add(self.timeout_ns);
        if self.map.len() >= self.capacity {
            while let Some((old, t)) = self.order.pop_front() {
                if self.map.get(&old).is_some_and(|e| e.1 == t) {
                    self.map.remove(&old);
                    self.stats.evicted += 1;
                    break;
                }
            }
        }
        self.map.insert(k, (p.key, until));
        // Every live entry has exactly one record in `order` (entries are
        // never noted twice), so it holds at most `capacity` records.
        self.order.push_back((k, until));
        self.stats.noted += 1;
    }

    /// The flow key of the first fragment of later fragment `p`'s datagram.
    pub fn find(&mut self, p: &Parsed, now: u64) -> Option<FlowKey> {
        let (key, until) = *self.map.get(&FragKey::of(p))?;
        if now > until {
            return None;
        }
        self.stats.found += 1;
        Some(key)
    }

    /// Drops the entries that expired by `now`, oldest first.
    fn expire(&mut self, now: u64) {
        while let Some(&(k, t)) = self.order.front() {
            if t > now {
                break;
            }
            self.order.pop_front();
            if self.map.get(&k).is_some_and(|e| e.1 == t) {
                self.map.remove(&k);
            }
        }
    }

    /// Datagrams remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when none is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> FragStats {
        self.stats
    }

    /// The live entries, oldest first, with the time each has left at
    /// `now`.
    pub fn export(&self, now: u64) -> Vec<FragRecord> {
        self.order
            .iter()
            .filter(|(k, t)| *t > now && self.map.get(k).is_some_and(|e| e.1 == *t))
            .filter_map(|(k, t)| {
                let (key, _) = self.map.get(k)?;
                Some(FragRecord {
                    in_port: k.in_port,
                    src: Ipv6Addr::from(k.src),
                    dst: Ipv6Addr::from(k.dst),
                    proto: key.proto,
                    id: k.id,
                    src_port: key.src_port,
                    dst_port: key.dst_port,
                    left_ns: t - now,
                })
            })
            .collect()
    }

    /// Takes in a predecessor's entries (from [`FragTable::export`]), each
    /// with the time it had left from `now`, as far as capacity allows
    /// (the newest are kept); returns how many.
    pub fn restore(&mut self, recs: &[FragRecord], now: u64) -> usize {
        let skip = recs.len().saturating_sub(self.capacity);
        let mut n = 0;
        for r in recs.iter().skip(skip) {
            // No IPv6 flow has protocol 0 (a hop-by-hop header is read
            // past, or refused): such a record names no flow.
            if r.proto == 0 && !dataplane::key::is_v4_mapped(&r.src.octets()) {
                continue;
            }
            let k = FragKey::new(r.in_port, r.src.octets(), r.dst.octets(), r.proto, r.id);
            if self.map.contains_key(&k) || self.map.len() >= self.capacity {
                continue;
            }
            let key = FlowKey {
                src_ip: k.src,
                dst_ip: k.dst,
                src_port: r.src_port,
                dst_port: r.dst_port,
                proto: r.proto,
            };
            let until = now.saturating_add(r.left_ns.min(self.timeout_ns));
            self.map.insert(k, (key, until));
            self.order.push_back((k, until));
            n += 1;
        }
        n
    }
}

/// Counters of a [`FragHold`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Later fragments held for their first.
    pub held: u64,
    /// Held fragments whose first came: handed back to be forwarded.
    pub released: u64,
    /// Held fragments whose first did not come in time: dropped.
    pub expired: u64,
    /// Later fragments without their first refused for want of room.
    pub refused: u64,
}

/// A held fragment: its datagram, the port it came in on, whether it was
/// handed to this worker by another (its connection's owner need not be
/// looked for again), until when it waits, and the packet.
struct HeldFrag<B> {
    key: FragKey,
    in_port: u16,
    owned: bool,
    until: u64,
    pkt: B,
}

/// Later fragments that came before their first fragment (reordered on
/// the way, or sent last-first as some stacks do), held for a short while
/// instead of dropped, as VPP's shallow virtual reassembly caches
/// fragments until the first one is seen. When the first fragment of a
/// datagram is noted, its held fragments are handed back, in the order
/// they came, to follow it; those whose first does not come within the
/// hold time are dropped (`frag_no_first`), as are those that find the
/// hold full (it is bounded: a flood of fragments whose first never comes
/// holds at most that many buffers, for at most that long).
///
/// Kept in arrival order, so the oldest is always at the front (handing a
/// datagram's fragments back keeps the others' order). A count of the held
/// fragments by a seeded hash of their datagram, with [`TAGS_PER_PLACE`]
/// counts for each place in the hold, spares a first fragment whose
/// datagram has none held the walk of the whole hold: a flood of first
/// fragments beside a hold full of fragments whose first never comes
/// walks the hold for about one in that many, not for each (each hold's
/// hash has random keys of its own, so a sender cannot aim its datagrams
/// at the held ones' counts).
pub struct FragHold<B> {
    q: VecDeque<HeldFrag<B>>,
    capacity: usize,
    hold_ns: u64,
    stats: HoldStats,
    seed: RandomState,
    /// Held fragments, by their datagram's tag ([`FragHold::tag`]); a
    /// power of two long.
    tags: Vec<u32>,
    /// Walks of the hold (for the tests).
    #[cfg(test)]
    walks: usize,
}

/// How many counts of held fragments [`FragHold`] keeps for each place in
/// it (at least: rounded up to a power of two).
pub const TAGS_PER_PLACE: usize = 16;

impl<B> FragHold<B> {
    /// A hold for at most `capacity` fragments (0: none is held), each for
    /// at most `hold_ns`. Its memory is taken now: holding never
    /// allocates.
    pub fn new(capacity: usize, hold_ns: u64) -> FragHold<B> {
        FragHold {
            q: VecDeque::with_capacity(capacity),
            capacity,
            hold_ns,
            stats: HoldStats::default(),
            seed: RandomState::new(),
            // (At most 2^24 counts: a hold that large is not for one worker.)
            tags: vec![
                0;
                capacity
                    .saturating_mul(TAGS_PER_PLACE)
                    .clamp(1, 1 << 24)
                    .next_power_of_two()
            ],
            #[cfg(test)]
            walks: 0,
        }
    }

    /// The count of datagram `key`'s held fragments (and of the other
    /// datagrams of its tag).
    fn tag(&self, key: &FragKey) -> usize {
        self.seed.hash_one(key) as usize & (self.tags.len() - 1)
    }

    /// Counts out a held fragment of tag `t` that leaves the hold.
    fn uncount(&mut self, t: usize) {
        if let Some(n) = self.tags.get_mut(t) {
            debug_assert!(*n > 0, "a held fragment's count is 0");
            *n = n.saturating_sub(1);
        }
    }

    /// Holds later fragment `p` (packet `pkt`, which came in on `p`'s port,
    /// handed over by another worker if `owned`) until its first fragment
    /// is noted or `now` plus the hold time; gives the packet back when the
    /// hold is full.
    pub fn hold(&mut self, p: &Parsed, owned: bool, pkt: B, now: u64) -> Result<(), B> {
        if self.q.len() >= self.capacity {
            self.stats.refused += 1;
            return Err(pkt);
        }
        let key = FragKey::of(p);
        let t = self.tag(&key);
        if let Some(n) = self.tags.get_mut(t) {
            *n += 1;
        }
        self.q.push_back(HeldFrag {
            key,
            in_port: p.in_port,
            owned,
            until: now.saturating_add(self.hold_ns),
            pkt,
        });
        self.stats.held += 1;
        Ok(())
    }

    /// Moves the held fragments of first fragment `p`'s datagram, in the
    /// order they came, to the back of `out` as (input port, owned,
    /// packet).
    pub fn release(&mut self, p: &Parsed, out: &mut VecDeque<(u16, bool, B)>) {
        if self.q.is_empty() {
            return;
        }
        let key = FragKey::of(p);
        let t = self.tag(&key);
        // None of its tag held, so none of it: no walk.
        if self.tags.get(t).is_none_or(|&n| n == 0) {
            return;
        }
        #[cfg(test)]
        {
            self.walks += 1;
        }
        // One turn of the queue: what stays goes back in its order.
        for _ in 0..self.q.len() {
            let Some(h) = self.q.pop_front() else { break };
            if h.key == key {
                self.stats.released += 1;
                self.uncount(t);
                out.push_back((h.in_port, h.owned, h.pkt));
            } else {
                self.q.push_back(h);
            }
        }
    }

    /// The oldest fragment whose hold time ran out by `now`, taken out (to
    /// be dropped), if any.
    pub fn pop_expired(&mut self, now: u64) -> Option<B> {
        if self.q.front()?.until > now {
            return None;
        }
        self.stats.expired += 1;
        let h = self.q.pop_front()?;
        self.uncount(self.tag(&h.key));
        Some(h.pkt)
    }

    /// Fragments held now.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> HoldStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::parse::Frag;

    /// An IPv4 UDP fragment (addresses IPv4-mapped, as keys hold them).
    fn frag(id: u32, sport: u16, offset: u16) -> Parsed {
        let mut p = Parsed::default();
        p.key.src_ip = dataplane::key::mapped16([10, 0, 0, 1]);
        p.key.dst_ip = dataplane::key::mapped16([10, 0, 0, 2]);
        p.key.proto = 17;
        p.key.src_port = sport;
        p.frag = Frag {
            id,
            offset,
            more: offset == 0,
        };
        p
    }

    /// An IPv6 fragment of datagram 9 at `offset` (8-byte units) whose
    /// fragment header's next header is destination options (60); the
    /// first fragment carries them (8 bytes) and a UDP header.
    fn v6_fragment_behind_options(offset: u16) -> Parsed {
        let mut payload = vec![60, 0];
        payload.extend_from_slice(&((offset << 3) | u16::from(offset == 0)).to_be_bytes());
        payload.extend_from_slice(&9u32.to_be_bytes());
        if offset == 0 {
            payload.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
            payload.extend_from_slice(&[0x13, 0x88, 0, 53, 0, 40, 0, 0]);
        }
        payload.resize(payload.len() + 16, 0xab);
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[44, 64]);
        f.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&payload);
        dataplane::parse(&f, 0).unwrap()
    }

    #[test]
    fn an_ipv6_datagram_with_headers_behind_its_fragment_header_is_followed() {
        let first = v6_fragment_behind_options(0);
        let later = v6_fragment_behind_options(4);
        assert_eq!((first.key.proto, first.key.src_port), (17, 5000));
        assert_eq!(
            later.key.proto, 60,
            "a later fragment: the fragment header's next header"
        );
        let mut t = FragTable::new(4, 100);
        t.note(&first, 0);
        assert_eq!(t.find(&later, 1), Some(first.key));
        // And in a successor, which takes the entry through JSON.
        let json = serde_json::to_string(&t.export(1)).unwrap();
        let mut next = FragTable::new(4, 100);
        let recs: Vec<FragRecord> = serde_json::from_str(&json).unwrap();
        assert_eq!(recs[0].proto, 17, "the flow's protocol");
        assert_eq!(next.restore(&recs, 0), 1);
        assert_eq!(next.find(&later, 1), Some(first.key));
        // An IPv6 record of protocol 0 names no flow: not taken in.
        let none = FragRecord {
            proto: 0,
            id: 10,
            ..recs[0]
        };
        assert_eq!(FragTable::new(4, 100).restore(&[none], 0), 0);
        // Held before its first, the later fragment is that datagram's.
        let mut h = FragHold::new(2, 100);
        assert!(h.hold(&later, false, 1u8, 0).is_ok());
        let mut out = VecDeque::new();
        h.release(&first, &mut out);
        assert_eq!(out, [(0, false, 1)]);
    }

    #[test]
    fn later_fragments_find_their_first_until_it_expires() {
        let mut t = FragTable::new(4, 100);
        t.note(&frag(7, 5000, 0), 0);
        let later = Parsed {
            key: FlowKey {
                src_port: 0,
                ..frag(7, 0, 185).key
            },
            ..frag(7, 0, 185)
        };
        assert_eq!(t.find(&later, 50).map(|k| k.src_port), Some(5000));
        assert_eq!(t.find(&frag(8, 0, 185), 50), None, "another datagram");
        let mut tcp = later;
        tcp.key.proto = 6;
        assert_eq!(t.find(&tcp, 50), None, "another IPv4 protocol");
        let other_port = Parsed {
            in_port: 3,
            ..later
        };
        assert_eq!(t.find(&other_port, 50), None, "another port");
        assert_eq!(t.find(&later, 101), None, "expired");
        t.note(&frag(9, 1, 0), 200);
        assert_eq!(t.len(), 1, "the expired entry went");
    }

    /// A later fragment of datagram `id` (no ports), as parsed.
    fn later(id: u32) -> Parsed {
        let f = frag(id, 0, 185);
        Parsed {
            key: FlowKey {
                src_port: 0,
                dst_port: 0,
                ..f.key
            },
            ..f
        }
    }

    /// Held fragments come back, in their order, when their datagram's
    /// first is noted; the other datagrams' stay, in theirs, until their
    /// hold time runs out; a full hold refuses.
    #[test]
    fn held_fragments_follow_their_first_or_expire() {
        let mut h: FragHold<&str> = FragHold::new(4, 100);
        let mut out = VecDeque::new();
        h.release(&frag(1, 5000, 0), &mut out);
        assert!(out.is_empty(), "nothing held");
        assert!(h.hold(&later(1), false, "1a", 0).is_ok());
        assert!(h.hold(&later(2), true, "2a", 10).is_ok());
        assert!(h.hold(&later(1), false, "1b", 20).is_ok());
        assert!(h.hold(&later(3), false, "3a", 30).is_ok());
        assert_eq!(h.hold(&later(4), false, "4a", 40), Err("4a"), "full");
        // Another port's datagram of the same addresses and id is another.
        let elsewhere = Parsed {
            in_port: 3,
            ..frag(1, 5000, 0)
        };
        h.release(&elsewhere, &mut out);
        assert!(out.is_empty(), "{out:?}");
        h.release(&frag(1, 5000, 0), &mut out);
        assert_eq!(out, [(0, false, "1a"), (0, false, "1b")]);
        assert_eq!(h.len(), 2);
        assert_eq!(h.pop_expired(109), None, "2a waits until 110");
        assert_eq!(h.pop_expired(110), Some("2a"));
        assert_eq!(h.pop_expired(110), None, "3a waits until 130");
        out.clear();
        h.release(&frag(3, 1, 0), &mut out);
        assert_eq!(out, [(0, false, "3a")]);
        assert!(h.is_empty());
        assert_eq!(
            h.stats(),
            HoldStats {
                held: 4,
                released: 3,
                expired: 1,
                refused: 1,
            }
        );
        // A hold of no room holds nothing.
        let mut none: FragHold<u8> = FragHold::new(0, 100);
        assert_eq!(none.hold(&later(1), false, 7, 0), Err(7));
    }

    /// A successor's table finds the first fragments its predecessor's
    /// remembered, for the time they had left; expired ones are not sent.
    #[test]
    fn remembered_datagrams_go_to_a_successor_with_their_time_left() {
        let mut t = FragTable::new(4, 100);
        t.note(&frag(1, 5001, 0), 0);
        t.note(&frag(2, 5002, 0), 60);
        let recs = t.export(120);
        assert_eq!(recs.len(), 1, "the first expired at 100: {recs:?}");
        assert_eq!((recs[0].id, recs[0].left_ns), (2, 40));
        let recs = t.export(50);
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].id, recs[0].left_ns), (1, 50));
        assert_eq!((recs[1].id, recs[1].src_port), (2, 5002));
        let json = serde_json::to_string(&recs).unwrap();
        let back: Vec<FragRecord> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, recs);
        // The successor's clock reads 1 000 at that moment.
        let mut next = FragTable::new(1, 100);
        assert_eq!(next.restore(&back, 1_000), 1, "capacity keeps the newest");
        assert_eq!(
            next.find(&frag(2, 0, 185), 1_050).map(|k| k.src_port),
            Some(5002)
        );
        assert_eq!(next.find(&frag(1, 0, 185), 1_050), None);
        let mut next = FragTable::new(4, 100);
        assert_eq!(next.restore(&back, 1_000), 2);
        assert_eq!(
            next.find(&frag(1, 0, 185), 1_049).map(|k| k.src_port),
            Some(5001)
        );
        assert_eq!(next.find(&frag(1, 0, 185), 1_051), None, "its time ran out");
        next.note(&frag(3, 5003, 0), 1_200);
        assert_eq!(next.len(), 1, "restored entries expire in order");
    }

    #[test]
    fn at_capacity_the_oldest_makes_room() {
        let mut t = FragTable::new(3, 1_000);
        for id in 0..5 {
            t.note(&frag(id, 5000 + id as u16, 0), u64::from(id));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.stats().evicted, 2);
        assert_eq!(t.find(&frag(0, 0, 1), 10), None);
        assert_eq!(t.find(&frag(4, 0, 1), 10).map(|k| k.src_port), Some(5004));
        // Noting the same datagram again keeps its first entry: a forged
        // first fragment cannot redirect the later ones.
        t.note(&frag(4, 9999, 0), 11);
        assert_eq!(t.len(), 3);
        assert_eq!(t.find(&frag(4, 0, 1), 12).map(|k| k.src_port), Some(5004));
        // However often a datagram is noted, the table keeps its capacity.
        for _ in 0..100 {
            t.note(&frag(4, 5004, 0), 13);
        }
        for id in 10..13 {
            t.note(&frag(id, 6000 + id as u16, 0), 14);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.order.len(), 3);
    }

    /// A first fragment whose datagram has nothing held does not walk the
    /// hold: beside a full hold of other datagrams' fragments, about one
    /// in [`TAGS_PER_PLACE`] shares a count with a held one and walks.
    #[test]
    fn a_first_fragment_with_nothing_held_does_not_walk_the_hold() {
        let mut h: FragHold<u32> = FragHold::new(256, 100);
        for id in 0..256 {
            assert!(h.hold(&later(id), false, id, 0).is_ok());
        }
        let mut out = VecDeque::new();
        for id in 1000..2000 {
            h.release(&frag(id, 1, 0), &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(h.len(), 256, "nothing of theirs was held");
        // (Expected about 1000 / 16; 200 is far out of the binomial's reach.)
        assert!(h.walks < 200, "{} walks for 1000 first fragments", h.walks);
        // The held ones still follow their first, each counted out once.
        h.release(&frag(7, 1, 0), &mut out);
        assert_eq!(out, [(0, false, 7)]);
        assert_eq!(h.tags.iter().map(|&n| u64::from(n)).sum::<u64>(), 255);
    }

    /// One step of a hold's life in the property test below.
    #[derive(Debug, Clone)]
    enum HoldOp {
        /// A later fragment of a datagram (its id), this long (ns) after
        /// the step before.
        Hold(u32, u64),
        /// The first fragment of a datagram (its id).
        Release(u32),
        /// The expired ones dropped, this long after the step before.
        Expire(u64),
    }

    use proptest::prelude::*;

    proptest! {
        /// The hold hands back and drops what a plain walk of its queue
        /// would (the counts only ever spare a walk that finds nothing),
        /// and each count is of the held fragments of its tag. Two counts
        /// only, so that datagrams share them.
        #[test]
        fn the_hold_does_what_a_walk_of_its_queue_does(
            ops in proptest::collection::vec(
                prop_oneof![
                    (0u32..6, 0u64..300).prop_map(|(i, t)| HoldOp::Hold(i, t)),
                    (0u32..8).prop_map(HoldOp::Release),
                    (0u64..400).prop_map(HoldOp::Expire),
                ],
                0..60,
            )
        ) {
            let mut h: FragHold<usize> = FragHold::new(5, 100);
            h.tags = vec![0; 2];
            // The reference: (datagram, until, packet), oldest first.
            let mut model: VecDeque<(u32, u64, usize)> = VecDeque::new();
            let mut clock = 0;
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    HoldOp::Hold(id, dt) => {
                        clock += dt;
                        let got = h.hold(&later(id), false, n, clock);
                        if model.len() < 5 {
                            prop_assert!(got.is_ok());
                            model.push_back((id, clock + 100, n));
                        } else {
                            prop_assert_eq!(got, Err(n));
                        }
                    }
                    HoldOp::Release(id) => {
                        let mut out = VecDeque::new();
                        h.release(&frag(id, 1, 0), &mut out);
                        let want: Vec<usize> =
                            model.iter().filter(|m| m.0 == id).map(|m| m.2).collect();
                        model.retain(|m| m.0 != id);
                        let got: Vec<usize> = out.into_iter().map(|o| o.2).collect();
                        prop_assert_eq!(got, want);
                    }
                    HoldOp::Expire(dt) => {
                        clock += dt;
                        loop {
                            let want = match model.front() {
                                Some(m) if m.1 <= clock => model.pop_front().map(|m| m.2),
                                _ => None,
                            };
                            prop_assert_eq!(h.pop_expired(clock), want);
                            if want.is_none() {
                                break;
                            }
                        }
                    }
                }
                prop_assert_eq!(h.len(), model.len());
                for (t, &c) in h.tags.iter().enumerate() {
                    let want = model
                        .iter()
                        .filter(|m| h.tag(&FragKey::of(&later(m.0))) == t)
                        .count();
                    prop_assert_eq!(c as usize, want, "count {}", t);
                }
            }
        }
    }
}
