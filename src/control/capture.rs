//! `POST`, `GET` and `DELETE /v1/capture`: live capture of a port's frames
//! in both directions (`dataplane::capture`), read by `pollux ctl capture`
//! into a pcap file. The workers copy matching frames into the shared tap
//! while it is armed; each read here takes what they captured since the
//! last one, with its time on the wall clock. `/v1/trace/live` is the
//! same for the live trace (`vswitch::switch::LiveTrace`): the next
//! packets that match, traced by the workers.

use super::{ApiError, ControlState, Reply, Runtime, body_json, reply};
use crate::api::{CaptureRequest, CaptureView, CapturedFrame};
use dataplane::capture::{Filter, MAX_SNAPLEN, Spec, Way};
use dataplane::clock::TscClock;

/// Frames captured and not yet read, at most (records of 2 KiB each,
/// made at the first capture).
pub const CAPTURE_RECORDS: usize = 4096;

/// Frames a capture takes at most.
const MAX_COUNT: u64 = 10_000_000;

/// Live-traced packets not yet read, at most.
pub const LIVE_TRACE_RECORDS: usize = 1024;

/// Packets a live trace takes at most (each costs its worker allocations).
const LIVE_TRACE_MAX: u64 = 10_000;

/// A capture under way (or the last one made).
#[derive(Debug, Clone)]
pub struct Session {
    port: Option<String>,
    filter: String,
    count: u64,
    /// The wall clock (ns since the epoch) and the worker clock (ticks)
    /// read together when it started.
    base: (u64, u64),
    /// The worker clock's tick it ends at.
    deadline: u64,
    /// When it was last read.
    read_at: std::time::Instant,
}

/// A capture or live trace nobody has read for this long is ended: its
/// reader has gone (`pollux ctl` reads every 100 ms).
pub const READER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Ends a capture or live trace whose time is up (a live trace's workers
/// look at its deadline only when packets come) or whose reader has gone
/// ([`READER_TIMEOUT`]). The control loop calls it each turn.
pub fn step(rt: &mut Runtime) {
    let now = TscClock::process().now();
    let over = |s: &Session| now > s.deadline || s.read_at.elapsed() > READER_TIMEOUT;
    if rt.tap.is_armed() && rt.capture.as_ref().is_some_and(over) {
        rt.tap.disarm();
        tracing::info!(
            captured = rt.tap.captured(),
            missed = rt.tap.missed(),
            "capture ended"
        );
    }
    if rt.live.trigger.is_armed() && rt.live_session.as_ref().is_some_and(over) {
        rt.live.trigger.disarm();
        tracing::info!(
            traced = rt.live.traced(),
            missed = rt.live.missed(),
            "live trace ended"
        );
    }
}

/// What a capture or live-trace request asks for: the trigger's spec,
/// count and deadline (worker clock ticks), and the session to remember.
fn trigger_of(
    state: &ControlState,
    req: &CaptureRequest,
    what: &str,
    default_count: u64,
    max_count: u64,
) -> Result<(Spec, u64, u64, Session), ApiError> {
    let names: Vec<&str> = state
        .config()
        .port
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let port = match &req.port {
        Some(p) => Some(names.iter().position(|n| n == p).ok_or_else(|| {
            ApiError::new(
                404,
                format!("{what}: no port {p:?} (ports: {})", names.join(", ")),
            )
        })?),
        None => None,
    };
    let filter_text = req.filter.clone().unwrap_or_default();
    let filter: Filter = filter_text
        .parse()
        .map_err(|e: dataplane::capture::FilterError| ApiError::new(400, format!("{what}: {e}")))?;
    let count = req.count.unwrap_or(default_count);
    if count == 0 || count > max_count {
        return Err(ApiError::new(
            400,
            format!("{what}: count {count} is not between 1 and {max_count}"),
        ));
    }
    let seconds = req.seconds.unwrap_or(60.0);
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(ApiError::new(
            400,
            format!("{what}: seconds {seconds} is not between 0 and 86400"),
        ));
    }
    let snaplen = req.snaplen.unwrap_or(MAX_SNAPLEN);
    if snaplen == 0 || snaplen > MAX_SNAPLEN {
        return Err(ApiError::new(
            400,
            format!("{what}: snaplen {snaplen} is not between 1 and {MAX_SNAPLEN}"),
        ));
    }
    let clock = TscClock::process();
    let now = clock.now();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let deadline = now.saturating_add(clock.ns_to_ticks((seconds * 1e9) as u64));
    tracing::info!(
        port = req.port.as_deref().unwrap_or("all"),
        filter = filter_text.as_str(),
        count,
        seconds,
        "{what} started"
    );
    let port = port
        .map(u16::try_from)
        .transpose()
        .map_err(|_| ApiError::new(400, format!("{what}: the port has no number")))?;
    let spec = Spec {
        port,
        filter,
        snaplen,
    };
    let session = Session {
        port: req.port.clone(),
        filter: filter_text,
        count,
        base: (wall, now),
        deadline,
        read_at: std::time::Instant::now(),
    };
    Ok((spec, count, deadline, session))
}

impl Session {
    /// The wall-clock time (ns since the epoch) of worker clock `ticks`.
    fn wall_ns(&self, ticks: u64) -> u64 {
        let (wall, base) = self.base;
        // (A worker's poll may have begun just before the session.)
        wall.saturating_add(TscClock::process().ticks_to_ns(ticks.saturating_sub(base)))
    }
}

