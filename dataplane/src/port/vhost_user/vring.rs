//! A guest's memory as the front end shares it (one mapping per region),
//! and a split virtqueue laid in it (virtio 1.1, 2.6): the descriptor
//! table, the available ring the driver fills and the used ring the
//! device returns buffers on.
//!
//! Every address the guest gives is checked against the regions before it
//! is used; the rings' indexes are read and written atomically (the other
//! side is another process, on another core), everything else the
//! protocol hands to the device at that moment (a descriptor, a buffer)
//! with plain volatile reads or copies.

use super::proto::{Region, VringAddr};
use crate::port::Mapping;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};

/// A descriptor continues in `next`.
pub const DESC_NEXT: u16 = 1;
/// A descriptor the device writes (else reads).
pub const DESC_WRITE: u16 = 2;
/// A descriptor of an indirect table (not offered).
pub const DESC_INDIRECT: u16 = 4;
/// The used ring's flag asking the driver not to kick (pollux polls).
const USED_NO_NOTIFY: u16 = 1;
/// The available ring's flag asking the device not to interrupt.
const AVAIL_NO_INTERRUPT: u16 = 1;
/// The largest split ring (virtio 1.1, 2.6).
pub const MAX_RING: u32 = 32768;

/// One mapped region.
struct Mapped {
    gpa: u64,
    uaddr: u64,
    size: u64,
    /// The host address of the region's first byte.
    host: *mut u8,
    _map: Mapping,
}

/// The guest's memory, mapped. Its addresses stay valid while it lives:
/// the data path holds it (through an `Arc`) while it uses a ring in it.
pub struct Memory {
    regions: Vec<Mapped>,
}

// SAFETY: the raw pointers point into the mappings this value owns; the
// memory is shared with the guest by design and is only reached through
// the accessors below (atomic indexes, volatile reads and copies of what
// the protocol hands to the device), from whichever thread holds it.
unsafe impl Send for Memory {}
// SAFETY: as for Send: no accessor takes `&mut self`; concurrent readers
// on two threads touch the memory only as the guest itself may.
unsafe impl Sync for Memory {}

impl Memory {
    /// Maps `regions`, each from the descriptor in `fds` at its place.
    pub fn map(regions: &[Region], fds: &[OwnedFd]) -> Result<Memory, String> {
        let mut out = Vec::with_capacity(regions.len());
        for (k, (r, fd)) in regions.iter().zip(fds).enumerate() {
            if r.size == 0 {
                return Err(format!("memory region {k} is empty"));
            }
            if r.gpa.checked_add(r.size).is_none() || r.uaddr.checked_add(r.size).is_none() {
                return Err(format!("memory region {k} wraps the address space"));
            }
            // The file's block size: a hugetlbfs file maps in whole huge
            // pages.
            // SAFETY: an all-zero `stat` is a valid value to fill in.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `fd` is a live descriptor borrowed for the call;
            // `st` is valid for writes.
            if unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(fd), &mut st) } != 0 {
                return Err(format!(
                    "memory region {k}: fstat: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // A region past the file's end would fault (SIGBUS) when
            // touched. (The front end must not shrink the file later:
            // QEMU's memory backends never do.)
            let end = r
                .size
                .checked_add(r.mmap_offset)
                .ok_or_else(|| format!("memory region {k}: offset and size overflow"))?;
            if u64::try_from(st.st_size).unwrap_or(0) < end {
                return Err(format!(
                    "memory region {k}: {} bytes at offset {} are past the end of its file ({} bytes)",
                    r.size, r.mmap_offset, st.st_size
                ));
            }
            let block = u64::try_from(st.st_blksize).unwrap_or(4096).max(4096);
            let len = r
                .size
                .checked_add(r.mmap_offset)
                .and_then(|l| l.checked_next_multiple_of(block))
                .and_then(|l| usize::try_from(l).ok())
                .ok_or_else(|| format!("memory region {k}: offset and size overflow"))?;
            // (Not populated: the guest's memory may be backed lazily,
            // and touching all of it would allocate all of it.)
            let map = Mapping::new(len, libc::MAP_SHARED, Some(fd.as_fd()), 0)
                .map_err(|e| format!("memory region {k} ({} bytes): mmap: {e}", r.size))?;
            let host = map.as_ptr().wrapping_add(r.mmap_offset as usize);
            out.push(Mapped {
                gpa: r.gpa,
                uaddr: r.uaddr,
                size: r.size,
                host,
                _map: map,
            });
        }
        Ok(Memory { regions: out })
    }

    /// The host address of `len` bytes at guest physical address `addr`,
    /// if they lie in one region.
    #[inline]
    pub fn gpa(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let len = len as u64;
        self.regions.iter().find_map(|r| {
            let off = addr.wrapping_sub(r.gpa);
            (off < r.size && len <= r.size - off).then(|| r.host.wrapping_add(off as usize))
        })
    }

    /// Starts loading the first two cache lines of the buffer at guest
    /// physical address `addr` (nothing if it is not in guest memory).
    #[inline]
    pub fn prefetch(&self, addr: u64) {
        if let Some(p) = self.gpa(addr, 1) {
            platform::prefetch_place(p.cast_const().cast::<[u8; 128]>());
        }
    }

    /// The host address of `len` bytes at address `addr` of the front
    /// end's address space, if they lie in one region.
    fn uaddr(&self, addr: u64, len: u64) -> Option<*mut u8> {
        self.regions.iter().find_map(|r| {
            let off = addr.wrapping_sub(r.uaddr);
            (off < r.size && len <= r.size - off).then(|| r.host.wrapping_add(off as usize))
        })
    }
}

/// A descriptor as the table holds it (little-endian).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// `DESC_*` flags.
    pub flags: u16,
    /// The next descriptor of the chain.
    pub next: u16,
}

