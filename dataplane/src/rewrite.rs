//! Header rewrites with incremental checksum updates (RFC 1624).
//!
//! Every function takes the frame and the [`Parsed`] that [`crate::parse`]
//! returned for it, and patches the IPv4 header checksum and the TCP/UDP/ICMPv6
//! checksum (whose pseudo-header covers the addresses) in place, so a NAT or a
//! routing step never recomputes a checksum over the payload.
//!
//! Rules followed: a UDP-over-IPv4 checksum of 0 means "none" and stays 0; a
//! computed UDP checksum of 0 is sent as 0xffff (RFC 768); ICMPv4 has no
//! pseudo-header, so address changes leave it alone; fragments other than the
//! first carry no transport header, so only the IP header changes.

use crate::buf::PacketBuf;
use crate::key::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::parse::{L3, Parsed};
use crate::wire::{MacAddr, arp, checksum, ethernet, icmp, tcp, udp};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a rewrite was refused. The frame is left unchanged in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// An IPv4 rewrite on a frame that is not IPv4.
    #[error("frame is not ipv4")]
    NotIpv4,
    /// An IPv6 rewrite on a frame that is not IPv6.
    #[error("frame is not ipv6")]
    NotIpv6,
    /// A port rewrite on a frame without TCP, UDP or ICMP echo in it.
    #[error("frame has no ports to rewrite")]
    NoPorts,
    /// TTL or hop limit was already 0 or 1: the packet must not be forwarded.
    #[error("ttl expired")]
    TtlExpired,
    /// The frame is shorter than the offsets in `Parsed` (it was not the
    /// frame that was parsed).
    #[error("frame does not match its parse result")]
    Mismatch,
}

const IPV4_CHECK: usize = 10;

#[inline]
fn get16(f: &[u8], at: usize) -> Result<u16, RewriteError> {
    match f.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(RewriteError::Mismatch),
    }
}

/// Writes `v` at `at`; a frame too short for it is a mismatch.
#[inline(always)]
fn put<const N: usize>(f: &mut [u8], at: usize, v: [u8; N]) -> Result<(), RewriteError> {
    match f.get_mut(at..at + N) {
        Some(b) => {
            b.copy_from_slice(&v);
            Ok(())
        }
        None => Err(RewriteError::Mismatch),
    }
}

#[inline]
fn put16(f: &mut [u8], at: usize, v: u16) -> Result<(), RewriteError> {
    put(f, at, v.to_be_bytes())
}

/// Sets the destination MAC.
#[inline]
pub fn set_dst_mac(frame: &mut [u8], mac: MacAddr) -> Result<(), RewriteError> {
    frame
        .get_mut(0..6)
        .ok_or(RewriteError::Mismatch)?
        .copy_from_slice(&mac.0);
    Ok(())
}

/// Sets the source MAC.
#[inline]
pub fn set_src_mac(frame: &mut [u8], mac: MacAddr) -> Result<(), RewriteError> {
    frame
        .get_mut(6..12)
        .ok_or(RewriteError::Mismatch)?
        .copy_from_slice(&mac.0);
    Ok(())
}

/// Offset of the transport checksum that covers the pseudo-header, if any,
/// and whether it is UDP over IPv4 (where 0 means "no checksum").
#[inline]
fn pseudo_checksum_at(p: &Parsed) -> Option<(usize, bool)> {
    if !p.has_l4 {
        return None;
    }
    let l4 = usize::from(p.l4_off);
    match (p.l3, p.key.proto) {
        (_, PROTO_TCP) => Some((l4 + tcp::CHECKSUM_OFFSET, false)),
        (L3::Ipv4, PROTO_UDP) => Some((l4 + udp::CHECKSUM_OFFSET, true)),
        (L3::Ipv6, PROTO_UDP) => Some((l4 + udp::CHECKSUM_OFFSET, false)),
        (L3::Ipv6, PROTO_ICMPV6) => Some((l4 + icmp::CHECKSUM_OFFSET, false)),
        _ => None,
    }
}

/// Patches the transport checksum at `at` for `old` -> `new` covered bytes.
#[inline]
fn patch_l4(
    frame: &mut [u8],
    at: usize,
    udp4: bool,
    old: &[u8],
    new: &[u8],
) -> Result<(), RewriteError> {
    let check = get16(frame, at)?;
    if udp4 && check == 0 {
        return Ok(());
    }
    let mut c = checksum::update(check, old, new);
    if udp4 && c == 0 {
        c = 0xffff;
    }
    put16(frame, at, c)
}

fn set_ipv4_addr(
    frame: &mut [u8],
    p: &Parsed,
    field: usize,
    ip: Ipv4Addr,
) -> Result<(), RewriteError> {
    if p.l3 != L3::Ipv4 {
        return Err(RewriteError::NotIpv4);
    }
    let l3 = usize::from(p.l3_off);
    let at = l3 + field;
    let new = ip.octets();
    let old: [u8; 4] = frame
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or(RewriteError::Mismatch)?;
    let l4 = pseudo_checksum_at(p);
    // Validate every offset before the first write: all or nothing.
    let ipc = get16(frame, l3 + IPV4_CHECK)?;
    if let Some((c, _)) = l4 {
        get16(frame, c)?;
    }
    put16(frame, l3 + IPV4_CHECK, checksum::update(ipc, &old, &new))?;
    if let Some((c, udp4)) = l4 {
        patch_l4(frame, c, udp4, &old, &new)?;
    }
    frame[at..at + 4].copy_from_slice(&new);
    Ok(())
}

/// Sets the IPv4 source address, updating the header and transport checksums.
#[inline]
pub fn set_ipv4_src(frame: &mut [u8], p: &Parsed, ip: Ipv4Addr) -> Result<(), RewriteError> {
    set_ipv4_addr(frame, p, 12, ip)
}

/// Sets the IPv4 destination address, updating the header and transport checksums.
#[inline]
pub fn set_ipv4_dst(frame: &mut [u8], p: &Parsed, ip: Ipv4Addr) -> Result<(), RewriteError> {
    set_ipv4_addr(frame, p, 16, ip)
}

fn set_ipv6_addr(
    frame: &mut [u8],
    p: &Parsed,
    field: usize,
    ip: Ipv6Addr,
) -> Result<(), RewriteError> {
    if p.l3 != L3::Ipv6 {
        return Err(RewriteError::NotIpv6);
    }
    let at = usize::from(p.l3_off) + field;
    let new = ip.octets();
    let old: [u8; 16] = frame
        .get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .ok_or(RewriteError::Mismatch)?;
    if let Some((c, udp4)) = pseudo_checksum_at(p) {
        patch_l4(frame, c, udp4, &old, &new)?;
    }
    frame[at..at + 16].copy_from_slice(&new);
    Ok(())
}

/// Sets the IPv6 source address, updating the transport checksum.
#[inline]
pub fn set_ipv6_src(frame: &mut [u8], p: &Parsed, ip: Ipv6Addr) -> Result<(), RewriteError> {
    set_ipv6_addr(frame, p, 8, ip)
}

/// Sets the IPv6 destination address, updating the transport checksum.
#[inline]
pub fn set_ipv6_dst(frame: &mut [u8], p: &Parsed, ip: Ipv6Addr) -> Result<(), RewriteError> {
    set_ipv6_addr(frame, p, 24, ip)
}

