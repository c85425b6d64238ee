//! The HTTP layer: hyper connections on tokio (each its own task, so no client can hold up another), axum
//! routes, and the limits and access rules every request meets before the engine sees it:
//!
//! - connections capped (`--max-connections`, then 503), request heads bounded in size and time (hyper's
//!   `max_buf_size`, `header_read_timeout`: a slow or endless head closes the connection), bodies bounded in
//!   size (Content-Length checked first, then while reading) and time (`--body-timeout`, 408);
//! - `Host` checked against the bound address on loopback binds (DNS rebinding), `--api-key` as a Bearer token,
//!   CORS only for `--cors-origin` origins, and only `application/json` bodies (a page cannot post `text/plain`
//!   without a preflight);
//! - a panic in a handler answers 500 (tower-http's CatchPanic); the engine catches its own;
//! - the log escapes what clients send.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt as _;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::api::{self, BadRequest, ImageSource, Message, RequestLimits, Validated};
use super::engine::{EncodeJob, Event, Job, PreparedImage, Stats};
use super::local_file::AllowedDir;
use super::prompt::{self, Item};
use super::ModelInfo;
use crate::generate::Decoder;
use crate::preprocess::{preprocess_bytes_limited, ImageLimits};
use crate::run_cmd::DecodingArgs;

pub struct Config {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub cors_origins: Vec<String>,
    pub max_body: usize,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub n_predict: usize,
    pub decoding: DecodingArgs,
    pub limits: RequestLimits,
    pub image_limits: ImageLimits,
    pub allowed: Option<AllowedDir>,
    /// Serve the chat page at `/`.
    pub webui: bool,
}

struct AppState {
    conf: Config,
    info: ModelInfo,
    engine: mpsc::Sender<Job>,
    /// Images to encode for `POST /v1/images` (a queue of their own, bounded: 503 beyond it).
    uploads: mpsc::Sender<EncodeJob>,
    stats: Arc<Stats>,
    /// Requests are parsed and prepared on blocking threads, this many at once (JSON, base64, tokenizing)...
    work: Arc<Semaphore>,
    /// ...and of those, this many with images (decoding and resizing are CPU- and memory-heavy). The permits
    /// travel with the work: a client that leaves does not free them before its work has ended.
    images: Arc<Semaphore>,
    /// `Host` values accepted on a loopback bind; `None`: any.
    hosts: Option<Vec<String>>,
}

/// The peer of a connection, for the log.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

pub async fn serve(
    conf: Config,
    info: ModelInfo,
    engine: mpsc::Sender<Job>,
    uploads: mpsc::Sender<EncodeJob>,
    stats: Arc<Stats>,
) -> Result<()> {
    let addr = format!("{}:{}", conf.host, conf.port);
    let listener = TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let hosts = local.ip().is_loopback().then(|| {
        let p = local.port();
        ["localhost", "127.0.0.1", "[::1]"].iter().flat_map(|h| [h.to_string(), format!("{h}:{p}")]).collect()
    });
    if !local.ip().is_loopback() {
        eprintln!(
            "warning: listening on {local}, beyond this machine{}",
            if conf.api_key.is_none() { ": anyone who can reach it can use the model (set --api-key)" } else { "" }
        );
    }
    let max_connections = conf.max_connections;
    let (header_timeout, max_header_bytes) = (conf.header_timeout, conf.max_header_bytes);
    let state = Arc::new(AppState {
        conf,
        info,
        engine,
        uploads,
        stats,
        work: Arc::new(Semaphore::new(4)),
        images: Arc::new(Semaphore::new(2)),
        hosts,
    });
    let app = router(state.clone());
    eprintln!("listening on http://{local} (POST /v1/chat/completions, POST /v1/images, GET /v1/models, GET /health, GET /stats)");
    if state.conf.webui {
        eprintln!("chat page: http://{local}/");
    }

    let conns = Arc::new(Semaphore::new(max_connections));
    loop {
        let (mut stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(busy)).await;
            });
            continue;
        };
        let svc = app.clone().map_request(move |mut r: Request<hyper::body::Incoming>| {
            r.extensions_mut().insert(Peer(peer));
            r
        });
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(max_header_bytes);
            let _ = b.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).await;
            drop(permit);
        });
    }
}

fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/images", post(upload_image))
        .route("/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let mut app = Router::new().route("/health", get(health)).merge(api);
    if state.conf.webui {
        app = app.merge(super::web::routes());
    }
    let mut app = app.fallback(not_found).with_state(state.clone());
    if !state.conf.cors_origins.is_empty() {
        let origins = &state.conf.cors_origins;
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
        );
    }
    app.layer(middleware::from_fn_with_state(state, check_host))
        .layer(CatchPanicLayer::custom(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error")))
        .layer(middleware::from_fn(log))
}

fn error(status: StatusCode, kind: &'static str, msg: impl Into<String>) -> Response {
    (status, Json(api::error_body(kind, msg))).into_response()
}

fn bad_request(e: BadRequest) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", e.0)
}

/// One line per request: peer, method, path (escaped: a client's bytes never reach the terminal raw), status.
async fn log(req: Request, next: Next) -> Response {
    let t = Instant::now();
    let peer = req.extensions().get::<Peer>().map(|p| p.0.to_string()).unwrap_or_default();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    eprintln!(
        "{peer} {method} {} -> {} ({:.0} ms)",
        path.escape_debug(),
        resp.status().as_u16(),
        t.elapsed().as_secs_f64() * 1e3
    );
    resp
}

/// On a loopback bind only requests naming this machine are served: a web page on another name that resolves to
/// 127.0.0.1 (DNS rebinding) is refused.
async fn check_host(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let (Some(hosts), Some(h)) = (&st.hosts, req.headers().get(header::HOST)) {
        let ok = h.to_str().is_ok_and(|h| hosts.iter().any(|a| a.eq_ignore_ascii_case(h)));
        if !ok {
            return error(StatusCode::FORBIDDEN, "forbidden", "the Host header does not name this server");
        }
    }
    next.run(req).await
}

async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.conf.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "a valid API key is required (Authorization: Bearer KEY)",
            );
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", format!("no route {method} {}", uri.path().escape_debug()))
}

/// 503 once a model file was modified on disk (two `fstat`s): the weights in use may be gone; or once an RPC
/// server holding some of the model's blocks has failed (`--rpc`).
fn model_changed(st: &AppState) -> Option<Response> {
    st.info.unusable().map(|msg| error(StatusCode::SERVICE_UNAVAILABLE, "server_error", msg))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.engine.is_closed() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the engine has stopped");
    }
    if let Some(r) = model_changed(&st) {
        return r;
    }
    let busy = st.stats.busy.load(Ordering::Relaxed);
    let slots = st.stats.slots.load(Ordering::Relaxed);
    Json(serde_json::json!({"status": "ok", "slots_idle": slots.saturating_sub(busy), "slots_processing": busy}))
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(
        serde_json::json!({"object": "list", "data": [{"id": st.info.name, "object": "model", "owned_by": "asagi-gguf",
        "meta": {"n_ctx": st.info.n_ctx, "vision": st.info.preprocess.is_some()}}]}),
    )
    .into_response()
}

