//! PROXY protocol (v1 text, v2 binary) behind a real HAProxy, and hostile headers sent
//! straight from a trusted address: the header is consumed and never echoed, limits and
//! the access log see the client it names, and anything else from a trusted source is
//! closed promptly and counted as `proxy_protocol`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{
    ChildGuard, Daemon, connect_from, echoes_on, is_served, spawn_activated, try_connect_from,
    wait_for_log, wait_read_by_peer, wait_until,
};

crate::support::tests![
    haproxy_send_proxy_v2_passes_real_client_addresses needs &[crate::support::Need::Tool("haproxy")],
    haproxy_send_proxy_v1_passes_real_client_addresses needs &[crate::support::Need::Tool("haproxy")],
    hostile_headers_from_a_trusted_source_are_closed_and_counted,
    valid_headers_are_consumed_and_name_the_client,
    per_ip_limit_counts_header_addresses,
    bad_trusted_sources_exit_78_naming_the_key,
    reload_turns_trusted_sources_on,
];

/// The source of the plain clients through HAProxy (HAProxy itself and its health
/// checks reach echod from 127.0.0.1).
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The address trusted as a proxy in the direct (no HAProxy) tests.
const TRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// An address that is not trusted: plain echo, as without the feature.
const UNTRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
/// How long an echo may take.
const ECHO_WAIT: Duration = Duration::from_secs(10);
const REJECTED: &str = "echod_tcp_connections_rejected_total";
const PROXY_REASON: [(&str, &str); 1] = [("reason", "proxy_protocol")];
/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: `command` 0 (LOCAL) or 1 (PROXY), `family` byte, then the address block.
fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
    h.extend_from_slice(addresses);
    h
}

/// A v2 PROXY header for TCP over IPv4.
fn v2_tcp4(src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&src);
    a.extend_from_slice(&dst);
    a.extend_from_slice(&src_port.to_be_bytes());
    a.extend_from_slice(&dst_port.to_be_bytes());
    v2_header(1, 0x11, &a)
}

/// Reads until the daemon closes; panics if it neither closes nor sends within 10 s.
/// Returns what arrived (an echo of header bytes would show here) and how long it took.
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("connection neither closed nor answered within 10 s (got {got:?})")
            }
            // A reset also closes: echod closed with our bytes unread.
            Err(_) => break,
        }
    }
    (got, started.elapsed())
}

/// Sends `data` from `from` in uneven writes while reading the echo, half-closes, and
/// returns everything received until EOF.
fn roundtrip_from(from: Ipv4Addr, addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut reader = connect_from(from, addr);
    let mut writer = reader.try_clone().unwrap();
    let payload = data.to_vec();
    let sender = std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut off = 0;
        while off < payload.len() {
            let n = rng.usize(1..=40_000).min(payload.len() - off);
            writer.write_all(&payload[off..off + n]).unwrap();
            off += n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    reader.read_to_end(&mut got).expect("read echo");
    sender.join().unwrap();
    got
}

fn start_trusting(trusted: &str, extra: &str) -> Daemon {
    Daemon::start(&format!(
        r#"
        [tcp.proxy_protocol]
        trusted_sources = [{trusted}]
        header_timeout = "2s"
        [log]
        level = "debug"
        {extra}
        "#
    ))
}

/// The HAProxy configuration docs/deploying.md shows (`runnable:haproxy`).
fn documented_haproxy_snippet() -> String {
    crate::docs::runnable("haproxy")
}

/// A real HAProxy started by the test, stopped (by PID) when dropped.
struct Haproxy {
    _child: ChildGuard,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Runs the documented snippet with its addresses swapped for loopback ones and `send`
    /// as the server's PROXY option (`send-proxy` or `send-proxy-v2`). HAProxy listens on
    /// a socket the test bound on port 0 and hands it as descriptor 3 (`bind fd@3`).
    fn start(echod: SocketAddr, send: &str) -> Haproxy {
        let snippet = documented_haproxy_snippet();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = snippet
            .replace("bind :7", "bind fd@3")
            .replace("10.0.0.5:7", &echod.to_string())
            .replace("send-proxy-v2", send);
        assert!(
            config.contains("bind fd@3") && config.contains(&echod.to_string()),
            "runnable:haproxy no longer has `bind :7` and `10.0.0.5:7`:\n{snippet}"
        );
        // Checks often, so several of them (v2 LOCAL or v1 UNKNOWN headers) land during a test.
        let config = config.replace("check-send-proxy", "check-send-proxy inter 200ms");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, format!("global\n    maxconn 256\n\n{config}")).unwrap();
        let log = dir.path().join("haproxy.log");
        let path = path.display().to_string();
        let haproxy = Haproxy {
            _child: spawn_activated(
                Path::new("haproxy"),
                &["-f", &path, "-db"],
                vec![(listener.into(), "haproxy")],
                &log,
            ),
            addr,
            log,
            _dir: dir,
        };
        haproxy.wait_serving();
        haproxy
    }

    /// Waits until a client through HAProxy gets an echo (10 s at most).
    fn wait_serving(&self) {
        wait_until(
            Duration::from_secs(10),
            || {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                format!("HAProxy never served; its log:\n{log}")
            },
            || {
                try_connect_from(CLIENT, self.addr, None, Duration::from_secs(1))
                    .is_ok_and(|mut s| echoes_on(&mut s, b"x", Duration::from_secs(2)))
            },
        );
    }
}

