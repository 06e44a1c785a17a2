//! TCP echo: a listener per configured address and a handler per connection.
//!
//! The handler reads at most one buffer, writes all of it back, and only then reads
//! again: a client that sends but never reads costs one buffer, not a growing queue.
//! The buffer exists only while bytes are in flight, so an idle connection holds no
//! buffer at all. When the client half-closes, everything it sent has already been
//! echoed, so the handler just closes its side: nothing is dropped at close.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::accept::Acceptor;
use super::limits::{ConnectionLimiter, Permit};
use super::logging::RateLimitedLog;
use super::metrics::TcpListenerMetrics;
use super::proxy;
use super::reasons::RejectReason;
use super::reasons::{AcceptErrorKind, ConnectionCap};
use super::shutdown::Shutdown;
use crate::config::TcpConfig;

/// Binds a listening socket the way the config asks (backlog, SO_REUSEADDR, IPv6-only
/// for `[::]` so an IPv4 wildcard can be listed beside it). SO_REUSEADDR on a TCP
/// listener only lets a restart bind while old connections sit in TIME_WAIT; Linux
/// still refuses a second listener on the address (unlike UDP, see `udp::bind`).
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// Everything a TCP listener task needs, passed down from the server.
pub(crate) struct Listener {
    pub(crate) listener: TcpListener,
    /// The configured address: the metrics label and the name in logs.
    pub(crate) label: String,
    /// Live TCP settings; each new connection takes the current snapshot.
    pub(crate) config: watch::Receiver<Arc<TcpConfig>>,
    /// Global and per-IP limits shared by all listeners.
    pub(crate) limiter: Arc<ConnectionLimiter>,
    /// This listener's series, shared with its connections.
    pub(crate) metrics: Arc<TcpListenerMetrics>,
    /// Drain/cut broadcast for the connections.
    pub(crate) shutdown: Shutdown,
    /// Stops this listener alone (reload) or with all (drain).
    pub(crate) stop: CancellationToken,
    /// Tracks connection tasks so a drain can wait for them.
    pub(crate) connections: TaskTracker,
}

static REJECT_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));
static ACCEPT_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

