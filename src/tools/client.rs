//! `echod client`: the quickest way to see an echo server work.
//!
//! On a terminal it is a prompt: each line typed goes out and its echo is printed;
//! `q` or Ctrl-D quits. Otherwise it behaves like `nc`: stdin streams to the server and
//! the echo streams to stdout byte for byte (binary-safe, any size), the write side is
//! half-closed at end of input, and the client exits once everything came back. With
//! `--verify` the echo is compared with the input as it arrives, so a corrupting path
//! is caught without keeping a copy of the whole stream.
//!
//! `tls://HOST:PORT` does the same inside TLS (`--ca`, `--cert`/`--key`, `--insecure`):
//! the handshake completes before any input is read, and the end of input sends
//! close_notify before the half-close, so the client still exits once the server's own
//! close_notify has followed the last echo.
//!
//! Plain threads and blocking sockets: one stream, one reader, one writer. Over TLS the
//! two share the session under a lock that is never held across a socket call, so a
//! blocked send cannot stop the reader from draining the echo.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;

use rustls::ClientConnection;

use super::net::{self, MAX_DATAGRAM, ResolveError, UDP_ATTEMPTS, UdpFailure};
use super::tls::{self, TlsArgs, TlsSetupError};

/// Bytes read from stdin (and sent) at a time.
const CHUNK: usize = 64 * 1024;
/// Chunks of input kept for `--verify` until their echo arrives (bounds memory).
const VERIFY_QUEUE: usize = 64;

/// `echod client` flags.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// Echo server, HOST:PORT, or tls://HOST:PORT for echo over TLS.
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
    /// How a tls:// server is verified, and the client certificate.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
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
    /// The TLS client cannot be set up (no --ca, an unreadable file…).
    #[error(transparent)]
    TlsSetup(#[from] TlsSetupError),
    /// The TLS handshake failed (an unknown CA, a refused client certificate…).
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake {
        /// The server.
        addr: SocketAddr,
        /// What rustls (or the server's alert) said.
        reason: String,
    },
    /// `--udp` with a tls:// target.
    #[error("tls:// targets are TCP; --udp does not apply")]
    UdpTls,
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
        (false, true) => connect_tcp(args).and_then(|(s, tls)| interactive_tcp(s, tls, args)),
        (false, false) => connect_tcp(args).and_then(|(s, tls)| pipe_tcp(s, tls, args)),
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

/// Connects to the server; for a tls:// target also completes the handshake (within
/// `--timeout`), so a wrong CA or a refused certificate fails here, before any input.
fn connect_tcp(args: &ClientArgs) -> Result<(TcpStream, Option<ClientConnection>), ClientError> {
    let (tls, target) = tls::split_target(&args.addr);
    let tls = if tls {
        let config = args.tls.client_config("a tls:// target")?;
        Some(
            ClientConnection::new(config, args.tls.server_name(target)?).map_err(|e| {
                ClientError::Io {
                    context: "cannot start TLS",
                    source: io::Error::other(e),
                }
            })?,
        )
    } else {
        None
    };
    let mut last = None;
    for addr in net::resolve(target)? {
        match TcpStream::connect_timeout(&addr, args.timeout) {
            Ok(mut stream) => {
                let _ = stream.set_nodelay(true);
                let Some(mut conn) = tls else {
                    return Ok((stream, None));
                };
                handshake(&mut stream, &mut conn, args.timeout).map_err(
                    |e| match tls::tls_failure(&e) {
                        Some(reason) => ClientError::Handshake { addr, reason },
                        None if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                        {
                            ClientError::Handshake {
                                addr,
                                reason: format!("no answer within {:?}", args.timeout),
                            }
                        }
                        None => ClientError::Handshake {
                            addr,
                            reason: e.to_string(),
                        },
                    },
                )?;
                return Ok((stream, Some(conn)));
            }
            Err(source) => last = Some(ClientError::Connect { addr, source }),
        }
    }
    Err(last.expect("resolve returns at least one address"))
}

/// Runs the TLS handshake on `stream` within `timeout` in all, then clears the timeouts
/// for the caller to set its own.
fn handshake(
    stream: &mut TcpStream,
    conn: &mut ClientConnection,
    timeout: Duration,
) -> io::Result<()> {
    tls::handshake_by(conn, stream, std::time::Instant::now() + timeout)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

fn connect_udp(args: &ClientArgs) -> Result<(UdpSocket, SocketAddr), ClientError> {
    if tls::split_target(&args.addr).0 {
        return Err(ClientError::UdpTls);
    }
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

/// The sending side of a connection: bytes out, then the end of them.
trait Outbound: Write + Send + 'static {
    /// Says the input is over: a half-close (after close_notify over TLS).
    fn finish(&mut self) -> io::Result<()>;
}

impl Outbound for TcpStream {
    fn finish(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// The TLS session shared by the sending and the receiving side.
type Session = Arc<Mutex<ClientConnection>>;

fn lock(session: &Session) -> io::Result<std::sync::MutexGuard<'_, ClientConnection>> {
    session
        .lock()
        .map_err(|_| io::Error::other("the other side of the TLS session panicked"))
}

/// Encrypts under the lock, sends without it.
struct TlsWriter {
    socket: TcpStream,
    session: Session,
    out: Vec<u8>,
}

impl TlsWriter {
    /// Takes what the session has to send (this write's records, and any the reader's
    /// processing queued) and sends it.
    fn flush_records(&mut self) -> io::Result<()> {
        self.out.clear();
        {
            let mut conn = lock(&self.session)?;
            while conn.wants_write() {
                conn.write_tls(&mut self.out)?;
            }
        }
        self.socket.write_all(&self.out)
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = lock(&self.session)?.writer().write(buf)?;
        self.flush_records()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_records()
    }
}

impl Outbound for TlsWriter {
    fn finish(&mut self) -> io::Result<()> {
        lock(&self.session)?.send_close_notify();
        self.flush_records()?;
        self.socket.shutdown(Shutdown::Write)
    }
}

/// Reads records from the socket without the lock, decrypts under it.
struct TlsReader {
    socket: TcpStream,
    session: Session,
    /// Received bytes the session has not taken yet.
    pending: Vec<u8>,
    raw: Vec<u8>,
    eof: bool,
}

impl Read for TlsReader {
    /// Plaintext; `Ok(0)` once the server's close_notify came, `UnexpectedEof` when
    /// the connection ended without one; socket timeouts pass through.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = lock(&self.session)?;
                loop {
                    match conn.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if self.pending.is_empty() {
                        if !self.eof {
                            break;
                        }
                        // The transport ended: the session says whether cleanly.
                        conn.read_tls(&mut io::empty())?;
                        conn.process_new_packets().map_err(io::Error::other)?;
                        return match conn.reader().read(buf) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                Err(io::ErrorKind::UnexpectedEof.into())
                            }
                            other => other,
                        };
                    }
                    let taken = conn.read_tls(&mut &self.pending[..])?;
                    self.pending.drain(..taken);
                    conn.process_new_packets().map_err(io::Error::other)?;
                }
            }
            let n = self.socket.read(&mut self.raw)?;
            if n == 0 {
                self.eof = true;
            } else {
                self.pending.extend_from_slice(&self.raw[..n]);
            }
        }
    }
}

