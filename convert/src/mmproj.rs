//! The mmproj GGUF (architecture `clip`, projector `mlp`): the SigLIP blocks Asagi uses and the 2-layer projector,
//! with the keys llama.cpp's mtmd reads, and `asagi.*` keys for what it has no key for.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ggml::gguf::{Array, Value};
use ggml::Type;

use crate::checkpoint::Checkpoint;
use crate::config::{AsagiConfig, JsonFile};
use crate::plan::{s, u32v, FilePlan, TensorPlan};
use crate::quant::MmprojType;
use crate::ModelInfo;

pub const VISION: &str = "vision_tower.vision_model.";
pub const PROJECTOR: &str = "multi_modal_projector.";

/// Per-block tensors: GGUF suffix, HF suffix (both `.weight` and `.bias` exist for each).
const BLOCK: &[(&str, &str)] = &[
    ("ln1", "layer_norm1"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_out", "self_attn.out_proj"),
    ("ln2", "layer_norm2"),
    ("ffn_up", "mlp.fc1"),
    ("ffn_down", "mlp.fc2"),
];

/// Image preprocessing settings from preprocessor_config.json (SigLIP's processor in Asagi).
struct Preprocess {
    mean: Vec<f32>,
    std: Vec<f32>,
    size: usize,
    resample: usize,
    rescale: f32,
}

fn preprocess(dir: &std::path::Path, image_size: usize) -> Result<Preprocess> {
    let p = JsonFile::read(dir, "preprocessor_config.json")?;
    let mean = p.f32_array("image_mean")?;
    let std = p.f32_array("image_std")?;
    if mean.len() != 3 || std.len() != 3 || std.contains(&0.0) {
        bail!("{}: image_mean and image_std need 3 values each (std non-zero)", p.path.display());
    }
    let size = p.usize_opt("size.height")?.or(p.usize_opt("size.shortest_edge")?).unwrap_or(image_size);
    if size != image_size || p.usize_opt("size.width")?.is_some_and(|w| w != image_size) {
        bail!("{}: size is not {image_size}x{image_size}, the vision tower's image_size", p.path.display());
    }
    if p.bool_opt("do_resize")? == Some(false) || p.bool_opt("do_normalize")? == Some(false) {
        bail!("{}: do_resize and do_normalize must be true", p.path.display());
    }
    let rescale = if p.bool_opt("do_rescale")? == Some(false) {
        1.0
    } else {
        p.f64_opt("rescale_factor")?.unwrap_or(1.0 / 255.0) as f32
    };
    Ok(Preprocess { mean, std, size, resample: p.usize_opt("resample")?.unwrap_or(3), rescale })
}

pub fn plan(
    cfg: &AsagiConfig,
    ckpt: &Checkpoint,
    dir: &std::path::Path,
    ty: MmprojType,
    info: &ModelInfo,
    path: PathBuf,
) -> Result<FilePlan> {
    let v = &cfg.vision;
    let h = v.hidden;
    let n_pos = (v.image_size / v.patch_size).pow(2);
    let pre = preprocess(dir, v.image_size)?;
    let proj = ckpt.get(&format!("{PROJECTOR}linear_1.weight"))?;
    let p_hidden = proj.shape.first().copied().unwrap_or(0);
    let text_h = cfg.text.hidden;
    // SigLIP's FFN width (4304) is not a multiple of 32, so fc2's rows would fit no quantization block. For the
    // block types we append zero columns to fc2 and zero rows (and bias) to fc1 up to a multiple of 32: the extra
    // hidden units are GELU(0 + 0) = 0 and meet zero weights, so the output is exactly the same.
    let ffn = if ty.weight_type(32).is_quantized() { v.ffn.div_ceil(32) * 32 } else { v.ffn };
    let f32_ = Type::F32;

    let vt = |suffix: &str| format!("{VISION}{suffix}");
    let mut tensors = vec![
        TensorPlan::direct(
            ckpt,
            "v.patch_embd.weight",
            &vt("embeddings.patch_embedding.weight"),
            ty.patch_type(),
            &[h, 3, v.patch_size, v.patch_size],
        )?,
        TensorPlan::direct(ckpt, "v.patch_embd.bias", &vt("embeddings.patch_embedding.bias"), f32_, &[h])?,
        TensorPlan::direct(
            ckpt,
            "v.position_embd.weight",
            &vt("embeddings.position_embedding.weight"),
            f32_,
            &[n_pos, h],
        )?,
    ];
    for i in 0..v.n_used_layers {
        for &(gguf, hf) in BLOCK {
            let (w_shape, b_len): (Vec<usize>, usize) = match gguf {
                "ln1" | "ln2" => (vec![h], h),
                "ffn_up" => (vec![v.ffn, h], v.ffn),
                "ffn_down" => (vec![h, v.ffn], h),
                _ => (vec![h, h], h),
            };
            let src = |p: &str| vt(&format!("encoder.layers.{i}.{hf}.{p}"));
            let name = |p: &str| format!("v.blk.{i}.{gguf}.{p}");
            let w_ty = if w_shape.len() == 1 { f32_ } else { ty.weight_type(if gguf == "ffn_down" { ffn } else { h }) };
            let mut w = TensorPlan::direct(ckpt, &name("weight"), &src("weight"), w_ty, &w_shape)?;
            let mut b = TensorPlan::direct(ckpt, &name("bias"), &src("bias"), f32_, &[b_len])?;
            match gguf {
                "ffn_up" => {
                    w = w.pad_rows(ffn);
                    b = b.pad_rows(ffn);
                }
                "ffn_down" => w = w.pad_cols(ffn),
                _ => {}
            }
            tensors.extend([w, b]);
        }
    }
    let pt = |suffix: &str| format!("{PROJECTOR}{suffix}");
    tensors.extend([
        TensorPlan::direct(ckpt, "mm.0.weight", &pt("linear_1.weight"), ty.weight_type(h), &[p_hidden, h])?,
        TensorPlan::direct(ckpt, "mm.0.bias", &pt("linear_1.bias"), f32_, &[p_hidden])?,
        TensorPlan::direct(ckpt, "mm.2.weight", &pt("linear_2.weight"), ty.weight_type(p_hidden), &[text_h, p_hidden])?,
        TensorPlan::direct(ckpt, "mm.2.bias", &pt("linear_2.bias"), f32_, &[text_h])?,
    ]);

    let keys: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("clip")),
        ("general.type".into(), s("mmproj")),
        ("general.name".into(), s(&info.name)),
        ("general.description".into(), s("SigLIP vision encoder and 2-layer MLP projector of an Asagi model")),
        ("general.file_type".into(), Value::U32(ty.ftype())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("clip.has_vision_encoder".into(), Value::Bool(true)),
        ("clip.projector_type".into(), s("mlp")),
        // llama.cpp: use_gelu selects ggml_gelu (tanh form), SigLIP's gelu_pytorch_tanh.
        ("clip.use_gelu".into(), Value::Bool(true)),
        ("clip.vision.image_size".into(), u32v(v.image_size)),
        ("clip.vision.patch_size".into(), u32v(v.patch_size)),
        ("clip.vision.embedding_length".into(), u32v(h)),
        ("clip.vision.feed_forward_length".into(), u32v(ffn)),
        ("clip.vision.block_count".into(), u32v(v.n_used_layers)),
        ("clip.vision.projection_dim".into(), u32v(text_h)),
        ("clip.vision.attention.head_count".into(), u32v(v.n_head)),
        ("clip.vision.attention.layer_norm_epsilon".into(), Value::F32(v.layer_norm_eps)),
        ("clip.vision.image_mean".into(), Value::Array(Array::F32(pre.mean))),
        ("clip.vision.image_std".into(), Value::Array(Array::F32(pre.std))),
        // Run exactly the blocks HF's hidden_states[vision_feature_layer] has gone through (without this key
        // clip.cpp runs one block fewer).
        ("clip.vision.feature_layer".into(), Value::Array(Array::I32(vec![v.n_used_layers as i32]))),
        ("asagi.vision.feature_select_strategy".into(), s(&v.select_strategy)),
        ("asagi.vision.hidden_act".into(), s(&v.hidden_act)),
        ("asagi.vision.feed_forward_length_original".into(), u32v(v.ffn)),
        ("asagi.projector.hidden_act".into(), s(&v.projector_act)),
        ("asagi.image.resize".into(), s("stretch")),
        ("asagi.image.resample".into(), u32v(pre.resample)),
        ("asagi.image.size".into(), u32v(pre.size)),
        ("asagi.image.rescale_factor".into(), Value::F32(pre.rescale)),
        ("asagi.image_token_id".into(), u32v(cfg.image_token_id)),
    ];
    Ok(FilePlan { path, keys, tensors })
}
