//! SigLIP vision encoder and the LLaVA 2-layer projector on ggml, in the style of llama.cpp's
//! tools/mtmd/models/siglip.cpp + llava.cpp: patch embedding (conv with bias), learned position embeddings,
//! pre-LN blocks up to the feature layer (no post-LN), optional drop of patch 0, Linear -> GELU -> Linear.

use anyhow::{bail, Result};
use ggml::gguf::GgufFile;
use ggml::{Context, Tensor, Type};

use super::hparams::{Activation, VisionHParams};

pub struct Block<'a> {
    pub ln1_w: Tensor<'a>,
    pub ln1_b: Tensor<'a>,
    pub q_w: Tensor<'a>,
    pub q_b: Tensor<'a>,
    pub k_w: Tensor<'a>,
    pub k_b: Tensor<'a>,
    pub v_w: Tensor<'a>,
    pub v_b: Tensor<'a>,
    pub o_w: Tensor<'a>,
    pub o_b: Tensor<'a>,
    pub ln2_w: Tensor<'a>,
    pub ln2_b: Tensor<'a>,
    pub up_w: Tensor<'a>,
    pub up_b: Tensor<'a>,
    pub down_w: Tensor<'a>,
    pub down_b: Tensor<'a>,
}

pub struct VisionModel<'a> {
    pub hp: VisionHParams,
    pub patch_w: Tensor<'a>,
    pub patch_b: Tensor<'a>,
    pub pos: Tensor<'a>,
    pub blocks: Vec<Block<'a>>,
    pub mm0_w: Tensor<'a>,
    pub mm0_b: Tensor<'a>,
    pub mm2_w: Tensor<'a>,
    pub mm2_b: Tensor<'a>,
}

/// True for the weights used only as the first operand of a matrix product (the attention, FFN and projector
/// matrices): the ones a CPU repack buffer may take. Not the patch kernel (4-D) or the position embeddings.
pub fn is_matmul_weight(name: &str) -> bool {
    const MATRICES: [&str; 6] =
        ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_out.weight", "ffn_up.weight", "ffn_down.weight"];
    (name.starts_with("v.blk.") && MATRICES.iter().any(|m| name.ends_with(m)))
        || name == "mm.0.weight"
        || name == "mm.2.weight"
}

