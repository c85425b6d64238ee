//! Generation end to end against HF transformers 4.45.1's `generate()` goldens: beam search (num_beams 3 and 5,
//! repetition_penalty 1.5, length_penalty 1.0 and 0.6, num_return_sequences 2) and greedy, on prompts with no,
//! one and two images, every variant: identical tokens and the same sequence scores.

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::generate;
use asagi_gguf::llm::{LlamaModel, Session, SessionParams};
use asagi_gguf::multimodal;
use asagi_gguf::sampling::GenerationConfig;
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use common::fixtures;
use ggml::{Backend, Type};

#[test]
fn beam_search_and_greedy_match_hf_generate() {
    for variant in fixtures::VARIANTS {
        let g = fixtures::goldens(variant);
        let files = common::conversion::converted(variant, LlmType::F32, MmprojType::F32);
        let (model, vmodel) = (LlamaModel::load(&files.llm).unwrap(), VisionModel::load(&files.mmproj).unwrap());
        let backend = Backend::cpu(2).unwrap();
        let mut enc = VisionEncoder::new(&vmodel, &[&backend]).unwrap();
        let image_token = g["image_token_id"].as_u64().unwrap() as u32;
        let mut n_cases = 0;
        for (name, case) in g["generate"].as_object().unwrap() {
            let p = &case["params"];
            if p["do_sample"].as_bool().unwrap() {
                continue;
            }
            let prompt = &g["prompts"][case["prompt"].as_str().unwrap()];
            let ids: Vec<u32> = fixtures::ids(&prompt["input_ids"]).iter().map(|&x| x as u32).collect();
            let images: Vec<_> = prompt["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| enc.encode_file(&fixtures::root().join("images").join(f.as_str().unwrap())).unwrap())
                .collect();
            let cfg = GenerationConfig {
                max_new_tokens: Some(p["max_new_tokens"].as_u64().unwrap() as usize),
                num_beams: p["num_beams"].as_u64().unwrap() as usize,
                repetition_penalty: p.get("repetition_penalty").and_then(|v| v.as_f64()).unwrap_or(1.0),
                length_penalty: p.get("length_penalty").and_then(|v| v.as_f64()).unwrap_or(1.0),
                num_return_sequences: p.get("num_return_sequences").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
                eos_token_ids: vec![2],
                pad_token_id: g["pad_token_id"].as_u64().map(|x| x as u32),
                ..Default::default()
            };
            let mut s = Session::new(
                &model,
                &[&backend],
                &SessionParams { n_ctx: 512, n_ubatch: 64, cache_type: Type::F32, ..Default::default() },
            )
            .unwrap();
            let segs = multimodal::segments(&ids, Some(image_token), &images).unwrap();
            let (logits, pos) = multimodal::prefill(&mut s, &segs, 0, false).unwrap();
            let got = generate::generate(&mut s, &cfg, &ids, logits, pos, &Default::default(), |_| Ok(())).unwrap();

            let want = case["new_tokens"].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{variant} {name}: number of sequences");
            for (i, (gen, w)) in got.iter().zip(want).enumerate() {
                // HF's rows: the tokens, then the EOS (if any), then pad up to the longest row.
                let w: Vec<u32> = fixtures::ids(w).iter().map(|&x| x as u32).collect();
                let mut ours = gen.tokens.clone();
                ours.extend(gen.eos);
                assert_eq!(ours[..], w[..ours.len()], "{variant} {name} sequence {i}: tokens differ from HF");
                assert!(
                    w[ours.len()..].iter().all(|&t| Some(t) == cfg.pad_token()),
                    "{variant} {name} sequence {i}: HF has more tokens"
                );
                if let Some(score) = case["sequences_scores"].as_array().and_then(|s| s.get(i)).and_then(|v| v.as_f64())
                {
                    let ours = gen.score.unwrap();
                    assert!(
                        (ours - score).abs() <= 1e-4 * score.abs().max(1.0),
                        "{variant} {name} sequence {i}: score {ours} vs HF {score}"
                    );
                }
            }
            n_cases += 1;
        }
        assert!(n_cases >= 5, "{variant}: only {n_cases} deterministic cases");
    }
}
