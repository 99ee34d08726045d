//! Fuzzes pollux's vhost-user backend with what a hostile front end and
//! guest control: a protocol message (header, payload, the number of
//! descriptors that came with it), and the guest memory its rings lie in.
//!
//! Input: `[fds, message (12-byte header, then payload)..., 0xff 0xff, guest
//! memory...]`. The message is parsed (an error names its request, a
//! memory table has 1 to 8 regions); the guest memory, copied into a 64 KiB
//! region (a descriptor table of 16 entries at 0, the available ring at
//! 0x100, the used ring at 0x200: all within libFuzzer's default 4 KiB
//! inputs; the buffers anywhere in the region or outside it), has every
//! chain it offers read into a packet buffer and then written with a
//! frame: neither may panic, and a chain written holds exactly the header
//! and the frame.
#![no_main]

use dataplane::port::vhost_user::proto;
use dataplane::port::vhost_user::vring::{self, Memory, Split};
use libfuzzer_sys::fuzz_target;
use std::os::fd::{FromRawFd, OwnedFd};

const SIZE: usize = 64 * 1024;
const GPA: u64 = 0x1_0000_0000;
const UADDR: u64 = 0x7f00_0000_0000;

fn memory(content: &[u8]) -> Option<(std::sync::Arc<Memory>, OwnedFd)> {
    // SAFETY: plain calls; the descriptor is owned by the OwnedFd at once.
    let fd = unsafe {
        let raw = libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC);
        if raw < 0 {
            return None;
        }
        OwnedFd::from_raw_fd(raw)
    };
    let mut file = std::fs::File::from(fd.try_clone().ok()?);
    let mut bytes = content.to_vec();
    bytes.resize(SIZE, 0);
    std::io::Write::write_all(&mut file, &bytes).ok()?;
    let region = proto::Region {
        gpa: GPA,
        size: SIZE as u64,
        uaddr: UADDR,
        mmap_offset: 0,
    };
    let mem = Memory::map(&[region], std::slice::from_ref(&fd)).ok()?;
    Some((std::sync::Arc::new(mem), fd))
}

fuzz_target!(|data: &[u8]| {
    let Some((&fds, rest)) = data.split_first() else {
        return;
    };
    let cut = rest
        .windows(2)
        .position(|w| w == [0xff, 0xff])
        .unwrap_or(rest.len());
    let (msg, guest) = rest.split_at(cut);
    if msg.len() >= proto::HEADER_LEN {
        let mut h = [0u8; proto::HEADER_LEN];
        h.copy_from_slice(&msg[..proto::HEADER_LEN]);
        if let Ok(h) = proto::Header::parse(&h) {
            let payload = &msg[proto::HEADER_LEN..];
            match proto::parse(&h, payload, usize::from(fds % 10)) {
                Ok(proto::Request::SetMemTable(r)) => {
                    assert!((1..=proto::MAX_REGIONS).contains(&r.len()));
                    assert_eq!(usize::from(fds % 10), r.len());
                }
                Ok(_) => {}
                Err(e) => assert!(e.to_string().contains("request") || e.to_string().starts_with("memory table")),
            }
        }
    }
    let guest = guest.get(2..).unwrap_or(&[]);
    let Some((mem, _fd)) = memory(guest) else {
        return;
    };
    let addr = proto::VringAddr {
        index: 0,
        desc: UADDR,
        avail: UADDR + 0x100,
        used: UADDR + 0x200,
    };
    let Ok(ring) = Split::new(&mem, &addr, 16) else {
        panic!("the ring lies inside the region");
    };
    let avail = ring.avail_idx();
    let mut buf = [0u8; 2048];
    let frame = [0xabu8; 128];
    for i in 0..avail.min(512) {
        let head = ring.avail_entry(i);
        let hdr = if i % 2 == 0 { 12 } else { 10 };
        let _ = vring::read_chain(&ring, head, hdr, &mut buf);
        let size = usize::from(i % 128);
        if let Ok(n) = vring::write_chain(&ring, head, &[0; 12], &frame[..size]) {
            assert_eq!(n as usize, 12 + size);
        }
        ring.put_used(i, head, 0);
    }
    ring.set_used_idx(avail);
});
