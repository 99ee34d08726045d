//! The poll loop: one worker per core, run to completion.
//!
//! A [`Worker`] owns a set of ports and a [`Pipeline`]. It polls every port
//! with `rx_burst`, hands each non-empty burst to the pipeline, which sends
//! packets through a [`Ctx`] into per-output-port transmit batches, and flushes
//! those with `tx_burst` after every burst. Every few polls it kicks each
//! port (`Port::kick`), so that frames a kernel refused to take wait for no
//! new traffic. It stops when its stop flag is set.
//! Ports are called through `dyn Port` once per burst; the pipeline is a
//! generic parameter, so there is no per-packet dynamic dispatch.

use crate::batch::{BURST, Batch};
use crate::buf::PacketBuf;
use crate::capture::{Spec, Tap, Way};
use crate::clock::TscClock;
use crate::port::Port;
use crate::stats::{DropCounters, DropReason};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A port owned by a worker.
pub type PortBox<B> = Box<dyn Port<Buf = B>>;

/// What a worker does with a received burst.
pub trait Pipeline<B: PacketBuf>: Send {
    /// Processes `pkts`, received on port `in_port`: each packet is either
    /// sent with [`Ctx::send`] or dropped with [`Ctx::drop_packet`]. Packets
    /// left in `pkts` are dropped and counted as [`DropReason::NoRoute`].
    fn process(&mut self, ctx: &mut Ctx<'_, B>, in_port: usize, pkts: &mut Batch<B>);

    /// Called once per poll iteration before the ports, for packets that
    /// reach the pipeline other than through a port (handed over by another
    /// worker) and for its timers. Returns how many packets it processed.
    /// Work that moves no packet is noted with [`Ctx::note_work`]; a call
    /// that does neither is not timed apart (cycle accounting counts it
    /// with the worker's I/O). The default has none.
    fn poll(&mut self, _ctx: &mut Ctx<'_, B>) -> usize {
        0
    }

    /// Called on the worker's thread, pinned to its core, at the start of
    /// each [`Worker::run`], before its first poll: for work that belongs
    /// on that core but not on the packet path (committing the tables'
    /// memory). The default does nothing.
    fn start(&mut self) {}
}

/// The pipeline's view of its worker during one burst.
pub struct Ctx<'a, B: PacketBuf> {
    ports: &'a mut [PortBox<B>],
    pending: &'a mut [Batch<B>],
    drops: &'a DropCounters,
    now: u64,
    /// The live capture of this poll, when one is on.
    tap: Option<(&'a Tap, &'a Spec)>,
    /// Packets the ports took so far in this poll.
    sent: u64,
    /// The pipeline's `poll` did work that moved no packet
    /// ([`Ctx::note_work`]).
    worked: bool,
}

