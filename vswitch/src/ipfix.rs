//! IPFIX (RFC 7011) messages of flow-log records: templates, options
//! templates naming the interfaces and VRFs, and data records.
//!
//! Written here rather than taken from a crate: the crates on crates.io
//! parse IPFIX (collectors), and none encodes templates and variable-length
//! fields for an exporter; an encoder is a few big-endian writes.
//!
//! A record is one direction of a flow, as NetFlow and IPFIX exporters
//! (VPP's flowprobe, OVS) make them, with its direction in the connection
//! (`biflowDirection`), its address translation (the post-NAT elements),
//! the switch ports it came in and went out by (`ingressInterface`,
//! `egressInterface`: port number + 1, 0 for none, as for a denied packet),
//! its vnet (`ingressVRFID`: vnet number + 1), its decision
//! (`forwardingStatus`, `firewallEvent`) and the security-group rules that
//! decided it. No element of the IANA registry names a rule, so those four
//! are enterprise-specific (strings, under the exporter's enterprise
//! number): the source VM's group and outbound rule, the destination VM's
//! group and inbound rule.

use std::net::IpAddr;

/// The IPFIX version number.
pub const VERSION: u16 = 10;
/// Template ID of IPv4 flow records.
pub const TEMPLATE_V4: u16 = 256;
/// Template ID of IPv6 flow records.
pub const TEMPLATE_V6: u16 = 257;
/// Options template ID of interface names.
pub const TEMPLATE_IFNAME: u16 = 258;
/// Options template ID of VRF (vnet) names.
pub const TEMPLATE_VRFNAME: u16 = 259;
/// The enterprise-specific elements: the source's group and rule, the
/// destination's group and rule.
pub const ELEMENT_SRC_GROUP: u16 = 1;
/// See [`ELEMENT_SRC_GROUP`].
pub const ELEMENT_SRC_RULE: u16 = 2;
/// See [`ELEMENT_SRC_GROUP`].
pub const ELEMENT_DST_GROUP: u16 = 3;
/// See [`ELEMENT_SRC_GROUP`].
pub const ELEMENT_DST_RULE: u16 = 4;
/// Variable length, in a template.
const VARLEN: u16 = 65535;
/// Message header: version, length, export time, sequence, domain.
const HEADER: usize = 16;

/// `flowEndReason` values (RFC 7011's registry).
pub mod end_reason {
    /// Idle timeout.
    pub const IDLE: u8 = 1;
    /// Active timeout.
    pub const ACTIVE: u8 = 2;
    /// End of flow detected (FIN, RST).
    pub const END: u8 = 3;
    /// Forced end.
    pub const FORCED: u8 = 4;
}

/// `forwardingStatus` values (RFC 7270): forwarded, and dropped for an ACL
/// deny.
pub mod forwarding {
    /// Forwarded, reason unknown.
    pub const FORWARDED: u8 = 64;
    /// Dropped: ACL deny.
    pub const ACL_DENY: u8 = 129;
}

/// `firewallEvent` values (RFC 7011's registry).
pub mod firewall_event {
    /// Flow deleted.
    pub const DELETED: u8 = 2;
    /// Flow denied.
    pub const DENIED: u8 = 3;
    /// Flow update.
    pub const UPDATE: u8 = 5;
}

/// One data record, its values resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// First packet (ms since the Unix epoch).
    pub start_ms: u64,
    /// Last packet (ms since the Unix epoch).
    pub end_ms: u64,
    /// IP octets.
    pub octets: u64,
    /// Packets.
    pub packets: u64,
    /// Source address and port as received.
    pub src: (IpAddr, u16),
    /// Destination address and port as received.
    pub dst: (IpAddr, u16),
    /// IP protocol.
    pub proto: u8,
    /// Source after the switch's translation.
    pub post_src: (IpAddr, u16),
    /// Destination after the switch's translation.
    pub post_dst: (IpAddr, u16),
    /// Interface in (port + 1).
    pub in_if: u32,
    /// Interface out (port + 1; 0: none).
    pub out_if: u32,
    /// VRF (vnet + 1; 0: none).
    pub vrf: u32,
    /// `flowEndReason`.
    pub end_reason: u8,
    /// True for the direction that opened the connection.
    pub initiator: bool,
    /// `forwardingStatus`.
    pub forwarding: u8,
    /// `firewallEvent`.
    pub firewall_event: u8,
    /// The source's group and rule, the destination's group and rule
    /// (empty where none).
    pub rules: [&'a str; 4],
}

