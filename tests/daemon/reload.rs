//! Reload (SIGHUP) as an operator sees it: open connections never notice, changed
//! limits and listeners take effect, and a broken config changes nothing but a counter,
//! a log line and the status.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::{
    CONFIGURED, Chatter, Daemon, NotifySocket, Options, echoes, random_bytes, refused_after_accept,
    tcp_roundtrip, wait_for, wait_until,
};

crate::support::tests![
    held_connection_keeps_echoing_and_a_lowered_limit_applies,
    reload_adds_and_removes_listeners_without_touching_connections,
    broken_config_is_refused_and_the_old_one_keeps_serving,
    reload_applies_a_new_log_level,
];

/// Reloads and waits until the daemon counted the outcome.
fn reload(daemon: &Daemon, expect_failure: bool) {
    let family = if expect_failure {
        "echod_config_reload_failures_total"
    } else {
        "echod_config_reloads_total"
    };
    let before = daemon.metric(family, &[]);
    daemon.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        || format!("reload not counted in {family}; log:\n{}", daemon.log()),
        || daemon.metric(family, &[]) > before,
    );
}

/// The address of the listener of `proto` ("TCP", "UDP") the log says echod started on
/// `ip` (the latest, waiting 10 s at most for one).
fn listening_on(daemon: &Daemon, proto: &str, ip: &str) -> SocketAddr {
    let text = format!("listening proto=\"{proto}\" addr={ip}:");
    wait_for(
        Duration::from_secs(10),
        || format!("no {text:?} in the log:\n{}", daemon.log()),
        || {
            let log = daemon.log();
            let line = log.lines().rev().find(|l| l.contains(&text))?;
            let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
            addr.parse().ok()
        },
    )
}

fn held_connection_keeps_echoing_and_a_lowered_limit_applies() {
    let daemon = Daemon::start("[tcp]\nmax_connections = 100\nmax_connections_per_ip = 100");
    let chatter = Chatter::start(daemon.tcp);
    let second = TcpStream::connect(daemon.tcp).unwrap();
    daemon.wait_metric("echod_tcp_connections_active", &[], 2.0);

    // Two connections are open; a limit of two now refuses a third.
    daemon.rewrite_config("[tcp]\nmax_connections = 2\nmax_connections_per_ip = 2");
    reload(&daemon, false);
    chatter.still_echoing();
    assert!(refused_after_accept(daemon.tcp), "limit 2 not applied");
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "global_limit")],
        1.0,
    );
    // Freeing a slot lets a new client in again.
    drop(second);
    daemon.wait_metric("echod_tcp_connections_closed_total", &[], 1.0);
    assert!(echoes(daemon.tcp));

    chatter.still_echoing();
    assert!(chatter.finish() > 0);
}

fn reload_adds_and_removes_listeners_without_touching_connections() {
    let daemon = Daemon::start("");
    let old = daemon.tcp;
    // The added listeners: on 127.0.0.2, port 0 too (the configured addresses name the
    // listeners, so the old ones stay `127.0.0.1:0`).
    let new = "127.0.0.2:0";
    let chatter = Chatter::start(old);

    // Add a TCP and a UDP listener.
    daemon.rewrite_config(&format!(
        "[tcp]\nlisten = [\"{CONFIGURED}\", \"{new}\"]\n[udp]\nlisten = [\"{CONFIGURED}\", \"{new}\"]"
    ));
    reload(&daemon, false);
    let (new_tcp, new_udp) = (
        listening_on(&daemon, "TCP", "127.0.0.2"),
        listening_on(&daemon, "UDP", "127.0.0.2"),
    );
    assert!(echoes(new_tcp), "added TCP listener does not serve");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp.send_to(b"datagram", new_udp).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp.recv_from(&mut buf).expect("added UDP listener echoes");
    assert_eq!((&buf[..n], from), (&b"datagram"[..], new_udp));

    // Remove the original one while the chatter's connection on it is open.
    let held_on_new = Chatter::start(new_tcp);
    daemon.rewrite_config(&format!(
        "[tcp]\nlisten = [\"{new}\"]\n[udp]\nlisten = [\"{new}\"]"
    ));
    reload(&daemon, false);
    wait_until(
        Duration::from_secs(10),
        || "removed listener still accepts",
        || TcpStream::connect(old).is_err(),
    );
    assert!(echoes(new_tcp));
    assert!(daemon.log().contains("stopped listening"));
    // The connection accepted by the removed listener is untouched.
    chatter.still_echoing();
    held_on_new.still_echoing();
    assert!(chatter.finish() > 0);
    assert!(held_on_new.finish() > 0);
}

