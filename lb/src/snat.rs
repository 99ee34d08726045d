//! SNAT for outbound connections, in Azure's manner, behaving as RFC 4787
//! (UDP), RFC 5382 (TCP), RFC 5508 (ICMP) and RFC 6056 (port selection)
//! ask of a NAT: the ports of each public address are cut into blocks,
//! and every member VM is given its blocks up front. A VM's connections
//! take ports only from its own blocks, so members never contend and
//! exhaustion is per VM.
//!
//! **Mapping** ([`Mapping`]): endpoint-independent by default: a private
//! address and port (and protocol) has one public address and port,
//! whatever the destination, for as long as any connection uses it (the
//! connections' idle timeouts are the mapping's timers). The private port
//! itself is kept when it lies free in one of the VM's blocks; otherwise a
//! port is drawn at random from the VM's blocks (RFC 6056's first
//! algorithm: a random start, then the next free one). With
//! `AddressAndPortDependent` mapping, each connection takes a port of its
//! own, TCP reusing a port towards different destinations (more TCP
//! connections per VM, at the cost of "symmetric NAT" behaviour).
//!
//! **Filtering** ([`Filtering`], endpoint-independent mapping only): what
//! may come in from the wire to a mapping that no connection expects:
//! anything (`EndpointIndependent`), anything from an address the mapping
//! has a connection with (`AddressDependent`), or nothing
//! (`AddressAndPortDependent`, the default: only the replies of the
//! connections themselves). [`SnatAllocator::inbound`] decides.
//!
//! A port returns when the last connection on it closes or times out
//! ([`SnatAllocator::release`]).

use std::collections::HashMap;
use std::net::IpAddr;

/// How outbound connections of one private endpoint are mapped (RFC 4787
/// section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mapping {
    /// One public address and port per private address and port.
    #[default]
    EndpointIndependent,
    /// A public port per connection (TCP reusing ports towards different
    /// destinations).
    AddressAndPortDependent,
}

/// What may enter through a mapping from the wire unasked (RFC 4787
/// section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filtering {
    /// From any address and port.
    EndpointIndependent,
    /// From any port of an address the mapping has a connection with.
    AddressDependent,
    /// Only replies of the mapping's connections.
    #[default]
    AddressAndPortDependent,
}

const SEC: u64 = 1_000_000_000;

/// Idle timeouts of SNAT connections, in nanoseconds: what keeps a
/// mapping alive (a mapping lives while a connection uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatTimeouts {
    /// UDP (RFC 4787 REQ-5: at least 2 minutes, 5 recommended).
    pub udp: u64,
    /// Established TCP (RFC 5382 REQ-5: at least 2 hours 4 minutes).
    pub tcp_established: u64,
    /// TCP opening or closing (RFC 5382 REQ-5: at least 4 minutes).
    pub tcp_transitory: u64,
    /// ICMP queries (RFC 5508 REQ-1: at least 60 seconds).
    pub icmp: u64,
}

impl Default for SnatTimeouts {
    fn default() -> Self {
        SnatTimeouts {
            udp: 300 * SEC,
            tcp_established: 7440 * SEC,
            tcp_transitory: 240 * SEC,
            icmp: 60 * SEC,
        }
    }
}

impl SnatTimeouts {
    /// The connection tracker's timeouts for SNAT connections: these, with
    /// `base`'s for a connection that has ended (both FINs or an RST).
    pub fn conn_timeouts(&self, base: &crate::conntrack::Timeouts) -> crate::conntrack::Timeouts {
        crate::conntrack::Timeouts {
            tcp_handshake: self.tcp_transitory,
            tcp_established: self.tcp_established,
            tcp_fin: self.tcp_transitory,
            tcp_time_wait: base.tcp_time_wait,
            tcp_closed: base.tcp_closed,
            udp_unreplied: self.udp,
            udp_replied: self.udp,
            other: self.icmp,
        }
    }
}

/// How SNAT ports are laid out and how they behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatConfig {
    /// Public addresses outbound connections leave from.
    pub public_ips: Vec<IpAddr>,
    /// First port handed out (inclusive).
    pub port_lo: u16,
    /// Last port handed out (inclusive).
    pub port_hi: u16,
    /// Ports per block.
    pub block_size: u16,
    /// Blocks given to each member VM.
    pub blocks_per_member: usize,
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour (of endpoint-independent mappings).
    pub filtering: Filtering,
    /// Idle timeouts of SNAT connections.
    pub timeouts: SnatTimeouts,
}

