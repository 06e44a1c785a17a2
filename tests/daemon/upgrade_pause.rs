//! The pause of an upgrade in place does not grow with the connections held: with
//! 10 000 open connections the listeners stop accepting for at most 50 ms (the release
//! build; README "Upgrade pause", measured by `benches/upgrade_pause.sh`), and every
//! connection still echoes afterwards.
//!
//! The held connections hand themselves over while the listeners still serve, and the
//! new image accepts before it takes them on: what stays in the pause is the exec and
//! reading the description. Before that change the pause was 380–430 ms at 10 000
//! connections on the same machine (load 4–9), so either bound below fails on it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "../../examples/common/connect_from.rs"]
mod connect;

use crate::support::{Daemon, Options, echod_bin, raise_open_files_limit};
use connect::connect_from;

crate::support::tests![the_pause_stays_short_with_ten_thousand_connections_held];

/// Connections held across the upgrade.
const HELD: usize = 10_000;

/// The bound on `echod_last_upgrade_pause_seconds`: the documented 50 ms for the release
/// build (`cargo test --release`). The debug build runs the same system calls with
/// unoptimised code around them (decoding the description, starting the runtime): its
/// pause measured 66 ms here (load 2), and it is bounded at 200 ms for the other
/// engineers' builds beside it — below the 261 ms the earlier design took in the debug
/// build at that load (and the 380 ms and more it took in release).
const BOUND: Duration = if cfg!(debug_assertions) {
    Duration::from_millis(200)
} else {
    Duration::from_millis(50)
};

/// `count` connections to `target`, each echoed once; from 127.0.0.2 onwards, moving to
/// the next source address when one has no port left (TIME_WAIT from earlier runs).
fn hold(target: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    let mut source = 2u8;
    while held.len() < count {
        match connect_from(Ipv4Addr::new(127, 0, 0, source), target) {
            Ok(stream) => held.push(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse
                ) && source < 250 =>
            {
                source += 1;
            }
            Err(e) => panic!("connection {} of {count}: {e}", held.len() + 1),
        }
    }
    held
}

fn the_pause_stays_short_with_ten_thousand_connections_held() {
    // The test holds HELD client sockets, the daemon as many and their duplicates while
    // it hands them over.
    let limit = 2 * HELD as u64 - 100;
    raise_open_files_limit(limit);
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("echod");
    std::fs::copy(echod_bin(), &bin).unwrap();
    let daemon = Daemon::start_with(Options {
        binary: Some(bin.clone()),
        toml: &format!(
            "[tcp]\nmax_connections = {m}\nmax_connections_per_ip = {m}\n",
            m = HELD + 100
        ),
        max_open_files: Some(limit),
        ..Options::default()
    });
    let mut held = hold(daemon.tcp, HELD);
    daemon.wait_metric("echod_tcp_connections_active", &[], HELD as f64);

    let new = bin.with_extension("new");
    std::fs::copy(echod_bin(), &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();
    let asked = Instant::now();
    daemon.signal(libc::SIGHUP);
    crate::support::wait_until(
        Duration::from_secs(30),
        || format!("no upgrade:\n{}", daemon.log()),
        || daemon.log().contains("upgrade complete"),
    );
    let pause = daemon.metric("echod_last_upgrade_pause_seconds", &[]);
    println!(
        "upgrade pause with {HELD} connections: {:.1} ms (bound {} ms; upgrade took {:?})",
        pause * 1000.0,
        BOUND.as_millis(),
        asked.elapsed()
    );
    assert!(
        pause > 0.0 && pause <= BOUND.as_secs_f64(),
        "listener pause {:.1} ms with {HELD} connections held; at most {} ms",
        pause * 1000.0,
        BOUND.as_millis()
    );
    // Nothing lost: every connection is served by the new image and echoes.
    daemon.wait_metric("echod_tcp_connections_active", &[], HELD as f64);
    for stream in &mut held {
        stream.write_all(b"y").unwrap();
    }
    for (i, stream) in held.iter_mut().enumerate() {
        let mut echo = [0u8; 1];
        stream
            .read_exact(&mut echo)
            .unwrap_or_else(|e| panic!("connection {i} after the upgrade: {e}"));
        assert_eq!(&echo, b"y", "connection {i}");
    }
    // And a new client is served.
    let data = crate::support::random_bytes(10_000, 9);
    assert_eq!(crate::support::tcp_roundtrip(daemon.tcp, &data, 9), data);
}
