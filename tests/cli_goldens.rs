//! The commands users run, against HF `generate()`: `run --json -p QUESTION --image ...` (Asagi's template around
//! the question, its stop set) and `chat --json` on the F32 files of the base fixture give HF's prompt ids and
//! HF's tokens, stopping where HF stops (goldens.json -> generate; tests/reference/README.md). `serve` answers
//! equal `run`'s (tests/serve.rs), so all three give HF's.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{fixtures, server::run_json};
use serde_json::Value;

/// HF's new tokens of the best sequence up to its EOS (rows that finished early are padded with `<pad>` after
/// it), and whether it stopped there. The CLI's `tokens` leave the stop token out and say `stop_reason: eos`
/// (../shared/spec/cli.md).
fn hf_tokens(case: &Value) -> (Vec<i64>, bool) {
    let mut t = fixtures::ids(&case["new_tokens"][0]);
    let eos = t.iter().position(|&id| id == 2);
    if let Some(at) = eos {
        t.truncate(at);
    }
    (t, eos.is_some())
}

/// The flags that make the CLI decode as HF's `params` (the CLI's defaults are the card's beam sample with
/// repetition penalty 1.5; HF's are greedy without penalty).
fn flags(params: &Value) -> Vec<String> {
    let f = |k: &str| params.get(k).and_then(Value::as_f64);
    let beams = params["num_beams"].as_u64().unwrap();
    assert_eq!(params["do_sample"], Value::Bool(false), "deterministic cases only");
    let mut v = vec!["-n".to_string(), params["max_new_tokens"].to_string()];
    if beams == 1 {
        v.push("--greedy".into());
    } else {
        v.extend(["--temp".into(), "0".into(), "--num-beams".into(), beams.to_string()]);
    }
    v.extend(["--repeat-penalty".into(), f("repetition_penalty").unwrap_or(1.0).to_string()]);
    v.extend(["--length-penalty".into(), f("length_penalty").unwrap_or(1.0).to_string()]);
    v
}

struct Case {
    name: String,
    question: String,
    images: Vec<PathBuf>,
    flags: Vec<String>,
    prompt_ids: Vec<i64>,
    tokens: Vec<i64>,
    eos: bool,
}

fn cases() -> Vec<Case> {
    let g = fixtures::goldens("base-default-f32");
    let cases: Vec<Case> = g["generate"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, c)| {
            let (tokens, eos) = hf_tokens(c);
            let prompt = &g["prompts"][c["prompt"].as_str().unwrap()];
            let images: Vec<PathBuf> = prompt["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| fixtures::root().join("images").join(i.as_str().unwrap()))
                .collect();
            Case {
                name: name.clone(),
                question: fixtures::template_question(prompt["text"].as_str().unwrap(), images.len()),
                images,
                flags: flags(&c["params"]),
                prompt_ids: fixtures::ids(&c["prompt_ids"]),
                tokens,
                eos,
            }
        })
        .collect();
    assert_eq!(cases.len(), 9, "greedy and beam cases with 0, 1 and 2 images");
    cases
}

fn run_case(llm: &Path, mmproj: &Path, c: &Case) -> Value {
    let mut args: Vec<String> = c.flags.clone();
    args.extend(["-p".into(), c.question.clone()]);
    for i in &c.images {
        args.extend(["--image".into(), i.display().to_string()]);
    }
    run_json(llm, mmproj, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn run_gives_hf_prompt_ids_and_generate_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::base_f32(dir.path());
    let mut stopped_at_eos = 0;
    for c in cases() {
        let v = run_case(&llm, &mmproj, &c);
        let ids = |k: &str| fixtures::ids(&v[k]);
        assert_eq!(ids("prompt_tokens"), c.prompt_ids, "{}: the template's ids (one <image> per image)", c.name);
        assert_eq!(ids("tokens"), c.tokens, "{}: run {:?} vs HF generate()", c.name, c.flags);
        assert_eq!(v["stop_reason"], if c.eos { "eos" } else { "length" }, "{}", c.name);
        stopped_at_eos += c.eos as usize;
    }
    assert!(stopped_at_eos >= 2, "some cases stop at </s> before the length limit");

    // The answer's cells are counted per beam before anything runs: 5 beams x 60 tokens do not fit beside the
    // prompt in 256 cells (greedy's 60 do), and the refusal says so.
    let c = cases().into_iter().find(|c| c.name == "greedy_text").unwrap();
    let base = ["run", "-t", "2", "-c", "256", "-n", "60", "--temp", "0", "-m"];
    let out = common::asagi_gguf().args(base).arg(&llm).args(["--num-beams", "5", "-p", &c.question]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("5 beam(s) x -n 60") && err.contains("exceed the context of 256 tokens"), "{err}");
    let out = common::asagi_gguf().args(base).arg(&llm).args(["--num-beams", "1", "-p", &c.question]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `chat --json`: a first turn with the images, then a follow-up; the first answer is HF's, for greedy and for
/// beam search (the follow-up's own correctness is tests/chat.rs: equal to a fresh prefill).
#[test]
fn chat_first_turns_give_hf_generate_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::base_f32(dir.path());
    for c in cases().into_iter().filter(|c| ["greedy_img2", "beam5_img1_rep1.5_lp0.6"].contains(&c.name.as_str())) {
        let mut chat = common::asagi_gguf()
            .args(["chat", "--json", "-t", "2", "-c", "1024", "--mmproj"])
            .arg(&mmproj)
            .arg("-m")
            .arg(&llm)
            .args(&c.flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut script: String = c.images.iter().map(|i| format!("/image {}\n", i.display())).collect();
        script += &format!("{}\n続けて\n/quit\n", c.question);
        chat.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = chat.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let turns: Vec<Value> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(turns.len(), 2, "{}: {turns:?}", c.name);
        assert_eq!(fixtures::ids(&turns[0]["prompt_tokens"]), c.prompt_ids, "{}", c.name);
        assert_eq!(fixtures::ids(&turns[0]["tokens"]), c.tokens, "{}: chat vs HF generate()", c.name);
        assert_eq!(turns[0]["stop_reason"], if c.eos { "eos" } else { "length" }, "{}", c.name);
        assert!(!turns[1]["tokens"].as_array().unwrap().is_empty());
    }
}
