//! Replay of HF transformers 4.45.1 generation traces (tests/fixtures/golden/base-default-f32/traces, made by
//! tests/reference/make_fixtures.py; hf-generation.md §6 layer 1): HF's recorded raw last-position logits are fed
//! to the Rust decoding logic as if a model had produced them. Checked per step: the processed scores against
//! HF's (`-inf` masks identical, finite values within f32 tolerance), the histories the processors see, and for
//! the deterministic modes the chosen tokens, beam reorders, final sequences and sequence scores. Sampling cases
//! force HF's recorded draws (torch's RNG stream is not reproduced) and check each lies in the allowed set.

mod common;

use asagi_gguf::sampling::{BeamSearch, GenerationConfig, Hypothesis, Sampler};
use common::npy::{self, Npy};
use serde_json::Value;

const VARIANT: &str = "base-default-f32";

/// f32 tolerance on a processed score: 1e-5 relative, 1e-5 absolute below 1.
fn tol(x: f64) -> f64 {
    1e-5 * x.abs().max(1.0)
}

struct Trace {
    name: String,
    meta: Value,
    raw: Npy,
    scores: Npy,
    prompt: Vec<u32>,
    eos: Vec<u32>,
    pad: u32,
}

impl Trace {
    fn load(name: &str) -> Trace {
        let goldens = common::fixtures::goldens(VARIANT);
        let meta = goldens["traces"][name].clone();
        assert!(meta.is_object(), "no trace {name} in goldens.json");
        let dir = common::fixtures::root().join("golden").join(VARIANT).join("traces").join(name);
        let raw = npy::read(&dir.join("raw_logits.npy"));
        let scores = npy::read(&dir.join("scores.npy"));
        assert_eq!(raw.shape, scores.shape, "{name}: raw_logits and scores shapes");
        assert_eq!(raw.shape[0] as u64, meta["steps"].as_u64().unwrap(), "{name}: steps");
        let gen: Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixtures::model_dir(VARIANT).join("generation_config.json")).unwrap(),
        )
        .unwrap();
        let eos = match &gen["eos_token_id"] {
            Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            v => vec![v.as_u64().unwrap() as u32],
        };
        let pad = gen["pad_token_id"].as_u64().unwrap() as u32;
        let prompt = u32s(&meta["prompt_ids"]);
        assert_eq!(prompt.len() as u64, meta["prompt_length"].as_u64().unwrap());
        Trace { name: name.to_string(), meta, raw, scores, prompt, eos, pad }
    }

    fn steps(&self) -> usize {
        self.raw.shape[0]
    }
    fn rows(&self) -> usize {
        self.raw.shape[1]
    }
    fn vocab(&self) -> usize {
        self.raw.shape[2]
    }
    fn at(&self, a: &Npy, step: usize, row: usize) -> Vec<f32> {
        let (r, v) = (self.rows(), self.vocab());
        a.data[(step * r + row) * v..(step * r + row + 1) * v].iter().map(|&x| x as f32).collect()
    }
    fn raw_rows(&self, step: usize) -> Vec<Vec<f32>> {
        (0..self.rows()).map(|r| self.at(&self.raw, step, r)).collect()
    }
    /// HF's history of `row` at `step` (step_input_ids), prompt included.
    fn history(&self, step: usize, row: usize) -> Vec<u32> {
        u32s(&self.meta["step_input_ids"][step][row])
    }

    /// The generation config of the trace: the model's generation_config.json, then the generate() kwargs.
    fn config(&self) -> GenerationConfig {
        let mut c =
            GenerationConfig { eos_token_ids: self.eos.clone(), pad_token_id: Some(self.pad), ..Default::default() };
        c.seed = self.meta["seed"].as_u64();
        for (k, v) in self.meta["params"].as_object().unwrap() {
            match k.as_str() {
                "do_sample" => c.do_sample = v.as_bool().unwrap(),
                "max_new_tokens" => c.max_new_tokens = Some(v.as_u64().unwrap() as usize),
                "num_beams" => c.num_beams = v.as_u64().unwrap() as usize,
                "num_return_sequences" => c.num_return_sequences = v.as_u64().unwrap() as usize,
                "repetition_penalty" => c.repetition_penalty = v.as_f64().unwrap(),
                "length_penalty" => c.length_penalty = v.as_f64().unwrap(),
                "temperature" => c.temperature = v.as_f64().unwrap(),
                "top_p" => c.top_p = v.as_f64().unwrap(),
                "top_k" => c.top_k = Some(v.as_u64().unwrap() as usize),
                "min_p" => c.min_p = Some(v.as_f64().unwrap()),
                "typical_p" => c.typical_p = v.as_f64().unwrap(),
                "no_repeat_ngram_size" => c.no_repeat_ngram_size = v.as_u64().unwrap() as usize,
                "min_new_tokens" => c.min_new_tokens = v.as_u64().unwrap() as usize,
                other => panic!("{}: generate() parameter {other} not mapped", self.name),
            }
        }
        c
    }

    /// Compares one processed row with HF's; returns the largest finite |diff|.
    fn check_scores(&self, step: usize, row: usize, got: &[f32]) -> f64 {
        let want = self.at(&self.scores, step, row);
        assert_eq!(got.len(), want.len());
        let mut worst = 0f64;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let ctx = || format!("{} step {step} row {row} token {i}: rust {g}, HF {w}", self.name);
            assert!(!w.is_nan() && !g.is_nan(), "{}", ctx());
            if w.is_infinite() || g.is_infinite() {
                assert_eq!(g, w, "{}", ctx());
                continue;
            }
            let d = (g as f64 - w as f64).abs();
            assert!(d <= tol(w as f64), "{} (|diff| {d:e})", ctx());
            worst = worst.max(d);
        }
        worst
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    common::fixtures::ids(v).into_iter().map(|x| u32::try_from(x).unwrap()).collect()
}

