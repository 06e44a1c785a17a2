//! UDP under hostile traffic: spoofed sources that make echod talk to itself or to
//! another echo server, and a second process that tries to take echod's port.
//!
//! Spoofing needs a raw socket (CAP_NET_RAW, so root): CI runs as root; elsewhere these
//! tests are skipped with a note unless `ECHOD_REQUIRE_E2E=1`. Every packet goes to
//! 127.0.0.0/8 only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{Daemon, poll, spoof, v4, wait_stopped, wait_until};
use socket2::{Domain, Protocol, Socket, Type};

crate::support::tests![
    a_datagram_from_echods_own_address_does_not_wedge_it_at_unlimited_rate needs &[crate::support::RAW_SOCKETS],
    a_datagram_from_echods_own_address_is_not_echoed needs &[crate::support::RAW_SOCKETS],
    a_spoofed_datagram_between_two_echods_on_the_same_port_is_not_echoed needs &[crate::support::RAW_SOCKETS],
    a_loop_between_echods_on_different_ports_is_bounded_and_broken_by_deny_lists needs &[crate::support::RAW_SOCKETS],
    two_udp_sockets_of_one_echod_do_not_answer_each_other needs &[crate::support::RAW_SOCKETS],
    another_process_cannot_take_echods_udp_port,
    a_socket_inherited_with_so_reuseaddr_cannot_be_shared_either,
    a_burst_while_echod_is_busy_waits_in_a_large_receive_queue needs &[crate::support::Need::Tool("ss")],
    the_udp_receive_buffer_follows_a_reload needs &[crate::support::Need::Tool("ss")],
    udp_can_be_served_by_one_socket_per_worker_thread needs &[crate::support::Need::Tool("ss")],
    an_out_of_range_receive_buffer_is_refused_by_name,
];

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

pub(crate) fn sent(daemon: &Daemon) -> f64 {
    daemon.metric("echod_udp_sent_datagrams_total", &[])
}

fn a_datagram_from_echods_own_address_does_not_wedge_it_at_unlimited_rate() {
    // Own ports are denied by default; turn that off to keep the loop alive and prove
    // that the daemon yields even then.
    let daemon = Daemon::start(
        r#"
        [udp]
        deny_own_ports = false
        [udp.rate_limit]
        packets_per_second = 0
        "#,
    );
    let own = v4(daemon.udp);
    spoof(own, own, b"talk to yourself");
    // Once the loop demonstrably runs, echod must still answer beside it.
    daemon.wait_metric_at_least("echod_udp_sent_datagrams_total", &[], 101.0);
    assert_responsive(&daemon);
    let echoes = sent(&daemon);
    eprintln!("echoes after the self-addressed datagram: {echoes}");
    assert!(echoes > 100.0, "the loop did not run ({echoes} echoes)");
    assert_stops_on_sigterm(daemon);
}

/// Sums `echod_udp_sent_datagrams_total` over `daemons` until it has not changed for
/// 500 ms (5 s at most): the loop, if any, has died. Returns the total and how long the
/// echoes went on.
pub(crate) fn echoes_once_settled(daemons: &[&Daemon]) -> (f64, Duration) {
    let started = Instant::now();
    let total = || daemons.iter().map(|d| sent(d)).sum::<f64>();
    let mut last = total();
    let mut changed = Instant::now();
    let settled = poll(Duration::from_secs(5), || {
        let now = total();
        if now != last {
            last = now;
            changed = Instant::now();
        }
        (changed.elapsed() >= Duration::from_millis(500)).then_some(())
    });
    assert!(settled.is_some(), "echoes still going after 5 s: {last}");
    (last, changed - started)
}

fn denied(daemon: &Daemon) -> f64 {
    daemon.metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "denied_port")],
    )
}

fn a_datagram_from_echods_own_address_is_not_echoed() {
    for rate in ["1000", "0"] {
        let daemon = Daemon::start(&format!(
            r#"
            [udp.rate_limit]
            packets_per_second = {rate}
            "#
        ));
        let own = v4(daemon.udp);
        spoof(own, own, b"talk to yourself");
        let (echoes, lasted) = echoes_once_settled(&[&daemon]);
        eprintln!("packets_per_second = {rate}: {echoes} echoes over {lasted:?}");
        assert_eq!(echoes, 0.0, "echod answered itself ({rate}/s)");
        assert_eq!(denied(&daemon), 1.0);
        assert_responsive(&daemon);
        assert_stops_on_sigterm(daemon);
    }
}

