//! `Scheduler`: ggml's backend scheduler over one or more backends (GPU first, CPU last). It splits a graph
//! between backends, allocates the graph's intermediate tensors in its own buffers and runs it.

use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::{sys, Backend, Error, Graph, Pod, Result, Tensor};

/// Owner of a `ggml_backend_sched`, borrowing its backends.
pub struct Scheduler<'b> {
    raw: NonNull<sys::ggml_backend_sched>,
    /// The backends, to ask after each computation whether an RPC server among them failed during it.
    backends: Vec<&'b Backend>,
    /// The id of the graph allocated last, while its allocation stands (`compute` of that graph again skips the
    /// allocation; any other graph is allocated first).
    allocated: Option<u64>,
    _backends: PhantomData<&'b Backend>,
}

impl<'b> Scheduler<'b> {
    /// A scheduler over `backends` in priority order (the CPU backend must be last) for graphs of up to
    /// `graph_size` nodes.
    pub fn new(backends: &[&'b Backend], graph_size: usize) -> Result<Scheduler<'b>> {
        if backends.is_empty() || !backends.last().unwrap().is_cpu() {
            return Err(Error::Backend("the scheduler needs the CPU backend last".into()));
        }
        let mut raw: Vec<sys::ggml_backend_t> = backends.iter().map(|b| b.as_ptr()).collect();
        // SAFETY: `raw` holds live backends (borrowed for 'b, longer than the scheduler); null buffer types mean
        // each backend's default; ggml copies the array.
        let s = unsafe {
            sys::ggml_backend_sched_new(
                raw.as_mut_ptr(),
                std::ptr::null_mut(),
                raw.len() as i32,
                graph_size,
                false,
                true,
            )
        };
        Ok(Scheduler {
            raw: NonNull::new(s).ok_or(Error::OutOfMemory("ggml_backend_sched_new"))?,
            backends: backends.to_vec(),
            allocated: None,
            _backends: PhantomData,
        })
    }

    fn as_ptr(&self) -> *mut sys::ggml_backend_sched {
        self.raw.as_ptr()
    }

    /// Reserves buffers large enough for `graph` (call with the largest graph to avoid reallocations).
    pub fn reserve(&mut self, graph: &Graph<'_>) -> Result<()> {
        self.reserve_pinned(graph, &[])
    }

    /// As `reserve`, with nodes of `graph` pinned to backends as `alloc_pinned` pins them.
    pub fn reserve_pinned(&mut self, graph: &Graph<'_>, pins: &[(Tensor<'_>, &Backend)]) -> Result<()> {
        // ggml resets the scheduler after reserving: no graph stays allocated.
        self.allocated = None;
        // SAFETY: valid scheduler and graph; a reset drops earlier assignments before the pins are set.
        unsafe { sys::ggml_backend_sched_reset(self.as_ptr()) };
        self.pin(pins)?;
        // SAFETY: valid scheduler and graph.
        let ok = unsafe { sys::ggml_backend_sched_reserve(self.as_ptr(), graph.as_ptr()) };
        // (A failed RPC server shows as a failed allocation: say so instead.)
        self.health()?;
        ok.then_some(()).ok_or(Error::OutOfMemory("ggml_backend_sched_reserve"))
    }

    /// Assigns backends to the graph's nodes and allocates its tensors; inputs can be written afterwards.
    pub fn alloc(&mut self, graph: &Graph<'_>) -> Result<()> {
        self.alloc_pinned(graph, &[])
    }

