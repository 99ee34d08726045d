//! Header views in the smoltcp style.
//!
//! Each view wraps a byte buffer. `new_checked` validates the length (and any
//! length fields the accessors rely on) once; after that no accessor can panic.
//! Setters exist only where the buffer is mutable (`T: AsMut<[u8]>`). Byte-array
//! fixtures for each header are tested at the bottom of its file.
//!
//! Written here rather than taken from smoltcp or etherparse because the switch
//! needs views over *any* `PacketBuf` slice with in-place setters and a specific
//! drop reason per malformation; etherparse is used in tests as an independent
//! reference.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

pub use ethernet::MacAddr;

/// Why a frame could not be parsed. Every variant is a counted drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u8)]
pub enum ParseError {
    /// Shorter than an Ethernet header (14 bytes).
    #[error("ethernet header truncated")]
    EthernetTruncated,
    /// An 802.1Q/802.1ad tag is announced but its 4 bytes are missing.
    #[error("vlan tag truncated")]
    VlanTruncated,
    /// Shorter than an Ethernet/IPv4 ARP packet (28 bytes).
    #[error("arp packet truncated")]
    ArpTruncated,
    /// ARP for something other than Ethernet/IPv4 (hardware type 1, protocol 0x0800, lengths 6/4).
    #[error("arp for other than ethernet/ipv4")]
    ArpUnsupported,
    /// Shorter than the fixed IPv4 header (20 bytes).
    #[error("ipv4 header truncated")]
    Ipv4Truncated,
    /// IPv4 ethertype but the version field is not 4.
    #[error("ipv4 version field is not 4")]
    Ipv4BadVersion,
    /// IHL below 5 or the announced header (with options) longer than the frame.
    #[error("ipv4 header length invalid")]
    Ipv4BadHeaderLen,
    /// Total length below the header length or beyond the end of the frame.
    #[error("ipv4 total length invalid")]
    Ipv4BadTotalLen,
    /// Shorter than the IPv6 header (40 bytes).
    #[error("ipv6 header truncated")]
    Ipv6Truncated,
    /// IPv6 ethertype but the version field is not 6.
    #[error("ipv6 version field is not 6")]
    Ipv6BadVersion,
    /// Payload length beyond the end of the frame.
    #[error("ipv6 payload length beyond frame")]
    Ipv6BadPayloadLen,
    /// An extension header runs past the end of the payload.
    #[error("ipv6 extension header truncated")]
    Ipv6ExtTruncated,
    /// An authentication header shorter than its fixed fields (a payload
    /// length of 0: 8 bytes, where RFC 4302's fixed part takes 12).
    #[error("ipv6 authentication header shorter than its fixed fields")]
    Ipv6AuthTooShort,
    /// A hop-by-hop options header after another extension header (RFC
    /// 8200 puts it right after the IPv6 header, the only place a host
    /// reads one).
    #[error("ipv6 hop-by-hop header not first")]
    Ipv6HopByHopMisplaced,
    /// A first fragment (offset 0, more fragments) whose extension headers
    /// end in a later fragment's header: its upper-layer header is not in
    /// it (RFC 7112 has hosts discard such a fragment).
    #[error("ipv6 first fragment without its upper-layer header")]
    Ipv6FirstFragmentIncomplete,
    /// More extension headers than the parser follows (8).
    #[error("too many ipv6 extension headers")]
    Ipv6TooManyExt,
    /// An IPv6 source or destination address that is IPv4-mapped
    /// (`::ffff:a.b.c.d`). Flow keys hold IPv4 addresses in that form, so
    /// such a packet would share its keys with IPv4 traffic (and pass as
    /// IPv4 in source checks and security groups); such addresses never
    /// belong on the wire (draft-itojun-v6ops-v4mapped-harmful).
    #[error("ipv6 address is ipv4-mapped")]
    Ipv6V4Mapped,
    /// Shorter than a TCP header (20 bytes).
    #[error("tcp header truncated")]
    TcpTruncated,
    /// Data offset below 5 or past the end of the segment.
    #[error("tcp data offset invalid")]
    TcpBadDataOffset,
    /// Shorter than a UDP header (8 bytes).
    #[error("udp header truncated")]
    UdpTruncated,
    /// UDP length below 8 or beyond the IP payload.
    #[error("udp length invalid")]
    UdpBadLength,
    /// Shorter than an ICMP/ICMPv6 header (8 bytes).
    #[error("icmp header truncated")]
    IcmpTruncated,
}

