//! Differential fuzzing of the frame parser against etherparse (a parser
//! nobody here wrote): on every frame both read as Ethernet (with at most
//! one VLAN tag) carrying IPv4 or IPv6, they must agree on the addresses,
//! the protocol, the fragment fields, the transport ports and where the
//! transport header starts; a frame etherparse accepts, pollux accepts
//! (except where pollux is stricter on purpose, named below), and where
//! etherparse refuses a frame, pollux has found no whole unfragmented TCP
//! or UDP packet in it.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run parse_vs_etherparse` from the
//! repository root (see docs/fuzzing.md).
#![no_main]

use dataplane::{L3, parse};
use etherparse::{Ipv6ExtensionSlice, LinkExtSlice, NetSlice, SlicedPacket, TransportSlice};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

fuzz_target!(|frame: &[u8]| {
    let mine = parse(frame, 0);
    let theirs = match SlicedPacket::from_ethernet(frame) {
        Ok(t) => t,
        Err(e) => {
            // Refused by etherparse: pollux must not have found a whole
            // unfragmented TCP or UDP packet there.
            if let Ok(p) = &mine {
                let tcp_udp = matches!(p.key.proto, 6 | 17);
                assert!(
                    !(p.has_l4 && tcp_udp && !p.frag.is_first() && p.vlan.is_none()),
                    "pollux accepts what etherparse refuses ({e}): {p:?} {frame:02x?}"
                );
            }
            return;
        }
    };
    // Only what both read the same way: Ethernet II with at most one VLAN
    // tag (pollux walks one, with TPID 0x8100 or 0x88a8; etherparse also
    // takes the old 0x9100 and 0x9200).
    let vlans = theirs.link_exts.len();
    if vlans > 1 || theirs.link_exts.iter().any(|e| !matches!(e, LinkExtSlice::Vlan(_))) {
        return;
    }
    let tpid = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    if vlans == 1 && !matches!(tpid, Some(0x8100 | 0x88a8)) {
        return;
    }
    let Some(net) = &theirs.net else { return };
    // A first fragment's header (offset 0, more fragments) followed by a
    // later fragment's.
    let mut first_then_later = false;
    let (src, dst, proto, frag): (IpAddr, IpAddr, u8, (u32, u16, bool)) = match net {
        NetSlice::Ipv4(v4) => {
            let h = v4.header();
            // IPv4's authentication header (protocol 51): etherparse reads
            // through it to the transport; pollux keys such a packet by
            // protocol 51 and looks no further, as it does ESP.
            if h.protocol().0 == 51 {
                return;
            }
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                h.protocol().0,
                (
                    u32::from(h.identification()),
                    h.fragments_offset().value(),
                    h.more_fragments(),
                ),
            )
        }
        NetSlice::Ipv6(v6) => {
            let h = v6.header();
            // etherparse lists every extension header it can read, past a
            // fragment header with an offset too (whose payload is the
            // datagram's middle, no header); pollux stops there, with that
            // header's next header as the protocol, and its fields. Before
            // it, of several fragment headers the first that fragments the
            // packet counts (an atomic fragment's, offset 0 and no more
            // fragments, RFC 6946, gives way to the next).
            let mut frag = (0, 0, false);
            let mut proto = v6.payload().ip_number.0;
            for e in v6.extensions().clone().into_iter() {
                if let Ipv6ExtensionSlice::Fragment(f) = e {
                    let later = f.fragment_offset().value() != 0;
                    first_then_later |= later && frag.1 == 0 && frag.2;
                    if later || (frag.1 == 0 && !frag.2) {
                        frag = (
                            f.identification(),
                            f.fragment_offset().value(),
                            f.more_fragments(),
                        );
                    }
                    if later {
                        proto = f.next_header().0;
                        break;
                    }
                }
            }
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                proto,
                frag,
            )
        }
        NetSlice::Arp(_) => return,
    };
    let p = match mine {
        Ok(p) => p,
        // Where pollux is stricter, on purpose: a UDP length of 0 (RFC 768
        // allows none below 8; etherparse reads 0 as "to the end", as for
        // IPv6 jumbograms).
        Err(dataplane::ParseError::UdpBadLength)
            if matches!(&theirs.transport, Some(TransportSlice::Udp(u)) if u.length() == 0) =>
        {
            return;
        }
        // An IPv6 address in IPv4-mapped form: a flow key could not tell it
        // from IPv4, so pollux refuses the packet.
        Err(dataplane::ParseError::Ipv6V4Mapped)
            if [src, dst]
                .iter()
                .any(|a| matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())) =>
        {
            return;
        }
        // An IPv6 payload length of 0: a jumbogram's (RFC 2675), which
        // etherparse reads to the frame's end, whatever header follows
        // (a hop-by-hop one or not); pollux refuses it (no Ethernet link
        // carries one), for the header it then finds truncated.
        Err(_) if matches!(net, NetSlice::Ipv6(v6) if v6.header().payload_length() == 0) => {
            return;
        }
        // A first fragment whose header chain ends in a later fragment's
        // header: its upper-layer header is elsewhere, and pollux refuses
        // it (RFC 7112); etherparse reads the headers it has.
        Err(dataplane::ParseError::Ipv6FirstFragmentIncomplete) if first_then_later => return,
        // More than eight extension headers: pollux's walk is bounded, and
        // refuses the rest; etherparse reads on.
        Err(dataplane::ParseError::Ipv6TooManyExt) => return,
        // A first fragment too short for its transport header (the "tiny
        // fragment" of RFC 1858): etherparse does not look into fragments.
        Err(_) if frag.1 == 0 && frag.2 && theirs.transport.is_none() => return,
        Err(e) => panic!("etherparse accepts what pollux refuses ({e:?}): {frame:02x?}"),
    };
    assert!(matches!(p.l3, L3::Ipv4 | L3::Ipv6), "{p:?}");
    assert_eq!((p.key.src(), p.key.dst(), p.key.proto), (src, dst, proto));
    assert_eq!((p.frag.id, p.frag.offset, p.frag.more), frag, "{p:?}");
    let at = |s: &[u8]| s.as_ptr() as usize - frame.as_ptr() as usize;
    match &theirs.transport {
        Some(TransportSlice::Tcp(t)) => {
            assert!(p.has_l4);
            assert_eq!((p.key.src_port, p.key.dst_port), (t.source_port(), t.destination_port()));
            assert_eq!(usize::from(p.l4_off), at(t.slice()));
        }
        Some(TransportSlice::Udp(u)) => {
            assert!(p.has_l4);
            assert_eq!((p.key.src_port, p.key.dst_port), (u.source_port(), u.destination_port()));
            assert_eq!(usize::from(p.l4_off), at(u.slice()));
        }
        _ => {}
    }
});
