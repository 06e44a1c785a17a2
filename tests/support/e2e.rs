//! The kit of the crates that run echod end to end, `daemon` and `deployment`: the daemon
//! handle (`daemon.rs`) and the harness that shows a test whose tool is missing as
//! ignored (`harness.rs`), plus what both do to a running echod — signal it and wait for
//! its exit, send traffic whose counts are known (admitted and refused connections,
//! round trips, a connection held across reloads), wait for exact counter values, and
//! read the repository's own files (README, Grafana dashboard).
//!
//! Included (by `#[path]`) into the support modules of those two crates, so it holds only
//! what both of them use.

#[path = "daemon.rs"]
mod daemon;
#[path = "harness.rs"]
mod harness;

pub use daemon::*;
pub use harness::*;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

impl Daemon {
    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on the PID of a child we started and have not reaped.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// The exit status, if the daemon has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.0.try_wait().expect("waitpid on our own child")
    }

    /// Waits for the daemon to exit (panics after `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let status = poll(limit, || self.try_exit());
        status
            .unwrap_or_else(|| panic!("echod did not exit within {limit:?}; log:\n{}", self.log()))
    }
}

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The TCP addresses process `pid` listens on, from the sockets among its descriptors
/// (`/proc/PID/fd`) that `/proc/net/tcp` and `tcp6` show listening: how a test learns the
/// port a tool it started bound on port 0.
pub fn listening_tcp(pid: u32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: LISTEN), inode
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                found.extend(proc_net_address(fields[1]));
            }
        }
    }
    found
}

/// Waits until the kernel would take more bytes on `s` (poll(2) says it is writable),
/// for `limit` at most; false when it still would not. For a client that writes without
/// reading, this is the moment echod read something.
pub fn wait_writable(s: &TcpStream, limit: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // Rounded up, so a caller that waits out its `limit` is past it on return.
    let millis = i32::try_from(limit.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: one pollfd, valid for the length of the call.
    unsafe { libc::poll(&mut fd, 1, millis) > 0 }
}

/// A `/proc/net/tcp` address (`0100007F:1F90`: the address as 32-bit words printed in
/// host byte order, a colon, the port in hex).
pub fn proc_net_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Sends `data` over TCP in random-sized writes while reading the echo concurrently,
/// half-closes, and returns everything received until EOF.
pub fn tcp_roundtrip(addr: SocketAddr, data: &[u8], seed: u64) -> Vec<u8> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let payload = data.to_vec();
    let sender = std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut off = 0;
        while off < payload.len() {
            let n = rng.usize(1..=65_536).min(payload.len() - off);
            writer.write_all(&payload[off..off + n]).unwrap();
            off += n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut got = Vec::with_capacity(data.len());
    reader.read_to_end(&mut got).expect("read echo");
    sender.join().unwrap();
    got
}

/// Streams `data` over TCP in `chunk`-byte writes with `pause` after each (so a stop or
/// reload lands mid-transfer), calling `on_chunk(n)` after write n, while reading the
/// echo concurrently; half-closes and returns everything received until EOF.
pub fn paced_roundtrip(
    addr: SocketAddr,
    data: &[u8],
    chunk: usize,
    pause: Duration,
    mut on_chunk: impl FnMut(usize) + Send + 'static,
) -> std::io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let payload = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        for (n, piece) in payload.chunks(chunk).enumerate() {
            writer.write_all(piece)?;
            on_chunk(n);
            std::thread::sleep(pause);
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = stream;
    let mut got = Vec::with_capacity(data.len());
    let read = reader.read_to_end(&mut got);
    sender.join().expect("sender thread")?;
    read.map(|_| got)
}

/// Sends one datagram from a fresh 127.0.0.1 socket and returns the reply, if one comes
/// within `wait`.
pub fn udp_echo(target: SocketAddr, payload: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    socket.send_to(payload, target).unwrap();
    let mut buf = vec![0u8; 65_536];
    let n = socket.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// The usual client source address.
pub const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// A TCP connection from `from` (127.0.0.x) to `to` within `timeout`, with an optional
/// small receive buffer (set before connect so the window is small from the start).
pub fn try_connect_from(
    from: Ipv4Addr,
    to: SocketAddr,
    rcvbuf: Option<usize>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(&SocketAddr::from((from, 0)).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}

/// A TCP connection to `addr` from the local address `from` (127.0.0.x), reading with a
/// 10 s timeout.
pub fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let stream = try_connect_from(from, addr, None, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Writes `data` on `stream` and reads as many bytes back, waiting `within` at most for
/// each read; true when they are `data`, false when the connection failed or closed, or
/// the echo was late.
pub fn echoes_on(stream: &mut TcpStream, data: &[u8], within: Duration) -> bool {
    let mut back = vec![0u8; data.len()];
    stream.set_read_timeout(Some(within)).is_ok()
        && stream.write_all(data).is_ok()
        && stream.read_exact(&mut back).is_ok()
        && back == data
}

/// A connection the daemon admitted: one byte is echoed on it.
pub fn admitted(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, addr);
    assert!(
        echoes_on(&mut s, b"x", Duration::from_secs(10)),
        "admitted connection echoes"
    );
    s
}

/// A connection the daemon refused: the kernel completed the handshake, then echod
/// closed it without reading (EOF or reset — never an echo, never a timeout).
pub fn refused(from: Ipv4Addr, addr: SocketAddr) {
    let mut s = connect_from(from, addr);
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("refused connection delivered {n} bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("connection was not refused: still open after the read timeout")
        }
        Err(_) => {}
    }
}

/// True when the server closes a fresh connection at once (a limit refused it) instead
/// of echoing on it; panics when it does neither within a few seconds.
pub fn refused_after_accept(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"x");
    let mut buf = [0u8; 1];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(_) => false,
        Err(e) => panic!("neither echoed nor closed: {e}"),
    }
}

