//! NAT bindings: what to rewrite in each direction of a connection, in a form
//! the switch can fold into its one header-rewrite action per direction.

use dataplane::FlowKey;
use dataplane::Parsed;
use dataplane::rewrite::{self, RewriteError};
use std::net::IpAddr;

/// Address and port rewrites for one direction. `None` leaves a field alone.
/// For ICMP echo the only "port" is the echo identifier: either side's port
/// sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rewrite {
    /// New source address and port.
    pub src: Option<(IpAddr, u16)>,
    /// New destination address and port.
    pub dst: Option<(IpAddr, u16)>,
    /// The TCP sequence offset of this direction, if any. Only a
    /// SYN-proxied connection has one: its server chose another initial
    /// sequence number than the proxy told the client.
    pub shift: SeqShift,
}

/// A TCP sequence offset of one direction, added (wrapping) to the
/// sequence number or to the acknowledgment number. A SYN proxy shifts
/// one end's numbers only: one direction's sequence numbers, the other's
/// acknowledgments. Bytes rather than a `u32`, so that the flow slot
/// holding a [`Rewrite`] keeps its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeqShift {
    /// No offset.
    #[default]
    None,
    /// Added to the sequence number (big-endian bytes).
    Seq([u8; 4]),
    /// Added to the acknowledgment number (big-endian bytes).
    Ack([u8; 4]),
}

impl SeqShift {
    /// `n` added to sequence numbers.
    pub fn seq(n: u32) -> Self {
        SeqShift::Seq(n.to_be_bytes())
    }

    /// `n` added to acknowledgment numbers.
    pub fn ack(n: u32) -> Self {
        SeqShift::Ack(n.to_be_bytes())
    }

    /// What is added to the sequence and to the acknowledgment number.
    pub fn amounts(self) -> (u32, u32) {
        match self {
            SeqShift::None => (0, 0),
            SeqShift::Seq(b) => (u32::from_be_bytes(b), 0),
            SeqShift::Ack(b) => (0, u32::from_be_bytes(b)),
        }
    }
}

impl Rewrite {
    /// No change.
    pub const NONE: Rewrite = Rewrite {
        src: None,
        dst: None,
        shift: SeqShift::None,
    };

    /// True when it shifts TCP sequence or acknowledgment numbers.
    pub fn shifts_seq(&self) -> bool {
        self.shift != SeqShift::None
    }

    /// Applies the rewrite to `frame` (parsed as `p`), patching checksums
    /// incrementally. On error the frame may be partly rewritten only if the
    /// error is in the second field; callers drop such packets.
    pub fn apply(&self, frame: &mut [u8], p: &Parsed) -> Result<(), RewriteError> {
        let icmp = matches!(p.key.proto, 1 | 58);
        if let Some((ip, port)) = self.src {
            set_addr(frame, p, ip, true)?;
            if p.key.src_port != port {
                rewrite::set_src_port(frame, p, port)?;
            }
        }
        if let Some((ip, port)) = self.dst {
            set_addr(frame, p, ip, false)?;
            if icmp {
                if p.key.src_port != port {
                    rewrite::set_src_port(frame, p, port)?;
                }
            } else if p.key.dst_port != port {
                rewrite::set_dst_port(frame, p, port)?;
            }
        }
        if self.shifts_seq() {
            let (seq, ack) = self.shift.amounts();
            rewrite::shift_seq(frame, p, seq, ack)?;
        }
        Ok(())
    }

    /// Applies only the address part of the rewrite: for a fragment after
    /// the first, which carries no transport header (the first fragment's
    /// transport checksum, which covers the whole datagram, takes the
    /// change of ports and addresses).
    pub fn apply_l3(&self, frame: &mut [u8], p: &Parsed) -> Result<(), RewriteError> {
        if let Some((ip, _)) = self.src {
            set_addr(frame, p, ip, true)?;
        }
        if let Some((ip, _)) = self.dst {
            set_addr(frame, p, ip, false)?;
        }
        Ok(())
    }

    /// The key a packet with key `k` has after this rewrite.
    pub fn apply_to_key(&self, k: &FlowKey) -> FlowKey {
        let mut out = *k;
        if let Some((ip, port)) = self.src {
            out.src_ip = crate::conntrack::to16(ip);
            out.src_port = port;
        }
        if let Some((ip, port)) = self.dst {
            out.dst_ip = crate::conntrack::to16(ip);
            if k.is_icmp() {
                out.src_port = port;
            } else {
                out.dst_port = port;
            }
        }
        out
    }
}

