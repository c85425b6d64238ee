//! A generated llm-jp-style tokenizer for synthetic checkpoints: a SentencePiece Unigram `tokenizer.json` with
//! byte fallback (llm-jp v3's special pieces at ids 0-7, `<0x00>`..`<0xFF>` at 8-263), filled with Japanese and
//! ASCII pieces up to the requested size, plus Asagi's `<image>` and `<pad>` as added special tokens. Same
//! normalizer/decoder layout as transformers' conversion of a SentencePiece model.

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

const SPECIALS: &[&str] =
    &["<unk>", "<s>", "</s>", "<MASK|LLM-jp>", "<PAD|LLM-jp>", "<CLS|LLM-jp>", "<SEP|LLM-jp>", "<EOD|LLM-jp>"];

/// Base pieces: specials, bytes, `▁`, single characters, then pairs, until `n` pieces.
fn pieces(n: usize) -> Vec<String> {
    let mut out: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    out.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
    out.push("▁".into());
    let chars: Vec<char> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(['、', '。', '「', '」', '？', '！'])
        .chain((0x3041..=0x3096).filter_map(char::from_u32))
        .chain((0x30A1..=0x30FA).filter_map(char::from_u32))
        .chain((0x4E00..0x4E00 + 800).filter_map(char::from_u32))
        .collect();
    let mut seen: std::collections::HashSet<String> = out.iter().cloned().collect();
    let mut push = |s: String, out: &mut Vec<String>| {
        if out.len() < n && seen.insert(s.clone()) {
            out.push(s);
        }
    };
    for &c in &chars {
        push(c.to_string(), &mut out);
        push(format!("▁{c}"), &mut out);
    }
    'outer: for &a in &chars {
        for &b in &chars {
            if out.len() >= n {
                break 'outer;
            }
            push(format!("{a}{b}"), &mut out);
        }
    }
    out.truncate(n);
    out
}

fn added(id: usize, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json with `len` tokens in all.
pub fn write(dir: &Path, len: usize) -> Result<()> {
    let base = pieces(len - 2);
    let vocab: Vec<Value> =
        base.iter().enumerate().map(|(i, p)| json!([p, if i < 8 { 0.0 } else { -((i as f64) + 2.0).ln() }])).collect();
    let (image, pad) = (len - 2, len - 1);
    let mut added_tokens: Vec<Value> = SPECIALS.iter().enumerate().map(|(i, s)| added(i, s)).collect();
    added_tokens.push(added(image, "<image>"));
    added_tokens.push(added(pad, "<pad>"));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": true}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tokenizer)?)?;
    let decoder: serde_json::Map<String, Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| (i, *s))
        .chain([(image, "<image>"), (pad, "<pad>")])
        .map(|(i, s)| {
            (i.to_string(), json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}))
        })
        .collect();
    let config = json!({
        "add_bos_token": true, "add_eos_token": false, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<image>", "<pad>"],
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<PAD|LLM-jp>",
        "cls_token": "<CLS|LLM-jp>", "sep_token": "<SEP|LLM-jp>", "mask_token": "<MASK|LLM-jp>",
        "clean_up_tokenization_spaces": false, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    let map = json!({"additional_special_tokens": ["<image>", "<pad>"], "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<PAD|LLM-jp>", "cls_token": "<CLS|LLM-jp>", "sep_token": "<SEP|LLM-jp>",
        "mask_token": "<MASK|LLM-jp>"});
    std::fs::write(dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&map)?)?;
    Ok(())
}
