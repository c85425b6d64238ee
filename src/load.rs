//! Opening a model for `run` and `chat`: the GGUF files (memory-mapped), where their weights go (GPU layers,
//! CPU repacking), the tokenizer and the backends. The models themselves borrow from a `Loaded`.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use ggml::gguf::GgufFile;
use ggml::{Backend, Type};

use crate::llm::{is_matmul_weight, offloaded_tensors, LlamaModel, Session, SessionParams};
use crate::tokenizer::Tokenizer;
use crate::vision::VisionModel;
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
}

impl Loaded {
    /// Opens the language model, and the mmproj file when `vision` (it must then be given).
    pub fn open(a: &ModelArgs, vision: bool) -> Result<Loaded> {
        let cache_type = a.cache_type()?;
        if vision && a.mmproj.is_none() {
            bail!("images need --mmproj (the vision encoder's GGUF)");
        }
        let mut llm = GgufFile::open(&a.model)?;
        llm.map_weights()?;
        let (tok, _) = Tokenizer::from_gguf(&llm)?;
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
        let llm_placed =
            weights::place(&llm, gpu.as_ref().map(|g| (g, &offloaded[..])), !a.no_repack, is_matmul_weight)?;
        let mmproj = match (&a.mmproj, vision) {
            (Some(path), true) => {
                let mut f = GgufFile::open(path)?;
                f.map_weights()?;
                let placed = weights::place(&f, None, !a.no_repack, crate::vision::is_matmul_weight)?;
                Some((f, placed))
            }
            _ => None,
        };
        Ok(Loaded { llm, llm_placed, mmproj, tok, cpu, gpu, cache_type, ctx_size: a.ctx_size })
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