fn set_addr(frame: &mut [u8], p: &Parsed, ip: IpAddr, src: bool) -> Result<(), RewriteError> {
    match (ip, src) {
        (IpAddr::V4(a), true) => rewrite::set_ipv4_src(frame, p, a),
        (IpAddr::V4(a), false) => rewrite::set_ipv4_dst(frame, p, a),
        (IpAddr::V6(a), true) => rewrite::set_ipv6_src(frame, p, a),
        (IpAddr::V6(a), false) => rewrite::set_ipv6_dst(frame, p, a),
    }
}

/// The two rewrites of a NATed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatBinding {
    /// Applied to packets in the original direction.
    pub forward: Rewrite,
    /// Applied to packets in the reply direction.
    pub reverse: Rewrite,
}

impl NatBinding {
    /// DNAT of a connection `orig` (client -> VIP) to `dip:dport`: forward
    /// packets get the DIP as destination; replies get the VIP back as source.
    /// For ICMP echo the identifier is kept (`dport` is ignored).
    pub fn dnat(orig: &FlowKey, dip: IpAddr, dport: u16) -> NatBinding {
        let (to_port, back_port) = if orig.is_icmp() {
            (orig.src_port, orig.src_port)
        } else {
            (dport, orig.dst_port)
        };
        NatBinding {
            forward: Rewrite {
                dst: Some((dip, to_port)),
                ..Rewrite::NONE
            },
            reverse: Rewrite {
                src: Some((orig.dst(), back_port)),
                ..Rewrite::NONE
            },
        }
    }

    /// SNAT of a connection `orig` (VM -> outside) to `public:port`: forward
    /// packets leave from the public address; replies go back to the VM.
    pub fn snat(orig: &FlowKey, public: IpAddr, port: u16) -> NatBinding {
        NatBinding {
            forward: Rewrite {
                src: Some((public, port)),
                ..Rewrite::NONE
            },
            reverse: Rewrite {
                dst: Some((orig.src(), orig.src_port)),
                ..Rewrite::NONE
            },
        }
    }

    /// The key replies arrive with, for a connection whose first packet had `orig`.
    pub fn reply_key(&self, orig: &FlowKey) -> FlowKey {
        self.forward.apply_to_key(orig).reversed()
    }

    /// `NatBinding::dnat(orig, dip, dport).reply_key(orig)`, made directly
    /// (a new connection to a VIP needs its reply key twice, and building
    /// the binding's rewrites for it costs several times as much).
    #[inline]
    pub fn dnat_reply_key(orig: &FlowKey, dip: IpAddr, dport: u16) -> FlowKey {
        // The reverse of the key, from the backend (an ICMP echo keeps its
        // identifier, in `src_port` both ways).
        FlowKey {
            src_ip: crate::conntrack::to16(dip),
            src_port: if orig.is_icmp() { orig.src_port } else { dport },
            ..orig.reversed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::parse;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    /// Checks IPv4 header and TCP/UDP/ICMP checksums by full recomputation.
    fn assert_checksums(frame: &[u8]) {
        let s = SlicedPacket::from_ethernet(frame).unwrap();
        match (&s.net, &s.transport) {
            (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) => {
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                let th = t.to_header();
                assert_eq!(th.checksum, th.calc_checksum_ipv4(&h, t.payload()).unwrap());
            }
            (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) => {
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                let uh = u.to_header();
                assert_eq!(uh.checksum, uh.calc_checksum_ipv4(&h, u.payload()).unwrap());
            }
            (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(t))) => {
                let h = ip.header().to_header();
                let th = t.to_header();
                assert_eq!(th.checksum, th.calc_checksum_ipv6(&h, t.payload()).unwrap());
            }
            (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Icmpv4(i))) => {
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                assert_eq!(dataplane::wire::checksum::checksum(i.slice()), 0);
            }
            other => panic!("unexpected packet {other:?}"),
        }
    }

    fn key_of(frame: &[u8]) -> FlowKey {
        parse(frame, 0).unwrap().key
    }

    fn apply(frame: &mut [u8], rw: &Rewrite) {
        let p = parse(frame, 0).unwrap();
        rw.apply(frame, &p).unwrap();
        assert_checksums(frame);
    }