/// Where a port (or ICMP echo id) lives and which checksum covers it.
#[inline]
fn port_field(p: &Parsed, dst: bool) -> Result<(usize, usize, bool), RewriteError> {
    if !p.has_l4 {
        return Err(RewriteError::NoPorts);
    }
    let l4 = usize::from(p.l4_off);
    let off = if dst { 2 } else { 0 };
    match (p.l3, p.key.proto) {
        (L3::Ipv4 | L3::Ipv6, PROTO_TCP) => Ok((l4 + off, l4 + tcp::CHECKSUM_OFFSET, false)),
        (L3::Ipv4, PROTO_UDP) => Ok((l4 + off, l4 + udp::CHECKSUM_OFFSET, true)),
        (L3::Ipv6, PROTO_UDP) => Ok((l4 + off, l4 + udp::CHECKSUM_OFFSET, false)),
        // For ICMP echo the identifier plays the source port; there is no
        // destination port. `set_port` checks the message is an echo.
        (L3::Ipv4, PROTO_ICMP) | (L3::Ipv6, PROTO_ICMPV6) if !dst => {
            Ok((l4 + 4, l4 + icmp::CHECKSUM_OFFSET, false))
        }
        _ => Err(RewriteError::NoPorts),
    }
}

fn set_port(frame: &mut [u8], p: &Parsed, dst: bool, port: u16) -> Result<(), RewriteError> {
    let (at, check_at, udp4) = port_field(p, dst)?;
    if matches!(p.key.proto, PROTO_ICMP | PROTO_ICMPV6) {
        let t = *frame
            .get(usize::from(p.l4_off))
            .ok_or(RewriteError::Mismatch)?;
        let echo = if p.l3 == L3::Ipv4 {
            matches!(t, icmp::V4_ECHO_REQUEST | icmp::V4_ECHO_REPLY)
        } else {
            matches!(t, icmp::V6_ECHO_REQUEST | icmp::V6_ECHO_REPLY)
        };
        if !echo {
            return Err(RewriteError::NoPorts);
        }
    }
    let old = get16(frame, at)?;
    get16(frame, check_at)?;
    patch_l4(
        frame,
        check_at,
        udp4,
        &old.to_be_bytes(),
        &port.to_be_bytes(),
    )?;
    put16(frame, at, port)
}

/// Sets the TCP/UDP source port, or the ICMP/ICMPv6 echo identifier.
#[inline]
pub fn set_src_port(frame: &mut [u8], p: &Parsed, port: u16) -> Result<(), RewriteError> {
    set_port(frame, p, false, port)
}

/// Sets the TCP/UDP destination port.
#[inline]
pub fn set_dst_port(frame: &mut [u8], p: &Parsed, port: u16) -> Result<(), RewriteError> {
    set_port(frame, p, true, port)
}

/// Adds `seq` to a TCP segment's sequence number and `ack` to its
/// acknowledgment number (wrapping), patching the checksum: the sequence
/// offset of a connection whose two ends chose different initial
/// sequence numbers (a SYN proxy's). Not TCP, or a later fragment: left
/// alone.
pub fn shift_seq(frame: &mut [u8], p: &Parsed, seq: u32, ack: u32) -> Result<(), RewriteError> {
    if p.key.proto != PROTO_TCP || !p.has_l4 {
        return Ok(());
    }
    let l4 = usize::from(p.l4_off);
    let at = l4 + tcp::CHECKSUM_OFFSET;
    let old: [u8; 8] = frame
        .get(l4 + 4..l4 + 12)
        .and_then(|b| b.try_into().ok())
        .ok_or(RewriteError::Mismatch)?;
    get16(frame, at)?;
    let s = u32::from_be_bytes([old[0], old[1], old[2], old[3]]).wrapping_add(seq);
    let a = u32::from_be_bytes([old[4], old[5], old[6], old[7]]).wrapping_add(ack);
    let mut new = [0u8; 8];
    new[..4].copy_from_slice(&s.to_be_bytes());
    new[4..].copy_from_slice(&a.to_be_bytes());
    if let Some(b) = frame.get_mut(l4 + 4..l4 + 12) {
        b.copy_from_slice(&new);
    }
    patch_l4(frame, at, false, &old, &new)
}

/// Turns the ARP request in `frame` (parsed as `p`) into the reply that
/// answers it with `mac`, in place: ARP operation, sender and target, and the
/// Ethernet addresses (back to the requester, from `mac`).
pub fn arp_reply(frame: &mut [u8], p: &Parsed, mac: MacAddr) -> Result<(), RewriteError> {
    if p.l3 != L3::Arp {
        return Err(RewriteError::Mismatch);
    }
    let l3 = frame
        .get_mut(usize::from(p.l3_off)..)
        .ok_or(RewriteError::Mismatch)?;
    let mut a = arp::Packet::new_checked(l3).map_err(|_| RewriteError::Mismatch)?;
    let (smac, sip, tip) = (a.sender_mac(), a.sender_ip(), a.target_ip());
    a.set_operation(arp::OP_REPLY);
    a.set_sender(mac, tip);
    a.set_target(smac, sip);
    set_dst_mac(frame, smac)?;
    set_src_mac(frame, mac)
}

/// A compiled rewrite of one IPv4 TCP/UDP flow — VFP's "header
/// transposition": new addresses and ports plus the TTL decrement, with both
/// checksum updates precomputed. A flow's old addresses and ports are fixed
/// (they are its exact-match key), so each checksum moves by the same
/// one's-complement delta on every packet (RFC 1624: `HC' = ~(~HC + D)`):
/// applying it is a few stores and two additions, not a patch per field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transpose4 {
    /// The source and destination addresses a packet leaves with, as they
    /// lie in its IPv4 header (an address the rewrite keeps is the flow's
    /// own: the key is exact, so writing it back changes nothing, and the
    /// two go out in one store).
    addrs: [u8; 8],
    /// The source and destination ports it leaves with, in network order
    /// (likewise, one store).
    ports: [u8; 4],
    /// Delta of the IPv4 header checksum (addresses and TTL), folded to
    /// 16 bits (adding it folded or whole gives the same checksum; folded
    /// it keeps a flow's hot cache lines room for its connection).
    ip: u16,
    /// Delta of the transport checksum (pseudo-header addresses, ports),
    /// folded as `ip`.
    l4: u16,
    udp: bool,
}

/// The bytes of the common frame ([`Parsed::is_plain_ipv4`]) that
/// [`Transpose4::apply_plain`] writes
/// within: Ethernet, an IPv4 header without options and a TCP header up
/// to its checksum (a UDP header is shorter).
pub const PLAIN_REWRITE_LEN: usize = ethernet::HEADER_LEN + 20 + tcp::CHECKSUM_OFFSET + 2;

/// Where the TTL lies in the common frame ([`Parsed::is_plain_ipv4`]).
pub const PLAIN_TTL_AT: usize = ethernet::HEADER_LEN + 8;

/// Adds the RFC 1624 delta of one 16-bit word going `old` -> `new`.
fn delta(acc: &mut u32, old: u16, new: u16) {
    *acc += u32::from(!old) + u32::from(new);
}

