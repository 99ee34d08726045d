//! What a test needs from the machine, checked one way in every crate.
//!
//! A test states its needs first and returns when [`met`] (or one of its
//! shorthands) says no:
//!
//! ```no_run
//! use testkit::require::{self, Need};
//! if !require::met(&[Need::Root, Need::Tool("ip")]) {
//!     return;
//! }
//! // ... the test proper
//! ```
//!
//! Outside CI an unmet need prints `not run: needs ...` on stderr and the test
//! returns, so a developer without root still runs everything else. When CI
//! asks for the whole suite (`CI` set to anything but `false`/`0`, or
//! `POLLUX_REQUIRE_TOOLS=1`, which scripts/test.sh sets), an unmet need
//! fails the test with a message naming every missing thing: a suite that
//! passes in CI has run every test.

use std::path::Path;

/// One thing a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Effective uid 0 (namespaces, packet sockets, DPDK's runtime directory).
    Root,
    /// A program on `PATH`.
    Tool(&'a str),
    /// At least this many free 2 MiB huge pages.
    HugePages(u64),
    /// A mounted hugetlbfs (DPDK's EAL maps its huge pages through one).
    Hugetlbfs,
    /// A file (path, and what it is).
    File(&'a str, &'a str),
    /// A device model QEMU (`qemu-system-x86_64`) has (`-device help`).
    QemuDevice(&'a str),
}

impl Need<'_> {
    /// What is missing, or `None` when the machine has it.
    fn missing(&self) -> Option<String> {
        match *self {
            Need::Root if is_root() => None,
            Need::Root => Some("root (effective uid 0)".to_string()),
            Need::Tool(t) if on_path(t) => None,
            Need::Tool(t) => Some(format!(
                "the program {t:?} on PATH (scripts/test.sh installs it)"
            )),
            Need::Hugetlbfs => {
                let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
                let mounted = mounts
                    .lines()
                    .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
                (!mounted)
                    .then(|| "a mounted hugetlbfs (scripts/test.sh mounts one as root)".to_string())
            }
            Need::File(path, what) => (!std::path::Path::new(path).exists())
                .then(|| format!("{what} ({path}; scripts/test.sh installs it)")),
            Need::QemuDevice(dev) => {
                let help = std::process::Command::new("qemu-system-x86_64")
                    .args(["-device", "help"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                (!help.contains(&format!("name \"{dev}\""))).then(|| {
                    format!(
                        "QEMU with the {dev:?} device model (QEMU 10 from bookworm-backports; scripts/test.sh installs it)"
                    )
                })
            }
            Need::HugePages(n) => {
                let free = free_huge_pages();
                (free < n).then(|| {
                    format!(
                        "{n} free 2 MiB huge pages ({free} free; scripts/test.sh reserves them as root)"
                    )
                })
            }
        }
    }
}

/// True when CI asks for every test to run: `CI` or `POLLUX_REQUIRE_TOOLS`
/// is set to anything but empty, `0` or `false`.
pub fn strict() -> bool {
    strict_in(
        std::env::var("CI").ok().as_deref(),
        std::env::var("POLLUX_REQUIRE_TOOLS").ok().as_deref(),
    )
}

fn strict_in(ci: Option<&str>, require: Option<&str>) -> bool {
    let on = |v: Option<&str>| {
        v.is_some_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
    };
    on(ci) || on(require)
}

/// True when the machine has everything in `needs`. Otherwise, under CI
/// ([`strict`]) panics naming every missing thing; elsewhere prints what is
/// missing (`not run: needs ...`) and returns false.
#[allow(clippy::panic)]
pub fn met(needs: &[Need<'_>]) -> bool {
    match judge(needs, strict()) {
        Verdict::Run => true,
        Verdict::NotRun(why) => {
            eprintln!("{why}");
            false
        }
        Verdict::Fail(why) => panic!("{why}"),
    }
}

/// What [`met`] does.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Run,
    NotRun(String),
    Fail(String),
}

fn judge(needs: &[Need<'_>], strict: bool) -> Verdict {
    let missing: Vec<String> = needs.iter().filter_map(Need::missing).collect();
    if missing.is_empty() {
        return Verdict::Run;
    }
    let list = missing.join(", ");
    if strict {
        Verdict::Fail(format!(
            "this test needs {list}, and CI runs every test (CI or POLLUX_REQUIRE_TOOLS is set)"
        ))
    } else {
        Verdict::NotRun(format!(
            "not run: needs {list} (with CI=true this is a failure)"
        ))
    }
}

/// [`met`] for root alone.
pub fn root() -> bool {
    met(&[Need::Root])
}

/// [`met`] for one program on `PATH`.
pub fn tool(name: &str) -> bool {
    met(&[Need::Tool(name)])
}

/// [`met`] for root and every program in `tools`.
pub fn root_and(tools: &[&str]) -> bool {
    let needs: Vec<Need<'_>> = std::iter::once(Need::Root)
        .chain(tools.iter().map(|t| Need::Tool(t)))
        .collect();
    met(&needs)
}

/// True when this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Uid:"))?;
            // Uid: real effective saved filesystem
            Some(l.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

/// True when `name` is an executable file in a directory of `PATH` (or a
/// path to one).
pub fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return executable(Path::new(name));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(name))))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Free 2 MiB huge pages (`HugePages_Free` in /proc/meminfo), 0 if unknown.
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values_that_ask_for_every_test() {
        assert!(strict_in(Some("true"), None));
        assert!(strict_in(Some("1"), None));
        assert!(strict_in(None, Some("1")));
        assert!(!strict_in(Some("false"), None));
        assert!(!strict_in(Some("0"), None));
        assert!(!strict_in(Some(""), None));
        assert!(!strict_in(None, Some("0")));
        assert!(strict_in(None, Some("true")));
        assert!(!strict_in(None, None));
    }

    #[test]
    fn tools_are_found_on_path_only_when_executable() {
        use std::os::unix::fs::PermissionsExt;
        assert!(on_path("sh"));
        assert!(on_path("/bin/sh"));
        assert!(!on_path("pollux-no-such-program"));
        // A file that exists but is not executable is no tool.
        let f = std::env::temp_dir().join(format!("testkit-plain-{}", std::process::id()));
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let plain = on_path(f.to_str().unwrap());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exec = on_path(f.to_str().unwrap());
        std::fs::remove_file(&f).unwrap();
        assert!(!plain);
        assert!(exec);
    }

    #[test]
    fn unmet_needs_fail_under_ci_and_are_reported_elsewhere() {
        let needs = [Need::Tool("sh"), Need::Tool("pollux-no-such-program")];
        assert_eq!(judge(&needs[..1], true), Verdict::Run);
        assert_eq!(judge(&needs[..1], false), Verdict::Run);
        match judge(&needs, true) {
            Verdict::Fail(m) => {
                assert!(m.contains("\"pollux-no-such-program\" on PATH"), "{m}");
                assert!(!m.contains("\"sh\""), "{m}");
            }
            v => panic!("{v:?}"),
        }
        match judge(&needs, false) {
            Verdict::NotRun(m) => assert!(m.starts_with("not run: needs the program"), "{m}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn missing_things_are_named() {
        assert_eq!(Need::Tool("sh").missing(), None);
        let m = Need::Tool("pollux-no-such-program").missing().unwrap();
        assert!(m.contains("\"pollux-no-such-program\" on PATH"), "{m}");
        let m = Need::HugePages(u64::MAX).missing().unwrap();
        assert!(m.contains("free 2 MiB huge pages"), "{m}");
        assert_eq!(Need::Root.missing().is_none(), is_root());
    }
}
