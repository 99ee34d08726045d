//! In-memory port pairs, like a veth pair: what one end transmits, the other
//! receives. Used for tests, benches and in-process VMs; each direction is a
//! bounded lock-free [`BurstRing`], so the two ends may live on different
//! threads, and an end may be shared by several workers. An end with one
//! handle moves its bursts without a locked instruction; sharing it
//! switches its rings' sides to the reservation protocol for good.

use super::{LinkInfo, Port};
use crate::batch::Batch;
use crate::buf::PacketBuf;
use crate::stats::{DropReason, PortStats};
#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::mem::MaybeUninit;
use std::sync::Arc;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Default number of packets each direction of a pair can hold.
pub const DEFAULT_CAPACITY: usize = 1024;

/// A counter on its own cache lines (two: adjacent-line prefetch), so the
/// producers' and consumers' counters do not share a line.
#[repr(align(128))]
struct Padded(AtomicUsize);

impl Padded {
    fn zero() -> Self {
        Padded(AtomicUsize::new(0))
    }
}

/// A slot's cell: std's `UnsafeCell`, or, built with `--cfg loom`, loom's,
/// whose accesses the model checker tracks (`dataplane/tests/loom_ring.rs`).
///
/// `repr(transparent)` (as `UnsafeCell` and `MaybeUninit` are): an array of
/// cells holding `MaybeUninit<T>` is laid out as an array of `T`, so a run
/// of slots moves to or from a batch in one copy.
#[cfg(not(loom))]
#[repr(transparent)]
struct SlotCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> SlotCell<T> {
    fn new(v: T) -> Self {
        SlotCell(std::cell::UnsafeCell::new(v))
    }

    #[inline]
    fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(not(loom))]
impl<T> SlotCell<MaybeUninit<T>> {
    /// Where the value of `cells[0]` lies; the others follow it at `T`'s
    /// stride (`repr(transparent)` all the way down). Writing through it is
    /// allowed: the values lie inside `UnsafeCell`s.
    #[inline(always)]
    fn values(cells: &[Self]) -> *mut T {
        std::cell::UnsafeCell::raw_get(
            cells
                .as_ptr()
                .cast::<std::cell::UnsafeCell<MaybeUninit<T>>>(),
        )
        .cast::<T>()
    }
}

#[cfg(loom)]
struct SlotCell<T>(loom::cell::UnsafeCell<T>);

#[cfg(loom)]
impl<T> SlotCell<T> {
    fn new(v: T) -> Self {
        SlotCell(loom::cell::UnsafeCell::new(v))
    }

    fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        self.0.with_mut(f)
    }
}

/// A bounded multi-producer multi-consumer ring that moves whole bursts,
/// in the manner of DPDK's `rte_ring`: a producer reserves room for its
/// burst with one compare-and-swap on the producer head, writes the slots,
/// waits for earlier producers to publish theirs, and publishes its own
/// with one store to the producer tail; consumers do the same on the
/// consumer head and tail. That is two atomic read-modify-writes per burst
/// instead of one per packet (what `crossbeam_queue::ArrayQueue` costs,
/// which this replaced: its per-packet locked instructions were a large
/// share of a ring port's cost). The counters run freely (64-bit, never
/// wrapping in practice); a slot is `counter & mask`.
///
/// A side with one owner needs no reservation: through a [`Producer`] or
/// [`Consumer`] handle that has not been shared (`rte_ring`'s
/// single-producer and single-consumer modes), a burst reads its own head,
/// moves the slots and publishes with plain stores, no compare-and-swap
/// and no wait; the other side sees only the tails, so either side may be
/// single while the other is shared.
///
/// Invariants: `cons_tail <= cons_head <= prod_tail <= prod_head <=
/// cons_tail + capacity`; slots in `[cons_tail, prod_tail)` hold
/// initialised values, published; slots in `[prod_tail, prod_head)` are
/// being written by the producers that reserved them; slots in
/// `[cons_tail, cons_head)` are being read by the consumers that reserved
/// them; all others are uninitialised. Between a single side's bursts its
/// head equals its tail.
pub struct BurstRing<T> {
    slots: Box<[SlotCell<MaybeUninit<T>>]>,
    mask: usize,
    capacity: usize,
    /// Set once a [`Producer`] is shared (never cleared): pushes through
    /// a handle reserve with a compare-and-swap from then on.
    shared_producers: AtomicBool,
    /// The same for [`Consumer`]s.
    shared_consumers: AtomicBool,
    prod_head: Padded,
    prod_tail: Padded,
    cons_head: Padded,
    cons_tail: Padded,
}

