//! Prometheus-side test helpers: make known TCP traffic (admitted and refused
//! connections), wait for exact counter values in echod's exposition,
//! run the real Prometheus server, blackbox_exporter and promtool as child processes
//! (killed by PID on drop), and ask them questions over HTTP.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::{Daemon, free_port, http_exchange, metric_value};

/// One expected sample: family, label pairs it must carry, value (summed over matches).
pub type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Waits until every expected sample shows exactly its value in one scrape, then
/// returns that scrape. Counters are flushed at the end of a burst or batch, so they
/// may lag the client by a moment; after `limit` the mismatches are reported.
pub fn expect_metrics(daemon: &Daemon, expected: &[Expected<'_>], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let scrape = daemon.scrape();
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(family, labels, want)| {
                let got = metric_value(&scrape, family, labels);
                (got != *want).then(|| format!("{family}{labels:?}: got {got}, want {want}"))
            })
            .collect();
        if wrong.is_empty() {
            return scrape;
        }
        if Instant::now() > deadline {
            panic!(
                "metrics did not reach their expected values within {limit:?}:\n  {}\nscrape:\n{scrape}",
                wrong.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// echod with these TCP connection limits (global, per source address).
pub fn daemon_with_limits(max_connections: usize, per_ip: usize) -> Daemon {
    Daemon::start(&format!(
        "[tcp]\nmax_connections = {max_connections}\nmax_connections_per_ip = {per_ip}\n"
    ))
}

/// The usual client source address.
pub const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// A TCP connection to `addr` from the local address `from` (127.0.0.x).
pub fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .expect("bind client to a loopback address");
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A connection the daemon admitted: one byte is echoed on it.
pub fn admitted(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, addr);
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("admitted connection echoes");
    assert_eq!(&b, b"x");
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

/// Metric families in an exposition, from their `# TYPE` lines: name → type.
pub fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
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

/// The repository's `deploy/` folder.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Runs `promtool` with `args`, feeding `stdin`.
pub fn promtool(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("feed promtool");
    child.wait_with_output().expect("promtool output")
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A GET over HTTP/1.0, so Go servers answer with a plain body (never chunked).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_exchange(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
}

/// The Grafana dashboard in `deploy/grafana/`, with its queries pulled out.
pub struct Dashboard {
    /// Every panel (rows included), as JSON.
    pub panels: Vec<serde_json::Value>,
    /// (panel title, PromQL expression) of every panel target.
    pub queries: Vec<(String, String)>,
    /// Template variable queries.
    pub variables: Vec<String>,
}

impl Dashboard {
    /// Reads and parses `deploy/grafana/echod-dashboard.json`.
    pub fn load() -> Self {
        let path = deploy_dir().join("grafana/echod-dashboard.json");
        let text = std::fs::read_to_string(&path).expect("dashboard file");
        let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
        let panels = json["panels"].as_array().cloned().expect("panels");
        let queries = panels
            .iter()
            .flat_map(|p| {
                let title = p["title"].as_str().unwrap_or("?").to_string();
                let targets = p["targets"].as_array().cloned().unwrap_or_default();
                targets.into_iter().map(move |t| {
                    let expr = t["expr"].as_str().unwrap_or_default().to_string();
                    (title.clone(), expr)
                })
            })
            .collect();
        let variables = json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["definition"].as_str().map(str::to_string))
            .collect();
        Self {
            panels,
            queries,
            variables,
        }
    }
}

/// A tool run as a child process with its output in a log file; killed by PID on drop.
pub struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Service {
    /// Starts `program` with `args`, logging to `dir/<name>.log`.
    pub fn spawn(name: &'static str, program: &str, args: &[String], dir: &Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let child = Command::new(program)
            .args(args)
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        Self {
            name,
            child,
            log,
            addr,
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `path` answers 200 (`limit` at most).
    pub fn wait_http_ok(&mut self, path: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if get(self.addr, path).is_ok_and(|(status, _)| status == 200) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}); log:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} did not answer {path} within {limit:?}; log:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Child::kill signals the PID of the process this test started, nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server on loopback with its config and TSDB in a temp dir.
pub struct Prometheus {
    /// The running server (dropped, so killed, before `dir` is removed).
    pub service: Service,
    /// Config, rules and TSDB.
    pub dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) written to `prometheus.yml`, after copying
    /// `files` (name, content) next to it (rule files are resolved relative to it).
    pub fn start(config: &str, files: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write file");
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write config");
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        ];
        let mut service = Service::spawn("prometheus", "prometheus", &args, dir.path());
        service.wait_http_ok("/-/ready", Duration::from_secs(30));
        Self { service, dir }
    }

    /// Runs an instant PromQL query; returns the JSON `data.result` array.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = get(self.service.addr, &path).expect("query Prometheus");
        assert_eq!(status, 200, "query {promql} failed: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The value of a query that yields one sample, if it yields one.
    pub fn query_value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql);
        match result.as_slice() {
            [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
            _ => None,
        }
    }

    /// Polls `promql` until it yields exactly `want` (`limit` at most).
    pub fn wait_value(&self, promql: &str, want: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query_value(promql);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "Prometheus: `{promql}` = {last:?} after {limit:?}, want {want}; targets:\n{}\nlog:\n{}",
            get(self.service.addr, "/api/v1/targets")
                .map(|(_, b)| b)
                .unwrap_or_default(),
            self.service.log()
        );
    }
}

/// A real blackbox_exporter with a module config, on loopback.
pub struct Blackbox {
    /// The running exporter (dropped, so killed, before `dir` is removed).
    pub service: Service,
    /// Holds the log.
    pub dir: tempfile::TempDir,
}

impl Blackbox {
    /// Starts the exporter with the module file at `config`.
    pub fn start(config: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let args = vec![format!("--config.file={}", config.display())];
        let mut service = Service::spawn(
            "blackbox_exporter",
            "prometheus-blackbox-exporter",
            &args,
            dir.path(),
        );
        service.wait_http_ok("/-/healthy", Duration::from_secs(30));
        Self { service, dir }
    }

    /// Runs one probe and returns the exposition it answers with.
    pub fn probe(&self, module: &str, target: &str) -> String {
        let path = format!(
            "/probe?module={}&target={}",
            url_encode(module),
            url_encode(target)
        );
        let (status, body) = get(self.service.addr, &path).expect("probe");
        assert_eq!(status, 200, "probe {module} {target}: {body}");
        body
    }
}
