//! pollux's own vhost-user network backend: a VM's virtio-net device
//! (QEMU's `vhost-user` netdev, DPDK's `virtio_user`) served without DPDK.
//!
//! The port connects, as a client, to the front end's unix socket and
//! serves the vhost-user protocol on a control thread of its own ([`proto`]
//! reads the messages): the guest's memory is mapped as the front end
//! shares it, and the rings are set up where it says ([`vring`]). The
//! worker polls the guest's transmit ring (1) and fills its receive ring
//! (0) itself, with no library between: a frame is copied once out of the
//! guest's buffer into a pool buffer, and once out of a pool buffer into
//! the other guest's. The rings are polled, so the port asks the driver
//! not to kick, and interrupts the guest through its call eventfd only
//! when the driver asks for interrupts.
//!
//! What the worker uses is published by the control thread as one
//! immutable [`Active`] (memory, rings, call descriptors) behind a
//! generation counter the worker reads once a burst; before it unmaps
//! memory, or answers `GET_VRING_BASE`, the control thread waits for the
//! worker to let go of the previous one. Everything taken from a ring is
//! returned to it within the same burst, so the used index in guest
//! memory is always where the device stands: a worker starting on a ring
//! begins there, and `GET_VRING_BASE` answers it.
//!
//! Offered: `VIRTIO_F_VERSION_1` and protocol features (`REPLY_ACK`), one
//! queue pair, no offloads or mergeable buffers (each frame in one chain).
//! While the rings do not run (the guest's driver reset the device and the
//! front end stopped them, or the front end is gone) the port drops what
//! it sends as `link_down`; when the front end goes away (QEMU stops) the
//! port connects again.

pub mod proto;
pub mod vring;

use crate::batch::{BURST, Batch};
use crate::buf::PacketBuf;
use crate::pool::{Pool, PoolBuf};
use crate::port::{LinkInfo, Port, PortError};
use crate::stats::{DropReason, LinkState, PortStats};
use crate::wire::MacAddr;
use proto::{ProtoError, Request};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vring::{ChainError, Memory, Split};

/// The guest's receive ring (the device writes it).
const GUEST_RX: usize = 0;
/// The guest's transmit ring (the device reads it).
const GUEST_TX: usize = 1;
/// How long the control thread waits between connection attempts.
const RETRY: Duration = Duration::from_millis(100);
/// How long a front end may leave a message half sent, or a reply unread.
const STALL: Duration = Duration::from_secs(5);
/// How long the control thread waits for the worker to let go of what it
/// used before it gives up and keeps that mapped for the port's life.
const QUIESCE: Duration = Duration::from_secs(5);

/// A ring as the worker uses it.
pub struct ActiveRing {
    ring: Split,
    /// Which start of the ring this is (a kick on any connection of the
    /// port starts it anew).
    start: u64,
    /// Enabled. A started ring that is not carries nothing: what the
    /// guest sends on it is taken and discarded (`link_down`), as the
    /// specification asks.
    enabled: bool,
    /// The call eventfd, when the driver may want interrupts.
    call: Option<Arc<OwnedFd>>,
}

impl ActiveRing {
    /// Returns entry `head`, taken at the cursor, with `len` bytes
    /// written, and moves the cursor on.
    #[inline]
    fn return_entry(&self, c: &mut Cursor, head: u16, len: u32) {
        self.ring.put_used(c.next, head, len);
        c.next = c.next.wrapping_add(1);
    }

    /// Publishes the entries returned up to the cursor, and interrupts the
    /// guest if its driver asks for it.
    #[inline]
    fn publish_used(&self, c: &Cursor) {
        self.ring.set_used_idx(c.next);
        self.notify();
    }

