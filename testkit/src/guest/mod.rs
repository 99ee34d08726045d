//! Real virtual machines for tests and benchmarks: QEMU guests running
//! Debian's cloud kernel and a busybox initramfs, with virtio-net NICs on
//! vhost-user sockets (QEMU is the server, the switch under test connects
//! as client), driven through a command channel on their second serial
//! port.
//!
//! ```no_run
//! use testkit::guest::{Guest, Nic, Spec};
//! let dir = std::path::Path::new("/tmp/lab");
//! let mut g = Guest::start(dir, Spec::new("web1").nic(Nic::new(
//!     dir.join("web1.sock"), "02:00:00:00:00:04", "10.1.0.4/16",
//! ))).unwrap();
//! // ... start the switch, whose net_vhost port connects to web1.sock ...
//! g.wait_ready(std::time::Duration::from_secs(120)).unwrap();
//! let out = g.run("ip -4 addr", std::time::Duration::from_secs(10)).unwrap();
//! assert_eq!(out.status, 0);
//! ```
//!
//! QEMU waits for the vhost-user backend before the guest runs, so the
//! switch must connect (pollux's `client=1` ports retry every second)
//! before [`Guest::wait_ready`] can succeed. The accelerator is KVM where
//! KVM really runs a guest (tested once per process by booting one), and
//! TCG emulation otherwise; [`accel`] says which and why.

pub mod cpio;
pub mod image;
mod scripts;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What went wrong with a guest or its image.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuestError {
    /// The image could not be built.
    #[error("guest image: {0}")]
    Image(String),
    /// A host program failed.
    #[error("{0} failed: {1}")]
    Tool(String, String),
    /// A guest did not do what was asked.
    #[error("guest {name}: {what}")]
    Guest {
        /// The guest's name.
        name: String,
        /// What happened, with the tail of its console.
        what: String,
    },
}

/// The accelerator guests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG (software emulation)",
        })
    }
}

/// The accelerator for this process's guests and why: `POLLUX_GUEST_ACCEL`
/// (`kvm` or `tcg`) if set; otherwise KVM when `/dev/kvm` exists and a
/// guest booted on it (some KVMs, such as PVM-based ones, refuse standard
/// guests), TCG otherwise.
pub fn accel() -> (Accel, &'static str) {
    static ACCEL: OnceLock<(Accel, String)> = OnceLock::new();
    let (a, why) = ACCEL.get_or_init(|| match std::env::var("POLLUX_GUEST_ACCEL").as_deref() {
        Ok("kvm") => (Accel::Kvm, "POLLUX_GUEST_ACCEL=kvm".into()),
        Ok("tcg") => (Accel::Tcg, "POLLUX_GUEST_ACCEL=tcg".into()),
        _ if !Path::new("/dev/kvm").exists() => (Accel::Tcg, "no /dev/kvm".into()),
        _ => match kvm_boots() {
            Ok(()) => (Accel::Kvm, "a guest booted on /dev/kvm".into()),
            Err(e) => (Accel::Tcg, format!("KVM cannot run a guest here: {e}")),
        },
    });
    (*a, why.as_str())
}

