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

use std::collections::TryReserveError;

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

/// The filter geometry of one axis, as Pillow's `precompute_coeffs` derives it from the sizes.
struct Axis {
    scale: f64,
    filterscale: f64,
    support: f64,
    /// Taps per output index at most (the row stride of `Taps::coeffs`).
    ksize: u64,
}

impl Axis {
    /// For the full-image box (`in0 = 0`, `in1 = in_size`); `out_size` > 0.
    fn new(in_size: u64, out_size: u64) -> Axis {
        // Pillow passes the box edges as C `float`; mirror the f32 rounding (only matters above 2^24 pixels).
        let in0 = 0.0f32;
        let in1 = in_size as f32;
        let scale = (in1 - in0) as f64 / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = BICUBIC_SUPPORT * filterscale;
        // At most 2^33 for u32 sizes; saturating all the same.
        let ksize = (support.ceil() as u64).saturating_mul(2).saturating_add(1);
        Axis { scale, filterscale, support, ksize }
    }

    /// Output index `xx`'s filter centre and input window: (center, xmin, n), reading `xmin .. xmin + n`.
    fn window(&self, in_size: u64, xx: u64) -> (f64, u64, u64) {
        let in0 = 0.0f32;
        let center = in0 as f64 + (xx as f64 + 0.5) * self.scale;
        // C `(int)` truncates toward zero, as Rust's `as` does; then clamp to the image.
        let xmin = ((center - self.support + 0.5) as i64).max(0);
        let xmax = ((center + self.support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, self.ksize.min(i64::MAX as u64) as i64);
        (center, xmin as u64, n as u64)
    }
}

/// A zero-filled vector of `n` elements, or the allocation error instead of an abort.
fn try_zeroed<T: Copy>(n: usize, zero: T) -> Result<Vec<T>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    v.resize(n, zero);
    Ok(v)
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full-image box
/// (`in0 = 0`, `in1 = in_size`).
fn precompute(in_size: usize, out_size: usize) -> Result<Taps, TryReserveError> {
    let axis = Axis::new(in_size as u64, out_size as u64);
    let ksize = usize::try_from(axis.ksize).unwrap_or(usize::MAX);

    let mut start = Vec::new();
    start.try_reserve_exact(out_size)?;
    let mut count = Vec::new();
    count.try_reserve_exact(out_size)?;
    let mut coeffs = try_zeroed(out_size.saturating_mul(ksize), 0i32)?;
    let mut k = try_zeroed(ksize, 0f64)?;
    let ss = 1.0 / axis.filterscale;
    for xx in 0..out_size {
        let (center, xmin, n) = axis.window(in_size as u64, xx as u64);
        let (xmin, n) = (xmin as usize, n as usize);
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
    Ok(Taps { ksize, start, count, coeffs })
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift = floor) and clamp to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding bias every accumulator starts from (0.5 in fixed point).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over input rows `row0 .. row0 + rows` of a packed RGB buffer `src` of width `in_w`.
fn horizontal(
    src: &[u8],
    in_w: usize,
    row0: usize,
    rows: usize,
    out_w: usize,
    taps: &Taps,
) -> Result<Vec<u8>, TryReserveError> {
    let mut out = try_zeroed(out_w.saturating_mul(rows).saturating_mul(3), 0u8)?;
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
    Ok(out)
}

/// Vertical pass: `src` is a packed RGB buffer of width `w`; tap starts are relative to its first row.
fn vertical(src: &[u8], w: usize, out_h: usize, taps: &Taps) -> Result<Vec<u8>, TryReserveError> {
    let mut out = try_zeroed(w.saturating_mul(out_h).saturating_mul(3), 0u8)?;
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
    Ok(out)
}

/// Resizes `img` to exactly `w` x `h` (aspect ratio not kept) like PIL's `img.resize((w, h), Image.BICUBIC)`.
///
/// Same size returns a copy (PIL does too). An empty input or a zero target gives a black / empty image of the
/// requested size instead of panicking (PIL refuses those; `load_rgb` never returns an empty image).
///
/// Panics if memory runs out; [`try_resize_bicubic`] returns the error instead, and [`resize_cost`] tells
/// beforehand how much memory and work a resize takes (it can be enormous for extreme aspect ratios).
pub fn resize_bicubic(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    try_resize_bicubic(img, w, h).unwrap_or_else(|e| {
        let (iw, ih) = img.dimensions();
        panic!("out of memory resizing a {iw}x{ih} image to {w}x{h}: {e}")
    })
}

/// As [`resize_bicubic`], with every large allocation fallible (`Vec::try_reserve`): an allocation failure is
/// returned instead of aborting the process.
pub fn try_resize_bicubic(img: &RgbImage, w: u32, h: u32) -> Result<RgbImage, TryReserveError> {
    // Keep in step with `resize_cost`, which mirrors the branches and allocations below.
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (w as usize, h as usize);
    if in_w == out_w && in_h == out_h {
        return Ok(img.clone());
    }
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        let buf = try_zeroed(out_w.saturating_mul(out_h).saturating_mul(3), 0u8)?;
        return Ok(RgbImage::from_raw(w, h, buf).unwrap_or_else(|| RgbImage::new(w, h)));
    }
    let src: &[u8] = img.as_raw();

    // ImagingResampleInner: the vertical taps are computed first so that the horizontal pass only produces the
    // input rows the vertical pass will read (ybox_first .. ybox_last).
    let mut vtaps = precompute(in_h, out_h)?;
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;

    let (mut buf, mut buf_w) = (None::<Vec<u8>>, in_w);
    if need_horizontal {
        let htaps = precompute(in_w, out_w)?;
        let ybox_first = vtaps.start[0];
        let ybox_last = vtaps.start[out_h - 1] + vtaps.count[out_h - 1];
        for s in &mut vtaps.start {
            *s -= ybox_first;
        }
        buf = Some(horizontal(src, in_w, ybox_first, ybox_last - ybox_first, out_w, &htaps)?);
        buf_w = out_w;
    }
    let out = if need_vertical {
        vertical(buf.as_deref().unwrap_or(src), buf_w, out_h, &vtaps)?
    } else {
        // Only the horizontal pass ran (equal sizes returned above); with no vertical resize ybox covers every
        // row.
        match buf {
            Some(b) => b,
            None => return Ok(img.clone()),
        }
    };
    // The buffer length is out_w * out_h * 3 by construction.
    Ok(RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h)))
}

