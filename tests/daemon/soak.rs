//! The soak: the network attacks of the `hostile_*` modules at once — connection floods
//! beyond the limits, slowloris and slow readers on the HTTP port, clients that never
//! read, a UDP flood, spoofed echo loops — and a reload storm, against one echod with the
//! shipped configuration (connection limits lowered so a few hundred connections cross
//! them), while verified clients keep echoing. It holds when the verified TCP
//! clients got back every byte they sent, the UDP client got no wrong byte (a datagram
//! may be lost under a flood; lost ones are counted apart), `/healthz` and `/readyz`
//! answered ≥ 99 % of probes within the 2 s a Kubernetes probe waits, echod's memory and
//! descriptors stayed flat, every counter agrees with what the clients saw, and SIGTERM
//! still drains and exits 0.
//!
//! The attack runs for `ECHOD_SOAK_SECS` seconds (default 90, so the test takes about
//! two minutes in CI); longer on demand, e.g.
//! `ECHOD_SOAK_SECS=3600 cargo test --test daemon -- soak`. Everything stays on
//! loopback: each kind of client binds its own 127.0.0.x address (spoofed datagrams come
//! from 127.0.0.0/8 too), every loop is bounded in count and time and stops by itself,
//! and both daemons are the test's children, killed by PID if it fails.
//!
//! Spoofing needs raw sockets (root), which CI has.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
    Daemon, LOCAL, PROBE_TIMEOUT, RAW_SOCKETS, closed_by_peer, echod_bin, http_get, metric_value,
    poll, probe, raise_open_files_limit, random_bytes, slow_reader, slowloris, spoof,
    try_connect_from, v4, write_until_stalled,
};

crate::support::tests![
    verified_clients_lose_nothing_while_every_attack_runs_at_once needs &[RAW_SOCKETS],
];

/// Liveness and readiness probes, and the end of the drain.
const PROBER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Slowloris and slow readers on the HTTP port.
const HTTP_ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// The verified UDP client: a source of its own, so its token bucket is its own.
const UDP_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// The UDP flood from many source ports.
const UDP_FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
/// The second echo server, which a spoofed datagram makes echod talk to.
const OTHER_ECHO: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Another host's echod on echod's own port (spoofed: nothing listens there).
const SAME_PORT_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
/// Clients that send until stalled and never read.
const NON_READER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);
/// The connection flood: this many addresses from 127.0.0.10 on.
const FLOOD_SOURCES: u8 = 5;
/// Connections each flood address opens per wave: more than either configuration's
/// per-address limit, and together more than the global one.
const FLOOD_PER_SOURCE: usize = 60;
/// Verified TCP connections (from 127.0.0.1), held for the whole soak.
const VERIFIED_TCP: usize = 4;
/// Non-reading connections open at once.
const NON_READERS: usize = 8;

/// The limits echod starts with, and those of the other valid configuration of the
/// reload storm: `tcp.max_connections`, `tcp.max_connections_per_ip`, `tcp.buffer_size`
/// and `udp.rate_limit.burst`. The flood may hold 200 − 12 and 160 − 12 connections
/// besides the verified and non-reading ones, less than 5 × 48 and 5 × 40, so every
/// wave crosses both the per-address and the global limit.
const LIMITS: [(u32, u32, u32, u32); 2] = [(200, 48, 16_384, 2000), (160, 40, 8192, 1000)];

/// `LIMITS[i]` as TOML.
fn limits(i: usize) -> String {
    let (max, per_ip, buffer, burst) = LIMITS[i];
    format!(
        "[tcp]\nmax_connections = {max}\nmax_connections_per_ip = {per_ip}\n\
         buffer_size = {buffer}\n[udp.rate_limit]\nburst = {burst}\n"
    )
}

/// The shipped `shutdown.drain_timeout`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Refused by a reload: a syntax error, and a value out of range.
const BROKEN: [&str; 2] = ["[tcp\nlisten = oops\n", "[tcp]\nmax_connections = 0\n"];

/// The second echo server answers little (10/s, burst 20): what ends the loop a spoofed
/// datagram starts between it and echod, since nothing tells either that the other's
/// port is an echo server.
const OTHER_RATE: f64 = 10.0;
const OTHER_BURST: f64 = 20.0;

/// Growth of echod's resident memory allowed between the end of the warm-up and the end
/// of the soak. Everything echod holds is bounded and reached during the warm-up (every
/// flood wave fills the connection table, the spoofed sources cycle through the same
/// 16 384 entries of the UDP rate table), so growth beyond allocator noise (~0.2 MiB
/// measured) is a leak: 16 MiB is about 1 KiB for each echo connection a 90 s soak makes
/// (~13 500), and four times what a full connection table holds in echo buffers
/// (200 × 16 KiB).
const RSS_GROWTH: u64 = 16 << 20;
/// Descriptors echod may hold beyond its count before the attack, once the attackers
/// are gone: an HTTP connection just closing, a `/proc` file a scrape has open.
const FD_SLACK: usize = 2;

fn soak_secs() -> u64 {
    match std::env::var("ECHOD_SOAK_SECS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|s| *s >= 20)
            .unwrap_or_else(|| panic!("ECHOD_SOAK_SECS={v:?}: want whole seconds, at least 20")),
        Err(_) => 90,
    }
}

/// True while a loop may go on: not told to stop, and before its hard deadline.
fn running(stop: &AtomicBool, deadline: Instant) -> bool {
    !stop.load(Ordering::Relaxed) && Instant::now() < deadline
}

