//! One TLS connection's life: handshake, the echo loop inside TLS (at most one buffer
//! read before all of it is written back, so a client that does not read holds one
//! buffer), its deadlines and caps, and a clean end — close_notify answered with
//! echod's own after the last echo.

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
/// close (close_notify, then reading what the client still sends) may take.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Bytes read and thrown away after echod's close_notify, at most: closing with unread
/// input would reset the connection and could lose the close_notify.
const CLOSE_DISCARD: usize = 64 * 1024;

static UPGRADE_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(1));

/// One admitted TLS connection and the settings it was accepted under.
pub(super) struct Session {
    pub(super) peer: SocketAddr,
    pub(super) tcp: Arc<TcpConfig>,
    pub(super) shutdown: Shutdown,
    pub(super) metrics: Arc<TcpListenerMetrics>,
    pub(super) tls_metrics: Arc<TlsListenerMetrics>,
    /// The slot under the limits, given back before the close reaches the client.
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
                self.permit = None;
                self.close(&mut stream, end).await;
                self.tls_metrics.active.dec();
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
                self.permit = None;
                self.tls_metrics.handshake(result);
                log_failure(&self.metrics.label, self.peer, result, &error);
            }
        }
        self.metrics.active.dec();
        self.metrics.closed.inc();
        self.metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Echoes until the client closes, a deadline or cap ends the connection, or a cut
    /// or handover interrupts it; returns how it ended and the bytes echoed.
    async fn echo(&self, stream: &mut TlsStream<TcpStream>) -> (TlsEnd, u64) {
        let mut buf = vec![0u8; self.tcp.buffer_size];
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

    /// A clean end sends close_notify and then FIN, and reads what the client still
    /// sends (briefly) so the close is not a reset; a cut or an error just closes.
    async fn close(&self, stream: &mut TlsStream<TcpStream>, end: TlsEnd) {
        if matches!(end, TlsEnd::DrainCut | TlsEnd::Error | TlsEnd::Truncated) {
            return;
        }
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
