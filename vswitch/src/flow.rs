//! The unified flow table (UFT): a per-core exact-match cache from a packet's
//! flow key (in-port + 5-tuple) to the one compiled action the slow path
//! decided for it.

use dataplane::{FlowKey, MacAddr};
use lb::conntrack::Dir;
use lb::nat::Rewrite;
use std::collections::HashMap;
use std::hash::Hasher;

/// FxHash (as in rustc) with a MurmurHash3 finaliser. FxHash's multiply only
/// carries bits upwards, and the varying bytes of an IPv4-mapped address sit
/// in the high bits of their word; later rounds rotate them down, and the
/// finaliser makes sure every input bit reaches the low bits hashbrown uses
/// as the bucket index, whatever the key layout. std's SipHash costs more
/// than the rest of a hit.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(SEED);
    }
}

/// Builds [`FxHasher`]s that start from a per-table random seed. Flow keys
/// come from packets, so an attacker who knew the hash could aim many flows
/// at one bucket; with a secret starting state the bucket a key lands in
/// cannot be predicted (the finaliser spreads every state bit into the low
/// bits), at no cost per packet.
#[derive(Clone, Copy, Debug)]
pub struct SeededFx(u64);

impl SeededFx {
    /// A builder with a seed from the process's random source.
    pub fn random() -> Self {
        use std::hash::BuildHasher;
        SeededFx(std::collections::hash_map::RandomState::new().hash_one(0x706f_6c6c_7578u64))
    }
}

impl std::hash::BuildHasher for SeededFx {
    type Hasher = FxHasher;
    #[inline]
    fn build_hasher(&self) -> FxHasher {
        FxHasher(self.0)
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z ^= z >> 33;
        z = z.wrapping_mul(0xff51_afd7_ed55_8ccd);
        z ^= z >> 33;
        z = z.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        z ^ (z >> 33)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

/// What to do with a packet of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowAction {
    /// Output port.
    pub out_port: u16,
    /// New source MAC (the vnet's gateway MAC).
    pub src_mac: MacAddr,
    /// New destination MAC (the destination VM's).
    pub dst_mac: MacAddr,
    /// Address/port rewrite (NAT), if any.
    pub nat: Rewrite,
    /// The load-balancer connection this flow belongs to: (vnet, slot, direction).
    pub lb: Option<(usize, u32, Dir)>,
    /// The NAT and TTL rewrite compiled for this flow's key, with its
    /// checksum deltas (IPv4 TCP/UDP); `None` applies `nat` field by field.
    pub fast: Option<dataplane::rewrite::Transpose4>,
}

impl FlowAction {
    /// The Ethernet destination and source this action writes, as the first
    /// 12 bytes of the frame.
    #[inline]
    pub fn macs(&self) -> [u8; 12] {
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(&self.dst_mac.0);
        m[6..].copy_from_slice(&self.src_mac.0);
        m
    }

    /// To VM `vm`, from the vnet's gateway MAC `gateway`.
    pub fn to_vm(
        vm: &crate::policy::Vm,
        gateway: MacAddr,
        nat: Rewrite,
        lb: Option<(usize, u32, Dir)>,
    ) -> FlowAction {
        FlowAction {
            out_port: vm.port,
            src_mac: gateway,
            dst_mac: vm.mac,
            nat,
            lb,
            fast: None,
        }
    }

    /// Out of the uplink to the next hop.
    pub fn to_uplink(
        up: &crate::policy::UplinkDef,
        nat: Rewrite,
        lb: Option<(usize, u32, Dir)>,
    ) -> FlowAction {
        FlowAction {
            out_port: up.port,
            src_mac: up.mac,
            dst_mac: up.next_hop_mac,
            nat,
            lb,
            fast: None,
        }
    }

