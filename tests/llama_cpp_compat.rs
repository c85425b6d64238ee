//! The converted files load unchanged in llama.cpp (through the `llama-cpp-2` crate, linked against the same
//! ggml), and llama.cpp's greedy tokens for a text prompt on the F32 file equal HF transformers' goldens. The
//! mmproj files load in llama.cpp's mtmd next to the language model and encode an image, and for every mmproj type
//! mtmd's image embeddings and ours give the same logits.
//!
//! Not built with `--cfg asagi_no_peer` (CI's emulated ARM runs, which build without the peer: see Cargo.toml).
#![cfg(not(asagi_no_peer))]

mod common;

use std::num::NonZeroU32;

use asagi_convert::{LlmType, MmprojType};
use common::fixtures;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::mtmd::{
    mtmd_default_marker, MtmdBitmap, MtmdContext, MtmdContextParams, MtmdInputChunkType, MtmdInputText,
};
use llama_cpp_2::token::LlamaToken;

/// llama.cpp's backend, initialised once per process (a second `init` fails while one is alive, and the tests
/// run in parallel).
fn backend() -> &'static LlamaBackend {
    static BACKEND: std::sync::OnceLock<LlamaBackend> = std::sync::OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().unwrap();
        b.void_logs();
        b
    })
}

/// Greedy decoding with llama.cpp: the argmax at each step (first index on ties, as torch.argmax).
fn llama_cpp_greedy(backend: &LlamaBackend, model: &LlamaModel, prompt: &[i64], n: usize) -> Vec<i64> {
    let params =
        LlamaContextParams::default().with_n_ctx(NonZeroU32::new(256)).with_n_threads(2).with_n_threads_batch(2);
    let mut ctx = model.new_context(backend, params).unwrap();
    let mut batch = LlamaBatch::new(256, 1);
    for (i, &t) in prompt.iter().enumerate() {
        batch.add(LlamaToken(t as i32), i as i32, &[0], i + 1 == prompt.len()).unwrap();
    }
    let mut out = Vec::new();
    let mut pos = prompt.len() as i32;
    for _ in 0..n {
        ctx.decode(&mut batch).unwrap();
        let logits = ctx.get_logits_ith(batch.n_tokens() - 1);
        let best = logits.iter().enumerate().fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
        out.push(best as i64);
        if best == 2 {
            break;
        }
        batch.clear();
        batch.add(LlamaToken(best as i32), pos, &[0], true).unwrap();
        pos += 1;
    }
    out
}

#[test]
fn llama_cpp_loads_converted_files_and_matches_hf_greedy() {
    let backend = backend();
    let image = fixtures::root().join("images/rgb_56x56.png");
    for variant in fixtures::VARIANTS {
        let dir = fixtures::model_dir(variant);
        let out = tempfile::tempdir().unwrap();
        let golden = fixtures::goldens(variant);
        let case = &golden["generate"]["greedy_text"];
        let prompt = fixtures::ids(&golden["prompts"]["text"]["input_ids"]);
        let mut want = fixtures::ids(&case["new_tokens"][0]);
        if let Some(eos) = want.iter().position(|&t| t == 2) {
            want.truncate(eos + 1);
        }
        let image_tokens = {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            let side = cfg["vision_config"]["image_size"].as_u64().unwrap()
                / cfg["vision_config"]["patch_size"].as_u64().unwrap();
            (side * side) as usize // llama.cpp keeps every patch (it cannot drop patch 0)
        };

        for (ty, mm) in
            [(LlmType::F32, MmprojType::F16), (LlmType::Q4KM, MmprojType::Q8_0), (LlmType::Q8_0, MmprojType::Q4_0)]
        {
            let (llm, mmproj) = common::conversion::convert(&dir, out.path(), ty, mm).unwrap();
            let model = LlamaModel::load_from_file(backend, &llm, &LlamaModelParams::default())
                .unwrap_or_else(|e| panic!("llama.cpp refused {variant} {}: {e}", ty.name()));
            if ty == LlmType::F32 {
                let got = llama_cpp_greedy(backend, &model, &prompt, want.len());
                assert_eq!(got, want, "{variant}: llama.cpp greedy tokens on the F32 file differ from HF");
            }

            let params = MtmdContextParams { use_gpu: false, print_timings: false, n_threads: 2, ..Default::default() };
            let mut mtmd = MtmdContext::init_from_file(mmproj.to_str().unwrap(), &model, &params)
                .unwrap_or_else(|e| panic!("mtmd refused {variant} mmproj {}: {e:?}", mm.name()));
            let bitmap = MtmdBitmap::from_file(&mtmd, image.to_str().unwrap(), false).unwrap();
            let text = MtmdInputText {
                text: format!("{}\nhello", mtmd_default_marker()),
                add_special: true,
                parse_special: true,
            };
            let chunks = mtmd.tokenize(text, &[&bitmap]).unwrap();
            let img = (0..chunks.len())
                .filter_map(|i| chunks.get(i))
                .find(|c| c.chunk_type() == MtmdInputChunkType::Image)
                .expect("an image chunk");
            assert_eq!(img.n_tokens(), image_tokens, "{variant}: image tokens");
            mtmd.encode_chunk(&img).unwrap_or_else(|e| panic!("{variant} mmproj {}: encode failed: {e:?}", mm.name()));
        }
    }
}

