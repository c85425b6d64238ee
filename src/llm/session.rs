//! A decoding session: the model, its KV cache and a scheduler over the backends. `decode` runs one batch of new
//! tokens (ids or ready embeddings) and returns the logits of the rows asked for.

use std::rc::Rc;

use anyhow::{bail, Context as _, Result};
use ggml::{Backend, Context, Graph, KeptGraph, Scheduler, Type};

use super::kv_cache::KvCache;
use super::model::{CacheTensors, GraphInputs, LlamaModel};

/// New input rows: token ids, or embeddings `[n, n_embd]` row-major (image features from the projector).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    Tokens(&'a [u32]),
    Embeddings(&'a [f32]),
}

/// One batch: inputs, their positions and sequences, and which rows need logits.
#[derive(Clone, Debug)]
pub struct Batch<'a> {
    pub input: Input<'a>,
    pub pos: Vec<i32>,
    pub seq: Vec<usize>,
    pub logits: Vec<bool>,
}

impl<'a> Batch<'a> {
    /// Consecutive tokens of one sequence starting at `pos0`; logits for the last row only, or for all.
    pub fn sequence(input: Input<'a>, n: usize, pos0: i32, seq: usize, all_logits: bool) -> Batch<'a> {
        Batch {
            input,
            pos: (0..n as i32).map(|i| pos0 + i).collect(),
            seq: vec![seq; n],
            logits: (0..n).map(|i| all_logits || i + 1 == n).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.pos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
}

/// Options of a session.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub n_ctx: usize,
    /// Largest batch computed at once (prompts are split into micro-batches of this size).
    pub n_ubatch: usize,
    pub cache_type: Type,
    /// Where each layer's KV cache lives: the buffer type of the device its block runs on (this machine's memory,
    /// a GPU, an RPC server), so that its attention reads it there. Empty: every layer's on the first backend.
    pub layer_buffers: Vec<ggml::BufferType>,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams { n_ctx: 4096, n_ubatch: 512, cache_type: Type::F16, layer_buffers: Vec::new() }
    }
}

/// What a graph's shape depends on: rows, attended cells, rows with logits, and whether the input is embeddings.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Shape {
    n: usize,
    n_kv: usize,
    n_out: usize,
    embeddings: bool,
}

pub struct Session<'a> {
    pub model: &'a LlamaModel<'a>,
    pub cache: KvCache,
    sched: Scheduler<'a>,
    n_ubatch: usize,
    max_nodes: usize,
    backends: Vec<&'a Backend>,
    /// The last graph built and its shape: the next batch of the same shape (every decode step until the attended
    /// prefix grows past a multiple of 256 cells) computes it again with new inputs, without building or
    /// allocating anything, as llama.cpp reuses its graphs.
    kept: Option<(Shape, KeptGraph<'a>)>,
    /// Graphs built so far (a measure of reuse).
    graphs_built: usize,
    /// With blocks on RPC servers: the backend (index into `backends`) of each layer, where its first node (the
    /// input's `norm`) and its output (`l_out`) are computed. Left to itself, ggml's scheduler computes a layer's
    /// closing residual sum, or the next layer's opening norm, on the other side of a change of device, which then
    /// receives two rows of activations instead of one (llama.cpp pins its norms for the same reason).
    layer_pins: Option<Vec<usize>>,
    /// Buffers of the inputs written at every step, kept between steps so that a step allocates nothing.
    mask: Vec<half::f16>,
    ids: Vec<i32>,
    cells: Vec<i64>,
    out_ids: Vec<i32>,
    /// Called with the row count of every batch computed (a progress bar over a long prompt).
    progress: Option<Box<dyn FnMut(usize) + 'a>>,
}

