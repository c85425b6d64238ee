//! llm-jp-3 on ggml, in the style of llama.cpp's `src/models/llama.cpp`: hyperparameters, tensors, graph.
//!
//! The weights come from a GGUF whose Q/K rows were permuted by the converter (as llama.cpp's does), so RoPE runs
//! in ggml's normal mode (adjacent pairs); see `asagi_convert::plan::RowMap`.

use anyhow::{bail, Result};
use ggml::gguf::GgufFile;
use ggml::{Context, RopeMode, RopeParams, Tensor};

use super::hparams::HParams;

/// One transformer block's weights.
pub struct Layer<'a> {
    pub attn_norm: Tensor<'a>,
    pub wq: Tensor<'a>,
    pub wk: Tensor<'a>,
    pub wv: Tensor<'a>,
    pub wo: Tensor<'a>,
    pub ffn_norm: Tensor<'a>,
    pub ffn_gate: Tensor<'a>,
    pub ffn_up: Tensor<'a>,
    pub ffn_down: Tensor<'a>,
}

/// The language model: hyperparameters and weight handles into a (memory-mapped) GGUF file.
pub struct LlamaModel<'a> {
    pub hp: HParams,
    pub tok_embd: Tensor<'a>,
    pub layers: Vec<Layer<'a>>,
    pub output_norm: Tensor<'a>,
    pub output: Tensor<'a>,
}

impl<'a> LlamaModel<'a> {
    /// Checks every tensor's presence and shape against the hyperparameters (so that no graph op can fail on a
    /// user's file) and collects the handles.
    pub fn load(file: &'a GgufFile) -> Result<LlamaModel<'a>> {
        Self::load_with(file, &[])
    }

    /// As `load`, taking the tensors that `placed` holds (copies uploaded to a GPU or repacked for the CPU, see
    /// `crate::weights`) from there and the others from the file.
    pub fn load_with(file: &'a GgufFile, placed: &'a [Context]) -> Result<LlamaModel<'a>> {
        let hp = HParams::read(file)?;
        let get = |name: &str, ne: &[usize]| -> Result<Tensor<'a>> {
            let Some(t) = placed.iter().find_map(|c| c.get_tensor(name)).or_else(|| file.tensor(name)) else {
                bail!("{}: missing tensor {name}", file.path().display())
            };
            let n = t.n_dims();
            if t.ne()[..n] != *ne && !(ne.len() > n && ne[n..].iter().all(|&d| d == 1) && t.ne()[..n] == ne[..n]) {
                bail!("{}: tensor {name} has shape {:?}, expected {ne:?}", file.path().display(), &t.ne()[..n]);
            }
            Ok(t)
        };
        let (e, kv, ff) = (hp.n_embd, hp.n_embd_kv(), hp.n_ff);
        let layers = (0..hp.n_layer)
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}.weight");
                Ok(Layer {
                    attn_norm: get(&n("attn_norm"), &[e])?,
                    wq: get(&n("attn_q"), &[e, e])?,
                    wk: get(&n("attn_k"), &[e, kv])?,
                    wv: get(&n("attn_v"), &[e, kv])?,
                    wo: get(&n("attn_output"), &[e, e])?,
                    ffn_norm: get(&n("ffn_norm"), &[e])?,
                    ffn_gate: get(&n("ffn_gate"), &[e, ff])?,
                    ffn_up: get(&n("ffn_up"), &[e, ff])?,
                    ffn_down: get(&n("ffn_down"), &[ff, e])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n_tensors = file.tensor_infos().len();
        let expected = 3 + 9 * hp.n_layer;
        if n_tensors != expected {
            bail!(
                "{}: {n_tensors} tensors, a llama model of {} layers has {expected}",
                file.path().display(),
                hp.n_layer
            );
        }
        Ok(LlamaModel {
            tok_embd: get("token_embd.weight", &[e, hp.n_vocab])?,
            output_norm: get("output_norm.weight", &[e])?,
            output: get("output.weight", &[e, hp.n_vocab])?,
            layers,
            hp,
        })
    }
}

