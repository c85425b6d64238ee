//! Q4_0 and Q4_K weights as ggml's CPU_REPACK buffer stores them on x86-64 (eight weight rows interleaved:
//! `block_q4_0x8`, `block_q4_Kx8`) times 2 to 7 activation rows, AVX2: each weight block is unpacked once for all
//! rows.
//!
//! ggml multiplies repacked weights by activation rows four at a time (its GEMM) and runs its one-row GEMV for each
//! row left over, so a 5-row beam step pays a 4-row product plus a whole 1-row product (every weight unpacked
//! again): measured ~180 ms of a ~450 ms 4B Q4_K_M step, and 2-3 rows cost 2-3 one-row products. These are ggml's
//! AVX2 GEMVs (`ggml_gemv_q4_0_8x8_q8_0`, `ggml_gemv_q4_K_8x8_q8_K`) with the unpacking of the weights hoisted out
//! of the row loop. Hand written because they must be exact: the integer dot products are exact in any order
//! (no lane can overflow: the bounds are given where they are summed), and the float work per block and output is
//! ggml's (one multiply of the two scales, one fused multiply-add, in block order), so each output equals ggml's
//! bit for bit, whichever of its GEMM or GEMV would have computed that row.

use std::arch::x86_64::*;

use super::{f16_at, f16x8, Q8_0_BLOCK, Q8_K_BLOCK, Q8_K_BSUMS, Q8_K_QS};

/// `block_q4_0x8`: `d[8]` f16 (the eight rows' scales), `qs[128]`: per row 32 4-bit values, interleaved 8 bytes at
/// a time and stored as `nibble ^ 8` (signed nibbles), repack.cpp's `make_block_q4_0x8`.
const Q4_0X8_BLOCK: usize = 144;
/// `block_q4_Kx8`: `d[8]` f16, `dmin[8]` f16, `scales[96]` (per pair of 32-value sub-blocks, 12 bytes of 6-bit
/// scales and mins for each sub-block), `qs[1024]` (8 bytes at a time per row; low nibbles the even sub-block,
/// high nibbles the odd one).
const Q4_KX8_BLOCK: usize = 1152;
/// The eight f16 scales at `p` as f32, in the lane order of ggml's interleaved products (rows 0 4 1 5 2 6 3 7:
/// its `GGML_F32Cx8_REARRANGE_LOAD` with `deltamask`); the conversion is exact.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales_0415(p: *const u8) -> __m256 {
    f16x8([0, 4, 1, 5, 2, 6, 3, 7].map(|r| p.add(2 * r).cast::<u16>().read_unaligned()))
}

/// The two weight vectors of one 8-byte chunk per row (`lo`: rows 0-3, `hi`: rows 4-7), rearranged so that 32-bit
/// lane `l` holds 4 weights of row 0 4 1 5 2 6 3 7 [l]: the first vector weights 0-3 of the chunk, the second 4-7.
/// ggml's `blend(lo, shuffle(hi, 177))` / `blend(shuffle(lo, 177), hi)`.
#[target_feature(enable = "avx2")]
unsafe fn interleave(lo: __m256i, hi: __m256i) -> [__m256i; 2] {
    [
        _mm256_blend_epi32::<170>(lo, _mm256_shuffle_epi32::<177>(hi)),
        _mm256_blend_epi32::<170>(_mm256_shuffle_epi32::<177>(lo), hi),
    ]
}

