//! The converted files load unchanged in llama.cpp (through the `llama-cpp-2` crate, linked against the same
//! ggml), and llama.cpp's greedy tokens for a text prompt on the F32 file equal HF transformers' goldens. The
//! mmproj files load in llama.cpp's mtmd next to the language model and encode an image.

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
    let mut backend = LlamaBackend::init().unwrap();
    backend.void_logs();
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
            let model = LlamaModel::load_from_file(&backend, &llm, &LlamaModelParams::default())
                .unwrap_or_else(|e| panic!("llama.cpp refused {variant} {}: {e}", ty.name()));
            if ty == LlmType::F32 {
                let got = llama_cpp_greedy(&backend, &model, &prompt, want.len());
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
