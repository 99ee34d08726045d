//! # platform — prefetch, huge-page-backed arrays, a vector compare
//!
//! Owns: the `unsafe` that the switch's large tables need from the CPU and
//! the kernel, behind safe interfaces:
//! [`prefetch`] (a cache-line prefetch hint for a reference; with
//! [`prefetch_place`], for a place a value is about to be written to),
//! [`HugeVec`] (a growable array of `Copy` values in an anonymous mapping
//! that the kernel is asked to back with 2 MiB transparent huge pages) and
//! [`drain_each`] (a burst's values moved out whole, not one `Option` at a
//! time), [`advise_huge`] (huge-page advice for a large array that
//! lives elsewhere, such as a `Vec`'s reserved capacity), and
//! [`lanes_equal`] (which 16-bit lanes of a 128-bit word hold a value: one
//! SSE2 compare, for the hash index's bucket signatures).
//!
//! Must not touch: DPDK (that is `dpdk-sys`), packets, policy. Nothing here
//! allocates on its own after construction except [`HugeVec::push`] past
//! the capacity (which remaps, as a `Vec` reallocates).
//!
//! Zero-filled arrays ([`HugeVec::zeroed`]) take `bytemuck::Zeroable`
//! for the proof that zero bytes are a valid element.
//!
//! Why not a crate: `memmap2` maps and advises anonymous memory safely but
//! gives bytes, not a typed array of non-`Pod` values (the flow table's
//! slots hold `Option`s); `core::arch`'s prefetch needs `unsafe` at every
//! call site.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Waits until every earlier load and store has completed and every earlier
/// instruction has executed before the next one starts: a time-stamp counter
/// read right after it counts nothing that came before (`MFENCE` then
/// `LFENCE`, as Intel's manual asks before `RDTSC`; on AMD `MFENCE` alone
/// orders it). Elsewhere a sequentially consistent fence. For benchmarks
/// that time a piece of work between two counter reads.
#[inline(always)]
pub fn timing_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: MFENCE and LFENCE are SSE2 instructions, which every x86_64
    // CPU has; they access no memory and change only the order in which
    // instructions complete.
    unsafe {
        core::arch::x86_64::_mm_mfence();
        core::arch::x86_64::_mm_lfence();
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Asks the CPU to bring the cache line holding `r` into all cache levels
/// without waiting for it: a hint, which never faults and changes nothing
/// but timing. Does nothing on CPUs without a prefetch instruction here.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    prefetch_line((r as *const T).cast::<u8>());
}

/// [`prefetch`] for every cache line `r` spans: for a value larger than a
/// line whose fields are about to be read, where reading any of them to
/// find the others would wait for memory first.
#[inline(always)]
pub fn prefetch_all<T>(r: &T) {
    prefetch_first(r, std::mem::size_of::<T>());
}

/// [`prefetch`] for every cache line that the first `bytes` bytes of `r`
/// span (at least its first; at most all of it): for a large value of which
/// only a leading part is about to be read.
#[inline(always)]
pub fn prefetch_first<T>(r: &T, bytes: usize) {
    prefetch_lines(
        (r as *const T).cast::<u8>(),
        bytes.min(std::mem::size_of::<T>()),
        starts_on_line::<T>(),
    );
}

/// Whether every `T` in memory starts on a cache line (its alignment is a
/// multiple of one), known when compiling.
#[inline(always)]
const fn starts_on_line<T>() -> bool {
    std::mem::align_of::<T>().is_multiple_of(64)
}

/// [`prefetch_all`] for the place of a `T` at `p`, which need not hold one
/// yet (a prefetch reads nothing architecturally and never faults, whatever
/// the address): for the slot a growing array's next push writes, so that
/// the write does not wait for its lines to be read first. `p` is aligned
/// for `T` (for a type aligned to a cache line, only the lines from `p`'s
/// on as many as `T` spans are loaded).
#[inline(always)]
pub fn prefetch_place<T>(p: *const T) {
    prefetch_lines(
        p.cast::<u8>(),
        std::mem::size_of::<T>(),
        starts_on_line::<T>(),
    );
}

