//! Generated frames and the signature they carry.
//!
//! Every frame is Ethernet + IPv4 + UDP (or a TCP SYN) whose L4 payload
//! starts with an 18-byte [`Signature`]: that is what fits a minimal 64-byte
//! UDP frame (60 bytes without the FCS), so the smallest standard frame size
//! still carries everything the receiver needs.

use crate::wire::MacAddr;
use crate::wire::checksum;
use std::net::Ipv4Addr;

/// Bytes of the signature at the start of the L4 payload.
pub const SIG_LEN: usize = 18;
/// The signature's first two bytes ("PX").
pub const MAGIC: [u8; 2] = *b"PX";
/// Largest flow id (24 bits, the top bit of that field marks warm-up).
pub const MAX_FLOWS: u32 = 1 << 23;
const WARMUP_BIT: u32 = 1 << 23;
/// Sequence numbers are 40 bits (10^12 packets per flow).
const SEQ_MASK: u64 = (1 << 40) - 1;

/// What a generated packet carries: `PX`, a warm-up mark and a 23-bit flow
/// id (3 bytes), a 40-bit per-flow sequence number (5 bytes) and the TSC
/// transmit timestamp (8 bytes); all big-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    /// Sent during warm-up (not counted in the results).
    pub warmup: bool,
    /// Flow id, below [`MAX_FLOWS`].
    pub flow: u32,
    /// Sequence number within the flow (40 bits).
    pub seq: u64,
    /// Raw TSC ticks when the packet's burst was sent.
    pub tx_ts: u64,
}

impl Signature {
    /// The 18 bytes of this signature.
    pub fn encode(&self) -> [u8; SIG_LEN] {
        let mut b = [0u8; SIG_LEN];
        b[..2].copy_from_slice(&MAGIC);
        let f = (self.flow & (MAX_FLOWS - 1)) | if self.warmup { WARMUP_BIT } else { 0 };
        b[2..5].copy_from_slice(&f.to_be_bytes()[1..]);
        b[5..10].copy_from_slice(&(self.seq & SEQ_MASK).to_be_bytes()[3..]);
        b[10..18].copy_from_slice(&self.tx_ts.to_be_bytes());
        b
    }

    /// Reads a signature from the start of `b`; `None` without the magic.
    pub fn decode(b: &[u8]) -> Option<Signature> {
        let b: &[u8; SIG_LEN] = b.get(..SIG_LEN)?.try_into().ok()?;
        if b[..2] != MAGIC {
            return None;
        }
        let f = u32::from_be_bytes([0, b[2], b[3], b[4]]);
        let seq = u64::from_be_bytes([0, 0, 0, b[5], b[6], b[7], b[8], b[9]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[10..18]);
        Some(Signature {
            warmup: f & WARMUP_BIT != 0,
            flow: f & (MAX_FLOWS - 1),
            seq,
            tx_ts: u64::from_be_bytes(ts),
        })
    }
}

/// The L4 protocol of generated traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// IPv4 UDP datagrams.
    Udp,
    /// IPv4 TCP segments with only SYN set (each flow's packets repeat its SYN).
    TcpSyn,
}

impl Proto {
    fn l4_header(self) -> usize {
        match self {
            Proto::Udp => 8,
            Proto::TcpSyn => 20,
        }
    }

    /// The smallest frame size (FCS included) that carries the signature.
    pub fn min_frame(self) -> usize {
        14 + 20 + self.l4_header() + SIG_LEN + 4
    }
}

/// The traffic to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficSpec {
    /// Source MAC (the sending VM's or port's).
    pub src_mac: MacAddr,
    /// Destination MAC (the switch's gateway, or the next hop).
    pub dst_mac: MacAddr,
    /// Source address (the first of `src_ips`).
    pub src_ip: Ipv4Addr,
    /// Consecutive source addresses from `src_ip`: flow `i` comes from
    /// `src_ip + i % src_ips` (many clients, or a spoofed flood), and its
    /// ports advance once every `src_ips` flows; 1 for one address.
    pub src_ips: u32,
    /// Destination address (a VIP, a VM).
    pub dst_ip: Ipv4Addr,
    /// UDP or TCP SYN.
    pub proto: Proto,
    /// Frame size in bytes including the 4-byte FCS, as traffic generators
    /// count (64 is the minimum Ethernet frame: 60 bytes in the buffer).
    pub frame_size: usize,
    /// Number of flows; with one source address, flow `i` has source port
    /// `sport + i % 64 000` and destination port `dport + i / 64 000` (with
    /// several, `i / src_ips` takes the place of `i`).
    pub flows: u32,
    /// First source port.
    pub sport: u16,
    /// First destination port.
    pub dport: u16,
}

