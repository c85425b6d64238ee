//! The fuzz targets (src/fuzz, driven by libFuzzer in fuzz/) as ordinary tests: every committed seed
//! (fuzz/seeds/<target>/), every input a fuzzer ever crashed on (tests/fuzz/<target>/, kept as regressions once
//! fixed), and for the image target the test images and the hostile ones. Each input must be handled without a
//! panic and pass its target's oracle.
//!
//! `cargo test --test fuzz_regressions -- --ignored write_seeds` remakes fuzz/seeds/ from the reference model.

use std::path::{Path, PathBuf};

use asagi_gguf::fuzz::{seeds, Fuzzer, TARGETS};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn run(target: &str) {
    let f = Fuzzer::new().unwrap();
    let mut dirs = vec![root().join("fuzz/seeds").join(target), root().join("tests/fuzz").join(target)];
    if target == "image" {
        dirs.push(root().join("tests/fixtures/images"));
        dirs.push(root().join("tests/fixtures/hostile"));
    }
    let seeds = root().join("fuzz/seeds").join(target);
    let mut n = 0;
    for path in dirs.iter().flat_map(|d| files(d)) {
        let data = std::fs::read(&path).unwrap();
        let accepted = f.run(target, &data);
        eprintln!(
            "{target}: {} ({} bytes): {}",
            path.display(),
            data.len(),
            if accepted { "accepted" } else { "refused" }
        );
        // The seeds are valid inputs (accepting them shows the oracle ran), but for the bad ones.
        if path.starts_with(&seeds) {
            let bad = path.file_name().unwrap().to_string_lossy().starts_with("bad-");
            assert_eq!(accepted, !bad, "seed {}: accepted {accepted}", path.display());
        }
        n += 1;
    }
    assert!(n >= 2, "{target}: only {n} inputs found under {dirs:?}");
}

#[test]
fn gguf() {
    run("gguf");
}

#[test]
fn convert() {
    run("convert");
}

#[test]
fn image() {
    run("image");
}

#[test]
fn request() {
    run("request");
}

#[test]
fn detokenize() {
    run("detokenize");
}

#[test]
fn every_target_is_tested() {
    assert_eq!(TARGETS, ["gguf", "convert", "image", "request", "detokenize"]);
}

#[test]
#[ignore = "remakes fuzz/seeds/ (committed)"]
fn write_seeds() {
    let f = Fuzzer::new().unwrap();
    for t in TARGETS {
        let dir = root().join("fuzz/seeds").join(t);
        for (name, bytes) in seeds(&f, t).unwrap() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
