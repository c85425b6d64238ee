//! The memory estimate `run`, `chat` and `serve` print before loading (and refuse on) against what the process
//! really holds once the model has filled its whole context and encoded an image. Alone in its test binary, so
//! that no other test's memory is counted.
//!
//! Not run under user-mode emulation (the ARM part of CI, which sets `ASAGI_TEST_RUNNER`): there the resident
//! memory is qemu's, translated code included, not the program's, and the 4096-cell prefill took 90 s of CI's
//! hour. The estimate is checked natively (x86-64 CI; on a board, `cargo test --test memory`).

mod common;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::llm::Input;
use asagi_gguf::load::{Loaded, ModelArgs};
use asagi_gguf::memory;
use asagi_gguf::vision::VisionEncoder;
use common::fixtures;

#[test]
fn estimate_is_within_15_percent_of_the_peak_resident_memory() {
    if std::env::var_os("ASAGI_TEST_RUNNER").is_some() {
        eprintln!("SKIPPED: under emulation the resident memory is the emulator's (see the module comment)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model_dir = fixtures::model_dir("base-default-f32");
    let (llm, mmproj) = common::conversion::convert(&model_dir, dir.path(), LlmType::Q8_0, MmprojType::F16).unwrap();
    // A context of 4096 f32 cells makes the estimated parts (KV cache, compute buffers) about twice what the
    // program holds at the time of the estimate (which is measured, not estimated); every one is filled below.
    let n_ctx = 4096;
    let args = ModelArgs {
        ctx_size: Some(n_ctx),
        threads: Some(2),
        cache_type: "f32".into(),
        ..ModelArgs::new(llm, Some(mmproj))
    };
    // The peak from here on (the conversion above allocated and freed memory of its own).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let loaded = Loaded::open(&args, true).unwrap();
    let e = loaded.estimate.clone();
    let model = loaded.model().unwrap();
    let vmodel = loaded.vision(&model).unwrap().unwrap();
    let backends = loaded.backends();
    let mut session = loaded.session(&model, &backends).unwrap();
    let image = VisionEncoder::new(&vmodel, &backends)
        .unwrap()
        .encode_file(&fixtures::root().join("images/rgb_80x60.png"))
        .unwrap();
    // Fill the context: the image's rows, then tokens up to the last cell, in full micro-batches.
    session.prefill(Input::Embeddings(&image.data), 0, 0, false).unwrap();
    let tokens: Vec<u32> = (0..n_ctx - image.n_tokens).map(|i| 5 + (i % 500) as u32).collect();
    session.prefill(Input::Tokens(&tokens), 0, image.n_tokens as i32, false).unwrap();
    assert_eq!(session.cache.n_free(), 0, "the context is full");

    let peak = memory::peak_resident().unwrap();
    let err = (e.total() as f64 - peak as f64) / peak as f64;
    // The parts estimated (not measured at the time: everything but `program`) on their own.
    let (parts, grown) = (e.total() - e.program, peak.saturating_sub(e.program));
    let parts_err = (parts as f64 - grown as f64) / grown as f64;
    eprintln!("{}", e.summary());
    eprintln!("estimate {} bytes, peak resident {peak} bytes: {:+.1}%", e.total(), err * 100.0);
    eprintln!("estimated parts {parts} bytes, growth after the estimate {grown} bytes: {:+.1}%", parts_err * 100.0);
    assert!(err.abs() <= 0.15, "estimate {} vs peak {peak} ({:+.1}%)", e.total(), err * 100.0);
    assert!(parts > e.program * 3 / 2, "the estimated parts dominate the total: {e:?}");
}
