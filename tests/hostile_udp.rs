//! UDP under hostile traffic: spoofed sources that make echod talk to itself or to
//! another echo server, and a second process that tries to take echod's port.
//!
//! Spoofing needs a raw socket (CAP_NET_RAW, so root): CI runs as root; elsewhere these
//! tests are skipped with a note unless `ECHOD_REQUIRE_E2E=1`. Every packet goes to
//! 127.0.0.0/8 only.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use common::Daemon;
use socket2::{Domain, Protocol, Socket, Type};

/// A raw IPv4 socket that writes UDP headers itself, bound to `src`'s address so the
/// kernel puts that address in the IP header; `None` (test skipped) without
/// CAP_NET_RAW, unless `ECHOD_REQUIRE_E2E=1` makes that a failure.
fn raw_udp_socket(src: Ipv4Addr) -> Option<Socket> {
    match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)) {
        Ok(socket) => {
            socket
                .bind(&SocketAddr::from((src, 0)).into())
                .expect("bind raw socket to a loopback address");
            Some(socket)
        }
        Err(e) => {
            if std::env::var("ECHOD_REQUIRE_E2E").is_ok_and(|v| v == "1") {
                panic!("spoofing needs a raw socket (root): {e}");
            }
            eprintln!("SKIPPED: no raw socket ({e}); run as root to spoof UDP sources");
            None
        }
    }
}

/// One's-complement sum of 16-bit words, for the UDP checksum.
fn ones_complement_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

/// Sends one UDP datagram from `src` (an address and port we do not own) to `dst`.
/// Returns false when the test must be skipped (no raw socket).
fn spoof(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> bool {
    assert!(src.ip().is_loopback() && dst.ip().is_loopback());
    let Some(raw) = raw_udp_socket(*src.ip()) else {
        return false;
    };
    let len = u16::try_from(8 + payload.len()).expect("small payload");
    let mut packet = Vec::with_capacity(usize::from(len));
    packet.extend_from_slice(&src.port().to_be_bytes());
    packet.extend_from_slice(&dst.port().to_be_bytes());
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let mut sum = ones_complement_sum(ones_complement_sum(0, &pseudo), &packet);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    packet[6..8].copy_from_slice(&checksum.to_be_bytes());
    let sent = raw
        .send_to(&packet, &SocketAddr::from((*dst.ip(), 0)).into())
        .expect("send spoofed datagram");
    assert_eq!(sent, packet.len());
    true
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

/// The daemon answers a TCP echo and `/healthz`, each within 1 s.
fn assert_responsive(daemon: &Daemon) {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&daemon.tcp, Duration::from_secs(1))
        .expect("TCP connect within 1 s");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(b"still there?").unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).expect("TCP echo within 1 s");
    assert_eq!(&buf, b"still there?");
    let tcp_took = started.elapsed();

    let started = Instant::now();
    let mut h = TcpStream::connect_timeout(&daemon.http, Duration::from_secs(1))
        .expect("HTTP connect within 1 s");
    h.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    h.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    h.read_to_string(&mut resp).expect("/healthz within 1 s");
    assert!(resp.starts_with("HTTP/1.1 200"), "/healthz: {resp:?}");
    eprintln!(
        "TCP echo in {tcp_took:?}, /healthz in {:?}",
        started.elapsed()
    );
}

/// SIGTERM is handled: the daemon drains and exits 0 within 5 s.
fn assert_stops_on_sigterm(mut daemon: Daemon) {
    let started = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    eprintln!("stopped {:?} after SIGTERM", started.elapsed());
}

fn sent(daemon: &Daemon) -> f64 {
    daemon.metric("echod_udp_sent_datagrams_total", &[])
}

#[test]
fn a_datagram_from_echods_own_address_does_not_wedge_it_at_unlimited_rate() {
    let daemon = Daemon::start(
        r#"
        [udp.rate_limit]
        packets_per_second = 0
        "#,
    );
    let own = v4(daemon.udp);
    if !spoof(own, own, b"talk to yourself") {
        return;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_responsive(&daemon);
    let echoes = sent(&daemon);
    eprintln!("echoes after the self-addressed datagram: {echoes}");
    assert!(echoes > 100.0, "the loop did not run ({echoes} echoes)");
    assert_stops_on_sigterm(daemon);
}
