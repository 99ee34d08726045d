//! Overlay encapsulation on an IPv4 underlay: VXLAN (RFC 7348) and Geneve
//! (RFC 8926), each an Ethernet frame in UDP; IP in IP (RFC 2003), what a
//! load balancer's Mux sends to its DIPs (as Ananta and Katran do); and the
//! ARP requests an underlay address resolves its next hops with.
//!
//! [`encap`] puts the outer Ethernet, IPv4, UDP and tunnel headers in front
//! of a frame (in the buffer's headroom: no copy of the frame); [`peek`]
//! reads them from a received frame, and the caller strips them with
//! [`PacketBuf::adj`] (and what follows the UDP datagram with
//! [`PacketBuf::trim`]). Both check every length and never panic, whatever
//! the bytes (unit-tested, and fuzzed through the switch).

use crate::key::FlowKey;
use crate::wire::{
    MacAddr, arp, checksum,
    ethernet::{ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6},
};
use crate::{BufError, PacketBuf};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// The UDP port of Geneve (IANA).
pub const GENEVE_PORT: u16 = 6081;
/// Bytes in front of the inner frame: outer Ethernet (14), IPv4 (20), UDP
/// (8) and the VXLAN or option-less Geneve header (8).
pub const OVERHEAD: usize = 50;
/// The outer UDP source ports carry the inner flow's hash in this range
/// (RFC 7348 section 5: 49152-65535), so that routers spreading flows by
/// their 5-tuple (ECMP) spread the tunnel's flows too.
pub const ENTROPY_BASE: u16 = 49152;
/// The Geneve protocol type of an Ethernet frame (Transparent Ethernet
/// Bridging).
const ETHERTYPE_TEB: u16 = 0x6558;
/// The outer TTL.
const OUTER_TTL: u8 = 64;
/// IP in IP's protocol number.
pub const PROTO_IPIP: u8 = 4;
/// Bytes IP in IP adds to the inner IP packet: the outer IPv4 header.
pub const IPIP_OVERHEAD: usize = 20;

/// The tunnel a frame travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encap {
    /// VXLAN, UDP port 4789.
    #[default]
    Vxlan,
    /// Geneve, UDP port 6081 (sent without options).
    Geneve,
    /// IP in IP (protocol 4): the inner IPv4 packet, without its Ethernet
    /// header, in an outer IPv4 header. No VNI: what a Mux sends to a DIP.
    Ipip,
}

impl Encap {
    /// Its UDP destination port.
    pub fn port(self) -> u16 {
        match self {
            Encap::Vxlan => VXLAN_PORT,
            Encap::Geneve => GENEVE_PORT,
            Encap::Ipip => 0,
        }
    }

    /// Its name as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encap::Vxlan => "vxlan",
            Encap::Geneve => "geneve",
            Encap::Ipip => "ipip",
        }
    }
}

/// What goes in front of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// The tunnel.
    pub encap: Encap,
    /// Virtual network identifier (24 bits).
    pub vni: u32,
    /// Outer Ethernet source (the underlay port's MAC).
    pub src_mac: MacAddr,
    /// Outer Ethernet destination (the next hop's MAC).
    pub dst_mac: MacAddr,
    /// Outer source address (this host's underlay address).
    pub src_ip: Ipv4Addr,
    /// Outer destination address (the remote host's).
    pub dst_ip: Ipv4Addr,
}

/// The UDP source port of a flow's tunnel packets: its key's hash folded
/// into [`ENTROPY_BASE`]..=65535, the same for every packet of the flow
/// and, the key's hash being fixed, on every host.
#[inline]
pub fn entropy_port(key: &FlowKey) -> u16 {
    let h = key.hash64();
    let h = (h ^ (h >> 32) ^ (h >> 16)) as u16;
    ENTROPY_BASE | (h & 0x3fff)
}

