//! ARP for Ethernet/IPv4 (RFC 826).

use super::{MacAddr, ParseError, array, be16, put16};
use std::net::Ipv4Addr;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// ARP request.
pub const OP_REQUEST: u16 = 1;
/// ARP reply.
pub const OP_REPLY: u16 = 2;

/// A view over an Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking it is a complete Ethernet/IPv4 ARP packet.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(ParseError::ArpTruncated);
        }
        if be16(b, 0) != 1 || be16(b, 2) != 0x0800 || b[4] != 6 || b[5] != 4 {
            return Err(ParseError::ArpUnsupported);
        }
        Ok(Packet { buffer })
    }

    /// Operation (1 request, 2 reply).
    pub fn operation(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }

    /// Sender hardware address.
    pub fn sender_mac(&self) -> MacAddr {
        MacAddr(array(self.buffer.as_ref(), 8))
    }

    /// Sender protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(array::<4>(self.buffer.as_ref(), 14))
    }

    /// Target hardware address.
    pub fn target_mac(&self) -> MacAddr {
        MacAddr(array(self.buffer.as_ref(), 18))
    }

    /// Target protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(array::<4>(self.buffer.as_ref(), 24))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the operation.
    pub fn set_operation(&mut self, op: u16) {
        put16(self.buffer.as_mut(), 6, op);
    }

    /// Sets the sender hardware and protocol addresses.
    pub fn set_sender(&mut self, mac: MacAddr, ip: Ipv4Addr) {
        let b = self.buffer.as_mut();
        b[8..14].copy_from_slice(&mac.0);
        b[14..18].copy_from_slice(&ip.octets());
    }

    /// Sets the target hardware and protocol addresses.
    pub fn set_target(&mut self, mac: MacAddr, ip: Ipv4Addr) {
        let b = self.buffer.as_mut();
        b[18..24].copy_from_slice(&mac.0);
        b[24..28].copy_from_slice(&ip.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // who-has 10.1.0.5 tell 10.1.0.4
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // htype, ptype, hlen, plen, op
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 10, 1, 0, 4, // sender
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 1, 0, 5, // target
    ];

    #[test]
    fn fields() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.operation(), OP_REQUEST);
        assert_eq!(p.sender_mac(), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 1, 0, 4));
        assert_eq!(p.target_mac(), MacAddr::ZERO);
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 1, 0, 5));
    }

    #[test]
    fn truncated_and_unsupported() {
        assert_eq!(
            Packet::new_checked(&REQUEST[..27]).unwrap_err(),
            ParseError::ArpTruncated
        );
        let mut ipv6ish = REQUEST;
        ipv6ish[3] = 0xdd;
        assert_eq!(
            Packet::new_checked(&ipv6ish[..]).unwrap_err(),
            ParseError::ArpUnsupported
        );
        let mut bad_hlen = REQUEST;
        bad_hlen[4] = 8;
        assert_eq!(
            Packet::new_checked(&bad_hlen[..]).unwrap_err(),
            ParseError::ArpUnsupported
        );
    }

    #[test]
    fn turn_request_into_reply() {
        let mut buf = REQUEST;
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        let gw = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        let (smac, sip, tip) = (p.sender_mac(), p.sender_ip(), p.target_ip());
        p.set_operation(OP_REPLY);
        p.set_sender(gw, tip);
        p.set_target(smac, sip);
        assert_eq!(p.operation(), OP_REPLY);
        assert_eq!(p.sender_mac(), gw);
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 1, 0, 5));
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 1, 0, 4));
    }
}