/// A second echod on the same port on another loopback address, as two hosts running
/// echod on the default port would be.
fn start_on(addr: SocketAddr, extra: &str) -> Daemon {
    Daemon::start(&format!(
        r#"
        [udp]
        listen = ["{addr}"]
        {extra}
        "#
    ))
}

fn a_spoofed_datagram_between_two_echods_on_the_same_port_is_not_echoed() {
    let a = Daemon::start("");
    let b_addr = SocketAddr::from(([127, 0, 0, 2], a.udp.port()));
    let b = start_on(b_addr, "");
    spoof(v4(b_addr), v4(a.udp), b"ping-pong");
    let (echoes, lasted) = echoes_once_settled(&[&a, &b]);
    eprintln!(
        "A {} <-> B {b_addr}: {echoes} echoes over {lasted:?}",
        a.udp
    );
    assert_eq!(echoes, 0.0, "A answered B's echo port");
    assert_eq!(denied(&a), 1.0);
}

fn a_loop_between_echods_on_different_ports_is_bounded_and_broken_by_deny_lists() {
    // Default deny list, small rate limit: nothing tells A that B's port is an echo
    // server, so the rate limit is what ends the loop.
    let limit = r#"
        [udp.rate_limit]
        packets_per_second = 10
        burst = 20
    "#;
    let a = Daemon::start(limit);
    let b = Daemon::start(limit);
    spoof(v4(b.udp), v4(a.udp), b"ping-pong");
    let (echoes, lasted) = echoes_once_settled(&[&a, &b]);
    eprintln!("different ports, burst 20 at 10/s: {echoes} echoes over {lasted:?}");
    // Both share the source address 127.0.0.1: each side's bucket gives its burst plus
    // what refills while the loop runs.
    let bound = 2.0 * (20.0 + 10.0 * (lasted.as_secs_f64() + 0.5));
    assert!(echoes <= bound, "{echoes} echoes, bound {bound}");
    drop((a, b));

    // What the README tells operators: deny the other echo servers' ports. Each port
    // is known once its echod runs: A learns B's by a reload.
    let a = Daemon::start("");
    let b = Daemon::start(&format!(
        "[udp]\ndeny_source_ports = [0, 7, {}]\n",
        a.udp.port()
    ));
    a.rewrite_config(&format!(
        "[udp]\ndeny_source_ports = [0, 7, {}]\n",
        b.udp.port()
    ));
    a.reload();
    spoof(v4(b.udp), v4(a.udp), b"ping-pong");
    let (echoes, _) = echoes_once_settled(&[&a, &b]);
    assert_eq!(echoes, 0.0, "A answered a denied port");
    assert_eq!(denied(&a), 1.0);
}

fn two_udp_sockets_of_one_echod_do_not_answer_each_other() {
    let daemon = Daemon::start(
        r#"
        [udp]
        listen = ["127.0.0.1:0", "127.0.0.2:0"]
        "#,
    );
    let [s1, s2] = daemon.listening.udp[..] else {
        panic!("two UDP sockets: {:?}", daemon.listening)
    };
    spoof(v4(s2), v4(s1), b"sibling");
    let (echoes, lasted) = echoes_once_settled(&[&daemon]);
    eprintln!("sockets {s1} <-> {s2} of one echod: {echoes} echoes over {lasted:?}");
    assert_eq!(echoes, 0.0, "one socket answered its sibling");
    assert_eq!(denied(&daemon), 1.0);
}

