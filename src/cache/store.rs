//! A cache folder on disk: one file per entry, named by its key, in a subfolder per kind (`img/`, `kv/`).
//!
//! - Written atomically: a temporary file in the same folder, synced, then renamed over the name, so a reader
//!   (another process included) sees a whole entry or none, and an entry mapped by a reader stays intact while a
//!   newer one replaces it (the old inode lives on until unmapped).
//! - Bounded: after each write the folder is trimmed to `max_bytes`, least recently used first (a hit touches the
//!   file's modification time). Temporary files left by a killed writer are removed once they are an hour old.
//! - Never trusted: what reads an entry checks it whole (its reader's job) and removes it when it is bad.
//!
//! Names come from keys this program computes (hex of blake3), never from a request or a file's contents, so
//! nothing outside the folder is ever written or removed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::identity::hex;

/// Kinds of entries, one subfolder each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Image embeddings (`*.emb`).
    Image,
    /// KV cells of a prompt prefix (`*.kv`).
    Prefix,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Image => "img",
            Kind::Prefix => "kv",
        }
    }

    fn ext(self) -> &'static str {
        match self {
            Kind::Image => "emb",
            Kind::Prefix => "kv",
        }
    }
}

const KINDS: [Kind; 2] = [Kind::Image, Kind::Prefix];
const STALE_TEMP: Duration = Duration::from_secs(3600);

pub struct DiskStore {
    root: PathBuf,
    max_bytes: u64,
}

impl DiskStore {
    /// Opens (creating it if needed) the cache folder `root`, holding at most `max_bytes` of entries.
    pub fn open(root: &Path, max_bytes: u64) -> Result<DiskStore> {
        for k in KINDS {
            let d = root.join(k.dir());
            fs::create_dir_all(&d).with_context(|| format!("cannot create the cache folder {}", d.display()))?;
        }
        Ok(DiskStore { root: root.to_path_buf(), max_bytes })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where the entry `key` of `kind` lives.
    pub fn path(&self, kind: Kind, key: &[u8; 32]) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{}.{}", hex(key), kind.ext()))
    }

    /// Writes the entry `key` (`len` bytes, which `fill` writes) atomically, then trims the folder to its bound.
    /// An entry larger than the whole bound is not written (false).
    pub fn write(
        &self,
        kind: Kind,
        key: &[u8; 32],
        len: u64,
        fill: impl FnOnce(&mut dyn Write) -> Result<()>,
    ) -> Result<bool> {
        if len > self.max_bytes {
            return Ok(false);
        }
        let path = self.path(kind, key);
        atomic_write(&path, fill)?;
        self.trim(Some(&path))?;
        Ok(true)
    }

    /// Marks an entry as just used (the trim keeps recently used entries).
    pub fn touch(&self, path: &Path) {
        if let Ok(f) = fs::File::options().write(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Removes a bad entry (it will be computed again).
    pub fn remove(&self, path: &Path) {
        let _ = fs::remove_file(path);
    }

    /// Bytes of entries held.
    pub fn bytes(&self) -> u64 {
        self.entries().iter().map(|e| e.1).sum()
    }

    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        for k in KINDS {
            let Ok(rd) = fs::read_dir(self.root.join(k.dir())) else { continue };
            for e in rd.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    // Another writer's file in progress, or one a killed writer left behind.
                    if modified.elapsed().is_ok_and(|age| age > STALE_TEMP) {
                        let _ = fs::remove_file(e.path());
                    }
                    continue;
                }
                out.push((e.path(), meta.len(), modified));
            }
        }
        out
    }

    /// Removes the least recently used entries (never `keep`, the one just written) until the folder fits.
    fn trim(&self, keep: Option<&Path>) -> Result<()> {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_by_key(|e| e.2);
        for (path, len, _) in entries {
            if total <= self.max_bytes {
                break;
            }
            if Some(path.as_path()) == keep {
                continue;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        Ok(())
    }
}

/// Writes `path` atomically: `fill` writes a temporary file beside it, which is synced and renamed over `path` (a
/// reader sees the old file or the new one, never part of one; a failed write leaves `path` as it was).
pub fn atomic_write(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        fill(&mut w).with_context(|| format!("cannot write {}", path.display()))?;
        w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    }
    tmp.as_file().sync_all().with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Refuses, before any work, a file path that cannot be written when the time comes: its folder missing, or the
/// path itself a folder.
pub fn check_writable_file(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    anyhow::ensure!(dir.is_dir(), "{}: the folder {} does not exist", path.display(), dir.display());
    anyhow::ensure!(!path.is_dir(), "{} is a folder", path.display());
    Ok(())
}
