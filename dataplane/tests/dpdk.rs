//! The DPDK port and mbufs (feature `dpdk`): EAL with no huge pages and no
//! PCI, a `net_ring` vdev probed at run time (its transmit ring is its
//! receive ring), frames sent and received as mbufs through `Port`, the
//! switch's header code run on mbufs, and every mbuf back in the pool at the
//! end. EAL starts once per process, so this file holds one test.
#![cfg(feature = "dpdk")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dataplane::port::dpdk::{DpdkError, DpdkPort, Eal, Mbuf, Mempool};
use dataplane::rewrite::Transpose4;
use dataplane::{Batch, PacketBuf, Port, parse};
use std::net::Ipv4Addr;

fn udp(i: u8) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, i], [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])
        .ipv4([10, 1, 0, i], [10, 1, 0, 100], 64)
        .udp(4000 + u16::from(i), 80)
        .write(&mut f, &[i; 18])
        .unwrap();
    f
}

#[test]
fn mbufs_through_a_dpdk_port() {
    let args: Vec<String> = [
        "--no-huge",
        "--no-pci",
        "-m",
        "256",
        "-l",
        "0",
        "--log-level=error",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--file-prefix=pollux-dp-{}", std::process::id())])
    .collect();
    let eal = Eal::init(&args).unwrap();
    // Once per process: the same arguments give the same EAL, others are refused.
    assert_eq!(Eal::init(&args).unwrap(), eal);
    assert!(matches!(
        Eal::init(&["--no-pci".to_string()]),
        Err(DpdkError::AlreadyRunning { .. })
    ));
    let pool = Mempool::new(&eal, "dp_test", 1023, 2176, -1).unwrap();
    let full = pool.available();
    let e = DpdkPort::open(&eal, "bad", "net_nosuchdriver0", pool).unwrap_err();
    assert!(
        e.to_string()
            .contains("port \"bad\": device \"net_nosuchdriver0\" could not be probed"),
        "{e}"
    );
    // A thread of pollux's own (no EAL lcore) becomes one at its first
    // allocation or burst, so the pool's per-lcore cache serves it; its id
    // is given back when it ends (the next such thread gets the same).
    let own_thread = move || {
        std::thread::spawn(move || {
            let before = dataplane::port::dpdk::lcore_id();
            let m = pool.alloc().unwrap();
            let after = dataplane::port::dpdk::lcore_id();
            drop(m);
            (before, after)
        })
        .join()
        .unwrap()
    };
    let (before, after) = own_thread();
    assert_eq!(before, None);
    assert!(after.is_some_and(|id| id != 0), "{after:?}");
    assert_eq!(own_thread(), (None, after));
    assert_eq!(
        dataplane::port::dpdk::lcore_id(),
        Some(0),
        "the EAL's own thread"
    );
    let mut port = DpdkPort::open(&eal, "loop", "net_ring0", pool).unwrap();
    assert_eq!(port.info().driver, "dpdk");

    // PacketBuf on an mbuf: room at both ends, and the edits move them.
    let mut m: Mbuf = pool.alloc().unwrap();
    assert_eq!((m.len(), m.headroom()), (0, 128));
    let room = m.tailroom();
    m.append(10).unwrap().copy_from_slice(b"0123456789");
    m.prepend(4).unwrap().copy_from_slice(b"head");
    assert_eq!(m.data(), b"head0123456789");
    m.adj(4).unwrap();
    m.trim(4).unwrap();
    assert_eq!((m.data(), m.tailroom()), (&b"012345"[..], room - 6));
    assert!(m.append(room).is_err() && m.prepend(4096).is_err() && m.trim(7).is_err());
    m.reset();
    assert_eq!(m.len(), 0);
    drop(m);

    // A burst out and back in, rewritten on the way as the switch would.
    let mut tx = Batch::new();
    for i in 0..32u8 {
        let mut m = pool.alloc().unwrap();
        let f = udp(i);
        m.append(f.len()).unwrap().copy_from_slice(&f);
        let p = parse(m.data(), 0).unwrap();
        let t =
            Transpose4::compile(&p.key, None, Some((Ipv4Addr::new(10, 1, 0, 4), 8080))).unwrap();
        t.apply(m.data_mut(), &p).unwrap();
        tx.push(m).unwrap();
    }
    assert_eq!(port.tx_burst(&mut tx), 32);
    let mut rx = Batch::new();
    assert_eq!(port.rx_burst(&mut rx), 32);
    for (i, m) in rx.drain().enumerate() {
        let p = parse(m.data(), 0).unwrap();
        assert_eq!(p.key.dst(), std::net::IpAddr::from([10, 1, 0, 4]));
        assert_eq!((p.key.src_port, p.key.dst_port), (4000 + i as u16, 8080));
        let s = etherparse::SlicedPacket::from_ethernet(m.data()).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!()
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(h.time_to_live, 63);
    }
    let st = port.stats().snapshot();
    assert_eq!((st.tx_packets, st.rx_packets, st.drops), (32, 32, 0));
    // The device's own view: link up, and its queue counters agree.
    assert!(port.link().0, "net_ring reports its link up once started");
    assert_eq!(port.queue_stats(), (32, 32));
    drop(port);
    // Nothing leaked: every mbuf is back.
    assert_eq!(pool.available(), full);
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/pollux-dp-{}", std::process::id()));
}
