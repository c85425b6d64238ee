//! `Buffer`: an owned ggml backend buffer, optionally keeping a memory map alive (weights used in place).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::sys;

/// Owner of a `ggml_backend_buffer`. Freed on drop, then the memory map it may point into is released.
pub struct Buffer {
    raw: NonNull<sys::ggml_backend_buffer>,
    /// Keeps the mapping alive while ggml points into it (CPU buffers made from a mapped file).
    _map: Option<Arc<memmap2::Mmap>>,
    /// False for the CPU's extra buffer types: they transform data on write and have no way to read it back.
    readable: bool,
}

impl Buffer {
    /// # Safety
    /// `raw` must be a buffer nobody else frees; if it points into `map`, pass the map.
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::ggml_backend_buffer>, map: Option<Arc<memmap2::Mmap>>) -> Buffer {
        // SAFETY: valid buffer; its type is a registry descriptor.
        let buft = unsafe { sys::ggml_backend_buffer_get_type(raw.as_ptr()) };
        let readable = !BufferType::cpu_extra().iter().any(|b| b.as_ptr() == buft);
        Buffer { raw, _map: map, readable }
    }

    /// False for buffers whose data cannot be read back (weights repacked for the CPU's kernels).
    pub fn is_readable(&self) -> bool {
        self.readable
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_backend_buffer {
        self.raw.as_ptr()
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.as_ptr()) }
    }

    /// Locks the buffer's pages in RAM (`mlock`: never swapped out or compressed) when it is host memory; returns
    /// the bytes locked, 0 for device memory. Fails like mlock does (RLIMIT_MEMLOCK, `ulimit -l`).
    pub fn lock_in_ram(&self) -> std::io::Result<usize> {
        // The CPU's extra (repacking) buffers say they are not "host" buffers, since their bytes are not in the
        // tensor's layout, but they live in host RAM all the same: ask for the device too.
        // SAFETY: valid buffer; queries only (a buffer type's device is a registry descriptor or null).
        let (host, base) = unsafe {
            let dev = sys::ggml_backend_buft_get_device(sys::ggml_backend_buffer_get_type(self.as_ptr()));
            let cpu = !dev.is_null() && sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_CPU;
            (cpu || sys::ggml_backend_buffer_is_host(self.as_ptr()), sys::ggml_backend_buffer_get_base(self.as_ptr()))
        };
        let size = self.size();
        if !host || base.is_null() || size == 0 {
            return Ok(0);
        }
        // SAFETY: base..base+size is this buffer's host memory, alive as long as `self`; mlock changes only how the
        // kernel pages it, never its contents. Freeing the buffer unmaps (and so unlocks) it.
        unsafe { rustix::mm::mlock(base, size) }?;
        Ok(size)
    }

    /// Marks the buffer as holding weights (the scheduler then prefers running ops where their weights are).
    pub fn set_usage_weights(&self) {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_set_usage(self.as_ptr(), sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: we own the buffer; the map (if any) is dropped after this, so ggml never sees freed memory.
        unsafe { sys::ggml_backend_buffer_free(self.raw.as_ptr()) }
    }
}

// SAFETY: backend buffers are not tied to a thread; access is serialized through `&mut`/owner borrows.
unsafe impl Send for Buffer {}

/// A ggml buffer type: where a backend allocates (`Backend::buffer_type`), or one of the CPU backend's extra
/// types (`cpu_extra`), whose buffers rearrange weights for faster matrix kernels as they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferType {
    raw: NonNull<sys::ggml_backend_buffer_type>,
}

// SAFETY: buffer types are static descriptors owned by ggml's backend registry, never freed and immutable.
unsafe impl Send for BufferType {}
unsafe impl Sync for BufferType {}

impl BufferType {
    /// # Safety
    /// `raw` must be a buffer type of ggml's registry (they live for the whole program).
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::ggml_backend_buffer_type>) -> BufferType {
        BufferType { raw }
    }

    pub(crate) fn as_ptr(self) -> *mut sys::ggml_backend_buffer_type {
        self.raw.as_ptr()
    }

    /// The CPU backend's extra buffer types, in ggml's order of preference: weight repacking for its
    /// interleaved Q4_0 / Q4_K / IQ4_NL kernels (`CPU_REPACK`), AMX tiles where the build and CPU have them. Their
    /// buffers transform the data on write and cannot be read back.
    pub fn cpu_extra() -> Vec<BufferType> {
        let mut out = Vec::new();
        // SAFETY: the CPU device is always registered; the proc address, when present, has the documented
        // `ggml_backend_dev_get_extra_bufts_t` signature and returns a static, null-terminated array.
        unsafe {
            let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
            if dev.is_null() {
                return out;
            }
            let reg = sys::ggml_backend_dev_backend_reg(dev);
            let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_dev_get_extra_bufts".as_ptr());
            if f.is_null() {
                return out;
            }
            let f: sys::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(f);
            let Some(f) = f else { return out };
            let mut p = f(dev);
            while !p.is_null() && !(*p).is_null() {
                out.push(BufferType::from_raw(NonNull::new_unchecked(*p)));
                p = p.add(1);
            }
        }
        out
    }

    /// The type's name (`CPU`, `CPU_REPACK`, `AMX`, `CUDA0`, ...).
    pub fn name(self) -> String {
        // SAFETY: valid buffer type; static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(self.as_ptr())) }.to_string_lossy().into_owned()
    }

    /// Whether a matrix product `weight x activations` (F32 activations) can run with `weight` stored in a
    /// buffer of this type: the question llama.cpp asks before placing a weight in an extra buffer type (the
    /// answer depends on the weight's type and shape, for example rows in multiples of 8).
    pub fn supports_mul_mat(self, weight: crate::Tensor<'_>) -> bool {
        let Ok(ctx) = crate::Context::new(3, 0) else { return false };
        let ne = weight.ne();
        if weight.n_dims() != 2 {
            return false;
        }
        let w = ctx.new_tensor(weight.ty(), &ne[..2]);
        let x = ctx.new_tensor(crate::Type::F32, &[ne[0], 1]);
        let op = ctx.mul_mat(w, x);
        // SAFETY: a size-0 buffer of this type is a placeholder that owns no memory (ggml returns a dummy buffer for
        // size 0); `w` is a no_alloc header of our own context, so pointing its `buffer` field at the placeholder
        // for the duration of the query, and back to null before the placeholder is freed, affects nothing else.
        unsafe {
            let dev = sys::ggml_backend_buft_get_device(self.as_ptr());
            let dummy = sys::ggml_backend_buft_alloc_buffer(self.as_ptr(), 0);
            if dev.is_null() || dummy.is_null() {
                if !dummy.is_null() {
                    sys::ggml_backend_buffer_free(dummy);
                }
                return false;
            }
            (*w.as_ptr()).buffer = dummy;
            let ok = sys::ggml_backend_dev_supports_op(dev, op.as_ptr());
            (*w.as_ptr()).buffer = std::ptr::null_mut();
            sys::ggml_backend_buffer_free(dummy);
            ok
        }
    }
}
