//! A lab of network namespaces for end-to-end tests: each namespace has an
//! `eth0` that is one end of a veth pair whose other end stays in the root
//! namespace for pollux's `af_packet` ports. Everything (namespaces,
//! processes, files) is removed on drop, also when a test fails.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One namespace.
pub struct Ns {
    /// Namespace name.
    pub name: String,
    /// The veth end in the root namespace.
    pub host: String,
    /// Its short tag.
    pub tag: String,
}

/// Namespaces, processes and files of one run; all removed on drop.
pub struct Lab {
    /// Scratch directory.
    pub dir: PathBuf,
    /// What keeps this lab's names apart from other labs' (other test
    /// processes, and earlier labs of this one): five digits.
    id: u32,
    ns: Vec<Ns>,
    /// Processes to kill at the end.
    pub children: Vec<Child>,
    /// CPUs (`taskset -c` list) that commands run in namespaces are
    /// confined to, if set ([`Lab::pin_helpers`]).
    helpers_on: Option<String>,
}

impl Lab {
    /// An empty lab; `prefix` keeps names of different tests apart.
    pub fn new(prefix: &str) -> Lab {
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 10_000 * 10 + n % 10;
        let dir = std::env::temp_dir().join(format!("pollux-{prefix}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Lab {
            dir,
            id,
            ns: Vec::new(),
            children: Vec::new(),
            helpers_on: None,
        }
    }

    /// Adds namespace `tag` (at most 3 characters) whose `eth0` has `mac`,
    /// is up with segmentation offloads off (they would hand pollux 64 KB
    /// frames; checksum offload stays on, pollux completes those), and runs
    /// `setup` (commands inside the namespace). The host end is up, with
    /// IPv6 off so the root namespace adds no chatter.
    pub fn add(&mut self, tag: &str, mac: &str, setup: &[Vec<&str>]) {
        let id = self.id;
        let ns = Ns {
            name: format!("plx{id}{tag}"),
            host: format!("plx{id}{tag}h"),
            tag: tag.to_string(),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        sh(&["ip", "netns", "add", &ns.name]);
        self.ns.push(ns);
        let ns = self.ns.last().unwrap();
        sh(&[
            "ip", "link", "add", &ns.host, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ]);
        let _ = Command::new("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", ns.host)])
            .output();
        sh(&["ip", "link", "set", &ns.host, "up"]);
        let base = [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "link", "set", "eth0", "address", mac],
            vec![
                "ethtool", "-K", "eth0", "tso", "off", "gso", "off", "gro", "off",
            ],
        ];
        for cmd in base.iter().chain(setup) {
            self.exec(tag, cmd);
        }
        self.exec(tag, &["ip", "link", "set", "eth0", "up"]);
    }

    /// Namespace `tag`.
    pub fn ns(&self, tag: &str) -> &Ns {
        self.ns.iter().find(|n| n.tag == tag).unwrap()
    }

    /// Runs a command in namespace `tag`; panics if it fails.
    pub fn exec(&self, tag: &str, args: &[&str]) -> Output {
        let name = self.ns(tag).name.clone();
        let mut all = vec!["ip", "netns", "exec", name.as_str()];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// Confines what [`Lab::bash`] and [`Lab::spawn`] start from now on
    /// (clients, servers, generators; not pollux) to CPUs `cpus` (a
    /// `taskset -c` list): on a small machine a client the scheduler puts
    /// on pollux's busy-polling core takes turns with its worker, and what
    /// arrives meanwhile overflows the port's ring.
    pub fn pin_helpers(&mut self, cpus: &str) {
        self.helpers_on = Some(cpus.to_string());
    }

    /// `bash -c cmd` in namespace `tag`, on the helpers' CPUs if pinned.
    fn in_ns(&self, tag: &str, cmd: &str) -> Command {
        let ns = &self.ns(tag).name;
        let mut c = match &self.helpers_on {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus, "ip"]);
                c
            }
            None => Command::new("ip"),
        };
        c.args(["netns", "exec", ns, "bash", "-c", cmd]);
        c
    }

    /// Runs `cmd` with `bash -c` in namespace `tag`; returns its output
    /// whatever the exit status.
    pub fn bash(&self, tag: &str, cmd: &str) -> Output {
        self.in_ns(tag, cmd).output().unwrap()
    }

    /// Starts `cmd` (bash) in namespace `tag`, output to `log`.
    pub fn spawn(&mut self, tag: &str, cmd: &str, log: &Path) -> usize {
        let f = std::fs::File::create(log).unwrap();
        let child = self
            .in_ns(tag, cmd)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts python's http.server in namespace `tag`, bound to `ip` port
    /// `port`, serving `root`, output to `log`; returns when it listens (a
    /// request sent before would be refused, and through a load balancer
    /// only the requests Maglev sends to that backend would fail).
    pub fn http_server(
        &mut self,
        tag: &str,
        ip: &str,
        port: u16,
        root: &Path,
        log: &Path,
    ) -> usize {
        let cmd = format!(
            "exec python3 -u -m http.server {port} --bind {ip} --directory {}",
            root.display()
        );
        let idx = self.spawn(tag, &cmd, log);
        let listening = format!("ss -ltnH 'sport = :{port}' | grep -q .");
        assert!(
            wait_for(Duration::from_secs(30), || self
                .bash(tag, &listening)
                .status
                .success()),
            "http.server on {ip} port {port} in {tag} did not start listening: {}",
            read(log)
        );
        idx
    }

    /// Starts tcpdump in namespace `tag` with `args` (interface, filter)
    /// writing to `pcap` packet by packet; returns (its child index) once
    /// it captures: tcpdump writes the file's header when its capture is
    /// open. In immediate mode: otherwise the kernel hands packets over a
    /// block at a time, and what a block holds when tcpdump is stopped
    /// never reaches the file.
    pub fn capture(&mut self, tag: &str, args: &str, pcap: &Path) -> usize {
        let log = pcap.with_extension("log");
        let idx = self.spawn(
            tag,
            &format!(
                "exec tcpdump --immediate-mode -U -w {} {args}",
                pcap.display()
            ),
            &log,
        );
        let open = wait_for(Duration::from_secs(30), || {
            std::fs::metadata(pcap).is_ok_and(|m| m.len() >= 24)
        });
        assert!(open, "tcpdump did not start capturing: {}", read(&log));
        idx
    }

    /// Starts `cmd` (bash) in the root namespace, output to `log`.
    pub fn spawn_root(&mut self, cmd: &str, log: &Path) -> usize {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new("bash")
            .args(["-c", cmd])
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts `pollux run` on `config`, with a control socket
    /// ([`Lab::api`]) unless `config` has a `[control]` section; returns
    /// (child index, stdout file, stderr file). [`Lab::stop`] stops it.
    pub fn pollux(&mut self, name: &str, config: &str) -> (usize, PathBuf, PathBuf) {
        self.pollux_in(None, name, config)
    }

    /// [`Lab::pollux`] in namespace `tag` (`ip netns exec` execs pollux:
    /// the child is pollux itself), or the root namespace.
    pub fn pollux_in(
        &mut self,
        tag: Option<&str>,
        name: &str,
        config: &str,
    ) -> (usize, PathBuf, PathBuf) {
        let cfg = self.dir.join(format!("{name}.toml"));
        let config = if config.contains("[control]") {
            config.to_string()
        } else {
            format!(
                "[control]\nsocket = \"{}\"\n{config}",
                self.api(name).sock.display()
            )
        };
        std::fs::write(&cfg, config).unwrap();
        let out = self.dir.join(format!("{name}.out"));
        let log = self.dir.join(format!("{name}.log"));
        let mut cmd = self.pollux_cmd(tag);
        let child = cmd
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
        (self.children.len() - 1, out, log)
    }

    /// Starts `pollux run --takeover` on the control socket of the pollux
    /// started as `from` ([`Lab::pollux`]), with `args` added; returns
    /// (child index, stdout file, stderr file), named after `name`.
    pub fn pollux_takeover(
        &mut self,
        name: &str,
        from: &str,
        args: &[&str],
    ) -> (usize, PathBuf, PathBuf) {
        self.pollux_takeover_in(None, name, from, args)
    }

    /// [`Lab::pollux_takeover`] in namespace `tag` (where `from` runs).
    pub fn pollux_takeover_in(
        &mut self,
        tag: Option<&str>,
        name: &str,
        from: &str,
        args: &[&str],
    ) -> (usize, PathBuf, PathBuf) {
        let out = self.dir.join(format!("{name}.out"));
        let log = self.dir.join(format!("{name}.log"));
        let sock = self.api(from).sock;
        let mut cmd = self.pollux_cmd(tag);
        let child = cmd
            .args(["run", "--takeover", sock.to_str().unwrap()])
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
        (self.children.len() - 1, out, log)
    }

    /// The pollux binary to run in namespace `tag` (`ip netns exec` execs
    /// it: the child is pollux itself), or in the root namespace.
    fn pollux_cmd(&self, tag: Option<&str>) -> Command {
        match tag {
            Some(t) => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    &self.ns(t).name,
                    env!("CARGO_BIN_EXE_pollux"),
                ]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_pollux")),
        }
    }

    /// Adds namespace `tag` as a host of the lab's networks: `eth0` with
    /// `mac` and `cidr`, its default route via `gw`, IPv6 off.
    pub fn add_host(&mut self, tag: &str, cidr: &str, mac: &str, gw: &str) {
        self.add(
            tag,
            mac,
            &[
                vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                vec!["ip", "addr", "add", cidr, "dev", "eth0"],
            ],
        );
        self.exec(tag, &["ip", "route", "add", "default", "via", gw]);
    }

    /// The control API of the `pollux run` started as `name`.
    pub fn api(&self, name: &str) -> super::api::Api {
        super::api::Api {
            sock: self.dir.join(format!("{name}-ctl.sock")),
        }
    }

    /// Stops the `pollux run` started as child `idx` the way an operator
    /// does (SIGTERM) and waits for it; returns its exit status and its
    /// stop report (`out`, its stdout file).
    pub fn stop(&mut self, idx: usize, out: &Path) -> (std::process::ExitStatus, String) {
        terminate(&mut self.children[idx]);
        let status = self.children[idx].wait().unwrap();
        (status, read(out))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.ns {
            // Deleting a namespace deletes its veth pair with it.
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends SIGTERM to `child` (as an operator stops pollux) if it still runs,
/// or SIGKILL when SIGTERM cannot be sent; a child already reaped is left
/// alone (its pid may belong to another process by now).
pub fn terminate(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        let _ = child.kill();
    }
}

/// A python script that sends to argv[1]:argv[2] (IPv4 or IPv6) on a
/// connected UDP socket; exit status 0 when the kernel reports the port
/// unreachable (ECONNREFUSED: an ICMP or ICMPv6 error quoting exactly what
/// this socket sent came back).
pub const REFUSED_CLIENT: &str = "import socket, sys
family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(3):
    try:
        s.send(b'anyone?')
        s.recv(100)
    except ConnectionRefusedError:
        sys.exit(0)
    except socket.timeout:
        continue
sys.exit(1)
";

/// Echoes every UDP datagram to port 7007 of argv[1] (IPv4 or IPv6).
pub const UDP_ECHO_SERVER: &str = "import socket, sys
family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7007))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
";