fn another_process_cannot_take_echods_udp_port() {
    let daemon = Daemon::start("");
    // A second echod on the same UDP address (its TCP and HTTP ports are its own).
    let mut second = Daemon::start_with(crate::support::Options {
        toml: &format!("[udp]\nlisten = [\"{}\"]\n", daemon.udp),
        no_wait: true,
        ..crate::support::Options::default()
    });
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "second echod: {status:?}");
    let log = second.log();
    assert!(
        log.contains("Address already in use") && log.contains(&daemon.udp.to_string()),
        "second echod's log does not name the taken address:\n{log}"
    );

    // Nor can any socket that asks for SO_REUSEADDR.
    let thief = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    thief.set_reuse_address(true).unwrap();
    let err = thief
        .bind(&daemon.udp.into())
        .expect_err("a SO_REUSEADDR socket bound echod's UDP address");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(thief);

    // And echod still gets its datagrams.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(b"mine", daemon.udp).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = client
        .recv_from(&mut buf)
        .expect("echo from the first echod");
    assert_eq!((&buf[..n], from), (&b"mine"[..], daemon.udp));
}

fn a_socket_inherited_with_so_reuseaddr_cannot_be_shared_either() {
    // systemd (and systemd-socket-activate) set SO_REUSEADDR on every socket they bind.
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket
        .local_addr()
        .unwrap()
        .as_socket()
        .expect("an IP address");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, "[metrics]\nlisten = []\n").unwrap();
    let log_path = dir.path().join("echod.log");
    let _child = crate::support::spawn_activated(
        &crate::support::echod_bin(),
        &["--config", &config.display().to_string()],
        vec![(socket.into(), "echo")],
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(
        Duration::from_secs(10),
        || format!("not ready:\n{}", log()),
        || log().contains("echod ready"),
    );
    // Echoing one datagram proves the UDP task runs (and so has set its options).
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(b"hello", addr).unwrap();
    let mut buf = [0u8; 16];
    client.recv_from(&mut buf).expect("echo");

    let thief = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    thief.set_reuse_address(true).unwrap();
    let err = thief
        .bind(&addr.into())
        .expect_err("a SO_REUSEADDR socket bound echod's inherited UDP address");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}

/// The kernel's view of each UDP socket bound to `addr` (echod has one per worker
/// thread): `skmem` fields by name (`rb` is the receive buffer limit, `r` the bytes
/// queued, `d` the datagrams dropped for lack of room).
fn udp_skmems(addr: SocketAddr) -> Vec<std::collections::HashMap<String, u64>> {
    let out = std::process::Command::new("ss")
        .args(["-uamnH", &format!("src {addr}")])
        .output()
        .expect("run ss");
    let out = String::from_utf8_lossy(&out.stdout);
    let sockets: Vec<_> = out
        .split("skmem:(")
        .skip(1)
        .map(|rest| crate::support::skmem(&format!("skmem:({rest}")))
        .collect();
    assert!(!sockets.is_empty(), "no UDP socket on {addr}: {out:?}");
    sockets
}

/// One `skmem` field of every socket on `addr`.
fn udp_skmem_field(addr: SocketAddr, field: &str) -> Vec<u64> {
    udp_skmems(addr).iter().map(|m| m[field]).collect()
}

/// Whether echod (started by us, so with our capabilities) may use SO_RCVBUFFORCE:
/// CAP_NET_ADMIN (bit 12) in the effective set, which root in a container may lack.
fn has_cap_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

fn rmem_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(212_992)
}

