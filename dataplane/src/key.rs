//! The flow key: the one 5-tuple every layer speaks of.
//!
//! The parser fills it, the flow cache (with the port the frame came in
//! on), connection tracking, the load balancer's hash and NAT, and the
//! security-group classifier all read the same [`FlowKey`]; nothing converts
//! between look-alike types on the packet path.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr};
use xxhash_rust::xxh3::xxh3_64;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// What an ICMP or ICMPv6 message other than echo has as its `dst_port`
/// (errors, neighbour discovery, ...): so that no such message shares a key
/// with an echo, whose `dst_port` is 0.
pub const ICMP_NOT_ECHO: u16 = u16::MAX;

/// One direction of a flow: addresses, ports and protocol.
///
/// Addresses are stored as 16 bytes; IPv4 addresses as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`), so one key type serves both families. For ICMP echo
/// the identifier is in `src_port` and `dst_port` is 0, in both directions;
/// other ICMP messages have `dst_port` [`ICMP_NOT_ECHO`].
/// For ARP the addresses are the sender and target protocol addresses and
/// the ports are 0.
///
/// It hashes (through [`Hash`]) as one `u64`, [`FlowKey::hash64`], so maps
/// keyed by it can use a pass-through hasher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowKey {
    /// Source address (IPv4-mapped for IPv4).
    pub src_ip: [u8; 16],
    /// Destination address (IPv4-mapped for IPv4).
    pub dst_ip: [u8; 16],
    /// Source port, or ICMP echo identifier.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// IP protocol (0 for non-IP).
    pub proto: u8,
}

impl FlowKey {
    /// A key from addresses and ports.
    pub fn new(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16, proto: u8) -> Self {
        FlowKey {
            src_ip: to16(src),
            dst_ip: to16(dst),
            src_port,
            dst_port,
            proto,
        }
    }

    /// The source address as an `IpAddr` (IPv4 when it is IPv4-mapped).
    pub fn src(&self) -> IpAddr {
        from16(self.src_ip)
    }

    /// The destination address as an `IpAddr`.
    pub fn dst(&self) -> IpAddr {
        from16(self.dst_ip)
    }

    /// True for ICMP and ICMPv6, whose only "port" is the echo id in
    /// `src_port`.
    pub fn is_icmp(&self) -> bool {
        matches!(self.proto, PROTO_ICMP | PROTO_ICMPV6)
    }

    /// True when the protocol carries ports (TCP or UDP).
    pub fn has_ports(&self) -> bool {
        matches!(self.proto, PROTO_TCP | PROTO_UDP)
    }

    /// The key of the other direction of the same connection. For ICMP the
    /// echo id stays in `src_port` (an echo reply carries the request's id).
    pub fn reversed(&self) -> FlowKey {
        let (src_port, dst_port) = if self.is_icmp() {
            (self.src_port, self.dst_port)
        } else {
            (self.dst_port, self.src_port)
        };
        FlowKey {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port,
            dst_port,
            proto: self.proto,
        }
    }

    /// XXH3 over the key's 37 bytes (ports big-endian): fixed, the same on
    /// every machine and in every process, so that hosts that hash a flow
    /// (the load balancer's backend choice) agree.
    #[inline]
    pub fn hash64(&self) -> u64 {
        let mut b = [0u8; 37];
        b[..16].copy_from_slice(&self.src_ip);
        b[16..32].copy_from_slice(&self.dst_ip);
        b[32..34].copy_from_slice(&self.src_port.to_be_bytes());
        b[34..36].copy_from_slice(&self.dst_port.to_be_bytes());
        b[36] = self.proto;
        xxh3_64(&b)
    }
}

impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

/// An address as the 16 bytes a [`FlowKey`] holds (IPv4 mapped into IPv6).
pub fn to16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => mapped16(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// True for 16 key bytes of the form `::ffff:a.b.c.d`: how a key holds an
/// IPv4 address, so never an IPv6 address in a key (the parser drops IPv6
/// packets with such addresses).
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// The IPv4 address that 16 key bytes hold, as its 4 bytes, if they are
/// IPv4-mapped: read straight off the bytes, for paths that would pay for
/// an `IpAddr` ([`from16`]) per packet or connection.
#[inline(always)]
pub fn v4_of(a: &[u8; 16]) -> Option<[u8; 4]> {
    is_v4_mapped(a).then_some([a[12], a[13], a[14], a[15]])
}

/// 4 IPv4 address bytes as the 16 a key holds (`::ffff:a.b.c.d`), as
/// std's `to_ipv6_mapped` gives them; [`to16`] maps IPv4 addresses so.
#[inline(always)]
pub fn mapped16(v4: [u8; 4]) -> [u8; 16] {
    let [a, b, c, d] = v4;
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
}

/// The address of 16 key bytes (IPv4 when they are IPv4-mapped).
pub fn from16(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_bytes_in_and_out_of_key_bytes_as_std_maps_them() {
        for a in ["10.1.0.4", "0.0.0.0", "255.255.255.255"] {
            let IpAddr::V4(v4) = ip(a) else {
                unreachable!()
            };
            assert_eq!(mapped16(v4.octets()), v4.to_ipv6_mapped().octets());
            assert_eq!(v4_of(&to16(IpAddr::V4(v4))), Some(v4.octets()));
        }
        for a in ["2001:db8::1", "::", "::1.2.3.4", "::ffff:0:1.2.3.4"] {
            assert_eq!(v4_of(&to16(ip(a))), None, "{a}");
        }
    }

    #[test]
    fn reversed_swaps_ports_except_the_icmp_echo_id() {
        let tcp = FlowKey::new(ip("10.0.0.1"), 40000, ip("10.0.0.2"), 80, PROTO_TCP);
        let r = tcp.reversed();
        assert_eq!(
            (r.src(), r.src_port, r.dst(), r.dst_port),
            (ip("10.0.0.2"), 80, ip("10.0.0.1"), 40000)
        );
        assert_eq!(r.reversed(), tcp);
        let echo = FlowKey::new(ip("2001:db8::1"), 7, ip("2001:db8::2"), 0, PROTO_ICMPV6);
        let r = echo.reversed();
        assert_eq!((r.src(), r.src_port, r.dst_port), (ip("2001:db8::2"), 7, 0));
    }

    #[test]
    fn addresses_round_trip_through_the_key_bytes() {
        for a in ["192.0.2.1", "0.0.0.0", "2001:db8::5", "::1"] {
            assert_eq!(from16(to16(ip(a))), ip(a));
        }
    }

    #[test]
    fn the_hash_is_fixed_and_covers_every_field() {
        let k = FlowKey::new(ip("10.0.0.1"), 1, ip("10.0.0.2"), 2, PROTO_UDP);
        // The same value in every process: XXH3 of the documented bytes.
        let mut b = [0u8; 37];
        b[..16].copy_from_slice(&to16(ip("10.0.0.1")));
        b[16..32].copy_from_slice(&to16(ip("10.0.0.2")));
        b[32..36].copy_from_slice(&[0, 1, 0, 2]);
        b[36] = 17;
        assert_eq!(k.hash64(), xxh3_64(&b));
        let variants = [
            FlowKey { src_port: 9, ..k },
            FlowKey { dst_port: 9, ..k },
            FlowKey { proto: 6, ..k },
            k.reversed(),
        ];
        for v in variants {
            assert_ne!(v.hash64(), k.hash64(), "{v:?}");
        }
    }
}
