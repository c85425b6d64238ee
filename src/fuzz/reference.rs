//! The micro-sized reference model (synth's `micro` size, converted) and the seed inputs made from it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use asagi_convert::{LlmType, MmprojType, Options};
use ggml::gguf::GgufFile;

use super::convert::{archive, ARCHIVE_NAMES};
use crate::synth;
use crate::tokenizer::Tokenizer;

/// A micro Asagi checkpoint, its F32 GGUFs, and their tokenizer.
pub struct Reference {
    pub checkpoint: PathBuf,
    pub llm: PathBuf,
    pub mmproj: PathBuf,
    pub tok: Tokenizer,
}

impl Reference {
    pub fn make(dir: &Path) -> Result<Reference> {
        let checkpoint = dir.join("hf");
        synth::write(&synth::size("micro")?, &checkpoint, 1, true)?;
        let (llm, mmproj) = (dir.join("llm-f32.gguf"), dir.join("mmproj-f32.gguf"));
        convert(&checkpoint, LlmType::F32, MmprojType::F32, &llm, &mmproj)?;
        let (tok, _) = Tokenizer::from_gguf(&GgufFile::open(&llm)?)?;
        Ok(Reference { checkpoint, llm, mmproj, tok })
    }
}

/// Converts `checkpoint` to `llm` and `mmproj` (overwriting them), one thread, no progress bar.
pub fn convert(checkpoint: &Path, llm: LlmType, mm: MmprojType, llm_out: &Path, mm_out: &Path) -> Result<()> {
    let opts = Options {
        model_dir: checkpoint.to_path_buf(),
        outtype: llm,
        mmproj_outtype: mm,
        outfile: Some(llm_out.to_path_buf()),
        mmproj_outfile: Some(mm_out.to_path_buf()),
        force: true,
        threads: 1,
        progress: false,
    };
    let c = asagi_convert::plan(&opts)?;
    asagi_convert::write(&c, &opts, &AtomicBool::new(false))?;
    Ok(())
}

