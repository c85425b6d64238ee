//! Image preprocessing against the HF / PIL goldens of tests/fixtures (see tests/reference/README.md):
//! PIL `convert("RGB")` (golden/images/<img>.rgb.npy, [H,W,3] int32) and SiglipImageProcessor's
//! pixel_values at 56 and 64 (golden/preprocess/s<S>/<img>.pixel_values.npy, [3,S,S] float32).
//! Plus the decoding guards (bomb, zero size, corrupt, missing) and PIL's 16-bit PNG rules.

mod common;

use std::path::{Path, PathBuf};

use asagi_gguf::preprocess::{
    load_rgb, load_rgb_from_memory, pixel_values, preprocess_file, preprocess_image, resize_bicubic, PreprocessConfig,
    MAX_IMAGE_PIXELS,
};
use image::RgbImage;

const SIZES: [usize; 2] = [56, 64];

/// The images with PIL / HF goldens (every file in tests/fixtures/images but the full-width fixture's photo,
/// whose pixel values tests/fullwidth_parity.rs checks).
fn images() -> Vec<String> {
    let dir = common::fixtures::root().join("images");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != common::fixtures::FULLWIDTH_IMAGE)
        .collect();
    v.sort();
    let mut listed: Vec<String> = common::fixtures::IMAGES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(v, listed, "the fixture images in {} and common::fixtures::IMAGES differ", dir.display());
    v
}

fn image_path(name: &str) -> PathBuf {
    common::fixtures::root().join("images").join(name)
}

/// PIL's `convert("RGB")` of a fixture image.
fn golden_rgb(name: &str) -> RgbImage {
    let a = common::npy::read(&common::fixtures::root().join(format!("golden/images/{name}.rgb.npy")));
    assert_eq!(a.shape.len(), 3);
    assert_eq!(a.shape[2], 3);
    let bytes: Vec<u8> = a
        .data
        .iter()
        .map(|&v| {
            assert!((0.0..=255.0).contains(&v) && v.fract() == 0.0, "{name}: {v} is not a uint8 value");
            v as u8
        })
        .collect();
    RgbImage::from_raw(a.shape[1] as u32, a.shape[0] as u32, bytes).unwrap()
}

/// HF's pixel_values of a fixture image at size s.
fn golden_pv(name: &str, s: usize) -> Vec<f64> {
    let a =
        common::npy::read(&common::fixtures::root().join(format!("golden/preprocess/s{s}/{name}.pixel_values.npy")));
    assert_eq!(a.shape, vec![3, s, s], "{name} s{s}");
    a.data
}

/// (max |a-b|, mean |a-b|, count of a != b) over two byte images of the same size.
fn byte_diff(a: &RgbImage, b: &RgbImage) -> (u8, f64, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut max, mut sum, mut n) = (0u8, 0u64, 0usize);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
        n += (d != 0) as usize;
    }
    (max, sum as f64 / a.as_raw().len() as f64, n)
}

/// (max, mean, count of nonzero) |ours - golden| over pixel values, compared as f32.
fn pv_diff(ours: &[f32], golden: &[f64]) -> (f64, f64, usize) {
    assert_eq!(ours.len(), golden.len());
    let (mut max, mut sum, mut n) = (0f64, 0f64, 0usize);
    for (&o, &g) in ours.iter().zip(golden) {
        let d = (o as f64 - g).abs();
        max = max.max(d);
        sum += d;
        n += (d != 0.0) as usize;
    }
    (max, sum / ours.len() as f64, n)
}

#[test]
fn rgb_conversion_matches_pil() {
    for name in images() {
        let ours = load_rgb(&image_path(&name)).unwrap_or_else(|e| panic!("{e:#}"));
        let golden = golden_rgb(&name);
        assert_eq!(ours.dimensions(), golden.dimensions(), "{name}");
        let (max, mean, n) = byte_diff(&ours, &golden);
        eprintln!("rgb {name}: max {max} levels, mean {mean:.5}, {n} of {} values differ", golden.as_raw().len());
        // Every format bit-exact, JPEG included (libjpeg-turbo with Pillow's settings).
        assert_eq!(max, 0, "{name}: RGB conversion differs from PIL's convert(\"RGB\")");
    }
}

