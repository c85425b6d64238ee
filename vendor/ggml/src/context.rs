//! `Context`: owner of a ggml context whose tensors are metadata only (`no_alloc`). Tensor memory lives in backend
//! buffers: ones the context owns (`alloc_tensors`, `attach_buffer`) or a scheduler's (graph intermediates).

use std::cell::RefCell;
use std::ffi::CString;
use std::ptr::NonNull;

use crate::buffer::{Buffer, BufferType};
use crate::{sys, Backend, Error, Pod, Result, Tensor, Type};

/// A ggml context created with `no_alloc = true`: it holds tensor headers and graphs, never tensor data.
pub struct Context {
    raw: NonNull<sys::ggml_context>,
    /// Buffers holding the data of this context's tensors. They are freed with the context, so a `Tensor<'ctx>`
    /// can never point into freed memory.
    buffers: RefCell<Vec<Buffer>>,
}

impl Context {
    /// A context with room for `max_tensors` tensor headers and one graph of up to `graph_nodes` nodes.
    pub fn new(max_tensors: usize, graph_nodes: usize) -> Result<Context> {
        // SAFETY: pure size computations.
        let mem_size = unsafe {
            max_tensors * sys::ggml_tensor_overhead()
                + if graph_nodes > 0 { sys::ggml_graph_overhead_custom(graph_nodes, false) } else { 0 }
        };
        let params = sys::ggml_init_params { mem_size, mem_buffer: std::ptr::null_mut(), no_alloc: true };
        // SAFETY: ggml_init allocates its own memory pool (mem_buffer is null) and returns null on failure.
        let raw = unsafe { sys::ggml_init(params) };
        NonNull::new(raw)
            .map(|raw| Context { raw, buffers: RefCell::new(Vec::new()) })
            .ok_or(Error::OutOfMemory("ggml_init"))
    }

