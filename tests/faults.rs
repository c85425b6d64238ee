//! Fault tests: what the program leaves behind and says when the world fails under it. `convert` killed at
//! random points, writing to a full disk, a shard that cannot be read mid-way; a model file modified in place
//! while `serve` runs; the SIGBUS of a mapped file that was truncated.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use common::asagi_gguf;
use common::server::Server;

/// `synth --size tiny` into `dir/hf` (several shards of at most `shard_mb`).
fn tiny_checkpoint(dir: &Path, shard_mb: usize) -> PathBuf {
    let hf = dir.join("hf");
    let out = asagi_gguf()
        .args(["synth", "--size", "tiny", "--shard-mb", &shard_mb.to_string(), "--out"])
        .arg(&hf)
        .output()
        .unwrap();
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    hf
}

/// `convert hf` to `out/llm.gguf` and `out/mmproj.gguf`, Q8_0, one thread.
fn convert_cmd(hf: &Path, out: &Path) -> Command {
    let mut c = asagi_gguf();
    c.arg("convert").arg(hf).args(["--outtype", "q8_0", "-t", "1", "-o"]).arg(out.join("llm.gguf"));
    c.arg("--mmproj-outfile").arg(out.join("mmproj.gguf"));
    c
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn ggufs(dir: &Path) -> Vec<String> {
    names(dir).into_iter().filter(|n| n.ends_with(".gguf")).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The language model and mmproj written by a conversion open and run (a one-token answer).
fn assert_runs(out: &Path) {
    let o = asagi_gguf()
        .args(["run", "-t", "1", "-n", "1", "--greedy", "-p", "こんにちは", "-m"])
        .arg(out.join("llm.gguf"))
        .output()
        .unwrap();
    assert!(o.status.success(), "run on the converted model: {}", stderr(&o));
}

/// A tiny checkpoint converted once, uninterrupted, into `dir/out`: the folder, the checkpoint, the output
/// folder and how long the conversion took.
fn converted_once() -> (tempfile::TempDir, PathBuf, PathBuf, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_checkpoint(dir.path(), 4096);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let t = Instant::now();
    let o = convert_cmd(&hf, &out).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    (dir, hf, out, t.elapsed())
}

#[test]
fn convert_killed_at_random_points_leaves_no_gguf_and_the_next_run_succeeds() {
    // How long an uninterrupted conversion takes here, to spread the kills over it.
    let (_dir, hf, out, full) = converted_once();
    for f in ggufs(&out) {
        std::fs::remove_file(out.join(f)).unwrap();
    }

    // (Between the two final renames lies a window of one rename(2) call, ~1e-4 of the run: a kill there would
    // leave the mmproj alone. Every other point leaves no .gguf.)
    let (mut rng, seed) = common::rng();
    for i in 0..8 {
        let at = full.mul_f64(rng.random_range(0.0..1.0));
        let mut child = convert_cmd(&hf, &out).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(at);
        child.kill().unwrap(); // SIGKILL: no handler runs, no cleanup.
        child.wait().unwrap();
        let left = ggufs(&out);
        if left == ["llm.gguf", "mmproj.gguf"] {
            // Done before the kill (the kill may still land while the process exits): a complete pair. The next
            // round starts from nothing.
            for f in left {
                std::fs::remove_file(out.join(f)).unwrap();
            }
            continue;
        }
        assert!(left.is_empty(), "round {i} (killed after {at:?} of {full:?}, seed {seed}): left {left:?}");
    }
    // The next run overwrites any .part file the kills left and succeeds.
    let o = convert_cmd(&hf, &out).output().unwrap();
    assert!(o.status.success(), "after the kills: {}", stderr(&o));
    assert_eq!(ggufs(&out), ["llm.gguf", "mmproj.gguf"]);
    assert!(!names(&out).iter().any(|n| n.ends_with(".part")), "{:?}", names(&out));
    assert_runs(&out);
}

/// Runs `convert` with its output folder on a tmpfs of `kb` KiB, mounted in a private mount namespace (`unshare`,
/// util-linux; no root needed, nothing to unmount). Returns the conversion's exit status, its stderr and the
/// folder's listing right after it.
fn convert_on_small_disk(hf: &Path, work: &Path, kb: u64) -> (bool, String, Vec<String>) {
    let out = work.join("small");
    std::fs::create_dir_all(&out).unwrap();
    let convert = convert_cmd(hf, &out);
    let mut words: Vec<String> = vec![convert.get_program().to_string_lossy().into_owned()];
    words.extend(convert.get_args().map(|a| a.to_string_lossy().into_owned()));
    let quoted: Vec<String> = words.iter().map(|w| format!("'{}'", w.replace('\'', r"'\''"))).collect();
    let script = format!(
        "mount -t tmpfs -o size={kb}k tmpfs '{out}' || exit 90; {cmd} 2>'{work}/err'; echo \"rc=$?\"; ls -A '{out}'",
        out = out.display(),
        work = work.display(),
        cmd = quoted.join(" ")
    );
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("this test needs `unshare` (util-linux) to mount a small tmpfs: {e}"));
    assert_ne!(o.status.code(), Some(90), "cannot mount a tmpfs in a user namespace here: {}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = text.lines();
    let rc = lines.next().unwrap_or_else(|| panic!("no output from the namespace: {}", stderr(&o)));
    let listing = lines.map(String::from).collect();
    (rc == "rc=0", std::fs::read_to_string(work.join("err")).unwrap_or_default(), listing)
}

#[test]
fn convert_to_a_full_disk_fails_with_a_clear_error_and_no_partial_file() {
    let (dir, hf, out, _) = converted_once();
    let llm_kb = std::fs::metadata(out.join("llm.gguf")).unwrap().len() / 1024;
    let mm_kb = std::fs::metadata(out.join("mmproj.gguf")).unwrap().len() / 1024;
    assert!(mm_kb > 64, "the mmproj ({mm_kb} KiB) must not fit in the 64 KiB left over below");

    // Full in the language model; and full only in the mmproj, after the language model was written whole.
    for (kb, failing) in [(llm_kb / 2, "llm.gguf.part"), (llm_kb + 64, "mmproj.gguf.part")] {
        let (ok, err, listing) = convert_on_small_disk(&hf, dir.path(), kb);
        assert!(!ok, "{kb} KiB: the conversion succeeded");
        assert!(err.contains("No space left on device") && err.contains(failing), "{kb} KiB: {err}");
        assert!(listing.is_empty(), "{kb} KiB: left {listing:?} ({err})");
    }
}

/// `kill -SIG pid`.
fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

#[test]
fn a_shard_that_becomes_unreadable_mid_way_is_an_error_naming_it() {
    for attempt in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let hf = tiny_checkpoint(dir.path(), 1);
        let shards: Vec<PathBuf> =
            names(&hf).iter().filter(|n| n.ends_with(".safetensors")).map(|n| hf.join(n)).collect();
        assert!(shards.len() >= 3, "{shards:?}");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut child = convert_cmd(&hf, &out).stderr(Stdio::piped()).spawn().unwrap();
        // Stop it as soon as it starts writing the language model: the shards were opened and their headers
        // checked, little or no tensor data was read yet.
        let part = out.join("llm.gguf.part");
        let t = Instant::now();
        while !part.exists() && t.elapsed() < Duration::from_secs(60) && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_micros(200));
        }
        signal(&child, "-STOP");
        if out.join("mmproj.gguf.part").exists() || child.try_wait().unwrap().is_some() {
            // Too late (the machine was busy): the language model was done already. Again.
            signal(&child, "-CONT");
            let _ = child.wait();
            eprintln!("attempt {attempt}: stopped too late, again");
            continue;
        }
        // Every shard loses its data (the header stays): the next tensor read fails, whichever shard it is in.
        for s in &shards {
            let bytes = std::fs::read(s).unwrap();
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            std::fs::OpenOptions::new().write(true).open(s).unwrap().set_len(header as u64).unwrap();
        }
        signal(&child, "-CONT");
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "converted from truncated shards: {err}");
        assert!(o.status.code().is_some(), "killed by a signal ({:?}), not an error: {err}", o.status);
        assert!(
            err.contains(".safetensors") && err.contains("cannot read tensor") && err.contains("ended early"),
            "{err}"
        );
        assert!(names(&out).is_empty(), "left {:?}", names(&out));
        return;
    }
    panic!("five attempts stopped the conversion too late");
}