impl ParseError {
    /// Every variant, in declaration order (index = `self as usize`).
    pub const ALL: [ParseError; 22] = [
        ParseError::EthernetTruncated,
        ParseError::VlanTruncated,
        ParseError::ArpTruncated,
        ParseError::ArpUnsupported,
        ParseError::Ipv4Truncated,
        ParseError::Ipv4BadVersion,
        ParseError::Ipv4BadHeaderLen,
        ParseError::Ipv4BadTotalLen,
        ParseError::Ipv6Truncated,
        ParseError::Ipv6BadVersion,
        ParseError::Ipv6BadPayloadLen,
        ParseError::Ipv6ExtTruncated,
        ParseError::Ipv6AuthTooShort,
        ParseError::Ipv6HopByHopMisplaced,
        ParseError::Ipv6FirstFragmentIncomplete,
        ParseError::Ipv6TooManyExt,
        ParseError::Ipv6V4Mapped,
        ParseError::TcpTruncated,
        ParseError::TcpBadDataOffset,
        ParseError::UdpTruncated,
        ParseError::UdpBadLength,
        ParseError::IcmpTruncated,
    ];

    /// A stable snake_case name for counters and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            ParseError::EthernetTruncated => "ethernet_truncated",
            ParseError::VlanTruncated => "vlan_truncated",
            ParseError::ArpTruncated => "arp_truncated",
            ParseError::ArpUnsupported => "arp_unsupported",
            ParseError::Ipv4Truncated => "ipv4_truncated",
            ParseError::Ipv4BadVersion => "ipv4_bad_version",
            ParseError::Ipv4BadHeaderLen => "ipv4_bad_header_len",
            ParseError::Ipv4BadTotalLen => "ipv4_bad_total_len",
            ParseError::Ipv6Truncated => "ipv6_truncated",
            ParseError::Ipv6BadVersion => "ipv6_bad_version",
            ParseError::Ipv6BadPayloadLen => "ipv6_bad_payload_len",
            ParseError::Ipv6ExtTruncated => "ipv6_ext_truncated",
            ParseError::Ipv6AuthTooShort => "ipv6_auth_too_short",
            ParseError::Ipv6HopByHopMisplaced => "ipv6_hop_by_hop_misplaced",
            ParseError::Ipv6FirstFragmentIncomplete => "ipv6_first_fragment_incomplete",
            ParseError::Ipv6TooManyExt => "ipv6_too_many_ext",
            ParseError::Ipv6V4Mapped => "ipv6_v4_mapped",
            ParseError::TcpTruncated => "tcp_truncated",
            ParseError::TcpBadDataOffset => "tcp_bad_data_offset",
            ParseError::UdpTruncated => "udp_truncated",
            ParseError::UdpBadLength => "udp_bad_length",
            ParseError::IcmpTruncated => "icmp_truncated",
        }
    }
}

/// Big-endian u16 at `at`; callers have validated the length.
#[inline(always)]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Big-endian u32 at `at`; callers have validated the length.
#[inline(always)]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Writes a big-endian u16 at `at`; callers have validated the length.
#[inline(always)]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Copies `N` bytes at `at` into an array; callers have validated the length.
#[inline(always)]
pub(crate) fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::ParseError;

    #[test]
    fn all_is_in_declaration_order_and_names_are_unique() {
        for (i, e) in ParseError::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
        let mut names: Vec<_> = ParseError::ALL.iter().map(|e| e.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ParseError::ALL.len());
    }
}
