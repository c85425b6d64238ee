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

pub use decode::{load_rgb, load_rgb_from_memory, load_rgb_limited, ImageLimits, MAX_IMAGE_PIXELS};
pub use resize::{resize_bicubic, resize_cost, try_resize_bicubic, ResizeCost};

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

/// Decode, convert to RGB, resize and normalise an image file: `[3, size, size]` f32 `pixel_values`, within the
/// default [`ImageLimits`].
pub fn preprocess_file(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    check_size(cfg).with_context(|| format!("{}: cannot preprocess", path.display()))?;
    let bytes = decode::read_file(path)?;
    Ok(preprocess_checked(&bytes, &path.display().to_string(), cfg, &ImageLimits::default())?.1)
}

/// As `preprocess_file`, for an encoded image held in memory; `name` names it in errors.
pub fn preprocess_bytes(bytes: &[u8], name: &str, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    check_size(cfg).with_context(|| format!("{name}: cannot preprocess"))?;
    Ok(preprocess_checked(bytes, name, cfg, &ImageLimits::default())?.1)
}

/// As [`preprocess_bytes`] within `limits`, for images from untrusted sources: the size, the memory and the
/// resize work are checked from the header before any pixel is decoded (see [`ImageLimits`]), and every
/// refusal names the image (`name`), its size and the limit. Returns the `pixel_values` and
/// [`pixel_hash`] of the decoded image (its identity, e.g. as a cache key).
pub fn preprocess_bytes_limited(
    bytes: &[u8],
    name: &str,
    cfg: &PreprocessConfig,
    limits: &ImageLimits,
) -> Result<(Vec<f32>, [u8; 32])> {
    check_size(cfg).with_context(|| format!("{name}: cannot preprocess"))?;
    let (img, px) = preprocess_checked(bytes, name, cfg, limits)?;
    Ok((px, pixel_hash(&img)))
}

/// The identity of a decoded image: blake3 of its width and height (little-endian u32) and raw RGB pixels.
pub fn pixel_hash(img: &RgbImage) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&img.width().to_le_bytes());
    h.update(&img.height().to_le_bytes());
    h.update(img.as_raw());
    *h.finalize().as_bytes()
}

/// An image decoded and known by its identity ([`pixel_hash`]), not yet resized: a cache of its embeddings is
/// looked up before the resize and the encoder are paid for.
pub struct DecodedImage {
    pub name: String,
    pub img: RgbImage,
    pub hash: [u8; 32],
}

impl DecodedImage {
    /// Reads and decodes an image file within `limits` (checking the resize to `cfg.size` too).
    pub fn open(path: &Path, cfg: &PreprocessConfig, limits: &ImageLimits) -> Result<DecodedImage> {
        let name = path.display().to_string();
        check_size(cfg).with_context(|| format!("{name}: cannot preprocess"))?;
        let bytes = decode::read_file(path)?;
        let s = cfg.size as u32;
        let img = load_rgb_limited(&bytes, &name, limits, Some((s, s)))?;
        let hash = pixel_hash(&img);
        Ok(DecodedImage { name, img, hash })
    }

    /// HF's `pixel_values` of the image (`cfg` as given to `open`).
    pub fn pixel_values(&self, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
        resize_normalise(&self.img, &self.name, cfg)
    }
}

/// Decode within `limits` (checking the resize to `cfg.size` too), resize, normalise; `cfg` already checked.
fn preprocess_checked(
    bytes: &[u8],
    name: &str,
    cfg: &PreprocessConfig,
    limits: &ImageLimits,
) -> Result<(RgbImage, Vec<f32>)> {
    let s = cfg.size as u32;
    let img = load_rgb_limited(bytes, name, limits, Some((s, s)))?;
    let px = resize_normalise(&img, name, cfg)?;
    Ok((img, px))
}

fn resize_normalise(img: &RgbImage, name: &str, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    let s = cfg.size as u32;
    let resized = try_resize_bicubic(img, s, s).map_err(|e| {
        anyhow::anyhow!("image {name}: out of memory resizing {}x{} to {s}x{s} ({e})", img.width(), img.height())
    })?;
    Ok(pixel_values(&resized, cfg))
}

/// A target size that fits a u32 and is not zero (an image side is a u32).
fn check_size(cfg: &PreprocessConfig) -> Result<()> {
    anyhow::ensure!(cfg.size > 0 && u32::try_from(cfg.size).is_ok(), "invalid target size {}", cfg.size);
    Ok(())
}