impl Listener {
    /// Accepts until stopped; accept errors are counted, logged (rate-limited) and
    /// backed off from, never fatal.
    pub(crate) async fn run(mut self) {
        let mut acceptor = Acceptor::default();
        let mut backlog = self.config.borrow_and_update().backlog;
        loop {
            let metrics = &self.metrics;
            let label = &self.label;
            let on_error = |kind: AcceptErrorKind, e: &io::Error| {
                metrics.accept_error(kind);
                if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
                    warn!(listener = %label, error = %e, kind = kind.label(), suppressed,
                        "accept failed");
                }
            };
            let event = tokio::select! {
                next = acceptor.next(&self.listener, &self.stop, on_error) => Event::Accepted(next),
                Ok(()) = self.config.changed() => Event::Reloaded,
            };
            match event {
                Event::Accepted(Some((stream, peer))) => self.admit(stream, peer),
                Event::Accepted(None) => break,
                Event::Reloaded => {
                    // A listening socket takes a new backlog by listening again.
                    let wanted = self.config.borrow_and_update().backlog;
                    if wanted != backlog {
                        match SockRef::from(&self.listener)
                            .listen(i32::try_from(wanted).unwrap_or(i32::MAX))
                        {
                            Ok(()) => {
                                info!(listener = %self.label, backlog = wanted, "accept queue length changed");
                                backlog = wanted;
                            }
                            Err(e) => {
                                warn!(listener = %self.label, error = %e, "cannot change the accept queue length")
                            }
                        }
                    }
                }
            }
        }
        if self.shutdown.is_draining() {
            self.reject_backlog().await;
        }
        debug!(listener = %self.label, "TCP listener closed");
    }

    /// Closes connections the kernel completed before the stop but echod had not yet
    /// accepted: cleanly (EOF) and counted as `shutdown`, rather than reset unseen when
    /// the listening socket closes.
    async fn reject_backlog(&self) {
        // accept(2) itself, not tokio's: its readiness may not have seen clients that
        // queued while the workers were busy, and those would be reset unseen.
        while SockRef::from(&self.listener).accept().is_ok() {
            self.metrics.rejected(RejectReason::Shutdown);
        }
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let config = Arc::clone(&self.config.borrow());
        if !self.shutdown.is_draining() && config.proxy_protocol.trusts(peer.ip()) {
            // The client's address comes in the PROXY header: its per-IP slot is taken
            // once the header is read, in the connection's own task.
            let proxied = proxy::Proxied {
                stream,
                proxy: peer,
                config,
                limiter: Arc::clone(&self.limiter),
                metrics: Arc::clone(&self.metrics),
                shutdown: self.shutdown.clone(),
                connections: self.connections.clone(),
                label: self.label.clone(),
            };
            self.connections.spawn(proxied.run());
            return;
        }
        let permit = if self.shutdown.is_draining() {
            Err(RejectReason::Shutdown)
        } else {
            self.limiter.try_acquire(peer.ip())
        };
        let permit = match permit {
            Ok(permit) => permit,
            Err(reason) => {
                self.metrics.rejected(reason);
                if let Some(suppressed) = REJECT_LOG.allow() {
                    warn!(listener = %self.label, %peer, reason = reason.label(), suppressed,
                        "connection rejected");
                }
                // Dropping the stream closes it: the client sees EOF at once.
                return;
            }
        };
        let connection = serve(
            stream,
            peer,
            config,
            self.shutdown.clone(),
            Arc::clone(&self.metrics),
            permit,
        );
        self.connections.spawn(connection);
    }
}

/// Counts an admitted connection and returns the task that serves it; `peer` is the
/// client (from a PROXY header when a proxy sent one).
pub(super) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<TcpConfig>,
    shutdown: Shutdown,
    metrics: Arc<TcpListenerMetrics>,
    permit: Permit,
) -> impl Future<Output = ()> + Send + 'static {
    metrics.accepted.inc();
    Connection {
        stream,
        config,
        shutdown,
        metrics,
        unflushed: ByteCounts::default(),
        echoed_total: 0,
        peer,
        _permit: permit,
    }
    .run()
}

/// What woke a listener.
enum Event {
    Accepted(Option<(TcpStream, SocketAddr)>),
    Reloaded,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
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
}

/// Bytes a connection moved since its counts were last added to its listener's series.
#[derive(Debug, Default)]
struct ByteCounts {
    received: u64,
    echoed: u64,
}

/// One client connection and the settings it was accepted under.
struct Connection {
    stream: TcpStream,
    config: Arc<TcpConfig>,
    shutdown: Shutdown,
    metrics: Arc<TcpListenerMetrics>,
    /// Bytes received and echoed since the last flush to the shared counters.
    unflushed: ByteCounts,
    /// Bytes echoed over the connection's life, for the access log.
    echoed_total: u64,
    /// The client, for the access log (after a close the kernel no longer knows it).
    peer: SocketAddr,
    _permit: Permit,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Finished => "finished",
            End::Idle => "idle_timeout",
            End::Cut => "drain_cut",
            End::Error => "error",
            End::Capped(cap) => cap.label(),
        }
    }
}

