//! The samplers against exact distributions (hf-generation.md §6 layers 2 and 3). For each configuration the
//! expected probabilities are computed here in f64, independently of the crate, from the HF definitions; then
//! (a) the kept support of the crate's processed scores must equal the analytic one and no draw may fall outside
//! it, (b) a chi-square goodness-of-fit test over categories with expected count >= 5 (the rest merged) must give
//! p > 1e-4, and (c) every category's z-score must stay below 5. Seeds are fixed (reproducible, not flaky) and
//! printed; set SAMPLING_STATS_SEED to try others.

mod common;

use std::collections::HashMap;

use asagi_gguf::sampling::draw::without_replacement;
use asagi_gguf::sampling::{BeamSearch, GenerationConfig, Sampler, SamplingRng};

const ALPHA: f64 = 1e-4;

fn seed(default: u64) -> u64 {
    std::env::var("SAMPLING_STATS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Regularized upper incomplete gamma Q(a, x) (series below a+1, Lentz continued fraction above).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let front = (-x + a * x.ln() - libm::lgamma(a)).exp();
    if x < a + 1.0 {
        let (mut ap, mut del, mut sum) = (a, 1.0 / a, 1.0 / a);
        for _ in 0..10_000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * front
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        front * h
    }
}

/// P(chi2_df >= stat).
fn chi2_sf(stat: f64, df: usize) -> f64 {
    gamma_q(df as f64 / 2.0, stat / 2.0)
}

#[test]
fn chi2_helper_matches_tables() {
    // Critical values at alpha 0.05 and 1e-4 from standard tables.
    for (stat, df, p) in
        [(3.841, 1, 0.05), (18.307, 10, 0.05), (15.137, 1, 1e-4), (35.564, 10, 1e-4), (124.342, 100, 0.05)]
    {
        let got = chi2_sf(stat, df);
        assert!((got - p).abs() / p < 2e-3, "chi2 sf({stat}, {df}) = {got}, want {p}");
    }
}

/// Goodness of fit of `counts` (over the same categories as `q`, which sums to 1) with the checks (a)–(c).
fn check_fit(name: &str, seed: u64, q: &[f64], counts: &[u64]) {
    let n: u64 = counts.iter().sum();
    let nf = n as f64;
    for (i, (&qi, &c)) in q.iter().zip(counts).enumerate() {
        assert!(qi > 0.0 || c == 0, "{name} (seed {seed}): {c} draws of category {i}, which has probability 0");
    }
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut tail_e, mut tail_o) = (0.0, 0.0);
    let mut worst_z = 0f64;
    let mut tv = 0.0;
    for (&qi, &c) in q.iter().zip(counts) {
        if qi == 0.0 {
            continue;
        }
        let e = qi * nf;
        tv += (c as f64 / nf - qi).abs() / 2.0;
        let z = (c as f64 - e).abs() / (nf * qi * (1.0 - qi)).sqrt().max(1e-300);
        if qi < 1.0 {
            worst_z = worst_z.max(z);
        }
        if e >= 5.0 {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        } else {
            tail_e += e;
            tail_o += c as f64;
        }
    }
    if tail_e > 0.0 {
        stat += (tail_o - tail_e).powi(2) / tail_e;
        bins += 1;
    }
    let support = q.iter().filter(|&&x| x > 0.0).count();
    let p = if bins > 1 { chi2_sf(stat, bins - 1) } else { 1.0 };
    println!("{name}: seed {seed}, N {n}, support {support}, chi2 {stat:.2} on {} df, p {p:.4}, max z {worst_z:.2}, TV {tv:.5}", bins.saturating_sub(1));
    assert!(p > ALPHA, "{name} (seed {seed}): chi-square {stat:.2} on {} df, p = {p:e} <= {ALPHA}", bins - 1);
    assert!(worst_z < 5.0, "{name} (seed {seed}): a category is {worst_z:.2} sigma off");
    assert!(tv < 3.0 * (support as f64 / nf).sqrt(), "{name} (seed {seed}): total variation {tv}");
}

/// The HF warper chain in f64 (temperature, top-k, top-p, min-p, typical; min_tokens_to_keep 1), written from
/// hf-generation.md §2.1 independently of the crate. Returns the normalized probabilities (0 = removed).
struct Chain {
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    typical: Option<f64>,
}

fn probs_of(s: &[f64]) -> Vec<f64> {
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
    let t: f64 = e.iter().sum();
    e.iter().map(|x| x / t).collect()
}

