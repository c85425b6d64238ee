//! mul_mat through the safe ggml layer on the CPU backend, against a plain f64 reference, for every weight type
//! the models use. Fresh random inputs each run; the seed is printed on failure (`ASAGI_TEST_SEED` replays it).

mod common;

use ggml::{Backend, Context, Type};

/// Runs `w · x` with `w` stored as `ty` (`n` rows of `k`) and `x` F32 (`m` columns of `k`).
fn ggml_matmul(ty: Type, w: &[f32], x: &[f32], k: usize, n: usize, m: usize) -> (Vec<f32>, Vec<f32>) {
    let backend = Backend::cpu(2).unwrap();
    let weights = Context::new(1, 0).unwrap();
    let wt = weights.new_tensor(ty, &[k, n]);
    weights.alloc_tensors(&backend).unwrap();
    let bytes = ggml::quantize(ty, w, k, None).unwrap();
    weights.write(wt, &bytes).unwrap();
    // What the weights are after rounding to `ty`: the reference for the kernel itself.
    let w_rounded = ggml::dequantize(ty, &bytes, k * n).unwrap();

    let y = common::mul_mat(&backend, wt, x, m);
    assert_eq!(y.len(), n * m);
    (y, w_rounded)
}

fn reference(w: &[f32], x: &[f32], k: usize, n: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * m];
    for j in 0..m {
        for i in 0..n {
            out[j * n + i] = (0..k).map(|c| w[i * k + c] as f64 * x[j * k + c] as f64).sum();
        }
    }
    out
}

/// Relative RMS error bounds: (against the weights as rounded to the type, which isolates the kernel and the
/// rounding of the activations to the type's dot-product partner, Q8_0/Q8_K; against the original f32 weights, which
/// adds the type's own quantization error). Measured over 34 seeds on uniform [-1, 1) inputs, k = 512, ~2,000
/// outputs per case (m = 1 and 33, max): f16 1.9e-4/2.8e-4, bf16 1.6e-3/2.2e-3, q8_0 4.1e-3/5.8e-3,
/// q6_K 4.3e-3/1.5e-2, q5_K 4.1e-3/2.9e-2, q5_0 4.0e-3/3.3e-2, q5_1 4.2e-3/3.2e-2, q4_K 4.4e-3/5.8e-2,
/// q4_0 4.0e-3/6.8e-2, iq4_nl 4.1e-3/6.8e-2 (standard deviations 2-3% of the means). Bounds are ~1.4-2.5x those.
fn bounds(ty: Type) -> (f64, f64) {
    match ty {
        Type::F32 => (1e-6, 1e-6),
        // With ARM's FP16 vector arithmetic (the Raspberry Pi 5 build, armv8.2-a+fp16) ggml's f16 dot products
        // multiply-accumulate in f16 lanes: measured 6.6e-4/7.0e-4 for m = 1 under qemu cortex-a76.
        Type::F16 if ggml::cpu_features().split(' ').any(|f| f == "FP16_VA") => (1.5e-3, 2e-3),
        Type::F16 => (6e-4, 1e-3),
        Type::BF16 => (4e-3, 5e-3),
        Type::Q8_0 => (1e-2, 9e-3),
        Type::Q4_0 => (1e-2, 0.1),
        Type::Q4K => (1e-2, 0.08),
        Type::Q6K => (1e-2, 0.022),
        Type::Q5K => (1e-2, 0.045),
        Type::Q5_0 => (1e-2, 0.05),
        Type::Q5_1 => (1e-2, 0.05),
        Type::IQ4NL => (1e-2, 0.1),
        _ => unreachable!(),
    }
}

/// Every type the converter writes (its mixes and their fallbacks, convert/src/quant.rs), and IQ4_NL, which ggml
/// repacks.
const TYPES: [Type; 11] = [
    Type::F32,
    Type::F16,
    Type::BF16,
    Type::Q8_0,
    Type::Q6K,
    Type::Q5K,
    Type::Q5_0,
    Type::Q5_1,
    Type::Q4K,
    Type::Q4_0,
    Type::IQ4NL,
];

