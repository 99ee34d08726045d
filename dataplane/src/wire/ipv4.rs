//! IPv4 (RFC 791), options included.

use super::{ParseError, array, be16, checksum, put16};
use std::net::Ipv4Addr;

/// Length of the IPv4 header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// A view over an IPv4 packet. `new_checked` guarantees that the header with
/// its options and the `total_len` bytes it announces are all in the buffer
/// (trailing bytes, such as Ethernet padding, are allowed and ignored).
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after validating version, IHL and total length.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(ParseError::Ipv4Truncated);
        }
        if b[0] >> 4 != 4 {
            return Err(ParseError::Ipv4BadVersion);
        }
        let hl = usize::from(b[0] & 0x0f) * 4;
        if hl < MIN_HEADER_LEN || hl > b.len() {
            return Err(ParseError::Ipv4BadHeaderLen);
        }
        let total = usize::from(be16(b, 2));
        if total < hl || total > b.len() {
            return Err(ParseError::Ipv4BadTotalLen);
        }
        Ok(Packet { buffer })
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[0] & 0x0f) * 4
    }

    /// DSCP and ECN byte.
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    /// Total length of header and payload.
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), 2))
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    /// Don't-fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.buffer.as_ref()[6] & 0x40 != 0
    }

    /// More-fragments flag.
    pub fn more_frags(&self) -> bool {
        self.buffer.as_ref()[6] & 0x20 != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), 6) & 0x1fff) * 8
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[8]
    }

    /// Protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[9]
    }

    /// Header checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 10)
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(array::<4>(self.buffer.as_ref(), 12))
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(array::<4>(self.buffer.as_ref(), 16))
    }

    /// The options bytes (empty when IHL is 5).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[MIN_HEADER_LEN..self.header_len()]
    }

    /// The payload: from the end of the header to `total_len`.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }

    /// True when the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(&self.buffer.as_ref()[..self.header_len()]) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the TTL without touching the checksum.
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[8] = ttl;
    }

    /// Sets the source address without touching any checksum.
    pub fn set_src(&mut self, ip: Ipv4Addr) {
        self.buffer.as_mut()[12..16].copy_from_slice(&ip.octets());
    }

    /// Sets the destination address without touching any checksum.
    pub fn set_dst(&mut self, ip: Ipv4Addr) {
        self.buffer.as_mut()[16..20].copy_from_slice(&ip.octets());
    }

    /// Sets the header checksum field.
    pub fn set_checksum(&mut self, check: u16) {
        put16(self.buffer.as_mut(), 10, check);
    }

    /// Recomputes the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = checksum::checksum(&self.buffer.as_ref()[..hl]);
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 10.1.0.4 -> 10.1.0.100, UDP, with a 4-byte option (NOP NOP NOP EOL),
    // 4 bytes of payload, then 2 bytes of link padding.
    const PKT: [u8; 30] = [
        0x46, 0x00, 0x00, 0x1c, // v4, ihl 6, total 28
        0x12, 0x34, 0x40, 0x00, // id, DF
        0x40, 0x11, 0x00, 0x00, // ttl 64, udp, checksum (filled in test)
        10, 1, 0, 4, 10, 1, 0, 100, // src, dst
        0x01, 0x01, 0x01, 0x00, // options
        0xde, 0xad, 0xbe, 0xef, // payload
        0x00, 0x00, // padding
    ];

    fn with_checksum() -> [u8; 30] {
        let mut b = PKT;
        Packet::new_checked(&mut b[..]).unwrap().fill_checksum();
        b
    }

    #[test]
    fn fields() {
        let b = with_checksum();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.ident(), 0x1234);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.src(), Ipv4Addr::new(10, 1, 0, 4));
        assert_eq!(p.dst(), Ipv4Addr::new(10, 1, 0, 100));
        assert_eq!(p.options(), &[1, 1, 1, 0]);
        assert_eq!(p.payload(), &[0xde, 0xad, 0xbe, 0xef]);
        assert!(p.verify_checksum());
    }

    #[test]
    fn malformed() {
        assert_eq!(
            Packet::new_checked(&PKT[..19]).unwrap_err(),
            ParseError::Ipv4Truncated
        );
        let mut v6 = PKT;
        v6[0] = 0x66;
        assert_eq!(
            Packet::new_checked(&v6[..]).unwrap_err(),
            ParseError::Ipv4BadVersion
        );
        let mut ihl4 = PKT;
        ihl4[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&ihl4[..]).unwrap_err(),
            ParseError::Ipv4BadHeaderLen
        );
        // IHL 15 announces 60 bytes of header in a 30-byte buffer.
        let mut ihl15 = PKT;
        ihl15[0] = 0x4f;
        assert_eq!(
            Packet::new_checked(&ihl15[..]).unwrap_err(),
            ParseError::Ipv4BadHeaderLen
        );
        // Total length that lies: longer than the buffer, and shorter than the header.
        let mut long = PKT;
        long[2..4].copy_from_slice(&31u16.to_be_bytes());
        assert_eq!(
            Packet::new_checked(&long[..]).unwrap_err(),
            ParseError::Ipv4BadTotalLen
        );
        let mut short = PKT;
        short[2..4].copy_from_slice(&23u16.to_be_bytes());
        assert_eq!(
            Packet::new_checked(&short[..]).unwrap_err(),
            ParseError::Ipv4BadTotalLen
        );
        // Cut inside the payload: total length now exceeds the buffer.
        assert_eq!(
            Packet::new_checked(&PKT[..27]).unwrap_err(),
            ParseError::Ipv4BadTotalLen
        );
    }

    #[test]
    fn fragment_fields() {
        let mut b = PKT;
        b[6..8].copy_from_slice(&(0x2000u16 | 185).to_be_bytes());
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.more_frags());
        assert_eq!(p.frag_offset(), 1480);
    }

    #[test]
    fn setters_and_checksum() {
        let mut b = with_checksum();
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        p.set_ttl(1);
        p.set_src(Ipv4Addr::new(192, 168, 1, 1));
        p.set_dst(Ipv4Addr::new(192, 168, 1, 2));
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.ttl(), 1);
        assert_eq!(p.src(), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(p.dst(), Ipv4Addr::new(192, 168, 1, 2));
    }
}
