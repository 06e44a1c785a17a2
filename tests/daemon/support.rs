//! Helpers for the daemon tests: the shared daemon handle, end-to-end kit and harness
//! (tests needing a tool or IPv6 show as ignored without it), plus what
//! only these tests need — counters waited for one by one, a config rewritten for a
//! reload, a fake service manager (the `NOTIFY_SOCKET` echod reports to and the
//! `LISTEN_FDS` hand-over of socket activation), the process's CPU time, and the
//! hostile clients the attack tests and the soak share (kubelet-style probes,
//! slowloris, slow readers, non-readers, spoofed UDP).

#[path = "../support/e2e.rs"]
mod e2e;

pub use e2e::*;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

impl Daemon {
    /// Waits (10 s at most) until a counter reaches `want`, then asserts it is exactly
    /// `want`: counts are flushed per burst, so they may lag the traffic briefly.
    pub fn wait_metric(&self, family: &str, labels: &[(&str, &str)], want: f64) {
        let reached = self.wait_metric_at_least(family, labels, want);
        assert_eq!(reached, want, "{family}{labels:?}");
    }

    /// A connection that has echoed one byte, so the daemon has surely accepted it.
    pub fn open_connection(&self) -> TcpStream {
        let mut s = TcpStream::connect(self.tcp).unwrap();
        assert!(
            echoes_on(&mut s, b"x", Duration::from_secs(10)),
            "echo of one byte"
        );
        s
    }

    /// Sends SIGHUP and waits until the daemon counted a successful reload.
    pub fn reload(&self) {
        let before = self.metric("echod_config_reloads_total", &[]);
        self.signal(libc::SIGHUP);
        self.wait_metric_at_least("echod_config_reloads_total", &[], before + 1.0);
    }

    /// A copy of the config file naming the addresses the daemon got instead of port 0:
    /// the file a local tool (`echod probe --config`) reads to reach this daemon.
    pub fn served_config(&self) -> PathBuf {
        let path = self.config_path().with_file_name("served.toml");
        let list = |addrs: &[SocketAddr]| {
            toml::Value::Array(addrs.iter().map(|a| a.to_string().into()).collect())
        };
        let served = format!(
            "[tcp]\nlisten = {}\n[udp]\nlisten = {}\n[metrics]\nlisten = {}\n",
            list(&self.listening.tcp),
            list(&self.listening.udp),
            list(&self.listening.http)
        );
        let mut config: toml::Table = std::fs::read_to_string(self.config_path())
            .unwrap()
            .parse()
            .unwrap();
        merge(&mut config, served.parse().expect("served addresses"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        path
    }

    /// Rewrites the config file (for reload tests).
    pub fn rewrite_config(&self, extra: &str) {
        let path = self.config_path();
        let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        merge(&mut config, extra.parse().expect("test TOML parses"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    }
}

/// CPU time (user + system) the process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// True when `name` is a family of `families` or a histogram's `_bucket`/`_sum`/`_count`.
pub fn is_exported(families: &BTreeMap<String, String>, name: &str) -> bool {
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .and_then(|base| families.get(base))
            .is_some_and(|kind| kind == "histogram")
    })
}

/// One datagram echod sent, with when it arrived.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Arrival time.
    pub at: Instant,
    /// The raw `KEY=value` lines.
    pub text: String,
}

impl Notification {
    /// The value of `key` in this message, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }

    /// True for a bare watchdog ping.
    pub fn is_watchdog(&self) -> bool {
        self.text.trim_end() == "WATCHDOG=1"
    }
}

/// The receiving end of the notify protocol, bound in a temp dir.
pub struct NotifySocket {
    socket: UnixDatagram,
    /// The path to pass as `NOTIFY_SOCKET`.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// Binds a fresh socket.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next message, or `None` after `limit`.
    pub fn recv(&self, limit: Duration) -> Option<Notification> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(Notification {
            at: Instant::now(),
            text: String::from_utf8_lossy(&buf[..n]).into_owned(),
        })
    }

