//! A port on a kernel network interface through an AF_XDP socket (XSK): the
//! faster kernel path. An XDP program on the interface redirects every frame
//! of the bound queue into the socket's rx ring before the kernel's stack
//! sees it; transmit goes out through the socket's tx ring.
//!
//! Set-up, all with plain system calls (no libbpf): a UMEM area of 4 096
//! frames of 2 KiB (shared memory of a memfd, so that a successor process
//! can map the same pages) registered with the socket; fill, completion, rx and tx
//! rings mapped into the process; the socket bound to (interface, queue) in
//! copy mode; an `XSKMAP` with the socket at its queue index; a five-
//! instruction XDP program (`bpf_redirect_map(&xsks, rx_queue_index,
//! XDP_PASS)`) loaded and attached with a BPF link — in driver mode where the
//! driver has it, else in generic mode. Closing the port closes the link,
//! which detaches the program: nothing stays behind on the interface.
//!
//! rx copies each frame from the UMEM into a pool buffer and gives the UMEM
//! frame back through the fill ring; tx copies into a free UMEM frame, posts
//! it on the tx ring and kicks the kernel once per burst; completed frames
//! return through the completion ring. Counted drops: `rx_no_buffer`,
//! `rx_oversize`, `tx_queue_full` (no free frame or tx slot), `tx_oversize`,
//! and the kernel's own rx drops (`rx_ring_overflow`, from `XDP_STATISTICS`).
//!
//! A successor process (a hitless upgrade) takes the port over
//! ([`AfXdpPort::adopt`]) with duplicates of the socket, the UMEM's memfd
//! and the XDP objects, and the list of free transmit frames: it maps the
//! same rings and memory and goes on from the ring indexes as they stand
//! (this port publishes its own after every burst), so every frame the
//! kernel queued meanwhile is read once; the program stays attached as
//! long as either process holds its link.
//!
//! Unlike AF_PACKET, XDP gets no "checksum not ready" mark: turn transmit
//! checksum offload off on whatever sends into the interface (`ethtool -K
//! eth0 tx off` in a VM's namespace), as well as TSO/GSO.

use super::{LinkInfo, Mapping, Port, PortError};
use crate::batch::Batch;
use crate::buf::PacketBuf;
use crate::pool::{Pool, PoolBuf};
use crate::stats::{DropReason, PortStats};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// UMEM frame size.
const FRAME: usize = 2048;
/// UMEM frames: half stock the fill ring, half are for transmit.
const FRAMES: usize = 4096;
/// Entries of each ring (a power of two).
const RING: u32 = 2048;

// bpf(2) commands, map and program types, helpers (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const XDP_PASS: i32 = 2;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// Entries of the XSKMAP: the queue index is the key.
const XSKMAP_ENTRIES: u32 = 64;

