//! Clients that connected and sent data just before a stop, while echod had not yet
//! accepted them: the README promises they see a clean EOF. Closing a socket whose
//! input was never read makes the kernel send a reset instead, which a client reports
//! as an error ("connection reset by peer") — so the drain must read and discard it.
//!
//! The daemon is frozen with SIGSTOP so the clients pile up in its accept queue, then
//! told to stop and thawed. Everything is on loopback; the daemon is the test's child.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{Daemon, Options};

crate::support::tests![clients_queued_at_sigterm_see_eof_never_a_reset,];

/// Clients per round: enough that accepting them all takes longer than the stop takes
/// to arrive, so some are still queued when the listener closes.
const CLIENTS: usize = 400;

/// How a queued client's connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its bytes came back, then EOF: echod had accepted it before the stop.
    EchoedThenEof,
    /// EOF straight away: rejected by the drain, cleanly.
    Eof,
    /// A reset or another error: what the README says never happens.
    Reset,
    /// Nothing within 10 s.
    Hung,
}

/// Reads until EOF (10 s at most) and says how the connection ended.
fn read_to_end(s: &mut TcpStream, sent: &[u8]) -> End {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return End::Hung;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) if got.is_empty() => return End::Eof,
            Ok(0) if got == sent => return End::EchoedThenEof,
            Ok(0) => panic!("received {got:?}, sent {sent:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return End::Reset,
        }
    }
}

/// One round: `CLIENTS` clients queue up and send while echod is frozen, then it is stopped.
/// Half of them half-close after sending (like `echo hi | nc`), half keep their write
/// side open.
fn round(n: usize) -> Vec<End> {
    let mut daemon = Daemon::start_with(Options {
        toml: "[shutdown]\ndrain_timeout = \"3s\"\n",
        ..Options::default()
    });
    daemon.signal(libc::SIGSTOP);
    let message = format!("queued client, round {n}\n").into_bytes();
    let connected: Vec<std::io::Result<TcpStream>> = (0..CLIENTS)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&daemon.tcp, Duration::from_secs(2))?;
            s.write_all(&message)?;
            if i % 2 == 0 {
                s.shutdown(Shutdown::Write)?;
            }
            Ok(s)
        })
        .collect();
    // SIGTERM is delivered on SIGCONT; SIGCONT even if a connect failed, so the daemon
    // is never left frozen.
    daemon.signal(libc::SIGTERM);
    daemon.signal(libc::SIGCONT);
    let mut clients: Vec<TcpStream> = connected
        .into_iter()
        .map(|c| c.expect("client connects to the frozen daemon"))
        .collect();
    let ends: Vec<End> = clients
        .iter_mut()
        .map(|c| read_to_end(c, &message))
        .collect();
    drop(clients);
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    ends
}

/// Rounds in which some queued client must have been shed unserved.
const SHEDDING_ROUNDS: usize = 3;

/// Rounds at most: whether the stop reaches the accept loop before it has drained the
/// queue is a race between two runtime threads; on a loaded 2-core CI machine one round
/// in several accepts all 400 first (seen once), locally almost none do.
const MAX_ROUNDS: usize = 8;

fn clients_queued_at_sigterm_see_eof_never_a_reset() {
    let mut all = Vec::new();
    let mut shedding = 0;
    for n in 0..MAX_ROUNDS {
        let ends = round(n);
        let count = |e: End| ends.iter().filter(|x| **x == e).count();
        eprintln!(
            "round {n}: {} echoed then EOF, {} EOF, {} reset, {} hung",
            count(End::EchoedThenEof),
            count(End::Eof),
            count(End::Reset),
            count(End::Hung)
        );
        // A round in which every client was accepted before the stop tests the drain,
        // not the shedding of the queue; its clients still count for the reset check.
        if count(End::Eof) >= 1 {
            shedding += 1;
        }
        all.extend(ends);
        if shedding == SHEDDING_ROUNDS {
            break;
        }
    }
    assert_eq!(
        shedding, SHEDDING_ROUNDS,
        "only {shedding} of {MAX_ROUNDS} rounds shed a queued client unserved"
    );
    let bad: Vec<(usize, End)> = all
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, e)| matches!(e, End::Reset | End::Hung))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} queued clients did not see a clean EOF: {bad:?}",
        bad.len(),
        all.len()
    );
}
