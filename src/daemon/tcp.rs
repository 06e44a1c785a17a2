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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::accept::Acceptor;
use super::limits::{ConnectionLimiter, Permit};
use super::logging::RateLimitedLog;
use super::metrics::TcpListenerMetrics;
use super::reasons::RejectReason;
use super::shutdown::Shutdown;
use crate::config::TcpConfig;

/// Binds a listening socket the way the config asks (backlog, SO_REUSEADDR, IPv6-only
/// for `[::]` so an IPv4 wildcard can be listed beside it).
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
    pub(crate) async fn run(self) {
        // Counted as a task of the drain: the stop waits until this listener has closed
        // its backlog gently (see `reject_backlog`), rather than exit under it.
        let _drain_waits = self.connections.token();
        let mut acceptor = Acceptor::new(&self.listener, &self.stop);
        let on_error = |kind, e: &io::Error| {
            self.metrics.accept_error(kind);
            if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
                warn!(listener = %self.label, error = %e, kind = kind.label(), suppressed,
                    "accept failed");
            }
        };
        while let Some((stream, peer)) = acceptor.next(on_error).await {
            self.admit(stream, peer);
        }
        if self.shutdown.is_draining() {
            self.reject_backlog();
        }
        debug!(listener = %self.label, "TCP listener closed");
    }

    /// Closes connections the kernel completed before the stop but echod had not yet
    /// accepted: cleanly (EOF) and counted as `shutdown`, rather than reset unseen when
    /// the listening socket closes.
    ///
    /// They are taken straight from the kernel until it says the queue is empty: tokio's
    /// accept also returns "not ready" once the task's cooperative budget (128
    /// operations) is spent, which used to leave the rest of a long queue to be reset.
    fn reject_backlog(&self) {
        loop {
            match SockRef::from(&self.listener).accept() {
                Ok((socket, _)) => {
                    let stream = std::net::TcpStream::from(socket);
                    if stream.set_nonblocking(true).is_ok()
                        && let Ok(stream) = TcpStream::from_std(stream)
                    {
                        self.reject_gently(stream);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Empty (WouldBlock), or out of descriptors: nothing more can be done.
                Err(_) => break,
            }
        }
    }

    /// Refuses a connection because echod is stopping, with EOF rather than a reset.
    fn reject_gently(&self, stream: TcpStream) {
        self.metrics.rejected(RejectReason::Shutdown);
        self.connections.spawn(close_gently(stream));
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let permit = if self.shutdown.is_draining() {
            Err(RejectReason::Shutdown)
        } else {
            self.limiter.try_acquire(peer.ip())
        };
        let permit = match permit {
            Ok(permit) => permit,
            Err(RejectReason::Shutdown) => return self.reject_gently(stream),
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
        self.metrics.accepted.inc();
        let config = Arc::clone(&self.config.borrow());
        let connection = Connection {
            stream,
            config,
            shutdown: self.shutdown.clone(),
            metrics: Arc::clone(&self.metrics),
            unflushed: ByteCounts::default(),
            _permit: permit,
        };
        self.connections.spawn(connection.run());
    }
}

/// How long a client refused at a stop may take to finish sending (what it sends is
/// read and thrown away) before its connection is closed.
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// Bytes read and thrown away from a client refused at a stop, at most.
const REJECT_DISCARD: usize = 64 * 1024;

/// Closes a connection whose client may already have sent data, so that it sees EOF.
///
/// Closing a socket with unread input makes the kernel send a reset, which the client
/// reports as an error and which can even discard the EOF it was about to read. So the
/// write side is shut first (the client reads EOF), then input is read and discarded
/// until the client closes too, for at most [`REJECT_LINGER`] and [`REJECT_DISCARD`]
/// bytes; a client that keeps sending past those is reset, having had its EOF.
async fn close_gently(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut discarded = 0;
    let _ = tokio::time::timeout(REJECT_LINGER, async {
        while discarded < REJECT_DISCARD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
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
    _permit: Permit,
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
            let end = self.echo().await;
            flush_bytes(&self.metrics, &mut self.unflushed);
            if end == End::Idle {
                self.metrics.idle_timeouts.inc();
            }
            self.metrics.active.dec();
            self.metrics.closed.inc();
            self.metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
        }
    }

    fn apply_socket_options(&self) {
        let _ = self.stream.set_nodelay(self.config.nodelay);
        if !self.config.keepalive.is_zero() {
            let keepalive = TcpKeepalive::new()
                .with_time(self.config.keepalive)
                .with_interval(Duration::from_secs(10))
                .with_retries(3);
            let _ = SockRef::from(&self.stream).set_tcp_keepalive(&keepalive);
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
    async fn echo(&mut self) -> End {
        // Borrowing the fields apart lets the cut future borrow `shutdown` while the
        // stream is used, without a clone living in every connection's state.
        let Self {
            stream,
            config,
            shutdown,
            metrics,
            unflushed,
            ..
        } = self;
        let cut = shutdown.cutting();
        let idle_timer = tokio::time::sleep(config.idle_timeout);
        tokio::pin!(cut, idle_timer);
        let mut last_traffic = Instant::now();
        loop {
            tokio::select! {
                biased;
                ready = poll_fn(|cx| stream.poll_read_ready(cx)) => if ready.is_err() {
                    return End::Error;
                },
                _ = &mut idle_timer => {
                    if idle_expired(idle_timer.as_mut(), last_traffic, config.idle_timeout) {
                        return End::Idle;
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
                                    if idle_expired(idle_timer.as_mut(), last_traffic, config.idle_timeout) {
                                        return End::Idle;
                                    }
                                }
                                _ = &mut cut => return End::Cut,
                            }
                        }
                        Err(_) => return End::Error,
                    }
                }
            }
            flush_bytes(metrics, unflushed);
            last_traffic = Instant::now();
        }
    }
}

/// Adds a connection's unflushed byte counts to its listener's counters.
fn flush_bytes(metrics: &TcpListenerMetrics, unflushed: &mut ByteCounts) {
    let counts = std::mem::take(unflushed);
    metrics.rx_bytes.inc_by(counts.received);
    metrics.tx_bytes.inc_by(counts.echoed);
}

/// Re-arms `timer` for `last_traffic + idle`; true when that deadline has already passed.
fn idle_expired(timer: Pin<&mut Sleep>, last_traffic: Instant, idle: Duration) -> bool {
    let deadline = last_traffic + idle;
    if deadline <= Instant::now() {
        return true;
    }
    timer.reset(deadline);
    false
}