async fn stats(State(st): State<Arc<AppState>>) -> Response {
    let mut v = st.stats.to_json();
    let (c, (n, bytes)) = { (st.info.images.counts(), st.info.images.ram_usage()) };
    v["image_cache"] = serde_json::json!({"ram_hits": c.ram_hits, "disk_hits": c.disk_hits, "misses": c.misses,
        "bad_entries": c.bad_entries, "ram_images": n, "ram_bytes": bytes});
    Json(v).into_response()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A request's JSON body: `Content-Type: application/json`, within `--max-body-mb` (the declared length checked
/// first) and `--body-timeout`; else the error response.
async fn json_body(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "Content-Type: application/json is required",
        ));
    }
    let max = st.conf.max_body;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the body is over {} MiB", max >> 20),
        ));
    }
    match tokio::time::timeout(st.conf.body_timeout, axum::body::to_bytes(body, max)).await {
        Err(_) => {
            let mut r = error(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "the body did not arrive in time");
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
        Ok(Err(_)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the body could not be read or is over {} MiB", max >> 20),
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

/// `POST /v1/images` with `{"url": "data:image/...;base64,..."}` (or a path under `--allow-paths`): the image is
/// decoded, encoded once into the image cache, and known by the returned id, which later requests give as an
/// `image_url` instead of the image (`{"id": "img-...", "object": "image", "tokens": N, "cached": bool,
/// "encode_ms": ms}`).
async fn upload_image(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = model_changed(&st) {
        return r;
    }
    let bytes = match json_body(&st, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let shutting_down = || error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting down");
    let (Ok(work), Ok(image)) = (st.work.clone().acquire_owned().await, st.images.clone().acquire_owned().await) else {
        return shutting_down();
    };
    let st2 = st.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let _permits = (work, image);
        let url = api::parse_upload(&bytes)?;
        let src = api::image_source(&url, "url", &st2.conf.limits)?;
        match src {
            ImageSource::Id(h) => uploaded(&st2.info, &h).map(|_| (Vec::new(), h)).map_err(BadRequest),
            src => load_image(&st2, &src, "url"),
        }
    });
    let (pixels, hash) = match loaded.await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return bad_request(e),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error reading the image"),
    };
    let answer = |cached: bool, ms: f64| {
        Json(serde_json::json!({"id": api::image_id(&hash), "object": "image", "tokens": st.info.n_image_tokens,
            "cached": cached, "encode_ms": ms}))
        .into_response()
    };
    if pixels.is_empty() {
        return answer(true, 0.0);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err(e) = st.uploads.try_send(EncodeJob { hash, pixels, reply: tx }) {
        return match e {
            mpsc::error::TrySendError::Full(_) => {
                let mut r =
                    error(StatusCode::SERVICE_UNAVAILABLE, "server_busy", "the upload queue is full; retry shortly");
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            mpsc::error::TrySendError::Closed(_) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped")
            }
        };
    }
    match rx.await {
        Ok(Ok(done)) => answer(done.cached, done.ms),
        Ok(Err(msg)) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped"),
    }
}

async fn chat_completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = model_changed(&st) {
        return r;
    }
    let bytes = match json_body(&st, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let shutting_down = || error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting down");
    let Ok(work) = st.work.clone().acquire_owned().await else { return shutting_down() };
    let st2 = st.clone();
    let parsed = tokio::task::spawn_blocking(move || {
        let v = api::parse(&bytes, &st2.conf.decoding, st2.conf.n_predict, &st2.conf.limits);
        (v, work)
    });
    let (v, work) = match parsed.await {
        Ok((Ok(v), work)) => (v, work),
        Ok((Err(e), _)) => return bad_request(e),
        Err(_) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error reading the request")
        }
    };
    let (stream, include_usage) = (v.stream, v.include_usage);
    let has_images = v.messages.iter().any(|m| matches!(m, Message::User { images, .. } if !images.is_empty()));
    let image_permit = match has_images {
        true => match st.images.clone().acquire_owned().await {
            Ok(p) => Some(p),
            Err(_) => return shutting_down(),
        },
        false => None,
    };
    let st2 = st.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let prepared = tokio::task::spawn_blocking(move || {
        let _permits = (work, image_permit);
        prepare(&st2, v, tx)
    });
    let job = match prepared.await {
        Ok(Ok(job)) => job,
        Ok(Err(e)) => return bad_request(e),
        Err(_) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error preparing the request")
        }
    };
    st.stats.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = st.engine.try_send(job) {
        st.stats.queued.fetch_sub(1, Ordering::Relaxed);
        return match e {
            mpsc::error::TrySendError::Full(_) => {
                st.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_busy",
                    "every slot is busy and the queue is full; retry shortly",
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            mpsc::error::TrySendError::Closed(_) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped")
            }
        };
    }
    let id = format!("chatcmpl-{:032x}", rand::random::<u128>());
    if stream {
        let mut r = sse(st, id, rx, include_usage).into_response();
        // Reverse proxies (nginx) buffer responses unless told not to: events would arrive in bursts.
        r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    } else {
        complete(st, id, rx).await
    }
}

