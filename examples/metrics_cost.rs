//! What counting costs the echo path, measured in one run.
//!
//! echod adds TCP byte counts once per read burst and UDP counts once per batch, so the
//! price of metrics is a fixed number of atomic adds per burst. This example times
//! exactly those adds on echod's real `Metrics` (alone, and with two threads hitting the
//! same counters, the worst case across cores) and compares them with the *least* work
//! the server must do per burst anyway: the socket calls of one 64-byte echo on
//! loopback (TCP: read, write, read→EAGAIN; UDP: recvfrom, sendto, recvfrom→EAGAIN).
//! The real server also waits in epoll and runs tokio, so the ratio printed is an
//! upper bound on the slowdown. Median of 5 repeats.
//!
//! Run: `cargo run --release --example metrics_cost`

use std::hint::black_box;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use echod::daemon::metrics::{Metrics, TcpListenerMetrics, UdpBatch, UdpListenerMetrics};

const REPEATS: usize = 5;
const ECHOES: u32 = 20_000;
const COUNTS: u32 = 5_000_000;
const PAYLOAD: [u8; 64] = [b'e'; 64];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per iteration of `f`, run `n` times.
fn per_iteration(n: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

/// Server-side nanoseconds per echo, over `ECHOES` echoes. `server_burst` handles one
/// message and fails with `WouldBlock` if it has not arrived yet; such a round is
/// retried without sending again and is not counted.
fn timed_echoes(
    mut client_send: impl FnMut(),
    mut server_burst: impl FnMut() -> io::Result<()>,
    mut client_recv: impl FnMut(),
) -> f64 {
    let mut total = Duration::ZERO;
    let mut counted = 0u32;
    let mut pending = false;
    while counted < ECHOES {
        if !pending {
            client_send();
        }
        let t = Instant::now();
        let result = server_burst();
        let elapsed = t.elapsed();
        match result {
            Ok(()) => {
                total += elapsed;
                counted += 1;
                pending = false;
                client_recv();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => pending = true,
            Err(e) => panic!("echo failed: {e}"),
        }
    }
    total.as_nanos() as f64 / f64::from(ECHOES)
}

/// The read that ends a burst must find the socket empty.
fn expect_empty<T>(r: io::Result<T>) {
    assert!(matches!(r, Err(ref e) if e.kind() == ErrorKind::WouldBlock));
}

fn tcp_syscalls_ns() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    server.set_nonblocking(true).unwrap();
    let mut sbuf = [0u8; 16 * 1024];
    let mut cbuf = [0u8; 64];
    timed_echoes(
        || (&client).write_all(&PAYLOAD).unwrap(),
        || {
            let n = server.read(&mut sbuf)?;
            server.write_all(&sbuf[..n])?;
            expect_empty(server.read(&mut sbuf));
            Ok(())
        },
        || (&client).read_exact(&mut cbuf).unwrap(),
    )
}

fn udp_syscalls_ns() -> f64 {
    let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    server.set_nonblocking(true).unwrap();
    let target = server.local_addr().unwrap();
    let mut sbuf = vec![0u8; 65_536];
    let mut cbuf = [0u8; 64];
    timed_echoes(
        || assert_eq!(client.send_to(&PAYLOAD, target).unwrap(), PAYLOAD.len()),
        || {
            let (n, peer) = server.recv_from(&mut sbuf)?;
            server.send_to(&sbuf[..n], peer)?;
            expect_empty(server.recv_from(&mut sbuf));
            Ok(())
        },
        || assert_eq!(client.recv(&mut cbuf).unwrap(), PAYLOAD.len()),
    )
}

/// What a TCP connection adds to the shared counters at the end of each burst.
fn tcp_count(m: &TcpListenerMetrics) {
    m.rx_bytes.inc_by(black_box(64));
    m.tx_bytes.inc_by(black_box(64));
}

/// One datagram's counting with a batch of one (the worst case: a flush per datagram).
fn udp_count(m: &UdpListenerMetrics) {
    let mut batch = UdpBatch::default();
    batch.received(black_box(64));
    batch.sent(black_box(64));
    batch.flush(m);
}

/// Nanoseconds per call of `f` while two threads call it at once on the same counters.
fn contended(f: impl Fn() + Sync) -> f64 {
    std::thread::scope(|s| {
        let a = s.spawn(|| per_iteration(COUNTS, &f));
        let b = s.spawn(|| per_iteration(COUNTS, &f));
        a.join().unwrap().max(b.join().unwrap())
    })
}

fn main() {
    let metrics = Metrics::new();
    let tcp = metrics.tcp_listener("127.0.0.1:7");
    let udp = metrics.udp_listener("127.0.0.1:7");
    let mut rows: [(&str, Vec<f64>); 6] = Default::default();
    for _ in 0..REPEATS {
        let results = [
            ("TCP socket calls per burst", tcp_syscalls_ns()),
            (
                "TCP counting per burst",
                per_iteration(COUNTS, || tcp_count(&tcp)),
            ),
            (
                "TCP counting per burst, 2 threads",
                contended(|| tcp_count(&tcp)),
            ),
            ("UDP socket calls per datagram", udp_syscalls_ns()),
            (
                "UDP counting per datagram",
                per_iteration(COUNTS, || udp_count(&udp)),
            ),
            (
                "UDP counting per datagram, 2 threads",
                contended(|| udp_count(&udp)),
            ),
        ];
        for (row, (name, ns)) in rows.iter_mut().zip(results) {
            row.0 = name;
            row.1.push(ns);
        }
    }
    let m: Vec<f64> = rows.iter().map(|(_, v)| median(v.clone())).collect();
    println!("median of {REPEATS} repeats (ns):");
    for ((name, v), med) in rows.iter().zip(&m) {
        let all: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
        println!("  {name:<38} {med:>8.1}   [{}]", all.join(", "));
    }
    let pct = |count: f64, work: f64| 100.0 * count / work;
    println!("counting / socket work (upper bound on the slowdown, limit 3 %):");
    println!(
        "  TCP: {:.2} % (contended {:.2} %)",
        pct(m[1], m[0]),
        pct(m[2], m[0])
    );
    println!(
        "  UDP: {:.2} % (contended {:.2} %)",
        pct(m[4], m[3]),
        pct(m[5], m[3])
    );
}