impl Default for SnatConfig {
    fn default() -> Self {
        SnatConfig {
            public_ips: Vec::new(),
            port_lo: 1024,
            port_hi: 65535,
            block_size: 64,
            blocks_per_member: 16,
            mapping: Mapping::default(),
            filtering: Filtering::default(),
            timeouts: SnatTimeouts::default(),
        }
    }
}

/// Why a port could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnatError {
    /// The configuration is inconsistent.
    #[error("snat: {0}")]
    BadConfig(String),
    /// Not enough free blocks to give a new member its share.
    #[error("snat: no free port blocks left for member {member}")]
    NoBlocks {
        /// The member VM.
        member: IpAddr,
    },
    /// The address is not a member.
    #[error("snat: {0} is not a member of the outbound pool")]
    NotMember(IpAddr),
    /// Every port of the member's blocks is in use (for this destination).
    #[error("snat: ports of member {member} exhausted")]
    Exhausted {
        /// The member VM.
        member: IpAddr,
    },
    /// Nothing is mapped to this public address and port.
    #[error("snat: no mapping holds {public} port {port}")]
    NoMapping {
        /// The public address.
        public: IpAddr,
        /// The public port.
        port: u16,
    },
    /// The mapping's filtering refuses a packet from this remote address.
    #[error("snat: the mapping of {public} port {port} does not accept {remote}")]
    Filtered {
        /// The public address.
        public: IpAddr,
        /// The public port.
        port: u16,
        /// The sender.
        remote: IpAddr,
    },
}

/// A block: a public address (index) and its first port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Block {
    ip: u16,
    start: u16,
}

/// A public port in use: by whom (an endpoint-independent mapping's
/// private address and port), and by how many connections.
#[derive(Debug, Clone, Copy)]
struct Use {
    private: Option<(IpAddr, u16)>,
    conns: u32,
}

/// (public address index, public port, protocol).
type PublicKey = (u16, u16, u8);

/// Per-core SNAT state.
#[derive(Debug)]
pub struct SnatAllocator {
    cfg: SnatConfig,
    free_blocks: Vec<Block>,
    members: HashMap<IpAddr, Member>,
    /// Public ports in use, per (public address index, port, protocol).
    in_use: HashMap<PublicKey, Use>,
    /// Endpoint-independent mappings: (private address, private port,
    /// protocol) to (public address index, public port).
    maps: HashMap<(IpAddr, u16, u8), (u16, u16)>,
    /// Connections per mapping and remote address (address-dependent
    /// filtering).
    contacts: HashMap<(PublicKey, IpAddr), u32>,
    /// RFC 6056's random port selection.
    rng: fastrand::Rng,
    exhausted: u64,
}

#[derive(Debug)]
struct Member {
    blocks: Vec<Block>,
}

impl SnatConfig {
    /// The index of the block holding `port` (counted from `port_lo`, the
    /// same for every public address), if the port is in the range.
    pub fn block_of(&self, port: u16) -> Option<usize> {
        if port < self.port_lo || port > self.port_hi || self.block_size == 0 {
            return None;
        }
        Some(usize::from(port - self.port_lo) / usize::from(self.block_size))
    }

    /// The worker (of `workers`) whose allocator hands out `port`: blocks
    /// are dealt round robin, so replies to a SNAT port find the worker
    /// that tracks the connection. `None` outside the range.
    pub fn worker_of(&self, port: u16, workers: usize) -> Option<usize> {
        self.block_of(port).map(|b| b % workers.max(1))
    }
}

impl SnatAllocator {
    /// Cuts the port ranges of every public address into blocks.
    pub fn new(cfg: SnatConfig) -> Result<Self, SnatError> {
        Self::for_worker(cfg, 0, 1)
    }

