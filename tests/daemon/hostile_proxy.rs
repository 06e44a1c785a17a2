//! PROXY protocol under attack: connections from a trusted proxy that never send their
//! header must count against `tcp.max_connections` (behind a load balancer that sends
//! the header with the client's first data, any client can open them), and a proxied
//! client refused by a limit must see EOF, not a reset, though it sent data with its
//! header (as HAProxy does).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use crate::support::{Daemon, Peer, connect_from, peer_state};

crate::support::tests![
    silent_proxied_connections_count_against_max_connections,
    a_refused_proxied_client_that_sent_data_sees_eof,
];

const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);

fn start(extra: &str) -> Daemon {
    Daemon::start(&format!(
        "[tcp.proxy_protocol]\ntrusted_sources = [\"{PROXY}/32\"]\nheader_timeout = \"30s\"\n{extra}"
    ))
}

/// Waits (3 s at most) until the daemon has closed `n` of `streams`; returns how many
/// it closed, and how many of those with a reset.
fn closed(streams: &[TcpStream], n: usize) -> (usize, usize) {
    let mut fate: Vec<Option<Peer>> = vec![None; streams.len()];
    let mut closed = 0;
    crate::support::poll(Duration::from_secs(3), || {
        for (s, fate) in streams.iter().zip(&mut fate) {
            let now = peer_state(s);
            if fate.is_none() && now != Peer::Open {
                *fate = Some(now);
            }
        }
        closed = fate.iter().filter(|f| f.is_some()).count();
        (closed >= n).then_some(())
    });
    let reset = fate.iter().filter(|f| **f == Some(Peer::Reset)).count();
    (closed, reset)
}

/// 40 silent connections from the proxy against `max_connections = 20` (the header
/// timeout is 30 s, so only the limit can close them): 20 are closed at once, with EOF.
/// The 20 held count in `echod_tcp_connections_active` (so the near-limit alert,
/// active / max, sees the table full), and leave it when they close.
fn silent_proxied_connections_count_against_max_connections() {
    let daemon = start("[tcp]\nmax_connections = 20\n");
    let silent: Vec<TcpStream> = (0..40).map(|_| connect_from(PROXY, daemon.tcp)).collect();
    let (closed, reset) = closed(&silent, 20);
    eprintln!("40 silent proxied connections, max_connections 20: {closed} closed ({reset} reset)");
    assert_eq!(closed, 20, "silent connections beyond the limit were held");
    assert_eq!(reset, 0, "refused with a reset");
    assert_eq!(
        daemon.metric(
            "echod_tcp_connections_rejected_total",
            &[("reason", "global_limit")]
        ),
        20.0
    );
    let active = daemon.metric("echod_tcp_connections_active", &[]);
    let max = daemon.metric("echod_tcp_max_connections", &[]);
    eprintln!("while held: echod_tcp_connections_active {active} of {max}");
    assert_eq!(
        active, 20.0,
        "connections waiting for a header are not counted"
    );
    assert_eq!(max, 20.0);
    drop(silent);
    crate::support::wait_until(
        Duration::from_secs(5),
        || "echod_tcp_connections_active never went back to 0",
        || daemon.metric("echod_tcp_connections_active", &[]) == 0.0,
    );
}

/// `max_connections_per_ip = 1`: a second client 192.0.2.1 through the proxy sends its
/// header and data in one write, is refused, and must read EOF — 12 times.
fn a_refused_proxied_client_that_sent_data_sees_eof() {
    let daemon = start("[tcp]\nmax_connections_per_ip = 1\n");
    let mut first = connect_from(PROXY, daemon.tcp);
    first
        .write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 7\r\nfirst")
        .unwrap();
    let mut buf = [0u8; 5];
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    first
        .read_exact(&mut buf)
        .expect("the first client is served");
    let mut resets = 0;
    for i in 0..12 {
        let mut again = connect_from(PROXY, daemon.tcp);
        again
            .write_all(format!("PROXY TCP4 192.0.2.1 127.0.0.1 {} 7\r\n", 2 + i).as_bytes())
            .unwrap();
        // Data with the header, and more after it, as a client that does not wait.
        let _ = again.write_all(&[b'x'; 4096]);
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match again.read(&mut [0u8; 4096]) {
            Ok(0) => {}
            Ok(_) => panic!("a refused client was echoed"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => resets += 1,
            Err(e) => panic!("neither EOF nor reset: {e}"),
        }
    }
    eprintln!("refused proxied clients that sent data: {resets} of 12 reset");
    assert_eq!(
        resets, 0,
        "{resets} of 12 refused proxied clients were reset"
    );
}