    /// This action with its rewrite compiled for packets of `key`.
    pub fn compiled_for(self, key: &dataplane::FlowKey) -> FlowAction {
        let v4 = |f: Option<(std::net::IpAddr, u16)>| match f {
            None => Some(None),
            Some((std::net::IpAddr::V4(a), port)) => Some(Some((a, port))),
            Some(_) => None,
        };
        let fast = match (v4(self.nat.src), v4(self.nat.dst)) {
            (Some(src), Some(dst)) => dataplane::rewrite::Transpose4::compile(key, src, dst),
            _ => None,
        };
        FlowAction { fast, ..self }
    }
}

/// A cached flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEntry {
    /// The action.
    pub action: FlowAction,
    /// Policy generation it was decided under; revalidated when it changes.
    pub generation: u64,
    /// Last packet (ns).
    pub last_seen: u64,
    /// When the load balancer's connection was last told of a packet (ns).
    pub lb_touched: u64,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// FIN or RST seen: expires after the short timeout.
    pub closing: bool,
}

/// What [`FlowTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// A new flow.
    New,
    /// The flow's entry was replaced (counts kept).
    Replaced,
    /// The table is full: nothing installed.
    Full,
}

/// Flow table counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// New entries installed (replacements of a flow's entry not counted).
    pub installed: u64,
    /// Installs refused because the table was full.
    pub full: u64,
    /// Entries removed for idleness or after close.
    pub expired: u64,
}

/// A bounded per-core flow table.
#[derive(Debug)]
pub struct FlowTable {
    map: HashMap<FlowKey, FlowEntry, SeededFx>,
    capacity: usize,
    idle_ns: u64,
    closing_ns: u64,
    stats: FlowStats,
}

impl FlowTable {
    /// A table of at most `capacity` entries; entries idle for `idle_ns`
    /// (or `closing_ns` after FIN/RST) expire.
    pub fn new(capacity: usize, idle_ns: u64, closing_ns: u64) -> Self {
        let mut map = HashMap::with_hasher(SeededFx::random());
        map.reserve(capacity.min(1 << 22));
        FlowTable {
            map,
            capacity: capacity.max(1),
            idle_ns,
            closing_ns,
            stats: FlowStats::default(),
        }
    }

    /// The entry of `key`.
    #[inline]
    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut FlowEntry> {
        self.map.get_mut(key)
    }

    /// Installs an entry, or replaces the entry of `key` (a flow decided
    /// again under a new policy generation), which keeps its packet and
    /// byte counts; `Full` when the table is full.
    pub fn insert(&mut self, key: FlowKey, mut e: FlowEntry) -> Insert {
        match self.map.get(&key) {
            Some(old) => {
                e.packets += old.packets;
                e.bytes += old.bytes;
                self.map.insert(key, e);
                Insert::Replaced
            }
            None if self.map.len() >= self.capacity => {
                self.stats.full += 1;
                Insert::Full
            }
            None => {
                self.stats.installed += 1;
                self.map.insert(key, e);
                Insert::New
            }
        }
    }

    /// Removes an entry.
    pub fn remove(&mut self, key: &FlowKey) -> Option<FlowEntry> {
        self.map.remove(key)
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    /// Removes every expired entry (a full pass: call it every few hundred
    /// milliseconds from the worker, not per burst).
    pub fn expire(&mut self, now: u64) -> usize {
        let (idle, closing) = (self.idle_ns, self.closing_ns);
        let before = self.map.len();
        self.map.retain(|_, e| {
            let limit = if e.closing { closing } else { idle };
            now.saturating_sub(e.last_seen) <= limit
        });
        let n = before - self.map.len();
        self.stats.expired += n as u64;
        n
    }

    /// Iterates over entries.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &FlowEntry)> {
        self.map.iter()
    }

    /// Removes every entry `keep` returns false for; returns how many.
    pub fn remove_where(&mut self, mut remove: impl FnMut(&FlowKey, &FlowEntry) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|k, e| !remove(k, e));
        before - self.map.len()
    }
}

/// Which flows a control request is about; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Arriving on, or leaving by, this switch port (a VM's port).
    pub port: Option<u16>,
    /// Source address (IPv4-mapped for IPv4), before any rewrite.
    pub src: Option<[u8; 16]>,
    /// Destination address, before any rewrite.
    pub dst: Option<[u8; 16]>,
    /// IP protocol.
    pub proto: Option<u8>,
    /// Source port.
    pub src_port: Option<u16>,
    /// Destination port.
    pub dst_port: Option<u16>,
    /// A VIP (address, port, protocol): flows addressed to it, and the
    /// reverse flows whose rewrite restores it as the source.
    pub vip: Option<([u8; 16], u16, u8)>,
}

