//! The bearer token of the control API's TCP endpoint.
//!
//! A loopback port, unlike the unix socket (mode 0600), is open to every
//! local user, so every request over TCP must carry the token (`Authorization:
//! Bearer TOKEN`, RFC 6750), read at start from a file only pollux's own user
//! can read. The token is compared in constant time and never logged or
//! printed (its `Debug` is redacted).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Shortest token accepted: 16 characters (a guessable token is no lock).
pub const MIN_LEN: usize = 16;
/// Longest token accepted.
pub const MAX_LEN: usize = 4096;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It could not be opened or read.
    #[error("token file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a regular file.
    #[error("token file {}: not a regular file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Group or others may read or write it.
    #[error(
        "token file {}: mode {mode:04o} lets group or others at it (chmod 600)",
        path.display()
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by another user than the one pollux runs as.
    #[error("token file {}: owned by uid {owner}, not by uid {me} that pollux runs as", path.display())]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// pollux's effective uid.
        me: u32,
    },
    /// The token is too short, too long, or has characters a header
    /// cannot carry.
    #[error(
        "token file {}: the token must be {MIN_LEN} to {MAX_LEN} visible ASCII characters (no spaces); it has {len} bytes",
        path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its length after trimming trailing whitespace.
        len: usize,
    },
}

/// A bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

impl Token {
    /// Reads the token from `path`: a regular file owned by the user pollux
    /// runs as, with no permission for group or others, holding the token
    /// (trailing whitespace, such as a newline, ignored).
    pub fn read(path: &Path) -> Result<Token, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        };
        // The checks are made on the file opened, not on the name (which
        // could be swapped between a check and the read); a symbolic link
        // is refused, and a FIFO does not block the open.
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(TokenError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Open {
                path: path.to_path_buf(),
                mode,
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(TokenError::Owner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        let mut text = String::new();
        // A little past the limit is enough to know it is too long.
        (&mut f)
            .take(MAX_LEN as u64 + 64)
            .read_to_string(&mut text)
            .map_err(io)?;
        let t = text.trim_end();
        if !(MIN_LEN..=MAX_LEN).contains(&t.len()) || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Malformed {
                path: path.to_path_buf(),
                len: t.len(),
            });
        }
        Ok(Token(t.to_string()))
    }

    /// The `Authorization` header's value that carries this token.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// True when `authorization` (the request's `Authorization` header, if
    /// any) is `Bearer` and this token; compared in constant time.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(h) = authorization else {
            return false;
        };
        let Some((scheme, given)) = h.trim().split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer")
            && bool::from(given.trim().as_bytes().ct_eq(self.0.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(tag: &str, text: &str, mode: u32) -> PathBuf {
        let p = std::env::temp_dir().join(format!("pollux-token-{tag}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_gives_the_token_and_only_it_is_admitted() {
        let p = file("ok", "0123456789abcdef-XYZ\n", 0o600);
        let t = Token::read(&p).unwrap();
        assert!(t.admits(Some("Bearer 0123456789abcdef-XYZ")));
        assert!(t.admits(Some("bearer 0123456789abcdef-XYZ")));
        for wrong in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer 0123456789abcdef-XY"),
            Some("Bearer 0123456789abcdef-XYZW"),
            Some("Basic 0123456789abcdef-XYZ"),
            Some("0123456789abcdef-XYZ"),
        ] {
            assert!(!t.admits(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{t:?}"), "Token(redacted)");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn open_short_or_odd_token_files_are_refused_by_name() {
        let p = file("open", "0123456789abcdef\n", 0o640);
        let e = Token::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("mode 0640") && e.contains(&p.display().to_string()),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
        let p = file("short", "short\n", 0o600);
        let e = Token::read(&p).unwrap_err().to_string();
        assert!(e.contains("16 to 4096") && e.contains("5 bytes"), "{e}");
        std::fs::remove_file(&p).unwrap();
        // A symbolic link, even to a good file, is not followed.
        let good = file("target", "0123456789abcdef\n", 0o600);
        let link = good.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(matches!(Token::read(&link), Err(TokenError::Io { .. })));
        assert!(Token::read(&good).is_ok());
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&good).unwrap();
        let p = file("space", "0123456789 abcdef\n", 0o600);
        assert!(matches!(Token::read(&p), Err(TokenError::Malformed { .. })));
        std::fs::remove_file(&p).unwrap();
        let e = Token::read(Path::new("/nonexistent/pollux.token"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/pollux.token"), "{e}");
        assert!(matches!(
            Token::read(Path::new("/tmp")),
            Err(TokenError::NotAFile { .. })
        ));
    }
}