/// What a [`resize_bicubic`] call costs, from the sizes alone (see [`resize_cost`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizeCost {
    /// Peak working memory in bytes: the tap tables of each pass (coefficients, starts, counts, and the
    /// per-table f64 scratch row), the horizontal pass's intermediate image and the output image, counted at
    /// the moment when the most of them are alive together. The input image is not included.
    pub bytes: u64,
    /// Multiply-adds: per pass, output values x taps x 3 channels.
    pub ops: u64,
}

/// Output sides up to this get an exact tap count (one cheap loop over the output indices); above it (no sane
/// target is that large) `ops` is the upper bound `out x min(ksize, in)` taps per row.
const EXACT_TAP_COUNT_MAX: u64 = 1 << 20;

/// One axis's tap table cost.
struct TapsCost {
    /// `start` + `count` + `coeffs`, as `precompute` allocates them.
    bytes: u64,
    /// `precompute`'s scratch row of `ksize` f64, alive only while it runs.
    scratch: u64,
    /// Total taps over all output indices (sum of `count`).
    taps: u64,
    /// Input range the taps read: `start[0] .. start[out - 1] + count[out - 1]`.
    first: u64,
    last: u64,
}

fn taps_cost(in_size: u64, out_size: u64) -> TapsCost {
    let axis = Axis::new(in_size, out_size);
    let word = std::mem::size_of::<usize>() as u64;
    let bytes = out_size
        .saturating_mul(2 * word)
        .saturating_add(out_size.saturating_mul(axis.ksize).saturating_mul(std::mem::size_of::<i32>() as u64));
    let scratch = axis.ksize.saturating_mul(std::mem::size_of::<f64>() as u64);
    let taps = if out_size <= EXACT_TAP_COUNT_MAX {
        (0..out_size).map(|xx| axis.window(in_size, xx).2).fold(0u64, u64::saturating_add)
    } else {
        out_size.saturating_mul(axis.ksize.min(in_size))
    };
    let (_, first, _) = axis.window(in_size, 0);
    let (_, lmin, ln) = axis.window(in_size, out_size - 1);
    TapsCost { bytes, scratch, taps, first, last: lmin.saturating_add(ln) }
}