// SAFETY: values move between threads through the ring (hence `T: Send`),
// and every slot is accessed by one thread at a time: the head counters hand
// out disjoint ranges (reserved with a compare-and-swap, or moved by a side's
// sole owner), and the tails (release/acquire) order a slot's write before
// its read and its read before its next write.
unsafe impl<T: Send> Send for BurstRing<T> {}
// SAFETY: as above; `&BurstRing` gives access through the reservation
// protocol (`push_burst`, `pop_burst`), and to the sole-owner paths
// (`push_single`, `pop_single`, private and `unsafe`) only through a
// `Producer` or `Consumer` that has not been shared, taken by `&mut`.
unsafe impl<T: Send> Sync for BurstRing<T> {}

impl<T> BurstRing<T> {
    /// A ring holding up to `capacity` values (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let n = capacity.next_power_of_two();
        BurstRing {
            slots: (0..n)
                .map(|_| SlotCell::new(MaybeUninit::uninit()))
                .collect(),
            mask: n - 1,
            capacity,
            shared_producers: AtomicBool::new(false),
            shared_consumers: AtomicBool::new(false),
            prod_head: Padded::zero(),
            prod_tail: Padded::zero(),
            cons_head: Padded::zero(),
            cons_tail: Padded::zero(),
        }
    }

    /// A ring holding up to `capacity` values (at least 1), with its one
    /// producer and its one consumer (each may be shared later).
    pub fn with_handles(capacity: usize) -> (Producer<T>, Consumer<T>) {
        let ring = Arc::new(BurstRing::new(capacity));
        (Producer { ring: ring.clone() }, Consumer { ring })
    }

    /// Values published and not yet taken (a snapshot).
    pub fn len(&self) -> usize {
        let tail = self.prod_tail.0.load(Ordering::Acquire);
        tail.saturating_sub(self.cons_head.0.load(Ordering::Acquire))
    }

    /// True when [`BurstRing::len`] is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `tail` reaches `from` (earlier reservations published),
    /// then moves it to `to`.
    #[inline]
    fn publish(tail: &AtomicUsize, from: usize, to: usize) {
        let mut spins = 0u32;
        while tail.load(Ordering::Acquire) != from {
            spins += 1;
            if cfg!(loom) {
                // The model checker must run the thread we wait for.
                #[cfg(loom)]
                loom::thread::yield_now();
            } else if spins < 64 {
                std::hint::spin_loop();
            } else {
                // The thread we wait for may have been preempted.
                std::thread::yield_now();
            }
        }
        tail.store(to, Ordering::Release);
    }

    /// Moves `head` (the producers' or the consumers' head) on by up to
    /// `want`, bounded by `room(h)`: how many entries lie past head value
    /// `h` (`None` when `h` is stale — the other side has moved past it
    /// since it was read — and must be read again). Returns the reserved
    /// range's start and length, `None` when there is no room.
    #[inline]
    fn reserve(
        head: &AtomicUsize,
        want: usize,
        room: impl Fn(usize) -> Option<usize>,
    ) -> Option<(usize, usize)> {
        // Acquire on the head loads keeps `room`'s tail load after them.
        let mut h = head.load(Ordering::Acquire);
        loop {
            let Some(r) = room(h) else {
                // Under the model checker a reload may see the same old
                // value until another thread runs.
                #[cfg(loom)]
                loom::thread::yield_now();
                h = head.load(Ordering::Acquire);
                continue;
            };
            let n = want.min(r);
            if n == 0 {
                return None;
            }
            match head.compare_exchange_weak(
                h,
                h.wrapping_add(n),
                Ordering::Relaxed,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((h, n)),
                Err(x) => h = x,
            }
        }
    }

    /// The slots of the `n` counters from `head` on: the slot array, where
    /// the run starts in it, and how many lie before its end (the rest wrap
    /// around to its start).
    #[cfg(not(loom))]
    #[inline(always)]
    fn run(&self, head: usize, n: usize) -> (&[SlotCell<MaybeUninit<T>>], usize, usize) {
        let start = head & self.mask;
        (&self.slots[..], start, n.min(self.slots.len() - start))
    }

    /// Moves as many values of `batch` as fit, from the front, into the
    /// ring; what did not fit stays in `batch`. Returns how many moved.
    /// Any number of threads may push at once (see [`Producer`] for a
    /// ring's sole producer, which pushes without a locked instruction).
    #[inline]
    pub fn push_burst(&self, batch: &mut Batch<T>) -> usize {
        let want = batch.len();
        if want == 0 {
            return 0;
        }
        let cap = self.capacity;
        let free = |h: usize| {
            let used = h.wrapping_sub(self.cons_tail.0.load(Ordering::Acquire));
            (used <= cap).then(|| cap - used)
        };
        let Some((head, n)) = Self::reserve(&self.prod_head.0, want, free) else {
            return 0;
        };
        // SAFETY: [head, head + n) was reserved by this thread alone (the
        // CAS in `reserve`) below cons_tail + capacity (acquired by `free`);
        // `n <= want`, the batch's length.
        unsafe { self.fill(head, n, batch) };
        Self::publish(&self.prod_tail.0, head, head.wrapping_add(n));
        n
    }

    /// [`BurstRing::push_burst`] for the ring's only producer: its head is
    /// its own, so no reservation and no wait for earlier ones; the slots
    /// are published with one store.
    ///
    /// # Safety
    ///
    /// No other thread pushes into this ring while this runs, and every
    /// earlier push happened before it (the handle that calls it is the
    /// ring's only producer: [`Producer::push_burst`]).
    #[inline]
    unsafe fn push_single(&self, batch: &mut Batch<T>) -> usize {
        let want = batch.len();
        if want == 0 {
            return 0;
        }
        // Only this thread moves the head (the caller's promise); its last
        // store happened before this load.
        let head = self.prod_head.0.load(Ordering::Relaxed);
        let used = head.wrapping_sub(self.cons_tail.0.load(Ordering::Acquire));
        let n = want.min(self.capacity.saturating_sub(used));
        if n == 0 {
            return 0;
        }
        let to = head.wrapping_add(n);
        // SAFETY: no other producer (the caller's promise): [head, head + n)
        // is this thread's, and lies below cons_tail + capacity (acquired
        // above); `n <= want`, the batch's length.
        unsafe { self.fill(head, n, batch) };
        // The head first (a producer shared from now on reserves past it),
        // then the tail, releasing the slots' writes to the consumers.
        self.prod_head.0.store(to, Ordering::Relaxed);
        self.prod_tail.0.store(to, Ordering::Release);
        n
    }

    /// Moves the first `n` values of `batch` into the slots of counters
    /// `[head, head + n)`; the rest of the batch moves to its front.
    ///
    /// # Safety
    ///
    /// The calling producer holds `[head, head + n)` alone, those slots are
    /// free (below cons_tail + capacity, that tail acquired), and `n` is at
    /// most `batch.len()`.
    #[inline(always)]
    unsafe fn fill(&self, head: usize, n: usize, batch: &mut Batch<T>) {
        // The values are copied bit for bit from the batch's storage, then
        // forgotten there, rather than moved out one at a time: one copy
        // per run of slots (two when the range wraps around the slot
        // array), where a move per packet cost a bounds check, an index
        // and the batch's length each.
        #[cfg(not(loom))]
        {
            let (slots, start, first) = self.run(head, n);
            let v = batch.packets_mut();
            let len = v.len();
            // (One pointer into the batch, for the reads and the shift.)
            let (to, base) = (SlotCell::values(slots), v.as_mut_ptr());
            // SAFETY: [head, head + n) is this producer's and free (the
            // caller's promise): their last reader published cons_tail past
            // them and no reader may touch them before prod_tail passes
            // them, which happens after these writes. They are slots
            // `start..start + first` and `0..n - first` (`first <=
            // slots.len() - start`, `n - first <= start` as `n <= capacity
            // <= slots.len()`), the cells' values laid out as an array of
            // `T` (`SlotCell::values`). The batch's first `n <= len` values
            // are initialised; their copies become the slots' owners and the
            // batch forgets them (the rest, if any, moved to its front)
            // without dropping or reading them. Nothing here can unwind.
            unsafe {
                std::ptr::copy_nonoverlapping(base, to.add(start), first);
                std::ptr::copy_nonoverlapping(base.add(first), to, n - first);
                let rest = len - n;
                std::ptr::copy(base.add(n), base, rest);
                v.set_len(rest);
            }
        }
        #[cfg(loom)]
        {
            let (slots, mask) = (&self.slots[..], self.mask);
            for (i, v) in batch.as_slice().iter().take(n).enumerate() {
                let slot = &slots[head.wrapping_add(i) & mask];
                // SAFETY: as above, one slot at a time.
                slot.with_mut(|p| unsafe { (*p).write(std::ptr::read(v)) });
            }
            batch.drain_front(n).for_each(std::mem::forget);
        }
    }

    /// Moves up to `batch`'s free space of values out of the ring into
    /// `batch`. Returns how many moved. Any number of threads may pop at
    /// once (see [`Consumer`] for a ring's sole consumer).
    #[inline]
    pub fn pop_burst(&self, batch: &mut Batch<T>) -> usize {
        let want = batch.free_space();
        if want == 0 {
            return 0;
        }
        let cap = self.capacity;
        let ready = |h: usize| {
            let ready = self.prod_tail.0.load(Ordering::Acquire).wrapping_sub(h);
            (ready <= cap).then_some(ready)
        };
        let Some((head, n)) = Self::reserve(&self.cons_head.0, want, ready) else {
            return 0;
        };
        // SAFETY: [head, head + n) was reserved by this thread alone (the
        // CAS in `reserve`) below prod_tail (acquired by `ready`); `n` is
        // at most the batch's free space.
        unsafe { self.take(head, n, batch) };
        Self::publish(&self.cons_tail.0, head, head.wrapping_add(n));
        n
    }

    /// [`BurstRing::pop_burst`] for the ring's only consumer, as
    /// [`BurstRing::push_single`] is for its only producer.
    ///
    /// # Safety
    ///
    /// No other thread pops from this ring while this runs, and every
    /// earlier pop happened before it ([`Consumer::pop_burst`]).
    #[inline]
    unsafe fn pop_single(&self, batch: &mut Batch<T>) -> usize {
        let want = batch.free_space();
        if want == 0 {
            return 0;
        }
        // Only this thread moves the head (the caller's promise).
        let head = self.cons_head.0.load(Ordering::Relaxed);
        let ready = self.prod_tail.0.load(Ordering::Acquire).wrapping_sub(head);
        let n = want.min(ready.min(self.capacity));
        if n == 0 {
            return 0;
        }
        let to = head.wrapping_add(n);
        // SAFETY: no other consumer (the caller's promise): [head, head + n)
        // is this thread's, below prod_tail (acquired above); `n` is at
        // most the batch's free space.
        unsafe { self.take(head, n, batch) };
        // The tail releases the slots (their reads done) to the producers.
        self.cons_head.0.store(to, Ordering::Relaxed);
        self.cons_tail.0.store(to, Ordering::Release);
        n
    }

    /// Moves the values in the slots of counters `[head, head + n)` to the
    /// end of `batch`.
    ///
    /// # Safety
    ///
    /// The calling consumer holds `[head, head + n)` alone, those slots are
    /// published (below prod_tail, that tail acquired), and `n` is at most
    /// the batch's free space.
    #[inline(always)]
    unsafe fn take(&self, head: usize, n: usize, batch: &mut Batch<T>) {
        // One copy per run of slots, as `fill` does.
        #[cfg(not(loom))]
        {
            let (slots, start, first) = self.run(head, n);
            let v = batch.packets_mut();
            let len = v.len();
            let (from, to) = (SlotCell::values(slots), v.as_mut_ptr());
            // SAFETY: [head, head + n) is this consumer's and published (the
            // caller's promise: the producers' writes of these slots are
            // visible): slots `start..start + first` and `0..n - first`, as
            // in `fill`, each read exactly once (producers do not reuse one
            // before cons_tail passes it, after these reads). Their values
            // move into the batch's free space past its `len` values (`n`
            // is at most that space), which then holds them.
            unsafe {
                std::ptr::copy_nonoverlapping(from.add(start), to.add(len), first);
                std::ptr::copy_nonoverlapping(from, to.add(len + first), n - first);
                v.set_len(len + n);
            }
        }
        #[cfg(loom)]
        {
            let (slots, mask) = (&self.slots[..], self.mask);
            for i in 0..n {
                let slot = &slots[head.wrapping_add(i) & mask];
                // SAFETY: as above, one slot at a time.
                let v = slot.with_mut(|p| unsafe { (*p).assume_init_read() });
                // Cannot fail: n is at most the batch's free space.
                let _ = batch.push(v);
            }
        }
    }
}