/// One BPF instruction.
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The XDP program: `return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);`
/// (frames of queues without a socket go on to the kernel's stack).
fn program(map_fd: i32) -> [Insn; 6] {
    let i = |code, dst: u8, src: u8, off, imm| Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    };
    [
        // r2 = *(u32 *)(r1 + 16): xdp_md.rx_queue_index
        i(0x61, 2, 1, 16, 0),
        // r1 = map (ld_imm64 with a map fd: two instruction slots)
        i(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        i(0, 0, 0, 0, 0),
        // r3 = XDP_PASS: the action when the queue has no socket
        i(0xb7, 3, 0, 0, XDP_PASS),
        // call bpf_redirect_map
        i(0x85, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
        // exit (r0 holds the action)
        i(0x95, 0, 0, 0, 0),
    ]
}

/// `bpf(cmd, attr)` with `attr` a zero-padded `union bpf_attr`.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a valid, writable 128-byte buffer, at least as large
    // as every `union bpf_attr` member used here; the kernel reads (and for
    // some commands writes) only within the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

/// `bpf(cmd, attr)` for a command that creates a descriptor (a map, a
/// program, a link), owned from here on.
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: for these commands `bpf` returns a new descriptor (it returns
    // an error, not a negative number, on failure), owned by nothing else.
    bpf(cmd, attr).map(|raw| unsafe { super::owned_fd(raw) })
}

fn put32(a: &mut [u8; 128], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8; 128], at: usize, v: u64) {
    a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A mapped XDP ring: producer and consumer indexes and `size` entries.
struct XRing {
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    desc: *mut u8,
    mask: u32,
    /// Our copy of the index we advance (producer or consumer).
    mine: u32,
    /// The ring's memory (`None` until mapped): the pointers above point
    /// into it; held so that dropping the ring unmaps it.
    _map: Option<Mapping>,
}

impl XRing {
    fn prod(&self) -> &AtomicU32 {
        // SAFETY: `producer` points at the ring's 4-byte-aligned producer
        // index inside the live mapping `map` (offset from XDP_MMAP_OFFSETS),
        // which kernel and process update atomically.
        unsafe { &*self.producer }
    }

    fn cons(&self) -> &AtomicU32 {
        // SAFETY: as for `prod`, for the consumer index.
        unsafe { &*self.consumer }
    }

    /// Pointer to entry `i` (reduced modulo the ring size) of `width` bytes.
    fn entry(&self, i: u32, width: usize) -> *mut u8 {
        self.desc.wrapping_add((i & self.mask) as usize * width)
    }
}

/// The UMEM's memory: all of memfd `fd`, shared (a successor process maps
/// the same pages), faulted in at once.
fn map_umem(fd: &OwnedFd) -> std::io::Result<Mapping> {
    Mapping::new(
        FRAMES * FRAME,
        libc::MAP_SHARED | libc::MAP_POPULATE,
        Some(fd.as_fd()),
        0,
    )
}

/// A port on one queue of a kernel interface, through AF_XDP.
pub struct AfXdpPort {
    info: LinkInfo,
    stats: Arc<PortStats>,
    pool: Pool,
    rx: XRing,
    tx: XRing,
    fill: XRing,
    comp: XRing,
    /// The socket and its UMEM, dropped after the rings that refer to them.
    fd: OwnedFd,
    umem: Mapping,
    /// The memfd whose pages `umem` maps.
    umem_fd: OwnedFd,
    free_tx: Vec<u64>,
    /// The XSK map, the program and its link, in that order; closed in
    /// reverse (the link first: detaching the program stops the redirects).
    bpf_fds: Vec<OwnedFd>,
    /// Whether the program runs in driver mode (else generic).
    native: bool,
    /// Polls that found nothing, to pace reading the kernel's drop counts.
    idle_polls: u32,
}

// SAFETY: the socket, UMEM and ring mappings are owned by this port alone
// and the rings' raw pointers into them are only dereferenced through
// `&mut self`, so moving the port to the worker thread that uses it is sound.
unsafe impl Send for AfXdpPort {}

impl std::fmt::Debug for AfXdpPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfXdpPort")
            .field("info", &self.info)
            .field("native", &self.native)
            .finish()
    }
}

