//! Flow logs: a record of each flow the switch forwarded or denied, for the
//! control thread to export (as IPFIX).
//!
//! A flow's record is made when it leaves the flow table (idle, closed,
//! or removed), and for a long flow also every active timeout, from the
//! expiry sweep; a first packet the security groups deny makes a record at
//! once. Records are fixed-size and go through one bounded lock-free queue
//! shared by the workers: a full queue counts the record as lost, it never
//! makes a worker wait. Nothing here runs per forwarded packet: a hit
//! updates the packet and byte counts it always did, and the record is
//! made from them later.

use crossbeam_queue::ArrayQueue;
use dataplane::FlowKey;
use std::sync::atomic::{AtomicU64, Ordering};

/// A security-group rule that decided a flow: the group (its index in
/// [`crate::policy::Policy::nsgs`]), the direction of its rule list (0
/// outbound, 1 inbound) and the rule (its index in that list, priority
/// order), under the policy generation the flow was decided in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// The group; [`RuleRef::NONE`]'s when no group was consulted.
    pub nsg: u16,
    /// 0: the outbound rules, 1: the inbound rules.
    pub dir: u8,
    /// The rule; [`RuleRef::NO_MATCH`] when none matched (denied by the
    /// group's default).
    pub rule: u16,
}

impl RuleRef {
    /// No group consulted.
    pub const NONE: RuleRef = RuleRef {
        nsg: u16::MAX,
        dir: 0,
        rule: u16::MAX,
    };
    /// The `rule` value of a group whose rules did not match.
    pub const NO_MATCH: u16 = u16::MAX;

    /// True when a group was consulted.
    pub fn is_some(self) -> bool {
        self.nsg != u16::MAX
    }
}

/// What the slow path's security groups decided a packet by, for the
/// flows installed and the flow log's denied records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decided {
    /// The source's outbound rule, the destination's inbound rule.
    pub rules: [RuleRef; 2],
    /// The key the denying group was asked about.
    pub asked: Option<FlowKey>,
    /// True when the groups were consulted (a tracked connection's later
    /// packets are not: its flows keep the rules that admitted it).
    pub judged: bool,
}

impl Default for RuleRef {
    fn default() -> Self {
        RuleRef::NONE
    }
}

/// [`Decided`] as the slow path fills it in, a cell per part: a group's
/// verdict writes its own rule, not the whole record (read and written
/// back whole, twice per group, it cost a new connection about a hundred
/// instructions).
#[derive(Debug, Default)]
pub(crate) struct DecidedCell {
    rules: [std::cell::Cell<RuleRef>; 2],
    asked: std::cell::Cell<Option<FlowKey>>,
    judged: std::cell::Cell<bool>,
}

impl DecidedCell {
    /// What was decided so far.
    pub(crate) fn get(&self) -> Decided {
        let [out, inn] = &self.rules;
        Decided {
            rules: [out.get(), inn.get()],
            asked: self.asked.get(),
            judged: self.judged.get(),
        }
    }

    /// Nothing decided yet (a new packet on the slow path).
    pub(crate) fn reset(&self) {
        for r in &self.rules {
            r.set(RuleRef::NONE);
        }
        self.asked.set(None);
        self.judged.set(false);
    }

    /// The groups are being consulted.
    pub(crate) fn judge(&self) {
        self.judged.set(true);
    }

    /// The rule that decided side `side` (0 outbound, 1 inbound).
    pub(crate) fn set_rule(&self, side: usize, r: RuleRef) {
        if let Some(c) = self.rules.get(side) {
            c.set(r);
        }
    }

    /// The key the denying group was asked about.
    pub(crate) fn set_asked(&self, key: FlowKey) {
        self.asked.set(Some(key));
    }
}

/// Why a record was made (IPFIX `flowEndReason` and `firewallEvent` follow
/// from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// The flow was idle for the idle timeout.
    Idle,
    /// The flow saw FIN or RST and then its closing timeout passed.
    Closed,
    /// The flow goes on: its active timeout passed since its last record.
    Active,
    /// Removed before its time (a flow deletion through the API, a
    /// connection taken over by the SYN proxy).
    Forced,
    /// A first packet the security groups denied: nothing was installed.
    Denied,
}

