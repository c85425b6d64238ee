//! Memory on small boards: what a loaded model will hold resident, told before anything is committed, and a
//! refusal with a way out when it cannot fit (a 4 GB Raspberry Pi swaps itself to a halt rather than failing).
//!
//! Every part is counted as it will be once the model has answered a long question: the weights (read in place from
//! the mapped file, or copied when repacked for the CPU; the repacked tensors' file pages are handed back), the KV
//! cache at the full context (cells are touched as the context fills), the compute buffers ggml reserves for the
//! largest language-model batch and for one image, and what the program already holds. The available memory is
//! the kernel's MemAvailable, or less when a cgroup (container, systemd unit) caps the process.

use std::fmt::Write as _;

use anyhow::{bail, Result};

/// Whether `run`, `chat` and `serve` refuse to load a model that does not fit.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemCheck {
    /// Refuse, with a suggestion, when the estimate exceeds the available memory.
    #[default]
    On,
    /// Print the estimate and load anyway.
    Off,
}

/// What a model will hold, part by part.
#[derive(Clone, Debug, Default)]
pub struct Estimate {
    /// Weights read in place from memory-mapped files (page cache; counted resident: every token reads them).
    pub weights_mapped: u64,
    /// Weights copied into anonymous memory, repacked for the CPU's kernels.
    pub weights_repacked: u64,
    /// Weights uploaded to a GPU (not host memory; shown, not counted).
    pub weights_gpu: u64,
    /// Weights and KV cache on RPC servers (`--rpc`; their memory, shown, not counted).
    pub weights_remote: u64,
    pub kv_remote: u64,
    /// The KV cache at the full context.
    pub kv: u64,
    /// Its shape, for the message: cells and type.
    pub kv_cells: usize,
    pub kv_type: String,
    /// Language-model compute buffer (largest batch at the full context).
    pub compute_llm: u64,
    /// Vision compute buffer (one image).
    pub compute_vision: u64,
    /// Host memory a step allocates besides ggml's buffers (attention mask, logits).
    pub step: u64,
    /// Resident already when the estimate was made (the program, the tokenizer).
    pub program: u64,
}

impl Estimate {
    /// Host memory in all.
    pub fn total(&self) -> u64 {
        self.weights_mapped
            + self.weights_repacked
            + self.kv
            + self.compute_llm
            + self.compute_vision
            + self.step
            + self.program
    }

    /// One line for the load log.
    pub fn summary(&self) -> String {
        let mut s = format!("memory: {} weights mapped", gb(self.weights_mapped));
        if self.weights_repacked > 0 {
            let _ = write!(s, " + {} repacked", gb(self.weights_repacked));
        }
        let _ = write!(s, ", {} KV cache ({} cells {})", gb(self.kv), self.kv_cells, self.kv_type);
        let _ = write!(s, ", {} compute", gb(self.compute_llm + self.compute_vision + self.step));
        if self.compute_vision > 0 {
            let _ = write!(s, " (vision {})", gb(self.compute_vision));
        }
        let _ = write!(s, ", {} program = {} resident", gb(self.program), gb(self.total()));
        if self.weights_gpu > 0 {
            let _ = write!(s, "; {} of weights on the GPU", gb(self.weights_gpu));
        }
        if self.weights_remote > 0 {
            let _ = write!(
                s,
                "; {} of weights and {} of KV cache on RPC servers",
                gb(self.weights_remote),
                gb(self.kv_remote)
            );
        }
        s
    }
}

/// Memory the process may still use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// Where the figure comes from, for the message.
    pub source: String,
}

/// MemAvailable, lowered to the room left under the process's cgroup limit when there is one. `None` where the
/// system does not say (not Linux, /proc not mounted).
pub fn available() -> Option<Available> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut best = Available { bytes: mem_available(&meminfo)?, source: "MemAvailable".into() };
    if let Some((room, what)) = cgroup_room() {
        if room < best.bytes {
            best = Available { bytes: room, source: what };
        }
    }
    Some(best)
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kb: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then(|| kb.saturating_mul(1024))
}

/// Room under the cgroup memory limit: limit - usage, for cgroup v2 (`memory.max`, `memory.current` of the
/// process's own group) or v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`).
fn cgroup_room() -> Option<(u64, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    if let Some(path) = cgroup_v2_path(&own) {
        let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let limit = parse_limit(&read("memory.max")?)?;
        let usage: u64 = read("memory.current")?.trim().parse().ok()?;
        return Some((limit.saturating_sub(usage), format!("cgroup {dir}/memory.max")));
    }
    let dir = "/sys/fs/cgroup/memory";
    let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
    let limit = parse_limit(&read("memory.limit_in_bytes")?)?;
    let usage: u64 = read("memory.usage_in_bytes")?.trim().parse().ok()?;
    Some((limit.saturating_sub(usage), format!("cgroup {dir}/memory.limit_in_bytes")))
}

