//! The llama.cpp vocabulary (`tokenizer.ggml.*`) built from a Hugging Face Unigram `tokenizer.json`.
//!
//! llama.cpp's converter has no path for a tokenizer.json-only Unigram model, so this mirrors what it does for a
//! SentencePiece model (`_create_vocab_sentencepiece`): pieces and scores from the Unigram vocabulary, `<0xNN>`
//! pieces as BYTE, the unknown piece as UNKNOWN, added tokens as CONTROL (special) or USER_DEFINED with score
//! -1000, and `[PAD{i}]` UNUSED entries up to the embedding's row count. The exact HF tokenizer is embedded too
//! (`tokenizer.huggingface.json`), and asagi-gguf's runtime tokenizes with that.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::config::JsonFile;

/// `enum llama_token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// The vocabulary and special ids written to the language-model GGUF.
#[derive(Clone, Debug)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<TokenType>,
    /// Entries that the tokenizer really has (the rest pad up to the embedding rows).
    pub n_real: usize,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    /// tokenizer.json verbatim.
    pub hf_json: String,
}

impl Vocab {
    /// The id of a token string, if the vocabulary has it.
    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == token).map(|i| i as u32)
    }
}

fn is_byte_piece(p: &str) -> bool {
    p.len() == 6 && p.starts_with("<0x") && p.ends_with('>') && u8::from_str_radix(&p[3..5], 16).is_ok()
}

/// Reads tokenizer.json and tokenizer_config.json from `dir` and builds a vocabulary of `n_vocab` entries
/// (the embedding's row count).
pub fn read(dir: &Path, n_vocab: usize) -> Result<Vocab> {
    let tj = JsonFile::read(dir, "tokenizer.json")?;
    let tc = JsonFile::read_optional(dir, "tokenizer_config.json")?;
    let path = tj.path.display().to_string();
    let model_type = tj.str("model.type")?;
    if model_type != "Unigram" {
        bail!("{path}: model.type is {model_type:?}; Asagi's llm-jp-3 tokenizer is a SentencePiece Unigram model");
    }
    let byte_fallback = tj.bool_opt("model.byte_fallback")?.unwrap_or(false);
    let unk_id = tj.usize_opt("model.unk_id")?;
    let pieces =
        tj.get("model.vocab").and_then(Value::as_array).ok_or_else(|| anyhow!("{path}: missing key model.vocab"))?;

    let mut tokens = Vec::with_capacity(n_vocab);
    let mut scores = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for (i, entry) in pieces.iter().enumerate() {
        let (piece, score) = entry
            .as_array()
            .and_then(|a| Some((a.first()?.as_str()?, a.get(1)?.as_f64()?)))
            .ok_or_else(|| anyhow!("{path}: model.vocab[{i}] is not a [piece, score] pair"))?;
        tokens.push(piece.to_string());
        scores.push(score as f32);
        types.push(if Some(i) == unk_id {
            TokenType::Unknown
        } else if byte_fallback && is_byte_piece(piece) {
            TokenType::Byte
        } else {
            TokenType::Normal
        });
    }

    // Added tokens: those inside the Unigram vocabulary (<s>, </s>, ...) change type; the others (Asagi's <image>
    // and <pad>) extend it. Ids must continue without gaps.
    let added = tj.get("added_tokens").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut added: Vec<(usize, String, bool)> = added
        .iter()
        .map(|a| {
            let id = a.get("id").and_then(Value::as_u64).ok_or_else(|| anyhow!("{path}: an added token has no id"))?;
            let content = a
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("{path}: added token {id} has no content"))?;
            Ok((id as usize, content.to_string(), a.get("special").and_then(Value::as_bool).unwrap_or(false)))
        })
        .collect::<Result<_>>()?;
    added.sort();
    for (id, content, special) in added {
        let ty = if special { TokenType::Control } else { TokenType::UserDefined };
        if id < tokens.len() {
            if tokens[id] != content {
                bail!("{path}: added token {id} is {content:?} but the vocabulary has {:?} there", tokens[id]);
            }
            if types[id] != TokenType::Unknown {
                types[id] = ty;
            }
        } else if id == tokens.len() {
            tokens.push(content);
            scores.push(-1000.0);
            types.push(ty);
        } else {
            bail!("{path}: added token {content:?} has id {id}, leaving a gap after {}", tokens.len());
        }
    }
    let n_real = tokens.len();
    if n_real > n_vocab {
        bail!("{path}: the tokenizer has {n_real} tokens but the embedding only {n_vocab} rows");
    }
    for i in n_real..n_vocab {
        tokens.push(format!("[PAD{i}]"));
        scores.push(-10000.0);
        types.push(TokenType::Unused);
    }

    let id_of = |s: &str| tokens.iter().position(|t| t == s).map(|i| i as u32);
    let special = |key: &str| -> Result<Option<u32>> {
        let Some(tc) = &tc else { return Ok(None) };
        // Either a plain string or an AddedToken object {"content": ...}.
        let name =
            match tc.get(key) {
                None => return Ok(None),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.get("content").and_then(Value::as_str).map(String::from).ok_or_else(|| {
                    anyhow!("{}: key {key} is neither a string nor a token object", tc.path.display())
                })?,
            };
        id_of(&name).map(Some).ok_or_else(|| anyhow!("{}: {key} {name:?} is not in the vocabulary", tc.path.display()))
    };
    let bos = special("bos_token")?;
    let eos = special("eos_token")?;
    let unk = special("unk_token")?.or(unk_id.map(|u| u as u32));
    let flag = |key: &str, default: bool| -> Result<bool> {
        Ok(match &tc {
            Some(tc) => tc.bool_opt(key)?.unwrap_or(default),
            None => default,
        })
    };
    let add_bos = flag("add_bos_token", true)?;
    let add_eos = flag("add_eos_token", false)?;

    Ok(Vocab {
        tokens,
        scores,
        types,
        n_real,
        bos,
        eos,
        unk,
        add_bos,
        add_eos,
        add_space_prefix: adds_space_prefix(&tj.value),
        hf_json: {
            let text = std::fs::read_to_string(&tj.path)?;
            // Embedded verbatim and loaded by the runtime with this function: what it cannot load is refused now.
            hf_tokenizer(text.as_bytes()).with_context(|| format!("{path}: not a tokenizer the runtime can load"))?;
            text
        },
    })
}

