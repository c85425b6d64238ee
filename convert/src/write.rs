//! Executes a `FilePlan`: streams tensors from the checkpoint, rearranges and quantizes them in parallel, chunk by
//! chunk, and writes `<file>.part`, renamed to the final name only when complete (`PartFile::commit`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Context, Result};
use ggml::gguf::GgufWriter;
use indicatif::ProgressBar;

use crate::checkpoint::Checkpoint;
use crate::plan::{FilePlan, TensorPlan};

/// Values converted per thread per step (16 MiB of f32): bounds memory whatever the tensor size.
const CHUNK_VALUES: usize = 4 << 20;

/// A `.part` file: removed when dropped, unless `commit` gave it its final name.
pub struct PartFile {
    path: PathBuf,
    done: bool,
}

impl PartFile {
    /// Renames the complete, synced file to `to` (see `sync_folder`).
    pub fn commit(mut self, to: &Path) -> Result<()> {
        std::fs::rename(&self.path, to)
            .with_context(|| format!("cannot rename {} to {}", self.path.display(), to.display()))?;
        self.done = true;
        Ok(())
    }
}

/// Syncs the folder of `path`, so that renames in it reach the disk too (best effort).
pub fn sync_folder(path: &Path) {
    if let Some(dir) = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `plan` to its `.part` file, synced to disk; returns it (for `commit`) and its size.
pub fn write_file(
    ckpt: &Checkpoint,
    plan: &FilePlan,
    threads: usize,
    bar: &ProgressBar,
    cancel: &AtomicBool,
) -> Result<(PartFile, u64)> {
    let mut w = GgufWriter::new(plan.tensors.len())?;
    for (k, v) in &plan.keys {
        w.set(k, v.clone()).with_context(|| format!("key {k}"))?;
    }
    for t in &plan.tensors {
        w.add_tensor(&t.name, t.ty, &t.ne).with_context(|| format!("tensor {} ({})", t.name, t.source))?;
    }
    let part = PartFile { path: part_path(&plan.path), done: false };
    let file = File::create(&part.path).with_context(|| format!("cannot create {}", part.path.display()))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    let mut failure: Option<anyhow::Error> = None;
    let result = w.write(&mut out, |i, _, sink| {
        let t = &plan.tensors[i];
        bar.set_message(t.name.clone());
        write_tensor(ckpt, t, threads, sink, bar, cancel).map_err(|e| {
            failure = Some(e);
            std::io::Error::other("tensor conversion failed")
        })
    });
    let size = match (result, failure) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) => return Err(anyhow!(e).context(format!("cannot write {}", part.path.display()))),
        (Ok(n), None) => n,
    };
    let file = out.into_inner().map_err(|e| anyhow!("cannot write {}: {}", part.path.display(), e.error()))?;
    file.sync_all().with_context(|| format!("cannot flush {}", part.path.display()))?;
    drop(file);
    Ok((part, size))
}

/// `x.gguf` -> `x.gguf.part`.
pub fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// Streams one tensor: rows in chunks, each chunk split over `threads`, written in order.
fn write_tensor(
    ckpt: &Checkpoint,
    t: &TensorPlan,
    threads: usize,
    sink: &mut dyn Write,
    bar: &ProgressBar,
    cancel: &AtomicBool,
) -> Result<()> {
    let src = ckpt.get(&t.source)?;
    let cols = t.ne[0];
    let rows = t.n_rows();
    let rows_per_thread = (CHUNK_VALUES / cols).max(1);
    let threads = threads.max(1);
    let mut r = 0;
    while r < rows {
        if cancel.load(Ordering::Relaxed) {
            return Err(anyhow!("interrupted"));
        }
        let ranges: Vec<(usize, usize)> = (0..threads)
            .map(|k| (r + k * rows_per_thread, (r + (k + 1) * rows_per_thread).min(rows)))
            .filter(|(a, b)| a < b)
            .collect();
        let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|scope| {
            let handles: Vec<_> =
                ranges.iter().map(|&(a, b)| scope.spawn(move || convert_rows(ckpt, t, src, a, b))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a conversion thread panicked"))))
                .collect()
        });
        for p in parts {
            sink.write_all(&p?)?;
        }
        let done = ranges.last().map_or(r, |x| x.1);
        let (a, b) = (r.min(t.src_rows), done.min(t.src_rows));
        bar.inc(((b - a) * t.src_cols * src.dtype.size()) as u64);
        ckpt.release(src, a * t.src_cols, (b - a) * t.src_cols);
        r = done;
    }
    Ok(())
}

/// Output rows `a..b` of `t`, in its output type.
fn convert_rows(
    ckpt: &Checkpoint,
    t: &TensorPlan,
    src: &crate::checkpoint::SourceTensor,
    a: usize,
    b: usize,
) -> Result<Vec<u8>> {
    let cols = t.ne[0];
    let mut buf = vec![0f32; (b - a) * cols];
    for (row, out) in (a..b).zip(buf.chunks_exact_mut(cols)) {
        if row < t.src_rows {
            let s = t.rows.source_row(row);
            ckpt.read_f32(src, s * t.src_cols, &mut out[..t.src_cols])?;
        }
    }
    ggml::quantize(t.ty, &buf, cols, None).with_context(|| format!("tensor {}", t.name))
}
