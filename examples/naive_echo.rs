//! The naive tokio echo server: the baseline `benches/compare.sh` measures echod
//! against. TCP: a task per connection, an 8 KiB buffer allocated up front and held for
//! the connection's life, read then `write_all`. UDP: one socket, `recv_from` then
//! `send_to`. What most people write first.
//!
//! Run: `cargo run --release --example naive_echo -- 7008` (TCP and UDP on 127.0.0.1).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(7008);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let udp = UdpSocket::bind(("127.0.0.1", port)).await?;
    tokio::spawn(async move {
        let mut buf = vec![0; 65_536];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let _ = udp.send_to(&buf[..n], peer).await;
        }
    });
    loop {
        let (mut socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0; 8192];
            loop {
                let n = match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if socket.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}
