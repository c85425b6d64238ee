//! What a conversion writes: per output file, its keys and, per tensor, where the values come from and how rows
//! and columns are rearranged on the way (Q/K permutation, zero padding).

use std::path::PathBuf;

use anyhow::{bail, Result};
use ggml::gguf::Value;
use ggml::Type;

use crate::checkpoint::Checkpoint;

/// How output rows map to source rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMap {
    Identity,
    /// llama.cpp's `LlamaModel.permute` for Q/K projections: HF's rotate-half layout (pairs i, i+hd/2) becomes the
    /// adjacent pairs (2i, 2i+1) that ggml's normal RoPE mode rotates. Output row h·hd + 2j + s takes source row
    /// h·hd + s·hd/2 + j.
    PermuteQK {
        head_dim: usize,
    },
}

impl RowMap {
    pub fn source_row(self, r: usize) -> usize {
        match self {
            RowMap::Identity => r,
            RowMap::PermuteQK { head_dim } => {
                let (h, k) = (r / head_dim, r % head_dim);
                h * head_dim + (k % 2) * (head_dim / 2) + k / 2
            }
        }
    }
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// GGUF name.
    pub name: String,
    /// Checkpoint name.
    pub source: String,
    pub ty: Type,
    /// ggml order (`ne[0]` = columns).
    pub ne: Vec<usize>,
    /// Source columns per row (fewer than `ne[0]` when zero-padded on the right).
    pub src_cols: usize,
    /// Source rows (fewer than the output rows when zero rows are appended).
    pub src_rows: usize,
    pub rows: RowMap,
}

impl TensorPlan {
    /// A tensor copied as is: HF shape `[.., out, in]` becomes ggml `ne = [in, out, ..]`.
    pub fn direct(ckpt: &Checkpoint, name: &str, source: &str, ty: Type, expect: &[usize]) -> Result<TensorPlan> {
        let src = ckpt.get(source)?;
        if src.shape != expect {
            bail!(
                "{}: tensor {source} has shape {:?}, expected {expect:?} from config.json",
                ckpt.path_of(src).display(),
                src.shape
            );
        }
        let ne: Vec<usize> = expect.iter().rev().copied().collect();
        Ok(TensorPlan {
            name: name.into(),
            source: source.into(),
            ty,
            src_cols: ne[0],
            src_rows: ne[1..].iter().product(),
            ne,
            rows: RowMap::Identity,
        })
    }

    /// Rows of the output.
    pub fn n_rows(&self) -> usize {
        self.ne[1..].iter().product()
    }

    /// Pads the last dimension (columns) with zeros to `cols`.
    pub fn pad_cols(mut self, cols: usize) -> TensorPlan {
        assert!(cols >= self.ne[0] && self.ne.len() <= 2);
        self.ne[0] = cols;
        self
    }

    /// Appends zero rows up to `rows` (2-D tensors) or zero values (1-D tensors, padded as columns).
    pub fn pad_rows(mut self, rows: usize) -> TensorPlan {
        if self.ne.len() == 1 {
            return self.pad_cols(rows);
        }
        assert!(self.ne.len() == 2 && rows >= self.ne[1]);
        self.ne[1] = rows;
        self
    }

    pub fn with_rows(mut self, rows: RowMap) -> TensorPlan {
        self.rows = rows;
        self
    }

    /// Bytes in the output file.
    pub fn out_bytes(&self) -> usize {
        self.ty.row_size(self.ne[0]).expect("type fits the row") * self.n_rows()
    }
}

/// One output file.
#[derive(Clone, Debug)]
pub struct FilePlan {
    pub path: PathBuf,
    pub keys: Vec<(String, Value)>,
    pub tensors: Vec<TensorPlan>,
}

impl FilePlan {
    pub fn out_bytes(&self) -> usize {
        self.tensors.iter().map(TensorPlan::out_bytes).sum()
    }
}

/// Shorthands for building key lists.
pub fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}
pub fn u32v(v: usize) -> Value {
    Value::U32(v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_matches_llama_cpp() {
        // head_dim 8: HF rows [a0 a1 a2 a3 | b0 b1 b2 b3] (pairs ai, bi) become [a0 b0 a1 b1 a2 b2 a3 b3].
        let m = RowMap::PermuteQK { head_dim: 8 };
        let got: Vec<usize> = (0..16).map(|r| m.source_row(r)).collect();
        assert_eq!(got, vec![0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]);
    }
}
