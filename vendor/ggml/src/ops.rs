//! Graph operations. Each creates a node in the context; nothing is computed until a backend runs the graph.
//!
//! Soundness: every op takes handles of live tensors (their contexts outlive `'a`, enforced by `Tensor<'a>`) and
//! creates its result in `self`. ggml checks shapes itself and aborts the process (`GGML_ASSERT`) on a mismatch,
//! which is a bug in graph code, never undefined behaviour; model loaders validate every weight shape up front so
//! that user files cannot reach those asserts.

use crate::{sys, Context, Tensor, Type};

/// RoPE modes (`GGML_ROPE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Rotates adjacent pairs (x0,x1),(x2,x3)...: llama.cpp's mode for `llama` (weights Q/K-permuted by convert).
    Normal,
    /// Rotates (x_i, x_{i+d/2}): HF's `rotate_half` on unpermuted weights.
    Neox,
}

impl RopeMode {
    fn to_sys(self) -> i32 {
        match self {
            RopeMode::Normal => sys::GGML_ROPE_TYPE_NORMAL as i32,
            RopeMode::Neox => sys::GGML_ROPE_TYPE_NEOX as i32,
        }
    }
}

/// Parameters of `rope_ext` besides the mode (no context extension by default).
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub n_dims: usize,
    pub mode: RopeMode,
    pub n_ctx_orig: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

impl RopeParams {
    /// Plain RoPE with base `freq_base` over the first `n_dims` values of each head.
    pub fn plain(n_dims: usize, mode: RopeMode, freq_base: f32, n_ctx_orig: usize) -> RopeParams {
        RopeParams {
            n_dims,
            mode,
            n_ctx_orig,
            freq_base,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }
    }
}

macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident => $f:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
                // SAFETY: see the module comment.
                unsafe { Tensor::from_raw(sys::$f(self.as_ptr(), a.as_ptr())) }
            }
        )*
    };
}

macro_rules! binary {
    ($($(#[$doc:meta])* $name:ident => $f:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
                // SAFETY: see the module comment.
                unsafe { Tensor::from_raw(sys::$f(self.as_ptr(), a.as_ptr(), b.as_ptr())) }
            }
        )*
    };
}

impl Context {
    unary! {
        /// GELU, tanh approximation (PyTorch `gelu_pytorch_tanh`).
        gelu => ggml_gelu;
        /// GELU with the exact erf (PyTorch `gelu`).
        gelu_erf => ggml_gelu_erf;
        /// SiLU (x·sigmoid(x)).
        silu => ggml_silu;
        /// tanh, in f32 on every backend.
        tanh => ggml_tanh;
        /// 1 / (1 + e^-x).
        sigmoid => ggml_sigmoid;
        /// x².
        sqr => ggml_sqr;
        /// A contiguous copy.
        cont => ggml_cont;
        /// Swaps dimensions 0 and 1 (a view).
        transpose => ggml_transpose;
        /// Index of the maximum of each row (I32).
        argmax => ggml_argmax;
    }

    binary! {
        /// `a · bᵀ` in ggml's convention: a `[K, N]` (weights, any type), b `[K, M]` → `[N, M]` F32.
        mul_mat => ggml_mul_mat;
        /// Element-wise sum; `b` broadcasts over `a`.
        add => ggml_add;
        /// Element-wise product; `b` broadcasts over `a`.
        mul => ggml_mul;
        /// Rows of `a` selected by the I32 indices `b`.
        get_rows => ggml_get_rows;
        /// `silu(a) * b`, fused.
        swiglu_split => ggml_swiglu_split;
        /// Copies `a` into `b` (e.g. a view of a cache), converting type; returns the destination view.
        cpy => ggml_cpy;
    }

