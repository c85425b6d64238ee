//! `serve` end to end over real TCP with an HTTP/1.1 client: answers equal `run`'s; a follow-up reuses the cached
//! image and prefix; events stream while the answer is generated; parallel clients get exactly the answers they
//! get alone while being decoded together; a client that leaves is cancelled; a full queue answers 503.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use base64::Engine as _;
use common::fixtures;
use common::server::{client, run_json, Server, SseReader};
use serde_json::{json, Value};

struct Model {
    llm: PathBuf,
    mmproj: PathBuf,
    _dir: tempfile::TempDir,
}

fn model() -> Model {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::base_f32(dir.path());
    Model { llm, mmproj, _dir: dir }
}

fn image_part(name: &str) -> Value {
    let png = base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixtures::root().join(name)).unwrap());
    json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}})
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[test]
fn answers_match_run_reuse_the_cache_and_stream() {
    let m = model();
    let image_path = fixtures::root().join("images/rgb_80x60.png");
    let image = image_part("images/rgb_80x60.png");
    let question = "この画像は何ですか";

    // The same image and question through `run`.
    let image_arg = image_path.to_str().unwrap();
    let run = run_json(&m.llm, &m.mmproj, &["--greedy", "-n", "6", "-c", "1024", "-p", question, "--image", image_arg]);

    let mut server = Server::start(&m.llm, &m.mmproj, &["--greedy", "-n", "6", "-c", "1024", "--parallel", "2"]);
    server.assert_healthy("start");
    let models: Value = client(Duration::from_secs(5)).get(server.url("/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(models["object"], "list");

    let first = json!({"user": "alice", "messages": [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [image, {"type": "text", "text": question}]}]});
    let (status, a1) = server.post(&first);
    assert_eq!(status, 200, "{a1}");
    let text1 = a1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(text1, run["text"].as_str().unwrap(), "serve and run answer alike");
    assert_eq!(a1["usage"]["completion_tokens"], json!(run["tokens"].as_array().unwrap().len()));
    assert_eq!(a1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(a1["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let prompt1 = a1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(a1["timings"]["images_encoded"], 1);

    // A follow-up: the first question and its image come from the cache.
    let follow = json!({"user": "alice", "messages": [
        {"role": "user", "content": [image, {"type": "text", "text": question}]},
        {"role": "assistant", "content": text1},
        user("色は")]});
    let (status, a2) = server.post(&follow);
    assert_eq!(status, 200, "{a2}");
    assert_ne!(a1["id"], a2["id"], "ids are unique");
    let cached = a2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= prompt1, "the image turn is reused: {cached} cached of {prompt1}");
    assert_eq!(a2["timings"]["images_encoded"], 0, "the image is not encoded again");
    let text2 = a2["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    // Another user asks about the same image: the preamble and image are shared, but not told.
    let bob =
        json!({"user": "bob", "messages": [{"role": "user", "content": [image, {"type": "text", "text": "何色"}]}]});
    let reused_before = server.stats()["prompt_positions_reused"].as_u64().unwrap();
    let (status, b) = server.post(&bob);
    assert_eq!(status, 200, "{b}");
    // Reported as computed: the counts must not tell bob what alice asked.
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{b}");
    assert_eq!(
        (b["timings"]["images_encoded"].as_u64(), b["timings"]["prompt_n"].as_u64()),
        (Some(1), b["usage"]["prompt_tokens"].as_u64())
    );
    let reused = server.stats()["prompt_positions_reused"].as_u64().unwrap() - reused_before;
    // (71 positions: 58 shared = preamble + 15 image positions; without the image 43.)
    assert!(reused >= prompt1 - 20, "the image came from alice's cells all the same: {reused} positions");

    // Text-only requests in between; the follow-up, streamed, answers alike.
    assert_eq!(server.post(&json!({"messages": [user("こんにちは")]})).0, 200);
    assert_eq!(server.post(&json!({"messages": [user("おはよう")]})).0, 200);
    let mut stream_req = follow.clone();
    stream_req["stream"] = json!(true);
    stream_req["stream_options"] = json!({"include_usage": true});
    let mut sse = SseReader::open(&server, &stream_req);
    let (role, _) = sse.next().unwrap();
    assert_eq!(serde_json::from_str::<Value>(&role).unwrap()["choices"][0]["delta"]["role"], "assistant");
    let (streamed, reason, _) = sse.rest();
    assert_eq!(streamed, text2, "streamed = reused");
    assert!(reason == "stop" || reason == "length", "{reason}");

    // A stop string: the answer ends where it starts, and it is never sent.
    if text1.chars().count() >= 3 {
        let cut: String = text1.chars().skip(1).take(2).collect();
        let mut req = first.clone();
        req["stop"] = json!([cut]);
        let (status, v) = server.post(&req);
        assert_eq!(status, 200, "{v}");
        let want = &text1[..text1.find(&cut).unwrap()];
        assert_eq!(
            (
                v["choices"][0]["message"]["content"].as_str().unwrap(),
                v["choices"][0]["finish_reason"].as_str().unwrap()
            ),
            (want, "stop")
        );
        req["stream"] = json!(true);
        let (streamed, reason, _) = SseReader::open(&server, &req).rest();
        assert_eq!((streamed.as_str(), reason.as_str()), (want, "stop"));
    }

    // Bad requests: 400 with the field named.
    for (bad, field) in [
        (json!({"messages": []}), "messages"),
        (json!({"messages": [user("x")], "temperature": "hot"}), "temperature"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
            "not a supported image",
        ),
        (json!({"messages": [user("<image>何ですか")]}), "<image>"),
    ] {
        let (status, body) = server.post(&bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(field), "{bad}: {body}");
    }
    // The server still answers after the errors.
    assert_eq!(server.answer(&first), text1);
    server.assert_healthy("the requests");
}

/// Events are flushed as they are produced: the first text arrives while the answer is still being generated.
#[test]
fn events_arrive_while_the_answer_is_generated() {
    let m = model();
    let mut server = Server::start(&m.llm, &m.mmproj, &["--greedy", "-c", "2048"]);
    let req = json!({"messages": [user("長い話をしてください")], "max_tokens": 500, "min_tokens": 500, "stream": true});
    let mut sse = SseReader::open(&server, &req);
    sse.next().unwrap(); // the role chunk
    let (first, t_first) = sse.next().unwrap();
    assert!(serde_json::from_str::<Value>(&first).unwrap()["choices"][0]["delta"]["content"].is_string());
    // The generation is still running when the first text is here.
    let busy = server.stats()["slots_busy"].as_u64().unwrap();
    let (_, reason, n) = sse.rest();
    let t_end = sse.start.elapsed();
    eprintln!("{n} content events; the first at {t_first:?}, the end at {t_end:?}");
    assert_eq!(busy, 1, "the first event came after the generation ended (first at {t_first:?}, end at {t_end:?})");
    assert_eq!(reason, "length");
    assert!(n > 100, "{n} content events: the text was not streamed piece by piece");
    assert!(t_first * 4 < t_end, "first event at {t_first:?} of {t_end:?}");
    server.assert_healthy("a long stream");
}

/// Four clients at once get exactly the answers each gets alone (greedy and beams), and the engine decoded their
/// tokens in shared batches.
#[test]
fn parallel_clients_get_their_own_answers_batched_together() {
    let m = model();
    let mut server = Server::start(&m.llm, &m.mmproj, &["--greedy", "-c", "2048", "--parallel", "4"]);
    let image = image_part("images/rgb_80x60.png");
    let requests: Vec<Value> = vec![
        json!({"messages": [user("日本の首都はどこですか")], "max_tokens": 40, "min_tokens": 40}),
        json!({"messages": [user("猫について教えて")], "max_tokens": 40, "min_tokens": 30, "temperature": 0, "num_beams": 3}),
        json!({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "この画像は何ですか"}]}], "max_tokens": 40, "min_tokens": 40}),
        json!({"messages": [user("富士山")], "max_tokens": 40, "min_tokens": 20, "temperature": 0, "num_beams": 2, "n": 2}),
    ];
    let alone: Vec<Value> = requests.iter().map(|r| all_choices(&server.post(r).1)).collect();
    let before = server.stats();

    let barrier = Arc::new(Barrier::new(requests.len()));
    let url = server.url("/v1/chat/completions");
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let (barrier, url) = (barrier.clone(), url.clone());
                s.spawn(move || {
                    barrier.wait();
                    let v: Value = client(Duration::from_secs(300)).post(url).json(r).send().unwrap().json().unwrap();
                    all_choices(&v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i}: the answer depends on its batch neighbours");
    }
    let after = server.stats();
    let shared = after["shared_steps"].as_u64().unwrap() - before["shared_steps"].as_u64().unwrap();
    assert!(shared > 10, "only {shared} steps decoded more than one request: {after}");
    assert!(after["max_requests_per_step"].as_u64().unwrap() >= 3, "{after}");
    server.assert_healthy("parallel requests");
}

fn all_choices(v: &Value) -> Value {
    let choices = v["choices"].as_array().unwrap_or_else(|| panic!("{v}"));
    json!(choices.iter().map(|c| json!([c["message"]["content"], c["finish_reason"]])).collect::<Vec<_>>())
}

/// A client that goes away (streaming or not) frees its slot at once; a full queue answers 503.
#[test]
fn a_client_that_leaves_is_cancelled_and_a_full_queue_answers_503() {
    let m = model();
    let mut server =
        Server::start(&m.llm, &m.mmproj, &["--greedy", "-c", "8192", "--parallel", "1", "--queue", "1", "--no-webui"]);
    // Long enough to be running still when each client leaves, on an idle machine too (the tiny model writes over
    // 500 tokens a second); every one is cancelled, so its length costs nothing.
    let long = json!({"messages": [user("長い話")], "max_tokens": 8000, "min_tokens": 8000});
    // The API only: no chat page.
    assert_eq!(client(Duration::from_secs(5)).get(server.url("/")).send().unwrap().status(), 404);

    // Streaming: read one event, hang up.
    let mut req = long.clone();
    req["stream"] = json!(true);
    let mut sse = SseReader::open(&server, &req);
    sse.next().unwrap();
    sse.next().unwrap();
    drop(sse);
    server.wait_stats(2, "the stream's slot freed", |s| s["cancelled"] == 1 && s["slots_busy"] == 0);

    // Not streaming: the client leaves while its answer is generated (a raw connection, closed once the request
    // holds the slot: a client timeout could fire before the request reached the engine on a loaded machine).
    let body = serde_json::to_vec(&long).unwrap();
    let mut conn = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(&body).unwrap();
    server.wait_stats(30, "the request running", |s| s["slots_busy"] == 1 && s["queued"] == 0);
    drop(conn);
    server.wait_stats(2, "the request's slot freed", |s| s["cancelled"] == 2 && s["slots_busy"] == 0);
    assert_eq!(server.stats()["completed"], 0, "the long answers were cancelled, not finished");

    // One slot, one place in the queue: the third request is told to come back.
    let mut busy = long.clone();
    busy["stream"] = json!(true);
    let mut running = SseReader::open(&server, &busy);
    running.next().unwrap();
    // The role chunk comes before the request is admitted: wait until it holds the slot, or it would itself be the
    // queued request and the next one would take the queue's place (the request meant to be turned away would then
    // wait behind the long answer).
    server.wait_stats(30, "the slot taken", |s| s["slots_busy"] == 1 && s["queued"] == 0);
    let url = server.url("/v1/chat/completions");
    let short = json!({"messages": [user("こんにちは")], "max_tokens": 3});
    let queued = std::thread::spawn({
        let (url, short) = (url.clone(), short.clone());
        move || client(Duration::from_secs(300)).post(url).json(&short).send().unwrap().status().as_u16()
    });
    server.wait_stats(30, "one request queued", |s| s["queued"] == 1);
    // (The 503 comes at once; the bound is generous for a machine busy with the other tests' servers.)
    let r = client(Duration::from_secs(30)).post(&url).json(&short).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    server.assert_healthy("a full queue");
    drop(running);
    assert_eq!(queued.join().unwrap(), 200, "the queued request runs once the slot is free");
    assert_eq!(server.stats()["rejected_busy"], 1);
}

/// One slot, two conversations in turn: the first is parked while the second runs, and its follow-up finds it.
#[test]
fn a_parked_conversation_comes_back() {
    let m = model();
    let server = Server::start(&m.llm, &m.mmproj, &["--greedy", "-n", "6", "-c", "1024", "--parallel", "1"]);
    let image = image_part("images/rgb_80x60.png");
    let a =
        json!({"user": "u", "messages": [{"role": "user", "content": [image, {"type": "text", "text": "何ですか"}]}]});
    let (status, a1) = server.post(&a);
    assert_eq!(status, 200, "{a1}");
    let text = a1["choices"][0]["message"]["content"].as_str().unwrap();
    let prompt = a1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(server.post(&json!({"user": "u", "messages": [user("別の話")]})).0, 200);
    let follow = json!({"user": "u", "messages": [
        {"role": "user", "content": [image, {"type": "text", "text": "何ですか"}]},
        {"role": "assistant", "content": text}, user("色は")]});
    let (status, a2) = server.post(&follow);
    assert_eq!(status, 200, "{a2}");
    let cached = a2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= prompt, "the first conversation was kept: {cached} cached of {prompt}: {a2}");
    assert_eq!(a2["timings"]["images_encoded"], 0);
}
