//! The slow path, in layer order: the port's VM, anti-spoofing, the
//! ARP/ND/echo responders (`respond`), the load balancer, routing, the
//! outbound and inbound ACLs; then `install`. Packets from the uplink, and
//! hairpinned ones (sent to a public address of the switch, and put back
//! through it on `HAIRPIN_PORT`), take `slow_uplink`.

use super::fast::tcp_flags;
use super::{Switch, SwitchDrop};
use crate::flow::{FlowAction, HAIRPIN_PORT, LbRef};
use crate::policy::{Policy, UplinkDef};
use dataplane::synproxy::{self, Seg};
use dataplane::wire::arp;
use dataplane::{FlowKey, L3, PacketBuf, Parsed, rewrite};
use filter::{Action, Direction};
use lb::balancer::{ConnKind, Decision, VipMode};
use lb::nat::Rewrite;

/// What connection tracking decided for a packet the switch forwards: the
/// rewrite, the tracked connection, the key after the rewrite, whether
/// the packet opened the connection (else the connection was admitted
/// before, and its admission holds), and the SYN to write over it first
/// (the SYN proxy's to a backend).
pub(super) struct LbStep {
    nat: Rewrite,
    lb: LbRef,
    post: FlowKey,
    new: bool,
    syn: Option<Seg>,
}

/// Reads a load-balancer decision for `key` in vnet `vnet`: `Ok(None)` when
/// the load balancer does not handle the packet. (`vnet` fits 16 bits:
/// [`Policy::compile`] refuses more vnets.)
pub(super) fn lb_step(
    d: Option<Decision>,
    vnet: usize,
    key: &FlowKey,
) -> Result<Option<LbStep>, SwitchDrop> {
    match d {
        Some(Decision::Forward {
            rewrite,
            dir,
            conn,
            new,
        }) => Ok(Some(LbStep {
            nat: rewrite,
            lb: LbRef {
                vnet: vnet as u16,
                conn,
                dir,
            },
            post: rewrite.apply_to_key(key),
            new,
            syn: None,
        })),
        Some(Decision::ProxySyn {
            rewrite,
            conn,
            new,
            seg,
        }) => Ok(Some(LbStep {
            nat: rewrite,
            lb: LbRef {
                vnet: vnet as u16,
                conn,
                dir: lb::conntrack::Dir::Orig,
            },
            post: rewrite.apply_to_key(key),
            new,
            syn: Some(seg),
        })),
        Some(Decision::Drop(r)) => Err(SwitchDrop::Lb(r)),
        // The SYN proxy's answers go back where the packet came from
        // before any routing (`Switch::proxy_answer`): a caller that did
        // not take them out has nothing to write them with.
        Some(Decision::Cookie { .. } | Decision::ProxyAck { .. }) => Err(SwitchDrop::RewriteFailed),
        Some(Decision::NotHandled) | None => Ok(None),
    }
}

