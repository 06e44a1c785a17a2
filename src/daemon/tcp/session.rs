//! One connection's life around the echo loop: its counters, its caps, how it ended,
//! and — at an in-place upgrade — handing its socket and unechoed bytes over.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::close_capped;
use crate::config::TcpConfig;
use crate::daemon::limits::Permit;
use crate::daemon::metrics::TcpListenerMetrics;
use crate::daemon::reasons::ConnectionCap;
use crate::daemon::shutdown::Shutdown;
use crate::daemon::upgrade::handoff::Handoff;
use crate::daemon::upgrade::handover::{self, HandedConnection, Past, monotonic_micros};

/// The two lines from the server to a connection: the stop broadcast, and where the
/// connection gives itself at an in-place upgrade.
#[derive(Clone, Debug)]
pub(crate) struct Lifeline {
    pub(crate) shutdown: Shutdown,
    pub(crate) handoff: Handoff,
}

/// Counts an admitted connection and returns the task that serves it; `peer` is the
/// client (from a PROXY header when a proxy sent one).
pub(crate) fn accepted(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<TcpConfig>,
    lifeline: Lifeline,
    metrics: Arc<TcpListenerMetrics>,
    permit: Permit,
) -> impl Future<Output = ()> + Send + 'static {
    metrics.accepted.inc();
    Connection::new(stream, peer, config, lifeline, metrics, permit).run()
}

/// The task that goes on serving a connection an earlier image of this process handed
/// over, its caps counted from its first accept. Not counted as accepted again.
pub(crate) fn adopted(
    stream: TcpStream,
    peer: SocketAddr,
    past: Past,
    config: Arc<TcpConfig>,
    lifeline: Lifeline,
    metrics: Arc<TcpListenerMetrics>,
    permit: Permit,
) -> impl Future<Output = ()> + Send + 'static {
    let mut connection = Connection::new(stream, peer, config, lifeline, metrics, permit);
    let age = monotonic_micros().saturating_sub(past.accepted);
    if past.accepted > 0
        && let Some(started) = connection
            .started
            .checked_sub(std::time::Duration::from_micros(age))
    {
        connection.started = started;
        connection.hard_deadline = connection
            .config
            .max_connection_duration
            .and_then(|d| started.checked_add(d));
    }
    connection.echoed_total = past.echoed;
    let since = monotonic_micros().saturating_sub(past.last_traffic);
    let last_traffic = (past.last_traffic > 0)
        .then(|| Instant::now().checked_sub(std::time::Duration::from_micros(since)))
        .flatten()
        .unwrap_or_else(Instant::now);
    connection.run_adopted(past.pending, last_traffic)
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum End {
    /// The client closed (after everything was echoed).
    Finished,
    /// No traffic for `tcp.idle_timeout`.
    Idle,
    /// The drain timeout expired.
    Cut,
    /// A socket error (reset by the peer and the like).
    Error,
    /// A per-connection cap was reached.
    Capped(ConnectionCap),
    /// To be handed over to the next image of the process (an in-place upgrade), with
    /// the bytes read and not yet echoed, and when it last moved a byte (its idle
    /// timeout goes on from there).
    HandedOver(Vec<u8>, Instant),
}

/// Bytes a connection moved since its counts were last added to its listener's series.
#[derive(Debug, Default)]
pub(super) struct ByteCounts {
    pub(super) received: u64,
    pub(super) echoed: u64,
}

/// One client connection and the settings it was accepted under.
pub(super) struct Connection {
    pub(super) stream: TcpStream,
    pub(super) config: Arc<TcpConfig>,
    pub(super) shutdown: Shutdown,
    /// Where the connection gives itself at an in-place upgrade.
    pub(super) handoff: Handoff,
    pub(super) metrics: Arc<TcpListenerMetrics>,
    /// Bytes received and echoed since the last flush to the shared counters.
    pub(super) unflushed: ByteCounts,
    /// Bytes echoed over the connection's life, for the access log.
    pub(super) echoed_total: u64,
    /// The client, for the access log (after a close the kernel no longer knows it).
    pub(super) peer: SocketAddr,
    /// When echod took the connection on, for its duration.
    pub(super) started: Instant,
    /// When `tcp.max_connection_duration` ends it, if set.
    pub(super) hard_deadline: Option<Instant>,
    /// The connection's slot under the limits, given back as soon as the connection is
    /// over and before its close reaches the client: a client that saw its EOF and
    /// connects again at the limit is admitted, not refused by its own old connection.
    pub(super) permit: Option<Permit>,
}

