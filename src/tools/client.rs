//! `echod client`: the quickest way to see an echo server work.
//!
//! On a terminal it is a prompt: each line typed goes out and its echo is printed;
//! `q` or Ctrl-D quits. Otherwise it behaves like `nc`: stdin streams to the server and
//! the echo streams to stdout byte for byte (binary-safe, any size), the write side is
//! half-closed at end of input, and the client exits once everything came back. With
//! `--verify` the echo is compared with the input as it arrives, so a corrupting path
//! is caught without keeping a copy of the whole stream.
//!
//! Plain threads and blocking sockets: one stream, one reader, one writer.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use clap::Args;

use super::net::{self, MAX_DATAGRAM, ResolveError, UDP_ATTEMPTS, UdpFailure};

/// Bytes read from stdin (and sent) at a time.
const CHUNK: usize = 64 * 1024;
/// Chunks of input kept for `--verify` until their echo arrives (bounds memory).
const VERIFY_QUEUE: usize = 64;

/// `echod client` flags.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// Echo server, HOST:PORT.
    #[arg(default_value = "127.0.0.1:7007")]
    pub(crate) addr: String,
    /// Use UDP (one datagram per line) instead of TCP.
    #[arg(long)]
    pub(crate) udp: bool,
    /// Compare the echo with the input and exit non-zero on the first difference.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Time allowed to connect, and for an outstanding echo to make progress.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

/// Why the client stopped early; each renders as the one line the user sees.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// DNS failed or returned nothing.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// Refused, unreachable, timed out…
        source: io::Error,
    },
    /// Outstanding echo did not progress in time.
    #[error("no echo from {addr} within {timeout:?} ({outstanding} bytes outstanding)")]
    Timeout {
        /// The server.
        addr: SocketAddr,
        /// The configured `--timeout`.
        timeout: Duration,
        /// Bytes sent but not echoed.
        outstanding: u64,
    },
    /// The server closed before echoing everything.
    #[error("server closed the connection after echoing {echoed} of {sent} bytes")]
    Truncated {
        /// Bytes echoed.
        echoed: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// The echo differs from what was sent (`--verify`).
    #[error("echo differs from the input at byte offset {offset}")]
    Mismatch {
        /// Offset of the first differing byte in the stream.
        offset: u64,
    },
    /// Any other socket or terminal error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { context, source }
}

/// Runs `echod client`; errors are printed as one line and give exit code 1.
pub fn run(args: &ClientArgs) -> ExitCode {
    let interactive = io::stdin().is_terminal();
    let result = match (args.udp, interactive) {
        (false, true) => connect_tcp(args).and_then(|s| interactive_tcp(s, args)),
        (false, false) => connect_tcp(args).and_then(|s| pipe_tcp(s, args)),
        (true, true) => connect_udp(args).and_then(|s| interactive_udp(&s, args)),
        (true, false) => connect_udp(args).and_then(|s| pipe_udp(&s, args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echod client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn connect_tcp(args: &ClientArgs) -> Result<TcpStream, ClientError> {
    let mut last = None;
    for addr in net::resolve(&args.addr)? {
        match TcpStream::connect_timeout(&addr, args.timeout) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(source) => last = Some(ClientError::Connect { addr, source }),
        }
    }
    Err(last.expect("resolve returns at least one address"))
}

fn connect_udp(args: &ClientArgs) -> Result<(UdpSocket, SocketAddr), ClientError> {
    let addr = net::resolve(&args.addr)?[0];
    let socket =
        net::connected_udp(addr).map_err(|source| ClientError::Connect { addr, source })?;
    Ok((socket, addr))
}

/// Compares the echo against the input, chunk by chunk, as both stream past.
struct Verifier {
    pending: Receiver<Vec<u8>>,
    progress: Arc<Progress>,
    current: Vec<u8>,
    pos: usize,
    offset: u64,
}

impl Verifier {
    fn check(&mut self, mut echoed: &[u8]) -> Result<(), ClientError> {
        while !echoed.is_empty() {
            if self.pos == self.current.len() {
                // The writer counts a chunk as sent before queueing it: an echo of
                // bytes never sent is extra data, not a reason to wait.
                let mismatch = ClientError::Mismatch {
                    offset: self.offset,
                };
                if self.offset >= self.progress.sent.load(Ordering::Acquire) {
                    return Err(mismatch);
                }
                self.current = self.pending.recv().map_err(|_| mismatch)?;
                self.pos = 0;
            }
            let n = echoed.len().min(self.current.len() - self.pos);
            let expected = &self.current[self.pos..self.pos + n];
            if let Some(i) = expected.iter().zip(echoed).position(|(a, b)| a != b) {
                return Err(ClientError::Mismatch {
                    offset: self.offset + i as u64,
                });
            }
            self.pos += n;
            self.offset += n as u64;
            echoed = &echoed[n..];
        }
        Ok(())
    }
}

/// Progress shared between the stdin→socket thread and the socket→stdout loop.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    input_done: AtomicBool,
}

/// Streams stdin to the socket, then half-closes it.
fn send_stdin(
    mut socket: TcpStream,
    progress: &Progress,
    verify: Option<SyncSender<Vec<u8>>>,
) -> Result<(), ClientError> {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("cannot read stdin")(e)),
        };
        progress.sent.fetch_add(n as u64, Ordering::Release);
        if let Some(queue) = &verify {
            // The reader stopped (mismatch or error): it reports why.
            if queue.send(buf[..n].to_vec()).is_err() {
                return Ok(());
            }
        }
        socket.write_all(&buf[..n]).map_err(io_err("cannot send"))?;
    }
    progress.input_done.store(true, Ordering::Release);
    socket
        .shutdown(Shutdown::Write)
        .map_err(io_err("cannot half-close"))
}

