//! The weights of a synthetic checkpoint: a counter-based generator specified bit for bit, so that the Python
//! reference (tests/reference/make_fullwidth.py) produces the very same bf16 values from the same seed and HF
//! computes goldens on exactly what `synth` writes. Hand-written because the bits are the specification:
//!
//! - key = FNV-1a 64 of the tensor's HF name XOR seed; element i (row-major) draws
//!   `splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15)`; its top 24 bits give `u = (k - 2^23) * 2^-23` in [-1, 1)
//!   (exact in f32);
//! - value = `u * amp + offset` in f32 (two roundings, no fused multiply-add), then bf16 round-to-nearest-even;
//! - `amp` is the f32 rounding of an f64 expression: `std * sqrt(3)` (a uniform with that std), or
//!   `gain * sqrt(3) / sqrt(fan_in)` (LeCun, so that activations stay O(1) as in a trained model);
//! - rows of `embed_tokens` and `lm_head` beyond the tokenizer are 0 (they can never win a greedy step).
//!
//! The per-tensor rules are the table [`RULES`]; names match by suffix, first match wins.

/// How a tensor's values are spread: a uniform with standard deviation `Std`, or LeCun's `gain / sqrt(fan_in)`
/// (`fan_in: None` = the weight's second dimension).
#[derive(Clone, Copy, Debug)]
enum Spread {
    Std(f64),
    LeCun { gain: f64, fan_in: Option<usize> },
}

/// (name suffix, offset, spread, rows beyond the tokenizer are zero).
const RULES: &[(&str, f32, Spread, bool)] = &[
    // Norm weights near 1, LayerNorm biases near 0.
    ("layer_norm1.weight", 1.0, Spread::Std(0.1), false),
    ("layer_norm2.weight", 1.0, Spread::Std(0.1), false),
    ("post_layernorm.weight", 1.0, Spread::Std(0.1), false),
    ("input_layernorm.weight", 1.0, Spread::Std(0.1), false),
    ("post_attention_layernorm.weight", 1.0, Spread::Std(0.1), false),
    ("model.norm.weight", 1.0, Spread::Std(0.1), false),
    ("layer_norm1.bias", 0.0, Spread::Std(0.1), false),
    ("layer_norm2.bias", 0.0, Spread::Std(0.1), false),
    ("post_layernorm.bias", 0.0, Spread::Std(0.1), false),
    // The patch embedding is a 3x14x14 -> width convolution.
    ("embeddings.patch_embedding.weight", 0.0, Spread::LeCun { gain: 1.0, fan_in: Some(3 * 14 * 14) }, false),
    ("embeddings.position_embedding.weight", 0.0, Spread::Std(0.5), false),
    // The residual stream starts at rms 1; logits get a std of about 3.5, like the small fixtures'.
    ("embed_tokens.weight", 0.0, Spread::Std(1.0), true),
    ("lm_head.weight", 0.0, Spread::LeCun { gain: 3.5, fan_in: None }, true),
    // The residual branch's output scaled down (GPT-2 style).
    ("mlp.down_proj.weight", 0.0, Spread::LeCun { gain: 0.6, fan_in: None }, false),
];

/// Any other 2-D `.weight`: LeCun with gain 1; anything else (biases, `head.probe`): std 0.05.
const OTHER_MATRIX: Spread = Spread::LeCun { gain: 1.0, fan_in: None };
const OTHER: Spread = Spread::Std(0.05);

/// What the generator needs for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorInit {
    key: u64,
    pub offset: f32,
    pub amp: f32,
    /// Row length (elements), for the zeroed rows.
    cols: usize,
    /// Rows from this one on are 0.
    zero_from_row: Option<usize>,
}