#[test]
fn serve_refuses_work_once_its_model_file_is_modified_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::base_f32(dir.path());
    let ask = json!({"messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 2});
    // In place: as `cp other.gguf model.gguf` or a download over the file starts, by truncating it.
    let truncate = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(4096).unwrap();

    // Replaced by renaming a new file over it: safe, the server keeps the file it loaded (the old inode), and
    // whatever then happens to the new file is not its concern.
    let server = Server::start(&llm, &mmproj, &["--greedy"]);
    assert_eq!(server.post(&ask).0, 200, "{}", server.log());
    let fresh = dir.path().join("new.gguf");
    std::fs::copy(&llm, &fresh).unwrap();
    std::fs::rename(&fresh, &llm).unwrap();
    assert_eq!(server.post(&ask).0, 200, "after a rename over the file: {}", server.log());
    truncate(&llm);
    assert_eq!(server.post(&ask).0, 200, "after truncating the file that replaced it: {}", server.log());
    drop(server);

    // The loaded file itself modified in place: the weights in use may be gone. Refused, the server lives on.
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let (llm, mmproj) = common::conversion::base_f32(&second);
    let mut server = Server::start(&llm, &mmproj, &["--greedy"]);
    assert_eq!(server.post(&ask).0, 200, "{}", server.log());
    truncate(&llm);
    let (status, body) = server.post(&ask);
    assert_eq!(status, 503, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("modified on disk") && msg.contains("renaming"), "{msg}");
    let health = common::server::client(Duration::from_secs(10)).get(server.url("/health")).send().unwrap();
    assert_eq!(health.status().as_u16(), 503);
    assert!(server.alive(), "the server died: {}", server.log());
}

/// Maps `ASAGI_SIGBUS_FILE`, truncates it and reads the mapped bytes: dies of SIGBUS (see the test below).
#[test]
#[ignore = "run by sigbus_on_a_truncated_map_names_the_file, in a child process"]
fn sigbus_child() {
    let Ok(path) = std::env::var("ASAGI_SIGBUS_FILE") else { return };
    let map = ggml::MappedFile::open(&path).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    let last = std::hint::black_box(map.bytes()[map.bytes().len() - 1]);
    println!("read {last} from a truncated map");
}

#[test]
fn sigbus_on_a_truncated_map_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
    // The test binary again, through the emulator when cross-testing.
    let o = common::target_program(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "sigbus_child", "--nocapture", "--test-threads", "1"])
        .env("ASAGI_SIGBUS_FILE", &path)
        .output()
        .unwrap();
    let err = stderr(&o);
    use std::os::unix::process::ExitStatusExt;
    assert!(!o.status.success(), "the read of a truncated map succeeded: {}", String::from_utf8_lossy(&o.stdout));
    assert!(
        err.contains(&format!("fatal: {} was truncated or rewritten on disk while in use", path.display())),
        "{err}"
    );
    // Under qemu the signal reaches us as qemu's own exit; natively it is SIGBUS, as without the handler.
    if std::env::var("ASAGI_TEST_RUNNER").is_err() {
        assert_eq!(o.status.signal(), Some(7), "{:?}", o.status);
    }
}
