//! `convert` on the reference fixtures: every variant and output type converts; the files read back through
//! ggml's GGUF parser with the keys, types, names and shapes llama.cpp expects, and values equal to the checkpoint
//! (after the Q/K permutation and the FFN padding) within each type's error.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use asagi_convert::{Checkpoint, LlmType, MmprojType};
use common::conversion::{convert, options};
use common::fixtures;
use ggml::gguf::{GgufFile, Value};
use ggml::Type;

/// A checkpoint tensor as f32, row-major.
fn source(ckpt: &Checkpoint, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = ckpt.get(name).unwrap();
    let mut v = vec![0f32; t.numel()];
    ckpt.read_f32(t, 0, &mut v).unwrap();
    (t.shape.clone(), v)
}

/// llama.cpp's `LlamaModel.permute`, written as the reshape it is: rows viewed as [n_head, 2, hd/2] become
/// [n_head, hd/2, 2].
fn permute_rows(w: &[f32], rows: usize, cols: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..rows / hd {
        for half in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + half * hd / 2 + j;
                let dst = h * hd + j * 2 + half;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Zero-pads a row-major [rows, cols] matrix to [new_rows, new_cols].
fn pad(w: &[f32], rows: usize, cols: usize, new_rows: usize, new_cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; new_rows * new_cols];
    for r in 0..rows {
        out[r * new_cols..r * new_cols + cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
    }
    out
}

/// Checks that a GGUF tensor holds `want` as well as its type can.
fn check_values(f: &GgufFile, name: &str, want: &[f32]) {
    let info = f.tensor_infos().iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"));
    let got = ggml::dequantize(info.ty, &f.tensor_bytes(name).unwrap(), want.len()).unwrap();
    let exact: Option<Vec<f32>> = match info.ty {
        Type::F32 => Some(want.to_vec()),
        Type::F16 => Some(want.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()),
        Type::BF16 => Some(want.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()),
        _ => None,
    };
    match exact {
        Some(e) => assert!(got == e, "{}: {name} ({}) differs from the checkpoint", f.path().display(), info.ty),
        None => {
            let bound = match info.ty {
                Type::Q8_0 => 0.01,
                Type::Q6K => 0.03,
                Type::Q5K | Type::Q5_0 | Type::Q5_1 => 0.06,
                Type::Q4K | Type::Q4_0 => 0.12,
                t => panic!("unexpected type {t} for {name}"),
            };
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = common::rel_rms(&got, &want64);
            assert!(err <= bound, "{name} ({}): relative RMS error {err:.3e} > {bound}", info.ty);
        }
    }
}

fn cfg_usize(cfg: &serde_json::Value, path: &str) -> usize {
    path.split('.').fold(cfg, |v, k| &v[k]).as_u64().unwrap() as usize
}

fn check_llm(path: &Path, dir: &Path, ty: LlmType) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (h, n_layer, n_head) = (
        cfg_usize(&cfg, "text_config.hidden_size"),
        cfg_usize(&cfg, "text_config.num_hidden_layers"),
        cfg_usize(&cfg, "text_config.num_attention_heads"),
    );
    let n_kv = cfg_usize(&cfg, "text_config.num_key_value_heads");
    let ffn = cfg_usize(&cfg, "text_config.intermediate_size");
    let hd = h / n_head;
    let mut f = GgufFile::open(path).unwrap();
    f.map_weights().unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let n_vocab = ckpt.get("language_model.model.embed_tokens.weight").unwrap().shape[0];

    // Keys with the exact value types llama.cpp's loader reads.
    let u32s = [
        ("llama.context_length", cfg_usize(&cfg, "text_config.max_position_embeddings")),
        ("llama.embedding_length", h),
        ("llama.block_count", n_layer),
        ("llama.feed_forward_length", ffn),
        ("llama.attention.head_count", n_head),
        ("llama.attention.head_count_kv", n_kv),
        ("llama.rope.dimension_count", hd),
        ("llama.vocab_size", n_vocab),
        ("general.file_type", ty.ftype() as usize),
        ("general.quantization_version", 2),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.eot_token_id", 1201),
        ("asagi.image_token_id", 1200),
    ];
    for (k, v) in u32s {
        assert_eq!(f.u32(k).unwrap() as usize, v, "{k}");
    }
    assert_eq!(f.str("general.architecture").unwrap(), "llama");
    assert_eq!(f.str("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(f.f32("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5);
    assert_eq!(f.f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert!(f.bool("tokenizer.ggml.add_bos_token").unwrap() && !f.bool("tokenizer.ggml.add_eos_token").unwrap());
    let tj = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    assert_eq!(f.str("tokenizer.huggingface.json").unwrap(), tj);
    let tokens = match f.get("tokenizer.ggml.tokens") {
        Some(Value::Array(ggml::gguf::Array::Str(t))) => t,
        other => panic!("tokenizer.ggml.tokens: {other:?}"),
    };
    assert_eq!(tokens.len(), n_vocab, "one token per embedding row");
    assert_eq!((tokens[1200].as_str(), tokens[1201].as_str()), ("<image>", "<pad>"));
    assert!(
        matches!(f.get("tokenizer.ggml.scores"), Some(Value::Array(ggml::gguf::Array::F32(s))) if s.len() == n_vocab)
    );
    match f.get("tokenizer.ggml.token_type") {
        Some(Value::Array(ggml::gguf::Array::I32(t))) => {
            assert_eq!(t.len(), n_vocab);
            assert_eq!(
                (t[0], t[1], t[2], t[8], t[1200], t[1201]),
                (2, 3, 3, 6, 3, 3),
                "unk, bos, eos, <0x00>, <image>, <pad>"
            );
            assert!(t[1202..].iter().all(|&x| x == 5), "padding rows are UNUSED");
        }
        other => panic!("tokenizer.ggml.token_type: {other:?}"),
    }

    // Exactly llama's tensors, in llama.cpp's names, types from the mix table, values from the checkpoint.
    let mut expected: Vec<(String, String, Vec<usize>)> =
        vec![("token_embd.weight".into(), "language_model.model.embed_tokens.weight".into(), vec![h, n_vocab])];
    for i in 0..n_layer {
        let l = |s: &str| format!("language_model.model.layers.{i}.{s}");
        expected.extend([
            (format!("blk.{i}.attn_norm.weight"), l("input_layernorm.weight"), vec![h]),
            (format!("blk.{i}.attn_q.weight"), l("self_attn.q_proj.weight"), vec![h, n_head * hd]),
            (format!("blk.{i}.attn_k.weight"), l("self_attn.k_proj.weight"), vec![h, n_kv * hd]),
            (format!("blk.{i}.attn_v.weight"), l("self_attn.v_proj.weight"), vec![h, n_kv * hd]),
            (format!("blk.{i}.attn_output.weight"), l("self_attn.o_proj.weight"), vec![n_head * hd, h]),
            (format!("blk.{i}.ffn_norm.weight"), l("post_attention_layernorm.weight"), vec![h]),
            (format!("blk.{i}.ffn_gate.weight"), l("mlp.gate_proj.weight"), vec![h, ffn]),
            (format!("blk.{i}.ffn_up.weight"), l("mlp.up_proj.weight"), vec![h, ffn]),
            (format!("blk.{i}.ffn_down.weight"), l("mlp.down_proj.weight"), vec![ffn, h]),
        ]);
    }
    expected.push(("output_norm.weight".into(), "language_model.model.norm.weight".into(), vec![h]));
    expected.push(("output.weight".into(), "language_model.lm_head.weight".into(), vec![h, n_vocab]));
    let names: Vec<&str> = f.tensor_infos().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, expected.iter().map(|e| e.0.as_str()).collect::<Vec<_>>());
    for ((name, src, ne), info) in expected.iter().zip(f.tensor_infos()) {
        assert_eq!(&info.ne, ne, "{name}");
        if ne.len() == 1 {
            assert_eq!(info.ty, Type::F32, "{name}: norms stay F32");
        }
        let (shape, mut w) = source(&ckpt, src);
        if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
            w = permute_rows(&w, shape[0], shape[1], hd);
        }
        check_values(&f, name, &w);
    }
}

fn check_mmproj(path: &Path, dir: &Path, mm: MmprojType) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let v = |k: &str| cfg_usize(&cfg, &format!("vision_config.{k}"));
    let (h, ffn, n_layer, image, patch) =
        (v("hidden_size"), v("intermediate_size"), v("num_hidden_layers"), v("image_size"), v("patch_size"));
    let n_used = n_layer - 1; // vision_feature_layer -2
    let quantized = matches!(mm, MmprojType::Q8_0 | MmprojType::Q5_0 | MmprojType::Q4_0);
    let ffn_out = if quantized { ffn.div_ceil(32) * 32 } else { ffn };
    let text_h = cfg_usize(&cfg, "text_config.hidden_size");
    let mut f = GgufFile::open(path).unwrap();
    f.map_weights().unwrap();
    assert_eq!(f.str("general.architecture").unwrap(), "clip");
    assert_eq!(f.str("clip.projector_type").unwrap(), "mlp");
    assert!(f.bool("clip.has_vision_encoder").unwrap() && f.bool("clip.use_gelu").unwrap());
    for (k, want) in [
        ("clip.vision.image_size", image),
        ("clip.vision.patch_size", patch),
        ("clip.vision.embedding_length", h),
        ("clip.vision.feed_forward_length", ffn_out),
        ("clip.vision.block_count", n_used),
        ("clip.vision.projection_dim", text_h),
        ("clip.vision.attention.head_count", v("num_attention_heads")),
        ("general.file_type", mm.ftype() as usize),
    ] {
        assert_eq!(f.u32(k).unwrap() as usize, want, "{k}");
    }
    assert_eq!(f.get("clip.vision.feature_layer"), Some(Value::Array(ggml::gguf::Array::I32(vec![n_used as i32]))));
    assert_eq!(f.f32("clip.vision.attention.layer_norm_epsilon").unwrap(), 1e-6);
    assert_eq!(
        f.str("asagi.vision.feature_select_strategy").unwrap(),
        cfg["vision_feature_select_strategy"].as_str().unwrap()
    );

    let ckpt = Checkpoint::open(dir).unwrap();
    let names: BTreeMap<&str, &ggml::gguf::TensorInfo> =
        f.tensor_infos().iter().map(|t| (t.name.as_str(), t)).collect();
    assert!(
        !names.keys().any(|n| n.contains("post_ln") || n.contains(&format!("blk.{n_used}."))),
        "dropped tensors written"
    );
    assert_eq!(names.len(), 3 + 16 * n_used + 4);
    for (name, info) in &names {
        let src = if let Some(rest) = name.strip_prefix("mm.") {
            format!("multi_modal_projector.linear_{}.{}", if rest.starts_with('0') { 1 } else { 2 }, &rest[2..])
        } else {
            let rest = name.strip_prefix("v.").unwrap();
            let hf = [("patch_embd", "embeddings.patch_embedding"), ("position_embd", "embeddings.position_embedding")]
                .iter()
                .find(|(g, _)| rest.starts_with(g))
                .map(|(g, hf)| rest.replacen(g, hf, 1))
                .unwrap_or_else(|| {
                    let r = rest.replacen("blk.", "encoder.layers.", 1);
                    [
                        ("ln1", "layer_norm1"),
                        ("ln2", "layer_norm2"),
                        ("attn_q", "self_attn.q_proj"),
                        ("attn_k", "self_attn.k_proj"),
                        ("attn_v", "self_attn.v_proj"),
                        ("attn_out", "self_attn.out_proj"),
                        ("ffn_up", "mlp.fc1"),
                        ("ffn_down", "mlp.fc2"),
                    ]
                    .iter()
                    .fold(r, |r, (g, hf)| r.replace(&format!(".{g}."), &format!(".{hf}.")))
                });
            format!("vision_tower.vision_model.{hf}")
        };
        let (shape, w) = source(&ckpt, &src);
        let w = if name.contains("ffn_up") {
            pad(
                &w,
                shape[0],
                if shape.len() > 1 { shape[1] } else { 1 },
                ffn_out,
                if shape.len() > 1 { shape[1] } else { 1 },
            )
        } else if name.contains("ffn_down.weight") {
            pad(&w, shape[0], shape[1], shape[0], ffn_out)
        } else {
            w
        };
        if info.ne.len() == 1 || name.contains("position_embd") {
            assert_eq!(info.ty, Type::F32, "{name}: biases, norms and position embeddings stay F32");
        }
        check_values(&f, name, &w);
    }
}

