//! Where the language model's blocks run: this machine and the RPC servers of `--rpc` (`asagi-gguf rpc-server` on
//! other machines). As llama.cpp splits a model across devices: consecutive blocks per device, in proportion to the
//! memory each device reports, or to `--tensor-split`. The token embeddings, the output layer, the vision encoder
//! and the sampling stay on this machine; each block's KV cache lives where the block is (`llm::Session`), so a
//! decode step sends each server one row of activations in and takes one out.

use anyhow::{bail, Context as _, Result};
use ggml::gguf::GgufFile;
use ggml::rpc::RpcLink;
use ggml::{Backend, BufferType};

use crate::weights::Offload;

/// One device of an RPC server.
pub struct RemoteDevice {
    /// Index into `Remotes::links`.
    pub link: usize,
    pub device: u32,
    pub backend: Backend,
    pub buft: BufferType,
    /// Free memory the server reports (a CPU server reports its RAM size).
    pub memory_free: usize,
    /// For messages: `RPC server HOST:PORT` (with the device when the server has several).
    pub label: String,
}

/// The connected servers and their devices, in the order of `--rpc`.
#[derive(Default)]
pub struct Remotes {
    pub links: Vec<RpcLink>,
    pub devices: Vec<RemoteDevice>,
}

impl Remotes {
    /// Connects to every server of `--rpc` (each checked: reachable, same protocol, with a device) and opens all
    /// their devices.
    pub fn connect(endpoints: &[String], reply_timeout: std::time::Duration) -> Result<Remotes> {
        let mut r = Remotes::default();
        for (i, e) in endpoints.iter().enumerate() {
            let Some((host, port)) = e.rsplit_once(':') else { bail!("--rpc {e}: expected HOST:PORT") };
            if host.is_empty() || port.parse::<u16>().is_err() {
                bail!("--rpc {e}: expected HOST:PORT, with a port number");
            }
            if endpoints[..i].contains(e) {
                bail!("--rpc lists {e} twice (a server serves one client at a time)");
            }
            let link = RpcLink::connect(e, reply_timeout)?;
            for device in 0..link.n_devices() {
                let (free, _) = link.device_memory(device)?;
                let label = match link.n_devices() {
                    1 => format!("RPC server {e}"),
                    _ => format!("RPC server {e} device {device}"),
                };
                r.devices.push(RemoteDevice {
                    link: r.links.len(),
                    device,
                    backend: link.backend(device)?,
                    buft: link.buffer_type(device)?,
                    memory_free: free,
                    label,
                });
            }
            r.links.push(link);
        }
        Ok(r)
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Ok while every server answers; else the first failure, naming the server.
    pub fn health(&self) -> Result<(), anyhow::Error> {
        Ok(self.links.iter().try_for_each(|l| l.health())?)
    }

    /// Handles on the servers' health, for other threads (the server's HTTP side).
    pub fn health_handles(&self) -> Vec<ggml::rpc::Health> {
        self.links.iter().map(|l| l.health_handle()).collect()
    }

    /// Bytes sent to and received from all servers so far.
    pub fn traffic(&self) -> ggml::rpc::Traffic {
        self.links.iter().map(|l| l.traffic()).fold(Default::default(), |a, t| ggml::rpc::Traffic {
            sent: a.sent + t.sent,
            received: a.received + t.received,
        })
    }
}

/// Which device each of `n_layer` blocks goes to (0 = this machine, 1 + i = remote device i): consecutive blocks
/// per device, device d taking the blocks whose start `il / n_layer` falls in its share of the cumulated
/// `weights` (llama.cpp's rule, so the same flags split a model the same way).
pub fn split_blocks(n_layer: usize, weights: &[f64]) -> Result<Vec<usize>> {
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        bail!("--tensor-split: every share must be a number >= 0, got {weights:?}");
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        bail!("--tensor-split: the shares add up to 0");
    }
    let mut cum = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in weights {
        acc += w;
        cum.push(acc / total);
    }
    Ok((0..n_layer)
        .map(|il| {
            let at = il as f64 / n_layer as f64;
            cum.iter().position(|&c| at < c).unwrap_or(weights.len() - 1)
        })
        .collect())
}

/// The split of a model across this machine and `remotes`: the block assignment and the uploads it needs.
pub struct Split {
    /// Device of each block (0 = here).
    pub assign: Vec<usize>,
    pub offload: Vec<Offload>,
}

impl Split {
    /// `shares`: `--tensor-split` (one share for this machine, then one per remote device) or, when empty, the
    /// memory each device reports (this machine's CPU as ggml reports it: its RAM size, as a CPU server does).
    pub fn new(file: &GgufFile, n_layer: usize, remotes: &Remotes, shares: &[f64]) -> Result<Split> {
        let n = 1 + remotes.devices.len();
        let weights: Vec<f64> = match shares.is_empty() {
            false if shares.len() != n => bail!(
                "--tensor-split has {} shares for {n} devices (this machine, then {})",
                shares.len(),
                remotes.devices.iter().map(|d| d.label.as_str()).collect::<Vec<_>>().join(", ")
            ),
            false => shares.to_vec(),
            true => {
                let local =
                    ggml::devices().iter().find(|d| d.kind == ggml::DeviceKind::Cpu).map_or(0, |d| d.memory_free);
                std::iter::once(local).chain(remotes.devices.iter().map(|d| d.memory_free)).map(|m| m as f64).collect()
            }
        };
        let assign = split_blocks(n_layer, &weights).context("splitting the blocks across devices")?;
        let offload = remotes
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| Offload {
                buft: d.buft,
                label: d.label.clone(),
                names: crate::llm::block_tensor_names(file, |b| assign.get(b) == Some(&(1 + i))),
                remote: true,
            })
            .collect();
        Ok(Split { assign, offload })
    }

    /// Blocks on device `d`.
    pub fn blocks_on(&self, d: usize) -> usize {
        self.assign.iter().filter(|&&x| x == d).count()
    }

    /// One line for the load log: which blocks run where.
    pub fn summary(&self, remotes: &Remotes) -> String {
        let name = |d: usize| match d {
            0 => "here".to_string(),
            _ => format!("on {}", remotes.devices[d - 1].label),
        };
        let mut parts = Vec::new();
        let mut start = 0;
        for il in 1..=self.assign.len() {
            if il == self.assign.len() || self.assign[il] != self.assign[start] {
                let blocks = match il - start {
                    1 => format!("block {start}"),
                    _ => format!("blocks {start}-{}", il - 1),
                };
                parts.push(format!("{blocks} {}", name(self.assign[start])));
                start = il;
            }
        }
        format!("split: {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::split_blocks;

    #[test]
    fn blocks_split_in_proportion_and_in_order() {
        assert_eq!(split_blocks(3, &[1.0, 1.0, 1.0]).unwrap(), [0, 1, 2]);
        assert_eq!(split_blocks(6, &[2.0, 1.0]).unwrap(), [0, 0, 0, 0, 1, 1]);
        assert_eq!(split_blocks(4, &[0.0, 1.0, 1.0]).unwrap(), [1, 1, 2, 2], "a zero share takes no block");
        assert_eq!(split_blocks(4, &[1.0, 0.0]).unwrap(), [0, 0, 0, 0]);
        assert_eq!(split_blocks(2, &[1.0, 1.0, 1.0, 1.0]).unwrap(), [0, 2], "more devices than blocks");
        assert!(split_blocks(4, &[0.0, 0.0]).is_err());
        assert!(split_blocks(4, &[1.0, f64::NAN]).is_err());
        assert!(split_blocks(4, &[1.0, -1.0]).is_err());
    }
}
