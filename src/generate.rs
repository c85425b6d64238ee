//! Decoding loops over a `Session`, driving the HF-exact samplers and beam search of `crate::sampling`.
//!
//! Beams are decoded together: one batch of K tokens per step (K sequences of the KV cache), so the weights are
//! read once per step; after each step the cache relabels its cells (`KvCache::reorder`) instead of copying
//! K/V data, and the prompt's cells stay shared by every beam.

use anyhow::{bail, Result};

use crate::llm::{Batch, Input, Session, MAX_SEQ};
pub use crate::sampling::math::argmax;
use crate::sampling::{BeamSearch, GenerationConfig, Sampler};

/// One generated sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// New tokens, without the end-of-generation token.
    pub tokens: Vec<u32>,
    /// The end-of-generation token that stopped it, if any (else the length limit did).
    pub eos: Option<u32>,
    /// HF's sequence score (beam modes only).
    pub score: Option<f64>,
}

/// Greedy decoding of sequence 0 after a prefill whose last-row logits are `logits`, from position `pos`:
/// `n` tokens at most, stopping after an id of `eog` (included in the result). `on_token` sees each id.
pub fn greedy(
    session: &mut Session<'_>,
    mut logits: Vec<f32>,
    mut pos: i32,
    n: usize,
    eog: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let id = argmax(&logits) as u32;
        out.push(id);
        on_token(id)?;
        if eog.contains(&id) {
            break;
        }
        logits = session.prefill(Input::Tokens(&[id]), 0, pos, false)?;
        pos += 1;
    }
    Ok(out)
}

/// Generates from a prompt already prefilled in sequence 0 (positions `0..pos`), whose last-row logits are
/// `logits`. `history` is the prompt as HF's `input_ids` (one `<image>` id per image): the repetition penalty
/// and n-gram bans look at it. `on_token` is called with each token as soon as it is final (num_beams = 1; with
/// beams nothing is final before the end). Returns `num_return_sequences` sequences (beams) or one.
pub fn generate(
    session: &mut Session<'_>,
    cfg: &GenerationConfig,
    history: &[u32],
    logits: Vec<f32>,
    pos: i32,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<Generated>> {
    cfg.validate()?;
    if cfg.num_beams > 1 {
        beams(session, cfg, history, logits, pos)
    } else {
        single(session, cfg, history, logits, pos, on_token).map(|g| vec![g])
    }
}

fn single(
    session: &mut Session<'_>,
    cfg: &GenerationConfig,
    history: &[u32],
    mut logits: Vec<f32>,
    mut pos: i32,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generated> {
    let mut sampler = Sampler::new(cfg, history.len())?;
    let mut hist = history.to_vec();
    let mut tokens = Vec::new();
    for _ in 0..cfg.max_new(history.len())? {
        let id = sampler.next(&logits, &hist)?;
        if cfg.is_eos(id) {
            return Ok(Generated { tokens, eos: Some(id), score: None });
        }
        on_token(id)?;
        tokens.push(id);
        hist.push(id);
        logits = session.prefill(Input::Tokens(&[id]), 0, pos, false)?;
        pos += 1;
    }
    Ok(Generated { tokens, eos: None, score: None })
}

fn beams(
    session: &mut Session<'_>,
    cfg: &GenerationConfig,
    history: &[u32],
    logits: Vec<f32>,
    mut pos: i32,
) -> Result<Vec<Generated>> {
    let k = cfg.num_beams;
    if k > MAX_SEQ || k > session.n_ubatch() {
        bail!("--num-beams {k} is more than this session supports ({})", MAX_SEQ.min(session.n_ubatch()));
    }
    let n_vocab = session.model.hp.n_vocab;
    let mut search = BeamSearch::new(cfg, history)?;
    // First step: one row, the prompt's. Afterwards one row per beam, beam i in sequence i.
    let mut rows: Vec<Vec<f32>> = vec![logits];
    loop {
        let step = search.step(&rows)?;
        if step.done {
            break;
        }
        // New beam i continues old row reorder[i]: relabel the cache cells, then feed each beam its token.
        session.cache.reorder(&step.reorder);
        let batch = Batch {
            input: Input::Tokens(&step.tokens),
            pos: vec![pos; k],
            seq: (0..k).collect(),
            logits: vec![true; k],
        };
        let out = session.decode(&batch)?;
        rows = out.chunks(n_vocab).map(|c| c.to_vec()).collect();
        pos += 1;
    }
    Ok(search
        .finalize()
        .into_iter()
        .map(|h| Generated { tokens: h.tokens, eos: h.eos, score: Some(h.score) })
        .collect())
}
