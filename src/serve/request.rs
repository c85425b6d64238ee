//! An OpenAI-style chat completion request: the messages (text and images), and the decoding fields mapped onto
//! `DecodingArgs`. Every problem is a `BadRequest` naming the field.

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::Value;

use crate::run_cmd::DecodingArgs;

/// A client error (HTTP 400), with a message naming the field.
#[derive(Debug)]
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

/// An image as the client gave it: the encoded bytes and a name for error messages.
pub struct Image {
    pub bytes: Vec<u8>,
    pub name: String,
}

pub enum Message {
    User { text: String, images: Vec<Image> },
    Assistant { text: String },
}

pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub decoding: DecodingArgs,
    pub max_tokens: usize,
    pub n: usize,
    pub stream: bool,
}

/// Reads `body` (JSON). `defaults` are the server's decoding flags (the model card's unless overridden);
/// `allow_paths` lets `image_url` name a local file.
pub fn parse(
    body: &[u8],
    defaults: &DecodingArgs,
    default_max: usize,
    allow_paths: bool,
) -> Result<ChatRequest, BadRequest> {
    let v: Value = serde_json::from_slice(body).or_else(|e| bad(format!("the body is not JSON: {e}")))?;
    let Some(obj) = v.as_object() else { return bad("the body must be a JSON object") };
    let messages = match obj.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => {
            m.iter().enumerate().map(|(i, m)| message(i, m, allow_paths)).collect::<Result<Vec<_>, _>>()?
        }
        _ => return bad("messages: a non-empty array is required"),
    };
    let messages: Vec<Message> = messages.into_iter().flatten().collect();
    if !matches!(messages.last(), Some(Message::User { .. })) {
        return bad("messages: the last (non-system) message must be from the user");
    }
    if !matches!(messages.first(), Some(Message::User { .. })) {
        return bad("messages: the first (non-system) message must be from the user");
    }

    let mut d = defaults.clone();
    let num = |k: &str| obj.get(k).filter(|x| !x.is_null());
    let f64_of = |k: &str| -> Result<Option<f64>, BadRequest> {
        match num(k) {
            None => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| BadRequest(format!("{k}: a number is expected"))),
        }
    };
    let usize_of = |k: &str| -> Result<Option<usize>, BadRequest> {
        match num(k) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| BadRequest(format!("{k}: a non-negative integer is expected"))),
        }
    };
    if let Some(t) = f64_of("temperature")? {
        if !(0.0..=100.0).contains(&t) {
            return bad("temperature: between 0 and 100");
        }
        d.temp = t;
        d.greedy = false;
    }
    if let Some(p) = f64_of("top_p")? {
        d.top_p = p;
    }
    if let Some(k) = usize_of("top_k")? {
        d.top_k = k;
    }
    if let Some(p) = f64_of("min_p")? {
        d.min_p = Some(p);
    }
    if let Some(p) = f64_of("typical_p")? {
        d.typical = p;
    }
    if let Some(r) = f64_of("repetition_penalty")? {
        d.repeat_penalty = r;
    }
    if let Some(p) = f64_of("presence_penalty")? {
        d.presence_penalty = p as f32;
    }
    if let Some(p) = f64_of("frequency_penalty")? {
        d.frequency_penalty = p as f32;
    }
    if let Some(b) = usize_of("num_beams")? {
        if b == 0 {
            return bad("num_beams: at least 1");
        }
        d.num_beams = b;
        d.greedy = false;
    }
    if let Some(l) = f64_of("length_penalty")? {
        d.length_penalty = l;
    }
    if let Some(s) = usize_of("seed")? {
        d.seed = Some(s as u64);
    }
    if let Some(stop) = num("stop") {
        let empty = stop.as_array().is_some_and(|a| a.is_empty()) || stop.as_str() == Some("");
        if !empty {
            return bad("stop: stop sequences are not supported (the model stops at its end tokens)");
        }
    }
    let max_tokens = usize_of("max_completion_tokens")?.or(usize_of("max_tokens")?).unwrap_or(default_max);
    if max_tokens == 0 {
        return bad("max_tokens: at least 1");
    }
    let n = usize_of("n")?.unwrap_or(1);
    let stream = match num("stream") {
        None => false,
        Some(s) => s.as_bool().ok_or_else(|| BadRequest("stream: true or false".into()))?,
    };
    let beams = if d.greedy { 1 } else { d.num_beams };
    if n == 0 || n > beams {
        return bad(format!("n: between 1 and the number of beams ({beams}); more answers need num_beams >= n"));
    }
    if stream && n > 1 {
        return bad("n: only 1 when streaming");
    }
    Ok(ChatRequest { messages, decoding: d, max_tokens, n, stream })
}

