//! The tokenizer: Hugging Face's `tokenizers` over the tokenizer.json the converter embeds in the GGUF
//! (`tokenizer.huggingface.json`), so ids are exactly HF's. GGUFs made by other converters (llama.cpp's) have no
//! such key: then the same Unigram tokenizer is rebuilt from the GGUF vocabulary (pieces and scores), with a
//! warning, since normalization details of the original may differ.

use anyhow::{anyhow, bail, Result};
use ggml::gguf::{Array, GgufFile, Value};
use serde_json::json;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids that end generation: `</s>` and Asagi's `<pad>` (which the model learned to emit after an answer).
    pub eog: Vec<u32>,
    pub bos: Option<u32>,
    /// The `<image>` token, if the vocabulary has it.
    pub image: Option<u32>,
    n_vocab: usize,
    special: Vec<bool>,
    /// The byte of each byte-fallback token (`<0xE3>`), for streaming.
    byte: Vec<Option<u8>>,
}

/// Where the tokenizer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    HuggingFaceJson,
    RebuiltFromVocab,
}

fn id_key(f: &GgufFile, k: &str) -> Option<u32> {
    match f.get(k) {
        Some(Value::U32(v)) => Some(v),
        Some(Value::I32(v)) if v >= 0 => Some(v as u32),
        _ => None,
    }
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<(Tokenizer, Source)> {
        let tokens = match f.get("tokenizer.ggml.tokens") {
            Some(Value::Array(Array::Str(t))) => t,
            _ => bail!("{}: missing key tokenizer.ggml.tokens", f.path().display()),
        };
        let types = match f.get("tokenizer.ggml.token_type") {
            Some(Value::Array(Array::I32(t))) if t.len() == tokens.len() => t,
            _ => vec![1; tokens.len()],
        };
        let (inner, source) = match f.get("tokenizer.huggingface.json") {
            Some(Value::Str(json)) => (
                asagi_convert::vocab::hf_tokenizer(json.as_bytes())
                    .map_err(|e| anyhow!("{}: tokenizer.huggingface.json: {e:#}", f.path().display()))?,
                Source::HuggingFaceJson,
            ),
            _ => (rebuild(f, &tokens, &types)?, Source::RebuiltFromVocab),
        };
        let find = |s: &str| tokens.iter().position(|t| t == s).map(|i| i as u32);
        let mut eog: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id_key(f, k))
            .collect();
        eog.extend(find("<pad>"));
        eog.sort();
        eog.dedup();
        Ok((
            Tokenizer {
                inner,
                eog,
                bos: id_key(f, "tokenizer.ggml.bos_token_id"),
                image: id_key(f, "asagi.image_token_id").or_else(|| find("<image>")),
                n_vocab: tokens.len(),
                special: types.iter().map(|&t| t == 3 || t == 5).collect(),
                byte: tokens.iter().map(|t| byte_piece(t)).collect(),
            },
            source,
        ))
    }

    /// Token ids of `text`; with `add_special`, BOS as the tokenizer's post-processor says (HF's default).
    /// Special tokens written in the text (`<image>`) are recognized.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` as it would be tokenized following earlier text (a conversation's next turn): no BOS,
    /// and no word-start marker in front (SentencePiece-style tokenizers prepend `▁` to every input they see,
    /// which HF, tokenizing the whole conversation at once, would not do mid-text). Done by tokenizing behind an
    /// anchor character and removing the anchor's tokens; if the anchor merged with the text (its tokens are not
    /// a prefix), plain `encode`.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        const ANCHOR: &str = "。";
        let anchor = self.encode(ANCHOR, false)?;
        let ids = self.encode(&format!("{ANCHOR}{text}"), false)?;
        match ids.strip_prefix(anchor.as_slice()) {
            Some(rest) => Ok(rest.to_vec()),
            None => self.encode(text, false),
        }
    }

    /// Text of `ids` (byte-fallback pieces joined into UTF-8), skipping special tokens if asked.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// True for control tokens (`<s>`, `</s>`, `<image>`, `<pad>`...) and unused padding entries.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// The byte of a byte-fallback token (`<0xE3>` -> 0xE3); `None` for any other id.
    pub fn byte_of(&self, id: u32) -> Option<u8> {
        self.byte.get(id as usize).copied().flatten()
    }

    /// The byte-fallback token of byte `b` (`<0xE3>`), if the vocabulary has one.
    pub fn byte_token(&self, b: u8) -> Option<u32> {
        self.byte.iter().position(|&x| x == Some(b)).map(|i| i as u32)
    }

    /// A decoder for streaming: `push` returns text only once it is complete UTF-8.
    pub fn stream(&self, skip_special: bool) -> StreamDecoder<'_> {
        // A plain token to decode in front of a window that does not start the answer: SentencePiece's decoder
        // strips the first space of what it decodes, which is right at the start of an answer only.
        let anchor = self.encode("a", false).ok().and_then(|ids| ids.first().copied()).filter(|&a| !self.is_special(a));
        // Decoded once here, not at every step.
        let anchor = anchor.and_then(|a| Some((a, self.decode(&[a], skip_special).ok()?)));
        StreamDecoder {
            tok: self,
            anchor,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            first_text: None,
            emitted: String::new(),
            skip_special,
        }
    }
}