/// The 4 activation bytes at `p` in every 32-bit lane.
#[target_feature(enable = "avx2")]
unsafe fn broadcast4(p: *const u8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// One group of eight repacked Q4_0 weight rows (`nb` blocks at `w`) times `R` Q8_0 activation rows (`nb` blocks
/// each at `ys[r]`): `out[r][j]` = row `j` of the group · row `r`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` points to `nb` readable `block_q4_0x8`, each `ys[r]` to `nb` readable Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_0x8_rows<const R: usize>(nb: usize, w: *const u8, ys: &[*const u8; R], out: &mut [[f32; 8]; R]) {
    // Signed nibble to byte: ggml's `signextendlut` (0..7 -> 0..7, 8..15 -> -8..-1).
    let lut = _mm256_setr_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
    );
    let m4b = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = w.add(b * Q4_0X8_BLOCK);
        let qs = blk.add(16);
        // Chunk t of each row: its values 8t..8t+8 (t = 0, 1 in the low nibbles of the first 64 bytes, 2, 3 in their
        // high nibbles). ggml multiplies signed by signed as |w| times (a with w's sign); both halves are kept.
        let mut abs_w = [_mm256_setzero_si256(); 8];
        let mut sgn_w = [_mm256_setzero_si256(); 8];
        for t in 0..4 {
            let (lo, hi) =
                (_mm256_loadu_si256(qs.add(64 * (t % 2)).cast()), _mm256_loadu_si256(qs.add(64 * (t % 2) + 32).cast()));
            let nibbles = |v: __m256i| {
                let v = if t >= 2 { _mm256_srli_epi16::<4>(v) } else { v };
                _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m4b))
            };
            for (h, v) in interleave(nibbles(lo), nibbles(hi)).into_iter().enumerate() {
                abs_w[2 * t + h] = _mm256_sign_epi8(v, v);
                sgn_w[2 * t + h] = v;
            }
        }
        let col_scale = scales_0415(blk);
        for r in 0..R {
            let y = ys[r].add(b * Q8_0_BLOCK);
            let a = y.add(2);
            // |w| <= 8 and |a| <= 128: each 16-bit lane sums 8 pairs of products, <= 16 * 8 * 128 = 16384, so
            // the pairs are widened to 32 bits once per block rather than once per chunk as in ggml (the same sums).
            let mut iacc16 = _mm256_setzero_si256();
            for c in 0..8 {
                let sy = _mm256_sign_epi8(broadcast4(a.add(4 * c)), sgn_w[c]);
                iacc16 = _mm256_add_epi16(iacc16, _mm256_maddubs_epi16(abs_w[c], sy));
            }
            let iacc = _mm256_madd_epi16(iacc16, ones);
            let row_scale = _mm256_set1_ps(f16_at(y));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_mul_ps(col_scale, row_scale), acc[r]);
        }
    }
    store_0415(&acc, None, out);
}

/// Lanes back from row order 0 4 1 5 2 6 3 7 to 0..7 (ggml's `finalpermutemask`), minus `min` (natural order), into
/// `out`.
#[target_feature(enable = "avx2")]
unsafe fn store_0415<const R: usize>(acc: &[__m256; R], min: Option<&[__m256; R]>, out: &mut [[f32; 8]; R]) {
    let perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for r in 0..R {
        let mut v = _mm256_permutevar8x32_ps(acc[r], perm);
        if let Some(min) = min {
            v = _mm256_sub_ps(v, min[r]);
        }
        _mm256_storeu_ps(out[r].as_mut_ptr(), v);
    }
}

/// ggml's decoding of one sub-block's 12 bytes of 6-bit scales and mins for the eight rows (`utmp` in its GEMV):
/// bytes 0-7 the scales, 8-15 the mins, row by row.
fn scales_mins(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    // SAFETY: callers pass a pointer to 12 readable bytes inside a block.
    let word = |i: usize| {
        u32::from_le_bytes(unsafe { [*p.add(4 * i), *p.add(4 * i + 1), *p.add(4 * i + 2), *p.add(4 * i + 3)] })
    };
    let (u0, u1, u2) = (word(0), word(1), word(2));
    [
        u0 & KMASK1,
        (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4),
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ]
}

