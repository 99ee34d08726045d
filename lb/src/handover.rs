//! The load balancer's state as one process hands it to the next (a
//! hitless upgrade): every tracked connection with its NAT binding and
//! protocol state, and each vnet's SNAT block layout.
//!
//! Owns: the serde records ([`CoreRecord`], [`ConnRecord`], [`SnatRecord`])
//! and their conversion from and into [`LbCore`]. The records are a
//! versioned exchange format, kept apart from the in-memory types so that
//! those can change while a newer binary still reads what an older one
//! wrote (`FORMAT`, checked by the caller). Times are ages relative to the
//! moment of export, since every process has its own clock.
//!
//! Must not touch: ports, threads, the flow cache (a cache of this state:
//! the next process rebuilds it from the connections).

use crate::balancer::{ConnInfo, ConnKind, LbCore, Proxied, VipKey, Vips};
use crate::conntrack::{Conn, ConnError, ConnState, TcpState};
use crate::nat::{NatBinding, Rewrite, SeqShift};
use crate::snat::SnatAllocator;
use dataplane::FlowKey;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// One direction's 5-tuple (for ICMP the echo identifier is the source
/// port, as in [`FlowKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    /// IP protocol number.
    pub proto: u8,
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
}

impl From<&FlowKey> for Tuple {
    fn from(k: &FlowKey) -> Tuple {
        Tuple {
            proto: k.proto,
            src: SocketAddr::new(k.src(), k.src_port),
            dst: SocketAddr::new(k.dst(), k.dst_port),
        }
    }
}

impl From<&Tuple> for FlowKey {
    fn from(t: &Tuple) -> FlowKey {
        FlowKey::new(t.src.ip(), t.src.port(), t.dst.ip(), t.dst.port(), t.proto)
    }
}

/// A connection's protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateRecord {
    /// TCP: SYN seen.
    SynSent,
    /// TCP: SYN-ACK seen.
    SynReceived,
    /// TCP: established (or picked up mid-stream).
    Established,
    /// TCP: one FIN seen.
    FinWait,
    /// TCP: both FINs seen.
    TimeWait,
    /// TCP: RST seen.
    Closed,
    /// UDP before any reply.
    Udp,
    /// UDP with replies.
    UdpReplied,
    /// Anything else.
    Other,
}

impl From<ConnState> for StateRecord {
    fn from(s: ConnState) -> StateRecord {
        match s {
            ConnState::Tcp(TcpState::SynSent) => StateRecord::SynSent,
            ConnState::Tcp(TcpState::SynReceived) => StateRecord::SynReceived,
            ConnState::Tcp(TcpState::Established) => StateRecord::Established,
            ConnState::Tcp(TcpState::FinWait) => StateRecord::FinWait,
            ConnState::Tcp(TcpState::TimeWait) => StateRecord::TimeWait,
            ConnState::Tcp(TcpState::Closed) => StateRecord::Closed,
            ConnState::Udp { replied: false } => StateRecord::Udp,
            ConnState::Udp { replied: true } => StateRecord::UdpReplied,
            ConnState::Other => StateRecord::Other,
        }
    }
}

impl From<StateRecord> for ConnState {
    fn from(s: StateRecord) -> ConnState {
        match s {
            StateRecord::SynSent => ConnState::Tcp(TcpState::SynSent),
            StateRecord::SynReceived => ConnState::Tcp(TcpState::SynReceived),
            StateRecord::Established => ConnState::Tcp(TcpState::Established),
            StateRecord::FinWait => ConnState::Tcp(TcpState::FinWait),
            StateRecord::TimeWait => ConnState::Tcp(TcpState::TimeWait),
            StateRecord::Closed => ConnState::Tcp(TcpState::Closed),
            StateRecord::Udp => ConnState::Udp { replied: false },
            StateRecord::UdpReplied => ConnState::Udp { replied: true },
            StateRecord::Other => ConnState::Other,
        }
    }
}

/// A TCP sequence shift of a SYN-proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShiftRecord {
    /// Added to sequence numbers.
    Seq(u32),
    /// Added to acknowledgment numbers.
    Ack(u32),
}