    /// Messages until one satisfies `stop` (included), failing after `limit`; every
    /// message seen is appended to `seen`.
    pub fn until(
        &self,
        seen: &mut Vec<Notification>,
        limit: Duration,
        stop: impl Fn(&Notification) -> bool,
    ) -> Notification {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(n) = self.recv(left.max(Duration::from_millis(1))) else {
                panic!("no matching notification within {limit:?}; got so far: {seen:#?}");
            };
            seen.push(n.clone());
            if stop(&n) {
                return n;
            }
        }
    }
}

/// Starts `program args…` with `fds` handed over as descriptors 3, 4, … plus
/// `LISTEN_FDS`/`LISTEN_FDNAMES`, the way systemd does. `LISTEN_PID` must be the child's
/// own PID, known only after fork: the command runs through `sh`, whose `$$` is that PID
/// and which `exec`s the program. Output goes to `log`.
pub fn spawn_activated(
    program: &Path,
    args: &[&str],
    fds: Vec<(OwnedFd, &str)>,
    log: &Path,
) -> ChildGuard {
    // pre_exec must not allocate, so the copies go into a fixed array.
    assert!(fds.len() <= 16, "at most 16 sockets can be handed over");
    let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
    let raw: Vec<i32> = fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(program)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only fcntl(2) and dup2(2), both async-signal-safe, run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move every source above the 3.. range first, so no dup2 clobbers one still
            // to be copied; dup2 then clears close-on-exec on the targets only.
            let mut high = [0i32; 16];
            for (i, &fd) in raw.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..raw.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = ChildGuard(cmd.spawn().expect("start echod"));
    // The parent's copies close here; the child holds its own.
    drop(fds);
    child
}

/// Runs an in-process test on a runtime of its own with two workers, so the daemon's
/// tasks keep running while the test blocks on a socket.
pub fn block_on<F: std::future::Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(test)
}

/// Raw IP sockets (root), to send UDP datagrams with a spoofed source on loopback.
pub const RAW_SOCKETS: Need = Need::Host("raw IP sockets (root) to spoof UDP sources", || {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    )
    .is_ok()
});

/// What a Kubernetes probe waits (`timeoutSeconds: 2` in deploy/kubernetes).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One probe the way a kubelet makes it: a new connection, `GET path`, the whole
/// response within `PROBE_TIMEOUT` of the start. Returns the status code.
pub fn probe(from: Ipv4Addr, addr: SocketAddr, path: &str) -> Result<u16, String> {
    let started = Instant::now();
    let deadline = started + PROBE_TIMEOUT;
    let mut s =
        try_connect_from(from, addr, None, PROBE_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: echod\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete response within {PROBE_TIMEOUT:?} ({} bytes)",
                response.len()
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))
}

/// What the other side did to a connection, seen without blocking or consuming data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Open,
    /// A clean close (FIN): reads return 0.
    Eof,
    /// A reset or another error (reported once, then reads return 0).
    Reset,
}

pub fn peer_state(s: &TcpStream) -> Peer {
    let _ = s.set_nonblocking(true);
    match s.peek(&mut [0u8; 1]) {
        Ok(0) => Peer::Eof,
        Ok(_) => Peer::Open,
        Err(e) if e.kind() == ErrorKind::WouldBlock => Peer::Open,
        Err(_) => Peer::Reset,
    }
}

/// True when the connection is closed from the other side (EOF or reset).
pub fn closed_by_peer(s: &TcpStream) -> bool {
    peer_state(s) != Peer::Open
}

/// A running [`slowloris`] attack.
pub struct Slowloris {
    thread: JoinHandle<usize>,
    count: usize,
    /// Its connections open after its last round.
    open: Arc<AtomicUsize>,
}

impl Slowloris {
    /// Waits (10 s at most) until every one of its connections is open at once: the
    /// attack is in place.
    pub fn wait_in_place(&self) {
        wait_until(
            Duration::from_secs(10),
            || {
                format!(
                    "slowloris: {} of {} connections open",
                    self.open.load(Ordering::Relaxed),
                    self.count
                )
            },
            || self.open.load(Ordering::Relaxed) >= self.count,
        );
    }

    /// Waits for the attack to end (after its `stop`); how many connections it made.
    pub fn join(self) -> std::thread::Result<usize> {
        self.thread.join()
    }
}

