//! The safetensors files of a checkpoint (one file, or shards listed in model.safetensors.index.json), read row by
//! row as f32.
//!
//! Tensor data is read with positioned reads (`pread`), not through a memory map: a shard that cannot be read
//! mid-way (an I/O error, a file truncated or replaced while converting) is then an error naming the file and
//! the tensor, where a mapped page would kill the process with SIGBUS. The header is parsed from a map (the
//! safetensors crate checks it against the whole file's length), which touches its pages only.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ggml::MappedFile;
use rustix::fs::Advice;
use safetensors::{Dtype, SafeTensors};

/// Element types a checkpoint may store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceType {
    F32,
    F16,
    BF16,
}

impl SourceType {
    pub fn size(self) -> usize {
        match self {
            SourceType::F32 => 4,
            SourceType::F16 | SourceType::BF16 => 2,
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub name: String,
    pub dtype: SourceType,
    /// PyTorch order (outermost first).
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

impl SourceTensor {
    /// Elements (the product is checked when the file is opened).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// One open safetensors file.
struct Shard {
    path: PathBuf,
    file: File,
}

/// All tensors of a checkpoint folder.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, SourceTensor>,
}

thread_local! {
    /// The bytes of the rows being converted, per conversion thread.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Checkpoint {
    /// Opens `dir`'s safetensors: the files named by `model.safetensors.index.json` if present, else every
    /// `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let files = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let map = MappedFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(map.bytes()).map_err(|e| match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                    anyhow!("{}: truncated (shorter than its header says)", path.display())
                }
                e => anyhow!("{}: not a valid safetensors file ({e:?})", path.display()),
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => SourceType::F32,
                    Dtype::F16 => SourceType::F16,
                    Dtype::BF16 => SourceType::BF16,
                    other => bail!(
                        "{}: tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported",
                        path.display()
                    ),
                };
                // read_metadata checked the offsets against the file; checked again here, as everything after
                // relies on them.
                let (start, end) =
                    (data_start.checked_add(info.data_offsets.0), data_start.checked_add(info.data_offsets.1));
                let bytes = info.shape.iter().try_fold(dtype.size(), |a, &d| a.checked_mul(d));
                let (Some(start), Some(end), Some(bytes)) = (start, end, bytes) else {
                    bail!("{}: tensor {name}: its size or data offsets overflow", path.display());
                };
                if end > map.bytes().len() || end.checked_sub(start) != Some(bytes) {
                    bail!("{}: tensor {name}: data range does not match its shape (truncated file?)", path.display());
                }
                let t = SourceTensor { name: name.clone(), dtype, shape: info.shape.clone(), shard: i, start, end };
                if let Some(prev) = tensors.insert(name.clone(), t) {
                    bail!("tensor {name} appears in both {} and {}", files[prev.shard].display(), path.display());
                }
            }
            drop(map);
            let _ = rustix::fs::fadvise(&file, 0, None, Advice::Sequential);
            shards.push(Shard { path: path.clone(), file });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, tensors })
    }

    /// All tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, SourceTensor> {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<&SourceTensor> {
        self.tensors.get(name).ok_or_else(|| anyhow!("{}: the checkpoint has no tensor {name}", self.dir.display()))
    }

    /// The shard file holding `t`.
    pub fn path_of(&self, t: &SourceTensor) -> &Path {
        &self.shards[t.shard].path
    }

    /// Converts elements `first..first+out.len()` (flat, row-major) of `t` to f32 into `out`, refusing NaN and Inf.
    pub fn read_f32(&self, t: &SourceTensor, first: usize, out: &mut [f32]) -> Result<()> {
        let size = t.dtype.size();
        let a = first.checked_mul(size).and_then(|o| t.start.checked_add(o));
        let b = a.and_then(|a| out.len().checked_mul(size).and_then(|n| a.checked_add(n)));
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) if b <= t.end => (a, b),
            _ => bail!("tensor {}: elements {first}.. (+{}) are outside it", t.name, out.len()),
        };
        READ_BUF.with_borrow_mut(|buf| {
            buf.resize(b - a, 0);
            self.read_at(t, a, buf)?;
            convert_values(t.dtype, buf, out);
            Ok::<(), anyhow::Error>(())
        })?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            let flat = first + i;
            bail!(
                "{}: tensor {} has a non-finite value ({}) at flat index {flat}",
                self.path_of(t).display(),
                t.name,
                out[i]
            );
        }
        Ok(())
    }

    /// Bytes `a..a + buf.len()` of `t`'s shard; an error names the file and the tensor.
    fn read_at(&self, t: &SourceTensor, a: usize, buf: &mut [u8]) -> Result<()> {
        let shard = &self.shards[t.shard];
        shard.file.read_exact_at(buf, a as u64).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the file ended early: was it truncated or replaced while converting?".to_string()
            } else {
                e.to_string()
            };
            anyhow!("{}: cannot read tensor {} (bytes {a}..{}): {why}", shard.path.display(), t.name, a + buf.len())
        })
    }

    /// Tells the kernel the page cache of `t`'s elements `first..first+n` is no longer needed once converted, so
    /// converting a checkpoint larger than RAM does not push everything else out of memory.
    pub fn release(&self, t: &SourceTensor, first: usize, n: usize) {
        let size = t.dtype.size();
        let a = first.saturating_mul(size).saturating_add(t.start).min(t.end);
        let b = first.saturating_add(n).saturating_mul(size).saturating_add(t.start).min(t.end);
        if let Some(len) = std::num::NonZeroU64::new((b - a) as u64) {
            let _ = rustix::fs::fadvise(&self.shards[t.shard].file, a as u64, Some(len), Advice::DontNeed);
        }
    }
}

/// Little-endian F32/F16/BF16 values to f32.
fn convert_values(dtype: SourceType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        SourceType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        SourceType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        SourceType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// The safetensors files of `dir`, in a stable order.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json = crate::config::JsonFile::read(dir, "model.safetensors.index.json")?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: missing key weight_map", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        // Shards are files of the checkpoint folder: a name that is a path (absolute, `..`, a subfolder) could make
        // the converter read anything on the machine.
        if let Some(f) =
            files.iter().find(|f| !matches!(Path::new(f).components().collect::<Vec<_>>()[..], [Component::Normal(_)]))
        {
            bail!("{}: weight_map names {f:?}, which is not a file name in the checkpoint folder", index.display());
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                bail!("{} names {}, which does not exist", index.display(), p.display());
            }
        }
        return Ok(paths);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors files (is this a Hugging Face model folder?)", dir.display());
    }
    Ok(files)
}
