//! TCP echo as a client sees it: every byte back, unchanged and in order.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::support::{self, Daemon, IPV6_LOOPBACK, random_bytes, tcp_roundtrip};

crate::support::tests![
    payloads_of_every_size_come_back_byte_exact,
    two_hundred_concurrent_clients_are_all_served,
    half_close_delivers_the_tail,
    ipv6_listener_echoes needs &[IPV6_LOOPBACK],
];

fn payloads_of_every_size_come_back_byte_exact() {
    let daemon = Daemon::start("");
    for (i, size) in [0usize, 1, 1024, 1 << 20, 16 << 20].into_iter().enumerate() {
        let data = random_bytes(size, i as u64 + 1);
        let echoed = tcp_roundtrip(daemon.tcp, &data, 100 + i as u64);
        assert_eq!(echoed.len(), data.len(), "size {size}: length differs");
        assert!(echoed == data, "size {size}: bytes differ");
    }
    let tx = daemon.metric("echod_tcp_sent_bytes_total", &[]);
    assert_eq!(tx as usize, 1 + 1024 + (1 << 20) + (16 << 20));
}

fn two_hundred_concurrent_clients_are_all_served() {
    let daemon = Daemon::start("");
    let addr = daemon.tcp;
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = random_bytes(8 * 1024 + i as usize, i);
                let echoed = tcp_roundtrip(addr, &data, i);
                assert!(echoed == data, "client {i} got a different stream");
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    assert_eq!(
        daemon.metric("echod_tcp_connections_accepted_total", &[]),
        200.0
    );
}

fn half_close_delivers_the_tail() {
    let daemon = Daemon::start("");
    let mut s = TcpStream::connect(daemon.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Write everything without reading, then half-close: the daemon must still echo
    // the whole stream before closing.
    let data = random_bytes(200 * 1024, 7);
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let t = std::thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    t.join().unwrap();
    assert!(
        got == data,
        "tail lost: got {} of {} bytes",
        got.len(),
        data.len()
    );
}

fn ipv6_listener_echoes() {
    let port = support::free_port();
    let daemon = Daemon::start(&format!(
        r#"
        [tcp]
        listen = ["127.0.0.1:{p}", "[::1]:{p}"]
        "#,
        p = port
    ));
    let addr: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let data = random_bytes(100_000, 3);
    assert!(tcp_roundtrip(addr, &data, 9) == data);
    assert!(daemon.log().contains(&format!("[::1]:{port}")));
}
