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
//! length, header, identities or payload hash are not exactly right is removed and the image encoded again.

use std::sync::Arc;

use anyhow::Result;
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
    /// Computed by the vision encoder.
    Encoded,
}

/// Counts of lookups, for `--json` timings and serve's `/stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub ram_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    /// Disk entries found bad (wrong length, header, identity or payload hash) and removed.
    pub bad_entries: u64,
}

pub struct ImageCache {
    mmproj: [u8; 32],
    ram: LruCache<[u8; 32], Arc<Vec<f32>>>,
    ram_bytes: usize,
    ram_budget: usize,
    disk: Option<Arc<DiskStore>>,
    pub counts: Counts,
}

impl ImageCache {
    /// A cache for the embeddings of the mmproj file with identity `mmproj`, `ram_budget` bytes in RAM (0: none),
    /// and on disk in `disk` if given.
    pub fn new(mmproj: [u8; 32], ram_budget: usize, disk: Option<Arc<DiskStore>>) -> ImageCache {
        ImageCache { mmproj, ram: LruCache::unbounded(), ram_bytes: 0, ram_budget, disk, counts: Counts::default() }
    }

    fn key(&self, image: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("asagi-gguf image embedding v1");
        h.update(&self.mmproj);
        h.update(image);
        *h.finalize().as_bytes()
    }

    /// The embeddings of `image`, `n_tokens` rows of `n_embd`, from RAM or disk (`None` on a miss: encode it and
    /// `put` it).
    pub fn get(&mut self, image: &[u8; 32], n_tokens: usize, n_embd: usize) -> Option<(ImageEmbedding, Source)> {
        let key = self.key(image);
        if let Some(data) = self.ram.get(&key) {
            if data.len() == n_tokens * n_embd {
                self.counts.ram_hits += 1;
                return Some((embedding(data.as_ref().clone(), n_tokens), Source::Ram));
            }
        }
        let disk = self.disk.clone()?;
        let path = disk.path(Kind::Image, &key);
        if !path.exists() {
            self.counts.misses += 1;
            return None;
        }
        match read_entry(&path, &self.mmproj, image, n_tokens, n_embd) {
            Ok(data) => {
                disk.touch(&path);
                self.counts.disk_hits += 1;
                self.remember(key, Arc::new(data.clone()));
                Some((embedding(data, n_tokens), Source::Disk))
            }
            Err(e) => {
                eprintln!("warning: image cache: {}: {e}; encoding the image again", path.display());
                disk.remove(&path);
                self.counts.bad_entries += 1;
                self.counts.misses += 1;
                None
            }
        }
    }

    /// Whether the embeddings of `image` are held (in RAM, or valid on disk: then read into RAM).
    pub fn contains(&mut self, image: &[u8; 32], n_tokens: usize, n_embd: usize) -> bool {
        let key = self.key(image);
        if self.ram.get(&key).is_some_and(|d| d.len() == n_tokens * n_embd) {
            return true;
        }
        self.get(image, n_tokens, n_embd).is_some()
    }

    /// Keeps the embeddings of `image` (after encoding it). A disk write that fails is a warning: the answer does
    /// not depend on the cache.
    pub fn put(&mut self, image: &[u8; 32], e: &ImageEmbedding) {
        let key = self.key(image);
        if let Some(disk) = &self.disk {
            let n_embd = e.data.len() / e.n_tokens.max(1);
            let payload: &[u8] = bytemuck::cast_slice(&e.data);
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
        self.remember(key, Arc::new(e.data.clone()));
    }

    fn remember(&mut self, key: [u8; 32], data: Arc<Vec<f32>>) {
        let bytes = data.len() * 4;
        if bytes > self.ram_budget {
            return;
        }
        if let Some(old) = self.ram.put(key, data) {
            self.ram_bytes -= old.len() * 4;
        }
        self.ram_bytes += bytes;
        while self.ram_bytes > self.ram_budget {
            let Some((_, old)) = self.ram.pop_lru() else { break };
            self.ram_bytes -= old.len() * 4;
        }
    }

    /// Images held in RAM, and their bytes.
    pub fn ram_usage(&self) -> (usize, usize) {
        (self.ram.len(), self.ram_bytes)
    }

    /// A cache holding nothing in RAM and nothing on disk (every lookup misses).
    pub fn disabled() -> ImageCache {
        ImageCache::new([0; 32], 0, None)
    }
}

fn embedding(data: Vec<f32>, n_tokens: usize) -> ImageEmbedding {
    ImageEmbedding { data, n_tokens, features: Vec::new() }
}

/// Reads and checks a disk entry; the payload as f32.
fn read_entry(
    path: &std::path::Path,
    mmproj: &[u8; 32],
    image: &[u8; 32],
    n_tokens: usize,
    n_embd: usize,
) -> Result<Vec<f32>, String> {
    let payload_len = n_tokens.checked_mul(n_embd).and_then(|n| n.checked_mul(4)).ok_or("size overflows")?;
    let map = ggml::MappedFile::open(path).map_err(|e| format!("cannot read it ({e})"))?;
    let b = map.bytes();
    if b.len() != HEADER + payload_len {
        return Err(format!("{} bytes where {n_tokens} x {n_embd} embeddings take {}", b.len(), HEADER + payload_len));
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if &b[..8] != MAGIC || u32_at(8) != VERSION {
        return Err("not an embedding file of this version".into());
    }
    if (u32_at(12) as usize, u32_at(16) as usize) != (n_tokens, n_embd) {
        return Err(format!("shape {}x{}, expected {n_tokens}x{n_embd}", u32_at(12), u32_at(16)));
    }
    if &b[24..56] != mmproj || &b[56..88] != image {
        return Err("made for another mmproj file or image".into());
    }
    let payload = &b[HEADER..];
    if blake3::hash(payload).as_bytes() != &b[88..120] {
        return Err("payload hash mismatch (corrupt)".into());
    }
    // Copied out of the map (the payload need not be aligned for f32 in every layout).
    Ok(bytemuck::pod_collect_to_vec(payload))
}
