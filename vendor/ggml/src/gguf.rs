//! GGUF files through ggml's own parser and writer (`gguf.h`).
//!
//! Reading: `GgufFile::open` parses metadata and tensor infos (never the data), checks that every tensor's bytes lie
//! inside the file, and `map_weights` memory-maps the file and points each tensor at its bytes in place.
//! Writing: `GgufWriter` collects keys and tensor infos, then streams the header and the tensor data (one tensor at
//! a time) to any `Write`, so a converter never holds the whole model.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::buffer::Buffer;
use crate::{sys, Context, Error, Result, Tensor, Type};

/// A metadata value. Arrays hold one element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Array),
}

/// An array value.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl Value {
    /// The GGUF type name (`u32`, `str`, `arr[i32]`...), for messages and `info`.
    pub fn type_name(&self) -> String {
        match self {
            Value::U8(_) => "u8".into(),
            Value::I8(_) => "i8".into(),
            Value::U16(_) => "u16".into(),
            Value::I16(_) => "i16".into(),
            Value::U32(_) => "u32".into(),
            Value::I32(_) => "i32".into(),
            Value::U64(_) => "u64".into(),
            Value::I64(_) => "i64".into(),
            Value::F32(_) => "f32".into(),
            Value::F64(_) => "f64".into(),
            Value::Bool(_) => "bool".into(),
            Value::Str(_) => "str".into(),
            Value::Array(a) => format!("arr[{}]", a.elem_name()),
        }
    }
}

impl Array {
    fn elem_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::I8(_) => "i8",
            Array::U16(_) => "u16",
            Array::I16(_) => "i16",
            Array::U32(_) => "u32",
            Array::I32(_) => "i32",
            Array::U64(_) => "u64",
            Array::I64(_) => "i64",
            Array::F32(_) => "f32",
            Array::F64(_) => "f64",
            Array::Bool(_) => "bool",
            Array::Str(_) => "str",
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a tensor's bytes are in a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: Type,
    /// ggml order, trailing dimensions of 1 dropped (at least one).
    pub ne: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub size: usize,
}

impl TensorInfo {
    /// The data's byte range in the file; `None` if it does not fit in memory addresses (checked, as the offset
    /// and size come from the file).
    pub fn range(&self) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(self.offset).ok()?;
        Some(start..start.checked_add(self.size)?)
    }
}

/// ggml logs parse errors instead of returning them, so `open` swaps in a logger that collects the messages (in
/// the opening thread's `CAPTURE_BUF`) and the error can carry ggml's reason. The lock serializes the swap of
/// ggml's global log callback.
static LOG_LOCK: Mutex<()> = Mutex::new(());

