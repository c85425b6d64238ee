//! Starting `asagi-gguf serve` for a test and talking to it over real TCP: raw bytes for the attacks, an
//! HTTP/1.1 client (reqwest) that reads streamed responses as they arrive.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    child: Child,
    pub port: u16,
    /// `--api-key`'s value, if the server was started with one: sent by `stats`.
    key: Option<String>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `serve -m llm --mmproj mmproj -t 1` plus `args`, on a port the system picks (`--port 0`: a port picked here
    /// and passed on could be taken by another test's listener in between); waits until it says it listens.
    /// One thread: the harness runs two tests at once on CI's two cores, and two 2-thread servers there left ggml's
    /// spinning barriers waiting out scheduler time slices (tests/serve.rs: 55 s with 2 threads, 3 s with 1). The
    /// answers compared with `run` (2 threads) also check that the thread count does not change them.
    pub fn start(llm: &Path, mmproj: &Path, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let child = super::asagi_gguf()
            .args(["serve", "-t", "1", "--port", "0", "--mmproj"])
            .arg(mmproj)
            .arg("-m")
            .arg(llm)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let key = args.windows(2).find(|w| w[0] == "--api-key").map(|w| w[1].to_string());
        let mut server = Server { child, port: 0, key, log, _dir: dir };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            // "listening on http://HOST:PORT (...)", printed once the socket is bound.
            let log = server.log();
            if let Some(rest) = log.lines().find_map(|l| l.strip_prefix("listening on http://")) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                server.port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{log}"));
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("serve exited with {status}: {}", server.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve did not start listening within 60 s: {}", server.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /health` answers 200 within a second (on a new connection), and the process is still running.
    pub fn assert_healthy(&mut self, after: &str) {
        assert!(self.alive(), "the server died after {after}: {}", self.log());
        let t = Instant::now();
        let r = client(Duration::from_secs(1)).get(self.url("/health")).send();
        match r {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => panic!("/health answered {} after {after}", r.status()),
            Err(e) => panic!("/health did not answer within 1 s after {after} ({:?}): {e}", t.elapsed()),
        }
    }

    pub fn stats(&self) -> Value {
        let mut r = client(Duration::from_secs(5)).get(self.url("/stats"));
        if let Some(key) = &self.key {
            r = r.bearer_auth(key);
        }
        r.send().unwrap().json().unwrap()
    }

    /// Polls `/stats` until `f` holds (or panics after `secs`).
    pub fn wait_stats(&self, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let s = self.stats();
            if f(&s) {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// POST a chat completion; (status, body as JSON).
    pub fn post(&self, body: &Value) -> (u16, Value) {
        let r = client(Duration::from_secs(300)).post(self.url("/v1/chat/completions")).json(body).send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    /// The answer text of a request that must succeed.
    pub fn answer(&self, body: &Value) -> String {
        let (status, v) = self.post(body);
        assert_eq!(status, 200, "{body}: {v}");
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }

    /// Sends raw bytes on a new connection and reads what comes back within `wait` (until the server closes).
    pub fn raw(&self, bytes: &[u8], wait: Duration) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// `run --json -t 2 --mmproj MMPROJ -m LLM ARGS...` (one question, as the CLI answers it): its JSON.
pub fn run_json(llm: &Path, mmproj: &Path, args: &[&str]) -> Value {
    let out = super::asagi_gguf()
        .args(["run", "--json", "-t", "2", "--mmproj"])
        .arg(mmproj)
        .arg("-m")
        .arg(llm)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn client(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(timeout).build().unwrap()
}

/// The status code of a raw HTTP response text (0 if none).
pub fn status_of(response: &str) -> u16 {
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A streamed chat completion read event by event: each `data:` payload with the time it arrived.
pub struct SseReader {
    reader: std::io::BufReader<reqwest::blocking::Response>,
    pub start: Instant,
}

impl SseReader {
    pub fn open(server: &Server, body: &Value) -> SseReader {
        let start = Instant::now();
        let r = client(Duration::from_secs(300)).post(server.url("/v1/chat/completions")).json(body).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        SseReader { reader: std::io::BufReader::new(r), start }
    }

    /// The next data payload (keep-alive comments skipped), or None at the end.
    pub fn next(&mut self) -> Option<(String, Duration)> {
        use std::io::BufRead;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some((d.to_string(), self.start.elapsed()));
            }
        }
    }

    /// The rest of the stream: (text of the content deltas, finish reason, number of content events).
    pub fn rest(&mut self) -> (String, String, usize) {
        let (mut text, mut reason, mut n) = (String::new(), String::new(), 0);
        while let Some((d, _)) = self.next() {
            if d == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                if !c.is_empty() {
                    text.push_str(c);
                    n += 1;
                }
            }
            if let Some(r) = v["choices"][0]["finish_reason"].as_str() {
                reason = r.to_string();
            }
        }
        (text, reason, n)
    }
}
