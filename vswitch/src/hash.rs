//! The switch's hash for its policy maps and worker placement.

use std::hash::Hasher;

/// FxHash (as in rustc) with a MurmurHash3 finaliser, for the switch's
/// policy maps and worker placement (keys chosen by the configuration or
/// hashed with a fixed layout). FxHash's multiply only carries bits upwards,
/// and the varying bytes of an IPv4-mapped address sit in the high bits of
/// their word; later rounds rotate them down, and the finaliser makes sure
/// every input bit reaches the low bits hashbrown uses as the bucket index.
/// std's SipHash costs more than the rest of a hit. The flow table has its
/// own seeded hash ([`FlowTable::hash`]).
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z ^= z >> 33;
        z = z.wrapping_mul(0xff51_afd7_ed55_8ccd);
        z ^= z >> 33;
        z = z.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        z ^ (z >> 33)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u16) -> dataplane::FlowKey {
        dataplane::FlowKey {
            src_port: p,
            proto: 17,
            ..dataplane::FlowKey::default()
        }
    }

    #[test]
    fn hasher_spreads_keys_over_buckets() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<FxHasher>::default();
        // Keys that differ only in the last byte of an IPv4-mapped source
        // address (the high bits of a hashed word) land in different buckets
        // (low bits).
        let mut buckets = std::collections::HashSet::new();
        for i in 0..=255u8 {
            let mut k = key(1);
            k.src_ip = std::net::Ipv4Addr::new(10, 1, 1, i)
                .to_ipv6_mapped()
                .octets();
            buckets.insert(b.hash_one(k) & 1023);
        }
        assert!(
            buckets.len() > 200,
            "{} of 256 keys in distinct buckets",
            buckets.len()
        );
    }
}
