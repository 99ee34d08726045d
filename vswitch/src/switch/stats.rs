//! Why the switch drops packets, and its counters.

use filter::HitCounters;
use lb::balancer::LbDrop;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the switch dropped a packet (beyond parse errors, which the worker
/// counts under `DropReason::Malformed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchDrop {
    /// Source MAC or IP is not the VM's on that port.
    Spoofed,
    /// A security-group rule denied it.
    AclDeny,
    /// The destination is not a VM of the source's vnet.
    NoRoute,
    /// Arrived on a port with no VM.
    NoVm,
    /// An ARP packet the switch does not answer (a reply, or an address outside the vnet).
    ArpIgnored,
    /// A protocol the switch does not carry (non-IP, non-ARP).
    Unsupported,
    /// The owning worker's mailbox was full.
    HandoffFull,
    /// IPv6 neighbour or multicast-listener discovery the switch does not
    /// answer (advertisements, router and listener messages, duplicate
    /// address detection, targets outside the vnet).
    NdIgnored,
    /// TTL or hop limit expired.
    TtlExpired,
    /// The header rewrite failed.
    RewriteFailed,
    /// A fragment after the first whose first fragment this worker has not
    /// seen: it did not come within the hold time (lost, or the first's
    /// entry expired), or the hold of fragments waiting for theirs was
    /// full.
    FragNoFirst,
    /// An ICMP error about no connection the switch tracks.
    IcmpUnrelated,
    /// Larger than the output port's MTU (and not answered with
    /// "fragmentation needed": fragmentable, IPv6, or over the ICMP rate).
    TooBig,
    /// Data a client sent on a SYN-proxied connection before its backend
    /// answered, held for it, whose place a later one took (the oldest
    /// held goes; the client sends it again).
    SynProxyParkFull,
    /// Data held for a SYN-proxied connection that ended (the client reset
    /// it, or it timed out) before its backend answered.
    SynProxyParkExpired,
    /// A hairpinned packet (to a public address of the switch) found
    /// [`super::HAIRPIN_QUEUE`] others waiting to go through again.
    HairpinFull,
    /// To the wire or a tunnel through a next hop whose MAC the underlay
    /// is still resolving (the control thread sends ARP requests for it).
    NeighborUnresolved,
    /// A tunnel packet (VXLAN or Geneve, to the uplink's address) that is
    /// truncated, fragmented, or has a header the switch does not take
    /// (flags, version, critical options, a payload other than Ethernet).
    TunnelMalformed,
    /// A tunnel packet with a VNI no vnet has.
    TunnelUnknownVni,
    /// A tunnel packet whose inner source is no remote endpoint of the
    /// VNI's vnet.
    TunnelUnknownSource,
    /// A tunnel packet whose inner source is a remote endpoint living on
    /// another host than the one that sent it.
    TunnelSpoofed,
    /// An ARP reply or announcement on the uplink, taken in by the
    /// underlay's neighbour cache (not forwarded).
    ArpToCache,
    /// The load balancer dropped it.
    Lb(LbDrop),
}

const BASE: [SwitchDrop; 22] = [
    SwitchDrop::Spoofed,
    SwitchDrop::AclDeny,
    SwitchDrop::NoRoute,
    SwitchDrop::NoVm,
    SwitchDrop::ArpIgnored,
    SwitchDrop::Unsupported,
    SwitchDrop::HandoffFull,
    SwitchDrop::NdIgnored,
    SwitchDrop::TtlExpired,
    SwitchDrop::RewriteFailed,
    SwitchDrop::FragNoFirst,
    SwitchDrop::IcmpUnrelated,
    SwitchDrop::TooBig,
    SwitchDrop::SynProxyParkFull,
    SwitchDrop::SynProxyParkExpired,
    SwitchDrop::HairpinFull,
    SwitchDrop::NeighborUnresolved,
    SwitchDrop::TunnelMalformed,
    SwitchDrop::TunnelUnknownVni,
    SwitchDrop::TunnelUnknownSource,
    SwitchDrop::TunnelSpoofed,
    SwitchDrop::ArpToCache,
];

