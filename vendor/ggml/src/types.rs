//! ggml tensor types: one table from our enum to ggml's ids and names.

use crate::sys;

macro_rules! types {
    ($( $variant:ident = $ggml:ident, $name:literal; )*) => {
        /// The ggml tensor types asagi-gguf reads, writes or computes with.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Type { $( $variant, )* }

        impl Type {
            /// Every type of the table.
            pub const ALL: &'static [Type] = &[ $( Type::$variant, )* ];

            /// ggml's enum value.
            pub fn to_sys(self) -> sys::ggml_type {
                match self { $( Type::$variant => sys::$ggml, )* }
            }

            /// The type for a ggml enum value, if it is one of the table.
            pub fn from_sys(t: sys::ggml_type) -> Option<Type> {
                match t { $( sys::$ggml => Some(Type::$variant), )* _ => None }
            }

            /// The lower-case name ggml prints (`q4_K`) and the CLI accepts (case-insensitively).
            pub fn name(self) -> &'static str {
                match self { $( Type::$variant => $name, )* }
            }
        }
    };
}

types! {
    F32 = GGML_TYPE_F32, "f32";
    F16 = GGML_TYPE_F16, "f16";
    BF16 = GGML_TYPE_BF16, "bf16";
    Q4_0 = GGML_TYPE_Q4_0, "q4_0";
    Q4_1 = GGML_TYPE_Q4_1, "q4_1";
    Q5_0 = GGML_TYPE_Q5_0, "q5_0";
    Q5_1 = GGML_TYPE_Q5_1, "q5_1";
    Q8_0 = GGML_TYPE_Q8_0, "q8_0";
    Q2K = GGML_TYPE_Q2_K, "q2_K";
    Q3K = GGML_TYPE_Q3_K, "q3_K";
    Q4K = GGML_TYPE_Q4_K, "q4_K";
    Q5K = GGML_TYPE_Q5_K, "q5_K";
    Q6K = GGML_TYPE_Q6_K, "q6_K";
    IQ4NL = GGML_TYPE_IQ4_NL, "iq4_nl";
    IQ2XXS = GGML_TYPE_IQ2_XXS, "iq2_xxs";
    IQ2XS = GGML_TYPE_IQ2_XS, "iq2_xs";
    IQ1S = GGML_TYPE_IQ1_S, "iq1_s";
    I8 = GGML_TYPE_I8, "i8";
    I16 = GGML_TYPE_I16, "i16";
    I32 = GGML_TYPE_I32, "i32";
    I64 = GGML_TYPE_I64, "i64";
    F64 = GGML_TYPE_F64, "f64";
}

impl Type {
    /// Elements per quantization block (1 for plain types).
    pub fn block_size(self) -> usize {
        // SAFETY: a pure table lookup in ggml's type traits; every `Type` maps to a valid ggml type id.
        unsafe { sys::ggml_blck_size(self.to_sys()) as usize }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        // SAFETY: as in `block_size`.
        unsafe { sys::ggml_type_size(self.to_sys()) }
    }

    /// Bytes of one row of `n` elements; `None` unless `n` is a multiple of the block size.
    pub fn row_size(self, n: usize) -> Option<usize> {
        (n % self.block_size() == 0).then(|| n / self.block_size() * self.type_size())
    }

    /// True for block-quantized types (everything but the plain float and integer types).
    pub fn is_quantized(self) -> bool {
        // SAFETY: as in `block_size`.
        unsafe { sys::ggml_is_quantized(self.to_sys()) }
    }

    /// True when ggml refuses to quantize to this type without an importance matrix.
    pub fn requires_imatrix(self) -> bool {
        // SAFETY: as in `block_size`.
        unsafe { sys::ggml_quantize_requires_imatrix(self.to_sys()) }
    }

    /// Parses a type name as `name()` prints it, ignoring case.
    pub fn parse(s: &str) -> Option<Type> {
        Type::ALL.iter().copied().find(|t| t.name().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_ggml() {
        for &t in Type::ALL {
            // SAFETY: ggml_type_name returns a static NUL-terminated string for every valid type id.
            let name = unsafe { std::ffi::CStr::from_ptr(sys::ggml_type_name(t.to_sys())) };
            assert_eq!(name.to_str().unwrap(), t.name());
            assert_eq!(Type::from_sys(t.to_sys()), Some(t));
        }
    }

    #[test]
    fn block_sizes() {
        assert_eq!((Type::Q4_0.block_size(), Type::Q4_0.type_size()), (32, 18));
        assert_eq!((Type::Q8_0.block_size(), Type::Q8_0.type_size()), (32, 34));
        assert_eq!((Type::Q4K.block_size(), Type::Q4K.type_size()), (256, 144));
        assert_eq!((Type::Q6K.block_size(), Type::Q6K.type_size()), (256, 210));
        assert_eq!(Type::Q4K.row_size(4304), None);
        assert_eq!(Type::F16.row_size(4304), Some(8608));
        assert!(Type::IQ2XXS.requires_imatrix() && !Type::Q4K.requires_imatrix());
    }
}