    /// Interrupts the guest if its driver asks for it.
    #[inline]
    fn notify(&self) {
        let Some(fd) = &self.call else {
            return;
        };
        if self.ring.wants_interrupt() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write from a live buffer to a live
            // descriptor, non-blocking (set when it came): a full eventfd
            // counter (EAGAIN) already wakes the guest.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

/// What the worker uses: the rings that run (each keeps the guest's
/// memory mapped).
pub struct Active {
    /// The virtio-net header's length (12 with `VERSION_1`, else 10).
    hdr_len: usize,
    rings: [Option<ActiveRing>; 2],
}

/// What the port and its control thread share.
struct Shared {
    name: String,
    socket: PathBuf,
    /// Bumped after each publication of `active`.
    generation: AtomicU64,
    active: Mutex<Option<Arc<Active>>>,
    stop: AtomicBool,
    link: Arc<LinkState>,
    /// Numbers the rings' starts (from 1).
    starts: AtomicU64,
}

/// Where the device stands on a ring.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    /// The next available entry to take (equal to the used index: each
    /// entry taken is returned in the same burst).
    next: u16,
    /// The guest published an available index more than a ring ahead:
    /// the ring is not polled until the front end starts it again (a new
    /// kick).
    broken: bool,
    /// The ring's start (`ActiveRing::start`), which tells a ring set up
    /// again from the same ring published again.
    start: u64,
}

/// A vhost-user port (one queue pair, polled by one worker).
pub struct VhostUserPort {
    info: LinkInfo,
    stats: Arc<PortStats>,
    pool: Pool,
    shared: Arc<Shared>,
    seen: u64,
    cur: Option<Arc<Active>>,
    cursors: [Cursor; 2],
    control: Option<std::thread::JoinHandle<()>>,
}

impl VhostUserPort {
    /// Port `name` on the front end's socket `socket` (connected to, and
    /// connected to again, by a thread of its own), receiving into buffers
    /// of `pool`.
    pub fn open(name: &str, socket: &Path, mac: MacAddr, pool: Pool) -> Result<Self, PortError> {
        if socket.as_os_str().is_empty() {
            return Err(PortError::BadConfig {
                port: name.to_string(),
                reason: "a vhost_user port needs socket".into(),
            });
        }
        let link = Arc::new(LinkState::default());
        let shared = Arc::new(Shared {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            generation: AtomicU64::new(0),
            active: Mutex::new(None),
            stop: AtomicBool::new(false),
            link: link.clone(),
            starts: AtomicU64::new(1),
        });
        let s = shared.clone();
        let control = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || control_loop(&s))
            .map_err(|e| PortError::BadConfig {
                port: name.to_string(),
                reason: format!("cannot start its control thread: {e}"),
            })?;
        Ok(VhostUserPort {
            info: LinkInfo {
                mtu: 1500,
                ..LinkInfo::new(name, mac, "vhost_user")
            },
            stats: Arc::new(PortStats {
                link: Some(link),
                ..PortStats::default()
            }),
            pool,
            shared,
            seen: 0,
            cur: None,
            cursors: [Cursor::default(); 2],
            control: Some(control),
        })
    }

    /// Takes up what the control thread published last, if it changed:
    /// the previous one let go first, each ring's place read from its used
    /// index.
    #[inline]
    fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.seen {
            self.reload(g);
        }
    }

    #[cold]
    fn reload(&mut self, g: u64) {
        self.cur = None;
        self.seen = g;
        let next = self
            .shared
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(a) = &next {
            for (c, r) in self.cursors.iter_mut().zip(&a.rings) {
                if let Some(r) = r {
                    *c = Cursor {
                        next: r.ring.used_idx(),
                        broken: c.broken && c.start == r.start,
                        start: r.start,
                    };
                }
            }
        }
        self.cur = next;
    }

    /// How many entries ring `q` offers from its cursor on; a guest that
    /// offers more than the ring holds breaks the ring (counted once).
    #[inline]
    fn offered(stats: &PortStats, c: &mut Cursor, ring: &Split) -> u16 {
        if c.broken {
            return 0;
        }
        let n = ring.avail_idx().wrapping_sub(c.next);
        if n > ring.size {
            c.broken = true;
            stats.drops.add(DropReason::BadDescriptor, 1);
            return 0;
        }
        n
    }
}

