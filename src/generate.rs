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
    mut pos: i32,
    stop: &AtomicBool,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<Generated>> {
    let mut dec = Decoder::new(cfg, history)?;
    if dec.n_seqs() > MAX_SEQ || dec.n_seqs() > session.n_ubatch() {
        bail!("--num-beams {} is more than this session supports ({})", dec.n_seqs(), MAX_SEQ.min(session.n_ubatch()));
    }
    let n_vocab = session.model.hp.n_vocab;
    let mut rows = vec![logits];
    let mut out = Vec::new();
    let mut interrupted = false;
    loop {
        // Sampling stops before its next token; a beam search only after a step (its first step sets it up).
        if stop.load(Ordering::Relaxed) && !dec.is_beams() {
            interrupted = true;
            break;
        }
        let step = dec.step(&rows)?;
        for &t in &step.emit {
            on_token(t)?;
        }
        if step.feed.is_empty() {
            break;
        }
        if stop.load(Ordering::Relaxed) && dec.is_beams() {
            interrupted = true;
            break;
        }
        if let Some(from) = &step.reorder {
            session.cache.reorder(from);
        }
        let k = step.feed.len();
        let batch =
            Batch { input: Input::Tokens(&step.feed), pos: vec![pos; k], seq: (0..k).collect(), logits: vec![true; k] };
        // The logits and the rows handed to the decoder reuse their buffers from step to step.
        session.decode_into(&batch, &mut out)?;
        rows.resize_with(k, Vec::new);
        for (row, l) in rows.iter_mut().zip(out.chunks(n_vocab)) {
            row.clear();
            row.extend_from_slice(l);
        }
        pos += 1;
        if step.done {
            break;
        }
    }
    let (out, rest) = dec.finish(interrupted);
    for t in rest {
        on_token(t)?;
    }
    Ok(out)
}

/// One step's decision of a `Decoder`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// Tokens of the first returned sequence that became final with this step, in order (to stream).
    pub emit: Vec<u32>,
    /// The token to feed to each live sequence next (sequence i of the decoder gets `feed[i]`); empty when
    /// nothing more is to be computed.
    pub feed: Vec<u32>,
    /// Beams: new sequence i continues old sequence `reorder[i]`; relabel the KV cache before feeding.
    pub reorder: Option<Vec<usize>>,
    /// No further step: call `finish`. (Sampling at its length limit still feeds its last token, so the cache
    /// holds the whole answer.)
    pub done: bool,
}

/// The decoding of one prompt as a step machine: the caller owns the model and the KV cache, passes the logits
/// rows of the live sequences, and gets what to feed next. `generate` drives one over a session; `serve`'s
/// engine drives several in one batch. Both use exactly the same decisions, so an answer does not depend on who
/// computed it.
pub struct Decoder {
    mode: Mode,
}

enum Mode {
    Single { sampler: Sampler, eos_ids: Vec<u32>, hist: Vec<u32>, tokens: Vec<u32>, eos: Option<u32>, max_new: usize },
    Beams { search: BeamSearch, streamed: usize, stream: bool },
}

impl Decoder {
    /// Checks the configuration and sets up the sampler or the beam search for a prompt of HF `input_ids`
    /// `history`.
    pub fn new(cfg: &GenerationConfig, history: &[u32]) -> Result<Decoder> {
        cfg.validate()?;
        let mode = if cfg.num_beams > 1 {
            Mode::Beams { search: BeamSearch::new(cfg, history)?, streamed: 0, stream: cfg.num_return_sequences == 1 }
        } else {
            Mode::Single {
                sampler: Sampler::new(cfg, history.len())?,
                eos_ids: cfg.eos_token_ids.clone(),
                hist: history.to_vec(),
                tokens: Vec::new(),
                eos: None,
                max_new: cfg.max_new(history.len())?,
            }
        };
        Ok(Decoder { mode })
    }

    /// Sequences (KV cache sequences, logits rows) it needs at most.
    pub fn n_seqs(&self) -> usize {
        match &self.mode {
            Mode::Single { .. } => 1,
            Mode::Beams { search, .. } => search.num_beams(),
        }
    }

    pub fn is_beams(&self) -> bool {
        matches!(self.mode, Mode::Beams { .. })
    }

    /// Tokens generated so far by the first sequence (sampling), or steps taken (beams).
    pub fn steps(&self) -> usize {
        match &self.mode {
            Mode::Single { tokens, .. } => tokens.len(),
            Mode::Beams { search, .. } => search.steps(),
        }
    }

    /// One step from the last-position logits of each live sequence (one row for the prompt's first step).
    pub fn step<R: AsRef<[f32]>>(&mut self, rows: &[R]) -> Result<Step> {
        match &mut self.mode {
            Mode::Single { sampler, eos_ids, hist, tokens, eos, max_new } => {
                let Some(row) = rows.first() else { bail!("no logits row") };
                if eos.is_some() || tokens.len() >= *max_new {
                    bail!("the decoder is finished");
                }
                let id = sampler.next(row.as_ref(), hist)?;
                if eos_ids.contains(&id) {
                    *eos = Some(id);
                    return Ok(Step { done: true, ..Step::default() });
                }
                tokens.push(id);
                hist.push(id);
                Ok(Step { emit: vec![id], feed: vec![id], reorder: None, done: tokens.len() >= *max_new })
            }
            Mode::Beams { search, streamed, stream } => {
                let r = search.step(rows)?;
                let mut emit = Vec::new();
                if *stream {
                    // The settled prefix only grows (see `BeamSearch::settled_prefix`); `get` keeps that an
                    // invariant, not a possible panic.
                    emit.extend_from_slice(search.settled_prefix().get(*streamed..).unwrap_or(&[]));
                    *streamed += emit.len();
                }
                if r.done {
                    return Ok(Step { emit, done: true, ..Step::default() });
                }
                Ok(Step { emit, feed: r.tokens, reorder: Some(r.reorder), done: false })
            }
        }
    }

    /// The sequences, best first (`interrupted` marks them stopped early), and the tokens of the first one not
    /// yet emitted by `step`.
    pub fn finish(self, interrupted: bool) -> (Vec<Generated>, Vec<u32>) {
        match self.mode {
            Mode::Single { tokens, eos, .. } => {
                (vec![Generated { tokens, eos, score: None, interrupted: interrupted && eos.is_none() }], Vec::new())
            }
            Mode::Beams { search, streamed, stream } => {
                let out: Vec<Generated> = search
                    .finalize()
                    .into_iter()
                    .map(|h| Generated { tokens: h.tokens, eos: h.eos, score: Some(h.score), interrupted })
                    .collect();
                let from = if stream { streamed } else { 0 };
                let rest = out.first().map(|g| g.tokens.get(from..).unwrap_or(&[]).to_vec()).unwrap_or_default();
                (out, rest)
            }
        }
    }
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