/// Streams stdin to the socket, then half-closes it.
fn send_stdin(
    mut socket: impl Outbound,
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
    socket.finish().map_err(io_err("cannot half-close"))
}

/// The connected peer, once reads on `socket` are set to time out after `timeout`.
fn peer_with_timeout(socket: &TcpStream, timeout: Duration) -> Result<SocketAddr, ClientError> {
    let addr = socket.peer_addr().map_err(io_err("not connected"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(io_err("cannot set a timeout"))?;
    Ok(addr)
}

fn pipe_tcp(
    socket: TcpStream,
    tls: Option<ClientConnection>,
    args: &ClientArgs,
) -> Result<(), ClientError> {
    // Short read timeouts let the loop notice a stalled echo; waiting for input that
    // has not been typed yet is never a timeout.
    let addr = peer_with_timeout(&socket, Duration::from_millis(200))?;
    let writer = socket.try_clone().map_err(io_err("cannot clone socket"))?;
    match tls {
        None => pipe(addr, socket, writer, args),
        Some(conn) => {
            let session = Arc::new(Mutex::new(conn));
            let reader = TlsReader {
                socket,
                session: Arc::clone(&session),
                pending: Vec::new(),
                raw: vec![0u8; CHUNK],
                eof: false,
            };
            let writer = TlsWriter {
                socket: writer,
                session,
                out: Vec::with_capacity(CHUNK + 1024),
            };
            pipe(addr, reader, writer, args)
        }
    }
}

/// Streams stdin out through `writer` (on its own thread) and the echo from `reader`
/// to stdout, until everything sent came back.
fn pipe(
    addr: SocketAddr,
    mut reader: impl Read,
    writer: impl Outbound,
    args: &ClientArgs,
) -> Result<(), ClientError> {
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
    let writer_progress = Arc::clone(&progress);
    let writer = std::thread::spawn(move || send_stdin(writer, &writer_progress, queue));

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

fn interactive_tcp(
    socket: TcpStream,
    tls: Option<ClientConnection>,
    args: &ClientArgs,
) -> Result<(), ClientError> {
    let addr = peer_with_timeout(&socket, args.timeout)?;
    match tls {
        None => {
            greet(addr, "tcp");
            lines(socket, addr, args)
        }
        Some(conn) => {
            greet(addr, "tls");
            lines(rustls::StreamOwned::new(conn, socket), addr, args)
        }
    }
}

/// The prompt loop: each line out, its echo back.
fn lines(
    mut socket: impl Read + Write,
    addr: SocketAddr,
    args: &ClientArgs,
) -> Result<(), ClientError> {
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