/// Resize + normalise from PIL's own RGB arrays: isolates the resampler and the float math from decoding.
#[test]
fn resize_and_normalize_match_hf_bit_exactly() {
    for name in images() {
        let rgb = golden_rgb(&name);
        for s in SIZES {
            let cfg = PreprocessConfig::siglip(s);
            let ours = preprocess_image(&rgb, &cfg);
            let golden = golden_pv(&name, s);
            let (max, mean, n) = pv_diff(&ours, &golden);
            eprintln!("pixel_values from golden RGB {name} s{s}: max {max:e}, mean {mean:e}, {n} differ");
            // Bit-exact: the same bytes out of the resize and the same f32 operations.
            for (i, (&o, &g)) in ours.iter().zip(&golden).enumerate() {
                assert_eq!(o.to_bits(), (g as f32).to_bits(), "{name} s{s}: value {i}: {o} vs {g}");
            }
        }
    }
}

#[test]
fn end_to_end_from_file_matches_hf() {
    for name in images() {
        for s in SIZES {
            let cfg = PreprocessConfig::siglip(s);
            let ours = preprocess_file(&image_path(&name), &cfg).unwrap_or_else(|e| panic!("{e:#}"));
            let golden = golden_pv(&name, s);
            let (max, mean, n) = pv_diff(&ours, &golden);
            eprintln!(
                "pixel_values from file {name} s{s}: max {max:e} ({:.2} levels), mean {mean:e}, {n} of {} differ",
                max * 127.5,
                golden.len()
            );
            assert_eq!(max, 0.0, "{name} s{s}");
        }
    }
}

/// The normalisation on its own: every uint8 level, against HF's formula evaluated independently here.
#[test]
fn pixel_values_float_math_is_hf() {
    let mut img = RgbImage::new(256, 1);
    for (x, p) in img.pixels_mut().enumerate() {
        p.0 = [x as u8, 255 - x as u8, x as u8];
    }
    let cfg = PreprocessConfig { size: 1, mean: [0.5, 0.25, 0.75], std: [0.5, 0.2, 0.3], rescale: 1.0 / 255.0 };
    let pv = pixel_values(&img, &cfg);
    assert_eq!(pv.len(), 3 * 256);
    for x in 0..256usize {
        for c in 0..3 {
            let v = if c == 1 { 255 - x } else { x } as f64;
            // numpy: image.astype(float64) * (1/255) -> astype(float32); (x - float32(mean)) / float32(std).
            let want = ((v * (1.0 / 255.0)) as f32 - cfg.mean[c]) / cfg.std[c];
            assert_eq!(pv[c * 256 + x].to_bits(), want.to_bits(), "level {v} channel {c}");
        }
    }
    // Endpoints of the SigLIP normalisation are exactly -1 and 1.
    let pv = pixel_values(&img, &PreprocessConfig::siglip(1));
    assert_eq!((pv[0], pv[255]), (-1.0, 1.0));
}

/// The synthetic pattern of `resize_matches_pil_checksums` (gradients plus a 0/255 checkerboard in green, so the
/// bicubic overshoot gets clipped).
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + y * 11) % 256) as u8,
            (((x / 3 + y / 2) % 2) * 255) as u8,
            ((x * x + 3 * y * y) % 256) as u8,
        ])
    })
}

/// More shapes than the fixtures cover: 1-pixel inputs, extreme up/down scaling, one axis only, odd ratios.
/// Expected: CRC-32 of the bytes of PIL 10.4's `Image.fromarray(pattern).resize((w, h), Image.BICUBIC)`
/// (computed with the reference venv: numpy mgrid of the same formulas, `zlib.crc32(out.tobytes())`).
#[test]
fn resize_matches_pil_checksums() {
    const CASES: [(u32, u32, u32, u32, u32); 11] = [
        (1, 1, 7, 5, 0x7904cdd6),
        (2, 2, 9, 13, 0xa7b691ec),
        (13, 1, 1, 1, 0x49083634),
        (200, 3, 17, 40, 0xaba437fd),
        (5, 700, 56, 56, 0x5a4d4d47),
        (257, 129, 64, 64, 0xaef45cb8),
        (1000, 20, 56, 56, 0x2369e687),
        (64, 48, 384, 384, 0x0710497e),
        (97, 61, 96, 62, 0x80316bf8),
        (80, 60, 80, 33, 0x3ffb2069),
        (80, 60, 41, 60, 0x7781c5ed),
    ];
    for (w, h, tw, th, crc) in CASES {
        let out = resize_bicubic(&pattern(w, h), tw, th);
        assert_eq!(out.dimensions(), (tw, th));
        assert_eq!(crc32(out.as_raw()), crc, "{w}x{h} -> {tw}x{th}");
    }
}