/// A split virtqueue in a guest's memory, which it keeps mapped: its
/// pointers are valid while it lives.
pub struct Split {
    mem: std::sync::Arc<Memory>,
    desc: *const Desc,
    avail: *const u8,
    used: *mut u8,
    /// Entries (a power of two).
    pub size: u16,
}

impl std::fmt::Debug for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Split")
            .field("desc", &self.desc)
            .field("size", &self.size)
            .finish()
    }
}

// SAFETY: as for `Memory`, whose mapping the pointers lie in.
unsafe impl Send for Split {}
// SAFETY: as for `Memory`.
unsafe impl Sync for Split {}

impl Split {
    /// The ring of `num` entries at `addr` in `mem`: every part inside one
    /// region and aligned as the specification requires.
    pub fn new(mem: &std::sync::Arc<Memory>, addr: &VringAddr, num: u32) -> Result<Split, String> {
        let i = addr.index;
        if !num.is_power_of_two() || num > MAX_RING {
            return Err(format!(
                "ring {i}: size {num} is not a power of two up to {MAX_RING}"
            ));
        }
        let n = u64::from(num);
        let part = |what: &str, at: u64, len: u64, align: usize| {
            let p = mem.uaddr(at, len).ok_or_else(|| {
                format!("ring {i}: the {what} at {at:#x} is outside guest memory")
            })?;
            if !(p as usize).is_multiple_of(align) {
                return Err(format!(
                    "ring {i}: the {what} at {at:#x} is not {align}-byte aligned"
                ));
            }
            Ok(p)
        };
        let desc = part("descriptor table", addr.desc, 16 * n, 16)?;
        let avail = part("available ring", addr.avail, 6 + 2 * n, 2)?;
        let used = part("used ring", addr.used, 6 + 8 * n, 4)?;
        Ok(Split {
            mem: mem.clone(),
            desc: desc.cast_const().cast(),
            avail: avail.cast_const(),
            used,
            size: num as u16,
        })
    }

    #[inline]
    fn idx16(&self, p: *const u8) -> &AtomicU16 {
        // SAFETY: `p` is one of the rings' u16 fields: inside the mapping
        // (checked in `new`), 2-byte aligned, alive as long as `self`'s
        // memory; the guest reaches it atomically too.
        unsafe { AtomicU16::from_ptr(p.cast_mut().cast()) }
    }

