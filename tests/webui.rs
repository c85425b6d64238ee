//! The chat page (`GET /`) in a real browser: Debian's Chromium, headless, driven through WebDriver (chromedriver,
//! with the `fantoccini` client) and the DevTools protocol (for IME composition, which WebDriver cannot type), against
//! `serve` on the demo's tiny model with `--api-key`. What a user does: gives the key when asked, attaches images by
//! file picker, paste and drag-and-drop, types a question through an IME (Enter inside a composition must not
//! send), sends, watches the answer stream, stops a long answer, asks a follow-up that the prefix cache serves, sees
//! the API's errors (a bad image, a request over the context, a busy server), uses the page behind a reverse proxy
//! under a path. A screenshot is saved under target/tmp/webui/.
//!
//! Without Chromium and chromedriver the test fails and says what to install: it never passes without a browser.
//! The emulated ARM leg of CI leaves it out (`--cfg asagi_no_browser`): the page is the same bytes on every
//! architecture, and the x86-64 leg runs it.
#![cfg(not(asagi_no_browser))]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{client, status_of, Server};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const KEY: &str = "open-sesame";

/// chromedriver on a free port. Chromium is ended by closing the session (`Browser`'s drop, also on a panic), then
/// chromedriver is killed.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(var: &str, default: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
    assert!(
        p.is_file(),
        "the web UI test needs {what}, not found at {} (Debian: apt install chromium chromium-driver; or set {var})",
        p.display()
    );
    p
}

impl Driver {
    fn start() -> Driver {
        let exe = program("ASAGI_CHROMEDRIVER", "/usr/bin/chromedriver", "ChromeDriver");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let driver = Driver { child, port };
        let t = Instant::now();
        let http = client(Duration::from_secs(2));
        while t.elapsed() < Duration::from_secs(20) {
            let status = http.get(format!("http://127.0.0.1:{port}/status")).send().ok().and_then(|r| r.json().ok());
            if status.is_some_and(|v: Value| v["value"]["ready"] == true) {
                return driver;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("chromedriver did not become ready on port {port}");
    }
}

/// A browser session, driven synchronously from the test (the server helpers use a blocking HTTP client, which
/// must not run inside the async runtime).
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Client,
    cdp_url: String,
}

impl Drop for Browser {
    /// Ends the session, which makes chromedriver quit Chromium (on a failed assertion too).
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.client.clone().close());
    }
}

impl Browser {
    fn open(driver: &Driver, profile: &Path) -> Browser {
        let chromium = program("ASAGI_CHROMIUM", "/usr/bin/chromium", "Chromium");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let caps = json!({"goog:chromeOptions": {"binary": chromium, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-breakpad",
            "--disable-crash-reporter", "--window-size=1000,1250",
            "--lang=ja", format!("--user-data-dir={}", profile.display())]}});
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps.as_object().unwrap().clone())
                    .connect(&format!("http://127.0.0.1:{}", driver.port)),
            )
            .expect("starting Chromium through chromedriver");
        let session = rt.block_on(client.session_id()).unwrap().expect("a session id");
        let cdp_url = format!("http://127.0.0.1:{}/session/{session}/goog/cdp/execute", driver.port);
        Browser { rt, client, cdp_url }
    }

    /// Runs a script in the page (`arguments[i]` are `args`) and returns its value.
    fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt.block_on(self.client.execute(script, args)).unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// An asynchronous script: it calls `arguments[arguments.length - 1]` with its result.
    fn js_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt.block_on(self.client.execute_async(script, args)).unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// A DevTools protocol command (chromedriver's `goog/cdp/execute`).
    fn cdp(&self, cmd: &str, params: Value) {
        let r = client(Duration::from_secs(10)).post(&self.cdp_url).json(&json!({"cmd": cmd, "params": params})).send();
        let r = r.unwrap();
        assert!(r.status().is_success(), "{cmd}: {}", r.text().unwrap_or_default());
    }

    /// A key pressed and released. Without `text` it is a `rawKeyDown`: the keydown event alone, with no character
    /// typed, as when an IME takes the key.
    fn key(&self, key: &str, code: u32, modifiers: u32, text: &str) {
        let down = if text.is_empty() { "rawKeyDown" } else { "keyDown" };
        for kind in [down, "keyUp"] {
            let text = if kind == "keyDown" { text } else { "" };
            self.cdp(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code, "modifiers": modifiers,
                       "text": text, "unmodifiedText": text}),
            );
        }
    }

    fn click(&self, css: &str) {
        self.rt.block_on(async { self.client.find(Locator::Css(css)).await?.click().await }).unwrap();
    }

    fn type_into(&self, css: &str, text: &str) {
        self.rt.block_on(async { self.client.find(Locator::Css(css)).await?.send_keys(text).await }).unwrap();
    }

    /// Waits until `condition` (a script expression) is truthy; fails naming it and what the page shows.
    fn wait(&self, what: &str, condition: &str) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if self.js(&format!("return !!({condition});"), vec![]) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let input = self.js("return document.getElementById('input').value;", vec![]);
        panic!("timed out waiting for {what} ({condition}); the page shows: {}\n(input: {input})", self.page_text());
    }

    fn page_text(&self) -> String {
        self.js("return document.body.innerText;", vec![]).as_str().unwrap_or_default().to_string()
    }

    fn screenshot(&self, to: &Path) {
        let png = self.rt.block_on(self.client.screenshot()).unwrap();
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).unwrap();
    }
}

