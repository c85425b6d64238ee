//! Image embeddings (the projector's output rows) kept so that an image is encoded once: in RAM, least recently
//! used first out beyond a byte budget, and optionally on disk (one file per image, see `store`).
//!
//! Key: blake3 of the mmproj file's identity and the image's identity (`preprocess::pixel_hash`: its decoded RGB
//! pixels and size). The preprocessing (size, mean, std) comes from the mmproj file, so it is covered by the file's
//! identity; the same picture as PNG or JPEG of the same pixels is the same image.
//!
//! Disk entry (`img/<key>.emb`), little-endian:
//!   magic "ASGIEMB\0", u32 version = 1, u32 n_tokens, u32 n_embd, u32 0,
//!   [32] mmproj identity, [32] image identity, [32] blake3 of the payload,
//!   payload: n_tokens x n_embd f32 (little-endian: the byte order of every target this program builds for).
//! A reader asks for the shape its vision model produces, so no size in a file decides an allocation; an entry whose
//! length, header, identities or payload hash are not exactly right is removed and the image encoded again (one
//! that cannot be opened, say trimmed by another process a moment ago, is only a miss).
//!
//! Shared by `serve`'s HTTP threads and its engine: the RAM map is locked only to look up or insert (an `Arc`, no
//! copy); disk reads, checks and writes happen outside the lock, so nobody waits on another's file I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;

use super::store::{DiskStore, Kind};
use crate::vision::ImageEmbedding;

const MAGIC: &[u8; 8] = b"ASGIEMB\0";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 * 4 + 32 * 3;

/// Where an embedding came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Ram,
    Disk,
}

/// Counts of lookups, for serve's `/stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub ram_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    /// Disk entries found bad (wrong length, header, identity or payload hash) and removed.
    pub bad_entries: u64,
}

#[derive(Default)]
struct Counters {
    ram_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    bad_entries: AtomicU64,
}

struct Ram {
    map: LruCache<[u8; 32], Arc<Vec<f32>>>,
    bytes: usize,
}

pub struct ImageCache {
    mmproj: [u8; 32],
    ram: Mutex<Ram>,
    ram_budget: usize,
    disk: Option<Arc<DiskStore>>,
    counters: Counters,
}

impl ImageCache {
    /// A cache for the embeddings of the mmproj file with identity `mmproj`, `ram_budget` bytes in RAM (0: none),
    /// and on disk in `disk` if given.
    pub fn new(mmproj: [u8; 32], ram_budget: usize, disk: Option<Arc<DiskStore>>) -> ImageCache {
        let ram = Mutex::new(Ram { map: LruCache::unbounded(), bytes: 0 });
        ImageCache { mmproj, ram, ram_budget, disk, counters: Counters::default() }
    }

    fn key(&self, image: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("asagi-gguf image embedding v1");
        h.update(&self.mmproj);
        h.update(image);
        *h.finalize().as_bytes()
    }

