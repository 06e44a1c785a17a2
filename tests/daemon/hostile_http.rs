//! The HTTP endpoint under attack from the network, and with the process out of file
//! descriptors: the liveness probe must keep answering within the 2 s a Kubernetes
//! probe waits, because a probe that fails restarts a daemon that is doing its job.
//!
//! Every client here is on loopback (attackers and probes bind distinct 127.0.0.x
//! addresses, all local), every loop is bounded in count and time, and the daemon is
//! the test's own child, killed by PID when the test ends.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::{Daemon, Options};
use socket2::{Domain, Protocol, Socket, Type};

crate::support::tests![
    probes_answer_while_one_address_attacks_the_http_port,
    probes_answer_while_many_addresses_fill_the_table,
    probes_answer_while_echo_clients_exhaust_file_descriptors,
];

/// What a Kubernetes probe waits (`timeoutSeconds: 2` in deploy/kubernetes).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const PROBER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A TCP connection from `from` to `to`, with an optional small receive buffer (set
/// before connect so the window is small from the start).
fn connect(
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

/// One probe the way a kubelet makes it: a new connection, `GET path`, the whole
/// response within `PROBE_TIMEOUT` of the start. Returns the status code.
fn probe(from: Ipv4Addr, addr: SocketAddr, path: &str) -> Result<u16, String> {
    let started = Instant::now();
    let deadline = started + PROBE_TIMEOUT;
    let mut s = connect(from, addr, None, PROBE_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
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

/// True when a new connection to `addr` echoes a few bytes within 2 s.
fn echoes(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
        return false;
    };
    let mut b = [0u8; 4];
    s.set_read_timeout(Some(PROBE_TIMEOUT)).is_ok()
        && s.write_all(b"back").is_ok()
        && s.read_exact(&mut b).is_ok()
        && &b == b"back"
}

/// What the other side did to a connection, seen without blocking or consuming data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Open,
    /// A clean close (FIN): reads return 0.
    Eof,
    /// A reset or another error (reported once, then reads return 0).
    Reset,
}

fn peer_state(s: &TcpStream) -> Peer {
    let _ = s.set_nonblocking(true);
    match s.peek(&mut [0u8; 1]) {
        Ok(0) => Peer::Eof,
        Ok(_) => Peer::Open,
        Err(e) if e.kind() == ErrorKind::WouldBlock => Peer::Open,
        Err(_) => Peer::Reset,
    }
}

/// True when the connection is closed from the other side (EOF or reset).
fn closed_by_peer(s: &TcpStream) -> bool {
    peer_state(s) != Peer::Open
}

/// How many of `peers` the daemon still holds a socket for on `local_port` (a socket
/// with an owner, inode ≠ 0, in /proc/net/tcp). A socket the daemon closed is gone, or
/// an orphan with inode 0 that only the kernel keeps.
fn held_by_daemon(local_port: u16, peers: &[SocketAddr]) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    // /proc/net/tcp writes an IPv4 address as the u32 in host (little-endian) order.
    let hex = |addr: &SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let peers: Vec<String> = peers.iter().map(hex).collect();
    let local_suffix = format!(":{local_port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9
                && f[1].ends_with(&local_suffix)
                && peers.iter().any(|p| p == f[2])
                && f[9] != "0"
        })
        .count()
}

