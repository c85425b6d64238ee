//! `asagi-gguf chat`: an interactive conversation on stdin/stdout. Lines are questions; commands start with `/`.
//! The KV cache is kept between turns (`crate::chat`), so a follow-up question about an image costs only its own
//! tokens. Ctrl-C stops the answer being generated, not the program.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::cache::items::{items_of, Item};
use crate::cache::kv_file::KvFile;
use crate::cache::prompt as prompt_cache;
use crate::cache::{prefix_end, CacheArgs, Caches};
use crate::chat::{Conversation, Turn};
use crate::load::{Loaded, ModelArgs};
use crate::preprocess::{DecodedImage, ImageLimits};
use crate::run_cmd::DecodingArgs;
use crate::sampling::GenerationConfig;
use crate::tokenizer::Tokenizer;
use crate::vision::{ImageEmbedding, VisionEncoder};

const HELP: &str = "Type a question and press Enter. Commands:
  /image PATH   attach an image to the next question (repeatable)
  /reset        forget the conversation
  /help         this text
  /quit         end (or Ctrl-D); Ctrl-C stops an answer";

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub load: ModelArgs,
    /// Image attached to the first question (repeatable).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Tokens to generate at most per answer.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub n_predict: usize,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// One JSON object per answer on stdout (tokens, text, positions, timings) instead of the text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Session file: if it exists and was made by this model, the conversation it holds goes on (its cells
    /// restored, nothing recomputed); after every answer the conversation is saved to it.
    #[arg(long, value_name = "FILE")]
    pub session: Option<PathBuf>,
}

