//! `asagi-gguf synth`: a random-weight Hugging Face Asagi checkpoint with the real shapes, config, tokenizer files
//! and preprocessor config, which `convert` accepts like a real one. For benchmarks and `demo`: values do not
//! change speed. Written streaming (bf16 safetensors, sharded like the hub's), so it needs little memory.
//! The values come from a counter-based generator specified bit for bit ([`init`]), which the Python reference
//! reproduces: the `fullwidth` size is the fidelity fixture whose HF goldens are committed
//! (tests/fixtures/golden/fullwidth, tests/fullwidth_parity.rs).

mod init;
mod safetensors_out;
mod tokenizer;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

pub use init::TensorInit;
pub use safetensors_out::ShardedWriter;

/// Shapes of one Asagi size. The language models are llm-jp-3's (`text_config`), the vision tower is SigLIP
/// so400m-patch14-384 in all sizes, the projector's hidden width is the text width (2B/4B) or twice it (8B/14B,
/// "expand-projector"; see ../shared/spec/asagi-model.md §2).
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub name: &'static str,
    pub hidden: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub ffn: usize,
    pub projector: usize,
    /// Tokenizer entries (base vocabulary + `<image>` + `<pad>`); the embedding has `vocab_rows` rows.
    pub tokenizer_len: usize,
    pub vocab_rows: usize,
    pub v_hidden: usize,
    pub v_layers: usize,
    pub v_heads: usize,
    pub v_ffn: usize,
    pub image_size: usize,
    pub max_positions: usize,
}

const SIGLIP: (usize, usize, usize, usize, usize) = (1152, 27, 16, 4304, 384);

const fn asagi(name: &'static str, hidden: usize, n_layer: usize, n_head: usize, ffn: usize, projector: usize) -> Size {
    Size {
        name,
        hidden,
        n_layer,
        n_head,
        ffn,
        projector,
        tokenizer_len: 99_576,
        vocab_rows: 99_584,
        v_hidden: SIGLIP.0,
        v_layers: SIGLIP.1,
        v_heads: SIGLIP.2,
        v_ffn: SIGLIP.3,
        image_size: SIGLIP.4,
        max_positions: 4096,
    }
}

pub const SIZES: &[Size] = &[
    asagi("2b", 2048, 24, 16, 7168, 2048),
    asagi("4b", 3072, 28, 24, 8192, 3072),
    asagi("8b", 4096, 32, 32, 11008, 8192),
    asagi("14b", 5120, 40, 40, 13824, 10240),
    // A few MB: what `demo` runs. Same structure; the vision FFN (144) is not a multiple of 32, as SigLIP's 4304.
    Size {
        name: "tiny",
        hidden: 256,
        n_layer: 2,
        n_head: 4,
        ffn: 512,
        projector: 256,
        tokenizer_len: 2_000,
        vocab_rows: 2_048,
        v_hidden: 64,
        v_layers: 3,
        v_heads: 4,
        v_ffn: 144,
        image_size: 56,
        max_positions: 1024,
    },
    // Fuzzing seeds and reference (src/fuzz): the same structure at a few hundred KB, so a fuzzer mutates whole
    // files quickly; 28 px images are 2 x 2 patches.
    Size {
        name: "micro",
        hidden: 64,
        n_layer: 1,
        n_head: 2,
        ffn: 128,
        projector: 64,
        tokenizer_len: 300,
        vocab_rows: 320,
        v_hidden: 32,
        v_layers: 2,
        v_heads: 2,
        v_ffn: 48,
        image_size: 28,
        max_positions: 64,
    },
    // The fidelity fixture: Asagi-2B's widths and vocabulary (head 128, ids above 65535) and the full SigLIP
    // so400m tower at 384 px, but 2 LM layers and 3 vision layers (feature layer -2 uses 2): ~0.9 GB bf16.
    Size { n_layer: 2, v_layers: 3, ..asagi("fullwidth", 2048, 24, 16, 7168, 2048) },
];

