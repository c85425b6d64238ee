//! The OpenAI-style API types: the chat completion request as clients send it (serde), its validation into what
//! the engine runs (every problem a `BadRequest` naming the field, found before any model work), and the
//! response and stream chunk bodies.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::engine::{Finished, Usage};
use crate::run_cmd::DecodingArgs;

/// A client error (HTTP 400), with a message naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadRequest {}

fn bad<T>(msg: impl Into<String>) -> Result<T, BadRequest> {
    Err(BadRequest(msg.into()))
}

// ---- The request as sent ---------------------------------------------------------------------------------------

/// `POST /v1/chat/completions`. Unknown fields are ignored (clients send `model`, `logprobs`, ... freely).
#[derive(Deserialize, Debug, Default)]
pub struct ChatCompletionRequest {
    pub messages: Vec<MessageIn>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub min_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Not OpenAI's: beam search (the model card decodes with 5 beams).
    pub num_beams: Option<u64>,
    pub length_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    /// Not OpenAI's (vLLM's): end tokens are ignored until this many tokens were generated.
    pub min_tokens: Option<u64>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// The end user; cached-token counts are reported only for prefixes made by the same user.
    pub user: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Url(String),
}

// ---- What the engine runs --------------------------------------------------------------------------------------

/// Where an image comes from: its bytes (a data URL), a path to read under `--allow-paths`, or the id
/// `POST /v1/images` returned for it (`img-` and the 64 hex digits of its identity).
pub enum ImageSource {
    Data(Vec<u8>),
    Path(String),
    Id([u8; 32]),
}

/// The body of `POST /v1/images`: `{"url": "..."}`, the same forms as an `image_url`'s url.
pub fn parse_upload(bytes: &[u8]) -> Result<String, BadRequest> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Upload {
        url: String,
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, Upload>(de) {
        Ok(u) => Ok(u.url),
        Err(e) => bad(format!("{}: {}", e.path(), e.inner())),
    }
}

/// The id of an uploaded image, as `POST /v1/images` returns it and `image_url` takes it.
pub fn image_id(hash: &[u8; 32]) -> String {
    format!("img-{}", crate::cache::identity::hex(hash))
}

pub struct ImageIn {
    pub source: ImageSource,
    /// `messages[i].content[j]`, for error messages.
    pub at: String,
}

pub enum Message {
    User { text: String, images: Vec<ImageIn> },
    Assistant { text: String },
}

/// Bounds on what one request may ask for (server flags).
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Bytes of message text (before tokenizing).
    pub max_text_bytes: usize,
    pub max_images: usize,
    /// Encoded bytes of one image.
    pub max_image_bytes: usize,
    pub max_messages: usize,
    /// The most beams (= sequences of a slot).
    pub max_beams: usize,
    /// The context: max_tokens can never exceed it.
    pub n_ctx: usize,
    pub allow_paths: bool,
}

/// A checked request.
pub struct Validated {
    pub messages: Vec<Message>,
    pub decoding: DecodingArgs,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub stops: Vec<String>,
    pub user: Option<String>,
}

impl Validated {
    /// Beams the answer runs (1 unless beam search).
    pub fn beams(&self) -> usize {
        if self.decoding.greedy {
            1
        } else {
            self.decoding.num_beams
        }
    }
}

/// At most this many stop strings (OpenAI's limit), of at most this many bytes each.
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

/// Parses and checks a request body. `defaults` are the server's decoding flags (the model card's unless
/// overridden).
pub fn parse(
    body: &[u8],
    defaults: &DecodingArgs,
    default_max: usize,
    lim: &RequestLimits,
) -> Result<Validated, BadRequest> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let r: ChatCompletionRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            BadRequest(format!("the body is not JSON: {inner}"))
        } else if path == "." {
            BadRequest(format!("the body: {inner}"))
        } else {
            BadRequest(format!("{path}: {inner}"))
        }
    })?;
    validate(r, defaults, default_max, lim)
}