/// True for the weights used only as the first operand of a matrix product (all 2-D weights but the token
/// embeddings, which are gathered by row): the ones a CPU repack buffer may take.
pub fn is_matmul_weight(name: &str) -> bool {
    name != "token_embd.weight" && !name.ends_with("_norm.weight")
}

/// The names of the block tensors (`blk.N.*`) of the blocks `N` for which `keep` holds.
pub fn block_tensor_names(file: &GgufFile, keep: impl Fn(usize) -> bool) -> Vec<String> {
    file.tensor_infos()
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| {
            n.strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(&keep)
        })
        .collect()
}

/// The tensors a GPU takes with `-ngl n`, as llama.cpp offloads them: the last `n` blocks, and the output
/// layer too once `n` exceeds the block count.
pub fn offloaded_tensors(file: &GgufFile, n_gpu_layers: usize) -> Result<Vec<String>> {
    let hp = HParams::read(file)?;
    let first = hp.n_layer.saturating_sub(n_gpu_layers);
    let mut names = block_tensor_names(file, |i| i >= first);
    if n_gpu_layers > hp.n_layer {
        names.extend(["output_norm.weight".to_string(), "output.weight".to_string()]);
    }
    Ok(names)
}

/// Inputs of one forward pass, as graph tensors (filled by the session after allocation).
pub struct GraphInputs<'g> {
    /// I32 token ids `[n_tokens]`, or F32 embeddings `[n_embd, n_tokens]`.
    pub tokens: Option<Tensor<'g>>,
    pub embeddings: Option<Tensor<'g>>,
    /// I32 positions `[n_tokens]`.
    pub pos: Tensor<'g>,
    /// F16 attention mask `[n_kv, n_tokens]`: 0 where a token may attend to a cache cell, -inf elsewhere.
    pub mask: Tensor<'g>,
    /// I64 cache cells the new K/V rows go to `[n_tokens]`.
    pub kv_idx: Tensor<'g>,
    /// I32 rows whose logits are wanted `[n_outputs]`.
    pub out_ids: Tensor<'g>,
}

/// Per-layer KV cache tensors: `[head_dim * n_head_kv, n_cells]` each.
pub struct CacheTensors<'g> {
    pub k: Vec<Tensor<'g>>,
    pub v: Vec<Tensor<'g>>,
}

