//! asagi-gguf's own CPU kernels, run inside ggml graphs as custom ops, only for shapes where a profile showed
//! ggml's kernels leave a clear margin, and only where they give ggml's results bit for bit.
//!
//! `Context::mul_mat_few` is ggml's `mul_mat` but for a Q6_K weight in CPU memory times 2 to 7 activation rows
//! on an AVX2 CPU: a beam step's or a small batch's matrix products (see `q6_k_avx2`).

#[cfg(target_arch = "x86_64")]
mod q6_k_avx2;

use crate::{sys, Context, Tensor, Type};

/// The most activation rows the multi-row kernel takes: from 8 rows on ggml runs its tiled K-quant kernel, which
/// sums in another order (so the results would no longer be the 1-row kernel's).
pub const MAX_ROWS: usize = 7;

impl Context {
    /// `w · x` as `mul_mat`: through asagi-gguf's multi-row kernel when `w` is Q6_K in CPU memory, `x` is 2 to
    /// `MAX_ROWS` contiguous F32 rows and the CPU has AVX2 and FMA (the results are ggml's, bit for bit); through
    /// ggml otherwise.
    pub fn mul_mat_few<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        if !multi_row_kernel_takes(w, x) {
            return self.mul_mat(w, x);
        }
        self.q6_k_rows_node(w, x)
    }

    #[cfg(target_arch = "x86_64")]
    fn q6_k_rows_node<'a>(&'a self, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        let mut args = [w.as_ptr(), x.as_ptr()];
        // SAFETY: both tensors are live (their contexts outlive 'a); ggml copies the two source pointers into the
        // new node and calls `q6_k_rows` with it on the CPU backend's threads. n_tasks -1: every thread.
        unsafe {
            Tensor::from_raw(sys::ggml_custom_4d(
                self.as_ptr(),
                sys::GGML_TYPE_F32,
                w.ne()[1] as i64,
                x.ne()[1] as i64,
                1,
                1,
                args.as_mut_ptr(),
                2,
                Some(q6_k_rows),
                sys::GGML_N_TASKS_MAX,
                std::ptr::null_mut(),
            ))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn q6_k_rows_node<'a>(&'a self, _: Tensor<'a>, _: Tensor<'a>) -> Tensor<'a> {
        unreachable!("multi_row_kernel_takes is false off x86-64")
    }
}

/// Whether `mul_mat_few(w, x)` runs the multi-row kernel.
pub fn multi_row_kernel_takes(w: Tensor<'_>, x: Tensor<'_>) -> bool {
    let rows = x.ne()[1];
    w.ty() == Type::Q6K
        && x.ty() == Type::F32
        && (2..=MAX_ROWS).contains(&rows)
        && w.ne()[2..] == [1, 1]
        && x.ne()[2..] == [1, 1]
        && w.is_contiguous()
        && x.nb()[0] == 4
        && x.ne()[0] == w.ne()[0]
        && in_cpu_memory(w)
        && cpu_has_avx2_fma()
}

/// True when `t`'s data is in a plain CPU buffer (allocated, or a mapped file), where the CPU backend computes and
/// a custom op may read it; not a GPU's, an RPC server's or the CPU repack buffer's (another layout).
fn in_cpu_memory(t: Tensor<'_>) -> bool {
    let buffer = t.raw_buffer();
    if buffer.is_null() || t.data_ptr().is_null() {
        return false;
    }
    // SAFETY: a live tensor's buffer (non-null, checked) and its type's static name string.
    let name =
        unsafe { std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(sys::ggml_backend_buffer_get_type(buffer))) };
    matches!(name.to_bytes(), b"CPU" | b"CPU_Mapped")
}

/// The kernel's instructions are available, and ggml's own Q6_K dot product is its AVX2 one (so the results
/// agree bit for bit).
#[cfg(target_arch = "x86_64")]
fn cpu_has_avx2_fma() -> bool {
    // SAFETY: feature probes without arguments (what ggml was compiled for).
    let ggml_avx2 = unsafe { sys::ggml_cpu_has_avx2() != 0 && sys::ggml_cpu_has_fma() != 0 };
    ggml_avx2 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx2_fma() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's copy of the activations in Q8_K (u32 words: ggml's blocks hold an f32 and i16s). It grows to
    /// the largest batch seen and is reused: no allocation per step once warm.
    static Q8_ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The custom op: `dst[r][i] = w[i] · x[r]`. Every thread quantizes all the rows of `x` to Q8_K (a few
/// microseconds: there is no barrier inside a custom op to share one copy) with ggml's own quantizer, as ggml's
/// `mul_mat` does, then computes its share of the weight rows.
#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn q6_k_rows(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    use q6_k_avx2::{dot_rows, Q8_K_BLOCK};
    // SAFETY (whole function): ggml calls this with the node `mul_mat_few` made, whose sources are the Q6_K weight
    // `w` [k, m] in CPU memory and F32 rows `x` [k, rows] with 2 <= rows <= MAX_ROWS, and `dst` [m, rows] F32,
    // all allocated (checked by `multi_row_kernel_takes` when the node was made; ggml's scheduler allocated dst and
    // x). k is a multiple of 256 (Q6_K rows are whole blocks). Threads write disjoint ranges of weight rows.
    let d = &*dst;
    let (w, x) = (&*d.src[0], &*d.src[1]);
    let (k, m, rows) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
    let nb = k / 256;
    let row_words = nb * Q8_K_BLOCK / 4;
    let from_float = (*sys::ggml_get_type_traits_cpu(sys::GGML_TYPE_Q8_K)).from_float;
    let Some(from_float) = from_float else { return };
    Q8_ROWS.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < rows * row_words {
            buf.resize(rows * row_words, 0);
        }
        for r in 0..rows {
            let src = x.data.cast::<u8>().add(r * x.nb[1]).cast::<f32>();
            from_float(src, buf.as_mut_ptr().add(r * row_words).cast(), k as i64);
        }
        let (first, last) = (m * ith as usize / nth as usize, m * (ith as usize + 1) / nth as usize);
        let y = |r: usize| buf.as_ptr().add(r.min(rows - 1) * row_words).cast::<u8>();
        macro_rules! run {
            ($r:literal) => {{
                let ys: [*const u8; $r] = std::array::from_fn(y);
                let mut out = [0f32; $r];
                for i in first..last {
                    dot_rows::<$r>(nb, w.data.cast::<u8>().add(i * w.nb[1]), &ys, &mut out);
                    for (r, v) in out.iter().enumerate() {
                        d.data.cast::<u8>().add(r * d.nb[1] + i * 4).cast::<f32>().write(*v);
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
