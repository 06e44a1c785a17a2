//! The real `echod` binary as every test crate starts it: on its own loopback ports with
//! a config merged over a test base, waited for until ready, asked for its metrics, and
//! killed by PID when dropped.
//!
//! Included (by `#[path]`) into the support module of the `tools` crate and, through
//! `e2e.rs`, of the `daemon` and `deployment` crates, so it holds only what each of them
//! uses; the rest lives in `e2e.rs` or in a crate's own `support.rs`.

use std::fmt::Display;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn echod_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_echod"))
}

/// Calls `check` until it yields a value and returns it, or `None` once `limit` has
/// passed. The test's one way to wait for an event it can only observe by looking: the
/// first checks come within milliseconds, later ones back off to 50 ms apart.
pub fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// [`poll`], panicking with `what` (evaluated only then) when `limit` passes first.
pub fn wait_for<T, D: Display>(
    limit: Duration,
    what: impl FnOnce() -> D,
    check: impl FnMut() -> Option<T>,
) -> T {
    poll(limit, check).unwrap_or_else(|| panic!("waited {limit:?} in vain: {}", what()))
}

/// Waits until `check` holds, panicking with `what` when `limit` passes first.
pub fn wait_until<D: Display>(
    limit: Duration,
    what: impl FnOnce() -> D,
    mut check: impl FnMut() -> bool,
) {
    wait_for(limit, what, || check().then_some(()))
}

/// The addresses echod serves, as its status line names them: `TCP 127.0.0.1:40123
/// UDP 127.0.0.1:51234 HTTP 127.0.0.1:39999; 0 connections` (in the `echod ready: …`
/// log line of either log format and in sd_notify's `STATUS=`), with ` TLS <addrs>`
/// after the HTTP ones when TLS echo is on. A listener configured on port 0 shows the
/// port the kernel picked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listening {
    pub tcp: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    /// Empty when TLS echo is off (the line has no `TLS` part then).
    pub tls: Vec<SocketAddr>,
}

impl Listening {
    /// Reads the addresses from a status line (anything before `TCP ` is skipped).
    pub fn parse(status: &str) -> Option<Listening> {
        let start = status.find("TCP ")?;
        let listed = status[start..].split(';').next()?;
        let words: Vec<&str> = listed.split_whitespace().collect();
        let (tcp, udp, http, tls) = match words.as_slice() {
            ["TCP", tcp, "UDP", udp, "HTTP", http] => (tcp, udp, http, &"off"),
            ["TCP", tcp, "UDP", udp, "HTTP", http, "TLS", tls] => (tcp, udp, http, tls),
            _ => return None,
        };
        let list = |text: &str| -> Option<Vec<SocketAddr>> {
            if text == "off" {
                return Some(Vec::new());
            }
            text.split(',').map(|a| a.parse().ok()).collect()
        };
        Some(Listening {
            tcp: list(tcp)?,
            udp: list(udp)?,
            http: list(http)?,
            tls: list(tls)?,
        })
    }

    /// The addresses of the first `echod ready: …` line in a log.
    pub fn from_log(log: &str) -> Option<Listening> {
        log.lines()
            .find_map(|line| line.split_once("echod ready: ").map(|(_, rest)| rest))
            .and_then(Listening::parse)
    }
}

