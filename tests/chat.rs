//! Conversations keep the KV cache between turns: a turn computed on top of the kept cache (after an image turn
//! and a beam-search turn) gives what prefilling the whole conversation from scratch gives.

mod common;

use std::sync::atomic::AtomicBool;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::chat::Conversation;
use asagi_gguf::llm::{LlamaModel, Session, SessionParams};
use asagi_gguf::sampling::GenerationConfig;
use asagi_gguf::tokenizer::Tokenizer;
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use asagi_gguf::{generate, multimodal};
use common::fixtures;
use ggml::{Backend, Type};

#[test]
fn follow_up_turns_equal_a_fresh_prefill_of_the_conversation() {
    let files = common::conversion::converted("base-default-f32", LlmType::F32, MmprojType::F32);
    let (model, vmodel) = (LlamaModel::load(&files.llm).unwrap(), VisionModel::load(&files.mmproj).unwrap());
    let (tok, _) = Tokenizer::from_gguf(&files.llm).unwrap();
    let backend = Backend::cpu(2).unwrap();
    let image = VisionEncoder::new(&vmodel, &[&backend])
        .unwrap()
        .encode_file(&fixtures::root().join("images/rgb_80x60.png"))
        .unwrap();
    let params = SessionParams { n_ctx: 512, n_ubatch: 64, cache_type: Type::F32 };
    let greedy = GenerationConfig { max_new_tokens: Some(6), eos_token_ids: tok.eog.clone(), ..Default::default() };
    let beams = GenerationConfig { num_beams: 3, repetition_penalty: 1.5, ..greedy.clone() };
    let no_stop = AtomicBool::new(false);

    let mut session = Session::new(&model, &[&backend], &params).unwrap();
    let mut conv = Conversation::new(&mut session);
    let images = std::slice::from_ref(&image);
    let t1 = conv.turn_ids(&tok, "この画像は何ですか", 1).unwrap();
    let a1 = conv.ask(&t1, tok.image, images, &greedy, &no_stop, |_| Ok(())).unwrap();
    assert_eq!(a1.n_past, 0);
    let t2 = conv.turn_ids(&tok, "色は", 0).unwrap();
    assert_ne!(t2[0], 1, "follow-ups have no BOS");
    let a2 = conv.ask(&t2, tok.image, &[], &beams, &no_stop, |_| Ok(())).unwrap();
    // Turn 2 started where turn 1's answer ended: the image's positions and both answers are kept.
    assert_eq!(a2.n_past, t1.len() - 1 + image.n_tokens + a1.answer.tokens.len());
    assert_eq!(a2.prompt_positions, t2.len());
    let t3 = conv.turn_ids(&tok, "もう一度", 0).unwrap();
    let a3 = conv.ask(&t3, tok.image, &[], &greedy, &no_stop, |_| Ok(())).unwrap();
    let history = conv.history().to_vec();
    assert_eq!(
        history.len(),
        t1.len() + a1.answer.tokens.len() + t2.len() + a2.answer.tokens.len() + t3.len() + a3.answer.tokens.len()
    );

    // From scratch: the whole conversation up to turn 3's question in one prefill, then greedy.
    let upto_t3 = &history[..history.len() - a3.answer.tokens.len()];
    let mut fresh = Session::new(&model, &[&backend], &params).unwrap();
    let segs = multimodal::segments(upto_t3, tok.image, images).unwrap();
    let (logits, pos) = multimodal::prefill(&mut fresh, &segs, 0, false).unwrap();
    let want = generate::generate(&mut fresh, &greedy, upto_t3, logits, pos, &no_stop, |_| Ok(())).unwrap();
    assert_eq!(a3.answer.tokens, want[0].tokens, "turn 3 on the kept cache vs a fresh prefill");
    assert!(!a3.answer.tokens.is_empty());

    // Streaming gives the answer's tokens, in order, for beams too.
    conv.reset();
    let mut streamed = Vec::new();
    let t = conv.turn_ids(&tok, "こんにちは", 0).unwrap();
    let a = conv.ask(&t, tok.image, &[], &beams, &no_stop, |id| Ok(streamed.push(id))).unwrap();
    assert_eq!(streamed, a.answer.tokens);
}

/// A set stop flag ends the answer at once, marked interrupted, and the conversation can go on.
#[test]
fn a_stopped_answer_is_marked_and_the_conversation_continues() {
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::F16);
    let model = LlamaModel::load(&files.llm).unwrap();
    let (tok, _) = Tokenizer::from_gguf(&files.llm).unwrap();
    let backend = Backend::cpu(2).unwrap();
    let params = SessionParams { n_ctx: 256, n_ubatch: 64, cache_type: Type::F16 };
    let mut session = Session::new(&model, &[&backend], &params).unwrap();
    let mut conv = Conversation::new(&mut session);
    for beams in [1, 3] {
        let cfg =
            GenerationConfig { max_new_tokens: Some(8), num_beams: beams, eos_token_ids: vec![], ..Default::default() };
        let ids = conv.turn_ids(&tok, "質問", 0).unwrap();
        let a = conv.ask(&ids, tok.image, &[], &cfg, &AtomicBool::new(true), |_| Ok(())).unwrap();
        assert!(a.answer.interrupted && a.answer.eos.is_none(), "{beams} beams");
        assert!(a.answer.tokens.len() <= 1, "{beams} beams: {:?}", a.answer.tokens);
        let next = conv.turn_ids(&tok, "続けて", 0).unwrap();
        let b = conv.ask(&next, tok.image, &[], &cfg, &AtomicBool::new(false), |_| Ok(())).unwrap();
        assert_eq!(b.answer.tokens.len(), 8);
        assert_eq!(b.n_past, conv.n_past() - next.len() - 8);
    }
}
