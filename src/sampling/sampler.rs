//! Greedy and multinomial decoding of one row (`_sample`, hf-generation.md §3): processors on the raw f32 logits,
//! then the first argmax, or one draw from `softmax(scores)`. The caller owns the model and the stopping test
//! (`GenerationConfig::is_eos`, `max_new`).

use anyhow::{bail, Result};

use super::config::GenerationConfig;
use super::draw::categorical;
use super::math::{argmax, softmax};
use super::processors::Processors;
use super::rng::SamplingRng;

/// Picks the next token of one sequence, for `num_beams == 1`.
#[derive(Clone, Debug)]
pub struct Sampler {
    processors: Processors,
    do_sample: bool,
    rng: SamplingRng,
    seed: u64,
}

impl Sampler {
    /// `prompt_len`: the length of the HF `input_ids` prompt (one `<image>` id per image), for min_new_tokens.
    pub fn new(cfg: &GenerationConfig, prompt_len: usize) -> Result<Self> {
        if cfg.num_beams != 1 {
            bail!("Sampler is for num_beams == 1; use BeamSearch for {} beams", cfg.num_beams);
        }
        let seed = cfg.seed.unwrap_or_else(SamplingRng::clock_seed);
        Ok(Sampler {
            processors: Processors::new(cfg, prompt_len)?,
            do_sample: cfg.do_sample,
            rng: SamplingRng::new(seed),
            seed,
        })
    }

    /// The seed in use (the configured one, or the clock's).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The processed scores HF would report for this step (`output_scores`), `-inf` where masked.
    /// `history` is the whole HF row so far: prompt ids then the generated tokens.
    pub fn process(&self, logits: &[f32], history: &[u32]) -> Result<Vec<f32>> {
        let mut scores = logits.to_vec();
        self.processors.apply(&mut scores, history)?;
        Ok(scores)
    }

    /// The token for processed `scores`: argmax (first maximum) when not sampling, else one draw from
    /// `softmax(scores)` (an error if every token is masked, as torch raises).
    pub fn pick(&mut self, scores: &[f32]) -> Result<u32> {
        if !self.do_sample {
            return Ok(argmax(scores) as u32);
        }
        Ok(categorical(&softmax(scores), &mut self.rng)? as u32)
    }

    /// `process` then `pick`: the next token after `history`, given the model's last-position logits.
    pub fn next(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let scores = self.process(logits, history)?;
        self.pick(&scores)
    }
}
