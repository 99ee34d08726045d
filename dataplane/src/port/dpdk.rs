//! DPDK ports (feature `dpdk`): the EAL, mempools, mbufs as pollux packet
//! buffers, and ethdev ports — any DPDK device by devargs (vdevs such as
//! `net_ring`, `net_tap`, `net_vhost`, `virtio_user`, `net_af_xdp`,
//! `net_memif`, `net_null`) or PCI address (a NIC or a VF bound to vfio-pci).
//!
//! - [`Eal::init`] initialises DPDK's environment once per process (DPDK
//!   cannot do it twice); later calls with the same arguments return the same
//!   handle, other arguments are refused.
//! - [`Mempool`]: an mbuf pool (`rte_pktmbuf_pool_create`).
//! - [`Mbuf`]: one single-segment mbuf; implements [`PacketBuf`], so the
//!   whole switch runs on mbufs without copying. Dropping it frees it.
//! - [`DpdkPort`]: probes the device (`rte_dev_probe`), configures one rx
//!   and one tx queue per worker, starts it in promiscuous mode, and moves
//!   bursts of up to 32 through the C shim's `rte_eth_rx_burst` /
//!   `rte_eth_tx_burst`. Frames the NIC could not take are freed and counted
//!   `tx_queue_full`, or `link_down` while the link is down (a vhost-user
//!   port whose guest is gone or not yet running); multi-segment frames are
//!   dropped as `rx_oversize`. Devices that can raise link-status-change
//!   events (NICs, `net_vhost`: when the guest's device becomes ready and
//!   when it goes away) are asked to, and their link is kept from them,
//!   shared by every queue's [`PortStats::link`]; others report none.
//! - A `net_vhost` port's guest may enable fewer queue pairs than pollux has
//!   workers (a VM with one CPU enables one). The PMD's queue events say
//!   which transmit queues the guest enabled (none once it goes away); a
//!   worker whose own queue is off sends on an enabled one. Every send on a
//!   vhost-user port holds the lock of the queue it uses (uncontended while
//!   every queue is on; the vhost library locks the ring itself anyway), as
//!   OVS does for vhost ports; other devices' sends take no lock.

use super::{LinkInfo, Port, PortError};
use crate::batch::Batch;
use crate::buf::{BufError, PacketBuf};
use crate::stats::{DeviceInfo, DropReason, LinkState, PortStats};
use crate::wire::MacAddr;
use dpdk_sys as d;
use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

/// Why DPDK could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpdkError {
    /// `rte_eal_init` failed.
    #[error("dpdk: EAL initialisation with {args:?} failed: {reason}")]
    Eal {
        /// The arguments.
        args: Vec<String>,
        /// DPDK's reason.
        reason: String,
    },
    /// EAL is already running with other arguments (it cannot restart).
    #[error("dpdk: EAL already runs with {running:?}; cannot start again with {wanted:?}")]
    AlreadyRunning {
        /// The arguments it runs with.
        running: Vec<String>,
        /// The arguments asked for.
        wanted: Vec<String>,
    },
    /// A mempool could not be created.
    #[error("dpdk: mempool {name:?} of {count} mbufs: {reason}")]
    Mempool {
        /// Pool name.
        name: String,
        /// Number of mbufs.
        count: u32,
        /// DPDK's reason.
        reason: String,
    },
    /// An argument contains a NUL byte.
    #[error("dpdk: {0:?} contains a NUL byte")]
    Nul(String),
}

/// DPDK's error text for `rte_errno` (or a negative return value).
fn reason(err: i32) -> String {
    let e = err.abs();
    // SAFETY: rte_strerror returns a pointer to a static or thread-local
    // NUL-terminated string for any errno value.
    let s = unsafe { CStr::from_ptr(d::rte_strerror(e)) };
    format!("{} (errno {e})", s.to_string_lossy())
}

fn errno() -> i32 {
    // SAFETY: reads the calling thread's rte_errno through the shim.
    unsafe { d::pollux_errno() }
}

/// The running EAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eal {
    args: Vec<String>,
}

static EAL: OnceLock<Mutex<Option<Result<Eal, DpdkError>>>> = OnceLock::new();

