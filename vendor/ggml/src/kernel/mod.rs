//! asagi-gguf's own CPU kernels, run inside ggml graphs as custom ops, only for shapes where a profile showed
//! ggml's kernels leave a clear margin, and only where they give ggml's results bit for bit.
//!
//! `Context::mul_mat_few` is ggml's `mul_mat` but for 2 to 7 activation rows (a beam step's or a small batch's
//! matrix products) on an AVX2 CPU, where ggml unpacks every weight once per row or per row left over after its
//! 4-row kernel: a Q6_K weight in CPU memory (`q6_k_avx2`), or a Q4_0 / Q4_K weight that ggml repacked for its
//! interleaved kernels (`q4_x8_avx2`; not at 4 rows, where its own kernel unpacks once), or where ggml reads a
//! Q8_0 weight twice (`q8_0_avx2`).

#[cfg(target_arch = "x86_64")]
mod q4_x8_avx2;
#[cfg(target_arch = "x86_64")]
mod q6_k_avx2;
#[cfg(target_arch = "x86_64")]
mod q8_0_avx2;

use crate::{sys, Context, Tensor, Type};

/// The most activation rows the multi-row kernels take: from 8 rows on ggml runs its tiled Q6_K kernel, which
/// sums in another order (so the results would no longer be the 1-row kernel's), and its repacked 4-row kernel
/// twice over, which leaves no unpacking to save.
pub const MAX_ROWS: usize = 7;

/// `block_q8_K` (ggml-common.h), the activations' type for K-quant weights: `d` f32, `qs[256]` i8 at 4, `bsums[16]`
/// i16 at 260 (sums of 16 values each).
#[cfg(target_arch = "x86_64")]
const Q8_K_BLOCK: usize = 292;
#[cfg(target_arch = "x86_64")]
const Q8_K_QS: usize = 4;
#[cfg(target_arch = "x86_64")]
const Q8_K_BSUMS: usize = 260;
/// `block_q8_0` (ggml-common.h): `d` f16, `qs[32]` i8; Q8_0 weights' type and Q4_0's activations' type.
#[cfg(target_arch = "x86_64")]
const Q8_0_BLOCK: usize = 34;

/// The f16 at `p` (two readable bytes inside a block) as f32 (exact), by the F16C instruction, inlined into the
/// kernels in every build: `half` converts inline only where the whole crate is compiled for F16C, and otherwise
/// (a build for baseline x86-64) checks for it at run time on each call, in the kernels' innermost loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(p.cast::<u16>().read_unaligned()))))
}

/// Eight f16 bit patterns as f32 lanes (exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16x8(v: [u16; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().cast()))
}

/// ggml's `hsum_float_8` (and llamafile sgemm's `hsum` of a `__m256`), in their order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_float_8(x: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let mut res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// Which of asagi-gguf's kernels `mul_mat_few` runs for a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultiRowKernel {
    /// Q6_K in a plain CPU buffer (allocated, or a mapped file).
    Q6K,
    /// Q8_0 in a plain CPU buffer, at the row counts ggml's tinyBLAS reads it twice.
    Q8_0,
    /// Q4_0 or Q4_K repacked by ggml's CPU_REPACK buffer into blocks of eight interleaved rows.
    Repacked8,
}

impl Context {
    /// `w · x` as `mul_mat`: through asagi-gguf's multi-row kernels when `multi_row_kernel` names one (the results
    /// are ggml's, bit for bit); through ggml otherwise.
    pub fn mul_mat_few<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        match multi_row_kernel(w, x) {
            None => self.mul_mat(w, x),
            Some(kernel) => self.rows_node(kernel, w, x),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn rows_node<'a>(&'a self, kernel: MultiRowKernel, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        // A repacked weight is not a source of the node but its `userdata`: ggml's CPU backend refuses every op
        // but MUL_MAT on a CPU_REPACK source (`supports_op`), so the scheduler would find no backend for it. The
        // weight is a leaf that nothing computes, so the graph loses no dependency by not naming it.
        let (mut args, n_args, userdata) = match kernel {
            MultiRowKernel::Q6K | MultiRowKernel::Q8_0 => ([w.as_ptr(), x.as_ptr()], 2, std::ptr::null_mut()),
            MultiRowKernel::Repacked8 => ([x.as_ptr(), std::ptr::null_mut()], 1, w.as_ptr().cast()),
        };
        // SAFETY: the tensors are live (their contexts outlive 'a, and the weight, named by `userdata`, lives in
        // the model, which outlives every graph built from it); ggml copies the source pointers into the new node
        // and calls `rows_op` with it and `userdata` on the CPU backend's threads. n_tasks -1: every thread.
        unsafe {
            Tensor::from_raw(sys::ggml_custom_4d(
                self.as_ptr(),
                sys::GGML_TYPE_F32,
                w.ne()[1] as i64,
                x.ne()[1] as i64,
                1,
                1,
                args.as_mut_ptr(),
                n_args,
                Some(rows_op),
                sys::GGML_N_TASKS_MAX,
                userdata,
            ))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn rows_node<'a>(&'a self, _: MultiRowKernel, _: Tensor<'a>, _: Tensor<'a>) -> Tensor<'a> {
        unreachable!("multi_row_kernel is None off x86-64")
    }
}