/// Why a [`TrafficSpec`] cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The frame is too small for the headers and the signature, or larger
    /// than a standard 1518-byte frame.
    #[error("frame size {size}: must be {min} to 1518 bytes (FCS included) for {proto:?}")]
    FrameSize {
        /// The requested size.
        size: usize,
        /// The smallest size for the protocol.
        min: usize,
        /// The protocol.
        proto: Proto,
    },
    /// Zero flows, or more than [`MAX_FLOWS`], or more than the port ranges hold.
    #[error("flows {flows}: must be 1 to {max}")]
    Flows {
        /// The requested count.
        flows: u32,
        /// The largest count for these ports.
        max: u32,
    },
    /// Zero source addresses, or more than lie between the first and
    /// 255.255.255.255.
    #[error("source addresses {count} from {first}: must be 1 to {max}")]
    SrcIps {
        /// The requested count.
        count: u32,
        /// The first address.
        first: Ipv4Addr,
        /// The largest count from it.
        max: u64,
    },
}

/// Flow `i`'s source address as a number.
fn flow_src(spec: &TrafficSpec, flow: u32) -> u32 {
    u32::from(spec.src_ip).wrapping_add(flow % spec.src_ips.max(1))
}

/// The one's-complement sum of an IPv4 address's two words.
fn addr_sum(a: u32) -> u32 {
    (a >> 16) + (a & 0xffff)
}

/// Flow `i`'s source and destination ports.
fn flow_ports(spec: &TrafficSpec, flow: u32) -> (u16, u16) {
    let j = flow / spec.src_ips.max(1);
    (
        spec.sport.wrapping_add((j % 64_000) as u16),
        spec.dport.wrapping_add((j / 64_000) as u16),
    )
}

/// A frame template: the fixed bytes, and the sums that let each packet's L4
/// checksum be finished from its ports and signature alone.
#[derive(Debug, Clone)]
pub struct Template {
    bytes: Vec<u8>,
    spec: TrafficSpec,
    /// L4 offset, checksum offset, signature offset.
    l4: usize,
    csum_at: usize,
    sig_at: usize,
    /// One's-complement sum of everything the L4 checksum covers except the
    /// two port words, the source address and the signature.
    base_sum: u32,
    /// One's-complement sum of the IPv4 header without its checksum and
    /// source address.
    ip_sum: u32,
}

