//! Decoding loops over a `Session`, driving the HF-exact samplers and beam search of `crate::sampling`.
//!
//! Beams are decoded together: one batch of K tokens per step (K sequences of the KV cache), so the weights are
//! read once per step; after each step the cache relabels its cells (`KvCache::reorder`) instead of copying
//! K/V data, and the prompt's cells stay shared by every beam.

use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Stopped early through the `stop` flag (Ctrl-C): neither an end token nor the length limit.
    pub interrupted: bool,
}

impl Generated {
    /// Why it ended: `eos`, `interrupted` or `length` (the `--json` spelling).
    pub fn stop_reason(&self) -> &'static str {
        match (self.eos, self.interrupted) {
            (Some(_), _) => "eos",
            (None, true) => "interrupted",
            (None, false) => "length",
        }
    }
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
/// and n-gram bans look at it. Returns `num_return_sequences` sequences (beams) or one, best first.
///
/// `on_token` sees every token of the first returned sequence, in order, each as soon as it is final: at once
/// when sampling or greedy; with beams, the prefix all beams and finished hypotheses share as it grows, and the
/// rest at the end. Setting `stop` ends generation after the current step (the sequences so far are returned,
/// marked `interrupted`).
///
/// Afterwards sequence 0 of the cache holds the prompt and, without beams, the generated tokens; with beams the
/// cells of the search are left as they are (see `keep_sequence` to continue a conversation).
pub fn generate(
    session: &mut Session<'_>,
    cfg: &GenerationConfig,
    history: &[u32],
    logits: Vec<f32>,
    pos: i32,
    stop: &AtomicBool,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<Generated>> {
    cfg.validate()?;
    if cfg.num_beams > 1 {
        beams(session, cfg, history, logits, pos, stop, on_token)
    } else {
        single(session, cfg, history, logits, pos, stop, on_token).map(|g| vec![g])
    }
}

fn single(
    session: &mut Session<'_>,
    cfg: &GenerationConfig,
    history: &[u32],
    mut logits: Vec<f32>,
    mut pos: i32,
    stop: &AtomicBool,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generated> {
    let mut sampler = Sampler::new(cfg, history.len())?;
    let mut hist = history.to_vec();
    let mut tokens = Vec::new();
    for _ in 0..cfg.max_new(history.len())? {
        if stop.load(Ordering::Relaxed) {
            return Ok(Generated { tokens, eos: None, score: None, interrupted: true });
        }
        let id = sampler.next(&logits, &hist)?;
        if cfg.is_eos(id) {
            return Ok(Generated { tokens, eos: Some(id), score: None, interrupted: false });
        }
        on_token(id)?;
        tokens.push(id);
        hist.push(id);
        logits = session.prefill(Input::Tokens(&[id]), 0, pos, false)?;
        pos += 1;
    }
    Ok(Generated { tokens, eos: None, score: None, interrupted: false })
}

fn beams(
    session: &mut Session<'_>,
    cfg: &GenerationConfig,
    history: &[u32],
    logits: Vec<f32>,
    mut pos: i32,
    stop: &AtomicBool,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<Generated>> {
    let k = cfg.num_beams;
    if k > MAX_SEQ || k > session.n_ubatch() {
        bail!("--num-beams {k} is more than this session supports ({})", MAX_SEQ.min(session.n_ubatch()));
    }
    let n_vocab = session.model.hp.n_vocab;
    let mut search = BeamSearch::new(cfg, history)?;
    let mut streamed = 0;
    let mut interrupted = false;
    // First step: one row, the prompt's. Afterwards one row per beam, beam i in sequence i.
    let mut rows: Vec<Vec<f32>> = vec![logits];
    loop {
        let step = search.step(&rows)?;
        if cfg.num_return_sequences == 1 {
            // The settled prefix only grows (see `BeamSearch::settled_prefix`); `get` keeps that an invariant,
            // not a possible panic.
            for &t in search.settled_prefix().get(streamed..).unwrap_or(&[]) {
                on_token(t)?;
                streamed += 1;
            }
        }
        if step.done {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
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
    let out: Vec<Generated> = search
        .finalize()
        .into_iter()
        .map(|h| Generated { tokens: h.tokens, eos: h.eos, score: Some(h.score), interrupted })
        .collect();
    if let Some(best) = out.first() {
        let from = if cfg.num_return_sequences == 1 { streamed } else { 0 };
        for &t in best.tokens.get(from..).unwrap_or(&[]) {
            on_token(t)?;
        }
    }
    Ok(out)
}

/// After a beam search, makes sequence 0 of the cache hold exactly `tokens` after the prompt (positions
/// `prompt_len..`), so a conversation can go on from the chosen answer: the other beams are dropped, sequence 0
/// is cut back to the prompt (whose cells every beam shared) and the answer is prefilled in one batch.
pub fn keep_sequence(session: &mut Session<'_>, prompt_len: i32, tokens: &[u32]) -> Result<()> {
    session.cache.reorder(&[0]);
    session.cache.seq_truncate(0, prompt_len);
    if !tokens.is_empty() {
        session.prefill(Input::Tokens(tokens), 0, prompt_len, false)?;
    }
    Ok(())
}
