//! UDP echo as a client sees it: one datagram back per datagram, and never a reflector.

use std::net::UdpSocket;
use std::time::Duration;

use crate::support::{Daemon, Need, random_bytes, repo_path, udp_client, wait_stopped};

crate::support::tests![
    every_size_up_to_the_maximum_comes_back_with_boundaries_kept,
    oversize_datagram_is_dropped_not_truncated,
    a_queued_burst_from_many_senders_is_answered_each_to_its_own,
    denied_source_port_gets_no_reply,
    rate_limit_caps_one_source_while_another_is_served,
    configuration_reference_lists_exactly_the_default_denied_ports,
    a_client_on_the_chargen_port_gets_no_reply_by_default needs &[ROOT_PORT_19],
];

/// Binding UDP port 19 (chargen) on loopback: root, as in CI.
const ROOT_PORT_19: Need = Need::Host("root, to bind UDP 127.0.0.1:19", || {
    UdpSocket::bind("127.0.0.1:19").is_ok()
});

/// How long a UDP client waits for a reply.
const REPLY: Duration = Duration::from_millis(500);

fn every_size_up_to_the_maximum_comes_back_with_boundaries_kept() {
    let daemon = Daemon::start(
        r#"
        [udp]
        max_datagram_size = 9000
        [udp.rate_limit]
        packets_per_second = 0
        "#,
    );
    let s = udp_client("127.0.0.1:0", REPLY);
    let mut buf = vec![0u8; 65_536];
    let mut sizes: Vec<usize> = (1..=64).collect();
    sizes.extend([512, 1024, 1472, 1500, 4096, 8192, 8999, 9000]);
    for (i, &size) in sizes.iter().enumerate() {
        let data = random_bytes(size, i as u64);
        s.send_to(&data, daemon.udp).unwrap();
        let (n, from) = s.recv_from(&mut buf).expect("echo");
        assert_eq!(from, daemon.udp);
        assert_eq!(n, size, "datagram of {size} came back as {n}");
        assert!(buf[..n] == data[..], "datagram of {size} changed");
    }
    daemon.wait_metric("echod_udp_sent_datagrams_total", &[], sizes.len() as f64);
}

fn oversize_datagram_is_dropped_not_truncated() {
    let daemon = Daemon::start(
        r#"
        [udp]
        max_datagram_size = 1000
        "#,
    );
    let s = udp_client("127.0.0.1:0", REPLY);
    let mut buf = vec![0u8; 65_536];
    s.send_to(&random_bytes(1001, 1), daemon.udp).unwrap();
    s.send_to(b"after", daemon.udp).unwrap();
    let (n, _) = s.recv_from(&mut buf).expect("the small datagram is echoed");
    assert_eq!(
        &buf[..n],
        b"after",
        "the oversize one must not be echoed at all"
    );
    daemon.wait_metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "oversize")],
        1.0,
    );
}

/// A burst queued while echod is stopped, longer than one receive burst of the loop, from many
/// senders and with oversize and denied datagrams mixed in: every other datagram comes
/// back unchanged to its own sender, in order, and every count is exact.
fn a_queued_burst_from_many_senders_is_answered_each_to_its_own() {
    // The denied sender: a socket of the test's, bound before echod starts.
    let denied = udp_client("127.0.0.1:0", REPLY);
    let denied_port = denied.local_addr().unwrap().port();
    let daemon = Daemon::start(&format!(
        r#"
        [udp]
        max_datagram_size = 1000
        deny_source_ports = [{denied_port}]
        [udp.rate_limit]
        packets_per_second = 0
        "#
    ));
    let senders: Vec<UdpSocket> = (0..20).map(|_| udp_client("127.0.0.1:0", REPLY)).collect();
    let size = |k: usize| [1, 64, 1000, 1001, 200, 3000, 512][k % 7];
    let datagram = |k: usize| random_bytes(size(k), k as u64);
    let rounds = 5;
    daemon.signal(libc::SIGSTOP);
    wait_stopped(daemon.pid(), true);
    for round in 0..rounds {
        for (s, sender) in senders.iter().enumerate() {
            let k = round * senders.len() + s;
            sender.send_to(&datagram(k), daemon.udp).unwrap();
        }
        denied.send_to(b"loop?", daemon.udp).unwrap();
    }
    daemon.signal(libc::SIGCONT);
    wait_stopped(daemon.pid(), false);

    let all = 0..rounds * senders.len();
    let echoed: Vec<usize> = all.clone().filter(|&k| size(k) <= 1000).collect();
    let mut buf = vec![0u8; 65_536];
    for (s, sender) in senders.iter().enumerate() {
        for k in echoed.iter().filter(|&&k| k % senders.len() == s) {
            let (n, from) = sender.recv_from(&mut buf).expect("echo");
            assert_eq!(from, daemon.udp);
            assert!(buf[..n] == datagram(*k)[..], "datagram {k} to sender {s}");
        }
    }
    let (oversize, received) = (all.len() - echoed.len(), all.len() + rounds);
    for (family, labels, want) in [
        ("echod_udp_received_datagrams_total", &[][..], received),
        ("echod_udp_sent_datagrams_total", &[], echoed.len()),
        (
            "echod_udp_sent_bytes_total",
            &[],
            echoed.iter().map(|&k| size(k)).sum(),
        ),
        (
            "echod_udp_received_bytes_total",
            &[],
            all.clone().map(size).sum::<usize>() + rounds * 5,
        ),
        (
            "echod_udp_dropped_datagrams_total",
            &[("reason", "oversize")],
            oversize,
        ),
        (
            "echod_udp_dropped_datagrams_total",
            &[("reason", "denied_port")],
            rounds,
        ),
    ] {
        daemon.wait_metric(family, labels, want as f64);
    }
    // Counts are flushed after the replies are sent: any extra one would be queued now.
    for sender in senders.iter().chain([&denied]) {
        sender.set_nonblocking(true).unwrap();
        let extra = sender.recv_from(&mut buf);
        assert!(
            extra
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "an extra reply: {extra:?}"
        );
    }
}

