//! The health service: every vnet's prober with the typed targets it probes,
//! and health changes applied to the VIPs they concern, in place.
//!
//! Owns: [`HealthService`] (one [`Prober`] per vnet and what each of its
//! targets is for), keeping the probed set equal to what the caller wants
//! ([`HealthService::sync`]: retired targets stop, new ones start down,
//! unchanged ones keep their state), and applying each change to its VIP's
//! backend set ([`crate::Vip::set_health`]: a new Maglev table, and only that
//! VIP's cached flows revalidated). It runs on the control thread, never on
//! a polling core; the caller passes the time and the VIPs of the moment.

use crate::balancer::{LbError, Vips};
use crate::probe::{DipHealth, ProbeSpec, Prober, SavedHealth, Target};
use dataplane::{BufAlloc, Port};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A probed backend's health as one process hands it to the next.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthRecord {
    /// The vnet's name.
    pub vnet: String,
    /// The VIP's address and port.
    pub vip: SocketAddr,
    /// The VIP's protocol.
    pub proto: u8,
    /// The backend's address and port.
    pub backend: SocketAddr,
    /// Its health.
    pub health: SavedHealth,
}

/// What a probe target is for: a backend of a VIP of a vnet, and how it is
/// probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The vnet's name (its index may change with the policy).
    pub vnet: String,
    /// The VIP's name.
    pub vip: String,
    /// The VIP's address, port and protocol.
    pub frontend: (IpAddr, u16, u8),
    /// The backend's address and port.
    pub backend: (Ipv4Addr, u16),
    /// How it is probed.
    pub spec: ProbeSpec,
}

impl ProbeTarget {
    /// Its name in logs, reports and errors: `vip "name" backend ip:port`.
    pub fn name(&self) -> String {
        format!(
            "vip {:?} backend {}:{}",
            self.vip, self.backend.0, self.backend.1
        )
    }
}

/// Why a health change or a sync could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The target's VIP or backend is no longer configured.
    #[error("{0}: no longer configured; health change not applied")]
    Gone(String),
    /// The VIP refused the change.
    #[error("{target}: health change not applied: {source}")]
    Lb {
        /// The target's name.
        target: String,
        /// The load balancer's error.
        source: LbError,
    },
    /// A target in a vnet that has no prober.
    #[error("{target}: vnet {vnet:?} has no prober")]
    NoProber {
        /// The target's name.
        target: String,
        /// The vnet.
        vnet: String,
    },
}

/// A health change the service saw, and what became of it.
#[derive(Debug)]
pub struct Applied {
    /// The target whose health changed.
    pub target: ProbeTarget,
    /// Its new health.
    pub up: bool,
    /// Why (the last probe's result: `ok`, `http 500`, `timeout`, ...).
    pub reason: String,
    /// Whether the VIP's backend set changed, or why it was not applied.
    pub result: Result<bool, HealthError>,
}

struct VnetProber<P: Port, A: BufAlloc<Buf = P::Buf>> {
    vnet: String,
    prober: Prober<P, A>,
    /// Per target, index as in the prober (retired ones stay, inactive).
    targets: Vec<ProbeTarget>,
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> VnetProber<P, A> {
    fn active(&self) -> impl Iterator<Item = (&ProbeTarget, &DipHealth)> {
        self.targets
            .iter()
            .enumerate()
            .filter(|(i, _)| self.prober.is_active(*i))
            .filter_map(|(i, t)| Some((t, self.prober.health(i)?)))
    }
}

/// Every vnet's prober and its targets.
pub struct HealthService<P: Port, A: BufAlloc<Buf = P::Buf>> {
    vnets: Vec<VnetProber<P, A>>,
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> Default for HealthService<P, A> {
    fn default() -> Self {
        HealthService { vnets: Vec::new() }
    }
}

impl<P: Port, A: BufAlloc<Buf = P::Buf>> HealthService<P, A> {
    /// A service with no prober.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives vnet `vnet` its prober (on the vnet's internal switch port).
    pub fn add_vnet(&mut self, vnet: &str, prober: Prober<P, A>) {
        self.vnets.push(VnetProber {
            vnet: vnet.to_string(),
            prober,
            targets: Vec::new(),
        });
    }