/// Boots the image once on KVM, to the point where its init runs.
fn kvm_boots() -> Result<(), String> {
    let img = image::image().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("pollux-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let console = dir.join("console");
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "256M",
        ])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .args(["-append", "console=ttyS0 panic=-1 pollux.probe=1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    let end = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let seen = std::fs::read_to_string(&console).unwrap_or_default();
        if seen.contains("@@PROBE-OK") {
            break Ok(());
        }
        match child.try_wait() {
            Ok(Some(_)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                break Err(format!("QEMU exited: {}", last_line(&err)));
            }
            Ok(None) if Instant::now() > end => break Err("no guest init within 60 s".into()),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn last_line(s: &str) -> &str {
    s.trim().lines().last().unwrap_or("")
}

/// One virtio-net NIC on a vhost-user socket (or on a tap device).
#[derive(Debug, Clone)]
pub struct Nic {
    /// The socket QEMU listens on (the switch connects to it).
    pub socket: PathBuf,
    /// Instead of vhost-user: this tap device (QEMU's own virtio-net
    /// backend, as a kernel-switched VM has), created by QEMU if missing.
    pub tap: Option<String>,
    /// The NIC's MAC address.
    pub mac: String,
    /// The guest's address on it, with its prefix length (`10.1.0.4/16`).
    pub cidr: String,
    /// The default gateway through it, if any.
    pub gateway: Option<String>,
    /// Queue pairs (multi-queue virtio-net when above 1).
    pub queues: u16,
    /// An emulated Intel 82576 (`igb`, with SR-IOV) on a tap device
    /// instead of virtio-net: the guest's machine becomes a q35 with an
    /// emulated IOMMU, which DPDK's vfio needs for the device's VFs.
    pub igb: bool,
    /// Whether the virtio-net device tells the guest its link state
    /// (`VIRTIO_NET_F_STATUS`). Without it the guest's link is always up:
    /// a vhost-user backend that reconnects (a switch replaced under the
    /// guest) is no link loss to it.
    pub link_status: bool,
}

impl Nic {
    /// A single-queue NIC without a gateway.
    pub fn new(socket: PathBuf, mac: &str, cidr: &str) -> Nic {
        Nic {
            socket,
            tap: None,
            mac: mac.into(),
            cidr: cidr.into(),
            gateway: None,
            queues: 1,
            igb: false,
            link_status: true,
        }
    }

    /// An emulated igb (82576, SR-IOV capable) on tap device `ifname`,
    /// with MAC `mac` and no address in the guest (`cidr` empty).
    pub fn igb(ifname: &str, mac: &str) -> Nic {
        Nic {
            tap: Some(ifname.into()),
            igb: true,
            ..Nic::new(PathBuf::new(), mac, "")
        }
    }

    /// With a default route through `gw`.
    pub fn gateway(mut self, gw: &str) -> Nic {
        self.gateway = Some(gw.into());
        self
    }

    /// With `n` queue pairs.
    pub fn queues(mut self, n: u16) -> Nic {
        self.queues = n;
        self
    }

    /// Without link state for the guest (`status=off`: see
    /// [`Nic::link_status`]).
    pub fn without_link_status(mut self) -> Nic {
        self.link_status = false;
        self
    }

    /// On tap device `ifname` instead of a vhost-user socket.
    pub fn tap(mut self, ifname: &str) -> Nic {
        self.tap = Some(ifname.into());
        self
    }
}

/// What a guest is.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its name (host name, and `index.html` of its web root).
    pub name: String,
    /// Memory in MiB (a shared memfd, which vhost-user needs).
    pub memory_mb: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Its NICs.
    pub nics: Vec<Nic>,
    /// Whether a reboot inside the guest restarts it (otherwise QEMU exits).
    pub reboot: bool,
    /// Host CPUs QEMU may run on (`taskset -c` list), if restricted.
    pub host_cpus: Option<String>,
    /// Host programs added to the image ([`image::image_with`]).
    pub tools: Vec<String>,
    /// The network namespace QEMU runs in (where its tap devices are).
    pub netns: Option<String>,
    /// Debian's generic kernel (igb, igbvf, vfio) instead of the cloud one.
    pub generic_kernel: bool,
    /// More modules loaded at boot.
    pub modules: Vec<String>,
    /// Host shared objects added to the image with their libraries.
    pub libs: Vec<String>,
    /// 2 MiB huge pages reserved at boot.
    pub hugepages: u32,
}

impl Spec {
    /// A 1-CPU, 192 MiB guest without NICs.
    pub fn new(name: &str) -> Spec {
        Spec {
            name: name.into(),
            memory_mb: 192,
            cpus: 1,
            nics: Vec::new(),
            reboot: false,
            host_cpus: None,
            tools: Vec::new(),
            netns: None,
            generic_kernel: false,
            modules: Vec::new(),
            libs: Vec::new(),
            hugepages: 0,
        }
    }

    /// On Debian's generic kernel, loading `modules` at boot too.
    pub fn generic_kernel(mut self, modules: &[&str]) -> Spec {
        self.generic_kernel = true;
        self.modules = modules.iter().map(|m| m.to_string()).collect();
        self
    }

    /// Loading `modules` at boot too (with what they depend on).
    pub fn modules(mut self, modules: &[&str]) -> Spec {
        self.modules = modules.iter().map(|m| m.to_string()).collect();
        self
    }

    /// With host shared objects `libs` (absolute paths) in its image.
    pub fn libs(mut self, libs: &[&str]) -> Spec {
        self.libs = libs.iter().map(|l| l.to_string()).collect();
        self
    }

    /// With `n` 2 MiB huge pages reserved at boot.
    pub fn hugepages(mut self, n: u32) -> Spec {
        self.hugepages = n;
        self
    }

    /// With host programs `tools` in its image.
    pub fn tools(mut self, tools: &[&str]) -> Spec {
        self.tools = tools.iter().map(|t| t.to_string()).collect();
        self
    }

    /// QEMU run in network namespace `ns`.
    pub fn netns(mut self, ns: &str) -> Spec {
        self.netns = Some(ns.into());
        self
    }

    /// Its image.
    pub fn image(&self) -> Result<image::Image, GuestError> {
        image::image_of(&image::Contents {
            generic_kernel: self.generic_kernel,
            modules: self.modules.clone(),
            tools: self.tools.clone(),
            libs: self.libs.clone(),
        })
    }

    /// With one more NIC.
    pub fn nic(mut self, nic: Nic) -> Spec {
        self.nics.push(nic);
        self
    }

    /// With `mb` MiB of memory.
    pub fn memory(mut self, mb: u32) -> Spec {
        self.memory_mb = mb;
        self
    }

    /// With `n` virtual CPUs.
    pub fn cpus(mut self, n: u32) -> Spec {
        self.cpus = n;
        self
    }

    /// A reboot in the guest restarts it rather than ending QEMU.
    pub fn rebootable(mut self) -> Spec {
        self.reboot = true;
        self
    }

    /// QEMU confined to host CPUs `list` (`taskset -c` syntax).
    pub fn host_cpus(mut self, list: &str) -> Spec {
        self.host_cpus = Some(list.into());
        self
    }

    /// QEMU's command line for this guest (the program first).
    pub fn command(&self, img: &image::Image, accel: Accel, dir: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            a.extend(["ip".into(), "netns".into(), "exec".into(), ns.clone()]);
        }
        if let Some(cpus) = &self.host_cpus {
            a.extend(["taskset".into(), "-c".into(), cpus.clone()]);
        }
        let mem = self.memory_mb;
        let name = &self.name;
        let mut append =
            format!("console=ttyS0 panic=-1 loglevel=4 ipv6.disable=1 pollux.name={name}");
        for n in self.nics.iter().filter(|n| !n.cidr.is_empty()) {
            append.push_str(&format!(" pollux.net={},{}", n.mac, n.cidr));
            if let Some(gw) = &n.gateway {
                append.push_str(&format!(",{gw}"));
            }
        }
        // An igb's VFs are for vfio, which needs an IOMMU: q35 with
        // QEMU's emulated Intel IOMMU (the guest's kernel has no vfio
        // no-IOMMU mode).
        let iommu = self.nics.iter().any(|n| n.igb);
        if iommu {
            append.push_str(" intel_iommu=on");
        }
        if self.hugepages > 0 {
            append.push_str(&format!(" hugepagesz=2M hugepages={}", self.hugepages));
        }
        let (accel, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let machine = if iommu {
            "q35,memory-backend=mem"
        } else {
            "pc,memory-backend=mem"
        };
        a.extend(
            [
                "qemu-system-x86_64",
                "-name",
                name,
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-machine",
                machine,
                "-accel",
                accel,
                "-cpu",
                cpu,
            ]
            .map(String::from),
        );
        a.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-kernel".into(),
            img.kernel.display().to_string(),
            "-initrd".into(),
            img.initrd.display().to_string(),
            "-append".into(),
            append,
            "-chardev".into(),
            format!(
                "file,id=con,path={}",
                dir.join(format!("{name}.console")).display()
            ),
            "-serial".into(),
            "chardev:con".into(),
            "-chardev".into(),
            format!(
                "socket,id=cmd,path={}",
                dir.join(format!("{name}.cmd")).display()
            ),
            "-serial".into(),
            "chardev:cmd".into(),
        ]);
        if iommu {
            a.extend(["-device".into(), "intel-iommu".into()]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            if let (true, Some(tap)) = (n.igb, &n.tap) {
                // On a root port of its own (SR-IOV is a PCI Express
                // capability; the VFs live on the port's bus).
                a.push("-netdev".into());
                a.push(format!(
                    "tap,id=n{i},ifname={tap},script=no,downscript=no,vhost=off"
                ));
                a.push("-device".into());
                a.push(format!(
                    "pcie-root-port,id=rp{i},chassis={},slot={}",
                    i + 1,
                    i + 1
                ));
                a.push("-device".into());
                a.push(format!("igb,bus=rp{i},netdev=n{i},mac={},romfile=", n.mac));
                continue;
            }
            if let Some(tap) = &n.tap {
                a.push("-netdev".into());
                a.push(format!(
                    "tap,id=n{i},ifname={tap},script=no,downscript=no,vhost=off"
                ));
                a.push("-device".into());
                a.push(format!("virtio-net-pci,netdev=n{i},mac={},romfile=", n.mac));
                continue;
            }
            a.push("-chardev".into());
            a.push(format!(
                "socket,id=vu{i},path={},server=on,wait=off",
                n.socket.display()
            ));
            a.push("-netdev".into());
            a.push(format!(
                "vhost-user,id=n{i},chardev=vu{i},queues={}",
                n.queues
            ));
            a.push("-device".into());
            let mut dev = format!("virtio-net-pci,netdev=n{i},mac={},romfile=", n.mac);
            if n.queues > 1 {
                dev.push_str(&format!(",mq=on,vectors={}", 2 * u32::from(n.queues) + 2));
            }
            if !n.link_status {
                dev.push_str(",status=off");
            }
            a.push(dev);
        }
        if !self.reboot {
            a.push("-no-reboot".into());
        }
        a
    }
}

/// What a command printed (stdout and stderr together) and its status.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status (137 when the harness's timeout killed it).
    pub status: i32,
    /// Output.
    pub out: String,
}

