//! Q8_0 weights times 2 to 7 rows of Q8_0 activations, AVX2: each weight block is loaded once for all rows.
//!
//! ggml hands a Q8_0 weight times 2 or more rows to llamafile's tinyBLAS (`tinyBLAS_Q0_AVX`), which walks the
//! matrix once per tile of 1, 2, 3 or 4 activation rows: on an AVX2 build (16 vector registers) 3, 5 and 7 rows
//! take two passes over every weight (tiles of 2, then one of 1), on an AVX-512 build 5, 6 and 7 rows do (a tile
//! of 4, then the rest). A Q8_0 4B model's weights are 4.4 GB, so a 5-beam step read them twice: 2.3x a greedy
//! step, measured. Hand written because it must be exact: per (weight row, activation row) it is the arithmetic of
//! both tinyBLAS's tiles and ggml's one-row `ggml_vec_dot_q8_0_q8_0` (which agree with each other): 8 lanes of
//! 4-product integer sums per block, one f32 product of the two scales, one fused multiply-add per block in block
//! order, then `hsum_float_8`. The integer sums are exact: |w| <= 128 and |y| <= 127 (ggml's quantizer), so a
//! `maddubs` pair is at most 32,512 and never saturates, and the VNNI `dpbusd` of an AVX-512 build gives the same.

use std::arch::x86_64::*;

use super::{f16_at, hsum_float_8, Q8_0_BLOCK};

/// Dot products of one Q8_0 weight row (`nb` blocks at `w`) with `R` Q8_0 activation rows (`nb` blocks each at
/// `ys[r]`), written to `out[r]`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` points to `nb` readable Q8_0 blocks, each `ys[r]` to `nb` readable Q8_0 blocks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows<const R: usize>(nb: usize, w: *const u8, ys: &[*const u8; R], out: &mut [f32; R]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let x = w.add(b * Q8_0_BLOCK);
        let xd = f16_at(x);
        let qx = _mm256_loadu_si256(x.add(2).cast());
        // |w| as unsigned bytes; each activation takes w's sign, so that |w| * sign(w) y = w y.
        let ax = _mm256_sign_epi8(qx, qx);
        for r in 0..R {
            let y = ys[r].add(b * Q8_0_BLOCK);
            let sy = _mm256_sign_epi8(_mm256_loadu_si256(y.add(2).cast()), qx);
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xd * f16_at(y)), dot, acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}