unsafe extern "C" fn capture_log(
    level: sys::ggml_log_level,
    text: *const std::os::raw::c_char,
    _: *mut std::ffi::c_void,
) {
    if text.is_null() || level < sys::GGML_LOG_LEVEL_WARN {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated message.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    CAPTURE_BUF.with(|b| b.borrow_mut().push_str(&msg));
}

thread_local! {
    static CAPTURE_BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A parsed GGUF file: metadata, tensor infos, and (after `map_weights`) tensors backed by the mapped file.
pub struct GgufFile {
    raw: NonNull<sys::gguf_context>,
    ctx: Context,
    path: PathBuf,
    infos: Vec<TensorInfo>,
    /// The mapped file's size and time (`watch`), and its range in the SIGBUS handler's table (dropped before the
    /// map: fields drop in order).
    watch: Option<crate::FileWatch>,
    guard: Option<crate::map_guard::Registration>,
    /// The mapping behind the tensors, after `map_weights`.
    map: Option<Arc<memmap2::Mmap>>,
}

impl GgufFile {
    /// Parses `path`'s header. Errors name the file and give ggml's reason; a file whose tensor data would reach
    /// past its end is rejected as truncated.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let err = |msg: String| Error::Gguf { path: path.clone(), msg };
        let file_size = std::fs::metadata(&path).map_err(|e| err(e.to_string()))?.len();
        let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| err("path has a NUL byte".into()))?;

        let mut meta: *mut sys::ggml_context = std::ptr::null_mut();
        let params = sys::gguf_init_params { no_alloc: true, ctx: &mut meta };
        let raw = {
            let _guard = LOG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            CAPTURE_BUF.with(|b| b.borrow_mut().clear());
            // SAFETY: capture_log is a valid callback for the duration; the lock keeps other threads from swapping
            // the logger meanwhile; gguf_init_from_file reads the file and returns null on any parse error.
            // The previous logger is put back afterwards.
            unsafe {
                let (mut prev, mut prev_data) = (None, std::ptr::null_mut());
                sys::ggml_log_get(&mut prev, &mut prev_data);
                sys::ggml_log_set(Some(capture_log), std::ptr::null_mut());
                let raw = sys::gguf_init_from_file(cpath.as_ptr(), params);
                sys::ggml_log_set(prev, prev_data);
                raw
            }
        };
        let Some(raw) = NonNull::new(raw) else {
            let reason = CAPTURE_BUF.with(|b| b.borrow().trim().replace('\n', "; "));
            return Err(err(if reason.is_empty() { "not a valid GGUF file".into() } else { reason }));
        };
        // SAFETY: on success gguf_init_from_file created `meta`, a no_alloc context we now own.
        let ctx = unsafe { Context::from_raw(NonNull::new(meta).expect("gguf returned no tensor context")) };
        let mut file =
            GgufFile { raw, ctx, path: path.clone(), infos: Vec::new(), watch: None, guard: None, map: None };
        file.infos = file.read_infos()?;
        for t in &file.infos {
            // Checked: offsets and sizes come from the file.
            match t.offset.checked_add(t.size as u64) {
                Some(end) if end <= file_size => {}
                end => {
                    return Err(err(format!(
                        "truncated: tensor {} needs bytes {}..{} but the file has {file_size}",
                        t.name,
                        t.offset,
                        end.map_or("(overflow)".to_string(), |e| e.to_string())
                    )))
                }
            }
        }
        Ok(file)
    }

    fn read_infos(&self) -> Result<Vec<TensorInfo>> {
        let data_offset = self.data_offset() as u64;
        let mut out = Vec::new();
        // SAFETY: indices below gguf_get_n_tensors; returned strings are NUL-terminated and owned by the context.
        unsafe {
            for i in 0..sys::gguf_get_n_tensors(self.as_ptr()) {
                let name = CStr::from_ptr(sys::gguf_get_tensor_name(self.as_ptr(), i)).to_string_lossy().into_owned();
                let raw_ty = sys::gguf_get_tensor_type(self.as_ptr(), i);
                let ty = Type::from_sys(raw_ty).ok_or_else(|| Error::Gguf {
                    path: self.path.clone(),
                    msg: format!("tensor {name} has ggml type {raw_ty}, which asagi-gguf does not handle"),
                })?;
                let ne_ptr = sys::gguf_get_tensor_ne(self.as_ptr(), i);
                let mut ne: Vec<usize> = (0..4).map(|d| *ne_ptr.add(d) as usize).collect();
                while ne.len() > 1 && ne[ne.len() - 1] == 1 {
                    ne.pop();
                }
                let offset =
                    data_offset.checked_add(sys::gguf_get_tensor_offset(self.as_ptr(), i) as u64).ok_or_else(|| {
                        Error::Gguf { path: self.path.clone(), msg: format!("tensor {name}: data offset overflows") }
                    })?;
                out.push(TensorInfo { name, ty, ne, offset, size: sys::gguf_get_tensor_size(self.as_ptr(), i) });
            }
        }
        Ok(out)
    }

    fn as_ptr(&self) -> *mut sys::gguf_context {
        self.raw.as_ptr()
    }

    /// A watch on the mapped file (after `map_weights`): `check` says whether it changed on disk since.
    pub fn watch(&self) -> Option<crate::FileWatch> {
        self.watch.as_ref().and_then(|w| w.try_clone().ok())
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_version(self.as_ptr()) }
    }

    /// Data alignment.
    pub fn alignment(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_alignment(self.as_ptr()) }
    }

    /// Offset of the tensor data section.
    pub fn data_offset(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_data_offset(self.as_ptr()) }
    }

    /// All keys, in file order.
    pub fn keys(&self) -> Vec<String> {
        // SAFETY: indices below gguf_get_n_kv; keys are NUL-terminated strings owned by the context.
        unsafe {
            (0..sys::gguf_get_n_kv(self.as_ptr()))
                .map(|i| CStr::from_ptr(sys::gguf_get_key(self.as_ptr(), i)).to_string_lossy().into_owned())
                .collect()
        }
    }

    /// The value of `key`, or `None` when absent.
    pub fn get(&self, key: &str) -> Option<Value> {
        let c = CString::new(key).ok()?;
        // SAFETY: valid context and key.
        let id = unsafe { sys::gguf_find_key(self.as_ptr(), c.as_ptr()) };
        (id >= 0).then(|| self.value(id))
    }

    fn value(&self, id: i64) -> Value {
        let ctx = self.as_ptr();
        // SAFETY: `id` is a valid key id; each getter is called only for the type gguf reports for the key (the
        // getters abort otherwise); array data pointers hold gguf_get_arr_n elements of the reported type.
        unsafe {
            match sys::gguf_get_kv_type(ctx, id) {
                sys::GGUF_TYPE_UINT8 => Value::U8(sys::gguf_get_val_u8(ctx, id)),
                sys::GGUF_TYPE_INT8 => Value::I8(sys::gguf_get_val_i8(ctx, id)),
                sys::GGUF_TYPE_UINT16 => Value::U16(sys::gguf_get_val_u16(ctx, id)),
                sys::GGUF_TYPE_INT16 => Value::I16(sys::gguf_get_val_i16(ctx, id)),
                sys::GGUF_TYPE_UINT32 => Value::U32(sys::gguf_get_val_u32(ctx, id)),
                sys::GGUF_TYPE_INT32 => Value::I32(sys::gguf_get_val_i32(ctx, id)),
                sys::GGUF_TYPE_UINT64 => Value::U64(sys::gguf_get_val_u64(ctx, id)),
                sys::GGUF_TYPE_INT64 => Value::I64(sys::gguf_get_val_i64(ctx, id)),
                sys::GGUF_TYPE_FLOAT32 => Value::F32(sys::gguf_get_val_f32(ctx, id)),
                sys::GGUF_TYPE_FLOAT64 => Value::F64(sys::gguf_get_val_f64(ctx, id)),
                sys::GGUF_TYPE_BOOL => Value::Bool(sys::gguf_get_val_bool(ctx, id)),
                sys::GGUF_TYPE_STRING => {
                    Value::Str(CStr::from_ptr(sys::gguf_get_val_str(ctx, id)).to_string_lossy().into_owned())
                }
                _ => {
                    let n = sys::gguf_get_arr_n(ctx, id);
                    let et = sys::gguf_get_arr_type(ctx, id);
                    if et == sys::GGUF_TYPE_STRING {
                        let v = (0..n)
                            .map(|i| CStr::from_ptr(sys::gguf_get_arr_str(ctx, id, i)).to_string_lossy().into_owned())
                            .collect();
                        return Value::Array(Array::Str(v));
                    }
                    let p = sys::gguf_get_arr_data(ctx, id);
                    fn copy<T: crate::Pod>(p: *const std::ffi::c_void, n: usize) -> Vec<T> {
                        let mut out = vec![T::default(); n];
                        if n > 0 {
                            // SAFETY: p holds n elements of T (see the enclosing comment); copied bytewise because
                            // gguf does not promise alignment; any bit pattern is a valid T (Pod).
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    p.cast::<u8>(),
                                    out.as_mut_ptr().cast::<u8>(),
                                    n * size_of::<T>(),
                                )
                            }
                        }
                        out
                    }
                    Value::Array(match et {
                        sys::GGUF_TYPE_UINT8 => Array::U8(copy(p, n)),
                        sys::GGUF_TYPE_INT8 => Array::I8(copy(p, n)),
                        sys::GGUF_TYPE_UINT16 => Array::U16(copy(p, n)),
                        sys::GGUF_TYPE_INT16 => Array::I16(copy(p, n)),
                        sys::GGUF_TYPE_UINT32 => Array::U32(copy(p, n)),
                        sys::GGUF_TYPE_INT32 => Array::I32(copy(p, n)),
                        sys::GGUF_TYPE_UINT64 => Array::U64(copy(p, n)),
                        sys::GGUF_TYPE_INT64 => Array::I64(copy(p, n)),
                        sys::GGUF_TYPE_FLOAT32 => Array::F32(copy(p, n)),
                        sys::GGUF_TYPE_FLOAT64 => Array::F64(copy(p, n)),
                        // gguf stores bools as one byte each, 0 or 1 (validated by the parser).
                        _ => Array::Bool(copy::<u8>(p, n).into_iter().map(|b| b != 0).collect()),
                    })
                }
            }
        }
    }

    fn wrong(&self, key: &str, want: &str, got: Option<Value>) -> Error {
        Error::Key {
            path: self.path.clone(),
            key: key.into(),
            msg: match got {
                None => "missing".into(),
                Some(v) => format!("has type {}, expected {want}", v.type_name()),
            },
        }
    }

    /// A required `u32` key.
    pub fn u32(&self, key: &str) -> Result<u32> {
        match self.get(key) {
            Some(Value::U32(v)) => Ok(v),
            other => Err(self.wrong(key, "u32", other)),
        }
    }

    /// A required `f32` key.
    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(v),
            other => Err(self.wrong(key, "f32", other)),
        }
    }

    /// A required `bool` key.
    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            Some(Value::Bool(v)) => Ok(v),
            other => Err(self.wrong(key, "bool", other)),
        }
    }

    /// A required string key.
    pub fn str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::Str(v)) => Ok(v),
            other => Err(self.wrong(key, "str", other)),
        }
    }

    /// A required array key.
    pub fn array(&self, key: &str) -> Result<Array> {
        match self.get(key) {
            Some(Value::Array(v)) => Ok(v),
            other => Err(self.wrong(key, "array", other)),
        }
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// The tensor called `name` (its data is usable once `map_weights` ran).
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        self.ctx.get_tensor(name)
    }

    /// The context holding the file's tensors.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Memory-maps the file and points every tensor at its bytes, used in place by the CPU backend: the weights
    /// are never copied into anonymous memory, and pages are read from disk on first use.
    ///
    /// The mapping is private and read-only (`MAP_PRIVATE`, `PROT_READ`): ggml only reads weights, so nothing can
    /// turn a file page into a private copy (a stray write faults instead of silently doubling the memory), and the
    /// file stays untouched. As with every memory map, the file must not be truncated while it is in use.
    pub fn map_weights(&mut self) -> Result<()> {
        if self.map.is_some() {
            return Ok(());
        }
        let err = |msg: String| Error::Gguf { path: self.path.clone(), msg };
        let file = std::fs::File::open(&self.path).map_err(|e| err(e.to_string()))?;
        // SAFETY: a private mapping of a regular file; see the doc comment about concurrent truncation.
        let map =
            unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.map_err(|e| err(format!("mmap: {e}")))?;
        self.watch = Some(crate::FileWatch::new(&self.path, &file).map_err(|e| err(e.to_string()))?);
        self.guard = crate::map_guard::register(map.as_ptr(), map.len(), &self.path);
        let map = Arc::new(map);
        let base = map.as_ptr() as *mut std::ffi::c_void;
        // SAFETY: the map is page-aligned (ggml wants 32-byte alignment) and lives as long as the buffer, which keeps
        // an Arc of it.
        let raw = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(base, map.len()) };
        let raw = NonNull::new(raw).ok_or(Error::OutOfMemory("ggml_backend_cpu_buffer_from_ptr"))?;
        // SAFETY: the buffer is ours; it points into `map`, which we hand over with it.
        let buffer = unsafe { Buffer::from_raw(raw, Some(map.clone())) };
        buffer.set_usage_weights();
        for info in &self.infos {
            let t =
                self.ctx.get_tensor(&info.name).ok_or_else(|| err(format!("tensor {} has no header", info.name)))?;
            let range = info.range().filter(|r| r.end <= map.len());
            let range = range.ok_or_else(|| err(format!("tensor {}: its data lies outside the file", info.name)))?;
            // SAFETY: t is an unallocated tensor of our context; range lies inside the buffer (checked just above),
            // and the buffer outlives the tensor because the context takes ownership of it below.
            let status = unsafe {
                let addr = (base as *mut u8).add(range.start).cast();
                sys::ggml_backend_tensor_alloc(buffer.as_ptr(), t.as_ptr(), addr)
            };
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(err(format!("cannot place tensor {} in the mapping", info.name)));
            }
        }
        self.ctx.attach_buffer(buffer);
        self.map = Some(map);
        Ok(())
    }

    /// The stored bytes of tensor `name`, borrowed from the mapping (after `map_weights`).
    fn mapped_bytes(&self, name: &str) -> Result<&[u8]> {
        let err = |msg: String| Error::Gguf { path: self.path.clone(), msg };
        let map = self.map.as_ref().ok_or_else(|| err("weights are not mapped".into()))?;
        let info = self.infos.iter().find(|i| i.name == name).ok_or_else(|| err(format!("no tensor {name}")))?;
        let range = info.range().filter(|r| r.end <= map.len());
        Ok(&map[range.ok_or_else(|| err(format!("tensor {name}: its data lies outside the file")))?])
    }

    /// Hands the mapped pages lying wholly inside the named tensors back to the kernel, once copies of them serve
    /// the model (uploaded to a GPU, repacked for the CPU), so they stop counting as resident memory. If the
    /// mapped tensors are touched again the pages are re-read from the file: nothing is ever written to the
    /// mapping, so every page is a clean copy of the file. Best effort.
    pub fn release_pages(&self, names: &[String]) {
        #[cfg(target_os = "linux")]
        if let Some(map) = &self.map {
            let page = crate::page_size();
            for info in self.infos.iter().filter(|i| names.contains(&i.name)) {
                if let Some(r) = info.range().and_then(|r| crate::mmap::inner_pages(r.start, r.len(), page)) {
                    // SAFETY: MADV_DONTNEED on a private read-only file mapping (it cannot have been written): the
                    // dropped pages are unmodified file pages, and touching them again maps the same file bytes, so
                    // no slice or tensor pointing into the range can observe a change.
                    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, r.start, r.len()) };
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = names;
    }

    /// Locks in RAM (`mlock`) the mapped pages of every tensor used in place, i.e. all but `moved` (uploaded to a GPU
    /// or repacked, whose pages were handed back): the kernel then never evicts them under memory pressure, and
    /// they are read from the file now rather than on first use. Returns the bytes locked. Fails like mlock does
    /// (RLIMIT_MEMLOCK, `ulimit -l`). Requires `map_weights`.
    pub fn lock_in_place(&self, moved: &[String]) -> Result<usize> {
        let err = |msg: String| Error::Gguf { path: self.path.clone(), msg };
        let map = self.map.as_ref().ok_or_else(|| err("weights are not mapped".into()))?;
        let page = crate::page_size();
        let mut ranges: Vec<std::ops::Range<usize>> = self
            .infos
            .iter()
            .filter(|i| !moved.contains(&i.name))
            .filter_map(|i| i.range().and_then(|r| crate::mmap::covering_pages(r.start, r.len(), map.len(), page)))
            .collect();
        ranges.sort_by_key(|r| r.start);
        // Neighbouring tensors share pages: merge so that each page is locked once.
        let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut locked = 0;
        for r in merged {
            // SAFETY: r lies inside the mapping (clipped to its length), which lives as long as `self`; mlock only
            // pins the pages, it never changes their contents. Unmapping unlocks them.
            unsafe { rustix::mm::mlock(map.as_ptr().add(r.start) as *mut std::ffi::c_void, r.len()) }
                .map_err(|e| err(format!("mlock of {} bytes: {e}", r.len())))?;
            locked += r.len();
        }
        Ok(locked)
    }

    /// Copies the tensors called `names` into a new context allocated in one buffer of type `buft` (a GPU's memory,
    /// or a CPU extra type that repacks them), written from the mapped file. Requires `map_weights`. As each is
    /// copied its mapped pages are released (`release_pages`), so resident memory never holds both copies of
    /// more than one tensor.
    pub fn upload(&self, names: &[String], buft: crate::BufferType) -> Result<Context> {
        let ctx = Context::new(names.len().max(1), 0)?;
        let mut pairs = Vec::new();
        for n in names {
            let src =
                self.tensor(n).ok_or_else(|| Error::Gguf { path: self.path.clone(), msg: format!("no tensor {n}") })?;
            let n_dims = src.n_dims();
            pairs.push((ctx.new_tensor(src.ty(), &src.ne()[..n_dims]).named(n), n));
        }
        if !names.is_empty() {
            ctx.alloc_weights_in(buft)?;
        }
        for (t, n) in pairs {
            ctx.write(t, self.mapped_bytes(n)?)?;
            self.release_pages(std::slice::from_ref(n));
        }
        Ok(ctx)
    }

    /// The raw bytes of tensor `name` as stored in the file (after `map_weights`).
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::Gguf { path: self.path.clone(), msg: format!("no tensor {name}") })?;
        self.ctx.read::<u8>(t)
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: we own the gguf context (the tensor context is freed by `Context`'s drop).
        unsafe { sys::gguf_free(self.raw.as_ptr()) }
    }
}

