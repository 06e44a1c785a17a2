//! One TLS connection's life: handshake, the echo loop inside TLS (at most one buffer
//! read before all of it is written back, so a client that does not read holds one
//! buffer), its deadlines and caps, and a clean end — close_notify answered with
//! echod's own after the last echo, and a client's bare TCP half-close too.
//!
//! A connection counts as open (its slot under `tcp.max_connections`, the active
//! gauges) until echod has closed its socket, and echod keeps a socket after the
//! connection's end only while the client may still be sending — when echod ended it
//! (at most [`CLOSE_LINGER`]). After a client's close_notify or TCP half-close, echod
//! writes its close_notify and FIN and closes at once: a client that keeps its socket
//! open holds no slot, and one that reconnects at once finds its slot free.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};

use super::{handshake, log_failure};
use crate::config::{TcpConfig, TlsConfig};
use crate::daemon::limits::Permit;
use crate::daemon::logging::RateLimitedLog;
use crate::daemon::metrics::{TcpListenerMetrics, TlsListenerMetrics};
use crate::daemon::reasons::{ConnectionCap, HandshakeResult, TlsEnd};
use crate::daemon::shutdown::Shutdown;
use crate::daemon::tcp::cap_reached;

/// How long an echo under way at a handover may take to finish, and how long the
/// close (close_notify, then reading what the client still sends) may take: the
/// longest a connection is held open after its end, counted against the limits.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Bytes read and thrown away after echod's close_notify, at most: closing with unread
/// input would reset the connection and could lose the close_notify.
const CLOSE_DISCARD: usize = 64 * 1024;
/// The most plaintext one TLS record carries: a TLS connection's buffer (held for its
/// life, unlike a plain connection's) is never larger, whatever `tcp.buffer_size` says.
const TLS_RECORD: usize = 16 * 1024;

static UPGRADE_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(1));

/// One admitted TLS connection and the settings it was accepted under.
pub(super) struct Session {
    pub(super) peer: SocketAddr,
    pub(super) tcp: Arc<TcpConfig>,
    pub(super) shutdown: Shutdown,
    pub(super) metrics: Arc<TcpListenerMetrics>,
    pub(super) tls_metrics: Arc<TlsListenerMetrics>,
    /// The slot under the limits, given back once echod has closed the socket.
    pub(super) permit: Option<Permit>,
    pub(super) started: Instant,
}

impl Session {
    /// Handshake, echo, close; counted in the TCP and TLS series of its listener.
    pub(super) async fn run(mut self, stream: TcpStream, tls: Arc<TlsConfig>) {
        self.metrics.active.inc();
        crate::daemon::tcp::apply_socket_options(&stream, &self.tcp);
        match handshake(stream, &tls, &self.shutdown).await {
            Ok(mut stream) => {
                self.tls_metrics.handshake(HandshakeResult::Ok);
                self.tls_metrics.active.inc();
                let (end, echoed) = self.echo(&mut stream).await;
                self.close(stream, end).await;
                self.tls_metrics.closed(end);
                if end == TlsEnd::Upgrade
                    && let Some(suppressed) = UPGRADE_LOG.allow()
                {
                    info!(listener = %self.metrics.label, peer = %self.peer, suppressed,
                        "TLS connection ended for the upgrade with close_notify (TLS state cannot cross the exec)");
                }
                if tracing::enabled!(tracing::Level::DEBUG) {
                    debug!(peer = %self.peer, end = end.label(), echoed_bytes = echoed,
                        "TLS connection closed");
                }
            }
            Err((result, error)) => {
                self.release(false);
                self.tls_metrics.handshake(result);
                log_failure(&self.metrics.label, self.peer, result, &error);
            }
        }
        self.metrics.closed.inc();
        self.metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Echoes until the client closes, a deadline or cap ends the connection, or a cut
    /// or handover interrupts it; returns how it ended and the bytes echoed.
    async fn echo(&self, stream: &mut TlsStream<TcpStream>) -> (TlsEnd, u64) {
        let mut buf = vec![0u8; self.tcp.buffer_size.min(TLS_RECORD)];
        let hard = self.tcp.max_connection_duration.map(|d| self.started + d);
        let mut echoed = 0u64;
        loop {
            let idle = Instant::now() + self.tcp.idle_timeout;
            let deadline = hard.map_or(idle, |h| h.min(idle));
            let n = tokio::select! {
                biased;
                () = self.shutdown.interrupted() => return (self.interrupted(), echoed),
                read = stream.read(&mut buf) => match read {
                    // close_notify: everything before it was echoed already.
                    Ok(0) => return (TlsEnd::CloseNotify, echoed),
                    Ok(n) => n,
                    // A TCP FIN without close_notify (ncat's end of input): everything
                    // before it was echoed; echod still ends with close_notify.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return (TlsEnd::Truncated, echoed);
                    }
                    Err(_) => return (TlsEnd::Error, echoed),
                },
                () = tokio::time::sleep_until(deadline) => return (self.expired(hard), echoed),
            };
            self.metrics.rx_bytes.inc_by(n as u64);
            let write = async {
                stream.write_all(&buf[..n]).await?;
                stream.flush().await
            };
            // A handover lets the echo under way finish, briefly: a client that does
            // not read cannot hold the upgrade up.
            let handover_grace = async {
                self.shutdown.interrupted().await;
                tokio::time::sleep(CLOSE_LINGER).await;
            };
            tokio::select! {
                biased;
                () = self.shutdown.cutting() => return (TlsEnd::DrainCut, echoed),
                written = write => if written.is_err() {
                    return (TlsEnd::Error, echoed);
                },
                () = handover_grace => return (self.interrupted(), echoed),
                () = tokio::time::sleep(self.tcp.idle_timeout) => {
                    self.metrics.idle_timeouts.inc();
                    return (TlsEnd::IdleTimeout, echoed);
                }
            }
            self.metrics.tx_bytes.inc_by(n as u64);
            echoed += n as u64;
            if let Some(cap) = cap_reached(&self.tcp, echoed, hard) {
                self.metrics.capped(cap);
                return (TlsEnd::Capped, echoed);
            }
            if self.shutdown.is_handing_over() {
                return (TlsEnd::Upgrade, echoed);
            }
        }
    }

