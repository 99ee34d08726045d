//! A port on a kernel network interface through an AF_PACKET socket with
//! memory-mapped TPACKET_V2 rings: any veth, tap or NIC, no DPDK needed.
//!
//! - rx: the kernel fills fixed-size frame slots of the rx ring and flips each
//!   slot's status to "user"; `rx_burst` copies up to a burst of frames into
//!   pool buffers and hands the slots back. No system call per burst.
//! - tx: `tx_burst` copies frames into free slots of the tx ring, marks them
//!   "send request" and kicks the kernel with one `sendto` per burst;
//!   `PACKET_QDISC_BYPASS` sends them straight to the driver.
//! - the socket is bound to one interface, in promiscuous mode, and ignores
//!   its own outgoing frames.
//!
//! Counted drops: `rx_no_buffer` (pool empty), `rx_oversize` (frame larger
//! than a ring slot or a buffer: turn off GRO/TSO on the interfaces a VM
//! sends through), `rx_ring_overflow` (the kernel's own count of frames lost
//! because the rx ring was full, read when it flags a loss),
//! `tx_queue_full` (no free tx slot), `tx_oversize` (larger than a slot,
//! or than the interface's MTU lets the kernel send; the MTU read at open
//! and every few kicks) and `malformed` (shorter than an Ethernet header).
//! `PACKET_LOSS` has the kernel discard a frame it refuses all the same
//! (the MTU lowered since it was read) rather than stop the tx ring at it;
//! such a frame counts as sent.
//!
//! Frames whose transport checksum the sender left to offload (the kernel
//! marks them "checksum not ready", usual on veth and tap) are completed here
//! ([`crate::rewrite::complete_partial_checksum`]), so the switch always
//! forwards valid checksums.
//!
//! Why TPACKET_V2 and not V3: V3's block-based rx ring batches frames per
//! block with a timeout, which adds latency at low rates unless tuned; V2's
//! per-frame slots give the lowest latency and the same zero-syscall rx, and
//! V3's tx ring is V2's anyway.

use super::{LinkInfo, Mapping, Port, PortError};
use crate::batch::Batch;
use crate::buf::PacketBuf;
use crate::pool::{Pool, PoolBuf};
use crate::stats::{DropReason, PortStats};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes per ring slot: a 1500-byte MTU frame plus the slot header fits.
const FRAME_SIZE: usize = 2048;
/// Slots per ring (each way): 4 MiB of rx ring absorbs bursts while a worker
/// is busy elsewhere.
const FRAMES: usize = 2048;
/// Ring block size (a multiple of the page size holding whole frames).
const BLOCK_SIZE: usize = 1 << 16;
/// Where frame data starts in a tx slot (TPACKET2_HDRLEN - sizeof(sockaddr_ll)).
const TX_DATA_OFF: usize = (std::mem::size_of::<libc::tpacket2_hdr>() + 15) & !15;

/// Bytes of an Ethernet header: what a frame carries beyond its
/// interface's MTU.
const ETH_HEADER: usize = 14;
/// Bytes of a VLAN tag: what a tagged frame carries beyond that.
const VLAN_TAG: usize = 4;

/// Sizes of the rings of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSize {
    /// Bytes per slot (a power of two, at least 2048 for a 1500 MTU).
    pub frame_size: usize,
    /// Slots per ring.
    pub frames: usize,
}

impl RingSize {
    /// Refuses sizes the rings cannot have: slots a power of two from 256
    /// bytes (a slot holds its header and a frame, 4-byte aligned) to a
    /// block, filling whole blocks, and rings that fit in memory.
    fn check(&self) -> Result<usize, String> {
        let ok = self.frame_size.is_power_of_two()
            && self.frame_size >= 256
            && self.frame_size <= BLOCK_SIZE
            && self.frames > 0
            && self.frames.is_multiple_of(BLOCK_SIZE / self.frame_size);
        let len = self
            .frames
            .checked_mul(self.frame_size)
            .filter(|&l| l.checked_mul(2).is_some());
        match (ok, len) {
            (true, Some(len)) => Ok(len),
            _ => Err(format!(
                "ring of {} slots of {} bytes: slots must be a power of two from 256 to {BLOCK_SIZE} bytes, filling whole {BLOCK_SIZE}-byte blocks",
                self.frames, self.frame_size
            )),
        }
    }
}

