//! The processors that run only when sampling ("warpers", hf-generation.md §2 item 20 and §2.1), in f32 as HF.
//! Each masks with `-inf` in place. Ties in torch's (unstable) sorts are broken by lower index first.

use super::math::{argsort_asc, argsort_desc, cumsum, log_softmax, softmax, top_k_desc};

const NEG: f32 = f32::NEG_INFINITY;

/// `TemperatureLogitsWarper`: `scores / T`, T as f32 (torch casts the Python scalar to the tensor's dtype).
pub fn temperature(scores: &mut [f32], t: f32) {
    for s in scores {
        *s /= t;
    }
}

/// `TopKLogitsWarper`: keeps the tokens whose score is >= the k-th largest (ties at the boundary are all kept;
/// with fewer than k finite scores the threshold is -inf and nothing is removed). `k` is the constructor's
/// `max(top_k, min_tokens_to_keep)`; it is clamped to the row here.
pub fn top_k(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len());
    if k == 0 {
        return;
    }
    let kth = scores[*top_k_desc(scores, k).last().unwrap()];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = NEG;
        }
    }
}

/// `TopPLogitsWarper`: sort ascending, `cum = cumsum(softmax(sorted))`, remove where `cum <= 1 - p` (threshold
/// computed in f64 then compared in f32), never the last `min_keep`. A token is kept iff the mass strictly above
/// it is < p.
pub fn top_p(scores: &mut [f32], p: f64, min_keep: usize) {
    let order = argsort_asc(scores);
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let cum = cumsum(&softmax(&sorted));
    let threshold = (1.0 - p) as f32;
    let protected_from = order.len().saturating_sub(min_keep);
    for (rank, &i) in order.iter().enumerate() {
        if rank < protected_from && cum[rank] <= threshold {
            scores[i] = NEG;
        }
    }
}

/// `MinPLogitsWarper`: removes tokens with `prob < min_p * max(prob)` (f32), except the first `min_keep` tokens
/// by descending score.
pub fn min_p(scores: &mut [f32], min_p: f64, min_keep: usize) {
    let probs = softmax(scores);
    let top = super::math::max(&probs);
    let cut = min_p as f32 * top;
    let keep: Vec<usize> = argsort_desc(scores).into_iter().take(min_keep).collect();
    for (i, s) in scores.iter_mut().enumerate() {
        if probs[i] < cut && !keep.contains(&i) {
            *s = NEG;
        }
    }
}

/// `TypicalLogitsWarper`: with `logp = log_softmax(scores)`, `H = -nansum(logp * exp(logp))` and
/// `shift = |-logp - H|`, sort by shift ascending; `last = min(count(cumsum(softmax(scores in that order)) <
/// mass), V - 1)`; remove tokens with `shift > sorted_shift[last]`, except the first `min_keep` in shift order.
pub fn typical(scores: &mut [f32], mass: f64, min_keep: usize) {
    let logp = log_softmax(scores);
    // nansum: -inf * 0 gives NaN and is skipped.
    let ent = -(logp.iter().map(|&l| (l * l.exp()) as f64).filter(|v| !v.is_nan()).sum::<f64>() as f32);
    let shift: Vec<f32> = logp.iter().map(|&l| ((-l) - ent).abs()).collect();
    let order = argsort_asc(&shift);
    let sorted_logits: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let cum = cumsum(&softmax(&sorted_logits));
    let mass = mass as f32;
    let last = cum.iter().filter(|&&c| c < mass).count().min(scores.len() - 1);
    let limit = shift[order[last]];
    for (rank, &i) in order.iter().enumerate() {
        if rank >= min_keep && shift[i] > limit {
            scores[i] = NEG;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_boundary_ties() {
        let mut s = vec![3.0, 1.0, 2.0, 2.0, 0.0];
        top_k(&mut s, 2);
        assert_eq!(s, vec![3.0, NEG, 2.0, 2.0, NEG]);
        let mut s = vec![1.0, NEG, NEG];
        top_k(&mut s, 2);
        assert_eq!(s, vec![1.0, NEG, NEG]);
    }

    #[test]
    fn top_p_keeps_the_crossing_token() {
        // probs 0.5, 0.3, 0.2: p = 0.6 keeps {0.5, 0.3} (mass above 0.3 is 0.5 < 0.6).
        let mut s: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        top_p(&mut s, 0.6, 1);
        assert!(s[0].is_finite() && s[1].is_finite() && s[2] == NEG);
        // p tiny still keeps min_keep tokens.
        let mut s: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        top_p(&mut s, 0.01, 2);
        assert!(s[0].is_finite() && s[1].is_finite() && s[2] == NEG);
    }

    #[test]
    fn min_p_relative_cut() {
        let mut s: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        min_p(&mut s, 0.2, 1); // cut 0.12: removes 0.1
        assert!(s[1].is_finite() && s[2] == NEG);
        let mut s: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        min_p(&mut s, 1.0, 2);
        assert!(s[0].is_finite() && s[1].is_finite() && s[2] == NEG);
    }
}
