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
];

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