impl Template {
    /// Builds the template for `spec`.
    pub fn new(spec: &TrafficSpec) -> Result<Template, SpecError> {
        let min = spec.proto.min_frame();
        if spec.frame_size < min || spec.frame_size > 1518 {
            return Err(SpecError::FrameSize {
                size: spec.frame_size,
                min,
                proto: spec.proto,
            });
        }
        let max_ips = (1u64 << 32) - u64::from(u32::from(spec.src_ip));
        if spec.src_ips == 0 || u64::from(spec.src_ips) > max_ips {
            return Err(SpecError::SrcIps {
                count: spec.src_ips,
                first: spec.src_ip,
                max: max_ips,
            });
        }
        let tuples = 64_000 * (u64::from(u16::MAX - spec.dport) + 1) * u64::from(spec.src_ips);
        let max_flows = u64::from(MAX_FLOWS).min(tuples) as u32;
        if spec.flows == 0 || spec.flows > max_flows {
            return Err(SpecError::Flows {
                flows: spec.flows,
                max: max_flows,
            });
        }
        let len = spec.frame_size - 4;
        let l4 = 34;
        let l4_len = len - l4;
        let mut f = vec![0u8; len];
        f[0..6].copy_from_slice(&spec.dst_mac.0);
        f[6..12].copy_from_slice(&spec.src_mac.0);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        f[20] = 0x40; // don't fragment
        f[22] = 64;
        f[23] = match spec.proto {
            Proto::Udp => 17,
            Proto::TcpSyn => 6,
        };
        // The source address and the header checksum are written per
        // packet (the address may vary by flow).
        f[30..34].copy_from_slice(&spec.dst_ip.octets());
        let ip_sum = checksum::sum(&f[14..34]);
        let csum_at = match spec.proto {
            Proto::Udp => {
                f[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                l4 + 6
            }
            Proto::TcpSyn => {
                f[l4 + 4..l4 + 8].copy_from_slice(&1u32.to_be_bytes()); // seq
                f[l4 + 12] = 5 << 4; // data offset: 20 bytes
                f[l4 + 13] = 0x02; // SYN
                f[l4 + 14..l4 + 16].copy_from_slice(&64240u16.to_be_bytes());
                l4 + 16
            }
        };
        let sig_at = l4 + spec.proto.l4_header();
        // Ports, checksum and signature are zero here, so the sum of the
        // segment is the sum of everything else; so is the pseudo-header's
        // source address.
        let base_sum = checksum::combine(
            checksum::pseudo_v4([0; 4], spec.dst_ip.octets(), f[23], l4_len as u16),
            checksum::sum(&f[l4..]),
        );
        Ok(Template {
            bytes: f,
            spec: spec.clone(),
            l4,
            csum_at,
            sig_at,
            base_sum,
            ip_sum,
        })
    }

    /// Frame length in the buffer (the frame size without the FCS).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a template holds at least the headers.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The traffic this template generates.
    pub fn spec(&self) -> &TrafficSpec {
        &self.spec
    }

    /// Writes the frame of `sig.flow` carrying `sig` into `out`, which must
    /// be [`Template::len`] bytes (else nothing is written and false returned).
    #[inline]
    pub fn write(&self, out: &mut [u8], sig: &Signature) -> bool {
        if out.len() != self.bytes.len() {
            return false;
        }
        out.copy_from_slice(&self.bytes);
        let (sp, dp) = flow_ports(&self.spec, sig.flow);
        let src = flow_src(&self.spec, sig.flow);
        let s = sig.encode();
        let l4 = self.l4;
        out[26..30].copy_from_slice(&src.to_be_bytes());
        let ip_c = !checksum::fold(checksum::combine(self.ip_sum, addr_sum(src)));
        out[24..26].copy_from_slice(&ip_c.to_be_bytes());
        out[l4..l4 + 2].copy_from_slice(&sp.to_be_bytes());
        out[l4 + 2..l4 + 4].copy_from_slice(&dp.to_be_bytes());
        if let Some(dst) = out.get_mut(self.sig_at..self.sig_at + SIG_LEN) {
            dst.copy_from_slice(&s);
        }
        let sum = checksum::combine(
            checksum::combine(self.base_sum, u32::from(sp) + u32::from(dp) + addr_sum(src)),
            checksum::sum(&s),
        );
        let mut c = !checksum::fold(sum);
        if c == 0 && self.spec.proto == Proto::Udp {
            c = 0xffff;
        }
        out[self.csum_at..self.csum_at + 2].copy_from_slice(&c.to_be_bytes());
        true
    }
}

/// The signature in a received frame: Ethernet (an 802.1Q tag is skipped),
/// IPv4 without fragmentation, UDP or TCP, the signature at the start of the
/// L4 payload. `None` for anything else (counted as foreign traffic).
pub fn find_signature(frame: &[u8]) -> Option<Signature> {
    let mut at = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    if ethertype == 0x8100 {
        at += 4;
        ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = at + 2;
    let vihl = *frame.get(ip)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let l4 = ip + usize::from(vihl & 0x0f) * 4;
    let l4_len = match *frame.get(ip + 9)? {
        17 => 8,
        6 => usize::from(*frame.get(l4 + 12)? >> 4) * 4,
        _ => return None,
    };
    Signature::decode(frame.get(l4 + l4_len..)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{SlicedPacket, TransportSlice};

    fn spec(proto: Proto, size: usize) -> TrafficSpec {
        TrafficSpec {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(10, 1, 0, 5),
            src_ips: 1,
            dst_ip: Ipv4Addr::new(10, 1, 0, 100),
            proto,
            frame_size: size,
            flows: 200_000,
            sport: 1024,
            dport: 5000,
        }
    }

    #[test]
    fn signature_round_trip_and_field_limits() {
        let s = Signature {
            warmup: true,
            flow: MAX_FLOWS - 1,
            seq: (1 << 40) - 1,
            tx_ts: 0x0123_4567_89ab_cdef,
        };
        assert_eq!(Signature::decode(&s.encode()), Some(s));
        let s2 = Signature {
            warmup: false,
            flow: 7,
            seq: 3,
            tx_ts: 9,
        };
        let b = s2.encode();
        assert_eq!(&b[..2], b"PX");
        assert_eq!(&b[2..5], &[0, 0, 7]);
        assert_eq!(&b[5..10], &[0, 0, 0, 0, 3]);
        assert_eq!(Signature::decode(&b), Some(s2));
        assert_eq!(Signature::decode(&b[..17]), None);
        let mut bad = b;
        bad[0] = b'Q';
        assert_eq!(Signature::decode(&bad), None);
    }

    #[test]
    fn frames_are_valid_and_carry_their_signature() {
        // One source, and 1 000 from an address whose low word is about to
        // carry into the high one.
        let sources = [
            (1, Ipv4Addr::new(10, 1, 0, 5)),
            (1000, Ipv4Addr::new(10, 1, 255, 200)),
        ];
        for ((proto, size), (n, first)) in [
            (Proto::Udp, 64),
            (Proto::Udp, 1518),
            (Proto::TcpSyn, 76),
            (Proto::TcpSyn, 512),
        ]
        .into_iter()
        .flat_map(|p| sources.map(|s| (p, s)))
        {
            let t = Template::new(&TrafficSpec {
                src_ip: first,
                src_ips: n,
                ..spec(proto, size)
            })
            .unwrap();
            assert_eq!(t.len(), size - 4);
            let mut buf = vec![0u8; t.len()];
            for flow in [0u32, 1, 63_999, 64_000, 199_999] {
                let sig = Signature {
                    warmup: false,
                    flow,
                    seq: u64::from(flow) * 3 + 1,
                    tx_ts: 0xdead_beef_0000 + u64::from(flow),
                };
                assert!(t.write(&mut buf, &sig));
                let p = SlicedPacket::from_ethernet(&buf).unwrap();
                let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                    panic!("not ipv4")
                };
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                let src = u32::from(first) + flow % n;
                assert_eq!(h.source, src.to_be_bytes(), "flow {flow} of {n} sources");
                let j = flow / n;
                let (sp, dp) = (1024 + (j % 64_000) as u16, 5000 + (j / 64_000) as u16);
                match p.transport.unwrap() {
                    TransportSlice::Udp(u) => {
                        assert_eq!((u.source_port(), u.destination_port()), (sp, dp));
                        let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                        assert_eq!(u.checksum(), want, "{proto:?} flow {flow}");
                    }
                    TransportSlice::Tcp(tc) => {
                        assert!(tc.syn() && !tc.ack());
                        assert_eq!((tc.source_port(), tc.destination_port()), (sp, dp));
                        let want = tc.to_header().calc_checksum_ipv4(&h, tc.payload()).unwrap();
                        assert_eq!(tc.checksum(), want, "{proto:?} flow {flow}");
                    }
                    other => panic!("unexpected {other:?}"),
                }
                assert_eq!(find_signature(&buf), Some(sig));
            }
            let sig = Signature {
                warmup: false,
                flow: 0,
                seq: 0,
                tx_ts: 0,
            };
            assert!(!t.write(&mut buf[..10], &sig), "a short buffer is refused");
        }
    }

    #[test]
    fn bad_specs_are_refused_with_the_limit() {
        let e = Template::new(&TrafficSpec {
            src_ip: Ipv4Addr::new(255, 255, 255, 0),
            src_ips: 300,
            ..spec(Proto::Udp, 64)
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "source addresses 300 from 255.255.255.0: must be 1 to 256"
        );
        let e = Template::new(&spec(Proto::TcpSyn, 64)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "frame size 64: must be 76 to 1518 bytes (FCS included) for TcpSyn"
        );
        assert!(Template::new(&spec(Proto::Udp, 1519)).is_err());
        let mut s = spec(Proto::Udp, 64);
        s.flows = 0;
        assert!(matches!(Template::new(&s), Err(SpecError::Flows { .. })));
        s.flows = MAX_FLOWS + 1;
        assert!(matches!(Template::new(&s), Err(SpecError::Flows { .. })));
    }

    #[test]
    fn foreign_frames_have_no_signature() {
        assert_eq!(find_signature(&[]), None);
        assert_eq!(find_signature(&[0u8; 60]), None);
        let t = Template::new(&spec(Proto::Udp, 64)).unwrap();
        let mut buf = vec![0u8; t.len()];
        let sig = Signature {
            warmup: false,
            flow: 1,
            seq: 2,
            tx_ts: 3,
        };
        t.write(&mut buf, &sig);
        // With an 802.1Q tag in front of the IPv4 header it is still found.
        let mut tagged = buf[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&buf[12..]);
        assert_eq!(find_signature(&tagged), Some(sig));
        // An ARP frame, a truncated frame: none.
        buf[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(find_signature(&buf), None);
        assert_eq!(find_signature(&tagged[..50]), None);
    }
}
