//! TCP workers: each connection runs a sender and a receiver side by side.
//!
//! The sender claims messages from the shared plan, stamps each with its send time
//! (its intended time when open-loop) and writes it; the receiver reads exactly one
//! message per stamp, checks every byte and records the latency. In closed loop the
//! receiver hands a credit back per echo, which is what bounds the pipelining depth;
//! bulk and open-loop runs have no credits and are bounded by the socket buffers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::pattern::Pattern;
use super::{BenchError, Plan, Samples, Tally};

/// Connection attempts in flight at once while setting up.
const CONNECT_CONCURRENCY: usize = 256;

/// Opens every connection before the clock starts; fails if any cannot be made.
pub(super) async fn connect_all(
    target: SocketAddr,
    count: usize,
    limit: Duration,
) -> Result<Vec<TcpStream>, BenchError> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for _ in 0..count {
        let gate = Arc::clone(&gate);
        set.spawn(async move {
            let _permit = gate.acquire().await;
            match timeout(limit, TcpStream::connect(target)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {limit:?}")),
            }
        });
    }
    let mut streams = Vec::with_capacity(count);
    let mut failure = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(s)) => streams.push(s),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(e.to_string())),
        }
    }
    match failure {
        None => Ok(streams),
        Some(reason) => Err(BenchError::Connect {
            addr: target,
            reason: format!("{reason} ({} of {count} connected)", streams.len()),
        }),
    }
}

/// Runs every connection to the end and adds up what they saw.
pub(super) async fn run_all(
    streams: Vec<TcpStream>,
    plan: Arc<Plan>,
    credits: Option<usize>,
) -> Tally {
    let total = streams.len();
    let mut set = JoinSet::new();
    for (id, stream) in streams.into_iter().enumerate() {
        set.spawn(connection(id, total, stream, Arc::clone(&plan), credits));
    }
    Tally::join(set).await
}

async fn connection(
    id: usize,
    total: usize,
    stream: TcpStream,
    plan: Arc<Plan>,
    credits: Option<usize>,
) -> Tally {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let (stamps, pending) = mpsc::unbounded_channel();
    let credits = credits.map(|c| Arc::new(Semaphore::new(c)));
    let sender = Sender {
        id,
        total,
        plan: &plan,
        credits: credits.clone(),
    };
    let (sent, mut tally) = tokio::join!(
        sender.run(wr, stamps),
        receive(id, rd, &plan, pending, credits)
    );
    match sent {
        Ok(bytes) => tally.bytes_sent = bytes,
        Err((bytes, why)) => {
            tally.bytes_sent = bytes;
            tally.errors += 1;
            tally.problem(why);
        }
    }
    tally
}

/// The sending half of one connection.
struct Sender<'a> {
    id: usize,
    total: usize,
    plan: &'a Plan,
    credits: Option<Arc<Semaphore>>,
}

impl Sender<'_> {
    /// Sends until the plan says stop; returns the bytes sent (and why it failed).
    async fn run(
        self,
        mut wr: OwnedWriteHalf,
        stamps: mpsc::UnboundedSender<Instant>,
    ) -> Result<u64, (u64, String)> {
        let plan = self.plan;
        let phase = Pattern::phase(self.id);
        let size = plan.size as u64;
        let mut seq: u64 = 0;
        loop {
            if let Some(credits) = &self.credits {
                match credits.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
            }
            let Some(stamp) = plan.next_send(self.id, self.total, seq).await else {
                break;
            };
            if stamps.send(stamp).is_err() {
                break;
            }
            let data = plan.pattern.window(phase, seq * size, plan.size);
            let failed = match timeout(plan.timeout, wr.write_all(data)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("connection {}: send failed: {e}", self.id)),
                Err(_) => Some(format!(
                    "connection {}: send stalled for {:?}",
                    self.id, plan.timeout
                )),
            };
            if let Some(why) = failed {
                return Err((seq * size, why));
            }
            seq += 1;
        }
        // Half-close: the server may end the connection once it has echoed the rest.
        let _ = wr.shutdown().await;
        Ok(seq * size)
    }
}

/// Reads one echo per stamp, verifying and timing each.
async fn receive(
    id: usize,
    rd: OwnedReadHalf,
    plan: &Plan,
    mut pending: mpsc::UnboundedReceiver<Instant>,
    credits: Option<Arc<Semaphore>>,
) -> Tally {
    let phase = Pattern::phase(id);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut buf = vec![0u8; plan.size];
    let mut samples = Samples::new(plan);
    let mut tally = Tally::default();
    while let Some(stamp) = pending.recv().await {
        let offset = tally.bytes_received;
        let failed = match timeout(plan.timeout, rd.read_exact(&mut buf)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Some(format!(
                "connection {id}: server closed the connection after echoing {offset} bytes"
            )),
            Ok(Err(e)) => Some(format!("connection {id}: receive failed: {e}")),
            Err(_) => Some(format!(
                "connection {id}: no echo within {:?} after {offset} bytes",
                plan.timeout
            )),
        };
        if let Some(why) = failed {
            tally.errors += 1;
            tally.problem(why);
            // Stop the sender too: nothing more on this connection can be trusted.
            pending.close();
            if let Some(c) = &credits {
                c.close();
            }
            break;
        }
        if let Some(i) = plan.pattern.first_difference(phase, offset, &buf) {
            tally.mismatches += 1;
            tally.problem(format!(
                "connection {id}: echo differs from what was sent at stream offset {}",
                offset + i as u64
            ));
        }
        samples.record(stamp, buf.len());
        tally.messages += 1;
        tally.bytes_received += buf.len() as u64;
        if let Some(c) = &credits {
            c.add_permits(1);
        }
    }
    tally
}