/// Sleeps `d`, in steps, returning early once `stop` is set.
fn pause(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(
            Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
        );
    }
}

/// Runs `round` every `period` (after it ends) while [`running`].
fn repeat(stop: &AtomicBool, deadline: Instant, period: Duration, mut round: impl FnMut()) {
    while running(stop, deadline) {
        round();
        pause(stop, period);
    }
}

/// Sets its flags when dropped, so a failing test stops every thread at once.
struct StopOnDrop<'a>(Vec<&'a AtomicBool>);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for flag in &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// echod's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    crate::support::rss_kib(pid) * 1024
}

/// echod's open descriptors.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("process descriptors")
        .count()
}

/// Datagrams the kernel dropped because the UDP socket bound to `addr` was full.
fn udp_kernel_drops(addr: SocketAddrV4) -> u64 {
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(addr.ip().octets()),
        addr.port()
    );
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&local.as_str()))
        .and_then(|f| f.last()?.parse().ok())
        .unwrap_or(0)
}

/// The whole exposition, or `None` when this scrape failed (retried by the caller).
fn scrape(daemon: &Daemon) -> Option<String> {
    match http_get(daemon.http, "/metrics") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// One verified TCP client: ping-pong of random sizes (1 B – 64 KiB, mostly small,
/// written in up to three pieces), every byte compared. While the attack runs it
/// reconnects every 3–7 s, so its connections are accepted under both configurations
/// of the reload storm, and retries while a limit refuses it.
#[derive(Default)]
struct VerifiedTcp {
    rounds: AtomicU64,
    bytes: AtomicU64,
    /// How its connection attempts ended.
    fates: Mutex<Fates>,
    /// The first thing that went wrong; the client stops there.
    error: Mutex<Option<String>>,
}

impl VerifiedTcp {
    /// Echoes until `finish`, reconnecting until `attack_over`; each connection ends
    /// with a half-close and EOF straight away (the echo of its last round was read in
    /// full). Returns the first thing that went wrong.
    fn echo(
        &self,
        addr: SocketAddr,
        seed: u64,
        attack_over: &AtomicBool,
        finish: &AtomicBool,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut s = self.admitted(addr, deadline)?;
        let mut reconnect_at = Instant::now() + Duration::from_millis(rng.u64(3000..7000));
        let mut got = vec![0u8; 1 << 16];
        while running(finish, deadline) {
            if !attack_over.load(Ordering::Relaxed) && Instant::now() > reconnect_at {
                close(s, &mut got)?;
                s = self.admitted(addr, deadline)?;
                reconnect_at = Instant::now() + Duration::from_millis(rng.u64(3000..7000));
            }
            let len = match rng.u8(0..10) {
                0..=4 => rng.usize(1..=1024),
                5..=8 => rng.usize(1025..=16 * 1024),
                _ => rng.usize(16 * 1024 + 1..=64 * 1024),
            };
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            let (first, rest) = data.split_at(rng.usize(0..=len));
            let (second, third) = rest.split_at(rng.usize(0..=rest.len()));
            let round = self.rounds.load(Ordering::Relaxed);
            for piece in [first, second, third] {
                s.write_all(piece)
                    .map_err(|e| format!("round {round}: write: {e}"))?;
            }
            s.read_exact(&mut got[..len])
                .map_err(|e| format!("round {round}: read {len} bytes: {e}"))?;
            if got[..len] != data[..] {
                let at = (0..len).find(|&i| got[i] != data[i]).unwrap_or(len);
                return Err(format!("round {round}: echo differs at byte {at} of {len}"));
            }
            self.bytes.fetch_add(len as u64, Ordering::Relaxed);
            self.rounds.fetch_add(1, Ordering::Relaxed);
            // A few MB/s per connection: continuous, but leaving the shared cores to
            // the attack and to the tests running beside this one.
            std::thread::sleep(Duration::from_millis(rng.u64(2..8)));
        }
        close(s, &mut got)
    }

    /// A connection echod admitted: its first byte came back. Refused attempts (a flood
    /// holds the table) are retried every 100 ms; every attempt is counted.
    fn admitted(&self, addr: SocketAddr, deadline: Instant) -> Result<TcpStream, String> {
        loop {
            let mut s = try_connect_from(LOCAL, addr, None, PROBE_TIMEOUT)
                .map_err(|e| format!("connect: {e}"))?;
            s.write_all(b"x").map_err(|e| format!("first byte: {e}"))?;
            let by = Instant::now() + Duration::from_secs(10);
            if self.fates.lock().unwrap().settle(&mut s, by) {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("never admitted: {:?}", self.fates.lock().unwrap()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (10 s at most) until `more` rounds past `from` came back.
    fn wait_rounds(&self, from: u64, more: u64) -> bool {
        let done = poll(Duration::from_secs(10), || {
            if self.error.lock().unwrap().is_some() {
                return Some(false);
            }
            (self.rounds.load(Ordering::Relaxed) >= from + more).then_some(true)
        });
        done == Some(true)
    }
}

/// Half-closes a verified connection whose echoes were all read: EOF must follow at once.
fn close(mut s: TcpStream, buf: &mut [u8]) -> Result<(), String> {
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    match s.read(buf) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes more than was sent came back")),
        Err(e) => Err(format!("no clean EOF after the half-close: {e}")),
    }
}

/// What the verified UDP client saw.
#[derive(Debug, Default)]
struct UdpTally {
    sent: u64,
    /// Answered within 250 ms.
    answered: u64,
    /// Answered after the client had given up and moved on.
    late: u64,
    bytes: u64,
    /// Replies that were not exactly a request sent (or came twice).
    wrong: u64,
    first_wrong: Option<String>,
}

/// A UDP request: its number, its length, then random bytes derived from both.
fn udp_request(seq: u64, len: usize) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(12 + len);
    datagram.extend_from_slice(&seq.to_be_bytes());
    datagram.extend_from_slice(&(len as u32).to_be_bytes());
    datagram.extend_from_slice(&random_bytes(len, seq ^ 0x5eed));
    datagram
}

/// The request a reply echoes, if it is exactly one that was sent (numbered below
/// `sent`).
fn udp_reply_seq(reply: &[u8], sent: u64) -> Option<u64> {
    let seq = u64::from_be_bytes(reply.get(..8)?.try_into().ok()?);
    let len = u32::from_be_bytes(reply.get(8..12)?.try_into().ok()?) as usize;
    (seq < sent && reply == udp_request(seq, len).as_slice()).then_some(seq)
}

/// Request and response over UDP, ≤ 500 a second (under the rate limit), each reply
/// compared byte for byte.
fn verified_udp(target: SocketAddr, stop: &AtomicBool, deadline: Instant) -> UdpTally {
    let socket = UdpSocket::bind((UDP_CLIENT, 0)).expect("bind the UDP client");
    socket
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(862);
    let mut tally = UdpTally::default();
    let mut answered: Vec<bool> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while running(stop, deadline) {
        let seq = tally.sent;
        let request = udp_request(seq, rng.usize(0..=4096));
        socket.send_to(&request, target).expect("send to echod");
        tally.sent += 1;
        answered.push(false);
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_millis(250) {
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("UDP client: {e}"),
            };
            match udp_reply_seq(&buf[..n], tally.sent) {
                Some(s) if !answered[s as usize] => {
                    answered[s as usize] = true;
                    tally.bytes += n as u64;
                    if s == seq {
                        tally.answered += 1;
                        break;
                    }
                    tally.late += 1;
                }
                _ => {
                    tally.wrong += 1;
                    tally
                        .first_wrong
                        .get_or_insert_with(|| format!("after request {seq}: {n} bytes"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    tally
}

/// How connection attempts to the echo port ended, as the clients saw them.
#[derive(Debug, Default, Clone, Copy)]
struct Fates {
    /// The byte sent came back: echod admitted it.
    admitted: u64,
    /// EOF without an echo: refused by a limit, cleanly.
    refused: u64,
    /// A reset, another error or a wrong byte instead of the echo or EOF.
    reset: u64,
    /// Neither echo nor close in time (10 s).
    hung: u64,
    /// The handshake itself failed (never reached echod).
    connect_failed: u64,
}

impl Fates {
    /// Records whether echod echoes the byte the client sent, or closes, by `by`;
    /// true when it echoed (admitted the connection).
    fn settle(&mut self, s: &mut TcpStream, by: Instant) -> bool {
        let left = by.saturating_duration_since(Instant::now());
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) if b == *b"x" => {
                self.admitted += 1;
                return true;
            }
            Ok(0) => self.refused += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                self.hung += 1
            }
            _ => self.reset += 1,
        }
        false
    }

    fn add(&mut self, other: Fates) {
        self.admitted += other.admitted;
        self.refused += other.refused;
        self.reset += other.reset;
        self.hung += other.hung;
        self.connect_failed += other.connect_failed;
    }
}

/// Waves of connections from `FLOOD_SOURCES` addresses, each opening `FLOOD_PER_SOURCE`
/// and sending a byte at once: admitted ones are held 1 s, then all close; 1 s pause.
fn tcp_flood(addr: SocketAddr, stop: &AtomicBool, deadline: Instant) -> (Fates, u64) {
    let mut fates = Fates::default();
    let mut waves = 0;
    repeat(stop, deadline, Duration::from_secs(1), || {
        let started = Instant::now();
        let mut wave = Vec::new();
        for source in 0..FLOOD_SOURCES {
            let from = Ipv4Addr::new(127, 0, 0, 10 + source);
            for _ in 0..FLOOD_PER_SOURCE {
                match try_connect_from(from, addr, None, PROBE_TIMEOUT) {
                    Ok(mut s) => {
                        let _ = s.write_all(b"x");
                        wave.push(s);
                    }
                    Err(_) => fates.connect_failed += 1,
                }
            }
        }
        for s in &mut wave {
            fates.settle(s, started + Duration::from_secs(10));
        }
        waves += 1;
        pause(stop, Duration::from_secs(1));
    });
    (fates, waves)
}

/// `NON_READERS` connections at a time that send until their writes stall and never
/// read (echod stops reading once about 1 MB sits in its socket; the rest waits in the
/// client's); each is replaced after 4 s. Returns the fates and the bytes written.
fn non_readers(addr: SocketAddr, stop: &AtomicBool, deadline: Instant) -> (Fates, u64) {
    let mut fates = Fates::default();
    let mut written = 0u64;
    let mut slots: Vec<Option<(TcpStream, Instant)>> = (0..NON_READERS).map(|_| None).collect();
    repeat(stop, deadline, Duration::from_millis(100), || {
        for slot in &mut slots {
            if slot
                .as_ref()
                .is_some_and(|(_, opened)| opened.elapsed() > Duration::from_secs(4))
            {
                *slot = None;
            }
            if slot.is_some() || !running(stop, deadline) {
                continue;
            }
            let Ok(mut s) = try_connect_from(NON_READER, addr, Some(64 * 1024), PROBE_TIMEOUT)
            else {
                fates.connect_failed += 1;
                continue;
            };
            let _ = s.write_all(b"x");
            if fates.settle(&mut s, Instant::now() + Duration::from_secs(10)) {
                let n = write_until_stalled(&mut s, 8 << 20, Duration::from_millis(300));
                written += n.unwrap_or(0) as u64;
                *slot = Some((s, Instant::now()));
            }
        }
    });
    (fates, written)
}

/// Up to 8 clients from `HTTP_ATTACKER` that pipeline requests and never read their
/// responses; one echod has closed is replaced, and each is given up after 12 s.
/// Returns how many were made.
fn slow_readers(http: SocketAddr, stop: &AtomicBool, deadline: Instant) -> u64 {
    let mut readers: Vec<(TcpStream, Instant)> = Vec::new();
    let mut made = 0;
    repeat(stop, deadline, Duration::from_millis(500), || {
        readers
            .retain(|(r, opened)| !closed_by_peer(r) && opened.elapsed() < Duration::from_secs(12));
        while readers.len() < 8 && running(stop, deadline) {
            readers.push((slow_reader(HTTP_ATTACKER, http), Instant::now()));
            made += 1;
        }
    });
    made
}

/// The UDP attack's volumes.
#[derive(Debug, Default)]
struct UdpAttack {
    /// Sent from 64 ports of `UDP_FLOODER`, 100 every 20 ms round (~4 500 a second).
    flood: u64,
    /// Spoofed from 16 384 addresses of 127.1.0.0/16, 100 every fifth round (~900 a
    /// second).
    spoofed_sources: u64,
    /// Spoofed from echod's own address and port, and from its port on another host:
    /// each must be dropped as `denied_port`.
    denied: u64,
    /// Spoofed from the other echo server to echod: each starts a loop.
    loops: u64,
}

/// Floods echod's UDP port and spoofs echo-loop datagrams (every 2 s), until `stop`.
fn udp_attack(
    target: SocketAddr,
    other: SocketAddr,
    stop: &AtomicBool,
    deadline: Instant,
) -> UdpAttack {
    let sockets: Vec<UdpSocket> = (0..64)
        .map(|_| UdpSocket::bind((UDP_FLOODER, 0)).expect("bind a flood socket"))
        .collect();
    let own = v4(target);
    let mut rng = fastrand::Rng::with_seed(7);
    let payload = random_bytes(1400, 7);
    let mut attack = UdpAttack::default();
    let mut tick = 0u64;
    repeat(stop, deadline, Duration::from_millis(20), || {
        for socket in sockets.iter().cycle().take(100) {
            if socket
                .send_to(&payload[..rng.usize(1..=1400)], target)
                .is_ok()
            {
                attack.flood += 1;
            }
        }
        if tick.is_multiple_of(5) {
            for _ in 0..100 {
                let n = (attack.spoofed_sources % 16_384) as u16;
                let [hi, lo] = n.to_be_bytes();
                let mut port = rng.u16(20_000..60_000);
                if port == own.port() {
                    port += 1;
                }
                let src = SocketAddrV4::new(Ipv4Addr::new(127, 1, hi, lo), port);
                spoof(src, own, &payload[..rng.usize(1..=512)]);
                attack.spoofed_sources += 1;
            }
        }
        if tick.is_multiple_of(100) {
            spoof(own, own, b"talk to yourself");
            spoof(
                SocketAddrV4::new(SAME_PORT_HOST, own.port()),
                own,
                b"ping-pong",
            );
            attack.denied += 2;
            spoof(v4(other), own, b"ping-pong across ports");
            attack.loops += 1;
        }
        tick += 1;
    });
    attack
}

/// What the reload storm did.
#[derive(Debug, Default)]
struct Reloads {
    good: u64,
    broken: u64,
    /// Reloads counted in the wrong family, or not counted within 10 s.
    wrong: Vec<String>,
}

/// (successful, failed) reloads echod has counted; `None` when scrapes failed for 5 s.
fn reload_counts(daemon: &Daemon) -> Option<(f64, f64)> {
    poll(Duration::from_secs(5), || {
        let text = scrape(daemon)?;
        Some((
            metric_value(&text, "echod_config_reloads_total", &[]),
            metric_value(&text, "echod_config_reload_failures_total", &[]),
        ))
    })
}

/// Writes `text` as the config file, sends SIGHUP and waits (10 s at most) until echod
/// has counted the reload: as a failure exactly when `broken`, else it is an error.
fn reload_once(daemon: &Daemon, text: &str, broken: bool) -> Result<(), String> {
    std::fs::write(daemon.config_path(), text).expect("write the config file");
    let before = reload_counts(daemon).ok_or("no scrape before the reload")?;
    daemon.signal(libc::SIGHUP);
    let after = poll(Duration::from_secs(10), || {
        reload_counts(daemon).filter(|&after| after != before)
    })
    .unwrap_or(before);
    let want = if broken {
        (before.0, before.1 + 1.0)
    } else {
        (before.0 + 1.0, before.1)
    };
    if after == want {
        Ok(())
    } else {
        Err(format!("counted (ok, failed) = {after:?}, want {want:?}"))
    }
}

/// SIGHUP about four times a second, alternating the two valid configurations, every
/// fifth time a broken one; each reload is waited for and must be counted as the
/// success or failure it is. Ends with the first valid configuration.
fn reload_storm(daemon: &Daemon, good: [&str; 2], stop: &AtomicBool, deadline: Instant) -> Reloads {
    let mut reloads = Reloads::default();
    let mut reload = |n: u64, broken: bool| {
        let text = match (broken, n % 2) {
            (true, i) => BROKEN[i as usize],
            (false, i) => good[i as usize],
        };
        if let Err(e) = reload_once(daemon, text, broken) {
            reloads
                .wrong
                .push(format!("reload {n} (broken: {broken}): {e}"));
        }
        if broken {
            reloads.broken += 1;
        } else {
            reloads.good += 1;
        }
    };
    let mut n = 0;
    repeat(stop, deadline, Duration::from_millis(200), || {
        reload(n, n % 5 == 4);
        n += 1;
    });
    reload(0, false);
    reloads
}

/// What the probes saw.
#[derive(Debug, Default)]
struct Probes {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    /// Runs of `echod probe` (HTTP and UDP), how long each took.
    tool_runs: Vec<Duration>,
}

/// `echod probe` with these targets; `Err` with its output when it says unhealthy.
fn run_probe_tool(args: &[String]) -> Result<Duration, String> {
    let started = Instant::now();
    let out = Command::new(echod_bin())
        .arg("probe")
        .args(args)
        .output()
        .expect("run echod probe");
    if out.status.success() {
        Ok(started.elapsed())
    } else {
        Err(format!(
            "echod probe {args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `/healthz` and `/readyz` in turn every 150 ms from `PROBER`, as a kubelet would;
/// every 10 s also `echod probe` on both and on UDP echo.
fn prober(daemon: &Daemon, stop: &AtomicBool, deadline: Instant) -> Probes {
    let mut probes = Probes::default();
    let tool_args: Vec<String> = vec![
        "--http".into(),
        format!("http://{}/healthz", daemon.http),
        "--http".into(),
        format!("http://{}/readyz", daemon.http),
        "--udp".into(),
        daemon.udp.to_string(),
        "--timeout".into(),
        "2s".into(),
    ];
    let mut i = 0u64;
    repeat(stop, deadline, Duration::from_millis(150), || {
        let path = if i.is_multiple_of(2) {
            "/healthz"
        } else {
            "/readyz"
        };
        let started = Instant::now();
        match probe(PROBER, daemon.http, path) {
            Ok(200) => probes.latencies.push(started.elapsed()),
            Ok(code) => probes
                .failures
                .push(format!("probe {i} {path}: status {code}")),
            Err(e) => probes.failures.push(format!("probe {i} {path}: {e}")),
        }
        if i % 66 == 33 {
            match run_probe_tool(&tool_args) {
                Ok(took) => probes.tool_runs.push(took),
                Err(e) => probes.failures.push(e),
            }
        }
        i += 1;
    });
    probes
}

/// One sample of echod's footprint.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss: u64,
    fds: usize,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The attackers' results, once they have stopped.
struct Attack {
    flood: Fates,
    waves: u64,
    non_readers: Fates,
    non_reader_bytes: u64,
    slowloris: usize,
    slow_readers: u64,
    udp: UdpAttack,
    reloads: Reloads,
    probes: Probes,
    /// echod's footprint every second of the attack.
    samples: Vec<Sample>,
    /// CPU echod used during the attack, in clock ticks.
    cpu_ticks: u64,
}

/// Runs every attacker for `secs`, sampling echod's footprint each second, then stops
/// them and returns what they did.
fn attack(
    echod: &Daemon,
    other_udp: SocketAddr,
    configs: [&str; 2],
    stop: &Arc<AtomicBool>,
    secs: u64,
    limit: Instant,
) -> Attack {
    let pid = echod.pid();
    let ticks = crate::support::cpu_ticks(pid);
    let loris = slowloris(
        echod.http,
        vec![HTTP_ATTACKER],
        32,
        Arc::clone(stop),
        Duration::from_secs(secs + 60),
    );
    std::thread::scope(|scope| {
        let _stop_all = StopOnDrop(vec![&**stop]);
        let stop: &AtomicBool = stop;
        let flood = scope.spawn(move || tcp_flood(echod.tcp, stop, limit));
        let non_readers = scope.spawn(move || non_readers(echod.tcp, stop, limit));
        let slow = scope.spawn(move || slow_readers(echod.http, stop, limit));
        let udp = scope.spawn(move || udp_attack(echod.udp, other_udp, stop, limit));
        let reloads = scope.spawn(move || reload_storm(echod, configs, stop, limit));
        let probes = scope.spawn(move || prober(echod, stop, limit));
        let started = Instant::now();
        let mut samples = Vec::new();
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_secs(1));
            samples.push(Sample {
                at: started.elapsed(),
                rss: rss(pid),
                fds: fds(pid),
            });
        }
        stop.store(true, Ordering::Relaxed);
        let (flood, waves) = flood.join().expect("flood");
        let (non_readers, non_reader_bytes) = non_readers.join().expect("non-readers");
        Attack {
            flood,
            waves,
            non_readers,
            non_reader_bytes,
            slowloris: loris.join().expect("slowloris"),
            slow_readers: slow.join().expect("slow readers"),
            udp: udp.join().expect("UDP attack"),
            reloads: reloads.join().expect("reload storm"),
            probes: probes.join().expect("prober"),
            samples,
            cpu_ticks: crate::support::cpu_ticks(pid) - ticks,
        }
    })
}

/// Waits (30 s at most) until echod holds no more descriptors than `most` and only the
/// verified connections, and the loop between the echo servers has died (the other
/// server's echo count unchanged for 1 s). Returns echod's footprint then.
fn settle(echod: &Daemon, other: &Daemon, most: usize) -> Sample {
    let started = Instant::now();
    let pid = echod.pid();
    let deadline = started + Duration::from_secs(30);
    poll(Duration::from_secs(30), || {
        (fds(pid) <= most
            && echod.metric("echod_tcp_connections_active", &[]) == VERIFIED_TCP as f64)
            .then_some(())
    });
    let sent = || other.metric("echod_udp_sent_datagrams_total", &[]);
    let (mut last, mut changed) = (sent(), Instant::now());
    poll(deadline.saturating_duration_since(Instant::now()), || {
        if sent() != last {
            (last, changed) = (sent(), Instant::now());
        }
        (changed.elapsed() >= Duration::from_secs(1)).then_some(())
    });
    Sample {
        at: started.elapsed(),
        rss: rss(pid),
        fds: fds(pid),
    }
}

/// What the verified clients and the stop saw.
struct Ending {
    udp: UdpTally,
    attack: Attack,
    baseline: Sample,
    settled: Sample,
    /// The exposition once the attackers had gone.
    scrape: String,
    /// `echod probe` with the daemon's own configuration (`/readyz` and TCP echo).
    final_probe: Result<Duration, String>,
    /// Every verified connection echoed 3 more rounds after SIGTERM.
    echoed_while_draining: bool,
    /// `/readyz` while draining.
    readyz_draining: Result<u16, String>,
    sigterm_at: Instant,
}

fn verified_clients_lose_nothing_while_every_attack_runs_at_once() {
    let secs = soak_secs();
    let started = Instant::now();
    raise_open_files_limit(1024);
    let mut echod = Daemon::start(&format!(
        "{}[shutdown]\ndrain_timeout = \"{}s\"\n",
        limits(0),
        DRAIN_TIMEOUT.as_secs()
    ));
    let other = Daemon::start(&format!(
        "[udp]\nlisten = [\"{}\"]\n\
         [udp.rate_limit]\npackets_per_second = {OTHER_RATE}\nburst = {OTHER_BURST}\n",
        SocketAddr::from((OTHER_ECHO, 0))
    ));
    let other_udp = other.udp;
    let other_started = Instant::now();
    // The two valid configurations of the reload storm, as complete files.
    echod.rewrite_config(&limits(1));
    let config_b = std::fs::read_to_string(echod.config_path()).unwrap();
    echod.rewrite_config(&limits(0));
    let config_a = std::fs::read_to_string(echod.config_path()).unwrap();
    let pid = echod.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let finish = AtomicBool::new(false);
    let limit = started + Duration::from_secs(secs + 120);
    let verified: Vec<VerifiedTcp> = (0..VERIFIED_TCP).map(|_| VerifiedTcp::default()).collect();
    let ending = std::thread::scope(|scope| {
        let _stop_all = StopOnDrop(vec![&*stop, &finish]);
        let (echod, finish, attacked): (_, _, &AtomicBool) = (&echod, &finish, &stop);
        let clients: Vec<_> = verified
            .iter()
            .enumerate()
            .map(|(i, v)| {
                scope.spawn(move || {
                    let result = v.echo(echod.tcp, 1000 + i as u64, attacked, finish, limit);
                    *v.error.lock().unwrap() = result.err();
                })
            })
            .collect();
        let udp_client = scope.spawn(move || verified_udp(echod.udp, attacked, limit));
        for v in &verified {
            assert!(
                v.wait_rounds(0, 3),
                "a verified client did not start: {:?}",
                v.error
            );
        }
        let baseline = Sample {
            at: started.elapsed(),
            rss: rss(pid),
            fds: fds(pid),
        };
        let attack = attack(echod, other_udp, [&config_a, &config_b], &stop, secs, limit);
        let udp = udp_client.join().expect("verified UDP client");
        let settled = settle(echod, &other, baseline.fds + FD_SLACK);
        let scrape = echod.scrape();
        let final_probe = run_probe_tool(&[
            "--config".to_string(),
            echod.served_config().display().to_string(),
        ]);

        // Stop: the verified connections are served through the drain, then finish.
        let rounds: Vec<u64> = verified
            .iter()
            .map(|v| v.rounds.load(Ordering::Relaxed))
            .collect();
        let sigterm_at = Instant::now();
        echod.signal(libc::SIGTERM);
        let echoed_while_draining = verified
            .iter()
            .zip(&rounds)
            .all(|(v, r)| v.wait_rounds(*r, 3));
        let readyz_draining = probe(PROBER, echod.http, "/readyz");
        finish.store(true, Ordering::Relaxed);
        for client in clients {
            client.join().expect("verified TCP client");
        }
        Ending {
            udp,
            attack,
            baseline,
            settled,
            scrape,
            final_probe,
            echoed_while_draining,
            readyz_draining,
            sigterm_at,
        }
    });
    let status = echod.wait_exit(DRAIN_TIMEOUT + Duration::from_secs(5));
    let stopped_in = ending.sigterm_at.elapsed();
    report_and_check(&echod, &other, other_started, &verified, &ending, started);
    eprintln!(
        "echod exited ({status}) {stopped_in:?} after SIGTERM; the soak took {:?}",
        started.elapsed()
    );
    assert!(
        status.success() && stopped_in < DRAIN_TIMEOUT,
        "echod exited with {status:?} {stopped_in:?} after SIGTERM"
    );
    let log = echod.log();
    let summary = log.lines().find(|l| l.contains("shutdown complete"));
    assert!(
        summary.is_some_and(|l| l.contains(&format!("drained={VERIFIED_TCP} cut=0"))),
        "the verified connections were not drained: {summary:?}"
    );
}

/// The part of the attack after which echod's footprint must stay flat: by then every
/// attacker has run several rounds (a flood wave takes ~2 s).
fn warm_up(secs: u64) -> Duration {
    Duration::from_secs((secs / 6).clamp(10, 30))
}

/// The `q` quantile of sorted `latencies`.
fn quantile(latencies: &[Duration], q: f64) -> Duration {
    latencies
        .get(((latencies.len().saturating_sub(1)) as f64 * q) as usize)
        .copied()
        .unwrap_or_default()
}

/// Prints every figure of the soak, then checks them.
fn report_and_check(
    echod: &Daemon,
    other: &Daemon,
    other_started: Instant,
    verified: &[VerifiedTcp],
    ending: &Ending,
    started: Instant,
) {
    let Ending {
        udp,
        attack,
        baseline,
        settled,
        scrape,
        ..
    } = ending;
    let secs = soak_secs();
    let metric = |family: &str, labels: &[(&str, &str)]| metric_value(scrape, family, labels);
    let rejected = |reason: &str| {
        metric(
            "echod_tcp_connections_rejected_total",
            &[("reason", reason)],
        )
    };
    let dropped = |reason: &str| metric("echod_udp_dropped_datagrams_total", &[("reason", reason)]);

    // Verified clients.
    let tcp_bytes: u64 = verified
        .iter()
        .map(|v| v.bytes.load(Ordering::Relaxed))
        .sum();
    let tcp_rounds: u64 = verified
        .iter()
        .map(|v| v.rounds.load(Ordering::Relaxed))
        .sum();
    let tcp_errors: Vec<String> = verified
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            Some(format!(
                "connection {i}: {}",
                v.error.lock().unwrap().clone()?
            ))
        })
        .collect();
    eprintln!(
        "soak of {secs} s (ECHOD_SOAK_SECS), {:?} in all so far\n\
         verified TCP: {VERIFIED_TCP} clients, {tcp_rounds} round trips, {tcp_bytes} bytes \
         sent and compared, errors {tcp_errors:?}\n\
         verified UDP: {udp:?}",
        started.elapsed()
    );

    // The attack.
    let mut verified_fates = Fates::default();
    for v in verified {
        verified_fates.add(*v.fates.lock().unwrap());
    }
    let mut flood = attack.flood;
    flood.add(attack.non_readers);
    flood.add(verified_fates);
    let refused_seen = flood.refused;
    let admitted_seen = flood.admitted;
    let other_sent = other.metric("echod_udp_sent_datagrams_total", &[]);
    let other_received = other.metric("echod_udp_received_datagrams_total", &[]);
    let kernel_drops = udp_kernel_drops(v4(echod.udp));
    eprintln!(
        "verified TCP connection attempts: {verified_fates:?}\n\
         TCP flood: {} waves from {FLOOD_SOURCES} addresses × {FLOOD_PER_SOURCE}: {:?}\n\
         non-readers: {:?}, {} bytes sent and never read back\n\
         HTTP: {} slowloris connections, {} slow readers from {HTTP_ATTACKER}\n\
         UDP: {:?}; the other echo server sent {other_sent} and received {other_received}; \
         kernel dropped {kernel_drops} datagrams at echod's socket\n\
         reloads: {} valid, {} broken, miscounted {:?}",
        attack.waves,
        attack.flood,
        attack.non_readers,
        attack.non_reader_bytes,
        attack.slowloris,
        attack.slow_readers,
        attack.udp,
        attack.reloads.good,
        attack.reloads.broken,
        attack.reloads.wrong,
    );
    eprintln!(
        "echod counted: rejected global_limit {}, per_ip_limit {}, shutdown {}; accepted {}; \
         accept errors {}; UDP dropped rate_limited {}, denied_port {}, send_error {}; \
         reloads {} ok, {} failed; CPU {} ticks in {secs} s",
        rejected("global_limit"),
        rejected("per_ip_limit"),
        rejected("shutdown"),
        metric("echod_tcp_connections_accepted_total", &[]),
        metric("echod_tcp_accept_errors_total", &[]),
        dropped("rate_limited"),
        dropped("denied_port"),
        dropped("send_error"),
        metric("echod_config_reloads_total", &[]),
        metric("echod_config_reload_failures_total", &[]),
        attack.cpu_ticks,
    );

    // Probes.
    let probes = &attack.probes;
    let mut latencies = probes.latencies.clone();
    latencies.sort();
    let total_probes = latencies.len() + probes.failures.len();
    eprintln!(
        "probes: {total_probes} (/healthz and /readyz, {} of them `echod probe`), {} failed \
         {:?}; latency p50 {:?}, p99 {:?}, max {:?}; `echod probe` slowest {:?}; \
         after the attack: {:?}; /readyz while draining: {:?}",
        probes.tool_runs.len(),
        probes.failures.len(),
        probes.failures,
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last(),
        probes.tool_runs.iter().max(),
        ending.final_probe,
        ending.readyz_draining,
    );

    // Footprint.
    let warm = attack
        .samples
        .iter()
        .find(|s| s.at >= warm_up(secs))
        .copied()
        .expect("a sample after the warm-up");
    let end = *attack.samples.last().expect("samples");
    let peak = attack.samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let most_fds = attack.samples.iter().map(|s| s.fds).max().unwrap_or(0);
    eprintln!(
        "echod RSS: {:.1} MiB before the attack, {:.1} MiB after the {:?} warm-up, peak {:.1} MiB, \
         {:.1} MiB at the end of the attack, {:.1} MiB once it was over; descriptors: {} \
         before, {} after the warm-up, at most {most_fds}, {} at the end, {} once over \
         (settled in {:?})",
        mib(baseline.rss),
        mib(warm.rss),
        warm_up(secs),
        mib(peak),
        mib(end.rss),
        mib(settled.rss),
        baseline.fds,
        warm.fds,
        end.fds,
        settled.fds,
        settled.at,
    );

    // No byte lost or corrupted.
    assert!(
        tcp_errors.is_empty(),
        "verified TCP clients failed: {tcp_errors:#?}"
    );
    assert!(
        verified
            .iter()
            .all(|v| v.rounds.load(Ordering::Relaxed) > 0)
    );
    assert!(
        ending.echoed_while_draining,
        "verified connections stopped echoing after SIGTERM"
    );
    assert_eq!(
        udp.wrong, 0,
        "wrong UDP echoes, first {:?}",
        udp.first_wrong
    );
    assert!(
        (udp.answered + udp.late) * 10 >= udp.sent * 9,
        "fewer than 90 % of UDP requests answered: {udp:?}"
    );

    // Refused clients saw EOF, and echod's counts agree with what the clients saw.
    assert!(flood.refused > 0 && flood.admitted > 0, "{flood:?}");
    assert_eq!(
        (flood.reset, flood.hung),
        (0, 0),
        "refused clients must see EOF: {flood:?}"
    );
    assert!(rejected("global_limit") > 0.0 && rejected("per_ip_limit") > 0.0);
    assert_eq!(
        rejected("global_limit") + rejected("per_ip_limit"),
        refused_seen as f64,
        "rejections counted vs refusals seen"
    );
    assert_eq!(rejected("shutdown"), 0.0);
    assert_eq!(
        metric("echod_tcp_connections_accepted_total", &[]),
        admitted_seen as f64,
        "accepted counted vs admissions seen"
    );
    assert_eq!(metric("echod_tcp_accept_errors_total", &[]), 0.0);
    assert_eq!(
        metric("echod_tcp_connections_active", &[]),
        VERIFIED_TCP as f64
    );
    assert!(
        dropped("rate_limited") > 0.0,
        "the UDP flood was never rate-limited"
    );
    let denied = dropped("denied_port");
    let spoofed = attack.udp.denied as f64;
    assert!(
        denied <= spoofed && denied >= spoofed - kernel_drops as f64 && denied > 0.0,
        "denied_port {denied}: {spoofed} spoofed from echo ports, {kernel_drops} dropped by the kernel"
    );
    // The loop across ports: bounded by the other server's rate limit, then dead.
    let bound = OTHER_BURST + OTHER_RATE * (other_started.elapsed().as_secs_f64() + 1.0);
    assert!(
        other_sent <= bound,
        "loop: the other server echoed {other_sent}, bound {bound}"
    );
    assert!(
        other_received <= other_sent + attack.udp.loops as f64,
        "echod answered the other server more than once per datagram: \
         {other_received} received there, {other_sent} sent, {} loops started",
        attack.udp.loops
    );

    // Every reload counted as what it was.
    assert!(
        attack.reloads.wrong.is_empty(),
        "{:#?}",
        attack.reloads.wrong
    );
    assert!(attack.reloads.good > 0 && attack.reloads.broken > 0);
    assert_eq!(
        metric("echod_config_reloads_total", &[]),
        attack.reloads.good as f64
    );
    assert_eq!(
        metric("echod_config_reload_failures_total", &[]),
        attack.reloads.broken as f64
    );
    assert_eq!(metric("echod_config_last_reload_successful", &[]), 1.0);

    // Probes green.
    assert!(
        probes.failures.len() * 100 <= total_probes,
        "{} of {total_probes} probes failed (need ≥ 99 % within {PROBE_TIMEOUT:?}): {:#?}",
        probes.failures.len(),
        probes.failures
    );
    assert!(!probes.tool_runs.is_empty(), "`echod probe` never ran");
    assert!(ending.final_probe.is_ok(), "{:?}", ending.final_probe);
    assert_eq!(ending.readyz_draining, Ok(503), "/readyz while draining");

    // Flat.
    assert!(
        end.rss <= warm.rss + RSS_GROWTH && settled.rss <= warm.rss + RSS_GROWTH,
        "RSS grew from {:.1} MiB after the warm-up to {:.1} MiB, then {:.1} MiB",
        mib(warm.rss),
        mib(end.rss),
        mib(settled.rss)
    );
    assert!(
        settled.fds <= baseline.fds + FD_SLACK,
        "echod holds {} descriptors once the attack is over, {} before",
        settled.fds,
        baseline.fds
    );
    // Nothing went wrong that echod noticed, beyond what the attack provokes.
    let log = echod.log();
    let unexpected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .filter(|l| !EXPECTED_COMPLAINTS.iter().any(|m| l.contains(m)))
        .collect();
    assert!(unexpected.is_empty(), "echod logged: {unexpected:#?}");
}

/// What echod logs (rate-limited) about this attack: refused connections on both ports
/// and the broken configurations.
const EXPECTED_COMPLAINTS: [&str; 4] = [
    "connection rejected",
    "HTTP connection refused",
    // A slowloris connection that has not sent its first byte when its wait for one ends.
    "HTTP connection closed before it sent anything",
    "reload failed; keeping the previous configuration",
];
