//! Image + text prompts end to end against HF transformers 4.45.1: image files preprocessed and encoded, spliced
//! at the `<image>` tokens (one and two images), logits at every position and greedy continuations.

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::llm::{LlamaModel, Session, SessionParams};
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use asagi_gguf::{generate, multimodal};
use common::fixtures;
use ggml::{Backend, Type};

struct Run {
    logits: Vec<f32>,
    n_vocab: usize,
    greedy: Vec<u32>,
}

fn run(variant: &str, ty: LlmType, mm: MmprojType, cache: Type, prompt: &str, n_greedy: usize) -> Run {
    let g = fixtures::goldens(variant);
    let p = &g["prompts"][prompt];
    let ids: Vec<u32> = fixtures::ids(&p["input_ids"]).iter().map(|&x| x as u32).collect();
    let files = common::conversion::converted(variant, ty, mm);
    let (model, vmodel) = (LlamaModel::load(&files.llm).unwrap(), VisionModel::load(&files.mmproj).unwrap());
    let backend = Backend::cpu(2).unwrap();
    let mut enc = VisionEncoder::new(&vmodel, &[&backend]).unwrap();
    let images: Vec<_> = p["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| enc.encode_file(&fixtures::root().join("images").join(name.as_str().unwrap())).unwrap())
        .collect();
    let mut s = Session::new(
        &model,
        &[&backend],
        &SessionParams { n_ctx: 256, n_ubatch: 64, cache_type: cache, ..Default::default() },
    )
    .unwrap();
    let segs = multimodal::segments(&ids, Some(g["image_token_id"].as_u64().unwrap() as u32), &images).unwrap();
    let (logits, pos) = multimodal::prefill(&mut s, &segs, 0, true).unwrap();
    assert_eq!(pos as u64, p["expanded_length"].as_u64().unwrap(), "{variant} {prompt}: expanded length");
    let v = model.hp.n_vocab;
    let last = logits[logits.len() - v..].to_vec();
    let greedy = generate::greedy(&mut s, last, pos, n_greedy, &[2], |_| Ok(())).unwrap();
    Run { logits, n_vocab: v, greedy }
}

fn hf_greedy(variant: &str, case: &str) -> Vec<u32> {
    let g = fixtures::goldens(variant);
    let mut t: Vec<u32> = fixtures::ids(&g["generate"][case]["new_tokens"][0]).iter().map(|&x| x as u32).collect();
    if let Some(e) = t.iter().position(|&x| x == 2) {
        t.truncate(e + 1);
    }
    t
}

/// Max |ours - HF| over every position and vocabulary entry, relative to max |HF|; the widths must agree.
fn rel_max_err(r: &Run, hf: &common::npy::Npy) -> f64 {
    let (n, hv) = (hf.shape[0], hf.shape[1]);
    assert_eq!(r.n_vocab, hv, "our vocabulary and HF's logits have different widths");
    assert_eq!(r.logits.len(), n * hv, "positions");
    let scale = hf.data.iter().fold(0f64, |m, x| m.max(x.abs()));
    r.logits.iter().zip(&hf.data).map(|(&o, &h)| (o as f64 - h).abs()).fold(0.0, f64::max) / scale
}

/// F32 files and cache: HF's float32 math up to summation order (measured: see the README's table). F16 files,
/// mmproj and cache: 11-bit rounding of weights, image embeddings and K/V.
const F32_BOUND: f64 = 2e-6;
const F16_BOUND: f64 = 2e-3;

#[test]
fn image_prompts_match_hf_logits_and_greedy() {
    for variant in fixtures::VARIANTS {
        for (prompt, case) in [("img1", "greedy_img1"), ("img2", "greedy_img2")] {
            let want = hf_greedy(variant, case);
            let hf = common::npy::read(&fixtures::root().join(format!("golden/{variant}/logits/{prompt}.npy")));
            let r = run(variant, LlmType::F32, MmprojType::F32, Type::F32, prompt, want.len());
            let err = rel_max_err(&r, &hf);
            eprintln!("{variant} {prompt} f32: logits max|ours-HF|/max|HF| = {err:.2e}");
            assert!(err <= F32_BOUND, "{variant} {prompt}: logits error {err:.2e} > {F32_BOUND:.0e}");
            assert_eq!(r.greedy, want, "{variant} {prompt} f32: greedy differs from HF");
            let r16 = run(variant, LlmType::F16, MmprojType::F16, Type::F16, prompt, want.len());
            let err = rel_max_err(&r16, &hf);
            eprintln!("{variant} {prompt} f16: logits max|ours-HF|/max|HF| = {err:.2e}");
            assert!(err <= F16_BOUND, "{variant} {prompt} f16: logits error {err:.2e} > {F16_BOUND:.0e}");
            assert_eq!(r16.greedy, want, "{variant} {prompt} f16: greedy differs from HF");
        }
    }
}

#[test]
fn image_count_mismatch_is_an_error() {
    let img = asagi_gguf::vision::ImageEmbedding { data: vec![0.0; 4].into(), n_tokens: 1, features: vec![] };
    let err = multimodal::segments(&[1, 7, 9, 7], Some(7), std::slice::from_ref(&img)).err().unwrap().to_string();
    assert!(err.contains("2 <image> token(s) but 1 image(s)"), "{err}");
    let segs = multimodal::segments(&[1, 7, 9], Some(7), std::slice::from_ref(&img)).unwrap();
    assert_eq!(segs.len(), 3);
}
