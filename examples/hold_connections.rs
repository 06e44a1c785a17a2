//! Opens N idle TCP connections to a loopback echo server and holds them, so
//! `benches/compare.sh` can read the server's memory per idle connection.
//!
//! Each connection echoes one byte first, so the server has really accepted and
//! served it; then all stay open and silent. Prints `ready N` when every connection is
//! up and holds them until stdin closes.
//!
//! Run: `cargo run --release --example hold_connections -- 127.0.0.1:7007 10000`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().ok_or("usage: ADDR COUNT")?.parse()?;
    if !addr.ip().is_loopback() {
        return Err("only loopback targets are allowed".into());
    }
    let count: usize = args.next().ok_or("usage: ADDR COUNT")?.parse()?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connection {i}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"x")?;
        let mut echo = [0u8; 1];
        s.read_exact(&mut echo)
            .map_err(|e| format!("connection {i}: no echo: {e}"))?;
        held.push(s);
    }
    println!("ready {}", held.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    Ok(())
}