fn words(a: [u8; 4]) -> [u16; 2] {
    [
        u16::from_be_bytes([a[0], a[1]]),
        u16::from_be_bytes([a[2], a[3]]),
    ]
}

impl Transpose4 {
    /// Compiles the rewrite of packets with key `key` (IPv4, TCP or UDP) to
    /// `src`/`dst` (address, port); `None` for other flows.
    pub fn compile(
        key: &crate::key::FlowKey,
        src: Option<(Ipv4Addr, u16)>,
        dst: Option<(Ipv4Addr, u16)>,
    ) -> Option<Transpose4> {
        let udp = match key.proto {
            PROTO_TCP => false,
            PROTO_UDP => true,
            _ => return None,
        };
        let v4 = crate::key::v4_of;
        let (old_src, old_dst) = (v4(&key.src_ip)?, v4(&key.dst_ip)?);
        // The TTL/protocol word goes m -> m - 0x0100, whatever the TTL:
        // ~m + m' = ~m + m - 0x0100 = 0xffff - 0x0100 in one's complement.
        let mut ip = 0xfeffu32;
        let mut l4 = 0u32;
        let mut field = |old: [u8; 4], old_port: u16, new: Option<(Ipv4Addr, u16)>| {
            let Some((a, port)) = new else {
                return (old, old_port);
            };
            let a = a.octets();
            for (o, n) in words(old).into_iter().zip(words(a)) {
                delta(&mut ip, o, n);
                delta(&mut l4, o, n);
            }
            delta(&mut l4, old_port, port);
            (a, port)
        };
        let (s, sp) = field(old_src, key.src_port, src);
        let (d, dp) = field(old_dst, key.dst_port, dst);
        let (mut addrs, mut ports) = ([0u8; 8], [0u8; 4]);
        let (sa, da) = addrs.split_at_mut(4);
        sa.copy_from_slice(&s);
        da.copy_from_slice(&d);
        let (spb, dpb) = ports.split_at_mut(2);
        spb.copy_from_slice(&sp.to_be_bytes());
        dpb.copy_from_slice(&dp.to_be_bytes());
        Some(Transpose4 {
            addrs,
            ports,
            ip: checksum::fold(ip),
            l4: checksum::fold(l4),
            udp,
        })
    }

    /// Applies it to `frame` (parsed as `p`, a packet of the compiled
    /// flow): addresses, ports, TTL and both checksums. Refuses an expired
    /// TTL before writing anything.
    #[inline]
    pub fn apply(&self, frame: &mut [u8], p: &Parsed) -> Result<(), RewriteError> {
        let (l3, l4) = (usize::from(p.l3_off), usize::from(p.l4_off));
        if p.l3 != L3::Ipv4 || !p.has_l4 || frame.len() < l4 + 8 || l3 + 20 > l4 {
            return Err(RewriteError::Mismatch);
        }
        // An untagged IPv4 header without options, as most are: the
        // writes at fixed offsets, whose bounds the compiler then checks
        // once rather than at every field.
        if p.is_plain_ipv4()
            && let Some(h) = frame.first_chunk_mut::<PLAIN_REWRITE_LEN>()
        {
            return self.apply_plain(h);
        }
        self.write(frame, l3, l4)
    }

    /// [`Transpose4::apply`] on the common frame, whose first bytes are
    /// `h`: untagged IPv4 without options, carrying the transport header
    /// (which the caller has checked, as the parse found it). Writes
    /// nothing and refuses when the TTL has expired.
    #[inline(always)]
    pub fn apply_plain(&self, h: &mut [u8; PLAIN_REWRITE_LEN]) -> Result<(), RewriteError> {
        self.write(h, ethernet::HEADER_LEN, ethernet::HEADER_LEN + 20)
    }

    /// The writes of [`Transpose4::apply`] at network offset `l3` and
    /// transport offset `l4`, checked by the caller to lie as in an IPv4
    /// packet with a transport header.
    #[inline(always)]
    fn write(&self, frame: &mut [u8], l3: usize, l4: usize) -> Result<(), RewriteError> {
        let ttl = *frame.get(l3 + 8).ok_or(RewriteError::Mismatch)?;
        if ttl <= 1 {
            return Err(RewriteError::TtlExpired);
        }
        let check_at = l4
            + if self.udp {
                udp::CHECKSUM_OFFSET
            } else {
                tcp::CHECKSUM_OFFSET
            };
        let l4_check = get16(frame, check_at)?;
        put(frame, l3 + 8, [ttl - 1])?;
        put(frame, l3 + 12, self.addrs)?;
        put(frame, l4, self.ports)?;
        let ip_check = get16(frame, l3 + IPV4_CHECK)?;
        put16(
            frame,
            l3 + IPV4_CHECK,
            !checksum::fold(u32::from(!ip_check) + u32::from(self.ip)),
        )?;
        if !(self.udp && l4_check == 0) {
            let mut c = !checksum::fold(u32::from(!l4_check) + u32::from(self.l4));
            if self.udp && c == 0 {
                c = 0xffff;
            }
            put16(frame, check_at, c)?;
        }
        Ok(())
    }
}

/// Finishes a transport checksum the sender left partial (checksum offload:
/// the field holds the folded pseudo-header sum and the NIC was to add the
/// rest). Kernel interfaces hand such frames to packet sockets when the
/// sending stack offloads (veth, tap); the AF_PACKET driver calls this for
/// frames the kernel marks so. TCP, UDP and ICMPv6 only.
pub fn complete_partial_checksum(frame: &mut [u8], p: &Parsed) -> Result<(), RewriteError> {
    let (at, _) = pseudo_checksum_at(p).ok_or(RewriteError::Mismatch)?;
    let l4 = usize::from(p.l4_off);
    let seg = frame
        .get(l4..l4 + usize::from(p.l4_len))
        .ok_or(RewriteError::Mismatch)?;
    let mut c = !checksum::fold(checksum::sum(seg));
    if c == 0 && p.key.proto == PROTO_UDP {
        c = 0xffff;
    }
    put16(frame, at, c)
}

/// ICMPv6 message types of neighbour discovery and multicast listener
/// discovery: link-local control traffic a switch answers or ignores, never
/// forwards.
pub fn is_icmpv6_link_control(frame: &[u8], p: &Parsed) -> bool {
    p.l3 == L3::Ipv6
        && p.key.proto == PROTO_ICMPV6
        && p.has_l4
        && frame
            .get(usize::from(p.l4_off))
            .is_some_and(|t| matches!(t, 130..=137 | 143))
}

/// A neighbour solicitation a switch may answer: (target, solicitor's
/// address). `None` for anything else, for a solicitation with extension
/// headers or a hop limit other than 255 (RFC 4861 says to ignore those).
pub fn nd_solicitation(frame: &[u8], p: &Parsed) -> Option<([u8; 16], [u8; 16])> {
    let (l3, l4) = (usize::from(p.l3_off), usize::from(p.l4_off));
    if p.l3 != L3::Ipv6 || p.key.proto != PROTO_ICMPV6 || !p.has_l4 || l4 != l3 + 40 {
        return None;
    }
    let icmp = frame.get(l4..l4 + 24)?;
    if icmp[0] != 135 || icmp[1] != 0 || frame.get(l3 + 7) != Some(&255) {
        return None;
    }
    let target: [u8; 16] = icmp[8..24].try_into().ok()?;
    let src: [u8; 16] = frame.get(l3 + 8..l3 + 24)?.try_into().ok()?;
    Some((target, src))
}