impl TensorInit {
    /// The rule for tensor `name` of `shape` in a checkpoint whose tokenizer has `tokenizer_len` entries.
    pub fn new(name: &str, shape: &[usize], tokenizer_len: usize, seed: u64) -> TensorInit {
        let rule = RULES.iter().find(|r| name.ends_with(r.0));
        let (offset, spread, zero_pad) = match rule {
            Some(&(_, offset, spread, zero_pad)) => (offset, spread, zero_pad),
            None if name.ends_with(".weight") && shape.len() == 2 => (0.0, OTHER_MATRIX, false),
            None => (0.0, OTHER, false),
        };
        let amp = match spread {
            Spread::Std(std) => (std * 3f64.sqrt()) as f32,
            Spread::LeCun { gain, fan_in } => {
                let n = fan_in.unwrap_or(shape.get(1).copied().unwrap_or(1));
                ((gain * 3f64.sqrt()) / (n as f64).sqrt()) as f32
            }
        };
        let cols = shape.iter().skip(1).product::<usize>().max(1);
        TensorInit {
            key: fnv1a64(name.as_bytes()) ^ seed,
            offset,
            amp,
            cols,
            zero_from_row: zero_pad.then_some(tokenizer_len),
        }
    }

    /// The bf16 bits of elements `start..start + out.len()` (row-major).
    pub fn fill(&self, start: usize, out: &mut [u16]) {
        let zero_from = self.zero_from_row.map_or(usize::MAX, |r| r.saturating_mul(self.cols));
        for (i, v) in (start..).zip(out.iter_mut()) {
            *v = if i >= zero_from { 0 } else { bf16_bits(self.value(i)) };
        }
    }

    /// Element `i` in f32, before the bf16 rounding (and before zeroing).
    pub fn value(&self, i: usize) -> f32 {
        let z = splitmix64(self.key.wrapping_add((i as u64).wrapping_add(1).wrapping_mul(GAMMA)));
        let u = ((z >> 40) as i32 - (1 << 23)) as f32 * (1.0 / (1u32 << 23) as f32);
        u * self.amp + self.offset
    }
}

/// bf16 round-to-nearest-even of a finite value (the generator makes no NaN), written out so that the test
/// build (opt-level 0, where `half`'s conversion is a call per value) stays fast; `half::bf16::from_f32` gives the
/// same bits (checked in the tests below).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_and_splitmix_reference_values() {
        // FNV-1a 64 of "" and "a" (the published test vectors); splitmix64's first output from state 0
        // (0xE220A8397B1DCDAF, as in Vigna's reference implementation, which adds GAMMA before mixing).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(splitmix64(GAMMA), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn rules_by_name() {
        let t = |name: &str, shape: &[usize]| TensorInit::new(name, shape, 10, 1);
        let norm = t("language_model.model.norm.weight", &[2048]);
        assert_eq!((norm.offset, norm.amp), (1.0, (0.1 * 3f64.sqrt()) as f32));
        let q = t("language_model.model.layers.0.self_attn.q_proj.weight", &[2048, 2048]);
        assert_eq!(q.amp, (3f64.sqrt() / 2048f64.sqrt()) as f32);
        let down = t("language_model.model.layers.0.mlp.down_proj.weight", &[2048, 7168]);
        assert_eq!(down.amp, ((0.6 * 3f64.sqrt()) / 7168f64.sqrt()) as f32);
        let bias = t("multi_modal_projector.linear_1.bias", &[2048]);
        assert_eq!((bias.offset, bias.amp), (0.0, (0.05 * 3f64.sqrt()) as f32));
        // Rows from the tokenizer's length on are zero.
        let head = t("language_model.lm_head.weight", &[12, 4]);
        let mut out = [1u16; 48];
        head.fill(0, &mut out);
        assert!(out[..40].iter().any(|&v| v != 0) && out[40..].iter().all(|&v| v == 0));
        // The hand-written bf16 rounding is half's.
        for i in 0..100_000 {
            let v = q.value(i) * 1e3;
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        // Values stay inside [offset - amp, offset + amp).
        for i in 0..1000 {
            let v = norm.value(i);
            assert!(v >= 1.0 - norm.amp && v < 1.0 + norm.amp, "{v}");
        }
    }
}
