//! The traffic generator and latency meter behind `pollux pktgen`.
//!
//! One thread sends and receives: it builds frames from a [`Template`],
//! stamps each with a [`Signature`] (flow, per-flow sequence number, TSC
//! transmit time), sends them in bursts paced by the TSC ([`Pacer`]), and
//! feeds whatever comes back to a [`Meter`] (loss, reordering, duplicates,
//! an HDR latency histogram). It runs on any [`Port`]: rings, pcap files,
//! kernel interfaces, DPDK devices. A trial has a warm-up (sent, not
//! measured), a measured phase, and a drain that waits for stragglers.
//!
//! The transmit timestamp is read once per burst just before the frames are
//! built, so latency includes the time a frame waits in its own burst and in
//! the transmit queue, as it does for hardware generators that stamp on
//! enqueue. [`trial`]'s `--calibrate` counterpart in the front end measures
//! the generator back to back so that this bias can be stated.

pub mod frame;
pub mod meter;

pub use frame::{Proto, SIG_LEN, Signature, SpecError, Template, TrafficSpec, find_signature};
pub use meter::{Latency, Meter, RxCounts};

use crate::batch::{BURST, Batch};
use crate::buf::{BufAlloc, PacketBuf};
use crate::clock::TscClock;
use crate::port::Port;
use std::time::Duration;

/// Sends paced by the TSC: the schedule is `rate` packets per second from
/// the start, and [`Pacer::due`] says how many packets are owed now. A late
/// caller (preempted, or a slow port) catches up in bursts, so the average
/// rate over a trial is the requested one as long as the port keeps up.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: u64,
    /// Packets per tick; `None`: as fast as possible.
    per_tick: Option<f64>,
    sent: u64,
}

impl Pacer {
    /// A schedule of `pps` packets per second (`None`: unpaced) starting at
    /// raw time `start` on a clock of `hz` ticks per second.
    pub fn new(pps: Option<f64>, hz: u64, start: u64) -> Pacer {
        Pacer {
            start,
            per_tick: pps.map(|p| p / hz.max(1) as f64),
            sent: 0,
        }
    }

    /// Packets owed at raw time `now`, at most `max`.
    #[inline]
    pub fn due(&self, now: u64, max: usize) -> usize {
        match self.per_tick {
            None => max,
            Some(per_tick) => {
                // The packet numbered k is due at start + k / rate.
                let owed = (now.saturating_sub(self.start) as f64 * per_tick) as u64 + 1;
                owed.saturating_sub(self.sent).min(max as u64) as usize
            }
        }
    }

    /// Records `n` packets as sent.
    #[inline]
    pub fn sent(&mut self, n: usize) {
        self.sent += n as u64;
    }
}

/// One trial's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialConfig {
    /// Packets per second; `None`: as fast as the transmit port takes them.
    pub rate: Option<f64>,
    /// Measured phase.
    pub duration: Duration,
    /// Sent before the measured phase, not counted.
    pub warmup: Duration,
    /// After the last packet, how long to wait for packets still in flight.
    pub drain: Duration,
    /// Largest transmit burst (1 to 32).
    pub burst: usize,
}

impl Default for TrialConfig {
    fn default() -> Self {
        TrialConfig {
            rate: None,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(100),
            drain: Duration::from_millis(100),
            burst: BURST,
        }
    }
}

/// What a trial measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrialResult {
    /// The requested rate (packets/s), if paced.
    pub offered_pps: Option<f64>,
    /// Measured packets handed to the transmit port.
    pub tx: u64,
    /// Of those, refused by the port (its queue was full): lost at the
    /// device under test's door, and counted in the loss.
    pub tx_refused: u64,
    /// Packets not built because no buffer was free (not in `tx`).
    pub tx_no_buffer: u64,
    /// Length of the measured phase, by the TSC.
    pub seconds: f64,
    /// The receive side.
    pub rx: RxCounts,
    /// Latency of the measured packets received.
    pub latency: Latency,
}

