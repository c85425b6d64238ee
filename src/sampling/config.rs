//! Generation parameters with HF transformers 4.45.1 defaults (hf-generation.md §1), plus a few llama.cpp-style
//! extras that HF does not have (marked "non-HF"; they do nothing unless set).

use anyhow::{bail, Result};

/// HF's `early_stopping`: `False` (the default heuristic), `True`, or `"never"` (hf-generation.md §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    #[default]
    False,
    True,
    Never,
}

/// What `generate()` would run for a config (hf-generation.md §1, `get_generation_mode`; only the modes this
/// crate implements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Greedy,
    Sample,
    BeamSearch,
    BeamSample,
}

/// The generation parameters. `Default` gives HF's `GenerationConfig()` defaults; note that `top_k` is 50, which
/// applies whenever `do_sample` is true (`None` or `Some(0)` turns it off, as in HF).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// New tokens to generate at most. `None`: HF's `max_length` (which counts the prompt) decides.
    pub max_new_tokens: Option<usize>,
    /// Total length (prompt included) when `max_new_tokens` is `None`; HF default 20.
    pub max_length: usize,
    /// EOS is masked while fewer than this many tokens were generated (`MinNewTokensLengthLogitsProcessor`).
    pub min_new_tokens: usize,
    /// EOS is masked while the whole sequence (prompt included) is shorter than this (`MinLengthLogitsProcessor`).
    pub min_length: usize,
    pub do_sample: bool,
    /// Kept as f64 like the Python float; the processors use it as f32 (torch scalar promotion).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
    pub min_p: Option<f64>,
    pub typical_p: f64,
    /// HF semantics: over the whole context (prompt included) unless `repeat_last_n` is set.
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: usize,
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: usize,
    /// EOS ids (HF accepts an int or a list); empty = no EOS.
    pub eos_token_ids: Vec<u32>,
    /// Pad id; `None` falls back to the first EOS id (`_prepare_special_tokens`).
    pub pad_token_id: Option<u32>,
    /// Seed of the sampling RNG; `None` takes one from the clock (not reproducible).
    pub seed: Option<u64>,
    /// Non-HF (llama.cpp `--presence-penalty`): subtracted once from every token present in the penalty window.
    pub presence_penalty: f32,
    /// Non-HF (llama.cpp `--frequency-penalty`): subtracted once per occurrence in the penalty window.
    pub frequency_penalty: f32,
    /// Non-HF (llama.cpp `--repeat-last-n`): the repetition/presence/frequency penalties look only at the last n
    /// tokens of the context (`Some(0)`: none). `None` (HF): the whole context.
    pub repeat_last_n: Option<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: None,
            max_length: 20,
            min_new_tokens: 0,
            min_length: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: Some(50),
            top_p: 1.0,
            min_p: None,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repeat_last_n: None,
        }
    }
}

impl GenerationConfig {
    /// The decoding mode HF would pick (constrained, contrastive, group and assisted modes are not offered).
    pub fn mode(&self) -> Mode {
        match (self.num_beams > 1, self.do_sample) {
            (false, false) => Mode::Greedy,
            (false, true) => Mode::Sample,
            (true, false) => Mode::BeamSearch,
            (true, true) => Mode::BeamSample,
        }
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// The pad id HF would use: the given one, else the first EOS id.
    pub fn pad_token(&self) -> Option<u32> {
        self.pad_token_id.or_else(|| self.eos_token_ids.first().copied())
    }

    /// How many new tokens at most for a prompt of `prompt_len` ids (HF `_prepare_generated_length`: a set
    /// `max_new_tokens` wins; otherwise `max_length` counts the prompt and must exceed it).
    pub fn max_new(&self, prompt_len: usize) -> Result<usize> {
        match self.max_new_tokens {
            Some(0) => bail!("max_new_tokens must be greater than 0"),
            Some(n) => Ok(n),
            None if prompt_len >= self.max_length => bail!(
                "the prompt is {prompt_len} tokens long but max_length is {}; set max_new_tokens",
                self.max_length
            ),
            None => Ok(self.max_length - prompt_len),
        }
    }

    /// KV cache cells an answer may take beyond its prompt: every step adds one cell per live sequence, and beams
    /// that diverge from the first step keep all of theirs (`num_beams x max_new_tokens`).
    pub fn answer_cells(&self) -> usize {
        self.num_beams.max(1).saturating_mul(self.max_new_tokens.unwrap_or(self.max_length))
    }

    /// `min_tokens_to_keep` of the sampling warpers: 1 without beams, `nE + 1` with beams (2 without EOS).
    pub fn min_tokens_to_keep(&self) -> usize {
        if self.num_beams > 1 {
            self.eos_token_ids.len().max(1) + 1
        } else {
            1
        }
    }

    /// Beam candidates per step: `max(2, 1 + nE) * K`.
    pub fn beam_candidates(&self) -> usize {
        2.max(1 + self.eos_token_ids.len()) * self.num_beams
    }

    /// The checks HF makes in `GenerationConfig.validate` and in the processors' constructors (errors only; the
    /// parameters HF ignores with a warning, such as temperature without sampling, are ignored here too).
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == Some(0) {
            bail!("max_new_tokens must be greater than 0");
        }
        if self.num_beams == 0 {
            bail!("num_beams must be at least 1");
        }
        if self.num_return_sequences == 0 {
            bail!("num_return_sequences must be at least 1");
        }
        if self.num_beams == 1 && !self.do_sample && self.num_return_sequences != 1 {
            bail!("greedy decoding does not support num_return_sequences != 1");
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            bail!("num_return_sequences ({}) must be <= num_beams ({})", self.num_return_sequences, self.num_beams);
        }
        if self.repetition_penalty.is_nan() || self.repetition_penalty <= 0.0 {
            bail!("repetition_penalty must be a strictly positive float, got {}", self.repetition_penalty);
        }
        if self.do_sample {
            if self.temperature != 1.0 && (self.temperature.is_nan() || self.temperature <= 0.0) {
                bail!("temperature must be a strictly positive float when sampling, got {}", self.temperature);
            }
            if !(0.0..=1.0).contains(&self.top_p) {
                bail!("top_p must be in [0, 1], got {}", self.top_p);
            }
            if let Some(m) = self.min_p {
                if !(0.0..=1.0).contains(&m) {
                    bail!("min_p must be in [0, 1], got {m}");
                }
            }
            if self.typical_p.is_nan() || self.typical_p <= 0.0 {
                bail!("typical_p must be in (0, 1), got {}", self.typical_p);
            }
        }
        if !self.temperature.is_finite() || !self.length_penalty.is_finite() {
            bail!("temperature and length_penalty must be finite");
        }
        Ok(())
    }
}