impl<'a> VisionModel<'a> {
    /// Checks every tensor against the hyperparameters and collects the handles.
    pub fn load(file: &'a GgufFile) -> Result<VisionModel<'a>> {
        Self::load_with(file, &[])
    }

    /// As `load`, taking the tensors that `placed` holds (repacked for the CPU, see `crate::weights`) from there.
    pub fn load_with(file: &'a GgufFile, placed: &'a [Context]) -> Result<VisionModel<'a>> {
        let mut hp = VisionHParams::read(file)?;
        let get = |name: &str, ne: &[usize]| -> Result<Tensor<'a>> {
            let Some(t) = placed.iter().find_map(|c| c.get_tensor(name)).or_else(|| file.tensor(name)) else {
                bail!("{}: missing tensor {name}", file.path().display())
            };
            let got = &t.ne()[..ne.len()];
            if got != ne || t.ne()[ne.len()..].iter().any(|&d| d != 1) {
                bail!("{}: tensor {name} has shape {:?}, expected {ne:?}", file.path().display(), t.ne());
            }
            Ok(t)
        };
        let (e, ff, p) = (hp.n_embd, hp.n_ff, hp.patch_size);
        let mm0 = file
            .tensor("mm.0.weight")
            .ok_or_else(|| anyhow::anyhow!("{}: missing tensor mm.0.weight", file.path().display()))?;
        let mm2 = file
            .tensor("mm.2.weight")
            .ok_or_else(|| anyhow::anyhow!("{}: missing tensor mm.2.weight", file.path().display()))?;
        let (p_hidden, n_out) = (mm0.ne()[1], mm2.ne()[1]);
        hp.n_mmproj = n_out;
        let blocks = (0..hp.n_layer)
            .map(|i| {
                let n = |s: &str| format!("v.blk.{i}.{s}");
                Ok(Block {
                    ln1_w: get(&n("ln1.weight"), &[e])?,
                    ln1_b: get(&n("ln1.bias"), &[e])?,
                    q_w: get(&n("attn_q.weight"), &[e, e])?,
                    q_b: get(&n("attn_q.bias"), &[e])?,
                    k_w: get(&n("attn_k.weight"), &[e, e])?,
                    k_b: get(&n("attn_k.bias"), &[e])?,
                    v_w: get(&n("attn_v.weight"), &[e, e])?,
                    v_b: get(&n("attn_v.bias"), &[e])?,
                    o_w: get(&n("attn_out.weight"), &[e, e])?,
                    o_b: get(&n("attn_out.bias"), &[e])?,
                    ln2_w: get(&n("ln2.weight"), &[e])?,
                    ln2_b: get(&n("ln2.bias"), &[e])?,
                    up_w: get(&n("ffn_up.weight"), &[e, ff])?,
                    up_b: get(&n("ffn_up.bias"), &[ff])?,
                    down_w: get(&n("ffn_down.weight"), &[ff, e])?,
                    down_b: get(&n("ffn_down.bias"), &[e])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionModel {
            patch_w: get("v.patch_embd.weight", &[p, p, 3, e])?,
            patch_b: get("v.patch_embd.bias", &[e])?,
            pos: get("v.position_embd.weight", &[e, hp.n_patches()])?,
            blocks,
            mm0_w: get("mm.0.weight", &[e, p_hidden])?,
            mm0_b: get("mm.0.bias", &[p_hidden])?,
            mm2_w: get("mm.2.weight", &[p_hidden, n_out])?,
            mm2_b: get("mm.2.bias", &[n_out])?,
            hp,
        })
    }

    fn act<'g>(ctx: &'g Context, a: &Activation, x: Tensor<'g>) -> Tensor<'g> {
        match a {
            Activation::GeluTanh => ctx.gelu_tanh_precise(x),
            Activation::GeluErf => ctx.gelu_erf(x),
        }
    }

    fn layer_norm<'g>(&self, ctx: &'g Context, x: Tensor<'g>, w: Tensor<'g>, b: Tensor<'g>) -> Tensor<'g> {
        ctx.add(ctx.mul(ctx.norm(x, self.hp.eps), w), b)
    }

    /// The graph for `n_img` images `[S, S, 3, n_img]` (planar RGB, as `pixel_values`). Returns the vision
    /// features (after the select strategy) `[n_embd, n_tokens, n_img]` and the projected embeddings
    /// `[n_mmproj, n_tokens, n_img]`.
    pub fn build_graph<'g>(
        &'g self,
        ctx: &'g Context,
        gf: &mut ggml::Graph<'g>,
        pixels: Tensor<'g>,
        n_img: usize,
    ) -> (Tensor<'g>, Tensor<'g>) {
        let hp = &self.hp;
        let (e, np, nh, p) = (hp.n_embd, hp.n_patches(), hp.n_head, hp.patch_size);
        let hd = e / nh;

        // Patch embedding, a stride-14 convolution written as im2col + matmul so the pixels stay f32 (ggml_conv_2d
        // unfolds them into f16). Patches come out in row-major order, as HF's flatten(2).transpose(1, 2).
        let cols = ctx.im2col(self.patch_w, pixels, hp.patch_size, 0, Type::F32); // [p*p*3, 27, 27, n]
        let cols = ctx.reshape(cols, &[p * p * 3, np * n_img]);
        let kernel = ctx.reshape(self.patch_w, &[p * p * 3, e]);
        let x = ctx.reshape(ctx.mul_mat(kernel, cols), &[e, np, n_img]);
        let x = ctx.add(x, self.patch_b);
        let mut x = ctx.add(x, self.pos).named("inp_pos");

        for (il, b) in self.blocks.iter().enumerate() {
            let name = |s: &str| format!("v_{s}-{il}");
            let inp = x;
            let cur = self.layer_norm(ctx, x, b.ln1_w, b.ln1_b).named(&name("ln1"));
            // Bidirectional attention per image: q/k/v [hd, np, nh, n].
            let split = |w, bias| {
                let t = ctx.add(ctx.mul_mat(w, cur), bias);
                ctx.permute(ctx.reshape(t, &[hd, nh, np, n_img]), [0, 2, 1, 3])
            };
            let (q, k, v) = (split(b.q_w, b.q_b), split(b.k_w, b.k_b), split(b.v_w, b.v_b));
            let attn = ctx.flash_attn_ext(q, k, v, None, 1.0 / (hd as f32).sqrt()); // [hd, nh, np, n]
            let attn = ctx.reshape(attn, &[e, np, n_img]);
            let cur = ctx.add(ctx.mul_mat(b.o_w, attn), b.o_b).named(&name("attn_out"));
            let x1 = ctx.add(cur, inp);
            let cur = self.layer_norm(ctx, x1, b.ln2_w, b.ln2_b).named(&name("ln2"));
            let cur = Self::act(ctx, &hp.act, ctx.add(ctx.mul_mat(b.up_w, cur), b.up_b));
            let cur = ctx.add(ctx.mul_mat(b.down_w, cur), b.down_b).named(&name("ffn_out"));
            x = ctx.add(cur, x1).named(&name("out"));
        }
        // HF's "default" select strategy drops the first patch (a CLIP class-token habit; SigLIP has none).
        let n_tok = hp.n_image_tokens();
        let feats =
            if hp.drop_first_patch { ctx.view(x, &[e, n_tok, n_img], &[x.nb()[1], x.nb()[2]], x.nb()[1]) } else { x };
        let feats = ctx.cont(feats).named("features").set_output();
        let h = Self::act(ctx, &hp.projector_act, ctx.add(ctx.mul_mat(self.mm0_w, feats), self.mm0_b));
        let out = ctx.add(ctx.mul_mat(self.mm2_w, h), self.mm2_b).named("mm_out").set_output();
        gf.build_forward_expand(feats);
        gf.build_forward_expand(out);
        (feats, out)
    }
}