impl TrialResult {
    /// Measured packets sent and never received.
    pub fn lost(&self) -> u64 {
        self.tx.saturating_sub(self.rx.unique())
    }

    /// `lost / tx` (0 when nothing was sent).
    pub fn loss_ratio(&self) -> f64 {
        if self.tx == 0 {
            0.0
        } else {
            self.lost() as f64 / self.tx as f64
        }
    }

    /// Transmit rate over the measured phase, packets/s.
    pub fn tx_pps(&self) -> f64 {
        self.tx as f64 / self.seconds.max(1e-9)
    }

    /// Distinct packets received per second of the measured phase.
    pub fn rx_pps(&self) -> f64 {
        self.rx.unique() as f64 / self.seconds.max(1e-9)
    }
}

/// Why a trial could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    /// The latency histogram could not be created.
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    /// The burst size is outside 1..=32.
    #[error("burst {0}: must be 1 to {BURST}")]
    Burst(usize),
}

/// Where a trial sends and receives.
pub trait Endpoints {
    /// The buffers both ends carry.
    type Buf: PacketBuf;
    /// Transmits a burst (see [`Port::tx_burst`]).
    fn send(&mut self, batch: &mut Batch<Self::Buf>) -> usize;
    /// Receives a burst (see [`Port::rx_burst`]).
    fn recv(&mut self, batch: &mut Batch<Self::Buf>) -> usize;
    /// Kicks the ports that send (see [`Port::kick`]): what the device did
    /// not take at a burst goes then, though no new burst comes.
    fn kick(&mut self);
}

/// Loop iterations between two kicks of a trial's sending port (as a
/// worker kicks its ports every few polls).
const KICK_EVERY: u32 = 64;

/// Send on one port, receive on another (the device under test forwards
/// from one to the other).
#[derive(Debug)]
pub struct Pair<'a, T, R>(pub &'a mut T, pub &'a mut R);

impl<B: PacketBuf, T: Port<Buf = B>, R: Port<Buf = B>> Endpoints for Pair<'_, T, R> {
    type Buf = B;
    #[inline]
    fn send(&mut self, batch: &mut Batch<B>) -> usize {
        self.0.tx_burst(batch)
    }
    #[inline]
    fn recv(&mut self, batch: &mut Batch<B>) -> usize {
        self.1.rx_burst(batch)
    }
    fn kick(&mut self) {
        self.0.kick();
    }
}

/// Send and receive on one port (the device under test sends traffic back,
/// e.g. testpmd's `macswap`).
#[derive(Debug)]
pub struct Duplex<'a, P>(pub &'a mut P);

impl<P: Port> Endpoints for Duplex<'_, P> {
    type Buf = P::Buf;
    #[inline]
    fn send(&mut self, batch: &mut Batch<P::Buf>) -> usize {
        self.0.tx_burst(batch)
    }
    #[inline]
    fn recv(&mut self, batch: &mut Batch<P::Buf>) -> usize {
        self.0.rx_burst(batch)
    }
    fn kick(&mut self) {
        self.0.kick();
    }
}

