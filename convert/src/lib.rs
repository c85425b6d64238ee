//! The Asagi converter: a Hugging Face Asagi checkpoint (LLaVA: SigLIP + MLP projector + llm-jp-3) to two GGUF
//! files, the language model (architecture `llama`, loadable by llama.cpp unchanged) and the mmproj (`clip`, as
//! llama.cpp's mtmd reads it), streaming tensor by tensor.
//!
//! Every size comes from config.json and the tensor shapes; nothing is looked up in a table of Asagi sizes.

pub mod checkpoint;
pub mod config;
pub mod llm;
pub mod mmproj;
pub mod plan;
pub mod quant;
pub mod vocab;
mod write;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use checkpoint::Checkpoint;
pub use config::AsagiConfig;
pub use plan::{FilePlan, TensorPlan};
pub use quant::{LlmType, MmprojType};
pub use write::part_path;

/// What `convert` is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub model_dir: PathBuf,
    pub outtype: LlmType,
    pub mmproj_outtype: MmprojType,
    pub outfile: Option<PathBuf>,
    pub mmproj_outfile: Option<PathBuf>,
    pub force: bool,
    pub threads: usize,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// Descriptive metadata (`general.*`).
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub license: Option<String>,
    pub source_repo: Option<String>,
}

/// A planned conversion: the open checkpoint and the two files to write.
pub struct Conversion {
    pub checkpoint: Checkpoint,
    pub llm: FilePlan,
    pub mmproj: FilePlan,
}

/// One written file.
#[derive(Clone, Debug)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
}

/// Reads the checkpoint folder and plans both files, checking every tensor's presence and shape. Nothing is
/// written.
pub fn plan(opts: &Options) -> Result<Conversion> {
    let dir = &opts.model_dir;
    if !dir.is_dir() {
        bail!("{} is not a folder (expected a Hugging Face Asagi checkpoint folder)", dir.display());
    }
    let cfg = AsagiConfig::read(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let embed = ckpt
        .get(&format!("{}embed_tokens.weight", "language_model.model."))
        .with_context(|| format!("{}: not an Asagi (LLaVA) checkpoint", dir.display()))?;
    let n_vocab = embed.shape.first().copied().unwrap_or(0);
    let vocab = vocab::read(dir, n_vocab)?;
    let name =
        dir.canonicalize()?.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "asagi".into());
    let info = ModelInfo {
        license: read_license(dir),
        source_repo: cfg
            .file
            .str_opt("_name_or_path")?
            .filter(|s| s.split('/').count() == 2 && !Path::new(s).exists())
            .map(String::from),
        name: name.clone(),
    };
    let llm_path = opts
        .outfile
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}-{}.gguf", opts.outtype.name().to_uppercase())));
    let mm_path = opts
        .mmproj_outfile
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("mmproj-{name}-{}.gguf", opts.mmproj_outtype.name().to_uppercase())));
    if llm_path == mm_path {
        bail!("the language model and the mmproj would both be written to {}", llm_path.display());
    }
    let mut llm = llm::plan(&cfg, &ckpt, &vocab, opts.outtype, &info, llm_path)?;
    let mut mm = mmproj::plan(&cfg, &ckpt, dir, opts.mmproj_outtype, &info, mm_path)?;
    check_all_used(&cfg, &ckpt, &[&llm, &mm])?;

    let params: usize =
        [&llm, &mm].iter().flat_map(|p| &p.tensors).map(|t| ckpt.get(&t.source).map_or(0, |s| s.numel())).sum();
    let label = size_label(params);
    for p in [&mut llm, &mut mm] {
        // After general.architecture, type and name.
        p.keys.insert(3, ("general.size_label".into(), plan::s(&label)));
    }
    Ok(Conversion { checkpoint: ckpt, llm, mmproj: mm })
}

