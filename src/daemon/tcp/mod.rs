//! TCP echo: a listener per configured address and a handler per connection.
//!
//! The handler reads at most one buffer, writes all of it back, and only then reads
//! again: a client that sends but never reads costs one buffer, not a growing queue.
//! Bytes are read into the worker thread's buffer, so a connection holds a buffer of
//! its own only while its client is slow to take the echo. When the client half-closes,
//! everything it sent has already been echoed, so the handler just closes its side:
//! nothing is dropped at close.
//!
//! Three jobs, one module each: this one binds and accepts; [`admission`] decides who
//! is served (limits, PROXY headers); [`session`] is one connection's life (deadlines,
//! caps, counters, its end and handover); [`echo`] is the socket I/O of the echo loop.

mod admission;
mod echo;
mod session;

pub(crate) use echo::apply_socket_options;
pub(crate) use session::{Lifeline, adopted, cap_reached};

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::accept::Acceptor;
use super::limits::ConnectionLimiter;
use super::logging::RateLimitedLog;
use super::metrics::TcpListenerMetrics;
use super::reasons::AcceptErrorKind;
use super::reasons::RejectReason;
use super::shutdown::Shutdown;
use super::upgrade::handoff::Handoff;
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
    /// Where connections give themselves at an in-place upgrade.
    pub(crate) handoff: Handoff,
    /// Stops this listener alone (reload) or with all (drain).
    pub(crate) stop: CancellationToken,
    /// Tracks connection tasks so a drain can wait for them.
    pub(crate) connections: TaskTracker,
    /// systemd keeps this socket open after echod stops (socket activation, descriptor
    /// store): connections queued at a stop are left for the next echod to accept.
    pub(crate) keep_backlog: bool,
    /// Set for a TLS listener: admitted connections do a handshake, then echo inside.
    pub(crate) tls: Option<super::tls::Endpoint>,
}

static ACCEPT_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

impl Listener {
    /// The lines from the server that each of this listener's connections holds.
    fn lifeline(&self) -> session::Lifeline {
        session::Lifeline {
            shutdown: self.shutdown.clone(),
            handoff: self.handoff.clone(),
        }
    }

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
}

/// How long a capped connection's client may take to read the echo echod already
/// sent without taking any of it (the bytes in flight not shrinking): then the
/// connection is reset and counted as cut.
const CAP_STALL: Duration = Duration::from_secs(5);
/// How long a capped connection may take in all to drain its echo, however slowly it
/// reads.
const CAP_DRAIN: Duration = Duration::from_secs(30);
/// How often a capped connection looks at what the client has not acknowledged yet.
const CAP_POLL: Duration = Duration::from_millis(20);

/// Bytes sent on `stream` that the client has not acknowledged yet (`SIOCOUTQ`), and
/// the FIN once the write side is shut; 0 when the client has everything.
fn unacknowledged(stream: &TcpStream) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: the descriptor is open for the borrow of `stream`, and SIOCOUTQ writes
    // one c_int to the pointer, which points at `queued`.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        usize::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// Closes a capped connection so that its client gets every byte already echoed, then
/// EOF: the write side is shut (the FIN follows the echo), and what the client keeps
/// sending is read and thrown away until it closes too, or until it has acknowledged
/// everything echod sent (closing with its input unread cannot cost it echo any more).
/// A client that stops taking the echo for [`CAP_STALL`], or has not taken it all
/// within [`CAP_DRAIN`], is reset; returns the bytes it never acknowledged then (0
/// when everything was delivered).
pub(super) async fn close_capped(stream: &mut TcpStream) -> usize {
    let _ = stream.shutdown().await;
    let mut buf = vec![0u8; 16 * 1024];
    let started = tokio::time::Instant::now();
    let mut left = unacknowledged(stream);
    let mut moved = started;
    loop {
        if left == 0 {
            return 0;
        }
        let now = tokio::time::Instant::now();
        if now - moved >= CAP_STALL || now - started >= CAP_DRAIN {
            let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
            return left;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return 0,
                Ok(_) => {}
            },
            () = tokio::time::sleep(CAP_POLL) => {}
        }
        let now_left = unacknowledged(stream);
        if now_left < left {
            moved = tokio::time::Instant::now();
        }
        left = now_left;
    }
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