/// The demo's tiny model (`asagi-gguf demo`: synth, convert to Q4_K_M + Q8_0, one run): (LLM, mmproj, test image).
fn demo_model(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let out = common::asagi_gguf().args(["demo", "-n", "1", "-t", "2", "--dir"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "demo: {}", String::from_utf8_lossy(&out.stderr));
    (dir.join("asagi-tiny-Q4_K_M.gguf"), dir.join("mmproj-asagi-tiny-Q8_0.gguf"), dir.join("test-card.png"))
}

const LAST_ANSWER: &str = "[...document.querySelectorAll('.msg.assistant')].at(-1)";

/// A picture drawn in the page, handed to the page's paste or drop handler as a user's file would be.
const SYNTHETIC_FILE: &str = r#"
    const [event, name, type, done] = arguments;
    const canvas = document.createElement('canvas');
    canvas.width = 72; canvas.height = 48;
    const g = canvas.getContext('2d');
    g.fillStyle = '#2a8c9e'; g.fillRect(0, 0, 72, 48);
    g.fillStyle = '#f5c542'; g.beginPath(); g.arc(36, 24, 14, 0, 7); g.fill();
    const give = (blob) => {
        const data = new DataTransfer();
        data.items.add(new File([blob], name, {type}));
        const target = document.getElementById('input');
        if (event === 'paste') {
            target.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        } else {
            for (const kind of ['dragenter', 'dragover', 'drop'])
                target.dispatchEvent(new DragEvent(kind, {dataTransfer: data, bubbles: true, cancelable: true}));
        }
        done(true);
    };
    if (type.startsWith('image/') && !name.startsWith('broken')) canvas.toBlob(give, type);
    else give(new Blob(['not an image']));
"#;

#[test]
fn the_chat_page_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj, image) = demo_model(dir.path());
    let server = Server::start(&llm, &mmproj, &["-c", "4096", "--parallel", "1", "--queue", "1", "--api-key", KEY]);

    // The page itself needs no key and confines itself (scripts and requests from this server only).
    let page = client(Duration::from_secs(5)).get(server.url("/")).send().unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().unwrap();
    assert!(html.contains(r#"<html lang="ja">"#) && html.contains(r#"src="app.js""#), "relative URLs only");
    // Only those files, only GET, only for this server's name (DNS rebinding).
    for (request, status) in [
        ("GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n", 404),
        ("GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n", 404),
        ("GET /app.js/ HTTP/1.1\r\nHost: 127.0.0.1\r\n", 404),
        ("POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n", 405),
        ("GET / HTTP/1.1\r\nHost: evil.example\r\n", 403),
    ] {
        let answer = server.raw(format!("{request}Connection: close\r\n\r\n").as_bytes(), Duration::from_secs(5));
        assert_eq!(status_of(&answer), status, "{request}");
    }

    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let b = Browser::open(&driver, profile.path());
    b.rt.block_on(b.client.goto(&server.url("/"))).unwrap();

    // The API answers 401: the page asks for the key once, keeps it for the session, and goes on.
    b.wait("the key dialog", "document.getElementById('key-dialog').open");
    b.type_into("#key", KEY);
    b.click("#key-ok");
    b.wait("the model's name", "document.getElementById('model').textContent === 'asagi-tiny-Q4_K_M'");
    assert_eq!(b.js("return sessionStorage.getItem('asagi.key');", vec![]), json!(KEY));
    assert_eq!(b.js("return document.documentElement.lang;", vec![]), json!("ja"));
    assert_eq!(b.js("return document.getElementById('mode').value;", vec![]), json!("card"), "the card's decoding");

    // Three images: file picker, paste, drop; something that is not an image is refused with a notice.
    b.type_into("#file", image.to_str().unwrap());
    b.js_async(SYNTHETIC_FILE, vec![json!("paste"), json!("pasted.png"), json!("image/png")]);
    b.js_async(SYNTHETIC_FILE, vec![json!("drop"), json!("dropped.jpg"), json!("image/jpeg")]);
    b.js_async(SYNTHETIC_FILE, vec![json!("drop"), json!("notes.txt"), json!("text/plain")]);
    b.wait("three encoded images", "document.querySelectorAll('.thumb[data-state=ready]').length === 3");
    let notice = b.js("return document.getElementById('notice').textContent;", vec![]);
    assert!(notice.as_str().unwrap().contains("notes.txt"), "{notice}");
    assert_eq!(server.stats()["image_cache"]["misses"], 3, "each image uploaded and encoded once, before sending");
    // One of them taken off again.
    b.click(".thumb:nth-child(3) .remove");
    b.wait("two images", "document.querySelectorAll('.thumb').length === 2");
    // A file that claims to be a PNG: the server's 400 is shown on its thumbnail, and the question cannot be sent
    // with it.
    b.js_async(SYNTHETIC_FILE, vec![json!("paste"), json!("broken.png"), json!("image/png")]);
    b.wait("the bad image's error", "document.querySelector('.thumb[data-state=error]')");
    let bad = b.js("return document.querySelector('.thumb[data-state=error] .status').textContent;", vec![]);
    assert!(bad.as_str().unwrap().contains("400"), "{bad}");
    b.type_into("#input", "送れる？\u{E007}");
    b.wait("the notice", "document.getElementById('notice').textContent.includes('broken.png')");
    assert_eq!(b.js("return document.querySelectorAll('.msg').length;", vec![]), json!(0), "nothing sent");
    b.click(".thumb[data-state=error] .remove");
    b.js("document.getElementById('input').value = '';", vec![]);

    // Typing through an IME: Enter inside a composition confirms the conversion, and so does Safari's Enter with
    // keyCode 229 right after it; neither sends. Shift+Enter starts a new line; Enter then sends.
    b.js(
        "window.keys = []; document.getElementById('input').addEventListener('keydown', e =>
            keys.push({key: e.key, composing: e.isComposing, code: e.keyCode}));",
        vec![],
    );
    b.click("#input");
    b.cdp("Input.imeSetComposition", json!({"text": "このがぞう", "selectionStart": 5, "selectionEnd": 5}));
    b.key("Enter", 13, 0, "");
    b.cdp("Input.insertText", json!({"text": "この画像は"}));
    b.key("Enter", 229, 0, "");
    let keys = b.js("return keys;", vec![]);
    assert_eq!(keys[0], json!({"key": "Enter", "composing": true, "code": 13}), "the composing Enter reached the page");
    assert_eq!(keys[1]["code"], 229, "{keys}");
    b.key("Enter", 13, 8, "\r");
    b.cdp("Input.insertText", json!({"text": "何ですか"}));
    assert_eq!(b.js("return document.getElementById('input').value;", vec![]), json!("この画像は\n何ですか"));
    assert_eq!(b.js("return document.querySelectorAll('.msg').length;", vec![]), json!(0), "nothing sent yet");
    b.key("Enter", 13, 0, "\r");

    // The answer (the card's 5-beam sampling) comes with what it cost.
    b.wait("the first answer", &format!("{LAST_ANSWER}?.dataset.done"));
    assert_eq!(b.js("return document.querySelectorAll('.msg.user img').length;", vec![]), json!(2));
    assert_eq!(b.js("return document.getElementById('input').value;", vec![]), json!(""));
    let first = b.js(&format!("return {{...{LAST_ANSWER}.querySelector('.stats').dataset}};"), vec![]);
    let num = |v: &Value, k: &str| v[k].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(-1.0);
    assert!(num(&first, "prefill") > 32.0 && num(&first, "tokens") > 0.0, "{first}");
    assert!(num(&first, "encodeMs") > 0.0, "{first}");

    // A long greedy answer (set in the settings, kept in local storage) streams in many updates; Stop cancels it.
    // The tiny model writes hundreds of tokens a second, faster than a WebDriver round trip: the page itself
    // clicks Stop at the answer's third update, and notes how much text it showed then.
    b.click("#settings-toggle");
    b.click("#mode option[value=greedy]");
    let set = |field: &str, value: &str| {
        b.js(
            "const f = document.querySelector(arguments[0]); f.value = arguments[1];
             f.dispatchEvent(new Event('change', {bubbles: true}));",
            vec![json!(field), json!(value)],
        );
    };
    set("#max-tokens", "1800");
    set("#min-tokens", "1800");
    let saved = b.js("return JSON.parse(localStorage.getItem('asagi.settings'));", vec![]);
    assert_eq!(
        (&saved["mode"], &saved["maxTokens"], &saved["minTokens"]),
        (&json!("greedy"), &json!(1800), &json!(1800))
    );
    b.js(
        "new MutationObserver((_, watch) => {
            const answer = [...document.querySelectorAll('.msg.assistant')].at(-1);
            if (answer && !answer.dataset.done && answer.dataset.updates >= 3) {
                watch.disconnect();
                window.shownAtStop = answer.querySelector('.text').textContent;
                document.getElementById('stop').click();
            }
        }).observe(document.getElementById('log'), {subtree: true, attributes: true});",
        vec![],
    );
    b.type_into("#input", "長い話をしてください\u{E007}");
    b.wait("the answer stopped", &format!("{LAST_ANSWER}?.dataset.stopped"));
    let stopped = b.js(&format!("return {LAST_ANSWER}.querySelector('.text').textContent;"), vec![]);
    assert_eq!(b.js("return window.shownAtStop;", vec![]), stopped, "nothing arrives after Stop");
    server
        .wait_stats(10, "the stopped answer cancelled on the server", |s| s["cancelled"] == 1 && s["slots_busy"] == 0);
    assert_eq!(b.js(&format!("return {LAST_ANSWER}.querySelector('.text').textContent;"), vec![]), stopped);
    assert_eq!(server.stats()["completed"], 1);

    // A follow-up continues the conversation (images, answers, the stopped one too): the server's prefix cache
    // holds it, and the page says how much came from it.
    set("#max-tokens", "64");
    set("#min-tokens", "0");
    b.type_into("#input", "もう少し詳しく\u{E007}");
    b.wait(
        "the follow-up's answer",
        &format!("document.querySelectorAll('.msg.assistant').length === 3 && {LAST_ANSWER}.dataset.done"),
    );
    let follow = b.js(&format!("return {{...{LAST_ANSWER}.querySelector('.stats').dataset}};"), vec![]);
    assert!(num(&follow, "cached") > num(&first, "prefill"), "the earlier turns came from the cache: {follow} {first}");
    b.click("#settings-toggle");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("webui/asagi-webui.png");
    b.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());

    // An error from the API is shown, and the question goes back to the input.
    b.click("#settings-toggle");
    set("#max-tokens", "100000");
    b.type_into("#input", "もう一度\u{E007}");
    b.wait("the error", &format!("{LAST_ANSWER}.dataset.error"));
    let error = b.js(&format!("return {LAST_ANSWER}.querySelector('.error').textContent;"), vec![]);
    assert!(error.as_str().unwrap().contains("max_tokens") && error.as_str().unwrap().contains("400"), "{error}");
    assert_eq!(b.js("return document.getElementById('input').value;", vec![]), json!("もう一度"));

    // A busy server: another client's long answer holds the one slot and its second request the one place in the
    // queue (`--queue 1`), so the page's request gets 503, which it shows.
    // (The page is set up first and the other client's answer is nearly as long as the context allows: it must still
    // run when the page asks, on a loaded machine too.)
    set("#max-tokens", "16");
    let answers = b.js("return document.querySelectorAll('.msg.assistant').length;", vec![]);
    let completed = server.stats()["completed"].clone();
    let long = json!({"messages": [{"role": "user", "content": "長い話"}], "max_tokens": 3900, "min_tokens": 3900,
                      "num_beams": 1, "temperature": 0, "stream": true});
    let other = || {
        let url = server.url("/v1/chat/completions");
        let r = client(Duration::from_secs(120)).post(url).bearer_auth(KEY).json(&long).send().unwrap();
        assert_eq!(r.status(), 200);
        r
    };
    let running = other();
    server.wait_stats(10, "the other client's answer running", |s| s["slots_busy"] == 1);
    let queued = other();
    server.wait_stats(10, "the other client's second request queued", |s| s["queued"] == 1);
    b.type_into("#input", "\u{E007}");
    b.wait(
        "the busy error",
        &format!("document.querySelectorAll('.msg.assistant').length === {answers} + 1 && {LAST_ANSWER}.dataset.error"),
    );
    let s = server.stats();
    assert!(s["slots_busy"] == 1 && s["queued"] == 1, "the other client's requests still hold the server: {s}");
    assert_eq!(s["completed"], completed, "the other client's long answer ended before the page asked");
    let error = b.js(&format!("return {LAST_ANSWER}.querySelector('.error').textContent;"), vec![]);
    assert!(error.as_str().unwrap().contains("503") && error.as_str().unwrap().contains("混雑"), "{error}");
    drop((running, queued));
    server.wait_stats(10, "the other client gone", |s| s["slots_busy"] == 0 && s["queued"] == 0);

    // Back to the card's decoding.
    b.click("#reset-settings");
    assert_eq!(
        b.js("return [document.getElementById('mode').value, document.getElementById('max-tokens').value];", vec![]),
        json!(["card", "256"])
    );

    // Behind a reverse proxy under a path, every request of the page stays under that path.
    let (proxy, _rt) = proxy(server.url(""));
    b.rt.block_on(b.client.goto(&format!("http://127.0.0.1:{proxy}/asagi/"))).unwrap();
    b.wait("the key dialog (another origin: another session)", "document.getElementById('key-dialog').open");
    b.type_into("#key", KEY);
    b.click("#key-ok");
    b.wait("the model's name through the proxy", "document.getElementById('model').textContent !== ''");
    let urls = b.js("return performance.getEntriesByType('resource').map(e => e.name);", vec![]);
    let prefix = format!("http://127.0.0.1:{proxy}/asagi/");
    let urls: Vec<&str> = urls.as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert!(urls.len() >= 3 && urls.iter().all(|u| u.starts_with(&prefix)), "{urls:?}");
}