/// Prefetches every line the `bytes` bytes from `start` span (at least the
/// first); `aligned` when `start` is known to begin a line.
#[inline(always)]
fn prefetch_lines(start: *const u8, bytes: usize, aligned: bool) {
    const LINE: usize = 64;
    // One line apart from the first byte on, as many as the size needs,
    // then, unless the span is known to start a line, the line of its
    // last byte (one that does not start a line may cross one more): a
    // count the size alone sets, which the compiler unrolls, instead of a
    // loop whose length follows where the value starts (its exit
    // mispredicted as often as that changes: a free slot's meta in the
    // flow table, say). The addresses computed with `wrapping_*` (no
    // pointer arithmetic that must stay in bounds).
    let bytes = bytes.max(1);
    for off in (0..bytes).step_by(LINE) {
        prefetch_line(start.wrapping_add(off));
    }
    if !aligned {
        prefetch_line(start.wrapping_add(bytes - 1));
    }
}

/// The 16-bit lanes of `lanes` (lane `w` in bits `16 w ..`) that equal
/// `v`: bit `w` set for each. One vector compare on x86_64 (`core::arch`
/// needs `unsafe` for it, and the compiler does not vectorize the portable
/// loop without a newer CPU target); the loop elsewhere.
#[inline(always)]
pub fn lanes_equal(lanes: u128, v: u16) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi16, _mm_movemask_epi8, _mm_packs_epi16, _mm_set_epi64x, _mm_set1_epi16,
            _mm_setzero_si128,
        };
        // SAFETY: SSE2 is part of the x86_64 baseline, so the instructions
        // exist; they only compute on registers.
        unsafe {
            let x = _mm_set_epi64x((lanes >> 64) as i64, lanes as i64);
            let eq = _mm_cmpeq_epi16(x, _mm_set1_epi16(v as i16));
            // Each 16-bit result (0 or -1) narrowed to a byte, so the mask
            // has one bit per lane.
            (_mm_movemask_epi8(_mm_packs_epi16(eq, _mm_setzero_si128())) & 0xff) as u32
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        lanes_equal_portable(lanes, v)
    }
}

/// [`lanes_equal`] without vector instructions (for other CPUs; the tests
/// check it on every one).
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn lanes_equal_portable(lanes: u128, v: u16) -> u32 {
    (0..8).fold(0, |m, w| {
        m | u32::from((lanes >> (16 * w)) as u16 == v) << w
    })
}

/// The prefetch instruction for the line holding address `p`.
#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline, so the instruction exists;
    // a prefetch reads no memory architecturally and cannot fault, whatever
    // the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Empties `v`, handing each of its values to `f` in order, moved out
/// whole. What `ArrayVec::drain` does, without its `Option`: a moved-out
/// `Option<T>` of a multi-word `T` is tested on its niche word and stored in
/// pieces, and the next copy of it (to pass it on) reads it back whole, a
/// store-forwarding stall per value (several percent of the switch's
/// fast path with 32-byte pool buffers). Should `f` unwind, the values it
/// was not yet given are leaked, never dropped twice.
#[inline(always)]
pub fn drain_each<T, const N: usize>(v: &mut arrayvec::ArrayVec<T, N>, mut f: impl FnMut(T)) {
    let len = v.len();
    // SAFETY: the length is 0 before any value is read, so the vector no
    // longer owns (nor will drop) the values in its first `len` places;
    // they stay initialised in its storage, which `v`'s exclusive borrow
    // keeps alive and untouched until this returns.
    unsafe { v.set_len(0) };
    // (`ArrayVec::as_mut_ptr`, the inherent method, points at the whole
    // buffer, not at the now empty slice: reading past the length through
    // it is allowed. It is taken after `set_len`, whose reborrow of the
    // vector would invalidate a pointer taken before.)
    let base = v.as_mut_ptr();
    for i in 0..len {
        // SAFETY: `i < len`: an initialised value that nothing else owns
        // (above), read exactly once, so ownership moves to `f`.
        f(unsafe { std::ptr::read(base.add(i)) });
    }
}

/// The size of a transparent huge page on x86_64 and most aarch64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB pages that lie inside `s`'s
/// memory with transparent huge pages (`MADV_HUGEPAGE`): for a large array
/// that is allocated once and filled later, such as a `Vec`'s reserved
/// capacity (`spare_capacity_mut`), whose pages then fault in 2 MiB at a
/// time and whose random accesses stop missing the TLB. Advice only: the
/// memory and its contents are unchanged. True when the kernel took it;
/// false when it refused, or when `s` spans no whole huge page (a small
/// array, or one the allocator did not place in a mapping of its own).
pub fn advise_huge<T>(s: &[T]) -> bool {
    let start = s.as_ptr() as usize;
    let end = start + std::mem::size_of_val(s);
    let Some(from) = start.checked_next_multiple_of(HUGE_PAGE) else {
        return false;
    };
    let to = end - end % HUGE_PAGE;
    if to <= from {
        return false;
    }
    // SAFETY: [from, to) lies inside `s`, memory this process has mapped
    // and borrows here; MADV_HUGEPAGE changes how the kernel backs those
    // pages, never their contents or their accessibility.
    unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) == 0 }
}

