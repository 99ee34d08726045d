//! Shared helpers for the switch tests: the in-process VMs of `vmsim`, and
//! a switch worker on a thread of its own.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub use vmsim::{Vm, run_until, vm_port};

/// A pool of normal pages for a test's VMs and ports.
pub fn pool(name: &str) -> dataplane::pool::Pool {
    vmsim::pool(name).unwrap()
}

/// A switch worker on its own thread; dropping it stops it and waits.
pub struct Running {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<dataplane::worker::WorkerHandle<dataplane::pool::PoolBuf, vswitch::Switch>>,
}

impl Running {
    /// Starts `worker` on a thread of its own.
    pub fn spawn(
        worker: dataplane::worker::Worker<dataplane::pool::PoolBuf, vswitch::Switch>,
    ) -> Running {
        let stop = worker.stop_flag();
        Running {
            stop,
            handle: Some(worker.spawn().unwrap()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
