//! Stopping the daemon as an operator does (SIGTERM, SIGINT, twice when impatient):
//! nothing a client sent is lost, and the process ends on time with the right code.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::support::{self, daemon_with_drain_timeout, paced_roundtrip, random_bytes, wait_until};

crate::support::tests![
    sigterm_mid_transfer_drains_every_byte_then_exits_zero,
    drain_timeout_cuts_connections_that_do_not_finish,
    udp_stops_answering_at_sigterm_while_tcp_connections_drain,
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
    daemon.wait_metric_at_least("echod_tcp_connections_active", &[], clients as f64);
    let stop_sent = Instant::now();
    daemon.signal(libc::SIGTERM);
    // Listeners close at once: a new client is refused while the others drain. (Probed
    // once the drain has begun, so no probe is admitted and counted with the 20.)
    wait_until(
        Duration::from_secs(5),
        || "drain never started",
        || !support::http_get(daemon.http, "/readyz").is_ok_and(|(s, _)| s == 200),
    );
    wait_until(
        Duration::from_secs(5),
        || "listener still open after SIGTERM",
        || TcpStream::connect(daemon.tcp).is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
    );
    for h in handles {
        h.join().expect("client got every byte back");
    }
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(stop_sent.elapsed() < Duration::from_secs(20));
    let log = daemon.log();
    assert!(
        log.contains("shutdown complete drained=20 cut=0 "),
        "every client was open at the stop and finished: {log}"
    );
}

fn drain_timeout_cuts_connections_that_do_not_finish() {
    let mut daemon = daemon_with_drain_timeout("1s");
    let mut idle = daemon.open_connection();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Read during the drain, not after the exit: the cut must end the connection.
    let reader = std::thread::spawn(move || {
        let read = idle.read(&mut [0u8; 1]).map_err(|e| e.kind());
        (read, Instant::now())
    });
    let t = Instant::now();
    daemon.signal(libc::SIGINT);
    let (read, eof_at) = reader.join().unwrap();
    assert_eq!(
        read,
        Ok(0),
        "the cut connection sees EOF (not a reset or a timeout)"
    );
    let cut_after = eof_at - t;
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(3),
        "cut {cut_after:?} after SIGINT with drain_timeout = 1s"
    );
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    let log = daemon.log();
    let cut = log
        .find("drain timeout expired; closing remaining connections cut=1")
        .unwrap_or_else(|| panic!("no cut logged: {log}"));
    let summary = log
        .find("shutdown complete drained=0 cut=1 ")
        .unwrap_or_else(|| panic!("no exact summary: {log}"));
    assert!(cut < summary, "the cut comes before the summary: {log}");
}

fn udp_stops_answering_at_sigterm_while_tcp_connections_drain() {
    let mut daemon = daemon_with_drain_timeout("60s");
    let mut held = daemon.open_connection();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let answered = |wait: Duration| {
        udp.set_read_timeout(Some(wait)).unwrap();
        udp.send_to(b"still there?", daemon.udp).unwrap();
        let mut buf = [0u8; 32];
        udp.recv(&mut buf)
            .is_ok_and(|n| &buf[..n] == b"still there?")
    };
    assert!(
        answered(Duration::from_secs(2)),
        "UDP echoes before the stop"
    );
    daemon.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while answered(Duration::from_millis(300)) {
        assert!(
            Instant::now() < deadline,
            "UDP still answers 2 s after SIGTERM"
        );
    }
    // Stopped for good, while the process still drains the TCP connection.
    for i in 0..5 {
        assert!(
            !answered(Duration::from_millis(200)),
            "UDP answered again (datagram {i} after it stopped)"
        );
    }
    held.write_all(b"y").unwrap();
    held.read_exact(&mut [0u8; 1])
        .expect("the held connection is still served");
    assert!(
        support::http_get(daemon.http, "/healthz").is_ok_and(|(s, _)| s == 200),
        "echod is still running"
    );
    drop(held);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

fn a_second_signal_exits_at_once() {
    let mut daemon = daemon_with_drain_timeout("60s");
    let _held = daemon.open_connection();
    daemon.signal(libc::SIGTERM);
    // Wait until the drain has begun (readiness fails), then signal again.
    wait_until(
        Duration::from_secs(5),
        || "drain never started",
        || !support::http_get(daemon.http, "/readyz").is_ok_and(|(s, _)| s == 200),
    );
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
