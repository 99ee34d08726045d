//! ICMP (RFC 792) and ICMPv6 (RFC 4443): the common 8-byte header.

use super::{ParseError, be16, put16};

/// Length of the ICMP header (type, code, checksum, 4 bytes of rest-of-header).
pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 2;

/// ICMPv4 echo reply.
pub const V4_ECHO_REPLY: u8 = 0;
/// ICMPv4 echo request.
pub const V4_ECHO_REQUEST: u8 = 8;
/// ICMPv6 echo request.
pub const V6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 echo reply.
pub const V6_ECHO_REPLY: u8 = 129;

/// A view over an ICMP or ICMPv6 message; `new_checked` guarantees 8 bytes.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` (the IP payload) after checking the 8-byte header.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(ParseError::IcmpTruncated);
        }
        Ok(Packet { buffer })
    }

    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    /// Message code.
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), CHECKSUM_OFFSET)
    }

    /// Echo identifier (bytes 4-5; meaningful for echo request/reply).
    pub fn echo_ident(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    /// Echo sequence number (bytes 6-7).
    pub fn echo_seq(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }

    /// True for an ICMPv4 echo request or reply.
    pub fn is_v4_echo(&self) -> bool {
        matches!(self.msg_type(), V4_ECHO_REQUEST | V4_ECHO_REPLY)
    }

    /// True for an ICMPv6 echo request or reply.
    pub fn is_v6_echo(&self) -> bool {
        matches!(self.msg_type(), V6_ECHO_REQUEST | V6_ECHO_REPLY)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the message type without touching the checksum.
    pub fn set_msg_type(&mut self, t: u8) {
        self.buffer.as_mut()[0] = t;
    }

    /// Sets the echo identifier without touching the checksum.
    pub fn set_echo_ident(&mut self, id: u16) {
        put16(self.buffer.as_mut(), 4, id);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, check: u16) {
        put16(self.buffer.as_mut(), CHECKSUM_OFFSET, check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum;

    // An echo request id 0x1234 seq 1 with 4 bytes of data, valid checksum.
    fn echo() -> [u8; 12] {
        let mut b = [8, 0, 0, 0, 0x12, 0x34, 0x00, 0x01, b'p', b'i', b'n', b'g'];
        let c = checksum::checksum(&b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn fields() {
        let b = echo();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.msg_type(), V4_ECHO_REQUEST);
        assert_eq!(p.code(), 0);
        assert!(p.is_v4_echo());
        assert!(!p.is_v6_echo());
        assert_eq!(p.echo_ident(), 0x1234);
        assert_eq!(p.echo_seq(), 1);
        assert_eq!(checksum::checksum(&b), 0);
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Packet::new_checked(&echo()[..7]).unwrap_err(),
            ParseError::IcmpTruncated
        );
    }

    #[test]
    fn setters() {
        let mut b = echo();
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        p.set_msg_type(V4_ECHO_REPLY);
        p.set_echo_ident(7);
        p.set_checksum(1);
        assert_eq!((p.msg_type(), p.echo_ident(), p.checksum()), (0, 7, 1));
    }
}
