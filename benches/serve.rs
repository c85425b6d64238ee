//! `serve` under load: aggregate tokens/s with 1, 2, 4, 8 concurrent streaming clients, next to the raw batched
//! forward of as many sequences measured in the same run (what the scheduling, HTTP and JSON cost), the time to
//! first token of a client that arrives while 3 others decode, and the server's peak RSS. One command:
//!
//!   cargo bench --bench serve -- --model LLM.gguf [--threads 2] [--tokens 48] [--clients 1,2,4,8] [--ctx 4096]
//!
//! The steady-state rate counts the tokens all clients received while every one of them was decoding (after the
//! last first token, before the first end), so prompt prefill does not blur it; the overall rate (wall time from
//! the first request to the last answer) is printed next to it.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use asagi_gguf::llm::{Batch, Input};
use asagi_gguf::load::{Loaded, ModelArgs};
use serde_json::{json, Value};

struct Args {
    model: String,
    threads: usize,
    tokens: usize,
    clients: Vec<usize>,
    ctx: usize,
}

fn args() -> Args {
    let mut a = Args { model: String::new(), threads: 2, tokens: 48, clients: vec![1, 2, 4, 8], ctx: 4096 };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--model" => a.model = val,
            "--threads" => a.threads = val.parse().expect("--threads N"),
            "--tokens" => a.tokens = val.parse().expect("--tokens N"),
            "--ctx" => a.ctx = val.parse().expect("--ctx N"),
            "--clients" => a.clients = val.split(',').map(|c| c.parse().expect("--clients 1,2,4")).collect(),
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    assert!(!a.model.is_empty(), "usage: cargo bench --bench serve -- --model LLM.gguf");
    a
}

/// Milliseconds per step of `b` single-token rows (one per sequence, each after a 32-token prompt), in-process.
fn raw_step_ms(a: &Args, b: usize, steps: usize) -> f64 {
    let mut margs = ModelArgs::new(a.model.clone().into(), None);
    margs.threads = Some(a.threads);
    margs.ctx_size = Some(a.ctx);
    let loaded = Loaded::open(&margs, false).unwrap();
    let model = loaded.model().unwrap();
    let backends = loaded.backends();
    let mut s = loaded.session(&model, &backends).unwrap();
    let prompt: Vec<u32> = (0..32).map(|i| 300 + i).collect();
    for q in 0..b {
        s.prefill(Input::Tokens(&prompt), q, 0, false).unwrap();
    }
    let mut times = Vec::new();
    for i in 0..steps {
        let ids: Vec<u32> = (0..b as u32).map(|q| 400 + q + i as u32).collect();
        let batch = Batch { input: Input::Tokens(&ids), pos: vec![32 + i as i32; b], seq: (0..b).collect(), logits: vec![true; b] };
        let t = Instant::now();
        s.decode(&batch).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    asagi_gguf::bench::median(times)
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(a: &Args, parallel: usize) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_asagi-gguf"))
        .args(["serve", "--greedy", "-m", &a.model, "-t", &a.threads.to_string(), "-c", &a.ctx.to_string()])
        .args(["--parallel", &parallel.to_string(), "--port", &port.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(300), "serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Server(child, port)
}

/// One streaming client: (time of the first text, times of every text event, end), relative to `t0`.
struct Trace {
    first: f64,
    events: Vec<f64>,
    end: f64,
}

fn client(port: u16, question: &str, tokens: usize, t0: Instant) -> Trace {
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "min_tokens": tokens, "stream": true});
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()
        .unwrap()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    let mut events = Vec::new();
    for line in std::io::BufReader::new(r).lines() {
        let line = line.unwrap();
        let Some(d) = line.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
            events.push(t0.elapsed().as_secs_f64());
        }
    }
    Trace { first: events.first().copied().unwrap_or(f64::NAN), end: t0.elapsed().as_secs_f64(), events }
}

fn run_clients(port: u16, n: usize, tokens: usize, tag: &str) -> Vec<Trace> {
    let barrier = Arc::new(Barrier::new(n));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let b = barrier.clone();
                s.spawn(move || {
                    b.wait();
                    client(port, &format!("{tag}{i}: 日本の四季について詳しく説明してください。"), tokens, t0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn peak_rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    kb / 1024.0
}

fn main() {
    let a = args();
    println!("model {}, {} threads, {} tokens per client, context {}", a.model, a.threads, a.tokens, a.ctx);
    let mut raw = Vec::new();
    for &b in &a.clients {
        let ms = raw_step_ms(&a, b, 12);
        println!("raw forward, {b} sequence(s): {ms:.1} ms/step = {:.2} tok/s", b as f64 * 1e3 / ms);
        raw.push(ms);
    }
    let max_clients = *a.clients.iter().max().unwrap();
    let server = start(&a, max_clients.max(4));
    run_clients(server.1, 1, 4, "warm"); // the first request pays one-time costs

    println!("\n| clients | steady tok/s | raw forward tok/s | steady / raw | overall tok/s | median TTFT s |");
    println!("|---|---|---|---|---|---|");
    let mut single = 0.0;
    for (&n, &raw_ms) in a.clients.iter().zip(&raw) {
        let traces = run_clients(server.1, n, a.tokens, "q");
        let start = traces.iter().map(|t| t.first).fold(f64::MIN, f64::max);
        let stop = traces.iter().map(|t| t.end).fold(f64::MAX, f64::min);
        let inside = traces.iter().map(|t| t.events.iter().filter(|&&e| e > start && e <= stop).count()).sum::<usize>();
        let steady = inside as f64 / (stop - start);
        let total: usize = traces.iter().map(|t| t.events.len()).sum();
        let overall = total as f64 / traces.iter().map(|t| t.end).fold(0.0, f64::max);
        let rawtok = n as f64 * 1e3 / raw_ms;
        let ttft = asagi_gguf::bench::median(traces.iter().map(|t| t.first).collect());
        if n == 1 {
            single = overall;
        }
        println!("| {n} | {steady:.2} | {rawtok:.2} | {:.2} | {overall:.2} | {ttft:.2} |", steady / rawtok);
    }
    if single > 0.0 {
        println!("(overall with 1 client: {single:.2} tok/s)");
    }

    // A client arriving while 3 others decode, against the same request alone.
    let alone = run_clients(server.1, 1, 4, "late").remove(0).first;
    let t0 = Instant::now();
    let late = std::thread::scope(|s| {
        let busy: Vec<_> = (0..3).map(|i| s.spawn(move || client(server.1, &format!("busy{i}: 長い話をしてください"), a.tokens * 2, t0))).collect();
        std::thread::sleep(Duration::from_secs_f64(
            (busy.len() as f64 * raw[0] / 1e3 * 40.0).max(2.0), // let them reach their decode phase
        ));
        let t1 = Instant::now();
        let late = client(server.1, "late0: 日本の四季について詳しく説明してください。", 4, t1);
        for b in busy {
            b.join().unwrap();
        }
        late.first
    });
    let step3 = raw.get(a.clients.iter().position(|&c| c == 4).unwrap_or(0)).copied().unwrap_or(raw[0]);
    println!(
        "\nTTFT of a new client: alone {alone:.2} s, while 3 others decode {late:.2} s (bound: alone + 2 steps of 4 = {:.2} s)",
        alone + 2.0 * step3 / 1e3
    );
    println!("server peak RSS: {:.0} MB", peak_rss_mb(server.0.id()));
}
