//! The overlay and the underlay on the switch's side: tunnel packets
//! taken out of their tunnel as they arrive on the uplink (`decap`, before
//! the burst is parsed), packets to a remote endpoint put in its vnet's
//! tunnel as they leave (`encap_send`), and the ARP of the uplink's own
//! address (answered; what it says of the neighbours passed to the
//! control thread's cache, whose requests worker 0 sends).

use super::{Switch, SwitchDrop};
use crate::policy::{Policy, TUNNEL_PORT_BASE};
use dataplane::tunnel;
use dataplane::wire::arp;
use dataplane::worker::Ctx;
use dataplane::{PacketBuf, Parsed, rewrite};
use std::net::Ipv4Addr;

/// ARP requests worker 0 sends per poll at most.
const ARP_SENDS_PER_POLL: usize = 8;

impl<B: PacketBuf> Switch<B> {
    /// Takes a packet that arrived on the uplink out of its tunnel, when
    /// it is one (VXLAN or Geneve to the uplink's address): `Ok(Some(port))`,
    /// the tunnel port of the remote endpoint that sent it, with the outer
    /// headers stripped; `Ok(None)` for any other packet. The VNI names the
    /// vnet, the inner source must be a remote endpoint of that vnet, and
    /// the outer source its host.
    pub(super) fn decap(&self, p: &Policy, pkt: &mut B) -> Result<Option<u16>, SwitchDrop> {
        if p.has_dsr()
            && let Some(port) = self.decap_dsr(p, pkt)?
        {
            return Ok(Some(port));
        }
        let Some((_, ul)) = p.underlay().filter(|_| p.has_overlay()) else {
            return Ok(None);
        };
        let d = match tunnel::peek(pkt.data(), ul.address.addr()) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(_) => return Err(SwitchDrop::TunnelMalformed),
        };
        let vnet = p.vnet_by_vni(d.vni).ok_or(SwitchDrop::TunnelUnknownVni)?;
        let inner = pkt.data().get(d.inner..d.end).unwrap_or_default();
        let src = tunnel::inner_source(inner).ok_or(SwitchDrop::TunnelUnknownSource)?;
        let (_, vm) = p
            .vm_by_addr(vnet, dataplane::key::to16(src))
            .ok_or(SwitchDrop::TunnelUnknownSource)?;
        // (A local VM's address coming out of a tunnel is as unknown.)
        let t = p.tunnel(vm.port).ok_or(SwitchDrop::TunnelUnknownSource)?;
        if t.host != d.src {
            return Err(SwitchDrop::TunnelSpoofed);
        }
        let trailer = pkt.len().saturating_sub(d.end);
        pkt.trim(trailer)
            .and_then(|()| pkt.adj(d.inner))
            .map_err(|_| SwitchDrop::TunnelMalformed)?;
        dataplane::stats::add_own(&self.stats.tunnel_rx, 1);
        Ok(Some(vm.port))
    }

    /// Takes a Mux's packet (IP in IP to the address of a DSR VIP's
    /// backend) out of its outer header: `Ok(Some(port))`, the backend's
    /// DSR port, the inner packet now in an Ethernet frame to the
    /// backend's MAC; `Ok(None)` for any other packet (IP in IP to another
    /// address included: not this host's to take). Its outer source must
    /// be one of the uplink's Muxes (`tunnel_spoofed`).
    fn decap_dsr(&self, p: &Policy, pkt: &mut B) -> Result<Option<u16>, SwitchDrop> {
        let d = match tunnel::peek_ipip(pkt.data()) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(_) => return Err(SwitchDrop::TunnelMalformed),
        };
        let Some((port, vm)) = p.dsr_backend(d.dst) else {
            return Ok(None);
        };
        let mux = p
            .underlay()
            .is_some_and(|(_, ul)| ul.muxes.iter().any(|n| n.contains(&d.src)));
        if !mux {
            return Err(SwitchDrop::TunnelSpoofed);
        }
        tunnel::decap_ipip(pkt, &d, vm.mac).map_err(|_| SwitchDrop::TunnelMalformed)?;
        dataplane::stats::add_own(&self.stats.dsr_rx, 1);
        Ok(Some(port))
    }

    /// Puts `pkt` (its inner frame ready) in the tunnel of tunnel port
    /// `port` and sends it out of the uplink, from UDP source port `sport`.
    /// While the next hop towards the remote host is being resolved the
    /// packet is dropped (`neighbor_unresolved`) and the control thread is
    /// told.
    pub(super) fn encap_send(
        &self,
        ctx: &mut Ctx<'_, B>,
        p: &Policy,
        port: u16,
        mut pkt: B,
        sport: u16,
    ) {
        let (Some(t), Some(up)) = (p.tunnel(port), p.uplink.as_ref()) else {
            return self.drop_pkt(pkt, SwitchDrop::NoRoute);
        };
        let Some(outer) = t.outer else {
            if let Some(hop) = t.next_hop {
                self.want(hop);
                return self.drop_pkt(pkt, SwitchDrop::NeighborUnresolved);
            }
            return self.drop_pkt(pkt, SwitchDrop::NoRoute);
        };
        match tunnel::encap(&mut pkt, &outer, sport) {
            Ok(()) => {
                let n = if outer.encap == tunnel::Encap::Ipip {
                    &self.stats.mux_tx
                } else {
                    &self.stats.tunnel_tx
                };
                dataplane::stats::add_own(n, 1);
                ctx.send(usize::from(up.port), pkt);
            }
            Err(_) => self.drop_pkt(pkt, SwitchDrop::RewriteFailed),
        }
    }

    /// Sends a packet the switch answered with (ARP, ICMP, a SYN proxy's
    /// segment) back through the tunnel of `port`.
    pub(super) fn send_back_tunnel(&self, ctx: &mut Ctx<'_, B>, port: u16, pkt: B) {
        let p = self.policy.load();
        let sport = tunnel::ENTROPY_BASE | (port & 0x3fff);
        self.encap_send(ctx, &p, port, pkt, sport);
    }

    /// Tells the control thread's neighbour cache that a packet waits for
    /// `hop`'s MAC.
    pub(super) fn want(&self, hop: Ipv4Addr) {
        if let Some(m) = &self.neigh {
            // (A full mailbox: the cache hears of it from the next packet.)
            let _ = m.wanted.push(hop);
        }
    }

    /// An ARP packet from the wire about the uplink's own address: a
    /// request is answered, and what it or a reply says of its sender goes
    /// to the neighbour cache (only a request for the uplink's address may
    /// create an entry; a reply or an announcement only fills or updates
    /// one the cache has). `Ok(true)`: answered in place; `Ok(false)`:
    /// taken in (counted as `arp_to_cache`).
    pub(super) fn underlay_arp(
        &self,
        p: &Policy,
        frame: &mut [u8],
        pk: &Parsed,
    ) -> Option<Result<bool, SwitchDrop>> {
        let (up, ul) = p.underlay()?;
        let a = arp::Packet::new_checked(frame.get(usize::from(pk.l3_off)..)?).ok()?;
        let me = ul.address.addr();
        let (sender, smac, target) = (a.sender_ip(), a.sender_mac(), a.target_ip());
        let op = a.operation();
        let for_me = target == me;
        let gratuitous = sender == target && sender != me;
        if !for_me && !gratuitous {
            return None;
        }
        if sender == me {
            // Another host claims this host's address.
            return Some(Err(SwitchDrop::Spoofed));
        }
        if let Some(m) = &self.neigh
            && ul.on_link(sender)
        {
            let _ = m
                .learned
                .push((sender, smac, op == arp::OP_REQUEST && for_me));
        }
        if op == arp::OP_REQUEST && for_me {
            return Some(
                rewrite::arp_reply(frame, pk, up.mac)
                    .map(|()| {
                        dataplane::stats::add_own(&self.stats.arp_replies, 1);
                        true
                    })
                    .map_err(|_| SwitchDrop::RewriteFailed),
            );
        }
        Some(Ok(false))
    }

    /// Sends the ARP requests the neighbour cache asked for (worker 0, the
    /// one with a buffer source); returns how many.
    pub(super) fn send_arp_requests(&mut self, ctx: &mut Ctx<'_, B>) -> usize {
        let (Some(m), Some(alloc)) = (self.neigh.as_ref(), self.alloc.as_mut()) else {
            return 0;
        };
        if m.send.is_empty() {
            return 0;
        }
        let p = self.policy.load();
        let Some((up, ul)) = p.underlay() else {
            while m.send.pop().is_some() {}
            ctx.note_work();
            return 0;
        };
        let mut n = 0;
        while n < ARP_SENDS_PER_POLL && !m.send.is_empty() {
            // The buffer first: a request waits in the queue (for the next
            // poll) while the pool has none, rather than being lost.
            let Some(mut pkt) = alloc() else { break };
            let Some((target, to)) = m.send.pop() else {
                break;
            };
            if tunnel::arp_request(&mut pkt, up.mac, ul.address.addr(), target, to).is_ok() {
                ctx.send(usize::from(up.port), pkt);
                dataplane::stats::add_own(&self.stats.arp_requests, 1);
                n += 1;
            }
        }
        n
    }
}

/// True for a tunnel port.
#[inline]
pub(super) fn is_tunnel(port: u16) -> bool {
    port >= TUNNEL_PORT_BASE && port != crate::flow::HAIRPIN_PORT
}
