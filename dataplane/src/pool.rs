//! Preallocated pools of fixed-size packet buffers.
//!
//! A pool is one anonymous memory region — 2 MiB huge pages when the system has
//! them reserved, normal pages otherwise — cut into equal buffers. Its free
//! buffers are in a lock-free queue and, as a DPDK mempool's per-core cache
//! keeps them, in a small last-in first-out cache of each thread that uses
//! the pool: [`Pool::alloc`] takes from the calling thread's cache, which
//! refills from the queue up to 32 at a time (at most half its bound), and
//! a freed buffer goes to the freeing thread's cache, which gives half back
//! when full. A worker that allocates and frees on its own core so takes no
//! locked instruction per buffer, and takes back the buffer it freed last,
//! still in its cache, where the queue alone hands them out oldest first,
//! cold. No packet ever touches the heap. A buffer may be freed on any
//! thread and goes back to the pool it came from. A thread caches for the
//! first pool it uses only, at most a 64th of the pool and at most 256
//! buffers, none for pools under 64 buffers; its cache goes back to the
//! queue when the thread ends.
//!
//! Pools live for the rest of the process, like DPDK mempools: their memory is
//! never unmapped, which is what lets a buffer hold a plain `&'static mut`
//! slice of it with no reference count and no `unsafe`. Create them at start-up,
//! not per connection.

use crate::buf::{BufError, PacketBuf};
use crossbeam_queue::ArrayQueue;
use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Size of a 2 MiB huge page.
pub const HUGE_PAGE: usize = 2 * 1024 * 1024;
/// Default buffer size: 2048 bytes of data room plus 128 of headroom (as DPDK).
pub const DEFAULT_BUF_SIZE: usize = 2176;
/// Default headroom, room for encapsulation headers in front of the packet.
pub const DEFAULT_HEADROOM: usize = 128;

/// Whether to back a pool with huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Try 2 MiB huge pages, fall back to normal pages.
    #[default]
    Try,
    /// Normal pages only.
    Never,
    /// Huge pages or an error.
    Require,
}

/// How to build a pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Name shown in errors and stats.
    pub name: String,
    /// Number of buffers.
    pub buffers: usize,
    /// Size of each buffer, headroom included (at most 65535).
    pub buf_size: usize,
    /// Headroom reserved in front of a freshly allocated packet.
    pub headroom: usize,
    /// Huge page policy.
    pub huge: HugePages,
}

impl PoolConfig {
    /// `buffers` buffers of the default size and headroom, huge pages if possible.
    pub fn new(name: &str, buffers: usize) -> Self {
        PoolConfig {
            name: name.to_string(),
            buffers,
            buf_size: DEFAULT_BUF_SIZE,
            headroom: DEFAULT_HEADROOM,
            huge: HugePages::Try,
        }
    }
}

/// Why a pool could not be made or a buffer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration is inconsistent.
    #[error("pool {pool:?}: {reason}")]
    BadConfig {
        /// Pool name.
        pool: String,
        /// What is wrong.
        reason: String,
    },
    /// The memory could not be mapped.
    #[error("pool {pool:?}: cannot map {bytes} bytes ({what}): {source}")]
    Map {
        /// Pool name.
        pool: String,
        /// Size of the region.
        bytes: usize,
        /// "huge pages" or "normal pages".
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Every buffer is in use.
    #[error("pool {pool:?} is exhausted ({capacity} buffers in use)")]
    Exhausted {
        /// Pool name.
        pool: String,
        /// Number of buffers.
        capacity: usize,
    },
    /// The data does not fit in one buffer after the headroom.
    #[error("pool {pool:?}: {len} bytes do not fit in a buffer ({room} bytes of room)")]
    TooLarge {
        /// Pool name.
        pool: String,
        /// Data length.
        len: usize,
        /// Room after the headroom.
        room: usize,
    },
}

struct PoolShared {
    name: String,
    free: ArrayQueue<&'static mut [u8]>,
    capacity: usize,
    buf_size: usize,
    headroom: usize,
    huge: bool,
    alloc_failures: AtomicU64,
    /// The most a thread's cache holds (0: no cache).
    cache_max: usize,
    /// How many buffers each thread's cache holds now (each written by its
    /// thread alone), for [`Pool::available`].
    cached: Mutex<Vec<Arc<AtomicUsize>>>,
}

/// Free buffers a cache takes from the queue at once.
const REFILL: usize = 32;
/// The most a thread's cache holds.
const CACHE_MAX: usize = 256;

