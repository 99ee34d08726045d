//! Packet trace: what the switch decides for one frame, layer by layer,
//! without changing anything of the running workers.
//!
//! The trace runs the slow path itself (the same code the workers run, so
//! it cannot drift from them) on a scratch switch: the live policy
//! snapshot (VMs, groups, VIPs with their current backend health and
//! Maglev tables), its own empty flow and connection tables and counters.
//! The frame is therefore traced as the first packet of a connection, as
//! `ovs-appctl ofproto/trace` does without `--ct-next`. Each layer the
//! packet meets notes what it decided ([`TraceStep`]); the end is the
//! rewritten frame and its output port, an answer sent back, or the drop
//! reason the workers would count.
//!
//! The notes cost the workers one branch per layer of the slow path when
//! no trace is being taken (the fast path has none).

use super::fast::{Stop, check_and_rewrite};
use super::slow::Slow;
use super::{Switch, SwitchDrop};
use crate::flow::FlowAction;
use crate::policy::Policy;
use dataplane::{FlowKey, PacketBuf, Parsed, parse, rewrite, synproxy};
use lb::balancer::{ConnKind, Decision};

/// One layer's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceStep {
    /// The layer: `port`, `spoof`, `arp`, `nd`, `icmp`, `lb`, `route`,
    /// `snat`, `acl`, `conntrack`, `output`.
    pub layer: &'static str,
    /// What it decided and why, in words.
    pub detail: String,
}

/// Where a traced packet ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEnd {
    /// Sent out of port `out_port` (a tunnel port: encapsulated to its
    /// host; [`crate::flow::HAIRPIN_PORT`]: into the switch again, as
    /// from the wire) as `frame`.
    Forward {
        /// The output port.
        out_port: u16,
        /// The frame after the rewrite.
        frame: Vec<u8>,
    },
    /// Answered: `frame` goes back out of the port it came in on (ARP,
    /// neighbour advertisement, echo reply, the SYN proxy's segments, an
    /// ICMP error).
    Back {
        /// The answer.
        frame: Vec<u8>,
    },
    /// Dropped, counted under this reason.
    Drop(SwitchDrop),
    /// Not parsed: the worker counts it as malformed for this reason.
    Malformed(String),
}

/// A packet's trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The flow key the switch parsed (`None`: not parsed).
    pub key: Option<FlowKey>,
    /// Each layer's decision, in order.
    pub steps: Vec<TraceStep>,
    /// Where it ends.
    pub end: TraceEnd,
}

/// The sizes of a scratch switch's tables: a trace needs a handful of
/// entries.
const SCRATCH_ENTRIES: usize = 64;

impl<B: PacketBuf> Switch<B> {
    /// A switch for tracing on the live policy `policy` with the workers'
    /// tunables `cfg` (port MTUs, timeouts, SYN cookies) and tables just
    /// large enough for a trace.
    pub fn scratch(
        policy: std::sync::Arc<arc_swap::ArcSwap<Policy>>,
        cfg: &super::SwitchConfig,
    ) -> Self {
        let cfg = super::SwitchConfig {
            flow_table_size: SCRATCH_ENTRIES,
            conn_table_size: SCRATCH_ENTRIES,
            frag_table_size: SCRATCH_ENTRIES,
            ..cfg.clone()
        };
        let mut s = Switch::new(policy, cfg);
        s.load_policy();
        s
    }

    /// Notes `detail()` for `layer` when a trace is being taken.
    #[inline]
    pub(super) fn note(&self, layer: &'static str, detail: impl FnOnce() -> String) {
        if let Ok(mut t) = self.trace.try_borrow_mut() {
            if let Some(t) = t.as_mut() {
                t.push(TraceStep {
                    layer,
                    detail: detail(),
                });
            }
        }
    }

    /// Traces the frame in `pkt` arriving on port `in_port` (see the
    /// module's documentation). Meant for a [`Switch::scratch`]: the
    /// switch's tables and counters take the packet in as a worker's
    /// would.
    pub fn trace(&mut self, mut pkt: B, in_port: u16) -> Trace {
        let p = self.policy.load_full();
        if p.generation != self.generation {
            self.load_policy();
        }
        let pk = match parse(pkt.data(), in_port) {
            Ok(pk) => pk,
            Err(e) => {
                return Trace {
                    key: None,
                    steps: Vec::new(),
                    end: TraceEnd::Malformed(e.to_string()),
                };
            }
        };
        *self.trace.borrow_mut() = Some(Vec::new());
        let end = if pk.frag.is_later() {
            self.note("port", || {
                "a fragment after the first: it takes its first fragment's decision, which \
                 this trace has not seen"
                    .into()
            });
            TraceEnd::Drop(SwitchDrop::FragNoFirst)
        } else {
            let now = self.clock.ticks_to_ns(self.clock.now());
            match self.slow(&p, pkt.data_mut(), &pk, in_port, now) {
                Ok(Slow::Forward(a)) => self.trace_out(pkt, &pk, &a),
                Ok(Slow::ProxySyn(a, seg, _)) => {
                    self.note("lb", || {
                        format!(
                            "the SYN proxy sends the backend a SYN of its own (seq {})",
                            seg.seq
                        )
                    });
                    let syn = synproxy::write(&mut pkt, &pk, synproxy::Way::Onward, &seg)
                        .ok()
                        .and_then(|()| parse(pkt.data(), in_port).ok());
                    match syn {
                        Some(sp) => self.trace_out(pkt, &sp, &a),
                        None => TraceEnd::Drop(SwitchDrop::RewriteFailed),
                    }
                }
                Ok(Slow::Reply) => TraceEnd::Back {
                    frame: pkt.data().to_vec(),
                },
                Ok(Slow::Advert(mac)) => match rewrite::neighbor_advert(&mut pkt, &pk, mac) {
                    Ok(()) => TraceEnd::Back {
                        frame: pkt.data().to_vec(),
                    },
                    Err(_) => TraceEnd::Drop(SwitchDrop::RewriteFailed),
                },
                Ok(Slow::Segment(mac, seg) | Slow::ProxyAck(mac, seg, _)) => {
                    self.note("lb", || {
                        format!(
                            "the SYN proxy answers from {mac}: flags {:#04x}, seq {}, ack {}",
                            seg.flags, seg.seq, seg.ack
                        )
                    });
                    match synproxy::write(&mut pkt, &pk, synproxy::Way::Back(mac), &seg) {
                        Ok(()) => TraceEnd::Back {
                            frame: pkt.data().to_vec(),
                        },
                        Err(_) => TraceEnd::Drop(SwitchDrop::RewriteFailed),
                    }
                }
                Err(why) => TraceEnd::Drop(why),
            }
        };
        let steps = self.trace.borrow_mut().take().unwrap_or_default();
        Trace {
            key: Some(pk.key),
            steps,
            end,
        }
    }