impl<'g> CacheTensors<'g> {
    /// The tensors of a KV cache's contexts (`cache_k_l{il}`, `cache_v_l{il}`, as `KvCache::new` names them).
    pub fn of(ctxs: &'g [std::rc::Rc<Context>], n_layer: usize) -> CacheTensors<'g> {
        let get = |n: String| ctxs.iter().find_map(|c| c.get_tensor(&n)).expect("made by KvCache::new");
        CacheTensors {
            k: (0..n_layer).map(|il| get(format!("cache_k_l{il}"))).collect(),
            v: (0..n_layer).map(|il| get(format!("cache_v_l{il}"))).collect(),
        }
    }
}

impl LlamaModel<'_> {
    /// Builds the forward graph for `n_tokens` new tokens attending to the first `n_kv` cache cells. Returns the
    /// logits tensor `[n_vocab, n_outputs]`.
    pub fn build_graph<'g>(
        &'g self,
        ctx: &'g Context,
        gf: &mut ggml::Graph<'g>,
        inp: &GraphInputs<'g>,
        cache: &CacheTensors<'g>,
        n_tokens: usize,
        n_kv: usize,
    ) -> Tensor<'g> {
        let hp = &self.hp;
        let (hd, nh, nkv) = (hp.head_dim, hp.n_head, hp.n_head_kv);
        let rope = RopeParams::plain(hd, RopeMode::Normal, hp.rope_base, hp.n_ctx_train);
        let kq_scale = 1.0 / (hd as f32).sqrt();
        let n_out = inp.out_ids.ne()[0];
        // Matrix products go through `mul_mat_few`: ggml's `mul_mat`, except that a beam step's few rows times a
        // Q6_K weight (the output layer, half the `attn_v`/`ffn_down` of the Q4_K_M mix) unpack each weight block
        // once for all rows instead of once per row, with ggml's results bit for bit.

        let mut x = match (inp.tokens, inp.embeddings) {
            (Some(ids), _) => ctx.get_rows(self.tok_embd, ids).named("inp_embd"),
            (None, Some(e)) => e,
            (None, None) => unreachable!("the session always sets one input"),
        };
        for (il, l) in self.layers.iter().enumerate() {
            let name = |s: &str| format!("{s}-{il}");
            let inp_sa = x;
            let cur = ctx.mul(ctx.rms_norm(x, hp.rms_eps).named(&name("norm")), l.attn_norm).named(&name("attn_norm"));

            // Self-attention.
            let q = ctx.reshape(ctx.mul_mat_few(l.wq, cur), &[hd, nh, n_tokens]).named(&name("Qcur"));
            let k = ctx.reshape(ctx.mul_mat_few(l.wk, cur), &[hd, nkv, n_tokens]).named(&name("Kcur"));
            let v = ctx.mul_mat_few(l.wv, cur).named(&name("Vcur"));
            let q = ctx.rope_ext(q, inp.pos, rope).named(&name("Qcur_rope"));
            let k = ctx.rope_ext(k, inp.pos, rope).named(&name("Kcur_rope"));
            // Store the new K/V rows in their cache cells before the attention reads the cache.
            gf.build_forward_expand(ctx.set_rows(cache.k[il], ctx.reshape(k, &[hd * nkv, n_tokens]), inp.kv_idx));
            gf.build_forward_expand(ctx.set_rows(cache.v[il], v, inp.kv_idx));
            let kv_view = |c: Tensor<'g>| {
                let es = c.nb()[0];
                let t = ctx.view(c, &[hd, nkv, n_kv], &[hd * es, hd * nkv * es], 0);
                ctx.permute(t, [0, 2, 1, 3]) // [hd, n_kv, n_head_kv]
            };
            let qp = ctx.permute(q, [0, 2, 1, 3]); // [hd, n_tokens, n_head]
            let attn = ctx.flash_attn_ext(qp, kv_view(cache.k[il]), kv_view(cache.v[il]), Some(inp.mask), kq_scale);
            let attn = ctx.reshape(attn, &[hd * nh, n_tokens]).named(&name("kqv_out"));
            let mut cur = ctx.mul_mat_few(l.wo, attn).named(&name("attn_out"));
            let mut inp_sa = inp_sa;
            if il + 1 == self.layers.len() && n_out < n_tokens {
                // Past the last attention only the rows whose logits are wanted go on (llama.cpp's inp_out_ids):
                // a prompt's last feed-forward runs for one row, not for all of them.
                cur = ctx.get_rows(cur, inp.out_ids);
                inp_sa = ctx.get_rows(inp_sa, inp.out_ids);
            }
            let ffn_inp = ctx.add(cur, inp_sa).named(&name("ffn_inp"));

            // SwiGLU feed-forward.
            let cur = ctx.mul(ctx.rms_norm(ffn_inp, hp.rms_eps), l.ffn_norm).named(&name("ffn_norm"));
            let gate = ctx.mul_mat_few(l.ffn_gate, cur).named(&name("ffn_gate"));
            let up = ctx.mul_mat_few(l.ffn_up, cur).named(&name("ffn_up"));
            let cur = ctx.mul_mat_few(l.ffn_down, ctx.swiglu_split(gate, up)).named(&name("ffn_out"));
            x = ctx.add(cur, ffn_inp).named(&name("l_out"));
        }
        let x = match self.layers.is_empty() && n_out < n_tokens {
            true => ctx.get_rows(x, inp.out_ids),
            false => x,
        };
        let x = ctx.mul(ctx.rms_norm(x, hp.rms_eps), self.output_norm).named("result_norm");
        let logits = ctx.mul_mat_few(self.output, x).named("result_output").set_output();
        gf.build_forward_expand(logits);
        logits
    }
}