    /// A cut, or an upgrade's handover.
    fn interrupted(&self) -> TlsEnd {
        if self.shutdown.is_handing_over() {
            TlsEnd::Upgrade
        } else {
            TlsEnd::DrainCut
        }
    }

    /// The idle deadline or `tcp.max_connection_duration` passed: which one, counted.
    fn expired(&self, hard: Option<Instant>) -> TlsEnd {
        if hard.is_some_and(|h| h <= Instant::now()) {
            self.metrics.capped(ConnectionCap::MaxDuration);
            TlsEnd::Capped
        } else {
            self.metrics.idle_timeouts.inc();
            TlsEnd::IdleTimeout
        }
    }

    /// No longer an open connection: the gauges go down, then the slot goes back (in
    /// that order, so neither exceeds the limit). `past_handshake`: it counts in
    /// `echod_tls_connections_active` too.
    fn release(&mut self, past_handshake: bool) {
        if self.permit.take().is_none() {
            return;
        }
        if past_handshake {
            self.tls_metrics.active.dec();
        }
        self.metrics.active.dec();
    }

    /// Ends the connection and releases it; the socket is closed before the slot goes
    /// back. A clean end sends close_notify, then FIN. When the client has finished
    /// sending (its close_notify, or a bare TCP half-close) nothing more is read: the
    /// close is written (waiting at most [`CLOSE_LINGER`] for room, the client still
    /// reading the last echo) and the socket closed at once — a client that keeps its
    /// socket open holds nothing of echod's. When echod ends the connection (a cap,
    /// the idle timeout, an upgrade) the client may still be sending: echod reads and
    /// discards it up to the client's FIN (at most [`CLOSE_LINGER`] and
    /// [`CLOSE_DISCARD`] bytes), so the close is not a reset that loses the last echo.
    /// A cut or an error just closes.
    async fn close(&mut self, mut stream: TlsStream<TcpStream>, end: TlsEnd) {
        match end {
            TlsEnd::DrainCut | TlsEnd::Error => {}
            TlsEnd::CloseNotify | TlsEnd::Truncated => {
                let _ = tokio::time::timeout(CLOSE_LINGER, stream.shutdown()).await;
            }
            TlsEnd::IdleTimeout | TlsEnd::Capped | TlsEnd::Upgrade => {
                let _ = tokio::time::timeout(CLOSE_LINGER, async {
                    if stream.shutdown().await.is_err() {
                        return;
                    }
                    let (tcp, _) = stream.get_mut();
                    let mut scratch = vec![0u8; 4096];
                    let mut discarded = 0;
                    while discarded < CLOSE_DISCARD {
                        match tcp.read(&mut scratch).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => discarded += n,
                        }
                    }
                })
                .await;
            }
        }
        drop(stream);
        self.release(true);
    }
}