impl Default for RingSize {
    fn default() -> Self {
        RingSize {
            frame_size: FRAME_SIZE,
            frames: FRAMES,
        }
    }
}

/// One mapped ring: `frames` slots of `frame_size` bytes from `base`.
struct Ring {
    base: *mut u8,
    frame_size: usize,
    frames: usize,
    next: usize,
}

impl Ring {
    /// The status word of slot `i`: the first field of its `tpacket2_hdr`.
    #[inline]
    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: slot `i % frames` lies inside the mapping (`base` maps
        // `frames * frame_size` bytes for this ring and lives as long as
        // `self`); a slot starts with `tpacket2_hdr`, whose first field is the
        // 4-byte-aligned u32 `tp_status` that kernel and user hand over with
        // atomic stores (the kernel side uses barriers and plain stores, the
        // TPACKET protocol).
        unsafe { AtomicU32::from_ptr(self.slot(i).cast::<u32>()) }
    }

    #[inline]
    fn slot(&self, i: usize) -> *mut u8 {
        // `wrapping_add` keeps this a safe pointer computation; the index is
        // reduced modulo `frames`, so the result is inside the mapping.
        self.base.wrapping_add((i % self.frames) * self.frame_size)
    }
}

/// A port on a kernel interface.
pub struct AfPacketPort {
    info: LinkInfo,
    stats: Arc<PortStats>,
    pool: Pool,
    rx: Ring,
    tx: Ring,
    /// The rx and tx rings, held so that dropping the port unmaps them
    /// (before the socket closes).
    _map: Mapping,
    fd: OwnedFd,
    /// The last kick failed: frames marked to send may wait in the tx ring
    /// for the next ([`Port::kick`]).
    stranded: bool,
    /// The interface the socket is bound to (its index: it keeps it
    /// through a rename).
    ifindex: u32,
    /// Kicks so far: every [`MTU_EVERY`]th reads the interface's MTU again.
    kicks: u32,
}

/// Kicks between two readings of the interface's MTU (under a worker,
/// which kicks every 64 polls, a changed MTU is seen within about a
/// thousand polls).
const MTU_EVERY: u32 = 16;

// SAFETY: the rings' raw pointers point into `map`, which this port owns
// (unmapped only when it is dropped), and are only dereferenced through
// `&mut self` (rx_burst/tx_burst), so moving the port to the worker thread
// that uses it is sound. The socket may have another descriptor and
// mapping in another process (`handover`/`adopt`): the slots' status words
// are atomics shared with the kernel anyway, and the handover protocol
// lets one process poll a ring at a time (the first stops before it gives
// its positions, and polls no more once the second may start).
unsafe impl Send for AfPacketPort {}

impl std::fmt::Debug for AfPacketPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfPacketPort")
            .field("info", &self.info)
            .field("fd", &self.fd)
            .finish()
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// `setsockopt(fd, SOL_PACKET, opt, &value)`.
fn set_opt<T>(fd: libc::c_int, opt: libc::c_int, value: &T) -> std::io::Result<()> {
    super::set_sockopt(fd, libc::SOL_PACKET, opt, value)
}

impl AfPacketPort {
    /// Opens port `name` on kernel interface `iface` with the default ring
    /// sizes; received frames are copied into buffers of `pool`.
    pub fn open(name: &str, iface: &str, pool: Pool) -> Result<Self, PortError> {
        Self::open_with(name, iface, pool, RingSize::default())
    }

