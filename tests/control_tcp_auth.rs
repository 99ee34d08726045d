//! The control API's loopback TCP endpoint takes requests only with the
//! bearer token from `[control] token_file`: an unprivileged local user
//! (`nobody`, uid 65534, through `setpriv`) with `curl` is refused (401) without it or
//! with a wrong one, and its change does not happen; the same user with the
//! token is served; `GET /metrics` is open when `metrics_without_token`
//! says so; `pollux ctl --tcp --token-file` works. Needs root (to act as
//! another user) and curl.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use pollux::config::Config;
use pollux::ctl::{Endpoint, call};
use pollux::run::InProcess;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKEN: &str = "k3Jx9-tQ2mW7vR4pL8sZ1nB6cF0hY5dA";

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Path, port: u16) -> String {
    format!(
        r#"[control]
socket = "{dir}/ctl.sock"
tcp = "127.0.0.1:{port}"
token_file = "{dir}/token"
metrics_without_token = true

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
        dir = dir.display()
    )
}

/// A loopback TCP port free now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A command as user `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    c
}

/// `curl` as user `nobody` against `url`, with `headers`; returns the
/// status and the body.
fn curl_as_nobody(
    method: &str,
    url: &str,
    headers: &[String],
    body: Option<&str>,
) -> (u16, String) {
    let mut c = as_nobody();
    c.args(["curl", "-s", "-S", "-X", method])
        .args(["-w", "\n%{http_code}", "--max-time", "10"]);
    for h in headers {
        c.args(["-H", h]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c.arg(url).output().unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

#[test]
fn the_tcp_endpoint_serves_only_requests_with_the_token() {
    if !testkit::require::root_and(&["curl", "setpriv"]) {
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("pollux-tcp-auth-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    // Others may pass through the directory (as for /run), not read the file.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = dir.0.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let cfg = Config::parse(&config(&dir.0, port)).unwrap();
    cfg.validate().unwrap();
    let sw = InProcess::start(&cfg).unwrap();
    let sock = dir.0.join("ctl.sock");
    let unix = |m: &str, p: &str, b: Option<&str>| {
        let (st, text) = call(&Endpoint::Unix(&sock), m, p, b).unwrap();
        (st, serde_json::from_str::<Value>(&text).unwrap())
    };
    let generation = || {
        unix("GET", "/v1/status", None).1["generation"]
            .as_u64()
            .unwrap()
    };
    let g0 = generation();

    // The user cannot read the token.
    let cat = as_nobody().arg("cat").arg(&token).output().unwrap();
    assert!(!cat.status.success(), "nobody read the token file");
    let err = String::from_utf8_lossy(&cat.stderr);
    assert!(err.contains("Permission denied"), "{err}");

    let base = format!("http://127.0.0.1:{port}");
    let rule =
        r#"{"priority":100,"direction":"in","action":"allow","protocol":"tcp","dst_ports":["22"]}"#;
    let put = format!("{base}/v1/nsgs/g/rules/ssh");
    // No token, a wrong one, a wrong scheme: 401, and nothing changes.
    for headers in [
        vec![],
        vec![format!("Authorization: Bearer {TOKEN}x")],
        vec![format!(
            "Authorization: Bearer {}",
            &TOKEN[..TOKEN.len() - 1]
        )],
        vec![format!("Authorization: Basic {TOKEN}")],
    ] {
        let (st, body) = curl_as_nobody("PUT", &put, &headers, Some(rule));
        assert_eq!(st, 401, "{headers:?}: {body}");
        assert!(body.contains("control token"), "{body}");
        assert!(!body.contains(TOKEN), "the answer names the token: {body}");
        let (st, _) = curl_as_nobody("GET", &format!("{base}/v1/status"), &headers, None);
        assert_eq!(st, 401, "{headers:?}");
    }
    assert_eq!(generation(), g0, "a refused request changed the policy");
    let (st, v) = unix("GET", "/v1/nsgs/g", None);
    assert_eq!(st, 200);
    assert!(
        !v.to_string().contains("\"ssh\""),
        "the refused rule is there: {v}"
    );
    // The counters need the token too; the metrics are open, as configured.
    let (st, _) = curl_as_nobody("GET", &format!("{base}/v1/counters"), &[], None);
    assert_eq!(st, 401);
    let (st, metrics) = curl_as_nobody("GET", &format!("{base}/metrics"), &[], None);
    assert_eq!(st, 200);
    assert!(metrics.contains("pollux_policy_generation"), "{metrics}");

    // With the token, the same user is served.
    let auth = vec![format!("Authorization: Bearer {TOKEN}")];
    let (st, body) = curl_as_nobody("PUT", &put, &auth, Some(rule));
    assert_eq!(st, 201, "{body}");
    assert_eq!(generation(), g0 + 1);
    let (_, v) = unix("GET", "/v1/nsgs/g", None);
    assert!(v.to_string().contains("\"ssh\""), "{v}");

    // A takeover is never asked over TCP, however the path is spelled.
    for path in ["/v1/takeover", "//v1/takeover", "/v1//takeover"] {
        let (st, body) = curl_as_nobody("POST", &format!("{base}{path}"), &auth, Some("{}"));
        assert_eq!(st, 403, "{path}: {body}");
    }
    // The open metrics are GET /metrics only.
    let (st, _) = curl_as_nobody("POST", &format!("{base}/metrics"), &[], Some("{}"));
    assert_eq!(st, 401);

    // pollux ctl over TCP: with the token file, and refused without it.
    let ctl = |with_token: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pollux"));
        c.args(["ctl", "--tcp", &format!("127.0.0.1:{port}")]);
        if with_token {
            c.arg("--token-file").arg(&token);
        }
        c.arg("status").output().unwrap()
    };
    let ok = ctl(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = ctl(false);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("401") || err.contains("control token"),
        "{err}"
    );
    sw.stop().unwrap();
}

#[test]
fn a_tcp_endpoint_without_a_private_token_is_not_served() {
    let dir = Dir(std::env::temp_dir().join(format!("pollux-tcp-auth-bad-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    // No token_file with tcp: the configuration is refused.
    let no_token =
        config(&dir.0, 1).replace(&format!("token_file = \"{}/token\"\n", dir.0.display()), "");
    let e = Config::parse(&no_token)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs token_file"), "{e}");
    // A token file others can read: pollux does not start.
    let token = dir.0.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = free_port();
    let cfg = Config::parse(&config(&dir.0, port)).unwrap();
    let e = InProcess::start(&cfg)
        .err()
        .expect("started with an open token file")
        .to_string();
    assert!(e.contains("mode 0644") && e.contains("token"), "{e}");
    assert!(!e.contains(TOKEN), "{e}");
}