impl<B: PacketBuf> Ctx<'_, B> {
    /// Queues `pkt` for transmission on `port` (flushing that port's batch
    /// first if it is full). An unknown port drops it as `NoRoute`.
    #[inline]
    pub fn send(&mut self, port: usize, pkt: B) {
        // (A port has a batch exactly when it exists.)
        let Some(out) = self.pending.get_mut(port) else {
            self.drops.add(DropReason::NoRoute, 1);
            return;
        };
        if let Err(pkt) = out.push(pkt) {
            self.send_full(port, pkt);
        }
    }

    /// Sends `port`'s full batch, then queues `pkt` (kept out of
    /// [`Ctx::send`], which is inlined per packet).
    #[cold]
    #[inline(never)]
    fn send_full(&mut self, port: usize, pkt: B) {
        let (Some(out), Some(p)) = (self.pending.get_mut(port), self.ports.get_mut(port)) else {
            self.drops.add(DropReason::NoRoute, 1);
            return;
        };
        if let Some((tap, spec)) = self.tap {
            tap.capture(spec, port, Way::Tx, self.now, out.iter().map(|b| b.data()));
        }
        self.sent += p.tx_burst(out) as u64;
        // Cannot fail: the batch was just emptied.
        let _ = out.push(pkt);
    }

    /// Drops `pkt`, counting `reason` in the worker's counters.
    #[inline]
    pub fn drop_packet(&mut self, pkt: B, reason: DropReason) {
        self.drops.add(reason, 1);
        drop(pkt);
    }

    /// The clock reading taken at the start of this poll iteration.
    #[inline]
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Tells the worker that this call of [`Pipeline::poll`] did work
    /// though it moved no packet (timers, expiry, a control request), so
    /// that cycle accounting times it: the pipeline's in a poll that also
    /// received packets (an idle poll is idle throughout).
    #[inline]
    pub fn note_work(&mut self) {
        self.worked = true;
    }

    /// Number of ports of the worker.
    pub fn n_ports(&self) -> usize {
        self.ports.len()
    }

    /// Sends every queued packet now, rather than when the pipeline has
    /// done with the burst: a pipeline that has work left which would hold
    /// back those packets (the slow path of the burst's new connections,
    /// after its established flows' packets) sends them first.
    pub fn flush(&mut self) {
        for (i, (p, out)) in self
            .ports
            .iter_mut()
            .zip(self.pending.iter_mut())
            .enumerate()
        {
            if !out.is_empty() {
                if let Some((tap, spec)) = self.tap {
                    tap.capture(spec, i, Way::Tx, self.now, out.iter().map(|b| b.data()));
                }
                self.sent += p.tx_burst(out) as u64;
            }
        }
    }

    /// Sends what is queued; how many packets the ports took in this poll.
    fn finish(&mut self) -> u64 {
        self.flush();
        std::mem::take(&mut self.sent)
    }
}

/// Worker counters, published every few hundred polls and at stop.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Poll iterations that received at least one packet.
    pub busy_polls: AtomicU64,
    /// Poll iterations that received nothing.
    pub idle_polls: AtomicU64,
    /// Clock ticks spent in busy iterations.
    pub busy_ticks: AtomicU64,
    /// Clock ticks spent in idle iterations.
    pub idle_ticks: AtomicU64,
    /// Packets received over all ports.
    pub rx_packets: AtomicU64,
    /// Packets handed to `tx_burst` and sent.
    pub tx_packets: AtomicU64,
    /// Drops decided by the pipeline, by reason.
    pub drops: DropCounters,
    /// Times the worker slept after a run of empty polls (only with an
    /// idle sleep set: [`Worker::with_idle_sleep`]).
    pub idle_sleeps: AtomicU64,
    /// Clock ticks of busy iterations spent in the pipeline (its
    /// `process`, and its `poll` when that moved packets or noted work).
    pub pipeline_ticks: AtomicU64,
    /// Clock ticks of busy iterations outside the pipeline: port I/O
    /// (receive, and transmit at the end of a burst), a `poll` of the
    /// pipeline that did neither, and the loop
    /// (`busy_ticks` less `pipeline_ticks`, counted apart so that each
    /// only grows).
    pub io_ticks: AtomicU64,
    /// Receive bursts by size: element `n - 1` counts the `rx_burst`
    /// calls that returned `n` packets (1 to [`BURST`]).
    pub rx_bursts: [AtomicU64; BURST],
    /// The worker has started ([`Pipeline::start`] done) and polls.
    pub started: std::sync::atomic::AtomicBool,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configured core does not exist on this machine.
    #[error(
        "worker {worker:?}: core {core} does not exist (this machine has cores 0..{available})"
    )]
    NoSuchCore {
        /// Worker name.
        worker: String,
        /// Configured core.
        core: usize,
        /// Number of cores seen.
        available: usize,
    },
    /// The OS refused to pin the thread.
    #[error("worker {worker:?}: cannot pin to core {core}")]
    PinFailed {
        /// Worker name.
        worker: String,
        /// Configured core.
        core: usize,
    },
    /// The thread could not be spawned.
    #[error("worker {worker:?}: cannot spawn thread: {source}")]
    Spawn {
        /// Worker name.
        worker: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A poll-mode worker.
pub struct Worker<B: PacketBuf, P: Pipeline<B>> {
    name: String,
    core: Option<usize>,
    ports: Vec<PortBox<B>>,
    pipeline: P,
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
    clock: TscClock,
    pending: Vec<Batch<B>>,
    rx: Batch<B>,
    tally: Tally,
    /// The last clock read of the last iteration, and where the ticks from
    /// it to the next read go (cycle accounting: an iteration ends where
    /// the next begins).
    mark: u64,
    open: Open,
    idle_sleep: Duration,
    /// Live capture (`None`: never captures).
    tap: Option<Arc<Tap>>,
}

/// What a stopped worker gives back.
pub struct Stopped<B: PacketBuf, P> {
    /// The ports, with whatever is still queued in them.
    pub ports: Vec<PortBox<B>>,
    /// The pipeline and its state.
    pub pipeline: P,
}

/// The thread of a spawned worker; joining it gives back ports and pipeline.
pub type WorkerHandle<B, P> = std::thread::JoinHandle<Result<Stopped<B, P>, WorkerError>>;

/// Counts kept by the worker between two publications.
#[derive(Default)]
struct Tally {
    since_publish: u32,
    busy: u64,
    idle: u64,
    busy_ticks: u64,
    idle_ticks: u64,
    rx: u64,
    tx: u64,
    pipeline_ticks: u64,
    io_ticks: u64,
    rx_bursts: [u64; BURST],
}

/// Where the ticks since a worker's last clock read go once it reads the
/// clock again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// Nowhere: no poll yet, or the last one's ticks are all booked (the
    /// worker is about to sleep, or has stopped).
    Nothing,
    /// A busy iteration's I/O: its last transmit and the loop back.
    Busy,
    /// An idle iteration (all of it: an idle iteration reads the clock
    /// once, at its start).
    Idle,
}

