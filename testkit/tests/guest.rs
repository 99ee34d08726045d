//! The guest harness against real QEMU: one guest without NICs boots from
//! the image built out of Debian's packages and answers on its command
//! channel (status, output, quoting, the harness's timeout).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::Duration;
use testkit::guest::{Guest, Spec, accel};
use testkit::require::{Need, met};

#[test]
fn a_guest_boots_and_runs_commands() {
    if !met(&[
        Need::Tool("qemu-system-x86_64"),
        Need::Tool("apt-get"),
        Need::Tool("dpkg-deb"),
    ]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("testkit-guest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, why) = accel();
    eprintln!("guests run on {a}: {why}");
    let mut g = Guest::start(&dir, Spec::new("solo")).unwrap();
    let boot = g.wait_ready(Duration::from_secs(120)).unwrap();
    assert_eq!(boot.len(), 36, "boot id {boot:?}");
    let img = testkit::guest::image::image().unwrap();
    let t = Duration::from_secs(20);
    assert_eq!(g.ok("uname -r", t).unwrap().trim(), img.release);
    assert_eq!(g.ok("hostname", t).unwrap().trim(), "solo");
    assert_eq!(g.ok("cat /www/index.html", t).unwrap().trim(), "solo");
    // The virtio drivers are loaded (no NIC needs them here, but the
    // modules must load into this kernel).
    let mods = g.ok("cat /proc/modules", t).unwrap();
    for m in ["virtio_net", "virtio_pci", "net_failover"] {
        assert!(mods.contains(m), "{m} not loaded: {mods}");
    }
    let o = g
        .run("echo 'it'\"'\"'s'; echo oops >&2; exit 3", t)
        .unwrap();
    assert_eq!(o.status, 3);
    assert_eq!(o.out, "it's\noops\n");
    let o = g.run("sleep 30", Duration::from_secs(2)).unwrap();
    assert_eq!(o.status, 137, "the harness's timeout kills with SIGKILL");
    assert!(
        g.run("echo a\nb", t).is_err(),
        "a command of two lines is refused"
    );
    // Still in step after all that.
    assert_eq!(g.ok("echo fine", t).unwrap(), "fine\n");
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}
