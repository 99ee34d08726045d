//! SYN cookies: the initial sequence number a SYN proxy answers a SYN
//! with, from which it recognizes the client's ACK without having kept
//! anything of the SYN.
//!
//! A cookie is 32 bits: the low two bits of the time period it was made in
//! (periods of [`PERIOD_NS`]), two bits choosing the MSS from
//! [`MSS_TABLE`], and 28 bits of a keyed hash (SipHash-2-4, with a
//! 128-bit key drawn from the system's random source when the switch
//! starts) over the connection's addresses,
//! ports, the client's initial sequence number, the period and the MSS
//! bits. An ACK
//! whose acknowledgment number less one is the cookie of its own
//! connection in the current or the previous period is a client that
//! received the SYN-ACK: a spoofed source never sees it, and guessing
//! takes 2^28 tries per period. As Linux's cookies, they carry no window
//! scale, SACK or timestamp option.

use dataplane::FlowKey;
use siphasher::sip::SipHasher24;
use std::hash::Hasher;

/// MSS values a cookie carries (its index, in two bits): the largest not
/// above the client's is chosen (536, the TCP default, without one).
pub const MSS_TABLE: [u16; 4] = [536, 1220, 1440, 1460];

/// A cookie's period: it is good for ACKs in its period and the next, so
/// for between one and two periods.
pub const PERIOD_NS: u64 = 64 * 1_000_000_000;

const HASH_BITS: u32 = 0x0fff_ffff;

/// The cookie secret, shared by every worker (one secret for the switch,
/// whichever worker a connection lands on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynCookies {
    key: [u8; 16],
}

impl Default for SynCookies {
    fn default() -> Self {
        Self::new()
    }
}

impl SynCookies {
    /// A new random secret, from the system's random source (if that
    /// fails, from std's per-process random hash keys, which come from
    /// the same source).
    pub fn new() -> Self {
        let mut key = [0u8; 16];
        if getrandom::fill(&mut key).is_err() {
            use std::hash::BuildHasher;
            let s = std::collections::hash_map::RandomState::new();
            key[..8].copy_from_slice(&s.hash_one(0u8).to_le_bytes());
            key[8..].copy_from_slice(&s.hash_one(1u8).to_le_bytes());
        }
        SynCookies { key }
    }

    /// A given secret (tests; a successor process taking over).
    pub fn with_key(key: [u8; 16]) -> Self {
        SynCookies { key }
    }

    /// The secret (for a successor process, so that the cookies this one
    /// gave out still check).
    pub fn key(&self) -> [u8; 16] {
        self.key
    }

    fn hash(&self, key: &FlowKey, client_isn: u32, period: u64, mss_idx: u32) -> u32 {
        // The fields themselves, not the key's own (unkeyed) digest: the
        // secret must cover every bit an attacker chooses.
        let mut h = SipHasher24::new_with_key(&self.key);
        h.write(&key.src_ip);
        h.write(&key.dst_ip);
        h.write_u16(key.src_port);
        h.write_u16(key.dst_port);
        h.write_u8(key.proto);
        h.write_u32(client_isn);
        h.write_u64(period);
        h.write_u32(mss_idx);
        (h.finish() as u32) & HASH_BITS
    }

    /// The cookie for a SYN with key `key` (client to VIP), initial
    /// sequence number `client_isn` and MSS option `mss` (`None`: none),
    /// made at `now` (ns), and the MSS it carries.
    pub fn make(&self, key: &FlowKey, client_isn: u32, mss: Option<u16>, now: u64) -> (u32, u16) {
        let mss = mss.unwrap_or(MSS_TABLE[0]);
        let at = MSS_TABLE.iter().rposition(|&m| m <= mss).unwrap_or(0);
        let period = now / PERIOD_NS;
        let idx = at as u32;
        let c = ((period & 3) as u32) << 30 | idx << 28 | self.hash(key, client_isn, period, idx);
        (c, MSS_TABLE[at])
    }

    /// The MSS `cookie` carries if it is the cookie of a SYN with key `key`
    /// and initial sequence number `client_isn`, made in this period or
    /// the previous one; `None` if it is not.
    pub fn check(&self, key: &FlowKey, client_isn: u32, cookie: u32, now: u64) -> Option<u16> {
        let period = now / PERIOD_NS;
        let idx = (cookie >> 28) & 3;
        [Some(period), period.checked_sub(1)]
            .into_iter()
            .flatten()
            .filter(|p| (p & 3) as u32 == cookie >> 30)
            .find(|&p| self.hash(key, client_isn, p, idx) == cookie & HASH_BITS)
            .and_then(|_| MSS_TABLE.get(idx as usize).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn key(a: u32, port: u16) -> FlowKey {
        FlowKey::new(
            IpAddr::V4(std::net::Ipv4Addr::from(a)),
            port,
            "198.51.100.80".parse().unwrap(),
            80,
            6,
        )
    }

    const T: u64 = 1_000 * PERIOD_NS + 5;

    #[test]
    fn a_cookie_answers_its_own_ack_for_one_to_two_periods() {
        let c = SynCookies::new();
        let k = key(1, 40000);
        let (cookie, mss) = c.make(&k, 77, Some(1460), T);
        assert_eq!(mss, 1460);
        assert_eq!(c.check(&k, 77, cookie, T), Some(1460));
        assert_eq!(c.check(&k, 77, cookie, T + PERIOD_NS), Some(1460));
        assert_eq!(c.check(&k, 77, cookie, T + 2 * PERIOD_NS), None, "expired");
        assert_eq!(
            c.check(&k, 77, cookie, T - PERIOD_NS),
            None,
            "from the future"
        );
        // Another connection, another client sequence, another secret.
        assert_eq!(c.check(&key(2, 40000), 77, cookie, T), None);
        assert_eq!(c.check(&key(1, 40001), 77, cookie, T), None);
        assert_eq!(c.check(&k, 78, cookie, T), None);
        assert_eq!(SynCookies::new().check(&k, 77, cookie, T), None);
        // The MSS bits are covered: a changed index is no cookie.
        assert_eq!(c.check(&k, 77, cookie ^ (1 << 28), T), None);
    }

    #[test]
    fn the_mss_is_the_largest_the_table_has_below_the_clients() {
        let c = SynCookies::new();
        let k = key(1, 1);
        for (offered, carried) in [
            (None, 536),
            (Some(100), 536),
            (Some(1400), 1220),
            (Some(1440), 1440),
            (Some(9000), 1460),
        ] {
            let (cookie, mss) = c.make(&k, 5, offered, T);
            assert_eq!(mss, carried, "{offered:?}");
            assert_eq!(c.check(&k, 5, cookie, T), Some(carried));
        }
    }

    #[test]
    fn works_from_the_first_period() {
        let c = SynCookies::new();
        let (cookie, _) = c.make(&key(1, 1), 5, Some(1460), 3);
        assert_eq!(c.check(&key(1, 1), 5, cookie, 3), Some(1460));
    }

    proptest! {
        /// Random guesses are not cookies (28 bits of hash: a false
        /// accept in these few hundred cases would be a broken hash).
        #[test]
        fn guesses_fail(a: u32, port: u16, isn: u32, guess: u32) {
            let c = SynCookies::new();
            let (cookie, _) = c.make(&key(a, port), isn, Some(1460), T);
            prop_assume!(guess != cookie);
            prop_assert_eq!(c.check(&key(a, port), isn, guess, T), None);
        }
    }
}