/// Runs one trial: warm-up, measured phase, drain.
pub fn trial<E: Endpoints, A: BufAlloc<Buf = E::Buf>>(
    ends: &mut E,
    alloc: A,
    tpl: &Template,
    clock: &TscClock,
    cfg: &TrialConfig,
) -> Result<TrialResult, TrialError> {
    if cfg.burst == 0 || cfg.burst > BURST {
        return Err(TrialError::Burst(cfg.burst));
    }
    let flows = tpl.spec().flows;
    let mut meter = Meter::new(flows, clock.clone())?;
    let mut seqs = vec![0u64; flows as usize];
    let start = clock.now();
    let warm_end = start + clock.ns_to_ticks(cfg.warmup.as_nanos() as u64);
    let end = warm_end + clock.ns_to_ticks(cfg.duration.as_nanos() as u64);
    let mut pacer = Pacer::new(cfg.rate, clock.hz(), start);
    let (mut tx, mut refused, mut no_buf) = (0u64, 0u64, 0u64);
    let mut warmup = true;
    let mut flow = 0u32;
    let mut txb = Batch::new();
    let mut rxb = Batch::new();
    let mut now = start;
    let mut iterations = 0u32;
    while now < end {
        iterations = iterations.wrapping_add(1);
        if iterations.is_multiple_of(KICK_EVERY) {
            ends.kick();
        }
        if warmup && now >= warm_end {
            // Measured packets number from 0 in every flow.
            warmup = false;
            seqs.fill(0);
        }
        let n = pacer.due(now, cfg.burst);
        if n > 0 {
            let ts = clock.now();
            let mut built = 0;
            for _ in 0..n {
                let Some(mut buf) = alloc.alloc_buf() else {
                    no_buf += 1;
                    continue;
                };
                let seq = seqs.get_mut(flow as usize).map_or(0, |s| {
                    *s += 1;
                    *s - 1
                });
                let sig = Signature {
                    warmup,
                    flow,
                    seq,
                    tx_ts: ts,
                };
                flow = if flow + 1 >= flows { 0 } else { flow + 1 };
                if let Ok(room) = buf.append(tpl.len())
                    && tpl.write(room, &sig)
                    && txb.push(buf).is_ok()
                {
                    built += 1;
                } else {
                    no_buf += 1;
                }
            }
            let sent = ends.send(&mut txb);
            // A port drops what it refused; make sure nothing lingers.
            txb.clear();
            if !warmup {
                tx += built as u64;
                refused += (built - sent.min(built)) as u64;
            }
            pacer.sent(n);
        }
        if ends.recv(&mut rxb) > 0 {
            let t = clock.now();
            for p in rxb.drain() {
                meter.frame(p.data(), t);
            }
        }
        now = clock.now();
    }
    let tx_end = now;
    // Drain: until every packet sent is accounted for, or the drain time.
    let drain_end = tx_end + clock.ns_to_ticks(cfg.drain.as_nanos() as u64);
    ends.kick();
    while meter.counts().unique() < tx - refused && clock.now() < drain_end {
        iterations = iterations.wrapping_add(1);
        if iterations.is_multiple_of(KICK_EVERY) {
            ends.kick();
        }
        if ends.recv(&mut rxb) > 0 {
            let t = clock.now();
            for p in rxb.drain() {
                meter.frame(p.data(), t);
            }
        }
    }
    let measured_from = warm_end.min(tx_end);
    Ok(TrialResult {
        offered_pps: cfg.rate,
        tx,
        tx_refused: refused,
        tx_no_buffer: no_buf,
        seconds: clock.ticks_to_ns(tx_end - measured_from) as f64 / 1e9,
        rx: meter.counts(),
        latency: meter.latency(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LinkInfo;
    use crate::pool::{HugePages, Pool, PoolConfig};
    use crate::port::ring;
    use crate::wire::MacAddr;
    use std::net::Ipv4Addr;

    #[test]
    fn pacer_keeps_the_schedule_on_a_simulated_clock() {
        // 1 GHz clock, 1 000 pps: one packet per 1 000 000 ticks.
        let hz = 1_000_000_000;
        for rate in [1_000.0, 250_000.0, 14_880_952.0] {
            let mut p = Pacer::new(Some(rate), hz, 5);
            let mut now = 5u64;
            let mut rng = 0x1234_5678u64;
            // Irregular polling: steps of 0 to 2 ms, some long stalls.
            while now < 5 + hz {
                let n = p.due(now, 32);
                p.sent(n);
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                now += (rng >> 33) % 2_000_000
                    + if rng.is_multiple_of(97) {
                        20_000_000
                    } else {
                        0
                    };
            }
            // Catch up at the end as a caller polling in a loop would.
            let mut guard = 0;
            while p.due(now, 32) > 0 && guard < 1_000_000 {
                let n = p.due(now, 32);
                p.sent(n);
                guard += 1;
            }
            let want = ((now - 5) as f64 * rate / hz as f64) as u64 + 1;
            assert_eq!(p.sent, want, "rate {rate}");
        }
        // Never more than `max` at once, and nothing owed before the start.
        let p = Pacer::new(Some(1e9), hz, 1_000);
        assert_eq!(p.due(1_000_000, 32), 32);
        assert_eq!(p.due(0, 32), 1, "the first packet is due at the start");
        assert_eq!(Pacer::new(None, hz, 0).due(0, 7), 7);
    }

    fn pool() -> Pool {
        let mut c = PoolConfig::new("pktgen-test", 8192);
        c.huge = HugePages::Never;
        Pool::new(&c).unwrap()
    }

    fn spec(flows: u32) -> TrafficSpec {
        TrafficSpec {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            src_ips: 1,
            dst_ip: Ipv4Addr::new(10, 0, 0, 2),
            proto: Proto::Udp,
            frame_size: 64,
            flows,
            sport: 1000,
            dport: 2000,
        }
    }

    #[test]
    fn back_to_back_ring_trial_accounts_every_packet() {
        let clock = TscClock::calibrate(Duration::from_millis(10));
        let (mut a, mut b) = ring::pair(
            LinkInfo::new("a", MacAddr::ZERO, "ring"),
            LinkInfo::new("b", MacAddr::ZERO, "ring"),
            4096,
        );
        let tpl = Template::new(&spec(10)).unwrap();
        let cfg = TrialConfig {
            rate: Some(50_000.0),
            duration: Duration::from_millis(200),
            warmup: Duration::from_millis(20),
            drain: Duration::from_millis(200),
            burst: 32,
        };
        let r = trial(&mut Pair(&mut a, &mut b), pool(), &tpl, &clock, &cfg).unwrap();
        assert!(r.tx > 0);
        assert_eq!(r.tx_refused, 0);
        assert_eq!(r.rx.received, r.tx, "{r:?}");
        assert_eq!(
            (r.lost(), r.rx.duplicates, r.rx.reordered, r.rx.foreign),
            (0, 0, 0, 0)
        );
        assert!(r.rx.warmup > 0, "warm-up packets are sent and not measured");
        assert_eq!(r.latency.count, r.tx);
        // Pacing, measured by the generator's own TSC: it never sends ahead
        // of the schedule, so the warm-up's and the measured phase's
        // packets together are at most rate * their time (plus the packet
        // due at the start). How closely it keeps up with the schedule
        // depends on the thread getting the CPU, which a test cannot
        // promise: the catch-up is checked on a simulated clock
        // (`pacer_keeps_the_schedule_on_a_simulated_clock`); here only a
        // quarter of the schedule is asked for, which a pacer that sends
        // far too little misses, and a loaded machine does not.
        let rate = cfg.rate.unwrap_or_default();
        let elapsed = r.seconds + cfg.warmup.as_secs_f64();
        let sent = (r.rx.warmup + r.tx) as f64;
        assert!(
            sent <= rate * elapsed * 1.001 + 1.0,
            "{sent} sent in {elapsed} s at {rate}/s"
        );
        assert!(
            sent >= rate * elapsed / 4.0,
            "{sent} sent in {elapsed} s at {rate}/s"
        );
    }

    /// A port that takes each burst and hands it to its ring only when
    /// kicked (a kernel socket whose kick failed).
    struct Held {
        inner: ring::RingPort<crate::pool::PoolBuf>,
        held: Vec<crate::pool::PoolBuf>,
        kicks: usize,
    }

    impl Port for Held {
        type Buf = crate::pool::PoolBuf;
        fn info(&self) -> &LinkInfo {
            self.inner.info()
        }
        fn stats(&self) -> &std::sync::Arc<crate::PortStats> {
            self.inner.stats()
        }
        fn rx_burst(&mut self, batch: &mut Batch<Self::Buf>) -> usize {
            self.inner.rx_burst(batch)
        }
        fn tx_burst(&mut self, batch: &mut Batch<Self::Buf>) -> usize {
            let n = batch.len();
            self.held.extend(batch.drain());
            n
        }
        fn kick(&mut self) {
            self.kicks += 1;
            let mut b = Batch::new();
            while !self.held.is_empty() {
                let k = self.held.len().min(BURST);
                for p in self.held.drain(..k) {
                    let _ = b.push(p);
                }
                self.inner.tx_burst(&mut b);
            }
        }
    }

    #[test]
    fn what_a_port_sends_only_when_kicked_arrives() {
        let clock = TscClock::calibrate(Duration::from_millis(10));
        let (a, mut b) = ring::pair(
            LinkInfo::new("a", MacAddr::ZERO, "ring"),
            LinkInfo::new("b", MacAddr::ZERO, "ring"),
            4096,
        );
        let mut a = Held {
            inner: a,
            held: Vec::new(),
            kicks: 0,
        };
        let tpl = Template::new(&spec(10)).unwrap();
        let cfg = TrialConfig {
            rate: Some(20_000.0),
            duration: Duration::from_millis(100),
            warmup: Duration::ZERO,
            drain: Duration::from_secs(5),
            burst: 8,
        };
        let r = trial(&mut Pair(&mut a, &mut b), pool(), &tpl, &clock, &cfg).unwrap();
        assert!(r.tx > 0);
        assert_eq!((r.rx.received, r.lost()), (r.tx, 0), "{r:?}");
        // Without a drain: the last kick, after the last send, hands the
        // ring every packet (those it received, and the rest left in the
        // ring); a kick while sending (any but the last) was followed by a
        // receive in the same pass, which found what it handed over.
        let no_drain = TrialConfig {
            drain: Duration::ZERO,
            ..cfg
        };
        a.kicks = 0;
        let r = trial(&mut Pair(&mut a, &mut b), pool(), &tpl, &clock, &no_drain).unwrap();
        let mut left = 0;
        let mut rest = Batch::new();
        while b.rx_burst(&mut rest) > 0 {
            left += rest.len() as u64;
            rest.clear();
        }
        assert_eq!(r.rx.received + left, r.tx, "{r:?}");
        assert!(
            a.kicks == 1 || r.rx.received > 0,
            "{} kicks: {r:?}",
            a.kicks
        );
    }

    #[test]
    fn a_full_ring_is_counted_as_refused_and_lost() {
        let clock = TscClock::calibrate(Duration::from_millis(10));
        // Nobody drains b, and rx is polled on a third, idle port: the
        // 64-packet ring fills and the rest is refused.
        let (mut a, _b) = ring::pair(
            LinkInfo::new("a", MacAddr::ZERO, "ring"),
            LinkInfo::new("b", MacAddr::ZERO, "ring"),
            64,
        );
        let (mut c, _d) = ring::pair::<crate::pool::PoolBuf>(
            LinkInfo::new("c", MacAddr::ZERO, "ring"),
            LinkInfo::new("d", MacAddr::ZERO, "ring"),
            64,
        );
        let tpl = Template::new(&spec(1)).unwrap();
        let cfg = TrialConfig {
            rate: Some(10_000.0),
            duration: Duration::from_millis(50),
            warmup: Duration::ZERO,
            drain: Duration::from_millis(1),
            burst: 8,
        };
        let r = trial(&mut Pair(&mut a, &mut c), pool(), &tpl, &clock, &cfg).unwrap();
        assert_eq!(r.tx_refused, r.tx - 64, "{r:?}");
        assert_eq!(r.lost(), r.tx);
        assert!((r.loss_ratio() - 1.0).abs() < 1e-9);
        let bad = TrialConfig { burst: 33, ..cfg };
        assert!(matches!(
            trial(&mut Pair(&mut a, &mut c), pool(), &tpl, &clock, &bad),
            Err(TrialError::Burst(33))
        ));
    }
}