impl AfXdpPort {
    /// Opens port `name` on queue `queue` of kernel interface `iface`;
    /// received frames are copied into buffers of `pool`.
    pub fn open(name: &str, iface: &str, queue: u32, pool: Pool) -> Result<Self, PortError> {
        let err = |reason: String| PortError::BadConfig {
            port: name.to_string(),
            reason,
        };
        let (ifindex, info) = super::kernel_interface(name, iface, "af_xdp")?;
        if queue >= XSKMAP_ENTRIES {
            return Err(err(format!(
                "queue {queue} of {iface:?}: at most {XSKMAP_ENTRIES} queues"
            )));
        }
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW, 0) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => err(format!(
                    "opening an AF_XDP socket on {iface:?} needs CAP_NET_RAW, CAP_NET_ADMIN and CAP_BPF (run as root): {e}"
                )),
                _ => err(format!("cannot open an AF_XDP socket on {iface:?}: {e}")),
            });
        }
        // Closed on every error path from here (dropped).
        // SAFETY: `raw` is the socket just created above (checked >= 0),
        // owned by nothing else.
        let fd = unsafe { super::owned_fd(raw) };
        let umem_len = FRAMES * FRAME;
        // SAFETY: memfd_create with a NUL-terminated name; the result is
        // checked.
        let raw = unsafe { libc::memfd_create(c"pollux-umem".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(format!("cannot make UMEM memory for {iface:?}: {e}")));
        }
        // SAFETY: `raw` is the memfd just created (checked >= 0), owned by
        // nothing else.
        let umem_fd = unsafe { super::owned_fd(raw) };
        // SAFETY: ftruncate on our own memfd; the result is checked.
        if unsafe { libc::ftruncate(umem_fd.as_raw_fd(), umem_len as libc::off_t) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(format!(
                "cannot size {umem_len} bytes of UMEM for {iface:?}: {e}"
            )));
        }
        let umem = map_umem(&umem_fd).map_err(|e| {
            err(format!(
                "cannot map {umem_len} bytes of UMEM for {iface:?}: {e}"
            ))
        })?;
        // From here, dropping `port` releases whatever was set up.
        let mut port = Self::unmapped(info, pool, fd, umem, umem_fd);
        port.setup(iface, ifindex, queue).map_err(err)?;
        Ok(port)
    }

    /// A port on `fd` and its UMEM whose rings are not mapped yet.
    fn unmapped(info: LinkInfo, pool: Pool, fd: OwnedFd, umem: Mapping, umem_fd: OwnedFd) -> Self {
        let empty = || XRing {
            producer: std::ptr::null(),
            consumer: std::ptr::null(),
            desc: std::ptr::null_mut(),
            mask: 0,
            mine: 0,
            _map: None,
        };
        AfXdpPort {
            info,
            stats: Arc::default(),
            pool,
            rx: empty(),
            tx: empty(),
            fill: empty(),
            comp: empty(),
            fd,
            umem,
            umem_fd,
            free_tx: Vec::with_capacity(FRAMES / 2),
            bpf_fds: Vec::new(),
            native: false,
            idle_polls: 0,
        }
    }

    /// Port `name` on kernel interface `iface` from the socket, UMEM and
    /// XDP objects a predecessor process handed over (`h`, from
    /// [`Port::handover`] of an AF_XDP port): the same rings, read and
    /// written on from where they stand.
    pub fn adopt(
        name: &str,
        iface: &str,
        pool: Pool,
        h: super::Handover,
    ) -> Result<Self, PortError> {
        let err = |reason: String| PortError::BadConfig {
            port: name.to_string(),
            reason,
        };
        let (_, info) = super::kernel_interface(name, iface, "af_xdp")?;
        // SAFETY: SO_DOMAIN reads a C int.
        let domain = unsafe {
            super::get_sockopt::<libc::c_int>(h.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN)
        };
        if domain.ok() != Some(libc::AF_XDP) {
            return Err(err(format!(
                "the socket handed over for {iface:?} is not an AF_XDP socket"
            )));
        }
        let umem_len = FRAMES * FRAME;
        if h.frame_size != FRAME || h.frames != FRAMES {
            return Err(err(format!(
                "a UMEM of {} frames of {} bytes was handed over for {iface:?}; this pollux's has {FRAMES} of {FRAME}",
                h.frames, h.frame_size
            )));
        }
        let mut extra = h.extra.into_iter();
        let (Some(umem_fd), Some(map), Some(prog), Some(link), None) = (
            extra.next(),
            extra.next(),
            extra.next(),
            extra.next(),
            extra.next(),
        ) else {
            return Err(err(format!(
                "the handover for {iface:?} does not bring the UMEM and the XDP map, program and link"
            )));
        };
        // SAFETY: an all-zero stat is a valid value for fstat to fill in.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which is a live stat.
        let r = unsafe { libc::fstat(umem_fd.as_raw_fd(), &mut st) };
        if r != 0 || st.st_size != umem_len as libc::off_t {
            return Err(err(format!(
                "the UMEM memory handed over for {iface:?} is not {umem_len} bytes"
            )));
        }
        let mut seen = vec![false; FRAMES];
        for &f in &h.free {
            let i = (f as usize) / FRAME;
            if !(f as usize).is_multiple_of(FRAME)
                || i >= FRAMES
                || std::mem::replace(&mut seen[i], true)
            {
                return Err(err(format!(
                    "free frame {f} handed over for {iface:?} is not a frame of the UMEM, or twice"
                )));
            }
        }
        let umem = map_umem(&umem_fd).map_err(|e| {
            err(format!(
                "cannot map the UMEM handed over for {iface:?}: {e}"
            ))
        })?;
        let mut port = Self::unmapped(info, pool, h.fd, umem, umem_fd);
        port.bpf_fds = vec![map, prog, link];
        port.map_rings().map_err(err)?;
        // Our indexes are the ones published (after every burst).
        port.rx.mine = port.rx.cons().load(Ordering::Acquire);
        port.tx.mine = port.tx.prod().load(Ordering::Acquire);
        port.fill.mine = port.fill.prod().load(Ordering::Acquire);
        port.comp.mine = port.comp.cons().load(Ordering::Acquire);
        port.free_tx.extend(h.free);
        Ok(port)
    }

    /// Whether the XDP program runs in driver (native) mode (false on a
    /// port taken over from a predecessor: the mode is not handed over).
    pub fn native(&self) -> bool {
        self.native
    }

    fn sockopt<T>(&self, opt: libc::c_int, v: &T, what: &str) -> Result<(), String> {
        super::set_sockopt(self.fd.as_raw_fd(), libc::SOL_XDP, opt, v)
            .map_err(|e| format!("{what}: {e}"))
    }

    fn map_ring(
        &self,
        off: &libc::xdp_ring_offset,
        entries: u32,
        width: usize,
        pgoff: u64,
    ) -> Result<XRing, String> {
        let len = off.desc as usize + entries as usize * width;
        // The ring the kernel created for this socket, at the page offset
        // the AF_XDP documentation gives.
        let map = Mapping::new(
            len,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            Some(self.fd.as_fd()),
            pgoff as libc::off_t,
        )
        .map_err(|e| format!("cannot map an XDP ring: {e}"))?;
        let base = map.as_ptr();
        Ok(XRing {
            producer: base.wrapping_add(off.producer as usize).cast(),
            consumer: base.wrapping_add(off.consumer as usize).cast(),
            desc: base.wrapping_add(off.desc as usize),
            mask: entries - 1,
            mine: 0,
            _map: Some(map),
        })
    }

    /// Maps the socket's four rings.
    fn map_rings(&mut self) -> Result<(), String> {
        // SAFETY: xdp_mmap_offsets is a C struct of u64 offsets.
        let off = unsafe {
            super::get_sockopt::<libc::xdp_mmap_offsets>(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
            )
        }
        .map_err(|e| format!("XDP_MMAP_OFFSETS: {e}"))?;
        let desc = std::mem::size_of::<libc::xdp_desc>();
        self.rx = self.map_ring(&off.rx, RING, desc, libc::XDP_PGOFF_RX_RING as u64)?;
        self.tx = self.map_ring(&off.tx, RING, desc, libc::XDP_PGOFF_TX_RING as u32 as u64)?;
        self.fill = self.map_ring(&off.fr, RING, 8, libc::XDP_UMEM_PGOFF_FILL_RING)?;
        self.comp = self.map_ring(&off.cr, RING, 8, libc::XDP_UMEM_PGOFF_COMPLETION_RING)?;
        Ok(())
    }

    fn setup(&mut self, iface: &str, ifindex: u32, queue: u32) -> Result<(), String> {
        let reg = libc::xdp_umem_reg {
            addr: self.umem.as_ptr() as u64,
            len: self.umem.len() as u64,
            chunk_size: FRAME as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        self.sockopt(libc::XDP_UMEM_REG, &reg, "XDP_UMEM_REG")?;
        for (opt, what) in [
            (libc::XDP_UMEM_FILL_RING, "fill ring"),
            (libc::XDP_UMEM_COMPLETION_RING, "completion ring"),
            (libc::XDP_RX_RING, "rx ring"),
            (libc::XDP_TX_RING, "tx ring"),
        ] {
            self.sockopt(opt, &(RING as libc::c_int), what)?;
        }
        self.map_rings()?;
        // Half the frames wait in the fill ring for rx; half are for tx.
        for f in 0..FRAMES / 2 {
            let at = self.fill.entry(self.fill.mine, 8).cast::<u64>();
            // SAFETY: the entry lies in the fill ring mapping; the kernel
            // reads it only after the producer index moves past it.
            unsafe { at.write((f * FRAME) as u64) };
            self.fill.mine = self.fill.mine.wrapping_add(1);
        }
        self.fill.prod().store(self.fill.mine, Ordering::Release);
        self.free_tx
            .extend((FRAMES / 2..FRAMES).map(|f| (f * FRAME) as u64));
        let sxdp = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // A socket closed a moment ago may still hold the queue (the kernel
        // releases it asynchronously): retry "busy" for up to a second.
        let mut tries = 0;
        loop {
            // SAFETY: `sxdp` is a valid sockaddr_xdp of the length passed.
            let r = unsafe {
                libc::bind(
                    self.fd.as_raw_fd(),
                    (&sxdp as *const libc::sockaddr_xdp).cast(),
                    std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            tries += 1;
            if e.raw_os_error() != Some(libc::EBUSY) || tries >= 50 {
                return Err(format!("cannot bind to queue {queue} of {iface:?}: {e}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.attach(iface, ifindex, queue)
    }

    /// The XSKMAP with this socket at `queue`, the program, and its link.
    fn attach(&mut self, iface: &str, ifindex: u32, queue: u32) -> Result<(), String> {
        let mut a = [0u8; 128];
        put32(&mut a, 0, BPF_MAP_TYPE_XSKMAP);
        put32(&mut a, 4, 4);
        put32(&mut a, 8, 4);
        put32(&mut a, 12, XSKMAP_ENTRIES);
        let map = bpf_fd(BPF_MAP_CREATE, &mut a)
            .map_err(|e| format!("cannot create an XSKMAP (needs CAP_BPF): {e}"))?;
        let map_fd = map.as_raw_fd();
        self.bpf_fds.push(map);
        let (key, value) = (queue, self.fd.as_raw_fd() as u32);
        let mut a = [0u8; 128];
        put32(&mut a, 0, map_fd as u32);
        put64(&mut a, 8, &key as *const u32 as u64);
        put64(&mut a, 16, &value as *const u32 as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut a)
            .map_err(|e| format!("cannot put the socket in the XSKMAP: {e}"))?;
        let insns = program(map_fd);
        let license = c"GPL";
        let mut log = vec![0u8; 4096];
        let mut a = [0u8; 128];
        put32(&mut a, 0, BPF_PROG_TYPE_XDP);
        put32(&mut a, 4, insns.len() as u32);
        put64(&mut a, 8, insns.as_ptr() as u64);
        put64(&mut a, 16, license.as_ptr() as u64);
        put32(&mut a, 24, 1);
        put32(&mut a, 28, log.len() as u32);
        put64(&mut a, 32, log.as_mut_ptr() as u64);
        // expected_attach_type (after kern_version, prog_flags, prog_name[16], prog_ifindex)
        put32(&mut a, 68, BPF_XDP);
        let prog = bpf_fd(BPF_PROG_LOAD, &mut a).map_err(|e| {
            let text = String::from_utf8_lossy(&log);
            format!(
                "the XDP program was refused: {e} ({})",
                text.trim_end_matches('\0').trim()
            )
        })?;
        let prog_fd = prog.as_raw_fd();
        self.bpf_fds.push(prog);
        let mut last = String::new();
        for (mode, native) in [(XDP_FLAGS_DRV_MODE, true), (XDP_FLAGS_SKB_MODE, false)] {
            let mut a = [0u8; 128];
            put32(&mut a, 0, prog_fd as u32);
            put32(&mut a, 4, ifindex);
            put32(&mut a, 8, BPF_XDP);
            put32(&mut a, 12, mode);
            match bpf_fd(BPF_LINK_CREATE, &mut a) {
                Ok(link) => {
                    self.bpf_fds.push(link);
                    self.native = native;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "cannot attach the XDP program to {iface:?} (another XDP program there?): {last}"
        ))
    }

    /// Posts the descriptors written so far and has the kernel transmit
    /// them: in copy mode it sends at most 32 a call by default and then
    /// answers `EAGAIN` (publishing how far it got only once it has taken
    /// everything), so a backlog takes calls, their completions reaped
    /// between them, until one takes the rest or fails otherwise (the link
    /// down). At most as many calls as the backlog needs at 32 each: the
    /// kernel also answers `EAGAIN`, having taken nothing, while the
    /// driver's queue is stopped.
    fn drain(&mut self) {
        let left = self
            .tx
            .mine
            .wrapping_sub(self.tx.cons().load(Ordering::Acquire));
        for _ in 0..left.div_ceil(32).max(1) {
            self.reap();
            if self.tx.mine == self.tx.cons().load(Ordering::Acquire) || !self.send_posted() {
                break;
            }
        }
    }

    /// Posts the descriptors written so far and tells the kernel to
    /// transmit them (without waiting). True when it stopped short with
    /// more left to take (`EAGAIN`: its budget for one call used up, no
    /// room for their completions, or the driver's queue stopped).
    fn send_posted(&mut self) -> bool {
        self.tx.prod().store(self.tx.mine, Ordering::Release);
        super::kick_socket(self.fd.as_raw_fd())
            .is_some_and(|e| e.raw_os_error() == Some(libc::EAGAIN))
    }

    /// Moves completed tx frames back to the free list.
    fn reap(&mut self) {
        let prod = self.comp.prod().load(Ordering::Acquire);
        while self.comp.mine != prod {
            let at = self.comp.entry(self.comp.mine, 8).cast::<u64>();
            // SAFETY: entries between our consumer index and the producer
            // index were written by the kernel and are ours to read.
            self.free_tx.push(unsafe { at.read() });
            self.comp.mine = self.comp.mine.wrapping_add(1);
        }
        self.comp.cons().store(self.comp.mine, Ordering::Release);
    }

    /// Adds the kernel's own rx drop counts to `rx_ring_overflow`.
    fn collect_kernel_drops(&self) {
        // SAFETY: xdp_statistics is a C struct of u64 counters.
        let st = unsafe {
            super::get_sockopt::<libc::xdp_statistics>(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
            )
        };
        let Ok(st) = st else { return };
        let lost = st.rx_dropped + st.rx_ring_full;
        if lost > 0 {
            let seen = self.stats.drops.get(DropReason::RxRingOverflow);
            if lost > seen {
                self.stats
                    .drops
                    .add(DropReason::RxRingOverflow, lost - seen);
            }
        }
    }
}

impl Drop for AfXdpPort {
    fn drop(&mut self) {
        // The link first: detaching the program stops the redirects. The
        // rings, then the socket and UMEM, go with the fields, in order.
        while let Some(fd) = self.bpf_fds.pop() {
            drop(fd);
        }
    }
}

impl Port for AfXdpPort {
    type Buf = PoolBuf;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn handover(&self) -> Option<std::io::Result<super::Handover>> {
        let dup = || -> std::io::Result<super::Handover> {
            let mut extra = vec![self.umem_fd.try_clone()?];
            for f in &self.bpf_fds {
                extra.push(f.try_clone()?);
            }
            Ok(super::Handover {
                fd: self.fd.try_clone()?,
                // The ring indexes travel in the rings themselves.
                rx_next: 0,
                tx_next: 0,
                frame_size: FRAME,
                frames: FRAMES,
                extra,
                free: self.free_tx.clone(),
            })
        };
        Some(dup())
    }

    fn rx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        let prod = self.rx.prod().load(Ordering::Acquire);
        let (mut n, mut bytes) = (0usize, 0u64);
        let mut back = 0u32;
        while self.rx.mine != prod && batch.free_space() > 0 {
            let at = self.rx.entry(self.rx.mine, 16).cast::<libc::xdp_desc>();
            // SAFETY: entries between our consumer index and the producer
            // index were written by the kernel and are ours to read.
            let d = unsafe { at.read() };
            self.rx.mine = self.rx.mine.wrapping_add(1);
            let (addr, len) = (d.addr as usize, d.len as usize);
            if addr + len <= self.umem.len() && len <= FRAME {
                match self.pool.alloc() {
                    Some(mut buf) => match buf.append(len) {
                        Ok(dst) => {
                            // SAFETY: `addr + len` is inside the UMEM (checked),
                            // and the kernel handed this frame to us.
                            let src = unsafe {
                                std::slice::from_raw_parts(self.umem.as_ptr().add(addr), len)
                            };
                            dst.copy_from_slice(src);
                            bytes += len as u64;
                            n += 1;
                            // Never fails: free space was checked.
                            let _ = batch.push(buf);
                        }
                        Err(_) => self.stats.drops.add(DropReason::RxOversize, 1),
                    },
                    None => self.stats.drops.add(DropReason::RxNoBuffer, 1),
                }
            } else {
                self.stats.drops.add(DropReason::RxOversize, 1);
            }
            // The frame goes straight back to the fill ring: the fill ring
            // has room for every frame it ever held.
            let f = self.fill.entry(self.fill.mine, 8).cast::<u64>();
            // SAFETY: the fill ring has RING entries and at most FRAMES/2 <=
            // RING frames circulate through it, so this slot is free.
            unsafe { f.write((addr - addr % FRAME) as u64) };
            self.fill.mine = self.fill.mine.wrapping_add(1);
            back += 1;
        }
        if back > 0 {
            self.rx.cons().store(self.rx.mine, Ordering::Release);
            self.fill.prod().store(self.fill.mine, Ordering::Release);
        }
        if n > 0 {
            self.stats.count_rx(n as u64, bytes);
        } else if back == 0 {
            // Idle: a cheap moment to notice kernel-side drops, once every
            // 64 Ki idle polls (a system call per poll would cost more than
            // the poll).
            self.idle_polls = self.idle_polls.wrapping_add(1);
            if self.idle_polls.is_multiple_of(1 << 16) {
                self.collect_kernel_drops();
            }
        }
        n
    }

    fn tx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        self.reap();
        let (mut n, mut bytes) = (0usize, 0u64);
        let cons = self.tx.cons().load(Ordering::Acquire);
        // By reference (the frames are copied), the buffers all freed
        // after: moving each out of the batch costs a store-forwarding
        // stall per packet (see `platform::drain_each`).
        for pkt in batch.iter() {
            let data = pkt.data();
            if data.len() > FRAME {
                self.stats.drops.add(DropReason::TxOversize, 1);
                continue;
            }
            let full = self.tx.mine.wrapping_sub(cons) > self.tx.mask;
            // (A free frame is taken only when the ring has room for it.)
            let Some(frame) = (!full).then(|| self.free_tx.pop()).flatten() else {
                self.stats.drops.add(DropReason::TxQueueFull, 1);
                continue;
            };
            // SAFETY: `frame` is a free UMEM frame (from the free list) of
            // FRAME >= len bytes; the tx slot is free (fewer than RING
            // entries outstanding) and the kernel reads it only after the
            // producer index moves past it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    self.umem.as_ptr().add(frame as usize),
                    data.len(),
                );
                self.tx
                    .entry(self.tx.mine, 16)
                    .cast::<libc::xdp_desc>()
                    .write(libc::xdp_desc {
                        addr: frame,
                        len: data.len() as u32,
                        options: 0,
                    });
            }
            self.tx.mine = self.tx.mine.wrapping_add(1);
            bytes += data.len() as u64;
            n += 1;
        }
        batch.clear();
        // A kick that fails (EAGAIN while the driver is busy, ENETDOWN while
        // the link is down) leaves its descriptors posted, for the next kick
        // to send. A ring full of them has no room for a new frame to kick
        // for: kick while any are left, or the port would never send again
        // once the kernel could take them.
        if n > 0 || self.tx.mine != cons {
            self.drain();
            self.stats.count_tx(n as u64, bytes);
        }
        n
    }

    fn kick(&mut self) {
        self.reap();
        if self.tx.mine != self.tx.cons().load(Ordering::Acquire) {
            self.drain();
        }
        self.reap();
    }
}
