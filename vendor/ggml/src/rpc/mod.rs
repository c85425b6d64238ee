//! ggml's RPC backend: `serve` puts this machine's devices on the network (ggml's own server), `RpcLink` makes a
//! remote server's devices usable here as backends and buffer types, which the scheduler then uses like local ones.
//!
//! ggml's RPC client treats any network failure as fatal: a server that cannot be reached, a send or a receive
//! that fails (the server stopped, the connection dropped) or a reply of the wrong size all end in GGML_ABORT,
//! some of them in the client's worker thread, where no caller could catch anything. A program must outlive the
//! machines it borrows, so ggml's client never talks to a server directly: it talks to a relay in this process
//! (`relay.rs`) over loopback, which checks the server first (reachable, protocol version, devices), passes every
//! command and reply on unchanged, and, once the server fails, answers ggml in its place with well-formed empty
//! replies while recording the failure. `Scheduler::compute` and its reads check the record and return it as an
//! error; nothing computed after the failure is used.
//!
//! The relay's port on 127.0.0.1 lets any local process that finds it in time speak to the server through it: no
//! more than the server itself allows anyone who can reach it (ggml's RPC has no authentication at all).

mod relay;

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::{sys, Backend, BufferType, Error, Result};

pub(crate) use relay::State;
pub use relay::DEFAULT_REPLY_TIMEOUT;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ggml's RPC protocol version of this build (`RPC_PROTO_*_VERSION`).
pub fn protocol_version() -> String {
    format!("{}.{}.{}", sys::RPC_PROTO_MAJOR_VERSION, sys::RPC_PROTO_MINOR_VERSION, sys::RPC_PROTO_PATCH_VERSION)
}

/// Bytes that went to and came from a server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// A checked connection to one RPC server (`asagi-gguf rpc-server` or llama.cpp's `rpc-server` of the same
/// protocol), through the relay.
pub struct RpcLink {
    state: Arc<State>,
    /// The relay's endpoint, which ggml's client is given.
    local: CString,
    local_addr: SocketAddr,
    n_devices: u32,
    /// A backend held for the link's life: ggml's client keeps one connection per endpoint while anything of it
    /// lives (otherwise it reconnects for every query), so no other local process can slip in between.
    _keeper: Option<Backend>,
}

fn err(remote: &str, msg: impl std::fmt::Display) -> Error {
    Error::Rpc(format!("RPC server {remote}: {msg}"))
}

