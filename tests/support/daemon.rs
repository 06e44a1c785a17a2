//! The real `echod` binary as every test crate starts it: on its own loopback ports with
//! a config merged over a test base, waited for until ready, asked for its metrics, and
//! killed by PID when dropped.
//!
//! Included (by `#[path]`) into the support module of the `tools` crate and, through
//! `e2e.rs`, of the `daemon` and `deployment` crates, so it holds only what each of them
//! uses; the rest lives in `e2e.rs` or in a crate's own `support.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// A child process a test started; killed (by its PID) and reaped when dropped, so a
/// panicking test leaves nothing behind. Once the child has been waited for, the kill is
/// a no-op.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deep-merges `extra` into `base` (tables merge, other values replace).
pub(crate) fn merge(base: &mut toml::Table, extra: toml::Table) {
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
    pub(crate) child: ChildGuard,
    /// The TCP echo address (127.0.0.1).
    pub tcp: SocketAddr,
    /// The UDP echo address (127.0.0.1).
    pub udp: SocketAddr,
    /// The HTTP endpoint.
    pub http: SocketAddr,
    /// Holds the config file and the log.
    dir: tempfile::TempDir,
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
    /// Another echod binary to run (a copy a test replaces to upgrade it).
    pub binary: Option<PathBuf>,
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
        let log = std::fs::File::create(dir.path().join("echod.log")).unwrap();
        let mut cmd = Command::new(opts.binary.clone().unwrap_or_else(echod_bin));
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
        let mut daemon = Daemon {
            child: ChildGuard(spawn_retrying_busy(&mut cmd)),
            tcp,
            udp: tcp,
            http,
            dir,
        };
        if !opts.no_wait {
            daemon.wait_ready();
        }
        daemon
    }

    /// The config file the daemon reads.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("echod.toml")
    }

    /// Waits until `/readyz` answers 200 (10 s at most); fails at once if echod exits.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !http_get(self.http, "/readyz").is_ok_and(|(status, _)| status == 200) {
            let exited = self.child.0.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let config = std::fs::read_to_string(self.config_path()).unwrap_or_default();
                panic!(
                    "echod did not become ready ({}); config:\n{config}\nlog:\n{}",
                    exited.map_or("still running".to_string(), |s| s.to_string()),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("echod.log")).unwrap_or_default()
    }

    /// The Prometheus exposition.
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(self.http, "/metrics").expect("scrape");
        assert_eq!(status, 200);
        body
    }

    /// Waits (10 s at most) until a counter reaches at least `want`; returns its value
    /// then. Counts are flushed per burst, so they may lag the client's view briefly.
    pub fn wait_metric_at_least(&self, family: &str, labels: &[(&str, &str)], want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(family, labels);
            if value >= want {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{family}{labels:?} never reached {want} (at {value})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of one series, e.g. `echod_tcp_connections_accepted_total{listener="…"}`;
    /// sums every series of the family whose labels include the given ones.
    pub fn metric(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.scrape(), family, labels)
    }
}

/// Sums the samples of `family` whose labels include every pair in `labels`; panics
/// naming the series when the exposition has none, so a series that does not exist is
/// never mistaken for one at 0.
pub fn metric_value(exposition: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sample(exposition, family, labels).unwrap_or_else(|| {
        let present: Vec<&str> = exposition
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} "))
            })
            .collect();
        panic!("no series {family}{labels:?} in the exposition; series of {family}: {present:#?}")
    })
}

/// The sum of the samples of `family` whose labels include every pair in `labels`, or
/// `None` when no series matches.
pub fn metric_sample(exposition: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = exposition
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
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
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
    let response = http_raw(addr, request)?;
    let (status, _, body) = split_response(&response)?;
    Ok((status, body.to_string()))
}

/// Sends a raw HTTP request and returns everything the server sent until it closed.
pub fn http_raw(addr: SocketAddr, request: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response)
}

/// A response's status code, its header lines and its body.
pub fn split_response(response: &str) -> std::io::Result<(u16, &str, &str)> {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {response:?}")))?;
    let headers = head.split_once("\r\n").map_or("", |(_, h)| h);
    Ok((status, headers, body))
}

/// Random bytes from a seeded generator, so a failure can be replayed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Spawns `cmd`, retrying briefly while its executable is "busy": a binary a test has
/// just written (an upgrade's copy) can be held open for writing for a moment by a
/// child another test thread forked meanwhile (the fd lives until that child execs).
fn spawn_retrying_busy(cmd: &mut Command) -> Child {
    for _ in 0..100 {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.expect("start echod"),
        }
    }
    cmd.spawn().expect("start echod")
}