fn denied_source_port_gets_no_reply() {
    let denied = udp_client("127.0.0.1:0", REPLY);
    let port = denied.local_addr().unwrap().port();
    let daemon = Daemon::start(&format!(
        r#"
        [udp]
        deny_source_ports = [0, 7, 19, {port}]
        "#
    ));
    only_the_denied_source_is_dropped(&daemon, &denied);
}

/// A datagram from `denied`, then one from another source: the other is answered, the
/// first is dropped and counted as `denied_port`, and nothing went back to it.
fn only_the_denied_source_is_dropped(daemon: &Daemon, denied: &UdpSocket) {
    let other = udp_client("127.0.0.1:0", REPLY);
    denied.send_to(b"loop?", daemon.udp).unwrap();
    other.send_to(b"hello", daemon.udp).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = other
        .recv_from(&mut buf)
        .expect("another source is answered");
    assert_eq!(&buf[..n], b"hello");
    daemon.wait_metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "denied_port")],
        1.0,
    );
    daemon.wait_metric("echod_udp_received_datagrams_total", &[], 2.0);
    assert_eq!(daemon.metric("echod_udp_sent_datagrams_total", &[]), 1.0);
    // Replies are sent before the counts are flushed: one to `denied` would be queued.
    denied.set_nonblocking(true).unwrap();
    let reply = denied.recv_from(&mut buf);
    assert!(
        reply
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the denied source port was answered: {reply:?}"
    );
}

fn rate_limit_caps_one_source_while_another_is_served() {
    let daemon = Daemon::start(
        r#"
        [udp.rate_limit]
        packets_per_second = 1
        burst = 5
        "#,
    );
    let flooder = udp_client("127.0.0.1:0", REPLY);
    let other = udp_client("127.0.0.2:0", REPLY);
    for i in 0..50u8 {
        flooder.send_to(&[i], daemon.udp).unwrap();
    }
    let mut buf = [0u8; 16];
    let mut replies = 0;
    while flooder.recv_from(&mut buf).is_ok() {
        replies += 1;
    }
    // 5 from the burst, at most a couple more refilled at 1/s while we sent.
    assert!(
        (5..=7).contains(&replies),
        "flooding source got {replies} replies"
    );
    other.send_to(b"me too", daemon.udp).unwrap();
    let (n, _) = other.recv_from(&mut buf).expect("second source is served");
    assert_eq!(&buf[..n], b"me too");
    daemon.wait_metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "rate_limited")],
        f64::from(50 - replies),
    );
}

/// The configuration reference's row for `udp.deny_source_ports` (generated from
/// config/echod.toml) gives exactly the built-in default list.
fn configuration_reference_lists_exactly_the_default_denied_ports() {
    let reference = std::fs::read_to_string(repo_path("docs/configuration.md")).unwrap();
    let row = reference
        .lines()
        .find(|l| l.starts_with("| `udp.deny_source_ports` |"))
        .expect("docs/configuration.md has a udp.deny_source_ports row");
    let default = row.split('|').nth(2).expect("a default cell").trim();
    let parsed: toml::Table = format!("v = {}", default.trim_matches('`'))
        .parse()
        .unwrap_or_else(|e| panic!("{row}: {e}"));
    let documented: Vec<u16> = parsed["v"]
        .as_array()
        .expect("a list of ports")
        .iter()
        .map(|p| {
            p.as_integer()
                .and_then(|p| u16::try_from(p).ok())
                .expect("a port")
        })
        .collect();
    assert_eq!(
        documented,
        echod::config::DEFAULT_DENY_SOURCE_PORTS,
        "{row}"
    );
}

/// With the default configuration, a datagram from chargen's port (19) — the classic
/// echo–chargen loop — is dropped and counted, while other sources are answered.
fn a_client_on_the_chargen_port_gets_no_reply_by_default() {
    let daemon = Daemon::start("");
    only_the_denied_source_is_dropped(&daemon, &udp_client("127.0.0.1:19", REPLY));
}
