//! The Debian package (`scripts/deb.sh`, made here from this test's build of
//! the binary) installs with `dpkg -i` on this Debian 12 machine: `pollux
//! --version`, `man pollux` and the bash completion work, `systemd-analyze
//! verify` accepts the unit, and what the unit runs (its `ExecStartPre`
//! check and `ExecStart` on the packaged configuration's ring ports) serves
//! the control socket under /run/pollux; `systemctl reload`'s SIGHUP is
//! applied as a reload. Where systemd runs, the unit itself is started,
//! reloaded and stopped with systemctl. The package is purged afterwards.
//! Needs root and dpkg-dev, man-db and systemd's tools.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::Running;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Purges the package (and what its unit left under /run) when the test
/// ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if Path::new("/run/systemd/system").exists() {
            let _ = Command::new("systemctl").args(["stop", "pollux"]).status();
        }
        let _ = Command::new("dpkg")
            .args(["--purge", "pollux"])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all("/run/pollux");
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `pollux ctl status` on the installed package's socket, once it answers
/// (within `deadline`).
fn status_when_served(deadline: Duration) -> Value {
    let start = Instant::now();
    loop {
        let out = Command::new("/usr/bin/pollux")
            .args([
                "ctl",
                "--socket",
                "/run/pollux/pollux.sock",
                "--json",
                "status",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(
            start.elapsed() < deadline,
            "the control socket never answered: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reloads_applied(v: &Value) -> u64 {
    v["reloads"]["applied"].as_u64().unwrap()
}

#[test]
fn the_package_installs_and_its_unit_runs_pollux() {
    if !testkit::require::root_and(&[
        "dpkg-deb",
        "dpkg-shlibdeps",
        "strip",
        "man",
        "systemd-analyze",
    ]) {
        return;
    }
    let out = std::env::temp_dir().join(format!("pollux-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deb.sh");
    let deb = run(Command::new(&script)
        .args(["--binary", env!("CARGO_BIN_EXE_pollux"), "--out"])
        .arg(&out));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb"), "{deb}");

    let _installed = Installed;
    run(Command::new("dpkg").args(["-i", deb]));
    let _ = std::fs::remove_dir_all(&out);
    let files = run(Command::new("dpkg").args(["-L", "pollux"]));
    for f in [
        "/usr/bin/pollux",
        "/lib/systemd/system/pollux.service",
        "/etc/pollux/pollux.toml",
        "/usr/share/man/man1/pollux.1.gz",
        "/usr/share/bash-completion/completions/pollux",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "{f} not in the package: {files}"
        );
    }
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "pollux"]));
    assert!(conffiles.contains("/etc/pollux/pollux.toml"), "{conffiles}");

    let version = run(Command::new("/usr/bin/pollux").arg("--version"));
    assert_eq!(
        version.trim(),
        format!("pollux {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        Path::new("/usr/share/man/man1/pollux.1.gz").exists(),
        "the man page was not installed: does dpkg exclude /usr/share/man here (path-exclude in /etc/dpkg/dpkg.cfg.d)?"
    );
    let page = run(Command::new("man")
        .args(["-P", "cat", "pollux"])
        .env("MANWIDTH", "80"));
    assert!(
        page.contains("pollux") && page.contains("SYNOPSIS"),
        "{page}"
    );
    assert!(page.contains("check") && page.contains("run"), "{page}");
    let complete = run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/pollux && complete -p pollux",
    ]));
    assert!(complete.contains("pollux"), "{complete}");
    run(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/pollux.service"]));

    if Path::new("/run/systemd/system").exists() {
        // systemd runs here: the unit itself.
        run(Command::new("systemctl").args(["start", "pollux"]));
        let v = status_when_served(Duration::from_secs(30));
        assert_eq!(v["ports"].as_u64(), Some(2), "{v}");
        run(Command::new("systemctl").args(["reload", "pollux"]));
        let start = Instant::now();
        while reloads_applied(&status_when_served(Duration::from_secs(10))) < 1 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "reload not applied"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        run(Command::new("systemctl").args(["stop", "pollux"]));
        return;
    }
    // No systemd here (a container): what the unit runs, as it runs it.
    run(Command::new("/usr/bin/pollux").args(["check", "--config", "/etc/pollux/pollux.toml"]));
    std::fs::create_dir_all("/run/pollux").unwrap();
    // (Its stderr is not read while it runs: the pipe's buffer holds the
    // few lines it writes.)
    let child = Command::new("/usr/bin/pollux")
        .args(["run", "--config", "/etc/pollux/pollux.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut running = Running(Some(child));
    let v = status_when_served(Duration::from_secs(30));
    assert_eq!(v["ports"].as_u64(), Some(2), "{v}");
    assert_eq!(reloads_applied(&v), 0);
    // ExecReload: kill -HUP $MAINPID.
    run(Command::new("kill").args(["-HUP", &pid]));
    let start = Instant::now();
    while reloads_applied(&status_when_served(Duration::from_secs(10))) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "SIGHUP not applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run(Command::new("kill").args(["-TERM", &pid]));
    let out = running.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pollux exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new("/run/pollux/pollux.sock").exists(),
        "the socket is left behind"
    );
}
