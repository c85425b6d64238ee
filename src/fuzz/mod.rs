//! Fuzzing entry points, shared by the libFuzzer targets in fuzz/ and by tests/fuzz_regressions.rs (which runs
//! every committed seed and every input a fuzzer ever crashed on as an ordinary test).
//!
//! Each entry takes arbitrary bytes and must return without panicking, aborting, hanging or allocating without
//! bound. Beyond "no crash", each checks what must hold of any input it accepts (an oracle): a GGUF or a converted
//! checkpoint that passes validation runs a forward pass, preprocessed pixels have the configured shape and range,
//! a validated request respects its limits, the streaming detokenizer agrees with a whole decode. A violated
//! oracle panics, so the fuzzer reports it as a crash.
//!
//! The bodies are here, not in fuzz/, so the regression test exercises the exact code the fuzzer ran.

mod convert;
mod detokenize;
mod gguf;
mod image;
mod reference;
mod request;

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Result;

pub use reference::{seeds, Reference};

/// The fuzz targets, by name (as fuzz/fuzz_targets/<name>.rs and the folders of fuzz/seeds and tests/fuzz).
pub const TARGETS: &[&str] = &["gguf", "convert", "image", "request", "detokenize"];

/// What the entry points share: a scratch folder (input files are written there) and, made on first use, a
/// micro-sized Asagi model converted to GGUF (the reference language model for mmproj inputs, the tokenizer of
/// the detokenizer target).
pub struct Fuzzer {
    dir: tempfile::TempDir,
    reference: OnceLock<Reference>,
}

impl Fuzzer {
    /// A fuzzer working in a new folder under the system temp dir (`TMPDIR`).
    pub fn new() -> Result<Fuzzer> {
        Ok(Fuzzer { dir: tempfile::Builder::new().prefix("asagi-fuzz-").tempdir()?, reference: OnceLock::new() })
    }

    /// Runs target `name` on `data`; true if the input was accepted (a valid file, image or request), false if it
    /// was refused with an error.
    pub fn run(&self, name: &str, data: &[u8]) -> bool {
        match name {
            "gguf" => self.gguf(data),
            "convert" => self.convert(data),
            "image" => image::run(data),
            "request" => self.request(data),
            "detokenize" => self.detokenize(data),
            other => panic!("unknown fuzz target {other}; one of {TARGETS:?}"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The reference model, made on first use.
    pub fn reference(&self) -> &Reference {
        self.reference.get_or_init(|| {
            Reference::make(&self.path("reference"))
                .unwrap_or_else(|e| panic!("cannot make the reference model: {e:#}"))
        })
    }
}