    #[test]
    fn dnat_round_trip_tcp4() {
        let client = [203, 0, 113, 7];
        let vip = [10, 1, 0, 100];
        let mut req = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4(client, vip, 64)
            .tcp(50000, 80, 1, 1000)
            .syn()
            .write(&mut req, b"GET / HTTP/1.1\r\n")
            .unwrap();
        let orig = key_of(&req);
        let nat = NatBinding::dnat(&orig, "10.1.0.5".parse().unwrap(), 8080);
        apply(&mut req, &nat.forward);
        let seen = key_of(&req);
        assert_eq!(
            seen,
            FlowKey::new(
                "203.0.113.7".parse().unwrap(),
                50000,
                "10.1.0.5".parse().unwrap(),
                8080,
                6
            )
        );
        // The DIP answers; its reply arrives with the reply key.
        let mut resp = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([10, 1, 0, 5], client, 64)
            .tcp(8080, 50000, 9, 1000)
            .syn()
            .ack(2)
            .write(&mut resp, b"HTTP/1.1 200 OK\r\n")
            .unwrap();
        assert_eq!(key_of(&resp), nat.reply_key(&orig));
        apply(&mut resp, &nat.reverse);
        // The client only ever sees the VIP.
        assert_eq!(key_of(&resp), orig.reversed());
    }

    #[test]
    fn dnat_round_trip_udp4_and_tcp6() {
        let mut req = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([192, 0, 2, 1], [10, 1, 0, 100], 64)
            .udp(5353, 53)
            .write(&mut req, b"query")
            .unwrap();
        let orig = key_of(&req);
        let nat = NatBinding::dnat(&orig, "10.1.0.6".parse().unwrap(), 53);
        apply(&mut req, &nat.forward);
        assert_eq!(key_of(&req).dst(), "10.1.0.6".parse::<IpAddr>().unwrap());

        let vip6 = "2001:db8::100"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let cli6 = "2001:db8:ffff::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut req6 = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv6(cli6, vip6, 64)
            .tcp(40000, 443, 1, 100)
            .write(&mut req6, b"x")
            .unwrap();
        let orig6 = key_of(&req6);
        let nat6 = NatBinding::dnat(&orig6, "2001:db8::5".parse().unwrap(), 8443);
        apply(&mut req6, &nat6.forward);
        let mut resp6 = Vec::new();
        let dip6 = "2001:db8::5"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv6(dip6, cli6, 64)
            .tcp(8443, 40000, 1, 100)
            .write(&mut resp6, b"y")
            .unwrap();
        assert_eq!(key_of(&resp6), nat6.reply_key(&orig6));
        apply(&mut resp6, &nat6.reverse);
        assert_eq!(key_of(&resp6), orig6.reversed());
    }

    #[test]
    fn snat_round_trip_icmp_echo() {
        let mut req = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([10, 1, 0, 4], [198, 51, 100, 1], 64)
            .icmpv4_echo_request(0x1234, 1)
            .write(&mut req, b"ping")
            .unwrap();
        let orig = key_of(&req);
        let nat = NatBinding::snat(&orig, "192.0.2.10".parse().unwrap(), 0x4000);
        apply(&mut req, &nat.forward);
        assert_eq!(key_of(&req).src(), "192.0.2.10".parse::<IpAddr>().unwrap());
        let mut reply = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([198, 51, 100, 1], [192, 0, 2, 10], 64)
            .icmpv4_echo_reply(0x4000, 1)
            .write(&mut reply, b"ping")
            .unwrap();
        assert_eq!(key_of(&reply), nat.reply_key(&orig));
        apply(&mut reply, &nat.reverse);
        assert_eq!(key_of(&reply), orig.reversed());
        assert_eq!(key_of(&reply).src_port, 0x1234);
    }

    proptest::proptest! {
        /// The reply key made directly is the one the binding's rewrite
        /// gives, for IPv4 and IPv6 backends, ICMP echo and the rest.
        #[test]
        fn a_dnat_reply_key_is_the_bindings(
            src in proptest::array::uniform16(proptest::prelude::any::<u8>()),
            dst in proptest::array::uniform16(proptest::prelude::any::<u8>()),
            ports in proptest::prelude::any::<(u16, u16, u16)>(),
            proto in proptest::sample::select(vec![1u8, 6, 17, 58, 132]),
            dip in proptest::prelude::any::<std::net::IpAddr>(),
        ) {
            let orig = FlowKey {
                src_ip: src,
                dst_ip: dst,
                src_port: ports.0,
                dst_port: ports.1,
                proto,
            };
            proptest::prop_assert_eq!(
                NatBinding::dnat_reply_key(&orig, dip, ports.2),
                NatBinding::dnat(&orig, dip, ports.2).reply_key(&orig)
            );
        }
    }
}