impl Eal {
    /// Initialises the EAL with `args` (as on a DPDK application's command
    /// line, without the program name), once per process.
    pub fn init(args: &[String]) -> Result<Eal, DpdkError> {
        let cell = EAL.get_or_init(|| Mutex::new(None));
        let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(done) = g.as_ref() {
            return match done {
                Ok(e) if e.args == args => Ok(e.clone()),
                Ok(e) => Err(DpdkError::AlreadyRunning {
                    running: e.args.clone(),
                    wanted: args.to_vec(),
                }),
                Err(err) => Err(err.clone()),
            };
        }
        let mut c = vec![CString::new("pollux").map_err(|_| DpdkError::Nul("pollux".into()))?];
        for a in args {
            c.push(CString::new(a.as_str()).map_err(|_| DpdkError::Nul(a.clone()))?);
        }
        let mut argv: Vec<*mut std::os::raw::c_char> =
            c.iter().map(|a| a.as_ptr().cast_mut()).collect();
        // SAFETY: argv holds valid NUL-terminated strings kept alive by `c`
        // for the call (EAL copies what it keeps); called once per process,
        // under the lock.
        let r = unsafe { d::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        let out = if r < 0 {
            Err(DpdkError::Eal {
                args: args.to_vec(),
                reason: reason(errno()),
            })
        } else {
            Ok(Eal {
                args: args.to_vec(),
            })
        };
        *g = Some(out.clone());
        out
    }
}

/// `rte_lcore_id()` of a thread that is no lcore (`LCORE_ID_ANY`).
const LCORE_ID_ANY: u32 = u32::MAX;

thread_local! {
    /// Whether this thread has been made an lcore (or found to be one),
    /// and the guard that gives its lcore id back when the thread ends.
    static LCORE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LCORE_GUARD: std::cell::RefCell<Option<LcoreGuard>> =
        const { std::cell::RefCell::new(None) };
}

/// Unregisters the thread from DPDK when the thread ends.
struct LcoreGuard;

impl Drop for LcoreGuard {
    fn drop(&mut self) {
        // SAFETY: this thread tried to register itself (`register_thread`)
        // and ends here (unregistering a thread that got no lcore id only
        // releases its thread state); the EAL is never cleaned up while
        // the process runs.
        unsafe { d::rte_thread_unregister() };
    }
}

/// Makes the calling thread a DPDK lcore, once (`rte_thread_register`),
/// unless it is one already (the thread that started the EAL). pollux's
/// workers are its own threads, and a thread that is no lcore bypasses
/// every mempool's per-lcore cache: each mbuf it frees (every packet a
/// PMD has sent) and each one it allocates goes through the pool's shared
/// ring, an atomic operation per mbuf, where an lcore takes them from its
/// own cache. Called on each burst and allocation (which exist only once
/// the EAL runs); after the first call it costs a thread-local read. If
/// DPDK cannot register the thread (all of its `RTE_MAX_LCORE` ids in
/// use), it runs on without the cache, and `rte_thread_unregister` still
/// releases what the attempt set up when the thread ends. Registering
/// turns DPDK's multi-process support off for the process (no secondary
/// process can attach; pollux uses none).
#[inline]
pub(crate) fn register_thread() {
    if !LCORE.get() {
        register_thread_now();
    }
}

/// The calling thread's lcore id, `None` for a thread that is no lcore.
pub fn lcore_id() -> Option<u32> {
    // SAFETY: reads this thread's lcore id (a thread-local).
    let id = unsafe { d::pollux_lcore_id() };
    (id != LCORE_ID_ANY).then_some(id)
}

#[cold]
#[inline(never)]
fn register_thread_now() {
    LCORE.set(true);
    if lcore_id().is_some() {
        return;
    }
    // SAFETY: called on the thread to register, after the EAL started
    // (only DPDK ports and pools call this, which exist after it did).
    // On failure the thread stays without an lcore id; the guard is kept
    // either way, since unregistering such a thread only releases what
    // the attempt set up for it.
    let _ = unsafe { d::rte_thread_register() };
    LCORE_GUARD.with(|g| *g.borrow_mut() = Some(LcoreGuard));
}

/// A pool of mbufs.
#[derive(Debug, Clone, Copy)]
pub struct Mempool(NonNull<d::rte_mempool>);

// SAFETY: DPDK mempools are thread-safe (per-lcore caches, lock-free rings);
// the pointer stays valid for the life of the process (pools are never freed).
unsafe impl Send for Mempool {}
// SAFETY: as for Send: every mempool operation is safe from any thread.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// `count` mbufs with `data_room` bytes each (headroom included), in
    /// the memory of `socket` (-1: any).
    pub fn new(
        _eal: &Eal,
        name: &str,
        count: u32,
        data_room: u16,
        socket: i32,
    ) -> Result<Mempool, DpdkError> {
        let c = CString::new(name).map_err(|_| DpdkError::Nul(name.into()))?;
        // SAFETY: EAL runs (an `Eal` exists); the name is a valid C string.
        let p = unsafe { d::rte_pktmbuf_pool_create(c.as_ptr(), count, 256, 0, data_room, socket) };
        NonNull::new(p)
            .map(Mempool)
            .ok_or_else(|| DpdkError::Mempool {
                name: name.into(),
                count,
                reason: reason(errno()),
            })
    }

    /// One mbuf, or `None` when the pool is empty.
    pub fn alloc(&self) -> Option<Mbuf> {
        register_thread();
        // SAFETY: a valid mempool; the result is checked.
        NonNull::new(unsafe { d::pollux_pktmbuf_alloc(self.0.as_ptr()) }).map(Mbuf)
    }

    /// Mbufs available.
    pub fn available(&self) -> u32 {
        // SAFETY: a valid mempool.
        unsafe { d::rte_mempool_avail_count(self.0.as_ptr()) }
    }
}

impl crate::buf::BufAlloc for Mempool {
    type Buf = Mbuf;
    fn alloc_buf(&self) -> Option<Mbuf> {
        self.alloc()
    }
}

/// One single-segment mbuf: a pollux packet buffer. Dropping it frees it.
#[derive(Debug)]
pub struct Mbuf(NonNull<d::rte_mbuf>);

// SAFETY: an mbuf is owned by exactly one `Mbuf` at a time, and freeing it
// from any thread is allowed (mempool puts are thread-safe).
unsafe impl Send for Mbuf {}

