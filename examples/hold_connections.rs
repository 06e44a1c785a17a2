//! Opens idle TCP connections to a loopback echo server and holds them, so
//! `benches/compare.sh` can read the server's memory per idle connection.
//!
//! Each connection echoes one byte first, so the server has really accepted and
//! served it; then all stay open and silent. With several counts (ascending), it opens
//! connections up to the first count, prints `ready N sources K`, waits for a line on stdin, goes
//! on to the next count, and so on: one server's memory curve in one run. After the last
//! count it holds every connection until stdin closes.
//!
//! One source address has one ephemeral port range (and ports still in TIME_WAIT from
//! an earlier run are not free for `bind`), so connections come from 127.0.0.11 until it
//! has no port left, then from 127.0.0.12, 127.0.0.13 and so on (all of 127/8 is local).
//! Each `ready N` line ends with `sources K`: how many addresses were used so far.
//!
//! Run: `cargo run --release --example hold_connections -- 127.0.0.1:7007 10000`
//! or:  `cargo run --release --example hold_connections -- 127.0.0.1:7007 5000 10000 19000`

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};

#[path = "common/connect_from.rs"]
mod connect;

use connect::connect_from;

const USAGE: &str = "usage: hold_connections ADDR COUNT [COUNT ...]";

/// Source addresses tried in turn: 127.0.0.11 up to 127.0.0.250. The first ten are left
/// to other clients: a held connection's port stays in TIME_WAIT for a minute after the
/// holder exits, and compare.sh's echoload reading (sources 127.0.0.1–.4) comes right after.
const FIRST_SOURCE: u8 = 11;
const LAST_SOURCE: u8 = 250;

/// Out of ports on this source address (connect with a deferred port, or bind).
fn out_of_ports(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().ok_or(USAGE)?.parse()?;
    if !addr.ip().is_loopback() || !addr.is_ipv4() {
        return Err("only IPv4 loopback targets are allowed".into());
    }
    let counts: Vec<usize> = args.map(|c| c.parse()).collect::<Result<_, _>>()?;
    if counts.is_empty() || counts.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("{USAGE} (counts ascending)").into());
    }
    let mut held = Vec::with_capacity(*counts.last().unwrap_or(&0));
    let mut source = FIRST_SOURCE;
    let mut stdin = std::io::stdin().lock();
    for (step, &count) in counts.iter().enumerate() {
        while held.len() < count {
            let from = Ipv4Addr::new(127, 0, 0, source);
            match connect_from(from, addr) {
                Ok(s) => held.push(s),
                Err(e) if out_of_ports(&e) && source < LAST_SOURCE => source += 1,
                Err(e) => {
                    return Err(format!("connection {} from {from}: {e}", held.len()).into());
                }
            }
        }
        println!("ready {} sources {}", held.len(), source - FIRST_SOURCE + 1);
        std::io::stdout().flush()?;
        if step + 1 < counts.len() {
            let mut line = String::new();
            if stdin.read_line(&mut line)? == 0 {
                return Ok(()); // stdin closed: stop early
            }
        }
    }
    let mut rest = Vec::new();
    stdin.read_to_end(&mut rest)?;
    Ok(())
}