/// The group path of the unified (v2) hierarchy in /proc/self/cgroup (`0::/path`).
fn cgroup_v2_path(own: &str) -> Option<&str> {
    own.lines().find_map(|l| l.strip_prefix("0::")).filter(|p| p.starts_with('/'))
}

/// A cgroup limit: a byte count, `None` for `max` (v2) or a v1 "no limit" value (close to i64::MAX).
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

/// Resident memory of this process now (VmRSS), in bytes.
pub fn resident() -> Option<u64> {
    status_kb("VmRSS:")
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_resident() -> Option<u64> {
    status_kb("VmHWM:")
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses (with `MemCheck::On`) an estimate above the available memory, saying what would bring it down.
pub fn check(e: &Estimate, avail: Option<&Available>, mode: MemCheck) -> Result<()> {
    let Some(avail) = avail else { return Ok(()) };
    if mode == MemCheck::Off || e.total() <= avail.bytes {
        return Ok(());
    }
    let mut ways = Vec::new();
    if e.kv_cells > 512 {
        // The KV cache and the attention part of the compute buffer scale with the context.
        let half = e.kv / 2;
        ways.push(format!("a smaller context (-c {} saves about {})", e.kv_cells / 2, gb(half)));
    }
    if e.kv_type != "q8_0" {
        let q8 = e.kv * 34 / if e.kv_type == "f32" { 128 } else { 64 };
        ways.push(format!("--cache-type q8_0 (saves about {})", gb(e.kv - q8)));
    }
    if e.weights_repacked > 0 {
        ways.push(format!(
            "--no-repack (keeps the {} of repacked weights as file pages the kernel may drop under pressure; slower)",
            gb(e.weights_repacked)
        ));
    }
    ways.push("a smaller quantization (Q4_0) or the 2B model".into());
    bail!(
        "the model needs about {} of memory but {} is available ({}): {}. Try {}; or --mem-check off to load it anyway",
        gb(e.total()),
        gb(avail.bytes),
        avail.source,
        e.summary().trim_start_matches("memory: "),
        ways.join(", ")
    )
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi4_2b() -> Estimate {
        // Asagi-2B Q4_0 + Q8_0 mmproj at 4096 cells of f16 cache: the shape of the README's figure.
        Estimate {
            weights_mapped: 1_900_000_000,
            weights_repacked: 0,
            weights_gpu: 0,
            weights_remote: 0,
            kv_remote: 0,
            kv: 805_306_368,
            kv_cells: 4096,
            kv_type: "f16".into(),
            compute_llm: 300_000_000,
            compute_vision: 90_000_000,
            step: 10_000_000,
            program: 30_000_000,
        }
    }

    #[test]
    fn meminfo_and_cgroup_texts_parse() {
        let meminfo = "MemTotal:        3884188 kB\nMemFree:          200000 kB\nMemAvailable:    3100000 kB\n";
        assert_eq!(mem_available(meminfo), Some(3_100_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(cgroup_v2_path("0::/user.slice/session-1.scope\n"), Some("/user.slice/session-1.scope"));
        assert_eq!(cgroup_v2_path("12:memory:/docker/abc\n"), None);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("2147483648\n"), Some(2 << 30));
    }

    #[test]
    fn a_model_that_fits_passes_and_one_that_does_not_is_refused_with_ways_out() {
        let e = pi4_2b();
        assert_eq!(e.total(), 3_135_306_368);
        let roomy = Available { bytes: 3_500_000_000, source: "MemAvailable".into() };
        check(&e, Some(&roomy), MemCheck::On).unwrap();
        let tight = Available { bytes: 2_500_000_000, source: "cgroup /sys/fs/cgroup/x/memory.max".into() };
        let msg = check(&e, Some(&tight), MemCheck::On).unwrap_err().to_string();
        for part in
            ["3.14 GB", "2.50 GB", "cgroup", "-c 2048 saves about 0.40 GB", "--cache-type q8_0", "--mem-check off"]
        {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
        assert!(!msg.contains("--no-repack"), "nothing is repacked: {msg}");
        check(&e, Some(&tight), MemCheck::Off).unwrap();
        check(&e, None, MemCheck::On).unwrap();
        let repacked = Estimate { weights_repacked: 1_000_000_000, weights_mapped: 900_000_000, ..e };
        let msg = check(&repacked, Some(&tight), MemCheck::On).unwrap_err().to_string();
        assert!(msg.contains("--no-repack (keeps the 1.00 GB"), "{msg}");
    }

    #[test]
    fn this_process_reports_its_memory() {
        let (now, peak) = (resident().unwrap(), peak_resident().unwrap());
        assert!(now > 1 << 20 && peak >= now, "{now} {peak}");
        let a = available().unwrap();
        assert!(a.bytes > 0, "{a:?}");
    }
}
