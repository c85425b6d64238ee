//! KV cells on disk: a prompt prefix (`kv/<key>.kv` in the cache folder) or a saved session (`--session FILE`).
//! The rows of one sequence at positions `0..n_pos`, the items (tokens and images) they were computed from, and
//! for a session the logits after its prompt, so that the same prompt again needs no computation at all.
//!
//! Format, little-endian:
//!   magic "ASGKVST\0", u32 version = 1, u32 cache type (ggml type id), u32 n_layer, u32 n_embd_kv,
//!   u64 row_bytes, u64 n_pos, u64 n_items, u64 n_prompt_items, u64 n_logits, u64 n_image_tokens,
//!   [32] language-model identity, [32] mmproj identity (zeros without images),
//!   items: n_items x 33 bytes (0 + u32 token + 28 zeros, or 1 + 32-byte image identity),
//!   logits: n_logits f32 (0, or one row of n_vocab after the first n_prompt_items items),
//!   rows: for each K/V tensor (K of layer 0, V of layer 0, K of layer 1, ...) n_pos rows of row_bytes,
//!   [32] blake3 of everything before.
//! A reader checks every field against the model it runs (`Expect`) before sizing anything from it, the file's
//! length against the sizes, then the hash; any difference is an error that names it, and the caller recomputes.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::items::{positions, Item};
use crate::llm::KvCache;

const MAGIC: &[u8; 8] = b"ASGKVST\0";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 * 4 + 8 * 6 + 32 * 2;
const ITEM: usize = 33;

/// What a file must have been made by and for.
#[derive(Clone, Debug)]
pub struct Expect {
    pub llm: [u8; 32],
    /// The mmproj file's identity when images are in use; a file with images is refused without a match.
    pub mmproj: Option<[u8; 32]>,
    pub cache_type: u32,
    pub n_layer: usize,
    pub n_embd_kv: usize,
    pub row_bytes: usize,
    /// The context: a file with more positions cannot be restored.
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub n_image_tokens: usize,
}

/// What is written: sequence `seq` of `cache` at positions `0..positions(items)`.
pub struct Snapshot<'a> {
    pub items: &'a [Item],
    /// Items of the prompt the logits follow (`items[..n_prompt_items]`), and those logits (empty: none).
    pub n_prompt_items: usize,
    pub logits: &'a [f32],
    pub cache: &'a KvCache,
    pub seq: usize,
}

impl Snapshot<'_> {
    /// The file's size.
    pub fn len(&self, e: &Expect) -> Result<u64> {
        let n_pos = positions(self.items, e.n_image_tokens);
        let rows = (2 * e.n_layer).checked_mul(n_pos).and_then(|x| x.checked_mul(e.row_bytes));
        let total = rows
            .and_then(|r| r.checked_add(HEADER + 32))
            .and_then(|t| t.checked_add(self.items.len() * ITEM))
            .and_then(|t| t.checked_add(self.logits.len() * 4))
            .context("a KV file's size overflows")?;
        Ok(total as u64)
    }

    /// Writes the file to `w` (rows read from the cache one tensor at a time: memory stays at one tensor's rows).
    pub fn write(&self, e: &Expect, w: &mut dyn Write) -> Result<()> {
        let n_pos = positions(self.items, e.n_image_tokens);
        ensure!(self.n_prompt_items <= self.items.len(), "prompt longer than the items");
        let mut h = blake3::Hasher::new();
        let mut put = |w: &mut dyn Write, b: &[u8]| -> Result<()> {
            h.update(b);
            w.write_all(b)?;
            Ok(())
        };
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        for v in [VERSION, e.cache_type, e.n_layer as u32, e.n_embd_kv as u32] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        let n_image_tokens = e.n_image_tokens as u64;
        for v in [e.row_bytes as u64, n_pos as u64, self.items.len() as u64, self.n_prompt_items as u64] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        header.extend_from_slice(&(self.logits.len() as u64).to_le_bytes());
        header.extend_from_slice(&n_image_tokens.to_le_bytes());
        header.extend_from_slice(&e.llm);
        header.extend_from_slice(&e.mmproj.unwrap_or([0; 32]));
        put(w, &header)?;
        let mut items = Vec::with_capacity(self.items.len() * ITEM);
        for it in self.items {
            match it {
                Item::Token(t) => {
                    items.push(0);
                    items.extend_from_slice(&t.to_le_bytes());
                    items.extend_from_slice(&[0; 28]);
                }
                Item::Image(hash) => {
                    items.push(1);
                    items.extend_from_slice(hash);
                }
            }
        }
        put(w, &items)?;
        put(w, bytemuck::cast_slice(self.logits))?;
        for t in 0..self.cache.n_tensors() {
            put(w, &self.cache.read_rows(t, self.seq, n_pos)?)?;
        }
        let hash = h.finalize();
        w.write_all(hash.as_bytes())?;
        Ok(())
    }
}

