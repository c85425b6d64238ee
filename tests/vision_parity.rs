//! The vision path against HF transformers 4.45.1 (tests/fixtures): SigLIP features after the select strategy and
//! projector outputs for every golden image and variant, for F32/F16 and quantized mmproj files.

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use common::fixtures;
use ggml::Backend;

/// max |ours - HF| / max |HF|.
fn rel_err(ours: &[f32], hf: &common::npy::Npy) -> f64 {
    assert_eq!(ours.len(), hf.data.len());
    let scale = hf.data.iter().fold(0f64, |m, x| m.max(x.abs()));
    ours.iter().zip(&hf.data).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max) / scale
}

/// Worst (features, projected) errors over the images of `variant` present in the goldens, for an mmproj type.
fn errors(variant: &str, mm: MmprojType) -> (f64, f64) {
    let files = common::conversion::converted(variant, LlmType::Q8_0, mm);
    let model = VisionModel::load(&files.mmproj).unwrap();
    let backend = Backend::cpu(2).unwrap();
    let mut enc = VisionEncoder::new(&model, &[&backend]).unwrap();
    let size = model.hp.image_size;
    let (mut ef, mut ep) = (0f64, 0f64);
    let gold = fixtures::root().join("golden").join(variant).join("vision");
    let mut n = 0;
    for img in fixtures::IMAGES {
        let fpath = gold.join(format!("{img}.features.npy"));
        if !fpath.exists() {
            continue;
        }
        // HF's own pixel values as input, so this measures the encoder alone (tests/preprocess.rs covers the
        // preprocessing).
        let px = common::npy::read(&fixtures::root().join(format!("golden/preprocess/s{size}/{img}.pixel_values.npy")));
        let e = enc.encode_pixels(&px.as_f32(), 1).unwrap().pop().unwrap();
        let (hf_f, hf_p) = (common::npy::read(&fpath), common::npy::read(&gold.join(format!("{img}.projected.npy"))));
        assert_eq!(e.n_tokens, hf_p.shape[0], "{variant} {img}: image tokens");
        ef = ef.max(rel_err(&e.features, &hf_f));
        ep = ep.max(rel_err(&e.data, &hf_p));
        n += 1;
    }
    assert!(n > 0, "no vision goldens for {variant}");
    eprintln!("{variant} mmproj {}: features {ef:.2e}, projected {ep:.2e} ({n} images)", mm.name());
    (ef, ep)
}

#[test]
fn float_mmproj_matches_hf() {
    for variant in fixtures::VARIANTS {
        // Measured 6.9e-7 to 9.4e-7 over the 18 images (JPEG included: decoded as Pillow decodes them).
        let (f, p) = errors(variant, MmprojType::F32);
        assert!(f <= 5e-6 && p <= 5e-6, "{variant} f32: features {f:.2e}, projected {p:.2e} (bound 5e-6)");
        // Measured 4.2e-4 to 8.5e-4 on x86-64; with ARM's FP16 vector arithmetic (the Pi 5 build, where ggml's
        // f16 dot products accumulate in f16 lanes; see ggml_matmul) up to 2.5e-3 under qemu cortex-a76.
        let bound = if ggml::cpu_features().split(' ').any(|f| f == "FP16_VA") { 5e-3 } else { 2e-3 };
        let (f, p) = errors(variant, MmprojType::F16);
        assert!(f <= bound && p <= bound, "{variant} f16: features {f:.2e}, projected {p:.2e} (bound {bound:.0e})");
    }
}

#[test]
fn encoding_several_images_at_once_equals_one_by_one() {
    let files = common::conversion::converted("base-default-f32", LlmType::Q8_0, MmprojType::F32);
    let model = VisionModel::load(&files.mmproj).unwrap();
    let backend = Backend::cpu(2).unwrap();
    let mut enc = VisionEncoder::new(&model, &[&backend]).unwrap();
    let px: Vec<Vec<f32>> = ["rgb_80x60.png", "gray_70x50.png", "rgb_56x56.png"]
        .iter()
        .map(|img| {
            common::npy::read(&fixtures::root().join(format!("golden/preprocess/s56/{img}.pixel_values.npy"))).as_f32()
        })
        .collect();
    let batch = enc.encode_pixels(&px.concat(), 3).unwrap();
    for (p, b) in px.iter().zip(&batch) {
        let single = enc.encode_pixels(p, 1).unwrap().pop().unwrap();
        let d = single.data.iter().zip(b.data.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-5, "batched and single encodings differ by {d}");
    }
}

/// Quantized mmproj files (every SigLIP matrix quantized, the FFN zero-padded to a multiple of 32): the errors
/// measured when this test was written, with a margin, as regression bounds. See the README for the numbers.
#[test]
fn quantized_mmproj_stays_within_measured_bounds() {
    for variant in fixtures::VARIANTS {
        for (mm, bound) in
            [(MmprojType::Q8_0, Q8_0_BOUND), (MmprojType::Q5_0, Q5_0_BOUND), (MmprojType::Q4_0, Q4_0_BOUND)]
        {
            let (f, p) = errors(variant, mm);
            assert!(
                f <= bound && p <= bound,
                "{variant} {}: features {f:.2e}, projected {p:.2e} (bound {bound:.0e})",
                mm.name()
            );
        }
    }
}

// Measured (max over variants of max|ours-HF|/max|HF|, features and projector): q8_0 2.1e-2, q5_0 1.2e-1,
// q4_0 2.6e-1 (the tiny vision tower is 64 wide, so each row has few blocks to average over).
const Q8_0_BOUND: f64 = 3e-2;
const Q5_0_BOUND: f64 = 0.15;
const Q4_0_BOUND: f64 = 0.35;