/// Turns a neighbour solicitation ([`nd_solicitation`]) into the
/// advertisement of its target at `mac`, in place: sent from the target to
/// the solicitor, router, solicited and override flags set, with a
/// target link-layer address option. The packet is resized to fit.
pub fn neighbor_advert<B: PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    mac: MacAddr,
) -> Result<(), RewriteError> {
    let (target, solicitor) = nd_solicitation(pkt.data(), p).ok_or(RewriteError::Mismatch)?;
    let (l3, l4) = (usize::from(p.l3_off), usize::from(p.l4_off));
    const NA_LEN: usize = 32;
    let want = l4 + NA_LEN;
    let len = pkt.len();
    if len < want {
        pkt.append(want - len).map_err(|_| RewriteError::Mismatch)?;
    } else if len > want {
        pkt.trim(len - want).map_err(|_| RewriteError::Mismatch)?;
    }
    let f = pkt.data_mut();
    let requester: [u8; 6] = f
        .get(6..12)
        .and_then(|m| m.try_into().ok())
        .ok_or(RewriteError::Mismatch)?;
    set_dst_mac(f, MacAddr(requester))?;
    set_src_mac(f, mac)?;
    let ip = f.get_mut(l3..l3 + 40).ok_or(RewriteError::Mismatch)?;
    ip[4..6].copy_from_slice(&(NA_LEN as u16).to_be_bytes());
    ip[7] = 255;
    ip[8..24].copy_from_slice(&target);
    ip[24..40].copy_from_slice(&solicitor);
    let icmp = f.get_mut(l4..l4 + NA_LEN).ok_or(RewriteError::Mismatch)?;
    icmp.fill(0);
    icmp[0] = 136;
    icmp[4] = 0xe0; // router, solicited, override
    icmp[8..24].copy_from_slice(&target);
    icmp[24] = 2; // target link-layer address
    icmp[25] = 1; // in units of 8 bytes
    icmp[26..32].copy_from_slice(&mac.0);
    let pseudo = checksum::pseudo_v6(target, solicitor, PROTO_ICMPV6, NA_LEN as u32);
    let c = !checksum::fold(checksum::combine(pseudo, checksum::sum(icmp)));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// True when `frame` is an ICMP (v4) or ICMPv6 echo request.
#[inline]
pub fn is_echo_request(frame: &[u8], p: &Parsed) -> bool {
    let want = match (p.l3, p.key.proto) {
        (L3::Ipv4, PROTO_ICMP) => icmp::V4_ECHO_REQUEST,
        (L3::Ipv6, PROTO_ICMPV6) => icmp::V6_ECHO_REQUEST,
        _ => return false,
    };
    p.has_l4 && frame.get(usize::from(p.l4_off)) == Some(&want)
}

/// Turns an ICMP/ICMPv6 echo request into its reply in place, as the owner
/// of the destination address would send it: addresses swapped, type
/// changed (checksum patched; the swap itself leaves both the IPv4 header sum
/// and the ICMPv6 pseudo-header sum unchanged), TTL or hop limit 64, sent
/// from `mac` back to the requester's MAC.
pub fn icmp_echo_reply(frame: &mut [u8], p: &Parsed, mac: MacAddr) -> Result<(), RewriteError> {
    if !is_echo_request(frame, p) {
        return Err(RewriteError::Mismatch);
    }
    let (l3, l4) = (usize::from(p.l3_off), usize::from(p.l4_off));
    let (addr_at, addr_len, reply) = match p.l3 {
        L3::Ipv4 => (l3 + 12, 4, icmp::V4_ECHO_REPLY),
        _ => (l3 + 8, 16, icmp::V6_ECHO_REPLY),
    };
    // Validate every offset before the first write: all or nothing.
    let word = get16(frame, l4)?;
    let check = get16(frame, l4 + icmp::CHECKSUM_OFFSET)?;
    let addrs = frame
        .get_mut(addr_at..addr_at + 2 * addr_len)
        .ok_or(RewriteError::Mismatch)?;
    let (src, dst) = addrs.split_at_mut(addr_len);
    src.swap_with_slice(dst);
    let new = (u16::from(reply) << 8) | (word & 0xff);
    put16(frame, l4, new)?;
    put16(
        frame,
        l4 + icmp::CHECKSUM_OFFSET,
        checksum::update_word(check, word, new),
    )?;
    match p.l3 {
        L3::Ipv4 => {
            let ttl_word = get16(frame, l3 + 8)?;
            let new_ttl = (64 << 8) | (ttl_word & 0xff);
            let c = get16(frame, l3 + IPV4_CHECK)?;
            put16(
                frame,
                l3 + IPV4_CHECK,
                checksum::update_word(c, ttl_word, new_ttl),
            )?;
            put16(frame, l3 + 8, new_ttl)?;
        }
        _ => {
            if let Some(hl) = frame.get_mut(l3 + 7) {
                *hl = 64;
            }
        }
    }
    let requester: [u8; 6] = frame
        .get(6..12)
        .and_then(|m| m.try_into().ok())
        .ok_or(RewriteError::Mismatch)?;
    set_dst_mac(frame, MacAddr(requester))?;
    set_src_mac(frame, mac)
}

/// The TTL (IPv4) or hop limit (IPv6) of a parsed IP packet.
#[inline]
pub fn hop_limit(frame: &[u8], p: &Parsed) -> Option<u8> {
    let l3 = usize::from(p.l3_off);
    match p.l3 {
        L3::Ipv4 => frame.get(l3 + 8).copied(),
        L3::Ipv6 => frame.get(l3 + 7).copied(),
        _ => None,
    }
}

/// Turns `pkt`, an IPv4 packet whose TTL ran out (parsed as `p`), into the
/// ICMP time-exceeded error (type 11, code 0) for its sender, in place:
/// from `from_mac`/`from_ip` to the sender's MAC and address, quoting the
/// packet's IP header and the first 8 bytes after it (RFC 792), as
/// `traceroute` reads it. Frames with a VLAN tag and non-IPv4 packets are
/// refused (the caller drops them).
pub fn ipv4_time_exceeded<B: crate::PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    from_mac: MacAddr,
    from_ip: Ipv4Addr,
) -> Result<(), RewriteError> {
    ipv4_error(pkt, p, from_mac, from_ip, [11, 0], [0; 4])
}

/// Turns `pkt`, an IPv4 packet with "don't fragment" set that is larger
/// than `mtu` (parsed as `p`), into the ICMP "fragmentation needed" error
/// (type 3, code 4, with the next-hop MTU, RFC 1191) for its sender, in
/// place, as [`ipv4_time_exceeded`] does: what path-MTU discovery learns
/// from.
pub fn ipv4_frag_needed<B: crate::PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    from_mac: MacAddr,
    from_ip: Ipv4Addr,
    mtu: u16,
) -> Result<(), RewriteError> {
    let m = mtu.to_be_bytes();
    ipv4_error(pkt, p, from_mac, from_ip, [3, 4], [0, 0, m[0], m[1]])
}