impl FlowFilter {
    /// True when the flow `k` with entry `e` matches.
    pub fn matches(&self, k: &FlowKey, e: &FlowEntry) -> bool {
        let to16 = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(a) => a.octets(),
        };
        fn opt<T: PartialEq>(want: Option<T>, got: T) -> bool {
            want.is_none_or(|w| w == got)
        }
        opt(self.src, k.src_ip)
            && opt(self.dst, k.dst_ip)
            && opt(self.proto, k.proto)
            && opt(self.src_port, k.src_port)
            && opt(self.dst_port, k.dst_port)
            && self
                .port
                .is_none_or(|p| k.in_port == p || e.action.out_port == p)
            && self.vip.is_none_or(|(a, port, proto)| {
                k.proto == proto
                    && ((k.dst_ip == a && k.dst_port == port)
                        || e.action
                            .nat
                            .src
                            .is_some_and(|(ip, sp)| to16(ip) == a && sp == port))
            })
    }
}

/// One flow as the control API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInfo {
    /// The worker whose table holds it.
    pub worker: usize,
    /// Its key (as received).
    pub key: FlowKey,
    /// Its cached entry.
    pub entry: FlowEntry,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u16) -> FlowKey {
        FlowKey {
            src_port: p,
            proto: 17,
            ..FlowKey::default()
        }
    }

    fn entry(now: u64) -> FlowEntry {
        FlowEntry {
            action: FlowAction {
                out_port: 1,
                src_mac: MacAddr::ZERO,
                dst_mac: MacAddr::ZERO,
                nat: Rewrite::NONE,
                lb: None,
                fast: None,
            },
            generation: 1,
            last_seen: now,
            lb_touched: now,
            packets: 0,
            bytes: 0,
            closing: false,
        }
    }

    #[test]
    fn bounded_and_expiring() {
        let mut t = FlowTable::new(2, 100, 10);
        assert_eq!(t.insert(key(1), entry(0)), Insert::New);
        assert_eq!(t.insert(key(2), entry(0)), Insert::New);
        assert_eq!(t.insert(key(3), entry(0)), Insert::Full);
        assert_eq!(t.stats().full, 1);
        // Replacing an existing key is allowed when full, and keeps its counts.
        t.get_mut(&key(2)).unwrap().packets = 7;
        assert_eq!(t.insert(key(2), entry(50)), Insert::Replaced);
        assert_eq!(t.get_mut(&key(2)).unwrap().packets, 7);
        assert_eq!(t.stats().installed, 2);
        t.get_mut(&key(2)).unwrap().closing = true;
        // At 70: key 2 (closing, last seen 50) is past 10; key 1 within 100.
        assert_eq!(t.expire(70), 1);
        assert!(t.get_mut(&key(1)).is_some());
        assert_eq!(t.expire(101), 1);
        assert!(t.is_empty());
        assert_eq!(t.stats().expired, 2);
    }

    #[test]
    fn hasher_spreads_keys_over_buckets() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<FxHasher>::default();
        // Keys that differ only in the last byte of an IPv4-mapped source
        // address (the high bits of a hashed word) land in different buckets
        // (low bits).
        let mut buckets = std::collections::HashSet::new();
        for i in 0..=255u8 {
            let mut k = key(1);
            k.src_ip = std::net::Ipv4Addr::new(10, 1, 1, i)
                .to_ipv6_mapped()
                .octets();
            buckets.insert(b.hash_one(k) & 1023);
        }
        assert!(
            buckets.len() > 200,
            "{} of 256 keys in distinct buckets",
            buckets.len()
        );
    }

    #[test]
    fn tables_hash_from_their_own_random_seed() {
        use std::hash::BuildHasher;
        let (a, b) = (SeededFx::random(), SeededFx::random());
        let k = FlowKey::default();
        // Two tables place the same key differently (a 2^-64 chance not).
        assert_ne!(a.hash_one(k), b.hash_one(k));
        assert_eq!(a.hash_one(k), a.hash_one(k));
    }
}
