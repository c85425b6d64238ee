//! `serve` under load: aggregate tokens/s with 1, 2, 4, 8 concurrent streaming clients, next to the raw batched
//! forward of as many sequences measured in the same run (what the scheduling, HTTP and JSON cost), the time to
//! first token of a client that arrives while 3 others decode, and the server's peak RSS. One command:
//!
//!   cargo bench --bench serve -- --model LLM.gguf [--threads 2] [--tokens 48] [--clients 1,2,4,8] [--ctx 4096]
//!
//! The steady-state rate is the engine's count of generated tokens (`/stats`, polled every 50 ms) over the
//! window where every client was decoding (after the last first text, before the first end), so prompt prefill
//! does not blur it; the overall rate (completion tokens over the wall time from the first request to the last
//! answer) is printed next to it. The same samples give the share of that window the engine spent in the
//! model's forward passes (`forward_us`): the rest is what scheduling, sampling, HTTP and JSON cost, measured
//! in the same seconds (this VM's speed drifts by minutes, so a raw forward timed apart is only indicative).
//! Time to first token is the server's own (`timings.queued_ms + prompt_ms`).

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
        let batch = Batch {
            input: Input::Tokens(&ids),
            pos: vec![32 + i as i32; b],
            seq: (0..b).collect(),
            logits: vec![true; b],
        };
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

fn post(port: u16, body: &Value) -> reqwest::blocking::Response {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3600)).build().unwrap();
    client.post(format!("http://127.0.0.1:{port}/v1/chat/completions")).json(body).send().unwrap()
}

/// One streaming client: (time of the first text, times of every text event, end), relative to `t0`.
struct Trace {
    first: f64,
    events: Vec<f64>,
    end: f64,
}

fn client(port: u16, question: &str, tokens: usize, t0: Instant) -> Trace {
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "min_tokens": tokens, "stream": true});
    let r = post(port, &body);
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

fn get(port: u16, path: &str) -> Value {
    reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")).unwrap().json().unwrap()
}

/// A `/stats` sample: seconds since the start, tokens generated, microseconds in forward passes.
type Sample = (f64, u64, u64);

/// `n` clients at once; also the engine's counters sampled every 50 ms.
fn run_clients(port: u16, n: usize, tokens: usize, tag: &str) -> (Vec<Trace>, Vec<Sample>) {
    let barrier = Arc::new(Barrier::new(n));
    let t0 = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let poll = s.spawn(|| {
            let mut v = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let st = get(port, "/stats");
                let (g, f) = (st["tokens_generated"].as_u64().unwrap(), st["forward_us"].as_u64().unwrap());
                v.push((t0.elapsed().as_secs_f64(), g, f));
                std::thread::sleep(Duration::from_millis(50));
            }
            v
        });
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let b = barrier.clone();
                s.spawn(move || {
                    b.wait();
                    client(port, &format!("{tag}{i}: 日本の四季について詳しく説明してください。"), tokens, t0)
                })
            })
            .collect();
        let traces = hs.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (traces, poll.join().unwrap())
    })
}

/// Tokens per second, and the share of the time spent in forward passes, from the samples inside [start, stop].
fn rate(samples: &[Sample], start: f64, stop: f64) -> (f64, f64) {
    let inside: Vec<&Sample> = samples.iter().filter(|(t, _, _)| *t >= start && *t <= stop).collect();
    match (inside.first(), inside.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => ((b.1 - a.1) as f64 / (b.0 - a.0), (b.2 - a.2) as f64 / 1e6 / (b.0 - a.0)),
        _ => (f64::NAN, f64::NAN),
    }
}

/// The server's time to first token for a one-token answer: queue + image/prompt work, in seconds.
fn ttft(port: u16, question: &str) -> f64 {
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 1});
    let v: Value = post(port, &body).json().unwrap();
    (v["timings"]["queued_ms"].as_f64().unwrap() + v["timings"]["prompt_ms"].as_f64().unwrap()) / 1e3
}

fn peak_rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn main() {
    let a = args();
    println!("model {}, {} threads, {} tokens per client, context {}", a.model, a.threads, a.tokens, a.ctx);
    let max_clients = *a.clients.iter().max().unwrap();
    let server = start(&a, max_clients.max(4));
    run_clients(server.1, 1, 4, "warm"); // the first request pays one-time costs

    println!("\n| clients | steady tok/s | share in forward | raw forward tok/s (apart) | overall tok/s | median first text s |");
    println!("|---|---|---|---|---|---|");
    // This VM's speed drifts by minutes: each row's raw forward is measured right before its server run (the
    // server idle meanwhile).
    let mut raw = Vec::new();
    for &n in &a.clients {
        let raw_ms = raw_step_ms(&a, n, 16);
        raw.push(raw_ms);
        let (traces, samples) = run_clients(server.1, n, a.tokens, "q");
        let start = traces.iter().map(|t| t.first).fold(f64::MIN, f64::max);
        let stop = traces.iter().map(|t| t.end).fold(f64::MAX, f64::min);
        let (steady, share) = rate(&samples, start, stop);
        let overall = (n * a.tokens) as f64 / traces.iter().map(|t| t.end).fold(0.0, f64::max);
        let rawtok = n as f64 * 1e3 / raw_ms;
        let first = asagi_gguf::bench::median(traces.iter().map(|t| t.first).collect());
        println!("| {n} | {steady:.2} | {:.1}% | {rawtok:.2} | {overall:.2} | {first:.2} |", share * 100.0);
    }

    // A client arriving while 3 others decode, against a request of the same length alone (other words, so
    // neither finds the other's prompt in the cache).
    let alone = ttft(server.1, "孤独A: 日本の四季について詳しく説明してください。");
    let t0 = Instant::now();
    let late = std::thread::scope(|s| {
        let busy: Vec<_> = (0..3)
            .map(|i| s.spawn(move || client(server.1, &format!("忙{i}: 長い話をしてください"), a.tokens * 3, t0)))
            .collect();
        // Wait until all three decode.
        while get(server.1, "/stats")["slots_busy"].as_u64() != Some(3) || t0.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(3));
        let late = ttft(server.1, "孤独B: 日本の四季について詳しく説明してください。");
        for b in busy {
            b.join().unwrap();
        }
        late
    });
    let step4 = raw.get(a.clients.iter().position(|&c| c == 4).unwrap_or(0)).copied().unwrap_or(raw[0]);
    println!(
        "\nTTFT of a new client (server timings): alone {alone:.2} s, while 3 others decode {late:.2} s \
         (target: alone + 2 steps of 4 = {:.2} s)",
        alone + 2.0 * step4 / 1e3
    );
    println!("server peak RSS: {:.0} MB", peak_rss_mb(server.0.id()));
}