/// Whether `mul_mat_few(w, x)` runs one of the multi-row kernels.
pub fn multi_row_kernel_takes(w: Tensor<'_>, x: Tensor<'_>) -> bool {
    multi_row_kernel(w, x).is_some()
}

/// The kernel `mul_mat_few(w, x)` runs, if any.
pub fn multi_row_kernel(w: Tensor<'_>, x: Tensor<'_>) -> Option<MultiRowKernel> {
    let rows = x.ne()[1];
    let shapes = x.ty() == Type::F32
        && (2..=MAX_ROWS).contains(&rows)
        && w.ne()[2..] == [1, 1]
        && x.ne()[2..] == [1, 1]
        && w.is_contiguous()
        && x.nb()[0] == 4
        && x.ne()[0] == w.ne()[0];
    if !shapes || !cpu_has_avx2_fma() {
        return None;
    }
    match (w.ty(), buffer_name(w)?) {
        (Type::Q6K, b"CPU" | b"CPU_Mapped") => Some(MultiRowKernel::Q6K),
        (Type::Q8_0, b"CPU" | b"CPU_Mapped") if q8_0_read_twice_by_ggml(rows) => Some(MultiRowKernel::Q8_0),
        // At exactly 4 rows ggml's repacked GEMM already unpacks each weight once: measured level with ours
        // (ggml vs ours: 4B Q4_K_M 209 vs 211 ms a step, Q4_0 213 vs 234, medians of 5 alternating), so it keeps them.
        (Type::Q4_0 | Type::Q4K, b"CPU_REPACK") if repacked_8x8(w) && rows != 4 => Some(MultiRowKernel::Repacked8),
        _ => None,
    }
}

/// The row counts for which ggml's tinyBLAS walks a Q8_0 matrix twice (its `mnpack` covers the rows with a run of
/// equal tiles, then a smaller one): 3, 5 and 7 where ggml was built for AVX2 (16 vector registers, tiles of 2
/// rows), 5, 6 and 7 where for AVX-512 (32 registers, tiles of 4). At the other counts it reads each weight once, as
/// ours does, and spends no more per block: `benches/kernels.rs` (3072 x 24576, medians of 31 alternating runs)
/// measured ours at 0.86-1.94x ggml's time for 2 rows on the AVX2 build (median 1.49x over 14 runs) and 0.85-1.42x
/// for 2 to 4 rows on the AVX-512 one, so those stay with ggml; where it walks twice ours took 0.59-0.96x its time
/// (once 1.07x).
fn q8_0_read_twice_by_ggml(rows: usize) -> bool {
    // SAFETY: a feature probe without arguments (what ggml was compiled for).
    if unsafe { sys::ggml_cpu_has_avx512() } != 0 {
        matches!(rows, 5..=7)
    } else {
        matches!(rows, 3 | 5 | 7)
    }
}

/// The name of the buffer type holding `t`'s data (where the CPU backend computes on "CPU", "CPU_Mapped" and
/// "CPU_REPACK"; a GPU's or an RPC server's otherwise); None when it has no data.
fn buffer_name(t: Tensor<'_>) -> Option<&'static [u8]> {
    let buffer = t.raw_buffer();
    if buffer.is_null() || t.data_ptr().is_null() {
        return None;
    }
    // SAFETY: a live tensor's buffer (non-null, checked); buffer types' names are static strings in ggml.
    let name =
        unsafe { std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(sys::ggml_backend_buffer_get_type(buffer))) };
    Some(name.to_bytes())
}

/// A Q4_0 / Q4_K weight in the CPU_REPACK buffer is in ggml's 8-row interleaved layout when ggml gave it repack
/// traits (`extra`, set as it was placed) and it has a multiple of 8 rows: on x86-64 ggml's only layouts for these
/// types are `q4_0_8x8` and `q4_K_8x8`, chosen exactly then (repack.cpp, `ggml_repack_get_optimal_repack_type`,
/// whose other branches need ARM or RISC-V). `tests/ggml_matmul.rs` compares every output with ggml's.
fn repacked_8x8(w: Tensor<'_>) -> bool {
    // SAFETY: reads a field of a live tensor's header.
    let extra = unsafe { (*w.as_ptr()).extra };
    !extra.is_null() && w.ne()[1] % 8 == 0
}

