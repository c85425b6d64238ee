//! A conversation over one session: each turn continues the cache where the previous answer ended, so the
//! earlier turns (and their images) are never encoded or prefilled again.
//!
//! Asagi was trained on single-turn prompts. Follow-ups reuse its instruction template: after an answer comes
//! `\n\n### 指示:\n{images}{question}\n\n### 応答:\n`, as if the conversation were one long instruction record.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context as _, Result};

use crate::cache::items::Item;
use crate::cache::kv_file::KvFile;
use crate::generate::{self, Generated};
use crate::llm::Session;
use crate::multimodal;
use crate::run_cmd::asagi_prompt;
use crate::sampling::GenerationConfig;
use crate::tokenizer::Tokenizer;
use crate::vision::ImageEmbedding;

/// The token ids of a user turn: the whole template with BOS for the first, the follow-up part (no BOS, no
/// word-start marker) for later ones.
pub fn turn_ids(tok: &Tokenizer, first: bool, question: &str, n_images: usize) -> Result<Vec<u32>> {
    if first {
        tok.encode(&asagi_prompt(question, n_images), true)
    } else {
        tok.encode_continuation(&format!("\n\n### 指示:\n{}{question}\n\n### 応答:\n", "<image>\n".repeat(n_images)))
    }
}

/// What one turn did.
pub struct Turn {
    pub answer: Generated,
    /// Positions the turn's prompt took (its text tokens, images expanded).
    pub prompt_positions: usize,
    /// Positions already in the cache before the turn.
    pub n_past: usize,
    /// Milliseconds spent prefilling the turn's prompt, and generating the answer.
    pub prompt_ms: f64,
    pub gen_ms: f64,
}

pub struct Conversation<'s, 'm> {
    pub session: &'s mut Session<'m>,
    /// The conversation as HF `input_ids` (one `<image>` id per image): what the repetition penalty looks at.
    history: Vec<u32>,
    /// Next position of sequence 0.
    pos: i32,
}

impl<'s, 'm> Conversation<'s, 'm> {
    /// A new conversation; the session's cache is cleared.
    pub fn new(session: &'s mut Session<'m>) -> Self {
        session.cache.clear();
        Conversation { session, history: Vec::new(), pos: 0 }
    }

    /// Continues a saved conversation: its cells restored, its tokens the history (an image item stands for
    /// `image_token`, as in HF's `input_ids`).
    pub fn resume(&mut self, f: &KvFile, image_token: Option<u32>) -> Result<()> {
        let history = f
            .items
            .iter()
            .map(|i| match i {
                Item::Token(t) => Ok(*t),
                Item::Image(_) => image_token.context("the session has images but this model has no <image> token"),
            })
            .collect::<Result<Vec<u32>>>()?;
        self.session.cache.clear();
        if let Err(e) = f.restore(&mut self.session.cache, 0, f.n_pos) {
            self.session.cache.clear();
            return Err(e);
        }
        self.history = history;
        self.pos = f.n_pos as i32;
        Ok(())
    }

    /// Starts the conversation from a cached prompt prefix (`f`, whose items are the first `prefix_ids.len()`
    /// ids of the first turn's prompt): its cells restored, those ids the history. The turn then asks with the
    /// rest of its ids.
    pub fn start_from_prefix(&mut self, f: &KvFile, prefix_ids: &[u32]) -> Result<()> {
        if !self.history.is_empty() || f.items.len() != prefix_ids.len() {
            bail!("a prefix starts a new conversation with its own items");
        }
        self.session.cache.clear();
        if let Err(e) = f.restore(&mut self.session.cache, 0, f.n_pos) {
            self.session.cache.clear();
            return Err(e);
        }
        self.history = prefix_ids.to_vec();
        self.pos = f.n_pos as i32;
        Ok(())
    }

    /// Forgets every turn.
    pub fn reset(&mut self) {
        self.session.cache.clear();
        self.history.clear();
        self.pos = 0;
    }

    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Positions used so far.
    pub fn n_past(&self) -> usize {
        self.pos as usize
    }

    /// The token ids of the next turn's prompt: the whole template with BOS for the first turn, the follow-up
    /// part for later ones.
    pub fn turn_ids(&self, tok: &Tokenizer, question: &str, n_images: usize) -> Result<Vec<u32>> {
        turn_ids(tok, self.history.is_empty(), question, n_images)
    }

    /// One turn: prefills `ids` (images spliced at the `<image>` tokens) after what the cache holds, generates
    /// the answer and leaves the cache holding the conversation up to the answer's last token. On error the
    /// conversation is left as it was before the turn.
    pub fn ask(
        &mut self,
        ids: &[u32],
        image_token: Option<u32>,
        images: &[ImageEmbedding],
        cfg: &GenerationConfig,
        stop: &AtomicBool,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Turn> {
        let result = self.turn(ids, image_token, images, cfg, stop, on_token);
        if result.is_err() {
            self.session.cache.reorder(&[0]);
            self.session.cache.seq_truncate(0, self.pos);
        }
        result
    }

    fn turn(
        &mut self,
        ids: &[u32],
        image_token: Option<u32>,
        images: &[ImageEmbedding],
        cfg: &GenerationConfig,
        stop: &AtomicBool,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Turn> {
        let segs = multimodal::segments(ids, image_token, images)?;
        let n_prompt = ids.len() + images.iter().map(|i| i.n_tokens.saturating_sub(1)).sum::<usize>();
        let n_new = cfg.answer_cells();
        let n_ctx = self.session.cache.n_cells();
        if self.n_past().saturating_add(n_prompt).saturating_add(n_new) > n_ctx {
            bail!(
                "the conversation ({} positions) + this question ({n_prompt}) + the answer ({} beam(s) x -n {}) \
                 exceed the context of {n_ctx} tokens: /reset to start over, or a larger -c",
                self.n_past(),
                cfg.num_beams,
                cfg.max_new_tokens.unwrap_or(0)
            );
        }
        let n_past = self.n_past();
        let t = std::time::Instant::now();
        let (logits, pos) = multimodal::prefill_at(self.session, &segs, 0, self.pos, false)?;
        let prompt_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut history = self.history.clone();
        history.extend_from_slice(ids);
        // The length limit counts new tokens only (HF's max_new_tokens), whatever the conversation's length.
        let t = std::time::Instant::now();
        let answer = generate::generate(self.session, cfg, &history, logits, pos, stop, on_token)?.remove(0);
        let gen_ms = t.elapsed().as_secs_f64() * 1e3;
        if cfg.num_beams > 1 {
            generate::keep_sequence(self.session, pos, &answer.tokens)?;
        }
        history.extend_from_slice(&answer.tokens);
        self.history = history;
        self.pos = pos + answer.tokens.len() as i32;
        Ok(Turn { answer, prompt_positions: n_prompt, n_past, prompt_ms, gen_ms })
    }
}
