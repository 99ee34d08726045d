//! The fast path's action: a cached flow's header transposition applied
//! to a packet, which is then queued on its output port.

use super::SwitchDrop;
use crate::flow::FlowAction;
use dataplane::worker::Ctx;
use dataplane::{PacketBuf, Parsed, rewrite};

/// A packet the switch cannot forward as it is, handed back untouched:
/// the caller answers it with an ICMP error or drops it.
pub(super) enum Bounce<B> {
    /// Its TTL or hop limit ran out.
    Ttl(B),
    /// It is larger than the output port's MTU (given).
    TooBig(B, u16),
    /// Rewritten for a flow that hairpins: it goes back into the switch,
    /// as from the wire ([`crate::flow::HAIRPIN_PORT`]).
    Hairpin(B),
    /// Rewritten for a flow to a remote endpoint: it goes in the tunnel of
    /// this tunnel port.
    Tunnel(B, u16),
    /// Its rewrite failed: dropped for this reason.
    Failed(B, SwitchDrop),
}

/// Why a flow's action was not applied to a packet.
pub(super) enum Stop {
    /// Its TTL or hop limit runs out here (the packet is untouched).
    Ttl,
    /// Its IP packet is larger than the output port's MTU (given; the
    /// packet is untouched).
    TooBig(u16),
    /// The rewrite failed.
    Failed(rewrite::RewriteError),
}

/// Checks a packet (`f`, parsed as `pk`) against a flow's action `a` and
/// rewrites it: TTL or hop limit, the output port's MTU (`mtu`, by port;
/// ports beyond it have none; a tunnel's is `tunnel_mtu`), then the MACs
/// and the compiled transposition (or the field-by-field NAT and TTL for
/// flows without one). What the fast path applies, and what a trace
/// shows.
#[inline(always)]
pub(super) fn check_and_rewrite(
    f: &mut [u8],
    pk: &Parsed,
    a: &FlowAction,
    mtu: &[u16],
    tunnel_mtu: Option<u16>,
) -> Result<(), Stop> {
    let limit = if super::overlay::is_tunnel(a.out_port) {
        tunnel_mtu
    } else {
        mtu.get(usize::from(a.out_port)).copied()
    };
    let too_big =
        |len: usize| limit.filter(|&m| len.saturating_sub(usize::from(pk.l3_off)) > usize::from(m));
    // The common frame (untagged IPv4 without options, with its
    // transport header) of a flow with a compiled transposition: its
    // bytes checked once, the TTL read once.
    if let Some(t) = &a.fast
        && pk.is_plain_ipv4()
    {
        let len = f.len();
        if let Some(h) = f.first_chunk_mut::<{ rewrite::PLAIN_REWRITE_LEN }>() {
            if h[rewrite::PLAIN_TTL_AT] <= 1 {
                return Err(Stop::Ttl);
            }
            if let Some(m) = too_big(len) {
                return Err(Stop::TooBig(m));
            }
            if let Some(macs) = h.first_chunk_mut::<12>() {
                a.write_macs(macs);
            }
            return t.apply_plain(h).map_err(Stop::Failed);
        }
    }
    if rewrite::hop_limit(f, pk).is_some_and(|t| t <= 1) {
        return Err(Stop::Ttl);
    }
    if let Some(m) = too_big(f.len()) {
        return Err(Stop::TooBig(m));
    }
    let r = match f.first_chunk_mut::<12>() {
        Some(macs) => {
            a.write_macs(macs);
            match a.fast {
                // A fragment after the first has no transport header: only
                // its addresses change.
                _ if pk.frag.is_later() => {
                    a.nat.apply_l3(f, pk).and_then(|_| rewrite::dec_ttl(f, pk))
                }
                // Addresses, ports, TTL, two checksum additions.
                Some(t) => t.apply(f, pk),
                None => a.nat.apply(f, pk).and_then(|_| rewrite::dec_ttl(f, pk)),
            }
        }
        None => Err(rewrite::RewriteError::Mismatch),
    };
    r.map_err(Stop::Failed)
}

/// Applies a flow's action to `pkt` ([`check_and_rewrite`]) and queues it
/// on the output port; a failed rewrite is handed back to be dropped. A packet whose
/// TTL or hop limit runs out here, or whose IP packet is larger than the
/// output port's MTU, is handed back untouched; one for a flow that
/// hairpins, or goes in a tunnel, rewritten. One copy, called where the
/// slow path has decided a new flow; a hit inlines [`transpose_hit`].
#[inline(never)]
pub(super) fn transpose<B: PacketBuf>(
    ctx: &mut Ctx<'_, B>,
    pkt: B,
    pk: &Parsed,
    a: &FlowAction,
    mtu: &[u16],
    tunnel_mtu: Option<u16>,
) -> Option<Bounce<B>> {
    transpose_hit(ctx, pkt, pk, a, mtu, tunnel_mtu)
}

/// [`transpose`], inlined wherever a hit is forwarded (`Switch::hit`, in
/// the burst's loop and in `Switch::packet`): a call per packet (its
/// argument set-up, prologue and epilogue) costs about 30 of a hit's
/// 640 instructions (docs/performance.md).
#[inline(always)]
pub(super) fn transpose_hit<B: PacketBuf>(
    ctx: &mut Ctx<'_, B>,
    mut pkt: B,
    pk: &Parsed,
    a: &FlowAction,
    mtu: &[u16],
    tunnel_mtu: Option<u16>,
) -> Option<Bounce<B>> {
    match check_and_rewrite(pkt.data_mut(), pk, a, mtu, tunnel_mtu) {
        Ok(()) if a.out_port == crate::flow::HAIRPIN_PORT => return Some(Bounce::Hairpin(pkt)),
        Ok(()) if super::overlay::is_tunnel(a.out_port) => {
            return Some(Bounce::Tunnel(pkt, a.out_port));
        }
        Ok(()) => ctx.send(usize::from(a.out_port), pkt),
        Err(Stop::Ttl) => return Some(Bounce::Ttl(pkt)),
        Err(Stop::TooBig(m)) => return Some(Bounce::TooBig(pkt, m)),
        Err(Stop::Failed(rewrite::RewriteError::TtlExpired)) => {
            return Some(Bounce::Failed(pkt, SwitchDrop::TtlExpired));
        }
        Err(Stop::Failed(_)) => return Some(Bounce::Failed(pkt, SwitchDrop::RewriteFailed)),
    }
    None
}

pub(super) const TCP_FIN: u8 = 0x01;

pub(super) const TCP_SYN: u8 = 0x02;

pub(super) const TCP_RST: u8 = 0x04;

pub(super) const TCP_ACK: u8 = 0x10;

pub(super) fn tcp_flags(frame: &[u8], p: &Parsed) -> u8 {
    if p.key.proto == 6 && p.has_l4 {
        frame.get(usize::from(p.l4_off) + 13).copied().unwrap_or(0)
    } else {
        0
    }
}
