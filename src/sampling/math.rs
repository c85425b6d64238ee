//! The float32 kernels the processors share, written to follow torch's CPU kernels (hf-generation.md §0): values
//! stay f32, reductions accumulate in f64 and round once (torch's own reductions are not sequential, so no order
//! reproduces them bit for bit; an f64 sum rounded to f32 is within an ulp of any of them).

use std::cmp::Ordering;

/// `torch.softmax` on f32: `exp(x - max)` then multiplied by `1 / sum` (as torch's `_vec_softmax_lastdim`).
/// A row of only `-inf` gives NaNs, as in torch.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = max(x);
    let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
    let inv = 1.0 / (e.iter().map(|&v| v as f64).sum::<f64>() as f32);
    e.into_iter().map(|v| v * inv).collect()
}

/// `torch.log_softmax` on f32: `x - max - log(sum(exp(x - max)))`.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = max(x);
    let lse = (x.iter().map(|&v| (v - m).exp() as f64).sum::<f64>() as f32).ln();
    x.iter().map(|&v| (v - m) - lse).collect()
}

/// torch's CPU `cumsum` on f32: a sequential f64 accumulator, stored as f32 at every step.
pub fn cumsum(x: &[f32]) -> Vec<f32> {
    let mut acc = 0f64;
    x.iter()
        .map(|&v| {
            acc += v as f64;
            acc as f32
        })
        .collect()
}

/// The largest value (NaN if there is one, as `torch.max`); `-inf` for an empty row.
pub fn max(x: &[f32]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for &v in x {
        if v.is_nan() {
            return v;
        }
        if v > m {
            m = v;
        }
    }
    m
}

/// `torch.argmax`: the first index of the maximum (a NaN counts as the maximum, as in torch).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            return i;
        }
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Descending order of scores, NaN first (torch sorts NaN as the largest value); equal values compare equal so
/// that the index decides. -0.0 and 0.0 are equal, as in torch.
pub fn cmp_desc(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => b.partial_cmp(&a).unwrap(),
    }
}

/// Indices sorted by score, ascending, ties by lower index first (the fixed tie rule for torch's unstable sort).
pub fn argsort_asc(x: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| cmp_desc(x[j], x[i]).then(i.cmp(&j)));
    idx
}

/// Indices sorted by score, descending, ties by lower index first.
pub fn argsort_desc(x: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| cmp_desc(x[i], x[j]).then(i.cmp(&j)));
    idx
}

/// `torch.topk(x, k, sorted=True)` indices: the k largest, descending, ties by lower index first. Selects
/// before sorting, since the beam candidates span K×V scores.
pub fn top_k_desc(x: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(x.len());
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let cmp = |&i: &usize, &j: &usize| cmp_desc(x[i], x[j]).then(i.cmp(&j));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_ties() {
        let x = [1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0];
        assert_eq!(argmax(&x), 1);
        assert_eq!(argsort_desc(&x), vec![1, 2, 4, 0, 3]);
        assert_eq!(argsort_asc(&x), vec![3, 0, 4, 1, 2]);
        assert_eq!(top_k_desc(&x, 3), vec![1, 2, 4]);
        assert_eq!(top_k_desc(&x, 9), vec![1, 2, 4, 0, 3]);
        assert_eq!(max(&x), 3.0);
    }

    #[test]
    fn softmax_sums_to_one_and_masks() {
        let p = softmax(&[0.0, 1.0, f32::NEG_INFINITY]);
        assert_eq!(p[2], 0.0);
        assert!((p[0] + p[1] - 1.0).abs() < 1e-6);
        let l = log_softmax(&[0.0, 0.0]);
        assert!((l[0] - (0.5f32).ln()).abs() < 1e-7);
        assert_eq!(cumsum(&[0.25, 0.5, 0.25]), vec![0.25, 0.75, 1.0]);
    }
}
