//! Restarts and upgrades under traffic, against the Debian package under a real systemd
//! (booted in systemd-nspawn, see `systemd.rs`): clients on port 7 must never see a
//! connection refused, reset or short of an echo while echod restarts, is killed by the
//! watchdog, crashes, or is upgraded by `dpkg -i`.
//!
//! Listening sockets live in systemd's descriptor store, so attempts made while no echod
//! runs wait in the kernel's accept queue and are echoed once it is back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::{
    Chatter, StalledClient, metric_at, random_bytes, try_connect_from, wait_for, wait_until,
};
use crate::systemd::{NEEDS, Nspawn, build_deb, echo_addr, metrics_addr, rootfs, wait_metric};

crate::support::tests![
    restart_watchdog_and_crash_refuse_no_connection needs NEEDS,
    package_upgrade_hands_over_every_connection needs NEEDS,
];

/// The tests that boot the package share the host's port 7 (and 9107): one at a time.
pub(crate) fn port_7() -> MutexGuard<'static, ()> {
    static PORT_7: Mutex<()> = Mutex::new(());
    PORT_7.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ports the packaged config serves must be free on the host.
pub(crate) fn assert_ports_free() {
    assert!(
        TcpStream::connect(crate::systemd::ECHO).is_err() && UdpSocket::bind("0.0.0.0:7").is_ok(),
        "port 7 is already in use on this machine"
    );
    assert!(
        TcpStream::connect(crate::systemd::METRICS).is_err(),
        "port 9107 is already in use"
    );
}

/// How one connection attempt of a [`ConnectLoop`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Connected, echoed byte for byte, closed cleanly by echod after our FIN.
    Echoed,
    /// The connection was refused (nothing listened).
    Refused,
    /// Reset, or closed before the echo was complete.
    Reset(String),
    /// The echo differed from what was sent.
    Mismatch,
    /// Anything else (a timeout).
    Failed(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    started: Instant,
    took: Duration,
    outcome: Outcome,
}

/// One attempt: connect, send a nonce, read it back, half-close, expect a clean EOF.
fn attempt(n: u64) -> Outcome {
    let from = Ipv4Addr::new(127, 0, 1, 1 + (n % 200) as u8);
    let mut s = match try_connect_from(from, echo_addr(), None, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    // Long enough to outlast a watchdog kill and a restart: an attempt made while echod
    // is down waits in the accept queue.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let nonce = random_bytes(32, n);
    let classify = |e: std::io::Error| match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
            Outcome::Reset(e.to_string())
        }
        _ => Outcome::Failed(e.to_string()),
    };
    if let Err(e) = s.write_all(&nonce) {
        return classify(e);
    }
    let mut back = vec![0u8; nonce.len()];
    if let Err(e) = s.read_exact(&mut back) {
        return classify(e);
    }
    if back != nonce {
        return Outcome::Mismatch;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Outcome::Echoed,
        Ok(_) => Outcome::Mismatch,
        Err(e) => classify(e),
    }
}

/// A client that opens a new connection every 10 ms (each in a thread of its own, so a
/// slow one delays no other) and records how each went.
pub(crate) struct ConnectLoop {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<()>>,
}

