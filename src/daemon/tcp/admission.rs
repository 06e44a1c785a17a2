//! Who is served: a connection accepted by a listener is screened (the client's address
//! against `tcp.allow`/`tcp.deny` and its `tcp.connection_rate`) and takes its slot under
//! the global and per-address limits, or — from a trusted proxy — first reads its PROXY
//! header, and the client the header names is screened and takes the slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::Listener;
use super::session::{Lifeline, accepted};
use crate::config::TcpConfig;
use crate::daemon::accept::close_at_once;
use crate::daemon::limits::{ConnectionLimiter, Permit};
use crate::daemon::logging::RateLimitedLog;
use crate::daemon::metrics::TcpListenerMetrics;
use crate::daemon::proxy;
use crate::daemon::reasons::RejectReason;
use crate::daemon::tls::Endpoint;

static REJECT_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

impl Listener {
    pub(super) fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let config = Arc::clone(&self.config.borrow());
        // A connection accepted just as a drain began is refused, unless systemd keeps
        // the socket: then the next echod would have served it, so this one does (the
        // drain waits for it like any other).
        let draining = self.shutdown.is_draining() && !self.keep_backlog;
        let permit = if draining {
            Err(RejectReason::Shutdown)
        } else if config.proxy_protocol.trusts(peer.ip()) {
            // The lists and the rate are about the client, named in the header.
            self.limiter.try_acquire(peer.ip())
        } else {
            self.limiter
                .screen(&config, peer.ip())
                .and_then(|()| self.limiter.try_acquire(peer.ip()))
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
        if config.proxy_protocol.trusts(peer.ip()) {
            // The client's address comes in the PROXY header: its per-IP slot is taken
            // once the header is read, in the connection's own task; until then the
            // proxy's slot (just taken) is held.
            let proxied = Proxied {
                stream,
                proxy: peer,
                waiting: permit,
                config,
                limiter: Arc::clone(&self.limiter),
                metrics: Arc::clone(&self.metrics),
                lifeline: self.lifeline(),
                connections: self.connections.clone(),
                label: self.label.clone(),
                tls: self.tls.clone(),
            };
            self.connections.spawn(proxied.run());
            return;
        }
        let admitted = Admitted {
            stream,
            peer,
            config,
            metrics: Arc::clone(&self.metrics),
            permit,
        };
        admitted.spawn(&self.connections, self.tls.as_ref(), self.lifeline());
    }
}

/// A connection that has its slot under the limits, ready for its echo task.
struct Admitted {
    stream: TcpStream,
    /// The client (from a PROXY header when a proxy sent one).
    peer: SocketAddr,
    config: Arc<TcpConfig>,
    metrics: Arc<TcpListenerMetrics>,
    permit: Permit,
}

impl Admitted {
    /// Spawns the task that serves it: plain echo, or — on a TLS listener — a
    /// handshake and echo inside TLS.
    fn spawn(self, connections: &TaskTracker, tls: Option<&Endpoint>, lifeline: Lifeline) {
        let Self {
            stream,
            peer,
            config,
            metrics,
            permit,
        } = self;
        match tls {
            Some(tls) => connections.spawn(tls.serve(
                stream,
                peer,
                config,
                lifeline.shutdown,
                metrics,
                permit,
            )),
            None => connections.spawn(accepted(stream, peer, config, lifeline, metrics, permit)),
        };
    }
}

/// A connection from a trusted proxy whose header has not been read yet.
struct Proxied {
    stream: TcpStream,
    /// The proxy's address (the socket's peer).
    proxy: SocketAddr,
    /// The proxy's slot, held until the header names the client.
    waiting: Permit,
    config: Arc<TcpConfig>,
    limiter: Arc<ConnectionLimiter>,
    metrics: Arc<TcpListenerMetrics>,
    lifeline: Lifeline,
    /// Where the echo task is spawned once the header is in.
    connections: TaskTracker,
    /// The listener, for logs.
    label: String,
    /// Set for a TLS listener (the PROXY header comes before the ClientHello).
    tls: Option<Endpoint>,
}

impl Proxied {
    /// Reads the header (bounded by the timeout and by a cut), takes the client's slot,
    /// and hands the connection to an echo task of its own; or closes it and counts why.
    async fn run(self) {
        let Self {
            mut stream,
            proxy,
            waiting,
            config,
            limiter,
            metrics,
            lifeline,
            connections,
            label,
            tls,
        } = self;
        // It holds a slot under `tcp.max_connections`, so it counts as active (the
        // near-limit alert is active / max); on a TLS listener that gauge counts
        // connections past their handshake only.
        let awaiting = tls.is_none().then(|| Awaiting::new(&metrics.active));
        let timeout = config.proxy_protocol.header_timeout;
        let read = tokio::time::timeout(timeout, proxy::read_header(&mut stream, proxy));
        let header = tokio::select! {
            read = read => read.unwrap_or(Err(proxy::HeaderError::Timeout(timeout))),
            // A cut, or an upgrade: one proxy that holds its header back must not hold
            // every other connection's handover up until the header timeout (4.8 s
            // measured), so a connection still without its header is closed, counted.
            () = lifeline.shutdown.interrupted() => {
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
                close_at_once(stream);
                return;
            }
        };
        // The proxy's slot goes back as the client's is taken.
        drop(waiting);
        drop(awaiting);
        let permit = limiter
            .screen(&config, client.ip())
            .and_then(|()| limiter.try_acquire(client.ip()));
        match permit {
            Ok(permit) => {
                let admitted = Admitted {
                    stream,
                    peer: client,
                    config,
                    metrics,
                    permit,
                };
                admitted.spawn(&connections, tls.as_ref(), lifeline);
            }
            Err(reason) => {
                metrics.rejected(reason);
                if let Some(suppressed) = REJECT_LOG.allow() {
                    warn!(listener = %label, peer = %client, %proxy, reason = reason.label(),
                        suppressed, "connection rejected");
                }
                // What it sent with its header is discarded, so it sees EOF.
                close_at_once(stream);
            }
        }
    }
}

/// Counts a connection waiting for its PROXY header in the listener's active gauge
/// until dropped.
struct Awaiting(IntGauge);

impl Awaiting {
    fn new(active: &IntGauge) -> Self {
        active.inc();
        Self(active.clone())
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}