    /// The driver's available index.
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(
            self.idx16(self.avail.wrapping_add(2))
                .load(Ordering::Acquire),
        )
    }

    /// The available ring's entry `i` (taken modulo the size).
    #[inline]
    pub fn avail_entry(&self, i: u16) -> u16 {
        let at = 4 + 2 * usize::from(i & (self.size - 1));
        // SAFETY: inside the available ring (checked in `new`), aligned;
        // the driver published it before the index read with Acquire.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.add(at).cast::<u16>()) })
    }

    /// The memory the ring and its buffers lie in.
    #[inline]
    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    /// Starts loading descriptor `i` (modulo the size).
    #[inline]
    pub fn prefetch_desc(&self, i: u16) {
        platform::prefetch_place(self.desc.wrapping_add(usize::from(i & (self.size - 1))));
    }

    /// Descriptor `i`, which the caller has checked is below the size.
    #[inline]
    pub fn desc(&self, i: u16) -> Desc {
        debug_assert!(i < self.size);
        let i = usize::from(i & (self.size - 1));
        // SAFETY: inside the table (checked in `new`, `i` below its size),
        // 16-byte aligned; the driver handed the chain to the device.
        let d = unsafe { std::ptr::read_volatile(self.desc.add(i)) };
        Desc {
            addr: u64::from_le(d.addr),
            len: u32::from_le(d.len),
            flags: u16::from_le(d.flags),
            next: u16::from_le(d.next),
        }
    }

    /// Writes used entry `slot` (modulo the size): chain `id`, `len` bytes
    /// written.
    #[inline]
    pub fn put_used(&self, slot: u16, id: u16, len: u32) {
        let at = 4 + 8 * usize::from(slot & (self.size - 1));
        // SAFETY: inside the used ring (checked in `new`), 4-byte aligned;
        // the driver reads the entry only after the used index that the
        // device stores later, with Release.
        unsafe {
            let p = self.used.add(at).cast::<u32>();
            std::ptr::write_volatile(p, u32::from(id).to_le());
            std::ptr::write_volatile(p.add(1), len.to_le());
        }
    }

    /// The used index, as this device last stored it.
    #[inline]
    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.idx16(self.used.wrapping_add(2))
                .load(Ordering::Acquire),
        )
    }

    /// Publishes the used entries up to `v`.
    #[inline]
    pub fn set_used_idx(&self, v: u16) {
        self.idx16(self.used.wrapping_add(2))
            .store(v.to_le(), Ordering::Release);
    }

    /// Asks the driver not to kick: the ring is polled.
    pub fn no_kicks(&self) {
        self.idx16(self.used)
            .store(USED_NO_NOTIFY.to_le(), Ordering::Release);
    }

    /// Whether the driver wants an interrupt for what was just used. The
    /// full fence orders the used index stored before it against the
    /// flags read after it: without it the driver could turn interrupts
    /// on, see no new entry, and sleep while this device reads the old
    /// flags and stays silent.
    #[inline]
    pub fn wants_interrupt(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        u16::from_le(self.idx16(self.avail).load(Ordering::Relaxed)) & AVAIL_NO_INTERRUPT == 0
    }
}

/// Why a descriptor chain could not be used (counted as the port's drop
/// reason `bad_descriptor` or an oversize).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor out of the table, of the wrong direction, indirect,
    /// outside guest memory; a chain longer than the table or than
    /// [`MAX_CHAIN`], or shorter than the virtio-net header.
    Bad,
    /// The packet is longer than the room it goes to.
    TooLong,
}

/// The most descriptors a chain may have: a frame without indirect
/// descriptors needs a few (Linux sends at most 19), and a guest's chain
/// of thousands would cost the one worker that serves every VM that many
/// reads.
pub const MAX_CHAIN: u16 = 64;

/// Copies the frame of the device-readable chain at `head` (after `hdr`
/// bytes of virtio-net header) to the start of `dst`. Returns the frame's
/// length.
#[inline]
pub fn read_chain(
    ring: &Split,
    head: u16,
    hdr: usize,
    dst: &mut [u8],
) -> Result<usize, ChainError> {
    let mem = ring.memory();
    let (mut i, mut skip, mut total) = (head, hdr, 0usize);
    for _ in 0..ring.size.min(MAX_CHAIN) {
        if i >= ring.size {
            return Err(ChainError::Bad);
        }
        let d = ring.desc(i);
        if d.flags & (DESC_WRITE | DESC_INDIRECT) != 0 {
            return Err(ChainError::Bad);
        }
        let len = d.len as usize;
        let cut = skip.min(len);
        skip -= cut;
        let n = len - cut;
        if n > 0 {
            let src = mem
                .gpa(d.addr.wrapping_add(cut as u64), n)
                .ok_or(ChainError::Bad)?;
            let to = dst.get_mut(total..total + n).ok_or(ChainError::TooLong)?;
            // SAFETY: `src` is `n` bytes inside the guest's mapped memory
            // (checked by `gpa`), which the driver handed to the device
            // with this chain; `to` is `n` bytes of the caller's buffer.
            unsafe { std::ptr::copy_nonoverlapping(src, to.as_mut_ptr(), n) };
            total += n;
        }
        if d.flags & DESC_NEXT == 0 {
            // (A chain shorter than its header carries no frame.)
            return if skip > 0 {
                Err(ChainError::Bad)
            } else {
                Ok(total)
            };
        }
        i = d.next;
    }
    Err(ChainError::Bad)
}

