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
use crossbeam_queue::ArrayQueue;
use dataplane::capture::{Spec, Trigger};
use dataplane::{FlowKey, PacketBuf, Parsed, parse, rewrite, synproxy};
use lb::balancer::{ConnKind, Decision};
use std::sync::atomic::{AtomicU64, Ordering};

/// One layer's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceStep {
    /// The layer: `port`, `spoof`, `arp`, `nd`, `icmp`, `lb`, `route`,
    /// `acl`, `output`; live traces also `flow` (a cached flow's hit),
    /// `drop`, `handoff` and `frag` (a later fragment held for its first).
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
            // (A trace takes no packet in through the hold.)
            frag_hold: 0,
            preallocate: false,
            ..cfg.clone()
        };
        let mut s = Switch::new(policy, cfg);
        s.load_policy();
        s
    }

    /// Notes `detail()` for `layer` when a trace is being taken. (The
    /// test inlined, the rest not: the slow path calls this at every
    /// step, and its packets are almost never traced.)
    #[inline(always)]
    pub(super) fn note(&self, layer: &'static str, detail: impl FnOnce() -> String) {
        if self.noting() {
            self.push_note(layer, detail());
        }
    }

    /// Whether a trace is being taken.
    #[inline(always)]
    fn noting(&self) -> bool {
        self.trace.try_borrow().is_ok_and(|t| t.is_some())
    }

    #[cold]
    #[inline(never)]
    fn push_note(&self, layer: &'static str, detail: String) {
        if let Ok(mut t) = self.trace.try_borrow_mut()
            && let Some(t) = t.as_mut()
        {
            t.push(TraceStep { layer, detail });
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
                 this trace has not seen (a worker holds it a while for its first, and \
                 drops it if that does not come)"
                    .into()
            });
            TraceEnd::Drop(SwitchDrop::FragNoFirst)
        } else {
            let now = self.clock.ticks_to_ns(self.clock.now());
            self.first_len = u64::from(pk.ip_len());
            match self.slow(&p, pkt.data_mut(), &pk, in_port, now) {
                Ok(Slow::Forward(a)) => self.trace_out(&p, pkt, &pk, &a),
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
                        Some(sp) => self.trace_out(&p, pkt, &sp, &a),
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
    /// as the fast path applies it, or why it goes no further (with the
    /// ICMP error that answers it, as a worker answers it).
    fn trace_out(&mut self, p: &Policy, mut pkt: B, pk: &Parsed, a: &FlowAction) -> TraceEnd {
        let mtu = &self.cfg.port_mtu;
        let (why, mtu) = match check_and_rewrite(pkt.data_mut(), pk, a, mtu, self.tunnel_mtu) {
            Ok(()) => {
                return TraceEnd::Forward {
                    out_port: a.out_port,
                    frame: pkt.data().to_vec(),
                };
            }
            Err(Stop::Ttl) => {
                self.note("output", || "the TTL or hop limit runs out here".into());
                (SwitchDrop::TtlExpired, None)
            }
            Err(Stop::TooBig(m)) => {
                self.note("output", || {
                    format!("larger than the output port's MTU {m}")
                });
                (SwitchDrop::TooBig, Some(m))
            }
            Err(Stop::Failed(rewrite::RewriteError::TtlExpired)) => {
                return TraceEnd::Drop(SwitchDrop::TtlExpired);
            }
            Err(Stop::Failed(_)) => return TraceEnd::Drop(SwitchDrop::RewriteFailed),
        };
        let now = self.clock.ticks_to_ns(self.clock.now());
        if self.icmp_error(p, &mut pkt, pk, mtu, now) {
            self.note("output", || {
                "answered with an ICMP error from the switch (within the ICMP rate)".into()
            });
            TraceEnd::Back {
                frame: pkt.data().to_vec(),
            }
        } else {
            TraceEnd::Drop(why)
        }
    }

    /// Notes what the load balancer decided (`d`) for a packet of vnet
    /// `vn` with key `key`.
    #[inline(always)]
    pub(super) fn note_lb(&self, p: &Policy, vn: usize, key: &FlowKey, d: &Option<Decision>) {
        if self.noting() {
            self.note_lb_now(p, vn, key, d);
        }
    }

    #[cold]
    #[inline(never)]
    fn note_lb_now(&self, p: &Policy, vn: usize, key: &FlowKey, d: &Option<Decision>) {
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
                "a SYN to a VIP whose SYN proxy answers it: answered with a SYN cookie (a \
                 pending connection's own, when its client sends its SYN again)"
                    .into()
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

/// A rewrite's address and port changes, in words (empty for none).
pub(super) fn fmt_nat(n: &lb::nat::Rewrite) -> String {
    let mut s = String::new();
    if let Some((a, p)) = n.src {
        s += &format!(", source to {a}:{p}");
    }
    if let Some((a, p)) = n.dst {
        s += &format!(", destination to {a}:{p}");
    }
    s
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

/// Where a live-traced packet went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveEnd {
    /// Sent out of this port (a tunnel port: encapsulated;
    /// [`crate::flow::HAIRPIN_PORT`]: into the switch again).
    Out(u16),
    /// Answered out of the port it came in on.
    Back,
    /// Dropped for this reason.
    Drop(SwitchDrop),
    /// Handed to this worker, which owns its connection (not traced
    /// there).
    Handed(usize),
    /// A later fragment held for its first fragment, which has not come
    /// yet (it goes on with its first, or is dropped after the hold time).
    Held,
}

/// One packet of live traffic, traced.
#[derive(Debug, Clone)]
pub struct LiveRecord {
    /// When the worker's burst began (its clock's ticks).
    pub ticks: u64,
    /// The worker.
    pub worker: usize,
    /// The input port.
    pub in_port: u16,
    /// The frame as it arrived (up to the snap length).
    pub frame: Vec<u8>,
    /// Each layer's decision.
    pub steps: Vec<TraceStep>,
    /// Where it went (`None`: the switch did not say).
    pub end: Option<LiveEnd>,
}

/// Live trace, as VPP's `trace add`: the next packets received from the
/// ports that a [`Trigger`] selects are traced layer by layer by the
/// workers that handle them (a cached flow's hit, or the slow path's
/// layers), and their records queued for the control thread (at most the
/// queue's size; more are counted as missed). Off, it costs a worker one
/// load per burst, and nothing per packet; a traced packet
/// costs allocations (its notes), which is why the count is bounded.
pub struct LiveTrace {
    /// When it is on, and for which packets.
    pub trigger: Trigger,
    out: ArrayQueue<LiveRecord>,
    traced: AtomicU64,
    missed: AtomicU64,
}

impl LiveTrace {
    /// An idle live trace holding up to `records` records unread.
    pub fn new(records: usize) -> std::sync::Arc<LiveTrace> {
        std::sync::Arc::new(LiveTrace {
            trigger: Trigger::default(),
            out: ArrayQueue::new(records.max(1)),
            traced: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        })
    }

    /// Traces the next `count` packets `spec` selects, until the worker
    /// clock reads `deadline`; what an earlier trace left unread goes.
    pub fn arm(&self, spec: Spec, count: u64, deadline: u64) {
        self.trigger.disarm();
        while self.out.pop().is_some() {}
        self.traced.store(0, Ordering::Relaxed);
        self.missed.store(0, Ordering::Relaxed);
        self.trigger.arm(spec, count, deadline);
    }

    /// Packets traced so far.
    pub fn traced(&self) -> u64 {
        self.traced.load(Ordering::Relaxed)
    }

    /// Packets traced while the queue was full: their records were lost.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// Takes the records waiting.
    pub fn take(&self, out: &mut Vec<LiveRecord>) {
        while let Some(r) = self.out.pop() {
            out.push(r);
        }
    }

    fn push(&self, r: LiveRecord) {
        match self.out.push(r) {
            Ok(()) => self.traced.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.missed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

impl<B: PacketBuf> Switch<B> {
    /// Traces live traffic for `live` (see [`LiveTrace`]) as worker
    /// `worker`.
    pub fn with_live_trace(mut self, worker: usize, live: std::sync::Arc<LiveTrace>) -> Self {
        self.live = Some((worker, live));
        self
    }

    /// [`Switch::packet`] for a packet the live trace selected: its notes
    /// and end are recorded.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn packet_live(
        &mut self,
        live: &LiveTrace,
        spec: &Spec,
        ctx: &mut dataplane::worker::Ctx<'_, B>,
        policy: &Policy,
        in_port: usize,
        pkt: B,
        now: u64,
        tally: &mut (u64, u64, u64),
        pre: super::Pre<'_>,
    ) {
        let frame = pkt
            .data()
            .get(..spec.snaplen)
            .unwrap_or(pkt.data())
            .to_vec();
        *self.trace.borrow_mut() = Some(Vec::new());
        self.tracing = true;
        self.live_end.set(None);
        let (pk, hash, _) = pre;
        let key = pk.key;
        self.packet(ctx, policy, in_port, pkt, now, false, tally, Some(pre));
        // (The record made below is not the slow path's.)
        self.slow_run.close(&self.clock);
        // Every other way through the switch notes where the packet went:
        // without a word, it took its cached flow (the fast path has no
        // trace test of its own). A later fragment took its first
        // fragment's flow, which is not looked up again here: its end is
        // left unknown.
        if self.live_end.get().is_none() {
            let found = if pk.frag.is_later() {
                None
            } else {
                self.flows
                    .entry_for(None, hash, in_port as u16, &key)
                    .map(|e| *e)
            };
            match found {
                Some(e) => self.live_note(LiveEnd::Out(e.action.out_port), "flow", || {
                    format!(
                        "a cached flow (decided under generation {}), its packet {}: MACs {} > \
                         {}{}",
                        e.generation,
                        e.packets,
                        e.action.src_mac,
                        e.action.dst_mac,
                        fmt_nat(&e.action.nat)
                    )
                }),
                None => self.note("flow", || "a cached flow".into()),
            }
        }
        self.tracing = false;
        let steps = self.trace.borrow_mut().take().unwrap_or_default();
        live.push(LiveRecord {
            ticks: ctx.now(),
            worker: self.live.as_ref().map_or(0, |(w, _)| *w),
            in_port: in_port as u16,
            frame,
            steps,
            end: self.live_end.take(),
        });
    }

    /// Notes where a live-traced packet goes: `end`, and why in words.
    pub(super) fn live_note(
        &self,
        end: LiveEnd,
        layer: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        if self.tracing {
            self.live_end.set(Some(end));
            self.note(layer, detail);
        }
    }

    /// Notes a slow-path decision's end for a live-traced packet.
    pub(super) fn live_decided(&self, d: &Result<Slow, SwitchDrop>) {
        if !self.tracing {
            return;
        }
        match d {
            Ok(Slow::Forward(a) | Slow::ProxySyn(a, ..)) => {
                let a = *a;
                self.live_note(LiveEnd::Out(a.out_port), "output", || {
                    format!(
                        "the flow's action: MACs {} > {}{}; installed for the connection's \
                         next packets if the flow table has room",
                        a.src_mac,
                        a.dst_mac,
                        fmt_nat(&a.nat)
                    )
                });
            }
            Ok(_) => self.live_note(LiveEnd::Back, "output", || {
                "answered out of the port it came in on".into()
            }),
            Err(_) => {}
        }
    }
}