impl Chain {
    fn expected(&self, z: &[f64]) -> Vec<f64> {
        let mut s: Vec<f64> = z.iter().map(|&x| x / self.temperature).collect();
        if let Some(k) = self.top_k {
            let mut sorted = s.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let kth = sorted[k.min(s.len()) - 1];
            s.iter_mut().filter(|x| **x < kth).for_each(|x| *x = f64::NEG_INFINITY);
        }
        if let Some(p) = self.top_p {
            let q = probs_of(&s);
            // Ranked by probability, descending; among ties the higher index ranks above (HF's ascending sort
            // puts the lower index first). Kept iff the mass ranked strictly above is < p.
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&i, &j| s[j].partial_cmp(&s[i]).unwrap().then(j.cmp(&i)));
            let mut above = 0.0;
            let mut remove = Vec::new();
            for &i in &order {
                assert!((above - p).abs() > 1e-4 || q[i] == 0.0, "ill-posed top-p case: a boundary within 1e-4 of p");
                if above >= p {
                    remove.push(i);
                }
                above += q[i];
            }
            remove.into_iter().for_each(|i| s[i] = f64::NEG_INFINITY);
        }
        if let Some(m) = self.min_p {
            let q = probs_of(&s);
            let top = q.iter().cloned().fold(0.0, f64::max);
            for (i, x) in s.iter_mut().enumerate() {
                assert!(q[i] == 0.0 || (q[i] - m * top).abs() > 1e-6, "ill-posed min-p case");
                if q[i] < m * top {
                    *x = f64::NEG_INFINITY;
                }
            }
        }
        if let Some(mass) = self.typical {
            let q = probs_of(&s);
            let ent: f64 = -q.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum::<f64>();
            let shift: Vec<f64> = q.iter().map(|&x| (-x.ln() - ent).abs()).collect();
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&i, &j| shift[i].partial_cmp(&shift[j]).unwrap().then(i.cmp(&j)));
            let mut cum = 0.0;
            let mut below = 0;
            for &i in &order {
                cum += q[i];
                assert!((cum - mass).abs() > 1e-4, "ill-posed typical case");
                if cum < mass {
                    below += 1;
                }
            }
            let limit = shift[order[below.min(s.len() - 1)]];
            for (i, x) in s.iter_mut().enumerate() {
                if shift[i] > limit {
                    *x = f64::NEG_INFINITY;
                }
            }
        }
        probs_of(&s)
    }

    fn config(&self, seed: u64) -> GenerationConfig {
        GenerationConfig {
            do_sample: true,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p,
            typical_p: self.typical.unwrap_or(1.0),
            eos_token_ids: vec![2],
            seed: Some(seed),
            ..Default::default()
        }
    }
}

/// A crafted V = 32 row: ties at 2.5 and 1.6 (the top-5 boundary), one -inf entry, a smooth tail.
fn crafted() -> Vec<f32> {
    let mut z: Vec<f32> = (0..32).map(|i| 0.3 - 0.21 * (i as f32 - 8.0)).collect();
    z[..9].copy_from_slice(&[1.0, 3.0, 2.5, f32::NEG_INFINITY, 2.5, 2.0, 1.6, 1.6, 0.5]);
    z
}

/// Draws `n` tokens with the crate's Sampler from `logits` (history `history`), checks the support against
/// `expected` and the fit.
fn run_sampler(name: &str, cfg: &GenerationConfig, logits: &[f32], history: &[u32], expected: &[f64], n: usize) {
    let seed = cfg.seed.unwrap();
    let mut sampler = Sampler::new(cfg, history.len()).unwrap();
    let scores = sampler.process(logits, history).unwrap();
    let kept: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_finite()).collect();
    let want: Vec<usize> = (0..expected.len()).filter(|&i| expected[i] > 0.0).collect();
    assert_eq!(kept, want, "{name}: kept support");
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..n {
        let t = sampler.pick(&scores).unwrap() as usize;
        assert!(expected[t] > 0.0, "{name} (seed {seed}): drew {t}, outside the allowed set");
        counts[t] += 1;
    }
    check_fit(name, seed, expected, &counts);
}

const N: usize = 400_000;

fn crafted_case(name: &str, chain: Chain, default_seed: u64, expect_support: usize) {
    let z = crafted();
    let z64: Vec<f64> = z.iter().map(|&x| x as f64).collect();
    let q = chain.expected(&z64);
    assert_eq!(q.iter().filter(|&&x| x > 0.0).count(), expect_support, "{name}: analytic support size");
    run_sampler(name, &chain.config(seed(default_seed)), &z, &[], &q, N);
}

#[test]
fn temperature_only() {
    let c = Chain { temperature: 0.7, top_k: None, top_p: None, min_p: None, typical: None };
    crafted_case("temperature 0.7", c, 11, 31);
}

#[test]
fn top_k_keeps_boundary_ties() {
    let c = Chain { temperature: 1.0, top_k: Some(5), top_p: None, min_p: None, typical: None };
    crafted_case("top-k 5 (tie at the boundary)", c, 12, 6);
}

