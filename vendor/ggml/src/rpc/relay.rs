//! The relay between ggml's RPC client and one remote server (see `rpc/mod.rs` for why it exists).
//!
//! ggml's client connects to the relay's loopback port; the relay holds the one connection to the server. Each
//! command is passed on unchanged and each reply passed back unchanged, so the relay only needs the protocol's
//! framing (ggml-rpc.cpp, protocol 7.0):
//!
//! - request: command (1 byte) | size (u64 LE) | `size` bytes;
//! - reply, for the commands that have one: size (u64 LE) | `size` bytes, a size each command fixes.
//!
//! While the server answers, the relay checks every reply's size against the command's (a server that sends
//! anything else is treated as failed). Once the server has failed (connection closed or reset, silence past the
//! reply timeout, a malformed reply), the failure is recorded once and every later command gets a well-formed
//! empty reply from the relay itself, so ggml's client never sees a broken connection (which it answers with
//! GGML_ABORT). The scheduler reads the record after each computation and reports the error.
//!
//! ggml's client may connect several times over the link's life (it drops its connection whenever no buffer or
//! backend of the endpoint is left and connects again on the next call); the server connection stays, so what
//! the server holds for us (buffers, weights) stays too. HELLO and DEVICE_COUNT are answered by the relay from
//! the handshake it made first, because the server answers HELLO once per connection.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sys;

// The command table below is protocol 7.0's. A ggml with another protocol must not build until it is reviewed.
const _: () = assert!(
    sys::RPC_PROTO_MAJOR_VERSION == 7 && sys::RPC_PROTO_MINOR_VERSION == 0,
    "ggml's RPC protocol changed: review the relay's command table (vendor/ggml/src/rpc/relay.rs)"
);

pub(crate) const PROTO: (u8, u8, u8) = (7, 0, 0);
pub(crate) const HELLO: u8 = 14;
pub(crate) const DEVICE_COUNT: u8 = 15;
/// `rpc_msg_hello_rsp`: major, minor, patch, padding, 24 bytes of transport capabilities.
pub(crate) const HELLO_REPLY: usize = 28;
/// `rpc_msg_hello_req`: the client's transport capabilities.
pub(crate) const HELLO_REQUEST: usize = 24;

/// What the server replies to a command.
#[derive(Clone, Copy)]
enum Reply {
    /// Nothing.
    None,
    /// A reply of this many bytes.
    Fixed(u64),
    /// GET_TENSOR: as many bytes as the request's last field (`rpc_msg_get_tensor_req::size`) asks.
    Requested,
}

/// Protocol 7.0's commands in their numeric order (`enum rpc_cmd`), with the reply `rpc_serve_client` sends.
const COMMANDS: [(&str, Reply); 18] = [
    ("ALLOC_BUFFER", Reply::Fixed(16)),
    ("GET_ALIGNMENT", Reply::Fixed(8)),
    ("GET_MAX_SIZE", Reply::Fixed(8)),
    ("BUFFER_GET_BASE", Reply::Fixed(8)),
    ("FREE_BUFFER", Reply::None),
    ("BUFFER_CLEAR", Reply::None),
    ("SET_TENSOR", Reply::None),
    ("SET_TENSOR_HASH", Reply::Fixed(1)),
    ("GET_TENSOR", Reply::Requested),
    ("COPY_TENSOR", Reply::Fixed(1)),
    ("GRAPH_COMPUTE", Reply::None),
    ("GET_DEVICE_MEMORY", Reply::Fixed(16)),
    ("INIT_TENSOR", Reply::None),
    ("GET_ALLOC_SIZE", Reply::Fixed(8)),
    ("HELLO", Reply::Fixed(HELLO_REPLY as u64)),
    ("DEVICE_COUNT", Reply::Fixed(4)),
    ("GRAPH_RECOMPUTE", Reply::None),
    ("MEMSET_TENSOR", Reply::None),
];

