//! ggml's log output. Its default logger prints everything, debug included (one line per repacked tensor, ...);
//! `log_to_stderr` keeps warnings and errors, and the rest only when verbose.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::sys;

static VERBOSE: AtomicBool = AtomicBool::new(false);
/// Level of the last message that was not a continuation (`GGML_LOG_LEVEL_CONT` continues it).
static LAST: AtomicU32 = AtomicU32::new(sys::GGML_LOG_LEVEL_INFO);

unsafe extern "C" fn to_stderr(
    level: sys::ggml_log_level,
    text: *const std::os::raw::c_char,
    _: *mut std::ffi::c_void,
) {
    let level = if level == sys::GGML_LOG_LEVEL_CONT { LAST.load(Ordering::Relaxed) } else { level };
    LAST.store(level, Ordering::Relaxed);
    if text.is_null() || (level < sys::GGML_LOG_LEVEL_WARN && !VERBOSE.load(Ordering::Relaxed)) {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated message valid for the call.
    eprint!("{}", unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy());
}

/// Routes ggml's log to stderr: warnings and errors, plus info and debug messages when `verbose`.
pub fn log_to_stderr(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
    // SAFETY: `to_stderr` is a valid callback for the whole program and ignores its user data.
    unsafe { sys::ggml_log_set(Some(to_stderr), std::ptr::null_mut()) }
}
