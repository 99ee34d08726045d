//! `pollux sriov`: SR-IOV virtual functions for DPDK ports.
//!
//! Creates VFs on a physical function through sysfs (`sriov_numvfs`) and
//! sets a VF's MAC, VLAN, spoof check and trust through rtnetlink
//! (`RTM_SETLINK` on the PF with `IFLA_VFINFO_LIST`), as `ip link set PF vf
//! N ...` does; binds a VF to a driver (`driver_override`, as
//! `dpdk-devbind.py` does). Errors name the interface and what is missing.
//! A VF bound to vfio-pci is then a `dpdk` port with `pci = "0000:..."`
//! (docs/config.md).

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::path::PathBuf;

/// What to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The physical function (a kernel interface name).
    pub pf: String,
    /// Number of VFs to create (0 removes them all).
    pub vfs: Option<u32>,
    /// The VF to configure.
    pub vf: Option<u32>,
    /// Its MAC.
    pub mac: Option<[u8; 6]>,
    /// Its VLAN (0: none).
    pub vlan: Option<u16>,
    /// Spoof checking on the VF.
    pub spoofchk: Option<bool>,
    /// Trusted VF (may change its MAC, enter promiscuous mode).
    pub trust: Option<bool>,
    /// The kernel driver to bind the VF to (`vfio-pci` for DPDK).
    pub bind: Option<String>,
}

const RTM_SETLINK: u16 = 19;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_VF_INFO: u16 = 1;
const IFLA_VF_MAC: u16 = 1;
const IFLA_VF_VLAN: u16 = 2;
const IFLA_VF_SPOOFCHK: u16 = 4;
const IFLA_VF_TRUST: u16 = 9;

/// Appends attribute `kind` with `value`, padded to 4 bytes.
fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// The `RTM_SETLINK` message that sets VF `vf` of interface `ifindex`
/// (sequence number `seq`); `None` when nothing is to be set.
pub fn vf_message(req: &Request, ifindex: u32, vf: u32, seq: u32) -> Option<Vec<u8>> {
    let mut info = Vec::new();
    if let Some(mac) = req.mac {
        // struct ifla_vf_mac { __u32 vf; __u8 mac[32]; }
        let mut v = vf.to_ne_bytes().to_vec();
        let mut m = [0u8; 32];
        m[..6].copy_from_slice(&mac);
        v.extend_from_slice(&m);
        attr(&mut info, IFLA_VF_MAC, &v);
    }
    if let Some(vlan) = req.vlan {
        // struct ifla_vf_vlan { __u32 vf; __u32 vlan; __u32 qos; }
        attr(&mut info, IFLA_VF_VLAN, &words(&[vf, u32::from(vlan), 0]));
    }
    if let Some(on) = req.spoofchk {
        attr(&mut info, IFLA_VF_SPOOFCHK, &words(&[vf, u32::from(on)]));
    }
    if let Some(on) = req.trust {
        attr(&mut info, IFLA_VF_TRUST, &words(&[vf, u32::from(on)]));
    }
    if info.is_empty() {
        return None;
    }
    let mut vf_info = Vec::new();
    attr(&mut vf_info, IFLA_VF_INFO, &info);
    let mut body = Vec::new();
    // struct ifinfomsg { family, pad, type, index, flags, change }
    body.extend_from_slice(&[0u8, 0, 0, 0]);
    body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&[0u8; 8]);
    attr(&mut body, IFLA_VFINFO_LIST, &vf_info);
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    Some(msg)
}

/// Why an SR-IOV request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    /// No such network interface.
    #[error("sriov: interface {0:?} does not exist")]
    NoInterface(String),
    /// The interface has no SR-IOV capability.
    #[error("sriov: {pf:?} is not an SR-IOV physical function (no {})", path.display())]
    NotPf {
        /// The interface.
        pf: String,
        /// The sysfs file it lacks.
        path: PathBuf,
    },
    /// More VFs than the device has.
    #[error("sriov: {pf:?} supports at most {total} VFs, {asked} asked for")]
    TooMany {
        /// The interface.
        pf: String,
        /// Its `sriov_totalvfs`.
        total: u32,
        /// The count asked for.
        asked: u32,
    },
    /// Writing `sriov_numvfs` failed.
    #[error("sriov: writing {}{}: {source}", path.display(), if source.kind() == std::io::ErrorKind::PermissionDenied { " needs root" } else { "" })]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--vf` without a setting.
    #[error("sriov: --vf needs at least one of --mac, --vlan, --spoofchk, --trust, --bind")]
    NoSetting,
    /// A VF index the PF does not have.
    #[error("sriov: {pf:?} has {}, no VF {vf}", if *count == 0 { "no VFs (create them with --vfs N)".to_string() } else { format!("{count} VFs (0-{})", count - 1) })]
    NoVf {
        /// The interface.
        pf: String,
        /// The VF asked for.
        vf: u32,
        /// Its `sriov_numvfs`.
        count: u32,
    },
    /// Binding a VF to a driver failed.
    #[error("sriov: binding VF {vf} ({pci}) of {pf:?} to {driver:?}: {what}")]
    Bind {
        /// The interface.
        pf: String,
        /// The VF.
        vf: u32,
        /// Its PCI address.
        pci: String,
        /// The driver.
        driver: String,
        /// What went wrong.
        what: String,
    },
    /// Neither `--vfs` nor `--vf`.
    #[error("sriov: nothing to do: give --vfs N and/or --vf I with settings")]
    NothingToDo,
    /// The netlink socket failed.
    #[error("sriov: netlink {step}: {source}")]
    Netlink {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel's answer is not an acknowledgement.
    #[error("sriov: {0}")]
    Reply(String),
    /// The kernel refused the VF settings.
    #[error("sriov: {}", refusal(pf, *vf, *errno))]
    Refused {
        /// The interface.
        pf: String,
        /// The VF.
        vf: u32,
        /// The kernel's errno.
        errno: i32,
    },
}