/// Elements of the flow templates: (id, length), the addresses' lengths
/// those of the family; the enterprise-specific ones after them.
fn flow_elements(v6: bool) -> [(u16, u16); 20] {
    let a = if v6 { 16 } else { 4 };
    let (src, dst, post_src, post_dst) = if v6 {
        (27, 28, 281, 282)
    } else {
        (8, 12, 225, 226)
    };
    [
        (152, 8), // flowStartMilliseconds
        (153, 8), // flowEndMilliseconds
        (1, 8),   // octetDeltaCount
        (2, 8),   // packetDeltaCount
        (src, a),
        (dst, a),
        (7, 2),  // sourceTransportPort
        (11, 2), // destinationTransportPort
        (4, 1),  // protocolIdentifier
        (post_src, a),
        (post_dst, a),
        (227, 2), // postNAPTSourceTransportPort
        (228, 2), // postNAPTDestinationTransportPort
        (10, 4),  // ingressInterface
        (14, 4),  // egressInterface
        (234, 4), // ingressVRFID
        (136, 1), // flowEndReason
        (239, 1), // biflowDirection
        (89, 1),  // forwardingStatus (reduced-size encoding)
        (233, 1), // firewallEvent
    ]
}

/// An exporter's state: its observation domain, enterprise number, and
/// the sequence number (data records sent so far, RFC 7011 section 3.1).
#[derive(Debug, Clone)]
pub struct Exporter {
    domain: u32,
    enterprise: u32,
    sequence: u32,
    /// Largest message (bytes).
    max: usize,
}

impl Exporter {
    /// An exporter for observation domain `domain`, its own elements under
    /// private enterprise number `enterprise`, messages of at most `max`
    /// bytes (at least 512).
    pub fn new(domain: u32, enterprise: u32, max: usize) -> Exporter {
        Exporter {
            domain,
            enterprise,
            sequence: 0,
            max: max.clamp(512, usize::from(u16::MAX)),
        }
    }

    /// Data records sent so far.
    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    /// Messages at `export_s` (seconds since the Unix epoch) holding the
    /// flow templates and the options templates, then the names of the
    /// interfaces (`(interface, name)`) and VRFs as data of the latter
    /// (data records: they count in the sequence), as many a message as
    /// fit in the largest size.
    pub fn templates(
        &mut self,
        export_s: u32,
        ifs: &[(u32, &str)],
        vrfs: &[(u32, &str)],
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut m = self.header(export_s);
        // Template set.
        let set = begin_set(&mut m, 2);
        for (id, v6) in [(TEMPLATE_V4, false), (TEMPLATE_V6, true)] {
            let els = flow_elements(v6);
            put16(&mut m, id);
            put16(&mut m, (els.len() + 4) as u16);
            for (e, len) in els {
                put16(&mut m, e);
                put16(&mut m, len);
            }
            for e in [
                ELEMENT_SRC_GROUP,
                ELEMENT_SRC_RULE,
                ELEMENT_DST_GROUP,
                ELEMENT_DST_RULE,
            ] {
                put16(&mut m, e | 0x8000);
                put16(&mut m, VARLEN);
                m.extend_from_slice(&self.enterprise.to_be_bytes());
            }
        }
        end_set(&mut m, set);
        // Options template set: interface names (scope ingressInterface,
        // interfaceName), VRF names (scope ingressVRFID, VRFname).
        let set = begin_set(&mut m, 3);
        for (id, scope, name) in [(TEMPLATE_IFNAME, 10, 82), (TEMPLATE_VRFNAME, 234, 236)] {
            put16(&mut m, id);
            put16(&mut m, 2); // fields
            put16(&mut m, 1); // scope fields
            put16(&mut m, scope);
            put16(&mut m, 4);
            put16(&mut m, name);
            put16(&mut m, VARLEN);
        }
        end_set(&mut m, set);
        let mut rec = Vec::with_capacity(4 + MAX_STR + 3);
        for (id, names) in [(TEMPLATE_IFNAME, ifs), (TEMPLATE_VRFNAME, vrfs)] {
            let mut set = None;
            for (n, name) in names {
                rec.clear();
                rec.extend_from_slice(&n.to_be_bytes());
                put_str(&mut rec, name);
                let set_room = if set.is_some() { 0 } else { 4 };
                if m.len() + set_room + rec.len() > self.max {
                    if let Some(at) = set.take() {
                        end_set(&mut m, at);
                    }
                    finish(&mut m);
                    out.push(std::mem::replace(&mut m, self.header(export_s)));
                }
                if set.is_none() {
                    set = Some(begin_set(&mut m, id));
                }
                m.extend_from_slice(&rec);
                self.sequence = self.sequence.wrapping_add(1);
            }
            if let Some(at) = set {
                end_set(&mut m, at);
            }
        }
        finish(&mut m);
        out.push(m);
        out
    }