impl ConnectLoop {
    pub(crate) fn start() -> ConnectLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, paused, in_flight, attempts) = (
                Arc::clone(&stop),
                Arc::clone(&paused),
                Arc::clone(&in_flight),
                Arc::clone(&attempts),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if paused.load(Ordering::SeqCst) {
                        // Until unparked by `between_attempts` or `finish`.
                        std::thread::park();
                        continue;
                    }
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let (in_flight, attempts) = (Arc::clone(&in_flight), Arc::clone(&attempts));
                    n += 1;
                    let id = n;
                    std::thread::spawn(move || {
                        let started = Instant::now();
                        let outcome = attempt(id);
                        attempts.lock().unwrap().push(Attempt {
                            started,
                            took: started.elapsed(),
                            outcome,
                        });
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    });
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        ConnectLoop {
            stop,
            paused,
            in_flight,
            attempts,
            thread: Some(thread),
        }
    }

    fn wait_idle(&self, limit: Duration) {
        wait_until(
            limit,
            || {
                format!(
                    "{} connection attempts still open after {limit:?}",
                    self.in_flight.load(Ordering::SeqCst)
                )
            },
            || self.in_flight.load(Ordering::SeqCst) == 0,
        );
    }

    /// Resumes the loop after a pause.
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Runs `f` between attempts: none is open while it runs. (A connection echod had
    /// accepted when it froze or was killed dies with it, like any open connection; the
    /// promise is about attempts made while it is down.)
    pub(crate) fn between_attempts<T>(&self, f: impl FnOnce() -> T) -> T {
        self.paused.store(true, Ordering::SeqCst);
        self.wait_idle(Duration::from_secs(10));
        let result = f();
        self.resume();
        result
    }

    /// Attempts so far.
    pub(crate) fn count(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    /// Waits (30 s at most) until `more` attempts have ended past the ones so far: the
    /// service has gone on answering (each is checked at [`ConnectLoop::finish`]).
    pub(crate) fn wait_more(&self, more: usize) {
        let want = self.count() + more;
        wait_until(
            Duration::from_secs(30),
            || format!("{} of {want} connection attempts ended", self.count()),
            || self.count() >= want,
        );
    }

    /// Stops, waits for every open attempt (60 s at most) and returns them all.
    pub(crate) fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        self.resume();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.wait_idle(Duration::from_secs(90));
        std::mem::take(&mut *self.attempts.lock().unwrap())
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.resume();
    }
}

/// Every attempt echoed; returns how many there were and how many began in `outages`
/// (each from its start to the moment echod was serving again), and the longest wait.
pub(crate) fn all_echoed(
    attempts: &[Attempt],
    outages: &[(Instant, Instant)],
) -> (usize, usize, Duration) {
    let bad: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.outcome != Outcome::Echoed)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} connection attempts failed, e.g. {:?}",
        bad.len(),
        attempts.len(),
        &bad[..bad.len().min(5)]
    );
    let during = attempts
        .iter()
        .filter(|a| {
            outages
                .iter()
                .any(|(from, to)| a.started >= *from && a.started < *to)
        })
        .count();
    let longest = attempts.iter().map(|a| a.took).max().unwrap_or_default();
    (attempts.len(), during, longest)
}

/// Waits until echod.service is active again under a PID other than `old`, and answers.
pub(crate) fn wait_restarted(c: &Nspawn, old: &str, restarts: u32) -> String {
    wait_for(
        Duration::from_secs(60),
        || "echod to be back",
        || {
            let now = c.show("echod", "MainPID,NRestarts,ActiveState,SubState");
            (now["ActiveState"] == "active"
                && now["SubState"] == "running"
                && now["MainPID"] != old
                && now["MainPID"] != "0"
                && now["NRestarts"] == restarts.to_string())
            .then(|| now["MainPID"].clone())
        },
    )
}

