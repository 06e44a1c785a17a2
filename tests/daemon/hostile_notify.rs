//! The notify protocol when its inputs are hostile: a reload error far larger than a
//! datagram, a watchdog interval of one microsecond. systemd must still hear READY=1
//! after RELOADING=1 (or it fails the reload and, with Type=notify-reload, the service),
//! and the watchdog must not cost a core.

use std::time::{Duration, Instant};

use crate::support::NotifySocket;
use crate::support::{Daemon, Options};

crate::support::tests![
    a_huge_reload_error_still_ends_the_reload_with_ready,
    a_one_microsecond_watchdog_is_pinged_at_a_sane_rate,
    the_watchdog_is_pinged_while_descriptors_are_exhausted,
];

const WAIT: Duration = Duration::from_secs(10);

fn a_huge_reload_error_still_ends_the_reload_with_ready() {
    let notify = NotifySocket::bind();
    let daemon = Daemon::start_with(Options {
        env: vec![("NOTIFY_SOCKET", notify.path.display().to_string())],
        ..Options::default()
    });
    let mut seen = Vec::new();
    notify.until(&mut seen, WAIT, |n| n.get("READY").is_some());

    // A 300 KB unknown key: the error message quotes it, more than a datagram can hold.
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let huge_key = "k".repeat(300_000);
    std::fs::write(daemon.config_path(), format!("{huge_key} = 1\n{config}")).unwrap();
    daemon.signal(libc::SIGHUP);
    notify.until(&mut seen, WAIT, |n| n.get("RELOADING").is_some());
    let ready = notify.until(&mut seen, WAIT, |n| n.get("READY").is_some());
    let status = ready.get("STATUS").expect("READY carries a STATUS");
    eprintln!(
        "READY=1 after the failed reload: {} bytes, STATUS {} bytes",
        ready.text.len(),
        status.len()
    );
    assert!(status.contains("last reload FAILED"), "{status}");
    assert!(status.len() <= 1024, "STATUS of {} bytes", status.len());
    assert!(status.ends_with('…'), "a cut status says so: {status}");
    // The periodic STATUS (every 5 s) keeps coming.
    let refreshed = notify.until(&mut seen, WAIT, |n| {
        n.get("READY").is_none() && n.get("STATUS").is_some()
    });
    assert!(refreshed.get("STATUS").unwrap_or("").len() <= 1024);
    assert!(crate::support::tcp_roundtrip(daemon.tcp, b"still serving", 1) == b"still serving");
}

fn a_one_microsecond_watchdog_is_pinged_at_a_sane_rate() {
    let notify = NotifySocket::bind();
    let daemon = Daemon::start_with(Options {
        env: vec![
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", "1".to_string()),
        ],
        ..Options::default()
    });
    let mut seen = Vec::new();
    notify.until(&mut seen, WAIT, |n| n.get("READY").is_some());
    // Let the queue from start-up go (1 s at most), then count for 2 s.
    let draining = Instant::now();
    while draining.elapsed() < Duration::from_secs(1)
        && notify.recv(Duration::from_millis(50)).is_some()
    {}
    let ticks = crate::support::cpu_ticks(daemon.pid());
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let left = Duration::from_secs(2).saturating_sub(started.elapsed());
        match notify.recv(left.max(Duration::from_millis(1))) {
            Some(n) if n.is_watchdog() => pings += 1,
            Some(_) => {}
            None => break,
        }
        assert!(pings < 100_000, "a ping flood");
    }
    let ticks = crate::support::cpu_ticks(daemon.pid()) - ticks;
    eprintln!("WATCHDOG_USEC=1: {pings} pings and {ticks} CPU ticks in 2 s");
    assert!(
        pings >= 5,
        "the watchdog must still be pinged: {pings} in 2 s"
    );
    assert!(pings <= 25, "{pings} pings in 2 s");
    // 100 ticks = one core-second; an idle daemon uses next to none.
    assert!(ticks < 20, "{ticks} ticks in 2 s");
    assert!(
        daemon.log().contains("WATCHDOG_USEC"),
        "the clamp is logged: {}",
        daemon.log()
    );
}

/// Out of file descriptors, the watchdog must still be pinged: otherwise systemd kills
/// a daemon that is serving at its limit, and every open connection with it.
fn the_watchdog_is_pinged_while_descriptors_are_exhausted() {
    let notify = NotifySocket::bind();
    let daemon = Daemon::start_with(Options {
        env: vec![
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", "400000".to_string()),
        ],
        max_open_files: Some(64),
        ..Options::default()
    });
    let mut seen = Vec::new();
    notify.until(&mut seen, WAIT, |n| n.get("READY").is_some());
    let clients: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(daemon.tcp).expect("connect"))
        .collect();
    // Until the daemon has seen the limit (it counts the clients it sheds).
    daemon.wait_metric_at_least(
        "echod_tcp_accept_errors_total",
        &[("kind", "fd_limit")],
        1.0,
    );
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(2) {
        match notify.recv(Duration::from_millis(500)) {
            Some(n) if n.is_watchdog() => pings += 1,
            Some(_) => {}
            None => {}
        }
        assert!(pings < 1000, "a ping flood");
    }
    eprintln!("out of descriptors: {pings} watchdog pings in 2 s (every 200 ms expected)");
    assert!(
        pings >= 7,
        "{pings} pings in 2 s; systemd would kill the service"
    );
    drop(clients);
}
