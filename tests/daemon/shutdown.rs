//! Stopping the daemon as an operator does (SIGTERM, SIGINT, twice when impatient):
//! nothing a client sent is lost, and the process ends on time with the right code.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::support::{self, daemon_with_drain_timeout, paced_roundtrip, random_bytes};

crate::support::tests![
    sigterm_mid_transfer_drains_every_byte_then_exits_zero,
    drain_timeout_cuts_connections_that_do_not_finish,
    a_second_signal_exits_at_once,
];

fn sigterm_mid_transfer_drains_every_byte_then_exits_zero() {
    let mut daemon = daemon_with_drain_timeout("20s");
    let clients = 20;
    let started = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let addr = daemon.tcp;
            let started = Arc::clone(&started);
            std::thread::spawn(move || {
                let data = random_bytes(2 << 20, i as u64);
                let first_chunk_sent = move |n| {
                    if n == 0 {
                        started.wait();
                    }
                };
                // Spread the transfer over about a second so the stop lands mid-way.
                let pause = Duration::from_millis(30);
                let got = paced_roundtrip(addr, &data, 64 * 1024, pause, first_chunk_sent)
                    .expect("every chunk sent and the echo read until EOF");
                assert!(
                    got == data,
                    "client {i}: got {} of {} bytes",
                    got.len(),
                    data.len()
                );
            })
        })
        .collect();
    started.wait();
    // Every client must be accepted (not just queued by the kernel) before the stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.metric("echod_tcp_connections_active", &[]) < clients as f64 {
        assert!(Instant::now() < deadline, "clients were never all accepted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop_sent = Instant::now();
    daemon.signal(libc::SIGTERM);
    // Listeners close at once: a new client is refused while the others drain.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(daemon.tcp) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > deadline => panic!("listener still open after SIGTERM"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    for h in handles {
        h.join().expect("client got every byte back");
    }
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(stop_sent.elapsed() < Duration::from_secs(20));
    let log = daemon.log();
    assert!(log.contains("shutdown complete"), "{log}");
    assert!(log.contains("cut=0"), "{log}");
}

fn drain_timeout_cuts_connections_that_do_not_finish() {
    let mut daemon = daemon_with_drain_timeout("1s");
    let mut idle = daemon.open_connection();
    let mut b = [0u8; 1];
    let t = Instant::now();
    daemon.signal(libc::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(
        matches!(idle.read(&mut b), Ok(0) | Err(_)),
        "connection still open"
    );
    assert!(daemon.log().contains("cut=1"), "{}", daemon.log());
}

fn a_second_signal_exits_at_once() {
    let mut daemon = daemon_with_drain_timeout("60s");
    let _held = daemon.open_connection();
    daemon.signal(libc::SIGTERM);
    // Wait until the drain has begun (readiness fails), then signal again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while support::http_get(daemon.http, "/readyz").is_ok_and(|(s, _)| s == 200) {
        assert!(Instant::now() < deadline, "drain never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(5));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "immediate exit is reported as failure"
    );
}