    /// One queue of a multi-queue port: the socket joins fanout group
    /// `group` of `iface` (hash mode), so the kernel spreads the interface's
    /// frames over the group's sockets by flow; open one per worker with the
    /// same group. Each socket has its own rings, so each worker transmits
    /// on its own.
    pub fn open_fanout(name: &str, iface: &str, pool: Pool, group: u16) -> Result<Self, PortError> {
        let port = Self::open_with(name, iface, pool, RingSize::default())?;
        let arg: libc::c_int =
            libc::c_int::from(group) | ((libc::PACKET_FANOUT_HASH as libc::c_int) << 16);
        set_opt(port.fd.as_raw_fd(), libc::PACKET_FANOUT, &arg).map_err(|e| {
            PortError::BadConfig {
                port: name.to_string(),
                reason: format!("fanout group {group} on {iface:?}: {e}"),
            }
        })?;
        Ok(port)
    }

    /// [`AfPacketPort::open`] with explicit ring sizes.
    pub fn open_with(
        name: &str,
        iface: &str,
        pool: Pool,
        size: RingSize,
    ) -> Result<Self, PortError> {
        let err = |reason: String| PortError::BadConfig {
            port: name.to_string(),
            reason,
        };
        size.check().map_err(err)?;
        let (ifindex, info) = super::kernel_interface(name, iface, "af_packet")?;
        let proto_be = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto_be)) };
        if raw < 0 {
            let e = last_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => err(format!(
                    "opening a packet socket on {iface:?} needs CAP_NET_RAW (run as root or grant the capability): {e}"
                )),
                _ => err(format!("cannot open a packet socket on {iface:?}: {e}")),
            });
        }
        // Closed on every error path from here (dropped).
        // SAFETY: `raw` is the socket just created above (checked >= 0),
        // owned by nothing else.
        let owned = unsafe { super::owned_fd(raw) };
        let fd = owned.as_raw_fd();
        let setup = |what: &str, r: std::io::Result<()>| {
            r.map_err(|e| err(format!("{what} on {iface:?}: {e}")))
        };
        let version = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        setup(
            "PACKET_VERSION",
            set_opt(fd, libc::PACKET_VERSION, &version),
        )?;
        let loss: libc::c_int = 1;
        // A frame the kernel refuses (longer than the interface's MTU
        // allows, should it be lowered under the port) is discarded and
        // the ring goes on: without this its slot is marked "wrong format"
        // and the kernel stops there until the port writes that slot
        // again, a whole ring later. (Before the rings: the kernel takes
        // it only then.)
        setup("PACKET_LOSS", set_opt(fd, libc::PACKET_LOSS, &loss))?;
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: (size.frames * size.frame_size / BLOCK_SIZE) as u32,
            tp_frame_size: size.frame_size as u32,
            tp_frame_nr: size.frames as u32,
        };
        setup("PACKET_RX_RING", set_opt(fd, libc::PACKET_RX_RING, &req))?;
        setup("PACKET_TX_RING", set_opt(fd, libc::PACKET_TX_RING, &req))?;
        let one: libc::c_int = 1;
        setup(
            "PACKET_QDISC_BYPASS",
            set_opt(fd, libc::PACKET_QDISC_BYPASS, &one),
        )?;
        setup(
            "PACKET_IGNORE_OUTGOING",
            set_opt(fd, libc::PACKET_IGNORE_OUTGOING, &one),
        )?;
        let ring_len = size.frames * size.frame_size;
        // The two rings the kernel just allocated for the socket (rx then
        // tx, as packet(7) specifies).
        let map = Mapping::new(
            2 * ring_len,
            libc::MAP_SHARED | libc::MAP_LOCKED,
            Some(owned.as_fd()),
            0,
        )
        .map_err(|e| err(format!("cannot map the packet rings of {iface:?}: {e}")))?;
        let base = map.as_ptr();
        let port = AfPacketPort {
            info,
            stats: Arc::default(),
            pool,
            _map: map,
            fd: owned,
            stranded: false,
            ifindex,
            kicks: 0,
            rx: Ring {
                base,
                frame_size: size.frame_size,
                frames: size.frames,
                next: 0,
            },
            tx: Ring {
                base: base.wrapping_add(ring_len),
                frame_size: size.frame_size,
                frames: size.frames,
                next: 0,
            },
        };
        // From here dropping `port` unmaps and closes.
        // SAFETY: an all-zero sockaddr_ll is a valid value to fill in.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto_be;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(err(format!("cannot bind to {iface:?}: {}", last_error())));
        }
        // SAFETY: an all-zero packet_mreq is a valid value to fill in.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        set_opt(fd, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .map_err(|e| err(format!("promiscuous mode on {iface:?}: {e}")))?;
        let mut port = port;
        port.read_mtu();
        Ok(port)
    }

    /// Goes on with the socket `fd` of a predecessor process's port on
    /// `iface` (its [`Port::handover`]): maps the same rings and reads and
    /// writes on from the slots it gave. Nothing the kernel queued for the
    /// socket is lost, and no frame is read twice. The socket must be a
    /// TPACKET_V2 packet socket with rings of `h`'s sizes.
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
        let (ifindex, info) = super::kernel_interface(name, iface, "af_packet")?;
        let fd = h.fd.as_raw_fd();
        // SAFETY: SO_DOMAIN and PACKET_VERSION read C ints.
        let domain =
            unsafe { super::get_sockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) };
        // SAFETY: as above.
        let version = unsafe {
            super::get_sockopt::<libc::c_int>(fd, libc::SOL_PACKET, libc::PACKET_VERSION)
        };
        if domain.ok() != Some(libc::AF_PACKET)
            || version.ok() != Some(libc::tpacket_versions::TPACKET_V2 as libc::c_int)
        {
            return Err(err(format!(
                "the socket handed over for {iface:?} is not a TPACKET_V2 packet socket"
            )));
        }
        let ring_len = RingSize {
            frame_size: h.frame_size,
            frames: h.frames,
        }
        .check()
        .map_err(err)?;
        if h.rx_next >= h.frames || h.tx_next >= h.frames {
            return Err(err(format!(
                "ring positions {}/{} of {} slots do not fit",
                h.rx_next, h.tx_next, h.frames
            )));
        }
        // SAFETY: an all-zero sockaddr_ll is a valid value to fill in.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is writable for `len` bytes, and `len` says so.
        let r =
            unsafe { libc::getsockname(fd, (&mut sll as *mut libc::sockaddr_ll).cast(), &mut len) };
        if r != 0 || sll.sll_ifindex != ifindex as i32 {
            return Err(err(format!(
                "the socket handed over is not bound to {iface:?}"
            )));
        }
        // The kernel maps a packet socket's rings only whole: a size that
        // is not theirs is refused here.
        let map = Mapping::new(
            2 * ring_len,
            libc::MAP_SHARED | libc::MAP_LOCKED,
            Some(h.fd.as_fd()),
            0,
        )
        .map_err(|e| {
            err(format!(
                "cannot map the handed-over rings of {iface:?}: {e}"
            ))
        })?;
        let base = map.as_ptr();
        let mut port = AfPacketPort {
            info,
            stats: Arc::default(),
            pool,
            _map: map,
            fd: h.fd,
            // Frames the predecessor marked and could not hand the kernel
            // go at the first kick.
            stranded: true,
            ifindex,
            kicks: 0,
            rx: Ring {
                base,
                frame_size: h.frame_size,
                frames: h.frames,
                next: h.rx_next,
            },
            tx: Ring {
                base: base.wrapping_add(ring_len),
                frame_size: h.frame_size,
                frames: h.frames,
                next: h.tx_next,
            },
        };
        port.read_mtu();
        Ok(port)
    }

    /// Reads (and so resets) the kernel's count of frames dropped because
    /// the rx ring was full, and adds it to `rx_ring_overflow`.
    fn collect_kernel_drops(&self) {
        // SAFETY: tpacket_stats is a C struct of u32 counters.
        let st = unsafe {
            super::get_sockopt::<libc::tpacket_stats>(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
            )
        };
        if let Some(st) = st.ok().filter(|s| s.tp_drops > 0) {
            self.stats
                .drops
                .add(DropReason::RxRingOverflow, u64::from(st.tp_drops));
        }
    }

    /// The frame in rx slot `i`: (status, data offset, captured length,
    /// original length).
    #[inline]
    fn rx_header(&self, i: usize) -> (usize, usize, usize) {
        let hdr = self.rx.slot(i).cast::<libc::tpacket2_hdr>();
        // SAFETY: the caller saw TP_STATUS_USER on this slot (with acquire
        // ordering), so the kernel wrote its header and no longer touches it
        // until we hand it back; the slot is inside the mapping.
        let h = unsafe { hdr.read() };
        (
            usize::from(h.tp_mac),
            h.tp_snaplen as usize,
            h.tp_len as usize,
        )
    }
}

