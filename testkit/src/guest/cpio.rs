//! A writer of "newc" cpio archives, the format of a Linux initramfs
//! (the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Written here rather than taken from a crate or the `cpio` program: the
//! guest image is assembled without root and without tools a fresh Debian
//! image lacks (it has no `cpio`), and an archive that holds device nodes
//! (`/dev/console`) needs no `mknod` when the node is only a header. The
//! archive stays uncompressed, which every kernel accepts.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An archive being written to `W`; [`Cpio::finish`] writes the trailer.
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: usize,
}

impl<W: Write> Cpio<W> {
    /// An empty archive writing to `out`.
    pub fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    /// A directory `path` (no leading `/`), mode `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// A regular file `path` with `data`, mode `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    /// A symbolic link `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node `path` (`major`, `minor`), mode `perm`.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name}: too large for a cpio entry")))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::other(format!("{name}: name too long")))?;
        let ino = self.ino;
        self.ino += 1;
        // magic, then 13 fields of 8 hex digits: ino, mode, uid, gid, nlink,
        // mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        // namesize, check.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len();
        Ok(())
    }

    /// Pads to the next multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry read back: name, mode, (rdev major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Reads an archive back, trailer excluded. Independent of the writer:
    /// fixed offsets from the format.
    fn parse(mut a: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut at = 0usize;
        loop {
            assert_eq!(&a[..6], b"070701", "magic at {at}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&a[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[110 + namesize - 1], 0);
            let data_at = (at + 110 + namesize).next_multiple_of(4) - at;
            let data = a[data_at..data_at + size].to_vec();
            let next = (at + data_at + size).next_multiple_of(4) - at;
            if name == "TRAILER!!!" {
                assert_eq!(next, a.len(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
            a = &a[next..];
            at += next;
        }
    }

    #[test]
    fn entries_read_back_with_their_kinds_and_alignment() {
        let mut c = Cpio::new(Vec::new());
        c.dir("dev", 0o755).unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        c.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        c.file("a", 0o644, b"12345").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        let a = c.finish().unwrap();
        assert_eq!(a.len() % 4, 0);
        let e = parse(&a);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "a", "bin/sh"]);
        assert_eq!(e[0].1, 0o040_755);
        assert_eq!((e[1].1, e[1].2), (0o020_600, (5, 1)));
        assert_eq!(
            (e[2].1, e[2].3.as_slice()),
            (0o100_755, &b"#!/bin/sh\n"[..])
        );
        assert_eq!(e[3].3, b"12345");
        assert_eq!((e[4].1, e[4].3.as_slice()), (0o120_777, &b"busybox"[..]));
    }

    /// The kernel's own reader is the final judge (the guest tests boot
    /// these archives); GNU cpio, where installed, is a second one.
    #[test]
    fn gnu_cpio_lists_what_was_written() {
        if !crate::require::met(&[crate::require::Need::Tool("cpio")]) {
            return;
        }
        let mut c = Cpio::new(Vec::new());
        c.dir("etc", 0o755).unwrap();
        c.file("etc/inittab", 0o644, b"::sysinit:/etc/rc\n")
            .unwrap();
        let a = c.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "etc\netc/inittab\n");
    }
}