/// The reply the relay gives in place of a failed server's: zeros (no allocation, no cached hash, no same-server
/// copy, zero memory), except where ggml's client would trip over a zero: an alignment (a divisor), a maximum
/// buffer size, and a buffer's base address (ggml asserts it is not null).
fn stand_in(cmd: u8, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let value: Option<u64> = match COMMANDS[cmd as usize].0 {
        "GET_ALIGNMENT" => Some(64),
        "GET_MAX_SIZE" => Some(u64::MAX),
        "BUFFER_GET_BASE" => Some(4096),
        _ => None,
    };
    if let (Some(v), 8) = (value, n) {
        out.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Longest a reply may take by default (`RpcLink::connect` takes another): a generous bound on one graph
/// computation of a remote share of a model (a long prompt's micro-batch on a slow board), past which the server
/// counts as hung. A server that is killed or whose machine goes away is noticed sooner: its connection closes, or
/// TCP keepalive gives up (`KEEPALIVE`).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// TCP keepalive on the server connection: idle time, probe interval, probes.
pub(crate) const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(10), Duration::from_secs(5), 3);

/// Chunk in which large requests and replies (weights, activations) pass through.
const CHUNK: usize = 1 << 20;

/// What the link and the backends share with the relay thread.
pub(crate) struct State {
    /// The server, as the user named it (`host:port`).
    pub remote: String,
    /// The first failure of the server, once it failed.
    failure: Mutex<Option<String>>,
    /// Bytes sent to and received from the server (framing included).
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Set when the link is dropped: the relay closes the server connection once ggml's client has closed its
    /// own, and from then on answers every command itself.
    pub closing: AtomicBool,
    /// Longest wait for one whole reply.
    pub reply_timeout: Duration,
}

impl State {
    pub(crate) fn new(remote: &str, reply_timeout: Duration) -> State {
        State {
            remote: remote.to_string(),
            failure: Mutex::new(None),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            reply_timeout,
        }
    }

    /// The recorded failure, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail(&self, what: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(what);
        }
    }

    fn alive(&self) -> bool {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// Describes an I/O error on the server connection for the user.
pub(crate) fn describe(e: &io::Error, doing: &str, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!(
                "no answer while {doing} for {} s (the server hangs or the network is down; --rpc-timeout)",
                timeout.as_secs()
            )
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => {
            format!("the connection closed while {doing}: the server stopped or crashed")
        }
        _ => format!("connection lost while {doing} ({e}): the server stopped or the network failed"),
    }
}

/// The server side of the relay: the connection, or none once it could not be set up or was closed.
struct Server {
    io: Option<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
    state: Arc<State>,
    /// The buffers the server allocated for us: (remote_ptr, size), to check the base addresses it gives.
    sizes: Vec<(u64, u64)>,
}