    /// Messages at `export_s` holding `records` (as many a message as fit
    /// in the largest size), numbered on from the records sent before;
    /// each with how many records it holds.
    pub fn data(&mut self, export_s: u32, records: &[Record<'_>]) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut held = 0;
        let mut m = self.header(export_s);
        let mut set: Option<(u16, usize)> = None;
        let mut rec = Vec::with_capacity(256);
        for r in records {
            rec.clear();
            let id = encode(&mut rec, r);
            let set_room = if set.is_some_and(|(s, _)| s == id) {
                0
            } else {
                4
            };
            if m.len() + set_room + rec.len() > self.max && m.len() > HEADER {
                if let Some((_, at)) = set.take() {
                    end_set(&mut m, at);
                }
                finish(&mut m);
                let full = std::mem::replace(&mut m, self.header(export_s));
                out.push((full, std::mem::take(&mut held)));
            }
            if set.is_none_or(|(s, _)| s != id) {
                if let Some((_, at)) = set.take() {
                    end_set(&mut m, at);
                }
                set = Some((id, begin_set(&mut m, id)));
            }
            m.extend_from_slice(&rec);
            held += 1;
            self.sequence = self.sequence.wrapping_add(1);
        }
        if let Some((_, at)) = set {
            end_set(&mut m, at);
        }
        if held > 0 {
            finish(&mut m);
            out.push((m, held));
        }
        out
    }

    /// A message header; its length is written by [`finish`]. The
    /// sequence number is that of the message's first data record.
    fn header(&self, export_s: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.max);
        put16(&mut m, VERSION);
        put16(&mut m, 0);
        m.extend_from_slice(&export_s.to_be_bytes());
        m.extend_from_slice(&self.sequence.to_be_bytes());
        m.extend_from_slice(&self.domain.to_be_bytes());
        m
    }
}

