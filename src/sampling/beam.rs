//! Beam search and beam sample of one prompt, as 4.45.1's `_beam_search` with `BeamSearchScorer`
//! (hf-generation.md §4). The caller owns the model: each step it passes the last-position logits of the live
//! beams, then reorders its KV cache with `reorder` and feeds `tokens`.

use anyhow::{bail, ensure, Result};

use super::config::GenerationConfig;
use super::draw::without_replacement;
use super::hypotheses::{Hypotheses, Hypothesis};
use super::math::{cmp_desc, log_softmax, max, softmax, top_k_desc};
use super::processors::Processors;
use super::rng::SamplingRng;

/// What one step decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepResult {
    /// New beam i continues the row `reorder[i]` of the logits just passed.
    pub reorder: Vec<usize>,
    /// The token appended to each new beam (never an EOS id: EOS candidates become hypotheses).
    pub tokens: Vec<u32>,
    /// No further step: every hypothesis slot is settled or the length limit is reached. Call `finalize`.
    pub done: bool,
}

/// The state of a beam search over one prompt.
#[derive(Clone, Debug)]
pub struct BeamSearch {
    processors: Processors,
    prompt: Vec<u32>,
    eos: Vec<u32>,
    k: usize,
    n_candidates: usize,
    num_return: usize,
    do_sample: bool,
    max_new: usize,
    /// Generated tokens of each live beam, in the caller's row order.
    beams: Vec<Vec<u32>>,
    /// Running (f32) beam scores: sums of the processed log-probs.
    scores: Vec<f32>,
    hyps: Hypotheses,
    /// The scorer's `_done`: enough hypotheses that no open beam can win.
    done: bool,
    steps: usize,
    rng: SamplingRng,
    seed: u64,
}

impl BeamSearch {
    /// `prompt`: the HF `input_ids` of the prompt (one `<image>` id per image); the processors see it as the
    /// start of every beam's history. Needs `num_beams > 1`; `do_sample` selects beam sample.
    pub fn new(cfg: &GenerationConfig, prompt: &[u32]) -> Result<Self> {
        ensure!(cfg.num_beams > 1, "BeamSearch needs num_beams > 1 (got {}); use Sampler", cfg.num_beams);
        let k = cfg.num_beams;
        let max_new = cfg.max_new(prompt.len())?;
        let seed = cfg.seed.unwrap_or_else(SamplingRng::clock_seed);
        // HF starts with K copies of the prompt; only the first counts (the others start at -1e9).
        let mut scores = vec![-1e9f32; k];
        scores[0] = 0.0;
        Ok(BeamSearch {
            processors: Processors::new(cfg, prompt.len())?,
            prompt: prompt.to_vec(),
            eos: cfg.eos_token_ids.clone(),
            k,
            n_candidates: cfg.beam_candidates(),
            num_return: cfg.num_return_sequences,
            do_sample: cfg.do_sample,
            max_new,
            beams: vec![Vec::new(); k],
            scores,
            hyps: Hypotheses::new(k, cfg.length_penalty, cfg.early_stopping, max_new),
            done: false,
            steps: 0,
            rng: SamplingRng::new(seed),
            seed,
        })
    }

    pub fn num_beams(&self) -> usize {
        self.k
    }

    /// The seed of the beam-sample draws (the configured one, or the clock's).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Steps taken so far (= tokens in each live beam).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The generated tokens of each live beam, in row order.
    pub fn beams(&self) -> &[Vec<u32>] {
        &self.beams
    }

    /// True once a step returned `done`.
    pub fn is_finished(&self) -> bool {
        self.done || self.steps >= self.max_new
    }

    /// The longest prefix shared by every live beam and every kept hypothesis. New hypotheses only descend from
    /// live beams and `finalize` picks among the two, so whatever it returns starts with this prefix: it is final
    /// and can be streamed while the search goes on.
    pub fn settled_prefix(&self) -> &[u32] {
        let mut all = self.beams.iter().map(Vec::as_slice).chain(self.hyps.beams.iter().map(|h| h.tokens.as_slice()));
        let first = all.next().unwrap_or(&[]);
        let n = all.fold(first.len(), |n, s| n.min(first.iter().zip(s).take_while(|(a, b)| a == b).count()));
        &first[..n]
    }

