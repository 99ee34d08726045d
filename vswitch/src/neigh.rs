//! The underlay's neighbour cache: the MACs of the uplink's next hops,
//! resolved with ARP, as a host's kernel keeps them (RFC 826, with the
//! states of RFC 4861's neighbour unreachability detection).
//!
//! The cache lives on the control thread ([`NeighCache`]); the workers
//! never wait for it. They tell it what they saw and what they miss
//! through lock-free mailboxes ([`NeighMail`]): ARP packets from the
//! uplink's network (`learned`), next hops a packet found unresolved
//! (`wanted`); and worker 0 sends the ARP requests the cache asks for
//! (`send`). When a next hop's MAC appears, changes or goes, the control
//! thread publishes a new policy snapshot with the cache's MACs, so cached
//! flows take the new MAC (flows never hold an address the snapshot does
//! not).
//!
//! An entry is resolved by broadcast requests (one a second, three, then
//! again a second later while it is still needed); a resolved one is
//! reachable for `reachable` after its last confirmation (any ARP packet
//! from it), then confirmed by unicast requests (three, one a second) and
//! forgotten if none is answered. Entries of next hops the policy uses
//! (its routes' and tunnels' next hops) are resolved whether or not
//! traffic waits for them, and kept. Only requests for the uplink's
//! address create entries from the wire; replies and announcements fill
//! or update entries the cache has, and a MAC that changed less than
//! `locktime` after the last is ignored (two devices answering for one
//! address do not make the policy flap). The policy is given the MACs of
//! next hops in use only (needed, or wanted by a packet once, until the
//! entry is forgotten): what the wire teaches the cache beyond them costs
//! no new policy generation.

use crossbeam_queue::ArrayQueue;
use dataplane::MacAddr;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Mailboxes between the workers and the control thread's cache.
#[derive(Debug)]
pub struct NeighMail {
    /// (sender address, sender MAC, may create an entry): ARP packets from
    /// the uplink's network. Requests for the uplink's address and replies
    /// may create an entry; any other (gratuitous ARP) only updates one.
    pub learned: ArrayQueue<(Ipv4Addr, MacAddr, bool)>,
    /// Next hops packets found without a MAC.
    pub wanted: ArrayQueue<Ipv4Addr>,
    /// ARP requests to send: target, and the MAC to send to (unicast) or
    /// `None` (broadcast).
    pub send: ArrayQueue<(Ipv4Addr, Option<MacAddr>)>,
}

impl Default for NeighMail {
    fn default() -> Self {
        NeighMail {
            learned: ArrayQueue::new(256),
            wanted: ArrayQueue::new(256),
            send: ArrayQueue::new(64),
        }
    }
}

/// Timers of the cache, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighTimers {
    /// How long a confirmation keeps an entry reachable (Linux's
    /// `base_reachable_time`: 30 s).
    pub reachable: u64,
    /// Between two requests for one entry (1 s).
    pub retrans: u64,
    /// Requests before an entry is given up (3).
    pub probes: u32,
    /// How long after a confirmation another MAC is ignored (1 s, as
    /// Linux's `locktime`).
    pub locktime: u64,
}

impl Default for NeighTimers {
    fn default() -> Self {
        NeighTimers {
            reachable: 30_000_000_000,
            retrans: 1_000_000_000,
            probes: 3,
            locktime: 1_000_000_000,
        }
    }
}

/// The most entries the cache holds (what the wire can make it create is
/// bounded: only replies and requests for the uplink's address create).
pub const MAX_NEIGHBOURS: usize = 4096;

/// One neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// Its MAC, once resolved.
    pub mac: Option<MacAddr>,
    /// When it was last confirmed (ns; 0: never).
    pub confirmed: u64,
    /// Requests sent since then.
    pub probes: u32,
    /// When the last request went (ns).
    pub probed: u64,
    /// When a packet last wanted it, or the policy needed it (ns; 0:
    /// never).
    pub used: u64,
}

/// The state names `pollux ctl neighbours` shows, as `ip neigh` does.
impl Neighbour {
    /// `incomplete`, `reachable`, `stale` (being confirmed) or `failed`.
    pub fn state(&self, now: u64, t: &NeighTimers) -> &'static str {
        match self.mac {
            None if self.probes >= t.probes => "failed",
            None => "incomplete",
            Some(_) if now.saturating_sub(self.confirmed) < t.reachable => "reachable",
            Some(_) => "stale",
        }
    }
}

/// The control thread's ARP cache.
#[derive(Debug, Default)]
pub struct NeighCache {
    entries: BTreeMap<Ipv4Addr, Neighbour>,
    timers: NeighTimers,
}

impl NeighCache {
    /// An empty cache with `timers`.
    pub fn new(timers: NeighTimers) -> Self {
        NeighCache {
            entries: BTreeMap::new(),
            timers,
        }
    }

