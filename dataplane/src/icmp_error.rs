//! ICMP errors that belong to a connection: destination unreachable
//! (fragmentation needed included), time exceeded and parameter problem
//! quote the header of the packet that caused them. Through NAT the quote
//! carries the addresses and ports of the other side of the translation,
//! so the error must be translated, outside and inside, to reach the right
//! host with what that host sent (RFC 5508 asks it of a NAT; path-MTU
//! discovery through a VIP depends on it).
//!
//! [`quote`] reads the quoted packet's flow key; [`translate`] rewrites
//! the outer addresses and the quoted addresses and ports, and puts the
//! quoted IP header checksum (IPv4) and the ICMP or ICMPv6 checksum right.
//! ICMPv6 errors (destination unreachable, packet too big, time exceeded,
//! parameter problem) are read when the quoted IPv6 header is followed
//! directly by TCP, UDP or an echo (no extension headers).

use crate::key::{FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, is_v4_mapped, to16};
use crate::parse::{L3, Parsed};
use crate::rewrite::{self, RewriteError};
use crate::wire::checksum;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// ICMPv4 destination unreachable.
pub const DEST_UNREACHABLE: u8 = 3;
/// ICMPv4 time exceeded.
pub const TIME_EXCEEDED: u8 = 11;
/// ICMPv4 parameter problem.
pub const PARAMETER_PROBLEM: u8 = 12;

/// The packet an ICMP error quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// Its flow key, as it was when the error was made (ICMP echo: the
    /// identifier in `src_port`).
    pub key: FlowKey,
    /// Offset in the frame of its IP header.
    pub ip_off: usize,
    /// Offset in the frame of its transport header (8 bytes of it at least).
    pub l4_off: usize,
}

/// The packet quoted by `frame`, parsed as `p`, if it is an ICMPv4 error
/// quoting an IPv4 header, or an ICMPv6 error quoting an IPv6 header, with
/// at least 8 bytes of a TCP, UDP or echo header after it (what
/// connections are made of).
#[inline]
pub fn quote(frame: &[u8], p: &Parsed) -> Option<Quote> {
    // (Inlined: the slow path asks of every packet, most of them no ICMP.)
    if !p.key.is_icmp() || !p.has_l4 {
        return None;
    }
    quote_icmp(frame, p)
}

/// [`quote`] for an ICMP or ICMPv6 message.
#[inline(never)]
fn quote_icmp(frame: &[u8], p: &Parsed) -> Option<Quote> {
    if p.l3 == L3::Ipv6 && p.key.proto == PROTO_ICMPV6 {
        return quote_v6(frame, p);
    }
    if p.l3 != L3::Ipv4 || p.key.proto != PROTO_ICMP {
        return None;
    }
    let icmp = usize::from(p.l4_off);
    if !matches!(
        frame.get(icmp)?,
        &(DEST_UNREACHABLE | TIME_EXCEEDED | PARAMETER_PROBLEM)
    ) {
        return None;
    }
    let ip_off = icmp + 8;
    let ip = frame.get(ip_off..ip_off + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let l4_off = ip_off + ihl;
    let l4 = frame.get(l4_off..l4_off + 8)?;
    let proto = ip[9];
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let (src_port, dst_port) = match proto {
        PROTO_TCP | PROTO_UDP => (be16(l4, 0), be16(l4, 2)),
        // Echo request or reply: the identifier.
        PROTO_ICMP if matches!(l4[0], 0 | 8) => (be16(l4, 4), 0),
        _ => return None,
    };
    let addr = |at: usize| to16(Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]).into());
    Some(Quote {
        key: FlowKey {
            src_ip: addr(12),
            dst_ip: addr(16),
            src_port,
            dst_port,
            proto,
        },
        ip_off,
        l4_off,
    })
}

/// ICMPv6 destination unreachable, packet too big, time exceeded and
/// parameter problem: the errors (types 1 to 4).
const V6_ERRORS: std::ops::RangeInclusive<u8> = 1..=4;