pub fn run(args: ChatArgs) -> Result<()> {
    if let Some(p) = &args.session {
        crate::cache::store::check_writable_file(p).context("--session")?;
    }
    let t_load = Instant::now();
    let loaded = Loaded::open(&args.load, args.load.mmproj.is_some())?;
    let tok = &loaded.tok;
    let model = loaded.model()?;
    let vmodel = loaded.vision(&model)?;
    let backends = loaded.backends();
    let mut session = loaded.session(&model, &backends)?;
    let n_embd = model.hp.n_embd;
    let mut encoder = vmodel.as_ref().map(|v| VisionEncoder::new(v, &loaded.vision_backends())).transpose()?;
    let n_image_tokens = vmodel.as_ref().map_or(0, |v| v.hp.n_image_tokens());
    let caches = Caches::for_loaded(&args.cache, &loaded, &session, n_image_tokens, args.session.is_some())?;
    let mut conv = Conversation::new(&mut session);
    // The conversation as cache items (each turn's prompt with its images' identities, each answer's tokens): what
    // a session file holds.
    let mut items: Vec<Item> = Vec::new();
    if let Some(path) = args.session.as_ref().filter(|p| p.exists()) {
        let resumed = KvFile::read(path, &caches.expect).and_then(|f| {
            conv.resume(&f, tok.image)?;
            Ok(f.items)
        });
        match resumed {
            Ok(v) => {
                items = v;
                eprintln!("(session {}: {} positions restored)", path.display(), conv.n_past());
            }
            Err(e) => eprintln!("warning: session {}: {e:#}; starting a new conversation", path.display()),
        }
    }
    for line in loaded.placement_summary() {
        eprintln!("{line}");
    }
    eprintln!("loaded in {:.0} ms. {HELP}", t_load.elapsed().as_secs_f64() * 1e3);
    let cfg = crate::run_cmd::with_seed(args.decoding.config(args.n_predict, &tok.eog));

    let interactive = std::io::stdin().is_terminal();
    let mut pending: Vec<PathBuf> = args.images.clone();
    let mut lines = std::io::stdin().lock().lines();
    let mut turn_no = 0;
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let flow = command(cmd, &mut conv, &mut pending, encoder.is_some());
            if conv.n_past() == 0 && !items.is_empty() {
                // After /reset: the saved conversation is gone too (a later start begins anew).
                items.clear();
                if let Some(p) = &args.session {
                    let _ = std::fs::remove_file(p);
                }
            }
            match flow {
                Flow::Quit => break,
                Flow::Next => continue,
            }
        }
        // The images of this turn: decoded (their identities), then from the caches or encoded now (once: their
        // embeddings stay in the KV cache afterwards).
        let mut cache_report = prompt_cache::Report::default();
        let t_img = Instant::now();
        let paths = std::mem::take(&mut pending);
        let decoded = match decode_all(encoder.as_ref(), &paths) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        let hashes: Vec<[u8; 32]> = decoded.iter().map(|d| d.hash).collect();
        let ids = match conv.turn_ids(tok, line, decoded.len()) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        let turn_items = items_of(&ids, tok.image, &hashes);
        // A first turn whose preamble and images are a cached prefix: restored, and only the question computed.
        let end = prefix_end(&turn_items);
        let first = conv.n_past() == 0;
        let prefix = match first && end > 0 && end < turn_items.len() {
            true => caches.read_prefix(&turn_items[..end]),
            false => None,
        };
        let from_prefix = match &prefix {
            Some(f) => match conv.start_from_prefix(f, &ids[..end]) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("warning: prefix cache: {e:#}; computing the prompt");
                    conv.reset();
                    false
                }
            },
            None => false,
        };
        let (ask_ids, embeddings) = if from_prefix {
            (&ids[end..], Vec::new())
        } else {
            match embed_all(encoder.as_mut(), &caches, &decoded, n_embd, &mut cache_report) {
                Ok(v) => (&ids[..], v),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    continue;
                }
            }
        };
        let image_ms = t_img.elapsed().as_secs_f64() * 1e3;
        match answer(&mut conv, tok, ask_ids, &embeddings, &cfg, args.json) {
            Ok(turn) => {
                turn_no += 1;
                // The prefix for the next conversation about these images (written after the answer).
                if first && end > 0 && !from_prefix && end < turn_items.len() {
                    match prompt_cache::write_prefix(conv.session, &caches, &turn_items[..end]) {
                        Ok(saved) => cache_report.prefix_saved = saved,
                        Err(e) => eprintln!("warning: prefix cache: {e:#}"),
                    }
                }
                if from_prefix {
                    cache_report.restored_from = Some("prefix cache");
                }
                items.extend(turn_items);
                items.extend(turn.answer.tokens.iter().map(|&t| Item::Token(t)));
                report(tok, turn_no, &ids, &turn, image_ms, &cache_report, args.json)?;
                if let Some(path) = &args.session {
                    if let Err(e) = prompt_cache::save_session(path, conv.session, &caches, &items, items.len(), &[]) {
                        eprintln!("warning: {e:#}");
                    }
                }
            }
            Err(e) => {
                if from_prefix {
                    conv.reset(); // the restored prefix was this failed turn's
                }
                // An RPC server holding some of the blocks has failed: what it held is gone, the chat cannot go on.
                conv.session.health().context("the conversation cannot go on")?;
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

enum Flow {
    Next,
    Quit,
}

/// A `/command` line (without its slash).
fn command(cmd: &str, conv: &mut Conversation<'_, '_>, pending: &mut Vec<PathBuf>, has_vision: bool) -> Flow {
    let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
    match name {
        "quit" | "exit" => return Flow::Quit,
        "help" => eprintln!("{HELP}"),
        "reset" => {
            conv.reset();
            pending.clear();
            eprintln!("(conversation cleared)");
        }
        "image" if !has_vision => eprintln!("error: images need --mmproj"),
        "image" if rest.trim().is_empty() => eprintln!("error: /image PATH"),
        "image" => {
            let p = PathBuf::from(rest.trim());
            match p.metadata() {
                Ok(_) => {
                    eprintln!("(image {} goes with the next question)", p.display());
                    pending.push(p);
                }
                Err(e) => eprintln!("error: {}: {e}", p.display()),
            }
        }
        other => eprintln!("error: unknown command /{other} (/help lists them)"),
    }
    Flow::Next
}

/// Decodes the attached images (their identities; the resize waits for a cache miss).
fn decode_all(encoder: Option<&VisionEncoder<'_>>, paths: &[PathBuf]) -> Result<Vec<DecodedImage>> {
    let Some(enc) = encoder else { return Ok(Vec::new()) };
    paths.iter().map(|p| DecodedImage::open(p, &enc.model.hp.preprocess, &ImageLimits::default())).collect()
}

/// The embeddings of the attached images, from the cache or the encoder (a spinner meanwhile).
fn embed_all(
    encoder: Option<&mut VisionEncoder<'_>>,
    caches: &Caches,
    images: &[DecodedImage],
    n_embd: usize,
    report: &mut prompt_cache::Report,
) -> Result<Vec<ImageEmbedding>> {
    let Some(enc) = encoder else { return Ok(Vec::new()) };
    let spin = if images.is_empty() { None } else { crate::progress::spinner("encoding images") };
    let out = images.iter().map(|img| prompt_cache::embed(caches, enc, n_embd, img, report)).collect();
    if let Some(s) = spin {
        s.finish_and_clear();
    }
    out
}

/// One question: its prompt `ids` (with `images` at their `<image>` tokens) prefilled on the kept cache (a
/// progress bar for long ones), the answer streamed to stdout unless `json`.
fn answer(
    conv: &mut Conversation<'_, '_>,
    tok: &Tokenizer,
    ids: &[u32],
    images: &[ImageEmbedding],
    cfg: &GenerationConfig,
    json: bool,
) -> Result<Turn> {
    let n_positions = ids.len() + images.iter().map(|i| i.n_tokens.saturating_sub(1)).sum::<usize>();
    conv.session.set_progress(crate::progress::prompt_progress(n_positions));
    let mut stream = tok.stream(true);
    let mut stdout = std::io::stdout().lock();
    let turn = conv.ask(ids, tok.image, images, cfg, crate::interrupt::flag(), |id| {
        if !json {
            stdout.write_all(stream.push(id)?.as_bytes())?;
            stdout.flush()?;
        }
        Ok(())
    });
    conv.session.set_progress(None);
    if !json {
        // An unfinished character the stream held back at the end.
        stdout.write_all(stream.flush()?.as_bytes())?;
    }
    turn
}

/// The answer's end: a JSON object (with `--json`) or a newline on stdout, and a timing line on stderr.
fn report(
    tok: &Tokenizer,
    turn_no: usize,
    ids: &[u32],
    turn: &Turn,
    image_ms: f64,
    cache: &prompt_cache::Report,
    json: bool,
) -> Result<()> {
    let n_images = cache.images;
    let a = &turn.answer;
    // Time to the first token: image encoding + the turn's prefill + one decode step's share.
    let step_ms = turn.gen_ms / a.tokens.len().max(1) as f64;
    let ttft_ms = image_ms + turn.prompt_ms + step_ms;
    let mut stdout = std::io::stdout().lock();
    if json {
        let out = json!({
            "turn": turn_no, "n_past": turn.n_past, "prompt_tokens": ids, "prompt_positions": turn.prompt_positions,
            "tokens": a.tokens, "text": tok.decode(&a.tokens, true)?, "stop_reason": a.stop_reason(),
            "timings": {"image_encode_ms": image_ms, "prompt_ms": turn.prompt_ms, "gen_ms": turn.gen_ms,
                "ttft_ms": ttft_ms},
            "cache": {"images": cache.images, "images_encoded": cache.images_encoded,
                "image_cache_hits": cache.image_ram_hits + cache.image_disk_hits,
                "restored_from": cache.restored_from, "prefix_saved": cache.prefix_saved,
                "kept_positions": turn.n_past, "prefill_positions": turn.prompt_positions},
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
    }
    eprintln!(
        "[{} new positions after {} kept, prompt {:.0} ms{}, {} tokens at {:.2} tok/s, first token after ~{:.0} ms{}]",
        turn.prompt_positions,
        turn.n_past,
        turn.prompt_ms,
        if n_images == 0 { String::new() } else { format!(", {n_images} image(s) {image_ms:.0} ms") },
        a.tokens.len(),
        a.tokens.len() as f64 / (turn.gen_ms / 1e3).max(1e-9),
        ttft_ms,
        if a.interrupted { ", interrupted" } else { "" }
    );
    Ok(())
}