/// One message; `None` for a system message (Asagi's template has its own fixed preamble).
fn message(i: usize, m: &Value, allow_paths: bool) -> Result<Option<Message>, BadRequest> {
    let role =
        m.get("role").and_then(Value::as_str).ok_or_else(|| BadRequest(format!("messages[{i}].role: missing")))?;
    let content = m.get("content").unwrap_or(&Value::Null);
    let mut text = Vec::new();
    let mut images = Vec::new();
    match content {
        Value::String(s) => text.push(s.clone()),
        Value::Array(parts) => {
            for (j, p) in parts.iter().enumerate() {
                let at = format!("messages[{i}].content[{j}]");
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => text.push(
                        p.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| BadRequest(format!("{at}.text: missing")))?
                            .to_string(),
                    ),
                    Some("image_url") => {
                        let url = p
                            .get("image_url")
                            .and_then(|u| u.as_str().or_else(|| u.get("url").and_then(Value::as_str)));
                        let url = url.ok_or_else(|| BadRequest(format!("{at}.image_url.url: missing")))?;
                        images.push(image(url, &at, allow_paths)?);
                    }
                    other => return bad(format!("{at}.type: {other:?} is not \"text\" or \"image_url\"")),
                }
            }
        }
        Value::Null if role == "assistant" => {}
        _ => return bad(format!("messages[{i}].content: a string or an array of parts")),
    }
    let text = text.join("\n");
    match role {
        "system" | "developer" => Ok(None),
        "user" => Ok(Some(Message::User { text, images })),
        "assistant" if images.is_empty() => Ok(Some(Message::Assistant { text })),
        "assistant" => bad(format!("messages[{i}]: an assistant message cannot hold images")),
        other => bad(format!("messages[{i}].role: {other:?} is not user, assistant or system")),
    }
}

/// A data URL (`data:image/png;base64,...`) or, if allowed, a local path (`file://` optional).
fn image(url: &str, at: &str, allow_paths: bool) -> Result<Image, BadRequest> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else { return bad(format!("{at}: a data URL needs a comma")) };
        if !meta.ends_with(";base64") {
            return bad(format!("{at}: only base64 data URLs are supported"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .or_else(|e| bad(format!("{at}: invalid base64 ({e})")))?;
        return Ok(Image { bytes, name: format!("{at} (data URL)") });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return bad(format!("{at}: web URLs are not fetched; send the image as a data URL"));
    }
    if !allow_paths {
        return bad(format!("{at}: local paths need the server's --allow-paths"));
    }
    let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    let bytes = std::fs::read(&path).or_else(|e| bad(format!("{at}: {}: {e}", path.display())))?;
    Ok(Image { bytes, name: path.display().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> DecodingArgs {
        crate::run_cmd::default_decoding()
    }

    fn parse_json(v: serde_json::Value) -> Result<ChatRequest, BadRequest> {
        parse(v.to_string().as_bytes(), &defaults(), 256, false)
    }

    /// Unset fields keep the server's (the model card's) decoding; set ones override it.
    #[test]
    fn fields_map_onto_decoding() {
        let r = parse_json(serde_json::json!({"messages": [{"role": "user", "content": "q"}]})).unwrap();
        assert_eq!((r.decoding.num_beams, r.decoding.temp, r.max_tokens, r.n, r.stream), (5, 0.7, 256, 1, false));
        let r = parse_json(serde_json::json!({
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "temperature": 0, "num_beams": 3, "n": 2, "max_tokens": 9, "seed": 4, "top_k": 0, "repetition_penalty": 1.2,
            "stop": []
        }))
        .unwrap();
        let cfg = r.decoding.config(r.max_tokens, &[2]);
        assert!(!cfg.do_sample && cfg.num_beams == 3 && cfg.seed == Some(4) && cfg.top_k == Some(0));
        assert_eq!((r.n, r.max_tokens, cfg.repetition_penalty), (2, 9, 1.2));
        assert!(matches!(&r.messages[..], [Message::User { text, images }] if text == "a\nb" && images.is_empty()));
    }

    #[test]
    fn bad_fields_are_named() {
        let user = serde_json::json!([{"role": "user", "content": "q"}]);
        for (extra, field) in [
            (serde_json::json!({"n": 2, "num_beams": 1}), "n:"),
            (serde_json::json!({"n": 1, "stream": true, "num_beams": 5, "max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"stop": ["\n"]}), "stop"),
            (serde_json::json!({"stream": "yes"}), "stream"),
        ] {
            let mut v = extra.clone();
            v["messages"] = user.clone();
            let e = parse_json(v).err().unwrap_or_else(|| panic!("{extra} accepted"));
            assert!(e.0.starts_with(field), "{extra}: {e}");
        }
        let e = parse(b"{", &defaults(), 1, false).err().unwrap();
        assert!(e.0.contains("not JSON"), "{e}");
        let e = parse_json(
            serde_json::json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        );
        assert!(e.err().unwrap().0.contains("last"));
    }
}
