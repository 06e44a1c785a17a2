//! The HTTP endpoint under attack from the network, and with the process out of file
//! descriptors: the liveness probe must keep answering within the 2 s a Kubernetes
//! probe waits, because a probe that fails restarts a daemon that is doing its job.
//!
//! Every client here is on loopback (attackers and probes bind distinct 127.0.0.x
//! addresses, all local), every loop is bounded in count and time, and the daemon is
//! the test's own child, killed by PID when the test ends.

use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
    Daemon, Options, PROBE_TIMEOUT, Peer, echoes, peer_state, poll, probe, slow_reader, slowloris,
    wait_until,
};

crate::support::tests![
    probes_answer_while_one_address_attacks_the_http_port,
    probes_answer_while_many_addresses_fill_the_table,
    probes_answer_while_echo_clients_exhaust_file_descriptors,
];

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const PROBER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// How many of `peers` the daemon still holds a socket for on `local_port` (a socket
/// with an owner, inode ≠ 0, in /proc/net/tcp). A socket the daemon closed is gone, or
/// an orphan with inode 0 that only the kernel keeps.
fn held_by_daemon(local_port: u16, peers: &[SocketAddr]) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    // /proc/net/tcp writes an IPv4 address as the u32 in host (little-endian) order.
    let hex = |addr: &SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let peers: Vec<String> = peers.iter().map(hex).collect();
    let local_suffix = format!(":{local_port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9
                && f[1].ends_with(&local_suffix)
                && peers.iter().any(|p| p == f[2])
                && f[9] != "0"
        })
        .count()
}

