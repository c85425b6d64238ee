//! Q8_0 weights times 2 to 7 rows of Q8_0 activations, AVX2: each weight block is loaded once for all rows.
//!
//! ggml hands a Q8_0 weight times 2 or more rows to llamafile's tinyBLAS (`tinyBLAS_Q0_AVX`), which walks the
//! matrix once per tile of 1, 2, 3 or 4 activation rows: on an AVX2 build (16 vector registers) 3, 5 and 7 rows
//! take two passes over every weight (tiles of 2, then one of 1), on an AVX-512 build 5, 6 and 7 rows do (a tile
//! of 4, then the rest). A Q8_0 4B model's weights are 4.0 GB, so a 5-beam step read them twice: 2.3x a greedy
//! step, measured. Hand written because it must be exact: per (weight row, activation row) it is the arithmetic of
//! both tinyBLAS's tiles and ggml's one-row `ggml_vec_dot_q8_0_q8_0` (which agree with each other): 8 lanes of
//! 4-product integer sums per block, one f32 product of the two scales, one fused multiply-add per block in block
//! order, then `hsum_float_8`. The integer sums are exact: |w| <= 128 and |y| <= 127 (ggml's quantizer), so a
//! `maddubs` pair is at most 32,512 and never saturates, and the VNNI `dpbusd` of an AVX-512 build gives the same.

use std::arch::x86_64::*;

use super::{f16_at, hsum_float_8, Q8_0_BLOCK};

/// Dot products of one Q8_0 weight row (`nb` blocks at `w`) with `R` Q8_0 activation rows (`nb` blocks each at
/// `ys[r]`), written to `out[r]`. `yd` holds the activation rows' scales as f32, eight per block (row r at `8b + r`),
/// so that one multiply gives a block's R scale products (each the f32 product ggml computes) and a broadcast hands
/// each row its own, instead of a conversion and a multiply per block and row.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` points to `nb` readable Q8_0 blocks, each `ys[r]` to `nb` readable Q8_0
/// blocks, `yd` to `8 * nb` readable f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows<const R: usize>(
    nb: usize,
    w: *const u8,
    ys: &[*const u8; R],
    yd: *const f32,
    out: &mut [f32; R],
) {
    #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut d = [0f32; 8];
    for b in 0..nb {
        let x = w.add(b * Q8_0_BLOCK);
        _mm256_storeu_ps(d.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(f16_at(x)), _mm256_loadu_ps(yd.add(8 * b))));
        let qx = _mm256_loadu_si256(x.add(2).cast());
        // |w| as unsigned bytes; each activation takes w's sign, so that |w| * sign(w) y = w y.
        let ax = _mm256_sign_epi8(qx, qx);
        for r in 0..R {
            let y = ys[r].add(b * Q8_0_BLOCK);
            let sy = _mm256_sign_epi8(_mm256_loadu_si256(y.add(2).cast()), qx);
            // A build for a CPU with AVX-512 VNNI (ggml's too: both follow `target-cpu`) sums the four products
            // of each lane in one instruction, as ggml's tinyBLAS does there; the sums are the same integers.
            #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
            let dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
            #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy)));
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&d[r]), dot, acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}