fn restart_watchdog_and_crash_refuse_no_connection() {
    let _port_7 = port_7();
    assert_ports_free();
    let pkg = tempfile::tempdir().unwrap();
    build_deb(pkg.path());
    let c = Nspawn::boot(&rootfs(), pkg.path());
    c.ok("dpkg -i /mnt/pkg/echod.deb");
    // A short watchdog, so that a frozen echod is killed within seconds.
    c.ok("mkdir -p /etc/systemd/system/echod.service.d && \
          printf '[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/echod.service.d/watchdog.conf && \
          systemctl daemon-reload && systemctl restart echod");
    assert_eq!(c.prop("echod", "FileDescriptorStoreMax"), "64");
    wait_for(
        Duration::from_secs(10),
        || "5 sockets in the store",
        || (c.prop("echod", "NFileDescriptorStore") == "5").then_some(()),
    );
    // A reload that drops listeners takes them out of the store; one that adds them
    // back puts them in again.
    let packaged = c.ok("cat /etc/echod/echod.toml");
    let both = r#"listen = ["0.0.0.0:7", "[::]:7"]"#;
    assert_eq!(packaged.matches(both).count(), 2, "{packaged}");
    c.write_file(
        "/etc/echod/echod.toml",
        &packaged.replace(both, r#"listen = ["0.0.0.0:7"]"#),
    );
    c.ok("systemctl reload echod");
    wait_for(
        Duration::from_secs(10),
        || "3 sockets in the store",
        || (c.prop("echod", "NFileDescriptorStore") == "3").then_some(()),
    );
    c.write_file("/etc/echod/echod.toml", &packaged);
    c.ok("systemctl reload echod");
    wait_for(
        Duration::from_secs(10),
        || "5 sockets in the store again",
        || (c.prop("echod", "NFileDescriptorStore") == "5").then_some(()),
    );
    let pid = c.prop("echod", "MainPID");
    let connects = ConnectLoop::start();
    connects.wait_more(50);

    // systemctl restart: the old echod drains, the new one takes the stored sockets.
    let from = Instant::now();
    c.ok("systemctl restart echod");
    let pid = wait_restarted(&c, &pid, 0);
    let restart = (from, Instant::now());
    assert!(
        c.ok("journalctl -u echod --no-pager")
            .contains("using socket kept in systemd's descriptor store name=echod-tcp-0.0.0.0-7")
    );
    connects.wait_more(50);

    // The watchdog: echod frozen (SIGSTOP) is killed (SIGABRT) and restarted.
    let frozen = connects.between_attempts(|| {
        c.ok(&format!("kill -STOP {pid}"));
        Instant::now()
    });
    let during_freeze = connects.count();
    let pid = wait_restarted(&c, &pid, 1);
    let watchdog = (frozen, Instant::now());
    assert!(
        connects.count() > during_freeze,
        "no attempt finished after the watchdog restart"
    );
    assert_eq!(c.prop("echod", "NFileDescriptorStore"), "5");
    connects.wait_more(50);

    // A crash (SIGKILL), restarted by Restart=on-failure after RestartSec=1s; a datagram
    // sent meanwhile waits in the UDP socket and is echoed too.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let killed = connects.between_attempts(|| {
        c.ok(&format!("kill -KILL {pid}"));
        Instant::now()
    });
    udp.send_to(b"sent while echod was down", echo_addr())
        .unwrap();
    let _pid = wait_restarted(&c, &pid, 2);
    let crash = (killed, Instant::now());
    let mut buf = [0u8; 64];
    let n = udp
        .recv(&mut buf)
        .expect("the datagram sent during the crash is echoed");
    assert_eq!(&buf[..n], b"sent while echod was down");
    connects.wait_more(50);

    let attempts = connects.finish();
    let (total, during, longest) = all_echoed(&attempts, &[restart, watchdog, crash]);
    assert!(during > 0, "no attempt was made while echod was down");
    let journal = c.ok("journalctl -u echod --no-pager");
    assert!(journal.contains("Watchdog timeout"), "{journal}");

    // A plain stop empties the store: port 7 refuses again.
    c.ok("systemctl stop echod");
    assert_eq!(c.prop("echod", "NFileDescriptorStore"), "0");
    match TcpStream::connect(crate::systemd::ECHO) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        Ok(_) => panic!("port 7 still accepts after a plain stop"),
    }
    drop(c);
    eprintln!(
        "restart/watchdog/crash: {total} attempts, {during} made while echod was down, all echoed; \
         outages {:?} / {:?} / {:?}; longest attempt {longest:?}",
        restart.1 - restart.0,
        watchdog.1 - watchdog.0,
        crash.1 - crash.0,
    );
}

/// The same version string with its last number one higher, of the same length (so a
/// binary can be patched in place): 0.1.0 → 0.1.1.
fn bumped(version: &str) -> String {
    let (head, last) = version.rsplit_once('.').expect("a dotted version");
    let next = format!("{head}.{}", last.parse::<u64>().expect("numeric") + 1);
    assert_eq!(next.len(), version.len(), "cannot bump {version} in place");
    next
}