/// [`quote`] for an ICMPv6 message.
fn quote_v6(frame: &[u8], p: &Parsed) -> Option<Quote> {
    let icmp = usize::from(p.l4_off);
    if !V6_ERRORS.contains(frame.get(icmp)?) {
        return None;
    }
    // The quote must lie inside the error's own IPv6 payload.
    let l3 = usize::from(p.l3_off);
    let plen = frame.get(l3 + 4..l3 + 6)?;
    let end = (l3 + 40 + usize::from(u16::from_be_bytes([plen[0], plen[1]]))).min(frame.len());
    let ip_off = icmp + 8;
    let ip = frame.get(ip_off..ip_off + 40)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let l4_off = ip_off + 40;
    if l4_off + 8 > end {
        return None;
    }
    let l4 = frame.get(l4_off..l4_off + 8)?;
    let proto = ip[6];
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let (src_port, dst_port) = match proto {
        PROTO_TCP | PROTO_UDP => (be16(l4, 0), be16(l4, 2)),
        // Echo request or reply: the identifier.
        PROTO_ICMPV6 if matches!(l4[0], 128 | 129) => (be16(l4, 4), 0),
        _ => return None,
    };
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&ip[at..at + 16]);
        a
    };
    let (src_ip, dst_ip) = (addr(8), addr(24));
    // As the parser does: a key would take such an address for IPv4.
    if is_v4_mapped(&src_ip) || is_v4_mapped(&dst_ip) {
        return None;
    }
    Some(Quote {
        key: FlowKey {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto,
        },
        ip_off,
        l4_off,
    })
}

/// What to change in an ICMP error: the outer source and destination
/// addresses, and the quoted packet's source and destination (address and
/// port; for a quoted echo, the port is its identifier). Every address is
/// of the error's family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Translation {
    /// New outer source address.
    pub outer_src: Option<IpAddr>,
    /// New outer destination address.
    pub outer_dst: Option<IpAddr>,
    /// New quoted source.
    pub quoted_src: Option<(IpAddr, u16)>,
    /// New quoted destination.
    pub quoted_dst: Option<(IpAddr, u16)>,
    /// Added (wrapping) to the quoted TCP segment's sequence number: a
    /// SYN proxy's offset, so that the sender recognizes its own segment.
    pub quoted_seq: u32,
}

/// Applies `t` to the ICMP or ICMPv6 error `frame` (parsed as `p`,
/// quoting `q`): the outer header's addresses, the quoted addresses and
/// ports, the quoted IPv4 header checksum and the ICMP or ICMPv6 checksum
/// (recomputed: errors are short and rare). The quoted transport checksum
/// is left alone (hosts do not check it in an error). An address of the
/// other family is refused before anything is written.
pub fn translate(
    frame: &mut [u8],
    p: &Parsed,
    q: &Quote,
    t: &Translation,
) -> Result<(), RewriteError> {
    match p.l3 {
        L3::Ipv4 => {
            let v4 = |a: IpAddr| match a {
                IpAddr::V4(a) => Ok(a),
                IpAddr::V6(_) => Err(RewriteError::NotIpv4),
            };
            let t4 = Translation4 {
                outer_src: t.outer_src.map(v4).transpose()?,
                outer_dst: t.outer_dst.map(v4).transpose()?,
                quoted_src: t
                    .quoted_src
                    .map(|(a, p)| v4(a).map(|a| (a, p)))
                    .transpose()?,
                quoted_dst: t
                    .quoted_dst
                    .map(|(a, p)| v4(a).map(|a| (a, p)))
                    .transpose()?,
                quoted_seq: t.quoted_seq,
            };
            translate_v4(frame, p, q, &t4)
        }
        L3::Ipv6 => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => Ok(a),
                IpAddr::V4(_) => Err(RewriteError::NotIpv6),
            };
            let t6 = Translation6 {
                outer_src: t.outer_src.map(v6).transpose()?,
                outer_dst: t.outer_dst.map(v6).transpose()?,
                quoted_src: t
                    .quoted_src
                    .map(|(a, p)| v6(a).map(|a| (a, p)))
                    .transpose()?,
                quoted_dst: t
                    .quoted_dst
                    .map(|(a, p)| v6(a).map(|a| (a, p)))
                    .transpose()?,
                quoted_seq: t.quoted_seq,
            };
            translate_v6(frame, p, q, &t6)
        }
        _ => Err(RewriteError::Mismatch),
    }
}

/// A [`Translation`] of one family.
struct Translated<A> {
    outer_src: Option<A>,
    outer_dst: Option<A>,
    quoted_src: Option<(A, u16)>,
    quoted_dst: Option<(A, u16)>,
    quoted_seq: u32,
}

type Translation4 = Translated<Ipv4Addr>;
type Translation6 = Translated<Ipv6Addr>;

