//! In-memory port pairs, like a veth pair: what one end transmits, the other
//! receives. Used for tests, benches and in-process VMs; each direction is a
//! bounded lock-free `crossbeam_queue::ArrayQueue`, so the two ends may live
//! on different threads.

use super::{LinkInfo, Port};
use crate::batch::Batch;
use crate::buf::PacketBuf;
use crate::stats::{DropReason, PortStats};
use crossbeam_queue::ArrayQueue;
use std::sync::Arc;

/// Default number of packets each direction of a pair can hold.
pub const DEFAULT_CAPACITY: usize = 1024;

/// One end of an in-memory port pair.
pub struct RingPort<B> {
    info: LinkInfo,
    stats: Arc<PortStats>,
    rx: Arc<ArrayQueue<B>>,
    tx: Arc<ArrayQueue<B>>,
}

impl<B> std::fmt::Debug for RingPort<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingPort")
            .field("info", &self.info)
            .field("rx_pending", &self.rx.len())
            .finish()
    }
}

/// Makes a connected pair; each direction holds up to `capacity` packets.
/// Both ends' `LinkInfo::driver` is set to "ring".
pub fn pair<B: PacketBuf>(
    mut a: LinkInfo,
    mut b: LinkInfo,
    capacity: usize,
) -> (RingPort<B>, RingPort<B>) {
    a.driver = "ring";
    b.driver = "ring";
    let a_to_b = Arc::new(ArrayQueue::new(capacity.max(1)));
    let b_to_a = Arc::new(ArrayQueue::new(capacity.max(1)));
    (
        RingPort {
            info: a,
            stats: Arc::default(),
            rx: b_to_a.clone(),
            tx: a_to_b.clone(),
        },
        RingPort {
            info: b,
            stats: Arc::default(),
            rx: a_to_b,
            tx: b_to_a,
        },
    )
}

impl<B> RingPort<B> {
    /// Another handle on this end: the same queues, its own counters. Give
    /// one to each worker and the end becomes a multi-queue port: every
    /// packet is received by exactly one of them, and all may transmit.
    pub fn share(&self) -> RingPort<B> {
        RingPort {
            info: self.info.clone(),
            stats: Arc::default(),
            rx: self.rx.clone(),
            tx: self.tx.clone(),
        }
    }

    /// Packets waiting to be received on this end.
    pub fn rx_pending(&self) -> usize {
        self.rx.len()
    }
}

impl<B: PacketBuf> Port for RingPort<B> {
    type Buf = B;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    #[inline]
    fn rx_burst(&mut self, batch: &mut Batch<B>) -> usize {
        let mut n = 0;
        let mut bytes = 0;
        while !batch.is_full() {
            let Some(pkt) = self.rx.pop() else { break };
            bytes += pkt.len() as u64;
            n += 1;
            // Cannot fail: the batch is not full.
            let _ = batch.push(pkt);
        }
        self.stats.count_rx(n as u64, bytes);
        n
    }

    #[inline]
    fn tx_burst(&mut self, batch: &mut Batch<B>) -> usize {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        let mut dropped = 0u64;
        for pkt in batch.drain() {
            let len = pkt.len() as u64;
            match self.tx.push(pkt) {
                Ok(()) => {
                    sent += 1;
                    bytes += len;
                }
                // The packet comes back and is freed here.
                Err(_pkt) => dropped += 1,
            }
        }
        self.stats.count_tx(sent, bytes);
        if dropped > 0 {
            self.stats.drops.add(DropReason::TxQueueFull, dropped);
        }
        sent as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{HugePages, Pool, PoolConfig};
    use crate::wire::MacAddr;

    fn pool(n: usize) -> Pool {
        let mut cfg = PoolConfig::new("ring-test", n);
        cfg.huge = HugePages::Never;
        Pool::new(&cfg).unwrap()
    }

    fn link(name: &str, last: u8) -> LinkInfo {
        LinkInfo::new(name, MacAddr([2, 0, 0, 0, 0, last]), "ring")
    }

    #[test]
    fn what_one_end_sends_the_other_receives() {
        let pool = pool(64);
        let (mut a, mut b) = pair(link("a", 1), link("b", 2), 64);
        let mut batch = Batch::new();
        for i in 0..10u8 {
            batch.push(pool.alloc_copy(&[i; 60]).unwrap()).unwrap();
        }
        assert_eq!(a.tx_burst(&mut batch), 10);
        assert!(batch.is_empty());
        assert_eq!(b.rx_pending(), 10);
        assert_eq!(b.rx_burst(&mut batch), 10);
        for (i, p) in batch.iter().enumerate() {
            assert_eq!(p.data(), &[i as u8; 60]);
        }
        assert_eq!(a.stats().snapshot().tx_packets, 10);
        assert_eq!(a.stats().snapshot().tx_bytes, 600);
        assert_eq!(b.stats().snapshot().rx_packets, 10);
        // And back the other way.
        assert_eq!(b.tx_burst(&mut batch), 10);
        let mut back = Batch::new();
        assert_eq!(a.rx_burst(&mut back), 10);
    }

    #[test]
    fn full_ring_drops_and_counts_without_leaking() {
        let pool = pool(64);
        let (mut a, mut b) = pair(link("a", 1), link("b", 2), 4);
        let mut batch = Batch::new();
        for _ in 0..10 {
            batch.push(pool.alloc_copy(&[0; 60]).unwrap()).unwrap();
        }
        assert_eq!(a.tx_burst(&mut batch), 4);
        assert_eq!(a.stats().drops.get(DropReason::TxQueueFull), 6);
        // The 6 dropped buffers went back to the pool; 4 are in the ring.
        assert_eq!(pool.available(), 60);
        let mut rx = Batch::new();
        assert_eq!(b.rx_burst(&mut rx), 4);
        drop(rx);
        assert_eq!(pool.available(), 64);
    }

    #[test]
    fn rx_respects_batch_space() {
        let pool = pool(64);
        let (mut a, mut b) = pair(link("a", 1), link("b", 2), 64);
        let mut batch = Batch::new();
        for _ in 0..32 {
            batch.push(pool.alloc_copy(&[0; 60]).unwrap()).unwrap();
        }
        a.tx_burst(&mut batch);
        let mut rx = Batch::new();
        for _ in 0..30 {
            rx.push(pool.alloc().unwrap()).unwrap();
        }
        assert_eq!(b.rx_burst(&mut rx), 2);
        assert_eq!(b.rx_pending(), 30);
    }
}
