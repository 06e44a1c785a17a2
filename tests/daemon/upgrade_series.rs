//! An upgrade in place is invisible to Prometheus and to the caps: every counter and
//! histogram goes on from where the old image left it (an `increase()` across the
//! upgrade is right, and no dashboard shows a reset without a restart), the start time
//! stays the first image's, the upgrade itself is counted with its pause, and a
//! handed-over connection's duration and byte caps count from its first accept, and its
//! idle timeout from its last traffic.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::{CONFIGURED, Daemon, Options, echod_bin};

crate::support::tests![
    counters_and_the_start_time_go_on_across_an_upgrade,
    caps_count_from_the_first_accept_across_an_upgrade,
    the_idle_timeout_counts_from_the_last_traffic_across_an_upgrade,
    the_connection_limit_holds_while_connections_hand_over,
];

fn upgradable(dir: &Path, toml: &str) -> (Daemon, PathBuf) {
    let bin = dir.join("echod");
    std::fs::copy(echod_bin(), &bin).unwrap();
    let daemon = Daemon::start_with(Options {
        binary: Some(bin.clone()),
        toml,
        ..Options::default()
    });
    (daemon, bin)
}

/// Renames a fresh copy of echod over `bin` and sends SIGHUP; returns once the new
/// image serves.
fn upgrade(daemon: &Daemon, bin: &Path) {
    let new = bin.with_extension("new");
    std::fs::copy(echod_bin(), &new).unwrap();
    let done = daemon.log().matches("upgrade complete").count();
    std::fs::rename(&new, bin).unwrap();
    daemon.signal(libc::SIGHUP);
    crate::support::wait_until(
        Duration::from_secs(15),
        || format!("upgrade {} did not complete:\n{}", done + 1, daemon.log()),
        || daemon.log().matches("upgrade complete").count() > done,
    );
}

fn counters_and_the_start_time_go_on_across_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, bin) = upgradable(dir.path(), "");
    let data = crate::support::random_bytes(10_000, 5);
    for seed in 0..3 {
        assert_eq!(crate::support::tcp_roundtrip(daemon.tcp, &data, seed), data);
    }
    let listener = [("listener", CONFIGURED)];
    daemon.wait_metric("echod_tcp_connections_closed_total", &listener, 3.0);
    let accepted = daemon.metric("echod_tcp_connections_accepted_total", &listener);
    let sent = daemon.metric("echod_tcp_sent_bytes_total", &listener);
    let durations = daemon.metric("echod_tcp_connection_duration_seconds_count", &listener);
    let started = daemon.metric("echod_start_time_seconds", &[]);
    assert_eq!((accepted, sent, durations), (3.0, 30_000.0, 3.0));

    upgrade(&daemon, &bin);
    // Not reset: the same counts, then more on top.
    assert_eq!(
        daemon.metric("echod_tcp_connections_accepted_total", &listener),
        3.0
    );
    assert_eq!(
        daemon.metric("echod_tcp_sent_bytes_total", &listener),
        30_000.0
    );
    assert_eq!(
        daemon.metric("echod_tcp_connection_duration_seconds_count", &listener),
        3.0
    );
    assert_eq!(daemon.metric("echod_start_time_seconds", &[]), started);
    assert_eq!(
        daemon.metric("echod_upgrades_total", &[("result", "ok")]),
        1.0
    );
    let pause = daemon.metric("echod_last_upgrade_pause_seconds", &[]);
    assert!(pause > 0.0 && pause < 5.0, "pause {pause} s");
    assert_eq!(crate::support::tcp_roundtrip(daemon.tcp, &data, 9), data);
    daemon.wait_metric("echod_tcp_connections_accepted_total", &listener, 4.0);
    daemon.wait_metric("echod_tcp_sent_bytes_total", &listener, 40_000.0);

    // A second upgrade adds to the first.
    upgrade(&daemon, &bin);
    assert_eq!(
        daemon.metric("echod_tcp_connections_accepted_total", &listener),
        4.0
    );
    assert_eq!(
        daemon.metric("echod_upgrades_total", &[("result", "ok")]),
        2.0
    );
    assert_eq!(daemon.metric("echod_start_time_seconds", &[]), started);
}

/// A connection echoed 600 of its 1000-byte cap before the upgrade: after it, 600 more
/// bytes reach the cap (it used to start again from zero, so a client could outlive
/// its caps by upgrading often).
fn caps_count_from_the_first_accept_across_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, bin) = upgradable(dir.path(), "[tcp]\nmax_bytes_per_connection = 1000\n");
    let mut held = std::net::TcpStream::connect(daemon.tcp).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut back = [0u8; 600];
    held.write_all(&[1u8; 600]).unwrap();
    held.read_exact(&mut back).unwrap();
    upgrade(&daemon, &bin);
    held.write_all(&[2u8; 600]).unwrap();
    held.read_exact(&mut back).unwrap();
    assert_eq!(back, [2u8; 600]);
    // Capped once the echo is written: EOF, and counted.
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} more bytes after the cap", rest.len());
    daemon.wait_metric(
        "echod_tcp_connections_capped_total",
        &[("listener", CONFIGURED), ("cap", "max_bytes")],
        1.0,
    );
}