/// `POST /v1/capture`.
pub(super) fn start(state: &ControlState, rt: &mut Runtime, body: &str) -> Result<Reply, ApiError> {
    let req: CaptureRequest = body_json(body, "capture")?;
    let (spec, count, deadline, session) = trigger_of(state, &req, "capture", 1000, MAX_COUNT)?;
    // (Frames an earlier capture left unread go.)
    rt.tap.arm(spec, count, deadline);
    rt.capture = Some(session);
    reply(201, &view(state, rt, false))
}

/// `POST /v1/trace/live`.
pub(super) fn start_live(
    state: &ControlState,
    rt: &mut Runtime,
    body: &str,
) -> Result<Reply, ApiError> {
    let req: CaptureRequest = body_json(body, "live trace")?;
    let (spec, count, deadline, session) =
        trigger_of(state, &req, "live trace", 10, LIVE_TRACE_MAX)?;
    rt.live.arm(spec, count, deadline);
    rt.live_session = Some(session);
    reply(201, &live_view(state, rt, false))
}

/// `GET /v1/trace/live` (`stop`: `DELETE`, which ends it first).
pub(super) fn read_live(
    state: &ControlState,
    rt: &mut Runtime,
    stop: bool,
) -> Result<Reply, ApiError> {
    if rt.live_session.is_none() {
        return Err(ApiError::new(
            404,
            "live trace: none was started (POST /v1/trace/live)",
        ));
    }
    if stop {
        rt.live.trigger.disarm();
    }
    if let Some(s) = rt.live_session.as_mut() {
        s.read_at = std::time::Instant::now();
    }
    step(rt);
    reply(200, &live_view(state, rt, true))
}

/// The live trace's state, with the packets traced since the last read
/// when `packets`.
fn live_view(state: &ControlState, rt: &mut Runtime, packets: bool) -> crate::api::LiveTraceView {
    use super::trace::{describe, port_name};
    use vswitch::switch::LiveEnd;
    // Whether it runs, read before the records are taken: stopped, every
    // record it will have is among them.
    let running = rt.live.trigger.running();
    let mut records = Vec::new();
    if packets {
        rt.live.take(&mut records);
    }
    let ports: Vec<String> = state.config().port.iter().map(|p| p.name.clone()).collect();
    let policy = state.policy().load_full();
    let s = rt.live_session.as_ref();
    let out = records
        .iter()
        .map(|r| {
            let name = |p| Some(port_name(&ports, &policy, p));
            let (result, out_port, reason) = match r.end {
                Some(LiveEnd::Out(p)) => ("forward", name(p), None),
                Some(LiveEnd::Back) => ("answer", name(r.in_port), None),
                Some(LiveEnd::Drop(why)) => ("drop", None, Some(why.name().to_string())),
                Some(LiveEnd::Handed(w)) => ("handed", None, Some(format!("to worker {w}"))),
                Some(LiveEnd::Held) => {
                    ("held", None, Some("waiting for its first fragment".into()))
                }
                None => ("unknown", None, None),
            };
            crate::api::LivePacket {
                time_ns: s.map_or(0, |s| s.wall_ns(r.ticks)),
                worker: r.worker,
                port: port_name(&ports, &policy, r.in_port),
                packet: describe(&r.frame),
                steps: r
                    .steps
                    .iter()
                    .map(|x| crate::api::TraceStepView {
                        layer: x.layer.to_string(),
                        detail: x.detail.clone(),
                    })
                    .collect(),
                result: result.to_string(),
                out_port,
                reason,
            }
        })
        .collect();
    crate::api::LiveTraceView {
        running,
        port: s.and_then(|s| s.port.clone()),
        filter: s.map_or(String::new(), |s| s.filter.clone()),
        count: s.map_or(0, |s| s.count),
        traced: rt.live.traced(),
        missed: rt.live.missed(),
        packets: out,
    }
}

/// `GET /v1/capture` (`stop`: `DELETE`, which disarms first).
pub(super) fn read(state: &ControlState, rt: &mut Runtime, stop: bool) -> Result<Reply, ApiError> {
    if rt.capture.is_none() {
        return Err(ApiError::new(
            404,
            "capture: none was started (POST /v1/capture)",
        ));
    }
    if stop {
        rt.tap.disarm();
    }
    if let Some(s) = rt.capture.as_mut() {
        s.read_at = std::time::Instant::now();
    }
    reply(200, &view(state, rt, true))
}

/// The capture's state, with the frames captured since the last read
/// when `frames`.
fn view(state: &ControlState, rt: &mut Runtime, frames: bool) -> CaptureView {
    // (Read before the frames are taken: see `live_view`.)
    let running = rt.tap.running();
    let mut records = Vec::new();
    if frames {
        rt.tap.take(&mut records);
    }
    let names: Vec<&str> = state
        .config()
        .port
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let s = rt.capture.as_ref();
    let out = records
        .iter()
        .map(|r| CapturedFrame {
            time_ns: s.map_or(0, |s| s.wall_ns(r.ticks)),
            port: names
                .get(usize::from(r.port))
                .map_or_else(|| format!("#{}", r.port), |n| (*n).to_string()),
            direction: match r.way {
                Way::Rx => "rx".into(),
                Way::Tx => "tx".into(),
            },
            len: r.len,
            data: crate::api::to_hex(&r.data),
        })
        .collect();
    rt.tap.give_back(records);
    CaptureView {
        running,
        port: s.and_then(|s| s.port.clone()),
        filter: s.map_or(String::new(), |s| s.filter.clone()),
        count: s.map_or(0, |s| s.count),
        captured: rt.tap.captured(),
        missed: rt.tap.missed(),
        frames: out,
    }
}