/// Builds a GGUF file: keys and tensor infos first, then `write` streams header and data.
pub struct GgufWriter {
    raw: NonNull<sys::gguf_context>,
    ctx: Context,
    names: HashSet<String>,
    order: Vec<String>,
}

impl GgufWriter {
    /// An empty file description with room for `max_tensors` tensors.
    pub fn new(max_tensors: usize) -> Result<GgufWriter> {
        // SAFETY: creates an empty gguf context; null on allocation failure.
        let raw = NonNull::new(unsafe { sys::gguf_init_empty() }).ok_or(Error::OutOfMemory("gguf_init_empty"))?;
        Ok(GgufWriter { raw, ctx: Context::new(max_tensors.max(1), 0)?, names: HashSet::new(), order: Vec::new() })
    }

    fn as_ptr(&self) -> *mut sys::gguf_context {
        self.raw.as_ptr()
    }

    /// Sets `key` (replacing an earlier value).
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        let k = CString::new(key).map_err(|_| Error::Invalid(format!("key {key:?} has a NUL byte")))?;
        let ctx = self.as_ptr();
        let kp = k.as_ptr();
        // SAFETY: valid context and key; gguf copies keys, strings and array data; array pointers and lengths come
        // from the same vector.
        unsafe {
            match value {
                Value::U8(v) => sys::gguf_set_val_u8(ctx, kp, v),
                Value::I8(v) => sys::gguf_set_val_i8(ctx, kp, v),
                Value::U16(v) => sys::gguf_set_val_u16(ctx, kp, v),
                Value::I16(v) => sys::gguf_set_val_i16(ctx, kp, v),
                Value::U32(v) => sys::gguf_set_val_u32(ctx, kp, v),
                Value::I32(v) => sys::gguf_set_val_i32(ctx, kp, v),
                Value::U64(v) => sys::gguf_set_val_u64(ctx, kp, v),
                Value::I64(v) => sys::gguf_set_val_i64(ctx, kp, v),
                Value::F32(v) => sys::gguf_set_val_f32(ctx, kp, v),
                Value::F64(v) => sys::gguf_set_val_f64(ctx, kp, v),
                Value::Bool(v) => sys::gguf_set_val_bool(ctx, kp, v),
                Value::Str(s) => {
                    let c = CString::new(s).map_err(|_| Error::Invalid(format!("value of {key} has a NUL byte")))?;
                    sys::gguf_set_val_str(ctx, kp, c.as_ptr())
                }
                Value::Array(Array::Str(v)) => {
                    let cs = v
                        .iter()
                        .map(|s| CString::new(s.as_str()))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|_| Error::Invalid(format!("a string of {key} has a NUL byte")))?;
                    let mut ptrs: Vec<*const std::os::raw::c_char> = cs.iter().map(|c| c.as_ptr()).collect();
                    sys::gguf_set_arr_str(ctx, kp, ptrs.as_mut_ptr(), ptrs.len())
                }
                Value::Array(a) => {
                    let bools: Vec<u8>;
                    let (ty, p, n): (sys::gguf_type, *const std::ffi::c_void, usize) = match &a {
                        Array::U8(v) => (sys::GGUF_TYPE_UINT8, v.as_ptr().cast(), v.len()),
                        Array::I8(v) => (sys::GGUF_TYPE_INT8, v.as_ptr().cast(), v.len()),
                        Array::U16(v) => (sys::GGUF_TYPE_UINT16, v.as_ptr().cast(), v.len()),
                        Array::I16(v) => (sys::GGUF_TYPE_INT16, v.as_ptr().cast(), v.len()),
                        Array::U32(v) => (sys::GGUF_TYPE_UINT32, v.as_ptr().cast(), v.len()),
                        Array::I32(v) => (sys::GGUF_TYPE_INT32, v.as_ptr().cast(), v.len()),
                        Array::U64(v) => (sys::GGUF_TYPE_UINT64, v.as_ptr().cast(), v.len()),
                        Array::I64(v) => (sys::GGUF_TYPE_INT64, v.as_ptr().cast(), v.len()),
                        Array::F32(v) => (sys::GGUF_TYPE_FLOAT32, v.as_ptr().cast(), v.len()),
                        Array::F64(v) => (sys::GGUF_TYPE_FLOAT64, v.as_ptr().cast(), v.len()),
                        Array::Bool(v) => {
                            bools = v.iter().map(|&b| b as u8).collect();
                            (sys::GGUF_TYPE_BOOL, bools.as_ptr().cast(), bools.len())
                        }
                        Array::Str(_) => unreachable!("handled above"),
                    };
                    sys::gguf_set_arr_data(ctx, kp, ty, p, n)
                }
            }
        }
        Ok(())
    }

    /// Declares the next tensor: name (< 64 bytes, unique), type and ggml-order shape.
    pub fn add_tensor(&mut self, name: &str, ty: Type, ne: &[usize]) -> Result<()> {
        if name.len() >= 64 || name.contains('\0') {
            return Err(Error::Invalid(format!("tensor name {name:?} is longer than 63 bytes or has a NUL")));
        }
        if !self.names.insert(name.to_string()) {
            return Err(Error::Invalid(format!("duplicate tensor {name}")));
        }
        if ne.is_empty() || ne.len() > 4 || ty.row_size(ne[0]).is_none() {
            return Err(Error::Invalid(format!("tensor {name}: shape {ne:?} does not fit type {ty}")));
        }
        let t = self.ctx.new_tensor(ty, ne).named(name);
        // SAFETY: valid contexts; the name is unique (checked), so gguf does not abort; gguf copies the header.
        unsafe { sys::gguf_add_tensor(self.as_ptr(), t.as_ptr()) };
        self.order.push(name.to_string());
        Ok(())
    }

    /// Tensor names in the order their data must be written.
    pub fn tensor_names(&self) -> &[String] {
        &self.order
    }

    /// Byte size of tensor `i`'s data (unpadded).
    pub fn tensor_size(&self, i: usize) -> usize {
        assert!(i < self.order.len());
        // SAFETY: index checked.
        unsafe { sys::gguf_get_tensor_size(self.as_ptr(), i as i64) }
    }

    /// The serialized header: magic, keys, tensor infos, padding up to the data section.
    pub fn header_bytes(&self) -> Vec<u8> {
        // SAFETY: gguf_get_meta_data writes exactly gguf_get_meta_size bytes.
        unsafe {
            let n = sys::gguf_get_meta_size(self.as_ptr());
            let mut v = vec![0u8; n];
            sys::gguf_get_meta_data(self.as_ptr(), v.as_mut_ptr().cast());
            v
        }
    }

    /// Writes the file to `out`: the header, then for each tensor in order whatever `data(i, name, sink)` writes
    /// to `sink` (exactly the tensor's size, checked), each tensor padded to the alignment. Tensor data is produced
    /// and written piece by piece, so no tensor needs to be held whole. Returns the bytes written.
    pub fn write<W: Write>(
        &self,
        out: &mut W,
        mut data: impl FnMut(usize, &str, &mut dyn Write) -> std::io::Result<()>,
    ) -> std::io::Result<u64> {
        let header = self.header_bytes();
        out.write_all(&header)?;
        let mut written = header.len() as u64;
        // SAFETY: valid context.
        let align = unsafe { sys::gguf_get_alignment(self.as_ptr()) } as u64;
        for (i, name) in self.order.iter().enumerate() {
            let mut sink = Counting { inner: &mut *out, n: 0 };
            data(i, name, &mut sink)?;
            let n = sink.n;
            if n != self.tensor_size(i) as u64 {
                return Err(std::io::Error::other(format!(
                    "tensor {name}: {n} bytes produced, {} expected",
                    self.tensor_size(i)
                )));
            }
            written += n;
            let pad = (align - written % align) % align;
            out.write_all(&vec![0u8; pad as usize])?;
            written += pad;
        }
        Ok(written)
    }
}

/// A writer that counts what passes through.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // SAFETY: we own the gguf context.
        unsafe { sys::gguf_free(self.raw.as_ptr()) }
    }
}