fn broken_config_is_refused_and_the_old_one_keeps_serving() {
    let notify = NotifySocket::bind();
    let daemon = Daemon::start_with(Options {
        env: vec![("NOTIFY_SOCKET", notify.path.display().to_string())],
        ..Options::default()
    });
    let mut seen = Vec::new();
    notify.until(&mut seen, Duration::from_secs(10), |n| {
        n.get("READY").is_some()
    });
    let chatter = Chatter::start(daemon.tcp);
    let good = std::fs::read_to_string(daemon.config_path()).unwrap();

    // A syntax error, then a well-formed file with a bad value, then an unbindable
    // listener: each refused, each counted.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let broken = [
        "[tcp\nlisten = oops".to_string(),
        "[tcp]\nmax_connections = 0".to_string(),
        format!("[tcp]\nlisten = [\"{busy_addr}\"]"),
    ];
    for (i, text) in broken.iter().enumerate() {
        std::fs::write(daemon.config_path(), text).unwrap();
        reload(&daemon, true);
        assert_eq!(
            daemon.metric("echod_config_reload_failures_total", &[]),
            (i + 1) as f64
        );
        assert_eq!(
            daemon.metric("echod_config_last_reload_successful", &[]),
            0.0
        );
        assert!(
            echoes(daemon.tcp),
            "old config stopped serving after {text:?}"
        );
        chatter.still_echoing();
        // What `systemctl status` shows: the reason, until a reload succeeds.
        let ready = notify.until(&mut seen, Duration::from_secs(10), |n| {
            n.get("READY").is_some()
        });
        let status = ready.get("STATUS").unwrap_or_default();
        assert!(status.contains("; last reload FAILED: "), "{status}");
        // A multi-line error must not spill lines that systemd would parse as keys.
        assert!(
            ready.text.lines().all(|l| l
                .split_once('=')
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))),
            "{:?}",
            ready.text
        );
    }
    assert!(
        seen.last()
            .and_then(|n| n.get("STATUS"))
            .is_some_and(|s| s.contains("tcp.listen") || s.contains(&busy_addr.to_string())),
        "{seen:#?}"
    );
    let log = daemon.log();
    assert!(
        log.contains("reload failed; keeping the previous configuration"),
        "{log}"
    );
    assert!(log.contains("tcp.max_connections"), "{log}");
    assert!(log.contains(&busy_addr.to_string()), "{log}");

    // Fixing the file recovers.
    std::fs::write(daemon.config_path(), good).unwrap();
    reload(&daemon, false);
    assert_eq!(
        daemon.metric("echod_config_last_reload_successful", &[]),
        1.0
    );
    let ready = notify.until(&mut seen, Duration::from_secs(10), |n| {
        n.get("READY").is_some()
    });
    assert!(!ready.text.contains("FAILED"), "{ready:?}");
    chatter.still_echoing();
    assert!(chatter.finish() > 0);
}

/// Opens, uses and closes one connection; returns once echod has counted it closed.
fn one_connection(daemon: &Daemon, closed_before: f64) {
    let data = random_bytes(100, 5);
    assert!(tcp_roundtrip(daemon.tcp, &data, 5) == data);
    daemon.wait_metric(
        "echod_tcp_connections_closed_total",
        &[],
        closed_before + 1.0,
    );
}

fn reload_applies_a_new_log_level() {
    let daemon = Daemon::start("[log]\nlevel = \"info\"");
    let access_lines = || daemon.log().matches("connection closed").count();
    one_connection(&daemon, 0.0);
    assert_eq!(
        access_lines(),
        0,
        "no access log at info:\n{}",
        daemon.log()
    );
    // debug: the access line of each connection.
    daemon.rewrite_config("[log]\nlevel = \"debug\"");
    reload(&daemon, false);
    one_connection(&daemon, 1.0);
    wait_until(
        Duration::from_secs(5),
        || {
            format!(
                "no access line at debug after the reload:\n{}",
                daemon.log()
            )
        },
        || access_lines() >= 1,
    );
    // warn: not even the reload's own info line.
    daemon.rewrite_config("[log]\nlevel = \"warn\"");
    reload(&daemon, false);
    let lines = daemon.log().lines().count();
    one_connection(&daemon, 2.0);
    daemon.rewrite_config("[log]\nlevel = \"warn\"\n[tcp]\nbacklog = 100");
    reload(&daemon, false);
    assert_eq!(
        daemon.log().lines().count(),
        lines,
        "logged at warn:\n{}",
        daemon.log()
    );
    assert_eq!(access_lines(), 1);
}