/// Commits the memory of the whole pages that lie inside `s` now
/// (`MADV_POPULATE_WRITE`, Linux 5.14): the kernel faults them in writable,
/// zeroing the pages not yet backed, as the first writes would have, and
/// leaves the ones already backed as they are. For a table sized at start
/// whose pages would otherwise be faulted in by the dataplane as it first
/// writes them: each fault of a 2 MiB page stops the worker while the
/// kernel zeroes it. The contents of `s` are unchanged. `Err` when the
/// kernel could not (before Linux 5.14: `EINVAL`; not enough memory): the
/// pages left are then faulted in as they are written, as without this
/// call. Refused (`OutOfMemory`, nothing committed) when
/// the pages would take more than half of the memory left to this process
/// ([`memory_available`]): committing them would risk the kernel stopping
/// the process now, for tables that may never fill.
pub fn populate<T>(s: &mut [T]) -> Result<(), std::io::Error> {
    // (`s` is borrowed mutably for the call: nothing else reads or writes
    // it meanwhile.)
    populate_range(s.as_mut_ptr() as usize, std::mem::size_of_val(s))
}

/// The system's page size (4 KiB on x86_64; 16 or 64 KiB on some arm64
/// kernels).
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(p)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Bytes of memory left to this process: the kernel's estimate of what
/// can be allocated without swapping (`MemAvailable`), and under cgroup
/// memory limits what they leave, the least of all. A cgroup's limit is
/// its own and its ancestors' (v2 `memory.max` up the tree; v1
/// `memory.limit_in_bytes` and the `hierarchical_memory_limit` of its
/// `memory.stat`); what it uses counts without the page cache it could
/// drop (`inactive_file`). A cgroup whose files are not where
/// `/proc/self/cgroup` names them (its own namespace: the mount's root is
/// the cgroup) is read at the mount's root. None when `/proc/meminfo`
/// cannot be read.
pub fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let mut left = kb.saturating_mul(1024);
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let Some(path) = path else { continue };
        let cg = match controllers {
            Some("") => left_in_v2("/sys/fs/cgroup", path),
            Some(c) if c.split(',').any(|c| c == "memory") => {
                left_in_v1("/sys/fs/cgroup/memory", path)
            }
            _ => None,
        };
        if let Some(cg) = cg {
            left = left.min(cg);
        }
    }
    Some(left)
}

