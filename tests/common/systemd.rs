//! A fake service manager for host-side tests — the `NOTIFY_SOCKET` echod reports to,
//! the inherited-socket hand-over of socket activation (`LISTEN_FDS`) — and a client
//! that keeps one connection busy across reloads and restarts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
) -> Child {
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
    let child = cmd.spawn().expect("start echod");
    // The parent's copies close here; the child holds its own.
    drop(fds);
    child
}

/// A client that holds one connection and echoes round after round until told to stop
/// (at most 2 minutes); returns how many rounds came back byte-exact.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<u64>,
}

impl Chatter {
    pub fn start(addr: SocketAddr) -> Chatter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let rounds = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&rounds);
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut rounds = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let data = super::random_bytes(1000 + (rounds % 7000) as usize, rounds);
                stream
                    .write_all(&data)
                    .expect("write on the held connection");
                let mut got = vec![0u8; data.len()];
                stream
                    .read_exact(&mut got)
                    .expect("echo on the held connection");
                assert!(got == data, "round {rounds}: bytes differ");
                rounds += 1;
                counter.store(rounds, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            rounds
        });
        Chatter {
            stop,
            rounds,
            thread,
        }
    }

    /// Waits until a few more rounds came back, proving the connection still echoes now.
    pub fn still_echoing(&self) {
        let start = self.rounds.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.rounds.load(Ordering::Relaxed) < start + 3 {
            assert!(
                Instant::now() < deadline && !self.thread.is_finished(),
                "the held connection stopped echoing after {start} rounds"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops and returns the byte-exact rounds.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("the held connection kept echoing")
    }
}

/// True when the server closes a fresh connection at once (a limit refused it) instead
/// of echoing on it; panics when it does neither within a few seconds.
pub fn refused_after_accept(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"x");
    let mut buf = [0u8; 1];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Ok(_) => false,
        Err(e) => panic!("neither echoed nor closed: {e}"),
    }
}