/// The seed inputs of target `name` (file name, bytes), made from the reference model; the image target's seeds
/// are the test images (tests/fixtures/images and the hostile ones), which fuzz/run passes as corpus folders too.
/// Seeds named `bad-*` are inputs the bad-input tests check by hand (damaged files, escapes, limits): they must
/// be refused; the others must be accepted.
pub fn seeds(f: &super::Fuzzer, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let r = f.reference();
    let mut out = Vec::new();
    match name {
        "gguf" => {
            // Role byte (0: language model, 1: mmproj) + the file, in two weight types each.
            for (llm, mm, tag) in [(LlmType::F16, MmprojType::F16, "f16"), (LlmType::Q8_0, MmprojType::Q8_0, "q8_0")] {
                let (a, b) = (f.path(&format!("seed-llm-{tag}.gguf")), f.path(&format!("seed-mmproj-{tag}.gguf")));
                convert(&r.checkpoint, llm, mm, &a, &b)?;
                for (role, path, what) in [(0u8, &a, "llm"), (1u8, &b, "mmproj")] {
                    let file = std::fs::read(path)?;
                    out.push((format!("{what}-{tag}.gguf"), [&[role][..], &file].concat()));
                    if tag == "q8_0" {
                        // Cut in its tensor data; and given the other role.
                        out.push((
                            format!("bad-{what}-truncated.gguf"),
                            [&[role][..], &file[..file.len() / 2]].concat(),
                        ));
                        out.push((format!("bad-{what}-other-role.gguf"), [&[role ^ 1][..], &file].concat()));
                    }
                }
            }
        }
        "convert" => {
            let read_all = |dir: &Path| -> Result<Vec<(String, Vec<u8>)>> {
                let mut files = Vec::new();
                for n in ARCHIVE_NAMES {
                    let p = dir.join(n);
                    if p.exists() {
                        files.push((n.to_string(), std::fs::read(&p).with_context(|| p.display().to_string())?));
                    }
                }
                Ok(files)
            };
            let files = read_all(&r.checkpoint)?;
            // Flag byte: output types (see convert::types).
            out.push(("micro-f16.bin".into(), archive(0b000, &files)));
            out.push(("micro-q4km-q8.bin".into(), archive(0b111, &files)));
            // Two shards and an index.
            let sharded = f.path("seed-sharded");
            synth::write_sharded(&synth::size("micro")?, &sharded, 1, true, 150_000)?;
            let files = read_all(&sharded)?;
            anyhow::ensure!(
                files.iter().any(|(n, _)| n == "model-00002-of-00002.safetensors"),
                "the sharded seed has not two shards"
            );
            out.push(("micro-sharded-q8.bin".into(), archive(0b001, &files)));
            // A shard named outside the folder; the weights missing; a shard cut short.
            let escape = serde_json::json!({"metadata": {}, "weight_map": {"x": "../../../../etc/passwd"}});
            let with = |name: &str, data: Vec<u8>| -> Vec<(String, Vec<u8>)> {
                let mut v: Vec<_> = files.iter().filter(|(n, _)| n != name).cloned().collect();
                v.push((name.to_string(), data));
                v
            };
            out.push((
                "bad-index-escape.bin".into(),
                archive(1, &with("model.safetensors.index.json", serde_json::to_vec(&escape)?)),
            ));
            let no_weights: Vec<_> = files.iter().filter(|(n, _)| !n.ends_with(".safetensors")).cloned().collect();
            out.push(("bad-no-weights.bin".into(), archive(1, &no_weights)));
            let shard = &files.iter().find(|(n, _)| n == "model-00002-of-00002.safetensors").expect("two shards").1;
            out.push((
                "bad-shard-cut.bin".into(),
                archive(1, &with("model-00002-of-00002.safetensors", shard[..shard.len() - 100].to_vec())),
            ));
        }
        "request" => {
            let png = include_bytes!("../../tests/fixtures/images/palette_50x40.png");
            use base64::Engine as _;
            let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
            let bodies = [
                serde_json::json!({"messages": [{"role": "user", "content": "こんにちは"}]}),
                serde_json::json!({"model": "asagi", "messages": [
                    {"role": "system", "content": "短く答えてください。"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "この画像は？"},
                        {"type": "image_url", "image_url": {"url": url}}]},
                    {"role": "assistant", "content": "猫です。"},
                    {"role": "user", "content": "色は？"}],
                    "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "n": 1, "stream": true,
                    "stream_options": {"include_usage": true}, "stop": ["。"], "seed": 3,
                    "num_beams": 5, "repetition_penalty": 1.5}),
                serde_json::json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": format!("img-{}", "ab".repeat(32))}}]}],
                    "max_completion_tokens": 4, "frequency_penalty": 0.5, "presence_penalty": -0.5}),
            ];
            for (i, b) in bodies.iter().enumerate() {
                // First byte: 0 = chat request, 1 = image upload body.
                let mut bytes = vec![0u8];
                bytes.extend(serde_json::to_vec(b)?);
                out.push((format!("chat-{i}.json"), bytes));
            }
            let mut up = vec![1u8];
            up.extend(serde_json::to_vec(&serde_json::json!({ "url": url }))?);
            out.push(("upload.json".into(), up));
            // What tests/serve_attacks.rs sends: over the limits, a path without --allow-paths, a web URL.
            let user = |content: serde_json::Value| serde_json::json!([{"role": "user", "content": content}]);
            let image = |u: &str| serde_json::json!({"type": "image_url", "image_url": {"url": u}});
            let id = format!("img-{}", "cd".repeat(32));
            let bad = [
                ("max-tokens", serde_json::json!({"messages": user("a".into()), "max_tokens": 1u64 << 40})),
                ("beams", serde_json::json!({"messages": user("a".into()), "num_beams": 64})),
                ("temperature", serde_json::json!({"messages": user("a".into()), "temperature": 1e-9})),
                ("n-stream", serde_json::json!({"messages": user("a".into()), "n": 2, "stream": true})),
                (
                    "images",
                    serde_json::json!({"messages": user(serde_json::json!([image(&id), image(&id), image(&id), image(&id), image(&id)]))}),
                ),
                ("path", serde_json::json!({"messages": user(serde_json::json!([image("/etc/passwd")]))})),
                ("web", serde_json::json!({"messages": user(serde_json::json!([image("https://example.com/a.png")]))})),
                ("text", serde_json::json!({"messages": user("あ".repeat(8000).into())})),
                (
                    "assistant-last",
                    serde_json::json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                ),
            ];
            for (name, b) in bad {
                out.push((format!("bad-{name}.json"), [&[0u8][..], &serde_json::to_vec(&b)?].concat()));
            }
        }
        "detokenize" => {
            let text = ["今日は良い天気です。", "画像の説明：\n赤い花", "abc 123 ！？", "漢字とカタカナ"];
            for (i, t) in text.iter().enumerate() {
                let ids = r.tok.encode(t, false)?;
                let mut bytes = vec![i as u8 & 1];
                bytes.extend(ids.iter().flat_map(|&id| (id as u16).to_le_bytes()));
                out.push((format!("text-{i}.bin"), bytes));
            }
            // Byte-fallback tokens of a three-byte character, split: <0xE3><0x81><0x82> (あ).
            let bytes: Vec<u8> = [0u8]
                .into_iter()
                .chain([0xE3u16 + 8, 0x81 + 8, 0x82 + 8].iter().flat_map(|v| v.to_le_bytes()))
                .collect();
            out.push(("bytes-a.bin".into(), bytes));
        }
        "image" => {}
        other => anyhow::bail!("unknown fuzz target {other}"),
    }
    Ok(out)
}
