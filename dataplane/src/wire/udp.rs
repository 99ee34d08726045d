//! UDP datagrams (RFC 768).

use super::{ParseError, be16, put16};

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 6;

/// A view over a UDP datagram; `new_checked` guarantees the header and the
/// `length` bytes it announces are in the buffer.
#[derive(Debug, Clone)]
pub struct Datagram<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Datagram<T> {
    /// Wraps `buffer` (the IP payload) after validating the length field.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(ParseError::UdpTruncated);
        }
        let len = usize::from(be16(b, 4));
        if len < HEADER_LEN || len > b.len() {
            return Err(ParseError::UdpBadLength);
        }
        Ok(Datagram { buffer })
    }

    /// A view of the first fragment of a datagram: the header is here, its
    /// length field counts the whole datagram, which goes on in later
    /// fragments (so it may exceed `buffer`, not undercut the header).
    pub fn new_checked_first_fragment(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(ParseError::UdpTruncated);
        }
        if usize::from(be16(b, 4)) < HEADER_LEN {
            return Err(ParseError::UdpBadLength);
        }
        Ok(Datagram { buffer })
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// Length of header and data.
    pub fn len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), 4))
    }

    /// True when the datagram carries no data.
    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }

    /// Checksum field (0 over IPv4 means "no checksum").
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), CHECKSUM_OFFSET)
    }

    /// Data after the header, up to `length`.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Datagram<T> {
    /// Sets the source port without touching the checksum.
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), 0, port);
    }

    /// Sets the destination port without touching the checksum.
    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), 2, port);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, check: u16) {
        put16(self.buffer.as_mut(), CHECKSUM_OFFSET, check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DGRAM: [u8; 12] = [
        0x30, 0x39, 0x00, 0x35, 0x00, 0x0a, 0x12, 0x34, 0xab, 0xcd, 0, 0,
    ];

    #[test]
    fn fields() {
        let d = Datagram::new_checked(&DGRAM[..]).unwrap();
        assert_eq!(d.src_port(), 12345);
        assert_eq!(d.dst_port(), 53);
        assert_eq!(d.len(), 10);
        assert!(!d.is_empty());
        assert_eq!(d.checksum(), 0x1234);
        assert_eq!(d.payload(), &[0xab, 0xcd]);
    }

    #[test]
    fn malformed() {
        assert_eq!(
            Datagram::new_checked(&DGRAM[..7]).unwrap_err(),
            ParseError::UdpTruncated
        );
        // Length field says 10, only 9 bytes present.
        assert_eq!(
            Datagram::new_checked(&DGRAM[..9]).unwrap_err(),
            ParseError::UdpBadLength
        );
        let mut tiny = DGRAM;
        tiny[5] = 7;
        assert_eq!(
            Datagram::new_checked(&tiny[..]).unwrap_err(),
            ParseError::UdpBadLength
        );
    }

    #[test]
    fn setters() {
        let mut b = DGRAM;
        let mut d = Datagram::new_checked(&mut b[..]).unwrap();
        d.set_src_port(7);
        d.set_dst_port(9);
        d.set_checksum(0);
        assert_eq!((d.src_port(), d.dst_port(), d.checksum()), (7, 9, 0));
    }
}
