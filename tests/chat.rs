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
    let params = SessionParams { n_ctx: 512, n_ubatch: 64, cache_type: Type::F32, ..Default::default() };
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
    let params = SessionParams { n_ctx: 256, n_ubatch: 64, cache_type: Type::F16, ..Default::default() };
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

/// A long conversation driven to the edge of a small context with beam search: every turn is checked up front
/// against the cells it may need (its prompt + num_beams x max_new_tokens: every beam step takes a cell per beam),
/// so a turn that fits never fails half-way, the first that could overflow is refused with a message naming the
/// beams and the limit, the conversation is left as it was, and a smaller answer still fits.
#[test]
fn a_long_chat_is_refused_up_front_at_the_edge_of_the_context() {
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::F16);
    let model = LlamaModel::load(&files.llm).unwrap();
    let (tok, _) = Tokenizer::from_gguf(&files.llm).unwrap();
    let backend = Backend::cpu(2).unwrap();
    let n_ctx = 256;
    let params = SessionParams { n_ctx, n_ubatch: 64, cache_type: Type::F16, ..Default::default() };
    let mut session = Session::new(&model, &[&backend], &params).unwrap();
    let mut conv = Conversation::new(&mut session);
    // eos_token_ids empty: every answer takes its full length, so the turns march towards the edge.
    let beams = GenerationConfig { max_new_tokens: Some(8), num_beams: 3, eos_token_ids: vec![], ..Default::default() };
    let no_stop = AtomicBool::new(false);
    let mut turns = 0;
    let refusal = loop {
        let ids = conv.turn_ids(&tok, "もう一度説明して", 0).unwrap();
        let (before, history) = (conv.n_past(), conv.history().len());
        let needed = before + ids.len() + beams.num_beams * 8;
        match conv.ask(&ids, tok.image, &[], &beams, &no_stop, |_| Ok(())) {
            Ok(a) => {
                assert!(needed <= n_ctx, "turn {turns} needed {needed} cells of {n_ctx} and was accepted");
                assert_eq!(a.answer.tokens.len(), 8);
                turns += 1;
            }
            Err(e) => {
                assert!(needed > n_ctx, "turn {turns} needed only {needed} cells of {n_ctx} but was refused: {e:#}");
                assert_eq!((conv.n_past(), conv.history().len()), (before, history), "a refused turn changes nothing");
                break format!("{e:#}");
            }
        }
    };
    assert!(turns >= 5, "only {turns} turns fit");
    for part in ["3 beam(s) x -n 8", "exceed the context of 256 tokens", "/reset"] {
        assert!(refusal.contains(part), "{part:?} missing from: {refusal}");
    }
    // Greedy needs a cell per token, not three: an answer that fills the context to its last cell is accepted.
    let ids = conv.turn_ids(&tok, "もう一度説明して", 0).unwrap();
    let room = n_ctx - conv.n_past() - ids.len();
    if room > 0 {
        let greedy = GenerationConfig { num_beams: 1, max_new_tokens: Some(room), ..beams.clone() };
        let a = conv.ask(&ids, tok.image, &[], &greedy, &no_stop, |_| Ok(())).unwrap();
        assert_eq!(a.answer.tokens.len(), room);
        assert_eq!(conv.n_past(), n_ctx, "the context is full to its last cell");
    }
}
