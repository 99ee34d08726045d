//! The packet buffer abstraction every layer above the drivers is generic over.

/// Why a buffer operation was refused; the buffer is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufError {
    /// `prepend` asked for more bytes than the headroom holds.
    #[error("not enough headroom: need {need}, have {have}")]
    NoHeadroom {
        /// Bytes asked for.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// `append` asked for more bytes than the tailroom holds.
    #[error("not enough tailroom: need {need}, have {have}")]
    NoTailroom {
        /// Bytes asked for.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// `adj`/`trim` asked to remove more bytes than the packet holds.
    #[error("cannot remove {need} bytes from a {have}-byte packet")]
    TooShort {
        /// Bytes asked for.
        need: usize,
        /// Packet length.
        have: usize,
    },
}

/// A packet in a buffer with headroom: pollux's own pool buffers implement it,
/// and so does the DPDK mbuf (with the `dpdk` feature), so the pipeline runs
/// zero-copy on either.
///
/// The data is one contiguous slice (no chained segments). Dropping a buffer
/// returns it to where it came from.
pub trait PacketBuf: Send + 'static {
    /// The packet bytes.
    fn data(&self) -> &[u8];
    /// The packet bytes, mutable.
    fn data_mut(&mut self) -> &mut [u8];
    /// Packet length in bytes.
    fn len(&self) -> usize;
    /// True for a zero-length packet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Free bytes before the data (room for encapsulation headers).
    fn headroom(&self) -> usize;
    /// Free bytes after the data.
    fn tailroom(&self) -> usize;
    /// Grows the packet at the front by `n` bytes and returns them.
    fn prepend(&mut self, n: usize) -> Result<&mut [u8], BufError>;
    /// Removes `n` bytes from the front (e.g. to strip a header).
    fn adj(&mut self, n: usize) -> Result<(), BufError>;
    /// Grows the packet at the end by `n` bytes and returns them.
    fn append(&mut self, n: usize) -> Result<&mut [u8], BufError>;
    /// Removes `n` bytes from the end.
    fn trim(&mut self, n: usize) -> Result<(), BufError>;
    /// Sets the length to zero and the headroom to its default.
    fn reset(&mut self);
}

/// A source of empty packet buffers: pollux's pools, DPDK mempools. What a
/// component that builds packets itself (a smoltcp stack on a port) needs.
pub trait BufAlloc: Copy + Send + 'static {
    /// The buffers it hands out.
    type Buf: PacketBuf;
    /// An empty buffer (default headroom), or `None` when none is free.
    fn alloc_buf(&self) -> Option<Self::Buf>;
}
