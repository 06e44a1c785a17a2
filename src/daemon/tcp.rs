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
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::accept::{Acceptor, close_at_once};
use super::alarms::Alarm;
use super::handover::HandedConnection;
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
    /// systemd keeps this socket open after echod stops (socket activation, descriptor
    /// store): connections queued at a stop are left for the next echod to accept.
    pub(crate) keep_backlog: bool,
}

static REJECT_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));
static ACCEPT_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

impl Listener {
    /// Accepts until stopped; accept errors are counted, logged (rate-limited) and
    /// backed off from, never fatal.
    pub(crate) async fn run(mut self) {
        // Counted as a task of the drain: the stop waits until this listener has closed
        // its backlog gently (see `reject_backlog`), rather than exit under it.
        let _drain_waits = self.connections.token();
        let mut acceptor = Acceptor::new();
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
        if self.shutdown.is_draining() && !self.keep_backlog {
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
        self.connections.spawn(async move {
            let mut stream = stream;
            close_gently(&mut stream).await;
        });
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let config = Arc::clone(&self.config.borrow());
        // A connection accepted just as a drain began is refused, unless systemd keeps
        // the socket: then the next echod would have served it, so this one does (the
        // drain waits for it like any other).
        let draining = self.shutdown.is_draining() && !self.keep_backlog;
        if !draining && config.proxy_protocol.trusts(peer.ip()) {
            // The client's address comes in the PROXY header: its per-IP slot is taken
            // once the header is read, in the connection's own task.
            let proxied = Proxied {
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
        let permit = if draining {
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
                // Input it already sent is discarded first, so it sees EOF, not a reset.
                close_at_once(stream);
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
    Connection::new(stream, peer, config, shutdown, metrics, permit).run()
}

/// A connection from a trusted proxy whose header has not been read yet.
struct Proxied {
    stream: TcpStream,
    /// The proxy's address (the socket's peer).
    proxy: SocketAddr,
    config: Arc<TcpConfig>,
    limiter: Arc<ConnectionLimiter>,
    metrics: Arc<TcpListenerMetrics>,
    shutdown: Shutdown,
    /// Where the echo task is spawned once the header is in.
    connections: TaskTracker,
    /// The listener, for logs.
    label: String,
}

impl Proxied {
    /// Reads the header (bounded by the timeout and by a cut), takes the client's slot,
    /// and hands the connection to an echo task of its own; or closes it and counts why.
    async fn run(self) {
        let Self {
            mut stream,
            proxy,
            config,
            limiter,
            metrics,
            shutdown,
            connections,
            label,
        } = self;
        let timeout = config.proxy_protocol.header_timeout;
        let read = tokio::time::timeout(timeout, proxy::read_header(&mut stream, proxy));
        let header = tokio::select! {
            read = read => read.unwrap_or(Err(proxy::HeaderError::Timeout(timeout))),
            () = shutdown.cutting() => {
                metrics.rejected(RejectReason::Shutdown);
                return;
            }
        };
        let client = match header {
            Ok(client) => client,
            Err(error) => {
                metrics.rejected(RejectReason::ProxyProtocol);
                if let Some(suppressed) = REJECT_LOG.allow() {
                    warn!(listener = %label, %proxy, %error, reason = RejectReason::ProxyProtocol.label(),
                        suppressed, "connection rejected");
                }
                // Dropping the stream closes it; unread bytes make that a reset.
                return;
            }
        };
        match limiter.try_acquire(client.ip()) {
            Ok(permit) => {
                connections.spawn(serve(stream, client, config, shutdown, metrics, permit));
            }
            Err(reason) => {
                metrics.rejected(reason);
                if let Some(suppressed) = REJECT_LOG.allow() {
                    warn!(listener = %label, peer = %client, %proxy, reason = reason.label(),
                        suppressed, "connection rejected");
                }
            }
        }
    }
}

/// The task that goes on serving a connection an earlier image of this process handed
/// over: `pending` (bytes it had read and not yet echoed) is written back first. Not
/// counted as accepted again.
pub(super) fn adopt(
    stream: TcpStream,
    peer: SocketAddr,
    pending: Vec<u8>,
    config: Arc<TcpConfig>,
    shutdown: Shutdown,
    metrics: Arc<TcpListenerMetrics>,
    permit: Permit,
) -> impl Future<Output = ()> + Send + 'static {
    Connection::new(stream, peer, config, shutdown, metrics, permit).run_adopted(pending)
}

/// What woke a listener.
enum Event {
    Accepted(Option<(TcpStream, SocketAddr)>),
    Reloaded,
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
async fn close_gently(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    // On the heap: an array here would enlarge every connection's task.
    let mut buf = vec![0u8; 4096];
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// To be handed over to the next image of the process (an in-place upgrade), with
    /// the bytes read and not yet echoed.
    HandedOver(Vec<u8>),
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
            End::HandedOver(_) => "handed_over",
        }
    }
}

impl Connection {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        config: Arc<TcpConfig>,
        shutdown: Shutdown,
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
            let end = self.echo().await;
            self.finish(end).await;
        }
    }

    /// [`Connection::run`] for a connection handed over with `pending` bytes to echo
    /// first (a separate task type, so the common one stays as small as it is).
    #[allow(clippy::manual_async_fn)]
    fn run_adopted(mut self, pending: Vec<u8>) -> impl Future<Output = ()> {
        async move {
            self.metrics.active.inc();
            self.apply_socket_options();
            let end = match self.write_pending(pending).await {
                Some(end) => end,
                None => self.echo().await,
            };
            self.finish(end).await;
        }
    }

    /// Records how the connection ended, gives its slot back and closes it (cleanly
    /// when the client finished or a cap was reached).
    async fn finish(&mut self, end: End) {
        self.echoed_total += flush_bytes(&self.metrics, &mut self.unflushed);
        self.permit = None;
        match end {
            End::Finished => {
                let _ = self.stream.shutdown().await;
            }
            End::Idle => self.metrics.idle_timeouts.inc(),
            End::Capped(cap) => {
                self.metrics.capped(cap);
                close_gently(&mut self.stream).await;
            }
            End::HandedOver(pending) => {
                // Still open, served by the next image: not closed, no duration yet.
                self.hand_over(pending);
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
    /// nothing), the client and `pending` to the handover.
    fn hand_over(&self, pending: Vec<u8>) {
        match SockRef::from(&self.stream).try_clone() {
            Ok(socket) => self.shutdown.hand_over(HandedConnection {
                fd: socket.into(),
                label: self.metrics.label.clone(),
                peer: self.peer,
                pending,
            }),
            Err(e) => warn!(peer = %self.peer, error = %e, "cannot hand a connection over: closed"),
        }
    }

    /// Writes back the bytes a handed-over connection had read and not yet echoed,
    /// waiting for room as the echo loop does; `Some` when the connection ends meanwhile.
    async fn write_pending(&mut self, pending: Vec<u8>) -> Option<End> {
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
        let mut last_progress = Instant::now();
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
                            return Some(interrupt(shutdown, &pending[written..]));
                        }
                        ready = poll_fn(|cx| stream.poll_write_ready(cx)) => if ready.is_err() {
                            return Some(End::Error);
                        },
                        _ = tokio::time::sleep_until(last_progress + config.idle_timeout) => {
                            return Some(End::Idle);
                        }
                    }
                }
                Err(_) => return Some(End::Error),
            }
        }
        None
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
    /// One alarm (see `alarms`) serves the whole connection for its deadlines and for a
    /// cut or handover, while it waits to read and while it waits to write: it is moved
    /// only when it rings early (traffic moved the deadline), not once per message.
    /// Readiness is awaited through the stream's own per-direction waker slots
    /// (`poll_read_ready`), not a `readable()` future. All of this keeps an idle
    /// connection small.
    async fn echo(&mut self) -> End {
        // Fields are used through `self` (the alarm borrows `self.shutdown` while
        // `self.stream` is used): borrowing them apart into locals would store a pointer
        // per field in every connection's state.
        //
        // Rings at the deadline, and at a cut or a handover; at every point it is
        // awaited no unechoed byte is held except the one burst being written, which a
        // handover takes along.
        let mut last_traffic = Instant::now();
        let span = self
            .config
            .max_connection_duration
            .map_or(self.config.idle_timeout, |d| {
                d.min(self.config.idle_timeout)
            });
        let mut alarm = self.shutdown.alarms().set(
            next_deadline(last_traffic, self.config.idle_timeout, self.hard_deadline),
            span,
        );
        loop {
            tokio::select! {
                biased;
                // First, so that a client that keeps sending cannot hold a handover up.
                () = poll_fn(|cx| alarm.poll(cx)) => {
                    if let Some(end) = self.rung(&mut alarm, last_traffic, &[]) {
                        return end;
                    }
                    continue;
                }
                ready = poll_fn(|cx| self.stream.poll_read_ready(cx)) => if ready.is_err() {
                    return End::Error;
                },
            }
            // Echo one burst: at most one buffer is read before all of it is written.
            let mut buf = Vec::with_capacity(self.config.buffer_size);
            let mut progressed = true;
            loop {
                buf.clear();
                // One poll of tokio's own read, not `try_read_buf`: a read that returns
                // less than the buffer shows the socket is drained, and tokio then clears
                // its readiness, so the next pass waits for epoll instead of making a
                // `read` that only returns EAGAIN (one syscall less per message; tokio
                // clears only the readiness it saw before the read, so data arriving
                // meanwhile is not missed). The read also spends tokio's cooperative
                // budget and returns `Pending` when it is spent, so a client that keeps
                // sending cannot keep the worker thread to itself.
                let read = poll_fn(|cx| {
                    let read = std::pin::pin!(self.stream.read_buf(&mut buf));
                    Poll::Ready(read.poll(cx))
                })
                .await;
                let n = match read {
                    // Everything it sent is echoed; `finish` closes our side.
                    Poll::Ready(Ok(0)) => return End::Finished,
                    Poll::Ready(Ok(n)) => n,
                    Poll::Pending => break,
                    Poll::Ready(Err(_)) => return End::Error,
                };
                self.unflushed.received += n as u64;
                let mut written = 0;
                while written < n {
                    match self.stream.try_write(&buf[written..]) {
                        Ok(w) => {
                            written += w;
                            self.unflushed.echoed += w as u64;
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
                                ready = poll_fn(|cx| self.stream.poll_write_ready(cx)) => if ready.is_err() {
                                    return End::Error;
                                },
                                // The client is not reading: what is left of the burst
                                // goes along with a handover.
                                () = poll_fn(|cx| alarm.poll(cx)) => {
                                    if let Some(end) = self.rung(&mut alarm, last_traffic, &buf[written..n]) {
                                        return end;
                                    }
                                }
                            }
                        }
                        Err(_) => return End::Error,
                    }
                }
                // Caps act once the current echo is written, so nothing read is lost.
                if let Some(cap) = cap_reached(
                    &self.config,
                    self.echoed_total + self.unflushed.echoed,
                    self.hard_deadline,
                ) {
                    return End::Capped(cap);
                }
                // Everything read is echoed: a handover need not wait for the socket to
                // run dry (a client that never pauses would hold it up).
                if self.shutdown.is_handing_over() {
                    return interrupt(&self.shutdown, &[]);
                }
            }
            self.echoed_total += flush_bytes(&self.metrics, &mut self.unflushed);
            last_traffic = Instant::now();
        }
    }

    /// How the connection ends now that its alarm rang: interrupted (with `pending`,
    /// the bytes read and not yet echoed, for a handover), or past a deadline; `None`
    /// when traffic moved the deadline, and the alarm is moved with it.
    fn rung(&self, alarm: &mut Alarm<'_>, last_traffic: Instant, pending: &[u8]) -> Option<End> {
        if self.shutdown.is_interrupted() {
            return Some(interrupt(&self.shutdown, pending));
        }
        let now = Instant::now();
        if self.hard_deadline.is_some_and(|h| h <= now) {
            return Some(End::Capped(ConnectionCap::MaxDuration));
        }
        if last_traffic + self.config.idle_timeout <= now {
            return Some(End::Idle);
        }
        alarm.reset(next_deadline(
            last_traffic,
            self.config.idle_timeout,
            self.hard_deadline,
        ));
        None
    }
}

/// How a connection ends when its echo loop is interrupted: cut, or — during a handover —
/// handed over with the `pending` bytes it read and has not echoed.
fn interrupt(shutdown: &Shutdown, pending: &[u8]) -> End {
    if shutdown.is_handing_over() {
        End::HandedOver(pending.to_vec())
    } else {
        End::Cut
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
        let connection = Connection::new(
            stream,
            peer,
            Arc::new(TcpConfig::default()),
            Shutdown::new(),
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
