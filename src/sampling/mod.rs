//! Token selection that matches HF transformers 4.45.1 `generate()` (spec: `shared/spec/hf-generation.md`):
//! the logits-processor list, greedy and multinomial sampling (`Sampler`), and beam search / beam sample
//! (`BeamSearch`). Model-free: the caller runs the model and passes last-position logits as f32.
//!
//! Histories are HF's `input_ids` rows: the prompt with **one** `<image>` id per image (not the expanded image
//! features), then the generated tokens.
//!
//! ```
//! use asagi_gguf::sampling::{BeamSearch, GenerationConfig, Sampler};
//! # fn main() -> anyhow::Result<()> {
//! // A stand-in model: next-token logits over 6 ids for a history.
//! let model = |h: &[u32]| -> Vec<f32> { (0..6).map(|t| ((t * 7 + h.len() * 3) % 6) as f32).collect() };
//! let prompt = vec![1u32, 4, 5];
//!
//! // num_beams == 1: greedy, or sampling with do_sample.
//! let cfg = GenerationConfig { max_new_tokens: Some(4), eos_token_ids: vec![2], ..Default::default() };
//! let mut sampler = Sampler::new(&cfg, prompt.len())?;
//! let mut history = prompt.clone();
//! for _ in 0..cfg.max_new(prompt.len())? {
//!     let token = sampler.next(&model(&history), &history)?;
//!     history.push(token);
//!     if cfg.is_eos(token) { break; }
//! }
//!
//! // num_beams > 1: the caller keeps one sequence (KV cache) per beam.
//! let cfg = GenerationConfig { num_beams: 3, num_return_sequences: 2, max_new_tokens: Some(4),
//!                              eos_token_ids: vec![2], ..Default::default() };
//! let mut search = BeamSearch::new(&cfg, &prompt)?;
//! let mut rows: Vec<Vec<u32>> = vec![prompt.clone()]; // the first step may pass the prompt's row alone
//! loop {
//!     let logits: Vec<Vec<f32>> = rows.iter().map(|r| model(r)).collect();
//!     let step = search.step(&logits)?;
//!     if step.done { break; }
//!     // Reorder the caches, then append each beam's token (decoded together next step).
//!     rows = step.reorder.iter().zip(&step.tokens).map(|(&i, &t)| [&rows[i][..], &[t]].concat()).collect();
//! }
//! let best = search.finalize(); // num_return_sequences hypotheses, best first
//! assert_eq!(best.len(), 2);
//! # Ok(()) }
//! ```

mod beam;
mod config;
pub mod draw;
mod hypotheses;
pub mod math;
pub mod penalties;
mod processors;
pub mod rng;
mod sampler;
pub mod warpers;

pub use beam::{BeamSearch, StepResult};
pub use config::{EarlyStopping, GenerationConfig, Mode};
pub use hypotheses::Hypothesis;
pub use processors::Processors;
pub use rng::SamplingRng;
pub use sampler::Sampler;
