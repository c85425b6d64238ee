//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod conversion;
pub mod fixtures;
pub mod npy;
pub mod png_bytes;
pub mod server;

use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A command for the `asagi-gguf` binary under test. Under cross-compiled tests (`.cargo/aarch64-linux.toml`) the
/// binary is an ARM one: it starts through the same emulator cargo runs the test binaries with, named by
/// `ASAGI_TEST_RUNNER` (a program and its arguments, split at spaces).
pub fn asagi_gguf() -> Command {
    target_program(env!("CARGO_BIN_EXE_asagi-gguf"))
}

/// A command for a program built for the target (the binary, a test binary), through `ASAGI_TEST_RUNNER` if set.
pub fn target_program(bin: impl AsRef<std::ffi::OsStr>) -> Command {
    let runner = std::env::var("ASAGI_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// A random generator with a fresh seed each run (or `ASAGI_TEST_SEED`), and the seed to print on failure.
pub fn rng() -> (StdRng, u64) {
    let seed = std::env::var("ASAGI_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    (StdRng::seed_from_u64(seed), seed)
}

/// `n` values uniform in [-1, 1).
pub fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// sqrt(Σ(a-b)²) / sqrt(Σb²).
pub fn rel_rms(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// max |a-b|.
pub fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

/// `w · x` on `backend`: `w` a weight tensor its caller allocated and filled, `x` F32, `m` rows of `w`'s row length.
pub fn mul_mat(backend: &ggml::Backend, w: ggml::Tensor<'_>, x: &[f32], m: usize) -> Vec<f32> {
    let ctx = ggml::Context::new(8, 16).unwrap();
    let xt = ctx.new_tensor(ggml::Type::F32, &[w.ne()[0], m]).named("x").set_input();
    let y = ctx.mul_mat(w, xt).named("y").set_output();
    let mut gf = ctx.new_graph(16);
    gf.build_forward_expand(y);
    let mut sched = ggml::Scheduler::new(&[backend], 16).unwrap();
    sched.alloc(&gf).unwrap();
    sched.write(xt, x).unwrap();
    sched.compute(&gf).unwrap();
    sched.read::<f32>(y).unwrap()
}