/// Writes the quoted addresses and ports of `t` (`addr_at`: the source
/// and destination address offsets in the quoted header).
fn put_quoted<A: Copy>(
    frame: &mut [u8],
    q: &Quote,
    t: &Translated<A>,
    addr_at: [usize; 2],
    octets: impl Fn(A) -> ([u8; 16], usize),
) -> Result<(), RewriteError> {
    let echo = matches!(q.key.proto, PROTO_ICMP | PROTO_ICMPV6);
    let mut put = |at: usize, bytes: &[u8]| -> Result<(), RewriteError> {
        frame
            .get_mut(at..at + bytes.len())
            .ok_or(RewriteError::Mismatch)?
            .copy_from_slice(bytes);
        Ok(())
    };
    if let Some((a, port)) = t.quoted_src {
        let (o, n) = octets(a);
        put(q.ip_off + addr_at[0], &o[..n])?;
        put(q.l4_off + if echo { 4 } else { 0 }, &port.to_be_bytes())?;
    }
    if let Some((a, port)) = t.quoted_dst {
        let (o, n) = octets(a);
        put(q.ip_off + addr_at[1], &o[..n])?;
        if !echo {
            put(q.l4_off + 2, &port.to_be_bytes())?;
        }
    }
    if t.quoted_seq != 0 && q.key.proto == crate::key::PROTO_TCP {
        let b = frame
            .get_mut(q.l4_off + 4..q.l4_off + 8)
            .ok_or(RewriteError::Mismatch)?;
        let seq = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        b.copy_from_slice(&seq.wrapping_add(t.quoted_seq).to_be_bytes());
    }
    Ok(())
}

