//! One-pass parsing of a frame into header offsets and a flow key.
//!
//! [`parse`] validates every header it walks through (Ethernet, one VLAN tag,
//! ARP, IPv4 with options, IPv6 with extension headers, TCP, UDP, ICMP/ICMPv6)
//! and returns either a [`Parsed`] — offsets the rewrite functions can trust —
//! or the [`ParseError`] that names the drop reason. It never panics, whatever
//! the bytes (property-tested and fuzzed).

use crate::key::{FlowKey, is_v4_mapped, mapped16, to16};
use crate::wire::{
    ParseError, arp,
    ethernet::{
        self, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ, ETHERTYPE_VLAN,
    },
    icmp, ipv4, ipv6, tcp, udp,
};
use std::net::{IpAddr, Ipv4Addr};

use crate::key::{ICMP_NOT_ECHO, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// The network layer found in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum L3 {
    /// An ethertype the parser does not look into.
    #[default]
    Other,
    /// Ethernet/IPv4 ARP.
    Arp,
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

fn mapped(v4: Ipv4Addr) -> [u8; 16] {
    to16(IpAddr::V4(v4))
}

/// Where the headers of a frame are, and its flow key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parsed {
    /// TCI of the VLAN tag, when the frame carried one.
    pub vlan: Option<u16>,
    /// The ethertype after any VLAN tag.
    pub ethertype: u16,
    /// The network layer.
    pub l3: L3,
    /// Offset of the network header (14, or 18 when tagged).
    pub l3_off: u16,
    /// Offset of the transport header; only meaningful when `has_l4`.
    pub l4_off: u16,
    /// Length of the transport header plus data, as the IP length fields say.
    pub l4_len: u16,
    /// True when the transport header is in this frame (false for non-IP
    /// frames, IP fragments other than the first, and ESP / no-next-header).
    pub has_l4: bool,
    /// The port the frame arrived on.
    pub in_port: u16,
    /// Where the packet sits in its datagram, if it is a fragment.
    pub frag: Frag,
    /// The flow key (for a later fragment: addresses and protocol, ports 0).
    pub key: FlowKey,
}

/// Where an IP fragment sits in its datagram (all zero: not a fragment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Frag {
    /// The datagram's identification (IPv4: 16 bits, IPv6: 32).
    pub id: u32,
    /// The fragment's offset in the datagram, in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

impl Frag {
    /// The first fragment of a fragmented datagram (it has the transport
    /// header; the others do not).
    pub fn is_first(&self) -> bool {
        self.offset == 0 && self.more
    }

    /// A fragment after the first (no transport header, no ports).
    pub fn is_later(&self) -> bool {
        self.offset != 0
    }
}

impl Parsed {
    /// The IP packet's length, header and payload, as its length fields
    /// say (what flow records count: no link-layer header, VLAN tag or
    /// padding); 0 for frames that are not IP.
    #[inline]
    pub fn ip_len(&self) -> u16 {
        if self.is_ip() {
            // (Modulo 2^16, without the compares of saturating
            // arithmetic: exact whenever the length fits in a u16, as it
            // always does in a frame of at most 65 535 bytes.)
            self.l4_off
                .wrapping_add(self.l4_len)
                .wrapping_sub(self.l3_off)
        } else {
            0
        }
    }

    /// True for IPv4 or IPv6.
    pub fn is_ip(&self) -> bool {
        matches!(self.l3, L3::Ipv4 | L3::Ipv6)
    }

    /// True for the common frame: untagged IPv4 without options, with its
    /// transport header in the frame (not a later fragment), whose headers
    /// lie at fixed offsets. (Whatever the protocol: the caller knows
    /// which it rewrites.)
    #[inline(always)]
    pub fn is_plain_ipv4(&self) -> bool {
        const L3_OFF: u16 = ethernet::HEADER_LEN as u16;
        self.l3 == L3::Ipv4 && self.has_l4 && self.l3_off == L3_OFF && self.l4_off == L3_OFF + 20
    }
}

/// Parses `frame`, received on `in_port`, into offsets and a flow key.
pub fn parse(frame: &[u8], in_port: u16) -> Result<Parsed, ParseError> {
    let mut out = Parsed::default();
    parse_into(frame, in_port, &mut out).map(|()| out)
}

