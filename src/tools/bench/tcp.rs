//! TCP workers: each connection runs a sender and a receiver side by side.
//!
//! The sender claims messages from the shared plan, stamps each with its send time
//! (its intended time when open-loop) and writes it; the receiver reads exactly one
//! message per stamp, checks every byte and records the latency. In closed loop the
//! receiver hands a credit back per echo, which is what bounds the pipelining depth;
//! bulk and open-loop runs have no credits and are bounded by the socket buffers.
//!
//! Over TLS (a tls:// target) every connection completes its handshake before the clock
//! starts and ends with close_notify; the connect mode instead opens a connection —
//! TCP handshake, TLS handshake — per message, which is how handshakes per second are
//! measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::pattern::Pattern;
use super::{BenchError, Plan, Samples, Tally};

/// Connection attempts in flight at once while setting up.
const CONNECT_CONCURRENCY: usize = 256;

/// How connections are made: the address, and the TLS client for a tls:// target.
#[derive(Clone)]
pub(super) struct Dialer {
    pub(super) target: SocketAddr,
    pub(super) tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Time allowed for the TCP connect and for the TLS handshake.
    pub(super) limit: Duration,
}

/// A connected stream, plain or inside TLS.
pub(super) enum Wire {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Dialer {
    /// One connection, handshake done.
    async fn dial(&self) -> Result<Wire, String> {
        let limit = self.limit;
        let stream = within(
            limit,
            TcpStream::connect(self.target),
            |e| e.to_string(),
            |limit| format!("timed out after {limit:?}"),
        )
        .await?;
        let _ = stream.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Wire::Plain(stream));
        };
        let tls = within(
            limit,
            connector.connect(name.clone(), stream),
            |e| {
                format!(
                    "TLS handshake failed: {}",
                    crate::tools::tls::tls_failure(&e).unwrap_or_else(|| e.to_string())
                )
            },
            |limit| format!("TLS handshake timed out after {limit:?}"),
        )
        .await?;
        Ok(Wire::Tls(Box::new(tls)))
    }
}

/// `work`, given `limit` to finish: its error worded by `failed`, running out of time by
/// `late` (which is told the limit).
async fn within<T, E>(
    limit: Duration,
    work: impl Future<Output = Result<T, E>>,
    failed: impl FnOnce(E) -> String,
    late: impl FnOnce(Duration) -> String,
) -> Result<T, String> {
    match timeout(limit, work).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(late(limit)),
    }
}

/// Opens every connection before the clock starts; fails if any cannot be made.
pub(super) async fn connect_all(dialer: &Dialer, count: usize) -> Result<Vec<Wire>, BenchError> {
    let target = dialer.target;
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for _ in 0..count {
        let gate = Arc::clone(&gate);
        let dialer = dialer.clone();
        set.spawn(async move {
            let _permit = gate.acquire().await;
            dialer.dial().await
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
pub(super) async fn run_all(streams: Vec<Wire>, plan: Arc<Plan>, credits: Option<usize>) -> Tally {
    let total = streams.len();
    let mut set = JoinSet::new();
    for (id, stream) in streams.into_iter().enumerate() {
        let plan = Arc::clone(&plan);
        match stream {
            Wire::Plain(s) => {
                let (rd, wr) = s.into_split();
                set.spawn(connection(id, total, rd, wr, plan, credits));
            }
            Wire::Tls(s) => {
                let (rd, wr) = tokio::io::split(*s);
                set.spawn(connection(id, total, rd, wr, plan, credits));
            }
        }
    }
    Tally::join(set).await
}

/// Connect mode: `connections` workers, each opening a fresh connection per message
/// (TLS: a full handshake), echoing the message once and closing cleanly; the latency
/// is the whole of it.
pub(super) async fn churn_all(dialer: Dialer, connections: usize, plan: Arc<Plan>) -> Tally {
    let mut set = JoinSet::new();
    for id in 0..connections {
        let plan = Arc::clone(&plan);
        let dialer = dialer.clone();
        set.spawn(async move { churn(id, connections, &dialer, &plan).await });
    }
    Tally::join(set).await
}

async fn churn(id: usize, total: usize, dialer: &Dialer, plan: &Plan) -> Tally {
    let phase = Pattern::phase(id);
    let mut samples = Samples::new(plan);
    let mut tally = Tally::default();
    let mut buf = vec![0u8; plan.size];
    let mut seq: u64 = 0;
    while let Some(stamp) = plan.next_send(id, total, seq).await {
        let offset = seq * plan.size as u64;
        let data = plan.pattern.window(phase, offset, plan.size);
        let outcome = within(
            plan.timeout,
            async {
                match dialer.dial().await? {
                    Wire::Plain(s) => echo_once(s, data, &mut buf).await,
                    Wire::Tls(s) => echo_once(*s, data, &mut buf).await,
                }
            },
            |why| format!("connection {id}, message {seq}: {why}"),
            |limit| format!("connection {id}, message {seq}: not done within {limit:?}"),
        )
        .await;
        if let Err(why) = outcome {
            tally.error(why);
            break;
        }
        tally.bytes_sent += data.len() as u64;
        if let Some(i) = plan.pattern.first_difference(phase, offset, &buf) {
            tally.mismatches += 1;
            tally.problem(format!(
                "connection {id}: echo differs from what was sent at message {seq}, byte {i}"
            ));
        }
        samples.record(stamp, buf.len());
        tally.messages += 1;
        tally.bytes_received += buf.len() as u64;
        seq += 1;
    }
    tally
}

/// Sends `data`, reads its echo into `buf`, half-closes (TLS: close_notify first) and
/// waits for the server's end, so every connection ends cleanly on both sides.
async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    data: &[u8],
    buf: &mut [u8],
) -> Result<(), String> {
    stream
        .write_all(data)
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    stream
        .read_exact(buf)
        .await
        .map_err(|e| format!("receive failed: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("close failed: {e}"))?;
    let mut rest = [0u8; 64];
    match stream.read(&mut rest).await {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes more than were sent")),
        Err(e) => Err(format!("close failed: {e}")),
    }
}

async fn connection(
    id: usize,
    total: usize,
    rd: impl AsyncRead + Unpin,
    wr: impl AsyncWrite + Unpin,
    plan: Arc<Plan>,
    credits: Option<usize>,
) -> Tally {
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
            tally.error(why);
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
        mut wr: impl AsyncWrite + Unpin,
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
            let sent = within(
                plan.timeout,
                wr.write_all(data),
                |e| format!("connection {}: send failed: {e}", self.id),
                |limit| format!("connection {}: send stalled for {limit:?}", self.id),
            )
            .await;
            if let Err(why) = sent {
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
    rd: impl AsyncRead + Unpin,
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
        let received = within(
            plan.timeout,
            rd.read_exact(&mut buf),
            |e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => format!(
                    "connection {id}: server closed the connection after echoing {offset} bytes"
                ),
                _ => format!("connection {id}: receive failed: {e}"),
            },
            |limit| format!("connection {id}: no echo within {limit:?} after {offset} bytes"),
        )
        .await;
        if let Err(why) = received {
            tally.error(why);
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
