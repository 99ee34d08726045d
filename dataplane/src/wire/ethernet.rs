//! Ethernet II frames and the 802.1Q / 802.1ad tag.

use super::{ParseError, array, be16, put16};
use std::fmt;
use std::str::FromStr;

/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethertype (TPID) of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// Ethertype (TPID) of an 802.1ad service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

/// Length of the Ethernet II header.
pub const HEADER_LEN: usize = 14;
/// Length of one VLAN tag (TCI + inner ethertype).
pub const VLAN_TAG_LEN: usize = 4;

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// True for group (multicast and broadcast) addresses.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// True for ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a MAC address of the form `02:00:00:00:00:01`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes separated by ':'")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || p.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// A view over an Ethernet II frame (without FCS).
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps `buffer` after checking it holds at least the 14-byte header.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(ParseError::EthernetTruncated);
        }
        Ok(Frame { buffer })
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr(array(self.buffer.as_ref(), 0))
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr(array(self.buffer.as_ref(), 6))
    }

    /// The ethertype field (a TPID when the frame is tagged).
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), 12)
    }

    /// Everything after the 14-byte header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC.
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[0..6].copy_from_slice(&mac.0);
    }

    /// Sets the source MAC.
    pub fn set_src(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[6..12].copy_from_slice(&mac.0);
    }

    /// Sets the ethertype field.
    pub fn set_ethertype(&mut self, ethertype: u16) {
        put16(self.buffer.as_mut(), 12, ethertype);
    }
}

/// A view over the 4 bytes that follow a VLAN TPID: TCI and inner ethertype.
#[derive(Debug, Clone)]
pub struct VlanTag<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VlanTag<T> {
    /// Wraps `buffer` (starting at the TCI) after checking its 4 bytes.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        if buffer.as_ref().len() < VLAN_TAG_LEN {
            return Err(ParseError::VlanTruncated);
        }
        Ok(VlanTag { buffer })
    }

    /// The whole tag control information (PCP, DEI, VID).
    pub fn tci(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }

    /// The 12-bit VLAN id.
    pub fn vid(&self) -> u16 {
        self.tci() & 0x0fff
    }

    /// The 3-bit priority code point.
    pub fn pcp(&self) -> u8 {
        (self.tci() >> 13) as u8
    }

    /// The ethertype of what follows the tag.
    pub fn inner_ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: [u8; 18] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // dst
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // src
        0x81, 0x00, // 802.1Q
        0xa0, 0x64, // pcp 5, vid 100
        0x08, 0x00, // inner: IPv4
    ];

    #[test]
    fn fields() {
        let f = Frame::new_checked(&FRAME[..]).unwrap();
        assert_eq!(f.dst(), MacAddr([2, 0, 0, 0, 0, 2]));
        assert_eq!(f.src(), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(f.ethertype(), ETHERTYPE_VLAN);
        let tag = VlanTag::new_checked(f.payload()).unwrap();
        assert_eq!(tag.vid(), 100);
        assert_eq!(tag.pcp(), 5);
        assert_eq!(tag.inner_ethertype(), ETHERTYPE_IPV4);
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Frame::new_checked(&FRAME[..13]).unwrap_err(),
            ParseError::EthernetTruncated
        );
        let f = Frame::new_checked(&FRAME[..16]).unwrap();
        assert_eq!(
            VlanTag::new_checked(f.payload()).unwrap_err(),
            ParseError::VlanTruncated
        );
    }

    #[test]
    fn setters() {
        let mut buf = FRAME;
        let mut f = Frame::new_checked(&mut buf[..]).unwrap();
        f.set_dst(MacAddr::BROADCAST);
        f.set_src(MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]));
        f.set_ethertype(ETHERTYPE_IPV6);
        assert_eq!(&buf[..6], &[0xff; 6]);
        assert_eq!(&buf[6..12], &[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        assert_eq!(&buf[12..14], &[0x86, 0xdd]);
    }

    #[test]
    fn mac_parse_and_display() {
        let m: MacAddr = "12:34:56:78:9a:BC".parse().unwrap();
        assert_eq!(m.to_string(), "12:34:56:78:9a:bc");
        assert!(!m.is_multicast());
        assert!(MacAddr::BROADCAST.is_broadcast());
        for bad in [
            "",
            "12:34:56:78:9a",
            "12:34:56:78:9a:bc:de",
            "123:4:56:78:9a:bc",
            "zz:34:56:78:9a:bc",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
