//! Weights repacked for the CPU's interleaved kernels (`asagi_gguf::weights`, on by default in `run`) give the
//! results of the same weights used in place from the mapped file, for the language model and the vision tower.

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::llm::{Input, LlamaModel, Session, SessionParams};
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use asagi_gguf::weights;
use common::fixtures;
use ggml::{Backend, BufferType, Context, Type};

/// The weight types ggml repacks on this CPU, asked of ggml itself (its CPU_REPACK buffer type, as llama.cpp asks
/// before placing a weight) for a 256 x 64 matrix of each type our converter writes: on x86-64 with AVX2 Q4_0, Q4_K
/// and IQ4_NL; on ARM with dot products also Q5_K, Q6_K and Q8_0; on armv8.0 (Raspberry Pi 4) none.
fn repacked_types() -> Vec<Type> {
    let Some(repack) = BufferType::cpu_extra().into_iter().find(|b| b.name() == "CPU_REPACK") else { return vec![] };
    let ctx = ggml::Context::new(16, 0).unwrap();
    [Type::Q4_0, Type::Q5_0, Type::Q8_0, Type::Q4K, Type::Q5K, Type::Q6K, Type::IQ4NL, Type::F16]
        .into_iter()
        .filter(|&ty| repack.supports_mul_mat(ctx.new_tensor(ty, &[256, 64])))
        .collect()
}

/// max |a - b| / max |a|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / scale
}

/// `w · x` with `w` (`n` rows of `k`, stored as `ty`) in `buft` (the CPU_REPACK buffer type) or, with `None`, in
/// a plain CPU buffer, and `x` F32 (`m` rows of `k`).
fn matmul(buft: Option<BufferType>, ty: Type, w: &[u8], x: &[f32], k: usize, n: usize, m: usize) -> Vec<f32> {
    let backend = Backend::cpu(2).unwrap();
    let weights = Context::new(1, 0).unwrap();
    let wt = weights.new_tensor(ty, &[k, n]);
    match buft {
        Some(buft) => weights.alloc_tensors_in(buft).unwrap(),
        None => weights.alloc_tensors(&backend).unwrap(),
    }
    weights.write(wt, w).unwrap();
    common::mul_mat(&backend, wt, x, m)
}

/// Every type ggml repacks on this CPU, for every count of activation rows from 1 to 21 (its 1-row GEMV, 4-row
/// GEMM and, on ARM, 16-row GEMM paths and their tails): the repacked kernels multiply the same integers as the
/// plain ones (both quantize the activations with the same rounding), so only the order of the float sums differs.
#[test]
fn repacked_matmul_matches_mapped_for_every_row_count() {
    let (mut rng, seed) = common::rng();
    let Some(repack) = BufferType::cpu_extra().into_iter().find(|b| b.name() == "CPU_REPACK") else { return };
    for ty in repacked_types() {
        let mut worst = 0f64;
        // 144 rows: a multiple of 4 (ARM's 4-column layouts) but not of 8, like the fixture's vision FFN.
        for (k, n) in [(256, 144), (512, 64)] {
            let probe = Context::new(1, 0).unwrap();
            if !repack.supports_mul_mat(probe.new_tensor(ty, &[k, n])) {
                continue;
            }
            let w = ggml::quantize(ty, &common::uniform(&mut rng, k * n), k, None).unwrap();
            for m in 1..=21 {
                let x = common::uniform(&mut rng, k * m);
                let (plain, repacked) = (matmul(None, ty, &w, &x, k, n, m), matmul(Some(repack), ty, &w, &x, k, n, m));
                let e = rel(&plain, &repacked);
                // Measured at most 2.9e-7 (qemu cortex-a76, all six types ggml repacks there) and 3.9e-7 (x86-64 AVX2).
                assert!(e < 1e-6, "{ty} k={k} n={n} m={m}: repacked vs plain {e:.2e}; seed {seed}");
                worst = worst.max(e);
            }
        }
        eprintln!("{ty}: repacked vs plain products, 1 to 21 rows: at most {worst:.2e}");
    }
}