#[test]
fn resize_same_size_is_identity_and_shapes_are_right() {
    let rgb = golden_rgb("rgb_56x56.png");
    assert_eq!(resize_bicubic(&rgb, 56, 56), rgb);
    let r = resize_bicubic(&rgb, 13, 90);
    assert_eq!(r.dimensions(), (13, 90));
    // Degenerate requests do not panic.
    assert_eq!(resize_bicubic(&rgb, 0, 5).dimensions(), (0, 5));
    assert_eq!(resize_bicubic(&RgbImage::new(0, 0), 4, 4).dimensions(), (4, 4));
}

// ---------------------------------------------------------------------------------------------------------
// Hand-made PNGs (stored deflate blocks, so no encoder is involved) for the guards and the 16-bit rules.

use common::png_bytes::{chunk, crc32};

/// zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    for (i, b) in blocks.iter().enumerate() {
        v.push((i + 1 == blocks.len()) as u8);
        v.extend_from_slice(&(b.len() as u16).to_le_bytes());
        v.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        v.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    v.extend_from_slice(&((b << 16) | a).to_be_bytes());
    v
}

/// A PNG with the given IHDR fields; `rows` are the unfiltered scanlines (a 0 filter byte is added to each);
/// `extra` chunks go between IHDR and IDAT; `idat: false` leaves the pixel data out entirely.
fn png(w: u32, h: u32, bit_depth: u8, color_type: u8, rows: &[Vec<u8>], extra: &[Vec<u8>], idat: bool) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend(chunk(b"IHDR", &ihdr));
    for e in extra {
        v.extend_from_slice(e);
    }
    if idat {
        let raw: Vec<u8> = rows.iter().flat_map(|r| std::iter::once(0u8).chain(r.iter().copied())).collect();
        v.extend(chunk(b"IDAT", &zlib_stored(&raw)));
    }
    v.extend(chunk(b"IEND", &[]));
    v
}

/// 16-bit samples, big-endian, as one scanline.
fn be16(samples: &[u16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_be_bytes()).collect()
}

/// Values chosen around the byte boundaries: 0, 1, 255, 256, 300, 0x7f80, 0x80ff, 0xfe7f, 0xffff.
const V16: [u16; 9] = [0, 1, 255, 256, 300, 0x7f80, 0x80ff, 0xfe7f, 0xffff];
/// PIL 10.4's convert("RGB") of those samples in a 16-bit RGB / RGBA / LA PNG: the high byte.
const V16_HIGH: [u8; 9] = [0, 0, 0, 1, 1, 127, 128, 254, 255];
/// ... and in a 16-bit greyscale PNG (mode I;16): clipped to 255.
const V16_CLIP: [u8; 9] = [0, 1, 255, 255, 255, 255, 255, 255, 255];

fn channel(img: &RgbImage, c: usize) -> Vec<u8> {
    img.pixels().map(|p| p.0[c]).collect()
}