impl RpcLink {
    /// Connects to the server at `remote` (`host:port`), checks that it speaks this build's protocol and has a
    /// device, and starts the relay. A reply that takes longer than `reply_timeout` counts as a failure of the
    /// server (`DEFAULT_REPLY_TIMEOUT`: 300 s). Every failure is an error naming the server.
    pub fn connect(remote: &str, reply_timeout: Duration) -> Result<RpcLink> {
        let addrs: Vec<SocketAddr> =
            remote.to_socket_addrs().map_err(|e| err(remote, format!("not a reachable HOST:PORT ({e})")))?.collect();
        let mut last = None;
        let stream = addrs.iter().find_map(|a| match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => Some(s),
            Err(e) => {
                last = Some(e);
                None
            }
        });
        let Some(mut stream) = stream else {
            let why = last.map_or("no address".to_string(), |e| e.to_string());
            return Err(err(
                remote,
                format!("cannot connect ({why}); is `asagi-gguf rpc-server` running there, on that port?"),
            ));
        };
        setup(&stream).map_err(|e| err(remote, format!("cannot set up the connection ({e})")))?;
        let (hello, n_devices) = handshake(&mut stream).map_err(|m| err(remote, m))?;
        // (Reads get their deadline per reply in the relay; a write blocked by a server that stopped reading
        // fails after the same time.)
        stream
            .set_write_timeout(Some(reply_timeout))
            .map_err(|e| err(remote, format!("cannot set up the connection ({e})")))?;

        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| err(remote, format!("no local port for the relay ({e})")))?;
        let local_addr = listener.local_addr().map_err(|e| err(remote, e))?;
        let state = Arc::new(State::new(remote, reply_timeout));
        let thread_state = Arc::clone(&state);
        std::thread::Builder::new()
            .name(format!("rpc relay {remote}"))
            .spawn(move || relay::run(listener, stream, hello, n_devices, thread_state))
            .map_err(|e| err(remote, format!("cannot start the relay thread ({e})")))?;
        let local = CString::new(local_addr.to_string()).expect("an address has no NUL");
        let mut link = RpcLink { state, local, local_addr, n_devices, _keeper: None };
        link._keeper = Some(link.backend(0)?);
        Ok(link)
    }

    /// The server as given to `connect`.
    pub fn remote(&self) -> &str {
        &self.state.remote
    }

    /// Devices the server offers (its GPUs, or its CPU).
    pub fn n_devices(&self) -> u32 {
        self.n_devices
    }

    /// Ok while the server answers; its first failure once it has failed.
    pub fn health(&self) -> Result<()> {
        health(&self.state)
    }

    /// A handle on the same record, for other threads.
    pub fn health_handle(&self) -> Health {
        Health(Arc::clone(&self.state))
    }

    /// Bytes sent to and received from the server so far.
    pub fn traffic(&self) -> Traffic {
        Traffic { sent: self.state.sent.load(Ordering::Relaxed), received: self.state.received.load(Ordering::Relaxed) }
    }

    fn check_device(&self, device: u32) -> Result<()> {
        match device < self.n_devices {
            true => Ok(()),
            false => Err(err(self.remote(), format!("has {} devices, no device {device}", self.n_devices))),
        }
    }

    /// Free and total memory of device `device`, as the server reports them (for a CPU: its RAM size, both).
    pub fn device_memory(&self, device: u32) -> Result<(usize, usize)> {
        self.check_device(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the out-pointers are valid locals; the endpoint is our relay's, which accepts for the rest of the
        // program and always answers with a well-formed reply (see the module documentation), so ggml's client
        // neither aborts nor waits forever.
        unsafe { sys::ggml_backend_rpc_get_device_memory(self.local.as_ptr(), device, &mut free, &mut total) };
        self.health()?;
        Ok((free, total))
    }

    /// A backend computing on device `device` of the server.
    pub fn backend(&self, device: u32) -> Result<Backend> {
        self.check_device(device)?;
        // SAFETY: the relay's endpoint (always answered, see above); the device exists (checked against the count
        // the server gave in the handshake, which the relay also gives ggml).
        let raw = unsafe { sys::ggml_backend_rpc_init(self.local.as_ptr(), device) };
        let raw = NonNull::new(raw).ok_or_else(|| err(self.remote(), "ggml could not create the backend"))?;
        self.health()?;
        Ok(Backend::from_rpc(raw, Arc::clone(&self.state), device))
    }

    /// The buffer type of device `device` of the server (weights and caches placed there live on the server).
    pub fn buffer_type(&self, device: u32) -> Result<BufferType> {
        self.check_device(device)?;
        // SAFETY: as `backend`; ggml keeps RPC buffer types for the whole program (never freed), as registry types.
        let raw = unsafe { sys::ggml_backend_rpc_buffer_type(self.local.as_ptr(), device) };
        let raw = NonNull::new(raw).ok_or_else(|| err(self.remote(), "ggml could not create the buffer type"))?;
        self.health()?;
        // SAFETY: a buffer type that lives for the whole program (above).
        Ok(unsafe { BufferType::from_raw(raw) })
    }
}

/// A handle on a link's record of its server's health (cheap to clone, usable from any thread).
#[derive(Clone)]
pub struct Health(Arc<State>);

impl Health {
    /// Ok while the server answers; its first failure once it has failed.
    pub fn check(&self) -> Result<()> {
        health(&self.0)
    }
}

impl Drop for RpcLink {
    fn drop(&mut self) {
        // The relay closes the server connection once ggml's client has closed its own, which it does when the
        // last buffer and backend of this server are freed (the keeper goes right after this); a relay waiting for
        // a connection is woken to do it.
        self.state.closing.store(true, Ordering::Release);
        self._keeper = None;
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
    }
}

/// The recorded failure of a server as an error.
pub(crate) fn health(state: &State) -> Result<()> {
    match state.failure() {
        None => Ok(()),
        Some(f) => Err(err(&state.remote, f)),
    }
}

/// No delay for small messages (a decode step is a few round trips of a few KB), and keepalive probes so that a
/// machine that vanishes (power, network) is noticed even while a reply is awaited. Keepalive is a refinement:
/// where the system (or an emulator) lacks one of its options, the reply timeout still bounds the wait.
fn setup(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (idle, interval, count) = relay::KEEPALIVE;
    let _ = rustix::net::sockopt::set_socket_keepalive(s, true)
        .and_then(|()| rustix::net::sockopt::set_tcp_keepidle(s, idle))
        .and_then(|()| rustix::net::sockopt::set_tcp_keepintvl(s, interval))
        .and_then(|()| rustix::net::sockopt::set_tcp_keepcnt(s, count));
    Ok(())
}