impl Drop for VhostUserPort {
    fn drop(&mut self) {
        self.cur = None;
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.control.take() {
            let _ = t.join();
        }
    }
}

fn chain_drop(e: ChainError, too_long: DropReason) -> DropReason {
    match e {
        ChainError::Bad => DropReason::BadDescriptor,
        ChainError::TooLong => too_long,
    }
}

impl Port for VhostUserPort {
    type Buf = PoolBuf;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn rx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        self.refresh();
        let Some(a) = self.cur.as_deref() else {
            return 0;
        };
        let Some(r) = &a.rings[GUEST_TX] else {
            return 0;
        };
        let c = &mut self.cursors[GUEST_TX];
        let offered = Self::offered(&self.stats, c, &r.ring);
        if !r.enabled {
            discard(&self.stats, c, r, offered);
            return 0;
        }
        let want = usize::from(offered).min(batch.free_space()).min(BURST);
        if want == 0 {
            return 0;
        }
        // The burst's descriptors and frames, which the guest's core
        // wrote, are loaded all at once before the first is read.
        let heads = prefetch_chains(&r.ring, c.next, want);
        let (mut got, mut bytes, mut taken) = (0u64, 0u64, 0usize);
        while taken < want {
            // (An empty pool leaves the guest's frames in its ring.)
            let Some(mut buf) = self.pool.alloc() else {
                break;
            };
            let head = heads[taken];
            let room = buf.tailroom();
            let read = match buf.append(room) {
                Ok(dst) => read_frame(&r.ring, head, a.hdr_len, dst),
                Err(_) => Err(DropReason::RxNoBuffer),
            };
            match read {
                Ok(n) => {
                    let _ = buf.trim(room - n);
                    bytes += n as u64;
                    got += 1;
                    // Never fails: free space was checked.
                    let _ = batch.push(buf);
                }
                Err(why) => self.stats.drops.add(why, 1),
            }
            r.return_entry(c, head, 0);
            taken += 1;
        }
        if taken > 0 {
            r.publish_used(c);
        }
        self.stats.count_rx(got, bytes);
        got as usize
    }

    fn tx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        self.refresh();
        let ring = self
            .cur
            .as_deref()
            .and_then(|a| Some((a, a.rings[GUEST_RX].as_ref().filter(|r| r.enabled)?)));
        let Some((a, r)) = ring else {
            let n = batch.len() as u64;
            batch.clear();
            self.stats.drops.add(DropReason::LinkDown, n);
            return 0;
        };
        let c = &mut self.cursors[GUEST_RX];
        let mut offered = Self::offered(&self.stats, c, &r.ring);
        // The descriptors of the chains the burst fills, loaded all at once
        // (the guest's core wrote them). Not their buffers, which this core
        // only writes: loaded ahead for reading, each line would cross
        // between the cores twice (shared first, then taken for the store),
        // where the store alone takes it once.
        let _ = prefetch_descs(&r.ring, c.next, usize::from(offered).min(batch.len()));
        // The virtio-net header: no offloads; one buffer (`num_buffers`,
        // its last two bytes, in the 12-byte form).
        let hdr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let hdr = &hdr[..a.hdr_len];
        let (mut sent, mut bytes, mut used) = (0u64, 0u64, 0u16);
        for pkt in batch.drain() {
            if offered == 0 {
                offered = Self::offered(&self.stats, c, &r.ring);
                if offered == 0 {
                    // (A ring the guest broke offers nothing either.)
                    let why = if c.broken {
                        DropReason::BadDescriptor
                    } else {
                        DropReason::TxQueueFull
                    };
                    self.stats.drops.add(why, 1);
                    continue;
                }
            }
            let head = r.ring.avail_entry(c.next);
            let len = match vring::write_chain(&r.ring, head, hdr, pkt.data()) {
                Ok(len) => {
                    sent += 1;
                    bytes += pkt.len() as u64;
                    len
                }
                Err(e) => {
                    self.stats
                        .drops
                        .add(chain_drop(e, DropReason::TxOversize), 1);
                    0
                }
            };
            r.return_entry(c, head, len);
            offered -= 1;
            used += 1;
        }
        if used > 0 {
            r.publish_used(c);
        }
        self.stats.count_tx(sent, bytes);
        sent as usize
    }

    fn kick(&mut self) {}
}