    /// Probes exactly `want` (each target with its backend's index in its
    /// VIP now): targets no longer wanted (backend gone, probe changed) are
    /// retired, new ones added (probed from scratch: down until their first
    /// success), unchanged ones keep their state. Nothing changes when a
    /// target's vnet has no prober.
    pub fn sync(
        &mut self,
        want: &[(ProbeTarget, usize)],
        now: Duration,
    ) -> Result<(), HealthError> {
        if let Some((t, _)) = want
            .iter()
            .find(|(t, _)| !self.vnets.iter().any(|v| v.vnet == t.vnet))
        {
            return Err(HealthError::NoProber {
                target: t.name(),
                vnet: t.vnet.clone(),
            });
        }
        for v in &mut self.vnets {
            let mine: Vec<&(ProbeTarget, usize)> =
                want.iter().filter(|(t, _)| t.vnet == v.vnet).collect();
            for (i, t) in v.targets.iter().enumerate() {
                if v.prober.is_active(i) && !mine.iter().any(|(w, _)| w == t) {
                    v.prober.retire(i);
                }
            }
            for (t, index) in mine {
                if v.active().any(|(have, _)| have == t) {
                    continue;
                }
                v.prober.add(
                    Target {
                        vip: t.frontend,
                        // Its index now; changes find the backend again by
                        // address, as the list may change.
                        backend: *index,
                        ip: t.backend.0,
                        spec: t.spec.clone(),
                    },
                    now,
                );
                v.targets.push(t.clone());
            }
        }
        Ok(())
    }

    /// Runs due probes and applies every health change to its VIP, found
    /// through `vips` (a vnet's VIPs by the vnet's name, as they are now) and
    /// its backend by address (API changes may have moved it in the list).
    pub fn poll<'v>(
        &mut self,
        now: Duration,
        vips: impl Fn(&str) -> Option<&'v Vips>,
    ) -> Vec<Applied> {
        let mut out = Vec::new();
        for v in &mut self.vnets {
            for c in v.prober.poll(now) {
                let Some(t) = v.targets.get(c.target) else {
                    continue;
                };
                let (addr, port, proto) = t.frontend;
                let result = vips(&v.vnet)
                    .and_then(|vs| vs.get(addr, port, proto))
                    .and_then(|vip| {
                        let b = vip.backend_index(IpAddr::V4(t.backend.0), t.backend.1)?;
                        Some(vip.set_health(b, c.up).map_err(|source| HealthError::Lb {
                            target: t.name(),
                            source,
                        }))
                    })
                    .unwrap_or_else(|| Err(HealthError::Gone(t.name())));
                out.push(Applied {
                    target: t.clone(),
                    up: c.up,
                    reason: c.reason,
                    result,
                });
            }
        }
        out
    }

    /// When the next probe is due (after `now`): the caller may sleep until
    /// then.
    pub fn poll_at(&mut self, now: Duration) -> Duration {
        self.vnets
            .iter_mut()
            .map(|v| v.prober.poll_at(now))
            .min()
            .unwrap_or(now + Duration::from_secs(1))
    }

    /// Every probed backend's health, for a successor process.
    pub fn export(&self) -> Vec<HealthRecord> {
        self.states()
            .map(|(t, h)| HealthRecord {
                vnet: t.vnet.clone(),
                vip: SocketAddr::new(t.frontend.0, t.frontend.1),
                proto: t.frontend.2,
                backend: SocketAddr::new(IpAddr::V4(t.backend.0), t.backend.1),
                health: h.into(),
            })
            .collect()
    }

    /// Takes in what a predecessor learnt ([`HealthService::export`]): each
    /// record of a target probed here sets its health, and the VIP's
    /// backend (found through `vips`, as [`HealthService::poll`] does) is
    /// set up or down to match. Returns how many records were taken.
    pub fn restore<'v>(
        &mut self,
        saved: &[HealthRecord],
        vips: impl Fn(&str) -> Option<&'v Vips>,
    ) -> usize {
        let mut n = 0;
        for r in saved {
            let IpAddr::V4(b) = r.backend.ip() else {
                continue;
            };
            let Some(v) = self.vnets.iter_mut().find(|v| v.vnet == r.vnet) else {
                continue;
            };
            let frontend = (r.vip.ip(), r.vip.port(), r.proto);
            let found = v.targets.iter().enumerate().find(|(i, t)| {
                v.prober.is_active(*i)
                    && t.frontend == frontend
                    && t.backend == (b, r.backend.port())
            });
            let Some((i, _)) = found else { continue };
            if !v.prober.restore_health(i, &r.health) {
                continue;
            }
            let set = vips(&v.vnet)
                .and_then(|vs| vs.get(frontend.0, frontend.1, frontend.2))
                .and_then(|vip| {
                    let bi = vip.backend_index(r.backend.ip(), r.backend.port())?;
                    vip.set_health(bi, r.health.up).ok()
                });
            if set.is_some() {
                n += 1;
            }
        }
        n
    }

    /// Every target probed now, with its health.
    pub fn states(&self) -> impl Iterator<Item = (&ProbeTarget, &DipHealth)> {
        self.vnets.iter().flat_map(|v| v.active())
    }
}