/// Hand-made PNG chunks, shared with the integration tests.
#[cfg(test)]
#[path = "../../tests/common/png_bytes.rs"]
mod png_bytes;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use super::png_bytes::chunk;

    /// A PNG header claiming `w` x `h` 8-bit grey, with an empty IDAT: any refusal must come from the header
    /// check (decoding would fail on the missing data instead).
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
        v.extend(chunk(b"IHDR", &ihdr));
        v.extend(chunk(b"IDAT", &[]));
        v.extend(chunk(b"IEND", &[]));
        v
    }

    fn encode_png(img: &RgbImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn refusal(bytes: &[u8], name: &str, limits: &ImageLimits) -> String {
        let cfg = PreprocessConfig::siglip(384);
        let t = Instant::now();
        let e = format!("{:#}", preprocess_bytes_limited(bytes, name, &cfg, limits).unwrap_err());
        assert!(t.elapsed().as_secs_f64() < 1.0, "{name} took {:?}: {e}", t.elapsed());
        assert!(e.contains(name), "{e}");
        e
    }

    #[test]
    fn thin_strips_are_refused_from_the_header() {
        let lim = ImageLimits::default();
        // At PIL's pixel limit, but the resize to 384 x 384 needs a 384 x 89478485 intermediate.
        let e = refusal(&png_header(1, 89_478_485), "strip.png", &lim);
        assert!(
            e.contains("1x89478485 needs")
                && e.contains("GiB to resize to 384x384 (limit 1.2 GiB)")
                && e.contains("aspect ratio is too extreme"),
            "{e}"
        );
        // The other way round: 1.4 GB of horizontal taps.
        let e = refusal(&png_header(89_478_485, 1), "wide.png", &lim);
        assert!(e.contains("89478485x1 needs") && e.contains("limit 1.2 GiB"), "{e}");
        // 1 x 10,000,000 (a 45 s resize before): memory first, and the work alone is over the limit too.
        let e = refusal(&png_header(1, 10_000_000), "tall.png", &lim);
        assert!(e.contains("1x10000000 needs") && e.contains("to resize to 384x384"), "{e}");
        let ops_only = ImageLimits { max_bytes: u64::MAX, ..ImageLimits::default() };
        let e = refusal(&png_header(1, 10_000_000), "tall.png", &ops_only);
        assert!(e.contains("multiply-adds to resize to 384x384 (limit 2.00e9)"), "{e}");
        // A real one (not just a header) is refused the same way.
        let mut tall = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(1, 10_000_000).write_to(&mut tall, image::ImageFormat::Png).unwrap();
        let tall = tall.into_inner();
        let e = refusal(&tall, "tall_real.png", &lim);
        assert!(e.contains("1x10000000 needs"), "{e}");
        // Over the pixel limit, as before.
        let e = refusal(&png_header(44_739_243, 2), "over.png", &lim);
        assert!(e.contains("89478486 pixels exceeds the limit of 89478485"), "{e}");
        // Without a resize target (load_rgb_from_memory), the strip only has to fit the decode budget: it
        // passes the header check and fails on the missing pixel data.
        let e = format!("{:#}", load_rgb_from_memory(&png_header(1, 89_478_485), "strip.png").unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
    }

    #[test]
    fn a_photo_passes_and_tighter_limits_refuse_it() {
        let img =
            RgbImage::from_fn(2000, 1500, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 7) as u8]));
        let png = encode_png(&img);
        let cfg = PreprocessConfig::siglip(384);
        let (px, hash) = preprocess_bytes_limited(&png, "photo.png", &cfg, &ImageLimits::default()).unwrap();
        assert_eq!(px.len(), 3 * 384 * 384);
        assert_eq!(hash, pixel_hash(&img));
        assert_eq!(px, preprocess_bytes(&png, "photo.png", &cfg).unwrap());
        assert_eq!(px, preprocess_image(&img, &cfg));

        let lim = |max_pixels, max_bytes, max_resize_ops| ImageLimits { max_pixels, max_bytes, max_resize_ops };
        let d = ImageLimits::default();
        let e = refusal(&png, "photo.png", &lim(1_000_000, d.max_bytes, d.max_resize_ops));
        assert!(e.contains("2000x1500 = 3000000 pixels exceeds the limit of 1000000:"), "{e}");
        let e = refusal(&png, "photo.png", &lim(d.max_pixels, 5 << 20, d.max_resize_ops));
        assert!(e.contains("2000x1500 needs 8.6 MiB to decode (limit 5.0 MiB): the image is too large"), "{e}");
        let e = refusal(&png, "photo.png", &lim(d.max_pixels, 10 << 20, d.max_resize_ops));
        assert!(e.contains("2000x1500 needs") && e.contains("to resize to 384x384 (limit 10.0 MiB)"), "{e}");
        let e = refusal(&png, "photo.png", &lim(d.max_pixels, d.max_bytes, 1_000_000));
        assert!(
            e.contains("2000x1500 needs") && e.contains("multiply-adds to resize to 384x384 (limit 1.00e6)"),
            "{e}"
        );
    }

    #[test]
    fn jpeg_goes_through_the_same_checks() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/rgb_30x45.jpg");
        let jpg = std::fs::read(path).unwrap();
        let cfg = PreprocessConfig::siglip(384);
        let (px, hash) = preprocess_bytes_limited(&jpg, "f.jpg", &cfg, &ImageLimits::default()).unwrap();
        assert_eq!(px, preprocess_bytes(&jpg, "f.jpg", &cfg).unwrap());
        assert_eq!(hash, pixel_hash(&load_rgb_from_memory(&jpg, "f.jpg").unwrap()));
        let d = ImageLimits::default();
        let e = refusal(&jpg, "f.jpg", &ImageLimits { max_pixels: 1000, ..d.clone() });
        assert!(e.contains("30x45 = 1350 pixels exceeds the limit of 1000"), "{e}");
        let e = refusal(&jpg, "f.jpg", &ImageLimits { max_bytes: 4096, ..d.clone() });
        assert!(e.contains("30x45 needs") && e.contains("to decode (limit 4.0 KiB)"), "{e}");
        let e = refusal(&jpg, "f.jpg", &ImageLimits { max_resize_ops: 1000, ..d });
        assert!(e.contains("30x45 needs") && e.contains("multiply-adds"), "{e}");
    }

    #[test]
    fn pixel_hash_covers_the_shape() {
        let a = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let b = RgbImage::from_raw(1, 2, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_ne!(pixel_hash(&a), pixel_hash(&b));
        assert_eq!(pixel_hash(&a), pixel_hash(&a.clone()));
        let mut h = blake3::Hasher::new();
        h.update(&[2, 0, 0, 0, 1, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(pixel_hash(&a), *h.finalize().as_bytes());
    }
}
