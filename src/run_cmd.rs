//! `asagi-gguf run`: text generation with the language model (images come with the vision path).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cache::items::Item;
use crate::cache::kv_file::KvFile;
use crate::cache::prompt as prompt_cache;
use crate::cache::{CacheArgs, Caches};
use crate::generate;
use crate::load::{Loaded, ModelArgs};
use crate::preprocess::{DecodedImage, ImageLimits};
use crate::sampling::GenerationConfig;
use crate::vision::VisionEncoder;

/// Asagi's instruction template (model card; training code's pre/post prompt). `{images}` holds one
/// "<image>\n" per image.
pub fn asagi_prompt(question: &str, n_images: usize) -> String {
    format!(
        "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n{}{question}\n\n### 応答:\n",
        "<image>\n".repeat(n_images)
    )
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub load: ModelArgs,
    /// Image file (repeatable); each goes where the prompt has `<image>`, in order.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Question, wrapped in Asagi's instruction template (with one `<image>` line per image).
    #[arg(short = 'p', long, conflicts_with = "raw_prompt", required_unless_present = "raw_prompt")]
    pub prompt: Option<String>,
    /// Prompt used verbatim (BOS added as the tokenizer config says).
    #[arg(long)]
    pub raw_prompt: Option<String>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub n_predict: usize,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Also write the logits at the last prompt position (float32 .npy, shape [n_vocab]).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Session file (llama.cpp's --prompt-cache): if it exists and was made by this model, the KV cells of the
    /// prompt's longest common start with it are restored instead of computed (all of them, and the logits, for
    /// the same prompt); afterwards the prompt and the answer are saved to it.
    #[arg(long, value_name = "FILE")]
    pub session: Option<PathBuf>,
}

/// Decoding flags. Defaults are the Asagi model card's: beam sample with 5 beams, temperature 0.7, repetition
/// penalty 1.5 (HF semantics: the whole context), HF's default top-k 50.
#[derive(clap::Args, Debug, Clone)]
pub struct DecodingArgs {
    /// Greedy decoding (= --temp 0 --num-beams 1).
    #[arg(long)]
    pub greedy: bool,
    /// Temperature; 0 = no sampling (greedy, or deterministic beam search with --num-beams > 1).
    #[arg(long, default_value_t = 0.7)]
    pub temp: f64,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Typical sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub typical: f64,
    /// Repetition penalty over the whole context, prompt included (HF's repetition_penalty).
    #[arg(long, default_value_t = 1.5)]
    pub repeat_penalty: f64,
    #[arg(long, default_value_t = 5)]
    pub num_beams: usize,
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram: usize,
    /// Seed of the sampler [default: from the clock, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Not in HF: llama.cpp-style presence penalty.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Not in HF: llama.cpp-style frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Not in HF: apply the penalties to the last N tokens only (llama.cpp's repeat-last-n).
    #[arg(long)]
    pub repeat_last_n: Option<usize>,
    /// No end of the answer before N new tokens (HF's min_new_tokens).
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
}

/// The model card's decoding (what `run` does without flags).
pub fn default_decoding() -> DecodingArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        d: DecodingArgs,
    }
    P::parse_from(["run"]).d
}