    /// As `alloc`, with the nodes of `pins` computed on the backends given (ggml places the others around them):
    /// where ggml's own placement would move data between devices more than needed.
    pub fn alloc_pinned(&mut self, graph: &Graph<'_>, pins: &[(Tensor<'_>, &Backend)]) -> Result<()> {
        self.allocated = None;
        // SAFETY: valid scheduler; resetting first drops the previous graph's assignments.
        unsafe { sys::ggml_backend_sched_reset(self.as_ptr()) };
        self.pin(pins)?;
        // SAFETY: valid scheduler and graph.
        let ok = unsafe { sys::ggml_backend_sched_alloc_graph(self.as_ptr(), graph.as_ptr()) };
        self.health()?;
        ok.then_some(()).ok_or(Error::OutOfMemory("ggml_backend_sched_alloc_graph"))?;
        self.allocated = Some(graph.id());
        Ok(())
    }

    fn pin(&mut self, pins: &[(Tensor<'_>, &Backend)]) -> Result<()> {
        for (t, b) in pins {
            // ggml asserts that the backend is one of the scheduler's.
            if !self.backends.iter().any(|x| std::ptr::eq(x.as_ptr(), b.as_ptr())) {
                return Err(Error::Backend(format!("{} is not a backend of this scheduler", b.name())));
            }
            // SAFETY: valid scheduler, a live tensor of the graph about to be allocated, one of its backends.
            unsafe { sys::ggml_backend_sched_set_tensor_backend(self.as_ptr(), t.as_ptr(), b.as_ptr()) };
        }
        Ok(())
    }

    /// True while `graph` is the graph allocated last: its inputs can be written and it can be computed again.
    pub fn is_allocated(&self, graph: &Graph<'_>) -> bool {
        self.allocated == Some(graph.id())
    }

    /// Runs a graph to completion, allocating it first unless it is the graph allocated last (whose inputs the
    /// caller has written since).
    pub fn compute(&mut self, graph: &Graph<'_>) -> Result<()> {
        if !self.is_allocated(graph) {
            self.alloc(graph)?;
        }
        // SAFETY: valid scheduler and the graph it allocated last (checked above), whose tensors are all alive
        // (a Graph borrows everything it reaches).
        let status = unsafe { sys::ggml_backend_sched_graph_compute(self.as_ptr(), graph.as_ptr()) };
        // An RPC server that failed during the computation: its results are the relay's stand-ins, not results.
        self.health()?;
        if status == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(Error::Compute(status as i32))
        }
    }

    /// Ok unless an RPC server among the backends has failed (`crate::rpc`).
    pub fn health(&self) -> Result<()> {
        self.backends.iter().try_for_each(|b| b.health())
    }

    /// Bytes of the compute buffer this scheduler holds on `backend` (after `reserve` or `alloc`).
    pub fn buffer_size(&self, backend: &Backend) -> usize {
        // SAFETY: valid scheduler; a backend it was not made with yields 0 (ggml looks it up by pointer).
        unsafe { sys::ggml_backend_sched_get_buffer_size(self.as_ptr(), backend.as_ptr()) }
    }

    /// Number of parts the last graph was split into (1 = ran on a single backend).
    pub fn n_splits(&self) -> usize {
        // SAFETY: valid scheduler.
        unsafe { sys::ggml_backend_sched_get_n_splits(self.as_ptr()) as usize }
    }

    /// True if `t` belongs to the graph this scheduler allocated last and has memory.
    fn holds(&self, t: Tensor<'_>) -> bool {
        // SAFETY: a hash lookup by pointer value in the scheduler's tables; `t` is live.
        let backend = unsafe { sys::ggml_backend_sched_get_tensor_backend(self.as_ptr(), t.as_ptr()) };
        !backend.is_null() && !t.data_ptr().is_null() && !t.raw_buffer().is_null()
    }

    /// Writes `data` into the graph input `t` (after `alloc`).
    pub fn write<T: Pod>(&self, t: Tensor<'_>, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if !self.holds(t) {
            return Err(Error::NotAllocated(t.name()));
        }
        if bytes != t.nbytes() {
            return Err(Error::Size { tensor: t.name(), expected: t.nbytes(), got: bytes });
        }
        // SAFETY: t is allocated in a buffer of this live scheduler; data has exactly nbytes(t) bytes.
        unsafe { sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr().cast(), 0, bytes) };
        Ok(())
    }

    /// Reads a tensor of the last computed graph (mark it `set_output` so its memory is not reused).
    pub fn read<T: Pod>(&self, t: Tensor<'_>) -> Result<Vec<T>> {
        if !self.holds(t) {
            return Err(Error::NotAllocated(t.name()));
        }
        let out = crate::tensor::read_tensor(t)?;
        self.health()?;
        Ok(out)
    }

    /// As `read`, into `out` (its allocation reused from step to step).
    pub fn read_into<T: Pod>(&self, t: Tensor<'_>, out: &mut Vec<T>) -> Result<()> {
        if !self.holds(t) {
            return Err(Error::NotAllocated(t.name()));
        }
        crate::tensor::read_tensor_into(t, out)?;
        self.health()
    }
}

impl Drop for Scheduler<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the scheduler; its backends are still alive ('b).
        unsafe { sys::ggml_backend_sched_free(self.raw.as_ptr()) }
    }
}