/// A thread's cache of free buffers of one pool, last in first out.
struct Cache {
    pool: Option<&'static PoolShared>,
    bufs: Vec<&'static mut [u8]>,
    /// `bufs.len()`, published for [`Pool::available`].
    len: Option<Arc<AtomicUsize>>,
}

impl Cache {
    /// Whether this cache serves `pool`: the first pool it is asked for,
    /// if that pool has caches.
    #[inline]
    fn serves(&mut self, pool: &'static PoolShared) -> bool {
        match self.pool {
            Some(p) => std::ptr::eq(p, pool),
            None if pool.cache_max == 0 => false,
            None => {
                self.pool = Some(pool);
                // (Once per thread: the cache's room and its count.)
                self.bufs = Vec::with_capacity(pool.cache_max);
                let len = Arc::new(AtomicUsize::new(0));
                pool.cached
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(len.clone());
                self.len = Some(len);
                true
            }
        }
    }

    #[inline]
    fn publish(&self) {
        if let Some(l) = &self.len {
            l.store(self.bufs.len(), Ordering::Relaxed);
        }
    }

    /// A free buffer of `pool`, refilling from its queue when empty;
    /// `None` if this cache does not serve `pool` or the queue is empty.
    #[inline]
    fn take(&mut self, pool: &'static PoolShared) -> Option<&'static mut [u8]> {
        if !self.serves(pool) {
            return None;
        }
        if self.bufs.is_empty() {
            for _ in 0..REFILL.min(pool.cache_max / 2).max(1) {
                match pool.free.pop() {
                    Some(b) => self.bufs.push(b),
                    None => break,
                }
            }
        }
        let b = self.bufs.pop();
        self.publish();
        b
    }

    /// Keeps `mem` of `pool`, giving half back to the queue when full; hands
    /// it back if this cache does not serve `pool`.
    #[inline]
    fn give(
        &mut self,
        pool: &'static PoolShared,
        mem: &'static mut [u8],
    ) -> Result<(), &'static mut [u8]> {
        if !self.serves(pool) {
            return Err(mem);
        }
        if self.bufs.len() >= pool.cache_max {
            for b in self.bufs.drain(pool.cache_max / 2..) {
                // Cannot fail: the queue has room for every buffer.
                let _ = pool.free.push(b);
            }
        }
        self.bufs.push(mem);
        self.publish();
        Ok(())
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let Some(pool) = self.pool else {
            return;
        };
        for b in self.bufs.drain(..) {
            let _ = pool.free.push(b);
        }
        if let Some(l) = self.len.take() {
            pool.cached
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|c| !Arc::ptr_eq(c, &l));
        }
    }
}

thread_local! {
    static CACHE: RefCell<Cache> = const {
        RefCell::new(Cache {
            pool: None,
            bufs: Vec::new(),
            len: None,
        })
    };
}

/// A free buffer of `pool` from the calling thread's cache, if it serves
/// `pool` and has or can refill one.
#[inline]
fn cache_take(pool: &'static PoolShared) -> Option<&'static mut [u8]> {
    CACHE
        .try_with(|c| c.try_borrow_mut().ok()?.take(pool))
        .ok()
        .flatten()
}

/// Returns `mem` to `pool`: to the calling thread's cache, else the queue.
#[inline]
fn give_back(pool: &'static PoolShared, mem: &'static mut [u8]) {
    let mut slot = Some(mem);
    // (A thread's cache is gone while the thread ends: the queue then.)
    let _ = CACHE.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut()
            && let Some(m) = slot.take()
            && let Err(m) = c.give(pool, m)
        {
            slot = Some(m);
        }
    });
    if let Some(m) = slot {
        // Cannot fail: the queue has room for every buffer of the pool.
        let _ = pool.free.push(m);
    }
}

/// A handle to a pool; cheap to copy and to send to other threads.
#[derive(Clone, Copy)]
pub struct Pool {
    shared: &'static PoolShared,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("capacity", &self.shared.capacity)
            .field("available", &self.available())
            .field("huge", &self.shared.huge)
            .finish()
    }
}

fn map(bytes: usize, huge: bool) -> std::io::Result<memmap2::MmapMut> {
    let mut opts = memmap2::MmapOptions::new();
    opts.len(bytes).populate();
    if huge {
        opts.huge(Some(21));
    }
    opts.map_anon()
}