/// Reads (a data URL's bytes, or a file under `--allow-paths`), decodes and preprocesses an image: its
/// `pixel_values` and identity.
fn load_image(st: &AppState, src: &ImageSource, at: &str) -> Result<(Vec<f32>, [u8; 32]), BadRequest> {
    let Some(pre) = &st.info.preprocess else {
        return Err(BadRequest(format!("{at}: images need the server to be started with --mmproj")));
    };
    let owned;
    let bytes: &[u8] = match src {
        ImageSource::Id(_) => unreachable!("ids are looked up, not loaded"),
        ImageSource::Data(b) => b,
        ImageSource::Path(p) => {
            let dir = st.conf.allowed.as_ref().ok_or_else(|| BadRequest(format!("{at}: local paths are off")))?;
            owned = dir.read(p, st.conf.limits.max_image_bytes as u64).map_err(|e| {
                eprintln!("{at}: refused {:?}: {}", p.escape_debug().to_string(), e.reason().escape_debug());
                BadRequest(format!("{at}: {e}"))
            })?;
            &owned
        }
    };
    preprocess_bytes_limited(bytes, at, pre, &st.conf.image_limits).map_err(|e| BadRequest(format!("{e:#}")))
}

/// An uploaded image, by its id: its embeddings from the image cache.
fn uploaded(info: &ModelInfo, hash: &[u8; 32]) -> Result<PreparedImage, String> {
    let n_embd = info.n_embd;
    let emb = info.images.get(hash, info.n_image_tokens, n_embd).map(|(e, _)| e);
    match emb {
        Some(e) => Ok(PreparedImage { hash: *hash, pixels: Vec::new(), emb: Some(e) }),
        None => Err(format!(
            "image {} is not in the server's image cache (never uploaded, or given up for newer ones): upload it \
             again with POST /v1/images",
            api::image_id(hash)
        )),
    }
}

/// Reads and preprocesses the images, tokenizes the conversation and checks that it fits: everything that can
/// be refused is refused here, before the engine spends any time on it.
fn prepare(st: &AppState, v: Validated, events: mpsc::UnboundedSender<Event>) -> Result<Job, BadRequest> {
    let info = &st.info;
    let mut images = Vec::new();
    for m in &v.messages {
        let Message::User { images: list, .. } = m else { continue };
        for im in list {
            images.push(match &im.source {
                ImageSource::Id(hash) => uploaded(info, hash).map_err(|e| BadRequest(format!("{}: {e}", im.at)))?,
                src => {
                    let (pixels, hash) = load_image(st, src, &im.at)?;
                    PreparedImage { hash, pixels, emb: None }
                }
            });
        }
    }
    let hashes: Vec<[u8; 32]> = images.iter().map(|i| i.hash).collect();
    let p = prompt::build(&info.tok, &v.messages, &hashes).map_err(|e| BadRequest(format!("messages: {e:#}")))?;
    let marks = info.tok.image.map_or(0, |t| p.ids.iter().filter(|&&x| x == t).count());
    if marks != images.len() {
        return Err(BadRequest(format!(
            "messages: the text holds {} literal <image> mark(s) besides the {} image(s) sent",
            marks - images.len().min(marks),
            images.len()
        )));
    }
    debug_assert_eq!(p.items.iter().filter(|i| matches!(i, Item::Image(_))).count(), images.len());
    let positions = prompt::positions(&p.items, info.n_image_tokens);
    let mut cfg = v.decoding.config(v.max_tokens, &info.tok.eog);
    cfg.num_return_sequences = v.n;
    cfg.min_new_tokens = v.min_tokens;
    if cfg.do_sample && cfg.seed.is_none() {
        cfg.seed = Some(crate::sampling::SamplingRng::clock_seed());
    }
    let answer = cfg.answer_cells();
    if positions.saturating_add(answer) > info.n_ctx {
        return Err(BadRequest(format!(
            "max_tokens: the conversation takes {positions} positions and the answer up to {} ({} beam(s) x \
             max_tokens {}): more than the context of {} tokens",
            answer,
            v.beams(),
            v.max_tokens,
            info.n_ctx
        )));
    }
    // The sampler and beam search check their parameters when they are made: do it now, not after the prefill.
    Decoder::new(&cfg, &p.ids).map_err(|e| BadRequest(format!("decoding parameters: {e:#}")))?;
    Ok(Job {
        prompt: p,
        images,
        cfg,
        stops: v.stops,
        stream: v.stream,
        owner: v.user,
        events,
        queued_at: Instant::now(),
    })
}

