//! `Buffer`: an owned ggml backend buffer, optionally keeping a memory map alive (weights used in place).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::sys;

/// Owner of a `ggml_backend_buffer`. Freed on drop, then the memory map it may point into is released.
pub struct Buffer {
    raw: NonNull<sys::ggml_backend_buffer>,
    /// Keeps the mapping alive while ggml points into it (CPU buffers made from a mapped file).
    _map: Option<Arc<memmap2::MmapMut>>,
}

impl Buffer {
    /// # Safety
    /// `raw` must be a buffer nobody else frees; if it points into `map`, pass the map.
    pub(crate) unsafe fn from_raw(
        raw: NonNull<sys::ggml_backend_buffer>,
        map: Option<Arc<memmap2::MmapMut>>,
    ) -> Buffer {
        Buffer { raw, _map: map }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_backend_buffer {
        self.raw.as_ptr()
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.as_ptr()) }
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
