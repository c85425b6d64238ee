//! Side-by-side speed of asagi-gguf and llama.cpp (through llama-cpp-2, linked against the same ggml build) on the
//! same GGUF files, alternating runs, medians. Run:
//!
//!   cargo bench --bench compare -- --model LLM.gguf [--mmproj MMPROJ.gguf] [--threads 2] [--reps 3] [--pp 128] [--tg 32]
//!
//! Prints prompt processing (pp) and decode (tg) tokens/s, image encode time, and the ratios ours / llama.cpp.

use std::num::NonZeroU32;
use std::time::Instant;

use asagi_gguf::llm::{Input, LlamaModel, Session, SessionParams};
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use ggml::gguf::GgufFile;
use ggml::Backend;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel as PeerModel;
use llama_cpp_2::mtmd::{
    mtmd_default_marker, MtmdBitmap, MtmdContext, MtmdContextParams, MtmdInputChunkType, MtmdInputText,
};
use llama_cpp_2::token::LlamaToken;

struct Args {
    model: String,
    mmproj: Option<String>,
    threads: usize,
    reps: usize,
    pp: usize,
    tg: usize,
    no_repack: bool,
}

fn args() -> Args {
    let mut a = Args { model: String::new(), mmproj: None, threads: 2, reps: 3, pp: 128, tg: 32, no_repack: false };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let val = || v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--model" => a.model = val(),
            "--mmproj" => a.mmproj = Some(val()),
            "--threads" => a.threads = val().parse().unwrap(),
            "--reps" => a.reps = val().parse().unwrap(),
            "--pp" => a.pp = val().parse().unwrap(),
            "--tg" => a.tg = val().parse().unwrap(),
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
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 300 + (i * 7919) % 5000).collect()
}

/// (pp tokens/s, tg tokens/s) for asagi-gguf.
fn ours(model: &LlamaModel<'_>, backend: &Backend, pp: usize, tg: usize) -> (f64, f64) {
    let mut s = Session::new(model, &[backend], &SessionParams { n_ctx: pp + tg + 16, ..Default::default() }).unwrap();
    let prompt = tokens(pp);
    let t = Instant::now();
    s.prefill(Input::Tokens(&prompt), 0, 0, false).unwrap();
    let pp_s = pp as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..tg {
        s.prefill(Input::Tokens(&[400]), 0, (pp + i) as i32, false).unwrap();
    }
    (pp_s, tg as f64 / t.elapsed().as_secs_f64())
}

/// Milliseconds per decode step after a `pp`-token prompt, `tg` steps each: greedy (one row), the model part of a
/// 5-beam step (a batch of 5 sequences), the Rust part (`BeamSearch::step`: log-softmax, processors, candidate
/// draw over 5 x n_vocab), and a whole beam-sample step as `run` does it (`generate`, the card's settings).
fn beam_steps(model: &LlamaModel<'_>, backend: &Backend, pp: usize, tg: usize) -> [f64; 4] {
    use asagi_gguf::generate::generate;
    use asagi_gguf::llm::Batch;
    use asagi_gguf::sampling::{BeamSearch, GenerationConfig};
    let cfg = GenerationConfig {
        max_new_tokens: Some(tg),
        do_sample: true,
        temperature: 0.7,
        repetition_penalty: 1.5,
        num_beams: 5,
        seed: Some(1),
        ..Default::default()
    };
    let params = SessionParams { n_ctx: pp + 2 * tg + 16, ..Default::default() };
    let prompt = tokens(pp);
    let mut s = Session::new(model, &[backend], &params).unwrap();
    let logits = s.prefill(Input::Tokens(&prompt), 0, 0, false).unwrap();
    let t = Instant::now();
    for i in 0..tg {
        s.prefill(Input::Tokens(&[400]), 0, (pp + i) as i32, false).unwrap();
    }
    let greedy = t.elapsed().as_secs_f64() * 1e3 / tg as f64;
    // Five sequences sharing the prompt, one batch per step.
    s.cache.reorder(&[0; 5]);
    let (mut model_ms, mut rust_ms) = (0.0, 0.0);
    let mut search = BeamSearch::new(&cfg, &prompt).unwrap();
    let mut rows = vec![logits.clone()];
    for i in 0..tg {
        let t = Instant::now();
        let step = search.step(&rows).unwrap();
        rust_ms += t.elapsed().as_secs_f64() * 1e3;
        let batch = Batch {
            input: Input::Tokens(&step.tokens),
            pos: vec![(pp + tg + i) as i32; 5],
            seq: (0..5).collect(),
            logits: vec![true; 5],
        };
        s.cache.reorder(&step.reorder);
        let t = Instant::now();
        let out = s.decode(&batch).unwrap();
        model_ms += t.elapsed().as_secs_f64() * 1e3;
        rows = out.chunks(model.hp.n_vocab).map(|c| c.to_vec()).collect();
        if step.done {
            break;
        }
    }
    let mut s = Session::new(model, &[backend], &params).unwrap();
    let logits = s.prefill(Input::Tokens(&prompt), 0, 0, false).unwrap();
    let t = Instant::now();
    generate(&mut s, &cfg, &prompt, logits, pp as i32, &Default::default(), |_| Ok(())).unwrap();
    let whole = t.elapsed().as_secs_f64() * 1e3 / tg as f64;
    [greedy, model_ms / tg as f64, rust_ms / tg as f64, whole]
}

