//! Stop strings (OpenAI's `stop`): generated text is released only once it cannot be the start of a stop
//! string, so a stop string is never sent to the client, not even its first characters; the answer ends where
//! the first stop string begins.

/// Text held back or released as the answer streams.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released: a suffix that may still grow into a stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// `stops`: non-empty strings (empty ones are ignored).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// True once a stop string was seen: nothing more is released.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece of text; returns what can be released now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        // The earliest stop string wins (OpenAI cuts at the first match).
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep = self.stops.iter().map(|s| longest_suffix_prefix(&self.held, s)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// The generation ended: releases what was held (it did not become a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, cut at a character boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// `text` cut before the first occurrence of any stop string; the bool tells whether one occurred.
pub fn truncate_at_stop<'a>(text: &'a str, stops: &[String]) -> (&'a str, bool) {
    match stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (&text[..at], true),
        None => (text, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool, Vec<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut released = Vec::new();
        for p in pieces {
            released.push(m.push(p));
            if m.stopped() {
                break;
            }
        }
        if !m.stopped() {
            released.push(m.finish());
        }
        (released.concat(), m.stopped(), released)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_released() {
        let (text, stopped, parts) = run(&["###"], &["答え", "は#", "#", "#以下"]);
        assert_eq!((text.as_str(), stopped), ("答えは", true));
        assert_eq!(parts, vec!["答え", "は", "", ""], "the '#'s are held back, then dropped");
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching_or_at_the_end() {
        let (text, stopped, parts) = run(&["\n\n"], &["a\n", "b", "\n"]);
        assert_eq!((text.as_str(), stopped), ("a\nb\n", false));
        assert_eq!(parts, vec!["a", "\nb", "", "\n"]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_suffixes_are_safe() {
        let (text, stopped, _) = run(&["です。", "す"], &["これはです。"]);
        assert_eq!((text.as_str(), stopped), ("これは", true), "the stop string that starts first wins");
        let (text, stopped, _) = run(&["応答:"], &["あ", "応", "答", "え"]);
        assert_eq!((text.as_str(), stopped), ("あ応答え", false));
        let (text, _, _) = run(&[], &["x", "y"]);
        assert_eq!(text, "xy");
        assert_eq!(truncate_at_stop("abcSTOPdefEND", &["END".into(), "STOP".into()]), ("abc", true));
        assert_eq!(truncate_at_stop("abc", &["".into()]), ("abc", false));
    }
}