impl Tally {
    /// Books the ticks from `mark` to `now` as `open` says.
    #[inline]
    fn close(&mut self, open: Open, mark: u64, now: u64) {
        let dt = now.wrapping_sub(mark);
        match open {
            Open::Busy => {
                self.busy_ticks += dt;
                self.io_ticks += dt;
            }
            Open::Idle => self.idle_ticks += dt,
            Open::Nothing => {}
        }
    }

    fn publish(&mut self, s: &WorkerStats) {
        let t = std::mem::take(self);
        s.pipeline_ticks
            .fetch_add(t.pipeline_ticks, Ordering::Relaxed);
        s.io_ticks.fetch_add(t.io_ticks, Ordering::Relaxed);
        for (a, n) in s.rx_bursts.iter().zip(t.rx_bursts) {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        s.busy_polls.fetch_add(t.busy, Ordering::Relaxed);
        s.idle_polls.fetch_add(t.idle, Ordering::Relaxed);
        s.busy_ticks.fetch_add(t.busy_ticks, Ordering::Relaxed);
        s.idle_ticks.fetch_add(t.idle_ticks, Ordering::Relaxed);
        s.rx_packets.fetch_add(t.rx, Ordering::Relaxed);
        s.tx_packets.fetch_add(t.tx, Ordering::Relaxed);
    }
}

/// Polls between two publications of the counters.
const PUBLISH_EVERY: u32 = 256;

/// Polls between two kicks of every port ([`Port::kick`]: frames a
/// device did not take from an earlier burst are offered again though no
/// new one comes). A divisor of `PUBLISH_EVERY`.
const KICK_EVERY: u32 = 64;

/// Empty polls in a row after which a worker with an idle sleep sleeps.
pub const IDLE_POLLS_BEFORE_SLEEP: u32 = 64;

impl<B: PacketBuf, P: Pipeline<B>> Worker<B, P> {
    /// A worker named `name` over `ports`, pinned to `core` if given.
    /// Its clock is the process's ([`TscClock::process`]: calibrated once).
    pub fn new(name: &str, core: Option<usize>, ports: Vec<PortBox<B>>, pipeline: P) -> Self {
        let pending = (0..ports.len()).map(|_| Batch::new()).collect();
        Worker {
            name: name.to_string(),
            core,
            ports,
            pipeline,
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::default(),
            clock: TscClock::process(),
            pending,
            rx: Batch::new(),
            tally: Tally::default(),
            mark: 0,
            open: Open::Nothing,
            idle_sleep: Duration::ZERO,
            tap: None,
        }
    }