/// The peak working memory and the multiply-adds of `resize_bicubic` from an `in_w` x `in_h` image to
/// `out_w` x `out_h`, computed from the sizes alone, cheaply, for any sizes (saturating arithmetic: never
/// overflows or panics). Mirrors the implementation branch by branch: a copy for equal sizes, no horizontal
/// pass when the widths are equal (the vertical taps are computed anyway), no vertical pass when the heights
/// are, the horizontal pass producing only the rows the vertical one reads.
///
/// Cost grows with in/out along each axis (the taps widen with the downscale factor), so a thin image resized
/// to a square is far more expensive than its pixel count suggests: 1 x 10,000,000 to 384 x 384 produces a
/// 384 x 10,000,000 intermediate (11.5 GB).
pub fn resize_cost(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> ResizeCost {
    let (iw, ih, ow, oh) = (in_w as u64, in_h as u64, out_w as u64, out_h as u64);
    let out_bytes = ow.saturating_mul(oh).saturating_mul(3);
    if (iw == ow && ih == oh) || iw == 0 || ih == 0 || ow == 0 || oh == 0 {
        // A clone, or a black image of the target size.
        return ResizeCost { bytes: out_bytes, ops: 0 };
    }
    let v = taps_cost(ih, oh);
    let mut peak = v.bytes.saturating_add(v.scratch);
    let mut ops = 0u64;
    let mut buf = 0u64;
    let mut buf_w = iw;
    if ow != iw {
        let h = taps_cost(iw, ow);
        let rows = v.last.saturating_sub(v.first);
        buf = ow.saturating_mul(rows).saturating_mul(3);
        buf_w = ow;
        let tables = v.bytes.saturating_add(h.bytes);
        peak = peak.max(tables.saturating_add(h.scratch)).max(tables.saturating_add(buf));
        ops = ops.saturating_add(h.taps.saturating_mul(rows).saturating_mul(3));
    }
    if oh != ih {
        // The horizontal tables are dropped by now; its output is the vertical pass's input.
        peak = peak.max(v.bytes.saturating_add(buf).saturating_add(out_bytes));
        ops = ops.saturating_add(v.taps.saturating_mul(buf_w).saturating_mul(3));
    }
    // Without a vertical pass the horizontal output is the result: nothing more is allocated.
    ResizeCost { bytes: peak, ops }
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
            let t = precompute(i, o).unwrap();
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

    /// `resize_cost` counted the hard way: the same steps as `try_resize_bicubic`, with the real tap tables and
    /// buffers, measuring what they hold (`capacity`) and the taps they run. Also checks the result is
    /// `resize_bicubic`'s.
    fn measured_cost(img: &RgbImage, w: u32, h: u32) -> ResizeCost {
        let (in_w, in_h) = (img.width() as usize, img.height() as usize);
        let (out_w, out_h) = (w as usize, h as usize);
        if (in_w == out_w && in_h == out_h) || in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
            let out = resize_bicubic(img, w, h).into_raw();
            return ResizeCost { bytes: out.capacity() as u64, ops: 0 };
        }
        let word = std::mem::size_of::<usize>();
        let tables =
            |t: &Taps| (t.start.capacity() * word + t.count.capacity() * word + t.coeffs.capacity() * 4) as u64;
        let scratch = |t: &Taps| (t.ksize * 8) as u64;
        let taps = |t: &Taps| t.count.iter().sum::<usize>() as u64;
        let mut vt = precompute(in_h, out_h).unwrap();
        let mut peak = tables(&vt) + scratch(&vt);
        let mut ops = 0u64;
        let (mut buf, mut buf_w) = (None::<Vec<u8>>, in_w);
        if out_w != in_w {
            let ht = precompute(in_w, out_w).unwrap();
            peak = peak.max(tables(&vt) + tables(&ht) + scratch(&ht));
            let first = vt.start[0];
            let rows = vt.start[out_h - 1] + vt.count[out_h - 1] - first;
            vt.start.iter_mut().for_each(|s| *s -= first);
            let b = horizontal(img.as_raw(), in_w, first, rows, out_w, &ht).unwrap();
            peak = peak.max(tables(&vt) + tables(&ht) + b.capacity() as u64);
            ops += taps(&ht) * rows as u64 * 3;
            buf = Some(b);
            buf_w = out_w;
        }
        let out = if out_h != in_h {
            let o = vertical(buf.as_deref().unwrap_or(img.as_raw()), buf_w, out_h, &vt).unwrap();
            let held = buf.as_ref().map_or(0, |b| b.capacity());
            peak = peak.max(tables(&vt) + held as u64 + o.capacity() as u64);
            ops += taps(&vt) * buf_w as u64 * 3;
            o
        } else {
            buf.unwrap()
        };
        assert_eq!(out, resize_bicubic(img, w, h).into_raw(), "{in_w}x{in_h} -> {w}x{h}");
        ResizeCost { bytes: peak, ops }
    }

    #[test]
    fn resize_cost_matches_the_allocations() {
        let shapes = [
            (37, 23, 56, 56),
            (80, 60, 80, 20),  // no horizontal pass
            (80, 60, 20, 60),  // no vertical pass
            (80, 60, 160, 60), // horizontal upscale only
            (7, 3, 1, 5),
            (1, 50, 8, 8),
            (50, 1, 8, 8),
            (200, 13, 9, 40),
            (3, 700, 384, 5),
            (10, 10, 10, 10), // copy
            (10, 10, 0, 5),   // empty target
        ];
        for (iw, ih, ow, oh) in shapes {
            let img = RgbImage::from_fn(iw, ih, |x, y| image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (y * 3) as u8]));
            assert_eq!(resize_cost(iw, ih, ow, oh), measured_cost(&img, ow, oh), "{iw}x{ih} -> {ow}x{oh}");
        }
        let empty = RgbImage::new(0, 4);
        assert_eq!(resize_cost(0, 4, 6, 6), measured_cost(&empty, 6, 6));
    }

    #[test]
    fn resize_cost_never_panics_and_sees_extreme_shapes() {
        let m = u32::MAX;
        for (iw, ih, ow, oh) in [
            (1, 89_478_485, 384, 384),
            (89_478_485, 1, 384, 384),
            (1, 10_000_000, 384, 384),
            (10_000_000, 1, 384, 384),
            (4000, 3000, 384, 384),
            (9459, 9459, 384, 384),
            (384, 384, 384, 384),
            (m, m, m, m),
            (m, m, 1, 1),
            (1, 1, m, m),
            (m, 1, 1, m),
            (1, m, m, 1),
            (m, m, 384, 384),
            (0, 0, m, m),
            (m, m, 0, 0),
            (2, 3, 1 << 21, 5), // above the exact tap count: the bound
        ] {
            let c = resize_cost(iw, ih, ow, oh);
            eprintln!("{iw}x{ih} -> {ow}x{oh}: {:.3} GB, {:.3e} multiply-adds", c.bytes as f64 / 1e9, c.ops as f64);
        }
        // A thin strip to a square: the intermediate is 384 x all the rows.
        let c = resize_cost(1, 89_478_485, 384, 384);
        assert!(c.bytes >= 384 * 89_478_485 * 3 && c.ops >= 384 * 89_478_485 * 3, "{c:?}");
        let c = resize_cost(1, 10_000_000, 384, 384);
        assert!(c.bytes > 10 << 30 && c.ops > 10_000_000_000, "{c:?}");
        // A photo is cheap by comparison.
        let c = resize_cost(4000, 3000, 384, 384);
        assert!(c.bytes < 64 << 20 && c.ops < 500_000_000, "{c:?}");
        assert_eq!(resize_cost(384, 384, 384, 384), ResizeCost { bytes: 384 * 384 * 3, ops: 0 });
        // The bound above the exact count is an upper bound.
        let exact = resize_cost(2, 3, 1 << 20, 5);
        let bound = resize_cost(2, 3, (1 << 20) + 1, 5);
        assert!(bound.ops >= exact.ops, "{exact:?} {bound:?}");
    }
}
