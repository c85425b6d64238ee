//! The KV cache: per layer one K and one V tensor of `n_cells` rows, plus the bookkeeping of which sequences
//! each cell belongs to. Like llama.cpp's unified cache, a cell can belong to several sequences at once, so beams
//! share their common prefix: copying a sequence, dropping one or reordering beams only relabels cells, and no
//! K/V data moves.

use std::rc::Rc;

use anyhow::{bail, Context as _, Result};
use ggml::{Backend, BufferType, Context, Tensor, Type};

use super::hparams::HParams;
use super::model::CacheTensors;

/// Sequences are bits of a u64: at most 64 live sequences (beams) at once.
pub const MAX_SEQ: usize = 64;

/// `n_kv` (the cache prefix a graph attends to) is rounded up to this, so consecutive decode steps build graphs of
/// the same shape and the scheduler reuses its allocation.
const N_KV_PAD: usize = 256;

#[derive(Clone, Copy, Default)]
struct Cell {
    pos: i32,
    /// Bit s set: the cell belongs to sequence s. 0 = free.
    seqs: u64,
}

pub struct KvCache {
    /// The K/V tensors' contexts, one per buffer type they live in (one, unless the layers are split across
    /// devices), shared with the kept decode graph that reads them (see `Session`).
    ctxs: Vec<Rc<Context>>,
    /// K/V tensor t (`n_tensors`) is in `ctxs[owner[t]]`.
    owner: Vec<usize>,
    n_layer: usize,
    cells: Vec<Cell>,
    ty: Type,
    /// Cells `0..zeroed` hold zeros or written K/V data (see `prepare`).
    zeroed: usize,
}

impl KvCache {
    /// A cache of `n_cells` positions in `ty` (F16 by default; F32 for exact parity; Q8_0 to halve it).
    /// Bytes of K/V data a cache of `n_cells` cells of type `ty` holds (`None` if the type does not fit the rows
    /// or the size overflows), known before allocating anything.
    pub fn bytes_for(hp: &HParams, n_cells: usize, ty: Type) -> Option<usize> {
        ty.row_size(hp.n_embd_kv())?.checked_mul(n_cells)?.checked_mul(2 * hp.n_layer)
    }

    pub fn new(hp: &HParams, n_cells: usize, ty: Type, backend: &Backend) -> Result<KvCache> {
        Self::new_placed(hp, n_cells, ty, &vec![backend.buffer_type(); hp.n_layer])
    }

    /// As `new`, each layer's K and V in a buffer of `place[layer]`: where the layer's block runs (this machine's
    /// memory, a GPU, an RPC server), so that its attention reads them there.
    pub fn new_placed(hp: &HParams, n_cells: usize, ty: Type, place: &[BufferType]) -> Result<KvCache> {
        if ty.row_size(hp.n_embd_kv()).is_none() {
            bail!("KV cache type {ty} does not fit rows of {}", hp.n_embd_kv());
        }
        assert_eq!(place.len(), hp.n_layer, "a buffer type per layer");
        let mut types: Vec<BufferType> = Vec::new();
        for b in place {
            if !types.contains(b) {
                types.push(*b);
            }
        }
        let ctxs = types.iter().map(|_| Context::new(2 * hp.n_layer, 0)).collect::<ggml::Result<Vec<_>>>()?;
        let mut owner = Vec::with_capacity(2 * hp.n_layer);
        for (il, b) in place.iter().enumerate() {
            let i = types.iter().position(|t| t == b).expect("collected above");
            ctxs[i].new_tensor(ty, &[hp.n_embd_kv(), n_cells]).named(&format!("cache_k_l{il}"));
            ctxs[i].new_tensor(ty, &[hp.n_embd_kv(), n_cells]).named(&format!("cache_v_l{il}"));
            owner.extend([i, i]);
        }
        for (ctx, b) in ctxs.iter().zip(&types) {
            ctx.alloc_tensors_in(*b).with_context(|| format!("allocating the KV cache in {}", b.name()))?;
        }
        // Not zeroed here: `prepare` zeroes cells as graphs first reach them, so a large context costs memory only
        // as far as it is used (untouched pages of the buffer are never made resident).
        Ok(KvCache {
            ctxs: ctxs.into_iter().map(Rc::new).collect(),
            owner,
            n_layer: hp.n_layer,
            cells: vec![Cell::default(); n_cells],
            ty,
            zeroed: 0,
        })
    }