    /// The allocator of worker `worker` of `workers`: it owns only the
    /// blocks [`SnatConfig::worker_of`] assigns to it, so workers never
    /// share a port and each VM gets its `blocks_per_member` on every worker.
    pub fn for_worker(cfg: SnatConfig, worker: usize, workers: usize) -> Result<Self, SnatError> {
        if cfg.public_ips.is_empty() {
            return Err(SnatError::BadConfig("no public address".into()));
        }
        if cfg.block_size == 0 || cfg.port_lo > cfg.port_hi || cfg.blocks_per_member == 0 {
            return Err(SnatError::BadConfig(format!(
                "ports {}-{} in blocks of {} ({} per member) is not a usable layout",
                cfg.port_lo, cfg.port_hi, cfg.block_size, cfg.blocks_per_member
            )));
        }
        if cfg.public_ips.len() > usize::from(u16::MAX) {
            return Err(SnatError::BadConfig(format!(
                "{} public addresses are more than {}",
                cfg.public_ips.len(),
                u16::MAX
            )));
        }
        if worker >= workers {
            return Err(SnatError::BadConfig(format!(
                "worker {worker} of {workers} does not exist"
            )));
        }
        let mut free_blocks = Vec::new();
        for ip in 0..cfg.public_ips.len() as u16 {
            let mut start = u32::from(cfg.port_lo);
            while start + u32::from(cfg.block_size) - 1 <= u32::from(cfg.port_hi) {
                if cfg.worker_of(start as u16, workers) == Some(worker) {
                    free_blocks.push(Block {
                        ip,
                        start: start as u16,
                    });
                }
                start += u32::from(cfg.block_size);
            }
        }
        // Hand out low ports first.
        free_blocks.reverse();
        Ok(SnatAllocator {
            cfg,
            free_blocks,
            members: HashMap::new(),
            in_use: HashMap::new(),
            maps: HashMap::new(),
            contacts: HashMap::new(),
            rng: fastrand::Rng::new(),
            exhausted: 0,
        })
    }