/// Pushes into a [`BurstRing`]: the ring's only producer until
/// [`Producer::share`] makes another, and then one of several.
pub struct Producer<T> {
    ring: Arc<BurstRing<T>>,
}

impl<T> Producer<T> {
    /// Moves as many values of `batch` as fit, from the front, into the
    /// ring; what did not fit stays in `batch`. Returns how many moved.
    /// Without a locked instruction while this is the ring's only producer.
    #[inline]
    pub fn push_burst(&mut self, batch: &mut Batch<T>) -> usize {
        // Relaxed: the flag is set before a second producer exists, and a
        // handle reaches another thread only through a synchronising
        // hand-over, so a handle that reads it clear is the only one.
        if self.ring.shared_producers.load(Ordering::Relaxed) {
            self.ring.push_burst(batch)
        } else {
            // SAFETY: the ring's producers are its `Producer`s; the flag is
            // clear, so `share` never ran and this is the only one, and
            // `&mut self` keeps its pushes one at a time, each after the
            // last (a handle moved to another thread is handed over with
            // synchronisation).
            unsafe { self.ring.push_single(batch) }
        }
    }

    /// Another producer on the same ring. From now on every producer of
    /// this ring reserves its room with a compare-and-swap. (No push is in
    /// progress through `self` while it is borrowed, and there is no other
    /// producer yet or the flag was set already.)
    pub fn share(&self) -> Producer<T> {
        self.ring.shared_producers.store(true, Ordering::Relaxed);
        Producer {
            ring: self.ring.clone(),
        }
    }