/// Bytes read from the command channel, for any number of waiters.
#[derive(Default)]
struct Chan {
    state: Mutex<ChanState>,
    more: Condvar,
}

#[derive(Default)]
struct ChanState {
    buf: Vec<u8>,
    writer: Option<UnixStream>,
    connections: u32,
}

/// A running guest. Dropping it ends QEMU.
pub struct Guest {
    /// Its spec.
    pub spec: Spec,
    /// Where its console log, channel log and sockets are.
    pub dir: PathBuf,
    child: Option<Child>,
    chan: Arc<Chan>,
    /// Where in the channel's bytes the next answer is looked for.
    seen: usize,
    /// The boot id of the boot last seen.
    pub boot_id: String,
    accel: Accel,
}

fn token() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Guest {
    /// Builds the image (first time in this process) and starts QEMU for
    /// `spec`, its files in `dir`. The guest runs once the switch has
    /// connected to its NICs' sockets; [`Guest::wait_ready`] waits for it.
    pub fn start(dir: &Path, spec: Spec) -> Result<Guest, GuestError> {
        let img = spec.image()?;
        let (accel, _) = accel();
        let chan = Arc::new(Chan::default());
        let cmd_sock = dir.join(format!("{}.cmd", spec.name));
        let _ = std::fs::remove_file(&cmd_sock);
        let listener = UnixListener::bind(&cmd_sock).map_err(|e| GuestError::Guest {
            name: spec.name.clone(),
            what: format!("{}: {e}", cmd_sock.display()),
        })?;
        // Every connection QEMU makes (a new QEMU on the same guest after
        // a restart makes a new one) becomes the channel; its bytes are
        // kept, and logged to NAME.chan.
        let log_path = dir.join(format!("{}.chan", spec.name));
        let c = chan.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(&log_path).ok();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                if let Ok(mut st) = c.state.lock() {
                    st.writer = conn.try_clone().ok();
                    st.connections += 1;
                }
                let mut b = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut b) {
                    if let Some(l) = log.as_mut() {
                        let _ = l.write_all(&b[..n]);
                    }
                    if let Ok(mut st) = c.state.lock() {
                        st.buf.extend_from_slice(&b[..n]);
                    }
                    c.more.notify_all();
                }
            }
        });
        let mut g = Guest {
            spec,
            dir: dir.to_path_buf(),
            child: None,
            chan,
            seen: 0,
            boot_id: String::new(),
            accel,
        };
        g.spawn_qemu(&img)?;
        Ok(g)
    }

    /// The accelerator it runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn err(&self, what: impl Into<String>) -> GuestError {
        GuestError::Guest {
            name: self.spec.name.clone(),
            what: format!(
                "{}\n--- console (last 3 000 bytes) ---\n{}",
                what.into(),
                self.console_tail(3000)
            ),
        }
    }

    /// The last `n` bytes of its console.
    pub fn console_tail(&self, n: usize) -> String {
        let s =
            std::fs::read(self.dir.join(format!("{}.console", self.spec.name))).unwrap_or_default();
        String::from_utf8_lossy(&s[s.len().saturating_sub(n)..]).into_owned()
    }

    fn spawn_qemu(&mut self, img: &image::Image) -> Result<(), GuestError> {
        let argv = self.spec.command(img, self.accel, &self.dir);
        let log = self.dir.join(format!("{}.qemu", self.spec.name));
        let f =
            std::fs::File::create(&log).map_err(|e| self.err(format!("{}: {e}", log.display())))?;
        let f2 = f.try_clone().map_err(|e| self.err(e.to_string()))?;
        for n in &self.spec.nics {
            let _ = std::fs::remove_file(&n.socket);
        }
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| self.err(format!("{}: {e}", argv[0])))?;
        self.child = Some(child);
        Ok(())
    }

    /// QEMU's own messages.
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.qemu", self.spec.name)))
            .unwrap_or_default()
    }

    fn alive(&mut self) -> Result<(), GuestError> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(st))) => {
                let log = self.qemu_log();
                Err(self.err(format!("QEMU exited ({st}): {}", last_line(&log))))
            }
            _ => Err(self.err("QEMU is not running")),
        }
    }

    /// Writes one line to the channel.
    fn send(&self, line: &str) -> bool {
        let Ok(mut st) = self.chan.state.lock() else {
            return false;
        };
        match st.writer.as_mut() {
            Some(w) => w.write_all(line.as_bytes()).is_ok(),
            None => false,
        }
    }

    /// Waits until `done` finds what it looks for in the channel's bytes
    /// from `self.seen` on, or `limit` passes; `poke` runs every 500 ms
    /// (and first).
    fn wait_chan<T>(
        &mut self,
        limit: Duration,
        mut poke: impl FnMut(&Guest),
        mut done: impl FnMut(&[u8]) -> Option<(T, usize)>,
    ) -> Result<Option<T>, GuestError> {
        let end = Instant::now() + limit;
        let mut next_poke = Instant::now();
        loop {
            if Instant::now() >= next_poke {
                poke(self);
                next_poke = Instant::now() + Duration::from_millis(500);
            }
            {
                let st = self
                    .chan
                    .state
                    .lock()
                    .map_err(|_| self.err("channel lock"))?;
                let from = self.seen.min(st.buf.len());
                if let Some((v, used)) = done(&st.buf[from..]) {
                    self.seen = from + used;
                    return Ok(Some(v));
                }
                let wait = next_poke.min(end).saturating_duration_since(Instant::now());
                let _ = self
                    .chan
                    .more
                    .wait_timeout(st, wait.max(Duration::from_millis(1)));
            }
            self.alive()?;
            if Instant::now() >= end {
                return Ok(None);
            }
        }
    }

    /// Waits until the guest answers on its channel (it has booted) and
    /// returns its boot id.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<String, GuestError> {
        let tok = token();
        let ping = format!("{tok} @@PING\n");
        let pong = format!("@@PONG {tok} ");
        let found = self.wait_chan(
            limit,
            |g| {
                g.send(&ping);
            },
            |b| {
                let at = find(b, pong.as_bytes())? + pong.len();
                let end = at + b[at..].iter().position(|&c| c == b'\n')?;
                Some((String::from_utf8_lossy(&b[at..end]).trim().to_string(), end))
            },
        )?;
        match found {
            Some(id) => {
                self.boot_id = id.clone();
                Ok(id)
            }
            None => Err(self.err(format!("no answer on the command channel within {limit:?}"))),
        }
    }

    /// Waits until the guest has booted again (its boot id differs from
    /// `old`); returns the new one.
    pub fn wait_rebooted(&mut self, old: &str, limit: Duration) -> Result<String, GuestError> {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let id = self.wait_ready(left)?;
            if id != old {
                return Ok(id);
            }
            if Instant::now() >= end {
                return Err(self.err("did not reboot"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `cmd` (busybox `sh -c`) in the guest with no input; it is
    /// killed after `limit`. Commands are one line of printable text.
    pub fn run(&mut self, cmd: &str, limit: Duration) -> Result<Output, GuestError> {
        if cmd.chars().any(char::is_control) {
            return Err(self.err(format!("command {cmd:?} has control characters")));
        }
        let tok = token();
        let secs = limit.as_secs().max(1);
        let quoted = cmd.replace('\'', r"'\''");
        let line = format!("{tok} timeout -s KILL {secs} sh -c '{quoted}'\n");
        if !self.send(&line) {
            self.alive()?;
            return Err(self.err("command channel not connected"));
        }
        let begin = format!("@@BEGIN {tok}\n");
        let end_mark = format!("\n@@END {tok} ");
        let found = self.wait_chan(
            limit + Duration::from_secs(20),
            |_| {},
            |b| {
                let s = find(b, begin.as_bytes())? + begin.len();
                let e = s + find(&b[s..], end_mark.as_bytes())?;
                let st = e + end_mark.len();
                let nl = st + b[st..].iter().position(|&c| c == b'\n')?;
                let status = String::from_utf8_lossy(&b[st..nl])
                    .trim()
                    .parse()
                    .unwrap_or(-1);
                let out = String::from_utf8_lossy(&b[s..e]).into_owned();
                Some((Output { status, out }, nl + 1))
            },
        )?;
        found.ok_or_else(|| self.err(format!("{cmd:?}: no answer within {limit:?}")))
    }

    /// Starts `cmd` without waiting for any answer (one that ends the
    /// guest, such as `reboot -f`).
    pub fn start_command(&mut self, cmd: &str) -> Result<(), GuestError> {
        if cmd.chars().any(char::is_control) {
            return Err(self.err(format!("command {cmd:?} has control characters")));
        }
        if !self.send(&format!("{} {cmd}\n", token())) {
            self.alive()?;
            return Err(self.err("command channel not connected"));
        }
        Ok(())
    }

    /// Runs `cmd` and returns its output; an error unless it exits 0.
    pub fn ok(&mut self, cmd: &str, limit: Duration) -> Result<String, GuestError> {
        let o = self.run(cmd, limit)?;
        if o.status != 0 {
            return Err(self.err(format!("{cmd:?} exited {}: {}", o.status, o.out)));
        }
        Ok(o.out)
    }

    /// Ends QEMU (as a host crash or an operator's kill ends a VM).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts QEMU again for the same guest (after [`Guest::kill`]).
    pub fn restart(&mut self) -> Result<(), GuestError> {
        self.kill();
        let img = self.spec.image()?;
        self.spawn_qemu(&img)
    }

    /// How many times QEMU connected to the command channel.
    pub fn channel_connections(&self) -> u32 {
        self.chan.state.lock().map(|s| s.connections).unwrap_or(0)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        if let Ok(mut st) = self.chan.state.lock() {
            st.writer = None;
        }
    }
}
