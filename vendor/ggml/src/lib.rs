//! A thin safe layer over ggml (through `ggml-sys`): RAII owners for contexts, backends, buffers, the scheduler,
//! graphs and GGUF files, plus quantization. All of asagi-gguf's `unsafe` code outside `ggml-sys` is here, and
//! every block says why it is sound.
//!
//! Memory model: a `Context` holds tensor headers only (`no_alloc`). Tensor data lives in backend buffers owned
//! either by the context (weights, caches) or by a `Scheduler` (a graph's intermediates); data is read and written
//! through whichever owner holds it, so a handle can never reach freed memory.

pub use ggml_sys as sys;

mod backend;
mod buffer;
mod context;
mod graph;
mod kernel;
mod log;
mod map_guard;
mod mmap;
mod ops;
mod pod;
mod quant;
mod sched;
mod tensor;
mod types;

pub mod gguf;
pub mod rpc;

pub use backend::{devices, Backend, Device, DeviceKind};
pub use buffer::{Buffer, BufferType};
pub use context::Context;
pub use graph::{Graph, KeptGraph, Within};
pub use kernel::{multi_row_kernel, multi_row_kernel_takes, MultiRowKernel, MAX_ROWS as MULTI_ROW_KERNEL_MAX_ROWS};
pub use log::log_to_stderr;
pub use map_guard::FileWatch;
pub use mmap::{page_size, MappedFile};
pub use ops::{RopeMode, RopeParams};
pub use pod::Pod;
pub use quant::{dequantize, quantize};
pub use sched::Scheduler;
pub use tensor::Tensor;
pub use types::Type;

use std::path::PathBuf;

/// Errors of the ggml layer. Messages name the file, key or tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ggml could not allocate memory ({0})")]
    OutOfMemory(&'static str),
    #[error("backend {0} could not be initialized")]
    Backend(String),
    #[error("graph computation failed (ggml status {0})")]
    Compute(i32),
    #[error("tensor {0:?} has no data in this owner's buffers")]
    NotAllocated(String),
    #[error("tensor {tensor:?}: {got} bytes given, {expected} expected")]
    Size { tensor: String, expected: usize, got: usize },
    #[error("quantization: {0}")]
    Quantize(String),
    #[error("{}: {msg}", path.display())]
    Gguf { path: PathBuf, msg: String },
    #[error("{}: key {key}: {msg}", path.display())]
    Key { path: PathBuf, key: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    /// An RPC server could not be used, or failed (see `rpc`); the message names it.
    #[error("{0}")]
    Rpc(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// ggml's version string (`0.26.0`).
pub fn version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(sys::ggml_version()) }.to_string_lossy().into_owned()
}

/// The CPU features ggml was compiled with and found at run time (`AVX2 = 1 | AVX512 = 1 | ...`).
pub fn cpu_features() -> String {
    // SAFETY: feature probes without arguments.
    let f = unsafe {
        [
            ("AVX", sys::ggml_cpu_has_avx()),
            ("AVX2", sys::ggml_cpu_has_avx2()),
            ("FMA", sys::ggml_cpu_has_fma()),
            ("F16C", sys::ggml_cpu_has_f16c()),
            ("AVX512", sys::ggml_cpu_has_avx512()),
            ("AVX512_VNNI", sys::ggml_cpu_has_avx512_vnni()),
            ("AVX512_BF16", sys::ggml_cpu_has_avx512_bf16()),
            ("AMX_INT8", sys::ggml_cpu_has_amx_int8()),
            ("NEON", sys::ggml_cpu_has_neon()),
            ("ARM_FMA", sys::ggml_cpu_has_arm_fma()),
            ("DOTPROD", sys::ggml_cpu_has_dotprod()),
            ("FP16_VA", sys::ggml_cpu_has_fp16_va()),
        ]
    };
    f.iter().filter(|(_, v)| *v != 0).map(|(n, _)| *n).collect::<Vec<_>>().join(" ")
}
