//! `Tensor<'ctx>`: a copyable handle to a tensor header that lives in a `Context` (or a GGUF file's context).

use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::{sys, Error, Result, Type};

/// A tensor of a context that outlives `'ctx`. Handles are `Copy`; the context owns the header.
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    raw: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx crate::Context>,
}

impl<'ctx> Tensor<'ctx> {
    /// # Safety
    /// `raw` must be a non-null tensor of a context that lives at least `'ctx`.
    pub(crate) unsafe fn from_raw(raw: *mut sys::ggml_tensor) -> Tensor<'ctx> {
        Tensor { raw: NonNull::new(raw).expect("ggml returned a null tensor"), _ctx: PhantomData }
    }

    pub(crate) fn as_ptr(self) -> *mut sys::ggml_tensor {
        self.raw.as_ptr()
    }

    fn header(&self) -> &sys::ggml_tensor {
        // SAFETY: the header lives in a context that outlives 'ctx (type invariant); we only read it.
        unsafe { self.raw.as_ref() }
    }

    /// The element type, or `None` for a type outside `Type`'s table.
    pub fn ty(self) -> Type {
        Type::from_sys(self.header().type_).expect("tensor of a type outside asagi-gguf's table")
    }

    /// Elements per dimension, ggml order (`ne[0]` contiguous).
    pub fn ne(self) -> [usize; 4] {
        self.header().ne.map(|n| n as usize)
    }

    /// Strides in bytes per dimension.
    pub fn nb(self) -> [usize; 4] {
        self.header().nb
    }

    /// Number of dimensions ignoring trailing 1s (at least 1).
    pub fn n_dims(self) -> usize {
        // SAFETY: reads the header of a live tensor.
        unsafe { sys::ggml_n_dims(self.as_ptr()) as usize }
    }

    /// Total elements.
    pub fn nelements(self) -> usize {
        self.ne().iter().product()
    }

    /// Bytes of data.
    pub fn nbytes(self) -> usize {
        // SAFETY: reads the header of a live tensor.
        unsafe { sys::ggml_nbytes(self.as_ptr()) }
    }

    /// The tensor's name (empty when unnamed).
    pub fn name(self) -> String {
        // SAFETY: `name` is a NUL-terminated array inside the header (ggml always terminates it).
        unsafe { CStr::from_ptr(self.header().name.as_ptr()) }.to_string_lossy().into_owned()
    }

    /// Names the tensor (ggml keeps at most 63 bytes). Returns the handle for chaining.
    pub fn named(self, name: &str) -> Tensor<'ctx> {
        let c = CString::new(name.replace('\0', "")).expect("NUL removed");
        // SAFETY: live tensor; ggml copies (and truncates) the string into the header.
        unsafe { sys::ggml_set_name(self.as_ptr(), c.as_ptr()) };
        self
    }

    /// Marks the tensor as a graph input (allocated before the graph's other tensors, never overwritten).
    pub fn set_input(self) -> Tensor<'ctx> {
        // SAFETY: sets a flag in a live header.
        unsafe { sys::ggml_set_input(self.as_ptr()) };
        self
    }

    /// Marks the tensor as a graph output (its memory is not reused by later nodes).
    pub fn set_output(self) -> Tensor<'ctx> {
        // SAFETY: sets a flag in a live header.
        unsafe { sys::ggml_set_output(self.as_ptr()) };
        self
    }

    /// True if the rows are stored contiguously with no gaps.
    pub fn is_contiguous(self) -> bool {
        // SAFETY: reads a live header.
        unsafe { sys::ggml_is_contiguous(self.as_ptr()) }
    }

    pub(crate) fn raw_buffer(self) -> *mut sys::ggml_backend_buffer {
        self.header().buffer
    }

    pub(crate) fn data_ptr(self) -> *mut std::ffi::c_void {
        self.header().data
    }
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {:?})", self.name(), self.ty(), self.ne())
    }
}

/// Copies a contiguous, allocated tensor into a vector of `T`.
///
/// Callers guarantee the tensor's buffer is alive (the owner of the buffer is borrowed by the caller).
pub(crate) fn read_tensor<T: crate::Pod>(t: Tensor<'_>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    read_tensor_into(t, &mut out)?;
    Ok(out)
}

/// As `read_tensor`, into `out` (resized to fit; its allocation is reused).
pub(crate) fn read_tensor_into<T: crate::Pod>(t: Tensor<'_>, out: &mut Vec<T>) -> Result<()> {
    let bytes = t.nbytes();
    let size = std::mem::size_of::<T>();
    if size == 0 || bytes % size != 0 || !t.is_contiguous() {
        return Err(Error::Size { tensor: t.name(), expected: bytes, got: size });
    }
    out.clear();
    out.resize(bytes / size, T::default());
    // SAFETY: the caller guarantees the buffer is alive; `out` has exactly `bytes` bytes of a `Pod` type (any bit
    // pattern is valid).
    unsafe { sys::ggml_backend_tensor_get(t.as_ptr(), out.as_mut_ptr().cast(), 0, bytes) };
    Ok(())
}
