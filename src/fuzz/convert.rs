//! Target `convert`: a checkpoint folder as the converter reads it (safetensors headers and data,
//! model.safetensors.index.json, config.json, tokenizer.json and the other JSON files), packed in one input.
//!
//! Input: a flag byte (bits 0-1: the language model's type, bit 2: the mmproj's), then records
//! `[name length: u8][name][data length: u32 LE][data]`. Names are the file names a checkpoint has
//! (`ARCHIVE_NAMES`); records with other names are skipped, so nothing is written outside the scratch folder.
//!
//! Oracle: a conversion that succeeds writes two files the runtime loads and runs (as the `gguf` target checks).

use asagi_convert::{LlmType, MmprojType};

use super::gguf::check_runs;
use super::reference::convert;
use super::Fuzzer;

/// The files of a checkpoint folder a record may write.
pub const ARCHIVE_NAMES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// Output types by the flag byte: the cheap and the block-quantized paths (K-quants fall back on narrow rows).
fn types(flags: u8) -> (LlmType, MmprojType) {
    let llm = [LlmType::F16, LlmType::Q8_0, LlmType::Q4_0, LlmType::Q4KM][(flags & 3) as usize];
    let mm = if flags & 4 == 0 { MmprojType::F16 } else { MmprojType::Q8_0 };
    (llm, mm)
}

/// Packs `files` as the target reads them.
pub fn archive(flags: u8, files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![flags];
    for (name, data) in files {
        out.push(name.len() as u8);
        out.extend(name.as_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
    }
    out
}

/// The records of an input; a truncated record ends it.
fn unpack(mut data: &[u8]) -> Vec<(&'static str, &[u8])> {
    let mut out = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let Some((name, rest)) = rest.split_at_checked(n as usize) else { break };
        let Some((len, rest)) = rest.split_at_checked(4) else { break };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some((body, rest)) = rest.split_at_checked(len.min(rest.len())) else { break };
        if let Some(known) = ARCHIVE_NAMES.iter().find(|k| k.as_bytes() == name) {
            out.push((*known, body));
        }
        data = rest;
    }
    out
}

impl Fuzzer {
    pub fn convert(&self, data: &[u8]) -> bool {
        let Some((&flags, records)) = data.split_first() else { return false };
        let dir = self.path("checkpoint");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder writable");
        for (name, body) in unpack(records) {
            std::fs::write(dir.join(name), body).expect("scratch folder writable");
        }
        let (llm, mm) = types(flags);
        let (llm_out, mm_out) = (self.path("out-llm.gguf"), self.path("out-mmproj.gguf"));
        let _ = std::fs::remove_file(&llm_out);
        let _ = std::fs::remove_file(&mm_out);
        if convert(&dir, llm, mm, &llm_out, &mm_out).is_err() {
            return false;
        }
        if let Err(e) = check_runs(&llm_out, Some(&mm_out)) {
            panic!("the converter accepted the checkpoint, but the runtime refuses its output: {e:#}");
        }
        true
    }
}
