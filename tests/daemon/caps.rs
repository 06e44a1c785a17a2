//! Per-connection caps: `tcp.max_connection_duration` and `tcp.max_bytes_per_connection`
//! close a connection cleanly (every byte read is echoed, then EOF, never a reset) and
//! count it with its own label.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::support::Daemon;

crate::support::tests![
    byte_cap_closes_after_the_current_echo_with_a_clean_eof,
    duration_cap_closes_idle_and_busy_connections_on_time,
];

/// Reads until EOF; panics on a reset.
fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("expected a clean EOF after {} bytes, got {e}", got.len()),
        }
    }
}

fn byte_cap_closes_after_the_current_echo_with_a_clean_eof() {
    let daemon = Daemon::start("[tcp]\nmax_bytes_per_connection = 10000\nbuffer_size = 4096");
    let mut s = TcpStream::connect(daemon.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sent = crate::support::random_bytes(30_000, 7);
    let mut writer = s.try_clone().unwrap();
    let payload = sent.clone();
    // The daemon may close before it has read everything: a failed write is expected.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&payload);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let got = read_to_eof(&mut s);
    sender.join().unwrap();
    assert!(got.len() >= 10_000, "echoed only {} bytes", got.len());
    assert!(
        got.len() < 10_000 + 4096,
        "echoed {} bytes past the cap",
        got.len()
    );
    assert_eq!(
        got[..],
        sent[..got.len()],
        "the echo is the input, unchanged"
    );
    let label = crate::support::CONFIGURED;
    daemon.wait_metric(
        "echod_tcp_connections_capped_total",
        &[("listener", label), ("cap", "max_bytes")],
        1.0,
    );
    assert_eq!(
        daemon.metric(
            "echod_tcp_connections_capped_total",
            &[("listener", label), ("cap", "max_duration")]
        ),
        0.0
    );
}

fn duration_cap_closes_idle_and_busy_connections_on_time() {
    let daemon = Daemon::start("[tcp]\nmax_connection_duration = \"400ms\"");
    // An idle connection: EOF at the cap, not at the 5-minute idle timeout.
    let mut idle = TcpStream::connect(daemon.tcp).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    assert!(read_to_eof(&mut idle).is_empty());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "idle connection closed after {took:?}"
    );
    // A busy one: ping-pong without pause; every echo it got matches what it sent.
    let mut busy = TcpStream::connect(daemon.tcp).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut echoed = 0usize;
    let closed = loop {
        // After the cap echod reads and discards until the client has everything, so
        // a write still goes through: a failed one means a reset, not a clean close.
        if let Err(e) = busy.write_all(b"ping") {
            panic!("write failed after {echoed} bytes echoed ({e}): a reset, not a clean EOF");
        }
        let mut back = [0u8; 4];
        match busy.read_exact(&mut back) {
            Ok(()) => {
                assert_eq!(&back, b"ping");
                echoed += 4;
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break started.elapsed(),
            Err(e) => panic!("expected EOF, got {e} after {echoed} bytes"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "busy connection never capped"
        );
    };
    assert!(
        closed >= Duration::from_millis(350),
        "closed after {closed:?}"
    );
    assert!(echoed > 0);
    let label = crate::support::CONFIGURED;
    daemon.wait_metric(
        "echod_tcp_connections_capped_total",
        &[("listener", label), ("cap", "max_duration")],
        2.0,
    );
}