    /// K/V tensor `t` (K of layer 0, V of layer 0, K of layer 1, ...) and the context that owns it.
    fn tensor(&self, t: usize) -> (&Context, Tensor<'_>) {
        let ctx = &self.ctxs[self.owner[t]];
        let name = match t % 2 {
            0 => format!("cache_k_l{}", t / 2),
            _ => format!("cache_v_l{}", t / 2),
        };
        (ctx, ctx.get_tensor(&name).expect("made by new_placed"))
    }

    /// Makes cells `0..n_kv` safe to attend to before a graph does: masked cells still meet a zero attention
    /// weight, and 0 x NaN from uninitialized memory would be NaN. Each cell is zeroed once, the first time the
    /// attended prefix reaches it.
    pub fn prepare(&mut self, n_kv: usize) -> Result<()> {
        if n_kv <= self.zeroed {
            return Ok(());
        }
        for ctx in &self.ctxs {
            for t in ctx.tensors() {
                let row = t.nb()[1];
                ctx.memset(t, 0, self.zeroed * row, (n_kv - self.zeroed) * row)?;
            }
        }
        self.zeroed = n_kv;
        Ok(())
    }

    pub fn n_cells(&self) -> usize {
        self.cells.len()
    }

    pub fn ty(&self) -> Type {
        self.ty
    }

    /// Bytes of K/V data.
    pub fn bytes(&self) -> usize {
        self.ctxs.iter().flat_map(|c| c.tensors()).map(|t| t.nbytes()).sum()
    }

