//! A port backed by pcap files: it "receives" the packets of one file, in
//! order and as fast as it is polled, and writes what it transmits to another
//! (classic pcap, Ethernet link type, microsecond timestamps — what tcpdump and
//! tshark read). Either side may be absent.
//!
//! File I/O happens inside `rx_burst`/`tx_burst`/`kick`: this driver is for replaying
//! captures and recording output in tests and debugging, not for line rate.

use super::{LinkInfo, Port, PortError};
use crate::batch::Batch;
use crate::buf::PacketBuf;
use crate::pool::{Pool, PoolBuf};
use crate::stats::{DropReason, PortStats};
use crate::wire::MacAddr;
use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A pcap-file port.
pub struct PcapPort {
    info: LinkInfo,
    stats: Arc<PortStats>,
    pool: Pool,
    reader: Option<PcapReader<BufReader<File>>>,
    writer: Option<BufWriter<File>>,
    rx_errors: u64,
}

impl std::fmt::Debug for PcapPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapPort")
            .field("info", &self.info)
            .field("rx_done", &self.rx_done())
            .finish()
    }
}

impl PcapPort {
    /// Opens the port: replays `rx_pcap` (if any) into buffers from `pool`, and
    /// creates (truncating) `tx_pcap` (if any) for transmitted packets.
    pub fn open(
        name: &str,
        mac: MacAddr,
        rx_pcap: Option<&Path>,
        tx_pcap: Option<&Path>,
        pool: Pool,
    ) -> Result<PcapPort, PortError> {
        if rx_pcap.is_none() && tx_pcap.is_none() {
            return Err(PortError::BadConfig {
                port: name.to_string(),
                reason: "a pcap port needs rx_pcap, tx_pcap or both".into(),
            });
        }
        let open_err = |path: &Path, source| PortError::Open {
            port: name.to_string(),
            path: path.display().to_string(),
            source,
        };
        let bad = |path: &Path, reason: String| PortError::BadPcap {
            port: name.to_string(),
            path: path.display().to_string(),
            reason,
        };
        let reader = match rx_pcap {
            Some(path) => {
                let f = File::open(path).map_err(|e| open_err(path, e))?;
                let r = PcapReader::new(BufReader::new(f)).map_err(|e| bad(path, e.to_string()))?;
                let link = r.header().datalink;
                if link != DataLink::ETHERNET {
                    return Err(bad(path, format!("link type {link:?}, expected ethernet")));
                }
                Some(r)
            }
            None => None,
        };
        let writer = match tx_pcap {
            Some(path) => {
                let f = File::create(path).map_err(|e| open_err(path, e))?;
                let mut w = BufWriter::new(f);
                w.write_all(&global_header())
                    .map_err(|e| open_err(path, e))?;
                Some(w)
            }
            None => None,
        };
        Ok(PcapPort {
            info: LinkInfo::new(name, mac, "pcap"),
            stats: Arc::default(),
            pool,
            reader,
            writer,
            rx_errors: 0,
        })
    }

    /// True once the whole input file has been replayed (or there is none).
    pub fn rx_done(&self) -> bool {
        self.reader.is_none()
    }

    /// Records in the input that could not be read (the replay stops at the first).
    pub fn rx_errors(&self) -> u64 {
        self.rx_errors
    }

    /// Flushes the output file so readers see every transmitted packet.
    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

// Written here rather than with pcap-file's `PcapWriter`, which gives no way
// to flush its inner writer without consuming it; the format is two fixed
// little-endian headers.
const PCAP_MAGIC_US: u32 = 0xa1b2_c3d4;
const LINKTYPE_ETHERNET: u32 = 1;
const SNAPLEN: u32 = 65535;

fn global_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&PCAP_MAGIC_US.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

fn write_record(w: &mut BufWriter<File>, ts: Duration, data: &[u8]) -> std::io::Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(ts.as_secs() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&ts.subsec_micros().to_le_bytes());
    h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
    w.write_all(&h)?;
    w.write_all(data)
}

impl Drop for PcapPort {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl Port for PcapPort {
    type Buf = PoolBuf;

    fn info(&self) -> &LinkInfo {
        &self.info
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    fn rx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        let Some(reader) = self.reader.as_mut() else {
            return 0;
        };
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut finished = false;
        while !batch.is_full() {
            match reader.next_packet() {
                None => {
                    finished = true;
                    break;
                }
                Some(Err(_)) => {
                    // A truncated or corrupt record: nothing after it can be trusted.
                    self.rx_errors += 1;
                    finished = true;
                    break;
                }
                Some(Ok(rec)) => match self.pool.alloc_copy(&rec.data) {
                    Ok(buf) => {
                        bytes += buf.len() as u64;
                        n += 1;
                        let _ = batch.push(buf);
                    }
                    Err(crate::pool::PoolError::TooLarge { .. }) => {
                        self.stats.drops.add(DropReason::RxOversize, 1)
                    }
                    Err(_) => self.stats.drops.add(DropReason::RxNoBuffer, 1),
                },
            }
        }
        if finished {
            self.reader = None;
        }
        self.stats.count_rx(n, bytes);
        n as usize
    }

    fn tx_burst(&mut self, batch: &mut Batch<PoolBuf>) -> usize {
        let Some(writer) = self.writer.as_mut() else {
            // No output file: transmitting is like sending to a disconnected cable.
            let n = batch.len() as u64;
            batch.clear();
            self.stats.drops.add(DropReason::NoRoute, n);
            return 0;
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (mut sent, mut bytes, mut failed) = (0u64, 0u64, 0u64);
        for pkt in batch.drain() {
            let data = pkt.data();
            match write_record(writer, ts, data) {
                Ok(()) => {
                    sent += 1;
                    bytes += data.len() as u64;
                }
                Err(_) => failed += 1,
            }
        }
        self.stats.count_tx(sent, bytes);
        if failed > 0 {
            self.stats.drops.add(DropReason::TxIoError, failed);
        }
        sent as usize
    }

    /// Writes out what the file's buffer holds, so that readers of the
    /// output see the frames sent so far though no new ones come.
    fn kick(&mut self) {
        if let Some(w) = self.writer.as_mut()
            && !w.buffer().is_empty()
        {
            // A failed write keeps the records in the buffer, for the next
            // kick or burst; once the buffer has no room left, the records
            // a burst cannot write are counted `tx_io_error`.
            let _ = w.flush();
        }
    }
}
