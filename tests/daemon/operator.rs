//! What an operator sees of the daemon: journal priorities, the access log at debug,
//! reload of the accept-queue length, the log line of a second stop signal, and
//! `check-config` in a pipeline that closes early.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Daemon, Options, echod_bin};

use crate::support::{wait_for_log, wait_until};

crate::support::tests![
    under_journald_every_line_carries_its_priority_and_errors_stay_one_entry,
    json_logs_are_one_json_object_per_line,
    at_debug_each_connection_is_logged_with_peer_duration_and_bytes,
    at_info_a_connection_adds_no_log_line,
    reload_applies_a_new_accept_queue_length needs &[crate::support::Need::Tool("ss")],
    a_reload_changing_the_log_format_says_it_needs_a_restart,
    a_reload_changing_udp_sockets_per_address_says_it_needs_a_restart,
    a_second_stop_signal_exits_at_once_and_says_so,
    check_config_into_a_closed_pipe_is_not_a_crash,
];

fn under_journald_every_line_carries_its_priority_and_errors_stay_one_entry() {
    let daemon = Daemon::start_with(Options {
        env: vec![("JOURNAL_STREAM", "8:12345".to_string())],
        ..Options::default()
    });
    // A reload of a file that is not TOML: a multi-line error from the parser.
    std::fs::write(daemon.config_path(), "[tcp\nbacklog = \n").unwrap();
    daemon.signal(libc::SIGHUP);
    let log = wait_for_log(&daemon, "reload failed");
    for line in log.lines() {
        assert!(
            !has_timestamp(line),
            "the journal stamps lines itself; echod must not: {line:?}"
        );
        let priority = line
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .map(|(n, _)| n);
        assert!(
            matches!(priority, Some("3" | "4" | "6" | "7")),
            "line without a priority prefix: {line:?}\nlog:\n{log}"
        );
    }
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].starts_with("<3>"), "{}", failed[0]);
    assert!(
        failed[0].contains("TOML parse error"),
        "the whole error in one entry: {}",
        failed[0]
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6>") && l.contains("echod ready")),
        "{log}"
    );
}

/// True when `text` holds an RFC 3339 date and time such as `2026-11-30T11:27:25`.
fn has_timestamp(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |at: usize, n: usize| b[at..at + n].iter().all(u8::is_ascii_digit);
    (0..b.len().saturating_sub(18)).any(|i| {
        digits(i, 4)
            && b[i + 4] == b'-'
            && digits(i + 5, 2)
            && b[i + 7] == b'-'
            && digits(i + 8, 2)
            && b[i + 10] == b'T'
            && digits(i + 11, 2)
            && b[i + 13] == b':'
            && digits(i + 14, 2)
            && b[i + 16] == b':'
            && digits(i + 17, 2)
    })
}