#[test]
fn repacked_language_model_matches_mapped() {
    let types = repacked_types();
    eprintln!("ggml repacks {types:?} on this CPU");
    let g = fixtures::goldens("base-default-f32");
    let prompt: Vec<u32> = fixtures::ids(&g["prompts"]["text"]["input_ids"]).iter().map(|&x| x as u32).collect();
    let hf = common::npy::read(&fixtures::root().join("golden/base-default-f32/logits/text.npy"));
    let hf: Vec<f32> = hf.data.iter().map(|&x| x as f32).collect();
    let backend = Backend::cpu(2).unwrap();
    // Micro-batches of 5 rows: the 4-row kernels and the 1-row ones both run.
    let params = SessionParams { n_ctx: 128, n_ubatch: 5, cache_type: Type::F32, ..Default::default() };
    let logits = |model: &LlamaModel| {
        Session::new(model, &[&backend], &params).unwrap().prefill(Input::Tokens(&prompt), 0, 0, true).unwrap()
    };
    // The converter's mixes whose matrices ggml repacks somewhere: Q4_0 (x86, ARM dotprod), Q8_0 (ARM dotprod),
    // Q4_K_M (Q4_K everywhere it repacks, Q6_K on ARM).
    for (ty, main) in [(LlmType::Q4_0, Type::Q4_0), (LlmType::Q8_0, Type::Q8_0), (LlmType::Q4KM, Type::Q4K)] {
        let files = common::conversion::converted("base-default-f32", ty, MmprojType::F16);
        let placed = weights::place(&files.llm, Vec::new(), true, asagi_gguf::llm::is_matmul_weight).unwrap();
        let n: usize = placed.repacked.iter().map(|r| r.1).sum();
        // Only what ggml says it repacks is moved; the rest stays in the mapped file.
        for t in placed.contexts.iter().flat_map(|c| c.tensors()) {
            assert!(types.contains(&t.ty()), "{ty:?}: {} of type {} repacked", t.name(), t.ty());
        }
        if !types.contains(&main) {
            eprintln!("{ty:?}: {main} is not repacked on this CPU ({n} tensors of other types)");
            continue;
        }
        // Every matrix of a type ggml repacks moves: all of the fixture's but the embeddings (not a matmul weight)
        // and the 1202-row output have rows in multiples of 8, which every repacked layout accepts. In the Q4_K_M
        // mix some matrices are Q6_K/Q5_K, repacked only where ggml says so.
        let expected = files
            .llm
            .tensor_infos()
            .iter()
            .filter(|i| asagi_gguf::llm::is_matmul_weight(&i.name) && types.contains(&i.ty) && i.ne[1] % 8 == 0)
            .count();
        assert!(n == expected && n >= 11, "{ty:?}: {n} tensors repacked, {expected} expected");
        let mapped = logits(&LlamaModel::load(&files.llm).unwrap());
        let repacked = logits(&LlamaModel::load_with(&files.llm, &placed.contexts).unwrap());
        // Same quantized weights, other kernels: another summation order, and the activations' 8-bit rounding done
        // by a SIMD routine (ties to even) instead of the scalar one. The two must differ far less than either
        // differs from HF's float32 logits (the quantization error: ~7e-2 for Q4_0 here); a wrong layout would
        // differ by ~1.
        let (e, e_mapped, e_repacked) = (rel(&mapped, &repacked), rel(&hf, &mapped), rel(&hf, &repacked));
        eprintln!(
            "{ty:?}: {n} tensors; repacked vs mapped {e:.2e}; vs HF: mapped {e_mapped:.2e}, repacked {e_repacked:.2e}"
        );
        assert!(e < 0.05 * e_mapped, "{ty:?}: repacked vs mapped logits: {e:.2e} (quantization error {e_mapped:.2e})");
        assert!(
            e_repacked < 1.05 * e_mapped,
            "{ty:?}: repacked is further from HF: {e_repacked:.2e} vs {e_mapped:.2e}"
        );
        // Reading a repacked weight back is refused, not undefined.
        let owner = placed.contexts.iter().find(|c| c.get_tensor("blk.0.attn_q.weight").is_some()).unwrap();
        assert!(owner.read::<u8>(owner.get_tensor("blk.0.attn_q.weight").unwrap()).is_err());
    }
}

#[test]
fn repacked_vision_tower_matches_mapped() {
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::Q4_0);
    let placed = weights::place(&files.mmproj, Vec::new(), true, asagi_gguf::vision::is_matmul_weight).unwrap();
    assert_eq!(!placed.repacked.is_empty(), repacked_types().contains(&Type::Q4_0), "Q4_0 vision matrices repacked");
    let backend = Backend::cpu(2).unwrap();
    let (mapped_model, repacked_model) =
        (VisionModel::load(&files.mmproj).unwrap(), VisionModel::load_with(&files.mmproj, &placed.contexts).unwrap());
    let mut mapped_enc = VisionEncoder::new(&mapped_model, &[&backend]).unwrap();
    let mut repacked_enc = VisionEncoder::new(&repacked_model, &[&backend]).unwrap();
    let gold = fixtures::root().join("golden/base-default-f32/vision");
    let (mut e, mut e_mapped, mut e_repacked) = (0f64, 0f64, 0f64);
    for img in fixtures::IMAGES {
        let px = common::npy::read(&fixtures::root().join(format!("golden/preprocess/s56/{img}.pixel_values.npy")));
        let hf = common::npy::read(&gold.join(format!("{img}.projected.npy")));
        let hf: Vec<f32> = hf.data.iter().map(|&x| x as f32).collect();
        let mapped = mapped_enc.encode_pixels(&px.as_f32(), 1).unwrap().pop().unwrap().data;
        let repacked = repacked_enc.encode_pixels(&px.as_f32(), 1).unwrap().pop().unwrap().data;
        let (d, dm, dr) = (rel(&mapped, &repacked), rel(&hf, &mapped), rel(&hf, &repacked));
        eprintln!("{img}: repacked vs mapped {d:.2e}; vs HF: mapped {dm:.2e}, repacked {dr:.2e}");
        (e, e_mapped, e_repacked) = (e.max(d), e_mapped.max(dm), e_repacked.max(dr));
    }
    // The kernels agree to float rounding (repacked_matmul_matches_mapped_for_every_row_count), but every Q4_0
    // product first rounds its input to 8 bits, and a difference of 1e-7 in an input can move one value across a
    // rounding boundary: one step of 1/127 of its block's largest value, ~1e-3 of the product, then carried
    // through the following layers (measured 9.4e-3 on rgb_80x60 under qemu cortex-a76: attention outputs 1.8e-7
    // apart became 2.3e-3 apart after attn_out). So the two must be as close to HF's float32 embeddings as each
    // other, and far closer to each other than to HF (the Q4_0 quantization error); a wrong layout or a wrong
    // tail would be off by ~1.
    assert!(e < 0.2 * e_mapped, "repacked vs mapped image embeddings: {e:.2e} (quantization error {e_mapped:.2e})");
    assert!(e_repacked < 1.1 * e_mapped, "repacked is further from HF: {e_repacked:.2e} vs {e_mapped:.2e}");
}
