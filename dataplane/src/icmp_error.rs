//! ICMP errors that belong to a connection: destination unreachable
//! (fragmentation needed included), time exceeded and parameter problem
//! quote the header of the packet that caused them. Through NAT the quote
//! carries the addresses and ports of the other side of the translation,
//! so the error must be translated, outside and inside, to reach the right
//! host with what that host sent (RFC 5508 asks it of a NAT; path-MTU
//! discovery through a VIP depends on it).
//!
//! [`quote`] reads the quoted packet's flow key; [`translate_v4`] rewrites
//! the outer addresses and the quoted addresses and ports, and puts the
//! quoted IP header checksum and the ICMP checksum right. IPv4 only.

use crate::key::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP, to16};
use crate::parse::{L3, Parsed};
use crate::rewrite::{self, RewriteError};
use crate::wire::checksum;
use std::net::Ipv4Addr;

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
/// quoting an IPv4 header with at least 8 bytes of a TCP, UDP or ICMP echo
/// header after it (what connections are made of).
pub fn quote(frame: &[u8], p: &Parsed) -> Option<Quote> {
    if p.l3 != L3::Ipv4 || p.key.proto != PROTO_ICMP || !p.has_l4 {
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

/// What to change in an ICMP error: the outer source and destination
/// addresses, and the quoted packet's source and destination (address and
/// port; for a quoted echo, the port is its identifier).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Translation {
    /// New outer source address.
    pub outer_src: Option<Ipv4Addr>,
    /// New outer destination address.
    pub outer_dst: Option<Ipv4Addr>,
    /// New quoted source.
    pub quoted_src: Option<(Ipv4Addr, u16)>,
    /// New quoted destination.
    pub quoted_dst: Option<(Ipv4Addr, u16)>,
}

/// Applies `t` to the ICMPv4 error `frame` (parsed as `p`, quoting `q`):
/// the outer header's addresses (its checksum patched), the quoted
/// addresses and ports, the quoted IP header checksum and the ICMP
/// checksum (recomputed: errors are short and rare). The quoted transport
/// checksum is left alone (hosts do not check it in an error).
pub fn translate_v4(
    frame: &mut [u8],
    p: &Parsed,
    q: &Quote,
    t: &Translation,
) -> Result<(), RewriteError> {
    if let Some(a) = t.outer_src {
        rewrite::set_ipv4_src(frame, p, a)?;
    }
    if let Some(a) = t.outer_dst {
        rewrite::set_ipv4_dst(frame, p, a)?;
    }
    let echo = q.key.proto == PROTO_ICMP;
    let mut put = |at: usize, bytes: &[u8]| -> Result<(), RewriteError> {
        frame
            .get_mut(at..at + bytes.len())
            .ok_or(RewriteError::Mismatch)?
            .copy_from_slice(bytes);
        Ok(())
    };
    if let Some((a, port)) = t.quoted_src {
        put(q.ip_off + 12, &a.octets())?;
        put(q.l4_off + if echo { 4 } else { 0 }, &port.to_be_bytes())?;
    }
    if let Some((a, port)) = t.quoted_dst {
        put(q.ip_off + 16, &a.octets())?;
        if !echo {
            put(q.l4_off + 2, &port.to_be_bytes())?;
        }
    }
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
            outer_src: Some(vip),
            quoted_dst: Some((vip, 53)),
            ..Translation::default()
        };
        translate_v4(&mut f, &p, &q, &t).unwrap();
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
