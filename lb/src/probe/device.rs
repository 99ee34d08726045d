//! A smoltcp `Device` over a dataplane [`Port`]: what lets a smoltcp stack
//! (the prober, or an in-process VM) send and receive through pollux ports.

use dataplane::pool::Pool;
use dataplane::{Batch, BufAlloc, PacketBuf, Port};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::collections::VecDeque;

/// A smoltcp device over port `P`, transmitting from buffers of `pool`
/// (pollux's pool buffers, or DPDK mbufs from a mempool).
pub struct PortDevice<P: Port, A: BufAlloc<Buf = P::Buf> = Pool> {
    port: P,
    pool: A,
    rxq: VecDeque<P::Buf>,
    tx: Batch<P::Buf>,
    scratch: Vec<u8>,
    tx_no_buffer: u64,
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> PortDevice<P, A> {
    /// Wraps `port`; transmitted frames are built in buffers from `pool`.
    pub fn new(port: P, pool: A) -> Self {
        PortDevice {
            port,
            pool,
            rxq: VecDeque::with_capacity(dataplane::BURST),
            tx: Batch::new(),
            scratch: vec![0; 2048],
            tx_no_buffer: 0,
        }
    }

    /// Sends what smoltcp queued, and offers the port again what it did
    /// not take before ([`Port::kick`]). Call after every `Interface::poll`.
    pub fn flush(&mut self) {
        if !self.tx.is_empty() {
            self.port.tx_burst(&mut self.tx);
        }
        self.port.kick();
    }

    /// The port.
    pub fn port(&self) -> &P {
        &self.port
    }

    /// The port, mutable (to inject frames beside the stack, in tests).
    pub fn port_mut(&mut self) -> &mut P {
        &mut self.port
    }

    /// The pool transmit buffers come from.
    pub fn pool(&self) -> A {
        self.pool
    }

    /// Frames smoltcp wanted to send while the pool was empty (dropped).
    pub fn tx_no_buffer(&self) -> u64 {
        self.tx_no_buffer
    }
}

/// A received frame.
pub struct PortRx<B>(B);

impl<B: PacketBuf> phy::RxToken for PortRx<B> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.0.data())
    }
}

/// Room for one frame to transmit.
pub struct PortTx<'a, P: Port, A: BufAlloc<Buf = P::Buf>> {
    port: &'a mut P,
    pool: &'a A,
    tx: &'a mut Batch<P::Buf>,
    scratch: &'a mut Vec<u8>,
    tx_no_buffer: &'a mut u64,
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> phy::TxToken for PortTx<'_, P, A> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let buf = self.pool.alloc_buf().and_then(|mut b| match b.append(len) {
            Ok(_) => Some(b),
            Err(_) => None,
        });
        match buf {
            Some(mut b) => {
                let r = f(b.data_mut());
                if let Err(b) = self.tx.push(b) {
                    self.port.tx_burst(self.tx);
                    let _ = self.tx.push(b);
                }
                r
            }
            None => {
                // No buffer: let smoltcp write into scratch space and drop it,
                // as a NIC drops on a full ring; TCP retransmits.
                *self.tx_no_buffer += 1;
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0);
                }
                f(&mut self.scratch[..len])
            }
        }
    }
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> phy::Device for PortDevice<P, A> {
    type RxToken<'a>
        = PortRx<P::Buf>
    where
        Self: 'a;
    type TxToken<'a>
        = PortTx<'a, P, A>
    where
        Self: 'a;

    fn receive(&mut self, _ts: Instant) -> Option<(PortRx<P::Buf>, PortTx<'_, P, A>)> {
        if self.rxq.is_empty() {
            let mut b = Batch::new();
            self.port.rx_burst(&mut b);
            self.rxq.extend(b.drain());
        }
        let pkt = self.rxq.pop_front()?;
        Some((
            PortRx(pkt),
            PortTx {
                port: &mut self.port,
                pool: &self.pool,
                tx: &mut self.tx,
                scratch: &mut self.scratch,
                tx_no_buffer: &mut self.tx_no_buffer,
            },
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<PortTx<'_, P, A>> {
        Some(PortTx {
            port: &mut self.port,
            pool: &self.pool,
            tx: &mut self.tx,
            scratch: &mut self.scratch,
            tx_no_buffer: &mut self.tx_no_buffer,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(self.port.info().mtu) + 14;
        caps.max_burst_size = Some(dataplane::BURST);
        caps
    }
}
