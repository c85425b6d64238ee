//! The official `openai` Python client (installed from PyPI into a venv the test makes under the target
//! directory, pinned) streams a chat with an image from `serve` and gets the text `run` prints. If the client
//! cannot be installed the test fails: it never passes without having run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use common::server::{run_json, Server};
use serde_json::Value;

const OPENAI: &str = "openai==3.57.0";

/// A venv with the pinned client, made once per target directory.
fn venv_python() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = dir.join("bin/python");
    let has = |p: &Path| Command::new(p).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has(&python) {
        let made = Command::new("python3").args(["-m", "venv", "--clear"]).arg(&dir).output();
        let made = made.unwrap_or_else(|e| panic!("python3 -m venv: {e} (install python3 and python3-venv)"));
        assert!(made.status.success(), "python3 -m venv failed: {}", String::from_utf8_lossy(&made.stderr));
        let pip = Command::new(&python).args(["-m", "pip", "install", "-q", OPENAI]).output().unwrap();
        assert!(pip.status.success(), "pip install {OPENAI} failed: {}", String::from_utf8_lossy(&pip.stderr));
    }
    assert!(has(&python), "the venv at {} cannot import openai", dir.display());
    python
}

#[test]
fn the_openai_client_streams_what_run_prints() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::base_f32(dir.path());
    let image = fixtures::root().join("images/rgb_80x60.png");
    let question = "この画像は何ですか";
    let image_arg = image.to_str().unwrap();
    let run = run_json(&llm, &mmproj, &["--greedy", "-n", "8", "-c", "1024", "-p", question, "--image", image_arg]);

    let mut server = Server::start(&llm, &mmproj, &["--greedy", "-n", "8", "-c", "1024", "--api-key", "test-key"]);
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_chat.py"))
        .arg(server.port.to_string())
        .arg(&image)
        .arg(question)
        .arg("test-key")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\nserver: {}", String::from_utf8_lossy(&out.stderr), server.log());
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = run["text"].as_str().unwrap();
    assert_eq!(got["streamed"], text, "{got}");
    assert_eq!(got["plain"], text, "{got}");
    assert!(got["events"].as_u64().unwrap() >= 2, "streamed in pieces: {got}");
    assert_eq!(got["completion_tokens"].as_u64(), Some(run["tokens"].as_array().unwrap().len() as u64));
    assert!(got["finish"] == "stop" || got["finish"] == "length", "{got}");
    server.assert_healthy("the openai client");
}