/// Keeps `count` slowloris connections open from `sources` (taken in turn) until `stop`: half send a
/// partial request head and add a header line every second, half connect and say
/// nothing. A connection the daemon closes is replaced (at most 64 per 250 ms round),
/// as a real attacker would. Joined, it says how many connections it made.
pub fn slowloris(
    addr: SocketAddr,
    sources: Vec<Ipv4Addr>,
    count: usize,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> Slowloris {
    let open = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&open);
    let thread = std::thread::spawn(move || {
        let started = Instant::now();
        let mut slots: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
        let mut made = 0usize;
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
            let mut budget = 64;
            for (i, slot) in slots.iter_mut().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if slot.as_ref().is_some_and(closed_by_peer) {
                    *slot = None;
                }
                if slot.is_none() && budget > 0 {
                    budget -= 1;
                    if let Ok(mut s) = try_connect_from(
                        sources[i % sources.len()],
                        addr,
                        None,
                        Duration::from_millis(200),
                    ) {
                        made += 1;
                        if i.is_multiple_of(2) {
                            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                        }
                        *slot = Some(s);
                    }
                } else if let Some(s) = slot.as_mut()
                    && i.is_multiple_of(2)
                    && round.is_multiple_of(4)
                {
                    let _ = s.write_all(b"X-Slow: 1\r\n");
                }
            }
            round += 1;
            counted.store(slots.iter().flatten().count(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(250));
        }
        made
    });
    Slowloris {
        thread,
        count,
        open,
    }
}

/// A client from `from` that pipelines `GET /metrics` and never reads: writes until the
/// daemon stops taking requests (its responses fill the socket buffers) or 256 KiB are
/// sent.
pub fn slow_reader(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let mut s =
        try_connect_from(from, addr, Some(4096), PROBE_TIMEOUT).expect("slow reader connects");
    s.set_nonblocking(true).unwrap();
    let requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut sent = 0;
    let mut stalled: Option<Instant> = None;
    while sent < 256 * 1024 && Instant::now() < deadline {
        match s.write(&requests) {
            Ok(n) => {
                sent += n;
                stalled = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = stalled.get_or_insert_with(Instant::now).elapsed();
                if since > Duration::from_millis(200) {
                    break;
                }
                wait_writable(&s, Duration::from_millis(200).saturating_sub(since));
            }
            Err(_) => break,
        }
    }
    s
}