/// Puts `o`'s headers in front of the frame in `pkt`, with UDP source port
/// `sport` (see [`entropy_port`]). The outer IPv4 header has "don't
/// fragment" set (whoever encapsulates keeps the inner packets within the
/// path's MTU) and its checksum; the UDP checksum is zero, as RFC 7348 and
/// RFC 8926 allow over IPv4. Fails, leaving the packet as it was, when the
/// headroom is short or the result would exceed an IPv4 packet.
pub fn encap<B: PacketBuf>(pkt: &mut B, o: &Outer, sport: u16) -> Result<(), TunnelError> {
    if o.encap == Encap::Ipip {
        return encap_ipip(pkt, o);
    }
    let inner = pkt.len();
    let ip_len = inner + OVERHEAD - 14;
    let ip_len16 = u16::try_from(ip_len).map_err(|_| TunnelError::TooLarge)?;
    pkt.prepend(OVERHEAD).map_err(|_| TunnelError::NoRoom)?;
    let h = pkt
        .data_mut()
        .get_mut(..OVERHEAD)
        .ok_or(TunnelError::NoRoom)?;
    write_outer(h, o, crate::key::PROTO_UDP, ip_len16);
    let udp = &mut h[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&o.encap.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len16 - 20).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    let t = &mut h[42..50];
    let vni = (o.vni & 0x00ff_ffff) << 8;
    match o.encap {
        Encap::Vxlan => {
            // Flags: only I (a valid VNI follows).
            t[0..4].copy_from_slice(&[0x08, 0, 0, 0]);
        }
        Encap::Geneve => {
            // Version 0, no options, not OAM, not critical.
            t[0..2].copy_from_slice(&[0, 0]);
            t[2..4].copy_from_slice(&ETHERTYPE_TEB.to_be_bytes());
        }
        // (Taken apart by `encap_ipip`, never reaching here.)
        Encap::Ipip => {}
    }
    t[4..8].copy_from_slice(&vni.to_be_bytes());
    Ok(())
}

/// Why a frame to a tunnel port was not taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// Shorter than its headers say, or lengths that disagree.
    #[error("truncated tunnel packet")]
    Truncated,
    /// A VXLAN header without the I flag, a Geneve header of another
    /// version, another payload than Ethernet, or a critical option.
    #[error("unsupported tunnel header")]
    Unsupported,
    /// A fragment of a tunnel packet (never sent by a tunnel endpoint that
    /// sets "don't fragment"; not reassembled).
    #[error("fragmented tunnel packet")]
    Fragmented,
    /// Not enough headroom in the buffer for the outer headers.
    #[error("no room for the outer headers")]
    NoRoom,
    /// With the outer headers, larger than an IPv4 packet can be.
    #[error("too large for an IPv4 packet with the outer headers")]
    TooLarge,
}

/// Puts the IPv4 packet of the frame in `pkt` (after its Ethernet header
/// and at most one VLAN tag) in an outer IPv4 header with protocol 4 from
/// `o.src_ip` to `o.dst_ip` ("don't fragment", TTL 64), behind `o`'s
/// Ethernet header: the inner Ethernet header goes, 20 bytes come in front
/// (in the headroom). Link padding after the inner packet is trimmed.
/// Fails, leaving the packet as it was, for a frame that is not IPv4 or
/// is shorter than its IPv4 header says, or without the headroom.
pub fn encap_ipip<B: PacketBuf>(pkt: &mut B, o: &Outer) -> Result<(), TunnelError> {
    let f = pkt.data();
    let l3 = match (f.get(12..14), f.get(16..18)) {
        (Some([0x08, 0x00]), _) => 14,
        (Some([0x81, 0x00] | [0x88, 0xa8]), Some([0x08, 0x00])) => 18,
        _ => return Err(TunnelError::Unsupported),
    };
    let ip = f.get(l3..l3 + 20).ok_or(TunnelError::Truncated)?;
    if ip[0] >> 4 != 4 {
        return Err(TunnelError::Unsupported);
    }
    let inner_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if inner_len < 20 || l3 + inner_len > f.len() {
        return Err(TunnelError::Truncated);
    }
    let total = u16::try_from(inner_len + IPIP_OVERHEAD).map_err(|_| TunnelError::TooLarge)?;
    let grow = 14 + IPIP_OVERHEAD - l3;
    if pkt.headroom() < grow {
        return Err(TunnelError::NoRoom);
    }
    let pad = pkt.len() - l3 - inner_len;
    pkt.trim(pad).map_err(|_| TunnelError::Truncated)?;
    pkt.prepend(grow).map_err(|_| TunnelError::NoRoom)?;
    let h = pkt.data_mut().get_mut(..34).ok_or(TunnelError::NoRoom)?;
    write_outer(h, o, PROTO_IPIP, total);
    Ok(())
}

