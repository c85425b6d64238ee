//! The language-model GGUF (architecture `llama`): keys, tokenizer metadata and tensors as llama.cpp expects them.

use std::path::PathBuf;

use anyhow::Result;
use ggml::gguf::{Array, Value};

use crate::checkpoint::Checkpoint;
use crate::config::AsagiConfig;
use crate::plan::{s, u32v, FilePlan, RowMap, TensorPlan};
use crate::quant::{LlmType, Role};
use crate::vocab::Vocab;
use crate::ModelInfo;

/// Where llm-jp-3's tensors live in an Asagi (LLaVA) checkpoint.
const PREFIX: &str = "language_model.model.";

/// Per-layer tensors: GGUF suffix, HF suffix, role.
#[derive(Clone, Copy)]
enum Kind {
    Norm,
    Q,
    K,
    V,
    Out,
    Gate,
    Up,
    Down,
}

const LAYER: &[(&str, &str, Kind)] = &[
    ("attn_norm.weight", "input_layernorm.weight", Kind::Norm),
    ("attn_q.weight", "self_attn.q_proj.weight", Kind::Q),
    ("attn_k.weight", "self_attn.k_proj.weight", Kind::K),
    ("attn_v.weight", "self_attn.v_proj.weight", Kind::V),
    ("attn_output.weight", "self_attn.o_proj.weight", Kind::Out),
    ("ffn_norm.weight", "post_attention_layernorm.weight", Kind::Norm),
    ("ffn_gate.weight", "mlp.gate_proj.weight", Kind::Gate),
    ("ffn_up.weight", "mlp.up_proj.weight", Kind::Up),
    ("ffn_down.weight", "mlp.down_proj.weight", Kind::Down),
];

