//! Paths and goldens of tests/fixtures (made by tests/reference/make_fixtures.py).
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// The checkpoint variants.
pub const VARIANTS: &[&str] = &["base-default-f32", "full-gqa-expand-f16", "bf16-padvocab"];

/// The test images with vision goldens (HF's pixel values, features and projected embeddings per variant).
pub const IMAGES: &[&str] = &[
    "rgb_80x60.png",
    "rgb_30x45.jpg",
    "gray_70x50.png",
    "rgba_64x48.png",
    "palette_50x40.png",
    "rgb_56x56.png",
    "rgb_200x120.png",
    // JPEG variants (libjpeg-turbo, bit-exact with Pillow's decode).
    "jpeg_420_97x61.jpg",
    "jpeg_422_83x57.jpg",
    "jpeg_444_71x49.jpg",
    "jpeg_prog_99x67.jpg",
    "jpeg_gray_65x43.jpg",
    "jpeg_cmyk_59x41.jpg",
    "jpeg_ycck_59x41.jpg",
    "jpeg_exif6_61x83.jpg",
    "jpeg_restart_90x70.jpg",
    "jpeg_q30_113x77.jpg",
    "jpeg_420_640x480.jpg",
];

/// The photo of the full-width fixture (tests/fullwidth_parity.rs), resized to SigLIP's 384 px.
pub const FULLWIDTH_IMAGE: &str = "photo_512x341.png";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(variant: &str) -> PathBuf {
    root().join("models").join(variant)
}

/// golden/<variant>/goldens.json.
pub fn goldens(variant: &str) -> Value {
    let p = root().join("golden").join(variant).join("goldens.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A JSON array of integers.
pub fn ids(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("int")).collect()
}

/// Copies a fixture checkpoint into `dst` (for tests that damage it).
pub fn copy_model(variant: &str, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(model_dir(variant)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// The question inside Asagi's template (a golden prompt's text) with `n_images` `<image>` lines: what `run -p`
/// takes.
pub fn template_question(prompt_text: &str, n_images: usize) -> String {
    let body = prompt_text.split("### 指示:\n").nth(1).expect("template").split("\n\n### 応答:\n").next().unwrap();
    body.strip_prefix(&"<image>\n".repeat(n_images)).expect("one <image> line per image").to_string()
}
