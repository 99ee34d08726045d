//! The policy snapshot: vnets, VMs, compiled security groups and VIPs, as the
//! workers read it. Built whole by the control thread and published
//! atomically; never changed in place.

use crate::hash::FxHasher;
use dataplane::MacAddr;
use dataplane::tunnel::Encap;
use filter::{CompiledNsg, DefaultContext, NsgSpec};
use ipnet::IpNet;
use ipnet::Ipv4Net;
use lb::balancer::{HealthClock, Vip, VipConfig, VipMode, Vips};
use lb::conntrack::to16;
use lb::snat::SnatConfig;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// A vnet as given to [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnetDef {
    /// Name.
    pub name: String,
    /// Address prefixes.
    pub prefixes: Vec<IpNet>,
    /// The MAC the switch answers ARP with and sends from.
    pub gateway_mac: MacAddr,
    /// Outbound SNAT through the uplink: the public addresses and port
    /// blocks the vnet's VMs leave from. Without it, traffic to addresses
    /// outside the vnet leaves through the uplink untranslated.
    pub snat: Option<SnatConfig>,
    /// Its virtual network identifier on the overlay (24 bits): traffic to
    /// its addresses on other hosts ([`RemoteDef`]) travels in tunnels
    /// with it, and tunnel packets with it are this vnet's.
    pub vni: Option<u32>,
    /// The tunnel its traffic to other hosts is sent in (both are taken in).
    pub encap: Encap,
}

/// The port towards the wire (a physical NIC or VF): traffic to addresses
/// outside a vnet leaves through it, and the vnets' public addresses (SNAT
/// addresses, VIPs outside the vnet's prefixes) are reached through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkDef {
    /// Index of its switch port.
    pub port: u16,
    /// The MAC the switch sends from on the wire and answers ARP with for
    /// its public addresses.
    pub mac: MacAddr,
    /// The MAC of the next hop (the router on the wire); zero when the
    /// underlay resolves its next hops ([`Underlay`]) instead.
    pub next_hop_mac: MacAddr,
    /// The uplink's own address, routes and neighbours, if it has them.
    pub underlay: Option<Underlay>,
}

/// The uplink as a host on its network: an address, static routes, and
/// next hops resolved with ARP (their MACs learned by the control thread
/// and given to each snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Underlay {
    /// The uplink's address and the prefix of its network (on-link).
    pub address: Ipv4Net,
    /// Static routes: a prefix and the next hop it is reached through
    /// (on-link); a default route is `0.0.0.0/0`.
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// The load balancer Muxes (their addresses' prefixes) whose IP in IP
    /// a DSR VIP's backends take.
    pub muxes: Vec<Ipv4Net>,
}

impl Underlay {
    /// The next hop towards `dst`: the route with the longest prefix that
    /// holds it, else `dst` itself when it is on-link. `None`: no route.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let routed = self
            .routes
            .iter()
            .filter(|(n, _)| n.contains(&dst))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(n, via)| (n.prefix_len(), *via));
        let on_link = self
            .address
            .contains(&dst)
            .then_some((self.address.prefix_len(), dst));
        match (routed, on_link) {
            (Some(r), Some(l)) => Some(if r.0 > l.0 { r.1 } else { l.1 }),
            (r, l) => r.or(l).map(|x| x.1),
        }
    }

    /// True when `ip` is on the uplink's network (a neighbour may have it).
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        self.address.contains(&ip) && ip != self.address.addr()
    }
}

/// Customer addresses of a vnet that live on another host (VFP's VNET
/// mapping, customer address -> provider address): traffic to them is
/// sent there in the vnet's tunnel, and tunnel packets from them must come
/// from that host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDef {
    /// Name.
    pub name: String,
    /// Index of its vnet in the topology.
    pub vnet: usize,
    /// Its addresses in the vnet.
    pub ips: Vec<IpAddr>,
    /// The host's underlay (provider) address.
    pub host: Ipv4Addr,
    /// Its MAC, if known: the inner destination of what is sent to it
    /// (a host with a kernel VXLAN device takes only frames to its MAC);
    /// else the vnet's gateway MAC.
    pub mac: Option<MacAddr>,
}

/// Switch ports from here up are remote endpoints' tunnels: the port of
/// remote `i` ([`Topology::remotes`]) is `TUNNEL_PORT_BASE + i`. Packets
/// taken out of a tunnel come in on it; flows to a remote go out of it,
/// encapsulated, through the uplink.
pub const TUNNEL_PORT_BASE: u16 = 0x8000;
/// The most remote endpoints a policy holds (with a Mux's DIPs' tunnels
/// and the DSR backends' ports).
pub const MAX_REMOTES: usize = 0x7000;
/// A DSR backend's port, counting down from here (below
/// [`crate::flow::HAIRPIN_PORT`]; the tunnel ports count up from
/// [`TUNNEL_PORT_BASE`], and at most [`MAX_REMOTES`] of both fit): the
/// port the Muxes' packets to it come in on.
pub const DSR_PORT_TOP: u16 = crate::flow::HAIRPIN_PORT - 1;

/// A tunnel, compiled: a remote endpoint's (in its vnet's VXLAN or
/// Geneve), or a Mux's to one of its DIPs (IP in IP, named `VIP/DIP`);
/// what its packets are wrapped in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// The remote's name (`VIP/DIP` for a Mux's DIP).
    pub name: String,
    /// Its vnet.
    pub vnet: usize,
    /// The encapsulation.
    pub encap: Encap,
    /// The host's underlay address (a Mux's DIP's own).
    pub host: Ipv4Addr,
    /// The next hop towards the host (`None`: no route).
    pub next_hop: Option<Ipv4Addr>,
    /// The outer headers, when the next hop's MAC is known; `None` while
    /// it is being resolved.
    pub outer: Option<dataplane::tunnel::Outer>,
}

impl Tunnel {
    /// The tunnel `name` of vnet `vnet` in `encap` (with its VNI) to
    /// `host`, from the uplink `up` with underlay `ul`: its next hop by
    /// the routes, and its outer headers once `neighbours` know that next
    /// hop's MAC.
    fn to(
        name: &str,
        vnet: usize,
        (encap, vni): (Encap, u32),
        host: Ipv4Addr,
        (up, ul, neighbours): (&UplinkDef, &Underlay, &FxMap<Ipv4Addr, MacAddr>),
    ) -> Tunnel {
        let next_hop = ul.next_hop(host);
        let outer =
            next_hop
                .and_then(|nh| neighbours.get(&nh))
                .map(|mac| dataplane::tunnel::Outer {
                    encap,
                    vni,
                    src_mac: up.mac,
                    dst_mac: *mac,
                    src_ip: ul.address.addr(),
                    dst_ip: host,
                });
        Tunnel {
            name: name.to_string(),
            vnet,
            encap,
            host,
            next_hop,
            outer,
        }
    }
}