    /// Values published and not yet taken (a snapshot). (No access to
    /// the ring itself: its shared paths may not run beside a sole
    /// handle's.)
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// True when [`BurstRing::len`] is 0.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

/// Pops from a [`BurstRing`]: the ring's only consumer until
/// [`Consumer::share`] makes another.
pub struct Consumer<T> {
    ring: Arc<BurstRing<T>>,
}

impl<T> Consumer<T> {
    /// Moves up to `batch`'s free space of values out of the ring into
    /// `batch`. Returns how many moved. Without a locked instruction while
    /// this is the ring's only consumer.
    #[inline]
    pub fn pop_burst(&mut self, batch: &mut Batch<T>) -> usize {
        // Relaxed: as in `Producer::push_burst`.
        if self.ring.shared_consumers.load(Ordering::Relaxed) {
            self.ring.pop_burst(batch)
        } else {
            // SAFETY: as in `Producer::push_burst`: the only consumer, its
            // pops one at a time, each after the last.
            unsafe { self.ring.pop_single(batch) }
        }
    }

    /// Another consumer on the same ring; from now on every consumer of
    /// this ring reserves with a compare-and-swap.
    pub fn share(&self) -> Consumer<T> {
        self.ring.shared_consumers.store(true, Ordering::Relaxed);
        Consumer {
            ring: self.ring.clone(),
        }
    }