/// `<0xE3>` -> 0xE3: SentencePiece's byte-fallback pieces.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() == 2 {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

/// Incremental decoding, append-only, in the way of text-generation-inference's `decode_token`: each step decodes
/// a short window (the tokens released by the previous step, then the new ones) and releases what the new tokens
/// add to the window's text. The window, not the whole answer: decoding is O(window) per token, and a rewrite of
/// earlier text cannot stall the stream. Held back: a trailing run of byte-fallback tokens whose bytes end in an
/// unfinished UTF-8 character (the tokenizer decodes them to U+FFFD until the character completes). A run that is
/// already invalid UTF-8 is released as the tokenizer decodes it (U+FFFD per byte), or a model that loops on stray
/// byte tokens would stream nothing.
///
/// The one divergence from decoding all ids at once: HF's ByteFallback decodes each run of byte tokens as a whole,
/// so a run that was valid (and was released) and later turns invalid becomes U+FFFD per byte in a whole decode;
/// released text is never taken back, so the stream keeps the earlier characters and continues after them.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    /// A plain token and its text.
    anchor: Option<(u32, String)>,
    ids: Vec<u32>,
    /// The window is `ids[prefix..]`; `ids[prefix..read]` were released by the previous step.
    prefix: usize,
    read: usize,
    /// The first id that decodes to something (not skipped as special or out of the vocabulary): the decoder
    /// strips the first space of the text there, and nowhere after.
    first_text: Option<usize>,
    emitted: String,
    skip_special: bool,
}

