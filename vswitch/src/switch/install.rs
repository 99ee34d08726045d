//! Installing a decision: the flow of each direction, with its VIP stamp;
//! the forward flow with its compiled rewrite (the reverse flow's is
//! compiled at its first hit).

use super::Switch;
use crate::flow::{FlowAction, FlowEntry, LbRef};
use crate::policy::{NO_VIP, Policy};
use dataplane::{FlowKey, PacketBuf};
use lb::conntrack::Dir;
use lb::nat::Rewrite;

impl<B: PacketBuf> Switch<B> {
    /// Installs `fwd` for `key` arriving on `in_port`, and — for a stateful allow or a tracked
    /// connection — `back` (its ports and MACs; the NAT is derived here) for
    /// the reverse of `post` arriving on `fwd`'s output port (a hairpinned
    /// packet's reply comes back in on [`crate::flow::HAIRPIN_PORT`] too).
    /// Returns `fwd` compiled for `key`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        &mut self,
        p: &Policy,
        now: u64,
        in_port: u16,
        key: FlowKey,
        fwd: FlowAction,
        post: &FlowKey,
        back: FlowAction,
        stateful: bool,
    ) -> FlowAction {
        let gen_ = p.generation;
        // The reverse flow's index bucket is a cache miss of its own:
        // start loading it now, to arrive while the forward flow installs.
        let back_key = post.reversed();
        // (Nothing comes back through a Mux's tunnel to a DIP: see below.)
        let back_flow = (stateful || fwd.lb.is_some())
            && !(super::overlay::is_tunnel(fwd.out_port) && p.vm_on_port(fwd.out_port).is_none());
        let back_hash = back_flow.then(|| self.flows.hash(fwd.out_port, &back_key));
        if let Some(h) = back_hash {
            self.flows.prefetch_bucket(h);
        }
        // The VIP of the connection, if load-balanced, and its epoch as this
        // worker last read it (never newer than what decided the
        // connection: at worst the flow is revalidated once more).
        let conn = fwd
            .lb
            .and_then(|r| self.lb.get(r.vnet as usize)?.conn(r.conn));
        let (vip, vip_epoch) = conn
            .and_then(|c| match &c.value.kind {
                lb::balancer::ConnKind::Dnat { vip, .. } => Some(vip.id()),
                _ => None,
            })
            .and_then(|id| Some((id, *self.vip_epochs.get(usize::from(id))?)))
            .unwrap_or((NO_VIP, 0));
        // The reverse direction gets the opposite rewrite of the connection,
        // made before the forward flow is stored: the copy of the rewrite,
        // read back in parts, would otherwise wait for the store buffer to
        // drain the forward flow's stores to cold lines. It is compiled
        // (`FlowAction::compiled_for`) at its first hit, in `Switch::hit`
        // (installed due: see below): many connections never get a reply
        // (a SYN flood's, a scan's), and one that does pays the same then.
        let back = back_flow.then(|| {
            let (nat, lb) = match fwd.lb {
                Some(r) => {
                    let orig = r.dir == Dir::Orig;
                    let nat = conn
                        .map(|c| {
                            if orig {
                                c.value.nat.reverse
                            } else {
                                c.value.nat.forward
                            }
                        })
                        .unwrap_or_default();
                    let dir = if orig { Dir::Reply } else { Dir::Orig };
                    (nat, Some(LbRef { dir, ..r }))
                }
                None => (Rewrite::NONE, None),
            };
            FlowAction {
                nat,
                lb,
                fast: None,
                ..back
            }
        });
        // A closing connection's flows (its last packets, decided again
        // after a policy change) expire as closing ones do.
        let closing = conn.is_some_and(|c| c.state.is_closing());
        // For the flow log: the rules that decided, and which side opened
        // the connection (the packet's, unless it belongs to a tracked
        // connection's replies).
        let decided = self.decided.get();
        let opened = fwd.lb.is_none_or(|r| r.dir == Dir::Orig);
        // A flow's first hit tells the load balancer (a reply's first
        // packet confirms its connection; a Mux's one-way connection is
        // confirmed by the client's first hit): the forward flow, which
        // counts the packet being decided, is installed as due for it. So
        // is the reverse flow, whose rewrite that hit compiles: a new one's
        // first hit is due anyway, a replaced one (a connection decided
        // again) keeps its packet count and would otherwise wait a touch
        // interval.
        let every = self.lb_touch_ns;
        let e = |action, (packets, bytes)| FlowEntry {
            action,
            generation: gen_,
            vip,
            vip_epoch,
            last_seen: now,
            lb_touched: FlowEntry::lb_stamp(now, every, true),
            packets,
            bytes,
            closing,
        };
        // (Rules of generation 0: the groups were not consulted; a flow
        // decided again so keeps its own.)
        let meta = |initiator| crate::flow::FlowMeta {
            rules: decided.rules,
            rules_gen: if decided.judged { gen_ } else { 0 },
            initiator,
            reported: crate::flow::Reported {
                from: now,
                ..Default::default()
            },
        };
        let fwd = fwd.compiled_for(&key);
        // The packet being decided is the forward flow's first; its hash
        // was computed for its lookup (`first_hash`: the flow of the packet
        // `Switch::packet` is deciding is of its key).
        let first = (1, self.first_len);
        let (hash, absent) = match self.first_hash.take() {
            Some((port, h, absent)) if port == in_port => (h, absent),
            _ => (self.flows.hash(in_port, &key), false),
        };
        if self
            .flows
            .insert_hashed(hash, in_port, key, e(fwd, first), meta(opened), absent)
            == crate::flow::Insert::New
        {
            dataplane::stats::add_own(&self.stats.flows_installed, 1);
        }
        // Only stateful allows and tracked connections get a reverse flow;
        // nothing comes back through a Mux's tunnel to a DIP (its replies go
        // straight to the client).
        let (Some(back), Some(back_hash)) = (back, back_hash) else {
            return fwd;
        };
        if self.flows.insert_hashed(
            back_hash,
            fwd.out_port,
            back_key,
            e(back, (0, 0)),
            meta(!opened),
            false,
        ) == crate::flow::Insert::New
        {
            dataplane::stats::add_own(&self.stats.flows_installed, 1);
        }
        fwd
    }
}
