//! A model split across machines with ggml's RPC backend, on loopback: two `asagi-gguf rpc-server`s started here
//! hold the language model's blocks (`--rpc`, `--tensor-split`), this process the embeddings, the output layer and
//! the vision encoder. The split gives the same logits and tokens as this machine alone; a server that dies
//! mid-answer, one that is not there and one of another protocol are clear errors, never a crash or a hang; `serve`
//! outlives its server. Everything a test starts, it stops (`Drop`).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::server::{client, Server, SseReader};
use serde_json::{json, Value};

/// A free port on 127.0.0.1 (bound, then released for the process started next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `asagi-gguf rpc-server` on a free loopback port, killed on drop.
struct RpcServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RpcServer {
    fn start() -> RpcServer {
        // The free port can be taken again before the server binds it (by another test's relay): the server
        // then exits at once, and another port is tried.
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("rpc.log");
            let child = common::asagi_gguf()
                .args(["rpc-server", "-t", "1", "--port", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut s = RpcServer { child, port, log, _dir: dir };
            let t = Instant::now();
            // The server says its protocol once it has checked that the port is free (then ggml binds it), and
            // listens once a connection is accepted (the server drops a client that sends nothing).
            let said = |s: &RpcServer| std::fs::read_to_string(&s.log).unwrap_or_default().contains("RPC protocol");
            while !(said(&s) && TcpStream::connect(("127.0.0.1", port)).is_ok())
                && s.child.try_wait().unwrap().is_none()
            {
                assert!(t.elapsed() < Duration::from_secs(60), "rpc-server did not listen on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
            if s.child.try_wait().unwrap().is_none() {
                return s;
            }
            eprintln!("rpc-server on {port} exited: {}", std::fs::read_to_string(&s.log).unwrap_or_default());
        }
        panic!("no rpc-server could be started");
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The base fixture converted to F32, in a folder of its own.
fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = common::conversion::base_f32(dir.path());
    (dir, llm, mmproj)
}

fn image() -> PathBuf {
    common::fixtures::root().join("images/gray_70x50.png")
}

/// `asagi-gguf run` with the fixture and an image; (exit status, stdout, stderr).
fn run(llm: &Path, mmproj: &Path, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = common::asagi_gguf()
        .args(["run", "-t", "2", "-c", "256", "--cache-type", "f32", "--no-prefix-cache", "--mmproj"])
        .arg(mmproj)
        .arg("-m")
        .arg(llm)
        .arg("--image")
        .arg(image())
        .args(["-p", "この画像について説明してください。"])
        .args(args)
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn run_ok(llm: &Path, mmproj: &Path, args: &[&str]) -> (String, String) {
    let (status, out, err) = run(llm, mmproj, args);
    assert!(status.success(), "run {args:?}: {status}: {err}");
    (out, err)
}

/// Blocks 0 and 1 of the fixture on two servers, the embeddings, the output layer and the vision encoder here:
/// the logits after the prompt (its image and text through both servers' blocks and caches) within 1e-6 of this
/// machine alone, and the same greedy and beam-search tokens.
#[test]
fn split_across_two_servers_answers_as_this_machine_alone() {
    let (dir, llm, mmproj) = fixture();
    let (a, b) = (RpcServer::start(), RpcServer::start());
    let rpc = format!("{},{}", a.endpoint(), b.endpoint());
    let split = ["--rpc", &rpc, "--tensor-split", "0,1,1"];

    let logits = |name: &str, extra: &[&str]| {
        let path = dir.path().join(name);
        let mut args = vec!["--greedy", "-n", "4", "--dump-logits", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (_, err) = run_ok(&llm, &mmproj, &args);
        (common::npy::read(&path).as_f32(), err)
    };
    let (here, _) = logits("here.npy", &[]);
    let (there, log) = logits("split.npy", &split);
    // The servers got the two blocks' weights (about 2 MB of F32 each) and sent activations back.
    let traffic = log.lines().find(|l| l.starts_with("rpc traffic")).unwrap_or_else(|| panic!("{log}"));
    let mb: Vec<f64> = traffic.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(mb.len() >= 2 && mb[0] > 2.0 && mb[1] > 0.0, "{traffic}");
    assert!(
        log.contains(&format!("split: block 0 on RPC server {}, block 1 on RPC server {}", a.endpoint(), b.endpoint())),
        "{log}"
    );
    assert_eq!(here.len(), there.len());
    assert!(here.len() >= 1000, "the logits of the prompt's last position: {}", here.len());
    let num: f64 = here.iter().zip(&there).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = here.iter().map(|x| (*x as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    eprintln!("prompt logits, split vs here: relative RMS difference {rel:.3e}");
    assert!(rel <= 1e-6, "relative difference {rel:e}");

    for decoding in [&["--greedy", "-n", "24"][..], &["--num-beams", "3", "--temp", "0", "-n", "24"][..]] {
        let tokens = |extra: &[&str]| {
            let mut args = vec!["--json"];
            args.extend_from_slice(decoding);
            args.extend_from_slice(extra);
            let v: Value = serde_json::from_str(&run_ok(&llm, &mmproj, &args).0).unwrap();
            v["tokens"].clone()
        };
        let (here, there) = (tokens(&[]), tokens(&split));
        assert!(here.as_array().unwrap().len() >= 8, "{decoding:?}: {here}");
        assert_eq!(here, there, "{decoding:?}");
    }

    // A split by the memory the devices report (all three here are this machine: a third each, rounded to
    // blocks), and this machine's share of it.
    let (_, log) = run_ok(&llm, &mmproj, &["--greedy", "-n", "4", "--rpc", &rpc]);
    assert!(log.contains(&format!("split: block 0 here, block 1 on RPC server {}", a.endpoint())), "{log}");
}

/// A server killed while the answer is being written: `run` stops with an error naming it, within seconds, with
/// its exit code (not a signal); the other server is left for the next client.
#[test]
fn a_server_killed_mid_answer_is_an_error_not_a_crash() {
    let (_dir, llm, mmproj) = fixture();
    let (a, mut b) = (RpcServer::start(), RpcServer::start());
    let rpc = format!("{},{}", a.endpoint(), b.endpoint());
    let mut child = common::asagi_gguf()
        .args(["run", "-t", "2", "-c", "512", "--no-prefix-cache", "--greedy", "-n", "440", "--min-tokens", "440"])
        .args(["-p", "こんにちは", "--rpc", &rpc, "--tensor-split", "0,1,1", "-m"])
        .arg(&llm)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The answer has begun: kill the server holding block 1.
    let mut first = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    b.kill();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("run did not end within 30 s of the server's death");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    eprintln!("ended {:?} after the kill: {}", t.elapsed(), err.lines().last().unwrap_or(""));
    assert_eq!(status.code(), Some(1), "an error exit, not a signal: {status}: {err}");
    let want = format!("error: RPC server {}: the connection closed while", b.endpoint());
    assert!(err.contains(&want) && err.contains("the server stopped or crashed"), "{err}");

    // The surviving server serves the next client.
    let (_, log) = run_ok(&llm, &mmproj, &["--greedy", "-n", "4", "--rpc", &a.endpoint(), "--tensor-split", "1,1"]);
    assert!(log.contains("split: block 0 here, block 1 on RPC server"), "{log}");
}

/// Nothing listening, something that is not an RPC server, a server of another protocol version, a bad address:
/// each an error naming the server and what is wrong, within seconds.
#[test]
fn unreachable_and_foreign_servers_are_clear_errors() {
    let (_dir, llm, mmproj) = fixture();
    let fail = |rpc: &str, want: &str| {
        let t = Instant::now();
        let (status, _, err) = run(&llm, &mmproj, &["--greedy", "-n", "4", "--rpc", rpc]);
        assert_eq!(status.code(), Some(1), "--rpc {rpc}: {err}");
        assert!(err.contains(want), "--rpc {rpc}: want {want:?} in: {err}");
        assert!(t.elapsed() < Duration::from_secs(30), "--rpc {rpc}: {:?}", t.elapsed());
    };
    let port = free_port();
    fail(&format!("127.0.0.1:{port}"), &format!("RPC server 127.0.0.1:{port}: cannot connect"));
    fail("127.0.0.1", "--rpc 127.0.0.1: expected HOST:PORT");
    fail("127.0.0.1:http", "expected HOST:PORT, with a port number");

    // Fake servers: one answers the handshake as protocol 6.1.0 would, one hangs up, one answers like an HTTP
    // server, one says nothing at all (as an RPC server busy with another client).
    enum Fake {
        Reply(Vec<u8>),
        HangUp,
        Silent,
        /// A protocol-7.0 server (handshake right) whose later replies all hold this value, in replies of the
        /// right size or (true) of a wrong one.
        Lies(u64, bool),
    }
    let fake = |how: Fake| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut hello = [0u8; 33];
                let _ = s.read_exact(&mut hello);
                match &how {
                    Fake::Reply(r) => {
                        let _ = s.write_all(r);
                        held.push(s);
                    }
                    Fake::HangUp => drop(s),
                    Fake::Silent => held.push(s),
                    Fake::Lies(value, wrong_size) => {
                        let mut hello = 28u64.to_le_bytes().to_vec();
                        hello.extend_from_slice(&[7, 0, 0, 0]);
                        hello.extend_from_slice(&[0; 24]);
                        let _ = s.write_all(&hello);
                        // Every command read whole; DEVICE_COUNT told 1, every other command that has a reply
                        // (protocol 7.0's sizes) told the value.
                        loop {
                            let mut head = [0u8; 9];
                            if s.read_exact(&mut head).is_err() {
                                break;
                            }
                            let mut body = vec![0u8; u64::from_le_bytes(head[1..].try_into().unwrap()) as usize];
                            let _ = s.read_exact(&mut body);
                            let size: usize = match head[0] {
                                15 => {
                                    let _ = s.write_all(&[&4u64.to_le_bytes()[..], &1u32.to_le_bytes()].concat());
                                    continue;
                                }
                                0 | 11 => 16,
                                1..=3 | 13 => 8,
                                7 | 9 => 1,
                                8 => u64::from_le_bytes(body[body.len() - 8..].try_into().unwrap()) as usize,
                                _ => continue,
                            };
                            let size = if *wrong_size { size + 1 } else { size };
                            let mut reply = (size as u64).to_le_bytes().to_vec();
                            reply.extend((0..size).map(|i| value.to_le_bytes()[i % 8]));
                            let _ = s.write_all(&reply);
                        }
                    }
                }
            }
        });
        port
    };
    let mut v6 = 28u64.to_le_bytes().to_vec();
    v6.extend_from_slice(&[6, 1, 0, 0]);
    v6.extend_from_slice(&[0; 24]);
    let p = fake(Fake::Reply(v6));
    fail(&format!("127.0.0.1:{p}"), "speaks RPC protocol 6.1.0, this build 7.0.0");
    let p = fake(Fake::HangUp);
    fail(&format!("127.0.0.1:{p}"), "closed the connection during the RPC handshake");
    let p = fake(Fake::Reply(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()));
    fail(&format!("127.0.0.1:{p}"), "not an RPC server of protocol 7.0.0");
    let p = fake(Fake::Silent);
    fail(&format!("127.0.0.1:{p}"), "no answer to the RPC handshake within 10 s");
    // Past the handshake, a reply of the wrong size (the memory query wants 16 bytes), and a value ggml would trip
    // over (an alignment of 3): the server counts as failed, the client neither crashes nor hangs.
    let p = fake(Fake::Lies(0, true));
    fail(&format!("127.0.0.1:{p}"), "the server sent a reply of 17 bytes to GET_DEVICE_MEMORY, expected 16");
    let p = fake(Fake::Lies(3, false));
    fail(&format!("127.0.0.1:{p}"), "the server sent an alignment of 3 in reply to GET_ALIGNMENT");

    // Shares that do not match the devices.
    let a = RpcServer::start();
    fail(&format!("{},{}", a.endpoint(), a.endpoint()), "twice");
    let (status, _, err) =
        run(&llm, &mmproj, &["--greedy", "-n", "4", "--rpc", &a.endpoint(), "--tensor-split", "1,1,1"]);
    assert!(!status.success() && err.contains("--tensor-split has 3 shares for 2 devices"), "{err}");
}

/// `rpc-server` listens on loopback unless told otherwise; a host name is resolved; a taken port is an error.
#[test]
fn rpc_server_refuses_an_open_address_without_expose() {
    let out = common::asagi_gguf().args(["rpc-server", "--host", "0.0.0.0", "--port", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("--host 0.0.0.0 is not a loopback address") && err.contains("--expose"), "{err}");
    // A name is resolved (ggml's server itself takes IPv4 addresses only).
    let port = free_port();
    let mut named = common::asagi_gguf()
        .args(["rpc-server", "--host", "localhost", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(named.try_wait().unwrap().is_none(), "rpc-server --host localhost exited");
        assert!(t.elapsed() < Duration::from_secs(60), "rpc-server --host localhost did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = named.kill();
    let _ = named.wait();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = common::asagi_gguf().args(["rpc-server", "--port", &port]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
}

/// `serve --rpc`: the server holding block 1 dies during a streamed answer. The answer ends with an error event,
/// the HTTP server stays up, `/health` and new requests answer 503 naming the dead server.
#[test]
fn serve_outlives_its_rpc_server() {
    let (_dir, llm, mmproj) = fixture();
    let mut b = RpcServer::start();
    let mut server = Server::start(&llm, &mmproj, &["--rpc", &b.endpoint(), "--tensor-split", "1,1", "-c", "512"]);
    let ask = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 400, "min_tokens": 400,
               "num_beams": 1, "temperature": 1.5, "seed": 3, "stream": stream})
    };
    assert_eq!(server.post(&json!({"messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 4})).0, 200);

    let mut sse = SseReader::open(&server, &ask(true));
    sse.next().expect("a first event");
    // The role chunk comes before admission; a text delta proves the answer is being generated.
    sse.next().expect("a second event");
    b.kill();
    let t = Instant::now();
    let mut events = Vec::new();
    while let Some((d, _)) = sse.next() {
        events.push(d);
    }
    assert!(t.elapsed() < Duration::from_secs(30), "the stream ended {:?} after the kill", t.elapsed());
    let error = events.iter().find(|e| e.contains("\"error\"")).unwrap_or_else(|| panic!("no error event: {events:?}"));
    assert!(error.contains(&format!("RPC server {}", b.endpoint())), "{error}");
    assert!(server.alive(), "serve died: {}", server.log());

    let r = client(Duration::from_secs(5)).get(server.url("/health")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().unwrap().contains(&format!("RPC server {}", b.endpoint())));
    let (status, v) = server.post(&ask(false));
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("restart the server"), "{v}");
    assert!(server.alive());
}