impl Mbuf {
    fn m(&self) -> &d::rte_mbuf {
        // SAFETY: `self.0` is a live mbuf owned by this value.
        unsafe { self.0.as_ref() }
    }

    /// Gives up ownership (for `rte_eth_tx_burst`).
    fn into_raw(self) -> *mut d::rte_mbuf {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: this value owns the mbuf; it is freed once.
        unsafe { d::pollux_pktmbuf_free(self.0.as_ptr()) }
    }
}

impl PacketBuf for Mbuf {
    fn data(&self) -> &[u8] {
        let m = self.m();
        // SAFETY: a single-segment mbuf's data is `data_len` bytes at
        // `buf_addr + data_off` (what rte_pktmbuf_mtod computes), inside its
        // buffer and owned by this value.
        unsafe {
            std::slice::from_raw_parts(
                m.buf_addr.cast::<u8>().add(usize::from(m.data_off)),
                usize::from(m.data_len),
            )
        }
    }

    fn data_mut(&mut self) -> &mut [u8] {
        let m = self.m();
        let (at, len) = (usize::from(m.data_off), usize::from(m.data_len));
        let base = m.buf_addr.cast::<u8>();
        // SAFETY: as for `data`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(base.add(at), len) }
    }

    fn len(&self) -> usize {
        usize::from(self.m().data_len)
    }

    fn headroom(&self) -> usize {
        // SAFETY: a live mbuf owned by this value.
        usize::from(unsafe { d::pollux_pktmbuf_headroom(self.0.as_ptr()) })
    }

    fn tailroom(&self) -> usize {
        // SAFETY: a live mbuf owned by this value.
        usize::from(unsafe { d::pollux_pktmbuf_tailroom(self.0.as_ptr()) })
    }

    fn prepend(&mut self, n: usize) -> Result<&mut [u8], BufError> {
        let no = BufError::NoHeadroom {
            need: n,
            have: self.headroom(),
        };
        let len = u16::try_from(n).map_err(|_| no)?;
        // SAFETY: a live mbuf owned by this value; the shim checks room.
        let p = unsafe { d::pollux_pktmbuf_prepend(self.0.as_ptr(), len) };
        if p.is_null() {
            return Err(no);
        }
        // SAFETY: DPDK returned `n` bytes of this mbuf's data at `p`.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), n) })
    }

    fn adj(&mut self, n: usize) -> Result<(), BufError> {
        let short = BufError::TooShort {
            need: n,
            have: self.len(),
        };
        let len = u16::try_from(n).map_err(|_| short)?;
        // SAFETY: a live mbuf owned by this value; the shim checks length.
        let p = unsafe { d::pollux_pktmbuf_adj(self.0.as_ptr(), len) };
        if p.is_null() { Err(short) } else { Ok(()) }
    }

    fn append(&mut self, n: usize) -> Result<&mut [u8], BufError> {
        let no = BufError::NoTailroom {
            need: n,
            have: self.tailroom(),
        };
        let len = u16::try_from(n).map_err(|_| no)?;
        // SAFETY: a live mbuf owned by this value; the shim checks room.
        let p = unsafe { d::pollux_pktmbuf_append(self.0.as_ptr(), len) };
        if p.is_null() {
            return Err(no);
        }
        // SAFETY: DPDK returned `n` new bytes at the end of this mbuf's data.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), n) })
    }

    fn trim(&mut self, n: usize) -> Result<(), BufError> {
        let short = BufError::TooShort {
            need: n,
            have: self.len(),
        };
        let len = u16::try_from(n).map_err(|_| short)?;
        // SAFETY: a live mbuf owned by this value; the shim checks length.
        let r = unsafe { d::pollux_pktmbuf_trim(self.0.as_ptr(), len) };
        if r == 0 { Ok(()) } else { Err(short) }
    }

    fn reset(&mut self) {
        // SAFETY: a live mbuf owned by this value.
        unsafe { d::pollux_pktmbuf_reset(self.0.as_ptr()) }
    }
}

