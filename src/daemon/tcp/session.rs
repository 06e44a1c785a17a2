//! One connection's life around the echo loop: its counters, its caps, how it ended,
//! and — at an in-place upgrade — handing its socket and unechoed bytes over.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::close_capped;
use super::echo::{ByteCounts, Echo};
use crate::config::TcpConfig;
use crate::daemon::alarms::Alarm;
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
    served(
        Session::new(peer, config, lifeline, metrics, permit),
        Echo::new(stream),
    )
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
    let mut session = Session::new(peer, config, lifeline, metrics, permit);
    let age = monotonic_micros().saturating_sub(past.accepted);
    if past.accepted > 0
        && let Some(started) = session
            .started
            .checked_sub(std::time::Duration::from_micros(age))
    {
        session.started = started;
        session.hard_deadline = session
            .config
            .max_connection_duration
            .and_then(|d| started.checked_add(d));
    }
    let mut echo = Echo::new(stream);
    echo.echoed = past.echoed;
    let since = monotonic_micros().saturating_sub(past.last_traffic);
    let last_traffic = (past.last_traffic > 0)
        .then(|| Instant::now().checked_sub(std::time::Duration::from_micros(since)))
        .flatten()
        .unwrap_or_else(Instant::now);
    served_adopted(session, echo, past.pending, last_traffic)
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

/// One connection's life: the settings it was accepted under, its deadlines and caps,
/// its lines to the server, its slot under the limits, and how it ends.
pub(super) struct Session {
    config: Arc<TcpConfig>,
    shutdown: Shutdown,
    /// Where the connection gives itself at an in-place upgrade.
    handoff: Handoff,
    metrics: Arc<TcpListenerMetrics>,
    /// The client, for the access log (after a close the kernel no longer knows it).
    peer: SocketAddr,
    /// When echod took the connection on, for its duration.
    started: Instant,
    /// When `tcp.max_connection_duration` ends it, if set.
    hard_deadline: Option<Instant>,
    /// The connection's slot under the limits, given back as soon as the connection is
    /// over and before its close reaches the client: a client that saw its EOF and
    /// connects again at the limit is admitted, not refused by its own old connection.
    permit: Option<Permit>,
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

/// Serves a connection to its end and records how it went. Written as a plain `fn`
/// returning an `async move` block so the connection is stored in the task once: an
/// `async fn` taking its arguments by value keeps a second copy of them (112 bytes more
/// per idle connection, measured).
#[allow(clippy::manual_async_fn)]
fn served(mut session: Session, mut echo: Echo) -> impl Future<Output = ()> {
    async move {
        session.metrics.active.inc();
        echo.apply_socket_options(&session.config);
        let end = echo.serve(&session, Instant::now()).await;
        session.finish(&mut echo, end).await;
    }
}

/// [`served`] for a connection handed over with `pending` bytes to echo first and idle
/// since `last_traffic` (a separate task type, so the common one stays as small as it is).
#[allow(clippy::manual_async_fn)]
fn served_adopted(
    mut session: Session,
    mut echo: Echo,
    pending: Vec<u8>,
    last_traffic: Instant,
) -> impl Future<Output = ()> {
    async move {
        session.metrics.active.inc();
        echo.apply_socket_options(&session.config);
        let mut alarm = session.alarm(last_traffic);
        let written = echo
            .write_back(&session, &mut alarm, &pending, last_traffic)
            .await;
        drop(alarm);
        let end = match written {
            Err(end) => end,
            Ok(last_traffic) => echo.serve(&session, last_traffic).await,
        };
        session.finish(&mut echo, end).await;
    }
}

impl Session {
    fn new(
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
            config,
            shutdown,
            handoff,
            metrics,
            peer,
            permit: Some(permit),
        }
    }

    /// Bytes read (and held, when the client does not read) per burst at most.
    pub(super) fn buffer_size(&self) -> usize {
        self.config.buffer_size
    }