    /// Values published and not yet taken (a snapshot). (No access to
    /// the ring itself: its shared paths may not run beside a sole
    /// handle's.)
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// True when [`BurstRing::len`] is 0.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

impl<T> Drop for BurstRing<T> {
    fn drop(&mut self) {
        // `&mut self`: no other thread; relaxed loads see the last stores.
        let from = self.cons_tail.0.load(Ordering::Relaxed);
        let to = self.prod_tail.0.load(Ordering::Relaxed);
        let mut i = from;
        while i != to {
            let slot = &self.slots[i & self.mask];
            // SAFETY: `&mut self`: no other thread; [cons_tail, prod_tail)
            // holds initialised values no one took, each dropped once.
            slot.with_mut(|p| unsafe { (*p).assume_init_drop() });
            i = i.wrapping_add(1);
        }
    }
}

/// One end of an in-memory port pair.
pub struct RingPort<B> {
    info: LinkInfo,
    stats: Arc<PortStats>,
    rx: Consumer<B>,
    tx: Producer<B>,
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
    let (a_tx, b_rx) = BurstRing::with_handles(capacity);
    let (b_tx, a_rx) = BurstRing::with_handles(capacity);
    (
        RingPort {
            info: a,
            stats: Arc::default(),
            rx: a_rx,
            tx: a_tx,
        },
        RingPort {
            info: b,
            stats: Arc::default(),
            rx: b_rx,
            tx: b_tx,
        },
    )
}

impl<B> RingPort<B> {
    /// Another handle on this end: the same queues, its own counters. Give
    /// one to each worker and the end becomes a multi-queue port: every
    /// packet is received by exactly one of them, and all may transmit.
    /// (The end's bursts reserve with a compare-and-swap from then on; the
    /// far end's are not affected.)
    pub fn share(&self) -> RingPort<B> {
        RingPort {
            info: self.info.clone(),
            stats: Arc::default(),
            rx: self.rx.share(),
            tx: self.tx.share(),
        }
    }