/// Writes without ever reading until `limit` bytes are sent or the writes have stalled
/// for `stall` (echod stopped reading); bounded by 10 s. Returns the bytes written, or
/// the error a write failed with.
pub fn write_until_stalled(
    s: &mut TcpStream,
    limit: usize,
    stall: Duration,
) -> std::io::Result<usize> {
    s.set_nonblocking(true)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut written = 0usize;
    let mut stalled_since: Option<Instant> = None;
    while written < limit && Instant::now() < deadline {
        match s.write(&chunk) {
            Ok(n) => {
                written += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > stall {
                    break;
                }
                wait_writable(s, stall.saturating_sub(since.elapsed()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// A raw IPv4 socket that writes UDP headers itself, bound to `src`'s address so the
/// kernel puts that address in the IP header (needs [`RAW_SOCKETS`]).
fn raw_udp_socket(src: Ipv4Addr) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .expect("a raw socket (the test needs RAW_SOCKETS)");
    socket
        .bind(&SocketAddr::from((src, 0)).into())
        .expect("bind raw socket to a loopback address");
    socket
}

/// One's-complement sum of 16-bit words, for the UDP checksum.
fn ones_complement_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

/// Sends one UDP datagram from `src` (an address and port we do not own) to `dst`,
/// both on loopback (needs [`RAW_SOCKETS`]).
pub fn spoof(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    assert!(src.ip().is_loopback() && dst.ip().is_loopback());
    let raw = raw_udp_socket(*src.ip());
    let len = u16::try_from(8 + payload.len()).expect("small payload");
    let mut packet = Vec::with_capacity(usize::from(len));
    packet.extend_from_slice(&src.port().to_be_bytes());
    packet.extend_from_slice(&dst.port().to_be_bytes());
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let mut sum = ones_complement_sum(ones_complement_sum(0, &pseudo), &packet);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    packet[6..8].copy_from_slice(&checksum.to_be_bytes());
    let sent = raw
        .send_to(&packet, &SocketAddr::from((*dst.ip(), 0)).into())
        .expect("send spoofed datagram");
    assert_eq!(sent, packet.len());
}

/// The IPv4 address of `addr` (every test daemon listens on 127.0.0.x).
pub fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

/// Waits (15 s at most) until the daemon's log contains `needle`; returns the log.
pub fn wait_for_log(daemon: &Daemon, needle: &str) -> String {
    wait_for(
        Duration::from_secs(15),
        || format!("no {needle:?} in the log:\n{}", daemon.log()),
        || Some(daemon.log()).filter(|log| log.contains(needle)),
    )
}

/// Waits (10 s at most) until echod has read every byte written on `s`: nothing left in
/// the client's send queue nor in the server socket's receive queue (`/proc/net/tcp`).
/// What a test writes next then reaches echod as a read of its own.
pub fn wait_read_by_peer(s: &TcpStream) {
    let (client, server) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    wait_until(
        Duration::from_secs(10),
        || format!("echod at {server} never read all that {client} sent"),
        || {
            tcp_queues(client, server).is_some_and(|(send, _)| send == 0)
                && tcp_queues(server, client).is_some_and(|(_, receive)| receive == 0)
        },
    );
}

/// The send and receive queues, in bytes, of the TCP socket from `local` to `remote`.
fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let tables = ["/proc/net/tcp", "/proc/net/tcp6"].map(std::fs::read_to_string);
    let text = tables.into_iter().flatten().collect::<String>();
    let row = text.lines().find_map(|line| {
        // sl, local_address, rem_address, st, tx_queue:rx_queue, …
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ends = (
            proc_net_address(fields.get(1)?)?,
            proc_net_address(fields.get(2)?)?,
        );
        if ends != (local, remote) {
            return None;
        }
        fields.get(4).map(|queues| queues.to_string())
    })?;
    let (send, receive) = row.split_once(':')?;
    Some((
        u64::from_str_radix(send, 16).ok()?,
        u64::from_str_radix(receive, 16).ok()?,
    ))
}

/// True when the connection echoes "ping"; false when the daemon closed it (EOF or
/// reset). Panics if neither happens within 10 s: a rejected client must never hang.
pub fn is_served(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    if stream.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    match stream.read_exact(&mut buf) {
        Ok(()) => {
            assert_eq!(&buf, b"ping");
            true
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("connection neither served nor closed within 10 s")
        }
        Err(_) => false,
    }
}

/// The `skmem:(r0,rb…,t0,tb…)` fields of the first socket in `ss -m` output, by name.
pub fn skmem(ss_output: &str) -> std::collections::HashMap<String, u64> {
    let fields = ss_output
        .split("skmem:(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no skmem in ss output: {ss_output:?}"));
    fields
        .split(',')
        .filter_map(|field| {
            let digits = field.find(|c: char| c.is_ascii_digit())?;
            let (name, value) = field.split_at(digits);
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Runs `echod check-config` on a file holding `toml`; returns the exit code and stderr.
pub fn check_config_text(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echod.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(echod_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("ECHOD_CONFIG")
        .output()
        .expect("run echod check-config");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until the process is in state `T` (stopped) or has left it.
pub fn wait_stopped(pid: u32, stopped: bool) {
    let state = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .and_then(|s| s.trim().chars().next())
    };
    wait_until(
        Duration::from_secs(5),
        || format!("process state {:?}", state()),
        || (state() == Some('T')) == stopped,
    );
}

/// True when a new connection to `addr` echoes 4 KiB, connected and echoed within
/// [`PROBE_TIMEOUT`] each.
pub fn echoes(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .is_ok_and(|mut s| echoes_on(&mut s, &random_bytes(4096, 42), PROBE_TIMEOUT))
}

/// A UDP client socket bound to `from` (e.g. "127.0.0.1:0"), waiting `wait` for a reply.
pub fn udp_client(from: impl std::net::ToSocketAddrs, wait: Duration) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind(from).expect("bind UDP client");
    s.set_read_timeout(Some(wait)).unwrap();
    s
}

/// Raises this test process's soft open-files limit to its hard limit, which must be at
/// least `wanted`: the tests holding hundreds of sockets run beside others.
pub fn raise_open_files_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        assert!(
            limit.rlim_max >= wanted,
            "hard open-files limit {} < {wanted}",
            limit.rlim_max
        );
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}