/// True when an ICMP error may be sent about this IP packet: not about an
/// ICMP error (for ICMPv4 only echo is answered, for ICMPv6 only
/// informational messages), a fragment after the first, or a packet to or
/// from a multicast or broadcast address or from the unspecified address
/// (RFC 1122 3.2.2, RFC 4443 2.4).
pub fn may_answer_with_error(frame: &[u8], p: &Parsed) -> bool {
    if p.frag.is_later() || p.vlan.is_some() {
        return false;
    }
    let icmp_type = || {
        frame
            .get(usize::from(p.l4_off))
            .copied()
            .filter(|_| p.has_l4)
    };
    match (p.l3, p.key.src(), p.key.dst()) {
        (L3::Ipv4, std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) => {
            let odd = |a: Ipv4Addr| a.is_multicast() || a.is_broadcast() || a.is_unspecified();
            !odd(src)
                && !odd(dst)
                && (p.key.proto != PROTO_ICMP || icmp_type().is_some_and(|t| matches!(t, 0 | 8)))
        }
        (L3::Ipv6, std::net::IpAddr::V6(src), std::net::IpAddr::V6(dst)) => {
            !src.is_multicast()
                && !src.is_unspecified()
                && !dst.is_multicast()
                && (p.key.proto != PROTO_ICMPV6 || icmp_type().is_some_and(|t| t >= 128))
        }
        _ => false,
    }
}

/// Turns `pkt`, an IPv6 packet whose hop limit ran out (parsed as `p`),
/// into the ICMPv6 time-exceeded error (type 3, code 0) for its sender, in
/// place: from `from_mac`/`from_ip` to the sender's MAC and address,
/// quoting as much of the packet as keeps the error within the minimum
/// IPv6 MTU (RFC 4443 2.4). Frames with a VLAN tag and non-IPv6 packets
/// are refused (the caller drops them).
pub fn ipv6_time_exceeded<B: crate::PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    from_mac: MacAddr,
    from_ip: Ipv6Addr,
) -> Result<(), RewriteError> {
    ipv6_error(pkt, p, from_mac, from_ip, [3, 0], [0; 4])
}

/// Turns `pkt`, an IPv6 packet larger than `mtu` (parsed as `p`), into
/// the ICMPv6 "packet too big" error (type 2, with the MTU; RFC 4443 3.2,
/// what IPv6 path-MTU discovery learns from: routers never fragment IPv6)
/// for its sender, in place, as [`ipv6_time_exceeded`] does.
pub fn ipv6_packet_too_big<B: crate::PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    from_mac: MacAddr,
    from_ip: Ipv6Addr,
    mtu: u16,
) -> Result<(), RewriteError> {
    let m = u32::from(mtu).to_be_bytes();
    ipv6_error(pkt, p, from_mac, from_ip, [2, 0], m)
}

/// Bytes of the offending packet an ICMPv6 error quotes at most: the
/// minimum IPv6 MTU less the error's own IPv6 and ICMPv6 headers.
const V6_QUOTE: usize = 1280 - 40 - 8;

/// The ICMPv6 error `kind` (type, code) with the 4 bytes `rest` after the
/// checksum, made of `pkt` in place (see [`ipv6_time_exceeded`]).
fn ipv6_error<B: crate::PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    from_mac: MacAddr,
    from_ip: Ipv6Addr,
    kind: [u8; 2],
    rest: [u8; 4],
) -> Result<(), RewriteError> {
    if p.l3 != L3::Ipv6 || p.vlan.is_some() {
        return Err(RewriteError::NotIpv6);
    }
    let frame = pkt.data();
    let l3 = usize::from(p.l3_off);
    // The IP packet (without any Ethernet padding after it), as much as fits.
    let plen = frame.get(l3 + 4..l3 + 6).ok_or(RewriteError::Mismatch)?;
    let packet = 40 + usize::from(u16::from_be_bytes([plen[0], plen[1]]));
    let quoted = frame.len().saturating_sub(l3).min(packet).min(V6_QUOTE);
    let mut quote = [0u8; V6_QUOTE];
    let q = quote.get_mut(..quoted).ok_or(RewriteError::Mismatch)?;
    q.copy_from_slice(frame.get(l3..l3 + quoted).ok_or(RewriteError::Mismatch)?);
    let mut to_mac = [0u8; 6];
    to_mac.copy_from_slice(frame.get(6..12).ok_or(RewriteError::Mismatch)?);
    let mut to_ip = [0u8; 16];
    to_ip.copy_from_slice(frame.get(l3 + 8..l3 + 24).ok_or(RewriteError::Mismatch)?);
    let len = 8 + quoted;
    pkt.reset();
    let out = pkt
        .append(14 + 40 + len)
        .map_err(|_| RewriteError::Mismatch)?;
    out[0..6].copy_from_slice(&to_mac);
    out[6..12].copy_from_slice(&from_mac.0);
    out[12..14].copy_from_slice(&[0x86, 0xdd]);
    let ip = &mut out[14..54];
    ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, PROTO_ICMPV6, 64]);
    ip[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    ip[8..24].copy_from_slice(&from_ip.octets());
    ip[24..40].copy_from_slice(&to_ip);
    let icmp = &mut out[54..];
    icmp[..2].copy_from_slice(&kind);
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&rest);
    icmp[8..].copy_from_slice(&quote[..quoted]);
    let pseudo = checksum::pseudo_v6(from_ip.octets(), to_ip, PROTO_ICMPV6, len as u32);
    let c = !checksum::fold(checksum::combine(pseudo, checksum::sum(icmp)));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// True for an IPv4 packet with "don't fragment" set.
pub fn ipv4_dont_fragment(frame: &[u8], p: &Parsed) -> bool {
    p.l3 == L3::Ipv4
        && frame
            .get(usize::from(p.l3_off) + 6)
            .is_some_and(|b| b & 0x40 != 0)
}

