//! A prompt through the caches, for `run` and `encode` (`chat` restores a first turn's prefix itself, through
//! `Caches::read_prefix` and `write_prefix`): restore what a saved session or a cached prefix holds, fetch or encode
//! the images the rest needs, prefill the rest.
//!
//! Restored cells go where a prefill of the same positions would put them (cells `0..n` of an empty cache). After a
//! prefix (which ends after an image) the rest is computed in the same pieces as without a cache, so the logits are
//! those of a fresh computation bit for bit. After a session the rest starts where the saved items end, a batch
//! boundary a fresh run may not have: with F32 weights ggml's products do not depend on it (bit for bit again,
//! tests/prompt_cache.rs); quantized weights can differ in the last bits there. Cells computed with other kernels
//! (a GPU, `--no-repack`) are valid but not bit-identical; the keys do not distinguish them.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::image::Source;
use super::items::{items_of, positions, reusable, Item};
use super::kv_file::{KvFile, Snapshot};
use super::{prefix_end, Caches};
use crate::llm::Session;
use crate::multimodal;
use crate::preprocess::DecodedImage;
use crate::vision::{ImageEmbedding, VisionEncoder};

/// Where the time of a prompt went and what the caches gave (`run --json`'s and `chat --json`'s `cache`).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub images: usize,
    pub images_encoded: usize,
    pub image_ram_hits: usize,
    pub image_disk_hits: usize,
    /// Getting the embeddings of the images computed (cache reads and the encoder).
    pub image_ms: f64,
    /// Positions restored from a session or a prefix entry, and from which.
    pub restored_positions: usize,
    pub restored_from: Option<&'static str>,
    pub restore_ms: f64,
    /// Positions computed, and the time it took.
    pub prefill_positions: usize,
    pub prefill_ms: f64,
    /// A prefix entry written for the next prompt about these images.
    pub prefix_saved: bool,
    pub prefix_save_ms: f64,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "images": self.images, "images_encoded": self.images_encoded,
            "image_cache_hits": self.image_ram_hits + self.image_disk_hits,
            "image_cache_ram_hits": self.image_ram_hits, "image_cache_disk_hits": self.image_disk_hits,
            "image_encode_ms": self.image_ms,
            "restored_positions": self.restored_positions, "restored_from": self.restored_from,
            "restore_ms": self.restore_ms,
            "prefill_positions": self.prefill_positions, "prefill_ms": self.prefill_ms,
            "prefix_saved": self.prefix_saved, "prefix_save_ms": self.prefix_save_ms,
        })
    }
}

/// A prompt ready to generate from.
pub struct Prefilled {
    /// Logits at the prompt's last position.
    pub logits: Vec<f32>,
    /// Positions sequence 0 now holds.
    pub pos: i32,
    pub items: Vec<Item>,
    pub report: Report,
    /// Items whose prefix entry `save_prefix` is to write (computed here, not found in the cache).
    pub unsaved_prefix: Option<usize>,
}

/// The embeddings of `img`, from the cache or the encoder (then cached).
pub fn embed(
    caches: &Caches,
    encoder: &mut VisionEncoder<'_>,
    n_embd: usize,
    img: &DecodedImage,
    report: &mut Report,
) -> Result<ImageEmbedding> {
    let t = Instant::now();
    let n_tokens = encoder.model.hp.n_image_tokens();
    let e = match caches.images.get(&img.hash, n_tokens, n_embd) {
        Some((e, src)) => {
            match src {
                Source::Ram => report.image_ram_hits += 1,
                _ => report.image_disk_hits += 1,
            }
            e
        }
        None => {
            let px = img.pixel_values(&encoder.model.hp.preprocess)?;
            let e = encoder.encode_pixels(&px, 1)?.pop().context("no embeddings")?;
            caches.images.put(&img.hash, &e);
            report.images_encoded += 1;
            e
        }
    };
    report.images += 1;
    report.image_ms += t.elapsed().as_secs_f64() * 1e3;
    Ok(e)
}