    /// This allocator drawing its random ports from `seed` (tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SnatConfig {
        &self.cfg
    }

    /// Gives `member` its blocks (idempotent): all of one public address
    /// when one has enough free (RFC 4787 REQ-2, "paired" pooling: a VM
    /// appears from one address), the lowest ports first.
    pub fn add_member(&mut self, member: IpAddr) -> Result<(), SnatError> {
        if self.members.contains_key(&member) {
            return Ok(());
        }
        let want = self.cfg.blocks_per_member;
        if self.free_blocks.len() < want {
            return Err(SnatError::NoBlocks { member });
        }
        // (The free list is kept with the lowest blocks of the first
        // address at its end.)
        let ips = self.cfg.public_ips.len() as u16;
        let paired =
            (0..ips).find(|&ip| self.free_blocks.iter().filter(|b| b.ip == ip).count() >= want);
        let blocks = match paired {
            Some(ip) => {
                let mut taken = Vec::with_capacity(want);
                let mut i = self.free_blocks.len();
                while taken.len() < want && i > 0 {
                    i -= 1;
                    if self.free_blocks[i].ip == ip {
                        taken.push(self.free_blocks.remove(i));
                    }
                }
                taken
            }
            None => {
                let at = self.free_blocks.len() - want;
                self.free_blocks.split_off(at)
            }
        };
        self.members.insert(member, Member { blocks });
        Ok(())
    }

    /// Takes the member's blocks back (its connections must be gone).
    pub fn remove_member(&mut self, member: IpAddr) {
        if let Some(m) = self.members.remove(&member) {
            self.free_blocks.extend(m.blocks);
        }
    }

    /// Ports a member can use.
    pub fn member_ports(&self, member: IpAddr) -> usize {
        self.members
            .get(&member)
            .map_or(0, |m| m.blocks.len() * usize::from(self.cfg.block_size))
    }

    /// How many allocations failed for exhaustion.
    pub fn exhausted(&self) -> u64 {
        self.exhausted
    }

    /// Public ports in use (each protocol's counted apart).
    pub fn ports_in_use(&self) -> usize {
        self.in_use.len()
    }

    /// The index of public address `ip`, if it is one of ours.
    fn ip_index(&self, ip: IpAddr) -> Option<u16> {
        self.cfg
            .public_ips
            .iter()
            .position(|&p| p == ip)
            .map(|i| i as u16)
    }

    /// True when `ip` is one of the public addresses.
    pub fn is_public(&self, ip: IpAddr) -> bool {
        self.ip_index(ip).is_some()
    }

    /// Counts one more connection on public key `k` with `remote`.
    fn hold(&mut self, k: PublicKey, private: Option<(IpAddr, u16)>, remote: IpAddr) {
        self.in_use
            .entry(k)
            .or_insert(Use { private, conns: 0 })
            .conns += 1;
        if self.cfg.filtering == Filtering::AddressDependent && private.is_some() {
            *self.contacts.entry((k, remote)).or_insert(0) += 1;
        }
    }

    /// Chooses a public address and port for a connection of `member`
    /// from private port `sport` to `remote`, with protocol `proto` (ICMP
    /// queries: `sport` is the echo identifier).
    ///
    /// Endpoint-independent mapping: the mapping of (`member`, `sport`,
    /// `proto`) if there is one; else the private port if it is free in
    /// the member's blocks; else a random free port of its blocks.
    /// Address-and-port-dependent: a random free port; for TCP,
    /// `taken(public, port)` must say whether that public address and
    /// port are already used *towards this connection's destination* (the
    /// caller asks its connection table for the reply key), and a port
    /// serves many destinations.
    pub fn allocate(
        &mut self,
        member: IpAddr,
        sport: u16,
        proto: u8,
        remote: IpAddr,
        mut taken: impl FnMut(IpAddr, u16) -> bool,
    ) -> Result<(IpAddr, u16), SnatError> {
        let eim = self.cfg.mapping == Mapping::EndpointIndependent;
        if eim && let Some(&(ip, port)) = self.maps.get(&(member, sport, proto)) {
            self.hold((ip, port, proto), Some((member, sport)), remote);
            return Ok((self.cfg.public_ips[usize::from(ip)], port));
        }
        let m = self
            .members
            .get(&member)
            .ok_or(SnatError::NotMember(member))?;
        let bs = usize::from(self.cfg.block_size);
        let total = m.blocks.len() * bs;
        let in_use = &self.in_use;
        let ips = &self.cfg.public_ips;
        let free = |b: Block, port: u16, taken: &mut dyn FnMut(IpAddr, u16) -> bool| {
            if !eim && proto == 6 {
                // (Endpoint-independent mappings hold their ports alone.)
                in_use
                    .get(&(b.ip, port, proto))
                    .is_none_or(|u| u.private.is_none())
                    && !taken(ips[usize::from(b.ip)], port)
            } else {
                !in_use.contains_key(&(b.ip, port, proto))
            }
        };
        // The private port, if one of the member's blocks holds it free.
        let kept = m
            .blocks
            .iter()
            .filter(|b| eim && sport >= b.start && usize::from(sport - b.start) < bs)
            .find(|b| free(**b, sport, &mut taken))
            .map(|b| (*b, sport));
        let found = kept.or_else(|| {
            if total == 0 {
                return None;
            }
            let start = self.rng.usize(0..total);
            (0..total).find_map(|step| {
                let n = (start + step) % total;
                let b = m.blocks[n / bs];
                let port = b.start + (n % bs) as u16;
                free(b, port, &mut taken).then_some((b, port))
            })
        });
        let Some((b, port)) = found else {
            self.exhausted += 1;
            return Err(SnatError::Exhausted { member });
        };
        let private = eim.then_some((member, sport));
        if eim {
            self.maps.insert((member, sport, proto), (b.ip, port));
        }
        self.hold((b.ip, port, proto), private, remote);
        Ok((self.cfg.public_ips[usize::from(b.ip)], port))
    }

    /// The private address and port a packet from `remote` to `public`
    /// port `port` (`proto`) that no connection expects may enter to, as
    /// the filtering says; counted as a connection of the mapping, which
    /// the caller [`SnatAllocator::release`]s when it ends.
    pub fn inbound(
        &mut self,
        public: IpAddr,
        port: u16,
        proto: u8,
        remote: IpAddr,
    ) -> Result<(IpAddr, u16), SnatError> {
        let no_mapping = SnatError::NoMapping { public, port };
        let ip = self.ip_index(public).ok_or(no_mapping.clone())?;
        let k = (ip, port, proto);
        let private = self
            .in_use
            .get(&k)
            .and_then(|u| u.private)
            .ok_or(no_mapping)?;
        let allowed = match self.cfg.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => self.contacts.get(&(k, remote)).is_some_and(|&n| n > 0),
            Filtering::AddressAndPortDependent => false,
        };
        if !allowed {
            return Err(SnatError::Filtered {
                public,
                port,
                remote,
            });
        }
        self.hold(k, Some(private), remote);
        Ok(private)
    }

    /// Returns a connection's hold on `public` port `port` (`proto`; its
    /// remote end `remote`): the port is free again, and its mapping gone,
    /// when it was the last.
    pub fn release(&mut self, public: IpAddr, port: u16, proto: u8, remote: IpAddr) {
        let Some(ip) = self.ip_index(public) else {
            return;
        };
        let k = (ip, port, proto);
        let Some(u) = self.in_use.get_mut(&k) else {
            return;
        };
        let private = u.private;
        u.conns = u.conns.saturating_sub(1);
        if u.conns == 0 {
            self.in_use.remove(&k);
            if let Some((a, p)) = private {
                self.maps.remove(&(a, p, proto));
            }
        }
        if private.is_some()
            && let Some(n) = self.contacts.get_mut(&(k, remote))
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.contacts.remove(&(k, remote));
            }
        }
    }

    /// Live connections on `(public, port)` for `proto`.
    pub fn users(&self, public: IpAddr, port: u16, proto: u8) -> u32 {
        let Some(ip) = self.ip_index(public) else {
            return 0;
        };
        self.in_use.get(&(ip, port, proto)).map_or(0, |u| u.conns)
    }

    /// Each member and its blocks as (public address index, first port).
    pub(crate) fn members_raw(&self) -> impl Iterator<Item = (IpAddr, Vec<(u16, u16)>)> + '_ {
        self.members
            .iter()
            .map(|(ip, m)| (*ip, m.blocks.iter().map(|b| (b.ip, b.start)).collect()))
    }

    /// Gives each member of `members` the blocks it had (in another
    /// process: a hitless upgrade), each given as its public address and
    /// first port, before any port is in use here; members not listed get
    /// blocks afresh afterwards (so a fresh member cannot hold a block a
    /// listed one needs). Refused whole, changing nothing, when a block is
    /// not a block of this allocator's layout and share, is given twice,
    /// or a member is listed twice.
    pub fn restore_blocks(
        &mut self,
        members: &[(IpAddr, Vec<std::net::SocketAddr>)],
        exhausted: u64,
    ) -> Result<(), SnatError> {
        let mut free = self.free_blocks.clone();
        for m in self.members.values() {
            free.extend(m.blocks.iter().copied());
        }
        let mut restored: HashMap<IpAddr, Member> = HashMap::new();
        for (member, blocks) in members {
            if restored.contains_key(member) {
                return Err(SnatError::BadConfig(format!(
                    "member {member} is listed twice"
                )));
            }
            let mut taken = Vec::with_capacity(blocks.len());
            for b in blocks {
                let block = self.ip_index(b.ip()).map(|ip| Block {
                    ip,
                    start: b.port(),
                });
                let Some(at) = block.and_then(|k| free.iter().position(|f| *f == k)) else {
                    return Err(SnatError::BadConfig(format!(
                        "member {member}: block {b} is not a free block of this layout"
                    )));
                };
                taken.push(free.swap_remove(at));
            }
            restored.insert(*member, Member { blocks: taken });
        }
        let others: Vec<IpAddr> = self
            .members
            .keys()
            .filter(|ip| !restored.contains_key(ip))
            .copied()
            .collect();
        // Lowest ports handed out first, as a fresh allocator does.
        free.sort_by_key(|b| std::cmp::Reverse((b.ip, b.start)));
        self.free_blocks = free;
        self.members = restored;
        for ip in others {
            // One left without blocks is refused per connection, as at
            // any time (`snat_not_member`).
            let _ = self.add_member(ip);
        }
        self.exhausted = exhausted;
        Ok(())
    }

    /// Holds `public` port `port` (`proto`) again for a connection saved
    /// elsewhere: with `private` its endpoint-independent mapping (for an
    /// outbound connection, its own endpoint), `remote` its far end.
    pub fn restore_hold(
        &mut self,
        public: IpAddr,
        port: u16,
        proto: u8,
        private: Option<(IpAddr, u16)>,
        remote: IpAddr,
    ) {
        let Some(ip) = self.ip_index(public) else {
            return;
        };
        let eim = self.cfg.mapping == Mapping::EndpointIndependent;
        let private = private.filter(|_| eim);
        if let Some((a, p)) = private {
            self.maps.insert((a, p, proto), (ip, port));
        }
        self.hold((ip, port, proto), private, remote);
    }

    /// The endpoint-independent mapping of (`private`, `port`, `proto`),
    /// if there is one.
    pub fn mapping_of(&self, private: IpAddr, port: u16, proto: u8) -> Option<(IpAddr, u16)> {
        let &(ip, p) = self.maps.get(&(private, port, proto))?;
        Some((*self.cfg.public_ips.get(usize::from(ip))?, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const R: &str = "198.51.100.1";

    #[test]
    fn workers_own_disjoint_blocks_and_worker_of_finds_them() {
        let cfg = SnatConfig {
            public_ips: vec![ip("203.0.113.1"), ip("203.0.113.2")],
            port_lo: 1024,
            port_hi: 1024 + 64 * 12 - 1,
            block_size: 64,
            blocks_per_member: 2,
            ..SnatConfig::default()
        };
        let mut seen = HashSet::new();
        for w in 0..3 {
            let mut a = SnatAllocator::for_worker(cfg.clone(), w, 3).unwrap();
            a.add_member(ip("10.1.0.4")).unwrap();
            for sport in 0..128 {
                let (public, port) = a
                    .allocate(ip("10.1.0.4"), 40000 + sport, 17, ip(R), |_, _| false)
                    .unwrap();
                assert_eq!(cfg.worker_of(port, 3), Some(w), "port {port}");
                assert!(
                    seen.insert((public, port)),
                    "{public}:{port} handed out twice"
                );
            }
        }
        assert_eq!(cfg.worker_of(1023, 3), None);
        assert_eq!(cfg.worker_of(1024 + 64 * 12, 3), None);
        assert!(SnatAllocator::for_worker(cfg, 3, 3).is_err());
    }

    fn alloc(blocks: usize, size: u16, mapping: Mapping, filtering: Filtering) -> SnatAllocator {
        SnatAllocator::new(SnatConfig {
            public_ips: vec![ip("192.0.2.10")],
            port_lo: 1024,
            port_hi: 1024 + 4 * size - 1,
            block_size: size,
            blocks_per_member: blocks,
            mapping,
            filtering,
            ..SnatConfig::default()
        })
        .unwrap()
        .with_seed(7)
    }

    #[test]
    fn members_get_disjoint_blocks() {
        let mut a = alloc(2, 4, Mapping::EndpointIndependent, Filtering::default());
        a.add_member(ip("10.1.0.4")).unwrap();
        a.add_member(ip("10.1.0.5")).unwrap();
        assert_eq!(
            a.add_member(ip("10.1.0.6")),
            Err(SnatError::NoBlocks {
                member: ip("10.1.0.6")
            })
        );
        let mut seen = HashSet::new();
        for vm in ["10.1.0.4", "10.1.0.5"] {
            for sport in 0..8 {
                let (_, p) = a
                    .allocate(ip(vm), 50000 + sport, 17, ip(R), |_, _| false)
                    .unwrap();
                assert!(seen.insert(p), "port {p} given twice");
            }
        }
        assert_eq!(seen.len(), 16);
        assert_eq!(
            a.allocate(ip("10.9.9.9"), 1, 6, ip(R), |_, _| false),
            Err(SnatError::NotMember(ip("10.9.9.9")))
        );
    }

    #[test]
    fn one_mapping_per_private_endpoint_whatever_the_destination() {
        let mut a = alloc(2, 64, Mapping::EndpointIndependent, Filtering::default());
        let vm = ip("10.1.0.4");
        a.add_member(vm).unwrap();
        for proto in [6, 17] {
            let first = a.allocate(vm, 40000, proto, ip(R), |_, _| false).unwrap();
            for r in ["198.51.100.2", "203.0.113.9"] {
                assert_eq!(
                    a.allocate(vm, 40000, proto, ip(r), |_, _| true).unwrap(),
                    first,
                    "proto {proto}: the same mapping towards {r}"
                );
            }
            assert_eq!(a.mapping_of(vm, 40000, proto), Some(first));
            assert_eq!(a.users(first.0, first.1, proto), 3);
            // Another private port: another public one.
            let other = a.allocate(vm, 40001, proto, ip(R), |_, _| false).unwrap();
            assert_ne!(other, first);
            // The mapping lives while a connection uses it.
            for r in [R, "198.51.100.2"] {
                a.release(first.0, first.1, proto, ip(r));
                assert_eq!(a.mapping_of(vm, 40000, proto), Some(first));
            }
            a.release(first.0, first.1, proto, ip("203.0.113.9"));
            assert_eq!(a.mapping_of(vm, 40000, proto), None);
            assert_eq!(a.users(first.0, first.1, proto), 0);
        }
    }

    #[test]
    fn the_private_port_is_kept_when_free_in_the_members_blocks() {
        let mut a = alloc(2, 64, Mapping::EndpointIndependent, Filtering::default());
        let (vm, other) = (ip("10.1.0.4"), ip("10.1.0.5"));
        a.add_member(vm).unwrap();
        a.add_member(other).unwrap();
        // The member's blocks are the lowest two: 1024-1151.
        assert_eq!(
            a.allocate(vm, 1100, 17, ip(R), |_, _| false).unwrap().1,
            1100
        );
        // Outside its blocks (another member's port, or out of range): drawn.
        let p = a.allocate(vm, 1200, 17, ip(R), |_, _| false).unwrap().1;
        assert!((1024..1152).contains(&p) && p != 1100, "{p}");
        // A port the member already maps: another is drawn.
        let (_, q) = a.allocate(vm, p, 17, ip(R), |_, _| false).unwrap();
        assert!(q != p && q != 1100);
    }

    #[test]
    fn ports_are_drawn_at_random_not_in_sequence() {
        let mut a = alloc(4, 64, Mapping::EndpointIndependent, Filtering::default());
        let vm = ip("10.1.0.4");
        a.add_member(vm).unwrap();
        let ports: Vec<u16> = (0..32)
            .map(|i| {
                a.allocate(vm, 50000 + i, 17, ip(R), |_, _| false)
                    .unwrap()
                    .1
            })
            .collect();
        let ascending = ports.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(ascending < 8, "{ports:?}");
        let distinct: HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), 32);
        // Two allocators with different seeds draw different sequences.
        let mut b = alloc(4, 64, Mapping::EndpointIndependent, Filtering::default()).with_seed(8);
        b.add_member(vm).unwrap();
        let other: Vec<u16> = (0..32)
            .map(|i| {
                b.allocate(vm, 50000 + i, 17, ip(R), |_, _| false)
                    .unwrap()
                    .1
            })
            .collect();
        assert_ne!(ports, other);
    }

    #[test]
    fn exhaustion_is_per_member_and_never_takes_a_port_in_use() {
        let mut a = alloc(1, 4, Mapping::EndpointIndependent, Filtering::default());
        let (vm, other) = (ip("10.1.0.4"), ip("10.1.0.5"));
        a.add_member(vm).unwrap();
        a.add_member(other).unwrap();
        let mut held = HashSet::new();
        for sport in 0..4 {
            held.insert(
                a.allocate(vm, 2000 + sport, 6, ip(R), |_, _| false)
                    .unwrap(),
            );
        }
        assert_eq!(held.len(), 4);
        assert_eq!(
            a.allocate(vm, 3000, 6, ip(R), |_, _| false),
            Err(SnatError::Exhausted { member: vm })
        );
        assert_eq!(a.exhausted(), 1);
        // The other member is unaffected.
        let (_, p) = a.allocate(other, 3000, 6, ip(R), |_, _| false).unwrap();
        assert!(!held.iter().any(|h| h.1 == p));
        // UDP ports are counted apart from TCP's.
        a.allocate(vm, 3000, 17, ip(R), |_, _| false).unwrap();
    }

    #[test]
    fn address_and_port_dependent_mapping_reuses_tcp_ports_across_destinations() {
        let mut a = alloc(1, 2, Mapping::AddressAndPortDependent, Filtering::default());
        a.add_member(ip("10.1.0.4")).unwrap();
        // Model the connection table: (port, destination) pairs in use.
        let mut conns: HashSet<(u16, &str)> = HashSet::new();
        for (i, dst) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
            .into_iter()
            .enumerate()
        {
            for j in 0..2 {
                let sport = 40000 + (i * 2 + j) as u16;
                let (_, p) = a
                    .allocate(ip("10.1.0.4"), sport, 6, ip(dst), |_, port| {
                        conns.contains(&(port, dst))
                    })
                    .unwrap();
                assert!(conns.insert((p, dst)));
            }
            // Both ports are now used towards dst: a third connection there fails.
            assert_eq!(
                a.allocate(ip("10.1.0.4"), 41000, 6, ip(dst), |_, port| conns
                    .contains(&(port, dst))),
                Err(SnatError::Exhausted {
                    member: ip("10.1.0.4")
                })
            );
        }
        // 6 TCP connections on 2 ports, and no mapping to enter by.
        assert_eq!(conns.len(), 6);
        assert_eq!(a.users(ip("192.0.2.10"), 1024, 6), 3);
        assert_eq!(a.mapping_of(ip("10.1.0.4"), 40000, 6), None);
        assert!(matches!(
            a.inbound(ip("192.0.2.10"), 1024, 6, ip(R)),
            Err(SnatError::NoMapping { .. })
        ));
        // UDP: one flow per port, whatever the destination.
        let (_, p1) = a
            .allocate(ip("10.1.0.4"), 1, 17, ip(R), |_, _| false)
            .unwrap();
        let (_, p2) = a
            .allocate(ip("10.1.0.4"), 1, 17, ip("198.51.100.2"), |_, _| false)
            .unwrap();
        assert_ne!(p1, p2);
        assert!(
            a.allocate(ip("10.1.0.4"), 1, 17, ip(R), |_, _| false)
                .is_err()
        );
        assert_eq!(a.exhausted(), 4);
        // Release one and it is reused.
        a.release(ip("192.0.2.10"), p1, 17, ip(R));
        assert_eq!(
            a.allocate(ip("10.1.0.4"), 1, 17, ip(R), |_, _| false)
                .unwrap()
                .1,
            p1
        );
    }

    #[test]
    fn filtering_decides_what_enters_through_a_mapping() {
        let vm = ip("10.1.0.4");
        let public = ip("192.0.2.10");
        let stranger = ip("203.0.113.50");
        for (filtering, from_contact, from_stranger) in [
            (Filtering::EndpointIndependent, true, true),
            (Filtering::AddressDependent, true, false),
            (Filtering::AddressAndPortDependent, false, false),
        ] {
            let mut a = alloc(1, 64, Mapping::EndpointIndependent, filtering);
            a.add_member(vm).unwrap();
            let (_, port) = a.allocate(vm, 5000, 17, ip(R), |_, _| false).unwrap();
            // Another port of the contacted address; an address never contacted.
            assert_eq!(
                a.inbound(public, port, 17, ip(R)).is_ok(),
                from_contact,
                "{filtering:?}"
            );
            assert_eq!(
                a.inbound(public, port, 17, stranger).is_ok(),
                from_stranger,
                "{filtering:?}"
            );
            // Nothing maps another port or protocol.
            assert_eq!(
                a.inbound(public, port, 6, ip(R)),
                Err(SnatError::NoMapping { public, port })
            );
            // What came in holds the mapping as a connection does.
            let held = 1 + u32::from(from_contact) + u32::from(from_stranger);
            assert_eq!(a.users(public, port, 17), held);
        }
        // Address-dependent: the contact ends with its last connection.
        let mut a = alloc(
            1,
            64,
            Mapping::EndpointIndependent,
            Filtering::AddressDependent,
        );
        a.add_member(vm).unwrap();
        let (_, port) = a.allocate(vm, 5000, 17, ip(R), |_, _| false).unwrap();
        a.allocate(vm, 5000, 17, stranger, |_, _| false).unwrap();
        a.release(public, port, 17, ip(R));
        assert!(matches!(
            a.inbound(public, port, 17, ip(R)),
            Err(SnatError::Filtered { .. })
        ));
        assert!(a.inbound(public, port, 17, stranger).is_ok());
    }

    #[test]
    fn a_member_leaves_from_one_public_address_when_one_has_room() {
        let mut a = SnatAllocator::new(SnatConfig {
            public_ips: vec![ip("192.0.2.10"), ip("192.0.2.11")],
            port_lo: 1024,
            port_hi: 1024 + 3 * 64 - 1,
            block_size: 64,
            blocks_per_member: 2,
            ..SnatConfig::default()
        })
        .unwrap();
        // Three blocks per address: the second member does not fit in
        // what the first left of 192.0.2.10, and takes 192.0.2.11's.
        for (vm, want) in [("10.1.0.4", "192.0.2.10"), ("10.1.0.5", "192.0.2.11")] {
            a.add_member(ip(vm)).unwrap();
            for sport in 0..128 {
                let (public, _) = a
                    .allocate(ip(vm), 30000 + sport, 17, ip(R), |_, _| false)
                    .unwrap();
                assert_eq!(public, ip(want), "{vm}");
            }
        }
        // The last two blocks, one of each address: mixed, not refused.
        a.add_member(ip("10.1.0.6")).unwrap();
        assert_eq!(a.member_ports(ip("10.1.0.6")), 128);
    }

    #[test]
    fn bad_config_and_member_removal() {
        assert!(SnatAllocator::new(SnatConfig::default()).is_err());
        let bad = SnatConfig {
            public_ips: vec![ip("192.0.2.1")],
            block_size: 0,
            ..SnatConfig::default()
        };
        assert!(matches!(
            SnatAllocator::new(bad),
            Err(SnatError::BadConfig(_))
        ));
        let mut a = alloc(4, 4, Mapping::EndpointIndependent, Filtering::default());
        a.add_member(ip("10.1.0.4")).unwrap();
        assert_eq!(a.member_ports(ip("10.1.0.4")), 16);
        assert!(a.add_member(ip("10.1.0.5")).is_err());
        a.remove_member(ip("10.1.0.4"));
        a.add_member(ip("10.1.0.5")).unwrap();
        assert_eq!(a.member_ports(ip("10.1.0.5")), 16);
    }
}
