//! The responders: ARP and IPv6 neighbour discovery answered in place with
//! the gateway MAC (nothing is flooded).

use super::{Slow, Switch, SwitchDrop};
use crate::policy::Policy;
use dataplane::wire::arp;
use dataplane::{PacketBuf, Parsed, rewrite};

impl<B: PacketBuf> Switch<B> {
    /// Answers an ARP request for any address of the vnet or any of its VIPs
    /// (any address at all for an internal endpoint) with the gateway MAC,
    /// rewriting the request into the reply in place.
    pub(super) fn arp(
        &self,
        p: &Policy,
        (vm_id, vm): (usize, &crate::policy::Vm),
        frame: &mut [u8],
        pk: &Parsed,
    ) -> Result<(), SwitchDrop> {
        let internal = vm.internal;
        let vn = p.vnets.get(vm.vnet).ok_or(SwitchDrop::NoRoute)?;
        let l3 = frame
            .get(usize::from(pk.l3_off)..)
            .ok_or(SwitchDrop::ArpIgnored)?;
        let a = arp::Packet::new_checked(l3).map_err(|_| SwitchDrop::ArpIgnored)?;
        if a.operation() != arp::OP_REQUEST {
            return Err(SwitchDrop::ArpIgnored);
        }
        if !p.vm_owns(
            vm_id,
            dataplane::key::to16(std::net::IpAddr::V4(a.sender_ip())),
        ) {
            return Err(SwitchDrop::Spoofed);
        }
        let target = std::net::IpAddr::V4(a.target_ip());
        if !internal && !vn.contains(&target) && !vn.vips.has_address(target) {
            return Err(SwitchDrop::ArpIgnored);
        }
        rewrite::arp_reply(frame, pk, vn.gateway_mac).map_err(|_| SwitchDrop::RewriteFailed)?;
        dataplane::stats::add_own(&self.stats.arp_replies, 1);
        Ok(())
    }

    /// IPv6's ARP: a neighbour solicitation from a VM for any address of its
    /// vnet, a VIP, or a link-local address (the gateway) is answered with
    /// the gateway MAC (any target for an internal endpoint). Duplicate
    /// address detection (source `::`) is never answered, so a VM's own
    /// address is never claimed.
    pub(super) fn nd(
        &self,
        p: &Policy,
        (vm_id, vm): (usize, &crate::policy::Vm),
        frame: &[u8],
        pk: &Parsed,
    ) -> Result<Slow, SwitchDrop> {
        let vn = p.vnets.get(vm.vnet).ok_or(SwitchDrop::NoRoute)?;
        let (target, src) = rewrite::nd_solicitation(frame, pk).ok_or(SwitchDrop::NdIgnored)?;
        let link_local = |a: &[u8; 16]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
        if src == [0; 16] {
            return Err(SwitchDrop::NdIgnored);
        }
        if !link_local(&src) && !p.vm_owns(vm_id, src) {
            return Err(SwitchDrop::Spoofed);
        }
        // (An IPv6 address, whatever its bytes: the ND target is never one
        // of a key's IPv4-mapped addresses.)
        let t = std::net::IpAddr::V6(std::net::Ipv6Addr::from(target));
        if vm.internal || link_local(&target) || vn.contains(&t) || vn.vips.has_address(t) {
            Ok(Slow::Advert(vn.gateway_mac))
        } else {
            Err(SwitchDrop::NdIgnored)
        }
    }
}