fn json_logs_are_one_json_object_per_line() {
    let mut daemon = Daemon::start("[log]\nformat = \"json\"\nlevel = \"debug\"");
    let data = crate::support::random_bytes(1000, 8);
    assert!(crate::support::tcp_roundtrip(daemon.tcp, &data, 8) == data);
    wait_for_log(&daemon, "connection closed");
    // A multi-line error (the TOML parser quotes the line) must stay one JSON line.
    std::fs::write(daemon.config_path(), "[tcp\nbacklog = \n").unwrap();
    daemon.signal(libc::SIGHUP);
    wait_for_log(&daemon, "reload failed");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    let log = daemon.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nlog:\n{log}"));
            assert!(
                event["timestamp"].as_str().is_some_and(has_timestamp)
                    && event["level"].is_string()
                    && event["fields"]["message"].is_string(),
                "{line}"
            );
            event
        })
        .collect();
    let find = |message: &str| {
        events
            .iter()
            .find(|e| {
                e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no {message:?} event in:\n{log}"))
    };
    assert!(find("echod ready")["level"] == "INFO");
    let closed = find("connection closed");
    assert_eq!(closed["level"], "DEBUG");
    assert_eq!(closed["fields"]["echoed_bytes"], 1000);
    let failed = find("reload failed");
    assert_eq!(failed["level"], "ERROR");
    assert!(
        failed["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("TOML parse error") && e.contains('\n')),
        "the whole multi-line error, in one event: {failed}"
    );
    assert_eq!(find("shutdown complete")["fields"]["cut"], 0);
}

fn at_debug_each_connection_is_logged_with_peer_duration_and_bytes() {
    let daemon = Daemon::start("[log]\nlevel = \"debug\"");
    let mut s = std::net::TcpStream::connect(daemon.tcp).unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 1000);
    let log = wait_for_log(&daemon, "connection closed");
    let line = log
        .lines()
        .find(|l| l.contains("connection closed"))
        .unwrap();
    assert!(line.contains(&format!("peer={local}")), "{line}");
    assert!(line.contains("echoed_bytes=1000"), "{line}");
    assert!(line.contains("end=finished"), "{line}");
    assert!(line.contains("duration_ms="), "{line}");
}

fn at_info_a_connection_adds_no_log_line() {
    let daemon = Daemon::start("");
    let before = daemon.log().lines().count();
    let back = crate::support::tcp_roundtrip(daemon.tcp, &vec![1u8; 1 << 20], 3);
    assert_eq!(back.len(), 1 << 20);
    daemon.wait_metric(
        "echod_tcp_connections_closed_total",
        &[("listener", crate::support::CONFIGURED)],
        1.0,
    );
    assert_eq!(daemon.log().lines().count(), before, "{}", daemon.log());
}

/// The accept-queue length of the listening socket on `port`, as `ss` reports it.
fn listen_backlog(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // State Recv-Q Send-Q Local Peer: for a listener, Send-Q is the backlog.
    text.lines().next()?.split_whitespace().nth(2)?.parse().ok()
}

fn reload_applies_a_new_accept_queue_length() {
    let daemon = Daemon::start("[tcp]\nbacklog = 16");
    assert_eq!(listen_backlog(daemon.tcp.port()), Some(16));
    daemon.rewrite_config("[tcp]\nbacklog = 300");
    daemon.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(5),
        || format!("backlog not applied:\n{}", daemon.log()),
        || listen_backlog(daemon.tcp.port()) == Some(300),
    );
}

fn a_reload_changing_the_log_format_says_it_needs_a_restart() {
    reload_says(
        "",
        "[log]\nformat = \"json\"",
        "log.format changed: the new format applies after a restart",
    );
}

/// The sockets of an address already listening are not re-bound by a reload (a red
/// team saw 1 socket stay 1 through reloads to 4, 1, 0 and 3, with nothing said).
fn a_reload_changing_udp_sockets_per_address_says_it_needs_a_restart() {
    reload_says(
        "[udp]\nsockets_per_address = 1",
        "[udp]\nsockets_per_address = 4",
        "udp.sockets_per_address changed: addresses already listening keep their sockets until a restart",
    );
}

/// Starts echod on the config `before`, reloads it with `after` (SIGHUP) and waits for
/// `line` in its log.
fn reload_says(before: &str, after: &str, line: &str) {
    let daemon = Daemon::start(before);
    daemon.rewrite_config(after);
    daemon.signal(libc::SIGHUP);
    wait_for_log(&daemon, line);
}

fn a_second_stop_signal_exits_at_once_and_says_so() {
    let mut daemon = Daemon::start("[shutdown]\ndrain_timeout = \"30s\"");
    let _held = daemon.open_connection();
    daemon.signal(libc::SIGTERM);
    wait_for_log(&daemon, "stop requested");
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
    assert!(
        daemon
            .log()
            .contains("second stop signal: exiting at once without draining"),
        "{}",
        daemon.log()
    );
}

fn check_config_into_a_closed_pipe_is_not_a_crash() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(echod_bin())
        .arg("check-config")
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
