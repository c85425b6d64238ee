//! asagi-gguf next to llama.cpp (through llama-cpp-2 and its mtmd, linked against the same llama-cpp-sys-2, so the
//! same ggml build) on the same GGUF files, alternating runs, medians. One command:
//!
//!   cargo bench --bench compare -- --model LLM.gguf [--mmproj MMPROJ.gguf] [--peer-mmproj MMPROJ.gguf]
//!                                  [--threads 2] [--reps 3] [--pp 512] [--tg 128] [--beam-steps 16] [--no-repack]
//!                                  [--rows pp,tg,image,beam,batch,rss] [--side both|ours|peer] [--ubatch 512]
//!
//! `--peer-mmproj` gives llama.cpp another vision file than ours (say its F16 one against our 8-bit one); the
//! difference of the two image embeddings is then printed as the quality cost.
//!
//! Rows: text prefill (pp), decode (tg), image-token prefill, image encode, time to first token for image +
//! question, a 5-beam step (llama.cpp has no beam search: its row is the same batch of 5 sequences through the
//! model, our row the whole step), peak RSS of the image + question + 16 tokens job (each side in a child
//! process), and the memory-bandwidth decode bound. Ratios are ours / llama.cpp (for times, above 1 is slower).
//!
//! `--rows` runs only the rows named (`encode`: the image encode alone, without the TTFT rows after it); `--side ours|peer` runs only one side's measurements (the other column reads
//! NaN), so that a profiler attached to the process sees one program at a time.

use std::num::NonZeroU32;
use std::process::Command;
use std::time::Instant;

use asagi_gguf::bench::{self, median};
use asagi_gguf::llm::{Session, SessionParams};
use asagi_gguf::load::{Loaded, ModelArgs};
use asagi_gguf::run_cmd::asagi_prompt;
use asagi_gguf::vision::VisionEncoder;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel as PeerModel;
use llama_cpp_2::mtmd::{
    mtmd_default_marker, MtmdBitmap, MtmdContext, MtmdContextParams, MtmdInputChunkType, MtmdInputText,
};
use llama_cpp_2::token::LlamaToken;

const QUESTION: &str = "この画像について説明してください。";
/// Tokens decoded after the image + question in the peak-RSS job.
const RSS_TOKENS: usize = 16;

#[derive(Clone)]
struct Args {
    model: String,
    mmproj: Option<String>,
    peer_mmproj: Option<String>,
    threads: usize,
    reps: usize,
    pp: usize,
    tg: usize,
    beam_steps: usize,
    no_repack: bool,
    /// Our micro-batch size (llama.cpp's stays at its default, 512).
    ubatch: usize,
    /// Rows to run (pp, tg, image, beam, rss).
    rows: Vec<String>,
    /// Which side to measure: both, ours or peer.
    side: String,
    /// Child mode: run the peak-RSS job for "ours" or "peer" and print the peak.
    rss_child: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        model: String::new(),
        mmproj: None,
        peer_mmproj: None,
        threads: 2,
        reps: 3,
        pp: 512,
        tg: 128,
        beam_steps: 16,
        no_repack: false,
        ubatch: 512,
        rows: ["pp", "tg", "image", "beam", "rss"].map(String::from).to_vec(),
        side: "both".into(),
        rss_child: None,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let val = || v.get(i + 1).cloned().unwrap_or_default();
        let num = |name: &str| val().parse::<usize>().unwrap_or_else(|_| panic!("{name} needs a number"));
        match v[i].as_str() {
            "--model" => a.model = val(),
            "--mmproj" => a.mmproj = Some(val()),
            "--peer-mmproj" => a.peer_mmproj = Some(val()),
            "--threads" => a.threads = num("--threads"),
            "--reps" => a.reps = num("--reps").max(1),
            "--pp" => a.pp = num("--pp"),
            "--tg" => a.tg = num("--tg"),
            "--beam-steps" => a.beam_steps = num("--beam-steps"),
            "--ubatch" => a.ubatch = num("--ubatch").max(1),
            "--rss-child" => a.rss_child = Some(val()),
            "--rows" => a.rows = val().split(',').map(String::from).collect(),
            "--side" => a.side = val(),
            "--no-repack" => {
                a.no_repack = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    assert!(!a.model.is_empty(), "usage: cargo bench --bench compare -- --model LLM.gguf [--mmproj MM.gguf]");
    assert!(["both", "ours", "peer"].contains(&a.side.as_str()), "--side takes both, ours or peer");
    a
}

impl Args {
    fn row(&self, name: &str) -> bool {
        self.rows.iter().any(|r| r == name)
    }
}

fn model_args(a: &Args) -> ModelArgs {
    let mut m = ModelArgs::new(a.model.clone().into(), a.mmproj.clone().map(Into::into));
    m.threads = Some(a.threads);
    m.no_repack = a.no_repack;
    m
}

// ---- llama.cpp ----

/// Row counts of the `batch` rows (llama.cpp's context holds as many sequences).
const BATCH_ROWS: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8];

fn peer_context<'m>(
    backend: &LlamaBackend,
    model: &'m PeerModel,
    a: &Args,
    n_ctx: usize,
    n_seq: u32,
) -> LlamaContext<'m> {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx as u32))
        .with_n_batch(a.pp.max(512) as u32)
        .with_n_ubatch(512)
        .with_n_seq_max(n_seq)
        .with_kv_unified(true)
        .with_n_threads(a.threads as i32)
        .with_n_threads_batch(a.threads as i32);
    model.new_context(backend, params).expect("llama.cpp context")
}

