//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Checksums are handled as the 16-bit value stored on the wire, in host order
//! (`u16::from_be_bytes` of the two checksum bytes).

/// One's-complement sum of `data` as big-endian 16-bit words, not folded.
///
/// An odd trailing byte is padded with a zero byte, as RFC 1071 says.
#[inline]
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    fold64(acc)
}

#[inline]
fn fold64(mut acc: u64) -> u32 {
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// Folds a 32-bit accumulator into 16 bits with end-around carry. Two
/// folds always suffice: the first leaves at most 0x1fffe, the second at
/// most 0xffff; so it is straight-line code, no loop.
#[inline]
pub fn fold(acc: u32) -> u16 {
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// The checksum of `data`: the complement of its folded one's-complement sum.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// Adds two unfolded one's-complement sums.
#[inline]
pub fn combine(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s + u32::from(carry)
}

/// Sum of the IPv4 pseudo-header for TCP/UDP (RFC 793, RFC 768).
#[inline]
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    combine(
        combine(sum(&src), sum(&dst)),
        u32::from(proto) + u32::from(l4_len),
    )
}

/// Sum of the IPv6 pseudo-header for TCP/UDP/ICMPv6 (RFC 8200 section 8.1).
#[inline]
pub fn pseudo_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, l4_len: u32) -> u32 {
    let lens = (l4_len >> 16) + (l4_len & 0xffff) + u32::from(next_header);
    combine(combine(sum(&src), sum(&dst)), lens)
}

/// RFC 1624 equation 3: the new checksum after the covered bytes `old` were
/// replaced by `new` (both of the same, even length, aligned to 16-bit words).
///
/// `HC' = ~(~HC + ~m + m')`, which gives exactly what a full recomputation
/// gives (unlike RFC 1141's form, which can produce 0x0000 for 0xffff).
#[inline]
pub fn update(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!check);
    // ~m summed word by word equals 0xffff * n - sum(m); do it per word to
    // stay in the one's-complement domain.
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u32::from(!u16::from_be_bytes([o[0], o[1]]));
        acc += u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    !fold(acc)
}

/// [`update`] for a single 16-bit word.
#[inline]
pub fn update_word(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 1071 section 3 example: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    // A real IPv4 header (from a capture) whose checksum is 0xb861.
    #[test]
    fn ipv4_header_checksum() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&hdr), 0);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12]), 0x1200);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    proptest! {
        // The two folds give what folding until the carry is gone gives.
        #[test]
        fn fold_is_the_end_around_carry(acc in prop_oneof![any::<u32>(), 0xfff0u32..0x2_0010, 0xffff_0000u32..=u32::MAX]) {
            let mut r = acc;
            while r > 0xffff {
                r = (r & 0xffff) + (r >> 16);
            }
            prop_assert_eq!(u32::from(fold(acc)), r);
        }

        // Incremental update equals full recomputation for any data and any
        // replacement of any aligned field.
        #[test]
        fn incremental_equals_full(
            mut data in proptest::collection::vec(any::<u8>(), 2..200),
            at in any::<prop::sample::Index>(),
            words in 1usize..9,
            fill in proptest::collection::vec(any::<u8>(), 16),
        ) {
            if data.len() % 2 == 1 { data.pop(); }
            let nwords = data.len() / 2;
            let start = at.index(nwords) * 2;
            let end = (start + words * 2).min(data.len());
            let before = checksum(&data);
            let old = data[start..end].to_vec();
            data[start..end].copy_from_slice(&fill[..end - start]);
            let inc = update(before, &old, &data[start..end]);
            prop_assert_eq!(inc, checksum(&data));
        }

        #[test]
        fn word_update_equals_full(mut data in proptest::collection::vec(any::<u8>(), 2..64), idx in any::<prop::sample::Index>(), new in any::<u16>()) {
            if data.len() % 2 == 1 { data.pop(); }
            let i = idx.index(data.len() / 2) * 2;
            let before = checksum(&data);
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            prop_assert_eq!(update_word(before, old, new), checksum(&data));
        }
    }
}