/// Bytes through HAProxy come back unchanged (no header bytes), per-IP limits apply to
/// the original clients, and the access log names them.
fn through_haproxy(send: &str) {
    let daemon = start_trusting(
        r#""127.0.0.1/32""#,
        "[tcp]\nmax_connections_per_ip = 2\nmax_connections = 100",
    );
    let haproxy = Haproxy::start(daemon.tcp, send);

    // Echo of a large, oddly split payload: exactly the bytes sent, no header.
    let data = crate::support::random_bytes(300_000, 7);
    let got = roundtrip_from(CLIENT, haproxy.addr, &data);
    assert!(
        got == data,
        "echo through HAProxy differs ({} bytes)",
        got.len()
    );

    // Per-IP limit on the original clients: two from 127.0.0.2 fit, a third does not,
    // while 127.0.0.3 still gets in. (All of them reach echod from HAProxy's 127.0.0.1.)
    let second = Ipv4Addr::new(127, 0, 0, 2);
    let third = Ipv4Addr::new(127, 0, 0, 3);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from(second, haproxy.addr)).collect();
    for s in &mut held {
        assert!(
            is_served(s),
            "one of the first two from 127.0.0.2 was refused"
        );
    }
    let mut over = connect_from(second, haproxy.addr);
    assert!(
        !is_served(&mut over),
        "a third connection from 127.0.0.2 was served despite max_connections_per_ip = 2"
    );
    let mut other = connect_from(third, haproxy.addr);
    assert!(is_served(&mut other), "127.0.0.3 was refused");
    daemon.wait_metric(REJECTED, &[("reason", "per_ip_limit")], 1.0);
    assert_eq!(daemon.metric(REJECTED, &PROXY_REASON), 0.0);

    // The access log names the client, not HAProxy.
    drop(held);
    let log = wait_for_log(&daemon, "peer=127.0.0.2:");
    assert!(
        log.contains("per_ip_limit") && log.contains("127.0.0.2"),
        "the reject log should name 127.0.0.2:\n{log}"
    );
    drop(other);
    wait_for_log(&daemon, "peer=127.0.0.3:");

    // HAProxy's health checks (check-send-proxy: v2 LOCAL, or v1 with HAProxy's own
    // address) are served as HAProxy's (no client here uses 127.0.0.1), never rejected.
    let log = wait_for_log(&daemon, "peer=127.0.0.1:");
    assert!(log.contains("connection closed"), "{log}");
    assert_eq!(daemon.metric(REJECTED, &PROXY_REASON), 0.0);
}

fn haproxy_send_proxy_v2_passes_real_client_addresses() {
    through_haproxy("send-proxy-v2");
}

fn haproxy_send_proxy_v1_passes_real_client_addresses() {
    through_haproxy("send-proxy");
}

