//! Connection limits and timeouts as an operator relies on them: the limit holds, the
//! clients beyond it learn at once, everyone else is unaffected.

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{
    self, Daemon, LOCAL, admitted, connect_from, daemon_with_limits, is_served, tcp_roundtrip,
    write_until_stalled,
};

crate::support::tests![
    global_limit_serves_exactly_the_limit_and_closes_the_rest_promptly,
    per_ip_limit_applies_to_each_source_address_separately,
    idle_connection_is_closed_after_the_idle_timeout,
    a_client_that_never_reads_costs_bounded_memory,
    idle_connections_hold_no_buffer,
    running_out_of_file_descriptors_is_survived_without_spinning,
    a_client_that_stops_reading_is_closed_after_the_idle_timeout,
    a_client_that_saw_its_eof_reconnects_at_the_limit,
];

fn global_limit_serves_exactly_the_limit_and_closes_the_rest_promptly() {
    let daemon = daemon_with_limits(10, 10);
    let mut served: Vec<TcpStream> = (0..10).map(|_| admitted(LOCAL, daemon.tcp)).collect();
    daemon.wait_metric("echod_tcp_connections_active", &[], 10.0);
    // Each client beyond the limit learns at once: EOF (or a reset) well within 500 ms
    // of connecting, never an echo, never a wait.
    for i in 0..20 {
        let connecting = Instant::now();
        let mut s = TcpStream::connect(daemon.tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let read = s.read(&mut [0u8; 16]);
        let took = connecting.elapsed();
        assert!(
            matches!(&read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "client {i} over the limit: {read:?}"
        );
        assert!(
            took < Duration::from_millis(500),
            "client {i} over the limit was closed {took:?} after connecting"
        );
    }
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "global_limit")],
        20.0,
    );
    assert!(
        served.iter_mut().all(is_served),
        "the 10 admitted still echo"
    );
    assert_eq!(daemon.metric("echod_tcp_connections_active", &[]), 10.0);
    // Freeing slots lets new clients in.
    served.clear();
    daemon.wait_metric("echod_tcp_connections_closed_total", &[], 10.0);
    let mut again = TcpStream::connect(daemon.tcp).unwrap();
    assert!(is_served(&mut again));
}

fn per_ip_limit_applies_to_each_source_address_separately() {
    let daemon = daemon_with_limits(100, 3);
    let mut first: Vec<TcpStream> = (0..5).map(|_| connect_from(LOCAL, daemon.tcp)).collect();
    let mut second: Vec<TcpStream> = (0..3)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 2), daemon.tcp))
        .collect();
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "per_ip_limit")],
        2.0,
    );
    assert_eq!(
        first
            .iter_mut()
            .map(is_served)
            .filter(|served| *served)
            .count(),
        3
    );
    assert_eq!(
        second
            .iter_mut()
            .map(is_served)
            .filter(|served| *served)
            .count(),
        3
    );
}

/// echod that closes connections idle for 1 s, and a client connected to it.
fn connected_with_one_second_idle_timeout() -> (Daemon, TcpStream) {
    let daemon = Daemon::start(
        r#"
        [tcp]
        idle_timeout = "1s"
        "#,
    );
    let client = TcpStream::connect(daemon.tcp).unwrap();
    (daemon, client)
}

fn idle_connection_is_closed_after_the_idle_timeout() {
    let (daemon, mut s) = connected_with_one_second_idle_timeout();
    assert!(is_served(&mut s));
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    let n = s.read(&mut buf).expect("EOF, not an error");
    assert_eq!(n, 0, "expected EOF");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    daemon.wait_metric("echod_tcp_idle_timeouts_total", &[], 1.0);
}

/// The sizes the kernel reports for a socket's send and receive buffers (what it lets
/// queue in them, bookkeeping included).
fn socket_buffers(socket: socket2::SockRef<'_>) -> usize {
    socket.send_buffer_size().unwrap() + socket.recv_buffer_size().unwrap()
}

