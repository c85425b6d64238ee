//! `asagi-gguf demo`: the whole pipeline with no downloads. It writes a tiny random-weight Asagi checkpoint
//! (`synth`), converts it to GGUF (`convert`), draws a test image, and runs an image + question through `run`.
//! The weights are random, so the answer is gibberish; what the demo shows is that every stage works here.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use asagi_convert::{LlmType, MmprojType, Options};

use crate::load::ModelArgs;
use crate::run_cmd::{self, RunArgs};
use crate::synth;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working folder [default: a new folder under the system temp dir].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 24)]
    pub n_predict: usize,
    /// Worker threads [default: physical cores].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

/// A 96x64 RGB test card: colour gradients and a white disc.
fn test_image() -> image::RgbImage {
    image::RgbImage::from_fn(96, 64, |x, y| {
        let (dx, dy) = (x as f32 - 60.0, y as f32 - 28.0);
        if dx * dx + dy * dy < 300.0 {
            image::Rgb([250, 250, 245])
        } else {
            image::Rgb([(x * 255 / 95) as u8, (y * 255 / 63) as u8, 120])
        }
    })
}

pub fn run(a: DemoArgs) -> Result<()> {
    let dir = a.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("asagi-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let hf = dir.join("asagi-tiny");
    let threads = a.threads.unwrap_or_else(num_cpus::get_physical);

    let t = Instant::now();
    let size = synth::size("tiny")?;
    let bytes = synth::write(&size, &hf, 1, true)?;
    eprintln!(
        "[1/4] synth: tiny Asagi-shaped checkpoint ({:.1} MB bf16, random weights) in {} ({:.2} s)",
        bytes as f64 / 1e6,
        hf.display(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let opts = Options {
        model_dir: hf.clone(),
        outtype: LlmType::Q4KM,
        mmproj_outtype: MmprojType::Q8_0,
        outfile: Some(dir.join("asagi-tiny-Q4_K_M.gguf")),
        mmproj_outfile: Some(dir.join("mmproj-asagi-tiny-Q8_0.gguf")),
        force: true,
        threads,
        progress: false,
    };
    let conversion = asagi_convert::plan(&opts)?;
    let written = asagi_convert::write(&conversion, &opts, &AtomicBool::new(false))?;
    eprintln!(
        "[2/4] convert: {} ({} KiB) + {} ({} KiB) ({:.2} s)",
        written[0].path.display(),
        written[0].bytes / 1024,
        written[1].path.display(),
        written[1].bytes / 1024,
        t.elapsed().as_secs_f64()
    );

    let image = dir.join("test-card.png");
    test_image().save(&image).with_context(|| format!("cannot write {}", image.display()))?;
    eprintln!("[3/4] image: {}", image.display());

    let question = "この画像には何が写っていますか？";
    eprintln!("[4/4] run: image + question {question:?} (random weights: expect gibberish)");
    let mut load = ModelArgs::new(opts.outfile.unwrap(), opts.mmproj_outfile);
    load.ctx_size = Some(1024);
    load.threads = Some(threads);
    run_cmd::run(RunArgs {
        load,
        images: vec![image],
        prompt: Some(question.into()),
        raw_prompt: None,
        n_predict: a.n_predict,
        decoding: run_cmd::default_decoding(),
        json: false,
        dump_logits: None,
        cache: Default::default(),
        session: None,
    })
}