impl End {
    fn label(&self) -> &'static str {
        match self {
            End::Finished => "finished",
            End::Idle => "idle_timeout",
            End::Cut => "drain_cut",
            End::Error => "error",
            End::Capped(cap) => cap.label(),
            End::HandedOver(..) => "handed_over",
        }
    }
}

impl Connection {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        config: Arc<TcpConfig>,
        Lifeline { shutdown, handoff }: Lifeline,
        metrics: Arc<TcpListenerMetrics>,
        permit: Permit,
    ) -> Self {
        let started = Instant::now();
        Self {
            hard_deadline: config.max_connection_duration.map(|d| started + d),
            started,
            stream,
            config,
            shutdown,
            handoff,
            metrics,
            unflushed: ByteCounts::default(),
            echoed_total: 0,
            peer,
            permit: Some(permit),
        }
    }

    /// Serves the connection to its end and records how it went. Written as a plain
    /// `fn` returning an `async move` block so the connection is stored in the task
    /// once: an `async fn` taking `mut self` keeps a second copy of it (112 bytes more
    /// per idle connection, measured).
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = ()> {
        async move {
            self.metrics.active.inc();
            self.apply_socket_options();
            let end = self.echo(Instant::now()).await;
            self.finish(end).await;
        }
    }

    /// [`Connection::run`] for a connection handed over with `pending` bytes to echo
    /// first and idle since `last_traffic` (a separate task type, so the common one
    /// stays as small as it is).
    #[allow(clippy::manual_async_fn)]
    fn run_adopted(mut self, pending: Vec<u8>, last_traffic: Instant) -> impl Future<Output = ()> {
        async move {
            self.metrics.active.inc();
            self.apply_socket_options();
            let end = match self.write_pending(pending, last_traffic).await {
                Err(end) => end,
                Ok(last_traffic) => self.echo(last_traffic).await,
            };
            self.finish(end).await;
        }
    }

    /// Records how the connection ended, gives its slot back and closes it (cleanly
    /// when the client finished or a cap was reached).
    async fn finish(&mut self, end: End) {
        if let End::Capped(cap) = end {
            // The slot goes back now; the echo in flight is delivered before the last
            // bytes are counted, so what never arrived is not counted as sent (as far
            // as this connection's last, unflushed echo goes).
            self.permit = None;
            self.metrics.capped(cap);
            // Boxed: its state would otherwise enlarge every idle connection's task.
            let unsent = Box::pin(close_capped(&mut self.stream)).await;
            if unsent > 0 {
                debug!(peer = %self.peer, unsent, "capped connection reset: the client stopped reading");
            }
            self.unflushed.echoed = self.unflushed.echoed.saturating_sub(unsent as u64);
        }
        self.echoed_total += flush_bytes(&self.metrics, &mut self.unflushed);
        // A connection handed over keeps its slot until the exec: the listeners go on
        // accepting meanwhile, and must not count it gone.
        let permit = self.permit.take();
        match end {
            End::Finished => {
                let _ = self.stream.shutdown().await;
            }
            End::Idle => self.metrics.idle_timeouts.inc(),
            End::Capped(_) => {}
            End::HandedOver(pending, last_traffic) => {
                // Still open, served by the next image: not closed, no duration yet.
                self.hand_over(pending, last_traffic, permit);
                self.metrics.active.dec();
                return;
            }
            End::Cut | End::Error => {}
        }
        self.metrics.active.dec();
        self.metrics.closed.inc();
        let duration = self.started.elapsed();
        self.metrics.duration.observe(duration.as_secs_f64());
        // The access log (xinetd's log_on_success), at debug so it costs one level
        // check per connection unless asked for.
        if tracing::enabled!(tracing::Level::DEBUG) {
            debug!(peer = %self.peer, end = %end.label(), duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                echoed_bytes = self.echoed_total, "connection closed");
        }
    }

    /// Gives a duplicate of the socket (closing the original then sends the client
    /// nothing), the client and `pending` to the handover. The duplicate is made
    /// without `FD_CLOEXEC`, ready to cross the exec: that costs nothing here, where
    /// every connection hands itself over while the listeners still serve, and spares
    /// the exec one system call per connection while nothing is accepted.
    fn hand_over(&self, pending: Vec<u8>, last_traffic: Instant, slot: Option<Permit>) {
        let ago = |at: Instant| {
            monotonic_micros()
                .saturating_sub(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX))
        };
        match handover::dup_for_exec(&self.stream) {
            Ok(fd) => self.handoff.give(HandedConnection {
                fd,
                label: self.metrics.label.clone(),
                peer: self.peer,
                past: Past {
                    pending,
                    accepted: ago(self.started),
                    echoed: self.echoed_total,
                    last_traffic: ago(last_traffic),
                },
                slot,
            }),
            Err(e) => warn!(peer = %self.peer, error = %e, "cannot hand a connection over: closed"),
        }
    }

    /// Writes back the bytes a handed-over connection had read and not yet echoed,
    /// waiting for room as the echo loop does, its idle timeout running from
    /// `last_traffic`; returns when it last moved a byte, or how it ended meanwhile.
    async fn write_pending(
        &mut self,
        pending: Vec<u8>,
        last_traffic: Instant,
    ) -> Result<Instant, End> {
        let Self {
            stream,
            config,
            shutdown,
            unflushed,
            ..
        } = self;
        let interrupted = shutdown.interrupted();
        tokio::pin!(interrupted);
        let mut written = 0;
        let mut last_progress = last_traffic;
        while written < pending.len() {
            match stream.try_write(&pending[written..]) {
                Ok(w) => {
                    written += w;
                    unflushed.echoed += w as u64;
                    last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::select! {
                        biased;
                        _ = &mut interrupted => {
                            return Err(interrupt(shutdown, &pending[written..], last_progress));
                        }
                        ready = poll_fn(|cx| stream.poll_write_ready(cx)) => if ready.is_err() {
                            return Err(End::Error);
                        },
                        _ = tokio::time::sleep_until(last_progress + config.idle_timeout) => {
                            return Err(End::Idle);
                        }
                    }
                }
                Err(_) => return Err(End::Error),
            }
        }
        Ok(last_progress)
    }
}