fn pipe_tcp(socket: TcpStream, args: &ClientArgs) -> Result<(), ClientError> {
    let addr = socket.peer_addr().map_err(io_err("not connected"))?;
    let progress = Arc::new(Progress::default());
    let (queue, pending) = if args.verify {
        let (tx, rx) = sync_channel(VERIFY_QUEUE);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mut verifier = pending.map(|pending| Verifier {
        pending,
        progress: Arc::clone(&progress),
        current: Vec::new(),
        pos: 0,
        offset: 0,
    });
    let writer_socket = socket.try_clone().map_err(io_err("cannot clone socket"))?;
    let writer_progress = Arc::clone(&progress);
    let writer = std::thread::spawn(move || send_stdin(writer_socket, &writer_progress, queue));

    let mut reader = socket;
    // Short read timeouts let the loop notice a stalled echo; waiting for input that
    // has not been typed yet is never a timeout.
    reader
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_err("cannot set a timeout"))?;
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; CHUNK];
    let mut echoed: u64 = 0;
    let mut last_progress = Instant::now();
    let result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                last_progress = Instant::now();
                if let Some(Err(e)) = verifier.as_mut().map(|v| v.check(&buf[..n])) {
                    break Err(e);
                }
                echoed += n as u64;
                if let Err(e) = stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
                    break Err(io_err("cannot write stdout")(e));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let outstanding = progress.sent.load(Ordering::Acquire) - echoed;
                if outstanding == 0 {
                    last_progress = Instant::now();
                } else if last_progress.elapsed() >= args.timeout {
                    break Err(ClientError::Timeout {
                        addr,
                        timeout: args.timeout,
                        outstanding,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(io_err("connection failed")(e)),
        }
    };
    // On an error the writer may be blocked on a stalled stdin or socket; exiting
    // the process ends it.
    result?;
    drop(verifier);
    writer.join().map_err(|_| ClientError::Io {
        context: "sender",
        source: io::Error::other("panicked"),
    })??;
    let sent = progress.sent.load(Ordering::Acquire);
    if echoed != sent || !progress.input_done.load(Ordering::Acquire) {
        return Err(ClientError::Truncated { echoed, sent });
    }
    Ok(())
}

