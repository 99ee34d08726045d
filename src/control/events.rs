//! Control-plane events the control loop notices itself and logs: a
//! port's link going up or down, and a periodic summary of the packets
//! dropped, by reason (`[dataplane] drop_summary_s`). Never per packet.

use super::{ControlState, Runtime, local_counters};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the last look saw.
#[derive(Debug, Default)]
pub struct Events {
    /// Per port: up, and its link-change count (ports with a link state).
    links: Vec<Option<(bool, u64)>>,
    /// Drops by reason at the last summary, and when it was.
    drops: Option<(BTreeMap<String, u64>, Instant)>,
}

/// Logs what changed since the last call (see the module's
/// documentation). Cheap: the links are read every time, the counters
/// only when a summary is due.
pub fn log_events(state: &ControlState, rt: &mut Runtime) {
    let links: Vec<Option<(bool, u64)>> = rt
        .ports
        .iter()
        .map(|(_, ss)| {
            ss.first()
                .and_then(|s| s.link.as_ref())
                .map(|l| (l.is_up(), l.changes()))
        })
        .collect();
    for (i, now) in links.iter().enumerate() {
        let before = rt.events.links.get(i).copied().flatten();
        let (Some((up, changes)), true) = (now, before != *now) else {
            continue;
        };
        let name = rt.ports.get(i).map_or("?", |(n, _)| n.as_str());
        let speed = rt
            .ports
            .get(i)
            .and_then(|(_, ss)| ss.first())
            .and_then(|s| s.link.as_ref())
            .map_or(0, |l| l.speed_mbps());
        // (The first look reports the state a port starts in.)
        if *up {
            tracing::info!(
                port = name,
                up,
                changes,
                speed_mbps = speed,
                "link {name} up"
            );
        } else {
            tracing::warn!(port = name, up, changes, "link {name} down");
        }
    }
    rt.events.links = links;
    let every = state.config().dataplane.drop_summary_s;
    if every == 0 {
        return;
    }
    let due = rt
        .events
        .drops
        .as_ref()
        .is_none_or(|(_, at)| at.elapsed() >= Duration::from_secs(every));
    if !due {
        return;
    }
    let c = local_counters(state, rt);
    let mut now: BTreeMap<String, u64> = BTreeMap::new();
    for (reason, n) in c
        .ports
        .iter()
        .flat_map(|p| p.drops.iter())
        .chain(c.workers.iter().flat_map(|w| w.drops.iter()))
    {
        *now.entry(reason.clone()).or_default() += n;
    }
    if let Some((before, _)) = &rt.events.drops {
        let since: Vec<(String, u64)> = now
            .iter()
            .map(|(r, n)| {
                (
                    r.clone(),
                    n.saturating_sub(before.get(r).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let total: u64 = since.iter().map(|(_, n)| n).sum();
        if total > 0 {
            let reasons: Vec<String> = since.iter().map(|(r, n)| format!("{r}={n}")).collect();
            tracing::info!(
                total,
                reasons = reasons.join(" "),
                seconds = every,
                "drops: {total} packets in the last {every} s"
            );
        }
    }
    rt.events.drops = Some((now, Instant::now()));
}
