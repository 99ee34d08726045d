//! Live capture: copies of the frames a worker receives from a port and
//! sends to it (after the switch's rewrite), for `pollux ctl capture`.
//!
//! One [`Tap`] is shared by every worker and the control thread. While it
//! is disarmed (the usual case) a worker pays one atomic load per poll and
//! nothing per packet. Armed, each packet of the chosen port that matches
//! the [`Filter`] is copied (up to the snap length) into a record taken
//! from a pool of records made when the tap was first armed, and queued
//! for the
//! control thread; when no record is free the packet is counted as
//! missed, never waited for. The capture ends by itself after its count of
//! packets or at its deadline.

use crate::parse::parse;
use crate::{L3, Parsed};
use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which way a captured frame went through its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Received from the port.
    Rx,
    /// Sent to the port.
    Tx,
}

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Record {
    /// When: the worker's clock, in ticks.
    pub ticks: u64,
    /// The port.
    pub port: u16,
    /// Received or sent.
    pub way: Way,
    /// The frame's length on the wire.
    pub len: u32,
    /// Its first bytes (up to the snap length).
    pub data: Vec<u8>,
}

/// Why a capture filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A word the filter does not know where it stands.
    #[error(
        "filter: {0:?} is not understood here (terms: host A, src host A, dst host A, port N, src port N, dst port N, tcp, udp, icmp, icmp6, arp, ip, ip6, joined by \"and\")"
    )]
    Unknown(String),
    /// A term without its value.
    #[error("filter: {0:?} needs a value")]
    Missing(String),
    /// A value that is not an address or a port.
    #[error("filter: {0:?} is not {1}")]
    BadValue(String, &'static str),
}

/// One term of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Term {
    Host(Side, [u8; 16]),
    Port(Side, u16),
    Proto(u8),
    Arp,
    Ip4,
    Ip6,
}

/// Which end of a packet a term looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
    Either,
}

/// A capture filter: the subset of tcpdump's expressions that names
/// hosts, ports and protocols, every term required (`and`). The empty
/// filter matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    terms: Vec<Term>,
}

impl std::str::FromStr for Filter {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Filter, FilterError> {
        let mut words = s.split_whitespace().peekable();
        let mut terms = Vec::new();
        while let Some(w) = words.next() {
            let side = match w {
                "src" => Some(Side::Src),
                "dst" => Some(Side::Dst),
                _ => None,
            };
            let w = match side {
                Some(_) => words.next().ok_or_else(|| FilterError::Missing(w.into()))?,
                None => w,
            };
            let side = side.unwrap_or(Side::Either);
            let mut value = |what: &str| {
                words
                    .next()
                    .map(str::to_string)
                    .ok_or_else(|| FilterError::Missing(what.into()))
            };
            let term = match w {
                "and" | "&&" if side == Side::Either => continue,
                "host" => {
                    let v = value("host")?;
                    let a: IpAddr = v
                        .parse()
                        .map_err(|_| FilterError::BadValue(v.clone(), "an address"))?;
                    Term::Host(side, crate::key::to16(a))
                }
                "port" => {
                    let v = value("port")?;
                    let p = v
                        .parse()
                        .map_err(|_| FilterError::BadValue(v.clone(), "a port"))?;
                    Term::Port(side, p)
                }
                "tcp" if side == Side::Either => Term::Proto(6),
                "udp" if side == Side::Either => Term::Proto(17),
                "icmp" if side == Side::Either => Term::Proto(1),
                "icmp6" if side == Side::Either => Term::Proto(58),
                "arp" if side == Side::Either => Term::Arp,
                "ip" if side == Side::Either => Term::Ip4,
                "ip6" if side == Side::Either => Term::Ip6,
                other => return Err(FilterError::Unknown(other.into())),
            };
            terms.push(term);
        }
        Ok(Filter { terms })
    }
}

impl Filter {
    /// True when the frame (parsed as `p`, `None` when it does not parse)
    /// matches every term.
    pub fn matches(&self, p: Option<&Parsed>) -> bool {
        self.terms.iter().all(|t| {
            let Some(p) = p else { return false };
            let k = &p.key;
            let ip = p.is_ip();
            match *t {
                Term::Host(s, a) => {
                    ip && match s {
                        Side::Src => k.src_ip == a,
                        Side::Dst => k.dst_ip == a,
                        Side::Either => k.src_ip == a || k.dst_ip == a,
                    }
                }
                Term::Port(s, n) => {
                    ip && p.has_l4
                        && matches!(k.proto, 6 | 17)
                        && match s {
                            Side::Src => k.src_port == n,
                            Side::Dst => k.dst_port == n,
                            Side::Either => k.src_port == n || k.dst_port == n,
                        }
                }
                Term::Proto(n) => ip && k.proto == n,
                Term::Arp => p.l3 == L3::Arp,
                Term::Ip4 => p.l3 == L3::Ipv4,
                Term::Ip6 => p.l3 == L3::Ipv6,
            }
        })
    }