/// A package of the same code under a higher version: the binary `cargo test` built,
/// with its version string patched (same length, so nothing else moves), packaged by
/// cargo-deb with `--deb-version`. Returns the .deb (moved into `pkg_dir`) and the
/// version the new binary reports.
pub(crate) fn build_upgrade_deb(pkg_dir: &Path) -> (PathBuf, String) {
    let old = env!("CARGO_PKG_VERSION");
    let new = bumped(old);
    let binary = std::fs::read(crate::support::echod_bin()).unwrap();
    let mut patched = Vec::with_capacity(binary.len());
    let (mut rest, mut replaced) = (&binary[..], 0);
    while let Some(at) = rest.windows(old.len()).position(|w| w == old.as_bytes()) {
        patched.extend_from_slice(&rest[..at]);
        patched.extend_from_slice(new.as_bytes());
        rest = &rest[at + old.len()..];
        replaced += 1;
    }
    patched.extend_from_slice(rest);
    assert!(replaced > 0, "version {old} not found in the binary");
    let target = tempfile::tempdir().unwrap();
    std::fs::create_dir(target.path().join("debug")).unwrap();
    let bin = target.path().join("debug/echod");
    std::fs::write(&bin, patched).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let version = format!("{new}-1");
    crate::systemd::cargo_deb(target.path(), out_dir.path(), &["--deb-version", &version]);
    let deb = pkg_dir.join("echod-upgrade.deb");
    std::fs::copy(
        out_dir.path().join(format!("echod_{new}-1_amd64.deb")),
        &deb,
    )
    .expect("the upgrade .deb was built");
    (deb, new)
}

/// How many clients keep a connection open and ping-pong on it during the upgrade.
const CLIENTS: usize = 200;

/// What one ping-pong client saw.
struct PingPongResult {
    /// (when the round started, its round trip).
    rounds: Vec<(Instant, Duration)>,
    error: Option<String>,
}

/// `CLIENTS` connections, each sending 1–1024 random bytes and reading them back every
/// 20 ms, verifying every byte, until stopped; then each half-closes and expects a clean
/// close.
struct PingPong {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<PingPongResult>>,
}

impl PingPong {
    fn start() -> PingPong {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let from = Ipv4Addr::new(127, 0, 2, 1 + (i % 200) as u8);
                let s = try_connect_from(from, echo_addr(), None, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("client {i}: connect: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                std::thread::spawn(move || ping_pong(i as u64, s, &stop))
            })
            .collect();
        PingPong { stop, threads }
    }

    fn finish(self) -> Vec<PingPongResult> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect()
    }
}

fn ping_pong(seed: u64, mut s: TcpStream, stop: &AtomicBool) -> PingPongResult {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut result = PingPongResult {
        rounds: Vec::new(),
        error: None,
    };
    let mut back = vec![0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        let data = random_bytes(rng.usize(1..=1024), rng.u64(..));
        let started = Instant::now();
        let round = s
            .write_all(&data)
            .and_then(|()| s.read_exact(&mut back[..data.len()]));
        if let Err(e) = round {
            result.error = Some(format!("round {}: {e}", result.rounds.len()));
            return result;
        }
        if back[..data.len()] != data[..] {
            result.error = Some(format!("round {}: echo differs", result.rounds.len()));
            return result;
        }
        result.rounds.push((started, started.elapsed()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => {}
        Ok(n) => result.error = Some(format!("{n} bytes after the last round")),
        Err(e) => result.error = Some(format!("close: {e}")),
    }
    result
}

/// p50, p99 and max of the round trips started within `[from, to)`, and how many.
fn percentiles(
    rounds: &[(Instant, Duration)],
    from: Instant,
    to: Instant,
) -> (Duration, Duration, Duration, usize) {
    let mut rtts: Vec<Duration> = rounds
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, d)| *d)
        .collect();
    assert!(!rtts.is_empty(), "no round between the marks");
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), *rtts.last().unwrap(), rtts.len())
}

/// From the journal (`-o json`, wall-clock microseconds): when the old image logged that
/// it began handing over, as an instant of this test (the container shares the host's
/// clock). journald stamps lines as it reads them, so this is a few milliseconds late
/// at worst.
fn handover_began(c: &Nspawn) -> Instant {
    let (now_wall, now) = (std::time::SystemTime::now(), Instant::now());
    let journal = c.ok("journalctl -u echod -o json --no-pager");
    let micros: u64 = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("handing over to the new binary"))
        })
        .and_then(|e| e["__REALTIME_TIMESTAMP"].as_str()?.parse().ok())
        .expect("a handover in the journal");
    let wall = std::time::UNIX_EPOCH + Duration::from_micros(micros);
    now - now_wall.duration_since(wall).expect("a time in the past")
}