    fn history(&self, beam: usize) -> Vec<u32> {
        let mut h = self.prompt.clone();
        h.extend_from_slice(&self.beams[beam]);
        h
    }

    /// The processed scores of each row passed (`log_softmax`, then the processor list with the beam's own
    /// history), as HF's `output_scores` reports them: before the running beam scores are added.
    pub fn process_scores<R: AsRef<[f32]>>(&self, logits: &[R]) -> Result<Vec<Vec<f32>>> {
        let first = logits.first().map(|r| r.as_ref().len()).unwrap_or(0);
        ensure!(first > 0, "no logits");
        let rows_ok = logits.len() == self.k || (self.steps == 0 && logits.len() == 1);
        ensure!(rows_ok, "expected {} logit rows at step {}, got {}", self.k, self.steps, logits.len());
        logits
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let row = row.as_ref();
                ensure!(row.len() == first, "logit rows differ in length");
                let mut s = log_softmax(row);
                self.processors.apply(&mut s, &self.history(b))?;
                Ok(s)
            })
            .collect()
    }

    /// One step: `logits` holds the last-position logits of each live beam, in the order of the current beams
    /// (at the first step a single row may be passed for the prompt; HF's K copies are identical).
    pub fn step<R: AsRef<[f32]>>(&mut self, logits: &[R]) -> Result<StepResult> {
        self.advance(logits, None)
    }

    /// Replay hook (tests): a beam-sample step that uses the given candidate draws (flat indices `beam * V +
    /// token`, in draw order, as torch's `multinomial` returned them) instead of drawing.
    pub fn step_with_draws<R: AsRef<[f32]>>(&mut self, logits: &[R], draws: &[usize]) -> Result<StepResult> {
        ensure!(self.do_sample, "draws can only be forced in beam sample");
        self.advance(logits, Some(draws))
    }

    fn advance<R: AsRef<[f32]>>(&mut self, logits: &[R], forced: Option<&[usize]>) -> Result<StepResult> {
        ensure!(!self.is_finished(), "beam search is finished; call finalize");
        let single = logits.len() == 1;
        let mut processed = self.process_scores(logits)?;
        if single {
            processed = vec![processed.remove(0); self.k];
        }
        let vocab = processed[0].len();
        // Cumulative candidate scores over K*V, f32 as HF: processed + running beam score.
        let mut flat = Vec::with_capacity(self.k * vocab);
        for (row, &bs) in processed.iter().zip(&self.scores) {
            flat.extend(row.iter().map(|&s| s + bs));
        }
        let n = self.n_candidates;
        ensure!(n <= flat.len(), "{n} beam candidates but only {} scores", flat.len());
        let picked = if self.do_sample {
            let draws = match forced {
                Some(d) => {
                    ensure!(d.len() == n && d.iter().all(|&i| i < flat.len()), "forced draws: {n} indices < K*V");
                    d.to_vec()
                }
                None => without_replacement(&softmax(&flat), n, &flat, &mut self.rng)?,
            };
            // HF re-sorts the draws by score (descending; ties keep draw order).
            let mut d = draws;
            d.sort_by(|&i, &j| cmp_desc(flat[i], flat[j]));
            d
        } else {
            top_k_desc(&flat, n)
        };
        self.process(&flat, &picked, vocab, single)
    }

    /// `BeamSearchScorer.process` for the one prompt, then the beam update of `_beam_search`.
    fn process(&mut self, flat: &[f32], picked: &[usize], vocab: usize, single: bool) -> Result<StepResult> {
        let generated_len = self.steps + 1; // cur_len - P: counts the candidate token
        let mut reorder = Vec::with_capacity(self.k);
        let mut tokens = Vec::with_capacity(self.k);
        let mut next_scores = Vec::with_capacity(self.k);
        for (rank, &idx) in picked.iter().enumerate() {
            let (beam, tok) = (idx / vocab, (idx % vocab) as u32);
            if self.eos.contains(&tok) {
                // An EOS ranked outside the top K is dropped.
                if rank >= self.k {
                    continue;
                }
                self.hyps.add(self.beams[beam].clone(), Some(tok), flat[idx], generated_len);
            } else {
                reorder.push(beam);
                tokens.push(tok);
                next_scores.push(flat[idx]);
            }
            if reorder.len() == self.k {
                break;
            }
        }
        if reorder.len() < self.k {
            bail!("only {} non-EOS beam candidates for {} beams", reorder.len(), self.k);
        }
        let best = max(&picked.iter().map(|&i| flat[i]).collect::<Vec<_>>());
        self.done = self.done || self.hyps.is_done(best, generated_len);

        self.beams = reorder.iter().zip(&tokens).map(|(&b, &t)| [self.beams[b].as_slice(), &[t]].concat()).collect();
        self.scores = next_scores;
        self.steps += 1;
        if single {
            // Every HF copy of the prompt is row 0 of what the caller passed.
            reorder.iter_mut().for_each(|r| *r = 0);
        }
        Ok(StepResult { reorder, tokens, done: self.is_finished() })
    }

    /// `BeamSearchScorer.finalize`: unless the search stopped on its own test, the open beams join the
    /// hypotheses; returns the `num_return_sequences` best, best first.
    pub fn finalize(mut self) -> Vec<Hypothesis> {
        if !self.done {
            for (tokens, &score) in self.beams.iter().zip(&self.scores) {
                self.hyps.add(tokens.clone(), None, score, tokens.len());
            }
        }
        self.hyps.best(self.num_return)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_new: usize) -> GenerationConfig {
        GenerationConfig {
            num_beams: 2,
            num_return_sequences: 2,
            max_new_tokens: Some(max_new),
            eos_token_ids: vec![3],
            ..Default::default()
        }
    }

    /// EOS ranked first becomes a hypothesis; ties among candidates go to the lower flat index; the default
    /// early-stopping test ends the search once K hypotheses exist and the best candidate cannot beat them.
    #[test]
    fn eos_hypotheses_ties_and_early_stop() {
        let mut b = BeamSearch::new(&cfg(3), &[9, 9]).unwrap();
        let z0 = [0.0f32, 1.0, 2.0, 5.0];
        let l0 = log_softmax(&z0);
        let out = b.step(&[z0]).unwrap();
        // Candidates: EOS (rank 0 -> hypothesis of length 1), then tokens 2 and 1.
        assert_eq!(out, StepResult { reorder: vec![0, 0], tokens: vec![2, 1], done: false });
        assert_eq!(b.hyps.beams.len(), 1);
        assert_eq!(b.hyps.beams[0].score, l0[3] as f64);

        let rows = [[0.0f32, 0.0, 0.0, 4.0], [3.0, 0.0, 0.0, 0.0]];
        let r0 = log_softmax(&rows[0]);
        let out = b.step(&rows).unwrap();
        // Ranks: beam0+EOS (hypothesis, length 2), beam1+0, then beam0's tied tokens 0,1,2: token 0 wins.
        assert_eq!(out.reorder, vec![1, 0]);
        assert_eq!(out.tokens, vec![0, 0]);
        // Two hypotheses; worst (l0[2] + r0[3]) / 2 equals the best candidate's bound: done (>=).
        assert!(out.done);
        let hyps = b.finalize();
        assert_eq!(hyps.len(), 2);
        assert_eq!(hyps[0], Hypothesis { tokens: vec![], eos: Some(3), score: l0[3] as f64 });
        assert_eq!(hyps[1], Hypothesis { tokens: vec![2], eos: Some(3), score: (l0[2] + r0[3]) as f64 / 2.0 });
    }

    /// An EOS candidate ranked at K or below is dropped (not a hypothesis), the search goes on.
    #[test]
    fn eos_outside_top_k_is_dropped() {
        let mut b = BeamSearch::new(&cfg(4), &[9]).unwrap();
        let out = b.step(&[[0.0f32, 3.0, -1.0, 2.9]]).unwrap();
        assert_eq!((out.reorder, out.tokens), (vec![0, 0], vec![1, 0]));
        assert_eq!(b.hyps.beams.len(), 1);
        let rows = [[0.0f32, -20.0, -20.0, 0.5], [-20.0, -20.0, -20.0, 0.0]];
        let out = b.step(&rows).unwrap();
        // beam0+EOS (rank 0: hypothesis), beam0+0, beam1+EOS (rank 2 >= K: dropped), beam0+1.
        assert_eq!((out.reorder, out.tokens), (vec![0, 0], vec![0, 1]));
        assert_eq!(b.hyps.beams.len(), 2);
        assert_eq!(b.hyps.beams[1].tokens, vec![1]);
    }

    /// At the first step one row stands for HF's K identical copies: same result as passing all K.
    #[test]
    fn first_step_single_row_equals_k_copies() {
        let z = [0.5f32, -1.0, 2.0, 0.1, 1.5];
        let mut a = BeamSearch::new(&cfg(2), &[1, 2]).unwrap();
        let mut k = BeamSearch::new(&cfg(2), &[1, 2]).unwrap();
        let ra = a.step(&[z]).unwrap();
        let rk = k.step(&[z, z]).unwrap();
        assert_eq!(ra.tokens, rk.tokens);
        assert_eq!(ra.reorder, vec![0, 0]);
        assert_eq!(a.scores, k.scores);
    }

    /// The settled prefix only grows, and every returned hypothesis starts with the last one seen.
    #[test]
    fn settled_prefix_is_final() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut streamed = 0;
        for trial in 0..50 {
            let mut c = cfg(12);
            c.num_beams = 3;
            c.num_return_sequences = 3;
            c.do_sample = trial % 2 == 1;
            c.seed = Some(trial);
            let mut b = BeamSearch::new(&c, &[9]).unwrap();
            let mut rows: Vec<Vec<f32>> = vec![(0..6).map(|_| rng.random_range(-3.0..3.0)).collect()];
            let mut prefix: Vec<u32> = Vec::new();
            while !b.is_finished() {
                let out = b.step(&rows).unwrap();
                let p = b.settled_prefix().to_vec();
                assert!(p.starts_with(&prefix), "prefix shrank: {prefix:?} -> {p:?}");
                prefix = p;
                if out.done {
                    break;
                }
                // Peaked rows make the beams agree on long stretches.
                rows = (0..3)
                    .map(|_| (0..6).map(|i| if i == 1 { 4.0 } else { rng.random_range(-3.0..3.0) }).collect())
                    .collect();
            }
            for h in b.finalize() {
                assert!(h.tokens.starts_with(&prefix), "{:?} does not start with {prefix:?}", h.tokens);
            }
            streamed += prefix.len();
        }
        assert!(streamed > 0, "no trial settled any token: the test checks nothing");
    }

    /// Without EOS and at max length the open beams are returned, best first, length-normalized.
    #[test]
    fn open_beams_at_max_length() {
        let mut c = cfg(1);
        c.eos_token_ids.clear();
        c.length_penalty = 2.0;
        let mut b = BeamSearch::new(&c, &[1]).unwrap();
        let z = [0.0f32, 1.0, 2.0];
        let l = log_softmax(&z);
        assert!(b.step(&[z]).unwrap().done);
        assert!(b.step(&[z]).is_err());
        let hyps = b.finalize();
        assert_eq!(hyps[0], Hypothesis { tokens: vec![2], eos: None, score: l[2] as f64 });
        assert_eq!(hyps[1].tokens, vec![1]);
    }
}
