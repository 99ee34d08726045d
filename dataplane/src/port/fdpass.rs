//! Passing port sockets between processes over a unix stream socket
//! (`SCM_RIGHTS`), for a hitless upgrade: the successor receives the very
//! sockets the ports read from, with whatever the kernel has queued.
//!
//! A message is an 8-byte big-endian length, which carries the
//! descriptors, then that many bytes of payload. The two calls under it
//! ([`send_raw`], [`recv_fds`]) serve the vhost-user ports' messages too.
//! Written here rather than taken from a crate because std's
//! ancillary-data API is unstable and the crates that wrap `sendmsg` bring
//! far more than these two calls.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Descriptors one message carries at most (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// The control-message buffer: room for `MAX_FDS` descriptors, aligned
/// for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 1100]);

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE computes a size from its argument only.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) as usize }
}

/// Sends `payload` with `fds` over `sock`.
pub fn send(sock: &mut UnixStream, payload: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let head = (payload.len() as u64).to_be_bytes();
    send_raw(sock, &head, fds)?;
    sock.write_all(payload)
}

/// Sends `data` as it is over `sock`, `fds` riding with its first bytes
/// (the length-prefixed messages of [`send`], a vhost-user request).
pub fn send_raw(sock: &mut UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!(
            "{} descriptors are more than one message carries ({MAX_FDS})",
            fds.len()
        )));
    }
    let mut cbuf = CmsgBuf([0; 1100]);
    debug_assert!(cmsg_space() <= cbuf.0.len());
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value to fill in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE computes a size from its argument only.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        // SAFETY: msg_control points at `cbuf`, which is aligned for
        // cmsghdr and at least msg_controllen bytes long, so the first
        // header and its data (CMSG_LEN(data_len) bytes) lie inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for (k, fd) in fds.iter().enumerate() {
                data.add(k).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    let mut sent = 0;
    while sent == 0 {
        // SAFETY: `msg` points at live buffers of the lengths it gives
        // (`data`, `cbuf`) for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent = n as usize;
    }
    // The descriptors went with the first bytes; the rest follow as plain
    // bytes.
    sock.write_all(&data[sent..])
}

/// One `recvmsg` from `sock` into `buf`: the bytes read (0 at the end of
/// the stream) and the descriptors that came with them, owned by the
/// caller. A vhost-user port's control thread reads its front end's
/// message headers so too.
pub fn recv_fds(sock: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut cbuf = CmsgBuf([0; 1100]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value to fill in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space();
    let got = loop {
        // SAFETY: `msg` points at live, writable buffers of the lengths it
        // gives; MSG_CMSG_CLOEXEC marks received descriptors close-on-exec.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed control messages; CMSG_FIRSTHDR/NXTHDR walk them within
    // that length, and SCM_RIGHTS data is an array of descriptors that are
    // now open in this process and owned by no one else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for k in 0..len / std::mem::size_of::<libc::c_int>() {
                    fds.push(super::owned_fd(data.add(k).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "descriptors were cut off (more than one message carries)",
        ));
    }
    Ok((got, fds))
}

/// Receives one message from `sock`: its payload (at most `max_len`
/// bytes) and the descriptors that came with it, owned by the caller.
pub fn recv(sock: &mut UnixStream, max_len: usize) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut head = [0u8; 8];
    let (got, fds) = recv_fds(sock, &mut head)?;
    if got == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    sock.read_exact(&mut head[got..])?;
    let len = u64::from_be_bytes(head) as usize;
    if len > max_len {
        return Err(std::io::Error::other(format!(
            "a message of {len} bytes is larger than {max_len}"
        )));
    }
    let mut payload = vec![0; len];
    sock.read_exact(&mut payload)?;
    Ok((payload, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_and_payload_arrive_together() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (mut p1, p2) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        send(&mut a, b"hello", &[p2.as_fd(), file.as_fd()]).unwrap();
        send(&mut a, b"", &[]).unwrap();
        let (payload, fds) = recv(&mut b, 100).unwrap();
        assert_eq!(payload, b"hello");
        assert_eq!(fds.len(), 2);
        // The first is the far end of p1: what goes in one comes out the other.
        let mut q = UnixStream::from(fds.into_iter().next().unwrap());
        q.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        p1.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        let (payload, fds) = recv(&mut b, 100).unwrap();
        assert!(payload.is_empty() && fds.is_empty());
        send(&mut a, &[7; 200], &[]).unwrap();
        let e = recv(&mut b, 100).unwrap_err();
        assert!(e.to_string().contains("200 bytes"), "{e}");
        drop(a);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.flush().unwrap();
        drop(a);
        assert_eq!(
            recv(&mut b, 100).unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }
}