    /// Copies frames to `tap` while it is armed ([`crate::capture`]): those
    /// received, before the pipeline, and those sent, after it.
    pub fn with_tap(mut self, tap: Arc<Tap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Makes [`Worker::run`] sleep `d` after every [`IDLE_POLLS_BEFORE_SLEEP`]
    /// empty polls in a row (as OVS's `pmd-maxsleep` does), giving the core
    /// to other work (VMs sharing the machine) while no packet comes; the
    /// first packet after a quiet spell waits up to `d` longer. Zero (the
    /// default) polls without pause.
    pub fn with_idle_sleep(mut self, d: Duration) -> Self {
        self.idle_sleep = d;
        self
    }

    /// One poll iteration on the calling thread: the pipeline's own work
    /// ([`Pipeline::poll`]: packets handed over, timers), then every port:
    /// receive, process, transmit. Returns the packets received (and those
    /// the pipeline's own work moved). `run` loops on this; tests and
    /// benches call it directly to step a worker deterministically.
    /// Counters reach [`WorkerStats`] every 256 polls and at stop
    /// ([`Worker::publish`] forces it).
    ///
    /// Cycle accounting reads the clock once at an iteration's start, twice
    /// per port that received something (around the pipeline's `process`),
    /// and once after `Pipeline::poll` when that moved packets or noted
    /// work ([`Ctx::note_work`]): each read closes the interval the last
    /// one opened (a clock read costs tens of cycles, a share of a small
    /// burst's cost). An iteration's start closes the last one: the rest
    /// of a busy iteration (its last transmit) is I/O, an idle iteration is
    /// idle from start to start. So on a worker stepped by hand, the time
    /// between two calls belongs to the first (as does the time up to
    /// [`Worker::publish`]).
    #[inline]
    pub fn poll_once(&mut self) -> usize {
        let t0 = self.clock.now();
        self.tally.close(self.open, self.mark, t0);
        let mut got = 0u64;
        // A live capture costs one load a poll while none is on.
        let session = self.tap.as_ref().and_then(|t| t.session(t0));
        let tap = self.tap.as_deref().zip(session.as_deref());
        // The last clock read, and this iteration's ticks so far in the
        // pipeline and outside it.
        let (mut mark, mut in_pipeline, mut in_io) = (t0, 0u64, 0u64);
        // One context for the whole poll: the pipeline's `poll`, then each
        // port's burst (`finish` sends what each queued).
        let mut ctx = Ctx {
            ports: &mut self.ports,
            pending: &mut self.pending,
            drops: &self.stats.drops,
            now: t0,
            tap,
            sent: 0,
            worked: false,
        };
        let extra = self.pipeline.poll(&mut ctx);
        if extra > 0 || ctx.worked {
            mark = self.clock.now();
            in_pipeline += mark.wrapping_sub(t0);
            got += extra as u64;
            self.tally.tx += ctx.finish();
        }
        for i in 0..ctx.ports.len() {
            let Some(port) = ctx.ports.get_mut(i) else {
                break;
            };
            let n = port.rx_burst(&mut self.rx);
            if n == 0 {
                continue;
            }
            got += n as u64;
            if let Some(b) = self.tally.rx_bursts.get_mut(n - 1) {
                *b += 1;
            }
            if let Some((t, spec)) = tap {
                t.capture(spec, i, Way::Rx, t0, self.rx.iter().map(|b| b.data()));
            }
            let a = self.clock.now();
            in_io += a.wrapping_sub(mark);
            self.pipeline.process(&mut ctx, i, &mut self.rx);
            mark = self.clock.now();
            in_pipeline += mark.wrapping_sub(a);
            if !self.rx.is_empty() {
                ctx.drops.add(DropReason::NoRoute, self.rx.len() as u64);
                self.rx.clear();
            }
            self.tally.tx += ctx.finish();
        }
        let t = &mut self.tally;
        if got > 0 {
            t.busy += 1;
            t.busy_ticks += in_pipeline + in_io;
            t.pipeline_ticks += in_pipeline;
            t.io_ticks += in_io;
            t.rx += got;
            self.open = Open::Busy;
            self.mark = mark;
        } else {
            // All of an idle iteration is idle (its `poll`'s work too).
            t.idle += 1;
            self.open = Open::Idle;
            self.mark = t0;
        }
        t.since_publish += 1;
        if t.since_publish.is_multiple_of(KICK_EVERY) {
            for p in &mut self.ports {
                p.kick();
            }
        }
        if t.since_publish == PUBLISH_EVERY {
            self.publish();
        }
        got as usize
    }

    /// Lets the pipeline finish what it holds for later (packets handed to
    /// it other than through a port: [`Pipeline::poll`]) without receiving
    /// from the ports, sending what that produces; returns how many
    /// packets it moved. A stopped worker's owner calls it, on every
    /// worker over and over until none moves anything, before handing the
    /// ports to someone else (a hitless upgrade), so that nothing waiting
    /// between workers is lost.
    pub fn finish_pending(&mut self) -> usize {
        let mut ctx = Ctx {
            ports: &mut self.ports,
            pending: &mut self.pending,
            drops: &self.stats.drops,
            now: self.clock.now(),
            tap: None,
            sent: 0,
            worked: false,
        };
        let n = self.pipeline.poll(&mut ctx);
        self.tally.tx += ctx.finish();
        self.publish();
        n
    }

    /// The stopped worker's ports and pipeline, without running it again.
    pub fn into_stopped(mut self) -> Stopped<B, P> {
        self.publish();
        Stopped {
            ports: self.ports,
            pipeline: self.pipeline,
        }
    }

    /// Ends the last iteration now: its ticks up to now are booked, and
    /// none after (until the next poll).
    fn end_iteration(&mut self) {
        let now = self.clock.now();
        self.tally.close(self.open, self.mark, now);
        (self.mark, self.open) = (now, Open::Nothing);
    }

    /// Publishes the counters kept since the last publication, the last
    /// iteration's ticks up to now included.
    pub fn publish(&mut self) {
        let now = self.clock.now();
        self.tally.close(self.open, self.mark, now);
        self.mark = now;
        self.tally.publish(&self.stats);
    }

    /// This worker counting into `stats` (those of an earlier worker over
    /// the same ports and pipeline, started again).
    pub fn with_stats(mut self, stats: Arc<WorkerStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The pipeline (e.g. to read its state between `poll_once` calls).
    pub fn pipeline(&self) -> &P {
        &self.pipeline
    }

    /// The flag that stops the worker when set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The worker's counters.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    fn pin(&self) -> Result<(), WorkerError> {
        let Some(core) = self.core else { return Ok(()) };
        let ids = core_affinity::get_core_ids().unwrap_or_default();
        let Some(id) = ids.iter().find(|c| c.id == core) else {
            return Err(WorkerError::NoSuchCore {
                worker: self.name.clone(),
                core,
                available: ids.len(),
            });
        };
        if !core_affinity::set_for_current(*id) {
            return Err(WorkerError::PinFailed {
                worker: self.name.clone(),
                core,
            });
        }
        Ok(())
    }

    /// Runs the poll loop on the current thread until the stop flag is set.
    pub fn run(mut self) -> Result<Stopped<B, P>, WorkerError> {
        self.pin()?;
        self.pipeline.start();
        self.stats.started.store(true, Ordering::Release);
        let mut empty = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            if self.poll_once() > 0 {
                empty = 0;
                continue;
            }
            if self.idle_sleep.is_zero() {
                continue;
            }
            empty += 1;
            if empty >= IDLE_POLLS_BEFORE_SLEEP {
                empty = 0;
                self.stats.idle_sleeps.fetch_add(1, Ordering::Relaxed);
                // The idle iteration ends here; the sleep is not a poll's.
                self.end_iteration();
                std::thread::sleep(self.idle_sleep);
            }
        }
        // The last iteration ends with the loop: what the stopped worker's
        // owner does with it later (`finish_pending`) is no poll's tail.
        self.end_iteration();
        self.publish();
        Ok(Stopped {
            ports: self.ports,
            pipeline: self.pipeline,
        })
    }