/// (pp tokens/s, tg tokens/s) for llama.cpp.
fn peer(backend: &LlamaBackend, model: &PeerModel, threads: usize, pp: usize, tg: usize) -> (f64, f64) {
    let n_ctx = (pp + tg + 16) as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(pp.max(1) as u32)
        .with_n_ubatch(512)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let mut ctx = model.new_context(backend, params).unwrap();
    let mut batch = LlamaBatch::new(pp.max(1), 1);
    for (i, &t) in tokens(pp).iter().enumerate() {
        batch.add(LlamaToken(t as i32), i as i32, &[0], i + 1 == pp).unwrap();
    }
    let t = Instant::now();
    ctx.decode(&mut batch).unwrap();
    let pp_s = pp as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..tg {
        batch.clear();
        batch.add(LlamaToken(400), (pp + i) as i32, &[0], true).unwrap();
        ctx.decode(&mut batch).unwrap();
    }
    (pp_s, tg as f64 / t.elapsed().as_secs_f64())
}

fn main() {
    let a = args();
    let mut backend_peer = LlamaBackend::init().unwrap();
    backend_peer.void_logs();
    let mut file = GgufFile::open(&a.model).unwrap();
    file.map_weights().unwrap();
    let placed = asagi_gguf::weights::place(&file, None, !a.no_repack, asagi_gguf::llm::is_matmul_weight).unwrap();
    let model = LlamaModel::load_with(&file, &placed.contexts).unwrap();
    let backend = Backend::cpu(a.threads).unwrap();
    let peer_model = PeerModel::load_from_file(&backend_peer, &a.model, &LlamaModelParams::default()).unwrap();
    println!(
        "model {}  threads {}  reps {}  repack {}  ggml {}  CPU: {}",
        a.model,
        a.threads,
        a.reps,
        placed.summary().unwrap_or_else(|| "none".into()),
        ggml::version(),
        ggml::cpu_features()
    );

    let (mut o_pp, mut o_tg, mut p_pp, mut p_tg) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.reps {
        let (x, y) = ours(&model, &backend, a.pp, a.tg);
        o_pp.push(x);
        o_tg.push(y);
        let (x, y) = peer(&backend_peer, &peer_model, a.threads, a.pp, a.tg);
        p_pp.push(x);
        p_tg.push(y);
    }
    let row = |name: &str, o: f64, p: f64| println!("{name:<16} {o:>12.2} {p:>12.2} {:>8.2}x", o / p);
    println!("{:<16} {:>12} {:>12} {:>9}", "test", "asagi-gguf", "llama.cpp", "ratio");
    row(&format!("pp{} tok/s", a.pp), median(o_pp), median(p_pp));
    row(&format!("tg{} tok/s", a.tg), median(o_tg), median(p_tg));

    let steps: Vec<[f64; 4]> = (0..a.reps).map(|_| beam_steps(&model, &backend, a.pp, a.tg)).collect();
    let med = |j: usize| median(steps.iter().map(|s| s[j]).collect());
    let (greedy, model5, rust5, whole) = (med(0), med(1), med(2), med(3));
    println!("greedy step {greedy:.1} ms; 5-beam step {whole:.1} ms = {:.2}x greedy", whole / greedy);
    println!("  5-beam step parts: batch-of-5 decode {model5:.1} ms, BeamSearch::step {rust5:.1} ms");

    if let Some(mm) = &a.mmproj {
        let mut mfile = GgufFile::open(mm).unwrap();
        mfile.map_weights().unwrap();
        let vplaced =
            asagi_gguf::weights::place(&mfile, None, !a.no_repack, asagi_gguf::vision::is_matmul_weight).unwrap();
        let vmodel = VisionModel::load_with(&mfile, &vplaced.contexts).unwrap();
        let mut enc = VisionEncoder::new(&vmodel, &[&backend]).unwrap();
        let s = vmodel.hp.image_size;
        let px = vec![0.1f32; 3 * s * s];
        let params = MtmdContextParams {
            use_gpu: false,
            print_timings: false,
            n_threads: a.threads as i32,
            ..Default::default()
        };
        let mut mtmd = MtmdContext::init_from_file(mm, &peer_model, &params).unwrap();
        let rgb = vec![128u8; 3 * s * s];
        let bitmap = MtmdBitmap::from_image_data(s as u32, s as u32, &rgb).unwrap();
        let (mut o, mut p) = (vec![], vec![]);
        for _ in 0..a.reps {
            let t = Instant::now();
            enc.encode_pixels(&px, 1).unwrap();
            o.push(t.elapsed().as_secs_f64() * 1e3);
            let text =
                MtmdInputText { text: mtmd_default_marker().to_string(), add_special: false, parse_special: true };
            let chunks = mtmd.tokenize(text, &[&bitmap]).unwrap();
            let img = (0..chunks.len())
                .filter_map(|i| chunks.get(i))
                .find(|c| c.chunk_type() == MtmdInputChunkType::Image)
                .unwrap();
            let t = Instant::now();
            mtmd.encode_chunk(&img).unwrap();
            p.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (o, p) = (median(o), median(p));
        println!("{:<16} {o:>12.1} {p:>12.1} {:>8.2}x", "image encode ms", o / p);
    }
}
