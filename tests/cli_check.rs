//! `pollux check` as a user runs it: exit 0 on the example, exit 2 with one
//! line per problem otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::Command;

fn pollux(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pollux"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn the_example_checks_ok() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pollux.toml");
    let (code, out, err) = pollux(&["check", "--config", example]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok (5 ports, 2 vnets, 5 vms, 2 nsgs with 3 rules, 1 vips with 3 backends)"),
        "{out}"
    );
}

#[test]
fn problems_exit_2_one_line_each() {
    let dir = std::env::temp_dir().join(format!("pollux-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { ip = "10.1.0.9", port = 8080 }, { ip = "10.2.0.9", port = 8080 } ]

[[vm]]
name = "web1"
port = "nowhere"
vnet = "a"
mac = "02:00:00:00:00:01"
ips = ["10.1.0.9"]
"#,
    )
    .unwrap();
    let (code, out, err) = pollux(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        vec![
            "vm \"web1\": port \"nowhere\" is not defined",
            "vip \"web\": backend 10.2.0.9 is not in vnet \"a\""
        ]
    );

    let (code, _, err) = pollux(&[
        "check",
        "--config",
        dir.join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.toml"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pollux check` refuses exactly what `pollux run` refuses, with the same
/// lines: the rules live in one place (`Config::validate`).
#[test]
fn check_and_run_refuse_the_same_configurations() {
    let dir = std::env::temp_dir().join(format!("pollux-check-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ring = "[[port]]\nname = \"r\"\ndriver = \"ring\"\n";
    let cases = [
        (
            "[dataplane]\nworkers = 512\n[[port]]\nname = \"cap\"\ndriver = \"pcap\"\ntx_pcap = \"/dev/null\"\n".to_string(),
            vec![
                "dataplane: workers = 512, but this machine has ",
                "port \"cap\": a pcap port has one queue; with workers = 512 use af_packet or ring ports",
            ],
        ),
        (
            "[dataplane]\nworkers = 2\n[[port]]\nname = \"x\"\ndriver = \"af_xdp\"\niface = \"lo\"\n".to_string(),
            vec!["port \"x\": an af_xdp port binds one queue; with workers = 2 use af_packet ports"],
        ),
        (
            "[dataplane]\nworkers = 2\n[[port]]\nname = \"vm\"\ndriver = \"vhost_user\"\nsocket = \"/run/vm.sock\"\n".to_string(),
            vec!["port \"vm\": a vhost_user port has one queue pair, polled by one worker; with workers = 2 use dpdk net_vhost ports with queues=2"],
        ),
        (
            "[[port]]\nname = \"vm\"\ndriver = \"vhost_user\"\nsocket = \"\"\n".to_string(),
            vec!["port \"vm\": a vhost_user port needs socket"],
        ),
        (
            "[[port]]\nname = \"vm\"\ndriver = \"vhost_user\"\nsocket = \"/run/vm.sock\"\nmtu = 9000\n".to_string(),
            vec!["port \"vm\": a vhost_user port carries an MTU of at most 1500 (no mergeable receive buffers); mtu is 9000"],
        ),
        (
            format!("[[port]]\nname = \"d\"\ndriver = \"dpdk\"\ndevargs = \"net_null0\"\n{ring}"),
            vec!["port \"r\": driver \"ring\" cannot share a worker with dpdk ports (make every port dpdk)"],
        ),
        (
            "[[port]]\nname = \"t\"\ndriver = \"tap\"\n".to_string(),
            vec!["config line 1: port \"t\": unknown variant `tap`, expected one of `ring`, `pcap`, `af_packet`, `af_xdp`, `vhost_user`, `dpdk`"],
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap();
        let (check_code, _, check_err) = pollux(&["check", "--config", path]);
        let (run_code, _, run_err) = pollux(&["run", "--config", path]);
        assert_eq!(
            (check_code, run_code),
            (2, 2),
            "{text}\n{check_err}\n{run_err}"
        );
        let lines = |s: &str| {
            let mut v: Vec<String> = s.lines().map(str::to_string).collect();
            v.sort();
            v
        };
        assert_eq!(lines(&check_err), lines(&run_err), "{text}");
        for w in want {
            assert!(check_err.contains(w), "{text}\nwant {w:?} in\n{check_err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