    /// [`Filter::matches`] on a frame, parsed only when a term needs it.
    pub fn matches_frame(&self, f: &[u8]) -> bool {
        self.is_empty() || self.matches(parse(f, 0).ok().as_ref())
    }

    /// True for the empty filter.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

/// What an armed tap captures.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// The port (`None`: every port).
    pub port: Option<u16>,
    /// Which frames.
    pub filter: Filter,
    /// Bytes kept of each frame.
    pub snaplen: usize,
}

/// When a per-packet tool (live capture, live trace) is on, and for which
/// packets: armed with a [`Spec`], a count of packets and a deadline, it
/// disarms itself when either is spent. Workers read it once per poll
/// ([`Trigger::session`]); one atomic load while it is off.
#[derive(Default)]
pub struct Trigger {
    armed: AtomicBool,
    spec: ArcSwapOption<Spec>,
    /// Packets still to take.
    remaining: AtomicU64,
    /// The worker clock's tick after which it ends.
    deadline: AtomicU64,
    /// Packets taken ([`Claim`]s alive) whose records are not queued yet.
    recording: AtomicU64,
}

/// One packet taken of a [`Trigger`]'s count, held while its record is
/// made and queued: until every claim is dropped the trigger is still
/// [`Trigger::running`], though the last claim turned it off for the
/// workers.
#[must_use = "the trigger runs until the claim is dropped"]
pub struct Claim<'a>(&'a Trigger);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.recording.fetch_sub(1, Ordering::Release);
    }
}

impl Trigger {
    /// On for `count` packets that `spec` selects, until the worker clock
    /// reads `deadline` ticks.
    pub fn arm(&self, spec: Spec, count: u64, deadline: u64) {
        self.disarm();
        let snaplen = spec.snaplen.clamp(1, MAX_SNAPLEN);
        self.spec.store(Some(Arc::new(Spec { snaplen, ..spec })));
        self.remaining.store(count, Ordering::Relaxed);
        self.deadline.store(deadline, Ordering::Relaxed);
        self.armed.store(count > 0, Ordering::Release);
    }

    /// Off.
    pub fn disarm(&self) {
        // (Sequentially consistent, as `claim` and `running` read it: see
        // `claim`.)
        self.armed.store(false, Ordering::SeqCst);
    }

    /// True while on: workers take packets.
    #[inline]
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// True while on, or while a packet it took is still being recorded:
    /// false once every record it will have is queued, which is what a
    /// reader waits for.
    pub fn running(&self) -> bool {
        // (See `claim`: a reader that sees the trigger off, then no claim
        // alive, sees every claim that will succeed.)
        self.armed.load(Ordering::SeqCst) || self.recording.load(Ordering::SeqCst) > 0
    }

    /// What a worker takes in this poll (`now`: its clock's ticks):
    /// `None` unless on and before the deadline (past it, it turns off).
    #[inline]
    pub fn session(&self, now: u64) -> Option<Arc<Spec>> {
        if !self.is_armed() {
            return None;
        }
        if now > self.deadline.load(Ordering::Relaxed) {
            self.disarm();
            return None;
        }
        self.spec.load_full()
    }

    /// Takes one packet of the count, to be held until its record is
    /// queued: `None` when it is off (stopped, past its deadline) or none
    /// is left (another worker took the last). The last turns it off.
    pub fn claim(&self) -> Option<Claim<'_>> {
        // Counted first, then the trigger checked (both sequentially
        // consistent, as the disarm and `running`'s reads): a claim either
        // sees the trigger off and takes nothing, or is counted before a
        // reader can see it off with no claim alive. (A worker holds a
        // session from before a stop, a deadline or the count's end for
        // the rest of its burst.)
        self.recording.fetch_add(1, Ordering::SeqCst);
        let claim = Claim(self);
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let left = self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        match left {
            Ok(1) => {
                self.disarm();
                Some(claim)
            }
            Ok(_) => Some(claim),
            Err(_) => {
                self.disarm();
                None
            }
        }
    }
}

impl Spec {
    /// True when this spec takes frame `f` on port `port`.
    pub fn selects(&self, port: usize, f: &[u8]) -> bool {
        self.port.is_none_or(|p| usize::from(p) == port) && self.filter.matches_frame(f)
    }

