//! The whole processor list of `_get_logits_processor` in HF's order (hf-generation.md §2): repetition penalty,
//! [non-HF presence/frequency penalties], no-repeat n-gram, min length, min new tokens, then, only when sampling,
//! temperature, top-k, top-p, min-p, typical. The same list serves every mode; what differs is the input (raw
//! logits for greedy/sample, log-softmax for the beam modes) and `min_tokens_to_keep`.

use anyhow::Result;

use super::config::GenerationConfig;
use super::{penalties, warpers};

/// The sampling warpers and their `min_tokens_to_keep`.
#[derive(Clone, Debug)]
struct Warpers {
    temperature: Option<f32>,
    /// Already `max(top_k, min_tokens_to_keep)`, as the constructor does.
    top_k: Option<usize>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    typical: Option<f64>,
    min_keep: usize,
}

/// A built processor list for one generation (one prompt).
#[derive(Clone, Debug)]
pub struct Processors {
    repetition: Option<f32>,
    presence: f32,
    frequency: f32,
    window: Option<usize>,
    ngram: usize,
    min_length: usize,
    min_new_tokens: usize,
    prompt_len: usize,
    eos: Vec<u32>,
    warpers: Option<Warpers>,
}

impl Processors {
    /// The list HF builds for `cfg`, for a prompt of `prompt_len` ids (the length of HF's `input_ids` at the
    /// start, with one `<image>` id per image).
    pub fn new(cfg: &GenerationConfig, prompt_len: usize) -> Result<Self> {
        cfg.validate()?;
        let min_keep = cfg.min_tokens_to_keep();
        let warpers = cfg.do_sample.then(|| Warpers {
            temperature: (cfg.temperature != 1.0).then_some(cfg.temperature as f32),
            top_k: cfg.top_k.filter(|&k| k != 0).map(|k| k.max(min_keep)),
            top_p: (cfg.top_p < 1.0).then_some(cfg.top_p),
            min_p: cfg.min_p,
            typical: (cfg.typical_p < 1.0).then_some(cfg.typical_p),
            min_keep,
        });
        Ok(Processors {
            repetition: (cfg.repetition_penalty != 1.0).then_some(cfg.repetition_penalty as f32),
            presence: cfg.presence_penalty,
            frequency: cfg.frequency_penalty,
            window: cfg.repeat_last_n,
            ngram: cfg.no_repeat_ngram_size,
            min_length: cfg.min_length,
            min_new_tokens: cfg.min_new_tokens,
            prompt_len,
            eos: cfg.eos_token_ids.clone(),
            warpers,
        })
    }

    /// Applies the list in place to one row of scores, whose history (prompt + generated so far) is `history`.
    pub fn apply(&self, scores: &mut [f32], history: &[u32]) -> Result<()> {
        // Penalty window: HF looks at the whole row; the non-HF repeat_last_n narrows it.
        let window = match self.window {
            Some(n) => &history[history.len().saturating_sub(n)..],
            None => history,
        };
        if let Some(theta) = self.repetition {
            penalties::repetition(scores, window, theta)?;
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            penalties::presence_frequency(scores, window, self.presence, self.frequency)?;
        }
        if self.ngram > 0 {
            penalties::no_repeat_ngram(scores, history, self.ngram)?;
        }
        // MinLength counts the prompt, MinNewTokens does not; both mask the same EOS ids.
        let short =
            history.len() < self.min_length || history.len().saturating_sub(self.prompt_len) < self.min_new_tokens;
        if short && !self.eos.is_empty() {
            penalties::mask_eos(scores, &self.eos)?;
        }
        if let Some(w) = &self.warpers {
            if let Some(t) = w.temperature {
                warpers::temperature(scores, t);
            }
            if let Some(k) = w.top_k {
                warpers::top_k(scores, k);
            }
            if let Some(p) = w.top_p {
                warpers::top_p(scores, p, w.min_keep);
            }
            if let Some(m) = w.min_p {
                warpers::min_p(scores, m, w.min_keep);
            }
            if let Some(m) = w.typical {
                warpers::typical(scores, m, w.min_keep);
            }
        }
        Ok(())
    }
}
