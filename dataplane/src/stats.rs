//! Counters as plain atomics: written by the one worker that owns the object,
//! read by the control thread at any time.

use crate::wire::ParseError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Adds `n` to a counter that only the calling thread writes (others only
/// read it): a plain load and store. `fetch_add` is a locked instruction,
/// which on x86 waits for every store before it to reach the cache: after
/// a new connection's writes to cold table lines, that wait is the
/// largest cost of counting it. A reader sees each value written, never a
/// torn one; two writers would lose counts.
#[inline(always)]
pub fn add_own(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Why a packet was dropped. Every drop in pollux is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The transmit queue (ring, NIC descriptor ring) had no room.
    TxQueueFull,
    /// A packet arrived but no buffer was free to hold it.
    RxNoBuffer,
    /// A received frame was larger than a buffer.
    RxOversize,
    /// Writing the packet out failed (pcap file write error).
    TxIoError,
    /// TTL or hop limit expired on forwarding.
    TtlExpired,
    /// The pipeline had nowhere to send the packet.
    NoRoute,
    /// The kernel dropped frames because the port's rx ring was full.
    RxRingOverflow,
    /// A packet to send was larger than the port can carry.
    TxOversize,
    /// The port's link was down (a VM's vhost-user port with no guest
    /// driver behind it: the VM stopped, rebooting, or not yet booted).
    LinkDown,
    /// A vhost-user guest's descriptor chain the port could not use: out
    /// of its ring or its memory, of the wrong direction, looping, or an
    /// available index more than a ring ahead (which stops the ring until
    /// the guest sets it up again).
    BadDescriptor,
    /// The frame failed to parse.
    Malformed(ParseError),
}

const SIMPLE: [DropReason; 10] = [
    DropReason::TxQueueFull,
    DropReason::RxNoBuffer,
    DropReason::RxOversize,
    DropReason::TxIoError,
    DropReason::TtlExpired,
    DropReason::NoRoute,
    DropReason::RxRingOverflow,
    DropReason::TxOversize,
    DropReason::LinkDown,
    DropReason::BadDescriptor,
];

impl DropReason {
    /// Number of distinct reasons (the size of a [`DropCounters`]).
    pub const COUNT: usize = SIMPLE.len() + ParseError::ALL.len();

    /// A dense index in `0..COUNT`.
    #[inline]
    pub const fn index(self) -> usize {
        match self {
            DropReason::TxQueueFull => 0,
            DropReason::RxNoBuffer => 1,
            DropReason::RxOversize => 2,
            DropReason::TxIoError => 3,
            DropReason::TtlExpired => 4,
            DropReason::NoRoute => 5,
            DropReason::RxRingOverflow => 6,
            DropReason::TxOversize => 7,
            DropReason::LinkDown => 8,
            DropReason::BadDescriptor => 9,
            DropReason::Malformed(e) => SIMPLE.len() + e as usize,
        }
    }

    /// The reason with index `i`, if any.
    pub fn from_index(i: usize) -> Option<DropReason> {
        match SIMPLE.get(i) {
            Some(r) => Some(*r),
            None => ParseError::ALL
                .get(i - SIMPLE.len())
                .map(|e| DropReason::Malformed(*e)),
        }
    }

    /// Every reason, in index order.
    pub fn all() -> impl Iterator<Item = DropReason> {
        (0..Self::COUNT).filter_map(Self::from_index)
    }

    /// A stable snake_case name for counters and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::TxQueueFull => "tx_queue_full",
            DropReason::RxNoBuffer => "rx_no_buffer",
            DropReason::RxOversize => "rx_oversize",
            DropReason::TxIoError => "tx_io_error",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NoRoute => "no_route",
            DropReason::RxRingOverflow => "rx_ring_overflow",
            DropReason::TxOversize => "tx_oversize",
            DropReason::LinkDown => "link_down",
            DropReason::BadDescriptor => "bad_descriptor",
            DropReason::Malformed(e) => e.name(),
        }
    }
}

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> Self {
        DropReason::Malformed(e)
    }
}

