//! UDP workers: one connected socket per "connection", stop-and-wait.
//!
//! Each datagram carries its sequence number in the first [`HEADER`] bytes, followed by
//! the connection's pattern. A late echo of a datagram already counted lost is
//! recognised by its older sequence number and skipped; anything else that does not
//! match is a mismatch.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

use super::pattern::Pattern;
use super::{BenchError, Plan, Samples, Tally};
use crate::tools::net::{self, MAX_DATAGRAM};

/// Bytes of sequence number at the start of each datagram.
pub(super) const HEADER: usize = 8;

/// Opens one connected socket per simulated client.
pub(super) async fn open_all(
    target: SocketAddr,
    count: usize,
) -> Result<Vec<UdpSocket>, BenchError> {
    let local = net::any_local(target);
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = UdpSocket::bind(local).await?;
        socket
            .connect(target)
            .await
            .map_err(|e| BenchError::Connect {
                addr: target,
                reason: e.to_string(),
            })?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Runs every socket to the end and adds up what they saw.
pub(super) async fn run_all(sockets: Vec<UdpSocket>, plan: Arc<Plan>) -> Tally {
    let total = sockets.len();
    let mut set = JoinSet::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        let plan = Arc::clone(&plan);
        set.spawn(async move { exchange(id, total, &socket, &plan).await });
    }
    Tally::join(set).await
}

async fn exchange(id: usize, total: usize, socket: &UdpSocket, plan: &Plan) -> Tally {
    let phase = Pattern::phase(id);
    let size = plan.size;
    let mut samples = Samples::new(plan);
    let mut tally = Tally::default();
    let mut message = vec![0u8; size];
    let mut reply = vec![0u8; MAX_DATAGRAM + 1];
    let mut seq: u64 = 0;
    loop {
        let Some(stamp) = plan.next_send(id, total, seq).await else {
            break;
        };
        let offset = seq * size as u64;
        message[..HEADER].copy_from_slice(&seq.to_le_bytes());
        message[HEADER..].copy_from_slice(plan.pattern.window(phase, offset, size - HEADER));
        if let Err(e) = socket.send(&message).await {
            tally.error(format!("socket {id}: send failed: {}", describe(&e)));
            break;
        }
        tally.bytes_sent += size as u64;
        // `--duration` bounds the run: a reply still missing when the run ends is not
        // waited for (nor counted lost: it may be on its way).
        let lost_at = Instant::now() + plan.timeout;
        let deadline = lost_at.min(plan.stop_sending);
        loop {
            let n = match timeout_at(deadline, socket.recv(&mut reply)).await {
                Err(_) => {
                    if deadline == lost_at {
                        tally.lost += 1;
                    }
                    break;
                }
                Ok(Err(e)) => {
                    tally.error(format!("socket {id}: receive failed: {}", describe(&e)));
                    return tally;
                }
                Ok(Ok(n)) => n,
            };
            let echoed_seq = reply[..n]
                .get(..HEADER)
                .and_then(|h| h.try_into().ok())
                .map(u64::from_le_bytes);
            if echoed_seq.is_some_and(|s| s < seq) {
                continue;
            }
            let intact = n == size
                && echoed_seq == Some(seq)
                && plan
                    .pattern
                    .first_difference(phase, offset, &reply[HEADER..n])
                    .is_none();
            if !intact {
                tally.mismatches += 1;
                tally.problem(format!(
                    "socket {id}: datagram {seq} came back different ({n} of {size} bytes)"
                ));
            }
            samples.record(stamp, n);
            tally.messages += 1;
            tally.bytes_received += n as u64;
            break;
        }
        seq += 1;
    }
    tally
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused (nothing listens there)".into(),
        _ => e.to_string(),
    }
}