impl<'a> Session<'a> {
    /// `backends` in priority order, CPU last.
    pub fn new(model: &'a LlamaModel<'a>, backends: &[&'a Backend], p: &SessionParams) -> Result<Session<'a>> {
        let first = backends.first().context("no backend")?;
        let place = match p.layer_buffers.is_empty() {
            true => vec![first.buffer_type(); model.hp.n_layer],
            false if p.layer_buffers.len() == model.hp.n_layer => p.layer_buffers.clone(),
            false => bail!("{} layer buffer types for {} layers", p.layer_buffers.len(), model.hp.n_layer),
        };
        let cache = KvCache::new_placed(&model.hp, p.n_ctx, p.cache_type, &place)?;
        let max_nodes = 64 + 48 * model.hp.n_layer;
        let sched = Scheduler::new(backends, max_nodes)?;
        // (Only with RPC servers: on a GPU, ggml moves large batches of CPU layers to the GPU itself, which a pin
        // to the CPU would undo.)
        let layer_pins = match backends.iter().any(|b| b.is_rpc()) {
            false => None,
            true => Some(
                place
                    .iter()
                    .map(|&b| backends.iter().position(|x| x.supports_buft(b)).unwrap_or(backends.len() - 1))
                    .collect(),
            ),
        };
        let mut session = Session {
            model,
            cache,
            sched,
            n_ubatch: p.n_ubatch.max(1),
            max_nodes,
            backends: backends.to_vec(),
            layer_pins,
            kept: None,
            graphs_built: 0,
            mask: Vec::new(),
            ids: Vec::new(),
            cells: Vec::new(),
            out_ids: Vec::new(),
            progress: None,
        };
        session.reserve()?;
        Ok(session)
    }

    /// Reserves the compute buffers for the largest graph this session runs: a full micro-batch attending to every
    /// cell, with logits for up to 64 rows (a decode step of every sequence), as llama.cpp reserves its worst case.
    /// No later batch then reallocates, and `compute_bytes` is known before anything is computed. The buffers are
    /// only reserved: their pages become resident as graphs use them.
    fn reserve(&mut self) -> Result<()> {
        let (n, n_kv) = (self.n_ubatch.min(self.cache.n_cells()).max(1), self.cache.n_cells());
        let ctx = Context::new(self.max_nodes * 2, self.max_nodes)?;
        let shape = Shape { n, n_kv, n_out: n.min(64), embeddings: false };
        let gf = Self::graph(self.model, &self.cache.tensors(), self.max_nodes, &ctx, shape);
        let pins = self.pins(|n| gf.tensor(n));
        self.sched.reserve_pinned(&gf, &pins)?;
        Ok(())
    }

    /// Each layer's first and last node pinned to its backend (`layer_pins`), found by name in a graph.
    fn pins<'g>(&self, find: impl Fn(&str) -> Option<ggml::Tensor<'g>>) -> Vec<(ggml::Tensor<'g>, &'a Backend)> {
        let Some(pins) = &self.layer_pins else { return Vec::new() };
        pins.iter()
            .enumerate()
            .flat_map(|(il, &b)| [format!("norm-{il}"), format!("l_out-{il}")].map(|n| (n, b)))
            .filter_map(|(n, b)| find(&n).map(|t| (t, self.backends[b])))
            .collect()
    }

    /// Bytes of the compute buffers on the host (the GPU's are not host memory).
    pub fn compute_bytes(&self) -> usize {
        self.backends.iter().filter(|b| b.is_cpu()).map(|b| self.sched.buffer_size(b)).sum()
    }

    /// Host memory one step allocates besides ggml's buffers, at most: the attention mask built here (f16, one
    /// context-long row per batch row) and the logits read back (up to 64 rows).
    pub fn host_step_bytes(&self) -> usize {
        let n = self.n_ubatch.min(self.cache.n_cells());
        n * self.cache.n_cells() * 2 + n.min(64) * self.model.hp.n_vocab * 4
    }

    /// The language model's graph for `n` rows attending to `n_kv` cells, with logits for `n_out` rows.
    /// (A function of the fields it reads, so that the scheduler can be borrowed mutably beside the graph.)
    fn graph<'g>(
        model: &'g LlamaModel<'g>,
        cache: &CacheTensors<'g>,
        max_nodes: usize,
        ctx: &'g Context,
        Shape { n, n_kv, n_out, embeddings }: Shape,
    ) -> Graph<'g> {
        let hp = &model.hp;
        let (tokens, embeddings) = match embeddings {
            false => (Some(ctx.new_tensor(Type::I32, &[n]).named("inp_tokens").set_input()), None),
            true => (None, Some(ctx.new_tensor(Type::F32, &[hp.n_embd, n]).named("inp_embd").set_input())),
        };
        let inputs = GraphInputs {
            tokens,
            embeddings,
            pos: ctx.new_tensor(Type::I32, &[n]).named("inp_pos").set_input(),
            mask: ctx.new_tensor(Type::F16, &[n_kv, n]).named("kq_mask").set_input(),
            kv_idx: ctx.new_tensor(Type::I64, &[n]).named("kv_idx").set_input(),
            out_ids: ctx.new_tensor(Type::I32, &[n_out]).named("out_ids").set_input(),
        };
        let mut gf = ctx.new_graph(max_nodes);
        // The inputs and the logits are found by name in the graph (`KeptGraph::tensor`) when a step fills them.
        model.build_graph(ctx, &mut gf, &inputs, cache, n, n_kv);
        gf
    }

    /// Ok unless an RPC server holding some of the blocks has failed (then every later batch fails too).
    pub fn health(&self) -> Result<()> {
        Ok(self.sched.health()?)
    }

    pub fn n_ubatch(&self) -> usize {
        self.n_ubatch
    }

    /// Graphs built since the session started (a batch of the shape of the one before reuses its graph).
    pub fn graphs_built(&self) -> usize {
        self.graphs_built
    }

    /// Sets (or, with `None`, removes) a function called with the row count of every batch computed.
    pub fn set_progress(&mut self, f: Option<Box<dyn FnMut(usize) + 'a>>) {
        self.progress = f;
    }

    /// Computes one batch (at most `n_ubatch` rows); returns the logits of the rows with `logits[i]`, in order,
    /// `n_vocab` values each.
    pub fn decode(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.decode_into(batch, &mut out)?;
        Ok(out)
    }

    /// As `decode`, into `out` (a decode loop passes the same vector every step and allocates nothing).
    pub fn decode_into(&mut self, batch: &Batch<'_>, out: &mut Vec<f32>) -> Result<()> {
        let n = batch.len();
        let hp = &self.model.hp;
        if n == 0 || n > self.n_ubatch || batch.seq.len() != n || batch.logits.len() != n {
            bail!("bad batch of {n} rows (micro-batch size {})", self.n_ubatch);
        }
        match batch.input {
            Input::Tokens(t) if t.len() != n => bail!("{} token ids for {n} positions", t.len()),
            Input::Tokens(t) => {
                if let Some(&bad) = t.iter().find(|&&id| id as usize >= hp.n_vocab) {
                    bail!("token id {bad} is outside the vocabulary ({})", hp.n_vocab);
                }
            }
            Input::Embeddings(e) if e.len() != n * hp.n_embd => {
                bail!("{} embedding values for {n} rows of {}", e.len(), hp.n_embd)
            }
            Input::Embeddings(_) => {}
        }
        if !batch.logits.contains(&true) {
            bail!("a batch must ask for at least one row of logits");
        }
        let cells = self.cache.claim(&batch.pos, &batch.seq)?;
        let result = self.compute(batch, &cells, out);
        match (&result, &mut self.progress) {
            (Err(_), _) => self.cache.release(&cells),
            (Ok(_), Some(f)) => f(n),
            (Ok(_), None) => {}
        }
        result
    }

    fn compute(&mut self, batch: &Batch<'_>, cells: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let n = batch.len();
        let n_kv = self.cache.n_kv();
        self.cache.prepare(n_kv)?;
        self.out_ids.clear();
        self.out_ids.extend((0..n as i32).filter(|&i| batch.logits[i as usize]));
        let embeddings = matches!(batch.input, Input::Embeddings(_));
        let shape = Shape { n, n_kv, n_out: self.out_ids.len(), embeddings };

        // (A cache replaced since the graph was built invalidates it too: the graph reads the cache it was built on.)
        let stale = |(s, g): &(Shape, KeptGraph<'_>)| {
            let cache = self.cache.contexts();
            *s != shape || g.kept().len() != cache.len() || g.kept().iter().zip(&cache).any(|(a, b)| !Rc::ptr_eq(a, b))
        };
        if self.kept.as_ref().is_none_or(stale) {
            self.kept = None; // the old graph's context goes before the new one is made
            let (model, max_nodes, n_layer) = (self.model, self.max_nodes, self.model.hp.n_layer);
            let ctx = Context::new(max_nodes * 2, max_nodes)?;
            let kept = KeptGraph::build(ctx, self.cache.contexts(), |ctx, keep, _within| {
                Self::graph(model, &CacheTensors::of(keep, n_layer), max_nodes, ctx, shape)
            });
            self.kept = Some((shape, kept));
            self.graphs_built += 1;
        }
        let kept = &self.kept.as_ref().expect("built above").1;
        let gf = kept.graph();
        if !self.sched.is_allocated(&gf) {
            let pins = self.pins(|n| kept.tensor(n));
            self.sched.alloc_pinned(&gf, &pins)?;
        }
        let input = |name: &str| kept.tensor(name).with_context(|| format!("graph input {name}"));
        match batch.input {
            Input::Tokens(t) => {
                self.ids.clear();
                self.ids.extend(t.iter().map(|&x| x as i32));
                self.sched.write(input("inp_tokens")?, &self.ids)?
            }
            Input::Embeddings(e) => self.sched.write(input("inp_embd")?, e)?,
        }
        self.sched.write(input("inp_pos")?, &batch.pos)?;
        self.cache.mask_into(n_kv, &batch.pos, &batch.seq, &mut self.mask);
        self.sched.write(input("kq_mask")?, &self.mask)?;
        self.cells.clear();
        self.cells.extend(cells.iter().map(|&c| c as i64));
        self.sched.write(input("kv_idx")?, &self.cells)?;
        if shape.n_out < n {
            // (With every row wanted the graph has no row selection and this input is unused.)
            self.sched.write(input("out_ids")?, &self.out_ids)?;
        }
        self.sched.compute(&gf)?;
        self.sched.read_into(input("result_output")?, out)?;
        Ok(())
    }

    /// Feeds `input` (n rows) to sequence `seq` from position `pos0` in micro-batches. Returns the logits of every
    /// row if `all_logits`, else of the last row.
    pub fn prefill(&mut self, input: Input<'_>, seq: usize, pos0: i32, all_logits: bool) -> Result<Vec<f32>> {
        let (n, width) = match input {
            Input::Tokens(t) => (t.len(), 1),
            Input::Embeddings(e) => (e.len() / self.model.hp.n_embd, self.model.hp.n_embd),
        };
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + self.n_ubatch).min(n);
            let part = match input {
                Input::Tokens(t) => Input::Tokens(&t[start..end]),
                Input::Embeddings(e) => Input::Embeddings(&e[start * width..end * width]),
            };
            let mut b = Batch::sequence(part, end - start, pos0 + start as i32, seq, all_logits);
            if !all_logits && end < n {
                // Only the very last row's logits are wanted; still ask for one row so the graph has an output.
                b.logits.iter_mut().for_each(|l| *l = false);
                *b.logits.last_mut().unwrap() = true;
            }
            let l = self.decode(&b)?;
            if all_logits || end == n {
                out.extend(l);
            }
            start = end;
        }
        Ok(out)
    }
}
