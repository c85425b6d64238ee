//! Measurements shared by `asagi-gguf bench` and `benches/compare.rs`: our prefill, decode, image and beam
//! timings on a loaded model, the machine's memory read bandwidth, and the decode bound it implies.

use std::time::Instant;

use anyhow::Result;
use ggml::gguf::GgufFile;

use crate::generate;
use crate::llm::{Batch, Input, LlamaModel, Session};
use crate::sampling::{BeamSearch, GenerationConfig};

/// Deterministic text-like token ids of a vocabulary of `n_vocab` (ids 300.., clear of the special tokens at
/// both ends).
pub fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    let span = n_vocab.saturating_sub(400).clamp(1, 5000) as u32;
    (0..n as u32).map(|i| 300 + (i * 7919) % span).collect()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Prefill of `n` text tokens into an empty cache: tokens/s.
pub fn prefill_text(s: &mut Session<'_>, n: usize) -> Result<f64> {
    s.cache.clear();
    let t = Instant::now();
    s.prefill(Input::Tokens(&tokens(n, s.model.hp.n_vocab)), 0, 0, false)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Prefill of `n` image-token embeddings (as the projector hands them over) into an empty cache: tokens/s.
pub fn prefill_embeddings(s: &mut Session<'_>, n: usize) -> Result<f64> {
    s.cache.clear();
    let e = s.model.hp.n_embd;
    let emb: Vec<f32> = (0..n * e).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let t = Instant::now();
    s.prefill(Input::Embeddings(&emb), 0, 0, false)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// `n` single-token decode steps after a `ctx`-token prompt: tokens/s.
pub fn decode(s: &mut Session<'_>, ctx: usize, n: usize) -> Result<f64> {
    s.cache.clear();
    s.prefill(Input::Tokens(&tokens(ctx, s.model.hp.n_vocab)), 0, 0, false)?;
    let t = Instant::now();
    for i in 0..n {
        s.prefill(Input::Tokens(&[400]), 0, (ctx + i) as i32, false)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// A decode run next to the memory bandwidth measured just before it: this VM's bandwidth drifts over minutes
/// (30 to 66 GB/s), so the decode's share of the bandwidth bound is only meaningful per run.
#[derive(Clone, Copy, Debug)]
pub struct BoundedDecode {
    pub tok_s: f64,
    /// GB/s read by `threads` threads.
    pub bandwidth: f64,
    /// Decode's read rate (`bytes_per_token` x tokens/s) over the bandwidth.
    pub fraction: f64,
}

/// `decode(s, ctx, n)` right after `read_bandwidth` (whose 1 GiB buffer is then left out of the peak RSS).
pub fn decode_against_bandwidth(
    s: &mut Session<'_>,
    ctx: usize,
    n: usize,
    threads: usize,
    bytes_per_token: usize,
) -> Result<BoundedDecode> {
    let bandwidth = read_bandwidth(1 << 30, threads, 5);
    reset_peak_rss();
    let tok_s = decode(s, ctx, n)?;
    Ok(BoundedDecode { tok_s, bandwidth, fraction: tok_s * bytes_per_token as f64 / (bandwidth * 1e9) })
}

/// The cost of beam search against greedy decoding after a `ctx`-token prompt, `n` steps each (milliseconds
/// per step).
#[derive(Clone, Copy, Debug)]
pub struct BeamSteps {
    pub greedy_ms: f64,
    /// A whole 5-beam step as `run` does it (`generate` with the model card's beam sample).
    pub beam_ms: f64,
    /// Its parts: the batch of 5 sequences through the model, and `BeamSearch::step` (log-softmax, processors
    /// and the candidate draw over 5 x n_vocab).
    pub model_ms: f64,
    pub search_ms: f64,
}

pub fn beam_steps(s: &mut Session<'_>, ctx: usize, n: usize) -> Result<BeamSteps> {
    let k = 5;
    let cfg = GenerationConfig {
        max_new_tokens: Some(n),
        do_sample: true,
        temperature: 0.7,
        repetition_penalty: 1.5,
        num_beams: k,
        seed: Some(1),
        ..Default::default()
    };
    let prompt = tokens(ctx, s.model.hp.n_vocab);
    let n_vocab = s.model.hp.n_vocab;
    let greedy_ms = 1e3 / decode(s, ctx, n)?;

    // The parts, timed apart: the same loop as `generate`.
    s.cache.clear();
    let logits = s.prefill(Input::Tokens(&prompt), 0, 0, false)?;
    let mut search = BeamSearch::new(&cfg, &prompt)?;
    let (mut model_ms, mut search_ms, mut steps) = (0.0, 0.0, 0);
    let mut rows = vec![logits];
    for i in 0..n {
        let t = Instant::now();
        let step = search.step(&rows)?;
        search_ms += ms(t);
        if step.done {
            break;
        }
        s.cache.reorder(&step.reorder);
        let batch = Batch {
            input: Input::Tokens(&step.tokens),
            pos: vec![(ctx + i) as i32; k],
            seq: (0..k).collect(),
            logits: vec![true; k],
        };
        let t = Instant::now();
        let out = s.decode(&batch)?;
        model_ms += ms(t);
        steps += 1;
        rows = out.chunks(n_vocab).map(|c| c.to_vec()).collect();
    }
    let steps = steps.max(1) as f64;

    s.cache.clear();
    let logits = s.prefill(Input::Tokens(&prompt), 0, 0, false)?;
    let t = Instant::now();
    let out = generate::generate(s, &cfg, &prompt, logits, ctx as i32, &Default::default(), |_| Ok(()))?;
    let beam_ms = ms(t) / out[0].tokens.len().max(1) as f64;
    Ok(BeamSteps { greedy_ms, beam_ms, model_ms: model_ms / steps, search_ms: search_ms / steps })
}

/// Milliseconds per step of `n_rows` sequences decoding side by side after a shared `ctx`-token prompt (the
/// model part of a beam step of `n_rows` beams), `steps` steps.
pub fn batch_step_ms(s: &mut Session<'_>, ctx: usize, n_rows: usize, steps: usize) -> Result<f64> {
    s.cache.clear();
    s.prefill(Input::Tokens(&tokens(ctx, s.model.hp.n_vocab)), 0, 0, false)?;
    for seq in 1..n_rows {
        s.cache.seq_cp(0, seq);
    }
    let mut out = Vec::new();
    let t = Instant::now();
    for i in 0..steps {
        let ids: Vec<u32> = (0..n_rows as u32).map(|r| 400 + r).collect();
        let batch = Batch {
            input: Input::Tokens(&ids),
            pos: vec![(ctx + i) as i32; n_rows],
            seq: (0..n_rows).collect(),
            logits: vec![true; n_rows],
        };
        s.decode_into(&batch, &mut out)?;
    }
    Ok(ms(t) / steps.max(1) as f64)
}

/// Bytes of weights one decode step reads: every tensor but the token embeddings, of which one row.
pub fn decode_bytes_per_token(file: &GgufFile) -> usize {
    file.tensor_infos()
        .iter()
        .map(|t| if t.name == "token_embd.weight" { t.size / t.ne.get(1).copied().unwrap_or(1).max(1) } else { t.size })
        .sum()
}

/// Memory read bandwidth in GB/s: `threads` threads each summing their share of a `bytes` buffer (much larger
/// than the caches), best of `reps` passes.
pub fn read_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::thread::scope(|sc| {
            for part in buf.chunks(chunk) {
                sc.spawn(move || std::hint::black_box(sum_words(part)));
            }
        });
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// A plain fold: the compiler vectorizes it into wide loads and independent lanes (hand-unrolled accumulator
/// arrays measured 3 to 5 times slower with `target-cpu=native` on Zen 4).
fn sum_words(v: &[u64]) -> u64 {
    v.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// Resets the peak-resident-memory mark to the current resident size (Linux: `/proc/self/clear_refs`), so that
/// `peak_rss` measures from here on. Best effort.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process so far (VmHWM), in bytes; `None` where /proc is unavailable.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The model's training context, a sanity bound for benchmark sizes.
pub fn check_fits(model: &LlamaModel<'_>, n: usize) -> Result<()> {
    anyhow::ensure!(n <= model.hp.n_ctx_train, "{n} tokens exceed the model's context of {}", model.hp.n_ctx_train);
    Ok(())
}

/// Time to the first token of an image + question (milliseconds): the image through the vision tower, the prompt
/// with its image tokens prefilled, the first token picked (greedy), from pixels already preprocessed.
pub fn time_to_first_token(
    enc: &mut crate::vision::VisionEncoder<'_>,
    s: &mut Session<'_>,
    prompt: &[u32],
    image_token: Option<u32>,
    pixels: &[f32],
) -> Result<f64> {
    s.cache.clear();
    let t = Instant::now();
    let img = enc.encode_pixels(pixels, 1)?;
    let segs = crate::multimodal::segments(prompt, image_token, &img)?;
    let (logits, _) = crate::multimodal::prefill(s, &segs, 0, false)?;
    std::hint::black_box(generate::argmax(&logits));
    Ok(ms(t))
}

/// Preprocessed pixels of a synthetic image (smooth gradients), `[3, size, size]`.
pub fn test_pixels(size: usize) -> Vec<f32> {
    (0..3 * size * size).map(|i| ((i % size) as f32 / size as f32 - 0.5) * ((i / (size * size)) as f32 + 1.0)).collect()
}