/// Sends one 3 000-byte UDP datagram from a socket of its own on argv[1]
/// to argv[2]:argv[3] (IPv4 or IPv6) and waits for the same bytes back
/// (three tries); exit status 0 when they came. Through the socket (the
/// kernel fragments it), or with argv[4] = `reversed` as fragments
/// written by hand on a raw socket, the last first, a new identification
/// each try; the receiving kernel reassembles the datagram and checks its
/// UDP checksum, which the first fragment carries.
pub const FRAGMENT_CLIENT: &str = "import socket, struct, sys, random
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
v6 = ':' in dst
family = socket.AF_INET6 if v6 else socket.AF_INET
data = bytes((i * 11) % 251 for i in range(3000))
u = socket.socket(family, socket.SOCK_DGRAM)
u.bind((src, 0))
u.settimeout(2)
sport = u.getsockname()[1]
def csum(b):
    if len(b) % 2:
        b += b'\\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s > 0xffff:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
S, D = socket.inet_pton(family, src), socket.inet_pton(family, dst)
ulen = 8 + len(data)
if v6:
    pseudo = S + D + struct.pack('!IxxxB', ulen, 17)
else:
    pseudo = S + D + struct.pack('!BBH', 0, 17, ulen)
c = csum(pseudo + struct.pack('!HHHH', sport, dport, ulen, 0) + data) or 0xffff
payload = struct.pack('!HHHH', sport, dport, ulen, c) + data
# Fragment payloads: multiples of 8 bytes, each packet 1 496 bytes at most.
step = 1448 if v6 else 1472
def fragments(ident):
    out = []
    for off in range(0, len(payload), step):
        part = payload[off:off + step]
        more = 1 if off + step < len(payload) else 0
        if v6:
            ip = struct.pack('!IHBB16s16s', 6 << 28, 8 + len(part), 44, 64, S, D)
            out.append(ip + struct.pack('!BBHI', 17, 0, (off // 8) << 3 | more, ident) + part)
        else:
            h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(part), ident & 0xffff,
                            more << 13 | (off // 8), 64, 17, 0, S, D)
            out.append(h[:10] + struct.pack('!H', csum(h)) + h[12:] + part)
    return out
r = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    if sys.argv[4:] == ['reversed']:
        for f in reversed(fragments(random.randrange(1, 1 << 16))):
            r.sendto(f, (dst, 0))
    else:
        u.sendto(data, (dst, dport))
    try:
        got, _ = u.recvfrom(65535)
    except socket.timeout:
        continue
    sys.exit(0 if got == data else 2)
sys.exit(1)
";

/// Polls `what` every 50 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut what: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A file's text, empty if it cannot be read.
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
