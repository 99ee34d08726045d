//! A worker's switch state as one process hands it to the next (a hitless
//! upgrade): each vnet's load balancer core (connections, SNAT layout)
//! and the fragment table.
//! The flow cache is not carried: it is a cache of this state, rebuilt
//! by the first packets of each connection through the slow path; nor
//! are packets: parked SYN-proxy data, fragments held for their first.

use super::Switch;
use dataplane::PacketBuf;
use lb::handover::{CoreRecord, HandoverError, Imported};
use serde::{Deserialize, Serialize};

/// One vnet's load-balancer state on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnetRecord {
    /// The vnet's name (its place may differ in the next process).
    pub vnet: String,
    /// Its state.
    #[serde(flatten)]
    pub core: CoreRecord,
}

/// One worker's state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Per vnet.
    pub vnets: Vec<VnetRecord>,
    /// First fragments remembered, for their later fragments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frags: Vec<crate::frag::FragRecord>,
}

/// What a worker took in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerImport {
    /// Connections and what was left out.
    #[serde(flatten)]
    pub conns: Imported,
    /// Connections of vnets the configuration no longer has.
    pub vnet_gone: u64,
    /// Fragmented datagrams remembered.
    #[serde(default)]
    pub frags: u64,
}

impl<B: PacketBuf> Switch<B> {
    /// This switch's state, on a stopped worker.
    pub fn export_state(&self) -> WorkerRecord {
        let now = self.clock.ticks_to_ns(self.clock.now());
        let p = self.policy.load();
        WorkerRecord {
            vnets: self
                .lb
                .iter()
                .zip(p.vnets.iter())
                .map(|(l, v)| VnetRecord {
                    vnet: v.name.clone(),
                    core: l.export(now),
                })
                .collect(),
            frags: self.frags.export(now),
        }
    }

    /// Takes in `rec` (a predecessor's [`Switch::export_state`]) before the
    /// worker runs, against the current policy: vnets by name, VIPs and
    /// backends as [`lb::LbCore::import`] says. Refused (then this switch
    /// must not be used) when a vnet's SNAT layout does not fit or a table
    /// lacks room.
    pub fn import_state(&mut self, rec: &WorkerRecord) -> Result<WorkerImport, HandoverError> {
        let p = self.policy.load_full();
        self.on_new_generation(&p);
        let now = self.clock.ticks_to_ns(self.clock.now());
        let mut done = WorkerImport::default();
        for v in &rec.vnets {
            let Some(i) = p.vnets.iter().position(|x| x.name == v.vnet) else {
                done.vnet_gone += v.core.conns.len() as u64;
                continue;
            };
            let (Some(l), Some(vn)) = (self.lb.get_mut(i), p.vnets.get(i)) else {
                done.vnet_gone += v.core.conns.len() as u64;
                continue;
            };
            done.conns += l.import(&v.core, &vn.vips, now)?;
        }
        done.frags = self.frags.restore(&rec.frags, now) as u64;
        Ok(done)
    }
}