    /// This end as `n` handles, one per worker: `n - 1` shares and, last,
    /// the end itself. With `n` = 1 the end is never shared, and its bursts
    /// take the ring's single-producer and single-consumer paths; with
    /// `n` = 0 nothing (the end is dropped).
    pub fn into_handles(self, n: usize) -> Vec<RingPort<B>> {
        let mut v = Vec::with_capacity(n);
        if n > 0 {
            v.extend((1..n).map(|_| self.share()));
            v.push(self);
        }
        v
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
        let before = batch.len();
        let n = self.rx.pop_burst(batch);
        let bytes = batch.iter().skip(before).map(|p| p.len() as u64).sum();
        self.stats.count_rx(n as u64, bytes);
        n
    }

    #[inline]
    fn tx_burst(&mut self, batch: &mut Batch<B>) -> usize {
        let bytes = |b: &Batch<B>| b.iter().map(|p| p.len() as u64).sum::<u64>();
        let total = bytes(batch);
        let sent = self.tx.push_burst(batch);
        // What did not fit stays in the batch: freed here and counted.
        let (dropped, unsent) = (batch.len() as u64, bytes(batch));
        batch.clear();
        self.stats.count_tx(sent as u64, total - unsent);
        if dropped > 0 {
            self.stats.drops.add(DropReason::TxQueueFull, dropped);
        }
        sent
    }

    /// (Nothing waits: a burst goes into the ring whole, or what finds no
    /// room is dropped.)
    fn kick(&mut self) {}
}

// Real threads and std atomics: not under the model checker.
#[cfg(not(loom))]
#[cfg(test)]
mod tests {

    use super::*;
    use crate::BURST;
    use crate::pool::{HugePages, Pool, PoolConfig};
    use crate::wire::MacAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
    fn values_left_in_a_ring_are_dropped_with_it() {
        let v = Arc::new(());
        let ring = BurstRing::new(8);
        let mut b = Batch::new();
        for _ in 0..10 {
            b.push(v.clone()).unwrap();
        }
        assert_eq!(ring.push_burst(&mut b), 8);
        assert_eq!(b.len(), 2, "what did not fit stays in the batch");
        drop(b);
        let mut out = Batch::new();
        for _ in 0..29 {
            out.push(v.clone()).unwrap();
        }
        assert_eq!(ring.pop_burst(&mut out), 3, "only the batch's free space");
        assert_eq!(ring.len(), 5);
        drop(out);
        assert_eq!(Arc::strong_count(&v), 6);
        drop(ring);
        assert_eq!(Arc::strong_count(&v), 1);
    }

    #[test]
    fn the_counters_wrap_around_the_slots() {
        // Capacity 5 in 8 slots: bursts of 3 walk the counters around the
        // slot array many times; values come out in order.
        let ring = BurstRing::new(5);
        let (mut next, mut expect) = (0u64, 0u64);
        for _ in 0..1000 {
            let mut b = Batch::new();
            for _ in 0..3 {
                b.push(next).unwrap();
                next += 1;
            }
            assert_eq!(ring.push_burst(&mut b), 3);
            let mut out = Batch::new();
            assert_eq!(ring.pop_burst(&mut out), 3);
            for v in out.drain() {
                assert_eq!(v, expect);
                expect += 1;
            }
        }
    }

