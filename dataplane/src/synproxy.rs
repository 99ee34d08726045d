//! The TCP segments a SYN proxy writes: it answers a client's SYN itself
//! (a SYN-ACK carrying a cookie), turns the client's ACK into the SYN it
//! sends the server, and answers the server's SYN-ACK with the ACK that
//! completes the server's handshake. Each is written over the frame of the
//! segment that caused it, so nothing is allocated.
//!
//! Policy (when to proxy, the cookie, the sequence offset of the
//! connection) lives in the load balancer; this module only reads and
//! writes headers. The segments it writes carry one option at most, the
//! MSS: no window scaling, SACK or timestamps, whose values the cookie
//! could not carry.

use crate::buf::PacketBuf;
use crate::key::PROTO_TCP;
use crate::parse::{L3, Parsed};
use crate::rewrite::RewriteError;
use crate::wire::{MacAddr, checksum, tcp};

/// The TCP header fields a SYN proxy reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seg {
    /// Flags (the 13th byte of the header).
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Window (unscaled).
    pub window: u16,
    /// The MSS option, if present.
    pub mss: Option<u16>,
}

impl Seg {
    /// A header of which only the flags are known (numbers zero).
    pub fn with_flags(flags: u8) -> Self {
        Seg {
            flags,
            ..Seg::default()
        }
    }
}

/// The MSS option's kind and length.
const OPT_MSS: [u8; 2] = [2, 4];

/// Reads the TCP header of `frame` (parsed as `p`): `None` when it has no
/// TCP header (not TCP, a later fragment, or cut short).
pub fn read(frame: &[u8], p: &Parsed) -> Option<Seg> {
    if p.key.proto != PROTO_TCP || !p.has_l4 {
        return None;
    }
    let l4 = usize::from(p.l4_off);
    let h = frame.get(l4..l4 + tcp::MIN_HEADER_LEN)?;
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let hlen = usize::from(h[12] >> 4) * 4;
    let opts = frame
        .get(l4 + tcp::MIN_HEADER_LEN..l4 + hlen.max(tcp::MIN_HEADER_LEN))
        .unwrap_or(&[]);
    Some(Seg {
        flags: h[13],
        seq: be32(4),
        ack: be32(8),
        window: u16::from_be_bytes([h[14], h[15]]),
        mss: mss_option(opts),
    })
}

/// The bytes of data a TCP segment carries (after its header), if it has
/// a TCP header.
pub fn payload_len(frame: &[u8], p: &Parsed) -> Option<usize> {
    if p.key.proto != PROTO_TCP || !p.has_l4 {
        return None;
    }
    let off = frame.get(usize::from(p.l4_off) + 12)?;
    usize::from(p.l4_len).checked_sub(usize::from(off >> 4) * 4)
}

/// The MSS option among `opts` (the bytes after the fixed header).
fn mss_option(opts: &[u8]) -> Option<u16> {
    let mut i = 0;
    while let Some(&kind) = opts.get(i) {
        match kind {
            0 => return None,
            1 => i += 1,
            _ => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == OPT_MSS[0] && len == 4 {
                    let v = opts.get(i + 2..i + 4)?;
                    return Some(u16::from_be_bytes([v[0], v[1]]));
                }
                i += len;
            }
        }
    }
    None
}

/// Which way the written segment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Onward, to where the frame was going (the caller then routes it and
    /// applies its NAT).
    Onward,
    /// Back to the sender, from `MacAddr` (addresses and ports swapped,
    /// TTL or hop limit 64).
    Back(MacAddr),
}