#[test]
fn sixteen_bit_png_follows_pil() {
    let w = V16.len() as u32;
    let rgb: Vec<u16> = V16.iter().flat_map(|&v| [v, v, 0xffff - v]).collect();
    let rgba: Vec<u16> = V16.iter().flat_map(|&v| [v, v, 0xffff - v, 1234]).collect();
    let la: Vec<u16> = V16.iter().flat_map(|&v| [v, 0]).collect();
    let inv_high: Vec<u8> = V16.iter().map(|&v| ((0xffff - v) >> 8) as u8).collect();

    let cases: Vec<(&str, Vec<u8>, [Vec<u8>; 3])> = vec![
        ("rgb16", png(w, 1, 16, 2, &[be16(&rgb)], &[], true), [V16_HIGH.to_vec(), V16_HIGH.to_vec(), inv_high.clone()]),
        (
            "rgba16",
            png(w, 1, 16, 6, &[be16(&rgba)], &[], true),
            [V16_HIGH.to_vec(), V16_HIGH.to_vec(), inv_high.clone()],
        ),
        (
            "rgb16+tRNS",
            png(w, 1, 16, 2, &[be16(&rgb)], &[chunk(b"tRNS", &be16(&[0, 0, 0xffff]))], true),
            [V16_HIGH.to_vec(), V16_HIGH.to_vec(), inv_high],
        ),
        ("la16", png(w, 1, 16, 4, &[be16(&la)], &[], true), [V16_HIGH.to_vec(), V16_HIGH.to_vec(), V16_HIGH.to_vec()]),
        (
            "gray16",
            png(w, 1, 16, 0, &[be16(&V16)], &[], true),
            [V16_CLIP.to_vec(), V16_CLIP.to_vec(), V16_CLIP.to_vec()],
        ),
        (
            "gray16+tRNS",
            png(w, 1, 16, 0, &[be16(&V16)], &[chunk(b"tRNS", &be16(&[300]))], true),
            [V16_CLIP.to_vec(), V16_CLIP.to_vec(), V16_CLIP.to_vec()],
        ),
    ];
    for (name, bytes, want) in cases {
        let img = load_rgb_from_memory(&bytes, name).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(img.dimensions(), (w, 1), "{name}");
        for c in 0..3 {
            assert_eq!(channel(&img, c), want[c], "{name} channel {c}");
        }
    }
}

#[test]
fn alpha_is_dropped_not_composited() {
    // 8-bit RGBA with alpha 0, 8-bit LA with alpha 0, grey + tRNS: the colour under the alpha survives.
    let rgba = png(2, 1, 8, 6, &[vec![10, 20, 30, 0, 250, 251, 252, 0]], &[], true);
    let img = load_rgb_from_memory(&rgba, "rgba8").unwrap();
    assert_eq!(img.as_raw(), &[10, 20, 30, 250, 251, 252]);
    let la = png(2, 1, 8, 4, &[vec![77, 0, 200, 0]], &[], true);
    assert_eq!(load_rgb_from_memory(&la, "la8").unwrap().as_raw(), &[77, 77, 77, 200, 200, 200]);
    let trns = png(2, 1, 8, 0, &[vec![77, 200]], &[chunk(b"tRNS", &[0, 77])], true);
    assert_eq!(load_rgb_from_memory(&trns, "gray+tRNS").unwrap().as_raw(), &[77, 77, 77, 200, 200, 200]);
}

// ---------------------------------------------------------------------------------------------------------
// Guards: each a clear error that names the file.

