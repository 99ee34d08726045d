//! ABI smoke test: EAL on a `net_ring` vdev (its transmit ring is its
//! receive ring), a mempool, one port started, and a burst sent and received
//! through the bindings and the C shim, contents checked.
#![cfg(feature = "link")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use dpdk_sys as d;
use std::ffi::CString;

/// Huge pages when hugetlbfs is mounted with enough free pages (always
/// under CI, where scripts/test.sh sets that up as root and
/// `testkit::require` fails the test without them); elsewhere `--no-huge`
/// when they are missing.
fn memory_args() -> [&'static str; 2] {
    use testkit::require::{self, Need};
    let needs = [Need::Hugetlbfs, Need::HugePages(128)];
    let have = if require::strict() {
        require::met(&needs)
    } else {
        require::is_root()
            && require::free_huge_pages() >= 128
            && std::fs::read_to_string("/proc/mounts")
                .is_ok_and(|m| m.lines().any(|l| l.contains(" hugetlbfs ")))
    };
    if have {
        ["--huge-unlink", "--in-memory"]
    } else {
        ["--no-huge", "--no-pci"]
    }
}

#[test]
fn a_burst_round_trips_through_net_ring() {
    let prefix = format!("--file-prefix=pollux-abi-{}", std::process::id());
    let [m1, m2] = memory_args();
    eprintln!("EAL memory: {m1} {m2}");
    let args = [
        "pollux-abi",
        m1,
        m2,
        "--no-pci",
        "-m",
        "128",
        "-l",
        "0",
        "--vdev=net_ring0",
        "--log-level=error",
        prefix.as_str(),
    ];
    let c: Vec<CString> = args.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut argv: Vec<*mut std::os::raw::c_char> =
        c.iter().map(|a| a.as_ptr().cast_mut()).collect();
    // SAFETY: argv holds valid NUL-terminated strings that outlive the call.
    let r = unsafe { d::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
    // SAFETY: reads DPDK's thread-local errno through the shim.
    assert!(r >= 0, "rte_eal_init failed: errno {}", unsafe {
        d::pollux_errno()
    });
    // SAFETY: EAL is initialised.
    assert_eq!(unsafe { d::rte_eth_dev_count_avail() }, 1);
    let name = CString::new("abi_pool").unwrap();
    // SAFETY: EAL is initialised; the name is a valid C string.
    let pool = unsafe {
        d::rte_pktmbuf_pool_create(
            name.as_ptr(),
            1023,
            0,
            0,
            d::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
            -1,
        )
    };
    assert!(!pool.is_null());
    let conf = d::rte_eth_conf::default();
    // SAFETY: port 0 exists; `conf` and `pool` are valid for the calls.
    unsafe {
        assert_eq!(d::rte_eth_dev_configure(0, 1, 1, &conf), 0);
        assert_eq!(
            d::rte_eth_rx_queue_setup(0, 0, 128, 0, std::ptr::null(), pool),
            0
        );
        assert_eq!(d::rte_eth_tx_queue_setup(0, 0, 128, 0, std::ptr::null()), 0);
        assert_eq!(d::rte_eth_dev_start(0), 0);
    }
    let mut out: [*mut d::rte_mbuf; 32] = [std::ptr::null_mut(); 32];
    // SAFETY: `out` has room for 32 mbufs.
    let r = unsafe { d::pollux_pktmbuf_alloc_bulk(pool, out.as_mut_ptr(), 32) };
    assert_eq!(r, 0);
    for (i, m) in out.iter().enumerate() {
        // SAFETY: `m` is a fresh mbuf; append returns room for 64 bytes in it.
        unsafe {
            let p = d::pollux_pktmbuf_append(*m, 64);
            assert!(!p.is_null());
            std::ptr::write_bytes(p.cast::<u8>(), i as u8, 64);
            assert_eq!((**m).data_len, 64);
        }
    }
    // SAFETY: port 0 queue 0 is started; the mbufs belong to us until sent.
    let sent = unsafe { d::pollux_tx_burst(0, 0, out.as_mut_ptr(), 32) };
    assert_eq!(sent, 32);
    let mut got: [*mut d::rte_mbuf; 32] = [std::ptr::null_mut(); 32];
    // SAFETY: `got` has room for 32 mbufs.
    let n = unsafe { d::pollux_rx_burst(0, 0, got.as_mut_ptr(), 32) };
    assert_eq!(n, 32);
    for (i, m) in got.iter().take(n as usize).enumerate() {
        // SAFETY: a received mbuf: its data is `data_len` bytes at
        // `buf_addr + data_off` (rte_pktmbuf_mtod is a macro).
        unsafe {
            let m = &**m;
            assert_eq!(m.data_len, 64);
            let data = std::slice::from_raw_parts(
                m.buf_addr.cast::<u8>().add(usize::from(m.data_off)),
                64,
            );
            assert!(data.iter().all(|&b| b == i as u8), "mbuf {i}: {data:?}");
            d::pollux_pktmbuf_free(got[i]);
        }
    }
    // SAFETY: the port was started above; EAL is torn down last.
    unsafe {
        let mut st = d::rte_eth_stats::default();
        assert_eq!(d::rte_eth_stats_get(0, &mut st), 0);
        assert_eq!((st.opackets, st.ipackets), (32, 32));
        assert_eq!(d::rte_eth_dev_stop(0), 0);
        d::rte_eal_cleanup();
    }
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/pollux-abi-{}", std::process::id()));
}
