//! Hyperparameters of an Asagi mmproj GGUF (`clip` keys as llama.cpp's mtmd reads them, plus `asagi.*`).

use anyhow::{bail, Result};
use ggml::gguf::{Array, GgufFile, Value};

use crate::preprocess::PreprocessConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (SigLIP's gelu_pytorch_tanh; llama.cpp's `clip.use_gelu`).
    GeluTanh,
    /// exact erf GELU (PyTorch "gelu": the LLaVA projector).
    GeluErf,
}

impl Activation {
    fn parse(f: &GgufFile, key: &str, default: Activation) -> Result<Activation> {
        match f.get(key) {
            None => Ok(default),
            Some(Value::Str(s)) if s == "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            Some(Value::Str(s)) if s == "gelu" => Ok(Activation::GeluErf),
            Some(v) => bail!("{}: {key} = {v:?} is not supported", f.path().display()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct VisionHParams {
    pub image_size: usize,
    pub patch_size: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub eps: f32,
    pub act: Activation,
    pub projector_act: Activation,
    /// HF "default": drop the first patch (728 image tokens at full size); "full": keep all.
    pub drop_first_patch: bool,
    /// Output width (the language model's embedding size).
    pub n_mmproj: usize,
    pub preprocess: PreprocessConfig,
}

impl VisionHParams {
    pub fn read(f: &GgufFile) -> Result<VisionHParams> {
        if f.str("general.architecture")? != "clip" || f.str("clip.projector_type")? != "mlp" {
            bail!(
                "{}: not an mmproj of an mlp projector (general.architecture clip, clip.projector_type mlp)",
                f.path().display()
            );
        }
        let u = |k: &str| f.u32(&format!("clip.vision.{k}")).map(|v| v as usize);
        let n_layer = u("block_count")?;
        let n_layer = match f.get("clip.vision.feature_layer") {
            Some(Value::Array(Array::I32(v))) if v.len() == 1 && v[0] >= 1 && v[0] as usize <= n_layer => v[0] as usize,
            None => n_layer,
            Some(v) => {
                bail!("{}: clip.vision.feature_layer {v:?} is not one layer in 1..={n_layer}", f.path().display())
            }
        };
        let arr3 = |k: &str| -> Result<[f32; 3]> {
            match f.get(k) {
                Some(Value::Array(Array::F32(v))) if v.len() >= 3 => Ok([v[0], v[1], v[2]]),
                other => bail!("{}: {k} should be 3 floats, found {other:?}", f.path().display()),
            }
        };
        let strategy = match f.get("asagi.vision.feature_select_strategy") {
            Some(Value::Str(s)) => s,
            // llama.cpp's files keep every patch.
            _ => "full".into(),
        };
        let image_size = u("image_size")?;
        let hp = VisionHParams {
            image_size,
            patch_size: u("patch_size")?,
            n_embd: u("embedding_length")?,
            n_ff: u("feed_forward_length")?,
            n_head: u("attention.head_count")?,
            n_layer,
            eps: f.f32("clip.vision.attention.layer_norm_epsilon")?,
            act: Activation::parse(f, "asagi.vision.hidden_act", Activation::GeluTanh)?,
            projector_act: Activation::parse(f, "asagi.projector.hidden_act", Activation::GeluTanh)?,
            drop_first_patch: match strategy.as_str() {
                "default" => true,
                "full" => false,
                s => bail!("{}: asagi.vision.feature_select_strategy {s:?}", f.path().display()),
            },
            n_mmproj: 0,
            preprocess: PreprocessConfig {
                size: image_size,
                mean: arr3("clip.vision.image_mean")?,
                std: arr3("clip.vision.image_std")?,
                // The file stores the factor as f32; HF multiplies by the f64 1/255 (see PreprocessConfig).
                rescale: match f.get("asagi.image.rescale_factor") {
                    Some(Value::F32(v)) if (v as f64 - 1.0 / 255.0).abs() > 1e-7 => v as f64,
                    _ => 1.0 / 255.0,
                },
            },
        };
        if hp.patch_size == 0 || hp.image_size < hp.patch_size || hp.n_head == 0 || hp.n_embd % hp.n_head != 0 {
            bail!("{}: inconsistent vision hyperparameters {hp:?}", f.path().display());
        }
        Ok(hp)
    }

    /// Patches per side (the last image_size % patch_size pixels are unused, as in HF).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn n_patches(&self) -> usize {
        self.patches_per_side().pow(2)
    }

    /// Image tokens per image handed to the language model.
    pub fn n_image_tokens(&self) -> usize {
        self.n_patches() - self.drop_first_patch as usize
    }
}
