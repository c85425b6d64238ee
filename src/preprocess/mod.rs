//! Image preprocessing identical to HF's `SiglipImageProcessor` (transformers 4.45.1) as used by Asagi
//! (spec asagi-model.md §5): decode and `convert("RGB")` like PIL, resize to exactly `size` x `size` with PIL's
//! bicubic filter on uint8 (aspect ratio not kept, no crop, no pad), then rescale and normalise to CHW f32.
//!
//! - [`decode`]: file / memory -> `RgbImage`, PIL's conversion rules, size guards.
//! - [`resize`]: Pillow's bicubic resampler, bit for bit.
//! - [`pixel_values`]: HF's rescale + normalise float math.

pub mod decode;
pub mod resize;

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;

pub use decode::{load_rgb, load_rgb_from_memory, MAX_IMAGE_PIXELS};
pub use resize::resize_bicubic;

/// The `preprocessor_config.json` values that matter (SigLIP: 384, mean = std = 0.5, rescale 1/255).
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    /// Target height and width in pixels.
    pub size: usize,
    /// `image_mean`, per channel (HF casts it to the image's float32 dtype).
    pub mean: [f32; 3],
    /// `image_std`, per channel (float32 too).
    pub std: [f32; 3],
    /// `rescale_factor`. f64 on purpose: HF multiplies the uint8 values by this Python float **in f64** and
    /// only then casts to f32; with 1/255 rounded to f32 first, 126 of the 256 levels come out one ulp off.
    pub rescale: f64,
}

impl PreprocessConfig {
    /// SigLIP's processor config at a given size: mean = std = 0.5, rescale 1/255.
    pub fn siglip(size: usize) -> Self {
        PreprocessConfig { size, mean: [0.5; 3], std: [0.5; 3], rescale: 1.0 / 255.0 }
    }
}

/// HF's rescale + normalise of an RGB image, laid out CHW (`[3, H, W]`, planar, row-major) as f32.
///
/// Per value: `f32(u8 as f64 * rescale)` (HF `rescale`: f64 product, then `astype(float32)`), then
/// `(x - mean) / std` in f32 (HF `normalize` makes mean/std float32 arrays). The image is not resized here:
/// call [`resize_bicubic`] first (or use [`preprocess_image`]).
pub fn pixel_values(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    // 256-entry table per channel: the same arithmetic for every pixel, computed once.
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, t) in table.iter_mut().enumerate() {
            let rescaled = (v as f64 * cfg.rescale) as f32;
            *t = (rescaled - cfg.mean[c]) / cfg.std[c];
        }
    }
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = lut[c][p.0[c] as usize];
        }
    }
    out
}

/// Resize to `cfg.size` x `cfg.size` (PIL bicubic) and normalise: HF's `pixel_values` for one image,
/// `[3, size, size]` f32.
pub fn preprocess_image(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    let s = cfg.size as u32;
    pixel_values(&resize_bicubic(img, s, s), cfg)
}

/// Decode, convert to RGB, resize and normalise an image file: `[3, size, size]` f32 `pixel_values`.
pub fn preprocess_file(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    check_size(cfg).with_context(|| format!("{}: cannot preprocess", path.display()))?;
    Ok(preprocess_image(&load_rgb(path)?, cfg))
}

/// As `preprocess_file`, for an encoded image held in memory; `name` names it in errors.
pub fn preprocess_bytes(bytes: &[u8], name: &str, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    check_size(cfg).with_context(|| format!("{name}: cannot preprocess"))?;
    Ok(preprocess_image(&load_rgb_from_memory(bytes, name)?, cfg))
}

/// A target size that fits a u32 and is not zero (an image side is a u32).
fn check_size(cfg: &PreprocessConfig) -> Result<()> {
    anyhow::ensure!(cfg.size > 0 && u32::try_from(cfg.size).is_ok(), "invalid target size {}", cfg.size);
    Ok(())
}