    /// [`Spec::selects`] for a frame parsed already (`None`: it did not
    /// parse).
    pub fn selects_parsed(&self, port: usize, p: Option<&Parsed>) -> bool {
        self.port.is_none_or(|x| usize::from(x) == port) && self.filter.matches(p)
    }
}

/// The shared state of live capture (see the module's documentation).
pub struct Tap {
    trigger: Trigger,
    free: ArrayQueue<Record>,
    full: ArrayQueue<Record>,
    /// Records made so far (at the first arming, by the control thread).
    made: std::sync::atomic::AtomicUsize,
    captured: AtomicU64,
    missed: AtomicU64,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("armed", &self.is_armed())
            .field("captured", &self.captured())
            .field("missed", &self.missed())
            .finish()
    }
}

/// The largest snap length: a pool buffer.
pub const MAX_SNAPLEN: usize = crate::pool::DEFAULT_BUF_SIZE;

impl Tap {
    /// A disarmed tap for up to `records` frames waiting to be read. Its
    /// records of [`MAX_SNAPLEN`] bytes are made when it is first armed
    /// (by the caller of [`Tap::arm`]): a process that never captures
    /// holds none, and capturing allocates nothing.
    pub fn new(records: usize) -> Arc<Tap> {
        let records = records.max(1);
        Arc::new(Tap {
            trigger: Trigger::default(),
            free: ArrayQueue::new(records),
            full: ArrayQueue::new(records),
            made: std::sync::atomic::AtomicUsize::new(0),
            captured: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        })
    }

    /// Starts capturing `count` frames as `spec` says, until the worker
    /// clock reads `deadline` ticks; the counts start from zero and what
    /// an earlier capture left unread is discarded.
    pub fn arm(&self, spec: Spec, count: u64, deadline: u64) {
        self.disarm();
        while let Some(r) = self.full.pop() {
            let _ = self.free.push(r);
        }
        while self.made.load(Ordering::Relaxed) < self.free.capacity() {
            let r = Record {
                ticks: 0,
                port: 0,
                way: Way::Rx,
                len: 0,
                data: Vec::with_capacity(MAX_SNAPLEN),
            };
            if self.free.push(r).is_err() {
                break;
            }
            self.made.fetch_add(1, Ordering::Relaxed);
        }
        self.captured.store(0, Ordering::Relaxed);
        self.missed.store(0, Ordering::Relaxed);
        self.trigger.arm(spec, count, deadline);
    }

    /// Stops capturing (what was captured stays to be read).
    pub fn disarm(&self) {
        self.trigger.disarm();
    }

    /// True while capturing.
    #[inline]
    pub fn is_armed(&self) -> bool {
        self.trigger.is_armed()
    }

    /// True while capturing, or while a frame taken is still being copied:
    /// false once every frame this capture takes is ready to be read.
    pub fn running(&self) -> bool {
        self.trigger.running()
    }

    /// Frames captured so far.
    pub fn captured(&self) -> u64 {
        self.captured.load(Ordering::Relaxed)
    }

    /// Frames that matched while no record was free (the reader was
    /// behind): not captured.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// Takes the captured frames in `out` (each record's buffer goes back
    /// to the pool once the caller returns it with [`Tap::give_back`]).
    pub fn take(&self, out: &mut Vec<Record>) {
        while let Some(r) = self.full.pop() {
            out.push(r);
        }
    }

    /// Returns records [`Tap::take`] handed out.
    pub fn give_back(&self, records: impl IntoIterator<Item = Record>) {
        for r in records {
            let _ = self.free.push(r);
        }
    }

    /// What a worker captures in this poll: `None` unless armed and
    /// before the deadline (past it, the tap disarms).
    #[inline]
    pub fn session(&self, now: u64) -> Option<Arc<Spec>> {
        self.trigger.session(now)
    }

