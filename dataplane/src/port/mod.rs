//! The `Port` trait and its drivers.
//!
//! A port moves bursts of packets in and out. It is owned by one worker, which
//! calls it from one thread; its counters are shared atomics the control thread
//! reads. Drivers: [`ring`] (in-memory pairs), [`pcap`] (files), and for
//! kernel interfaces (Linux) [`af_packet`] and [`af_xdp`]; [`spec`] is what a
//! configured port is and the one factory that opens it.

#[cfg(target_os = "linux")]
pub mod af_packet;
#[cfg(target_os = "linux")]
pub mod af_xdp;
#[cfg(feature = "dpdk")]
pub mod dpdk;
#[cfg(target_os = "linux")]
pub mod fdpass;
pub mod pcap;
pub mod ring;
pub mod spec;
#[cfg(target_os = "linux")]
pub mod vhost_user;

use crate::batch::Batch;
use crate::buf::PacketBuf;
use crate::stats::PortStats;
use crate::wire::MacAddr;
use std::sync::Arc;

/// A kernel interface a port binds to: its index, and the port's
/// `LinkInfo` (MAC and MTU read from sysfs). Errors name the port and the
/// interface.
#[cfg(target_os = "linux")]
pub(crate) fn kernel_interface(
    port: &str,
    iface: &str,
    driver: &'static str,
) -> Result<(u32, LinkInfo), PortError> {
    let err = |reason: String| PortError::BadConfig {
        port: port.to_string(),
        reason,
    };
    let c = std::ffi::CString::new(iface)
        .map_err(|_| err(format!("interface name {iface:?} contains a NUL byte")))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(err(format!("interface {iface:?} does not exist")));
    }
    let sys = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{iface}/{what}"))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let info = LinkInfo {
        name: port.to_string(),
        mac: sys("address")
            .and_then(|m| m.parse().ok())
            .unwrap_or(MacAddr::ZERO),
        mtu: sys("mtu").and_then(|m| m.parse().ok()).unwrap_or(1500),
        driver,
    };
    Ok((ifindex, info))
}

/// A memory mapping made with `mmap` (a kernel ring of a packet or XDP
/// socket, a vhost-user guest's memory region, or an anonymous region),
/// unmapped when dropped.
#[cfg(target_os = "linux")]
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

#[cfg(target_os = "linux")]
impl Mapping {
    /// Maps `len` bytes read-write with `flags` (`MAP_SHARED` or
    /// `MAP_PRIVATE`, plus any others): of `fd` at `offset`, or anonymous
    /// memory when `fd` is `None`.
    pub(crate) fn new(
        len: usize,
        flags: libc::c_int,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        offset: libc::off_t,
    ) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a new mapping at an address the kernel chooses, so no
        // existing memory is affected; `raw` is a live descriptor (borrowed
        // for the call) or -1 with MAP_ANONYMOUS; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        std::ptr::NonNull::new(p.cast::<u8>())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))
    }

    /// Its first byte.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(target_os = "linux")]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly a mapping `Mapping::new` made;
        // it is owned by this value alone and unmapped once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: a mapping is memory owned by this value; it is only read or
// written through its owner (a port, moved to the thread that polls it), so
// moving it between threads is sound.
#[cfg(target_os = "linux")]
unsafe impl Send for Mapping {}

/// Takes ownership of a descriptor, so it is closed exactly once, when
/// dropped.
///
/// # Safety
///
/// `raw` must be an open descriptor (not negative) that a system call just
/// created for this process and that nothing else owns or will close.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn owned_fd(raw: libc::c_int) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller guarantees `raw` is open and owned by no one else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}

/// `setsockopt(fd, level, opt, value)`, for the kernel-interface drivers.
#[cfg(target_os = "linux")]
pub(crate) fn set_sockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `value` points to a live `T` of exactly the length passed, and
    // the kernel only reads it during the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A zero-length `sendto(fd)` without waiting: it tells the kernel to
