//! The guest image: Debian's cloud kernel (or its generic one) and an
//! initramfs built from busybox, the kernel modules the guest needs, the
//! guest's scripts and any host programs it runs.
//!
//! Everything comes from Debian packages fetched with `apt-get download`
//! (never installed on the host) and unpacked with `dpkg-deb -x`. The image
//! is built once and kept in the cache directory (`POLLUX_GUEST_CACHE`, by
//! default `target/guest` of the workspace), named by what it is made of,
//! so every test process of a run (and later runs) shares one build. Files
//! are written under temporary names and renamed, so processes building at
//! the same time do not see each other's halves.

use super::GuestError;
use super::cpio::Cpio;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Debian's metapackage of the cloud kernel (virtio drivers, fast boot).
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// Debian's metapackage of the generic kernel: every driver (the cloud
/// kernel has no `igb` or `igbvf`; neither has vfio's no-IOMMU mode).
const GENERIC_KERNEL_META: &str = "linux-image-amd64";
/// The static busybox: the guest's whole userland.
const BUSYBOX: &str = "busybox-static";

/// The version of the image's layout (initramfs contents, scripts'
/// interface): part of the cache key, raised when the layout changes.
const FORMAT: &str = "pollux-guest-2";

/// Modules every guest loads (with what they depend on, found from the
/// modules' own `depends=` tags: the package has no `modules.dep`).
pub const MODULES: &[&str] = &["virtio_pci", "virtio_net"];

/// What an image holds beyond busybox, the virtio modules and the scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Contents {
    /// Debian's generic kernel instead of the cloud one.
    pub generic_kernel: bool,
    /// More modules loaded at boot, in this order (after their
    /// dependencies).
    pub modules: Vec<String>,
    /// Host programs (names on `PATH`, copied to the same path, or
    /// absolute paths, copied to `/usr/local/bin`), with the shared
    /// libraries `ldd` lists, at their paths.
    pub tools: Vec<String>,
    /// Host shared objects (absolute paths) copied likewise: libraries a
    /// program loads itself, as DPDK's EAL loads its drivers.
    pub libs: Vec<String>,
}

/// A built guest image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`), an uncompressed cpio archive.
    pub initrd: PathBuf,
    /// The kernel's release (`uname -r` in the guest).
    pub release: String,
}

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("POLLUX_GUEST_CACHE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"),
    }
}

/// The image, built on first use in this process (or found in the cache).
pub fn image() -> Result<Image, GuestError> {
    image_of(&Contents::default())
}

/// The image with host programs `tools` added (found on `PATH`, copied
/// with the shared libraries `ldd` lists, at the same paths), as the
/// benchmarks' guests need (`sockperf`, `iperf3`).
pub fn image_with(tools: &[&str]) -> Result<Image, GuestError> {
    image_of(&Contents {
        tools: tools.iter().map(|t| t.to_string()).collect(),
        ..Contents::default()
    })
}

/// The image holding `contents`, built on first use in this process (or
/// found in the cache).
pub fn image_of(contents: &Contents) -> Result<Image, GuestError> {
    type Built = BTreeMap<Contents, Result<Image, GuestError>>;
    static IMAGES: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = IMAGES
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| GuestError::Image("image cache lock".into()))?;
    built
        .entry(contents.clone())
        .or_insert_with(|| build(&cache_dir(), contents))
        .clone()
}

/// A host program's path: `tool` itself if absolute, else found on `PATH`.
fn tool_path(tool: &str) -> Result<PathBuf, GuestError> {
    if tool.starts_with('/') {
        let p = PathBuf::from(tool);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(GuestError::Image(format!("{tool}: no such file")))
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| GuestError::Image(format!("{tool}: not on PATH (install it)")))
}