/// A VM as given to [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDef {
    /// Name.
    pub name: String,
    /// Index of its switch port.
    pub port: u16,
    /// Index of its vnet in the topology.
    pub vnet: usize,
    /// Its MAC.
    pub mac: MacAddr,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Index of its security group, if any.
    pub nsg: Option<usize>,
    /// A switch-internal endpoint (the health prober): its addresses may lie
    /// outside the vnet, and the ARP responder answers it for any address
    /// (its gateway is outside the vnet too).
    pub internal: bool,
}

/// A VIP as given to [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipDef {
    /// Index of the vnet it serves.
    pub vnet: usize,
    /// The load balancer configuration.
    pub config: VipConfig,
    /// Initial health per backend (missing = healthy).
    pub health: Vec<bool>,
}

/// Everything the switch needs to know, before compilation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// Vnets.
    pub vnets: Vec<VnetDef>,
    /// VMs.
    pub vms: Vec<VmDef>,
    /// Security groups.
    pub nsgs: Vec<NsgSpec>,
    /// VIPs.
    pub vips: Vec<VipDef>,
    /// Number of switch ports.
    pub ports: u16,
    /// The uplink, if any.
    pub uplink: Option<UplinkDef>,
    /// Addresses of vnets on other hosts.
    pub remotes: Vec<RemoteDef>,
    /// The underlay's neighbours whose MACs are known (the control
    /// thread's ARP cache).
    pub neighbours: Vec<(Ipv4Addr, MacAddr)>,
}

/// A vnet in the snapshot.
#[derive(Debug, Clone)]
pub struct Vnet {
    /// Name.
    pub name: String,
    /// Prefixes.
    pub prefixes: Vec<IpNet>,
    /// Gateway MAC.
    pub gateway_mac: MacAddr,
    /// Its VIPs.
    pub vips: Vips,
    /// Outbound SNAT through the uplink.
    pub snat: Option<SnatConfig>,
    /// Its VNI on the overlay, if any.
    pub vni: Option<u32>,
    /// The tunnel it sends in.
    pub encap: Encap,
}

impl Vnet {
    /// True when `ip` is inside the vnet.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.prefixes.iter().any(|n| n.contains(ip))
    }

    /// The gateway's IPv4 address: the first host of the first IPv4
    /// prefix (x.y.0.1 of x.y.0.0/16, as clouds number their gateways),
    /// what ICMP errors the switch makes come from.
    pub fn gateway_v4(&self) -> Option<std::net::Ipv4Addr> {
        self.prefixes.iter().find_map(|n| match n {
            IpNet::V4(v4) if v4.prefix_len() < 31 => {
                Some(std::net::Ipv4Addr::from(u32::from(v4.network()) + 1))
            }
            _ => None,
        })
    }

    /// The gateway's IPv6 address: the first host of the first IPv6
    /// prefix (`fd00:1::1` of `fd00:1::/64`), what ICMPv6 errors the switch
    /// makes come from.
    pub fn gateway_v6(&self) -> Option<std::net::Ipv6Addr> {
        self.prefixes.iter().find_map(|n| match n {
            IpNet::V6(v6) if v6.prefix_len() < 127 => {
                Some(std::net::Ipv6Addr::from(u128::from(v6.network()) + 1))
            }
            _ => None,
        })
    }
}

/// A VM in the snapshot: its definition, with `nsg` indexing
/// [`Policy::nsgs`] (the group compiled for the VM's vnet) instead of the
/// topology's groups. A remote endpoint is a VM of its vnet on its tunnel
/// port (at or above [`TUNNEL_PORT_BASE`]), with no group (its own host
/// applies its groups).
pub type Vm = VmDef;

impl VmDef {
    /// True for a remote endpoint (on another host, through a tunnel).
    #[inline]
    pub fn is_remote(&self) -> bool {
        self.port >= TUNNEL_PORT_BASE
    }
}

/// Why a topology could not be compiled (one line per problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct PolicyError(pub Vec<String>);

/// What a flow of no VIP stores as its VIP number; also one more than the
/// largest VIP number.
pub const NO_VIP: u16 = u16::MAX;

/// An immutable policy snapshot (health, which changes in place, aside).
#[derive(Debug)]
pub struct Policy {
    /// Increases with every published snapshot.
    pub generation: u64,
    /// Vnets (index = vnet id).
    pub vnets: Vec<Vnet>,
    /// VMs (index = VM id).
    pub vms: Vec<Vm>,
    /// Compiled security groups (one per (group, vnet) pair that VMs use);
    /// shared by generations that do not change them.
    pub nsgs: Arc<Vec<CompiledNsg>>,
    /// The uplink, if any.
    pub uplink: Option<UplinkDef>,
    port_vm: Vec<Option<usize>>,
    /// (vnet, address in 16-byte form) -> VM: the VMs of this host and the
    /// remote endpoints. The parser drops IPv6 packets with IPv4-mapped
    /// addresses, so a 16-byte key names one address of one family.
    addr_vm: FxMap<(usize, [u8; 16]), usize>,
    /// Public addresses (SNAT addresses, VIPs outside their vnet) -> vnet.
    public: FxMap<[u8; 16], usize>,
    /// Service endpoints (address, port, protocol): every VIP frontend and
    /// every backend. Connection placement hashes the other side.
    services: std::collections::HashSet<([u8; 16], u16, u8), BuildHasherDefault<FxHasher>>,
    /// Every VIP by its number ([`lb::Vip::id`]): flows name their VIP by it.
    vips: Vec<Arc<Vip>>,
    /// Ticks on every health change of this snapshot's VIPs.
    health: Arc<HealthClock>,
    /// Remote endpoints' tunnels (index = port - [`TUNNEL_PORT_BASE`]).
    pub tunnels: Vec<Tunnel>,
    /// VNI -> vnet.
    vni_vnet: FxMap<u32, usize>,
    /// The underlay's neighbours with known MACs.
    neighbours: FxMap<Ipv4Addr, MacAddr>,
    /// Each tunnel's VM (index = port - [`TUNNEL_PORT_BASE`]; remote
    /// endpoints' tunnels only).
    tunnel_vm: Vec<usize>,
    /// A Mux's backends -> their tunnel ports (IP in IP).
    mux_ports: FxMap<Ipv4Addr, u16>,
    /// DSR backends' addresses -> their index in `dsr_vm`.
    dsr_index: FxMap<Ipv4Addr, usize>,
    /// Each DSR port's VM and address (index = [`DSR_PORT_TOP`] - port).
    dsr_vm: Vec<(usize, Ipv4Addr)>,
}