/// A loopback TCP address nothing accepts connections on: a socket the test holds bound
/// but never listening, so a connect to it is refused, and no other process can take
/// the port for as long as the test holds it.
pub struct Refusing {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

/// A fresh [`Refusing`] address on 127.0.0.1 (port 0: the kernel picks it).
pub fn refusing() -> Refusing {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("an IP address");
    Refusing {
        _socket: socket,
        addr,
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

/// The address each listener of a test daemon is configured with (port 0: the kernel
/// picks one); it labels the listener's metrics (`listener="127.0.0.1:0"`).
pub const CONFIGURED: &str = "127.0.0.1:0";

/// A running daemon started by a test; killed (by PID) when dropped.
pub struct Daemon {
    pub(crate) child: ChildGuard,
    /// The first TCP echo address.
    pub tcp: SocketAddr,
    /// The first UDP echo address.
    pub udp: SocketAddr,
    /// The first HTTP endpoint.
    pub http: SocketAddr,
    /// Every address it serves.
    pub listening: Listening,
    /// Holds the config file and the log.
    dir: tempfile::TempDir,
}

/// Options for [`Daemon::start_with`].
#[derive(Default)]
pub struct Options<'a> {
    /// TOML merged over the test's base config (port 0 on 127.0.0.1 for every
    /// listener, short drain).
    pub toml: &'a str,
    /// Extra environment variables.
    pub env: Vec<(&'a str, String)>,
    /// Do not wait for readiness (for tests of start-up failures, or that wait in their
    /// own way and then call [`Daemon::wait_listening`]); the addresses stay unknown
    /// (port 0) until then.
    pub no_wait: bool,
    /// RLIMIT_NOFILE for the daemon (fd-exhaustion tests).
    pub max_open_files: Option<u64>,
    /// Another echod binary to run (a copy a test replaces to upgrade it).
    pub binary: Option<PathBuf>,
}

impl Daemon {
    /// Starts echod with `extra` TOML merged over a base config on ports the kernel
    /// picks, and waits until it is ready.
    pub fn start(extra: &str) -> Daemon {
        Self::start_with(Options {
            toml: extra,
            ..Options::default()
        })
    }

    /// Starts echod with full options.
    pub fn start_with(opts: Options<'_>) -> Daemon {
        let mut config: toml::Table = format!(
            r#"
            [tcp]
            listen = ["{CONFIGURED}"]
            [udp]
            listen = ["{CONFIGURED}"]
            [metrics]
            listen = ["{CONFIGURED}"]
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
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut daemon = Daemon {
            child: ChildGuard(spawn_retrying_busy(&mut cmd)),
            tcp: unknown,
            udp: unknown,
            http: unknown,
            listening: Listening::default(),
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

    /// Waits for the `echod ready: …` log line (10 s at most; fails at once if echod
    /// exits) and takes the addresses it names.
    pub fn wait_listening(&mut self) {
        let log = self.dir.path().join("echod.log");
        let child = &mut self.child.0;
        let mut exited = None;
        let listening = poll(Duration::from_secs(10), || {
            let found = Listening::from_log(&std::fs::read_to_string(&log).unwrap_or_default());
            exited = child.try_wait().ok().flatten();
            found.or_else(|| exited.map(|_| Listening::default()))
        });
        let listening = match (listening, exited) {
            (Some(listening), _) if listening != Listening::default() => listening,
            (_, Some(status)) => panic!("{}", self.startup_failure(&format!("exited ({status})"))),
            _ => panic!(
                "{}",
                self.startup_failure("no `echod ready` line within 10 s")
            ),
        };
        let unknown = self.tcp;
        let first = |list: &[SocketAddr]| list.first().copied().unwrap_or(unknown);
        self.tcp = first(&listening.tcp);
        self.udp = first(&listening.udp);
        self.http = first(&listening.http);
        self.listening = listening;
    }

    /// Waits until echod is ready: its ready line is logged and, when it serves HTTP,
    /// `/readyz` answers 200.
    fn wait_ready(&mut self) {
        self.wait_listening();
        if !self.listening.http.is_empty()
            && !wait_http_status(self.http, "/readyz", 200, Duration::from_secs(10))
        {
            panic!("{}", self.startup_failure("/readyz never answered 200"));
        }
    }

    /// Why start-up failed, with the config and the log.
    fn startup_failure(&self, what: &str) -> String {
        let config = std::fs::read_to_string(self.config_path()).unwrap_or_default();
        format!(
            "echod did not become ready ({what}); config:\n{config}\nlog:\n{}",
            self.log()
        )
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
        let last = std::cell::Cell::new(f64::NAN);
        wait_for(
            Duration::from_secs(10),
            || {
                format!(
                    "{family}{labels:?} never reached {want} (at {})",
                    last.get()
                )
            },
            || {
                last.set(self.metric(family, labels));
                (last.get() >= want).then_some(last.get())
            },
        )
    }

    /// The value of one series, e.g. `echod_tcp_connections_accepted_total{listener="…"}`;
    /// sums every series of the family whose labels include the given ones.
    pub fn metric(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.http, family, labels)
            .unwrap_or_else(|| metric_value(&self.scrape(), family, labels))
    }
}

/// The sum of the samples of `family` whose labels include every pair in `labels`, as
/// the HTTP endpoint at `addr` exposes them now; `None` when it does not answer 200 or
/// has no such series.
pub fn metric_at(addr: SocketAddr, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics").ok()?;
    (status == 200).then(|| metric_sample(&body, family, labels))?
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

/// `GET path`: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_response(addr, "GET", path).map(|r| (r.status, r.body))
}

/// Waits until `GET path` answers `want`; false when `limit` passes first.
pub fn wait_http_status(addr: SocketAddr, path: &str, want: u16, limit: Duration) -> bool {
    poll(limit, || {
        http_get(addr, path)
            .is_ok_and(|(status, _)| status == want)
            .then_some(())
    })
    .is_some()
}

/// `METHOD path` over plain HTTP/1.1 with `Connection: close` (tests avoid depending on
/// an HTTP client crate).
pub fn http_response(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<HttpResponse> {
    HttpResponse::parse(&http_raw(addr, &request_head(method, path, addr, &[]))?)
}

/// The head of an HTTP/1.1 request with `Connection: close` and `headers`.
pub fn request_head(method: &str, path: &str, host: SocketAddr, headers: &[String]) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
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

/// An HTTP response read to its end.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Name (lower case) and value of each header, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when it was sent chunked.
    pub body: String,
}

impl HttpResponse {
    /// Parses a whole response: status line, headers, body.
    pub fn parse(response: &str) -> std::io::Result<HttpResponse> {
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad response: {response:?}")))?;
        let mut response = HttpResponse {
            status,
            headers: head
                .split("\r\n")
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
            body: body.to_string(),
        };
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked && !body.is_empty() {
            response.body = dechunk(body)
                .ok_or_else(|| std::io::Error::other(format!("bad chunked body: {body:?}")))?;
        }
        Ok(response)
    }

    /// The value of the first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The payload of a chunked body, or `None` when it is not well formed.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Random bytes from a seeded generator, so a failure can be replayed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Spawns `cmd`, retrying for a second while its executable is "busy": a binary a test
/// has just written (an upgrade's copy) can be held open for writing for a moment by a
/// child another test thread forked meanwhile (the fd lives until that child execs).
fn spawn_retrying_busy(cmd: &mut Command) -> Child {
    let spawned = poll(Duration::from_secs(1), || match cmd.spawn() {
        Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
        result => Some(result),
    });
    spawned.unwrap_or_else(|| cmd.spawn()).expect("start echod")
}