fn validate(
    r: ChatCompletionRequest,
    defaults: &DecodingArgs,
    default_max: usize,
    lim: &RequestLimits,
) -> Result<Validated, BadRequest> {
    if r.messages.is_empty() {
        return bad("messages: a non-empty array is required");
    }
    if r.messages.len() > lim.max_messages {
        return bad(format!("messages: {} messages, at most {}", r.messages.len(), lim.max_messages));
    }
    let mut messages = Vec::new();
    let (mut text_bytes, mut n_images) = (0usize, 0usize);
    for (i, m) in r.messages.into_iter().enumerate() {
        if let Some(m) = message(i, m, lim)? {
            let (t, k) = match &m {
                Message::User { text, images } => (text.len(), images.len()),
                Message::Assistant { text } => (text.len(), 0),
            };
            text_bytes += t;
            n_images += k;
            messages.push(m);
        }
    }
    if text_bytes > lim.max_text_bytes {
        return bad(format!("messages: {text_bytes} bytes of text, at most {}", lim.max_text_bytes));
    }
    if n_images > lim.max_images {
        return bad(format!("messages: {n_images} images, at most {}", lim.max_images));
    }
    if !matches!(messages.first(), Some(Message::User { .. })) {
        return bad("messages: the first (non-system) message must be from the user");
    }
    if !matches!(messages.last(), Some(Message::User { .. })) {
        return bad("messages: the last (non-system) message must be from the user");
    }

    let mut d = defaults.clone();
    let finite = |k: &str, v: Option<f64>| -> Result<Option<f64>, BadRequest> {
        match v {
            Some(x) if !x.is_finite() => bad(format!("{k}: a finite number is expected")),
            v => Ok(v),
        }
    };
    if let Some(t) = finite("temperature", r.temperature)? {
        // Below 1e-4 the f32 division of the logits overflows to infinities (NaN probabilities).
        if !(t == 0.0 || (1e-4..=100.0).contains(&t)) {
            return bad("temperature: 0 (no sampling) or between 0.0001 and 100");
        }
        d.temp = t;
        d.greedy = false;
    }
    if let Some(p) = finite("top_p", r.top_p)? {
        if !(p > 0.0 && p <= 1.0) {
            return bad("top_p: greater than 0 and at most 1");
        }
        d.top_p = p;
    }
    if let Some(k) = r.top_k {
        d.top_k = usize::try_from(k).map_err(|_| BadRequest("top_k: too large".into()))?;
    }
    if let Some(p) = finite("min_p", r.min_p)? {
        if !(0.0..=1.0).contains(&p) {
            return bad("min_p: between 0 and 1");
        }
        d.min_p = Some(p);
    }
    if let Some(p) = finite("typical_p", r.typical_p)? {
        if !(p > 0.0 && p <= 1.0) {
            return bad("typical_p: greater than 0 and at most 1");
        }
        d.typical = p;
    }
    if let Some(x) = finite("repetition_penalty", r.repetition_penalty)? {
        if x <= 0.0 {
            return bad("repetition_penalty: greater than 0");
        }
        d.repeat_penalty = x;
    }
    for (k, v, slot) in [
        ("presence_penalty", r.presence_penalty, &mut d.presence_penalty),
        ("frequency_penalty", r.frequency_penalty, &mut d.frequency_penalty),
    ] {
        if let Some(x) = finite(k, v)? {
            if !(-2.0..=2.0).contains(&x) {
                return bad(format!("{k}: between -2 and 2"));
            }
            *slot = x as f32;
        }
    }
    if let Some(b) = r.num_beams {
        if b == 0 || b > lim.max_beams as u64 {
            return bad(format!("num_beams: between 1 and {}", lim.max_beams));
        }
        d.num_beams = b as usize;
        d.greedy = false;
    }
    if let Some(l) = finite("length_penalty", r.length_penalty)? {
        d.length_penalty = l;
    }
    if let Some(s) = r.seed {
        d.seed = Some(s);
    }
    let stops: Vec<String> = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect();
    if stops.len() > MAX_STOPS {
        return bad(format!("stop: at most {MAX_STOPS} strings"));
    }
    if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return bad(format!("stop: each string at most {MAX_STOP_BYTES} bytes"));
    }
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        None => default_max.min(lim.n_ctx),
        Some(0) => return bad("max_tokens: at least 1"),
        Some(m) if m > lim.n_ctx as u64 => {
            return bad(format!("max_tokens: {m} is more than the context ({} tokens)", lim.n_ctx))
        }
        Some(m) => m as usize,
    };
    let min_tokens = match r.min_tokens {
        Some(m) if m > max_tokens as u64 => return bad("min_tokens: at most max_tokens"),
        Some(m) => m as usize,
        // The server's --min-tokens, within this request's length.
        None => d.min_tokens.min(max_tokens),
    };
    let stream = r.stream.unwrap_or(false);
    let beams = if d.greedy { 1 } else { d.num_beams };
    if beams > lim.max_beams {
        return bad(format!("num_beams: the server's default {beams} is more than the {} a slot holds", lim.max_beams));
    }
    let n = match r.n {
        None => 1,
        Some(n) if n == 0 || n > beams as u64 => {
            return bad(format!("n: between 1 and the number of beams ({beams}); more answers need num_beams >= n"))
        }
        Some(n) => n as usize,
    };
    if stream && n > 1 {
        return bad("n: only 1 when streaming");
    }
    let include_usage = r.stream_options.is_some_and(|o| o.include_usage);
    let user = r.user.filter(|u| !u.is_empty());
    Ok(Validated { messages, decoding: d, max_tokens, min_tokens, n, stream, include_usage, stops, user })
}