/// echod with these TCP connection limits (global, per source address).
pub fn daemon_with_limits(max_connections: usize, per_ip: usize) -> Daemon {
    Daemon::start(&format!(
        "[tcp]\nmax_connections = {max_connections}\nmax_connections_per_ip = {per_ip}\n"
    ))
}

/// echod that gives open connections at most `drain_timeout` (e.g. "60s") when stopped.
pub fn daemon_with_drain_timeout(drain_timeout: &str) -> Daemon {
    Daemon::start(&format!(
        "[shutdown]\ndrain_timeout = \"{drain_timeout}\"\n"
    ))
}

/// One expected sample: family, label pairs it must carry, value (summed over matches).
pub type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Waits until every expected sample shows exactly its value in one scrape, then
/// returns that scrape. Counters are flushed at the end of a burst or batch, so they
/// may lag the client by a moment; after `limit` the mismatches are reported.
pub fn expect_metrics(daemon: &Daemon, expected: &[Expected<'_>], limit: Duration) -> String {
    let last = std::cell::RefCell::new((Vec::new(), String::new()));
    wait_for(
        limit,
        || {
            let (wrong, scrape) = last.take();
            format!(
                "metrics did not reach their expected values:\n  {}\nscrape:\n{scrape}",
                wrong.join("\n  ")
            )
        },
        || {
            let scrape = daemon.scrape();
            let wrong: Vec<String> = expected
                .iter()
                .filter_map(|(family, labels, want)| {
                    let got = metric_value(&scrape, family, labels);
                    (got != *want).then(|| format!("{family}{labels:?}: got {got}, want {want}"))
                })
                .collect();
            if wrong.is_empty() {
                return Some(scrape);
            }
            *last.borrow_mut() = (wrong, scrape);
            None
        },
    )
}

/// Metric families in an exposition, from their `# TYPE` lines: name → type.
pub fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// The Grafana dashboard `deploy/grafana/echod-dashboard.json`, parsed.
pub fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/echod-dashboard.json"))
        .expect("dashboard file");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// (panel title, PromQL expression) of every panel target of a dashboard.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            targets.into_iter().map(move |t| {
                let expr = t["expr"].as_str().unwrap_or_default().to_string();
                (title.clone(), expr)
            })
        })
        .collect()
}

/// A client that holds one connection and echoes round after round until told to stop
/// (at most 2 minutes); returns how many rounds came back byte-exact.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<u64>,
}

impl Chatter {
    pub fn start(addr: SocketAddr) -> Chatter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let rounds = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&rounds);
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut rounds = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let data = random_bytes(1000 + (rounds % 7000) as usize, rounds);
                stream
                    .write_all(&data)
                    .expect("write on the held connection");
                let mut got = vec![0u8; data.len()];
                stream
                    .read_exact(&mut got)
                    .expect("echo on the held connection");
                assert!(got == data, "round {rounds}: bytes differ");
                rounds += 1;
                counter.store(rounds, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            rounds
        });
        Chatter {
            stop,
            rounds,
            thread,
        }
    }

    /// Waits until a few more rounds came back, proving the connection still echoes now.
    pub fn still_echoing(&self) {
        let start = self.rounds.load(Ordering::Relaxed);
        let what = || format!("the held connection stopped echoing after {start} rounds");
        wait_until(Duration::from_secs(10), what, || {
            assert!(!self.thread.is_finished(), "{}", what());
            self.rounds.load(Ordering::Relaxed) >= start + 3
        });
    }

    /// Stops and returns the byte-exact rounds.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("the held connection kept echoing")
    }
}

/// A client that sends without reading until neither its buffers nor echod's take any
/// more: echod then waits to write back a burst it has read (its one buffer), and reads
/// nothing further from it.
pub struct StalledClient {
    stream: TcpStream,
    sent: Vec<u8>,
    seed: u64,
}

impl StalledClient {
    pub fn start(addr: SocketAddr, seed: u64) -> StalledClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nonblocking(true).unwrap();
        let mut client = StalledClient {
            stream,
            sent: Vec::new(),
            seed,
        };
        let taken = client.more_taken(Duration::from_millis(500));
        assert!(taken > 0, "nothing could be sent");
        client
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> usize {
        self.sent.len()
    }

    /// Sends until nothing more is taken for `quiet`; returns how much was taken.
    pub fn more_taken(&mut self, quiet: Duration) -> usize {
        let mut taken = 0;
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            self.seed += 1;
            let chunk = random_bytes(64 * 1024, self.seed);
            let mut off = 0;
            while off < chunk.len() {
                match self.stream.write(&chunk[off..]) {
                    Ok(n) => {
                        off += n;
                        last = Instant::now();
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if last.elapsed() >= quiet {
                            break;
                        }
                        wait_writable(&self.stream, quiet.saturating_sub(last.elapsed()));
                    }
                    Err(e) => panic!("the stalled connection failed: {e}"),
                }
            }
            self.sent.extend_from_slice(&chunk[..off]);
            taken += off;
        }
        taken
    }

    /// Reads everything back (after a half-close) and checks it is exactly what was sent.
    pub fn finish(self) {
        let mut stream = self.stream;
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::with_capacity(self.sent.len());
        stream
            .read_to_end(&mut got)
            .expect("the stalled connection echoes everything once read");
        assert_eq!(
            got.len(),
            self.sent.len(),
            "bytes echoed on the stalled connection"
        );
        assert!(got == self.sent, "the stalled connection's echo differs");
    }
}
