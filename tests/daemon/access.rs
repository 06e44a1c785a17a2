//! Who may connect at all: the allow/deny lists of TCP (TLS included), UDP and the
//! metrics endpoint, and the new-connection rate per client address — what xinetd
//! (`only_from`, `no_access`, `cps`) and systemd (`IPAddressAllow=`/`IPAddressDeny=`)
//! offer. Clients come from their own 127.0.0.x addresses; behind a trusted proxy the
//! header's address is the one checked; a reload changes the lists; every refusal is
//! counted by reason, exactly as many as the test made.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::support::{
    Daemon, admitted, check_config_text, connect_from, echod_bin, echoes_on, probe, udp_client,
};
use crate::tls_echo;
use crate::web_config::tls::Pki;

crate::support::tests![
    tcp_lists_serve_the_allowed_and_close_the_others_with_eof,
    tls_listeners_obey_the_tcp_lists,
    udp_lists_drop_datagrams_from_refused_sources,
    metrics_lists_close_refused_clients_probes_included,
    the_connection_rate_refuses_an_address_beyond_its_burst_and_refills,
    behind_a_trusted_proxy_the_header_address_is_checked,
    a_reload_changes_every_list,
    bad_lists_and_rates_exit_78_naming_the_key,
];

const ALLOWED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const DENIED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Outside the allow lists of these tests (127.0.0.0/29).
const UNLISTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
const WAIT: Duration = Duration::from_secs(10);

/// Connects from `from`, sends a few bytes, and tells what came back: `true` for EOF
/// (refused), `false` for the echo (served). A reset or a timeout fails the test: a
/// refused client must see EOF.
fn refused_with_eof(from: Ipv4Addr, addr: SocketAddr) -> bool {
    let mut s = connect_from(from, addr);
    s.set_read_timeout(Some(WAIT)).unwrap();
    // The daemon may already have closed: a refused write still leaves the read to tell.
    let _ = s.write_all(b"hello");
    let mut back = [0u8; 5];
    match s.read(&mut back) {
        Ok(0) => true,
        Ok(_) => {
            s.read_exact(&mut back[1..]).ok();
            false
        }
        Err(e) => panic!("connection from {from}: neither echo nor EOF: {e}"),
    }
}

fn rejected(daemon: &Daemon, reason: &str) -> f64 {
    daemon.metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", reason)],
    )
}

/// `allow = 127.0.0.0/29`, `deny = 127.0.0.3`: 127.0.0.2 is served, 127.0.0.3 (denied
/// though allowed) and 127.0.0.9 (not allowed) see EOF; exactly 2 counted as `denied`.
fn tcp_lists_serve_the_allowed_and_close_the_others_with_eof() {
    let daemon = Daemon::start("[tcp]\nallow = [\"127.0.0.0/29\"]\ndeny = [\"127.0.0.3\"]\n");
    assert!(!refused_with_eof(ALLOWED, daemon.tcp), "127.0.0.2 refused");
    assert!(refused_with_eof(DENIED, daemon.tcp), "127.0.0.3 served");
    assert!(refused_with_eof(UNLISTED, daemon.tcp), "127.0.0.9 served");
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "denied")],
        2.0,
    );
    assert_eq!(
        daemon.metric("echod_tcp_connections_accepted_total", &[]),
        1.0
    );
    assert_eq!(rejected(&daemon, "connection_rate"), 0.0);
}

/// A TLS listener shares the TCP admission: a denied client gets no handshake, an
/// allowed one echoes inside TLS; the refusal is counted on the TLS listener's series.
fn tls_listeners_obey_the_tcp_lists() {
    let pki = Pki::new();
    let d = tls_echo::start(&pki, "", "[tcp]\ndeny = [\"127.0.0.3\"]\n");
    let config = tls_echo::client_config(&pki.ca, None);
    let mut tls = tls_echo::over(connect_from(ALLOWED, d.addr), &config).expect("handshake");
    assert_eq!(
        tls_echo::roundtrip(&mut tls, b"inside TLS").unwrap(),
        b"inside TLS"
    );
    assert!(
        tls_echo::over(connect_from(DENIED, d.addr), &config).is_err(),
        "a denied client completed a handshake"
    );
    d.daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("listener", &d.label), ("reason", "denied")],
        1.0,
    );
    assert_eq!(
        d.daemon.metric(
            "echod_tls_handshakes_total",
            &[("listener", &d.label), ("result", "ok")]
        ),
        1.0
    );
}

/// Sends `n` datagrams from `from` one by one; returns how many were echoed.
fn udp_echoed(from: Ipv4Addr, to: SocketAddr, n: usize, wait: Duration) -> usize {
    let client = udp_client((from, 0), wait);
    let mut buf = [0u8; 64];
    (0..n)
        .filter(|i| {
            let payload = format!("datagram {i}");
            client.send_to(payload.as_bytes(), to).unwrap();
            matches!(client.recv(&mut buf), Ok(len) if &buf[..len] == payload.as_bytes())
        })
        .count()
}