/// One message; `None` for a system message (Asagi's template has its own fixed preamble).
fn message(i: usize, m: MessageIn, lim: &RequestLimits) -> Result<Option<Message>, BadRequest> {
    let mut text = Vec::new();
    let mut images = Vec::new();
    match m.content {
        Some(Content::Text(s)) => text.push(s),
        Some(Content::Parts(parts)) => {
            for (j, p) in parts.into_iter().enumerate() {
                let at = format!("messages[{i}].content[{j}]");
                match p {
                    Part::Text { text: t } => text.push(t),
                    Part::ImageUrl { image_url: ImageUrl::Object { url } | ImageUrl::Url(url) } => {
                        let source = image_source(&url, &at, lim)?;
                        images.push(ImageIn { source, at });
                    }
                }
            }
        }
        None if m.role == "assistant" => {}
        None => return bad(format!("messages[{i}].content: missing")),
    }
    let text = text.join("\n");
    match m.role.as_str() {
        "system" | "developer" => Ok(None),
        "user" => Ok(Some(Message::User { text, images })),
        "assistant" if images.is_empty() => Ok(Some(Message::Assistant { text })),
        "assistant" => bad(format!("messages[{i}]: an assistant message cannot hold images")),
        other => {
            bad(format!("messages[{i}].role: {:?} is not user, assistant or system", other.escape_debug().to_string()))
        }
    }
}

/// A data URL (`data:image/png;base64,...`), an uploaded image's id (`img-...`) or, with `--allow-paths`, a local
/// path (`file://` optional).
pub fn image_source(url: &str, at: &str, lim: &RequestLimits) -> Result<ImageSource, BadRequest> {
    if let Some(hex) = url.strip_prefix("img-") {
        return match crate::cache::identity::from_hex(hex) {
            Some(h) => Ok(ImageSource::Id(h)),
            None => bad(format!("{at}: an image id is img- and 64 hex digits")),
        };
    }
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else { return bad(format!("{at}: a data URL needs a comma")) };
        if !meta.ends_with(";base64") {
            return bad(format!("{at}: only base64 data URLs are supported"));
        }
        let data = data.trim();
        // Checked before decoding: base64 takes 4 characters per 3 bytes.
        if data.len() / 4 * 3 > lim.max_image_bytes {
            return bad(format!("{at}: the image is over {} bytes", lim.max_image_bytes));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .or_else(|e| bad(format!("{at}: invalid base64 ({e})")))?;
        return Ok(ImageSource::Data(bytes));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return bad(format!("{at}: web URLs are not fetched; send the image as a data URL"));
    }
    if !lim.allow_paths {
        return bad(format!("{at}: local paths need the server's --allow-paths DIR"));
    }
    Ok(ImageSource::Path(url.to_string()))
}

// ---- Responses -------------------------------------------------------------------------------------------------

#[derive(Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

pub fn error_body(kind: &'static str, message: impl Into<String>) -> ErrorBody {
    ErrorBody { error: ErrorDetail { message: message.into(), kind } }
}

#[derive(Serialize)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Serialize)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

/// Where the time went (llama.cpp's server reports `timings` too).
#[derive(Serialize)]
pub struct Timings {
    pub queued_ms: f64,
    pub image_encode_ms: f64,
    pub images_encoded: usize,
    /// Images whose embeddings came from the image cache.
    pub image_cache_hits: usize,
    pub prompt_ms: f64,
    pub prompt_n: usize,
    pub predicted_ms: f64,
    pub predicted_n: usize,
}

pub fn usage_out(u: &Usage) -> UsageOut {
    UsageOut {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: PromptDetails { cached_tokens: u.cached_tokens },
    }
}