/// Writes `r`'s data record into `out`; returns its template's ID.
fn encode(out: &mut Vec<u8>, r: &Record<'_>) -> u16 {
    let v6 = [r.src.0, r.dst.0, r.post_src.0, r.post_dst.0]
        .iter()
        .any(IpAddr::is_ipv6);
    let addr = |out: &mut Vec<u8>, a: IpAddr| match (v6, a) {
        (false, IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
        (true, IpAddr::V4(a)) => out.extend_from_slice(&a.to_ipv6_mapped().octets()),
        (_, IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
    };
    out.extend_from_slice(&r.start_ms.to_be_bytes());
    out.extend_from_slice(&r.end_ms.to_be_bytes());
    out.extend_from_slice(&r.octets.to_be_bytes());
    out.extend_from_slice(&r.packets.to_be_bytes());
    addr(out, r.src.0);
    addr(out, r.dst.0);
    put16(out, r.src.1);
    put16(out, r.dst.1);
    out.push(r.proto);
    addr(out, r.post_src.0);
    addr(out, r.post_dst.0);
    put16(out, r.post_src.1);
    put16(out, r.post_dst.1);
    out.extend_from_slice(&r.in_if.to_be_bytes());
    out.extend_from_slice(&r.out_if.to_be_bytes());
    out.extend_from_slice(&r.vrf.to_be_bytes());
    out.push(r.end_reason);
    // biflowDirection: 1 initiator, 2 reverse initiator.
    out.push(if r.initiator { 1 } else { 2 });
    out.push(r.forwarding);
    out.push(r.firewall_event);
    for s in r.rules {
        put_str(out, s);
    }
    if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 }
}

fn put16(m: &mut Vec<u8>, v: u16) {
    m.extend_from_slice(&v.to_be_bytes());
}

/// The longest string sent (bytes): a record with four of them stays well
/// within a message.
const MAX_STR: usize = 250;

/// A variable-length string (RFC 7011 section 7): its length in one byte
/// (it is cut to [`MAX_STR`] bytes at a character boundary).
fn put_str(m: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let b = s.as_bytes().get(..end).unwrap_or_default();
    m.push(b.len() as u8);
    m.extend_from_slice(b);
}

/// Starts a set with ID `id`; returns where it starts.
fn begin_set(m: &mut Vec<u8>, id: u16) -> usize {
    let at = m.len();
    put16(m, id);
    put16(m, 0);
    at
}

/// Writes the length of the set that starts at `at`.
fn end_set(m: &mut [u8], at: usize) {
    let len = (m.len() - at) as u16;
    if let Some(l) = m.get_mut(at + 2..at + 4) {
        l.copy_from_slice(&len.to_be_bytes());
    }
}

/// Writes the message's length into its header.
fn finish(m: &mut [u8]) {
    let len = m.len() as u16;
    if let Some(l) = m.get_mut(2..4) {
        l.copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn record(src: IpAddr, rule: &str) -> Record<'_> {
        Record {
            start_ms: 1_000,
            end_ms: 2_000,
            octets: 300,
            packets: 3,
            src: (src, 40000),
            dst: (IpAddr::V4(Ipv4Addr::new(10, 1, 0, 100)), 80),
            proto: 6,
            post_src: (src, 40000),
            post_dst: (IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4)), 8000),
            in_if: 4,
            out_if: 1,
            vrf: 1,
            end_reason: end_reason::END,
            initiator: true,
            forwarding: forwarding::FORWARDED,
            firewall_event: firewall_event::DELETED,
            rules: ["", "", "web", rule],
        }
    }

    fn u16_at(m: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([m[at], m[at + 1]])
    }

    /// The sets of message `m`: (set ID, body).
    fn sets(m: &[u8]) -> Vec<(u16, &[u8])> {
        assert_eq!(u16_at(m, 0), VERSION);
        assert_eq!(usize::from(u16_at(m, 2)), m.len());
        let mut out = Vec::new();
        let mut at = HEADER;
        while at < m.len() {
            let len = usize::from(u16_at(m, at + 2));
            assert!(len >= 4 && at + len <= m.len());
            out.push((u16_at(m, at), &m[at + 4..at + len]));
            at += len;
        }
        out
    }

    #[test]
    fn a_record_is_laid_out_as_its_template_says() {
        let mut x = Exporter::new(7, 32473, 1400);
        let t = x.templates(99, &[(1, "dip1")], &[(1, "a")]);
        assert_eq!(t.len(), 1);
        let s = sets(&t[0]);
        assert_eq!(
            s.iter().map(|s| s.0).collect::<Vec<_>>(),
            [2, 3, TEMPLATE_IFNAME, TEMPLATE_VRFNAME]
        );
        // The IPv4 template: its ID, 24 fields, the first is the start.
        assert_eq!((u16_at(s[0].1, 0), u16_at(s[0].1, 2)), (TEMPLATE_V4, 24));
        assert_eq!(u16_at(s[0].1, 4), 152);
        // The interface name: 1, then "dip1".
        assert_eq!(s[2].1, [0, 0, 0, 1, 4, b'd', b'i', b'p', b'1']);
        let msgs = x.data(
            100,
            &[record(
                IpAddr::V4(Ipv4Addr::new(10, 1, 0, 10)),
                "allow-http",
            )],
        );
        assert_eq!(msgs.len(), 1);
        let (m, held) = &msgs[0];
        assert_eq!(*held, 1);
        // Export time, sequence 2 (the names are data records), domain 7.
        assert_eq!(&m[4..16], &[0, 0, 0, 100, 0, 0, 0, 2, 0, 0, 0, 7]);
        let s = sets(m);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, TEMPLATE_V4);
        let d = s[0].1;
        // Fixed part: the template's lengths add up to 73.
        let fixed: u16 = flow_elements(false).iter().map(|e| e.1).sum();
        assert_eq!(fixed, 73);
        assert_eq!(&d[16..24], &300u64.to_be_bytes());
        assert_eq!(&d[32..36], &[10, 1, 0, 10]);
        assert_eq!(&d[49..53], &[10, 1, 0, 4]);
        // Strings after the fixed part: "", "", "web", "allow-http".
        assert_eq!(&d[73..79], &[0, 0, 3, b'w', b'e', b'b']);
        assert_eq!(d[79], 10);
        assert_eq!(d.len(), 73 + 6 + 11);
        assert_eq!(x.sequence(), 3);
    }

    #[test]
    fn families_get_their_sets_and_messages_stay_under_the_size() {
        let mut x = Exporter::new(1, 32473, 600);
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 10));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let long = "r".repeat(300);
        let rs: Vec<_> = (0..20)
            .map(|i| {
                record(
                    if i % 3 == 0 { v6 } else { v4 },
                    if i == 5 { &long } else { "x" },
                )
            })
            .collect();
        let msgs = x.data(1, &rs);
        assert!(msgs.len() > 1);
        let mut seen = 0;
        for (m, held) in &msgs {
            assert!(m.len() <= 600, "{}", m.len());
            let before = seen;
            for (id, _) in sets(m) {
                assert!(id == TEMPLATE_V4 || id == TEMPLATE_V6);
            }
            // The sequence in each header counts the records before it.
            assert_eq!(u32::from_be_bytes([m[8], m[9], m[10], m[11]]), seen);
            seen += sets(m)
                .iter()
                .map(|(id, body)| {
                    let mut n = 0;
                    let mut at = 0;
                    let fixed: usize = flow_elements(*id == TEMPLATE_V6)
                        .iter()
                        .map(|e| usize::from(e.1))
                        .sum();
                    while at < body.len() {
                        at += fixed;
                        for _ in 0..4 {
                            // (Names are cut to 250 bytes: one length byte.)
                            assert!(body[at] <= 250);
                            at += 1 + usize::from(body[at]);
                        }
                        n += 1;
                    }
                    n
                })
                .sum::<u32>();
            assert_eq!(u64::from(seen - before), *held);
        }
        assert_eq!(seen, 20);
        assert_eq!(x.sequence(), 20);
    }

    #[test]
    fn many_names_take_several_messages() {
        let mut x = Exporter::new(1, 32473, 600);
        let names: Vec<String> = (0..40).map(|i| format!("{i:0>50}")).collect();
        let ifs: Vec<(u32, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (i as u32 + 1, n.as_str()))
            .collect();
        let msgs = x.templates(1, &ifs, &[(1, "a")]);
        assert!(msgs.len() > 3, "{}", msgs.len());
        let mut seen = 0;
        for (i, m) in msgs.iter().enumerate() {
            assert!(m.len() <= 600, "{}", m.len());
            assert_eq!(u32::from_be_bytes([m[8], m[9], m[10], m[11]]), seen);
            for (id, body) in sets(m) {
                match id {
                    2 | 3 => assert_eq!(i, 0, "templates come first"),
                    TEMPLATE_IFNAME => seen += (body.len() / (4 + 1 + 50)) as u32,
                    TEMPLATE_VRFNAME => seen += 1,
                    _ => panic!("set {id}"),
                }
            }
        }
        assert_eq!((seen, x.sequence()), (41, 41));
    }
}
