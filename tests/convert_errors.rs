//! Bad input to `convert` gives a clear error that names the file, key or tensor, and leaves no output file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use asagi_convert::{LlmType, MmprojType};
use common::conversion::options;
use common::fixtures;
use safetensors::{Dtype, SafeTensors};

const VARIANT: &str = "base-default-f32";

/// The fixture's tensors as owned (dtype, shape, bytes).
fn load_tensors() -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixtures::model_dir(VARIANT).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn save_tensors(path: &Path, tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies the fixture to a temp folder, lets `damage` break it, converts, and returns the error text.
fn convert_error(damage: impl FnOnce(&Path)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    fixtures::copy_model(VARIANT, &dir);
    damage(&dir);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let opts = options(&dir, &out, LlmType::Q4KM, MmprojType::Q8_0);
    let err = asagi_convert::plan(&opts).and_then(|c| asagi_convert::write(&c, &opts, &AtomicBool::new(false))).err();
    let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.is_empty(), "a failed conversion left {leftovers:?}");
    format!("{:#}", err.expect("the damaged checkpoint was accepted"))
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let mut t = load_tensors();
    f(&mut t);
    save_tensors(&dir.join("model.safetensors"), &t);
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention {p:?}: {err}");
    }
}

#[test]
fn missing_tensor() {
    let name = "language_model.model.layers.1.mlp.down_proj.weight";
    let err = convert_error(|d| {
        edit_tensors(d, |t| {
            t.remove(name);
        })
    });
    assert_mentions(&err, &["has no tensor", name]);
}

#[test]
fn extra_tensor() {
    let name = "language_model.model.layers.0.mlp.extra_proj.weight";
    let err = convert_error(|d| {
        edit_tensors(d, |t| {
            t.insert(name.into(), (Dtype::F32, vec![2], vec![0; 8]));
        })
    });
    assert_mentions(&err, &["unexpected tensor", name, "model.safetensors"]);
}

#[test]
fn misshaped_tensor() {
    let name = "language_model.model.layers.0.self_attn.k_proj.weight";
    let err = convert_error(|d| {
        edit_tensors(d, |t| {
            let e = t.get_mut(name).unwrap();
            e.1 = vec![128, 256];
            e.2.truncate(128 * 256 * 4);
        })
    });
    assert_mentions(&err, &[name, "shape", "[128, 256]"]);
}

#[test]
fn unknown_dtype() {
    let name = "language_model.model.norm.weight";
    let err = convert_error(|d| {
        edit_tensors(d, |t| {
            let e = t.get_mut(name).unwrap();
            e.0 = Dtype::I32;
        })
    });
    assert_mentions(&err, &[name, "I32"]);
}

#[test]
fn nan_in_weights() {
    let name = "language_model.model.layers.0.mlp.up_proj.weight";
    let err = convert_error(|d| {
        edit_tensors(d, |t| {
            t.get_mut(name).unwrap().2[400..404].copy_from_slice(&f32::NAN.to_le_bytes());
        })
    });
    assert_mentions(&err, &[name, "non-finite", "NaN", "index 100"]);
}

#[test]
fn unused_tensors_may_hold_garbage() {
    // The authors' saver leaves the last vision block, post_layernorm and head uninitialised: they are dropped
    // unread, so NaN there is fine (the bf16 fixture has exactly that).
    let out = tempfile::tempdir().unwrap();
    let opts = options(&fixtures::model_dir("bf16-padvocab"), out.path(), LlmType::Q8_0, MmprojType::F16);
    let c = asagi_convert::plan(&opts).unwrap();
    asagi_convert::write(&c, &opts, &AtomicBool::new(false)).unwrap();
}

#[test]
fn truncated_safetensors() {
    let err = convert_error(|d| {
        let p = d.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
    });
    assert_mentions(&err, &["model.safetensors", "truncated"]);
}

#[test]
fn corrupt_safetensors_header() {
    let err = convert_error(|d| {
        let p = d.join("model.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        b[8..20].copy_from_slice(b"not a header");
        std::fs::write(&p, &b).unwrap();
    });
    assert_mentions(&err, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn missing_config_key() {
    let err = convert_error(|d| {
        edit_json(&d.join("config.json"), |v| {
            v["text_config"].as_object_mut().unwrap().remove("hidden_size");
        })
    });
    assert_mentions(&err, &["config.json", "text_config.hidden_size"]);
}

#[test]
fn missing_tokenizer_file() {
    let err = convert_error(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    assert_mentions(&err, &["tokenizer.json"]);
}

#[test]
fn not_an_asagi_folder() {
    let err = convert_error(|d| edit_json(&d.join("config.json"), |v| v["model_type"] = "llama".into()));
    assert_mentions(&err, &["config.json", "llava"]);
    let err = convert_error(|d| std::fs::remove_file(d.join("config.json")).unwrap());
    assert_mentions(&err, &["config.json"]);
}

#[test]
fn cli_reports_errors_on_one_line_with_exit_code_1() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| common::asagi_gguf().args(args).current_dir(tmp.path()).output().unwrap();
    let out = run(&["convert", tmp.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("config.json") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let out = run(&["convert", "x", "--outtype", "q3_k"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}
