//! IPv6 (RFC 8200) and the walk over its extension headers.

use super::{ParseError, array, be16, be32};
use std::net::Ipv6Addr;

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;
/// The most extension headers [`skip_extensions`] follows before giving up.
pub const MAX_EXTENSIONS: usize = 8;

/// Hop-by-hop options.
pub const NH_HOP_BY_HOP: u8 = 0;
/// Routing header.
pub const NH_ROUTING: u8 = 43;
/// Fragment header.
pub const NH_FRAGMENT: u8 = 44;
/// Encapsulating security payload (opaque: the walk stops there).
pub const NH_ESP: u8 = 50;
/// Authentication header.
pub const NH_AUTH: u8 = 51;
/// No next header.
pub const NH_NONE: u8 = 59;
/// Destination options.
pub const NH_DEST_OPTS: u8 = 60;

/// A view over an IPv6 packet. `new_checked` guarantees the fixed header and the
/// `payload_len` bytes it announces are in the buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after validating version and payload length.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(ParseError::Ipv6Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(ParseError::Ipv6BadVersion);
        }
        if HEADER_LEN + usize::from(be16(b, 4)) > b.len() {
            return Err(ParseError::Ipv6BadPayloadLen);
        }
        Ok(Packet { buffer })
    }

    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        ((be16(self.buffer.as_ref(), 0) >> 4) & 0xff) as u8
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        be32(self.buffer.as_ref(), 0) & 0x000f_ffff
    }

    /// Payload length (extension headers included).
    pub fn payload_len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), 4))
    }

    /// Next header of the fixed header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[6]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[7]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(array::<16>(self.buffer.as_ref(), 8))
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(array::<16>(self.buffer.as_ref(), 24))
    }

    /// The payload: `payload_len` bytes after the fixed header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + self.payload_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, hl: u8) {
        self.buffer.as_mut()[7] = hl;
    }

    /// Sets the source address without touching any checksum.
    pub fn set_src(&mut self, ip: Ipv6Addr) {
        self.buffer.as_mut()[8..24].copy_from_slice(&ip.octets());
    }

    /// Sets the destination address without touching any checksum.
    pub fn set_dst(&mut self, ip: Ipv6Addr) {
        self.buffer.as_mut()[24..40].copy_from_slice(&ip.octets());
    }
}

/// Where the upper-layer header starts once extension headers are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upper {
    /// The upper-layer protocol (or [`NH_ESP`] / [`NH_NONE`], where the walk stops).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the IPv6 payload.
    pub offset: usize,
    /// True when a fragment header with a non-zero offset was seen: the
    /// upper-layer header is in another fragment.
    pub later_fragment: bool,
    /// The fragment header's (identification, offset in 8-byte units, more
    /// fragments), when there is one (of several: a later fragment's, else
    /// the first that fragments the packet, else the last).
    pub fragment: Option<(u32, u16, bool)>,
}