/// Sends one datagram and waits for its echo, resending on silence.
fn udp_roundtrip(
    socket: &UdpSocket,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
    reply: &mut [u8],
) -> Result<usize, ClientError> {
    net::udp_exchange(socket, payload, reply, UDP_ATTEMPTS, timeout).map_err(|f| match f {
        UdpFailure::Refused(source) => ClientError::Connect { addr, source },
        UdpFailure::Silence => ClientError::Timeout {
            addr,
            timeout,
            outstanding: payload.len() as u64,
        },
        UdpFailure::Io(context, source) => ClientError::Io { context, source },
    })
}

fn pipe_udp(
    (socket, addr): &(UdpSocket, SocketAddr),
    args: &ClientArgs,
) -> Result<(), ClientError> {
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    let mut line = Vec::new();
    let mut reply = vec![0u8; MAX_DATAGRAM + 1];
    let mut offset: u64 = 0;
    loop {
        line.clear();
        let n = (&mut stdin)
            .take(MAX_DATAGRAM as u64)
            .read_until(b'\n', &mut line)
            .map_err(io_err("cannot read stdin"))?;
        if n == 0 {
            return Ok(());
        }
        let got = udp_roundtrip(socket, *addr, &line, args.timeout, &mut reply)?;
        if args.verify && reply[..got] != line[..] {
            let at = line.iter().zip(&reply[..got]).take_while(|(a, b)| a == b);
            return Err(ClientError::Mismatch {
                offset: offset + at.count() as u64,
            });
        }
        offset += line.len() as u64;
        stdout
            .write_all(&reply[..got])
            .and_then(|()| stdout.flush())
            .map_err(io_err("cannot write stdout"))?;
    }
}

/// Reads one line (any bytes) from the terminal after a prompt; `None` on Ctrl-D or `q`.
fn prompt(stdin: &mut impl BufRead, line: &mut Vec<u8>) -> Result<Option<()>, ClientError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(b"> ")
        .and_then(|()| stdout.flush())
        .map_err(io_err("cannot write stdout"))?;
    line.clear();
    let n = stdin
        .read_until(b'\n', line)
        .map_err(io_err("cannot read the terminal"))?;
    if n == 0 || line.trim_ascii_end() == b"q" {
        if n == 0 {
            let _ = stdout.write_all(b"\n");
        }
        return Ok(None);
    }
    Ok(Some(()))
}

fn greet(addr: SocketAddr, proto: &str) {
    eprintln!("connected to {addr} ({proto}); type a line to echo it, `q` or Ctrl-D to quit");
}

fn print_echo(echo: &[u8]) -> Result<(), ClientError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(echo)
        .and_then(|()| stdout.flush())
        .map_err(io_err("cannot write stdout"))
}

fn interactive_tcp(mut socket: TcpStream, args: &ClientArgs) -> Result<(), ClientError> {
    let addr = socket.peer_addr().map_err(io_err("not connected"))?;
    socket
        .set_read_timeout(Some(args.timeout))
        .map_err(io_err("cannot set a timeout"))?;
    greet(addr, "tcp");
    let mut stdin = io::stdin().lock();
    let mut line = Vec::new();
    while prompt(&mut stdin, &mut line)?.is_some() {
        socket.write_all(&line).map_err(io_err("cannot send"))?;
        let mut echo = vec![0u8; line.len()];
        socket.read_exact(&mut echo).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                addr,
                timeout: args.timeout,
                outstanding: line.len() as u64,
            },
            io::ErrorKind::UnexpectedEof => ClientError::Truncated {
                echoed: 0,
                sent: line.len() as u64,
            },
            _ => io_err("connection failed")(e),
        })?;
        print_echo(&echo)?;
    }
    Ok(())
}

fn interactive_udp(
    (socket, addr): &(UdpSocket, SocketAddr),
    args: &ClientArgs,
) -> Result<(), ClientError> {
    greet(*addr, "udp");
    let mut stdin = io::stdin().lock();
    let mut line = Vec::new();
    let mut reply = vec![0u8; MAX_DATAGRAM + 1];
    while prompt(&mut stdin, &mut line)?.is_some() {
        let n = udp_roundtrip(socket, *addr, &line, args.timeout, &mut reply)?;
        print_echo(&reply[..n])?;
    }
    Ok(())
}