/// The kernels' instructions (AVX2, FMA, F16C) are available, and ggml's own Q6_K dot product is its AVX2 one (so
/// the results agree bit for bit).
#[cfg(target_arch = "x86_64")]
fn cpu_has_avx2_fma() -> bool {
    // SAFETY: feature probes without arguments (what ggml was compiled for).
    let ggml_avx2 = unsafe { sys::ggml_cpu_has_avx2() != 0 && sys::ggml_cpu_has_fma() != 0 };
    ggml_avx2
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx2_fma() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's copy of the activations in the weight's dot-product type, Q8_K or Q8_0 (u32 words: Q8_K
    /// blocks hold an f32 and i16s). It grows to the largest batch seen and is reused: no allocation per step
    /// once warm.
    static Q8_ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The custom op: `dst[r][i] = w[i] · x[r]`. Every thread quantizes all the rows of `x` to the weight's
/// dot-product type (a few microseconds: there is no barrier inside a custom op to share one copy) with ggml's own
/// quantizer, as ggml's `mul_mat` does for its one-row kernels, then computes its share of the weight rows.
#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn rows_op(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, userdata: *mut std::ffi::c_void) {
    // SAFETY (whole function): ggml calls this with the node `rows_node` made: the weight `w` [k, m] is its first
    // source (Q6_K or Q8_0 in CPU memory) or its `userdata` (Q4_0 / Q4_K repacked, 8 | m); `x` [k, rows] F32 with
    // 2 <= rows <= MAX_ROWS and `dst` [m, rows] F32, all allocated (checked by `multi_row_kernel` when the node
    // was made; ggml's scheduler allocated dst and x). k is a multiple of the weight's block size. Threads write
    // disjoint ranges of weight rows.
    let d = &*dst;
    let (w, x) =
        if userdata.is_null() { (&*d.src[0], &*d.src[1]) } else { (&*userdata.cast::<sys::ggml_tensor>(), &*d.src[0]) };
    let (k, m, rows) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
    let q8_type = (*sys::ggml_get_type_traits_cpu(w.type_)).vec_dot_type;
    let Some(from_float) = (*sys::ggml_get_type_traits_cpu(q8_type)).from_float else { return };
    let row_words = sys::ggml_row_size(q8_type, k as i64).div_ceil(4);
    // After the rows, for a Q8_0 weight: the activations' scales as f32, eight per block (`q8_0_avx2::dot_rows`).
    let scales_at = rows * row_words;
    let q8_0_blocks = if w.type_ == sys::GGML_TYPE_Q8_0 { k / 32 } else { 0 };
    Q8_ROWS.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < scales_at + 8 * q8_0_blocks {
            buf.resize(scales_at + 8 * q8_0_blocks, 0);
        }
        for r in 0..rows {
            let src = x.data.cast::<u8>().add(r * x.nb[1]).cast::<f32>();
            from_float(src, buf.as_mut_ptr().add(r * row_words).cast(), k as i64);
        }
        for b in 0..q8_0_blocks {
            for r in 0..rows {
                let block = buf.as_ptr().add(r * row_words).cast::<u8>().add(b * Q8_0_BLOCK);
                buf[scales_at + 8 * b + r] = f16_at(block).to_bits();
            }
        }
        let y = |r: usize| buf.as_ptr().add(r.min(rows - 1) * row_words).cast::<u8>();
        // Q6_K, Q8_0: ranges of weight rows; repacked: of groups of 8 rows.
        let units = if userdata.is_null() { m } else { m / 8 };
        let range = (units * ith as usize / nth as usize)..(units * (ith as usize + 1) / nth as usize);
        macro_rules! run {
            ($r:literal) => {{
                let ys: [*const u8; $r] = std::array::from_fn(y);
                let out = |r: usize, i: usize| d.data.cast::<u8>().add(r * d.nb[1] + i * 4).cast::<f32>();
                let w_data = w.data.cast::<u8>();
                match w.type_ {
                    sys::GGML_TYPE_Q6_K | sys::GGML_TYPE_Q8_0 => {
                        let mut o = [0f32; $r];
                        for i in range {
                            let row = w_data.add(i * w.nb[1]);
                            if w.type_ == sys::GGML_TYPE_Q6_K {
                                q6_k_avx2::dot_rows::<$r>(k / 256, row, &ys, &mut o);
                            } else {
                                let yd = buf.as_ptr().add(scales_at).cast::<f32>();
                                q8_0_avx2::dot_rows::<$r>(k / 32, row, &ys, yd, &mut o);
                            }
                            for (r, v) in o.iter().enumerate() {
                                out(r, i).write(*v);
                            }
                        }
                    }
                    ty => {
                        // A group of 8 repacked rows takes the bytes of 8 rows.
                        let mut o = [[0f32; 8]; $r];
                        for g in range {
                            let group = w_data.add(8 * g * w.nb[1]);
                            if ty == sys::GGML_TYPE_Q4_K {
                                q4_x8_avx2::q4_kx8_rows::<$r>(k / 256, group, &ys, &mut o);
                            } else {
                                q4_x8_avx2::q4_0x8_rows::<$r>(k / 32, group, &ys, &mut o);
                            }
                            for (r, v) in o.iter().enumerate() {
                                std::ptr::copy_nonoverlapping(v.as_ptr(), out(r, 8 * g), 8);
                            }
                        }
                    }
                }
            }};
        }
        match rows {
            2 => run!(2),
            3 => run!(3),
            4 => run!(4),
            5 => run!(5),
            6 => run!(6),
            _ => run!(7),
        }
    });
}
