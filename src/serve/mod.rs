//! `asagi-gguf serve`: an HTTP server with an OpenAI-style API (`POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`). Images come as `image_url` parts holding data URLs (or local paths with `--allow-paths`).
//! One model, one KV cache: requests are answered one at a time, and each reuses what the cache holds of the
//! previous conversation (see `prompt`). Decoding defaults to the model card's; request fields override it.

mod prompt;
mod request;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Response, Server};

use crate::generate::{self, Generated};
use crate::llm::Session;
use crate::load::{Loaded, ModelArgs};
use crate::multimodal;
use crate::run_cmd::DecodingArgs;
use crate::tokenizer::Tokenizer;
use crate::vision::VisionEncoder;
use prompt::Item;
use request::{BadRequest, ChatRequest};

/// Largest request body accepted (images come base64-encoded inside it).
const MAX_BODY: u64 = 64 << 20;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub load: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Tokens per answer when the request does not say (`max_tokens`).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub n_predict: usize,
    /// Let `image_url` name files on this machine (off: only data URLs).
    #[arg(long)]
    pub allow_paths: bool,
    /// Decoding defaults for requests that do not set a field.
    #[command(flatten)]
    pub decoding: DecodingArgs,
}

/// The model side: everything a request needs, and what the cache holds.
struct Engine<'a> {
    tok: &'a Tokenizer,
    session: Session<'a>,
    encoder: Option<VisionEncoder<'a>>,
    /// Items in sequence 0 of the cache, in order.
    cached: Vec<Item>,
    name: String,
}

/// What a request produced.
struct Answer {
    seqs: Vec<Generated>,
    prompt_tokens: usize,
    cached_tokens: usize,
    prompt_ms: f64,
    gen_ms: f64,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let loaded = Loaded::open(&a.load, a.load.mmproj.is_some())?;
    let model = loaded.model()?;
    let vmodel = loaded.vision(&model)?;
    let backends = loaded.backends();
    let session = loaded.session(&model, &backends)?;
    let encoder = vmodel.as_ref().map(|v| VisionEncoder::new(v, &backends)).transpose()?;
    let name = a.load.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "asagi".into());
    let mut engine = Engine { tok: &loaded.tok, session, encoder, cached: Vec::new(), name };

    let addr = format!("{}:{}", a.host, a.port);
    let server = Server::http(&addr).map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
    for line in loaded.placement_summary() {
        eprintln!("{line}");
    }
    eprintln!("listening on http://{addr} (POST /v1/chat/completions, GET /v1/models, GET /health)");
    for req in server.incoming_requests() {
        let t = Instant::now();
        let (method, url) = (req.method().clone(), req.url().to_string());
        let status = handle(&mut engine, &a, req);
        eprintln!("{method} {url} -> {status} ({:.0} ms)", t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name, value).expect("static header")
}

