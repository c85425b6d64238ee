//! The command line end to end: `demo` (what the README tells newcomers to run), then `info`, `tokenize`,
//! `run --json` and `chat --json` on the files it made.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    common::asagi_gguf()
}

#[test]
fn demo_then_info_tokenize_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin().args(["demo", "-n", "4", "-t", "2", "--dir"]).arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {err}");
    for step in
        ["[1/4] synth", "[2/4] convert", "[3/4] image", "[4/4] run", "image encode", "prompt eval time", "eval time"]
    {
        assert!(err.contains(step), "demo output lacks {step:?}: {err}");
    }
    let llm = dir.path().join("asagi-tiny-Q4_K_M.gguf");
    let mmproj = dir.path().join("mmproj-asagi-tiny-Q8_0.gguf");

    let info = bin().arg("info").arg(&llm).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success() && text.contains("general.architecture") && text.contains("blk.1.ffn_down.weight"),
        "{text}"
    );

    let tok = bin().args(["tokenize", "--json", "-m"]).arg(&llm).arg("<image>\nこんにちは").output().unwrap();
    let ids: Vec<u32> = serde_json::from_slice(&tok.stdout).unwrap();
    assert_eq!(ids[0], 1, "BOS first");
    assert_eq!(ids[1], 1998, "<image> is one special token (id = tokenizer length - 2)");

    let run = bin()
        .args(["run", "--json", "-n", "3", "-t", "2", "-p", "何ですか", "--image"])
        .arg(dir.path().join("test-card.png"))
        .arg("--mmproj")
        .arg(&mmproj)
        .arg("-m")
        .arg(&llm)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert!(v["prompt_tokens"].as_array().unwrap().contains(&serde_json::json!(1998)));
    assert!(v["tokens"].as_array().unwrap().len() <= 3);
    assert!(["eos", "length"].contains(&v["stop_reason"].as_str().unwrap()));
    assert!(v["timings"]["image_encode_ms"].as_f64().unwrap() > 0.0);

    // An image without --mmproj, and a missing file, are one-line errors with exit code 1.
    let bad = bin().args(["run", "-p", "x", "--image", "nope.png", "-m"]).arg(&llm).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.contains("--mmproj"), "{err}");
    let bad = bin()
        .args(["run", "-p", "x", "--image", "nope.png", "--mmproj"])
        .arg(&mmproj)
        .arg("-m")
        .arg(&llm)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains("nope.png"), "{err}");

    // A context far beyond this machine's memory (a 10^9-cell KV cache: terabytes) is refused before anything is
    // allocated, with the estimate and the ways to make it fit; --mem-check off would go on to allocate it.
    let huge = bin().args(["run", "-p", "x", "-t", "2", "-c", "1000000000", "-m"]).arg(&llm).output().unwrap();
    let err = String::from_utf8_lossy(&huge.stderr);
    assert_eq!(huge.status.code(), Some(1), "{err}");
    for part in
        ["error: the model needs about", "is available (", "-c 500000000 saves", "--cache-type q8_0", "--mem-check off"]
    {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }

    // --mlock pins the weights (or, where RLIMIT_MEMLOCK forbids it, warns and goes on, as llama.cpp does).
    let locked = bin().args(["run", "-p", "x", "-n", "1", "-t", "2", "--mlock", "-m"]).arg(&llm).output().unwrap();
    let err = String::from_utf8_lossy(&locked.stderr);
    assert!(locked.status.success(), "{err}");
    assert!(err.contains("GB of weights in RAM") || err.contains("warning: --mlock"), "{err}");

    // chat: an image turn, then a follow-up that only prefills its own tokens on top of the kept cache.
    let mut chat = bin()
        .args(["chat", "--json", "--greedy", "-n", "3", "-t", "2", "-c", "1024", "--mmproj"])
        .arg(&mmproj)
        .arg("-m")
        .arg(&llm)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let card = dir.path().join("test-card.png");
    let script = format!("/image {}\n何ですか\n/bogus\n色は\n/quit\n", card.display());
    chat.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = chat.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("unknown command /bogus"), "{err}");
    let turns: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(turns.len(), 2, "{turns:?}");
    let n = |t: &serde_json::Value, k: &str| t[k].as_u64().unwrap();
    assert_eq!(n(&turns[0], "n_past"), 0);
    let ids0 = turns[0]["prompt_tokens"].as_array().unwrap().len() as u64;
    assert!(n(&turns[0], "prompt_positions") > ids0, "the first turn's image expands to several positions");
    let kept = n(&turns[0], "prompt_positions") + turns[0]["tokens"].as_array().unwrap().len() as u64;
    assert_eq!(n(&turns[1], "n_past"), kept);
    assert!(n(&turns[1], "prompt_positions") < 40, "the follow-up prefills its own tokens only");
}