impl StreamDecoder<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        if self.first_text.is_none() && self.adds_text(id)? {
            self.first_text = Some(self.ids.len() - 1);
        }
        if self.unfinished_character() {
            return Ok(String::new());
        }
        self.release()
    }

    /// The end of the sequence: what `push` held back (an unfinished character, decoded as the tokenizer does,
    /// with U+FFFD).
    pub fn flush(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        self.release()
    }

    /// Everything released so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Releases what `ids[read..]` add to the window's text.
    fn release(&mut self) -> Result<String> {
        let before = self.decode(self.prefix, self.read)?;
        let after = self.decode(self.prefix, self.ids.len())?;
        let new = match after.strip_prefix(&before) {
            Some(new) => new.to_string(),
            // The window's earlier text decodes differently now (see the type's comment): the new tokens' own text.
            None => self.decode(self.read, self.ids.len())?,
        };
        (self.prefix, self.read) = (self.read, self.ids.len());
        self.emitted.push_str(&new);
        Ok(new)
    }

    /// The text of `ids[from..to]` as it reads inside the answer: with the anchor in front, then cut off, once the
    /// text has started before `from` (up to there, the decoder's strip of the first space is wanted; a lone `▁`
    /// starts the text though it decodes to nothing).
    fn decode(&self, from: usize, to: usize) -> Result<String> {
        let skip = self.skip_special;
        match self.anchor.as_ref().filter(|_| self.first_text.is_some_and(|i| i < from)) {
            None => self.tok.decode(&self.ids[from..to], skip),
            Some((a, head)) => {
                let ids: Vec<u32> = std::iter::once(*a).chain(self.ids[from..to].iter().copied()).collect();
                let text = self.tok.decode(&ids, skip)?;
                Ok(text.strip_prefix(head.as_str()).map(str::to_string).unwrap_or(text))
            }
        }
    }

    /// Whether `id` decodes to anything (a lone `▁` does, as a space), as the tokenizer decodes it: skipped
    /// special tokens (HF's list, which is not the GGUF's token types) and ids outside the vocabulary do not.
    fn adds_text(&self, id: u32) -> Result<bool> {
        Ok(match &self.anchor {
            Some((a, head)) => self.tok.decode(&[*a, id], self.skip_special)? != *head,
            None => (id as usize) < self.tok.n_vocab && !(self.skip_special && self.tok.is_special(id)),
        })
    }

    /// Whether the ids end in byte tokens whose bytes are valid UTF-8 up to a character that needs more bytes.
    fn unfinished_character(&self) -> bool {
        let n = self.ids.iter().rev().take_while(|&&i| self.byte_of(i).is_some()).count();
        if n == 0 {
            return false;
        }
        let run: Vec<u8> = self.ids[self.ids.len() - n..].iter().filter_map(|&i| self.byte_of(i)).collect();
        matches!(std::str::from_utf8(&run), Err(e) if e.error_len().is_none())
    }

    fn byte_of(&self, id: u32) -> Option<u8> {
        self.tok.byte.get(id as usize).copied().flatten()
    }
}

/// A Unigram tokenizer.json equivalent to a GGUF "llama" (SentencePiece) vocabulary.
fn rebuild(f: &GgufFile, tokens: &[String], types: &[i32]) -> Result<tokenizers::Tokenizer> {
    eprintln!(
        "warning: {} has no tokenizer.huggingface.json; rebuilding a Unigram tokenizer from its vocabulary (ids may \
         differ from Hugging Face's on unusual text)",
        f.path().display()
    );
    let scores = match f.get("tokenizer.ggml.scores") {
        Some(Value::Array(Array::F32(s))) if s.len() == tokens.len() => s,
        _ => vec![0.0; tokens.len()],
    };
    let model = f.str("tokenizer.ggml.model").unwrap_or_default();
    if model != "llama" {
        bail!(
            "{}: tokenizer.ggml.model is {model:?}; only SentencePiece (\"llama\") vocabularies can be rebuilt",
            f.path().display()
        );
    }
    let unk = id_key(f, "tokenizer.ggml.unknown_token_id").unwrap_or(0);
    let bos = id_key(f, "tokenizer.ggml.bos_token_id");
    let add_bos = matches!(f.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)) | None);
    let prefix = !matches!(f.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false)));
    let vocab: Vec<serde_json::Value> = tokens.iter().zip(&scores).map(|(t, s)| json!([t, s])).collect();
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": t == 3}))
        .collect();
    let mut normalizers = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})];
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "▁"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let bt = &tokens[b as usize];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bt.clone(): {"id": bt, "ids": [b], "tokens": [bt]}}})
        }
        _ => serde_json::Value::Null,
    };
    let j = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null, "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": true}
    });
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&j)?)
        .map_err(|e| anyhow!("{}: rebuilding the tokenizer: {e}", f.path().display()))
}