#[test]
fn default_top_k_50_is_all_of_32() {
    // top_k left at HF's default 50 (> V): nothing removed beyond the -inf entry.
    let c = Chain { temperature: 1.3, top_k: Some(50), top_p: None, min_p: None, typical: None };
    crafted_case("default top-k 50, T 1.3", c, 13, 31);
}

#[test]
fn top_p() {
    let c = Chain { temperature: 1.3, top_k: None, top_p: Some(0.8), min_p: None, typical: None };
    crafted_case("top-p 0.8, T 1.3", c, 14, 7);
    let c = Chain { temperature: 1.0, top_k: None, top_p: Some(0.5), min_p: None, typical: None };
    crafted_case("top-p 0.5", c, 15, 3);
}

#[test]
fn min_p_after_temperature() {
    let c = Chain { temperature: 0.9, top_k: None, top_p: None, min_p: Some(0.1), typical: None };
    crafted_case("min-p 0.1, T 0.9", c, 16, 7);
}

#[test]
fn typical() {
    let c = Chain { temperature: 1.0, top_k: None, top_p: None, min_p: None, typical: Some(0.6) };
    crafted_case("typical 0.6", c, 17, 6);
}

#[test]
fn whole_chain_in_order() {
    let c = Chain { temperature: 1.5, top_k: Some(12), top_p: Some(0.9), min_p: Some(0.05), typical: None };
    crafted_case("T 1.5, top-k 12, top-p 0.9, min-p 0.05", c, 18, 9);
}

/// A real model row: the base checkpoint's last prompt position (img1), with the repetition penalty over the
/// prompt, T 2, HF's default top-k 50 and top-p 0.95.
#[test]
fn real_logits_with_repetition_penalty() {
    let logits = common::npy::read(&common::fixtures::root().join("golden/base-default-f32/logits/img1.npy"));
    let v = logits.shape[1];
    let last: Vec<f32> = logits.data[logits.data.len() - v..].iter().map(|&x| x as f32).collect();
    let goldens = common::fixtures::goldens("base-default-f32");
    let prompt: Vec<u32> =
        common::fixtures::ids(&goldens["prompts"]["img1"]["input_ids"]).into_iter().map(|x| x as u32).collect();
    // Repetition penalty 1.5 in f64 on the f32 values (once per distinct id).
    let mut z: Vec<f64> = last.iter().map(|&x| x as f64).collect();
    let theta = 1.5f32;
    let mut seen = vec![false; v];
    for &t in &prompt {
        if !std::mem::replace(&mut seen[t as usize], true) {
            let s = last[t as usize];
            z[t as usize] = (if s < 0.0 { s * theta } else { s / theta }) as f64;
        }
    }
    let chain = Chain { temperature: 2.0, top_k: Some(50), top_p: Some(0.95), min_p: None, typical: None };
    let q = chain.expected(&z);
    let support = q.iter().filter(|&&x| x > 0.0).count();
    assert!(support >= 5, "real-logits case too peaked to test ({support} tokens)");
    let mut cfg = chain.config(seed(19));
    cfg.repetition_penalty = 1.5;
    cfg.eos_token_ids = vec![2];
    run_sampler("real logits, rep 1.5, T 2, top-k 50, top-p 0.95", &cfg, &last, &prompt, &q, 100_000);
}

#[test]
fn sampling_with_top_k_1_is_greedy() {
    let z = crafted();
    let cfg = GenerationConfig {
        do_sample: true,
        top_k: Some(1),
        temperature: 0.5,
        seed: Some(seed(20)),
        ..Default::default()
    };
    let mut s = Sampler::new(&cfg, 0).unwrap();
    let greedy = GenerationConfig::default();
    let mut g = Sampler::new(&greedy, 0).unwrap();
    let want = g.next(&z, &[]).unwrap();
    assert_eq!(want, 1);
    for _ in 0..1000 {
        assert_eq!(s.next(&z, &[]).unwrap(), want);
    }
}

/// Exact Plackett–Luce probability of drawing exactly the set `set` (any order) in `set.len()` draws without
/// replacement from `p`: the sum over the orders of Π p_i / (1 - mass drawn before).
fn pl_set_probability(p: &[f64], set: &[usize]) -> f64 {
    fn rec(p: &[f64], left: &mut Vec<usize>, used: f64) -> f64 {
        if left.is_empty() {
            return 1.0;
        }
        let mut total = 0.0;
        for k in 0..left.len() {
            let i = left.remove(k);
            total += p[i] / (1.0 - used) * rec(p, left, used + p[i]);
            left.insert(k, i);
        }
        total
    }
    rec(p, &mut set.to_vec(), 0.0)
}

fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![vec![]];
    }
    if n < k {
        return vec![];
    }
    let mut out = subsets(n - 1, k);
    for mut s in subsets(n - 1, k - 1) {
        s.push(n - 1);
        out.push(s);
    }
    out
}

/// The without-replacement draw (beam sample's `multinomial(probs, n_keep)`): 4 of 7 entries, one of them 0.
/// The unordered sets follow Plackett–Luce, the first draw follows p, the zero entry never appears.
#[test]
fn beam_sample_candidate_sets() {
    let seed = seed(21);
    let p32: [f32; 7] = [0.3, 0.05, 0.2, 0.0, 0.15, 0.1, 0.2];
    let p: Vec<f64> = {
        let t: f64 = p32.iter().map(|&x| x as f64).sum();
        p32.iter().map(|&x| x as f64 / t).collect()
    };
    let sets = subsets(7, 4);
    let expected: Vec<f64> =
        sets.iter().map(|s| if s.contains(&3) { 0.0 } else { pl_set_probability(&p, s) }).collect();
    assert!((expected.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let index: HashMap<Vec<usize>, usize> = sets.iter().cloned().enumerate().map(|(i, s)| (s, i)).collect();
    let mut rng = SamplingRng::new(seed);
    let (mut set_counts, mut first_counts) = (vec![0u64; sets.len()], vec![0u64; 7]);
    let n = 200_000;
    for _ in 0..n {
        let d = without_replacement(&p32, 4, &[0.0; 7], &mut rng).unwrap();
        assert!(!d.contains(&3), "seed {seed}: drew the zero-probability entry");
        first_counts[d[0]] += 1;
        let mut s = d.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 4, "seed {seed}: repeated entry in {d:?}");
        set_counts[index[&s]] += 1;
    }
    check_fit("without replacement: unordered 4-sets", seed, &expected, &set_counts);
    check_fit("without replacement: first draw", seed, &p, &first_counts);
}

/// Beam sample through `BeamSearch`: K = 2, V = 4, no EOS (4 candidates). The first step is forced (the second
/// copy of the prompt has probability 0, so the 4 draws are all of beam 0's tokens and the top two continue).
/// At the second step 4 of the 8 (beam, token) candidates are drawn ∝ exp(beam score + log p); the two best
/// of the drawn set continue. Their distribution is computed by enumerating all 70 sets.
#[test]
fn beam_sample_step_distribution() {
    let base = seed(22);
    let z0 = [1.0f32, 0.2, -0.5, 0.6];
    let rows1 = [[0.3f32, -0.2, 0.9, 0.0], [0.5f32, 0.4, -1.0, 0.1]];
    let cfg = |s: u64| GenerationConfig {
        do_sample: true,
        num_beams: 2,
        max_new_tokens: Some(4),
        eos_token_ids: vec![],
        seed: Some(s),
        ..Default::default()
    };
    // Expected, in f64: after step 0 the beams are tokens 0 (log p 1st) and 3 (2nd).
    let logp = |z: &[f32]| -> Vec<f64> {
        let q = probs_of(&z.iter().map(|&x| x as f64).collect::<Vec<_>>());
        q.iter().map(|x| x.ln()).collect()
    };
    let l0 = logp(&z0);
    let beam_scores = [l0[0], l0[3]];
    let flat: Vec<f64> = (0..8).map(|i| beam_scores[i / 4] + logp(&rows1[i / 4])[i % 4]).collect();
    let p = probs_of(&flat);
    let mut expected: HashMap<(usize, usize), f64> = HashMap::new();
    for s in subsets(8, 4) {
        let mut by_score = s.clone();
        by_score.sort_by(|&a, &b| flat[b].partial_cmp(&flat[a]).unwrap());
        *expected.entry((by_score[0], by_score[1])).or_default() += pl_set_probability(&p, &s);
    }
    let mut keys: Vec<(usize, usize)> = expected.keys().cloned().collect();
    keys.sort();
    let q: Vec<f64> = keys.iter().map(|k| expected[k]).collect();
    let mut counts = vec![0u64; keys.len()];
    let trials = 20_000u64;
    for trial in 0..trials {
        let mut b = BeamSearch::new(&cfg(base + trial), &[7, 8]).unwrap();
        let first = b.step(&[z0]).unwrap();
        assert_eq!((first.reorder.clone(), first.tokens.clone()), (vec![0, 0], vec![0, 3]), "step 0");
        let out = b.step(&rows1).unwrap();
        let pair = (out.reorder[0] * 4 + out.tokens[0] as usize, out.reorder[1] * 4 + out.tokens[1] as usize);
        let k = keys.binary_search(&pair).unwrap_or_else(|_| panic!("seed {}: impossible pair {pair:?}", base + trial));
        counts[k] += 1;
    }
    check_fit("beam sample step (K 2, V 4)", base, &q, &counts);
}
