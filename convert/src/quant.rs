//! Output types and the per-tensor type policy.
//!
//! The language-model mixes follow llama-quantize's rules for the `llama` architecture (llama.cpp
//! `src/llama-quant.cpp`, `llama_tensor_get_type_impl`), written down as one table; the shape fallbacks follow
//! its `tensor_type_fallback`.

use ggml::Type;

/// `--outtype` of the language model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlmType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6K,
    Q5KM,
    Q5_0,
    Q4KM,
    Q4KS,
    Q4_0,
}

/// Which extra bits a mix gives a tensor (llama-quantize's `use_more_bits` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bump {
    /// No change.
    None,
    /// `use_more_bits(i, n)`: the first and last eighth of the layers and every third layer between.
    MoreBits(Type),
    /// The first `n/8` layers (`ffn_down` in `_s` mixes).
    FirstEighth(Type),
    /// The first four layers (`attn_v` in `_s` mixes).
    FirstFour(Type),
}

/// One row of the mix table.
struct Mix {
    name: &'static str,
    base: Type,
    /// `general.file_type` (`enum llama_ftype`).
    ftype: u32,
    /// Type of `output.weight` (llama-quantize gives quantized files Q6_K, Q8_0 files Q8_0).
    output: Type,
    attn_v: Bump,
    ffn_down: Bump,
}

const MIXES: &[(LlmType, Mix)] = &[
    (
        LlmType::F32,
        Mix { name: "f32", base: Type::F32, ftype: 0, output: Type::F32, attn_v: Bump::None, ffn_down: Bump::None },
    ),
    (
        LlmType::F16,
        Mix { name: "f16", base: Type::F16, ftype: 1, output: Type::F16, attn_v: Bump::None, ffn_down: Bump::None },
    ),
    (
        LlmType::BF16,
        Mix { name: "bf16", base: Type::BF16, ftype: 32, output: Type::BF16, attn_v: Bump::None, ffn_down: Bump::None },
    ),
    (
        LlmType::Q8_0,
        Mix { name: "q8_0", base: Type::Q8_0, ftype: 7, output: Type::Q8_0, attn_v: Bump::None, ffn_down: Bump::None },
    ),
    (
        LlmType::Q6K,
        Mix { name: "q6_k", base: Type::Q6K, ftype: 18, output: Type::Q6K, attn_v: Bump::None, ffn_down: Bump::None },
    ),
    (
        LlmType::Q5KM,
        Mix {
            name: "q5_k_m",
            base: Type::Q5K,
            ftype: 17,
            output: Type::Q6K,
            attn_v: Bump::MoreBits(Type::Q6K),
            ffn_down: Bump::MoreBits(Type::Q6K),
        },
    ),
    (
        LlmType::Q5_0,
        Mix { name: "q5_0", base: Type::Q5_0, ftype: 8, output: Type::Q6K, attn_v: Bump::None, ffn_down: Bump::None },
    ),
    (
        LlmType::Q4KM,
        Mix {
            name: "q4_k_m",
            base: Type::Q4K,
            ftype: 15,
            output: Type::Q6K,
            attn_v: Bump::MoreBits(Type::Q6K),
            ffn_down: Bump::MoreBits(Type::Q6K),
        },
    ),
    (
        LlmType::Q4KS,
        Mix {
            name: "q4_k_s",
            base: Type::Q4K,
            ftype: 14,
            output: Type::Q6K,
            attn_v: Bump::FirstFour(Type::Q5K),
            ffn_down: Bump::FirstEighth(Type::Q5K),
        },
    ),
    (
        LlmType::Q4_0,
        Mix { name: "q4_0", base: Type::Q4_0, ftype: 2, output: Type::Q6K, attn_v: Bump::None, ffn_down: Bump::None },
    ),
];

/// What a tensor is, for the type policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// 1-D tensors (norms, biases) and position embeddings: always F32.
    KeepF32,
    TokenEmbd,
    Output,
    /// `attn_v` of layer i.
    AttnV(usize),
    /// `ffn_down` of layer i.
    FfnDown(usize),
    /// Any other 2-D weight.
    Weight,
}

impl LlmType {
    fn mix(self) -> &'static Mix {
        &MIXES.iter().find(|(t, _)| *t == self).expect("every LlmType has a row").1
    }

    /// All types, in `--outtype` order.
    pub fn all() -> impl Iterator<Item = LlmType> {
        MIXES.iter().map(|(t, _)| *t)
    }

    /// The CLI name (`q4_k_m`).
    pub fn name(self) -> &'static str {
        self.mix().name
    }

    /// Parses a CLI name, ignoring case.
    pub fn parse(s: &str) -> Option<LlmType> {
        LlmType::all().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// `general.file_type`.
    pub fn ftype(self) -> u32 {
        self.mix().ftype
    }

    /// The ggml type of a tensor of role `role` and `ne0` columns in a model of `n_layer` layers.
    pub fn tensor_type(self, role: Role, ne0: usize, n_layer: usize) -> Type {
        let m = self.mix();
        let bump = |b: Bump, i: usize| match b {
            Bump::None => m.base,
            Bump::MoreBits(t) => {
                if use_more_bits(i, n_layer) {
                    t
                } else {
                    m.base
                }
            }
            Bump::FirstEighth(t) => {
                if i < n_layer / 8 {
                    t
                } else {
                    m.base
                }
            }
            Bump::FirstFour(t) => {
                if i < 4 {
                    t
                } else {
                    m.base
                }
            }
        };
        let wanted = match role {
            Role::KeepF32 => return Type::F32,
            Role::Output if ne0 % 256 != 0 && m.output == Type::Q6K => Type::Q8_0,
            Role::Output => m.output,
            Role::AttnV(i) => bump(m.attn_v, i),
            Role::FfnDown(i) => bump(m.ffn_down, i),
            Role::TokenEmbd | Role::Weight => m.base,
        };
        fallback(wanted, ne0)
    }
}