fn err_text(r: anyhow::Result<RgbImage>) -> String {
    match r {
        Ok(img) => panic!("expected an error, got a {}x{} image", img.width(), img.height()),
        Err(e) => format!("{e:#}"),
    }
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn decompression_bomb_is_refused_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    // 20000 x 20000 = 4e8 pixels, and an IDAT with no pixel data in it: the refusal must come from the header
    // check (a decode attempt would fail differently, on the missing data).
    let p = write_tmp(dir.path(), "bomb.png", &png(20000, 20000, 8, 2, &[], &[], true));
    let e = err_text(load_rgb(&p));
    assert!(e.contains("bomb.png") && e.contains("20000x20000") && e.contains("exceeds"), "{e}");
    // The same through preprocess_file.
    let e = format!("{:#}", preprocess_file(&p, &PreprocessConfig::siglip(56)).unwrap_err());
    assert!(e.contains("bomb.png") && e.contains("exceeds"), "{e}");

    // The limit itself: exactly PIL's MAX_IMAGE_PIXELS (89478485 = 5 x 17895697) passes the guard and fails
    // later on the missing pixel data; one more pixel (2 x 44739243) is refused by the guard.
    assert_eq!(MAX_IMAGE_PIXELS, 89_478_485);
    let e = err_text(load_rgb_from_memory(&png(17_895_697, 5, 1, 0, &[], &[], true), "at_limit.png"));
    assert!(e.contains("at_limit.png") && e.contains("corrupt") && !e.contains("exceeds"), "{e}");
    let e = err_text(load_rgb_from_memory(&png(44_739_243, 2, 1, 0, &[], &[], true), "over.png"));
    assert!(e.contains("over.png") && e.contains("89478486 pixels exceeds"), "{e}");

    // A GIF whose logical screen is 65535 x 65535 with almost nothing in it.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00]);
    gif.extend_from_slice(&[0x2c, 0, 0, 0, 0, 1, 0, 1, 0, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    let e = err_text(load_rgb_from_memory(&gif, "bomb.gif"));
    assert!(e.contains("bomb.gif") && e.contains("exceeds"), "{e}");
}

#[test]
fn zero_size_is_refused() {
    // PNG forbids a zero width in IHDR: the decoder refuses it while reading the header.
    let e = err_text(load_rgb_from_memory(&png(0, 10, 8, 2, &[], &[], true), "zero.png"));
    assert!(e.contains("zero.png"), "{e}");
    // A GIF with a 0 x 0 logical screen gets to our own check.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[0, 0, 0, 0, 0x00, 0x00, 0x00]);
    gif.extend_from_slice(&[0x2c, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    let e = err_text(load_rgb_from_memory(&gif, "zero.gif"));
    assert!(e.contains("zero.gif") && e.contains("zero size"), "{e}");
}

#[test]
fn corrupt_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Not an image at all.
    let p = write_tmp(dir.path(), "notes.png", b"this is not an image");
    let e = err_text(load_rgb(&p));
    assert!(e.contains("notes.png") && e.contains("not a supported image"), "{e}");
    // Empty file.
    let p = write_tmp(dir.path(), "empty.jpg", b"");
    assert!(err_text(load_rgb(&p)).contains("empty.jpg"));
    // A real fixture cut in half, and one with its pixel data overwritten.
    for name in images() {
        let bytes = std::fs::read(image_path(&name)).unwrap();
        let p = write_tmp(dir.path(), &format!("truncated_{name}"), &bytes[..bytes.len() / 2]);
        let e = err_text(load_rgb(&p));
        assert!(e.contains(&format!("truncated_{name}")) && e.contains("corrupt"), "{e}");
    }
    // A JPEG whose frame header claims 60000 x 60000 (3.6e9 pixels) is refused from the header, before libjpeg
    // allocates anything; one with its entropy-coded data garbled is an error naming it (libjpeg's message).
    let mut jpg = std::fs::read(image_path("jpeg_420_97x61.jpg")).unwrap();
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
    jpg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let e = err_text(load_rgb(&write_tmp(dir.path(), "huge.jpg", &jpg)));
    assert!(e.contains("huge.jpg") && e.contains("60000x60000") && e.contains("exceeds"), "{e}");
    let mut jpg = std::fs::read(image_path("jpeg_420_97x61.jpg")).unwrap();
    let n = jpg.len();
    for b in &mut jpg[n / 2..n - 2] {
        *b ^= 0x5a;
    }
    let e = err_text(load_rgb(&write_tmp(dir.path(), "garbled.jpg", &jpg)));
    assert!(e.contains("garbled.jpg") && e.contains("corrupt"), "{e}");
    let mut bytes = std::fs::read(image_path("rgb_80x60.png")).unwrap();
    let n = bytes.len();
    for b in &mut bytes[60..n - 20] {
        *b ^= 0x5a;
    }
    let p = write_tmp(dir.path(), "garbled.png", &bytes);
    let e = err_text(load_rgb(&p));
    assert!(e.contains("garbled.png") && e.contains("corrupt"), "{e}");
    // A PNG with a bad IHDR CRC.
    let mut bad = png(4, 4, 8, 2, &vec![vec![0; 12]; 4], &[], true);
    bad[29] ^= 1;
    let e = err_text(load_rgb_from_memory(&bad, "badcrc.png"));
    assert!(e.contains("badcrc.png"), "{e}");
    // Missing file.
    let p = dir.path().join("does_not_exist.webp");
    let e = err_text(load_rgb(&p));
    assert!(e.contains("does_not_exist.webp") && e.contains("cannot read"), "{e}");
    let e = format!("{:#}", preprocess_file(&p, &PreprocessConfig::siglip(56)).unwrap_err());
    assert!(e.contains("does_not_exist.webp"), "{e}");
}
