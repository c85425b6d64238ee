//! `asagi-gguf chat`: an interactive conversation on stdin/stdout. Lines are questions; commands start with `/`.
//! The KV cache is kept between turns (`crate::chat`), so a follow-up question about an image costs only its own
//! tokens. Ctrl-C stops the answer being generated, not the program.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::chat::Conversation;
use crate::load::{Loaded, ModelArgs};
use crate::run_cmd::DecodingArgs;
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
}

pub fn run(args: ChatArgs) -> Result<()> {
    let t_load = Instant::now();
    let loaded = Loaded::open(&args.load, args.load.mmproj.is_some())?;
    let tok = &loaded.tok;
    let model = loaded.model()?;
    let vmodel = loaded.vision(&model)?;
    let backends = loaded.backends();
    let mut session = loaded.session(&model, &backends)?;
    let mut encoder = vmodel.as_ref().map(|v| VisionEncoder::new(v, &backends)).transpose()?;
    let mut conv = Conversation::new(&mut session);
    for line in loaded.placement_summary() {
        eprintln!("{line}");
    }
    eprintln!("loaded in {:.0} ms. {HELP}", t_load.elapsed().as_secs_f64() * 1e3);

    let mut cfg = args.decoding.config(args.n_predict, &tok.eog);
    if cfg.do_sample && cfg.seed.is_none() {
        let seed = crate::sampling::SamplingRng::clock_seed();
        eprintln!("sampling seed = {seed} (--seed {seed} repeats this conversation)");
        cfg.seed = Some(seed);
    }
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
            let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "help" => eprintln!("{HELP}"),
                "reset" => {
                    conv.reset();
                    pending.clear();
                    eprintln!("(conversation cleared)");
                }
                "image" if encoder.is_none() => eprintln!("error: images need --mmproj"),
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
            continue;
        }

        // The images of this turn, encoded now (once: their embeddings stay in the cache afterwards).
        let t_img = Instant::now();
        let spin = if pending.is_empty() { None } else { crate::progress::spinner("encoding images") };
        let encoded =
            encoder.as_mut().map(|enc| pending.iter().map(|p| enc.encode_file(p)).collect::<Result<Vec<_>>>());
        if let Some(s) = spin {
            s.finish_and_clear();
        }
        let images: Vec<ImageEmbedding> = match encoded {
            Some(r) => match r {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    pending.clear();
                    continue;
                }
            },
            None => Vec::new(),
        };
        let image_ms = t_img.elapsed().as_secs_f64() * 1e3;
        pending.clear();
        let ids = conv.turn_ids(tok, line, images.len())?;
        let n_positions = ids.len() + images.iter().map(|i| i.n_tokens.saturating_sub(1)).sum::<usize>();
        let bar = crate::progress::prompt_bar(n_positions);
        if let Some(b) = bar {
            // The session also reports the answer's decode steps: the bar stops at the prompt's end.
            conv.session.set_progress(Some(Box::new(move |n| {
                if !b.is_finished() {
                    b.inc(n as u64);
                    if b.position() >= n_positions as u64 {
                        b.finish_and_clear();
                    }
                }
            })));
        }
        let stop = crate::interrupt::flag();
        let mut stream = tok.stream(true);
        let mut stdout = std::io::stdout().lock();
        let json = args.json;
        let result = conv.ask(&ids, tok.image, &images, &cfg, stop, |id| {
            if !json {
                stdout.write_all(stream.push(id)?.as_bytes())?;
                stdout.flush()?;
            }
            Ok(())
        });
        conv.session.set_progress(None);
        let turn = match result {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        turn_no += 1;
        let a = &turn.answer;
        let stop_reason = match (&a.eos, a.interrupted) {
            (Some(_), _) => "eos",
            (None, true) => "interrupted",
            (None, false) => "length",
        };
        // Time to the first token: image encoding + the turn's prefill + one decode step's share.
        let step_ms = turn.gen_ms / a.tokens.len().max(1) as f64;
        let ttft_ms = image_ms + turn.prompt_ms + step_ms;
        if json {
            let out = json!({
                "turn": turn_no, "n_past": turn.n_past, "prompt_tokens": ids, "prompt_positions": turn.prompt_positions,
                "tokens": a.tokens, "text": tok.decode(&a.tokens, true)?, "stop_reason": stop_reason,
                "timings": {"image_encode_ms": image_ms, "prompt_ms": turn.prompt_ms, "gen_ms": turn.gen_ms,
                    "ttft_ms": ttft_ms}
            });
            writeln!(stdout, "{out}")?;
        } else {
            writeln!(stdout)?;
        }
        drop(stdout);
        eprintln!(
            "[{} new positions after {} kept, prompt {:.0} ms{}, {} tokens at {:.2} tok/s, first token after ~{:.0} ms{}]",
            turn.prompt_positions,
            turn.n_past,
            turn.prompt_ms,
            if images.is_empty() { String::new() } else { format!(", {} image(s) {image_ms:.0} ms", images.len()) },
            a.tokens.len(),
            a.tokens.len() as f64 / (turn.gen_ms / 1e3).max(1e-9),
            ttft_ms,
            if a.interrupted { ", interrupted" } else { "" }
        );
    }
    Ok(())
}
