//! The committed fixtures are the ones the reference harness made: every file listed in tests/fixtures/manifest.json
//! has its recorded size and sha256, and every file under tests/fixtures is listed there, except the folders with
//! a record of their own (golden/fullwidth: tensors.json holds the generator's hashes, made by
//! tests/reference/make_fullwidth.py; its photo; hostile/: images built by hand for tests/serve_attacks.rs).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

const OWN_RECORD: &[&str] = &["golden/fullwidth/", "images/photo_512x341.png", "hostile/", "manifest.json"];

#[test]
fn every_fixture_file_has_its_recorded_hash() {
    let root = root();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_object().unwrap();
    assert!(files.len() > 200, "{} files listed", files.len());
    for (rel, want) in files {
        let bytes = std::fs::read(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(bytes.len() as u64, want["bytes"].as_u64().unwrap(), "{rel}: size");
        let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want["sha256"].as_str().unwrap(), "{rel}: sha256 (not the harness's file)");
    }
    let mut all = Vec::new();
    walk(&root, &mut all);
    for p in all {
        let rel = p.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        if !OWN_RECORD.iter().any(|o| rel.starts_with(o)) {
            assert!(files.contains_key(&rel), "{rel} is not in manifest.json");
        }
    }
}