/// Writes `o`'s Ethernet header and an outer IPv4 header of `total`
/// bytes carrying `proto` ("don't fragment", TTL 64, its checksum) over
/// the first 34 bytes of `h` (which has them).
fn write_outer(h: &mut [u8], o: &Outer, proto: u8, total: u16) {
    let Some(h) = h.get_mut(..34) else { return };
    h[0..6].copy_from_slice(&o.dst_mac.0);
    h[6..12].copy_from_slice(&o.src_mac.0);
    h[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = proto;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&o.src_ip.octets());
    ip[16..20].copy_from_slice(&o.dst_ip.octets());
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The outer header of an IP-in-IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipip {
    /// Outer source address (the Mux's).
    pub src: Ipv4Addr,
    /// Outer destination address (the DIP's).
    pub dst: Ipv4Addr,
    /// Where the inner IPv4 packet starts.
    pub inner: usize,
    /// Where it ends (its own total length).
    pub end: usize,
}

/// Reads `frame` as an IP-in-IP packet: `Ok(None)` when it is no IPv4
/// packet of protocol 4 (an ordinary frame); `Ok(Some(..))` for one whose
/// inner IPv4 header is whole and whose lengths agree; an error for one
/// that cannot be taken in (truncated, fragmented, not IPv4 inside).
pub fn peek_ipip(frame: &[u8]) -> Result<Option<Ipip>, TunnelError> {
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4.to_be_bytes()[..]) {
        return Ok(None);
    }
    let Some(ip) = frame.get(14..34) else {
        return Ok(None);
    };
    if ip[0] >> 4 != 4 || ip[9] != PROTO_IPIP {
        return Ok(None);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl + 20 || frame.len() < 14 + total {
        return Err(TunnelError::Truncated);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(TunnelError::Fragmented);
    }
    let inner = 14 + ihl;
    let i = frame.get(inner..inner + 20).ok_or(TunnelError::Truncated)?;
    if i[0] >> 4 != 4 {
        return Err(TunnelError::Unsupported);
    }
    let inner_ihl = usize::from(i[0] & 0x0f) * 4;
    let inner_len = usize::from(u16::from_be_bytes([i[2], i[3]]));
    if inner_ihl < 20 || inner_len < inner_ihl || inner_len > total - ihl {
        return Err(TunnelError::Truncated);
    }
    Ok(Some(Ipip {
        src: Ipv4Addr::from([ip[12], ip[13], ip[14], ip[15]]),
        dst: Ipv4Addr::from([ip[16], ip[17], ip[18], ip[19]]),
        inner,
        end: inner + inner_len,
    }))
}

/// Takes the inner packet of `d` (read by [`peek_ipip`] from `pkt`) out:
/// the frame becomes an Ethernet frame to `dst_mac`, from the outer
/// frame's source MAC, carrying the inner IPv4 packet (what follows it is
/// trimmed).
pub fn decap_ipip<B: PacketBuf>(pkt: &mut B, d: &Ipip, dst_mac: MacAddr) -> Result<(), BufError> {
    let mut src = [0u8; 6];
    src.copy_from_slice(pkt.data().get(6..12).unwrap_or(&[0; 6]));
    let trailer = pkt.len().saturating_sub(d.end);
    pkt.trim(trailer)?;
    pkt.adj(d.inner.saturating_sub(14))?;
    let f = pkt.data_mut();
    let Some(h) = f.get_mut(..14) else {
        return Err(BufError::TooShort { need: 14, have: 0 });
    };
    h[0..6].copy_from_slice(&dst_mac.0);
    h[6..12].copy_from_slice(&src);
    h[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    Ok(())
}

/// The outer headers of a tunnel packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decap {
    /// The tunnel.
    pub encap: Encap,
    /// Its VNI.
    pub vni: u32,
    /// Outer source address (the sending host's).
    pub src: Ipv4Addr,
    /// Outer destination address.
    pub dst: Ipv4Addr,
    /// Where the inner Ethernet frame starts (the bytes to strip).
    pub inner: usize,
    /// Where it ends: the end of the UDP datagram (what follows is the
    /// outer frame's padding, trimmed with the outer headers).
    pub end: usize,
}

/// Reads the outer headers of `frame`: `Ok(None)` when it is no IPv4 UDP
/// packet to `local` on the VXLAN or Geneve port (an ordinary frame);
/// `Ok(Some(..))` for a well-formed tunnel packet with a complete inner
/// Ethernet header; an error for one that is to the tunnel port but
/// cannot be taken in.
pub fn peek(frame: &[u8], local: Ipv4Addr) -> Result<Option<Decap>, TunnelError> {
    let be16 = |o: usize| {
        frame
            .get(o..o + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    if be16(12) != Some(ETHERTYPE_IPV4) {
        return Ok(None);
    }
    let Some(ip) = frame.get(14..34) else {
        return Ok(None);
    };
    if ip[0] >> 4 != 4 || ip[9] != crate::key::PROTO_UDP || ip[16..20] != local.octets() {
        return Ok(None);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp_off = 14 + ihl;
    let Some(dport) = be16(udp_off + 2) else {
        return Ok(None);
    };
    let encap = match dport {
        VXLAN_PORT => Encap::Vxlan,
        GENEVE_PORT => Encap::Geneve,
        _ => return Ok(None),
    };
    if ihl < 20 {
        return Err(TunnelError::Truncated);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return Err(TunnelError::Fragmented);
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp_len = be16(udp_off + 4).map_or(0, usize::from);
    if total < ihl + 8 || frame.len() < 14 + total || udp_len < 16 || ihl + udp_len > total {
        return Err(TunnelError::Truncated);
    }
    let t = udp_off + 8;
    let hdr = frame.get(t..t + 8).ok_or(TunnelError::Truncated)?;
    let vni = u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]);
    let inner = match encap {
        Encap::Vxlan => {
            if hdr[0] & 0x08 == 0 {
                return Err(TunnelError::Unsupported);
            }
            t + 8
        }
        Encap::Geneve => {
            let version = hdr[0] >> 6;
            let opts = usize::from(hdr[0] & 0x3f) * 4;
            let critical = hdr[1] & 0x40 != 0;
            if version != 0 || critical || u16::from_be_bytes([hdr[2], hdr[3]]) != ETHERTYPE_TEB {
                return Err(TunnelError::Unsupported);
            }
            t + 8 + opts
        }
        Encap::Ipip => return Ok(None),
    };
    // The inner frame ends where the UDP datagram does (anything after it
    // is the outer frame's padding).
    if inner + 14 > udp_off + udp_len {
        return Err(TunnelError::Truncated);
    }
    Ok(Some(Decap {
        encap,
        vni,
        src: Ipv4Addr::from([ip[12], ip[13], ip[14], ip[15]]),
        dst: local,
        inner,
        end: udp_off + udp_len,
    }))
}

/// The source address of an inner frame: IPv4's or IPv6's, or the ARP
/// sender's. `None` for anything else, or a frame too short to say.
pub fn inner_source(inner: &[u8]) -> Option<IpAddr> {
    let ethertype = u16::from_be_bytes([*inner.get(12)?, *inner.get(13)?]);
    let l3 = inner.get(14..)?;
    match ethertype {
        ETHERTYPE_IPV4 if l3.len() >= 20 && l3[0] >> 4 == 4 => {
            Some(IpAddr::V4(Ipv4Addr::from([l3[12], l3[13], l3[14], l3[15]])))
        }
        ETHERTYPE_IPV6 if l3.len() >= 40 && l3[0] >> 4 == 6 => {
            let b: [u8; 16] = l3.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        ETHERTYPE_ARP => arp::Packet::new_checked(l3)
            .ok()
            .map(|a| IpAddr::V4(a.sender_ip())),
        _ => None,
    }
}

/// Writes over `pkt` an ARP request for `target` from `mac`/`ip`: to the
/// broadcast address, or to `to` (a unicast request, as a neighbour cache
/// confirms an entry it has), padded to the 60-byte Ethernet minimum.
pub fn arp_request<B: PacketBuf>(
    pkt: &mut B,
    mac: MacAddr,
    ip: Ipv4Addr,
    target: Ipv4Addr,
    to: Option<MacAddr>,
) -> Result<(), BufError> {
    pkt.reset();
    let f = pkt.append(60)?;
    f.fill(0);
    let dst = to.unwrap_or(MacAddr::BROADCAST);
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let a = &mut f[14..14 + arp::PACKET_LEN];
    a[0..8].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, arp::OP_REQUEST as u8]);
    a[8..14].copy_from_slice(&mac.0);
    a[14..18].copy_from_slice(&ip.octets());
    a[24..28].copy_from_slice(&target.octets());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Pool, PoolConfig};

    fn inner_frame() -> Vec<u8> {
        // Ethernet + IPv4 (20) + UDP (8) + 4 bytes of data.
        let mut f = vec![0u8; 14 + 32];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&32u16.to_be_bytes());
        f[22] = 64;
        f[23] = 17;
        f[26..30].copy_from_slice(&[10, 1, 0, 10]);
        f[30..34].copy_from_slice(&[10, 1, 0, 20]);
        f
    }

    fn outer(encap: Encap) -> Outer {
        Outer {
            encap,
            vni: 0x12_3456,
            src_mac: MacAddr([2, 0, 0, 0, 1, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 1, 2]),
            src_ip: Ipv4Addr::new(192, 168, 100, 1),
            dst_ip: Ipv4Addr::new(192, 168, 100, 2),
        }
    }

    #[test]
    fn encapsulated_frames_read_back_with_their_vni_and_source() {
        let pool = Pool::new(&PoolConfig::new("tunnel-test", 8)).unwrap();
        for e in [Encap::Vxlan, Encap::Geneve] {
            let mut b = pool.alloc().unwrap();
            let inner = inner_frame();
            b.append(inner.len()).unwrap().copy_from_slice(&inner);
            encap(&mut b, &outer(e), 50000).unwrap();
            let f = b.data();
            assert_eq!(f.len(), inner.len() + OVERHEAD);
            // A valid outer IPv4 header: its checksum sums to zero.
            assert_eq!(checksum::checksum(&f[14..34]), 0);
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
            assert_eq!(u16::from_be_bytes([f[36], f[37]]), e.port());
            assert_eq!(u16::from_be_bytes([f[34], f[35]]), 50000);
            // Not for another address.
            assert_eq!(peek(f, Ipv4Addr::new(192, 168, 100, 9)), Ok(None));
            let d = peek(f, Ipv4Addr::new(192, 168, 100, 2)).unwrap().unwrap();
            assert_eq!(
                (d.encap, d.vni, d.src, d.inner),
                (e, 0x12_3456, Ipv4Addr::new(192, 168, 100, 1), OVERHEAD)
            );
            assert_eq!(&f[d.inner..d.end], &inner[..]);
            assert_eq!(d.end, f.len());
            assert_eq!(
                inner_source(&f[d.inner..]),
                Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 10)))
            );
        }
    }

    #[test]
    fn bad_tunnel_headers_are_named_and_nothing_panics() {
        let pool = Pool::new(&PoolConfig::new("tunnel-bad", 8)).unwrap();
        let mut b = pool.alloc().unwrap();
        let inner = inner_frame();
        b.append(inner.len()).unwrap().copy_from_slice(&inner);
        encap(&mut b, &outer(Encap::Geneve), 50000).unwrap();
        let good = b.data().to_vec();
        let local = Ipv4Addr::new(192, 168, 100, 2);
        let mut critical = good.clone();
        critical[43] |= 0x40;
        assert_eq!(peek(&critical, local), Err(TunnelError::Unsupported));
        let mut frag = good.clone();
        frag[20] |= 0x20;
        assert_eq!(peek(&frag, local), Err(TunnelError::Fragmented));
        // Every truncation is refused or not taken for a tunnel packet.
        for n in 0..good.len() {
            let r = peek(&good[..n], local);
            assert!(!matches!(r, Ok(Some(_))), "{n} bytes: {r:?}");
        }
        // Options longer than the datagram.
        let mut opts = good.clone();
        opts[42] = 0x3f;
        assert_eq!(peek(&opts, local), Err(TunnelError::Truncated));
        // Any byte changed: never a panic.
        for i in 0..good.len() {
            let mut f = good.clone();
            f[i] ^= 0xff;
            let _ = peek(&f, local);
            let _ = inner_source(&f[i..]);
        }
    }

    #[test]
    fn ip_in_ip_carries_the_inner_packet_and_reads_back() {
        let pool = Pool::new(&PoolConfig::new("tunnel-ipip", 8)).unwrap();
        // With link padding after the inner packet, and with a VLAN tag.
        let mut padded = inner_frame();
        padded.extend_from_slice(&[0xee; 6]);
        let mut tagged = inner_frame();
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        for frame in [inner_frame(), padded, tagged] {
            let mut b = pool.alloc().unwrap();
            b.append(frame.len()).unwrap().copy_from_slice(&frame);
            encap(&mut b, &outer(Encap::Ipip), 0).unwrap();
            let f = b.data().to_vec();
            let ip = &inner_frame()[14..];
            assert_eq!(f.len(), 14 + IPIP_OVERHEAD + ip.len());
            assert_eq!(checksum::checksum(&f[14..34]), 0);
            assert_eq!((f[23], u16::from_be_bytes([f[16], f[17]])), (4, 52));
            assert_eq!(&f[34..], ip);
            let d = peek_ipip(&f).unwrap().unwrap();
            assert_eq!(
                (d.src, d.dst, d.inner, d.end),
                (
                    Ipv4Addr::new(192, 168, 100, 1),
                    Ipv4Addr::new(192, 168, 100, 2),
                    34,
                    f.len()
                )
            );
            let vm = MacAddr([2, 0, 0, 0, 9, 9]);
            decap_ipip(&mut b, &d, vm).unwrap();
            let g = b.data();
            assert_eq!(&g[0..6], &vm.0);
            assert_eq!(&g[6..12], &outer(Encap::Ipip).src_mac.0);
            assert_eq!(&g[14..], ip);
        }
        // Not IPv4 inside, or no IP: refused, the packet unchanged.
        let mut arp = inner_frame();
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        let mut b = pool.alloc().unwrap();
        b.append(arp.len()).unwrap().copy_from_slice(&arp);
        assert_eq!(
            encap_ipip(&mut b, &outer(Encap::Ipip)),
            Err(TunnelError::Unsupported)
        );
        assert_eq!(b.data(), &arp[..]);
        // An ordinary frame is none; truncations and flipped bytes are
        // refused or read within bounds, never a panic.
        assert_eq!(peek_ipip(&inner_frame()), Ok(None));
        let mut b = pool.alloc().unwrap();
        let f = inner_frame();
        b.append(f.len()).unwrap().copy_from_slice(&f);
        encap(&mut b, &outer(Encap::Ipip), 0).unwrap();
        let good = b.data().to_vec();
        for n in 0..good.len() {
            assert!(!matches!(peek_ipip(&good[..n]), Ok(Some(_))), "{n} bytes");
        }
        let mut frag = good.clone();
        frag[20] |= 0x20;
        assert_eq!(peek_ipip(&frag), Err(TunnelError::Fragmented));
        for i in 0..good.len() {
            let mut f = good.clone();
            f[i] ^= 0xff;
            if let Ok(Some(d)) = peek_ipip(&f) {
                assert!(d.inner + 20 <= d.end && d.end <= f.len());
            }
        }
    }

    #[test]
    fn the_entropy_port_follows_the_flow() {
        let k = |sport| {
            FlowKey::new(
                "10.1.0.10".parse().unwrap(),
                sport,
                "10.1.0.20".parse().unwrap(),
                80,
                6,
            )
        };
        let ports: std::collections::HashSet<u16> =
            (1000..1200).map(|p| entropy_port(&k(p))).collect();
        assert!(ports.iter().all(|&p| p >= ENTROPY_BASE));
        assert!(ports.len() > 150, "{} distinct", ports.len());
        assert_eq!(entropy_port(&k(7)), entropy_port(&k(7)));
    }

    #[test]
    fn arp_requests_are_broadcast_or_unicast() {
        let pool = Pool::new(&PoolConfig::new("tunnel-arp", 8)).unwrap();
        let mut b = pool.alloc().unwrap();
        let me = MacAddr([2, 0, 0, 0, 1, 1]);
        let ip = Ipv4Addr::new(192, 168, 100, 1);
        let t = Ipv4Addr::new(192, 168, 100, 254);
        arp_request(&mut b, me, ip, t, None).unwrap();
        let p = crate::parse(b.data(), 0).unwrap();
        assert_eq!(p.l3, crate::L3::Arp);
        let a = arp::Packet::new_checked(&b.data()[14..]).unwrap();
        assert_eq!(
            (a.operation(), a.sender_ip(), a.target_ip(), a.sender_mac()),
            (arp::OP_REQUEST, ip, t, me)
        );
        assert_eq!(&b.data()[..6], &[0xff; 6]);
        let peer = MacAddr([2, 0, 0, 0, 9, 9]);
        arp_request(&mut b, me, ip, t, Some(peer)).unwrap();
        assert_eq!(&b.data()[..6], &peer.0);
        assert_eq!(b.len(), 60);
    }
}