impl DecodingArgs {
    pub fn config(&self, n_predict: usize, eos: &[u32]) -> GenerationConfig {
        let (temp, beams) = if self.greedy { (0.0, 1) } else { (self.temp, self.num_beams.max(1)) };
        GenerationConfig {
            max_new_tokens: Some(n_predict.max(1)),
            do_sample: temp > 0.0,
            temperature: if temp > 0.0 { temp } else { 1.0 },
            top_k: Some(self.top_k),
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical,
            repetition_penalty: self.repeat_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram,
            num_beams: beams,
            length_penalty: self.length_penalty,
            eos_token_ids: eos.to_vec(),
            pad_token_id: eos.first().copied(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repeat_last_n: self.repeat_last_n,
            min_new_tokens: self.min_tokens,
            ..Default::default()
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    if let Some(p) = &args.session {
        crate::cache::store::check_writable_file(p).context("--session")?;
    }
    let t_load = Instant::now();
    let loaded = Loaded::open(&args.load, !args.images.is_empty())?;
    let tok = &loaded.tok;
    let model = loaded.model()?;
    let vmodel = loaded.vision(&model)?;
    let backends = loaded.backends();
    let mut session = loaded.session(&model, &backends)?;
    let mut encoder = vmodel.as_ref().map(|v| VisionEncoder::new(v, &loaded.vision_backends())).transpose()?;
    let n_image_tokens = vmodel.as_ref().map_or(0, |v| v.hp.n_image_tokens());
    let caches = Caches::for_loaded(&args.cache, &loaded, &session, n_image_tokens, args.session.is_some())?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;

    let text = match (&args.prompt, &args.raw_prompt) {
        (Some(q), _) => asagi_prompt(q, args.images.len()),
        (None, Some(r)) => r.clone(),
        (None, None) => unreachable!("clap requires one"),
    };
    let prompt = tok.encode(&text, true)?;
    let t_dec = Instant::now();
    let images = match &vmodel {
        Some(v) => args
            .images
            .iter()
            .map(|p| DecodedImage::open(p, &v.hp.preprocess, &ImageLimits::default()))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let decode_ms = t_dec.elapsed().as_secs_f64() * 1e3;

    let n_positions = prompt.len() + images.len() * n_image_tokens.saturating_sub(1);
    let n_ctx = session.cache.n_cells();
    let cfg = with_seed(args.decoding.config(args.n_predict, &tok.eog));
    // Each beam step takes a cell per beam: the answer may need num_beams x n cells.
    if n_positions.saturating_add(cfg.answer_cells()) > n_ctx {
        bail!(
            "prompt ({n_positions} positions) + the answer ({} beam(s) x -n {}) exceed the context of {n_ctx} tokens",
            cfg.num_beams,
            args.n_predict
        );
    }
    let saved = match &args.session {
        Some(p) if p.exists() => match KvFile::read(p, &caches.expect) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("warning: session {}: {e:#}; computing the prompt", p.display());
                None
            }
        },
        _ => None,
    };

    let t_prompt = Instant::now();
    let mut pre = prompt_cache::prefill(
        &mut session,
        &caches,
        encoder.as_mut(),
        &prompt,
        tok.image,
        &images,
        saved.as_ref(),
        true,
    )?;
    drop(saved);
    let ttft_base_ms = t_prompt.elapsed().as_secs_f64() * 1e3 + decode_ms;
    let pos = pre.pos;
    if let Some(p) = &args.dump_logits {
        write_npy(p, &pre.logits).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let prompt_logits = args.session.as_ref().map(|_| pre.logits.clone());
    let logits = std::mem::take(&mut pre.logits);

    // Ctrl-C ends the generation (what was generated is printed), a second one the program.
    let stop = crate::interrupt::flag();
    let t_gen = Instant::now();
    let mut first_token_ms = None;
    let mut stream = tok.stream(true);
    let mut stdout = std::io::stdout().lock();
    let best = generate::generate(&mut session, &cfg, &prompt, logits, pos, stop, |id| {
        first_token_ms.get_or_insert_with(|| t_gen.elapsed().as_secs_f64() * 1e3);
        if !args.json {
            stdout.write_all(stream.push(id)?.as_bytes())?;
            stdout.flush()?;
        }
        Ok(())
    })?
    .into_iter()
    .next()
    .expect("at least one sequence");
    if !args.json {
        // An unfinished character the stream held back at the end.
        stdout.write_all(stream.flush()?.as_bytes())?;
    }
    let gen_ms = t_gen.elapsed().as_secs_f64() * 1e3;
    let generated = best.tokens.clone();
    let n_decoded = generated.len().max(1);

    // What the caches keep for next time, written after the answer (a failure is a warning: the answer stands).
    prompt_cache::save_prefix(&session, &caches, &mut pre);
    if let (Some(path), Some(logits)) = (&args.session, &prompt_logits) {
        let t = Instant::now();
        let kept = match cfg.num_beams > 1 {
            true => generate::keep_sequence(&mut session, pos, &generated),
            false => Ok(()),
        };
        let mut items = pre.items.clone();
        items.extend(generated.iter().map(|&t| Item::Token(t)));
        match kept.and_then(|()| prompt_cache::save_session(path, &session, &caches, &items, pre.items.len(), logits)) {
            Ok(()) => eprintln!("session saved to {} in {:.0} ms", path.display(), t.elapsed().as_secs_f64() * 1e3),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    let report = &pre.report;

    let prompt_ms = report.prefill_ms;
    let image_ms = report.image_ms + decode_ms;
    if args.json {
        let out = json!({
            "prompt_tokens": prompt, "tokens": generated, "text": tok.decode(&generated, true)?,
            "stop_reason": best.stop_reason(),
            "timings": {"load_ms": load_ms, "image_encode_ms": image_ms, "prompt_ms": prompt_ms,
                "prompt_tokens_per_s": report.prefill_positions as f64 / (prompt_ms / 1e3),
                "ttft_ms": ttft_base_ms + first_token_ms.unwrap_or(gen_ms),
                "gen_tokens_per_s": n_decoded as f64 / (gen_ms / 1e3)},
            "cache": report.to_json(),
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
    }
    for line in loaded.placement_summary() {
        eprintln!("{line}");
    }
    eprintln!("load time        = {load_ms:10.2} ms");
    if !loaded.remotes.is_empty() {
        let t = loaded.remotes.traffic();
        eprintln!(
            "rpc traffic      = {:10.2} MB sent, {:.2} MB received ({} server(s), weights included)",
            t.sent as f64 / 1e6,
            t.received as f64 / 1e6,
            loaded.remotes.links.len()
        );
    }
    if !images.is_empty() {
        eprintln!(
            "image encode     = {image_ms:10.2} ms / {:5} images ({} encoded, {} from the cache)",
            images.len(),
            report.images_encoded,
            report.image_ram_hits + report.image_disk_hits
        );
    }
    if let Some(from) = report.restored_from {
        eprintln!(
            "restored         = {:10.2} ms / {:5} tokens from the {from}",
            report.restore_ms, report.restored_positions
        );
    }
    eprintln!(
        "prompt eval time = {prompt_ms:10.2} ms / {:5} tokens ({:8.2} tokens per second)",
        report.prefill_positions,
        report.prefill_positions as f64 / (prompt_ms / 1e3)
    );
    eprintln!(
        "eval time        = {gen_ms:10.2} ms / {:5} tokens ({:8.2} tokens per second{}){}",
        generated.len(),
        n_decoded as f64 / (gen_ms / 1e3),
        if cfg.num_beams > 1 { format!(", {} beams", cfg.num_beams) } else { String::new() },
        if best.interrupted { ", interrupted" } else { "" }
    );
    Ok(())
}

/// A sampling config without a seed gets one from the clock, printed so that the run can be repeated.
pub fn with_seed(mut cfg: GenerationConfig) -> GenerationConfig {
    if cfg.do_sample && cfg.seed.is_none() {
        let seed = crate::sampling::SamplingRng::clock_seed();
        eprintln!("sampling seed = {seed} (--seed {seed} repeats it)");
        cfg.seed = Some(seed);
    }
    cfg
}

/// A float32 `.npy` file of shape `[n]`.
pub fn write_npy(path: &std::path::Path, v: &[f32]) -> std::io::Result<()> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", v.len());
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * v.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, out)
}