/// Where the slow path routes a packet.
#[derive(Clone, Copy)]
pub(super) enum Hop<'a> {
    /// A VM of the same vnet.
    Vm(&'a crate::policy::Vm),
    /// Out to the wire.
    Uplink(&'a UplinkDef),
}

/// What the slow path decided.
pub(super) enum Slow {
    /// Send this (rewritten) packet back out of its port (ARP reply).
    Reply,
    /// Answer this neighbour solicitation with an advertisement at this MAC.
    Advert(dataplane::MacAddr),
    /// Forward with this action.
    Forward(FlowAction),
    /// Write this TCP segment over the packet and send it back out of its
    /// port from this MAC: the SYN proxy's SYN-ACK to a client, its ACK to
    /// a backend.
    Segment(dataplane::MacAddr, Seg),
    /// Write this SYN over the packet (the SYN proxy's to a backend), then
    /// forward it with this action; `first` when the packet opened the
    /// connection (otherwise, if it carries data, it waits for the
    /// backend's answer instead). Nothing is installed: the connection's
    /// flows wait for the backend's answer, which sets its sequence
    /// offset.
    ProxySyn(FlowAction, Seg, bool),
    /// Write this ACK over the packet (the SYN proxy's answer to a
    /// backend's SYN-ACK) and send it back out of its port from this MAC;
    /// then the data waiting for the connection goes on.
    ProxyAck(dataplane::MacAddr, Seg, LbRef),
}

/// The MAC at `off` in `frame`, for a trace.
fn mac_at(frame: &[u8], off: usize) -> String {
    frame
        .get(off..off + 6)
        .and_then(|m| <[u8; 6]>::try_from(m).ok())
        .map_or("?".into(), |m| dataplane::MacAddr(m).to_string())
}

impl<B: PacketBuf> Switch<B> {
    pub(super) fn acl(
        &self,
        p: &Policy,
        nsg: Option<usize>,
        dir: Direction,
        key: &FlowKey,
    ) -> Result<bool, SwitchDrop> {
        let way = if dir == Direction::In {
            "inbound"
        } else {
            "outbound"
        };
        self.decided.judge();
        let Some(n) = nsg.and_then(|i| p.nsgs.get(i).map(|c| (i, c))) else {
            self.note("acl", || {
                format!("{way}: the VM has no security group: allowed")
            });
            return Ok(true);
        };
        let c = n.1.classifier(dir);
        // (Through the worker's cache of verdicts: a new connection from a
        // client seen before, or from a network the rules cut coarsely,
        // differs from one classified before only in bits no rule reads.)
        let hits = self
            .hits
            .get(n.0)
            .map(|h| &h[if dir == Direction::In { 0 } else { 1 }]);
        let v = match (self.verdicts.try_borrow_mut(), hits) {
            (Ok(mut cache), Some(h)) => cache.classify_counted(c, key, h),
            (Ok(mut cache), None) => cache.classify(c, key),
            // (Nothing classifies while a classification is under way;
            // were it to, it would go to the classifier itself.)
            (Err(_), Some(h)) => c.classify_counted(key, h),
            (Err(_), None) => c.classify(key),
        };
        // What decided, for the flow log.
        let side = usize::from(dir == Direction::In);
        self.decided.set_rule(
            side,
            crate::flowlog::RuleRef {
                nsg: n.0 as u16,
                dir: side as u8,
                rule: v.map_or(crate::flowlog::RuleRef::NO_MATCH, |v| v.rule as u16),
            },
        );
        if !v.is_some_and(|v| v.action == Action::Allow) {
            self.decided.set_asked(*key);
        }
        self.note("acl", || {
            let group = &n.1.name;
            match v.and_then(|v| c.rules().get(v.rule)) {
                Some(r) => format!(
                    "group {group} {way}: rule {} (priority {}) matches: {}{}",
                    r.name,
                    r.priority,
                    r.action,
                    if r.stateful && r.action == Action::Allow {
                        ", stateful (its replies are admitted)"
                    } else {
                        ""
                    }
                ),
                None => format!("group {group} {way}: no rule matches: denied"),
            }
        });
        match v {
            Some(v) if v.action == Action::Allow => Ok(v.stateful),
            _ => Err(SwitchDrop::AclDeny),
        }
    }

    pub(super) fn slow(
        &mut self,
        p: &Policy,
        frame: &mut [u8],
        pk: &Parsed,
        in_port: u16,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        self.decided.reset();
        if let Some((dip, ip)) = p.dsr_on_port(in_port) {
            self.note("port", || {
                format!(
                    "the DSR port of backend VM {} ({ip}): a Mux's packet, out of its IP in IP",
                    dip.name
                )
            });
            return self.slow_dsr(p, dip, ip, frame, pk, now);
        }
        let wire = |u: &&UplinkDef| u.port == in_port || in_port == HAIRPIN_PORT;
        if let Some(up) = p.uplink.as_ref().filter(wire) {
            self.note("port", || {
                if in_port == HAIRPIN_PORT {
                    "hairpinned: sent to a public address of the switch, through it again as \
                     from the wire"
                        .into()
                } else {
                    "from the wire (the uplink)".into()
                }
            });
            return self.slow_uplink(p, up, frame, pk, now);
        }
        let Some((vm_id, vm)) = p.vm_on_port(in_port) else {
            self.note("port", || "a port with no VM".into());
            return Err(SwitchDrop::NoVm);
        };
        let vnet = p.vnets.get(vm.vnet).ok_or(SwitchDrop::NoRoute)?;
        self.note("port", || {
            format!(
                "from {} {} of vnet {}",
                if vm.is_remote() {
                    "remote endpoint"
                } else {
                    "VM"
                },
                vm.name,
                vnet.name
            )
        });
        // (A remote endpoint's frames come from its host's switch, with
        // whatever inner MAC it sends from; its host was checked when the
        // packet left its tunnel.)
        let remote = vm.is_remote();
        if !remote && frame.get(6..12) != Some(&vm.mac.0[..]) {
            self.note("spoof", || {
                format!(
                    "source MAC {} is not VM {}'s ({})",
                    mac_at(frame, 6),
                    vm.name,
                    vm.mac
                )
            });
            return Err(SwitchDrop::Spoofed);
        }
        match pk.l3 {
            L3::Arp => {
                self.note("arp", || {
                    "ARP: the responder answers requests for the vnet's addresses and VIPs \
                     with the gateway's MAC; nothing is flooded"
                        .into()
                });
                return self.arp(p, (vm_id, vm), frame, pk).map(|_| Slow::Reply);
            }
            L3::Ipv4 | L3::Ipv6 => {}
            L3::Other => {
                self.note("port", || "neither IP nor ARP: not carried".into());
                return Err(SwitchDrop::Unsupported);
            }
        }
        if rewrite::is_icmpv6_link_control(frame, pk) {
            self.note("nd", || {
                "IPv6 neighbour discovery: the responder answers solicitations for the \
                 vnet's addresses and VIPs with the gateway's MAC"
                    .into()
            });
            return self.nd(p, (vm_id, vm), frame, pk);
        }
        if !p.vm_owns(vm_id, pk.key.src_ip) {
            self.note("spoof", || {
                format!(
                    "source address {} is not one of VM {}'s",
                    pk.key.src(),
                    vm.name
                )
            });
            return Err(SwitchDrop::Spoofed);
        }
        if !remote {
            self.note("spoof", || {
                format!("source MAC and address are VM {}'s", vm.name)
            });
        }
        if vm.internal
            && let Some(s) = self.mux_probe(p, vm, frame, pk, now)?
        {
            return Ok(s);
        }
        let key = pk.key;
        // An ICMP error about a packet of a tracked connection belongs to
        // that connection: translated through its NAT and passed on.
        // One about nothing tracked is dropped (as conntrack's INVALID):
        // passed on as a flow of its own, it would be cached and later
        // errors between the same hosts would skip their translation.
        // A VM may only speak of packets it received (it is no router):
        // the quoted packet's destination is the VM itself.
        if let Some(q) = dataplane::icmp_error::quote(frame, pk) {
            self.note("icmp", || {
                "an ICMP error: passed on only within the tracked connection it quotes, \
                 translated through its NAT"
                    .into()
            });
            if q.key.dst_ip != pk.key.src_ip {
                return Err(SwitchDrop::IcmpUnrelated);
            }
            let r = self.lb.get(vm.vnet).and_then(|l| l.related(&q.key));
            let r = r.ok_or(SwitchDrop::IcmpUnrelated)?;
            return self.related_error(p, vm.vnet, frame, pk, &q, r, false);
        }
        // (A fragmented echo request cannot be answered from its first
        // fragment: it goes the ordinary way.)
        if rewrite::is_echo_request(frame, pk)
            && !pk.frag.is_first()
            && vnet.vips.has_address(pk.key.dst())
        {
            // A VIP answers ping itself, if the VM's security group lets
            // the request out.
            self.note("lb", || "ping to a VIP: the switch answers it".into());
            self.acl(p, vm.nsg, Direction::Out, &key)?;
            rewrite::icmp_echo_reply(frame, pk, vnet.gateway_mac)
                .map_err(|_| SwitchDrop::RewriteFailed)?;
            dataplane::stats::add_own(&self.stats.icmp_replies, 1);
            return Ok(Slow::Reply);
        }
        let seg = synproxy::read(frame, pk).unwrap_or_default();
        // (A parsed TCP packet has its whole fixed header: these are the
        // flags `tcp_flags` reads.)
        let flags = seg.flags;
        // The flow hash the burst's stages computed for this key, if any.
        let given = self
            .pick_hash
            .take()
            .and_then(|(k, h)| (k == key).then_some(h));
        let d = self
            .lb
            .get_mut(vm.vnet)
            .map(|l| l.process_hashed(&vnet.vips, &key, &seg, now, given));
        self.note_lb(p, vm.vnet, &key, &d);
        let client = (Some(vm), in_port);
        if let Some(s) = self.proxy_answer(p, vm.vnet, client, vnet.gateway_mac, &d, &key, &seg)? {
            return Ok(s);
        }
        let (mut nat, mut lb, mut post, mut tracked, syn) = match lb_step(d, vm.vnet, &key)? {
            Some(s) => (s.nat, Some(s.lb), s.post, !s.new, s.syn),
            None => (Rewrite::NONE, None, key, false, None),
        };
        // A connection this packet opened is forgotten if the packet goes
        // no further, so that nothing unjudged is ever taken for admitted.
        let fresh = if tracked { None } else { lb };
        // Routing: inside the vnet to a VM of the *same* vnet (tenant
        // isolation), outside it through the uplink, with SNAT when the vnet
        // has it.
        let hop = match p.vm_by_addr(vm.vnet, post.dst_ip) {
            // A remote endpoint reaches this host's VMs only: its other
            // traffic is its own host's to route.
            Some((_, dst)) if remote && dst.is_remote() => {
                self.note("route", || {
                    "a remote endpoint's packet to another remote endpoint: its own host \
                     routes it"
                        .into()
                });
                return Err(self.abandon(SwitchDrop::NoRoute, fresh));
            }
            Some((_, dst)) => {
                self.note("route", || {
                    format!(
                        "{} is {} {} of vnet {}",
                        post.dst(),
                        if dst.is_remote() {
                            "remote endpoint"
                        } else {
                            "VM"
                        },
                        dst.name,
                        vnet.name
                    )
                });
                Hop::Vm(dst)
            }
            None if remote => {
                self.note("route", || {
                    format!(
                        "a remote endpoint reaches only this host's VMs, not {}",
                        post.dst()
                    )
                });
                return Err(self.abandon(SwitchDrop::NoRoute, fresh));
            }
            // The underlay (the uplink's network, the tunnels' hosts) is the
            // provider's: no VM reaches it (a VM's packet there could pass
            // for a host's tunnel packet).
            // (A reply of a connection that came from there may: a Mux's
            // health probe through this host.)
            None if p.is_underlay(post.dst())
                && !lb.is_some_and(|r| tracked && r.dir == lb::conntrack::Dir::Reply) =>
            {
                self.note("route", || {
                    format!(
                        "{} is in the underlay, the provider's network: no VM reaches it",
                        post.dst()
                    )
                });
                return Err(self.abandon(SwitchDrop::NoRoute, fresh));
            }
            None => {
                let Some(up) = p.uplink.as_ref().filter(|_| !vnet.contains(&post.dst())) else {
                    self.note("route", || {
                        if vnet.contains(&post.dst()) {
                            format!(
                                "no VM of vnet {} has {}: a VM reaches only VMs of its own \
                                 vnet (tenant isolation)",
                                vnet.name,
                                post.dst()
                            )
                        } else {
                            format!(
                                "{} is outside vnet {} and there is no uplink",
                                post.dst(),
                                vnet.name
                            )
                        }
                    });
                    return Err(self.abandon(SwitchDrop::NoRoute, fresh));
                };
                self.note("route", || {
                    format!(
                        "{} is outside vnet {}: out of the uplink",
                        post.dst(),
                        vnet.name
                    )
                });
                if lb.is_none() && vnet.snat.is_some() {
                    let d = self
                        .lb
                        .get_mut(vm.vnet)
                        .map(|l| l.process_snat(&key, flags, now));
                    self.note_lb(p, vm.vnet, &key, &d);
                    if let Some(s) = lb_step(d, vm.vnet, &key)? {
                        (nat, lb, post, tracked) = (s.nat, Some(s.lb), s.post, !s.new);
                    }
                }
                Hop::Uplink(up)
            }
        };
        // The security groups judge a connection when it starts; a packet
        // of a connection admitted before (either way) keeps that decision,
        // whatever the rules have become since (as Azure's NSGs promise).
        let stateful = if tracked {
            self.note("acl", || {
                "a connection admitted before: the groups judged it when it started".into()
            });
            true
        } else {
            // Both groups are consulted (each counts its rule), whatever
            // the first says.
            let verdict = self.acl(p, vm.nsg, Direction::Out, &key).and_then(|out| {
                let inn = match hop {
                    Hop::Vm(dst) => self.acl(p, dst.nsg, Direction::In, &post)?,
                    Hop::Uplink(_) => true,
                };
                Ok(out && inn)
            });
            // (`lb` here is a connection this packet opened, if any: a new
            // VIP or SNAT connection.)
            let admitted = self.admit(verdict, lb)?;
            // A stateful allow of a connection nobody tracks yet: track it
            // (without NAT), so that its replies and its later packets are
            // its own after any policy change.
            if admitted && lb.is_none() {
                let uplink = matches!(hop, Hop::Uplink(_));
                let d = self
                    .lb
                    .get_mut(vm.vnet)
                    .map(|l| l.open_plain(&key, flags, now, uplink));
                lb = lb_step(d, vm.vnet, &key)?.map(|s| s.lb);
            }
            admitted
        };
        let fwd = match hop {
            Hop::Vm(dst) => FlowAction::to_vm(dst, vnet.gateway_mac, nat, lb),
            // (To a public address of the switch: hairpinned.)
            Hop::Uplink(up) => match FlowAction::to_wire(p, up, post.dst_ip, nat, lb) {
                Ok(a) => a,
                Err(hop) => return Err(self.unresolved(hop, fresh)),
            },
        };
        // The other direction arrives on the output port with the post-NAT
        // addresses swapped and goes back to this VM.
        if let Some(seg) = syn {
            let mss = seg
                .mss
                .map(|m| self.mss_fit(m, &key, [in_port, fwd.out_port]));
            return Ok(Slow::ProxySyn(fwd, Seg { mss, ..seg }, !tracked));
        }
        // (Its rewrite and connection are the forward flow's, turned
        // round by `install`: built from its own fields, not copied from
        // `fwd`, whose just-written fields a whole copy would read back in
        // other widths, waiting for the store buffer.)
        let back = FlowAction {
            out_port: in_port,
            src_mac: vnet.gateway_mac,
            dst_mac: vm.mac,
            fast: None,
            lb: None,
            nat: Rewrite::NONE,
        };
        // The first packet takes the compiled action too.
        Ok(Slow::Forward(self.install(
            p, now, pk.in_port, pk.key, fwd, &post, back, stateful,
        )))
    }

    /// The slow path of a packet from the wire: ARP and ping for the public
    /// addresses, replies of SNAT connections, new connections to a VIP
    /// outside its vnet. Nothing else enters a vnet from outside.
    pub(super) fn slow_uplink(
        &mut self,
        p: &Policy,
        up: &UplinkDef,
        frame: &mut [u8],
        pk: &Parsed,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        match pk.l3 {
            L3::Arp => {
                if let Some(r) = self.underlay_arp(p, frame, pk) {
                    return r.and_then(|answered| {
                        if answered {
                            Ok(Slow::Reply)
                        } else {
                            Err(SwitchDrop::ArpToCache)
                        }
                    });
                }
                let l3 = frame
                    .get(usize::from(pk.l3_off)..)
                    .ok_or(SwitchDrop::ArpIgnored)?;
                let a = arp::Packet::new_checked(l3).map_err(|_| SwitchDrop::ArpIgnored)?;
                let target = dataplane::key::to16(std::net::IpAddr::V4(a.target_ip()));
                if a.operation() != arp::OP_REQUEST || p.vnet_by_public(target).is_none() {
                    return Err(SwitchDrop::ArpIgnored);
                }
                rewrite::arp_reply(frame, pk, up.mac).map_err(|_| SwitchDrop::RewriteFailed)?;
                dataplane::stats::add_own(&self.stats.arp_replies, 1);
                return Ok(Slow::Reply);
            }
            L3::Ipv4 | L3::Ipv6 => {}
            L3::Other => return Err(SwitchDrop::Unsupported),
        }
        // Only the switch itself sends from its public addresses: from the
        // wire, such a source is forged (its answers would hairpin back
        // into the switch). Hairpinned packets come in on their own port.
        if pk.in_port != HAIRPIN_PORT
            && p.vnet_by_public(pk.key.src_ip).is_some()
            && !self.probe_reply(p, pk)
        {
            self.note("spoof", || {
                format!(
                    "from the wire with a public address of the switch ({}) as its source",
                    pk.key.src()
                )
            });
            return Err(SwitchDrop::Spoofed);
        }
        // An ICMP error from the wire about a packet of a tracked
        // connection: that of the vnet of its public destination, else of
        // the one vnet tracking it that its source is outside of.
        if let Some(q) = dataplane::icmp_error::quote(frame, pk) {
            let mut owners = (0..self.lb.len().min(p.vnets.len())).filter_map(|vn| {
                let public = p.vnet_by_public(pk.key.dst_ip) == Some(vn);
                let outside = p.vnets.get(vn).is_some_and(|v| !v.contains(&pk.key.src()));
                let r = self.lb.get(vn)?.related(&q.key)?;
                (public || outside).then_some((vn, r))
            });
            let (Some((vn, r)), None) = (owners.next(), owners.next()) else {
                return Err(SwitchDrop::IcmpUnrelated);
            };
            return self.related_error(p, vn, frame, pk, &q, r, true);
        }
        let Some(vn) = p.vnet_by_public(pk.key.dst_ip) else {
            // Ping to the uplink's own address is answered.
            let mine = p.is_own_address(pk.key.dst());
            if mine && rewrite::is_echo_request(frame, pk) && !pk.frag.is_first() {
                rewrite::icmp_echo_reply(frame, pk, up.mac)
                    .map_err(|_| SwitchDrop::RewriteFailed)?;
                dataplane::stats::add_own(&self.stats.icmp_replies, 1);
                return Ok(Slow::Reply);
            }
            return self.slow_uplink_reply(p, up, frame, pk, now);
        };
        let vnet = p.vnets.get(vn).ok_or(SwitchDrop::NoRoute)?;
        if rewrite::is_echo_request(frame, pk) && !pk.frag.is_first() {
            rewrite::icmp_echo_reply(frame, pk, up.mac).map_err(|_| SwitchDrop::RewriteFailed)?;
            dataplane::stats::add_own(&self.stats.icmp_replies, 1);
            return Ok(Slow::Reply);
        }
        let key = pk.key;
        let seg = synproxy::read(frame, pk).unwrap_or_default();
        // The flow hash the burst's stages computed for this key, if any.
        let given = self
            .pick_hash
            .take()
            .and_then(|(k, h)| (k == key).then_some(h));
        let d = self.lb.get_mut(vn).map(|l| {
            match l.process_hashed(&vnet.vips, &key, &seg, now, given) {
                // No connection expects it and it is for no VIP: a SNAT
                // mapping may let it in.
                Decision::NotHandled => l.snat_inbound(&key, seg.flags, now),
                d => d,
            }
        });
        self.note_lb(p, vn, &key, &d);
        if let Some(s) = self.proxy_answer(p, vn, (None, pk.in_port), up.mac, &d, &key, &seg)? {
            return Ok(s);
        }
        let step = lb_step(d, vn, &key)?.ok_or(SwitchDrop::NoRoute)?;
        // A Mux's connection: the packet goes on unchanged, in IP in IP to
        // its DIP; nothing comes back this way.
        if let Some(port) = self.mux_port_of(p, step.lb) {
            let fresh = Some(step.lb).filter(|_| step.new);
            let port = port.map_err(|e| self.abandon(e, fresh))?;
            let fwd = FlowAction {
                out_port: port,
                ..FlowAction::to_uplink(up, up.mac, step.nat, Some(step.lb))
            };
            return Ok(Slow::Forward(
                self.install(p, now, pk.in_port, pk.key, fwd, &step.post, fwd, true),
            ));
        }
        self.enter_vm(p, up, vn, pk, step, now)
    }

    /// A packet from the wire (or a Mux's, out of its IP in IP) that
    /// connection tracking took into vnet `vn` (`step`): to the VM at its
    /// destination after NAT, if a new connection passes that VM's
    /// inbound group; its replies go back out of the uplink. A SYN proxy's
    /// SYN to the backend is written over it (`Slow::ProxySyn`).
    fn enter_vm(
        &mut self,
        p: &Policy,
        up: &UplinkDef,
        vn: usize,
        pk: &Parsed,
        step: LbStep,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        let LbStep {
            nat,
            lb,
            post,
            new,
            syn,
        } = step;
        let key = pk.key;
        let vnet = p.vnets.get(vn).ok_or(SwitchDrop::NoRoute)?;
        let lb = Some(lb);
        let Some((_, dst)) = p.vm_by_addr(vn, post.dst_ip) else {
            self.note("route", || {
                format!("no VM of vnet {} has {}", vnet.name, post.dst())
            });
            return Err(self.abandon(SwitchDrop::NoRoute, lb.filter(|_| new)));
        };
        self.note("route", || {
            format!("{} is VM {} of vnet {}", post.dst(), dst.name, vnet.name)
        });
        let stateful = !new || {
            let verdict = self.acl(p, dst.nsg, Direction::In, &post);
            self.admit(verdict, lb)?
        };
        let fwd = FlowAction::to_vm(dst, vnet.gateway_mac, nat, lb);
        if let Some(seg) = syn {
            let mss = seg
                .mss
                .map(|m| self.mss_fit(m, &key, [pk.in_port, fwd.out_port]));
            return Ok(Slow::ProxySyn(fwd, Seg { mss, ..seg }, new));
        }
        // (From a public address of the switch: its replies hairpin.)
        let back = match FlowAction::to_wire(p, up, key.src_ip, nat, lb) {
            Ok(a) => a,
            Err(hop) => return Err(self.unresolved(hop, lb.filter(|_| new))),
        };
        // The first packet takes the compiled action too.
        Ok(Slow::Forward(self.install(
            p, now, pk.in_port, pk.key, fwd, &post, back, stateful,
        )))
    }

    /// The tunnel port to the DIP of connection `r`, when it is a Mux's
    /// (`Err` when the policy has no tunnel to it).
    fn mux_port_of(&self, p: &Policy, r: LbRef) -> Option<Result<u16, SwitchDrop>> {
        let c = self.lb.get(r.vnet as usize)?.conn(r.conn)?;
        match &c.value.kind {
            ConnKind::Dnat { vip, backend, .. } if vip.config().mode == VipMode::Mux => {
                Some(p.mux_port(*backend).ok_or(SwitchDrop::NoRoute))
            }
            _ => None,
        }
    }

    /// A packet of the health prober (internal VM `prober`) to a DIP of a
    /// Mux VIP of its vnet: the probe goes to the VIP through that DIP, as
    /// clients reach it, in IP in IP, from the uplink's own address (the
    /// DIP's host answers it straight there). Tracked with that NAT
    /// (`LbCore::probe_through`); no flow is installed (probes are few).
    /// `None` for any other packet of the prober.
    fn mux_probe(
        &mut self,
        p: &Policy,
        prober: &crate::policy::Vm,
        frame: &mut [u8],
        pk: &Parsed,
        now: u64,
    ) -> Result<Option<Slow>, SwitchDrop> {
        let (Some(port), Some((up, ul))) = (p.mux_port(pk.key.dst()), p.underlay()) else {
            return Ok(None);
        };
        let vnet = p.vnets.get(prober.vnet).ok_or(SwitchDrop::NoRoute)?;
        let dip = pk.key.dst();
        let vip = p.vips().iter().find(|v| {
            let c = v.config();
            c.mode == VipMode::Mux
                && c.proto == pk.key.proto
                && c.port == pk.key.dst_port
                && c.backends.iter().any(|b| b.ip == dip)
                && vnet.vips.get(c.addr, c.port, c.proto).is_some()
        });
        let Some(vip) = vip else {
            return Ok(None);
        };
        let key = pk.key;
        let me = std::net::IpAddr::V4(ul.address.addr());
        let nat = lb::nat::NatBinding {
            forward: Rewrite {
                src: Some((me, key.src_port)),
                dst: Some((vip.config().addr, key.dst_port)),
                ..Rewrite::NONE
            },
            reverse: Rewrite {
                src: Some((dip, key.dst_port)),
                dst: Some((key.src(), key.src_port)),
                ..Rewrite::NONE
            },
        };
        let flags = tcp_flags(frame, pk);
        let d = self
            .lb
            .get_mut(prober.vnet)
            .map(|l| l.probe_through(&key, flags, now, nat));
        let s = lb_step(d, prober.vnet, &key)?.ok_or(SwitchDrop::NoRoute)?;
        Ok(Some(Slow::Forward(FlowAction {
            out_port: port,
            ..FlowAction::to_uplink(up, up.mac, s.nat, None)
        })))
    }

    /// True for a packet from the wire that may come from a Mux VIP: the
    /// reply to a Mux's probe, sent straight from the DIP's host with the
    /// VIP as its source to the uplink's own address (TCP, and a probe
    /// connection expects it).
    fn probe_reply(&self, p: &Policy, pk: &Parsed) -> bool {
        pk.key.proto == 6
            && p.is_own_address(pk.key.dst())
            && p.vips().iter().any(|v| {
                v.config().mode == VipMode::Mux
                    && dataplane::key::to16(v.config().addr) == pk.key.src_ip
            })
            && self.lb.iter().any(|l| l.is_uplink_reply(&pk.key))
    }

    /// The slow path of a Mux's packet, taken out of its IP in IP on the
    /// DSR port of backend `dip` (address `ip`): a new connection to the
    /// DSR VIP it is for goes to that backend (DNAT), if its inbound group
    /// admits it; the replies leave by the uplink with the VIP as their
    /// source, straight to the client (direct server return).
    fn slow_dsr(
        &mut self,
        p: &Policy,
        dip: &crate::policy::Vm,
        ip: std::net::Ipv4Addr,
        frame: &mut [u8],
        pk: &Parsed,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        let up = p.uplink.as_ref().ok_or(SwitchDrop::NoRoute)?;
        if pk.l3 != L3::Ipv4 {
            return Err(SwitchDrop::Unsupported);
        }
        let vn = dip.vnet;
        let vnet = p.vnets.get(vn).ok_or(SwitchDrop::NoRoute)?;
        // From the wire: never from this host's public addresses, nor
        // from inside the backend's vnet.
        if p.vnet_by_public(pk.key.src_ip).is_some() || vnet.contains(&pk.key.src()) {
            return Err(SwitchDrop::Spoofed);
        }
        let key = pk.key;
        let seg = synproxy::read(frame, pk).unwrap_or_default();
        let d = self
            .lb
            .get_mut(vn)
            .map(|l| l.process_dsr(&vnet.vips, &key, &seg, now, std::net::IpAddr::V4(ip)));
        let step = lb_step(d, vn, &key)?.ok_or(SwitchDrop::NoRoute)?;
        self.enter_vm(p, up, vn, pk, step, now)
    }

    /// The SYN proxy's answers, which go back out of the port the packet
    /// came in on, from `mac`, before any routing: a cookie's SYN-ACK to a
    /// SYN (if the client's group lets the SYN out, `from` being the
    /// client VM, and the group of the backend Maglev picks now would let
    /// it in: a client is not told of a connection it could not have),
    /// and the ACK that answers a backend's SYN-ACK. `None` for any other
    /// decision. The MSS a cookie announces fits both ports' MTUs.
    #[allow(clippy::too_many_arguments)]
    fn proxy_answer(
        &mut self,
        p: &Policy,
        vn: usize,
        (from, in_port): (Option<&crate::policy::Vm>, u16),
        mac: dataplane::MacAddr,
        d: &Option<Decision>,
        key: &FlowKey,
        seg: &Seg,
    ) -> Result<Option<Slow>, SwitchDrop> {
        match *d {
            Some(Decision::Cookie {
                cookie,
                mss,
                rewrite,
            }) => {
                if let Some(vm) = from {
                    self.acl(p, vm.nsg, Direction::Out, key)?;
                }
                let post = rewrite.apply_to_key(key);
                let dst = p.vm_by_addr(vn, post.dst_ip).map(|(_, d)| d);
                if let Some(dst) = dst {
                    self.acl(p, dst.nsg, Direction::In, &post)?;
                }
                let to = dst.map_or(in_port, |d| d.port);
                // Flows cached for an earlier connection on the same ports
                // (a client reusing its port) must not take this one's
                // packets past the proxy.
                self.flows.remove(in_port, key);
                self.flows.remove(to, &post.reversed());
                let mss = self.mss_fit(mss, key, [in_port, to]);
                Ok(Some(Slow::Segment(
                    mac,
                    Seg {
                        flags: super::fast::TCP_SYN | super::fast::TCP_ACK,
                        seq: cookie,
                        ack: seg.seq.wrapping_add(1),
                        window: u16::MAX,
                        mss: Some(mss),
                    },
                )))
            }
            Some(Decision::ProxyAck { seg, conn }) => {
                let r = LbRef {
                    vnet: vn as u16,
                    conn,
                    dir: lb::conntrack::Dir::Reply,
                };
                Ok(Some(Slow::ProxyAck(mac, seg, r)))
            }
            _ => Ok(None),
        }
    }

    /// `mss` lowered so that a segment fits the MTU of both `ports` (an
    /// IPv4 or IPv6 packet with `key`'s addresses, no options).
    fn mss_fit(&self, mss: u16, key: &FlowKey, ports: [u16; 2]) -> u16 {
        let ip_tcp = if key.src().is_ipv4() { 40 } else { 60 };
        ports
            .iter()
            .filter_map(|&pt| {
                if super::overlay::is_tunnel(pt) {
                    self.tunnel_mtu
                } else {
                    self.cfg.port_mtu.get(usize::from(pt)).copied()
                }
            })
            .fold(mss, |m, mtu| m.min(mtu.saturating_sub(ip_tcp)))
    }

    /// Passes on an ICMP error about a packet of a tracked connection of
    /// vnet `vn` (`q`, the packet it quotes; `r`, the rewrite of the
    /// direction the error travels): translated outside and inside through
    /// the connection's NAT, then routed to its new destination, a VM of
    /// the vnet or the wire. No security group judges it (it is part of a
    /// connection they admitted), and no flow is installed (errors are
    /// rare). An error goes only to the host that sent the quoted packet
    /// (after translation, the outer destination is the quoted source, as
    /// Linux's conntrack checks); one from the wire (`from_wire`) only to a
    /// VM of the vnet about a packet it sent out: so no forged quote can
    /// carry an error past the groups to another host, or back out.
    #[allow(clippy::too_many_arguments)]
    fn related_error(
        &mut self,
        p: &Policy,
        vn: usize,
        frame: &mut [u8],
        pk: &Parsed,
        q: &dataplane::icmp_error::Quote,
        r: Rewrite,
        from_wire: bool,
    ) -> Result<Slow, SwitchDrop> {
        let (src, dst) = (r.src, r.dst);
        let t = dataplane::icmp_error::Translation {
            outer_src: src.map(|s| s.0),
            outer_dst: dst.map(|d| d.0),
            // The quoted packet went the other way: what the error's
            // direction rewrites at the source, it rewrites at the
            // destination, and the other way round.
            quoted_src: dst,
            quoted_dst: src,
            // A SYN-proxied connection: the quoted segment's sequence
            // number goes back to its sender's numbering (what this
            // direction adds to acknowledgments).
            quoted_seq: r.shift.amounts().1,
        };
        let to = t.outer_dst.unwrap_or(pk.key.dst());
        let quoted_src = t.quoted_src.map_or(q.key.src(), |(a, _)| a);
        if to != quoted_src {
            return Err(SwitchDrop::IcmpUnrelated);
        }
        let vnet = p.vnets.get(vn).ok_or(SwitchDrop::NoRoute)?;
        let vm = p.vm_by_addr(vn, dataplane::key::to16(to));
        if from_wire && vm.is_none() {
            return Err(SwitchDrop::IcmpUnrelated);
        }
        dataplane::icmp_error::translate(frame, pk, q, &t)
            .map_err(|_| SwitchDrop::RewriteFailed)?;
        let action = match vm {
            Some((_, vm)) => FlowAction::to_vm(vm, vnet.gateway_mac, Rewrite::NONE, None),
            None => {
                let up = p
                    .uplink
                    .as_ref()
                    .filter(|_| !vnet.contains(&to))
                    .ok_or(SwitchDrop::NoRoute)?;
                FlowAction::to_wire(p, up, dataplane::key::to16(to), Rewrite::NONE, None)
                    .map_err(|hop| self.unresolved(hop, None))?
            }
        };
        dataplane::stats::add_own(&self.stats.icmp_related, 1);
        Ok(Slow::Forward(action))
    }

    /// Drops a packet for `why`, forgetting the connection it opened, if
    /// any (`fresh`): a connection whose first packet went nowhere was never
    /// judged, and must not be taken for admitted later.
    fn abandon(&mut self, why: SwitchDrop, fresh: Option<LbRef>) -> SwitchDrop {
        if let Some(r) = fresh
            && let Some(l) = self.lb.get_mut(r.vnet as usize)
        {
            l.forget(r.conn);
        }
        why
    }

    /// Drops a packet to the wire whose next hop has no known MAC (the
    /// neighbour cache is told, and resolves it) or that has no route,
    /// forgetting the connection it opened, if any.
    fn unresolved(&mut self, hop: Option<std::net::Ipv4Addr>, fresh: Option<LbRef>) -> SwitchDrop {
        self.note("route", || match hop {
            Some(h) => format!("the next hop {h} has no known MAC yet: the switch resolves it"),
            None => "no route on the underlay".into(),
        });
        match hop {
            Some(h) => {
                self.want(h);
                self.abandon(SwitchDrop::NeighborUnresolved, fresh)
            }
            None => self.abandon(SwitchDrop::NoRoute, fresh),
        }
    }

    /// The security groups' verdict on a new connection: a denied one is
    /// forgotten at once if connection tracking already holds it (a new
    /// VIP or SNAT connection), so that its next packet is judged again
    /// rather than taken for a packet of an admitted connection.
    fn admit(
        &mut self,
        verdict: Result<bool, SwitchDrop>,
        lb: Option<LbRef>,
    ) -> Result<bool, SwitchDrop> {
        if verdict.is_err()
            && let Some(r) = lb
            && let Some(l) = self.lb.get_mut(r.vnet as usize)
        {
            l.forget(r.conn);
        }
        verdict
    }

    /// A packet from the wire for no public address: a reply of a
    /// connection a VM opened out of the uplink without SNAT (its
    /// destination is the VM's own address, its source outside the vnet).
    /// Exactly one vnet must track it as such (vnets may share a prefix);
    /// no other connection is touched by what comes from the wire.
    fn slow_uplink_reply(
        &mut self,
        p: &Policy,
        up: &UplinkDef,
        frame: &mut [u8],
        pk: &Parsed,
        now: u64,
    ) -> Result<Slow, SwitchDrop> {
        let key = pk.key;
        let mut owners = (0..self.lb.len().min(p.vnets.len())).filter(|&vn| {
            p.vnets.get(vn).is_some_and(|v| !v.contains(&key.src()))
                && self.lb.get(vn).is_some_and(|l| l.is_uplink_reply(&key))
        });
        let (Some(vn), None) = (owners.next(), owners.next()) else {
            self.note("route", || {
                format!(
                    "from the wire to {}: no public address, and no connection of one vnet \
                     expects it",
                    key.dst()
                )
            });
            return Err(SwitchDrop::NoRoute);
        };
        let flags = tcp_flags(frame, pk);
        let d = self
            .lb
            .get_mut(vn)
            .and_then(|l| l.uplink_reply(&key, flags, now));
        let LbStep { nat, lb, post, .. } = lb_step(d, vn, &key)?.ok_or(SwitchDrop::NoRoute)?;
        let vnet = p.vnets.get(vn).ok_or(SwitchDrop::NoRoute)?;
        let (_, dst) = p.vm_by_addr(vn, post.dst_ip).ok_or(SwitchDrop::NoRoute)?;
        let fwd = FlowAction::to_vm(dst, vnet.gateway_mac, nat, Some(lb));
        // A Mux's probe reply goes to its prober without a flow (probes
        // are few; the prober's own flow is the tunnel's, not the wire's).
        if dst.internal {
            return Ok(Slow::Forward(fwd));
        }
        let back = FlowAction::to_wire(p, up, key.src_ip, nat, Some(lb))
            .map_err(|hop| self.unresolved(hop, None))?;
        Ok(Slow::Forward(self.install(
            p, now, pk.in_port, pk.key, fwd, &post, back, true,
        )))
    }
}
