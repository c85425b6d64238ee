//! One matrix product, asagi-gguf's multi-row kernels (`mul_mat_few`) against ggml's `mul_mat`, by weight type and
//! activation-row count, on a weight larger than the caches (the 4B model's 3072-wide rows), alternating the two
//! and printing medians. It isolates what `compare --rows batch` measures through the whole model:
//!
//!   cargo bench --bench kernels -- [--types q8_0,q6_k,q4_0,q4_k] [--rows 2,3,5] [--reps 7] [--threads 2]
//!                                  [--weight-rows 24576]
//!
//! Q4_0 and Q4_K weights go to ggml's CPU_REPACK buffer (as the model loader puts them), Q8_0 and Q6_K to a plain
//! CPU buffer. The outputs of both sides are compared bit for bit before timing (the tests do it thoroughly).

use std::time::Instant;

use ggml::{Backend, BufferType, Context, Scheduler, Type};
use rand::{Rng, SeedableRng};

fn main() {
    let mut types = vec![Type::Q8_0, Type::Q6K, Type::Q4_0, Type::Q4K];
    let mut rows = vec![1usize, 2, 3, 4, 5, 6, 7, 8];
    let (mut reps, mut threads, mut n) = (7usize, 2usize, 24576usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--types" => {
                types = value()
                    .split(',')
                    .map(|t| Type::parse(t).unwrap_or_else(|| panic!("--types: {t}? (q8_0, q6_k, q4_0, q4_k)")))
                    .collect()
            }
            "--rows" => rows = value().split(',').map(|r| r.parse().expect("--rows: numbers")).collect(),
            "--reps" => reps = value().parse().expect("--reps: a number"),
            "--threads" => threads = value().parse().expect("--threads: a number"),
            "--weight-rows" => n = value().parse().expect("--weight-rows: a number"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let k = 3072;
    let backend = Backend::cpu(threads).unwrap();
    let repack = BufferType::cpu_extra().into_iter().find(|b| b.name() == "CPU_REPACK");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    println!(
        "ggml {}  CPU {}  threads {threads}  weight {k} x {n}  reps {reps}",
        ggml::version(),
        ggml::cpu_features()
    );
    println!("{:<6} {:>4} {:>12} {:>12} {:>8}  kernel", "type", "rows", "ggml ms", "ours ms", "ratio");
    for ty in types {
        let weights = Context::new(1, 0).unwrap();
        let wt = weights.new_tensor(ty, &[k, n]);
        match repack.filter(|_| matches!(ty, Type::Q4_0 | Type::Q4K)) {
            Some(buft) => weights.alloc_tensors_in(buft).unwrap(),
            None => weights.alloc_tensors(&backend).unwrap(),
        }
        let values: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        weights.write(wt, &ggml::quantize(ty, &values, k, None).unwrap()).unwrap();
        drop(values);
        for &m in &rows {
            let ctx = Context::new(8, 16).unwrap();
            let xt = ctx.new_tensor(Type::F32, &[k, m]).set_input();
            let kernel = ggml::multi_row_kernel(wt, xt);
            let plain = ctx.mul_mat(wt, xt).set_output();
            let few = ctx.mul_mat_few(wt, xt).set_output();
            let x: Vec<f32> = (0..k * m).map(|_| rng.random_range(-1.0..1.0)).collect();
            let graphs = [plain, few].map(|out| {
                let mut gf = ctx.new_graph(16);
                gf.build_forward_expand(out);
                gf
            });
            let mut sched = Scheduler::new(&[&backend], 16).unwrap();
            let mut outputs = Vec::new();
            let mut times = [Vec::new(), Vec::new()];
            for rep in 0..=reps {
                for (side, gf) in graphs.iter().enumerate() {
                    sched.alloc(gf).unwrap();
                    sched.write(xt, &x).unwrap();
                    let t = Instant::now();
                    sched.compute(gf).unwrap();
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    // The first round warms the caches and the page tables; it is not timed.
                    if rep == 0 {
                        outputs.push(sched.read::<f32>([plain, few][side]).unwrap());
                    } else {
                        times[side].push(ms);
                    }
                }
            }
            let same = outputs[0].iter().zip(&outputs[1]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty} rows={m}: outputs differ");
            let [g, o] = times.map(|mut t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            });
            println!("{:<6} {m:>4} {g:>12.2} {o:>12.2} {:>7.3}x  {kernel:?}", ty.to_string(), o / g);
        }
    }
}
