//! A broken echo server for testing the benchmark script: it echoes TCP and UDP on
//! 127.0.0.1 like `naive_echo`, but flips the lowest bit of the first byte of every
//! read (TCP) or datagram (UDP). `benches/compare.sh` must fail on it; it runs it in
//! place of the naive echo only when `COMPARE_SELFTEST_CORRUPT=1` (see
//! tests/bench_script.rs). Never a baseline.
//!
//! Run: `cargo run --example corrupt_echo -- 7009`

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(7009);
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let udp = UdpSocket::bind(("127.0.0.1", port))?;
    std::thread::spawn(move || {
        let mut buf = vec![0; 65_536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            if n > 0 {
                buf[0] ^= 1;
            }
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    for socket in listener.incoming() {
        let mut socket = socket?;
        std::thread::spawn(move || {
            let mut buf = vec![0; 8192];
            loop {
                let n = match socket.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf[0] ^= 1;
                if socket.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