/// A number in file `dir/name` (None: absent, or `max`).
fn read_u64(dir: &str, name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{dir}/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Key `key` of the `memory.stat` in `dir`.
fn stat_u64(dir: &str, key: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("{dir}/memory.stat")).ok()?;
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// What the v2 cgroup at `path` (under `root`) and its ancestors leave.
fn left_in_v2(root: &str, path: &str) -> Option<u64> {
    let own = format!("{root}{}", path.trim_end_matches('/'));
    let mut dir = if std::path::Path::new(&own).is_dir() {
        own
    } else {
        root.to_string()
    };
    let mut least: Option<u64> = None;
    loop {
        if let (Some(max), Some(cur)) = (
            read_u64(&dir, "memory.max"),
            read_u64(&dir, "memory.current"),
        ) {
            let used = cur.saturating_sub(stat_u64(&dir, "inactive_file").unwrap_or(0));
            let l = max.saturating_sub(used);
            least = Some(least.map_or(l, |x| x.min(l)));
        }
        if dir.len() <= root.len() {
            return least;
        }
        match dir.rfind('/') {
            Some(i) if i >= root.len() => dir.truncate(i),
            _ => return least,
        }
    }
}

/// What the v1 memory cgroup at `path` (under `root`) leaves: its limit
/// or an ancestor's (v1 reports the least as `hierarchical_memory_limit`),
/// against its own usage (not its siblings' under that ancestor).
fn left_in_v1(root: &str, path: &str) -> Option<u64> {
    let own = format!("{root}{}", path.trim_end_matches('/'));
    let dir = if std::path::Path::new(&own).is_dir() {
        own
    } else {
        root.to_string()
    };
    let limit = read_u64(&dir, "memory.limit_in_bytes")?;
    let limit = stat_u64(&dir, "hierarchical_memory_limit").map_or(limit, |h| h.min(limit));
    let used = read_u64(&dir, "memory.usage_in_bytes")?
        .saturating_sub(stat_u64(&dir, "total_inactive_file").unwrap_or(0));
    Some(limit.saturating_sub(used))
}

/// Whether committing `len` bytes with `left` bytes of memory left would
/// take more than half of it: [`populate`] refuses such a range.
pub fn too_big_to_commit(len: u64, left: u64) -> bool {
    len > left / 2
}

/// [`populate`] of the whole pages inside the `len` bytes from address
/// `start`, memory the caller has mapped and holds exclusively.
fn populate_range(start: usize, len: usize) -> Result<(), std::io::Error> {
    let page = page_size();
    let end = start + len;
    let from = start.next_multiple_of(page);
    let to = end - end % page;
    if to <= from {
        return Ok(());
    }
    if memory_available().is_some_and(|left| too_big_to_commit((to - from) as u64, left)) {
        return Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
    }
    // SAFETY: [from, to) lies inside memory the caller has mapped and holds;
    // MADV_POPULATE_WRITE only faults its pages in as a write would, never
    // changing their contents.
    let r = unsafe {
        libc::madvise(
            from as *mut libc::c_void,
            to - from,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How a [`HugeVec`]'s memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Nothing mapped yet (capacity 0).
    None,
    /// An anonymous mapping the kernel accepted `MADV_HUGEPAGE` for: it
    /// backs it with 2 MiB pages when its THP mode
    /// (`/sys/kernel/mm/transparent_hugepage/enabled`) is `always` or
    /// `madvise` and it has huge pages free, with small pages otherwise
    /// (mode `never`, or memory too fragmented), transparently.
    HugePages,
    /// An anonymous mapping with small pages: the kernel refused
    /// `MADV_HUGEPAGE` (built without THP).
    SmallPages,
}

/// An array of `Copy` values, growable like a `Vec`, in its own anonymous
/// mapping, 2 MiB aligned, advised for transparent huge pages. Pages are
/// faulted in (zeroed by the kernel) as elements are first written, as with
/// a `Vec`'s reserved capacity.
///
/// For tables large enough to miss the TLB on every random access with
/// 4 KiB pages (1 M flow-table slots are 192 MiB: 49 152 small pages, 96
/// huge ones): a miss then costs one memory access, not a page walk too.
/// The address space is reserved without committing memory
/// (`MAP_NORESERVE`), so a large capacity costs nothing until written
/// (under `vm.overcommit_memory=2` the kernel commits it anyway, and may
/// refuse a large one: `Err`); the
/// first write to each 2 MiB page faults it in whole (the kernel zeroes it:
/// tens of microseconds, once per 2 MiB instead of once per 4 KiB).
pub struct HugeVec<T: Copy> {
    /// Start of the mapping (dangling when `map_len` is 0).
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
    /// Bytes mapped (a multiple of [`HUGE_PAGE`]); 0: nothing mapped.
    map_len: usize,
    backing: Backing,
    _owns: PhantomData<T>,
}

// SAFETY: a HugeVec owns its elements as a Vec does (no sharing, no
// interior mutability of its own), so it is Send/Sync when T is.
unsafe impl<T: Copy + Send> Send for HugeVec<T> {}
// SAFETY: as above; `&HugeVec` gives only `&[T]`.
unsafe impl<T: Copy + Sync> Sync for HugeVec<T> {}

/// Why [`HugeVec`] could not get memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The array would be larger than the address space.
    #[error("an array of {elements} elements is larger than the address space")]
    TooLarge {
        /// Elements asked for.
        elements: usize,
    },
    /// `mmap` refused.
    #[error("mapping {bytes} bytes of anonymous memory failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Mmap {
        /// Bytes asked for.
        bytes: usize,
        /// Its error number.
        errno: i32,
    },
}

impl<T: Copy> HugeVec<T> {
    /// An empty array; maps nothing until the first push.
    pub const fn new() -> Self {
        HugeVec {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
            map_len: 0,
            backing: Backing::None,
            _owns: PhantomData,
        }
    }

    /// An empty array with room for `cap` elements (rounded up to whole
    /// huge pages), the address space reserved and nothing faulted in.
    pub fn with_capacity(cap: usize) -> Result<Self, MapError> {
        let mut v = Self::new();
        v.reserve_exact(cap)?;
        Ok(v)
    }

    /// `n` elements of all-zero bytes, without writing them: a fresh
    /// anonymous mapping reads as zeros, and its pages are committed (and
    /// zeroed by the kernel) only as they are first written, so a large
    /// table that is only partly used costs only the pages it touches.
    /// `T: Zeroable` (bytemuck) guarantees that zero bytes are a valid `T`.
    pub fn zeroed(n: usize) -> Result<Self, MapError>
    where
        T: bytemuck::Zeroable,
    {
        let mut v = Self::with_capacity(n)?;
        // The mapping is fresh (nothing was pushed), so its first `n`
        // elements are zero bytes, which `Zeroable` makes valid values.
        v.len = n;
        Ok(v)
    }

    /// `n` copies of `value`.
    pub fn from_elem(value: T, n: usize) -> Result<Self, MapError> {
        let mut v = Self::with_capacity(n)?;
        for _ in 0..n {
            v.push(value)?;
        }
        Ok(v)
    }

    /// Commits the memory of the whole capacity now ([`populate`]), so
    /// that pushing and writing elements up to it faults nothing in. `Err`
    /// when the kernel could not (then pages are faulted in as written).
    pub fn populate(&mut self) -> Result<(), std::io::Error> {
        if self.map_len == 0 {
            return Ok(());
        }
        // (The mapping is `map_len` bytes from `ptr`, this array's own, and
        // `&mut self` keeps everyone else off it for the call.)
        populate_range(self.ptr.as_ptr() as usize, self.map_len)
    }

    /// Starts loading the place of element `i`, in use or not (a place
    /// past the length is one a push will write), if it is within the
    /// capacity: [`prefetch_place`].
    #[inline(always)]
    pub fn prefetch_place(&self, i: usize) {
        if i < self.cap {
            prefetch_place(self.ptr.as_ptr().wrapping_add(i).cast_const());
        }
    }

    /// Elements in use.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// No elements.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements that fit before the array must be remapped.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// How the memory is backed.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Appends `value`; past the capacity the array moves to a mapping
    /// twice as large (its elements copied, as a `Vec` does). `Err` (and
    /// nothing changed) when no memory can be mapped.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<(), MapError> {
        if self.len == self.cap {
            self.reserve_exact(self.cap.max(1).saturating_mul(2))?;
        }
        // SAFETY: `len < cap`, so the element lies inside the mapping, which
        // is writable and aligned for T (page aligned, and a T's size is a
        // multiple of its alignment); writing a Copy value drops nothing.
        unsafe { self.ptr.as_ptr().add(self.len).write(value) };
        self.len += 1;
        Ok(())
    }

    /// Room for `cap` elements in all (never shrinks).
    fn reserve_exact(&mut self, cap: usize) -> Result<(), MapError> {
        if cap <= self.cap {
            return Ok(());
        }
        let size = std::mem::size_of::<T>().max(1);
        let bytes = cap
            .checked_mul(size)
            .and_then(|b| b.checked_next_multiple_of(HUGE_PAGE))
            .filter(|b| *b <= isize::MAX as usize / 2)
            .ok_or(MapError::TooLarge { elements: cap })?;
        let (ptr, backing) = map_aligned(bytes)?;
        let new_cap = if std::mem::size_of::<T>() == 0 {
            usize::MAX
        } else {
            bytes / size
        };
        let ptr = ptr.cast::<T>();
        if self.len > 0 {
            // SAFETY: both regions are mapped, distinct, and hold at least
            // `len` elements; the old one's first `len` are initialised.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), ptr.as_ptr(), self.len) };
        }
        self.unmap();
        self.ptr = ptr;
        self.cap = new_cap;
        self.map_len = bytes;
        self.backing = backing;
        Ok(())
    }

    fn unmap(&mut self) {
        if self.map_len > 0 {
            // SAFETY: `ptr`/`map_len` is exactly a mapping this array made
            // (the aligned part `map_aligned` kept), referenced by nothing
            // else once this array lets go of it.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
            self.map_len = 0;
        }
    }
}

