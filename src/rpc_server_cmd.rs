//! `asagi-gguf rpc-server`: ggml's RPC server on this machine's devices (its GPUs when the build has a GPU backend
//! and finds one, else its CPU), for `run`/`chat`/`serve`/`bench --rpc` on another machine to place blocks of the
//! language model here.

use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use ggml::DeviceKind;

#[derive(clap::Args, Debug)]
pub struct RpcServerArgs {
    /// Address to listen on. Anything but a loopback address needs --expose.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// CPU threads, when the server computes on the CPU [default: physical cores].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Keep the large tensors clients send in DIR, by content hash: a client loading the same model again sends
    /// hashes instead of gigabytes of weights (llama.cpp rpc-server's -c).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Listen on a non-loopback --host. ggml's RPC has no authentication and trusts what clients send: only on a
    /// private network of your own machines, never an open one.
    #[arg(long)]
    pub expose: bool,
}

/// ggml's warning for a server reachable from other machines (llama.cpp's rpc-server prints the same).
const WARNING: &str = "WARNING: the RPC server listens on a non-loopback address.\n         \
                       Never expose the RPC server to an open network!\n         \
                       It has no authentication: anyone who can reach the port can run code paths of ggml on this \
                       machine and read what it holds.";

pub fn run(a: RpcServerArgs) -> Result<()> {
    // ggml's server takes an IPv4 address only (no names, no IPv6): resolve here, for an error that says so.
    let ip = (a.host.as_str(), a.port)
        .to_socket_addrs()
        .with_context(|| format!("--host {}: not an address or a name this machine resolves", a.host))?
        .find(|s| s.is_ipv4())
        .map(|s| s.ip())
        .with_context(|| format!("--host {}: no IPv4 address (ggml's RPC server listens on IPv4 only)", a.host))?;
    if !ip.is_loopback() {
        if !a.expose {
            bail!(
                "--host {} is not a loopback address: other machines could reach this server, which has no \
                 authentication. Add --expose to do it anyway (a private network of your own machines only)",
                a.host
            );
        }
        eprintln!("{WARNING}");
    }
    // ggml only says "Failed to create server socket": try the address first, for an error that names it.
    let endpoint = format!("{ip}:{}", a.port);
    drop(TcpListener::bind((ip, a.port)).with_context(|| format!("cannot listen on {endpoint}"))?);
    if let Some(dir) = &a.cache {
        std::fs::create_dir_all(dir).with_context(|| format!("--cache {}", dir.display()))?;
    }
    let devices = ggml::devices();
    let gpus: Vec<usize> = devices
        .iter()
        .filter(|d| matches!(d.kind, DeviceKind::Gpu | DeviceKind::IntegratedGpu))
        .map(|d| d.index)
        .collect();
    let chosen = match gpus.is_empty() {
        true => devices.iter().filter(|d| d.kind == DeviceKind::Cpu).map(|d| d.index).take(1).collect(),
        false => gpus,
    };
    let threads = a.threads.unwrap_or_else(num_cpus::get_physical);
    eprintln!("asagi-gguf rpc-server: ggml RPC protocol {}, {threads} CPU threads", ggml::rpc::protocol_version());
    ggml::rpc::serve(&endpoint, a.cache.as_deref(), threads, &chosen)?;
    Ok(())
}