/// Walks the extension headers in `payload` starting at `next_header`.
///
/// Hop-by-hop, routing, destination options and fragment headers are skipped
/// (AH by its own length rule); at most [`MAX_EXTENSIONS`] are followed.
/// `payload` is the IPv6 header's: a hop-by-hop header anywhere but first
/// is refused, as hosts do (RFC 8200, 4 and 4.1); so is a first fragment
/// whose chain ends in a later fragment's header (its upper-layer header
/// is not in it: RFC 7112).
pub fn skip_extensions(next_header: u8, payload: &[u8]) -> Result<Upper, ParseError> {
    let mut nh = next_header;
    let mut off = 0usize;
    let mut later_fragment = false;
    let mut fragment: Option<(u32, u16, bool)> = None;
    for _ in 0..=MAX_EXTENSIONS {
        let len = match nh {
            NH_HOP_BY_HOP if off > 0 => return Err(ParseError::Ipv6HopByHopMisplaced),
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let hdr = payload
                    .get(off..off + 2)
                    .ok_or(ParseError::Ipv6ExtTruncated)?;
                (usize::from(hdr[1]) + 1) * 8
            }
            NH_AUTH => {
                let hdr = payload
                    .get(off..off + 2)
                    .ok_or(ParseError::Ipv6ExtTruncated)?;
                // With 0 the header (8 bytes) would end before its
                // sequence number: RFC 4302's fixed part takes 12.
                if hdr[1] == 0 {
                    return Err(ParseError::Ipv6AuthTooShort);
                }
                (usize::from(hdr[1]) + 2) * 4
            }
            NH_FRAGMENT => {
                let hdr = payload
                    .get(off..off + 8)
                    .ok_or(ParseError::Ipv6ExtTruncated)?;
                let off_flags = be16(hdr, 2);
                if off_flags & 0xfff8 != 0 {
                    if fragment.is_some_and(|(_, o, m)| o == 0 && m) {
                        return Err(ParseError::Ipv6FirstFragmentIncomplete);
                    }
                    later_fragment = true;
                }
                // Where the packet sits: a later fragment's header (the walk
                // stops there; behind a first fragment's, refused above),
                // or else the first that fragments it; an atomic
                // fragment's (offset 0, no more; RFC 6946) says nothing,
                // and gives way to a later header's.
                if later_fragment || fragment.is_none_or(|(_, o, m)| o == 0 && !m) {
                    let id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                    fragment = Some((id, off_flags >> 3, off_flags & 1 != 0));
                }
                8
            }
            _ => {
                return Ok(Upper {
                    protocol: nh,
                    offset: off,
                    later_fragment,
                    fragment,
                });
            }
        };
        if off + len > payload.len() {
            return Err(ParseError::Ipv6ExtTruncated);
        }
        nh = payload[off];
        off += len;
        if later_fragment {
            return Ok(Upper {
                protocol: nh,
                offset: off,
                later_fragment,
                fragment,
            });
        }
    }
    Err(ParseError::Ipv6TooManyExt)
}

#[cfg(test)]
mod tests {
    use super::*;

    // fe80::1 -> fe80::2, hop-by-hop (8 bytes) then UDP (8 bytes), then padding.
    const PKT: [u8; 58] = [
        0x60, 0x12, 0x34, 0x56, // version 6, tc 0x01, flow 0x23456
        0x00, 0x10, 0x00, 0x40, // payload 16, next hop-by-hop, hop limit 64
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, //
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, //
        17, 0, 1, 4, 0, 0, 0, 0, // hop-by-hop: next UDP, len 0, PadN
        0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00, // UDP 12345 -> 53
        0, 0, // padding
    ];