    /// Captures the frames of `frames` that `spec` selects, which went
    /// `way` through port `port` at `ticks`.
    pub fn capture<'a>(
        &self,
        spec: &Spec,
        port: usize,
        way: Way,
        ticks: u64,
        frames: impl Iterator<Item = &'a [u8]>,
    ) {
        if spec.port.is_some_and(|p| usize::from(p) != port) {
            return;
        }
        for f in frames {
            if !spec.filter.matches_frame(f) {
                continue;
            }
            // (Spent by another worker: what follows is no miss.)
            if !self.trigger.is_armed() {
                return;
            }
            let Some(mut r) = self.free.pop() else {
                self.missed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(_claim) = self.trigger.claim() else {
                let _ = self.free.push(r);
                return;
            };
            r.ticks = ticks;
            r.port = port as u16;
            r.way = way;
            r.len = f.len() as u32;
            r.data.clear();
            r.data.extend_from_slice(f.get(..spec.snaplen).unwrap_or(f));
            match self.full.push(r) {
                Ok(()) => {
                    self.captured.fetch_add(1, Ordering::Relaxed);
                }
                Err(r) => {
                    let _ = self.free.push(r);
                    self.missed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut f, b"hello")
            .unwrap();
        f
    }

    #[test]
    fn filters_read_as_tcpdump_reads_them() {
        let f: Filter = "host 10.0.0.1 and udp and dst port 53".parse().unwrap();
        let yes = udp([10, 0, 0, 1], [10, 0, 0, 2], 4000, 53);
        let back = udp([10, 0, 0, 2], [10, 0, 0, 1], 53, 4000);
        let p = |f: &[u8]| parse(f, 0).ok();
        assert!(f.matches(p(&yes).as_ref()));
        assert!(!f.matches(p(&back).as_ref()), "dst port 53 only");
        let either: Filter = "port 53".parse().unwrap();
        assert!(either.matches(p(&back).as_ref()));
        let tcp: Filter = "tcp".parse().unwrap();
        assert!(!tcp.matches(p(&yes).as_ref()));
        assert!(Filter::default().matches(None));
        assert!(!either.matches(None));
        assert_eq!(
            "host".parse::<Filter>(),
            Err(FilterError::Missing("host".into()))
        );
        assert_eq!(
            "port http".parse::<Filter>(),
            Err(FilterError::BadValue("http".into(), "a port"))
        );
        assert!(matches!(
            "net 10.0.0.0/8".parse::<Filter>(),
            Err(FilterError::Unknown(w)) if w == "net"
        ));
        assert!(matches!(
            "src tcp".parse::<Filter>(),
            Err(FilterError::Unknown(_))
        ));
    }

    #[test]
    fn a_tap_captures_its_count_then_stops_and_counts_what_it_missed() {
        let tap = Tap::new(2);
        let frames: Vec<Vec<u8>> = (0..5)
            .map(|i| udp([10, 0, 0, 1], [10, 0, 0, 2], 4000 + i, 53))
            .collect();
        let spec = |port| Spec {
            port,
            filter: Filter::default(),
            snaplen: 20,
        };
        // Disarmed: nothing.
        assert!(tap.session(0).is_none());
        tap.arm(spec(Some(1)), 3, 100);
        let s = tap.session(5).unwrap();
        // Another port: nothing.
        tap.capture(&s, 0, Way::Rx, 5, frames.iter().map(|f| f.as_slice()));
        assert_eq!(tap.captured(), 0);
        // Two records: two captured, the other three missed (the reader
        // is behind), which leaves one of the count.
        tap.capture(&s, 1, Way::Tx, 6, frames.iter().map(|f| f.as_slice()));
        assert_eq!((tap.captured(), tap.missed()), (2, 3));
        assert!(tap.is_armed());
        let mut got = Vec::new();
        tap.take(&mut got);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].data, frames[0][..20]);
        assert_eq!(got[0].len as usize, frames[0].len());
        assert_eq!((got[1].port, got[1].way, got[1].ticks), (1, Way::Tx, 6));
        tap.give_back(got);
        // The last of the count ends the capture.
        tap.capture(&s, 1, Way::Rx, 7, frames.iter().map(|f| f.as_slice()));
        assert_eq!((tap.captured(), tap.missed()), (3, 3));
        assert!(!tap.is_armed());
        // The deadline ends a capture too.
        tap.arm(spec(None), 10, 100);
        assert!(tap.session(101).is_none());
        assert!(!tap.is_armed());
        assert!(!tap.running());
    }

    #[test]
    fn a_trigger_runs_until_the_record_of_its_last_packet_is_in() {
        let t = Trigger::default();
        assert!(t.claim().is_none(), "off: nothing to take");
        assert!(!t.running());
        t.arm(Spec::default(), 2, u64::MAX);
        let first = t.claim().unwrap();
        let last = t.claim().unwrap();
        // The last packet turns it off for the workers...
        assert!(!t.is_armed());
        assert!(t.claim().is_none());
        // ...but it runs while either record is being made.
        assert!(t.running());
        drop(last);
        assert!(t.running());
        drop(first);
        assert!(!t.running());
        // Stopped with some of the count left: a worker still holding its
        // session takes nothing.
        t.arm(Spec::default(), 5, u64::MAX);
        assert!(t.session(0).is_some());
        t.disarm();
        assert!(t.claim().is_none());
        assert!(!t.running());
    }
}