/// transmit what a socket's tx ring holds ready (AF_PACKET's slots marked
/// to send, AF_XDP's posted descriptors); its error, if it failed.
#[cfg(target_os = "linux")]
pub(crate) fn kick_socket(fd: libc::c_int) -> Option<std::io::Error> {
    // SAFETY: a zero-length send, no buffer or address passed.
    let r = unsafe {
        libc::sendto(
            fd,
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    (r < 0).then(std::io::Error::last_os_error)
}

/// `getsockopt(fd, level, opt)` into a zero-filled `T`.
///
/// # Safety
///
/// `T` must be a plain C struct of integers: all-zero bytes, and any bytes
/// the kernel writes, are valid values of it.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn get_sockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
) -> std::io::Result<T> {
    // SAFETY: the caller guarantees all-zero bytes are a valid `T`.
    let mut out: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` and `len` are valid for writes of `len` bytes, and any
    // bytes the kernel writes are a valid `T` (the caller's guarantee).
    let r = unsafe { libc::getsockopt(fd, level, opt, (&mut out as *mut T).cast(), &mut len) };
    if r == 0 {
        Ok(out)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What a port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// The port name from the configuration.
    pub name: String,
    /// The port's MAC address.
    pub mac: MacAddr,
    /// Largest IP packet (L3) the port carries.
    pub mtu: u16,
    /// The driver: "ring", "pcap", ...
    pub driver: &'static str,
}

impl LinkInfo {
    /// A link with the default MTU of 1500.
    pub fn new(name: &str, mac: MacAddr, driver: &'static str) -> Self {
        LinkInfo {
            name: name.to_string(),
            mac,
            mtu: 1500,
            driver,
        }
    }
}

/// A source and sink of packet bursts.
///
/// Contract: `rx_burst` appends at most `batch.free_space()` packets and
/// returns how many; `tx_burst` takes every packet out of `batch`, sends what it
/// can and drops the rest, counting each drop with its reason, and returns how
/// many were sent. No packet is leaked: every buffer ends sent or freed.
pub trait Port: Send {
    /// The buffer type this port receives into and transmits from.
    type Buf: PacketBuf;

    /// Name, MAC, MTU and driver.
    fn info(&self) -> &LinkInfo;

    /// The port's counters, shareable with the control thread.
    fn stats(&self) -> &Arc<PortStats>;

    /// Receives up to `batch.free_space()` packets into `batch`.
    fn rx_burst(&mut self, batch: &mut Batch<Self::Buf>) -> usize;

    /// Sends every packet of `batch` (leaving it empty); returns how many went out.
    fn tx_burst(&mut self, batch: &mut Batch<Self::Buf>) -> usize;

    /// Hands the device again what earlier bursts queued that it did not
    /// take (a kernel that refused a kick: its send buffer held by frames
    /// not yet delivered, the link down), or what the driver holds
    /// buffered (a pcap file's writer). The worker calls it every few
    /// polls, whether or not the port has anything new to send, so that
    /// such frames do not wait for the port's next burst. Cheap when
    /// nothing waits. (No default: a port that wraps another must pass it
    /// on.)
    fn kick(&mut self);

    /// What a successor process needs to go on with this port where it
    /// stands (a hitless upgrade), on a port no worker polls any more:
    /// `None` for drivers that cannot hand over (the successor reopens
    /// them).
    fn handover(&self) -> Option<std::io::Result<Handover>> {
        None
    }
}

/// A port's kernel socket, and where its rings stand, for a successor
/// process: with the socket it keeps everything the kernel has queued, and
/// reads on from the first frame this process did not.
#[derive(Debug)]
pub struct Handover {
    /// A descriptor of the port's socket (a duplicate: the port keeps its
    /// own).
    pub fd: std::os::fd::OwnedFd,
    /// The next rx ring slot to read.
    pub rx_next: usize,
    /// The next tx ring slot to fill.
    pub tx_next: usize,
    /// The rings' slot size.
    pub frame_size: usize,
    /// Slots per ring.
    pub frames: usize,
    /// Further descriptors the port needs (AF_XDP: its UMEM's memory, then
    /// its XDP program's map, program and link); duplicates too.
    pub extra: Vec<std::os::fd::OwnedFd>,
    /// Offsets of the UMEM frames free for transmit (AF_XDP: the others
    /// are in its rings or in the kernel's hands).
    pub free: Vec<u64>,
}

/// A boxed port is a port (per-burst dynamic dispatch, for front ends that
/// choose the driver at run time).
impl<P: Port + ?Sized> Port for Box<P> {
    type Buf = P::Buf;

    fn info(&self) -> &LinkInfo {
        (**self).info()
    }

    fn stats(&self) -> &Arc<PortStats> {
        (**self).stats()
    }

    #[inline]
    fn rx_burst(&mut self, batch: &mut Batch<Self::Buf>) -> usize {
        (**self).rx_burst(batch)
    }

    #[inline]
    fn tx_burst(&mut self, batch: &mut Batch<Self::Buf>) -> usize {
        (**self).tx_burst(batch)
    }

    fn kick(&mut self) {
        (**self).kick()
    }

    fn handover(&self) -> Option<std::io::Result<Handover>> {
        (**self).handover()
    }
}

/// Why a port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// A file the port needs could not be opened or created.
    #[error("port {port:?}: cannot open {path}: {source}")]
    Open {
        /// Port name.
        port: String,
        /// The file.
        path: String,
        /// The OS or format error.
        source: std::io::Error,
    },
    /// A file exists but is not a usable pcap file.
    #[error("port {port:?}: {path} is not a usable pcap file: {reason}")]
    BadPcap {
        /// Port name.
        port: String,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The port configuration is inconsistent.
    #[error("port {port:?}: {reason}")]
    BadConfig {
        /// Port name.
        port: String,
        /// What is wrong.
        reason: String,
    },
}