/// A whole answer as one JSON body. If the client leaves, this future is dropped, the receiver with it, and the
/// engine cancels the request.
async fn complete(st: Arc<AppState>, id: String, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    loop {
        match rx.recv().await {
            Some(Event::Delta(_)) => continue,
            Some(Event::Done(f)) => return Json(api::completion(&id, now(), &st.info.name, &f)).into_response(),
            Some(Event::Error(m)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m),
            None => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped"),
        }
    }
}

/// Server-sent events as the OpenAI API sends them: a role chunk, a chunk per piece of text as it becomes final,
/// a chunk with the finish reason (and, if asked, one with the usage), then `[DONE]`. Each event is written and
/// flushed as it is produced; comments keep an idle stream alive (image encoding can take a while).
fn sse(
    st: Arc<AppState>,
    id: String,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let created = now();
    let chunk = move |st: &AppState, id: &str, delta: api::Delta, finish: Option<&'static str>| {
        let c = api::Chunk {
            id,
            object: "chat.completion.chunk",
            created,
            model: &st.info.name,
            choices: vec![api::ChunkChoice { index: 0, delta, finish_reason: finish }],
            usage: None,
            timings: None,
        };
        SseEvent::default().data(serde_json::to_string(&c).unwrap_or_default())
    };
    enum Phase {
        Start,
        Body,
        Done,
    }
    let events = stream::unfold((rx, Phase::Start, Vec::<SseEvent>::new()), move |(mut rx, phase, mut out)| {
        let (st, id) = (st.clone(), id.clone());
        async move {
            if let Some(e) = out.pop() {
                return Some((Ok(e), (rx, phase, out)));
            }
            match phase {
                Phase::Start => {
                    let e = chunk(&st, &id, api::Delta { role: Some("assistant"), content: Some(String::new()) }, None);
                    Some((Ok(e), (rx, Phase::Body, out)))
                }
                Phase::Done => None,
                Phase::Body => match rx.recv().await {
                    Some(Event::Delta(text)) => {
                        let e = chunk(&st, &id, api::Delta { role: None, content: Some(text) }, None);
                        Some((Ok(e), (rx, Phase::Body, out)))
                    }
                    Some(Event::Done(f)) => {
                        // `out` is a stack: pushed in reverse order of sending.
                        out.push(SseEvent::default().data("[DONE]"));
                        if include_usage {
                            let c = api::Chunk {
                                id: &id,
                                object: "chat.completion.chunk",
                                created,
                                model: &st.info.name,
                                choices: Vec::new(),
                                usage: Some(api::usage_out(&f.usage)),
                                timings: Some(api::timings(&f.usage)),
                            };
                            out.push(SseEvent::default().data(serde_json::to_string(&c).unwrap_or_default()));
                        }
                        let reason = f.choices.first().map_or("stop", |c| c.finish_reason);
                        let e = chunk(&st, &id, api::Delta::default(), Some(reason));
                        Some((Ok(e), (rx, Phase::Done, out)))
                    }
                    Some(Event::Error(m)) => {
                        out.push(SseEvent::default().data("[DONE]"));
                        let body = serde_json::to_string(&api::error_body("server_error", m)).unwrap_or_default();
                        Some((Ok(SseEvent::default().data(body)), (rx, Phase::Done, out)))
                    }
                    None => None,
                },
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}