impl Connection {
    /// Serves the connection to its end and records how it went. Written as a plain
    /// `fn` returning an `async move` block so the connection is stored in the task
    /// once: an `async fn` taking `mut self` keeps a second copy of it (112 bytes more
    /// per idle connection, measured).
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = ()> {
        async move {
            let started = Instant::now();
            self.metrics.active.inc();
            self.apply_socket_options();
            let hard_deadline = self.config.max_connection_duration.map(|d| started + d);
            let end = self.echo(hard_deadline).await;
            self.echoed_total += flush_bytes(&self.metrics, &mut self.unflushed);
            match end {
                End::Idle => self.metrics.idle_timeouts.inc(),
                End::Capped(cap) => {
                    self.metrics.capped(cap);
                    close_cleanly(&mut self.stream).await;
                }
                End::Finished | End::Cut | End::Error => {}
            }
            self.metrics.active.dec();
            self.metrics.closed.inc();
            let duration = started.elapsed();
            self.metrics.duration.observe(duration.as_secs_f64());
            // The access log (xinetd's log_on_success), at debug so it costs one level
            // check per connection unless asked for.
            if tracing::enabled!(tracing::Level::DEBUG) {
                debug!(peer = %self.peer, end = %end.label(), duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                    echoed_bytes = self.echoed_total, "connection closed");
            }
        }
    }

    /// Per-connection options. Fixed send and receive buffers turn off the kernel's
    /// autotuning for this socket: without them a client that sends but never reads
    /// makes echod's send queue grow to `tcp_wmem` max (4 MiB) in kernel memory.
    fn apply_socket_options(&self) {
        let _ = self.stream.set_nodelay(self.config.nodelay);
        let sock = SockRef::from(&self.stream);
        if self.config.send_buffer_size != 0 {
            let _ = sock.set_send_buffer_size(self.config.send_buffer_size);
        }
        if self.config.receive_buffer_size != 0 {
            let _ = sock.set_recv_buffer_size(self.config.receive_buffer_size);
        }
        if !self.config.keepalive.is_zero() {
            let keepalive = TcpKeepalive::new()
                .with_time(self.config.keepalive)
                .with_interval(Duration::from_secs(10))
                .with_retries(3);
            let _ = sock.set_tcp_keepalive(&keepalive);
        }
    }