/// The `num_beams == 1` cases: processed scores every step; greedy must pick HF's tokens, sampling cases
/// replay HF's draws, each of which must be allowed (finite) in both the Rust and the HF scores.
fn replay_single_row(name: &str) {
    let t = Trace::load(name);
    let cfg = t.config();
    assert_eq!(t.rows(), 1, "{name}: one row");
    let mut sampler = Sampler::new(&cfg, t.prompt.len()).unwrap();
    let sequence = u32s(&t.meta["sequences"][0]);
    let draws = &t.meta["multinomial_draws"];
    assert_eq!(cfg.do_sample, draws.is_array(), "{name}: draws recorded iff sampling");
    let mut history = t.prompt.clone();
    let mut worst = 0f64;
    for step in 0..t.steps() {
        assert_eq!(history, t.history(step, 0), "{name} step {step}: history");
        let scores = sampler.process(&t.at(&t.raw, step, 0), &history).unwrap();
        worst = worst.max(t.check_scores(step, 0, &scores));
        let token = if cfg.do_sample {
            let d = draws[step][0][0].as_u64().unwrap() as u32;
            let allowed = scores[d as usize].is_finite() && t.at(&t.scores, step, 0)[d as usize].is_finite();
            assert!(allowed, "{name} step {step}: HF drew {d}, which is masked");
            // The Rust sampler's own draws from the same scores stay in the allowed set too.
            for _ in 0..64 {
                let own = sampler.pick(&scores).unwrap();
                assert!(scores[own as usize].is_finite(), "{name} step {step}: drew masked {own}");
            }
            d
        } else {
            sampler.pick(&scores).unwrap()
        };
        assert_eq!(token, sequence[t.prompt.len() + step], "{name} step {step}: token");
        history.push(token);
        if cfg.is_eos(token) {
            assert_eq!(step + 1, t.steps(), "{name}: EOS before the last recorded step");
        }
    }
    assert_eq!(history, sequence, "{name}: final sequence");
    println!("{name}: {} steps, max |score diff| {worst:e}", t.steps());
}

/// HF's output row for a hypothesis (beam_search.py finalize): prompt + tokens, the first EOS id after a finished
/// hypothesis when it fits in `width`, then pad.
fn hf_row(t: &Trace, h: &Hypothesis, width: usize) -> Vec<u32> {
    let mut row = t.prompt.clone();
    row.extend(&h.tokens);
    if h.eos.is_some() && row.len() < width {
        row.push(t.eos[0]);
    }
    row.resize(width, t.pad);
    row
}

