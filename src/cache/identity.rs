//! The identity of a model file, for cache keys: cached image embeddings and KV cells are valid only for the file
//! that computed them.
//!
//! Hashing a whole multi-GB GGUF would cost seconds at every start, longer than some of what the caches save, so
//! the identity is blake3 over the file's size, its whole header (every metadata key, the tokenizer, the tensor
//! table with types, shapes and offsets) and, of every tensor, its first, middle and last 4 KiB (all of it when
//! smaller). A different checkpoint, a fine-tune that retrained only the projector or one layer, a re-quantization:
//! each changes some tensor's bytes from its first block on, so the samples see it (a retrained tensor differs
//! everywhere). Not seen: bytes edited in place between samples. (llama.cpp's session files check far less: the
//! vocabulary size and the context length.)

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use ggml::gguf::GgufFile;

const SAMPLE: u64 = 4 << 10;
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
    let mut h = blake3::Hasher::new_derive_key("asagi-gguf gguf file identity v2");
    h.update(&len.to_le_bytes());
    let mut buf = vec![0u8; data_start as usize];
    f.read_exact_at(&mut buf, 0).with_context(|| format!("cannot read {}", path.display()))?;
    h.update(&buf);
    buf.resize(SAMPLE as usize, 0);
    for t in file.tensor_infos() {
        let (start, size) = (t.offset, t.size as u64);
        let end = start.checked_add(size).filter(|&e| e <= len);
        let Some(end) = end else { bail!("{}: tensor {} lies past the file's end", path.display(), t.name) };
        let n = SAMPLE.min(size);
        let mid = start + (size - n) / 2;
        for at in [start, mid, end - n] {
            f.read_exact_at(&mut buf[..n as usize], at).with_context(|| format!("cannot read {}", path.display()))?;
            h.update(&buf[..n as usize]);
        }
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
