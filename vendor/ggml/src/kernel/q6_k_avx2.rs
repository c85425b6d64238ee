//! Q6_K weights times 2 to 7 rows of Q8_K activations, AVX2: each weight block is unpacked once for all rows.
//!
//! ggml multiplies a Q6_K matrix by a few activation rows one (weight row, activation row) pair at a time
//! (`ggml_vec_dot_q6_K_q8_K`, no multi-row x86 kernel below its tiled path's 8 rows), so a 5-row beam step unpacks
//! every Q6_K weight five times; in the Q4_K_M mix that is the 99,584 x 3072 output layer and half the `attn_v` and
//! `ffn_down` matrices. This is ggml's AVX2 dot product with the row loop moved inside the block loop. It is hand
//! written because it must be exact: every activation row goes through the same instructions in the same order
//! as in ggml's kernel (the same 32-bit integer lanes, the same float multiply-add per block and lane, the same
//! horizontal sum), so each output equals ggml's bit for bit and swapping it in changes no result.

use std::arch::x86_64::*;

use super::{f16_at, hsum_float_8, Q8_K_BLOCK, Q8_K_BSUMS, Q8_K_QS};

/// `block_q6_K`: `ql[128]` low 4 bits, `qh[64]` high 2 bits, `scales[16]` i8, `d` f16 (ggml-common.h).
const Q6_K_BLOCK: usize = 210;
const Q6_K_QH: usize = 128;
const Q6_K_SCALES: usize = 192;
const Q6_K_D: usize = 208;

/// ggml's `get_scale_shuffle`: shuffle `i` spreads scale bytes 2i and 2i+1 over 8 bytes each.
static SCALE_SHUFFLE: [[u8; 16]; 8] = {
    let mut t = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < 16 {
            t[i][b] = (2 * i + b / 8) as u8;
            b += 1;
        }
        i += 1;
    }
    t
};

/// Dot products of one Q6_K weight row (`nb` blocks at `w`) with `R` Q8_K activation rows (`nb` blocks each at
/// `ys[r]`), written to `out[r]`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` points to `nb` readable Q6_K blocks, each `ys[r]` to `nb` readable Q8_K blocks
/// (4-byte aligned, as ggml's quantizer writes them).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows<const R: usize>(nb: usize, w: *const u8, ys: &[*const u8; R], out: &mut [f32; R]) {
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm256_set1_epi8(15);
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        let x = w.add(i * Q6_K_BLOCK);
        let xd = f16_at(x.add(Q6_K_D));
        let scales = _mm_loadu_si128(x.add(Q6_K_SCALES).cast());
        let scales_16 = _mm256_cvtepi8_epi16(scales);
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..2 {
            // The 128 weights of this half block as unsigned 6-bit values (ggml's unpacking, unchanged).
            let q4bits1 = _mm256_loadu_si256(x.add(64 * j).cast());
            let q4bits2 = _mm256_loadu_si256(x.add(64 * j + 32).cast());
            let q4bits_h = _mm256_loadu_si256(x.add(Q6_K_QH + 32 * j).cast());
            let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m3), 4);
            let q4h_1 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, _mm256_set1_epi8(12)), 2);
            let q4h_2 = _mm256_and_si256(q4bits_h, _mm256_set1_epi8(48));
            let q4h_3 = _mm256_srli_epi16(_mm256_and_si256(q4bits_h, _mm256_set1_epi8(-64)), 2);
            let q4_0 = _mm256_or_si256(_mm256_and_si256(q4bits1, m15), q4h_0);
            let q4_1 = _mm256_or_si256(_mm256_and_si256(q4bits2, m15), q4h_1);
            let q4_2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m15), q4h_2);
            let q4_3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m15), q4h_3);
            let shuffle = |s: usize| _mm_loadu_si128(SCALE_SHUFFLE[4 * j + s].as_ptr().cast());
            let scale_0 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuffle(0)));
            let scale_1 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuffle(1)));
            let scale_2 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuffle(2)));
            let scale_3 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuffle(3)));
            for r in 0..R {
                let q8 = ys[r].add(i * Q8_K_BLOCK + Q8_K_QS + 128 * j);
                let p16_0 = _mm256_madd_epi16(scale_0, _mm256_maddubs_epi16(q4_0, _mm256_loadu_si256(q8.cast())));
                let p16_1 =
                    _mm256_madd_epi16(scale_1, _mm256_maddubs_epi16(q4_1, _mm256_loadu_si256(q8.add(32).cast())));
                let p16_2 =
                    _mm256_madd_epi16(scale_2, _mm256_maddubs_epi16(q4_2, _mm256_loadu_si256(q8.add(64).cast())));
                let p16_3 =
                    _mm256_madd_epi16(scale_3, _mm256_maddubs_epi16(q4_3, _mm256_loadu_si256(q8.add(96).cast())));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p16_0, p16_1));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p16_2, p16_3));
            }
        }
        for r in 0..R {
            let y = ys[r].add(i * Q8_K_BLOCK);
            // Q6_K stores weight + 32: subtract 32 * scale * (sum of the 16 activations it multiplies).
            let q8sums = _mm256_loadu_si256(y.add(Q8_K_BSUMS).cast());
            let q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
            let s = _mm256_sub_epi32(sumi[r], q8sclsub);
            let d = y.cast::<f32>().read() * xd;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_float_8(acc[r]);
    }
}