/// [`translate`] for ICMPv6.
fn translate_v6(
    frame: &mut [u8],
    p: &Parsed,
    q: &Quote,
    t: &Translation6,
) -> Result<(), RewriteError> {
    let l3 = usize::from(p.l3_off);
    // Check the whole message is there before the first write.
    let b = frame.get(l3 + 4..l3 + 6).ok_or(RewriteError::Mismatch)?;
    let end = l3 + 40 + usize::from(u16::from_be_bytes([b[0], b[1]]));
    let icmp = usize::from(p.l4_off);
    if frame.len() < end || icmp + 4 > end || q.l4_off + 8 > end {
        return Err(RewriteError::Mismatch);
    }
    if let Some(a) = t.outer_src {
        rewrite::set_ipv6_src(frame, p, a)?;
    }
    if let Some(a) = t.outer_dst {
        rewrite::set_ipv6_dst(frame, p, a)?;
    }
    put_quoted(frame, q, t, [8, 24], |a| (a.octets(), 16))?;
    let addr = |at: usize| -> Result<[u8; 16], RewriteError> {
        frame
            .get(at..at + 16)
            .and_then(|s| s.try_into().ok())
            .ok_or(RewriteError::Mismatch)
    };
    let (src, dst) = (addr(l3 + 8)?, addr(l3 + 24)?);
    let msg = frame.get_mut(icmp..end).ok_or(RewriteError::Mismatch)?;
    msg[2..4].copy_from_slice(&[0, 0]);
    let pseudo = checksum::pseudo_v6(src, dst, PROTO_ICMPV6, msg.len() as u32);
    let c = !checksum::fold(checksum::combine(pseudo, checksum::sum(msg)));
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// [`translate`] for ICMPv4.
fn translate_v4(
    frame: &mut [u8],
    p: &Parsed,
    q: &Quote,
    t: &Translation4,
) -> Result<(), RewriteError> {
    if let Some(a) = t.outer_src {
        rewrite::set_ipv4_src(frame, p, a)?;
    }
    if let Some(a) = t.outer_dst {
        rewrite::set_ipv4_dst(frame, p, a)?;
    }
    put_quoted(frame, q, t, [12, 16], |a| {
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&a.octets());
        (o, 4)
    })?;
    // The quoted IP header's checksum, then the ICMP checksum over the
    // whole message (to the end of the IP packet).
    let ihl = q.l4_off - q.ip_off;
    let hdr = frame
        .get_mut(q.ip_off..q.ip_off + ihl)
        .ok_or(RewriteError::Mismatch)?;
    hdr[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = usize::from(p.l4_off);
    let end = usize::from(p.l3_off) + {
        let l3 = usize::from(p.l3_off);
        let b = frame.get(l3 + 2..l3 + 4).ok_or(RewriteError::Mismatch)?;
        usize::from(u16::from_be_bytes([b[0], b[1]]))
    };
    let msg = frame.get_mut(icmp..end).ok_or(RewriteError::Mismatch)?;
    msg[2..4].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    /// A port-unreachable error from 10.1.0.4 to 10.1.0.20 quoting UDP
    /// 10.1.0.20:41000 -> 10.1.0.4:5353.
    fn port_unreachable() -> Vec<u8> {
        let mut quoted = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 1, 0, 20], [10, 1, 0, 4], 63)
            .udp(41000, 5353)
            .write(&mut quoted, &[0x61; 16])
            .unwrap();
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 4], [0x12, 0, 0, 0, 0, 1])
            .ipv4([10, 1, 0, 4], [10, 1, 0, 20], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut v, &quoted)
            .unwrap();
        v
    }

    #[test]
    fn an_error_is_translated_outside_and_inside_with_valid_checksums() {
        let mut f = port_unreachable();
        let p = parse(&f, 0).unwrap();
        let q = quote(&f, &p).unwrap();
        assert_eq!(
            q.key.src(),
            "10.1.0.20".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            (q.key.src_port, q.key.dst_port, q.key.proto),
            (41000, 5353, 17)
        );
        // As through a VIP 10.1.0.101:53 in front of 10.1.0.4:5353.
        let vip = Ipv4Addr::new(10, 1, 0, 101);
        let t = Translation {
            outer_src: Some(vip.into()),
            quoted_dst: Some((vip.into(), 53)),
            ..Translation::default()
        };
        translate(&mut f, &p, &q, &t).unwrap();
        let s = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!()
        };
        assert_eq!(ip.header().source_addr(), vip);
        assert_eq!(
            ip.header().to_header().calc_header_checksum(),
            ip.header().header_checksum()
        );
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type().calc_checksum(icmp.payload()),
            icmp.checksum()
        );
        let inner = etherparse::Ipv4HeaderSlice::from_slice(icmp.payload()).unwrap();
        assert_eq!(inner.destination_addr(), vip);
        assert_eq!(
            inner.to_header().calc_header_checksum(),
            inner.header_checksum()
        );
        let l4 = &icmp.payload()[20..];
        assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 53);
        assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), 41000);
    }

    #[test]
    fn an_icmpv6_error_is_translated_outside_and_inside_with_a_valid_checksum() {
        let a = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let (client, dip, vip) = (a("fd00:1::20"), a("fd00:1::4"), a("fd00:1::101"));
        let mut quoted = Vec::new();
        etherparse::PacketBuilder::ipv6(client.octets(), dip.octets(), 63)
            .udp(41000, 9999)
            .write(&mut quoted, &[0x61; 16])
            .unwrap();
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 4], [0x12, 0, 0, 0, 0, 1])
            .ipv6(dip.octets(), client.octets(), 64)
            .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                etherparse::icmpv6::DestUnreachableCode::Port,
            ))
            .write(&mut f, &quoted)
            .unwrap();
        let p = parse(&f, 0).unwrap();
        let q = quote(&f, &p).unwrap();
        assert_eq!(q.key.src(), IpAddr::V6(client));
        // A quote with an IPv4-mapped address is no packet a key could
        // name (it would pass for IPv4): not read.
        for at in [14 + 40 + 8 + 8, 14 + 40 + 8 + 24] {
            let mut mapped = f.clone();
            mapped[at..at + 16]
                .copy_from_slice(&Ipv4Addr::new(10, 1, 0, 20).to_ipv6_mapped().octets());
            assert_eq!(quote(&mapped, &parse(&mapped, 0).unwrap()), None);
        }
        assert_eq!(
            (q.key.src_port, q.key.dst_port, q.key.proto),
            (41000, 9999, 17)
        );
        let t = Translation {
            outer_src: Some(vip.into()),
            quoted_dst: Some((vip.into(), 9)),
            ..Translation::default()
        };
        // An address of the other family is refused, nothing written.
        let before = f.clone();
        let wrong = Translation {
            outer_src: Some(Ipv4Addr::new(10, 1, 0, 101).into()),
            ..Translation::default()
        };
        assert_eq!(
            translate(&mut f, &p, &q, &wrong),
            Err(RewriteError::NotIpv6)
        );
        assert_eq!(f, before);
        translate(&mut f, &p, &q, &t).unwrap();
        let s = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &s.net else {
            panic!()
        };
        assert_eq!(ip.header().source_addr(), vip);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!()
        };
        let want = icmp
            .icmp_type()
            .calc_checksum(vip.octets(), client.octets(), icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want);
        let inner = etherparse::Ipv6HeaderSlice::from_slice(icmp.payload()).unwrap();
        assert_eq!(inner.destination_addr(), vip);
        assert_eq!(inner.source_addr(), client);
        let l4 = &icmp.payload()[40..];
        assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), 41000);
        assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 9);
    }

    #[test]
    fn only_errors_with_a_whole_quote_are_read() {
        let f = port_unreachable();
        let p = parse(&f, 0).unwrap();
        // Cut inside the quoted UDP header: not a usable quote.
        let short = &f[..f.len() - 20];
        assert!(quote(short, &p).is_none());
        // An echo request is no error.
        let mut echo = f.clone();
        echo[34] = 8;
        let p = parse(&echo, 0).unwrap();
        assert!(quote(&echo, &p).is_none());
    }
}