/// HELLO (version check) and DEVICE_COUNT, as ggml's client would send them. Returns the HELLO reply the relay
/// will give ggml (the transport capabilities cleared: plain TCP through the relay) and the device count.
fn handshake(s: &mut TcpStream) -> std::result::Result<([u8; relay::HELLO_REPLY], u32), String> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "no answer to the RPC handshake within {} s: busy with another client (an RPC server serves one at a \
             time), or not an RPC server",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => format!(
            "closed the connection during the RPC handshake: not an RPC server of protocol {} (another llama.cpp \
             version, or another program)",
            protocol_version()
        ),
        _ => format!("RPC handshake failed ({e})"),
    };
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    let mut req = vec![relay::HELLO];
    req.extend_from_slice(&(relay::HELLO_REQUEST as u64).to_le_bytes());
    req.extend_from_slice(&[0u8; relay::HELLO_REQUEST]);
    s.write_all(&req).map_err(io)?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len != relay::HELLO_REPLY as u64 {
        return Err(format!(
            "answered the RPC handshake with {len} bytes, not {}: not an RPC server of protocol {}",
            relay::HELLO_REPLY,
            protocol_version()
        ));
    }
    let mut hello = [0u8; relay::HELLO_REPLY];
    s.read_exact(&mut hello).map_err(io)?;
    let (major, minor, patch) = (hello[0], hello[1], hello[2]);
    if major != relay::PROTO.0 || minor > relay::PROTO.1 {
        return Err(format!(
            "speaks RPC protocol {major}.{minor}.{patch}, this build {}: run the rpc-server of the same \
             asagi-gguf version (or of a llama.cpp with this protocol) there",
            protocol_version()
        ));
    }
    hello[4..].fill(0);
    let mut req = vec![relay::DEVICE_COUNT];
    req.extend_from_slice(&0u64.to_le_bytes());
    s.write_all(&req).map_err(io)?;
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).map_err(io)?;
    if reply[..8] != 4u64.to_le_bytes() {
        return Err("answered DEVICE_COUNT with a reply of the wrong size".into());
    }
    let n = u32::from_le_bytes(reply[8..].try_into().expect("4 bytes"));
    if n == 0 {
        return Err("offers no device".into());
    }
    if n > 16 {
        return Err(format!("offers {n} devices; at most 16 are supported"));
    }
    Ok((hello, n))
}

/// Runs ggml's RPC server on `endpoint` (`host:port`) with `devices` (indices into `crate::devices()`), until the
/// program ends. Returns only when the server cannot start (the port taken, a device that cannot be opened).
/// `cache_dir`: where the server keeps large tensors it was sent (by content hash), so that a client loading the
/// same model again sends hashes instead of the weights. `n_threads`: for a CPU device.
pub fn serve(endpoint: &str, cache_dir: Option<&std::path::Path>, n_threads: usize, devices: &[usize]) -> Result<()> {
    let endpoint_c = CString::new(endpoint).map_err(|_| Error::Invalid(format!("endpoint {endpoint:?}")))?;
    let cache_c = match cache_dir {
        Some(d) => Some(
            CString::new(d.to_str().ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", d.display())))?)
                .map_err(|_| Error::Invalid(format!("{}: contains NUL", d.display())))?,
        ),
        None => None,
    };
    // SAFETY: indices below the registry's count give static device handles.
    let mut devs: Vec<sys::ggml_backend_dev_t> = unsafe {
        let n = sys::ggml_backend_dev_count();
        devices.iter().filter(|&&i| i < n).map(|&i| sys::ggml_backend_dev_get(i)).collect()
    };
    if devs.is_empty() || devs.len() != devices.len() {
        return Err(Error::Invalid(format!("no such devices: {devices:?}")));
    }
    // SAFETY: NUL-terminated strings that outlive the call; `devs` holds valid device handles. The server runs
    // until the program ends (it only returns on a failure to start).
    unsafe {
        sys::ggml_backend_rpc_start_server(
            endpoint_c.as_ptr(),
            cache_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            n_threads.max(1),
            devs.len(),
            devs.as_mut_ptr(),
        )
    };
    Err(Error::Rpc(format!("the RPC server on {endpoint} could not start (see ggml's message above)")))
}