impl Server {
    fn send(&mut self, bytes: &[u8], cmd: &str) {
        let Some((_, writer)) = self.io.as_mut().filter(|_| self.state.alive()) else { return };
        match writer.write_all(bytes) {
            Ok(()) => {
                self.state.sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Err(e) => self.state.fail(describe(&e, &format!("sending {cmd}"), self.state.reply_timeout)),
        }
    }

    fn flush(&mut self, cmd: &str) {
        let Some((_, writer)) = self.io.as_mut().filter(|_| self.state.alive()) else { return };
        if let Err(e) = writer.flush() {
            self.state.fail(describe(&e, &format!("sending {cmd}"), self.state.reply_timeout));
        }
    }

    /// Reads `buf.len()` bytes of a reply due by `deadline`; zeros (and the failure recorded) if the server cannot
    /// give them in time. (The deadline bounds the whole reply: a server trickling a byte at a time cannot hold
    /// ggml's client for longer.)
    fn recv(&mut self, buf: &mut [u8], cmd: &str, deadline: Instant) {
        let timeout = self.state.reply_timeout;
        if let Some((reader, _)) = self.io.as_mut().filter(|_| self.state.alive()) {
            match read_by(reader, buf, deadline) {
                Ok(()) => {
                    self.state.received.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => self.state.fail(describe(&e, &format!("waiting for the reply to {cmd}"), timeout)),
            }
        }
        buf.fill(0);
    }

    /// Closes the server connection (the server frees what it held for us); every later command is answered by
    /// the relay.
    fn close(&mut self, why: &str) {
        if let Some((_, writer)) = self.io.take() {
            let _ = writer.get_ref().shutdown(std::net::Shutdown::Both);
        }
        self.state.fail(why.to_string());
    }
}

/// `read_exact` that gives up at `deadline`.
fn read_by(reader: &mut BufReader<TcpStream>, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        match reader.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs the relay for the rest of the program. Its errors are the server's, recorded in `state`.
pub(crate) fn run(
    listener: TcpListener,
    remote: TcpStream,
    hello: [u8; HELLO_REPLY],
    n_devices: u32,
    state: Arc<State>,
) {
    let io = match remote.try_clone() {
        Ok(reader) => Some((BufReader::with_capacity(CHUNK, reader), BufWriter::with_capacity(CHUNK, remote))),
        Err(e) => {
            state.fail(format!("could not use the server connection ({e})"));
            None
        }
    };
    let mut server = Server { io, state: Arc::clone(&state), sizes: Vec::new() };
    let mut buf = vec![0u8; CHUNK];
    // The relay never stops accepting: ggml's client connects to this endpoint as long as anything of ggml still
    // names it (a buffer type is never freed), and a connection refused or never answered would abort or hang it.
    // Once the link is gone, the server connection is closed and the relay answers every command itself.
    for client in listener.incoming() {
        let Ok(client) = client else {
            // (Out of file descriptors, say: wait instead of spinning.)
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = client.set_nodelay(true);
        // An error here is ggml's client going away (its dispatcher closed the socket): wait for the next.
        let _ = serve_client(client, &mut server, &hello, n_devices, &mut buf);
        if state.closing.load(Ordering::Acquire) {
            server.close("the link to the server was closed");
        }
    }
}

/// Serves one connection of ggml's client until it closes (an error: the client side went away).
fn serve_client(
    client: TcpStream,
    server: &mut Server,
    hello: &[u8; HELLO_REPLY],
    n_devices: u32,
    buf: &mut [u8],
) -> io::Result<()> {
    // ggml's client says HELLO as soon as it connects. Anything else on this port (another local process) must
    // do so too, within seconds, or it is dropped rather than left to hold up ggml's connection behind it. (The
    // relay serves one connection at a time; a link's own stays open for its whole life, see `RpcLink`.)
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut from = BufReader::with_capacity(CHUNK, client.try_clone()?);
    let mut to = BufWriter::with_capacity(CHUNK, client);
    let mut greeted = false;
    loop {
        let mut head = [0u8; 9];
        from.read_exact(&mut head)?;
        let cmd = head[0];
        if !greeted {
            if cmd != HELLO {
                return Err(io::Error::other("a connection that did not start with HELLO"));
            }
            greeted = true;
            from.get_ref().set_read_timeout(None)?;
        }
        let size = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let Some(&(name, _)) = COMMANDS.get(cmd as usize) else {
            // Not a command of protocol 7.0 (the build checks ggml's protocol version): drop the connection.
            return Err(io::Error::other(format!("unknown RPC command {cmd}")));
        };
        match cmd {
            HELLO | DEVICE_COUNT => {
                skip(&mut from, size, buf)?;
                let body = match cmd {
                    HELLO => hello.to_vec(),
                    _ => n_devices.to_le_bytes().to_vec(),
                };
                to.write_all(&(body.len() as u64).to_le_bytes())?;
                to.write_all(&body)?;
                to.flush()?;
                continue;
            }
            _ => {}
        }
        server.send(&head, name);
        if let Err(e) = exchange(&mut from, &mut to, server, cmd, size, buf) {
            // ggml's client went away in the middle of a command: the server connection is out of step.
            server.state.fail(format!("the local RPC client stopped in the middle of {name}"));
            return Err(e);
        }
    }
}

/// The rest of one command after its head: the request's body to the server, the reply back to ggml's client.
fn exchange(
    from: &mut BufReader<TcpStream>,
    to: &mut BufWriter<TcpStream>,
    server: &mut Server,
    cmd: u8,
    size: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let (name, reply) = COMMANDS[cmd as usize];
    // The request, passed on in chunks; its last 8 bytes kept (GET_TENSOR's size).
    let mut tail = [0u8; 8];
    let mut left = size;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        from.read_exact(&mut buf[..k])?;
        server.send(&buf[..k], name);
        keep_tail(&mut tail, &buf[..k]);
        left -= k as u64;
    }
    server.flush(name);
    let want = match reply {
        Reply::None => return Ok(()),
        Reply::Fixed(n) => n,
        Reply::Requested if size >= 8 => u64::from_le_bytes(tail),
        Reply::Requested => return Err(io::Error::other(format!("a {name} request of {size} bytes"))),
    };
    // The reply: the server's when its size is the command's and its values are ones ggml can use, else (a
    // failed or misbehaving server) the stand-in, so that ggml's client always gets what it waits for.
    let deadline = Instant::now() + server.state.reply_timeout;
    if server.state.alive() {
        let mut len = [0u8; 8];
        server.recv(&mut len, name, deadline);
        let got = u64::from_le_bytes(len);
        if server.state.alive() && got != want {
            server.state.fail(format!("the server sent a reply of {got} bytes to {name}, expected {want}"));
        }
    }
    if want <= 16 {
        // The fixed replies: read whole, checked, then passed on.
        let reply = &mut buf[..want as usize];
        server.recv(reply, name, deadline);
        if server.state.alive() {
            if let Err(why) = server.check(cmd, &tail, reply) {
                server.state.fail(format!("the server sent {why} in reply to {name}"));
            }
        }
        if !server.state.alive() {
            reply.copy_from_slice(&stand_in(cmd, want as usize));
        }
        to.write_all(&want.to_le_bytes())?;
        to.write_all(reply)?;
        return to.flush();
    }
    to.write_all(&want.to_le_bytes())?;
    let mut left = want;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        server.recv(&mut buf[..k], name, deadline);
        if !server.state.alive() {
            buf[..k].fill(0);
        }
        to.write_all(&buf[..k])?;
        left -= k as u64;
    }
    to.flush()
}

/// Largest alignment and per-tensor allocation size a server may ask for (ggml adds and rounds with them).
const MAX_ALIGNMENT: u64 = 1 << 20;
const MAX_ALLOC: u64 = 1 << 48;

impl Server {
    /// Checks the values of a fixed reply that ggml's client would trip over (divide by, assert on, overflow
    /// with); `request_tail` is the request's last 8 bytes. Remembers the sizes of the buffers allocated.
    fn check(&mut self, cmd: u8, request_tail: &[u8; 8], reply: &[u8]) -> Result<(), String> {
        let u64_at = |i: usize| u64::from_le_bytes(reply[i..i + 8].try_into().expect("8 bytes"));
        let requested = u64::from_le_bytes(*request_tail);
        match COMMANDS[cmd as usize].0 {
            "GET_ALIGNMENT" => {
                let a = u64_at(0);
                if !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(format!("an alignment of {a}"));
                }
            }
            "GET_MAX_SIZE" if u64_at(0) < 4096 => return Err(format!("a maximum buffer size of {}", u64_at(0))),
            "GET_ALLOC_SIZE" if u64_at(0) > MAX_ALLOC => return Err(format!("an allocation size of {}", u64_at(0))),
            "ALLOC_BUFFER" => {
                let (ptr, size) = (u64_at(0), u64_at(8));
                if ptr != 0 {
                    // (`requested` is the request's `size`, its last field.)
                    if size < requested || size > MAX_ALLOC {
                        return Err(format!("a buffer of {size} bytes for {requested} asked"));
                    }
                    self.sizes.retain(|&(p, _)| p != ptr);
                    self.sizes.push((ptr, size));
                }
            }
            "BUFFER_GET_BASE" => {
                // (`requested` is the request's `remote_ptr`.)
                let base = u64_at(0);
                let size = self.sizes.iter().find(|&&(p, _)| p == requested).map_or(0, |&(_, s)| s);
                if base == 0 || base.checked_add(size).is_none() {
                    return Err(format!("a base address of {base:#x} for a buffer of {size} bytes"));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn skip(from: &mut impl Read, mut n: u64, buf: &mut [u8]) -> io::Result<()> {
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        from.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Shifts the last bytes of `chunk` into `tail` (the last 8 bytes seen of a request).
fn keep_tail(tail: &mut [u8; 8], chunk: &[u8]) {
    if chunk.len() >= 8 {
        tail.copy_from_slice(&chunk[chunk.len() - 8..]);
    } else {
        tail.rotate_left(chunk.len());
        tail[8 - chunk.len()..].copy_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_of_a_request_read_in_pieces() {
        let mut tail = [0u8; 8];
        for piece in [&[1u8, 2, 3][..], &[4, 5], &[6, 7, 8, 9, 10]] {
            keep_tail(&mut tail, piece);
        }
        assert_eq!(tail, [3, 4, 5, 6, 7, 8, 9, 10]);
        keep_tail(&mut tail, &(0..20).collect::<Vec<u8>>());
        assert_eq!(tail, [12, 13, 14, 15, 16, 17, 18, 19]);
    }

    #[test]
    fn stand_ins_never_hand_ggml_a_zero_it_divides_by_or_asserts_on() {
        let get = |name: &str| COMMANDS.iter().position(|c| c.0 == name).unwrap() as u8;
        assert_eq!(stand_in(get("GET_ALIGNMENT"), 8), 64u64.to_le_bytes());
        assert_eq!(stand_in(get("BUFFER_GET_BASE"), 8), 4096u64.to_le_bytes());
        assert_eq!(stand_in(get("ALLOC_BUFFER"), 16), [0u8; 16], "remote_ptr 0: the allocation failed");
        assert_eq!(COMMANDS[HELLO as usize].0, "HELLO");
        assert_eq!(COMMANDS[DEVICE_COUNT as usize].0, "DEVICE_COUNT");
    }
}