impl AfPacketPort {
    /// Reads the interface's MTU into `info` (kept as it was if the kernel
    /// does not answer): its current name from its index (`SIOCGIFNAME`,
    /// which looks nothing up by name: asked by a name no interface has,
    /// the kernel would try to load a module of that name), then
    /// `SIOCGIFMTU`, both on the port's own socket, so in its network
    /// namespace (sysfs may show another's).
    fn read_mtu(&mut self) {
        // SAFETY: an all-zero ifreq is a valid value to fill in.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_ifru.ifru_ifindex = self.ifindex as libc::c_int;
        // SAFETY: `ifr` is a live, writable ifreq, which the kernel copies
        // in and out whole.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SIOCGIFNAME, &mut ifr) };
        if r != 0 {
            return;
        }
        // SAFETY: as above; `ifr_name` now holds the interface's
        // NUL-terminated name.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) };
        if r == 0 {
            // SAFETY: the kernel filled `ifru_mtu` (an int) on success.
            let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
            self.info.mtu = u16::try_from(mtu.max(0)).unwrap_or(u16::MAX);
        }
    }

    /// Has the kernel transmit the tx slots marked SEND_REQUEST, noting
    /// whether it left any.
    fn send_marked(&mut self) {
        // The kernel keeps the error of a link that went down pending on the
        // socket, and the next call reports it (sending nothing) whatever
        // the link is now: once more, for any error but a full send buffer.
        let fd = self.fd.as_raw_fd();
        if let Some(e) = super::kick_socket(fd)
            && !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS))
        {
            let _ = super::kick_socket(fd);
        }
        // The kernel takes the marked slots in ring order and stops at the
        // first it cannot (its send buffer full: EAGAIN, or the whole
        // call refused: ENETDOWN), so some are left exactly when the last
        // one marked is.
        let last = (self.tx.next + self.tx.frames - 1) % self.tx.frames;
        self.stranded =
            self.tx.status(last).load(Ordering::Acquire) & libc::TP_STATUS_SEND_REQUEST != 0;
    }
}