/// A numeric sysctl, e.g. `net/core/wmem_max`.
fn sysctl(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn a_client_that_never_reads_costs_bounded_memory() {
    // A large buffer, so that holding one is measurable and holding a second is not
    // lost in the noise.
    const BUFFER: usize = 1 << 20;
    let daemon = Daemon::start(&format!("[tcp]\nbuffer_size = {BUFFER}"));
    // Warm up so allocator arenas exist before the baseline.
    assert!(support::tcp_roundtrip(daemon.tcp, &[7u8; 100_000], 1).len() == 100_000);
    let before = support::rss_kib(daemon.pid());
    // Fixed client buffers, so everything that can queue in the kernel is known.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(&daemon.tcp.into()).unwrap();
    let mut s: TcpStream = socket.into();
    let written = write_until_stalled(&mut s, 100 << 20, Duration::from_secs(1))
        .expect("write failed before the daemon stalled");
    let after = support::rss_kib(daemon.pid());
    // What the client wrote is in the four socket buffers (its own two, echod's two) or
    // in echod's one buffer: echod reads no more until its echo is written.
    // echod's side: tcp.send_buffer_size and receive_buffer_size (defaults here), capped
    // at net.core.wmem_max/rmem_max and doubled by the kernel for its bookkeeping.
    let defaults = echod::config::TcpConfig::default();
    let echod_side = 2 * defaults.send_buffer_size.min(sysctl("net/core/wmem_max"))
        + 2 * defaults
            .receive_buffer_size
            .min(sysctl("net/core/rmem_max"));
    let queued_at_most = socket_buffers(socket2::SockRef::from(&s)) + echod_side + BUFFER;
    assert!(
        written <= queued_at_most + 64 * 1024,
        "the daemon took {written} bytes from a client that never reads; socket buffers \
         and one buffer hold {queued_at_most}"
    );
    let grown = after.saturating_sub(before);
    eprintln!("non-reading client: wrote {written} bytes, RSS {before} -> {after} KiB");
    assert!(
        grown * 1024 < (BUFFER + 512 * 1024) as u64,
        "RSS grew from {before} KiB to {after} KiB after {written} unread bytes: more than one \
         {BUFFER}-byte buffer"
    );
}

fn idle_connections_hold_no_buffer() {
    const IDLE: usize = 2_000;
    support::raise_open_files_limit(IDLE as u64 + 200);
    let daemon = Daemon::start(&format!(
        "[tcp]\nmax_connections = {IDLE}\nmax_connections_per_ip = {IDLE}"
    ));
    // Warm up: a few connections, so per-thread structures exist before the baseline.
    let warm: Vec<TcpStream> = (0..50).map(|_| admitted(LOCAL, daemon.tcp)).collect();
    drop(warm);
    daemon.wait_metric("echod_tcp_connections_closed_total", &[], 50.0);
    let before = support::rss_kib(daemon.pid());
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(daemon.tcp).unwrap())
        .collect();
    daemon.wait_metric("echod_tcp_connections_active", &[], IDLE as f64);
    let after = support::rss_kib(daemon.pid());
    let per_connection = (after.saturating_sub(before) * 1024) as f64 / IDLE as f64;
    eprintln!(
        "{IDLE} idle connections: RSS {before} -> {after} KiB, {per_connection:.0} bytes each"
    );
    // README: "under 1 KiB of process memory per idle connection".
    assert!(
        per_connection < 1024.0,
        "an idle connection costs {per_connection:.0} bytes of RSS (README: under 1 KiB)"
    );
    drop(idle);
}