    #[test]
    fn fields() {
        let p = Packet::new_checked(&PKT[..]).unwrap();
        assert_eq!(p.traffic_class(), 0x01);
        assert_eq!(p.flow_label(), 0x23456);
        assert_eq!(p.payload_len(), 16);
        assert_eq!(p.next_header(), NH_HOP_BY_HOP);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src(), "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst(), "fe80::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload().len(), 16);
        let up = skip_extensions(p.next_header(), p.payload()).unwrap();
        assert_eq!(
            up,
            Upper {
                protocol: 17,
                offset: 8,
                later_fragment: false,
                fragment: None,
            }
        );
    }

    #[test]
    fn malformed() {
        assert_eq!(
            Packet::new_checked(&PKT[..39]).unwrap_err(),
            ParseError::Ipv6Truncated
        );
        let mut v4 = PKT;
        v4[0] = 0x40;
        assert_eq!(
            Packet::new_checked(&v4[..]).unwrap_err(),
            ParseError::Ipv6BadVersion
        );
        assert_eq!(
            Packet::new_checked(&PKT[..55]).unwrap_err(),
            ParseError::Ipv6BadPayloadLen
        );
        // A hop-by-hop header claiming 16 bytes in an 8-byte payload.
        let p = Packet::new_checked(&PKT[..]).unwrap();
        let mut payload = p.payload()[..8].to_vec();
        payload[1] = 1;
        assert_eq!(
            skip_extensions(NH_HOP_BY_HOP, &payload).unwrap_err(),
            ParseError::Ipv6ExtTruncated
        );
        assert_eq!(
            skip_extensions(NH_HOP_BY_HOP, &payload[..1]).unwrap_err(),
            ParseError::Ipv6ExtTruncated
        );
    }

    #[test]
    fn too_many_extensions() {
        // Nine destination-options headers chained.
        let mut payload = Vec::new();
        for _ in 0..MAX_EXTENSIONS + 1 {
            payload.extend_from_slice(&[NH_DEST_OPTS, 0, 1, 4, 0, 0, 0, 0]);
        }
        assert_eq!(
            skip_extensions(NH_DEST_OPTS, &payload).unwrap_err(),
            ParseError::Ipv6TooManyExt
        );
        // Eight are fine.
        let mut ok = payload[..MAX_EXTENSIONS * 8].to_vec();
        ok[(MAX_EXTENSIONS - 1) * 8] = 6;
        assert_eq!(skip_extensions(NH_DEST_OPTS, &ok).unwrap().protocol, 6);
    }

    #[test]
    fn fragments_and_auth() {
        // First fragment: offset 0, M set -> upper header follows.
        let first = [17, 0, 0x00, 0x01, 0, 0, 0, 1];
        assert_eq!(
            skip_extensions(NH_FRAGMENT, &first).unwrap(),
            Upper {
                protocol: 17,
                offset: 8,
                later_fragment: false,
                fragment: Some((1, 0, true)),
            }
        );
        // Later fragment: offset 1480 -> no upper header here.
        let later = [17, 0, 0x05, 0xc8, 0, 0, 0, 1];
        let up = skip_extensions(NH_FRAGMENT, &later).unwrap();
        assert!(up.later_fragment);
        assert_eq!(up.fragment, Some((1, 185, false)));
        // AH with payload length 4 -> (4 + 2) * 4 = 24 bytes.
        let mut ah = vec![6, 4];
        ah.resize(24, 0);
        assert_eq!(
            skip_extensions(NH_AUTH, &ah).unwrap(),
            Upper {
                protocol: 6,
                offset: 24,
                later_fragment: false,
                fragment: None,
            }
        );
        // A first fragment's header, then an atomic fragment's: the packet
        // is the first fragment; an atomic one, then a later fragment's: a
        // later fragment.
        let nested = [NH_FRAGMENT, 0, 0, 1, 0, 0, 0, 7, 17, 0, 0, 0, 0, 0, 0, 8];
        assert_eq!(
            skip_extensions(NH_FRAGMENT, &nested).unwrap().fragment,
            Some((7, 0, true))
        );
        let mut nested = [NH_FRAGMENT, 0, 0, 0, 0, 0, 0, 7, 17, 0, 0, 9, 0, 0, 0, 8];
        let up = skip_extensions(NH_FRAGMENT, &nested).unwrap();
        assert_eq!(up.fragment, Some((8, 1, true)));
        assert!(up.later_fragment);
        // A first fragment's header, then a later fragment's: the first
        // fragment lacks its upper-layer header (RFC 7112).
        nested[3] = 1;
        assert_eq!(
            skip_extensions(NH_FRAGMENT, &nested).unwrap_err(),
            ParseError::Ipv6FirstFragmentIncomplete
        );
        // A hop-by-hop header behind a destination-options one.
        let hbh = [NH_HOP_BY_HOP, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0];
        assert_eq!(
            skip_extensions(NH_HOP_BY_HOP, &hbh[8..]).unwrap().protocol,
            6
        );
        assert_eq!(
            skip_extensions(NH_DEST_OPTS, &hbh).unwrap_err(),
            ParseError::Ipv6HopByHopMisplaced
        );
        // AH with payload length 0: 8 bytes, shorter than its own fields.
        ah[1] = 0;
        assert_eq!(
            skip_extensions(NH_AUTH, &ah).unwrap_err(),
            ParseError::Ipv6AuthTooShort
        );
    }
}