/// One counter per [`DropReason`].
#[derive(Debug)]
pub struct DropCounters {
    counts: [AtomicU64; DropReason::COUNT],
}

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl DropCounters {
    /// Counts `n` drops for `reason`.
    #[inline]
    pub fn add(&self, reason: DropReason, n: u64) {
        self.counts[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Drops counted for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The non-zero counters, by name.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        DropReason::all()
            .map(|r| (r.name(), self.get(r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// A port's link as its driver reports it (drivers that know: DPDK).
#[derive(Debug, Default)]
pub struct LinkState {
    up: std::sync::atomic::AtomicBool,
    changes: AtomicU64,
    speed_mbps: std::sync::atomic::AtomicU32,
}

impl LinkState {
    /// Records the link's speed in Mbit/s (0: unknown, or down).
    pub fn set_speed(&self, mbps: u32) {
        self.speed_mbps.store(mbps, Ordering::Relaxed);
    }

    /// The link's speed in Mbit/s as the driver last said (0: unknown).
    pub fn speed_mbps(&self) -> u32 {
        self.speed_mbps.load(Ordering::Relaxed)
    }

    /// Records the link as `up`; counts a change when it differs.
    pub fn set(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the link is up.
    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Changes seen since the port opened (down at first: the first up
    /// counts one).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }
}

/// Per-port counters: each port handle (a queue of a device) has its own,
/// counted by the worker that owns the handle, the only writer of the
/// packet and byte counts once the worker runs (a predecessor's counts
/// are added before), so each burst is counted with plain loads and
/// stores ([`add_own`]): locked adds would wait, at every burst, for the
/// stores of the copies before them.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Packets received.
    pub rx_packets: AtomicU64,
    /// Bytes received.
    pub rx_bytes: AtomicU64,
    /// Packets transmitted.
    pub tx_packets: AtomicU64,
    /// Bytes transmitted.
    pub tx_bytes: AtomicU64,
    /// Drops on this port, by reason.
    pub drops: DropCounters,
    /// The link, shared by every queue of the port, where the driver
    /// reports it.
    pub link: Option<Arc<LinkState>>,
    /// What the port is, where the driver says (a DPDK device's driver
    /// and name).
    pub device: Option<DeviceInfo>,
}

/// A DPDK device as its driver describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The driver (`net_e1000_igb_vf`, `net_vhost`, ...).
    pub driver: String,
    /// The device: its PCI address, or the vdev's name.
    pub name: String,
    /// Queue pairs in use.
    pub queues: u16,
    /// Queue pairs the device has (receive, transmit).
    pub max_queues: (u16, u16),
}

impl PortStats {
    /// Counts a received burst (by the handle's owner: see [`PortStats`]).
    #[inline]
    pub fn count_rx(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            add_own(&self.rx_packets, packets);
            add_own(&self.rx_bytes, bytes);
        }
    }

    /// Counts a transmitted burst (by the handle's owner: see
    /// [`PortStats`]).
    #[inline]
    pub fn count_tx(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            add_own(&self.tx_packets, packets);
            add_own(&self.tx_bytes, bytes);
        }
    }

    /// A consistent-enough copy for display.
    pub fn snapshot(&self) -> PortStatsSnapshot {
        PortStatsSnapshot {
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            drops: self.drops.total(),
        }
    }
}

/// Plain copy of [`PortStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortStatsSnapshot {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// Drops, all reasons.
    pub drops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_changes_count_transitions_only() {
        let l = LinkState::default();
        assert!(!l.is_up());
        l.set(false);
        assert_eq!(l.changes(), 0);
        l.set(true);
        l.set(true);
        assert!(l.is_up());
        l.set(false);
        assert_eq!(l.changes(), 2);
    }

    #[test]
    fn indexes_are_dense_and_names_unique() {
        let all: Vec<_> = DropReason::all().collect();
        assert_eq!(all.len(), DropReason::COUNT);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut names: Vec<_> = all.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        assert_eq!(DropReason::from_index(DropReason::COUNT), None);
    }

    #[test]
    fn counts_by_reason() {
        let c = DropCounters::default();
        c.add(DropReason::TxQueueFull, 3);
        c.add(ParseError::UdpBadLength.into(), 2);
        assert_eq!(c.get(DropReason::TxQueueFull), 3);
        assert_eq!(c.total(), 5);
        assert_eq!(
            c.nonzero(),
            vec![("tx_queue_full", 3), ("udp_bad_length", 2)]
        );
    }
}