/// One group of eight repacked Q4_K weight rows (`nb` blocks at `w`) times `R` Q8_K activation rows (`nb` blocks
/// each at `ys[r]`): `out[r][j]` = row `j` of the group · row `r`.
///
/// ggml's 4-row GEMM adds its float products once per pair of sub-blocks, its GEMV once per block: the rows ggml
/// would give its GEMM (the first `R / 4 * 4`) are summed as there, the others as in the GEMV.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` points to `nb` readable `block_q4_Kx8`, each `ys[r]` to `nb` readable Q8_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_kx8_rows<const R: usize>(nb: usize, w: *const u8, ys: &[*const u8; R], out: &mut [[f32; 8]; R]) {
    let m4b = _mm256_set1_epi8(0x0F);
    // Each scale twice, rows in order 0 4 1 5 2 6 3 7 (ggml's `scalemask`).
    let scalemask = _mm_setr_epi8(0, 0, 4, 4, 1, 1, 5, 5, 2, 2, 6, 6, 3, 3, 7, 7);
    let gemm_rows = R / 4 * 4;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_min = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = w.add(b * Q4_KX8_BLOCK);
        let (scales, qs) = (blk.add(32), blk.add(128));
        let col_scale = scales_0415(blk);
        let col_dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16).cast()));
        let mut iacc_b = [_mm256_setzero_si256(); R];
        let mut iacc_min_b = [_mm256_setzero_si256(); R];
        for sb in 0..4 {
            // Sub-blocks 2sb (low nibbles) and 2sb+1 (high nibbles): per chunk t their values 8t..8t+8.
            let mut w_even = [_mm256_setzero_si256(); 8];
            let mut w_odd = [_mm256_setzero_si256(); 8];
            for t in 0..4 {
                let lo = _mm256_loadu_si256(qs.add(256 * sb + 64 * t).cast());
                let hi = _mm256_loadu_si256(qs.add(256 * sb + 64 * t + 32).cast());
                let [e0, e1] = interleave(_mm256_and_si256(lo, m4b), _mm256_and_si256(hi, m4b));
                let [o0, o1] = interleave(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(lo), m4b),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(hi), m4b),
                );
                (w_even[2 * t], w_even[2 * t + 1], w_odd[2 * t], w_odd[2 * t + 1]) = (e0, e1, o0, o1);
            }
            let sm0 = scales_mins(scales.add(24 * sb));
            let sm1 = scales_mins(scales.add(24 * sb + 12));
            let sm0 = _mm_setr_epi32(sm0[0] as i32, sm0[1] as i32, sm0[2] as i32, sm0[3] as i32);
            let sm1 = _mm_setr_epi32(sm1[0] as i32, sm1[1] as i32, sm1[2] as i32, sm1[3] as i32);
            let scales_0 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm0, scalemask));
            let scales_1 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm1, scalemask));
            // (min of sub-block 2sb, min of 2sb+1) for rows 0..7 in order.
            let mins_01 =
                _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_shuffle_epi32::<78>(sm0), _mm_shuffle_epi32::<78>(sm1)));
            for r in 0..R {
                let y = ys[r].add(b * Q8_K_BLOCK);
                let a = y.add(Q8_K_QS + 64 * sb);
                // Weights 0..15, |a| <= 128: each 16-bit lane sums 8 pairs of products, <= 16 * 15 * 128 = 30720.
                let mut iacc_0 = _mm256_setzero_si256();
                let mut iacc_1 = _mm256_setzero_si256();
                for c in 0..8 {
                    iacc_0 = _mm256_add_epi16(iacc_0, _mm256_maddubs_epi16(w_even[c], broadcast4(a.add(4 * c))));
                    iacc_1 = _mm256_add_epi16(iacc_1, _mm256_maddubs_epi16(w_odd[c], broadcast4(a.add(32 + 4 * c))));
                }
                let iacc_sb =
                    _mm256_add_epi32(_mm256_madd_epi16(iacc_0, scales_0), _mm256_madd_epi16(iacc_1, scales_1));
                // The two sub-blocks' activation sums (ggml's `hadd` of the 16-value `bsums`, |sum| <= 4096).
                let bsums = y.add(Q8_K_BSUMS).cast::<i16>();
                let sum =
                    |s: usize| bsums.add(2 * s).read_unaligned().wrapping_add(bsums.add(2 * s + 1).read_unaligned());
                let q8s =
                    _mm256_set1_epi32(((sum(2 * sb) as u16 as u32) | ((sum(2 * sb + 1) as u16 as u32) << 16)) as i32);
                let iacc_min_sb = _mm256_madd_epi16(q8s, mins_01);
                if r < gemm_rows {
                    let row_scale = _mm256_set1_ps(y.cast::<f32>().read_unaligned());
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_sb), _mm256_mul_ps(col_scale, row_scale), acc[r]);
                    acc_min[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(iacc_min_sb),
                        _mm256_mul_ps(col_dmin, row_scale),
                        acc_min[r],
                    );
                } else {
                    iacc_b[r] = _mm256_add_epi32(iacc_b[r], iacc_sb);
                    iacc_min_b[r] = _mm256_add_epi32(iacc_min_b[r], iacc_min_sb);
                }
            }
        }
        for r in gemm_rows..R {
            let row_scale = _mm256_set1_ps(ys[r].add(b * Q8_K_BLOCK).cast::<f32>().read_unaligned());
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_b[r]), _mm256_mul_ps(col_scale, row_scale), acc[r]);
            acc_min[r] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_min_b[r]), _mm256_mul_ps(col_dmin, row_scale), acc_min[r]);
        }
    }
    store_0415(&acc, Some(&acc_min), out);
}