pub fn timings(u: &Usage) -> Timings {
    Timings {
        queued_ms: u.queued_ms,
        image_encode_ms: u.image_encode_ms,
        images_encoded: u.images_encoded,
        image_cache_hits: u.image_cache_hits,
        prompt_ms: u.prompt_ms,
        prompt_n: u.prefilled_tokens,
        predicted_ms: u.predicted_ms,
        predicted_n: u.completion_tokens,
    }
}

#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChoiceOut>,
    pub usage: UsageOut,
    pub timings: Timings,
}

#[derive(Serialize)]
pub struct ChoiceOut {
    pub index: usize,
    pub message: MessageOut,
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct MessageOut {
    pub role: &'static str,
    pub content: String,
}

pub fn completion<'a>(id: &'a str, created: u64, model: &'a str, f: &Finished) -> Completion<'a> {
    Completion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: f
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| ChoiceOut {
                index,
                message: MessageOut { role: "assistant", content: c.text.clone() },
                finish_reason: c.finish_reason,
            })
            .collect(),
        usage: usage_out(&f.usage),
        timings: timings(&f.usage),
    }
}

#[derive(Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

#[derive(Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lim() -> RequestLimits {
        RequestLimits {
            max_text_bytes: 1000,
            max_images: 2,
            max_image_bytes: 100,
            max_messages: 8,
            max_beams: 8,
            n_ctx: 512,
            allow_paths: false,
        }
    }

    fn parse_json(v: serde_json::Value) -> Result<Validated, BadRequest> {
        parse(v.to_string().as_bytes(), &crate::run_cmd::default_decoding(), 256, &lim())
    }

    /// Unset fields keep the server's (the model card's) decoding; set ones override it.
    #[test]
    fn fields_map_onto_decoding() {
        let r = parse_json(json!({"messages": [{"role": "user", "content": "q"}], "model": "x", "logprobs": false}))
            .unwrap();
        assert_eq!((r.decoding.num_beams, r.decoding.temp, r.max_tokens, r.n, r.stream), (5, 0.7, 256, 1, false));
        let r = parse_json(json!({
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "temperature": 0, "num_beams": 3, "n": 2, "max_tokens": 9, "seed": 4, "top_k": 0, "repetition_penalty": 1.2,
            "stop": ["", "###"], "user": "u1"
        }))
        .unwrap();
        let cfg = r.decoding.config(r.max_tokens, &[2]);
        assert!(!cfg.do_sample && cfg.num_beams == 3 && cfg.seed == Some(4) && cfg.top_k == Some(0));
        assert_eq!((r.n, r.max_tokens, cfg.repetition_penalty), (2, 9, 1.2));
        assert_eq!((r.stops, r.user.as_deref()), (vec!["###".to_string()], Some("u1")));
        assert!(matches!(&r.messages[..], [Message::User { text, images }] if text == "a\nb" && images.is_empty()));
    }

    #[test]
    fn bad_fields_are_named() {
        let user = json!([{"role": "user", "content": "q"}]);
        for (extra, field) in [
            (json!({"n": 2, "num_beams": 1}), "n:"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": u64::MAX}), "max_tokens"),
            (json!({"max_tokens": 513}), "max_tokens"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"stream": true, "n": 2, "num_beams": 2}), "n:"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"temperature": -1}), "temperature"),
            (json!({"temperature": 1e-50}), "temperature"),
            (json!({"num_beams": 9}), "num_beams"),
            (json!({"num_beams": 0}), "num_beams"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": 3}), "stop"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"min_tokens": 300, "max_tokens": 10}), "min_tokens"),
        ] {
            let mut v = extra.clone();
            v["messages"] = user.clone();
            let e = parse_json(v).err().unwrap_or_else(|| panic!("{extra} accepted"));
            assert!(e.0.starts_with(field), "{extra}: {e}");
        }
        let e = parse(b"{", &crate::run_cmd::default_decoding(), 1, &lim()).err().unwrap();
        assert!(e.0.contains("not JSON"), "{e}");
        for (body, want) in [
            (json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}), "last"),
            (json!({"messages": []}), "non-empty"),
            (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
            (json!({"messages": [{"role": "robot", "content": "q"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "user", "content": "x".repeat(1001)}]}), "bytes of text"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}),
                "--allow-paths",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(400))}}]}]}),
                "over 100 bytes",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}),
                "base64",
            ),
            (json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), "messages[0].content"),
        ] {
            let e = parse_json(body.clone()).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert!(e.0.contains(want), "{body}: {e}");
        }
    }
}