/// The snapshot's lookup maps are read on every new flow: FxHash, not SipHash
/// (the keys come from packets, but the maps only hold the policy's own
/// addresses, so flooding them is not possible).
type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The most vnets a policy holds.
pub const MAX_VNETS: u16 = u16::MAX;

/// The IPv4 address `ip` writes in IPv6's IPv4-mapped form
/// (`::ffff:a.b.c.d`), if it does: flow keys hold IPv4 addresses so, and
/// the parser drops IPv6 packets with such addresses, so a VM or endpoint
/// must not be given one.
fn v4_mapped(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

impl Policy {
    /// Compiles a topology into snapshot `generation`; every problem is reported.
    pub fn compile(t: &Topology, generation: u64) -> Result<Policy, PolicyError> {
        let mut errs = Vec::new();
        // A flow names its connection's vnet in 16 bits (`LbRef`).
        if t.vnets.len() > usize::from(MAX_VNETS) {
            errs.push(format!(
                "{} vnets: at most {MAX_VNETS} are supported",
                t.vnets.len()
            ));
        }
        let mut vnets: Vec<Vnet> = t
            .vnets
            .iter()
            .map(|v| Vnet {
                name: v.name.clone(),
                prefixes: v.prefixes.clone(),
                gateway_mac: v.gateway_mac,
                vips: Vips::new(),
                snat: v.snat.clone(),
                vni: v.vni,
                encap: v.encap,
            })
            .collect();
        let mut public: FxMap<[u8; 16], usize> = FxMap::default();
        let mut claim = |ip: IpAddr, vnet: usize, what: &str, errs: &mut Vec<String>| {
            let name = |i: usize| t.vnets.get(i).map_or("?", |v| v.name.as_str());
            match public.insert(to16(ip), vnet) {
                Some(other) if other != vnet => errs.push(format!(
                    "{what}: public address {ip} is already used by vnet {:?}",
                    name(other)
                )),
                _ => {}
            }
        };
        for (i, v) in t.vnets.iter().enumerate() {
            let Some(snat) = &v.snat else { continue };
            let what = format!("vnet {:?}: snat", v.name);
            if t.uplink.is_none() {
                errs.push(format!("{what} needs an uplink"));
            }
            if let Err(e) = lb::snat::SnatAllocator::new(snat.clone()) {
                errs.push(format!("{what}: {e}"));
            }
            for ip in &snat.public_ips {
                if v.prefixes.iter().any(|n| n.contains(ip)) {
                    errs.push(format!("{what}: public address {ip} is inside the vnet"));
                }
                claim(*ip, i, &what, &mut errs);
            }
        }
        let health = Arc::new(HealthClock::default());
        let mut vips = Vec::new();
        if t.vips.len() > usize::from(NO_VIP) {
            errs.push(format!(
                "{} vips: at most {} fit in one policy",
                t.vips.len(),
                NO_VIP
            ));
        }
        for v in &t.vips {
            let id = vips.len() as u16;
            match vnets.get_mut(v.vnet) {
                Some(vn) => match Vip::new(v.config.clone(), &v.health) {
                    Ok(vip) => {
                        let vip = vip.numbered(id, health.clone());
                        let addr = v.config.addr;
                        let what = format!("vip {:?}", v.config.name);
                        let mode = v.config.mode;
                        if mode != VipMode::Local && vn.contains(&addr) {
                            errs.push(format!(
                                "{what}: a {} vip's address {addr} must be outside vnet {:?} (it is reached from the wire)",
                                mode.name(),
                                vn.name
                            ));
                        }
                        if !vn.contains(&addr) {
                            if t.uplink.is_none() {
                                errs.push(format!(
                                    "{what}: address {addr} is outside vnet {:?} and there is no uplink",
                                    vn.name
                                ));
                            }
                            // A DSR VIP is the Muxes' on the wire: this
                            // host answers no ARP or ping for it.
                            if mode != VipMode::Dsr {
                                claim(addr, v.vnet, &what, &mut errs);
                            }
                        }
                        vips.push(vn.vips.insert(vip));
                    }
                    Err(e) => errs.push(e.to_string()),
                },
                None => errs.push(format!("vip {:?}: no vnet #{}", v.config.name, v.vnet)),
            }
        }
        // A group is compiled per vnet: its defaults name the vnet's prefixes.
        let mut nsgs = Vec::new();
        let mut nsg_index: HashMap<(usize, usize), usize> = HashMap::new();
        let mut port_vm = vec![None; usize::from(t.ports)];
        let mut addr_vm = FxMap::default();
        let mut vms = Vec::new();
        for (i, vm) in t.vms.iter().enumerate() {
            let Some(vn) = t.vnets.get(vm.vnet) else {
                errs.push(format!("vm {:?}: no vnet #{}", vm.name, vm.vnet));
                continue;
            };
            match port_vm.get_mut(usize::from(vm.port)) {
                Some(slot @ None) => *slot = Some(i),
                Some(Some(_)) => errs.push(format!(
                    "vm {:?}: port #{} already has a vm",
                    vm.name, vm.port
                )),
                None => errs.push(format!("vm {:?}: no port #{}", vm.name, vm.port)),
            }
            for ip in &vm.ips {
                if let Some(v4) = v4_mapped(ip) {
                    errs.push(format!(
                        "vm {:?}: {ip} is an IPv4-mapped IPv6 address: write it as {v4}",
                        vm.name
                    ));
                }
                if addr_vm.insert((vm.vnet, to16(*ip)), i).is_some() {
                    errs.push(format!(
                        "vm {:?}: {ip} is used twice in vnet {:?}",
                        vm.name, vn.name
                    ));
                }
            }
            let nsg = match vm.nsg {
                None => None,
                Some(g) => match nsg_index.get(&(g, vm.vnet)) {
                    Some(&c) => Some(c),
                    None => match t.nsgs.get(g) {
                        None => {
                            errs.push(format!("vm {:?}: no nsg #{g}", vm.name));
                            None
                        }
                        Some(spec) => match filter::compile_nsg(
                            spec,
                            &DefaultContext::for_vnet(vn.prefixes.clone()),
                        ) {
                            Ok(c) => {
                                nsgs.push(c);
                                nsg_index.insert((g, vm.vnet), nsgs.len() - 1);
                                Some(nsgs.len() - 1)
                            }
                            Err(es) => {
                                errs.extend(es.iter().map(|e| e.to_string()));
                                None
                            }
                        },
                    },
                },
            };
            vms.push(VmDef { nsg, ..vm.clone() });
        }
        // Tunnel ports lie above every real port.
        if t.ports >= TUNNEL_PORT_BASE {
            errs.push(format!(
                "{} ports: at most {TUNNEL_PORT_BASE} are supported",
                t.ports
            ));
        }
        // The underlay is the provider's network: no vnet may hold its
        // addresses, and no public address may be the uplink's own.
        if let Some(ul) = t.uplink.as_ref().and_then(|u| u.underlay.as_ref()) {
            let under = IpNet::V4(ul.address.trunc());
            for v in &t.vnets {
                if v.prefixes
                    .iter()
                    .any(|n| n.contains(&under) || under.contains(n))
                {
                    errs.push(format!(
                        "vnet {:?}: its prefixes overlap the uplink's network {under}",
                        v.name
                    ));
                }
                for r in &t.remotes {
                    if v.prefixes.iter().any(|n| n.contains(&IpAddr::V4(r.host))) {
                        errs.push(format!(
                            "vnet {:?}: its prefixes hold remote {:?}'s host {}",
                            v.name, r.name, r.host
                        ));
                    }
                }
            }
            if public.contains_key(&to16(IpAddr::V4(ul.address.addr()))) {
                errs.push(format!(
                    "uplink: address {} is also a public address (SNAT or VIP)",
                    ul.address.addr()
                ));
            }
        }
        // Vnets on the overlay: VNIs unique, 24 bits.
        let mut vni_vnet = FxMap::default();
        for (i, v) in t.vnets.iter().enumerate() {
            let Some(vni) = v.vni else { continue };
            if vni == 0 || vni > 0x00ff_ffff {
                errs.push(format!("vnet {:?}: vni {vni} is not in 1-16777215", v.name));
            } else if let Some(o) = vni_vnet.insert(vni, i) {
                errs.push(format!(
                    "vnet {:?}: vni {vni} is already vnet {:?}'s",
                    v.name,
                    t.vnets.get(o).map_or("?", |v| v.name.as_str())
                ));
            }
        }
        // Remote endpoints: VMs of their vnet on their tunnel ports.
        let underlay = t
            .uplink
            .as_ref()
            .and_then(|u| Some((u, u.underlay.as_ref()?)));
        let neighbours: FxMap<Ipv4Addr, MacAddr> = t.neighbours.iter().copied().collect();
        let mut tunnels = Vec::new();
        let mut tunnel_vm = Vec::new();
        if t.remotes.len() > MAX_REMOTES {
            errs.push(format!(
                "{} remotes: at most {MAX_REMOTES} fit in one policy",
                t.remotes.len()
            ));
        }
        for (k, r) in t.remotes.iter().enumerate().take(MAX_REMOTES) {
            let what = format!("remote {:?}", r.name);
            let Some(vn) = t.vnets.get(r.vnet) else {
                errs.push(format!("{what}: no vnet #{}", r.vnet));
                continue;
            };
            let Some(vni) = vn.vni else {
                errs.push(format!(
                    "{what}: vnet {:?} has no vni (it is on no overlay)",
                    vn.name
                ));
                continue;
            };
            let Some((up, ul)) = underlay else {
                errs.push(format!("{what}: tunnels need an [uplink] with an address"));
                continue;
            };
            let i = vms.len();
            for ip in &r.ips {
                if let Some(v4) = v4_mapped(ip) {
                    errs.push(format!(
                        "{what}: {ip} is an IPv4-mapped IPv6 address: write it as {v4}"
                    ));
                }
                if !vn.prefixes.iter().any(|n| n.contains(ip)) {
                    errs.push(format!("{what}: {ip} is not in vnet {:?}", vn.name));
                }
                if addr_vm.insert((r.vnet, to16(*ip)), i).is_some() {
                    errs.push(format!("{what}: {ip} is used twice in vnet {:?}", vn.name));
                }
            }
            if r.host == ul.address.addr() {
                errs.push(format!(
                    "{what}: host {} is this host's own address",
                    r.host
                ));
            }
            vms.push(VmDef {
                name: r.name.clone(),
                port: TUNNEL_PORT_BASE + k as u16,
                vnet: r.vnet,
                mac: r.mac.unwrap_or(vn.gateway_mac),
                ips: r.ips.clone(),
                nsg: None,
                internal: false,
            });
            tunnel_vm.push(i);
            let via = (up, ul, &neighbours);
            tunnels.push(Tunnel::to(&r.name, r.vnet, (vn.encap, vni), r.host, via));
        }
        // A Mux's backends: a tunnel each (IP in IP to the DIP's address),
        // after the remote endpoints'. A DSR VIP's backends: a port each,
        // down from `DSR_PORT_TOP`, that the Muxes' packets to it come in
        // on.
        let mut mux_ports: FxMap<Ipv4Addr, u16> = FxMap::default();
        for v in t.vips.iter().filter(|v| v.config.mode == VipMode::Mux) {
            let what = format!("vip {:?}", v.config.name);
            let Some((up, ul)) = underlay else {
                errs.push(format!(
                    "{what}: a mux vip needs an [uplink] with an address"
                ));
                continue;
            };
            for b in &v.config.backends {
                // (IPv4: `Vip::new` refused the rest.)
                let IpAddr::V4(dip) = b.ip else { continue };
                if t.vms
                    .iter()
                    .any(|vm| vm.vnet == v.vnet && vm.ips.contains(&b.ip))
                {
                    errs.push(format!(
                        "{what}: backend {dip} is a vm of this host (a mux's backends are on other hosts)"
                    ));
                    continue;
                }
                if dip == ul.address.addr() {
                    errs.push(format!("{what}: backend {dip} is this host's own address"));
                    continue;
                }
                if ul.next_hop(dip).is_none() {
                    errs.push(format!(
                        "{what}: backend {dip} has no route on the underlay"
                    ));
                    continue;
                }
                if mux_ports.contains_key(&dip) {
                    continue;
                }
                mux_ports.insert(dip, TUNNEL_PORT_BASE.saturating_add(tunnels.len() as u16));
                let name = format!("{}/{dip}", v.config.name);
                let via = (up, ul, &neighbours);
                tunnels.push(Tunnel::to(&name, v.vnet, (Encap::Ipip, 0), dip, via));
            }
        }
        let mut dsr_index: FxMap<Ipv4Addr, usize> = FxMap::default();
        let mut dsr_vm: Vec<(usize, Ipv4Addr)> = Vec::new();
        for v in t.vips.iter().filter(|v| v.config.mode == VipMode::Dsr) {
            let what = format!("vip {:?}", v.config.name);
            match underlay {
                None => {
                    errs.push(format!(
                        "{what}: a dsr vip needs an [uplink] with an address"
                    ));
                    continue;
                }
                Some((_, ul)) if ul.muxes.is_empty() => {
                    errs.push(format!(
                        "{what}: a dsr vip needs the uplink's muxes (whose IP in IP it takes)"
                    ));
                }
                Some(_) => {}
            }
            if public.contains_key(&to16(v.config.addr)) {
                errs.push(format!(
                    "{what}: address {} is also a public address of this host",
                    v.config.addr
                ));
            }
            for b in &v.config.backends {
                let IpAddr::V4(dip) = b.ip else { continue };
                let vm = addr_vm
                    .get(&(v.vnet, to16(b.ip)))
                    .copied()
                    .filter(|&i| vms.get(i).is_some_and(|vm: &Vm| !vm.is_remote()));
                let Some(i) = vm else {
                    errs.push(format!(
                        "{what}: backend {dip} is no vm of this host (a dsr vip's backends are)"
                    ));
                    continue;
                };
                match dsr_index.get(&dip) {
                    Some(&k) => {
                        if dsr_vm.get(k).map(|d| d.0) != Some(i) {
                            errs.push(format!(
                                "{what}: backend {dip} is a dsr backend in another vnet (the Muxes name it by its address alone)"
                            ));
                        }
                    }
                    None => {
                        dsr_index.insert(dip, dsr_vm.len());
                        dsr_vm.push((i, dip));
                    }
                }
            }
        }
        if tunnels.len() + dsr_vm.len() > MAX_REMOTES {
            errs.push(format!(
                "{} tunnels and {} dsr backends: at most {MAX_REMOTES} fit in one policy",
                tunnels.len(),
                dsr_vm.len()
            ));
        }
        let mut services = std::collections::HashSet::default();
        for v in &t.vips {
            let c = &v.config;
            services.insert((to16(c.addr), c.port, c.proto));
            for b in &c.backends {
                services.insert((to16(b.ip), b.port, c.proto));
            }
        }
        if let Some(u) = &t.uplink {
            match port_vm.get(usize::from(u.port)) {
                None => errs.push(format!("uplink: no port #{}", u.port)),
                Some(Some(vm)) => errs.push(format!(
                    "uplink: port #{} already has vm {:?}",
                    u.port,
                    t.vms.get(*vm).map_or("?", |v| v.name.as_str())
                )),
                Some(None) => {}
            }
        }
        if !errs.is_empty() {
            // Each problem once (a broken group is compiled, and reported,
            // for every VM that names it).
            let mut seen = std::collections::HashSet::new();
            errs.retain(|e| seen.insert(e.clone()));
            return Err(PolicyError(errs));
        }
        Ok(Policy {
            generation,
            vnets,
            vms,
            uplink: t.uplink.clone(),
            nsgs: Arc::new(nsgs),
            port_vm,
            addr_vm,
            public,
            services,
            vips,
            health,
            tunnels,
            tunnel_vm,
            vni_vnet,
            neighbours,
            mux_ports,
            dsr_index,
            dsr_vm,
        })
    }

    /// The tunnel port a Mux sends to backend `dip` through.
    #[inline]
    pub fn mux_port(&self, dip: IpAddr) -> Option<u16> {
        let IpAddr::V4(d) = dip else { return None };
        self.mux_ports.get(&d).copied()
    }

    /// The port of DSR backend `dip` (the outer destination of a Mux's
    /// packet) and its VM.
    #[inline]
    pub fn dsr_backend(&self, dip: Ipv4Addr) -> Option<(u16, &Vm)> {
        let k = *self.dsr_index.get(&dip)?;
        let (i, _) = *self.dsr_vm.get(k)?;
        let port = DSR_PORT_TOP.checked_sub(u16::try_from(k).ok()?)?;
        Some((port, self.vms.get(i)?))
    }

    /// The DSR backend whose Mux traffic comes in on `port`: its VM and
    /// the address the Muxes send to.
    #[inline]
    pub fn dsr_on_port(&self, port: u16) -> Option<(&Vm, Ipv4Addr)> {
        let k = DSR_PORT_TOP.checked_sub(port)?;
        let (i, ip) = *self.dsr_vm.get(usize::from(k))?;
        Some((self.vms.get(i)?, ip))
    }

    /// True when a VIP takes Mux traffic (IP in IP may arrive).
    #[inline]
    pub fn has_dsr(&self) -> bool {
        !self.dsr_vm.is_empty()
    }

    /// The VM attached to `port` (a remote endpoint, for a tunnel port).
    #[inline]
    pub fn vm_on_port(&self, port: u16) -> Option<(usize, &Vm)> {
        let i = match port.checked_sub(TUNNEL_PORT_BASE) {
            Some(k) => *self.tunnel_vm.get(usize::from(k))?,
            None => (*self.port_vm.get(usize::from(port))?)?,
        };
        Some((i, self.vms.get(i)?))
    }

    /// The tunnel of tunnel port `port`.
    #[inline]
    pub fn tunnel(&self, port: u16) -> Option<&Tunnel> {
        self.tunnels
            .get(usize::from(port.checked_sub(TUNNEL_PORT_BASE)?))
    }

    /// The vnet of VNI `vni`.
    #[inline]
    pub fn vnet_by_vni(&self, vni: u32) -> Option<usize> {
        self.vni_vnet.get(&vni).copied()
    }

    /// The uplink and its underlay, when it has an address.
    #[inline]
    pub fn underlay(&self) -> Option<(&UplinkDef, &Underlay)> {
        let u = self.uplink.as_ref()?;
        Some((u, u.underlay.as_ref()?))
    }

    /// The MAC a packet to `dst` on the wire goes to: the uplink's static
    /// next hop, or, with an underlay, the MAC of the next hop its routes
    /// give. `Err(Some(hop))` while that next hop's MAC is unknown,
    /// `Err(None)` when there is no route.
    pub fn wire_mac(&self, dst: IpAddr) -> Result<MacAddr, Option<Ipv4Addr>> {
        let up = self.uplink.as_ref().ok_or(None)?;
        let hop = match (&up.underlay, dst) {
            (Some(ul), IpAddr::V4(d)) => ul.next_hop(d),
            _ => None,
        };
        match hop {
            Some(h) => self.neighbours.get(&h).copied().ok_or(Some(h)),
            None if up.next_hop_mac != MacAddr::ZERO => Ok(up.next_hop_mac),
            None => Err(None),
        }
    }

    /// True for the uplink's own address.
    #[inline]
    pub fn is_own_address(&self, ip: IpAddr) -> bool {
        self.underlay()
            .is_some_and(|(_, ul)| ip == IpAddr::V4(ul.address.addr()))
    }

    /// True when a vnet is on the overlay (has a VNI) and the uplink has an
    /// address: tunnel packets may arrive.
    #[inline]
    pub fn has_overlay(&self) -> bool {
        !self.vni_vnet.is_empty() && self.underlay().is_some()
    }

    /// True for an address of the underlay: on the uplink's network, or a
    /// tunnel's host. No VM may send there.
    pub fn is_underlay(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(v4) = ip else { return false };
        self.underlay()
            .is_some_and(|(_, ul)| ul.address.contains(&v4))
            || self.tunnels.iter().any(|t| t.host == v4)
    }

    /// The MAC known for neighbour `ip`.
    pub fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.neighbours.get(&ip).copied()
    }

    /// The next hops this policy sends through: its routes' and its
    /// tunnels' (the neighbour cache keeps them resolved).
    pub fn next_hops(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .underlay()
            .map(|(_, ul)| ul.routes.iter().map(|r| r.1).collect())
            .unwrap_or_default();
        v.extend(self.tunnels.iter().filter_map(|t| t.next_hop));
        v.sort();
        v.dedup();
        v
    }

    /// Whether `ip` (16-byte form) is one of VM `i`'s addresses: one probe
    /// of the address map, however many addresses the VM has (a node
    /// carrying its pods' addresses has hundreds).
    #[inline]
    pub fn vm_owns(&self, i: usize, ip: [u8; 16]) -> bool {
        self.vms
            .get(i)
            .is_some_and(|vm| self.addr_vm.get(&(vm.vnet, ip)) == Some(&i))
    }

    /// The VM with address `ip` (16-byte form) in vnet `vnet`.
    #[inline]
    pub fn vm_by_addr(&self, vnet: usize, ip: [u8; 16]) -> Option<(usize, &Vm)> {
        let i = *self.addr_vm.get(&(vnet, ip))?;
        Some((i, self.vms.get(i)?))
    }

    /// The vnet owning public address `ip` (16-byte form): one of its SNAT
    /// addresses or of its VIPs outside its prefixes.
    #[inline]
    pub fn vnet_by_public(&self, ip: [u8; 16]) -> Option<usize> {
        self.public.get(&ip).copied()
    }

    /// True when (`ip`, `port`, `proto`) is a VIP frontend or a backend.
    #[inline]
    pub fn is_service(&self, ip: [u8; 16], port: u16, proto: u8) -> bool {
        !self.services.is_empty() && self.services.contains(&(ip, port, proto))
    }

    /// The worker (of `workers`) that owns SNAT port `port` of public
    /// address `ip`, when `ip` is a SNAT address.
    #[inline]
    pub fn snat_worker(&self, ip: [u8; 16], port: u16, workers: usize) -> Option<usize> {
        let v = self.vnets.get(*self.public.get(&ip)?)?;
        let snat = v.snat.as_ref()?;
        if !snat.public_ips.iter().any(|a| to16(*a) == ip) {
            return None;
        }
        snat.worker_of(port, workers)
    }

    /// True when `port` is the uplink.
    #[inline]
    pub fn is_uplink(&self, port: u16) -> bool {
        self.uplink.as_ref().is_some_and(|u| u.port == port)
    }

    /// Sets the health of backend `backend` of VIP `vip` in vnet `vnet`, in
    /// place: the VIP swaps in a new backend set and the health clock ticks,
    /// so workers revalidate the cached flows of that VIP only; the policy
    /// generation stays. Returns whether it changed.
    pub fn set_health(
        &self,
        vnet: usize,
        vip: (IpAddr, u16, u8),
        backend: usize,
        healthy: bool,
    ) -> Result<bool, PolicyError> {
        let vn = self
            .vnets
            .get(vnet)
            .ok_or_else(|| PolicyError(vec![format!("no vnet #{vnet}")]))?;
        vn.vips
            .set_health(vip, backend, healthy)
            .map_err(|e| PolicyError(vec![e.to_string()]))
    }

    /// Every VIP, by number.
    pub fn vips(&self) -> &[Arc<Vip>] {
        &self.vips
    }

    /// Health changes of this snapshot's VIPs so far.
    #[inline]
    pub fn health_changes(&self) -> u64 {
        self.health.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, port: u16, vnet: usize, ip: &str) -> VmDef {
        VmDef {
            name: name.into(),
            port,
            vnet,
            mac: MacAddr([2, 0, 0, 0, 0, port as u8 + 1]),
            ips: vec![ip.parse().unwrap()],
            nsg: None,
            internal: false,
        }
    }

    fn topo() -> Topology {
        let vnet = |n: &str| VnetDef {
            name: n.into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: MacAddr([0x12, 0, 0, 0, 0, 1]),
            snat: None,
            vni: None,
            encap: Default::default(),
        };
        Topology {
            vnets: vec![vnet("a"), vnet("b")],
            vms: vec![vm("x", 0, 0, "10.1.0.4"), vm("y", 1, 1, "10.1.0.4")],
            nsgs: vec![],
            vips: vec![],
            ports: 3,
            uplink: None,
            remotes: Vec::new(),
            neighbours: Vec::new(),
        }
    }

    #[test]
    fn lookups_are_per_vnet() {
        let p = Policy::compile(&topo(), 7).unwrap();
        assert_eq!(p.generation, 7);
        let ip = to16("10.1.0.4".parse().unwrap());
        assert_eq!(p.vm_by_addr(0, ip).unwrap().1.name, "x");
        assert_eq!(p.vm_by_addr(1, ip).unwrap().1.name, "y");
        assert_eq!(p.vm_on_port(1).unwrap().1.name, "y");
        assert!(p.vm_on_port(2).is_none());
        assert!(p.vm_on_port(9).is_none());
    }

    #[test]
    fn a_vm_owns_exactly_its_addresses() {
        let mut t = topo();
        // Forty distinct addresses (0, 7, 14, ..., 63, 6, ...), as a node
        // that carries its pods' addresses has.
        t.vms[0].ips = (0..40u8)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 1, i.wrapping_mul(7) % 64)))
            .collect();
        let p = Policy::compile(&t, 1).unwrap();
        for (i, vm) in t.vms.iter().enumerate() {
            for last in 0..=255u8 {
                let a = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 1, last));
                assert_eq!(p.vm_owns(i, to16(a)), vm.ips.contains(&a), "vm {i} {a}");
            }
            for a in &vm.ips {
                assert!(p.vm_owns(i, to16(*a)), "vm {i} {a}");
            }
        }
        assert!(!p.vm_owns(9, to16("10.1.0.4".parse().unwrap())));
        // Another VM of the same vnet, with an IPv6 address too: each owns
        // its own addresses, not the other's.
        let mut w = vm("w", 2, 0, "10.1.0.9");
        w.ips.push("fd00::9".parse().unwrap());
        t.vms.push(w);
        t.vms[0].ips.push("fd00::4".parse().unwrap());
        let p = Policy::compile(&t, 2).unwrap();
        for (i, vm) in t.vms.iter().enumerate() {
            for (j, other) in t.vms.iter().enumerate() {
                for a in &other.ips {
                    // (x and y both have 10.1.0.4, each in its own vnet.)
                    let owns = vm.ips.contains(a);
                    assert_eq!(p.vm_owns(i, to16(*a)), owns, "vm {i} {a} of {j}");
                }
            }
        }
    }

    #[test]
    fn a_broken_group_is_reported_once_however_many_vms_name_it() {
        let mut t = topo();
        let rule = |name: &str| filter::RuleSpec {
            name: Some(name.into()),
            priority: 100,
            direction: "in".into(),
            action: "allow".into(),
            protocol: "udp".into(),
            src: vec!["any".into()],
            dst: vec!["any".into()],
            src_ports: vec!["any".into()],
            dst_ports: vec!["53".into()],
            stateful: None,
        };
        t.nsgs = vec![NsgSpec {
            name: "g".into(),
            rules: vec![rule("a"), rule("b")],
        }];
        t.vms.push(vm("z", 2, 0, "10.1.0.9"));
        for v in &mut t.vms {
            v.nsg = Some(0);
        }
        let err = Policy::compile(&t, 1).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].contains("priority 100"), "{err}");
    }

    #[test]
    fn an_ipv4_mapped_address_is_refused_for_a_vm() {
        let mut t = topo();
        t.vms[1].ips = vec!["::ffff:10.1.0.8".parse().unwrap()];
        let err = Policy::compile(&t, 1).unwrap_err().to_string();
        assert!(
            err.contains(
                "vm \"y\": ::ffff:10.1.0.8 is an IPv4-mapped IPv6 address: write it as 10.1.0.8"
            ),
            "{err}"
        );
    }

    fn mux_vip(vnet: usize, mode: VipMode, backends: &[&str]) -> VipDef {
        let bs = backends
            .iter()
            .map(|b| lb::balancer::Backend {
                ip: b.parse().unwrap(),
                port: 8080,
                weight: 1,
            })
            .collect();
        let mut config = VipConfig::new("web", "192.0.2.10".parse().unwrap(), 80, 6, bs);
        config.mode = mode;
        VipDef {
            vnet,
            config,
            health: vec![],
        }
    }

    fn underlay_uplink() -> UplinkDef {
        UplinkDef {
            port: 2,
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            next_hop_mac: MacAddr::ZERO,
            underlay: Some(Underlay {
                address: "10.200.0.1/24".parse().unwrap(),
                routes: vec![(
                    "10.2.0.0/16".parse().unwrap(),
                    "10.200.0.3".parse().unwrap(),
                )],
                muxes: vec!["10.200.0.0/29".parse().unwrap()],
            }),
        }
    }

    #[test]
    fn a_mux_has_a_tunnel_per_dip_and_a_dsr_host_a_port_per_backend() {
        let mut t = topo();
        t.uplink = Some(underlay_uplink());
        t.neighbours = vec![("10.200.0.3".parse().unwrap(), MacAddr([2, 0, 0, 0, 3, 3]))];
        // On a Mux: DIPs behind a route, and one on-link.
        t.vips = vec![mux_vip(
            0,
            VipMode::Mux,
            &["10.2.0.4", "10.2.0.5", "10.200.0.7"],
        )];
        let p = Policy::compile(&t, 1).unwrap();
        let port = p.mux_port("10.2.0.5".parse().unwrap()).unwrap();
        let tn = p.tunnel(port).unwrap();
        assert_eq!(
            (tn.name.as_str(), tn.encap, tn.next_hop),
            (
                "web/10.2.0.5",
                Encap::Ipip,
                Some("10.200.0.3".parse().unwrap())
            )
        );
        assert_eq!(
            tn.outer.unwrap().dst_ip,
            "10.2.0.5".parse::<Ipv4Addr>().unwrap()
        );
        // The on-link DIP's MAC is not known yet.
        let onlink = p
            .tunnel(p.mux_port("10.200.0.7".parse().unwrap()).unwrap())
            .unwrap();
        assert!(onlink.outer.is_none());
        assert!(p.vm_on_port(port).is_none());
        // The Mux answers for the VIP on the wire; its next hops include
        // the on-link DIP.
        assert_eq!(
            p.vnet_by_public(to16("192.0.2.10".parse().unwrap())),
            Some(0)
        );
        assert!(p.next_hops().contains(&"10.200.0.7".parse().unwrap()));
        // On a host: a port per backend, not answered on the wire.
        t.vips = vec![mux_vip(0, VipMode::Dsr, &["10.1.0.4"])];
        let p = Policy::compile(&t, 2).unwrap();
        assert!(p.has_dsr());
        let (port, vm) = p.dsr_backend("10.1.0.4".parse().unwrap()).unwrap();
        assert_eq!(vm.name, "x");
        assert_eq!(
            p.dsr_on_port(port).unwrap().1,
            "10.1.0.4".parse::<Ipv4Addr>().unwrap()
        );
        assert!(
            p.vnet_by_public(to16("192.0.2.10".parse().unwrap()))
                .is_none()
        );
        assert!(p.dsr_backend("10.1.0.5".parse().unwrap()).is_none());
    }

    #[test]
    fn mux_and_dsr_problems_are_reported() {
        let mut t = topo();
        // No underlay.
        t.vips = vec![
            mux_vip(0, VipMode::Mux, &["10.2.0.4"]),
            mux_vip(1, VipMode::Dsr, &["10.1.0.4"]),
        ];
        t.vips[1].config.addr = "192.0.2.11".parse().unwrap();
        t.uplink = Some(UplinkDef {
            underlay: None,
            next_hop_mac: MacAddr([2, 0, 0, 0, 0, 8]),
            ..underlay_uplink()
        });
        let text = Policy::compile(&t, 1).unwrap_err().0.join("\n");
        for want in [
            "a mux vip needs an [uplink] with an address",
            "a dsr vip needs an [uplink] with an address",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        // A DSR host with no Muxes to take IP in IP from.
        let mut u = underlay_uplink();
        if let Some(ul) = u.underlay.as_mut() {
            ul.muxes.clear();
        }
        t.uplink = Some(u);
        let text = Policy::compile(&t, 1).unwrap_err().0.join("\n");
        assert!(
            text.contains("a dsr vip needs the uplink's muxes"),
            "{text}"
        );
        t.uplink = Some(underlay_uplink());
        // A local VM, the Mux's own address, no route; an address inside
        // the vnet.
        t.vips = vec![mux_vip(
            0,
            VipMode::Mux,
            &["10.1.0.4", "10.200.0.1", "10.9.0.1"],
        )];
        t.vips[0].config.addr = "10.1.0.100".parse().unwrap();
        let text = Policy::compile(&t, 1).unwrap_err().0.join("\n");
        for want in [
            "backend 10.1.0.4 is a vm of this host",
            "backend 10.200.0.1 is this host's own address",
            "backend 10.9.0.1 has no route on the underlay",
            "a mux vip's address 10.1.0.100 must be outside vnet \"a\"",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        // A DSR backend that is no VM here, one that is a DSR backend in
        // two vnets, an address that is also a SNAT address.
        t.vnets[0].snat = Some(snat("192.0.2.10"));
        t.vips = vec![
            mux_vip(0, VipMode::Dsr, &["10.1.0.4", "10.1.0.9"]),
            mux_vip(1, VipMode::Dsr, &["10.1.0.4"]),
        ];
        t.vips[1].config.addr = "192.0.2.11".parse().unwrap();
        let text = Policy::compile(&t, 1).unwrap_err().0.join("\n");
        for want in [
            "backend 10.1.0.9 is no vm of this host",
            "backend 10.1.0.4 is a dsr backend in another vnet",
            "address 192.0.2.10 is also a public address of this host",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let mut t = topo();
        t.vms.push(vm("z", 0, 0, "10.1.0.4"));
        t.vms.push(vm("w", 9, 5, "10.1.0.9"));
        t.vms[0].nsg = Some(3);
        let e = Policy::compile(&t, 1).unwrap_err();
        let text = e.0.join("\n");
        assert!(
            text.contains("vm \"z\": port #0 already has a vm"),
            "{text}"
        );
        assert!(
            text.contains("vm \"z\": 10.1.0.4 is used twice in vnet \"a\""),
            "{text}"
        );
        assert!(text.contains("vm \"w\": no vnet #5"), "{text}");
        assert!(text.contains("vm \"x\": no nsg #3"), "{text}");
    }

    fn snat(ip: &str) -> SnatConfig {
        SnatConfig {
            public_ips: vec![ip.parse().unwrap()],
            ..SnatConfig::default()
        }
    }

    #[test]
    fn public_addresses_map_to_their_vnet() {
        let mut t = topo();
        t.uplink = Some(UplinkDef {
            port: 2,
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            next_hop_mac: MacAddr([2, 0, 0, 0, 0, 10]),
            underlay: None,
        });
        t.vnets[1].snat = Some(snat("203.0.113.7"));
        let p = Policy::compile(&t, 1).unwrap();
        assert_eq!(
            p.vnet_by_public(to16("203.0.113.7".parse().unwrap())),
            Some(1)
        );
        assert_eq!(p.vnet_by_public(to16("203.0.113.8".parse().unwrap())), None);
        assert!(p.is_uplink(2) && !p.is_uplink(1));
    }

    #[test]
    fn uplink_and_snat_problems_are_reported() {
        let mut t = topo();
        t.vnets[0].snat = Some(snat("203.0.113.7"));
        t.vnets[1].snat = Some(snat("10.1.0.9"));
        let text = Policy::compile(&t, 1).unwrap_err().0.join("\n");
        assert!(text.contains("vnet \"a\": snat needs an uplink"), "{text}");
        assert!(
            text.contains("vnet \"b\": snat: public address 10.1.0.9 is inside the vnet"),
            "{text}"
        );
        t.vnets[1].snat = Some(snat("203.0.113.7"));
        t.uplink = Some(UplinkDef {
            port: 1,
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            next_hop_mac: MacAddr([2, 0, 0, 0, 0, 10]),
            underlay: None,
        });
        let text = Policy::compile(&t, 1).unwrap_err().0.join("\n");
        assert!(
            text.contains(
                "vnet \"b\": snat: public address 203.0.113.7 is already used by vnet \"a\""
            ),
            "{text}"
        );
        assert!(
            text.contains("uplink: port #1 already has vm \"y\""),
            "{text}"
        );
    }
}