/// `udp.deny = 127.0.0.3`, `udp.allow = 127.0.0.0/29`: 10 of 10 datagrams from
/// 127.0.0.2 are echoed, none of 10 from 127.0.0.3 nor of 10 from 127.0.0.9; exactly
/// 20 counted as dropped for `denied`.
fn udp_lists_drop_datagrams_from_refused_sources() {
    let daemon = Daemon::start("[udp]\nallow = [\"127.0.0.0/29\"]\ndeny = [\"127.0.0.3\"]\n");
    assert_eq!(udp_echoed(ALLOWED, daemon.udp, 10, WAIT), 10);
    let short = Duration::from_millis(200);
    assert_eq!(udp_echoed(DENIED, daemon.udp, 10, short), 0);
    assert_eq!(udp_echoed(UNLISTED, daemon.udp, 10, short), 0);
    daemon.wait_metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "denied")],
        20.0,
    );
    assert_eq!(
        daemon.metric("echod_udp_sent_datagrams_total", &[]),
        10.0,
        "only the allowed source's datagrams were echoed"
    );
}

/// `metrics.allow = 127.0.0.1` (the scraper), `metrics.deny = 127.0.0.1/32` is not set:
/// a probe from 127.0.0.2 is closed without an answer, 3 times, and counted 3 times;
/// the scraper at 127.0.0.1 is answered.
fn metrics_lists_close_refused_clients_probes_included() {
    let daemon = Daemon::start("[metrics]\nallow = [\"127.0.0.1\"]\n");
    for _ in 0..3 {
        let answer = probe(ALLOWED, daemon.http, "/healthz");
        assert!(answer.is_err(), "a refused client was answered {answer:?}");
    }
    assert_eq!(probe(Ipv4Addr::LOCALHOST, daemon.http, "/healthz"), Ok(200));
    daemon.wait_metric(
        "echod_http_connections_rejected_total",
        &[("reason", "denied")],
        3.0,
    );
}

/// `connection_rate`: 1 a second, a burst of 3. From 127.0.0.2, 3 connections at once
/// are served and the next 2 see EOF, counted as `connection_rate`; 127.0.0.4 has a
/// bucket of its own; after a second 127.0.0.2 is served again.
fn the_connection_rate_refuses_an_address_beyond_its_burst_and_refills() {
    let daemon = Daemon::start("[tcp.connection_rate]\nper_second = 1\nburst = 3\n");
    let served: Vec<TcpStream> = (0..3).map(|_| admitted(ALLOWED, daemon.tcp)).collect();
    assert!(
        refused_with_eof(ALLOWED, daemon.tcp),
        "4th connection served"
    );
    assert!(
        refused_with_eof(ALLOWED, daemon.tcp),
        "5th connection served"
    );
    let other = admitted(Ipv4Addr::new(127, 0, 0, 4), daemon.tcp);
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "connection_rate")],
        2.0,
    );
    drop((served, other));
    // The bucket refills at 1 a second: a new connection is served within 1.5 s of
    // the refusals (each refusal until then is counted too).
    let mut refusals = 2.0;
    let refilled = crate::support::poll(Duration::from_millis(1500), || {
        if refused_with_eof(ALLOWED, daemon.tcp) {
            refusals += 1.0;
            None
        } else {
            Some(())
        }
    });
    assert!(refilled.is_some(), "no token back within 1.5 s");
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "connection_rate")],
        refusals,
    );
    assert_eq!(rejected(&daemon, "denied"), 0.0);
}

/// Sends `header` and `data` in one write from the proxy; true when `data` comes back.
fn proxied(addr: SocketAddr, client: &str, data: &[u8]) -> bool {
    let mut s = connect_from(PROXY, addr);
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut first = format!("PROXY TCP4 {client} 127.0.0.1 4000 7\r\n").into_bytes();
    first.extend_from_slice(data);
    s.write_all(&first).unwrap();
    let mut back = vec![0u8; data.len()];
    match s.read_exact(&mut back) {
        Ok(()) => back == data,
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => false,
        Err(e) => panic!("proxied client {client}: neither echo nor EOF: {e}"),
    }
}

