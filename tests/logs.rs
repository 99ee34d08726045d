//! `pollux --log-format json run` writes its control-plane events as one
//! JSON object per line on stderr, each with a timestamp, a level and its
//! fields: the start, an API change with the generation it published, and a
//! SIGHUP reload with its generation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::Running;

use pollux::ctl::{Endpoint, call};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn events_are_json_lines_with_their_fields() {
    let dir = std::env::temp_dir().join(format!("pollux-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ctl.sock");
    let cfg = dir.join("pollux.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[control]
socket = "{}"
[[port]]
name = "a"
driver = "ring"
[[vnet]]
name = "v"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vm]]
name = "a"
port = "a"
vnet = "v"
mac = "02:00:00:00:00:10"
ips = ["10.1.0.10"]
nsg = "g"
[[nsg]]
name = "g"
"#,
            sock.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut running = Running(Some(child));
    let ep = Endpoint::Unix(&sock);
    let status = || -> Option<Value> {
        let (st, text) = call(&ep, "GET", "/v1/status", None).ok()?;
        (st == 200).then(|| serde_json::from_str(&text).unwrap())
    };
    let wait = |what: &str, ok: &dyn Fn(&Value) -> bool| {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if status().as_ref().is_some_and(ok) {
                return;
            }
            assert!(Instant::now() < end, "{what}: not within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the API answers", &|_| true);
    let rule =
        r#"{"priority":100,"direction":"in","action":"allow","protocol":"tcp","dst_ports":["22"]}"#;
    let (st, text) = call(&ep, "PUT", "/v1/nsgs/g/rules/ssh", Some(rule)).unwrap();
    assert_eq!(st, 201, "{text}");
    let put_gen = serde_json::from_str::<Value>(&text).unwrap()["generation"]
        .as_u64()
        .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait("the reload is applied", &|v| v["reloads"]["applied"] == 1);
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = running.0.take().unwrap().wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let events: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        assert!(
            e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{e}"
        );
        assert!(e["level"].is_string() && e["target"].is_string(), "{e}");
    }
    let find = |msg: &str| {
        events
            .iter()
            .find(|e| e["fields"]["message"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} event in {stderr}"))
    };
    let start = find("switch running (SIGINT or SIGTERM stops)");
    assert_eq!(start["fields"]["ports"], 1, "{start}");
    let change = find("api change");
    assert_eq!(change["fields"]["method"], "PUT", "{change}");
    assert_eq!(change["fields"]["path"], "/v1/nsgs/g/rules/ssh", "{change}");
    assert_eq!(
        change["fields"]["generation"].as_u64(),
        Some(put_gen),
        "{change}"
    );
    assert_eq!(change["level"], "INFO");
    let reload = find("reloaded");
    assert_eq!(
        reload["fields"]["generation"].as_u64(),
        Some(put_gen + 1),
        "{reload}"
    );
}
