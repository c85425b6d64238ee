//! A streaming safetensors writer for bf16 tensors, split into shards with a `model.safetensors.index.json`
//! like the hub's. The format: 8-byte little-endian header length, a JSON header (dtype, shape, data offsets per
//! tensor) padded with spaces to 8 bytes, then the data.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// Values generated per step.
const CHUNK: usize = 1 << 22;

pub struct ShardedWriter {
    dir: PathBuf,
    max_shard_bytes: usize,
    /// Per shard: (name, shape) in order.
    shards: Vec<Vec<(String, Vec<usize>)>>,
    current_bytes: usize,
}

impl ShardedWriter {
    pub fn new(dir: &Path, max_shard_bytes: usize) -> ShardedWriter {
        ShardedWriter { dir: dir.to_path_buf(), max_shard_bytes, shards: vec![Vec::new()], current_bytes: 0 }
    }

    /// Adds a bf16 tensor to the layout (a new shard starts when the current one is full).
    pub fn plan(&mut self, name: &str, shape: &[usize]) {
        let bytes = shape.iter().product::<usize>() * 2;
        if self.current_bytes > 0 && self.current_bytes + bytes > self.max_shard_bytes {
            self.shards.push(Vec::new());
            self.current_bytes = 0;
        }
        self.shards.last_mut().unwrap().push((name.to_string(), shape.to_vec()));
        self.current_bytes += bytes;
    }

    fn shard_name(&self, i: usize) -> String {
        if self.shards.len() == 1 {
            "model.safetensors".into()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, self.shards.len())
        }
    }

    /// Writes every shard, asking `fill(name, start, values)` for the bf16 bits of elements `start..` of each
    /// tensor (row-major), chunk by chunk.
    pub fn write_all(&self, mut fill: impl FnMut(&str, usize, &mut [u16])) -> Result<u64> {
        let mut total = 0u64;
        let mut weight_map = Map::new();
        for (i, tensors) in self.shards.iter().enumerate() {
            let name = self.shard_name(i);
            let mut header = Map::new();
            header.insert("__metadata__".into(), json!({"format": "pt"}));
            let mut offset = 0usize;
            for (t, shape) in tensors {
                let n = shape.iter().product::<usize>() * 2;
                header
                    .insert(t.clone(), json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}));
                offset += n;
                weight_map.insert(t.clone(), Value::String(name.clone()));
            }
            let mut h = serde_json::to_vec(&Value::Object(header))?;
            h.resize(h.len().div_ceil(8) * 8, b' ');
            let path = self.dir.join(&name);
            let mut out = BufWriter::with_capacity(
                8 << 20,
                std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
            );
            out.write_all(&(h.len() as u64).to_le_bytes())?;
            out.write_all(&h)?;
            let mut buf = vec![0u16; CHUNK];
            let mut bytes = vec![0u8; CHUNK * 2];
            for (t, shape) in tensors {
                let len = shape.iter().product::<usize>();
                let mut start = 0;
                while start < len {
                    let n = (len - start).min(CHUNK);
                    fill(t, start, &mut buf[..n]);
                    for (b, v) in bytes.chunks_exact_mut(2).zip(&buf[..n]) {
                        b.copy_from_slice(&v.to_le_bytes());
                    }
                    out.write_all(&bytes[..n * 2])?;
                    start += n;
                }
            }
            out.flush().with_context(|| format!("cannot write {}", path.display()))?;
            total += 8 + h.len() as u64 + offset as u64;
        }
        if self.shards.len() > 1 {
            let index = json!({"metadata": {"total_size": total}, "weight_map": Value::Object(weight_map)});
            std::fs::write(self.dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
        }
        Ok(total)
    }
}
