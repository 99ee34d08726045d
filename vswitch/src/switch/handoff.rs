//! The mailboxes through which workers hand each other packets of
//! connections they do not own.

use crossbeam_queue::ArrayQueue;
use std::sync::Arc;

/// The mailboxes through which workers hand each other packets of
/// connections they do not own ([`crate::placement`]): one bounded lock-free
/// queue per worker, of (input port, packet).
pub struct Handoff<B> {
    pub(super) queues: Vec<ArrayQueue<(u16, B)>>,
}

impl<B> Handoff<B> {
    /// Mailboxes for `workers` workers, `capacity` packets each.
    pub fn new(workers: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Handoff {
            queues: (0..workers.max(1))
                .map(|_| ArrayQueue::new(capacity.max(1)))
                .collect(),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.queues.len()
    }
}