    /// Takes ownership of a context made by ggml (for example by `gguf_init_from_file`).
    ///
    /// # Safety
    /// `raw` must be a valid, `no_alloc` ggml context that nothing else frees.
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::ggml_context>) -> Context {
        Context { raw, buffers: RefCell::new(Vec::new()) }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_context {
        self.raw.as_ptr()
    }

    /// A new tensor with shape `ne` (ggml order: `ne[0]` is the contiguous dimension), 1 to 4 dims.
    pub fn new_tensor(&self, ty: Type, ne: &[usize]) -> Tensor<'_> {
        assert!((1..=4).contains(&ne.len()), "ggml tensors have 1 to 4 dimensions, got {ne:?}");
        let ne64: Vec<i64> = ne.iter().map(|&n| n as i64).collect();
        // SAFETY: the context is valid; ne64 has ne.len() (1..=4) elements as ggml_new_tensor reads.
        let t = unsafe { sys::ggml_new_tensor(self.as_ptr(), ty.to_sys(), ne.len() as i32, ne64.as_ptr()) };
        // SAFETY: ggml_new_tensor returns a tensor of this context (it aborts when the pool is full).
        unsafe { Tensor::from_raw(t) }
    }

    /// The tensor of this context with the given name.
    pub fn get_tensor(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid context and NUL-terminated name; returns null when absent.
        let t = unsafe { sys::ggml_get_tensor(self.as_ptr(), c.as_ptr()) };
        // SAFETY: a non-null result is a tensor of this context.
        (!t.is_null()).then(|| unsafe { Tensor::from_raw(t) })
    }

    /// All tensors of the context, in creation order.
    pub fn tensors(&self) -> Vec<Tensor<'_>> {
        let mut out = Vec::new();
        // SAFETY: iterating a valid context; each returned pointer is a tensor of it.
        unsafe {
            let mut t = sys::ggml_get_first_tensor(self.as_ptr());
            while !t.is_null() {
                out.push(Tensor::from_raw(t));
                t = sys::ggml_get_next_tensor(self.as_ptr(), t);
            }
        }
        out
    }

    /// Allocates every not-yet-allocated tensor of the context in one buffer of `backend`'s default buffer type.
    pub fn alloc_tensors(&self, backend: &Backend) -> Result<()> {
        // SAFETY: valid context and backend; returns null when there is nothing to allocate or on failure.
        let raw = unsafe { sys::ggml_backend_alloc_ctx_tensors(self.as_ptr(), backend.as_ptr()) };
        let buffer = NonNull::new(raw).ok_or(Error::OutOfMemory("ggml_backend_alloc_ctx_tensors"))?;
        // SAFETY: a fresh buffer that we own from now on.
        self.buffers.borrow_mut().push(unsafe { Buffer::from_raw(buffer, None) });
        Ok(())
    }

    /// Allocates every not-yet-allocated tensor of the context in one buffer of type `buft` (a backend's, or one of
    /// the CPU's extra types, see `BufferType::cpu_extra`).
    pub fn alloc_tensors_in(&self, buft: BufferType) -> Result<()> {
        // SAFETY: valid context and a registry buffer type; returns null when there is nothing to allocate or on
        // failure.
        let raw = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(self.as_ptr(), buft.as_ptr()) };
        let buffer = NonNull::new(raw).ok_or(Error::OutOfMemory("ggml_backend_alloc_ctx_tensors_from_buft"))?;
        // SAFETY: a fresh buffer that we own from now on.
        self.buffers.borrow_mut().push(unsafe { Buffer::from_raw(buffer, None) });
        Ok(())
    }

    /// As `alloc_tensors_in`, for weights: ggml is told the buffer holds weights (an RPC server then caches
    /// large ones by content hash; the scheduler keeps ops on it where they are).
    pub fn alloc_weights_in(&self, buft: BufferType) -> Result<()> {
        self.alloc_tensors_in(buft)?;
        if let Some(b) = self.buffers.borrow().last() {
            b.set_usage_weights();
        }
        Ok(())
    }

    /// Locks the host buffers this context owns in RAM (`Buffer::lock_in_ram`); returns the bytes locked.
    pub fn lock_in_ram(&self) -> std::io::Result<usize> {
        self.buffers.borrow().iter().try_fold(0, |n, b| Ok(n + b.lock_in_ram()?))
    }

    /// Fills the buffers this context owns with `value` bytes (a KV cache starts zeroed: masked-out cells are still
    /// multiplied by a zero weight, and uninitialized memory could hold NaN).
    pub fn clear(&self, value: u8) {
        for b in self.buffers.borrow().iter() {
            // SAFETY: a live buffer owned by this context.
            unsafe { sys::ggml_backend_buffer_clear(b.as_ptr(), value) }
        }
    }

    /// Sets bytes `offset..offset + len` of tensor `t` (allocated in a buffer of this context) to `value`.
    pub fn memset(&self, t: Tensor<'_>, value: u8, offset: usize, len: usize) -> Result<()> {
        if !self.owns_data_of(t) {
            return Err(Error::NotAllocated(t.name()));
        }
        if offset.checked_add(len).is_none_or(|end| end > t.nbytes()) {
            return Err(Error::Size { tensor: t.name(), expected: t.nbytes(), got: offset.saturating_add(len) });
        }
        // SAFETY: t is allocated in a live buffer owned by self and the range lies inside its data (checked).
        unsafe { sys::ggml_backend_tensor_memset(t.as_ptr(), value, offset, len) };
        Ok(())
    }

    /// Keeps `buffer` alive as long as the context, because some of its tensors point into it.
    pub(crate) fn attach_buffer(&self, buffer: Buffer) {
        self.buffers.borrow_mut().push(buffer);
    }

    /// True if `t`'s data is in a buffer this context owns (so reading or writing it is sound).
    fn owns_data_of(&self, t: Tensor<'_>) -> bool {
        self.buffer_of(t).is_some()
    }

    /// Whether `t`'s buffer (one of ours) can be read back.
    fn buffer_of(&self, t: Tensor<'_>) -> Option<bool> {
        let buf = t.raw_buffer();
        if buf.is_null() || t.data_ptr().is_null() {
            return None;
        }
        self.buffers.borrow().iter().find(|b| b.as_ptr() == buf).map(|b| b.is_readable())
    }

    /// Copies `data` into tensor `t`, which must be allocated in a buffer of this context.
    pub fn write<T: Pod>(&self, t: Tensor<'_>, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if !self.owns_data_of(t) {
            return Err(Error::NotAllocated(t.name()));
        }
        if bytes != t.nbytes() {
            return Err(Error::Size { tensor: t.name(), expected: t.nbytes(), got: bytes });
        }
        // SAFETY: t is allocated in a live buffer owned by self, and data holds exactly nbytes(t) bytes.
        unsafe { sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr().cast(), 0, bytes) };
        Ok(())
    }

    /// Copies `data` into bytes `offset..offset + data.len()` of tensor `t` (allocated in a buffer of this context):
    /// some rows of a KV cache restored from a file.
    pub fn write_bytes(&self, t: Tensor<'_>, offset: usize, data: &[u8]) -> Result<()> {
        if !self.owns_data_of(t) {
            return Err(Error::NotAllocated(t.name()));
        }
        if offset.checked_add(data.len()).is_none_or(|end| end > t.nbytes()) {
            return Err(Error::Size { tensor: t.name(), expected: t.nbytes(), got: offset.saturating_add(data.len()) });
        }
        // SAFETY: t is allocated in a live buffer owned by self and the range lies inside its data (checked).
        unsafe { sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr().cast(), offset, data.len()) };
        Ok(())
    }

    /// Bytes `offset..offset + len` of tensor `t` (allocated in a readable buffer of this context).
    pub fn read_bytes(&self, t: Tensor<'_>, offset: usize, len: usize) -> Result<Vec<u8>> {
        match self.buffer_of(t) {
            None => return Err(Error::NotAllocated(t.name())),
            Some(false) => return Err(Error::Invalid(format!("tensor {:?} is repacked and cannot be read", t.name()))),
            Some(true) => {}
        }
        if offset.checked_add(len).is_none_or(|end| end > t.nbytes()) {
            return Err(Error::Size { tensor: t.name(), expected: t.nbytes(), got: offset.saturating_add(len) });
        }
        let mut out = vec![0u8; len];
        // SAFETY: t is allocated in a live, readable buffer owned by self, the range lies inside its data (checked)
        // and `out` holds exactly `len` bytes.
        unsafe { sys::ggml_backend_tensor_get(t.as_ptr(), out.as_mut_ptr().cast(), offset, len) };
        Ok(out)
    }

    /// Copies the data of tensor `t` (allocated in a buffer of this context) into a new vector of `T`.
    pub fn read<T: Pod>(&self, t: Tensor<'_>) -> Result<Vec<T>> {
        match self.buffer_of(t) {
            None => return Err(Error::NotAllocated(t.name())),
            Some(false) => return Err(Error::Invalid(format!("tensor {:?} is repacked and cannot be read", t.name()))),
            Some(true) => {}
        }
        crate::tensor::read_tensor(t)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Buffers first (they do not reference the context), then the context's pool.
        self.buffers.get_mut().clear();
        // SAFETY: we own the context and free it once.
        unsafe { sys::ggml_free(self.raw.as_ptr()) };
    }
}

// SAFETY: a ggml context is plain memory with no thread affinity; `&Context` methods that create tensors mutate the
// pool, so Context is Send but not Sync.
unsafe impl Send for Context {}