/// Keeps `count` slowloris connections open from `sources` (taken in turn) until `stop`: half send a
/// partial request head and add a header line every second, half connect and say
/// nothing. A connection the daemon closes is replaced (at most 64 per 250 ms round),
/// as a real attacker would. Returns how many connections it made.
fn slowloris(
    addr: SocketAddr,
    sources: Vec<Ipv4Addr>,
    count: usize,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> JoinHandle<usize> {
    std::thread::spawn(move || {
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
                    if let Ok(mut s) = connect(
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
            std::thread::sleep(Duration::from_millis(250));
        }
        made
    })
}

/// A client that pipelines `GET /metrics` and never reads: writes until the daemon
/// stops taking requests (its responses fill the socket buffers) or 256 KiB are sent.
fn slow_reader(addr: SocketAddr) -> TcpStream {
    let mut s = connect(ATTACKER, addr, Some(4096), PROBE_TIMEOUT).expect("slow reader connects");
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
                if stalled.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(200) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
    s
}

fn probes_answer_while_one_address_attacks_the_http_port() {
    let daemon = Daemon::start("");
    let http = daemon.http;
    // Slow readers first: on a server without per-address limits they take every slot.
    let slow_readers: Vec<TcpStream> = (0..64).map(|_| slow_reader(http)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let attack = slowloris(
        http,
        vec![ATTACKER],
        256,
        Arc::clone(&stop),
        Duration::from_secs(40),
    );
    let attacked = Instant::now();

    // 120 probes, one every 100 ms, from another address.
    let probes = 120;
    let mut failures = Vec::new();
    let mut latencies = Vec::new();
    let readers: Vec<SocketAddr> = slow_readers
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect();
    let mut released_after = None;
    for i in 0..probes {
        // More than 1 % failed: the verdict is in, stop early.
        if failures.len() * 100 > probes {
            break;
        }
        let t = Instant::now();
        match probe(PROBER, http, "/healthz") {
            Ok(200) => latencies.push(t.elapsed()),
            Ok(code) => failures.push(format!("probe {i}: status {code}")),
            Err(e) => failures.push(format!("probe {i}: {e}")),
        }
        if released_after.is_none() && held_by_daemon(http.port(), &readers) == 0 {
            released_after = Some(attacked.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let probing = attacked.elapsed();
    latencies.sort();
    let slowest = &latencies[latencies.len().saturating_sub(3)..];
    let median = latencies.get(latencies.len() / 2);

    // The daemon lets go of every slow reader within a bound, while the attack goes
    // on: the write timeout after its responses stopped draining.
    let deadline = attacked + Duration::from_secs(20);
    let mut held = held_by_daemon(http.port(), &readers);
    while held > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        held = held_by_daemon(http.port(), &readers);
    }
    let released_after = released_after.unwrap_or_else(|| attacked.elapsed());
    stop.store(true, Ordering::Relaxed);
    let made = attack.join().expect("attack thread");
    eprintln!(
        "{probes} probes in {probing:?}: {} failed {failures:?}, median {median:?}, slowest {slowest:?}; \
         slowloris connections made {made}; the daemon holds {held} of 64 slow readers \
         {released_after:?} after the attack began",
        failures.len(),
    );
    assert!(
        failures.len() * 100 <= probes,
        "{} of {probes} probes failed (need ≥ 99 % within {PROBE_TIMEOUT:?}): {failures:#?}",
        failures.len()
    );
    assert_eq!(
        held, 0,
        "slow readers still held 20 s after the attack began"
    );
    drop(slow_readers);
    assert_eq!(probe(PROBER, http, "/readyz"), Ok(200));
}

/// Runs `count` probes of `/healthz`, one every 100 ms, from `PROBER`; stops early once
/// more than 1 % failed. Returns the failures and the successful latencies, sorted.
fn probe_series(http: SocketAddr, count: usize) -> (Vec<String>, Vec<Duration>) {
    let mut failures = Vec::new();
    let mut latencies = Vec::new();
    for i in 0..count {
        if failures.len() * 100 > count {
            break;
        }
        let t = Instant::now();
        match probe(PROBER, http, "/healthz") {
            Ok(200) => latencies.push(t.elapsed()),
            Ok(code) => failures.push(format!("probe {i}: status {code}")),
            Err(e) => failures.push(format!("probe {i}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    latencies.sort();
    (failures, latencies)
}

/// Many addresses, each within its share, together fill the connection table with
/// connections that never send a request: a probe takes the place of the oldest.
fn probes_answer_while_many_addresses_fill_the_table() {
    let daemon = Daemon::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let sources: Vec<Ipv4Addr> = (10..26)
        .map(|last| Ipv4Addr::new(127, 0, 0, last))
        .collect();
    let attack = slowloris(
        daemon.http,
        sources,
        128,
        Arc::clone(&stop),
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(500));
    let probes = 60;
    let (failures, latencies) = probe_series(daemon.http, probes);
    stop.store(true, Ordering::Relaxed);
    let made = attack.join().expect("attack thread");
    eprintln!(
        "{probes} probes against slowloris from 16 addresses: {} failed {failures:?}, \
         median {:?}, slowest {:?}; attack connections made {made}",
        failures.len(),
        latencies.get(latencies.len() / 2),
        latencies.last()
    );
    assert!(
        failures.len() * 100 <= probes,
        "{} of {probes} probes failed: {failures:#?}",
        failures.len()
    );
}

fn probes_answer_while_echo_clients_exhaust_file_descriptors() {
    let daemon = Daemon::start_with(Options {
        max_open_files: Some(64),
        ..Options::default()
    });
    // Three times more clients than descriptors: the kernel completes every handshake.
    let opened = Instant::now();
    // Each sends at once, as clients do: one shed with unread input must still see EOF.
    let clients: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut c = TcpStream::connect(daemon.tcp).expect("connect");
            c.write_all(b"ping").expect("send");
            c
        })
        .collect();
    // Every client is served or closed promptly — none waits unseen in the queue. A
    // client's fate is recorded when first seen (a reset is reported only once).
    let mut fate: Vec<Option<Peer>> = vec![None; clients.len()];
    let deadline = opened + Duration::from_secs(3);
    loop {
        for (c, fate) in clients.iter().zip(&mut fate) {
            let now = peer_state(c);
            if fate.is_none() && now != Peer::Open {
                *fate = Some(now);
            }
        }
        let closed = fate.iter().filter(|f| f.is_some()).count();
        if closed >= 200 - 64 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Those still open must have echoed, or do so within 3 s.
    let mut served = vec![false; clients.len()];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let mut waiting = 0;
        for ((c, fate), served) in clients.iter().zip(&mut fate).zip(&mut served) {
            if fate.is_some() || *served {
                continue;
            }
            match c.peek(&mut [0u8; 4]) {
                Ok(4) => *served = true,
                Ok(0) => *fate = Some(Peer::Eof),
                Err(e) if e.kind() != ErrorKind::WouldBlock => *fate = Some(Peer::Reset),
                _ => waiting += 1,
            }
        }
        if waiting == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let reset = fate.iter().filter(|f| **f == Some(Peer::Reset)).count();
    let closed = fate.iter().filter(|f| f.is_some()).count();
    let served = served.iter().filter(|s| **s).count();
    let hanging = clients.len() - closed - served;
    eprintln!(
        "200 clients under RLIMIT_NOFILE=64: {served} served, {closed} closed ({reset} of \
         them reset), {hanging} hanging, sorted out in {:?}",
        opened.elapsed()
    );
    assert_eq!(hanging, 0, "clients left waiting in the accept queue");
    assert!(served >= 16, "only {served} clients served");
    assert_eq!(reset, 0, "closed clients were reset instead of seeing EOF");

    // Descriptors are still exhausted (the served clients hold them): probes answer.
    let mut answered = Vec::new();
    for path in ["/healthz", "/metrics"] {
        for _ in 0..5 {
            let t = Instant::now();
            let result = probe(crate::support::LOCAL, daemon.http, path);
            answered.push((path, result.clone(), t.elapsed()));
        }
    }
    eprintln!("probes while out of descriptors: {answered:?}");
    assert!(
        answered.iter().all(|(_, r, _)| *r == Ok(200)),
        "probes failed while descriptors were exhausted: {answered:#?}"
    );
    // The operator sees what happens, in the same scrape.
    let (_, exposition) = crate::support::http_get(daemon.http, "/metrics").expect("scrape");
    let fd_limit = crate::support::metric_value(
        &exposition,
        "echod_tcp_accept_errors_total",
        &[("kind", "fd_limit")],
    );
    let open_fds = crate::support::metric_value(&exposition, "process_open_fds", &[]);
    eprintln!("while exhausted: fd_limit errors {fd_limit}, process_open_fds {open_fds}");
    assert!(
        (159.0..=200.0).contains(&fd_limit),
        "each shed client counted once: {fd_limit}"
    );
    // Out of descriptors and idle: no core spins on accept (100 ticks = 1 core-second).
    let ticks = crate::support::cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = crate::support::cpu_ticks(daemon.pid()) - ticks;
    eprintln!("CPU while exhausted and idle: {ticks} ticks in 1 s");
    assert!(ticks < 10, "{ticks} ticks in 1 s while out of descriptors");
    drop(clients);
    // And the echo port recovers once the clients leave.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !echoes(daemon.tcp) {
        assert!(Instant::now() < deadline, "echo never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
}