/// The beam cases: per step the processed rows, the beams' histories, then (after the step) that every next
/// history is `old[reorder[i]] + tokens[i]` as HF recorded; at the end the R sequences and their scores.
fn replay_beams(name: &str) {
    let t = Trace::load(name);
    let cfg = t.config();
    let k = cfg.num_beams;
    assert_eq!(t.rows(), k, "{name}: K rows per step");
    let mut beam = BeamSearch::new(&cfg, &t.prompt).unwrap();
    let draws = &t.meta["multinomial_draws"];
    let p = t.prompt.len();
    let mut chains: Vec<Vec<i64>> = vec![Vec::new(); k]; // HF beam_indices of each live beam
    let mut worst = 0f64;
    let mut finished_at = None;
    for step in 0..t.steps() {
        for r in 0..k {
            assert_eq!(&t.history(step, r)[p..], beam.beams()[r].as_slice(), "{name} step {step} beam {r}: history");
        }
        let rows = t.raw_rows(step);
        let processed = beam.process_scores(&rows).unwrap();
        for (r, row) in processed.iter().enumerate() {
            worst = worst.max(t.check_scores(step, r, row));
        }
        let out = if cfg.do_sample {
            let d: Vec<usize> = common::fixtures::ids(&draws[step][0]).into_iter().map(|x| x as usize).collect();
            assert_eq!(d.len(), cfg.beam_candidates(), "{name} step {step}: draws");
            let v = t.vocab();
            for &i in &d {
                let (b, tok) = (i / v, i % v);
                // Allowed: not masked, and not one of the -1e9 copies of the prompt at the first step.
                assert!(
                    processed[b][tok].is_finite() && (step > 0 || b == 0),
                    "{name} step {step}: draw {i} not allowed"
                );
            }
            beam.step_with_draws(&rows, &d).unwrap()
        } else {
            beam.step(&rows).unwrap()
        };
        assert_eq!(out.reorder.len(), k);
        chains = out.reorder.iter().map(|&r| [chains[r].as_slice(), &[r as i64]].concat()).collect();
        if step + 1 < t.steps() {
            for i in 0..k {
                let mut want = t.history(step, out.reorder[i]);
                want.push(out.tokens[i]);
                assert_eq!(want, t.history(step + 1, i), "{name} step {step}: new beam {i} (reorder/token)");
            }
            assert!(!out.done, "{name}: done at step {step}, HF went on");
        } else {
            assert!(out.done, "{name}: not done after the last recorded step");
        }
        if out.done {
            finished_at = Some(step);
        }
    }
    assert_eq!(finished_at, Some(t.steps() - 1));
    let live = chains.clone();
    let live_beams = beam.beams().to_vec();
    let hyps = beam.finalize();
    let sequences: Vec<Vec<u32>> = t.meta["sequences"].as_array().unwrap().iter().map(u32s).collect();
    let scores: Vec<f64> = t.meta["sequences_scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(hyps.len(), cfg.num_return_sequences);
    assert_eq!(sequences.len(), hyps.len());
    let max_length = p + cfg.max_new_tokens.unwrap();
    let width = (hyps.iter().map(|h| p + h.tokens.len()).max().unwrap() + 1).min(max_length);
    for (i, h) in hyps.iter().enumerate() {
        assert_eq!(hf_row(&t, h, width), sequences[i], "{name}: sequence {i}");
        // HF reports the f64 score as f32.
        let (got, want) = ((h.score as f32) as f64, scores[i]);
        assert!((got - want).abs() <= tol(want), "{name}: sequence score {i}: rust {got}, HF {want}");
        println!("{name}: sequence {i} score rust {got} HF {want} (|diff| {:e})", (got - want).abs());
        if h.eos.is_none() {
            // An open beam: its HF beam_indices are the reorder chain of the live beam it came from.
            let j = live_beams.iter().position(|b| *b == h.tokens).unwrap();
            let want_chain: Vec<i64> =
                common::fixtures::ids(&t.meta["beam_indices"][i]).into_iter().filter(|&x| x >= 0).collect();
            assert_eq!(live[j], want_chain, "{name}: beam_indices {i}");
        }
    }
    println!("{name}: {} steps, max |score diff| {worst:e}", t.steps());
}

#[test]
fn greedy_img1() {
    replay_single_row("greedy_img1");
}

#[test]
fn sample_t07_topp09_rep15() {
    replay_single_row("sample_t0.7_topp0.9_rep1.5");
}

#[test]
fn sample_t13_topk0_minp005_ngram2() {
    replay_single_row("sample_t1.3_topk0_minp0.05_ngram2");
}

#[test]
fn beam3_img2_rep15_lp10() {
    replay_beams("beam3_img2_rep1.5_lp1.0");
}

#[test]
fn beamsample5_img1_t07_rep15() {
    replay_beams("beamsample5_img1_t0.7_rep1.5");
}

/// Every trace in goldens.json is replayed by one of the tests above (a new case must be added here).
#[test]
fn every_trace_is_covered() {
    let goldens = common::fixtures::goldens(VARIANT);
    let mut names: Vec<&String> = goldens["traces"].as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "beam3_img2_rep1.5_lp1.0",
            "beamsample5_img1_t0.7_rep1.5",
            "greedy_img1",
            "sample_t0.7_topp0.9_rep1.5",
            "sample_t1.3_topk0_minp0.05_ngram2"
        ]
    );
}
