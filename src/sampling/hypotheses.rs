//! HF `BeamHypotheses` (beam_search.py, hf-generation.md §4.3): the K best finished hypotheses of one prompt,
//! length-normalized in f64 from the f32 running scores, and the early-stopping test.

use std::cmp::Ordering;

use super::config::EarlyStopping;

/// A finished (or, at the end, still open) beam.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// The generated tokens, without the prompt and without the EOS that ended it.
    pub tokens: Vec<u32>,
    /// The EOS id that ended it; `None` for a beam still open when generation stopped. (HF's `sequences` write
    /// the *first* EOS id after a finished hypothesis, whichever EOS ended it.)
    pub eos: Option<u32>,
    /// HF's sequence score: `sum_logprobs / generated_len ** length_penalty` in f64, where `generated_len`
    /// counts the EOS (HF reports it as f32 in `sequences_scores`).
    pub score: f64,
}

/// Ascending order on f64 scores with NaN lowest, so that sorting never sees an inconsistent order.
pub(crate) fn cmp_score(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => a.partial_cmp(&b).unwrap(),
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Hypotheses {
    capacity: usize,
    length_penalty: f64,
    early_stopping: EarlyStopping,
    /// `max_length - P`, the denominator of `"never"` with a positive length penalty.
    max_new: usize,
    pub(crate) beams: Vec<Hypothesis>,
    worst: f64,
}

impl Hypotheses {
    pub(crate) fn new(capacity: usize, length_penalty: f64, early_stopping: EarlyStopping, max_new: usize) -> Self {
        Hypotheses { capacity, length_penalty, early_stopping, max_new, beams: Vec::new(), worst: 1e9 }
    }

    /// `generated_len ** length_penalty` as Python computes it (C `pow` on f64).
    fn norm(&self, generated_len: usize) -> f64 {
        (generated_len as f64).powf(self.length_penalty)
    }

    /// `BeamHypotheses.add`: appended if there is room or it beats the worst; over capacity, the lowest score
    /// goes (ties: the earlier entry) and the worst becomes the next lowest.
    pub(crate) fn add(&mut self, tokens: Vec<u32>, eos: Option<u32>, sum_logprobs: f32, generated_len: usize) {
        let score = sum_logprobs as f64 / self.norm(generated_len);
        if self.beams.len() < self.capacity || score > self.worst {
            self.beams.push(Hypothesis { tokens, eos, score });
            if self.beams.len() > self.capacity {
                // Python: sorted([(s, idx) ...]), i.e. by score then index.
                let mut order: Vec<usize> = (0..self.beams.len()).collect();
                order.sort_by(|&i, &j| cmp_score(self.beams[i].score, self.beams[j].score).then(i.cmp(&j)));
                self.worst = self.beams[order[1]].score;
                self.beams.remove(order[0]);
            } else {
                self.worst = if score < self.worst { score } else { self.worst };
            }
        }
    }

    /// `BeamHypotheses.is_done(best_sum_logprobs, cur_len, P)`, with `generated_len = cur_len - P` (the length
    /// the candidate scores were computed at).
    pub(crate) fn is_done(&self, best_sum_logprobs: f32, generated_len: usize) -> bool {
        if self.beams.len() < self.capacity {
            return false;
        }
        let len = match self.early_stopping {
            EarlyStopping::True => return true,
            EarlyStopping::Never if self.length_penalty > 0.0 => self.max_new,
            EarlyStopping::False | EarlyStopping::Never => generated_len,
        };
        self.worst >= best_sum_logprobs as f64 / self.norm(len)
    }

    /// The `n` best, best first: Python's stable ascending `sorted` then `pop()` n times (so among equal scores
    /// the later entry comes first).
    pub(crate) fn best(mut self, n: usize) -> Vec<Hypothesis> {
        self.beams.sort_by(|a, b| cmp_score(a.score, b.score));
        self.beams.into_iter().rev().take(n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_and_tracks_the_worst() {
        let mut h = Hypotheses::new(2, 1.0, EarlyStopping::False, 10);
        h.add(vec![1], Some(2), -4.0, 2); // -2
        h.add(vec![3], Some(2), -3.0, 3); // -1
        assert_eq!(h.worst, -2.0);
        h.add(vec![4], Some(2), -9.0, 3); // -3: not better than the worst, dropped
        assert_eq!(h.beams.len(), 2);
        h.add(vec![5], Some(2), -1.0, 2); // -0.5 replaces -2
        assert_eq!(h.worst, -1.0);
        // best step score -2 at length 3: -0.667 > worst -1, not done; -4 at length 3: done.
        assert!(!h.is_done(-2.0, 3));
        assert!(h.is_done(-4.0, 3));
        let best = h.best(2);
        assert_eq!(best[0].tokens, vec![5]);
        assert_eq!(best[1].tokens, vec![3]);
    }

    #[test]
    fn never_uses_max_length_with_positive_penalty() {
        let mut h = Hypotheses::new(1, 1.0, EarlyStopping::Never, 10);
        h.add(vec![1], Some(2), -2.0, 2); // -1
                                          // best -5 now: at length 3 -> -1.67 (False would stop), at max 10 -> -0.5: "never" goes on.
        assert!(!h.is_done(-5.0, 3));
        let mut f = Hypotheses::new(1, 1.0, EarlyStopping::False, 10);
        f.add(vec![1], Some(2), -2.0, 2);
        assert!(f.is_done(-5.0, 3));
    }
}