/// One record: a flow's identity, its decision and what it carried since
/// its last record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRecord {
    /// Why it was made.
    pub end: FlowEnd,
    /// The switch port the flow arrives on.
    pub in_port: u16,
    /// The port it leaves by (`None`: denied, nothing sent;
    /// [`crate::flow::HAIRPIN_PORT`]: back into the switch).
    pub out_port: Option<u16>,
    /// Its key as received.
    pub key: FlowKey,
    /// Its key after the switch's rewrite (NAT); the same as `key` without.
    pub post: FlowKey,
    /// The first packet this record covers (worker clock, ns).
    pub first_ns: u64,
    /// The last packet it covers (worker clock, ns).
    pub last_ns: u64,
    /// Packets it covers.
    pub packets: u64,
    /// IP bytes of those packets.
    pub bytes: u64,
    /// The rules that decided it: the source VM's outbound rule, the
    /// destination VM's inbound rule.
    pub rules: [RuleRef; 2],
    /// True for the direction that opened the connection, false for its
    /// replies.
    pub initiator: bool,
    /// The policy generation its rules were decided under (what names
    /// them).
    pub generation: u64,
}

/// Denied first packets a worker records at most, a second (after a burst
/// of as many): a flood of denied packets, each a record (nothing is
/// installed for them), must not crowd the flows' records out of the
/// queue. The rest are counted.
pub const DENIED_RECORDS_PER_SEC: u64 = 1000;

/// Flow-log counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowLogStats {
    /// Records the workers queued.
    pub queued: u64,
    /// Records lost: the queue was full, or the log was turned off with
    /// them unsent.
    pub lost: u64,
    /// Denied packets not recorded: over a worker's
    /// [`DENIED_RECORDS_PER_SEC`].
    pub suppressed: u64,
}

/// The counters, on a cache line of their own (the workers write them;
/// `active_ns`, which every record reads, stays apart).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counters {
    queued: AtomicU64,
    lost: AtomicU64,
    suppressed: AtomicU64,
}

/// The queue of records between the workers and the control thread, and
/// whether the workers make them at all.
#[derive(Debug)]
pub struct FlowLog {
    queue: ArrayQueue<FlowRecord>,
    /// 0: no records are made; otherwise the active timeout (ns), the
    /// longest a flow goes without a record.
    active_ns: AtomicU64,
    counts: Counters,
}

impl FlowLog {
    /// A flow log holding up to `records` records unread, off.
    pub fn new(records: usize) -> std::sync::Arc<FlowLog> {
        std::sync::Arc::new(FlowLog {
            queue: ArrayQueue::new(records.max(1)),
            active_ns: AtomicU64::new(0),
            counts: Counters::default(),
        })
    }

    /// Turns records on, with long flows reported every `active`; or off
    /// (`None`).
    pub fn set(&self, active: Option<std::time::Duration>) {
        let ns = active.map_or(0, |d| (d.as_nanos() as u64).max(1));
        self.active_ns.store(ns, Ordering::Relaxed);
    }

    /// The active timeout (ns) when records are made, else `None`.
    #[inline]
    pub fn active_ns(&self) -> Option<u64> {
        match self.active_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(ns),
        }
    }

    /// Queues `r`, or counts it lost when the queue is full.
    pub fn push(&self, r: FlowRecord) {
        if self.queue.push(r).is_ok() {
            self.counts.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a denied packet not recorded (over the rate).
    pub fn suppressed(&self) {
        self.counts.suppressed.fetch_add(1, Ordering::Relaxed);
    }

    /// Empties the queue, counting what it held as lost: the log is off.
    pub fn discard(&self) {
        while self.queue.pop().is_some() {
            self.counts.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The oldest record waiting.
    pub fn pop(&self) -> Option<FlowRecord> {
        self.queue.pop()
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when no record waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> FlowLogStats {
        FlowLogStats {
            queued: self.counts.queued.load(Ordering::Relaxed),
            lost: self.counts.lost.load(Ordering::Relaxed),
            suppressed: self.counts.suppressed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(p: u16) -> FlowRecord {
        FlowRecord {
            end: FlowEnd::Idle,
            in_port: p,
            out_port: Some(1),
            key: FlowKey::default(),
            post: FlowKey::default(),
            first_ns: 1,
            last_ns: 2,
            packets: 3,
            bytes: 4,
            rules: [RuleRef::NONE; 2],
            initiator: true,
            generation: 1,
        }
    }

    #[test]
    fn a_full_queue_counts_losses_and_keeps_the_oldest() {
        let log = FlowLog::new(2);
        assert_eq!(log.active_ns(), None);
        log.set(Some(std::time::Duration::from_secs(60)));
        assert_eq!(log.active_ns(), Some(60_000_000_000));
        for p in 0..5 {
            log.push(record(p));
        }
        assert_eq!(
            log.stats(),
            FlowLogStats {
                queued: 2,
                lost: 3,
                suppressed: 0
            }
        );
        assert_eq!(log.pop().map(|r| r.in_port), Some(0));
        assert_eq!(log.pop().map(|r| r.in_port), Some(1));
        assert!(log.pop().is_none());
        log.set(None);
        assert_eq!(log.active_ns(), None);
    }
}