/// Reads the heads of the `n` (at most a burst) available entries from
/// `next` on, and starts loading their first descriptors: the loads of a
/// whole burst in flight together, rather than one miss after another.
#[inline]
fn prefetch_descs(ring: &Split, next: u16, n: usize) -> [u16; BURST] {
    let mut heads = [0u16; BURST];
    let n = n.min(BURST);
    for (k, h) in heads.iter_mut().enumerate().take(n) {
        *h = ring.avail_entry(next.wrapping_add(k as u16));
        ring.prefetch_desc(*h);
    }
    heads
}

/// [`prefetch_descs`], then the first lines of those descriptors'
/// buffers, which the copies read.
#[inline]
fn prefetch_chains(ring: &Split, next: u16, n: usize) -> [u16; BURST] {
    let heads = prefetch_descs(ring, next, n);
    let n = n.min(BURST);
    for &h in heads.iter().take(n) {
        // (A head out of the table is refused when its chain is read.)
        ring.memory().prefetch(ring.desc(h & (ring.size - 1)).addr);
    }
    heads
}

/// Reads the frame of chain `head` into `dst`.
#[inline]
fn read_frame(ring: &Split, head: u16, hdr: usize, dst: &mut [u8]) -> Result<usize, DropReason> {
    vring::read_chain(ring, head, hdr, dst).map_err(|e| chain_drop(e, DropReason::RxOversize))
}

/// Takes the `offered` entries of a started ring that is not enabled
/// back unused, counting what the guest sent as `link_down`.
#[cold]
fn discard(stats: &PortStats, c: &mut Cursor, r: &ActiveRing, offered: u16) {
    // (A burst's worth a poll, as any ring.)
    let offered = offered.min(BURST as u16);
    if offered == 0 {
        return;
    }
    for _ in 0..offered {
        let head = r.ring.avail_entry(c.next);
        r.return_entry(c, head, 0);
    }
    r.publish_used(c);
    stats.drops.add(DropReason::LinkDown, u64::from(offered));
}

/// A ring as the front end set it up.
#[derive(Default)]
struct RingConf {
    num: u32,
    addr: Option<proto::VringAddr>,
    /// A kick message came (the ring is started): which start (0: not
    /// started).
    started: u64,
    /// Enabled (from the start without protocol features).
    enabled: bool,
    call: Option<Arc<OwnedFd>>,
}

/// One connection's device state, on the control thread.
#[derive(Default)]
struct Device {
    features: u64,
    /// The protocol features the front end chose (kept across resets:
    /// they are chosen once a connection).
    protocol: u64,
    mem: Option<Arc<Memory>>,
    rings: [RingConf; 2],
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    /// The socket failed (the front end went away mid-message, or reset
    /// the connection as it died).
    #[error("the socket failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Setup(String),
    #[error("the port stopped")]
    Stopped,
}

/// How a connection ended without an error.
enum End {
    /// The front end closed it.
    Closed,
    /// The port is being dropped.
    Stopped,
}

