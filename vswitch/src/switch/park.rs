//! Data held for SYN-proxied connections whose backends have not answered
//! yet: the first data a client sends usually follows its ACK at once,
//! before the backend's SYN-ACK can come back; held, it goes on when the
//! backend answers instead of after the client's retransmission timeout.
//! A bounded number of places per worker, each holding a packet buffer.

use super::{Switch, SwitchDrop};
use crate::flow::LbRef;
use crate::policy::Policy;
use dataplane::PacketBuf;
use dataplane::worker::Ctx;
use std::sync::atomic::Ordering;

/// Packets a worker holds at once for SYN-proxied connections.
pub const PARK_SLOTS: usize = 64;

/// A packet held for a SYN-proxied connection.
pub(super) struct Parked<B> {
    conn: LbRef,
    /// The port it came in on.
    port: u16,
    /// Its sequence number: one that comes again is a retransmission.
    seq: u32,
    /// When it was held (ns).
    since: u64,
    pkt: B,
}

impl<B: PacketBuf> Switch<B> {
    /// Holds `pkt`, data with sequence number `seq` from a client (on
    /// `port`) of SYN-proxied connection `conn` whose backend has not
    /// answered, until it does. Hands it back when a packet with the same
    /// sequence number is held already: a retransmission, which goes to
    /// the backend as its SYN again (the first may have been lost). With
    /// every place taken, the oldest held packet is dropped (counted).
    #[cold]
    pub(super) fn park(&mut self, conn: LbRef, port: u16, seq: u32, now: u64, pkt: B) -> Option<B> {
        let again =
            |p: &Option<Parked<B>>| p.as_ref().is_some_and(|p| p.conn == conn && p.seq == seq);
        if self.parked.is_empty() || self.parked.iter().any(again) {
            return Some(pkt);
        }
        let at = match self.parked.iter().position(Option::is_none) {
            Some(i) => i,
            None => (0..self.parked.len())
                .min_by_key(|&i| {
                    self.parked
                        .get(i)
                        .and_then(|p| p.as_ref())
                        .map_or(0, |p| p.since)
                })
                .unwrap_or(0),
        };
        let held = Parked {
            conn,
            port,
            seq,
            since: now,
            pkt,
        };
        match self.parked.get_mut(at).and_then(|p| p.replace(held)) {
            Some(old) => self.drop_pkt(old.pkt, SwitchDrop::SynProxyParkFull),
            None => {
                self.stats.syn_proxy_held.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// The place of the earliest packet held for `conn` (same connection,
    /// either direction's reference).
    fn held_for(&self, conn: LbRef) -> Option<usize> {
        self.parked
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
            .filter(|(_, p)| p.conn.vnet == conn.vnet && p.conn.conn == conn.conn)
            .min_by_key(|(_, p)| p.since)
            .map(|(i, _)| i)
    }

    /// Takes the packet held in place `i`.
    fn take_held(&mut self, i: usize) -> Option<Parked<B>> {
        let p = self.parked.get_mut(i).and_then(Option::take);
        if p.is_some() {
            self.stats.syn_proxy_held.fetch_sub(1, Ordering::Relaxed);
        }
        p
    }

    /// Sends on the packets held for SYN-proxied connection `conn`, whose
    /// backend has just answered, in the order they came (through the
    /// pipeline again: the connection now has its sequence offset).
    #[cold]
    pub(super) fn unpark(
        &mut self,
        ctx: &mut Ctx<'_, B>,
        policy: &Policy,
        conn: LbRef,
        now: u64,
        tally: &mut (u64, u64, u64),
    ) {
        while let Some(p) = self.held_for(conn).and_then(|i| self.take_held(i)) {
            self.packet(
                ctx,
                policy,
                usize::from(p.port),
                p.pkt,
                now,
                true,
                tally,
                None,
            );
        }
    }

    /// Drops the packets held for `conn` (the client or the backend reset
    /// it before the backend answered).
    #[cold]
    pub(super) fn unpark_drop(&mut self, conn: LbRef) {
        while let Some(p) = self.held_for(conn).and_then(|i| self.take_held(i)) {
            self.drop_pkt(p.pkt, SwitchDrop::SynProxyParkExpired);
        }
    }

    /// Drops held packets whose connection is gone (timed out, evicted,
    /// reset) or that have waited longer than a handshake may take.
    pub(super) fn expire_parked(&mut self, now: u64) {
        let limit = self.cfg.timeouts.tcp_handshake;
        for i in 0..self.parked.len() {
            let stale = self
                .parked
                .get(i)
                .and_then(|p| p.as_ref())
                .is_some_and(|p| {
                    now.saturating_sub(p.since) > limit
                        || self
                            .lb
                            .get(usize::from(p.conn.vnet))
                            .and_then(|l| l.conn(p.conn.conn))
                            .is_none()
                });
            if let Some(p) = stale.then(|| self.take_held(i)).flatten() {
                self.drop_pkt(p.pkt, SwitchDrop::SynProxyParkExpired);
            }
        }
    }
}
