//! The caches through the commands users run, in new processes each time: `run --image-cache` (a second question
//! about an image restores its prompt prefix), `encode` (fills the cache ahead of time), `run --session` (the
//! same prompt again computes nothing), `chat --session` (a conversation goes on in another process), and
//! `serve`'s `POST /v1/images` (an image uploaded once, then given by its id). Answers equal those computed
//! without any cache.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use common::fixtures;
use common::server::{client, run_json, Server};
use serde_json::{json, Value};

const IMAGE: &str = "images/rgb_80x60.png";
const Q1: &str = "この画像を説明してください。";
const Q2: &str = "何色ですか？";

fn image() -> PathBuf {
    fixtures::root().join(IMAGE)
}

fn run(llm: &Path, mm: &Path, question: &str, extra: &[&str]) -> Value {
    let img = image();
    let mut args = vec!["--greedy", "-n", "8", "-c", "512", "-p", question, "--image", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_json(llm, mm, &args)
}

#[test]
fn run_and_encode_reuse_images_and_prefixes_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mm) = common::conversion::base_f32(dir.path());
    let cache = dir.path().join("cache");
    let c = cache.to_str().unwrap();
    let plain2 = run(&llm, &mm, Q2, &[]);

    let cold = run(&llm, &mm, Q1, &["--image-cache", c]);
    assert_eq!(cold["cache"]["images_encoded"], 1, "{cold}");
    assert_eq!(cold["cache"]["prefix_saved"], true, "{cold}");
    let warm = run(&llm, &mm, Q2, &["--image-cache", c]);
    assert_eq!(warm["cache"]["restored_from"], "prefix cache", "{warm}");
    assert_eq!(warm["cache"]["images_encoded"], 0, "{warm}");
    assert_eq!(warm["tokens"], plain2["tokens"], "the same answer as without the cache");
    assert_eq!(warm["prompt_tokens"], plain2["prompt_tokens"]);

    // `encode` ahead of time into a new folder, then the first question is already warm.
    let cache2 = dir.path().join("cache2");
    let out = common::asagi_gguf()
        .args(["encode", "--json", "-t", "2", "-c", "512", "--mmproj"])
        .arg(&mm)
        .arg("-m")
        .arg(&llm)
        .arg("--image-cache")
        .arg(&cache2)
        .arg(image())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&e["cache"]["images_encoded"], &e["cache"]["prefix_saved"]), (&json!(1), &json!(true)), "{e}");
    assert!(e["id"].as_str().unwrap().len() == 64, "{e}");
    let first = run(&llm, &mm, Q2, &["--image-cache", cache2.to_str().unwrap()]);
    assert_eq!(first["cache"]["restored_from"], "prefix cache", "{first}");
    assert_eq!(first["tokens"], plain2["tokens"]);

    // Without `encode`'s folder: refused with the reason.
    let out = common::asagi_gguf().args(["encode", "--mmproj"]).arg(&mm).arg("-m").arg(&llm).arg(image()).output();
    let out = out.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image-cache"));
}

#[test]
fn a_session_file_spares_the_same_prompt_and_refuses_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mm) = common::conversion::base_f32(dir.path());
    let session = dir.path().join("q1.session");
    let s = session.to_str().unwrap();
    let plain = run(&llm, &mm, Q1, &[]);
    let first = run(&llm, &mm, Q1, &["--session", s]);
    assert_eq!(first["tokens"], plain["tokens"]);
    assert!(session.exists());
    let again = run(&llm, &mm, Q1, &["--session", s]);
    assert_eq!(again["cache"]["restored_from"], "session", "{again}");
    assert_eq!((&again["cache"]["prefill_positions"], &again["cache"]["images"]), (&json!(0), &json!(0)), "{again}");
    assert_eq!(again["tokens"], plain["tokens"]);

    // The same file with a KV cache of another type: a warning, and the prompt computed.
    let img = image();
    let out = common::asagi_gguf()
        .args(["run", "--json", "-t", "2", "--greedy", "-n", "8", "-c", "512", "--cache-type", "f32", "--mmproj"])
        .arg(&mm)
        .arg("-m")
        .arg(&llm)
        .args(["-p", Q1, "--image", img.to_str().unwrap(), "--session", s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cache type"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cache"]["restored_from"], Value::Null);

    // A session in a folder that does not exist: refused before anything is computed.
    let missing = dir.path().join("no/such/folder/s.session");
    let out = common::asagi_gguf()
        .args(["run", "-t", "2", "--greedy", "-n", "1", "-m"])
        .arg(&llm)
        .args(["-p", Q1, "--session"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--session") && stderr.contains("does not exist"), "{stderr}");
}

/// `chat --json --session FILE` with `lines` on stdin: one JSON object per answer.
fn chat(llm: &Path, mm: &Path, session: &Path, lines: &str) -> Vec<Value> {
    chat_with(llm, mm, &[std::ffi::OsStr::new("--session"), session.as_os_str()], lines)
}

/// `chat --json ARGS` with `lines` on stdin.
fn chat_with(llm: &Path, mm: &Path, args: &[&std::ffi::OsStr], lines: &str) -> Vec<Value> {
    let mut child = common::asagi_gguf()
        .args(["chat", "--json", "-t", "2", "--greedy", "-n", "6", "-c", "1024", "--mmproj"])
        .arg(mm)
        .arg("-m")
        .arg(llm)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_chat_goes_on_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mm) = common::conversion::base_f32(dir.path());
    let img = image();
    let both = format!("/image {}\n{Q1}\n{Q2}\n", img.display());
    let one_process = chat(&llm, &mm, &dir.path().join("a.session"), &both);
    assert_eq!(one_process.len(), 2);
    let s = dir.path().join("b.session");
    let first = chat(&llm, &mm, &s, &format!("/image {}\n{Q1}\n", img.display()));
    let second = chat(&llm, &mm, &s, &format!("{Q2}\n"));
    assert_eq!(first[0]["tokens"], one_process[0]["tokens"]);
    assert_eq!(second[0]["n_past"], one_process[1]["n_past"], "the first turn's cells were restored");
    assert_eq!(second[0]["prompt_tokens"], one_process[1]["prompt_tokens"]);
    assert_eq!(second[0]["tokens"], one_process[1]["tokens"], "the same follow-up answer");
}