/// How a connection ends when its echo loop is interrupted: cut, or — during a handover —
/// handed over with the `pending` bytes it read and has not echoed, and when it last
/// moved a byte.
pub(super) fn interrupt(shutdown: &Shutdown, pending: &[u8], last_traffic: Instant) -> End {
    if shutdown.is_handing_over() {
        End::HandedOver(pending.to_vec(), last_traffic)
    } else {
        End::Cut
    }
}

/// Adds a connection's unflushed byte counts to its listener's counters; returns the
/// bytes echoed.
pub(super) fn flush_bytes(metrics: &TcpListenerMetrics, unflushed: &mut ByteCounts) -> u64 {
    let counts = std::mem::take(unflushed);
    metrics.rx_bytes.inc_by(counts.received);
    metrics.tx_bytes.inc_by(counts.echoed);
    counts.echoed
}

/// The cap a busy connection has reached, if any: checked after each echoed chunk,
/// because a client that keeps sending never lets the timer run.
pub(crate) fn cap_reached(
    config: &TcpConfig,
    echoed: u64,
    hard: Option<Instant>,
) -> Option<ConnectionCap> {
    if config
        .max_bytes_per_connection
        .is_some_and(|max| echoed >= max)
    {
        return Some(ConnectionCap::MaxBytes);
    }
    if hard.is_some_and(|h| Instant::now() >= h) {
        return Some(ConnectionCap::MaxDuration);
    }
    None
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::daemon::limits::ConnectionLimiter;
    use crate::daemon::metrics::Metrics;

    /// The state every idle connection keeps in its task: measured, so growth is a
    /// decision and not an accident (RSS per idle connection follows it).
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let limiter = ConnectionLimiter::new(&TcpConfig::default());
        let connection = Connection::new(
            stream,
            peer,
            Arc::new(TcpConfig::default()),
            Lifeline {
                shutdown: Shutdown::new(),
                handoff: Handoff::default(),
            },
            Arc::new(Metrics::new().tcp_listener("test")),
            limiter.try_acquire(peer.ip()).unwrap(),
        );
        let task = connection.run();
        let size = std::mem::size_of_val(&task);
        println!("connection task state: {size} bytes");
        assert!(size <= 512, "connection task state grew to {size} bytes");
        drop(client);
    }
}
