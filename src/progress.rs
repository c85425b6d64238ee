//! Progress on stderr for the long steps of answering (a prompt with images takes tens of seconds on small
//! machines): a bar over the prompt's positions, a spinner while images are encoded. Shown only on a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` prompt positions, if stderr is a terminal and the prompt is long enough to wait for, as
/// the function a `Session` calls with each batch's row count (`Session::set_progress`). The session also reports
/// the answer's decode steps: the bar clears itself at the prompt's end and ignores what follows.
pub fn prompt_progress(total: usize) -> Option<Box<dyn FnMut(usize)>> {
    if total < 128 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("prompt {bar:30} {pos}/{len} positions, ETA {eta}").expect("valid template"),
    );
    Some(Box::new(move |n| {
        if !bar.is_finished() {
            bar.inc(n as u64);
            if bar.position() >= total as u64 {
                bar.finish_and_clear();
            }
        }
    }))
}

/// A spinner with `msg`, if stderr is a terminal.
pub fn spinner(msg: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let s = ProgressBar::new_spinner().with_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    Some(s)
}