/// Prefills sequence 0 of `session` (cleared first) with the prompt `ids` (`images` at its `image_token`s), using
/// `saved` (a session file) and the caches as far as they hold it. `show_progress`: a bar over what is computed.
#[allow(clippy::too_many_arguments)]
pub fn prefill(
    session: &mut Session<'_>,
    caches: &Caches,
    encoder: Option<&mut VisionEncoder<'_>>,
    ids: &[u32],
    image_token: Option<u32>,
    images: &[DecodedImage],
    saved: Option<&KvFile>,
    show_progress: bool,
) -> Result<Prefilled> {
    let n_marks = image_token.map_or(0, |t| ids.iter().filter(|&&x| x == t).count());
    if n_marks != images.len() {
        bail!("the prompt has {n_marks} <image> token(s) but {} image(s) were given", images.len());
    }
    let hashes: Vec<[u8; 32]> = images.iter().map(|i| i.hash).collect();
    let items = items_of(ids, image_token, &hashes);
    let n_image_tokens = caches.expect.n_image_tokens;
    let mut report = Report::default();
    session.cache.clear();

    // 1. A saved session: the same prompt again restores everything, with its logits; another prompt the common
    //    prefix (never all of it: its last position's logits are computed).
    let t = Instant::now();
    let mut keep = 0;
    let mut logits = None;
    if let Some(f) = saved {
        let (k, l) = if f.items.get(..f.n_prompt_items) == Some(&items[..]) && !f.logits.is_empty() {
            (items.len(), Some(f.logits.clone()))
        } else {
            (reusable(&f.items, &items), None)
        };
        if k > 0 {
            match f.restore(&mut session.cache, 0, positions(&items[..k], n_image_tokens)) {
                Ok(()) => {
                    (keep, logits) = (k, l);
                    report.restored_from = Some("session");
                }
                Err(e) => {
                    eprintln!("warning: session: {e:#}; computing the prompt");
                    session.cache.clear();
                }
            }
        }
    }
    // 2. The prefix entry of the preamble and the images, when it gives more and is not the whole prompt (the last
    //    position's logits must be computed).
    let end = prefix_end(&items);
    let mut prefix_hit = false;
    if keep < end && end < items.len() {
        if let Some(f) = caches.read_prefix(&items[..end]) {
            session.cache.clear();
            match f.restore(&mut session.cache, 0, f.n_pos) {
                Ok(()) => {
                    keep = end;
                    prefix_hit = true;
                    report.restored_from = Some("prefix cache");
                }
                Err(e) => {
                    eprintln!("warning: prefix cache: {e:#}; computing the prompt");
                    session.cache.clear();
                    (keep, report.restored_from) = (0, None);
                }
            }
        }
    }
    report.restored_positions = positions(&items[..keep], n_image_tokens);
    report.restore_ms = t.elapsed().as_secs_f64() * 1e3;

    // 3. The images of the rest, then the rest itself.
    let n_images_kept = items[..keep].iter().filter(|i| matches!(i, Item::Image(_))).count();
    let rest_images = &images[n_images_kept..];
    let mut embeddings = Vec::with_capacity(rest_images.len());
    if !rest_images.is_empty() {
        let Some(enc) = encoder else { bail!("images need --mmproj (the vision encoder's GGUF)") };
        let n_embd = session.model.hp.n_embd;
        let spin = crate::progress::spinner("encoding images");
        for img in rest_images {
            embeddings.push(embed(caches, enc, n_embd, img, &mut report)?);
        }
        if let Some(s) = spin {
            s.finish_and_clear();
        }
    }
    let pos0 = report.restored_positions as i32;
    let (logits, pos) = match logits {
        Some(l) => (l, pos0),
        None => {
            let segs = multimodal::segments(&ids[keep..], image_token, &embeddings)?;
            let n_compute = positions(&items[keep..], n_image_tokens);
            if show_progress {
                session.set_progress(crate::progress::prompt_progress(n_compute));
            }
            let t = Instant::now();
            let out = multimodal::prefill_at(session, &segs, 0, pos0, false);
            session.set_progress(None);
            report.prefill_ms = t.elapsed().as_secs_f64() * 1e3;
            report.prefill_positions = n_compute;
            out?
        }
    };

    // The prefix for the next question about these images, unless it came from the cache: `save_prefix`, after
    // the answer (so that writing it does not delay the first token).
    let unsaved_prefix = (end > 0 && !prefix_hit).then_some(end);
    Ok(Prefilled { logits, pos, items, report, unsaved_prefix })
}

/// Writes the prefix entry `prefilled` left unsaved (its cells must still be held by sequence 0: a beam search
/// only relabels cells after the prompt). A failure is a warning: the answer does not depend on it.
pub fn save_prefix(session: &Session<'_>, caches: &Caches, prefilled: &mut Prefilled) {
    let Some(end) = prefilled.unsaved_prefix.take() else { return };
    let t = Instant::now();
    match write_prefix(session, caches, &prefilled.items[..end]) {
        Ok(saved) => prefilled.report.prefix_saved = saved,
        Err(e) => eprintln!("warning: prefix cache: {e:#}"),
    }
    prefilled.report.prefix_save_ms = t.elapsed().as_secs_f64() * 1e3;
}

/// Writes the prefix entry of `items` (their cells held by sequence 0 at positions `0..`); false when prefixes
/// are not cached or the entry is larger than the whole cache.
pub fn write_prefix(session: &Session<'_>, caches: &Caches, items: &[Item]) -> Result<bool> {
    let Some((disk, _)) = caches.prefix_path(items) else { return Ok(false) };
    let key = caches.prefix_key(items);
    let snap = Snapshot { items, n_prompt_items: 0, logits: &[], cache: &session.cache, seq: 0 };
    let len = snap.len(&caches.expect)?;
    // (Checked after the rows were read: cells of an RPC server that failed read as zeros, never to be saved.)
    disk.write(super::store::Kind::Prefix, &key, len, |w| {
        snap.write(&caches.expect, w)?;
        session.health()
    })
}

/// Saves sequence 0 of `session` as a session file: `items` (the prompt and what was generated after it, as far
/// as the cache holds them) and the logits after the first `n_prompt_items`.
pub fn save_session(
    path: &std::path::Path,
    session: &Session<'_>,
    caches: &Caches,
    items: &[Item],
    n_prompt_items: usize,
    logits: &[f32],
) -> Result<()> {
    // Only what the cache holds (an answer's last token may not have been fed back).
    let held = session.cache.seq_len(0) as usize;
    let mut n = 0;
    while n < items.len() && positions(&items[..n + 1], caches.expect.n_image_tokens) <= held {
        n += 1;
    }
    let snap =
        Snapshot { items: &items[..n], n_prompt_items: n_prompt_items.min(n), logits, cache: &session.cache, seq: 0 };
    let logits_ok = n >= n_prompt_items;
    let snap = if logits_ok { snap } else { Snapshot { logits: &[], ..snap } };
    super::store::atomic_write(path, |w| {
        snap.write(&caches.expect, w)?;
        session.health()
    })
    .with_context(|| format!("cannot save the session to {}", path.display()))
}
