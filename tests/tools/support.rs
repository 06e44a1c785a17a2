//! Helpers for the tool tests (client, probe, bench): the shared daemon handle, an
//! `echod` subcommand run with a deadline, and small misbehaving servers on loopback that
//! the tools must catch.

#[path = "../support/daemon.rs"]
mod daemon;

pub use daemon::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a finished tool run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr, as text.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Run {
    /// The exit code (panics on death by signal).
    pub fn code(&self) -> i32 {
        self.status.code().expect("exited normally")
    }

    /// Stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `echod ARGS` with `stdin` piped in, and waits at most `limit`.
pub fn run_echod(args: &[&str], stdin: &[u8], limit: Duration) -> Run {
    let started = Instant::now();
    let child = Command::new(echod_bin())
        .args(args)
        .env_remove("ECHOD_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod");
    let mut guard = ChildGuard(child);
    let child = &mut guard.0;
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_for(
        limit,
        || format!("echod {args:?} did not finish"),
        || child.try_wait().unwrap(),
    );
    let elapsed = started.elapsed();
    writer.join().unwrap();
    Run {
        status,
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        elapsed,
    }
}

/// A loopback TCP server whose every connection is handled by `serve` on its own
/// thread. The threads end with the test process.
pub fn tcp_server<F>(serve: F) -> SocketAddr
where
    F: Fn(std::net::TcpStream) + Send + Sync + Clone + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// A TCP echo server that lets `fault` see (and change) each chunk before echoing it,
/// with the chunk's offset in the connection's stream.
fn faulty_echo_server<F>(fault: F) -> SocketAddr
where
    F: Fn(u64, &mut [u8]) + Send + Sync + Clone + 'static,
{
    tcp_server(move |mut s| {
        let mut buf = [0u8; 16 * 1024];
        let mut pos: u64 = 0;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            fault(pos, &mut buf[..n]);
            pos += n as u64;
            if s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    })
}

/// A server that echoes, but flips one bit of every `flip_every`-th byte of the stream —
/// the corruption a bad proxy or a buggy echo would cause.
pub fn corrupting_echo_server(flip_every: u64) -> SocketAddr {
    faulty_echo_server(move |pos, chunk| {
        for (i, b) in chunk.iter_mut().enumerate() {
            if (pos + i as u64) % flip_every == flip_every - 1 {
                *b ^= 0x01;
            }
        }
    })
}

/// A server that echoes faithfully but stalls once, for `stall`, on the first
/// connection whose stream passes offset `after` — a GC pause, a page fault storm.
pub fn stalling_echo_server(after: u64, stall: Duration) -> SocketAddr {
    let stalled = Arc::new(AtomicBool::new(false));
    faulty_echo_server(move |pos, _| {
        if pos >= after && !stalled.swap(true, Ordering::SeqCst) {
            std::thread::sleep(stall);
        }
    })
}

/// A UDP echo server that flips one bit in every `flip_every`-th datagram. The thread
/// ends with the test process.
pub fn corrupting_udp_echo_server(flip_every: u64) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65_536];
        let mut seen = 0u64;
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            seen += 1;
            if seen.is_multiple_of(flip_every) && n > 0 {
                buf[n - 1] ^= 0x01;
            }
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}
