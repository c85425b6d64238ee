//! `MappedFile`: a read-only memory map of a whole file, for readers that use the bytes in place (safetensors
//! checkpoints in the converter). Mapping is the one `unsafe` step; it lives here with the rest.

use std::path::{Path, PathBuf};

/// A file mapped read-only. Pages are read on first touch and can be handed back with `release`.
pub struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path`. An empty file maps to an empty slice.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<MappedFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path)?;
        // SAFETY: a read-only shared mapping of a regular file. Like every reader of memory-mapped files we rely on
        // nobody truncating or rewriting the file while it is mapped (a checkpoint being converted is not written).
        let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
        Ok(MappedFile { path, map })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the kernel the range will be read once, front to back (read-ahead, early eviction).
    pub fn advise_sequential(&self) {
        let _ = self.map.advise(memmap2::Advice::Sequential);
    }

    /// Hands the pages of `offset..offset+len` back to the kernel (they are re-read if touched again), so that a
    /// streaming reader's resident memory stays bounded by what it is working on. Best effort: errors are ignored.
    pub fn release(&self, offset: usize, len: usize) {
        #[cfg(target_os = "linux")]
        {
            let page = 4096;
            let start = offset / page * page;
            let end = (offset + len).min(self.map.len());
            if end > start {
                // SAFETY: MADV_DONTNEED on a shared, read-only file mapping only drops clean page-cache pages from
                // this process; touching them again re-reads the same file bytes, so no borrowed slice can observe
                // a change (unlike private or anonymous mappings, which it would zero).
                let _ =
                    unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
    }
}
