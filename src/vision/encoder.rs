//! Encoding images: preprocessing, the vision graph on a scheduler, the embeddings out.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use ggml::{Backend, Context, Scheduler, Type};

use super::model::VisionModel;
use crate::preprocess;

/// Embeddings of one image, ready for the language model.
#[derive(Clone)]
pub struct ImageEmbedding {
    /// `[n_tokens, n_embd]` row-major; shared (the image cache and the requests using an image hold the same rows).
    pub data: Arc<Vec<f32>>,
    pub n_tokens: usize,
    /// Vision features before the projector, `[n_tokens, vision width]` (for parity checks).
    pub features: Vec<f32>,
}

pub struct VisionEncoder<'a> {
    pub model: &'a VisionModel<'a>,
    sched: Scheduler<'a>,
    max_nodes: usize,
    backends: Vec<&'a Backend>,
}

impl<'a> VisionEncoder<'a> {
    pub fn new(model: &'a VisionModel<'a>, backends: &[&'a Backend]) -> Result<VisionEncoder<'a>> {
        let max_nodes = 64 + 80 * model.hp.n_layer;
        let mut sched = Scheduler::new(backends, max_nodes)?;
        // Reserve the compute buffers for one image now (they are only reserved: pages become resident when the
        // first image is encoded), so that `compute_bytes` is known before anything is computed.
        {
            let s = model.hp.image_size;
            let ctx = Context::new(max_nodes * 2, max_nodes)?;
            let inp = ctx.new_tensor(Type::F32, &[s, s, 3, 1]).named("inp_raw").set_input();
            let mut gf = ctx.new_graph(max_nodes);
            model.build_graph(&ctx, &mut gf, inp, 1);
            sched.reserve(&gf)?;
        }
        Ok(VisionEncoder { model, sched, max_nodes, backends: backends.to_vec() })
    }

    /// Bytes of the compute buffers on the host (the GPU's are not host memory).
    pub fn compute_bytes(&self) -> usize {
        self.backends.iter().filter(|b| b.is_cpu()).map(|b| self.sched.buffer_size(b)).sum()
    }

    /// Reads, preprocesses (exactly as HF's SiglipImageProcessor) and encodes an image file.
    pub fn encode_file(&mut self, path: &Path) -> Result<ImageEmbedding> {
        let px = preprocess::preprocess_file(path, &self.model.hp.preprocess)?;
        Ok(self.encode_pixels(&px, 1)?.pop().expect("one image"))
    }

    /// As `encode_file`, for an encoded image (PNG, JPEG...) held in memory; `name` names it in errors.
    pub fn encode_bytes(&mut self, bytes: &[u8], name: &str) -> Result<ImageEmbedding> {
        let px = preprocess::preprocess_bytes(bytes, name, &self.model.hp.preprocess)?;
        Ok(self.encode_pixels(&px, 1)?.pop().expect("one image"))
    }

    /// Encodes `n_img` preprocessed images (`[n_img, 3, S, S]` row-major) in one batch.
    pub fn encode_pixels(&mut self, pixels: &[f32], n_img: usize) -> Result<Vec<ImageEmbedding>> {
        let hp = &self.model.hp;
        let s = hp.image_size;
        if n_img == 0 || pixels.len() != n_img * 3 * s * s {
            bail!("{} pixel values for {n_img} images of 3x{s}x{s}", pixels.len());
        }
        let ctx = Context::new(self.max_nodes * 2, self.max_nodes)?;
        let inp = ctx.new_tensor(Type::F32, &[s, s, 3, n_img]).named("inp_raw").set_input();
        let mut gf = ctx.new_graph(self.max_nodes);
        let (feats, out) = self.model.build_graph(&ctx, &mut gf, inp, n_img);
        self.sched.alloc(&gf)?;
        self.sched.write(inp, pixels)?;
        self.sched.compute(&gf)?;
        let (emb, fts) = (self.sched.read::<f32>(out)?, self.sched.read::<f32>(feats)?);
        let n_tok = hp.n_image_tokens();
        let (eo, ef) = (emb.len() / n_img, fts.len() / n_img);
        Ok((0..n_img)
            .map(|i| ImageEmbedding {
                data: Arc::new(emb[i * eo..(i + 1) * eo].to_vec()),
                n_tokens: n_tok,
                features: fts[i * ef..(i + 1) * ef].to_vec(),
            })
            .collect())
    }
}