/// Host files of the program or library at `path`: (path in the guest,
/// contents), the file first, then its libraries and loader.
fn files_with_libs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, GuestError> {
    let mut paths = vec![path.to_path_buf()];
    let ldd = run(Command::new("ldd").arg(path))?;
    for l in ldd.lines() {
        // "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let file = match l.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(f) = file.filter(|f| f.starts_with('/')) {
            paths.push(PathBuf::from(f));
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).map_err(|e| io(&p, e))?;
            let name = p.to_string_lossy().trim_start_matches('/').to_string();
            Ok((name, data))
        })
        .collect()
}

fn run(cmd: &mut Command) -> Result<String, GuestError> {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| GuestError::Tool(what.clone(), e.to_string()))?;
    if !out.status.success() {
        return Err(GuestError::Tool(
            what,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The package kernel metapackage `meta` depends on (its versioned image).
fn kernel_package(meta: &str) -> Result<String, GuestError> {
    let deps = run(Command::new("apt-cache").args(["depends", meta]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| {
            GuestError::Image(format!(
                "apt-cache depends {meta} names no linux-image package (run apt-get update)"
            ))
        })
}

/// The `.deb` of `package` in `dir`, downloaded if it is not there yet.
fn deb(dir: &Path, package: &str) -> Result<PathBuf, GuestError> {
    let find = || -> Option<PathBuf> {
        let prefix = format!("{package}_");
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // Downloaded into a directory of its own, then moved into place.
    let tmp = dir.join(format!(".dl-{package}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&tmp))?;
    for e in std::fs::read_dir(&tmp).map_err(|e| io(&tmp, e))? {
        let p = e.map_err(|e| io(&tmp, e))?.path();
        if let Some(name) = p.file_name() {
            std::fs::rename(&p, dir.join(name)).map_err(|e| io(&p, e))?;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    find().ok_or_else(|| GuestError::Image(format!("apt-get download {package} left no .deb")))
}

/// `deb` unpacked into `dir/<deb name>/` (once).
fn unpack(dir: &Path, deb: &Path) -> Result<PathBuf, GuestError> {
    let name = deb
        .file_stem()
        .and_then(|n| n.to_str())
        .ok_or_else(|| GuestError::Image(format!("{}: not a package name", deb.display())))?;
    let target = dir.join(name);
    if target.is_dir() {
        return Ok(target);
    }
    let tmp = dir.join(format!(".x-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    if std::fs::rename(&tmp, &target).is_err() && !target.is_dir() {
        return Err(GuestError::Image(format!(
            "cannot move {} to {}",
            tmp.display(),
            target.display()
        )));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(target)
}

fn io(p: &Path, e: std::io::Error) -> GuestError {
    GuestError::Image(format!("{}: {e}", p.display()))
}

/// The value of `key=` in a module's `.modinfo` strings (NUL-separated
/// `key=value` pairs).
fn modinfo<'a>(ko: &'a [u8], key: &str) -> Option<&'a str> {
    let pat = format!("\0{key}=");
    let at = ko.windows(pat.len()).position(|w| w == pat.as_bytes())? + pat.len();
    let end = ko[at..].iter().position(|&b| b == 0)? + at;
    std::str::from_utf8(&ko[at..end]).ok()
}

/// Every `.ko` under `dir`, by module name (`-` and `_` are the same in
/// module names; the name uses `_`).
fn module_files(dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), GuestError> {
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let p = e.map_err(|e| io(dir, e))?.path();
        if p.is_dir() {
            module_files(&p, out)?;
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            out.push((stem.replace('-', "_"), p));
        }
    }
    Ok(())
}

/// The modules `wanted` and what they depend on, dependencies first, as
/// (name, file contents).
pub fn modules_in_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, GuestError> {
    let mut files = Vec::new();
    module_files(modules_dir, &mut files)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        files: &[(String, PathBuf)],
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), GuestError> {
        if seen.contains(name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(GuestError::Image(format!("module {name}: dependency loop")));
        }
        let (_, path) = files.iter().find(|(n, _)| n == name).ok_or_else(|| {
            GuestError::Image(format!(
                "module {name} not in the kernel package (built in? then leave it out)"
            ))
        })?;
        let ko = std::fs::read(path).map_err(|e| io(path, e))?;
        for dep in modinfo(&ko, "depends").unwrap_or("").split(',') {
            if !dep.is_empty() {
                visit(&dep.replace('-', "_"), files, seen, order, depth + 1)?;
            }
        }
        seen.insert(name.to_string());
        order.push((name.to_string(), ko));
        Ok(())
    }
    for w in wanted {
        visit(w, &files, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// FNV-1a, to name a build by what went into it (stable across Rust
/// versions, unlike `DefaultHasher`).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn build(cache: &Path, contents: &Contents) -> Result<Image, GuestError> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| io(&debs, e))?;
    let kernel_pkg = kernel_package(if contents.generic_kernel {
        GENERIC_KERNEL_META
    } else {
        KERNEL_META
    })?;
    let kdeb = deb(&debs, &kernel_pkg)?;
    let bdeb = deb(&debs, BUSYBOX)?;
    let kdir = unpack(&debs, &kdeb)?;
    let bdir = unpack(&debs, &bdeb)?;
    let release = kernel_pkg
        .strip_prefix("linux-image-")
        .unwrap_or(&kernel_pkg)
        .to_string();
    let kernel = kdir.join("boot").join(format!("vmlinuz-{release}"));
    let modules_dir = ["lib", "usr/lib"]
        .iter()
        .map(|l| kdir.join(l).join("modules").join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            GuestError::Image(format!("no modules of {release} in {}", kdir.display()))
        })?;
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|b| bdir.join(b))
        .find(|p| p.is_file())
        .ok_or_else(|| GuestError::Image(format!("no busybox in {}", bdir.display())))?;
    let names = |p: &Path| {
        p.file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default()
    };
    // Programs share libraries: each file once. Their contents are part of
    // the key (a host upgrade makes a new image).
    let mut extra = BTreeMap::new();
    for t in &contents.tools {
        let mut files = files_with_libs(&tool_path(t)?)?;
        // A program given by its path (a build's output, under a /tmp the
        // guest mounts over) goes to /usr/local/bin.
        if let (true, Some(first), Some(name)) = (
            t.starts_with('/'),
            files.first_mut(),
            Path::new(t).file_name(),
        ) {
            first.0 = format!("usr/local/bin/{}", name.to_string_lossy());
        }
        extra.extend(files);
    }
    for l in &contents.libs {
        extra.extend(files_with_libs(Path::new(l))?);
    }
    let modules_wanted: Vec<&str> = MODULES
        .iter()
        .copied()
        .chain(contents.modules.iter().map(String::as_str))
        .collect();
    let extra: Vec<(String, Vec<u8>)> = extra.into_iter().collect();
    let parts: Vec<&[u8]> = extra
        .iter()
        .flat_map(|(p, d)| [p.as_bytes(), d.as_slice()])
        .collect();
    let extra_key = fnv(&parts);
    let key = fnv(&[
        FORMAT.as_bytes(),
        &extra_key.to_le_bytes(),
        &names(&kdeb),
        &names(&bdeb),
        super::scripts::RC.as_bytes(),
        super::scripts::CMDLOOP.as_bytes(),
        super::scripts::INITTAB.as_bytes(),
        modules_wanted.join(",").as_bytes(),
        contents.tools.join(",").as_bytes(),
        contents.libs.join(",").as_bytes(),
    ]);
    let initrd = cache.join(format!("initrd-{key:016x}.cpio"));
    if !initrd.is_file() {
        let bb = std::fs::read(&busybox).map_err(|e| io(&busybox, e))?;
        let applets = run(Command::new(&busybox).arg("--list-full"))?;
        let modules = modules_in_order(&modules_dir, &modules_wanted)?;
        let tmp = cache.join(format!(".initrd-{}.cpio", std::process::id()));
        let f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        let w = write_initrd(std::io::BufWriter::new(f), &bb, &applets, &modules, &extra)
            .map_err(|e| io(&tmp, e))?;
        w.into_inner()
            .map_err(|e| io(&tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &initrd).map_err(|e| io(&initrd, e))?;
    }
    // Images are named by what went in (a test's own build among it), so
    // old ones pile up: this one is marked used, those unused for a day go.
    if let Ok(f) = std::fs::File::options().append(true).open(&initrd) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
    prune(cache, &initrd);
    Ok(Image {
        kernel,
        initrd,
        release,
    })
}

/// Removes the images in `cache` other than `keep` that no process has
/// used for a day.
fn prune(cache: &Path, keep: &Path) {
    let day = std::time::Duration::from_secs(24 * 3600);
    let Ok(dir) = std::fs::read_dir(cache) else {
        return;
    };
    for e in dir.filter_map(Result::ok) {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if p != keep && name.starts_with("initrd-") && name.ends_with(".cpio") && old {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// The initramfs: busybox with a link per applet (`applets`: its
/// `--list-full` output), the modules in load order (`/lib/modules/NN-name.ko`),
/// `/dev/console` (the kernel opens it before anything mounts devtmpfs)
/// the guest's scripts, and `extra` files (path without the leading `/`,
/// contents) with their directories.
fn write_initrd<W: std::io::Write>(
    out: W,
    busybox: &[u8],
    applets: &str,
    modules: &[(String, Vec<u8>)],
    extra: &[(String, Vec<u8>)],
) -> std::io::Result<W> {
    let mut c = Cpio::new(out);
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "www",
        "lib",
        "lib/modules",
        "root",
    ] {
        c.dir(d, 0o755)?;
    }
    c.char_dev("dev/console", 0o600, 5, 1)?;
    c.file("bin/busybox", 0o755, busybox)?;
    for a in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if a != "bin/busybox" {
            c.symlink(a, "/bin/busybox")?;
        }
    }
    c.symlink("init", "/bin/busybox")?;
    for (i, (name, ko)) in modules.iter().enumerate() {
        c.file(&format!("lib/modules/{i:02}-{name}.ko"), 0o644, ko)?;
    }
    c.file("etc/inittab", 0o644, super::scripts::INITTAB.as_bytes())?;
    c.file("etc/rc", 0o755, super::scripts::RC.as_bytes())?;
    c.file("bin/cmdloop", 0o755, super::scripts::CMDLOOP.as_bytes())?;
    let mut dirs: BTreeSet<String> = ["bin", "usr", "usr/bin", "lib", "etc", "sbin", "usr/sbin"]
        .into_iter()
        .map(String::from)
        .collect();
    for (path, data) in extra {
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |x| x.1)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if dirs.insert(parent.clone()) {
                c.dir(&parent, 0o755)?;
            }
        }
        c.file(path, 0o755, data)?;
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_reads_a_key_between_nuls() {
        let ko = b"\x7fELF....\0license=GPL\0depends=failover,virtio_ring\0name=net_failover\0";
        assert_eq!(modinfo(ko, "depends"), Some("failover,virtio_ring"));
        assert_eq!(modinfo(ko, "name"), Some("net_failover"));
        assert_eq!(modinfo(ko, "vermagic"), None);
    }

    #[test]
    fn modules_come_dependencies_first_once_each() {
        let dir = std::env::temp_dir().join(format!("testkit-mods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kernel/net")).unwrap();
        let ko = |deps: &str| format!("ELF\0depends={deps}\0").into_bytes();
        std::fs::write(
            dir.join("kernel/net/virtio_net.ko"),
            ko("net_failover,virtio"),
        )
        .unwrap();
        std::fs::write(dir.join("kernel/net_failover.ko"), ko("failover")).unwrap();
        std::fs::write(dir.join("kernel/failover.ko"), ko("")).unwrap();
        std::fs::write(dir.join("kernel/virtio.ko"), ko("")).unwrap();
        std::fs::write(dir.join("kernel/virtio-pci.ko"), ko("virtio")).unwrap();
        let names: Vec<String> = modules_in_order(&dir, &["virtio_pci", "virtio_net"])
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        let err = modules_in_order(&dir, &["igb"]).unwrap_err().to_string();
        assert!(
            err.contains("module igb not in the kernel package"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