/// llama-quantize's `use_more_bits`.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A type whose block fits rows of `ne0` values: llama-quantize's fallbacks (a K-quant falls back to a 32-block type
/// of similar size), then F16.
pub fn fallback(ty: Type, ne0: usize) -> Type {
    if ne0 % ty.block_size() == 0 {
        return ty;
    }
    let smaller = match ty {
        Type::Q2K | Type::Q3K => Type::Q4_0,
        Type::Q4K => Type::Q5_0,
        Type::Q5K => Type::Q5_1,
        Type::Q6K => Type::Q8_0,
        other => other,
    };
    if ne0 % smaller.block_size() == 0 {
        smaller
    } else {
        Type::F16
    }
}

/// `--mmproj-outtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmprojType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q5_0,
    Q4_0,
}

const MMPROJ_TYPES: &[(MmprojType, &str, Type, u32)] = &[
    (MmprojType::F32, "f32", Type::F32, 0),
    (MmprojType::F16, "f16", Type::F16, 1),
    (MmprojType::BF16, "bf16", Type::BF16, 32),
    (MmprojType::Q8_0, "q8_0", Type::Q8_0, 7),
    (MmprojType::Q5_0, "q5_0", Type::Q5_0, 8),
    (MmprojType::Q4_0, "q4_0", Type::Q4_0, 2),
];

impl MmprojType {
    fn row(self) -> &'static (MmprojType, &'static str, Type, u32) {
        MMPROJ_TYPES.iter().find(|r| r.0 == self).expect("every MmprojType has a row")
    }

    /// All types, in `--mmproj-outtype` order.
    pub fn all() -> impl Iterator<Item = MmprojType> {
        MMPROJ_TYPES.iter().map(|r| r.0)
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    pub fn parse(s: &str) -> Option<MmprojType> {
        MmprojType::all().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    pub fn ftype(self) -> u32 {
        self.row().3
    }

    /// Type of a 2-D matrix with `ne0` columns (every SigLIP matrix is made to fit, see `mmproj.rs`).
    pub fn weight_type(self, ne0: usize) -> Type {
        fallback(self.row().2, ne0)
    }

    /// The patch-embedding kernel (14-wide rows fit no quant block): F32 in F32 files, else F16 (what llama.cpp's
    /// converter does, and what `ggml_conv_2d` handles everywhere).
    pub fn patch_type(self) -> Type {
        if self == MmprojType::F32 {
            Type::F32
        } else {
            Type::F16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_mix_matches_llama_quantize() {
        // llm-jp-3-3.7b: 28 layers. use_more_bits: i < 3, i >= 24, or (i - 3) % 3 == 2.
        let n = 28;
        let v: Vec<Type> = (0..n).map(|i| LlmType::Q4KM.tensor_type(Role::AttnV(i), 3072, n)).collect();
        let q6: Vec<usize> = (0..n).filter(|&i| v[i] == Type::Q6K).collect();
        assert_eq!(q6, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
        assert_eq!(LlmType::Q4KM.tensor_type(Role::Output, 3072, n), Type::Q6K);
        assert_eq!(LlmType::Q4KM.tensor_type(Role::TokenEmbd, 3072, n), Type::Q4K);
        assert_eq!(LlmType::Q4KM.tensor_type(Role::Weight, 3072, n), Type::Q4K);
        assert_eq!(LlmType::Q4KM.tensor_type(Role::KeepF32, 3072, n), Type::F32);
        assert_eq!(LlmType::Q4KS.tensor_type(Role::FfnDown(2), 8192, n), Type::Q5K);
        assert_eq!(LlmType::Q4KS.tensor_type(Role::FfnDown(3), 8192, n), Type::Q4K);
        assert_eq!(LlmType::Q4_0.tensor_type(Role::Output, 3072, n), Type::Q6K);
        assert_eq!(LlmType::Q8_0.tensor_type(Role::Output, 3072, n), Type::Q8_0);
    }

    #[test]
    fn fallbacks() {
        assert_eq!(fallback(Type::Q4K, 320), Type::Q5_0);
        assert_eq!(fallback(Type::Q6K, 320), Type::Q8_0);
        assert_eq!(fallback(Type::Q8_0, 4304), Type::F16);
        assert_eq!(fallback(Type::Q4K, 4096), Type::Q4K);
        assert_eq!(LlmType::Q4KM.tensor_type(Role::Output, 320, 2), Type::Q8_0);
    }
}