#[test]
fn matmul_all_weight_types_match_f64_reference() {
    let (mut rng, seed) = common::rng();
    let k = 512;
    for ty in TYPES {
        // m = 1 takes ggml's matrix-vector path (decode); 33 its matrix-matrix path (prefill). Both see about 2,000
        // outputs, so that the relative RMS error is a stable statistic: with 48 rows the q4_K m = 1 error spread
        // from 5.5e-2 to 8.3e-2 across seeds.
        for (m, n) in [(1, 2048), (33, 64)] {
            let w = common::uniform(&mut rng, k * n);
            let x = common::uniform(&mut rng, k * m);
            let (y, w_rounded) = ggml_matmul(ty, &w, &x, k, n, m);
            let kernel_err = common::rel_rms(&y, &reference(&w_rounded, &x, k, n, m));
            let total_err = common::rel_rms(&y, &reference(&w, &x, k, n, m));
            let (kernel_bound, total_bound) = bounds(ty);
            eprintln!("{ty} m={m}: kernel {kernel_err:.2e}, total {total_err:.2e}");
            assert!(
                kernel_err <= kernel_bound && total_err <= total_bound,
                "{ty} m={m}: rel. RMS error {kernel_err:.2e} vs rounded weights (bound {kernel_bound:.0e}), \
                 {total_err:.2e} vs f32 weights (bound {total_bound:.0e}); seed {seed}"
            );
        }
    }
}

#[test]
fn quantize_refuses_bad_shapes_and_missing_imatrix() {
    assert!(ggml::quantize(Type::Q4K, &[0.0; 300], 300, None).is_err(), "300 is not a multiple of 256");
    assert!(ggml::quantize(Type::Q8_0, &[0.0; 100], 64, None).is_err(), "100 values are not whole rows");
    let err = ggml::quantize(Type::IQ2XXS, &[0.0; 256], 256, None).unwrap_err();
    assert!(err.to_string().contains("importance matrix"), "{err}");
    let imatrix = vec![1.0f32; 256];
    assert!(ggml::quantize(Type::IQ2XXS, &[0.5; 256], 256, Some(&imatrix)).is_ok());
}

