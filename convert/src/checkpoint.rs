//! The safetensors files of a checkpoint (one file, or shards listed in model.safetensors.index.json), memory-mapped
//! and read row by row as f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ggml::MappedFile;
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
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// All tensors of a checkpoint folder.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<MappedFile>,
    tensors: BTreeMap<String, SourceTensor>,
}

impl Checkpoint {
    /// Opens `dir`'s safetensors: the files named by `model.safetensors.index.json` if present, else every
    /// `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let files = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
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
                let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
                if end > map.bytes().len() || end - start != info.shape.iter().product::<usize>() * dtype.size() {
                    bail!("{}: tensor {name}: data range does not match its shape (truncated file?)", path.display());
                }
                let t = SourceTensor { name: name.clone(), dtype, shape: info.shape.clone(), shard: i, start, end };
                if let Some(prev) = tensors.insert(name.clone(), t) {
                    bail!("tensor {name} appears in both {} and {}", files[prev.shard].display(), path.display());
                }
            }
            map.advise_sequential();
            shards.push(map);
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
        self.shards[t.shard].path()
    }

    /// Converts elements `first..first+out.len()` (flat, row-major) of `t` to f32 into `out`, refusing NaN and Inf.
    pub fn read_f32(&self, t: &SourceTensor, first: usize, out: &mut [f32]) -> Result<()> {
        let size = t.dtype.size();
        let a = t.start + first * size;
        let b = a + out.len() * size;
        assert!(b <= t.end, "read past tensor {}", t.name);
        let bytes = &self.shards[t.shard].bytes()[a..b];
        match t.dtype {
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

    /// Hands the pages of `t`'s elements `first..first+n` back to the kernel once converted, so resident memory
    /// stays bounded by the chunk being worked on even for a 600 MB embedding (re-reading them stays correct).
    pub fn release(&self, t: &SourceTensor, first: usize, n: usize) {
        let size = t.dtype.size();
        let a = (t.start + first * size).min(t.end);
        let b = (t.start + (first + n) * size).min(t.end);
        self.shards[t.shard].release(a, b - a);
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
