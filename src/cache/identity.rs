//! The identity of a model file, for cache keys: cached image embeddings and KV cells are valid only for the file
//! that computed them.
//!
//! Hashing a whole multi-GB GGUF would cost seconds at every start, longer than some of what the caches save, so
//! the identity is blake3 over the file's size, its whole header (every metadata key, the tokenizer, the tensor
//! table with types, shapes and offsets) and 64 KiB samples at 64 evenly spaced offsets of the tensor data. Two
//! conversions of different checkpoints differ in every tensor, so they differ in the samples; a file edited in
//! place byte by byte between two samples would not be noticed (llama.cpp's session files check far less: the
//! vocabulary size and the context length).

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use ggml::gguf::GgufFile;

const SAMPLES: u64 = 64;
const SAMPLE_BYTES: u64 = 64 << 10;
/// Headers are read whole; a tokenizer of a few hundred thousand tokens is a few MB. Anything past this is not a
/// header a converter writes.
const MAX_HEADER: u64 = 256 << 20;

/// A 32-byte identity of an opened GGUF file (see the module comment).
pub fn file_identity(file: &GgufFile) -> Result<[u8; 32]> {
    let path = file.path();
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    let data_start = file.data_offset() as u64;
    if data_start > len || data_start > MAX_HEADER {
        bail!("{}: tensor data starts at {data_start}, past the file's {len} bytes or a header's size", path.display());
    }
    let mut h = blake3::Hasher::new_derive_key("asagi-gguf gguf file identity v1");
    h.update(&len.to_le_bytes());
    let mut buf = vec![0u8; data_start as usize];
    f.read_exact_at(&mut buf, 0).with_context(|| format!("cannot read {}", path.display()))?;
    h.update(&buf);
    let data_len = len - data_start;
    buf.resize(SAMPLE_BYTES.min(data_len) as usize, 0);
    for i in 0..SAMPLES {
        // Sample i starts i/64 of the way into the data (the last sample ends at the file's end).
        let start = data_start + (data_len - buf.len() as u64) * i / (SAMPLES - 1);
        f.read_exact_at(&mut buf, start).with_context(|| format!("cannot read {}", path.display()))?;
        h.update(&buf);
    }
    Ok(*h.finalize().as_bytes())
}

/// Lower-case hex of a hash (file names, image ids).
pub fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The inverse of [`hex`]: exactly 64 hex digits.
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_other_text() {
        let h = *blake3::hash(b"x").as_bytes();
        assert_eq!(from_hex(&hex(&h)), Some(h));
        assert_eq!(from_hex(&hex(&h).to_uppercase()), Some(h));
        assert_eq!(from_hex(&hex(&h)[1..]), None);
        assert_eq!(from_hex(&format!("{}g", &hex(&h)[1..])), None);
        assert_eq!(from_hex("é".repeat(32).as_str()), None);
    }
}