    /// The end of a packet forwarded with action `a`: its rewrite applied
    /// as the fast path applies it, or why it goes no further.
    fn trace_out(&self, mut pkt: B, pk: &Parsed, a: &FlowAction) -> TraceEnd {
        let mtu = &self.cfg.port_mtu;
        match check_and_rewrite(pkt.data_mut(), pk, a, mtu, self.tunnel_mtu) {
            Ok(()) => TraceEnd::Forward {
                out_port: a.out_port,
                frame: pkt.data().to_vec(),
            },
            Err(Stop::Ttl) => {
                self.note("output", || {
                    "the TTL or hop limit runs out here: answered with ICMP time exceeded \
                     (within the ICMP rate)"
                        .into()
                });
                TraceEnd::Drop(SwitchDrop::TtlExpired)
            }
            Err(Stop::TooBig(m)) => {
                self.note("output", || {
                    format!(
                        "larger than the output port's MTU {m}: answered with \"fragmentation \
                         needed\" or \"packet too big\" when it may not be fragmented \
                         (within the ICMP rate)"
                    )
                });
                TraceEnd::Drop(SwitchDrop::TooBig)
            }
            Err(Stop::Failed(rewrite::RewriteError::TtlExpired)) => {
                TraceEnd::Drop(SwitchDrop::TtlExpired)
            }
            Err(Stop::Failed(_)) => TraceEnd::Drop(SwitchDrop::RewriteFailed),
        }
    }

    /// Notes what the load balancer decided (`d`) for a packet of vnet
    /// `vn` with key `key`.
    pub(super) fn note_lb(&self, p: &Policy, vn: usize, key: &FlowKey, d: &Option<Decision>) {
        if self.trace.try_borrow().is_ok_and(|t| t.is_none()) {
            return;
        }
        let vnet = p.vnets.get(vn).map_or("?", |v| v.name.as_str());
        let detail = match d {
            None | Some(Decision::NotHandled) => {
                format!(
                    "vnet {vnet}: no VIP at {}, no connection tracked",
                    fmt_dst(key)
                )
            }
            Some(Decision::Drop(r)) => format!("dropped by the load balancer: {}", r.name()),
            Some(Decision::Cookie { .. }) => {
                "a SYN to a VIP under a SYN flood: answered with a SYN cookie".into()
            }
            Some(Decision::ProxyAck { .. }) => {
                "the backend's SYN-ACK of a SYN-proxied connection: the proxy answers it".into()
            }
            Some(Decision::Forward { conn, new, .. } | Decision::ProxySyn { conn, new, .. }) => {
                let c = self.lb.get(vn).and_then(|l| l.conn(*conn));
                let age = if *new {
                    "a new connection"
                } else {
                    "a tracked connection"
                };
                match c.map(|c| &c.value.kind) {
                    Some(ConnKind::Dnat { vip, backend, port }) => {
                        let c = vip.config();
                        let (slot, fallback) = vip.slot_of(key);
                        let idx = vip.backend_index(*backend, *port);
                        let vm = p
                            .vm_by_addr(vn, dataplane::key::to16(*backend))
                            .map_or(String::new(), |(_, v)| format!(" (VM {})", v.name));
                        let health = match idx {
                            Some(i) if vip.is_healthy(i) => "healthy",
                            Some(_) => "unhealthy",
                            None => "no longer configured",
                        };
                        format!(
                            "{age} to VIP {} {}:{}/{} (mode {}, distribution {:?}): Maglev \
                             slot {slot} of {}{} -> backend {backend}:{port}{vm}, {health}",
                            c.name,
                            c.addr,
                            c.port,
                            proto_name(c.proto),
                            c.mode.name(),
                            c.distribution,
                            c.table_size,
                            if fallback {
                                " (no healthy backend: the table of all backends)"
                            } else {
                                ""
                            },
                        )
                    }
                    Some(ConnKind::Snat {
                        public,
                        port,
                        inbound,
                    }) => format!(
                        "{age} of vnet {vnet} through SNAT address {public}:{port}{}",
                        if *inbound {
                            " (opened from the wire)"
                        } else {
                            ""
                        }
                    ),
                    Some(ConnKind::Plain { .. }) => {
                        format!("{age} of vnet {vnet} without NAT")
                    }
                    None => format!("{age} (not found again in the connection table)"),
                }
            }
        };
        self.note("lb", || detail);
    }
}

/// `ip:port/proto` of `key`'s destination.
fn fmt_dst(key: &FlowKey) -> String {
    format!("{}:{}/{}", key.dst(), key.dst_port, proto_name(key.proto))
}

/// The protocol's name.
pub(super) fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}