/// The value of `key=` in the first journal line that contains `line`.
fn journal_number(journal: &str, line: &str, key: &str) -> u64 {
    let l = journal
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no {line:?} in the journal:\n{journal}"));
    l.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {l:?}"))
}

/// `Some` when the packaged service's metrics say it runs `version` (`echod_build_info`).
pub(crate) fn build_info(version: &str) -> Option<()> {
    let body = crate::support::http_get(metrics_addr(), "/metrics")
        .ok()
        .filter(|(status, _)| *status == 200)?
        .1;
    body.lines()
        .any(|l| {
            l.starts_with("echod_build_info{") && l.contains(&format!("version=\"{version}\""))
        })
        .then_some(())
}

/// `dpkg -i` of a newer package while 200 clients ping-pong on open connections, one
/// stopped reading with its buffers full, and another client connects every 10 ms: prerm
/// stops nothing, postinst reloads, echod checks the new binary and becomes it in place
/// with every connection. Nothing is closed, reset, refused or garbled; the PID stays;
/// the metrics show the new version. Then a broken binary is refused.
fn package_upgrade_hands_over_every_connection() {
    let _port_7 = port_7();
    assert_ports_free();
    let pkg = tempfile::tempdir().unwrap();
    build_deb(pkg.path());
    let (_, new_version) = build_upgrade_deb(pkg.path());
    let c = Nspawn::boot(&rootfs(), pkg.path());
    c.ok("dpkg -i /mnt/pkg/echod.deb");
    let before = c.show("echod", "MainPID,NRestarts");

    let clients = PingPong::start();
    let mut stalled = StalledClient::start(echo_addr(), 99);
    let connects = ConnectLoop::start();
    wait_metric("echod_tcp_connections_active", (CLIENTS + 1) as f64);
    std::thread::sleep(Duration::from_secs(3));

    let dpkg_started = Instant::now();
    let dpkg = c.ok("dpkg -i /mnt/pkg/echod-upgrade.deb 2>&1");
    let dpkg_done = Instant::now();
    wait_for(
        Duration::from_secs(20),
        || "the new version to serve",
        || build_info(&new_version),
    );
    let serving_new = Instant::now();
    std::thread::sleep(Duration::from_secs(2));

    // Same process, no restart, the new package, the new binary (the old one deleted).
    let after = c.show("echod", "MainPID,NRestarts,ActiveState,SubState");
    assert_eq!(after["MainPID"], before["MainPID"], "MainPID changed");
    assert_eq!(after["NRestarts"], before["NRestarts"]);
    assert_eq!(
        (after["ActiveState"].as_str(), after["SubState"].as_str()),
        ("active", "running")
    );
    assert_eq!(
        c.ok("dpkg-query -W -f='${Version}' echod"),
        format!("{new_version}-1")
    );
    assert_eq!(
        c.ok(&format!("readlink /proc/{}/exe", after["MainPID"]))
            .trim(),
        "/usr/bin/echod"
    );
    let journal = c.ok("journalctl -u echod --no-pager");
    let handed = journal_number(&journal, "executing the new binary", "connections");
    assert!(
        handed > CLIENTS as u64,
        "{handed} connections handed over:\n{journal}"
    );
    assert!(journal_number(&journal, "executing the new binary", "pending_bytes") > 0);
    let paused_ms = journal_number(&journal, "executing the new binary", "paused_ms");
    let began = handover_began(&c);
    // echod's own measure: from the old image's listeners stopping to the new image's
    // READY=1.
    let paused_us = journal_number(&journal, "upgrade complete", "paused_us");
    // The held connections (the connect loop may add one of its own).
    let active = metric_at(metrics_addr(), "echod_tcp_connections_active", &[]).unwrap_or_default();
    assert!(
        active >= (CLIENTS + 1) as f64,
        "{active} connections active"
    );
    // The client that stopped reading is still held to one buffer.
    let sent_before = stalled.sent();
    let more = stalled.more_taken(Duration::from_millis(300));
    assert!(
        more <= 64 * 1024,
        "the stalled connection took {more} more bytes after the handover"
    );

    // A broken binary in place of the new one: `systemctl reload` fails (ExecReload's
    // check), a SIGHUP is refused by echod itself; the running image keeps serving.
    c.ok("ln /usr/bin/echod /usr/bin/echod.good && \
          printf '#!/bin/sh\necho not an echod >&2\nexit 1\n' > /usr/bin/echod.broken && \
          chmod 755 /usr/bin/echod.broken && mv /usr/bin/echod.broken /usr/bin/echod");
    let (reloaded, output) = c.sh("systemctl reload echod");
    assert!(
        !reloaded,
        "systemctl reload succeeded with a broken binary:\n{output}"
    );
    c.ok("systemctl kill -s HUP --kill-who=main echod");
    wait_metric("echod_config_reload_failures_total", 1.0);
    let status = c.ok("systemctl status echod --no-pager");
    assert!(
        status.contains("last reload FAILED: new binary refused")
            && status.contains("not an echod"),
        "{status}"
    );
    assert_eq!(c.prop("echod", "MainPID"), before["MainPID"]);
    assert!(build_info(&new_version).is_some());
    c.ok("mv /usr/bin/echod.good /usr/bin/echod");
    connects.wait_more(50);

    let results = clients.finish();
    let attempts = connects.finish();
    stalled.finish();
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.error.as_ref().map(|e| format!("client {i}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} clients failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let (total, during, longest) = all_echoed(&attempts, &[(dpkg_started, serving_new)]);
    assert!(during > 0);
    let rounds: Vec<(Instant, Duration)> = results
        .iter()
        .flat_map(|r| r.rounds.iter().copied())
        .collect();

    // The same under socket activation: echod.socket holds port 7, and an upgrade (here
    // back to the first package, which dpkg runs the same way) stops neither unit.
    c.ok("systemctl disable --now echod.service && systemctl enable --now echod.socket");
    let chatter = Chatter::start(echo_addr());
    wait_for(
        Duration::from_secs(10),
        || "echod started by its socket",
        || (c.prop("echod", "SubState") == "running").then_some(()),
    );
    let activated_pid = c.prop("echod", "MainPID");
    c.ok("dpkg -i /mnt/pkg/echod.deb");
    let old_version = env!("CARGO_PKG_VERSION");
    wait_for(
        Duration::from_secs(20),
        || "the first version to serve again",
        || build_info(old_version),
    );
    chatter.still_echoing();
    assert_eq!(c.prop("echod", "MainPID"), activated_pid);
    assert_eq!(c.sh("systemctl is-active echod.socket").1.trim(), "active");
    assert!(chatter.finish() > 0);

    let steady = percentiles(&rounds, dpkg_started - Duration::from_secs(3), dpkg_started);
    let whole = percentiles(&rounds, dpkg_started, serving_new);
    // The second around the handover.
    let around = percentiles(
        &rounds,
        began - Duration::from_millis(500),
        began + Duration::from_millis(500),
    );
    drop(c);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let row = |(p50, p99, max, n): (Duration, Duration, Duration, usize)| {
        format!(
            "p50 {} p99 {} max {} ({n} rounds)",
            ms(p50),
            ms(p99),
            ms(max)
        )
    };
    eprintln!(
        "package upgrade with {CLIENTS} ping-pong clients, a stalled one and a 10 ms connect loop: \
         0 closed, 0 reset, 0 refused, 0 mismatched; {} rounds; {handed} connections handed over; \
         echod stopped accepting {paused_ms} ms before the exec and the new image was ready {} after \
         it stopped; dpkg -i took {}, the new version served after {}.\n\
         round trips: steady (3 s before) {}\n             during dpkg -i {}\n             \
         handover ± 0.5 s {}\n\
         connect loop: {total} attempts, {during} during the upgrade, longest {}; \
         stalled client: {sent_before} bytes in flight, {more} more taken after the handover.\n{dpkg}",
        rounds.len(),
        ms(Duration::from_micros(paused_us)),
        ms(dpkg_done - dpkg_started),
        ms(serving_new - dpkg_started),
        row(steady),
        row(whole),
        row(around),
        ms(longest),
    );
}