/// Writes `hdr` then `frame` into the device-writable chain at `head`.
/// Returns the bytes written.
#[inline]
pub fn write_chain(ring: &Split, head: u16, hdr: &[u8], frame: &[u8]) -> Result<u32, ChainError> {
    let mem = ring.memory();
    let (mut i, mut h, mut f) = (head, hdr, frame);
    let mut written = 0u32;
    for _ in 0..ring.size.min(MAX_CHAIN) {
        if i >= ring.size {
            return Err(ChainError::Bad);
        }
        let d = ring.desc(i);
        if d.flags & (DESC_WRITE | DESC_INDIRECT) != DESC_WRITE {
            return Err(ChainError::Bad);
        }
        let len = d.len as usize;
        let dst = mem.gpa(d.addr, len).ok_or(ChainError::Bad)?;
        let a = h.len().min(len);
        let b = f.len().min(len - a);
        // SAFETY: `dst` is `len` >= a + b bytes inside the guest's mapped
        // memory (checked by `gpa`), handed to the device to write with
        // this chain; the sources are the caller's slices.
        unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), dst, a);
            std::ptr::copy_nonoverlapping(f.as_ptr(), dst.add(a), b);
        }
        h = &h[a..];
        f = &f[b..];
        written += (a + b) as u32;
        if h.is_empty() && f.is_empty() {
            return Ok(written);
        }
        if d.flags & DESC_NEXT == 0 {
            // (A chain shorter than the header is as bad as a read one.)
            return Err(if h.is_empty() {
                ChainError::TooLong
            } else {
                ChainError::Bad
            });
        }
        i = d.next;
    }
    Err(ChainError::Bad)
}

#[cfg(test)]
pub(crate) mod tests {
    //! A driver's side of a ring, in a memfd that the device maps as a
    //! front end's region: for the unit tests of the ring and the port.
    use super::*;

    /// Guest memory of one region at guest physical address `GPA`, whose
    /// front-end address is `UADDR`; the driver's view is a plain mapping.
    pub struct Guest {
        pub fd: OwnedFd,
        pub map: Mapping,
        pub region: Region,
    }

    pub const GPA: u64 = 0x4000_0000;
    pub const UADDR: u64 = 0x7f00_0000_0000;

    impl Guest {
        pub fn new(size: usize) -> Guest {
            // SAFETY: a plain call with a NUL-terminated name.
            let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(raw >= 0);
            // SAFETY: just created, owned by nothing else.
            let fd = unsafe { crate::port::owned_fd(raw) };
            // SAFETY: a live descriptor.
            assert_eq!(unsafe { libc::ftruncate(raw, size as i64) }, 0);
            let map = Mapping::new(size, libc::MAP_SHARED, Some(fd.as_fd()), 0).unwrap();
            Guest {
                fd,
                map,
                region: Region {
                    gpa: GPA,
                    size: size as u64,
                    uaddr: UADDR,
                    mmap_offset: 0,
                },
            }
        }

