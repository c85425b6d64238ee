//! `Graph<'ctx>`: a computation graph whose nodes live in a `Context`; `KeptGraph`: a graph kept together with its
//! context, to be computed again without being rebuilt.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{sys, Context, Tensor};

/// A forward graph, built in (and borrowing) a context that was created with room for it.
pub struct Graph<'ctx> {
    raw: NonNull<sys::ggml_cgraph>,
    ctx: &'ctx Context,
    /// Unique per graph built (a `KeptGraph` hands out its graph under one id), so that a scheduler can tell the
    /// graph it allocated last from another one, even one that a later allocation put at the same address.
    id: u64,
}

static NEXT_GRAPH_ID: AtomicU64 = AtomicU64::new(1);

impl Context {
    /// A new, empty graph of up to `max_nodes` nodes (the context must have been sized for it).
    pub fn new_graph(&self, max_nodes: usize) -> Graph<'_> {
        // SAFETY: valid context; ggml aborts if the pool has no room (a sizing bug, not UB).
        let raw = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), max_nodes, false) };
        let raw = NonNull::new(raw).expect("ggml_new_graph_custom returned null");
        Graph { raw, ctx: self, id: NEXT_GRAPH_ID.fetch_add(1, Ordering::Relaxed) }
    }
}

impl<'ctx> Graph<'ctx> {
    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_cgraph {
        self.raw.as_ptr()
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Adds `t` and everything it depends on.
    pub fn build_forward_expand(&mut self, t: Tensor<'ctx>) {
        // SAFETY: valid graph and tensor; the tensor outlives the graph ('ctx).
        unsafe { sys::ggml_build_forward_expand(self.as_ptr(), t.as_ptr()) }
    }

    /// Number of compute nodes.
    pub fn n_nodes(&self) -> usize {
        // SAFETY: reads a valid graph.
        unsafe { sys::ggml_graph_n_nodes(self.as_ptr()) as usize }
    }

    /// Node `i` (0-based, `i < n_nodes()`).
    pub fn node(&self, i: usize) -> Tensor<'ctx> {
        assert!(i < self.n_nodes(), "node {i} of {}", self.n_nodes());
        // SAFETY: index checked; nodes are tensors of contexts that outlive 'ctx.
        unsafe { Tensor::from_raw(sys::ggml_graph_node(self.as_ptr(), i as i32)) }
    }

    /// The graph's tensor (node or leaf) named `name`.
    pub fn tensor(&self, name: &str) -> Option<Tensor<'ctx>> {
        let c = CString::new(name).ok()?;
        // SAFETY: a valid graph and a NUL-terminated name; ggml returns null when no tensor has the name.
        let t = unsafe { sys::ggml_graph_get_tensor(self.as_ptr(), c.as_ptr()) };
        // SAFETY: a non-null result is a tensor of this graph, whose tensors all outlive 'ctx.
        (!t.is_null()).then(|| unsafe { Tensor::from_raw(t) })
    }

    /// The context the graph lives in.
    pub fn context(&self) -> &'ctx Context {
        self.ctx
    }
}

/// Proof, inside `KeptGraph::build`'s closure, that `'w` outlives the closure's context lifetime `'c`: with it in
/// the closure's signature, tensors of lifetime `'w` (a model's weights) may be used as `Tensor<'c>`.
pub struct Within<'c, 'w: 'c>(PhantomData<&'c &'w ()>);

/// A graph kept together with the context that holds its nodes, so that it can be computed again with new input
/// values without being rebuilt or reallocated (as llama.cpp reuses a decode step's graph while its shape repeats).
///
/// Everything the graph reaches outside its own context is kept alive: tensors of lifetime `'w` (the borrow of
/// the weights outlives the `KeptGraph`), and the contexts in `keep` (a KV cache), held by reference count.
pub struct KeptGraph<'w> {
    raw: NonNull<sys::ggml_cgraph>,
    id: u64,
    ctx: Context,
    keep: Vec<Rc<Context>>,
    _w: PhantomData<fn(&'w ()) -> &'w ()>,
}

impl<'w> KeptGraph<'w> {
    /// Builds the graph with `f`, which gets the graph's context `ctx`, the contexts of `keep` and the `Within`
    /// proof, and must return a graph built in `ctx`.
    pub fn build<F>(ctx: Context, keep: Vec<Rc<Context>>, f: F) -> KeptGraph<'w>
    where
        F: for<'c> FnOnce(&'c Context, &'c [Rc<Context>], Within<'c, 'w>) -> Graph<'c>,
    {
        let (raw, id) = {
            let g = f(&ctx, &keep, Within(PhantomData));
            assert!(std::ptr::eq(g.ctx, &ctx), "KeptGraph::build: the graph must be built in the context given");
            (g.raw, g.id)
        };
        // Moving `ctx` moves the owner only: the graph lives in ggml's memory pool, which stays where it is.
        KeptGraph { raw, id, ctx, keep, _w: PhantomData }
    }

    /// The graph, for a scheduler to allocate and compute (always under the same id).
    pub fn graph(&self) -> Graph<'_> {
        Graph { raw: self.raw, ctx: &self.ctx, id: self.id }
    }

    /// The graph's tensor (node or leaf) named `name`.
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        self.graph().tensor(name)
    }

    /// The contexts kept alive with the graph.
    pub fn kept(&self) -> &[Rc<Context>] {
        &self.keep
    }
}