/// [`parse`] writing into `out` (left partly written on error). For a burst
/// parsed into an array: the result is written in place rather than
/// returned and copied, and a copy read right after the field-by-field
/// writes of the parse stalls on store forwarding.
#[inline]
pub fn parse_into(frame: &[u8], in_port: u16, out: &mut Parsed) -> Result<(), ParseError> {
    if parse_plain_ipv4(frame, in_port, out) {
        return Ok(());
    }
    parse_general(frame, in_port, out)
}

/// The common frame in one pass of loads and compares: untagged IPv4
/// without options, not a fragment, carrying a whole TCP or UDP header.
/// Writes what [`parse_general`] would and returns true; returns false
/// (`out` untouched) for every other frame, valid or not, which then takes
/// the general parse. It accepts only what the general parse accepts, with
/// the same result (property-tested against it), at a fraction of the
/// general parse's checks and stores.
#[inline(always)]
fn parse_plain_ipv4(frame: &[u8], in_port: u16, out: &mut Parsed) -> bool {
    const L3_OFF: usize = ethernet::HEADER_LEN;
    const L4_OFF: usize = L3_OFF + 20;
    // Ethernet, an IPv4 header without options, and the 8 bytes of a UDP
    // header or the first 8 of a TCP header.
    let Some(h) = frame.first_chunk::<{ L4_OFF + 8 }>() else {
        return false;
    };
    let be = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    // 0x45: version 4, a header of 5 words. The fragment field but for its
    // DF and reserved bits (which the general parse ignores too): no
    // offset, no more fragments.
    if be(12) != ETHERTYPE_IPV4 || h[L3_OFF] != 0x45 || be(L3_OFF + 6) & 0x3fff != 0 {
        return false;
    }
    let total = usize::from(be(L3_OFF + 2));
    if total < 20 || total > frame.len() - L3_OFF {
        return false;
    }
    // The transport header and data, as the IP total length says.
    let l4_len = total - 20;
    let proto = h[L3_OFF + 9];
    let whole = match proto {
        // The data offset is at least the 20-byte header and inside the
        // IP packet.
        PROTO_TCP => {
            let off = usize::from(frame.get(L4_OFF + 12).copied().unwrap_or(0) >> 4) * 4;
            off >= 20 && off <= l4_len
        }
        // The UDP length counts the header and fits in the IP packet.
        PROTO_UDP => {
            let len = usize::from(be(L4_OFF + 4));
            len >= 8 && len <= l4_len
        }
        _ => false,
    };
    if !whole {
        return false;
    }
    let v4 = |i: usize| mapped16([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    *out = Parsed {
        vlan: None,
        ethertype: ETHERTYPE_IPV4,
        l3: L3::Ipv4,
        l3_off: L3_OFF as u16,
        l4_off: L4_OFF as u16,
        l4_len: l4_len as u16,
        has_l4: true,
        in_port,
        frag: Frag {
            id: u32::from(be(L3_OFF + 4)),
            offset: 0,
            more: false,
        },
        key: FlowKey {
            src_ip: v4(L3_OFF + 12),
            dst_ip: v4(L3_OFF + 16),
            src_port: be(L4_OFF),
            dst_port: be(L4_OFF + 2),
            proto,
        },
    };
    true
}

/// Every frame [`parse_into`] takes, header by header.
fn parse_general(frame: &[u8], in_port: u16, out: &mut Parsed) -> Result<(), ParseError> {
    let eth = ethernet::Frame::new_checked(frame)?;
    *out = Parsed {
        l3_off: ethernet::HEADER_LEN as u16,
        ethertype: eth.ethertype(),
        in_port,
        ..Parsed::default()
    };
    if matches!(out.ethertype, ETHERTYPE_VLAN | ETHERTYPE_QINQ) {
        let tag = ethernet::VlanTag::new_checked(eth.payload())?;
        out.vlan = Some(tag.tci());
        out.ethertype = tag.inner_ethertype();
        out.l3_off += ethernet::VLAN_TAG_LEN as u16;
    }
    let l3 = &frame[usize::from(out.l3_off)..];
    match out.ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(l3, out)?,
        ETHERTYPE_IPV6 => parse_ipv6(l3, out)?,
        ETHERTYPE_ARP => {
            let a = arp::Packet::new_checked(l3)?;
            out.l3 = L3::Arp;
            out.key.src_ip = mapped(a.sender_ip());
            out.key.dst_ip = mapped(a.target_ip());
        }
        _ => {}
    }
    Ok(())
}

fn parse_ipv4(l3: &[u8], out: &mut Parsed) -> Result<(), ParseError> {
    let ip = ipv4::Packet::new_checked(l3)?;
    out.l3 = L3::Ipv4;
    out.key.src_ip = mapped(ip.src());
    out.key.dst_ip = mapped(ip.dst());
    out.key.proto = ip.protocol();
    let hl = ip.header_len();
    out.l4_off = out.l3_off + hl as u16;
    out.l4_len = (ip.total_len() - hl) as u16;
    out.frag = Frag {
        id: u32::from(ip.ident()),
        offset: (ip.frag_offset() / 8) as u16,
        more: ip.more_frags(),
    };
    if out.frag.is_later() {
        return Ok(());
    }
    parse_l4(ip.payload(), out, false)
}

fn parse_ipv6(l3: &[u8], out: &mut Parsed) -> Result<(), ParseError> {
    let ip = ipv6::Packet::new_checked(l3)?;
    out.l3 = L3::Ipv6;
    out.key.src_ip = ip.src().octets();
    out.key.dst_ip = ip.dst().octets();
    if is_v4_mapped(&out.key.src_ip) || is_v4_mapped(&out.key.dst_ip) {
        return Err(ParseError::Ipv6V4Mapped);
    }
    let payload = ip.payload();
    let up = ipv6::skip_extensions(ip.next_header(), payload)?;
    out.key.proto = up.protocol;
    out.l4_off = out.l3_off + (ipv6::HEADER_LEN + up.offset) as u16;
    out.l4_len = (payload.len() - up.offset) as u16;
    if let Some((id, offset, more)) = up.fragment {
        out.frag = Frag { id, offset, more };
    }
    if up.later_fragment || matches!(up.protocol, ipv6::NH_ESP | ipv6::NH_NONE) {
        return Ok(());
    }
    parse_l4(&payload[up.offset..], out, true)
}

fn parse_l4(l4: &[u8], out: &mut Parsed, v6: bool) -> Result<(), ParseError> {
    match out.key.proto {
        PROTO_TCP => {
            let t = tcp::Segment::new_checked(l4)?;
            out.key.src_port = t.src_port();
            out.key.dst_port = t.dst_port();
        }
        PROTO_UDP => {
            let u = if out.frag.is_first() {
                udp::Datagram::new_checked_first_fragment(l4)?
            } else {
                udp::Datagram::new_checked(l4)?
            };
            out.key.src_port = u.src_port();
            out.key.dst_port = u.dst_port();
        }
        PROTO_ICMP if !v6 => {
            let i = icmp::Packet::new_checked(l4)?;
            if i.is_v4_echo() {
                out.key.src_port = i.echo_ident();
            } else {
                out.key.dst_port = ICMP_NOT_ECHO;
            }
        }
        PROTO_ICMPV6 if v6 => {
            let i = icmp::Packet::new_checked(l4)?;
            if i.is_v6_echo() {
                out.key.src_port = i.echo_ident();
            } else {
                out.key.dst_port = ICMP_NOT_ECHO;
            }
        }
        _ => {}
    }
    out.has_l4 = true;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ethernet + IPv4 + TCP SYN 10.1.0.4:40000 -> 10.1.0.100:80, 60 bytes with padding.
    pub(crate) const TCP4: [u8; 60] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, //
        0x45, 0x00, 0x00, 0x28, 0x00, 0x01, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, //
        10, 1, 0, 4, 10, 1, 0, 100, //
        0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0, //
        0, 0, 0, 0, 0, 0, // padding to 60
    ];

    #[test]
    fn tcp_over_ipv4() {
        let p = parse(&TCP4, 3).unwrap();
        assert_eq!(p.l3, L3::Ipv4);
        assert_eq!(p.vlan, None);
        assert_eq!((p.l3_off, p.l4_off, p.l4_len), (14, 34, 20));
        assert_eq!(p.ip_len(), 40);
        assert!(p.has_l4);
        assert_eq!(p.in_port, 3);
        assert_eq!(p.key.proto, PROTO_TCP);
        assert_eq!(p.key.src(), "10.1.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(p.key.dst(), "10.1.0.100".parse::<IpAddr>().unwrap());
        assert_eq!((p.key.src_port, p.key.dst_port), (40000, 80));
        let r = p.key.reversed();
        assert_eq!((r.src(), r.src_port), (p.key.dst(), 80));
    }

    #[test]
    fn vlan_tagged_udp() {
        let mut f = TCP4[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64, 0x08, 0x00]);
        f.extend_from_slice(&[
            0x45, 0, 0x00, 0x1c, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, //
            0x04, 0xd2, 0x16, 0x2e, 0x00, 0x08, 0x00, 0x00,
        ]);
        let p = parse(&f, 0).unwrap();
        assert_eq!(p.vlan, Some(100));
        assert_eq!((p.l3_off, p.l4_off), (18, 38));
        assert_eq!(
            (p.key.proto, p.key.src_port, p.key.dst_port),
            (PROTO_UDP, 1234, 5678)
        );
        // The tag is cut short.
        assert_eq!(parse(&f[..16], 0).unwrap_err(), ParseError::VlanTruncated);
    }

    #[test]
    fn arp_request() {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[
            0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 1, 0, 4, 0, 0, 0, 0, 0, 0, 10, 1, 0, 1,
        ]);
        let p = parse(&f, 0).unwrap();
        assert_eq!(p.l3, L3::Arp);
        assert!(!p.has_l4);
        assert_eq!(p.key.src(), "10.1.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(p.key.dst(), "10.1.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(parse(&f[..40], 0).unwrap_err(), ParseError::ArpTruncated);
    }

    #[test]
    fn icmp_echo_and_ipv4_fragments() {
        let mut f = TCP4[..14].to_vec();
        f.extend_from_slice(&[
            0x45, 0, 0x00, 0x1c, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, //
            8, 0, 0, 0, 0xbe, 0xef, 0, 1,
        ]);
        let p = parse(&f, 0).unwrap();
        assert_eq!(
            (p.key.proto, p.key.src_port, p.key.dst_port),
            (PROTO_ICMP, 0xbeef, 0)
        );
        // Truncated ICMP: total length 27, 7 bytes of ICMP.
        let mut short = f.clone();
        short[17] = 27;
        assert_eq!(parse(&short, 0).unwrap_err(), ParseError::IcmpTruncated);
        // A later fragment: no transport header is looked for.
        let mut frag = f.clone();
        frag[20] = 0x00;
        frag[21] = 0x10;
        let p = parse(&frag, 0).unwrap();
        assert!(!p.has_l4);
        assert_eq!((p.key.src_port, p.key.dst_port), (0, 0));
        assert!(p.frag.is_later() && !p.frag.is_first());
        assert_eq!(p.frag.offset, 16);
    }

    #[test]
    fn a_udp_first_fragment_has_its_ports_and_its_datagram_length() {
        // IPv4 id 0x1234, more fragments; UDP 5000 -> 53 whose length (3000)
        // counts the whole datagram, 8 bytes of it here.
        let mut f = TCP4[..14].to_vec();
        f.extend_from_slice(&[
            0x45, 0, 0x00, 0x24, 0x12, 0x34, 0x20, 0x00, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0,
            2, //
            0x13, 0x88, 0x00, 0x35, 0x0b, 0xb8, 0, 0, //
            1, 2, 3, 4, 5, 6, 7, 8,
        ]);
        let p = parse(&f, 0).unwrap();
        assert!(p.has_l4 && p.frag.is_first());
        assert_eq!(p.frag.id, 0x1234);
        assert_eq!((p.key.src_port, p.key.dst_port), (5000, 53));
        // Not a fragment: the same length is a lie.
        let mut whole = f.clone();
        whole[20] = 0;
        assert_eq!(parse(&whole, 0).unwrap_err(), ParseError::UdpBadLength);
        // A first fragment still needs a whole UDP header.
        let mut short = f.clone();
        short[17] = 24;
        short.truncate(38);
        assert_eq!(parse(&short, 0).unwrap_err(), ParseError::UdpTruncated);
    }

    #[test]
    fn ipv6_with_extension_then_tcp() {
        let mut f = TCP4[..12].to_vec();
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0x00, 0x1c, 60, 64]); // payload 28, dest opts
        f.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        f.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // dest opts -> TCP
        f.extend_from_slice(&[
            0x01, 0xbb, 0xc3, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x12, 0, 0, 0, 0, 0, 0,
        ]);
        let p = parse(&f, 1).unwrap();
        assert_eq!(p.l3, L3::Ipv6);
        assert_eq!((p.l3_off, p.l4_off, p.l4_len), (14, 62, 20));
        assert_eq!(p.ip_len(), 68);
        assert_eq!(
            (p.key.proto, p.key.src_port, p.key.dst_port),
            (PROTO_TCP, 443, 50000)
        );
        assert_eq!(p.key.src(), "2001:db8::1".parse::<IpAddr>().unwrap());
        // Payload length lies (one byte more than present).
        let mut lying = f.clone();
        lying[19] = 0x1d;
        assert_eq!(parse(&lying, 0).unwrap_err(), ParseError::Ipv6BadPayloadLen);
        // An IPv4-mapped source or destination would share IPv4's keys.
        for at in [22, 38] {
            let mut mapped = f.clone();
            mapped[at..at + 16].copy_from_slice(
                &std::net::Ipv4Addr::new(10, 0, 0, 1)
                    .to_ipv6_mapped()
                    .octets(),
            );
            assert_eq!(parse(&mapped, 0).unwrap_err(), ParseError::Ipv6V4Mapped);
            // IPv4-compatible (`::a.b.c.d`, no ffff) is an ordinary address.
            mapped[at + 10..at + 12].copy_from_slice(&[0, 0]);
            assert!(parse(&mapped, 0).is_ok());
        }
        // TCP data offset lies.
        let mut bad_off = f.clone();
        bad_off[62 + 12] = 0x60;
        assert_eq!(
            parse(&bad_off, 0).unwrap_err(),
            ParseError::TcpBadDataOffset
        );
    }

    #[test]
    fn truncated_and_lying_lengths() {
        assert_eq!(
            parse(&TCP4[..13], 0).unwrap_err(),
            ParseError::EthernetTruncated
        );
        assert_eq!(
            parse(&TCP4[..40], 0).unwrap_err(),
            ParseError::Ipv4BadTotalLen
        );
        assert_eq!(
            parse(&TCP4[..20], 0).unwrap_err(),
            ParseError::Ipv4Truncated
        );
        // Total length 39 leaves 19 bytes of TCP.
        let mut f = TCP4;
        f[17] = 39;
        assert_eq!(parse(&f, 0).unwrap_err(), ParseError::TcpTruncated);
        // Total length 100 in a 60-byte frame.
        f[17] = 100;
        assert_eq!(parse(&f, 0).unwrap_err(), ParseError::Ipv4BadTotalLen);
        // UDP whose length field says more than the IP payload.
        let mut u = TCP4;
        u[23] = 17;
        u[34 + 4..34 + 6].copy_from_slice(&21u16.to_be_bytes());
        assert_eq!(parse(&u, 0).unwrap_err(), ParseError::UdpBadLength);
    }

    #[test]
    fn other_ethertype_is_not_an_error() {
        let mut f = TCP4;
        f[12..14].copy_from_slice(&0x88ccu16.to_be_bytes()); // LLDP
        let p = parse(&f, 0).unwrap();
        assert_eq!((p.l3, p.ethertype, p.has_l4), (L3::Other, 0x88cc, false));
    }

    /// Ethernet + IPv4 + UDP 10.0.0.1:1234 -> 10.0.0.2:5678, 4 bytes of
    /// data, DF set, 60 bytes with padding.
    const UDP4: [u8; 60] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, //
        0x45, 0x00, 0x00, 0x20, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, //
        10, 0, 0, 1, 10, 0, 0, 2, //
        0x04, 0xd2, 0x16, 0x2e, 0x00, 0x0c, 0x00, 0x00, 1, 2, 3, 4, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding to 60
    ];

    #[test]
    fn plain_tcp_and_udp_over_ipv4_take_the_short_parse() {
        for f in [&TCP4, &UDP4] {
            let mut fast = Parsed::default();
            assert!(parse_plain_ipv4(f, 5, &mut fast));
            let mut general = Parsed::default();
            parse_general(f, 5, &mut general).unwrap();
            assert_eq!(fast, general);
        }
        let p = parse(&UDP4, 5).unwrap();
        assert_eq!((p.key.src_port, p.key.dst_port, p.l4_len), (1234, 5678, 12));
        assert_eq!(
            p.frag,
            Frag {
                id: 0x1234,
                offset: 0,
                more: false
            }
        );
        // Tagged, with options, a first fragment, ICMP: the general parse's.
        let mut tagged = TCP4[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        tagged.extend_from_slice(&TCP4[12..]);
        let mut options = TCP4.to_vec();
        options[14] = 0x46;
        options[17] += 4;
        options.splice(34..34, [1, 1, 1, 1]);
        let mut first_fragment = UDP4.to_vec();
        first_fragment[20] = 0x20;
        let mut icmp = UDP4.to_vec();
        icmp[23] = 1;
        for f in [tagged, options, first_fragment, icmp] {
            let mut out = Parsed::default();
            assert!(!parse_plain_ipv4(&f, 5, &mut out), "{f:02x?}");
            assert!(parse(&f, 5).is_ok(), "{f:02x?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Whatever the bytes, the short parse accepts only what the
        /// general parse accepts, with the same result, and `parse_into`
        /// answers as the general parse does. Frames are built from the
        /// fields the short parse checks, each mostly a value it accepts,
        /// else an edge value or any, then cut.
        #[test]
        fn the_short_parse_agrees_with_the_general_parse(
            ethertype in prop_oneof![6 => Just(0x0800u16), 1 => Just(0x8100), 1 => any::<u16>()],
            ver_ihl in prop_oneof![6 => Just(0x45u8), 1 => Just(0x46), 1 => Just(0x44), 1 => any::<u8>()],
            // How far the IP total length falls short of the frame.
            // (u16::MAX: one byte more than the frame holds.)
            short in prop_oneof![6 => 0u16..4, 1 => Just(u16::MAX), 1 => 0u16..80, 1 => any::<u16>()],
            frag in prop_oneof![3 => Just(0u16), 3 => Just(0x4000), 1 => Just(0x2000), 1 => Just(0x6000), 1 => Just(1), 1 => Just(0x4001), 1 => any::<u16>()],
            proto in prop_oneof![3 => Just(6u8), 3 => Just(17), 1 => Just(1), 1 => any::<u8>()],
            tcp_off in prop_oneof![3 => Just(0x50u8), 1 => Just(0x40), 1 => Just(0x60), 1 => Just(0xf0), 1 => any::<u8>()],
            udp_short in prop_oneof![3 => 0u16..4, 1 => Just(u16::MAX), 1 => 0u16..80, 1 => any::<u16>()],
            len in 30usize..=80,
            port in any::<u16>(),
        ) {
            let mut f = if proto == 17 { UDP4.to_vec() } else { TCP4.to_vec() };
            f.resize(len, 0xaa);
            let total = (len.saturating_sub(14) as u16).wrapping_sub(short);
            f[12..14].copy_from_slice(&ethertype.to_be_bytes());
            f[14] = ver_ihl;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            f[20..22].copy_from_slice(&frag.to_be_bytes());
            f[23] = proto;
            if proto == 17 && len >= 40 {
                f[38..40].copy_from_slice(&total.wrapping_sub(20).wrapping_sub(udp_short).to_be_bytes());
            } else if len > 46 {
                f[46] = tcp_off;
            }
            let mut general = Parsed::default();
            let want = parse_general(&f, port, &mut general);
            let mut fast = Parsed::default();
            let short_path = parse_plain_ipv4(&f, port, &mut fast);
            if short_path {
                prop_assert_eq!(&want, &Ok(()));
                prop_assert_eq!(fast, general);
            } else {
                prop_assert_eq!(fast, Parsed::default());
            }
            // And it takes every valid frame of its kind.
            let its_kind = ethertype == 0x0800
                && ver_ihl == 0x45
                && frag & 0x3fff == 0
                && matches!(proto, 6 | 17);
            if its_kind && want.is_ok() {
                prop_assert!(short_path, "{:02x?}", f);
            }
            let mut out = Parsed::default();
            let got = parse_into(&f, port, &mut out);
            prop_assert_eq!(&got, &want);
            if got.is_ok() {
                prop_assert_eq!(out, general);
            }
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), port in any::<u16>()) {
            let _ = parse(&bytes, port);
        }

        // Mutating a valid frame (the likelier way to reach deep code paths)
        // also never panics, and any Ok result has offsets inside the frame.
        #[test]
        fn parse_mutated_frames(flips in proptest::collection::vec((0usize..60, any::<u8>()), 1..8), cut in 0usize..=60) {
            let mut f = TCP4.to_vec();
            for (i, v) in flips { f[i] = v; }
            f.truncate(cut);
            if let Ok(p) = parse(&f, 0) {
                prop_assert!(usize::from(p.l3_off) <= f.len());
                if p.has_l4 {
                    prop_assert!(usize::from(p.l4_off) + usize::from(p.l4_len) <= f.len());
                }
            }
        }
    }
}