/// An anonymous private mapping of `bytes` (a multiple of [`HUGE_PAGE`])
/// at a [`HUGE_PAGE`]-aligned address, advised for huge pages.
fn map_aligned(bytes: usize) -> Result<(NonNull<u8>, Backing), MapError> {
    // Over-map by one huge page, then cut the unaligned head and tail off:
    // the kernel aligns only some large anonymous mappings by itself.
    let total = bytes + HUGE_PAGE;
    // SAFETY: a fresh anonymous mapping, no address hint, no fd: it overlaps
    // nothing Rust knows of.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(MapError::Mmap {
            bytes: total,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        });
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = total - head - bytes;
    // SAFETY: the head and tail lie inside the mapping just made and
    // outside the part kept; unmapping them touches nothing else.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on the mapping just made; it changes how the kernel
    // backs it, never its contents.
    let advised =
        unsafe { libc::madvise(aligned as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
    let backing = if advised == 0 {
        Backing::HugePages
    } else {
        Backing::SmallPages
    };
    match NonNull::new(aligned as *mut u8) {
        Some(p) => Ok((p, backing)),
        None => Err(MapError::Mmap {
            bytes: total,
            errno: 0,
        }),
    }
}

impl<T: Copy> Drop for HugeVec<T> {
    fn drop(&mut self) {
        self.unmap();
    }
}

impl<T: Copy> Default for HugeVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy> Deref for HugeVec<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` elements are initialised and inside the
        // mapping (or `len` is 0 and the pointer dangling but aligned).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for HugeVec<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy + fmt::Debug> fmt::Debug for HugeVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HugeVec")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Lane by lane, as shifting and comparing says; the lanes drawn
        /// from few values so that several match at once.
        #[test]
        fn lanes_equal_marks_exactly_the_equal_lanes(
            lanes in proptest::array::uniform8(0u16..4),
            v in 0u16..4,
            high in any::<u16>(),
        ) {
            let lanes = lanes.map(|l| if l == 3 { high } else { l });
            let word = lanes
                .iter()
                .enumerate()
                .fold(0u128, |x, (w, l)| x | u128::from(*l) << (16 * w));
            let want = (0..8).fold(0u32, |m, w| m | u32::from(lanes[w] == v) << w);
            prop_assert_eq!(lanes_equal(word, v), want);
            prop_assert_eq!(lanes_equal_portable(word, v), want);
        }
    }

    #[test]
    fn advise_huge_takes_a_large_reservation_and_skips_a_small_one() {
        let mut big: Vec<u64> = Vec::with_capacity(4 * HUGE_PAGE / 8);
        // (A kernel built without transparent huge pages refuses the
        // advice.)
        let mode = thp_mode();
        if mode == "absent" {
            let why = "this kernel has no transparent huge pages";
            assert!(!testkit::require::strict(), "{why}");
            eprintln!("not run: {why}");
        } else {
            assert!(advise_huge(big.spare_capacity_mut()), "THP mode {mode}");
        }
        // Advice changes nothing the program sees.
        big.extend(0..1000u64);
        assert_eq!(big.iter().sum::<u64>(), 999 * 1000 / 2);
        let small = [0u8; 4096];
        assert!(!advise_huge(&small));
        assert!(!advise_huge::<u64>(&[]));
    }

    #[test]
    fn drain_each_moves_every_value_out_once_in_order() {
        let mut v = arrayvec::ArrayVec::<String, 8>::new();
        for i in 0..5 {
            v.push(format!("v{i}"));
        }
        let mut got = Vec::new();
        drain_each(&mut v, |s| got.push(s));
        assert!(v.is_empty());
        assert_eq!(got, ["v0", "v1", "v2", "v3", "v4"]);
        // The vector is usable again, and dropping it drops only what it
        // holds now.
        v.push("again".to_string());
        drain_each(&mut v, |s| assert_eq!(s, "again"));
        assert!(v.is_empty());
    }

    #[test]
    fn prefetching_a_place_reads_nothing_whatever_the_address() {
        // No fault at addresses that hold nothing (the test process would
        // die of one), for any size, a zero-sized one too.
        platform_prefetch_everywhere::<[u64; 35]>();
        platform_prefetch_everywhere::<()>();
        // An array that has no mapping (its pointer dangles) asks for none.
        (0..8).for_each(|i| HugeVec::<[u64; 24]>::new().prefetch_place(i));
        let mut v = HugeVec::<[u64; 24]>::with_capacity(3).unwrap();
        (0..8).for_each(|i| v.prefetch_place(i));
        assert!(v.is_empty());
        while v.len() < v.capacity() {
            let i = v.len() as u64;
            v.push([i; 24]).unwrap();
        }
        // Full: nothing past the mapping is asked for, and nothing changes.
        (0..v.capacity() + 8).for_each(|i| v.prefetch_place(i));
        assert!(v.iter().enumerate().all(|(i, e)| *e == [i as u64; 24]));
    }

    fn platform_prefetch_everywhere<T>() {
        for a in [0usize, 8, 4096, usize::MAX - 63, usize::MAX] {
            prefetch_place(std::ptr::without_provenance::<T>(a));
        }
        prefetch_place(std::ptr::dangling::<T>());
    }

    #[test]
    fn pushes_reads_and_grows_past_its_first_mapping() {
        let mut v = HugeVec::<[u64; 3]>::with_capacity(10).unwrap();
        let first = v.capacity();
        assert!(first >= 10 && first * 24 <= HUGE_PAGE);
        for i in 0..(first as u64 * 2 + 5) {
            v.push([i, i * 2, !i]).unwrap();
        }
        assert!(v.capacity() > first);
        assert_eq!(v.len(), first * 2 + 5);
        for (i, e) in v.iter().enumerate() {
            let i = i as u64;
            assert_eq!(*e, [i, i * 2, !i]);
        }
        v[7][1] = 99;
        assert_eq!(v[7], [7, 99, !7]);
        assert_eq!(v.as_ptr() as usize % HUGE_PAGE, 0);
    }

    #[test]
    fn a_zeroed_array_reads_zeros_and_takes_writes() {
        let mut v = HugeVec::<[u64; 4]>::zeroed(100_000).unwrap();
        assert_eq!(v.len(), 100_000);
        assert!(v.iter().all(|e| *e == [0; 4]));
        v[99_999] = [1, 2, 3, 4];
        v.push([5; 4]).unwrap();
        assert_eq!((v[99_999], v[100_000]), ([1, 2, 3, 4], [5; 4]));
        assert!(HugeVec::<u8>::zeroed(0).unwrap().is_empty());
    }

    /// Pages of `len` bytes from `at` (page aligned) that are resident.
    fn resident_pages(at: usize, len: usize) -> usize {
        let page = page_size();
        let mut v = vec![0u8; len.div_ceil(page)];
        // SAFETY: [at, at + len) is mapped (an array this test holds), and
        // `v` has a byte for each of its pages.
        let r = unsafe { libc::mincore(at as *mut libc::c_void, len, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn a_populated_array_is_resident_before_it_is_written_and_keeps_its_contents() {
        let mut v = HugeVec::<[u64; 8]>::with_capacity(4 * HUGE_PAGE / 64).unwrap();
        for i in 0..1000 {
            v.push([i; 8]).unwrap();
        }
        let (at, len) = (v.as_ptr() as usize, 4 * HUGE_PAGE);
        let all = len / page_size();
        let before = resident_pages(at, len);
        assert!(
            before < all,
            "{before} of {all} pages resident before populating"
        );
        v.populate().unwrap();
        assert_eq!(
            resident_pages(at, len),
            all,
            "pages resident after populating"
        );
        assert!((0..1000).all(|i| v[i as usize] == [i; 8]));
        while v.len() < v.capacity() {
            v.push([7; 8]).unwrap();
        }
        assert!(v[1000..].iter().all(|e| *e == [7; 8]));
        // A slice's whole pages only; an empty one is nothing to do.
        populate(&mut [0u8; 10][..]).unwrap();
        HugeVec::<u8>::new().populate().unwrap();
    }

    #[test]
    fn more_than_half_the_memory_left_is_not_committed() {
        assert!(!too_big_to_commit(100, 200));
        assert!(too_big_to_commit(101, 200));
        assert!(too_big_to_commit(1, 0));
        let left = memory_available().expect("/proc/meminfo");
        let total: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(
            left > 0 && left <= total * 1024,
            "{left} bytes left of {total} kB"
        );
        // Cgroups of both kinds, limited, with page cache to drop, under
        // a parent with a lower limit (v2), read from made-up files.
        let dir = std::env::temp_dir().join(format!("platform-cg-{}", std::process::id()));
        let v2 = dir.join("v2");
        std::fs::create_dir_all(v2.join("a/b")).unwrap();
        let put = |p: &std::path::Path, f: &str, v: &str| std::fs::write(p.join(f), v).unwrap();
        put(&v2, "memory.max", "max\n");
        put(&v2, "memory.current", "5000\n");
        put(&v2.join("a"), "memory.max", "3000\n");
        put(&v2.join("a"), "memory.current", "1000\n");
        put(
            &v2.join("a"),
            "memory.stat",
            "anon 500\ninactive_file 400\n",
        );
        put(&v2.join("a/b"), "memory.max", "9000\n");
        put(&v2.join("a/b"), "memory.current", "1000\n");
        let root = v2.to_str().unwrap();
        // b leaves 8000, a 3000 - (1000 - 400): the least is a's.
        assert_eq!(left_in_v2(root, "/a/b"), Some(2400));
        assert_eq!(left_in_v2(root, "/"), None);
        // A path not under the mount: its root is the cgroup.
        assert_eq!(left_in_v2(root, "/elsewhere"), None);
        let v1 = dir.join("v1");
        std::fs::create_dir_all(v1.join("c")).unwrap();
        put(&v1.join("c"), "memory.limit_in_bytes", "8000\n");
        put(&v1.join("c"), "memory.usage_in_bytes", "3000\n");
        put(
            &v1.join("c"),
            "memory.stat",
            "hierarchical_memory_limit 6000\ntotal_inactive_file 1000\n",
        );
        assert_eq!(left_in_v1(v1.to_str().unwrap(), "/c"), Some(4000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_array_maps_nothing() {
        let v = HugeVec::<u32>::new();
        assert!(v.is_empty());
        assert_eq!(v.backing(), Backing::None);
        assert_eq!(&v[..], &[] as &[u32]);
    }

    #[test]
    fn refuses_an_array_larger_than_the_address_space() {
        assert_eq!(
            HugeVec::<[u8; 64]>::with_capacity(usize::MAX / 8).unwrap_err(),
            MapError::TooLarge {
                elements: usize::MAX / 8
            }
        );
    }

    /// The kernel's THP mode (`always [madvise] never`).
    fn thp_mode() -> String {
        let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        s.split('[')
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or("absent")
            .to_string()
    }

    /// Kilobytes of `AnonHugePages` in the mapping holding `addr`, from
    /// /proc/self/smaps (a header line per mapping, `lo-hi perms ...`, then
    /// its `Field: value` lines).
    fn anon_huge_kb(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
            if let (true, Some(kb)) = (inside, line.strip_prefix("AnonHugePages:")) {
                return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x} in /proc/self/smaps");
    }

    /// Where the kernel does THP (`madvise` or `always`), the array's
    /// memory is really in huge pages once written: the kernel's own
    /// accounting says so.
    #[test]
    fn written_memory_is_backed_by_huge_pages() {
        let mode = thp_mode();
        if mode != "madvise" && mode != "always" {
            let why = format!(
                "transparent huge pages are `{mode}` here: this test needs `madvise` or `always`"
            );
            assert!(!testkit::require::strict(), "{why}");
            eprintln!("not run: {why}");
            return;
        }
        let n = 8 * HUGE_PAGE / 64;
        let v = HugeVec::from_elem([1u64; 8], n).unwrap();
        assert_eq!(v.backing(), Backing::HugePages);
        let kb = anon_huge_kb(v.as_ptr() as usize);
        // At least one of the eight (memory may be too fragmented for all).
        assert!(
            kb >= 2048,
            "none of the 16 MiB array is in huge pages ({kb} kB)"
        );
        assert!(v.iter().all(|e| *e == [1u64; 8]));
    }

    proptest! {
        /// Same contents as a Vec given the same pushes and writes.
        #[test]
        fn behaves_as_a_vec(ops in proptest::collection::vec((any::<bool>(), any::<u16>()), 0..3000)) {
            let mut h = HugeVec::<u16>::new();
            let mut v = Vec::new();
            for (push, x) in ops {
                if push || v.is_empty() {
                    h.push(x).unwrap();
                    v.push(x);
                } else {
                    let i = usize::from(x) % v.len();
                    h[i] = x;
                    v[i] = x;
                }
            }
            prop_assert_eq!(&h[..], &v[..]);
        }
    }
}
