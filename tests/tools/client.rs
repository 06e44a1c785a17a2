//! `echod client` as a user meets it: a byte-exact pipe like `nc`, a prompt on a
//! terminal, and one clear line when the server is not there.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{
    ChildGuard, Daemon, corrupting_echo_server, echod_bin, random_bytes, refusing, run_echod,
    wait_for, wait_until,
};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn pipe_mode_is_byte_exact_from_empty_to_8_mib() {
    let daemon = Daemon::start("");
    let addr = daemon.tcp.to_string();
    let mut total = 0;
    for (i, size) in [0usize, 1, 1000, 65_537, 1 << 20, 8 << 20]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(size, 40 + i as u64);
        let run = run_echod(&["client", &addr, "--verify"], &data, LIMIT);
        assert_eq!(run.code(), 0, "size {size}: {}", run.stderr);
        assert_eq!(run.stdout.len(), size, "size {size}: length differs");
        assert!(run.stdout == data, "size {size}: bytes differ");
        total += size;
    }
    let received = daemon.wait_metric_at_least("echod_tcp_received_bytes_total", &[], total as f64);
    assert_eq!(received, total as f64);
}

#[test]
fn pipe_mode_over_udp_echoes_each_line() {
    let daemon = Daemon::start("");
    let input = b"first line\nsecond \x00\xff binary line\nno newline at the end";
    let run = run_echod(
        &["client", &daemon.udp.to_string(), "--udp", "--verify"],
        input,
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(run.stdout, input);
    let sent = daemon.wait_metric_at_least("echod_udp_sent_datagrams_total", &[], 3.0);
    assert_eq!(sent, 3.0);
}

#[test]
fn verify_catches_a_corrupting_server() {
    let addr = corrupting_echo_server(1000);
    let data = random_bytes(100_000, 5);
    let run = run_echod(&["client", &addr.to_string(), "--verify"], &data, LIMIT);
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("differs from the input at byte offset 999"),
        "{}",
        run.stderr
    );
}

#[test]
fn refused_connection_is_one_clear_line() {
    let closed = refusing();
    let run = run_echod(&["client", &closed.addr.to_string()], b"x", LIMIT);
    assert_ne!(run.code(), 0);
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot connect to 127.0.0.1") && run.stderr.contains("refused"),
        "{}",
        run.stderr
    );
}

#[test]
fn unresolvable_name_is_one_clear_line() {
    // A 64-character label is not a valid DNS name: the resolver fails before sending
    // any query, so the test stays off the network.
    let name = format!("{}.invalid:7", "a".repeat(64));
    let run = run_echod(&["client", &name], b"x", LIMIT);
    assert_ne!(run.code(), 0);
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with(&format!("echod client: cannot resolve {name}")),
        "{}",
        run.stderr
    );
}

/// A pseudo-terminal pair with local echo off, so everything read from the master was
/// written by the program, not echoed by the line discipline.
fn open_pty() -> (File, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the provided integers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(slave, &mut t), 0);
        t.c_lflag &= !libc::ECHO;
        assert_eq!(libc::tcsetattr(slave, libc::TCSANOW, &t), 0);
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[test]
fn interactive_mode_echoes_a_typed_line_and_quits_on_q() {
    let daemon = Daemon::start("");
    let (mut master, slave) = open_pty();
    let child = Command::new(echod_bin())
        .args(["client", &daemon.tcp.to_string()])
        .env_remove("ECHOD_CONFIG")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("start echod client");
    let mut guard = ChildGuard(child);
    let screen = Arc::new(Mutex::new(String::new()));
    let mut reader = master.try_clone().unwrap();
    let shown = Arc::clone(&screen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        // Ends with EIO once the child and every copy of the slave are gone.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            shown
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_screen = |what: &str| {
        wait_until(
            Duration::from_secs(20),
            || {
                format!(
                    "{what:?} never appeared; screen: {:?}",
                    screen.lock().unwrap()
                )
            },
            || screen.lock().unwrap().contains(what),
        )
    };
    wait_screen("> ");
    master.write_all(b"hello from a terminal\n").unwrap();
    wait_screen("hello from a terminal");
    // The line went through the server, not just the terminal.
    let line = "hello from a terminal\n".len() as f64;
    assert_eq!(
        daemon.wait_metric_at_least("echod_tcp_sent_bytes_total", &[], line),
        line
    );
    master.write_all(b"q\n").unwrap();
    let child = &mut guard.0;
    let status = wait_for(
        Duration::from_secs(20),
        || "client did not quit on q",
        || child.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}");
    // Once the connection has closed, its counts are final.
    daemon.wait_metric_at_least("echod_tcp_connections_closed_total", &[], 1.0);
    assert_eq!(
        daemon.metric("echod_tcp_received_bytes_total", &[]),
        line,
        "`q` quits and is not sent"
    );
}
