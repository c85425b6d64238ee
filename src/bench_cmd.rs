//! `asagi-gguf bench`: this runtime's speed and memory on a model (text prefill, image-token prefill, decode,
//! image encode, time to first token, a 5-beam step against a greedy one, peak RSS), and how close decode gets
//! to the memory-bandwidth bound. `cargo bench --bench compare` runs the same next to llama.cpp.

use std::path::PathBuf;

use anyhow::Result;

use crate::bench::{self, median};
use crate::load::{Loaded, ModelArgs};
use crate::run_cmd::asagi_prompt;
use crate::vision::VisionEncoder;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub load: ModelArgs,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Text prompt length.
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Beam-search steps (5 beams, the model card's beam sample), and as many greedy ones.
    #[arg(long, default_value_t = 16)]
    pub beam_steps: usize,
    /// Run only these tests (comma-separated: pp, tg, image, ttft, beam) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a.load.threads.unwrap_or_else(num_cpus::get_physical);
    bench::reset_peak_rss();
    let t = std::time::Instant::now();
    let loaded = Loaded::open(&a.load, a.load.mmproj.is_some())?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let model = loaded.model()?;
    let vmodel = loaded.vision(&model)?;
    let backends = loaded.backends();
    bench::check_fits(&model, a.pp.max(a.tg + 64))?;
    let mut s = loaded.session(&model, &backends)?;
    let path = |p: &PathBuf| p.display().to_string();
    println!(
        "model {}{}  threads {threads}  reps {}  ggml {}  CPU {}",
        path(&a.load.model),
        a.load.mmproj.as_ref().map(|m| format!("  mmproj {}", path(m))).unwrap_or_default(),
        a.reps,
        ggml::version(),
        ggml::cpu_features()
    );
    for line in loaded.placement_summary() {
        println!("{line}");
    }
    let row = |name: &str, value: String| println!("{name:<28} {value}");
    row("load", format!("{load_ms:.0} ms"));
    let reps = |f: &mut dyn FnMut() -> Result<f64>| -> Result<f64> {
        let mut v = Vec::new();
        for _ in 0..a.reps.max(1) {
            v.push(f()?);
        }
        Ok(median(v))
    };
    let want = |t: &str| a.only.is_empty() || a.only.iter().any(|o| o == t);
    if want("pp") {
        let pp = reps(&mut || bench::prefill_text(&mut s, a.pp))?;
        row(&format!("pp{} (text prefill)", a.pp), format!("{pp:.2} tok/s"));
    }
    if want("tg") {
        let bytes = bench::decode_bytes_per_token(&loaded.llm);
        let runs: Vec<bench::BoundedDecode> = (0..a.reps.max(1))
            .map(|_| bench::decode_against_bandwidth(&mut s, 64, a.tg, threads, bytes))
            .collect::<Result<_>>()?;
        let med = |f: fn(&bench::BoundedDecode) -> f64| median(runs.iter().map(f).collect());
        row(&format!("tg{} (decode)", a.tg), format!("{:.2} tok/s", med(|r| r.tok_s)));
        let bw = med(|r| r.bandwidth);
        row("memory read bandwidth", format!("{bw:.1} GB/s ({threads} threads, 1 GiB, next to each decode run)"));
        row(
            "decode bound",
            format!(
                "{:.2} tok/s ({:.2} GB read per token); decode reaches {:.0}%",
                bw * 1e9 / bytes as f64,
                bytes as f64 / 1e9,
                100.0 * med(|r| r.fraction)
            ),
        );
    }

    if !loaded.remotes.is_empty() && (want("pp") || want("tg")) {
        // Bytes on the network: a prefill's per token, and a decode step's (a decode run's less its prompt's).
        let mut traffic = |f: &mut dyn FnMut(&mut crate::llm::Session<'_>) -> Result<f64>| -> Result<(f64, f64)> {
            let t0 = loaded.remotes.traffic();
            f(&mut s)?;
            let t1 = loaded.remotes.traffic();
            Ok(((t1.sent - t0.sent) as f64, (t1.received - t0.received) as f64))
        };
        let (n_pp, n_tg) = (a.pp, a.tg.max(1));
        let pp = traffic(&mut |s| bench::prefill_text(s, n_pp))?;
        let prompt = traffic(&mut |s| bench::prefill_text(s, 64))?;
        let run = traffic(&mut |s| bench::decode(s, 64, n_tg))?;
        let kb = |b: f64| format!("{:.1} KB", b / 1e3);
        row(
            "RPC traffic per token",
            format!(
                "decode {} sent + {} received; prefill (pp{n_pp}) {} + {}",
                kb((run.0 - prompt.0) / n_tg as f64),
                kb((run.1 - prompt.1) / n_tg as f64),
                kb(pp.0 / n_pp as f64),
                kb(pp.1 / n_pp as f64)
            ),
        );
    }

    if let Some(v) = &vmodel {
        let n_img = v.hp.n_image_tokens();
        if want("image") {
            let ip = reps(&mut || bench::prefill_embeddings(&mut s, n_img))?;
            row(&format!("image prefill ({n_img} tokens)"), format!("{ip:.2} tok/s"));
        }
        let mut enc = VisionEncoder::new(v, &loaded.vision_backends())?;
        let px = bench::test_pixels(v.hp.image_size);
        if want("image") {
            let enc_ms = reps(&mut || {
                let t = std::time::Instant::now();
                enc.encode_pixels(&px, 1)?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })?;
            row("image encode", format!("{:.2} s", enc_ms / 1e3));
        }
        if want("ttft") {
            let prompt = loaded.tok.encode(&asagi_prompt("この画像について説明してください。", 1), true)?;
            let ttft = reps(&mut || bench::time_to_first_token(&mut enc, &mut s, &prompt, loaded.tok.image, &px))?;
            row("time to first token", format!("{:.2} s (image + question, {} text tokens)", ttft / 1e3, prompt.len()));
        }
    }

    if want("beam") {
        let steps: Vec<bench::BeamSteps> =
            (0..a.reps.max(1)).map(|_| bench::beam_steps(&mut s, 64, a.beam_steps)).collect::<Result<_>>()?;
        let med = |f: fn(&bench::BeamSteps) -> f64| median(steps.iter().map(f).collect());
        let (g, b) = (med(|x| x.greedy_ms), med(|x| x.beam_ms));
        row("greedy step", format!("{g:.1} ms"));
        row(
            "5-beam step",
            format!(
                "{b:.1} ms = {:.2}x greedy (model {:.1} ms, search {:.1} ms)",
                b / g,
                med(|x| x.model_ms),
                med(|x| x.search_ms)
            ),
        );
    }
    if let Some(rss) = bench::peak_rss() {
        row("peak RSS", format!("{:.2} GB", rss as f64 / 1e9));
    }
    Ok(())
}
