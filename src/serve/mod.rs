//! `asagi-gguf serve`: an HTTP server with an OpenAI-style API (`POST /v1/chat/completions`, `POST /v1/images`,
//! `GET /v1/models`, `GET /health`, `GET /stats`). Images come as `image_url` parts holding data URLs, ids of
//! images uploaded with `POST /v1/images` (or, with `--allow-paths DIR`, files under DIR). Decoding defaults to the model card's; request fields override it.
//!
//! The rooms: `http` (axum/hyper on tokio: connections, limits, access, streaming), `api` (request and response
//! types, validation), `engine` (one thread that owns the model and batches the running conversations), and
//! what the engine uses (`prompt`, `stop`), `local_file` (confined file reading), `web` (the chat page at `/`).

pub mod api;
mod engine;
mod http;
pub mod local_file;
pub mod prompt;
mod stop;
mod web;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::cache::image::ImageCache;
use crate::cache::{CacheArgs, Caches};
use crate::llm::MAX_SEQ;
use crate::load::{Loaded, ModelArgs};
use crate::preprocess::{ImageLimits, PreprocessConfig};
use crate::run_cmd::DecodingArgs;
use crate::tokenizer::Tokenizer;
use crate::vision::VisionEncoder;
use engine::{Engine, Stats};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub load: ModelArgs,
    /// Address to listen on. Anything but loopback exposes the API to the network: set --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Tokens per answer when the request does not say (`max_tokens`).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub n_predict: usize,
    /// Conversations answered at once, decoded together in one batch per step. They share the KV cache
    /// (-c cells in all); each may use up to min(8, 64/N) beams.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// KV cache (MiB) that finished conversations may keep beyond the slots' own, for later requests that
    /// continue them or share their prefix, an image's included (least recently used given up first; always
    /// within -c): the server's prefix cache.
    #[arg(long, visible_alias = "prefix-cache-ram", default_value_t = 1024)]
    pub cache_ram: usize,
    /// Image embeddings: kept in RAM (`--image-cache-ram`) and, with `--image-cache DIR`, on disk, so that an image
    /// sent again or uploaded once (`POST /v1/images`) is not encoded again (prompt prefixes stay in RAM here).
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Requests that may wait for a slot; beyond that the server answers 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on the API (not on /health).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Let web pages from this origin call the API (repeatable; `*` for any). Off by default: a page the user
    /// happens to open cannot use the server.
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// Let `image_url` name files under this directory (only regular files, after resolving symlinks).
    #[arg(long)]
    pub allow_paths: Option<PathBuf>,
    /// Largest request body in MiB (images come base64-encoded inside it).
    #[arg(long, default_value_t = 64)]
    pub max_body_mb: usize,
    /// Largest request head (request line and headers) in bytes (at least 8192).
    #[arg(long, default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// Seconds a client may take to send a request's head (also the idle time of a kept-alive connection).
    #[arg(long, default_value_t = 15)]
    pub header_timeout: u64,
    /// Seconds a client may take to send a request's body.
    #[arg(long, default_value_t = 60)]
    pub body_timeout: u64,
    /// Open connections at most; more are answered 503 and closed.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Largest encoded image in MiB.
    #[arg(long, default_value_t = 20)]
    pub max_image_mb: usize,
    /// Images per request at most.
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    /// Most pixels in an image (PIL's MAX_IMAGE_PIXELS by default).
    #[arg(long, default_value_t = crate::preprocess::MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Working memory for decoding and resizing one image, in MiB (checked from the image header).
    #[arg(long, default_value_t = 1280)]
    pub max_image_work_mb: u64,
    /// Message text per request at most, in KiB (checked before tokenizing).
    #[arg(long, default_value_t = 256)]
    pub max_text_kb: usize,
    /// Do not serve the chat page at `/` (the API only).
    #[arg(long)]
    pub no_webui: bool,
    /// Decoding defaults for requests that do not set a field.
    #[command(flatten)]
    pub decoding: DecodingArgs,
}

/// Image uploads waiting to be encoded at most (beyond: 503 with Retry-After).
const UPLOAD_QUEUE: usize = 4;

/// What the HTTP side knows of the loaded model.
pub(crate) struct ModelInfo {
    pub name: String,
    pub tok: Tokenizer,
    pub n_ctx: usize,
    pub n_image_tokens: usize,
    /// Width of the language model's embeddings (an image's rows).
    pub n_embd: usize,
    pub preprocess: Option<PreprocessConfig>,
    /// Image embeddings, shared with the engine.
    pub images: Arc<ImageCache>,
    /// The model files as loaded: a request is refused (503) once one was modified on disk.
    pub files: Vec<ggml::FileWatch>,
    /// The RPC servers holding blocks of the model (`--rpc`): a request is refused (503) once one has failed.
    pub rpc: Vec<ggml::rpc::Health>,
}

impl ModelInfo {
    /// Why the loaded model can no longer serve: a file of it changed on disk, or an RPC server holding some of
    /// its blocks failed.
    pub fn unusable(&self) -> Option<String> {
        unusable(&self.files, &self.rpc)
    }
}