fn a_burst_while_echod_is_busy_waits_in_a_large_receive_queue() {
    let daemon = Daemon::start(
        r#"
        [udp.rate_limit]
        packets_per_second = 0
        "#,
    );
    // The receive buffer is the configured default, 4 MiB: the kernel reports twice the
    // request, capped by net.core.rmem_max unless echod may force it (CAP_NET_ADMIN).
    let want = 4u64 << 20;
    let expected = if has_cap_net_admin() {
        2 * want
    } else {
        2 * want.min(rmem_max())
    };
    let rbs = udp_skmem_field(daemon.udp, "rb");
    eprintln!("UDP receive buffers: {rbs:?} bytes");
    assert!(
        rbs.iter().all(|&rb| rb == expected),
        "receive buffers of echod's UDP sockets: {rbs:?}, not {expected}"
    );
    let rb = rbs[0];
    if rb < 2 * want {
        assert!(
            !std::env::var("ECHOD_REQUIRE_E2E").is_ok_and(|v| v == "1"),
            "net.core.rmem_max caps the buffer and echod may not force it: the burst cannot be tested"
        );
        eprintln!(
            "not testing the burst: net.core.rmem_max caps the buffer and echod may not force it"
        );
        return;
    }

    // echod cannot read for a moment (stopped here; a CPU-starved host looks the same)
    // while a burst of 2 000 datagrams of 1 000 bytes arrives: the queue must hold it.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let burst = 2_000u32;
    daemon.signal(libc::SIGSTOP);
    wait_stopped(daemon.pid(), true);
    for i in 0..burst {
        let mut datagram = [0u8; 1000];
        datagram[..4].copy_from_slice(&i.to_be_bytes());
        client.send_to(&datagram, daemon.udp).unwrap();
    }
    // The burst comes from one address and port, so the kernel queues it on one socket.
    let queued = udp_skmems(daemon.udp)
        .into_iter()
        .max_by_key(|m| m["r"])
        .expect("a socket");
    daemon.signal(libc::SIGCONT);
    wait_stopped(daemon.pid(), false);
    let received = || daemon.metric("echod_udp_received_datagrams_total", &[]);
    poll(Duration::from_secs(5), || {
        (received() >= f64::from(burst)).then_some(())
    });
    eprintln!(
        "queued {} bytes, kernel dropped {}; echod received {} of {burst}",
        queued["r"],
        queued["d"],
        received()
    );
    assert_eq!(queued["d"], 0, "the kernel dropped datagrams of the burst");
    assert_eq!(received(), f64::from(burst));
}

fn the_udp_receive_buffer_follows_a_reload() {
    let daemon = Daemon::start("[udp]\nreceive_buffer_size = 65536\n");
    assert_eq!(
        udp_skmem_field(daemon.udp, "rb"),
        vec![2 * 65_536; udp_skmems(daemon.udp).len()]
    );
    daemon.rewrite_config("[udp]\nreceive_buffer_size = 131072\n");
    daemon.signal(libc::SIGHUP);
    daemon.wait_metric("echod_config_reloads_total", &[], 1.0);
    // Every socket applies it at the reload, without waiting for a datagram.
    wait_until(
        Duration::from_secs(5),
        || format!("{:?}", udp_skmems(daemon.udp)),
        || {
            udp_skmem_field(daemon.udp, "rb")
                .iter()
                .all(|&rb| rb == 2 * 131_072)
        },
    );
}

fn an_out_of_range_receive_buffer_is_refused_by_name() {
    for value in ["100", "268435457"] {
        let (code, stderr) =
            crate::support::check_config_text(&format!("[udp]\nreceive_buffer_size = {value}\n"));
        assert_eq!(code, Some(78), "{value}: {stderr}");
        assert!(stderr.contains("udp.receive_buffer_size"), "{stderr}");
    }
}

/// One UDP socket per address by default; `udp.sockets_per_address = 0` gives one per
/// worker thread (SO_REUSEPORT siblings), every one of them answering: 64 clients, whose
/// source ports the kernel spreads over the sockets, all get their echo. The group
/// still keeps a second echod off the address.
fn udp_can_be_served_by_one_socket_per_worker_thread() {
    let single = Daemon::start("");
    assert_eq!(udp_skmems(single.udp).len(), 1, "sockets by default");
    drop(single);
    let daemon = Daemon::start("[udp]\nsockets_per_address = 0\n");
    let workers = std::fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == "echod-worker")
        })
        .count();
    assert!(workers >= 1, "no echod-worker thread");
    assert_eq!(
        udp_skmems(daemon.udp).len(),
        workers,
        "UDP sockets on {} for {workers} worker threads",
        daemon.udp
    );
    for i in 0..64u32 {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.send_to(&i.to_be_bytes(), daemon.udp).unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = client.recv_from(&mut buf).expect("an echo");
        assert_eq!((&buf[..n], from), (&i.to_be_bytes()[..], daemon.udp));
    }
    let mut second = Daemon::start_with(crate::support::Options {
        toml: &format!(
            "[udp]\nlisten = [\"{}\"]\nsockets_per_address = 0\n",
            daemon.udp
        ),
        no_wait: true,
        ..crate::support::Options::default()
    });
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "second echod: {status:?}");
}
