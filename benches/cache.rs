//! Time to first token with the caches, each measurement a new `asagi-gguf run` process (as a user asking a second
//! question tomorrow): an image + question with a cold cache; another question about the same image with only the
//! embeddings cached, then with the prompt prefix cached; the first prompt resumed from a saved session. One
//! command (build first: the benchmark runs target/release/asagi-gguf):
//!
//!   cargo bench --bench cache -- --model LLM.gguf --mmproj MMPROJ.gguf --image IMG [--threads 2] [--reps 2]
//!
//! TTFT is the binary's own `timings.ttft_ms` (`--greedy -n 1`): from the prompt's start (the images decoded,
//! restored or encoded, the rest prefilled) to the first token, load time excluded (reported apart). llama.cpp's
//! mtmd re-encodes and re-prefills every time: its TTFT for both questions is the cold one, measured by
//! `cargo bench --bench compare -- --rows image` (see the README).

use std::path::{Path, PathBuf};
use std::process::Command;

use asagi_gguf::bench::median;
use serde_json::Value;

const Q1: &str = "この画像について説明してください。";
const Q2: &str = "この画像の中で一番目立つ色は何ですか？";

struct Args {
    model: String,
    mmproj: String,
    image: String,
    threads: usize,
    reps: usize,
}

fn args() -> Args {
    let mut a = Args { model: String::new(), mmproj: String::new(), image: String::new(), threads: 2, reps: 2 };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = || v.get(i + 1).cloned().unwrap_or_else(|| panic!("{} needs a value", v[i]));
        match v[i].as_str() {
            "--model" => a.model = next(),
            "--mmproj" => a.mmproj = next(),
            "--image" => a.image = next(),
            "--threads" => a.threads = next().parse().expect("--threads N"),
            "--reps" => a.reps = next().parse().expect("--reps N"),
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    assert!(!a.model.is_empty() && !a.mmproj.is_empty() && !a.image.is_empty(), "--model, --mmproj and --image");
    a
}

/// One `run --json --greedy -n 1` process; its JSON.
fn run(a: &Args, question: &str, extra: &[&str]) -> Value {
    let bin = Path::new(env!("CARGO_BIN_EXE_asagi-gguf"));
    let out = Command::new(bin)
        .args(["run", "--json", "--greedy", "-n", "1", "-t", &a.threads.to_string(), "-m", &a.model])
        .args(["--mmproj", &a.mmproj, "-c", "2048", "--image", &a.image, "-p", question])
        .args(extra)
        .output()
        .expect("run the binary");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn ttft(v: &Value) -> f64 {
    v["timings"]["ttft_ms"].as_f64().expect("ttft_ms")
}

fn main() {
    let a = args();
    let tmp = tempfile::tempdir().expect("a temporary folder");
    println!("model {}, mmproj {}, image {}, {} threads, {} reps", a.model, a.mmproj, a.image, a.threads, a.reps);
    let (mut cold, mut emb, mut prefix, mut session, mut load) = (vec![], vec![], vec![], vec![], vec![]);
    let mut notes = Vec::new();
    for rep in 0..a.reps {
        let dir: PathBuf = tmp.path().join(format!("cache{rep}"));
        let d = dir.to_str().expect("utf-8 path").to_string();
        let s = tmp.path().join(format!("s{rep}.session")).to_str().expect("utf-8 path").to_string();
        // Cold: nothing cached (this run writes the embeddings, the prefix and the session).
        let c = run(&a, Q1, &["--image-cache", &d, "--session", &s]);
        cold.push(ttft(&c));
        load.push(c["timings"]["load_ms"].as_f64().unwrap());
        // Another question, only the embeddings cached.
        let e = run(&a, Q2, &["--image-cache", &d, "--no-prefix-cache"]);
        assert_eq!(e["cache"]["images_encoded"], 0, "{e}");
        emb.push(ttft(&e));
        // Another question, the prefix cached.
        let p = run(&a, Q2, &["--image-cache", &d]);
        assert_eq!(p["cache"]["restored_from"], "prefix cache", "{p}");
        prefix.push(ttft(&p));
        // The first prompt again, from its session.
        let r = run(&a, Q1, &["--session", &s]);
        assert_eq!(r["cache"]["restored_from"], "session", "{r}");
        session.push(ttft(&r));
        notes.push(format!(
            "rep {rep}: cold {:.0} ms (image {:.0}, prefill {} positions {:.0} ms, prefix save {:.0} ms); prefix restore {:.0} ms + {} positions; session restore {:.0} ms",
            ttft(&c),
            c["timings"]["image_encode_ms"].as_f64().unwrap(),
            c["cache"]["prefill_positions"],
            c["cache"]["prefill_ms"].as_f64().unwrap(),
            c["cache"]["prefix_save_ms"].as_f64().unwrap(),
            p["cache"]["restore_ms"].as_f64().unwrap(),
            p["cache"]["prefill_positions"],
            r["cache"]["restore_ms"].as_f64().unwrap(),
        ));
    }
    for n in &notes {
        println!("{n}");
    }
    let cold_m = median(cold.clone());
    println!("\n| time to first token (new process, load {:.0} ms apart) | ms (median) | vs cold |", median(load));
    println!("|---|---|---|");
    for (name, v) in [
        ("image + question, cold cache", cold),
        ("another question, embeddings cached", emb),
        ("another question, prompt prefix cached", prefix),
        ("the first prompt from its saved session", session),
    ] {
        let m = median(v);
        println!("| {name} | {m:.0} | {:.3}x |", m / cold_m);
    }
}