/// What `location /asagi/ { proxy_pass http://127.0.0.1:PORT/; }` does in nginx: `/asagi/x` is the server's `/x`.
/// Runs until the returned runtime is dropped.
fn proxy(upstream: String) -> (u16, tokio::runtime::Runtime) {
    use axum::body::Body;
    use axum::extract::Request;
    use axum::response::Response;
    async fn forward(http: reqwest::Client, upstream: String, req: Request) -> Response {
        let path = req.uri().path().strip_prefix("/asagi").unwrap_or("/").to_string();
        let mut out = http.request(req.method().clone(), format!("{upstream}{path}"));
        for (k, v) in req.headers() {
            if k != axum::http::header::HOST {
                out = out.header(k, v);
            }
        }
        let body = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap();
        let r = out.body(body).send().await.unwrap();
        let mut back = Response::builder().status(r.status());
        for (k, v) in r.headers() {
            back = back.header(k, v);
        }
        back.body(Body::from(r.bytes().await.unwrap())).unwrap()
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let http = reqwest::Client::new();
    let handler = move |req: Request| forward(http.clone(), upstream.clone(), req);
    let app = axum::Router::new()
        .route("/asagi/", axum::routing::any(handler.clone()))
        .route("/asagi/{*rest}", axum::routing::any(handler));
    rt.spawn(async move { axum::serve(listener, app).await });
    (port, rt)
}