impl Port for AfPacketPort {
    type Buf = PoolBuf;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn handover(&self) -> Option<std::io::Result<super::Handover>> {
        Some(self.fd.try_clone().map(|fd| super::Handover {
            fd,
            rx_next: self.rx.next % self.rx.frames,
            tx_next: self.tx.next % self.tx.frames,
            frame_size: self.rx.frame_size,
            frames: self.rx.frames,
            extra: Vec::new(),
            free: Vec::new(),
        }))
    }

    fn rx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        let (mut n, mut bytes) = (0usize, 0u64);
        let mut lost = false;
        while batch.free_space() > 0 {
            let i = self.rx.next;
            let status = self.rx.status(i).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 {
                break;
            }
            lost |= status & libc::TP_STATUS_LOSING != 0;
            let (off, snap, len) = self.rx_header(i);
            let slot_end = self.rx.frame_size;
            if len > snap || off + snap > slot_end {
                self.stats.drops.add(DropReason::RxOversize, 1);
            } else if let Some(mut buf) = self.pool.alloc() {
                let copied = match buf.append(snap) {
                    Ok(dst) => {
                        // SAFETY: `off + snap` lies inside this slot (checked
                        // above), which the kernel handed to us (status USER).
                        let src =
                            unsafe { std::slice::from_raw_parts(self.rx.slot(i).add(off), snap) };
                        dst.copy_from_slice(src);
                        true
                    }
                    Err(_) => false,
                };
                if !copied {
                    self.stats.drops.add(DropReason::RxOversize, 1);
                } else {
                    if status & libc::TP_STATUS_CSUMNOTREADY != 0 {
                        // Frames that do not parse are left for the
                        // pipeline to count as malformed.
                        if let Ok(p) = crate::parse::parse(buf.data(), 0) {
                            let _ = crate::rewrite::complete_partial_checksum(buf.data_mut(), &p);
                        }
                    }
                    bytes += snap as u64;
                    n += 1;
                    // Never fails: free space was checked.
                    let _ = batch.push(buf);
                }
            } else {
                self.stats.drops.add(DropReason::RxNoBuffer, 1);
            }
            self.rx
                .status(i)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
            self.rx.next = (i + 1) % self.rx.frames;
        }
        if lost {
            self.collect_kernel_drops();
        }
        self.stats.count_rx(n as u64, bytes);
        n
    }

    fn tx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        let (mut n, mut bytes, mut full) = (0usize, 0u64, false);
        // The kernel refuses a frame longer than its interface's MTU plus
        // the Ethernet header (plus a VLAN tag, if tagged): counted here,
        // as one larger than a slot is (the MTU as last read: at open, then
        // every few kicks).
        let room = self.tx.frame_size - TX_DATA_OFF;
        let untagged = room.min(usize::from(self.info.mtu) + ETH_HEADER);
        let tagged = room.min(untagged + VLAN_TAG);
        // By reference (the frames are copied), the buffers all freed
        // after: moving each out of the batch costs a store-forwarding
        // stall per packet (see `platform::drain_each`).
        for pkt in batch.iter() {
            let i = self.tx.next;
            let status = self.tx.status(i).load(Ordering::Acquire);
            if status & (libc::TP_STATUS_SEND_REQUEST | libc::TP_STATUS_SENDING) != 0 {
                self.stats.drops.add(DropReason::TxQueueFull, 1);
                full = true;
                continue;
            }
            let data = pkt.data();
            let most = match data.get(12..14) {
                Some([0x81, 0x00]) => tagged,
                _ => untagged,
            };
            if data.len() > most {
                self.stats.drops.add(DropReason::TxOversize, 1);
                continue;
            }
            if data.len() < ETH_HEADER {
                // (The kernel refuses it too.)
                self.stats.drops.add(
                    DropReason::Malformed(crate::ParseError::EthernetTruncated),
                    1,
                );
                continue;
            }
            let slot = self.tx.slot(i);
            // SAFETY: the slot is free (status AVAILABLE or WRONG_FORMAT, seen
            // with acquire ordering), so the kernel does not read it until we
            // set SEND_REQUEST; header and `TX_DATA_OFF + len <= frame_size`
            // bytes are inside the slot.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), slot.add(TX_DATA_OFF), data.len());
                let hdr = slot.cast::<libc::tpacket2_hdr>();
                (*hdr).tp_len = data.len() as u32;
                (*hdr).tp_snaplen = data.len() as u32;
            }
            self.tx
                .status(i)
                .store(libc::TP_STATUS_SEND_REQUEST, Ordering::Release);
            self.tx.next = (i + 1) % self.tx.frames;
            bytes += data.len() as u64;
            n += 1;
        }
        batch.clear();
        // A kick that fails (EAGAIN or ENOBUFS while the kernel still holds
        // earlier frames, ENETDOWN while the link is down) leaves its slots
        // marked, for the next kick to send. A ring full of them has no
        // room for a new frame to kick for: kick then too, or the port
        // would never send again once the kernel could take them.
        // While the kernel cannot take them the ring fills and new frames
        // count as `tx_queue_full`: nothing is lost uncounted. What a failed
        // kick left goes at the next one, or at the worker's `kick` if no
        // new frame comes.
        if n > 0 || full {
            self.send_marked();
        }
        self.stats.count_tx(n as u64, bytes);
        n
    }

    fn kick(&mut self) {
        if self.stranded {
            self.send_marked();
        }
        self.kicks = self.kicks.wrapping_add(1);
        if self.kicks.is_multiple_of(MTU_EVERY) {
            self.read_mtu();
        }
    }
}
