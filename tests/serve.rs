//! `serve` end to end over HTTP: the OpenAI-style answer equals `run`'s for the same image and question, a
//! follow-up reuses the cached image and prefix and answers as a recomputed one does, streaming sends the same
//! text, and bad requests get a 400 that names the field.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use asagi_convert::{LlmType, MmprojType};
use base64::Engine as _;
use common::fixtures;
use serde_json::{json, Value};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asagi-gguf"))
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.0 exchange (the server closes the connection after the body): (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn post(port: u16, v: &Value) -> (u16, Value) {
    let (status, body) = http(port, "POST", "/v1/chat/completions", &v.to_string());
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

fn start(llm: &std::path::Path, mmproj: &std::path::Path) -> Server {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = bin()
        .args(["serve", "--greedy", "-n", "6", "-t", "2", "-c", "1024", "--port", &port.to_string(), "--mmproj"])
        .arg(mmproj)
        .arg("-m")
        .arg(llm)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child, port);
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("serve did not start listening on {port}");
}

#[test]
fn chat_completions_match_run_reuse_the_cache_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::convert(
        &fixtures::model_dir("base-default-f32"),
        dir.path(),
        LlmType::F32,
        MmprojType::F32,
    )
    .unwrap();
    let image_path = fixtures::root().join("images/rgb_80x60.png");
    let png = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&image_path).unwrap());
    let image = json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}});
    let question = "この画像は何ですか";

    // The same image and question through `run`.
    let run = bin()
        .args(["run", "--json", "--greedy", "-n", "6", "-t", "2", "-c", "1024", "-p", question, "--image"])
        .arg(&image_path)
        .arg("--mmproj")
        .arg(&mmproj)
        .arg("-m")
        .arg(&llm)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run: Value = serde_json::from_slice(&run.stdout).unwrap();

    let server = start(&llm, &mmproj);
    let port = server.1;
    assert_eq!(http(port, "GET", "/health", "").0, 200);
    assert_eq!(http(port, "OPTIONS", "/v1/chat/completions", "").0, 204, "CORS preflight");
    let (status, models) = http(port, "GET", "/v1/models", "");
    assert!(status == 200 && models.contains("\"object\":\"list\""), "{models}");

    let first = json!({"messages": [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [image, {"type": "text", "text": question}]}]});
    let (status, a1) = post(port, &first);
    assert_eq!(status, 200, "{a1}");
    let text1 = a1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(text1, run["text"].as_str().unwrap(), "serve and run answer alike");
    assert_eq!(a1["usage"]["completion_tokens"], json!(run["tokens"].as_array().unwrap().len()));
    assert_eq!(a1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt1 = a1["usage"]["prompt_tokens"].as_u64().unwrap();

    // A follow-up: the first question and its image come from the cache.
    let follow = json!({"messages": [
        {"role": "user", "content": [image, {"type": "text", "text": question}]},
        {"role": "assistant", "content": text1},
        {"role": "user", "content": "色は"}]});
    let (status, a2) = post(port, &follow);
    assert_eq!(status, 200, "{a2}");
    let cached = a2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= prompt1, "the image turn is reused: {cached} cached of {prompt1}");
    let text2 = a2["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    // Something else in between empties the cache of the image; the follow-up recomputed answers alike.
    let (status, other) = post(port, &json!({"messages": [{"role": "user", "content": "こんにちは"}]}));
    assert_eq!(status, 200, "{other}");
    let mut stream_req = follow.clone();
    stream_req["stream"] = json!(true);
    let (status, sse) = http(port, "POST", "/v1/chat/completions", &stream_req.to_string());
    assert_eq!(status, 200);
    let events: Vec<&str> = sse.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text2, "recomputed and streamed = reused");
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // Bad requests: 400 with the field named.
    for (bad, field) in [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}),
            "base64",
        ),
        (json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), "temperature"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}),
            "--allow-paths",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
            "not a supported image",
        ),
    ] {
        let (status, body) = post(port, &bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(field), "{bad}: {body}");
    }
    // The server still answers after the errors.
    let (status, again) = post(port, &first);
    assert_eq!((status, again["choices"][0]["message"]["content"].as_str().unwrap()), (200, text1.as_str()));
}
