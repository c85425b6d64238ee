//! Files that change under a memory map. Weights are used in place from a mapped GGUF; if the file is truncated or
//! rewritten while mapped (an in-place `cp` or download over a loaded model), reading a page that no longer exists
//! raises SIGBUS, which kills the process with a bare "Bus error" (llama.cpp behaves the same). Two defences, as
//! far as the platform allows:
//!
//! - [`FileWatch`]: the size and modification time of the mapped inode, checked before work starts (a server
//!   checks it before each request and each step): a changed file is an error, not a crash.
//! - A SIGBUS handler for the race that remains (the file changes during a step): if the faulting address lies in
//!   a registered map, it names the file and says what happened before the process dies as it would have.
//!
//! A file replaced by renaming a new one over it is safe: the map keeps the old inode, which stays intact.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;
use std::time::SystemTime;

/// The mapped file's state when it was loaded, read again from the same open file (the same inode, whatever the
/// path now names).
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    file: File,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileWatch {
    /// Remembers `file`'s (opened from `path`) size and modification time.
    pub fn new(path: &Path, file: &File) -> std::io::Result<FileWatch> {
        let m = file.metadata()?;
        Ok(FileWatch { path: path.to_path_buf(), file: file.try_clone()?, len: m.len(), modified: m.modified().ok() })
    }

    /// An error naming the file if it was truncated, extended or rewritten in place since it was loaded.
    pub fn check(&self) -> Result<(), String> {
        let m =
            self.file.metadata().map_err(|e| format!("{}: cannot check the loaded file: {e}", self.path.display()))?;
        if m.len() == self.len && m.modified().ok() == self.modified {
            return Ok(());
        }
        Err(format!(
            "{} was modified on disk after it was loaded (now {} bytes, loaded {}): the weights in use may no longer \
             exist; restart to load the new file (replace a loaded model by renaming a new file over it, never by \
             writing into it)",
            self.path.display(),
            m.len(),
            self.len
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first of `watches` whose file changed, as [`check`](Self::check) says it.
    pub fn first_change(watches: &[FileWatch]) -> Option<String> {
        watches.iter().find_map(|w| w.check().err())
    }

    /// Another watch on the same file (a handle of its own).
    pub fn try_clone(&self) -> std::io::Result<FileWatch> {
        Ok(FileWatch { path: self.path.clone(), file: self.file.try_clone()?, len: self.len, modified: self.modified })
    }
}

/// One registered map: its address range and the path, for the message.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    path: AtomicPtr<u8>,
    path_len: AtomicUsize,
}

const N_SLOTS: usize = 64;
static SLOTS: [Slot; N_SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        path: AtomicPtr::new(std::ptr::null_mut()),
        path_len: AtomicUsize::new(0),
    }
}; N_SLOTS];
static INSTALL: Once = Once::new();

/// The action SIGBUS had before ours, put back by the handler.
struct PreviousAction(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::sigaction>>);
// SAFETY: written once inside INSTALL.call_once before the handler is installed, only read afterwards.
unsafe impl Sync for PreviousAction {}
static PREVIOUS: PreviousAction = PreviousAction(std::cell::UnsafeCell::new(std::mem::MaybeUninit::zeroed()));

/// A registered map; unregistered when dropped (before the map itself goes).
pub(crate) struct Registration(usize);

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &SLOTS[self.0];
        s.len.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
    }
}

/// Registers `len` mapped bytes at `ptr` from `path` (installing the handler on first use). `None` when every slot
/// is taken: that map then dies with the bare signal, as before.
pub(crate) fn register(ptr: *const u8, len: usize, path: &Path) -> Option<Registration> {
    INSTALL.call_once(install);
    if len == 0 {
        return None;
    }
    // The handler writes these bytes; they are leaked (a few per process, one per model file loaded).
    let bytes: &'static [u8] = Box::leak(path.as_os_str().as_encoded_bytes().to_vec().into_boxed_slice());
    for (i, s) in SLOTS.iter().enumerate() {
        if s.start.compare_exchange(0, ptr as usize, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            s.path.store(bytes.as_ptr() as *mut u8, Ordering::SeqCst);
            s.path_len.store(bytes.len(), Ordering::SeqCst);
            s.len.store(len, Ordering::SeqCst);
            return Some(Registration(i));
        }
    }
    None
}

fn install() {
    // SAFETY: sigaction with a zeroed struct plus handler and flags is the documented way to install an
    // SA_SIGINFO handler; PREVIOUS receives the old action before ours is live (the Once orders it).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGBUS, &act, (*PREVIOUS.0.get()).as_mut_ptr());
    }
}

/// Async-signal-safe: atomics, write(2) and sigaction(2) only.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &SLOTS {
        let (start, len) = (s.start.load(Ordering::SeqCst), s.len.load(Ordering::SeqCst));
        if start != 0 && addr >= start && addr - start < len {
            let (p, n) = (s.path.load(Ordering::SeqCst), s.path_len.load(Ordering::SeqCst));
            let parts: [&[u8]; 3] = [
                b"\nfatal: ",
                // SAFETY: p/n describe a leaked, never freed byte slice (register).
                unsafe { std::slice::from_raw_parts(p, n) },
                b" was truncated or rewritten on disk while in use (SIGBUS reading its memory map). Replace a \
                  loaded model by renaming a new file over it, never by writing into it; then restart.\n",
            ];
            for part in parts {
                // SAFETY: write(2) of a valid buffer is async-signal-safe; a short or failed write only shortens
                // the message.
                unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
            }
            break;
        }
    }
    // Put the previous action back and return: the access faults again and the previous handler (by default:
    // termination by SIGBUS, with its exit status and core dump) takes it.
    // SAFETY: PREVIOUS was filled before this handler was installed.
    unsafe { libc::sigaction(libc::SIGBUS, (*PREVIOUS.0.get()).as_ptr(), std::ptr::null_mut()) };
}
