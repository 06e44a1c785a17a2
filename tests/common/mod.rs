//! Shared helpers for the black-box tests: start the real `echod` binary on its own
//! loopback ports, talk to it, read its metrics, and always clean it up.
#![allow(dead_code)]

pub mod deploy;
pub mod prom;
pub mod systemd;
pub mod tools;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn echod_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_echod"))
}

/// A port free for both TCP and UDP on 127.0.0.1 (and ::1 when asked). Ports come from
/// a per-process range below the ephemeral range, so clients' ephemeral ports and
/// parallel tests do not collide with them.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// True when end-to-end tests that need an installed tool must run; with
/// `ECHOD_REQUIRE_E2E=1` (set by `.ci/run`) a missing tool is a failure, otherwise the
/// test is skipped with a note so `cargo test` works on a bare developer machine.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("ECHOD_REQUIRE_E2E").is_ok_and(|v| v == "1") {
        panic!("{tool} is required (ECHOD_REQUIRE_E2E=1) but not installed");
    }
    eprintln!("SKIPPED: {tool} not installed (set ECHOD_REQUIRE_E2E=1 to make this fatal)");
    false
}

/// Deep-merges `extra` into `base` (tables merge, other values replace).
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// A running daemon started by a test; killed (by PID) when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// The TCP echo address (127.0.0.1).
    pub tcp: SocketAddr,
    /// The UDP echo address (127.0.0.1).
    pub udp: SocketAddr,
    /// The HTTP endpoint.
    pub http: SocketAddr,
    /// Holds the config file and the log.
    pub dir: tempfile::TempDir,
    /// The config file the daemon reads.
    pub config_path: PathBuf,
    log_path: PathBuf,
}

/// Options for [`Daemon::start_with`].
#[derive(Default)]
pub struct Options<'a> {
    /// TOML merged over the test's base config (own ports, short drain).
    pub toml: &'a str,
    /// Extra environment variables.
    pub env: Vec<(&'a str, String)>,
    /// Do not wait for readiness (for tests of start-up failures).
    pub no_wait: bool,
    /// RLIMIT_NOFILE for the daemon (fd-exhaustion tests).
    pub max_open_files: Option<u64>,
}

impl Daemon {
    /// Starts echod with `extra` TOML merged over a base config on fresh ports.
    pub fn start(extra: &str) -> Daemon {
        Self::start_with(Options {
            toml: extra,
            ..Options::default()
        })
    }

    /// Starts echod with full options.
    pub fn start_with(opts: Options<'_>) -> Daemon {
        let port = free_port();
        let http_port = free_port();
        let tcp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
        let mut config: toml::Table = format!(
            r#"
            [tcp]
            listen = ["{tcp}"]
            [udp]
            listen = ["{tcp}"]
            [metrics]
            listen = ["{http}"]
            [shutdown]
            drain_timeout = "10s"
            [log]
            level = "info"
            "#
        )
        .parse()
        .unwrap();
        let extra: toml::Table = opts.toml.parse().expect("test TOML parses");
        merge(&mut config, extra);
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("echod.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let log_path = dir.path().join("echod.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(echod_bin());
        cmd.arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(limit) = opts.max_open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child yet.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start echod");
        let daemon = Daemon {
            child: Some(child),
            tcp,
            udp: tcp,
            http,
            dir,
            config_path,
            log_path,
        };
        if !opts.no_wait {
            daemon.wait_ready();
        }
        daemon
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until `/readyz` answers 200 (10 s at most).
    pub fn wait_ready(&self) {
        if !wait_http_ok(self.http, "/readyz", Duration::from_secs(10)) {
            panic!("echod did not become ready; log:\n{}", self.log());
        }
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on the PID of a child we started and have not reaped.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the daemon to exit (panics after `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("echod did not exit within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The Prometheus exposition.
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(self.http, "/metrics").expect("scrape");
        assert_eq!(status, 200);
        body
    }

    /// The value of one series, e.g. `echod_tcp_connections_accepted_total{listener="…"}`;
    /// sums every series of the family whose labels include the given ones.
    pub fn metric(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.scrape(), family, labels)
    }

    /// Waits (5 s at most) until a counter reaches `want`, then asserts it is exactly
    /// `want`: counts are flushed per burst, so they may lag the traffic briefly.
    pub fn wait_metric(&self, family: &str, labels: &[(&str, &str)], want: f64) {
        self.wait_metric_at_least(family, labels, want);
        assert_eq!(self.metric(family, labels), want, "{family}{labels:?}");
    }

    /// Waits (10 s at most) until a counter reaches at least `want`.
    pub fn wait_metric_at_least(&self, family: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric(family, labels) < want {
            assert!(
                Instant::now() < deadline,
                "{family}{labels:?} never reached {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A connection that has echoed one byte, so the daemon has surely accepted it.
    pub fn open_connection(&self) -> TcpStream {
        let mut s = TcpStream::connect(self.tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo of one byte");
        s
    }

    /// Rewrites the config file (for reload tests).
    pub fn rewrite_config(&self, extra: &str) {
        let mut config: toml::Table = std::fs::read_to_string(&self.config_path)
            .unwrap()
            .parse()
            .unwrap();
        merge(&mut config, extra.parse().expect("test TOML parses"));
        std::fs::write(&self.config_path, toml::to_string(&config).unwrap()).unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time (user + system) the process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sums the samples of `family` whose labels include every pair in `labels`.
pub fn metric_value(exposition: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if name != family {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A minimal HTTP/1.1 GET (tests avoid depending on an HTTP client crate).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A minimal HTTP/1.1 request with `Connection: close`.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_exchange(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// Sends a raw HTTP request and reads the status and body until the server closes.
pub fn http_exchange(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Random bytes from a seeded generator, so a failure can be replayed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
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

/// Waits until `GET path` on `addr` answers 200; false when `limit` passes first.
pub fn wait_http_ok(addr: SocketAddr, path: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if http_get(addr, path).is_ok_and(|(status, _)| status == 200) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
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

/// Path helper for fixtures under `tests/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(rel)
}