/// One direction's rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RewriteRecord {
    /// New source address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<SocketAddr>,
    /// New destination address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
    /// Sequence shift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<ShiftRecord>,
}

impl From<&Rewrite> for RewriteRecord {
    fn from(r: &Rewrite) -> RewriteRecord {
        let sa = |x: Option<(IpAddr, u16)>| x.map(|(a, p)| SocketAddr::new(a, p));
        RewriteRecord {
            src: sa(r.src),
            dst: sa(r.dst),
            shift: match r.shift {
                SeqShift::None => None,
                SeqShift::Seq(b) => Some(ShiftRecord::Seq(u32::from_be_bytes(b))),
                SeqShift::Ack(b) => Some(ShiftRecord::Ack(u32::from_be_bytes(b))),
            },
        }
    }
}

impl From<&RewriteRecord> for Rewrite {
    fn from(r: &RewriteRecord) -> Rewrite {
        let pair = |x: Option<SocketAddr>| x.map(|s| (s.ip(), s.port()));
        Rewrite {
            src: pair(r.src),
            dst: pair(r.dst),
            shift: match r.shift {
                None => SeqShift::None,
                Some(ShiftRecord::Seq(n)) => SeqShift::seq(n),
                Some(ShiftRecord::Ack(n)) => SeqShift::ack(n),
            },
        }
    }
}

/// What a connection is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KindRecord {
    /// To a VIP (the frontend), DNATed to a backend.
    Dnat {
        /// The VIP's address and port (the protocol is the connection's).
        vip: SocketAddr,
        /// The backend's address and port.
        backend: SocketAddr,
    },
    /// Through a SNAT mapping.
    Snat {
        /// The public address and port.
        public: SocketAddr,
        /// Opened from the wire through the mapping's filtering.
        inbound: bool,
    },
    /// Admitted without NAT.
    Plain {
        /// Left through the uplink.
        uplink: bool,
    },
}

/// A SYN-proxied connection's handshake state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxiedRecord {
    /// The cookie the client was given.
    pub cookie: u32,
    /// The client's initial sequence number.
    pub client_isn: u32,
    /// The MSS the cookie carried.
    pub mss: u16,
    /// The client's window.
    pub window: u16,
    /// The backend answered.
    pub answered: bool,
    /// The client reset before that.
    pub reset: bool,
}

/// One tracked connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRecord {
    /// The first packet's tuple.
    pub orig: Tuple,
    /// The tuple replies arrive with.
    pub reply: Tuple,
    /// Protocol state.
    pub state: StateRecord,
    /// FIN seen per direction (original, reply).
    pub fin_seen: [bool; 2],
    /// Packets per direction (original, reply).
    pub packets: [u64; 2],
    /// Nanoseconds since the connection was created.
    pub age_ns: u64,
    /// Nanoseconds since a packet last used it.
    pub idle_ns: u64,
    /// What it is.
    #[serde(flatten)]
    pub kind: KindRecord,
    /// Rewrite of the original direction.
    pub forward: RewriteRecord,
    /// Rewrite of the reply direction.
    pub reverse: RewriteRecord,
    /// The SYN proxy's part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxiedRecord>,
}

/// One member VM's SNAT port blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The VM's private address.
    pub ip: IpAddr,
    /// Each block as its public address and first port.
    pub blocks: Vec<SocketAddr>,
}

/// A vnet's SNAT allocator on one worker: which blocks each member holds.
/// (The ports in use follow from the connections.)
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnatRecord {
    /// Members and their blocks.
    pub members: Vec<MemberRecord>,
    /// Allocations that failed for exhaustion so far.
    #[serde(default)]
    pub exhausted: u64,
}

/// One worker's load balancer for one vnet.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CoreRecord {
    /// Tracked connections, least recently used first.
    pub conns: Vec<ConnRecord>,
    /// The SNAT allocator, for a vnet with SNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<SnatRecord>,
}

/// Why records could not be taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    /// The saved SNAT layout does not fit this worker's allocator.
    #[error("snat: {0}")]
    Snat(String),
    /// The table has no room for what was saved.
    #[error("connection table full: {saved} connections saved, room for {capacity}")]
    Full {
        /// Connections in the records.
        saved: usize,
        /// This table's capacity.
        capacity: usize,
    },
}