    /// The RAM map. A panic elsewhere while it was held leaves it consistent (every update is one insert or
    /// removal), so a poisoned lock is used as it is.
    fn ram(&self) -> MutexGuard<'_, Ram> {
        self.ram.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The embeddings of `image`, `n_tokens` rows of `n_embd`, from RAM or disk (`None` on a miss: encode it and
    /// `put` it).
    pub fn get(&self, image: &[u8; 32], n_tokens: usize, n_embd: usize) -> Option<(ImageEmbedding, Source)> {
        let key = self.key(image);
        let in_ram = self.ram().map.get(&key).filter(|d| d.len() == n_tokens * n_embd).cloned();
        if let Some(data) = in_ram {
            self.counters.ram_hits.fetch_add(1, Ordering::Relaxed);
            return Some((ImageEmbedding { data, n_tokens, features: Vec::new() }, Source::Ram));
        }
        let Some(disk) = &self.disk else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = disk.path(Kind::Image, &key);
        match read_entry(&path, &self.mmproj, image, n_tokens, n_embd) {
            Ok(data) => {
                disk.touch(&path);
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                let data = Arc::new(data);
                self.remember(key, data.clone());
                Some((ImageEmbedding { data, n_tokens, features: Vec::new() }, Source::Disk))
            }
            Err(Bad::Unreadable) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(Bad::Invalid(reason)) => {
                eprintln!("warning: image cache: {}: {reason}; encoding the image again", path.display());
                disk.remove(&path);
                self.counters.bad_entries.fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether the embeddings of `image` are held (in RAM, or valid on disk: then read into RAM).
    pub fn contains(&self, image: &[u8; 32], n_tokens: usize, n_embd: usize) -> bool {
        self.get(image, n_tokens, n_embd).is_some()
    }

    /// Keeps the embeddings of `image` (after encoding it). A disk write that fails is a warning: the answer does
    /// not depend on the cache.
    pub fn put(&self, image: &[u8; 32], e: &ImageEmbedding) {
        let key = self.key(image);
        self.remember(key, e.data.clone());
        if let Some(disk) = &self.disk {
            let n_embd = e.data.len() / e.n_tokens.max(1);
            let payload: &[u8] = bytemuck::cast_slice(e.data.as_slice());
            let hash = blake3::hash(payload);
            let mut header = Vec::with_capacity(HEADER);
            header.extend_from_slice(MAGIC);
            for v in [VERSION, e.n_tokens as u32, n_embd as u32, 0] {
                header.extend_from_slice(&v.to_le_bytes());
            }
            header.extend_from_slice(&self.mmproj);
            header.extend_from_slice(image);
            header.extend_from_slice(hash.as_bytes());
            let len = (header.len() + payload.len()) as u64;
            let written = disk.write(Kind::Image, &key, len, |w| {
                w.write_all(&header)?;
                w.write_all(payload)?;
                Ok(())
            });
            if let Err(err) = written {
                eprintln!("warning: image cache: {err:#}");
            }
        }
    }

    fn remember(&self, key: [u8; 32], data: Arc<Vec<f32>>) {
        let bytes = data.len() * 4;
        if bytes > self.ram_budget {
            return;
        }
        let mut ram = self.ram();
        if let Some(old) = ram.map.put(key, data) {
            ram.bytes -= old.len() * 4;
        }
        ram.bytes += bytes;
        while ram.bytes > self.ram_budget {
            let Some((_, old)) = ram.map.pop_lru() else { break };
            ram.bytes -= old.len() * 4;
        }
    }

    /// Images held in RAM, and their bytes.
    pub fn ram_usage(&self) -> (usize, usize) {
        let ram = self.ram();
        (ram.map.len(), ram.bytes)
    }

    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            ram_hits: g(&c.ram_hits),
            disk_hits: g(&c.disk_hits),
            misses: g(&c.misses),
            bad_entries: g(&c.bad_entries),
        }
    }
}

/// Why a disk entry was not used.
enum Bad {
    /// It could not be opened (absent, or removed by another process meanwhile): a miss, nothing to clean.
    Unreadable,
    /// It is there but wrong: removed.
    Invalid(String),
}

/// Reads and checks a disk entry; the payload as f32.
fn read_entry(
    path: &std::path::Path,
    mmproj: &[u8; 32],
    image: &[u8; 32],
    n_tokens: usize,
    n_embd: usize,
) -> Result<Vec<f32>, Bad> {
    let invalid = |s: String| Bad::Invalid(s);
    let payload_len =
        n_tokens.checked_mul(n_embd).and_then(|n| n.checked_mul(4)).ok_or(invalid("size overflows".into()))?;
    let map = ggml::MappedFile::open(path).map_err(|_| Bad::Unreadable)?;
    let b = map.bytes();
    if b.len() != HEADER + payload_len {
        return Err(invalid(format!(
            "{} bytes where {n_tokens} x {n_embd} embeddings take {}",
            b.len(),
            HEADER + payload_len
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if &b[..8] != MAGIC || u32_at(8) != VERSION {
        return Err(invalid("not an embedding file of this version".into()));
    }
    if (u32_at(12) as usize, u32_at(16) as usize) != (n_tokens, n_embd) {
        return Err(invalid(format!("shape {}x{}, expected {n_tokens}x{n_embd}", u32_at(12), u32_at(16))));
    }
    if &b[24..56] != mmproj || &b[56..88] != image {
        return Err(invalid("made for another mmproj file or image".into()));
    }
    let payload = &b[HEADER..];
    if blake3::hash(payload).as_bytes() != &b[88..120] {
        return Err(invalid("payload hash mismatch (corrupt)".into()));
    }
    // Copied out of the map (the payload need not be aligned for f32 in every layout).
    Ok(bytemuck::pod_collect_to_vec(payload))
}