/// An idle connection upgraded part-way through its idle timeout is closed when the
/// timeout since its last byte ends (plus the deadline tick, a tenth of the timeout),
/// not a whole timeout after the upgrade: upgrades every second would otherwise keep
/// an idle connection open for ever.
fn the_idle_timeout_counts_from_the_last_traffic_across_an_upgrade() {
    const IDLE: Duration = Duration::from_secs(5);
    const TICK: Duration = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let (daemon, bin) = upgradable(dir.path(), "[tcp]\nidle_timeout = \"5s\"\n");
    let mut held = TcpStream::connect(daemon.tcp).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    held.write_all(b"x").unwrap();
    let mut back = [0u8; 1];
    held.read_exact(&mut back).unwrap();
    let last_traffic = Instant::now();
    // The scenario's own clock, not a wait for an event: the upgrade begins 1.5 s into
    // the 5 s of silence (and its check of the new binary takes a moment more).
    std::thread::sleep(Duration::from_millis(1500));
    upgrade(&daemon, &bin);
    let upgraded = last_traffic.elapsed();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    let closed = last_traffic.elapsed();
    assert!(
        rest.is_empty(),
        "{} bytes after the idle timeout",
        rest.len()
    );
    // Not before its timeout, and at most a tick (and 0.5 s of scheduling) after it —
    // or, if the upgrade itself outlasted the timeout, right after it.
    assert!(
        closed >= IDLE - Duration::from_millis(50),
        "closed after {closed:?}, before the idle timeout"
    );
    let bound = (IDLE + TICK).max(upgraded) + Duration::from_millis(500);
    assert!(
        closed <= bound,
        "closed {closed:?} after its last traffic (upgraded at {upgraded:?}): the idle \
         timeout started again at the upgrade (bound {bound:?})"
    );
    daemon.wait_metric(
        "echod_tcp_idle_timeouts_total",
        &[("listener", CONFIGURED)],
        1.0,
    );
}

/// Connections at `tcp.max_connections` when the upgrade begins.
const AT_LIMIT: usize = 300;

/// The open connections hand themselves over while the listeners still accept (so new
/// clients do not wait for them): each keeps its slot until the exec, or newcomers
/// would be admitted past `tcp.max_connections` one by one as the held ones hand over.
fn the_connection_limit_holds_while_connections_hand_over() {
    let dir = tempfile::tempdir().unwrap();
    let toml =
        format!("[tcp]\nmax_connections = {AT_LIMIT}\nmax_connections_per_ip = {AT_LIMIT}\n");
    let (daemon, bin) = upgradable(dir.path(), &toml);
    let mut held: Vec<TcpStream> = (0..AT_LIMIT)
        .map(|_| TcpStream::connect(daemon.tcp).unwrap())
        .collect();
    daemon.wait_metric(
        "echod_tcp_connections_active",
        &[("listener", CONFIGURED)],
        AT_LIMIT as f64,
    );
    // Newcomers, one at a time until the upgrade is complete: each is refused (closed
    // at once) or, past the limit, echoed.
    let done = Arc::new(AtomicBool::new(false));
    let prober = {
        let (done, addr) = (Arc::clone(&done), daemon.tcp);
        std::thread::spawn(move || {
            let (mut tried, mut echoed) = (0, 0);
            while !done.load(Ordering::Relaxed) && tried < 100_000 {
                tried += 1;
                // Bounded: a full accept queue retries the SYN for seconds.
                let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                else {
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut byte = [0u8; 1];
                if s.write_all(b"x").is_ok() && matches!(s.read(&mut byte), Ok(1)) {
                    echoed += 1;
                }
            }
            (tried, echoed)
        })
    };
    let began = std::time::Instant::now();
    upgrade(&daemon, &bin);
    let upgraded = began.elapsed();
    done.store(true, Ordering::Relaxed);
    let (tried, echoed) = prober.join().unwrap();
    eprintln!("{tried} newcomers tried during the upgrade ({upgraded:?}), {echoed} echoed");
    assert!(tried > 0);
    assert_eq!(
        echoed, 0,
        "{echoed} of {tried} newcomers admitted past the limit"
    );
    assert_eq!(
        daemon.metric("echod_tcp_connections_active", &[("listener", CONFIGURED)]),
        AT_LIMIT as f64
    );
    for (i, s) in held.iter_mut().enumerate() {
        let data = [i as u8; 3];
        s.write_all(&data).unwrap();
        let mut back = [0u8; 3];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, data, "held connection {i}");
    }
}