/// What an import took in, and what it left out and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Imported {
    /// Connections restored.
    pub conns: u64,
    /// Connections to a VIP or backend the configuration no longer has.
    pub vip_gone: u64,
    /// Connections whose tuple was taken already (a record repeated).
    pub duplicate: u64,
}

impl std::ops::AddAssign for Imported {
    fn add_assign(&mut self, o: Imported) {
        self.conns += o.conns;
        self.vip_gone += o.vip_gone;
        self.duplicate += o.duplicate;
    }
}

fn conn_record(c: &Conn<ConnInfo>, now: u64) -> ConnRecord {
    let kind = match &c.value.kind {
        ConnKind::Dnat { vip, backend, port } => {
            let v = vip.config();
            KindRecord::Dnat {
                vip: SocketAddr::new(v.addr, v.port),
                backend: SocketAddr::new(*backend, *port),
            }
        }
        ConnKind::Snat {
            public,
            port,
            inbound,
        } => KindRecord::Snat {
            public: SocketAddr::new(*public, *port),
            inbound: *inbound,
        },
        ConnKind::Plain { uplink } => KindRecord::Plain { uplink: *uplink },
    };
    ConnRecord {
        orig: Tuple::from(&c.orig),
        reply: Tuple::from(&c.reply),
        state: c.state.into(),
        fin_seen: c.fin_seen,
        packets: c.packets,
        age_ns: now.saturating_sub(c.created),
        idle_ns: now.saturating_sub(c.last_seen),
        kind,
        forward: (&c.value.nat.forward).into(),
        reverse: (&c.value.nat.reverse).into(),
        proxy: c.value.proxy.map(|p| ProxiedRecord {
            cookie: p.cookie,
            client_isn: p.client_isn,
            mss: p.mss,
            window: p.window,
            answered: p.answered,
            reset: p.reset,
        }),
    }
}

impl LbCore {
    /// This core's state at time `now` (its clock): every connection,
    /// least recently used first, and the SNAT layout.
    pub fn export(&self, now: u64) -> CoreRecord {
        let mut conns: Vec<&Conn<ConnInfo>> = self.conns().iter().map(|(_, c)| c).collect();
        conns.sort_by_key(|c| c.last_seen);
        CoreRecord {
            conns: conns.into_iter().map(|c| conn_record(c, now)).collect(),
            snat: self.snat().map(|s| SnatRecord {
                members: s
                    .member_blocks()
                    .map(|(ip, blocks)| MemberRecord { ip, blocks })
                    .collect(),
                exhausted: s.exhausted(),
            }),
        }
    }

