//! `POST`, `GET` and `DELETE /v1/capture`: live capture of a port's frames
//! in both directions (`dataplane::capture`), read by `pollux ctl capture`
//! into a pcap file. The workers copy matching frames into the shared tap
//! while it is armed; each read here takes what they captured since the
//! last one, with its time on the wall clock.

use super::{ApiError, ControlState, Reply, Runtime, body_json, reply};
use crate::api::{CaptureRequest, CaptureView, CapturedFrame};
use dataplane::capture::{Filter, MAX_SNAPLEN, Spec, Way};
use dataplane::clock::TscClock;

/// Frames captured and not yet read, at most (records of 2 KiB each,
/// made at the first capture).
pub const CAPTURE_RECORDS: usize = 4096;

/// Frames a capture takes at most.
const MAX_COUNT: u64 = 10_000_000;

/// A capture under way (or the last one made).
#[derive(Debug, Clone)]
pub struct Session {
    port: Option<String>,
    filter: String,
    count: u64,
    /// The wall clock (ns since the epoch) and the worker clock (ticks)
    /// read together when it started.
    base: (u64, u64),
}

/// `POST /v1/capture`.
pub(super) fn start(state: &ControlState, rt: &mut Runtime, body: &str) -> Result<Reply, ApiError> {
    let req: CaptureRequest = body_json(body, "capture")?;
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
                format!("capture: no port {p:?} (ports: {})", names.join(", ")),
            )
        })?),
        None => None,
    };
    let filter_text = req.filter.clone().unwrap_or_default();
    let filter: Filter = filter_text
        .parse()
        .map_err(|e: dataplane::capture::FilterError| {
            ApiError::new(400, format!("capture: {e}"))
        })?;
    let count = req.count.unwrap_or(1000);
    if count == 0 || count > MAX_COUNT {
        return Err(ApiError::new(
            400,
            format!("capture: count {count} is not between 1 and {MAX_COUNT}"),
        ));
    }
    let seconds = req.seconds.unwrap_or(60.0);
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(ApiError::new(
            400,
            format!("capture: seconds {seconds} is not between 0 and 86400"),
        ));
    }
    let snaplen = req.snaplen.unwrap_or(MAX_SNAPLEN);
    if snaplen == 0 || snaplen > MAX_SNAPLEN {
        return Err(ApiError::new(
            400,
            format!("capture: snaplen {snaplen} is not between 1 and {MAX_SNAPLEN}"),
        ));
    }
    let clock = TscClock::process();
    let now = clock.now();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let deadline = now.saturating_add(clock.ns_to_ticks((seconds * 1e9) as u64));
    // The frames an earlier capture left unread go (the tap discards them
    // too when armed again).
    let mut old = Vec::new();
    rt.tap.take(&mut old);
    rt.tap.give_back(old);
    rt.tap.arm(
        Spec {
            port: port.and_then(|p| u16::try_from(p).ok()),
            filter,
            snaplen,
        },
        count,
        deadline,
    );
    rt.capture = Some(Session {
        port: req.port.clone(),
        filter: filter_text,
        count,
        base: (wall, now),
    });
    tracing::info!(
        port = req.port.as_deref().unwrap_or("all"),
        filter = rt.capture.as_ref().map_or("", |c| c.filter.as_str()),
        count,
        seconds,
        "capture started"
    );
    reply(201, &view(state, rt, false))
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
    reply(200, &view(state, rt, true))
}

/// The capture's state, with the frames captured since the last read
/// when `frames`.
fn view(state: &ControlState, rt: &mut Runtime, frames: bool) -> CaptureView {
    let mut records = Vec::new();
    if frames {
        rt.tap.take(&mut records);
    }
    let clock = TscClock::process();
    let names: Vec<&str> = state
        .config()
        .port
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let s = rt.capture.as_ref();
    let (wall, ticks) = s.map_or((0, 0), |s| s.base);
    let out = records
        .iter()
        .map(|r| CapturedFrame {
            // (A worker's poll may have begun just before the capture.)
            time_ns: wall.saturating_add(clock.ticks_to_ns(r.ticks.saturating_sub(ticks))),
            port: names
                .get(usize::from(r.port))
                .map_or_else(|| format!("#{}", r.port), |n| (*n).to_string()),
            direction: match r.way {
                Way::Rx => "rx".into(),
                Way::Tx => "tx".into(),
            },
            len: r.len,
            data: r.data.iter().map(|b| format!("{b:02x}")).collect(),
        })
        .collect();
    rt.tap.give_back(records);
    CaptureView {
        running: rt.tap.is_armed(),
        port: s.and_then(|s| s.port.clone()),
        filter: s.map_or(String::new(), |s| s.filter.clone()),
        count: s.map_or(0, |s| s.count),
        captured: rt.tap.captured(),
        missed: rt.tap.missed(),
        frames: out,
    }
}
