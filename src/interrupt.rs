//! Ctrl-C. One handler for the whole program (the `ctrlc` crate allows one): the first press sets a flag that
//! long work polls (a generation stops after its current step, a conversion between chunks and removes its
//! partial files); a second press while the flag is still set exits at once with status 130.

use std::sync::atomic::{AtomicBool, Ordering};

static FLAG: AtomicBool = AtomicBool::new(false);

/// The program's Ctrl-C flag, cleared; the handler is installed on first use. Call it when a new piece of
/// interruptible work starts.
pub fn flag() -> &'static AtomicBool {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            if FLAG.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
        if let Err(e) = installed {
            eprintln!("warning: Ctrl-C will end the program at once ({e})");
        }
    });
    FLAG.store(false, Ordering::SeqCst);
    &FLAG
}
