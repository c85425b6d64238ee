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
        assert_eq!(text, c["decoded_skip_special"].as_str().unwrap(), "{}: streamed text", c["name"]);
    }
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
