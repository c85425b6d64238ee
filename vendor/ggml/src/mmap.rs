//! `MappedFile`: a read-only memory map of a whole file, for readers that use the bytes in place (safetensors
//! checkpoints in the converter). Mapping is the one `unsafe` step; it lives here with the rest.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// The system's memory page size: 4 KiB on x86-64; 4, 16 or 64 KiB on ARM (a Raspberry Pi 5 kernel uses 16 KiB).
/// `madvise` and `mlock` work on whole pages, and a start address that is not page aligned fails the whole call.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// The whole pages lying inside `offset..offset + len` (a tensor's bytes), so that releasing them never touches a
/// neighbour's. `None` when no whole page fits or the range overflows.
pub(crate) fn inner_pages(offset: usize, len: usize, page: usize) -> Option<Range<usize>> {
    let end = offset.checked_add(len)?;
    let start = offset.checked_next_multiple_of(page)?;
    let end = end / page * page;
    (end > start).then_some(start..end)
}

/// The pages covering `offset..offset + len`, clipped to `limit` (the mapping's length); the end need not be page
/// aligned (the kernel rounds it up). `None` when the range is empty or overflows.
pub(crate) fn covering_pages(offset: usize, len: usize, limit: usize, page: usize) -> Option<Range<usize>> {
    if len == 0 {
        return None;
    }
    let end = offset.checked_add(len)?.min(limit);
    let start = offset / page * page;
    (end > start).then_some(start..end)
}

/// A file mapped read-only. Pages are read on first touch and can be handed back with `release`.
pub struct MappedFile {
    path: PathBuf,
    /// In the SIGBUS handler's table while mapped (dropped first).
    _guard: Option<crate::map_guard::Registration>,
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
        let _guard = crate::map_guard::register(map.as_ptr(), map.len(), &path);
        Ok(MappedFile { path, _guard, map })
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
            if let Some(r) = covering_pages(offset, len, self.map.len(), page_size()) {
                // SAFETY: MADV_DONTNEED on a shared, read-only file mapping only drops clean page-cache pages from
                // this process; touching them again re-reads the same file bytes, so no borrowed slice can observe
                // a change (unlike private or anonymous mappings, which it would zero).
                let _ =
                    unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, r.start, r.len()) };
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: usize = 4096;
    const K16: usize = 16384;

    #[test]
    fn inner_pages_keep_to_whole_pages_of_the_range() {
        // A tensor at 10 000 of 70 000 bytes: 4 KiB pages 12 288..77 824; 16 KiB pages 16 384..65 536.
        assert_eq!(inner_pages(10_000, 70_000, K4), Some(12_288..77_824));
        assert_eq!(inner_pages(10_000, 70_000, K16), Some(16_384..65_536));
        // 20 000 bytes hold four whole 4 KiB pages but no whole 16 KiB page once misaligned.
        assert_eq!(inner_pages(10_000, 20_000, K4), Some(12_288..28_672));
        assert_eq!(inner_pages(10_000, 20_000, K16), None);
        // Page-aligned ranges are taken whole.
        assert_eq!(inner_pages(K16, 2 * K16, K16), Some(K16..3 * K16));
        assert_eq!(inner_pages(usize::MAX - 10, 100, K16), None);
    }

    #[test]
    fn covering_pages_start_on_a_page_boundary() {
        // With a 16 KiB page a start rounded to 4 KiB (12 288) would make madvise fail with EINVAL.
        assert_eq!(covering_pages(20_000, 10_000, 1 << 20, K16), Some(K16..30_000));
        assert_eq!(covering_pages(20_000, 10_000, 1 << 20, K4), Some(16_384..30_000));
        assert_eq!(covering_pages(20_000, 10_000, 25_000, K16), Some(K16..25_000));
        assert_eq!(covering_pages(20_000, 0, 1 << 20, K16), None);
        assert_eq!(covering_pages(30_000, 10, 25_000, K16), Some(K16..25_000));
        assert_eq!(covering_pages(40_000, 10, 25_000, K16), None);
        assert_eq!(covering_pages(usize::MAX, 10, usize::MAX, K16), None);
    }

    #[test]
    fn page_size_is_a_power_of_two_of_at_least_4_kib() {
        let p = page_size();
        assert!(p >= K4 && p.is_power_of_two(), "{p}");
    }
}