    /// Two producers and two consumers on one ring (what `share` makes):
    /// every value arrives exactly once, and each consumer sees each
    /// producer's values in the order they were sent.
    #[test]
    fn many_producers_and_consumers_lose_and_duplicate_nothing() {
        const PER: u64 = 200_000;
        let ring = Arc::new(BurstRing::<u64>::new(64));
        let producers: Vec<_> = (0..2u64)
            .map(|p| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut i = 0;
                    let mut b = Batch::new();
                    while i < PER || !b.is_empty() {
                        // Bursts of 1 to 32, refilled after partial pushes.
                        let want = 1 + (i % 32) as usize;
                        while b.len() < want && i < PER {
                            b.push(p << 32 | i).unwrap();
                            i += 1;
                        }
                        if ring.push_burst(&mut b) == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let done = Arc::new(AtomicUsize::new(0));
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let (ring, done) = (ring.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut last = [None::<u64>; 2];
                    let mut b = Batch::new();
                    loop {
                        if ring.pop_burst(&mut b) == 0 {
                            if done.load(Ordering::Acquire) == 2 && ring.is_empty() {
                                break;
                            }
                            std::thread::yield_now();
                        }
                        for v in b.drain() {
                            let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                            assert!(last[p].is_none_or(|l| l < i), "out of order");
                            last[p] = Some(i);
                            got.push(v);
                        }
                    }
                    got
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
            done.fetch_add(1, Ordering::Release);
        }
        let mut all: Vec<u64> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort_unstable();
        let want: Vec<u64> = (0..2u64)
            .flat_map(|p| (0..PER).map(move |i| p << 32 | i))
            .collect();
        assert_eq!(all.len(), want.len());
        assert!(all == want, "values lost or duplicated");
    }

    /// A sole producer and a sole consumer on two threads (what an unshared
    /// `RingPort` end and its far end make), through a ring smaller than a
    /// burst's worth of traffic in flight: every value arrives once, in
    /// order, and neither side takes the shared paths.
    #[test]
    fn a_sole_producer_and_consumer_lose_and_reorder_nothing() {
        const N: u64 = 500_000;
        let (mut tx, mut rx) = BurstRing::<u64>::with_handles(48);
        let producer = std::thread::spawn(move || {
            let (mut i, mut b) = (0, Batch::new());
            while i < N || !b.is_empty() {
                let want = 1 + (i % 32) as usize;
                while b.len() < want && i < N {
                    b.push(i).unwrap();
                    i += 1;
                }
                if tx.push_burst(&mut b) == 0 {
                    std::hint::spin_loop();
                }
            }
            tx
        });
        let (mut expect, mut b) = (0, Batch::new());
        while expect < N {
            rx.pop_burst(&mut b);
            for v in b.drain() {
                assert_eq!(v, expect);
                expect += 1;
            }
        }
        let tx = producer.join().unwrap();
        assert!(rx.is_empty());
        assert!(!tx.ring.shared_producers.load(Ordering::Relaxed));
        assert!(!rx.ring.shared_consumers.load(Ordering::Relaxed));
    }

    /// A ring against a queue: bursts of any size (some larger than the
    /// room left) pushed, and popped into batches already partly full, so
    /// that runs of slots wrap around the slot array at every offset.
    /// Every value comes out once, in order, from the ring or the batch it
    /// was left in; none is dropped twice or leaked (each holds a count).
    /// Through the ring's shared paths and through its sole producer's and
    /// consumer's, which a handle may switch from at any point (`share`).
    #[test]
    fn bursts_move_in_order_across_the_wrap() {
        use proptest::prelude::*;
        let op = (any::<bool>(), 0..=BURST, 0..=BURST);
        let sharing = (
            proptest::option::of(0usize..80),
            proptest::option::of(0usize..80),
        );
        proptest!(|(cap in 1usize..40, ops in proptest::collection::vec(op, 1..80), (share_p, share_c) in sharing)| {
            let alive = Arc::new(());
            let (mut producer, mut consumer) = BurstRing::with_handles(cap);
            let (mut p2, mut c2) = (None, None);
            let mut model = std::collections::VecDeque::new();
            let mut next = 0u64;
            for (at, (push, k, pre)) in ops.into_iter().enumerate() {
                if share_p == Some(at) {
                    p2 = Some(producer.share());
                }
                if share_c == Some(at) {
                    c2 = Some(consumer.share());
                }
                // Bursts alternate between a side's handles once it has two.
                let p = match &mut p2 {
                    Some(p) if at % 2 == 1 => p,
                    _ => &mut producer,
                };
                let c = match &mut c2 {
                    Some(c) if at % 2 == 1 => c,
                    _ => &mut consumer,
                };
                if push {
                    let mut b = Batch::new();
                    for _ in 0..k {
                        b.push((next, alive.clone())).unwrap();
                        next += 1;
                    }
                    let room = cap - model.len();
                    let moved = p.push_burst(&mut b);
                    prop_assert_eq!(moved, k.min(room));
                    model.extend((next - k as u64..).take(moved));
                    // What found no room stays in the batch, in order.
                    let left: Vec<u64> = b.iter().map(|v| v.0).collect();
                    let want: Vec<u64> = (next - k as u64 + moved as u64..next).collect();
                    prop_assert_eq!(left, want);
                } else {
                    let mut b = Batch::new();
                    for _ in 0..pre {
                        b.push((u64::MAX, alive.clone())).unwrap();
                    }
                    let moved = c.pop_burst(&mut b);
                    prop_assert_eq!(moved, (BURST - pre).min(model.len()));
                    let got: Vec<u64> = b.iter().skip(pre).map(|v| v.0).collect();
                    let want: Vec<u64> = model.drain(..moved).collect();
                    prop_assert_eq!(got, want);
                    prop_assert!(b.iter().take(pre).all(|v| v.0 == u64::MAX));
                }
                prop_assert_eq!(producer.len(), model.len());
                prop_assert_eq!(Arc::strong_count(&alive), 1 + model.len());
            }
            drop((producer, consumer, p2, c2));
            prop_assert_eq!(Arc::strong_count(&alive), 1);
        });
    }

    /// An end as one handle stays unshared; as three, two shares and the
    /// end itself, on the same queues (what one handle takes, the others
    /// do not see); as none, it is gone.
    #[test]
    fn an_end_splits_into_handles() {
        let pool = pool(64);
        let (a, mut b) = pair(link("a", 1), link("b", 2), 64);
        let one = a.into_handles(1);
        assert_eq!(one.len(), 1);
        assert!(!one[0].rx.ring.shared_consumers.load(Ordering::Relaxed));
        assert!(!one[0].tx.ring.shared_producers.load(Ordering::Relaxed));
        let Some(a) = one.into_iter().next() else {
            unreachable!()
        };
        let end = a.stats().clone();
        let mut three = a.into_handles(3);
        assert_eq!(three.len(), 3);
        // The shares first, each with its own counters; the end itself last.
        assert!(Arc::ptr_eq(three[2].stats(), &end));
        assert!(!Arc::ptr_eq(three[0].stats(), &end) && !Arc::ptr_eq(three[1].stats(), &end));
        assert!(!Arc::ptr_eq(three[0].stats(), three[1].stats()));
        assert!(three[2].rx.ring.shared_consumers.load(Ordering::Relaxed));
        assert!(three[2].tx.ring.shared_producers.load(Ordering::Relaxed));
        let mut batch = Batch::new();
        for i in 0..3u8 {
            batch.push(pool.alloc_copy(&[i; 60]).unwrap()).unwrap();
        }
        assert_eq!(b.tx_burst(&mut batch), 3);
        let mut got = Vec::new();
        for h in &mut three {
            let mut one = Batch::new();
            // Each handle takes what is there: the first takes all three.
            h.rx_burst(&mut one);
            got.extend(one.drain().map(|p| p.data()[0]));
        }
        assert_eq!(got, vec![0, 1, 2]);
        for h in &mut three {
            batch.push(pool.alloc_copy(&[9; 60]).unwrap()).unwrap();
            assert_eq!(h.tx_burst(&mut batch), 1);
        }
        assert_eq!(b.rx_pending(), 3);
        assert!(three.pop().unwrap().into_handles(0).is_empty());
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