/// What `ModelInfo::unusable` and the engine say.
pub(crate) fn unusable(files: &[ggml::FileWatch], rpc: &[ggml::rpc::Health]) -> Option<String> {
    ggml::FileWatch::first_change(files).or_else(|| {
        rpc.iter().find_map(|h| h.check().err()).map(|e| {
            format!("{e}; the blocks it held are gone: restart the server (with the RPC server running again)")
        })
    })
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 || a.parallel > MAX_SEQ {
        bail!("--parallel {}: between 1 and {MAX_SEQ}", a.parallel);
    }
    // Each slot owns `width` sequences of the cache (sequences are bits of a u64); the rest hold parked
    // conversations.
    let width = (MAX_SEQ / a.parallel).min(8);
    let beams = if a.decoding.greedy { 1 } else { a.decoding.num_beams };
    if beams > width {
        bail!("--num-beams {beams} with --parallel {}: a slot holds at most {width} beams", a.parallel);
    }
    if a.max_header_bytes < 8192 {
        bail!("--max-header-bytes: at least 8192");
    }
    if a.queue == 0 {
        bail!("--queue: at least 1");
    }
    let allowed = a.allow_paths.as_deref().map(local_file::AllowedDir::new).transpose()?;

    // The engine thread opens the model (its models borrow the loaded files) and owns it from then on.
    let stats = Arc::new(Stats::default());
    let (job_tx, job_rx) = tokio::sync::mpsc::channel(a.queue);
    // `POST /v1/images` encodes wait here, one encoded between two steps of the running answers.
    let (upload_tx, upload_rx) = tokio::sync::mpsc::channel(UPLOAD_QUEUE);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<ModelInfo>>(1);
    let (load, parallel, engine_stats, cache_ram) = (a.load.clone(), a.parallel, stats.clone(), a.cache_ram << 20);
    let cache_args = a.cache.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let result = (|| -> Result<()> {
                let loaded = Loaded::open(&load, load.mmproj.is_some())?;
                // The HTTP side tokenizes requests with its own copy (tokenizing is not the engine's work).
                let tok = Tokenizer::from_gguf(&loaded.llm)?.0;
                let model = loaded.model()?;
                let vmodel = loaded.vision(&model)?;
                let backends = loaded.backends();
                let session = loaded.session(&model, &backends)?;
                let encoder = vmodel.as_ref().map(|v| VisionEncoder::new(v, &loaded.vision_backends())).transpose()?;
                let n_image_tokens = encoder.as_ref().map_or(0, |e| e.model.hp.n_image_tokens());
                let images = Caches::for_loaded(&cache_args, &loaded, &session, n_image_tokens, false)?.images;
                for line in loaded.placement_summary() {
                    eprintln!("{line}");
                }
                let name = load.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or("asagi".into());
                let info = ModelInfo {
                    name,
                    tok,
                    n_ctx: session.cache.n_cells(),
                    n_image_tokens,
                    n_embd: model.hp.n_embd,
                    preprocess: encoder.as_ref().map(|e| e.model.hp.preprocess.clone()),
                    images: images.clone(),
                    files: loaded.watches(),
                    rpc: loaded.remotes.health_handles(),
                };
                let engine =
                    Engine::new(&loaded.tok, session, encoder, images, parallel, width, cache_ram, engine_stats)
                        .watch(loaded.watches(), loaded.remotes.health_handles());
                if ready_tx.send(Ok(info)).is_ok() {
                    engine.run(job_rx, upload_rx);
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = ready_tx.send(Err(e));
            }
        })
        .context("starting the engine thread")?;
    let info = ready_rx.recv().context("the engine thread ended while loading")??;

    let image_limits =
        ImageLimits { max_pixels: a.max_image_pixels, max_bytes: a.max_image_work_mb << 20, ..ImageLimits::default() };
    let limits = api::RequestLimits {
        max_text_bytes: a.max_text_kb << 10,
        max_images: a.max_images,
        max_image_bytes: a.max_image_mb << 20,
        max_messages: 1024,
        max_beams: width,
        n_ctx: info.n_ctx,
        allow_paths: allowed.is_some(),
    };
    let conf = http::Config {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        cors_origins: a.cors_origins.clone(),
        max_body: a.max_body_mb << 20,
        max_header_bytes: a.max_header_bytes,
        header_timeout: Duration::from_secs(a.header_timeout.max(1)),
        body_timeout: Duration::from_secs(a.body_timeout.max(1)),
        max_connections: a.max_connections.max(1),
        n_predict: a.n_predict,
        decoding: a.decoding.clone(),
        limits,
        image_limits,
        allowed,
        webui: !a.no_webui,
    };
    eprintln!("{} slots x {width} sequences, context {} cells shared, queue {}", a.parallel, info.n_ctx, a.queue);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(http::serve(conf, info, job_tx, upload_tx, stats))
}