impl Pool {
    /// Maps the region and cuts it into buffers.
    pub fn new(cfg: &PoolConfig) -> Result<Pool, PoolError> {
        let bad = |reason: String| PoolError::BadConfig {
            pool: cfg.name.clone(),
            reason,
        };
        if cfg.buffers == 0 {
            return Err(bad("needs at least one buffer".into()));
        }
        if cfg.buf_size < 64 || cfg.buf_size > usize::from(u16::MAX) {
            return Err(bad(format!(
                "buf_size {} is outside 64..=65535",
                cfg.buf_size
            )));
        }
        if cfg.headroom >= cfg.buf_size {
            return Err(bad(format!(
                "headroom {} leaves no room in a {}-byte buffer",
                cfg.headroom, cfg.buf_size
            )));
        }
        let bytes = cfg
            .buffers
            .checked_mul(cfg.buf_size)
            .ok_or_else(|| bad(format!("{} buffers is too many", cfg.buffers)))?;
        let rounded = bytes.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let (mmap, huge) = match cfg.huge {
            HugePages::Never => (map(bytes, false), false),
            HugePages::Require => (map(rounded, true), true),
            HugePages::Try => match map(rounded, true) {
                Ok(m) => (Ok(m), true),
                Err(_) => (map(bytes, false), false),
            },
        };
        let mmap = mmap.map_err(|source| PoolError::Map {
            pool: cfg.name.clone(),
            bytes: if huge { rounded } else { bytes },
            what: if huge { "huge pages" } else { "normal pages" },
            source,
        })?;
        // The region lives for the rest of the process (see the module doc).
        let region: &'static mut memmap2::MmapMut = Box::leak(Box::new(mmap));
        let region: &'static mut [u8] = &mut region[..];
        let free = ArrayQueue::new(cfg.buffers);
        for chunk in region.chunks_exact_mut(cfg.buf_size).take(cfg.buffers) {
            // Cannot fail: the queue holds exactly `buffers` entries.
            let _ = free.push(chunk);
        }
        let shared = Box::leak(Box::new(PoolShared {
            name: cfg.name.clone(),
            free,
            capacity: cfg.buffers,
            buf_size: cfg.buf_size,
            headroom: cfg.headroom,
            huge,
            alloc_failures: AtomicU64::new(0),
            cache_max: (cfg.buffers / 64).min(CACHE_MAX),
            cached: Mutex::new(Vec::new()),
        }));
        Ok(Pool { shared })
    }