fn probes_answer_while_one_address_attacks_the_http_port() {
    let daemon = Daemon::start("");
    let http = daemon.http;
    // Slow readers first: on a server without per-address limits they take every slot.
    let slow_readers: Vec<TcpStream> = (0..64).map(|_| slow_reader(ATTACKER, http)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let attack = slowloris(
        http,
        vec![ATTACKER],
        256,
        Arc::clone(&stop),
        Duration::from_secs(40),
    );
    let attacked = Instant::now();

    // 120 probes, one every 100 ms, from another address.
    let probes = 120;
    let readers: Vec<SocketAddr> = slow_readers
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect();
    let mut released_after = None;
    let (failures, latencies) = probe_series(http, probes, || {
        if released_after.is_none() && held_by_daemon(http.port(), &readers) == 0 {
            released_after = Some(attacked.elapsed());
        }
    });
    let probing = attacked.elapsed();
    let slowest = &latencies[latencies.len().saturating_sub(3)..];
    let median = latencies.get(latencies.len() / 2);

    // The daemon lets go of every slow reader within a bound, while the attack goes
    // on: the write timeout after its responses stopped draining.
    let deadline = attacked + Duration::from_secs(20);
    let mut held = held_by_daemon(http.port(), &readers);
    poll(deadline.saturating_duration_since(Instant::now()), || {
        held = held_by_daemon(http.port(), &readers);
        (held == 0).then_some(())
    });
    let released_after = released_after.unwrap_or_else(|| attacked.elapsed());
    stop.store(true, Ordering::Relaxed);
    let made = attack.join().expect("attack thread");
    eprintln!(
        "{probes} probes in {probing:?}: {} failed {failures:?}, median {median:?}, slowest {slowest:?}; \
         slowloris connections made {made}; the daemon holds {held} of 64 slow readers \
         {released_after:?} after the attack began",
        failures.len(),
    );
    // README: "120 of 120 `/healthz` probes from another address answered".
    assert!(
        failures.is_empty(),
        "{} of {probes} probes failed (README: 120 of 120 within {PROBE_TIMEOUT:?}): {failures:#?}",
        failures.len()
    );
    assert_eq!(
        held, 0,
        "slow readers still held 20 s after the attack began"
    );
    drop(slow_readers);
    assert_eq!(probe(PROBER, http, "/readyz"), Ok(200));
}

/// Runs `count` probes of `/healthz`, one every 100 ms, from `PROBER`; stops early once
/// more than 1 % failed (the verdict is in); `after_each` runs after every probe.
/// Returns the failures and the successful latencies, sorted.
fn probe_series(
    http: SocketAddr,
    count: usize,
    mut after_each: impl FnMut(),
) -> (Vec<String>, Vec<Duration>) {
    let mut failures = Vec::new();
    let mut latencies = Vec::new();
    for i in 0..count {
        if failures.len() * 100 > count {
            break;
        }
        let t = Instant::now();
        match probe(PROBER, http, "/healthz") {
            Ok(200) => latencies.push(t.elapsed()),
            Ok(code) => failures.push(format!("probe {i}: status {code}")),
            Err(e) => failures.push(format!("probe {i}: {e}")),
        }
        after_each();
        std::thread::sleep(Duration::from_millis(100));
    }
    latencies.sort();
    (failures, latencies)
}

/// Many addresses, each within its share, together fill the connection table with
/// connections that never send a request: a probe takes the place of the oldest.
fn probes_answer_while_many_addresses_fill_the_table() {
    let daemon = Daemon::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let sources: Vec<Ipv4Addr> = (10..26)
        .map(|last| Ipv4Addr::new(127, 0, 0, last))
        .collect();
    let attack = slowloris(
        daemon.http,
        sources,
        128,
        Arc::clone(&stop),
        Duration::from_secs(30),
    );
    attack.wait_in_place();
    let probes = 60;
    let (failures, latencies) = probe_series(daemon.http, probes, || {});
    stop.store(true, Ordering::Relaxed);
    let made = attack.join().expect("attack thread");
    eprintln!(
        "{probes} probes against slowloris from 16 addresses: {} failed {failures:?}, \
         median {:?}, slowest {:?}; attack connections made {made}",
        failures.len(),
        latencies.get(latencies.len() / 2),
        latencies.last()
    );
    assert!(
        failures.len() * 100 <= probes,
        "{} of {probes} probes failed: {failures:#?}",
        failures.len()
    );
}

fn probes_answer_while_echo_clients_exhaust_file_descriptors() {
    let daemon = Daemon::start_with(Options {
        max_open_files: Some(64),
        ..Options::default()
    });
    // Three times more clients than descriptors: the kernel completes every handshake.
    let opened = Instant::now();
    // Each sends at once, as clients do: one shed with unread input must still see EOF.
    let clients: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut c = TcpStream::connect(daemon.tcp).expect("connect");
            c.write_all(b"ping").expect("send");
            c
        })
        .collect();
    // Every client is served or closed promptly — none waits unseen in the queue. A
    // client's fate is recorded when first seen (a reset is reported only once).
    let mut fate: Vec<Option<Peer>> = vec![None; clients.len()];
    poll(
        Duration::from_secs(3).saturating_sub(opened.elapsed()),
        || {
            for (c, fate) in clients.iter().zip(&mut fate) {
                let now = peer_state(c);
                if fate.is_none() && now != Peer::Open {
                    *fate = Some(now);
                }
            }
            let closed = fate.iter().filter(|f| f.is_some()).count();
            (closed >= 200 - 64).then_some(())
        },
    );
    // Those still open must have echoed, or do so within 3 s.
    let mut served = vec![false; clients.len()];
    poll(Duration::from_secs(3), || {
        let mut waiting = 0;
        for ((c, fate), served) in clients.iter().zip(&mut fate).zip(&mut served) {
            if fate.is_some() || *served {
                continue;
            }
            match c.peek(&mut [0u8; 4]) {
                Ok(4) => *served = true,
                Ok(0) => *fate = Some(Peer::Eof),
                Err(e) if e.kind() != ErrorKind::WouldBlock => *fate = Some(Peer::Reset),
                _ => waiting += 1,
            }
        }
        (waiting == 0).then_some(())
    });
    let reset = fate.iter().filter(|f| **f == Some(Peer::Reset)).count();
    let closed = fate.iter().filter(|f| f.is_some()).count();
    let served = served.iter().filter(|s| **s).count();
    let hanging = clients.len() - closed - served;
    eprintln!(
        "200 clients under RLIMIT_NOFILE=64: {served} served, {closed} closed ({reset} of \
         them reset), {hanging} hanging, sorted out in {:?}",
        opened.elapsed()
    );
    assert_eq!(hanging, 0, "clients left waiting in the accept queue");
    assert!(served >= 16, "only {served} clients served");
    assert_eq!(reset, 0, "closed clients were reset instead of seeing EOF");

    // Descriptors are still exhausted (the served clients hold them): probes answer.
    let mut answered = Vec::new();
    for path in ["/healthz", "/metrics"] {
        for _ in 0..5 {
            let t = Instant::now();
            let result = probe(crate::support::LOCAL, daemon.http, path);
            answered.push((path, result.clone(), t.elapsed()));
        }
    }
    eprintln!("probes while out of descriptors: {answered:?}");
    assert!(
        answered.iter().all(|(_, r, _)| *r == Ok(200)),
        "probes failed while descriptors were exhausted: {answered:#?}"
    );
    // The operator sees what happens, in the same scrape.
    let (_, exposition) = crate::support::http_get(daemon.http, "/metrics").expect("scrape");
    let fd_limit = crate::support::metric_value(
        &exposition,
        "echod_tcp_accept_errors_total",
        &[("kind", "fd_limit")],
    );
    // Absent while descriptors are exhausted: the process collector cannot open /proc.
    let open_fds = crate::support::metric_sample(&exposition, "process_open_fds", &[]);
    eprintln!("while exhausted: fd_limit errors {fd_limit}, process_open_fds {open_fds:?}");
    assert_eq!(
        fd_limit, closed as f64,
        "each shed client counted once: {fd_limit} fd_limit errors for {closed} shed clients"
    );
    // Out of descriptors and idle: no core spins on accept (100 ticks = 1 core-second).
    let ticks = crate::support::cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = crate::support::cpu_ticks(daemon.pid()) - ticks;
    eprintln!("CPU while exhausted and idle: {ticks} ticks in 1 s");
    assert!(ticks < 10, "{ticks} ticks in 1 s while out of descriptors");
    drop(clients);
    // And the echo port recovers once the clients leave.
    wait_until(
        Duration::from_secs(10),
        || "echo never recovered",
        || echoes(daemon.tcp),
    );
}
