//! `Backend`: an owned ggml compute backend (CPU with a thread count, or a GPU device from ggml's registry).

use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::{sys, Error, Result};

/// Kind of device, as ggml's registry reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
}

/// A device compiled into this build (CPU always; CUDA, Metal, Vulkan with their cargo features).
#[derive(Clone, Debug)]
pub struct Device {
    pub index: usize,
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free: usize,
    pub memory_total: usize,
}

fn c_str(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings owned by the (static) device registry.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Lists the devices of ggml's registry.
pub fn devices() -> Vec<Device> {
    // SAFETY: the registry is static and initialized on first use; indices are below ggml_backend_dev_count.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                Device {
                    index: i,
                    name: c_str(sys::ggml_backend_dev_name(dev)),
                    description: c_str(sys::ggml_backend_dev_description(dev)),
                    kind: match sys::ggml_backend_dev_type(dev) {
                        sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                        sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                        sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                        _ => DeviceKind::Accelerator,
                    },
                    memory_free: free,
                    memory_total: total,
                }
            })
            .collect()
    }
}

/// Owner of a `ggml_backend`.
pub struct Backend {
    raw: NonNull<sys::ggml_backend>,
    is_cpu: bool,
    /// For a device of an RPC server: the relay's record of the server's health (`crate::rpc`) and the device.
    rpc: Option<(Arc<crate::rpc::State>, u32)>,
}

impl Backend {
    /// The CPU backend with `n_threads` worker threads.
    pub fn cpu(n_threads: usize) -> Result<Backend> {
        // SAFETY: creates a fresh backend; null on failure.
        let raw = unsafe { sys::ggml_backend_cpu_init() };
        let b = Backend { raw: NonNull::new(raw).ok_or(Error::Backend("CPU".into()))?, is_cpu: true, rpc: None };
        b.set_n_threads(n_threads);
        Ok(b)
    }

    /// A backend on device `index` of `devices()`.
    pub fn device(index: usize) -> Result<Backend> {
        // SAFETY: bounds-checked index into the static registry.
        unsafe {
            if index >= sys::ggml_backend_dev_count() {
                return Err(Error::Backend(format!("no device {index}")));
            }
            let dev = sys::ggml_backend_dev_get(index);
            let is_cpu = sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_CPU;
            let raw = sys::ggml_backend_dev_init(dev, std::ptr::null());
            let name = c_str(sys::ggml_backend_dev_name(dev));
            Ok(Backend { raw: NonNull::new(raw).ok_or(Error::Backend(name))?, is_cpu, rpc: None })
        }
    }

    /// The first GPU (discrete, then integrated) of the registry, if this build has one and a device is present.
    pub fn first_gpu() -> Option<Backend> {
        let devs = devices();
        [DeviceKind::Gpu, DeviceKind::IntegratedGpu]
            .iter()
            .find_map(|k| devs.iter().find(|d| d.kind == *k))
            .and_then(|d| Backend::device(d.index).ok())
    }

    /// A backend ggml made for a device of an RPC server (`RpcLink::backend`).
    pub(crate) fn from_rpc(raw: NonNull<sys::ggml_backend>, state: Arc<crate::rpc::State>, device: u32) -> Backend {
        Backend { raw, is_cpu: false, rpc: Some((state, device)) }
    }

    /// True for a device of an RPC server.
    pub fn is_rpc(&self) -> bool {
        self.rpc.is_some()
    }

    /// Whether this backend computes on tensors held in buffers of type `buft` (its own type; for the CPU also
    /// host memory and its extra types).
    pub fn supports_buft(&self, buft: crate::BufferType) -> bool {
        // SAFETY: a valid backend and a buffer type that lives for the program.
        unsafe { sys::ggml_backend_supports_buft(self.as_ptr(), buft.as_ptr()) }
    }

    /// Ok unless this is a device of an RPC server that has failed (the error names the server).
    pub fn health(&self) -> Result<()> {
        match &self.rpc {
            Some((state, _)) => crate::rpc::health(state),
            None => Ok(()),
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_backend {
        self.raw.as_ptr()
    }

    /// The buffer type this backend allocates in by default (its device memory; host memory for the CPU).
    pub fn buffer_type(&self) -> crate::BufferType {
        // SAFETY: valid backend; the default buffer type is a registry descriptor, never null.
        unsafe {
            crate::BufferType::from_raw(
                NonNull::new(sys::ggml_backend_get_default_buffer_type(self.as_ptr())).expect("backend buffer type"),
            )
        }
    }

    /// True for the CPU backend.
    pub fn is_cpu(&self) -> bool {
        self.is_cpu
    }

    /// The backend's name (`CPU`, `CUDA0`, ..., `RPC0[host:port]` for device 0 of an RPC server).
    pub fn name(&self) -> String {
        if let Some((state, device)) = &self.rpc {
            // (ggml's name would show the relay's local endpoint.)
            return format!("RPC{device}[{}]", state.remote);
        }
        // SAFETY: valid backend; static string.
        c_str(unsafe { sys::ggml_backend_name(self.as_ptr()) })
    }

    /// Sets the worker-thread count (CPU backend only; a no-op elsewhere).
    pub fn set_n_threads(&self, n: usize) {
        if self.is_cpu {
            // SAFETY: the backend is a CPU backend (checked), as this function requires.
            unsafe { sys::ggml_backend_cpu_set_n_threads(self.as_ptr(), n.max(1) as i32) }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: we own the backend. Buffers are independent of backend instances in ggml, so freeing the backend
        // while a buffer it allocated still lives is allowed (llama.cpp does the same).
        unsafe { sys::ggml_backend_free(self.raw.as_ptr()) }
    }
}

// SAFETY: a backend may be moved between threads; it is used through `&self` by one thread at a time
// (`Backend` is not Sync).
unsafe impl Send for Backend {}
