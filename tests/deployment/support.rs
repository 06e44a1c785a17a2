//! Helpers for the deployment tests: the shared daemon handle and end-to-end kit, plus
//! running linters and validators that must pass cleanly, reading YAML the way they do,
//! the shipped configs as echod loads them, and the real Prometheus server,
//! blackbox_exporter and promtool as child processes (killed by PID on drop).
//!
//! YAML is read with PyYAML, which yamllint brings along, so the build needs no YAML
//! crate and the tests read the files exactly as the validators do.

#[path = "../support/e2e.rs"]
mod e2e;

pub use e2e::*;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `cmd` with `input` on its stdin and returns its output.
pub fn output_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input)
        .expect("write to stdin");
    child.wait_with_output().expect("output")
}

/// Runs `cmd` and panics with its output unless it exits 0; returns stdout and stderr.
pub fn assert_passes(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every document of a YAML stream, as JSON values (empty documents skipped).
pub fn yaml_documents(yaml: &str) -> Vec<serde_json::Value> {
    let out = output_with_input(
        Command::new("python3").args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ]),
        yaml.as_bytes(),
    );
    assert!(
        out.status.success(),
        "YAML does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .expect("JSON from python3 (with PyYAML, installed with yamllint)")
}

/// The single document of a YAML file.
pub fn yaml_file(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut docs = yaml_documents(&text);
    assert_eq!(docs.len(), 1, "{rel} holds one document");
    docs.remove(0)
}

/// The port of every address in a config list, which must all agree (one port on
/// several interfaces), e.g. `["0.0.0.0:7007", "[::]:7007"]` → 7007.
pub fn single_port(addrs: &[std::net::SocketAddr]) -> u16 {
    let port = addrs.first().expect("at least one address").port();
    assert!(
        addrs.iter().all(|a| a.port() == port),
        "listen addresses use different ports: {addrs:?}"
    );
    port
}

/// The effective configuration of a shipped config file, loaded as echod loads it.
pub fn shipped_config(rel: &str) -> echod::config::Config {
    echod::config::ConfigSource {
        file: Some(repo_path(rel)),
        overrides: Vec::new(),
    }
    .load_with_env(&Default::default())
    .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs `promtool` with `args`, feeding `stdin`.
pub fn promtool(args: &[&str], stdin: &[u8]) -> Output {
    output_with_input(Command::new("promtool").args(args), stdin)
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

/// A tool run as a child process with its output in a log file; killed by PID on drop.
pub struct Service {
    name: &'static str,
    child: ChildGuard,
    log: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Service {
    /// Starts `program` with `args`, listening on 127.0.0.1 on a port the kernel picks
    /// (port 0), logging to `dir/<name>.log`; waits (30 s at most) until it listens.
    pub fn spawn(name: &'static str, program: &str, args: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let child = Command::new(program)
            .args(args)
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let mut service = Self {
            name,
            child: ChildGuard(child),
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let pid = service.child.0.id();
        let listening = poll(Duration::from_secs(30), || {
            service.assert_running();
            match listening_tcp(pid).as_slice() {
                [one] => Some(*one),
                _ => None,
            }
        });
        service.addr = listening.unwrap_or_else(|| {
            panic!(
                "{name} did not listen on one TCP port within 30 s; log:\n{}",
                service.log()
            )
        });
        service
    }

    /// Panics with the log when the tool has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.0.try_wait() {
            panic!("{} exited ({status}); log:\n{}", self.name, self.log());
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `path` answers 200 (`limit` at most).
    pub fn wait_http_ok(&mut self, path: &str, limit: Duration) {
        let addr = self.addr;
        let ok = poll(limit, || {
            self.assert_running();
            wait_http_status(addr, path, 200, Duration::ZERO).then_some(())
        });
        if ok.is_none() {
            panic!(
                "{} did not answer {path} within {limit:?}; log:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

/// A real Prometheus server on loopback with its config and TSDB in a temp dir.
pub struct Prometheus {
    /// The running server (dropped, so killed, before `dir` is removed).
    pub service: Service,
    /// Config, rules and TSDB.
    _dir: tempfile::TempDir,
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
        Self { service, _dir: dir }
    }

    /// Runs an instant PromQL query; returns the JSON `data.result` array.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(self.service.addr, &path).expect("query Prometheus");
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
        let mut last = None;
        let reached = poll(limit, || {
            last = self.query_value(promql);
            (last == Some(want)).then_some(())
        });
        if reached.is_some() {
            return;
        }
        panic!(
            "Prometheus: `{promql}` = {last:?} after {limit:?}, want {want}; targets:\n{}\nlog:\n{}",
            http_get(self.service.addr, "/api/v1/targets")
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
    _dir: tempfile::TempDir,
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
        Self { service, _dir: dir }
    }

    /// Runs one probe and returns the exposition it answers with.
    pub fn probe(&self, module: &str, target: &str) -> String {
        let path = format!(
            "/probe?module={}&target={}",
            url_encode(module),
            url_encode(target)
        );
        let (status, body) = http_get(self.service.addr, &path).expect("probe");
        assert_eq!(status, 200, "probe {module} {target}: {body}");
        body
    }
}