/// Asagi's instruction template (model card, training code) as a chat template: for one user message it renders
/// exactly the card's prompt. No BOS in the template: llama.cpp adds it (`add_bos_token`).
pub const CHAT_TEMPLATE: &str = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n\
{% for message in messages %}{% if message['role'] == 'user' %}### 指示:\n{{ message['content'] }}\n\n### 応答:\n\
{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n\n{% endif %}{% endfor %}";

/// The model card's decoding defaults, in the keys llama.cpp's samplers read. Beam search has no llama.cpp key.
const SAMPLING: &[(&str, f32)] = &[("general.sampling.temp", 0.7), ("general.sampling.penalty_repeat", 1.5)];

pub fn plan(
    cfg: &AsagiConfig,
    ckpt: &Checkpoint,
    vocab: &Vocab,
    ty: LlmType,
    info: &ModelInfo,
    path: PathBuf,
) -> Result<FilePlan> {
    let t = &cfg.text;
    let embed = ckpt.get(&format!("{PREFIX}embed_tokens.weight"))?;
    let n_vocab = embed.shape.first().copied().unwrap_or(0);
    let (h, hd, f) = (t.hidden, t.head_dim, t.ffn);
    let q_rows = t.n_head * hd;
    let kv_rows = t.n_head_kv * hd;
    let tt = |role: Role, ne0: usize| ty.tensor_type(role, ne0, t.n_layer);

    let mut tensors = vec![TensorPlan::direct(
        ckpt,
        "token_embd.weight",
        &format!("{PREFIX}embed_tokens.weight"),
        tt(Role::TokenEmbd, h),
        &[n_vocab, h],
    )?];
    for i in 0..t.n_layer {
        for &(gguf, hf, kind) in LAYER {
            let (shape, role, rows): (Vec<usize>, Role, RowMap) = match kind {
                Kind::Norm => (vec![h], Role::KeepF32, RowMap::Identity),
                // Q and K rows are permuted for ggml's normal-mode RoPE (see RowMap::PermuteQK).
                Kind::Q => (vec![q_rows, h], Role::Weight, RowMap::PermuteQK { head_dim: hd }),
                Kind::K => (vec![kv_rows, h], Role::Weight, RowMap::PermuteQK { head_dim: hd }),
                Kind::V => (vec![kv_rows, h], Role::AttnV(i), RowMap::Identity),
                Kind::Out => (vec![h, q_rows], Role::Weight, RowMap::Identity),
                Kind::Gate | Kind::Up => (vec![f, h], Role::Weight, RowMap::Identity),
                Kind::Down => (vec![h, f], Role::FfnDown(i), RowMap::Identity),
            };
            let ne0 = *shape.last().unwrap();
            let src = format!("{PREFIX}layers.{i}.{hf}");
            tensors.push(
                TensorPlan::direct(ckpt, &format!("blk.{i}.{gguf}"), &src, tt(role, ne0), &shape)?.with_rows(rows),
            );
        }
    }
    tensors.push(TensorPlan::direct(
        ckpt,
        "output_norm.weight",
        &format!("{PREFIX}norm.weight"),
        tt(Role::KeepF32, h),
        &[h],
    )?);
    tensors.push(TensorPlan::direct(
        ckpt,
        "output.weight",
        "language_model.lm_head.weight",
        tt(Role::Output, h),
        &[n_vocab, h],
    )?);

    let mut keys: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(&info.name)),
    ];
    if let Some(l) = &info.license {
        keys.push(("general.license".into(), s(l)));
    }
    if let Some(r) = &info.source_repo {
        keys.push(("general.source.huggingface.repository".into(), s(r)));
    }
    keys.extend([
        ("general.file_type".into(), Value::U32(ty.ftype())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.context_length".into(), u32v(t.n_ctx)),
        ("llama.embedding_length".into(), u32v(h)),
        ("llama.block_count".into(), u32v(t.n_layer)),
        ("llama.feed_forward_length".into(), u32v(f)),
        ("llama.attention.head_count".into(), u32v(t.n_head)),
        ("llama.attention.head_count_kv".into(), u32v(t.n_head_kv)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(t.rms_eps)),
        ("llama.rope.freq_base".into(), Value::F32(t.rope_theta)),
        ("llama.rope.dimension_count".into(), u32v(hd)),
        ("llama.vocab_size".into(), u32v(n_vocab)),
    ]);
    keys.extend(tokenizer_keys(cfg, vocab));
    for &(k, v) in SAMPLING {
        keys.push((k.into(), Value::F32(v)));
    }
    keys.push(("general.sampling.top_k".into(), Value::I32(50)));
    // HF's repetition penalty covers the whole context; llama.cpp's -1 means the whole context too.
    keys.push(("general.sampling.penalty_last_n".into(), Value::I32(-1)));
    Ok(FilePlan { path, keys, tensors })
}

fn tokenizer_keys(cfg: &AsagiConfig, vocab: &Vocab) -> Vec<(String, Value)> {
    let mut keys: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), s("llama")),
        ("tokenizer.ggml.pre".into(), s("default")),
        ("tokenizer.ggml.tokens".into(), Value::Array(Array::Str(vocab.tokens.clone()))),
        ("tokenizer.ggml.scores".into(), Value::Array(Array::F32(vocab.scores.clone()))),
        ("tokenizer.ggml.token_type".into(), Value::Array(Array::I32(vocab.types.iter().map(|&t| t as i32).collect()))),
    ];
    let ids = [
        ("tokenizer.ggml.bos_token_id", vocab.bos),
        ("tokenizer.ggml.eos_token_id", vocab.eos),
        ("tokenizer.ggml.unknown_token_id", vocab.unk),
        ("tokenizer.ggml.padding_token_id", cfg.pad_token_id.map(|p| p as u32)),
        // Asagi learned to emit its <pad> after an answer: as EOT, llama.cpp stops on it.
        ("tokenizer.ggml.eot_token_id", vocab.id_of("<pad>")),
    ];
    for (k, v) in ids {
        if let Some(v) = v {
            keys.push((k.into(), Value::U32(v)));
        }
    }
    keys.extend([
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(vocab.add_bos)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(vocab.add_eos)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(vocab.add_space_prefix)),
        ("tokenizer.huggingface.json".into(), s(&vocab.hf_json)),
        ("tokenizer.chat_template".into(), s(CHAT_TEMPLATE)),
        ("asagi.image_token_id".into(), u32v(cfg.image_token_id)),
    ]);
    keys
}