/// Every way a trusted source can fail to send a valid header: closed without an echo,
/// promptly (or at `header_timeout` when it waits for more), and counted.
fn hostile_headers_from_a_trusted_source_are_closed_and_counted() {
    let daemon = start_trusting(&format!("\"{TRUSTED}/32\""), "");
    assert!(
        daemon.scrape().contains("reason=\"proxy_protocol\"} 0\n"),
        "the proxy_protocol series does not exist at 0 from the start"
    );
    let oversized_v1 = format!("PROXY TCP4 127.0.0.9 127.0.0.1 {} 7\r\n", "1".repeat(120));
    let mut bad_signature = b"\r\n\r\n\0\r\nQUIX\n".to_vec();
    bad_signature.extend_from_slice(&v2_tcp4([127, 0, 0, 9], 1000, [127, 0, 0, 1], 7)[12..]);
    let mut huge_v2 = v2_header(1, 0x11, &[127, 0, 0, 9, 127, 0, 0, 1, 3, 232, 0, 7]);
    huge_v2[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    // (name, bytes sent, closed at once rather than at header_timeout)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", b"GET / HTTP/1.0\r\n\r\n".to_vec(), true),
        (
            "truncated v1",
            b"PROXY TCP4 127.0.0.9 127.0.0.1 5".to_vec(),
            false,
        ),
        ("oversized v1", oversized_v1.into_bytes(), true),
        ("v2 with a bad signature", bad_signature, true),
        ("v2 claiming 60000 bytes", huge_v2, true),
        ("no header, silence", Vec::new(), false),
    ];
    for (i, (name, bytes, at_once)) in cases.iter().enumerate() {
        let mut s = connect_from(TRUSTED, daemon.tcp);
        if !bytes.is_empty() {
            s.write_all(bytes).unwrap();
        }
        let (got, took) = read_until_closed(&mut s);
        assert!(got.is_empty(), "{name}: echod sent {got:?}");
        if *at_once {
            assert!(
                took < Duration::from_secs(1),
                "{name}: closed after {took:?}"
            );
        } else {
            assert!(
                (Duration::from_millis(1_800)..Duration::from_secs(5)).contains(&took),
                "{name}: closed after {took:?}, header_timeout is 2s"
            );
        }
        daemon.wait_metric(REJECTED, &PROXY_REASON, (i + 1) as f64);
    }
    assert_eq!(
        daemon.metric("echod_tcp_connections_accepted_total", &[]),
        0.0,
        "a hostile connection was served"
    );
    assert!(daemon.log().contains("proxy_protocol"), "{}", daemon.log());

    // A client from an untrusted address is served as ever: even a PROXY line is data.
    let mut direct = connect_from(UNTRUSTED, daemon.tcp);
    assert!(
        echoes_on(
            &mut direct,
            b"PROXY TCP4 192.0.2.1 127.0.0.1 1 7\r\nhello",
            ECHO_WAIT
        ),
        "echo of {:?}",
        b"PROXY TCP4 192.0.2.1 127.0.0.1 1 7\r\nhello"
    );
    drop(direct);
    assert_eq!(daemon.metric(REJECTED, &PROXY_REASON), cases.len() as f64);
}

/// Valid headers sent straight from the trusted address: the header is consumed even
/// when data follows in the same segment, and the access log names the client it carries
/// (or the proxy itself for LOCAL, UNSPEC and UNKNOWN).
fn valid_headers_are_consumed_and_name_the_client() {
    let daemon = start_trusting(&format!("\"{TRUSTED}/32\""), "");
    // v1 with data in the same write.
    let mut s = connect_from(TRUSTED, daemon.tcp);
    s.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7\r\nhello")
        .unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    assert!(
        echoes_on(&mut s, b" again", ECHO_WAIT),
        "echo of {:?}",
        b" again"
    );
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s).0, b"");
    wait_for_log(&daemon, "peer=192.0.2.7:5555");

    // v2 over IPv6, then data in a later write.
    let mut a = Vec::new();
    a.extend_from_slice(
        &"2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    a.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    a.extend_from_slice(&4242u16.to_be_bytes());
    a.extend_from_slice(&7u16.to_be_bytes());
    let mut s = connect_from(TRUSTED, daemon.tcp);
    s.write_all(&v2_header(1, 0x21, &a)).unwrap();
    wait_read_by_peer(&s);
    assert!(
        echoes_on(&mut s, b"v2 data", ECHO_WAIT),
        "echo of {:?}",
        b"v2 data"
    );
    drop(s);
    wait_for_log(&daemon, "peer=[2001:db8::9]:4242");

    // v2 with a TLV after the addresses, split over two writes.
    let mut with_tlv = v2_tcp4([198, 51, 100, 3], 6000, [127, 0, 0, 1], 7);
    with_tlv.extend_from_slice(&[0x04, 0x00, 0x03, b'a', b'b', b'c']);
    with_tlv[14..16].copy_from_slice(&18u16.to_be_bytes());
    let mut s = connect_from(TRUSTED, daemon.tcp);
    s.write_all(&with_tlv[..20]).unwrap();
    wait_read_by_peer(&s);
    s.write_all(&with_tlv[20..]).unwrap();
    assert!(echoes_on(&mut s, b"tlv", ECHO_WAIT), "echo of {:?}", b"tlv");
    drop(s);
    wait_for_log(&daemon, "peer=198.51.100.3:6000");

    // LOCAL, UNSPEC and v1 UNKNOWN: served with the proxy's own address.
    let proxy_local = [
        v2_header(0, 0x00, &[]),
        v2_header(0, 0x11, &[10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]),
        v2_header(1, 0x00, &[]),
        b"PROXY UNKNOWN\r\n".to_vec(),
    ];
    for header in &proxy_local {
        let mut s = connect_from(TRUSTED, daemon.tcp);
        s.write_all(header).unwrap();
        assert!(
            echoes_on(&mut s, b"local", ECHO_WAIT),
            "echo of {:?}",
            b"local"
        );
    }
    let log = wait_for_log(&daemon, &format!("peer={TRUSTED}:"));
    assert!(
        !log.contains("peer=10.0.0.1"),
        "LOCAL's addresses were used"
    );
    assert_eq!(daemon.metric(REJECTED, &PROXY_REASON), 0.0);
    daemon.wait_metric("echod_tcp_connections_accepted_total", &[], 7.0);
}

