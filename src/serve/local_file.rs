//! Confined reading of local image files for `serve --allow-paths DIR`.
//!
//! A client may name a file (`/abs/path`, `rel/path` relative to DIR, or either behind `file://`); it is read
//! only if it resolves, after `..` and every symlink (`canonicalize`), to a regular, non-empty file under DIR
//! no larger than the caller's byte limit. The file is opened `O_NOFOLLOW | O_NONBLOCK` (a FIFO or device
//! swapped in cannot block or feed us forever), checked with `fstat` on the open handle (not the path), and read
//! with a cap. Every refusal shows the client the same text, so it learns nothing about which files exist;
//! the reason is kept for the server log ([`NotAllowed::reason`]).

use std::fmt;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The directory local image paths are confined to (canonical: absolute, no symlinks, no `..`).
#[derive(Clone, Debug)]
pub struct AllowedDir {
    root: PathBuf,
}

/// A refused local path. `Display` is one generic text whatever the reason; [`NotAllowed::reason`] says what
/// happened, for the server's log only.
pub struct NotAllowed {
    reason: String,
}

/// What a client is told for every refusal.
const NOT_ALLOWED: &str = "not a readable image file under the allowed directory";

impl NotAllowed {
    fn new(reason: impl Into<String>) -> NotAllowed {
        NotAllowed { reason: reason.into() }
    }

    /// Why the path was refused (which file, which rule): for the server log, never for the client.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NOT_ALLOWED)
    }
}

/// The generic text too, so that `{:?}` cannot leak the reason either.
impl fmt::Debug for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NotAllowed({NOT_ALLOWED:?})")
    }
}

impl std::error::Error for NotAllowed {}

impl AllowedDir {
    /// `dir` canonicalised; it must exist and be a directory.
    pub fn new(dir: &Path) -> anyhow::Result<AllowedDir> {
        let root =
            dir.canonicalize().with_context(|| format!("allowed directory {}: cannot resolve it", dir.display()))?;
        let meta = std::fs::metadata(&root).with_context(|| format!("allowed directory {}", dir.display()))?;
        anyhow::ensure!(meta.is_dir(), "allowed directory {}: not a directory", dir.display());
        Ok(AllowedDir { root })
    }

