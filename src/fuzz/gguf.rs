//! Target `gguf`: a GGUF file as the runtime opens it. The first byte is the file's role (even: a language model;
//! odd: an mmproj, paired with the reference language model), the rest the file.
//!
//! Oracle: a file that opens and passes the model's validation (hyperparameters, tensor names, types and shapes,
//! tokenizer) runs: a prompt prefill and, for an mmproj, an image encode and its prefill must succeed.

use std::path::Path;

use anyhow::Result;

use super::Fuzzer;
use crate::llm::Input;
use crate::load::{Loaded, ModelArgs};
use crate::vision::VisionEncoder;

/// The context of the checks: room for a short prompt and a micro image.
const N_CTX: usize = 64;

impl Fuzzer {
    pub fn gguf(&self, data: &[u8]) -> bool {
        let Some((&role, file)) = data.split_first() else { return false };
        let path = self.path("input.gguf");
        std::fs::write(&path, file).expect("scratch folder writable");
        let r = if role & 1 == 0 { check_runs(&path, None) } else { check_runs(&self.reference().llm, Some(&path)) };
        r.is_ok()
    }
}

/// Opens the model (and mmproj) as `run` does; if that succeeds, runs it and panics if running fails. Returns the
/// validation error otherwise.
pub(super) fn check_runs(llm: &Path, mmproj: Option<&Path>) -> Result<()> {
    let mut a = ModelArgs::new(llm.to_path_buf(), mmproj.map(Path::to_path_buf));
    a.ctx_size = Some(N_CTX);
    a.threads = Some(1);
    let loaded = Loaded::open(&a, mmproj.is_some())?;
    let model = loaded.model()?;
    let vision = loaded.vision(&model)?;
    let backends = loaded.backends();
    let mut session = loaded.session(&model, &backends)?;
    let mut ids = loaded.tok.encode("画像について教えて", true)?;
    ids.truncate(8);
    if ids.is_empty() {
        ids.push(0);
    }
    let name = llm.display().to_string() + &mmproj.map(|p| format!(" + {}", p.display())).unwrap_or_default();
    let logits = session
        .prefill(Input::Tokens(&ids), 0, 0, false)
        .unwrap_or_else(|e| panic!("{name} passed validation but a prefill of {ids:?} failed: {e:#}"));
    assert_eq!(logits.len(), model.hp.n_vocab, "{name}: logits of one position");
    if let Some(v) = &vision {
        let mut enc = VisionEncoder::new(v, &backends)
            .unwrap_or_else(|e| panic!("{name} passed validation but its encoder cannot be made: {e:#}"));
        let s = v.hp.image_size;
        let pixels: Vec<f32> = (0..3 * s * s).map(|i| ((i % 17) as f32 / 8.0) - 1.0).collect();
        let emb = enc
            .encode_pixels(&pixels, 1)
            .unwrap_or_else(|e| panic!("{name} passed validation but encoding an image failed: {e:#}"))
            .pop()
            .expect("one embedding");
        assert_eq!(emb.data.len(), emb.n_tokens * model.hp.n_embd, "{name}: embedding shape");
        if ids.len() + emb.n_tokens <= N_CTX {
            session
                .prefill(Input::Embeddings(&emb.data), 0, ids.len() as i32, false)
                .unwrap_or_else(|e| panic!("{name} passed validation but the image prefill failed: {e:#}"));
        }
    }
    Ok(())
}