/// Every checkpoint tensor must be converted or be one Asagi never uses: the vision blocks past the feature layer,
/// `post_layernorm` and the attention-pooling `head` (the authors' saver left them uninitialised).
fn check_all_used(cfg: &AsagiConfig, ckpt: &Checkpoint, plans: &[&FilePlan]) -> Result<()> {
    let used: BTreeSet<&str> = plans.iter().flat_map(|p| p.tensors.iter().map(|t| t.source.as_str())).collect();
    for (name, t) in ckpt.tensors() {
        if used.contains(name.as_str()) {
            continue;
        }
        let rest = name.strip_prefix(mmproj::VISION).unwrap_or("");
        let unused_block = rest
            .strip_prefix("encoder.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= cfg.vision.n_used_layers && i < cfg.vision.n_layer);
        if unused_block || rest.starts_with("post_layernorm.") || rest.starts_with("head.") {
            continue;
        }
        bail!("{}: unexpected tensor {name} (not part of an Asagi checkpoint)", ckpt.path_of(t).display());
    }
    Ok(())
}

fn size_label(params: usize) -> String {
    let p = params as f64;
    if p >= 1e9 {
        format!("{:.1}B", p / 1e9)
    } else if p >= 1e6 {
        format!("{:.0}M", p / 1e6)
    } else {
        format!("{:.0}K", p / 1e3)
    }
}

/// The `license:` of a model card's YAML front matter.
fn read_license(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("README.md")).ok()?;
    let front = text.strip_prefix("---")?.split("\n---").next()?;
    front.lines().find_map(|l| l.strip_prefix("license:")).map(|v| v.trim().trim_matches('"').to_string())
}

/// The plan as a table (`--dry-run`).
pub fn describe(c: &Conversion) -> String {
    let mut out = String::new();
    for p in [&c.llm, &c.mmproj] {
        let _ = writeln!(
            out,
            "{} ({} tensors, {:.1} MiB):",
            p.path.display(),
            p.tensors.len(),
            p.out_bytes() as f64 / 1048576.0
        );
        for t in &p.tensors {
            let src = c.checkpoint.get(&t.source).expect("planned from it");
            let ne = t.ne.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" x ");
            let _ = writeln!(
                out,
                "  {:<28} {:<6} {:<18} {:>12}  <- {} {:?}",
                t.name,
                t.ty.name(),
                ne,
                t.out_bytes(),
                t.source,
                src.dtype
            );
        }
    }
    out
}

/// Refuses to overwrite existing outputs unless `force`.
pub fn check_outputs(c: &Conversion, force: bool) -> Result<()> {
    for p in [&c.llm.path, &c.mmproj.path] {
        if p.exists() && !force {
            bail!("{} exists (use --force to overwrite)", p.display());
        }
    }
    Ok(())
}

/// Writes both files. `cancel` (set by a Ctrl-C handler) stops between chunks; no partial file is left.
pub fn write(c: &Conversion, opts: &Options, cancel: &AtomicBool) -> Result<Vec<Written>> {
    check_outputs(c, opts.force)?;
    let total: u64 = [&c.llm, &c.mmproj]
        .iter()
        .flat_map(|p| &p.tensors)
        .map(|t| c.checkpoint.get(&t.source).map_or(0, |s| s.nbytes() as u64))
        .sum();
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if opts.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    let mut written = Vec::new();
    let mut parts = Vec::new();
    for p in [&c.llm, &c.mmproj] {
        let t0 = Instant::now();
        let (part, bytes) = write::write_file(&c.checkpoint, p, opts.threads, &bar, cancel)?;
        parts.push(part);
        written.push(Written { path: p.path.clone(), bytes, seconds: t0.elapsed().as_secs_f64() });
    }
    // Both files are complete and synced before either gets its name, so an interrupted conversion (Ctrl-C, a
    // kill, a full disk, an unreadable shard) leaves no .gguf, only .part files that the next run overwrites.
    // The language model last: its presence means the pair is whole. The two renames follow each other
    // directly (the folders are synced after), so no kill can fall between them but by microseconds.
    for (part, w) in parts.into_iter().zip(&written).rev() {
        part.commit(&w.path)?;
    }
    for w in &written {
        write::sync_folder(&w.path);
    }
    bar.finish_and_clear();
    Ok(written)
}