/// Whether the tokenizer puts `▁` before the text (SentencePiece `add_dummy_prefix`): a `Prepend("▁")` normalizer
/// (transformers' legacy conversion) or a `Metaspace` pre-tokenizer whose prepend scheme is not "never".
fn adds_space_prefix(tj: &Value) -> bool {
    fn walk(v: &Value, f: &dyn Fn(&Value) -> bool) -> bool {
        f(v) || v
            .get("normalizers")
            .or(v.get("pretokenizers"))
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| walk(x, f)))
    }
    let prepend = |v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("Prepend")
            && v.get("prepend").and_then(Value::as_str) == Some("▁")
    };
    let metaspace = |v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("Metaspace")
            && v.get("prepend_scheme").and_then(Value::as_str).unwrap_or("always") != "never"
            && v.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true)
    };
    tj.get("normalizer").is_some_and(|n| walk(n, &prepend))
        || tj.get("pre_tokenizer").is_some_and(|p| walk(p, &metaspace))
}

/// A Hugging Face tokenizer from its tokenizer.json bytes, as the runtime loads the one embedded in a GGUF.
///
/// Checked first: the JSON syntax (tokenizers 0.22 panics, `expect("Helper")` in its decoder's deserializer, on a
/// syntax error inside the `decoder` object, where it should return an error), and that a Unigram model has an
/// unknown token (without one, text with a character outside the vocabulary cannot be tokenized at all: every
/// request holding one would fail). Both found by the `convert` fuzz target.
pub fn hf_tokenizer(json: &[u8]) -> Result<tokenizers::Tokenizer> {
    let v: Value = serde_json::from_slice(json).map_err(|e| anyhow!("not valid JSON: {e}"))?;
    if v.pointer("/model/type").and_then(Value::as_str) == Some("Unigram")
        && v.pointer("/model/unk_id").and_then(Value::as_u64).is_none()
    {
        bail!("model.unk_id is missing: a SentencePiece Unigram tokenizer needs an unknown token (llm-jp-3's is <unk>, id 0)");
    }
    tokenizers::Tokenizer::from_bytes(json).map_err(|e| anyhow!("{e}"))
}
