//! Helpers for the daemon tests: the shared daemon handle, end-to-end kit and harness
//! (tests needing a tool or IPv6 show as ignored without it), plus what
//! only these tests need — counters waited for one by one, a config rewritten for a
//! reload, a fake service manager (the `NOTIFY_SOCKET` echod reports to and the
//! `LISTEN_FDS` hand-over of socket activation), and the process's CPU time.

#[path = "../support/e2e.rs"]
mod e2e;

pub use e2e::*;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo of one byte");
        s
    }

    /// Rewrites the config file (for reload tests).
    pub fn rewrite_config(&self, extra: &str) {
        let path = self.config_path();
        let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        merge(&mut config, extra.parse().expect("test TOML parses"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    }
}

/// An HTTP response with its headers (the body as sent, not de-chunked).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Name (lower case) and value of each header, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The value of the first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `METHOD path` with `Connection: close`, answered with the response's headers.
pub fn http_response(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<HttpResponse> {
    let raw = http_raw(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )?;
    let (status, headers, body) = split_response(&raw)?;
    Ok(HttpResponse {
        status,
        headers: headers
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect(),
        body: body.to_string(),
    })
}

/// CPU time (user + system) the process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
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
