//! Exact draws from the f32 probabilities HF computes (`softmax(scores)`); entries with p = 0 are never drawn.
//! Bit-equality with torch's RNG stream is not a goal (hf-generation.md §6); the distributions are the same.

use anyhow::{bail, Result};

use super::math::cmp_desc;
use super::rng::SamplingRng;

/// Rejects what `torch.multinomial` rejects: NaN, infinite or negative entries, or no positive entry.
fn check(probs: &[f32]) -> Result<f64> {
    if probs.iter().any(|p| !p.is_finite() || *p < 0.0) {
        bail!("probabilities contain inf, nan or a negative value (is every token masked?)");
    }
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    if total <= 0.0 {
        bail!("every probability is zero");
    }
    Ok(total)
}

/// One draw with probability `p_i / Σp` (`torch.multinomial(p, 1)`): inverse CDF on an f64 running sum. The
/// first index whose running sum exceeds `u·Σp` is taken; a zero entry never raises the sum, so it is never the
/// first to exceed it.
pub fn categorical(probs: &[f32], rng: &mut SamplingRng) -> Result<usize> {
    let total = check(probs)?;
    let target = rng.uniform() * total;
    let mut acc = 0f64;
    for (i, &p) in probs.iter().enumerate() {
        acc += p as f64;
        if acc > target {
            return Ok(i);
        }
    }
    // Only reachable through rounding when u·Σp lands on Σp: the last positive entry.
    Ok(probs.iter().rposition(|&p| p > 0.0).unwrap())
}

/// `n` draws without replacement, each proportional to p among the remaining entries (Plackett–Luce), in draw
/// order, as torch's `multinomial(p, n, replacement=False)`, which takes the top n of `p / q`, `q ~ Exp(1)`
/// (the exponential race; ties by lower index first).
///
/// When fewer than `n` entries are positive, torch fills the rest with arbitrary zero-probability indices. Here
/// the fill is deterministic: the zero entries by descending `fill_order` score, ties by lower index (the beam
/// caller passes the candidate scores, so the least bad ones come first).
pub fn without_replacement(probs: &[f32], n: usize, fill_order: &[f32], rng: &mut SamplingRng) -> Result<Vec<usize>> {
    check(probs)?;
    if n > probs.len() {
        bail!("cannot draw {n} of {} entries without replacement", probs.len());
    }
    // Keys p / q for the positive entries only, so no draw consumes randomness for p = 0.
    let mut keyed: Vec<(f64, usize)> =
        probs.iter().enumerate().filter(|(_, &p)| p > 0.0).map(|(i, &p)| (p as f64 / rng.exp1(), i)).collect();
    let by_key = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if keyed.len() > n {
        keyed.select_nth_unstable_by(n - 1, by_key);
        keyed.truncate(n);
    }
    keyed.sort_by(by_key);
    let mut out: Vec<usize> = keyed.into_iter().map(|(_, i)| i).collect();
    if out.len() < n {
        let mut zeros: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] == 0.0).collect();
        zeros.sort_by(|&i, &j| cmp_desc(fill_order[i], fill_order[j]).then(i.cmp(&j)));
        out.extend(zeros.into_iter().take(n - out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_never_drawn_and_fill() {
        let mut rng = SamplingRng::new(7);
        let p = [0.0, 0.5, 0.0, 0.5];
        for _ in 0..1000 {
            let i = categorical(&p, &mut rng).unwrap();
            assert!(i == 1 || i == 3);
        }
        let d = without_replacement(&p, 3, &[-1.0, 0.0, -2.0, 0.0], &mut rng).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[2], 0);
        assert!(categorical(&[0.0, 0.0], &mut rng).is_err());
        assert!(categorical(&[f32::NAN, 1.0], &mut rng).is_err());
    }
}