    /// Runs the worker on a new thread named after it.
    pub fn spawn(self) -> Result<WorkerHandle<B, P>, WorkerError>
    where
        P: 'static,
    {
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("pollux-{name}"))
            .spawn(move || self.run())
            .map_err(|source| WorkerError::Spawn {
                worker: name,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{HugePages, Pool, PoolBuf, PoolConfig};
    use crate::port::ring::{self, RingPort};
    use crate::wire::MacAddr;
    use crate::{LinkInfo, Port};

    /// Sends everything from port 0 to port 1. Its own `poll` moves
    /// nothing; while `chores` is set it works that long and notes it.
    struct Across {
        chores: Option<Duration>,
    }

    impl Pipeline<PoolBuf> for Across {
        fn process(&mut self, ctx: &mut Ctx<'_, PoolBuf>, _: usize, pkts: &mut Batch<PoolBuf>) {
            for pkt in pkts.drain() {
                ctx.send(1, pkt);
            }
        }

        fn poll(&mut self, ctx: &mut Ctx<'_, PoolBuf>) -> usize {
            if let Some(d) = self.chores {
                std::thread::sleep(d);
                ctx.note_work();
            }
            0
        }
    }

    /// (busy, idle, pipeline, io) ticks, as published.
    fn ticks(s: &WorkerStats) -> (u64, u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (
            l(&s.busy_ticks),
            l(&s.idle_ticks),
            l(&s.pipeline_ticks),
            l(&s.io_ticks),
        )
    }

    struct Rig {
        w: Worker<PoolBuf, Across>,
        stats: Arc<WorkerStats>,
        pool: Pool,
        src: RingPort<PoolBuf>,
        sink: RingPort<PoolBuf>,
        per_ms: u64,
    }

    fn rig() -> Rig {
        let mut cfg = PoolConfig::new("worker-acct", 64);
        cfg.huge = HugePages::Never;
        let pool = Pool::new(&cfg).unwrap();
        let l = |n: &str, i| LinkInfo::new(n, MacAddr([2, 0, 0, 0, 1, i]), "ring");
        let (src, sw_in) = ring::pair(l("src", 1), l("sw-in", 2), 64);
        let (sink, sw_out) = ring::pair(l("sink", 3), l("sw-out", 4), 64);
        let ports: Vec<PortBox<PoolBuf>> = vec![Box::new(sw_in), Box::new(sw_out)];
        let w = Worker::new("acct", None, ports, Across { chores: None });
        let per_ms = (w.clock.hz() / 1000).max(1);
        Rig {
            stats: w.stats(),
            w,
            pool,
            src,
            sink,
            per_ms,
        }
    }

    impl Rig {
        /// Sends `n` frames into the worker's port 0.
        fn send(&mut self, n: usize) {
            let mut b = Batch::new();
            for _ in 0..n {
                b.push(self.pool.alloc_copy(&[0; 60]).unwrap()).unwrap();
            }
            assert_eq!(self.src.tx_burst(&mut b), n);
        }
    }

    // (Pauses of 50 ms, told from none by 25: checks of the booking, not
    // of timing.)
    const PAUSE: Duration = Duration::from_millis(50);
    const HALF: u64 = 25;

    /// Idle polls book idle ticks and busy ones busy ticks, split exactly
    /// into pipeline and I/O; an iteration ends at the next one's start,
    /// and once the worker has ended its last one (stopping, or about to
    /// sleep) the time after it is nobody's.
    #[test]
    fn cycle_accounting_books_each_tick_once() {
        let mut r = rig();
        assert_eq!(r.w.poll_once(), 0);
        assert_eq!(r.w.poll_once(), 0);
        r.send(8);
        assert_eq!(r.w.poll_once(), 8);
        r.w.publish();
        let (busy, idle, pipeline, io) = ticks(&r.stats);
        assert_eq!(r.stats.busy_polls.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.idle_polls.load(Ordering::Relaxed), 2);
        assert!(idle > 0 && pipeline > 0 && io > 0, "{:?}", ticks(&r.stats));
        assert_eq!(busy, pipeline + io);
        let mut b = Batch::new();
        assert_eq!(r.sink.rx_burst(&mut b), 8);
        // Ended: a pause after it is booked nowhere.
        r.w.end_iteration();
        r.w.publish();
        let ended = ticks(&r.stats);
        std::thread::sleep(PAUSE);
        r.w.publish();
        let after = ticks(&r.stats);
        assert_eq!(after, ended, "the pause was booked");
        // An idle poll after it: idle from its start to the next.
        assert_eq!(r.w.poll_once(), 0);
        std::thread::sleep(PAUSE);
        assert_eq!(r.w.poll_once(), 0);
        r.w.publish();
        let (busy2, idle2, pipeline2, io2) = ticks(&r.stats);
        assert!(
            (idle2 - after.1) / r.per_ms >= HALF,
            "{after:?} then {:?}",
            ticks(&r.stats)
        );
        assert_eq!((busy2, pipeline2, io2), (after.0, after.2, after.3));
    }

    /// Work the pipeline's `poll` notes is the pipeline's in a poll that
    /// also receives packets, and idle time in one that receives none.
    #[test]
    fn noted_work_is_timed_with_its_poll() {
        let mut r = rig();
        r.w.pipeline.chores = Some(PAUSE);
        r.send(4);
        assert_eq!(r.w.poll_once(), 4);
        r.w.publish();
        let (busy, idle, pipeline, io) = ticks(&r.stats);
        assert!(pipeline / r.per_ms >= HALF, "{:?}", ticks(&r.stats));
        assert!(
            io / r.per_ms < HALF,
            "the chores were booked as I/O: {:?}",
            ticks(&r.stats)
        );
        assert_eq!(busy, pipeline + io);
        assert_eq!(idle, 0);
        // An idle poll's chores are idle time.
        assert_eq!(r.w.poll_once(), 0);
        r.w.end_iteration();
        r.w.publish();
        let (busy2, idle2, pipeline2, io2) = ticks(&r.stats);
        assert!(idle2 / r.per_ms >= HALF, "{:?}", ticks(&r.stats));
        assert_eq!(
            pipeline2, pipeline,
            "an idle poll's chores were the pipeline's"
        );
        assert_eq!(busy2, pipeline2 + io2);
        assert!(busy2 - busy < HALF * r.per_ms, "{:?}", ticks(&r.stats));
        let mut b = Batch::new();
        assert_eq!(r.sink.rx_burst(&mut b), 4);
    }
}