/// mtmd's image embeddings against ours for every mmproj type the converter writes. The llama-cpp-2 crate does
/// not hand out mtmd's embeddings, so both are compared through what they do: the same F32 language model
/// (llama.cpp's on mtmd's embeddings, ours on ours; F16 KV cache both) gives its logits after
/// `<image>` + text. The "full" variant keeps every patch on both sides (mtmd cannot drop patch 0) and the image
/// is exactly 64x64, so neither side resizes. What remains is the two graphs: mtmd's SigLIP uses ggml's
/// tabulated GELU where ours computes gelu_pytorch_tanh exactly (HF's), and its attention and norms are its own.
#[test]
fn mtmd_and_our_image_embeddings_agree_for_every_mmproj_type() {
    use asagi_gguf::llm::{LlamaModel as OurModel, Session, SessionParams};
    use asagi_gguf::preprocess::{preprocess_image, PreprocessConfig};
    use asagi_gguf::vision::{VisionEncoder, VisionModel};

    let backend = backend();
    let variant = "full-gqa-expand-f16";
    let dir = fixtures::model_dir(variant);
    let image_token = fixtures::goldens(variant)["image_token_id"].as_u64().unwrap() as u32;
    // A 64x64 image: the fixture photo's top-left corner (smooth areas and edges).
    let src = asagi_gguf::preprocess::load_rgb(&fixtures::root().join("images/rgb_200x120.png")).unwrap();
    let img = image::imageops::crop_imm(&src, 40, 20, 64, 64).to_image();
    let ours_backend = ggml::Backend::cpu(2).unwrap();
    let out = tempfile::tempdir().unwrap();
    for mm in MmprojType::all() {
        let (llm, mmproj) = common::conversion::convert(&dir, out.path(), LlmType::F32, mm).unwrap();

        // llama.cpp + mtmd.
        let model = LlamaModel::load_from_file(backend, &llm, &LlamaModelParams::default()).unwrap();
        let params = MtmdContextParams { use_gpu: false, print_timings: false, n_threads: 2, ..Default::default() };
        let mut mtmd = MtmdContext::init_from_file(mmproj.to_str().unwrap(), &model, &params)
            .unwrap_or_else(|e| panic!("mtmd refused mmproj {}: {e:?}", mm.name()));
        let bitmap = MtmdBitmap::from_image_data(64, 64, img.as_raw()).unwrap();
        let text = MtmdInputText {
            text: format!("{}\nこれは何ですか", mtmd_default_marker()),
            add_special: true,
            parse_special: true,
        };
        let chunks = mtmd.tokenize(text, &[&bitmap]).unwrap();
        let ctx_params =
            LlamaContextParams::default().with_n_ctx(NonZeroU32::new(256)).with_n_threads(2).with_n_threads_batch(2);
        let mut ctx = model.new_context(backend, ctx_params).unwrap();
        let n_past = chunks.eval_chunks(&mut mtmd, &mut ctx, 0, 0, 64, true).unwrap();
        let theirs = ctx.get_logits_ith(-1).to_vec();

        // Ours, on the same token sequence (the image chunk where mtmd put it).
        let mut ids = Vec::new();
        for c in (0..chunks.len()).filter_map(|i| chunks.get(i)) {
            match c.chunk_type() {
                MtmdInputChunkType::Image => ids.push(image_token),
                _ => ids.extend(c.text_tokens().unwrap().iter().map(|t| t.0 as u32)),
            }
        }
        let (mut lf, mut mf) =
            (ggml::gguf::GgufFile::open(&llm).unwrap(), ggml::gguf::GgufFile::open(&mmproj).unwrap());
        lf.map_weights().unwrap();
        mf.map_weights().unwrap();
        let vm = VisionModel::load(&mf).unwrap();
        let pv = preprocess_image(&img, &PreprocessConfig::siglip(vm.hp.image_size));
        let emb = VisionEncoder::new(&vm, &[&ours_backend]).unwrap().encode_pixels(&pv, 1).unwrap().pop().unwrap();
        let om = OurModel::load(&lf).unwrap();
        let sp = SessionParams { n_ctx: 256, n_ubatch: 64, cache_type: ggml::Type::F16, ..Default::default() };
        let mut s = Session::new(&om, &[&ours_backend], &sp).unwrap();
        let segs = asagi_gguf::multimodal::segments(&ids, Some(image_token), std::slice::from_ref(&emb)).unwrap();
        let (ours, pos) = asagi_gguf::multimodal::prefill(&mut s, &segs, 0, false).unwrap();
        assert_eq!(pos, n_past, "mmproj {}: positions", mm.name());
        assert_eq!(ours.len(), theirs.len(), "vocabulary");
        let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let err = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max) / scale;
        eprintln!("mmproj {}: logits on mtmd's vs our image embeddings: max rel. diff {err:.2e}", mm.name());
        // Measured: f32 1.8e-4, f16 2.6e-4, bf16 8.1e-4, q8_0 2.0e-3, q5_0 1.9e-3, q4_0 2.0e-3 (a file mtmd read
        // differently from us, a transposed or mis-typed tensor, gives differences of order 1).
        let bound = match mm {
            MmprojType::F32 | MmprojType::F16 => 6e-4,
            MmprojType::BF16 => 2e-3,
            MmprojType::Q8_0 | MmprojType::Q5_0 | MmprojType::Q4_0 => 5e-3,
        };
        assert!(err <= bound, "mmproj {}: logits differ by {err:.2e} (bound {bound:.0e})", mm.name());
    }
}
