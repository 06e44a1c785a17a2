//! Who is served: a connection accepted by a listener takes its slot under the global
//! and per-address limits, or — from a trusted proxy — first reads its PROXY header and
//! takes the slot of the client the header names. While it waits for its header it
//! holds a slot of the proxy's own address (so silent connections count against
//! `tcp.max_connections` and, per proxy, `tcp.max_connections_per_ip`: behind a load
//! balancer that sends the header with the client's first data, any client can open
//! them). A refused connection is closed with [`close_at_once`], so what it sent with
//! its header is discarded and it sees EOF, not a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::Listener;
use super::session::serve;
use crate::config::TcpConfig;
use crate::daemon::accept::close_at_once;
use crate::daemon::limits::{ConnectionLimiter, Permit};
use crate::daemon::logging::RateLimitedLog;
use crate::daemon::metrics::TcpListenerMetrics;
use crate::daemon::proxy;
use crate::daemon::reasons::RejectReason;
use crate::daemon::shutdown::Shutdown;

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
                shutdown: self.shutdown.clone(),
                connections: self.connections.clone(),
                label: self.label.clone(),
            };
            self.connections.spawn(proxied.run());
            return;
        }
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
            waiting,
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
                close_at_once(stream);
                return;
            }
        };
        // The proxy's slot goes back as the client's is taken.
        drop(waiting);
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
                // What it sent with its header is discarded, so it sees EOF.
                close_at_once(stream);
            }
        }
    }
}