/// Stops an ethdev port when the last of its queues is dropped, after
/// taking back its callbacks.
#[derive(Debug)]
struct Started {
    port: u16,
    /// What the callbacks write to; outlives their registration.
    events: Arc<PortEvents>,
    /// Whether the link callback is registered.
    link_events: bool,
    /// Whether the queue-state callback is registered (vhost ports).
    queue_events: bool,
    /// The thread that reads the link of a PCI device that raises no link
    /// events, and its stop flag.
    link_poller: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

/// How often the link of a PCI device without link events is read.
const LINK_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether `device` is a PCI address (`0000:01:10.0`): a physical device
/// (a NIC or a VF), not a vdev.
fn is_pci(device: &str) -> bool {
    let b = device.as_bytes();
    b.len() == 12
        && [4, 7].iter().all(|&i| b[i] == b':')
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// What a port's DPDK events keep: its link, and on a vhost-user port which
/// transmit queues its guest enabled.
#[derive(Debug)]
struct PortEvents {
    link: Arc<LinkState>,
    txq: TxQueues,
    /// Serializes the callbacks' reading and recording (DPDK may run them,
    /// and the opening thread its first reading, at the same time).
    update: Mutex<()>,
}

/// Which transmit queues of a port can send.
#[derive(Debug)]
struct TxQueues {
    /// Bit q set: queue q is enabled (the guest of a vhost-user port
    /// enabled it; every queue of other devices).
    enabled: std::sync::atomic::AtomicU64,
    /// Every configured queue's bit.
    all: u64,
    /// A vhost-user port: every send holds the lock of the queue it uses.
    shared: bool,
    /// One per queue.
    locks: Box<[Mutex<()>]>,
}

impl TxQueues {
    /// `queues` queues (at most 64, which `open_queues` checks), of a
    /// vhost-user port (all off until its guest enables them) or not (all
    /// on, for good).
    fn new(queues: u16, vhost: bool) -> TxQueues {
        let all = if queues >= 64 {
            u64::MAX
        } else {
            (1u64 << queues) - 1
        };
        TxQueues {
            enabled: std::sync::atomic::AtomicU64::new(if vhost { 0 } else { all }),
            all,
            shared: vhost,
            locks: (0..queues).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The queue a sender owning `own` uses, if it must lock it: `None` on
    /// other devices (each worker its own queue, no lock); on a vhost-user
    /// port its own queue when enabled, else one of the enabled ones (the
    /// off queues take them in turn), always under that queue's lock: the
    /// queue may be another worker's, and the mask may change between two
    /// workers' readings of it.
    #[inline]
    fn shared(&self, own: u16) -> Option<u16> {
        if !self.shared {
            return None;
        }
        let on = self.enabled.load(std::sync::atomic::Ordering::Relaxed) & self.all;
        if on & (1u64 << (own % 64)) != 0 || on == 0 {
            return Some(own);
        }
        let below = (1u64 << (own % 64)) - 1;
        let nth = (!on & self.all & below).count_ones() % on.count_ones();
        let mut bits = on;
        for _ in 0..nth {
            bits &= bits - 1;
        }
        Some(bits.trailing_zeros() as u16)
    }
}

impl PortEvents {
    /// Records the link of `port` as the driver has it now. When a vhost
    /// port's guest goes away its queues go with it (the PMD resets their
    /// state without a queue event): none is enabled until the guest
    /// enables them again.
    fn link_changed(&self, port: u16) {
        let _one = self
            .update
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (up, speed) = link_of(port);
        if !up && self.txq.shared {
            self.txq
                .enabled
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.link.set_speed(speed);
        self.link.set(up);
    }

    /// Reads the vhost PMD's pending queue events of `port`.
    fn queues_changed(&self, port: u16) {
        let _one = self
            .update
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let mut e = d::rte_eth_vhost_queue_event::default();
            // SAFETY: `e` is a valid out-parameter; the port is a vhost port.
            if unsafe { d::rte_eth_vhost_get_queue_event(port, &mut e) } < 0 {
                break;
            }
            // `rx` events are the guest's transmit side (our receive); a
            // queue beyond those configured is never sent on.
            if e.rx || e.queue_id >= 64 || (1u64 << e.queue_id) & self.txq.all == 0 {
                continue;
            }
            let bit = 1u64 << e.queue_id;
            if e.enable {
                self.txq
                    .enabled
                    .fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
            } else {
                self.txq
                    .enabled
                    .fetch_and(!bit, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// DPDK's link-status-change callback.
unsafe extern "C" fn on_link_change(
    port: u16,
    _event: d::rte_eth_event_type,
    arg: *mut std::ffi::c_void,
    _ret: *mut std::ffi::c_void,
) -> i32 {
    // SAFETY: `arg` is the `PortEvents` of the `Started` that registered
    // this callback; it unregisters the callback before that `Arc` can go.
    let ev = unsafe { &*arg.cast::<PortEvents>() };
    ev.link_changed(port);
    0
}

/// DPDK's queue-state callback (vhost ports).
unsafe extern "C" fn on_queue_state(
    port: u16,
    _event: d::rte_eth_event_type,
    arg: *mut std::ffi::c_void,
    _ret: *mut std::ffi::c_void,
) -> i32 {
    // SAFETY: as in `on_link_change`.
    let ev = unsafe { &*arg.cast::<PortEvents>() };
    ev.queues_changed(port);
    0
}

/// The link of `port` as the driver has it now, without waiting.
/// Whether `port`'s link is up, and its speed in Mbit/s (0 when down or
/// unknown).
fn link_of(port: u16) -> (bool, u32) {
    let mut l = d::rte_eth_link::default();
    // SAFETY: `l` is a valid out-parameter; an unknown port returns < 0.
    let r = unsafe { d::rte_eth_link_get_nowait(port, &mut l) };
    let up = r >= 0 && l.link_status() != 0;
    // (RTE_ETH_SPEED_NUM_UNKNOWN is u32::MAX.)
    let speed = if up && l.link_speed != u32::MAX {
        l.link_speed
    } else {
        0
    };
    (up, speed)
}

impl Started {
    fn arg(&self) -> *mut std::ffi::c_void {
        Arc::as_ptr(&self.events).cast_mut().cast()
    }

    /// Registers `cb` for `event` with this port's `PortEvents`.
    fn register(&self, event: d::rte_eth_event_type, cb: d::rte_eth_dev_cb_fn) -> Result<(), i32> {
        // SAFETY: the callback and its argument stay valid until `Started`
        // unregisters it (in its drop, waiting for it to be out).
        let r = unsafe { d::rte_eth_dev_callback_register(self.port, event, cb, self.arg()) };
        if r < 0 { Err(r) } else { Ok(()) }
    }
}

/// Unregisters a callback, asking again for as long as DPDK says it runs
/// (-EAGAIN): its argument may go only once it is out.
///
/// # Safety
/// `cb` and `arg` must be a registration made on `port`, or none.
unsafe fn unregister(
    port: u16,
    event: d::rte_eth_event_type,
    cb: d::rte_eth_dev_cb_fn,
    arg: *mut std::ffi::c_void,
) {
    loop {
        // SAFETY: as the caller promises.
        let r = unsafe { d::rte_eth_dev_callback_unregister(port, event, cb, arg) };
        if r != -libc::EAGAIN {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: takes back the callbacks registered with this `Started`'s
        // argument (every queue handle of the port is gone).
        unsafe {
            if self.link_events {
                unregister(
                    self.port,
                    d::RTE_ETH_EVENT_INTR_LSC,
                    Some(on_link_change),
                    self.arg(),
                );
            }
            if self.queue_events {
                unregister(
                    self.port,
                    d::RTE_ETH_EVENT_QUEUE_STATE,
                    Some(on_queue_state),
                    self.arg(),
                );
            }
        }
        if let Some((stop, t)) = self.link_poller.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            t.thread().unpark();
            let _ = t.join();
        }
        // SAFETY: stops the port `open_queues` started, once, after every
        // queue handle of it and the link poller are gone.
        unsafe {
            let _ = d::rte_eth_dev_stop(self.port);
        }
        live_ports(|live| {
            if let Some(i) = live.iter().position(|&p| p == self.port) {
                live.swap_remove(i);
            }
        });
    }
}

/// Runs `f` on the ports that have queue handles alive (started by
/// [`DpdkPort::open_queues`], not yet stopped by the last handle's drop).
fn live_ports<T>(f: impl FnOnce(&mut Vec<u16>) -> T) -> T {
    static LIVE: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut live)
}

/// One queue of a DPDK ethdev port.
pub struct DpdkPort {
    info: LinkInfo,
    stats: Arc<PortStats>,
    port: u16,
    queue: u16,
    _started: Arc<Started>,
}

impl std::fmt::Debug for DpdkPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkPort")
            .field("info", &self.info)
            .field("port", &self.port)
            .field("queue", &self.queue)
            .finish()
    }
}

// SAFETY: the port id and queue are plain numbers; each receive queue is
// used by the one worker that owns this value (DPDK queues are
// single-threaded), and so is each transmit queue, except on a vhost-user
// port, where every send holds the lock of the queue it uses.
unsafe impl Send for DpdkPort {}

/// The ethdev name of `device` (devargs or a PCI address): what comes
/// before its first comma.
pub fn device_name(device: &str) -> &str {
    device.split(',').next().unwrap_or(device)
}

/// The ethdev port of `device` in this process, if it has one.
fn port_named(device: &str) -> Result<Option<u16>, String> {
    let short = device_name(device);
    let c = CString::new(short).map_err(|_| format!("{short:?} contains a NUL byte"))?;
    let mut port: u16 = 0;
    // SAFETY: a valid C string and an out-parameter for the port id.
    let known = unsafe { d::rte_eth_dev_get_port_by_name(c.as_ptr(), &mut port) } == 0;
    Ok(known.then_some(port))
}

/// RTE_ETH_DEV_INTR_LSC (a function-like macro in rte_ethdev.h): the device
/// can raise link-status-change events.
const RTE_ETH_DEV_INTR_LSC: u32 = 1 << 1;

const RX_DESC: u16 = 1024;
const TX_DESC: u16 = 1024;

/// The symmetric Toeplitz key (0x6d5a repeated): a flow's two directions
/// hash alike, so a NIC's RSS sends both to one queue.
static SYMMETRIC_RSS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
    0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
    0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
];

/// RTE_ETH_RSS_{IPV4, FRAG_IPV4, NONFRAG_IPV4_TCP, NONFRAG_IPV4_UDP,
/// NONFRAG_IPV4_OTHER, IPV6, NONFRAG_IPV6_TCP, NONFRAG_IPV6_UDP} (function-
/// like macros in rte_ethdev.h, so not in the bindings).
const RSS_HF: u64 =
    (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 11);

impl DpdkPort {
    /// Probes `device` (devargs such as `net_ring0` or
    /// `net_vhost0,iface=/tmp/vm1.sock,client=1`, or a PCI address),
    /// configures one rx and one tx queue with buffers from `pool`, starts
    /// it in promiscuous mode, and returns it as port `name`.
    pub fn open(eal: &Eal, name: &str, device: &str, pool: Mempool) -> Result<Self, PortError> {
        let mut q = Self::open_queues(eal, name, device, pool, 1)?;
        q.pop().ok_or_else(|| PortError::BadConfig {
            port: name.to_string(),
            reason: "no queue".into(),
        })
    }

    /// Gives `device` (as [`DpdkPort::open_queues`] took it) up: removes
    /// it from this process (its driver closes its port; a PCI function's
    /// VFIO device and group are let go), so that another DPDK process can
    /// open it; [`DpdkPort::open_queues`] probes it again. Every queue
    /// handle of it must be gone first (the port is then stopped): while
    /// one lives it is refused. A device this process does not have is no
    /// error.
    pub fn release(_eal: &Eal, name: &str, device: &str) -> Result<(), PortError> {
        let err = |reason: String| PortError::BadConfig {
            port: name.to_string(),
            reason,
        };
        let Some(port) = port_named(device).map_err(err)? else {
            return Ok(());
        };
        if live_ports(|live| live.contains(&port)) {
            return Err(err(format!(
                "device {device:?} is still in use: its queues must go first"
            )));
        }
        let mut info = d::rte_eth_dev_info::default();
        // SAFETY: `port` exists; `info` is a valid out-parameter.
        let r = unsafe { d::rte_eth_dev_info_get(port, &mut info) };
        if r < 0 || info.device.is_null() {
            return Err(err(format!(
                "device {device:?}: no device behind port {port}: {}",
                reason(r)
            )));
        }
        // SAFETY: `info.device` is the rte_device of a probed port whose
        // queue handles are all gone (the caller's promise), so nothing
        // uses it while it is removed.
        let r = unsafe { d::rte_dev_remove(info.device) };
        if r < 0 {
            return Err(err(format!(
                "device {device:?} could not be removed: {}",
                reason(r)
            )));
        }
        Ok(())
    }

    /// Like [`DpdkPort::open`] with `queues` rx/tx queue pairs, one handle
    /// per queue (one per worker). With several queues, RSS with the
    /// symmetric key spreads flows where the device supports it; whatever the
    /// spread, the switch hands each packet to the worker owning its
    /// connection. The port stops when the last handle is dropped.
    pub fn open_queues(
        _eal: &Eal,
        name: &str,
        device: &str,
        pool: Mempool,
        queues: u16,
    ) -> Result<Vec<Self>, PortError> {
        let err = |reason: String| PortError::BadConfig {
            port: name.to_string(),
            reason,
        };
        let dev =
            CString::new(device).map_err(|_| err(format!("{device:?} contains a NUL byte")))?;
        let short = device_name(device);
        let short_c =
            CString::new(short).map_err(|_| err(format!("{short:?} contains a NUL byte")))?;
        let mut port: u16 = 0;
        // SAFETY: a valid C string and an out-parameter for the port id.
        let known = unsafe { d::rte_eth_dev_get_port_by_name(short_c.as_ptr(), &mut port) } == 0;
        if !known {
            // SAFETY: EAL runs; the devargs are a valid C string.
            let r = unsafe { d::rte_dev_probe(dev.as_ptr()) };
            if r < 0 {
                return Err(err(format!(
                    "device {device:?} could not be probed: {}",
                    reason(r)
                )));
            }
            // SAFETY: as above.
            let r = unsafe { d::rte_eth_dev_get_port_by_name(short_c.as_ptr(), &mut port) };
            if r != 0 {
                return Err(err(format!(
                    "device {device:?} has no ethdev port named {short:?}"
                )));
            }
        }
        let call = |what: &str, r: i32| {
            if r < 0 {
                Err(err(format!("{what} on {device:?}: {}", reason(r))))
            } else {
                Ok(())
            }
        };
        let mut info = d::rte_eth_dev_info::default();
        // SAFETY: `port` exists; `info` is a valid out-parameter.
        call("device info", unsafe {
            d::rte_eth_dev_info_get(port, &mut info)
        })?;
        let queues = queues.max(1);
        if queues > 64 {
            return Err(err(format!("{queues} queues asked for, at most 64")));
        }
        if queues > info.max_rx_queues || queues > info.max_tx_queues {
            return Err(err(format!(
                "{queues} queues asked for, the device has {} rx and {} tx",
                info.max_rx_queues, info.max_tx_queues
            )));
        }
        let mut conf = d::rte_eth_conf::default();
        // SAFETY: `dev_flags` points into the port's data, which lives as
        // long as the port (or is null).
        let lsc =
            !info.dev_flags.is_null() && unsafe { *info.dev_flags } & RTE_ETH_DEV_INTR_LSC != 0;
        if lsc {
            // Drivers that can tell link changes do so when asked.
            conf.intr_conf.set_lsc(1);
        }
        let hf = RSS_HF & info.flow_type_rss_offloads;
        if queues > 1 && hf != 0 {
            conf.rxmode.mq_mode = d::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf = d::rte_eth_rss_conf {
                rss_key: SYMMETRIC_RSS_KEY.as_ptr().cast_mut(),
                rss_key_len: SYMMETRIC_RSS_KEY.len() as u8,
                rss_hf: hf,
            };
        }
        // SAFETY: `port` exists; every pointer passed is valid for the call
        // (the RSS key is static and DPDK copies it); the socket id comes
        // from DPDK itself.
        unsafe {
            let socket = d::rte_eth_dev_socket_id(port).max(0) as u32;
            call(
                "configure",
                d::rte_eth_dev_configure(port, queues, queues, &conf),
            )?;
            for q in 0..queues {
                call(
                    "rx queue setup",
                    d::rte_eth_rx_queue_setup(
                        port,
                        q,
                        RX_DESC,
                        socket,
                        std::ptr::null(),
                        pool.0.as_ptr(),
                    ),
                )?;
                call(
                    "tx queue setup",
                    d::rte_eth_tx_queue_setup(port, q, TX_DESC, socket, std::ptr::null()),
                )?;
            }
            call("start", d::rte_eth_dev_start(port))?;
            // Some vdevs have no promiscuous mode; they pass everything anyway.
            let _ = d::rte_eth_promiscuous_enable(port);
        }
        // SAFETY: `driver_name` is DPDK's static C string (or null).
        let vhost = !info.driver_name.is_null()
            && unsafe { CStr::from_ptr(info.driver_name) }.to_bytes() == b"net_vhost";
        let events = Arc::new(PortEvents {
            link: Arc::default(),
            txq: TxQueues::new(queues, vhost),
            update: Mutex::new(()),
        });
        // A PCI device that raises no link events (an e1000 VF) has its
        // link read every `LINK_POLL` (as OVS reads its DPDK ports' links),
        // off the workers. (If the spawn fails, the port was started: it
        // is stopped, as every failure after the start is, by `Started`.)
        let polled = !lsc && is_pci(short);
        let link_poller = if polled {
            events.link_changed(port);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (ev, flag) = (events.clone(), stop.clone());
            match std::thread::Builder::new()
                .name(format!("link-{name}"))
                .spawn(move || {
                    loop {
                        std::thread::park_timeout(LINK_POLL);
                        if flag.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        ev.link_changed(port);
                    }
                }) {
                Ok(t) => Some((stop, t)),
                Err(e) => {
                    // SAFETY: stops the port started above, which nothing
                    // else refers to yet.
                    unsafe {
                        let _ = d::rte_eth_dev_stop(port);
                    }
                    return Err(err(format!("link poller: {e}")));
                }
            }
        } else {
            None
        };
        live_ports(|live| live.push(port));
        let started = Arc::new(Started {
            port,
            events,
            // (Unregistering what was not registered is harmless.)
            link_events: lsc,
            queue_events: vhost,
            link_poller,
        });
        let failed =
            |what: &str, r: i32| err(format!("{what} callback on {device:?}: {}", reason(r)));
        if vhost {
            started
                .register(d::RTE_ETH_EVENT_QUEUE_STATE, Some(on_queue_state))
                .map_err(|r| failed("queue-state", r))?;
            // Events of a guest that connected before the callback was in.
            started.events.queues_changed(port);
        }
        if lsc {
            started
                .register(d::RTE_ETH_EVENT_INTR_LSC, Some(on_link_change))
                .map_err(|r| failed("link-status", r))?;
            // The link as it is now (under the callbacks' lock: a newer
            // event is recorded after this reading, never before).
            started.events.link_changed(port);
        }
        let mut mac = d::rte_ether_addr::default();
        // SAFETY: `port` exists; `mac` is a valid out-parameter.
        unsafe { d::rte_eth_macaddr_get(port, &mut mac) };
        let driver = if info.driver_name.is_null() {
            String::new()
        } else {
            // SAFETY: `driver_name` is DPDK's static C string (checked not
            // null).
            unsafe { CStr::from_ptr(info.driver_name) }
                .to_string_lossy()
                .into_owned()
        };
        let device = DeviceInfo {
            driver,
            name: short.to_string(),
            queues,
            max_queues: (info.max_rx_queues, info.max_tx_queues),
        };
        Ok((0..queues)
            .map(|queue| DpdkPort {
                info: LinkInfo {
                    name: name.to_string(),
                    mac: MacAddr(mac.addr_bytes),
                    mtu: 1500,
                    driver: "dpdk",
                },
                stats: Arc::new(PortStats {
                    // Drivers that tell link changes, and PCI devices (read
                    // every `LINK_POLL`), report a link.
                    link: (lsc || polled).then(|| started.events.link.clone()),
                    device: Some(device.clone()),
                    ..PortStats::default()
                }),
                port,
                queue,
                _started: started.clone(),
            })
            .collect())
    }

    /// The ethdev port id.
    pub fn port_id(&self) -> u16 {
        self.port
    }

    /// The queue this handle polls.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// The link as the driver's events reported it.
    pub fn link_state(&self) -> Option<&Arc<LinkState>> {
        self.stats.link.as_ref()
    }

    /// Link state: (up, speed in Mb/s; 0 when down or unknown), without
    /// waiting.
    pub fn link(&self) -> (bool, u32) {
        link_of(self.port)
    }

    /// The device's own counters for this queue: (received, sent), where the
    /// driver keeps per-queue figures (the first 16 queues).
    pub fn queue_stats(&self) -> (u64, u64) {
        let mut st = d::rte_eth_stats::default();
        // SAFETY: the port exists; `st` is a valid out-parameter.
        if unsafe { d::rte_eth_stats_get(self.port, &mut st) } != 0 {
            return (0, 0);
        }
        let q = usize::from(self.queue);
        (
            st.q_ipackets.get(q).copied().unwrap_or(0),
            st.q_opackets.get(q).copied().unwrap_or(0),
        )
    }
}

impl Port for DpdkPort {
    type Buf = Mbuf;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn rx_burst(&mut self, batch: &mut Batch<Mbuf>) -> usize {
        register_thread();
        let want = batch.free_space().min(crate::BURST);
        if want == 0 {
            return 0;
        }
        let mut raw: [*mut d::rte_mbuf; crate::BURST] = [std::ptr::null_mut(); crate::BURST];
        // SAFETY: `raw` has room for `want` <= BURST mbufs; the queue is
        // set up and owned by this value's worker.
        let n = unsafe { d::pollux_rx_burst(self.port, self.queue, raw.as_mut_ptr(), want as u16) };
        let (mut got, mut bytes) = (0usize, 0u64);
        for p in raw.iter().take(usize::from(n)) {
            let Some(m) = NonNull::new(*p).map(Mbuf) else {
                continue;
            };
            if m.m().nb_segs != 1 {
                self.stats.drops.add(DropReason::RxOversize, 1);
                continue;
            }
            bytes += m.len() as u64;
            got += 1;
            // Never fails: free space was checked.
            let _ = batch.push(m);
        }
        self.stats.count_rx(got as u64, bytes);
        got
    }

    fn tx_burst(&mut self, batch: &mut Batch<Mbuf>) -> usize {
        register_thread();
        let mut raw: [*mut d::rte_mbuf; crate::BURST] = [std::ptr::null_mut(); crate::BURST];
        let mut lens = [0u16; crate::BURST];
        let mut n = 0usize;
        for m in batch.drain() {
            if n == crate::BURST {
                // A batch never holds more than BURST; this is a guard.
                self.stats.drops.add(DropReason::TxQueueFull, 1);
                continue;
            }
            lens[n] = m.len() as u16;
            raw[n] = m.into_raw();
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        // Other devices: the worker's own queue, unlocked. A vhost-user
        // port: the queue `shared` picks, under its lock.
        let txq = &self._started.events.txq;
        let (queue, _lock) = match txq.shared(self.queue) {
            None => (self.queue, None),
            Some(q) => (
                q,
                txq.locks
                    .get(usize::from(q))
                    .map(|l| l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            ),
        };
        // SAFETY: `raw[..n]` are mbufs we own; DPDK takes the ones it sends;
        // the queue is this worker's or held under its lock.
        let sent = usize::from(unsafe {
            d::pollux_tx_burst(self.port, queue, raw.as_mut_ptr(), n as u16)
        });
        for p in raw.iter().take(n).skip(sent) {
            // SAFETY: not sent, so still ours: free it.
            unsafe { d::pollux_pktmbuf_free(*p) };
        }
        if sent < n {
            // Only on a shortfall: the link is read from the shared state.
            let down = self.stats.link.as_ref().is_some_and(|l| !l.is_up());
            let why = if down {
                DropReason::LinkDown
            } else {
                DropReason::TxQueueFull
            };
            self.stats.drops.add(why, (n - sent) as u64);
        }
        let bytes: u64 = lens.iter().take(sent).map(|&l| u64::from(l)).sum();
        self.stats.count_tx(sent as u64, bytes);
        sent
    }

    /// (Nothing waits: what `rte_eth_tx_burst` does not take is dropped.)
    fn kick(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::TxQueues;
    use std::sync::atomic::Ordering;

    #[test]
    fn pci_addresses_are_told_from_vdevs() {
        for d in ["0000:01:10.0", "0000:af:00.7", "ffff:ff:1f.2"] {
            assert!(super::is_pci(d), "{d}");
        }
        for d in [
            "net_vhost0",
            "net_ring0",
            "0000:01:10",
            "0000:01:10.0,x",
            "000g:01:10.0",
            "0000-01:10.0",
            "",
        ] {
            assert!(!super::is_pci(d), "{d}");
        }
    }

    #[test]
    fn vhost_senders_use_enabled_queues_and_others_their_own() {
        // Other devices: every worker its own queue, no lock.
        let q = TxQueues::new(4, false);
        assert!((0..4).all(|own| q.shared(own).is_none()));
        // A vhost-user port: nothing enabled until the guest says so (each
        // its own queue, which refuses); always a queue to lock.
        let q = TxQueues::new(4, true);
        assert_eq!(q.shared(3), Some(3));
        q.enabled.store(0b1111, Ordering::Relaxed);
        let picks: Vec<_> = (0..4).map(|own| q.shared(own)).collect();
        assert_eq!(picks, [Some(0), Some(1), Some(2), Some(3)]);
        // Queues 1 and 3 off: their owners take 0 and 2 in turn.
        q.enabled.store(0b0101, Ordering::Relaxed);
        let picks: Vec<_> = (0..4).map(|own| q.shared(own)).collect();
        assert_eq!(picks, [Some(0), Some(0), Some(2), Some(2)]);
        // Only queue 0 (a one-CPU guest): everyone sends there.
        q.enabled.store(0b0001, Ordering::Relaxed);
        assert!((0..4).all(|own| q.shared(own) == Some(0)));
        // A bit beyond the configured queues is never picked.
        q.enabled.store(0b1_0000, Ordering::Relaxed);
        assert!((0..4).all(|own| q.shared(own) == Some(own)));
        q.enabled.store(0b1_0010, Ordering::Relaxed);
        assert!((0..4).all(|own| q.shared(own) == Some(1)));
    }
}
