//! Hyperparameters of an llm-jp-3 (`llama`) language-model GGUF, read and checked against each other.

use anyhow::{bail, Result};
use ggml::gguf::GgufFile;

#[derive(Clone, Debug)]
pub struct HParams {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
}

impl HParams {
    pub fn read(f: &GgufFile) -> Result<HParams> {
        let arch = f.str("general.architecture")?;
        if arch != "llama" {
            bail!("{}: general.architecture is {arch:?}; the language model must be \"llama\"", f.path().display());
        }
        let u = |k: &str| f.u32(&format!("llama.{k}")).map(|v| v as usize);
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = f.get("llama.attention.head_count_kv").map_or(Ok(n_head), |_| u("attention.head_count_kv"))?;
        if n_head == 0 || n_embd % n_head != 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            bail!("{}: {n_head} heads / {n_head_kv} KV heads do not fit embedding_length {n_embd}", f.path().display());
        }
        let head_dim = n_embd / n_head;
        if f.get("llama.rope.dimension_count").is_some() {
            let rot = u("rope.dimension_count")?;
            if rot != head_dim {
                bail!("{}: llama.rope.dimension_count {rot} differs from the head size {head_dim}", f.path().display());
            }
        }
        if f.get("llama.rope.scaling.type").is_some() {
            bail!("{}: RoPE scaling is not supported", f.path().display());
        }
        let embd = f
            .tensor_infos()
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .ok_or_else(|| anyhow::anyhow!("{}: missing tensor token_embd.weight", f.path().display()))?;
        let n_vocab = embd.ne.get(1).copied().unwrap_or(1);
        Ok(HParams {
            n_embd,
            n_layer: u("block_count")?,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: u("feed_forward_length")?,
            n_vocab,
            n_ctx_train: u("context_length")?,
            rms_eps: f.f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_base: f.get("llama.rope.freq_base").map_or(Ok(10000.0), |_| f.f32("llama.rope.freq_base"))?,
        })
    }

    /// Width of the K (and V) projections.
    pub fn n_embd_kv(&self) -> usize {
        self.head_dim * self.n_head_kv
    }
}