/// `mul_mat_few` (asagi-gguf's multi-row kernels for 2 to 7 activation rows, x86-64 with AVX2: Q6_K and Q8_0 in CPU
/// memory, Q4_0 and Q4_K repacked by ggml) against ggml's `mul_mat` on the same weights: equal bit for bit for every
/// row count from 1 to 9 (1 is ggml's one-row path; 4 and 8 its repacked 4-row kernel, which ours leaves alone, 5-7
/// that kernel plus one-row products; 8 and 9 its tiled Q6_K kernel; 2 and more llamafile's tinyBLAS for Q8_0), row
/// lengths of 1, 3, 12 and 32 blocks of 256 (the 4B model's 3072 and 8192), weight-row counts that do not split
/// evenly over the threads, and 1 to 3 threads. A layout or order
/// mistake would differ in most outputs; a wrong block or row offset by ~1 relative.
#[test]
fn multi_row_kernels_equal_ggml_bit_for_bit() {
    use ggml::{BufferType, MultiRowKernel};
    let (mut rng, seed) = common::rng();
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    eprintln!("multi-row kernels on this CPU: {avx2} ({})", ggml::cpu_features());
    let ggml_avx512 = ggml::cpu_features().split_whitespace().any(|f| f == "AVX512");
    let repack = BufferType::cpu_extra().into_iter().find(|b| b.name() == "CPU_REPACK");
    // (weight type, buffer type: None a plain CPU buffer, the kernel expected on an AVX2 CPU).
    let mut cases = vec![
        (Type::Q6K, None, Some(MultiRowKernel::Q6K)),
        (Type::Q8_0, None, Some(MultiRowKernel::Q8_0)),
        (Type::Q4K, None, None),
    ];
    for ty in [Type::Q4_0, Type::Q4K] {
        // ggml repacks these on x86-64 with AVX2 (and on ARM, where our kernels are not built).
        let probe = Context::new(1, 0).unwrap();
        if let Some(buft) = repack.filter(|b| b.supports_mul_mat(probe.new_tensor(ty, &[256, 8]))) {
            cases.push((ty, Some(buft), Some(MultiRowKernel::Repacked8)));
        }
    }
    #[cfg(target_arch = "x86_64")]
    assert!(!avx2 || cases.len() == 5, "ggml repacks Q4_0 and Q4_K on an AVX2 CPU");

    // It never takes a weight with no data, 1 row or 8.
    let probe = Context::new(2, 0).unwrap();
    let probe_backend = Backend::cpu(1).unwrap();
    let (pw, px) = (probe.new_tensor(Type::Q6K, &[256, 8]), probe.new_tensor(Type::F32, &[256, 5]));
    probe.alloc_tensors(&probe_backend).unwrap();
    let ctx = Context::new(4, 0).unwrap();
    assert!(!ggml::multi_row_kernel_takes(ctx.new_tensor(Type::Q6K, &[256, 8]), px), "unallocated weight");
    assert!(!ggml::multi_row_kernel_takes(pw, ctx.new_tensor(Type::F32, &[256, 1])));
    assert!(!ggml::multi_row_kernel_takes(pw, ctx.new_tensor(Type::F32, &[256, 8])));

    for (ty, buft, kernel) in cases {
        let expected = kernel.filter(|_| avx2);
        for threads in 1..=3 {
            let backend = Backend::cpu(threads).unwrap();
            // Weight rows: a multiple of 8 for the repacked layouts (ggml repacks no other).
            for (k, n) in [(256, 40), (768, 64), (3072, 24), (8192, 16)] {
                let n = if buft.is_some() { n } else { n - 3 };
                let weights = Context::new(1, 0).unwrap();
                let wt = weights.new_tensor(ty, &[k, n]);
                match buft {
                    Some(buft) => weights.alloc_tensors_in(buft).unwrap(),
                    None => weights.alloc_tensors(&backend).unwrap(),
                }
                weights.write(wt, &ggml::quantize(ty, &common::uniform(&mut rng, k * n), k, None).unwrap()).unwrap();
                for m in 1..=9 {
                    let x = common::uniform(&mut rng, k * m);
                    let ctx = Context::new(8, 16).unwrap();
                    let xt = ctx.new_tensor(Type::F32, &[k, m]).named("x").set_input();
                    let rows = match (ty, buft) {
                        (_, Some(_)) => [2, 3, 5, 6, 7].as_slice(),
                        // Where ggml's tinyBLAS reads the weight twice (tiles of 4 rows with AVX-512, 2 without).
                        (Type::Q8_0, None) if ggml_avx512 => &[5, 6, 7],
                        (Type::Q8_0, None) => &[3, 5, 7],
                        _ => &[2, 3, 4, 5, 6, 7],
                    };
                    let takes = if rows.contains(&m) { expected } else { None };
                    assert_eq!(ggml::multi_row_kernel(wt, xt), takes, "{ty} rows={m}");
                    let plain = ctx.mul_mat(wt, xt).named("plain").set_output();
                    let few = ctx.mul_mat_few(wt, xt).named("few").set_output();
                    let mut gf = ctx.new_graph(16);
                    gf.build_forward_expand(plain);
                    gf.build_forward_expand(few);
                    let mut sched = ggml::Scheduler::new(&[&backend], 16).unwrap();
                    sched.alloc(&gf).unwrap();
                    sched.write(xt, &x).unwrap();
                    sched.compute(&gf).unwrap();
                    let (a, b) = (sched.read::<f32>(plain).unwrap(), sched.read::<f32>(few).unwrap());
                    assert_eq!(a.len(), n * m);
                    let differ: Vec<_> =
                        a.iter().zip(&b).enumerate().filter(|(_, (p, q))| p.to_bits() != q.to_bits()).collect();
                    assert!(
                        differ.is_empty(),
                        "{ty} k={k} n={n} rows={m} threads={threads}: {} of {} outputs differ, first (index, (ggml, \
                         ours)) {:?}; seed {seed}",
                        differ.len(),
                        a.len(),
                        differ[0],
                    );
                }
            }
        }
    }
}