/// The size called `name`.
pub fn size(name: &str) -> Result<Size> {
    SIZES.iter().copied().find(|s| s.name.eq_ignore_ascii_case(name)).with_context(|| {
        format!("unknown size {name:?}; one of {}", SIZES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "))
    })
}

/// The tensors of a checkpoint of size `s`: HF name and PyTorch shape.
pub fn tensors(s: &Size) -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let (h, vh) = (s.hidden, s.v_hidden);
    let mut add = |name: String, shape: Vec<usize>| t.push((name, shape));
    let v = "vision_tower.vision_model.";
    add(format!("{v}embeddings.patch_embedding.weight"), vec![vh, 3, 14, 14]);
    add(format!("{v}embeddings.patch_embedding.bias"), vec![vh]);
    add(format!("{v}embeddings.position_embedding.weight"), vec![(s.image_size / 14).pow(2), vh]);
    for i in 0..s.v_layers {
        let l = format!("{v}encoder.layers.{i}.");
        for ln in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}{ln}.weight"), vec![vh]);
            add(format!("{l}{ln}.bias"), vec![vh]);
        }
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{l}self_attn.{p}.weight"), vec![vh, vh]);
            add(format!("{l}self_attn.{p}.bias"), vec![vh]);
        }
        add(format!("{l}mlp.fc1.weight"), vec![s.v_ffn, vh]);
        add(format!("{l}mlp.fc1.bias"), vec![s.v_ffn]);
        add(format!("{l}mlp.fc2.weight"), vec![vh, s.v_ffn]);
        add(format!("{l}mlp.fc2.bias"), vec![vh]);
    }
    // Kept in the checkpoint (as in Asagi's), dropped by the converter.
    add(format!("{v}post_layernorm.weight"), vec![vh]);
    add(format!("{v}post_layernorm.bias"), vec![vh]);
    add(format!("{v}head.probe"), vec![1, 1, vh]);
    add("multi_modal_projector.linear_1.weight".into(), vec![s.projector, vh]);
    add("multi_modal_projector.linear_1.bias".into(), vec![s.projector]);
    add("multi_modal_projector.linear_2.weight".into(), vec![h, s.projector]);
    add("multi_modal_projector.linear_2.bias".into(), vec![h]);
    let m = "language_model.model.";
    add(format!("{m}embed_tokens.weight"), vec![s.vocab_rows, h]);
    for i in 0..s.n_layer {
        let l = format!("{m}layers.{i}.");
        add(format!("{l}input_layernorm.weight"), vec![h]);
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            add(format!("{l}self_attn.{p}.weight"), vec![h, h]);
        }
        add(format!("{l}post_attention_layernorm.weight"), vec![h]);
        add(format!("{l}mlp.gate_proj.weight"), vec![s.ffn, h]);
        add(format!("{l}mlp.up_proj.weight"), vec![s.ffn, h]);
        add(format!("{l}mlp.down_proj.weight"), vec![h, s.ffn]);
    }
    add(format!("{m}norm.weight"), vec![h]);
    add("language_model.lm_head.weight".into(), vec![s.vocab_rows, h]);
    t
}

/// Writes the checkpoint of size `s` into `out` (created; must be empty or absent unless `force`), in shards of
/// at most 4 GiB.
pub fn write(s: &Size, out: &Path, seed: u64, force: bool) -> Result<u64> {
    write_sharded(s, out, seed, force, 4 << 30)
}

/// As [`write`], with shards of at most `max_shard_bytes` (one tensor per shard at least).
pub fn write_sharded(s: &Size, out: &Path, seed: u64, force: bool, max_shard_bytes: usize) -> Result<u64> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() && !force {
        bail!("{} exists and is not empty (use --force)", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let image_token = s.tokenizer_len - 2;
    let pad_token = s.tokenizer_len - 1;
    let config = json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": image_token,
        "pad_token_id": pad_token,
        "projector_hidden_act": "gelu",
        "projector_hidden_size": s.projector,
        "tie_word_embeddings": false,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": s.hidden, "num_hidden_layers": s.n_layer, "num_attention_heads": s.n_head,
            "num_key_value_heads": s.n_head, "intermediate_size": s.ffn, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null,
            "max_position_embeddings": s.max_positions, "vocab_size": s.vocab_rows,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
            "attention_bias": false, "mlp_bias": false, "torch_dtype": "bfloat16"
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": s.v_hidden, "intermediate_size": s.v_ffn,
            "num_hidden_layers": s.v_layers, "num_attention_heads": s.v_heads, "patch_size": 14,
            "image_size": s.image_size, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"
        }
    });
    write_json(out, "config.json", &config)?;
    write_json(
        out,
        "generation_config.json",
        &json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_token}),
    )?;
    write_json(
        out,
        "preprocessor_config.json",
        &json!({
            "image_processor_type": "SiglipImageProcessor", "do_resize": true, "do_rescale": true,
            "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
            "rescale_factor": 1.0 / 255.0, "size": {"height": s.image_size, "width": s.image_size}
        }),
    )?;
    tokenizer::write(out, s.tokenizer_len)?;

    let all = tensors(s);
    let mut w = ShardedWriter::new(out, max_shard_bytes);
    for (name, shape) in &all {
        w.plan(name, shape);
    }
    let init: std::collections::HashMap<&str, TensorInit> =
        all.iter().map(|(name, shape)| (name.as_str(), TensorInit::new(name, shape, s.tokenizer_len, seed))).collect();
    // Each element is a function of its index alone, so a chunk is filled by all cores at once.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    w.write_all(|name, start, out: &mut [u16]| {
        let t = &init[name];
        let per = out.len().div_ceil(threads).max(1 << 16);
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(per).enumerate() {
                s.spawn(move || t.fill(start + i * per, part));
            }
        });
    })
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n").with_context(|| format!("cannot write {}", p.display()))
}
