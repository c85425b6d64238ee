//! Opening a model for `run` and `chat`: the GGUF files (memory-mapped), where their weights go (GPU layers,
//! CPU repacking), the tokenizer and the backends. The models themselves borrow from a `Loaded`.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use ggml::gguf::GgufFile;
use ggml::{Backend, Type};

use crate::llm::{is_matmul_weight, offloaded_tensors, LlamaModel, Session, SessionParams};
use crate::memory::{self, Estimate, MemCheck};
use crate::tokenizer::Tokenizer;
use crate::vision::{VisionEncoder, VisionModel};
use crate::weights::{self, Placement};

/// The model files and how to run them (shared by `run` and `chat`).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Language-model GGUF.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// mmproj GGUF (vision encoder + projector), needed for images.
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// Context size in tokens [default: the model's training context].
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// Layers to run on the GPU (the last N blocks; more than the block count also takes the output layer).
    /// Needs a build with --features cuda, metal or vulkan.
    #[arg(long = "n-gpu-layers", visible_alias = "ngl", default_value_t = 0)]
    pub n_gpu_layers: usize,
    /// Use the weights as stored, without repacking Q4_0/Q4_K/IQ4_NL matrices into the CPU's interleaved layouts
    /// (slower prefill and beam steps; the file's pages can be dropped by the kernel under memory pressure).
    #[arg(long)]
    pub no_repack: bool,
    /// KV cache type: f16, f32 or q8_0.
    #[arg(long, default_value = "f16")]
    pub cache_type: String,
    /// Worker threads [default: physical cores].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Before loading, estimate the memory the model will hold (weights, KV cache at the full context, compute
    /// buffers) and refuse when it exceeds the available memory (MemAvailable or the cgroup limit); `off` loads
    /// anyway.
    #[arg(long, value_enum, default_value_t = MemCheck::On)]
    pub mem_check: MemCheck,
    /// Lock the weights in RAM (mlock), as llama.cpp's --mlock: the kernel never drops or swaps them out.
    /// Needs a large enough `ulimit -l` (RLIMIT_MEMLOCK); if the lock fails a warning says so and loading goes on.
    #[arg(long)]
    pub mlock: bool,
}

impl ModelArgs {
    /// The files as given, with the defaults of everything else.
    pub fn new(model: PathBuf, mmproj: Option<PathBuf>) -> ModelArgs {
        ModelArgs {
            model,
            mmproj,
            ctx_size: None,
            n_gpu_layers: 0,
            no_repack: false,
            cache_type: "f16".into(),
            threads: None,
            mem_check: MemCheck::On,
            mlock: false,
        }
    }

    fn cache_type(&self) -> Result<Type> {
        Ok(match self.cache_type.to_ascii_lowercase().as_str() {
            "f16" => Type::F16,
            "f32" => Type::F32,
            "q8_0" => Type::Q8_0,
            other => bail!("--cache-type {other}: one of f16, f32, q8_0"),
        })
    }
}

/// Everything the models borrow.
pub struct Loaded {
    pub llm: GgufFile,
    llm_placed: Placement,
    mmproj: Option<(GgufFile, Placement)>,
    pub tok: Tokenizer,
    cpu: Backend,
    gpu: Option<Backend>,
    cache_type: Type,
    ctx_size: Option<usize>,
    /// What `open` estimated it would hold (printed before loading).
    pub estimate: Estimate,
}

impl Loaded {
    /// Opens the language model, and the mmproj file when `vision` (it must then be given). Before any weight is
    /// copied or any cache page touched, prints the memory estimate (`crate::memory`) and refuses a model that
    /// does not fit (unless `--mem-check off`).
    pub fn open(a: &ModelArgs, vision: bool) -> Result<Loaded> {
        let cache_type = a.cache_type()?;
        if vision && a.mmproj.is_none() {
            bail!("images need --mmproj (the vision encoder's GGUF)");
        }
        // Opening and mapping read headers only: the weights' pages are read on first use.
        let mut llm = GgufFile::open(&a.model)?;
        llm.map_weights()?;
        let (tok, _) = Tokenizer::from_gguf(&llm)?;
        let mut mmproj = match (&a.mmproj, vision) {
            (Some(path), true) => {
                let mut f = GgufFile::open(path)?;
                f.map_weights()?;
                Some(f)
            }
            _ => None,
        };
        let cpu = Backend::cpu(a.threads.unwrap_or_else(num_cpus::get_physical))?;
        // -ngl: upload the offloaded layers to the GPU; the scheduler runs each op where its weights are.
        let gpu = match a.n_gpu_layers {
            0 => None,
            _ => Some(Backend::first_gpu().context(
                "-ngl needs a GPU: this build has no GPU backend or found no device (build with --features cuda, metal or vulkan)",
            )?),
        };
        let offloaded = match &gpu {
            Some(_) => offloaded_tensors(&llm, a.n_gpu_layers)?,
            None => Vec::new(),
        };
        let llm_plan = weights::plan(&llm, &offloaded, !a.no_repack, is_matmul_weight);
        let mm_plan = mmproj.as_ref().map(|f| weights::plan(f, &[], !a.no_repack, crate::vision::is_matmul_weight));

        let estimate = estimate(&llm, &llm_plan, mmproj.as_ref().zip(mm_plan.as_ref()), &cpu, a.ctx_size, cache_type)?;
        eprintln!("{}", estimate.summary());
        memory::check(&estimate, memory::available().as_ref(), a.mem_check)?;

        let llm_placed = weights::apply(&llm, &llm_plan, gpu.as_ref())?;
        let mmproj = match (mmproj.take(), mm_plan) {
            (Some(f), Some(p)) => {
                let placed = weights::apply(&f, &p, None)?;
                Some((f, placed, p.moved()))
            }
            _ => None,
        };
        if a.mlock {
            let files = [(&llm, &llm_placed, llm_plan.moved())].into_iter().chain(mmproj.iter().map(|(f, p, m)| (f, p, m.clone())));
            let mut locked = 0;
            for (file, placed, moved) in files {
                let copies: std::io::Result<usize> = placed.contexts.iter().try_fold(0, |n, c| Ok(n + c.lock_in_ram()?));
                match (file.lock_in_place(&moved), copies) {
                    (Ok(m), Ok(c)) => locked += m + c,
                    (Err(e), _) => eprintln!("warning: --mlock: {e} (raise `ulimit -l`; loading goes on unlocked)"),
                    (_, Err(e)) => eprintln!("warning: --mlock of repacked weights: {e} (raise `ulimit -l`)"),
                }
            }
            eprintln!("locked {:.2} GB of weights in RAM", locked as f64 / 1e9);
        }
        let mmproj = mmproj.map(|(f, p, _)| (f, p));
        Ok(Loaded { llm, llm_placed, mmproj, tok, cpu, gpu, cache_type, ctx_size: a.ctx_size, estimate })
    }

