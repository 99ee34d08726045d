//! TCP segments (RFC 9293).

use super::{ParseError, be16, be32, put16};

/// Length of the TCP header without options.
pub const MIN_HEADER_LEN: usize = 20;
/// Offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 16;

/// FIN flag.
pub const FIN: u8 = 0x01;
/// SYN flag.
pub const SYN: u8 = 0x02;
/// RST flag.
pub const RST: u8 = 0x04;
/// PSH flag.
pub const PSH: u8 = 0x08;
/// ACK flag.
pub const ACK: u8 = 0x10;

/// A view over a TCP segment; `new_checked` guarantees the header with its
/// options is in the buffer.
#[derive(Debug, Clone)]
pub struct Segment<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Segment<T> {
    /// Wraps `buffer` (the IP payload) after validating the data offset.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(ParseError::TcpTruncated);
        }
        let hl = usize::from(b[12] >> 4) * 4;
        if hl < MIN_HEADER_LEN || hl > b.len() {
            return Err(ParseError::TcpBadDataOffset);
        }
        Ok(Segment { buffer })
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// Sequence number.
    pub fn seq(&self) -> u32 {
        be32(self.buffer.as_ref(), 4)
    }

    /// Acknowledgement number.
    pub fn ack(&self) -> u32 {
        be32(self.buffer.as_ref(), 8)
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[12] >> 4) * 4
    }

    /// The flags byte (CWR ECE URG ACK PSH RST SYN FIN).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[13]
    }

    /// Receive window.
    pub fn window(&self) -> u16 {
        be16(self.buffer.as_ref(), 14)
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), CHECKSUM_OFFSET)
    }

    /// Options bytes.
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[MIN_HEADER_LEN..self.header_len()]
    }

    /// Data after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Segment<T> {
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

    // 40000 -> 80, SYN, data offset 6 with an MSS option (1460).
    const SYN_SEG: [u8; 24] = [
        0x9c, 0x40, 0x00, 0x50, // ports
        0x00, 0x00, 0x00, 0x01, // seq
        0x00, 0x00, 0x00, 0x00, // ack
        0x60, 0x02, 0xff, 0xff, // offset 6, SYN, window
        0x00, 0x00, 0x00, 0x00, // checksum, urgent
        0x02, 0x04, 0x05, 0xb4, // MSS 1460
    ];

    #[test]
    fn fields() {
        let s = Segment::new_checked(&SYN_SEG[..]).unwrap();
        assert_eq!(s.src_port(), 40000);
        assert_eq!(s.dst_port(), 80);
        assert_eq!(s.seq(), 1);
        assert_eq!(s.ack(), 0);
        assert_eq!(s.header_len(), 24);
        assert_eq!(s.flags(), SYN);
        assert_eq!(s.window(), 0xffff);
        assert_eq!(s.options(), &[2, 4, 5, 0xb4]);
        assert!(s.payload().is_empty());
    }

    #[test]
    fn malformed() {
        assert_eq!(
            Segment::new_checked(&SYN_SEG[..19]).unwrap_err(),
            ParseError::TcpTruncated
        );
        // The data offset says 24 bytes but only 20 are there.
        assert_eq!(
            Segment::new_checked(&SYN_SEG[..20]).unwrap_err(),
            ParseError::TcpBadDataOffset
        );
        let mut small = SYN_SEG;
        small[12] = 0x40;
        assert_eq!(
            Segment::new_checked(&small[..]).unwrap_err(),
            ParseError::TcpBadDataOffset
        );
    }

    #[test]
    fn setters() {
        let mut b = SYN_SEG;
        let mut s = Segment::new_checked(&mut b[..]).unwrap();
        s.set_src_port(1);
        s.set_dst_port(2);
        s.set_checksum(0xabcd);
        assert_eq!((s.src_port(), s.dst_port(), s.checksum()), (1, 2, 0xabcd));
    }
}