        /// `bytes` at offset `off` of the region.
        pub fn write(&self, off: usize, bytes: &[u8]) {
            assert!(off + bytes.len() <= self.map.len());
            // SAFETY: inside the test's own mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.map.as_ptr().add(off),
                    bytes.len(),
                )
            };
        }

        pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
            assert!(off + len <= self.map.len());
            let mut v = vec![0; len];
            // SAFETY: inside the test's own mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), v.as_mut_ptr(), len)
            };
            v
        }

        pub fn u16_at(&self, off: usize) -> u16 {
            u16::from_le_bytes(self.read(off, 2).try_into().unwrap())
        }
    }

    /// A driver's ring of `size` entries laid at `base` in the region:
    /// descriptors, then the available ring, then (4-aligned) the used
    /// ring; buffers of 2 KiB from `bufs` on.
    pub struct Driver {
        pub base: usize,
        pub size: u16,
        pub index: u32,
        pub next_avail: u16,
        pub last_used: u16,
    }

    impl Driver {
        pub fn new(index: u32, base: usize, size: u16) -> Driver {
            Driver {
                base,
                size,
                index,
                next_avail: 0,
                last_used: 0,
            }
        }
        pub fn desc_off(&self) -> usize {
            self.base
        }
        pub fn avail_off(&self) -> usize {
            self.base + 16 * usize::from(self.size)
        }
        pub fn used_off(&self) -> usize {
            (self.avail_off() + 6 + 2 * usize::from(self.size)).next_multiple_of(4)
        }
        pub fn addr(&self) -> VringAddr {
            VringAddr {
                index: self.index,
                desc: UADDR + self.desc_off() as u64,
                used: UADDR + self.used_off() as u64,
                avail: UADDR + self.avail_off() as u64,
            }
        }
        /// Writes descriptor `i`.
        pub fn set_desc(&self, g: &Guest, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            g.write(self.desc_off() + 16 * usize::from(i), &d);
        }
        /// Offers chain `head` and publishes the available index.
        pub fn offer(&mut self, g: &Guest, head: u16) {
            let slot = usize::from(self.next_avail & (self.size - 1));
            g.write(self.avail_off() + 4 + 2 * slot, &head.to_le_bytes());
            self.next_avail = self.next_avail.wrapping_add(1);
            std::sync::atomic::fence(Ordering::SeqCst);
            g.write(self.avail_off() + 2, &self.next_avail.to_le_bytes());
        }
        /// Sets the available ring's flags.
        pub fn set_avail_flags(&self, g: &Guest, f: u16) {
            g.write(self.avail_off(), &f.to_le_bytes());
        }
        /// The used entries not yet seen: (id, len).
        pub fn take_used(&mut self, g: &Guest) -> Vec<(u32, u32)> {
            let idx = g.u16_at(self.used_off() + 2);
            let mut out = vec![];
            while self.last_used != idx {
                let slot = usize::from(self.last_used & (self.size - 1));
                let e = g.read(self.used_off() + 4 + 8 * slot, 8);
                out.push((
                    u32::from_le_bytes(e[..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..].try_into().unwrap()),
                ));
                self.last_used = self.last_used.wrapping_add(1);
            }
            out
        }
    }

    fn setup() -> (Guest, std::sync::Arc<Memory>, Driver, Split) {
        let g = Guest::new(1 << 20);
        let mem =
            std::sync::Arc::new(Memory::map(&[g.region], std::slice::from_ref(&g.fd)).unwrap());
        let d = Driver::new(1, 0, 8);
        let ring = Split::new(&mem, &d.addr(), 8).unwrap();
        (g, mem, d, ring)
    }

    #[test]
    fn a_chain_is_read_past_its_header_and_returned_on_the_used_ring() {
        let (g, _mem, mut d, ring) = setup();
        // The header in its own descriptor, the frame split over two.
        let frame: Vec<u8> = (0..100u8).collect();
        g.write(0x1000, &[0xee; 12]);
        g.write(0x2000, &frame[..40]);
        g.write(0x3000, &frame[40..]);
        d.set_desc(&g, 3, GPA + 0x1000, 12, DESC_NEXT, 5);
        d.set_desc(&g, 5, GPA + 0x2000, 40, DESC_NEXT, 6);
        d.set_desc(&g, 6, GPA + 0x3000, 60, 0, 0);
        d.offer(&g, 3);
        assert_eq!(ring.avail_idx(), 1);
        let head = ring.avail_entry(0);
        assert_eq!(head, 3);
        let mut out = vec![0u8; 2048];
        let n = read_chain(&ring, head, 12, &mut out).unwrap();
        assert_eq!(n, 100);
        assert_eq!(&out[..100], &frame[..]);
        assert_eq!(
            read_chain(&ring, head, 12, &mut out[..99]),
            Err(ChainError::TooLong)
        );
        ring.put_used(0, head, 0);
        ring.set_used_idx(1);
        assert_eq!(d.take_used(&g), vec![(3, 0)]);
        assert_eq!(ring.used_idx(), 1);
    }

    #[test]
    fn a_guest_cannot_point_the_device_outside_its_memory() {
        let (g, mem, _d, ring) = setup();
        let take = &mut [0u8; 4096][..];
        let d = Driver::new(1, 0, 8);
        // Outside guest memory.
        d.set_desc(&g, 0, GPA + (1 << 20) - 4, 100, 0, 0);
        assert_eq!(read_chain(&ring, 0, 0, take), Err(ChainError::Bad));
        // A loop of descriptors.
        d.set_desc(&g, 1, GPA, 10, DESC_NEXT, 2);
        d.set_desc(&g, 2, GPA, 10, DESC_NEXT, 1);
        assert_eq!(read_chain(&ring, 1, 0, take), Err(ChainError::Bad));
        // A next beyond the table, a head beyond the table.
        d.set_desc(&g, 3, GPA, 10, DESC_NEXT, 9);
        assert_eq!(read_chain(&ring, 3, 0, take), Err(ChainError::Bad));
        assert_eq!(read_chain(&ring, 8, 0, take), Err(ChainError::Bad));
        // Writable where a readable one is due, and the reverse.
        d.set_desc(&g, 4, GPA, 10, DESC_WRITE, 0);
        assert_eq!(read_chain(&ring, 4, 0, take), Err(ChainError::Bad));
        d.set_desc(&g, 5, GPA, 10, 0, 0);
        assert_eq!(
            write_chain(&ring, 5, &[0; 12], &[1; 10]),
            Err(ChainError::Bad)
        );
        // Shorter than its header; longer than a chain may be.
        d.set_desc(&g, 7, GPA, 8, 0, 0);
        assert_eq!(read_chain(&ring, 7, 12, take), Err(ChainError::Bad));
        let long = Driver::new(1, 0, 128);
        let g2 = Guest::new(1 << 20);
        let mem2 =
            std::sync::Arc::new(Memory::map(&[g2.region], std::slice::from_ref(&g2.fd)).unwrap());
        let ring2 = Split::new(&mem2, &long.addr(), 128).unwrap();
        for i in 0..MAX_CHAIN + 1 {
            long.set_desc(&g2, i, GPA, 1, DESC_NEXT, i + 1);
        }
        long.set_desc(&g2, MAX_CHAIN, GPA, 1, 0, 0);
        assert_eq!(read_chain(&ring2, 1, 0, take), Ok(usize::from(MAX_CHAIN)));
        assert_eq!(read_chain(&ring2, 0, 0, take), Err(ChainError::Bad));
        // Too small for the frame.
        d.set_desc(&g, 6, GPA, 16, DESC_WRITE, 0);
        assert_eq!(
            write_chain(&ring, 6, &[0; 12], &[1; 10]),
            Err(ChainError::TooLong)
        );
        // A ring outside memory or of a bad size.
        let mut a = d.addr();
        assert!(
            Split::new(&mem, &a, 6)
                .unwrap_err()
                .contains("power of two")
        );
        a.used = UADDR + (1 << 20);
        assert!(Split::new(&mem, &a, 8).unwrap_err().contains("used ring"));
        a = d.addr();
        a.desc += 8;
        assert!(Split::new(&mem, &a, 8).unwrap_err().contains("aligned"));
        // A region past its file's end.
        let mut r = g.region;
        r.mmap_offset = 4096;
        let e = Memory::map(&[r], std::slice::from_ref(&g.fd))
            .err()
            .unwrap();
        assert!(e.contains("past the end of its file"), "{e}");
    }

    #[test]
    fn a_frame_is_written_after_its_header_across_the_chain() {
        let (g, _mem, _d, ring) = setup();
        let d = Driver::new(1, 0, 8);
        d.set_desc(&g, 0, GPA + 0x1000, 20, DESC_WRITE | DESC_NEXT, 1);
        d.set_desc(&g, 1, GPA + 0x2000, 2048, DESC_WRITE, 0);
        let frame: Vec<u8> = (0..64u8).collect();
        let hdr = [7u8; 12];
        assert_eq!(write_chain(&ring, 0, &hdr, &frame), Ok(76));
        assert_eq!(g.read(0x1000, 12), hdr);
        assert_eq!(g.read(0x1000 + 12, 8), frame[..8]);
        assert_eq!(g.read(0x2000, 56), frame[8..]);
    }
}