/// A KV file read and checked, mapped: rows are copied into the cache from the map.
pub struct KvFile {
    pub items: Vec<Item>,
    pub n_prompt_items: usize,
    pub logits: Vec<f32>,
    pub n_pos: usize,
    map: ggml::MappedFile,
    rows_at: usize,
    row_bytes: usize,
}

impl KvFile {
    /// Reads `path` and checks it against `e` (see the module comment).
    pub fn read(path: &Path, e: &Expect) -> Result<KvFile> {
        let map = ggml::MappedFile::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let b = map.bytes();
        ensure!(b.len() >= HEADER + 32, "{} bytes: shorter than a header", b.len());
        ensure!(&b[..8] == MAGIC, "not a KV state file");
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        ensure!(u32_at(8) == VERSION, "format version {} (this program reads {VERSION})", u32_at(8));
        ensure!(u32_at(12) == e.cache_type, "made with another KV cache type (ggml type {})", u32_at(12));
        ensure!(
            (u32_at(16) as usize, u32_at(20) as usize, u64_at(24)) == (e.n_layer, e.n_embd_kv, e.row_bytes as u64),
            "made for another model shape ({} layers of {} values)",
            u32_at(16),
            u32_at(20)
        );
        let (n_pos, n_items, n_prompt, n_logits, n_img) = (u64_at(32), u64_at(40), u64_at(48), u64_at(56), u64_at(64));
        ensure!(&b[72..104] == e.llm, "made with another language model file");
        ensure!(n_pos <= e.n_ctx as u64, "{n_pos} positions do not fit the context of {}", e.n_ctx);
        ensure!(n_items <= n_pos && n_prompt <= n_items, "inconsistent counts ({n_items} items, {n_pos} positions)");
        ensure!(n_logits == 0 || n_logits == e.n_vocab as u64, "{n_logits} logits for a vocabulary of {}", e.n_vocab);
        ensure!(n_img == e.n_image_tokens as u64, "{n_img} positions per image, this model has {}", e.n_image_tokens);
        // Every count is bounded by the context now: the sizes below cannot overflow a u64.
        let (n_pos, n_items, n_logits) = (n_pos as usize, n_items as usize, n_logits as usize);
        let rows = 2 * e.n_layer * n_pos * e.row_bytes;
        let rows_at = HEADER + n_items * ITEM + n_logits * 4;
        ensure!(
            b.len() == rows_at + rows + 32,
            "{} bytes where its header says {} (truncated or padded)",
            b.len(),
            rows_at + rows + 32
        );
        let mut items = Vec::with_capacity(n_items);
        for raw in b[HEADER..HEADER + n_items * ITEM].chunks_exact(ITEM) {
            items.push(match raw[0] {
                0 if raw[5..].iter().all(|&x| x == 0) => Item::Token(u32::from_le_bytes(raw[1..5].try_into()?)),
                1 => Item::Image(raw[1..].try_into()?),
                _ => bail!("a bad item entry"),
            });
        }
        ensure!(positions(&items, e.n_image_tokens) == n_pos, "items and positions disagree");
        let has_images = items.iter().any(|i| matches!(i, Item::Image(_)));
        if has_images {
            ensure!(e.mmproj.is_some_and(|m| b[104..136] == m), "made with another mmproj file");
        }
        let end = b.len() - 32;
        ensure!(blake3::hash(&b[..end]).as_bytes() == &b[end..], "checksum mismatch (corrupt)");
        let logits = bytemuck::pod_collect_to_vec(&b[HEADER + n_items * ITEM..rows_at]);
        Ok(KvFile { items, n_prompt_items: n_prompt as usize, logits, n_pos, map, rows_at, row_bytes: e.row_bytes })
    }

    /// Restores the first `n` positions (at most `n_pos`) into sequence `seq` (empty) of `cache`.
    pub fn restore(&self, cache: &mut KvCache, seq: usize, n: usize) -> Result<()> {
        ensure!(n <= self.n_pos, "{n} positions asked of {}", self.n_pos);
        let per_tensor = self.n_pos * self.row_bytes;
        let b = self.map.bytes();
        cache.write_rows(seq, n, |t| {
            let start = self.rows_at + t * per_tensor;
            &b[start..start + n * self.row_bytes]
        })
    }
}