    /// Takes a free buffer (empty packet, default headroom), or `None` when
    /// the pool is exhausted (counted in [`Pool::alloc_failures`]).
    #[inline]
    pub fn alloc(&self) -> Option<PoolBuf> {
        match cache_take(self.shared).or_else(|| self.shared.free.pop()) {
            Some(mem) => Some(PoolBuf {
                mem,
                off: self.shared.headroom as u16,
                len: 0,
                pool: self.shared,
            }),
            None => {
                self.shared.alloc_failures.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Takes a buffer and copies `data` into it after the headroom.
    pub fn alloc_copy(&self, data: &[u8]) -> Result<PoolBuf, PoolError> {
        let room = self.shared.buf_size - self.shared.headroom;
        if data.len() > room {
            return Err(PoolError::TooLarge {
                pool: self.shared.name.clone(),
                len: data.len(),
                room,
            });
        }
        let mut b = self.alloc().ok_or_else(|| PoolError::Exhausted {
            pool: self.shared.name.clone(),
            capacity: self.shared.capacity,
        })?;
        let off = usize::from(b.off);
        b.mem[off..off + data.len()].copy_from_slice(data);
        b.len = data.len() as u16;
        Ok(b)
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Number of buffers.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Buffers currently free (in the queue and in the threads' caches).
    pub fn available(&self) -> usize {
        let cached: usize = self
            .shared
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        // (Read while buffers move between a cache and the queue, the sum
        // may be off by those in flight.)
        (self.shared.free.len() + cached).min(self.shared.capacity)
    }

    /// Size of each buffer, headroom included.
    pub fn buf_size(&self) -> usize {
        self.shared.buf_size
    }

    /// True when backed by 2 MiB huge pages.
    pub fn is_huge(&self) -> bool {
        self.shared.huge
    }

    /// How many allocations found the pool empty.
    pub fn alloc_failures(&self) -> u64 {
        self.shared.alloc_failures.load(Ordering::Relaxed)
    }
}

/// A packet buffer from a [`Pool`]; dropping it returns it to the pool.
pub struct PoolBuf {
    mem: &'static mut [u8],
    off: u16,
    len: u16,
    pool: &'static PoolShared,
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("pool", &self.pool.name)
            .field("headroom", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for PoolBuf {
    #[inline]
    fn drop(&mut self) {
        give_back(self.pool, std::mem::take(&mut self.mem));
    }
}

impl PacketBuf for PoolBuf {
    #[inline]
    fn data(&self) -> &[u8] {
        let off = usize::from(self.off);
        &self.mem[off..off + usize::from(self.len)]
    }

    #[inline]
    fn data_mut(&mut self) -> &mut [u8] {
        let off = usize::from(self.off);
        &mut self.mem[off..off + usize::from(self.len)]
    }

    #[inline]
    fn len(&self) -> usize {
        usize::from(self.len)
    }

    #[inline]
    fn headroom(&self) -> usize {
        usize::from(self.off)
    }

    #[inline]
    fn tailroom(&self) -> usize {
        self.mem.len() - usize::from(self.off) - usize::from(self.len)
    }

    #[inline]
    fn prepend(&mut self, n: usize) -> Result<&mut [u8], BufError> {
        let have = self.headroom();
        if n > have {
            return Err(BufError::NoHeadroom { need: n, have });
        }
        self.off -= n as u16;
        self.len += n as u16;
        let off = usize::from(self.off);
        Ok(&mut self.mem[off..off + n])
    }

    #[inline]
    fn adj(&mut self, n: usize) -> Result<(), BufError> {
        let have = self.len();
        if n > have {
            return Err(BufError::TooShort { need: n, have });
        }
        self.off += n as u16;
        self.len -= n as u16;
        Ok(())
    }

    #[inline]
    fn append(&mut self, n: usize) -> Result<&mut [u8], BufError> {
        let have = self.tailroom();
        if n > have {
            return Err(BufError::NoTailroom { need: n, have });
        }
        let end = usize::from(self.off) + usize::from(self.len);
        self.len += n as u16;
        Ok(&mut self.mem[end..end + n])
    }

    #[inline]
    fn trim(&mut self, n: usize) -> Result<(), BufError> {
        let have = self.len();
        if n > have {
            return Err(BufError::TooShort { need: n, have });
        }
        self.len -= n as u16;
        Ok(())
    }

    #[inline]
    fn reset(&mut self) {
        self.off = self.pool.headroom as u16;
        self.len = 0;
    }
}

impl crate::buf::BufAlloc for Pool {
    type Buf = PoolBuf;
    fn alloc_buf(&self) -> Option<PoolBuf> {
        self.alloc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(name: &str, n: usize) -> Pool {
        let mut cfg = PoolConfig::new(name, n);
        cfg.huge = HugePages::Never;
        Pool::new(&cfg).unwrap()
    }

    #[test]
    fn alloc_free_and_exhaustion() {
        let pool = small("t-exhaust", 4);
        let bufs: Vec<_> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.available(), 0);
        assert!(pool.alloc().is_none());
        assert_eq!(pool.alloc_failures(), 1);
        assert!(matches!(
            pool.alloc_copy(b"x"),
            Err(PoolError::Exhausted { .. })
        ));
        drop(bufs);
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn buffers_are_disjoint_and_keep_their_data() {
        let pool = small("t-disjoint", 8);
        let bufs: Vec<_> = (0..8u8)
            .map(|i| pool.alloc_copy(&[i; 100]).unwrap())
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b.data(), &[i as u8; 100]);
        }
    }

    #[test]
    fn headroom_prepend_adj_append_trim() {
        let pool = small("t-room", 1);
        let mut b = pool.alloc_copy(b"payload").unwrap();
        assert_eq!(b.headroom(), DEFAULT_HEADROOM);
        assert_eq!(b.tailroom(), DEFAULT_BUF_SIZE - DEFAULT_HEADROOM - 7);
        b.prepend(4).unwrap().copy_from_slice(b"hdr:");
        assert_eq!(b.data(), b"hdr:payload");
        assert_eq!(b.headroom(), DEFAULT_HEADROOM - 4);
        b.append(1).unwrap()[0] = b'!';
        assert_eq!(b.data(), b"hdr:payload!");
        b.adj(4).unwrap();
        b.trim(1).unwrap();
        assert_eq!(b.data(), b"payload");
        assert_eq!(
            b.prepend(DEFAULT_HEADROOM + 1).unwrap_err(),
            BufError::NoHeadroom {
                need: DEFAULT_HEADROOM + 1,
                have: DEFAULT_HEADROOM
            }
        );
        assert_eq!(
            b.adj(8).unwrap_err(),
            BufError::TooShort { need: 8, have: 7 }
        );
        assert!(matches!(
            b.append(1 << 15),
            Err(BufError::NoTailroom { .. })
        ));
        assert_eq!(b.data(), b"payload");
        b.data_mut()[0] = b'P';
        assert_eq!(b.data(), b"Payload");
        b.reset();
        assert!(b.is_empty());
        assert_eq!(b.headroom(), DEFAULT_HEADROOM);
    }

    #[test]
    fn too_large_and_bad_config() {
        let pool = small("t-large", 1);
        let big = vec![0u8; DEFAULT_BUF_SIZE];
        let e = pool.alloc_copy(&big).unwrap_err();
        assert!(e.to_string().contains("t-large"), "{e}");
        for (n, size, head) in [(0, 2176, 128), (1, 32, 0), (1, 70000, 128), (1, 128, 128)] {
            let cfg = PoolConfig {
                name: "bad".into(),
                buffers: n,
                buf_size: size,
                headroom: head,
                huge: HugePages::Never,
            };
            assert!(matches!(Pool::new(&cfg), Err(PoolError::BadConfig { .. })));
        }
    }

    /// With huge pages reserved (always under CI: scripts/test.sh reserves
    /// them as root), `Require` gets them; on a machine with none, `Require`
    /// fails naming the pool and `Try` falls back to normal pages.
    #[test]
    fn huge_pages_when_reserved_else_fallback() {
        use testkit::require::{self, Need};
        let mut cfg = PoolConfig::new("t-require", 16);
        cfg.huge = HugePages::Require;
        if require::free_huge_pages() == 0 && !require::strict() {
            let e = Pool::new(&cfg).unwrap_err();
            assert!(
                matches!(
                    e,
                    PoolError::Map {
                        what: "huge pages",
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("t-require"), "{e}");
            let pool = Pool::new(&PoolConfig::new("t-try", 16)).unwrap();
            assert!(!pool.is_huge());
            assert_eq!(pool.capacity(), 16);
            return;
        }
        if !require::met(&[Need::HugePages(4)]) {
            return;
        }
        let pool = Pool::new(&cfg).unwrap();
        assert!(pool.is_huge());
        let b = pool.alloc_copy(&[7; 1500]).unwrap();
        assert_eq!(b.data(), &[7; 1500]);
    }

    #[test]
    fn a_thread_takes_back_the_buffer_it_freed_last_and_caches_within_bounds() {
        let pool = small("t-cache", 1024);
        assert_eq!(pool.shared.cache_max, 16);
        let a = pool.alloc().unwrap();
        let addr = a.mem.as_ptr();
        drop(a);
        // Last in, first out: the same buffer, still in the core's cache.
        let b = pool.alloc().unwrap();
        assert_eq!(b.mem.as_ptr(), addr);
        drop(b);
        assert_eq!(pool.available(), 1024);
        // A thread that frees many keeps at most its bound; the rest go
        // back to the queue, where any thread finds them.
        let bufs: Vec<_> = (0..1024).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.available(), 0);
        assert!(pool.alloc().is_none());
        let cached = std::thread::spawn(move || {
            drop(bufs);
            let n = CACHE.with(|c| c.borrow().bufs.len());
            (n, pool.available())
        })
        .join()
        .unwrap();
        assert!(cached.0 <= 16, "{cached:?}");
        assert_eq!(cached.1, 1024);
        // That thread ended: its cache went back to the queue.
        assert_eq!(
            pool.shared.free.len() + CACHE.with(|c| c.borrow().bufs.len()),
            1024
        );
        assert_eq!(pool.available(), 1024);
        // A pool under 64 buffers has no caches; a second pool on a thread
        // whose cache serves another goes through its queue.
        let tiny = small("t-tiny", 8);
        assert_eq!(tiny.shared.cache_max, 0);
        let other = small("t-other", 1024);
        let x = other.alloc().unwrap();
        drop(x);
        assert_eq!(other.shared.free.len(), 1024);
    }

    #[test]
    fn freed_on_another_thread_returns_to_its_pool() {
        let pool = small("t-threads", 64);
        let bufs: Vec<_> = (0..64).map(|_| pool.alloc().unwrap()).collect();
        std::thread::spawn(move || drop(bufs)).join().unwrap();
        assert_eq!(pool.available(), 64);
    }
}