fn running_out_of_file_descriptors_is_survived_without_spinning() {
    let daemon = Daemon::start_with(support::Options {
        max_open_files: Some(40),
        ..support::Options::default()
    });
    // More clients than descriptors: the kernel completes the handshakes, accept()
    // fails with EMFILE for the ones beyond the limit.
    let mut clients: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(daemon.tcp).unwrap())
        .collect();
    // The HTTP endpoint is out of descriptors too, so watch the process, not metrics.
    support::wait_for_log(&daemon, "accept failed");
    let exhausted = Instant::now();
    let ticks_before = support::cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(3));
    let ticks = support::cpu_ticks(daemon.pid()) - ticks_before;
    // 100 ticks = one core-second; backing off keeps the daemon near idle.
    assert!(
        ticks < 60,
        "daemon used {ticks} ticks in 3 s while out of descriptors"
    );
    // A waiting client that echod closed at once (shed, with a spare descriptor) costs
    // an accept error of its own, not a retry.
    let shed = clients
        .iter()
        .filter(|c| {
            let mut client: &TcpStream = c;
            client.set_nonblocking(true).unwrap();
            matches!(client.read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    // Descriptors come back: the daemon serves again and counted what happened.
    clients.truncate(0);
    let exhausted_for = exhausted.elapsed();
    support::wait_until(
        Duration::from_secs(10),
        || "daemon never recovered",
        || is_served(&mut TcpStream::connect(daemon.tcp).unwrap()),
    );
    // Retries 5 ms apart, doubling to 1 s: 0, 5, 15, 35 … 1275, 2275, 3275 ms, so about
    // ten in 3 s of exhaustion (a fixed 5 ms retry makes hundreds; a fixed 1 s, four).
    let errors = daemon.metric("echod_tcp_accept_errors_total", &[("kind", "fd_limit")]);
    // (Where echod sheds waiting clients, an empty queue leaves nothing to retry.)
    let retries = errors - shed as f64;
    let expected = if shed == 0 { 6.0..=20.0 } else { 0.0..=20.0 };
    assert!(
        expected.contains(&retries),
        "{errors} fd_limit accept errors ({shed} clients shed) in {exhausted_for:?} of exhaustion"
    );
    // Logged rate-limited: one line per 5 s at most.
    let log = daemon.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("accept failed") && !l.contains("HTTP accept failed"))
        .collect();
    assert_eq!(lines.len(), 1, "accept failures logged:\n{log}");
    assert!(
        lines[0].contains("kind=\"fd_limit\"")
            && (lines[0].contains("EMFILE") || lines[0].contains("Too many open files")),
        "{}",
        lines[0]
    );
}

fn a_client_that_stops_reading_is_closed_after_the_idle_timeout() {
    let (daemon, mut s) = connected_with_one_second_idle_timeout();
    // Stalled for 300 ms means the daemon is stuck writing its echo to us.
    let written = write_until_stalled(&mut s, 64 << 20, Duration::from_millis(300))
        .expect("write failed before the daemon stalled");
    assert!(written < 64 << 20, "the daemon never stopped reading");
    // The daemon is now blocked writing to us; with no progress it must give up after
    // the idle timeout (1 s), not later.
    let stalled = Instant::now();
    daemon.wait_metric("echod_tcp_idle_timeouts_total", &[], 1.0);
    assert!(
        stalled.elapsed() < Duration::from_secs(3),
        "closed {:?} after the stall, idle_timeout is 1 s",
        stalled.elapsed()
    );
    support::wait_until(
        Duration::from_secs(5),
        || "connection still counted as open",
        || daemon.metric("echod_tcp_connections_active", &[]) == 0.0,
    );
}

/// At `max_connections = 1`, a client whose connection ended (it saw echod's EOF) and
/// that connects again at once is admitted: echod gives the slot back before its close
/// reaches the client. Before, the slot went back after the close, and a quick client
/// could be refused by its own finished connection (a deployment test hit it).
fn a_client_that_saw_its_eof_reconnects_at_the_limit() {
    let daemon = daemon_with_limits(1, 1);
    for round in 0..300u32 {
        let data = round.to_be_bytes();
        let echo = tcp_roundtrip(daemon.tcp, &data, u64::from(round));
        assert_eq!(
            echo, data,
            "round {round}: the connection before was refused"
        );
    }
}