    /// Takes in `rec` (exported by [`LbCore::export`], perhaps by another
    /// process) at time `now` of this core's clock, against the VIPs of
    /// the current policy: a connection to a VIP, or to a backend of it,
    /// that is no longer configured is left out (counted), as a new
    /// policy would end it. The SNAT layout is restored before the
    /// connections, whose ports it holds again.
    pub fn import(
        &mut self,
        rec: &CoreRecord,
        vips: &Vips,
        now: u64,
    ) -> Result<Imported, HandoverError> {
        if rec.conns.len() > self.conns().capacity() - self.conns().len() {
            return Err(HandoverError::Full {
                saved: rec.conns.len(),
                capacity: self.conns().capacity(),
            });
        }
        if let (Some(s), Some(saved)) = (self.snat_mut(), &rec.snat) {
            let members: Vec<(IpAddr, Vec<SocketAddr>)> = saved
                .members
                .iter()
                .map(|m| (m.ip, m.blocks.clone()))
                .collect();
            s.restore_blocks(&members, saved.exhausted)
                .map_err(|e| HandoverError::Snat(e.to_string()))?;
        }
        let mut done = Imported::default();
        for r in &rec.conns {
            let kind = match &r.kind {
                KindRecord::Dnat { vip, backend } => {
                    let found = vips
                        .get(vip.ip(), vip.port(), r.orig.proto)
                        .filter(|v| v.backend_index(backend.ip(), backend.port()).is_some());
                    let Some(v) = found else {
                        done.vip_gone += 1;
                        continue;
                    };
                    ConnKind::Dnat {
                        vip: v.clone(),
                        backend: backend.ip(),
                        port: backend.port(),
                    }
                }
                KindRecord::Snat { public, inbound } => ConnKind::Snat {
                    public: public.ip(),
                    port: public.port(),
                    inbound: *inbound,
                },
                KindRecord::Plain { uplink } => ConnKind::Plain { uplink: *uplink },
            };
            let orig = FlowKey::from(&r.orig);
            let conn = Conn {
                orig,
                reply: FlowKey::from(&r.reply),
                state: r.state.into(),
                fin_seen: r.fin_seen,
                created: now.saturating_sub(r.age_ns),
                last_seen: now.saturating_sub(r.idle_ns),
                packets: r.packets,
                value: ConnInfo {
                    kind,
                    nat: NatBinding {
                        forward: (&r.forward).into(),
                        reverse: (&r.reverse).into(),
                    },
                    proxy: r.proxy.map(|p| Proxied {
                        cookie: p.cookie,
                        client_isn: p.client_isn,
                        mss: p.mss,
                        window: p.window,
                        answered: p.answered,
                        reset: p.reset,
                    }),
                },
            };
            let class = conn.value.kind.class();
            match self.restore_conn(class, conn, now) {
                Ok(()) => done.conns += 1,
                Err(ConnError::Exists) => done.duplicate += 1,
                Err(ConnError::Full { capacity }) => {
                    return Err(HandoverError::Full {
                        saved: rec.conns.len(),
                        capacity,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Puts a saved connection back, with what it holds: its VIP's count
    /// and its SNAT port.
    fn restore_conn(&mut self, class: u8, conn: Conn<ConnInfo>, now: u64) -> Result<(), ConnError> {
        let hold = match &conn.value.kind {
            ConnKind::Dnat { vip, .. } => Hold::Vip(VipKey::of_cfg(vip.config())),
            ConnKind::Snat {
                public,
                port,
                inbound,
            } => {
                let (private, remote) = if *inbound {
                    // Opened from the wire: DNATed to the mapping's VM.
                    let to = conn.value.nat.forward.dst;
                    (to, conn.orig.src())
                } else {
                    (Some((conn.orig.src(), conn.orig.src_port)), conn.orig.dst())
                };
                Hold::Snat {
                    public: *public,
                    port: *port,
                    proto: conn.orig.proto,
                    private,
                    remote,
                }
            }
            ConnKind::Plain { .. } => Hold::Nothing,
        };
        self.conns_mut().restore(class, conn, now)?;
        match hold {
            Hold::Vip(k) => self.count_vip(k),
            Hold::Snat {
                public,
                port,
                proto,
                private,
                remote,
            } => {
                if let Some(s) = self.snat_mut() {
                    s.restore_hold(public, port, proto, private, remote);
                }
            }
            Hold::Nothing => {}
        }
        Ok(())
    }
}

/// What a restored connection holds beyond its slot.
enum Hold {
    Vip(VipKey),
    Snat {
        public: IpAddr,
        port: u16,
        proto: u8,
        private: Option<(IpAddr, u16)>,
        remote: IpAddr,
    },
    Nothing,
}

/// [`SnatAllocator`]'s part of a handover.
impl SnatAllocator {
    /// Each member's blocks as (public address, first port).
    pub fn member_blocks(&self) -> impl Iterator<Item = (IpAddr, Vec<SocketAddr>)> + '_ {
        self.members_raw().map(move |(ip, blocks)| {
            let b = blocks
                .iter()
                .filter_map(|&(i, start)| {
                    Some(SocketAddr::new(
                        *self.config().public_ips.get(usize::from(i))?,
                        start,
                    ))
                })
                .collect();
            (ip, b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{Backend, Decision, Vip, VipConfig};
    use crate::conntrack::Timeouts;
    use crate::snat::{Filtering, SnatConfig};

    const SEC: u64 = 1_000_000_000;
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn vips(backends: usize) -> Vips {
        let b = (0..backends)
            .map(|i| Backend {
                ip: ip(&format!("10.1.0.{}", 10 + i)),
                port: 8080,
                weight: 1,
            })
            .collect();
        let mut v = Vips::new();
        v.insert(
            Vip::new(
                VipConfig::new("web", ip("10.1.0.100"), 80, 6, b),
                &vec![true; backends],
            )
            .unwrap(),
        );
        v
    }

    fn core() -> LbCore {
        let snat = SnatAllocator::new(SnatConfig {
            public_ips: vec![ip("192.0.2.10")],
            port_lo: 2000,
            port_hi: 2255,
            block_size: 64,
            blocks_per_member: 1,
            filtering: Filtering::AddressDependent,
            ..SnatConfig::default()
        })
        .unwrap();
        let mut lb = LbCore::new(1000, Timeouts::default(), Some(snat));
        for m in ["10.1.0.4", "10.1.0.5"] {
            lb.snat_mut().unwrap().add_member(ip(m)).unwrap();
        }
        lb
    }

    fn forward(d: Decision) -> (Rewrite, bool) {
        match d {
            Decision::Forward { rewrite, new, .. } => (rewrite, new),
            other => panic!("not forwarded: {other:?}"),
        }
    }

    #[test]
    fn a_core_taken_over_goes_on_as_the_old_one_would() {
        let vips = vips(3);
        let mut old = core();
        // Two members join in the other order in the new process, so their
        // fresh blocks differ from the old ones until restored.
        let mut new = LbCore::new(
            1000,
            Timeouts::default(),
            Some(SnatAllocator::new(old.snat().unwrap().config().clone()).unwrap()),
        );
        // (And one more, only in the new configuration, which must not
        // take a block the others had.)
        for m in ["10.1.0.6", "10.1.0.5", "10.1.0.4"] {
            new.snat_mut().unwrap().add_member(ip(m)).unwrap();
        }
        let t0 = 100 * SEC;
        let clients: Vec<FlowKey> = (0..20)
            .map(|i| FlowKey::new(ip("203.0.113.7"), 40000 + i, ip("10.1.0.100"), 80, 6))
            .collect();
        let mut dips = Vec::new();
        for k in &clients {
            let (rw, _) = forward(old.process(&vips, k, SYN, t0));
            dips.push(rw.dst);
        }
        let out = FlowKey::new(ip("10.1.0.4"), 5000, ip("198.51.100.1"), 3478, 17);
        let (snat_rw, _) = forward(old.process_snat(&out, 0, t0));
        let (public, port) = snat_rw.src.unwrap();
        // Its contact, from another port, comes in through the mapping
        // (address-dependent filtering): an inbound SNAT connection.
        let contact = FlowKey::new(ip("198.51.100.1"), 3479, public, port, 17);
        let (inbound_rw, new_conn) = forward(old.snat_inbound(&contact, 0, t0));
        assert!(new_conn);
        let saved = old.export(t0 + SEC);
        // Through JSON, as between processes.
        let text = serde_json::to_string(&saved).unwrap();
        let back: CoreRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, saved);
        let t1 = 7 * SEC; // the new process's clock
        let got = new.import(&back, &vips, t1).unwrap();
        assert_eq!(
            got,
            Imported {
                conns: 22,
                ..Imported::default()
            }
        );
        // Each connection keeps its backend, even with the one it has down.
        vips.set_health((ip("10.1.0.100"), 80, 6), 0, false)
            .unwrap();
        for (k, dip) in clients.iter().zip(&dips) {
            let (rw, new_conn) = forward(new.process(&vips, k, ACK, t1));
            assert!(!new_conn);
            assert_eq!(rw.dst, *dip);
        }
        // The SNAT mapping is the old one: same port for the endpoint, a
        // reply from its contact comes in, and the port is held.
        let (rw, new_conn) = forward(new.process_snat(&out, 0, t1));
        assert!(!new_conn);
        assert_eq!(rw.src, snat_rw.src);
        // The inbound connection goes on too (its next packet is not new),
        // and the mapping's filtering still knows the contact: a third
        // port of it may come in, a stranger may not.
        let (rw, new_conn) = forward(new.process_snat(&contact, 0, t1));
        assert!(!new_conn);
        assert_eq!(rw.dst, inbound_rw.dst);
        let again = FlowKey::new(ip("198.51.100.1"), 3480, public, port, 17);
        assert!(forward(new.snat_inbound(&again, 0, t1)).1);
        let stranger = FlowKey::new(ip("198.51.100.9"), 3478, public, port, 17);
        assert_eq!(
            new.snat_inbound(&stranger, 0, t1),
            Decision::Drop(crate::LbDrop::SnatFiltered)
        );
        let s = new.snat().unwrap();
        assert_eq!(s.users(public, port, 17), 3);
        assert_eq!(s.mapping_of(ip("10.1.0.4"), 5000, 17), Some((public, port)));
        let mut now: std::collections::BTreeMap<_, _> = s.member_blocks().collect();
        let extra = now.remove(&ip("10.1.0.6")).unwrap();
        let had: std::collections::BTreeMap<_, _> = old.snat().unwrap().member_blocks().collect();
        assert_eq!(now, had);
        assert_eq!(extra.len(), 1);
        assert!(
            had.values().all(|b| !b.contains(&extra[0])),
            "{extra:?} {had:?}"
        );
        // A new connection of the same endpoint to another address reuses
        // the mapping (endpoint-independent), as it would have in the old.
        let other = FlowKey::new(ip("10.1.0.4"), 5000, ip("198.51.100.2"), 3478, 17);
        let (rw, _) = forward(new.process_snat(&other, 0, t1));
        assert_eq!(rw.src, snat_rw.src);
        assert_eq!(new.snat().unwrap().users(public, port, 17), 4);
        // Ages carried over: the connections are as idle as they were.
        let c = new
            .conns()
            .iter()
            .map(|(_, c)| c)
            .find(|c| c.orig == clients[0])
            .unwrap();
        assert_eq!(c.created, t1 - SEC);
    }

    #[test]
    fn connections_of_a_vip_or_backend_no_longer_configured_are_left_out() {
        let mut old = core();
        let before = vips(3);
        let t = 10 * SEC;
        for i in 0..30 {
            let k = FlowKey::new(ip("203.0.113.7"), 40000 + i, ip("10.1.0.100"), 80, 6);
            forward(old.process(&before, &k, SYN, t));
        }
        let saved = old.export(t);
        let on_dip2 = saved
            .conns
            .iter()
            .filter(|c| matches!(c.kind, KindRecord::Dnat { backend, .. } if backend.ip() == ip("10.1.0.12")))
            .count() as u64;
        assert!(on_dip2 > 0);
        let mut new = core();
        let got = new.import(&saved, &vips(2), t).unwrap();
        assert_eq!(got.vip_gone, on_dip2);
        assert_eq!(got.conns, 30 - on_dip2);
        let mut none = core();
        let got = none.import(&saved, &Vips::new(), t).unwrap();
        assert_eq!((got.conns, got.vip_gone), (0, 30));
        // Twice the same records: the second time each is a duplicate.
        let got = new.import(&saved, &vips(2), t).unwrap();
        assert_eq!((got.conns, got.duplicate), (0, 30 - on_dip2));
    }

    #[test]
    fn a_snat_layout_that_does_not_fit_is_refused_whole() {
        let mut lb = core();
        let before: Vec<_> = lb.snat().unwrap().member_blocks().collect();
        let rec = CoreRecord {
            conns: Vec::new(),
            snat: Some(SnatRecord {
                members: vec![MemberRecord {
                    ip: ip("10.1.0.4"),
                    blocks: vec!["192.0.2.10:2001".parse().unwrap()],
                }],
                exhausted: 0,
            }),
        };
        let e = lb.import(&rec, &vips(1), 0).unwrap_err();
        assert!(e.to_string().contains("192.0.2.10:2001"), "{e}");
        let after: Vec<_> = lb.snat().unwrap().member_blocks().collect();
        assert_eq!(
            before
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
            after
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        );
    }
}