    pub fn tensors(&self) -> CacheTensors<'_> {
        CacheTensors::of(&self.ctxs, self.n_layer)
    }

    /// The K/V tensors' contexts, for a graph that is kept past this borrow.
    pub fn contexts(&self) -> Vec<Rc<Context>> {
        self.ctxs.clone()
    }

    /// Claims `n` free cells for tokens at `pos` of sequences `seq`; returns their indices.
    pub fn claim(&mut self, pos: &[i32], seq: &[usize]) -> Result<Vec<usize>> {
        let free: Vec<usize> =
            self.cells.iter().enumerate().filter(|(_, c)| c.seqs == 0).map(|(i, _)| i).take(pos.len()).collect();
        if free.len() < pos.len() {
            bail!("the context is full ({} cells); use a larger --ctx-size", self.cells.len());
        }
        for ((&c, &p), &s) in free.iter().zip(pos).zip(seq) {
            assert!(s < MAX_SEQ, "sequence id {s}");
            self.cells[c] = Cell { pos: p, seqs: 1 << s };
        }
        Ok(free)
    }

    /// Frees cells (after a failed decode).
    pub fn release(&mut self, cells: &[usize]) {
        for &c in cells {
            self.cells[c] = Cell::default();
        }
    }

    /// The cache prefix a graph must attend to: up to the last used cell, rounded up to a multiple of 256.
    pub fn n_kv(&self) -> usize {
        let used = self.cells.iter().rposition(|c| c.seqs != 0).map_or(0, |i| i + 1);
        used.div_ceil(N_KV_PAD).max(1).saturating_mul(N_KV_PAD).min(self.cells.len())
    }

    /// The attention mask `[n_kv, n_tokens]` (F16 bits): token t (position pos[t], sequence seq[t]) sees the cells
    /// of its sequence at positions up to its own.
    pub fn mask(&self, n_kv: usize, pos: &[i32], seq: &[usize]) -> Vec<half::f16> {
        let mut m = Vec::new();
        self.mask_into(n_kv, pos, seq, &mut m);
        m
    }

    /// `mask`, written into `m` (a buffer kept from step to step: a step allocates nothing once it has grown to
    /// the largest batch and context).
    pub fn mask_into(&self, n_kv: usize, pos: &[i32], seq: &[usize], m: &mut Vec<half::f16>) {
        m.clear();
        m.resize(n_kv * pos.len(), half::f16::NEG_INFINITY);
        for (t, (&p, &s)) in pos.iter().zip(seq).enumerate() {
            let row = &mut m[t * n_kv..(t + 1) * n_kv];
            for (c, cell) in self.cells[..n_kv].iter().enumerate() {
                if cell.seqs & (1 << s) != 0 && cell.pos <= p {
                    row[c] = half::f16::ZERO;
                }
            }
        }
    }

    /// Next position of sequence `s` (one past its last cell), 0 if empty.
    pub fn seq_len(&self, s: usize) -> i32 {
        self.cells.iter().filter(|c| c.seqs & (1 << s) != 0).map(|c| c.pos + 1).max().unwrap_or(0)
    }

    /// Sequence `dst` becomes a copy of `src` (shares its cells).
    pub fn seq_cp(&mut self, src: usize, dst: usize) {
        self.seq_rm(dst);
        for c in &mut self.cells {
            if c.seqs & (1 << src) != 0 {
                c.seqs |= 1 << dst;
            }
        }
    }

    /// Removes sequence `s` (cells no other sequence holds become free).
    pub fn seq_rm(&mut self, s: usize) {
        for c in &mut self.cells {
            c.seqs &= !(1 << s);
        }
    }

    /// Removes sequence `s` from the cells at positions `p` and later (a conversation cut back to its prompt).
    pub fn seq_truncate(&mut self, s: usize, p: i32) {
        for c in self.cells.iter_mut().filter(|c| c.pos >= p) {
            c.seqs &= !(1 << s);
        }
    }

    /// Sequence `dst` becomes a copy of `src`'s cells at positions before `p` (a shared prompt prefix: the cells
    /// gain a sequence, no K/V data moves). `dst`'s own cells are dropped first.
    pub fn seq_cp_prefix(&mut self, src: usize, dst: usize, p: i32) {
        self.seq_rm(dst);
        for c in self.cells.iter_mut().filter(|c| c.pos < p && c.seqs & (1 << src) != 0) {
            c.seqs |= 1 << dst;
        }
    }

    /// Bytes of one cell's row in each K or V tensor.
    pub fn row_bytes(&self) -> usize {
        self.tensor(0).1.nb()[1]
    }

    /// Number of K/V tensors (`2 * n_layer`: K of layer 0, V of layer 0, K of layer 1, ...).
    pub fn n_tensors(&self) -> usize {
        2 * self.n_layer
    }

    /// The cell of each position `0..n` of sequence `s`; an error if a position has no cell (or two).
    fn cells_of(&self, s: usize, n: usize) -> Result<Vec<usize>> {
        let mut at = vec![usize::MAX; n];
        for (c, cell) in self.cells.iter().enumerate() {
            if cell.seqs & (1 << s) != 0 && (cell.pos as usize) < n && cell.pos >= 0 {
                if at[cell.pos as usize] != usize::MAX {
                    bail!("position {} of sequence {s} is held twice", cell.pos);
                }
                at[cell.pos as usize] = c;
            }
        }
        if let Some(p) = at.iter().position(|&c| c == usize::MAX) {
            bail!("position {p} of sequence {s} is not in the cache");
        }
        Ok(at)
    }

    /// The rows of K/V tensor `t` (see `n_tensors`) for positions `0..n` of sequence `s`, in position order: what
    /// a prefix or session file stores.
    pub fn read_rows(&self, t: usize, s: usize, n: usize) -> Result<Vec<u8>> {
        let at = self.cells_of(s, n)?;
        let row = self.row_bytes();
        let (ctx, tensor) = self.tensor(t);
        let top = at.iter().max().map_or(0, |&c| c + 1);
        let raw = ctx.read_bytes(tensor, 0, top * row)?;
        let mut out = Vec::with_capacity(n * row);
        for &c in &at {
            out.extend_from_slice(&raw[c * row..(c + 1) * row]);
        }
        Ok(out)
    }

    /// Sequence `s`, which must be empty, takes positions `0..n` with the rows `rows(t)` gives for each K/V tensor
    /// `t` (`n` rows each, as `read_rows` returns them). The cells are claimed as a prefill of the same positions
    /// would claim them, so what is computed after them runs on exactly the cache a fresh computation leaves.
    pub fn write_rows<'r>(&mut self, s: usize, n: usize, rows: impl Fn(usize) -> &'r [u8]) -> Result<()> {
        if self.seq_len(s) != 0 {
            bail!("sequence {s} is not empty");
        }
        let row = self.row_bytes();
        for t in 0..self.n_tensors() {
            if rows(t).len() != n * row {
                bail!("{} bytes of rows for tensor {t}, expected {n} x {row}", rows(t).len());
            }
        }
        if n == 0 {
            return Ok(());
        }
        let pos: Vec<i32> = (0..n as i32).collect();
        let cells = self.claim(&pos, &vec![s; n])?;
        let written = (|| {
            // Zero what graphs will attend to first, so that `prepare` never wipes the rows written here.
            self.prepare(self.n_kv())?;
            for t in 0..self.n_tensors() {
                let (ctx, tensor) = self.tensor(t);
                let src = rows(t);
                // Consecutive cells (the usual case) are one copy.
                let mut i = 0;
                while i < n {
                    let mut j = i + 1;
                    while j < n && cells[j] == cells[j - 1] + 1 {
                        j += 1;
                    }
                    ctx.write_bytes(tensor, cells[i] * row, &src[i * row..j * row])?;
                    i = j;
                }
            }
            Ok(())
        })();
        if written.is_err() {
            self.release(&cells);
        }
        written
    }

    /// Cells no sequence holds.
    pub fn n_free(&self) -> usize {
        self.cells.iter().filter(|c| c.seqs == 0).count()
    }

    /// Cells that `seqs` (a sequence bit set) hold and no other sequence does: what removing them frees.
    pub fn n_only(&self, seqs: u64) -> usize {
        self.cells.iter().filter(|c| c.seqs != 0 && c.seqs & !seqs == 0).count()
    }

    /// Removes every sequence.
    pub fn clear(&mut self) {
        self.cells.fill(Cell::default());
    }

    /// Beam reordering: new sequence i takes what old sequence `from[i]` had, for i in 0..from.len(); other
    /// sequences are dropped. Cells no beam keeps become free.
    pub fn reorder(&mut self, from: &[usize]) {
        self.reorder_range(0, MAX_SEQ, from);
    }

    /// `reorder` within the sequences `base..base + width` (one server slot's beams), `from` relative to `base`:
    /// new sequence base+i takes what old sequence base+from[i] had; the range's other sequences are dropped and
    /// sequences outside the range keep their cells.
    pub fn reorder_range(&mut self, base: usize, width: usize, from: &[usize]) {
        assert!(base + width <= MAX_SEQ && from.len() <= width, "sequences {base}+{width}, {} beams", from.len());
        let range = if width == MAX_SEQ { u64::MAX } else { ((1u64 << width) - 1) << base };
        for c in &mut self.cells {
            let old = c.seqs;
            let moved = from.iter().enumerate().fold(0, |acc, (i, &f)| {
                if old & (1 << (base + f)) != 0 {
                    acc | (1 << (base + i))
                } else {
                    acc
                }
            });
            c.seqs = (old & !range) | moved;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(n: usize) -> KvCache {
        let hp = HParams {
            n_embd: 8,
            n_layer: 1,
            n_head: 2,
            n_head_kv: 2,
            head_dim: 4,
            n_ff: 8,
            n_vocab: 4,
            n_ctx_train: 64,
            rms_eps: 1e-5,
            rope_base: 1e4,
        };
        KvCache::new(&hp, n, Type::F16, &Backend::cpu(1).unwrap()).unwrap()
    }

    #[test]
    fn mask_is_causal_per_sequence_and_beams_share_prefix() {
        let mut kv = cache(8);
        kv.claim(&[0, 1, 2], &[0, 0, 0]).unwrap();
        kv.seq_cp(0, 1);
        kv.claim(&[3, 3], &[0, 1]).unwrap();
        assert_eq!((kv.seq_len(0), kv.seq_len(1)), (4, 4));
        let m = kv.mask(8, &[3, 3], &[0, 1]);
        let vis = |t: usize| (0..8).filter(|&c| m[t * 8 + c] == half::f16::ZERO).collect::<Vec<_>>();
        assert_eq!(vis(0), vec![0, 1, 2, 3]);
        assert_eq!(vis(1), vec![0, 1, 2, 4]);
        // Beam 0 continues from old beam 1 and beam 1 from old beam 1 too: cell 3 (old beam 0) is freed.
        kv.reorder(&[1, 1]);
        let m = kv.mask(8, &[4, 4], &[0, 1]);
        assert_eq!(vis_of(&m, 0), vec![0, 1, 2, 4]);
        assert_eq!(vis_of(&m, 1), vec![0, 1, 2, 4]);
        assert_eq!(kv.claim(&[4], &[0]).unwrap(), vec![3], "freed cell reused");
        // Cut back to positions 0..2: sequence 0 loses positions 2..4; sequence 1 keeps positions 0..3.
        kv.seq_truncate(0, 2);
        assert_eq!((kv.seq_len(0), kv.seq_len(1)), (2, 4));
        assert_eq!(vis_of(&kv.mask(8, &[2], &[0]), 0), vec![0, 1]);
    }

    /// Cells are zeroed as the attended prefix first reaches them, and only those.
    #[test]
    fn prepare_zeroes_the_attended_prefix_once() {
        let mut kv = cache(8);
        kv.ctxs[0].clear(0xff); // f16 0xffff is NaN: what uninitialized memory may hold
        kv.prepare(3).unwrap();
        kv.prepare(2).unwrap();
        for t in kv.ctxs[0].tensors() {
            let bytes: Vec<u8> = kv.ctxs[0].read(t).unwrap();
            let row = t.nb()[1];
            assert!(bytes[..3 * row].iter().all(|&b| b == 0), "{}: cells 0..3 zeroed", t.name());
            assert!(bytes[3 * row..].iter().all(|&b| b == 0xff), "{}: cells 3.. untouched", t.name());
        }
    }

    /// Two slots in one cache: reordering one slot's beams leaves the other's cells alone; a prefix copied to
    /// another sequence shares its cells.
    #[test]
    fn slots_reorder_their_own_range_and_share_prefixes() {
        let mut kv = cache(16);
        kv.claim(&[0, 1, 2], &[0, 0, 0]).unwrap(); // slot A (sequences 0..4), prompt
        kv.claim(&[0, 1], &[4, 4]).unwrap(); // slot B (sequences 4..8)
        kv.seq_cp(4, 5);
        kv.claim(&[2, 2], &[4, 5]).unwrap();
        kv.reorder_range(0, 4, &[0, 0, 0]); // A: three beams of the prompt
        assert_eq!((kv.seq_len(0), kv.seq_len(1), kv.seq_len(2), kv.seq_len(3)), (3, 3, 3, 0));
        assert_eq!((kv.seq_len(4), kv.seq_len(5)), (3, 3), "slot B untouched");
        kv.reorder_range(4, 4, &[1]); // B keeps its second beam only
        assert_eq!((kv.seq_len(4), kv.seq_len(5)), (3, 0));
        assert_eq!(kv.n_free(), 16 - 3 - 3, "B's dropped beam cell is free");
        assert_eq!(vis_of(&kv.mask(8, &[3], &[4]), 0), vec![3, 4, 6]);
        kv.seq_cp_prefix(0, 8, 2);
        assert_eq!(vis_of(&kv.mask(8, &[5], &[8]), 0), vec![0, 1]);
        assert_eq!(kv.n_only(0b1111), 1, "A's cell at position 2 alone is A's only");
        kv.seq_rm(8);
        assert_eq!(kv.n_only(0b1111), 3);
    }

    fn vis_of(m: &[half::f16], t: usize) -> Vec<usize> {
        (0..8).filter(|&c| m[t * 8 + c] == half::f16::ZERO).collect()
    }
}
