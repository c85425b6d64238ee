//! Where a model's weights live. By default every tensor is used in place from the memory-mapped file. Two
//! things move some of them into buffers of their own, both as llama.cpp does:
//!
//! - `-ngl N`: the offloaded layers are uploaded to the GPU;
//! - repacking (on by default, `--no-repack` turns it off): matrix weights the CPU's extra buffer types accept
//!   (on x86: Q4_0, Q4_K, IQ4_NL with rows in multiples of 8) are rewritten once, at load, into the interleaved
//!   layouts ggml's fastest CPU kernels read (`q4_K_8x8` etc.). Those kernels multiply 4 activation rows per
//!   pass, which is what makes prompt prefill and a 5-beam decode step cheap.
//!
//! Either way the mapped pages of a moved tensor are handed back to the kernel (`GgufFile::upload`), so its
//! memory is counted once.

use anyhow::{Context as _, Result};
use ggml::gguf::GgufFile;
use ggml::{Backend, BufferType, Context};

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

/// Places `file`'s tensors: `gpu` takes the named ones; with `repack`, every other tensor for which `is_matmul`
/// holds (a weight only ever used as the first operand of a matrix product) goes to the first CPU extra buffer
/// type that supports it.
pub fn place(
    file: &GgufFile,
    gpu: Option<(&Backend, &[String])>,
    repack: bool,
    is_matmul: impl Fn(&str) -> bool,
) -> Result<Placement> {
    let mut placement = Placement::default();
    let mut moved: Vec<String> = Vec::new();
    if let Some((backend, names)) = gpu {
        let ctx = file.upload(names, backend.buffer_type()).with_context(|| {
            format!("{}: uploading {} tensors to {}", file.path().display(), names.len(), backend.name())
        })?;
        placement.contexts.push(ctx);
        moved.extend_from_slice(names);
    }
    if repack {
        let extra = BufferType::cpu_extra();
        let mut groups: Vec<(BufferType, Vec<String>, usize)> = extra.iter().map(|&b| (b, Vec::new(), 0)).collect();
        for info in file.tensor_infos() {
            if moved.contains(&info.name) || !is_matmul(&info.name) {
                continue;
            }
            let Some(t) = file.tensor(&info.name) else { continue };
            if let Some(g) = groups.iter_mut().find(|(b, _, _)| b.supports_mul_mat(t)) {
                g.1.push(info.name.clone());
                g.2 += info.size;
            }
        }
        for (buft, names, bytes) in groups.into_iter().filter(|g| !g.1.is_empty()) {
            let ctx = file.upload(&names, buft).with_context(|| {
                format!("{}: repacking {} tensors for {}", file.path().display(), names.len(), buft.name())
            })?;
            placement.contexts.push(ctx);
            placement.repacked.push((buft.name(), names.len(), bytes));
        }
    }
    Ok(placement)
}