    /// The canonical directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads the file `requested` names (an optional `file://`, then an absolute path or one relative to the
    /// root) if it resolves to a regular, non-empty file under the root of at most `max_bytes` bytes.
    pub fn read(&self, requested: &str, max_bytes: u64) -> Result<Vec<u8>, NotAllowed> {
        let path = requested.strip_prefix("file://").unwrap_or(requested);
        if path.is_empty() {
            return Err(NotAllowed::new("empty path"));
        }
        let joined = self.root.join(path);
        let canonical =
            joined.canonicalize().map_err(|e| NotAllowed::new(format!("{}: cannot resolve: {e}", joined.display())))?;
        if !canonical.starts_with(&self.root) {
            return Err(NotAllowed::new(format!(
                "{} resolves to {}, outside {}",
                joined.display(),
                canonical.display(),
                self.root.display()
            )));
        }
        let refuse = |why: &str| NotAllowed::new(format!("{}: {why}", canonical.display()));

        // O_NONBLOCK: opening a FIFO without a writer returns at once (fstat then refuses it); O_NOFOLLOW: a
        // symlink swapped in for the last component since `canonicalize` fails to open.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&canonical)
            .map_err(|e| refuse(&format!("cannot open: {e}")))?;
        // Still under the root once open (a directory on the way swapped for a symlink since canonicalize)?
        // Linux only; skipped where /proc is not mounted.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            if let Ok(opened) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
                if !opened.starts_with(&self.root) {
                    return Err(refuse(&format!("the opened file is {}, outside the root", opened.display())));
                }
            }
        }
        let meta = file.metadata().map_err(|e| refuse(&format!("fstat failed: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(refuse(&format!("not a regular file ({:?})", meta.file_type())));
        }
        let len = meta.len();
        // Empty: not an image, and what /proc and /sys pseudo-files report whatever they hold.
        if len == 0 {
            return Err(refuse("empty file"));
        }
        if len > max_bytes {
            return Err(refuse(&format!("{len} bytes, over the limit of {max_bytes}")));
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(len as usize).map_err(|e| refuse(&format!("cannot allocate {len} bytes: {e}")))?;
        file.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| refuse(&format!("read failed: {e}")))?;
        if bytes.len() as u64 > max_bytes {
            return Err(refuse(&format!("grew past the limit of {max_bytes} bytes while being read")));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, Instant};

    const MAX: u64 = 1000;

    /// tmp/root (the allowed dir) with good.png, sub/, big.bin, and tmp/secret.txt outside it.
    fn setup() -> (tempfile::TempDir, AllowedDir) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("good.png"), b"\x89PNG fake image").unwrap();
        std::fs::write(root.join("sub/inner.png"), b"inner").unwrap();
        std::fs::write(root.join("big.bin"), vec![7u8; MAX as usize + 1]).unwrap();
        std::fs::write(root.join("exact.bin"), vec![7u8; MAX as usize]).unwrap();
        std::fs::write(root.join("empty.png"), b"").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), b"secret").unwrap();
        let dir = AllowedDir::new(&root).unwrap();
        (tmp, dir)
    }

    fn refused(dir: &AllowedDir, requested: &str) -> String {
        let t = Instant::now();
        let e = dir.read(requested, MAX).expect_err(requested);
        assert!(t.elapsed() < Duration::from_secs(2), "{requested}: took {:?}", t.elapsed());
        assert_eq!(e.to_string(), NOT_ALLOWED, "{requested}");
        assert_eq!(format!("{e:?}"), format!("NotAllowed({NOT_ALLOWED:?})"));
        assert!(!e.reason().is_empty());
        e.reason().to_string()
    }

    #[test]
    fn good_files_read() {
        let (tmp, dir) = setup();
        assert_eq!(dir.root(), tmp.path().join("root").canonicalize().unwrap());
        assert_eq!(dir.read("good.png", MAX).unwrap(), b"\x89PNG fake image");
        assert_eq!(dir.read("sub/inner.png", MAX).unwrap(), b"inner");
        assert_eq!(dir.read("sub/../good.png", MAX).unwrap(), b"\x89PNG fake image");
        let abs = dir.root().join("good.png");
        assert_eq!(dir.read(abs.to_str().unwrap(), MAX).unwrap(), b"\x89PNG fake image");
        assert_eq!(dir.read(&format!("file://{}", abs.display()), MAX).unwrap(), b"\x89PNG fake image");
        assert_eq!(dir.read("exact.bin", MAX).unwrap().len(), MAX as usize);
        // A symlink that stays inside the root is fine.
        symlink(dir.root().join("sub/inner.png"), dir.root().join("alias.png")).unwrap();
        assert_eq!(dir.read("alias.png", MAX).unwrap(), b"inner");
    }

    #[test]
    fn everything_else_is_refused_alike() {
        let (tmp, dir) = setup();
        let root = dir.root().to_path_buf();
        // Traversal, absolute paths outside, file:// outside.
        refused(&dir, "../secret.txt");
        refused(&dir, "sub/../../secret.txt");
        refused(&dir, "../../../../../../../../etc/passwd");
        refused(&dir, "/etc/passwd");
        refused(&dir, "file:///etc/passwd");
        refused(&dir, tmp.path().join("secret.txt").to_str().unwrap());
        refused(&dir, "/proc/self/environ");
        // Symlinks inside the root pointing outside it.
        symlink(tmp.path().join("secret.txt"), root.join("leak.png")).unwrap();
        let r = refused(&dir, "leak.png");
        assert!(r.contains("outside"), "{r}");
        symlink("/dev/zero", root.join("zero.png")).unwrap();
        refused(&dir, "zero.png");
        symlink("/proc/self/environ", root.join("env.png")).unwrap();
        refused(&dir, "env.png");
        // A FIFO inside the root: must not block.
        let fifo = root.join("pipe.png");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let d2 = dir.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(d2.read("pipe.png", MAX).map_err(|e| e.reason().to_string())).unwrap());
        let r = rx.recv_timeout(Duration::from_secs(5)).expect("reading a FIFO blocked").unwrap_err();
        assert!(r.contains("not a regular file"), "{r}");
        assert_eq!(dir.read("pipe.png", MAX).unwrap_err().to_string(), NOT_ALLOWED);
        // Directories, missing and empty files, too large.
        refused(&dir, "sub");
        refused(&dir, ".");
        refused(&dir, "");
        refused(&dir, "file://");
        refused(&dir, "missing.png");
        let r = refused(&dir, "empty.png");
        assert!(r.contains("empty"), "{r}");
        let r = refused(&dir, "big.bin");
        assert!(r.contains("over the limit"), "{r}");
        refused(&dir, "good.png\0x");
    }

    #[test]
    fn devices_and_proc_files_are_refused_even_inside_the_root() {
        // With the root itself in /dev or /proc, the fstat and size rules still refuse these.
        let dev = AllowedDir::new(Path::new("/dev")).unwrap();
        let r = refused(&dev, "zero");
        assert!(r.contains("not a regular file"), "{r}");
        let proc = AllowedDir::new(Path::new("/proc/self")).unwrap();
        let r = refused(&proc, "environ");
        assert!(r.contains("empty"), "{r}");
    }

    #[test]
    fn the_root_must_be_a_directory() {
        let (tmp, _dir) = setup();
        let e = AllowedDir::new(&tmp.path().join("secret.txt")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = format!("{:#}", AllowedDir::new(&tmp.path().join("nope")).unwrap_err());
        assert!(e.contains("cannot resolve"), "{e}");
    }
}
