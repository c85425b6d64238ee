//! Bicubic resize, bit-identical to Pillow's `Image.resize((w, h), Image.BICUBIC)` on an 8-bit RGB image.
//!
//! HF's `SiglipImageProcessor` resizes through PIL, so any other resampler (even a "better" one) moves the
//! pixel values and, through the vision tower, the logits. This is a transcription of Pillow's
//! `src/libImaging/Resample.c` (unchanged in this respect from Pillow 7 to 11; the goldens were made with
//! 10.4): a separable convolution, horizontal pass first, then vertical, with
//! - the bicubic kernel with a = -0.5 and support 2,
//! - the support widened by the downscale factor (antialiasing when shrinking, plain interpolation when
//!   enlarging),
//! - the weights computed in f64, normalised to sum to 1, then turned into fixed point with 22 fractional bits
//!   (`PRECISION_BITS = 32 - 8 - 2`), rounded half away from zero,
//! - each pass accumulating in i32 from a bias of 0.5 (in fixed point), then `>> 22` (floor) and clipping to
//!   0..=255, so the intermediate image is re-quantised to u8 between the two passes.
//!
//! Every floating-point operation is written in the same order as the C code (no fused multiply-add), so
//! the coefficients, and therefore the output bytes, are the same.

use image::RgbImage;

/// Fixed-point fraction bits of the coefficients for 8-bit images: 32 bits, minus 8 for the pixel value,
/// minus 2 of headroom for negative lobes and sums above 1 (Pillow's comment).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic filter support (the kernel is zero outside |x| < 2).
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's `bicubic_filter`: Keys' cubic convolution kernel with a = -0.5. Same operation order as the C.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    }
    if x < 2.0 {
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    }
    0.0
}

/// Filter taps of one output axis: for output index i, the taps read input `start[i] .. start[i] + count[i]`
/// with fixed-point weights `coeffs[i * ksize ..][.. count[i]]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    count: Vec<usize>,
    coeffs: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full-image box
/// (`in0 = 0`, `in1 = in_size`).
fn precompute(in_size: usize, out_size: usize) -> Taps {
    // Pillow passes the box edges as C `float`; mirror the f32 rounding (only matters above 2^24 pixels).
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;

    let mut start = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut coeffs = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero, as Rust's `as` does; then clamp to the image.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = xmin as usize;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut coeffs[xx * ksize..xx * ksize + ksize];
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            // normalize_coeffs_8bpc: round half away from zero, then C `(int)` truncation.
            let scaled = v * (1i64 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        start.push(xmin);
        count.push(n);
    }
    Taps { ksize, start, count, coeffs }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift = floor) and clamp to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding bias every accumulator starts from (0.5 in fixed point).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over input rows `row0 .. row0 + rows` of a packed RGB buffer `src` of width `in_w`.
fn horizontal(src: &[u8], in_w: usize, row0: usize, rows: usize, out_w: usize, taps: &Taps) -> Vec<u8> {
    let mut out = vec![0u8; out_w * rows * 3];
    for yy in 0..rows {
        let src_row = &src[(row0 + yy) * in_w * 3..(row0 + yy + 1) * in_w * 3];
        for xx in 0..out_w {
            let k = &taps.coeffs[xx * taps.ksize..][..taps.count[xx]];
            let first = taps.start[xx];
            let mut acc = [HALF; 3];
            for (x, &kx) in k.iter().enumerate() {
                let px = &src_row[(first + x) * 3..(first + x) * 3 + 3];
                for c in 0..3 {
                    // Wrapping ops mirror C int arithmetic; the sums cannot actually overflow (|acc| < 2^31
                    // with 22 fraction bits, 8 value bits and the 2 headroom bits).
                    acc[c] = acc[c].wrapping_add((px[c] as i32).wrapping_mul(kx));
                }
            }
            let o = (yy * out_w + xx) * 3;
            for c in 0..3 {
                out[o + c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass: `src` is a packed RGB buffer of width `w`; tap starts are relative to its first row.
fn vertical(src: &[u8], w: usize, out_h: usize, taps: &Taps) -> Vec<u8> {
    let mut out = vec![0u8; w * out_h * 3];
    for yy in 0..out_h {
        let k = &taps.coeffs[yy * taps.ksize..][..taps.count[yy]];
        let first = taps.start[yy];
        for xx in 0..w {
            let mut acc = [HALF; 3];
            for (y, &ky) in k.iter().enumerate() {
                let o = ((first + y) * w + xx) * 3;
                for c in 0..3 {
                    acc[c] = acc[c].wrapping_add((src[o + c] as i32).wrapping_mul(ky));
                }
            }
            let o = (yy * w + xx) * 3;
            for c in 0..3 {
                out[o + c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Resizes `img` to exactly `w` x `h` (aspect ratio not kept) like PIL's `img.resize((w, h), Image.BICUBIC)`.
///
/// Same size returns a copy (PIL does too). An empty input or a zero target gives a black / empty image of the
/// requested size instead of panicking (PIL refuses those; `load_rgb` never returns an empty image).
pub fn resize_bicubic(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (w as usize, h as usize);
    if in_w == out_w && in_h == out_h {
        return img.clone();
    }
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return RgbImage::new(w, h);
    }
    let src: &[u8] = img.as_raw();

    // ImagingResampleInner: the vertical taps are computed first so that the horizontal pass only produces the
    // input rows the vertical pass will read (ybox_first .. ybox_last).
    let mut vtaps = precompute(in_h, out_h);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;

    let (mut buf, mut buf_w) = (None::<Vec<u8>>, in_w);
    if need_horizontal {
        let htaps = precompute(in_w, out_w);
        let ybox_first = vtaps.start[0];
        let ybox_last = vtaps.start[out_h - 1] + vtaps.count[out_h - 1];
        for s in &mut vtaps.start {
            *s -= ybox_first;
        }
        buf = Some(horizontal(src, in_w, ybox_first, ybox_last - ybox_first, out_w, &htaps));
        buf_w = out_w;
    }
    let out = if need_vertical {
        vertical(buf.as_deref().unwrap_or(src), buf_w, out_h, &vtaps)
    } else {
        // Only the horizontal pass ran; with no vertical resize ybox covers every row.
        buf.unwrap_or_else(|| src.to_vec())
    };
    // The buffer length is out_w * out_h * 3 by construction.
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(-0.5), 0.5625);
        assert_eq!(bicubic_filter(1.5), -0.0625);
        assert_eq!(bicubic_filter(2.0), 0.0);
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(80, 56), (30, 64), (200, 56), (7, 3), (1, 5)] {
            let t = precompute(i, o);
            for xx in 0..o {
                let s: i32 = t.coeffs[xx * t.ksize..][..t.count[xx]].iter().sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= t.count[xx] as i32, "{i}->{o} [{xx}]: {s}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 3, 128]));
        for (w, h) in [(56, 56), (5, 9), (100, 7)] {
            let r = resize_bicubic(&img, w, h);
            assert!(r.pixels().all(|p| p.0 == [200, 3, 128]), "{w}x{h}");
        }
    }
}