/// What a refusal of VF settings means, by errno.
fn refusal(pf: &str, vf: u32, errno: i32) -> String {
    let err = std::io::Error::from_raw_os_error(errno);
    match errno {
        libc::EPERM | libc::EACCES => {
            format!("configuring VFs of {pf:?} needs CAP_NET_ADMIN: {err}")
        }
        libc::EOPNOTSUPP => {
            format!("the driver of {pf:?} cannot configure VFs this way (not an SR-IOV PF?): {err}")
        }
        _ => format!("VF {vf} of {pf:?}: {err}"),
    }
}

fn sys(pf: &str, file: &str) -> PathBuf {
    PathBuf::from(format!("/sys/class/net/{pf}/device/{file}"))
}

fn ifindex(pf: &str) -> Result<u32, SriovError> {
    std::fs::read_to_string(format!("/sys/class/net/{pf}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| SriovError::NoInterface(pf.to_string()))
}

/// Sends `msg` on rtnetlink and waits for the kernel's answer (0 or -errno).
fn rtnetlink(msg: &[u8]) -> Result<i32, SriovError> {
    let step = |step| move |source| SriovError::Netlink { step, source };
    let mut s = Socket::new(NETLINK_ROUTE).map_err(step("socket"))?;
    s.bind_auto().map_err(step("bind"))?;
    s.connect(&SocketAddr::new(0, 0)).map_err(step("connect"))?;
    s.send(msg, 0).map_err(step("send"))?;
    let (reply, _) = s.recv_from_full().map_err(step("receive"))?;
    let short = || SriovError::Reply("short netlink reply".into());
    // nlmsghdr (16 bytes), then for NLMSG_ERROR an i32 error code.
    let kind = reply
        .get(4..6)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or_else(short)?;
    let code = reply
        .get(16..20)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(short)?;
    if kind != NLMSG_ERROR {
        return Err(SriovError::Reply(format!(
            "unexpected netlink reply type {kind}"
        )));
    }
    Ok(code)
}

/// The PCI address of VF `vf` of `pf` (its `virtfnN` link).
fn vf_pci(pf: &str, vf: u32) -> Option<String> {
    let link = std::fs::read_link(sys(pf, &format!("virtfn{vf}"))).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Binds PCI device `pci` to kernel driver `driver`: its driver override
/// set, unbound from its driver, probed again (what `dpdk-devbind.py`
/// does). The driver must be loaded.
fn bind(pci: &str, driver: &str) -> Result<(), String> {
    let dev = PathBuf::from(format!("/sys/bus/pci/devices/{pci}"));
    if !PathBuf::from(format!("/sys/bus/pci/drivers/{driver}")).is_dir() {
        return Err(format!("no driver {driver:?} loaded (modprobe it)"));
    }
    let current = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    if current.as_deref() == Some(driver) {
        return Ok(());
    }
    let write = |path: PathBuf, v: &str| {
        std::fs::write(&path, v).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    write(dev.join("driver_override"), driver)?;
    if current.is_some() {
        write(dev.join("driver/unbind"), pci)?;
    }
    write(PathBuf::from("/sys/bus/pci/drivers_probe"), pci)?;
    let now = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    match now {
        Some(d) if d == driver => Ok(()),
        Some(d) => Err(format!("bound to {d} instead")),
        None => Err(format!("{driver} did not take it (see dmesg)")),
    }
}

/// The number in `pf`'s device file `file` (`sriov_totalvfs`,
/// `sriov_numvfs`): only an SR-IOV PF has them.
fn sys_count(pf: &str, file: &str) -> Result<u32, SriovError> {
    std::fs::read_to_string(sys(pf, file))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| SriovError::NotPf {
            pf: pf.to_string(),
            path: sys(pf, file),
        })
}

/// Carries out `req`; returns what was done, one line each.
pub fn run(req: &Request) -> Result<Vec<String>, SriovError> {
    let pf = req.pf.as_str();
    let index = ifindex(pf)?;
    let mut done = Vec::new();
    if let Some(n) = req.vfs {
        let total = sys_count(pf, "sriov_totalvfs")?;
        if n > total {
            return Err(SriovError::TooMany {
                pf: pf.to_string(),
                total,
                asked: n,
            });
        }
        let path = sys(pf, "sriov_numvfs");
        let write = |v: u32| {
            std::fs::write(&path, v.to_string()).map_err(|source| SriovError::Write {
                path: path.clone(),
                source,
            })
        };
        // The kernel only changes the count from or to zero.
        write(0)?;
        if n > 0 {
            write(n)?;
        }
        done.push(format!("{pf}: {n} VFs"));
        for i in 0..n {
            if let Some(pci) = vf_pci(pf, i) {
                done.push(format!("{pf}: VF {i} is {pci}"));
            }
        }
    }
    if let Some(vf) = req.vf {
        let msg = vf_message(req, index, vf, 1);
        if msg.is_none() && req.bind.is_none() {
            return Err(SriovError::NoSetting);
        }
        // The kernel's answer to a VF it lacks is a bare EINVAL: name it.
        let count = sys_count(pf, "sriov_numvfs")?;
        if vf >= count {
            return Err(SriovError::NoVf {
                pf: pf.to_string(),
                vf,
                count,
            });
        }
        if let Some(msg) = msg {
            match rtnetlink(&msg)? {
                0 => done.push(format!("{pf}: VF {vf} configured")),
                e => {
                    return Err(SriovError::Refused {
                        pf: pf.to_string(),
                        vf,
                        errno: -e,
                    });
                }
            }
        }
        if let Some(driver) = &req.bind {
            let Some(pci) = vf_pci(pf, vf) else {
                return Err(SriovError::Bind {
                    pf: pf.to_string(),
                    vf,
                    pci: String::new(),
                    driver: driver.clone(),
                    what: format!("no {} link", sys(pf, &format!("virtfn{vf}")).display()),
                });
            };
            bind(&pci, driver).map_err(|what| SriovError::Bind {
                pf: pf.to_string(),
                vf,
                pci: pci.clone(),
                driver: driver.clone(),
                what,
            })?;
            done.push(format!("{pf}: VF {vf} ({pci}) bound to {driver}"));
        }
    }
    if done.is_empty() {
        return Err(SriovError::NothingToDo);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_has_the_kernel_layout() {
        let req = Request {
            pf: "eth0".into(),
            vf: Some(3),
            mac: Some([2, 0, 0, 0, 0, 9]),
            vlan: Some(100),
            spoofchk: Some(true),
            trust: Some(false),
            ..Request::default()
        };
        let m = vf_message(&req, 7, 3, 42).unwrap();
        let u16_at = |i: usize| u16::from_ne_bytes([m[i], m[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
        // nlmsghdr
        assert_eq!(u32_at(0) as usize, m.len());
        assert_eq!((u16_at(4), u16_at(6), u32_at(8)), (RTM_SETLINK, 5, 42));
        // ifinfomsg: index 7
        assert_eq!(u32_at(20), 7);
        // IFLA_VFINFO_LIST > IFLA_VF_INFO > MAC (40), VLAN (16), SPOOFCHK (12), TRUST (12)
        assert_eq!(
            (u16_at(32), u16_at(34)),
            (4 + 4 + 40 + 16 + 12 + 12, IFLA_VFINFO_LIST)
        );
        assert_eq!(
            (u16_at(36), u16_at(38)),
            (4 + 40 + 16 + 12 + 12, IFLA_VF_INFO)
        );
        assert_eq!((u16_at(40), u16_at(42)), (40, IFLA_VF_MAC));
        assert_eq!(u32_at(44), 3);
        assert_eq!(&m[48..54], &[2, 0, 0, 0, 0, 9]);
        assert_eq!((u16_at(80), u16_at(82)), (16, IFLA_VF_VLAN));
        assert_eq!((u32_at(84), u32_at(88), u32_at(92)), (3, 100, 0));
        assert_eq!(
            (u16_at(96), u16_at(98), u32_at(100), u32_at(104)),
            (12, IFLA_VF_SPOOFCHK, 3, 1)
        );
        assert_eq!(
            (u16_at(108), u16_at(110), u32_at(112), u32_at(116)),
            (12, IFLA_VF_TRUST, 3, 0)
        );
        assert_eq!(m.len(), 120);
        assert!(vf_message(&Request::default(), 7, 0, 1).is_none());
    }

    #[test]
    fn missing_interfaces_and_capabilities_are_named() {
        let e = run(&Request {
            pf: "nosuchpf0".into(),
            vfs: Some(2),
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, "sriov: interface \"nosuchpf0\" does not exist");
        // Loopback is no PF: no sriov_totalvfs.
        let e = run(&Request {
            pf: "lo".into(),
            vfs: Some(2),
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("sriov: \"lo\" is not an SR-IOV physical function (no /sys/class/net/lo/device/sriov_totalvfs)"), "{e}");
        let e = run(&Request {
            pf: "lo".into(),
            vf: Some(0),
            ..Request::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--vf needs at least one of"), "{e}");
    }
}