/// Prefills `ids` in sequence 0 from position 0 (one call; llama.cpp splits it into micro-batches).
fn peer_prefill(ctx: &mut LlamaContext<'_>, ids: &[u32]) {
    ctx.clear_kv_cache();
    let mut batch = LlamaBatch::new(ids.len().max(1), 1);
    for (i, &t) in ids.iter().enumerate() {
        batch.add(LlamaToken(t as i32), i as i32, &[0], i + 1 == ids.len()).unwrap();
    }
    ctx.decode(&mut batch).expect("llama.cpp decode");
}

fn peer_pp(ctx: &mut LlamaContext<'_>, n: usize, n_vocab: usize) -> f64 {
    let ids = bench::tokens(n, n_vocab);
    let t = Instant::now();
    peer_prefill(ctx, &ids);
    n as f64 / t.elapsed().as_secs_f64()
}

fn peer_tg(ctx: &mut LlamaContext<'_>, ctx_len: usize, n: usize, n_vocab: usize) -> f64 {
    peer_prefill(ctx, &bench::tokens(ctx_len, n_vocab));
    let mut batch = LlamaBatch::new(1, 1);
    let t = Instant::now();
    for i in 0..n {
        batch.clear();
        batch.add(LlamaToken(400), (ctx_len + i) as i32, &[0], true).unwrap();
        ctx.decode(&mut batch).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// llama.cpp's decode step of `rows` sequences (ms, mean over `n` steps) after a `ctx_len`-token prefill copied to
/// each: what `bench::batch_step_ms` measures on our side (5 rows: the model part of a beam step).
fn peer_batch(ctx: &mut LlamaContext<'_>, ctx_len: usize, n: usize, n_vocab: usize, rows: usize) -> f64 {
    peer_prefill(ctx, &bench::tokens(ctx_len, n_vocab));
    for s in 1..rows as i32 {
        ctx.copy_kv_cache_seq(0, s, None, None).unwrap();
    }
    let mut batch = LlamaBatch::new(rows, rows as i32);
    let t = Instant::now();
    for i in 0..n {
        batch.clear();
        for s in 0..rows as i32 {
            batch.add(LlamaToken(400 + s), (ctx_len + i) as i32, &[s], true).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
    }
    t.elapsed().as_secs_f64() * 1e3 / n as f64
}

struct PeerVision {
    mtmd: MtmdContext,
    bitmap: MtmdBitmap,
}

impl PeerVision {
    fn new(a: &Args, mm: &str, model: &PeerModel, size: usize) -> PeerVision {
        let params = MtmdContextParams {
            use_gpu: false,
            print_timings: false,
            n_threads: a.threads as i32,
            ..Default::default()
        };
        let mtmd = MtmdContext::init_from_file(mm, model, &params).expect("mtmd context");
        // The same smooth test image as ours, as 8-bit RGB at the encoder's size (no resize on either side).
        let rgb: Vec<u8> = (0..size * size * 3).map(|i| ((i / 3 % size) * 255 / size) as u8).collect();
        let bitmap = MtmdBitmap::from_image_data(size as u32, size as u32, &rgb).unwrap();
        PeerVision { mtmd, bitmap }
    }

    fn chunks(&self, text: String) -> llama_cpp_2::mtmd::MtmdInputChunks {
        let text = MtmdInputText { text, add_special: true, parse_special: true };
        self.mtmd.tokenize(text, &[&self.bitmap]).expect("mtmd tokenize")
    }

    fn encode_ms(&mut self) -> f64 {
        let chunks = self.chunks(mtmd_default_marker().to_string());
        let img = (0..chunks.len())
            .filter_map(|i| chunks.get(i))
            .find(|c| c.chunk_type() == MtmdInputChunkType::Image)
            .expect("an image chunk");
        let t = Instant::now();
        self.mtmd.encode_chunk(&img).unwrap();
        t.elapsed().as_secs_f64() * 1e3
    }

    /// Image + question in Asagi's template through mtmd's helper (encode, prefill), then the first token.
    /// Returns the milliseconds and the positions used.
    fn ttft_ms(&mut self, ctx: &mut LlamaContext<'_>) -> (f64, i32) {
        ctx.clear_kv_cache();
        let t = Instant::now();
        let chunks = self.chunks(asagi_prompt(QUESTION, 1).replace("<image>", mtmd_default_marker()));
        let n_past = chunks.eval_chunks(&mut self.mtmd, ctx, 0, 0, 512, true).expect("mtmd eval");
        std::hint::black_box(asagi_gguf::generate::argmax(ctx.get_logits()));
        (t.elapsed().as_secs_f64() * 1e3, n_past)
    }
}

// ---- the peak-RSS job, in a child process per side ----

fn rss_job(a: &Args, side: &str) {
    bench::reset_peak_rss();
    let mm = a.mmproj.as_deref().expect("--mmproj");
    let peer_mm = a.peer_mmproj.as_deref().unwrap_or(mm);
    if side == "ours" {
        let loaded = Loaded::open(&model_args(a), true).unwrap();
        let model = loaded.model().unwrap();
        let v = loaded.vision(&model).unwrap().unwrap();
        let backends = loaded.backends();
        let params = SessionParams { n_ctx: 1024, ..Default::default() };
        let mut s = Session::new(&model, &backends, &params).unwrap();
        let mut enc = VisionEncoder::new(&v, &backends).unwrap();
        let prompt = loaded.tok.encode(&asagi_prompt(QUESTION, 1), true).unwrap();
        bench::time_to_first_token(&mut enc, &mut s, &prompt, loaded.tok.image, &bench::test_pixels(v.hp.image_size))
            .unwrap();
        let pos = s.cache.seq_len(0);
        for i in 0..RSS_TOKENS {
            s.prefill(asagi_gguf::llm::Input::Tokens(&[400]), 0, pos + i as i32, false).unwrap();
        }
    } else {
        let backend = LlamaBackend::init().unwrap();
        let model = PeerModel::load_from_file(&backend, &a.model, &LlamaModelParams::default()).unwrap();
        let mut ctx = peer_context(&backend, &model, a, 1024, 1);
        let size = image_size(peer_mm);
        let mut pv = PeerVision::new(a, peer_mm, &model, size);
        let (_, n_past) = pv.ttft_ms(&mut ctx);
        let mut batch = LlamaBatch::new(1, 1);
        for i in 0..RSS_TOKENS {
            batch.clear();
            batch.add(LlamaToken(400), n_past + i as i32, &[0], true).unwrap();
            ctx.decode(&mut batch).unwrap();
        }
    }
    println!("RSS {}", bench::peak_rss().unwrap_or(0));
}

fn child_rss(a: &Args, side: &str) -> Option<f64> {
    let mut cmd = Command::new(std::env::current_exe().ok()?);
    cmd.args(["--model", &a.model, "--mmproj", a.mmproj.as_deref()?, "--threads", &a.threads.to_string()]);
    if let Some(p) = &a.peer_mmproj {
        cmd.args(["--peer-mmproj", p]);
    }
    if a.no_repack {
        cmd.arg("--no-repack");
    }
    let out = cmd.args(["--rss-child", side]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("RSS ")).and_then(|v| v.trim().parse::<f64>().ok()).map(|b| b / 1e9)
}

/// How far our image embeddings are from those of the peer's vision file (run by us): relative RMS.
fn embedding_difference(enc: &mut VisionEncoder<'_>, other: &str, backends: &[&ggml::Backend], px: &[f32]) -> String {
    let mut f = ggml::gguf::GgufFile::open(other).unwrap();
    f.map_weights().unwrap();
    let v = asagi_gguf::vision::VisionModel::load(&f).unwrap();
    let reference = VisionEncoder::new(&v, backends).unwrap().encode_pixels(px, 1).unwrap().remove(0).data;
    let ours = enc.encode_pixels(px, 1).unwrap().remove(0).data;
    let (num, den) = ours
        .iter()
        .zip(reference.iter())
        .fold((0f64, 0f64), |(n, d), (&a, &b)| (n + ((a - b) as f64).powi(2), d + (b as f64).powi(2)));
    format!("image embeddings, ours vs {other}: relative RMS difference {:.2e}", (num / den).sqrt())
}

/// Median and range of repeated measurements (NaN when a side was not measured).
#[derive(Clone, Copy)]
struct Spread {
    med: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread { med: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Spread { med: median(v), min, max }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(2);
        let s = match self.min == self.max {
            true => format!("{:.p$}", self.med),
            false => format!("{:.p$} ({:.p$}-{:.p$})", self.med, self.min, self.max),
        };
        // (Not `f.pad`: it would read the precision as a maximum length and cut the string.)
        match f.width() {
            Some(w) => write!(f, "{s:>w$}"),
            None => f.write_str(&s),
        }
    }
}

fn image_size(mm: &str) -> usize {
    let f = ggml::gguf::GgufFile::open(mm).unwrap();
    f.u32("clip.vision.image_size").unwrap() as usize
}

fn main() {
    let a = args();
    // llama.cpp, mtmd and ggml log lines would bury the table.
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    if let Some(side) = a.rss_child.clone() {
        rss_job(&a, &side);
        return;
    }
    // Load times (language model + vision file for us; the language model for llama.cpp, whose vision file is
    // loaded later by mtmd), both from the page cache: the files are read through once first, or the side loading
    // first would measure the disk (5.96 s ours against 4.16 s llama.cpp's, then 3.15 against 3.28 s warm).
    for path in std::iter::once(&a.model).chain(&a.mmproj) {
        std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut std::io::sink()).unwrap();
    }
    let t = Instant::now();
    let loaded = Loaded::open(&model_args(&a), a.mmproj.is_some()).unwrap();
    let load_ours = t.elapsed().as_secs_f64() * 1e3;
    let model = loaded.model().unwrap();
    let vmodel = loaded.vision(&model).unwrap();
    let backends = loaded.backends();
    let n_vocab = model.hp.n_vocab;
    let n_ctx = (a.pp.max(64 + a.tg) + 64).max(1024);
    let params = SessionParams { n_ctx, n_ubatch: a.ubatch, ..Default::default() };
    let mut s = Session::new(&model, &backends, &params).unwrap();

    let backend_peer = LlamaBackend::init().unwrap();
    let t = Instant::now();
    let peer_model = PeerModel::load_from_file(&backend_peer, &a.model, &LlamaModelParams::default()).unwrap();
    let load_peer = t.elapsed().as_secs_f64() * 1e3;
    let mut pctx = peer_context(&backend_peer, &peer_model, &a, n_ctx, BATCH_ROWS.len() as u32);

    println!(
        "model {}{}{}  threads {}  reps {}  ggml {}  CPU {}",
        a.model,
        a.mmproj.as_ref().map(|m| format!("  mmproj {m}")).unwrap_or_default(),
        a.peer_mmproj.as_ref().map(|m| format!("  llama.cpp mmproj {m}")).unwrap_or_default(),
        a.threads,
        a.reps,
        ggml::version(),
        ggml::cpu_features()
    );
    for line in loaded.placement_summary() {
        println!("{line}");
    }
    println!("{:<30} {:>24} {:>24} {:>22}", "test (median, min-max)", "asagi-gguf", "llama.cpp", "ratio");
    // The ratio column: the median (and range) of the per-repetition ratios ours / llama.cpp. Each pair is
    // measured back to back, so drift of this VM's speed over minutes (10% and more) cancels in the ratio.
    let row = |name: &str, (o, p, r): (Spread, Spread, Spread)| println!("{name:<30} {o:>24} {p:>24} {r:>21.3}x");
    let single = |o: f64, p: f64| (Spread::of(vec![o]), Spread::of(vec![p]), Spread::of(vec![o / p]));
    let ours = a.side != "peer";
    let peer = a.side != "ours";
    // Interleaved repetitions: ours, then llama.cpp, `reps` times.
    let pair = |o: &mut dyn FnMut() -> f64, p: &mut dyn FnMut() -> f64| {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..a.reps {
            if ours {
                xs.push(o());
            }
            if peer {
                ys.push(p());
            }
        }
        let ratios = xs.iter().zip(&ys).map(|(x, y)| x / y).collect();
        (Spread::of(xs), Spread::of(ys), Spread::of(ratios))
    };

    row("load ms (once)", single(load_ours, load_peer));
    if a.row("pp") {
        let r = pair(&mut || bench::prefill_text(&mut s, a.pp).unwrap(), &mut || peer_pp(&mut pctx, a.pp, n_vocab));
        row(&format!("pp{} tok/s", a.pp), r);
    }
    let bytes = bench::decode_bytes_per_token(&loaded.llm);
    let mut bounded = Vec::new();
    if a.row("tg") {
        let r = pair(
            &mut || {
                let run = bench::decode_against_bandwidth(&mut s, 64, a.tg, a.threads, bytes).unwrap();
                bounded.push(run);
                run.tok_s
            },
            &mut || {
                // The same bandwidth pass (1 GiB allocated, read, freed) before llama.cpp's run as before ours, so
                // that whatever it leaves behind (caches, free pages) weighs on both sides alike.
                std::hint::black_box(bench::read_bandwidth(1 << 30, a.threads, 5));
                peer_tg(&mut pctx, 64, a.tg, n_vocab)
            },
        );
        row(&format!("tg{} tok/s", a.tg), r);
    }

    if let (Some(v), Some(mm), true) = (&vmodel, &a.mmproj, a.row("image") || a.row("encode")) {
        let size = v.hp.image_size;
        let mut enc = VisionEncoder::new(v, &backends).unwrap();
        let peer_mm = a.peer_mmproj.as_deref().unwrap_or(mm);
        let mut pv = PeerVision::new(&a, peer_mm, &peer_model, size);
        let px = bench::test_pixels(size);
        if peer_mm != mm {
            println!("{}", embedding_difference(&mut enc, peer_mm, &backends, &px));
        }
        let prompt = loaded.tok.encode(&asagi_prompt(QUESTION, 1), true).unwrap();
        let encode = pair(
            &mut || {
                let t = Instant::now();
                enc.encode_pixels(&px, 1).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            },
            &mut || pv.encode_ms(),
        );
        row("image encode ms", encode);
        if a.row("image") {
            let ttft = pair(
                &mut || bench::time_to_first_token(&mut enc, &mut s, &prompt, loaded.tok.image, &px).unwrap(),
                &mut || pv.ttft_ms(&mut pctx).0,
            );
            row("image + question TTFT ms", ttft);
            // llama.cpp's image-token prefill is not separable from mtmd's helper: derived as TTFT - encode for both
            // (medians), which also holds the ~40 text tokens.
            row("  of which prefill ms", single(ttft.0.med - encode.0.med, ttft.1.med - encode.1.med));
            if ours {
                let n_img = v.hp.n_image_tokens();
                let ip = Spread::of((0..a.reps).map(|_| bench::prefill_embeddings(&mut s, n_img).unwrap()).collect());
                println!("{:<30} {ip:>24}", format!("image prefill {n_img} tok/s"));
            }
        }
    }

    if a.row("beam") {
        let steps: Vec<bench::BeamSteps> = match ours {
            true => (0..a.reps).map(|_| bench::beam_steps(&mut s, 64, a.beam_steps).unwrap()).collect(),
            false => Vec::new(),
        };
        let med = |f: fn(&bench::BeamSteps) -> f64| Spread::of(steps.iter().map(f).collect());
        let peer5 = match peer {
            true => (0..a.reps).map(|_| peer_batch(&mut pctx, 64, a.beam_steps, n_vocab, 5)).collect(),
            false => Vec::new(),
        };
        let (greedy, beam) = (med(|x| x.greedy_ms), med(|x| x.beam_ms));
        let (o, p) = (med(|x| x.model_ms), Spread::of(peer5));
        row("5-sequence batch step ms", (o, p, Spread::of(vec![o.med / p.med])));
        println!(
            "5-beam step (ours) {beam} ms = {:.2}x a greedy step ({greedy} ms); BeamSearch::step {} ms",
            beam.med / greedy.med,
            med(|x| x.search_ms)
        );
    }

    if a.row("batch") {
        // How a decode step's cost grows with its rows (beams, sequences), both sides alternating: ggml's repacked
        // kernels take rows 4 at a time and the rest one by one, its tiled K-quant kernels from 8 rows on; ours
        // take 2 to 7 rows at once.
        for &n in BATCH_ROWS {
            let step = pair(&mut || bench::batch_step_ms(&mut s, 64, n, a.beam_steps).unwrap(), &mut || {
                peer_batch(&mut pctx, 64, a.beam_steps, n_vocab, n)
            });
            row(&format!("decode step of {n} rows ms"), step);
        }
    }

    if a.mmproj.is_some() && a.row("rss") {
        let o = if ours { child_rss(&a, "ours") } else { None };
        let p = if peer { child_rss(&a, "peer") } else { None };
        let one = |x: Option<f64>| Spread::of(x.into_iter().collect());
        let ratio = one(o.zip(p).map(|(o, p)| o / p));
        row(&format!("peak RSS GB (image+q+{RSS_TOKENS} tok)"), (one(o), one(p), ratio));
    }
    if bounded.is_empty() {
        return;
    }
    let bw = median(bounded.iter().map(|r| r.bandwidth).collect());
    println!(
        "memory read bandwidth {bw:.1} GB/s (median; measured before each decode run); decode reads {:.2} GB/token: \
         bound {:.2} tok/s, ours reaches {:.0}% (median of the runs)",
        bytes as f64 / 1e9,
        bw * 1e9 / bytes as f64,
        100.0 * median(bounded.iter().map(|r| r.fraction).collect())
    );
}