    /// The echo loop: wait for data, echo what is readable, repeat.
    ///
    /// One idle timer and one cut subscription serve the whole connection, while it
    /// waits to read and while it waits to write: the timer is re-armed only when it
    /// fires early (traffic moved the deadline), not once per message, and the shared
    /// cut broadcast is subscribed to once. Readiness is awaited through the stream's
    /// own per-direction waker slots (`poll_read_ready`), not a `readable()` future.
    /// All of this keeps an idle connection small.
    async fn echo(&mut self, hard_deadline: Option<Instant>) -> End {
        // Borrowing the fields apart lets the cut future borrow `shutdown` while the
        // stream is used, without a clone living in every connection's state.
        let Self {
            stream,
            config,
            shutdown,
            metrics,
            unflushed,
            echoed_total,
            ..
        } = self;
        let cut = shutdown.cutting();
        let mut last_traffic = Instant::now();
        let idle_timer = tokio::time::sleep_until(next_deadline(
            last_traffic,
            config.idle_timeout,
            hard_deadline,
        ));
        tokio::pin!(cut, idle_timer);
        loop {
            tokio::select! {
                biased;
                ready = poll_fn(|cx| stream.poll_read_ready(cx)) => if ready.is_err() {
                    return End::Error;
                },
                _ = &mut idle_timer => {
                    if let Some(end) = expired(idle_timer.as_mut(), last_traffic, config.idle_timeout, hard_deadline) {
                        return end;
                    }
                    continue;
                }
                _ = &mut cut => return End::Cut,
            }
            // Echo one burst: at most one buffer is read before all of it is written.
            let mut buf = Vec::with_capacity(config.buffer_size);
            let mut progressed = true;
            loop {
                // A client that keeps sending must not keep the worker thread to itself:
                // each read spends tokio's cooperative budget, which yields when spent.
                tokio::task::coop::consume_budget().await;
                buf.clear();
                let n = match stream.try_read_buf(&mut buf) {
                    Ok(0) => {
                        let _ = stream.shutdown().await;
                        return End::Finished;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return End::Error,
                };
                unflushed.received += n as u64;
                let mut written = 0;
                while written < n {
                    match stream.try_write(&buf[written..]) {
                        Ok(w) => {
                            written += w;
                            unflushed.echoed += w as u64;
                            progressed = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // The client is not reading: wait for room, but not longer
                            // than the idle timeout without progress. Only progress
                            // (bytes written since the last wait) restarts the clock.
                            if progressed {
                                progressed = false;
                                last_traffic = Instant::now();
                            }
                            tokio::select! {
                                biased;
                                ready = poll_fn(|cx| stream.poll_write_ready(cx)) => if ready.is_err() {
                                    return End::Error;
                                },
                                _ = &mut idle_timer => {
                                    if let Some(end) = expired(idle_timer.as_mut(), last_traffic, config.idle_timeout, hard_deadline) {
                                        return end;
                                    }
                                }
                                _ = &mut cut => return End::Cut,
                            }
                        }
                        Err(_) => return End::Error,
                    }
                }
                // Caps act once the current echo is written, so nothing read is lost.
                if let Some(cap) =
                    cap_reached(config, *echoed_total + unflushed.echoed, hard_deadline)
                {
                    return End::Capped(cap);
                }
            }
            *echoed_total += flush_bytes(metrics, unflushed);
            last_traffic = Instant::now();
        }
    }
}

/// Adds a connection's unflushed byte counts to its listener's counters; returns the
/// bytes echoed.
fn flush_bytes(metrics: &TcpListenerMetrics, unflushed: &mut ByteCounts) -> u64 {
    let counts = std::mem::take(unflushed);
    metrics.rx_bytes.inc_by(counts.received);
    metrics.tx_bytes.inc_by(counts.echoed);
    counts.echoed
}

/// When the connection's timer must fire next: at the idle deadline, or earlier at the
/// `tcp.max_connection_duration` deadline.
fn next_deadline(last_traffic: Instant, idle: Duration, hard: Option<Instant>) -> Instant {
    let idle_deadline = last_traffic + idle;
    hard.map_or(idle_deadline, |h| h.min(idle_deadline))
}

/// Re-arms `timer` for the next deadline; says how the connection ends when a deadline
/// has already passed.
fn expired(
    timer: Pin<&mut Sleep>,
    last_traffic: Instant,
    idle: Duration,
    hard: Option<Instant>,
) -> Option<End> {
    let now = Instant::now();
    if hard.is_some_and(|h| h <= now) {
        return Some(End::Capped(ConnectionCap::MaxDuration));
    }
    if last_traffic + idle <= now {
        return Some(End::Idle);
    }
    timer.reset(next_deadline(last_traffic, idle, hard));
    None
}

/// The cap a busy connection has reached, if any: checked after each echoed chunk,
/// because a client that keeps sending never lets the timer run.
fn cap_reached(config: &TcpConfig, echoed: u64, hard: Option<Instant>) -> Option<ConnectionCap> {
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

/// How long a capped connection's unread input is discarded after the FIN.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Ends a capped connection the way a client expects: FIN after the last echo, then its
/// unread input is discarded for a moment, because closing a socket with unread data
/// sends a reset that can destroy echoes still in flight to the client.
async fn close_cleanly(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = stream.shutdown().await;
    // On the heap: an array here would enlarge every connection's task.
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let connection = Connection {
            stream,
            config: Arc::new(TcpConfig::default()),
            shutdown: Shutdown::new(),
            metrics: Arc::new(Metrics::new().tcp_listener("test")),
            unflushed: ByteCounts::default(),
            echoed_total: 0,
            peer,
            _permit: limiter.try_acquire(peer.ip()).unwrap(),
        };
        let task = connection.run();
        let size = std::mem::size_of_val(&task);
        println!("connection task state: {size} bytes");
        assert!(size <= 616, "connection task state grew to {size} bytes");
        drop(client);
    }
}
