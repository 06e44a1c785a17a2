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

use std::cell::Cell;
use std::hint::black_box;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use echod::metrics::{Metrics, TcpListenerMetrics, UdpBatch, UdpListenerMetrics};

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

/// Sums the server-side time of `ECHOES` echoes; `server_burst` returns false when the
/// datagram or segment had not arrived yet, and such rounds are not counted.
fn timed_echoes(
    mut client_send: impl FnMut(),
    mut server_burst: impl FnMut() -> bool,
    mut client_recv: impl FnMut(),
) -> f64 {
    let mut total = Duration::ZERO;
    let mut counted = 0u32;
    while counted < ECHOES {
        client_send();
        let t = Instant::now();
        let ok = server_burst();
        let elapsed = t.elapsed();
        if ok {
            total += elapsed;
            counted += 1;
        }
        client_recv();
    }
    total.as_nanos() as f64 / f64::from(ECHOES)
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
    let pending = Cell::new(false);
    timed_echoes(
        || {
            if !pending.get() {
                (&client).write_all(&PAYLOAD).unwrap();
            }
        },
        || match server.read(&mut sbuf) {
            Ok(n) => {
                server.write_all(&sbuf[..n]).unwrap();
                let again = server.read(&mut sbuf);
                assert!(matches!(again, Err(ref e) if e.kind() == ErrorKind::WouldBlock));
                pending.set(false);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                pending.set(true);
                false
            }
            Err(e) => panic!("read: {e}"),
        },
        || {
            if !pending.get() {
                (&client).read_exact(&mut cbuf).unwrap();
            }
        },
    )
}

fn udp_syscalls_ns() -> f64 {
    let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    server.set_nonblocking(true).unwrap();
    let target = server.local_addr().unwrap();
    let mut sbuf = vec![0u8; 65_536];
    let mut cbuf = [0u8; 64];
    let pending = Cell::new(false);
    timed_echoes(
        || {
            if !pending.get() {
                client.send_to(&PAYLOAD, target).unwrap();
            }
        },
        || match server.recv_from(&mut sbuf) {
            Ok((n, peer)) => {
                server.send_to(&sbuf[..n], peer).unwrap();
                let again = server.recv_from(&mut sbuf);
                assert!(matches!(again, Err(ref e) if e.kind() == ErrorKind::WouldBlock));
                pending.set(false);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                pending.set(true);
                false
            }
            Err(e) => panic!("recv: {e}"),
        },
        || {
            if !pending.get() {
                client.recv(&mut cbuf).unwrap();
            }
        },
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