#[test]
fn every_variant_and_type_converts_and_reads_back() {
    let mm_types: Vec<MmprojType> = MmprojType::all().collect();
    for variant in fixtures::VARIANTS {
        let dir = fixtures::model_dir(variant);
        let out = tempfile::tempdir().unwrap();
        for (i, ty) in LlmType::all().enumerate() {
            let mm = mm_types[i % mm_types.len()];
            let (llm, mmproj) = convert(&dir, out.path(), ty, mm).unwrap_or_else(|e| panic!("{variant} {ty:?}: {e:#}"));
            check_llm(&llm, &dir, ty);
            check_mmproj(&mmproj, &dir, mm);
        }
        let left: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }
}

#[test]
fn dry_run_writes_nothing_and_existing_files_need_force() {
    let out = tempfile::tempdir().unwrap();
    let dir = fixtures::model_dir("base-default-f32");
    let mut opts = options(&dir, out.path(), LlmType::Q4KM, MmprojType::Q8_0);
    let c = asagi_convert::plan(&opts).unwrap();
    let table = asagi_convert::describe(&c);
    assert!(
        table.contains("blk.1.attn_v.weight") && table.contains("q6_K") && table.contains("v.blk.1.ffn_down.weight")
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "planning wrote files");

    asagi_convert::write(&c, &opts, &AtomicBool::new(false)).unwrap();
    opts.force = false;
    let err = asagi_convert::write(&c, &opts, &AtomicBool::new(false)).unwrap_err().to_string();
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
}

#[test]
fn cancelled_conversion_leaves_no_file() {
    let out = tempfile::tempdir().unwrap();
    let opts = options(&fixtures::model_dir("base-default-f32"), out.path(), LlmType::F16, MmprojType::F16);
    let c = asagi_convert::plan(&opts).unwrap();
    let err = asagi_convert::write(&c, &opts, &AtomicBool::new(true)).unwrap_err();
    assert!(format!("{err:#}").contains("interrupted"), "{err:#}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "an interrupted conversion left files");
}