/// The per-IP limit counts the address in the header: one proxy connection per client
/// is not one proxy using up its own address's slots.
fn per_ip_limit_counts_header_addresses() {
    let daemon = start_trusting(
        &format!("\"{TRUSTED}/32\""),
        "[tcp]\nmax_connections_per_ip = 1",
    );
    let mut a = connect_from(TRUSTED, daemon.tcp);
    a.write_all(&v2_tcp4([192, 0, 2, 1], 1, [127, 0, 0, 1], 7))
        .unwrap();
    assert!(echoes_on(&mut a, b"a", ECHO_WAIT), "echo of {:?}", b"a");
    let mut b = connect_from(TRUSTED, daemon.tcp);
    b.write_all(b"PROXY TCP4 192.0.2.2 127.0.0.1 2 7\r\n")
        .unwrap();
    assert!(echoes_on(&mut b, b"b", ECHO_WAIT), "echo of {:?}", b"b");
    let mut again = connect_from(TRUSTED, daemon.tcp);
    again
        .write_all(&v2_tcp4([192, 0, 2, 1], 3, [127, 0, 0, 1], 7))
        .unwrap();
    assert!(!is_served(&mut again), "a second 192.0.2.1 was served");
    daemon.wait_metric(REJECTED, &[("reason", "per_ip_limit")], 1.0);
    wait_for_log(&daemon, "192.0.2.1");
}

/// Bad CIDRs and timeouts are configuration errors naming the key, exit 78.
fn bad_trusted_sources_exit_78_naming_the_key() {
    let cases = [
        (r#"trusted_sources = ["10.0.0.0/33"]"#, "trusted_sources"),
        (r#"trusted_sources = ["10.0.0.1/8"]"#, "trusted_sources"),
        (r#"trusted_sources = ["fd00::/129"]"#, "trusted_sources"),
        (r#"trusted_sources = ["banana"]"#, "trusted_sources"),
        (r#"trusted_sources = ["10.0.0.0/"]"#, "trusted_sources"),
        (
            r#"header_timeout = "0s""#,
            "tcp.proxy_protocol.header_timeout",
        ),
    ];
    for (line, key) in cases {
        let (code, stderr) =
            crate::support::check_config_text(&format!("[tcp.proxy_protocol]\n{line}\n"));
        assert_eq!(code, Some(78), "{line}: {stderr}");
        assert!(stderr.contains(key), "{line}: {stderr}");
    }
    // From the environment, a comma-separated list; a bad entry names the full key.
    let ok = Command::new(crate::support::echod_bin())
        .arg("check-config")
        .env_remove("ECHOD_CONFIG")
        .env(
            "ECHOD_TCP__PROXY_PROTOCOL__TRUSTED_SOURCES",
            "10.0.0.0/8,fd00::/8,192.0.2.1",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{stdout}");
    for net in ["\"10.0.0.0/8\"", "\"fd00::/8\"", "\"192.0.2.1/32\""] {
        assert!(stdout.contains(net), "{net} missing from:\n{stdout}");
    }
    let bad = Command::new(crate::support::echod_bin())
        .arg("check-config")
        .env_remove("ECHOD_CONFIG")
        .env(
            "ECHOD_TCP__PROXY_PROTOCOL__TRUSTED_SOURCES",
            "10.0.0.0/8,nope",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("tcp.proxy_protocol.trusted_sources"),
        "{stderr}"
    );
}

/// `trusted_sources` is live: a reload turns the PROXY protocol on for new connections.
fn reload_turns_trusted_sources_on() {
    let daemon = start_trusting("", "");
    let header = b"PROXY TCP4 192.0.2.5 127.0.0.1 4000 7\r\n";
    let mut before = connect_from(TRUSTED, daemon.tcp);
    assert!(
        echoes_on(&mut before, header, ECHO_WAIT),
        "echo of {:?}",
        header
    );
    daemon.rewrite_config(&format!(
        "[tcp.proxy_protocol]\ntrusted_sources = [\"{TRUSTED}/32\"]"
    ));
    daemon.signal(libc::SIGHUP);
    daemon.wait_metric("echod_config_reloads_total", &[], 1.0);
    let mut after = connect_from(TRUSTED, daemon.tcp);
    after.write_all(header).unwrap();
    assert!(
        echoes_on(&mut after, b"data only", ECHO_WAIT),
        "echo of {:?}",
        b"data only"
    );
    // The connection admitted before the reload is still plain echo.
    assert!(
        echoes_on(&mut before, header, ECHO_WAIT),
        "echo of {:?}",
        header
    );
    drop(after);
    wait_for_log(&daemon, "peer=192.0.2.5:4000");
}
