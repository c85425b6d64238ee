//! Where a model's weights live. By default every tensor is used in place from the memory-mapped file. Two
//! things move some of them into buffers of their own, both as llama.cpp does:
//!
//! - `-ngl N`: the offloaded layers are uploaded to the GPU; `--rpc`: the blocks placed on RPC servers are uploaded
//!   to them (`crate::devices`);
//! - repacking (on by default, `--no-repack` turns it off): matrix weights the CPU's extra buffer types accept
//!   (on x86: Q4_0, Q4_K, IQ4_NL with rows in multiples of 8) are rewritten once, at load, into the interleaved
//!   layouts ggml's fastest CPU kernels read (`q4_K_8x8` etc.). Those kernels multiply 4 activation rows per
//!   pass, which is what makes prompt prefill and a 5-beam decode step cheap.
//!
//! Either way the mapped pages of a moved tensor are handed back to the kernel (`GgufFile::upload`), so its
//! memory is counted once.

use anyhow::{Context as _, Result};
use ggml::gguf::GgufFile;
use ggml::{BufferType, Context};

/// The extra buffers holding some of a file's tensors (models look names up there first, then in the file).
#[derive(Default)]
pub struct Placement {
    pub contexts: Vec<Context>,
    /// Tensors and bytes repacked for the CPU, per buffer type name.
    pub repacked: Vec<(String, usize, usize)>,
}

impl Placement {
    /// One line for the load log, e.g. `repacked 196 tensors (2.01 GB) for CPU_REPACK`.
    pub fn summary(&self) -> Option<String> {
        let parts: Vec<String> = self
            .repacked
            .iter()
            .map(|(name, n, bytes)| format!("{n} tensors ({:.2} GB) for {name}", *bytes as f64 / 1e9))
            .collect();
        (!parts.is_empty()).then(|| format!("repacked {}", parts.join(", ")))
    }
}

/// Tensors to upload to a device other than this machine's CPU: a GPU, or a device of an RPC server.
#[derive(Clone, Debug)]
pub struct Offload {
    pub buft: BufferType,
    /// The device for messages (`CUDA0`, `RPC server 10.0.0.2:50052`).
    pub label: String,
    pub names: Vec<String>,
    /// True for an RPC server's device (its memory is that machine's, not this one's).
    pub remote: bool,
}

/// Where `place` will put a file's tensors, decided without copying anything (the memory estimate reads it).
pub struct Plan {
    /// Tensors for other devices.
    pub offload: Vec<Offload>,
    /// Per CPU extra buffer type: the tensors it repacks and their bytes.
    pub repack: Vec<(BufferType, Vec<String>, usize)>,
}

impl Plan {
    /// Bytes that stay in the mapped file (read in place).
    pub fn mapped_bytes(&self, file: &GgufFile) -> usize {
        file.tensor_infos().iter().filter(|i| !self.moves(&i.name)).map(|i| i.size).sum()
    }

    pub fn repacked_bytes(&self) -> usize {
        self.repack.iter().map(|g| g.2).sum()
    }

    /// Bytes of the tensors going to local GPUs (`remote` false) or to RPC servers (`remote` true).
    pub fn offload_bytes(&self, file: &GgufFile, remote: bool) -> usize {
        self.offload.iter().filter(|o| o.remote == remote).map(|o| bytes_of(file, &o.names)).sum()
    }

    /// Tensors moved out of the mapping (to another device or repacked).
    pub fn moved(&self) -> Vec<String> {
        self.offloaded().chain(self.repack.iter().flat_map(|g| g.1.iter())).cloned().collect()
    }

    fn offloaded(&self) -> impl Iterator<Item = &String> {
        self.offload.iter().flat_map(|o| o.names.iter())
    }

    fn moves(&self, name: &str) -> bool {
        self.offloaded().any(|n| n == name) || self.repack.iter().any(|g| g.1.iter().any(|n| n == name))
    }
}

/// Bytes of the named tensors in the file.
pub fn bytes_of(file: &GgufFile, names: &[String]) -> usize {
    file.tensor_infos().iter().filter(|i| names.contains(&i.name)).map(|i| i.size).sum()
}

/// Decides placement: `offload` tensors go to their devices; with `repack`, every other tensor for which
/// `is_matmul` holds (a weight only ever used as the first operand of a matrix product) goes to the first CPU extra
/// buffer type that supports it (ggml answers for this CPU, type and shape).
pub fn plan(file: &GgufFile, offload: Vec<Offload>, repack: bool, is_matmul: impl Fn(&str) -> bool) -> Plan {
    let mut groups: Vec<(BufferType, Vec<String>, usize)> = Vec::new();
    if repack {
        groups = BufferType::cpu_extra().iter().map(|&b| (b, Vec::new(), 0)).collect();
        for info in file.tensor_infos() {
            if offload.iter().any(|o| o.names.contains(&info.name)) || !is_matmul(&info.name) {
                continue;
            }
            let Some(t) = file.tensor(&info.name) else { continue };
            if let Some(g) = groups.iter_mut().find(|(b, _, _)| b.supports_mul_mat(t)) {
                g.1.push(info.name.clone());
                g.2 += info.size;
            }
        }
        groups.retain(|g| !g.1.is_empty());
    }
    Plan { offload, repack: groups }
}

/// Carries out `plan`: uploads to the other devices, repacks for the CPU (the mapped pages of each moved tensor
/// are handed back as it is copied).
pub fn apply(file: &GgufFile, plan: &Plan) -> Result<Placement> {
    let mut placement = Placement::default();
    for o in plan.offload.iter().filter(|o| !o.names.is_empty()) {
        let ctx = file.upload(&o.names, o.buft).with_context(|| {
            format!(
                "{}: uploading {} tensors ({:.2} GB) to {}",
                file.path().display(),
                o.names.len(),
                bytes_of(file, &o.names) as f64 / 1e9,
                o.label
            )
        })?;
        placement.contexts.push(ctx);
    }
    for (buft, names, bytes) in &plan.repack {
        let ctx = file.upload(names, *buft).with_context(|| {
            format!("{}: repacking {} tensors for {}", file.path().display(), names.len(), buft.name())
        })?;
        placement.contexts.push(ctx);
        placement.repacked.push((buft.name(), names.len(), *bytes));
    }
    Ok(placement)
}

/// `plan` then `apply` in one step.
pub fn place(
    file: &GgufFile,
    offload: Vec<Offload>,
    repack: bool,
    is_matmul: impl Fn(&str) -> bool,
) -> Result<Placement> {
    apply(file, &plan(file, offload, repack, is_matmul))
}