/// Behind a trusted proxy (127.0.0.7, itself not in `allow`), the header's client is
/// checked: 192.0.2.1 is served, 192.0.2.66 (denied) sees EOF though it sent data with
/// its header, 198.51.100.1 (not allowed) too; the rate is per client: a burst of 2
/// for 192.0.2.1, then EOF, while 192.0.2.2 is served. A direct client that is not in
/// `allow` is refused.
fn behind_a_trusted_proxy_the_header_address_is_checked() {
    let daemon = Daemon::start(&format!(
        "[tcp]\nallow = [\"192.0.2.0/24\"]\ndeny = [\"192.0.2.66\"]\n\
         [tcp.proxy_protocol]\ntrusted_sources = [\"{PROXY}/32\"]\n\
         [tcp.connection_rate]\nper_second = 1\nburst = 2\n"
    ));
    assert!(
        proxied(daemon.tcp, "192.0.2.1", b"one"),
        "192.0.2.1 refused"
    );
    assert!(
        proxied(daemon.tcp, "192.0.2.1", b"two"),
        "192.0.2.1 refused"
    );
    assert!(
        !proxied(daemon.tcp, "192.0.2.1", b"three"),
        "192.0.2.1 served beyond its burst"
    );
    assert!(
        proxied(daemon.tcp, "192.0.2.2", b"other"),
        "192.0.2.2 refused"
    );
    assert!(
        !proxied(daemon.tcp, "192.0.2.66", b"denied"),
        "192.0.2.66 served"
    );
    assert!(
        !proxied(daemon.tcp, "198.51.100.1", b"unlisted"),
        "198.51.100.1 served"
    );
    assert!(
        refused_with_eof(DENIED, daemon.tcp),
        "a direct client served"
    );
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "denied")],
        3.0,
    );
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "connection_rate")],
        1.0,
    );
}

/// No lists, then a reload denies 127.0.0.3 on TCP, UDP and HTTP: new connections and
/// datagrams from it are refused (a connection it opened before stays served); a
/// second reload empties the lists and it is served again.
fn a_reload_changes_every_list() {
    let daemon = Daemon::start("");
    let mut before = admitted(DENIED, daemon.tcp);
    assert_eq!(udp_echoed(DENIED, daemon.udp, 1, WAIT), 1);
    assert_eq!(probe(DENIED, daemon.http, "/healthz"), Ok(200));
    daemon.rewrite_config(
        "[tcp]\ndeny = [\"127.0.0.3\"]\n[udp]\ndeny = [\"127.0.0.3\"]\n\
         [metrics]\ndeny = [\"127.0.0.3\"]\n",
    );
    daemon.reload();
    assert!(
        refused_with_eof(DENIED, daemon.tcp),
        "served after the reload"
    );
    assert!(!refused_with_eof(ALLOWED, daemon.tcp), "127.0.0.2 refused");
    assert!(
        echoes_on(&mut before, b"still", WAIT),
        "an open connection was closed by the reload"
    );
    assert_eq!(
        udp_echoed(DENIED, daemon.udp, 1, Duration::from_millis(300)),
        0
    );
    assert!(probe(DENIED, daemon.http, "/healthz").is_err());
    daemon.rewrite_config("[tcp]\ndeny = []\n[udp]\ndeny = []\n[metrics]\ndeny = []\n");
    daemon.reload();
    assert!(
        !refused_with_eof(DENIED, daemon.tcp),
        "refused after the lists emptied"
    );
    assert_eq!(udp_echoed(DENIED, daemon.udp, 1, WAIT), 1);
    assert_eq!(probe(DENIED, daemon.http, "/healthz"), Ok(200));
    daemon.wait_metric(
        "echod_tcp_connections_rejected_total",
        &[("reason", "denied")],
        1.0,
    );
    daemon.wait_metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "denied")],
        1.0,
    );
    daemon.wait_metric(
        "echod_http_connections_rejected_total",
        &[("reason", "denied")],
        1.0,
    );
}

/// A bad CIDR in any list, or a rate with no burst, is a configuration error that
/// names the key: exit 78, from the file and from the environment.
fn bad_lists_and_rates_exit_78_naming_the_key() {
    let cases = [
        ("[tcp]\nallow = [\"10.0.0.1/8\"]\n", "tcp.allow"),
        ("[tcp]\ndeny = [\"banana\"]\n", "tcp.deny"),
        ("[udp]\nallow = [\"10.0.0.0/33\"]\n", "udp.allow"),
        ("[udp]\ndeny = [\"fd00::/129\"]\n", "udp.deny"),
        ("[metrics]\nallow = [\"10.0.0.0/\"]\n", "metrics.allow"),
        ("[metrics]\ndeny = [\"::1/200\"]\n", "metrics.deny"),
        (
            "[tcp.connection_rate]\nper_second = 5\nburst = 0\n",
            "tcp.connection_rate.burst",
        ),
        (
            "[tcp.connection_rate]\nmax_sources = 0\n",
            "tcp.connection_rate.max_sources",
        ),
    ];
    for (toml, key) in cases {
        let (code, stderr) = check_config_text(toml);
        assert_eq!(code, Some(78), "{toml}: {stderr}");
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
    let check = |var: &str, value: &str| {
        Command::new(echod_bin())
            .arg("check-config")
            .env_remove("ECHOD_CONFIG")
            .env(var, value)
            .output()
            .unwrap()
    };
    let ok = check("ECHOD_TCP__DENY", "10.0.0.0/8,fd00::/8,192.0.2.1");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("\"192.0.2.1/32\""), "{stdout}");
    let bad = check("ECHOD_UDP__ALLOW", "10.0.0.0/8,nope");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("udp.allow"), "{stderr}");
}