/// Browser front ends call the API from another origin: every answer allows it (as llama.cpp's server does).
fn cors() -> Vec<Header> {
    vec![
        header("Access-Control-Allow-Origin", "*"),
        header("Access-Control-Allow-Headers", "Content-Type, Authorization"),
        header("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ]
}

fn json_response(status: u16, v: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut r = Response::from_data(v.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"));
    for h in cors() {
        r.add_header(h);
    }
    r
}

fn error_body(kind: &str, msg: &str) -> Value {
    json!({"error": {"message": msg, "type": kind}})
}

/// Answers one request; returns the status sent.
fn handle(engine: &mut Engine<'_>, a: &ServeArgs, mut req: tiny_http::Request) -> u16 {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let (status, body) = match (req.method(), path.as_str()) {
        (Method::Options, _) => {
            // A CORS preflight.
            let mut r = Response::empty(204);
            for h in cors() {
                r.add_header(h);
            }
            let _ = req.respond(r);
            return 204;
        }
        (Method::Get, "/health") => (200, json!({"status": "ok"})),
        (Method::Get, "/v1/models") => {
            (200, json!({"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "asagi-gguf"}]}))
        }
        (Method::Post, "/v1/chat/completions") => {
            let mut body = Vec::new();
            let read = req.as_reader().take(MAX_BODY + 1).read_to_end(&mut body);
            if read.is_err() || body.len() as u64 > MAX_BODY {
                (400, error_body("invalid_request_error", "the body could not be read or is over 64 MiB"))
            } else {
                match request::parse(&body, &a.decoding, a.n_predict, a.allow_paths) {
                    Err(BadRequest(m)) => (400, error_body("invalid_request_error", &m)),
                    Ok(r) if r.stream => return stream(engine, r, req),
                    Ok(r) => match complete(engine, &r, &AtomicBool::new(false), |_| Ok(())) {
                        Ok(ans) => (200, completion_body(engine, &ans)),
                        Err(e) => failure(&e),
                    },
                }
            }
        }
        _ => (404, error_body("not_found", &format!("no route {} {path}", req.method()))),
    };
    let _ = req.respond(json_response(status, &body));
    status
}

/// 400 for what the request got wrong (a bad image, too long for the context), 500 otherwise.
fn failure(e: &anyhow::Error) -> (u16, Value) {
    let msg = format!("{e:#}");
    if e.chain().any(|c| c.is::<BadRequest>()) {
        (400, error_body("invalid_request_error", &msg))
    } else {
        (500, error_body("server_error", &msg))
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn finish_reason(g: &Generated) -> &'static str {
    if g.eos.is_some() {
        "stop"
    } else {
        "length"
    }
}

fn completion_body(engine: &Engine<'_>, ans: &Answer) -> Value {
    let choices: Vec<Value> = ans
        .seqs
        .iter()
        .enumerate()
        .map(|(i, g)| {
            json!({"index": i, "finish_reason": finish_reason(g),
                "message": {"role": "assistant", "content": engine.tok.decode(&g.tokens, true).unwrap_or_default()}})
        })
        .collect();
    let completion = ans.seqs.first().map_or(0, |g| g.tokens.len());
    json!({
        "id": format!("chatcmpl-{}", now()), "object": "chat.completion", "created": now(), "model": engine.name,
        "choices": choices,
        "usage": {"prompt_tokens": ans.prompt_tokens, "completion_tokens": completion,
            "total_tokens": ans.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": ans.cached_tokens}},
        "timings": {"prompt_ms": ans.prompt_ms, "predicted_ms": ans.gen_ms}
    })
}

/// Server-sent events: a chunk per piece of text as it becomes final, then the finish reason, then `[DONE]`.
/// The response is written by another thread from a channel; if the client goes away, generation stops.
fn stream(engine: &mut Engine<'_>, r: ChatRequest, req: tiny_http::Request) -> u16 {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut headers = vec![header("Content-Type", "text/event-stream"), header("Cache-Control", "no-cache")];
    headers.extend(cors());
    let writer = std::thread::spawn(move || {
        let _ =
            req.respond(Response::new(200.into(), headers, ChannelReader { rx, buf: Vec::new(), pos: 0 }, None, None));
    });
    let (id, created, name) = (format!("chatcmpl-{}", now()), now(), engine.name.clone());
    let chunk = |delta: Value, finish: Option<&str>| {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n").into_bytes()
    };
    let gone = AtomicBool::new(false);
    let _ = tx.send(chunk(json!({"role": "assistant", "content": ""}), None));
    let tok = engine.tok;
    let mut text = tok.stream(true);
    let result = complete(engine, &r, &gone, |id| {
        let piece = text.push(id)?;
        if !piece.is_empty() && tx.send(chunk(json!({"content": piece}), None)).is_err() {
            gone.store(true, Ordering::Relaxed);
        }
        Ok(())
    });
    let status = match result {
        Ok(ans) => {
            let reason = ans.seqs.first().map_or("stop", finish_reason);
            let _ = tx.send(chunk(json!({}), Some(reason)));
            200
        }
        Err(e) => {
            let _ = tx.send(format!("data: {}\n\n", error_body("server_error", &format!("{e:#}"))).into_bytes());
            500
        }
    };
    let _ = tx.send(b"data: [DONE]\n\n".to_vec());
    drop(tx);
    let _ = writer.join();
    status
}

/// The response body of a stream: what the generating thread sends, until it hangs up.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => (self.buf, self.pos) = (b, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Prefills what the cache lacks of the request's conversation, then generates. On error the cache is emptied
/// (the next request starts from scratch).
fn complete(
    engine: &mut Engine<'_>,
    r: &ChatRequest,
    stop: &AtomicBool,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Answer> {
    let result = complete_inner(engine, r, stop, on_token);
    if result.is_err() {
        engine.session.cache.clear();
        engine.cached.clear();
    }
    result
}

fn complete_inner(
    engine: &mut Engine<'_>,
    r: &ChatRequest,
    stop: &AtomicBool,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Answer> {
    let tok = engine.tok;
    let p = prompt::build(tok, &r.messages)?;
    let has_images = p.items.iter().any(|i| matches!(i, Item::Image(_)));
    let n_img_tokens = match (&engine.encoder, has_images) {
        (_, false) => 0,
        (None, true) => return Err(BadRequest("images need the server to be started with --mmproj".into()).into()),
        (Some(e), true) => e.model.hp.n_image_tokens(),
    };
    let n_ctx = engine.session.cache.n_cells();
    let n_positions = prompt::positions(&p.items, n_img_tokens);
    if n_positions + r.max_tokens > n_ctx {
        return Err(BadRequest(format!(
            "the conversation ({n_positions} positions) + max_tokens {} exceed the context of {n_ctx} tokens",
            r.max_tokens
        ))
        .into());
    }

    // Keep the common prefix, cut the rest.
    let keep = prompt::reusable(&engine.cached, &p.items);
    let pos0 = prompt::positions(&p.items[..keep], n_img_tokens) as i32;
    engine.session.cache.reorder(&[0]);
    engine.session.cache.seq_truncate(0, pos0);
    engine.cached.truncate(keep);

    // Encode the images of the new part only.
    let t = Instant::now();
    let images: Vec<&request::Image> = r
        .messages
        .iter()
        .flat_map(|m| match m {
            request::Message::User { images, .. } => images.iter().collect::<Vec<_>>(),
            request::Message::Assistant { .. } => Vec::new(),
        })
        .collect();
    let n_images_kept = p.items[..keep].iter().filter(|i| matches!(i, Item::Image(_))).count();
    let embeddings = match engine.encoder.as_mut() {
        Some(enc) => images[n_images_kept..]
            .iter()
            .map(|im| {
                enc.encode_bytes(&im.bytes, &im.name).map_err(|e| anyhow::Error::new(BadRequest(format!("{e:#}"))))
            })
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    // A literal "<image>" typed in a message makes one more image token than images sent.
    let segs = multimodal::segments(&p.ids[keep..], tok.image, &embeddings)
        .map_err(|e| anyhow::Error::new(BadRequest(format!("messages: {e:#}"))))?;
    let (logits, pos) = multimodal::prefill_at(&mut engine.session, &segs, 0, pos0, false)?;
    let prompt_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut cfg = r.decoding.config(r.max_tokens, &tok.eog);
    cfg.num_return_sequences = r.n;
    if cfg.do_sample && cfg.seed.is_none() {
        cfg.seed = Some(crate::sampling::SamplingRng::clock_seed());
    }
    let t = Instant::now();
    let seqs = generate::generate(&mut engine.session, &cfg, &p.ids, logits, pos, stop, on_token)?;
    let gen_ms = t.elapsed().as_secs_f64() * 1e3;
    let best = &seqs[0].tokens;
    if cfg.num_beams > 1 {
        generate::keep_sequence(&mut engine.session, pos, best).context("keeping the answer in the cache")?;
    }
    engine.cached = p.items.clone();
    engine.cached.extend(best.iter().map(|&t| Item::Token(t)));
    Ok(Answer { seqs, prompt_tokens: n_positions, cached_tokens: pos0 as usize, prompt_ms, gen_ms })
}
