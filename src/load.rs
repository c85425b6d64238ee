//! Opening a model for `run` and `chat`: the GGUF files (memory-mapped), where their weights go (GPU layers,
//! CPU repacking), the tokenizer and the backends. The models themselves borrow from a `Loaded`.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use ggml::gguf::GgufFile;
use ggml::{Backend, Type};

use crate::devices::{Remotes, Split};
use crate::llm::{is_matmul_weight, offloaded_tensors, HParams, KvCache, LlamaModel, Session, SessionParams};
use crate::memory::{self, Estimate, MemCheck};
use crate::tokenizer::Tokenizer;
use crate::vision::{VisionEncoder, VisionModel};
use crate::weights::{self, Offload, Placement};

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
    /// Split the language model's blocks across this machine and these RPC servers (`asagi-gguf rpc-server` on
    /// other machines of a trusted network): HOST:PORT[,HOST:PORT...]. Each block's weights and KV cache go to
    /// its device; the vision encoder and sampling stay here.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
    pub rpc: Vec<String>,
    /// Shares of the blocks for this machine, then each RPC server's device, e.g. 1,3 [default: in proportion to
    /// the memory each reports].
    #[arg(long, value_delimiter = ',', value_name = "SHARES", requires = "rpc")]
    pub tensor_split: Vec<f64>,
    /// Seconds an RPC server may take to answer (one computation of its blocks) before it counts as hung.
    #[arg(long, default_value_t = 300, value_name = "SECONDS", requires = "rpc")]
    pub rpc_timeout: u64,
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
            rpc: Vec::new(),
            tensor_split: Vec::new(),
            rpc_timeout: 300,
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
    /// The RPC servers holding some of the blocks (`--rpc`), and how the blocks are split.
    pub remotes: Remotes,
    pub split: Option<Split>,
    n_gpu_layers: usize,
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
        let mmproj = match (&a.mmproj, vision) {
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
        let mut offload = match &gpu {
            Some(g) => vec![Offload {
                buft: g.buffer_type(),
                label: g.name(),
                names: offloaded_tensors(&llm, a.n_gpu_layers)?,
                remote: false,
            }],
            None => Vec::new(),
        };
        // --rpc: the servers are reached and checked before anything is loaded.
        if !a.rpc.is_empty() && a.n_gpu_layers > 0 {
            bail!("--rpc together with --n-gpu-layers is not supported yet: split across this machine's CPU and the servers, or use the GPU alone");
        }
        if a.rpc_timeout == 0 || a.rpc_timeout > 86_400 {
            bail!("--rpc-timeout {}: between 1 and 86400 seconds", a.rpc_timeout);
        }
        let remotes = Remotes::connect(&a.rpc, std::time::Duration::from_secs(a.rpc_timeout))?;
        let split = match remotes.is_empty() {
            true => None,
            false => {
                let split = Split::new(&llm, HParams::read(&llm)?.n_layer, &remotes, &a.tensor_split)?;
                eprintln!("{}", split.summary(&remotes));
                offload.extend(split.offload.iter().cloned());
                Some(split)
            }
        };
        let llm_plan = weights::plan(&llm, offload, !a.no_repack, is_matmul_weight);
        let mm_plan =
            mmproj.as_ref().map(|f| weights::plan(f, Vec::new(), !a.no_repack, crate::vision::is_matmul_weight));

        let estimate =
            estimate(&llm, &llm_plan, mmproj.as_ref().zip(mm_plan.as_ref()), &cpu, a, cache_type, split.as_ref())?;
        if let Some(split) = &split {
            check_remote_memory(&llm, split, &remotes, a, cache_type)?;
        }

        // (A server that failed during the upload shows as a failed allocation or copy: say which.)
        let llm_placed = weights::apply(&llm, &llm_plan).map_err(|e| remotes.health().err().unwrap_or(e))?;
        remotes.health()?;
        if a.mlock {
            lock_weights(&llm, &llm_placed, &llm_plan.moved());
        }
        let mmproj = match (mmproj, mm_plan) {
            (Some(f), Some(p)) => {
                let placed = weights::apply(&f, &p)?;
                if a.mlock {
                    lock_weights(&f, &placed, &p.moved());
                }
                Some((f, placed))
            }
            _ => None,
        };
        Ok(Loaded {
            llm,
            llm_placed,
            mmproj,
            tok,
            cpu,
            gpu,
            remotes,
            split,
            n_gpu_layers: a.n_gpu_layers,
            cache_type,
            ctx_size: a.ctx_size,
            estimate,
        })
    }

    /// The language model's backends: GPU first (when there is one), the RPC servers' devices, CPU last.
    pub fn backends(&self) -> Vec<&Backend> {
        self.gpu.iter().chain(self.remotes.devices.iter().map(|d| &d.backend)).chain([&self.cpu]).collect()
    }

    /// The vision encoder's backends: this machine's (the encoder never runs on an RPC server).
    pub fn vision_backends(&self) -> Vec<&Backend> {
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

    /// A session with the requested context size (default: the training context) and cache type, each layer's
    /// KV cache where its block runs.
    pub fn session<'a>(&self, model: &'a LlamaModel<'a>, backends: &[&'a Backend]) -> Result<Session<'a>> {
        let n_ctx = self.ctx_size.unwrap_or(model.hp.n_ctx_train);
        let n_layer = model.hp.n_layer;
        let first_gpu_layer = n_layer.saturating_sub(self.n_gpu_layers);
        let layer_buffers = (0..n_layer)
            .map(|il| match (&self.split, &self.gpu) {
                (Some(s), _) if s.assign[il] > 0 => self.remotes.devices[s.assign[il] - 1].buft,
                (None, Some(gpu)) if il >= first_gpu_layer => gpu.buffer_type(),
                _ => self.cpu.buffer_type(),
            })
            .collect();
        let params = SessionParams { n_ctx, cache_type: self.cache_type, layer_buffers, ..Default::default() };
        Session::new(model, backends, &params).map_err(|e| self.remotes.health().err().unwrap_or(e))
    }

    /// The identities of the language model's file and the mmproj file (if opened): cache keys
    /// (`cache::identity`).
    pub fn identities(&self) -> Result<([u8; 32], Option<[u8; 32]>)> {
        let llm = crate::cache::identity::file_identity(&self.llm)?;
        let mmproj = self.mmproj.as_ref().map(|(f, _)| crate::cache::identity::file_identity(f)).transpose()?;
        Ok((llm, mmproj))
    }

    /// Watches on the mapped model files (`ggml::FileWatch`): whether one changed on disk since loading.
    pub fn watches(&self) -> Vec<ggml::FileWatch> {
        std::iter::once(&self.llm).chain(self.mmproj.as_ref().map(|(f, _)| f)).filter_map(|f| f.watch()).collect()
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

/// Refuses a split that gives an RPC server more than the memory it reports free (weights and KV cache of its
/// blocks; the server's compute buffer comes on top), unless `--mem-check off`.
fn check_remote_memory(llm: &GgufFile, split: &Split, remotes: &Remotes, a: &ModelArgs, ty: Type) -> Result<()> {
    let hp = HParams::read(llm)?;
    let n_ctx = a.ctx_size.unwrap_or(hp.n_ctx_train);
    let kv_block = KvCache::bytes_for(&hp, n_ctx, ty).unwrap_or(usize::MAX) / hp.n_layer.max(1);
    for (i, (d, o)) in remotes.devices.iter().zip(&split.offload).enumerate() {
        let weights = weights::bytes_of(llm, &o.names) as u64;
        let kv = (kv_block as u64).saturating_mul(split.blocks_on(1 + i) as u64);
        let need = weights + kv;
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        eprintln!(
            "{}: {} weights + {} KV cache, reports {} free",
            d.label,
            gb(weights),
            gb(kv),
            gb(d.memory_free as u64)
        );
        if need > d.memory_free as u64 && a.mem_check == MemCheck::On {
            bail!(
                "{} would hold {} (weights {} + KV cache {}) but reports {} free: give it a smaller share \
                 (--tensor-split), use a smaller -c, or --mem-check off",
                d.label,
                gb(need),
                gb(weights),
                gb(kv),
                gb(d.memory_free as u64)
            );
        }
    }
    Ok(())
}

/// `--mlock`: pins a file's weights in RAM, the mapped pages used in place and the copies of the moved ones. A lock
/// that fails (RLIMIT_MEMLOCK) is a warning, as in llama.cpp: the model still runs, only unpinned.
fn lock_weights(file: &GgufFile, placed: &Placement, moved: &[String]) {
    let locked = file
        .lock_in_place(moved)
        .map_err(anyhow::Error::from)
        .and_then(|m| Ok(m + placed.contexts.iter().try_fold(0, |n, c| c.lock_in_ram().map(|b| n + b))?));
    match locked {
        Ok(bytes) => eprintln!("{}: locked {:.2} GB of weights in RAM", file.path().display(), bytes as f64 / 1e9),
        Err(e) => eprintln!("warning: --mlock: {e:#} (raise `ulimit -l`; the weights stay unlocked)"),
    }
}

/// The memory the model will hold once loaded and run (`crate::memory`), printed, and checked against what is
/// available (`--mem-check`). The placement plans give the weights and the KV cache's shape its size: a model that
/// does not fit even so is refused before any buffer is made. Then a session and a vision encoder over the
/// weights in place give the compute buffers ggml reserves (address space only: nothing touched, nothing
/// computed), and the process's resident memory the rest.
fn estimate(
    llm: &GgufFile,
    llm_plan: &weights::Plan,
    mmproj: Option<(&GgufFile, &weights::Plan)>,
    cpu: &Backend,
    a: &ModelArgs,
    cache_type: Type,
    split: Option<&Split>,
) -> Result<Estimate> {
    let model = LlamaModel::load(llm)?;
    let n_ctx = a.ctx_size.unwrap_or(model.hp.n_ctx_train);
    let kv = KvCache::bytes_for(&model.hp, n_ctx, cache_type)
        .with_context(|| format!("a KV cache of {n_ctx} cells of {cache_type} does not fit this model"))?;
    // With --rpc, this machine holds the cache of its own blocks only.
    let (kv, kv_remote) = match split {
        Some(s) => {
            let here = kv / model.hp.n_layer.max(1) * s.blocks_on(0);
            (here, kv - here)
        }
        None => (kv, 0),
    };
    let mut e = Estimate {
        weights_mapped: llm_plan.mapped_bytes(llm) as u64,
        weights_repacked: llm_plan.repacked_bytes() as u64,
        weights_gpu: llm_plan.offload_bytes(llm, false) as u64,
        weights_remote: llm_plan.offload_bytes(llm, true) as u64,
        kv_remote: kv_remote as u64,
        kv: kv as u64,
        kv_cells: n_ctx,
        kv_type: cache_type.to_string(),
        program: memory::resident().unwrap_or(0),
        ..Default::default()
    };
    if let Some((file, plan)) = mmproj {
        e.weights_mapped += plan.mapped_bytes(file) as u64;
        e.weights_repacked += plan.repacked_bytes() as u64;
    }
    let available = memory::available();
    memory::check(&e, available.as_ref(), a.mem_check)?;

    let session = Session::new(&model, &[cpu], &SessionParams { n_ctx, cache_type, ..Default::default() })?;
    e.compute_llm = session.compute_bytes() as u64;
    e.step = session.host_step_bytes() as u64;
    if let Some((file, _)) = mmproj {
        let vmodel = VisionModel::load(file)?;
        e.compute_vision = VisionEncoder::new(&vmodel, &[cpu])?.compute_bytes() as u64;
    }
    eprintln!("{}", e.summary());
    memory::check(&e, available.as_ref(), a.mem_check)?;
    Ok(e)
}
