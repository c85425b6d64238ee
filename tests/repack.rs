//! Weights repacked for the CPU's interleaved kernels (`asagi_gguf::weights`, on by default in `run`) give the
//! results of the same weights used in place from the mapped file, for the language model and the vision tower.

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::llm::{Input, LlamaModel, Session, SessionParams};
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use asagi_gguf::weights;
use common::fixtures;
use ggml::{Backend, BufferType, Type};

/// This CPU has a repack buffer type (every x86-64 with AVX2 and every ARM with dot products does).
fn repack_available() -> bool {
    BufferType::cpu_extra().iter().any(|b| b.name() == "CPU_REPACK")
}

/// max |a - b| / max |a|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / scale
}

#[test]
fn repacked_language_model_matches_mapped() {
    let files = common::conversion::converted("base-default-f32", LlmType::Q4_0, MmprojType::F16);
    let placed = weights::place(&files.llm, None, true, asagi_gguf::llm::is_matmul_weight).unwrap();
    if repack_available() {
        let (_, n, _) = placed.repacked.iter().find(|r| r.0 == "CPU_REPACK").expect("Q4_0 matrices repacked");
        // 2 layers x 7 matrices, all Q4_0 with rows in multiples of 8; not the embeddings, not the 1202-row output.
        assert!(*n >= 14, "{n} tensors repacked");
    }
    let g = fixtures::goldens("base-default-f32");
    let prompt: Vec<u32> = fixtures::ids(&g["prompts"]["text"]["input_ids"]).iter().map(|&x| x as u32).collect();
    let backend = Backend::cpu(2).unwrap();
    // Micro-batches of 5 rows: the 4-row kernels and the 1-row ones both run.
    let params = SessionParams { n_ctx: 128, n_ubatch: 5, cache_type: Type::F32 };
    let logits = |model: &LlamaModel| {
        Session::new(model, &[&backend], &params).unwrap().prefill(Input::Tokens(&prompt), 0, 0, true).unwrap()
    };
    let mapped = logits(&LlamaModel::load(&files.llm).unwrap());
    let repacked = logits(&LlamaModel::load_with(&files.llm, &placed.contexts).unwrap());
    // Same quantized weights, other kernels: another summation order, and the activations' 8-bit rounding done by
    // a SIMD routine (ties to even) instead of the scalar one. The two must differ far less than either differs
    // from HF's float32 logits (the Q4_0 quantization error, ~7e-2 here); a wrong layout would differ by ~1.
    let hf = common::npy::read(&fixtures::root().join("golden/base-default-f32/logits/text.npy"));
    let hf: Vec<f32> = hf.data.iter().map(|&x| x as f32).collect();
    let (e, e_mapped, e_repacked) = (rel(&mapped, &repacked), rel(&hf, &mapped), rel(&hf, &repacked));
    eprintln!("repacked vs mapped {e:.2e}; vs HF: mapped {e_mapped:.2e}, repacked {e_repacked:.2e}");
    assert!(e < 0.05 * e_mapped, "repacked vs mapped logits: {e:.2e} (quantization error {e_mapped:.2e})");
    assert!(e_repacked < 1.05 * e_mapped, "repacked is further from HF: {e_repacked:.2e} vs {e_mapped:.2e}");
    // Reading a repacked weight back is refused, not undefined.
    let t = placed.contexts.iter().find_map(|c| c.get_tensor("blk.0.attn_q.weight"));
    if let (Some(t), true) = (t, repack_available()) {
        let owner = placed.contexts.iter().find(|c| c.get_tensor("blk.0.attn_q.weight").is_some()).unwrap();
        assert!(owner.read::<u8>(t).is_err());
    }
}

#[test]
fn repacked_vision_tower_matches_mapped() {
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::Q4_0);
    let placed = weights::place(&files.mmproj, None, true, asagi_gguf::vision::is_matmul_weight).unwrap();
    if repack_available() {
        assert!(!placed.repacked.is_empty(), "Q4_0 vision matrices repacked");
    }
    let backend = Backend::cpu(2).unwrap();
    let px = common::npy::read(&fixtures::root().join("golden/preprocess/s56/rgb_80x60.png.pixel_values.npy")).as_f32();
    let encode = |model: &VisionModel| {
        VisionEncoder::new(model, &[&backend]).unwrap().encode_pixels(&px, 1).unwrap().pop().unwrap().data
    };
    let mapped = encode(&VisionModel::load(&files.mmproj).unwrap());
    let repacked = encode(&VisionModel::load_with(&files.mmproj, &placed.contexts).unwrap());
    let e = rel(&mapped, &repacked);
    assert!(e < 1e-4, "repacked vs mapped image embeddings: {e:.2e}");
}