    /// The connection's alarm, ringing at its next deadline after `last_traffic`.
    pub(super) fn alarm(&self, last_traffic: Instant) -> Alarm<'_> {
        let idle = self.config.idle_timeout;
        let span = self
            .config
            .max_connection_duration
            .map_or(idle, |d| d.min(idle));
        self.shutdown
            .alarms()
            .set(self.next_deadline(last_traffic), span)
    }

    /// How the connection ends now that its alarm rang: interrupted (with `pending`,
    /// the bytes read and not yet echoed, for a handover), or past a deadline; `None`
    /// when traffic moved the deadline, and the alarm is moved with it.
    pub(super) fn rung(
        &self,
        alarm: &mut Alarm<'_>,
        last_traffic: Instant,
        pending: &[u8],
    ) -> Option<End> {
        if self.shutdown.is_interrupted() {
            return Some(interrupt(&self.shutdown, pending, last_traffic));
        }
        let now = Instant::now();
        if self.hard_deadline.is_some_and(|h| h <= now) {
            return Some(End::Capped(ConnectionCap::MaxDuration));
        }
        if last_traffic + self.config.idle_timeout <= now {
            return Some(End::Idle);
        }
        alarm.reset(self.next_deadline(last_traffic));
        None
    }

    /// How the connection ends after an echo brought its bytes to `echoed`: at a cap,
    /// or handed over when a handover is under way; `None` to go on.
    pub(super) fn after_echo(&self, echoed: u64) -> Option<End> {
        if let Some(cap) = cap_reached(&self.config, echoed, self.hard_deadline) {
            return Some(End::Capped(cap));
        }
        if self.shutdown.is_handing_over() {
            return Some(interrupt(&self.shutdown, &[], Instant::now()));
        }
        None
    }

    /// Adds a connection's unflushed byte counts to its listener's counters; returns the
    /// bytes echoed.
    pub(super) fn flush(&self, unflushed: &mut ByteCounts) -> u64 {
        let counts = std::mem::take(unflushed);
        self.metrics.rx_bytes.inc_by(counts.received);
        self.metrics.tx_bytes.inc_by(counts.echoed);
        counts.echoed
    }

    /// When the connection's timer must fire next: at the idle deadline, or earlier at
    /// the `tcp.max_connection_duration` deadline.
    fn next_deadline(&self, last_traffic: Instant) -> Instant {
        let idle_deadline = last_traffic + self.config.idle_timeout;
        self.hard_deadline
            .map_or(idle_deadline, |h| h.min(idle_deadline))
    }

    /// Records how the connection ended, gives its slot back and closes it (cleanly
    /// when the client finished or a cap was reached).
    async fn finish(&mut self, echo: &mut Echo, end: End) {
        if let End::Capped(cap) = end {
            // The slot goes back now; the echo in flight is delivered before the last
            // bytes are counted, so what never arrived is not counted as sent (as far
            // as this connection's last, unflushed echo goes).
            self.permit = None;
            self.metrics.capped(cap);
            // Boxed: its state would otherwise enlarge every idle connection's task.
            let unsent = Box::pin(close_capped(&mut echo.stream)).await;
            if unsent > 0 {
                debug!(peer = %self.peer, unsent, "capped connection reset: the client stopped reading");
            }
            echo.unflushed.echoed = echo.unflushed.echoed.saturating_sub(unsent as u64);
        }
        echo.flush_counts(self);
        let end = match end {
            End::HandedOver(pending, last_traffic) => {
                // Still open, served by the next image: not closed, no duration yet. It
                // keeps its slot until the exec: the listeners go on accepting meanwhile,
                // and must not count it gone.
                let slot = self.permit.take();
                self.hand_over(echo, pending, last_traffic, slot);
                self.metrics.active.dec();
                return;
            }
            end => end,
        };
        // The slot goes back before the close reaches the client (see `permit`).
        self.permit = None;
        match end {
            End::Finished => {
                let _ = echo.stream.shutdown().await;
            }
            End::Idle => self.metrics.idle_timeouts.inc(),
            End::Capped(_) | End::Cut | End::Error | End::HandedOver(..) => {}
        }
        self.metrics.active.dec();
        self.metrics.closed.inc();
        let duration = self.started.elapsed();
        self.metrics.duration.observe(duration.as_secs_f64());
        // The access log (xinetd's log_on_success), at debug so it costs one level
        // check per connection unless asked for.
        if tracing::enabled!(tracing::Level::DEBUG) {
            debug!(peer = %self.peer, end = %end.label(), duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                echoed_bytes = echo.echoed, "connection closed");
        }
    }

    /// Gives a duplicate of the socket (closing the original then sends the client
    /// nothing), the client and `pending` to the handover. The duplicate is made
    /// without `FD_CLOEXEC`, ready to cross the exec: that costs nothing here, where
    /// every connection hands itself over while the listeners still serve, and spares
    /// the exec one system call per connection while nothing is accepted.
    fn hand_over(
        &self,
        echo: &Echo,
        pending: Vec<u8>,
        last_traffic: Instant,
        slot: Option<Permit>,
    ) {
        let ago = |at: Instant| {
            monotonic_micros()
                .saturating_sub(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX))
        };
        match handover::dup_for_exec(&echo.stream) {
            Ok(fd) => self.handoff.give(HandedConnection {
                fd,
                label: self.metrics.label.clone(),
                peer: self.peer,
                past: Past {
                    pending,
                    accepted: ago(self.started),
                    echoed: echo.echoed,
                    last_traffic: ago(last_traffic),
                },
                slot,
            }),
            Err(e) => warn!(peer = %self.peer, error = %e, "cannot hand a connection over: closed"),
        }
    }
}

/// How a connection ends when its echo loop is interrupted: cut, or — during a handover —
/// handed over with the `pending` bytes it read and has not echoed, and when it last
/// moved a byte.
fn interrupt(shutdown: &Shutdown, pending: &[u8], last_traffic: Instant) -> End {
    if shutdown.is_handing_over() {
        End::HandedOver(pending.to_vec(), last_traffic)
    } else {
        End::Cut
    }
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
        let session = Session::new(
            peer,
            Arc::new(TcpConfig::default()),
            Lifeline {
                shutdown: Shutdown::new(),
                handoff: Handoff::default(),
            },
            Arc::new(Metrics::new().tcp_listener("test")),
            limiter.try_acquire(peer.ip()).unwrap(),
        );
        let task = served(session, Echo::new(stream));
        let size = std::mem::size_of_val(&task);
        println!("connection task state: {size} bytes");
        assert!(size <= 512, "connection task state grew to {size} bytes");
        drop(client);
    }
}
