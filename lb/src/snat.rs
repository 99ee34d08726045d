//! SNAT port allocation for outbound connections, in Azure's manner: the
//! ports of each public address are cut into blocks, and every member VM is
//! given its blocks up front. A VM's connections take ports only from its own
//! blocks, so members never contend and exhaustion is per VM.
//!
//! TCP reuses a port across *different* destinations (the connection is
//! identified by the full 5-tuple, so `(public, port)` can serve many
//! `(destination, port)` pairs at once); UDP and ICMP do not (a port serves
//! one flow at a time). A port returns when its connection closes or times
//! out ([`SnatAllocator::release`]).

use std::collections::HashMap;
use std::net::IpAddr;

/// How SNAT ports are laid out.
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
}

impl Default for SnatConfig {
    fn default() -> Self {
        SnatConfig {
            public_ips: Vec::new(),
            port_lo: 1024,
            port_hi: 65535,
            block_size: 64,
            blocks_per_member: 16,
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
    /// Every port of the member's blocks is in use for this destination.
    #[error("snat: ports of member {member} exhausted")]
    Exhausted {
        /// The member VM.
        member: IpAddr,
    },
}

/// A block: a public address (index) and its first port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Block {
    ip: u16,
    start: u16,
}

/// Per-core SNAT state.
#[derive(Debug)]
pub struct SnatAllocator {
    cfg: SnatConfig,
    free_blocks: Vec<Block>,
    members: HashMap<IpAddr, Member>,
    /// Live connections per (public address index, port, protocol).
    in_use: HashMap<(u16, u16, u8), u32>,
    exhausted: u64,
}

#[derive(Debug)]
struct Member {
    blocks: Vec<Block>,
    /// Where the next search starts (rotates through the member's ports).
    cursor: usize,
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
            exhausted: 0,
        })
    }

    /// Gives `member` its blocks (idempotent).
    pub fn add_member(&mut self, member: IpAddr) -> Result<(), SnatError> {
        if self.members.contains_key(&member) {
            return Ok(());
        }
        if self.free_blocks.len() < self.cfg.blocks_per_member {
            return Err(SnatError::NoBlocks { member });
        }
        let at = self.free_blocks.len() - self.cfg.blocks_per_member;
        let blocks = self.free_blocks.split_off(at);
        self.members.insert(member, Member { blocks, cursor: 0 });
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

    /// Chooses a public address and port for a connection of `member` with
    /// protocol `proto`. For TCP, `taken(public, port)` must say whether that
    /// public address and port are already used *towards this connection's
    /// destination* (the caller asks its connection table for the reply
    /// key); for other protocols a port with any live connection is skipped.
    pub fn allocate(
        &mut self,
        member: IpAddr,
        proto: u8,
        mut taken: impl FnMut(IpAddr, u16) -> bool,
    ) -> Result<(IpAddr, u16), SnatError> {
        let m = self
            .members
            .get_mut(&member)
            .ok_or(SnatError::NotMember(member))?;
        let bs = usize::from(self.cfg.block_size);
        let total = m.blocks.len() * bs;
        for step in 0..total {
            let n = (m.cursor + step) % total;
            let b = m.blocks[n / bs];
            let port = b.start + (n % bs) as u16;
            let ip = self.cfg.public_ips[usize::from(b.ip)];
            let busy = if proto == 6 {
                taken(ip, port)
            } else {
                self.in_use
                    .get(&(b.ip, port, proto))
                    .is_some_and(|&c| c > 0)
            };
            if !busy {
                m.cursor = (n + 1) % total;
                *self.in_use.entry((b.ip, port, proto)).or_insert(0) += 1;
                return Ok((ip, port));
            }
        }
        self.exhausted += 1;
        Err(SnatError::Exhausted { member })
    }

    /// Returns a port when its connection ends.
    pub fn release(&mut self, public: IpAddr, port: u16, proto: u8) {
        let Some(ip) = self.cfg.public_ips.iter().position(|&p| p == public) else {
            return;
        };
        let k = (ip as u16, port, proto);
        if let Some(c) = self.in_use.get_mut(&k) {
            *c -= 1;
            if *c == 0 {
                self.in_use.remove(&k);
            }
        }
    }

    /// Live connections on `(public, port)` for `proto`.
    pub fn users(&self, public: IpAddr, port: u16, proto: u8) -> u32 {
        let Some(ip) = self.cfg.public_ips.iter().position(|&p| p == public) else {
            return 0;
        };
        self.in_use
            .get(&(ip as u16, port, proto))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn workers_own_disjoint_blocks_and_worker_of_finds_them() {
        let cfg = SnatConfig {
            public_ips: vec![ip("203.0.113.1"), ip("203.0.113.2")],
            port_lo: 1024,
            port_hi: 1024 + 64 * 12 - 1,
            block_size: 64,
            blocks_per_member: 2,
        };
        let mut seen = HashSet::new();
        for w in 0..3 {
            let mut a = SnatAllocator::for_worker(cfg.clone(), w, 3).unwrap();
            a.add_member(ip("10.1.0.4")).unwrap();
            for _ in 0..128 {
                let (public, port) = a.allocate(ip("10.1.0.4"), 17, |_, _| false).unwrap();
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

    fn alloc(blocks: usize, size: u16) -> SnatAllocator {
        SnatAllocator::new(SnatConfig {
            public_ips: vec![ip("192.0.2.10")],
            port_lo: 1024,
            port_hi: 1024 + 4 * size - 1,
            block_size: size,
            blocks_per_member: blocks,
        })
        .unwrap()
    }

    #[test]
    fn members_get_disjoint_blocks() {
        let mut a = alloc(2, 4);
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
            for _ in 0..8 {
                let (_, p) = a.allocate(ip(vm), 17, |_, _| false).unwrap();
                assert!(seen.insert(p), "port {p} given twice");
            }
        }
        assert_eq!(seen.len(), 16);
        assert_eq!(
            a.allocate(ip("10.9.9.9"), 6, |_, _| false),
            Err(SnatError::NotMember(ip("10.9.9.9")))
        );
    }

    #[test]
    fn tcp_reuses_ports_across_destinations_udp_does_not() {
        let mut a = alloc(1, 2);
        a.add_member(ip("10.1.0.4")).unwrap();
        // Model the connection table: (port, destination) pairs in use.
        let mut conns: HashSet<(u16, &str)> = HashSet::new();
        for dst in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
            for _ in 0..2 {
                let (_, p) = a
                    .allocate(ip("10.1.0.4"), 6, |_, port| conns.contains(&(port, dst)))
                    .unwrap();
                assert!(conns.insert((p, dst)));
            }
            // Both ports are now used towards dst: a third connection there fails.
            assert_eq!(
                a.allocate(ip("10.1.0.4"), 6, |_, port| conns.contains(&(port, dst))),
                Err(SnatError::Exhausted {
                    member: ip("10.1.0.4")
                })
            );
        }
        // 6 TCP connections on 2 ports.
        assert_eq!(conns.len(), 6);
        assert_eq!(a.users(ip("192.0.2.10"), 1024, 6), 3);
        // UDP: one flow per port, whatever the destination.
        let (_, p1) = a.allocate(ip("10.1.0.4"), 17, |_, _| false).unwrap();
        let (_, p2) = a.allocate(ip("10.1.0.4"), 17, |_, _| false).unwrap();
        assert_ne!(p1, p2);
        assert!(a.allocate(ip("10.1.0.4"), 17, |_, _| false).is_err());
        assert_eq!(a.exhausted(), 4);
        // Release one and it is reused.
        a.release(ip("192.0.2.10"), p1, 17);
        assert_eq!(a.allocate(ip("10.1.0.4"), 17, |_, _| false).unwrap().1, p1);
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
        let mut a = alloc(4, 4);
        a.add_member(ip("10.1.0.4")).unwrap();
        assert_eq!(a.member_ports(ip("10.1.0.4")), 16);
        assert!(a.add_member(ip("10.1.0.5")).is_err());
        a.remove_member(ip("10.1.0.4"));
        a.add_member(ip("10.1.0.5")).unwrap();
        assert_eq!(a.member_ports(ip("10.1.0.5")), 16);
    }
}