    /// `a * s + b`.
    pub fn scale_bias<'a>(&'a self, a: Tensor<'a>, s: f32, b: f32) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_scale_bias(self.as_ptr(), a.as_ptr(), s, b)) }
    }

    /// GELU, tanh form, computed in f32: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). `gelu` is the same function
    /// but ggml's CPU kernel looks it up in an f16 table (input and output rounded to 11 bits), which moves
    /// SigLIP's features by ~1e-3; this composition is exact to f32 rounding. It is written as
    /// x·sigmoid(u), u = 2√(2/π)·x·(1 + 0.044715·x²) (since (1 + tanh z)/2 = sigmoid(2z)): five element-wise
    /// passes, and ggml's sigmoid is an `expf` where its tanh is a slower `tanhf` (the vision tower's encode
    /// measured ~6% faster than the tanh form with eight passes).
    pub fn gelu_tanh_precise<'a>(&'a self, x: Tensor<'a>) -> Tensor<'a> {
        const TWO_SQRT_2_OVER_PI: f32 = 1.595_769_1;
        let s = self.scale_bias(self.sqr(x), TWO_SQRT_2_OVER_PI * 0.044715, TWO_SQRT_2_OVER_PI);
        self.mul(x, self.sigmoid(self.mul(s, x)))
    }

    /// RMS normalization over `ne[0]`: x / sqrt(mean(x²) + eps).
    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_rms_norm(self.as_ptr(), a.as_ptr(), eps)) }
    }

    /// Layer normalization over `ne[0]` without affine parameters.
    pub fn norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_norm(self.as_ptr(), a.as_ptr(), eps)) }
    }

    /// `a * s`.
    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_scale(self.as_ptr(), a.as_ptr(), s)) }
    }

    /// `softmax(a * scale + mask)` over `ne[0]`; `mask` (F16/F32, `[n_kv, >= n_q]`) broadcasts over heads.
    pub fn soft_max_ext<'a>(&'a self, a: Tensor<'a>, mask: Option<Tensor<'a>>, scale: f32) -> Tensor<'a> {
        let mask = mask.map_or(std::ptr::null_mut(), |m| m.as_ptr());
        // SAFETY: see the module comment; a null mask means no mask.
        unsafe { Tensor::from_raw(sys::ggml_soft_max_ext(self.as_ptr(), a.as_ptr(), mask, scale, 0.0)) }
    }

    /// Rotary position embedding of `a` `[head_dim, n_head, n_tokens]` at I32 positions `pos` `[n_tokens]`.
    pub fn rope_ext<'a>(&'a self, a: Tensor<'a>, pos: Tensor<'a>, p: RopeParams) -> Tensor<'a> {
        // SAFETY: see the module comment; no frequency-factor tensor (null).
        unsafe {
            Tensor::from_raw(sys::ggml_rope_ext(
                self.as_ptr(),
                a.as_ptr(),
                pos.as_ptr(),
                std::ptr::null_mut(),
                p.n_dims as i32,
                p.mode.to_sys(),
                p.n_ctx_orig as i32,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            ))
        }
    }

    /// Same data, new shape (`a` must be contiguous; element counts equal).
    pub fn reshape<'a>(&'a self, a: Tensor<'a>, ne: &[usize]) -> Tensor<'a> {
        let n = |i: usize| ne.get(i).copied().unwrap_or(1) as i64;
        assert_eq!(ne.iter().product::<usize>(), a.nelements(), "reshape of {a:?} to {ne:?}");
        // SAFETY: see the module comment.
        unsafe {
            Tensor::from_raw(match ne.len() {
                1 => sys::ggml_reshape_1d(self.as_ptr(), a.as_ptr(), n(0)),
                2 => sys::ggml_reshape_2d(self.as_ptr(), a.as_ptr(), n(0), n(1)),
                3 => sys::ggml_reshape_3d(self.as_ptr(), a.as_ptr(), n(0), n(1), n(2)),
                4 => sys::ggml_reshape_4d(self.as_ptr(), a.as_ptr(), n(0), n(1), n(2), n(3)),
                d => panic!("reshape to {d} dimensions"),
            })
        }
    }

    /// Reorders dimensions: dimension i of `a` becomes dimension `axes[i]` of the result (a view).
    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [usize; 4]) -> Tensor<'a> {
        let [x, y, z, w] = axes.map(|v| v as i32);
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_permute(self.as_ptr(), a.as_ptr(), x, y, z, w)) }
    }

    /// A view of `a` with shape `ne`, byte strides `nb[1..]` and a byte offset.
    ///
    /// Panics if the view would reach outside `a`'s bytes (ggml does not check this).
    pub fn view<'a>(&'a self, a: Tensor<'a>, ne: &[usize], nb: &[usize], offset: usize) -> Tensor<'a> {
        assert!((1..=4).contains(&ne.len()) && nb.len() + 1 == ne.len(), "view {ne:?} / {nb:?}");
        let row = a.ty().row_size(ne[0]).unwrap_or(usize::MAX / 2);
        let span = offset + row + ne[1..].iter().zip(nb).map(|(&n, &s)| (n.max(1) - 1) * s).sum::<usize>();
        assert!(span <= a.nbytes(), "view {ne:?}/{nb:?}+{offset} outside {a:?} ({} bytes)", a.nbytes());
        let n = |i: usize| ne.get(i).copied().unwrap_or(1) as i64;
        let s = |i: usize| nb.get(i).copied().unwrap_or(0);
        // SAFETY: see the module comment; the view lies inside `a` (checked above).
        unsafe {
            Tensor::from_raw(match ne.len() {
                1 => sys::ggml_view_1d(self.as_ptr(), a.as_ptr(), n(0), offset),
                2 => sys::ggml_view_2d(self.as_ptr(), a.as_ptr(), n(0), n(1), s(0), offset),
                3 => sys::ggml_view_3d(self.as_ptr(), a.as_ptr(), n(0), n(1), n(2), s(0), s(1), offset),
                _ => sys::ggml_view_4d(self.as_ptr(), a.as_ptr(), n(0), n(1), n(2), n(3), s(0), s(1), s(2), offset),
            })
        }
    }

    /// Converts to another type.
    pub fn cast<'a>(&'a self, a: Tensor<'a>, ty: Type) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_cast(self.as_ptr(), a.as_ptr(), ty.to_sys())) }
    }

    /// Concatenates along dimension `dim`.
    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: usize) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_concat(self.as_ptr(), a.as_ptr(), b.as_ptr(), dim as i32)) }
    }

    /// Writes the rows of `src` into `dst` at the I32/I64 row indices `idx` (KV-cache updates); returns `dst`.
    pub fn set_rows<'a>(&'a self, dst: Tensor<'a>, src: Tensor<'a>, idx: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_set_rows(self.as_ptr(), dst.as_ptr(), src.as_ptr(), idx.as_ptr())) }
    }

    /// Unfolds `data` `[W, H, C, N]` into the patches a `kernel` `[KW, KH, C, OC]` sees, as rows of `dst_type`:
    /// `[KW*KH*C, OW, OH, N]` (2-D, no dilation).
    pub fn im2col<'a>(
        &'a self,
        kernel: Tensor<'a>,
        data: Tensor<'a>,
        stride: usize,
        pad: usize,
        dst_type: Type,
    ) -> Tensor<'a> {
        let (s, p) = (stride as i32, pad as i32);
        // SAFETY: see the module comment.
        unsafe {
            Tensor::from_raw(sys::ggml_im2col(
                self.as_ptr(),
                kernel.as_ptr(),
                data.as_ptr(),
                s,
                s,
                p,
                p,
                1,
                1,
                true,
                dst_type.to_sys(),
            ))
        }
    }

    /// 2-D convolution of `data` `[W, H, C, N]` with `kernel` `[KW, KH, C, OC]` (im2col + matmul).
    pub fn conv_2d<'a>(&'a self, kernel: Tensor<'a>, data: Tensor<'a>, stride: usize, pad: usize) -> Tensor<'a> {
        let (s, p) = (stride as i32, pad as i32);
        // SAFETY: see the module comment.
        unsafe { Tensor::from_raw(sys::ggml_conv_2d(self.as_ptr(), kernel.as_ptr(), data.as_ptr(), s, s, p, p, 1, 1)) }
    }

    /// Fused attention: q `[d, n_q, h, 1]`, k/v `[d, n_kv, h_kv, 1]`, F16 mask `[n_kv, n_q_pad]`;
    /// result `[d_v, h, n_q, 1]`.
    pub fn flash_attn_ext<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        mask: Option<Tensor<'a>>,
        scale: f32,
    ) -> Tensor<'a> {
        let mask = mask.map_or(std::ptr::null_mut(), |m| m.as_ptr());
        // SAFETY: see the module comment; F32 accumulation as llama.cpp requests it.
        unsafe {
            let t = sys::ggml_flash_attn_ext(self.as_ptr(), q.as_ptr(), k.as_ptr(), v.as_ptr(), mask, scale, 0.0, 0.0);
            sys::ggml_flash_attn_ext_set_prec(t, sys::GGML_PREC_F32);
            Tensor::from_raw(t)
        }
    }
}
