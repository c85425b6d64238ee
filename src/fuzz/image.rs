//! Target `image`: an encoded image (any bytes) through decoding and SigLIP preprocessing within a pixel and
//! working-memory budget, as `serve` treats an uploaded image.
//!
//! Oracle: an accepted image gives `pixel_values` of the configured shape, every value in [-1, 1].

use crate::preprocess::{self, ImageLimits, PreprocessConfig};

/// The micro model's size: the resize and normalisation run at full speed.
const SIZE: usize = 28;

/// Smaller than the server's defaults so that one input costs milliseconds, not seconds; the checks are the same
/// code with other numbers.
fn limits() -> ImageLimits {
    ImageLimits { max_pixels: 1 << 22, max_bytes: 96 << 20, max_resize_ops: 200_000_000 }
}

pub fn run(data: &[u8]) -> bool {
    let cfg = PreprocessConfig::siglip(SIZE);
    let Ok((px, _hash)) = preprocess::preprocess_bytes_limited(data, "input", &cfg, &limits()) else { return false };
    assert_eq!(px.len(), 3 * SIZE * SIZE, "pixel_values of an accepted image");
    if let Some(v) = px.iter().find(|v| !(-1.0..=1.0).contains(*v)) {
        panic!("pixel value {v} outside [-1, 1]");
    }
    true
}