fn control_loop(s: &Shared) {
    let mut logged = false;
    // Published `Active`s the worker did not let go of in time: kept for
    // the port's life, so their memory stays mapped.
    let mut stuck = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        let stream = match connect(&s.socket) {
            Ok(st) => st,
            Err(e) => {
                if !logged {
                    tracing::info!(
                        port = %s.name,
                        socket = %s.socket.display(),
                        "waiting for the vhost-user front end: {e}"
                    );
                    logged = true;
                }
                std::thread::sleep(RETRY);
                continue;
            }
        };
        logged = false;
        tracing::info!(
            port = %s.name,
            socket = %s.socket.display(),
            "vhost-user front end connected"
        );
        let mut dev = Device::default();
        let end = serve(s, &mut dev, &mut stuck, stream);
        // The connection is over: the worker stops using the rings, and
        // the memory is unmapped once it let go.
        dev.mem = None;
        dev.rings = Default::default();
        let _ = publish(s, &dev, &mut stuck);
        match end {
            Ok(End::Closed) => {
                tracing::info!(port = %s.name, "vhost-user front end closed the connection")
            }
            Ok(End::Stopped) | Err(ConnError::Stopped) => {}
            Err(e) => {
                tracing::warn!(port = %s.name, "vhost-user connection dropped: {e}");
                // (A front end that sends the same again is not
                // answered ten times a second.)
                for _ in 0..10 {
                    if s.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }
}

/// Connects to the unix socket at `path` without waiting. A front end
/// whose listen backlog is full (a stopped or hung QEMU, which no longer
/// accepts) refuses at once (`EAGAIN`), and the control thread tries again
/// later, as when nothing listens: a blocking connect would wait for it
/// with no end, and so would the port's drop, which joins the thread. (A
/// unix socket's connect completes or fails at once; it is never left in
/// progress.) The stream returned blocks, as `serve` expects.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is plain data, valid all zero.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // (Room for the terminating zero the kernel expects of a path.)
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not a unix socket path (over {} bytes, or with a zero byte)",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket(2) with constant arguments; it returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a `sockaddr_un` of at least `len` bytes, alive for
    // the call.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Fills `buf` from `stream` within `deadline` (the whole message's),
/// giving up when the port stops.
fn read_full(
    s: &Shared,
    stream: &mut UnixStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> Result<(), ConnError> {
    while !buf.is_empty() {
        if s.stop.load(Ordering::Relaxed) {
            return Err(ConnError::Stopped);
        }
        if Instant::now() > deadline {
            return Err(ConnError::Setup(format!(
                "a message was not sent whole within {STALL:?}"
            )));
        }
        if !readable(stream)? {
            continue;
        }
        match stream.read(buf) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits up to `RETRY` for `fd` to be readable: false on a timeout.
fn readable(fd: &UnixStream) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, RETRY.as_millis() as libc::c_int) };
    match r {
        0 => Ok(false),
        r if r > 0 => Ok(true),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Serves one connection until the front end closes it, `stop`, or a
/// message pollux cannot take.
fn serve(
    s: &Shared,
    dev: &mut Device,
    stuck: &mut Vec<Arc<Active>>,
    mut stream: UnixStream,
) -> Result<End, ConnError> {
    // A front end that stops halfway through a message, or does not read
    // its replies, ends the connection rather than holding this thread.
    stream.set_write_timeout(Some(STALL))?;
    let mut head = [0u8; proto::HEADER_LEN];
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(End::Stopped);
        }
        if !readable(&stream)? {
            continue;
        }
        let deadline = Instant::now() + STALL;
        let (got, mut fds) = crate::port::fdpass::recv_fds(&mut stream, &mut head)?;
        if got == 0 {
            return Ok(End::Closed);
        }
        read_full(s, &mut stream, &mut head[got..], deadline)?;
        let h = proto::Header::parse(&head)?;
        let mut payload = vec![0u8; h.size as usize];
        read_full(s, &mut stream, &mut payload, deadline)?;
        let req = proto::parse(&h, &payload, fds.len())?;
        if h.flags & proto::NEED_REPLY != 0 && !req.has_reply() {
            // An acknowledgement: 0, done. With REPLY_ACK chosen, a
            // request refused is answered 1 and the connection stays (the
            // front end decides what follows: QEMU reports the error);
            // nothing of it was applied. Without, a front end asking
            // anyway gets its 0 for what was done, and a refusal ends the
            // connection. (A message that is not a request pollux serves,
            // or is malformed, ends it either way.)
            let ack = match handle(s, dev, stuck, req, h.request, &mut fds) {
                Ok(_) => 0,
                Err(ConnError::Setup(why)) if dev.protocol & proto::PF_REPLY_ACK != 0 => {
                    tracing::warn!(
                        port = %s.name,
                        "vhost-user request {} refused: {why}",
                        h.request
                    );
                    1
                }
                Err(e) => return Err(e),
            };
            stream.write_all(&proto::reply_u64(h.request, ack))?;
            continue;
        }
        if let Some(r) = handle(s, dev, stuck, req, h.request, &mut fds)? {
            stream.write_all(&r)?;
        }
    }
}

/// Applies one request; its reply, if it has one.
fn handle(
    s: &Shared,
    dev: &mut Device,
    stuck: &mut Vec<Arc<Active>>,
    req: Request,
    c: u32,
    fds: &mut Vec<OwnedFd>,
) -> Result<Option<Vec<u8>>, ConnError> {
    let ring = |index: u32| -> Result<usize, ConnError> {
        let i = index as usize;
        if i < 2 {
            Ok(i)
        } else {
            Err(ConnError::Setup(format!(
                "ring {index}: this device has one queue pair (rings 0 and 1)"
            )))
        }
    };
    match req {
        Request::GetFeatures => return Ok(Some(proto::reply_u64(c, proto::FEATURES))),
        Request::GetProtocolFeatures => {
            return Ok(Some(proto::reply_u64(c, proto::PROTOCOL_FEATURES)));
        }
        // (Queue pairs: one.)
        Request::GetQueueNum => return Ok(Some(proto::reply_u64(c, 1))),
        Request::SetOwner => {}
        Request::SetProtocolFeatures(f) => {
            only_offered("protocol features", f, proto::PROTOCOL_FEATURES)?;
            dev.protocol = f;
            tracing::info!(port = %s.name, "vhost-user protocol features chosen: {f:#x}");
        }
        Request::SetFeatures(f) => {
            only_offered("features", f, proto::FEATURES)?;
            dev.features = f;
            if f & proto::F_PROTOCOL_FEATURES == 0 {
                // Without protocol features a ring is enabled from the start.
                for r in &mut dev.rings {
                    r.enabled = true;
                }
            }
            let _ = publish(s, dev, stuck);
        }
        Request::Reset => {
            dev.rings = Default::default();
            dev.mem = None;
            dev.features = 0;
            let _ = publish(s, dev, stuck);
        }
        Request::SetMemTable(regions) => {
            let mem = Memory::map(&regions, fds).map_err(ConnError::Setup)?;
            dev.mem = Some(Arc::new(mem));
            let _ = publish(s, dev, stuck);
        }
        Request::SetVringNum { index, num } => {
            let i = ring(index)?;
            if !num.is_power_of_two() || num > vring::MAX_RING {
                return Err(ConnError::Setup(format!(
                    "ring {index}: size {num} is not a power of two up to {}",
                    vring::MAX_RING
                )));
            }
            dev.rings[i].num = num;
        }
        Request::SetVringAddr(a) => {
            let i = ring(a.index)?;
            dev.rings[i].addr = Some(a);
        }
        // The device starts where the used index in guest memory says
        // (see the module doc); the front end's base is the same for a
        // ring this device served, or for a new one.
        Request::SetVringBase { index, .. } => {
            ring(index)?;
        }
        Request::GetVringBase { index } => {
            let i = ring(index)?;
            let place = used_place(dev, i);
            dev.rings[i].started = 0;
            if !publish(s, dev, stuck) {
                // The worker may still be on the ring: the front end must
                // not be told it stopped.
                return Err(ConnError::Setup(format!(
                    "ring {index}: the worker did not let go of it in {QUIESCE:?}"
                )));
            }
            // After the worker let go: nothing moves the used index now.
            let at = place.map_or(0, |r| r.used_idx());
            return Ok(Some(proto::reply_state(c, index, u32::from(at))));
        }
        Request::SetVringKick { index, .. } => {
            let i = ring(index)?;
            // (Kicks are not read: the ring is polled.)
            fds.clear();
            dev.rings[i].started = s.starts.fetch_add(1, Ordering::Relaxed);
            let _ = publish(s, dev, stuck);
        }
        Request::SetVringCall { index, fd } => {
            let i = ring(index)?;
            let call = if fd { fds.pop() } else { None };
            if let Some(c) = &call {
                // The worker writes it: it must never block there (an
                // eventfd whose counter is full; a file is refused).
                nonblocking_event(c).map_err(|e| {
                    ConnError::Setup(format!("ring {index}: its call descriptor: {e}"))
                })?;
            }
            dev.rings[i].call = call.map(Arc::new);
            let _ = publish(s, dev, stuck);
        }
        Request::SetVringErr { index, .. } => {
            ring(index)?;
            fds.clear();
        }
        Request::SetVringEnable { index, enable } => {
            let i = ring(index)?;
            dev.rings[i].enabled = enable;
            let _ = publish(s, dev, stuck);
        }
    }
    Ok(None)
}

/// Refuses `what` (feature bits) `f` if it has bits beyond `offered`.
fn only_offered(what: &str, f: u64, offered: u64) -> Result<(), ConnError> {
    if f & !offered != 0 {
        return Err(ConnError::Setup(format!(
            "{what} {f:#x} include some not offered ({offered:#x})"
        )));
    }
    Ok(())
}

/// Checks that `fd` is not a file or a directory (an eventfd, as front
/// ends send, or a pipe), and sets `O_NONBLOCK` on it.
fn nonblocking_event(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: an all-zero `stat` is a valid value to fill in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a live descriptor into a valid `stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFREG || kind == libc::S_IFDIR {
        return Err(std::io::Error::other("a file or directory, not an eventfd"));
    }
    // SAFETY: fcntl on a live descriptor, reading then setting its flags.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Ring `i` in the current memory, for reading its used index.
fn used_place(dev: &Device, i: usize) -> Option<Split> {
    let r = &dev.rings[i];
    Split::new(dev.mem.as_ref()?, r.addr.as_ref()?, r.num).ok()
}

/// Publishes what the worker is to use now, and waits for it to let go of
/// what it used before: false if it did not in time.
fn publish(s: &Shared, dev: &Device, stuck: &mut Vec<Arc<Active>>) -> bool {
    let hdr_len = if dev.features & (proto::F_VERSION_1 | proto::F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    };
    let next = dev.mem.clone().map(|mem| {
        let rings = std::array::from_fn(|i| {
            let r = &dev.rings[i];
            if r.started == 0 {
                return None;
            }
            let ring = match Split::new(&mem, r.addr.as_ref()?, r.num) {
                Ok(ring) => ring,
                Err(e) => {
                    tracing::warn!(port = %s.name, "vhost-user ring not started: {e}");
                    return None;
                }
            };
            ring.no_kicks();
            Some(ActiveRing {
                ring,
                start: r.started,
                enabled: r.enabled,
                call: r.call.clone(),
            })
        });
        Arc::new(Active { hdr_len, rings })
    });
    let up = next.as_ref().is_some_and(|a| {
        a.rings
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.enabled))
    });
    let old = {
        let mut cur = s
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *cur, next)
    };
    s.generation.fetch_add(1, Ordering::Release);
    s.link.set(up);
    let Some(old) = old else {
        return true;
    };
    // The worker holds its own reference while it uses `old`; it lets go
    // at its next burst.
    let deadline = Instant::now() + QUIESCE;
    while Arc::strong_count(&old) > 1 {
        if Instant::now() > deadline {
            tracing::warn!(
                port = %s.name,
                "the worker did not let go of the vhost-user rings in {QUIESCE:?}; their memory stays mapped"
            );
            stuck.push(old);
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    // Pairs with the worker's release of its reference: what it wrote in
    // the rings is visible here.
    std::sync::atomic::fence(Ordering::Acquire);
    drop(old);
    true
}

#[cfg(test)]
mod tests;
