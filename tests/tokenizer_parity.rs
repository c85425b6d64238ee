//! The runtime's tokenizer (from the tokenizer.json the converter embeds in the GGUF) against HF's
//! PreTrainedTokenizerFast on every golden string: ids with and without BOS, and decoded text with and without
//! special tokens. Also the fallback for GGUFs without the embedded JSON, and the streaming decoder.

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::tokenizer::{Source, Tokenizer};
use common::fixtures;
use ggml::gguf::{GgufFile, GgufWriter};

fn cases() -> Vec<serde_json::Value> {
    let p = fixtures::root().join("golden/tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    fixtures::ids(v).iter().map(|&x| x as u32).collect()
}

/// The tokenizer of a converted fixture (it must come from the embedded tokenizer.json).
fn converted_tokenizer() -> Tokenizer {
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::F16);
    let (tok, source) = Tokenizer::from_gguf(&files.llm).unwrap();
    assert_eq!(source, Source::HuggingFaceJson);
    tok
}

#[test]
fn every_golden_string_tokenizes_and_decodes_like_hf() {
    let tok = converted_tokenizer();
    let cases = cases();
    assert!(cases.len() >= 30);
    for c in &cases {
        let (name, text) = (c["name"].as_str().unwrap(), c["text"].as_str().unwrap());
        assert_eq!(tok.encode(text, true).unwrap(), ids(&c["ids"]), "{name}: ids");
        assert_eq!(tok.encode(text, false).unwrap(), ids(&c["ids_no_special"]), "{name}: ids without BOS");
        assert_eq!(tok.decode(&ids(&c["ids"]), false).unwrap(), c["decoded"].as_str().unwrap(), "{name}: decode");
        assert_eq!(
            tok.decode(&ids(&c["ids"]), true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "{name}: decode, skip special"
        );
    }
}

#[test]
fn streaming_never_splits_a_character() {
    let tok = converted_tokenizer();
    for c in cases() {
        let ids = ids(&c["ids"]);
        let mut stream = tok.stream(true);
        let mut text = String::new();
        for &id in &ids {
            let piece = stream.push(id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}') || c["decoded_skip_special"].as_str().unwrap().contains('\u{FFFD}'),
                "{}: {piece:?}",
                c["name"]
            );
            text.push_str(&piece);
        }
        text.push_str(&stream.flush().unwrap());
        assert_eq!(text, stream.text());
        assert_eq!(text, c["decoded_skip_special"].as_str().unwrap(), "{}: streamed text", c["name"]);
    }
}

/// Byte-fallback tokens: an unfinished character is held until its last byte, and bytes that can no longer form
/// one are released at once as U+FFFD (a model looping on stray byte tokens still streams), the text equal to
/// decoding all ids.
#[test]
fn streaming_holds_only_unfinished_characters() {
    let tok = converted_tokenizer();
    let byte = |b: u8| tok.byte_token(b).unwrap_or_else(|| panic!("no byte token for {b:#04x}"));
    let (e3, x81, x82, x80) = (byte(0xE3), byte(0x81), byte(0x82), byte(0x80));
    let ids_of = |s: &str| tok.encode(s, false).unwrap();
    let mut ids = ids_of("日本");
    let mut stream = tok.stream(true);
    let mut pieces: Vec<String> = ids.iter().map(|&i| stream.push(i).unwrap()).collect();
    // あ = E3 81 82: nothing until the last byte, then the whole character.
    for (b, want) in [(e3, ""), (x81, ""), (x82, "あ")] {
        ids.push(b);
        let p = stream.push(b).unwrap();
        assert_eq!(p, want, "after byte {b}");
        pieces.push(p);
    }
    // Forty stray continuation bytes: each released as U+FFFD when it arrives.
    for _ in 0..40 {
        ids.push(x80);
        let p = stream.push(x80).unwrap();
        assert_eq!(p, "\u{FFFD}");
        pieces.push(p);
    }
    for &i in &ids_of("です") {
        ids.push(i);
        pieces.push(stream.push(i).unwrap());
    }
    pieces.push(stream.flush().unwrap());
    let whole = tok.decode(&ids, true).unwrap();
    // HF decodes the run あ + 40 stray bytes as one invalid run (U+FFFD per byte); the stream had released あ.
    assert_eq!(pieces.concat(), whole.replacen("\u{FFFD}\u{FFFD}\u{FFFD}", "あ", 1), "{whole:?}");
}

/// A GGUF without tokenizer.huggingface.json (as llama.cpp's converter writes them) still tokenizes: the Unigram
/// model is rebuilt from the vocabulary, and on these strings it gives HF's ids.
#[test]
fn gguf_without_the_hf_json_falls_back_to_its_vocabulary() {
    let out = tempfile::tempdir().unwrap();
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::F16);
    let src = &files.llm;
    let mut w = GgufWriter::new(1).unwrap();
    for k in src.keys().iter().filter(|k| k.starts_with("tokenizer.") && *k != "tokenizer.huggingface.json") {
        w.set(k, src.get(k).unwrap()).unwrap();
    }
    w.add_tensor("dummy", ggml::Type::F32, &[1]).unwrap();
    let path = out.path().join("vocab-only.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    w.write(&mut f, |_, _, sink| std::io::Write::write_all(sink, &[0u8; 4])).unwrap();
    drop(f);
    let (tok, source) = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(source, Source::RebuiltFromVocab);
    let (mut same, mut n) = (0, 0);
    for c in cases() {
        n += 1;
        same += (tok.encode(c["text"].as_str().unwrap(), true).unwrap() == ids(&c["ids"])) as usize;
    }
    eprintln!("rebuilt tokenizer: {same}/{n} golden strings give HF's ids");
    assert_eq!(same, n, "the rebuilt Unigram tokenizer differs from HF");
}