impl SwitchDrop {
    /// Number of reasons.
    pub const COUNT: usize = BASE.len() + LbDrop::ALL.len();

    /// Dense index.
    pub fn index(self) -> usize {
        match self {
            SwitchDrop::Lb(r) => BASE.len() + r as usize,
            other => BASE.iter().position(|b| *b == other).unwrap_or(0),
        }
    }

    /// Every reason, in index order.
    pub fn all() -> impl Iterator<Item = SwitchDrop> {
        BASE.into_iter()
            .chain(LbDrop::ALL.into_iter().map(SwitchDrop::Lb))
    }

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            SwitchDrop::Spoofed => "spoofed",
            SwitchDrop::AclDeny => "acl_deny",
            SwitchDrop::NoRoute => "no_route",
            SwitchDrop::NoVm => "no_vm",
            SwitchDrop::ArpIgnored => "arp_ignored",
            SwitchDrop::Unsupported => "unsupported",
            SwitchDrop::HandoffFull => "handoff_full",
            SwitchDrop::NdIgnored => "nd_ignored",
            SwitchDrop::TtlExpired => "ttl_expired",
            SwitchDrop::RewriteFailed => "rewrite_failed",
            SwitchDrop::FragNoFirst => "frag_no_first",
            SwitchDrop::IcmpUnrelated => "icmp_unrelated",
            SwitchDrop::TooBig => "too_big",
            SwitchDrop::SynProxyParkFull => "syn_proxy_park_full",
            SwitchDrop::SynProxyParkExpired => "syn_proxy_park_expired",
            SwitchDrop::HairpinFull => "hairpin_full",
            SwitchDrop::NeighborUnresolved => "neighbor_unresolved",
            SwitchDrop::TunnelMalformed => "tunnel_malformed",
            SwitchDrop::TunnelUnknownVni => "tunnel_unknown_vni",
            SwitchDrop::TunnelUnknownSource => "tunnel_unknown_source",
            SwitchDrop::TunnelSpoofed => "tunnel_spoofed",
            SwitchDrop::ArpToCache => "arp_to_cache",
            SwitchDrop::Lb(r) => r.name(),
        }
    }
}