    /// GPU first (when there is one), CPU last.
    pub fn backends(&self) -> Vec<&Backend> {
        self.gpu.iter().chain([&self.cpu]).collect()
    }

    pub fn model(&self) -> Result<LlamaModel<'_>> {
        LlamaModel::load_with(&self.llm, &self.llm_placed.contexts)
    }

    /// The vision tower, if opened; checked to project to the language model's width.
    pub fn vision(&self, model: &LlamaModel<'_>) -> Result<Option<VisionModel<'_>>> {
        let Some((file, placed)) = &self.mmproj else { return Ok(None) };
        let v = VisionModel::load_with(file, &placed.contexts)?;
        if v.hp.n_mmproj != model.hp.n_embd {
            bail!(
                "{} projects to {} values but the language model's embeddings have {}",
                file.path().display(),
                v.hp.n_mmproj,
                model.hp.n_embd
            );
        }
        Ok(Some(v))
    }

    /// A session with the requested context size (default: the training context) and cache type.
    pub fn session<'a>(&self, model: &'a LlamaModel<'a>, backends: &[&'a Backend]) -> Result<Session<'a>> {
        let n_ctx = self.ctx_size.unwrap_or(model.hp.n_ctx_train);
        Session::new(model, backends, &SessionParams { n_ctx, cache_type: self.cache_type, ..Default::default() })
    }

    /// What was repacked, one line per file (for the load log).
    pub fn placement_summary(&self) -> Vec<String> {
        [(&self.llm, &self.llm_placed)]
            .into_iter()
            .chain(self.mmproj.iter().map(|(f, p)| (f, p)))
            .filter_map(|(f, p)| p.summary().map(|s| format!("{}: {s}", f.path().display())))
            .collect()
    }
}

/// The memory the model will hold once loaded and run (`crate::memory`): the placement plans give the weights, a
/// session and a vision encoder built over the weights in place give the KV cache and the compute buffers ggml
/// reserves (address space only: nothing is touched, nothing computed), the process's resident memory the rest.
fn estimate(
    llm: &GgufFile,
    llm_plan: &weights::Plan,
    mmproj: Option<(&GgufFile, &weights::Plan)>,
    cpu: &Backend,
    ctx_size: Option<usize>,
    cache_type: Type,
) -> Result<Estimate> {
    let model = LlamaModel::load(llm)?;
    let n_ctx = ctx_size.unwrap_or(model.hp.n_ctx_train);
    let session = Session::new(&model, &[cpu], &SessionParams { n_ctx, cache_type, ..Default::default() })?;
    let mut e = Estimate {
        weights_mapped: llm_plan.mapped_bytes(llm) as u64,
        weights_repacked: llm_plan.repacked_bytes() as u64,
        weights_gpu: llm_plan.gpu_bytes(llm) as u64,
        kv: session.cache.bytes() as u64,
        kv_cells: session.cache.n_cells(),
        kv_type: cache_type.to_string(),
        compute_llm: session.compute_bytes() as u64,
        step: session.host_step_bytes() as u64,
        ..Default::default()
    };
    if let Some((file, plan)) = mmproj {
        let vmodel = VisionModel::load(file)?;
        e.weights_mapped += plan.mapped_bytes(file) as u64;
        e.weights_repacked += plan.repacked_bytes() as u64;
        e.compute_vision = VisionEncoder::new(&vmodel, &[cpu])?.compute_bytes() as u64;
    }
    e.program = memory::resident().unwrap_or(0);
    Ok(e)
}