/// The ICMPv4 error `kind` (type, code) with the 4 bytes `rest` after the
/// checksum, made of `pkt` in place (see [`ipv4_time_exceeded`]).
fn ipv4_error<B: crate::PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    from_mac: MacAddr,
    from_ip: Ipv4Addr,
    kind: [u8; 2],
    rest: [u8; 4],
) -> Result<(), RewriteError> {
    if p.l3 != L3::Ipv4 || p.vlan.is_some() {
        return Err(RewriteError::NotIpv4);
    }
    let frame = pkt.data();
    let l3 = usize::from(p.l3_off);
    let ihl = usize::from(frame.get(l3).ok_or(RewriteError::Mismatch)? & 0x0f) * 4;
    let quoted = (ihl + 8).min(frame.len().saturating_sub(l3));
    let mut quote = [0u8; 68];
    let q = quote.get_mut(..quoted).ok_or(RewriteError::Mismatch)?;
    q.copy_from_slice(frame.get(l3..l3 + quoted).ok_or(RewriteError::Mismatch)?);
    let mut to_mac = [0u8; 6];
    to_mac.copy_from_slice(frame.get(6..12).ok_or(RewriteError::Mismatch)?);
    let mut to_ip = [0u8; 4];
    to_ip.copy_from_slice(frame.get(l3 + 12..l3 + 16).ok_or(RewriteError::Mismatch)?);
    let total = 20 + 8 + quoted;
    pkt.reset();
    let out = pkt.append(14 + total).map_err(|_| RewriteError::Mismatch)?;
    out[0..6].copy_from_slice(&to_mac);
    out[6..12].copy_from_slice(&from_mac.0);
    out[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut out[14..34];
    ip.copy_from_slice(&[
        0x45, 0xc0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&from_ip.octets());
    ip[16..20].copy_from_slice(&to_ip);
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut out[34..];
    icmp[..2].copy_from_slice(&kind);
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&rest);
    icmp[8..].copy_from_slice(&quote[..quoted]);
    let c = checksum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Decrements the IPv4 TTL (patching the header checksum) or the IPv6 hop
/// limit. Refuses with [`RewriteError::TtlExpired`] when it is 0 or 1.
#[inline]
pub fn dec_ttl(frame: &mut [u8], p: &Parsed) -> Result<(), RewriteError> {
    let l3 = usize::from(p.l3_off);
    match p.l3 {
        L3::Ipv4 => {
            // TTL shares a 16-bit word with the protocol byte.
            let word = get16(frame, l3 + 8)?;
            if word >> 8 <= 1 {
                return Err(RewriteError::TtlExpired);
            }
            let new = word - 0x0100;
            let c = get16(frame, l3 + IPV4_CHECK)?;
            put16(frame, l3 + IPV4_CHECK, checksum::update_word(c, word, new))?;
            put16(frame, l3 + 8, new)
        }
        L3::Ipv6 => {
            let hl = frame.get_mut(l3 + 7).ok_or(RewriteError::Mismatch)?;
            if *hl <= 1 {
                return Err(RewriteError::TtlExpired);
            }
            *hl -= 1;
            Ok(())
        }
        _ => Err(RewriteError::NotIpv4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse, tests::TCP4};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    /// Verifies every checksum of `frame` with etherparse as the independent reference.
    fn assert_checksums_ok(frame: &[u8]) {
        let s = SlicedPacket::from_ethernet(frame).unwrap();
        let net = s.net.unwrap();
        match &net {
            etherparse::NetSlice::Ipv4(ip) => {
                let h = ip.header().to_header();
                assert_eq!(
                    h.header_checksum,
                    h.calc_header_checksum(),
                    "ipv4 header checksum"
                );
            }
            etherparse::NetSlice::Ipv6(_) => {}
            _ => unreachable!(),
        }
        let (src, dst, v6) = match &net {
            etherparse::NetSlice::Ipv4(ip) => (
                ip.header().source().to_vec(),
                ip.header().destination().to_vec(),
                false,
            ),
            etherparse::NetSlice::Ipv6(ip) => (
                ip.header().source().to_vec(),
                ip.header().destination().to_vec(),
                true,
            ),
            _ => unreachable!(),
        };
        let pseudo = |proto: u8, len: usize| {
            if v6 {
                checksum::pseudo_v6(
                    src.clone().try_into().unwrap(),
                    dst.clone().try_into().unwrap(),
                    proto,
                    len as u32,
                )
            } else {
                checksum::pseudo_v4(
                    src.clone().try_into().unwrap(),
                    dst.clone().try_into().unwrap(),
                    proto,
                    len as u16,
                )
            }
        };
        match s.transport {
            Some(TransportSlice::Tcp(t)) => {
                let seg = t.slice();
                assert_eq!(
                    !checksum::fold(checksum::combine(pseudo(6, seg.len()), checksum::sum(seg))),
                    0,
                    "tcp checksum"
                );
            }
            Some(TransportSlice::Udp(u)) => {
                let d = u.slice();
                if u.checksum() != 0 || v6 {
                    assert_eq!(
                        !checksum::fold(checksum::combine(pseudo(17, d.len()), checksum::sum(d))),
                        0,
                        "udp checksum"
                    );
                }
            }
            Some(TransportSlice::Icmpv4(i)) => {
                assert_eq!(checksum::checksum(i.slice()), 0, "icmp checksum");
            }
            Some(TransportSlice::Icmpv6(i)) => {
                let m = i.slice();
                assert_eq!(
                    !checksum::fold(checksum::combine(pseudo(58, m.len()), checksum::sum(m))),
                    0,
                    "icmpv6 checksum"
                );
            }
            Some(TransportSlice::Igmp(i)) => {
                assert_eq!(checksum::checksum(i.slice()), 0, "igmp checksum");
            }
            None => {}
        }
    }

    fn tcp4_frame() -> Vec<u8> {
        let mut f = TCP4.to_vec();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
            .ipv4([10, 1, 0, 4], [10, 1, 0, 100], 64)
            .tcp(40000, 80, 1, 0xffff)
            .syn();
        f.clear();
        b.write(&mut f, b"hello").unwrap();
        f
    }

    #[test]
    fn dnat_tcp4() {
        let mut f = tcp4_frame();
        let p = parse(&f, 0).unwrap();
        set_ipv4_dst(&mut f, &p, Ipv4Addr::new(10, 1, 0, 5)).unwrap();
        set_dst_port(&mut f, &p, 8080).unwrap();
        set_dst_mac(&mut f, MacAddr([2, 0, 0, 0, 0, 5])).unwrap();
        set_src_mac(&mut f, MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])).unwrap();
        dec_ttl(&mut f, &p).unwrap();
        assert_checksums_ok(&f);
        let q = parse(&f, 0).unwrap();
        assert_eq!(q.key.dst(), "10.1.0.5".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(q.key.dst_port, 8080);
        assert_eq!(f[14 + 8], 63);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 5]);
    }

    /// A neighbour solicitation for `target` from `src`, with or without
    /// the source link-layer address option.
    fn solicitation(src: [u8; 16], target: [u8; 16], option: bool, hop: u8) -> Vec<u8> {
        let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target);
        if option {
            icmp.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 4]);
        }
        let dst = [
            0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, target[13], target[14], target[15],
        ];
        let pseudo = checksum::pseudo_v6(src, dst, 58, icmp.len() as u32);
        let c = !checksum::fold(checksum::combine(pseudo, checksum::sum(&icmp)));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![
            0x33, 0x33, 0xff, target[13], target[14], target[15], 2, 0, 0, 0, 0, 4, 0x86, 0xdd,
        ];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, hop]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&icmp);
        f
    }

    #[test]
    fn neighbour_solicitations_get_advertisements() {
        let pool = crate::pool::Pool::new(&crate::pool::PoolConfig::new("nd", 8)).unwrap();
        let me = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];
        let gw = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mac = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        for option in [true, false] {
            let f = solicitation(me, gw, option, 255);
            let mut pkt = pool.alloc_copy(&f).unwrap();
            let p = parse(pkt.data(), 0).unwrap();
            assert!(is_icmpv6_link_control(pkt.data(), &p));
            assert_eq!(nd_solicitation(pkt.data(), &p), Some((gw, me)));
            neighbor_advert(&mut pkt, &p, mac).unwrap();
            let d = pkt.data();
            assert_eq!(d.len(), 14 + 40 + 32);
            assert_checksums_ok(d);
            assert_eq!((&d[0..6], &d[6..12]), (&[2, 0, 0, 0, 0, 4][..], &mac.0[..]));
            assert_eq!((&d[22..38], &d[38..54]), (&gw[..], &me[..]));
            assert_eq!((d[21], d[54], d[58]), (255, 136, 0xe0));
            assert_eq!(&d[62..78], &gw[..]);
            assert_eq!(&d[78..86], &[2, 1, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        }
        // A hop limit other than 255 means it crossed a router: ignored.
        let f = solicitation(me, gw, true, 64);
        let p = parse(&f, 0).unwrap();
        assert_eq!(nd_solicitation(&f, &p), None);
        let mut t = tcp4_frame();
        let p = parse(&t, 0).unwrap();
        assert!(!is_icmpv6_link_control(&t, &p));
        let mut b = pool.alloc_copy(&t).unwrap();
        assert_eq!(
            neighbor_advert(&mut b, &p, mac),
            Err(RewriteError::Mismatch)
        );
        t.clear();
    }

    fn arb_tcp_udp4() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>(),
            2u8..=255,
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(s, d, sp, dp, ttl, tcp, payload, zero, tagged, opts)| {
                let mut f = Vec::new();
                let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                    .ipv4(s, d, ttl);
                if tcp {
                    b.tcp(sp, dp, 9, 1000).write(&mut f, &payload).unwrap();
                } else {
                    b.udp(sp, dp).write(&mut f, &payload).unwrap();
                    if zero {
                        // UDP over IPv4 may carry no checksum at all.
                        let at = 14 + 20 + udp::CHECKSUM_OFFSET;
                        f[at..at + 2].copy_from_slice(&[0, 0]);
                    }
                }
                if opts {
                    // Four no-op options: the transport header 4 bytes on,
                    // off the common frame's fixed offsets.
                    f.splice(34..34, [1, 1, 1, 1]);
                    f[14] = 0x46;
                    let total = u16::from_be_bytes([f[16], f[17]]) + 4;
                    f[16..18].copy_from_slice(&total.to_be_bytes());
                    f[24..26].copy_from_slice(&[0, 0]);
                    let c = !checksum::fold(checksum::sum(&f[14..38]));
                    f[24..26].copy_from_slice(&c.to_be_bytes());
                }
                if tagged {
                    // A VLAN tag moves every header 4 bytes on.
                    f.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
                }
                f
            })
    }

    proptest! {
        /// The compiled transposition writes exactly what the field-by-field
        /// rewrites (each with its own incremental checksum patch) write.
        #[test]
        fn transpose4_equals_field_by_field(
            f in arb_tcp_udp4(),
            new_src in proptest::option::of((any::<[u8; 4]>(), any::<u16>())),
            new_dst in proptest::option::of((any::<[u8; 4]>(), any::<u16>())),
        ) {
            let p = parse(&f, 0).unwrap();
            let src = new_src.map(|(a, port)| (Ipv4Addr::from(a), port));
            let dst = new_dst.map(|(a, port)| (Ipv4Addr::from(a), port));
            let t = Transpose4::compile(&p.key, src, dst).unwrap();
            let mut fast = f.clone();
            t.apply(&mut fast, &p).unwrap();
            let mut slow = f.clone();
            if let Some((a, port)) = src {
                set_ipv4_src(&mut slow, &p, a).unwrap();
                set_src_port(&mut slow, &p, port).unwrap();
            }
            if let Some((a, port)) = dst {
                set_ipv4_dst(&mut slow, &p, a).unwrap();
                set_dst_port(&mut slow, &p, port).unwrap();
            }
            dec_ttl(&mut slow, &p).unwrap();
            // 0x0000 and 0xffff are the same one's-complement value; both
            // paths must still verify.
            assert_checksums_ok(&fast);
            let norm = |mut v: Vec<u8>| {
                let (l3, l4) = (usize::from(p.l3_off), usize::from(p.l4_off));
                for at in [l3 + 10, l4 + if p.key.proto == 6 { 16 } else { 6 }] {
                    if v[at..at + 2] == [0, 0] && !(p.key.proto == 17 && at >= l4) {
                        v[at..at + 2].copy_from_slice(&[0xff, 0xff]);
                    }
                }
                v
            };
            prop_assert_eq!(norm(fast), norm(slow));
        }
    }

    #[test]
    fn transpose4_refuses_expired_ttl_and_other_flows() {
        let mut f = tcp4_frame();
        f[14 + 8] = 1;
        let p = parse(&f, 0).unwrap();
        let t =
            Transpose4::compile(&p.key, None, Some((Ipv4Addr::new(10, 1, 0, 5), 8080))).unwrap();
        let before = f.clone();
        assert_eq!(t.apply(&mut f, &p), Err(RewriteError::TtlExpired));
        assert_eq!(f, before, "nothing written");
        let mut i = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut i, b"x")
            .unwrap();
        assert!(Transpose4::compile(&parse(&i, 0).unwrap().key, None, None).is_none());
    }

    #[test]
    fn partial_checksums_are_completed() {
        // As an offloading sender leaves them: the field holds the folded
        // pseudo-header sum, not the checksum.
        for proto in [6u8, 17] {
            let mut f = Vec::new();
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(
                [10, 1, 0, 4],
                [10, 1, 0, 5],
                64,
            );
            if proto == 6 {
                b.tcp(40000, 80, 7, 1000)
                    .write(&mut f, b"partial!")
                    .unwrap();
            } else {
                b.udp(40000, 53).write(&mut f, b"partial!").unwrap();
            }
            let p = parse(&f, 0).unwrap();
            let (at, _) = pseudo_checksum_at(&p).unwrap();
            let pseudo = checksum::pseudo_v4([10, 1, 0, 4], [10, 1, 0, 5], proto, p.l4_len);
            f[at..at + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
            complete_partial_checksum(&mut f, &p).unwrap();
            assert_checksums_ok(&f);
        }
        let mut f = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut f, b"x")
            .unwrap();
        let p = parse(&f, 0).unwrap();
        assert_eq!(
            complete_partial_checksum(&mut f, &p),
            Err(RewriteError::Mismatch)
        );
    }

    #[test]
    fn echo_requests_become_replies_v4_and_v6() {
        let gw = MacAddr([0x12, 0, 0, 0, 0, 1]);
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 4], [0x12, 0, 0, 0, 0, 1])
            .ipv4([10, 1, 0, 4], [10, 1, 0, 100], 7)
            .icmpv4_echo_request(0x1234, 9)
            .write(&mut f, b"ping payload")
            .unwrap();
        let p = parse(&f, 0).unwrap();
        assert!(is_echo_request(&f, &p));
        icmp_echo_reply(&mut f, &p, gw).unwrap();
        assert_checksums_ok(&f);
        let q = parse(&f, 0).unwrap();
        assert_eq!(
            q.key.src(),
            "10.1.0.100".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(q.key.dst(), "10.1.0.4".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(f[usize::from(q.l4_off)], icmp::V4_ECHO_REPLY);
        assert_eq!(
            (f[14 + 8], &f[0..6], &f[6..12]),
            (64, &[2, 0, 0, 0, 0, 4][..], &gw.0[..])
        );
        assert!(!is_echo_request(&f, &q), "a reply is not a request");
        assert_eq!(icmp_echo_reply(&mut f, &q, gw), Err(RewriteError::Mismatch));

        let mut f = Vec::new();
        let (a, b) = (
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        );
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 4], [0x12, 0, 0, 0, 0, 1])
            .ipv6(a, b, 3)
            .icmpv6_echo_request(7, 1)
            .write(&mut f, b"v6")
            .unwrap();
        let p = parse(&f, 0).unwrap();
        icmp_echo_reply(&mut f, &p, gw).unwrap();
        assert_checksums_ok(&f);
        let q = parse(&f, 0).unwrap();
        assert_eq!((q.key.src_ip, q.key.dst_ip), (b, a));
        assert_eq!(
            (f[usize::from(q.l4_off)], f[14 + 7]),
            (icmp::V6_ECHO_REPLY, 64)
        );
        // Not ICMP at all.
        let mut t = tcp4_frame();
        let p = parse(&t, 0).unwrap();
        assert!(!is_echo_request(&t, &p));
        assert_eq!(icmp_echo_reply(&mut t, &p, gw), Err(RewriteError::Mismatch));
    }

    #[test]
    fn udp4_zero_checksum_stays_zero() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut f, b"x")
            .unwrap();
        f[14 + 20 + 6] = 0;
        f[14 + 20 + 7] = 0;
        let p = parse(&f, 0).unwrap();
        set_ipv4_src(&mut f, &p, Ipv4Addr::new(1, 2, 3, 4)).unwrap();
        set_src_port(&mut f, &p, 999).unwrap();
        assert_eq!(&f[14 + 26..14 + 28], &[0, 0]);
        assert_checksums_ok(&f);
    }

    #[test]
    fn icmp_echo_ident_and_non_echo() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(0x1234, 1)
            .write(&mut f, b"ping")
            .unwrap();
        let p = parse(&f, 0).unwrap();
        set_ipv4_src(&mut f, &p, Ipv4Addr::new(192, 0, 2, 1)).unwrap();
        set_src_port(&mut f, &p, 0x4321).unwrap();
        assert_checksums_ok(&f);
        assert_eq!(parse(&f, 0).unwrap().key.src_port, 0x4321);
        assert_eq!(set_dst_port(&mut f, &p, 1), Err(RewriteError::NoPorts));
        // Destination unreachable has no identifier.
        f[34] = 3;
        assert_eq!(set_src_port(&mut f, &p, 1), Err(RewriteError::NoPorts));
    }

    #[test]
    fn arp_request_becomes_its_reply() {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[
            0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 1, 0, 4, 0, 0, 0, 0, 0, 0, 10, 1, 0, 1,
        ]);
        let p = parse(&f, 0).unwrap();
        let gw = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        arp_reply(&mut f, &p, gw).unwrap();
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[6..12], &gw.0);
        let a = arp::Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(a.operation(), arp::OP_REPLY);
        assert_eq!(
            (a.sender_mac(), a.sender_ip()),
            (gw, Ipv4Addr::new(10, 1, 0, 1))
        );
        assert_eq!(
            (a.target_mac(), a.target_ip()),
            (MacAddr([2, 0, 0, 0, 0, 1]), Ipv4Addr::new(10, 1, 0, 4))
        );
        // Not an ARP frame: refused, unchanged.
        let mut tcp = tcp4_frame();
        let before = tcp.clone();
        let q = parse(&tcp, 0).unwrap();
        assert_eq!(arp_reply(&mut tcp, &q, gw), Err(RewriteError::Mismatch));
        assert_eq!(tcp, before);
    }

    #[test]
    fn ttl_expiry_and_wrong_family() {
        let mut f = tcp4_frame();
        f[14 + 8] = 1;
        let p = parse(&f, 0).unwrap();
        let before = f.clone();
        assert_eq!(dec_ttl(&mut f, &p), Err(RewriteError::TtlExpired));
        assert_eq!(
            set_ipv6_dst(&mut f, &p, Ipv6Addr::LOCALHOST),
            Err(RewriteError::NotIpv6)
        );
        assert_eq!(f, before);
        // A parse result that does not belong to this (shorter) frame.
        let mut short = f[..30].to_vec();
        assert_eq!(
            set_ipv4_dst(&mut short, &p, Ipv4Addr::LOCALHOST),
            Err(RewriteError::Mismatch)
        );
        assert_eq!(&short[..], &before[..30]);
    }

    fn v6_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([0; 6], [0; 6]).ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        );
        let mut f = Vec::new();
        match kind {
            0 => b.tcp(1000, 2000, 7, 100).write(&mut f, payload).unwrap(),
            1 => b.udp(1000, 2000).write(&mut f, payload).unwrap(),
            _ => b.icmpv6_echo_request(77, 1).write(&mut f, payload).unwrap(),
        }
        f
    }

    fn v4_frame(kind: u8, payload: &[u8], ttl: u8) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([0; 6], [0; 6]).ipv4([10, 9, 8, 7], [172, 16, 0, 1], ttl);
        let mut f = Vec::new();
        match kind {
            0 => b.tcp(1000, 2000, 7, 100).write(&mut f, payload).unwrap(),
            1 => b.udp(1000, 2000).write(&mut f, payload).unwrap(),
            _ => b.icmpv4_echo_request(77, 1).write(&mut f, payload).unwrap(),
        }
        f
    }

    proptest! {
        // Incremental rewrites give the checksums a full recomputation gives,
        // for random packets (family, protocol, payload) and random rewrites.
        #[test]
        fn rewrites_keep_checksums_valid(
            v6 in any::<bool>(),
            kind in 0u8..3,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            ttl in 2u8..=255,
            src4 in any::<[u8; 4]>(), dst4 in any::<[u8; 4]>(),
            src6 in any::<[u8; 16]>(), dst6 in any::<[u8; 16]>(),
            sport in any::<u16>(), dport in any::<u16>(),
            which in 0u8..32,
        ) {
            let mut f = if v6 { v6_frame(kind, &payload) } else { v4_frame(kind, &payload, ttl) };
            let p = parse(&f, 0).unwrap();
            if which & 1 != 0 {
                if v6 { set_ipv6_src(&mut f, &p, src6.into()).unwrap() } else { set_ipv4_src(&mut f, &p, src4.into()).unwrap() }
            }
            if which & 2 != 0 {
                if v6 { set_ipv6_dst(&mut f, &p, dst6.into()).unwrap() } else { set_ipv4_dst(&mut f, &p, dst4.into()).unwrap() }
            }
            if which & 4 != 0 {
                set_src_port(&mut f, &p, sport).unwrap();
            }
            if which & 8 != 0 && kind != 2 {
                set_dst_port(&mut f, &p, dport).unwrap();
            }
            if which & 16 != 0 {
                dec_ttl(&mut f, &p).unwrap();
            }
            assert_checksums_ok(&f);
            let q = parse(&f, 0).unwrap();
            if which & 4 != 0 { prop_assert_eq!(q.key.src_port, sport); }
            if which & 8 != 0 && kind != 2 { prop_assert_eq!(q.key.dst_port, dport); }
        }
    }
}
