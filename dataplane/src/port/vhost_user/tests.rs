//! The port against a front end written here from the specification (a
//! unix socket listener that sends the set-up messages, and a driver's
//! side of the rings in a memfd). The real front ends (QEMU guests with
//! Linux's virtio-net, DPDK's `virtio_user`) are in the root package's
//! tests `vm_vhost_user` and `pktgen`.

use super::proto::{self, req};
use super::vring::tests::{Driver, GPA, Guest};
use super::vring::{DESC_NEXT, DESC_WRITE};
use super::*;
use crate::pool::PoolConfig;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;

struct Front {
    sock: UnixStream,
    guest: Guest,
    rx: Driver,
    tx: Driver,
}

fn send(s: &mut UnixStream, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    send_flagged(s, code, 0, payload, fds);
}

/// [`send`] with header flags `flags` ([`proto::NEED_REPLY`]).
fn send_flagged(s: &mut UnixStream, code: u32, flags: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let m = proto::request_flagged(code, flags, payload);
    if fds.is_empty() {
        s.write_all(&m).unwrap();
    } else {
        // The descriptors ride with the header's first bytes.
        crate::port::fdpass::send_raw(s, &m, fds).unwrap();
    }
}

/// The next reply, which must be to request `code`.
fn reply(s: &mut UnixStream, code: u32) -> Vec<u8> {
    let mut h = [0u8; proto::HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_le_bytes(h[0..4].try_into().unwrap()),
        code,
        "the reply's request"
    );
    let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    assert_eq!(
        u32::from_le_bytes(h[4..8].try_into().unwrap()),
        5,
        "a reply, version 1"
    );
    let mut p = vec![0; size];
    s.read_exact(&mut p).unwrap();
    p
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn state(i: u32, n: u32) -> Vec<u8> {
    [i.to_le_bytes(), n.to_le_bytes()].concat()
}

fn eventfd() -> OwnedFd {
    // SAFETY: a plain call.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(raw >= 0);
    // SAFETY: just created, owned by nothing else.
    unsafe { crate::port::owned_fd(raw) }
}

impl Front {
    /// Accepts the port's connection and sets the device up as QEMU does:
    /// features, memory, both rings (size 8), enabled.
    fn accept(l: &UnixListener, call: &OwnedFd) -> Front {
        Self::accept_with(l, call, proto::FEATURES, 0)
    }

    /// As `accept`, choosing `features` (without protocol features the
    /// rings are not enabled by message: they run once kicked).
    /// Its rings begin at entry `start` (a guest's driver that goes on
    /// with rings it used before: their indexes in its memory, the base
    /// said too).
    fn accept_with(l: &UnixListener, call: &OwnedFd, features: u64, start: u16) -> Front {
        Self::accept_choosing(l, call, features, start, 0)
    }

    /// As `accept_with`, choosing protocol features `protocol` too.
    fn accept_choosing(
        l: &UnixListener,
        call: &OwnedFd,
        features: u64,
        start: u16,
        protocol: u64,
    ) -> Front {
        let mut sock = accept_within(l);
        send(&mut sock, req::GET_FEATURES, &[], &[]);
        let f = u64::from_le_bytes(reply(&mut sock, req::GET_FEATURES).try_into().unwrap());
        assert_eq!(f, proto::FEATURES);
        send(&mut sock, req::GET_PROTOCOL_FEATURES, &[], &[]);
        assert_eq!(
            reply(&mut sock, req::GET_PROTOCOL_FEATURES),
            proto::PROTOCOL_FEATURES.to_le_bytes()
        );
        if protocol != 0 {
            send(
                &mut sock,
                req::SET_PROTOCOL_FEATURES,
                &u64s(&[protocol]),
                &[],
            );
        }
        send(&mut sock, req::SET_OWNER, &[], &[]);
        send(&mut sock, req::SET_FEATURES, &u64s(&[features]), &[]);
        let f = features;
        let guest = Guest::new(1 << 20);
        let r = guest.region;
        let mut table = vec![1, 0, 0, 0, 0, 0, 0, 0];
        table.extend(u64s(&[r.gpa, r.size, r.uaddr, r.mmap_offset]));
        send(&mut sock, req::SET_MEM_TABLE, &table, &[guest.fd.as_fd()]);
        let mut rx = Driver::new(0, 0x8000, 8);
        let mut tx = Driver::new(1, 0x9000, 8);
        for d in [&mut rx, &mut tx] {
            d.next_avail = start;
            d.last_used = start;
            guest.write(d.avail_off() + 2, &start.to_le_bytes());
            guest.write(d.used_off() + 2, &start.to_le_bytes());
        }
        for d in [&rx, &tx] {
            let a = d.addr();
            send(&mut sock, req::SET_VRING_NUM, &state(d.index, 8), &[]);
            let mut addr = state(d.index, 0);
            addr.extend(u64s(&[a.desc, a.used, a.avail, 0]));
            send(&mut sock, req::SET_VRING_ADDR, &addr, &[]);
            send(
                &mut sock,
                req::SET_VRING_BASE,
                &state(d.index, u32::from(start)),
                &[],
            );
            send(
                &mut sock,
                req::SET_VRING_CALL,
                &u64s(&[u64::from(d.index)]),
                &[call.as_fd()],
            );
            send(
                &mut sock,
                req::SET_VRING_KICK,
                &u64s(&[u64::from(d.index)]),
                &[call.as_fd()],
            );
            if f & proto::F_PROTOCOL_FEATURES != 0 {
                send(&mut sock, req::SET_VRING_ENABLE, &state(d.index, 1), &[]);
            }
        }
        Front {
            sock,
            guest,
            rx,
            tx,
        }
    }
}

/// A socket path of its own for a test, removed afterwards.
struct Sock(PathBuf);

impl Sock {
    fn new(name: &str) -> Sock {
        let p = std::env::temp_dir().join(format!("pollux-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Sock(p)
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The port's next connection to `l`, within 10 s.
fn accept_within(l: &UnixListener) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the port did not connect");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Runs `f` (the front end's side) on a thread of its own while the test,
/// the port's worker, polls the port: the port waits for its worker to let
/// go of the rings it replaces.
fn polling<T: Send>(port: &mut VhostUserPort, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|sc| {
        let t = sc.spawn(f);
        let mut b = Batch::new();
        while !t.is_finished() {
            port.rx_burst(&mut b);
        }
        t.join().unwrap()
    })
}

/// Accepts the port's connection and sets it up (`Front::accept`) while
/// the port is polled.
fn accept_polling(port: &mut VhostUserPort, l: &UnixListener, call: &OwnedFd) -> Front {
    polling(port, || Front::accept(l, call))
}

/// [`accept_polling`] with `REPLY_ACK` chosen.
fn accept_polling_ack(port: &mut VhostUserPort, l: &UnixListener, call: &OwnedFd) -> Front {
    polling(port, || {
        Front::accept_choosing(l, call, proto::FEATURES, 0, proto::PF_REPLY_ACK)
    })
}

impl Front {
    /// The guest sends `frame` behind a zero virtio-net header of `hdr`
    /// bytes, in one descriptor (0) at 0x1000.
    fn transmit(&mut self, hdr: usize, frame: &[u8]) {
        let mut buf = vec![0u8; hdr];
        buf.extend_from_slice(frame);
        self.guest.write(0x1000, &buf);
        self.tx
            .set_desc(&self.guest, 0, GPA + 0x1000, buf.len() as u32, 0, 0);
        self.tx.offer(&self.guest, 0);
    }
}

fn pool() -> Pool {
    Pool::new(&PoolConfig::new("vhost-test", 64)).unwrap()
}

fn until(port: &mut VhostUserPort, what: &str, mut f: impl FnMut(&mut VhostUserPort) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(port) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn link_up(port: &mut VhostUserPort) -> bool {
    let mut b = Batch::new();
    port.rx_burst(&mut b);
    port.stats.link.as_ref().is_some_and(|l| l.is_up())
}

#[test]
fn frames_cross_the_rings_both_ways_and_the_device_comes_back_after_its_front_end() {
    let sock = Sock::new("vhost-port");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    let pool = pool();
    let mut port = VhostUserPort::open("vm1", &path, MacAddr([2, 0, 0, 0, 0, 1]), pool).unwrap();
    // No front end yet: what it would send is dropped as link_down.
    let mut b = Batch::new();
    b.push(pool.alloc_copy(&[1; 60]).unwrap()).unwrap();
    assert_eq!(port.tx_burst(&mut b), 0);
    assert_eq!(port.stats.drops.get(DropReason::LinkDown), 1);

    let call = eventfd();
    let mut f = accept_polling(&mut port, &l, &call);
    until(&mut port, "the link", link_up);

    // The guest sends: a header and a frame in one descriptor.
    let frame: Vec<u8> = (0..80u8).collect();
    f.transmit(12, &frame);
    let mut got = Batch::new();
    until(&mut port, "the frame", |p| p.rx_burst(&mut got) == 1);
    assert_eq!(got.as_slice()[0].data(), &frame[..]);
    assert_eq!(f.tx.take_used(&f.guest), vec![(0, 0)]);
    // The device asked for no kicks, and interrupted the guest (whose
    // driver did not turn interrupts off).
    assert_eq!(f.guest.u16_at(f.tx.used_off()), 1);
    let mut n = [0u8; 8];
    assert_eq!(
        // SAFETY: an 8-byte read into a live buffer from a live eventfd.
        unsafe { libc::read(call.as_raw_fd(), n.as_mut_ptr().cast(), 8) },
        8
    );

    // The guest receives: a buffer of two descriptors; then a burst of
    // three frames finds it alone, and two are dropped as the ring is full.
    f.rx.set_avail_flags(&f.guest, 1);
    f.rx.set_desc(&f.guest, 2, GPA + 0x2000, 40, DESC_WRITE | DESC_NEXT, 3);
    f.rx.set_desc(&f.guest, 3, GPA + 0x3000, 2048, DESC_WRITE, 0);
    f.rx.offer(&f.guest, 2);
    let mut out = Batch::new();
    for k in 0..3u8 {
        out.push(pool.alloc_copy(&[k; 100]).unwrap()).unwrap();
    }
    assert_eq!(port.tx_burst(&mut out), 1);
    assert_eq!(port.stats.drops.get(DropReason::TxQueueFull), 2);
    assert_eq!(f.rx.take_used(&f.guest), vec![(2, 112)]);
    let mut hdr = vec![0u8; 12];
    hdr[10] = 1;
    assert_eq!(f.guest.read(0x2000, 12), hdr);
    assert_eq!(f.guest.read(0x2000 + 12, 28), vec![0; 28]);
    assert_eq!(f.guest.read(0x3000, 72), vec![0; 72]);
    // (The driver turned interrupts off for that ring: none came.)
    assert_eq!(
        // SAFETY: as above; the eventfd is non-blocking.
        unsafe { libc::read(call.as_raw_fd(), n.as_mut_ptr().cast(), 8) },
        -1
    );

    // A chain pointing outside guest memory is returned unused, counted.
    f.tx.set_desc(&f.guest, 1, GPA + (4 << 20), 100, 0, 0);
    f.tx.offer(&f.guest, 1);
    let mut none = Batch::new();
    until(&mut port, "the bad chain", |p| {
        p.rx_burst(&mut none);
        p.stats.drops.get(DropReason::BadDescriptor) == 1
    });
    assert!(none.is_empty());
    assert_eq!(f.tx.take_used(&f.guest), vec![(1, 0)]);

    // GET_VRING_BASE stops the ring and says where the device stands,
    // while the worker polls on.
    let base = polling(&mut port, || {
        send(&mut f.sock, req::GET_VRING_BASE, &state(1, 0), &[]);
        reply(&mut f.sock, req::GET_VRING_BASE)
    });
    assert_eq!(base, state(1, 2));
    until(&mut port, "the link down", |p| !link_up(p));

    // The front end goes away; the port connects again, and the new
    // device starts where its used index is (a driver going on with rings
    // it used before: entry 5).
    drop(f);
    until(&mut port, "the rings let go", |p| {
        p.rx_burst(&mut none);
        p.shared.active.lock().unwrap().is_none()
    });
    let mut f = polling(&mut port, || {
        Front::accept_with(&l, &call, proto::FEATURES, 5)
    });
    until(&mut port, "the link again", link_up);
    f.transmit(12, &frame);
    let mut again = Batch::new();
    until(&mut port, "a frame after reconnecting", |p| {
        p.rx_burst(&mut again) == 1
    });
    assert_eq!(again.as_slice()[0].data(), &frame[..]);
    assert_eq!(f.tx.take_used(&f.guest), vec![(0, 0)]);
    assert_eq!(f.guest.u16_at(f.tx.used_off() + 2), 6);
}

#[test]
fn a_guest_offering_more_than_its_ring_stops_that_ring() {
    let sock = Sock::new("vhost-port-bad");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    let mut port = VhostUserPort::open("vm2", &path, MacAddr::ZERO, pool()).unwrap();
    let call = eventfd();
    let f = accept_polling(&mut port, &l, &call);
    until(&mut port, "the link", link_up);
    // An available index 100 entries ahead of an 8-entry ring.
    f.guest.write(f.tx.avail_off() + 2, &100u16.to_le_bytes());
    let mut b = Batch::new();
    for _ in 0..10 {
        assert_eq!(port.rx_burst(&mut b), 0);
    }
    assert_eq!(port.stats.drops.get(DropReason::BadDescriptor), 1);
    // A new call descriptor publishes the rings again: the broken ring
    // stays stopped, and is not counted again.
    let mut f = f;
    let other = eventfd();
    polling(&mut port, || {
        send(
            &mut f.sock,
            req::SET_VRING_CALL,
            &u64s(&[0]),
            &[other.as_fd()],
        );
        // (A reply-bearing request after it: the call was applied.)
        send(&mut f.sock, req::GET_FEATURES, &[], &[]);
        reply(&mut f.sock, req::GET_FEATURES)
    });
    for _ in 0..10 {
        assert_eq!(port.rx_burst(&mut b), 0);
    }
    assert_eq!(port.stats.drops.get(DropReason::BadDescriptor), 1);
}

#[test]
fn a_front_end_asking_for_what_is_not_offered_is_dropped() {
    let sock = Sock::new("vhost-port-refused");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    let mut port = VhostUserPort::open("vm3", &path, MacAddr::ZERO, pool()).unwrap();
    let mut s = accept_within(&l);
    // Features never offered (VIRTIO_NET_F_CSUM): the connection ends.
    send(&mut s, req::SET_FEATURES, &u64s(&[1]), &[]);
    let mut one = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        s.read(&mut one).unwrap(),
        0,
        "the port closes the connection"
    );
    // It connects again.
    let _s2 = accept_within(&l);
    let mut b = Batch::new();
    assert_eq!(port.rx_burst(&mut b), 0);
}

#[test]
fn a_legacy_front_end_gets_running_rings_and_the_10_byte_header() {
    let sock = Sock::new("vhost-port-legacy");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    let pool = pool();
    let mut port = VhostUserPort::open("vm4", &path, MacAddr::ZERO, pool).unwrap();
    let call = eventfd();
    // Neither VERSION_1 nor protocol features: no SET_VRING_ENABLE comes.
    let mut f = polling(&mut port, || Front::accept_with(&l, &call, 0, 0));
    until(&mut port, "the link", link_up);
    let frame: Vec<u8> = (0..60u8).collect();
    f.transmit(10, &frame);
    let mut got = Batch::new();
    until(&mut port, "the frame", |p| p.rx_burst(&mut got) == 1);
    assert_eq!(got.as_slice()[0].data(), &frame[..]);
    f.rx.set_desc(&f.guest, 0, GPA + 0x2000, 2048, DESC_WRITE, 0);
    f.rx.offer(&f.guest, 0);
    let mut out = Batch::new();
    out.push(pool.alloc_copy(&frame).unwrap()).unwrap();
    assert_eq!(port.tx_burst(&mut out), 1);
    assert_eq!(f.rx.take_used(&f.guest), vec![(0, 70)]);
    assert_eq!(f.guest.read(0x2000, 10), vec![0; 10]);
    assert_eq!(f.guest.read(0x2000 + 10, 60), frame);
}

#[test]
fn a_disabled_ring_has_what_the_guest_sends_discarded_and_the_link_down() {
    let sock = Sock::new("vhost-port-disabled");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    let pool = pool();
    let mut port = VhostUserPort::open("vm5", &path, MacAddr::ZERO, pool).unwrap();
    let call = eventfd();
    let mut f = accept_polling(&mut port, &l, &call);
    until(&mut port, "the link", link_up);
    polling(&mut port, || {
        send(&mut f.sock, req::SET_VRING_ENABLE, &state(1, 0), &[])
    });
    until(&mut port, "the link down", |p| !link_up(p));
    f.transmit(12, &[0u8; 60]);
    let mut got = Batch::new();
    until(&mut port, "the frame taken back", |p| {
        p.rx_burst(&mut got);
        p.stats.drops.get(DropReason::LinkDown) == 1
    });
    assert!(got.is_empty());
    assert_eq!(f.tx.take_used(&f.guest), vec![(0, 0)]);
}

#[test]
fn a_front_end_that_accepts_nothing_holds_neither_the_port_nor_its_drop() {
    let sock = Sock::new("vhost-port-full");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    // A backlog of none: one connection waits, the next finds it full.
    // SAFETY: listen(2) on the listener's live descriptor.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // A listener that accepts nothing (a stopped QEMU): each connect
    // completes at once until its backlog is full, then is refused at once
    // (a blocking connect would wait there for good).
    let mut fillers = Vec::new();
    loop {
        match connect(&path) {
            Ok(c) => fillers.push(c),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                break;
            }
        }
        assert!(fillers.len() < 100_000, "the backlog never filled");
    }
    // A port on it, dropped once its control thread has been refused a few
    // times: the drop, which joins that thread, returns.
    let port = VhostUserPort::open("vm6", &path, MacAddr::ZERO, pool()).unwrap();
    std::thread::sleep(RETRY * 3);
    let (done, dropped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(port);
        let _ = done.send(());
    });
    dropped
        .recv_timeout(Duration::from_secs(10))
        .expect("the port's drop returns while the front end accepts nothing");
    // Another port connects once the listener takes what is waiting: its
    // connection is the one after the fillers'.
    let _port = VhostUserPort::open("vm7", &path, MacAddr::ZERO, pool()).unwrap();
    std::thread::sleep(RETRY * 3);
    let n = fillers.len();
    for _ in 0..n {
        accept_within(&l);
    }
    // The next is the port's: it answers as a vhost-user back end.
    let mut mine = accept_within(&l);
    mine.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    send(&mut mine, req::GET_FEATURES, &[], &[]);
    let features = reply(&mut mine, req::GET_FEATURES);
    assert_eq!(features, proto::FEATURES.to_le_bytes());
}

#[test]
fn with_reply_ack_a_refused_request_is_answered_and_the_device_goes_on_as_it_was() {
    let sock = Sock::new("vhost-port-ack");
    let path = sock.0.clone();
    let l = UnixListener::bind(&path).unwrap();
    let pool = pool();
    let mut port = VhostUserPort::open("vm8", &path, MacAddr::ZERO, pool).unwrap();
    let call = eventfd();
    let mut f = accept_polling_ack(&mut port, &l, &call);
    until(&mut port, "the link", link_up);
    let acked = |s: &mut UnixStream, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]| {
        send_flagged(s, code, proto::NEED_REPLY, payload, fds);
        u64::from_le_bytes(reply(s, code).try_into().unwrap())
    };
    let refused = polling(&mut port, || {
        let s = &mut f.sock;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Protocol features never offered; a memory region past the end of
        // its file; a ring size that is no power of two: each refused and
        // answered so, the connection kept.
        let features = acked(s, req::SET_PROTOCOL_FEATURES, &u64s(&[1 << 1]), &[]);
        let other = Guest::new(1 << 20);
        let r = other.region;
        let mut bad = vec![1, 0, 0, 0, 0, 0, 0, 0];
        bad.extend(u64s(&[r.gpa, r.size * 2, r.uaddr, r.mmap_offset]));
        let mem = acked(s, req::SET_MEM_TABLE, &bad, &[other.fd.as_fd()]);
        let num = acked(s, req::SET_VRING_NUM, &state(1, 6), &[]);
        // A request with a reply of its own, flagged: that reply alone
        // (the next request's reply comes next, no acknowledgement between).
        send_flagged(s, req::GET_FEATURES, proto::NEED_REPLY, &[], &[]);
        let features_reply = reply(s, req::GET_FEATURES);
        send(s, req::GET_QUEUE_NUM, &[], &[]);
        let queues = reply(s, req::GET_QUEUE_NUM);
        // A request done: acknowledged 0.
        let enabled = acked(s, req::SET_VRING_ENABLE, &state(1, 1), &[]);
        (features, mem, num, features_reply, queues, enabled)
    });
    assert_ne!(refused.0, 0, "unoffered protocol features refused");
    assert_ne!(refused.1, 0, "a region past its file refused");
    assert_ne!(refused.2, 0, "a ring size of 6 refused");
    assert_eq!(refused.3, proto::FEATURES.to_le_bytes());
    assert_eq!(refused.4, 1u64.to_le_bytes());
    assert_eq!(refused.5, 0);
    // Nothing refused was applied: the guest's memory and its transmit
    // ring (size 8) are as they were, and a frame crosses.
    f.transmit(12, &[7u8; 60]);
    let mut got = Batch::new();
    until(&mut port, "the guest's frame", |p| {
        p.rx_burst(&mut got);
        !got.is_empty()
    });
    assert_eq!(got.iter().next().unwrap().data(), &[7u8; 60][..]);
}