    /// Its timers.
    pub fn timers(&self) -> &NeighTimers {
        &self.timers
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = (&Ipv4Addr, &Neighbour)> {
        self.entries.iter()
    }

    /// The resolved entries in use (a packet or the policy wanted them),
    /// as a policy takes them.
    pub fn resolved(&self) -> Vec<(Ipv4Addr, MacAddr)> {
        self.entries
            .iter()
            .filter(|(_, n)| n.used > 0)
            .filter_map(|(ip, n)| Some((*ip, n.mac?)))
            .collect()
    }

    /// Takes `ip` at `mac` in as confirmed and in use at `now` (a
    /// predecessor's entry).
    pub fn insert(&mut self, ip: Ipv4Addr, mac: MacAddr, now: u64) {
        if self.entries.len() < MAX_NEIGHBOURS || self.entries.contains_key(&ip) {
            self.entries.insert(
                ip,
                Neighbour {
                    mac: Some(mac),
                    confirmed: now,
                    probes: 0,
                    probed: 0,
                    used: now.max(1),
                },
            );
        }
    }

    /// One step at `now`: takes in what the workers sent (`on_link` says
    /// which addresses may be neighbours), keeps the policy's next hops
    /// (`needed`) resolved, sends the requests that are due through
    /// `mail.send`, ages entries out. Returns true when the resolved MACs
    /// in use changed (the policy must be published again).
    pub fn step(
        &mut self,
        now: u64,
        mail: &NeighMail,
        needed: &[Ipv4Addr],
        on_link: impl Fn(Ipv4Addr) -> bool,
    ) -> bool {
        let before = self.resolved();
        let t = self.timers;
        while let Some((ip, mac, create)) = mail.learned.pop() {
            if !on_link(ip) || mac.is_multicast() || mac == MacAddr::ZERO {
                continue;
            }
            let room = self.entries.len() < MAX_NEIGHBOURS;
            match self.entries.get_mut(&ip) {
                // Another MAC right after a confirmation: ignored.
                Some(n)
                    if n.mac.is_some_and(|m| m != mac)
                        && now.saturating_sub(n.confirmed) < t.locktime => {}
                Some(n) => {
                    n.mac = Some(mac);
                    n.confirmed = now;
                    n.probes = 0;
                    n.probed = 0;
                }
                None if create && room => {
                    self.entries.insert(
                        ip,
                        Neighbour {
                            mac: Some(mac),
                            confirmed: now,
                            probes: 0,
                            probed: 0,
                            used: 0,
                        },
                    );
                }
                None => {}
            }
        }
        let mut want: Vec<(Ipv4Addr, bool)> = needed.iter().map(|ip| (*ip, true)).collect();
        while let Some(ip) = mail.wanted.pop() {
            want.push((ip, false));
        }
        for (ip, need) in want {
            // (The policy's next hops always have room: they are bounded
            // by its size.)
            let full = self.entries.len() >= MAX_NEIGHBOURS && !self.entries.contains_key(&ip);
            if !on_link(ip) || (full && !need) {
                continue;
            }
            let n = self.entries.entry(ip).or_insert(Neighbour {
                mac: None,
                confirmed: 0,
                probes: 0,
                probed: 0,
                used: 0,
            });
            n.used = now.max(1);
            // A failed entry that is wanted again starts over, a second on.
            if n.mac.is_none() && n.probes >= t.probes && now.saturating_sub(n.probed) >= t.retrans
            {
                n.probes = 0;
            }
        }
        let mut gone = Vec::new();
        for (ip, n) in self.entries.iter_mut() {
            let due = n.probes == 0 || now.saturating_sub(n.probed) >= t.retrans;
            match n.mac {
                // Being resolved: broadcast requests; given up after the
                // last one's wait (a needed one starts over then).
                None if n.probes < t.probes => {
                    if due && mail.send.push((*ip, None)).is_ok() {
                        n.probes += 1;
                        n.probed = now;
                    }
                }
                None => {
                    if now.saturating_sub(n.probed) >= t.retrans {
                        if needed.contains(ip) {
                            n.probes = 0;
                        } else {
                            gone.push(*ip);
                        }
                    }
                }
                // Reachable.
                Some(_) if now.saturating_sub(n.confirmed) < t.reachable => {}
                // Stale: confirmed by unicast requests, forgotten when
                // none is answered.
                Some(mac) if n.probes < t.probes => {
                    if due && mail.send.push((*ip, Some(mac))).is_ok() {
                        n.probes += 1;
                        n.probed = now;
                    }
                }
                Some(_) => {
                    if now.saturating_sub(n.probed) >= t.retrans {
                        // Unreachable: resolved again from scratch.
                        *n = Neighbour {
                            mac: None,
                            confirmed: 0,
                            probes: 0,
                            probed: 0,
                            used: n.used,
                        };
                        if !needed.contains(ip) {
                            gone.push(*ip);
                        }
                    }
                }
            }
        }
        for ip in gone {
            self.entries.remove(&ip);
        }
        self.resolved() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, n)
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    fn sent(m: &NeighMail) -> Vec<(Ipv4Addr, Option<MacAddr>)> {
        std::iter::from_fn(|| m.send.pop()).collect()
    }

    fn local(a: Ipv4Addr) -> bool {
        a.octets()[..3] == [192, 168, 100]
    }

    #[test]
    fn a_needed_next_hop_is_resolved_then_confirmed_by_unicast() {
        let mut c = NeighCache::default();
        let m = NeighMail::default();
        let gw = ip(254);
        assert!(!c.step(0, &m, &[gw], local));
        assert_eq!(sent(&m), [(gw, None)]);
        // Not again before a second has passed.
        c.step(S / 2, &m, &[gw], local);
        assert!(sent(&m).is_empty());
        c.step(S, &m, &[gw], local);
        assert_eq!(sent(&m), [(gw, None)]);
        // The reply: resolved (the policy must change).
        m.learned.push((gw, mac(1), true)).unwrap();
        assert!(c.step(S + 1, &m, &[gw], local));
        assert_eq!(c.resolved(), [(gw, mac(1))]);
        assert_eq!(
            c.entries().next().unwrap().1.state(S + 1, c.timers()),
            "reachable"
        );
        // Thirty seconds on: confirmed by unicast, and the answer keeps it.
        assert!(!c.step(31 * S + 1, &m, &[gw], local));
        assert_eq!(sent(&m), [(gw, Some(mac(1)))]);
        m.learned.push((gw, mac(1), false)).unwrap();
        assert!(!c.step(31 * S + 2, &m, &[gw], local));
        assert!(sent(&m).is_empty());
        // Another MAC right after the confirmation: ignored (locktime).
        m.learned.push((gw, mac(2), false)).unwrap();
        assert!(!c.step(31 * S + 3, &m, &[gw], local));
        // A new MAC later (the router replaced): the policy must change.
        m.learned.push((gw, mac(2), false)).unwrap();
        assert!(c.step(33 * S, &m, &[gw], local));
        assert_eq!(c.resolved(), [(gw, mac(2))]);
    }

    #[test]
    fn an_unanswered_neighbour_is_forgotten_unless_needed() {
        let mut c = NeighCache::default();
        let m = NeighMail::default();
        m.learned.push((ip(7), mac(7), true)).unwrap();
        m.learned.push((ip(8), mac(8), true)).unwrap();
        assert!(c.step(0, &m, &[ip(8)], local));
        let mut t = 30 * S;
        for _ in 0..3 {
            c.step(t, &m, &[ip(8)], local);
            assert_eq!(sent(&m).len(), 2, "at {t}");
            t += S;
        }
        // No answers: both unresolved; the unneeded one is gone, the
        // needed one is resolved again by broadcast.
        assert!(c.step(t, &m, &[ip(8)], local));
        assert!(c.resolved().is_empty());
        assert_eq!(c.entries().map(|e| *e.0).collect::<Vec<_>>(), [ip(8)]);
        c.step(t + 1, &m, &[ip(8)], local);
        assert_eq!(sent(&m), [(ip(8), None)]);
    }

    #[test]
    fn the_wire_cannot_plant_entries_off_link_or_unasked() {
        let mut c = NeighCache::default();
        let m = NeighMail::default();
        // Off-link, multicast, or gratuitous for an unknown address.
        m.learned
            .push((Ipv4Addr::new(10, 0, 0, 1), mac(1), true))
            .unwrap();
        m.learned.push((ip(3), MacAddr::BROADCAST, true)).unwrap();
        m.learned.push((ip(4), mac(4), false)).unwrap();
        m.wanted.push(Ipv4Addr::new(10, 0, 0, 2)).unwrap();
        assert!(!c.step(0, &m, &[], local));
        assert_eq!(c.entries().count(), 0);
        // A request for the uplink's address creates an entry, which no
        // policy takes until a packet wants it.
        m.learned.push((ip(9), mac(9), true)).unwrap();
        assert!(!c.step(0, &m, &[], local));
        assert_eq!(c.entries().count(), 1);
        m.wanted.push(ip(9)).unwrap();
        assert!(c.step(1, &m, &[], local));
        assert_eq!(c.resolved(), [(ip(9), mac(9))]);
        c.entries.remove(&ip(9));
        // A worker's wanted next hop is resolved, given up after three
        // requests, and resolved again when wanted again.
        m.wanted.push(ip(5)).unwrap();
        for s in 0..3 {
            c.step(s * S, &m, &[], local);
        }
        assert_eq!(sent(&m).len(), 3);
        assert_eq!(
            c.entries().next().unwrap().1.state(2 * S, c.timers()),
            "failed"
        );
        c.step(3 * S, &m, &[], local);
        assert_eq!(c.entries().count(), 0);
    }
}
