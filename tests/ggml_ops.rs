//! A small graph of the ops the models use (rms_norm, rope_ext in normal mode, soft_max_ext with a causal mask,
//! gelu_erf, mul_mat), run on the CPU backend and compared with plain Rust reference code in f64.

mod common;

use ggml::{Backend, Context, RopeMode, RopeParams, Scheduler, Type};

const D: usize = 64; // row width
const HD: usize = 16; // head dim for RoPE
const T: usize = 6; // tokens
const N_OUT: usize = 8;
const EPS: f32 = 1e-5;
const BASE: f32 = 10000.0;
const POS: [i32; T] = [0, 1, 2, 7, 100, 1000];

fn rms_norm_ref(x: &[f32], g: &[f32]) -> Vec<f64> {
    x.chunks(D)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / D as f64;
            let inv = 1.0 / (ms + EPS as f64).sqrt();
            row.iter().zip(g).map(move |(&v, &w)| v as f64 * inv * w as f64)
        })
        .collect()
}

/// Normal (adjacent-pair) RoPE: pair (2i, 2i+1) of each head rotated by pos·base^(-2i/HD).
fn rope_ref(x: &[f32]) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for t in 0..T {
        for h in 0..D / HD {
            let o = t * D + h * HD;
            for i in 0..HD / 2 {
                let theta = POS[t] as f64 * (BASE as f64).powf(-2.0 * i as f64 / HD as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = (x[o + 2 * i] as f64, x[o + 2 * i + 1] as f64);
                out[o + 2 * i] = a * c - b * s;
                out[o + 2 * i + 1] = a * s + b * c;
            }
        }
    }
    out
}

/// Row-wise softmax(s·scale + causal mask): row q sees columns 0..=q.
fn softmax_causal_ref(s: &[f32], scale: f64) -> Vec<f64> {
    s.chunks(T)
        .enumerate()
        .flat_map(|(q, row)| {
            let z: Vec<f64> = row
                .iter()
                .enumerate()
                .map(|(k, &v)| if k <= q { v as f64 * scale } else { f64::NEG_INFINITY })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / sum)
        })
        .collect()
}

fn gelu_erf_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

#[test]
fn small_graph_matches_rust_reference() {
    let (mut rng, seed) = common::rng();
    let x: Vec<f32> = common::uniform(&mut rng, D * T).iter().map(|v| v * 3.0).collect();
    let g = common::uniform(&mut rng, D);
    let s: Vec<f32> = common::uniform(&mut rng, T * T).iter().map(|v| v * 8.0).collect();
    let mask: Vec<f32> = (0..T * T).map(|i| if i % T <= i / T { 0.0 } else { f32::NEG_INFINITY }).collect();
    let w = common::uniform(&mut rng, D * N_OUT);

    let backend = Backend::cpu(2).unwrap();
    let ctx = Context::new(32, 64).unwrap();
    let xt = ctx.new_tensor(Type::F32, &[D, T]).named("x").set_input();
    let gt = ctx.new_tensor(Type::F32, &[D]).named("g").set_input();
    let st = ctx.new_tensor(Type::F32, &[T, T]).named("scores").set_input();
    let mt = ctx.new_tensor(Type::F32, &[T, T]).named("mask").set_input();
    let pt = ctx.new_tensor(Type::I32, &[T]).named("pos").set_input();
    let wt = ctx.new_tensor(Type::F32, &[D, N_OUT]).named("w").set_input();

    let normed = ctx.mul(ctx.rms_norm(xt, EPS), gt).named("normed").set_output();
    let heads = ctx.reshape(xt, &[HD, D / HD, T]);
    let roped =
        ctx.rope_ext(heads, pt, RopeParams::plain(HD, RopeMode::Normal, BASE, 4096)).named("roped").set_output();
    let probs = ctx.soft_max_ext(st, Some(mt), 0.125).named("probs").set_output();
    let act = ctx.gelu_erf(normed).named("act").set_output();
    let proj = ctx.mul_mat(wt, act).named("proj").set_output();
    let mut gf = ctx.new_graph(64);
    for t in [normed, roped, probs, act, proj] {
        gf.build_forward_expand(t);
    }

    let mut sched = Scheduler::new(&[&backend], 64).unwrap();
    sched.alloc(&gf).unwrap();
    sched.write(xt, &x).unwrap();
    sched.write(gt, &g).unwrap();
    sched.write(st, &s).unwrap();
    sched.write(mt, &mask).unwrap();
    sched.write(pt, &POS).unwrap();
    sched.write(wt, &w).unwrap();
    sched.compute(&gf).unwrap();

    let normed_ref = rms_norm_ref(&x, &g);
    let act_ref: Vec<f64> = normed_ref.iter().map(|&v| gelu_erf_ref(v)).collect();
    let w = &w;
    let proj_ref: Vec<f64> = (0..T)
        .flat_map(|t| {
            let a = &act_ref[t * D..(t + 1) * D];
            (0..N_OUT).map(move |o| (0..D).map(|c| w[o * D + c] as f64 * a[c]).sum::<f64>()).collect::<Vec<_>>()
        })
        .collect();
    // f32 arithmetic bounds; RoPE at position 1000 loses ~1e-4 rad in f32 angles.
    let checks: [(&str, ggml::Tensor, Vec<f64>, f64); 5] = [
        ("rms_norm*g", normed, normed_ref, 1e-5),
        ("rope_ext normal", roped, rope_ref(&x), 2e-4 * 3.0),
        ("soft_max_ext causal", probs, softmax_causal_ref(&s, 0.125), 1e-6),
        ("gelu_erf", act, act_ref.clone(), 1e-5),
        ("mul_mat", proj, proj_ref, 1e-4),
    ];
    for (what, t, want, tol) in checks {
        let got = sched.read::<f32>(t).unwrap();
        let err = common::max_abs(&got, &want);
        assert!(err <= tol, "{what}: max |ggml - ref| = {err:.3e} > {tol:.0e}; seed {seed}");
    }
    // The causal mask must zero the future exactly.
    let p = sched.read::<f32>(probs).unwrap();
    assert!(p.chunks(T).enumerate().all(|(q, row)| row[q + 1..].iter().all(|&v| v == 0.0)));
}

