//! `Graph<'ctx>`: a computation graph whose nodes live in a `Context`.

use std::ptr::NonNull;

use crate::{sys, Context, Tensor};

/// A forward graph, built in (and borrowing) a context that was created with room for it.
pub struct Graph<'ctx> {
    raw: NonNull<sys::ggml_cgraph>,
    ctx: &'ctx Context,
}

impl Context {
    /// A new, empty graph of up to `max_nodes` nodes (the context must have been sized for it).
    pub fn new_graph(&self, max_nodes: usize) -> Graph<'_> {
        // SAFETY: valid context; ggml aborts if the pool has no room (a sizing bug, not UB).
        let raw = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), max_nodes, false) };
        Graph { raw: NonNull::new(raw).expect("ggml_new_graph_custom returned null"), ctx: self }
    }
}

impl<'ctx> Graph<'ctx> {
    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_cgraph {
        self.raw.as_ptr()
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

    /// The context the graph lives in.
    pub fn context(&self) -> &'ctx Context {
        self.ctx
    }
}