/// Switch counters, written by the switch's worker alone (those counted
/// per packet or connection with [`dataplane::stats::add_own`]) and
/// readable from any thread.
#[derive(Debug)]
pub struct SwitchStats {
    drops: [AtomicU64; SwitchDrop::COUNT],
    /// Packets handled by a flow-table hit.
    pub fast_path: AtomicU64,
    /// Packets that went through the slow path.
    pub slow_path: AtomicU64,
    /// Clock ticks spent deciding slow-path packets (policy, connection
    /// tracking, load balancing, the flow installed) and queueing them for
    /// sending, for cycle accounting: from a slow-path decision to the
    /// next packet that is a hit or is handed to another worker, or to the
    /// burst's end (a burst's packets that missed are decided after its
    /// hits have left, one after another: one run of the slow path).
    pub slow_path_ticks: AtomicU64,
    /// ARP requests answered.
    pub arp_replies: AtomicU64,
    /// ICMP echo requests to a VIP or public address answered.
    pub icmp_replies: AtomicU64,
    /// IPv6 neighbour solicitations answered.
    pub nd_replies: AtomicU64,
    /// ICMP errors sent (time exceeded).
    pub icmp_errors: AtomicU64,
    /// ICMP errors about a tracked connection passed on (translated
    /// through its NAT).
    pub icmp_related: AtomicU64,
    /// Flows installed.
    pub flows_installed: AtomicU64,
    /// Packets handed to the worker that owns their connection.
    pub handed_off: AtomicU64,
    /// Flow-table occupancy, published every 100 ms (at expiry).
    pub flows: AtomicU64,
    /// Connections tracked (all vnets), published every 100 ms.
    pub conns: AtomicU64,
    /// Embryonic connections evicted to make room for new ones (a full
    /// table, or a VIP at its limit), published every 100 ms.
    pub conns_evicted_embryonic: AtomicU64,
    /// Connections admitted untracked because the table was full,
    /// published every 100 ms.
    pub conns_untracked: AtomicU64,
    /// First fragments remembered for their later fragments, published
    /// every 100 ms.
    pub frags_noted: AtomicU64,
    /// Later fragments that followed their first, published every 100 ms.
    pub frags_followed: AtomicU64,
    /// Later fragments that came before their first and were held for it,
    /// published every 100 ms (those it did not come for are dropped as
    /// `frag_no_first`).
    pub frags_held: AtomicU64,
    /// Later fragments held now, waiting for their first.
    pub frags_waiting: AtomicU64,
    /// SYNs the SYN proxy answered with a cookie, published every 100 ms.
    pub syn_cookies_sent: AtomicU64,
    /// Connections opened by the ACK of a cookie, published every 100 ms.
    pub syn_proxied: AtomicU64,
    /// Packets held now for SYN-proxied connections whose backends have
    /// not answered (neither sent nor dropped yet).
    pub syn_proxy_held: AtomicU64,
    /// Packets hairpinned: sent to a public address of the switch, and put
    /// back through it as from the wire.
    pub hairpinned: AtomicU64,
    /// Connections SNAT mappings let in from the wire (their filtering
    /// allowed them), published every 100 ms.
    pub snat_inbound: AtomicU64,
    /// SNAT public ports in use (each protocol's counted apart), published
    /// every 100 ms.
    pub snat_ports: AtomicU64,
    /// Packets sent to other hosts in a tunnel (VXLAN or Geneve).
    pub tunnel_tx: AtomicU64,
    /// Tunnel packets taken in (decapsulated) from other hosts.
    pub tunnel_rx: AtomicU64,
    /// ARP requests sent on the uplink (the underlay resolving its next
    /// hops).
    pub arp_requests: AtomicU64,
    /// Packets a Mux sent to its DIPs in IP in IP.
    pub mux_tx: AtomicU64,
    /// Packets from a Mux (IP in IP) taken in for a DSR VIP's backend.
    pub dsr_rx: AtomicU64,
}

impl Default for SwitchStats {
    fn default() -> Self {
        SwitchStats {
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            fast_path: AtomicU64::new(0),
            slow_path_ticks: AtomicU64::new(0),
            slow_path: AtomicU64::new(0),
            arp_replies: AtomicU64::new(0),
            icmp_replies: AtomicU64::new(0),
            nd_replies: AtomicU64::new(0),
            icmp_errors: AtomicU64::new(0),
            icmp_related: AtomicU64::new(0),
            flows_installed: AtomicU64::new(0),
            handed_off: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            conns: AtomicU64::new(0),
            conns_evicted_embryonic: AtomicU64::new(0),
            conns_untracked: AtomicU64::new(0),
            frags_noted: AtomicU64::new(0),
            frags_followed: AtomicU64::new(0),
            frags_held: AtomicU64::new(0),
            frags_waiting: AtomicU64::new(0),
            syn_cookies_sent: AtomicU64::new(0),
            syn_proxied: AtomicU64::new(0),
            syn_proxy_held: AtomicU64::new(0),
            hairpinned: AtomicU64::new(0),
            snat_inbound: AtomicU64::new(0),
            snat_ports: AtomicU64::new(0),
            tunnel_tx: AtomicU64::new(0),
            tunnel_rx: AtomicU64::new(0),
            arp_requests: AtomicU64::new(0),
            mux_tx: AtomicU64::new(0),
            dsr_rx: AtomicU64::new(0),
        }
    }
}

impl SwitchStats {
    /// Drops for `r`.
    pub fn dropped(&self, r: SwitchDrop) -> u64 {
        self.drops[r.index()].load(Ordering::Relaxed)
    }

    /// Non-zero drop counters by name.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        SwitchDrop::all()
            .map(|r| (r.name(), self.dropped(r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub(super) fn count(&self, r: SwitchDrop) {
        dataplane::stats::add_own(&self.drops[r.index()], 1);
    }
}

/// Per-rule hit counters of one compiled group: [inbound, outbound].
pub type AclHits = [HitCounters; 2];
