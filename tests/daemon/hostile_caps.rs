//! Per-connection caps against a client that is still sending when the cap hits: every
//! byte echod counts as sent must arrive, then EOF — not a reset that throws away the
//! echo still in flight (before: a slow reader got 559 104 of 1 015 808 bytes).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::time::{Duration, Instant};

use crate::support::{CONFIGURED, Daemon, try_connect_from};

crate::support::tests![a_byte_capped_slow_reader_gets_every_byte_counted_as_sent_then_eof,];

/// Sends 2 MiB (the cap is 1 MB) while reading slowly through a 4 KiB receive buffer;
/// returns the bytes received and whether the end was a reset.
fn slow_reader_against(daemon: &Daemon) -> (usize, bool) {
    let mut s = try_connect_from(
        Ipv4Addr::LOCALHOST,
        daemon.tcp,
        Some(4096),
        Duration::from_secs(2),
    )
    .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = [b'e'; 16 * 1024];
        let started = Instant::now();
        for _ in 0..128 {
            if writer.write_all(&chunk).is_err() || started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut got = 0;
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    let reset = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no end in 30 s"
        );
        match s.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("after {got} bytes: {e}"),
        }
        // A slow reader: 4 KiB at a time, with a pause now and then.
        if got % (64 * 1024) < 4096 {
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    drop(s);
    sender.join().unwrap();
    (got, reset)
}

fn a_byte_capped_slow_reader_gets_every_byte_counted_as_sent_then_eof() {
    let daemon = Daemon::start("[tcp]\nmax_bytes_per_connection = 1000000\n");
    let (got, reset) = slow_reader_against(&daemon);
    let label = CONFIGURED.to_string();
    daemon.wait_metric(
        "echod_tcp_connections_capped_total",
        &[("listener", &label), ("cap", "max_bytes")],
        1.0,
    );
    let sent = daemon.metric("echod_tcp_sent_bytes_total", &[("listener", &label)]);
    eprintln!(
        "byte cap 1 000 000, slow reader: {got} bytes arrived of {sent} counted as sent; reset: {reset}"
    );
    assert!(
        !reset,
        "the capped connection ended with a reset after {got} bytes"
    );
    assert_eq!(got as f64, sent, "bytes arrived vs counted as sent");
    assert!(got >= 1_000_000, "{got} bytes: the cap is 1 000 000");
}