/// GELU, tanh form (PyTorch `gelu_pytorch_tanh`), in f64.
fn gelu_tanh_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// A kept graph (as a decode step's) computed again with new inputs gives each input's own result, also after the
/// scheduler ran another graph in between (it must then allocate the kept one again before computing it).
#[test]
fn kept_graph_computes_again_with_new_inputs() {
    let backend = Backend::cpu(2).unwrap();
    let (mut rng, seed) = common::rng();
    // A weight outside the graph's context, as a model's are.
    let wctx = Context::new(1, 0).unwrap();
    let wt = wctx.new_tensor(Type::F32, &[D, N_OUT]).named("w");
    wctx.alloc_tensors(&backend).unwrap();
    let w = common::uniform(&mut rng, D * N_OUT);
    wctx.write(wt, &w).unwrap();

    let kept = ggml::KeptGraph::build(Context::new(16, 32).unwrap(), Vec::new(), |ctx, _, _| {
        let x = ctx.new_tensor(Type::F32, &[D, T]).named("x").set_input();
        let y = ctx.mul_mat(wt, ctx.gelu_tanh_precise(x)).named("y").set_output();
        let mut gf = ctx.new_graph(32);
        gf.build_forward_expand(y);
        gf
    });
    let other_ctx = Context::new(4, 8).unwrap();
    let other_in = other_ctx.new_tensor(Type::F32, &[D]).named("o").set_input();
    let other_out = other_ctx.sqr(other_in).set_output();
    let mut other = other_ctx.new_graph(8);
    other.build_forward_expand(other_out);

    let mut sched = Scheduler::new(&[&backend], 64).unwrap();
    let (x_in, y_out) = (kept.tensor("x").unwrap(), kept.tensor("y").unwrap());
    for step in 0..4 {
        if step == 2 {
            // Another graph takes the scheduler's buffers; the kept graph is no longer the allocated one.
            sched.alloc(&other).unwrap();
            sched.write(other_in, &vec![3f32; D]).unwrap();
            sched.compute(&other).unwrap();
            assert_eq!(sched.read::<f32>(other_out).unwrap(), vec![9f32; D]);
            assert!(!sched.is_allocated(&kept.graph()));
        }
        if !sched.is_allocated(&kept.graph()) {
            sched.alloc(&kept.graph()).unwrap();
        }
        // Inputs up to +-12: GELU's tails (0 and x) as well as its bend.
        let x: Vec<f32> = common::uniform(&mut rng, D * T).iter().map(|v| v * 3.0 * (1.0 + step as f32)).collect();
        sched.write(x_in, &x).unwrap();
        sched.compute(&kept.graph()).unwrap();
        let want: Vec<f64> = (0..T)
            .flat_map(|t| {
                let a: Vec<f64> = x[t * D..(t + 1) * D].iter().map(|&v| gelu_tanh_ref(v as f64)).collect();
                let w = &w;
                (0..N_OUT).map(move |o| (0..D).map(|c| w[o * D + c] as f64 * a[c]).sum::<f64>()).collect::<Vec<_>>()
            })
            .collect();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = common::max_abs(&sched.read::<f32>(y_out).unwrap(), &want) / scale;
        // f32 GELU (x·sigmoid form) and a 64-term f32 dot, relative to the largest output: measured 6e-8 to
        // 1.2e-7 over 8 seeds.
        assert!(err <= 5e-7, "step {step}: max |ggml - ref| / max |ref| = {err:.3e}; seed {seed}");
    }
}
