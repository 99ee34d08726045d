//! A burst of up to [`BURST`] packets, kept inline (no heap allocation).

use arrayvec::ArrayVec;

/// The burst size: how many packets one `rx_burst`/`tx_burst` handles.
pub const BURST: usize = 32;

/// Up to [`BURST`] packets. Dropping a batch drops (frees) its packets.
#[derive(Debug)]
pub struct Batch<B> {
    pkts: ArrayVec<B, BURST>,
}

impl<B> Default for Batch<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> Batch<B> {
    /// An empty batch.
    pub const fn new() -> Self {
        Batch {
            pkts: ArrayVec::new_const(),
        }
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.pkts.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    /// True when it holds [`BURST`] packets.
    pub fn is_full(&self) -> bool {
        self.pkts.is_full()
    }

    /// Room left.
    pub fn free_space(&self) -> usize {
        BURST - self.pkts.len()
    }

    /// Adds a packet, or gives it back when the batch is full.
    #[inline]
    pub fn push(&mut self, pkt: B) -> Result<(), B> {
        self.pkts.try_push(pkt).map_err(|e| e.element())
    }

    /// Removes the last packet.
    #[inline]
    pub fn pop(&mut self) -> Option<B> {
        self.pkts.pop()
    }

    /// Removes the first `n` packets (all, if fewer), yielding them in order.
    #[inline]
    pub fn drain_front(&mut self, n: usize) -> arrayvec::Drain<'_, B, BURST> {
        let n = n.min(self.pkts.len());
        self.pkts.drain(..n)
    }

    /// Removes and yields every packet, in order.
    #[inline]
    pub fn drain(&mut self) -> arrayvec::Drain<'_, B, BURST> {
        self.pkts.drain(..)
    }

    /// Empties the batch, handing each packet to `f` in order
    /// ([`platform::drain_each`]: each moved out whole, which is cheaper per
    /// packet than [`Batch::drain`]'s `Option`s).
    #[inline(always)]
    pub fn drain_each(&mut self, f: impl FnMut(B)) {
        platform::drain_each(&mut self.pkts, f);
    }

    /// The packets.
    pub fn as_slice(&self) -> &[B] {
        &self.pkts
    }

    /// The packets, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [B] {
        &mut self.pkts
    }

    /// Iterates over the packets.
    pub fn iter(&self) -> std::slice::Iter<'_, B> {
        self.pkts.iter()
    }

    /// Iterates mutably over the packets.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, B> {
        self.pkts.iter_mut()
    }

    /// The packets' storage, for a port driver that moves a run of them to
    /// or from its queue in one copy (the in-memory ring).
    pub(crate) fn packets_mut(&mut self) -> &mut ArrayVec<B, BURST> {
        &mut self.pkts
    }

    /// Keeps only the packets for which `keep` returns true; the others are dropped.
    pub fn retain(&mut self, keep: impl FnMut(&mut B) -> bool) {
        self.pkts.retain(keep);
    }

    /// Drops every packet.
    pub fn clear(&mut self) {
        self.pkts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_until_full_then_refuse() {
        let mut b = Batch::new();
        for i in 0..BURST {
            assert!(b.push(i).is_ok());
        }
        assert!(b.is_full());
        assert_eq!(b.push(99), Err(99));
        assert_eq!(b.drain().sum::<usize>(), (0..BURST).sum::<usize>());
        assert!(b.is_empty());
        assert_eq!(b.free_space(), BURST);
    }
}