#[test]
fn serve_takes_an_uploaded_image_by_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mm) = common::conversion::base_f32(dir.path());
    let server = Server::start(&llm, &mm, &["--greedy", "-n", "6", "-c", "1024"]);
    let png = base64::engine::general_purpose::STANDARD.encode(std::fs::read(image()).unwrap());
    let data_url = format!("data:image/png;base64,{png}");
    let upload = |body: &Value| {
        let r = client(Duration::from_secs(120)).post(server.url("/v1/images")).json(body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, up) = upload(&json!({"url": data_url}));
    assert_eq!(status, 200, "{up}");
    assert_eq!((&up["cached"], &up["object"]), (&json!(false), &json!("image")), "{up}");
    let id = up["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("img-") && id.len() == 68, "{id}");
    let (_, again) = upload(&json!({"url": data_url}));
    assert_eq!((&again["id"], &again["cached"]), (&json!(id), &json!(true)), "the same image: the same id, cached");

    let ask = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q1}]}]})
    };
    let (status, by_id) = server.post(&ask(&id));
    assert_eq!(status, 200, "{by_id}");
    assert_eq!((&by_id["timings"]["images_encoded"], &by_id["timings"]["image_cache_hits"]), (&json!(0), &json!(1)));
    let img = image();
    let run = run_json(&llm, &mm, &["--greedy", "-n", "6", "-c", "1024", "-p", Q1, "--image", img.to_str().unwrap()]);
    assert_eq!(by_id["choices"][0]["message"]["content"], run["text"], "the id stands for the image");

    // Unknown and malformed ids, a malformed body: 400 with the reason.
    let unknown = format!("img-{}", "0".repeat(64));
    let (status, v) = server.post(&ask(&unknown));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&unknown), "{v}");
    let (status, v) = server.post(&ask("img-xyz"));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("64 hex digits"), "{v}");
    let (status, v) = upload(&json!({"image": data_url}));
    assert_eq!(status, 400, "{v}");
    let (status, v) = upload(&json!({"url": "data:image/png;base64,AAAA"}));
    assert_eq!(status, 400, "{v}");
}

#[test]
fn chat_starts_from_a_cached_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mm) = common::conversion::base_f32(dir.path());
    let img = image();
    let cache = dir.path().join("cache");
    let with_cache = [std::ffi::OsStr::new("--image-cache"), cache.as_os_str()];
    let plain = chat_with(&llm, &mm, &[], &format!("/image {}\n{Q2}\n", img.display()));
    let first = chat_with(&llm, &mm, &with_cache, &format!("/image {}\n{Q1}\n", img.display()));
    assert_eq!(first[0]["cache"]["prefix_saved"], true, "{}", first[0]);
    let second = chat_with(&llm, &mm, &with_cache, &format!("/image {}\n{Q2}\n", img.display()));
    let c = &second[0]["cache"];
    assert_eq!((&c["restored_from"], &c["images_encoded"]), (&json!("prefix cache"), &json!(0)), "{c}");
    assert!(c["prefill_positions"].as_u64().unwrap() < 20, "only the question computed: {c}");
    assert_eq!(second[0]["prompt_tokens"], plain[0]["prompt_tokens"]);
    assert_eq!(second[0]["tokens"], plain[0]["tokens"], "the answer of a chat without the cache");
}