/// Rewrites `pkt`, a TCP segment parsed as `p` with no IPv4 options or
/// IPv6 extension headers, into a segment with the header `seg` and no
/// payload, going `way`. IP length and checksums are recomputed; the
/// frame is trimmed or grown to fit.
pub fn write<B: PacketBuf>(
    pkt: &mut B,
    p: &Parsed,
    way: Way,
    seg: &Seg,
) -> Result<(), RewriteError> {
    if p.key.proto != PROTO_TCP || !p.has_l4 || p.frag.is_later() {
        return Err(RewriteError::NoPorts);
    }
    let (l3, l4) = (usize::from(p.l3_off), usize::from(p.l4_off));
    let v6 = match p.l3 {
        L3::Ipv4 if l4 == l3 + 20 => false,
        L3::Ipv6 if l4 == l3 + 40 => true,
        _ => return Err(RewriteError::Mismatch),
    };
    let hlen = tcp::MIN_HEADER_LEN + if seg.mss.is_some() { 4 } else { 0 };
    let want = l4 + hlen;
    let len = pkt.len();
    if len < l4 + tcp::MIN_HEADER_LEN {
        return Err(RewriteError::Mismatch);
    }
    if len < want {
        pkt.append(want - len).map_err(|_| RewriteError::Mismatch)?;
    } else if len > want {
        pkt.trim(len - want).map_err(|_| RewriteError::Mismatch)?;
    }
    let f = pkt.data_mut();
    if let Way::Back(mac) = way {
        let (dst, src) = f.split_at_mut(6);
        dst.swap_with_slice(src.get_mut(..6).ok_or(RewriteError::Mismatch)?);
        f.get_mut(6..12)
            .ok_or(RewriteError::Mismatch)?
            .copy_from_slice(&mac.0);
    }
    let back = matches!(way, Way::Back(_));
    let (ip, t) = f.split_at_mut(l4);
    let ip = ip.get_mut(l3..).ok_or(RewriteError::Mismatch)?;
    let t = t.get_mut(..hlen).ok_or(RewriteError::Mismatch)?;
    let pseudo = if v6 {
        if back {
            let (s, d) = ip[8..40].split_at_mut(16);
            s.swap_with_slice(d);
            ip[7] = 64;
        }
        ip[4..6].copy_from_slice(&(hlen as u16).to_be_bytes());
        let a = |at: usize| -> [u8; 16] {
            let mut x = [0u8; 16];
            x.copy_from_slice(&ip[at..at + 16]);
            x
        };
        checksum::pseudo_v6(a(8), a(24), PROTO_TCP, hlen as u32)
    } else {
        if back {
            let (s, d) = ip[12..20].split_at_mut(4);
            s.swap_with_slice(d);
            ip[8] = 64;
        }
        ip[2..4].copy_from_slice(&((20 + hlen) as u16).to_be_bytes());
        // Not a fragment any more (it has no payload); DF as the kernel
        // sends its handshake.
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
        ip[10..12].fill(0);
        let c = checksum::checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let a = |at: usize| [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]];
        checksum::pseudo_v4(a(12), a(16), PROTO_TCP, hlen as u16)
    };
    if back {
        let (s, d) = t[0..4].split_at_mut(2);
        s.swap_with_slice(d);
    }
    t[4..8].copy_from_slice(&seg.seq.to_be_bytes());
    t[8..12].copy_from_slice(&seg.ack.to_be_bytes());
    t[12] = ((hlen / 4) as u8) << 4;
    t[13] = seg.flags;
    t[14..16].copy_from_slice(&seg.window.to_be_bytes());
    t[16..20].fill(0);
    if let Some(m) = seg.mss {
        t[20..22].copy_from_slice(&OPT_MSS);
        t[22..24].copy_from_slice(&m.to_be_bytes());
    }
    let c = !checksum::fold(checksum::combine(pseudo, checksum::sum(t)));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::BufAlloc;
    use crate::parse::parse;
    use crate::pool::{HugePages, Pool, PoolConfig};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn pool() -> Pool {
        let mut cfg = PoolConfig::new("synproxy", 8);
        cfg.huge = HugePages::Never;
        Pool::new(&cfg).unwrap()
    }

    fn syn_v4(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([192, 0, 2, 1], [10, 1, 0, 100], 61)
            .tcp(40000, 80, 1000, 64240)
            .syn()
            .options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
                etherparse::TcpOptionElement::WindowScale(7),
            ])
            .unwrap();
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    fn syn_v6() -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([0xfd; 16], [0xfe; 16], 61)
            .tcp(40000, 80, 1000, 64240)
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1440)])
            .unwrap();
        let mut f = Vec::new();
        b.write(&mut f, &[]).unwrap();
        f
    }

    /// Checks every checksum of `f` by etherparse's own computation and
    /// returns its TCP header.
    fn checked(f: &[u8]) -> etherparse::TcpHeader {
        let s = SlicedPacket::from_ethernet(f).unwrap();
        let Some(TransportSlice::Tcp(t)) = s.transport else {
            panic!("no tcp")
        };
        let h = t.to_header();
        let payload = t.payload();
        let want = match s.net.unwrap() {
            etherparse::NetSlice::Ipv4(ip) => {
                let hdr = ip.header().to_header();
                assert_eq!(hdr.header_checksum, hdr.calc_header_checksum());
                h.calc_checksum_ipv4(&hdr, payload).unwrap()
            }
            etherparse::NetSlice::Ipv6(ip) => h
                .calc_checksum_ipv6(&ip.header().to_header(), payload)
                .unwrap(),
            _ => panic!("no ip"),
        };
        assert_eq!(h.checksum, want, "tcp checksum");
        h
    }

    #[test]
    fn reads_the_handshake_fields_and_the_mss() {
        let f = syn_v4(&[]);
        let p = parse(&f, 0).unwrap();
        let s = read(&f, &p).unwrap();
        assert_eq!(s.flags, tcp::SYN);
        assert_eq!(s.seq, 1000);
        assert_eq!(s.window, 64240);
        assert_eq!(s.mss, Some(1460));
        assert_eq!(mss_option(&[1, 1, 3, 3, 7, 2, 4, 5, 0xb4]), Some(1460));
        assert_eq!(mss_option(&[1, 0, 2, 4, 5, 0xb4]), None);
        // A zero length would loop forever; a cut option is no option.
        assert_eq!(mss_option(&[8, 0, 2, 4, 5, 0xb4]), None);
        assert_eq!(mss_option(&[2, 4, 5]), None);
    }

    #[test]
    fn a_syn_is_answered_in_place_with_a_syn_ack() {
        let pool = pool();
        for (frame, v6) in [(syn_v4(b"early data"), false), (syn_v6(), true)] {
            let mut pkt = pool.alloc_buf().unwrap();
            pkt.append(frame.len()).unwrap().copy_from_slice(&frame);
            let p = parse(pkt.data(), 0).unwrap();
            let me = MacAddr([0x12, 0, 0, 0, 0, 9]);
            let seg = Seg {
                flags: tcp::SYN | tcp::ACK,
                seq: 0xdead_beef,
                ack: 1001,
                window: 65535,
                mss: Some(1440),
            };
            write(&mut pkt, &p, Way::Back(me), &seg).unwrap();
            let f = pkt.data();
            assert_eq!(
                &f[0..6],
                &[2, 0, 0, 0, 0, 1],
                "to the client's MAC (the SYN's source)"
            );
            assert_eq!(&f[6..12], &me.0);
            let h = checked(f);
            assert_eq!((h.source_port, h.destination_port), (80, 40000));
            assert!(h.syn && h.ack && !h.rst && !h.fin);
            assert_eq!(
                (h.sequence_number, h.acknowledgment_number),
                (0xdead_beef, 1001)
            );
            assert_eq!(h.window_size, 65535);
            let q = parse(f, 0).unwrap();
            assert_eq!(q.key.src(), p.key.dst());
            assert_eq!(q.key.dst(), p.key.src());
            assert_eq!(read(f, &q).unwrap().mss, Some(1440));
            assert_eq!(usize::from(q.l4_len), 24, "no payload, v6: {v6}");
            assert_eq!(f.len(), usize::from(q.l4_off) + 24);
            assert_eq!(rewrite_hop(f, &q), 64);
        }
    }

    fn rewrite_hop(f: &[u8], p: &Parsed) -> u8 {
        crate::rewrite::hop_limit(f, p).unwrap()
    }

    #[test]
    fn an_ack_becomes_a_syn_onward_and_grows_for_its_option() {
        let pool = pool();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([192, 0, 2, 1], [10, 1, 0, 100], 61)
            .tcp(40000, 80, 1001, 501)
            .ack(0xdead_bef0);
        let mut frame = Vec::new();
        b.write(&mut frame, &[]).unwrap();
        let mut pkt = pool.alloc_buf().unwrap();
        pkt.append(frame.len()).unwrap().copy_from_slice(&frame);
        let p = parse(pkt.data(), 0).unwrap();
        let seg = Seg {
            flags: tcp::SYN,
            seq: 1000,
            ack: 0,
            window: 501,
            mss: Some(1460),
        };
        write(&mut pkt, &p, Way::Onward, &seg).unwrap();
        let f = pkt.data();
        assert_eq!(&f[..12], &frame[..12], "MACs are the caller's to set");
        let h = checked(f);
        assert!(h.syn && !h.ack);
        assert_eq!(h.sequence_number, 1000);
        let q = parse(f, 0).unwrap();
        assert_eq!(q.key, p.key);
        assert_eq!(rewrite_hop(f, &q), 61, "the caller decrements it");
    }

    #[test]
    fn refuses_what_it_cannot_write() {
        let pool = pool();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([192, 0, 2, 1], [10, 1, 0, 100], 61)
            .udp(40000, 53);
        let mut frame = Vec::new();
        b.write(&mut frame, &[1, 2, 3]).unwrap();
        let mut pkt = pool.alloc_buf().unwrap();
        pkt.append(frame.len()).unwrap().copy_from_slice(&frame);
        let p = parse(pkt.data(), 0).unwrap();
        assert!(read(pkt.data(), &p).is_none());
        assert_eq!(
            write(&mut pkt, &p, Way::Onward, &Seg::default()),
            Err(RewriteError::NoPorts)
        );
        assert_eq!(pkt.data(), &frame[..], "left alone");
    }
}
